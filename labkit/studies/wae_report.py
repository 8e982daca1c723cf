r"""The WAE study's results (:mod:`labkit.studies.wae`): where they live, their columns, and their
tables and figures.

Files: ``results_path(cfg)`` (``results/wae/<profile>`` unless ``cfg.results_dir``) holds
``metrics.csv`` (one row per cell key, :func:`result_store`), ``runs.jsonl`` (details per run),
``figures/`` and the git-ignored ``_scratch/`` (checkpoints, the feature network, example tensors,
:func:`scratch_path`). A cell's files are named by :func:`cell_stem`.

Report: the summary table beside the authors' numbers (:data:`AUTHORS_WAE_MNIST`), its Markdown
form, the metric bars and the image grids (reconstructions, prior samples, one row per front), and
:func:`write_report`, which writes them beside the results and into a document's marked block.

The tables refuse (:func:`~labkit.studies.engine.check_uniform`) to put rows made with other
settings side by side; only the front's own settings (:data:`FRONT_SETTINGS`) may differ. The
public names here are re-exported by :mod:`labkit.studies.wae`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from labkit import paths
from labkit.checkpoint import load_checkpoint
from labkit.studies import engine
from labkit.studies.configs import FRONT_ALIASES
from labkit.studies.engine import Cell, ResultStore
from labkit.studies.paired_stats import t_interval

__all__ = [
    "AUTHORS_WAE_MNIST",
    "PAIRED_METRICS",
    "WAE_PAIRS",
    "paired_markdown",
    "paired_rows",
    "COLUMN_NAMES",
    "COORDS",
    "FD_NAME",
    "FRONT_ORDER",
    "FRONT_SETTINGS",
    "METRIC_COLUMNS",
    "SKIMAGE_COLUMNS",
    "cell_stem",
    "file_stem",
    "load_examples",
    "plot_front_grid",
    "plot_metrics",
    "plot_reconstructions",
    "plot_samples",
    "read_results",
    "result_store",
    "results_path",
    "scratch_path",
    "settings_line",
    "shared_settings",
    "summary_table",
    "table_block",
    "table_markdown",
    "write_report",
]

#: the coordinates of a cell, the columns that name a row of ``metrics.csv``
COORDS = ["dataset", "front", "seed"]
METRIC_COLUMNS = ["psnr_missing", "ssim_missing", "psnr_all", "ssim_all", "fd_reconstruction", "fd_samples"]
#: whole-image PSNR/SSIM as scikit-image computes them when called like the authors did
#: (:func:`labkit.metrics.skimage_psnr_ssim`); optional: rows migrated from before they existed lack them
SKIMAGE_COLUMNS = ["psnr_all_skimage", "ssim_all_skimage"]


# --------------------------------------------------------------------------- files
def results_path(cfg) -> Path:
    """Where a config's results go: ``cfg.results_dir``, else ``results/wae/<profile>``."""
    return Path(cfg.results_dir) if cfg.results_dir else paths.results_dir("wae", cfg.profile)


def scratch_path(cfg) -> Path:
    """Git-ignored working files beside the results: checkpoints, the feature network, example tensors."""
    return results_path(cfg) / "_scratch"


def result_store(results_dir: str | Path) -> ResultStore:
    """The study's results: ``<results_dir>/metrics.csv`` (one row per cell key) and ``runs.jsonl``.

    ``results_dir`` may also be the path of ``metrics.csv`` itself.
    """
    folder = Path(results_dir)
    if folder.suffix == ".csv":
        folder = folder.parent
    return ResultStore(folder / "metrics.csv", coords=COORDS, metrics=METRIC_COLUMNS, optional=SKIMAGE_COLUMNS,
                       details=folder / "runs.jsonl")


def read_results(results_dir: str | Path):
    """The valid rows of the study's results (:meth:`ResultStore.read`) as a DataFrame."""
    return result_store(results_dir).read()


def file_stem(dataset: str, front: str, seed: int, key: str) -> str:
    """File stem of a cell's working files and figures: ``<dataset>-<front>-s<seed>-<key[:8]>``."""
    return f"{dataset}-{front}-s{int(seed)}-{key[:8]}"


def cell_stem(cell: Cell) -> str:
    """:func:`file_stem` of a planned cell."""
    c = cell.coords
    return file_stem(c["dataset"], c["front"], c["seed"], cell.key)


def _stored_examples(cfg, stem: str) -> dict[str, Tensor] | None:
    path = scratch_path(cfg) / "models" / f"{stem}.pt"
    stored = load_checkpoint(path, map_location="cpu") if path.exists() else None
    return None if stored is None else stored["examples"]


def load_examples(cell: Cell, cfg) -> dict[str, Tensor] | None:
    """The example tensors the cell's run saved (``None`` if absent): inputs ``(k, C, H, W)`` with NaN
    at missing pixels, reconstructions, targets, masks ``(k, 1, H, W)`` and prior samples."""
    return _stored_examples(cfg, cell_stem(cell))


#: display order and labels
FRONT_ORDER = ["gt", "zero", "mask", "knn", "pc", "mfa_mean", "mfa_misconv", "dmfa_mean_complete",
               "dmfa_misconv_complete", "dmfa_mean_incomplete", "dmfa_misconv_incomplete", "acflow"]
#: settings that belong to one front only (a table of fronts may hold different values of them)
FRONT_SETTINGS = ["imputer"]

#: the authors' public code, MNIST WAE, epoch 20, test split: front -> (PSNR, SSIM). Their recipe
#: (``recipe="authors"``), 60,000 training images, batch 128. Their PSNR/SSIM are scikit-image's on
#: the whole decoded image, SSIM called without ``data_range`` (for float images a range of 2,
#: which raises SSIM): compare them with ``psnr_all_skimage``/``ssim_all_skimage``.
AUTHORS_WAE_MNIST = {
    "gt": (20.72, 0.908),
    "knn": (16.00, 0.752),
    "dmfa_mean_incomplete": (15.85, 0.750),
    "dmfa_mean_complete": (15.76, 0.752),
    "dmfa_misconv_complete": (15.71, 0.744),
    "dmfa_misconv_incomplete": (15.14, 0.714),
    "zero": (14.90, 0.707),
    "acflow": (14.85, 0.711),
    "mask": (13.86, 0.627),
    "pc": (13.68, 0.628),
    "mfa_misconv": (13.33, 0.657),
    "mfa_mean": (13.20, 0.596),
}

FD_NAME = "FD (lab classifier features)"


# --------------------------------------------------------------------------- tables
def _select(df, keys=None, dataset: str | None = None):
    if keys is not None:
        df = df[df["key"].isin(list(keys))]
    if dataset is not None:
        df = df[df["dataset"] == dataset]
    return df


def shared_settings(df, keys=None, *, dataset: str | None = None) -> dict:
    """The settings every selected row shares (:func:`labkit.studies.engine.check_uniform`; raises
    :class:`~labkit.studies.engine.SettingsMismatch` naming the settings that differ)."""
    return engine.check_uniform(_select(df, keys, dataset), ignore=FRONT_SETTINGS, what="the WAE table")


def summary_table(df, keys=None, *, dataset: str | None = None, with_authors: bool = True):
    """Rows = fronts; columns = each metric as ``"mean ± std"`` over seeds, the number of seeds, and
    (MNIST) the authors' PSNR/SSIM beside scikit-image's whole-image columns.

    ``keys``: the cell keys to show (normally those of the planned cells; ``None``: every row).
    The rows must share their settings (:func:`shared_settings`). Returns a DataFrame of strings.
    """
    import pandas as pd

    df = _select(df, keys, dataset)
    if df.empty:
        return pd.DataFrame()
    shared_settings(df)
    fronts = [f for f in FRONT_ORDER if f in set(df["front"])] + sorted(set(df["front"]) - set(FRONT_ORDER))
    digits = {"psnr_missing": 2, "psnr_all": 2, "psnr_all_skimage": 2, "ssim_missing": 3, "ssim_all": 3,
              "ssim_all_skimage": 3, "fd_reconstruction": 2, "fd_samples": 2}
    columns = METRIC_COLUMNS[:4] + SKIMAGE_COLUMNS + METRIC_COLUMNS[4:]
    rows = []
    for f in fronts:
        sub = df[df["front"] == f]
        row = {"front": f, "seeds": str(len(sub))}
        for col in columns:
            v = sub[col].astype(float).dropna()
            d = digits[col]
            row[col] = ("–" if len(v) == 0 else f"{v.mean():.{d}f} ± {v.std(ddof=1):.{d}f}" if len(v) > 1
                        else f"{v.mean():.{d}f}")
            if with_authors and col == "ssim_all_skimage":
                a = AUTHORS_WAE_MNIST.get(f) if set(df["dataset"]) <= {"mnist"} else None
                row["authors PSNR"] = f"{a[0]:.2f}" if a else ""
                row["authors SSIM"] = f"{a[1]:.3f}" if a else ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("front")


COLUMN_NAMES = {"psnr_missing": "PSNR missing (dB)", "ssim_missing": "SSIM missing", "psnr_all": "PSNR all (dB)",
                "ssim_all": "SSIM all", "psnr_all_skimage": "PSNR all, scikit-image (dB)",
                "ssim_all_skimage": "SSIM all, scikit-image (data range 2)",
                "fd_reconstruction": f"{FD_NAME}: reconstructions", "fd_samples": f"{FD_NAME}: prior samples"}


def settings_line(settings: Mapping[str, Any]) -> str:
    """The shared settings of a table in one line: recipe, epochs, sizes, optimisation."""
    s = dict(settings)
    parts = [f"recipe {s.get('recipe', '?')}", f"{s.get('epochs', '?')} epoch(s)",
             f"{s.get('n_train', '?')} training / {s.get('n_test', '?')} test images", f"batch {s.get('batch_size', '?')}",
             f"lr {s.get('lr', '?')}" + (f", discriminator lr {s['lr_disc']}" if "lr_disc" in s else ""),
             f"λ {s.get('lambda_adv', '?')}, discriminator loss weight {s.get('disc_weight', '?')}",
             f"{str(s.get('recon', '?')).upper()} reconstruction", f"precision {s.get('precision', '?')}"]
    return "; ".join(parts)


def table_markdown(df, keys=None, **kw) -> str:
    """:func:`summary_table` as a Markdown table with its shared settings (recipe, epochs, ...)
    below it (for the README)."""
    tab = summary_table(df, keys, **kw)
    if tab.empty:
        return "(no results yet)"
    cols = list(tab.columns)
    lines = ["| front | " + " | ".join(COLUMN_NAMES.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for f, row in tab.iterrows():
        lines.append(f"| {f} | " + " | ".join(row[c] for c in cols) + " |")
    lines.append("")
    lines.append(f"Settings: {settings_line(shared_settings(df, keys, dataset=kw.get('dataset')))}. "
                 "scikit-image's SSIM of float images assumes a data range of 2 (the authors called it without "
                 "`data_range`), which raises it; the authors' numbers are of that kind.")
    return "\n".join(lines)


def plot_metrics(df, path=None, *, title: str | None = None, keys=None):
    """Three panels per front: PSNR, SSIM (missing region / whole image) and the two Fréchet
    distances; bars = mean over seeds, dots = seeds, black ticks = the authors' scikit-image PSNR/SSIM
    (MNIST, whole image). ``keys``: the cells shown (default: every row; they must share their
    settings). Saves to ``path`` when given; returns the figure."""
    import matplotlib.pyplot as plt

    df = _select(df, keys)
    shared_settings(df)
    fronts = [f for f in FRONT_ORDER if f in set(df["front"])] + sorted(set(df["front"]) - set(FRONT_ORDER))
    panels = [("PSNR (dB)", ("psnr_missing", "psnr_all"), 0), ("SSIM", ("ssim_missing", "ssim_all"), 1),
              (FD_NAME, ("fd_reconstruction", "fd_samples"), None)]
    labels = {"psnr_missing": "missing region", "psnr_all": "whole image", "ssim_missing": "missing region",
              "ssim_all": "whole image", "fd_reconstruction": "reconstructions", "fd_samples": "prior samples"}
    fig, axes = plt.subplots(1, 3, figsize=(4.0 * 3, 4.4))
    x = np.arange(len(fronts))
    mnist_only = set(df["dataset"]) <= {"mnist"}
    for ax, (name, cols, authors_idx) in zip(axes, panels):
        for k, col in enumerate(cols):
            vals = [df[df["front"] == f][col].astype(float).to_numpy() for f in fronts]
            pos = x + (k - 0.5) * 0.38
            ax.bar(pos, [v.mean() if len(v) else np.nan for v in vals], width=0.36, alpha=0.75,
                   color=f"C{k}", label=labels[col])
            for p, v in zip(pos, vals):
                ax.plot(np.full(len(v), p), v, "k.", ms=3)
        if authors_idx is not None and mnist_only:
            label = "authors (scikit-image, whole image)"
            for i, f in enumerate(fronts):
                a = AUTHORS_WAE_MNIST.get(f)
                if a is not None:   # beside the whole-image bar
                    ax.plot([i + 0.01, i + 0.37], [a[authors_idx]] * 2, "k-", lw=2, label=label)
                    label = None
        ax.set_xticks(x)
        ax.set_xticklabels(fronts, rotation=60, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        # headroom above the tallest bar or marker, so the legend never hides one
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
        ax.legend(fontsize=7, loc="upper right", framealpha=1.0)
    return _finish_figure(fig, title, path, dpi=110)


# --------------------------------------------------------------------------- figures
def _to_rgb(img: Tensor, missing: Tensor | None = None) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> ``(H, W, 3)`` numpy; missing pixels shown in a muted red."""
    x = img.detach().float().cpu()
    if x.shape[0] == 1:
        x = x.expand(3, *x.shape[1:])
    x = torch.nan_to_num(x, nan=0.0).clamp(0, 1)
    if missing is not None:
        m = missing.detach().cpu().expand_as(x)
        red = torch.tensor([0.75, 0.25, 0.25]).view(3, 1, 1).expand_as(x)
        x = torch.where(m, red, x)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def plot_reconstructions(examples: Mapping[str, Tensor], *, title: str | None = None, path=None):
    """Three rows: incomplete input (missing pixels red), reconstruction, ground truth. Returns the figure."""
    import matplotlib.pyplot as plt

    k = examples["target"].shape[0]
    fig, axes = plt.subplots(3, k, figsize=(1.1 * k + 1.4, 3.6), squeeze=False)
    rows = [("input", lambda i: _to_rgb(examples["input"][i], examples["missing"][i])),
            ("reconstruction", lambda i: _to_rgb(examples["reconstruction"][i])),
            ("ground truth", lambda i: _to_rgb(examples["target"][i]))]
    _image_rows(axes, [(label, [get(i) for i in range(k)]) for label, get in rows], fontsize=9)
    return _finish_figure(fig, title, path)


def _image_rows(axes, rows, *, fontsize: int) -> None:
    """Fill a grid of axes: ``rows`` = [(label, [RGB arrays, one per column])], label on the left."""
    for r, (label, images) in enumerate(rows):
        for i, img in enumerate(images):
            axes[r][i].imshow(img, interpolation="nearest")
            axes[r][i].set_xticks([]), axes[r][i].set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=fontsize)


def _finish_figure(fig, title: str | None, path, dpi: int = 100):
    """Title, tight layout and (when ``path`` is given) a PNG; returns the figure."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def plot_samples(samples: Tensor, *, ncols: int = 8, title: str | None = None, path=None):
    """A grid of decoded prior samples ``(n, C, H, W)``. Returns the figure."""
    import matplotlib.pyplot as plt

    n = samples.shape[0]
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.0 * ncols, 1.0 * nrows + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            ax.imshow(_to_rgb(samples[i]), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.axis("off")
    return _finish_figure(fig, title, path)


def plot_front_grid(examples_by_front: Mapping[str, Mapping[str, Tensor]], *, what: str = "reconstruction",
                    title: str | None = None, path=None):
    """One row per front (``what`` = "reconstruction" or "samples"), with the incomplete inputs and
    the ground truth as the first and last rows for reconstructions. Returns the figure."""
    import matplotlib.pyplot as plt

    if not examples_by_front:
        raise ValueError("examples_by_front is empty")
    fronts = list(examples_by_front)
    any_ex = examples_by_front[fronts[0]]
    if what == "reconstruction":
        rows = [("input", any_ex["input"], any_ex["missing"])]
        rows += [(f, examples_by_front[f]["reconstruction"], None) for f in fronts]
        rows += [("ground truth", any_ex["target"], None)]
    elif what == "samples":
        rows = [(f, examples_by_front[f]["samples"], None) for f in fronts]
    else:
        raise ValueError(f"what must be 'reconstruction' or 'samples', got {what!r}")
    k = min(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.0 * k + 2.2, 1.05 * len(rows) + 0.4), squeeze=False)
    _image_rows(axes, [(label, [_to_rgb(imgs[i], None if miss is None else miss[i]) for i in range(k)])
                       for label, imgs, miss in rows], fontsize=8)
    return _finish_figure(fig, title, path)


# --------------------------------------------------------------------------- the report of a run
def table_block(cfg, rows, marker: str | None = None) -> str:
    """The table of ``rows`` (:func:`table_markdown`) with a line saying how many of the config's
    planned runs it holds and where it came from, between ``<!-- wae-table:<marker> -->`` and
    ``<!-- /wae-table:<marker> -->`` (``marker``: default the profile's name)."""
    marker = marker or cfg.profile
    table = table_markdown(rows)
    info = ""
    if len(rows):
        seeds = sorted({int(s) for s in rows["seed"]})
        planned = len(cfg.fronts) * len(cfg.seeds)
        csv = results_path(cfg) / "metrics.csv"
        root = paths.repo_root()
        shown = csv.relative_to(root) if csv.is_relative_to(root) else csv
        info = (f"\n\n_{len(rows)} of {planned} planned runs; seeds {seeds}; generated from `{shown}` by "
                f"`./lab study wae --profile {cfg.profile}`._")
    return f"<!-- wae-table:{marker} -->\n{table}{info}\n<!-- /wae-table:{marker} -->"


def _replace_block(path: Path, block: str, marker: str, *, name: str = "wae-table") -> None:
    """Put ``block`` in place of the file's marked block ``<!-- <name>:<marker> -->`` ...
    ``<!-- /<name>:<marker> -->``; a new or empty file becomes the block."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(rf"<!-- {name}:{re.escape(marker)} -->.*?<!-- /{name}:{re.escape(marker)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    elif not text.strip():
        text = block + "\n"
    else:
        raise ValueError(f"{path} lacks the markers <!-- {name}:{marker} --> ... <!-- /{name}:{marker} -->")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


#: the WAE comparisons stated as paired differences (front − other front, per seed)
WAE_PAIRS = [("dmfa_misconv_incomplete", "dmfa_mean_incomplete"), ("dmfa_misconv_complete", "dmfa_mean_complete"),
             ("dmfa_misconv_incomplete", "zero"), ("dmfa_mean_incomplete", "zero"),
             ("dmfa_misconv_complete", "zero"), ("dmfa_mean_complete", "zero"), ("zero", "pc")]
#: the metrics they are stated in (higher is better for PSNR/SSIM, lower for the Fréchet distances)
PAIRED_METRICS = ["psnr_missing", "ssim_missing", "psnr_all", "ssim_all", "fd_reconstruction", "fd_samples"]


def paired_rows(rows, pairs=WAE_PAIRS, metrics=PAIRED_METRICS) -> list[dict]:
    """Per pair of fronts present in ``rows`` and per metric: the per-seed differences (front − other,
    over the seeds both have) and their mean with a 95 % t interval over the seeds and the t-test's
    p (:func:`labkit.studies.paired_stats.t_interval`). One dict per (pair, metric)."""
    out = []
    if not len(rows):
        return out
    by = {(r.front, int(r.seed)): r for r in rows.itertuples()}
    for a, b in pairs:
        seeds = sorted(s for (f, s) in by if f == a and (b, s) in by)
        if not seeds:
            continue
        for metric in metrics:
            diffs = [float(getattr(by[(a, s)], metric)) - float(getattr(by[(b, s)], metric)) for s in seeds]
            t = t_interval(diffs)
            out.append({"front": a, "other": b, "metric": metric, "seeds": seeds, "differences": diffs, **t})
    return out


def paired_markdown(rows, pairs=WAE_PAIRS, metrics=PAIRED_METRICS) -> str:
    """:func:`paired_rows` as a Markdown table: per seed, mean ± 95 % CI half-width, p and a verdict
    ("no difference resolved" where the interval covers 0)."""
    lines = ["| front − other front | metric | seeds | per seed | mean ± 95 % CI over seeds (t) | p (t-test) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in paired_rows(rows, pairs, metrics):
        digits = 3 if r["metric"].startswith("ssim") else 2
        per = ", ".join(f"{d:+.{digits}f}" for d in r["differences"])
        if r["n"] < 2:
            interval, p, verdict = f"{r['mean']:+.{digits}f}", "–", "one seed: no interval"
        else:
            interval = f"{r['mean']:+.{digits}f} ± {r['half_width']:.{digits}f}"
            p = f"{r['p']:.3f}"
            verdict = "no difference resolved" if r["low"] <= 0 <= r["high"] else "resolved"
        lines.append(f"| `{r['front']}` − `{r['other']}` | {COLUMN_NAMES.get(r['metric'], r['metric'])} | "
                     f"{r['n']} | {per} | {interval} | {p} | {verdict} |")
    return "\n".join(lines)


def write_report(cfg, rows, *, doc: str | Path | None = None, marker: str | None = None) -> list[Path]:
    """The tables and figures of ``rows`` (the rows of a config's planned cells), beside its results.

    Writes under :func:`results_path`: ``table.md`` (the table with its settings and a line on how
    many planned runs it holds, :func:`table_block`), ``figures/<dataset>-metrics.png``
    (:func:`plot_metrics`) and, from the example tensors the cells saved, the reconstructions and
    the prior samples of every finished front of the first seed side by side
    (``figures/<dataset>-fronts-s<seed>-reconstruction.png`` and ``...-samples.png``). With ``doc``
    (a Markdown file) the block between ``<!-- wae-table:<marker> -->`` and its closing marker is
    replaced by the table (``marker``: default the profile's name; a file without the markers is
    only written when it is new or empty, else ``ValueError``). Returns the files written.
    """
    import matplotlib.pyplot as plt

    # the configs name the fronts as the user wrote them (aliases); rows carry the method names

    marker = marker or cfg.profile
    folder = results_path(cfg)
    written = []
    block = table_block(cfg, rows, marker)
    _write_text(folder / "table.md", block + "\n")
    written.append(folder / "table.md")
    paired = paired_markdown(rows)
    _write_text(folder / "paired.md", f"Paired differences between fronts (front − other front, per seed), "
                                      f"profile `{cfg.profile}`\n\n{paired}\n")
    written.append(folder / "paired.md")
    if doc is not None:
        _replace_block(Path(doc), block, marker)
        text = Path(doc).read_text(encoding="utf-8")
        if f"<!-- wae-paired:{marker} -->" in text:       # the paired block, where the page has one
            _replace_block(Path(doc), f"<!-- wae-paired:{marker} -->\n{paired}\n<!-- /wae-paired:{marker} -->",
                           marker, name="wae-paired")
        written.append(Path(doc))
    rows = rows[rows["dataset"] == cfg.dataset] if len(rows) else rows
    figs = folder / "figures"
    dataset = cfg.dataset
    if len(rows):
        path = figs / f"{dataset}-metrics.png"
        plt.close(plot_metrics(rows, path, title=f"WAE on incomplete {dataset} ({cfg.profile} profile, recipe "
                                                  f"{cfg.recipe})"))
        written.append(path)
        order = {FRONT_ALIASES.get(f, f): i for i, f in enumerate(cfg.fronts)}
        shown = min(int(s) for s in cfg.seeds)
        first = rows[rows["seed"].astype(int) == shown]
        first = first.iloc[sorted(range(len(first)), key=lambda i: order.get(first["front"].iloc[i], len(order)))]
        examples = {r.front: _stored_examples(cfg, file_stem(r.dataset, r.front, r.seed, r.key))
                    for r in first.itertuples()}
        examples = {f: e for f, e in examples.items() if e is not None}
        if examples:
            for what, words in (("reconstruction", "reconstructions"), ("samples", "decoded prior samples")):
                path = figs / f"{dataset}-fronts-s{shown}-{what}.png"
                plt.close(plot_front_grid(examples, what=what, title=f"{dataset}, seed {shown}: {words}", path=path))
                written.append(path)
    return written


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
