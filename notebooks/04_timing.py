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
# # What MisConv costs: the paper's timing study, and more
#
# MisConv replaces the first conv + ReLU of a network. For each image it convolves the observed
# pixels filled with the MFA's mean, each of the `L` factors and the variances (with `W⊙W`), per
# mixture component: `(L+2)·K` convolutions where a plain layer does one, plus the normal cdf
# and pdf of every output. The paper (supplementary Table 2, Figure 2) timed one forward pass on
# a GPU — 32 filters 3×3, `K = 1`, `L = 4`, images of 28 (1 channel), 32 and 64 pixels (3
# channels) with a missing square of side `I/2`, batches of 16, 32 and 64 — and found MisConv
# 2.6× to 6.9× slower than the plain layer.
#
# This notebook
#
# 1. repeats that grid (`torch.utils.benchmark`, the layers measured **interleaved**, one call
#    each per round) and puts our figures beside the paper's, with Figure-2-style box plots;
# 2. adds what the paper left out: the backward pass, `K > 1` and `L` from 1 to 16, and the cost
#    **end to end per image**: DMFA + MisConv + the rest of the classifier against the classifier
#    on complete images — the DMFA, not the layer, is the method's real price.
#
# **How MisConv is computed here** (`labkit/misconv.py`). The default *fast* path only does the
# variance work where it matters: an output whose receptive field holds no missing pixel has
# variance 0 and is plain `ReLU(μ)`. Per image it crops a window around the missing pixels (the
# bounding box widened by the kernel's reach), runs the factor and variance convolutions on the
# crops (for one-channel images inside the fused kernel itself) and computes Φ, φ, the mixture
# and the scatter back into the output in one `torch.compile`-d kernel. The *eager* path
# (`fast=False`) is the formula as written: `(L+2)·K` full-size convolutions and a dozen
# elementwise passes. Tests hold both equal (outputs and gradients).
#
# **Clocks.** On a GPU we time elapsed (wall) time, like the paper. On a CPU shared with other
# jobs, elapsed time mostly measures how often the scheduler preempted a call; the default
# `clock = "auto"` then measures the CPU time of the computing thread instead (one intra-op
# thread by default, `threads = 1`). Absolute times are those of the machine printed below.

# %% tags=["parameters"]
profile = "quick"
device = "auto"
seed = 0
repeats = 20              # measurements per setting and layer (paper: 5000)
sizes = [28]              # image sizes; channels: 1 for 28, 3 otherwise; hole: size // 2
batch_sizes = [16]
eager_repeats = 3         # measurements of the eager path (slow; 0: skip it)
threads = 1               # torch intra-op threads (0: leave the default)
clock = "auto"            # auto | wall | cpu (see above)
tune_malloc = True        # keep freed memory in the process (see labkit.studies.timing.tune_malloc)
backward = True           # also time forward + backward
component_cell = [28, 16] # image size and batch of the K / L sweep
Ks = [1, 2]
Ls = [1, 4]
end_to_end_datasets = ["mnist"]   # mnist | svhn | cifar10 | celeba ([]: skip)
end_to_end_batch = 16
end_to_end_repeats = 3
results_dir = None        # default: results/timing/<profile>

# %%
from IPython.display import Image, Markdown, display

from labkit.studies import timing
from labkit.studies.configs import TimingConfig

cfg = TimingConfig.from_namespace(globals())
results = timing.run(cfg)                       # every grid of the config, rows written as they finish
written = timing.write_report(cfg, results)     # tables, figures and summary.md beside them
out_dir = timing.results_path(cfg)
tables = timing.report_tables(results)
machine = results["machine"].iloc[0]
display(Markdown(f"**Machine:** {machine['summary']}; {machine['torch_threads']} torch thread(s); "
                 f"load average {machine['load_average_1_5_15']}; malloc tuned: {machine['malloc_tuned']}; "
                 f"MisConv may compile: {machine['misconv_compile']}. Results in `{out_dir}`."))

# %% [markdown]
# ## 1. The paper's grid: one forward pass

# %%
table = tables["forward_ratios"]
print(f"clock: {results['forward']['clock'].iloc[0]}")
print(timing.format_table(table))

# %% [markdown]
# Each row: mean ± std of one call of conv2d + ReLU and of MisConv (fast path), the ratio of the
# medians over interleaved rounds, the target `1.25·(L+2)·K` (7.5 for `K = 1, L = 4`: a quarter
# above the `(L+2)·K` convolutions a direct implementation needs), and the paper's GPU figures.

# %%
if "forward_ratios_eager" in tables:
    eager = tables["forward_ratios_eager"]
    print("Eager path (the formula as written), against conv2d + ReLU measured alongside it:")
    print(timing.format_table(eager))
    speedup = eager.set_index(["size", "batch"]).misconv_median / table.set_index(["size", "batch"]).misconv_median
    display(Markdown("Fast path speed-up over the eager path (medians): "
                     + ", ".join(f"I={s} B={b}: {v:.1f}×" for (s, b), v in speedup.items())))

# %%
display(Image(filename=str(out_dir / "forward_boxplots.png")))

# %% [markdown]
# ## 2. Backward pass
#
# Training MisConv means a backward pass too (gradients of the layer's weight and bias; the MFA
# comes from a frozen DMFA in the paper's protocol). The fast path differentiates its fused
# kernel by hand (`∂E/∂μ = Φ(t)`, `∂E/∂σ² = φ(t)/(2σ)`).

# %%
if "backward_ratios" in tables:
    print("Forward + backward (the paper's columns are its forward-only figures, for scale):")
    print(timing.format_table(tables["backward_ratios"]))

# %% [markdown]
# ## 3. Mixture components K and factors L
#
# The convolution count grows as `(L+2)·K`; the window and the fused kernel change the constant,
# not the growth. Below: the ratio to conv2d + ReLU against that count.

# %%
if "components_ratios" in tables:
    print(timing.format_table(tables["components_ratios"]))
    display(Image(filename=str(out_dir / "components.png")))

# %% [markdown]
# ## 4. End to end, per image
#
# What a classifier with MisConv costs at inference: the DMFA that predicts the MFA of each image,
# then the classifier whose first layer is MisConv, against the same classifier on complete
# images. Freshly initialised networks (timing does not depend on the weights), eval mode, no
# gradients.

# %%
if "end_to_end_summary" in tables:
    display(Markdown("Milliseconds per image (medians):"))
    display(tables["end_to_end_summary"].round(3))

# %% [markdown]
# ## 5. Summary

# %%
display(Markdown((out_dir / "summary.md").read_text()))
