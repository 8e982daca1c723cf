"""What ``./lab run`` decides for one notebook before it runs (:func:`prepare_notebook`): its data,
its results folder (the profile's own, or an ad-hoc one) and, for a sweep, the plan of its cells;
:mod:`labkit.lab.runplan` holds the pieces every study command shares."""
from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit import paths
from labkit.checkpoint import load_checkpoint
from labkit.data import canonical_dataset
from labkit.lab.runplan import (ADHOC, DataMatch, Destination, SplitData, changed_settings, choose_destination,
                                data_lines, effective_count, inspect_split, match_cells, match_labels, plan_sweep,
                                source_label)
from labkit.studies.configs import CONFIGS
from labkit.studies.draw_models import stored_settings

__all__ = ["DISPLAY", "NOTEBOOK_STUDIES", "NotebookPlan", "SWEEP_NOTEBOOKS", "committed_dmfa_labels",
           "prepare_notebook"]

#: the notebooks whose study is a sweep of cells planned before it runs: stem -> the study's module
#: (its ``plan(cfg)``, ``result_store(folder)`` and ``COST_GROUP``)
SWEEP_NOTEBOOKS = {"02_classification": "labkit.studies.classification", "03_wae": "labkit.studies.wae"}

#: parameters of a notebook that change only what it shows, not what it computes or stores
DISPLAY = {"05_draw_a_mask": frozenset({"image_index", "n_images", "scale", "brush", "n_samples"})}

#: the notebooks whose results a study folder holds: stem -> (study folder, whether the committed
#: folder is per profile, the notebook's parameter naming its results folder)
NOTEBOOK_STUDIES = {"01_dmfa": ("dmfa", True, "results_dir"), "02_classification": ("classification", True, "results_dir"),
                    "03_wae": ("wae", True, "results_dir"), "04_timing": ("timing", True, "results_dir"),
                    "05_draw_a_mask": ("draw", False, "out_dir")}


@dataclass
class NotebookPlan:
    """:func:`prepare_notebook`'s answer: the parameters to run with and the lines to print first."""

    params: dict[str, Any]
    lines: list[str]
    destination: Destination | None = None


def committed_dmfa_labels(folder: str | os.PathLike, dataset: str) -> set[str]:
    """The :func:`source_label` s of the training data of the density study's committed results of
    ``dataset`` (the ``data_source`` of the ``<stem>.json`` files in ``folder``)."""
    try:
        want = canonical_dataset(dataset)
    except ValueError:
        want = dataset
    folder = Path(folder)
    labels = set()
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            setting = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(setting, dict) and setting.get("dataset") == want
                and isinstance(setting.get("data_source"), str)):
            labels.add(source_label(setting["data_source"]))
    return labels


def _committed_draw_labels(folder: Path) -> set[str]:
    labels = set()
    for path in sorted(folder.glob("classifier_*.pt")) if folder.is_dir() else ():
        try:
            stored = load_checkpoint(path, map_location="cpu")
        except Exception:  # noqa: BLE001 - a file that does not load is no evidence either way
            continue
        meta = stored.get("meta") if isinstance(stored, Mapping) else None
        if isinstance(meta, Mapping):
            labels.add(stored_settings(meta).get("data_kind", "files"))
    return labels


def prepare_notebook(stem: str, profile: str | os.PathLike, params: Mapping[str, Any],
                     profile_params: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None,
                     explicit: Iterable[str] = (), into_committed: bool = False) -> NotebookPlan:
    """Decide, for one notebook of ``./lab run``, its data, its results folder and its sweep's plan.

    Args:
        stem: the notebook (``02_classification``).
        profile: the profile's name or YAML path.
        params: the checked parameters it would run with; ``profile_params``: the profile's own.
        defaults: the notebook's own defaults (its parameters cell), for what the profile leaves out.
        explicit: the keys set by ``-p`` (a ``results_dir`` among them is the user's choice).
        into_committed: let an ad-hoc run write into the profile's committed results.

    Returns the parameters to run with (``results_dir``/``out_dir`` pointing at the ad-hoc folder
    when the run is ad hoc; ``n_train``/``n_test`` lowered to what exists) and the lines to print.
    A notebook that is no study (the tour) comes back unchanged. Raises ``ValueError`` for a refused
    destination (:func:`choose_destination`).
    """
    given = dict(params)
    name = Path(os.fspath(profile)).stem
    if stem not in NOTEBOOK_STUDIES:
        return NotebookPlan(given, [])
    defaults = dict(defaults or {})
    params = {**defaults, **given}                     # what the notebook will run with
    profile_params = {**defaults, **profile_params}
    study, per_profile, folder_key = NOTEBOOK_STUDIES[stem]
    committed = paths.results_dir(study, name) if per_profile else paths.results_dir(study)
    adhoc_root = paths.results_dir(study, ADHOC)
    if folder_key not in params:
        folder_key = None
    lines: list[str] = []
    splits: list[SplitData] = []
    if "dataset" in params and ("n_train" in params or "n_test" in params):
        for split, key in (("train", "n_train"), ("test", "n_test")):
            if key in params:
                try:
                    splits.append(inspect_split(params["dataset"], split, params[key]))
                except (FileNotFoundError, ValueError) as exc:
                    lines.append(f"data: {params['dataset']} {split} cannot be loaded ({exc})")
        for d in splits:
            key = "n_train" if d.split == "train" else "n_test"
            if d.short_of:
                params[key] = given[key] = effective_count(d)
        lines += data_lines(splits)
    match = DataMatch(None, "no data to compare")
    sweep = None
    cells = None
    module = None
    try:
        if stem in SWEEP_NOTEBOOKS:
            module = importlib.import_module(SWEEP_NOTEBOOKS[stem])
            config = CONFIGS[stem]
            cfg = config.build(None, {k: v for k, v in params.items() if k in config.names()},
                               origin="the notebook's parameters")
            cells = module.plan(cfg)
            match = match_cells(cells, module.result_store(committed))
        elif stem == "01_dmfa" and splits:
            match = match_labels(splits[0].label, committed_dmfa_labels(committed, params["dataset"]), committed)
        elif stem == "05_draw_a_mask" and splits:
            match = match_labels(splits[0].label, _committed_draw_labels(committed), committed)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        lines.append(f"plan: cannot plan {stem} ({type(exc).__name__}: {exc}); the notebook will say more")
    grid = CONFIGS[stem].grid_fields() if stem in CONFIGS else ()
    changed = changed_settings(profile_params, params, ignore=DISPLAY.get(stem, ()), grid=grid)
    chosen = params.get(folder_key) if folder_key and (folder_key in explicit or profile_params.get(folder_key)) else None
    dest = choose_destination(committed, adhoc_root, name, changed=changed, profile_params=profile_params,
                              match=match, data_label=splits[0].label if splits else None, explicit=chosen,
                              into_committed=into_committed)
    if splits or match.matches is not None:
        lines.append(f"data: {match.text}")
    if folder_key is not None:
        if dest.adhoc or chosen is not None or into_committed:
            given[folder_key] = str(dest.path)
        lines.append(dest.line())
    elif dest.adhoc:
        lines.append(f"results: this notebook has no results folder parameter; ad hoc ({'; '.join(dest.reasons)})")
    if cells is not None:
        sweep = plan_sweep(study, cells, module.result_store(dest.path), cost_from=[module.result_store(committed)],
                           group=module.COST_GROUP)
        lines.append(sweep.line())
    return NotebookPlan(given, lines, dest)
