r"""Training a DMFA (:mod:`labkit.models.dmfa`): the loss and the resumable trainer.

Paper: *Estimating Conditional Density of Missing Values Using Deep Gaussian Mixture Model*,
Przewięźlikowski, Śmieja, Struski, ICONIP 2020, https://arxiv.org/abs/2010.02183 (the NLL of the
hidden pixels, complete and incomplete training data).

Training (:func:`train_dmfa`, built on :func:`labkit.training.fit`, so resumable bit-identically):

- ``mode="complete"``: every batch hides a fresh random square (default side H/2, 1/4 of the
  image) and the loss is the MFA negative log-likelihood of the hidden pixels.
- ``mode="incomplete"``: each training image has its own truly missing region, fixed for the whole
  run (drawn once from the seed, :func:`labkit.models.dmfa.incomplete_masks`); it is set to NaN
  before a batch is used so that a leak would show. Each batch hides an extra fresh square
  ``hidden``; the model sees ``visible = ~(missing | hidden)`` and the loss is the NLL on
  ``hidden & ~missing`` only.
- how to train is one object, :class:`DMFARecipe` (epochs, batch size, learning rate and its
  schedule, MSE warm-up, K, L, precision, how the weights are stored), handed down whole; the
  density study builds it from its config (``labkit.studies.density_experiment.recipe_from``).
- the loss (:func:`dmfa_loss`) is the NLL summed over an image's supervised pixels and averaged
  over the images of the batch ("per image"); optional MSE warm-up (sum of squared errors of the
  mixture mean on the same pixels) for the first ``mse_warmup_epochs`` epochs; Adam, optional step
  schedule.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from labkit import masks as _masks
from labkit.checks import check_images, check_int
from labkit.device import resolve_device
from labkit.mfa import MFA
from labkit.precision import autocast, grad_scaler, resolve_precision, to_float32
from labkit.models.dmfa import DMFA, evaluate_dmfa, incomplete_masks, test_masks
from labkit.training import fit

__all__ = ["DMFARecipe", "WEIGHTS_DTYPES", "dmfa_loss", "train_dmfa"]

#: how DMFA weights may be stored (:attr:`DMFARecipe.weights_dtype`); None keeps the model's own
WEIGHTS_DTYPES = {"float32": None, "float16": torch.float16}


@dataclass(frozen=True)
class DMFARecipe:
    """How a DMFA is made from its training images: one object handed down whole (trainer,
    checkpoint, experiment, sweep) instead of a dozen keywords repeated at every level.

    No field has a default taken from a study: the density study builds its recipe from its
    config in one place (``labkit.studies.density_experiment.recipe_from``).

    Fields:
        epochs, batch_size, lr: Adam, ``epochs`` in total (a resumed run continues up to it).
        lr_milestones, lr_gamma: multiply the learning rate by ``lr_gamma`` at these epochs
            (the paper's fully convolutional schedule: ``(10,)``, ``0.25``: 4e-5 then 1e-5); stored sorted.
        mse_warmup_epochs: add the MSE of the mean to the loss during the first epochs.
        n_components, n_factors: the architecture's K and L (:func:`labkit.models.dmfa.build_dmfa`).
        precision: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` (CUDA) or ``"auto"`` (:mod:`labkit.precision`).
        weights_dtype: how a checkpoint stores the weights (a key of :data:`WEIGHTS_DTYPES`).
        grad_clip: clip the gradient's global norm to this value (``None``: no clipping). The NLL
            has heavy tails (a stroke where the model was sure of background costs ~1/(2 d) nats
            per pixel), and clipping keeps such batches from throwing the weights far.
        channels_last: run the convolutions in the channels-last memory layout (same values, another
            order in memory). ``None``: where it measured faster, i.e. under bf16-mixed
            (``benchmarks/bench_training.py``: 1.53× instead of 1.37× over float32 for the MNIST DMFA,
            2.00× instead of 1.81× for the fully convolutional one).
    """

    epochs: int
    batch_size: int
    lr: float
    lr_milestones: tuple[int, ...]
    lr_gamma: float
    mse_warmup_epochs: int
    n_components: int
    n_factors: int
    precision: str
    weights_dtype: str
    grad_clip: float | None = None
    channels_last: bool | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        for name, least in (("epochs", 0), ("batch_size", 1), ("mse_warmup_epochs", 0), ("n_components", 1),
                            ("n_factors", 0)):
            put(name, check_int(getattr(self, name), name, least))
        put("lr_milestones", tuple(sorted(check_int(m, "lr_milestones entries", 1) for m in self.lr_milestones)))
        for name in ("lr", "lr_gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
            put(name, float(v))
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be one of {sorted(WEIGHTS_DTYPES)}, got {self.weights_dtype!r}")



def dmfa_loss(mfa: MFA, x: Tensor, supervised: Tensor, *, mse_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss on the ``supervised`` coordinates, per image, averaged over the batch.

    Args:
        mfa: the model's prediction (batch B).
        x: ``(B, C, H, W)`` targets; values outside ``supervised`` are ignored (NaN allowed).
        supervised: bool ``(B, 1, H, W)`` or ``(B, C, H, W)``.
        mse_weight: weight of the MSE warm-up term (sum of squared errors of the mixture mean over
            the supervised coordinates, per image).

    Returns:
        ``(loss, metrics)``; metrics hold detached ``nll`` and ``sse`` (means per image) and
        ``nll_px`` (NLL per supervised coordinate, pooled over the batch).
    """
    nll = -mfa.log_prob(x, supervised)                                        # (B,)
    sup = supervised.expand_as(x)
    err = torch.where(sup, mfa.mean() - x, torch.zeros((), dtype=x.dtype, device=x.device))
    sse = (err * err).sum(dim=(1, 2, 3))                                      # (B,)
    loss = nll.mean()
    if mse_weight:
        loss = loss + mse_weight * sse.mean()
    count = sup.sum().clamp_min(1)
    metrics = {"nll": nll.detach().mean(), "sse": sse.detach().mean(), "nll_px": nll.detach().sum() / count}
    return loss, metrics


class _BatchLog:
    """Per-batch training NLL, one list per epoch; an ``extra_state`` of fit so it survives resumes."""

    def __init__(self):
        self.nll: list[list[float]] = []

    def start(self, epoch: int) -> None:
        del self.nll[epoch:]          # a resumed epoch replays from its beginning
        while len(self.nll) <= epoch:
            self.nll.append([])

    def state_dict(self) -> dict:
        return {"nll": [list(e) for e in self.nll]}

    def load_state_dict(self, state: Mapping) -> None:
        self.nll = [list(map(float, e)) for e in state["nll"]]


def train_dmfa(
    model: DMFA,
    images: Tensor,
    recipe: DMFARecipe,
    *,
    mode: str = "complete",
    missing: Tensor | None = None,
    missing_kind: str = "square",
    hole: int | None = None,
    hidden_hole: int | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    device=None,
    progress: bool = True,
    val_images: Tensor | None = None,
    val_missing: Tensor | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Train a DMFA in place (resumable through :func:`labkit.training.fit`).

    Args:
        model: a :class:`DMFA`; moved to ``device``.
        images: ``(N, C, H, W)`` training images in [0, 1]; stay where they are, batches are moved.
        recipe: epochs, batch size, learning rate and schedule, MSE warm-up, precision, gradient
            clipping, memory layout (:class:`DMFARecipe`; its K, L and weights' storage are the
            business of whoever builds and stores the model). The network runs under autocast of
            the recipe's precision, its MFA heads are cast to float32 before the likelihood and the
            MSE warm-up; the precision is recorded in the checkpoint (resuming under another one
            raises). Validation runs in float32.
        mode: ``"complete"`` (hide a fresh square per batch, learn it) or ``"incomplete"`` (each image
            has a fixed truly missing region, never seen nor supervised; see the module docstring).
        missing: incomplete mode only: the truly missing masks, bool ``(N, 1, H, W)``; default
            :func:`incomplete_masks` of ``missing_kind`` (square side ``hole``) drawn from ``seed``.
        hole: side of the truly missing squares (default H/2).
        hidden_hole: side of the hidden (supervised) squares (default ``hole``, else H/2).
        seed: run seed (model initialisation is the caller's business).
        checkpoint: per-epoch resumable checkpoint (``None``: none).
        val_images, val_missing: optional validation set and its holes (bool ``(M, 1, H, W)``);
            adds ``val_nll``/``val_sse`` (per image) to each epoch's history.
        config: extra JSON-able description stored with the checkpoint (resuming with another
            config raises :class:`labkit.training.CheckpointMismatchError`).

    Returns:
        fit's history: per epoch ``nll``, ``sse``, ``nll_px``, ``loss``, ``lr``, ``val_*``,
        ``seconds``, ``train_seconds`` (without validation), ``batch_nll`` (the per-batch NLLs).
    """

    if not isinstance(model, DMFA):
        raise TypeError(f"model must be a DMFA, got {type(model).__name__}")
    images = check_images(images, "images", model.image_shape)
    if mode not in ("complete", "incomplete"):
        raise ValueError(f"mode must be 'complete' or 'incomplete', got {mode!r}")
    if not isinstance(recipe, DMFARecipe):
        raise TypeError(f"recipe must be a DMFARecipe, got {type(recipe).__name__}")
    epochs, batch_size, lr, mse_warmup_epochs = recipe.epochs, recipe.batch_size, recipe.lr, recipe.mse_warmup_epochs
    grad_clip, channels_last = recipe.grad_clip, recipe.channels_last
    N, C, H, W = images.shape
    if hole is not None:
        check_int(hole, "hole", 1)
        if hole > min(H, W):
            raise ValueError(f"hole must be <= {min(H, W)} for {H}x{W} images, got {hole}")
    hidden_hole = hidden_hole if hidden_hole is not None else (hole if hole is not None else H // 2)
    check_int(hidden_hole, "hidden_hole", 1)
    if hidden_hole > min(H, W):
        raise ValueError(f"hidden_hole must be <= {min(H, W)} for {H}x{W} images, got {hidden_hole}")
    device = resolve_device(device)
    model.to(device)
    precision = resolve_precision(recipe.precision, device)
    scaler = grad_scaler(precision, device)
    if channels_last is None:
        channels_last = precision == "bf16-mixed"
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)

    if mode == "incomplete":
        if missing is None:
            missing = incomplete_masks(N, H, W, kind=missing_kind, side=hole, seed=seed, device=images.device)
        missing = _masks.check_mask(missing, name="missing")
        if missing.shape[0] != N or tuple(missing.shape[2:]) != (H, W) or missing.shape[1] not in (1, C):
            raise ValueError(f"missing must have shape ({N}, 1, {H}, {W}), got {tuple(missing.shape)}")
    elif missing is not None:
        raise ValueError("missing is only used with mode='incomplete' (complete-data training has none)")
    if val_images is not None:
        val_images = check_images(val_images, "val_images", model.image_shape)
        if val_missing is None:
            val_missing = test_masks(len(val_images), H, W, side=hidden_hole, seed=seed, device=val_images.device)
        _masks.check_mask(val_missing, name="val_missing", like=val_images)

    # fused Adam: one kernel over all parameters instead of ~10 passes over them; on a CPU the
    # 7.4 M-parameter MNIST heads made the unfused update as costly as forward + backward
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=float(lr), fused=fused or None)
    milestones = list(recipe.lr_milestones)
    scheduler = (torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=recipe.lr_gamma)
                 if milestones else None)
    log = _BatchLog()
    nan = torch.tensor(float("nan"), dtype=images.dtype, device=device)

    def batches(epoch: int, generator: torch.Generator):
        log.start(epoch)
        order = torch.randperm(N, generator=generator)
        return [order[i:i + batch_size] for i in range(0, N, batch_size)]

    def step(idx: Tensor, epoch: int, generator: torch.Generator):
        x = images[idx.to(images.device)].to(device)
        if missing is not None:
            miss = missing[idx.to(missing.device)].to(device)
            # the truly missing pixels become NaN here: if they leaked into the input or the loss,
            # the loss would be NaN
            x = torch.where(miss, nan, x)
        else:
            miss = torch.zeros((len(idx), 1, H, W), dtype=torch.bool, device=device)
        miss, hidden = _masks.training_pair(miss, hidden_kind="square", generator=generator, side=hidden_hole)
        sup = _masks.supervised(miss, hidden)
        unknown = ~_masks.visible(miss, hidden)
        with autocast(precision, device):
            mfa = model(x.contiguous(memory_format=layout), unknown.contiguous(memory_format=layout))
        # float32 MFA (DMFA.forward casts its heads); loss and backward outside autocast
        mfa = to_float32(mfa)
        loss, metrics = _step_loss(mfa, x, sup, mse_weight=1.0 if epoch < mse_warmup_epochs else 0.0)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
        scaler.step(optimizer)
        scaler.update()
        log.nll[epoch].append(float(metrics["nll"]))
        return {"loss": loss.detach(), **metrics}

    val_times: dict[int, float] = {}

    def evaluate(epoch: int):
        started = time.perf_counter()
        df = evaluate_dmfa(model, val_images, val_missing, batch_size=max(batch_size, 256), device=device)
        val_times[epoch] = time.perf_counter() - started
        return {"val_nll": float(df["nll"].mean()), "val_sse": float(df["sse"].mean()),
                "val_seconds": val_times[epoch]}

    run_config = {
        "model": getattr(model, "config", {}), "n_images": N, "mode": mode,
        "missing_kind": missing_kind if mode == "incomplete" else None, "hole": hole, "hidden_hole": hidden_hole,
        "batch_size": batch_size, "lr": float(lr), "lr_milestones": milestones, "lr_gamma": recipe.lr_gamma,
        "mse_warmup_epochs": mse_warmup_epochs, "n_val": None if val_images is None else len(val_images),
        "grad_clip": grad_clip,
    }
    if config:
        run_config["extra"] = dict(config)
    history = fit(
        model, optimizer, batches, step, epochs=epochs, checkpoint=checkpoint, scheduler=scheduler, seed=seed,
        desc=f"DMFA {mode}", progress=progress, extra_state={"batch_log": log}, config=run_config,
        evaluate=evaluate if val_images is not None else None, precision=precision, scaler=scaler,
    )
    for entry in history:
        e = int(entry["epoch"])
        entry["train_seconds"] = entry["seconds"] - entry.get("val_seconds", 0.0)
        entry["batch_nll"] = list(log.nll[e]) if e < len(log.nll) else []
    return history


def _step_loss(mfa: MFA, x: Tensor, supervised: Tensor, *, mse_weight: float):
    """Indirection for tests (a test replaces it to interrupt training mid-epoch)."""
    return dmfa_loss(mfa, x, supervised, mse_weight=mse_weight)
