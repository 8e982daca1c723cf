r"""The density study (notebook 01, ``./lab study dmfa``): DMFA, classical MFA and ACFlow scored on
the same test holes.

Reproduces the density comparison of *Estimating Conditional Density of Missing Values Using Deep
Gaussian Mixture Model*, Przewięźlikowski, Śmieja, Struski, ICONIP 2020,
https://arxiv.org/abs/2010.02183, as MisConv's DMFAs are evaluated.

One config describes the study (:class:`~labkit.studies.configs.DensityConfig`): the data, the
DMFA recipe (:func:`recipe_from`) and the grid of runs (``modes`` x ``missing_kinds`` x ``holes``
x ``seeds``). The entry points every study has:

- :func:`plan`: the cells of the grid (:func:`labkit.studies.density_sweep.plan_density_cells`);
- :func:`run`: every planned cell not yet recorded in ``results_path(cfg)/density.csv``;
- :func:`results_path`, :func:`result_store`, :func:`read_rows`: where the rows are, and those of some cells;
- :func:`write_report`: the density table beside the results and in a Markdown page's block;
- :data:`COST_GROUP`: the coordinate whose cells cost alike (a complete and an incomplete DMFA do not);

The parts, re-exported here: one run (:mod:`labkit.studies.density_experiment`:
:func:`run_experiment`, :func:`result_stem`, :func:`own_files`, :func:`redraw_figure`), the
checkpoints (:mod:`labkit.studies.density_checkpoints`: :func:`load_or_train_dmfa`,
:func:`load_or_fit_mfa`, :func:`config_checkpoint`), the baselines and speed
(:mod:`labkit.studies.density_baselines`), the table (:mod:`labkit.studies.density_report`) and the
figures (:mod:`labkit.studies.density_figures`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from labkit.device import resolve_device
from labkit.precision import resolve_precision
from labkit.studies.configs import DensityConfig
from labkit.studies.density_baselines import (acflow_checkpoint, measure_throughput, run_acflow_baseline,
                                              run_mfa_baseline, score_holes)
from labkit.studies.density_checkpoints import (checkpoint_megabytes, config_checkpoint, load_or_fit_mfa,
                                                load_or_train_dmfa)
from labkit.studies.density_experiment import (FilesBusy, csv_digest, own_files, recipe_from, redraw_figure,
                                               result_stem, results_path, run_experiment)
from labkit.studies.density_figures import plot_acflow_inpainting, plot_history, plot_inpainting
from labkit.studies.density_report import AUTHORS_DENSITY, density_table, table_markers, write_report
from labkit.studies.density_sweep import cell_arguments, density_store, plan_density_cells, run_density_sweep
from labkit.studies.engine import Cell

__all__ = [
    "COST_GROUP", "plan", "run", "run_baselines", "results_path", "result_store", "read_rows",
    "write_report",
    "AUTHORS_DENSITY", "FilesBusy", "acflow_checkpoint", "cell_arguments", "checkpoint_megabytes",
    "config_checkpoint", "csv_digest", "density_table", "load_or_fit_mfa", "load_or_train_dmfa",
    "measure_throughput", "own_files", "plot_acflow_inpainting", "plot_history", "plot_inpainting", "recipe_from",
    "redraw_figure", "result_stem", "run_acflow_baseline", "run_experiment", "run_mfa_baseline", "score_holes",
    "table_markers",
]

#: the study's rows in a results folder (``density.csv``, details in ``density_runs.jsonl``)
#: the coordinate whose cells cost alike, to estimate a plan's time: a complete-data DMFA and an
#: incomplete-data one train at other speeds, the seeds and holes of one mode at the same
COST_GROUP = "mode"
#: the study's rows in a results folder (``density.csv``, details in ``density_runs.jsonl``)
result_store = density_store


def plan(cfg: DensityConfig) -> list[Cell]:
    """The cells of the config's grid: per seed, hole and mode, one cell per missing kind of the
    incomplete mode and one complete cell (:func:`labkit.studies.density_sweep.plan_density_cells`)."""
    return plan_density_cells(cfg)


def run(cfg: DensityConfig, *, progress: bool = True, executor: Any = None, wait: bool = False,
        poll_seconds: float = 300.0, max_cells: int | None = None,
        on_record: Callable[[Any], None] | None = None, baselines: bool = True):
    """Run every planned cell not yet recorded in ``results_path(cfg)``; returns the rows of the
    planned cells (a DataFrame, :func:`read_rows`).

    The training precision is resolved once here, for ``cfg.device`` (``"auto"``: bf16-mixed where
    the device computes bf16 natively), and the grid runs with that config: its cells record it,
    every cell trains with it. ``executor``: where cells run (default here, one after another; see
    :func:`labkit.studies.executors.make_executor`). ``max_cells``: stop after this many ran or
    failed; ``wait``, ``poll_seconds``: as :func:`labkit.studies.engine.run_cells`. ``on_record``:
    called after each recorded cell with the rows of the planned cells so far.

    ``baselines``: then score the baselines on the same holes (:func:`run_baselines`: the classical
    MFA unless ``mfa_components`` is 0, a trained ACFlow when its checkpoint exists), as notebook 01 does.

    Raises :class:`labkit.studies.engine.SweepIncomplete` (a ``SweepFailed``) when cells failed or
    were left unfinished, after the others ran (the baselines then do not run).
    """
    cfg = cfg.replace(precision=resolve_precision(cfg.precision, resolve_device(cfg.device)))
    cells = plan(cfg)
    keys = [c.key for c in cells]

    def recorded(outcome) -> None:
        if outcome.status == "ran":
            on_record(_rows_of(cfg, keys))

    run_density_sweep(cfg, cells=cells, executor=executor, progress=progress, wait=wait, poll_seconds=poll_seconds,
                      max_cells=max_cells, on_outcome=recorded if on_record is not None else None)
    if baselines:
        run_baselines(cfg, progress=progress)
    return _rows_of(cfg, keys)


def run_baselines(cfg: DensityConfig, *, device: Any = None, progress: bool = True) -> list[dict]:
    """The density baselines on the config's holes at its first seed: the classical MFA
    (:func:`run_mfa_baseline`, loaded when fitted with these settings) unless ``mfa_components`` is
    0, and the trained ACFlow (:func:`run_acflow_baseline`) when ``acflow`` names an existing
    checkpoint; at a seed other than 0 their files carry ``_s<seed>`` (the committed ones are seed 0's).
    Returns their summaries (one per hole side each), each said in one line with ``progress``."""
    device = resolve_device(cfg.device if device is None else device)
    out = []
    if cfg.mfa_components > 0:
        out += run_mfa_baseline(cfg, device=device, progress=progress)
    path = acflow_checkpoint(cfg)
    if path is not None and path.is_file():
        out += run_acflow_baseline(cfg, device=device, progress=progress)
    for result in out:
        if progress:
            print(f"[dmfa] baseline {Path(result['paths']['csv']).stem}: test NLL {result['test_nll']:.2f}, "
                  f"SSE {result['test_sse']:.2f}", flush=True)
    return out


def read_rows(cfg: DensityConfig, cells: Sequence[Cell]):
    """The rows of ``cells`` recorded in ``results_path(cfg)`` (a DataFrame, one row per recorded cell)."""
    return _rows_of(cfg, [c.key for c in cells])


def _rows_of(cfg: DensityConfig, keys: Sequence[str]):
    rows = result_store(results_path(cfg)).read(report=False)
    return rows[rows["key"].isin(list(keys))].reset_index(drop=True)
