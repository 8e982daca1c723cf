r"""The classification study (notebook 02): every missing-data method on every mask kind, resumably.

Reproduces supplementary Table 1 of *MisConv: Convolutional Neural Networks for Missing Data*,
Przewięźlikowski, Śmieja, Struski, Tabor, WACV 2022, https://arxiv.org/abs/2110.14010.

One *cell* = (dataset, mask kind, method, seed): the paper's classifier
(:func:`labkit.models.classifier.build_classifier`) with the method's front
(:data:`labkit.studies.imputers.METHODS`) trained and tested on images that carry that kind of
missing data (:mod:`labkit.studies.cells`).

Protocol of one cell (dataset, mask, method, seed)
---------------------------------------------------
- Training images: the first ``n_train`` of the training split; a validation split
  (``val_fraction``, :func:`labkit.data.train_val_split` with seed 0) is carved out of them and
  used only to pick the epoch (best validation accuracy) and k-NN's ``k``; the classifier trains on
  the rest. Test: the first ``n_test`` test images, used only for the final number.
- Masks: one per image, fixed per (dataset, split, mask kind, seed) by a seeded generator
  (:func:`labkit.studies.cells.cell_masks`); training and test carry the same kind of missing data.
- ``x`` reaches the front with NaN at missing pixels (proves that nothing leaks through them).
- Adam, cross-entropy; :func:`labkit.training.fit` checkpoints every epoch, so an interrupted cell
  resumes mid-training; the checkpoint is deleted once the cell's row is written.

Sweep
-----
:func:`run_sweep` writes ``<results_dir>/accuracy.csv`` (columns ``ACCURACY_COLUMNS``) one row per
finished cell (write to a temporary file, then rename), skips cells already there, and adds a
JSON line per cell to ``runs.jsonl`` (batch size, lr, wall time, machine, per-epoch history),
written with the row as one set. A cell whose training loss turns NaN or infinite fails (the epoch
loop raises), and so does one whose metric is not a finite number (the store refuses it).
Cells whose method is not available yet (no DMFA/ACFlow checkpoint) are skipped, or waited for
with ``wait=True``. Order: every method on every mask for seed 0 before any later seed.

Reports: :func:`imputation_quality` (diagnostics of the imputers), :func:`pivot_table`,
:func:`paired_differences`, :func:`table_markdown`, :func:`paired_markdown`,
:func:`update_markdown_table` and :func:`plot_results`.
"""
from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labkit import paths
from labkit.device import resolve_device
from labkit.models.classifier import build_classifier, evaluate_accuracy, train_classifier
from labkit.studies.cells import _stable_seed, _with_nan, data_source_key, fingerprint_cell, load_cell_data
from labkit.studies.imputers import METHODS, ImputerConfig, method_available
from labkit.studies.classification_tables import (AUTHORS_SQUARE, MASK_ORDER, METHOD_ORDER, PAIRS, PAPER_TABLE1,
                                                  check_table_settings, paired_differences, paired_markdown,
                                                  pivot_table, plot_results, table_markdown, update_markdown_table)
from labkit.studies.reporting import replace_marked_block  # noqa: F401  (re-exported for the scripts)
from labkit.studies.engine import (Cell, CellOutcome, InputError, ResultStore, SweepFailed, SweepIncomplete, held_unfinished,
                                   retry_held, run_cells, unfinished_text)

__all__ = [
    "ACCURACY_COLUMNS",
    "METHOD_ORDER",
    "PAPER_TABLE1",
    "AUTHORS_SQUARE",
    "PAPER_HYPERPARAMETERS",
    "SweepConfig",
    "sweep_config",
    "sweep_config_from",
    "run_cell",
    "plan_cells",
    "run_sweep",
    "read_results",
    "imputation_quality",
    "pivot_table",
    "paired_differences",
    "table_markdown",
    "update_markdown_table",
    "paired_markdown",
    "plot_results",
    "MASK_ORDER",
    "PAIRS",
    "check_table_settings",
    "replace_marked_block",
    "result_store",
    "cell_settings",
    "ACCURACY_COORDS",
]

# ============================================================================ settings
@dataclass
class SweepConfig(ImputerConfig):
    """Everything a sweep needs besides the grid (filled from a profile's ``02_classification`` section):
    the classifier's training settings here, the imputers' settings from :class:`ImputerConfig`."""

    profile: str = "quick"
    epochs: int = 1
    batch_size: int = 24
    lr: float = 1e-3
    n_train: int | None = 500
    n_test: int | None = 200
    val_fraction: float = 0.1
    select: str = "best_val"                  # "best_val" (epoch with the best validation accuracy) | "last"
    precision: str = "32"                     # "32" | "bf16-mixed" | "16-mixed" | "auto" (labkit.precision)
    eval_batch: int = 500
    results_dir: str | None = None            # default results/classification/<profile>

    def results_path(self) -> Path:
        return Path(self.results_dir) if self.results_dir else paths.results_dir("classification", self.profile)

#: the paper's classifier hyper-parameters (supplementary 1.2): dataset -> (epochs, batch size, lr)
PAPER_HYPERPARAMETERS = {"mnist": (10, 24, 1e-3), "fashion-mnist": (10, 24, 1e-3), "svhn": (25, 24, 1e-3),
                         "cifar10": (35, 64, 1e-4)}

#: the notebook parameters that are not SweepConfig fields
GRID_KEYS = ("dataset", "datasets", "masks", "methods", "seeds")


def sweep_config(profile: str = "quick", **overrides) -> tuple[dict, SweepConfig]:
    """Grid and :class:`SweepConfig` from a profile's ``02_classification`` section plus overrides.

    Returns ``({"datasets", "masks", "methods", "seeds"}, config)``. ``epochs``, ``batch_size`` or
    ``lr`` set to ``None`` mean the paper's value for the (first) data set (``PAPER_HYPERPARAMETERS``).
    Unknown keys raise ``ValueError`` naming them; ``device``/``seed``/``profile`` defaults are ignored.
    """
    try:
        from labkit.lab.profiles import load_profile
    except ImportError:  # before labkit/lab/ existed
        from labkit.profiles import load_profile

    params = load_profile(profile, "02_classification")
    params.update({k: v for k, v in overrides.items()})
    params.pop("seed", None)
    name = params.pop("profile", profile)
    datasets = params.pop("datasets", None) or [params.pop("dataset", "mnist")]
    params.pop("dataset", None)
    if isinstance(datasets, str):
        datasets = [datasets]
    grid = {"datasets": list(datasets), "masks": list(params.pop("masks", ["square"])),
            "methods": list(params.pop("methods", ["zero"])), "seeds": [int(s) for s in params.pop("seeds", [0])]}
    fields = SweepConfig.__dataclass_fields__
    unknown = sorted(k for k in params if k not in fields)
    if unknown:
        raise ValueError(f"unknown 02_classification parameter(s) {unknown}; valid: "
                         f"{', '.join(list(GRID_KEYS) + list(fields))}")
    paper = PAPER_HYPERPARAMETERS.get(grid["datasets"][0], PAPER_HYPERPARAMETERS["mnist"])
    for i, k in enumerate(("epochs", "batch_size", "lr")):
        if params.get(k, 0) is None:
            params[k] = paper[i]
    cfg = SweepConfig(profile=str(name), **params)
    return grid, cfg


def sweep_config_from(namespace: dict, profile: str | None = None) -> tuple[dict, SweepConfig]:
    """:func:`sweep_config` from a notebook's parameters: the names of ``namespace`` (e.g. ``globals()``
    after the parameters cell) that are grid keys or :class:`SweepConfig` fields, nothing else."""
    known = set(GRID_KEYS) | set(SweepConfig.__dataclass_fields__)
    params = {k: v for k, v in namespace.items() if k in known and not k.startswith("_")}
    name = profile or namespace.get("profile", "quick")
    params.pop("profile", None)
    return sweep_config(name, **params)


# ============================================================================ results files
#: the accuracy table: one row per cell key (see :mod:`labkit.studies.engine`)
ACCURACY_COORDS = ["dataset", "mask", "method", "seed"]
ACCURACY_METRICS = ["accuracy"]                     # test accuracy of the selected epoch (cfg.select)
ACCURACY_OPTIONAL = ["accuracy_last", "val_accuracy", "epoch_selected"]   # empty in rows made before they existed
ACCURACY_COLUMNS = ["key", *ACCURACY_COORDS, *ACCURACY_METRICS, *ACCURACY_OPTIONAL, "settings", "inputs", "origin"]


def result_store(results_dir: str | os.PathLike) -> ResultStore:
    """The classification results of a folder: ``accuracy.csv`` (validated rows) + ``runs.jsonl``."""
    results_dir = Path(results_dir)
    return ResultStore(results_dir / "accuracy.csv", coords=ACCURACY_COORDS, metrics=ACCURACY_METRICS,
                       optional=ACCURACY_OPTIONAL, details=results_dir / "runs.jsonl")


def read_results(path: str | os.PathLike):
    """The validated rows of an accuracy CSV (a folder or the CSV itself) as a DataFrame, with the
    settings every table needs (``n_train``, ``n_test``, ``epochs``, ``precision``) as columns."""
    path = Path(path)
    store = result_store(path if path.suffix != ".csv" else path.parent)
    if path.suffix == ".csv":
        store.path = path
    return with_settings_columns(store.read())


def with_settings_columns(df, names: Sequence[str] = ("n_train", "n_test", "epochs", "precision")):
    """``df`` with the named settings copied out of its ``settings`` JSON into columns."""
    import json

    df = df.copy()
    parsed = [json.loads(t) if isinstance(t, str) else {} for t in df["settings"]] if len(df) else []
    for name in names:
        df[name] = [d.get(name) for d in parsed]
    return df


def cell_settings(cfg: SweepConfig, method: str) -> dict:
    """Every setting that changes a cell's result: the classifier's training and the method's own."""
    from labkit.precision import resolve_precision

    # "auto" is resolved: a bf16 cell and a float32 cell must never share a key
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    return {"n_train": cfg.n_train, "n_test": cfg.n_test, "val_fraction": cfg.val_fraction, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "select": cfg.select, "precision": precision,
            **METHODS[method].settings(cfg)}


_PLAN_DATA: dict = {}


def _cell_fingerprints(dataset: str, mask: str, seed: int, cfg: SweepConfig) -> dict:
    key = (dataset, mask, int(seed), cfg.n_train, cfg.n_test, cfg.val_fraction, data_source_key())
    if key not in _PLAN_DATA:
        data = load_cell_data(dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test,
                              val_fraction=cfg.val_fraction, quiet=True)
        if len(_PLAN_DATA) > 64:
            _PLAN_DATA.clear()
        _PLAN_DATA[key] = {**fingerprint_cell(data), "sources": data.sources}
    return _PLAN_DATA[key]


def plan_cells(datasets: Sequence[str], masks: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
               cfg: SweepConfig | None = None) -> list[Cell]:
    """The grid as :class:`~labkit.studies.engine.Cell` s in run order (seeds outermost, so every
    method sees every mask at seed 0 first). Each cell's inputs are the content fingerprints of its
    images, labels and masks and of the checkpoints its method reads; a method whose checkpoint does
    not exist yet gets ``inputs["unavailable"]`` (the sweep waits for it or leaves it); the cells of a
    data set that cannot be loaded get ``inputs["data_error"]`` (the sweep reports them failed)."""
    cfg = cfg or SweepConfig()
    cells = []
    for s in seeds:
        for d in datasets:
            for m in masks:
                try:
                    fp = _cell_fingerprints(d, m, int(s), cfg)
                except OSError as exc:       # this data set cannot be loaded: its cells fail, the others run
                    for meth in methods:
                        cells.append(Cell("classification", {"dataset": d, "mask": m, "method": meth, "seed": int(s)},
                                          cell_settings(cfg, meth), {"data_error": f"{type(exc).__name__}: {exc}"}))
                    continue
                data_inputs = {"train": fp["train"], "test": fp["test"], "masks": fp["masks"]}
                for meth in methods:
                    why = method_available(meth, cfg, d, m)
                    extra = {"unavailable": why} if why else METHODS[meth].inputs(cfg, d, m)
                    cells.append(Cell("classification", {"dataset": d, "mask": m, "method": meth, "seed": int(s)},
                                      cell_settings(cfg, meth), {**data_inputs, **extra}))
    return cells


# ============================================================================ one cell / the sweep
def run_cell(cell: Cell, cfg: SweepConfig) -> dict:
    """Train and test one cell; returns ``{"metrics", "details"}`` (the driver records them).

    Loads the cell's data itself (so it can run in another process or on another machine) and
    refuses to run when what it loaded is not what the plan fingerprinted.
    """
    from labkit.checkpoint import machine_description

    dataset, mask, method, seed = (cell.coords[k] for k in ACCURACY_COORDS)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    why = method_available(method, cfg, dataset, mask)
    if why:
        raise RuntimeError(f"method {method!r} cannot run: {why}")
    dev = resolve_device(cfg.device)
    t0 = time.perf_counter()
    data = load_cell_data(dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=cfg.val_fraction,
                          quiet=not cfg.progress)
    fp = fingerprint_cell(data)
    for part in ("train", "test", "masks"):
        if part in cell.inputs and cell.inputs[part] != fp[part]:
            raise InputError(f"the {part} data this process loaded differ from the plan's "
                             f"({cell.inputs[part]} vs {fp[part]}): another data source or mask generator")
    aux_train, aux_test, info = METHODS[method].prepare(data, cfg)
    t_prep = time.perf_counter() - t0
    torch.manual_seed(_stable_seed("init", dataset, mask, method, seed))
    C, H, _ = data.train_images.shape[1:]
    model = build_classifier(data.arch, method, in_channels=C, image_size=H).to(dev)
    run_config = {"cell": cell.key, "n_train": len(data.fit_idx), "n_val": len(data.val_idx),
                  "n_test": len(data.test_images), "batch_size": cfg.batch_size, "lr": cfg.lr, "select": cfg.select}
    ckpt = cfg.cache_path() / "runs" / cfg.profile / f"{dataset}-{mask}-{method}-s{seed}-{cell.key[:12]}.partial.pt"
    t1 = time.perf_counter()
    history, sel = train_classifier(model, data, aux_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                    seed=seed, checkpoint=ckpt, select=cfg.select, device=dev,
                                    progress=cfg.progress, config=run_config, eval_batch=cfg.eval_batch,
                                    precision=cfg.precision, keep_last_state=True)
    t_train = time.perf_counter() - t1
    acc = evaluate_accuracy(model, data.test_images, data.test_labels, data.test_missing, aux_test,
                            batch_size=cfg.eval_batch)
    last_state = sel.pop("last_state", None)
    acc_last = acc
    if last_state is not None:     # the selected epoch was not the last: test the last one too
        model.load_state_dict(last_state)
        acc_last = evaluate_accuracy(model, data.test_images, data.test_labels, data.test_missing, aux_test,
                                     batch_size=cfg.eval_batch)
    metrics = {"accuracy": round(acc, 5), "accuracy_last": round(acc_last, 5),
               "val_accuracy": None if sel.get("val_accuracy") is None else round(float(sel["val_accuracy"]), 5),
               "epoch_selected": sel.get("epoch_selected")}
    details = {"n_train": len(data.fit_idx), "n_val": len(data.val_idx), "n_test": len(data.test_images),
               "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "select": cfg.select,
               "precision": cfg.precision, **sel,
               "prepare_seconds": round(t_prep, 1), "train_seconds": round(t_train, 1),
               "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine_description(),
               "device": str(dev), "profile": cfg.profile, "data": data.sources,
               "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
               "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in history],
               **info}
    ckpt.unlink(missing_ok=True)
    return {"metrics": metrics, "details": details}


def run_sweep(datasets: Sequence[str], masks: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
              profile: str = "quick", *, config: SweepConfig | None = None, wait: bool = False,
              poll_seconds: float = 300.0, max_cells: int | None = None, device=None,
              progress: bool = True, executor: Any = None, raise_on_failure: bool = True,
              on_record: Callable[[Any], None] | None = None, _run_cell: Callable = None, **overrides) -> "Any":
    """Run every cell of the grid whose key is not yet in ``<results_dir>/accuracy.csv``.

    Args:
        datasets, masks, methods, seeds: the grid (methods: names of ``METHODS``).
        profile: names the results folder (``results/classification/<profile>``) and the checkpoints.
        config: a :class:`SweepConfig`; ``overrides`` (epochs, batch_size, lr, n_train, ...) replace fields.
        wait: when methods are unavailable (no DMFA/ACFlow checkpoint yet), poll every
            ``poll_seconds`` until they appear, instead of returning without them.
        max_cells: stop after this many cells ran or failed.
        executor: where cells run (default: one after another here; see
            :func:`labkit.studies.executors.make_executor`).
        raise_on_failure: raise :class:`~labkit.studies.engine.SweepFailed` at the end when cells failed
            (the others ran and were recorded).
        on_record: called after each recorded cell with the rows of the planned cells so far (a
            DataFrame), e.g. to refresh a report.

    A cell is done only when a row with its key exists: a rerun with other settings, other images
    or another checkpoint runs new cells. Each finished cell is recorded at once (atomically) with
    its settings, inputs and details (``runs.jsonl``); an interrupted cell resumes from its epoch
    checkpoint. Returns the rows of the planned cells (a DataFrame).
    """
    cfg = config or SweepConfig(profile=profile)
    cfg.profile = profile
    if device is not None:
        cfg.device = device
    cfg.progress = progress
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown sweep setting {k!r}; valid: {', '.join(cfg.__dataclass_fields__)}")
        setattr(cfg, k, v)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    from labkit.masks import MASK_KINDS

    for m in masks:
        if m not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {m!r}; valid: {', '.join(MASK_KINDS)}")
    store = result_store(cfg.results_path())
    fn = functools.partial(_run_cell or run_cell, cfg=cfg)
    failed: dict[str, Any] = {}
    ran = 0
    said: set[str] = set()

    def log(text: str) -> None:         # each "skipped"/"waiting" line once per sweep, not once per round
        if (" skipped " in text or " waiting " in text) and text in said:
            return
        said.add(text)
        print(text, flush=True)

    seeds = [int(s) for s in seeds]
    while True:
        # seed by seed, each round re-planning the earlier seeds too: a method whose checkpoint
        # appeared meanwhile runs before any later seed (its cells get their real keys only now)
        for upto in range(1, len(seeds) + 1):
            cells = plan_cells(datasets, masks, methods, seeds[:upto], cfg)
            left = None if max_cells is None else max_cells - ran
            keys = {c.key for c in cells}

            def recorded(outcome, keys=keys):
                if on_record is not None and outcome.status == "ran":
                    df = store.read(report=False)
                    on_record(with_settings_columns(df[df["key"].isin(keys)]))

            for c in cells:
                if "data_error" in c.inputs and c.key not in failed:
                    failed[c.key] = CellOutcome(c, "failed", error=f"its data cannot be loaded: {c.inputs['data_error']}")
                    log(f"[classification] failed {c.short()}: {failed[c.key].error}")
            outcomes = run_cells([c for c in cells if c.key not in failed], fn, store, executor=executor,
                                 max_cells=left, raise_on_failure=False, log=log,
                                 available=lambda c: c.inputs.get("unavailable"), on_outcome=recorded)
            ran += sum(o.status in ("ran", "failed") for o in outcomes)
            failed.update({o.cell.key: o for o in outcomes if o.status == "failed"})
            if max_cells is not None and ran >= max_cells:
                break
        waiting = [o for o in outcomes if o.status == "waiting"]
        if not (wait and waiting) or (max_cells is not None and ran >= max_cells):
            break
        time.sleep(poll_seconds)
    if max_cells is None or ran < max_cells:
        outcomes = retry_held(outcomes, fn, store, executor=executor, log=log)
    failed.update({o.cell.key: o for o in outcomes if o.status == "failed"})
    unfinished = held_unfinished(outcomes)
    if unfinished:
        log(f"[classification] {unfinished_text(unfinished)}")
    df = store.read()
    if (failed or unfinished) and raise_on_failure:
        raise SweepIncomplete(list(failed.values()), unfinished)
    return with_settings_columns(df[df["key"].isin({c.key for c in cells})])


# ============================================================================ diagnostics
def imputation_quality(dataset: str, mask: str, seed: int, methods: Sequence[str], cfg: SweepConfig, *,
                       n: int = 1000) -> "Any":
    """How good each method's imputer is on the first ``n`` *test* images of a cell (diagnostics only;
    never used to choose anything): per image, the sum of squared errors of the imputation at the
    missing pixels (``sse``), and for MFA-based methods the negative log-likelihood of the true missing
    pixels under the per-image MFA (``nll``, nats) and the mean predicted standard deviation there
    (``pred_std``). Uses the same (cached) preparers as the sweep. Returns a pandas DataFrame.
    """
    import pandas as pd

    data = load_cell_data(dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test,
                          val_fraction=cfg.val_fraction)
    idx = torch.arange(min(n, len(data.test_images)))
    x_true = data.test_images[idx]
    miss = data.test_missing[idx]
    J = miss.expand_as(x_true)
    x = _with_nan(x_true, J)
    rows = []
    for name in methods:
        if method_available(name, cfg, dataset, mask):
            continue
        _, aux_test, _ = METHODS[name].prepare(data, cfg)
        rec = {"method": name}
        if METHODS[name].front.aux_kind == "mfa":
            starts = range(0, len(idx), 250)
            mfas = [aux_test.get(idx[s:s + 250], x[s:s + 250], miss[s:s + 250]) for s in starts]
            nll = torch.cat([-m.log_prob(x_true[s:s + 250], miss[s:s + 250]) for s, m in zip(starts, mfas)])
            mean = torch.cat([m.mean() for m in mfas])
            var = torch.cat([m.variance() for m in mfas])
            rec["nll"] = float(nll.mean())
            rec["pred_std"] = float(var.sqrt()[J].mean())
        elif METHODS[name].front.aux_kind == "images" and name != "gt":
            mean = aux_test.get(idx, x, miss)
        else:
            mean = torch.zeros_like(x_true)   # zero / mask / pc: the hole is treated as 0 (or skipped)
        err = torch.where(J, mean - x_true, torch.zeros((), dtype=x_true.dtype))
        rec["sse"] = float((err ** 2).sum((1, 2, 3)).mean())
        rec["missing_pixels"] = float(J.sum((1, 2, 3)).float().mean())
        rows.append(rec)
    return pd.DataFrame(rows).set_index("method")


