#!/usr/bin/env python
"""How good is each imputer of the classification study? (diagnostics behind the README's findings)

    .venv/bin/python scripts/imputation_quality.py --profile cpu --seed 0 --n 1000 --threads 1

For every mask kind of the profile's ``02_classification`` grid and every imputing method
(default: k-NN, classical MFA, both DMFAs, ACFlow), on the first ``--n`` *test* images of the
(mask, seed) cell, with exactly the imputers the sweep uses (same caches):
``sse`` = mean squared error summed over an image's missing pixels, and for the MFA-based
methods ``nll`` (nats, of the true missing pixels) and ``pred_std`` (mean predicted standard
deviation there) beside ``rmse`` (the actual per-pixel error). Nothing is tuned on these numbers.

Writes ``results/classification/<profile>/imputation_quality.csv`` (one row per mask × method; the
masks computed now replace their rows, the other masks' rows stay) and ``mask_coverage.csv`` (how much of the digits each mask kind hides on
the same images, :func:`labkit.masks.ink_hidden`) and ``misconv_vs_mean_fill.csv`` (how much the
MisConv front's output differs from conv+ReLU of the mean-filled image, :func:`misconv_vs_mean_fill`),
and prints them. Methods whose checkpoint is missing are skipped.

The files are written as one set (``labkit.studies.engine.write_files``: temporary files renamed into
place; killed at any instant, the folder keeps the old set or holds the new one). The rows kept from
an earlier run come from its file read whole (``labkit.checkpoint.read_whole_csv``): a file cut
short or malformed stops the run with an error naming it, instead of losing the masks it held.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from labkit.machine import machine_summary
from labkit.masks import ink_hidden
from labkit.studies.cells import load_cell_data
from labkit.studies.classification import imputation_quality, sweep_config
from labkit.studies.engine import write_files
from labkit.studies.imputers import method_available
from labkit.studies.reporting import replace_marked_block

#: the tables whose rows of other masks each run keeps
MERGED = ("imputation_quality.csv", "mask_coverage.csv", "misconv_vs_mean_fill.csv")
#: imputer -> the method whose preparer yields it (the MisConv methods carry the MFA, hence NLL/std)
DEFAULT_METHODS = ["knn", "mfa_misconv", "dmfa_misconv_complete", "dmfa_misconv_incomplete", "acflow"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1000, help="first N test images of each cell (default 1000)")
    ap.add_argument("--masks", nargs="+", default=None, help="default: the profile's mask kinds")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--readme", default=None,
                    help="also put the table between <!-- imputation-quality:start/end --> in this Markdown file")
    ap.add_argument("--table-only", action="store_true",
                    help="compute nothing: only put the committed imputation_quality.csv into --readme")
    args = ap.parse_args(argv)
    if args.table_only:
        from labkit.checkpoint import read_whole_csv

        _, cfg = sweep_config(args.profile)
        table = read_whole_csv(cfg.results_path() / "imputation_quality.csv", required=("dataset", "mask", "method"))
        print(table.round(3).to_string(index=False))
        if args.readme:
            replace_marked_block(args.readme, "imputation-quality", markdown(table))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    grid, cfg = sweep_config(args.profile)
    cfg.progress = False
    import pandas as pd

    from labkit.checkpoint import TableFileError, read_whole_csv

    try:       # the rows to keep must be readable before anything is computed
        for name in MERGED:
            if (cfg.results_path() / name).exists():
                read_whole_csv(cfg.results_path() / name, required=("dataset", "mask"))
    except TableFileError as exc:
        print(f"[imputation_quality] {exc}", flush=True)
        return 1

    frames, coverage, variance_effect = [], [], []
    started = time.time()
    for dataset in grid["datasets"]:
        for mask in args.masks or grid["masks"]:
            methods = [m for m in args.methods if method_available(m, cfg, dataset, mask) is None]
            skipped = sorted(set(args.methods) - set(methods))
            if skipped:
                print(f"[imputation_quality] {dataset}/{mask}: skipping {skipped} (checkpoint missing)", flush=True)
            df = imputation_quality(dataset, mask, args.seed, methods, cfg, n=args.n).reset_index()
            data = load_cell_data(dataset, mask, args.seed, n_train=cfg.n_train, n_test=cfg.n_test,
                                  val_fraction=cfg.val_fraction)
            k = min(args.n, len(data.test_images))
            if method_available("dmfa_misconv_complete", cfg, dataset, mask) is None:
                variance_effect.append({"dataset": dataset, "mask": mask, "seed": args.seed, "n_test_images": min(k, 500),
                                        **misconv_vs_mean_fill(data, cfg, min(k, 500))})
            coverage.append({"dataset": dataset, "mask": mask, "seed": args.seed, "n_test_images": k,
                             **ink_hidden(data.test_images[:k], data.test_missing[:k])})
            if "nll" in df:
                df["rmse"] = (df["sse"] / df["missing_pixels"]) ** 0.5
            df.insert(0, "mask", mask)
            df.insert(0, "dataset", dataset)
            frames.append(df)
            print(f"[imputation_quality] {dataset}/{mask} done ({time.time() - started:.0f} s)", flush=True)
    table = pd.concat(frames, ignore_index=True)
    table.insert(len(table.columns), "seed", args.seed)
    table.insert(len(table.columns), "n_test_images", args.n)
    run = {"command": " ".join(sys.argv), "machine": machine_summary(), "seconds": round(time.time() - started, 1)}
    try:
        table, coverage_df, effect = write_results(cfg.results_path(), table, pd.DataFrame(coverage),
                                                   pd.DataFrame(variance_effect), run)
    except TableFileError as exc:
        print(f"[imputation_quality] {exc}", flush=True)
        return 1
    if effect is not None:
        print(effect.round(3).to_string(index=False))
    print(pd.DataFrame(coverage).round(3).to_string(index=False))
    print(table.round(3).to_string(index=False))
    if args.readme:
        replace_marked_block(args.readme, "imputation-quality", markdown(table))
    return 0


def write_results(out, table, coverage, variance_effect, run: dict):
    """Merge this run's rows into the tables of ``out`` and write them, with ``run`` as
    ``imputation_quality.json``, as one set (:func:`labkit.studies.engine.write_files`).

    The (dataset, mask) pairs of ``table`` replace their old rows in every table; the other masks'
    rows stay (:func:`_merged`, which refuses a damaged file before anything is written).
    ``variance_effect`` may be empty (no complete-data DMFA): ``misconv_vs_mean_fill.csv`` is then
    left as it is. Returns the merged ``(table, coverage, variance effect or None)``.
    """
    out = Path(out)
    done = {(d, m) for d, m in zip(table["dataset"], table["mask"])}
    table = _merged(out / "imputation_quality.csv", table, done)
    coverage = _merged(out / "mask_coverage.csv", coverage, done)
    effect = _merged(out / "misconv_vs_mean_fill.csv", variance_effect, done) if len(variance_effect) else None
    files = {out / "imputation_quality.csv": table.to_csv(index=False, float_format="%.4f"),
             out / "mask_coverage.csv": coverage.to_csv(index=False, float_format="%.4f")}
    if effect is not None:
        files[out / "misconv_vs_mean_fill.csv"] = effect.to_csv(index=False, float_format="%.4f")
    files[out / "imputation_quality.json"] = json.dumps(run, indent=1)
    write_files(files)
    return table, coverage, effect


def _merged(path, new, done: set):
    """``new`` after the rows of ``path`` (if it exists) whose (dataset, mask) is not in ``done``,
    ordered by the masks' table order. ``path`` is read whole: a file cut short or malformed raises
    :class:`labkit.checkpoint.TableFileError` naming it (its masks would otherwise be lost)."""
    import pandas as pd

    from labkit.checkpoint import read_whole_csv
    from labkit.studies.classification import MASK_ORDER

    if path.exists():
        old = read_whole_csv(path, required=("dataset", "mask"))
        keep = [(d, m) not in done for d, m in zip(old["dataset"], old["mask"])]
        new = pd.concat([old[keep], new], ignore_index=True)
    order = {m: i for i, m in enumerate(MASK_ORDER)}
    return new.sort_values("mask", key=lambda c: c.map(lambda m: order.get(m, 99)), kind="stable").reset_index(drop=True)


def misconv_vs_mean_fill(data, cfg, n: int, seeds=range(5)) -> dict:
    """Does the variance change the first layer? For freshly initialised fronts (one per seed), the
    MisConv front over the complete-data DMFA against ``relu(conv(image filled with the DMFA mean))``
    with the same weights, on the first ``n`` test images, over the output positions whose 3×3
    window touches a missing pixel: ``rel_diff`` = mean |difference| / mean |mean-fill output|
    (mean, min and max over the seeds)."""
    import torch.nn.functional as F

    from labkit.models.fronts import make_front
    from labkit.studies.imputers import METHODS

    _, aux_test, _ = METHODS["dmfa_misconv_complete"].prepare(data, cfg)
    idx = torch.arange(n)
    x, miss = data.test_images[idx], data.test_missing[idx]
    J = miss.expand_as(x)
    mfa = aux_test.get(idx, x, miss)
    filled = torch.where(J, mfa.mean(), x)
    near = F.max_pool2d(miss.float(), 3, stride=1, padding=1).bool()          # window touches the hole
    rel = []
    for seed in seeds:
        torch.manual_seed(seed)
        front = make_front("dmfa_misconv_complete", x.shape[1], 32).eval()
        with torch.no_grad():
            a = front(torch.where(J, torch.nan, x), miss, mfa)
            b = torch.relu(F.conv2d(filled, front.conv.weight, front.conv.bias, padding=front.conv.padding))
        m = near.expand_as(a)
        rel.append(float((a - b).abs()[m].mean() / b.abs()[m].mean()))
    return {"rel_diff": sum(rel) / len(rel), "rel_diff_min": min(rel), "rel_diff_max": max(rel)}


NAMES = {"knn": "k-NN", "mfa_misconv": "classical MFA (K = 4, L = 4)", "dmfa_misconv_complete": "DMFA, complete data",
         "dmfa_misconv_incomplete": "DMFA, incomplete data of the same kind", "acflow": "ACFlow (mean of 4 samples)"}


def markdown(table) -> str:
    """The table as Markdown: one row per (mask, imputer)."""
    lines = [f"_Generated by `scripts/imputation_quality.py` (seed {int(table['seed'].iloc[0])}, first "
             f"{int(table['n_test_images'].iloc[0])} test images of each mask)._", "",
             "| mask | imputer | SSE per image at missing pixels | NLL of missing pixels (nats) | "
             "predicted std / actual RMSE per pixel |", "|---|---|---|---|---|"]
    for _, r in table.iterrows():
        nll = f"{r['nll']:.1f}" if "nll" in r and r["nll"] == r["nll"] else "–"
        std = f"{r['pred_std']:.3f} / {r['rmse']:.3f}" if "pred_std" in r and r["pred_std"] == r["pred_std"] else "–"
        lines.append(f"| {r['mask']} ({int(r['missing_pixels'])} px) | {NAMES.get(r['method'], r['method'])} | "
                     f"{r['sse']:.1f} | {nll} | {std} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
