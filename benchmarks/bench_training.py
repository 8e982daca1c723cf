"""Benchmark: training throughput (images/s) of the lab's networks in each precision.

One training step = forward + backward + optimizer step on a batch (default 64) of synthetic data
of the right shape, for:

- ``dmfa_mnist``: the linear-heads DMFA (1x28x28, K=1, L=4), Adam; MFA NLL + MSE of the mean;
- ``dmfa_cifar10``: the fully convolutional DMFA (3x32x32, K=1, L=4);
- ``clf_mnist_zero`` / ``clf_mnist_misconv``, ``clf_cifar10_zero`` / ``clf_cifar10_misconv``:
  the classifiers with a zero-filling front and with the MisConv front (fed random per-image MFA
  parameters, K=1, L=4), cross-entropy;
- ``wae_mnist``: the WAE-GAN (zero front): ``labkit.models.wae.train_step`` (a discriminator step
  and an autoencoder step);
- ``acflow_mnist``: ACFlow (default size), NLL of the missing pixels, gradient clipping.

Each in every precision the device has (``32``, ``bf16-mixed``, and ``16-mixed`` on CUDA), and in
the channels-last memory format as well. Mixed precision is applied as the trainers apply it:
the network's forward pass under ``labkit.precision.autocast``, its outputs cast to float32, the
loss (the MFA likelihood, MisConv's expected ReLU) and backward in float32 outside autocast.

All configurations are timed **interleaved in one process**: each round runs one step of every
configuration in a rotating order, so a slow phase of a shared machine hits them all alike; the
median over rounds is reported. Prints a table (speed-up over float32 in the default layout) and
writes ``results/timing/<device kind>/training.csv`` with the machine, torch version, threads,
clock and date.

    .venv/bin/python benchmarks/bench_training.py [--threads 2] [--rounds 7] [--batch 64]
        [--models dmfa_cifar10 ...] [--device cuda] [--clock wall|cpu] [--quick] [--out FILE]

``--quick``: batch 16, 2 rounds, 1 warm-up step, nothing written unless ``--out`` is given.
``--clock cpu`` times the process's CPU time and reports ``images/s = batch·threads / CPU s``
(the throughput of an idle machine when all threads compute; robust against other jobs).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from labkit import precision as P
from labkit.device import resolve_device
from labkit.machine import machine_summary, tune_malloc
from labkit.masks import make_masks
from labkit.mfa import MFA
from labkit.models.acflow import ACFlow
from labkit.models.classifier import build_classifier
from labkit.models.dmfa import build_dmfa
from labkit.models.dmfa_training import dmfa_loss
from labkit.models.wae import WAE
from labkit.models.wae_training import make_optimizers, train_step

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("dmfa_mnist", "dmfa_cifar10", "clf_mnist_zero", "clf_mnist_misconv", "clf_cifar10_zero",
          "clf_cifar10_misconv", "wae_mnist", "acflow_mnist")
#: minimum speed-up of the best mixed-precision configuration over float32
TARGETS = {"dmfa_cifar10": 1.5}
DEFAULT_TARGET = 1.3
K, L = 1, 4


# ------------------------------------------------------------------------------------ data
def _images(batch: int, shape: tuple[int, int, int], device, channels_last: bool, seed: int):
    """Random images in [0, 1] ``(B, C, H, W)`` and a missing square of side H/2 per image (bool ``(B, 1, H, W)``)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    x = torch.rand(batch, c, h, w, generator=g).to(device)
    missing = make_masks("square", batch, h, w, generator=g, side=h // 2).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, missing


def random_mfa(batch: int, shape: tuple[int, int, int], device, seed: int) -> MFA:
    """Per-image MFA parameters of the right shapes (K=1, L=4), float32, as MisConv's ``aux``."""
    g = torch.Generator().manual_seed(seed + 1)
    c, h, w = shape
    fields = (torch.ones(batch, K), torch.rand(batch, K, c, h, w, generator=g),
              0.1 * torch.randn(batch, K, L, c, h, w, generator=g),
              0.02 + 0.05 * torch.rand(batch, K, c, h, w, generator=g))
    return MFA(*(t.to(device) for t in fields), validate=False)


def _prepare(model: nn.Module, device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def _adam(model: nn.Module, device, lr: float = 1e-4, params=None) -> torch.optim.Adam:
    fused = device.type in ("cpu", "cuda")  # as train_dmfa: one kernel for all parameters
    return torch.optim.Adam(model.parameters() if params is None else params, lr=lr, fused=fused or None)


def _update(loss, optimizer, scaler, clip: tuple[nn.Module, float] | None = None) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(clip[0].parameters(), clip[1])
    scaler.step(optimizer)
    scaler.update()


# ------------------------------------------------------------------------------------ one step per model
def make_step(model_name: str, precision: str, channels_last: bool, batch: int, device, seed: int = 0
              ) -> Callable[[], float]:
    """A closure running one training step of ``model_name``; returns the loss (a Python float)."""
    torch.manual_seed(seed)
    scaler = P.grad_scaler(precision, device)
    autocast = lambda: P.autocast(precision, device)  # noqa: E731

    if model_name.startswith("dmfa_"):
        net = _prepare(build_dmfa(model_name.split("_", 1)[1]), device, channels_last)
        opt = _adam(net, device)
        x, missing = _images(batch, tuple(net.image_shape), device, channels_last, seed)

        def step():
            with autocast():
                mfa = net(x, missing)
            # the MFA's parameters back to float32: the Woodbury/Cholesky likelihood stays float32
            loss, _ = dmfa_loss(P.to_float32(mfa), x, missing, mse_weight=1.0)
            _update(loss, opt, scaler)
            return loss.detach()

        return step

    if model_name.startswith("clf_"):
        _, arch, front = model_name.split("_")
        shape = (1, 28, 28) if arch == "mnist" else (3, 32, 32)
        net = _prepare(build_classifier(arch, "mfa_misconv" if front == "misconv" else "zero"), device,
                       channels_last)
        opt = _adam(net, device, lr=1e-3)
        x, missing = _images(batch, shape, device, channels_last, seed)
        y = torch.randint(10, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)
        aux = random_mfa(batch, shape, device, seed) if front == "misconv" else None

        def step():
            with autocast():  # the MisConv front turns autocast off for itself: its expected ReLU stays float32
                logits = net(x, missing, aux)
            loss = F.cross_entropy(P.to_float32(logits), y)
            _update(loss, opt, scaler)
            return loss.detach()

        return step

    if model_name == "wae_mnist":
        # the library's step (labkit.models.wae.train_step, recipe "supplement": a discriminator
        # step, then an autoencoder step) with the study's MNIST architecture
        net = _prepare(WAE("zero", "mnist", device=device), device, channels_last)
        optimizers = make_optimizers(net)
        x, missing = _images(batch, (1, 28, 28), device, channels_last, seed)
        g = torch.Generator().manual_seed(seed)

        def step():
            return train_step(net, optimizers, x, missing, generator=g, precision=precision, scaler=scaler)["loss"]

        return step

    if model_name == "acflow_mnist":
        net = _prepare(ACFlow(1, 28, 28), device, channels_last)
        opt = _adam(net, device, lr=1e-3)
        x, missing = _images(batch, (1, 28, 28), device, channels_last, seed)
        n_missing = missing.expand_as(x).sum().clamp_min(1)
        g = torch.Generator().manual_seed(seed)

        def step():
            with autocast():
                lp = net.log_prob(x, missing, dequantize=True, generator=g)
            loss = -P.to_float32(lp).sum() / n_missing
            _update(loss, opt, scaler, clip=(net, 100.0))
            return loss.detach()

        return step

    raise ValueError(f"unknown model {model_name!r}; valid: {', '.join(MODELS)}")


# ------------------------------------------------------------------------------------ timing
def _clock(clock: str):
    return time.perf_counter if clock == "wall" else time.process_time


def measure(configs: dict[tuple[str, str, bool], Callable[[], object]], *, rounds: int, warmup: int, device,
            clock: str, progress: bool = True) -> dict[tuple[str, str, bool], list[float]]:
    """Seconds per step of every configuration, ``rounds`` interleaved measurements each."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    now = _clock(clock)
    losses = {}
    for key, step in configs.items():
        for _ in range(warmup):
            losses[key] = float(step())
        sync()
    bad = [k for k, v in losses.items() if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        raise FloatingPointError(f"non-finite losses in warm-up: {bad}")
    keys = list(configs)
    out: dict[tuple[str, str, bool], list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            sync()
            started = now()
            configs[key]()
            sync()
            out[key].append(now() - started)
        if progress:
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return out


def precisions_for(device) -> list[str]:
    """The precisions the device can train in: 32, bf16-mixed (if torch autocasts there), 16-mixed on CUDA."""
    out = ["32"]
    for name in ("bf16-mixed", "16-mixed"):
        try:
            P.resolve_precision(name, device)
        except ValueError:
            continue
        out.append(name)
    return out


def _tune_malloc() -> bool:
    try:
        return bool(tune_malloc())
    except (ImportError, AttributeError):
        return False


def table(rows: list[dict]) -> str:
    head = (f"{'model':<20} {'precision':<10} {'layout':<13} {'ms/step':>9} {'images/s':>9} {'speed-up':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<20} {r['precision']:<10} {r['layout']:<13} {r['median_ms']:9.1f} "
                     f"{r['images_per_s']:9.1f} {r['speedup_vs_fp32']:7.2f}x")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per model: the best float32 and best mixed-precision configurations and the target."""
    lines = [f"{'model':<20} {'fp32 img/s':>10} {'best mixed (layout)':>32} {'img/s':>8} {'speed-up':>8} "
             f"{'target':>6}  met"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = next(r for r in mine if r["precision"] == "32" and r["layout"] == "contiguous")
        mixed = [r for r in mine if r["precision"] != "32"]
        if not mixed:
            continue
        best = max(mixed, key=lambda r: r["images_per_s"])
        target = TARGETS.get(model, DEFAULT_TARGET)
        speed = best["images_per_s"] / base["images_per_s"]
        lines.append(f"{model:<20} {base['images_per_s']:10.1f} {best['precision'] + ' (' + best['layout'] + ')':>32} "
                     f"{best['images_per_s']:8.1f} {speed:7.2f}x {target:5.1f}x  {'yes' if speed >= target else 'NO'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7, help="interleaved measurements per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--precisions", nargs="+", default=None, help="default: all the device has")
    p.add_argument("--no-channels-last", action="store_true", help="skip the channels-last variants")
    p.add_argument("--device", default=None, help="default: CUDA if available, else the CPU")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 16, 2 rounds, 1 warm-up, no file")
    p.add_argument("--out", default=None, help="CSV path (default results/timing/<device kind>/training.csv)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.warmup = min(args.batch, 16), min(args.rounds, 2), 1
    for name in ("threads", "batch", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    tuned = _tune_malloc()
    precisions = args.precisions or precisions_for(device)
    for name in precisions:
        P.resolve_precision(name, device)  # a clear error for a precision the device lacks
    if "32" not in precisions:
        precisions = ["32", *precisions]  # the speed-ups need the float32 baseline
    layouts = [False] if args.no_channels_last else [False, True]
    configs = {}
    for model in args.models:
        for prec in precisions:
            for cl in layouts:
                configs[(model, prec, cl)] = make_step(model, prec, cl, args.batch, device)
    print(f"{len(configs)} configurations, batch {args.batch}, {args.threads} threads, {args.rounds} rounds, "
          f"device {device}, clock {args.clock}", flush=True)
    started = time.time()
    times = measure(configs, rounds=args.rounds, warmup=args.warmup, device=device, clock=args.clock)
    scale = args.threads if (args.clock == "cpu" and device.type == "cpu") else 1

    machine = machine_summary()
    try:
        load = ",".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = ""
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = []
    for (model, prec, cl), ts in times.items():
        med = statistics.median(ts)
        rows.append({"model": model, "precision": prec, "layout": "channels_last" if cl else "contiguous",
                     "batch": args.batch, "median_ms": 1e3 * med, "images_per_s": args.batch * scale / med,
                     "rounds": len(ts), "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts)})
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["precision"] == "32"
                    and b["layout"] == "contiguous")
        r["speedup_vs_fp32"] = base["median_ms"] / r["median_ms"]
        r.update(device=device.type, threads=args.threads, clock=args.clock, machine=machine,
                 torch=torch.__version__, date=date, load_average=load, malloc_tuned=tuned, quick=args.quick)

    print(f"\n{machine}; {args.threads} threads; load average {load}; {time.time() - started:.0f} s\n")
    print(table(rows))
    print()
    print(summary(rows))
    if args.out or not args.quick:
        import pandas as pd

        out = Path(args.out) if args.out else ROOT / "results" / "timing" / device.type / "training.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(out, index=False, float_format="%.4g")
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
