#!/usr/bin/env python
"""Convert committed results made before the study engine into its keyed format, without rerunning.

    .venv/bin/python scripts/migrate_results.py classification [--profile cpu] [--dry-run]

Each old row becomes the row of the cell the engine plans today for the settings the row was made
with: its key digests the coordinates, the settings (checked against the row's ``runs.jsonl``
record; a disagreement stops the migration) and the fingerprints of its inputs (the images, labels
and masks, recomputed; the checkpoints it read, whose size must equal the one recorded). The row is
written with ``origin = "migrated"`` and its old record as details. A sweep run afterwards with the
same settings finds these cells done; a run with other settings plans other keys.

Before a row is migrated its masks are checked bit for bit: today's mask generators must draw the
masks that the committed run drew (the generators of the commit that made them are imported from
git and compared), so a migrated row never claims masks it was not made with. The inside-the-image
trapezoid was called ``trapezoid`` then; its rows become ``trapezoid_inside``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: the commit whose code made the committed classification sweep (its masks are compared)
CLASSIFICATION_COMMIT = "9cda24c"
OLD_HEADER = ["dataset", "mask", "method", "seed", "accuracy", "n_train", "n_test", "epochs"]
RENAMED_MASKS = {"trapezoid": "trapezoid_inside"}


def _old_masks_module(commit: str) -> types.ModuleType:
    """``labkit.masks`` as it was at ``commit`` (read with ``git show``), as a module of its own."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:labkit/masks.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"labkit_masks_{commit}")
    exec(compile(source, f"{commit}:labkit/masks.py", "exec"), module.__dict__)
    return module


def _check_masks_unchanged(old_masks, dataset: str, old_kind: str, new_kind: str, seed: int, n_train: int,
                           n_test: int, height: int, width: int) -> None:
    import torch

    from labkit.studies.cells import SEED_WORD, _stable_seed, cell_masks

    for split, n in (("train", n_train), ("test", n_test)):
        g = torch.Generator().manual_seed(_stable_seed("masks", dataset, split, old_kind, int(seed)))
        then = old_masks.make_masks(old_kind, n, height, width, generator=g, device="cpu")
        now = cell_masks(dataset, split, new_kind, seed, n, height, width)
        if SEED_WORD.get(new_kind, new_kind) != old_kind or not torch.equal(then, now):
            raise SystemExit(f"masks of {dataset}/{new_kind}/seed {seed} ({split}) differ from the ones the committed "
                             f"run drew with {old_kind!r} at {CLASSIFICATION_COMMIT}: cannot migrate those rows")


def classification(profile: str = "cpu", dry_run: bool = False) -> int:
    """Migrate ``results/classification/<profile>/accuracy.csv`` + ``runs.jsonl`` to the keyed store."""
    import csv

    from labkit.studies import classification as clf
    from labkit.studies.cells import load_cell_data
    from labkit.studies.imputers import _dmfa_path

    folder = REPO / "results" / "classification" / profile
    old_csv, old_jsonl = folder / "accuracy.csv", folder / "runs.jsonl"
    with open(old_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
        header = rows and list(rows[0].keys())
    if header != OLD_HEADER:
        print(f"{old_csv} is not in the old format (header {header}); nothing to migrate")
        return 0
    records = [json.loads(line) for line in old_jsonl.read_text().splitlines() if line.strip()]
    by_cell = {(r["dataset"], r["mask"], r["method"], int(r["seed"])): r for r in records}
    grid, cfg = clf.sweep_config(profile)
    if cfg.precision != "32":
        raise SystemExit(f"profile {profile}'s 02_classification precision is {cfg.precision!r}; the committed rows "
                         "were trained in float32: set it to '32' (or migrate into another profile)")
    old_masks = _old_masks_module(CLASSIFICATION_COMMIT)
    checked_masks: set = set()
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        store = clf.result_store(tmp)
        for row in rows:
            cell_id = (row["dataset"], row["mask"], row["method"], int(row["seed"]))
            rec = by_cell.get(cell_id)
            if rec is None:
                raise SystemExit(f"no runs.jsonl record for {cell_id}: cannot tell its settings")
            recorded = {"epochs": rec["epochs"], "batch_size": rec["batch_size"], "lr": rec["lr"],
                        "select": rec["select"], "n_test": rec["n_test"], "n_train": rec["n_train"] + rec["n_val"]}
            wanted = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "select": cfg.select,
                      "n_test": cfg.n_test, "n_train": cfg.n_train}
            if recorded != wanted:
                raise SystemExit(f"{cell_id}: recorded settings {recorded} differ from profile {profile}'s {wanted}")
            dataset, old_kind, method, seed = cell_id
            kind = RENAMED_MASKS.get(old_kind, old_kind)
            if (dataset, kind, seed) not in checked_masks:
                data = load_cell_data(dataset, kind, seed, n_train=cfg.n_train, n_test=cfg.n_test,
                                      val_fraction=cfg.val_fraction)
                _, _, H, W = data.train_images.shape
                _check_masks_unchanged(old_masks, dataset, old_kind, kind, seed, len(data.train_images),
                                       len(data.test_images), H, W)
                if data.sources != rec["data"]:
                    raise SystemExit(f"{cell_id}: the data loaded now ({data.sources}) are not the recorded ones "
                                     f"({rec['data']})")
                checked_masks.add((dataset, kind, seed))
            (cell,) = clf.plan_cells([dataset], [kind], [method], [seed], cfg)
            if "unavailable" in cell.inputs:
                raise SystemExit(f"{cell_id}: {cell.inputs['unavailable']}")
            for name in ("dmfa", "acflow"):           # checkpoints: the size recorded then = the file now
                then = rec.get(f"{name}_checkpoint")
                if name not in cell.inputs or not then:
                    continue
                variant = "complete" if method.endswith("_complete") else "incomplete"
                path = _dmfa_path(cfg, variant, dataset, kind) if name == "dmfa" else cfg.resolve(cfg.acflow, dataset)
                if then.get("size") != path.stat().st_size:
                    raise SystemExit(f"{cell_id}: {path} has {path.stat().st_size} bytes, the run read {then.get('size')}")
            last = rec["epochs"] - 1
            metrics = {"accuracy": float(row["accuracy"]),
                       # the last epoch's test accuracy was not recorded then; it equals the selected one
                       # exactly when the validation picked the last epoch
                       "accuracy_last": float(row["accuracy"]) if rec["epoch_selected"] == last else None,
                       "val_accuracy": rec.get("val_accuracy"), "epoch_selected": rec["epoch_selected"]}
            details = {**rec, "mask": kind, "migrated_from": f"accuracy.csv/runs.jsonl at {CLASSIFICATION_COMMIT} "
                                                             f"(mask then called {old_kind!r})"}
            store.record(cell, metrics, details, origin="migrated")
        n = len(store.read())
        print(f"migrated {n} rows of {old_csv} ({sum(1 for r in rows if r['mask'] in RENAMED_MASKS)} relabelled "
              f"trapezoid -> trapezoid_inside)")
        if dry_run:
            return 0
        (Path(tmp) / "accuracy.csv").replace(old_csv)
        (Path(tmp) / "runs.jsonl").replace(old_jsonl)
    return 0


STUDIES = {"classification": classification}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+", choices=sorted(STUDIES))
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--dry-run", action="store_true", help="check and count, write nothing")
    args = ap.parse_args(argv)
    for name in args.studies:
        code = STUDIES[name](profile=args.profile, dry_run=args.dry_run)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
