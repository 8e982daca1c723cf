"""The study figures say what they show and nothing more.

- A bar chart's axis starts at 0 (a bar's length is its claim); a chart that zooms into a range
  draws markers. The classification chart is checked on accuracies near chance (the quick
  profile), where a zoomed bar chart would start at ~0.07; the WAE chart, whose bars start at 0,
  stays so.
- The classification chart's markers sit at the mean over seeds, its error bars span one standard
  deviation, and every seed and every paper value lies inside its panel.
- The inpainting grid (density study) puts the std maps on one scale and the factors on one
  symmetric scale, each with a colour bar inside the saved figure, and keeps its image rows aligned.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from labkit.studies.classification_tables import PAPER_TABLE1, plot_results  # noqa: E402


def bars_start_at_zero(fig) -> list[str]:
    """Axes with bars whose value axis does not start at 0 (as ``"title: ylim"``)."""
    bad = []
    for ax in fig.axes:
        if any(isinstance(c, BarContainer) for c in ax.containers) and ax.get_ylim()[0] != 0:
            bad.append(f"{ax.get_title()}: {ax.get_ylim()}")
    return bad


@pytest.fixture
def near_chance():
    """Accuracies as the quick profile gives them: around 0.1, three seeds, two masks."""
    g = np.random.default_rng(0)
    rows = [{"dataset": "mnist", "mask": mk, "method": meth, "seed": s, "accuracy": round(0.1 + 0.02 * g.random(), 4)}
            for mk in ("square", "noise") for meth in ("zero", "pc", "dmfa_misconv_complete") for s in range(3)]
    return pd.DataFrame(rows)


def test_classification_chart_draws_markers_at_the_means(near_chance):
    fig = plot_results(near_chance, title="quick")
    try:
        assert bars_start_at_zero(fig) == []
        methods = ["zero", "pc", "dmfa_misconv_complete"]
        for ax, mk in zip(fig.axes, ("square", "noise")):
            sub = near_chance[near_chance["mask"] == mk]
            markers = [line for line in ax.lines if line.get_marker() == "o"]
            assert len(markers) == len(methods)
            lo, hi = ax.get_ylim()
            for line, meth in zip(markers, methods):
                acc = sub[sub["method"] == meth]["accuracy"].to_numpy()
                assert line.get_ydata()[0] == pytest.approx(acc.mean())
                assert lo <= acc.min() and acc.max() <= hi
                paper = PAPER_TABLE1.get(meth, {}).get(mk)
                assert paper is None or lo <= paper <= hi
            # the error bars: one vertical segment per method, mean ± std over the seeds
            segments = [seg for coll in ax.collections for seg in coll.get_segments()]
            spans = sorted((round(s[0][1], 9), round(s[1][1], 9)) for s in segments if len(s) == 2)
            want = sorted((round(a.mean() - a.std(ddof=1), 9), round(a.mean() + a.std(ddof=1), 9))
                          for a in (sub[sub["method"] == m]["accuracy"].to_numpy() for m in methods))
            assert spans == want
    finally:
        plt.close(fig)


def test_wae_bars_start_at_zero():
    from labkit.studies.wae_report import plot_metrics

    rows = [{"key": f"k{f}{s}", "dataset": "mnist", "front": f, "seed": s, "psnr_missing": 10 + s, "psnr_all": 14.0,
             "ssim_missing": 0.3, "ssim_all": 0.5, "fd_reconstruction": 300.0 + s, "fd_samples": 800.0,
             "settings": "{}"}
            for f in ("gt", "zero") for s in range(2)]
    fig = plot_metrics(pd.DataFrame(rows))
    try:
        assert any(isinstance(c, BarContainer) for ax in fig.axes for c in ax.containers)
        assert bars_start_at_zero(fig) == []
    finally:
        plt.close(fig)


def _inpainting(n=2, L=3, S=2, C=1, side=8, seed=0):
    from labkit.studies.density_figures import _inpainting_figure

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, C, side, side, generator=g)
    miss = torch.zeros(n, C, side, side, dtype=torch.bool)
    miss[..., side // 4:3 * side // 4, side // 4:3 * side // 4] = True
    mean, std = torch.rand(n, C, side, side, generator=g), 0.3 * torch.rand(n, C, side, side, generator=g)
    samples = torch.rand(S, n, C, side, side, generator=g)
    # factors of very different sizes: the last image's are ten times the first's
    factors = torch.randn(n, L, C, side, side, generator=g) * torch.logspace(-1.3, -0.3, n).view(n, 1, 1, 1, 1)
    return _inpainting_figure(x, miss, mean, samples, std, factors=factors), miss, factors


def test_inpainting_factors_share_one_symmetric_scale_with_a_colour_bar():
    fig, miss, factors = _inpainting()
    try:
        n, L = factors.shape[:2]
        n_cols = 4 + 2 + L
        grid = fig.axes[:n * n_cols]
        lim = float(torch.where(miss[:, None], factors, torch.zeros(())).mean(2).abs().max())
        for i in range(n):
            for j in range(n_cols - L, n_cols):
                image = grid[i * n_cols + j].images[0]
                assert image.get_clim() == pytest.approx((-lim, lim), rel=1e-6)
        bars = {img.colorbar for ax in grid for img in ax.images if img.colorbar is not None}
        labels = sorted(b.ax.get_xlabel() + b.ax.get_ylabel() for b in bars)
        assert len(bars) == 2 and "factor" in labels[0] and "one scale" in labels[0] and "std" in labels[1], labels
    finally:
        plt.close(fig)


def test_inpainting_colour_bars_are_inside_the_figure_and_rows_aligned():
    fig, _, factors = _inpainting(n=6, L=4, S=3, side=28)           # the density study's figure
    try:
        fig.canvas.draw()
        n, L = factors.shape[:2]
        n_cols = 4 + 3 + L
        grid = fig.axes[:n * n_cols]
        width, height = fig.bbox.width, fig.bbox.height
        bars = {img.colorbar.ax for ax in grid for img in ax.images if img.colorbar is not None}
        assert len(bars) == 2
        for ax in bars:
            box = ax.get_tightbbox(fig.canvas.get_renderer())          # with ticks and label
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, (ax.get_label(), box)
        for i in range(n):
            tops = {round(ax.get_position().y1, 6) for ax in grid[i * n_cols:(i + 1) * n_cols]}
            assert len(tops) == 1, f"row {i}: panels at different heights {tops}"
    finally:
        plt.close(fig)
