"""Benchmark: MisConv2d (fast and eager paths) against conv2d + ReLU on the paper's grid.

Prints, per setting (images of 28/32/64 px with 1/3/3 channels, a missing square of side I/2,
batches of 16/32/64, 32 filters 3x3, K = 1, L = 4), the median time of one forward pass of
conv2d + ReLU, of MisConv's fast path and of its eager path, each MisConv measured interleaved
with conv2d + ReLU in the same process; the ratios; the target 1.25·(L+2)·K and the paper's GPU
ratios. Then the same for K > 1 and L in {1, 2, 4, 8, 16}. Figures, not a test: nothing asserts.

    .venv/bin/python benchmarks/bench_misconv.py [--repeats 40] [--eager-repeats 5] [--threads 1]
                                                 [--clock auto|cpu|wall] [--out results/timing/cpu]

On a CPU the default clock is the CPU time of the computing thread (see labkit.studies.timing.interleaved):
this machine is shared, and elapsed time would mostly measure the other jobs. The load average
is recorded with the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from labkit import misconv
from labkit.machine import machine_summary
from labkit.studies import timing
from labkit.studies.configs import TimingConfig


def _lines(title: str, fast: pd.DataFrame, eager: pd.DataFrame | None) -> list[str]:
    head = (f"{'I':>3} {'C':>2} {'B':>3} {'K':>2} {'L':>3} | {'conv ms':>8} {'fast ms':>8} {'eager ms':>9} | "
            f"{'fast/conv':>9} {'eager/conv':>10} {'target':>6} {'paper':>6} | {'fast<=target':>12} {'fast<=paper':>11}")
    out = [title, head, "-" * len(head)]
    e = eager.set_index(["size", "batch", "K", "L"]) if eager is not None and len(eager) else None
    for r in fast.itertuples():
        er = e.loc[(r.size, r.batch, r.K, r.L)] if e is not None and (r.size, r.batch, r.K, r.L) in e.index else None
        eager_ms = f"{er.misconv_median * 1e3:9.3f}" if er is not None else f"{'-':>9}"
        eager_ratio = f"{er.ratio:10.2f}" if er is not None else f"{'-':>10}"
        paper = r.paper_ratio if not pd.isna(r.paper_ratio) else float("nan")
        out.append(f"{r.size:>3} {r.channels:>2} {r.batch:>3} {r.K:>2} {r.L:>3} | {r.conv_median * 1e3:8.3f} "
                   f"{r.misconv_median * 1e3:8.3f} {eager_ms} | {r.ratio:9.2f} {eager_ratio} {r.target:6.2f} "
                   f"{paper:6.2f} | {str(bool(r.ratio <= r.target)):>12} "
                   f"{(str(bool(r.ratio <= paper)) if paper == paper else '-'):>11}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=40, help="interleaved rounds per setting (fast path)")
    p.add_argument("--eager-repeats", type=int, default=5, help="rounds for the eager path (0: skip)")
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 32, 64])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--Ks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--Ls", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--sweep-cell", type=int, nargs=2, default=[28, 32], metavar=("SIZE", "BATCH"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--no-tune-malloc", action="store_true")
    p.add_argument("--backward-repeats", type=int, default=0, help="also time forward+backward on the grid (0: skip)")
    p.add_argument("--end-to-end", nargs="*", default=[], metavar="DATASET",
                   help="also time DMFA + MisConv classifier vs classifier per image (mnist svhn celeba)")
    p.add_argument("--e2e-batch", type=int, default=32)
    p.add_argument("--e2e-repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="folder for bench_*.csv and bench.txt (default: print only)")
    args = p.parse_args(argv)

    # the flags as the timing study's settings (checked there); the grids are the study's functions
    cfg = TimingConfig.build(None, dict(repeats=args.repeats, eager_repeats=args.eager_repeats, sizes=args.sizes,
                                        batch_sizes=args.batch_sizes, Ks=args.Ks, Ls=args.Ls,
                                        component_cell=args.sweep_cell, threads=args.threads, clock=args.clock,
                                        device=args.device or "auto", tune_malloc=not args.no_tune_malloc,
                                        end_to_end_datasets=args.end_to_end, end_to_end_batch=args.e2e_batch,
                                        end_to_end_repeats=args.e2e_repeats), origin="bench_misconv.py's flags")
    device = timing.prepare(cfg)
    t0 = time.time()
    machine = timing.machine_description(device) | {"summary": machine_summary()}
    print("machine:", json.dumps(machine), flush=True)
    layers = timing.measured_layers(cfg)
    common = dict(device=device, clock=cfg.clock, progress=True)

    grid = timing.forward_grid(timing.grid_cases(cfg.sizes, cfg.batch_sizes), cfg.repeats, layers=layers,
                               eager_repeats=cfg.eager_repeats, **common)
    size, batch = cfg.component_cell
    comp = timing.component_sweep(size, batch, cfg.repeats, Ks=cfg.Ks, Ls=cfg.Ls, layers=layers,
                                  eager_repeats=cfg.eager_repeats, **common)
    clock = grid["clock"].iloc[0]
    text = [f"MisConv2d vs conv2d+ReLU, one forward pass, medians over interleaved rounds ({clock} time, "
            f"{args.threads} thread(s); fast: {args.repeats} rounds, eager: {args.eager_repeats})",
            f"machine: {machine['summary']}; load average before: {machine['load_average_1_5_15']}; "
            f"malloc tuned: {machine['malloc_tuned']}; compile: {machine['misconv_compile']}", ""]
    eager = timing.ratio_table(grid, misconv="misconv_eager") if args.eager_repeats > 0 else None
    text += _lines("Paper grid (K=1, L=4)", timing.ratio_table(grid), eager)
    text.append("")
    eager_c = timing.ratio_table(comp, misconv="misconv_eager") if args.eager_repeats > 0 else None
    text += _lines(f"Components (I={size}, C={timing.channels_for(size)}, B={batch})", timing.ratio_table(comp), eager_c)
    extra = {}
    if args.backward_repeats > 0:
        bwd = timing.backward_grid(timing.grid_cases(cfg.sizes, cfg.batch_sizes), args.backward_repeats, **common)
        extra["backward.csv"] = bwd
        text += ["", f"Forward + backward (weight and bias gradients), {args.backward_repeats} rounds",
                 timing.format_table(timing.ratio_table(bwd))]
    if args.end_to_end:
        e2e = timing.end_to_end(cfg.end_to_end_datasets, cfg.end_to_end_batch, cfg.end_to_end_repeats, **common)
        extra["end_to_end.csv"] = e2e
        per = timing.per_image_table(e2e).rename(columns={"DMFA share of the method": "DMFA share"})
        text += ["", f"End to end, eval mode, no gradients, batch {args.e2e_batch}, {args.e2e_repeats} rounds: "
                 "ms per image (medians)", per.round(3).to_string()]
    load_after = timing.machine_description(device)["load_average_1_5_15"]
    text += ["", f"load average after: {load_after}; wall time of the benchmark: {time.time() - t0:.0f} s",
             "compile seconds (first call of each fused kernel): "
             + ", ".join(f"{k}={v:.1f}" if v is not None else f"{k}=failed" for k, v in misconv.compile_report().items())]
    report = "\n".join(text)
    print("\n" + report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        grid.to_csv(out / "bench_forward.csv", index=False)
        comp.to_csv(out / "bench_components.csv", index=False)
        pd.concat([timing.ratio_table(grid).assign(path="fast"), timing.ratio_table(comp).assign(path="fast")]
                  + ([eager.assign(path="eager"), eager_c.assign(path="eager")] if eager is not None else [])
                  ).to_csv(out / "bench_ratios.csv", index=False)
        for name, frame in extra.items():
            frame.to_csv(out / name, index=False)
        (out / "bench.txt").write_text(report + "\n")
        (out / "bench_machine.json").write_text(json.dumps(machine | {"load_average_after": load_after}, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
