#!/usr/bin/env python
"""How good is each imputer of the classification study? (diagnostics behind the README's findings)

    .venv/bin/python scripts/imputation_quality.py --profile cpu --seed 0 --n 1000 --threads 1

For every mask kind of the profile's ``02_classification`` grid and every imputing method
(default: k-NN, classical MFA, both DMFAs, ACFlow), on the first ``--n`` *test* images of the
(mask, seed) cell, with exactly the imputers the sweep uses (same caches):
``sse`` = mean squared error summed over an image's missing pixels, and for the MFA-based
methods ``nll`` (nats, of the true missing pixels) and ``pred_std`` (mean predicted standard
deviation there) beside ``rmse`` (the actual per-pixel error). Nothing is tuned on these numbers.

Writes ``results/classification/<profile>/imputation_quality.csv`` (one row per mask × method,
rewritten as a whole) and prints it. Methods whose checkpoint is missing are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from labkit.checkpoint import machine_description
from labkit.classifier import imputation_quality, method_available, sweep_config

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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    grid, cfg = sweep_config(args.profile)
    cfg.progress = False
    import pandas as pd

    frames = []
    started = time.time()
    for dataset in grid["datasets"]:
        for mask in args.masks or grid["masks"]:
            methods = [m for m in args.methods if method_available(m, cfg, dataset, mask) is None]
            skipped = sorted(set(args.methods) - set(methods))
            if skipped:
                print(f"[imputation_quality] {dataset}/{mask}: skipping {skipped} (checkpoint missing)", flush=True)
            df = imputation_quality(dataset, mask, args.seed, methods, cfg, n=args.n).reset_index()
            if "nll" in df:
                df["rmse"] = (df["sse"] / df["missing_pixels"]) ** 0.5
            df.insert(0, "mask", mask)
            df.insert(0, "dataset", dataset)
            frames.append(df)
            print(f"[imputation_quality] {dataset}/{mask} done ({time.time() - started:.0f} s)", flush=True)
    out = cfg.results_path()
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat(frames, ignore_index=True)
    table.insert(len(table.columns), "seed", args.seed)
    table.insert(len(table.columns), "n_test_images", args.n)
    table.to_csv(out / "imputation_quality.csv", index=False, float_format="%.4f")
    (out / "imputation_quality.json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "machine": machine_description(), "seconds": round(time.time() - started, 1)},
        indent=1))
    print(table.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
