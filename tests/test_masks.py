"""labkit.masks: areas, shapes (a square is a square, a trapezoid a half-plane), reproducibility, errors."""
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


@pytest.mark.parametrize("hw", [(5, 5), (7, 7), (3, 7), (29, 29)])
def test_noise_count_rounds_to_nearest_where_truncation_differs(hw):
    # H·W ≡ 1 (mod 4): 3/4·H·W has fraction .75, so round() and int() disagree (18.75 -> 19, not 18)
    h, w = hw
    want = round(0.75 * h * w)
    assert want != int(0.75 * h * w)
    m = M.noise(50, h, w, generator=gen(4), device=CPU)
    assert (m.sum(dim=(1, 2, 3)) == want).all()


# --------------------------------------------------------------------------- trapezoid (the paper's: a half-plane)
# The checks below use only integer geometry on doubled pixel-centre coordinates (2i+1, 2j+1), the
# image centre being (H, W): nothing is shared with the generator's code.
def centred_coords(h, w):
    """Doubled pixel-centre offsets from the image centre, int64 ``(h*w, 2)`` (row, column)."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([2 * i + 1 - h, 2 * j + 1 - w], -1).reshape(-1, 2).astype(np.int64)


def split_by_line_through_centre(mask2d) -> bool:
    """Whether some straight line through the image centre has every missing pixel centre on one
    (closed) side and every observed one on the other.

    If such a line exists it can be turned about the centre until it meets a pixel centre while
    still separating, so it suffices to try the lines through the centre and each pixel centre
    (exact integer cross products; pixels on the line may be on either side).
    """
    mask2d = np.asarray(mask2d)
    h, w = mask2d.shape
    p = centred_coords(h, w)
    miss = mask2d.reshape(-1)
    cand = p[(p != 0).any(1)]                                           # directions of candidate lines
    cross = cand[:, None, 0] * p[None, :, 1] - cand[:, None, 1] * p[None, :, 0]   # (lines, pixels)
    for s in (cross, -cross):
        ok = (s[:, miss] >= 0).all(1) & (s[:, ~miss] <= 0).all(1)
        if ok.any():
            return True
    return False


def lattice_convex(mask2d, pairs=None, rng=None) -> bool:
    """Every pixel whose centre lies on a segment between two True pixel centres is True.

    ``pairs``: how many random pairs to try (None: all pairs). The pixels on the segment from p to
    q are p + k (q − p)/g, k = 0..g, g = gcd of the coordinate differences.
    """
    mask2d = np.asarray(mask2d)
    pts = np.argwhere(mask2d)
    if len(pts) < 2:
        return True
    if pairs is None:
        a, b = np.triu_indices(len(pts), k=1)
    else:
        a, b = rng.integers(0, len(pts), size=(2, pairs))
    p, q = pts[a], pts[b]
    d = q - p
    g = np.gcd(np.abs(d[:, 0]), np.abs(d[:, 1]))
    keep = g > 1                                                        # g <= 1: no pixel in between
    p, d, g = p[keep], d[keep], g[keep]
    for k in range(1, int(g.max(initial=1))):
        sel = k < g
        r = p[sel] + k * d[sel] // g[sel, None]
        if not mask2d[r[:, 0], r[:, 1]].all():
            return False
    return True


def fully_missing_border(mask2d):
    """The borders that are entirely missing: subset of {"top", "bottom", "left", "right"}."""
    return {name for name, line in (("top", mask2d[0]), ("bottom", mask2d[-1]), ("left", mask2d[:, 0]),
                                    ("right", mask2d[:, -1])) if line.all()}


def crossed_borders(mask2d):
    """The pairs of opposite borders on both of which the missing set and the observed set have pixels."""
    m = np.asarray(mask2d)
    out = []
    for name, a, b in (("left/right", m[:, 0], m[:, -1]), ("top/bottom", m[0], m[-1])):
        if a.any() and b.any() and (~a).any() and (~b).any():
            out.append(name)
    return out


def test_geometry_checkers_themselves():
    half = np.zeros((6, 8), dtype=bool)
    half[:3] = True
    assert split_by_line_through_centre(half) and lattice_convex(half) and lattice_convex(~half)
    off_centre = np.zeros((6, 8), dtype=bool)
    off_centre[:2] = True                                               # a half-plane, but not through the centre
    assert not split_by_line_through_centre(off_centre) and lattice_convex(off_centre)
    diag = np.array([[1, 0], [0, 1]], dtype=bool)                       # both sets convex, not separable
    assert lattice_convex(diag) and lattice_convex(~diag) and not split_by_line_through_centre(diag)
    notch = half.copy()
    notch[1, 3] = False                                                 # a hole inside the missing half
    assert not lattice_convex(notch) and not split_by_line_through_centre(notch)
    assert crossed_borders(np.tri(6, 6, dtype=bool)) == []              # the diagonal: a triangle, no trapezoid
    assert crossed_borders(half.T.copy()) == ["top/bottom"] and fully_missing_border(~half.T) == {"right"}
    assert crossed_borders(half) == ["left/right"] and fully_missing_border(half) == {"top"}


SIZES = [(28, 28), (32, 32), (27, 27), (28, 40), (15, 9), (7, 3), (2, 2), (2, 5)]


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_trapezoid_hides_half_of_the_image(hw):
    h, w = hw
    m = M.trapezoid(500, h, w, generator=gen(3), device=CPU)
    assert m.shape == (500, 1, h, w) and m.dtype == torch.bool
    area = m.sum(dim=(1, 2, 3))
    assert ((area.double() - h * w / 2).abs() <= 0.02 * h * w + 0.5).all(), (area.min(), area.max())
    # and in fact exactly half, rounded one way or the other (the two halves are point reflections)
    assert ((area == h * w // 2) | (area == (h * w + 1) // 2)).all()


@pytest.mark.parametrize("hw", [(28, 28), (12, 12), (13, 11), (9, 16), (2, 3)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_trapezoid_is_one_side_of_a_line_through_the_centre(hw):
    h, w = hw
    n = 40 if h * w > 300 else 150
    m = M.trapezoid(n, h, w, generator=gen(5), device=CPU)[:, 0].numpy()
    rng = np.random.default_rng(0)
    pairs = 20_000 if h * w > 300 else None
    for mk in m:
        picture = "\n" + "\n".join("".join("#" if v else "." for v in r) for r in mk.tolist())
        assert split_by_line_through_centre(mk), picture
        assert lattice_convex(mk, pairs, rng) and lattice_convex(~mk, pairs, rng), picture
        # the point reflection about the centre maps the missing half onto the observed one
        # (an odd-by-odd image's centre pixel is its own mirror image)
        mirrored = mk[::-1, ::-1]
        differ = mirrored == mk
        if h % 2 and w % 2:
            assert differ.sum() == 1 and differ[h // 2, w // 2]
        else:
            assert not differ.any(), picture
        # its parallel sides lie on two opposite borders: both halves reach both of them
        assert len(crossed_borders(mk)) == 1, picture
        assert len(fully_missing_border(mk)) == 1, picture


def test_trapezoid_orientations_and_angles_are_random():
    h, w = 28, 28
    m = M.trapezoid(800, h, w, generator=gen(6), device=CPU)[:, 0].numpy()
    sides = [fully_missing_border(mk).pop() for mk in m]
    counts = {s: sides.count(s) for s in ("top", "bottom", "left", "right")}
    # each of the 4 (axis pair, side) combinations has probability 1/4: 200 expected, sd ~ 12
    assert all(140 < c < 260 for c in counts.values()), counts
    # the angle is spread over [-45°, 45°]: for a missing top half, the share of the left column
    # that is missing runs from about 0 (line through the top-left corner) to about 1
    left_share = np.array([mk[:, 0].mean() for mk, s in zip(m, sides) if s == "top"])
    assert left_share.min() < 0.15 and left_share.max() > 0.85
    assert np.histogram(left_share, bins=4, range=(0, 1))[0].min() > 20
    assert len({mk.tobytes() for mk in m}) > 300                         # many different lines


def test_trapezoid_bad_arguments():
    with pytest.raises(ValueError, match="height must be >= 2 for a trapezoid"):
        M.trapezoid(1, 1, 28)
    with pytest.raises(ValueError, match="width must be >= 2 for a trapezoid"):
        M.trapezoid(1, 28, 1)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        M.trapezoid(-1, 28, 28)
    with pytest.raises(TypeError, match="height must be an int"):
        M.trapezoid(1, 28.0, 28)
    with pytest.raises(TypeError, match="unexpected keyword argument 'area_fraction'"):
        M.trapezoid(1, 28, 28, area_fraction=0.5)


def centred_blobs(n, size=28, seed=0):
    """Synthetic "digits": rings of radius 2.5..6 px around the centre, shifted by up to 2 px."""
    g = torch.Generator().manual_seed(seed)
    off = (torch.rand(n, 2, generator=g) - 0.5) * 4
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    r = ((yy - size / 2 - off[:, 0, None, None]) ** 2 + (xx - size / 2 - off[:, 1, None, None]) ** 2).sqrt()
    return ((r > 2.5) & (r < 6)).float()[:, None]


def test_trapezoid_hides_about_half_of_a_centred_digit_and_the_inside_one_most():
    images = centred_blobs(400)
    half = M.ink_hidden(images, M.make_masks("trapezoid", 400, 28, 28, generator=gen(1), device=CPU))
    inside = M.ink_hidden(images, M.make_masks("trapezoid_inside", 400, 28, 28, generator=gen(1), device=CPU))
    assert 0.45 < half["ink_hidden"] < 0.55 and half["most_ink_lost"] < 0.05
    assert inside["ink_hidden"] > 0.8 and inside["most_ink_lost"] > 0.7
    assert half["centre_hidden"] == pytest.approx(0.5)                   # a line through the centre halves it


# --------------------------------------------------------------------------- trapezoid_inside (earlier reading)
@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (64, 64), (28, 40)])
def test_trapezoid_inside_area_within_tolerance(hw):
    h, w = hw
    m = M.trapezoid_inside(200, h, w, generator=gen(3), device=CPU)
    assert m.shape == (200, 1, h, w) and m.dtype == torch.bool
    area = m.sum(dim=(1, 2, 3)).double()
    assert ((area - h * w / 2).abs() <= 0.02 * h * w).all(), (area.min(), area.max())


def test_trapezoid_inside_other_fraction_and_tight_tolerance():
    m = M.trapezoid_inside(100, 32, 32, area_fraction=0.3, tolerance=0.005, generator=gen(4), device=CPU)
    area = m.sum(dim=(1, 2, 3)).double()
    assert ((area - 0.3 * 1024).abs() <= 0.005 * 1024).all()


def test_trapezoid_inside_is_a_trapezoid_with_random_shapes():
    m = M.trapezoid_inside(100, 28, 28, generator=gen(5), device=CPU)[:, 0].numpy()
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


def test_trapezoid_inside_bad_arguments():
    with pytest.raises(ValueError, match=r"area_fraction must be in \(0, 1\), got 1.0"):
        M.trapezoid_inside(1, 28, 28, area_fraction=1.0)
    with pytest.raises(ValueError, match="too large for a trapezoid inside a 28x28 image"):
        M.trapezoid_inside(1, 28, 28, area_fraction=0.99)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        M.trapezoid_inside(1, 28, 28, tolerance=-0.1)


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
    with pytest.raises(ValueError, match="unknown mask kind 'circle'; valid kinds: square, trapezoid, noise, "
                                         "trapezoid_inside"):
        M.make_masks("circle", 2, 10, 10)
    m = M.make_masks("Trapezoid_Inside", 2, 28, 28, area_fraction=0.3, generator=gen(), device=CPU)
    assert ((m.sum(dim=(1, 2, 3)).double() - 0.3 * 784).abs() <= 0.02 * 784).all()
    assert M.DEFAULT_MASK_KINDS == ("square", "trapezoid", "noise")
    assert M.MASK_KINDS == M.DEFAULT_MASK_KINDS + ("trapezoid_inside",)


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
