r"""Paired statistics for comparing two methods over the same cells (same data, masks, seeds).

Two methods ``a`` and ``b`` that ran on the same (dataset, mask, seed) cells are compared seed by
seed: ``d_s = acc_a(s) − acc_b(s)``. Three kinds of evidence, each answering its own question:

- **Over seeds** (:func:`t_interval`): the mean of the ``d_s`` with a t-based confidence interval
  (``mean ± t_{1−α/2, n−1} · sd / √n``) and the two-sided one-sample t-test of "mean difference 0".
  The seed changes masks, batch order and (depending on the init scheme) the initial weights, so
  this interval covers the training's randomness: it is the answer to "is method a better".
  It needs at least 2 seeds; with 3 it is wide (t = 4.30).
- **Over images × seeds** (:func:`bootstrap_interval`, needs per-image predictions): a two-level
  bootstrap that resamples seeds, then test images within each drawn seed. It adds the test set's
  sampling noise to the seed-to-seed spread.
- **Per trained pair** (:func:`mcnemar_exact`, needs per-image predictions): McNemar's exact test
  on the discordant images (``a`` right and ``b`` wrong: ``n_ab``; the reverse: ``n_ba``); under
  "no difference" each discordant image is a fair coin, so ``n_ab ~ Binomial(n_ab + n_ba, 1/2)``.
  Per seed it tests two *trained classifiers* on one test set, not the methods; pooled over seeds
  (:func:`mcnemar_pooled`) it adds the discordant counts (a sum of fair-coin binomials is one).

:func:`paired_comparison` applies all three to a results frame. Accuracies are fractions (0.9, not
90); the tables print points.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["t_interval", "mcnemar_exact", "mcnemar_pooled", "bootstrap_interval", "paired_comparison",
           "covers_zero", "COMPARISON_COLUMNS"]


def _finite_1d(values: Any, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{what} holds a value that is not a finite number: {v.tolist()}")
    return v


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a number strictly between 0 and 1, got {level!r}")
    return float(level)


def t_interval(differences: Sequence[float], level: float = 0.95) -> dict:
    """Mean of the per-seed differences ``(n,)`` with its t-based confidence interval and t-test.

    Returns ``{"n", "mean", "sd", "half_width", "low", "high", "p"}``: ``sd`` with ``n − 1`` in the
    denominator, ``half_width = t_{(1+level)/2, n−1} · sd / √n``, ``p`` the two-sided p-value of the
    one-sample t-test of mean 0. With fewer than 2 values the interval and ``p`` are NaN (one seed
    says nothing about the seed-to-seed spread). Equal values (sd 0): half-width 0, and ``p`` 1 for
    a zero mean, 0 otherwise.
    """
    from scipy import stats

    level = _check_level(level)
    d = _finite_1d(differences, "differences")
    n = len(d)
    if n == 0:
        raise ValueError("t_interval needs at least one difference, got none")
    mean = float(d.mean())
    if n < 2:
        nan = float("nan")
        return {"n": 1, "mean": mean, "sd": nan, "half_width": nan, "low": nan, "high": nan, "p": nan}
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return {"n": n, "mean": mean, "sd": sd, "half_width": half, "low": mean - half, "high": mean + half, "p": p}


def _correct_pair(correct_a: Any, correct_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    for name, v in (("correct_a", a), ("correct_b", b)):
        if v.ndim != 1:
            raise ValueError(f"{name} must be one flag per test image (1-D), got shape {v.shape}")
        if v.dtype != bool and not np.isin(v, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (or 0/1): whether each test image was classified right")
    if a.shape != b.shape:
        raise ValueError(f"correct_a has {a.shape[0]} images but correct_b {b.shape[0]}: "
                         "McNemar's test pairs the same test images")
    return a.astype(bool), b.astype(bool)


def _two_sided_binomial_half(k: int, n: int) -> float:
    """Two-sided exact p-value of ``k`` successes in ``n`` fair-coin trials (0.5 is symmetric, so
    it is twice the smaller tail, capped at 1)."""
    from scipy import stats

    if n == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(k, n - k), n, 0.5)))


def mcnemar_exact(correct_a: Any, correct_b: Any) -> dict:
    """McNemar's exact test of two classifiers on the same test images.

    ``correct_a``, ``correct_b``: ``(n_images,)`` booleans, True where the classifier was right.
    Returns ``{"n_ab", "n_ba", "p"}``: images only ``a`` got right, only ``b`` got right, and the
    two-sided exact p-value (binomial, 1/2, over the ``n_ab + n_ba`` discordant images; 1 when
    there are none).
    """
    a, b = _correct_pair(correct_a, correct_b)
    n_ab, n_ba = int((a & ~b).sum()), int((~a & b).sum())
    return {"n_ab": n_ab, "n_ba": n_ba, "p": _two_sided_binomial_half(n_ab, n_ab + n_ba)}


def mcnemar_pooled(pairs: Sequence[tuple[Any, Any]]) -> dict:
    """McNemar's exact test pooled over seeds: ``pairs`` = ``[(correct_a, correct_b), ...]``, one per
    seed. Under "no difference in any seed" every discordant image of every seed is a fair coin, so
    the summed ``n_ab`` is Binomial(total discordant, 1/2). Returns ``{"n_ab", "n_ba", "p"}``."""
    if len(pairs) == 0:
        raise ValueError("mcnemar_pooled needs at least one seed's predictions")
    n_ab = n_ba = 0
    for ca, cb in pairs:
        r = mcnemar_exact(ca, cb)
        n_ab, n_ba = n_ab + r["n_ab"], n_ba + r["n_ba"]
    return {"n_ab": n_ab, "n_ba": n_ba, "p": _two_sided_binomial_half(n_ab, n_ab + n_ba)}


def bootstrap_interval(pairs: Sequence[tuple[Any, Any]], *, level: float = 0.95, n_boot: int = 10000,
                       seed: int = 0) -> dict:
    """Percentile bootstrap over images × seeds of the mean accuracy difference ``a − b``.

    ``pairs``: one ``(correct_a, correct_b)`` per seed, each ``(n_images,)`` booleans. A replicate
    draws as many seeds as there are, with replacement, then within each drawn seed as many test
    images as it has, with replacement (the image-level draw is a multinomial over the three kinds
    of image: only ``a`` right, only ``b`` right, tied), and averages the per-seed differences.
    ``seed`` fixes the draw (a NumPy ``default_rng``). Returns ``{"mean", "low", "high", "n_boot"}``;
    ``mean`` is the observed mean difference (the same as :func:`t_interval`'s on these seeds).
    """
    level = _check_level(level)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot must be an int >= 100, got {n_boot!r}")
    if len(pairs) == 0:
        raise ValueError("bootstrap_interval needs at least one seed's predictions")
    sizes, probs, observed = [], [], []
    for ca, cb in pairs:
        a, b = _correct_pair(ca, cb)
        n = len(a)
        if n == 0:
            raise ValueError("a seed with no test images cannot be bootstrapped")
        n_ab, n_ba = int((a & ~b).sum()), int((~a & b).sum())
        sizes.append(n)
        probs.append([n_ab / n, n_ba / n, 1 - (n_ab + n_ba) / n])
        observed.append((n_ab - n_ba) / n)
    rng = np.random.default_rng(seed)
    n_seeds = len(pairs)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    per_seed = np.empty((n_boot, n_seeds))
    for s in range(n_seeds):
        where = picks == s
        k = int(where.sum())
        if k:
            counts = rng.multinomial(sizes[s], np.clip(probs[s], 0, 1), size=k)
            per_seed[where] = (counts[:, 0] - counts[:, 1]) / sizes[s]
    reps = per_seed.mean(1)
    alpha = 1 - level
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(np.mean(observed)), "low": float(low), "high": float(high), "n_boot": n_boot}


def covers_zero(low: float, high: float) -> bool:
    """Whether the interval ``[low, high]`` holds 0 (a NaN interval counts as holding it: nothing resolved)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return True
    return low <= 0 <= high


#: the columns of :func:`paired_comparison` (accuracy fractions; ``seeds`` / ``differences`` lists)
COMPARISON_COLUMNS = ["dataset", "mask", "n", "seeds", "differences", "mean", "sd", "ci_low", "ci_high",
                      "t_p", "resolved", "n_predictions", "boot_low", "boot_high", "mcnemar_p",
                      "mcnemar_n_ab", "mcnemar_n_ba", "mcnemar_p_per_seed"]


def _correct_of(row) -> np.ndarray | None:
    v = row.get("correct") if hasattr(row, "get") else None
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return np.asarray(v, dtype=bool)


def paired_comparison(df, method: str, baseline: str, *, level: float = 0.95, n_boot: int | None = 10000,
                      boot_seed: int = 0):
    """``method`` minus ``baseline`` per (dataset, mask), over the seeds where both have a row.

    ``df``: result rows with columns ``dataset``, ``mask``, ``method``, ``seed``, ``accuracy`` and
    optionally ``correct`` (per row: ``(n_test,)`` booleans, whether each test image was classified
    right, or None where the row has no stored predictions). Returns a DataFrame indexed by
    (dataset, mask) with :data:`COMPARISON_COLUMNS`: the t-interval over seeds (``ci_low``,
    ``ci_high``, ``t_p``; NaN for one seed), ``resolved`` (the interval excludes 0), and, only where
    every compared seed has predictions for both methods, the bootstrap over images × seeds
    (``boot_low``/``boot_high``; ``n_boot=None`` leaves them NaN, for tables that do not show them)
    and McNemar's test pooled over seeds (``mcnemar_*``) and per seed.
    Raises ``ValueError`` for a method without rows, two rows of one method in one cell, or
    predictions whose accuracy is not the row's.
    """
    import pandas as pd

    for m in (method, baseline):
        if m not in set(df["method"]):
            raise ValueError(f"no results for method {m!r}; have {sorted(set(df['method']))}")
    cols = ["dataset", "mask", "seed"]
    sub = {}
    for m in (method, baseline):
        part = df[df["method"] == m]
        dup = part.duplicated(cols)
        if dup.any():
            first = part[dup].iloc[0]
            raise ValueError(f"method {m!r} has two rows for {first['dataset']}/{first['mask']}/seed {first['seed']}: "
                             "select rows made with one setting first")
        sub[m] = part.set_index(cols)
    common = sub[method].index.intersection(sub[baseline].index).sort_values()
    nan = float("nan")
    out = []
    for (ds, mk), idx in pd.Series(index=common, dtype=float).groupby(level=["dataset", "mask"]):
        keys = list(idx.index)
        seeds = [int(k[2]) for k in keys]
        acc_a = np.array([float(sub[method].loc[k, "accuracy"]) for k in keys])
        acc_b = np.array([float(sub[baseline].loc[k, "accuracy"]) for k in keys])
        diffs = acc_a - acc_b
        t = t_interval(diffs, level)
        rec = {"dataset": ds, "mask": mk, "n": t["n"], "seeds": seeds,
               "differences": [float(v) for v in diffs], "mean": t["mean"], "sd": t["sd"],
               "ci_low": t["low"], "ci_high": t["high"], "t_p": t["p"],
               "resolved": t["n"] >= 2 and not covers_zero(t["low"], t["high"]),
               "n_predictions": 0, "boot_low": nan, "boot_high": nan, "mcnemar_p": nan,
               "mcnemar_n_ab": None, "mcnemar_n_ba": None, "mcnemar_p_per_seed": None}
        pairs = []
        if "correct" in df.columns:
            for k, a_acc, b_acc in zip(keys, acc_a, acc_b):
                ca, cb = _correct_of(sub[method].loc[k]), _correct_of(sub[baseline].loc[k])
                if ca is None or cb is None:
                    continue
                for name, c, acc in ((method, ca, a_acc), (baseline, cb, b_acc)):
                    if abs(c.mean() - acc) > 1e-5 + 1e-12:
                        raise ValueError(f"{name} {ds}/{mk}/seed {k[2]}: its predictions give accuracy "
                                         f"{c.mean():.5f} but its row says {acc:.5f}: they are not of this run")
                pairs.append((ca, cb))
        rec["n_predictions"] = len(pairs)
        if pairs and len(pairs) == len(keys):
            if n_boot is not None:
                boot = bootstrap_interval(pairs, level=level, n_boot=n_boot, seed=boot_seed)
                rec.update(boot_low=boot["low"], boot_high=boot["high"])
            pooled = mcnemar_pooled(pairs)
            rec.update(mcnemar_p=pooled["p"],
                       mcnemar_n_ab=pooled["n_ab"], mcnemar_n_ba=pooled["n_ba"],
                       mcnemar_p_per_seed=[mcnemar_exact(ca, cb)["p"] for ca, cb in pairs])
        out.append(rec)
    return pd.DataFrame(out, columns=COMPARISON_COLUMNS).set_index(["dataset", "mask"])
