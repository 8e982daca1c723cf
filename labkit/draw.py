r"""Draw a mask: the logic behind ``notebooks/05_draw_a_mask.ipynb``.

Everything the notebook shows is computed by plain functions here, testable without a browser:

- :func:`stroke_mask` / :func:`apply_stroke`: a mouse stroke on the enlarged canvas -> missing pixels.
  Canvas coordinates ``(x, y)`` (x to the right, y down, in canvas pixels) map to image coordinates
  ``(x / scale, y / scale)``; image pixel ``(row, col)`` is the unit square
  ``[col, col+1) x [row, row+1)`` with its centre at ``(col + ½, row + ½)``. A stroke is the polyline
  through its points; it paints every pixel whose centre lies within ``radius`` of the polyline,
  ``radius = max(brush, √2) / 2`` with ``brush`` the brush diameter in image pixels. The floor
  ``√2 / 2`` (half a pixel's diagonal) guarantees that the pixel under the cursor is always painted.
  Drawing ORs the stroke into the mask, erasing clears it.
- :func:`preset_mask`: the studies' three masks (square, trapezoid, noise) from :mod:`labkit.masks`.
- :func:`compute_panels`: for one image and its mask, the DMFA's mean, samples and per-pixel standard
  deviation of the missing pixels, and the class probabilities of several classifiers
  (a :class:`Panels`).
- :func:`overlay_rgb`, :func:`panel_images`, :func:`png_bytes`, :func:`probability_bars_html`,
  :func:`format_probabilities`: how the app draws them after every stroke (fast: numpy, PIL, HTML);
  :func:`render_panels`: the same as one static matplotlib figure, for saved figures.
- :func:`load_draw_models`: the DMFA (the DMFA study's checkpoint) and the three classifiers
  (``results/draw/``), "load if it exists, otherwise train" (:class:`DrawModels`).

:class:`DrawApp` (built by :func:`build_app`) is the thin ipywidgets/ipycanvas layer: it keeps the
current image index and mask, turns mouse events and button clicks into calls of the functions
above, and redraws. Its methods (:meth:`DrawApp.stroke`, :meth:`DrawApp.preset`, ...) are what the
mouse and the buttons call, so a script (papermill, tests) drives exactly the code a user does.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from labkit.device import resolve_device
from labkit.masks import MASK_KINDS, check_mask, make_masks
from labkit.mfa import MFA
from labkit.misconv import MisConv2d

__all__ = [
    "BAR_COLOURS",
    "COMPLETE",
    "DMFA_SEARCH",
    "DRAW_DIR",
    "MIN_RADIUS",
    "MISCONV",
    "MISSING_RGB",
    "TRAIN_MASK_KINDS",
    "ZERO",
    "apply_stroke",
    "build_app",
    "classifier_path",
    "compute_panels",
    "DrawApp",
    "DrawModels",
    "file_digest",
    "find_dmfa_checkpoint",
    "format_probabilities",
    "load_dmfa",
    "load_draw_models",
    "load_or_train_classifier",
    "overlay_rgb",
    "panel_images",
    "Panels",
    "png_bytes",
    "preset_mask",
    "probability_bars_html",
    "render_panels",
    "stroke_mask",
    "stroke_radius",
    "training_masks",
]

#: the smallest brush radius (image pixels): half a pixel's diagonal, so the pixel under the cursor
#: is always painted whatever the brush size
MIN_RADIUS = math.sqrt(2.0) / 2.0
#: colour of missing pixels on the canvas and in the "masked input" panel (RGB in [0, 1])
MISSING_RGB = (0.93, 0.18, 0.18)


# =============================================================================== stroke -> mask
def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_size(name: str, value) -> int:
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
    return max(_check_positive("brush", brush) / 2.0, MIN_RADIUS)


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
    height, width = _check_size("height", height), _check_size("width", width)
    scale = _check_positive("scale", scale)
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
    """One of the studies' masks for a ``height x width`` image: bool ``(1, 1, H, W)``, True = missing.

    ``kind``: ``"square"`` (side H//2), ``"trapezoid"`` (half the image), ``"noise"`` (3/4 of the
    pixels), drawn by :func:`labkit.masks.make_masks` from a CPU generator seeded with ``seed`` (the
    same seed gives the same mask on any device); ``"clear"`` gives an all-False mask.
    """
    height, width = _check_size("height", height), _check_size("width", width)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    device = resolve_device(device)
    if kind == "clear":
        return torch.zeros(1, 1, height, width, dtype=torch.bool, device=device)
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown preset {kind!r}; valid presets: {', '.join(MASK_KINDS)}, clear")
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
            ``(C, H, W)`` (e.g. a :class:`labkit.dmfa.DMFA`); its distribution of the missing pixels
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
    n_samples = _check_size("n_samples", n_samples)
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
    arr = img.detach().cpu().float()
    if arr.dim() == 3 and arr.shape[0] == 1:
        ax.imshow(arr[0].numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    elif arr.dim() == 3:
        ax.imshow(arr.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
    else:
        ax.imshow(arr.numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def render_panels(panels: Panels, *, dpi: int = 80, fmt: str = "png") -> bytes:
    """The panels as one image (PNG bytes): masked input, DMFA mean, samples, std, probability bars.

    Uses a standalone :class:`matplotlib.figure.Figure` (no pyplot state, nothing displayed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(panels, Panels):
        raise TypeError(f"panels must be a Panels, got {type(panels).__name__}")
    S = panels.samples.shape[0]
    n_img = 3 + S
    # Fixed axes positions (figure fractions) rather than a layout engine: constrained layout
    # would triple the time of every redraw, and the panels are redrawn after every stroke.
    fig_w, fig_h = 1.45 * n_img + 1.9, 4.2
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    side = 1.3 / fig_w                                    # image axes: 1.3 in square
    step = 1.45 / fig_w
    axes = [fig.add_axes((0.01 + i * step, 1 - 0.42 / fig_h - 1.3 / fig_h, side, 1.3 / fig_h))
            for i in range(n_img)]
    label = "" if panels.label is None else f" (label {panels.class_names[panels.label]})"
    axes[0].imshow(overlay_rgb(panels.image, panels.missing), interpolation="nearest")
    axes[0].set_title(f"input{label}\n{panels.n_missing}/{panels.n_pixels} missing", fontsize=8)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    _show(axes[1], panels.mean.clamp(0, 1), "DMFA mean")
    for i in range(S):
        _show(axes[2 + i], panels.samples[i].clamp(0, 1), f"sample {i + 1}")
    std = panels.std.max(0).values if panels.std.shape[0] > 1 else panels.std[0]
    smax = max(float(std.max()), 1e-6)
    _show(axes[-1], std, f"std (max {smax:.2f})", cmap="magma", vmax=smax)

    ax = fig.add_axes((0.55 / fig_w, 0.35 / fig_h, (n_img * 1.45 - 0.7) / fig_w, 1.75 / fig_h))
    names = list(panels.probs)
    n_classes = len(panels.class_names)
    width = 0.8 / max(len(names), 1)
    pos = np.arange(n_classes)
    colours = ["tab:green", "tab:orange", "tab:blue", "tab:purple", "tab:brown"]
    for j, name in enumerate(names):
        p = panels.probs[name].numpy()
        pred = int(p.argmax())
        ax.bar(pos + (j - (len(names) - 1) / 2) * width, p, width=width, color=colours[j % len(colours)],
               label=f"{name}: {panels.class_names[pred]} ({p[pred]:.0%})")
    ax.set_xticks(pos, panels.class_names)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("probability")
    if panels.label is not None:
        ax.axvspan(panels.label - 0.45, panels.label + 0.45, color="0.9", zorder=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title("class probabilities", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return buf.getvalue()


def _rgb_uint8(img: Tensor) -> np.ndarray:
    """``(C, H, W)`` float (C = 1 or 3) -> ``(H, W, 3)`` uint8, values clipped to [0, 1]."""
    arr = img.detach().float().cpu().clamp(0, 1).expand(3, -1, -1).permute(1, 2, 0).numpy()
    return (arr * 255).round().astype(np.uint8)


def panel_images(panels: Panels) -> dict[str, np.ndarray]:
    """The image panels as RGB uint8 ``(H, W, 3)`` arrays, keyed by caption, in display order.

    ``"input"`` (missing pixels in red, :func:`overlay_rgb`), ``"DMFA mean"``, ``"sample 1"`` ...
    ``"sample S"`` (values clipped to [0, 1]) and ``"std"`` (magma colour map scaled to the largest
    standard deviation; black where nothing is missing).
    """
    from matplotlib import colormaps

    if not isinstance(panels, Panels):
        raise TypeError(f"panels must be a Panels, got {type(panels).__name__}")
    out = {"input": (overlay_rgb(panels.image, panels.missing) * 255).round().astype(np.uint8),
           "DMFA mean": _rgb_uint8(panels.mean)}
    for i in range(panels.samples.shape[0]):
        out[f"sample {i + 1}"] = _rgb_uint8(panels.samples[i])
    std = panels.std.max(0).values.numpy()
    smax = float(std.max())
    scaled = std / smax if smax > 0 else std
    out["std"] = (colormaps["magma"](scaled)[..., :3] * 255).round().astype(np.uint8)
    return out


def png_bytes(rgb: np.ndarray, *, zoom: int = 1) -> bytes:
    """Encode an RGB uint8 ``(H, W, 3)`` array as PNG, enlarged ``zoom`` times (nearest neighbour)."""
    from PIL import Image

    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be a uint8 array (H, W, 3), got {getattr(rgb, 'dtype', type(rgb).__name__)} "
                         f"{getattr(rgb, 'shape', '')}")
    zoom = _check_size("zoom", zoom)
    big = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
    buf = io.BytesIO()
    Image.fromarray(big, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


#: bar colours of the classifiers, in the order of ``Panels.probs``
BAR_COLOURS = ("#2ca02c", "#ff7f0e", "#1f77b4", "#9467bd", "#8c564b")


def format_probabilities(panels: Panels) -> str:
    """One line per classifier: ``name: predicted class (probability) [top 3: ...]``."""
    lines = []
    for name, p in panels.probs.items():
        top = torch.topk(p, k=min(3, p.numel()))
        tops = ", ".join(f"{panels.class_names[int(i)]}: {float(v):.3f}" for v, i in zip(top.values, top.indices))
        lines.append(f"{name}: {panels.class_names[int(top.indices[0])]} ({float(top.values[0]):.3f})  [top 3: {tops}]")
    return "\n".join(lines)


def probability_bars_html(panels: Panels, *, height_px: int = 110) -> str:
    """The class probabilities as grouped vertical bars in plain HTML/CSS (what the notebook shows).

    One group per class, one bar per classifier (colours :data:`BAR_COLOURS`); the true class's
    label is underlined. Below the bars, a legend line per classifier with its prediction, e.g.
    ``MisConv: 7 (0.931)``. The outer element carries the exact probabilities as JSON in its
    ``data-probs`` attribute (``{name: [p_0, ...]}``). Plain HTML redraws in microseconds,
    unlike a matplotlib figure (hundreds of milliseconds on a small CPU), so the panel can follow
    every stroke.
    """
    if not isinstance(panels, Panels):
        raise TypeError(f"panels must be a Panels, got {type(panels).__name__}")
    names = list(panels.probs)
    groups = []
    for c, cname in enumerate(panels.class_names):
        bars = "".join(
            f"<div title='{html.escape(n)}: {float(panels.probs[n][c]):.3f}' style='width:9px;"
            f"height:{float(panels.probs[n][c]) * height_px:.1f}px;background:{BAR_COLOURS[j % len(BAR_COLOURS)]};"
            "margin:0 1px'></div>" for j, n in enumerate(names))
        under = "text-decoration:underline;font-weight:bold" if panels.label == c else ""
        groups.append(
            f"<div style='display:flex;flex-direction:column;align-items:center;margin:0 3px'>"
            f"<div style='display:flex;align-items:flex-end;height:{height_px}px;border-bottom:1px solid #888'>"
            f"{bars}</div><div style='font-size:11px;{under}'>{html.escape(cname)}</div></div>")
    legend = "".join(
        f"<div><span style='display:inline-block;width:10px;height:10px;background:{BAR_COLOURS[j % len(BAR_COLOURS)]};"
        f"margin-right:4px'></span>{html.escape(n)}: <b>{html.escape(panels.class_names[int(panels.probs[n].argmax())])}</b>"
        f" ({float(panels.probs[n].max()):.3f})</div>" for j, n in enumerate(names))
    # the exact probabilities, machine-readable (the browser test compares them before/after a stroke)
    exact = html.escape(json.dumps({n: [float(v) for v in panels.probs[n]] for n in names}), quote=True)
    return (f"<div style='font-size:12px' data-probs=\"{exact}\">"
            f"<div style='display:flex;align-items:flex-end'>{''.join(groups)}</div>"
            f"<div style='margin-top:4px'>{legend}</div></div>")


# =============================================================================== models
REPO_ROOT = Path(__file__).resolve().parents[1]
#: where the notebook's own checkpoints (classifiers, fallback DMFA) and the browser screenshot go
DRAW_DIR = REPO_ROOT / "results" / "draw"
#: DMFA checkpoints of the DMFA study, in order of preference (repository-relative); ``{d}`` = data set.
#: The complete-data DMFA comes first: it learnt to fill holes anywhere in complete digits, which
#: suits free-hand masks, and the committed MisConv classifier was trained over it.
DMFA_SEARCH = tuple(f"results/dmfa/{profile}/{name}.pt" for profile in ("paper", "cpu")
                    for name in ("{d}_complete", "dmfa_complete", "{d}_incomplete", "dmfa_incomplete"))
#: mask kinds of the classifiers' training images, cycled over the images ("none": complete image),
#: so that the classifiers have seen both heavy masks (the presets) and light ones (a few strokes)
TRAIN_MASK_KINDS = ("square", "trapezoid", "noise", "none")
MISCONV, ZERO, COMPLETE = "MisConv (DMFA)", "zero imputation", "complete image"


def find_dmfa_checkpoint(dataset: str = "mnist", *, root: str | os.PathLike | None = None) -> Path | None:
    """The first existing file of :data:`DMFA_SEARCH` under ``root`` (default: the repository), or None."""
    root = Path(root) if root is not None else REPO_ROOT
    for pattern in DMFA_SEARCH:
        path = root / pattern.format(d=dataset)
        if path.is_file():
            return path
    return None


def file_digest(path: str | os.PathLike, length: int = 12) -> str:
    """First ``length`` hex digits of the SHA-1 of a file's bytes (names the classifiers that use it)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def load_dmfa(path: str | os.PathLike, *, device=None):
    """Load a DMFA written by :func:`labkit.dmfa.load_or_train_dmfa`: ``(model in eval mode, meta)``.

    The architecture comes from ``meta["model"]`` (the model's ``config``), so any K and L load.
    Raises :class:`labkit.checkpoint.CheckpointError` for a missing, corrupt or mismatching file.
    """
    from labkit import dmfa as dmfa_mod
    from labkit.checkpoint import CheckpointError, load_checkpoint

    device = resolve_device(device)
    stored = load_checkpoint(path, map_location=device)
    if stored is None:
        raise CheckpointError(f"DMFA checkpoint {str(path)!r} does not exist")
    if not isinstance(stored, Mapping) or "model" not in stored or "meta" not in stored:
        raise CheckpointError(f"{str(path)!r} is not a DMFA checkpoint (expected keys 'model' and 'meta')")
    meta = dict(stored["meta"])
    cfg = dict(meta.get("model") or {})
    model = dmfa_mod.build_dmfa(cfg.get("dataset", meta.get("dataset", "mnist")),
                                n_components=cfg.get("n_components", 1), n_factors=cfg.get("n_factors", 4),
                                factor_scale=cfg.get("factor_scale"), min_variance=cfg.get("min_variance", 1e-4))
    try:
        model.load_state_dict(stored["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"DMFA checkpoint {str(path)!r} does not match its recorded architecture: {exc}") from exc
    return model.to(device).eval(), meta


def training_masks(n: int, height: int, width: int, *, seed: int = 0, kinds: Sequence[str] = TRAIN_MASK_KINDS,
                   device=None) -> Tensor:
    """Masks for the classifiers: image ``i`` gets kind ``kinds[i % len(kinds)]``; bool ``(n, 1, H, W)``.

    ``"none"`` leaves the image complete; the others are :func:`labkit.masks.make_masks` drawn from
    a CPU generator seeded with ``seed`` (reproducible on any device).
    """
    n = _check_size("n", n)
    device = resolve_device(device)
    out = torch.zeros(n, 1, height, width, dtype=torch.bool, device=device)
    gen = torch.Generator().manual_seed(int(seed))
    for j, kind in enumerate(kinds):
        idx = torch.arange(j, n, len(kinds))
        if kind == "none" or len(idx) == 0:
            continue
        out[idx.to(device)] = make_masks(kind, len(idx), height, width, generator=gen, device=device)
    return out


@dataclass
class DrawModels:
    """The notebook's models: the DMFA and three classifiers, with where each came from.

    ``classifiers``: ``{MISCONV: MisConv front over the DMFA, ZERO: zero imputation,
    COMPLETE: trained and applied on complete images}`` (:class:`labkit.classifier.Classifier`).
    ``meta``: ``{"dmfa": {...}, MISCONV: {...}, ...}`` with each model's ``path`` and training setting.
    """

    dmfa: torch.nn.Module
    classifiers: dict[str, torch.nn.Module]
    meta: dict[str, dict]

    #: classifiers that see the complete image (the mask does not change their prediction)
    complete: tuple[str, ...] = (COMPLETE,)

    def predictors(self) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
        """``{name: (x, missing) -> logits}`` for :func:`compute_panels` / :func:`build_app`."""
        dmfa, clf = self.dmfa, self.classifiers

        def misconv(x, m):
            return clf[MISCONV](x, m, dmfa(x, m))

        def zero(x, m):
            return clf[ZERO](x, m)

        def complete(x, m):
            return clf[COMPLETE](x, m, x)          # the ground-truth front reads the complete image

        return {MISCONV: misconv, ZERO: zero, COMPLETE: complete}

    def summary(self) -> str:
        """One line per model: where it was loaded from and how it was trained."""
        lines = []
        for name, m in self.meta.items():
            acc = m.get("test_accuracy")
            extra = (f", test accuracy {acc:.3f} on {m.get('n_test')} test images, masks: {m.get('masks')}"
                     if acc is not None else "")
            setting = ", ".join(f"{k}={m[k]}" for k in ("mode", "n_train", "epochs", "seed") if k in m)
            lines.append(f"{name}: {m.get('path')} ({m.get('source', 'loaded')}; {setting}{extra})")
        return "\n".join(lines)


def classifier_path(name: str, dataset: str = "mnist", *, out_dir: str | os.PathLike | None = None,
                    dmfa_path: str | os.PathLike | None = None) -> Path:
    """Where :func:`load_or_train_classifier` keeps classifier ``name`` (MISCONV needs ``dmfa_path``)."""
    out_dir = Path(out_dir) if out_dir is not None else DRAW_DIR
    if name == ZERO:
        return out_dir / f"classifier_zero_{dataset}.pt"
    if name == COMPLETE:
        return out_dir / f"classifier_complete_{dataset}.pt"
    if name == MISCONV:
        if dmfa_path is None:
            raise ValueError("the MisConv classifier's file is named after its DMFA: pass dmfa_path")
        return out_dir / f"classifier_misconv_{dataset}_{file_digest(dmfa_path)}.pt"
    raise ValueError(f"unknown classifier {name!r}; valid: {MISCONV!r}, {ZERO!r}, {COMPLETE!r}")


def load_or_train_classifier(
    name: str,
    dataset: str = "mnist",
    *,
    dmfa: torch.nn.Module | None = None,
    dmfa_path: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    n_train: int = 2000,
    n_test: int = 1000,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device=None,
    progress: bool = False,
    quiet: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """One of the notebook's classifiers, "load if it exists, otherwise train": ``(model, meta)``.

    ``name``: :data:`ZERO` (zero imputation), :data:`COMPLETE` (trained and applied on complete
    images, the ground-truth front) or :data:`MISCONV` (MisConv front over ``dmfa``, whose checkpoint
    file ``dmfa_path`` names the classifier's file, see :func:`classifier_path`).

    Training (only when the file is missing): :func:`labkit.classifier.build_classifier` for MNIST,
    the first ``n_train`` training images with 10% held out for validation (the epoch with the best
    validation accuracy is kept), :func:`training_masks` (square, trapezoid, noise, none, cycled;
    none at all for COMPLETE), Adam, cross-entropy, ``epochs``, ``batch_size``, ``lr``, ``seed``.
    The test accuracy on the first ``n_test`` test images (same mask mix) goes into ``meta``.
    The model is returned in eval mode with frozen parameters; its MisConv layers use the eager
    formula (see the comment in the code).
    """
    from labkit import classifier as C
    from labkit.checkpoint import load_or_train, partial_path
    from labkit.data import load_dataset, train_val_split
    from labkit.fronts import GroundTruthFront, MisConvFront, ZeroFront

    device = resolve_device(device)
    path = classifier_path(name, dataset, out_dir=out_dir, dmfa_path=dmfa_path)
    if name == MISCONV and dmfa is None:
        raise ValueError("the MisConv classifier needs the DMFA it runs over: pass dmfa")
    front = {ZERO: ZeroFront, COMPLETE: GroundTruthFront, MISCONV: MisConvFront}[name]

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return C.build_classifier("mnist", front)

    def dmfa_aux(images, missing):
        from labkit.dmfa import predict_mfa

        x = torch.where(missing.expand_as(images), torch.full((), float("nan")), images)
        mfa = predict_mfa(dmfa, x, missing, batch_size=256, device=device, out_device="cpu")
        return C.MFAAux({f: getattr(mfa, f) for f in ("weights", "means", "factors", "variances")})

    def train(model):
        tr = load_dataset(dataset, "train", limit=n_train, quiet=True)
        te = load_dataset(dataset, "test", limit=n_test, quiet=True)
        _, _, H, W = tr.images.shape
        fit_idx, val_idx = train_val_split(len(tr), 0.1, seed=0)
        if name == COMPLETE:
            m_train = torch.zeros(len(tr), 1, H, W, dtype=torch.bool)
            m_test = torch.zeros(len(te), 1, H, W, dtype=torch.bool)
        else:
            m_train = training_masks(len(tr), H, W, seed=seed, device="cpu")
            m_test = training_masks(len(te), H, W, seed=seed + 1, device="cpu")
        d = C.CellData(dataset=dataset, mask="+".join(TRAIN_MASK_KINDS), seed=seed, train_images=tr.images,
                       train_labels=tr.labels, train_missing=m_train, fit_idx=fit_idx, val_idx=val_idx,
                       test_images=te.images, test_labels=te.labels, test_missing=m_test,
                       sources=f"train: {tr.source}; test: {te.source}")
        if name == ZERO:
            aux_train = aux_test = C.AuxSource()
        elif name == COMPLETE:      # the ground-truth front reads the complete images from aux
            aux_train, aux_test = C.TensorAux(d.train_images), C.TensorAux(d.test_images)
        else:
            aux_train, aux_test = dmfa_aux(d.train_images, m_train), dmfa_aux(d.test_images, m_test)
        history, info = C.train_classifier(model, d, aux_train, epochs=epochs, batch_size=batch_size, lr=lr,
                                           seed=seed, checkpoint=partial_path(path), select="best_val",
                                           device=device, progress=progress)
        acc = C.evaluate_accuracy(model, d.test_images, d.test_labels, d.test_missing, aux_test)
        partial_path(path).unlink(missing_ok=True)
        return {"classifier": name, "front": front.__name__, "dataset": dataset,
                "n_train": len(d.fit_idx), "n_val": len(d.val_idx), "n_test": len(d.test_images),
                "masks": "none (complete images)" if name == COMPLETE else "cycled " + ", ".join(TRAIN_MASK_KINDS),
                "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "test_accuracy": round(acc, 5),
                "dmfa": None if dmfa_path is None or name != MISCONV else str(dmfa_path),
                "dmfa_sha1": file_digest(dmfa_path) if name == MISCONV else None, "data": d.sources,
                "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in history],
                **info}

    model, meta = load_or_train(path, build, train, device=device, quiet=quiet)
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, MisConv2d):
            # One image at a time: the eager formula answers in milliseconds, while the fast path
            # would torch.compile (seconds) on the first strokes whose window sizes differ.
            mod.fast = False
    return model.eval(), {**meta, "path": str(path)}


def load_draw_models(
    dataset: str = "mnist",
    *,
    dmfa_checkpoint: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    n_train: int = 2000,
    n_test: int = 1000,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 1e-3,
    dmfa_n_train: int = 1000,
    dmfa_epochs: int = 1,
    seed: int = 0,
    device=None,
    progress: bool = False,
    quiet: bool = False,
) -> DrawModels:
    """The DMFA and the three classifiers: "load if it exists, otherwise train" (MNIST-like data sets).

    DMFA: ``dmfa_checkpoint`` if given, else :func:`find_dmfa_checkpoint` (the DMFA study's file),
    else a small fallback trained into ``out_dir/dmfa_fallback_<dataset>.pt`` (complete-data mode,
    ``dmfa_n_train`` images, ``dmfa_epochs`` epochs, batch 32, Adam lr 3e-4, MSE warm-up in the first
    epoch; minutes on a CPU, and visibly blurrier than the study's DMFA).

    Classifiers: :func:`load_or_train_classifier` for :data:`ZERO`, :data:`COMPLETE` and
    :data:`MISCONV` with the remaining arguments, saved in ``out_dir`` (default :data:`DRAW_DIR`):
    ``classifier_zero_<dataset>.pt``, ``classifier_complete_<dataset>.pt`` and
    ``classifier_misconv_<dataset>_<sha1 of the DMFA file>.pt`` (the MisConv classifier is tied to
    the DMFA it was trained with, so a new DMFA gets a new classifier). Existing files are loaded
    whatever the arguments (delete them to retrain).
    """
    device = resolve_device(device)
    out_dir = Path(out_dir) if out_dir is not None else DRAW_DIR
    meta: dict[str, dict] = {}
    path = Path(dmfa_checkpoint) if dmfa_checkpoint is not None else find_dmfa_checkpoint(dataset)
    if path is not None:
        dmfa, m = load_dmfa(path, device=device)
        meta["dmfa"] = {**m, "path": str(path), "source": "DMFA study"}
    else:
        from labkit.data import load_dataset
        from labkit.dmfa import load_or_train_dmfa

        path = out_dir / f"dmfa_fallback_{dataset}.pt"
        tr = load_dataset(dataset, "train", limit=dmfa_n_train, quiet=True)
        dmfa, m = load_or_train_dmfa(path, dataset, images=tr.images, mode="complete", epochs=dmfa_epochs,
                                     batch_size=32, lr=3e-4, mse_warmup_epochs=1, seed=seed, device=device,
                                     progress=progress, quiet=quiet,
                                     meta={"note": "fallback DMFA of the draw-a-mask notebook (no DMFA study "
                                                   "checkpoint was found)"})
        meta["dmfa"] = {**m, "path": str(path), "source": "fallback"}
    dmfa.eval()
    for p in dmfa.parameters():
        p.requires_grad_(False)

    classifiers = {}
    for name in (MISCONV, ZERO, COMPLETE):
        model, m = load_or_train_classifier(name, dataset, dmfa=dmfa, dmfa_path=path, out_dir=out_dir,
                                            n_train=n_train, n_test=n_test, epochs=epochs, batch_size=batch_size,
                                            lr=lr, seed=seed, device=device, progress=progress, quiet=quiet)
        classifiers[name] = model
        meta[name] = {**m, "source": "draw notebook"}
    return DrawModels(dmfa=dmfa, classifiers=classifiers, meta=meta)


# =============================================================================== the app
@contextlib.contextmanager
def _one_thread():
    """Run torch on one intra-op thread inside the block, then restore the previous count.

    One 28x28 image is far too little work to share: with two threads on a busy 2-core machine a
    panel update took 1.8 s (threads waiting for each other), with one thread 0.05 s.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DrawApp:
    """The interactive notebook's state and widgets. Build it with :func:`build_app`.

    State: ``index`` (the test image shown), ``missing`` (bool ``(1, 1, H, W)``, True = missing),
    ``panels`` (the last :class:`Panels`), ``n_updates`` (how many times the panels were computed).

    The mouse draws on ``canvas`` (an ipycanvas ``Canvas`` of exactly ``W·scale x H·scale`` CSS pixels):
    pressing, dragging and releasing paints (or, in erase mode, erases) the segments between
    successive mouse positions with :func:`apply_stroke`; on release the panels are recomputed.
    :meth:`stroke` does the same for a scripted stroke.
    """

    def __init__(self, images: Tensor, labels: Tensor | None, *, dmfa, classifiers, complete=(),
                 class_names=None, scale: int = 10, brush: float = 1.5, n_samples: int = 3,
                 seed: int = 0, index: int = 0):
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (N, C, H, W), got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != images.shape[:1]):
            raise ValueError(f"labels must be None or a tensor of shape ({images.shape[0]},), got "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        self.images, self.labels = images, labels
        self.dmfa, self.classifiers, self.complete = dmfa, dict(classifiers), tuple(complete)
        self.class_names = class_names
        self.scale = _check_size("scale", scale)
        self.brush = _check_positive("brush", brush)
        self.n_samples = _check_size("n_samples", n_samples)
        self.panel_zoom = max(1, round(112 / max(images.shape[-2:])))   # panels about 112 px wide
        self.seed = int(seed)
        self.erase = False
        self.n_updates = 0
        self.panels: Panels | None = None
        self._preset_count = 0
        self._drawing = False
        self._last = None
        self._shown = None                 # the RGB currently on the canvas, (H, W, 3) uint8
        _, _, self.height, self.width = images.shape
        self.index = self._check_index(index)
        self.missing = torch.zeros(1, 1, self.height, self.width, dtype=torch.bool, device=images.device)
        self._build_widgets()
        self.update()

    # ------------------------------------------------------------------ actions (mouse, buttons, scripts)
    def _check_index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 0 <= index < self.images.shape[0]:
            raise ValueError(f"index must be in [0, {self.images.shape[0] - 1}], got {index}")
        return int(index)

    def select(self, index: int) -> None:
        """Show test image ``index``, keep the mask, recompute the panels."""
        self.index = self._check_index(index)
        if self.index_widget.value != self.index:
            self.index_widget.value = self.index       # its observer calls back here; harmless
        self._redraw_canvas(full=True)
        self.update()

    def paint(self, points, *, erase: bool | None = None) -> int:
        """Paint (or erase) the polyline through ``points`` (canvas coordinates) into the mask.

        Does not recompute the panels (the mouse calls it on every move); returns the number of
        pixels that changed.
        """
        erase = self.erase if erase is None else erase
        new = apply_stroke(self.missing, points, scale=self.scale, brush=self.brush, erase=erase)
        changed = int((new != self.missing).sum())
        self.missing = new
        if changed:
            self._redraw_canvas()
            self._update_count()
        return changed

    def stroke(self, points, *, erase: bool | None = None) -> int:
        """A whole stroke: :meth:`paint` then recompute the panels. Returns the pixels changed."""
        changed = self.paint(points, erase=erase)
        self.update()
        return changed

    def preset(self, kind: str) -> None:
        """Replace the mask by a new random preset (``square``, ``trapezoid``, ``noise``) or ``clear``."""
        seed = self.seed + self._preset_count
        self._preset_count += 1
        self.missing = preset_mask(kind, self.height, self.width, seed=seed, device=self.images.device)
        self._redraw_canvas()
        self.update()

    def clear(self) -> None:
        self.preset("clear")

    def update(self) -> Panels:
        """Recompute and redraw the panels for the current image and mask."""
        label = None if self.labels is None else int(self.labels[self.index])
        with _one_thread():
            self.panels = compute_panels(self.images[self.index], self.missing, dmfa=self.dmfa,
                                         classifiers=self.classifiers, complete=self.complete,
                                         n_samples=self.n_samples, seed=self.seed, label=label,
                                         class_names=self.class_names)
        self.n_updates += 1
        for caption, rgb in panel_images(self.panels).items():
            self.panel_widgets[caption].value = png_bytes(rgb, zoom=self.panel_zoom)
        smax = float(self.panels.std.max())
        self.panel_captions["std"].value = f"std (max {smax:.2f})"
        self.probs_html.value = probability_bars_html(self.panels)
        self._update_count()
        return self.panels

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self) -> None:
        import ipywidgets as w
        from ipycanvas import Canvas

        cw, ch = self.width * self.scale, self.height * self.scale
        # Explicit CSS size = canvas size, so a click at canvas pixel (x, y) is exactly (x, y).
        self.canvas = Canvas(width=cw, height=ch, layout=w.Layout(width=f"{cw}px", height=f"{ch}px",
                                                                   min_width=f"{cw}px", min_height=f"{ch}px"))
        self.canvas.add_class("draw-canvas")
        self.canvas.on_mouse_down(self._on_down)
        self.canvas.on_mouse_move(self._on_move)
        self.canvas.on_mouse_up(self._on_up)
        self.canvas.on_mouse_out(self._on_up)
        # A new browser client gets an empty canvas: repaint it then.
        self.canvas.on_client_ready(lambda: self._redraw_canvas(full=True))

        n = self.images.shape[0]
        self.index_widget = w.BoundedIntText(value=self.index, min=0, max=n - 1, description="image",
                                             layout=w.Layout(width="160px"))
        self.index_widget.add_class("draw-index")
        self.index_widget.observe(lambda ch: ch["new"] != self.index and self.select(ch["new"]), names="value")
        self.index_slider = w.IntSlider(value=self.index, min=0, max=n - 1, readout=False,
                                        layout=w.Layout(width=f"{max(cw - 160, 80)}px"))
        w.jslink((self.index_widget, "value"), (self.index_slider, "value"))
        self.mode_widget = w.ToggleButtons(options=["draw", "erase"], value="draw",
                                           style={"button_width": "60px"})
        self.mode_widget.observe(lambda ch: setattr(self, "erase", ch["new"] == "erase"), names="value")
        self.brush_widget = w.FloatSlider(value=self.brush, min=0.5, max=6.0, step=0.5, description="brush",
                                          layout=w.Layout(width=f"{max(cw, 240)}px"))
        self.brush_widget.observe(lambda ch: setattr(self, "brush", float(ch["new"])), names="value")
        buttons = []
        for kind in (*MASK_KINDS, "clear"):
            b = w.Button(description=kind, layout=w.Layout(width="110px"))
            b.add_class(f"draw-preset-{kind}")
            b.on_click(lambda _b, kind=kind: self.preset(kind))
            buttons.append(b)
        self.count_html = w.HTML()
        self.count_html.add_class("draw-count")
        self.probs_html = w.HTML()
        self.probs_html.add_class("draw-probs")
        # One Image widget per panel (input, DMFA mean, samples, std), captioned.
        captions = ["input", "DMFA mean", *(f"sample {i + 1}" for i in range(self.n_samples)), "std"]
        side = f"{self.height * self.panel_zoom}px"
        self.panel_widgets = {c: w.Image(format="png", layout=w.Layout(width=side, height=side)) for c in captions}
        self.panel_captions = {c: w.HTML(value=c) for c in captions}
        for c, img in self.panel_widgets.items():
            img.add_class("draw-panel")
        grid = w.HBox([w.VBox([self.panel_captions[c], self.panel_widgets[c]], layout=w.Layout(margin="0 4px"))
                       for c in captions])
        grid.add_class("draw-panels")
        title = w.HTML("<b>DMFA of the missing pixels</b> (observed pixels copied from the image)")
        ptitle = w.HTML("<b>class probabilities</b>")
        # The frame sits on a box around the canvas, not on the canvas: a border on the canvas
        # element would shift the mouse-to-pixel mapping by its width.
        framed = w.Box([self.canvas], layout=w.Layout(border="1px solid #888", width="fit-content"))
        left = w.VBox([w.HBox([self.index_widget, self.index_slider]), framed, self.mode_widget,
                       self.brush_widget, w.HBox(buttons[:2]), w.HBox(buttons[2:]), self.count_html])
        right = w.VBox([title, grid, ptitle, self.probs_html], layout=w.Layout(margin="0 0 0 12px"))
        self.widget = w.HBox([left, right])
        self._redraw_canvas(full=True)

    def _update_count(self) -> None:
        n = int(self.missing.sum())
        self.count_html.value = f"missing pixels: <b>{n}</b> / {self.height * self.width}"

    def _redraw_canvas(self, full: bool = False) -> None:
        """Repaint the canvas pixels whose colour changed (all of them when ``full``)."""
        from ipycanvas import hold_canvas

        rgb = (overlay_rgb(self.images[self.index], self.missing[0, 0]) * 255).round().astype(np.uint8)
        if full or self._shown is None:
            rows, cols = np.nonzero(np.ones(rgb.shape[:2], dtype=bool))
        else:
            rows, cols = np.nonzero((rgb != self._shown).any(2))
        self._shown = rgb
        if rows.size == 0:
            return
        s = self.scale
        with hold_canvas():
            self.canvas.fill_styled_rects(cols * s, rows * s, s, s, rgb[rows, cols].astype(np.float64))

    # ------------------------------------------------------------------ mouse
    def _on_down(self, x, y) -> None:
        self._drawing = True
        self._last = (x, y)
        self.paint([(x, y)])

    def _on_move(self, x, y) -> None:
        if not self._drawing:
            return
        self.paint([self._last, (x, y)])
        self._last = (x, y)

    def _on_up(self, x, y) -> None:
        if not self._drawing:
            return
        self._drawing = False
        self.paint([self._last, (x, y)])
        self.update()


def build_app(images: Tensor, labels: Tensor | None = None, *, dmfa, classifiers, complete=(),
              class_names=None, scale: int = 10, brush: float = 1.5, n_samples: int = 3, seed: int = 0,
              index: int = 0) -> DrawApp:
    """Build the draw-a-mask app; display ``app.widget`` in a notebook.

    Args:
        images: ``(N, C, H, W)`` float in [0, 1], on the models' device (the test images to pick from).
        labels: ``(N,)`` class labels or ``None``.
        dmfa, classifiers, complete, class_names, n_samples, seed: as in :func:`compute_panels`.
        scale: canvas pixels per image pixel (int >= 1): a 28x28 image with ``scale=10`` is drawn on a
            280x280 canvas.
        brush: initial brush diameter in image pixels.
        index: the image shown first.
    """
    return DrawApp(images, labels, dmfa=dmfa, classifiers=classifiers, complete=complete,
                   class_names=class_names, scale=scale, brush=brush, n_samples=n_samples, seed=seed,
                   index=index)
