"""labkit.metrics against hand-computed values and brute-force references on tiny images."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from labkit.metrics import (
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    psnr,
    skimage_psnr_ssim,
    ssim,
    ssim_map,
)

try:
    import skimage.metrics as skm
except ImportError:  # pragma: no cover - scikit-image is a dependency; tests say so if it is absent
    skm = None
needs_skimage = pytest.mark.skipif(skm is None, reason="scikit-image is not installed (pip install scikit-image)")


# --------------------------------------------------------------------------- PSNR
def test_psnr_of_a_known_mse():
    target = torch.rand(3, 1, 6, 7, generator=torch.Generator().manual_seed(0)) * 0.5
    pred = target + 0.1  # every pixel off by 0.1: MSE = 0.01 -> 20 dB
    assert torch.allclose(psnr(pred, target), torch.full((3,), 20.0, dtype=torch.float64))


def test_psnr_over_a_region_only_counts_that_region():
    target = torch.zeros(2, 2, 4, 4)
    where = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    where[:, :, :2, :2] = True  # 4 of 16 pixels
    pred = torch.where(where, torch.full_like(target, 0.2), target)
    # region: MSE 0.04 -> 10 log10 25; whole image: MSE 0.04 * 4/16 = 0.01 -> 20 dB
    assert torch.allclose(psnr(pred, target, where), torch.full((2,), 10 * math.log10(25.0), dtype=torch.float64))
    assert torch.allclose(psnr(pred, target), torch.full((2,), 20.0, dtype=torch.float64))
    # NaN outside the region never reaches the regional value
    assert torch.isfinite(psnr(torch.where(where, pred, float("nan")), target, where)).all()


def test_psnr_identical_is_inf_and_data_range_scales():
    x = torch.rand(2, 1, 5, 5)
    assert torch.isinf(psnr(x, x)).all()
    # with data_range 2 the same MSE gains 20 log10 2 dB
    assert torch.allclose(psnr(x + 0.1, x, data_range=2.0) - psnr(x + 0.1, x),
                          torch.full((2,), 20 * math.log10(2.0), dtype=torch.float64))


@pytest.mark.parametrize(
    "args, exc, text",
    [
        ((torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5)), ValueError, "target has"),
        ((torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)), ValueError, "4-D"),
        ((torch.zeros(1, 1, 4, 4, dtype=torch.long), torch.zeros(1, 1, 4, 4)), TypeError, "pred must be a floating"),
        ((torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)), TypeError, "where must be a bool"),
        ((torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool)),
         ValueError, "where must have shape"),
    ],
)
def test_psnr_rejects_bad_input(args, exc, text):
    with pytest.raises(exc, match=text):
        psnr(*args)


def test_psnr_rejects_bad_data_range():
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), data_range=0.0)


# --------------------------------------------------------------------------- SSIM
def _brute_ssim_map(x: np.ndarray, y: np.ndarray, L=1.0, size=11, sigma=1.5) -> np.ndarray:
    """Wang et al.'s SSIM, one window at a time, float64, for single-channel (H, W) images."""
    r = size // 2
    ax = np.arange(-r, r + 1)
    w = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    w /= w.sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    h, wd = x.shape
    out = np.empty((h - 2 * r, wd - 2 * r))
    for i in range(r, h - r):
        for j in range(r, wd - r):
            px, py = x[i - r : i + r + 1, j - r : j + r + 1], y[i - r : i + r + 1, j - r : j + r + 1]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            out[i - r, j - r] = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return out


def test_ssim_of_identical_images_is_one():
    x = torch.rand(3, 2, 14, 13, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    where = torch.zeros(3, 1, 14, 13, dtype=torch.bool)
    where[:, :, 4:10, 4:9] = True
    assert torch.allclose(ssim(x, x, where), torch.ones(3, dtype=torch.float64))


def test_ssim_of_constant_images_is_the_luminance_term():
    # constant a vs constant b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) everywhere
    a, b = 0.3, 0.7
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((2, 1, 12, 12), a), torch.full((2, 1, 12, 12), b))
    assert torch.allclose(got, torch.full((2,), expected, dtype=torch.float64), atol=1e-6)


def test_ssim_map_matches_a_window_by_window_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 2, 13, 15, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(2, 2, 13, 15, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim_map(x, y)
    assert got.shape == (2, 2, 3, 5)
    for b in range(2):
        for c in range(2):
            ref = _brute_ssim_map(x[b, c].numpy(), y[b, c].numpy())
            np.testing.assert_allclose(got[b, c].numpy(), ref, rtol=1e-10, atol=1e-12)
    # whole-image SSIM = mean of the map over windows and channels
    assert torch.allclose(ssim(x, y), got.flatten(1).mean(1))


def test_ssim_over_a_region_averages_the_windows_centred_in_it():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 16, 16, generator=g, dtype=torch.float64)
    y = torch.rand(1, 1, 16, 16, generator=g, dtype=torch.float64)
    where = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    where[0, 0, 2:8, 6:12] = True  # rows 2..4 lie in the 5-pixel border strip: not counted
    ref = _brute_ssim_map(x[0, 0].numpy(), y[0, 0].numpy())  # centres 5..10 x 5..10
    expected = ref[0:3, 1:7].mean()  # centre rows 5..7, centre cols 6..11
    assert ssim(x, y, where).item() == pytest.approx(expected, rel=1e-12)
    # a region entirely in the border strip has no window centre: NaN
    border = torch.zeros_like(where)
    border[0, 0, 0:3, :] = True
    assert torch.isnan(ssim(x, y, border)).all()


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 1, 10, 20), torch.zeros(1, 1, 10, 20))


def _image_pairs():
    """(name, pred, target) float64 pairs in [0, 1]: random noise, smooth blobs, and MNIST digits with
    a plausible reconstruction (blurred, with noise and a wrongly filled square)."""
    g = torch.Generator().manual_seed(4)
    noise_t = torch.rand(3, 1, 28, 28, generator=g, dtype=torch.float64)
    noise_p = (noise_t + 0.2 * torch.randn(noise_t.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blobs_t = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40) for cy, cx in ((10, 12), (20, 16), (16, 24))])
    blobs_t = blobs_t[:, None].double().expand(3, 3, 32, 32).clone()
    blobs_t[:, 1] *= 0.7
    blobs_p = (blobs_t.roll(1, dims=3) * 0.9 + 0.05).clamp(0, 1)
    pairs = [("noise", noise_p, noise_t), ("rgb-blobs", blobs_p, blobs_t)]
    try:
        from labkit.data import load_dataset
        digits = load_dataset("mnist", "test", download=False, limit=6).images.double()
    except Exception:  # noqa: BLE001 - MNIST ships with the lab's dependencies; if not, the others suffice
        return pairs
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16
    blurred = torch.nn.functional.conv2d(digits, (k[:, None] * k[None, :])[None, None], padding=2)
    recon = (blurred + 0.05 * torch.randn(digits.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    recon[:, :, 7:21, 7:21] = blurred[:, :, 7:21, 7:21].flip(-1)
    return pairs + [("mnist", recon, digits)]


@needs_skimage
def test_ssim_equals_scikit_image_gaussian_population_covariance():
    for name, pred, target in _image_pairs():
        got = ssim(pred, target)
        C = target.shape[1]
        want = [skm.structural_similarity(t[0] if C == 1 else t, p[0] if C == 1 else p, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False, data_range=1,
                                          channel_axis=None if C == 1 else 0)
                for p, t in zip(pred.numpy(), target.numpy())]
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6, err_msg=name)


@needs_skimage
def test_skimage_psnr_ssim_is_scikit_images_own_numbers_as_the_authors_called_them():
    for name, pred, target in _image_pairs():
        for dtype in (torch.float64, torch.float32):
            p_, t_ = pred.to(dtype), target.to(dtype)
            got_psnr, got_ssim = skimage_psnr_ssim(p_, t_)
            assert got_psnr.shape == got_ssim.shape == (target.shape[0],)
            C = target.shape[1]
            for i, (p, t) in enumerate(zip(p_.numpy(), t_.numpy())):
                if C == 1:
                    p, t = p[0], t[0]
                # PSNR: no data_range (scikit-image takes 1 for a non-negative float image)
                assert got_psnr[i].item() == pytest.approx(skm.peak_signal_noise_ratio(t, p), rel=1e-12), name
                assert got_psnr[i].item() == pytest.approx(skm.peak_signal_noise_ratio(t, p, data_range=1), rel=1e-12)
                # SSIM: scikit-image's defaults, with the float range [-1, 1] it assumed when none was given
                want = skm.structural_similarity(t, p, data_range=2, channel_axis=None if C == 1 else 0)
                assert got_ssim[i].item() == pytest.approx(want, rel=1e-12), name
        # the assumed range of 2 is not the true range of 1: it raises SSIM
        true_range = [skm.structural_similarity(t[0], p[0], data_range=1) for p, t in zip(pred.numpy(), target.numpy())
                      ] if target.shape[1] == 1 else None
        if true_range is not None:
            assert (skimage_psnr_ssim(pred, target)[1].numpy() > np.array(true_range)).all()


# --------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_of_1d_gaussians():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_of_2d_gaussians_by_hand():
    # cov1 = I, cov2 = [[2, 1], [1, 2]] (eigenvalues 3 and 1): tr sqrt(cov2) = sqrt(3) + 1
    mu1, mu2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    cov2 = np.array([[2.0, 1.0], [1.0, 2.0]])
    expected = 8.0 + 2.0 + 4.0 - 2.0 * (math.sqrt(3.0) + 1.0)
    assert frechet_distance_from_stats(mu1, np.eye(2), mu2, cov2) == pytest.approx(expected, rel=1e-12)
    # diagonal covariances: sum of (sqrt a_i - sqrt b_i)^2
    got = frechet_distance_from_stats(mu1, np.diag([1.0, 4.0]), mu1, np.diag([9.0, 16.0]))
    assert got == pytest.approx(4.0 + 4.0, rel=1e-12)
    # symmetric in its arguments, zero for equal Gaussians
    assert frechet_distance_from_stats(mu2, cov2, mu1, np.eye(2)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance_from_stats(mu2, cov2, mu2, cov2) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_on_non_commuting_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * np.real(scipy.linalg.sqrtm(cov1 @ cov2)))
    assert frechet_distance_from_stats(mu1, cov1, mu2, cov2) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_from_features_uses_mean_and_unbiased_covariance():
    # rows {m - s, m + s}: mean m, unbiased variance 2 s^2
    f1 = torch.tensor([[1.0 - 1.0], [1.0 + 1.0]])     # mean 1, var 2
    f2 = np.array([[3.0 - 3.0], [3.0 + 3.0]])         # mean 3, var 18
    mu, cov = gaussian_stats(f1)
    assert mu == pytest.approx(np.array([1.0])) and cov == pytest.approx(np.array([[2.0]]))
    assert frechet_distance(f1, f2) == pytest.approx(4.0 + (math.sqrt(2.0) - math.sqrt(18.0)) ** 2)


@pytest.mark.parametrize(
    "f1, f2, exc, text",
    [
        (np.zeros((5, 3)), np.zeros((5, 4)), ValueError, "feats2 has 4"),
        (np.zeros(5), np.zeros((5, 1)), ValueError, "feats1 must be 2-D"),
        (np.zeros((1, 2)), np.zeros((5, 2)), ValueError, "at least 2 rows"),
        ([[0.0, 1.0]], np.zeros((5, 2)), TypeError, "feats1 must be a tensor or array"),
        (np.full((3, 2), np.nan), np.zeros((3, 2)), ValueError, "NaN"),
    ],
)
def test_frechet_distance_rejects_bad_features(f1, f2, exc, text):
    with pytest.raises(exc, match=text):
        frechet_distance(f1, f2)


def test_frechet_distance_rejects_mismatched_stats():
    with pytest.raises(ValueError, match="cov2 must have shape"):
        frechet_distance_from_stats([0.0, 0.0], np.eye(2), [0.0, 0.0], np.eye(3))
