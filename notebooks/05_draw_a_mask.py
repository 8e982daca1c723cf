# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Draw a mask
#
# Hide part of a digit with the mouse and watch what the models make of it:
#
# - **left**: the test image on an enlarged canvas. Press and drag to mark pixels as *missing*
#   (red); switch to *erase* to give them back. The buttons put one of the paper's three masks of
#   Table 1 (`labkit.masks.DEFAULT_MASK_KINDS`: a random **square** of 1/4 of the image, a
#   **trapezoid** of 1/2, **noise** on 3/4 of the pixels) or **clear** everything. Pick another
#   image with the number box or the slider.
# - **right, top**: what the **DMFA** believes the missing pixels are, given the observed ones:
#   its mixture mean, three samples, and the per-pixel standard deviation (bright = unsure).
#   Observed pixels are copied from the image. Colour bars under the panels say what a colour
#   means: pixel values from 0 (black) to 1 (white), and the standard deviation in the same
#   pixel-value units, from 0 to its largest value for the current mask.
# - **right, bottom**: class probabilities of three classifiers of the same architecture
#   (supplementary section 1.2), on an axis from 0 to 1: **MisConv** (its first layer takes the
#   exact expected activation over the DMFA's distribution of the missing pixels), **zero
#   imputation** (missing pixels set to 0), and a classifier trained and applied on the
#   **complete image**, the reference the mask does not change. A grey band marks the true label.
#
# The panels are recomputed after every stroke (tens of milliseconds on a CPU). The models come
# from the checkpoints under `results/` ("load if it exists, otherwise train",
# `labkit.studies.draw_models.load_draw_models`): the DMFA of the DMFA study (`results/dmfa/...`) and
# three small classifiers in `results/draw/`, so the notebook opens in seconds. Without them it
# trains them first (a few minutes on a CPU).
#
# Everything the widgets do is a plain function in `labkit.studies.draw` (stroke to mask, presets, panel
# computation), so the cells after the widget drive the same code with a scripted stroke: the
# notebook also runs headless (`./lab run --only 05`).

# %% tags=["parameters"]
profile = "quick"
device = "auto"
seed = 0
dataset = "mnist"
image_index = 0         # the test image shown first
n_images = 200          # the first n_images test images can be picked
scale = 10              # canvas pixels per image pixel: a 28x28 digit on a 280x280 canvas
brush = 1.5             # brush diameter in image pixels
n_samples = 3           # DMFA samples shown
dmfa_checkpoint = None  # None: the DMFA study's checkpoint (results/dmfa/...), else a fallback trained here
out_dir = None          # None: results/draw (the classifiers and any fallback DMFA)
n_train = 2000          # classifier training images, used only when results/draw lacks a checkpoint
epochs = 2
dmfa_n_train = 1000     # fallback DMFA, used only when no DMFA checkpoint exists
dmfa_epochs = 1

# %%
import time

import torch
from IPython.display import Image, Markdown, display

from labkit.lab.notices import offline_banner, shown_source
from labkit.studies import draw, draw_app
from labkit.studies.configs import DrawConfig

cfg = DrawConfig.from_namespace(globals())
started = time.perf_counter()
app = draw_app.open_app(cfg)        # the models ("load if it exists, otherwise train") and the test images
test = app.data
print(app.models.summary())
print(f"data: {shown_source(test)}")   # folders relative to the repository
print(f"models ready in {time.perf_counter() - started:.1f} s on {app.images.device}")
banner = offline_banner(test)
if banner:
    display(Markdown(banner))

# %% [markdown]
# ## The app

# %%
display(app.widget)

# %% [markdown]
# ## The same, scripted
#
# A stroke is a list of canvas points `(x, y)`; `app.stroke` paints the polyline through them
# exactly as a mouse drag does and recomputes the panels. Here: a horizontal line through the
# middle of the digit, then the three preset masks (with the figure that `draw.render_panels`
# saves: the same panels, with colour bars and the probability axis). The last cell clears the
# mask again, so the app above starts empty.

# %%
before = app.panels
side = app.width * app.scale
changed = app.stroke([(0.15 * side, 0.5 * side), (0.85 * side, 0.5 * side)])
after = app.panels
print(f"stroke: {changed} pixels painted, {before.n_missing} -> {after.n_missing} missing")
print(draw.format_probabilities(after))
assert after.n_missing == before.n_missing + changed > before.n_missing
assert app.count_html.value.count(str(after.n_missing)) >= 1
# the DMFA has something to say about the painted pixels, and the masked classifiers see a new input
assert float(after.std[:, after.missing].min()) > 0
assert not torch.equal(after.probs[draw_app.MISCONV], before.probs[draw_app.MISCONV])
assert torch.equal(after.probs[draw_app.COMPLETE], before.probs[draw_app.COMPLETE])
display(Image(draw.render_panels(after)))

# %%
rows = []
for kind in draw.PRESET_KINDS:
    app.preset(kind)
    p = app.panels
    rows.append({"mask": kind, "missing": p.n_missing,
                 **{name: f"{cls} ({prob:.2f})" for name, (cls, prob) in p.predictions().items()}})
    display(Image(draw.render_panels(p)))
import pandas as pd  # noqa: E402

print(f"image {app.index}, label {int(test.labels[app.index])}")
display(pd.DataFrame(rows).set_index("mask"))

# %%
app.clear()
assert app.panels.n_missing == 0
print(f"mask cleared; {app.n_updates} panel updates so far")
