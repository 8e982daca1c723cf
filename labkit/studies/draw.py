r"""Draw a mask: the pure functions behind ``notebooks/05_draw_a_mask.ipynb``.

Everything the notebook shows is computed by plain functions here, testable without a browser:

- :func:`stroke_mask` / :func:`apply_stroke`: a mouse stroke on the enlarged canvas -> missing pixels.
  Canvas coordinates ``(x, y)`` (x to the right, y down, in canvas pixels) map to image coordinates
  ``(x / scale, y / scale)``; image pixel ``(row, col)`` is the unit square
  ``[col, col+1) x [row, row+1)`` with its centre at ``(col + ½, row + ½)``. A stroke is the polyline
  through its points; it paints every pixel whose centre lies within ``radius`` of the polyline,
  ``radius = max(brush, √2) / 2`` with ``brush`` the brush diameter in image pixels. The floor
  ``√2 / 2`` (half a pixel's diagonal) guarantees that the pixel under the cursor is always painted.
  Drawing ORs the stroke into the mask, erasing clears it.
- :func:`preset_mask`: the paper's three masks of Table 1 (square, trapezoid, noise; :data:`PRESET_KINDS`,
  which is ``labkit.masks.DEFAULT_MASK_KINDS``) from :mod:`labkit.masks`.
- :func:`compute_panels`: for one image and its mask, the DMFA's mean, samples and per-pixel standard
  deviation of the missing pixels, and the class probabilities of several classifiers
  (a :class:`Panels`).
- :func:`overlay_rgb`, :func:`format_probabilities` and, in :mod:`labkit.studies.draw_html`,
  ``panel_images``, ``png_bytes``, ``probability_bars_html``, ``colorbar_html``: how the app draws
  them after every stroke (fast: numpy, PIL, HTML); :func:`panels_figure` / :func:`render_panels`:
  the same as one static matplotlib figure, for saved figures.

Every panel whose colour encodes a value says which: the grey image panels and the standard
deviation carry a colour bar with the quantity and its unit (pixel values, 0 = black, 1 = white),
and the probability bars an axis from 0 to 1 with a legend for the band that marks the true label.

The models (the DMFA and the three classifiers, "load if it exists, otherwise train") and the
ipywidgets/ipycanvas app that calls these functions are in :mod:`labkit.studies.draw_app`.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from labkit.device import resolve_device
from labkit import masks as _masks
from labkit.masks import check_mask, make_masks
from labkit.mfa import MFA

__all__ = [
    "BAR_COLOURS",
    "INTENSITY_LABEL",
    "MIN_RADIUS",
    "MISSING_RGB",
    "PRESET_KINDS",
    "PROBABILITY_TICKS",
    "STD_LABEL",
    "TRUE_LABEL_BAND",
    "apply_stroke",
    "check_positive",
    "check_size",
    "compute_panels",
    "format_probabilities",
    "overlay_rgb",
    "Panels",
    "panels_figure",
    "preset_mask",
    "render_panels",
    "stroke_mask",
    "stroke_radius",
]

#: the smallest brush radius (image pixels): half a pixel's diagonal, so the pixel under the cursor
#: is always painted whatever the brush size
MIN_RADIUS = math.sqrt(2.0) / 2.0
#: colour of missing pixels on the canvas and in the "masked input" panel (RGB in [0, 1])
MISSING_RGB = (0.93, 0.18, 0.18)
#: the presets the app offers: the paper's three mask kinds of Table 1 (square, trapezoid, noise).
#: ``labkit.masks`` also has ``trapezoid_inside`` (an earlier reading of the trapezoid), which the
#: app does not offer.
PRESET_KINDS: tuple[str, ...] = tuple(getattr(_masks, "DEFAULT_MASK_KINDS", ("square", "trapezoid", "noise")))
#: what the grey panels' colour means: pixel values are intensities in [0, 1]
INTENSITY_LABEL = "pixel value (0 = black, 1 = white)"
#: what the std panel's colour means: the DMFA's standard deviation, in the same pixel-value units
STD_LABEL = "std of the pixel value (pixel-value units)"
#: tick positions of the probability axis
PROBABILITY_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: colour of the band behind the true label's bars (matplotlib figure and HTML)
TRUE_LABEL_BAND = "#e3e3e3"
#: bar colours of the classifiers, in the order of ``Panels.probs``
BAR_COLOURS = ("#2ca02c", "#ff7f0e", "#1f77b4", "#9467bd", "#8c564b")


# =============================================================================== stroke -> mask
def check_positive(name: str, value) -> float:
    """``value`` as a float, if it is a finite number > 0; else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_size(name: str, value) -> int:
    """``value`` as an int, if it is an integer >= 1; else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _points_array(points) -> np.ndarray:
    """``points`` (a sequence of ``(x, y)`` pairs or an ``(n, 2)`` array/tensor) -> float64 ``(n, 2)``."""
    if isinstance(points, Tensor):
        points = points.detach().cpu().numpy()
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"points must be a sequence of (x, y) number pairs, got {type(points).__name__}") from exc
    if arr.ndim == 1 and arr.shape == (2,):
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 1:
        raise ValueError(f"points must have shape (n, 2) with n >= 1 (canvas x, y pairs), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("points must be finite (no NaN or inf canvas coordinates)")
    return arr


def stroke_radius(brush: float) -> float:
    """Radius (image pixels) painted by a brush of diameter ``brush``: ``max(brush, √2) / 2``."""
    return max(check_positive("brush", brush) / 2.0, MIN_RADIUS)


def stroke_mask(points, height: int, width: int, *, scale: float = 1.0, brush: float = 1.0,
                device=None) -> Tensor:
    """The pixels painted by one stroke: bool ``(height, width)``, True = painted.

    Args:
        points: ``(n, 2)`` canvas coordinates ``(x, y)``, n >= 1, in stroke order (one point = a dot).
            Points outside the canvas are allowed (only pixels inside the image are painted).
        height, width: the image's size in pixels (the canvas is ``scale`` times larger).
        scale: canvas pixels per image pixel (> 0).
        brush: brush diameter in image pixels (> 0); see the module docstring for the exact rule.
        device: where the mask is created (``None``: :func:`labkit.device.resolve_device`).

    A pixel is painted iff the distance from its centre to the polyline through ``points / scale``
    is at most :func:`stroke_radius` ``(brush)``.
    """
    height, width = check_size("height", height), check_size("width", width)
    scale = check_positive("scale", scale)
    radius = stroke_radius(brush)
    pts = _points_array(points) / scale                                     # image units (x, y)
    # Pixel centres; distances in float64 on the CPU (at most H*W*(n-1) numbers, tiny).
    cy, cx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    centres = np.stack([cx.ravel(), cy.ravel()], axis=1)                    # (P, 2)
    a = pts[:-1] if len(pts) > 1 else pts
    b = pts[1:] if len(pts) > 1 else pts
    ab = b - a                                                              # (S, 2)
    ab2 = (ab * ab).sum(1)                                                  # (S,)
    ap = centres[:, None, :] - a[None]                                      # (P, S, 2)
    # Projection parameter of each centre on each segment, clamped to the segment; a zero-length
    # segment (repeated point, or a dot) projects to its single point.
    t = np.where(ab2 > 0, (ap * ab[None]).sum(2) / np.where(ab2 > 0, ab2, 1.0), 0.0).clip(0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    d2 = ((centres[:, None, :] - closest) ** 2).sum(2).min(1)               # (P,)
    painted = d2 <= radius * radius * (1 + 1e-12)
    return torch.from_numpy(painted.reshape(height, width)).to(resolve_device(device))


def apply_stroke(missing: Tensor, points, *, scale: float = 1.0, brush: float = 1.0,
                 erase: bool = False) -> Tensor:
    """A new mask: ``missing`` with one stroke drawn (``erase=False``) or erased (``erase=True``).

    Args:
        missing: bool ``(H, W)``, ``(1, H, W)`` or ``(B, 1, H, W)`` (the same stroke for every item),
            True = missing.
        points, scale, brush: as in :func:`stroke_mask`.

    Returns a new tensor of ``missing``'s shape, dtype and device; the input is not modified.
    """
    if not isinstance(missing, Tensor) or missing.dtype != torch.bool:
        raise TypeError(f"missing must be a bool tensor (True = missing), got "
                        f"{getattr(missing, 'dtype', type(missing).__name__)}")
    if missing.dim() not in (2, 3, 4) or (missing.dim() >= 3 and missing.shape[-3] != 1):
        raise ValueError(f"missing must have shape (H, W), (1, H, W) or (B, 1, H, W), got {tuple(missing.shape)}")
    if not isinstance(erase, bool):
        raise TypeError(f"erase must be a bool, got {type(erase).__name__}")
    h, w = missing.shape[-2:]
    painted = stroke_mask(points, h, w, scale=scale, brush=brush, device=missing.device)
    return missing & ~painted if erase else missing | painted


# =============================================================================== presets
def preset_mask(kind: str, height: int, width: int, *, seed: int = 0, device=None) -> Tensor:
    """One of the paper's masks (Table 1) for a ``height x width`` image: bool ``(1, 1, H, W)``, True = missing.

    ``kind``: one of :data:`PRESET_KINDS`: ``"square"`` (side H//2), ``"trapezoid"`` (half the
    image), ``"noise"`` (3/4 of the pixels), drawn by :func:`labkit.masks.make_masks` from a CPU
    generator seeded with ``seed`` (the same seed gives the same mask on any device); ``"clear"``
    gives an all-False mask.
    """
    height, width = check_size("height", height), check_size("width", width)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    device = resolve_device(device)
    if kind == "clear":
        return torch.zeros(1, 1, height, width, dtype=torch.bool, device=device)
    if kind not in PRESET_KINDS:
        raise ValueError(f"unknown preset {kind!r}; valid presets (the paper's Table 1 masks): "
                         f"{', '.join(PRESET_KINDS)}, clear")
    gen = torch.Generator().manual_seed(int(seed))
    return make_masks(kind, 1, height, width, generator=gen, device=device)


# =============================================================================== panels
@dataclass
class Panels:
    """What the notebook shows for one image and mask (all tensors on the CPU, float32).

    Attributes:
        image: ``(C, H, W)`` the complete image.
        missing: bool ``(H, W)``, True = missing.
        mean: ``(C, H, W)`` observed pixels from ``image``, missing ones from the DMFA's mixture mean.
        samples: ``(S, C, H, W)`` the same with the missing pixels drawn from the DMFA.
        std: ``(C, H, W)`` per-pixel standard deviation of the DMFA at missing pixels, 0 at observed.
        probs: ``{classifier name: (n_classes,) probabilities}`` in the order given.
        label: the true class, or ``None``.
        class_names: names of the classes, ``len == n_classes``.
    """

    image: Tensor
    missing: Tensor
    mean: Tensor
    samples: Tensor
    std: Tensor
    probs: dict[str, Tensor]
    label: int | None = None
    class_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_missing(self) -> int:
        return int(self.missing.sum())

    @property
    def n_pixels(self) -> int:
        return int(self.missing.numel())

    def predictions(self) -> dict[str, tuple[int, float]]:
        """``{classifier name: (predicted class, its probability)}``."""
        return {name: (int(p.argmax()), float(p.max())) for name, p in self.probs.items()}


def _as_batch_image(image) -> Tensor:
    if not isinstance(image, Tensor) or not image.is_floating_point():
        raise TypeError(f"image must be a floating-point torch.Tensor, got "
                        f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must have shape (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
    return image


def _as_batch_mask(missing, image: Tensor) -> Tensor:
    if not isinstance(missing, Tensor) or missing.dtype != torch.bool:
        raise TypeError(f"missing must be a bool tensor (True = missing), got "
                        f"{getattr(missing, 'dtype', type(missing).__name__)}")
    H, W = image.shape[-2:]
    m = missing
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dim() != 4 or tuple(m.shape) != (1, 1, H, W):
        raise ValueError(f"missing must have shape (H, W), (1, H, W) or (1, 1, H, W) = (1, 1, {H}, {W}) "
                         f"to match the image {tuple(image.shape)}, got {tuple(missing.shape)}")
    return check_mask(m.to(image.device), name="missing", like=image)[:, :1]


@torch.no_grad()
def compute_panels(
    image: Tensor,
    missing: Tensor,
    *,
    dmfa: Callable[[Tensor, Tensor], MFA],
    classifiers: Mapping[str, Callable[[Tensor, Tensor], Tensor]],
    complete: Sequence[str] = (),
    n_samples: int = 3,
    seed: int = 0,
    label: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Panels:
    """Everything the notebook shows for one image and mask.

    Args:
        image: ``(C, H, W)`` or ``(1, C, H, W)`` float, the complete image (on the models' device).
        missing: bool ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)``, True = missing.
        dmfa: ``(x (1, C, H, W), missing (1, 1, H, W)) -> MFA`` with batch 1 and image shape
            ``(C, H, W)`` (e.g. a :class:`labkit.models.dmfa.DMFA`); its distribution of the missing pixels
            gives the mean, samples and standard deviation. Not called when nothing is missing.
        classifiers: ``{name: (x, missing) -> logits (1, n_classes)}``, all with the same number of
            classes. Each gets the image with its missing pixels set to 0 (a missing pixel's value
            never reaches a classifier), except those named in ``complete``, which get the complete
            image (a reference that the mask does not change).
        complete: names in ``classifiers`` that see the complete image.
        n_samples: samples of the missing pixels to draw (>= 1).
        seed: seed of the sampling generator (created on the image's device), so the same image and
            mask always give the same panels.
        label: the true class, shown in the title.
        class_names: ``n_classes`` names (default ``"0"``, ``"1"``, ...).

    Returns:
        :class:`Panels` on the CPU. The sample/mean values are not clipped (the DMFA's Gaussians
        may leave [0, 1]); :func:`render_panels` clips them for display.
    """
    x = _as_batch_image(image)
    m = _as_batch_mask(missing, x)
    n_samples = check_size("n_samples", n_samples)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(classifiers, Mapping) or not classifiers:
        raise TypeError(f"classifiers must be a non-empty mapping name -> callable, got {type(classifiers).__name__}")
    unknown = [n for n in complete if n not in classifiers]
    if unknown:
        raise ValueError(f"complete names {unknown} that are not in classifiers {list(classifiers)}")
    C, H, W = x.shape[1:]
    mc = m.expand_as(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x_obs = torch.where(mc, zero, x)                       # missing values never reach a model

    if bool(m.any()):
        mfa = dmfa(x_obs, m)
        if not isinstance(mfa, MFA):
            raise TypeError(f"dmfa must return a labkit.mfa.MFA, got {type(mfa).__name__}")
        if mfa.batch_size != 1 or mfa.image_shape != (C, H, W):
            raise ValueError(f"dmfa returned an MFA for batch {mfa.batch_size} of {mfa.image_shape} images; "
                             f"expected batch 1 of {(C, H, W)}")
        gen = torch.Generator(device=mfa.means.device).manual_seed(int(seed))
        mean = torch.where(mc, mfa.mean().to(x.dtype), x)
        draws = mfa.sample(gen, n_samples)[:, 0].to(x.dtype)                 # (S, C, H, W)
        samples = torch.where(mc, draws, x)
        std = torch.where(mc, mfa.variance().to(x.dtype).sqrt(), zero)[0]
    else:
        mean = x
        samples = x.expand(n_samples, C, H, W)
        std = torch.zeros_like(x[0])

    probs: dict[str, Tensor] = {}
    n_classes = None
    for name, fn in classifiers.items():
        logits = fn(x if name in complete else x_obs, m)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
            raise ValueError(f"classifier {name!r} must return logits of shape (1, n_classes), got "
                             f"{tuple(getattr(logits, 'shape', ()))}")
        if n_classes is not None and logits.shape[1] != n_classes:
            raise ValueError(f"classifier {name!r} returned {logits.shape[1]} classes, the others {n_classes}")
        n_classes = logits.shape[1]
        probs[name] = torch.softmax(logits.float(), dim=1)[0].cpu()
    if class_names is None:
        class_names = tuple(str(i) for i in range(n_classes))
    class_names = tuple(str(c) for c in class_names)
    if len(class_names) != n_classes:
        raise ValueError(f"class_names has {len(class_names)} names but the classifiers have {n_classes} classes")
    cpu = lambda t: t.detach().float().cpu()  # noqa: E731
    return Panels(image=cpu(x[0]), missing=m[0, 0].cpu(), mean=cpu(mean[0]), samples=cpu(samples),
                  std=cpu(std), probs=probs, label=None if label is None else int(label),
                  class_names=class_names)


# =============================================================================== drawing
def overlay_rgb(image: Tensor, missing: Tensor) -> np.ndarray:
    """The image as RGB ``(H, W, 3)`` float in [0, 1], missing pixels blended with :data:`MISSING_RGB`.

    ``image``: ``(C, H, W)`` with C = 1 (grey) or 3; values are clipped to [0, 1].
    ``missing``: bool ``(H, W)``. Missing pixels show ``0.35·value + 0.65·MISSING_RGB``, so they are
    clearly red while the digit under them stays faintly visible.
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (C, H, W) with C in (1, 3), got {tuple(getattr(image, 'shape', ()))}")
    if not isinstance(missing, Tensor) or missing.dtype != torch.bool or tuple(missing.shape) != tuple(image.shape[1:]):
        raise ValueError(f"missing must be a bool tensor of shape {tuple(image.shape[1:])}, got "
                         f"{getattr(missing, 'dtype', None)} {tuple(getattr(missing, 'shape', ()))}")
    rgb = image.detach().float().cpu().clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).numpy().copy()
    red = np.asarray(MISSING_RGB, dtype=np.float32)
    m = missing.cpu().numpy()
    rgb[m] = 0.35 * rgb[m] + 0.65 * red
    return rgb


def _show(ax, img: Tensor, title: str, cmap="gray", vmax=1.0):
    """Draw one panel with a fixed colour scale [0, vmax] (never rescaled per image); returns the
    ``AxesImage`` (for its colour bar) or None for an RGB image."""
    arr = img.detach().cpu().float()
    if arr.dim() == 3 and arr.shape[0] == 1:
        im = ax.imshow(arr[0].numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    elif arr.dim() == 3:
        ax.imshow(arr.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        im = None
    else:
        im = ax.imshow(arr.numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def panels_figure(panels: Panels, *, dpi: int = 80):
    """The panels as one :class:`matplotlib.figure.Figure` (no pyplot state, nothing displayed).

    Top row: the masked input (missing pixels red), the DMFA mean and samples (grey, values clipped
    to [0, 1]) with one colour bar for them (:data:`INTENSITY_LABEL`), and the standard deviation
    of the missing pixels (magma, from 0 to its largest value) with its own colour bar
    (:data:`STD_LABEL`). Bottom: the class probabilities, one bar per classifier and class, on an
    axis from 0 to 1 (ticks :data:`PROBABILITY_TICKS`); a grey band marks the true label, and the
    legend says so. Every axes carries a label (``ax.get_label()``): ``"input"``, ``"DMFA mean"``,
    ``"sample 1"`` ..., ``"std"``, ``"colorbar: pixel value"``, ``"colorbar: std"``, ``"probabilities"``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not isinstance(panels, Panels):
        raise TypeError(f"panels must be a Panels, got {type(panels).__name__}")
    S = panels.samples.shape[0]
    n_grey = 1 + S                                        # DMFA mean and samples share a colour bar
    # Fixed axes positions in inches (then figure fractions) rather than a layout engine:
    # constrained layout would triple the time of every redraw.
    side, gap, cbar_w, cbar_gap = 1.3, 0.15, 0.1, 0.75    # cbar_gap leaves room for its ticks and label
    lefts, x = [], 0.1
    for i in range(2 + n_grey):                           # input, grey panels, std
        if i == 1 + n_grey:                               # the grey panels' colour bar comes before std
            x += cbar_w + cbar_gap
        lefts.append(x)
        x += side + gap
    fig_w = x + cbar_w + cbar_gap - gap + 0.1
    fig_h = 4.4
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    top = 1 - (0.45 + side) / fig_h
    frac = lambda left, width: (left / fig_w, top, width / fig_w, side / fig_h)  # noqa: E731
    names = ["input", "DMFA mean", *(f"sample {i + 1}" for i in range(S)), "std"]
    axes = [fig.add_axes(frac(left, side), label=name) for left, name in zip(lefts, names)]

    label = "" if panels.label is None else f" (label {panels.class_names[panels.label]})"
    axes[0].imshow(overlay_rgb(panels.image, panels.missing), interpolation="nearest")
    axes[0].set_title(f"input{label}\n{panels.n_missing}/{panels.n_pixels} missing (red)", fontsize=8)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    grey = _show(axes[1], panels.mean.clamp(0, 1), "DMFA mean")
    for i in range(S):
        _show(axes[2 + i], panels.samples[i].clamp(0, 1), f"sample {i + 1}")
    std = panels.std.max(0).values if panels.std.shape[0] > 1 else panels.std[0]
    smax = float(std.max())
    # the colour scale runs from 0 to the largest std (at least 0.01, so an all-zero map reads as 0)
    std_im = _show(axes[-1], std, f"std of the missing pixels\n(max {smax:.2f})", cmap="magma",
                   vmax=max(smax, 0.01))
    for im, left, what, text in ((grey, lefts[1 + n_grey] - cbar_gap - cbar_w + 0.05, "pixel value", INTENSITY_LABEL),
                                 (std_im, lefts[-1] + side + 0.1, "std", STD_LABEL)):
        if im is None:                                    # RGB images (C = 3) have no colour scale
            continue
        cax = fig.add_axes(frac(left, cbar_w), label=f"colorbar: {what}")
        cb = fig.colorbar(im, cax=cax)
        cb.set_label(text.replace(" (", "\n("), fontsize=7)
        cb.ax.tick_params(labelsize=7)

    ax = fig.add_axes((0.7 / fig_w, 0.4 / fig_h, (fig_w - 3.2) / fig_w, 1.75 / fig_h), label="probabilities")
    names = list(panels.probs)
    n_classes = len(panels.class_names)
    width = 0.8 / max(len(names), 1)
    pos = np.arange(n_classes)
    for j, name in enumerate(names):
        p = panels.probs[name].numpy()
        pred = int(p.argmax())
        ax.bar(pos + (j - (len(names) - 1) / 2) * width, p, width=width, color=BAR_COLOURS[j % len(BAR_COLOURS)],
               label=f"{name}: {panels.class_names[pred]} ({p[pred]:.0%})")
    ax.set_xticks(pos, panels.class_names)
    ax.set_xlim(-0.5, n_classes - 0.5)
    ax.set_ylim(0.0, 1.0)
    ax.set_yticks(PROBABILITY_TICKS, [f"{t:g}" for t in PROBABILITY_TICKS])
    ax.set_ylabel("probability")
    ax.set_xlabel("class")
    ax.grid(axis="y", color="0.85", linewidth=0.6)
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()
    if panels.label is not None:
        ax.axvspan(panels.label - 0.5, panels.label + 0.5, color=TRUE_LABEL_BAND, zorder=0)
        handles.append(Patch(color=TRUE_LABEL_BAND))
        labels.append(f"true label ({panels.class_names[panels.label]})")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title="predicted class (probability)", title_fontsize=8)
    ax.set_title("class probabilities", fontsize=9)
    return fig


def render_panels(panels: Panels, *, dpi: int = 80, fmt: str = "png") -> bytes:
    """:func:`panels_figure` encoded as an image (PNG bytes by default)."""
    fig = panels_figure(panels, dpi=dpi)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return buf.getvalue()


def format_probabilities(panels: Panels) -> str:
    """One line per classifier: ``name: predicted class (probability) [top 3: ...]``."""
    lines = []
    for name, p in panels.probs.items():
        top = torch.topk(p, k=min(3, p.numel()))
        tops = ", ".join(f"{panels.class_names[int(i)]}: {float(v):.3f}" for v, i in zip(top.values, top.indices))
        lines.append(f"{name}: {panels.class_names[int(top.indices[0])]} ({float(top.values[0]):.3f})  [top 3: {tops}]")
    return "\n".join(lines)
