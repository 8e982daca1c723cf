"""MisConv2d against Monte Carlo, gradcheck, and its limiting cases (misconv-math.md, properties 1-5)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labkit.mfa import MFA
from labkit.misconv import MisConv2d, expected_relu
from tests.conftest import random_mfa


def monte_carlo(conv: MisConv2d, x, missing, mfa, n, seed=0, chunk=20_000):
    """Mean of relu(conv(sample)) over n complete images whose missing pixels come from the MFA."""
    g = torch.Generator().manual_seed(seed)
    total, sq = 0, 0
    B = x.shape[0]
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        s = mfa.sample(generator=g, n=m)                                       # (m, B, C, H, W)
        X = torch.where(missing, s, x)
        y = F.relu(F.conv2d(X.flatten(0, 1), conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation))
        y = y.reshape(m, B, *y.shape[1:])
        total = total + y.sum(0)
        sq = sq + (y * y).sum(0)
    mean = total / n
    se = ((sq / n - mean ** 2).clamp_min(0) / n).sqrt()
    return mean, se


CONFIGS = [
    dict(C=1, K=1, L=1, stride=1, padding=0, dilation=1, k=3, per_channel=False),
    dict(C=2, K=3, L=2, stride=2, padding=1, dilation=1, k=3, per_channel=False),
    dict(C=3, K=2, L=4, stride=1, padding=2, dilation=2, k=3, per_channel=True, n=20_000),  # dilated float64 conv is slow on CPU
    dict(C=1, K=2, L=3, stride=(2, 1), padding=(1, 0), dilation=1, k=(3, 2), per_channel=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "C{C}K{K}L{L}s{stride}p{padding}d{dilation}".format(**c))
def test_matches_monte_carlo(cfg):
    torch.manual_seed(0)
    C, K, L = cfg["C"], cfg["K"], cfg["L"]
    B, H, W = 2, 6, 7
    conv = MisConv2d(C, 4, cfg["k"], stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], dtype=torch.float64)
    mfa = random_mfa(B=B, K=K, L=L, C=C, H=H, W=W, seed=1, factor_scale=0.5)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    missing = torch.rand(B, C if cfg["per_channel"] else 1, H, W, generator=g) < 0.5
    out = conv(x, missing, mfa)
    mc, se = monte_carlo(conv, x, missing, mfa, n=cfg.get("n", 100_000))
    assert out.shape == mc.shape
    z = (out - mc).abs() / (se + 1e-12)
    # 5 standard errors over a few hundred outputs: a wrong formula (e.g. σφ halved) fails by far more.
    assert z.max() < 5.0, f"max |exact - MC| / se = {z.max():.2f}"


def test_monte_carlo_check_detects_a_halved_sigma_term():
    # The Monte Carlo test must be sharp enough to catch the public implementation's bug.
    torch.manual_seed(0)
    conv = MisConv2d(1, 4, 3, padding=1, dtype=torch.float64)
    mfa = random_mfa(B=2, K=1, L=2, C=1, H=6, W=6, seed=1, factor_scale=0.5)
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    missing = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    missing[:, :, 1:5, 1:5] = True
    mc, se = monte_carlo(conv, x, missing, mfa, n=100_000)
    import labkit.misconv as mc_mod

    good = mc_mod.expected_relu

    def halved(mu, var):
        s = var.clamp_min(1e-30).sqrt()
        t = mu / s
        return mu * 0.5 * torch.erfc(-t / 2 ** 0.5) + 0.5 * s * torch.exp(-0.5 * t * t) / (2 * torch.pi) ** 0.5

    try:
        mc_mod.expected_relu = halved
        bad = conv(x, missing, mfa)
    finally:
        mc_mod.expected_relu = good
    assert ((bad - mc).abs() / (se + 1e-12)).max() > 10


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


def test_gradcheck_weight_bias_input_and_mfa():
    torch.manual_seed(0)
    conv = MisConv2d(2, 2, 3, padding=1, stride=2, dtype=torch.float64)
    mfa = random_mfa(B=2, K=2, L=2, C=2, H=5, W=5)
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    missing = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.5

    params = [
        conv.weight.detach().clone().requires_grad_(True),
        conv.bias.detach().clone().requires_grad_(True),
        x.clone().requires_grad_(True),
        torch.log(mfa.weights).clone().requires_grad_(True),
        mfa.means.clone().requires_grad_(True),
        mfa.factors.clone().requires_grad_(True),
        torch.log(mfa.variances).clone().requires_grad_(True),
    ]

    def func(weight, bias, xx, logits, means, factors, log_var):
        layer = MisConv2d(2, 2, 3, padding=1, stride=2, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.zero_()
        # functional call so gradcheck perturbs the weight tensor directly
        m = MFA(torch.softmax(logits, 1), means, factors, log_var.exp(), validate=False)
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (xx, missing, m))

    assert torch.autograd.gradcheck(func, tuple(params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_weight_gradient_flows_through_the_squared_weight_path():
    # Only variance depends on W⊙W: with mean fixed, the gradient through W² must be non-zero and
    # equal to finite differences. Compare autograd against a central difference on one weight entry.
    torch.manual_seed(1)
    conv = MisConv2d(1, 1, 3, padding=1, bias=False, dtype=torch.float64)
    B, H, W = 1, 5, 5
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
