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
JSON line per cell to ``runs.jsonl`` (batch size, lr, wall time, machine, per-epoch history) and
one to ``predictions.jsonl`` (the predicted label of every test image and whether it was right,
bound to the cell key and the test data's fingerprint: :func:`encode_predictions`), written with
the row as one set. Rows made before predictions were stored have none; the paired statistics
(:mod:`labkit.studies.paired_stats`) use them where they exist. A cell whose training loss turns NaN or infinite fails (the epoch
loop raises), and so does one whose metric is not a finite number (the store refuses it).
Cells whose method is not available yet (no DMFA/ACFlow checkpoint) are skipped, or waited for
with ``wait=True``. Order: every method on every mask for seed 0 before any later seed.

Initialisation (``SweepConfig.init``): ``"method"`` (the committed cells' scheme) draws each cell's
weights from a seed mixed from (dataset, mask, method, seed), so two methods of one seed start
from different weights; ``"shared"`` gives every cell of one (dataset, seed) the same weights in
every layer whose shapes agree across methods (all layers except the ``mask`` front's first
convolution, which has an extra input channel): :func:`init_classifier`.

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
    "INIT_SCHEMES",
    "init_classifier",
    "predict",
    "encode_predictions",
    "decode_predictions",
    "with_predictions",
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
    init: str = "method"                      # "method" | "shared" (INIT_SCHEMES, init_classifier)
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
    _check_init(cfg.init)
    return grid, cfg


#: the initialisation schemes (module docstring); "method" is the committed cells' and stays out of
#: their keys, so that they are still found
INIT_SCHEMES = ("method", "shared")


def _check_init(init) -> None:
    if init not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {', '.join(map(repr, INIT_SCHEMES))}, got {init!r}")


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
                       optional=ACCURACY_OPTIONAL, details=results_dir / "runs.jsonl",
                       attachments={"predictions": results_dir / "predictions.jsonl"})


def read_results(path: str | os.PathLike):
    """The validated rows of an accuracy CSV (a folder or the CSV itself) as a DataFrame, with the
    settings every table needs (``n_train``, ``n_test``, ``epochs``, ``precision``) as columns and
    the per-image ``correct`` flags where the cell stored its predictions (:func:`with_predictions`)."""
    path = Path(path)
    store = result_store(path if path.suffix != ".csv" else path.parent)
    if path.suffix == ".csv":
        store.path = path
    return with_predictions(with_settings_columns(store.read()), store)


# ============================================================================ per-image predictions
#: characters of the predicted labels (one per test image): labels 0-35
_LABEL_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
PREDICTIONS_FORMAT = "labels-base36/correct-packbits-hex"


def encode_predictions(predicted: torch.Tensor, correct: torch.Tensor, test_fingerprint: dict) -> dict:
    """The predictions record of a cell: ``predicted (n_test,)`` integer labels (0-35) and ``correct
    (n_test,)`` booleans, as text (one character per label; the flags as packed bits in hex), with
    the fingerprint of the test data they belong to. Written to ``predictions.jsonl`` under the
    cell key by the store (an attachment, in the same set as the row)."""
    import numpy as np

    predicted = torch.as_tensor(predicted).reshape(-1)
    correct = torch.as_tensor(correct).reshape(-1)
    if predicted.dtype.is_floating_point or predicted.dtype == torch.bool:
        raise TypeError(f"predicted labels must be integers, got {predicted.dtype}")
    if correct.dtype != torch.bool or correct.shape != predicted.shape:
        raise ValueError(f"correct must be booleans of predicted's shape {tuple(predicted.shape)}, got "
                         f"{correct.dtype} {tuple(correct.shape)}")
    if len(predicted) and (int(predicted.min()) < 0 or int(predicted.max()) >= len(_LABEL_CHARS)):
        raise ValueError(f"predicted labels must lie in 0..{len(_LABEL_CHARS) - 1}, got "
                         f"{int(predicted.min())}..{int(predicted.max())}")
    n = int(test_fingerprint.get("n", -1))
    if n != len(predicted):
        raise ValueError(f"{len(predicted)} predictions for a test set of {n} images")
    return {"format": PREDICTIONS_FORMAT, "test": dict(test_fingerprint), "n": n,
            "predicted": "".join(_LABEL_CHARS[int(v)] for v in predicted.tolist()),
            "correct": np.packbits(correct.numpy().astype(np.uint8)).tobytes().hex()}


def decode_predictions(record: dict, row) -> tuple["Any", "Any"]:
    """``(predicted (n,) int8, correct (n,) bool)`` NumPy arrays of a predictions record, after
    checking that it belongs to ``row`` (a result row: ``key``, ``inputs`` JSON, ``accuracy``): the
    same key, the same test data fingerprint, as many images, and the row's accuracy. Raises
    ``ValueError`` naming what differs."""
    import json

    import numpy as np

    key = row["key"]
    if record.get("key") != key:
        raise ValueError(f"predictions record of key {record.get('key')} offered for row {key}")
    if record.get("format") != PREDICTIONS_FORMAT:
        raise ValueError(f"predictions of {key}: unknown format {record.get('format')!r}")
    inputs = json.loads(row["inputs"]) if isinstance(row["inputs"], str) else dict(row["inputs"])
    if record.get("test") != inputs.get("test"):
        raise ValueError(f"predictions of {key} were made on other test data ({record.get('test')}) than its row's "
                         f"({inputs.get('test')})")
    n = int(record["n"])
    text = record["predicted"]
    if len(text) != n:
        raise ValueError(f"predictions of {key}: {len(text)} labels for {n} test images")
    predicted = np.frombuffer(text.encode(), dtype=np.uint8)
    predicted = np.where(predicted >= ord("a"), predicted - ord("a") + 10, predicted - ord("0")).astype(np.int8)
    bits = np.frombuffer(bytes.fromhex(record["correct"]), dtype=np.uint8)
    if len(bits) != (n + 7) // 8:
        raise ValueError(f"predictions of {key}: {len(bits) * 8} correctness bits for {n} test images")
    correct = np.unpackbits(bits)[:n].astype(bool)
    acc = float(row["accuracy"])
    if abs(correct.mean() - acc) > 5.5e-6:        # the row's accuracy is rounded to 5 decimals
        raise ValueError(f"predictions of {key} give accuracy {correct.mean():.6f}, its row {acc}: not the same run")
    return predicted, correct


def with_predictions(df, store: ResultStore):
    """``df`` (rows of ``store``) with a ``correct`` column: each row's per-image correctness flags
    (:func:`decode_predictions`) where its cell stored predictions, else None."""
    records = store.read_attachments("predictions") if "predictions" in store.attachments else {}
    df = df.copy()
    df["correct"] = [decode_predictions(records[r["key"]], r)[1] if r["key"] in records else None
                     for r in df.to_dict("records")] if len(df) else []
    return df


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
    _check_init(cfg.init)
    # the committed cells were drawn with the "method" scheme and have no "init" in their keys
    init = {} if cfg.init == "method" else {"init": cfg.init}
    return {"n_train": cfg.n_train, "n_test": cfg.n_test, "val_fraction": cfg.val_fraction, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "select": cfg.select, "precision": precision,
            **init, **METHODS[method].settings(cfg)}


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
                    why = method_available(meth, cfg, d, m, int(s))
                    extra = {"unavailable": why} if why else METHODS[meth].inputs(cfg, d, m, int(s))
                    cells.append(Cell("classification", {"dataset": d, "mask": m, "method": meth, "seed": int(s)},
                                      cell_settings(cfg, meth), {**data_inputs, **extra}))
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
    _check_init(init)
    torch.manual_seed(_stable_seed("init", dataset, mask, method, seed))
    model = build_classifier(arch, method, in_channels=in_channels, image_size=image_size)
    layers = [name for name, mod in model.named_modules() if any(True for _ in mod.parameters(recurse=False))]
    if init == "method":
        return model, layers
    torch.manual_seed(_stable_seed("init-shared", dataset, seed))
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


def predict(model, images: torch.Tensor, missing: torch.Tensor, aux, *, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels ``(n,)`` (int64, CPU) of ``images (n, C, H, W)`` with ``missing`` pixels (bool
    ``(n, 1|C, H, W)``; NaN is put there), in eval mode without gradients: the computation of
    :func:`labkit.models.classifier.evaluate_accuracy`, keeping each image's answer."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            b = torch.arange(s, min(s + batch_size, len(images)))
            x, j = images[b].to(dev), missing[b].to(dev)
            x = _with_nan(x, j.expand_as(x))
            out.append(model(x, j, aux.get(b, x, j)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def run_cell(cell: Cell, cfg: SweepConfig) -> dict:
    """Train and test one cell; returns ``{"metrics", "details"}`` (the driver records them).

    Loads the cell's data itself (so it can run in another process or on another machine) and
    refuses to run when what it loaded is not what the plan fingerprinted.
    """
    from labkit.machine import machine_summary

    dataset, mask, method, seed = (cell.coords[k] for k in ACCURACY_COORDS)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    why = method_available(method, cfg, dataset, mask, seed)
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
    C, H, _ = data.train_images.shape[1:]
    model, own_layers = init_classifier(data.arch, method, dataset, mask, seed, in_channels=C, image_size=H,
                                        init=cfg.init)
    model = model.to(dev)
    run_config = {"cell": cell.key, "n_train": len(data.fit_idx), "n_val": len(data.val_idx),
                  "n_test": len(data.test_images), "batch_size": cfg.batch_size, "lr": cfg.lr, "select": cfg.select}
    ckpt = cfg.cache_path() / "runs" / cfg.profile / f"{dataset}-{mask}-{method}-s{seed}-{cell.key[:12]}.partial.pt"
    t1 = time.perf_counter()
    history, sel = train_classifier(model, data, aux_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                    seed=seed, checkpoint=ckpt, select=cfg.select, device=dev,
                                    progress=cfg.progress, config=run_config, eval_batch=cfg.eval_batch,
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
    return with_predictions(with_settings_columns(df[df["key"].isin({c.key for c in cells})]), store)


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
        if method_available(name, cfg, dataset, mask, seed):
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


