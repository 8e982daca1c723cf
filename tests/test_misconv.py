"""MisConv2d against Monte Carlo, gradcheck and its limiting cases; the authors' variant against an
independent transcription of their formulas (and against Monte Carlo, where it is far off)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import labkit.misconv as MC
import labkit.misconv_fast as MF
from labkit.mfa import MFA
from labkit.misconv import MisConv2d, expected_relu, misconv_authors, misconv_reference
from tests.conftest import random_mfa


@pytest.fixture(autouse=True)
def uncompiled(monkeypatch):
    """The fast path's kernels run as plain PyTorch (the same functions, no torch.compile: seconds
    instead of minutes); tests/test_misconv_fast.py checks the compiled kernels against them."""
    monkeypatch.setattr(MF, "_COMPILE", False)


def sample_mfa(mfa: MFA, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` draws ``(n, B, C, H, W)`` from each image's MFA, written out here (not MFA.sample):
    component k with probability p_k, then m_k + Σ_l z_l a_kl + √d_k ⊙ ε, z, ε standard normal."""
    B, K = mfa.weights.shape
    k = torch.multinomial(mfa.weights, n, replacement=True, generator=g).T       # (n, B)
    b = torch.arange(B)
    z = torch.randn(n, B, mfa.n_factors, 1, 1, 1, generator=g, dtype=mfa.means.dtype)
    eps = torch.randn(n, *mfa.means.shape[:1], *mfa.means.shape[2:], generator=g, dtype=mfa.means.dtype)
    return mfa.means[b, k] + (z * mfa.factors[b, k]).sum(2) + mfa.variances[b, k].sqrt() * eps


def monte_carlo(conv: MisConv2d, x, missing, mfa, n, seed=0, chunk=20_000):
    """Mean and standard error of relu(conv(X)) over n complete images X whose missing pixels come
    from the MFA (plain F.conv2d on samples: no MisConv code)."""
    g = torch.Generator().manual_seed(seed)
    total, sq = 0, 0
    B = x.shape[0]
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        X = torch.where(missing, sample_mfa(mfa, m, g), x)
        y = F.relu(F.conv2d(X.flatten(0, 1), conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation))
        y = y.reshape(m, B, *y.shape[1:])
        total = total + y.sum(0)
        sq = sq + (y * y).sum(0)
    mean = total / n
    se = ((sq / n - mean ** 2).clamp_min(0) / n).sqrt()
    return mean.detach(), se.detach()


CONFIGS = [
    dict(C=1, K=1, L=1, stride=1, padding=0, dilation=1, k=3, per_channel=False),
    dict(C=2, K=3, L=2, stride=2, padding=1, dilation=1, k=3, per_channel=False),
    dict(C=3, K=2, L=4, stride=1, padding=2, dilation=2, k=3, per_channel=True, n=20_000),  # dilated float64 conv is slow on CPU
    dict(C=1, K=2, L=3, stride=(2, 1), padding=(1, 0), dilation=1, k=(3, 2), per_channel=False),
]


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "C{C}K{K}L{L}s{stride}p{padding}d{dilation}".format(**c))
def test_layer_matches_monte_carlo(cfg, fast):
    torch.manual_seed(0)
    C, K, L = cfg["C"], cfg["K"], cfg["L"]
    B, H, W = 2, 6, 7
    conv = MisConv2d(C, 4, cfg["k"], stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"],
                     dtype=torch.float64, fast=fast)
    mfa = random_mfa(B=B, K=K, L=L, C=C, H=H, W=W, seed=1, factor_scale=0.5)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    missing = torch.rand(B, C if cfg["per_channel"] else 1, H, W, generator=g) < 0.5
    out = conv(torch.where(missing, torch.full((), float("nan"), dtype=torch.float64), x), missing, mfa)
    mc, se = monte_carlo(conv, x, missing, mfa, n=cfg.get("n", 100_000))
    assert out.shape == mc.shape
    z = (out - mc).abs() / (se + 1e-12)
    # 5 standard errors over a few hundred outputs: a wrong formula (e.g. σφ halved) fails by far more.
    assert z.max() < 5.0, f"max |exact - MC| / se = {z.max():.2f}"


def test_monte_carlo_check_detects_a_halved_sigma_term(monkeypatch):
    # The Monte Carlo check must be sharp enough to catch the authors' halved σφ term alone. The
    # planted formula replaces labkit.misconv.expected_relu, which the eager path (fast=False) reads.
    # Where no sample activates a unit its standard error is 0 while the exact value is a tiny
    # positive number, so the error is measured against se + 1e-6, not se alone.
    torch.manual_seed(0)
    conv = MisConv2d(1, 4, 3, padding=1, dtype=torch.float64, fast=False)
    mfa = random_mfa(B=2, K=1, L=2, C=1, H=6, W=6, seed=1, factor_scale=0.5)
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    missing = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    missing[:, :, 1:5, 1:5] = True
    mc, se = monte_carlo(conv, x, missing, mfa, n=100_000)
    assert ((conv(x, missing, mfa) - mc).abs() / (se + 1e-6)).max() < 5

    def halved(mu, var):
        s = var.clamp_min(1e-30).sqrt()
        t = mu / s
        return mu * 0.5 * torch.erfc(-t / 2 ** 0.5) + 0.5 * s * torch.exp(-0.5 * t * t) / (2 * torch.pi) ** 0.5

    monkeypatch.setattr(MC, "expected_relu", halved)
    assert ((conv(x, missing, mfa) - mc).abs() / (se + 1e-6)).max() > 10


def test_no_missing_pixels_equals_conv_relu_exactly():
    conv = MisConv2d(3, 5, 3, padding=1)
    x = torch.rand(4, 3, 8, 8)
    mfa = random_mfa(B=4, K=2, L=3, C=3, H=8, W=8, dtype=torch.float32)
    none = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    assert torch.equal(conv(x, none, mfa), F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)))
    assert torch.equal(conv(x), F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)))
    # a fully observed image inside a batch that has missing pixels elsewhere: same up to rounding
    some = none.clone()
    some[0, :, :3, :3] = True
    torch.testing.assert_close(conv(x, some, mfa)[1:], F.relu(F.conv2d(x[1:], conv.weight, conv.bias, padding=1)))


def test_zero_factors_and_variances_equal_conv_of_filled_image():
    conv = MisConv2d(2, 3, 3, padding=1, dtype=torch.float64)
    B, C, H, W = 2, 2, 6, 6
    mfa = random_mfa(B=B, K=1, L=2, C=C, H=H, W=W)
    degenerate = MFA(mfa.weights[:, :1] / mfa.weights[:, :1], mfa.means[:, :1], torch.zeros_like(mfa.factors[:, :1]),
                     torch.full_like(mfa.variances[:, :1], 1e-300))
    x = torch.rand(B, C, H, W, dtype=torch.float64)
    missing = torch.rand(B, 1, H, W) < 0.5
    filled = torch.where(missing, degenerate.means[:, 0], x)
    torch.testing.assert_close(conv(x, missing, degenerate), F.relu(F.conv2d(filled, conv.weight, conv.bias, padding=1)))


def test_nan_at_missing_pixels_changes_nothing():
    conv = MisConv2d(1, 4, 3, padding=1)
    mfa = random_mfa(B=3, K=2, L=2, C=1, H=7, W=7, dtype=torch.float32)
    x = torch.rand(3, 1, 7, 7)
    missing = torch.rand(3, 1, 7, 7) < 0.4
    clean = conv(x, missing, mfa)
    for poison in (float("nan"), float("inf"), 1e30):
        px = torch.where(missing, torch.full_like(x, poison), x).requires_grad_(True)
        out = conv(px, missing, mfa)
        assert torch.equal(out, clean)
        out.sum().backward()
        assert torch.isfinite(px.grad).all()


def _gradcheck_inputs():
    torch.manual_seed(0)
    mfa = random_mfa(B=2, K=2, L=2, C=2, H=5, W=5)
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    missing = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.5
    params = [
        torch.randn(2, 2, 3, 3, dtype=torch.float64) * 0.5,                    # weight
        torch.randn(2, dtype=torch.float64) * 0.1,                              # bias
        x,
        torch.log(mfa.weights),
        mfa.means,
        mfa.factors,
        torch.log(mfa.variances),
    ]
    return missing, tuple(p.clone().requires_grad_(True) for p in params)


def test_gradcheck_eager_layer_weight_bias_input_and_mfa():
    missing, params = _gradcheck_inputs()
    layer = MisConv2d(2, 2, 3, padding=1, stride=2, dtype=torch.float64, fast=False)

    def func(weight, bias, xx, logits, means, factors, log_var):
        m = MFA(torch.softmax(logits, 1), means, factors, log_var.exp(), validate=False)
        # functional call so gradcheck perturbs the weight tensor directly
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (xx, missing, m))

    assert torch.autograd.gradcheck(func, params, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_reference_implementation():
    missing, params = _gradcheck_inputs()

    def func(weight, bias, xx, logits, means, factors, log_var):
        m = MFA(torch.softmax(logits, 1), means, factors, log_var.exp(), validate=False)
        return misconv_reference(xx, missing, m, weight, bias, stride=(1, 2), padding=1, dilation=(2, 1))

    assert torch.autograd.gradcheck(func, params, eps=1e-6, atol=1e-6, rtol=1e-4)
    # second order too (the fast path's backward is first order only)
    assert torch.autograd.gradgradcheck(func, params, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


def test_weight_gradient_flows_through_the_squared_weight_path():
    # Only variance depends on W⊙W: with mean fixed, the gradient through W² must be non-zero and
    # equal to finite differences. Compare autograd against a central difference on one weight entry.
    torch.manual_seed(1)
    conv = MisConv2d(1, 1, 3, padding=1, bias=False, dtype=torch.float64)
    H, W = 5, 5
    mfa = MFA(torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, H, W, dtype=torch.float64),
              torch.zeros(1, 1, 0, 1, H, W, dtype=torch.float64), torch.ones(1, 1, 1, H, W, dtype=torch.float64))
    x = torch.zeros(1, 1, H, W, dtype=torch.float64)
    missing = torch.ones(1, 1, H, W, dtype=torch.bool)
    # Mean is 0 everywhere, so output = σ·φ(0) = σ/√(2π) with σ² = Σ W² over the in-image window:
    out = conv(x, missing, mfa)
    centre = out[0, 0, 2, 2]
    torch.testing.assert_close(centre, conv.weight.pow(2).sum().sqrt() / (2 * torch.pi) ** 0.5)
    centre.backward()
    torch.testing.assert_close(conv.weight.grad, conv.weight.detach() / conv.weight.detach().pow(2).sum().sqrt() / (2 * torch.pi) ** 0.5)


def test_expected_relu_limits_and_values():
    mu = torch.tensor([-2.0, 0.0, 1.5, 3.0, -40.0], dtype=torch.float64)
    # σ → 0 tends to relu(mu); σ = 0 is exactly relu
    torch.testing.assert_close(expected_relu(mu, torch.zeros_like(mu)), torch.relu(mu), rtol=0, atol=0)
    torch.testing.assert_close(expected_relu(mu, torch.full_like(mu, 1e-16)), torch.relu(mu), atol=1e-8, rtol=0)
    # hand values: mu = 0, σ = 1 -> 1/√(2π)
    assert expected_relu(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)).item() == pytest.approx(
        (2 * torch.pi) ** -0.5, rel=1e-12)
    # against numerical integration
    var = torch.tensor([0.3, 2.0, 0.5, 4.0, 1.0], dtype=torch.float64)
    y = torch.linspace(-60, 60, 400_001, dtype=torch.float64)
    dens = torch.exp(-0.5 * (y[None] - mu[:, None]) ** 2 / var[:, None]) / torch.sqrt(2 * torch.pi * var[:, None])
    integ = torch.trapezoid(torch.relu(y)[None] * dens, y, dim=1)
    torch.testing.assert_close(expected_relu(mu, var), integ, atol=1e-9, rtol=1e-7)
    # lower tail does not cancel to 0 or go negative
    tail = expected_relu(torch.tensor([-30.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64))
    assert tail.item() > 0


def test_bias_does_not_enter_the_variance():
    conv = MisConv2d(1, 2, 3, padding=1, dtype=torch.float64)
    mfa = random_mfa(B=1, K=1, L=2, C=1, H=5, W=5)
    x = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    missing = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    base = conv(x, missing, mfa)
    with torch.no_grad():
        conv.bias.add_(100.0)          # far positive: E[relu(Y + b)] = E[Y] + b exactly (up to Φ ≈ 1)
    shifted = conv(x, missing, mfa)
    with torch.no_grad():
        conv.bias.sub_(100.0)
    mean_only = F.conv2d(torch.where(missing, mfa.means[:, 0], x), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(shifted, mean_only + 100.0)
    assert not torch.allclose(base, torch.relu(mean_only))


def test_bad_inputs_are_named():
    conv = MisConv2d(2, 3, 3)
    mfa = random_mfa(B=2, K=1, L=1, C=2, H=5, W=5, dtype=torch.float32)
    x = torch.rand(2, 2, 5, 5)
    m = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"missing must be a bool tensor \(True = missing\), got torch.float32"):
        conv(x, m.float(), mfa)
    with pytest.raises(ValueError, match=r"missing must have shape \(2, 1, 5, 5\) or \(2, 2, 5, 5\), got \(2, 3, 5, 5\)"):
        conv(x, torch.zeros(2, 3, 5, 5, dtype=torch.bool), mfa)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, H, W\), got \(2, 1, 5, 5\)"):
        conv(x[:, :1], m, mfa)
    with pytest.raises(ValueError, match=r"mfa describes images of shape \(2, 5, 5\) in a batch of 2, but x has shape \(2, 2, 6, 6\)"):
        conv(torch.rand(2, 2, 6, 6), torch.zeros(2, 1, 6, 6, dtype=torch.bool), mfa)
    with pytest.raises(ValueError, match=r"needs both missing and mfa"):
        conv(x, m)
    with pytest.raises(TypeError, match=r"mfa must be a labkit.mfa.MFA"):
        conv(x, m, "not an mfa")
    with pytest.raises(TypeError, match=r"x must be a floating-point"):
        conv(x.long(), m, mfa)
    with pytest.raises(ValueError, match=r"groups=1 only"):
        MisConv2d(2, 2, 3, groups=2)
    with pytest.raises(ValueError, match=r"padding_mode='zeros' only, got 'reflect'"):
        MisConv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"variant must be one of \('exact', 'authors'\), got 'paper'"):
        MisConv2d(2, 2, 3, variant="paper")
    with pytest.raises(ValueError, match=r"weight must be a floating-point tensor \(C_out, C_in, kh, kw\)"):
        misconv_reference(x, m, mfa, torch.zeros(3, 2, 3))
    with pytest.raises(ValueError, match=r"bias must be None or a tensor of shape \(3,\), got \(2,\)"):
        misconv_reference(x, m, mfa, torch.zeros(3, 2, 3, 3), torch.zeros(2))


# ----------------------------------------------------------------------------- the authors' variant
def authors_by_hand(x, missing, mfa, weight, bias):
    """The authors' first layer, transcribed in float64 NumPy loops over output pixels:

    μ'_k  = Σ_window W·M_k + b                                   (the MFA mean everywhere)
    σ'²_k = Σ_window W²·D_k + b² + Σ_l (Σ_window W·A_kl + b)²     (bias in the variance, nothing masked)
    E'_k  = μ'Φ(μ'/σ') + σ'φ(μ'/σ')/2                             (σφ halved)
    out   = Σ_k p_k E'_k where the centre pixel is missing (first channel's mask), else
            ReLU(Σ_window W·(x with 0 at missing pixels) + b).
    """
    x, weight, bias = (t.detach().double().numpy() for t in (x, weight, bias))
    P, M, A, D = (t.detach().double().numpy() for t in (mfa.weights, mfa.means, mfa.factors, mfa.variances))
    J = np.broadcast_to(missing.numpy(), x.shape)
    B, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    K, L = M.shape[1], A.shape[2]
    ph, pw = kh // 2, kw // 2
    pad = lambda a: np.pad(a, [(0, 0)] * (a.ndim - 2) + [(ph, ph), (pw, pw)])
    Mp, Ap, Dp, Xp = pad(M), pad(A), pad(D), pad(np.where(J, 0.0, x))
    out = np.zeros((B, O, H, W))
    for b in range(B):
        for o in range(O):
            w = weight[o]
            for i in range(H):
                for j in range(W):
                    win = (slice(None), slice(i, i + kh), slice(j, j + kw))
                    if not J[b, 0, i, j]:
                        out[b, o, i, j] = max(0.0, float((w * Xp[b][win]).sum()) + bias[o])
                        continue
                    total = 0.0
                    for k in range(K):
                        mu = float((w * Mp[b, k][win]).sum()) + bias[o]
                        var = float((w * w * Dp[b, k][win]).sum()) + bias[o] ** 2
                        for l in range(L):
                            var += (float((w * Ap[b, k, l][win]).sum()) + bias[o]) ** 2
                        s = math.sqrt(var)
                        t = mu / s
                        e = mu * 0.5 * (1 + math.erf(t / math.sqrt(2))) + 0.5 * s * math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
                        total += P[b, k] * e
                    out[b, o, i, j] = total
    return torch.from_numpy(out)


def test_authors_expected_relu_halves_the_sigma_term_and_can_go_negative():
    from labkit.misconv import authors_expected_relu

    mu = torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    var = torch.tensor([1.0, 4.0, 0.25, 0.0], dtype=torch.float64)
    sigma = var.sqrt()
    half_term = 0.5 * sigma * torch.exp(-0.5 * (mu / sigma.clamp_min(1e-300)) ** 2) / math.sqrt(2 * math.pi)
    exact = expected_relu(mu, var)
    got = authors_expected_relu(mu, var)
    torch.testing.assert_close(got[:3], exact[:3] - half_term[:3], rtol=1e-12, atol=1e-15)
    assert got[3] == 3.0 and got[0] < 0                     # relu at σ = 0; below zero at μ = −2σ


@pytest.mark.parametrize("C,K,per_channel,k", [(1, 1, False, 3), (1, 2, False, 3), (3, 1, True, 3), (3, 2, False, (3, 5))])
def test_authors_variant_equals_its_transcription(C, K, per_channel, k):
    B, H, W, L = 2, 6, 5, 2
    g = torch.Generator().manual_seed(10 * C + K)
    conv = MisConv2d(C, 3, k, padding="same" if isinstance(k, tuple) else 1, dtype=torch.float64, variant="authors")
    with torch.no_grad():
        conv.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64) * 0.3)
    mfa = random_mfa(B=B, K=K, L=L, C=C, H=H, W=W, seed=C + K)
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    missing = torch.rand(B, C if per_channel else 1, H, W, generator=g) < 0.5
    out = conv(torch.where(missing, torch.full((), float("nan"), dtype=torch.float64), x), missing, mfa)
    want = authors_by_hand(x, missing, mfa, conv.weight, conv.bias)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    # the functional form is the same thing; without a bias b = 0
    torch.testing.assert_close(misconv_authors(x, missing, mfa, conv.weight, conv.bias, padding=conv.padding), out,
                               rtol=0, atol=0)
    torch.testing.assert_close(misconv_authors(x, missing, mfa, conv.weight, None, padding=conv.padding),
                               authors_by_hand(x, missing, mfa, conv.weight, torch.zeros(3, dtype=torch.float64)),
                               rtol=0, atol=1e-10)


def test_monte_carlo_exact_close_authors_far():
    torch.manual_seed(3)
    B, C, H, W = 2, 1, 7, 7
    mfa = random_mfa(B=B, K=2, L=2, C=C, H=H, W=W, seed=4, factor_scale=0.5)
    x = torch.rand(B, C, H, W, dtype=torch.float64)
    missing = torch.zeros(B, 1, H, W, dtype=torch.bool)
    missing[0, :, 1:5, 2:6] = True
    missing[1, :, 3:, :3] = True
    exact = MisConv2d(C, 4, 3, padding=1, dtype=torch.float64, fast=False)
    authors = MisConv2d(C, 4, 3, padding=1, dtype=torch.float64, variant="authors")
    authors.load_state_dict(exact.state_dict())
    mc, se = monte_carlo(exact, x, missing, mfa, n=100_000)
    z_exact = (exact(x, missing, mfa) - mc).abs() / (se + 1e-12)
    z_authors = (authors(x, missing, mfa) - mc).abs() / (se + 1e-12)
    assert z_exact.max() < 5.0, f"exact: max |out - MC| / se = {z_exact.max():.2f}"
    assert z_authors.max() > 20.0, f"authors: max |out - MC| / se = {z_authors.max():.2f}"


@pytest.mark.parametrize("kwargs,text", [
    # the layer reports its normalised pairs, the function the value it was given
    (dict(kernel_size=3, padding=1, stride=2), r"supports stride=1 only, got stride=(2|\(2, 2\))$"),
    (dict(kernel_size=3, padding=2, dilation=2), r"supports dilation=1 only, got dilation=(2|\(2, 2\))$"),
    (dict(kernel_size=2, padding=1), r"needs an odd kernel .* got kernel_size=\(2, 2\)"),
    (dict(kernel_size=3, padding=0), r"needs 'same' padding, padding=\(1, 1\) for a \(3, 3\) kernel, got padding=(0|\(0, 0\))$"),
    (dict(kernel_size=(3, 5), padding=1), r"needs .same. padding, padding=\(1, 2\) for a \(3, 5\) kernel, got padding=(1|\(1, 1\))$"),
    (dict(kernel_size=3, padding="valid"), "needs 'same' padding.*got padding='valid'"),
])
def test_authors_variant_rejects_unsupported_settings(kwargs, text):
    with pytest.raises(ValueError, match=r"variant='authors' " + text):
        MisConv2d(2, 3, variant="authors", **kwargs)
    # the functional form, and a layer whose settings changed after construction, too
    weight = torch.randn(3, 2, *((kwargs["kernel_size"],) * 2 if isinstance(kwargs["kernel_size"], int)
                                 else kwargs["kernel_size"]))
    mfa = random_mfa(B=1, K=1, L=1, C=2, H=6, W=6, dtype=torch.float32)
    with pytest.raises(ValueError, match=text):
        misconv_authors(torch.rand(1, 2, 6, 6), torch.ones(1, 1, 6, 6, dtype=torch.bool), mfa, weight, None,
                        stride=kwargs.get("stride", 1), padding=kwargs["padding"], dilation=kwargs.get("dilation", 1))
    layer = MisConv2d(2, 3, 3, padding=1, variant="authors")
    layer.stride = (2, 2)
    with pytest.raises(ValueError, match="stride=1 only"):
        layer(torch.rand(1, 2, 6, 6), torch.ones(1, 1, 6, 6, dtype=torch.bool), mfa)


def test_authors_variant_gradients_flow_and_nan_stays_out():
    conv = MisConv2d(3, 4, 3, padding=1, variant="authors")
    assert "variant='authors'" in repr(conv)
    mfa = random_mfa(B=2, K=2, L=2, C=3, H=6, W=6, dtype=torch.float32)
    for t in (mfa.weights, mfa.means, mfa.factors, mfa.variances):
        t.requires_grad_(True)
    x = torch.rand(2, 3, 6, 6)
    missing = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)) < 0.4
    px = torch.where(missing, torch.full((), float("nan")), x).requires_grad_(True)
    out = conv(px, missing, mfa)
    assert torch.isfinite(out).all()
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    for name, t in [("weight", conv.weight), ("bias", conv.bias), ("x", px), ("p", mfa.weights),
                    ("means", mfa.means), ("factors", mfa.factors), ("variances", mfa.variances)]:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    assert (px.grad[missing.expand_as(px)] == 0).all()
    # nothing missing: the plain layer
    none = torch.zeros_like(missing)
    torch.testing.assert_close(conv(x, none, mfa), F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)))
