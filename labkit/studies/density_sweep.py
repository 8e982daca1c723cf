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
- :func:`plan_density_cells`: the cells of a config's grid (its ``modes``, ``missing_kinds``,
  ``holes`` and ``seeds``; :class:`~labkit.studies.configs.DensityConfig`). A complete-data DMFA has no truly missing data,
  so the missing kind does not apply to it: one complete cell per (hole, seed), with the
  coordinate ``missing_kind = "none"`` (:data:`COMPLETE_KIND`). A data set that cannot be loaded
  (or that the settings do not fit) is no error of the plan: its cells fail, each naming why.
- :func:`run_density_cell`: what a worker runs for one cell (module level: Ray pickles it).
- :func:`run_density_sweep`: plan, then run through the engine (what :func:`labkit.studies.density.run`
  does, its precision resolved once).

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
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from labkit.data import canonical_dataset
from labkit.device import resolve_device
from labkit.models.dmfa import DATASET_SHAPES, test_masks
from labkit.precision import resolve_precision
from labkit.studies import density_experiment as experiment
from labkit.studies import engine
from labkit.studies.configs import DensityConfig
from labkit.studies.density_experiment import hole_sides, recipe_from, result_stem, results_path
from labkit.studies.engine import Cell, CellOutcome, ResultStore, SweepFailed, SweepIncomplete
from labkit.studies.engine import unfinished_text as _unfinished_text

__all__ = ["COMPLETE_KIND", "COORDS", "METRICS", "SweepFailed", "SweepIncomplete", "cell_arguments",
           "cell_settings", "density_store", "plan_density_cells", "run_density_cell", "run_density_sweep"]

STUDY = "density"
COORDS = ["dataset", "mode", "missing_kind", "hole", "seed"]
METRICS = ["test_nll", "test_sse"]
#: the ``missing_kind`` coordinate of complete-data cells (their training data has no missing part)
COMPLETE_KIND = "none"


def _unique(values: Sequence[Any]) -> list:
    """``values`` without repeats, in order (``None`` and the default side written twice are one hole)."""
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


# ============================================================================ results
def density_store(results_dir: str | Path) -> ResultStore:
    """The density cells' rows: ``<results_dir>/density.csv`` and ``<results_dir>/density_runs.jsonl``."""
    folder = Path(results_dir)
    return ResultStore(folder / "density.csv", coords=COORDS, metrics=METRICS, details=folder / "density_runs.jsonl",
                       int_coords=("hole", "seed"))


# ============================================================================ planning
def _data_identity(images, name: str, split: str) -> dict:
    """The fingerprint a key holds of a split: name, split, count, shape and content hash; the
    ``source`` line (which names the folder the files lay in) is left empty."""
    return engine.data_fingerprint(images, source="", name=name, split=split)


def cell_settings(cfg: DensityConfig) -> dict:
    """What every cell of the config's grid records as its settings, but for the sizes loaded
    (``n_train``, ``n_test``: counted when planned): ``n_val`` and the DMFA recipe
    (:func:`~labkit.studies.density_experiment.recipe_from`), its precision resolved for
    ``cfg.device``. ``weights_dtype`` enters only when not float32, so the keys of float32 runs are
    those they always had."""
    recipe = recipe_from(cfg)
    return {
        "n_val": cfg.n_val, "epochs": recipe.epochs, "batch_size": recipe.batch_size, "lr": recipe.lr,
        "lr_milestones": list(recipe.lr_milestones), "lr_gamma": recipe.lr_gamma,
        "mse_warmup_epochs": recipe.mse_warmup_epochs, "n_components": recipe.n_components,
        "n_factors": recipe.n_factors, "precision": resolve_precision(recipe.precision, resolve_device(cfg.device)),
        **({"weights_dtype": recipe.weights_dtype} if recipe.weights_dtype != "float32" else {}),
    }


def plan_density_cells(cfg: DensityConfig) -> list[Cell]:
    """The cells of the config's grid, seeds outermost (every run of seed 0 comes before any of seed 1):
    per seed, hole side (``None``: half the image side; the coordinate holds the number) and mode, the
    incomplete cells once per missing kind, the complete cell once.

    Settings of a cell: the sizes actually loaded (``n_train`` counts the images loaded before
    ``n_val`` are held out, ``n_test``) and :func:`cell_settings`. Inputs: content fingerprints of
    the training and test images (loaded as :func:`~labkit.studies.density_experiment.run_experiment`
    loads them; no path) and a digest of the test holes.

    A data set whose images cannot be loaded here, or that the settings do not fit (``n_val`` not
    below its image count, a hole larger than its images), is no error of the plan: its cells get
    ``inputs["unavailable"]`` (why), and :func:`run_density_cell` fails them with that reason.
    """
    key = canonical_dataset(cfg.dataset)
    common = cell_settings(cfg)
    settings, inputs, masks, sides = _plan_data(key, cfg, common)
    cells = []
    for seed in cfg.seeds:
        for hole in sides:
            for mode in cfg.modes:
                for kind in (cfg.missing_kinds if mode == "incomplete" else [COMPLETE_KIND]):
                    coords = {"dataset": key, "mode": mode, "missing_kind": kind, "hole": hole, "seed": seed}
                    extra = {"test_masks": masks[(seed, hole)]} if masks else {}
                    cells.append(Cell(STUDY, coords, dict(settings), {**inputs, **extra}))
    return cells


def _plan_data(key: str, cfg: DensityConfig, common: Mapping[str, Any]):
    """``(settings, inputs, {(seed, hole): masks digest}, hole sides)`` of the data set of a grid; a
    data set that cannot be planned gives ``inputs = {"unavailable": why}`` and no masks."""
    C, H, W = DATASET_SHAPES[key]
    sides = _unique(hole_sides(cfg.holes, H))
    requested = {"n_train": cfg.n_train, **common, "n_test": cfg.n_test}
    try:
        too_big = [h for h in sides if h > min(H, W)]
        if too_big:
            raise ValueError(f"hole side(s) {too_big} exceed the {H}x{W} images of {key}")
        train = experiment.load_split(key, "train", cfg.n_train)
        test = experiment.load_split(key, "test", cfg.n_test)
        if common["n_val"] >= len(train):
            raise ValueError(f"n_val = {common['n_val']} leaves no training image out of the {len(train)} {key} "
                             "images loaded")
    except (OSError, ValueError, RuntimeError) as exc:      # FileNotFoundError is an OSError
        why = f"{key} cannot be planned here: {type(exc).__name__}: {exc}"
        return requested, {"unavailable": why}, {}, sides
    settings = {"n_train": int(len(train)), **common, "n_test": int(len(test))}
    inputs = {"train": _data_identity(train.images, key, "train"), "test": _data_identity(test.images, key, "test")}
    masks = {(seed, hole): engine.tensor_digest(test_masks(len(test), H, W, side=hole, seed=seed, device="cpu"))
             for seed in cfg.seeds for hole in sides}
    return settings, inputs, masks, sides


# ============================================================================ running
def cell_arguments(cell: Cell) -> dict:
    """The point of the grid a cell is, as :func:`~labkit.studies.density_experiment.run_experiment`
    takes it: ``mode``, ``missing_kind`` (``"square"`` for complete cells: not used), ``hole``, ``seed``."""
    c = cell.coords
    return {"mode": c["mode"], "missing_kind": "square" if c["mode"] == "complete" else c["missing_kind"],
            "hole": c["hole"], "seed": c["seed"]}


def _stem(cell: Cell) -> str:
    """The file stem :func:`run_experiment` starts from for ``cell`` (its naming rule, restated)."""
    c = cell.coords
    mode = c["mode"] if c["mode"] == "complete" or c["missing_kind"] == "square" else f"{c['mode']}_{c['missing_kind']}"
    return result_stem(c["dataset"], mode, c["hole"], seed=c["seed"])


def _check_data_unchanged(cell: Cell) -> None:
    """Raise :class:`~labkit.studies.engine.InputError` when this machine loads other images than the
    cell was planned on (another data file on a worker node): its row would claim the wrong data."""
    c, s = cell.coords, cell.settings
    for split, n in (("train", s["n_train"]), ("test", s["n_test"])):
        got = experiment.load_split(c["dataset"], split, n)
        now = _data_identity(got.images, c["dataset"], split)
        if now != cell.inputs[split]:
            diffs = engine.settings_differences(cell.inputs[split], now)
            raise engine.InputError(f"the {c['dataset']} {split} images loaded here ({got.source}) differ from those "
                                    f"the cell was planned on ({'; '.join(diffs)}); give every machine the same data")


def run_density_cell(cell: Cell, cfg: DensityConfig, *, device: Any = None, progress: bool = True) -> dict:
    """Run one density cell: :func:`~labkit.studies.density_experiment.run_experiment` of ``cfg`` at the
    cell's point of the grid; its files (checkpoint, CSV, JSON, figures) go to the config's results
    folder. Writes no result row (the driver records it). ``device``: default ``cfg.device``.

    Refused with :class:`~labkit.studies.engine.InputError`: a cell planned without its data
    (``inputs["unavailable"]``, with the reason), a cell whose settings are not the config's (it was
    planned from another config), and images on this machine other than those planned on.

    Returns ``{"metrics": {"test_nll", "test_sse"}, "details": {...}}`` (details: the files, the
    validation NLL, throughputs, the data sources).
    """
    if not isinstance(cell, Cell) or cell.study != STUDY:
        raise ValueError(f"run_density_cell runs cells of the {STUDY!r} study, got {cell!r}")
    if cell.inputs.get("unavailable"):
        raise engine.InputError(cell.inputs["unavailable"])
    c, s = cell.coords, cell.settings
    common = cell_settings(cfg)
    planned = {k: v for k, v in s.items() if k not in ("n_train", "n_test")}
    if engine.canonical(planned) != engine.canonical(common):
        diffs = engine.settings_differences(planned, common)
        raise engine.InputError(f"the cell was planned with other settings than this config's ({'; '.join(diffs)})")
    _check_data_unchanged(cell)
    r = experiment.run_experiment(cfg, **cell_arguments(cell), device=device, progress=progress)
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


def run_density_sweep(cfg: DensityConfig, *, executor: Any = None, raise_on_failure: bool = True,
                      log: Callable[[str], None] | None = None, cell_fn: Callable[..., Mapping] | None = None,
                      resume: str = "", progress: bool = True, wait: bool = False, poll_seconds: float = 300.0,
                      max_cells: int | None = None, cells: Sequence[Cell] | None = None,
                      on_outcome: Callable[[CellOutcome], None] | None = None) -> list[CellOutcome]:
    """Run every planned cell (:func:`plan_density_cells`) whose key is not yet in
    ``<results_path(cfg)>/density.csv``, recording each row as it arrives.

    ``executor``: where cells run (default: one after another here; a Ray executor runs them side by
    side; the results folder must then be one every worker sees). Every cell writes files of its
    own stem, under its claim (see the module docstring). A failing cell is reported and the others
    run; so are the cells of a data set that cannot be loaded. Cells held by another process come
    back "waiting"; at the end they are tried once more (its process may have died, releasing
    them), and those still not recorded are *unfinished*: listed, with how to resume (``resume``:
    the command to give, default "run the same sweep again").

    At the end :class:`SweepIncomplete` (a :class:`SweepFailed`) lists the failed and unfinished
    cells (``raise_on_failure=False``: only returned, and the unfinished ones printed).
    ``cells``: the config's plan when the caller has it already. ``wait``, ``poll_seconds``,
    ``max_cells``, ``on_outcome``: as :func:`labkit.studies.engine.run_cells`.
    ``cell_fn(cell, cfg, device=..., progress=...)`` replaces :func:`run_density_cell` (tests).
    Returns one outcome per planned cell.
    """
    say = log or (lambda text: print(text, flush=True))
    # an absolute folder: Ray workers do not run in the driver's working directory
    cfg = cfg.replace(results_dir=str(results_path(cfg).resolve()))
    cells = plan_density_cells(cfg) if cells is None else list(cells)
    for c in cells:
        if "unavailable" in c.inputs:
            say(f"[density] {c.short()}: will fail, {c.inputs['unavailable']}")
    store = density_store(cfg.results_dir)
    _adopt_earlier_rows(store, cells, say)
    fn = functools.partial(cell_fn or run_density_cell, cfg=cfg, device=cfg.device, progress=progress)
    more = dict(wait=wait, poll_seconds=poll_seconds, raise_on_failure=False, log=log, on_outcome=on_outcome)
    outcomes = {o.cell.key: o for o in engine.run_cells(cells, fn, store, executor=executor, max_cells=max_cells,
                                                        **more)}
    waiting = [c for c in cells if c.key in outcomes and outcomes[c.key].status == "waiting"]
    ran = sum(o.status in ("ran", "failed") for o in outcomes.values())
    left = None if max_cells is None else max_cells - ran
    if waiting and (left is None or left > 0):
        say(f"[density] {len(waiting)} cell(s) were held by another process: trying them once more")
        for o in engine.run_cells(waiting, fn, store, executor=executor, max_cells=left, **more):
            outcomes[o.cell.key] = o
    result = [outcomes[c.key] for c in cells if c.key in outcomes]
    failed = [o for o in result if o.status == "failed"]
    unfinished = [o for o in result if o.status == "waiting"]
    if unfinished:
        say(f"[density] {_unfinished_text(unfinished, resume)}")
    if (failed or unfinished) and raise_on_failure:
        raise SweepIncomplete(failed, unfinished, resume)
    return result
