r"""The timing study's tables and figures: the paper's Table 2, ratios, summaries, box plots.

Every function reads the long rows of :mod:`labkit.studies.timing_measure` (one row per call).
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from labkit.studies.store import write_files

__all__ = [
    "PAPER_TABLE2",
    "boxplots",
    "components_figure",
    "format_table",
    "markdown_ratios",
    "paper_table",
    "per_image_table",
    "ratio_table",
    "report_tables",
    "summarize",
    "summary_lines",
]

#: Supplementary Table 2: seconds per forward pass (mean ± std over 5000), GPU.
PAPER_TABLE2 = [
    # size, hole, batch, conv mean, conv std, misconv mean, misconv std
    (28, 14, 16, 0.00016, 0.00006, 0.00092, 0.00030),
    (28, 14, 32, 0.00017, 0.00006, 0.00097, 0.00041),
    (28, 14, 64, 0.00020, 0.00008, 0.00138, 0.00061),
    (32, 16, 16, 0.00022, 0.00012, 0.00109, 0.00039),
    (32, 16, 32, 0.00037, 0.00020, 0.00111, 0.00046),
    (32, 16, 64, 0.00034, 0.00016, 0.00121, 0.00047),
    (64, 32, 16, 0.00034, 0.00017, 0.00091, 0.00025),
    (64, 32, 32, 0.00031, 0.00012, 0.00115, 0.00037),
    (64, 32, 64, 0.00029, 0.00008, 0.00109, 0.00029),
]

_KEYS = ["study", "size", "channels", "batch", "K", "L", "hole"]


def summarize(df):
    """Per setting and layer: n, mean, std, median, quartiles, min (seconds)."""
    keys = [k for k in _KEYS + ["dataset", "group"] if k in df.columns] + ["layer"]
    g = df.groupby(keys, sort=False)["seconds"]
    out = g.agg(n="count", mean="mean", std="std", median="median", q25=lambda s: s.quantile(0.25),
                q75=lambda s: s.quantile(0.75), min="min").reset_index()
    return out


def paper_table():
    """:data:`PAPER_TABLE2` as a DataFrame with the ratio MisConv / conv of the means."""
    df = pd.DataFrame(PAPER_TABLE2, columns=["size", "hole", "batch", "paper_conv_mean", "paper_conv_std",
                                             "paper_misconv_mean", "paper_misconv_std"])
    df["paper_ratio"] = df.paper_misconv_mean / df.paper_conv_mean
    return df


def ratio_table(df, *, misconv: str = "misconv"):
    """One row per setting: conv and MisConv (``misconv`` layer) mean ± std and median, the
    ratio of medians and the median of per-round ratios, the floor ``(L+2)·K``, the target
    ``1.25·(L+2)·K`` and, where the setting is the paper's, the paper's figures and ratio.

    Ratios compare the two layers of the same interleaved group.
    """
    keys = [k for k in _KEYS if k in df.columns]
    group = "eager" if misconv == "misconv_eager" else "fast"
    sub = df[(df.layer.isin(["conv", misconv])) & ((df.group == group) if "group" in df.columns else True)]
    rows = []
    for key, d in sub.groupby(keys, sort=False):
        setting = dict(zip(keys, key))
        c = d[d.layer == "conv"].set_index("round").seconds
        m = d[d.layer == misconv].set_index("round").seconds
        if c.empty or m.empty:
            continue
        both = c.index.intersection(m.index)
        per_round = (m[both] / c[both]).median() if len(both) else math.nan
        floor = (setting.get("L", 4) + 2) * setting.get("K", 1)
        rows.append({**setting, "conv_mean": c.mean(), "conv_std": c.std(), "conv_median": c.median(),
                     "misconv_mean": m.mean(), "misconv_std": m.std(), "misconv_median": m.median(),
                     "ratio": m.median() / c.median(), "ratio_per_round": per_round,
                     "floor": floor, "target": 1.25 * floor})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    paper = paper_table()
    merged = out.merge(paper.drop(columns=["hole"]), on=["size", "batch"], how="left")
    standard = (merged.K == 1) & (merged.L == 4) & (merged.hole == merged["size"] // 2)
    for col in paper.columns.drop(["size", "hole", "batch"]):
        merged.loc[~standard, col] = math.nan
    return merged


def format_table(table, *, unit: str = "ms") -> str:
    """A text table of :func:`ratio_table` (times in ms, ratios), the paper's columns beside ours."""
    scale = {"ms": 1e3, "s": 1.0, "us": 1e6}[unit]
    head = (f"{'I':>3} {'C':>2} {'B':>3} {'K':>2} {'L':>3} | {'conv ' + unit:>17} | {'MisConv ' + unit:>17} | "
            f"{'ratio':>6} {'target':>6} | {'paper conv ms':>15} {'paper MisConv ms':>16} {'paper ratio':>11}")
    lines = [head, "-" * len(head)]
    for r in table.itertuples():
        paper = (f"{r.paper_conv_mean * 1e3:7.2f}±{r.paper_conv_std * 1e3:5.2f}  {r.paper_misconv_mean * 1e3:8.2f}±"
                 f"{r.paper_misconv_std * 1e3:5.2f}  {r.paper_ratio:11.2f}") if not math.isnan(getattr(r, "paper_ratio", math.nan)) else ""
        lines.append(f"{r.size:>3} {r.channels:>2} {r.batch:>3} {r.K:>2} {r.L:>3} | "
                     f"{r.conv_mean * scale:8.3f}±{r.conv_std * scale:7.3f} | {r.misconv_mean * scale:8.3f}±{r.misconv_std * scale:7.3f} | "
                     f"{r.ratio:6.2f} {r.target:6.2f} | {paper}")
    lines.append("(mean ± std per call; ratio = median MisConv / median conv over interleaved rounds; "
                 "target = 1.25·(L+2)·K)")
    return "\n".join(lines)


def markdown_ratios(df) -> str:
    """A markdown table of a measured grid (the rows of :func:`forward_grid` / :func:`backward_grid`,
    as written to ``forward.csv`` or ``timings.csv``): per setting, the medians in ms of conv2d+ReLU
    and of MisConv's fast and eager paths, their ratios to conv2d+ReLU, forward + backward's ratio
    when measured, and the paper's ratio."""
    fwd = df[df.study == "forward"] if "study" in df.columns else df
    fast = ratio_table(fwd).set_index(["size", "channels", "batch", "K", "L"])
    eager = (ratio_table(fwd, misconv="misconv_eager").set_index(fast.index.names)
             if "misconv_eager" in set(fwd.layer) else None)
    bwd = (ratio_table(df[df.study == "backward"]).set_index(fast.index.names)
           if "study" in df.columns and (df.study == "backward").any() else None)

    def cell(table, key, col, scale=1.0, fmt=".2f"):
        return format(table.loc[key, col] * scale, fmt) if table is not None and key in table.index else "–"

    lines = ["| I | C | B | conv2d+ReLU | MisConv fast | MisConv eager | fast / conv | eager / conv | "
             "fwd+bwd fast / conv | paper (GPU) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in fast.iterrows():
        paper = "–" if math.isnan(r.paper_ratio) else f"{r.paper_ratio:.2f}"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r.conv_median * 1e3:.3f} | {r.misconv_median * 1e3:.3f} | "
                     f"{cell(eager, key, 'misconv_median', 1e3, '.3f')} | **{r.ratio:.2f}** | {cell(eager, key, 'ratio')} | "
                     f"{cell(bwd, key, 'ratio')} | {paper} |")
    return "\n".join(lines)


def boxplots(df, path: str | os.PathLike | None = None, *, layers: Sequence[str] = ("conv", "misconv"), title: str | None = None):
    """Figure-2-style box plots: seconds per forward pass by batch size, one panel per image size,
    one box per layer (log scale). Saved to ``path`` when given; returns the seaborn FacetGrid."""
    import matplotlib

    matplotlib.use("Agg") if "matplotlib.pyplot" not in sys.modules else None
    import seaborn as sns

    d = df[df.layer.isin(layers)].copy()
    d["milliseconds"] = d.seconds * 1e3
    grid = sns.catplot(data=d, x="batch", y="milliseconds", hue="layer", col="size", kind="box", sharey=False,
                       height=3.2, aspect=0.9, fliersize=1.5, log_scale=True)
    grid.set_axis_labels("batch size", "ms per forward pass")
    if title:
        grid.figure.suptitle(title, y=1.03)
    if path is not None:
        kind = Path(path).suffix.lstrip(".") or "png"
        write_files({Path(path): lambda tmp: grid.figure.savefig(tmp, format=kind, dpi=120, bbox_inches="tight")})
    return grid




def report_tables(results: dict) -> dict:
    """The tables of a timing run, by the stem of the CSV each goes to: ``forward_summary``,
    ``forward_ratios`` and, where measured, ``forward_ratios_eager``, ``backward_ratios``,
    ``components_ratios``, ``end_to_end_summary``. ``results``: the rows by grid
    (``forward``, ``backward``, ``components``, ``end_to_end``), as the study's ``run`` returns them."""
    forward = results["forward"]
    tables = {"forward_summary": summarize(forward), "forward_ratios": ratio_table(forward)}
    if "misconv_eager" in set(forward.layer):
        tables["forward_ratios_eager"] = ratio_table(forward, misconv="misconv_eager")
    if results.get("backward") is not None:
        tables["backward_ratios"] = ratio_table(results["backward"])
    if results.get("components") is not None:
        tables["components_ratios"] = ratio_table(results["components"])
    if results.get("end_to_end") is not None:
        tables["end_to_end_summary"] = per_image_table(results["end_to_end"])
    return tables


def per_image_table(e2e):
    """Milliseconds per image (medians) of an :func:`~labkit.studies.timing_measure.end_to_end` run,
    one row per data set, one column per layer, plus ``method / classifier`` (what the whole
    method costs against the classifier on complete images) and ``DMFA share of the method``."""
    per_image = e2e.groupby(["dataset", "layer"], sort=False).per_image.median().unstack("layer") * 1e3
    per_image["method / classifier"] = per_image["dmfa+misconv_classifier"] / per_image["classifier"]
    per_image["DMFA share of the method"] = per_image["dmfa"] / per_image["dmfa+misconv_classifier"]
    return per_image


def components_figure(comp_table, *, size: int, batch: int):
    """The K / L sweep: MisConv's time over conv2d+ReLU's against L, one line per K, with the
    convolution count ``(L+2)·K`` dotted beside it. ``comp_table``: :func:`ratio_table` of a
    component sweep. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for K, d in comp_table.groupby("K"):
        ax.plot(d.L, d.ratio, "o-", label=f"MisConv, K={K}")
        ax.plot(d.L, d.floor, ":", color=ax.lines[-1].get_color(), label=f"(L+2)·K, K={K}")
    ax.set_xlabel("factors L")
    ax.set_ylabel("time / conv2d+ReLU")
    ax.set_title(f"I={size}, B={batch}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def summary_lines(tables: dict, compile_seconds: dict, *, clock: str) -> list[str]:
    """The study's findings as Markdown bullet lines.

    ``tables``: the report's tables by name (``forward_ratios``, and where measured
    ``forward_ratios_eager``, ``backward_ratios``, ``end_to_end_summary``); ``compile_seconds``:
    :func:`labkit.misconv.compile_report` (first-call compile time per fused kernel, None: failed);
    ``clock``: the clock of the measurements (``cpu`` or ``wall``).
    """
    table = tables["forward_ratios"]
    worst = table.loc[table.ratio.idxmax()]
    lines = [
        f"- Forward, fast path: MisConv / conv2d+ReLU from {table.ratio.min():.2f}× to {table.ratio.max():.2f}× "
        f"({clock} time; worst at I={int(worst['size'])}, B={int(worst['batch'])}); target 1.25·(L+2)·K = "
        f"{table.target.iloc[0]:.1f}×: {'met' if (table.ratio <= table.target).all() else 'NOT met'} in every cell.",
    ]
    paper = table.dropna(subset=["paper_ratio"])
    if len(paper):
        below = int((paper.ratio <= paper.paper_ratio).sum())
        lines.append(f"- At or below the paper's GPU ratio in {below} of {len(paper)} cells "
                     f"(paper: {paper.paper_ratio.min():.2f}× to {paper.paper_ratio.max():.2f}×).")
    eager = tables.get("forward_ratios_eager")
    if eager is not None:
        lines.append(f"- Eager path: {eager.ratio.min():.1f}× to {eager.ratio.max():.1f}× conv2d+ReLU.")
    bwd = tables.get("backward_ratios")
    if bwd is not None:
        lines.append(f"- Forward + backward: {bwd.ratio.min():.2f}× to {bwd.ratio.max():.2f}×.")
    per_image = tables.get("end_to_end_summary")
    if per_image is not None:
        for name, r in per_image.iterrows():
            lines.append(f"- End to end ({name}): {r['dmfa+misconv_classifier']:.3f} ms per image against "
                         f"{r['classifier']:.3f} ms for the classifier on complete images "
                         f"({r['method / classifier']:.1f}×; the DMFA is {100 * r['DMFA share of the method']:.0f}% "
                         "of it).")
    if compile_seconds:      # none when the tables are redone from rows on disk (nothing compiled here)
        lines.append("- First-call compile time per fused kernel (s): "
                     + ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} failed" for k, v in compile_seconds.items()))
    return lines
