#!/usr/bin/env python
"""Convert committed results made before the study engine into its keyed format, without rerunning.

    .venv/bin/python scripts/migrate_results.py classification wae density [--profile cpu] [--dry-run]

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

``wae``: ``results/wae/<profile>*/metrics.csv`` (the old cpu runs: recipe "supplement", 1 epoch,
discriminator lr 2e-4 or 4e-6, BCE, float32; the rest from runs.jsonl); the DMFA checkpoint those
runs read had no recorded fingerprint, so the committed file is accepted only if git shows it
unchanged since its one commit and it was trained before the run; the per-cell figures get the
cells' keyed names. ``density``: each JSON summary of ``results/dmfa/<profile>/`` gets the digest of
the CSV beside it (``csv_digest``), and the renamed ``*_trapezoid_inside`` one its mask's new name.
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

    from labkit.studies.cells import SEED_WORD, stable_seed, cell_masks

    for split, n in (("train", n_train), ("test", n_test)):
        g = torch.Generator().manual_seed(stable_seed("masks", dataset, split, old_kind, int(seed)))
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
    from labkit.studies.configs import ClassificationConfig
    from labkit.studies.imputers import imputer_settings

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
    cfg = ClassificationConfig.build(profile)
    icfg = imputer_settings(cfg, progress=False)
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
            (cell,) = clf.plan(cfg.replace(dataset=dataset, masks=[kind], methods=[method], seeds=[seed]))
            if "unavailable" in cell.inputs:
                raise SystemExit(f"{cell_id}: {cell.inputs['unavailable']}")
            for name in ("dmfa", "acflow"):           # checkpoints: the size recorded then = the file now
                then = rec.get(f"{name}_checkpoint")
                if name not in cell.inputs or not then:
                    continue
                variant = "complete" if method.endswith("_complete") else "incomplete"
                template = (icfg.dmfa_complete if variant == "complete" else icfg.dmfa_incomplete) if name == "dmfa" \
                    else icfg.acflow
                path = icfg.resolve(template, dataset, kind if name == "dmfa" else None, seed if name == "dmfa" else 0)
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


# ============================================================================ WAE
#: the commit whose code made the committed WAE rows (its masks are compared)
WAE_COMMIT = "77b1d87"
OLD_WAE_HEADER = ["dataset", "front", "seed", "psnr_missing", "ssim_missing", "psnr_all", "ssim_all",
                  "fd_reconstruction", "fd_samples", "epochs", "n_train", "n_test"]


def _rel(path: Path) -> str:
    path = Path(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _wae_config(rec: dict, profile: str, results_dir: Path):
    """The WAEConfig of an old WAE run: its runs.jsonl record, plus what the old code always did
    (recipe "supplement": two Adams, λ and reconstruction loss as recorded; float32) and the
    profile's checkpoint templates."""
    from labkit.studies.configs import WAEConfig

    templates = WAEConfig.build(profile)
    feat = rec["feature_net"]
    return WAEConfig(
        profile=rec.get("profile", profile), recipe="supplement", precision="32", epochs=rec["epochs"],
        batch_size=rec["batch_size"], lr=rec["lr"], lr_disc=rec["lr_disc"], lambda_adv=rec["lambda_adv"],
        recon=rec["recon"], n_train=rec["n_train"], n_test=rec["n_test"], mask=rec["mask"],
        feature_epochs=feat["epochs"], feature_n_train=None if feat["n_train"] == rec["n_train"] else feat["n_train"],
        dmfa_complete=templates.dmfa_complete, dmfa_incomplete=templates.dmfa_incomplete, acflow=templates.acflow,
        results_dir=str(results_dir))


def _checkpoint_unchanged_since(path: Path, finished_at: str) -> None:
    """The checkpoint an old run read had no recorded fingerprint: accept the committed file only if
    git shows it unchanged since its one commit and its meta says it was trained before the run."""
    from labkit.checkpoint import load_checkpoint

    rel = path.resolve().relative_to(REPO)
    commits = subprocess.run(["git", "-C", str(REPO), "log", "--format=%h", "--", str(rel)], check=True,
                             capture_output=True, text=True).stdout.split()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", str(rel)], check=True,
                           capture_output=True, text=True).stdout.strip()
    if len(commits) != 1 or dirty:
        raise SystemExit(f"{rel} changed since it was first committed ({len(commits)} commits, "
                         f"{'modified' if dirty else 'clean'}): cannot tell which file the old WAE rows read")
    trained_at = str(load_checkpoint(path, map_location="cpu")["meta"].get("trained_at", ""))[:19]
    if not trained_at or trained_at > finished_at:
        raise SystemExit(f"{rel} was trained at {trained_at or 'an unrecorded time'}, after the run that finished "
                         f"at {finished_at}: it is not the file that run read")


def _wae_folder(folder: Path, profile: str, dry_run: bool) -> int:
    import csv

    from labkit.models.wae import WAE
    from labkit.studies import wae
    from labkit.studies.cells import load_cell_data
    from labkit.studies.engine import canonical, write_files

    old_csv, old_jsonl = folder / "metrics.csv", folder / "runs.jsonl"
    with open(old_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        rows, header = list(reader), reader.fieldnames
    if header != OLD_WAE_HEADER:
        print(f"{_rel(old_csv)} is not in the old format; nothing to migrate")
        return 0
    records = [json.loads(line) for line in old_jsonl.read_text().splitlines() if line.strip()]
    by_cell = {(r["dataset"], r["front"], int(r["seed"])): r for r in records}
    old_masks = _old_masks_module(WAE_COMMIT)
    renames = []
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        store = wae.result_store(tmp)
        for row in rows:
            cell_id = (row["dataset"], row["front"], int(row["seed"]))
            rec = by_cell.get(cell_id)
            if rec is None:
                raise SystemExit(f"{old_csv}: no runs.jsonl record for {cell_id}: cannot tell its settings")
            cfg = _wae_config(rec, profile, folder)
            dataset, front, seed = cell_id
            data = load_cell_data(dataset, cfg.mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=0.0)
            if data.sources != rec["data"]:
                raise SystemExit(f"{cell_id}: the data loaded now ({data.sources}) are not the recorded ones ({rec['data']})")
            _, _, H, W = data.train_images.shape
            _check_masks_unchanged(old_masks, dataset, cfg.mask, cfg.mask, seed, len(data.train_images),
                                   len(data.test_images), H, W)
            cell = wae.plan_cell(dataset, front, seed, cfg, data=data)
            if "unavailable" in cell.inputs:
                raise SystemExit(f"{cell_id}: {cell.inputs['unavailable']}")
            s = cell.settings
            recorded = {k: rec[k] for k in ("epochs", "batch_size", "lr", "lr_disc", "lambda_adv", "recon", "n_train",
                                            "n_test", "mask")}
            built = WAE(front, s["architecture"], device="cpu").architecture
            if canonical(rec["architecture"]) != canonical(built):
                raise SystemExit(f"{cell_id}: the run's WAE layers {rec['architecture']} are not today's {built}")
            recorded["feature_epochs"], recorded["feature_n"] = rec["feature_net"]["epochs"], rec["feature_net"]["n_train"]
            planned = {k: s[k] for k in ("epochs", "batch_size", "lr", "lr_disc", "lambda_adv", "recon", "n_train",
                                         "n_test", "mask")}
            planned["feature_epochs"], planned["feature_n"] = s["features"]["epochs"], s["features"]["n_train"]
            if recorded != planned or (int(row["epochs"]), int(row["n_train"]), int(row["n_test"])) != \
                    (s["epochs"], s["n_train"], s["n_test"]):
                raise SystemExit(f"{cell_id}: recorded settings {recorded} differ from the planned cell's {planned}")
            if "dmfa" in cell.inputs:
                path = Path(rec["dmfa"])
                icfg = wae.imputer_config(cfg, progress=False)
                now = icfg.resolve(icfg.dmfa_complete if front.endswith("_complete") else icfg.dmfa_incomplete,
                                   dataset, cfg.mask)
                if path.name != now.name:
                    raise SystemExit(f"{cell_id}: the run read {path.name}, the planned cell reads {now.name}")
                _checkpoint_unchanged_since(now, rec["finished_at"])
            metrics = {k: float(row[k]) for k in wae.METRIC_COLUMNS}
            details = {**rec, "migrated_from": f"metrics.csv/runs.jsonl at {WAE_COMMIT} (recipe 'supplement', "
                                               "float32; no scikit-image metrics then)"}
            store.record(cell, metrics, details, origin="migrated")
            for what in ("reconstruction", "samples"):
                old = folder / "figures" / f"{dataset}-{front}-s{seed}-{what}.png"
                if old.exists():
                    renames.append((old, folder / "figures" / f"{wae.cell_stem(cell)}-{what}.png"))
        n = len(store.read())
        print(f"{_rel(old_csv)}: {n} rows migrated (origin 'migrated'); {len(renames)} figures to rename")
        if dry_run:
            return 0
        tmp = Path(tmp)
        write_files({old_csv: (tmp / "metrics.csv").read_text(), old_jsonl: (tmp / "runs.jsonl").read_text()})
    for old, new in renames:
        moved = subprocess.run(["git", "-C", str(REPO), "mv", _rel(old), _rel(new)], capture_output=True, text=True)
        if moved.returncode:                         # not tracked (or outside the repository): a plain rename
            old.replace(new)
    return 0


def wae(profile: str = "cpu", dry_run: bool = False) -> int:
    """Migrate ``results/wae/<profile>/`` (and its variants ``results/wae/<profile>_*/``, e.g. a run
    kept for comparison) from the old ``metrics.csv`` + ``runs.jsonl`` to the keyed store; the
    per-cell figures are renamed to the cells' keyed names."""
    base = REPO / "results" / "wae"
    folders = [f for f in sorted(base.glob(f"{profile}*")) if (f / "metrics.csv").is_file()
               and (f.name == profile or f.name.startswith(f"{profile}_"))]
    if not folders:
        print(f"no results/wae/{profile}*/metrics.csv: nothing to migrate")
    for folder in folders:
        code = _wae_folder(folder, profile, dry_run)
        if code:
            return code
    return 0


# ============================================================================ density (DMFA)
def density(profile: str = "cpu", dry_run: bool = False, folder: Path | None = None) -> int:
    """Add to each JSON summary of ``results/dmfa/<profile>/`` the digest of the CSV it summarises
    (``csv_digest``), so that :func:`labkit.studies.density.density_table` accepts the pair. A JSON
    whose stem was renamed to ``*_trapezoid_inside`` (made with the inside-the-image trapezoid, then
    called ``trapezoid``) gets ``missing_kind = "trapezoid_inside"``. A JSON that already records
    another digest than its CSV's is reported and left alone."""
    from labkit.studies import density as dens
    from labkit.studies.engine import write_files

    folder = Path(folder) if folder is not None else REPO / "results" / "dmfa" / profile
    changed = 0
    for path in sorted(folder.glob("*.json")):
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict) or "model_kind" not in summary:
            continue                          # histories, throughput
        csv = path.with_suffix(".csv")
        if not csv.is_file():
            print(f"{_rel(path)}: no CSV beside it; left alone")
            continue
        want = dens.csv_digest(csv)
        have = summary.get("csv_digest")
        if have is not None and have != want:
            print(f"{_rel(path)}: records CSV digest {have} but {csv.name} has {want}: left alone "
                  "(the pair is inconsistent; rerun the experiment)")
            continue
        updated = dict(summary, csv_digest=want)
        if path.stem.endswith("_trapezoid_inside") and summary.get("missing_kind") == "trapezoid":
            updated.update(missing_kind="trapezoid_inside", missing_kind_recorded="trapezoid")
        if updated == summary:
            continue
        changed += 1
        print(f"{_rel(path)}: csv_digest {want}"
              + (", missing_kind trapezoid -> trapezoid_inside" if "missing_kind_recorded" in updated else ""))
        if not dry_run:
            write_files({path: json.dumps(updated, indent=1)})
    print(f"{_rel(folder)}: {changed} JSON summaries updated{' (dry run: none written)' if dry_run else ''}")
    return 0


def diagnostics(profile: str = "cpu", dry_run: bool = False) -> int:
    """The classification diagnostics (``imputation_quality.csv``, ``mask_coverage.csv``,
    ``misconv_vs_mean_fill.csv``) made before the rename: their ``trapezoid`` rows were drawn with the
    inside-the-image generator and become ``trapezoid_inside`` (once: files that already name
    ``trapezoid_inside`` are left alone)."""
    import pandas as pd

    folder = REPO / "results" / "classification" / profile
    for name in ("imputation_quality.csv", "mask_coverage.csv", "misconv_vs_mean_fill.csv"):
        path = folder / name
        if not path.exists():
            continue
        df = pd.read_csv(path)
        if (df["mask"] == "trapezoid_inside").any() or not (df["mask"] == "trapezoid").any():
            print(f"{path}: nothing to relabel")
            continue
        df["mask"] = df["mask"].replace(RENAMED_MASKS)
        print(f"{path}: {int((df['mask'] == 'trapezoid_inside').sum())} rows relabelled trapezoid -> trapezoid_inside")
        if not dry_run:
            df.to_csv(path, index=False, float_format="%.4f")
    return 0


STUDIES = {"classification": classification, "diagnostics": diagnostics, "wae": wae, "density": density}


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
