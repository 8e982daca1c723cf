"""The density study's DMFA runs as engine cells: a grid of (data set, mode, missing kind, hole, seed) runs.

Each cell is one :func:`labkit.studies.density.run_experiment` call (train or load a DMFA, score
it on the test holes, write its per-image CSV, JSON summary and figures as one set). The engine
(:func:`labkit.studies.engine.run_cells`) runs the cells here or on a Ray cluster
(:func:`labkit.studies.executors.make_executor`) and records one row per cell in
``<results_dir>/density.csv`` (details in ``density_runs.jsonl``): a rerun skips recorded cells, and
a cell made with other settings or other images gets another key, hence its own row.

- :func:`density_store`: the result rows (coordinates ``dataset``, ``mode``, ``missing_kind``,
  ``hole``, ``seed``; metrics ``test_nll``, ``test_sse``: means per test image over the hidden
  square, as in the JSON summaries).
- :func:`plan_density_cells`: the cells of a grid. A complete-data DMFA has no truly missing data,
  so the missing kind does not apply to it: one complete cell per (hole, seed), with the
  coordinate ``missing_kind = "none"`` (:data:`COMPLETE_KIND`). A data set that cannot be loaded
  (or that the settings do not fit) makes only its own cells fail, each naming why.
- :func:`run_density_cell`: what a worker runs for one cell (module level: Ray pickles it).
- :func:`run_density_sweep`: plan, then run through the engine.

Keys hold what a result depends on and nothing of where it was made: the data enter by content
(count, shape and a hash of the images), never by the folder they were read from, so another
clone, data folder or symlink finds the same rows. Rows recorded under the earlier keys, whose
data fingerprints held the source line with its absolute paths, are adopted under today's keys
when everything else agrees (origin ``migrated``).

Every cell has its own file stem (``run_experiment`` names its files after data set, mode, kind,
hole and seed) and holds the claim on it while it runs (:func:`labkit.studies.density.own_files`),
so cells of one grid never share a checkpoint, a ``_scratch`` partial checkpoint or result files,
whether they run one after another, side by side on Ray, or split between two processes started
on the same grid. A sweep ends with :class:`SweepIncomplete` (a :class:`SweepFailed`) when cells
failed or were left unfinished (held by another process that never recorded them).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from labkit.studies import engine
from labkit.studies.engine import Cell, CellOutcome, ResultStore, SweepFailed, SweepIncomplete
from labkit.studies.engine import unfinished_text as _unfinished_text

__all__ = ["COMPLETE_KIND", "COORDS", "METRICS", "SETTINGS", "SweepIncomplete", "density_store",
           "plan_density_cells", "run_density_cell", "run_density_sweep"]

STUDY = "density"
COORDS = ["dataset", "mode", "missing_kind", "hole", "seed"]
METRICS = ["test_nll", "test_sse"]
MODES = ("complete", "incomplete")
#: the ``missing_kind`` coordinate of complete-data cells (their training data has no missing part)
COMPLETE_KIND = "none"

#: run_experiment's arguments that change a result, with their defaults (``None``: required)
SETTINGS: dict[str, Any] = {
    "n_train": None, "n_val": 0, "n_test": None, "epochs": None, "batch_size": None, "lr": None,
    "lr_milestones": (), "lr_gamma": 1.0, "mse_warmup_epochs": 0, "n_components": 1, "n_factors": 4,
    "precision": "32", "weights_dtype": "float32",
}
#: run_experiment's arguments that change where and how a cell runs, not its result
RUN_OPTIONS = ("results_dir", "device", "profile", "n_figure", "progress")


def _check_params(params: Mapping[str, Any], *, settings: bool = True, results_dir: bool = False) -> dict:
    """``params`` with the defaults of :data:`SETTINGS` filled in; unknown names raise, and so do
    missing required settings (``settings``) or a missing ``results_dir`` (``results_dir``)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of run_experiment arguments, got {type(params).__name__}")
    unknown = sorted(set(params) - set(SETTINGS) - set(RUN_OPTIONS))
    if unknown:
        raise ValueError(f"unknown density parameter(s) {unknown}; valid: {', '.join([*SETTINGS, *RUN_OPTIONS])}")
    p = {k: v for k, v in SETTINGS.items() if v is not None}
    p.update(params)
    missing = [k for k, v in SETTINGS.items() if settings and v is None and k not in params]
    if results_dir and params.get("results_dir") is None:
        missing.append("results_dir")
    if missing:
        raise ValueError(f"density parameter(s) {missing} are required")
    return p


def _unique(values: Sequence[Any] | Any, name: str) -> list:
    """``values`` as a list without repeats, in order (a plan must not hold one cell twice)."""
    if isinstance(values, (str, int)) or values is None:
        values = [values]
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError(f"{name} is empty: give at least one value")
    return out


# ============================================================================ results
def density_store(results_dir: str | os.PathLike) -> ResultStore:
    """The density cells' rows: ``<results_dir>/density.csv`` and ``<results_dir>/density_runs.jsonl``."""
    folder = Path(results_dir)
    return ResultStore(folder / "density.csv", coords=COORDS, metrics=METRICS, details=folder / "density_runs.jsonl",
                       int_coords=("hole", "seed"))


# ============================================================================ planning
def _data_identity(images, name: str, split: str) -> dict:
    """The fingerprint a key holds of a split: name, split, count, shape and content hash; the
    ``source`` line (which names the folder the files lay in) is left empty."""
    return engine.data_fingerprint(images, source="", name=name, split=split)


def plan_density_cells(dataset: str | Sequence[str], modes: Sequence[str], missing_kinds: Sequence[str],
                       holes: Sequence[int | None], seeds: Sequence[int], params: Mapping[str, Any]) -> list[Cell]:
    """The cells of a grid, seeds outermost (every run of seed 0 comes before any of seed 1).

    Args:
        dataset: the data set ("mnist", ...) or several (a grid over data sets).
        modes: "complete" and/or "incomplete".
        missing_kinds: kinds of the incomplete-data training images' truly missing data
            (:data:`labkit.masks.MASK_KINDS`); complete cells take :data:`COMPLETE_KIND` instead.
        holes: hole sides (train and test); ``None`` is half the image side. The coordinate holds the number.
        seeds: run seeds (model initialisation, masks, validation split).
        params: :func:`run_experiment`'s arguments (:data:`SETTINGS`, plus :data:`RUN_OPTIONS`).

    Settings of a cell: the sizes actually loaded (``n_train`` counts the images loaded before
    ``n_val`` are held out), epochs, batch size, lr and its schedule, the MSE warm-up, K, L and the
    precision resolved for ``params["device"]``. Inputs: content fingerprints of the training and
    test images (loaded as :func:`run_experiment` loads them; no path) and a digest of the test holes.

    A data set whose images cannot be loaded here, or that the settings do not fit (``n_val`` not
    below its image count, a hole larger than its images), is not an error of the grid: its cells
    get ``inputs["unavailable"]`` (why), and :func:`run_density_cell` fails them with that reason.
    Errors of the grid itself (an unknown mode, kind, data set name or setting) raise here.
    """
    from labkit.device import resolve_device
    from labkit.masks import MASK_KINDS
    from labkit.checks import check_int
    from labkit.data import canonical_dataset
    from labkit.precision import resolve_precision

    p = _check_params(params)
    datasets = [canonical_dataset(d) for d in _unique(dataset, "dataset")]
    modes = _unique(modes, "modes")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; valid: {', '.join(MODES)}")
    kinds = _unique(missing_kinds, "missing_kinds")
    bad = [k for k in kinds if k not in MASK_KINDS]
    if bad:
        raise ValueError(f"unknown missing kind(s) {bad}; valid: {', '.join(MASK_KINDS)}")
    holes = _unique(holes, "holes")
    seeds = [check_int(s, "seed", 0) for s in _unique(seeds, "seeds")]
    n_val = check_int(p["n_val"], "n_val", 0)
    lr, lr_gamma = float(p["lr"]), float(p["lr_gamma"])
    if not lr > 0:
        raise ValueError(f"lr must be a positive number, got {p['lr']!r}")
    common = {
        "n_val": n_val, "epochs": check_int(p["epochs"], "epochs", 0),
        "batch_size": check_int(p["batch_size"], "batch_size", 1),
        "lr": lr, "lr_milestones": sorted(check_int(m, "lr_milestones entries", 1) for m in p["lr_milestones"]),
        "lr_gamma": lr_gamma, "mse_warmup_epochs": check_int(p["mse_warmup_epochs"], "mse_warmup_epochs", 0),
        "n_components": check_int(p["n_components"], "n_components", 1),
        "n_factors": check_int(p["n_factors"], "n_factors", 0),
        "precision": resolve_precision(p["precision"], resolve_device(p.get("device"))),
        # in the key only when not the default, so the keys of float32 runs are those they always had
        **({"weights_dtype": p["weights_dtype"]} if p.get("weights_dtype", "float32") != "float32" else {}),
    }
    planned = {key: _plan_data(key, holes, seeds, p, common) for key in datasets}
    cells = []
    for seed in seeds:
        for key in datasets:
            settings, inputs, masks, sides = planned[key]
            for hole in sides:
                for mode in modes:
                    for kind in (kinds if mode == "incomplete" else [COMPLETE_KIND]):
                        coords = {"dataset": key, "mode": mode, "missing_kind": kind, "hole": hole, "seed": seed}
                        extra = {"test_masks": masks[(seed, hole)]} if masks else {}
                        cells.append(Cell(STUDY, coords, dict(settings), {**inputs, **extra}))
    return cells


def _plan_data(key: str, holes: list, seeds: list[int], p: Mapping[str, Any], common: Mapping[str, Any]):
    """``(settings, inputs, {(seed, hole): masks digest}, hole sides)`` of one data set of a grid; a
    data set that cannot be planned gives ``inputs = {"unavailable": why}`` and no masks."""
    from labkit.models.dmfa import DATASET_SHAPES, test_masks
    from labkit.studies.density import _hole_sides, _load_split

    C, H, W = DATASET_SHAPES[key]
    sides = _unique(_hole_sides(holes, H), "holes")
    requested = {"n_train": p["n_train"], **common, "n_test": p["n_test"]}
    try:
        too_big = [h for h in sides if h > min(H, W)]
        if too_big:
            raise ValueError(f"hole side(s) {too_big} exceed the {H}x{W} images of {key}")
        train = _load_split(key, "train", p["n_train"])
        test = _load_split(key, "test", p["n_test"])
        if common["n_val"] >= len(train):
            raise ValueError(f"n_val = {common['n_val']} leaves no training image out of the {len(train)} {key} "
                             "images loaded")
    except (OSError, ValueError, RuntimeError) as exc:      # FileNotFoundError is an OSError
        why = f"{key} cannot be planned here: {type(exc).__name__}: {exc}"
        return requested, {"unavailable": why}, {}, sides
    settings = {"n_train": int(len(train)), **common, "n_test": int(len(test))}
    inputs = {"train": _data_identity(train.images, key, "train"), "test": _data_identity(test.images, key, "test")}
    masks = {(seed, hole): engine.tensor_digest(test_masks(len(test), H, W, side=hole, seed=seed, device="cpu"))
             for seed in seeds for hole in sides}
    return settings, inputs, masks, sides


# ============================================================================ running
def _stem(cell: Cell) -> str:
    """The file stem :func:`run_experiment` starts from for ``cell`` (its naming rule, restated)."""
    from labkit.studies.density import result_stem

    c = cell.coords
    mode = c["mode"] if c["mode"] == "complete" or c["missing_kind"] == "square" else f"{c['mode']}_{c['missing_kind']}"
    return result_stem(c["dataset"], mode, c["hole"], seed=c["seed"])


def _check_data_unchanged(cell: Cell) -> None:
    """Raise :class:`~labkit.studies.engine.InputError` when this machine loads other images than the
    cell was planned on (another data file on a worker node): its row would claim the wrong data."""
    from labkit.studies.density import _load_split

    c, s = cell.coords, cell.settings
    for split, n in (("train", s["n_train"]), ("test", s["n_test"])):
        got = _load_split(c["dataset"], split, n)
        now = _data_identity(got.images, c["dataset"], split)
        if now != cell.inputs[split]:
            diffs = engine.settings_differences(cell.inputs[split], now)
            raise engine.InputError(f"the {c['dataset']} {split} images loaded here ({got.source}) differ from those "
                                    f"the cell was planned on ({'; '.join(diffs)}); give every machine the same data")


def run_density_cell(cell: Cell, params: Mapping[str, Any], *, device: Any = None) -> dict:
    """Run one density cell: :func:`labkit.studies.density.run_experiment` with the cell's coordinates
    and settings; its files (checkpoint, CSV, JSON, figures) go to ``params["results_dir"]`` as today.

    ``params`` supplies the run options (``results_dir``, ``device``, ``profile``, ``n_figure``,
    ``progress``); its settings are the cell's business and are not read. ``device`` overrides
    ``params["device"]``. Writes no result row (the driver records it). A cell planned without its
    data (``inputs["unavailable"]``) raises :class:`~labkit.studies.engine.InputError` with the reason.

    Returns ``{"metrics": {"test_nll", "test_sse"}, "details": {...}}`` (details: the files, the
    validation NLL, throughputs, the data sources).
    """
    from labkit.studies.density import run_experiment

    if not isinstance(cell, Cell) or cell.study != STUDY:
        raise ValueError(f"run_density_cell runs cells of the {STUDY!r} study, got {cell!r}")
    if cell.inputs.get("unavailable"):
        raise engine.InputError(cell.inputs["unavailable"])
    p = _check_params(params, settings=False, results_dir=True)
    c, s = cell.coords, cell.settings
    _check_data_unchanged(cell)
    kind = "square" if c["mode"] == "complete" else c["missing_kind"]     # ignored in complete mode
    r = run_experiment(
        c["dataset"], c["mode"], results_dir=p["results_dir"], n_train=s["n_train"], n_val=s["n_val"],
        n_test=s["n_test"], hole=c["hole"], epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
        lr_milestones=s["lr_milestones"], lr_gamma=s["lr_gamma"], mse_warmup_epochs=s["mse_warmup_epochs"],
        n_components=s["n_components"], n_factors=s["n_factors"], missing_kind=kind, seed=c["seed"],
        profile=p.get("profile"), n_figure=p.get("n_figure", 6),
        device=device if device is not None else p.get("device"), progress=p.get("progress", True),
        precision=s["precision"], weights_dtype=s.get("weights_dtype", "float32"),
    )
    n_val = r.get("n_val") or 0                  # the checkpoint's meta says None when none is held out
    if r["n_test"] != s["n_test"] or r["n_train"] + n_val != s["n_train"]:
        raise RuntimeError(f"run_experiment used {r['n_train']} + {n_val} training and {r['n_test']} test images; "
                           f"the cell was planned with {s['n_train']} and {s['n_test']}")
    if r.get("seed", c["seed"]) != c["seed"]:
        raise RuntimeError(f"{Path(r['paths']['setting']).name} records seed {r['seed']}, the cell is seed {c['seed']}")
    details = {"files": {k: Path(v).name for k, v in r["paths"].items()},
               **{k: r.get(k) for k in ("test_nll_sem", "final_val_nll", "train_images_per_s", "infer_images_per_s",
                                        "checkpoint_mb", "data_source", "test_source", "trained_at", "profile")
                  if r.get(k) is not None}}
    return {"metrics": {"test_nll": r["test_nll"], "test_sse": r["test_sse"]}, "details": details}


def _without_sources(inputs: Mapping[str, Any]) -> dict:
    """A cell's inputs with the ``source`` of every data fingerprint left out (keys made before data
    entered keys by content alone held the source line, absolute paths included)."""
    return {k: ({f: x for f, x in v.items() if f != "source"} if isinstance(v, Mapping) and "sha" in v else v)
            for k, v in engine.canonical(inputs).items()}


def _adopt_earlier_rows(store: ResultStore, cells: Sequence[Cell], say: Callable[[str], None]) -> int:
    """Record under today's key every row of ``store`` made under an earlier key of a planned cell: the
    same coordinates, settings and inputs but for the data fingerprints' ``source`` lines. The old
    row stays; the new one says ``origin = migrated`` and its details name the old key. Returns how
    many rows were adopted."""
    rows = store.read(report=False)
    if len(rows) == 0:
        return 0
    done = set(rows["key"])
    todo = {}
    for c in cells:
        if c.key not in done and "unavailable" not in c.inputs:
            ident = (json.dumps(engine.canonical(c.coords), sort_keys=True),
                     json.dumps(engine.canonical(c.settings), sort_keys=True),
                     json.dumps(_without_sources(c.inputs), sort_keys=True))
            todo[ident] = c
    if not todo:
        return 0
    details = {d.get("key"): d for d in store.read_details()}
    adopted = 0
    for r in rows.to_dict("records"):
        coords = {k: (int(r[k]) if k in ("hole", "seed") else r[k]) for k in COORDS}
        try:
            ident = (json.dumps(engine.canonical(coords), sort_keys=True),
                     json.dumps(engine.canonical(json.loads(r["settings"])), sort_keys=True),
                     json.dumps(_without_sources(json.loads(r["inputs"])), sort_keys=True))
        except (TypeError, ValueError):
            continue
        cell = todo.pop(ident, None)
        if cell is None:
            continue
        old = {k: v for k, v in (details.get(r["key"]) or {}).items() if k not in ("key", "study", "coords")}
        store.record(cell, {m: r[m] for m in METRICS}, {**old, "migrated_from": r["key"]}, origin="migrated")
        say(f"[density] {cell.short()}: adopted the row recorded under its earlier key #{r['key'][:8]} "
            "(data fingerprints with paths)")
        adopted += 1
    return adopted


def run_density_sweep(dataset: str | Sequence[str], modes: Sequence[str], missing_kinds: Sequence[str],
                      holes: Sequence[int | None], seeds: Sequence[int], params: Mapping[str, Any], *,
                      executor: Any = None, raise_on_failure: bool = True, log: Callable[[str], None] | None = None,
                      cell_fn: Callable[..., Mapping] | None = None, resume: str = "") -> list[CellOutcome]:
    """Run every planned cell (:func:`plan_density_cells`) whose key is not yet in
    ``<params["results_dir"]>/density.csv``, recording each row as it arrives.

    ``executor``: where cells run (default: one after another here; a Ray executor runs them side by
    side; ``results_dir`` must then be a folder every worker sees). Every cell writes files of its
    own stem, under its claim (see the module docstring). A failing cell is reported and the others
    run; so are the cells of a data set that cannot be loaded. Cells held by another process come
    back "waiting"; at the end they are tried once more (its process may have died, releasing
    them), and those still not recorded are *unfinished*: listed, with how to resume (``resume``:
    the command to give, default "run the same sweep again").

    At the end :class:`SweepIncomplete` (a :class:`SweepFailed`) lists the failed and unfinished
    cells (``raise_on_failure=False``: only returned, and the unfinished ones printed).
    ``cell_fn(cell, params=..., device=...)`` replaces :func:`run_density_cell` (tests). Returns one
    outcome per planned cell.
    """
    say = log or (lambda text: print(text, flush=True))
    p = _check_params(params, results_dir=True)
    # an absolute folder: Ray workers do not run in the driver's working directory
    p["results_dir"] = str(Path(p["results_dir"]).resolve())
    cells = plan_density_cells(dataset, modes, missing_kinds, holes, seeds, p)
    for c in cells:
        if "unavailable" in c.inputs:
            say(f"[density] {c.short()}: will fail, {c.inputs['unavailable']}")
    store = density_store(p["results_dir"])
    _adopt_earlier_rows(store, cells, say)
    fn = functools.partial(cell_fn or run_density_cell, params=p, device=p.get("device"))
    outcomes = {o.cell.key: o for o in engine.run_cells(cells, fn, store, executor=executor, raise_on_failure=False,
                                                        log=log)}
    waiting = [c for c in cells if c.key in outcomes and outcomes[c.key].status == "waiting"]
    if waiting:
        say(f"[density] {len(waiting)} cell(s) were held by another process: trying them once more")
        for o in engine.run_cells(waiting, fn, store, executor=executor, raise_on_failure=False, log=log):
            outcomes[o.cell.key] = o
    result = [outcomes[c.key] for c in cells if c.key in outcomes]
    failed = [o for o in result if o.status == "failed"]
    unfinished = [o for o in result if o.status == "waiting"]
    if unfinished:
        say(f"[density] {_unfinished_text(unfinished, resume)}")
    if (failed or unfinished) and raise_on_failure:
        raise SweepIncomplete(failed, unfinished, resume)
    return result
