#!/usr/bin/env python
"""Does mixed precision change the results? float32 against bf16-mixed, seed by seed.

    .venv/bin/python scripts/compare_precision.py [--seeds 0 1 2] [--threads 1] [--markdown docs/timing.md]

A small study on the engine (resumable: finished cells are skipped; a cell is keyed by its settings
and by the content of its data), one cell per (model, precision, seed):

- ``dmfa``: the MNIST linear-heads DMFA trained on complete images for ``--dmfa-epochs`` epochs
  (lr 1e-3, batch 48) on the first ``--n-train`` training images; scored on the first ``--n-test``
  test images with 14×14 holes: mean NLL and SSE per image over the hole (scoring in float32).
- ``zero`` / ``misconv``: the MNIST classifier with the zero front, or with the MisConv front over
  the committed complete-data DMFA (its outputs computed in float32), square masks, trained for
  ``--clf-epochs`` epochs (batch 24, lr 1e-3; the epoch is picked on a validation split); test
  accuracy on the first ``--n-test`` test images.

Writes ``results/timing/<cpu|cuda>/precision_comparison.csv`` (+ ``.jsonl``) and, with ``--markdown``,
the table between ``<!-- precision-comparison:start/end -->`` (``--marker`` names another block) in
that file: per model, the mean ± std over seeds in each precision and the per-seed difference of
each low precision − float32 beside the float32 spread. ``--precisions 32 bf16-mixed 16-mixed``
adds float16 with gradient scaling (CUDA only); ``--device cuda`` runs on the GPU
(``scripts/cuda_check.sh`` does both).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from labkit import paths  # noqa: E402
from labkit.studies.engine import Cell, ResultStore, SweepFailed, data_fingerprint, run_cells  # noqa: E402

MODELS = ("dmfa", "zero", "misconv")


def _cell_fn(cell: Cell, *, device: str) -> dict:
    from labkit.data import load_dataset
    from labkit.studies.cells import stable_seed

    s = cell.settings
    model, precision, seed = cell.coords["model"], cell.coords["precision"], cell.coords["seed"]
    torch.manual_seed(stable_seed("precision-comparison", model, seed))
    if model == "dmfa":
        from labkit.models.dmfa import build_dmfa, evaluate_dmfa, test_masks
        from labkit.models.dmfa_training import DMFARecipe, train_dmfa

        train = load_dataset("mnist", "train", limit=s["n_train"], quiet=True)
        test = load_dataset("mnist", "test", limit=s["n_test"], quiet=True)
        net = build_dmfa("mnist")
        recipe = DMFARecipe(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], lr_milestones=(), lr_gamma=1.0,
                            mse_warmup_epochs=0, n_components=net.n_components, n_factors=net.n_factors,
                            precision=precision, weights_dtype="float32")
        history = train_dmfa(net, train.images, recipe, mode="complete", seed=seed, device=device, progress=False)
        holes = test_masks(len(test), 28, 28, side=14, seed=0, device="cpu")
        scores = evaluate_dmfa(net.eval(), test.images, holes, device=device)
        return {"metrics": {"nll": float(scores["nll"].mean()), "sse": float(scores["sse"].mean())},
                "details": {"history": history, "precision": precision}}
    from labkit.studies.classification import run_cell
    from labkit.studies.configs import ClassificationConfig

    method = "zero" if model == "zero" else "dmfa_misconv_complete"
    cfg = ClassificationConfig(profile="precision", epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                               n_train=s["n_train"], n_test=s["n_test"], precision=precision, device=device,
                               dmfa_complete="results/dmfa/cpu/{dataset}_complete.pt")
    # the inner cell's key (it names the resumable checkpoint) differs per precision
    inner = Cell("classification", {"dataset": "mnist", "mask": "square", "method": method, "seed": seed},
                 {**s, "precision": precision})
    out = run_cell(inner, cfg, progress=False)
    return {"metrics": {"accuracy": out["metrics"]["accuracy"]}, "details": out["details"]}


def plan(seeds, args) -> list[Cell]:
    from labkit.data import load_dataset
    from labkit.studies.engine import input_fingerprint

    train = load_dataset("mnist", "train", limit=args.n_train, quiet=True)
    test = load_dataset("mnist", "test", limit=args.n_test, quiet=True)
    data = {"train": data_fingerprint(train.images, train.labels, name="mnist", split="train"),
            "test": data_fingerprint(test.images, test.labels, name="mnist", split="test")}
    dmfa = paths.repo_path("results/dmfa/cpu/mnist_complete.pt")
    cells = []
    for seed in seeds:
        for model in MODELS:
            for precision in args.precisions:
                if model == "dmfa":
                    settings = {"n_train": args.n_train, "n_test": args.n_test, "epochs": args.dmfa_epochs,
                                "batch_size": 48, "lr": 1e-3, "hole": 14}
                    inputs = data
                else:
                    settings = {"n_train": args.n_train, "n_test": args.n_test, "epochs": args.clf_epochs,
                                "batch_size": 24, "lr": 1e-3, "mask": "square"}
                    inputs = {**data, **({"dmfa": input_fingerprint(dmfa, "complete-data DMFA checkpoint")}
                                         if model == "misconv" else {})}
                cells.append(Cell("precision", {"model": model, "precision": precision, "seed": int(seed)},
                                  settings, inputs))
    return cells


def table(df, precisions=("32", "bf16-mixed")) -> str:
    """Markdown: per model and metric, mean ± std per precision, and each low precision − float32 seed by seed."""
    import numpy as np

    low = [p for p in precisions if p != "32"]
    name = {"32": "float32"}
    lines = ["| model | metric | " + " | ".join(f"{name.get(p, p)} (mean ± std)" for p in precisions) + " | "
             + " | ".join(f"{p.split('-')[0]} − float32, per seed" for p in low) + " | seeds |",
             "|---|---|" + "---|" * (len(precisions) + len(low)) + "---|"]

    def ms(v):
        v = np.asarray(v, dtype=float)
        return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}"

    for model, metric in (("dmfa", "nll"), ("dmfa", "sse"), ("zero", "accuracy"), ("misconv", "accuracy")):
        sub = df[df["model"] == model]
        per = {p: sub[sub["precision"] == p].set_index("seed")[metric].dropna() for p in precisions}
        common = sorted(set.intersection(*(set(v.index) for v in per.values())))
        if not common:
            continue
        diffs = [", ".join(f"{float(per[p][s] - per['32'][s]):+.4f}" for s in common) for p in low]
        lines.append(f"| {model} | {metric} | " + " | ".join(ms(per[p][common]) for p in precisions) + " | "
                     + " | ".join(diffs) + f" | {common} |")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """``path`` relative to the checkout when inside it (as the docs write paths)."""
    try:
        return str(path.resolve().relative_to(paths.repo_root()))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--dmfa-epochs", type=int, default=3)
    ap.add_argument("--clf-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"],
                    help="the first must be 32; add 16-mixed on CUDA")
    ap.add_argument("--results-dir", default=None, help="default results/timing/<device kind>")
    ap.add_argument("--markdown", default=None, help="refresh the marked block (--marker) of this file")
    ap.add_argument("--marker", default="precision-comparison",
                    help="the block's name: <!-- NAME:start --> ... <!-- NAME:end -->")
    args = ap.parse_args(argv)
    if args.precisions[0] != "32" or len(set(args.precisions)) != len(args.precisions):
        ap.error(f"--precisions must start with 32 and name each precision once, got {args.precisions}")
    torch.set_num_threads(args.threads)
    kind = "cuda" if str(args.device).startswith("cuda") else "cpu"
    out = Path(args.results_dir) if args.results_dir else paths.results_dir("timing", kind)
    store = ResultStore(out / "precision_comparison.csv", coords=["model", "precision", "seed"], metrics=[],
                        optional=["nll", "sse", "accuracy"], details=out / "precision_comparison.jsonl")
    cells = plan(args.seeds, args)
    code = 0
    try:
        run_cells(cells, functools.partial(_cell_fn, device=args.device), store)
    except SweepFailed as exc:
        print(exc, flush=True)
        code = 1
    df = store.read()
    df = df[df["key"].isin({c.key for c in cells})]
    text = table(df, args.precisions)
    print(text)
    if args.markdown:
        from labkit.studies.reporting import replace_marked_block

        replace_marked_block(args.markdown, args.marker, text + "\n\n_Generated by "
                             f"`scripts/compare_precision.py` from `{_shown(out / 'precision_comparison.csv')}`._")
    return code


if __name__ == "__main__":
    sys.exit(main())
