"""How far the former float32 conditioning moved the classical-MFA classification fronts.

Before the conditioning was made exact in float32 (``MFA.log_weights``, a Mahalanobis term without
cancellation), ``ClassicalMFA.condition`` returned responsibilities computed in the input's dtype
with the textbook Woodbury form. The ``mfa_mean`` and ``mfa_misconv`` classification cells
conditioned in float32, so their inputs may have been off. This script measures by how much, on
the cells' own data: the classical MFA the cells fit (the classification config's K, L and EM
iterations, on the cell's fit rows, from the same cache), the cells' masks, every test image.

Per (data set, mask), over the test images, against the float64 conditioning:
    resp_before / resp_now     largest |responsibility difference|
    mean_before / mean_now     largest |conditional-mean difference| at a missing pixel (mfa_mean's input)
    f16_changed                fraction of mfa_mean's stored float16 test imputations that differ
                               between the former and the current float32 conditioning

    .venv/bin/python scripts/conditioning_drift.py --profile cpu [--datasets mnist cifar10] [--n-test 10000]
Writes ``results/classification/<profile>/conditioning_drift.csv`` (atomically) and prints a table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_condition import textbook_condition  # noqa: E402
from labkit.mfa import ClassicalMFA  # noqa: E402
from labkit.studies.cells import load_cell_data  # noqa: E402
from labkit.studies.classification import results_path  # noqa: E402
from labkit.studies.configs import ClassificationConfig  # noqa: E402
from labkit.studies.engine import write_files  # noqa: E402
from labkit.studies.imputers import classical_mfa, imputer_settings  # noqa: E402


def measure(mask: str, cfg: ClassificationConfig, n_test: int | None, batch: int = 500) -> dict:
    """The drift of ``cfg.dataset``'s classical MFA on the seed-0 ``mask`` cell (module docstring)."""
    dataset = cfg.dataset
    data = load_cell_data(dataset, mask, 0, n_train=cfg.n_train, n_test=n_test, val_fraction=cfg.val_fraction)
    model = classical_mfa(data, imputer_settings(cfg)).float()
    m64 = ClassicalMFA(*(t.double() for t in (model.weights, model.means, model.factors, model.variances)))
    worst = {"resp_before": 0.0, "resp_now": 0.0, "mean_before": 0.0, "mean_now": 0.0}
    changed = total = 0
    for s in range(0, len(data.test_images), batch):
        x = data.test_images[s:s + batch]
        miss = data.test_missing[s:s + batch].expand_as(x)
        obs = ~data.test_missing[s:s + batch]
        with torch.no_grad():
            now = model.condition(x, obs)
            ref = m64.condition(x.double(), obs)
            before = textbook_condition(model, x, obs)
            w_before, mean_before = before.weights, before.mean()
        for name, w, mean in (("before", w_before, mean_before), ("now", now.weights, now.mean())):
            worst[f"resp_{name}"] = max(worst[f"resp_{name}"], float((w.double() - ref.weights).abs().max()))
            err = torch.where(miss, mean.double() - ref.mean(), torch.zeros((), dtype=torch.float64))
            worst[f"mean_{name}"] = max(worst[f"mean_{name}"], float(err.abs().max()))
        a = torch.where(miss, mean_before, x).half()
        b = torch.where(miss, now.mean(), x).half()
        changed += int((a != b)[miss].sum())
        total += int(miss.sum())
    K, L = model.factors.shape[:2]
    return {"dataset": dataset, "mask": mask, "K": int(K), "L": int(L), "n_test": len(data.test_images),
            **worst, "f16_changed": changed / max(total, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import pandas as pd

    rows, out = [], None
    for dataset in a.datasets:
        cfg = ClassificationConfig.build(a.profile, {"dataset": dataset})
        out = results_path(cfg) / "conditioning_drift.csv"
        masks = ["square"] if dataset != "mnist" else ["square", "trapezoid", "noise"]
        for mask in masks:
            row = measure(mask, cfg, a.n_test)
            print(row, flush=True)
            rows.append(row)
    df = pd.DataFrame(rows)
    write_files({out: df.to_csv(index=False, float_format="%.3g")})
    print(df.to_string(index=False))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
