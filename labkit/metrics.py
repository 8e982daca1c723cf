r"""Image-quality and distribution metrics of the WAE study: PSNR, SSIM, Fréchet distance.

All image metrics compare a reconstruction ``pred`` with the complete image ``target``, both
``(B, C, H, W)`` in ``[0, 1]`` (``data_range`` = 1), and return **one value per image** ``(B,)``;
the study averages them over the test set.

- :func:`psnr`: ``10·log10(data_range² / MSE)``, the MSE taken over all pixels and channels of the
  image, or over its missing pixels only when ``where`` (a bool mask, True = pixel counted) is given.
  An image with MSE 0 gives ``inf``; an image with no counted pixel gives NaN.
- :func:`ssim`: the SSIM of Wang et al. (2004) with the standard settings: an 11×11 Gaussian window
  with σ = 1.5, ``K1 = 0.01``, ``K2 = 0.03``, ``L = data_range``, population (biased) local
  variances, and **valid** filtering (the map covers the window centres at least 5 pixels from every
  border: 18×18 on a 28×28 image). Channels are treated separately and their maps averaged.
  *Over a region* (``where`` given): the SSIM map is averaged over the window centres that lie in
  the region — the local SSIM of windows centred on a missing pixel. Centres in the 5-pixel border
  strip have no map value, so they are not counted; an image whose region has no valid centre
  gives NaN (a 14×14 square on 28×28 always keeps at least 9×9 of its pixels).
  :func:`ssim` equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)`` (scikit-image crops the same 5-pixel border before
  averaging; ``tests/test_metrics.py`` holds them equal).
- :func:`skimage_psnr_ssim`: scikit-image's own PSNR and SSIM, called the way the MisConv authors'
  evaluation called them (defaults: a 7×7 uniform window, sample covariances, and for float
  images the range of 2 that scikit-image used to assume). For comparing with their numbers only.
- :func:`frechet_distance`: the Fréchet (2-Wasserstein) distance between Gaussian fits of two
  feature sets, ``‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})``, computed in float64
  by symmetric eigen-decompositions (``tr (Σ₁Σ₂)^{1/2}`` equals the trace of the symmetric square
  root above, which has real non-negative eigenvalues, so no complex ``sqrtm`` round-off to clean
  up). Covariances are the unbiased sample covariances (``N − 1``), as in the usual FID code.
  Which features it uses is the caller's business; name the metric after them (FID is this
  distance on Inception-v3 pool features, which are not available offline here).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "SKIMAGE_FLOAT_SSIM_RANGE",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "gaussian_window",
    "psnr",
    "skimage_psnr_ssim",
    "ssim",
    "ssim_map",
]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# --------------------------------------------------------------------------- validation
def _check_pair(pred, target) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred is on {pred.device} but target is on {target.device}")


def _check_where(where, like: Tensor) -> Tensor | None:
    """``None`` or a bool ``(B, 1 or C, H, W)`` mask expanded to ``like.shape``."""
    if where is None:
        return None
    if not isinstance(where, Tensor) or where.dtype != torch.bool:
        raise TypeError(
            f"where must be a bool tensor (True = pixel counted), got {getattr(where, 'dtype', type(where).__name__)}"
        )
    b, c, h, w = like.shape
    if where.dim() != 4 or where.shape[0] != b or tuple(where.shape[2:]) != (h, w) or where.shape[1] not in (1, c):
        raise ValueError(f"where must have shape ({b}, 1, {h}, {w}) or ({b}, {c}, {h}, {w}), got {tuple(where.shape)}")
    return where.to(like.device).expand(b, c, h, w)


def _check_range(data_range) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)):
        raise TypeError(f"data_range must be a number, got {type(data_range).__name__}")
    if not data_range > 0 or not math.isfinite(data_range):
        raise ValueError(f"data_range must be a positive finite number, got {data_range}")
    return float(data_range)


# --------------------------------------------------------------------------- PSNR
def psnr(pred: Tensor, target: Tensor, where: Tensor | None = None, *, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    Args:
        pred, target: ``(B, C, H, W)`` float tensors (values in ``[0, data_range]``).
        where: optional bool ``(B, 1 or C, H, W)``: the pixels the MSE is taken over (e.g. the
            missing region). ``None``: the whole image.
        data_range: the peak value (1 for images in [0, 1]).

    Returns:
        ``(B,)`` float64: ``10·log10(data_range² / MSE)``; ``inf`` where MSE = 0, NaN where an image
        has no pixel in ``where``.
    """
    _check_pair(pred, target)
    where = _check_where(where, target)
    data_range = _check_range(data_range)
    err = (pred.double() - target.double()) ** 2
    if where is None:
        mse = err.flatten(1).mean(1)
    else:
        # torch.where (not a product) so NaN/inf outside the region cannot leak in
        w = where.flatten(1)
        mse = torch.where(w, err.flatten(1), torch.zeros((), dtype=err.dtype, device=err.device)).sum(1)
        mse = mse / w.sum(1)  # 0/0 = NaN for an image with no counted pixel
    return 10.0 * torch.log10(data_range**2 / mse)


# --------------------------------------------------------------------------- SSIM
def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, *, dtype=torch.float64, device=None) -> Tensor:
    """The normalised 1-D Gaussian window ``(size,)`` (the 2-D window is its outer product)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd int, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: Tensor, g: Tensor) -> Tensor:
    """Valid separable Gaussian filtering of ``(N, 1, H, W)`` -> ``(N, 1, H - k + 1, W - k + 1)``."""
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1))
    return F.conv2d(x, g.view(1, 1, 1, k))


def ssim_map(
    pred: Tensor,
    target: Tensor,
    *,
    data_range: float = 1.0,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> Tensor:
    """The local SSIM of every valid window, per channel.

    Returns ``(B, C, H - window + 1, W - window + 1)`` float64; entry ``[b, c, i, j]`` belongs to the
    window centred on pixel ``(i + window // 2, j + window // 2)``.

    Raises:
        ValueError: an image smaller than the window.
    """
    _check_pair(pred, target)
    data_range = _check_range(data_range)
    b, c, h, w = target.shape
    if h < window or w < window:
        raise ValueError(f"images must be at least {window}x{window} for SSIM's window, got {h}x{w}")
    g = gaussian_window(window, sigma, device=target.device)
    x = pred.double().reshape(b * c, 1, h, w)
    y = target.double().reshape(b * c, 1, h, w)
    # One filtering call for the five local moments.
    stats = _blur(torch.cat([x, y, x * x, y * y, x * y], 0), g)
    mx, my, xx, yy, xy = stats.chunk(5, 0)
    vx = xx - mx * mx  # population (biased) local variances, as in Wang et al.
    vy = yy - my * my
    cxy = xy - mx * my
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(b, c, h - window + 1, w - window + 1)


def ssim(
    pred: Tensor,
    target: Tensor,
    where: Tensor | None = None,
    *,
    data_range: float = 1.0,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> Tensor:
    """Structural similarity per image (standard constants; see the module docstring).

    Args:
        pred, target: ``(B, C, H, W)`` float tensors in ``[0, data_range]``; no NaN (fill missing
            pixels of a reconstruction before calling: every pixel enters some window).
        where: optional bool ``(B, 1 or C, H, W)``: average the SSIM map over the windows centred
            on these pixels (e.g. the missing region) instead of over all valid windows.
        data_range: the dynamic range ``L`` (1 for images in [0, 1]).

    Returns:
        ``(B,)`` float64 (NaN for an image with no valid window centre in ``where``).
    """
    _check_pair(pred, target)
    where = _check_where(where, target)
    smap = ssim_map(pred, target, data_range=data_range, window=window, sigma=sigma)
    if where is None:
        return smap.flatten(1).mean(1)
    r = window // 2
    centres = where[:, :, r : where.shape[2] - r, r : where.shape[3] - r].flatten(1)
    total = torch.where(centres, smap.flatten(1), torch.zeros((), dtype=smap.dtype, device=smap.device)).sum(1)
    return total / centres.sum(1)


# --------------------------------------------------------------------------- scikit-image, as the authors used it
SKIMAGE_FLOAT_SSIM_RANGE = 2.0


def skimage_psnr_ssim(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """scikit-image's PSNR and SSIM per image, computed the way the MisConv authors called them.

    Per image, on the whole image, with float input:

    - ``peak_signal_noise_ratio(target, pred)`` with no ``data_range``: scikit-image then takes
      the top of the float dtype's range, 1, for a non-negative target (it raises for a target
      outside [-1, 1]);
    - ``structural_similarity(target, pred, data_range=2)``, otherwise its defaults (7×7 uniform
      window, sample covariances, ``K1 = 0.01``, ``K2 = 0.03``). The authors gave no
      ``data_range``; the scikit-image of their time then used the float dtype's range [-1, 1],
      i.e. 2. Current scikit-image refuses float input without ``data_range``, so the 2 is passed
      explicitly (:data:`SKIMAGE_FLOAT_SSIM_RANGE`). With a range of 2 the stabilising constants
      are 4× larger than for the true range of 1, which raises SSIM. Images with C > 1 channels
      are compared with ``channel_axis=0`` (the channels' mean SSIM).

    Args:
        pred, target: ``(B, C, H, W)`` float tensors in [0, 1], at least 7×7.

    Returns:
        ``(psnr, ssim)``, each ``(B,)`` float64 on the CPU; the caller averages them.

    Raises:
        ImportError: scikit-image is not installed.
    """
    _check_pair(pred, target)
    try:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("skimage_psnr_ssim needs scikit-image (pip install scikit-image)") from e
    p = pred.detach().cpu().numpy()
    t = target.detach().cpu().numpy()
    multi = t.shape[1] > 1
    psnrs, ssims = [], []
    for pi, ti in zip(p, t):
        if not multi:
            pi, ti = pi[0], ti[0]
        psnrs.append(peak_signal_noise_ratio(ti, pi))
        ssims.append(structural_similarity(ti, pi, data_range=SKIMAGE_FLOAT_SSIM_RANGE,
                                           channel_axis=0 if multi else None))
    return torch.tensor(psnrs, dtype=torch.float64), torch.tensor(ssims, dtype=torch.float64)


# --------------------------------------------------------------------------- Fréchet distance
def _as_features(feats, name: str) -> np.ndarray:
    if isinstance(feats, Tensor):
        feats = feats.detach().cpu().double().numpy()
    elif isinstance(feats, np.ndarray):
        feats = feats.astype(np.float64)
    else:
        raise TypeError(f"{name} must be a tensor or array of shape (N, D), got {type(feats).__name__}")
    if feats.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return feats


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64 arrays) of features ``(N, D)``."""
    f = _as_features(feats, "feats")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((s + s.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """``‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})`` for two Gaussians.

    Args:
        mu1, mu2: means ``(D,)``; cov1, cov2: symmetric positive semi-definite ``(D, D)``.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    cov1, cov2 = (np.atleast_2d(np.asarray(c, dtype=np.float64)) for c in (cov1, cov2))
    d = mu1.shape[0]
    for name, m in (("mu1", mu1), ("mu2", mu2)):
        if m.shape != (d,):
            raise ValueError(f"{name} must have shape ({d},), got {m.shape}")
    for name, c in (("cov1", cov1), ("cov2", cov2)):
        if c.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}), got {c.shape}")
        if not np.allclose(c, c.T, rtol=1e-6, atol=1e-10 * max(1.0, float(np.abs(c).max()))):
            raise ValueError(f"{name} must be symmetric")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    vals = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_cross = float(np.sqrt(np.clip(vals, 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_cross)
    return max(value, 0.0)  # round-off can take an exact 0 slightly below


def frechet_distance(feats1, feats2) -> float:
    """Fréchet distance between Gaussian fits of two feature sets ``(N1, D)`` and ``(N2, D)``."""
    f1 = _as_features(feats1, "feats1")
    f2 = _as_features(feats2, "feats2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feats1 has {f1.shape[1]} features per row but feats2 has {f2.shape[1]}")
    return frechet_distance_from_stats(*gaussian_stats(f1), *gaussian_stats(f2))
