"""Tables and figures of the classification study: Table-1 pivots beside the paper's numbers,
per-seed paired differences with their statistics (:mod:`labkit.studies.paired_stats`) as a table
and as a forest plot, the dot chart, and one grid under two budgets side by side. Every function
refuses to combine rows made with different settings (:func:`check_table_settings`)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def paired_differences(df, method: str, baseline: str, *, level: float = 0.95, n_boot: int | None = 10000):
    """Accuracy of ``method`` minus ``baseline``, seed by seed, per (dataset, mask), with its statistics.

    Cells with the same seed share their masks and batch order (and, with ``init="shared"``, their
    initial weights), so the per-seed difference removes noise that separate means carry. Returns a
    DataFrame indexed by (dataset, mask) with ``mean``, ``std`` (over seeds; NaN for one seed), ``n``,
    ``seeds`` (the per-seed differences, seed order), ``seed_ids``, the t-based ``level`` interval
    over seeds ``ci_low``/``ci_high`` and its two-sided t-test ``p``, ``resolved`` (the interval
    excludes 0), and where every compared cell stored its per-image predictions (a ``correct``
    column, :func:`labkit.studies.classification.with_predictions`) the bootstrap over images ×
    seeds ``boot_low``/``boot_high``, McNemar's exact test pooled over seeds ``mcnemar_p`` and per
    seed ``mcnemar_p_per_seed`` (a list in seed order)
    (:mod:`labkit.studies.paired_stats`). Only seeds where both methods finished count.
    """
    import pandas as pd


    check_table_settings(df[df["method"].isin([method, baseline])])
    cmp = paired_comparison(df, method, baseline, level=level, n_boot=n_boot)
    out = pd.DataFrame({"mean": cmp["mean"], "std": cmp["sd"], "n": cmp["n"],
                        "seeds": [[round(v, 4) for v in d] for d in cmp["differences"]],
                        "seed_ids": cmp["seeds"], "ci_low": cmp["ci_low"], "ci_high": cmp["ci_high"],
                        "p": cmp["t_p"], "resolved": cmp["resolved"], "n_predictions": cmp["n_predictions"],
                        "boot_low": cmp["boot_low"], "boot_high": cmp["boot_high"], "mcnemar_p": cmp["mcnemar_p"],
                        "mcnemar_p_per_seed": cmp["mcnemar_p_per_seed"]},
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


def seeds_markdown(df) -> str:
    """Every cell's own test accuracy as a Markdown table: rows = method (and mask where there are
    several), columns = seeds, each cell the validation-picked epoch's accuracy with the last
    epoch's in brackets (what the authors reported), "–" where a seed has no row. The pivot gives
    means over seeds; this is the per-seed record beside it, read from the same rows."""
    if df.empty:
        return "(no results yet)"
    check_table_settings(df)
    masks = [m for m in MASK_ORDER if m in set(df["mask"])] + sorted(set(df["mask"]) - set(MASK_ORDER))
    methods = [m for m in METHOD_ORDER if m in set(df["method"])] + sorted(set(df["method"]) - set(METHOD_ORDER))
    seeds = sorted(set(int(s) for s in df["seed"]))
    several = len(masks) > 1
    lines = ["| method | " + ("mask | " if several else "") + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (1 + several + len(seeds)) + "|"]
    for meth in methods:
        for mk in masks:
            sel = df[(df["method"] == meth) & (df["mask"] == mk)]
            if sel.empty:
                continue
            cells = []
            for s in seeds:
                r = sel[sel["seed"].astype(int) == s]
                if r.empty:
                    cells.append("–")
                    continue
                last = r["accuracy_last"].iloc[0] if "accuracy_last" in r.columns else float("nan")
                cells.append(f"{r['accuracy'].iloc[0]:.4f}" + (f" ({last:.4f})" if last == last else ""))
            lines.append(f"| {meth} | " + (f"{mk} | " if several else "") + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_markdown_table(md_path: str | os.PathLike, df, *, name: str = "classification-table", **kw) -> bool:
    """Replace the text between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` in ``md_path``
    with :func:`table_markdown` of ``df`` (plus a line saying how many cells it holds).

    Returns True if the file changed. Raises ``ValueError`` if the markers are missing.
    """
    n_cells = len(df)
    seeds = sorted(set(int(s) for s in df["seed"])) if n_cells else []
    shared = settings_line(df)
    cells = f"{n_cells} cell" + ("" if n_cells == 1 else "s")
    body = (f"_Generated from the CSV by `labkit.studies.classification.update_markdown_table`: {cells}, "
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


def paired_results(df, pairs: Sequence[tuple[str, str]] = PAIRS, *, level: float = 0.95,
                   n_boot: int = 10000) -> list[tuple[str, str, Any]]:
    """``[(a, b, paired_differences(df, a, b)), ...]`` for the pairs of ``pairs`` whose two methods
    ``df`` holds (in that order): computed once, read by :func:`paired_markdown` and
    :func:`plot_paired`."""
    have = set(df["method"])
    return [(a, b, paired_differences(df, a, b, level=level, n_boot=n_boot)) for a, b in pairs if {a, b} <= have]


def _cell_order(key: tuple[str, str]) -> tuple:
    """Sort key of a (dataset, mask): data sets by name, masks in :data:`MASK_ORDER`, others after."""
    ds, mk = key
    return ds, MASK_ORDER.index(mk) if mk in MASK_ORDER else len(MASK_ORDER), mk


def _ordered(d) -> list:
    """The (dataset, mask) rows of a :func:`paired_differences` frame in :func:`_cell_order`."""
    return sorted(d.iterrows(), key=lambda kv: _cell_order(kv[0]))


def paired_markdown(df, pairs: Sequence[tuple[str, str]] = PAIRS, *, level: float = 0.95,
                    results: Sequence[tuple[str, str, Any]] | None = None, per_seed_mcnemar: bool = False) -> str:
    """:func:`paired_differences` for ``pairs`` as a Markdown table, in accuracy *points* (×100): one
    row per (pair, mask) with the seeds' differences, their mean ± the half-width of the t-based
    ``level`` interval over seeds and its t-test p, the bootstrap interval over images × seeds and
    McNemar's pooled exact p where per-image predictions exist ("–" where they do not), and
    "no difference resolved" where the interval over seeds holds 0. Pairs lacking results are left
    out; the data set is named when the frame holds more than one. ``results``: what
    :func:`paired_results` gave for ``df`` (computed here when not given). ``per_seed_mcnemar``: a
    column more, McNemar's exact p of each seed's two trained classifiers (seed order)."""
    several = "dataset" in df.columns and df["dataset"].nunique() > 1
    pct = f"{100 * level:g} %"
    lines = [f"| method − other method | {'data set | ' if several else ''}mask | seeds | per seed | "
             f"mean ± {pct} CI over seeds (t) | p (t-test) | {pct} CI, bootstrap over images × seeds | "
             "McNemar p (pooled over seeds) | " + ("McNemar p per seed | " if per_seed_mcnemar else "") + "verdict |",
             "|---" * (9 + several + per_seed_mcnemar) + "|"]
    for a, b, d in (paired_results(df, pairs, level=level) if results is None else results):
        for (ds, mk), r in _ordered(d):
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
            seeds_p = ""
            if per_seed_mcnemar:
                each = r["mcnemar_p_per_seed"]
                seeds_p = (", ".join(_p_text(v) for v in each) if isinstance(each, list) else "–") + " | "
            lines.append(f"{lead}{mk} | {n} | {per_seed} | {mean} | {_p_text(r['p'])} | {boot} | "
                         f"{_p_text(r['mcnemar_p'])} | {seeds_p}{verdict} |")
    if len(lines) == 2:
        return "(no pair of methods compared yet: no seed has rows of both methods of a pair)"
    return "\n".join(lines)


def _finish(fig, legend: str, title: str | None, path: str | os.PathLike | None):
    """Title ``fig`` (``title`` over ``legend``, each line wrapped to the figure's width), lay it out,
    save it to ``path`` when given; return it."""
    import textwrap

    width = max(40, int(fig.get_figwidth() * 13))       # characters of 9-point text per line
    text = f"{title}\n{legend}" if title else legend
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.splitlines()), fontsize=9)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


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
    return _finish(fig, legend, title, path)


def plot_paired(results: Sequence[tuple[str, str, Any]], path: str | os.PathLike | None = None, *,
                title: str | None = None, level: float = 0.95):
    """Forest plot of :func:`paired_results`: one panel per (data set, mask), one row per pair, the
    x axis in accuracy points (method − other method). Per row: the seeds' differences (grey dots),
    the mean over seeds (filled where the interval over seeds excludes 0, hollow where it does not),
    the t-based ``level`` interval over seeds (thick line) and, where per-image predictions exist, the
    bootstrap interval over images × seeds (thin line just below). Saves to ``path`` when given;
    returns the figure."""
    import matplotlib.pyplot as plt

    panels = sorted({k for _, _, d in results for k in d.index}, key=_cell_order)
    if not panels:
        raise ValueError("no paired results to plot (no pair of methods with rows in common)")
    several = len({ds for ds, _ in panels}) > 1
    labels = [f"{a} − {b}" for a, b, _ in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8.0, 3.6 * len(panels) + 2.6), 0.42 * len(results) + 2.1),
                             sharey=True, squeeze=False)
    for ax, key in zip(axes[0], panels):
        for i, (_, _, d) in enumerate(results):
            if key not in d.index:
                continue
            r, y = d.loc[key], -i
            colour = "C3" if bool(r["resolved"]) else "C0"
            seeds = 100 * np.asarray(r["seeds"], dtype=float)
            ax.plot(seeds, np.full(len(seeds), y + 0.2), ".", color="0.45", ms=3, zorder=2)
            if r["boot_low"] == r["boot_low"]:
                ax.plot([100 * r["boot_low"], 100 * r["boot_high"]], [y - 0.17, y - 0.17], "-", color=colour,
                        lw=1, zorder=2, gid="bootstrap")
            if int(r["n"]) >= 2:
                ax.plot([100 * r["ci_low"], 100 * r["ci_high"]], [y, y], "-", color=colour, lw=2.5, zorder=3,
                        gid="t-interval")
            ax.plot([100 * r["mean"]], [y], "o", color=colour, mfc=colour if bool(r["resolved"]) else "white",
                    ms=6, zorder=4, gid="mean")
        ax.axvline(0, color="k", lw=0.8, zorder=1)
        ax.set_title(f"{key[0]}, {key[1]}" if several else key[1])
        ax.set_xlabel("difference in accuracy points")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks([-i for i in range(len(results))])
    axes[0][0].set_yticklabels(labels, fontsize=8)
    axes[0][0].set_ylim(-len(results) + 0.4, 0.6)
    pct = f"{100 * level:g} %"
    legend = (f"dot: mean over seeds (red and filled: its {pct} interval over seeds excludes 0)\n"
              f"thick line: that interval (t); thin line below: {pct} bootstrap over images × seeds; "
              "grey dots: the seeds")
    return _finish(fig, legend, title, path)


#: what the budget comparison pairs: MisConv against mean imputation from the same DMFA, and the
#: DMFA fronts against zero imputation (the authors' CIFAR-10 logs have all of them within a point)
BUDGET_PAIRS = [("dmfa_misconv_incomplete", "dmfa_mean_incomplete"), ("dmfa_misconv_complete", "dmfa_mean_complete"),
                ("dmfa_misconv_incomplete", "zero"), ("dmfa_misconv_complete", "zero"),
                ("dmfa_mean_incomplete", "zero"), ("dmfa_mean_complete", "zero")]


def _only_cell(df, what: str) -> tuple[str, str]:
    keys = sorted(set(zip(df["dataset"], df["mask"])))
    if len(keys) != 1:
        raise ValueError(f"{what}: a budget comparison needs the rows of one data set and one mask, got {keys}")
    return keys[0]


def _budget_grid(frames: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """The non-empty ``frames`` (label -> rows of one budget) and their methods in display order;
    raises ``ValueError`` unless every frame holds one data set and mask, the same in all."""
    frames = {label: df for label, df in frames.items() if len(df)}
    cells = {label: _only_cell(df, label) for label, df in frames.items()}
    if len(set(cells.values())) > 1:
        raise ValueError(f"the budgets compare different data: {cells}")
    present = set().union(*(set(df["method"]) for df in frames.values())) if frames else set()
    return frames, [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def budget_markdown(frames: Mapping[str, Any], pairs: Sequence[tuple[str, str]] = BUDGET_PAIRS, *,
                    authors: Mapping[str, Sequence[float]] | None = None, level: float = 0.95) -> str:
    """The same methods trained under different budgets, side by side (Markdown; their training
    curves: :func:`plot_budget_curves`).

    ``frames``: label -> result rows of one budget (one data set and one mask, the same in every
    frame; each frame's rows share their settings, :func:`check_table_settings`). First the budgets'
    settings, then a table of accuracies (mean ± std over seeds, n; per budget the validation-picked
    and the last epoch's) with ``authors`` (method -> their logged runs) as a last column, then the
    paired differences of ``pairs`` per budget (mean ± the t-based ``level`` half-width over seeds,
    n, p; "resolved" where the interval excludes 0) beside the same difference in ``authors``' logs
    (means of their runs)."""
    frames, methods = _budget_grid(frames)
    if not frames:
        return "(no results yet)"
    labels = list(frames)
    authors = authors or {}
    lines = [f"- **{label}**: {settings_line(df) or 'settings not recorded'}" for label, df in frames.items()]
    head = [h for label in labels for h in (label, f"{label}, last epoch")] + (["authors' log"] if authors else [])
    lines += ["", "| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for meth in methods:
        cols = []
        for label in labels:
            sel = frames[label][frames[label]["method"] == meth]
            cols += [_summary(sel["accuracy"]) or "–",
                     (_summary(sel["accuracy_last"]) if "accuracy_last" in sel.columns else "") or "–"]
        if authors:
            cols.append(" / ".join(f"{v:.4f}" for v in authors.get(meth, ())) or "–")
        lines.append(f"| {meth} | " + " | ".join(cols) + " |")
    pct = f"{100 * level:g} %"
    head = ([f"{label}: mean ± {pct} CI over seeds (n, p)" for label in labels]
            + (["authors' logs (means of their runs)"] if authors else []))
    lines += ["", "| method − other method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for a, b in pairs:
        cols = []
        for label in labels:
            df = frames[label]
            if not {a, b} <= set(df["method"]):
                cols.append("–")
                continue
            r = paired_differences(df, a, b, level=level, n_boot=None).iloc[0]     # no bootstrap shown
            n = int(r["n"])
            if n >= 2:
                verdict = "resolved" if r["resolved"] else "no difference resolved"
                cols.append(f"{_points(r['mean'])} ± {100 * (r['ci_high'] - r['mean']):.2f} "
                            f"(n={n}, p = {_p_text(r['p'])}): {verdict}")
            else:
                cols.append(f"{_points(r['mean'])} (n=1: no interval)" if n else "–")
        if authors:
            if authors.get(a) and authors.get(b):
                cols.append(_points(float(np.mean(authors[a])) - float(np.mean(authors[b]))))
            else:
                cols.append("–")
        if set(cols[:len(labels)]) != {"–"}:
            lines.append(f"| `{a}` − `{b}` | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot_budget_curves(frames: Mapping[str, Any], path: str | os.PathLike | None = None, *,
                       title: str | None = None):
    """The training of the same methods under different budgets on one axis: validation accuracy
    after each epoch against the training images seen so far (``(epoch + 1) × images_per_epoch``, log
    scale), so that a short run's curve ends where a long run's is still climbing.

    ``frames``: label -> result rows of one budget (one data set and one mask, the same in every
    frame), each with ``history`` (per-epoch dicts with ``epoch`` and ``val_accuracy``, or None) and
    ``images_per_epoch`` (:func:`labkit.studies.classification.with_history`). One colour per method,
    one line style per budget; thin lines are the seeds, the thick line their mean at the epochs every
    seed reached. Rows without a history are left out. Saves to ``path`` when given; returns the
    figure. Raises ``ValueError`` when no row has a history."""
    import matplotlib.pyplot as plt

    frames, methods = _budget_grid(frames)
    styles = ["--", "-", ":", "-."]
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    drawn = 0
    for (label, df), style in zip(frames.items(), styles):
        for i, meth in enumerate(methods):
            curves = []
            for r in df[df["method"] == meth].to_dict("records"):
                history, n = r.get("history"), r.get("images_per_epoch")
                if not history or not n:
                    continue
                seen = [(int(h["epoch"]) + 1) * int(n) for h in history]
                acc = [float(h["val_accuracy"]) for h in history]
                ax.plot(seen, acc, style, color=f"C{i}", lw=0.7, alpha=0.35, gid=f"seed|{label}|{meth}")
                curves.append(dict(zip(seen, acc)))
            if not curves:
                continue
            common = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(common, [float(np.mean([c[x] for c in curves])) for x in common], style, color=f"C{i}", lw=2,
                    gid=f"mean|{label}|{meth}", label=f"{meth}, {label} (n={len(curves)})")
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError("no training history to plot (no row's run record holds one)")
    ax.set_xscale("log")
    ax.set_xlabel("training images seen (epochs × training images per epoch, log scale)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    legend = ("thick: the mean over seeds at the epochs every seed reached; thin: the seeds; line style: the "
              "budget. Validation images are held out of the training images and pick the epoch the tables report")
    return _finish(fig, legend, title, path)
