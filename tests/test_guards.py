"""Guards against silently wrong numbers: the trapezoid mask's geometry and distribution, height vs
width on non-square images, SSIM's data range, what the Fréchet distances compare, evaluation in
float32 under mixed-precision training, and NaN/inf at observed pixels.

Every check compares with something computed independently of the code under test: brute-force
geometry on the pixel grid, scikit-image, forward hooks on the model, a float32 re-evaluation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from labkit import masks as M
from labkit.metrics import frechet_distance, ssim, ssim_map
from tests.conftest import random_mfa
from tests.conftest import dmfa_recipe

CPU = torch.device("cpu")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# =============================================================================== the trapezoid mask
# The definition (reference: the paper's trapezoid): a straight line through the image centre cuts
# the image into two halves whose parallel sides lie on two opposite borders; one half, chosen at
# random, is missing. The line's angle is uniform within ±45° of the axis it runs along, the axis
# (left/right or top/bottom borders) chosen at random — so its direction is uniform over all
# directions. Angles are measured on the pixel-centre grid in units where the first and last pixel
# centres of each border sit at ±1 (the geometric angle on a square image).
#
# The checks below never use the generator's parameters. A half-plane through the centre is fixed by
# its direction; as the direction turns, the split of the pixel centres changes only where the line
# meets a pixel centre. Those critical directions cut [0°, 180°) into arcs: every direction inside one
# arc gives the same pair of halves. Under the definition an arc is drawn with probability equal to its
# length / 180°, whatever the image size, so the observed arcs can be tested against exact expectations.
def _normalised_centres(h, w):
    """Pixel-centre offsets from the image centre, ``(u, v)`` = (column, row) with the first and last
    pixel centres at ∓1: ``(h*w,)`` each."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return ((2 * j + 1 - w) / (w - 1)).ravel(), ((2 * i + 1 - h) / (h - 1)).ravel()


def _direction_arcs(h, w):
    """The arcs of line directions that split an ``h x w`` grid's pixel centres the same way.

    Returns ``(middle, length, side)``: each arc's middle direction and length (radians), and the
    side (+1/−1, 0 on the line) of every pixel centre for a line in the middle of the arc, ``(arcs, h*w)``.
    """
    u, v = _normalised_centres(h, w)
    off = (u != 0) | (v != 0)
    critical = np.unique(np.round(np.arctan2(v[off], u[off]) % np.pi, 12))
    upper = np.append(critical[1:], critical[0] + np.pi)
    middle = (critical + upper) / 2
    side = np.sign(np.cos(middle)[:, None] * v[None] - np.sin(middle)[:, None] * u[None])
    return middle % np.pi, upper - critical, side


def _arc_of_each_mask(masks2d):
    """Index of the arc whose half-plane each mask is (``(n,)``), plus the arcs; fails for a mask that is
    not one side of a line through the centre, or matches more than one arc."""
    n, h, w = masks2d.shape
    middle, length, side = _direction_arcs(h, w)
    signs = np.where(masks2d.reshape(n, -1), 1.0, -1.0)
    agree = side @ signs.T                                     # (arcs, n): ±(pixels off the line) on a match
    match = np.abs(agree) == np.abs(side).sum(1)[:, None]
    assert (match.sum(0) == 1).all(), f"masks matching no line or several: {np.flatnonzero(match.sum(0) != 1)[:5]}"
    return match.argmax(0), middle, length


@pytest.mark.parametrize("hw", [(16, 16), (12, 20), (20, 12), (15, 9)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_trapezoid_cut_direction_is_uniform_over_all_directions(hw):
    h, w = hw
    n = 2000
    masks2d = M.trapezoid(n, h, w, generator=gen(11), device=CPU)[:, 0].numpy()
    arc, middle, length = _arc_of_each_mask(masks2d)
    # 12 bins of 15°, centred on the axes (0°, 90°) and the diagonals (45°, 135°)
    degrees = np.degrees(middle)
    bins = ((degrees + 7.5) // 15).astype(int) % 12
    expected = n * np.bincount(bins, weights=length, minlength=12) / np.pi
    observed = np.bincount(bins[arc], minlength=12)
    p = stats.chisquare(observed, expected).pvalue
    assert p > 1e-3, (observed, expected.round(1), p)
    # the lines within 5° of a diagonal: as often as their share of directions says
    near_diagonal = np.minimum(np.abs(degrees - 45), np.abs(degrees - 135)) < 5
    share, want = near_diagonal[arc].mean(), length[near_diagonal].sum() / np.pi
    assert abs(share - want) < 4.5 * math.sqrt(want * (1 - want) / n), (share, want)


@pytest.mark.parametrize("hw", [(9, 9), (9, 15), (15, 9), (8, 12)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_trapezoid_every_pixel_is_missing_half_of_the_time_the_centre_pixel_too(hw):
    # Which half is missing is a fair coin, and the point reflection about the centre swaps the halves,
    # so every pixel -- the centre pixel of an odd-by-odd image included -- is missing with probability 1/2.
    h, w = hw
    n = 2000
    m = M.trapezoid(n, h, w, generator=gen(12), device=CPU)[:, 0]
    freq = m.double().mean(0)
    sd = math.sqrt(0.25 / n)
    assert (freq - 0.5).abs().max() < 5 * sd, freq
    if h % 2 and w % 2:
        centre = m[:, h // 2, w // 2].double().mean()
        assert abs(centre - 0.5) < 5 * sd, centre
        # and so both ⌊HW/2⌋ and ⌈HW/2⌉ occur
        assert set(m.sum((1, 2)).tolist()) == {h * w // 2, h * w // 2 + 1}


# =============================================================================== height vs width
SHAPES = [(6, 14), (14, 6)]


@pytest.mark.parametrize("hw", SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_square_positions_cover_every_inside_position_of_a_non_square_image(hw):
    h, w, side = *hw, 3
    m = M.square(3000, h, w, side=side, generator=gen(1), device=CPU)[:, 0]
    assert m.shape == (3000, h, w)
    rows, cols = m.any(2), m.any(1)
    tops, lefts = rows.float().argmax(1), cols.float().argmax(1)
    assert (rows.sum(1) == side).all() and (cols.sum(1) == side).all()
    counts = torch.bincount(tops * (w - side + 1) + lefts, minlength=(h - side + 1) * (w - side + 1))
    assert counts.numel() == (h - side + 1) * (w - side + 1)
    expected = 3000 / counts.numel()
    assert counts.min() > expected - 5 * math.sqrt(expected) and counts.max() < expected + 5 * math.sqrt(expected)


@pytest.mark.parametrize("hw", SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_every_mask_kind_has_height_rows_and_width_columns_and_covers_the_image(hw):
    h, w = hw
    for kind, kw in (("square", {"side": 3}), ("trapezoid", {}), ("noise", {}), ("trapezoid_inside", {})):
        # 1000 masks: a corner pixel, in 1 of the 48 positions of a 3x3 square, is missed with p < 1e-8
        m = M.make_masks(kind, 1000, h, w, generator=gen(2), device=CPU, **kw)
        assert m.shape == (1000, 1, h, w) and m.dtype == torch.bool, kind
        assert m.any(0).all(), f"{kind}: some pixel of a {h}x{w} image is never missing"
        assert (~m).any(0).all(), f"{kind}: some pixel of a {h}x{w} image is always missing"
    # trapezoid_inside: half the area, and a convex shape: every row and every column holds at most
    # one run of missing pixels
    m = M.trapezoid_inside(300, h, w, generator=gen(3), device=CPU)[:, 0]
    assert ((m.sum((1, 2)).double() - h * w / 2).abs() <= 0.02 * h * w).all()

    def one_run_per_line(t):  # (n, lines, length) -> (n,): every line holds at most one run of True
        starts = t[..., :1].int() + (t[..., 1:] & ~t[..., :-1]).int().sum(-1, keepdim=True)
        return (starts <= 1).all(-1).all(-1)

    assert one_run_per_line(m).all() and one_run_per_line(m.transpose(1, 2)).all()


@pytest.mark.parametrize("hw", SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_mask_consumers_take_height_then_width(hw):
    from labkit.models.dmfa import incomplete_masks, test_masks
    from labkit.studies.cells import cell_masks
    from labkit.studies.draw import preset_mask
    from labkit.studies.draw_app import training_masks

    h, w = hw
    side, n = 3, 1000
    made = {
        "cell_masks": cell_masks("mnist", "train", "trapezoid", 0, n, h, w),
        "incomplete_masks": incomplete_masks(n, h, w, side=side, device=CPU),
        "test_masks": test_masks(n, h, w, side=side, device=CPU),
        "training_masks": training_masks(n, h, w, kinds=("trapezoid", "noise"), device=CPU),
    }
    for name, m in made.items():
        assert m.shape == (n, 1, h, w), name
        assert m.any(0).all() and (~m).any(0).all(), name
    for kind in ("trapezoid", "noise", "clear"):
        assert preset_mask(kind, h, w, device=CPU).shape == (1, 1, h, w)


def test_a_stroke_dot_paints_the_pixel_at_its_row_and_column():
    from labkit.studies.draw import stroke_mask

    # canvas point (x, y) = (17.5, 2.5): column 17, row 2 of a 4x20 image (and of its transpose's twin)
    painted = stroke_mask([[17.5, 2.5]], 4, 20, device=CPU)
    assert painted.shape == (4, 20) and painted.nonzero().tolist() == [[2, 17]]
    painted = stroke_mask([[2.5, 17.5]], 20, 4, device=CPU)
    assert painted.shape == (20, 4) and painted.nonzero().tolist() == [[17, 2]]


def test_dmfa_and_fronts_on_non_square_images(eager_misconv):
    from labkit.models.dmfa import LinearHeadsDMFA
    from labkit.models.fronts import FRONTS, make_front

    torch.manual_seed(0)
    model = LinearHeadsDMFA((1, 8, 12), n_factors=2)
    x = torch.rand(2, 1, 8, 12)
    miss = M.square(2, 8, 12, side=3, generator=gen(), device=CPU)
    mfa = model(x, miss, validate=True)
    assert mfa.image_shape == (1, 8, 12) and mfa.means.shape == (2, 1, 1, 8, 12)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 12\)"):
        model(x.transpose(2, 3), miss.transpose(2, 3))
    mfa2 = random_mfa(B=2, K=1, L=2, C=1, H=8, W=12, dtype=torch.float32)
    for name in ("zero", "mask", "pc", "knn", "mfa_misconv", "gt"):
        front = make_front(name, 1, 4, kernel_size=3, stride=(1, 2), padding=(1, 0))
        aux = {"none": None, "images": x, "mfa": mfa2}[FRONTS[name].aux_kind]
        want = nn.functional.conv2d(x, torch.zeros(4, 1, 3, 3), stride=(1, 2), padding=(1, 0)).shape
        assert front(x, miss, aux).shape == want == (2, 4, 8, 5), name


# =============================================================================== SSIM and its data range
def _pair(scale, h=17, w=23, c=1, seed=0):
    g = gen(seed)
    target = torch.rand(3, c, h, w, generator=g, dtype=torch.float64)
    target = torch.nn.functional.avg_pool2d(target, 3, 1, 1)  # some local structure
    pred = (target + 0.15 * torch.randn(target.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return scale * pred, scale * target


@pytest.mark.parametrize("data_range", [0.5, 2.0, 255.0])
@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_constants_follow_data_range_like_scikit_image(data_range, channels):
    skm = pytest.importorskip("skimage.metrics")
    pred, target = _pair(data_range, c=channels)
    got = ssim(pred, target, data_range=data_range)
    multi = channels > 1
    want = [skm.structural_similarity(t if multi else t[0], p if multi else p[0], gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=data_range,
                                      channel_axis=0 if multi else None)
            for p, t in zip(pred.numpy(), target.numpy())]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-7)
    # SSIM of images scaled by L with data_range=L is the SSIM of the unscaled images with range 1
    torch.testing.assert_close(got, ssim(pred / data_range, target / data_range, data_range=1.0))
    # and the constants matter here: with range 1 instead, the number changes
    assert (got - ssim(pred, target, data_range=1.0)).abs().max() > 1e-3


def test_ssim_over_a_region_of_a_non_square_image_matches_scikit_images_map():
    skm = pytest.importorskip("skimage.metrics")
    pred, target = _pair(2.0, h=15, w=24, seed=1)
    where = torch.zeros(3, 1, 15, 24, dtype=torch.bool)
    where[0, 0, 3:12, 4:20] = True
    where[1, 0, 6:9, 14:23] = True
    where[2, 0, :, :8] = True
    got = ssim(pred, target, where, data_range=2.0)
    r = 5  # the 11x11 window's half width: centres closer to a border have no SSIM value
    for b in range(3):
        _, full = skm.structural_similarity(target[b, 0].numpy(), pred[b, 0].numpy(), gaussian_weights=True,
                                            sigma=1.5, use_sample_covariance=False, data_range=2.0, full=True)
        inside = np.zeros_like(full, dtype=bool)
        inside[r:-r, r:-r] = True
        sel = inside & where[b, 0].numpy()
        assert got[b].item() == pytest.approx(full[sel].mean(), abs=1e-7), b
    assert ssim_map(pred, target, data_range=2.0).shape == (3, 1, 15 - 10, 24 - 10)


# =============================================================================== Fréchet distances
def _tiny_feature_classifier():
    from labkit.models.classifier import build_classifier

    torch.manual_seed(0)
    return build_classifier("mnist", "gt", in_channels=1, image_size=12).eval()


def test_fd_features_are_the_input_of_the_last_linear_layer():
    from labkit.studies.wae_features import classifier_features, feature_map

    model = _tiny_feature_classifier()
    images = torch.rand(7, 1, 12, 12, generator=gen(3))
    seen = []
    hook = model.body[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            logits = model(images, torch.zeros(7, 1, 12, 12, dtype=torch.bool), images)
    finally:
        hook.remove()
    (penultimate,) = seen
    assert penultimate.shape == (7, model.body[-1].in_features) and logits.shape == (7, 10)
    for got in (classifier_features(model, images, batch_size=3), feature_map(model, 4)(images)):
        assert got.shape == penultimate.shape
        torch.testing.assert_close(got, penultimate)


class _StubWAE(nn.Module):
    """A stand-in WAE: reconstructions and prior samples that differ from each other and from the data."""

    def __init__(self, h, w):
        super().__init__()
        self.h, self.w = h, w
        self.scale = nn.Parameter(torch.tensor(0.8))

    def forward(self, x, missing, aux=None):
        return (self.scale * torch.where(missing.expand_as(x), torch.full((), 0.5), x) + 0.1).clamp(0, 1)

    def prior_sample(self, n, *, generator=None):
        return torch.rand(n, self.h * self.w, generator=generator)

    def decode(self, z):
        return (z ** 3).reshape(-1, 1, self.h, self.w)

    def sample(self, n, generator=None):
        return self.decode(self.prior_sample(n, generator=generator))


def test_fd_samples_compares_prior_samples_with_the_complete_images():
    from labkit.studies.imputers import AuxSource
    from labkit.studies.wae import evaluate_wae

    n, h, w = 40, 12, 12
    complete = torch.nn.functional.avg_pool2d(torch.rand(n, 1, h, w, generator=gen(4)), 3, 1, 1)
    missing = M.square(n, h, w, side=6, generator=gen(5), device=CPU)
    proj = torch.randn(h * w, 4, generator=gen(6), dtype=torch.float64)
    feats = lambda imgs: imgs.flatten(1).double() @ proj  # noqa: E731  (fixed random features)
    model = _StubWAE(h, w)
    metrics, _ = evaluate_wae(model, complete, missing, AuxSource(), features=feats, batch_size=n, seed=9,
                              skimage=False)
    with torch.no_grad():
        rec = model(torch.where(missing, torch.full((), float("nan")), complete), missing)
    samples = model.sample(n, generator=gen(9))
    want_samples = frechet_distance(feats(samples), feats(complete))
    want_rec = frechet_distance(feats(rec), feats(complete))
    assert metrics["fd_samples"] == pytest.approx(want_samples, rel=1e-6)
    assert metrics["fd_reconstruction"] == pytest.approx(want_rec, rel=1e-6)
    # the alternatives differ, so the check can tell them apart
    for wrong in (frechet_distance(feats(samples), feats(rec)), want_rec):
        assert abs(wrong - want_samples) > 0.1 * want_samples


# =============================================================================== evaluation under bf16 training
def _autocast_probe(module, log):
    """Record, for every forward of ``module``: (in training mode?, autocast on?, output dtype)."""
    def hook(mod, args, out):
        t = out if isinstance(out, torch.Tensor) else out.means
        log.append((mod.training, torch.is_autocast_enabled(t.device.type), t.dtype, t.shape[0]))
    return module.register_forward_hook(hook)


def test_classifier_validation_and_test_evaluation_run_in_float32_under_bf16_training(tmp_path, monkeypatch):
    from labkit.models.classifier import build_classifier
    from labkit.studies import classification as clf
    from labkit.studies.cells import CellData, cell_masks
    from labkit.studies.configs import ClassificationConfig

    g = gen(0)
    n, n_test, S = 24, 10, 12
    labels = torch.randint(0, 2, (n + n_test,), generator=g)
    images = 0.2 * torch.rand(n + n_test, 1, S, S, generator=g)
    images[labels == 1, :, :, : S // 2] += 0.7
    miss = cell_masks("tiny", "train", "square", 0, n + n_test, S, S)
    idx = torch.arange(n)
    data = CellData("mnist", "square", 0, images[:n], labels[:n], miss[:n], idx[:16], idx[16:],
                    images[n:], labels[n:], miss[n:])
    log = []

    def build(arch, method, **kw):
        model = build_classifier(arch, method, in_channels=1, image_size=S)
        _autocast_probe(model, log)
        return model

    monkeypatch.setattr(clf, "load_cell_data", lambda *a, **k: data)
    monkeypatch.setattr(clf, "build_classifier", build)
    cfg = ClassificationConfig(profile="t", results_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), masks=["square"],
                               methods=["zero"], seeds=[0], epochs=1, batch_size=8, precision="bf16-mixed",
                               select="best_val", device="cpu")
    clf._PLAN_DATA.clear()
    clf.run(cfg, progress=False)
    train = [r for r in log if r[0]]
    evals = [r for r in log if not r[0]]
    # training really ran under bf16 autocast (else this test could not tell anything apart) ...
    assert train and all(on and dtype == torch.bfloat16 for _, on, dtype, _ in train), train
    # ... and validation (8 images) and the test set (10 images) were scored in float32
    assert {b for *_, b in evals} == {8, 10}, evals
    assert all(not on and dtype == torch.float32 for _, on, dtype, _ in evals), evals


def test_dmfa_validation_runs_in_float32_under_bf16_training():
    from labkit.models.dmfa import LinearHeadsDMFA, evaluate_dmfa, test_masks
    from labkit.models.dmfa_training import train_dmfa
    from labkit.precision import autocast

    torch.manual_seed(0)
    model = LinearHeadsDMFA((1, 8, 8), n_factors=2)
    images = torch.rand(16, 1, 8, 8, generator=gen(1))
    val = torch.rand(12, 1, 8, 8, generator=gen(2))
    val_missing = test_masks(12, 8, 8, side=4, seed=3, device=CPU)
    log = []
    _autocast_probe(model, log)
    recipe = dmfa_recipe(epochs=1, batch_size=8, lr=1e-3, precision="bf16-mixed")
    history = train_dmfa(model, images, recipe, hidden_hole=4, device=CPU, progress=False,
                         val_images=val, val_missing=val_missing)
    train = [r for r in log if r[0]]
    evals = [r for r in log if not r[0]]
    assert train and all(on for _, on, *_ in train)
    assert evals and all(not on for _, on, *_ in evals), evals
    # the recorded validation NLL is the float32 one of the final weights, not the bf16 one
    fp32 = evaluate_dmfa(model, val, val_missing, device=CPU)["nll"].mean()
    with autocast("bf16-mixed", CPU):
        bf16 = evaluate_dmfa(model, val, val_missing, device=CPU)["nll"].mean()
    assert history[-1]["val_nll"] == pytest.approx(fp32, rel=1e-7)
    assert abs(bf16 - fp32) > 10 * 1e-7 * abs(fp32)  # the two are distinguishable at that tolerance


# =============================================================================== NaN/inf at observed pixels
def _poisoned(x, missing, value, where="observed"):
    """``x`` with NaN at missing pixels and ``value`` at one pixel: observed (row 0, col 0 must be
    observed) or missing."""
    out = torch.where(missing.expand_as(x), torch.full((), float("nan"), dtype=x.dtype), x).clone()
    if where == "observed":
        assert not missing[0, 0, 0, 0]
        out[0, -1, 0, 0] = value
    return out


def _image_and_mask(B=2, C=2, H=6, W=7):
    x = torch.rand(B, C, H, W, generator=gen(7))
    miss = torch.zeros(B, 1, H, W, dtype=torch.bool)
    miss[:, :, 2:5, 3:6] = True
    return x, miss


OBSERVED_MSG = r"x: an observed pixel is not finite \(NaN or inf\)"


@pytest.fixture
def eager_fast_kernels(monkeypatch):
    """MisConv's fast path without torch.compile (same functions, no compile time)."""
    import labkit.misconv_fast as MF

    monkeypatch.setattr(MF, "_COMPILE", False)
    monkeypatch.setattr(MF, "_DIRECT_EAGER", True)


@pytest.mark.parametrize("layer", ["fast", "eager", "authors"])
def test_misconv_refuses_nan_or_inf_at_an_observed_pixel(layer, eager_fast_kernels):
    from labkit.misconv import MisConv2d

    torch.manual_seed(0)
    x, miss = _image_and_mask()
    mfa = random_mfa(B=2, K=2, L=2, C=2, H=6, W=7, dtype=torch.float32)
    kw = {"fast": layer == "fast"} if layer != "authors" else {"variant": "authors"}
    conv = MisConv2d(2, 3, 3, padding=1, **kw)
    assert torch.isfinite(conv(_poisoned(x, miss, 0.0, "missing"), miss, mfa)).all()  # NaN at missing: fine
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=OBSERVED_MSG):
            conv(_poisoned(x, miss, value), miss, mfa)
    # plain mode: every pixel is observed
    with pytest.raises(ValueError, match=OBSERVED_MSG):
        conv(_poisoned(x, torch.zeros_like(miss), float("nan")))


def test_misconv_functions_refuse_nan_at_an_observed_pixel():
    from labkit.misconv import misconv_authors, misconv_reference

    x, miss = _image_and_mask()
    mfa = random_mfa(B=2, K=1, L=2, C=2, H=6, W=7, dtype=torch.float32)
    weight = torch.randn(3, 2, 3, 3, generator=gen(8))
    for fn, kw in ((misconv_reference, {"padding": 1}), (misconv_authors, {})):
        assert torch.isfinite(fn(_poisoned(x, miss, 0.0, "missing"), miss, mfa, weight, **kw)).all()
        with pytest.raises(ValueError, match=OBSERVED_MSG):
            fn(_poisoned(x, miss, float("nan")), miss, mfa, weight, **kw)
    # a per-channel mask: NaN in a channel where that pixel is observed is refused, where missing accepted
    per = torch.zeros(2, 2, 6, 7, dtype=torch.bool)
    per[:, 1, 0, 0] = True
    xp = x.clone()
    xp[0, 1, 0, 0] = float("nan")
    assert torch.isfinite(misconv_reference(xp, per, mfa, weight, padding=1)).all()
    with pytest.raises(ValueError, match=OBSERVED_MSG):
        misconv_reference(xp, per[:, [1, 0]], mfa, weight, padding=1)


def test_dmfa_refuses_nan_or_inf_at_an_observed_pixel():
    from labkit.models.dmfa import LinearHeadsDMFA

    torch.manual_seed(0)
    model = LinearHeadsDMFA((2, 8, 8), n_factors=2)
    x, miss = _image_and_mask(C=2, H=8, W=8)
    out = model(_poisoned(x, miss, 0.0, "missing"), miss, validate=True)
    assert torch.isfinite(out.means).all()
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=OBSERVED_MSG):
            model(_poisoned(x, miss, value), miss)


@pytest.mark.parametrize("name", ["zero", "mask", "pc", "knn", "mfa_mean", "acflow", "gt", "mfa_misconv",
                                  "dmfa_authors_complete"])
def test_every_front_refuses_nan_or_inf_at_an_observed_pixel(name, eager_misconv):
    from labkit.models.fronts import FRONTS, make_front

    torch.manual_seed(0)
    x, miss = _image_and_mask()
    mfa = random_mfa(B=2, K=1, L=2, C=2, H=6, W=7, dtype=torch.float32)
    front = make_front(name, 2, 4, kernel_size=3, padding=1)
    aux = {"none": None, "images": x, "mfa": mfa}[FRONTS[name].aux_kind]
    assert torch.isfinite(front(_poisoned(x, miss, 0.0, "missing"), miss, aux)).all()
    for value in (float("nan"), -float("inf")):
        with pytest.raises(ValueError, match=OBSERVED_MSG):
            front(_poisoned(x, miss, value), miss, aux)


def test_imputation_fronts_refuse_a_non_finite_imputed_value():
    from labkit.models.fronts import KNNFront

    x, miss = _image_and_mask()
    aux = x.clone()
    aux[1, 0, 3, 4] = float("nan")              # at a missing pixel: it would be used
    with pytest.raises(ValueError, match=r"aux \(imputed images\) is not finite \(NaN or inf\) at 1 missing"):
        KNNFront(2, 4)(x, miss, aux)
    aux = x.clone()
    aux[1, 0, 0, 0] = float("nan")              # at an observed pixel: never used
    assert torch.isfinite(KNNFront(2, 4)(x, miss, aux)).all()


def test_check_observed_finite_counts_and_passes_huge_finite_values():
    x, miss = _image_and_mask()
    M.check_observed_finite(torch.where(miss, torch.full((), float("nan")), x), miss)
    big = torch.full((2, 2, 6, 7), 3e38)          # finite, but the sum overflows
    M.check_observed_finite(big, None)
    bad = x.clone()
    bad[0, 0, 0, :3] = float("nan")
    bad[1, 1, 5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"images: an observed pixel is not finite \(NaN or inf\) at 4 value"):
        M.check_observed_finite(bad, miss, name="images")
