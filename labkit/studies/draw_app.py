r"""Draw a mask, the app: the notebook's ipywidgets/ipycanvas layer over its models.

- :func:`open_app`: the app of a :class:`~labkit.studies.configs.DrawConfig` (notebook 05): its
  models (:func:`labkit.studies.draw_models.load_draw_models`, "load if it exists, otherwise
  train"; the models' names are re-exported here) and test images.
- :class:`DrawApp` (built by :func:`build_app`) is the thin widget layer: it keeps the current image
  index and mask, turns mouse events and button clicks into calls of the pure functions of
  :mod:`labkit.studies.draw`, and redraws. Its methods (:meth:`DrawApp.stroke`,
  :meth:`DrawApp.preset`, ...) are what the mouse and the buttons call, so a script (papermill,
  tests) drives exactly the code a user does.

Where the notebook's own checkpoints and the browser screenshot go: :func:`draw_dir`, read from
:mod:`labkit.paths` when called, so it follows ``LAB_ROOT``.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

from labkit.data import load_dataset
from labkit.device import resolve_device
from labkit.studies.configs import DrawConfig
from labkit.studies.draw import (INTENSITY_LABEL, PRESET_KINDS, STD_LABEL, Panels, apply_stroke, check_positive,
                                 check_size, compute_panels, overlay_rgb, preset_mask)
from labkit.studies.draw_html import colorbar_html, panel_images, png_bytes, probability_bars_html
# the models' names, re-exported: the app is where the notebook and the tests meet them
from labkit.studies.draw_models import (COMPLETE, DMFA_SEARCH, MISCONV, TRAIN_MASK_KINDS, ZERO, DrawModels,
                                        classifier_config, classifier_file, classifier_path, draw_dir, file_digest,
                                        find_dmfa_checkpoint, load_draw_models, load_or_train_classifier,
                                        stored_settings, training_masks)

__all__ = [
    "COMPLETE",
    "DMFA_SEARCH",
    "MISCONV",
    "TRAIN_MASK_KINDS",
    "ZERO",
    "build_app",
    "classifier_config",
    "classifier_file",
    "classifier_path",
    "DrawApp",
    "DrawModels",
    "draw_dir",
    "file_digest",
    "find_dmfa_checkpoint",
    "load_draw_models",
    "load_or_train_classifier",
    "open_app",
    "stored_settings",
    "training_masks",
]


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


def _forget_current_canvas(canvas) -> None:
    """Make ipycanvas name ``canvas`` again in the next batch of drawing commands.

    ipycanvas sends every drawing command through one shared manager widget, which names the
    target canvas ("switchCanvas") only when it differs from the one it named last. A browser
    client that connects later (a page reload, a second tab, the notebook reopened while its kernel
    runs) gets a new manager in the page that has no canvas named yet: the first command after that
    fails there, and every later command on that page is dropped, so the canvas stays blank while
    the other widgets update. Forgetting the last target before each batch costs one short command
    and makes every batch self-contained. (The manager's ``_current_canvas`` is private; if a
    future ipycanvas has no such attribute, nothing is changed.)
    """
    manager = getattr(canvas, "_canvas_manager", None)
    if manager is not None and hasattr(manager, "_current_canvas"):
        manager._current_canvas = None


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
        # what open_app built the app from (its DrawModels and the test split); None when built directly
        self.models, self.data = None, None
        self.dmfa, self.classifiers, self.complete = dmfa, dict(classifiers), tuple(complete)
        self.class_names = class_names
        self.scale = check_size("scale", scale)
        self.brush = check_positive("brush", brush)
        self.n_samples = check_size("n_samples", n_samples)
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
        """Replace the mask by a new random preset (one of the paper's Table 1 kinds,
        :data:`~labkit.studies.draw.PRESET_KINDS`: ``square``, ``trapezoid``, ``noise``) or ``clear``."""
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
        # panel_images scales the std map from 0 to its largest value: the colour bar says so
        self.std_bar.value = colorbar_html("magma", 0.0, smax if smax > 0 else 1.0, STD_LABEL,
                                           width_px=self.std_bar_width)
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
        # A new browser client gets an empty canvas: repaint all of it then (every batch names
        # the canvas, see _forget_current_canvas, so the new page's manager can draw it).
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
        for kind in (*PRESET_KINDS, "clear"):
            b = w.Button(description=kind, layout=w.Layout(width="110px"))
            b.add_class(f"draw-preset-{kind}")
            b.on_click(lambda _b, kind=kind: self.preset(kind))
            buttons.append(b)
        self.preset_buttons = {b.description: b for b in buttons}
        self.count_html = w.HTML()
        self.count_html.add_class("draw-count")
        presets_note = w.HTML("<span style='font-size:11px'>presets: the paper's Table 1 masks "
                              f"({', '.join(PRESET_KINDS)})</span>")
        self.probs_html = w.HTML()
        self.probs_html.add_class("draw-probs")
        # One Image widget per panel, captioned, in a grid of three columns: what the DMFA says
        # (input, mean, std) on top, its samples below. Three columns keep the app within a
        # 1280-pixel-wide JupyterLab with the file browser open.
        captions = ["input", "DMFA mean", *(f"sample {i + 1}" for i in range(self.n_samples)), "std"]
        side = self.height * self.panel_zoom
        self.panel_widgets = {c: w.Image(format="png", layout=w.Layout(width=f"{side}px", height=f"{side}px"))
                              for c in captions}
        self.panel_captions = {c: w.HTML(value=c) for c in captions}
        for c, img in self.panel_widgets.items():
            img.add_class("draw-panel")
        shown = ["input", "DMFA mean", "std", *(f"sample {i + 1}" for i in range(self.n_samples))]
        cell_px = side + 8
        grid = w.GridBox([w.VBox([self.panel_captions[c], self.panel_widgets[c]], layout=w.Layout(margin="0 4px"))
                          for c in shown],
                         layout=w.Layout(grid_template_columns=f"repeat(3, {cell_px}px)", width=f"{3 * cell_px}px"))
        grid.add_class("draw-panels")
        # Colour bars under the grid, each as wide as it: the grey panels show pixel values on a
        # fixed 0..1 scale; the std map is scaled to its largest value, so its bar is redrawn with
        # every update.
        bar_px = 3 * cell_px - 16
        self.intensity_bar = w.HTML(colorbar_html("gray", 0.0, 1.0, INTENSITY_LABEL + "; red: missing", width_px=bar_px))
        self.intensity_bar.add_class("draw-intensity-bar")
        self.std_bar_width = bar_px
        self.std_bar = w.HTML()
        self.std_bar.add_class("draw-std-bar")
        bars = w.VBox([self.intensity_bar, self.std_bar])
        title = w.HTML("<b>DMFA of the missing pixels</b> (observed pixels copied from the image)",
                       layout=w.Layout(width=f"{3 * cell_px}px"))
        ptitle = w.HTML("<b>class probabilities</b>")
        # The frame sits on a box around the canvas, not on the canvas: a border on the canvas
        # element would shift the mouse-to-pixel mapping by its width.
        framed = w.Box([self.canvas], layout=w.Layout(border="1px solid #888", width="fit-content"))
        left = w.VBox([w.HBox([self.index_widget, self.index_slider]), framed, self.mode_widget,
                       self.brush_widget, presets_note, w.HBox(buttons[:2]), w.HBox(buttons[2:]),
                       self.count_html], layout=w.Layout(flex="0 0 auto", width=f"{max(cw, 240) + 12}px"))
        right = w.VBox([title, grid, bars, ptitle, self.probs_html],
                       layout=w.Layout(margin="0 0 0 12px", flex="0 1 auto"))
        # On a screen too narrow for both columns the right one moves under the canvas instead of
        # being cut off.
        self.widget = w.HBox([left, right], layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
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
        _forget_current_canvas(self.canvas)
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


def open_app(cfg: DrawConfig, *, progress: bool = False, quiet: bool = False) -> DrawApp:
    """The draw-a-mask app of ``cfg``: its models (:func:`load_draw_models` with the config's
    ``dmfa_checkpoint``, ``out_dir``, ``n_train``, ``epochs``, ``dmfa_n_train``, ``dmfa_epochs``,
    ``seed``; trained first where no checkpoint of these settings exists) and the first ``n_images``
    test images of ``dataset``, on ``device``; ``image_index`` shown first.

    The returned app also holds what it was built from: ``app.models`` (:class:`DrawModels`) and
    ``app.data`` (the test split, :func:`labkit.data.load_dataset`: labels, where it was read from).
    """
    device = resolve_device(cfg.device)
    models = load_draw_models(cfg, device=device, progress=progress, quiet=quiet)
    data = load_dataset(cfg.dataset, "test", limit=cfg.n_images, quiet=True)
    app = build_app(data.images.to(device), data.labels, dmfa=models.dmfa, classifiers=models.predictors(),
                    complete=models.complete, scale=cfg.scale, brush=cfg.brush, n_samples=cfg.n_samples,
                    seed=cfg.seed, index=cfg.image_index)
    app.models, app.data = models, data
    return app
