"""Tables and figures of the classification study: Table-1 pivots beside the paper's numbers,
per-seed paired differences with their statistics (:mod:`labkit.studies.paired_stats`), the dot chart. Every function refuses to combine rows made with
different settings (:func:`check_table_settings`)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from labkit import paths
from labkit.studies.engine import check_uniform
from labkit.studies.paired_stats import covers_zero, paired_comparison
from labkit.studies.reporting import replace_marked_block

def results_path(cfg) -> Path:
    """Where the rows, tables and figures of the classification config ``cfg`` go: ``cfg.results_dir``,
    else ``results/classification/<profile>``."""
    return Path(cfg.results_dir) if cfg.results_dir else paths.results_dir("classification", cfg.profile)


#: display order of the methods (tables, plots)
METHOD_ORDER = ["zero", "mask", "knn", "pc", "mfa_mean", "mfa_misconv", "dmfa_mean_complete",
                "dmfa_misconv_complete", "dmfa_authors_complete", "dmfa_mean_incomplete", "dmfa_misconv_incomplete",
                "dmfa_authors_incomplete", "acflow", "gt"]

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

#: the authors' CIFAR-10 logs (their code: 35 epochs, 50,000 training images, 16×16 squares, last
#: epoch, one run each; two numbers where they ran a method twice). Their mask channel and partial
#: convolution saw missing pixels as -1 (a leak), hence their low accuracy.
AUTHORS_CIFAR10 = {
    "gt": (0.8590,), "zero": (0.7580, 0.7482), "dmfa_mean_incomplete": (0.7596, 0.7576),
    "dmfa_mean_complete": (0.7566,), "dmfa_misconv_complete": (0.7537,), "dmfa_misconv_incomplete": (0.7523, 0.7500),
    "acflow": (0.6984,), "mfa_misconv": (0.6683,), "mask": (0.4968,), "pc": (0.4696,),
}

#: column order of the masks in tables and figures (the Table-1 kinds, then the older inside-the-image trapezoid)
MASK_ORDER = ("square", "trapezoid", "trapezoid_inside", "noise")

#: settings that belong to one method (k-NN's, the classical MFA's, ACFlow's): they may differ between
#: the methods of one table, never between the seeds of one method
METHOD_SETTINGS = ("knn_fit", "knn_k", "knn_val", "mfa_components", "mfa_factors", "mfa_iterations",
                   "acflow_samples")


def check_table_settings(df) -> dict:
    """Refuse (:class:`~labkit.studies.engine.SettingsMismatch`, naming the settings) to put in one
    table rows made with different settings; returns the settings the table shares. Frames without
    a ``settings`` column (hand-made ones) pass unchecked."""
    if "settings" not in getattr(df, "columns", ()) or len(df) == 0:
        return {}
    for (meth, mk), group in df.groupby(["method", "mask"]):
        check_uniform(group, what=f"the {meth} rows on {mk} masks")
    return check_uniform(df, ignore=METHOD_SETTINGS, what="this table")


def _paper_applies(df) -> bool:
    """The paper's Table 1 and the authors' runs are MNIST numbers: shown beside MNIST rows only
    (frames without a ``dataset`` column, made by hand, count as MNIST)."""
    return "dataset" not in getattr(df, "columns", ()) or set(df["dataset"]) <= {"mnist"}


def _summary(values) -> str:
    """``"mean ± std (n=k)"`` of the finite values (``""`` if none)."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) == 0:
        return ""
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f} (n={len(v)})" if len(v) > 1 else f"{v.mean():.3f} (n=1)"


def pivot_table(df, *, with_paper: bool = True, dataset: str | None = None, last_epoch: bool = True):
    """Table-1-style pivot: rows = methods, columns = masks, cells ``"mean ± std (n)"`` over seeds.

    The validation-picked epoch's test accuracy per mask; with ``last_epoch`` (and an
    ``accuracy_last`` column) the last epoch's test accuracy beside it ("<mask>, last epoch": what the
    authors reported; rows made before it was recorded count only where the validation picked the
    last epoch, hence a smaller n). With ``with_paper`` the paper's Table 1 value follows each
    column ("paper <mask>"), and the authors' single-seed square numbers a last column (MNIST:
    their code's runs; CIFAR-10: their logs, :data:`AUTHORS_CIFAR10`). Refuses rows
    made with different settings (:func:`check_table_settings`). Returns a DataFrame of strings.
    """
    import pandas as pd

    if dataset is not None:
        df = df[df["dataset"] == dataset]
    if df.empty:
        return pd.DataFrame()
    check_table_settings(df)
    authors_cifar10 = with_paper and set(df.get("dataset", ())) == {"cifar10"} and "square" in set(df["mask"])
    with_paper = with_paper and _paper_applies(df)
    last_epoch = last_epoch and "accuracy_last" in df.columns
    masks = [m for m in MASK_ORDER if m in set(df["mask"])]
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
            if last_epoch:
                sel = df[(df["method"] == meth) & (df["mask"] == mk)]
                row[f"{mk}, last epoch"] = _summary(sel["accuracy_last"])
            if with_paper and any(mk in v for v in PAPER_TABLE1.values()):
                p = PAPER_TABLE1.get(meth, {}).get(mk)
                row[f"paper {mk}"] = f"{p:.3f}" if p is not None else ""
        if with_paper and "square" in masks:
            a = AUTHORS_SQUARE.get(meth)
            row["authors' code, square"] = f"{a:.4f}" if a is not None else ""
        if authors_cifar10:
            row["authors' log, square"] = " / ".join(f"{a:.4f}" for a in AUTHORS_CIFAR10.get(meth, ()))
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def paired_differences(df, method: str, baseline: str, *, level: float = 0.95, n_boot: int = 10000):
    """Accuracy of ``method`` minus ``baseline``, seed by seed, per (dataset, mask), with its statistics.

    Cells with the same seed share their masks and batch order (and, with ``init="shared"``, their
    initial weights), so the per-seed difference removes noise that separate means carry. Returns a
    DataFrame indexed by (dataset, mask) with ``mean``, ``std`` (over seeds; NaN for one seed), ``n``,
    ``seeds`` (the per-seed differences, seed order), ``seed_ids``, the t-based ``level`` interval
    over seeds ``ci_low``/``ci_high`` and its two-sided t-test ``p``, ``resolved`` (the interval
    excludes 0), and where every compared cell stored its per-image predictions (a ``correct``
    column, :func:`labkit.studies.classification.with_predictions`) the bootstrap over images ×
    seeds ``boot_low``/``boot_high`` and McNemar's exact test pooled over seeds ``mcnemar_p``
    (:mod:`labkit.studies.paired_stats`). Only seeds where both methods finished count.
    """
    import pandas as pd


    check_table_settings(df[df["method"].isin([method, baseline])])
    cmp = paired_comparison(df, method, baseline, level=level, n_boot=n_boot)
    out = pd.DataFrame({"mean": cmp["mean"], "std": cmp["sd"], "n": cmp["n"],
                        "seeds": [[round(v, 4) for v in d] for d in cmp["differences"]],
                        "seed_ids": cmp["seeds"], "ci_low": cmp["ci_low"], "ci_high": cmp["ci_high"],
                        "p": cmp["t_p"], "resolved": cmp["resolved"], "n_predictions": cmp["n_predictions"],
                        "boot_low": cmp["boot_low"], "boot_high": cmp["boot_high"], "mcnemar_p": cmp["mcnemar_p"]},
                       index=cmp.index)
    return out


def table_markdown(df, **kw) -> str:
    """:func:`pivot_table` as a Markdown table (for the docs), best mean per mask in bold."""
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
    shared = settings_line(df)
    body = (f"_Generated from the CSV by `labkit.studies.classification.update_markdown_table`: {n_cells} cells, "
            f"seeds {seeds}{'; ' + shared if shared else ''}._\n\n" + table_markdown(df, **kw))
    return replace_marked_block(md_path, name, body)


def settings_line(df) -> str:
    """The settings every row of ``df`` shares, as one line (``""`` for frames without settings):
    what a table states beside its numbers."""
    shared = check_table_settings(df)
    names = {"n_train": "training images (incl. validation)", "n_test": "test images", "epochs": "epochs",
             "batch_size": "batch", "lr": "lr", "select": "epoch selection", "precision": "precision",
             "val_fraction": "validation fraction"}
    return ", ".join(f"{label} {shared[k]}" for k, label in names.items() if k in shared)


#: what the paired table compares: (MisConv over a density, mean imputation from the same density),
#: MisConv against the strongest density-free baselines and against zero imputation (on CIFAR-10 the
#: authors' zero imputation matched both DMFA fronts), and the authors' layer against the exact one
PAIRS = [("dmfa_misconv_complete", "dmfa_mean_complete"), ("dmfa_misconv_incomplete", "dmfa_mean_incomplete"),
         ("mfa_misconv", "mfa_mean"), ("dmfa_misconv_complete", "pc"), ("dmfa_misconv_complete", "mask"),
         ("dmfa_misconv_incomplete", "pc"), ("dmfa_misconv_complete", "zero"), ("dmfa_misconv_incomplete", "zero"),
         ("dmfa_mean_complete", "zero"), ("dmfa_authors_complete", "dmfa_misconv_complete"),
         ("dmfa_authors_incomplete", "dmfa_misconv_incomplete")]


def _points(v: float) -> str:
    return f"{100 * v:+.2f}"


def _p_text(p: float) -> str:
    if p != p:
        return "–"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def paired_markdown(df, pairs: Sequence[tuple[str, str]] = PAIRS, *, level: float = 0.95) -> str:
    """:func:`paired_differences` for ``pairs`` as a Markdown table, in accuracy *points* (×100): one
    row per (pair, mask) with the seeds' differences, their mean ± the half-width of the t-based
    ``level`` interval over seeds and its t-test p, the bootstrap interval over images × seeds and
    McNemar's pooled exact p where per-image predictions exist ("–" where they do not), and
    "no difference resolved" where the interval over seeds holds 0. Pairs lacking results are left
    out; the data set is named when the frame holds more than one."""
    masks = [m for m in MASK_ORDER if m in set(df["mask"])] + sorted(set(df["mask"]) - set(MASK_ORDER))
    several = "dataset" in df.columns and df["dataset"].nunique() > 1
    pct = f"{100 * level:g} %"
    lines = [f"| method − other method | {'data set | ' if several else ''}mask | seeds | per seed | "
             f"mean ± {pct} CI over seeds (t) | p (t-test) | {pct} CI, bootstrap over images × seeds | "
             "McNemar p (pooled over seeds) | verdict |",
             "|---" * (9 + several) + "|"]
    have = set(df["method"])
    for a, b in pairs:
        if not {a, b} <= have:
            continue
        d = paired_differences(df, a, b, level=level)
        rows = sorted(d.iterrows(), key=lambda kv: (kv[0][0], masks.index(kv[0][1]) if kv[0][1] in masks else 99))
        for (ds, mk), r in rows:
            n = int(r["n"])
            per_seed = ", ".join(_points(v) for v in r["seeds"])
            if n >= 2:
                mean = f"{_points(r['mean'])} ± {100 * (r['ci_high'] - r['mean']):.2f}"
                verdict = "resolved" if r["resolved"] else "no difference resolved"
            else:
                mean = f"{_points(r['mean'])} (one seed: no interval)"
                # one seed says nothing about other seeds; its images can still resolve a difference
                # for this one training run (the bootstrap over its images), and the verdict says which

                have_boot = r["boot_low"] == r["boot_low"]
                verdict = ("this seed only: resolved over its test images"
                           if have_boot and not covers_zero(r["boot_low"], r["boot_high"])
                           else "no difference resolved")
            boot = (f"[{_points(r['boot_low'])}, {_points(r['boot_high'])}]" if r["boot_low"] == r["boot_low"]
                    else "–")
            lead = f"| `{a}` − `{b}` | " + (f"{ds} | " if several else "")
            lines.append(f"{lead}{mk} | {n} | {per_seed} | {mean} | {_p_text(r['p'])} | {boot} | "
                         f"{_p_text(r['mcnemar_p'])} | {verdict} |")
    return "\n".join(lines)


def plot_results(df, path: str | os.PathLike | None = None, *, title: str | None = None):
    """Dot chart: accuracy per method per mask, a marker at the mean over seeds with an error bar of
    one standard deviation, small dots for the seeds, and the paper's Table 1 values as black ticks.
    Saves to ``path`` when given; returns the figure.

    Markers rather than bars: each mask gets its own y range (the trapezoid column sits ~30 points
    below the others, and a shared or zero-based axis would flatten the differences that matter
    within a column), and a bar whose axis does not start at 0 would misstate the ratios of its
    lengths; a marker's position is all it claims.
    """
    import matplotlib

    if path is not None:
        matplotlib.use(matplotlib.get_backend())
    import matplotlib.pyplot as plt

    check_table_settings(df)
    paper = PAPER_TABLE1 if _paper_applies(df) else {}
    masks = [m for m in MASK_ORDER if m in set(df["mask"])]
    methods = [m for m in METHOD_ORDER if m in set(df["method"])]
    fig, axes = plt.subplots(1, max(1, len(masks)), figsize=(4.2 * max(1, len(masks)), 4.6), squeeze=False)
    for ax, mk in zip(axes[0], masks):
        sub = df[df["mask"] == mk]
        for i, meth in enumerate(methods):
            acc = sub[sub["method"] == meth]["accuracy"].to_numpy()
            if len(acc) == 0:
                continue
            colour = "C0" if "misconv" not in meth else "C3"
            ax.errorbar(i, acc.mean(), yerr=acc.std(ddof=1) if len(acc) > 1 else 0, fmt="o", ms=6, color=colour,
                        capsize=3, zorder=3)
            ax.plot(np.full(len(acc), i + 0.2), acc, ".", color="0.35", ms=3, zorder=2)
            p = paper.get(meth, {}).get(mk)
            if p is not None:
                ax.plot([i - 0.35, i + 0.35], [p, p], "k-", lw=2, zorder=1)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(mk)
        shown = list(sub["accuracy"]) + [v for m in methods if (v := paper.get(m, {}).get(mk)) is not None]
        ax.set_ylim(max(0.0, min(shown) - 0.03), min(1.0, max(shown) + 0.02))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    legend = "markers: ours, mean ± std over seeds (grey dots: the seeds; red: MisConv)" + \
        ("; black ticks: paper's Table 1" if paper else "") + "; each panel has its own y range"
    shared = settings_line(df)
    legend = f"{legend}\n{shared}" if shared else legend
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=9)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
