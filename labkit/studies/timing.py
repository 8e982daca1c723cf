r"""Timing study: what MisConv costs next to a plain conv2d + ReLU.

Reproduces supplementary Table 2 of *MisConv: Convolutional Neural Networks for Missing Data*,
Przewięźlikowski, Śmieja, Struski, Tabor, WACV 2022, https://arxiv.org/abs/2110.14010.

The paper (supplementary Table 2, Figure 2) timed one forward pass of a classic convolution and of
MisConv on a GPU: 32 filters 3x3, K = 1, L = 4, images of 28 (1 channel), 32 and 64 pixels
(3 channels) with a missing square of side I/2, batches of 16, 32 and 64, 5000 measurements per
setting. :data:`PAPER_TABLE2` holds its figures. This module measures the same grid and more:

- :func:`forward_grid`   the paper's grid (conv+ReLU vs MisConv, fast and optionally eager path);
- :func:`backward_grid`  the same with a backward pass (gradients of the layer's weight and bias);
- :func:`component_sweep` MisConv against conv+ReLU for K components and L factors;
- :func:`end_to_end`     per image: DMFA forward + MisConv + rest of the classifier, against the
  classifier on complete images (the DMFA, not the layer, is the real price of the method).

Every measurement is one call, timed with :class:`torch.utils.benchmark.Timer`; the layers of a
setting are measured **interleaved** (one call each per round, the order rotating), so a burst of
load on a shared machine hits all of them alike. Results are long-format ``pandas.DataFrame`` s
(one row per call) with columns ``study, size, channels, batch, K, L, hole, layer, round, seconds``;
:func:`summarize` and :func:`ratio_table` turn them into the paper's table with ratios.

``python -m labkit.studies.timing --profile quick`` prints the tables (see :func:`main`).

On this project's CPU machine glibc returns freed large buffers to the OS and every new tensor
pays page faults (about 2.5 µs per 4 KiB page): a 28x28 conv+ReLU then takes 1.9 ms instead of
0.2 ms. :func:`tune_malloc` (``mallopt``: no mmap, no trimming) makes freed memory reusable, the
way PyTorch's CUDA caching allocator does on a GPU; the studies call it unless told not to, and
:func:`labkit.machine.machine_description` records whether it is on (both live in
:mod:`labkit.machine`).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import benchmark

from labkit.checkpoint import TableFileError, read_whole_csv
from labkit.device import resolve_device
from labkit.machine import machine_description, malloc_tuned, tune_malloc
from labkit.masks import square
from labkit.mfa import MFA
from labkit.misconv import MisConv2d, compile_report
from labkit.models.classifier import build_classifier
from labkit.models.dmfa import build_dmfa

__all__ = [
    "PAPER_TABLE2",
    "Case",
    "channels_for",
    "make_inputs",
    "tune_malloc",
    "malloc_tuned",
    "machine_description",
    "interleaved",
    "grid_cases",
    "forward_grid",
    "backward_grid",
    "component_sweep",
    "end_to_end",
    "summarize",
    "ratio_table",
    "paper_table",
    "boxplots",
    "format_table",
    "main",
]

#: Supplementary Table 2: seconds per forward pass (mean ± std over 5000), GPU.
PAPER_TABLE2 = [
    # size, hole, batch, conv mean, conv std, misconv mean, misconv std
    (28, 14, 16, 0.00016, 0.00006, 0.00092, 0.00030),
    (28, 14, 32, 0.00017, 0.00006, 0.00097, 0.00041),
    (28, 14, 64, 0.00020, 0.00008, 0.00138, 0.00061),
    (32, 16, 16, 0.00022, 0.00012, 0.00109, 0.00039),
    (32, 16, 32, 0.00037, 0.00020, 0.00111, 0.00046),
    (32, 16, 64, 0.00034, 0.00016, 0.00121, 0.00047),
    (64, 32, 16, 0.00034, 0.00017, 0.00091, 0.00025),
    (64, 32, 32, 0.00031, 0.00012, 0.00115, 0.00037),
    (64, 32, 64, 0.00029, 0.00008, 0.00109, 0.00029),
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
    import pandas as pd

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
    import pandas as pd

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


# ------------------------------------------------------------------------------------- tables
_KEYS = ["study", "size", "channels", "batch", "K", "L", "hole"]


def summarize(df):
    """Per setting and layer: n, mean, std, median, quartiles, min (seconds)."""
    keys = [k for k in _KEYS + ["dataset", "group"] if k in df.columns] + ["layer"]
    g = df.groupby(keys, sort=False)["seconds"]
    out = g.agg(n="count", mean="mean", std="std", median="median", q25=lambda s: s.quantile(0.25),
                q75=lambda s: s.quantile(0.75), min="min").reset_index()
    return out


def paper_table():
    """:data:`PAPER_TABLE2` as a DataFrame with the ratio MisConv / conv of the means."""
    import pandas as pd

    df = pd.DataFrame(PAPER_TABLE2, columns=["size", "hole", "batch", "paper_conv_mean", "paper_conv_std",
                                             "paper_misconv_mean", "paper_misconv_std"])
    df["paper_ratio"] = df.paper_misconv_mean / df.paper_conv_mean
    return df


def ratio_table(df, *, misconv: str = "misconv"):
    """One row per setting: conv and MisConv (``misconv`` layer) mean ± std and median, the
    ratio of medians and the median of per-round ratios, the floor ``(L+2)·K``, the target
    ``1.25·(L+2)·K`` and, where the setting is the paper's, the paper's figures and ratio.

    Ratios compare the two layers of the same interleaved group.
    """
    import pandas as pd

    keys = [k for k in _KEYS if k in df.columns]
    group = "eager" if misconv == "misconv_eager" else "fast"
    sub = df[(df.layer.isin(["conv", misconv])) & ((df.group == group) if "group" in df.columns else True)]
    rows = []
    for key, d in sub.groupby(keys, sort=False):
        setting = dict(zip(keys, key))
        c = d[d.layer == "conv"].set_index("round").seconds
        m = d[d.layer == misconv].set_index("round").seconds
        if c.empty or m.empty:
            continue
        both = c.index.intersection(m.index)
        per_round = (m[both] / c[both]).median() if len(both) else math.nan
        floor = (setting.get("L", 4) + 2) * setting.get("K", 1)
        rows.append({**setting, "conv_mean": c.mean(), "conv_std": c.std(), "conv_median": c.median(),
                     "misconv_mean": m.mean(), "misconv_std": m.std(), "misconv_median": m.median(),
                     "ratio": m.median() / c.median(), "ratio_per_round": per_round,
                     "floor": floor, "target": 1.25 * floor})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    paper = paper_table()
    merged = out.merge(paper.drop(columns=["hole"]), on=["size", "batch"], how="left")
    standard = (merged.K == 1) & (merged.L == 4) & (merged.hole == merged["size"] // 2)
    for col in paper.columns.drop(["size", "hole", "batch"]):
        merged.loc[~standard, col] = math.nan
    return merged


def format_table(table, *, unit: str = "ms") -> str:
    """A text table of :func:`ratio_table` (times in ms, ratios), the paper's columns beside ours."""
    scale = {"ms": 1e3, "s": 1.0, "us": 1e6}[unit]
    head = (f"{'I':>3} {'C':>2} {'B':>3} {'K':>2} {'L':>3} | {'conv ' + unit:>17} | {'MisConv ' + unit:>17} | "
            f"{'ratio':>6} {'target':>6} | {'paper conv ms':>15} {'paper MisConv ms':>16} {'paper ratio':>11}")
    lines = [head, "-" * len(head)]
    for r in table.itertuples():
        paper = (f"{r.paper_conv_mean * 1e3:7.2f}±{r.paper_conv_std * 1e3:5.2f}  {r.paper_misconv_mean * 1e3:8.2f}±"
                 f"{r.paper_misconv_std * 1e3:5.2f}  {r.paper_ratio:11.2f}") if not math.isnan(getattr(r, "paper_ratio", math.nan)) else ""
        lines.append(f"{r.size:>3} {r.channels:>2} {r.batch:>3} {r.K:>2} {r.L:>3} | "
                     f"{r.conv_mean * scale:8.3f}±{r.conv_std * scale:7.3f} | {r.misconv_mean * scale:8.3f}±{r.misconv_std * scale:7.3f} | "
                     f"{r.ratio:6.2f} {r.target:6.2f} | {paper}")
    lines.append("(mean ± std per call; ratio = median MisConv / median conv over interleaved rounds; "
                 "target = 1.25·(L+2)·K)")
    return "\n".join(lines)


def markdown_ratios(df) -> str:
    """A markdown table of a measured grid (the rows of :func:`forward_grid` / :func:`backward_grid`,
    as written to ``forward.csv`` or ``timings.csv``): per setting, the medians in ms of conv2d+ReLU
    and of MisConv's fast and eager paths, their ratios to conv2d+ReLU, forward + backward's ratio
    when measured, and the paper's ratio."""
    fwd = df[df.study == "forward"] if "study" in df.columns else df
    fast = ratio_table(fwd).set_index(["size", "channels", "batch", "K", "L"])
    eager = (ratio_table(fwd, misconv="misconv_eager").set_index(fast.index.names)
             if "misconv_eager" in set(fwd.layer) else None)
    bwd = (ratio_table(df[df.study == "backward"]).set_index(fast.index.names)
           if "study" in df.columns and (df.study == "backward").any() else None)

    def cell(table, key, col, scale=1.0, fmt=".2f"):
        return format(table.loc[key, col] * scale, fmt) if table is not None and key in table.index else "–"

    lines = ["| I | C | B | conv2d+ReLU | MisConv fast | MisConv eager | fast / conv | eager / conv | "
             "fwd+bwd fast / conv | paper (GPU) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in fast.iterrows():
        paper = "–" if math.isnan(r.paper_ratio) else f"{r.paper_ratio:.2f}"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r.conv_median * 1e3:.3f} | {r.misconv_median * 1e3:.3f} | "
                     f"{cell(eager, key, 'misconv_median', 1e3, '.3f')} | **{r.ratio:.2f}** | {cell(eager, key, 'ratio')} | "
                     f"{cell(bwd, key, 'ratio')} | {paper} |")
    return "\n".join(lines)


def boxplots(df, path: str | os.PathLike | None = None, *, layers: Sequence[str] = ("conv", "misconv"), title: str | None = None):
    """Figure-2-style box plots: seconds per forward pass by batch size, one panel per image size,
    one box per layer (log scale). Saved to ``path`` when given; returns the seaborn FacetGrid."""
    import matplotlib

    matplotlib.use("Agg") if "matplotlib.pyplot" not in sys.modules else None
    import seaborn as sns

    d = df[df.layer.isin(layers)].copy()
    d["milliseconds"] = d.seconds * 1e3
    grid = sns.catplot(data=d, x="batch", y="milliseconds", hue="layer", col="size", kind="box", sharey=False,
                       height=3.2, aspect=0.9, fliersize=1.5, log_scale=True)
    grid.set_axis_labels("batch size", "ms per forward pass")
    if title:
        grid.figure.suptitle(title, y=1.03)
    if path is not None:
        from labkit.studies.engine import write_files

        kind = Path(path).suffix.lstrip(".") or "png"
        write_files({Path(path): lambda tmp: grid.figure.savefig(tmp, format=kind, dpi=120, bbox_inches="tight")})
    return grid


# ------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m labkit.studies.timing``: the forward grid (and optional studies) with the tables printed.

    Options: ``--profile`` (quick/cpu/paper: the ``04_timing`` section gives repeats, sizes,
    batch sizes), ``--repeats``, ``--sizes``, ``--batch-sizes``, ``--eager-repeats`` (0: skip
    the eager path), ``--backward``, ``--Ks``, ``--Ls``, ``--threads``, ``--device``,
    ``--no-tune-malloc``, ``--out DIR`` (write forward.csv and the text table there, as one set:
    :func:`labkit.studies.engine.write_files`); ``--markdown-from CSV`` reads a grid written
    earlier whole, refusing (exit status 1, naming the file) one cut short or malformed.
    """
    p = argparse.ArgumentParser(prog="python -m labkit.studies.timing", description=main.__doc__.splitlines()[0])
    p.add_argument("--profile", default="quick")
    p.add_argument("--repeats", type=int)
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--eager-repeats", type=int, default=0)
    p.add_argument("--backward", action="store_true")
    p.add_argument("--Ks", type=int, nargs="+")
    p.add_argument("--Ls", type=int, nargs="+")
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default=None)
    p.add_argument("--no-tune-malloc", action="store_true")
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto")
    p.add_argument("--out", default=None)
    p.add_argument("--markdown-from", default=None, metavar="CSV",
                   help="measure nothing: print the markdown table of a grid written earlier (forward.csv or timings.csv)")
    args = p.parse_args(argv)
    if args.markdown_from:

        try:       # a grid file cut short would give a table missing settings, silently
            grid = read_whole_csv(args.markdown_from, required=("size", "batch", "layer", "seconds"))
        except TableFileError as exc:
            print(f"[timing] {exc}", file=sys.stderr, flush=True)
            return 1
        print(markdown_ratios(grid))
        return 0

    # the CLI reads the lab's profiles; a local import: labkit.lab sits above the studies
    from labkit.lab.profiles import load_profile

    params = load_profile(args.profile, "04_timing")
    repeats = args.repeats or int(params.get("repeats", 20))
    sizes = args.sizes or list(params.get("sizes", [28, 32, 64]))
    batches = args.batch_sizes or list(params.get("batch_sizes", [16, 32, 64]))
    device = args.device or params.get("device")
    threads = args.threads if args.threads is not None else int(params.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    if not args.no_tune_malloc:
        tune_malloc()
    layers = ["conv", "misconv"] + (["misconv_eager"] if args.eager_repeats > 0 else [])
    cases = grid_cases(sizes, batches)
    print("machine:", machine_description(device), flush=True)
    fwd = forward_grid(cases, repeats, layers=layers, eager_repeats=args.eager_repeats, device=device, progress=True,
                       clock=args.clock)
    table = ratio_table(fwd)
    print("\nForward pass, conv2d+ReLU vs MisConv (fast path)\n" + format_table(table))
    if args.eager_repeats > 0:
        print("\nForward pass, conv2d+ReLU vs MisConv (eager path)\n" + format_table(ratio_table(fwd, misconv="misconv_eager")))
    frames = [fwd]
    if args.backward:
        bwd = backward_grid(cases, max(1, repeats // 2), device=device, progress=True, clock=args.clock)
        print("\nForward + backward\n" + format_table(ratio_table(bwd)))
        frames.append(bwd)
    if args.Ks or args.Ls:
        comp = component_sweep(sizes[0], batches[0], repeats, Ks=args.Ks or [1], Ls=args.Ls or [4], device=device,
                               progress=True, clock=args.clock)
        print(f"\nComponents (I={sizes[0]}, B={batches[0]})\n" + format_table(ratio_table(comp)))
        frames.append(comp)
    print("\nmisconv compile seconds:", compile_report())
    if args.out:
        import pandas as pd

        from labkit.studies.engine import write_files

        out = Path(args.out)
        # the measurements and their table as one set: interrupted, the folder keeps the old pair
        write_files({out / ("forward.csv" if len(frames) == 1 else "timings.csv"): pd.concat(frames).to_csv(index=False),
                     out / "table.txt": format_table(table) + "\n"})
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
