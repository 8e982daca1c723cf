"""labkit.masks: areas, shapes (a square is a square, a trapezoid a trapezoid), reproducibility, errors."""
import numpy as np
import pytest
import torch

from labkit import masks as M
from labkit.device import resolve_device

CPU = "cpu"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def runs(line):
    """Start and end (exclusive) of every run of True in a 1-D bool array (brute force)."""
    out, start = [], None
    for i, v in enumerate(list(line) + [False]):
        if v and start is None:
            start = i
        if not v and start is not None:
            out.append((start, i))
            start = None
    return out


def digital_line(s) -> bool:
    """Whether the integers s_k lie on a digital straight line: some real line a + b k has
    0 <= s_k - (a + b k) < 1 for every k, i.e. the residuals s_k - b k span less than 1 for some b.

    That span is convex piecewise linear in b with kinks at the slopes through two points, so checking
    those slopes (brute force over all pairs) finds its minimum.
    """
    s = np.asarray(s, dtype=np.float64)
    n = len(s)
    if n < 3:
        return True
    k = np.arange(n, dtype=np.float64)
    i, j = np.triu_indices(n, k=1)
    slopes = (s[j] - s[i]) / (j - i)                                   # (P,)
    resid = s[None, :] - slopes[:, None] * k[None, :]                  # (P, n)
    span = resid.max(axis=1) - resid.min(axis=1)
    return bool(span.min() < 1 + 1e-9)


def trapezoid_axis(mask2d):
    """Return the axis (0: parallel sides horizontal, 1: vertical) along which ``mask2d`` is a digital
    trapezoid, or None.

    A digital trapezoid with horizontal parallel sides: the occupied rows are consecutive, each is one
    run, and the run starts and the run ends each lie on a digital straight line (the two legs), so
    the run lengths change linearly (their consecutive differences span at most 2).
    """
    mask2d = np.asarray(mask2d)
    for axis, m in ((0, mask2d), (1, mask2d.T)):
        rows = [runs(r) for r in m]
        occupied = [i for i, r in enumerate(rows) if r]
        if not occupied or occupied != list(range(occupied[0], occupied[-1] + 1)):
            continue
        if any(len(rows[i]) != 1 for i in occupied):
            continue
        starts = np.array([rows[i][0][0] for i in occupied])
        ends = np.array([rows[i][0][1] for i in occupied])
        dl = np.diff(ends - starts)
        if len(occupied) >= 3 and not (digital_line(starts) and digital_line(ends) and dl.max() - dl.min() <= 2):
            continue
        return axis
    return None


def test_trapezoid_checker_itself():
    sq = torch.zeros(8, 8, dtype=torch.bool)
    sq[2:6, 1:5] = True
    assert trapezoid_axis(sq) == 0
    tri = torch.zeros(8, 8, dtype=torch.bool)
    for r in range(6):
        tri[r, 3 - r // 2: 4 + r // 2] = True                           # a digital isosceles trapezoid
    assert trapezoid_axis(tri) == 0
    clipped = torch.zeros(8, 8, dtype=torch.bool)
    for r, start in enumerate([3, 2, 1, 0, 0, 0]):                     # left leg bent by the border
        clipped[r, start:6] = True
    assert trapezoid_axis(clipped) is None
    ell = torch.zeros(8, 8, dtype=torch.bool)
    ell[1:7, 1:3] = True
    ell[5:7, 1:7] = True                                               # an L: not convex
    assert trapezoid_axis(ell) is None
    assert digital_line([0, 0, 1, 1, 2, 2]) and not digital_line([0, 0, 0, 2])


# --------------------------------------------------------------------------- square
def test_square_area_shape_and_bounding_box():
    m = M.square(200, 28, 28, generator=gen(), device=CPU)
    assert m.shape == (200, 1, 28, 28) and m.dtype == torch.bool
    assert (m.sum(dim=(1, 2, 3)) == 14 * 14).all()
    for mk in m[:, 0]:
        r = mk.any(dim=1).nonzero().flatten()
        c = mk.any(dim=0).nonzero().flatten()
        # a 14x14 bounding box, completely filled: a square
        assert r[-1] - r[0] + 1 == 14 and c[-1] - c[0] + 1 == 14
        assert mk[r[0]:r[-1] + 1, c[0]:c[-1] + 1].all()


def test_square_positions_uniform_over_all_inside_positions():
    # 8x8 image, side 4: 5x5 = 25 possible top-left corners, all inside
    m = M.square(2500, 8, 8, side=4, generator=gen(1), device=CPU)[:, 0]
    tops = m.any(dim=2).float().argmax(dim=1)
    lefts = m.any(dim=1).float().argmax(dim=1)
    assert tops.max() <= 4 and lefts.max() <= 4
    counts = torch.bincount(tops * 5 + lefts, minlength=25)
    assert counts.numel() == 25
    # 100 expected per corner; binomial sd ~ 9.8, so 55..145 is a loose 4.5-sigma band
    assert counts.min() >= 55 and counts.max() <= 145, counts


def test_square_non_square_image_and_side_argument():
    m = M.square(50, 20, 40, side=7, generator=gen(), device=CPU)
    assert m.shape == (50, 1, 20, 40)
    assert (m.sum(dim=(1, 2, 3)) == 49).all()
    assert M.square(3, 9, 9, generator=gen(), device=CPU).sum(dim=(1, 2, 3)).eq(16).all()  # default 9//2


@pytest.mark.parametrize("side", [0, -1, 29])
def test_square_bad_side(side):
    with pytest.raises(ValueError, match=r"side must be in \[1, min\(height, width\)\] = \[1, 28\]"):
        M.square(2, 28, 28, side=side, generator=gen())


def test_bad_sizes():
    with pytest.raises(ValueError, match="height must be >= 1, got 0"):
        M.noise(2, 0, 5)
    with pytest.raises(TypeError, match="width must be an int"):
        M.square(2, 5, 5.0)


# --------------------------------------------------------------------------- noise
def test_noise_exact_count_and_uniform():
    m = M.noise(4000, 6, 5, generator=gen(2), device=CPU)
    assert m.shape == (4000, 1, 6, 5) and m.dtype == torch.bool
    assert (m.sum(dim=(1, 2, 3)) == round(0.75 * 30)).all()          # 22 (22.5 rounds to even)
    # every pixel is missing with probability 22/30 (binomial sd over 4000 draws ~ 0.007)
    freq = m.float().mean(dim=0)
    assert (freq - 22 / 30).abs().max() < 0.035
    for frac, k in ((0.0, 0), (1.0, 30), (0.5, 15)):
        assert (M.noise(3, 6, 5, fraction=frac, generator=gen(), device=CPU).sum(dim=(1, 2, 3)) == k).all()
    assert (M.noise(5, 28, 28, generator=gen(), device=CPU).sum(dim=(1, 2, 3)) == 588).all()
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        M.noise(1, 4, 4, fraction=1.5)


# --------------------------------------------------------------------------- trapezoid
@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (64, 64), (28, 40)])
def test_trapezoid_area_within_tolerance(hw):
    h, w = hw
    m = M.trapezoid(200, h, w, generator=gen(3), device=CPU)
    assert m.shape == (200, 1, h, w) and m.dtype == torch.bool
    area = m.sum(dim=(1, 2, 3)).double()
    assert ((area - h * w / 2).abs() <= 0.02 * h * w).all(), (area.min(), area.max())


def test_trapezoid_other_fraction_and_tight_tolerance():
    m = M.trapezoid(100, 32, 32, area_fraction=0.3, tolerance=0.005, generator=gen(4), device=CPU)
    area = m.sum(dim=(1, 2, 3)).double()
    assert ((area - 0.3 * 1024).abs() <= 0.005 * 1024).all()


def test_trapezoid_is_a_trapezoid_with_random_shapes():
    m = M.trapezoid(100, 28, 28, generator=gen(5), device=CPU)[:, 0].numpy()
    axes, longer_first, slopes = [], [], set()
    for mk in m:
        axis = trapezoid_axis(mk)
        assert axis is not None, "\n" + "\n".join("".join("#" if v else "." for v in r) for r in mk.tolist())
        axes.append(axis)
        mm = mk if axis == 0 else mk.T
        lengths = mm.sum(axis=1)
        lengths = lengths[lengths > 0]
        longer_first.append(bool(lengths[0] > lengths[-1]))
        slopes.add(int(lengths[-1] - lengths[0]))
    # random orientation: both axes, and both which parallel side is the longer one
    assert 20 < sum(axes) < 80
    assert 20 < sum(longer_first) < 80
    assert len(slopes) > 10                      # many different shapes, not one template


def test_trapezoid_bad_arguments():
    with pytest.raises(ValueError, match=r"area_fraction must be in \(0, 1\), got 1.0"):
        M.trapezoid(1, 28, 28, area_fraction=1.0)
    with pytest.raises(ValueError, match="too large for a trapezoid inside a 28x28 image"):
        M.trapezoid(1, 28, 28, area_fraction=0.99)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        M.trapezoid(1, 28, 28, tolerance=-0.1)


# --------------------------------------------------------------------------- reproducibility, dispatch
@pytest.mark.parametrize("kind", M.MASK_KINDS)
def test_reproducible_from_generator_and_seeds_differ(kind):
    a = M.make_masks(kind, 8, 28, 28, generator=gen(7), device=CPU)
    b = M.make_masks(kind, 8, 28, 28, generator=gen(7), device=CPU)
    c = M.make_masks(kind, 8, 28, 28, generator=gen(8), device=CPU)
    assert a.dtype == torch.bool and a.shape == (8, 1, 28, 28)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # masks within one call differ from each other
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 8))


def test_make_masks_passes_keywords_and_rejects_unknown_kind():
    m = M.make_masks("square", 2, 10, 10, side=3, generator=gen(), device=CPU)
    assert (m.sum(dim=(1, 2, 3)) == 9).all()
    m = M.make_masks("NOISE", 2, 10, 10, fraction=0.1, generator=gen(), device=CPU)
    assert (m.sum(dim=(1, 2, 3)) == 10).all()
    with pytest.raises(ValueError, match="unknown mask kind 'circle'; valid kinds: square, trapezoid, noise"):
        M.make_masks("circle", 2, 10, 10)


def test_default_device_and_zero_masks():
    m = M.square(2, 8, 8, generator=gen())
    assert m.device.type == resolve_device(None).type
    assert M.noise(0, 4, 4, generator=gen(), device=CPU).shape == (0, 1, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", M.MASK_KINDS)
def test_cpu_generator_gives_same_masks_on_cuda(kind):
    a = M.make_masks(kind, 6, 32, 32, generator=gen(9), device="cpu")
    b = M.make_masks(kind, 6, 32, 32, generator=gen(9), device="cuda")
    assert b.device.type == "cuda" and torch.equal(a, b.cpu())


# --------------------------------------------------------------------------- combine, check_mask
def test_combine_is_or_with_broadcasting():
    a = M.square(3, 6, 6, side=2, generator=gen(), device=CPU)              # (3,1,6,6)
    b = M.noise(3, 6, 6, fraction=0.3, generator=gen(1), device=CPU).expand(3, 2, 6, 6)
    out = M.combine(a, b)
    assert out.shape == (3, 2, 6, 6)
    for i in range(3):
        for c in range(2):
            for y in range(6):
                for x in range(6):
                    assert bool(out[i, c, y, x]) == (bool(a[i, 0, y, x]) or bool(b[i, c, y, x]))
    assert torch.equal(M.combine(a), a)


def test_combine_errors():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"masks\[1\] must be a bool tensor \(True = missing\), got torch.float32"):
        M.combine(a, torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"do not broadcast: \(2, 1, 4, 4\), \(3, 1, 4, 4\)"):
        M.combine(a, torch.zeros(3, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one mask"):
        M.combine()


def test_check_mask_messages_and_expansion():
    x = torch.rand(2, 3, 5, 5)
    with pytest.raises(TypeError, match=r"^missing must be a bool tensor \(True = missing\), got torch.float32$"):
        M.check_mask(torch.zeros(2, 1, 5, 5))
    with pytest.raises(TypeError, match=r"hidden must be a bool tensor \(True = missing\), got torch.int64"):
        M.check_mask(torch.zeros(2, 1, 5, 5, dtype=torch.long), name="hidden")
    with pytest.raises(ValueError, match=r"missing must be 4-D \(B, 1 or C, H, W\), got shape \(1, 5, 5\)"):
        M.check_mask(torch.zeros(1, 5, 5, dtype=torch.bool))
    for bad in [(3, 1, 5, 5), (2, 2, 5, 5), (2, 1, 5, 4)]:
        with pytest.raises(ValueError, match=r"does not match the images' \(2, 3, 5, 5\): need \(2, 1 or 3, 5, 5\)"):
            M.check_mask(torch.zeros(*bad, dtype=torch.bool), like=x)
    m = torch.rand(2, 1, 5, 5) < 0.5
    e = M.check_mask(m, like=x)
    assert e.shape == (2, 3, 5, 5) and all(torch.equal(e[:, c], m[:, 0]) for c in range(3))
    full = torch.rand(2, 3, 5, 5) < 0.5
    assert torch.equal(M.check_mask(full, like=x), full)
    assert M.check_mask(m) is m


# --------------------------------------------------------------------------- training on incomplete data
def test_training_pair_semantics():
    g = gen(11)
    missing = M.noise(4, 12, 12, fraction=0.3, generator=g, device=CPU)
    out_missing, hidden = M.training_pair(missing, generator=gen(12))
    assert out_missing is missing
    assert hidden.shape == (4, 1, 12, 12) and hidden.dtype == torch.bool
    assert (hidden.sum(dim=(1, 2, 3)) == 36).all()                      # a square of 1/4 of the image
    sup, vis = M.supervised(missing, hidden), M.visible(missing, hidden)
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in (4, 1, 12, 12))).tolist():
        i = tuple(idx)
        mis, hid = bool(missing[i]), bool(hidden[i])
        assert bool(sup[i]) == (hid and not mis)                       # loss: hidden but truly observed
        assert bool(vis[i]) == (not mis and not hid)                   # input: neither
    # every pixel is exactly one of: visible, supervised, truly missing
    assert torch.equal(vis.int() + sup.int() + missing.int(), torch.ones_like(vis, dtype=torch.int))
    # reproducible; other kinds and their keywords pass through
    assert torch.equal(M.training_pair(missing, generator=gen(12))[1], hidden)
    _, h2 = M.training_pair(missing, hidden_kind="noise", fraction=0.5, generator=gen())
    assert (h2.sum(dim=(1, 2, 3)) == 72).all()


def test_training_pair_multichannel_missing_and_errors():
    missing = torch.rand(2, 3, 8, 8, generator=gen()) < 0.2
    _, hidden = M.training_pair(missing, generator=gen())
    assert hidden.shape == (2, 1, 8, 8)
    assert M.supervised(missing, hidden).shape == (2, 3, 8, 8)
    with pytest.raises(TypeError, match="missing must be a bool tensor"):
        M.training_pair(missing.float())
    with pytest.raises(TypeError, match="hidden must be a bool tensor"):
        M.visible(missing, hidden.float())


def test_ink_hidden_by_hand():
    from labkit.masks import ink_hidden

    images = torch.zeros(3, 1, 8, 8)
    images[0, 0, 0, :4] = 1.0            # 4 ink pixels, 1 hidden
    images[1, 0, 2:6, 2:6] = 0.9         # 16 ink pixels (the centre), all hidden
    missing = torch.zeros(3, 1, 8, 8, dtype=torch.bool)   # image 2 has no ink: skipped
    missing[0, 0, 0, 0] = True
    missing[1, 0, 2:6, 2:6] = True
    r = ink_hidden(images, missing, centre=4)
    assert r["ink_hidden"] == pytest.approx((0.25 + 1.0) / 2)
    assert r["most_ink_lost"] == pytest.approx(0.5)
    assert r["centre_hidden"] == pytest.approx((0 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="bool missing"):
        ink_hidden(images, missing.float())
