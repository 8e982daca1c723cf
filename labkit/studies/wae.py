r"""The WAE study (notebook 03, ``./lab study wae``): WAE-GANs trained on incomplete images.

Reproduces the WAE study of *MisConv: Convolutional Neural Networks for Missing Data*,
Przewięźlikowski, Śmieja, Struski, Tabor, WACV 2022, https://arxiv.org/abs/2110.14010 (supplementary
section 1.3).

One *cell* = (dataset, front, seed): a :class:`labkit.models.wae.WAE` whose encoder starts with the
front is trained on incomplete images and scored on the complete test images
(:mod:`labkit.studies.wae_cells`). The data, the fixed per-image masks (:mod:`labkit.studies.cells`)
and the fronts' auxiliaries (imputations, per-image MFAs: :mod:`labkit.studies.imputers`) are those
of the classification study: same masks, same on-disk caches.

The settings are one frozen :class:`~labkit.studies.configs.WAEConfig` (its grid: ``dataset`` x
``fronts`` x ``seeds``). Entry points, as every study has them:

- :func:`plan` turns the config into :class:`~labkit.studies.engine.Cell` s whose keys digest the
  coordinates, every setting that changes the result (sizes, epochs, batch size, learning rates,
  recipe, λ, reconstruction loss, precision, the feature network's training) and the fingerprints
  of the inputs (the images and labels used, the masks, the DMFA/ACFlow checkpoint the front reads,
  a given feature classifier);
- :func:`run` runs the cells not yet in ``results_path(cfg)/metrics.csv`` (:func:`result_store`;
  details per run in ``runs.jsonl``): a failing cell is reported, the others run, and
  :class:`~labkit.studies.engine.SweepFailed` lists the failures at the end;
- :func:`read_rows` reads the rows of planned cells back, :func:`write_report`
  (:mod:`labkit.studies.wae_report`) writes their table and figures beside the results and into a
  document's marked block.

:func:`summary_table` / :func:`table_markdown` / :func:`plot_metrics` report the rows of the
planned cells (:func:`~labkit.studies.engine.check_uniform` refuses to put rows made with other
settings side by side) next to the authors' numbers (:data:`AUTHORS_WAE_MNIST`). Metrics
(:mod:`labkit.metrics`): PSNR and SSIM over the missing region and the whole image; the whole-image
PSNR/SSIM as scikit-image computes them when called like the authors did
(``psnr_all_skimage``/``ssim_all_skimage``: its float SSIM assumes a data range of 2); Fréchet
distances between features of the lab's own classifier (:func:`feature_network`; :data:`FD_NAME`),
since no Inception weights can be downloaded here.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from labkit import paths
from labkit.checkpoint import atomic_save, load_checkpoint
from labkit.studies import engine
from labkit.studies.cells import fingerprint_cell, load_cell_data
from labkit.studies.configs import FRONT_ALIASES, WAEConfig
from labkit.studies.engine import Cell
from labkit.studies.imputers import METHODS
# one-way: the cell's work, the feature network and the report live below this module; their public
# names are re-exported so that ``wae.table_markdown`` or ``wae.run_cell`` keep working
from labkit.studies.wae_cells import (PRIOR_BLOCK, canonical_front, check_inputs_unchanged, dataset_arch,  # noqa: F401
                                      evaluate_wae, front_available, front_inputs, imputer_config, resolved,
                                      run_cell, training_settings)
from labkit.studies.wae_features import (FEATURE_RECIPE, classifier_features, feature_data, feature_map,  # noqa: F401
                                         feature_network)
from labkit.studies.wae_report import (AUTHORS_WAE_MNIST, COLUMN_NAMES, COORDS, FD_NAME, FRONT_ORDER,  # noqa: F401
                                       FRONT_SETTINGS, METRIC_COLUMNS, SKIMAGE_COLUMNS, cell_stem, file_stem,
                                       load_examples, plot_front_grid, plot_metrics, plot_reconstructions,
                                       plot_samples, read_results, result_store, results_path, scratch_path,
                                       settings_line, shared_settings, summary_table, table_markdown, write_report)

__all__ = [
    "AUTHORS_WAE_MNIST",
    "COLUMN_NAMES",
    "COORDS",
    "COST_GROUP",
    "FD_NAME",
    "FEATURE_RECIPE",
    "FRONT_ALIASES",
    "FRONT_ORDER",
    "FRONT_SETTINGS",
    "METRIC_COLUMNS",
    "PRIOR_BLOCK",
    "RENAMED_RECIPES",
    "SKIMAGE_COLUMNS",
    "WAEConfig",
    "canonical_front",
    "cell_stem",
    "check_inputs_unchanged",
    "classifier_features",
    "dataset_arch",
    "evaluate_wae",
    "feature_data",
    "feature_map",
    "feature_network",
    "file_stem",
    "front_available",
    "front_inputs",
    "imputer_config",
    "load_examples",
    "migrate_renamed_recipes",
    "plan",
    "plan_cell",
    "plot_front_grid",
    "plot_metrics",
    "plot_reconstructions",
    "plot_samples",
    "read_results",
    "read_rows",
    "resolved",
    "result_store",
    "results_path",
    "run",
    "run_cell",
    "scratch_path",
    "settings_line",
    "shared_settings",
    "summary_table",
    "table_markdown",
    "training_settings",
    "write_report",
]

#: the coordinate whose finished cells estimate the cost of the planned ones (a front's cells cost alike)
COST_GROUP = "front"


# --------------------------------------------------------------------------- planning
def _feature_spec(dataset: str, cfg: WAEConfig, data) -> tuple[dict, dict]:
    """(settings, inputs) of the feature network: a trained file (an input), or how to train one."""
    if cfg.feature_checkpoint:
        return {}, {"feature_net": engine.input_fingerprint(paths.repo_path(cfg.feature_checkpoint),
                                                            "feature classifier checkpoint")}
    fdata = feature_data(dataset, cfg, data)
    settings = {"features": {**FEATURE_RECIPE, "epochs": cfg.feature_epochs, "n_train": int(len(fdata.train_images))}}
    inputs = {}
    if fdata is not data:
        inputs["feature_data"] = fingerprint_cell(fdata)["train"]
    return settings, inputs


def plan_cell(dataset: str, front: str, seed: int, cfg: WAEConfig, *, data=None) -> Cell:
    """The :class:`~labkit.studies.engine.Cell` of (dataset, front, seed) under ``cfg``.

    Settings: sizes actually used, mask kind, epochs, batch size, lr, the recipe's settings
    (recipe, λ, discriminator weight, reconstruction loss, ``lr_disc`` for "supplement"),
    precision (resolved for the device), the WAE architecture, the feature network's training and
    the front's imputer settings (k-NN, MFA, ACFlow only). Inputs: fingerprints of the training and
    test images with labels, a digest of both splits' masks, the front's checkpoint and a given
    feature classifier (``inputs["unavailable"]`` says why a front's checkpoint is missing).
    ``data``: the cell data of (dataset, seed) if already loaded.
    """
    front = canonical_front(front)
    arch = dataset_arch(dataset)
    cfg = resolved(cfg)
    if data is None:
        data = load_cell_data(dataset, cfg.mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=0.0,
                              quiet=True)
    training = training_settings(cfg)
    training.pop("optimizers")               # follows from the recipe
    settings = {"mask": cfg.mask, "n_train": int(len(data.train_images)), "n_test": int(len(data.test_images)),
                "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": float(cfg.lr), **training,
                "precision": cfg.precision, "architecture": arch}
    imputer = METHODS[front].settings(imputer_config(cfg))
    if imputer:
        settings["imputer"] = imputer
    fp = fingerprint_cell(data)
    inputs = {"train": fp["train"], "test": fp["test"], "masks": fp["masks"], **front_inputs(front, cfg, dataset)}
    f_settings, f_inputs = _feature_spec(dataset, cfg, data)
    settings.update(f_settings)
    inputs.update(f_inputs)
    return Cell("wae", {"dataset": dataset, "front": front, "seed": int(seed)}, settings, inputs)


def plan(cfg: WAEConfig) -> list[Cell]:
    """The cells of ``cfg.dataset`` x ``cfg.fronts`` x ``cfg.seeds`` in run order: seeds outermost,
    so every front has seed 0 before any has seed 1."""
    dataset_arch(cfg.dataset)
    cfg = resolved(cfg)
    fronts = [canonical_front(f) for f in cfg.fronts]
    cells = []
    for s in cfg.seeds:
        data = load_cell_data(cfg.dataset, cfg.mask, s, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=0.0,
                              quiet=True)
        cells += [plan_cell(cfg.dataset, f, s, cfg, data=data) for f in fronts]
    return cells


def read_rows(cfg: WAEConfig, cells: list[Cell]) -> pd.DataFrame:
    """The rows of ``cells`` recorded in ``results_path(cfg)`` (in the store's order)."""
    df = result_store(results_path(cfg)).read()
    return df[df["key"].isin([c.key for c in cells])].reset_index(drop=True)


# --------------------------------------------------------------------------- the sweep
def _cell_job(cfg: WAEConfig, progress: bool, cell: Cell) -> dict:
    """What the engine runs for a cell (module level, so that executors can pickle it with ``cfg``)."""
    return run_cell(cell, cfg, progress=progress)


def run(cfg: WAEConfig, *, progress: bool = True, executor=None, wait: bool | None = None,
        poll_seconds: float = 300.0, max_cells: int | None = None,
        on_record: Callable[[engine.CellOutcome], None] | None = None,
        cell_fn: Callable[[WAEConfig, Cell], dict] | None = None) -> pd.DataFrame:
    """Run every planned cell (:func:`plan`) whose key is not yet in ``results_path(cfg)/metrics.csv``.

    The engine (:func:`labkit.studies.engine.run_cells`) records each finished cell at once (its
    settings and input fingerprints beside its metrics; details in ``runs.jsonl``); a rerun skips
    done cells, and an interrupted cell resumes from its last finished epoch. Fronts whose
    checkpoint (DMFA, ACFlow) does not exist yet wait: they are left for a later run, or waited for
    with ``wait`` (default ``cfg.wait``; the cells are planned again every ``poll_seconds`` until it
    appears: its fingerprint is part of the key). A failing cell is reported and the others run; at
    the end :class:`~labkit.studies.engine.SweepIncomplete` (a :class:`SweepFailed`) lists the
    failures and the cells another copy of the sweep still holds.

    ``progress``: per-epoch bars and loading messages; ``executor``: where cells run (default: one
    after another here); ``max_cells``: run at most this many; ``on_record(outcome)``: called as
    each cell ends; ``cell_fn(cfg, cell) -> {"metrics", "details"}`` replaces :func:`run_cell`
    (tests). Returns the rows of the planned cells.
    """
    cfg = resolved(cfg)
    wait = cfg.wait if wait is None else wait
    store = result_store(results_path(cfg))
    fn = functools.partial(cell_fn, cfg) if cell_fn is not None else functools.partial(_cell_job, cfg, progress)
    failed: dict[str, engine.CellOutcome] = {}
    budget = max_cells
    while True:
        cells = plan(cfg)
        outcomes = engine.run_cells(
            cells, fn, store, executor=executor, max_cells=budget, raise_on_failure=False, on_outcome=on_record,
            available=lambda c: front_available(c.coords["front"], cfg, c.coords["dataset"]))
        for o in outcomes:
            if o.status == "failed":
                failed[o.cell.key] = o
        if budget is not None:
            budget -= sum(o.status in ("ran", "failed") for o in outcomes)
        waiting = [o for o in outcomes if o.status == "waiting"]
        if not waiting or not wait or (budget is not None and budget <= 0):
            break
        time.sleep(poll_seconds)
    if budget is None or budget > 0:
        outcomes = engine.retry_held(outcomes, fn, store, executor=executor)
    failed.update({o.cell.key: o for o in outcomes if o.status == "failed"})
    unfinished = engine.held_unfinished(outcomes)
    if unfinished:
        print(f"[wae] {engine.unfinished_text(unfinished)}", flush=True)
    if failed or unfinished:
        raise engine.SweepIncomplete(list(failed.values()), unfinished)
    return read_rows(cfg, cells)


# --------------------------------------------------------------------------- the joint step's rename
#: recipe names rows may carry from before a rename -> (their name now, the marker of the new
#: recipe's settings that such rows lack): the joint step was called "authors" until the authors'
#: alternating step took the name
RENAMED_RECIPES = {"authors": ("authors_joint", "step")}


def migrate_renamed_recipes(results_dir: str | Path, *, dry_run: bool = False) -> list[tuple[str, str]]:
    """Rename the recipe of rows made under its old name (:data:`RENAMED_RECIPES`), with their keys.

    A row of ``<results_dir>/metrics.csv`` whose settings say recipe "authors" without a ``step``
    was made with the joint step (now ``"authors_joint"``): its settings get the new name and its key
    is recomputed from coordinates, new settings and inputs (the key of the same cell planned with
    ``recipe="authors_joint"``). Its ``runs.jsonl`` record gets the new key and settings and a
    ``recipe_renamed`` note; its figures ``figures/<stem>-*.png`` and working files
    ``_scratch/models/<stem>.pt`` (:func:`cell_stem`) move to the new stem. The CSV and the JSONL
    are written as one set. Every other row and line stays byte for byte. A row whose stored key
    is not the digest of its stored coordinates, settings and inputs is refused (``ValueError``):
    its key cannot be carried over. Returns ``[(old key, new key), ...]`` (nothing written with
    ``dry_run``); a second run finds nothing to do.
    """
    store = result_store(results_dir)
    folder = store.path.parent
    if not store.path.exists():
        return []
    with engine.locked(store.path):
        engine.recover(folder)
        text = store.path.read_text(encoding="utf-8")
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames != store.columns:
            raise ValueError(f"{store.path}: header {reader.fieldnames} is not the WAE study's {store.columns}")
        rows = list(reader)
        renames: dict[str, tuple[str, dict, dict]] = {}
        for row in rows:
            settings = json.loads(row["settings"])
            old_name = settings.get("recipe")
            if old_name not in RENAMED_RECIPES or RENAMED_RECIPES[old_name][1] in settings:
                continue
            coords = {"dataset": row["dataset"], "front": row["front"], "seed": int(row["seed"])}
            inputs = json.loads(row["inputs"])
            if Cell("wae", coords, settings, inputs).key != row["key"]:
                raise ValueError(f"{store.path}: row {row['key']} ({coords}) has a key that is not the digest of its "
                                 "stored coordinates, settings and inputs: it cannot be renamed safely")
            new_settings = {**settings, "recipe": RENAMED_RECIPES[old_name][0]}
            new_key = Cell("wae", coords, new_settings, inputs).key
            renames[row["key"]] = (new_key, new_settings, coords)
            row["key"], row["settings"] = new_key, _settings_json(new_settings)
        if not renames or dry_run:
            return [(old, new) for old, (new, _, _) in renames.items()]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=store.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        files = {store.path: out.getvalue()}
        if store.details is not None and store.details.exists():
            lines = store.details.read_text(encoding="utf-8").splitlines(keepends=True)
            for i, line in enumerate(lines):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(rec, dict) or rec.get("key") not in renames:
                    continue
                new_key, new_settings, _ = renames[rec["key"]]
                rec.update(key=new_key, recipe_renamed={"from": rec.get("settings", {}).get("recipe", "authors"),
                                                        "to": new_settings["recipe"], "old_key": rec["key"]})
                if "settings" in rec:
                    rec["settings"] = engine.canonical(new_settings)
                lines[i] = json.dumps(rec, sort_keys=True) + ("\n" if line.endswith("\n") else "")
            files[store.details] = "".join(lines)
        engine.write_files(files)
    for old_key, (new_key, new_settings, coords) in renames.items():
        stem = f"{coords['dataset']}-{coords['front']}-s{coords['seed']}"
        for what in ("reconstruction", "samples"):
            old_fig = folder / "figures" / f"{stem}-{old_key[:8]}-{what}.png"
            if old_fig.exists():
                old_fig.replace(folder / "figures" / f"{stem}-{new_key[:8]}-{what}.png")
        old_model = folder / "_scratch" / "models" / f"{stem}-{old_key[:8]}.pt"
        if old_model.exists():
            stored = load_checkpoint(old_model, map_location="cpu")
            stored.update(key=new_key, settings=engine.canonical(new_settings))
            atomic_save(stored, folder / "_scratch" / "models" / f"{stem}-{new_key[:8]}.pt")
            old_model.unlink()
    return [(old, new) for old, (new, _, _) in renames.items()]


def _settings_json(obj: Any) -> str:
    """``obj`` as the canonical JSON the store writes in its ``settings``/``inputs`` columns."""
    return json.dumps(engine.canonical(obj), sort_keys=True, separators=(",", ":"))
