r"""The WAE-GAN's losses, optimizers and training steps (the recipes of :data:`labkit.models.wae.RECIPES`).

The networks are :class:`labkit.models.wae.WAE`'s; the module docstring of :mod:`labkit.models.wae`
states the losses and the three recipes. Here:

- losses: :func:`reconstruction_loss` (BCE or squared error over the counted pixels, per image or
  over all pixels), :func:`discriminator_loss`, :func:`encoder_adversarial_loss`;
- optimizers: :func:`make_optimizers` (one Adam over the three networks, or two);
- steps: :func:`discriminator_step` and :func:`autoencoder_step` (recipe ``"supplement"``, one
  encoding), :func:`joint_step` (``"authors_joint"``), :func:`alternating_step` (``"authors"``), and
  :func:`train_step`, which dispatches on the recipe's procedure.

Every step runs its forward passes under :func:`labkit.precision.autocast` and takes losses and
backward passes in float32.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.models.wae import RECIPES, WAE, Discriminator
from labkit.precision import autocast, grad_scaler, resolve_precision, to_float32

__all__ = [
    "alternating_step",
    "autoencoder_step",
    "discriminator_loss",
    "discriminator_step",
    "encoder_adversarial_loss",
    "joint_step",
    "make_optimizers",
    "reconstruction_loss",
    "train_step",
]


# --------------------------------------------------------------------------- losses
def reconstruction_loss(logits: Tensor, target: Tensor, counted: Tensor, kind: str = "bce",
                        average: str = "per_image") -> Tensor:
    """BCE (or squared error) over the ``counted`` pixels, averaged as ``average`` says.

    Args:
        logits: the decoder's output ``(B, C, H, W)`` (the image is ``sigmoid(logits)``).
        target: ``(B, C, H, W)`` in [0, 1]; values at uncounted pixels are ignored (NaN allowed).
        counted: bool ``(B, 1|C, H, W)``, True = pixel in the loss (the observed pixels).
        kind: ``"bce"`` (binary cross-entropy with soft targets) or ``"mse"``.
        average: ``"per_image"``: each image's mean over its counted pixels, then the batch mean (an
            image with no counted pixel contributes 0); ``"all_pixels"``: the sum over counted
            pixels divided by B·C·H·W, what the authors' code computes by zeroing the uncounted
            pixels of output and target and taking the mean of the whole batch.
    """
    if kind not in ("bce", "mse"):
        raise ValueError(f"kind must be 'bce' or 'mse', got {kind!r}")
    if average not in ("per_image", "all_pixels"):
        raise ValueError(f"average must be 'per_image' or 'all_pixels', got {average!r}")
    if not isinstance(counted, Tensor) or counted.dtype != torch.bool:
        raise TypeError(f"counted must be a bool tensor (True = pixel in the loss), got {getattr(counted, 'dtype', type(counted).__name__)}")
    if logits.shape != target.shape:
        raise ValueError(f"logits has shape {tuple(logits.shape)} but target has {tuple(target.shape)}")
    b, c, h, w = target.shape
    if counted.dim() != 4 or counted.shape[0] != b or tuple(counted.shape[2:]) != (h, w) or counted.shape[1] not in (1, c):
        raise ValueError(f"counted must have shape ({b}, 1, {h}, {w}) or ({b}, {c}, {h}, {w}), got {tuple(counted.shape)}")
    m = counted.expand(b, c, h, w)
    logits = to_float32(logits)  # a decoder run under mixed precision: the loss is float32
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    # Clean the target first: a NaN there would give NaN gradients even where masked (NaN * 0).
    t = torch.where(m, target.to(logits.dtype), zero)
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    else:
        per_pixel = (torch.sigmoid(logits) - t) ** 2
    kept = torch.where(m, per_pixel, zero)
    if average == "all_pixels":
        return kept.sum() / kept.numel()
    per_image = kept.flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return per_image.mean()


def discriminator_loss(discriminator: Discriminator, z_encoded: Tensor, z_prior: Tensor) -> Tensor:
    """``BCE(D(z_prior), 1) + BCE(D(z_encoded), 0)`` for codes ``(B, D)``; ``z_encoded`` is detached (no
    encoder gradient). The recipes' weight ``w_D`` is applied by the steps."""
    real, fake = to_float32(discriminator.logits(z_prior), discriminator.logits(z_encoded.detach()))
    return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def encoder_adversarial_loss(discriminator: Discriminator, z_encoded: Tensor) -> Tensor:
    """``BCE(D(z_encoded), 1) = −mean log D(z)``: small when the codes look like prior samples."""
    logit = to_float32(discriminator.logits(z_encoded))
    return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))


# --------------------------------------------------------------------------- training steps
def make_optimizers(model: WAE, lr: float = 4e-4, lr_disc: float | None = 4e-6, *,
                    recipe: str = "supplement") -> dict[str, torch.optim.Optimizer]:
    """The optimizers of a recipe (:data:`RECIPES`).

    ``"supplement"``: ``{"autoencoder": Adam(encoder + decoder, lr), "discriminator": Adam(discriminator,
    lr_disc)}``; ``"authors"``, ``"authors_joint"``: ``{"all": Adam(encoder + decoder + discriminator,
    lr)}`` (``lr_disc`` is ignored: pass ``None``).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown WAE recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    one = RECIPES[recipe]["optimizers"] == "one"
    for name, v in (("lr", lr),) + ((() if one else (("lr_disc", lr_disc),))):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if one:
        return {"all": torch.optim.Adam(model.autoencoder_parameters() + list(model.discriminator.parameters()),
                                        lr=lr)}
    return {
        "autoencoder": torch.optim.Adam(model.autoencoder_parameters(), lr=lr),
        "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=lr_disc),
    }


def _scaler(precision: str, device, scaler):
    """The step's GradScaler: the run's (needed for 16-mixed, whose scale must persist), else a pass-through."""

    if scaler is not None:
        return scaler
    if resolve_precision(precision, device) == "16-mixed":
        raise ValueError("precision '16-mixed' needs the run's GradScaler: pass scaler=labkit.precision.grad_scaler"
                         "('16-mixed', device)")
    return grad_scaler(precision, device)


def discriminator_step(model: WAE, optimizer: torch.optim.Optimizer, z_encoded: Tensor, *,
                       generator: torch.Generator | None = None, precision: str = "32",
                       scaler: torch.amp.GradScaler | None = None, weight: float = 1.0) -> dict[str, float]:
    """One Adam step of the discriminator on encoded codes ``(B, D)`` vs as many prior samples.

    Only the discriminator's parameters receive gradient (the codes are detached). Returns
    ``{"d_loss", "d_prior", "d_encoded"}``: the loss and the mean probabilities D gave each set.
    ``precision``: the discriminator's forward runs under :func:`labkit.precision.autocast`, the
    loss and backward in float32; ``scaler``: the run's GradScaler (the caller calls its ``update()``).
    """
    dev = z_encoded.device
    scaler = _scaler(precision, dev, scaler)
    z_prior = model.prior_sample(z_encoded.shape[0], generator=generator).to(z_encoded.dtype)
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, dev):
        loss = discriminator_loss(model.discriminator, z_encoded, z_prior)   # float32
    scaler.scale(weight * loss).backward()   # weight: the recipe's w_D (the reported d_loss is unweighted)
    scaler.step(optimizer)
    with torch.no_grad():
        d_prior = model.discriminator(z_prior).mean()
        d_enc = model.discriminator(z_encoded.detach()).mean()
    return {"d_loss": float(loss.detach()), "d_prior": float(d_prior), "d_encoded": float(d_enc)}


def _autoencoder_backward(model: WAE, z_encoded: Tensor, target: Tensor, counted: Tensor, *, lambda_adv: float,
                          recon: str, precision: str = "32", scaler=None,
                          recon_average: str = "per_image") -> dict[str, Tensor]:
    """Backward of ``reconstruction(counted pixels) + λ · (−log D(z))`` into encoder and decoder only.

    The discriminator is frozen (``requires_grad`` off) while the loss is built and differentiated,
    so its parameters get no gradient from the fooling term. Returns the detached terms.
    Decoder and discriminator run under :func:`labkit.precision.autocast`; losses and backward in float32.
    """
    dev = z_encoded.device
    scaler = _scaler(precision, dev, scaler)
    with autocast(precision, dev):
        logits = model.decoder(z_encoded)
    rec = reconstruction_loss(logits, target, counted, recon, recon_average)   # float32
    disc_params = list(model.discriminator.parameters())
    flags = [p.requires_grad for p in disc_params]
    try:
        for p in disc_params:
            p.requires_grad_(False)
        with autocast(precision, dev):
            adv = encoder_adversarial_loss(model.discriminator, z_encoded)   # float32
        loss = rec + lambda_adv * adv
        scaler.scale(loss).backward()
    finally:
        for p, f in zip(disc_params, flags):
            p.requires_grad_(f)
    return {"loss": loss.detach(), "recon": rec.detach(), "adv": adv.detach()}


def autoencoder_step(model: WAE, optimizer: torch.optim.Optimizer, z_encoded: Tensor, target: Tensor,
                     counted: Tensor, *, lambda_adv: float = 1.0, recon: str = "bce", precision: str = "32",
                     scaler: torch.amp.GradScaler | None = None, recon_average: str = "per_image") -> dict[str, float]:
    """One Adam step of encoder + decoder: ``reconstruction(counted pixels) + λ · (−log D(z))``.

    Args:
        z_encoded: ``model.encode(...)`` of the batch, *with* its graph (from the current encoder).
        target: ``(B, C, H, W)`` the images the reconstruction is compared with (NaN allowed at
            uncounted pixels). counted: bool ``(B, 1|C, H, W)``, True = in the loss.

    The discriminator is frozen (``requires_grad`` off) while the loss is differentiated, so its
    parameters get no gradient and are not changed. ``precision``/``scaler``: as for
    :func:`discriminator_step`.
    """
    scaler = _scaler(precision, z_encoded.device, scaler)
    optimizer.zero_grad(set_to_none=True)
    out = _autoencoder_backward(model, z_encoded, target, counted, lambda_adv=lambda_adv, recon=recon,
                                precision=precision, scaler=scaler, recon_average=recon_average)
    scaler.step(optimizer)
    return {k: float(v) for k, v in out.items()}


def joint_step(model: WAE, optimizer: torch.optim.Optimizer, z_encoded: Tensor, target: Tensor, counted: Tensor,
               *, generator: torch.Generator | None = None, lambda_adv: float = 0.01, disc_weight: float = 0.01,
               recon: str = "mse", precision: str = "32",
               scaler: torch.amp.GradScaler | None = None, recon_average: str = "per_image") -> dict[str, float]:
    """The ``"authors_joint"`` step: one optimizer (over all three networks) moves them all at once.

    Gradients: ``disc_weight · [BCE(D(z_prior), 1) + BCE(D(z_encoded), 0)]`` with the codes
    ``z_encoded (B, D)`` detached reaches only the discriminator; ``reconstruction + λ · (−log D(z))``
    with the discriminator frozen reaches only encoder and decoder. Then one ``optimizer.step()``.
    ``target``/``counted`` as in :func:`autoencoder_step`. Returns ``d_loss`` (the unweighted
    discriminator BCE, comparable across recipes), ``d_prior``, ``d_encoded``, ``loss``, ``recon``,
    ``adv``.
    """
    dev = z_encoded.device
    scaler = _scaler(precision, dev, scaler)
    z_prior = model.prior_sample(z_encoded.shape[0], generator=generator).to(z_encoded.dtype)
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, dev):
        d_loss = discriminator_loss(model.discriminator, z_encoded, z_prior)   # float32
    scaler.scale(disc_weight * d_loss).backward()
    out = _autoencoder_backward(model, z_encoded, target, counted, lambda_adv=lambda_adv, recon=recon,
                                precision=precision, scaler=scaler, recon_average=recon_average)
    scaler.step(optimizer)
    with torch.no_grad():
        d_prior = model.discriminator(z_prior).mean()
        d_enc = model.discriminator(z_encoded.detach()).mean()
    return {"d_loss": float(d_loss.detach()), "d_prior": float(d_prior), "d_encoded": float(d_enc),
            **{k: float(v) for k, v in out.items()}}


class _Frozen:
    """Within the block, the given modules' parameters have ``requires_grad`` off (restored after)."""

    def __init__(self, *modules: nn.Module):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, f in zip(self.params, self.flags):
            p.requires_grad_(f)


def _authors_forward(model: WAE, x: Tensor, missing: Tensor, aux, generator, precision: str):
    """The authors' forward pass in training mode: codes, the discriminator's logits on them and
    on as many prior samples, and the decoded codes' logits; the prior samples are decoded too,
    without gradient, because their forward pass did so (it moves the decoder's BatchNorm
    statistics). Returns ``(z, d_encoded_logits, z_prior, d_prior_logits, decoded_logits)``."""
    dev = x.device
    with autocast(precision, dev):
        z = model.encode(x, missing, aux)
    z = to_float32(z)
    z_prior = model.prior_sample(z.shape[0], generator=generator).to(z.dtype)
    with autocast(precision, dev):
        d_enc = model.discriminator.logits(z)
        d_prior = model.discriminator.logits(z_prior)
        logits = model.decoder(z)
        with torch.no_grad():
            model.decoder(z_prior)
    return z, to_float32(d_enc), z_prior, to_float32(d_prior), logits


def alternating_step(model: WAE, optimizer: torch.optim.Optimizer, x: Tensor, missing: Tensor, aux=None, *,
                     target: Tensor, counted: Tensor, generator: torch.Generator | None = None,
                     lambda_adv: float = 0.01, disc_weight: float = 0.01, recon: str = "mse",
                     recon_average: str = "all_pixels", precision: str = "32",
                     scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """The authors' training of one batch: a discriminator step, then an autoencoder step that sees
    the updated discriminator; both with ``optimizer``, one Adam over all three networks.

    1. Gradients zeroed (``set_to_none=False``: a parameter that has a gradient keeps a zero one,
       so Adam moves it by its momentum even while frozen), encoder and decoder frozen, the
       forward pass run (:func:`_authors_forward`), ``disc_weight · [BCE(D(z_prior), 1) + BCE(D(z), 0)]``
       backpropagated, the optimiser stepped.
    2. Gradients zeroed, the discriminator frozen, the forward pass run again (new codes from the
       same encoder, new prior samples), ``reconstruction + λ · BCE(D(z), 1)`` backpropagated, the
       optimiser stepped. ``reconstruction``: :func:`reconstruction_loss` with ``recon`` and
       ``recon_average`` against ``target (B, C, H, W)`` at the ``counted`` pixels (bool
       ``(B, 1|C, H, W)``).

    ``x (B, C, H, W)`` (NaN allowed at missing pixels), ``missing`` bool ``(B, 1|C, H, W)``, ``aux``
    the front's auxiliary input. Returns ``d_loss`` (the unweighted discriminator BCE of step 1),
    ``d_prior``/``d_encoded`` (the mean probabilities the discriminator gave prior samples and codes
    in step 1, before its update), ``loss``, ``recon``, ``adv`` (the terms of step 2, ``adv``
    unweighted). ``scaler``: the run's GradScaler, updated here between the two steps (they share
    the optimiser); the caller updates it after the second.
    """
    scaler = _scaler(precision, x.device, scaler)
    # step 1: the discriminator
    optimizer.zero_grad(set_to_none=False)
    with _Frozen(model.encoder, model.decoder):
        _, d_enc, _, d_prior, _ = _authors_forward(model, x, missing, aux, generator, precision)
        d_loss = (F.binary_cross_entropy_with_logits(d_prior, torch.ones_like(d_prior))
                  + F.binary_cross_entropy_with_logits(d_enc, torch.zeros_like(d_enc)))
        scaler.scale(disc_weight * d_loss).backward()
    scaler.step(optimizer)
    scaler.update()          # a GradScaler steps an optimiser once per update; the second step is the caller's
    # step 2: encoder and decoder, against the discriminator just updated
    optimizer.zero_grad(set_to_none=False)
    with _Frozen(model.discriminator):
        _, d_enc2, _, _, logits = _authors_forward(model, x, missing, aux, generator, precision)
        rec = reconstruction_loss(logits, target, counted, recon, recon_average)   # float32
        adv = F.binary_cross_entropy_with_logits(d_enc2, torch.ones_like(d_enc2))
        loss = rec + lambda_adv * adv
        scaler.scale(loss).backward()
    scaler.step(optimizer)
    return {"d_loss": float(d_loss.detach()), "d_prior": float(torch.sigmoid(d_prior.detach()).mean()),
            "d_encoded": float(torch.sigmoid(d_enc.detach()).mean()), "loss": float(loss.detach()),
            "recon": float(rec.detach()), "adv": float(adv.detach())}


def train_step(model: WAE, optimizers: Mapping[str, torch.optim.Optimizer], x: Tensor, missing: Tensor,
               aux=None, *, target: Tensor | None = None, counted: Tensor | None = None,
               generator: torch.Generator | None = None, lambda_adv: float = 1.0,
               recon: str = "bce", disc_weight: float = 1.0, precision: str = "32",
               scaler: torch.amp.GradScaler | None = None, step: str | None = None,
               recon_average: str = "per_image") -> dict[str, float]:
    """One WAE-GAN step on a batch: the recipe's updates.

    With ``optimizers`` from :func:`make_optimizers`: keys ``autoencoder`` and ``discriminator``
    (recipe "supplement"): encode once, a discriminator step, then an autoencoder step; key ``all``
    (recipes "authors", "authors_joint"): ``step="alternating"`` runs :func:`alternating_step` (two
    forward passes, two steps of the one optimiser), ``step="joint"`` (the default for ``all``)
    encodes once and runs :func:`joint_step`; ``disc_weight`` weighs the discriminator loss.
    ``recon_average``: see :func:`reconstruction_loss`.

    Args:
        x: ``(B, C, H, W)`` incomplete images (NaN allowed at missing pixels).
        missing: bool ``(B, 1|C, H, W)``, True = missing.
        aux: the front's auxiliary input for this batch (see :mod:`labkit.models.fronts`).
        target: what the reconstruction is compared with (default ``x``).
        counted: pixels of the reconstruction loss (default ``~missing``: observed pixels only).
        generator: for the prior samples of the discriminator's loss.
        precision: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` (CUDA) or ``"auto"``: the networks'
            forward passes run under :func:`labkit.precision.autocast` (a MisConv front stays
            float32), the losses and backward in float32. ``scaler``: the run's GradScaler
            (required for ``"16-mixed"``; updated once per call).

    Returns the metrics of the step (``d_loss``, ``d_prior``, ``d_encoded``, ``loss``, ``recon``, ``adv``).
    """
    joint = set(optimizers) == {"all"}
    if not joint and not {"autoencoder", "discriminator"} <= set(optimizers):
        raise ValueError("optimizers must have keys 'autoencoder' and 'discriminator' (recipe 'supplement') or "
                         f"the one key 'all' (recipes 'authors', 'authors_joint'), got {sorted(optimizers)}")
    step = step or ("joint" if joint else "sequential")
    valid = ("alternating", "joint") if joint else ("sequential",)
    if step not in valid:
        raise ValueError(f"step {step!r} does not go with optimizers {sorted(optimizers)}: use one of {valid}")
    if not isinstance(missing, Tensor) or missing.dtype != torch.bool:
        raise TypeError(f"missing must be a bool tensor (True = missing), got {getattr(missing, 'dtype', type(missing).__name__)}")
    target = x if target is None else target
    counted = ~missing if counted is None else counted
    scaler = _scaler(precision, x.device, scaler)
    if step == "alternating":
        out = alternating_step(model, optimizers["all"], x, missing, aux, target=target, counted=counted,
                               generator=generator, lambda_adv=lambda_adv, disc_weight=disc_weight, recon=recon,
                               recon_average=recon_average, precision=precision, scaler=scaler)
        scaler.update()
        if not all(math.isfinite(v) for v in out.values()):
            raise FloatingPointError(f"WAE step produced non-finite metrics {out}")
        return out
    with autocast(precision, x.device):
        z = model.encode(x, missing, aux)
    z = to_float32(z)
    if joint:
        out = joint_step(model, optimizers["all"], z, target, counted, generator=generator, lambda_adv=lambda_adv,
                         disc_weight=disc_weight, recon=recon, precision=precision, scaler=scaler,
                         recon_average=recon_average)
    else:
        out = discriminator_step(model, optimizers["discriminator"], z, generator=generator, weight=disc_weight,
                                 precision=precision, scaler=scaler)
        out.update(autoencoder_step(model, optimizers["autoencoder"], z, target, counted,
                                    lambda_adv=lambda_adv, recon=recon, precision=precision, scaler=scaler,
                                    recon_average=recon_average))
    scaler.update()
    if not all(math.isfinite(v) for v in out.values()):
        raise FloatingPointError(f"WAE step produced non-finite metrics {out}")
    return out
