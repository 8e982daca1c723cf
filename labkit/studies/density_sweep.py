"""The density study's DMFA runs as engine cells: a grid of (mode, missing kind, hole, seed) runs.

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
  coordinate ``missing_kind = "none"`` (:data:`COMPLETE_KIND`).
- :func:`run_density_cell`: what a worker runs for one cell (module level: Ray pickles it).
- :func:`run_density_sweep`: plan, then run through the engine.

Cells of one mode, kind and hole but other seeds write files of one stem (``run_experiment`` names
its files after mode, kind and hole; a model of other settings gets ``<stem>-<digest8>``, decided
when it starts). Two of them running at once would share ``<stem>.pt`` and its resumable
``_scratch`` checkpoint, so :func:`run_density_sweep` runs such cells in successive waves: within a
wave every cell has its own stem, and cells of a wave run side by side on a Ray executor.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from labkit.studies import engine
from labkit.studies.engine import Cell, CellOutcome, ResultStore, SweepFailed

__all__ = ["COMPLETE_KIND", "COORDS", "METRICS", "SETTINGS", "density_store", "plan_density_cells",
           "run_density_cell", "run_density_sweep"]

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
    "precision": "32",
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
def plan_density_cells(dataset: str, modes: Sequence[str], missing_kinds: Sequence[str],
                       holes: Sequence[int | None], seeds: Sequence[int], params: Mapping[str, Any]) -> list[Cell]:
    """The cells of a grid, seeds outermost (every run of seed 0 comes before any of seed 1).

    Args:
        dataset: the data set ("mnist", ...).
        modes: "complete" and/or "incomplete".
        missing_kinds: kinds of the incomplete-data training images' truly missing data
            (:data:`labkit.masks.MASK_KINDS`); complete cells take :data:`COMPLETE_KIND` instead.
        holes: hole sides (train and test); ``None`` is half the image side. The coordinate holds the number.
        seeds: run seeds (model initialisation, masks, validation split).
        params: :func:`run_experiment`'s arguments (:data:`SETTINGS`, plus :data:`RUN_OPTIONS`).

    Settings of a cell: the sizes actually loaded (``n_train`` counts the images loaded before
    ``n_val`` are held out), epochs, batch size, lr and its schedule, the MSE warm-up, K, L and the
    precision resolved for ``params["device"]``. Inputs: fingerprints of the training and test
    images (loaded as :func:`run_experiment` loads them) and a digest of the test holes.
    """
    from labkit.device import resolve_device
    from labkit.masks import MASK_KINDS
    from labkit.models.dmfa import DATASET_SHAPES, _check_int, _dataset_key, test_masks
    from labkit.precision import resolve_precision
    from labkit.studies.density import _hole_sides, _load_split

    p = _check_params(params)
    key = _dataset_key(dataset)
    C, H, W = DATASET_SHAPES[key]
    modes = _unique(modes, "modes")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; valid: {', '.join(MODES)}")
    kinds = _unique(missing_kinds, "missing_kinds")
    bad = [k for k in kinds if k not in MASK_KINDS]
    if bad:
        raise ValueError(f"unknown missing kind(s) {bad}; valid: {', '.join(MASK_KINDS)}")
    holes = _unique(_hole_sides(_unique(holes, "holes"), H), "holes")
    too_big = [h for h in holes if h > min(H, W)]
    if too_big:
        raise ValueError(f"hole side(s) {too_big} exceed the {H}x{W} images of {key}")
    seeds = [_check_int(s, "seed", 0) for s in _unique(seeds, "seeds")]

    train = _load_split(key, "train", p["n_train"])
    test = _load_split(key, "test", p["n_test"])
    n_val = _check_int(p["n_val"], "n_val", 0)
    if n_val >= len(train):
        raise ValueError(f"n_val = {n_val} leaves no training image out of the {len(train)} loaded")
    lr, lr_gamma = float(p["lr"]), float(p["lr_gamma"])
    if not lr > 0:
        raise ValueError(f"lr must be a positive number, got {p['lr']!r}")
    settings = {
        "n_train": int(len(train)), "n_val": n_val, "n_test": int(len(test)),
        "epochs": _check_int(p["epochs"], "epochs", 0), "batch_size": _check_int(p["batch_size"], "batch_size", 1),
        "lr": lr, "lr_milestones": sorted(_check_int(m, "lr_milestones entries", 1) for m in p["lr_milestones"]),
        "lr_gamma": lr_gamma, "mse_warmup_epochs": _check_int(p["mse_warmup_epochs"], "mse_warmup_epochs", 0),
        "n_components": _check_int(p["n_components"], "n_components", 1),
        "n_factors": _check_int(p["n_factors"], "n_factors", 0),
        "precision": resolve_precision(p["precision"], resolve_device(p.get("device"))),
    }
    data = {"train": engine.data_fingerprint(train.images, source=train.source, name=key, split="train"),
            "test": engine.data_fingerprint(test.images, source=test.source, name=key, split="test")}
    cells = []
    for seed in seeds:
        for hole in holes:
            masks = engine.tensor_digest(test_masks(len(test), H, W, side=hole, seed=seed, device="cpu"))
            for mode in modes:
                for kind in (kinds if mode == "incomplete" else [COMPLETE_KIND]):
                    coords = {"dataset": key, "mode": mode, "missing_kind": kind, "hole": hole, "seed": seed}
                    cells.append(Cell(STUDY, coords, dict(settings), {**data, "test_masks": masks}))
    return cells


# ============================================================================ running
def _stem(cell: Cell) -> str:
    """The file stem :func:`run_experiment` starts from for ``cell`` (its naming rule, restated)."""
    from labkit.studies.density import result_stem

    c = cell.coords
    mode = c["mode"] if c["mode"] == "complete" or c["missing_kind"] == "square" else f"{c['mode']}_{c['missing_kind']}"
    return result_stem(c["dataset"], mode, c["hole"])


def _check_data_unchanged(cell: Cell) -> None:
    """Raise :class:`~labkit.studies.engine.InputError` when this machine loads other images than the
    cell was planned on (another data file on a worker node): its row would claim the wrong data."""
    from labkit.studies.density import _load_split

    c, s = cell.coords, cell.settings
    for split, n in (("train", s["n_train"]), ("test", s["n_test"])):
        got = _load_split(c["dataset"], split, n)
        now = engine.data_fingerprint(got.images, source=got.source, name=c["dataset"], split=split)
        if now != cell.inputs[split]:
            diffs = engine.settings_differences(cell.inputs[split], now)
            raise engine.InputError(f"the {c['dataset']} {split} images loaded here differ from those the cell was "
                                    f"planned on ({'; '.join(diffs)}); give every machine the same data files")


def run_density_cell(cell: Cell, params: Mapping[str, Any], *, device: Any = None) -> dict:
    """Run one density cell: :func:`labkit.studies.density.run_experiment` with the cell's coordinates
    and settings; its files (checkpoint, CSV, JSON, figures) go to ``params["results_dir"]`` as today.

    ``params`` supplies the run options (``results_dir``, ``device``, ``profile``, ``n_figure``,
    ``progress``); its settings are the cell's business and are not read. ``device`` overrides
    ``params["device"]``. Writes no result row (the driver records it).

    Returns ``{"metrics": {"test_nll", "test_sse"}, "details": {...}}`` (details: the files, the
    validation NLL, throughputs, the data sources).
    """
    from labkit.studies.density import run_experiment

    if not isinstance(cell, Cell) or cell.study != STUDY:
        raise ValueError(f"run_density_cell runs cells of the {STUDY!r} study, got {cell!r}")
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
        precision=s["precision"],
    )
    n_val = r.get("n_val") or 0                  # the checkpoint's meta says None when none is held out
    if r["n_test"] != s["n_test"] or r["n_train"] + n_val != s["n_train"]:
        raise RuntimeError(f"run_experiment used {r['n_train']} + {n_val} training and {r['n_test']} test images; "
                           f"the cell was planned with {s['n_train']} and {s['n_test']}")
    details = {"files": {k: Path(v).name for k, v in r["paths"].items()},
               **{k: r.get(k) for k in ("test_nll_sem", "final_val_nll", "train_images_per_s", "infer_images_per_s",
                                        "checkpoint_mb", "data_source", "test_source", "trained_at", "profile")
                  if r.get(k) is not None}}
    return {"metrics": {"test_nll": r["test_nll"], "test_sse": r["test_sse"]}, "details": details}


def _waves(cells: Sequence[Cell], done: set[str]) -> list[list[Cell]]:
    """``cells`` in waves in which no two cells still to run share a file stem (done cells go in the first)."""
    waves: list[list[Cell]] = [[c for c in cells if c.key in done]]
    depth: dict[str, int] = {}
    for c in cells:
        if c.key in done:
            continue
        i = depth.get(_stem(c), 0)
        depth[_stem(c)] = i + 1
        while len(waves) <= i:
            waves.append([])
        waves[i].append(c)
    return [w for w in waves if w]


def run_density_sweep(dataset: str, modes: Sequence[str], missing_kinds: Sequence[str], holes: Sequence[int | None],
                      seeds: Sequence[int], params: Mapping[str, Any], *, executor: Any = None,
                      raise_on_failure: bool = True, log: Callable[[str], None] | None = None,
                      cell_fn: Callable[..., Mapping] | None = None) -> list[CellOutcome]:
    """Run every planned cell (:func:`plan_density_cells`) whose key is not yet in
    ``<params["results_dir"]>/density.csv``, recording each row as it arrives.

    ``executor``: where cells run (default: one after another here; a Ray executor runs the cells
    of a wave side by side, see the module docstring; ``results_dir`` must then be a folder every
    worker sees). A failing cell is reported and the others run; at the end :class:`SweepFailed`
    lists the failures (``raise_on_failure=False``: only returned). ``cell_fn(cell, params=...,
    device=...)`` replaces :func:`run_density_cell` (tests). Returns one outcome per planned cell.
    """
    say = log or (lambda text: print(text, flush=True))
    p = _check_params(params, results_dir=True)
    # an absolute folder: Ray workers do not run in the driver's working directory
    p["results_dir"] = str(Path(p["results_dir"]).resolve())
    cells = plan_density_cells(dataset, modes, missing_kinds, holes, seeds, p)
    store = density_store(p["results_dir"])
    fn = functools.partial(cell_fn or run_density_cell, params=p, device=p.get("device"))
    waves = _waves(cells, store.done_keys())
    outcomes: dict[str, CellOutcome] = {}
    for number, wave in enumerate(waves, start=1):
        if len(waves) > 1:
            say(f"[density] wave {number} of {len(waves)}: {len(wave)} cell(s) (runs of one mode, kind and hole "
                "write files of one stem, so their seeds run in turn)")
        for o in engine.run_cells(wave, fn, store, executor=executor, raise_on_failure=False, log=log):
            outcomes[o.cell.key] = o
    result = [outcomes[c.key] for c in cells if c.key in outcomes]
    failed = [o for o in result if o.status == "failed"]
    if failed and raise_on_failure:
        raise SweepFailed(failed)
    return result
