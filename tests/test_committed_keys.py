"""Every committed result keeps its key.

Two checks per committed results file:

1. *The row against itself*: a row's key is the digest of its study, coordinates, stored settings
   and stored input fingerprints (:class:`labkit.studies.engine.Cell`). Recomputed here from the
   row's own columns, it must be the key the row is filed under: a row whose settings were edited
   by hand, or a change to how keys are computed, fails.
2. *The row against today's code*: the profile's grid planned from its config, as the study's
   command plans it, gives each cell a key; wherever the file holds rows at that cell's
   coordinates, one of them must carry exactly that key. A refactor that changes what enters a
   cell's settings or inputs (a renamed setting, a default resolved differently, a path in place
   of a content hash) fails here, before a rerun silently recomputes the committed grid.

The planners below are the only code that names each study's API.
"""
from __future__ import annotations

import json

import pytest

from labkit import paths
from labkit.studies.engine import Cell

pytestmark = pytest.mark.usefixtures("one_thread")

#: committed results file -> (study name in the keys, coordinate columns)
COMMITTED = {
    "results/classification/cpu/accuracy.csv": ("classification", ["dataset", "mask", "method", "seed"]),
    "results/classification/cpu10/accuracy.csv": ("classification", ["dataset", "mask", "method", "seed"]),
    "results/wae/cpu/metrics.csv": ("wae", ["dataset", "front", "seed"]),
    "results/wae/cpu_lr_disc_4e-6/metrics.csv": ("wae", ["dataset", "front", "seed"]),
    "results/dmfa/cpu/density.csv": ("density", ["dataset", "mode", "missing_kind", "hole", "seed"]),
}


def _rows(relpath: str) -> list[dict]:
    import csv

    with open(paths.repo_path(relpath), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _coords(row: dict, names: list[str]) -> dict:
    out = {}
    for n in names:
        v = row[n]
        out[n] = int(v) if n in ("seed", "hole") and v not in ("", "None") else v
    return out


@pytest.mark.parametrize("relpath", sorted(COMMITTED))
def test_each_committed_row_is_filed_under_the_digest_of_its_own_columns(relpath):
    study, coord_names = COMMITTED[relpath]
    rows = _rows(relpath)
    assert rows, f"{relpath} holds no rows"
    for row in rows:
        cell = Cell(study, _coords(row, coord_names), json.loads(row["settings"]), json.loads(row["inputs"]))
        assert cell.key == row["key"], f"{relpath}: row {cell.label()} is filed under {row['key']}, its columns digest to {cell.key}"


# ------------------------------------------------------------------ today's planners, one per study
def _plan_classification(profile: str):
    from labkit.studies import classification as clf
    from labkit.studies.configs import ClassificationConfig

    return clf.plan(ClassificationConfig.build(profile))


def _plan_wae(profile: str):
    from labkit.studies import wae

    return wae.plan(wae.WAEConfig.build(profile))


def _plan_density(profile: str):
    """The committed DMFA sweep rows: the square DMFA replicates of seeds 1 and 2, both modes, stored
    in float16 (the seed-0 DMFAs were trained before the sweep engine recorded rows)."""
    from labkit.studies import density
    from labkit.studies.configs import DensityConfig

    cfg = DensityConfig.build(profile, {"device": "cpu", "weights_dtype": "float16", "modes": ["complete", "incomplete"],
                                        "missing_kinds": ["square"], "holes": [None], "seeds": [1, 2]})
    return density.plan(cfg)


#: (file, planner, profile, settings that tell rows of another grid variant apart at the same
#: coordinates: the WAE file also holds the rows of the joint-step recipe, kept beside the authors' loop)
PLANS = [
    ("results/classification/cpu/accuracy.csv", _plan_classification, "cpu", ()),
    ("results/classification/cpu10/accuracy.csv", _plan_classification, "cpu10", ()),
    ("results/wae/cpu/metrics.csv", _plan_wae, "cpu", ("recipe",)),
    ("results/dmfa/cpu/density.csv", _plan_density, "cpu", ()),
]


@pytest.mark.parametrize("relpath,plan,profile,variant", PLANS, ids=[p[0].split("results/")[1] for p in PLANS])
def test_todays_code_plans_the_committed_keys(relpath, plan, profile, variant):
    study, coord_names = COMMITTED[relpath]
    by_coords: dict[str, set[str]] = {}
    for row in _rows(relpath):
        settings = json.loads(row["settings"])
        tag = json.dumps([_coords(row, coord_names), [settings.get(v) for v in variant]], sort_keys=True)
        by_coords.setdefault(tag, set()).add(row["key"])
    cells = plan(profile)
    matched, missing = 0, []
    for cell in cells:
        tag = json.dumps([dict(cell.coords), [cell.settings.get(v) for v in variant]], sort_keys=True)
        keys = by_coords.get(tag)
        if not keys:
            continue                        # not run yet (a sweep still under way)
        if cell.key in keys:
            matched += 1
        else:
            missing.append(f"{cell.label()} planned {cell.key}, committed {sorted(keys)}")
    assert not missing, f"{relpath}: today's code plans other keys than the committed rows:\n" + "\n".join(missing)
    assert matched >= min(len(cells), 4), f"{relpath}: only {matched} of {len(cells)} planned cells have committed rows"
