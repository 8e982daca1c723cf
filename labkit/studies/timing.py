r"""Timing study: what MisConv costs next to a plain conv2d + ReLU.

Reproduces supplementary Table 2 of *MisConv: Convolutional Neural Networks for Missing Data*,
Przewięźlikowski, Śmieja, Struski, Tabor, WACV 2022, https://arxiv.org/abs/2110.14010.

The paper (supplementary Table 2, Figure 2) timed one forward pass of a classic convolution and of
MisConv on a GPU: 32 filters 3x3, K = 1, L = 4, images of 28 (1 channel), 32 and 64 pixels
(3 channels) with a missing square of side I/2, batches of 16, 32 and 64, 5000 measurements per
setting. :data:`PAPER_TABLE2` holds its figures. This study measures the same grid and more
(the backward pass, K and L, the cost end to end per image).

The study of a :class:`~labkit.studies.configs.TimingConfig` (notebook 04):

- :func:`run`           measures the config's grids, writes their rows to :func:`results_path`;
- :func:`write_report`  the tables, figures and summary beside them (and a marked block of a doc).

The pieces: :mod:`labkit.studies.timing_measure` (settings, inputs, interleaved measurements, the
grids) and :mod:`labkit.studies.timing_report` (ratios against the paper, summaries, plots); their
public names are re-exported here. ``python -m labkit.studies.timing --profile quick`` prints the
forward table (see :func:`main`).

On this project's CPU machine glibc returns freed large buffers to the OS and every new tensor
pays page faults (about 2.5 µs per 4 KiB page): a 28x28 conv+ReLU then takes 1.9 ms instead of
0.2 ms. :func:`tune_malloc` (``mallopt``: no mmap, no trimming) makes freed memory reusable, the
way PyTorch's CUDA caching allocator does on a GPU; the studies call it unless told not to, and
:func:`machine_description` records whether it is on.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from labkit import checkpoint, misconv, paths
from labkit.device import resolve_device
from labkit.studies.configs import TimingConfig
from labkit.studies.reporting import replace_marked_block
from labkit.studies.store import write_files, write_table, write_text
from labkit.studies.timing_measure import (E2E_DATASETS, LAYERS, Case, backward_grid, channels_for,
                                           component_sweep, end_to_end, end_to_end_fns, forward_grid, grid_cases,
                                           interleaved, make_inputs)
from labkit.studies.timing_report import (PAPER_TABLE2, boxplots, components_figure, format_table, markdown_ratios,
                                          paper_table, per_image_table, ratio_table, report_tables, summarize,
                                          summary_lines)

__all__ = [
    # the study
    "measured_layers",
    "prepare",
    "results_path",
    "run",
    "write_report",
    "main",
    # the machine
    "tune_malloc",
    "malloc_tuned",
    "machine_description",
    # re-exported from timing_measure and timing_report
    "E2E_DATASETS",
    "LAYERS",
    "PAPER_TABLE2",
    "Case",
    "backward_grid",
    "boxplots",
    "channels_for",
    "component_sweep",
    "components_figure",
    "end_to_end",
    "end_to_end_fns",
    "format_table",
    "forward_grid",
    "grid_cases",
    "interleaved",
    "make_inputs",
    "markdown_ratios",
    "paper_table",
    "per_image_table",
    "ratio_table",
    "report_tables",
    "summarize",
    "summary_lines",
]


# ------------------------------------------------------------------------------------- machine
_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``: M_MMAP_MAX = 0, M_TRIM_THRESHOLD and
    M_TOP_PAD large), so new tensors reuse pages instead of faulting fresh ones. Returns whether it
    applied (False off glibc). Irreversible for the process; harmless apart from a larger RSS."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
        ok &= libc.mallopt(M_TOP_PAD, 64 << 20) == 1
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` has been applied in this process."""
    return _MALLOC_TUNED


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device=None) -> dict[str, Any]:
    """Where figures come from: CPU model and cores, GPU, torch version, threads, load average,
    whether MisConv may use torch.compile and whether :func:`tune_malloc` is on."""
    from labkit import misconv

    dev = resolve_device(device)
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "",
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15": tuple(round(v, 2) for v in load),
        "misconv_compile": misconv.compile_enabled(),
        "malloc_tuned": malloc_tuned(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ------------------------------------------------------------------------------------- the study
def results_path(cfg: TimingConfig) -> Path:
    """Where the study's rows and tables go: ``cfg.results_dir``, else ``results/timing/<profile>``."""
    return Path(cfg.results_dir) if cfg.results_dir else paths.results_dir("timing", cfg.profile)


def measured_layers(cfg: TimingConfig) -> list[str]:
    """The layers of the forward grid: conv and MisConv's fast path, its eager path when
    ``cfg.eager_repeats`` > 0."""
    return ["conv", "misconv"] + (["misconv_eager"] if cfg.eager_repeats else [])


def prepare(cfg: TimingConfig) -> torch.device:
    """Set up the process for ``cfg``'s measurements: torch's intra-op threads (``cfg.threads``,
    0: left as they are) and :func:`tune_malloc` (``cfg.tune_malloc``). Returns the device."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.tune_malloc:
        tune_malloc()
    return resolve_device(cfg.device)


def run(cfg: TimingConfig, *, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Measure the grids of ``cfg`` and write their rows to :func:`results_path` as CSVs.

    Returns the rows by grid, one DataFrame each (one row per call, columns of
    :mod:`labkit.studies.timing_measure`): ``forward`` (:func:`forward_grid` over ``sizes`` x
    ``batch_sizes``, the eager path with ``eager_repeats``), and as the config asks ``backward``
    (:func:`backward_grid`, ``repeats // 2`` rounds), ``components`` (:func:`component_sweep` at
    ``component_cell``), ``end_to_end`` (:func:`end_to_end`); plus ``machine``, one row of
    :func:`machine_description` (with ``summary``, :func:`labkit.checkpoint.machine_description`),
    also written to ``machine.json``. Each grid's CSV is written when that grid is done, so a run
    stopped halfway keeps the grids it finished.
    """
    dev = prepare(cfg)
    out = results_path(cfg)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description(dev) | {"summary": checkpoint.machine_description()}
    write_text(out / "machine.json", json.dumps(machine, indent=1))
    if progress:
        print(f"machine: {machine['summary']}; {machine['torch_threads']} torch thread(s); load average "
              f"{machine['load_average_1_5_15']}; malloc tuned: {machine['malloc_tuned']}; results go to {out}",
              flush=True)
    results: dict[str, pd.DataFrame] = {"machine": pd.DataFrame([machine])}

    def keep(name: str, rows: pd.DataFrame) -> None:
        write_table(rows, out / f"{name}.csv", index=False)
        results[name] = rows

    common = dict(device=dev, seed=cfg.seed, clock=cfg.clock, progress=progress)
    cases = grid_cases(cfg.sizes, cfg.batch_sizes)
    keep("forward", forward_grid(cases, cfg.repeats, layers=measured_layers(cfg), eager_repeats=cfg.eager_repeats,
                                 **common))
    if cfg.backward:
        keep("backward", backward_grid(cases, max(1, cfg.repeats // 2), **common))
    if cfg.Ks and cfg.Ls:
        size, batch = cfg.component_cell
        keep("components", component_sweep(size, batch, cfg.repeats, Ks=cfg.Ks, Ls=cfg.Ls, **common))
    if cfg.end_to_end_datasets:
        keep("end_to_end", end_to_end(cfg.end_to_end_datasets, cfg.end_to_end_batch, cfg.end_to_end_repeats,
                                      **common))
    return results


def write_report(cfg: TimingConfig, results: dict[str, pd.DataFrame], *, doc: str | os.PathLike | None = None,
                 marker: str | None = None) -> list[Path]:
    """The tables and figures of a :func:`run` beside its rows; returns the files written.

    CSVs of :func:`report_tables` (``forward_summary``, ``forward_ratios``, ``forward_ratios_eager``,
    ``backward_ratios``, ``components_ratios``, ``end_to_end_summary``, those measured),
    ``forward_boxplots.png``, ``components.png`` and ``summary.md`` (:func:`summary_lines`).
    With ``doc`` (a Markdown file), the block ``marker`` in it gets :func:`markdown_ratios` of the
    forward and backward rows (default marker: ``timing-cuda`` for a run on CUDA, else ``timing-cpu``;
    ``ValueError`` when the doc lacks the block's markers).
    """
    out = results_path(cfg)
    tables = report_tables(results)
    forward = results["forward"]
    clock = str(forward["clock"].iloc[0])
    machine = results["machine"].iloc[0] if "machine" in results else {}
    threads = machine.get("torch_threads", torch.get_num_threads())
    written = [write_table(t, out / f"{name}.csv", index=(name == "end_to_end_summary"))
               for name, t in tables.items()]
    layers = [n for n in LAYERS if n in set(forward.layer)]
    grid = boxplots(forward, out / "forward_boxplots.png", layers=layers,
                    title=f"One forward pass ({clock} time, {threads} thread(s))")
    import matplotlib.pyplot as plt   # after boxplots: it picks the backend when pyplot is not loaded yet

    plt.close(grid.figure)
    written.append(out / "forward_boxplots.png")
    if "components_ratios" in tables:
        size, batch = (int(results["components"][k].iloc[0]) for k in ("size", "batch"))
        fig = components_figure(tables["components_ratios"], size=size, batch=batch)
        written += write_files({out / "components.png": lambda tmp: fig.savefig(tmp, format="png", dpi=120)})
        plt.close(fig)
    lines = summary_lines(tables, misconv.compile_report(), clock=clock)
    written.append(write_text(out / "summary.md", "\n".join(lines) + "\n"))
    if doc is not None:
        if marker is None:
            marker = "timing-cuda" if str(machine.get("device", "")).startswith("cuda") else "timing-cpu"
        grids = [results[k] for k in ("forward", "backward") if results.get(k) is not None]
        if replace_marked_block(doc, marker, markdown_ratios(pd.concat(grids))):
            written.append(Path(doc))
    return written


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
        from labkit.checkpoint import TableFileError, read_whole_csv

        try:       # a grid file cut short would give a table missing settings, silently
            grid = read_whole_csv(args.markdown_from, required=("size", "batch", "layer", "seconds"))
        except TableFileError as exc:
            print(f"[timing] {exc}", file=sys.stderr, flush=True)
            return 1
        print(markdown_ratios(grid))
        return 0

    try:
        from labkit.lab.profiles import load_profile
    except ImportError:  # before labkit/lab/ existed
        from labkit.profiles import load_profile

    params = load_profile(args.profile, "04_timing")
    # the profile's settings checked by the study's config, whose defaults fill in the rest
    cfg = TimingConfig.build(None, {k: v for k, v in params.items() if k in TimingConfig.names()},
                             origin=f"profile {args.profile}")
    repeats = args.repeats or cfg.repeats
    sizes = args.sizes or cfg.sizes
    batches = args.batch_sizes or cfg.batch_sizes
    device = args.device or cfg.device
    threads = args.threads if args.threads is not None else cfg.threads
    prepare(cfg.replace(threads=threads, tune_malloc=not args.no_tune_malloc))
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
    print("\nmisconv compile seconds:", misconv.compile_report())
    if args.out:
        out = Path(args.out)
        # the measurements and their table as one set: interrupted, the folder keeps the old pair
        write_files({out / ("forward.csv" if len(frames) == 1 else "timings.csv"): pd.concat(frames).to_csv(index=False),
                     out / "table.txt": format_table(table) + "\n"})
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
