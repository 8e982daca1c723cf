r"""Wasserstein autoencoders (WAE-GAN, Tolstikhin et al. 2018) trained on incomplete images.

The encoder's first conv+ReLU is a missing-data *front* (:mod:`labkit.fronts`: zero imputation,
partial convolution, DMFA mean imputation, MisConv, ground truth, ...); the rest is the
architecture of the paper's supplementary material, section 1.3 (:data:`ARCHITECTURES`).

Model (:class:`WAE`):

- encoder ``Q(z|x)``, deterministic: front (conv + ReLU) -> BatchNorm -> ``conv_n`` blocks
  (3×3 conv, ReLU, BatchNorm) and ``down`` layers (3×3 conv, stride 2) -> ReLU -> linear to the
  latent space ``z ∈ R^d``;
- decoder: linear -> reshape -> ReLU -> ``up`` layers (3×3 transposed conv, stride 2) and
  ``conv_n`` blocks -> a plain 3×3 conv to the image channels; it returns logits, the image is
  their sigmoid (pixels in [0, 1]);
- discriminator on ``z``: ``[linear 64, ReLU] × 4`` -> linear 1 -> sigmoid, the probability that
  ``z`` came from the prior ``N(0, I)``.

Losses (per batch of B images; ``counted`` = the pixels the loss sees):

- discriminator: ``BCE(D(z_prior), 1) + BCE(D(z_encoded), 0)``, the encodings detached;
- autoencoder: ``reconstruction + λ · BCE(D(z_encoded), 1)`` (``−λ log D(z)``: the encoder tries to
  make its codes look like prior samples), with ``reconstruction`` = the binary cross-entropy
  between the decoded image and the target, **averaged over each image's counted pixels, then over
  the batch** (``recon="mse"`` for the squared error instead). ``λ = 1`` by default, as in the
  authors' code (which also uses BCE). Counted pixels: the observed ones for every front trained on
  incomplete images; all pixels for the ground-truth front, whose encoder sees the complete
  images (the ceiling of the study).

One optimisation step (:func:`train_step`) encodes the batch once, then makes a discriminator step
(:func:`discriminator_step`, only the discriminator's parameters move) and an autoencoder step
(:func:`autoencoder_step`, only the encoder's and decoder's parameters move; the discriminator is
frozen while its gradient is taken, so its ``.grad`` stays empty). Two Adam optimizers: the
paper's rates are 4e-4 for the autoencoder and 4e-6 for the discriminator (MNIST, SVHN); at
4e-6 the discriminator barely moves in a few epochs, which the study reports as is.

The study (second half of this module): :func:`run_cell` trains and scores one (dataset, front,
seed) — data, fixed per-image masks and the fronts' auxiliaries come from
:mod:`labkit.classifier` (same masks and caches as the classification study) —, :func:`run_sweep`
runs a resumable grid into ``results/wae/<profile>/metrics.csv`` (columns :data:`WAE_COLUMNS`)
with figures, and :func:`summary_table` / :func:`table_markdown` / :func:`plot_metrics` report it
next to the authors' numbers (:data:`AUTHORS_WAE_MNIST`). Metrics (:mod:`labkit.metrics`): PSNR and
SSIM over the missing region and the whole image, and Fréchet distances between features of the
lab's own classifier (:func:`feature_network`; :data:`FD_NAME`), since no Inception weights can be
downloaded here.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.device import resolve_device
from labkit.sweeps import append_csv_row, append_jsonl, read_table
from labkit.fronts import FRONTS, Front, make_front

__all__ = [
    "ARCHITECTURES",
    "AUTHORS_WAE_MNIST",
    "FD_NAME",
    "FRONT_ALIASES",
    "METRIC_COLUMNS",
    "PAPER_SETTINGS",
    "WAE_COLUMNS",
    "Decoder",
    "Discriminator",
    "Encoder",
    "WAE",
    "WAEConfig",
    "autoencoder_step",
    "canonical_front",
    "classifier_features",
    "discriminator_loss",
    "discriminator_step",
    "encoder_adversarial_loss",
    "evaluate_wae",
    "feature_network",
    "front_available",
    "load_examples",
    "make_optimizers",
    "plan_cells",
    "plot_front_grid",
    "plot_metrics",
    "plot_reconstructions",
    "plot_samples",
    "read_results",
    "reconstruction_loss",
    "run_cell",
    "run_sweep",
    "summary_table",
    "table_markdown",
    "train_step",
]

#: Layer lists of the supplementary material, section 1.3 (conv_n = 3×3 conv + ReLU + BatchNorm,
#: down/up = stride-2 conv / transposed conv, lin_n = linear). The CelebA lists in the paper name
#: no resampling layers although the latent ``lin_8192 = 512 × 4 × 4`` implies four: our reading
#: puts a ``down`` after each group of the encoder and an ``up`` before each group of the decoder.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mnist": {
        "image_shape": (1, 28, 28),
        "encoder": ["conv32", "conv40", "down", "conv80", "down", "lin20"],
        "decoder": ["lin3920", "up", "conv80", "up", "conv40", "conv40", "conv1"],
        "discriminator": ["lin64"] * 4 + ["lin1"],
    },
    "svhn": {
        "image_shape": (3, 32, 32),
        "encoder": ["conv32", "conv96", "conv96", "down", "conv192", "conv192", "down", "lin20"],
        "decoder": ["lin12288", "up", "conv192", "conv192", "up", "conv96", "conv96", "conv96", "conv3"],
        "discriminator": ["lin64"] * 4 + ["lin1"],
    },
    "celeba": {
        "image_shape": (3, 64, 64),
        "encoder": ["conv32"] + ["conv64"] * 4 + ["down"] + ["conv128"] * 4 + ["down"]
        + ["conv256"] * 4 + ["down"] + ["conv512"] * 4 + ["down", "lin64"],
        "decoder": ["lin8192", "up"] + ["conv512"] * 4 + ["up"] + ["conv256"] * 4 + ["up"]
        + ["conv128"] * 4 + ["up"] + ["conv64"] * 5 + ["conv3"],
        "discriminator": ["lin512"] * 4 + ["lin1"],
    },
}

#: Training settings of the supplementary material, section 1.3.
PAPER_SETTINGS: dict[str, dict[str, float | int]] = {
    "mnist": {"epochs": 20, "batch_size": 128, "lr": 4e-4, "lr_disc": 4e-6},
    "svhn": {"epochs": 50, "batch_size": 64, "lr": 4e-4, "lr_disc": 4e-6},
    "celeba": {"epochs": 50, "batch_size": 16, "lr": 1e-4, "lr_disc": 2.5e-6},
}

_TOKEN = re.compile(r"^(conv|lin)(\d+)$|^(down|up)$")


def _parse(spec: Sequence[str], what: str) -> list[tuple[str, int]]:
    """``["conv32", "down", "lin20"]`` -> ``[("conv", 32), ("down", 0), ("lin", 20)]``."""
    if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"{what} must be a non-empty list of layer names like 'conv32', 'down', 'lin20', got {spec!r}")
    out = []
    for tok in spec:
        m = _TOKEN.match(tok) if isinstance(tok, str) else None
        if m is None:
            raise ValueError(f"{what}: unknown layer {tok!r}; use convN, linN, down or up")
        out.append((m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), 0))
        if out[-1][0] in ("conv", "lin") and out[-1][1] < 1:
            raise ValueError(f"{what}: layer {tok!r} needs at least one unit")
    return out


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """``conv_n`` of the supplementary: 3×3 conv (same size) -> ReLU -> BatchNorm."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout))


# --------------------------------------------------------------------------- networks
class Encoder(nn.Module):
    """Deterministic encoder: front -> BatchNorm -> conv/down body -> ReLU -> linear to ``R^d``.

    Args:
        front: a :mod:`labkit.fronts` registry name (``"zero"``, ``"pc"``, ``"dmfa_mean_complete"``,
            ``"dmfa_misconv_complete"``, ``"gt"``, ...) or a :class:`~labkit.fronts.Front` subclass;
            it is the first ``conv_n``'s convolution + ReLU.
        image_shape: ``(C, H, W)``.
        spec: layer names; must start with ``convN`` and end with ``linD`` (D = latent size).

    ``forward(x, missing, aux=None)``: ``x (B, C, H, W)``, ``missing`` bool ``(B, 1|C, H, W)``,
    ``aux`` as ``self.front.aux_kind`` says -> ``z (B, D)``.
    """

    def __init__(self, front: str | type[Front], image_shape: Sequence[int], spec: Sequence[str]):
        super().__init__()
        layers = _parse(spec, "encoder")
        c, h, w = (int(v) for v in image_shape)
        if layers[0][0] != "conv" or layers[-1][0] != "lin" or any(k == "lin" for k, _ in layers[:-1]):
            raise ValueError(f"encoder must start with convN and end with its only linN layer, got {list(spec)}")
        first = layers[0][1]
        self.front = make_front(front, c, first, kernel_size=3, padding=1)
        body: list[nn.Module] = [nn.BatchNorm2d(first)]
        ch = first
        for kind, n in layers[1:-1]:
            if kind == "conv":
                body.append(_conv_block(ch, n))
                ch = n
            elif kind == "down":
                body.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                h, w = (h + 1) // 2, (w + 1) // 2
            else:
                raise ValueError(f"encoder: 'up' layers belong to the decoder, got {list(spec)}")
        self.body = nn.Sequential(*body)
        self.latent_dim = layers[-1][1]
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(ch * h * w, self.latent_dim))

    @property
    def aux_kind(self) -> str:
        return self.front.aux_kind

    def forward(self, x: Tensor, missing: Tensor, aux=None) -> Tensor:
        return self.head(self.body(self.front(x, missing, aux)))


class Decoder(nn.Module):
    """Decoder: linear -> reshape -> ReLU -> up/conv body -> 3×3 conv to the image channels (logits).

    The linear layer's size fixes the starting grid: ``channels = size / (H/2^u · W/2^u)`` with ``u``
    the number of ``up`` layers (MNIST: 3920 = 80 × 7 × 7).

    ``forward(z)``: ``z (B, D)`` -> logits ``(B, C, H, W)``; :meth:`WAE.decode` applies the sigmoid.
    """

    def __init__(self, latent_dim: int, image_shape: Sequence[int], spec: Sequence[str]):
        super().__init__()
        layers = _parse(spec, "decoder")
        c, h, w = (int(v) for v in image_shape)
        if layers[0][0] != "lin" or layers[-1][0] != "conv" or any(k == "lin" for k, _ in layers[1:]):
            raise ValueError(f"decoder must start with its only linN layer and end with convC, got {list(spec)}")
        if layers[-1][1] != c:
            raise ValueError(f"decoder's last layer must output the image's {c} channels, got {spec[-1]!r}")
        ups = sum(k == "up" for k, _ in layers)
        h0, w0 = h // 2**ups, w // 2**ups
        size = layers[0][1]
        if h0 * 2**ups != h or w0 * 2**ups != w or size % (h0 * w0):
            raise ValueError(
                f"decoder: {ups} up layers cannot reach {h}x{w} from a {size}-unit linear layer "
                f"(needs a multiple of {h0}x{w0} and H, W divisible by {2**ups})"
            )
        ch = size // (h0 * w0)
        self.stem = nn.Sequential(nn.Linear(latent_dim, size), nn.Unflatten(1, (ch, h0, w0)), nn.ReLU())
        body: list[nn.Module] = []
        for kind, n in layers[1:-1]:
            if kind == "conv":
                body.append(_conv_block(ch, n))
                ch = n
            elif kind == "up":
                body.append(nn.ConvTranspose2d(ch, ch, 3, stride=2, padding=1, output_padding=1))
            else:
                raise ValueError(f"decoder: 'down' layers belong to the encoder, got {list(spec)}")
        body.append(nn.Conv2d(ch, c, 3, padding=1))
        self.body = nn.Sequential(*body)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.stem(z))


class Discriminator(nn.Module):
    """MLP on latent codes: ``[linear n, ReLU] × k`` -> linear 1 -> sigmoid.

    ``logits(z)``: ``(B, D)`` -> ``(B,)`` (what the losses use, for numerical stability);
    ``forward(z)``: the probability ``sigmoid(logits)`` that ``z`` was drawn from the prior.
    """

    def __init__(self, latent_dim: int, spec: Sequence[str]):
        super().__init__()
        layers = _parse(spec, "discriminator")
        if any(k != "lin" for k, _ in layers) or layers[-1][1] != 1:
            raise ValueError(f"discriminator must be linN layers ending with lin1, got {list(spec)}")
        mods: list[nn.Module] = []
        width = latent_dim
        for _, n in layers[:-1]:
            mods += [nn.Linear(width, n), nn.ReLU()]
            width = n
        mods.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*mods)

    def logits(self, z: Tensor) -> Tensor:
        return self.net(z).squeeze(1)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(z))


class WAE(nn.Module):
    """A WAE-GAN whose encoder starts with a missing-data front.

    Args:
        front: front name or class (see :class:`Encoder`).
        dataset: key of :data:`ARCHITECTURES` (``"mnist"``, ``"svhn"``, ``"celeba"``), or ``None``
            with ``architecture`` given.
        architecture: a dict like those of :data:`ARCHITECTURES` (``image_shape``, ``encoder``,
            ``decoder``, ``discriminator``); overrides ``dataset``'s entries key by key.
        device: where the parameters live (``None``: :func:`labkit.device.resolve_device`).

    Attributes: ``encoder``, ``decoder``, ``discriminator``, ``latent_dim``, ``image_shape``,
    ``front_name``.
    """

    def __init__(self, front: str | type[Front] = "zero", dataset: str | None = "mnist", *,
                 architecture: Mapping[str, Any] | None = None, device=None):
        super().__init__()
        arch: dict[str, Any] = {}
        if dataset is not None:
            if not isinstance(dataset, str) or dataset.lower() not in ARCHITECTURES:
                raise ValueError(f"unknown dataset {dataset!r} for the WAE; known: {', '.join(ARCHITECTURES)}")
            arch.update(ARCHITECTURES[dataset.lower()])
        if architecture is not None:
            if not isinstance(architecture, Mapping):
                raise TypeError(f"architecture must be a dict, got {type(architecture).__name__}")
            arch.update(architecture)
        missing_keys = [k for k in ("image_shape", "encoder", "decoder", "discriminator") if k not in arch]
        if missing_keys:
            raise ValueError(f"architecture lacks {missing_keys} (give a dataset or a complete architecture)")
        shape = tuple(int(v) for v in arch["image_shape"])
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {arch['image_shape']!r}")
        if isinstance(front, str) and front not in FRONTS:
            raise ValueError(f"unknown front {front!r}; valid names: {', '.join(FRONTS)}")
        self.front_name = front if isinstance(front, str) else front.__name__
        self.image_shape = shape
        self.architecture = {k: (list(v) if not isinstance(v, str) else v) for k, v in arch.items()}
        self.encoder = Encoder(front, shape, arch["encoder"])
        self.latent_dim = self.encoder.latent_dim
        self.decoder = Decoder(self.latent_dim, shape, arch["decoder"])
        self.discriminator = Discriminator(self.latent_dim, arch["discriminator"])
        self.to(resolve_device(device))

    @property
    def aux_kind(self) -> str:
        """What the front needs as ``aux``: "none", "images" or "mfa" (see :mod:`labkit.fronts`)."""
        return self.encoder.aux_kind

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's and decoder's parameters (what the autoencoder optimizer updates)."""
        return list(self.encoder.parameters()) + list(self.decoder.parameters())

    def encode(self, x: Tensor, missing: Tensor, aux=None) -> Tensor:
        """``(B, C, H, W)`` images with ``missing`` pixels (+ the front's ``aux``) -> codes ``(B, D)``."""
        return self.encoder(x, missing, aux)

    def decode(self, z: Tensor) -> Tensor:
        """Codes ``(B, D)`` -> images ``(B, C, H, W)`` in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    def forward(self, x: Tensor, missing: Tensor, aux=None) -> Tensor:
        """The reconstruction ``(B, C, H, W)`` in [0, 1] of incomplete images."""
        return self.decode(self.encode(x, missing, aux))

    def prior_sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` codes from the prior ``N(0, I)``, ``(n, D)`` on the model's device.

        Drawn on the generator's device (CPU for a CPU generator) and moved, so a seed gives the
        same codes on every device.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        dev = next(self.parameters()).device
        draw_on = generator.device if generator is not None else dev
        return torch.randn(n, self.latent_dim, generator=generator, device=draw_on).to(dev)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images decoded from prior codes, ``(n, C, H, W)`` in [0, 1]."""
        return self.decode(self.prior_sample(n, generator=generator))


# --------------------------------------------------------------------------- losses
def reconstruction_loss(logits: Tensor, target: Tensor, counted: Tensor, kind: str = "bce") -> Tensor:
    """Per-image mean over the ``counted`` pixels of BCE (or squared error), then the batch mean.

    Args:
        logits: the decoder's output ``(B, C, H, W)`` (the image is ``sigmoid(logits)``).
        target: ``(B, C, H, W)`` in [0, 1]; values at uncounted pixels are ignored (NaN allowed).
        counted: bool ``(B, 1|C, H, W)``, True = pixel in the loss (the observed pixels).
        kind: ``"bce"`` (binary cross-entropy with soft targets) or ``"mse"``.

    An image with no counted pixel contributes 0.
    """
    if kind not in ("bce", "mse"):
        raise ValueError(f"kind must be 'bce' or 'mse', got {kind!r}")
    if not isinstance(counted, Tensor) or counted.dtype != torch.bool:
        raise TypeError(f"counted must be a bool tensor (True = pixel in the loss), got {getattr(counted, 'dtype', type(counted).__name__)}")
    if logits.shape != target.shape:
        raise ValueError(f"logits has shape {tuple(logits.shape)} but target has {tuple(target.shape)}")
    b, c, h, w = target.shape
    if counted.dim() != 4 or counted.shape[0] != b or tuple(counted.shape[2:]) != (h, w) or counted.shape[1] not in (1, c):
        raise ValueError(f"counted must have shape ({b}, 1, {h}, {w}) or ({b}, {c}, {h}, {w}), got {tuple(counted.shape)}")
    m = counted.expand(b, c, h, w)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    # Clean the target first: a NaN there would give NaN gradients even where masked (NaN * 0).
    t = torch.where(m, target.to(logits.dtype), zero)
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    else:
        per_pixel = (torch.sigmoid(logits) - t) ** 2
    per_image = torch.where(m, per_pixel, zero).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return per_image.mean()


def discriminator_loss(discriminator: Discriminator, z_encoded: Tensor, z_prior: Tensor) -> Tensor:
    """``BCE(D(z_prior), 1) + BCE(D(z_encoded), 0)``; ``z_encoded`` is detached (no encoder gradient)."""
    real = discriminator.logits(z_prior)
    fake = discriminator.logits(z_encoded.detach())
    return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def encoder_adversarial_loss(discriminator: Discriminator, z_encoded: Tensor) -> Tensor:
    """``BCE(D(z_encoded), 1) = −mean log D(z)``: small when the codes look like prior samples."""
    logit = discriminator.logits(z_encoded)
    return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))


# --------------------------------------------------------------------------- training steps
def make_optimizers(model: WAE, lr: float = 4e-4, lr_disc: float = 4e-6) -> dict[str, torch.optim.Optimizer]:
    """``{"autoencoder": Adam(encoder + decoder, lr), "discriminator": Adam(discriminator, lr_disc)}``."""
    for name, v in (("lr", lr), ("lr_disc", lr_disc)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    return {
        "autoencoder": torch.optim.Adam(model.autoencoder_parameters(), lr=lr),
        "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=lr_disc),
    }


def discriminator_step(model: WAE, optimizer: torch.optim.Optimizer, z_encoded: Tensor, *,
                       generator: torch.Generator | None = None) -> dict[str, float]:
    """One Adam step of the discriminator on encoded codes ``(B, D)`` vs as many prior samples.

    Only the discriminator's parameters receive gradient (the codes are detached). Returns
    ``{"d_loss", "d_prior", "d_encoded"}``: the loss and the mean probabilities D gave each set.
    """
    z_prior = model.prior_sample(z_encoded.shape[0], generator=generator).to(z_encoded.dtype)
    optimizer.zero_grad(set_to_none=True)
    loss = discriminator_loss(model.discriminator, z_encoded, z_prior)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        d_prior = model.discriminator(z_prior).mean()
        d_enc = model.discriminator(z_encoded.detach()).mean()
    return {"d_loss": float(loss.detach()), "d_prior": float(d_prior), "d_encoded": float(d_enc)}


def autoencoder_step(model: WAE, optimizer: torch.optim.Optimizer, z_encoded: Tensor, target: Tensor,
                     counted: Tensor, *, lambda_adv: float = 1.0, recon: str = "bce") -> dict[str, float]:
    """One Adam step of encoder + decoder: ``reconstruction(counted pixels) + λ · (−log D(z))``.

    Args:
        z_encoded: ``model.encode(...)`` of the batch, *with* its graph (from the current encoder).
        target: ``(B, C, H, W)`` the images the reconstruction is compared with (NaN allowed at
            uncounted pixels). counted: bool ``(B, 1|C, H, W)``, True = in the loss.

    The discriminator is frozen (``requires_grad`` off) while the loss is differentiated, so its
    parameters get no gradient and are not changed.
    """
    logits = model.decoder(z_encoded)
    rec = reconstruction_loss(logits, target, counted, recon)
    disc_params = list(model.discriminator.parameters())
    flags = [p.requires_grad for p in disc_params]
    try:
        for p in disc_params:
            p.requires_grad_(False)
        adv = encoder_adversarial_loss(model.discriminator, z_encoded)
        loss = rec + lambda_adv * adv
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        for p, f in zip(disc_params, flags):
            p.requires_grad_(f)
    optimizer.step()
    return {"loss": float(loss.detach()), "recon": float(rec.detach()), "adv": float(adv.detach())}


def train_step(model: WAE, optimizers: Mapping[str, torch.optim.Optimizer], x: Tensor, missing: Tensor,
               aux=None, *, target: Tensor | None = None, counted: Tensor | None = None,
               generator: torch.Generator | None = None, lambda_adv: float = 1.0,
               recon: str = "bce") -> dict[str, float]:
    """One WAE-GAN step on a batch: encode once, discriminator step, then autoencoder step.

    Args:
        x: ``(B, C, H, W)`` incomplete images (NaN allowed at missing pixels).
        missing: bool ``(B, 1|C, H, W)``, True = missing.
        aux: the front's auxiliary input for this batch (see :mod:`labkit.fronts`).
        target: what the reconstruction is compared with (default ``x``).
        counted: pixels of the reconstruction loss (default ``~missing``: observed pixels only).
        optimizers: from :func:`make_optimizers` (keys ``autoencoder`` and ``discriminator``).
        generator: for the prior samples of the discriminator step.

    Returns the metrics of both steps (``d_loss``, ``d_prior``, ``d_encoded``, ``loss``, ``recon``, ``adv``).
    """
    for key in ("autoencoder", "discriminator"):
        if key not in optimizers:
            raise ValueError(f"optimizers must have keys 'autoencoder' and 'discriminator', got {sorted(optimizers)}")
    if not isinstance(missing, Tensor) or missing.dtype != torch.bool:
        raise TypeError(f"missing must be a bool tensor (True = missing), got {getattr(missing, 'dtype', type(missing).__name__)}")
    target = x if target is None else target
    counted = ~missing if counted is None else counted
    z = model.encode(x, missing, aux)
    out = discriminator_step(model, optimizers["discriminator"], z, generator=generator)
    out.update(autoencoder_step(model, optimizers["autoencoder"], z, target, counted,
                                lambda_adv=lambda_adv, recon=recon))
    if not all(math.isfinite(v) for v in out.values()):
        raise FloatingPointError(f"WAE step produced non-finite metrics {out}")
    return out


# =========================================================================== the study (issue 7)
# Everything below runs the WAE study: one *cell* = (dataset, front, seed) trained on incomplete
# images and scored on the complete test images; the sweep appends one CSV row per finished cell.
# The data, the fixed per-image masks and the fronts' auxiliaries (imputations, per-image MFAs)
# come from the classification study (labkit.classifier): same masks, same on-disk caches.

METRIC_COLUMNS = ["psnr_missing", "ssim_missing", "psnr_all", "ssim_all", "fd_reconstruction", "fd_samples"]
WAE_COLUMNS = ["dataset", "front", "seed", *METRIC_COLUMNS, "epochs", "n_train", "n_test"]

#: short names accepted for the fronts of the issue (the CSV records the canonical method name)
FRONT_ALIASES = {"dmfa_mean": "dmfa_mean_complete", "misconv": "dmfa_misconv_complete"}
#: display order and labels
FRONT_ORDER = ["gt", "zero", "mask", "knn", "pc", "mfa_mean", "mfa_misconv", "dmfa_mean_complete",
               "dmfa_misconv_complete", "dmfa_mean_incomplete", "dmfa_misconv_incomplete", "acflow"]

#: the authors' public code, MNIST WAE at epoch 20 (validation): front -> (PSNR, SSIM), from
#: anchor-numbers.md. Their PSNR/SSIM are scikit-image's on the whole decoded image (SSIM with its
#: default 7×7 uniform window); which DMFA (complete- or incomplete-data) they used is not stated:
#: we show their numbers beside our complete-data DMFA fronts.
AUTHORS_WAE_MNIST = {
    "gt": (20.72, 0.908),
    "dmfa_mean_complete": (15.85, 0.750),
    "dmfa_misconv_complete": (15.14, 0.714),
    "zero": (14.90, 0.707),
    "pc": (13.68, 0.628),
}

FD_NAME = "FD (lab classifier features)"


def canonical_front(name: str) -> str:
    """A front's method name in :data:`labkit.classifier.METHODS` (``"misconv"`` -> ``"dmfa_misconv_complete"``)."""
    from labkit.classifier import METHODS

    if not isinstance(name, str):
        raise TypeError(f"front must be a method name, got {type(name).__name__}")
    canon = FRONT_ALIASES.get(name, name)
    if canon not in METHODS:
        valid = ", ".join(list(METHODS) + list(FRONT_ALIASES))
        raise ValueError(f"unknown front {name!r}; valid: {valid}")
    return canon


def _with_nan(x: Tensor, missing: Tensor) -> Tensor:
    return torch.where(missing.expand_as(x), torch.full((), float("nan"), dtype=x.dtype, device=x.device), x)


def _dataset_arch(dataset: str) -> str:
    key = dataset.lower().replace("_", "-")
    if key in ("mnist", "fashion-mnist"):
        return "mnist"
    if key in ("svhn", "cifar10"):
        return "svhn"
    if key == "celeba":
        return "celeba"
    raise ValueError(f"no WAE architecture for dataset {dataset!r}; known: mnist, fashion-mnist, svhn, cifar10, celeba")


REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class WAEConfig:
    """Settings of a WAE sweep besides its grid (filled from a profile's ``03_wae`` section).

    ``n_train``/``n_test``: first images of each split (``None``: all). ``mask``: the missing-data
    kind of train and test images (``"square"``: side H/2, 14×14 on MNIST). ``lambda_adv``: weight
    of the adversarial term; ``recon``: ``"bce"`` or ``"mse"``. ``feature_epochs``/``feature_n_train``:
    the classifier whose penultimate features the Fréchet distances use (trained on complete images).
    ``dmfa_complete``/``dmfa_incomplete``/``acflow``: checkpoints the fronts that need them read.
    """

    profile: str = "quick"
    epochs: int = 1
    batch_size: int = 128
    lr: float = 4e-4
    lr_disc: float = 4e-6
    lambda_adv: float = 1.0
    recon: str = "bce"
    n_train: int | None = 500
    n_test: int | None = 100
    mask: str = "square"
    feature_epochs: int = 3
    feature_n_train: int | None = None       # None: the same images as n_train
    eval_batch: int = 500
    n_figure: int = 8
    dmfa_complete: str | None = "results/dmfa/cpu/{dataset}_complete.pt"     # {dataset} is filled in
    dmfa_incomplete: str | None = "results/dmfa/cpu/{dataset}_incomplete.pt"
    acflow: str | None = "results/acflow/acflow.pt"
    results_dir: str | None = None           # default results/wae/<profile>
    cache_dir: str | None = None             # default: the classification study's cache
    device: Any = None
    progress: bool = True

    def results_path(self) -> Path:
        return Path(self.results_dir) if self.results_dir else REPO_ROOT / "results" / "wae" / self.profile

    def scratch_path(self) -> Path:
        """Git-ignored working files: checkpoints, the feature network, example tensors."""
        return self.results_path() / "_scratch"

    def sweep_config(self):
        """The classification study's :class:`~labkit.classifier.SweepConfig` for the shared preparers."""
        from labkit.classifier import SweepConfig

        kw = dict(profile=self.profile, n_train=self.n_train, n_test=self.n_test, val_fraction=0.0,
                  dmfa_complete=self.dmfa_complete, dmfa_incomplete=self.dmfa_incomplete, acflow=self.acflow,
                  device=self.device, progress=self.progress)
        if self.cache_dir:
            kw["cache_dir"] = self.cache_dir
        return SweepConfig(**kw)

    def check(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch", "feature_epochs", "n_figure"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("n_train", "n_test", "feature_n_train"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
                raise ValueError(f"{name} must be an int >= 2 or None, got {v!r}")
        if self.recon not in ("bce", "mse"):
            raise ValueError(f"recon must be 'bce' or 'mse', got {self.recon!r}")


def front_available(front: str, cfg: WAEConfig, dataset: str = "mnist") -> str | None:
    """``None`` if ``front`` can run on ``dataset`` now, else why not (e.g. its DMFA checkpoint does not exist yet)."""
    from labkit.classifier import method_available

    return method_available(canonical_front(front), cfg.sweep_config(), dataset)


# --------------------------------------------------------------------------- feature network
def classifier_features(model: nn.Module, images: Tensor, *, batch_size: int = 500) -> Tensor:
    """Penultimate-layer features ``(N, F)`` (the input of the last linear layer) of a
    :class:`labkit.classifier.Classifier` with a ground-truth front, for complete ``images (N, C, H, W)``."""
    body = model.body
    if not isinstance(body[-1], nn.Linear):
        raise TypeError(f"the classifier's body must end with its output nn.Linear, got {type(body[-1]).__name__}")
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size].to(dev, torch.float32)
            none = torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=torch.bool, device=dev)
            out.append(body[:-1](model.front(x, none, x)).cpu())
    model.train(was)
    return torch.cat(out)


def _feature_map(model: nn.Module, batch_size: int):
    """``images -> features`` with the classifier ``model`` (see :func:`classifier_features`)."""
    def features(images: Tensor) -> Tensor:
        return classifier_features(model, images, batch_size=batch_size)
    return features


def feature_network(dataset: str, cfg: WAEConfig):
    """The lab's feature network for the Fréchet distances: the classification study's classifier
    with the ground-truth front, trained on complete training images (Adam 1e-3, batch 24,
    ``cfg.feature_epochs`` epochs), loaded from ``<scratch>/feature-net-<dataset>.pt`` if trained
    before. Returns ``(classifier, meta)``; ``meta["test_accuracy"]`` is on the complete test images.
    """
    from labkit.checkpoint import load_or_train
    from labkit.classifier import TensorAux, build_classifier, evaluate_accuracy, load_cell_data, train_classifier

    dev = resolve_device(cfg.device)
    n_train = cfg.feature_n_train if cfg.feature_n_train is not None else cfg.n_train
    data = load_cell_data(dataset, cfg.mask, 0, n_train=n_train, n_test=cfg.n_test, val_fraction=0.0)
    C, H = data.train_images.shape[1], data.train_images.shape[2]
    arch = data.arch
    path = cfg.scratch_path() / f"feature-net-{dataset}-n{len(data.train_images)}-e{cfg.feature_epochs}.pt"

    def build():
        torch.manual_seed(12345)
        return build_classifier(arch, "gt", in_channels=C, image_size=H)

    def train(model):
        model.to(dev)
        aux = TensorAux(data.train_images)
        train_classifier(model, data, aux, epochs=cfg.feature_epochs, batch_size=24, lr=1e-3, seed=0,
                         select="last", device=dev, progress=cfg.progress)
        none = torch.zeros_like(data.test_missing)
        acc = evaluate_accuracy(model, data.test_images, data.test_labels, none, TensorAux(data.test_images),
                                batch_size=cfg.eval_batch)
        return {"dataset": dataset, "arch": arch, "n_train": len(data.train_images), "epochs": cfg.feature_epochs,
                "test_accuracy": round(acc, 4), "n_test": len(data.test_images),
                "features": "input of the last linear layer (lin20 after ReLU)"}

    return load_or_train(path, build, train, device=dev, quiet=not cfg.progress)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_wae(model: WAE, images: Tensor, missing: Tensor, aux_source, *, features, batch_size: int = 500,
                 seed: int = 0, n_examples: int = 8) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Test metrics of a trained WAE against the complete images.

    Args:
        model: the WAE (put in eval mode).
        images: complete test images ``(N, C, H, W)`` (CPU); the model sees them with NaN at
            ``missing`` (bool ``(N, 1, H, W)``) plus ``aux_source.get(idx, x, missing)``.
        features: ``images (n, C, H, W) -> (n, F)`` feature map for the Fréchet distances.
        seed: of the ``N`` prior samples for ``fd_samples``.

    Returns:
        ``(metrics, examples)``: metrics = means over the test images of per-image PSNR/SSIM over
        the missing region and over the whole image (the raw decoder output, no observed pixels
        pasted back), ``fd_reconstruction`` (reconstructions vs complete images) and ``fd_samples``
        (decoded prior samples vs complete images); examples = the first ``n_examples`` inputs
        (NaN at missing), reconstructions, complete images, masks and prior samples (CPU).
    """
    from labkit.metrics import frechet_distance, psnr, ssim

    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    n = images.shape[0]
    per: dict[str, list[Tensor]] = {k: [] for k in ("psnr_missing", "ssim_missing", "psnr_all", "ssim_all")}
    f_rec, f_real, first = [], [], None
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))
        x, j = images[idx].to(dev), missing[idx].to(dev)
        x_in = _with_nan(x, j)
        rec = model(x_in, j, aux_source.get(idx, x_in, j))
        per["psnr_missing"].append(psnr(rec, x, j).cpu())
        per["ssim_missing"].append(ssim(rec, x, j).cpu())
        per["psnr_all"].append(psnr(rec, x).cpu())
        per["ssim_all"].append(ssim(rec, x).cpu())
        f_rec.append(features(rec))
        f_real.append(features(x))
        if first is None:
            k = min(n_examples, len(idx))
            first = {"input": x_in[:k].cpu(), "reconstruction": rec[:k].cpu(), "target": x[:k].cpu(),
                     "missing": j[:k].cpu()}
    g = torch.Generator().manual_seed(int(seed))
    f_smp, samples = [], None
    for s in range(0, n, batch_size):
        smp = model.sample(min(batch_size, n - s), generator=g)
        f_smp.append(features(smp))
        if samples is None:
            samples = smp[:max(n_examples, 16)].cpu()
    model.train(was)
    metrics: dict[str, float] = {}
    for k, v in per.items():
        v = torch.cat(v)
        # nanmean: an image whose region has no SSIM window centre gives NaN (see labkit.metrics)
        metrics[k] = float(v[torch.isfinite(v)].mean()) if bool(torch.isfinite(v).any()) else float("nan")
    real = torch.cat(f_real)
    metrics["fd_reconstruction"] = frechet_distance(torch.cat(f_rec), real)
    metrics["fd_samples"] = frechet_distance(torch.cat(f_smp), real)
    first["samples"] = samples
    return metrics, first


# --------------------------------------------------------------------------- figures
def _to_rgb(img: Tensor, missing: Tensor | None = None) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> ``(H, W, 3)`` numpy; missing pixels shown in a muted red."""
    x = img.detach().float().cpu()
    if x.shape[0] == 1:
        x = x.expand(3, *x.shape[1:])
    x = torch.nan_to_num(x, nan=0.0).clamp(0, 1)
    if missing is not None:
        m = missing.detach().cpu().expand_as(x)
        red = torch.tensor([0.75, 0.25, 0.25]).view(3, 1, 1).expand_as(x)
        x = torch.where(m, red, x)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def plot_reconstructions(examples: Mapping[str, Tensor], *, title: str | None = None, path=None):
    """Three rows: incomplete input (missing pixels red), reconstruction, ground truth. Returns the figure."""
    import matplotlib.pyplot as plt

    k = examples["target"].shape[0]
    fig, axes = plt.subplots(3, k, figsize=(1.1 * k + 1.4, 3.6), squeeze=False)
    rows = [("input", lambda i: _to_rgb(examples["input"][i], examples["missing"][i])),
            ("reconstruction", lambda i: _to_rgb(examples["reconstruction"][i])),
            ("ground truth", lambda i: _to_rgb(examples["target"][i]))]
    _image_rows(axes, [(label, [get(i) for i in range(k)]) for label, get in rows], fontsize=9)
    return _finish_figure(fig, title, path)


def _image_rows(axes, rows, *, fontsize: int) -> None:
    """Fill a grid of axes: ``rows`` = [(label, [RGB arrays, one per column])], label on the left."""
    for r, (label, images) in enumerate(rows):
        for i, img in enumerate(images):
            axes[r][i].imshow(img, interpolation="nearest")
            axes[r][i].set_xticks([]), axes[r][i].set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=fontsize)


def _finish_figure(fig, title: str | None, path, dpi: int = 100):
    """Title, tight layout and (when ``path`` is given) a PNG; returns the figure."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def plot_samples(samples: Tensor, *, ncols: int = 8, title: str | None = None, path=None):
    """A grid of decoded prior samples ``(n, C, H, W)``. Returns the figure."""
    import matplotlib.pyplot as plt

    n = samples.shape[0]
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.0 * ncols, 1.0 * nrows + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            ax.imshow(_to_rgb(samples[i]), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.axis("off")
    return _finish_figure(fig, title, path)


def plot_front_grid(examples_by_front: Mapping[str, Mapping[str, Tensor]], *, what: str = "reconstruction",
                    title: str | None = None, path=None):
    """One row per front (``what`` = "reconstruction" or "samples"), with the incomplete inputs and
    the ground truth as the first and last rows for reconstructions. Returns the figure."""
    import matplotlib.pyplot as plt

    if not examples_by_front:
        raise ValueError("examples_by_front is empty")
    fronts = list(examples_by_front)
    any_ex = examples_by_front[fronts[0]]
    if what == "reconstruction":
        rows = [("input", any_ex["input"], any_ex["missing"])]
        rows += [(f, examples_by_front[f]["reconstruction"], None) for f in fronts]
        rows += [("ground truth", any_ex["target"], None)]
    elif what == "samples":
        rows = [(f, examples_by_front[f]["samples"], None) for f in fronts]
    else:
        raise ValueError(f"what must be 'reconstruction' or 'samples', got {what!r}")
    k = min(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.0 * k + 2.2, 1.05 * len(rows) + 0.4), squeeze=False)
    _image_rows(axes, [(label, [_to_rgb(imgs[i], None if miss is None else miss[i]) for i in range(k)])
                       for label, imgs, miss in rows], fontsize=8)
    return _finish_figure(fig, title, path)


# --------------------------------------------------------------------------- one cell
def _stable_seed(*parts: Any) -> int:
    from labkit.classifier import _stable_seed as seed_of

    return seed_of(*parts)


def cell_stem(dataset: str, front: str, seed: int) -> str:
    return f"{dataset}-{front}-s{int(seed)}"


def run_cell(dataset: str, front: str, seed: int, cfg: WAEConfig, *, features=None) -> dict:
    """Train and test one (dataset, front, seed); return ``{"row", "details", "checkpoint", "examples"}``.

    Training: the first ``cfg.n_train`` training images, each with its fixed mask
    (:func:`labkit.classifier.cell_masks`, shared with the classification study), NaN at missing
    pixels; the reconstruction loss counts observed pixels only, except for the ground-truth front
    (complete images in, all pixels counted). Resumable: :func:`labkit.training.fit` checkpoints
    every epoch to ``<scratch>/checkpoints/<cell>.partial.pt``. ``features``: the feature map of
    the Fréchet distances (default: :func:`feature_network`'s penultimate layer).
    """
    from labkit.checkpoint import atomic_save, machine_description
    from labkit.classifier import METHODS, load_cell_data
    from labkit.training import fit

    cfg.check()
    front = canonical_front(front)
    why = front_available(front, cfg, dataset)
    if why:
        raise RuntimeError(f"front {front!r} cannot run: {why}")
    dev = resolve_device(cfg.device)
    t0 = time.perf_counter()
    data = load_cell_data(dataset, cfg.mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=0.0,
                          quiet=not cfg.progress)
    aux_train, aux_test, info = METHODS[front].prepare(data, cfg.sweep_config())
    if features is None:
        fnet, fmeta = feature_network(dataset, cfg)
        features = _feature_map(fnet, cfg.eval_batch)
        info = {**info, "feature_net": fmeta}
    t_prep = time.perf_counter() - t0

    torch.manual_seed(_stable_seed("wae-init", dataset, front, seed))
    model = WAE(front, _dataset_arch(dataset), device=dev)
    if tuple(data.train_images.shape[1:]) != model.image_shape:
        raise ValueError(f"{dataset} images have shape {tuple(data.train_images.shape[1:])} but the WAE expects "
                         f"{model.image_shape}")
    optimizers = make_optimizers(model, cfg.lr, cfg.lr_disc)
    gt = front == "gt"
    n = len(data.train_images)
    run_config = {"dataset": dataset, "front": front, "mask": cfg.mask, "n_train": n, "batch_size": cfg.batch_size,
                  "lr": cfg.lr, "lr_disc": cfg.lr_disc, "lambda_adv": cfg.lambda_adv, "recon": cfg.recon,
                  "architecture": model.architecture}

    def batches(epoch, g):
        order = torch.randperm(n, generator=g)
        return [order[s:s + cfg.batch_size] for s in range(0, n, cfg.batch_size)]

    def step(idx, epoch, g):
        x, j = data.train_images[idx].to(dev), data.train_missing[idx].to(dev)
        x_in = _with_nan(x, j)
        aux = aux_train.get(idx, x_in, j)
        if gt:   # the ceiling: complete images in, every pixel in the loss
            target, counted = x, torch.ones_like(j)
        else:    # incomplete images: the loss never sees a missing pixel
            target, counted = x_in, ~j
        return train_step(model, optimizers, x_in, j, aux, target=target, counted=counted, generator=g,
                          lambda_adv=cfg.lambda_adv, recon=cfg.recon)

    ckpt = cfg.scratch_path() / "checkpoints" / f"{cell_stem(dataset, front, seed)}.partial.pt"
    t1 = time.perf_counter()
    history = fit(model, optimizers, batches, step, epochs=cfg.epochs, checkpoint=ckpt, seed=int(seed),
                  desc=f"WAE {front} s{seed}", progress=cfg.progress, config=run_config)
    t_train = time.perf_counter() - t1
    metrics, examples = evaluate_wae(model, data.test_images, data.test_missing, aux_test, features=features,
                                     batch_size=cfg.eval_batch, seed=_stable_seed("wae-prior", dataset, seed),
                                     n_examples=cfg.n_figure)
    # Model weights (no optimizer state) and the example tensors, for re-plotting without retraining.
    atomic_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": run_config,
                 "examples": examples}, cfg.scratch_path() / "models" / f"{cell_stem(dataset, front, seed)}.pt")
    row = {"dataset": dataset, "front": front, "seed": int(seed),
           **{k: round(float(metrics[k]), 5) for k in METRIC_COLUMNS},
           "epochs": cfg.epochs, "n_train": n, "n_test": len(data.test_images)}
    details = {**row, **run_config, "prepare_seconds": round(t_prep, 1), "train_seconds": round(t_train, 1),
               "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine_description(),
               "device": str(dev), "profile": cfg.profile, "data": data.sources, "fd": FD_NAME,
               "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
               "history": [{k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in h.items()} for h in history],
               **info}
    return {"row": row, "details": details, "checkpoint": ckpt, "examples": examples}


# --------------------------------------------------------------------------- results files
def read_results(path) -> "Any":
    """The metrics CSV as a pandas DataFrame (empty with :data:`WAE_COLUMNS` if absent)."""
    return read_table(path, WAE_COLUMNS)


def _append_row(path: Path, row: dict) -> bool:
    """Add ``row`` to the CSV atomically unless its cell is there already (see
    :func:`labkit.sweeps.append_csv_row`); returns whether it was added."""
    return append_csv_row(path, row, WAE_COLUMNS, key=["dataset", "front", "seed"])


_append_jsonl = append_jsonl



def plan_cells(datasets: Sequence[str], fronts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, str, int]]:
    """The grid in run order: seeds outermost, so every front has seed 0 before any has seed 1."""
    return [(d, canonical_front(f), int(s)) for s in seeds for d in datasets for f in fronts]


def run_sweep(datasets: Sequence[str] | str, fronts: Sequence[str], seeds: Sequence[int], profile: str = "quick", *,
              config: WAEConfig | None = None, wait: bool = False, poll_seconds: float = 300.0,
              max_cells: int | None = None, figures: bool = True, _run_cell=None, **overrides) -> "Any":
    """Run every (dataset, front, seed) cell not yet in ``<results_dir>/metrics.csv``.

    Each finished cell is appended to the CSV at once (atomically), described in ``runs.jsonl``
    (settings, timings, per-epoch history) and drawn to ``figures/<cell>-reconstruction.png`` and
    ``figures/<cell>-samples.png``; its epoch checkpoint is then deleted. A rerun skips finished
    cells, and an interrupted cell resumes from its last finished epoch. Fronts whose checkpoint
    (DMFA, ACFlow) does not exist yet are skipped, or waited for with ``wait=True``.

    ``overrides`` replace :class:`WAEConfig` fields (epochs, n_train, device, ...). Returns the CSV.
    """
    import matplotlib.pyplot as plt

    cfg = config or WAEConfig(profile=profile)
    cfg.profile = profile
    for k, v in overrides.items():
        if k not in WAEConfig.__dataclass_fields__:
            raise ValueError(f"unknown WAE setting {k!r}; valid: {', '.join(WAEConfig.__dataclass_fields__)}")
        setattr(cfg, k, v)
    cfg.check()
    if isinstance(datasets, str):
        datasets = [datasets]
    for d in datasets:
        _dataset_arch(d)
    out = cfg.results_path()
    csv = out / "metrics.csv"
    cells = plan_cells(datasets, fronts, seeds)
    finished = 0
    reported: set[str] = set()
    feature_maps: dict[str, Any] = {}
    while True:
        df = read_results(csv)
        done = {(str(r.dataset), str(r.front), int(r.seed)) for r in df.itertuples()}
        todo = [c for c in cells if c not in done]
        if not todo:
            print(f"[wae] all {len(cells)} cells done -> {csv}", flush=True)
            break
        runnable = []
        for c in todo:
            why = front_available(c[1], cfg, c[0])
            if why is None:
                runnable.append(c)
            elif c[1] not in reported:
                print(f"[wae] skipping {c[1]} for now: {why}", flush=True)
                reported.add(c[1])
        if not runnable:
            if not wait:
                print(f"[wae] {len(todo)} cells wait for unavailable fronts; rerun later", flush=True)
                break
            time.sleep(poll_seconds)
            continue
        d, f, s = runnable[0]
        print(f"[wae] {len(cells) - len(todo) + 1}/{len(cells)}: {d} {f} seed {s}", flush=True)
        if _run_cell is not None:  # tests: a stand-in for run_cell, no feature network
            res = _run_cell(d, f, s, cfg)
        else:
            if d not in feature_maps:
                fnet, fmeta = feature_network(d, cfg)
                print(f"[wae] feature network for {d}: test accuracy {fmeta.get('test_accuracy')}", flush=True)
                feature_maps[d] = (fmeta, _feature_map(fnet, cfg.eval_batch))
            fmeta, fmap = feature_maps[d]
            res = run_cell(d, f, s, cfg, features=fmap)
            res["details"]["feature_net"] = fmeta
        if figures:
            stem = cell_stem(d, f, s)
            plt.close(plot_reconstructions(res["examples"], title=f"{d}, {f}, seed {s}",
                                           path=out / "figures" / f"{stem}-reconstruction.png"))
            plt.close(plot_samples(res["examples"]["samples"], title=f"{d}, {f}, seed {s}: prior samples",
                                   path=out / "figures" / f"{stem}-samples.png"))
        if _append_row(csv, res["row"]):      # False: another sweep process finished this cell first
            _append_jsonl(out / "runs.jsonl", res["details"])
        Path(res["checkpoint"]).unlink(missing_ok=True)
        r = res["row"]
        print(f"[wae] {d} {f} seed {s}: PSNR missing {r['psnr_missing']:.2f} all {r['psnr_all']:.2f}, "
              f"SSIM missing {r['ssim_missing']:.3f} all {r['ssim_all']:.3f}, FD rec {r['fd_reconstruction']:.2f} "
              f"samples {r['fd_samples']:.2f} ({res['details']['wall_seconds']} s)", flush=True)
        finished += 1
        if max_cells is not None and finished >= max_cells:
            break
    return read_results(csv)


def load_examples(dataset: str, front: str, seed: int, cfg: WAEConfig) -> dict[str, Tensor] | None:
    """The example tensors saved by :func:`run_cell` for a finished cell (``None`` if absent)."""
    from labkit.checkpoint import load_checkpoint

    path = cfg.scratch_path() / "models" / f"{cell_stem(dataset, canonical_front(front), seed)}.pt"
    stored = load_checkpoint(path, map_location="cpu") if path.exists() else None
    return None if stored is None else stored["examples"]


# --------------------------------------------------------------------------- tables
def summary_table(df, *, dataset: str | None = None, with_authors: bool = True):
    """Rows = fronts; columns = each metric as ``"mean ± std"`` over seeds, ``n`` seeds, and (MNIST)
    the authors' PSNR/SSIM. Returns a pandas DataFrame of strings."""
    import pandas as pd

    if dataset is not None:
        df = df[df["dataset"] == dataset]
    if df.empty:
        return pd.DataFrame()
    fronts = [f for f in FRONT_ORDER if f in set(df["front"])] + sorted(set(df["front"]) - set(FRONT_ORDER))
    digits = {"psnr_missing": 2, "psnr_all": 2, "ssim_missing": 3, "ssim_all": 3, "fd_reconstruction": 2,
              "fd_samples": 2}
    rows = []
    for f in fronts:
        sub = df[df["front"] == f]
        row = {"front": f, "seeds": str(len(sub))}
        for col in METRIC_COLUMNS:
            v = sub[col].astype(float)
            d = digits[col]
            row[col] = f"{v.mean():.{d}f} ± {v.std(ddof=1):.{d}f}" if len(v) > 1 else f"{v.mean():.{d}f}"
        if with_authors:
            a = AUTHORS_WAE_MNIST.get(f) if set(df["dataset"]) <= {"mnist"} else None
            row["authors PSNR"] = f"{a[0]:.2f}" if a else ""
            row["authors SSIM"] = f"{a[1]:.3f}" if a else ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("front")


def table_markdown(df, **kw) -> str:
    """:func:`summary_table` as a Markdown table (for the README)."""
    tab = summary_table(df, **kw)
    if tab.empty:
        return "(no results yet)"
    names = {"psnr_missing": "PSNR missing (dB)", "ssim_missing": "SSIM missing", "psnr_all": "PSNR all (dB)",
             "ssim_all": "SSIM all", "fd_reconstruction": f"{FD_NAME}: reconstructions",
             "fd_samples": f"{FD_NAME}: prior samples"}
    cols = list(tab.columns)
    lines = ["| front | " + " | ".join(names.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for f, row in tab.iterrows():
        lines.append(f"| {f} | " + " | ".join(row[c] for c in cols) + " |")
    return "\n".join(lines)


def plot_metrics(df, path=None, *, title: str | None = None):
    """Three panels per front: PSNR, SSIM (missing region / whole image) and the two Fréchet
    distances; bars = mean over seeds, dots = seeds, black ticks = the authors' PSNR/SSIM (MNIST,
    whole image, their metric implementation). Saves to ``path`` when given; returns the figure."""
    import matplotlib.pyplot as plt

    fronts = [f for f in FRONT_ORDER if f in set(df["front"])] + sorted(set(df["front"]) - set(FRONT_ORDER))
    panels = [("PSNR (dB)", ("psnr_missing", "psnr_all"), 0), ("SSIM", ("ssim_missing", "ssim_all"), 1),
              (FD_NAME, ("fd_reconstruction", "fd_samples"), None)]
    labels = {"psnr_missing": "missing region", "psnr_all": "whole image", "ssim_missing": "missing region",
              "ssim_all": "whole image", "fd_reconstruction": "reconstructions", "fd_samples": "prior samples"}
    fig, axes = plt.subplots(1, 3, figsize=(4.0 * 3, 4.4))
    x = np.arange(len(fronts))
    mnist_only = set(df["dataset"]) <= {"mnist"}
    for ax, (name, cols, authors_idx) in zip(axes, panels):
        for k, col in enumerate(cols):
            vals = [df[df["front"] == f][col].astype(float).to_numpy() for f in fronts]
            pos = x + (k - 0.5) * 0.38
            ax.bar(pos, [v.mean() if len(v) else np.nan for v in vals], width=0.36, alpha=0.75,
                   color=f"C{k}", label=labels[col])
            for p, v in zip(pos, vals):
                ax.plot(np.full(len(v), p), v, "k.", ms=3)
        if authors_idx is not None and mnist_only:
            label = "authors (whole image)"
            for i, f in enumerate(fronts):
                a = AUTHORS_WAE_MNIST.get(f)
                if a is not None:   # beside the whole-image bar
                    ax.plot([i + 0.01, i + 0.37], [a[authors_idx]] * 2, "k-", lw=2, label=label)
                    label = None
        ax.set_xticks(x)
        ax.set_xticklabels(fronts, rotation=60, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _finish_figure(fig, title, path, dpi=110)
