"""One resumable epoch loop for every study (DMFA, classifiers, WAE, ACFlow).

:func:`fit` owns what all studies share: seeding, progress bars, per-epoch metric averages, and a
checkpoint after every epoch from which an interrupted run continues *bit-identically*. The
study owns what differs: how an epoch's batches are drawn (``batches``) and what one optimisation
step does (``step``: one or several optimizers, extra losses, gradient clipping, ...).

Reproducibility contract. Epoch ``e`` (0-based) of a run with seed ``s`` starts from RNG states
that depend only on ``(s, e)``:

- ``batches(e, g_batches)`` gets a fresh CPU ``torch.Generator`` to shuffle with;
- ``step(batch, e, g_step)`` gets another fresh CPU generator for its own sampling (masks, noise);
- the global torch RNG (dropout, ``torch.randn`` without a generator, all CUDA devices) is re-seeded
  with ``torch.manual_seed``.

So an epoch never depends on how earlier epochs drew random numbers, and a run resumed from the
checkpoint written after epoch ``e - 1`` repeats exactly what the uninterrupted run did (on the
same machine and device; nondeterministic CUDA kernels are outside this guarantee). For the same
reason the checkpoint holds no global RNG state: the re-seeding would overwrite it before use.

A diverged run is not a result: a step whose ``loss`` is NaN or infinite raises
``FloatingPointError`` (``finite_metrics``) before its epoch is checkpointed, so a study reports the
run as failed instead of evaluating broken weights.

Mixed precision (``precision``, see :mod:`labkit.precision`). ``fit`` resolves the precision
(``"auto"`` -> ``"32"`` or ``"bf16-mixed"`` for the model's device), stores it in the checkpoint's
config, refuses to resume a run under another precision unless told to, and checks that ``step``
really entered :func:`labkit.precision.autocast` with it. The step places the autocast itself,
around the forward pass only: backward must run outside autocast, or the gradients of float32
parts of the forward (likelihoods) would be computed in the low precision.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from labkit import precision as _precision
from labkit.checkpoint import CheckpointError, atomic_save, load_checkpoint

__all__ = ["CheckpointMismatchError", "epoch_seeds", "fit"]

_FORMAT = "labkit.fit/1"


class CheckpointMismatchError(CheckpointError, ValueError):
    """A training checkpoint belongs to a different run (seed, config, optimizers, ...)."""


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int, int]:
    """The three seeds of epoch ``epoch`` of a run with ``seed``: ``(batches, step, global)``.

    Derived with :class:`numpy.random.SeedSequence` so that nearby ``(seed, epoch)`` pairs give
    unrelated streams (``seed + epoch`` would make run 0's epoch 1 equal run 1's epoch 0).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    # Keep seeds below 2**63 so every torch seeding API accepts them.
    words = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(3, dtype=np.uint64)
    return tuple(int(w) >> 1 for w in words)  # type: ignore[return-value]


def _normalise_config(config: Any) -> dict | None:
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of JSON-able values, got {type(config).__name__}")
    try:
        # Round-trip through JSON so tuples/lists and int/float keys compare as they will after loading.
        return json.loads(json.dumps(dict(config), sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"config must be JSON-able (numbers, strings, lists, dicts): {exc}") from exc


def _named(obj: Any, what: str, *, kinds: tuple[type, ...], allow_none: bool) -> dict[str, Any] | None:
    """A single object -> {"": obj}; a dict -> itself; validated against ``kinds``."""
    if obj is None:
        if allow_none:
            return None
        raise TypeError(f"{what} must not be None")
    items = dict(obj) if isinstance(obj, Mapping) else {"": obj}
    for name, value in items.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} dict keys must be strings, got {name!r}")
        if kinds and not isinstance(value, kinds):
            label = f"{what}[{name!r}]" if name else what
            expected = " or ".join(k.__name__ for k in kinds)
            raise TypeError(f"{label} must be an instance of {expected}, got {type(value).__name__}")
        if not (hasattr(value, "state_dict") and hasattr(value, "load_state_dict")):
            label = f"{what}[{name!r}]" if name else what
            raise TypeError(f"{label} must have state_dict() and load_state_dict(), got {type(value).__name__}")
    return items


def _states(items: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if items is None else {name: obj.state_dict() for name, obj in items.items()}


def _describe(items: dict[str, Any] | None) -> list[str] | None:
    return None if items is None else sorted(items)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _to_float(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"step() metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().item())
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"step() metric {name!r} must be a number, got {type(value).__name__}") from exc


def _lrs(optimizers: dict[str, torch.optim.Optimizer] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, opt in (optimizers or {}).items():
        lr = opt.param_groups[0].get("lr") if opt.param_groups else None
        if isinstance(lr, (int, float)) or (isinstance(lr, torch.Tensor) and lr.numel() == 1):
            out[f"lr_{name}" if name else "lr"] = float(lr)
    return out


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None,
    batches: Callable[[int, torch.Generator], Iterable[Any]],
    step: Callable[[Any, int, torch.Generator], Mapping[str, Any] | None],
    *,
    epochs: int,
    checkpoint: str | os.PathLike | None = None,
    scheduler: Any = None,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    extra_state: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    evaluate: Callable[[int], Mapping[str, Any]] | None = None,
    precision: str = "32",
    scaler: torch.amp.GradScaler | None = None,
    allow_precision_change: bool = False,
    finite_metrics: Iterable[str] = ("loss",),
) -> list[dict]:
    """Train ``model`` for ``epochs`` epochs, checkpointing after each; resume if ``checkpoint`` exists.

    Args:
        model: the module being trained (for several networks, one ``nn.Module`` holding them all).
            Put in train mode at the start of every epoch, and in eval mode when ``fit`` returns.
        optimizer: one optimizer, a dict ``{name: optimizer}`` (e.g. WAE: autoencoder and
            discriminator), or ``None`` when ``step`` updates the model some other way.
        batches: ``(epoch, generator) -> iterable of batches`` for one epoch; shuffle with the
            given CPU generator (e.g. ``torch.randperm(n, generator=generator)``).
        step: ``(batch, epoch, generator) -> {metric: number}``: forward, backward and
            ``optimizer.step()`` for one batch; the CPU generator is for the step's own sampling.
            Metrics are averaged over the epoch's batches (each batch weighs the same).
        epochs: total number of epochs (``>= 0``); a resumed run continues up to this number.
        checkpoint: file to save after every epoch and resume from. ``None``: no checkpointing.
        scheduler: an LR scheduler (or dict of them), stepped once at the end of every epoch and
            checkpointed. A per-batch scheduler belongs in ``extra_state`` and ``step`` instead.
        seed: the run's seed (non-negative int); see the module docstring for how it is used.
        desc: label of the progress bar.
        progress: show a tqdm bar per epoch (a widget in notebooks) and a line when resuming.
        extra_state: ``{name: object with state_dict()/load_state_dict()}`` saved and restored
            with the checkpoint (e.g. a GradScaler, an EMA of the weights, a per-batch scheduler).
        config: a JSON-able dict describing the run (data, sizes, hyper-parameters). Stored in the
            checkpoint; resuming with a different config raises instead of mixing two runs.
        evaluate: optional ``epoch -> {metric: number}`` called after each epoch's training (e.g.
            validation accuracy); its metrics join that epoch's history entry.
        precision: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` or ``"auto"`` (see
            :mod:`labkit.precision`), resolved for the model's device and stored in the
            checkpoint's config under ``"precision"`` (a ``"precision"`` already in ``config`` must
            name the same, and is replaced by the resolved name).
            Under a mixed precision ``step`` must run its forward pass inside
            ``labkit.precision.autocast(precision, device)`` (checked after its first call) and
            keep the loss and backward in float32, outside the autocast.
        scaler: the step's :class:`torch.amp.GradScaler` (from :func:`labkit.precision.grad_scaler`),
            checkpointed with the run; required for ``"16-mixed"``.
        allow_precision_change: resume a checkpoint written under another precision instead of
            raising (the change is logged in the checkpoint's ``precision_changes``).
        finite_metrics: step metrics that must be finite in every step (default ``("loss",)``): a
            NaN or infinite value raises ``FloatingPointError`` naming the metric, epoch and batch,
            before that epoch is checkpointed (the weights are already poisoned by its update; the
            last checkpoint stays the one of the epoch before). A step that skips bad batches by
            design reports another metric name, or the caller passes ``()``.

    Returns:
        The history: one dict per epoch with ``epoch`` (0-based), the averaged metrics, ``lr``
        (or ``lr_<name>`` per optimizer), any ``evaluate`` metrics, ``batches`` and ``seconds``.

    Raises:
        CheckpointMismatchError: the checkpoint was written by a run with another seed, config,
            precision, set of optimizers/schedulers/extra_state, or more epochs than ``epochs``.
        CheckpointError: the checkpoint is corrupt or not a ``fit`` checkpoint.
        FloatingPointError: a metric of ``finite_metrics`` was NaN or infinite in a step.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    epochs = int(epochs)
    epoch_seeds(seed, 0)  # validates seed
    seed = int(seed)
    if not callable(batches):
        raise TypeError(f"batches must be callable (epoch, generator) -> iterable, got {type(batches).__name__}")
    if not callable(step):
        raise TypeError(f"step must be callable (batch, epoch, generator) -> dict, got {type(step).__name__}")
    optimizers = _named(optimizer, "optimizer", kinds=(torch.optim.Optimizer,), allow_none=True)
    schedulers = _named(scheduler, "scheduler", kinds=(), allow_none=True)
    extras = _named(extra_state, "extra_state", kinds=(), allow_none=True) if extra_state else None
    config = _normalise_config(config)
    if isinstance(finite_metrics, str):
        finite_metrics = (finite_metrics,)
    must_be_finite = frozenset(finite_metrics)
    device = _model_device(model)
    requested = precision
    precision = _precision.resolve_precision(precision, device)
    if config is not None and config.get("precision", precision) not in (requested, precision):
        raise ValueError(f"config says precision {config['precision']!r} but fit was given precision={requested!r}; "
                         "fit records the resolved precision in the checkpoint's config itself")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler (labkit.precision.grad_scaler), got {type(scaler).__name__}")
    if precision == "16-mixed" and (scaler is None or not scaler.is_enabled()):
        raise ValueError("precision '16-mixed' needs an enabled GradScaler: pass scaler=labkit.precision.grad_scaler"
                         "('16-mixed', device) and use it in step()")
    run_config = {**(config or {}), "precision": precision}
    precision_changes: list[dict] = []
    path = Path(checkpoint) if checkpoint is not None else None

    history: list[dict] = []
    start_epoch = 0
    if path is not None:
        stored = load_checkpoint(path, map_location=device)
        if stored is not None:
            _check_compatible(stored, path, seed=seed, epochs=epochs, config=run_config,
                              optimizers=optimizers, schedulers=schedulers, extras=extras,
                              allow_precision_change=allow_precision_change)
            before = _stored_precision(stored)
            precision_changes = [dict(c) for c in stored.get("precision_changes") or []]
            _restore(stored, path, model, optimizers, schedulers, extras)
            if scaler is not None and before == precision and stored.get("scaler"):
                # a scaler's scale only means something for the precision it was tuned under
                scaler.load_state_dict(stored["scaler"])
            history = [dict(h) for h in stored["history"]]
            start_epoch = int(stored["epoch"])
            if before != precision and start_epoch < epochs:
                precision_changes.append({"epoch": start_epoch, "from": before, "to": precision})
                if progress:
                    tqdm.write(f"{desc}: {path} was trained in precision {before!r}; continuing in {precision!r}")
            if progress:
                if start_epoch >= epochs:
                    tqdm.write(f"{desc}: {path} already holds all {epochs} epochs, not training")
                else:
                    tqdm.write(f"{desc}: resuming {path} at epoch {start_epoch + 1}/{epochs}")

    for epoch in range(start_epoch, epochs):
        seed_batches, seed_step, seed_global = epoch_seeds(seed, epoch)
        g_batches = torch.Generator().manual_seed(seed_batches)
        g_step = torch.Generator().manual_seed(seed_step)
        torch.manual_seed(seed_global)  # also seeds every CUDA device
        model.train()

        started = time.perf_counter()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        n_batches = 0
        iterable = batches(epoch, g_batches)
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        bar = tqdm(iterable, total=total, desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress,
                   leave=True, dynamic_ncols=True)
        try:
            for batch in bar:
                with _precision.recording() as entered:
                    metrics = step(batch, epoch, g_step)
                _check_entered(entered, precision, first=(epoch == start_epoch and n_batches == 0))
                n_batches += 1
                if metrics is None:
                    metrics = {}
                if not isinstance(metrics, Mapping):
                    raise TypeError(f"step() must return a dict of metrics or None, got {type(metrics).__name__}")
                for name, value in metrics.items():
                    number = _to_float(value, name)
                    if name in must_be_finite and not math.isfinite(number):
                        raise FloatingPointError(
                            f"{desc}: step() metric {name!r} is {number} in epoch {epoch + 1}/{epochs}, batch "
                            f"{n_batches} (training diverged or a NaN reached the loss); stopped before this "
                            "epoch's checkpoint, whose weights would be broken")
                    sums[name] = sums.get(name, 0.0) + number
                    counts[name] = counts.get(name, 0) + 1
                if progress:
                    bar.set_postfix({k: f"{sums[k] / counts[k]:.4g}" for k in sums}, refresh=False)
        finally:
            bar.close()
        if n_batches == 0:
            raise ValueError(f"batches(epoch={epoch}, generator) yielded no batches")

        entry: dict[str, Any] = {"epoch": epoch}
        entry.update({k: sums[k] / counts[k] for k in sums})
        entry.update(_lrs(optimizers))  # the LR this epoch trained with, before the scheduler moves it
        for sched in (schedulers or {}).values():
            sched.step()
        if evaluate is not None:
            extra_metrics = evaluate(epoch)
            if not isinstance(extra_metrics, Mapping):
                raise TypeError(f"evaluate() must return a dict of metrics, got {type(extra_metrics).__name__}")
            entry.update({k: _to_float(v, k) for k, v in extra_metrics.items()})
        entry["batches"] = n_batches
        entry["seconds"] = time.perf_counter() - started
        history.append(entry)
        bad = [k for k, v in entry.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad and progress:
            tqdm.write(f"{desc}: epoch {epoch + 1} has non-finite metrics {bad}")

        if path is not None:
            atomic_save(
                {
                    "format": _FORMAT,
                    "epoch": epoch + 1,  # epochs completed
                    "epochs": epochs,
                    "seed": seed,
                    "config": run_config,
                    "precision_changes": precision_changes,
                    "desc": desc,
                    "model": model.state_dict(),
                    "optimizer": _states(optimizers),
                    "scheduler": _states(schedulers),
                    "extra_state": _states(extras),
                    "history": history,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                },
                path,
            )

    model.eval()
    return history


def _check_entered(entered: set[str], precision: str, *, first: bool) -> None:
    """Refuse a step that autocast with another precision, or (first step) never autocast."""
    other = sorted(entered - {precision})
    if other:
        raise ValueError(f"fit(precision={precision!r}) but step() entered labkit.precision.autocast with "
                         f"{', '.join(map(repr, other))}; pass the same resolved precision to both")
    if first and precision != "32" and precision not in entered:
        raise ValueError(
            f"fit(precision={precision!r}) but step() did not run under labkit.precision.autocast({precision!r}, "
            "device): wrap its forward pass in it (the run would otherwise train in float32 while its checkpoint "
            "says otherwise)"
        )


def _stored_precision(stored: Mapping) -> str:
    # checkpoints written before fit knew about precision trained in float32
    return (stored.get("config") or {}).get("precision", "32")


def _check_compatible(stored: Any, path: Path, *, seed: int, epochs: int, config: dict,
                      optimizers, schedulers, extras, allow_precision_change: bool) -> None:
    if not isinstance(stored, Mapping) or stored.get("format") != _FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a labkit.training.fit checkpoint; delete it or use another path"
        )
    problems = []
    stored_precision, new_precision = _stored_precision(stored), config["precision"]
    if stored_precision != new_precision and not allow_precision_change:
        problems.append(f"precision: checkpoint {stored_precision!r}, now {new_precision!r} (resume it with "
                        f"precision={stored_precision!r}, or pass allow_precision_change=True to continue "
                        f"in {new_precision!r})")
    if stored["seed"] != seed:
        problems.append(f"seed: checkpoint {stored['seed']}, now {seed}")
    old = {k: v for k, v in (stored["config"] or {}).items() if k != "precision"}
    new = {k: v for k, v in config.items() if k != "precision"}
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
        detail = ", ".join(f"{k}: checkpoint {old.get(k, '<absent>')!r}, now {new.get(k, '<absent>')!r}" for k in keys)
        problems.append(f"config differs ({detail})")
    for label, now, key in (("optimizers", optimizers, "optimizer"), ("schedulers", schedulers, "scheduler"),
                            ("extra_state", extras, "extra_state")):
        before = None if stored[key] is None else sorted(stored[key])
        if before != _describe(now):
            problems.append(f"{label}: checkpoint {before}, now {_describe(now)}")
    if int(stored["epoch"]) > epochs:
        problems.append(f"epochs: checkpoint already trained {stored['epoch']} epochs, now asked for {epochs}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} belongs to a different run: " + "; ".join(problems)
            + ". Delete it (or pass another checkpoint path) to start this run afresh."
        )


def _restore(stored: Mapping, path: Path, model: nn.Module, optimizers, schedulers, extras) -> None:
    try:
        model.load_state_dict(stored["model"])
        for items, key in ((optimizers, "optimizer"), (schedulers, "scheduler"), (extras, "extra_state")):
            for name, obj in (items or {}).items():
                obj.load_state_dict(stored[key][name])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model/optimizers given now ({exc}); "
            "delete it to start afresh"
        ) from exc
