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
# > M. Przewięźlikowski, M. Śmieja, Ł. Struski, J. Tabor, *MisConv: Convolutional Neural Networks
# > for Missing Data*, WACV 2022, [arXiv:2110.14010](https://arxiv.org/abs/2110.14010). This tour
# > follows the paper's method: the missing pixels described by a mixture of factor
# > analyzers, and the closed form of the expected convolution followed by ReLU.
#
# A convolutional network cannot look at a pixel that is not there. The usual fix is to *fill*
# the hole (with zeros, a mean, a guess) and pretend the guess is real. **MisConv** instead
# describes the missing pixels by a probability distribution, a **mixture of factor analyzers**
# (MFA), and lets the first layer take the **exact expected activation** over that distribution:
#
# $$\mathrm{MisConv}(x) \;=\; \mathbb{E}_{Z \sim \mathrm{MFA}}\big[\mathrm{ReLU}\big(W * (x \odot (1-J) + Z \odot J) + b\big)\big]$$
#
# where $J$ is the missing mask (1 = missing). Each section below has the same four steps: what the
# idea is, its equation, the code that computes it, and a check of the code against brute force:
#
# 1. the three kinds of missing data of the paper's Table 1;
# 2. an MFA: its means, factors and samples, and conditioning it on what we do see;
# 3. the closed form of $\mathbb{E}[\mathrm{ReLU}(Y)]$ for a Gaussian $Y$, against Monte Carlo;
# 4. the MisConv layer: the formula, its reference implementation `labkit.misconv.misconv_reference`
#    (printed below), the `MisConv2d` module held equal to it, and both against Monte Carlo.
#
# The [math page](../docs/math.md) has the derivations. The tour runs in about a minute on a
# laptop CPU. Figures go to `results/tour/<profile>/` (`./lab figures` copies the quick profile's
# into `docs/figures/tour/`); every panel whose colour encodes a value has a colour bar.

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
import inspect

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from matplotlib.patches import Patch

import labkit
from labkit import masks, paths
from labkit.data import load_dataset
from labkit.lab.notices import offline_banner, shown_source
from labkit.mfa import fit_mfa
from labkit.misconv import MisConv2d, expected_relu, misconv_reference
from labkit.studies.configs import TourConfig

cfg = TourConfig.from_namespace(globals())
dev = labkit.resolve_device(cfg.device)
torch.manual_seed(cfg.seed)
out_dir = paths.results_dir("tour", cfg.profile)     # stable names: ./lab figures copies them to docs/
out_dir.mkdir(parents=True, exist_ok=True)
print(f"device: {dev}; figures -> {out_dir}")

MISSING = "#d62728"                                   # missing pixels are drawn red everywhere
GREY = plt.get_cmap("gray").with_extremes(bad=MISSING)
PIXEL = "pixel value (0 = black, 1 = white)"


def show_row(axs, images, title=None, cmap=GREY, vmin=0.0, vmax=1.0):
    """Draw (n, 1, H, W) images into a row of axes, all on the one colour scale [vmin, vmax] (never
    rescaled per image, so a colour bar can say what a colour means); NaN is drawn red (missing).
    Returns the last AxesImage, for the colour bar."""
    for ax, img in zip(axs, images):
        im = ax.imshow(img.squeeze(0).detach().cpu().numpy(), cmap=cmap, vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        axs[0].set_ylabel(title, rotation=0, ha="right", va="center")
    return im


def hide(images, missing):
    """The images with NaN at missing pixels: what a study sees (and what show_row draws red)."""
    return torch.where(missing, torch.full_like(images, float("nan")), images)


# %% [markdown]
# ## 1. Missing data of three kinds
#
# A mask is a **bool** tensor of shape `(n, 1, H, W)` with `True` where the pixel is missing,
# never a 0/1/−1 code. The paper's Table 1 uses three kinds (`labkit.masks.DEFAULT_MASK_KINDS`):
#
# * **square**: a square of side $H/2$ (a quarter of the image) anywhere inside it;
# * **trapezoid**: a random straight line through the image centre cuts the image into two
#   trapezoids, and one of them, half of the image, is missing;
# * **noise**: exactly $\tfrac34 HW$ pixels chosen uniformly.
#
# Every generator takes an explicit `torch.Generator`, so a seed reproduces the masks. The values
# under a mask mean nothing: the lab puts NaN there, so that a leak would show.

# %%
test = load_dataset("mnist", "test", limit=max(cfg.n_images, 64), quiet=True)
print(shown_source(test))    # folders relative to the repository
banner = offline_banner(test)
if banner:
    display(Markdown(banner))

# %%
x = test.images[:cfg.n_images]                                  # (n, 1, 28, 28) in [0, 1]
gen = torch.Generator().manual_seed(cfg.seed)
table1 = masks.DEFAULT_MASK_KINDS                              # the three kinds of the paper's Table 1
kinds = {k: masks.make_masks(k, cfg.n_images, 28, 28, generator=gen, device="cpu") for k in table1}
for kind, m in kinds.items():
    print(f"{kind:10s} {m.float().mean():6.1%} of the pixels missing")

fig, axes = plt.subplots(1 + len(kinds), cfg.n_images, figsize=(1.3 * cfg.n_images + 1.4, 1.35 * (1 + len(kinds))),
                         layout="constrained")
im = show_row(axes[0], x, "image")
for row, (kind, m) in enumerate(kinds.items(), start=1):
    show_row(axes[row], hide(x, m), f"{kind}\n{m.float().mean():.0%} missing")
fig.colorbar(im, ax=axes, label=PIXEL, shrink=0.8)
fig.legend(handles=[Patch(color=MISSING, label="missing")], loc="outside upper right", frameon=False)
fig.suptitle("the paper's three kinds of missing data")
fig.savefig(out_dir / "masks.png", dpi=120)
plt.show()

# %% [markdown]
# ## 2. A mixture of factor analyzers
#
# An MFA with $K$ components is the density
#
# $$p(x) = \sum_{k=1}^K p_k\,\mathcal N\big(x;\ m_k,\ A_k A_k^\top + \mathrm{diag}(d_k)\big):$$
#
# pick component $k$ with probability $p_k$, draw $L$ loadings $z \sim \mathcal N(0, I)$, and set
# $x = m_k + A_k z + \varepsilon$ with pixel noise $\varepsilon \sim \mathcal N(0, \mathrm{diag}\,d_k)$.
# The $L$ columns $a_{k1}\dots a_{kL}$ of $A_k$ are images. A component costs $L + 2$ images of
# storage, yet it captures how pixels move *together* (a stroke is either here or there), which
# a per-pixel guess cannot.
#
# Here we fit a small classical MFA to complete training digits by EM (`labkit.mfa.fit_mfa`)
# and look at it. Check: the EM log-likelihood must increase.

# %%
train = load_dataset("mnist", "train", limit=cfg.n_fit, quiet=True)
model, history = fit_mfa(train.images, cfg.mfa_components, cfg.mfa_factors, iterations=15, seed=cfg.seed,
                         progress=False)
print(f"EM on {len(train)} digits: mean log-likelihood {history[0]:.1f} -> {history[-1]:.1f} nats/image")
assert history[-1] > history[0]

K, L = cfg.mfa_components, cfg.mfa_factors
samples = model.as_mfa(1).sample(generator=torch.Generator().manual_seed(cfg.seed), n=4 * K)[:, 0]
lim = model.factors.abs().max().item()                      # one colour scale for every factor
fig, axes = plt.subplots(K, L + 5, figsize=(1.2 * (L + 5) + 2.2, 1.3 * K + 0.9), squeeze=False,
                         layout="constrained")
for k in range(K):
    im_grey = show_row(axes[k, :1], model.means[k:k + 1], f"k={k}\np={model.weights[k]:.2f}")
    im_fac = show_row(axes[k, 1:L + 1], model.factors[k], cmap="RdBu_r", vmin=-lim, vmax=lim)
    show_row(axes[k, L + 1:], samples[4 * k:4 * k + 4].clamp(0, 1))
axes[0, 0].set_title("mean")
for j in range(L):
    axes[0, 1 + j].set_title(f"factor {j + 1}")
axes[0, L + 1].set_title("samples →")
fig.colorbar(im_fac, ax=axes[:, 1:L + 1], location="bottom", shrink=0.8,
             label="factor value (pixel value per unit of loading z)")
fig.colorbar(im_grey, ax=axes, label=PIXEL + "\n(means; samples clipped to [0, 1])", shrink=0.8)
fig.savefig(out_dir / "mfa.png", dpi=120)
plt.show()

# %% [markdown]
# ### Conditioning on what we see
#
# For MisConv what matters is the distribution of the **missing** pixels $m$ *given the observed
# ones* $o$. For an MFA this is again an MFA, in closed form (`ClassicalMFA.condition`). Under
# component $k$ the loadings have the Gaussian posterior
#
# $$z \mid x_o, k \sim \mathcal N\big(\bar z_k,\ M_k^{-1}\big),\qquad M_k = I + A_{ko}^\top D_{ko}^{-1} A_{ko},\qquad \bar z_k = M_k^{-1} A_{ko}^\top D_{ko}^{-1}(x_o - m_{ko}),$$
#
# so the missing pixels have mean $m_{km} + A_{km}\bar z_k$ and covariance
# $A_{km} M_k^{-1} A_{km}^\top + D_{km}$, and the component weights are re-weighted by how well
# each component explains the observed pixels. A deep network (DMFA, notebook 01) predicts such
# a conditional MFA directly. Check: at observed pixels the conditional mean is the image itself
# and the factors are zero (MisConv reads the conditional MFA only at the missing pixels).

# %%
missing = kinds["square"]
cond = model.condition(hide(x, missing), ~missing)
obs_factors = cond.factors[(~missing)[:, None, None].expand_as(cond.factors)]   # (B, K, L, 1, H, W) at observed pixels
assert torch.allclose(cond.mean()[~missing], x[~missing]) and (obs_factors == 0).all()
cs = cond.sample(generator=torch.Generator().manual_seed(cfg.seed + 1), n=3)      # (3, n, 1, 28, 28)
fill = lambda z: torch.where(missing, z, x).clamp(0, 1)                       # noqa: E731
std = torch.where(missing, cond.variance().sqrt(), torch.zeros_like(x))       # 0 where observed
fig, axes = plt.subplots(6, cfg.n_images, figsize=(1.3 * cfg.n_images + 2.2, 8.4), layout="constrained")
show_row(axes[0], hide(x, missing), "input")
show_row(axes[1], fill(cond.mean()), "conditional\nmean")
for i in range(3):
    im_grey = show_row(axes[2 + i], fill(cs[i]), f"sample {i + 1}")
im_std = show_row(axes[5], std, "std of the\nmissing pixels", cmap="magma", vmin=0.0, vmax=float(std.max()))
fig.colorbar(im_grey, ax=axes[:5], label=PIXEL + "\n(samples clipped to [0, 1])", shrink=0.8)
fig.colorbar(im_std, ax=axes[5], label="std\n(pixel value)")
fig.legend(handles=[Patch(color=MISSING, label="missing")], loc="outside upper right", frameon=False)
fig.savefig(out_dir / "conditioning.png", dpi=120)
plt.show()

# %% [markdown]
# ## 3. The expected ReLU of a Gaussian
#
# Convolution is linear, so if the missing pixels are Gaussian (one MFA component), each output
# unit $Y$ of the convolution is Gaussian too, $Y \sim \mathcal N(\mu, \sigma^2)$. Substituting
# $y = \mu + \sigma s$, its expected ReLU has a closed form:
#
# $$\mathbb E[\mathrm{ReLU}(Y)] = \int_{-\mu/\sigma}^{\infty} (\mu + \sigma s)\,\varphi(s)\,ds = \mu\,\Phi\!\left(\tfrac{\mu}{\sigma}\right) + \sigma\,\varphi\!\left(\tfrac{\mu}{\sigma}\right),$$
#
# with $\Phi, \varphi$ the standard normal cdf and pdf. It tends to $\mathrm{ReLU}(\mu)$ as
# $\sigma\to 0$ and is never **smaller** than $\mathrm{ReLU}(\mu)$ (Jensen: ReLU is convex):
# uncertainty about a pixel is information the next layer can use. The code is
# `labkit.misconv.expected_relu`:

# %%
print(inspect.getsource(expected_relu))

# %% [markdown]
# Check: Monte Carlo estimates converge to the formula at the $1/\sqrt{n}$ rate (dashed).

# %%
mus = torch.tensor([-1.0, 0.0, 0.5], dtype=torch.float64)
sig = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
exact = expected_relu(mus, sig ** 2)
g = torch.Generator().manual_seed(cfg.seed)
draws = mus + sig * torch.randn(cfg.mc_samples, 3, generator=g, dtype=torch.float64)
ns = np.unique(np.logspace(1, np.log10(cfg.mc_samples), 30).astype(int))
running = torch.cumsum(torch.relu(draws), 0)[torch.as_tensor(ns) - 1] / torch.as_tensor(ns, dtype=torch.float64)[:, None]
err = (running - exact).abs().numpy()
se = (torch.relu(draws).std(0) / cfg.mc_samples ** 0.5)
assert ((running[-1] - exact).abs() < 5 * se).all(), "Monte Carlo disagrees with the formula"

fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
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
fig.savefig(out_dir / "expected_relu.png", dpi=120)
plt.show()
print("exact:", exact.numpy().round(5), " MC with", cfg.mc_samples, "samples:", running[-1].numpy().round(5),
      " (standard errors", se.numpy().round(5), ")")

# %% [markdown]
# ## 4. The MisConv layer
#
# **The formula.** Take a convolution with weight $W$ of shape $(C_\text{out}, C_\text{in}, k_h, k_w)$
# and bias $b$. Under component $k$ of the MFA, every output unit of the convolution is Gaussian
# with
#
# $$\mu_k = W * \big(x\odot(1-J) + m_k\odot J\big) + b,\qquad
# \sigma_k^2 = \sum_{l=1}^{L} \big(W * (a_{kl}\odot J)\big)^2 + (W\odot W) * (d_k\odot J):$$
#
# the mean takes the observed pixels from $x$ and the missing ones from the component mean (one
# convolution of one *filled* image); the variance needs $L$ convolutions of the masked factors and
# one of the masked noise variances with the squared filter (the variance of a weighted sum
# $\sum_i w_i Z_i$ under a low-rank-plus-diagonal covariance). The bias does not enter the
# variance, and nothing observed does. An expectation is linear in the distribution, so the layer
# returns the mixture of the paper's formula:
#
# $$\mathrm{MisConv}(x) = \sum_{k=1}^K p_k\Big(\mu_k\,\Phi(\mu_k/\sigma_k) + \sigma_k\,\varphi(\mu_k/\sigma_k)\Big),
# \qquad\text{shape } (B, C_\text{out}, H_\text{out}, W_\text{out}).$$
#
# **The code.** `labkit.misconv.misconv_reference` computes exactly this, in three plain `conv2d`
# calls, $(L+2)K$ convolutions of the input's size; each line's comment names its term. Missing
# values are kept out with `torch.where`, never by multiplying with the mask (NaN·0 is NaN).

# %%
print(inspect.getsource(misconv_reference))

# %% [markdown]
# **Check 1: the module is the formula.** `MisConv2d` is a drop-in `nn.Conv2d` subclass: called
# with `x` alone it is conv+ReLU; with `(x, missing, mfa)` it is the expectation, computed by a
# fused fast path. On the digits with a square hole, in float64, with the conditional MFA of
# section 2, it must equal the reference. We put NaN at the missing pixels to show that their
# values never reach the output, and check that with nothing missing the layer is conv+ReLU exactly.

# %%
torch.manual_seed(cfg.seed)
layer = MisConv2d(1, 8, 3, padding=1).double()
xd, md = x.double(), missing
cond64 = cond.to(torch.float64)
x_nan = hide(xd, md)
with torch.no_grad():
    reference = misconv_reference(x_nan, md, cond64, layer.weight, layer.bias, padding=1)   # (n, 8, 28, 28)
    exact_maps = layer(x_nan, md, cond64)
    torch.testing.assert_close(exact_maps, reference)
    assert torch.isfinite(exact_maps).all(), "NaN at missing pixels must not reach the output"
    same = torch.equal(layer(xd, torch.zeros_like(md), cond64), layer(xd))
assert same
print(f"MisConv2d == misconv_reference on {len(x)} digits (float64): max |difference| "
      f"{(exact_maps - reference).abs().max():.1e}")
print("nothing missing -> MisConv2d == conv+ReLU exactly:", same)

# %% [markdown]
# **Check 2: the formula is the expectation.** Draw the missing pixels from the conditional MFA,
# fill them in, apply conv+ReLU, and average: the average must approach the layer's output, with
# the largest error over all outputs falling as $1/\sqrt n$. (The test suite,
# `tests/test_misconv.py`, makes the same check with 100,000 draws and standard errors, and shows
# that it fails for a layer whose $\sigma\varphi$ term is halved.)

# %%
with torch.no_grad():
    g = torch.Generator().manual_seed(cfg.seed)
    sizes = np.unique(np.logspace(0, np.log10(max(cfg.mc_samples // 10, 10)), 12).astype(int))
    total, done, errs = torch.zeros_like(exact_maps), 0, []
    for n in sizes:
        while done < n:
            step = min(n - done, 500)
            z = cond64.sample(generator=g, n=step)                         # (step, n_img, 1, 28, 28)
            y = F.relu(F.conv2d(torch.where(md, z, xd).flatten(0, 1), layer.weight, layer.bias, padding=1))
            total += y.reshape(step, *exact_maps.shape).sum(0)
            done += step
        errs.append((total / done - exact_maps).abs().max().item())
scale = exact_maps.abs().max().item()
print(f"max |MC - MisConv| over all {exact_maps.numel():,} outputs: {errs[0]:.2e} with 1 sample, "
      f"{errs[-1]:.2e} with {done} (1/√n predicts {errs[0] / np.sqrt(done):.2e}); output scale {scale:.2f}")
assert errs[-1] < errs[0] / 10 and errs[-1] < 0.05 * scale, "Monte Carlo does not approach MisConv2d"

fig, ax = plt.subplots(figsize=(5, 3.4), layout="constrained")
ax.loglog(sizes, errs, "o-", label="max over all outputs")
ax.loglog(sizes, errs[0] / np.sqrt(sizes), "k--", label="∝ 1/√n")
ax.set(xlabel="Monte Carlo samples", ylabel="max |MC − MisConv2d|", title="MisConv2d is the exact expectation")
ax.legend()
fig.savefig(out_dir / "misconv_vs_mc.png", dpi=120)
plt.show()

# %% [markdown]
# ### What the next layer sees
#
# Finally, MisConv next to what a plain network would compute on the same digit: conv+ReLU of
# the **zero-filled** image, and of the **mean-filled** image (the MFA's best single guess).
# Zero filling creates a hard edge the filters respond to; mean filling removes the edge but
# forgets the uncertainty; MisConv keeps both the guess and the uncertainty. Check: its
# activations are never below those of the mean-filled image (Jensen's inequality), and where no
# missing pixel is in a filter's window the three coincide exactly.

# %%
i, ch = 0, int(exact_maps[0].flatten(1).std(1).argmax())
with torch.no_grad():
    zero_maps = layer(torch.where(md, torch.zeros_like(xd), xd))
    mean_maps = layer(torch.where(md, cond64.mean(), xd))
gap = exact_maps - mean_maps
# outputs whose 3x3 window holds no missing pixel: all three are conv+ReLU of the same pixels
untouched = (F.max_pool2d(md.double(), 3, stride=1, padding=1) == 0).expand_as(gap)
for maps in (zero_maps, mean_maps):
    torch.testing.assert_close(exact_maps[untouched], maps[untouched])
print(f"{int(untouched[:, 0].sum()):,} of {untouched[:, 0].numel():,} windows see no missing pixel: "
      "there MisConv == conv+ReLU of the zero- and of the mean-filled image")
print(f"MisConv − ReLU(mean-filled): min {gap.min():.2e} (never below 0, up to rounding), mean inside the "
      f"hole {gap[md.expand_as(gap)].mean():.3f}")
assert gap.min() > -1e-12

vmax = max(m[i, ch].max().item() for m in (zero_maps, mean_maps, exact_maps))
fig, axes = plt.subplots(1, 5, figsize=(16, 3.4), layout="constrained")
im_in = show_row(axes[:1], hide(xd, md)[i:i + 1])
axes[0].set_title("input (red = missing)", fontsize=9)
for ax, (title, maps) in zip(axes[1:4], [("conv+ReLU, zero-filled", zero_maps), ("conv+ReLU, mean-filled", mean_maps),
                                           ("MisConv (expectation)", exact_maps)]):
    im_act = show_row([ax], maps[i:i + 1, ch:ch + 1], cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_title(title, fontsize=9)
im_gap = show_row(axes[4:], gap[i:i + 1, ch:ch + 1], cmap="magma", vmin=0.0, vmax=float(gap[i, ch].max()))
axes[4].set_title("MisConv − mean-filled", fontsize=9)
fig.colorbar(im_in, ax=axes[0], label=PIXEL.replace(" (", "\n("), shrink=0.85)
fig.colorbar(im_act, ax=axes[1:4], label="activation\n(arbitrary units)", shrink=0.85)
fig.colorbar(im_gap, ax=axes[4], label="difference\n(same units)", shrink=0.85)
fig.suptitle(f"feature map {ch} of an untrained 3×3 layer, digit {i}")
fig.savefig(out_dir / "misconv_vs_imputation.png", dpi=120)
plt.show()

# %% [markdown]
# ## Where next
#
# * `01_dmfa` trains a **deep** MFA (DMFA) that predicts the conditional MFA of a hole from the
#   rest of the image, on complete images or on images that are themselves incomplete.
# * `02_classification` compares MisConv with every baseline on square, trapezoid and noise masks.
# * `03_wae` uses MisConv in the encoder of a Wasserstein autoencoder.
# * `04_timing` measures what the $(L+2)K$ convolutions cost.
# * `05_draw_a_mask` lets you draw a hole and watch the models react.
