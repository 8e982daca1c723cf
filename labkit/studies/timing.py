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
public names are re-exported here. From the shell: ``./lab study timing --profile cpu`` (and
``--table-only`` to redo the tables of rows measured earlier, :func:`read_results`).

On this project's CPU machine glibc returns freed large buffers to the OS and every new tensor
pays page faults (about 2.5 µs per 4 KiB page): a 28x28 conv+ReLU then takes 1.9 ms instead of
0.2 ms. :func:`tune_malloc` (``mallopt``: no mmap, no trimming) makes freed memory reusable, the
way PyTorch's CUDA caching allocator does on a GPU; the studies call it unless told not to, and
:func:`labkit.machine.machine_description` records whether it is on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch

from labkit import misconv, paths
from labkit.checkpoint import read_whole_csv
from labkit.machine import machine_description, machine_summary, malloc_tuned, tune_malloc
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
    "read_results",
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
    :func:`labkit.machine.machine_description` (with ``summary``, :func:`labkit.machine.machine_summary`),
    also written to ``machine.json``. Each grid's CSV is written when that grid is done, so a run
    stopped halfway keeps the grids it finished.
    """
    dev = prepare(cfg)
    out = results_path(cfg)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description(dev) | {"summary": machine_summary()}
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


def read_results(cfg: TimingConfig) -> dict[str, pd.DataFrame]:
    """The rows a :func:`run` wrote to :func:`results_path` (``forward`` always, the other grids
    and ``machine`` where present), each read whole: a file cut short or malformed is refused,
    naming it (:class:`labkit.checkpoint.TableFileError`), never turned into a table missing settings."""
    out = results_path(cfg)
    required = ("size", "batch", "layer", "seconds")
    if not (out / "forward.csv").is_file():
        raise FileNotFoundError(f"{out / 'forward.csv'}: no timing results there; run ./lab study timing first")
    results = {"forward": read_whole_csv(out / "forward.csv", required=required)}
    for name in ("backward", "components", "end_to_end"):
        if (out / f"{name}.csv").is_file():
            results[name] = read_whole_csv(out / f"{name}.csv")
    if (out / "machine.json").is_file():
        results["machine"] = pd.DataFrame([json.loads((out / "machine.json").read_text(encoding="utf-8"))])
    return results
