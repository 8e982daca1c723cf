"""Paired statistics (labkit.studies.paired_stats) against scipy and hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from labkit.studies import paired_stats as ps


# ------------------------------------------------------------------ t interval over seeds
def test_t_interval_against_scipy_and_by_hand():
    d = [0.012, -0.004, 0.020, 0.007]
    r = ps.t_interval(d)
    n, mean, sd = 4, np.mean(d), np.std(d, ddof=1)
    assert r["n"] == 4 and r["mean"] == pytest.approx(mean) and r["sd"] == pytest.approx(sd)
    assert r["half_width"] == pytest.approx(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    assert (r["low"], r["high"]) == pytest.approx(stats.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n)))
    assert r["p"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    # by hand, three seeds: t_{0.975, 2} = 4.302653; d = 1, 2, 3 -> sd 1, half-width 4.302653 / sqrt 3
    h = ps.t_interval([1.0, 2.0, 3.0])
    assert h["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    # t = 2 / (1 / sqrt 3) = 3.4641 with 2 df: two-sided p = 0.07418
    assert h["p"] == pytest.approx(0.074180, abs=2e-6)
    assert ps.t_interval([1.0, 2.0, 3.0], level=0.9)["half_width"] == pytest.approx(
        stats.t.ppf(0.95, 2) / math.sqrt(3))


def test_t_interval_edges_and_refusals():
    one = ps.t_interval([0.01])
    assert one["n"] == 1 and one["mean"] == 0.01 and math.isnan(one["half_width"]) and math.isnan(one["p"])
    same = ps.t_interval([0.02, 0.02, 0.02])
    assert same["half_width"] == 0 and same["p"] == 0.0
    assert ps.t_interval([0.0, 0.0])["p"] == 1.0
    with pytest.raises(ValueError, match="at least one"):
        ps.t_interval([])
    with pytest.raises(ValueError, match="not a finite number"):
        ps.t_interval([0.1, float("nan")])
    with pytest.raises(ValueError, match="level"):
        ps.t_interval([0.1, 0.2], level=95)
    assert ps.covers_zero(-0.1, 0.2) and not ps.covers_zero(0.01, 0.2) and ps.covers_zero(float("nan"), 1.0)


# ------------------------------------------------------------------ McNemar
def _flags(n_ab: int, n_ba: int, n_both: int, n_neither: int):
    a = [True] * n_ab + [False] * n_ba + [True] * n_both + [False] * n_neither
    b = [False] * n_ab + [True] * n_ba + [True] * n_both + [False] * n_neither
    return np.array(a), np.array(b)


@pytest.mark.parametrize("n_ab,n_ba", [(1, 5), (5, 1), (0, 0), (0, 7), (12, 30), (300, 251), (40, 40)])
def test_mcnemar_exact_against_binomtest(n_ab, n_ba):
    a, b = _flags(n_ab, n_ba, 50, 9)
    r = ps.mcnemar_exact(a, b)
    assert (r["n_ab"], r["n_ba"]) == (n_ab, n_ba)
    want = 1.0 if n_ab + n_ba == 0 else stats.binomtest(n_ab, n_ab + n_ba, 0.5, alternative="two-sided").pvalue
    assert r["p"] == pytest.approx(want, rel=1e-9)


def test_mcnemar_by_hand_and_pooled():
    # 1 vs 5 discordant: P(X <= 1) = (1 + 6) / 64, two-sided 14/64
    assert ps.mcnemar_exact(*_flags(1, 5, 3, 3))["p"] == pytest.approx(14 / 64)
    # pooled over two seeds = one binomial test on the summed counts (3 vs 9)
    pooled = ps.mcnemar_pooled([_flags(1, 5, 3, 3), _flags(2, 4, 0, 1)])
    assert (pooled["n_ab"], pooled["n_ba"]) == (3, 9)
    assert pooled["p"] == pytest.approx(stats.binomtest(3, 12, 0.5).pvalue)
    with pytest.raises(ValueError, match="same test images"):
        ps.mcnemar_exact(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="booleans"):
        ps.mcnemar_exact(np.array([0.5, 1.0]), np.array([1.0, 0.0]))


# ------------------------------------------------------------------ bootstrap over images x seeds
def test_bootstrap_one_seed_matches_the_binomial_spread():
    """One seed: only the image-level draw is left; the difference of a multinomial's two counts
    over n has standard deviation sqrt((p+ + p- - (p+ - p-)^2) / n). The 95 % percentile interval
    of a near-normal statistic is mean ± 1.96 of it."""
    a, b = _flags(400, 300, 8000, 1300)         # n = 10,000
    r = ps.bootstrap_interval([(a, b)], n_boot=20000, seed=1)
    n, pp, pm = 10000, 0.04, 0.03
    sd = math.sqrt((pp + pm - (pp - pm) ** 2) / n)
    assert r["mean"] == pytest.approx(0.01)
    assert r["low"] == pytest.approx(0.01 - 1.96 * sd, abs=0.1 * sd)
    assert r["high"] == pytest.approx(0.01 + 1.96 * sd, abs=0.1 * sd)


def test_bootstrap_resamples_seeds_too_and_is_seeded():
    """Seeds whose differences disagree widely: the interval must span the seed spread (an
    image-only bootstrap would give a narrow interval around the mean)."""
    seeds = [_flags(600, 100, 9000, 300), _flags(100, 600, 9000, 300), _flags(350, 350, 9000, 300)]
    r = ps.bootstrap_interval(seeds, n_boot=4000, seed=3)
    assert r["mean"] == pytest.approx(0.0, abs=1e-12)
    # the per-seed differences are +5, -5, 0 points: resampling 3 seeds reaches about ±3.3 points
    assert r["low"] < -0.025 and r["high"] > 0.025
    assert r == ps.bootstrap_interval(seeds, n_boot=4000, seed=3)
    with pytest.raises(ValueError, match="n_boot"):
        ps.bootstrap_interval(seeds, n_boot=10)


# ------------------------------------------------------------------ on a results frame
def _frame(with_predictions: bool):
    rng = np.random.default_rng(0)
    rows = []
    truth = rng.random(2000) < 0.9
    for seed, shift in ((0, 60), (1, 40), (2, 50)):
        a, b = truth.copy(), truth.copy()
        a[:shift], b[:shift] = True, False          # `shift` images only a gets right; the rest tied
        for meth, c in (("misconv", a), ("mean", b)):
            rows.append({"dataset": "mnist", "mask": "square", "method": meth, "seed": seed,
                         "accuracy": round(float(c.mean()), 5), "correct": c if with_predictions else None})
    rows.append({"dataset": "mnist", "mask": "noise", "method": "misconv", "seed": 0, "accuracy": 0.8,
                 "correct": None})
    rows.append({"dataset": "mnist", "mask": "noise", "method": "mean", "seed": 0, "accuracy": 0.7, "correct": None})
    return pd.DataFrame(rows)


def test_paired_comparison_with_and_without_predictions():
    for with_pred in (False, True):
        out = ps.paired_comparison(_frame(with_pred), "misconv", "mean", n_boot=2000)
        sq = out.loc[("mnist", "square")]
        diffs = np.array(sq["differences"])
        assert sq["n"] == 3 and sq["seeds"] == [0, 1, 2]
        t = ps.t_interval(diffs)
        assert (sq["ci_low"], sq["ci_high"], sq["t_p"]) == pytest.approx((t["low"], t["high"], t["p"]))
        assert bool(sq["resolved"]) and t["low"] > 0
        no = out.loc[("mnist", "noise")]
        assert no["n"] == 1 and not no["resolved"] and math.isnan(no["ci_low"])
        if with_pred:
            assert sq["n_predictions"] == 3 and sq["boot_low"] < sq["mean"] < sq["boot_high"]
            assert (sq["mcnemar_n_ab"], sq["mcnemar_n_ba"]) == (150, 0)
            assert sq["mcnemar_p"] == pytest.approx(stats.binomtest(150, 150, 0.5).pvalue)
            assert sq["mcnemar_p_per_seed"] == pytest.approx([2 * 0.5 ** k for k in (60, 40, 50)])
        else:
            assert sq["n_predictions"] == 0 and math.isnan(sq["boot_low"]) and math.isnan(sq["mcnemar_p"])


def test_paired_comparison_refuses_foreign_predictions_and_duplicates():
    df = _frame(True)
    i = df.index[(df["method"] == "mean") & (df["seed"] == 1)][0]
    df.at[i, "accuracy"] = df.at[i, "accuracy"] + 0.01
    with pytest.raises(ValueError, match="not of this run"):
        ps.paired_comparison(df, "misconv", "mean", n_boot=200)
    dup = pd.concat([_frame(False), _frame(False).iloc[[0]]])
    with pytest.raises(ValueError, match="two rows"):
        ps.paired_comparison(dup, "misconv", "mean")
    with pytest.raises(ValueError, match="no results for method 'knn'"):
        ps.paired_comparison(_frame(False), "knn", "mean")


# ------------------------------------------------------------------ the paired table
def test_paired_table_states_interval_p_and_verdict():
    from labkit.studies.classification_tables import paired_markdown

    md = paired_markdown(_frame(True), pairs=[("misconv", "mean")]).splitlines()
    assert len(md) == 4
    sq = md[2].split(" | ")
    # +3.00, +2.00, +2.50 points: mean 2.50, sd 0.50, half-width t(0.975, 2) 4.303 × 0.5 / sqrt 3 = 1.24;
    # t = 8.66 with 2 df: two-sided p = 1 - t / sqrt(t^2 + 2) = 0.013
    assert sq[1:6] == ["square", "3", "+3.00, +2.00, +2.50", "+2.50 ± 1.24", "0.013"]
    assert sq[6].startswith("[+") and sq[7] == f"{stats.binomtest(150, 150, 0.5).pvalue:.2g}"
    assert sq[8] == "resolved |"
    assert md[3].endswith("| – | – | no difference resolved |")          # one seed, no predictions
    plain = paired_markdown(_frame(False), pairs=[("misconv", "mean")]).splitlines()
    assert plain[2].split(" | ")[6:8] == ["–", "–"]
    # the results file's table adds McNemar per seed: 60, 40 and 50 discordant images, all one way
    wide = paired_markdown(_frame(True), pairs=[("misconv", "mean")], per_seed_mcnemar=True).splitlines()
    assert "McNemar p per seed" in wide[0] and wide[1].count("|---") == 10
    assert wide[2].split(" | ")[8] == ", ".join(f"{2 * 0.5 ** k:.2g}" for k in (60, 40, 50))
    assert wide[3].split(" | ")[8] == "–"


def test_paired_table_of_the_committed_rows():
    """The committed MNIST rows have no predictions: the table still gives intervals over seeds."""
    from pathlib import Path

    from labkit.studies.classification import read_results
    from labkit.studies.classification_tables import paired_differences

    csv = Path(__file__).resolve().parents[1] / "results" / "classification" / "cpu" / "accuracy.csv"
    df = read_results(csv)
    df = df[(df["dataset"] == "mnist") & (df["mask"] == "square") & (df["n_train"] == 10000)]
    d = paired_differences(df, "dmfa_misconv_complete", "dmfa_mean_complete").loc[("mnist", "square")]
    assert d["n"] == 3 and d["n_predictions"] == 0 and math.isnan(d["mcnemar_p"])
    # the docs' -0.32 ± 0.15 (sd) over three seeds: half-width 4.303 × 0.15 / sqrt 3 = 0.37 points
    assert 100 * d["mean"] == pytest.approx(-0.32, abs=0.005)
    assert 100 * (d["ci_high"] - d["mean"]) == pytest.approx(4.303 * 100 * d["std"] / math.sqrt(3), rel=1e-3)
    assert not d["resolved"]


def test_one_seed_verdict_speaks_of_its_images_only():
    """With one seed there is no interval over seeds; a bootstrap over that seed's images that
    excludes 0 is reported as such (this training run only), never as a resolved difference."""
    import numpy as np
    import pandas as pd

    from labkit.studies.classification_tables import paired_markdown

    n = 400
    a = np.zeros(n, dtype=bool)
    a[:360] = True                                   # 0.90
    b = np.zeros(n, dtype=bool)
    b[:300] = True                                   # 0.75: a clear gap on these images
    rows = [{"dataset": "mnist", "mask": "square", "method": m, "seed": 0, "accuracy": c.mean(), "correct": c,
             "n_train": 10, "n_test": n, "epochs": 1, "precision": "32"}
            for m, c in (("dmfa_misconv_complete", a), ("dmfa_mean_complete", b))]
    md = paired_markdown(pd.DataFrame(rows))
    line = [r for r in md.splitlines() if "dmfa_misconv_complete` − `dmfa_mean_complete" in r][0]
    assert line.endswith("| this seed only: resolved over its test images |")
    same = [dict(r, correct=a, accuracy=a.mean()) for r in rows]
    line = [r for r in paired_markdown(pd.DataFrame(same)).splitlines() if "dmfa_mean_complete` |" in r][0]
    assert line.endswith("| no difference resolved |")


# ------------------------------------------------------------------ the forest plot and the budget table
def _lines(ax, gid):
    return [ln for ln in ax.lines if ln.get_gid() == gid]


def test_forest_plot_draws_the_intervals_of_the_seeds():
    """The plotted interval is the t interval of the per-seed differences, computed here from the
    accuracies with scipy; the bootstrap line exists only where predictions do."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.studies.classification_tables import paired_results, plot_paired

    for with_pred in (True, False):
        df = _frame(with_pred)
        fig = plot_paired(paired_results(df, pairs=[("misconv", "mean")], n_boot=500))
        titles = [ax.get_title() for ax in fig.axes]
        assert titles == ["square", "noise"]
        sq = fig.axes[0]
        acc = df[df["mask"] == "square"].pivot(index="seed", columns="method", values="accuracy")
        d = 100 * (acc["misconv"] - acc["mean"]).to_numpy()                  # +3.00, +2.00, +2.50 points
        lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(len(d)))
        (t_line,) = _lines(sq, "t-interval")
        assert t_line.get_xdata() == pytest.approx([lo, hi], abs=1e-6)
        (dot,) = _lines(sq, "mean")
        assert dot.get_xdata() == pytest.approx([d.mean()])
        assert dot.get_markerfacecolor() == dot.get_color()                   # resolved: filled
        seeds = [ln for ln in sq.lines if ln.get_marker() == "."]
        assert sorted(seeds[0].get_xdata()) == pytest.approx(sorted(d))
        assert len(_lines(sq, "bootstrap")) == (1 if with_pred else 0)
        noise = fig.axes[1]                                                   # one seed: a hollow dot, no interval
        assert _lines(noise, "t-interval") == [] and _lines(noise, "mean")[0].get_markerfacecolor() == "white"
        plt.close(fig)
    with pytest.raises(ValueError, match="no paired results"):
        plot_paired([])


def test_budget_table_puts_two_budgets_and_the_logs_side_by_side():
    from labkit.studies.classification_tables import budget_markdown

    small = _frame(False)
    small = small[small["mask"] == "square"]
    full = small[small["seed"] < 2].copy()
    full["accuracy"] = full["accuracy"] + np.where(full["method"] == "mean", 0.01, 0.0)   # +2.00, +1.00
    md = budget_markdown({"small": small, "full": full}, pairs=[("misconv", "mean"), ("misconv", "knn")],
                         authors={"misconv": (0.70, 0.72), "mean": (0.75,)})
    lines = md.splitlines()
    assert lines[:2] == ["- **small**: settings not recorded", "- **full**: settings not recorded"]
    misconv = [ln for ln in lines if ln.startswith("| misconv |")][0].split(" | ")
    assert misconv[1] == f"{small[small['method'] == 'misconv']['accuracy'].mean():.3f} ± " \
                         f"{small[small['method'] == 'misconv']['accuracy'].std(ddof=1):.3f} (n=3)"
    assert misconv[-1] == "0.7000 / 0.7200 |"
    (pair,) = [ln for ln in lines if ln.startswith("| `misconv` − `mean`")]
    cols = pair.split(" | ")
    # small: the hand-computed +2.50 ± 1.24, p = 0.013 of the paired table; full: +2.00 and +1.00
    # points, t_{0.975, 1} = 12.706 × 0.707 / √2 = 6.35, t = 3 with 1 df: p = 0.205
    assert cols[1] == "+2.50 ± 1.24 (n=3, p = 0.013): resolved"
    assert cols[2] == "+1.50 ± 6.35 (n=2, p = 0.205): no difference resolved"
    assert cols[3] == "-4.00 |"                                            # 0.71 − 0.75 in their logs
    assert not any(ln.startswith("| `misconv` − `knn`") for ln in lines)   # no budget has knn: no row
    assert budget_markdown({"small": small.iloc[:0]}) == "(no results yet)"
    other = _frame(False)
    with pytest.raises(ValueError, match="one data set and one mask"):
        budget_markdown({"small": other})
    with pytest.raises(ValueError, match="compare different data"):
        budget_markdown({"small": small, "noise": other[other["mask"] == "noise"]})


def test_no_bootstrap_when_none_is_asked_for():
    """``n_boot=None`` (tables that show no bootstrap) leaves the interval NaN; the rest is unchanged."""
    full = ps.paired_comparison(_frame(True), "misconv", "mean", n_boot=500).loc[("mnist", "square")]
    bare = ps.paired_comparison(_frame(True), "misconv", "mean", n_boot=None).loc[("mnist", "square")]
    assert math.isnan(bare["boot_low"]) and math.isnan(bare["boot_high"]) and not math.isnan(full["boot_low"])
    for col in ("mean", "ci_low", "ci_high", "t_p", "mcnemar_p"):
        assert bare[col] == full[col]


def test_budget_curves_put_both_budgets_on_the_images_seen():
    """Each seed's line is its history at (epoch + 1) × images per epoch; the thick line is the mean
    of the seeds at the epochs all reached (hand-computed); rows without history are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.studies.classification_tables import plot_budget_curves

    def rows(histories, n):
        return pd.DataFrame([{"dataset": "cifar10", "mask": "square", "method": "zero", "seed": s,
                              "accuracy": 0.5, "images_per_epoch": n,
                              "history": [{"epoch": e, "val_accuracy": v} for e, v in enumerate(h)] if h else None}
                             for s, h in enumerate(histories)])

    small = rows([[0.2, 0.4], [0.3, 0.5], None], 100)      # the third seed recorded no history
    full = rows([[0.3, 0.6, 0.7], [0.5, 0.6]], 1000)       # the second stopped an epoch early
    fig = plot_budget_curves({"small": small, "full": full})
    ax = fig.axes[0]
    lines = {ln.get_gid(): ln for ln in ax.lines}
    assert sum(ln.get_gid() == "seed|small|zero" for ln in ax.lines) == 2
    mean = lines["mean|small|zero"]
    assert list(mean.get_xdata()) == [100, 200] and list(mean.get_ydata()) == pytest.approx([0.25, 0.45])
    mean = lines["mean|full|zero"]
    assert list(mean.get_xdata()) == [1000, 2000] and list(mean.get_ydata()) == pytest.approx([0.4, 0.6])
    assert [ln.get_xdata()[-1] for ln in ax.lines if ln.get_gid() == "seed|full|zero"] == [3000, 2000]
    assert lines["mean|small|zero"].get_linestyle() != lines["mean|full|zero"].get_linestyle()
    assert ax.get_xscale() == "log"
    plt.close(fig)
    with pytest.raises(ValueError, match="no training history"):
        plot_budget_curves({"small": rows([None], 100)})
    with pytest.raises(ValueError, match="compare different data"):
        plot_budget_curves({"small": small, "noise": small.assign(mask="noise")})


def test_paired_table_says_so_when_no_pair_is_complete():
    """One method recorded (the first cell of a long run): a sentence, not an empty table."""
    from labkit.studies.classification_tables import paired_markdown

    df = _frame(False)
    assert paired_markdown(df[df["method"] == "misconv"], pairs=[("misconv", "mean")]).startswith("(no pair")
