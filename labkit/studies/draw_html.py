r"""Draw a mask, as the app shows it after every stroke: the panels as PNG images and the class
probabilities and colour bars as plain HTML (fast: numpy, PIL, HTML; no matplotlib figure).

:func:`labkit.studies.draw.panels_figure` draws the same panels as one static figure.
"""
from __future__ import annotations

import html
import io
import json
import math

import numpy as np
from torch import Tensor

from labkit.studies.draw import BAR_COLOURS, PROBABILITY_TICKS, TRUE_LABEL_BAND, Panels, check_size, overlay_rgb

__all__ = ["colorbar_html", "panel_images", "png_bytes", "probability_bars_html"]


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
    zoom = check_size("zoom", zoom)
    big = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
    buf = io.BytesIO()
    Image.fromarray(big, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def probability_bars_html(panels: Panels, *, height_px: int = 110) -> str:
    """The class probabilities as grouped vertical bars in plain HTML/CSS (what the notebook shows).

    One group per class, one bar per classifier (colours :data:`BAR_COLOURS`), on a probability
    axis from 0 to 1 (ticks :data:`PROBABILITY_TICKS`, faint grid lines, the bars' height is
    ``p · height_px``). The true class's group stands on a grey band (:data:`TRUE_LABEL_BAND`) and
    its name is underlined. Below the bars, a legend: one line per classifier with its prediction,
    e.g. ``MisConv: 7 (0.931)``, and one for the band, ``true label: 7``. The outer element carries
    the exact probabilities as JSON in its ``data-probs`` attribute (``{name: [p_0, ...]}``). Plain
    HTML redraws in microseconds, unlike a matplotlib figure (hundreds of milliseconds on a small
    CPU), so the panel can follow every stroke.
    """
    if not isinstance(panels, Panels):
        raise TypeError(f"panels must be a Panels, got {type(panels).__name__}")
    names = list(panels.probs)
    name_h = 15                                            # px: the class names' row under the bars
    groups = []
    for c, cname in enumerate(panels.class_names):
        bars = "".join(
            f"<div title='{html.escape(n)}: {float(panels.probs[n][c]):.3f}' style='width:9px;"
            f"height:{float(panels.probs[n][c]) * height_px:.1f}px;background:{BAR_COLOURS[j % len(BAR_COLOURS)]};"
            "margin:0 1px;position:relative'></div>" for j, n in enumerate(names))
        true = panels.label == c
        under = "text-decoration:underline;font-weight:bold" if true else ""
        band = f"background:{TRUE_LABEL_BAND};" if true else ""
        groups.append(
            f"<div class='{'prob-class prob-true' if true else 'prob-class'}' style='display:flex;"
            f"flex-direction:column;align-items:center;padding:0 3px;{band}'>"
            f"<div style='display:flex;align-items:flex-end;height:{height_px}px'>{bars}</div>"
            f"<div style='font-size:11px;height:{name_h}px;line-height:{name_h}px;{under}'>{html.escape(cname)}</div>"
            "</div>")
    # the axis: tick labels at p · height_px above the baseline, grid lines across the plot
    ticks = "".join(
        f"<div class='prob-tick' style='position:absolute;right:4px;bottom:{t * height_px - 6:.1f}px;"
        f"font-size:10px;line-height:12px'>{t:g}</div>" for t in PROBABILITY_TICKS)
    grid = "".join(
        f"<div style='position:absolute;left:0;right:0;bottom:{t * height_px:.1f}px;border-top:1px solid "
        f"{'#888' if t == 0 else '#e0e0e0'}'></div>" for t in PROBABILITY_TICKS)
    axis = (f"<div style='display:flex;flex-direction:column'><div style='display:flex;height:{height_px}px'>"
            f"<div style='writing-mode:vertical-rl;transform:rotate(180deg);font-size:10px;text-align:center'>"
            f"probability</div>"
            f"<div class='prob-axis' style='position:relative;width:30px;border-right:1px solid #888'>{ticks}</div>"
            f"</div><div style='height:{name_h}px'></div></div>")
    plot = (f"<div style='position:relative;display:flex;align-items:flex-end'>"
            f"<div style='position:absolute;left:0;right:0;top:0;height:{height_px}px;pointer-events:none'>{grid}</div>"
            f"{''.join(groups)}</div>")
    legend = "".join(
        f"<div><span style='display:inline-block;width:10px;height:10px;background:{BAR_COLOURS[j % len(BAR_COLOURS)]};"
        f"margin-right:4px'></span>{html.escape(n)}: <b>{html.escape(panels.class_names[int(panels.probs[n].argmax())])}</b>"
        f" ({float(panels.probs[n].max()):.3f})</div>" for j, n in enumerate(names))
    if panels.label is not None:
        legend += (f"<div class='prob-true-legend'><span style='display:inline-block;width:10px;height:10px;"
                   f"background:{TRUE_LABEL_BAND};border:1px solid #bbb;margin-right:4px'></span>"
                   f"grey band, underlined: true label: <b>{html.escape(panels.class_names[panels.label])}</b></div>")
    # the exact probabilities, machine-readable (the browser test compares them before/after a stroke)
    exact = html.escape(json.dumps({n: [float(v) for v in panels.probs[n]] for n in names}), quote=True)
    return (f"<div style='font-size:12px;padding-top:6px' data-probs=\"{exact}\">"
            f"<div style='display:flex;align-items:flex-end'>{axis}{plot}</div>"
            f"<div style='margin-top:4px'>{legend}</div></div>")


def colorbar_html(cmap: str, vmin: float, vmax: float, label: str, *, width_px: int = 160,
                  ticks: int = 3) -> str:
    """A horizontal colour bar in plain HTML/CSS: the colour map ``cmap`` from ``vmin`` to ``vmax``
    as a gradient, ``ticks`` (>= 2) evenly spaced values under it, and ``label`` (the quantity and
    its unit) below. What the app puts under the panels whose colour encodes a value.
    """
    from matplotlib import colormaps

    if not isinstance(cmap, str) or cmap not in colormaps:
        raise ValueError(f"cmap must be the name of a matplotlib colour map, got {cmap!r}")
    vmin, vmax = float(vmin), float(vmax)
    if not (math.isfinite(vmin) and math.isfinite(vmax) and vmax > vmin):
        raise ValueError(f"need finite vmin < vmax, got vmin={vmin}, vmax={vmax}")
    ticks = check_size("ticks", ticks)
    if ticks < 2:
        raise ValueError(f"ticks must be >= 2, got {ticks}")
    cm = colormaps[cmap]
    stops = ", ".join(
        "rgb({}, {}, {}) {:.0f}%".format(*(round(255 * v) for v in cm(f)[:3]), 100 * f) for f in np.linspace(0, 1, 9))
    values = np.linspace(vmin, vmax, ticks)
    # decimals enough to tell neighbouring ticks apart (two significant digits of the step)
    digits = max(0, 1 - math.floor(math.log10((vmax - vmin) / (ticks - 1))))
    marks = "".join(
        f"<span class='cbar-tick' style='position:absolute;left:{100 * i / (ticks - 1):.1f}%;"
        f"transform:translateX(-50%);font-size:10px'>{round(float(v), digits):g}</span>" for i, v in enumerate(values))
    return (f"<div class='cbar' style='width:{width_px}px;margin:2px 8px'>"
            f"<div style='height:10px;border:1px solid #888;background:linear-gradient(to right, {stops})'></div>"
            f"<div style='position:relative;height:13px'>{marks}</div>"
            f"<div class='cbar-label' style='font-size:10px;text-align:center'>{html.escape(label)}</div></div>")
