r"""The classification study (notebook 02): every missing-data method on every mask kind, resumably.

One *cell* = (dataset, mask kind, method, seed): the paper's classifier
(:func:`labkit.models.classifier.build_classifier`) with the method's front
(:data:`labkit.studies.imputers.METHODS`) trained and tested on images that carry that kind of
missing data (:mod:`labkit.studies.cells`).

Protocol of one cell (dataset, mask, method, seed)
---------------------------------------------------
- Training images: the first ``n_train`` of the training split; a validation split
  (``val_fraction``, :func:`labkit.data.train_val_split` with seed 0) is carved out of them and
  used only to pick the epoch (best validation accuracy) and k-NN's ``k``; the classifier trains on
  the rest. Test: the first ``n_test`` test images, used only for the final number.
- Masks: one per image, fixed per (dataset, split, mask kind, seed) by a seeded generator
  (:func:`labkit.studies.cells.cell_masks`); training and test carry the same kind of missing data.
- ``x`` reaches the front with NaN at missing pixels (proves that nothing leaks through them).
- Adam, cross-entropy; :func:`labkit.training.fit` checkpoints every epoch, so an interrupted cell
  resumes mid-training; the checkpoint is deleted once the cell's row is written.

Sweep
-----
:func:`run_sweep` writes ``<results_dir>/accuracy.csv`` (columns ``ACCURACY_COLUMNS``) one row per
finished cell (write to a temporary file, then rename), skips cells already there, and appends a
JSON line per cell to ``runs.jsonl`` (batch size, lr, wall time, machine, per-epoch history).
Cells whose method is not available yet (no DMFA/ACFlow checkpoint) are skipped, or waited for
with ``wait=True``. Order: every method on every mask for seed 0 before any later seed.

Reports: :func:`imputation_quality` (diagnostics of the imputers), :func:`pivot_table`,
:func:`paired_differences`, :func:`table_markdown`, :func:`paired_markdown`,
:func:`update_markdown_table` and :func:`plot_results`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labkit import paths
from labkit.device import resolve_device
from labkit.models.classifier import build_classifier, evaluate_accuracy, train_classifier
from labkit.studies.cells import _stable_seed, _with_nan, load_cell_data
from labkit.studies.imputers import METHODS, ImputerConfig, method_available
from labkit.studies.reporting import replace_marked_block
from labkit.sweeps import append_csv_row, append_jsonl, read_table

__all__ = [
    "ACCURACY_COLUMNS",
    "METHOD_ORDER",
    "PAPER_TABLE1",
    "AUTHORS_SQUARE",
    "PAPER_HYPERPARAMETERS",
    "SweepConfig",
    "sweep_config",
    "run_cell",
    "plan_cells",
    "run_sweep",
    "read_results",
    "imputation_quality",
    "pivot_table",
    "paired_differences",
    "table_markdown",
    "update_markdown_table",
    "paired_markdown",
    "plot_results",
]

ACCURACY_COLUMNS = ["dataset", "mask", "method", "seed", "accuracy", "n_train", "n_test", "epochs"]

#: display order of the methods (tables, plots)
METHOD_ORDER = ["zero", "mask", "knn", "pc", "mfa_mean", "mfa_misconv", "dmfa_mean_complete",
                "dmfa_misconv_complete", "dmfa_mean_incomplete", "dmfa_misconv_incomplete", "acflow", "gt"]

#: the paper's supplementary Table 1 (MNIST): method -> {mask: accuracy}. The paper's "MisConv" row
#: is shown beside both DMFA-MisConv variants (the paper does not say which DMFA it used there).
PAPER_TABLE1 = {
    "zero": {"square": 0.910, "trapezoid": 0.891, "noise": 0.946},
    "mask": {"square": 0.926, "trapezoid": 0.905, "noise": 0.703},
    "knn": {"square": 0.874, "trapezoid": 0.854, "noise": 0.912},
    "pc": {"square": 0.920, "trapezoid": 0.674, "noise": 0.804},
    "acflow": {"square": 0.908, "trapezoid": 0.799, "noise": 0.788},
    "dmfa_misconv_complete": {"square": 0.931, "trapezoid": 0.918, "noise": 0.966},
    "dmfa_misconv_incomplete": {"square": 0.931, "trapezoid": 0.918, "noise": 0.966},
    "gt": {"square": 0.992, "trapezoid": 0.992, "noise": 0.992},
}
#: the authors' public code, single-seed MNIST runs, 14×14 squares
AUTHORS_SQUARE = {
    "gt": 0.9907, "dmfa_misconv_incomplete": 0.9312, "dmfa_misconv_complete": 0.9268,
    "dmfa_mean_complete": 0.9272, "mask": 0.9251, "dmfa_mean_incomplete": 0.9239, "mfa_mean": 0.9221,
    "pc": 0.9203, "zero": 0.9105, "acflow": 0.9081, "knn": 0.8748,
}


# ============================================================================ settings
@dataclass
class SweepConfig(ImputerConfig):
    """Everything a sweep needs besides the grid (filled from a profile's ``02_classification`` section):
    the classifier's training settings here, the imputers' settings from :class:`ImputerConfig`."""

    profile: str = "quick"
    epochs: int = 1
    batch_size: int = 24
    lr: float = 1e-3
    n_train: int | None = 500
    n_test: int | None = 200
    val_fraction: float = 0.1
    select: str = "best_val"                  # "best_val" (epoch with the best validation accuracy) | "last"
    eval_batch: int = 500
    results_dir: str | None = None            # default results/classification/<profile>

    def results_path(self) -> Path:
        return Path(self.results_dir) if self.results_dir else paths.results_dir("classification", self.profile)

#: the paper's classifier hyper-parameters (supplementary 1.2): dataset -> (epochs, batch size, lr)
PAPER_HYPERPARAMETERS = {"mnist": (10, 24, 1e-3), "fashion-mnist": (10, 24, 1e-3), "svhn": (25, 24, 1e-3),
                         "cifar10": (35, 64, 1e-4)}

#: the notebook parameters that are not SweepConfig fields
GRID_KEYS = ("dataset", "datasets", "masks", "methods", "seeds")


def sweep_config(profile: str = "quick", **overrides) -> tuple[dict, SweepConfig]:
    """Grid and :class:`SweepConfig` from a profile's ``02_classification`` section plus overrides.

    Returns ``({"datasets", "masks", "methods", "seeds"}, config)``. ``epochs``, ``batch_size`` or
    ``lr`` set to ``None`` mean the paper's value for the (first) data set (``PAPER_HYPERPARAMETERS``).
    Unknown keys raise ``ValueError`` naming them; ``device``/``seed``/``profile`` defaults are ignored.
    """
    try:
        from labkit.lab.profiles import load_profile
    except ImportError:  # before labkit/lab/ existed
        from labkit.profiles import load_profile

    params = load_profile(profile, "02_classification")
    params.update({k: v for k, v in overrides.items()})
    params.pop("seed", None)
    name = params.pop("profile", profile)
    datasets = params.pop("datasets", None) or [params.pop("dataset", "mnist")]
    params.pop("dataset", None)
    if isinstance(datasets, str):
        datasets = [datasets]
    grid = {"datasets": list(datasets), "masks": list(params.pop("masks", ["square"])),
            "methods": list(params.pop("methods", ["zero"])), "seeds": [int(s) for s in params.pop("seeds", [0])]}
    fields = SweepConfig.__dataclass_fields__
    unknown = sorted(k for k in params if k not in fields)
    if unknown:
        raise ValueError(f"unknown 02_classification parameter(s) {unknown}; valid: "
                         f"{', '.join(list(GRID_KEYS) + list(fields))}")
    paper = PAPER_HYPERPARAMETERS.get(grid["datasets"][0], PAPER_HYPERPARAMETERS["mnist"])
    for i, k in enumerate(("epochs", "batch_size", "lr")):
        if params.get(k, 0) is None:
            params[k] = paper[i]
    cfg = SweepConfig(profile=str(name), **params)
    return grid, cfg


# ============================================================================ results files
def read_results(path: str | os.PathLike):
    """The accuracy CSV as a pandas DataFrame (empty with ``ACCURACY_COLUMNS`` if absent)."""
    return read_table(path, ACCURACY_COLUMNS)


def _append_row(path: Path, row: dict) -> bool:
    """Add ``row`` to the CSV atomically unless its cell is there already (see
    :func:`labkit.sweeps.append_csv_row`); returns whether it was added."""
    return append_csv_row(path, row, ACCURACY_COLUMNS, key=["dataset", "mask", "method", "seed"])


_append_jsonl = append_jsonl


def _done(df) -> set[tuple]:
    return {(str(r.dataset), str(r.mask), str(r.method), int(r.seed)) for r in df.itertuples()}


# ============================================================================ one cell / the sweep
def run_cell(dataset: str, mask: str, method: str, seed: int, cfg: SweepConfig) -> dict:
    """Train and test one (dataset, mask, method, seed); return the CSV row plus details (not written)."""
    from labkit.checkpoint import machine_description

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    why = method_available(method, cfg, dataset, mask)
    if why:
        raise RuntimeError(f"method {method!r} cannot run: {why}")
    dev = resolve_device(cfg.device)
    t0 = time.perf_counter()
    data = load_cell_data(dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=cfg.val_fraction,
                          quiet=not cfg.progress)
    aux_train, aux_test, info = METHODS[method].prepare(data, cfg)
    t_prep = time.perf_counter() - t0
    torch.manual_seed(_stable_seed("init", dataset, mask, method, seed))
    C, H, _ = data.train_images.shape[1:]
    model = build_classifier(data.arch, method, in_channels=C, image_size=H).to(dev)
    run_config = {"dataset": dataset, "mask": mask, "method": method, "n_train": len(data.fit_idx),
                  "n_val": len(data.val_idx), "n_test": len(data.test_images), "batch_size": cfg.batch_size,
                  "lr": cfg.lr, "select": cfg.select}
    ckpt = cfg.cache_path() / "runs" / cfg.profile / f"{dataset}-{mask}-{method}-s{seed}.partial.pt"
    t1 = time.perf_counter()
    history, sel = train_classifier(model, data, aux_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                    seed=seed, checkpoint=ckpt, select=cfg.select, device=dev,
                                    progress=cfg.progress, config=run_config, eval_batch=cfg.eval_batch)
    t_train = time.perf_counter() - t1
    acc = evaluate_accuracy(model, data.test_images, data.test_labels, data.test_missing, aux_test,
                            batch_size=cfg.eval_batch)
    row = {"dataset": dataset, "mask": mask, "method": method, "seed": int(seed), "accuracy": round(acc, 5),
           "n_train": len(data.fit_idx), "n_test": len(data.test_images), "epochs": cfg.epochs}
    details = {**row, "n_val": len(data.val_idx), "batch_size": cfg.batch_size, "lr": cfg.lr, "select": cfg.select,
               **sel, "prepare_seconds": round(t_prep, 1), "train_seconds": round(t_train, 1),
               "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine_description(),
               "device": str(dev), "profile": cfg.profile, "data": data.sources,
               "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
               "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in history],
               **info}
    return {"row": row, "details": details, "checkpoint": ckpt}


_REPORTED: dict[str, set] = {}


def plan_cells(datasets: Sequence[str], masks: Sequence[str], methods: Sequence[str], seeds: Sequence[int]) -> list[tuple]:
    """The grid in run order: seeds outermost, so every method sees every mask at seed 0 first."""
    return [(d, m, meth, int(s)) for s in seeds for d in datasets for m in masks for meth in methods]


def run_sweep(datasets: Sequence[str], masks: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
              profile: str = "quick", *, config: SweepConfig | None = None, wait: bool = False,
              poll_seconds: float = 300.0, max_cells: int | None = None, device=None,
              progress: bool = True, _run_cell: Callable = None, **overrides) -> "Any":
    """Run every (dataset, mask, method, seed) cell not yet in ``<results_dir>/accuracy.csv``.

    Args:
        datasets, masks, methods, seeds: the grid (methods: names of ``METHODS``).
        profile: names the results folder (``results/classification/<profile>``) and the checkpoints.
        config: a :class:`SweepConfig`; ``overrides`` (epochs, batch_size, lr, n_train, ...) replace fields.
        wait: when methods are unavailable (no DMFA/ACFlow checkpoint yet), poll every
            ``poll_seconds`` until they appear, instead of returning without them.
        max_cells: stop after this many newly finished cells.

    Each finished cell is appended to the CSV at once (atomically) and described in ``runs.jsonl``;
    a rerun skips finished cells, and an interrupted cell resumes from its epoch checkpoint.
    The next cell is always the first unfinished, runnable one in :func:`plan_cells` order, so a
    method that becomes available later (a checkpoint lands) jumps ahead of later seeds.

    Returns the CSV's DataFrame.
    """
    cfg = config or SweepConfig(profile=profile)
    cfg.profile = profile
    if device is not None:
        cfg.device = device
    cfg.progress = progress
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown sweep setting {k!r}; valid: {', '.join(cfg.__dataclass_fields__)}")
        setattr(cfg, k, v)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    from labkit.masks import MASK_KINDS

    for m in masks:
        if m not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {m!r}; valid: {', '.join(MASK_KINDS)}")
    out = cfg.results_path()
    csv = out / "accuracy.csv"
    cells = plan_cells(datasets, masks, methods, seeds)
    runner = _run_cell or run_cell
    finished = 0
    reported = _REPORTED.setdefault(str(csv), set())   # say "skipping X" once per results file
    while True:
        done = _done(read_results(csv))
        todo = [c for c in cells if c not in done]
        runnable = [c for c in todo if method_available(c[2], cfg, c[0], c[1]) is None]
        for c in todo:
            why = method_available(c[2], cfg, c[0], c[1])
            if why and (c[2], c[1]) not in reported:
                print(f"[sweep] skipping {c[2]} on {c[1]} masks for now: {why}", flush=True)
                reported.add((c[2], c[1]))
        if not todo:
            print(f"[sweep] all {len(cells)} cells done -> {csv}", flush=True)
            break
        if not runnable:
            if not wait:
                print(f"[sweep] {len(todo)} cells wait for unavailable methods; rerun later", flush=True)
                break
            time.sleep(poll_seconds)
            continue
        d, m, meth, s = runnable[0]
        print(f"[sweep] {len(cells) - len(todo) + 1}/{len(cells)}: {d} {m} {meth} seed {s}", flush=True)
        res = runner(d, m, meth, s, cfg)
        if _append_row(csv, res["row"]):      # False: another sweep process finished this cell first
            _append_jsonl(out / "runs.jsonl", res["details"])
        ckpt = res.get("checkpoint")
        if ckpt is not None:
            Path(ckpt).unlink(missing_ok=True)
        print(f"[sweep] {d} {m} {meth} seed {s}: accuracy {res['row']['accuracy']:.4f}"
              + (f" ({res['details'].get('wall_seconds')} s)" if "details" in res else ""), flush=True)
        finished += 1
        if max_cells is not None and finished >= max_cells:
            break
    return read_results(csv)


# ============================================================================ diagnostics
def imputation_quality(dataset: str, mask: str, seed: int, methods: Sequence[str], cfg: SweepConfig, *,
                       n: int = 1000) -> "Any":
    """How good each method's imputer is on the first ``n`` *test* images of a cell (diagnostics only;
    never used to choose anything): per image, the sum of squared errors of the imputation at the
    missing pixels (``sse``), and for MFA-based methods the negative log-likelihood of the true missing
    pixels under the per-image MFA (``nll``, nats) and the mean predicted standard deviation there
    (``pred_std``). Uses the same (cached) preparers as the sweep. Returns a pandas DataFrame.
    """
    import pandas as pd

    data = load_cell_data(dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test,
                          val_fraction=cfg.val_fraction)
    idx = torch.arange(min(n, len(data.test_images)))
    x_true = data.test_images[idx]
    miss = data.test_missing[idx]
    J = miss.expand_as(x_true)
    x = _with_nan(x_true, J)
    rows = []
    for name in methods:
        if method_available(name, cfg, dataset, mask):
            continue
        _, aux_test, _ = METHODS[name].prepare(data, cfg)
        rec = {"method": name}
        if METHODS[name].front.aux_kind == "mfa":
            starts = range(0, len(idx), 250)
            mfas = [aux_test.get(idx[s:s + 250], x[s:s + 250], miss[s:s + 250]) for s in starts]
            nll = torch.cat([-m.log_prob(x_true[s:s + 250], miss[s:s + 250]) for s, m in zip(starts, mfas)])
            mean = torch.cat([m.mean() for m in mfas])
            var = torch.cat([m.variance() for m in mfas])
            rec["nll"] = float(nll.mean())
            rec["pred_std"] = float(var.sqrt()[J].mean())
        elif METHODS[name].front.aux_kind == "images" and name != "gt":
            mean = aux_test.get(idx, x, miss)
        else:
            mean = torch.zeros_like(x_true)   # zero / mask / pc: the hole is treated as 0 (or skipped)
        err = torch.where(J, mean - x_true, torch.zeros((), dtype=x_true.dtype))
        rec["sse"] = float((err ** 2).sum((1, 2, 3)).mean())
        rec["missing_pixels"] = float(J.sum((1, 2, 3)).float().mean())
        rows.append(rec)
    return pd.DataFrame(rows).set_index("method")


# ============================================================================ tables and plots
def pivot_table(df, *, with_paper: bool = True, dataset: str | None = None):
    """Table-1-style pivot: rows = methods, columns = masks, cells ``"mean ± std (n)"`` over seeds.

    With ``with_paper`` the paper's Table 1 value follows each column ("paper <mask>"), and the
    authors' single-seed square numbers a last column. Returns a pandas DataFrame of strings.
    """
    import pandas as pd

    if dataset is not None:
        df = df[df["dataset"] == dataset]
    if df.empty:
        return pd.DataFrame()
    masks = [m for m in ("square", "trapezoid", "noise") if m in set(df["mask"])]
    methods = [m for m in METHOD_ORDER if m in set(df["method"])] + sorted(set(df["method"]) - set(METHOD_ORDER))
    g = df.groupby(["method", "mask"])["accuracy"]
    mean, std, cnt = g.mean(), g.std(ddof=1), g.count()
    rows = []
    for meth in methods:
        row = {"method": meth}
        for mk in masks:
            if (meth, mk) in mean.index:
                n = int(cnt[(meth, mk)])
                s = std[(meth, mk)]
                row[mk] = f"{mean[(meth, mk)]:.3f} ± {s:.3f} (n={n})" if n > 1 else f"{mean[(meth, mk)]:.3f} (n=1)"
            else:
                row[mk] = ""
            if with_paper:
                p = PAPER_TABLE1.get(meth, {}).get(mk)
                row[f"paper {mk}"] = f"{p:.3f}" if p is not None else ""
        if with_paper:
            a = AUTHORS_SQUARE.get(meth)
            row["authors' code, square"] = f"{a:.4f}" if a is not None else ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def paired_differences(df, method: str, baseline: str):
    """Accuracy of ``method`` minus ``baseline``, seed by seed, per (dataset, mask).

    Cells with the same seed share their masks, initialisation and batch order, so the per-seed
    difference removes most of the noise that separate means carry. Returns a DataFrame indexed by
    (dataset, mask) with ``mean``, ``std`` (over seeds; NaN for one seed), ``n`` and ``seeds`` (the
    per-seed differences, seed order); only seeds where both methods finished count.
    """
    import pandas as pd

    for m in (method, baseline):
        if m not in set(df["method"]):
            raise ValueError(f"no results for method {m!r}; have {sorted(set(df['method']))}")
    a = df[df["method"] == method].set_index(["dataset", "mask", "seed"])["accuracy"]
    b = df[df["method"] == baseline].set_index(["dataset", "mask", "seed"])["accuracy"]
    d = (a - b).dropna().sort_index()
    rows = []
    for (ds, mk), grp in d.groupby(level=["dataset", "mask"]):
        rows.append({"dataset": ds, "mask": mk, "mean": float(grp.mean()),
                     "std": float(grp.std(ddof=1)) if len(grp) > 1 else float("nan"), "n": int(len(grp)),
                     "seeds": [round(float(v), 4) for v in grp]})
    return pd.DataFrame(rows, columns=["dataset", "mask", "mean", "std", "n", "seeds"]).set_index(["dataset", "mask"])


def table_markdown(df, **kw) -> str:
    """:func:`pivot_table` as a Markdown table (for the README), best mean per mask in bold."""
    import pandas as pd

    piv = pivot_table(df, **kw)
    if piv.empty:
        return "(no results yet)"
    means = df.groupby(["method", "mask"])["accuracy"].mean()
    best = {mk: means.xs(mk, level="mask").drop(labels=["gt"], errors="ignore").idxmax()
            for mk in set(df["mask"]) if not means.xs(mk, level="mask").drop(labels=["gt"], errors="ignore").empty}
    cols = list(piv.columns)
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for meth, row in piv.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if c in best and best[c] == meth and v:
                v = f"**{v}**"
            cells.append(v)
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_markdown_table(md_path: str | os.PathLike, df, *, name: str = "classification-table", **kw) -> bool:
    """Replace the text between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` in ``md_path``
    with :func:`table_markdown` of ``df`` (plus a line saying how many cells it holds).

    Returns True if the file changed. Raises ``ValueError`` if the markers are missing.
    """
    n_cells = len(df)
    seeds = sorted(set(int(s) for s in df["seed"])) if n_cells else []
    body = (f"_Generated from the CSV by `labkit.studies.classification.update_markdown_table`: {n_cells} cells, "
            f"seeds {seeds}._\n\n" + table_markdown(df, **kw))
    return replace_marked_block(md_path, name, body)


#: what the paired table compares: (MisConv over a density, mean imputation from the same density)
#: and MisConv against the two strongest density-free baselines
PAIRS = [("dmfa_misconv_complete", "dmfa_mean_complete"), ("dmfa_misconv_incomplete", "dmfa_mean_incomplete"),
         ("mfa_misconv", "mfa_mean"), ("dmfa_misconv_complete", "pc"), ("dmfa_misconv_complete", "mask"),
         ("dmfa_misconv_incomplete", "pc")]


def paired_markdown(df, pairs: Sequence[tuple[str, str]] = PAIRS) -> str:
    """:func:`paired_differences` for ``pairs`` as a Markdown table: one row per pair, one column per
    mask, cells "mean ± std (n)" in accuracy *points* (×100). Pairs lacking results are left out."""
    masks = [m for m in ("square", "trapezoid", "noise") if m in set(df["mask"])]
    lines = ["| MisConv variant − other method | " + " | ".join(masks) + " |", "|---" * (len(masks) + 1) + "|"]
    have = set(df["method"])
    for a, b in pairs:
        if not {a, b} <= have:
            continue
        d = paired_differences(df, a, b)
        cells = []
        for mk in masks:
            rows = d[d.index.get_level_values("mask") == mk]
            if rows.empty:
                cells.append("")
                continue
            r = rows.iloc[0]
            sd = "" if r["n"] < 2 else f" ± {100 * r['std']:.2f}"
            cells.append(f"{100 * r['mean']:+.2f}{sd} (n={int(r['n'])})")
        lines.append(f"| `{a}` − `{b}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(df, path: str | os.PathLike | None = None, *, title: str | None = None):
    """Bar chart: accuracy per method (mean over seeds, error bars = std; dots = seeds) per mask,
    with the paper's Table 1 values as black ticks. Saves to ``path`` when given; returns the figure."""
    import matplotlib

    if path is not None:
        matplotlib.use(matplotlib.get_backend())
    import matplotlib.pyplot as plt

    masks = [m for m in ("square", "trapezoid", "noise") if m in set(df["mask"])]
    methods = [m for m in METHOD_ORDER if m in set(df["method"])]
    # one y range per mask: the trapezoid column sits ~30 points below the others, and a shared axis
    # would flatten the differences that matter within each column
    fig, axes = plt.subplots(1, max(1, len(masks)), figsize=(4.2 * max(1, len(masks)), 4.6), squeeze=False)
    for ax, mk in zip(axes[0], masks):
        sub = df[df["mask"] == mk]
        for i, meth in enumerate(methods):
            acc = sub[sub["method"] == meth]["accuracy"].to_numpy()
            if len(acc) == 0:
                continue
            ax.bar(i, acc.mean(), yerr=acc.std(ddof=1) if len(acc) > 1 else 0, color="C0" if "misconv" not in meth
                   else "C3", alpha=0.75, capsize=3)
            ax.plot(np.full(len(acc), i), acc, "k.", ms=3)
            p = PAPER_TABLE1.get(meth, {}).get(mk)
            if p is not None:
                ax.plot([i - 0.4, i + 0.4], [p, p], "k-", lw=2)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_title(mk)
        shown = list(sub["accuracy"]) + [v for m in methods if (v := PAPER_TABLE1.get(m, {}).get(mk)) is not None]
        ax.set_ylim(max(0.0, min(shown) - 0.03), 1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    legend = "bars: ours (mean ± std over seeds, dots: seeds; red: MisConv); black ticks: paper's Table 1"
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=10)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
