"""How good is each imputer of the classification study? (the diagnostics behind the docs' findings)

    ./lab study classification --profile cpu --diagnostics --threads 1 --doc docs/classification.md

:func:`diagnostics` takes, for the config's data set and every mask kind of its grid, the first
``n`` *test* images of the (mask, first seed) cell and every imputing method of ``methods``
(default :data:`DEFAULT_METHODS`: k-NN, classical MFA, both DMFAs, ACFlow), with exactly the
imputers the sweep uses (same settings, same caches), and measures (:func:`imputation_quality`):
``sse`` = mean squared error summed over an image's missing pixels, and for the MFA-based methods
``nll`` (nats, of the true missing pixels) and ``pred_std`` (mean predicted standard deviation
there) beside ``rmse`` (the actual per-pixel error). Nothing is tuned on these numbers.

Files, beside the study's results (:func:`labkit.studies.classification_tables.results_path`):
``imputation_quality.csv`` (one row per mask × method), ``mask_coverage.csv`` (how much of the
digits each mask kind hides on the same images, :func:`labkit.masks.ink_hidden`),
``misconv_vs_mean_fill.csv`` (how much the MisConv front's output differs from conv+ReLU of the
mean-filled image, :func:`misconv_vs_mean_fill`) and ``imputation_quality.json`` (the run: command,
machine, seconds). The masks computed now replace their rows in each table; the other masks' rows
stay (:func:`write_results`). Methods whose checkpoint is missing are skipped.

The files are written as one set (:func:`labkit.studies.engine.write_files`: temporary files renamed
into place; killed at any instant, the folder keeps the old set or holds the new one). The rows kept
from an earlier run come from its files read whole (:func:`labkit.checkpoint.read_whole_csv`): a
file cut short or malformed stops the run, before anything is computed, with a
:class:`labkit.checkpoint.TableFileError` naming it, instead of losing the masks it held.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from labkit.checkpoint import read_whole_csv
from labkit.machine import machine_summary
from labkit.masks import ink_hidden, with_nan
from labkit.models.fronts import make_front
from labkit.studies.cells import CellData, load_cell_data
from labkit.studies.classification_tables import MASK_ORDER, results_path
from labkit.studies.configs import ClassificationConfig
from labkit.studies.engine import write_files
from labkit.studies.imputers import METHODS, imputer_settings, method_available
from labkit.studies.reporting import replace_marked_block

__all__ = ["DEFAULT_METHODS", "MARKER", "MERGED", "NAMES", "check_readable", "diagnostics", "imputation_quality",
           "markdown", "misconv_vs_mean_fill", "write_results"]

#: the tables whose rows of other masks each run keeps
MERGED = ("imputation_quality.csv", "mask_coverage.csv", "misconv_vs_mean_fill.csv")
#: imputer -> the method whose preparer yields it (the MisConv methods carry the MFA, hence NLL/std)
DEFAULT_METHODS = ("knn", "mfa_misconv", "dmfa_misconv_complete", "dmfa_misconv_incomplete", "acflow")
#: the marked block of a Markdown file that holds the table
MARKER = "imputation-quality"
#: how the table names the imputers
NAMES = {"knn": "k-NN", "mfa_misconv": "classical MFA (K = 4, L = 4)", "dmfa_misconv_complete": "DMFA, complete data",
         "dmfa_misconv_incomplete": "DMFA, incomplete data of the same kind", "acflow": "ACFlow (mean of 4 samples)"}
#: images of the MisConv-against-mean-fill comparison (at most)
EFFECT_IMAGES = 500


def diagnostics(cfg: ClassificationConfig, *, seed: int | None = None, n: int = 1000,
                methods: Sequence[str] = DEFAULT_METHODS, doc: str | os.PathLike | None = None,
                table_only: bool = False, progress: bool = True) -> list[Path]:
    """Measure the imputers of ``methods`` on every mask of ``cfg.masks`` (module docstring) and write
    the tables beside the results; with ``doc`` (a Markdown file), also its ``imputation-quality`` block.

    Args:
        cfg: the study's config (its data set, masks, sizes, imputer settings and results folder).
        seed: the cell seed whose masks and images are used (default: ``cfg.seeds[0]``).
        n: the first ``n`` test images of each cell.
        methods: the imputing methods measured; those whose checkpoint is missing are skipped.
        table_only: compute nothing: print the recorded ``imputation_quality.csv`` and put it into ``doc``.
        progress: the imputers' progress bars.

    Returns the files written. Raises :class:`labkit.checkpoint.TableFileError` (before anything is
    computed) when a recorded table is cut short or malformed.
    """
    out = results_path(cfg)
    if table_only:
        table = read_whole_csv(out / "imputation_quality.csv", required=("dataset", "mask", "method"))
        print(table.round(3).to_string(index=False))
        if doc:
            replace_marked_block(doc, MARKER, markdown(table))
            return [Path(doc)]
        return []
    check_readable(out)          # the rows to keep must be readable before anything is computed
    seed = int(cfg.seeds[0] if seed is None else seed)
    icfg = imputer_settings(cfg, progress=progress)
    dataset = cfg.dataset
    frames, coverage, variance_effect = [], [], []
    started = time.time()
    for mask in cfg.masks:
        ready = [m for m in methods if method_available(m, icfg, dataset, mask, seed) is None]
        skipped = sorted(set(methods) - set(ready))
        if skipped:
            print(f"[diagnostics] {dataset}/{mask}: skipping {skipped} (checkpoint missing)", flush=True)
        df = imputation_quality(dataset, mask, seed, ready, cfg, n=n, progress=progress).reset_index()
        data = load_cell_data(dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test,
                              val_fraction=cfg.val_fraction, quiet=not progress)
        k = min(n, len(data.test_images))
        if method_available("dmfa_misconv_complete", icfg, dataset, mask, seed) is None:
            variance_effect.append({"dataset": dataset, "mask": mask, "seed": seed,
                                    "n_test_images": min(k, EFFECT_IMAGES),
                                    **misconv_vs_mean_fill(data, cfg, min(k, EFFECT_IMAGES), progress=progress)})
        coverage.append({"dataset": dataset, "mask": mask, "seed": seed, "n_test_images": k,
                         **ink_hidden(data.test_images[:k], data.test_missing[:k])})
        if "nll" in df:
            df["rmse"] = (df["sse"] / df["missing_pixels"]) ** 0.5
        df.insert(0, "mask", mask)
        df.insert(0, "dataset", dataset)
        df["seed"], df["n_test_images"] = seed, k          # k: fewer than n where the cell has fewer
        frames.append(df)
        print(f"[diagnostics] {dataset}/{mask} done ({time.time() - started:.0f} s)", flush=True)
    table = pd.concat(frames, ignore_index=True)
    run = {"command": " ".join(sys.argv), "profile": cfg.profile, "machine": machine_summary(),
           "seconds": round(time.time() - started, 1)}
    table, coverage_df, effect = write_results(out, table, pd.DataFrame(coverage), pd.DataFrame(variance_effect), run)
    written = [out / name for name in MERGED if effect is not None or name != "misconv_vs_mean_fill.csv"]
    written.append(out / "imputation_quality.json")
    if effect is not None:
        print(effect.round(3).to_string(index=False))
    print(coverage_df.round(3).to_string(index=False))
    print(table.round(3).to_string(index=False))
    if doc:
        replace_marked_block(doc, MARKER, markdown(table))
        written.append(Path(doc))
    return written


def check_readable(out: str | os.PathLike) -> None:
    """Read every table of :data:`MERGED` that exists in ``out`` whole; raises
    :class:`labkit.checkpoint.TableFileError` naming the first one that is cut short or malformed."""
    for name in MERGED:
        if (Path(out) / name).exists():
            read_whole_csv(Path(out) / name, required=("dataset", "mask"))


def write_results(out: str | os.PathLike, table: pd.DataFrame, coverage: pd.DataFrame,
                  variance_effect: pd.DataFrame, run: dict):
    """Merge this run's rows into the tables of ``out`` and write them, with ``run`` as
    ``imputation_quality.json``, as one set (:func:`labkit.studies.engine.write_files`).

    The (dataset, mask) pairs of ``table`` replace their old rows in every table; the other masks'
    rows stay (a damaged file is refused before anything is written: :func:`_merged`).
    ``variance_effect`` may be empty (no complete-data DMFA): ``misconv_vs_mean_fill.csv`` is then
    left as it is. Returns the merged ``(table, coverage, variance effect or None)``.
    """
    out = Path(out)
    done = set(zip(table["dataset"], table["mask"]))
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


def _merged(path: Path, new: pd.DataFrame, done: set) -> pd.DataFrame:
    """``new`` after the rows of ``path`` (if it exists) whose (dataset, mask) is not in ``done``,
    ordered by the masks' table order. ``path`` is read whole: a file cut short or malformed raises
    :class:`labkit.checkpoint.TableFileError` naming it (its masks would otherwise be lost)."""
    if path.exists():
        old = read_whole_csv(path, required=("dataset", "mask"))
        keep = [(d, m) not in done for d, m in zip(old["dataset"], old["mask"])]
        new = pd.concat([old[keep], new], ignore_index=True)
    order = {m: i for i, m in enumerate(MASK_ORDER)}
    new = new.sort_values("mask", key=lambda c: c.map(lambda m: order.get(m, 99)), kind="stable")
    return new.reset_index(drop=True)


def imputation_quality(dataset: str, mask: str, seed: int, methods: Sequence[str], cfg: ClassificationConfig, *,
                       n: int = 1000, progress: bool = True) -> pd.DataFrame:
    """How good each method's imputer is on the first ``n`` *test* images of a cell (diagnostics only;
    never used to choose anything): per image, the sum of squared errors of the imputation at the
    missing pixels (``sse``), and for MFA-based methods the negative log-likelihood of the true missing
    pixels under the per-image MFA (``nll``, nats) and the mean predicted standard deviation there
    (``pred_std``). Uses the same (cached) preparers, with ``cfg``'s settings, as the sweep. Methods
    that cannot run (no checkpoint) are left out. Returns one row per method (index ``method``).
    """
    icfg = imputer_settings(cfg, progress=progress)
    data = load_cell_data(dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test,
                          val_fraction=cfg.val_fraction)
    idx = torch.arange(min(n, len(data.test_images)))
    x_true = data.test_images[idx]                   # (n, C, H, W)
    miss = data.test_missing[idx]                    # (n, 1, H, W) bool
    J = miss.expand_as(x_true)
    x = with_nan(x_true, J)
    rows = []
    for name in methods:
        if method_available(name, icfg, dataset, mask, seed):
            continue
        _, aux_test, _ = METHODS[name].prepare(data, icfg)
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
    return pd.DataFrame(rows, columns=None if rows else ["method", "sse", "missing_pixels"]).set_index("method")


def misconv_vs_mean_fill(data: CellData, cfg: ClassificationConfig, n: int, seeds: Sequence[int] = range(5), *,
                         progress: bool = True) -> dict:
    """Does the variance change the first layer? For freshly initialised fronts (one per seed), the
    MisConv front over the complete-data DMFA against ``relu(conv(image filled with the DMFA mean))``
    with the same weights, on the first ``n`` test images, over the output positions whose 3×3
    window touches a missing pixel: ``rel_diff`` = mean |difference| / mean |mean-fill output|
    (mean, min and max over the seeds)."""
    _, aux_test, _ = METHODS["dmfa_misconv_complete"].prepare(data, imputer_settings(cfg, progress=progress))
    idx = torch.arange(n)
    x, miss = data.test_images[idx], data.test_missing[idx]          # (n, C, H, W), (n, 1, H, W)
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


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown: one row per (mask, imputer)."""
    lines = [f"_Generated by `./lab study classification --diagnostics` (seed {int(table['seed'].iloc[0])}, first "
             f"{int(table['n_test_images'].iloc[0])} test images of each mask)._", "",
             "| mask | imputer | SSE per image at missing pixels | NLL of missing pixels (nats) | "
             "predicted std / actual RMSE per pixel |", "|---|---|---|---|---|"]
    for _, r in table.iterrows():
        nll = f"{r['nll']:.1f}" if "nll" in r and r["nll"] == r["nll"] else "–"
        std = f"{r['pred_std']:.3f} / {r['rmse']:.3f}" if "pred_std" in r and r["pred_std"] == r["pred_std"] else "–"
        lines.append(f"| {r['mask']} ({int(r['missing_pixels'])} px) | {NAMES.get(r['method'], r['method'])} | "
                     f"{r['sse']:.1f} | {nll} | {std} |")
    return "\n".join(lines)
