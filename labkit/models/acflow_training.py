r"""Training and evaluation of the ACFlow imputer (:class:`labkit.models.acflow.ACFlow`): the NLL per
missing pixel over a data set (:func:`evaluate_nll`, :func:`bits_per_dim`), the study's mixed mask
distribution (:func:`study_mask_fn`), the resumable trainer (:func:`train_acflow`) and the loader
of trained files (:func:`load_acflow`).

Shapes: ``images`` (N, C, H, W) float in [0, 1]; ``missing`` bool (N, 1 or C, H, W), True = missing.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from labkit.checkpoint import CheckpointError, load_checkpoint
from labkit.checks import check_int
from labkit.device import resolve_device
from labkit.masks import MASK_KINDS, make_masks
from labkit.models.acflow import ACFlow
from labkit.precision import autocast, grad_scaler, resolve_precision, to_float32
from labkit.training import fit

__all__ = [
    "bits_per_dim",
    "evaluate_nll",
    "study_mask_fn",
    "train_acflow",
    "load_acflow",
]


# --------------------------------------------------------------------------------------------
# metrics


def bits_per_dim(nll_nats_per_dim: float | Tensor) -> float | Tensor:
    """Bits per missing 8-bit pixel from the continuous NLL per missing pixel (nats) of
    *dequantised* values: ``nll / ln 2 + 8`` (the uniform-dequantisation bound, log2 256 = 8)."""
    return nll_nats_per_dim / math.log(2.0) + 8.0


@torch.no_grad()
def evaluate_nll(
    model: ACFlow,
    images: Tensor,
    missing: Tensor,
    *,
    batch_size: int = 256,
    dequantize: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Mean NLL per missing pixel over a data set.

    Args:
        images: (N, C, H, W) in [0, 1] (any device; batches are moved to the model's device).
        missing: bool (N, 1 or C, H, W).
    Returns:
        ``{"nll_per_missing_pixel": nats, "bits_per_dim": ..., "n_missing": total count}``:
        total NLL / total missing pixels (images with more missing pixels weigh more).
    """
    if not isinstance(images, Tensor) or not isinstance(missing, Tensor):
        raise TypeError("images and missing must be torch.Tensors")
    if images.shape[0] != missing.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and missing {tuple(missing.shape)} differ in N")
    check_int(batch_size, "batch_size")
    dev = model._param().device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, images.shape[0], batch_size):
        xb = images[i:i + batch_size].to(dev)
        mb = missing[i:i + batch_size].to(dev)
        lp = model.log_prob(xb, mb, dequantize=dequantize, generator=generator)
        total -= lp.sum().item()
        count += int(mb.expand_as(xb).sum().item())
    model.train(was_training)
    nll = total / max(count, 1)
    return {"nll_per_missing_pixel": nll, "bits_per_dim": float(bits_per_dim(nll)), "n_missing": count}


# --------------------------------------------------------------------------------------------
# training


def study_mask_fn(
    height: int = 28,
    width: int = 28,
    kinds: tuple[str, ...] = ("square", "trapezoid", "noise"),
) -> Callable[[int, torch.Generator | None], Tensor]:
    """Masks of the study's kinds, mixed: ``mask_fn(n, generator) -> bool (n, 1, H, W)``.

    Each image independently gets one kind drawn uniformly from ``kinds`` (default: square of 1/4
    of the area, trapezoid of 1/2, noise of 3/4, see :mod:`labkit.masks`), so one model learns all
    the conditionals the studies ask for. Masks are made on the generator's device. It is
    :func:`train_acflow`'s default mask distribution, hence its place beside the trainer.
    """
    kinds = tuple(kinds)
    if not kinds or any(k not in MASK_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {MASK_KINDS}, got {kinds!r}")
    check_int(height, "height")
    check_int(width, "width")

    def mask_fn(n: int, generator: torch.Generator | None = None) -> Tensor:
        dev = generator.device if generator is not None else torch.device("cpu")
        choice = torch.randint(len(kinds), (n,), generator=generator, device=dev)
        out = torch.zeros(n, 1, height, width, dtype=torch.bool, device=dev)
        for k, kind in enumerate(kinds):
            sel = choice == k
            count = int(sel.sum())
            if count:
                out[sel] = make_masks(kind, count, height, width, generator=generator, device=dev)
        return out

    mask_fn.__name__ = "study_mix(" + ",".join(kinds) + ")"
    mask_fn.__qualname__ = mask_fn.__name__
    return mask_fn


def train_acflow(
    images: Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    mask_fn: Callable[[int, torch.Generator | None], Tensor] | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    model: ACFlow | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    max_grad_norm: float = 100.0,
    val_images: Tensor | None = None,
    val_missing: Tensor | None = None,
    max_batches: int | None = None,
    config: Mapping[str, Any] | None = None,
    precision: str = "32",
) -> tuple[ACFlow, list[dict]]:
    """Train an :class:`ACFlow` by maximum likelihood of the missing pixels under random masks.

    Every step draws a fresh mask per image with ``mask_fn`` (default :func:`study_mask_fn`: a mix
    of square / trapezoid / noise), dequantises the missing pixels (``(255·x + u)/256``) and
    minimises the NLL per missing pixel (total −log p over the batch / number of missing pixels).
    Non-finite losses skip the update (counted in the ``skipped`` metric; an epoch that skipped every
    batch raises ``FloatingPointError``); gradients are clipped to
    ``max_grad_norm``. Uses :func:`labkit.training.fit`: reproducible from ``seed``, a checkpoint
    after every epoch, and a rerun with the same ``checkpoint`` resumes (a larger ``epochs``
    extends the run).

    Args:
        images: (N, C, H, W) float in [0, 1] (kept where they are; batches go to ``device``).
        epochs, batch_size, lr: Adam on all parameters.
        mask_fn: ``(n, generator) -> bool (n, 1 or C, H, W)`` (True = missing).
        seed, checkpoint, progress: see :func:`labkit.training.fit`.
        device: where the model trains (``None``: CUDA if available).
        model: an existing ACFlow to train (else one is built from ``model_kwargs`` and the
            image shape).
        val_images, val_missing: optional fixed validation set; its NLL (dequantisation noise
            seeded, so epochs compare) joins each epoch's history as ``val_nll_per_missing_pixel``
            and ``val_bits_per_dim``.
        max_batches: stop each epoch after this many batches (smoke tests).
        config: extra JSON-able description stored in (and checked against) the checkpoint.
        precision: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` (CUDA) or ``"auto"`` (see
            :mod:`labkit.precision`): the coupling networks run under autocast, the flow's
            coordinates, log-determinants and the NLL stay float32; recorded in the checkpoint.
            Validation runs in float32.

    Returns:
        ``(model, history)``: the model in eval mode, one dict per epoch with
        ``nll_per_missing_pixel`` (nats, mean over batches), ``bits_per_dim``, ``skipped``,
        ``lr``, ``batches``, ``seconds`` (epoch incl. validation), ``train_seconds`` and
        ``images_per_second`` (optimisation steps only) and the validation metrics.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (N, C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if images.shape[0] < 1:
        raise ValueError("images is empty")
    lo, hi = images.min().item(), images.max().item()
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    check_int(batch_size, "batch_size")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive float, got {lr!r}")
    if max_batches is not None:
        check_int(max_batches, "max_batches")
    if (val_images is None) != (val_missing is None):
        raise ValueError("give both val_images and val_missing, or neither")
    n, c, h, w = images.shape
    if val_images is not None:
        if not isinstance(val_images, Tensor) or val_images.dim() != 4 or tuple(val_images.shape[1:]) != (c, h, w):
            got = tuple(val_images.shape) if isinstance(val_images, Tensor) else type(val_images).__name__
            raise ValueError(f"val_images must be a tensor (N, {c}, {h}, {w}) like images, got {got}")
        if not isinstance(val_missing, Tensor) or val_missing.dtype != torch.bool:
            raise TypeError("val_missing must be a bool tensor (True = missing)")
        if val_missing.dim() != 4 or val_missing.shape[0] != val_images.shape[0] \
                or tuple(val_missing.shape[2:]) != (h, w) or val_missing.shape[1] not in (1, c):
            raise ValueError(f"val_missing must have shape ({val_images.shape[0]}, 1 or {c}, {h}, {w}), "
                             f"got {tuple(val_missing.shape)}")
    device = resolve_device(device)
    if model is None:
        model = ACFlow(c, h, w, **dict(model_kwargs or {}))
    elif not isinstance(model, ACFlow):
        raise TypeError(f"model must be an ACFlow, got {type(model).__name__}")
    elif (model.channels, model.height, model.width) != (c, h, w):
        raise ValueError(f"model is for images {(model.channels, model.height, model.width)}, "
                         f"images are {(c, h, w)}")
    model = model.to(device)
    if mask_fn is None:
        mask_fn = study_mask_fn(h, w)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    precision = resolve_precision(precision, device)
    scaler = grad_scaler(precision, device)
    per_epoch = math.ceil(n / batch_size) if max_batches is None else min(max_batches, math.ceil(n / batch_size))

    def batches(epoch: int, generator: torch.Generator):
        order = torch.randperm(n, generator=generator)
        return [order[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]

    step_seconds: dict[int, float] = {}  # time in optimisation steps only (no validation), per epoch
    updates: dict[int, list[int]] = {}    # per epoch: [batches, batches skipped for a non-finite loss]

    def step(idx: Tensor, epoch: int, generator: torch.Generator) -> dict[str, float]:
        started = time.perf_counter()
        try:
            out = _step(idx, generator)
            counts = updates.setdefault(epoch, [0, 0])
            counts[0] += 1
            counts[1] += int(out["skipped"])
            return out
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_seconds[epoch] = step_seconds.get(epoch, 0.0) + time.perf_counter() - started

    def _step(idx: Tensor, generator: torch.Generator) -> dict[str, float]:
        x = images[idx.to(images.device)].to(device)
        missing = mask_fn(x.shape[0], generator)
        if not isinstance(missing, Tensor) or missing.dtype != torch.bool:
            raise TypeError(f"mask_fn must return a bool tensor, got "
                            f"{missing.dtype if isinstance(missing, Tensor) else type(missing).__name__}")
        missing = missing.to(device)
        with autocast(precision, device):
            lp = model.log_prob(x, missing, dequantize=True, generator=generator)
        n_missing = missing.expand_as(x).sum().clamp_min(1)
        loss = -to_float32(lp).sum() / n_missing
        if not torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            return {"skipped": 1.0}
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        nll = loss.item()
        return {"nll_per_missing_pixel": nll, "bits_per_dim": float(bits_per_dim(nll)), "skipped": 0.0}

    images_per_epoch = min(n, per_epoch * batch_size)

    def evaluate(epoch: int) -> dict[str, float]:
        # Runs after each epoch's steps; fit stores these metrics in the history it checkpoints.
        n_batches, n_skipped = updates.get(epoch, (0, 0))
        if n_batches and n_skipped == n_batches:
            # nothing was learnt: the epoch would be checkpointed as trained with no loss to show
            raise FloatingPointError(f"acflow: the loss was non-finite in every one of the {n_batches} batches of "
                                     f"epoch {epoch + 1}/{epochs} (every update skipped): training diverged")
        seconds = step_seconds.get(epoch, float("nan"))
        out = {"train_seconds": seconds, "images_per_second": images_per_epoch / seconds}
        if val_images is not None:
            g = torch.Generator().manual_seed(seed)  # same dequantisation noise every epoch
            r = evaluate_nll(model, val_images, val_missing, generator=g)
            out.update(val_nll_per_missing_pixel=r["nll_per_missing_pixel"], val_bits_per_dim=r["bits_per_dim"])
        return out

    run_config = {
        "model": model.config,
        "n_images": int(n),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "max_grad_norm": float(max_grad_norm),
        "mask_fn": getattr(mask_fn, "__name__", type(mask_fn).__name__),
        "max_batches": max_batches,
    }
    if config:
        run_config.update(dict(config))
    history = fit(model, optimizer, batches, step, epochs=epochs, checkpoint=checkpoint, seed=seed,
                  desc="acflow", progress=progress, config=run_config, evaluate=evaluate, precision=precision,
                  scaler=scaler)
    return model, history


def load_acflow(path: str | Path, device: str | torch.device | None = None, *,
                input_role: str = "ACFlow checkpoint") -> tuple[ACFlow, dict]:
    """Load a trained model saved by ``./lab study acflow`` (:mod:`labkit.studies.acflow_study`:
    ``{"model", "meta"}`` with ``meta["config"]["model"]`` the constructor arguments) or a
    :func:`labkit.training.fit` checkpoint of :func:`train_acflow`. Returns ``(model in eval mode on device, meta)``.

    The file is an *input* of the caller (``input_role`` names it): a missing file raises
    ``FileNotFoundError``, an unreadable or foreign one :class:`labkit.checkpoint.CheckpointError`,
    both naming the path and saying that it is an input to restore or retrain
    (``./lab study acflow --profile cpu``).
    """
    device = resolve_device(device)
    hint = "it is an input of this step: restore it, or retrain it with ./lab study acflow --profile cpu"
    stored = load_checkpoint(path, map_location=device, input_role=input_role)
    if stored is None:
        raise FileNotFoundError(f"no {input_role} at {str(path)!r}; {hint}")
    try:
        meta = dict(stored["meta"]) if "meta" in stored else {"history": stored["history"],
                                                              "config": stored["config"]}
        model = ACFlow(**meta["config"]["model"])
        model.load_state_dict(stored["model"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{input_role} {str(path)!r} is not an ACFlow checkpoint ({type(exc).__name__}: {exc}); "
                              f"{hint}") from exc
    return model.to(device).eval(), meta
