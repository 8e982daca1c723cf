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
# # Classification with missing data: MisConv against every baseline
#
# The paper's supplementary **Table 1**: a small CNN classifies MNIST digits whose training *and*
# test images carry the same kind of missing data — a **square** (1/4 of the image), a
# **trapezoid** (1/2) or **noise** (3/4 of the pixels). Only the classifier's first
# `conv + ReLU` changes between methods: it is a *missing-data front* (`labkit.models.fronts`):
#
# | method | first layer |
# |---|---|
# | `zero` | conv of the image with zeros at missing pixels |
# | `mask` | the same, plus the mask as an extra input channel |
# | `knn` | conv of the image completed by scikit-learn's `KNNImputer` (fitted on *incomplete* training images) |
# | `pc` | partial convolution (Liu et al. 2018): re-normalised over the observed pixels of each window |
# | `mfa_mean` / `mfa_misconv` | a classical MFA (EM on the training images): its conditional mean, or MisConv over the conditional MFA |
# | `dmfa_mean_*` / `dmfa_misconv_*` | the deep MFA of notebook 01, trained on complete images, or on incomplete images that carry the same kind of missing data as the column (one DMFA per mask kind): mean imputation, or MisConv |
# | `acflow` | ACFlow imputation |
# | `gt` | the complete images (the ceiling) |
#
# Protocol: the imputers are frozen and run once per data set; the classifier (Adam, cross-entropy)
# trains on the training split minus a validation split, which picks the epoch; the test set
# gives the final number only. Every finished (dataset, mask, method, seed) cell is written to
# `results/classification/<profile>/accuracy.csv` at once, so rerunning this notebook (or
# `scripts/run_classification.py`) skips what is done and resumes an interrupted cell.

# %% tags=["parameters"]
from typing import Optional  # the annotations below mark the parameters that also take None

profile = "quick"
device = "auto"
seed = 0
dataset = "mnist"
masks = ["square"]
methods = ["zero", "mask", "pc", "mfa_misconv", "gt"]
epochs: Optional[int] = 1             # None: the paper's value for the data set (also batch_size, lr)
batch_size: Optional[int] = 24
lr: Optional[float] = 1.0e-3
seeds = [0]
n_train: Optional[int] = 500  # training images loaded, a validation split carved out of them (None: all)
n_test: Optional[int] = 200   # test images (None: all)
val_fraction = 0.1
knn_fit = 5000         # incomplete training images the KNNImputer is fitted on
mfa_components = 4     # classical MFA: K
mfa_factors = 4        # classical MFA: L
dmfa_complete = "results/dmfa/cpu/{dataset}_complete.pt"      # frozen DMFAs (notebook 01), relative to the repo
dmfa_incomplete = "results/dmfa/cpu/{dataset}_incomplete{mask_suffix}.pt"  # per mask kind: "" (square), "_trapezoid", "_noise"
acflow = "results/acflow/acflow_{dataset}.pt"                  # frozen ACFlow (scripts/train_acflow.py)
results_dir = None     # default: results/classification/<profile>

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from labkit.checkpoint import machine_description
from labkit.device import resolve_device
from labkit.studies import classification as clf
from labkit.studies.imputers import method_available

grid, cfg = clf.sweep_config(
    profile, dataset=dataset, masks=masks, methods=methods, epochs=epochs, batch_size=batch_size, lr=lr,
    seeds=seeds, n_train=n_train, n_test=n_test, val_fraction=val_fraction, knn_fit=knn_fit,
    mfa_components=mfa_components, mfa_factors=mfa_factors, dmfa_complete=dmfa_complete,
    dmfa_incomplete=dmfa_incomplete, acflow=acflow, results_dir=results_dir, device=device)
out_dir = cfg.results_path()
print(f"machine: {machine_description()}; device: {resolve_device(device)}")
print(f"grid: {grid}")
print(f"results: {out_dir}")
for m in grid["methods"]:
    whys = sorted({w for k in grid["masks"] if (w := method_available(m, cfg, dataset, k))})
    print(f"  {m:<24} {'ready' if not whys else 'NOT READY: ' + '; '.join(whys)}")

# %% [markdown]
# ## The missing data
#
# Each image gets its own mask, fixed by (data set, split, mask kind, seed); training and test
# images carry the same kind.

# %%
from labkit.data import load_dataset
from labkit.studies.cells import cell_masks

sample = load_dataset(dataset, "test", limit=6, quiet=True).images
kinds = ["square", "trapezoid", "noise"]
fig, axes = plt.subplots(len(kinds), 6, figsize=(7, 3.6))
for r, kind in enumerate(kinds):
    miss = cell_masks(dataset, "test", kind, 0, 6, *sample.shape[-2:])
    for c in range(6):
        shown = sample[c].masked_fill(miss[c], float("nan"))[0] if sample.shape[1] == 1 else \
            sample[c].masked_fill(miss[c].expand_as(sample[c]), 0.5).permute(1, 2, 0)
        axes[r, c].imshow(shown, cmap="gray", vmin=0, vmax=1)
        axes[r, c].axis("off")
    axes[r, 0].set_title(kind, fontsize=8, loc="left")
fig.suptitle("test images with their masks (missing pixels blank)", fontsize=9)
plt.show()

# %% [markdown]
# ## The sweep
#
# Resumable: cells already in the CSV are skipped. Methods whose imputer has no checkpoint yet
# (DMFA: `results/dmfa/cpu/`, ACFlow: `results/acflow/`) are skipped with a message.

# %%
df = clf.run_sweep(grid["datasets"], grid["masks"], grid["methods"], grid["seeds"], cfg.profile, config=cfg,
                   progress=True)
df = df[df["method"].isin(grid["methods"]) & df["mask"].isin(grid["masks"]) & (df["dataset"] == dataset)]
df

# %% [markdown]
# ## Table 1, ours beside the paper's
#
# Mean ± standard deviation over seeds (n = number of seeds); the paper's columns are its
# supplementary Table 1, the last column the authors' public code (single seed, squares). The best
# of our methods in each column (ground truth excluded) is in bold.

# %%
display(Markdown(clf.table_markdown(df)))
print(clf.pivot_table(df).to_string())

# %%
fig = clf.plot_results(df, out_dir / "accuracy.png", title=f"{dataset} test accuracy, profile {cfg.profile}")
plt.show()
(out_dir / "accuracy.md").write_text(f"Classification accuracy, profile `{cfg.profile}` "
                                     "(mean ± std over seeds; n = seeds)\n\n" + clf.table_markdown(df) + "\n")
print(f"wrote {out_dir / 'accuracy.png'} and {out_dir / 'accuracy.md'}")

# %% [markdown]
# ## What does the variance add? Paired differences
#
# Cells with the same seed share their masks, initialisation and batch order, so MisConv minus
# mean imputation *from the same density*, seed by seed, is a much sharper comparison than two
# separate means: it isolates what passing the variance to the first layer buys.

# %%
pairs = [("dmfa_misconv_complete", "dmfa_mean_complete"), ("dmfa_misconv_incomplete", "dmfa_mean_incomplete"),
         ("mfa_misconv", "mfa_mean")]
for a, b in pairs:
    if {a, b} <= set(df["method"]):
        print(f"{a} − {b}:")
        print(clf.paired_differences(df, a, b).round(4).to_string(), end="\n\n")

# %% [markdown]
# ## Reading the numbers
#
# The findings for the committed `cpu` run (which method wins where, and why MisConv does or does
# not) are in the README's classification section. Things to keep in mind when reading any run:
#
# - the `quick` profile trains on a few hundred images for one epoch: it shows that the pipeline
#   works, not the paper's accuracies;
# - MisConv is only as good as the density behind it: compare `*_misconv` with the matching
#   `*_mean` row (same density, mean only) to see what the variance adds;
# - `runs.jsonl` beside the CSV records, per cell, the epoch the validation split chose, the
#   validation accuracy per epoch, the wall time and the machine.
