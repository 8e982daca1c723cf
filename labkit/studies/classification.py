r"""The classification study (notebook 02): every missing-data method on every mask kind, resumably.

Reproduces supplementary Table 1 of *MisConv: Convolutional Neural Networks for Missing Data*,
Przewięźlikowski, Śmieja, Struski, Tabor, WACV 2022, https://arxiv.org/abs/2110.14010.

Settings: :class:`labkit.studies.configs.ClassificationConfig` (a data set, and the grid: its
``masks``, ``methods`` and ``seeds``). Entry points: :func:`plan` (the cells of the grid),
:func:`run` (run those not yet recorded), :func:`read_rows` and :func:`write_report`.

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
:func:`run` writes ``<results_dir>/accuracy.csv`` (columns ``ACCURACY_COLUMNS``) one row per
finished cell (write to a temporary file, then rename), skips cells already there, and adds a
JSON line per cell to ``runs.jsonl`` (batch size, lr, wall time, machine, per-epoch history) and
one to ``predictions.jsonl`` (the predicted label of every test image and whether it was right,
bound to the cell key and the test data's fingerprint: :mod:`labkit.studies.classification_predictions`),
written with the row as one set. Rows made before predictions were stored have none; the paired
statistics (:mod:`labkit.studies.paired_stats`) use them where they exist. A cell whose training
loss turns NaN or infinite fails (the epoch loop raises), and so does one whose metric is not a finite number (the store refuses it).
Cells whose method is not available yet (no DMFA/ACFlow checkpoint) are skipped, or waited for
with ``wait=True``. Order: every method on every mask for seed 0 before any later seed.

Initialisation (``ClassificationConfig.init``): ``"method"`` (the committed cells' scheme) draws each cell's
weights from a seed mixed from (dataset, mask, method, seed), so two methods of one seed start
from different weights; ``"shared"`` gives every cell of one (dataset, seed) the same weights in
every layer whose shapes agree across methods (all layers except the ``mask`` front's first
convolution, which has an extra input channel): :func:`init_classifier`.

Reports: :func:`write_report` (the tables and the figure beside the results, and the marked blocks
of a Markdown file), :func:`diagnostics` (how good the imputers are:
:mod:`labkit.studies.classification_diagnostics`), and from
:mod:`labkit.studies.classification_tables` :func:`pivot_table`, :func:`paired_differences`,
:func:`table_markdown`, :func:`paired_markdown`, :func:`update_markdown_table`, :func:`plot_results`,
:func:`plot_paired` (the paired differences as a forest plot) and :func:`budget_markdown` (one grid
under two budgets side by side).
"""
from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from labkit.machine import machine_summary
from labkit.device import resolve_device
from labkit.models.classifier import build_classifier, evaluate_accuracy, train_classifier
from labkit.precision import resolve_precision
from labkit.studies.cells import data_source_key, fingerprint_cell, load_cell_data, stable_seed
from labkit.studies.classification_predictions import (PREDICTIONS_FORMAT, decode_predictions, encode_predictions,
                                                       predict, with_predictions)
from labkit.studies.classification_tables import (AUTHORS_CIFAR10, AUTHORS_SQUARE, BUDGET_PAIRS, MASK_ORDER,
                                                  METHOD_ORDER, PAIRS, PAPER_TABLE1, budget_markdown, check_table_settings,
                                                  paired_differences, paired_markdown, paired_results, pivot_table,
                                                  plot_budget_curves, plot_paired, plot_results, results_path, seeds_markdown,
                                                  settings_line, table_markdown, update_markdown_table)
from labkit.studies.classification_diagnostics import diagnostics
from labkit.studies.configs import ClassificationConfig
from labkit.studies.engine import (Cell, CellOutcome, InputError, ResultStore, SweepIncomplete, held_unfinished,
                                   retry_held, run_cells, unfinished_text, write_files)
from labkit.studies.imputers import METHODS, imputer_settings, method_available
from labkit.studies.reporting import replace_marked_block

__all__ = [
    "ACCURACY_COLUMNS",
    "ACCURACY_COORDS",
    "AUTHORS_CIFAR10",
    "AUTHORS_SQUARE",
    "COST_GROUP",
    "INIT_SCHEMES",
    "MASK_ORDER",
    "METHOD_ORDER",
    "PAIRS",
    "PAPER_HYPERPARAMETERS",
    "PAPER_TABLE1",
    "PREDICTIONS_FORMAT",
    "budget_markdown",
    "cell_settings",
    "check_table_settings",
    "decode_predictions",
    "diagnostics",
    "effective",
    "encode_predictions",
    "init_classifier",
    "paired_differences",
    "paired_markdown",
    "paired_results",
    "pivot_table",
    "plan",
    "plot_budget_curves",
    "plot_paired",
    "plot_results",
    "predict",
    "read_results",
    "read_rows",
    "replace_marked_block",
    "result_store",
    "results_path",
    "rows_beside",
    "run",
    "run_cell",
    "table_markdown",
    "update_markdown_table",
    "with_history",
    "with_predictions",
    "write_report",
]

# ============================================================================ settings
#: the paper's classifier hyper-parameters (supplementary 1.2): dataset -> (epochs, batch size, lr)
PAPER_HYPERPARAMETERS = {"mnist": (10, 24, 1e-3), "fashion-mnist": (10, 24, 1e-3), "svhn": (25, 24, 1e-3),
                         "cifar10": (35, 64, 1e-4)}

#: the initialisation schemes (module docstring); "method" is the committed cells' and stays out of
#: their keys, so that they are still found
INIT_SCHEMES = ("method", "shared")

#: the coordinate whose recorded cells estimate the cost of the planned ones
COST_GROUP = "method"


def effective(cfg: ClassificationConfig) -> ClassificationConfig:
    """``cfg`` with ``epochs``, ``batch_size`` and ``lr`` set to ``None`` replaced by the paper's values
    for its data set (:data:`PAPER_HYPERPARAMETERS`; MNIST's for a data set the paper lacks). The
    one place where None is read: :func:`plan`, :func:`run` and :func:`cell_settings` start with it."""
    paper = PAPER_HYPERPARAMETERS.get(cfg.dataset, PAPER_HYPERPARAMETERS["mnist"])
    given = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr}
    missing = {k: paper[i] for i, (k, v) in enumerate(given.items()) if v is None}
    return cfg.replace(**missing) if missing else cfg


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
                       optional=ACCURACY_OPTIONAL, details=results_dir / "runs.jsonl",
                       attachments={"predictions": results_dir / "predictions.jsonl"})


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """The validated rows of an accuracy CSV (a folder or the CSV itself) as a DataFrame, with the
    settings every table needs (``n_train``, ``n_test``, ``epochs``, ``precision``) as columns and
    the per-image ``correct`` flags where the cell stored its predictions (:func:`with_predictions`)."""
    path = Path(path)
    store = result_store(path if path.suffix != ".csv" else path.parent)
    if path.suffix == ".csv":
        store.path = path
    return with_history(with_predictions(with_settings_columns(store.read()), store), store)


def with_history(df: pd.DataFrame, store: ResultStore) -> pd.DataFrame:
    """``df`` (rows of ``store``) with each cell's training from its run record (``runs.jsonl``):
    ``history`` (one dict per epoch, with ``epoch`` and ``val_accuracy``) and ``images_per_epoch``
    (the training images of one epoch, the validation ones excluded); None where the record lacks them."""
    records = {d.get("key"): d for d in store.read_details(report=False)} if len(df) else {}
    df = df.copy()
    found = [records.get(k, {}) for k in df["key"]] if len(df) else []
    df["history"] = [r.get("history") or None for r in found]
    df["images_per_epoch"] = [r.get("n_train") for r in found]
    return df


def read_rows(cfg: ClassificationConfig, cells: Sequence[Cell]) -> pd.DataFrame:
    """The recorded rows of ``cells`` in :func:`results_path` ``(cfg)``, as :func:`read_results` gives them."""
    df = read_results(results_path(cfg))
    return df[df["key"].isin({c.key for c in cells})]


def rows_beside(cfg: ClassificationConfig, other: ClassificationConfig) -> pd.DataFrame:
    """The rows that profile ``other`` recorded for ``cfg``'s data set, masks and methods (in
    ``results_path(other)``): the same grid under another budget, for :func:`budget_markdown`.
    Raises ``ValueError`` naming the file when it holds none."""
    path = result_store(results_path(other)).path
    df = read_results(path) if path.exists() else pd.DataFrame(columns=["dataset", "mask", "method"])
    df = df[(df["dataset"] == cfg.dataset) & df["mask"].isin(cfg.masks) & df["method"].isin(cfg.methods)]
    if df.empty:
        raise ValueError(f"{path} holds no rows of {cfg.dataset} with masks {list(cfg.masks)} and methods "
                         f"{list(cfg.methods)}: nothing to put beside profile {cfg.profile!r}")
    return df


def with_settings_columns(df: pd.DataFrame, names: Sequence[str] = ("n_train", "n_test", "epochs", "precision")):
    """``df`` with the named settings copied out of its ``settings`` JSON into columns."""
    df = df.copy()
    parsed = [json.loads(t) if isinstance(t, str) else {} for t in df["settings"]] if len(df) else []
    for name in names:
        df[name] = [d.get(name) for d in parsed]
    return df


def cell_settings(cfg: ClassificationConfig, method: str) -> dict:
    """Every setting that changes a cell's result: the classifier's training and the method's own."""
    cfg = effective(cfg)
    # "auto" is resolved: a bf16 cell and a float32 cell must never share a key
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    # the committed cells were drawn with the "method" scheme and have no "init" in their keys
    init = {} if cfg.init == "method" else {"init": cfg.init}
    return {"n_train": cfg.n_train, "n_test": cfg.n_test, "val_fraction": cfg.val_fraction, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "select": cfg.select, "precision": precision,
            **init, **METHODS[method].settings(imputer_settings(cfg))}


_PLAN_DATA: dict = {}


def _cell_fingerprints(mask: str, seed: int, cfg: ClassificationConfig) -> dict:
    key = (cfg.dataset, mask, int(seed), cfg.n_train, cfg.n_test, cfg.val_fraction, data_source_key())
    if key not in _PLAN_DATA:
        data = load_cell_data(cfg.dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test,
                              val_fraction=cfg.val_fraction, quiet=True)
        if len(_PLAN_DATA) > 64:
            _PLAN_DATA.clear()
        _PLAN_DATA[key] = {**fingerprint_cell(data), "sources": data.sources}
    return _PLAN_DATA[key]


def plan(cfg: ClassificationConfig) -> list[Cell]:
    """The cells of ``cfg``'s grid (``masks`` × ``methods`` × ``seeds`` of ``cfg.dataset``) as
    :class:`~labkit.studies.engine.Cell` s in run order (seeds outermost, so every method sees every
    mask at seed 0 first). Each cell's inputs are the content fingerprints of its images, labels and
    masks and of the checkpoints its method reads; a method whose checkpoint does not exist yet gets
    ``inputs["unavailable"]`` (the sweep waits for it or leaves it); the cells whose data cannot be
    loaded get ``inputs["data_error"]`` (the sweep reports them failed)."""
    cfg = effective(cfg)
    icfg = imputer_settings(cfg, progress=False)
    settings = {meth: cell_settings(cfg, meth) for meth in cfg.methods}
    cells = []
    for s in cfg.seeds:
        for m in cfg.masks:
            coords = [{"dataset": cfg.dataset, "mask": m, "method": meth, "seed": int(s)} for meth in cfg.methods]
            try:
                fp = _cell_fingerprints(m, int(s), cfg)
            except OSError as exc:       # these images cannot be loaded: their cells fail, the others run
                cells += [Cell("classification", c, settings[c["method"]],
                               {"data_error": f"{type(exc).__name__}: {exc}"}) for c in coords]
                continue
            data_inputs = {"train": fp["train"], "test": fp["test"], "masks": fp["masks"]}
            for c in coords:
                meth = c["method"]
                why = method_available(meth, icfg, cfg.dataset, m, int(s))
                extra = {"unavailable": why} if why else METHODS[meth].inputs(icfg, cfg.dataset, m, int(s))
                cells.append(Cell("classification", c, settings[meth], {**data_inputs, **extra}))
    return cells


# ============================================================================ one cell / the sweep
def init_classifier(arch: str, method: str, dataset: str, mask: str, seed: int, *, in_channels: int,
                    image_size: int, init: str = "method"):
    """The untrained classifier of a cell, and the layers whose weights are the method's own draw.

    ``init="method"``: all weights drawn after ``torch.manual_seed`` of a seed mixed from (dataset,
    mask, method, seed): two methods of one seed start from different weights (the committed cells).
    ``init="shared"``: the same draw, then every layer whose parameters have the same names and
    shapes as those of a reference classifier (a plain-convolution front, drawn from a seed mixed
    from (dataset, seed) only) takes the reference's weights. Every front is a 3×3 convolution of
    the same default initialisation, so all layers agree except the ``mask`` front's first
    convolution (an extra input channel changes its shape and its fan-in, hence its weights' range):
    that one stays the method's own draw.

    Returns ``(model, own)``: ``own`` names the layers not taken from the reference (``[]`` for
    "shared" except with the mask front; every layer with parameters for "method").
    """
    if init not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {', '.join(map(repr, INIT_SCHEMES))}, got {init!r}")
    torch.manual_seed(stable_seed("init", dataset, mask, method, seed))
    model = build_classifier(arch, method, in_channels=in_channels, image_size=image_size)
    layers = [name for name, mod in model.named_modules() if any(True for _ in mod.parameters(recurse=False))]
    if init == "method":
        return model, layers
    torch.manual_seed(stable_seed("init-shared", dataset, seed))
    reference = dict(build_classifier(arch, "zero", in_channels=in_channels, image_size=image_size).named_modules())
    own = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            mine = dict(mod.named_parameters(recurse=False))
            if not mine:
                continue
            ref = dict(reference[name].named_parameters(recurse=False)) if name in reference else {}
            if set(mine) == set(ref) and all(mine[k].shape == ref[k].shape for k in mine):
                for k, p in mine.items():
                    p.copy_(ref[k])
            else:
                own.append(name)
    return model, own


def run_cell(cell: Cell, cfg: ClassificationConfig, *, progress: bool = True) -> dict:
    """Train and test one cell; returns ``{"metrics", "details"}`` (the driver records them).

    ``cfg``: the sweep's config as :func:`run` hands it down (``epochs``/``batch_size``/``lr`` and
    ``precision`` concrete). Loads the cell's data itself (so it can run in another process or on
    another machine) and refuses to run when what it loaded is not what the plan fingerprinted.
    """
    dataset, mask, method, seed = (cell.coords[k] for k in ACCURACY_COORDS)
    # resolved where the cell runs: an executor may run it on another machine than the plan's
    dev = resolve_device(cfg.device)
    icfg = imputer_settings(cfg, device=dev, progress=progress)
    why = method_available(method, icfg, dataset, mask, seed)
    if why:
        raise RuntimeError(f"method {method!r} cannot run: {why}")
    t0 = time.perf_counter()
    data = load_cell_data(dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=cfg.val_fraction,
                          quiet=not progress)
    fp = fingerprint_cell(data)
    for part in ("train", "test", "masks"):
        if part in cell.inputs and cell.inputs[part] != fp[part]:
            raise InputError(f"the {part} data this process loaded differ from the plan's "
                             f"({cell.inputs[part]} vs {fp[part]}): another data source or mask generator")
    aux_train, aux_test, info = METHODS[method].prepare(data, icfg)
    t_prep = time.perf_counter() - t0
    C, H, _ = data.train_images.shape[1:]
    model, own_layers = init_classifier(data.arch, method, dataset, mask, seed, in_channels=C, image_size=H,
                                        init=cfg.init)
    model = model.to(dev)
    run_config = {"cell": cell.key, "n_train": len(data.fit_idx), "n_val": len(data.val_idx),
                  "n_test": len(data.test_images), "batch_size": cfg.batch_size, "lr": cfg.lr, "select": cfg.select}
    ckpt = icfg.cache_path() / "runs" / cfg.profile / f"{dataset}-{mask}-{method}-s{seed}-{cell.key[:12]}.partial.pt"
    t1 = time.perf_counter()
    history, sel = train_classifier(model, data, aux_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                    seed=seed, checkpoint=ckpt, select=cfg.select, device=dev,
                                    progress=progress, config=run_config, eval_batch=cfg.eval_batch,
                                    precision=cfg.precision, keep_last_state=True)
    t_train = time.perf_counter() - t1
    predicted = predict(model, data.test_images, data.test_missing, aux_test, batch_size=cfg.eval_batch)
    correct = predicted == data.test_labels.reshape(-1).cpu()
    acc = int(correct.sum()) / max(1, len(correct))       # as evaluate_accuracy counts it
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
               "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine_summary(),
               "device": str(dev), "profile": cfg.profile, "data": data.sources,
               "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
               "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in history],
               "init": cfg.init, **info,
               # an attachment of the store: written to predictions.jsonl with the row, not to runs.jsonl
               "predictions": encode_predictions(predicted, correct, fp["test"])}
    if cfg.init != "method":
        details["init_own_layers"] = own_layers
    ckpt.unlink(missing_ok=True)
    return {"metrics": metrics, "details": details}


def run(cfg: ClassificationConfig, *, progress: bool = True, executor: Any = None, wait: bool = False,
        poll_seconds: float = 300.0, max_cells: int | None = None,
        on_record: Callable[[pd.DataFrame], None] | None = None, _run_cell: Callable | None = None) -> pd.DataFrame:
    """Run every planned cell (:func:`plan`) whose key is not yet in ``<results_path(cfg)>/accuracy.csv``.

    Args:
        cfg: the settings and the grid; never changed (the cells get a copy with ``epochs``,
            ``batch_size``, ``lr`` and ``precision`` made concrete, :func:`effective`).
        progress: progress bars and the data sources' messages.
        executor: where cells run (default: one after another here; see
            :func:`labkit.studies.executors.make_executor`).
        wait: when methods are unavailable (no DMFA/ACFlow checkpoint yet), poll every
            ``poll_seconds`` until they appear, instead of returning without them.
        max_cells: stop after this many cells ran or failed.
        on_record: called after each recorded cell with the rows of the planned cells so far (a
            DataFrame), e.g. to refresh a report.
        _run_cell: runs one cell instead of :func:`run_cell` (tests): ``fn(cell, cfg) -> dict``.

    A cell is done only when a row with its key exists: a rerun with other settings, other images
    or another checkpoint runs new cells. Each finished cell is recorded at once (atomically) with
    its settings, inputs and details (``runs.jsonl``); an interrupted cell resumes from its epoch
    checkpoint. Returns the rows of the planned cells (a DataFrame).

    Raises:
        SweepFailed: cells failed (the others ran and were recorded); :class:`SweepIncomplete` when
            cells held by another copy of the sweep were left unfinished.
    """
    # the precision is resolved once, here: the cells' keys and their training read the same value
    cfg = effective(cfg)
    cfg = cfg.replace(precision=resolve_precision(cfg.precision, resolve_device(cfg.device)))
    store = result_store(results_path(cfg))
    fn = (functools.partial(_run_cell, cfg=cfg) if _run_cell is not None
          else functools.partial(run_cell, cfg=cfg, progress=progress))
    failed: dict[str, Any] = {}
    ran = 0
    said: set[str] = set()

    def log(text: str) -> None:         # each "skipped"/"waiting" line once per sweep, not once per round
        if (" skipped " in text or " waiting " in text) and text in said:
            return
        said.add(text)
        print(text, flush=True)

    seeds = list(cfg.seeds)
    while True:
        # seed by seed, each round re-planning the earlier seeds too: a method whose checkpoint
        # appeared meanwhile runs before any later seed (its cells get their real keys only now)
        for upto in range(1, len(seeds) + 1):
            cells = plan(cfg.replace(seeds=seeds[:upto]))
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
    if failed or unfinished:
        raise SweepIncomplete(list(failed.values()), unfinished)
    return with_predictions(with_settings_columns(df[df["key"].isin({c.key for c in cells})]), store)


# ============================================================================ report
def write_report(cfg: ClassificationConfig, rows: pd.DataFrame, *, doc: str | os.PathLike | None = None,
                 marker: str = "classification", stem: str = "accuracy",
                 beside: tuple[str, pd.DataFrame] | None = None) -> list[Path]:
    """The report of ``rows`` (the planned cells' rows) beside the results, written as one set
    (:func:`labkit.studies.engine.write_files`): ``<stem>.md`` (the pivot beside the paper's Table 1),
    ``<stem>_paired.md`` (per-seed differences, :func:`paired_markdown`), ``<stem>.png`` (the dot
    chart) and ``<stem>_paired.png`` (the paired differences' forest plot, :func:`plot_paired`).

    ``beside``: ``(profile name, its rows)`` of the same data and mask made under another budget;
    adds ``<stem>_budgets.md`` (:func:`budget_markdown`: both budgets' accuracies and paired
    differences side by side, with the authors' CIFAR-10 logs on CIFAR-10; the paired tables then
    also hold every pair of :data:`BUDGET_PAIRS`) and, where the rows'
    run records hold their training histories, ``<stem>_budgets.png`` (:func:`plot_budget_curves`:
    validation accuracy per epoch against the training images seen, both budgets on one axis).

    With ``doc`` (a Markdown file), also the blocks between its ``<!-- <marker>-table:start/end -->``
    markers and, where it has them, ``<!-- <marker>-paired:start/end -->`` and
    ``<!-- <marker>-budgets:start/end -->`` and ``<!-- <marker>-seeds:start/end -->`` (each cell's
    accuracy per seed, :func:`seeds_markdown`). Returns the files written (none when ``rows`` is empty).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows.empty:
        return []
    out, profile = results_path(cfg), cfg.profile
    title = f"{', '.join(sorted(set(rows['dataset'])))} test accuracy, profile {profile}"
    fig = plot_results(rows, None, title=title)
    # a grid put beside another budget also states, per seed, every pair the budget table compares
    pairs = PAIRS if beside is None else PAIRS + [p for p in BUDGET_PAIRS if p not in PAIRS]
    results = paired_results(rows, pairs)
    paired = paired_markdown(rows, pairs, results=results)
    figs = [fig]
    files = {
        out / f"{stem}.md": f"Classification accuracy, profile `{profile}` (mean ± std over seeds; n = seeds); "
                            f"{settings_line(rows)}\n\n" + table_markdown(rows) + "\n",
        out / f"{stem}_paired.md": f"Per-seed accuracy differences in points, profile `{profile}` "
                                   "(labkit.studies.paired_stats)\n\n"
                                   + paired_markdown(rows, results=results, per_seed_mcnemar=True) + "\n",
        out / f"{stem}.png": lambda p: fig.savefig(p, dpi=120, format="png"),
    }
    if results:
        figs.append(plot_paired(results, title=f"paired differences, profile {profile}; {settings_line(rows)}"))
        files[out / f"{stem}_paired.png"] = lambda p, f=figs[-1]: f.savefig(p, dpi=120, format="png")
    budgets = None
    if beside is not None:
        other, other_rows = beside
        authors = AUTHORS_CIFAR10 if set(rows["dataset"]) == {"cifar10"} else None
        frames = {other: other_rows, profile: rows}
        budgets = budget_markdown({f"profile `{name}`": df for name, df in frames.items()}, authors=authors)
        files[out / f"{stem}_budgets.md"] = (f"The same methods under two budgets: profile `{other}` against "
                                            f"`{profile}` (labkit.studies.classification_tables.budget_markdown)"
                                            f"\n\n{budgets}\n")
        if any(h is not None for df in frames.values() for h in df.get("history", ())):
            # Markdown labels carry backticks; the figure legend gets the same names without them.
            what = f"{', '.join(sorted(set(rows['dataset'])))}, {', '.join(sorted(set(rows['mask'])))} masks"
            figs.append(plot_budget_curves({f"profile {name}": df for name, df in frames.items()},
                                           title=f"validation accuracy per epoch, profiles {other} and {profile}; {what}"))
            files[out / f"{stem}_budgets.png"] = lambda p, f=figs[-1]: f.savefig(p, dpi=120, format="png")
    write_files(files)
    for f in figs:
        plt.close(f)
    written = list(files)
    if doc:
        update_markdown_table(doc, rows, name=f"{marker}-table")
        text = Path(doc).read_text(encoding="utf-8")
        if f"<!-- {marker}-paired:start -->" in text:
            replace_marked_block(doc, f"{marker}-paired", paired)
        if budgets is not None and f"<!-- {marker}-budgets:start -->" in text:
            replace_marked_block(doc, f"{marker}-budgets", budgets)
        if f"<!-- {marker}-seeds:start -->" in text:
            replace_marked_block(doc, f"{marker}-seeds", seeds_markdown(rows))
        written.append(Path(doc))
    return written
