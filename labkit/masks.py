"""Missing-data masks: bool tensors, ``True`` = missing, shape ``(n, 1, H, W)`` (same for all channels).

The three kinds of the MisConv paper's classification experiments (Przewięźlikowski et al., *MisConv:
Convolutional Neural Networks for Missing Data*, arXiv:2110.14010, Table 1) are ``DEFAULT_MASK_KINDS``.
Generators (all ``(n, height, width, *, generator=None, device=None)``, reproducible from the
``torch.Generator``: the same seed gives the same masks):

- :func:`square`      a ``side x side`` square (default ``height // 2``: 1/4 of a square image),
                      uniformly random position, fully inside the image.
- :func:`trapezoid`   half of the image: a random straight line through the image centre, crossing
                      two opposite borders, cuts it into two trapezoids of equal area whose parallel
                      sides lie on those borders; one of the two, chosen at random, is missing.
- :func:`noise`       exactly ``round(fraction * H * W)`` pixels, chosen uniformly.
- :func:`trapezoid_inside`  an earlier reading of the paper's trapezoid (half the area, lying inside
                      the image, so covering its centre); kept for comparison, not in the default grid.

Random numbers are drawn on the generator's device (on ``device`` with the global RNG when no generator
is given), so a CPU generator gives the same masks whatever ``device`` they are put on.
``device=None`` means :func:`labkit.device.resolve_device` (CUDA when available).

Also: :func:`make_masks` (by name), :func:`combine` (logical OR), :func:`training_pair` /
:func:`supervised` / :func:`visible` (the two named masks for training on incomplete data),
:func:`check_mask` (the validation every module uses for its ``missing`` arguments),
:func:`check_observed_finite` (NaN/inf allowed at missing pixels only) and
:func:`ink_hidden` (how much of a digit a set of masks hides).
"""
from __future__ import annotations

import math

import torch

from labkit.device import resolve_device

__all__ = [
    "MASK_KINDS",
    "square",
    "DEFAULT_MASK_KINDS",
    "trapezoid",
    "trapezoid_inside",
    "noise",
    "make_masks",
    "combine",
    "training_pair",
    "supervised",
    "visible",
    "check_mask",
    "check_observed_finite",
    "with_nan",
    "ink_hidden",
]

#: the three kinds of the paper's Table 1
DEFAULT_MASK_KINDS = ("square", "trapezoid", "noise")
#: every kind :func:`make_masks` knows
MASK_KINDS = DEFAULT_MASK_KINDS + ("trapezoid_inside",)


# --------------------------------------------------------------------------- helpers
def _check_size(n, height, width) -> None:
    for name, v, least in (("n", n, 0), ("height", height, 1), ("width", width, 1)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
        if v < least:
            raise ValueError(f"{name} must be >= {least}, got {v}")


def _rand(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved to ``device``.

    Drawing where the generator lives keeps the stream (and so the masks) identical whatever
    device the masks end up on.
    """
    draw_on = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


# --------------------------------------------------------------------------- generators
def square(n: int, height: int, width: int, *, side: int | None = None,
           generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``n`` masks, each a ``side x side`` square at a uniformly random position fully inside.

    ``side`` defaults to ``height // 2`` (a quarter of the area of a square image, e.g. 14x14 on
    28x28). Returns bool ``(n, 1, height, width)``; every mask has exactly ``side**2`` True pixels.
    """
    _check_size(n, height, width)
    if side is None:
        side = height // 2
    if isinstance(side, bool) or not isinstance(side, int):
        raise TypeError(f"side must be an int, got {type(side).__name__} ({side!r})")
    if side < 1 or side > min(height, width):
        raise ValueError(f"side must be in [1, min(height, width)] = [1, {min(height, width)}], got {side}")
    device = resolve_device(device)
    u = _rand((n, 2), generator, device, torch.float64)
    # top/left uniform over the height-side+1 (width-side+1) positions that keep it inside
    top = (u[:, 0] * (height - side + 1)).floor().long().clamp_max(height - side)
    left = (u[:, 1] * (width - side + 1)).floor().long().clamp_max(width - side)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)          # (n, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)        # (n, W)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def noise(n: int, height: int, width: int, *, fraction: float = 0.75,
          generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``n`` masks with exactly ``round(fraction * height * width)`` missing pixels, chosen uniformly.

    Returns bool ``(n, 1, height, width)`` (the same pixels are missing in every channel).
    """
    _check_size(n, height, width)
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    device = resolve_device(device)
    hw = height * width
    k = round(fraction * hw)
    # the k pixels with the smallest uniform keys: a uniformly random k-subset
    order = _rand((n, hw), generator, device).argsort(dim=1)[:, :k]
    flat = torch.zeros(n, hw, dtype=torch.bool, device=device)
    flat.scatter_(1, order, True)
    return flat.view(n, 1, height, width)


def trapezoid(n: int, height: int, width: int, *, generator: torch.Generator | None = None,
              device=None) -> torch.Tensor:
    """``n`` masks, each hiding one half of the image cut by a random straight line through its centre.

    The paper's "trapezoid covering half of the image": a line through the centre of a rectangle
    that crosses two opposite borders cuts it into two congruent trapezoids (the point reflection
    about the centre maps one onto the other) whose parallel sides lie on those two borders; one
    of them, chosen at random, is missing. Per mask, three uniform draws choose

    - the pair of borders the line crosses: left/right (a "horizontal" line) or top/bottom;
    - its angle θ, uniform in [-45°, 45°] from that axis. The slope is measured in units of the
      pixel-centre grid, ``(H-1)`` by ``(W-1)``: the line joins the points ``(x, y) = (½,
      ½H − s)`` and ``(W − ½, ½H + s)`` with ``s = tan θ·(H−1)/2`` (a horizontal line; a vertical
      one likewise). For a square image this is the geometric angle; for any image it keeps the
      line between the first and last pixel centres of both borders it crosses, so each half
      owns pixels on both of them;
    - which side is missing.

    A pixel belongs to the side its centre lies on. Pixel centres exactly on the line (the centre
    pixel of an odd-by-odd image, and pixels on a line at exactly 0° or ±45°) are split by a tie
    rule that the point reflection exchanges: the along-the-line coordinate decides, and the centre
    pixel goes with the missing side when the "positive" side is missing. The reflection maps
    pixel ``(i, j)`` to ``(H−1−i, W−1−j)`` and negates the (exactly computed) side value, so the
    two halves have exactly ``⌊HW/2⌋`` and ``⌈HW/2⌉`` pixels, and each half is digitally convex
    (lexicographic half-plane).

    Args:
        n: number of masks (≥ 0); height, width: image size, both ≥ 2.
        generator: the random stream (3 uniforms per mask, drawn on its device).
        device: where the masks are put (None: :func:`labkit.device.resolve_device`).

    Returns:
        bool ``(n, 1, height, width)``, each with ``⌊HW/2⌋`` or ``⌈HW/2⌉`` True pixels.
    """
    _check_size(n, height, width)
    for name, v in (("height", height), ("width", width)):
        if v < 2:
            raise ValueError(f"{name} must be >= 2 for a trapezoid (a line must cut the image), got {v}")
    device = resolve_device(device)
    u = _rand((n, 3), generator, device, torch.float64)
    vertical = (u[:, 0] < 0.5)[:, None, None]                                # crosses top/bottom
    t = torch.tan((u[:, 1] - 0.5) * (math.pi / 2))[:, None, None]          # tan θ, θ in [-45°, 45°]
    sign = torch.where(u[:, 2] < 0.5, 1.0, -1.0).to(torch.float64)[:, None, None]
    # Pixel-centre offsets from the image centre, doubled so they are integers: 2i+1−H, 2j+1−W.
    dy = (2 * torch.arange(height, device=device, dtype=torch.float64) + 1 - height)[None, :, None]
    dx = (2 * torch.arange(width, device=device, dtype=torch.float64) + 1 - width)[None, None, :]
    # Side of the line, scaled by 2(H−1)(W−1) > 0. Horizontal line: dy/(H−1) − t·dx/(W−1).
    # The integer products are exact and t·(−k) = −(t·k), so the reflection negates it exactly.
    side = torch.where(vertical, (height - 1) * dx - t * ((width - 1) * dy), (width - 1) * dy - t * ((height - 1) * dx))
    along = torch.where(vertical, dy, dx).expand_as(side)                   # coordinate along the line
    key = torch.where(side != 0, side, torch.where(along != 0, along, torch.ones_like(along)))
    return (sign * key > 0)[:, None]


def _trapezoid_params(m, height, width, area, margin, u):
    """Shape parameters of ``m`` trapezoids from uniforms ``u`` (m, 7), float64.

    Frame: an "along" axis of length U (perpendicular to the parallel sides) and an "across" axis of
    length V (the parallel sides' direction). axis 0: parallel sides horizontal (U=H, V=W);
    axis 1: vertical (U=W, V=H). The trapezoid occupies the R whole rows y0..y0+R-1 of the frame;
    its two parallel sides have lengths l0, l1 (mean ``area / R``) centred at c0, c1.
    """
    axis = (u[:, 0] < 0.5).long()
    U = torch.where(axis == 0, torch.full_like(u[:, 0], height), torch.full_like(u[:, 0], width))
    V = torch.where(axis == 0, torch.full_like(u[:, 0], width), torch.full_like(u[:, 0], height))
    hi_len = V - 2 * margin                                   # room to grow during the area fix
    r_min = torch.ceil(area / hi_len)
    r_max = torch.minimum(U, torch.floor(torch.full_like(U, area)))
    R = (r_min + torch.floor(u[:, 1] * (r_max - r_min + 1))).clamp(r_min, r_max)
    mean_len = area / R
    lo_len = torch.minimum(mean_len, torch.clamp(0.1 * V, min=1.0))
    # l0 + l1 = 2 mean_len with both in [lo_len, hi_len]; symmetric in l0 <-> l1, so which side is
    # the longer one is random: with the 2 axes that makes the 4 orientations
    l0_lo = torch.maximum(lo_len, 2 * mean_len - hi_len)
    l0_hi = torch.minimum(hi_len, 2 * mean_len - lo_len)
    l0 = l0_lo + u[:, 2] * (l0_hi - l0_lo)
    l1 = 2 * mean_len - l0
    # centres keep each side (and so, by convexity, the whole trapezoid) `margin` inside
    c0 = margin + l0 / 2 + u[:, 3] * (V - 2 * margin - l0)
    c1 = margin + l1 / 2 + u[:, 4] * (V - 2 * margin - l1)
    y0 = torch.floor(u[:, 5] * (U - R + 1)).clamp(torch.zeros_like(U), U - R)
    return axis, U, V, R, y0, l0, l1, c0, c1


def _trapezoid_runs(R, y0, l0, l1, c0, c1, scale, length):
    """Per frame row ``a`` in [0, length): run [start, end) of the scaled trapezoid (m, length).

    Row k = a - y0 of the trapezoid has its centre line at t = (k + 1/2) / R between the two parallel
    sides; its width ``scale * (l0 + (l1 - l0) t)`` and centre ``c0 + (c1 - c0) t`` are linear in
    t. A pixel j is inside when its centre j + 1/2 lies in [centre - width/2, centre + width/2).
    """
    a = torch.arange(length, device=R.device, dtype=R.dtype)
    k = a[None, :] - y0[:, None]
    valid = (k >= 0) & (k < R[:, None])
    t = (k + 0.5) / R[:, None]
    half = 0.5 * scale[:, None] * (l0[:, None] + (l1 - l0)[:, None] * t)
    centre = c0[:, None] + (c1 - c0)[:, None] * t
    start = torch.ceil(centre - half - 0.5)
    end = torch.ceil(centre + half - 0.5)
    end = torch.maximum(end, start)
    zero = torch.zeros_like(start)
    return torch.where(valid, start, zero), torch.where(valid, end, zero), valid


def trapezoid_inside(n: int, height: int, width: int, *, area_fraction: float = 0.5, tolerance: float = 0.02,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``n`` trapezoid masks covering ``area_fraction`` of the image, fully inside it.

    An earlier reading of the paper's "trapezoid", kept for comparison (``"trapezoid_inside"`` in
    :data:`MASK_KINDS`): lying inside the image, it covers the centre and hides most of a centred
    digit (about 84 % of an MNIST digit's ink), far more than the paper's accuracies allow; the
    paper's mask is :func:`trapezoid`. This generator draws:
    the axis of the parallel sides (horizontal or vertical), the number R of whole pixel rows it
    spans, the two parallel sides' lengths (random, mean ``area / R``, so the analytic area is the
    target) and their centres (random: the trapezoid is generally skewed), and its offset along the
    axis. It is rasterised by pixel centres (each row/column along the axis is one contiguous run
    whose ends follow two straight edges), then both parallel sides are scaled about their centres
    by a common factor, found by bisection, so the pixel count matches the target. Every mask
    satisfies ``|count - area_fraction*H*W| <= tolerance*H*W`` (masks that would not are redrawn).

    Returns bool ``(n, 1, height, width)``.
    """
    _check_size(n, height, width)
    area_fraction, tolerance = float(area_fraction), float(tolerance)
    if not 0.0 < area_fraction < 1.0:
        raise ValueError(f"area_fraction must be in (0, 1), got {area_fraction}")
    if not tolerance >= 0.0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    device = resolve_device(device)
    hw = height * width
    area = area_fraction * hw
    if area < 1:
        raise ValueError(f"area_fraction={area_fraction} gives less than one pixel of a {height}x{width} image")
    margin = 1.0 if min(height, width) >= 8 else 0.0
    # the widest the trapezoid may be across is V - 2 margin; it spans at most U rows
    for U, V in ((height, width), (width, height)):
        if V - 2 * margin <= 0 or area > U * (V - 2 * margin):
            raise ValueError(f"area_fraction={area_fraction} is too large for a trapezoid inside a "
                             f"{height}x{width} image (at most {U * (V - 2 * margin) / hw:.3f})")
    L = max(height, width)
    ii = torch.arange(height, device=device)[None, :, None]
    jj = torch.arange(width, device=device)[None, None, :]
    out = torch.zeros(n, height, width, dtype=torch.bool, device=device)
    todo = torch.arange(n, device=device)
    for _attempt in range(100):
        if todo.numel() == 0:
            break
        m = todo.numel()
        u = _rand((m, 7), generator, device, torch.float64)
        axis, U, V, R, y0, l0, l1, c0, c1 = _trapezoid_params(m, height, width, area, margin, u)
        # the largest scale keeping both parallel sides (hence the trapezoid) inside [0, V)
        s_max = torch.minimum(torch.minimum(c0, V - c0) / (l0 / 2), torch.minimum(c1, V - c1) / (l1 / 2))
        lo = torch.zeros_like(s_max)
        hi = s_max

        def count(scale):
            start, end, _ = _trapezoid_runs(R, y0, l0, l1, c0, c1, scale, L)
            return (end - start).sum(dim=1)

        # the count is non-decreasing in the scale (each row's run grows nested): bisect for the
        # smallest scale reaching the target; 50 halvings resolve any two distinct run boundaries
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            reach = count(mid) >= area
            lo = torch.where(reach, lo, mid)
            hi = torch.where(reach, mid, hi)
        c_lo, c_hi = count(lo), count(hi)
        scale = torch.where((area - c_lo).abs() < (c_hi - area).abs(), lo, hi)
        start, end, valid = _trapezoid_runs(R, y0, l0, l1, c0, c1, scale, L)
        # rows run along image rows (axis 0) or image columns (axis 1)
        rows_h = valid[:, :height, None] & (jj >= start[:, :height, None]) & (jj < end[:, :height, None])
        rows_v = valid[:, None, :width] & (ii >= start[:, None, :width]) & (ii < end[:, None, :width])
        masks = torch.where((axis == 0)[:, None, None], rows_h, rows_v)
        ok = (masks.sum(dim=(1, 2)).double() - area).abs() <= tolerance * hw
        out[todo[ok]] = masks[ok]
        todo = todo[~ok]
    if todo.numel():
        raise RuntimeError(f"trapezoid_inside: could not meet tolerance={tolerance} for {todo.numel()} masks of "
                           f"{height}x{width} after 100 draws; use a larger tolerance")
    return out[:, None]


# --------------------------------------------------------------------------- by name, combining
def make_masks(kind: str, n: int, height: int, width: int, *, generator: torch.Generator | None = None,
               device=None, **kw) -> torch.Tensor:
    """Dispatch to :func:`square`, :func:`trapezoid`, :func:`noise` or :func:`trapezoid_inside` by name
    (see ``MASK_KINDS``; case-insensitive).

    Extra keyword arguments go to the generator (``side``, ``area_fraction``, ``fraction``, ...).
    Returns bool ``(n, 1, height, width)``.
    """
    fns = {"square": square, "trapezoid": trapezoid, "noise": noise, "trapezoid_inside": trapezoid_inside}
    if not isinstance(kind, str) or kind.lower() not in fns:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {', '.join(MASK_KINDS)}")
    return fns[kind.lower()](n, height, width, generator=generator, device=device, **kw)


def combine(*masks: torch.Tensor) -> torch.Tensor:
    """Logical OR of bool masks of broadcastable shapes (a pixel is missing if any mask says so)."""
    if not masks:
        raise ValueError("combine needs at least one mask")
    for i, mk in enumerate(masks):
        if not isinstance(mk, torch.Tensor):
            raise TypeError(f"masks[{i}] must be a torch.Tensor, got {type(mk).__name__}")
        if mk.dtype != torch.bool:
            raise TypeError(f"masks[{i}] must be a bool tensor (True = missing), got {mk.dtype}")
    try:
        torch.broadcast_shapes(*(mk.shape for mk in masks))
    except RuntimeError as e:
        shapes = ", ".join(str(tuple(mk.shape)) for mk in masks)
        raise ValueError(f"masks have shapes that do not broadcast: {shapes}") from e
    out = masks[0]
    for mk in masks[1:]:
        out = out | mk
    return out


# --------------------------------------------------------------------------- training on incomplete data
def training_pair(missing: torch.Tensor, *, hidden_kind: str = "square",
                  generator: torch.Generator | None = None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The two named masks for training an inpainter (DMFA) on incomplete data.

    Each training image has a truly missing region ``missing`` (bool ``(B, 1, H, W)`` or
    ``(B, C, H, W)``): its pixels are never seen and never supervised. On top of it we hide an extra
    region ``hidden`` (bool ``(B, 1, H, W)``, drawn with :func:`make_masks`; by default a square of
    side H//2, i.e. 1/4 of the image). Then:

    - model input: the pixels that are neither, ``visible(missing, hidden) = ~(missing | hidden)``;
    - loss: the NLL on ``supervised(missing, hidden) = hidden & ~missing`` only.

    ``hidden`` is drawn independently of ``missing``, so it may overlap it (those pixels are simply
    unsupervised; an image whose hidden region lies inside its missing one contributes no loss).
    Extra keyword arguments go to the hidden mask's generator. Returns ``(missing, hidden)``; the
    first is the input tensor itself.
    """
    missing = check_mask(missing, name="missing")
    b, _, h, w = missing.shape
    hidden = make_masks(hidden_kind, b, h, w, generator=generator, device=missing.device, **kw)
    return missing, hidden


def _check_pair(missing, hidden) -> None:
    check_mask(missing, name="missing")
    check_mask(hidden, name="hidden")
    combine(missing, hidden)  # raises ValueError unless the shapes broadcast


def supervised(missing: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Pixels the loss sees: hidden from the model but truly observed, ``hidden & ~missing``."""
    _check_pair(missing, hidden)
    return hidden & ~missing


def visible(missing: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Pixels the model sees: ``~(missing | hidden)``."""
    _check_pair(missing, hidden)
    return ~(missing | hidden)


# --------------------------------------------------------------------------- validation
def check_mask(mask, *, name: str = "missing", like: torch.Tensor | None = None) -> torch.Tensor:
    """Validate a mask; return it, expanded to ``like.shape`` ``(B, C, H, W)`` when ``like`` is given.

    Raises TypeError unless ``mask`` is a bool tensor (True = missing), ValueError unless it is 4-D
    ``(B, 1 or C, H, W)`` matching ``like`` in batch and spatial size (and device).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor (True = missing), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = missing), got {mask.dtype}")
    if mask.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, 1 or C, H, W), got shape {tuple(mask.shape)}")
    if like is None:
        return mask
    if like.dim() != 4:
        raise ValueError(f"the images must be 4-D (B, C, H, W), got shape {tuple(like.shape)}")
    b, c, h, w = like.shape
    mb, mc, mh, mw = mask.shape
    if mb != b or (mh, mw) != (h, w) or mc not in (1, c):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, which does not match the images' "
                         f"{tuple(like.shape)}: need ({b}, 1 or {c}, {h}, {w})")
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but the images are on {like.device}")
    return mask.expand(b, c, h, w)


def check_observed_finite(x: torch.Tensor, missing: torch.Tensor | None, *, name: str = "x") -> None:
    """Raise ValueError unless ``x`` is finite at every observed pixel.

    Values at missing pixels carry no information and may be anything, NaN included; an observed
    NaN or inf would flow silently into every output it touches, so the models refuse it here.

    Args:
        x: ``(B, C, H, W)`` float tensor (already shape-checked by the caller).
        missing: bool, broadcastable to ``x`` (``(B, 1 or C, H, W)``), True = missing; ``None``
            means every pixel is observed.
        name: the argument's name in the message.

    Cost: one masked sum over ``x`` and one host read of its verdict (a synchronisation on a GPU):
    a NaN or inf makes the sum non-finite. Only then are the values examined one by one (a sum of
    huge finite values may also overflow; that passes), so the exact count costs nothing when all
    is well. Measured on this CPU: 0.14 ms for 128 MNIST images, 0.5 ms for 128 32x32 RGB ones, under
    1 % of the first layer that reads them.
    """
    x = x.detach()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    observed = x if missing is None else torch.where(missing, zero, x)
    if bool(observed.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32).isfinite()):
        return
    bad = int((~torch.isfinite(observed)).sum())
    if bad:
        where = "no pixel is missing here" if missing is None else "where missing is False"
        raise ValueError(f"{name}: an observed pixel is not finite (NaN or inf) at {bad} value(s) ({where}); "
                         "only missing pixels may hold NaN")



def ink_hidden(images: torch.Tensor, missing: torch.Tensor, *, threshold: float = 0.5, centre: int = 8) -> dict:
    """How much of the digits a set of masks hides: a diagnostic for comparing mask kinds.

    ``images`` (N, 1, H, W) in [0, 1] (pixels above ``threshold`` count as ink); ``missing`` bool
    (N, 1, H, W). Returns ``ink_hidden`` (mean over images of the hidden share of each image's
    ink; images without ink are skipped), ``centre_hidden`` (mean hidden share of the central
    ``centre`` × ``centre`` pixels) and ``most_ink_lost`` (share of images losing more than 3/4 of
    their ink).
    """
    if images.dim() != 4 or missing.shape != images.shape or missing.dtype != torch.bool:
        raise ValueError(f"images (N, 1, H, W) and a bool missing of the same shape expected, got "
                         f"{tuple(images.shape)} and {tuple(missing.shape)} {missing.dtype}")
    ink = images > threshold
    count = ink.flatten(1).sum(1)
    has = count > 0
    share = (ink & missing).flatten(1).sum(1)[has].double() / count[has].double()
    H, W = images.shape[-2:]
    top, left = (H - centre) // 2, (W - centre) // 2
    centre_share = missing[..., top:top + centre, left:left + centre].flatten(1).double().mean(1)
    return {"ink_hidden": float(share.mean()), "centre_hidden": float(centre_share.mean()),
            "most_ink_lost": float((share > 0.75).double().mean())}


def with_nan(x: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` with NaN where ``missing`` (bool, same shape) is True: what a front
    sees of the missing pixels, so that a value there can never leak into an output unnoticed."""
    return torch.where(missing, torch.full((), float("nan"), dtype=x.dtype, device=x.device), x)
