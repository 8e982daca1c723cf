r"""Figures of the density study (:mod:`labkit.studies.density`): inpainting grids and training curves.

- :func:`plot_inpainting`: per image the original, the masked input, the mixture mean, samples, the
  per-pixel standard deviation and the factors of the most probable component (any
  ``forward(x, missing) -> MFA`` model: DMFA, classical MFA). Images are drawn in grey or RGB; the
  standard deviation is one map per image (RGB: the mean over the three channels) on one colour
  scale for the whole column, with a colour bar in pixel-value units (pixels lie in [0, 1]); the
  factors share one symmetric red-blue scale, with one colour bar;
- :func:`plot_acflow_inpainting`: the same grid for an ACFlow (moments from 16 samples);
- :func:`plot_history`: a DMFA's training curves.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from labkit.checks import check_images
from labkit.models.dmfa import predict_mfa

__all__ = ["plot_inpainting", "plot_acflow_inpainting", "plot_history"]


def _show(img: Tensor) -> np.ndarray:
    """(C,H,W) -> array for imshow: (H,W) for 1 channel, (H,W,3) clipped for RGB."""
    img = img.detach().float().cpu()
    if img.shape[0] == 1:
        return img[0].clamp(0, 1).numpy()
    return img.permute(1, 2, 0).clamp(0, 1).numpy()


def plot_inpainting(model: nn.Module, images: Tensor, missing: Tensor, *, n_samples: int = 3, seed: int = 0,
                    device=None, title: str | None = None):
    """A figure, one row per image: original, masked input, mixture mean, samples, per-pixel
    standard deviation and the L factors of the most probable component (missing pixels only).

    Args:
        model: ``forward(x, missing) -> MFA``.
        images: ``(n, C, H, W)`` a few complete images, C = 1 (grey) or 3 (RGB).
        missing: bool ``(n, 1, H, W)`` or ``(n, C, H, W)``.
    Returns:
        a matplotlib Figure: ``n`` rows of ``4 + n_samples + L`` image panels (titles in the
        first row), one colour bar under the std column (std in pixel values; RGB: the mean of
        the channels' std) and one for the factor columns (all factor panels on one symmetric
        scale), right of them. Factor panels show the mean over the channels.
    """
    images = check_images(images, "images")
    mfa = predict_mfa(model, images, missing, batch_size=len(images), device=device)
    g = torch.Generator(device=mfa.means.device).manual_seed(seed)
    samples = mfa.sample(generator=g, n=n_samples).cpu()                     # (S, n, C, H, W)
    top = mfa.weights.argmax(dim=1).cpu()
    factors = mfa.factors.cpu()[torch.arange(len(images)), top]              # (n, L, C, H, W)
    return _inpainting_figure(images.cpu(), missing.expand_as(images).cpu(), mfa.mean().cpu(), samples,
                              mfa.variance().sqrt().cpu(), factors=factors, title=title)


def _inpainting_figure(x: Tensor, miss: Tensor, mean: Tensor, samples: Tensor, std: Tensor, *,
                       factors: Tensor | None = None, mean_label: str = "mean", title: str | None = None):
    """The inpainting grid shared by the DMFA and ACFlow figures. ``x``, ``miss``, ``mean``, ``std``:
    ``(n, C, H, W)`` on the CPU; ``samples`` ``(S, n, C, H, W)``; ``factors`` ``(n, L, C, H, W)`` or None.
    Observed pixels of every panel come from ``x``; the std and factor panels show missing pixels only."""
    import matplotlib.pyplot as plt

    n_samples, L = samples.shape[0], 0 if factors is None else factors.shape[1]
    cols = ["original", "input", mean_label] + [f"sample {i + 1}" for i in range(n_samples)] + ["std"] + \
           [f"factor {j + 1}" for j in range(L)]
    n, C = x.shape[:2]
    std_col = 3 + n_samples
    # one per-pixel map per image (RGB: the mean of the three channels' std), on one colour scale
    # for the whole column so that rows compare; observed pixels are 0
    sd_maps = torch.where(miss, std, torch.zeros(())).mean(1)                 # (n, H, W)
    sd_max = max(float(sd_maps.max()), 1e-6)
    # the factors likewise share one symmetric scale (all rows, all factors): a factor is the change
    # of the pixels per unit of its latent, so a faint panel is a small factor, not a rescaled one
    f_maps = torch.where(miss[:, None], factors, torch.zeros(())).mean(2) if L else None   # (n, L, H, W)
    f_lim = max(float(f_maps.abs().max()), 1e-6) if L else 1.0
    # the colour bars get cells of the grid of their own (the std bar a row under the std column,
    # the factors' bar a column right of the factors), so the layout keeps room for them and their
    # labels inside the figure and every image row stays aligned
    fig = plt.figure(figsize=(1.3 * len(cols) + (0.6 if L else 0), 1.4 * n + 1.0), layout="constrained")
    grid = fig.add_gridspec(n + 1, len(cols) + (1 if L else 0), height_ratios=[1.0] * n + [0.09],
                            width_ratios=[1.0] * len(cols) + ([0.08] if L else []))
    axes = np.array([[fig.add_subplot(grid[i, j]) for j in range(len(cols))] for i in range(n)])
    for i in range(n):
        fill = lambda v: torch.where(miss[i], v, x[i])  # noqa: E731 - observed pixels from x
        masked = x[i].expand(3, -1, -1).clone() if x.shape[1] == 1 else x[i].clone()
        m3 = miss[i][:1].expand(3, -1, -1) if x.shape[1] == 1 else miss[i]
        tint = torch.tensor([0.9, 0.2, 0.2]).view(3, 1, 1).expand_as(masked)
        masked = torch.where(m3, tint, masked)
        panels = [_show(x[i]), _show(masked), _show(fill(mean[i]))] + [_show(fill(samples[s, i])) for s in range(n_samples)]
        for j, p in enumerate(panels):
            axes[i, j].imshow(p, cmap="gray", vmin=0, vmax=1)
        sd_image = axes[i, std_col].imshow(sd_maps[i].numpy(), cmap="magma", vmin=0, vmax=sd_max)
        for l in range(L):
            f_image = axes[i, std_col + 1 + l].imshow(f_maps[i, l].numpy(), cmap="bwr", vmin=-f_lim, vmax=f_lim)
    for j, c in enumerate(cols):
        axes[0, j].set_title(c, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    # the std column's colour bar under it, the factors' right of them; pixels lie in [0, 1]
    bar = fig.colorbar(sd_image, cax=fig.add_subplot(grid[n, std_col]), orientation="horizontal")
    bar.set_label("std, pixel value" if C == 1 else "std, mean of R,G,B\n(pixel value)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    bar.ax.xaxis.set_major_locator(plt.MaxNLocator(3))
    if L:
        fbar = fig.colorbar(f_image, cax=fig.add_subplot(grid[:n, -1]), orientation="vertical")
        fbar.set_label("factor loading: pixel value per unit of its latent\n(missing pixels"
                       + ("" if C == 1 else ", mean of R,G,B") + "; one scale for all factors)", fontsize=7)
        fbar.ax.tick_params(labelsize=6)
        fbar.ax.yaxis.set_major_locator(plt.MaxNLocator(5, symmetric=True))
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_history(history: Sequence[Mapping[str, Any]], *, title: str | None = None):
    """Training curves: per-batch training NLL (left), per-epoch mean training and validation NLL
    (and validation SSE on a twin axis, right). Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
    batch_nll = [v for h in history for v in h.get("batch_nll", [])]
    per_epoch = max(1, len(history[0].get("batch_nll", []))) if history else 1
    axes[0].plot(np.arange(len(batch_nll)) / per_epoch, batch_nll, lw=0.5)
    axes[0].set(xlabel="epoch", ylabel="NLL per image (nats)", title="training batches")
    if batch_nll:
        lo, hi = np.percentile(batch_nll, [0.5, 99])
        axes[0].set_ylim(lo - 0.05 * abs(hi - lo), hi)
    ep = [h["epoch"] + 1 for h in history]
    axes[1].plot(ep, [h["nll"] for h in history], "o-", ms=3, label="train NLL (epoch mean)")
    if history and "val_nll" in history[0]:
        axes[1].plot(ep, [h["val_nll"] for h in history], "s-", ms=3, label="validation NLL")
        twin = axes[1].twinx()
        twin.plot(ep, [h["val_sse"] for h in history], "^--", ms=3, color="tab:green", label="validation SSE")
        twin.set_ylabel("SSE per image")
        twin.legend(loc="center right", fontsize=8)
    axes[1].set(xlabel="epoch", ylabel="NLL per image (nats)", title="per epoch")
    axes[1].legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_acflow_inpainting(model, images: Tensor, missing: Tensor, *, n_samples: int = 3, seed: int = 0,
                           title: str | None = None):
    """One row per image: original, masked input, the mean of 16 samples, ``n_samples`` samples and
    the per-pixel standard deviation of the 16 samples (an ACFlow has no closed-form moments)."""
    dev = next(model.parameters()).device
    x = check_images(images, "images").to(dev)
    miss = missing.to(dev).expand_as(x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        draws = model.sample(x, miss, n_samples=16, generator=g).cpu()    # (16, n, C, H, W)
    return _inpainting_figure(x.cpu(), miss.cpu(), draws.mean(0), draws[:n_samples], draws.std(0),
                              mean_label="mean of 16", title=title)
