r"""The timing study's measuring machinery: settings, inputs, interleaved measurements, the grids.

Every measurement is one call, timed with :class:`torch.utils.benchmark.Timer`; the layers of a
setting are measured **interleaved** (one call each per round, the order rotating), so a burst of
load on a shared machine hits all of them alike. Results are long-format ``pandas.DataFrame`` s
(one row per call) with columns ``study, size, channels, batch, K, L, hole, layer, group, round,
seconds, clock``:

- :func:`forward_grid`    the paper's grid (conv+ReLU vs MisConv, fast and optionally eager path);
- :func:`backward_grid`   the same with a backward pass (gradients of the layer's weight and bias);
- :func:`component_sweep` MisConv against conv+ReLU for K components and L factors;
- :func:`end_to_end`      per image: DMFA forward + MisConv + rest of the classifier, against the
  classifier on complete images.

:mod:`labkit.studies.timing_report` turns the rows into tables; :mod:`labkit.studies.timing` runs
the study of a :class:`~labkit.studies.configs.TimingConfig`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import benchmark

from labkit.device import resolve_device
from labkit.masks import square
from labkit.mfa import MFA
from labkit.misconv import MisConv2d
from labkit.models.classifier import build_classifier
from labkit.models.dmfa import build_dmfa

__all__ = [
    "E2E_DATASETS",
    "LAYERS",
    "Case",
    "backward_grid",
    "channels_for",
    "component_sweep",
    "end_to_end",
    "end_to_end_fns",
    "forward_grid",
    "grid_cases",
    "interleaved",
    "make_inputs",
]

LAYERS = ("conv", "misconv", "misconv_eager")


def channels_for(size: int) -> int:
    """The paper's channels: 1 for 28-pixel images (MNIST), 3 otherwise (SVHN/CIFAR, CelebA)."""
    return 1 if size == 28 else 3


@dataclass(frozen=True)
class Case:
    """One setting: images ``(batch, channels, size, size)`` with a missing square of side ``hole``
    (default size // 2) per image, a layer of ``filters`` ``kernel``x``kernel`` filters (padding
    ``kernel // 2``) and an MFA with ``K`` components of ``L`` factors."""

    size: int
    batch: int
    channels: int | None = None
    K: int = 1
    L: int = 4
    filters: int = 32
    kernel: int = 3
    hole: int | None = None

    def __post_init__(self):
        for name in ("size", "batch", "K", "filters", "kernel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Case.{name} must be a positive int, got {v!r}")
        if isinstance(self.L, bool) or not isinstance(self.L, int) or self.L < 0:
            raise ValueError(f"Case.L must be an int >= 0, got {self.L!r}")
        if self.channels is None:
            object.__setattr__(self, "channels", channels_for(self.size))
        if self.hole is None:
            object.__setattr__(self, "hole", self.size // 2)
        if not (isinstance(self.hole, int) and 0 <= self.hole <= self.size):
            raise ValueError(f"Case.hole must be an int in [0, size={self.size}], got {self.hole!r}")

    def row(self) -> dict[str, int]:
        return dict(size=self.size, channels=self.channels, batch=self.batch, K=self.K, L=self.L, hole=self.hole)


def make_inputs(case: Case, *, device=None, dtype=torch.float32, seed: int = 0) -> tuple[Tensor, Tensor, MFA]:
    """Random images, square masks (uniform positions, fully inside) and an MFA for a case.

    Returns ``x (B, C, S, S)`` in [0, 1) with NaN at missing pixels (MisConv must never read
    them), ``missing`` bool ``(B, 1, S, S)``, and an :class:`MFA` with uniform weights, means in
    [0, 1), factors of scale 0.1 and variances in [0.01, 0.11). Timing does not depend on the values.
    """
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(seed)
    B, C, S, K, L = case.batch, case.channels, case.size, case.K, case.L
    missing = square(B, S, S, side=case.hole, generator=g, device="cpu") if case.hole > 0 else torch.zeros(B, 1, S, S, dtype=torch.bool)
    x = torch.rand(B, C, S, S, generator=g, dtype=dtype)
    x = torch.where(missing, torch.full((), float("nan"), dtype=dtype), x)
    mfa = MFA(
        torch.full((B, K), 1.0 / K, dtype=dtype),
        torch.rand(B, K, C, S, S, generator=g, dtype=dtype),
        0.1 * torch.randn(B, K, L, C, S, S, generator=g, dtype=dtype),
        0.01 + 0.1 * torch.rand(B, K, C, S, S, generator=g, dtype=dtype),
        validate=False,
    )
    return x.to(dev), missing.to(dev), mfa.to(dev)


# ------------------------------------------------------------------------------------- timing core
def _clock(clock: str, device: torch.device, threads: int):
    if clock not in ("auto", "wall", "cpu"):
        raise ValueError(f"clock must be 'auto', 'wall' or 'cpu', got {clock!r}")
    if clock == "wall" or (clock == "auto" and device.type != "cpu"):
        return "wall", time.perf_counter
    # CPU time of this thread (of the process with several threads): what the computation cost,
    # without the time other processes held the core.
    return "cpu", (time.thread_time if threads == 1 else time.process_time)


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, *, warmup: int = 3, number: int = 1,
                num_threads: int | None = None, device=None, clock: str = "auto") -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` measurements each, interleaved.

    Each round times every function once (``number`` calls, divided) with
    :class:`torch.utils.benchmark.Timer`, in an order that rotates from round to round.
    ``warmup`` untimed calls first (they include torch.compile's first compilation).
    On CUDA every measurement synchronises.

    ``clock``: ``"wall"`` (elapsed time, the paper's measure), ``"cpu"`` (CPU time of the
    thread, of the process when ``num_threads`` > 1: robust on a machine shared with other jobs,
    where elapsed time mostly measures how often the scheduler preempted a call) or ``"auto"``
    (cpu on a CPU device, wall on a GPU).
    """
    if not fns:
        raise ValueError("fns must name at least one function")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    dev = resolve_device(device)
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def wrapped(f):
        def call():
            f()
            sync()
        return call

    _, timer = _clock(clock, dev, threads)
    calls = {name: wrapped(f) for name, f in fns.items()}
    for call in calls.values():
        for _ in range(warmup):
            call()
    timers = {name: benchmark.Timer("call()", globals={"call": call}, num_threads=threads, timer=timer)
              for name, call in calls.items()}
    names = list(timers)
    out: dict[str, list[float]] = {name: [] for name in names}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                out[name].append(_measure(timers[name], number) / number)
    finally:
        torch.set_num_threads(previous)
    return out


def _measure(timer: benchmark.Timer, number: int) -> float:
    """Seconds for ``number`` calls. ``Timer.timeit`` would first make two untimed warm-up calls
    per measurement (tripling the cost of slow statements); we warm up once per function instead
    and use the Timer's own timed loop."""
    timed = getattr(timer, "_timeit", None)
    return timed(number) if timed is not None else timer.timeit(number).raw_times[0]


def _layers(case: Case, device, dtype, seed):
    torch.manual_seed(seed)
    layer = MisConv2d(case.channels, case.filters, case.kernel, padding=case.kernel // 2, device=device, dtype=dtype)
    x, missing, mfa = make_inputs(case, device=device, dtype=dtype, seed=seed)
    complete = torch.nan_to_num(x, nan=0.5)
    return layer, x, complete, missing, mfa


def _forward_fns(case: Case, layers: Sequence[str], device, dtype, seed):
    layer, x, complete, missing, mfa = _layers(case, device, dtype, seed)
    weight, bias, pad = layer.weight, layer.bias, case.kernel // 2

    def conv():
        with torch.no_grad():
            return F.relu(F.conv2d(complete, weight, bias, padding=pad))

    def misconv(fast):
        def run():
            layer.fast = fast
            with torch.no_grad():
                return layer(x, missing, mfa)
        return run

    table = {"conv": conv, "misconv": misconv(True), "misconv_eager": misconv(False)}
    return {name: table[name] for name in layers}


def _backward_fns(case: Case, layers: Sequence[str], device, dtype, seed):
    layer, x, complete, missing, mfa = _layers(case, device, dtype, seed)
    pad = case.kernel // 2

    def step(forward):
        def run():
            layer.zero_grad(set_to_none=True)
            out = forward()
            out.backward(torch.ones_like(out))
        return run

    def conv():
        return F.relu(F.conv2d(complete, layer.weight, layer.bias, padding=pad))

    def misconv(fast):
        def run():
            layer.fast = fast
            return layer(x, missing, mfa)
        return run

    table = {"conv": step(conv), "misconv": step(misconv(True)), "misconv_eager": step(misconv(False))}
    return {name: table[name] for name in layers}


def _check_layers(layers: Sequence[str]) -> list[str]:
    layers = list(layers)
    bad = [name for name in layers if name not in LAYERS]
    if bad or not layers:
        raise ValueError(f"layers must be a non-empty subset of {LAYERS}, got {layers}")
    return layers


def _grid(study: str, make_fns, cases: Sequence[Case], layers, repeats, *, eager_repeats=None, device=None,
          dtype=torch.float32, seed=0, warmup=3, num_threads=None, progress=False, clock="auto"):
    layers = _check_layers(layers)
    dev = resolve_device(device)
    clock_name, _ = _clock(clock, dev, torch.get_num_threads() if num_threads is None else num_threads)
    rows = []
    for case in cases:
        fns = make_fns(case, layers, dev, dtype, seed)
        fast_names = [n for n in layers if n != "misconv_eager"]
        groups = [(fast_names, repeats)]
        if "misconv_eager" in layers:
            # the eager path is slow: fewer measurements, still interleaved with conv
            groups.append((["conv", "misconv_eager"] if "conv" in layers else ["misconv_eager"],
                           repeats if eager_repeats is None else eager_repeats))
        for names, n in groups:
            if not names or n <= 0:
                continue
            t0 = time.perf_counter()
            times = interleaved({k: fns[k] for k in names}, n, warmup=warmup, num_threads=num_threads, device=dev,
                                clock=clock)
            for name, ts in times.items():
                group = "eager" if "misconv_eager" in names else "fast"
                rows += [dict(study=study, **case.row(), layer=name, group=group, round=i, seconds=s, clock=clock_name)
                         for i, s in enumerate(ts)]
            if progress:
                med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
                print(f"  {study} I={case.size} C={case.channels} B={case.batch} K={case.K} L={case.L}: "
                      + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in med.items())
                      + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return pd.DataFrame(rows)


def grid_cases(sizes: Sequence[int] = (28, 32, 64), batch_sizes: Sequence[int] = (16, 32, 64), *, K: int = 1,
               L: int = 4, filters: int = 32, kernel: int = 3) -> list[Case]:
    """The paper's grid: every size x batch, channels per :func:`channels_for`, hole = size // 2."""
    return [Case(size=s, batch=b, K=K, L=L, filters=filters, kernel=kernel) for s in sizes for b in batch_sizes]


def forward_grid(cases: Sequence[Case], repeats: int, *, layers: Sequence[str] = ("conv", "misconv"),
                 eager_repeats: int | None = None, device=None, dtype=torch.float32, seed: int = 0, warmup: int = 3,
                 num_threads: int | None = None, progress: bool = False, clock: str = "auto"):
    """One forward pass (``torch.no_grad``) of conv2d+ReLU and of MisConv per case.

    ``layers``: among ``"conv"`` (F.relu(F.conv2d) on the complete image), ``"misconv"`` (the
    default fast path) and ``"misconv_eager"`` (``fast=False``, measured in a second interleaved
    group with conv, ``eager_repeats`` times: it is slow). Returns the long DataFrame (column
    ``group`` says which interleaved group a row belongs to; ratios compare within a group).
    """
    return _grid("forward", _forward_fns, cases, layers, repeats, eager_repeats=eager_repeats, device=device,
                 dtype=dtype, seed=seed, warmup=warmup, num_threads=num_threads, progress=progress, clock=clock)


def backward_grid(cases: Sequence[Case], repeats: int, *, layers: Sequence[str] = ("conv", "misconv"),
                  eager_repeats: int | None = None, device=None, dtype=torch.float32, seed: int = 0, warmup: int = 3,
                  num_threads: int | None = None, progress: bool = False, clock: str = "auto"):
    """Forward + backward (gradients of the layer's weight and bias, ``out.backward(ones)``)."""
    return _grid("backward", _backward_fns, cases, layers, repeats, eager_repeats=eager_repeats, device=device,
                 dtype=dtype, seed=seed, warmup=warmup, num_threads=num_threads, progress=progress, clock=clock)


def component_sweep(size: int, batch: int, repeats: int, *, Ks: Sequence[int] = (1,), Ls: Sequence[int] = (4,),
                    layers: Sequence[str] = ("conv", "misconv"), eager_repeats: int | None = None, device=None,
                    dtype=torch.float32, seed: int = 0, warmup: int = 3, num_threads: int | None = None,
                    progress: bool = False, clock: str = "auto"):
    """Forward timings for every (K, L) at one image size and batch (study ``"components"``)."""
    cases = [Case(size=size, batch=batch, K=k, L=l) for k in Ks for l in Ls]
    return _grid("components", _forward_fns, cases, layers, repeats, eager_repeats=eager_repeats, device=device,
                 dtype=dtype, seed=seed, warmup=warmup, num_threads=num_threads, progress=progress, clock=clock)


# ------------------------------------------------------------------------------------- end to end
E2E_DATASETS = {"mnist": ("mnist", 28, 1), "svhn": ("svhn", 32, 3), "cifar10": ("cifar10", 32, 3), "celeba": ("svhn", 64, 3)}


def end_to_end_fns(name: str, batch: int, device, *, seed: int = 0,
                   paths: dict[str, Any] | None = None) -> tuple["Case", dict[str, Callable[[], Any]]]:
    """The end-to-end timing setting of data set ``name`` (:data:`E2E_DATASETS`): freshly
    initialised DMFA and classifiers, one batch of inputs with holes, and the callables to time —
    ``"classifier"`` (complete images), ``"dmfa"`` (the DMFA alone) and, per entry of ``paths``
    (label -> ``MisConv2d.fast`` value; default ``{"dmfa+misconv_classifier": None}``), the whole
    method with its MisConv layers set to that path. Returns ``(case, {label: fn})``."""
    if name not in E2E_DATASETS:
        raise ValueError(f"unknown data set {name!r} for end_to_end; valid: {', '.join(E2E_DATASETS)}")
    arch, size, C = E2E_DATASETS[name]
    dev = resolve_device(device)
    torch.manual_seed(seed)
    dmfa = build_dmfa(name).to(dev).eval()
    clf_mis = build_classifier(arch, "dmfa_misconv_complete", in_channels=C, image_size=size).to(dev).eval()
    clf_gt = build_classifier(arch, "gt", in_channels=C, image_size=size).to(dev).eval()
    case = Case(size=size, batch=batch, channels=C)
    x, missing, _ = make_inputs(case, device=dev, seed=seed)
    complete = torch.nan_to_num(x, nan=0.5)
    none = torch.zeros_like(missing)

    def classifier():
        with torch.no_grad():
            return clf_gt(complete, none, complete)

    def dmfa_only():
        with torch.no_grad():
            return dmfa(x, missing)

    def method(path):
        def run():
            for module in clf_mis.modules():
                if isinstance(module, MisConv2d):
                    module.fast = path
            with torch.no_grad():
                return clf_mis(x, missing, dmfa(x, missing))
        return run

    fns = {"classifier": classifier, "dmfa": dmfa_only}
    fns.update({label: method(path) for label, path in (paths or {"dmfa+misconv_classifier": None}).items()})
    return case, fns


def end_to_end(datasets: Sequence[str], batch: int, repeats: int, *, device=None, seed: int = 0, warmup: int = 2,
               num_threads: int | None = None, progress: bool = False, clock: str = "auto"):
    """Per image: DMFA forward + classifier with a MisConv front, against the same classifier
    on complete images (conv + ReLU front), both in eval mode without gradients.

    Uses :func:`labkit.models.dmfa.build_dmfa` (freshly initialised weights: timing does not depend on
    training) and :func:`labkit.models.classifier.build_classifier` (the paper's architectures; CelebA
    uses the SVHN one at 64 pixels). Layers in the result: ``"classifier"`` (complete images),
    ``"dmfa"`` (DMFA alone), ``"dmfa+misconv_classifier"`` (the whole method). ``seconds`` is per
    batch; ``per_image`` = seconds / batch.
    """
    dev = resolve_device(device)
    rows = []
    for name in datasets:
        case, fns = end_to_end_fns(name, batch, dev, seed=seed)
        t0 = time.perf_counter()
        times = interleaved(fns, repeats, warmup=warmup, num_threads=num_threads, device=dev, clock=clock)
        clock_name, _ = _clock(clock, dev, torch.get_num_threads() if num_threads is None else num_threads)
        for layer, ts in times.items():
            rows += [dict(study="end_to_end", dataset=name, **case.row(), layer=layer, group="e2e", round=i, seconds=s,
                          per_image=s / batch, clock=clock_name) for i, s in enumerate(ts)]
        if progress:
            med = {k: sorted(v)[len(v) // 2] / batch for k, v in times.items()}
            print(f"  end_to_end {name} B={batch}: " + ", ".join(f"{k} {v * 1e3:.3f} ms/image" for k, v in med.items())
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return pd.DataFrame(rows)


