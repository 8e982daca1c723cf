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
# # A tour of MisConv
#
# A convolutional network cannot look at a pixel that is not there. The usual fix is to *fill*
# the hole (with zeros, a mean, a guess) and pretend the guess is real. **MisConv** instead
# describes the missing pixels by a probability distribution — a **mixture of factor analyzers**
# (MFA) — and lets the first layer take the **exact expected activation** over that
# distribution:
#
# $$\mathrm{MisConv}(x) \;=\; \mathbb{E}_{Z \sim \mathrm{MFA}}\big[\mathrm{ReLU}\big(W * (x \odot (1-J) + Z \odot J) + b\big)\big]$$
#
# where $J$ is the missing mask. This notebook walks through the pieces, each checked against
# brute force:
#
# 1. the three kinds of missing data used in the studies;
# 2. an MFA: its mean, its factors, its samples — and conditioning it on what we do see;
# 3. the closed form of $\mathbb{E}[\mathrm{ReLU}(Y)]$ for a Gaussian $Y$, against Monte Carlo;
# 4. the `MisConv2d` layer, against Monte Carlo and against conv+ReLU on zero-filled images.
#
# Everything runs in well under a minute on a laptop CPU. Figures go to `results/tour/<profile>/`.

# %% tags=["parameters"]
profile = "quick"
device = "auto"
seed = 0
n_images = 8          # digits shown per figure
mc_samples = 20000    # largest Monte Carlo sample size in the convergence plots
n_fit = 1000          # training digits for the classical MFA
mfa_components = 4    # K
mfa_factors = 4       # L

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import labkit
from labkit import masks
from labkit.data import load_dataset
from labkit.mfa import MFA, fit_mfa
from labkit.misconv import MisConv2d, expected_relu

dev = labkit.resolve_device(device)
torch.manual_seed(seed)
out_dir = Path("..") / "results" / "tour" / profile
out_dir.mkdir(parents=True, exist_ok=True)
print(f"device: {dev}; figures -> {out_dir.resolve()}")


def show_row(axs, images, title=None, cmap="gray", **kw):
    """Draw (n, 1, H, W) images (NaN shown as a red-tinted hole) into a row of axes."""
    for ax, img in zip(axs, images):
        ax.imshow(img.squeeze(0).detach().cpu().numpy(), cmap=cmap, **kw)
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        axs[0].set_ylabel(title, rotation=0, ha="right", va="center")


# %% [markdown]
# ## 1. Missing data of three kinds
#
# A mask is a **bool** tensor of shape `(n, 1, H, W)` with `True` where the pixel is missing —
# never a 0/1/-1 code. The studies use:
#
# * **square** — a square of side $H/2$ (a quarter of the image) anywhere inside it;
# * **trapezoid** — a random trapezoid covering half the image;
# * **noise** — exactly $\tfrac34 HW$ pixels chosen uniformly.
#
# Every generator takes an explicit `torch.Generator`, so a seed reproduces the masks.

# %%
test = load_dataset("mnist", "test", limit=max(n_images, 64))
print(test.source)
x = test.images[:n_images]                                  # (n, 1, 28, 28) in [0, 1]
gen = torch.Generator().manual_seed(seed)
kinds = {k: masks.make_masks(k, n_images, 28, 28, generator=gen, device="cpu") for k in masks.MASK_KINDS}

fig, axes = plt.subplots(4, n_images, figsize=(1.3 * n_images, 5.6))
show_row(axes[0], x, "image")
for row, (kind, m) in enumerate(kinds.items(), start=1):
    shown = torch.where(m, torch.full_like(x, np.nan), x)  # NaN = missing, drawn as background
    show_row(axes[row], shown, f"{kind}\n{m[0].float().mean():.0%} missing")
    for ax in axes[row]:
        ax.set_facecolor("#d62728")
fig.suptitle("the three kinds of missing data (red = missing)")
fig.tight_layout()
fig.savefig(out_dir / "masks.png", dpi=120)
plt.show()

# %% [markdown]
# ## 2. A mixture of factor analyzers
#
# Component $k$ of an MFA is a Gaussian whose covariance is low rank plus diagonal:
# $\Sigma_k = A_k A_k^\top + \mathrm{diag}(d_k)$ with $L$ factor images $a_{k1}\dots a_{kL}$.
# It is cheap — storing it costs $(L+2)$ images per component — yet it captures how pixels move
# *together* (a stroke is either here or there), which a per-pixel guess cannot.
#
# Here we fit a small classical MFA to complete training digits by EM (`labkit.mfa.fit_mfa`)
# and look at it: component means, factors, and samples.

# %%
train = load_dataset("mnist", "train", limit=n_fit, quiet=True)
model, history = fit_mfa(train.images, mfa_components, mfa_factors, iterations=15, seed=seed, progress=False)
print(f"EM on {len(train)} digits: mean log-likelihood {history[0]:.1f} -> {history[-1]:.1f} nats/image")

K, L = mfa_components, mfa_factors
fig, axes = plt.subplots(K, L + 1 + 4, figsize=(1.2 * (L + 5), 1.3 * K), squeeze=False)
samples = model.as_mfa(1).sample(generator=torch.Generator().manual_seed(seed), n=64)[:, 0]
comp_of_sample = None
for k in range(K):
    show_row(axes[k, :1], model.means[k:k + 1], f"k={k}\np={model.weights[k]:.2f}")
    fac = model.factors[k]                                   # (L, 1, 28, 28)
    lim = fac.abs().max().item()
    show_row(axes[k, 1:L + 1], fac, cmap="RdBu_r", vmin=-lim, vmax=lim)
    show_row(axes[k, L + 1:], samples[4 * k:4 * k + 4].clamp(0, 1))
axes[0, 0].set_title("mean")
for j in range(L):
    axes[0, 1 + j].set_title(f"factor {j + 1}")
axes[0, L + 1].set_title("samples →")
fig.tight_layout()
fig.savefig(out_dir / "mfa.png", dpi=120)
plt.show()

# %% [markdown]
# ### Conditioning on what we see
#
# For MisConv what matters is the distribution of the **missing** pixels *given the observed
# ones*. For an MFA this is again an MFA, in closed form (`ClassicalMFA.condition`): the
# posterior over each component's factor loadings is Gaussian with the small $L\times L$
# precision $M_k = I + A_{ko}^\top D_{ko}^{-1} A_{ko}$, and the component weights are re-weighted
# by how well each component explains the observed pixels. A deep network (DMFA, notebook 01)
# predicts such a conditional MFA directly.

# %%
missing = kinds["square"]
cond = model.condition(torch.where(missing, torch.full_like(x, float("nan")), x), ~missing)
cs = cond.sample(generator=torch.Generator().manual_seed(seed + 1), n=3)      # (3, n, 1, 28, 28)
fill = lambda z: torch.where(missing, z, x).clamp(0, 1)                       # noqa: E731
fig, axes = plt.subplots(6, n_images, figsize=(1.3 * n_images, 8))
show_row(axes[0], torch.where(missing, torch.full_like(x, 0.5), x), "input\n(grey = missing)")
show_row(axes[1], fill(cond.mean()), "conditional\nmean")
for i in range(3):
    show_row(axes[2 + i], fill(cs[i]), f"sample {i + 1}")
show_row(axes[5], torch.where(missing, cond.variance().sqrt(), torch.zeros_like(x)), "std of the\nmissing pixels",
         cmap="magma")
fig.tight_layout()
fig.savefig(out_dir / "conditioning.png", dpi=120)
plt.show()

# %% [markdown]
# ## 3. The expected ReLU of a Gaussian
#
# Convolution is linear, so if the missing pixels are Gaussian (one MFA component), each output
# unit $Y$ of the convolution is Gaussian too, $Y \sim \mathcal N(\mu, \sigma^2)$. Its expected
# ReLU has a closed form:
#
# $$\mathbb E[\mathrm{ReLU}(Y)] = \mu\,\Phi\!\left(\tfrac{\mu}{\sigma}\right) + \sigma\,\varphi\!\left(\tfrac{\mu}{\sigma}\right),$$
#
# with $\Phi, \varphi$ the standard normal cdf and pdf. It tends to $\mathrm{ReLU}(\mu)$ as
# $\sigma\to 0$ and is always **larger** than $\mathrm{ReLU}(\mu)$ (Jensen): uncertainty about a
# pixel is information the next layer can use. Below, Monte Carlo estimates converge to the
# formula at the $1/\sqrt{n}$ rate (dashed).

# %%
mus = torch.tensor([-1.0, 0.0, 0.5], dtype=torch.float64)
sig = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
exact = expected_relu(mus, sig ** 2)
g = torch.Generator().manual_seed(seed)
draws = mus + sig * torch.randn(mc_samples, 3, generator=g, dtype=torch.float64)
ns = np.unique(np.logspace(1, np.log10(mc_samples), 30).astype(int))
running = torch.cumsum(torch.relu(draws), 0)[torch.as_tensor(ns) - 1] / torch.as_tensor(ns, dtype=torch.float64)[:, None]
err = (running - exact).abs().numpy()

fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
grid = torch.linspace(-3, 3, 200, dtype=torch.float64)
for s in (0.0, 0.5, 1.0, 2.0):
    a1.plot(grid, expected_relu(grid, torch.full_like(grid, s ** 2)), label=f"σ = {s}")
a1.set(xlabel="μ", ylabel="E[ReLU(N(μ, σ²))]", title="closed form (σ = 0 is ReLU)")
a1.legend()
for j in range(3):
    a2.loglog(ns, err[:, j] + 1e-12, label=f"μ={mus[j]:.1f}, σ={sig[j]:.1f}")
a2.loglog(ns, 1.0 / np.sqrt(ns), "k--", label="1/√n")
a2.set(xlabel="Monte Carlo samples n", ylabel="|MC − exact|", title="Monte Carlo converges to the formula")
a2.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out_dir / "expected_relu.png", dpi=120)
plt.show()
print("exact:", exact.numpy().round(5), " MC with", mc_samples, "samples:", running[-1].numpy().round(5))

# %% [markdown]
# ## 4. The `MisConv2d` layer
#
# For component $k$, every output unit of the convolution has
#
# * mean $\mu_k = W * (x\odot(1-J) + m_k\odot J) + b$ — observed pixels from $x$, missing ones from
#   the component mean (one convolution of one *filled* image);
# * variance $\sigma_k^2 = \sum_j (W * (a_{kj}\odot J))^2 + (W\odot W) * (d_k \odot J)$ — $L$ convolutions
#   of the masked factors plus one of the masked noise variances with the squared filter; the bias
#   does not enter, and nothing observed does.
#
# The layer returns $\sum_k p_k\,\mathbb E[\mathrm{ReLU}(\mathcal N(\mu_k,\sigma_k^2))]$: $(L+2)K$
# convolutions in all, batched. `MisConv2d` is a drop-in `nn.Conv2d` subclass: called with `x`
# alone it is conv+ReLU; with `(x, missing, mfa)` it is the expectation. Values of `x` at missing
# pixels never reach the output — we put NaN there to prove it.
#
# First the check that matters: the layer against Monte Carlo over samples of the conditional MFA.

# %%
torch.manual_seed(seed)
layer = MisConv2d(1, 8, 3, padding=1).double()
xd, md = x.double(), missing
cond64 = cond.to(torch.float64)
x_nan = torch.where(md, torch.full_like(xd, float("nan")), xd)
with torch.no_grad():
    exact_maps = layer(x_nan, md, cond64)                                 # (n, 8, 28, 28)
    g = torch.Generator().manual_seed(seed)
    sizes = np.unique(np.logspace(0, np.log10(max(mc_samples // 10, 10)), 12).astype(int))
    total, done, errs = torch.zeros_like(exact_maps), 0, []
    for n in sizes:
        while done < n:
            step = min(n - done, 500)
            z = cond64.sample(generator=g, n=step)                         # (step, n_img, 1, 28, 28)
            y = F.relu(F.conv2d(torch.where(md, z, xd).flatten(0, 1), layer.weight, layer.bias, padding=1))
            total += y.reshape(step, *exact_maps.shape).sum(0)
            done += step
        errs.append((total / done - exact_maps).abs().max().item())
print(f"max |MC - MisConv| with {done} samples: {errs[-1]:.2e} (output scale {exact_maps.abs().max():.2f})")
assert torch.isfinite(exact_maps).all(), "NaN at missing pixels must not reach the output"

fig, ax = plt.subplots(figsize=(5, 3.4))
ax.loglog(sizes, errs, "o-", label="max over all outputs")
ax.loglog(sizes, errs[0] / np.sqrt(sizes), "k--", label="∝ 1/√n")
ax.set(xlabel="Monte Carlo samples", ylabel="max |MC − MisConv2d|", title="MisConv2d is the exact expectation")
ax.legend()
fig.tight_layout()
fig.savefig(out_dir / "misconv_vs_mc.png", dpi=120)
plt.show()

# %% [markdown]
# ### What the next layer sees
#
# Finally, MisConv next to what a plain network would compute on the same digit: conv+ReLU of
# the **zero-filled** image, and of the **mean-filled** image (the MFA's best single guess).
# Zero filling creates a hard edge the filters respond to; mean filling removes the edge but
# forgets the uncertainty; MisConv keeps both the guess and the uncertainty (its activations
# inside the hole are larger than ReLU of the mean, by Jensen). Where nothing is missing, the
# three coincide exactly.

# %%
i, ch = 0, int(exact_maps[0].flatten(1).std(1).argmax())
with torch.no_grad():
    zero_maps = layer(torch.where(md, torch.zeros_like(xd), xd))
    mean_maps = layer(torch.where(md, cond64.mean(), xd))
    no_hole = torch.zeros_like(md)
    same = torch.equal(layer(xd, no_hole, cond64), layer(xd))
print("no missing pixels -> MisConv2d == conv+ReLU exactly:", same)
assert same

panels = [
    ("input (grey = missing)", torch.where(md, torch.full_like(xd, 0.5), xd)[i, 0]),
    ("conv+ReLU, zero-filled", zero_maps[i, ch]),
    ("conv+ReLU, mean-filled", mean_maps[i, ch]),
    ("MisConv (expectation)", exact_maps[i, ch]),
    ("MisConv − mean-filled", exact_maps[i, ch] - mean_maps[i, ch]),
]
fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
vmax = max(p[1].max().item() for p in panels[1:4])
for ax, (title, img) in zip(axes, panels):
    kw = dict(cmap="gray") if title.startswith("input") else dict(cmap="viridis", vmin=0, vmax=vmax)
    if title.startswith("MisConv −"):
        kw = dict(cmap="magma")
    im = ax.imshow(img.numpy(), **kw)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
fig.colorbar(im, ax=axes[-1], fraction=0.046)
fig.suptitle(f"feature map {ch} of an untrained 3×3 layer")
fig.tight_layout()
fig.savefig(out_dir / "misconv_vs_imputation.png", dpi=120)
plt.show()
gap = (exact_maps - mean_maps)[md.expand_as(exact_maps[:, :1]).expand_as(exact_maps)]
print(f"inside the hole MisConv − ReLU(mean-filled) ≥ 0 (Jensen): min {gap.min():.2e}, mean {gap.mean():.3f}")

# %% [markdown]
# ## Where next
#
# * `01_dmfa` trains a **deep** MFA (DMFA) that predicts the conditional MFA of a hole from the
#   rest of the image — on complete images or on images that are themselves incomplete.
# * `02_classification` compares MisConv with every baseline on square, trapezoid and noise masks.
# * `03_wae` uses MisConv in the encoder of a Wasserstein autoencoder.
# * `04_timing` measures what the $(L+2)K$ convolutions cost.
# * `05_draw_a_mask` lets you draw a hole and watch the models react.
