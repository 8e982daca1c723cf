"""labkit.studies.draw / draw_app: stroke -> mask, presets, panels and the app's event wiring, all without a browser.

References are independent of the implementation: stroke masks against dense sampling of the
stroke path, hand-computed brush footprints, panel statistics against the MFA formulas and Monte
Carlo, the app's mouse handling against the pure functions. The papermill run of the notebook is
marked slow.
"""
from __future__ import annotations

import contextlib
import io
import math
import re

import numpy as np
import pytest
import torch

from labkit.masks import make_masks
from labkit.mfa import MFA
from labkit.studies import draw, draw_app, draw_html
from labkit.studies.configs import DrawConfig
from labkit.studies.draw import (Panels, apply_stroke, compute_panels, format_probabilities, overlay_rgb, preset_mask,
                                 stroke_mask, stroke_radius)
from labkit.studies.draw_html import panel_images, png_bytes, probability_bars_html
from labkit.studies.draw_app import COMPLETE, MISCONV, ZERO, build_app, training_masks


# ----------------------------------------------------------------------------- references
def brute_stroke(points, height, width, scale, brush, per_unit=400):
    """Pixel centres within the brush radius of the path, the path sampled densely (step 1/per_unit).

    Returns (painted, ambiguous): ambiguous marks centres whose sampled distance is within the
    sampling error of the radius (they are left out of comparisons).
    """
    pts = np.asarray(points, dtype=np.float64) / scale
    if len(pts) == 1:
        samples = pts
    else:
        chunks = []
        for a, b in zip(pts[:-1], pts[1:]):
            n = max(2, int(np.ceil(np.hypot(*(b - a)) * per_unit)) + 1)
            t = np.linspace(0.0, 1.0, n)[:, None]
            chunks.append(a + t * (b - a))
        samples = np.concatenate(chunks)
    radius = max(brush, math.sqrt(2)) / 2
    cy, cx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    d = np.full(height * width, np.inf)
    centres = np.stack([cx.ravel(), cy.ravel()], 1)
    for s in range(0, len(samples), 2000):
        block = samples[s:s + 2000]
        d = np.minimum(d, np.sqrt(((centres[:, None] - block[None]) ** 2).sum(2)).min(1))
    d = d.reshape(height, width)
    return d <= radius, np.abs(d - radius) <= 1.0 / per_unit


def fixed_mfa(C=1, H=6, W=5, K=2, L=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(torch.randn(1, K, generator=g), 1)
    m = torch.rand(1, K, C, H, W, generator=g)
    A = 0.2 * torch.randn(1, K, L, C, H, W, generator=g)
    d = 0.01 + 0.05 * torch.rand(1, K, C, H, W, generator=g)
    return MFA(*(t.to(dtype) for t in (w, m, A, d)))


class Recorder:
    """A fake classifier: logits = fixed linear map of the input; remembers what it was given."""

    def __init__(self, n_in, n_classes=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(n_classes, n_in, generator=g)
        self.seen = []

    def __call__(self, x, missing):
        self.seen.append((x.clone(), missing.clone()))
        return x.flatten(1).float() @ self.weight.T


# ----------------------------------------------------------------------------- stroke -> mask
@pytest.mark.parametrize("seed", range(6))
def test_stroke_mask_matches_dense_sampling_of_the_path(seed):
    rng = np.random.default_rng(seed)
    H, W = int(rng.integers(5, 12)), int(rng.integers(5, 12))
    scale = float(rng.choice([1.0, 3.0, 7.5, 10.0]))
    brush = float(rng.choice([0.5, 1.0, 1.5, 2.5, 4.0]))
    n = int(rng.integers(1, 6))
    # points may leave the canvas a little: only in-image pixels can be painted
    pts = rng.uniform(-0.2, 1.2, size=(n, 2)) * np.array([W, H]) * scale
    got = stroke_mask(pts, H, W, scale=scale, brush=brush, device="cpu").numpy()
    want, ambiguous = brute_stroke(pts, H, W, scale, brush)
    assert got.shape == (H, W) and got.dtype == bool
    assert (got[~ambiguous] == want[~ambiguous]).all()
    assert ambiguous.sum() <= 2  # the comparison really covered the image


def test_brush_footprints_by_hand():
    # a dot at a pixel centre: a thin brush paints that pixel only (neighbours are 1 away > √2/2)
    dot = stroke_mask([(35, 45)], 8, 8, scale=10, brush=1.0, device="cpu")  # image (3.5, 4.5): row 4, col 3
    assert dot.sum() == 1 and dot[4, 3]
    # a brush of 3: radius 1.5 covers the 4-neighbours (1) and diagonals (√2), not 2 away: a 3x3 block
    block = stroke_mask([(35, 45)], 8, 8, scale=10, brush=3.0, device="cpu")
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[3:6, 2:5] = True
    assert torch.equal(block, expected)
    # the pixel under the cursor is always painted, even at a pixel corner with the thinnest brush
    corner = stroke_mask([(0.0, 0.0)], 4, 4, scale=1.0, brush=0.1, device="cpu")
    assert corner[0, 0] and corner.sum() == 1
    assert stroke_radius(0.1) == pytest.approx(math.sqrt(2) / 2) and stroke_radius(5) == 2.5


def test_canvas_scale_maps_a_horizontal_stroke_to_one_row():
    # canvas (5, 55) -> (95, 55) at scale 10 is image (0.5, 5.5) -> (9.5, 5.5): row 5, columns 0..9
    m = stroke_mask([(5, 55), (95, 55)], 12, 12, scale=10, brush=1.0, device="cpu")
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[5, 0:10] = True
    assert torch.equal(m, expected)


def test_painting_segment_by_segment_equals_the_whole_stroke():
    """The mouse paints each move's segment as it arrives; the union must be the whole polyline's mask."""
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 280, size=(9, 2))
    whole = stroke_mask(pts, 28, 28, scale=10, brush=2.0, device="cpu")
    pieces = torch.zeros(28, 28, dtype=torch.bool)
    for a, b in zip(pts[:-1], pts[1:]):
        pieces = apply_stroke(pieces, [a, b], scale=10, brush=2.0)
    assert torch.equal(whole, pieces) and whole.sum() > 20


def test_apply_stroke_draws_erases_and_keeps_shapes():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 1, 10, 10, generator=g) < 0.3
    pts = [(0, 0), (100, 100)]
    drawn = apply_stroke(base, pts, scale=10, brush=2)
    erased = apply_stroke(base, pts, scale=10, brush=2, erase=True)
    painted = stroke_mask(pts, 10, 10, scale=10, brush=2, device="cpu")
    assert drawn.shape == base.shape and drawn.dtype == torch.bool
    assert torch.equal(drawn, base | painted) and torch.equal(erased, base & ~painted)
    assert (drawn >= base).all() and (erased <= base).all()              # drawing never removes, erasing never adds
    assert torch.equal(apply_stroke(drawn, pts, scale=10, brush=2, erase=True), base & ~painted)
    assert base.sum() == (torch.rand(3, 1, 10, 10, generator=torch.Generator().manual_seed(0)) < 0.3).sum()
    for shape in [(10, 10), (1, 10, 10)]:
        assert apply_stroke(torch.zeros(shape, dtype=torch.bool), pts, scale=10).shape == shape


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(points=[(1, 2, 3)]), ValueError, "points must have shape (n, 2)"),
    (dict(points=[]), ValueError, "points must have shape (n, 2)"),
    (dict(points=[(float("nan"), 1)]), ValueError, "points must be finite"),
    (dict(points="ab"), TypeError, "points must be a sequence"),
    (dict(scale=0), ValueError, "scale must be a finite number > 0"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(brush=-1), ValueError, "brush must be a finite number > 0"),
    (dict(brush="3"), TypeError, "brush must be a number"),
    (dict(height=0), ValueError, "height must be >= 1"),
    (dict(width=2.5), TypeError, "width must be an int"),
])
def test_stroke_mask_rejects_bad_input(kwargs, exc, words):
    args = dict(points=[(1, 2)], height=4, width=4, scale=1.0, brush=1.0) | kwargs
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        stroke_mask(args.pop("points"), args.pop("height"), args.pop("width"), device="cpu", **args)


def test_apply_stroke_rejects_bad_masks():
    with pytest.raises(TypeError, match="missing must be a bool tensor"):
        apply_stroke(torch.zeros(4, 4, dtype=torch.uint8), [(1, 1)])
    with pytest.raises(ValueError, match=r"missing must have shape .* got \(2, 3, 4, 4\)"):
        apply_stroke(torch.zeros(2, 3, 4, 4, dtype=torch.bool), [(1, 1)])
    with pytest.raises(TypeError, match="erase must be a bool"):
        apply_stroke(torch.zeros(4, 4, dtype=torch.bool), [(1, 1)], erase=1)


# ----------------------------------------------------------------------------- presets
def test_presets_are_the_papers_table1_masks():
    """The app offers the paper's three kinds (labkit.masks.DEFAULT_MASK_KINDS), not every generator."""
    from labkit import masks

    table1 = getattr(masks, "DEFAULT_MASK_KINDS", ("square", "trapezoid", "noise"))
    assert draw.PRESET_KINDS == tuple(table1) == ("square", "trapezoid", "noise")
    sq, tr, no = (preset_mask(k, 28, 28, seed=5, device="cpu") for k in ("square", "trapezoid", "noise"))
    for m in (sq, tr, no):
        assert m.shape == (1, 1, 28, 28) and m.dtype == torch.bool
    assert sq.sum() == 14 * 14 and no.sum() == round(0.75 * 784)
    assert abs(int(tr.sum()) - 392) <= 0.02 * 784
    # exactly labkit.masks with a CPU generator seeded with the seed
    for kind, m in (("square", sq), ("trapezoid", tr), ("noise", no)):
        want = make_masks(kind, 1, 28, 28, generator=torch.Generator().manual_seed(5), device="cpu")
        assert torch.equal(m, want), kind
    assert torch.equal(no, preset_mask("noise", 28, 28, seed=5, device="cpu"))
    assert not torch.equal(no, preset_mask("noise", 28, 28, seed=6, device="cpu"))
    assert preset_mask("clear", 28, 28, device="cpu").sum() == 0
    msg = "unknown preset 'circle'; valid presets (the paper's Table 1 masks): square, trapezoid, noise, clear"
    with pytest.raises(ValueError, match=re.escape(msg)):
        preset_mask("circle", 28, 28)
    extra = [k for k in masks.MASK_KINDS if k not in table1]            # e.g. trapezoid_inside
    for kind in extra:
        with pytest.raises(ValueError, match=f"unknown preset '{kind}'"):
            preset_mask(kind, 28, 28)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        preset_mask("noise", 28, 28, seed=-1)


def test_training_masks_cycle_the_kinds():
    m = training_masks(12, 28, 28, seed=1, device="cpu")
    counts = m.sum((1, 2, 3))
    assert (counts[0::4] == 196).all()                                  # square
    assert ((counts[1::4] - 392).abs() <= 16).all()                     # trapezoid, ±2% of 784
    assert (counts[2::4] == 588).all()                                  # noise
    assert (counts[3::4] == 0).all()                                    # none
    assert torch.equal(m, training_masks(12, 28, 28, seed=1, device="cpu"))
    assert not torch.equal(m, training_masks(12, 28, 28, seed=2, device="cpu"))


# ----------------------------------------------------------------------------- panels
def _panels_setup(seed=0):
    C, H, W = 1, 6, 5
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(C, H, W, generator=g)
    missing = torch.zeros(H, W, dtype=torch.bool)
    missing[1:4, 2:5] = True
    mfa = fixed_mfa(C, H, W, seed=seed)
    return image, missing, mfa


def test_panels_follow_the_mfa_and_keep_observed_pixels():
    image, missing, mfa = _panels_setup()
    calls = []

    def dmfa(x, m):
        calls.append((x.clone(), m.clone()))
        return mfa

    masked, full = Recorder(30), Recorder(30, seed=1)
    p = compute_panels(image, missing, dmfa=dmfa, classifiers={"masked": masked, "full": full},
                       complete=["full"], n_samples=4, seed=3, label=2, class_names="abcd")
    obs = ~missing
    # the DMFA and the masked classifier never see a missing pixel's value (zeros there)
    assert torch.equal(calls[0][0][0][:, missing], torch.zeros(1, int(missing.sum())))
    assert torch.equal(masked.seen[0][0][0][:, missing], torch.zeros(1, int(missing.sum())))
    assert torch.equal(full.seen[0][0][0], image)                       # the complete image
    assert torch.equal(calls[0][1], missing[None, None])
    # mean and std: the MFA formulas, computed here independently
    w, m, A, d = mfa.weights[0], mfa.means[0], mfa.factors[0], mfa.variances[0]
    mean = torch.einsum("k,kchw->chw", w, m)
    second = torch.einsum("k,kchw->chw", w, d + (A ** 2).sum(1) + m ** 2)
    std = (second - mean ** 2).sqrt()
    assert torch.allclose(p.mean[:, missing], mean[:, missing], atol=1e-6)
    assert torch.allclose(p.std[:, missing], std[:, missing], atol=1e-6)
    assert torch.equal(p.mean[:, obs], image[:, obs]) and (p.std[:, obs] == 0).all()
    assert p.samples.shape == (4, 1, 6, 5)
    assert torch.equal(p.samples[:, :, obs], image[:, obs].expand(4, 1, -1))
    assert not torch.equal(p.samples[0], p.samples[1])
    # probabilities: softmax of the logits, in the order given
    assert list(p.probs) == ["masked", "full"]
    assert torch.allclose(p.probs["full"], torch.softmax(image.flatten() @ full.weight.T, 0), atol=1e-6)
    assert torch.allclose(p.probs["masked"].sum(), torch.tensor(1.0))
    assert p.n_missing == 9 and p.n_pixels == 30 and p.label == 2 and p.class_names == tuple("abcd")
    assert p.predictions()["full"] == (int(p.probs["full"].argmax()), pytest.approx(float(p.probs["full"].max())))


def test_panel_samples_have_the_mfa_mean_and_std():
    """Monte Carlo: the panel's samples at missing pixels have the mean and std the panel reports."""
    image, missing, mfa = _panels_setup(1)
    p = compute_panels(image, missing, dmfa=lambda x, m: mfa, classifiers={"c": Recorder(30)}, n_samples=20000)
    s = p.samples[:, :, missing]
    assert torch.allclose(s.mean(0), p.mean[:, missing], atol=0.01)
    assert torch.allclose(s.std(0), p.std[:, missing], rtol=0.05)


def test_panels_are_reproducible_from_the_seed():
    image, missing, mfa = _panels_setup()
    kw = dict(dmfa=lambda x, m: mfa, classifiers={"c": Recorder(30)}, n_samples=3)
    a, b = compute_panels(image, missing, seed=7, **kw), compute_panels(image, missing, seed=7, **kw)
    c = compute_panels(image, missing, seed=8, **kw)
    assert torch.equal(a.samples, b.samples) and not torch.equal(a.samples, c.samples)


def test_nan_at_missing_pixels_reaches_nothing_and_no_mask_skips_the_dmfa():
    image, missing, mfa = _panels_setup()
    holed = torch.where(missing, torch.tensor(float("nan")), image)
    p = compute_panels(holed, missing, dmfa=lambda x, m: mfa, classifiers={"c": Recorder(30)})
    for t in (p.mean, p.samples, p.std, p.probs["c"]):
        assert torch.isfinite(t).all()

    def no_dmfa(x, m):
        raise AssertionError("the DMFA must not be called when nothing is missing")

    q = compute_panels(image, torch.zeros(6, 5, dtype=torch.bool), dmfa=no_dmfa, classifiers={"c": Recorder(30)})
    assert torch.equal(q.mean, image) and (q.std == 0).all() and torch.equal(q.samples[2], image)


def test_compute_panels_rejects_bad_input():
    image, missing, mfa = _panels_setup()
    ok = dict(dmfa=lambda x, m: mfa, classifiers={"c": Recorder(30)})
    with pytest.raises(TypeError, match="image must be a floating-point"):
        compute_panels(image.to(torch.uint8), missing, **ok)
    with pytest.raises(ValueError, match=r"image must have shape \(C, H, W\) or \(1, C, H, W\), got \(2, 1, 6, 5\)"):
        compute_panels(image.expand(2, 1, 6, 5), missing, **ok)
    with pytest.raises(TypeError, match="missing must be a bool tensor"):
        compute_panels(image, missing.float(), **ok)
    with pytest.raises(ValueError, match=r"missing must have shape .*got \(5, 6\)"):
        compute_panels(image, missing.T, **ok)
    with pytest.raises(TypeError, match="dmfa must return a labkit.mfa.MFA, got Tensor"):
        compute_panels(image, missing, dmfa=lambda x, m: x, classifiers=ok["classifiers"])
    with pytest.raises(ValueError, match=r"dmfa returned an MFA for batch 1 of \(1, 6, 6\)"):
        compute_panels(image, missing, dmfa=lambda x, m: fixed_mfa(1, 6, 6), classifiers=ok["classifiers"])
    with pytest.raises(ValueError, match=r"classifier 'bad' must return logits of shape \(1, n_classes\), got \(4,\)"):
        compute_panels(image, missing, dmfa=ok["dmfa"], classifiers={"bad": lambda x, m: torch.zeros(4)})
    with pytest.raises(ValueError, match="classifier 'b' returned 3 classes, the others 4"):
        compute_panels(image, missing, dmfa=ok["dmfa"],
                       classifiers={"a": Recorder(30), "b": Recorder(30, n_classes=3)})
    with pytest.raises(ValueError, match="class_names has 2 names but the classifiers have 4 classes"):
        compute_panels(image, missing, class_names=["x", "y"], **ok)
    with pytest.raises(ValueError, match=r"complete names \['gt'\] that are not in classifiers \['c'\]"):
        compute_panels(image, missing, complete=["gt"], **ok)
    with pytest.raises(TypeError, match="classifiers must be a non-empty mapping"):
        compute_panels(image, missing, dmfa=ok["dmfa"], classifiers={})
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        compute_panels(image, missing, n_samples=0, **ok)


# ----------------------------------------------------------------------------- drawing
def test_overlay_marks_missing_pixels_red():
    image = torch.linspace(0, 1, 12).reshape(1, 3, 4)
    missing = torch.zeros(3, 4, dtype=torch.bool)
    missing[1, 2] = True
    rgb = overlay_rgb(image, missing)
    assert rgb.shape == (3, 4, 3)
    v = float(image[0, 1, 2])
    assert np.allclose(rgb[1, 2], 0.35 * v + 0.65 * np.array(draw.MISSING_RGB), atol=1e-6)
    keep = ~missing.numpy()
    assert np.allclose(rgb[keep], np.repeat(image[0].numpy()[keep][:, None], 3, 1))
    with pytest.raises(ValueError, match=r"missing must be a bool tensor of shape \(3, 4\)"):
        overlay_rgb(image, missing.T)


def test_panel_images_and_png_round_trip():
    from PIL import Image

    image, missing, mfa = _panels_setup()
    p = compute_panels(image, missing, dmfa=lambda x, m: mfa, classifiers={"c": Recorder(30)}, n_samples=2)
    imgs = panel_images(p)
    assert list(imgs) == ["input", "DMFA mean", "sample 1", "sample 2", "std"]
    for a in imgs.values():
        assert a.shape == (6, 5, 3) and a.dtype == np.uint8
    assert (imgs["std"][~missing.numpy()] == imgs["std"][0, 0]).all()   # one colour where std = 0
    back = np.asarray(Image.open(io.BytesIO(png_bytes(imgs["input"], zoom=3))).convert("RGB"))
    assert back.shape == (18, 15, 3)
    assert np.array_equal(back[::3, ::3], imgs["input"]) and np.array_equal(back[2::3, 1::3], imgs["input"])
    with pytest.raises(ValueError, match="rgb must be a uint8 array"):
        png_bytes(imgs["input"].astype(np.float32))


def test_probability_text_and_bars_name_the_predictions():
    probs = {"A": torch.tensor([0.1, 0.7, 0.2]), "B": torch.tensor([0.5, 0.2, 0.3])}
    p = Panels(image=torch.zeros(1, 2, 2), missing=torch.zeros(2, 2, dtype=torch.bool), mean=torch.zeros(1, 2, 2),
               samples=torch.zeros(1, 1, 2, 2), std=torch.zeros(1, 2, 2), probs=probs, label=1,
               class_names=("x", "y", "z"))
    text = format_probabilities(p).splitlines()
    assert text[0].startswith("A: y (0.700)") and text[1].startswith("B: x (0.500)")
    assert "top 3: y: 0.700, z: 0.200, x: 0.100" in text[0]
    html = probability_bars_html(p, height_px=100)
    assert "A: <b>y</b> (0.700)" in html and "B: <b>x</b> (0.500)" in html
    assert "height:70.0px" in html and "height:50.0px" in html            # bar heights follow p
    import html as html_module
    import json

    exact = re.search(r'data-probs="([^"]*)"', html).group(1)
    assert json.loads(html_module.unescape(exact)) == {k: [float(x) for x in v] for k, v in probs.items()}
    png = draw.render_panels(p)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- figures say what colour means
def _two_classifier_panels(label=2, n_samples=2):
    image, missing, mfa = _panels_setup()
    return compute_panels(image, missing, dmfa=lambda x, m: mfa, n_samples=n_samples, label=label,
                          classifiers={"A": Recorder(30), "B": Recorder(30, seed=1)}, class_names="abcd")


def _axes(fig):
    return {ax.get_label(): ax for ax in fig.axes}


def test_panels_figure_probability_axis_runs_from_0_to_1_with_a_true_label_legend():
    from matplotlib.colors import to_rgba

    p = _two_classifier_panels(label=2)
    axes = _axes(draw.panels_figure(p))
    ax = axes["probabilities"]
    assert ax.get_ylim() == (0.0, 1.0) and ax.get_ylabel() == "probability"
    assert list(ax.get_yticks()) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "0.25", "0.5", "0.75", "1"]
    # one bar per class and classifier, as tall as the probability
    assert len(ax.containers) == 2
    for container, name in zip(ax.containers, ("A", "B")):
        assert np.allclose([r.get_height() for r in container], p.probs[name].numpy())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("A: ") and legend[1].startswith("B: ") and legend[2] == "true label (c)"
    # the grey band of the legend sits on the true class, and only there
    bands = [patch for patch in ax.patches if patch.get_facecolor() == to_rgba(draw.TRUE_LABEL_BAND)]
    assert len(bands) == 1 and bands[0].get_x() == pytest.approx(1.5) and bands[0].get_width() == pytest.approx(1.0)
    # no label: no band and no legend entry for it
    ax = _axes(draw.panels_figure(_two_classifier_panels(label=None)))["probabilities"]
    assert not any("true label" in t.get_text() for t in ax.get_legend().get_texts())
    assert not [patch for patch in ax.patches if patch.get_facecolor() == to_rgba(draw.TRUE_LABEL_BAND)]


def test_panels_figure_colour_coded_panels_have_colour_bars():
    from matplotlib.colorbar import Colorbar

    p = _two_classifier_panels(n_samples=2)
    fig = draw.panels_figure(p)
    axes = _axes(fig)
    assert set(axes) == {"input", "DMFA mean", "sample 1", "sample 2", "std", "colorbar: pixel value",
                         "colorbar: std", "probabilities"}
    assert len(fig.axes) == 3 + 2 + 1 + 2                    # images, probabilities, two colour bars
    # the std map: magma from 0 to the largest std, with a colour bar naming the quantity and unit
    im = axes["std"].images[0]
    assert isinstance(im.colorbar, Colorbar) and im.colorbar.ax is axes["colorbar: std"]
    assert im.get_cmap().name == "magma"
    assert im.get_clim() == (0.0, pytest.approx(float(p.std.max())))
    label = im.colorbar.ax.get_ylabel()
    assert "std" in label and "pixel-value units" in label
    # the grey panels share one fixed scale 0..1 (never rescaled per image) and one colour bar
    grey = [axes[n].images[0] for n in ("DMFA mean", "sample 1", "sample 2")]
    assert all(g.get_clim() == (0.0, 1.0) and g.get_cmap().name == "gray" for g in grey)
    assert isinstance(grey[0].colorbar, Colorbar) and grey[0].colorbar.ax is axes["colorbar: pixel value"]
    assert "pixel value" in grey[0].colorbar.ax.get_ylabel() and "0 = black" in grey[0].colorbar.ax.get_ylabel()
    # the colour bars' ticks span their scales
    assert grey[0].colorbar.ax.get_ylim() == (0.0, 1.0)
    assert im.colorbar.ax.get_ylim() == pytest.approx((0.0, float(p.std.max())))
    assert draw.render_panels(p)[:8] == b"\x89PNG\r\n\x1a\n"


def test_probability_bars_html_have_an_axis_and_a_true_label_legend():
    probs = {"A": torch.tensor([0.1, 0.7, 0.2]), "B": torch.tensor([0.5, 0.2, 0.3])}
    p = Panels(image=torch.zeros(1, 2, 2), missing=torch.zeros(2, 2, dtype=torch.bool), mean=torch.zeros(1, 2, 2),
               samples=torch.zeros(1, 1, 2, 2), std=torch.zeros(1, 2, 2), probs=probs, label=1,
               class_names=("x", "y", "z"))
    html = probability_bars_html(p, height_px=100)
    ticks = re.findall(r"class='prob-tick' style='[^']*bottom:([-\d.]+)px[^']*'>([^<]*)<", html)
    assert [t for _, t in ticks] == ["0", "0.25", "0.5", "0.75", "1"]
    assert [float(b) + 6 for b, _ in ticks] == [0, 25, 50, 75, 100]      # tick p at p * height (label centred)
    assert ">probability<" in html
    assert html.count("prob-true") == 2                                  # the band on class y, and its legend
    assert re.search(r"prob-class prob-true'[^>]*background:" + draw.TRUE_LABEL_BAND, html)
    assert "true label: <b>y</b>" in html
    unlabelled = probability_bars_html(Panels(**{**p.__dict__, "label": None}), height_px=100)
    assert "true label" not in unlabelled and "prob-true" not in unlabelled


def test_colorbar_html_names_the_quantity_and_spans_the_scale():
    bar = draw_html.colorbar_html("magma", 0.0, 0.3, "std (pixel-value units)")
    tick = lambda html: re.findall(r"class='cbar-tick'[^>]*>([^<]*)<", html)  # noqa: E731
    assert tick(bar) == ["0", "0.15", "0.3"]
    assert "std (pixel-value units)" in bar and "linear-gradient" in bar
    assert tick(draw_html.colorbar_html("gray", 0, 1, "v", ticks=5)) == ["0", "0.25", "0.5", "0.75", "1"]
    assert tick(draw_html.colorbar_html("magma", 0, 0.2837, "v")) == ["0", "0.14", "0.28"]
    # the gradient runs through the colour map: black at 0 and white at 1 for "gray"
    stops = re.findall(r"rgb\((\d+), (\d+), (\d+)\) (\d+)%", draw_html.colorbar_html("gray", 0, 1, "v"))
    assert stops[0] == ("0", "0", "0", "0") and stops[-1] == ("255", "255", "255", "100")
    with pytest.raises(ValueError, match="need finite vmin < vmax"):
        draw_html.colorbar_html("gray", 1.0, 1.0, "v")
    with pytest.raises(ValueError, match="cmap must be the name of a matplotlib colour map"):
        draw_html.colorbar_html("nope", 0.0, 1.0, "v")


# ----------------------------------------------------------------------------- the app, headless
class FakeDMFA:
    """A DMFA stand-in: a fixed MFA for any 1x28x28 input (K=2, L=2)."""

    def __init__(self):
        self.mfa = fixed_mfa(1, 28, 28, seed=4)
        self.calls = 0

    def __call__(self, x, m):
        self.calls += 1
        return self.mfa


@pytest.fixture
def app():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 1, 28, 28, generator=g)
    labels = torch.tensor([3, 1, 4, 1, 5])
    clf = {"masked": Recorder(784, n_classes=10), "full": Recorder(784, n_classes=10, seed=1)}
    return build_app(images, labels, dmfa=FakeDMFA(), classifiers=clf, complete=["full"], scale=10, brush=1.5,
                     n_samples=2, seed=0, index=1)


def test_app_builds_and_a_scripted_stroke_updates_everything(app):
    assert app.canvas.width == 280 and app.canvas.height == 280
    assert app.canvas.layout.width == "280px" and app.canvas.layout.height == "280px"
    assert app.n_updates == 1 and app.panels.n_missing == 0 and app.panels.label == 1
    before_probs = app.probs_html.value
    before_png = app.panel_widgets["input"].value
    changed = app.stroke([(10, 140), (270, 140)])
    want = stroke_mask([(10, 140), (270, 140)], 28, 28, scale=10, brush=1.5, device="cpu")
    assert changed == int(want.sum()) > 0 and torch.equal(app.missing[0, 0], want)
    assert app.n_updates == 2 and app.panels.n_missing == changed
    assert f"<b>{changed}</b> / 784" in app.count_html.value
    assert app.probs_html.value != before_probs and app.panel_widgets["input"].value != before_png
    # erase mode gives the pixels back
    app.mode_widget.value = "erase"
    assert app.stroke([(10, 140), (270, 140)]) == changed and app.panels.n_missing == 0
    assert "<b>0</b> / 784" in app.count_html.value


def test_app_mouse_events_paint_and_update_on_release(app):
    """The canvas's real event path (ipycanvas' _handle_frontend_event), as a browser would drive it."""
    pts = [(50, 50), (120, 90), (200, 95)]
    send = app.canvas._handle_frontend_event
    send(None, {"event": "mouse_move", "x": 5.0, "y": 5.0}, [])           # hovering paints nothing
    assert app.missing.sum() == 0
    send(None, {"event": "mouse_down", "x": pts[0][0], "y": pts[0][1]}, [])
    for x, y in pts[1:]:
        send(None, {"event": "mouse_move", "x": x, "y": y}, [])
    assert app.n_updates == 1                                            # panels wait for the release
    assert f"<b>{int(app.missing.sum())}</b>" in app.count_html.value    # the count follows the drag
    send(None, {"event": "mouse_up", "x": pts[-1][0], "y": pts[-1][1]}, [])
    assert app.n_updates == 2
    assert torch.equal(app.missing[0, 0], stroke_mask(pts, 28, 28, scale=10, brush=1.5, device="cpu"))
    send(None, {"event": "mouse_move", "x": 10.0, "y": 250.0}, [])       # after release: nothing
    send(None, {"event": "mouse_out", "x": 10.0, "y": 250.0}, [])
    assert app.n_updates == 2


def test_app_offers_the_table1_presets_and_colour_bars(app):
    assert list(app.preset_buttons) == [*draw.PRESET_KINDS, "clear"] == ["square", "trapezoid", "noise", "clear"]
    assert draw.INTENSITY_LABEL in app.intensity_bar.value
    tick = lambda html: re.findall(r"class='cbar-tick'[^>]*>([^<]*)<", html)  # noqa: E731
    assert tick(app.intensity_bar.value) == ["0", "0.5", "1"]
    app.preset_buttons["noise"].click()
    assert app.panels.n_missing == 588
    # the std map is scaled to its largest value: the colour bar follows it after every update
    smax = float(app.panels.std.max())
    assert draw.STD_LABEL in app.std_bar.value
    assert float(tick(app.std_bar.value)[-1]) == pytest.approx(smax, abs=0.01)
    assert "true label: <b>1</b>" in app.probs_html.value and "prob-tick" in app.probs_html.value


def test_app_presets_clear_and_image_choice(app):
    for kind, count in (("square", 196), ("noise", 588)):
        app.preset(kind)
        assert app.panels.n_missing == count and f"<b>{count}</b>" in app.count_html.value
    first = app.missing.clone()
    app.preset("noise")
    assert not torch.equal(first, app.missing)                           # a new draw each press
    app.clear()
    assert app.missing.sum() == 0 and app.panels.n_missing == 0
    app.index_widget.value = 4                                           # the number box selects
    assert app.index == 4 and app.panels.label == 5
    app.brush_widget.value = 3.0
    assert app.brush == 3.0
    with pytest.raises(ValueError, match=r"index must be in \[0, 4\], got 5"):
        app.select(5)


def test_build_app_rejects_bad_input():
    with pytest.raises(ValueError, match="images must be a float tensor"):
        build_app(torch.zeros(2, 28, 28), None, dmfa=FakeDMFA(), classifiers={"c": Recorder(784)})
    with pytest.raises(ValueError, match=r"labels must be None or a tensor of shape \(2,\)"):
        build_app(torch.zeros(2, 1, 28, 28), torch.zeros(3), dmfa=FakeDMFA(), classifiers={"c": Recorder(784)})
    with pytest.raises(ValueError, match="scale must be >= 1"):
        build_app(torch.zeros(2, 1, 28, 28), None, dmfa=FakeDMFA(), classifiers={"c": Recorder(784)}, scale=0)


# ----------------------------------------------------------------------------- checkpoints
def test_find_dmfa_checkpoint_prefers_paper_then_cpu_and_complete(tmp_path):
    assert draw_app.find_dmfa_checkpoint("mnist", root=tmp_path) is None
    (tmp_path / "results/dmfa/cpu").mkdir(parents=True)
    (tmp_path / "results/dmfa/quick").mkdir(parents=True)
    (tmp_path / "results/dmfa/quick/mnist_complete.pt").write_bytes(b"x")     # quick models: never
    assert draw_app.find_dmfa_checkpoint("mnist", root=tmp_path) is None
    (tmp_path / "results/dmfa/cpu/mnist_incomplete.pt").write_bytes(b"x")
    assert draw_app.find_dmfa_checkpoint("mnist", root=tmp_path).name == "mnist_incomplete.pt"
    (tmp_path / "results/dmfa/cpu/mnist_complete.pt").write_bytes(b"x")
    assert draw_app.find_dmfa_checkpoint("mnist", root=tmp_path).name == "mnist_complete.pt"
    (tmp_path / "results/dmfa/paper").mkdir(parents=True)
    (tmp_path / "results/dmfa/paper/mnist_incomplete.pt").write_bytes(b"x")
    assert draw_app.find_dmfa_checkpoint("mnist", root=tmp_path) == tmp_path / "results/dmfa/paper/mnist_incomplete.pt"


def test_load_dmfa_round_trip(tmp_path):
    from labkit.checkpoint import CheckpointError, atomic_save
    from labkit.models.dmfa import build_dmfa, load_dmfa

    torch.manual_seed(0)
    model = build_dmfa("mnist", n_components=2, n_factors=1)
    path = atomic_save({"model": model.state_dict(), "meta": {"model": model.config}}, tmp_path / "d.pt")
    loaded, meta = load_dmfa(path, device="cpu")
    x = torch.rand(2, 1, 28, 28)
    m = preset_mask("square", 28, 28, device="cpu").expand(2, 1, 28, 28)
    with torch.no_grad():
        a, b = model.eval()(x, m), loaded(x, m)
    assert loaded.n_components == 2 and loaded.n_factors == 1 and not loaded.training
    assert torch.equal(a.means, b.means) and torch.equal(a.factors, b.factors)
    assert len(draw_app.file_digest(path)) == 12 and draw_app.file_digest(path) == draw_app.file_digest(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dmfa(tmp_path / "nope.pt")
    atomic_save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="is not a DMFA checkpoint"):
        load_dmfa(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------- the notebook, headless
@contextlib.contextmanager
def eager_misconv():
    """Train tiny MisConv classifiers with the eager formula: on a few dozen images the fast path's
    one-off torch.compile would take most of the test's time."""
    from labkit import misconv

    before = misconv.fast_default()
    misconv.set_fast_default(False)
    try:
        yield
    finally:
        misconv.set_fast_default(before)


def _committed_models_ready() -> bool:
    path = draw_app.find_dmfa_checkpoint("mnist")
    if path is None:
        return False
    names = ["classifier_zero_mnist.pt", "classifier_complete_mnist.pt",
             f"classifier_misconv_mnist_{draw_app.file_digest(path)}.pt"]
    return all((draw_app.draw_dir() / n).is_file() for n in names)


def notebook_model_overrides(tmp_path_factory) -> dict:
    """Notebook parameters under which the models load in seconds (shared with tests/test_browser.py).

    ``{}`` when the committed checkpoints exist (results/dmfa/..., results/draw/...). Otherwise tiny
    models (64 DMFA and 120 classifier training images, one epoch) are trained once per test
    session into a temporary folder, so the tests stay bounded and never write into results/.
    """
    if _committed_models_ready():
        return {}
    folder = tmp_path_factory.getbasetemp() / "draw_models"
    over = dict(out_dir=str(folder), n_train=120, epochs=1, dmfa_n_train=64, dmfa_epochs=1)
    with eager_misconv():
        draw_app.load_draw_models(DrawConfig(**over), n_test=100, device="cpu", quiet=True)
    return over


def test_open_app_builds_the_app_of_a_config(tmp_path_factory):
    """notebook 05's one call: the config's models, its first n_images test images, its canvas, brush,
    samples and first image."""
    over = notebook_model_overrides(tmp_path_factory)
    cfg = DrawConfig(device="cpu", n_images=5, image_index=3, scale=4, brush=2.0, n_samples=2, **over)
    with eager_misconv():
        app = draw_app.open_app(cfg, quiet=True)
    assert (app.index, app.scale, app.brush, app.images.shape[0]) == (3, 4, 2.0, 5)
    assert app.data.labels.shape == (5,) and torch.equal(app.labels, app.data.labels)
    assert set(app.classifiers) == {MISCONV, ZERO, COMPLETE} and app.complete == (COMPLETE,)
    assert app.models.dmfa is app.dmfa and app.models.meta["dmfa"]["path"]
    assert app.panels.samples.shape[0] == 2 and app.panels.n_missing == 0


@pytest.mark.slow
def test_notebook_runs_headless(tmp_path, tmp_path_factory):
    """papermill runs the notebook: the widgets build and the scripted stroke updates the panels
    (the notebook asserts it); the executed copy holds one widget and the scripted cells' output."""
    import nbformat

    try:
        from labkit.lab.run_notebooks import execute
    except ImportError:  # before labkit/lab/ existed
        from labkit.run_notebooks import execute

    over = notebook_model_overrides(tmp_path_factory)
    out = execute("05_draw_a_mask", "quick", output_dir=tmp_path, n_images=20, device="cpu", **over)
    nb = nbformat.read(out, as_version=4)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "stroke:" in text and "pixels painted" in text and "mask cleared" in text
    widgets = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_panels_on_cuda_match_the_cpu():
    image, missing, mfa = _panels_setup()
    clf = Recorder(30)
    clf.weight = clf.weight.cuda()
    p_gpu = compute_panels(image.cuda(), missing.cuda(), dmfa=lambda x, m: mfa.to("cuda"), classifiers={"c": clf})
    clf.weight = clf.weight.cpu()
    p_cpu = compute_panels(image, missing, dmfa=lambda x, m: mfa, classifiers={"c": clf})
    assert torch.allclose(p_gpu.mean, p_cpu.mean, atol=1e-5) and torch.allclose(p_gpu.std, p_cpu.std, atol=1e-5)
    assert torch.allclose(p_gpu.probs["c"], p_cpu.probs["c"], atol=1e-5)


def test_classifier_files_are_named_after_their_dmfa(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"one DMFA")
    b.write_bytes(b"another DMFA")
    pa = draw_app.classifier_path(MISCONV, out_dir=tmp_path, dmfa_path=a)
    assert pa.name == f"classifier_misconv_mnist_{draw_app.file_digest(a)}.pt"
    assert pa != draw_app.classifier_path(MISCONV, out_dir=tmp_path, dmfa_path=b)
    assert draw_app.classifier_path(ZERO, out_dir=tmp_path).name == "classifier_zero_mnist.pt"
    assert draw_app.classifier_path(COMPLETE).parent == draw_app.draw_dir()
    with pytest.raises(ValueError, match="pass dmfa_path"):
        draw_app.classifier_path(MISCONV)
    with pytest.raises(ValueError, match="unknown classifier 'knn'"):
        draw_app.classifier_path("knn")


@pytest.mark.slow
def test_load_draw_models_trains_once_then_loads(tmp_path):
    """Tiny settings: a random-weight DMFA checkpoint, three classifiers trained on 36 images, then
    loaded again unchanged; the predictors give (1, 10) logits and MisConv runs the eager formula."""
    from labkit.checkpoint import atomic_save
    from labkit.models.dmfa import build_dmfa
    from labkit.misconv import MisConv2d

    torch.manual_seed(0)
    dm = build_dmfa("mnist", n_components=1, n_factors=1)
    dpath = atomic_save({"model": dm.state_dict(), "meta": {"model": dm.config}}, tmp_path / "dmfa.pt")
    cfg = DrawConfig(dmfa_checkpoint=str(dpath), out_dir=str(tmp_path / "draw"), n_train=40, epochs=1)
    kw = dict(n_test=20, device="cpu", quiet=True)
    with eager_misconv():
        first = draw_app.load_draw_models(cfg, **kw)
    files = sorted(p.name for p in (tmp_path / "draw").iterdir())
    assert files == sorted(["classifier_zero_mnist.pt", "classifier_complete_mnist.pt",
                            f"classifier_misconv_mnist_{draw_app.file_digest(dpath)}.pt"])
    for name in (MISCONV, ZERO, COMPLETE):
        m = first.meta[name]
        assert m["n_train"] == 36 and m["n_val"] == 4 and m["n_test"] == 20 and 0 <= m["test_accuracy"] <= 1
        assert not first.classifiers[name].training
        assert not any(p.requires_grad for p in first.classifiers[name].parameters())
    assert all(not mod.fast for mod in first.classifiers[MISCONV].modules() if isinstance(mod, MisConv2d))
    again = draw_app.load_draw_models(cfg, **kw)
    x = torch.rand(1, 1, 28, 28)
    m = preset_mask("square", 28, 28, device="cpu")
    for name, fn in first.predictors().items():
        out = fn(x, m)
        assert out.shape == (1, 10) and torch.equal(out, again.predictors()[name](x, m))
    assert "test accuracy" in first.summary() and str(dpath) in first.summary()


def test_summary_shows_checkpoints_relative_to_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_ROOT", str(tmp_path / "lab"))
    inside = tmp_path / "lab" / "results" / "draw" / "classifier_zero_mnist.pt"
    outside = tmp_path / "elsewhere" / "dmfa.pt"
    models = draw_app.DrawModels(dmfa=None, classifiers={}, meta={
        "dmfa": {"path": str(outside), "source": "given"},
        ZERO: {"path": str(inside), "mode": "zero", "test_accuracy": 0.5, "n_test": 10, "masks": "square"}})
    lines = models.summary().splitlines()
    assert lines[0].startswith(f"dmfa: {outside} (given")
    assert lines[1].startswith(f"{ZERO}: results/draw/classifier_zero_mnist.pt (loaded; mode=zero, test accuracy 0.500")
