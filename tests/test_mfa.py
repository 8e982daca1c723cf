"""labkit.mfa against independent references: torch.distributions and dense Gaussian algebra."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from labkit.mfa import MFA, ClassicalMFA, fit_mfa
from tests.conftest import random_mfa


def reference_log_prob(mfa: MFA, x, where):
    """Mixture of torch LowRankMultivariateNormal on the gathered subset, combined by logsumexp."""
    B, K, L = mfa.batch_size, mfa.n_components, mfa.n_factors
    C, H, W = mfa.image_shape
    out = []
    for b in range(B):
        idx = where[b].expand(C, H, W).reshape(-1)
        if idx.sum() == 0:
            out.append(torch.zeros((), dtype=x.dtype))
            continue
        comps = []
        for k in range(K):
            dist = LowRankMultivariateNormal(
                mfa.means[b, k].reshape(-1)[idx], mfa.factors[b, k].reshape(L, -1)[:, idx].T, mfa.variances[b, k].reshape(-1)[idx]
            )
            comps.append(torch.log(mfa.weights[b, k]) + dist.log_prob(x[b].reshape(-1)[idx]))
        out.append(torch.logsumexp(torch.stack(comps), 0))
    return torch.stack(out)


@pytest.mark.parametrize("K,L,C,per_channel", [(1, 1, 1, False), (3, 2, 2, False), (2, 4, 3, True), (1, 3, 1, True)])
def test_log_prob_matches_torch_distributions(K, L, C, per_channel):
    mfa = random_mfa(B=4, K=K, L=L, C=C, H=6, W=5, seed=K * 10 + L)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, C, 6, 5, generator=g, dtype=torch.float64)
    shape = (4, C if per_channel else 1, 6, 5)
    where = torch.rand(shape, generator=g) < torch.tensor([0.2, 0.5, 0.8, 1.0]).view(4, 1, 1, 1)
    got = mfa.log_prob(x, where)
    want = reference_log_prob(mfa, x, where)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)


def test_log_prob_ignores_values_outside_subset_including_nan():
    mfa = random_mfa(B=2, K=2, L=2, C=1)
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64)
    where = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    poisoned = torch.where(where, x, torch.full_like(x, float("nan")))
    a, b = mfa.log_prob(x, where), mfa.log_prob(poisoned, where)
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # gradients stay finite too
    p = poisoned.clone().requires_grad_(True)
    mfa.log_prob(p, where).sum().backward()
    assert torch.isfinite(p.grad).all() and (p.grad[~where.expand_as(p)] == 0).all()


def test_empty_subset_has_log_density_zero():
    mfa = random_mfa(B=2, K=3, L=2, C=1)
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64)
    where = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    torch.testing.assert_close(mfa.log_prob(x, where), torch.zeros(2, dtype=torch.float64))


def test_mixture_is_logsumexp_not_sum_of_weighted_nll():
    """Distinct components with unequal weights against torch's MixtureSameFamily of
    LowRankMultivariateNormal, on the whole image and on a subset. With distinct components
    log Σ_k p_k N_k differs from Σ_k p_k log N_k (Jensen), so the two readings are told apart."""
    from torch.distributions import Categorical, MixtureSameFamily

    B, K, L, C, H, W = 3, 3, 2, 1, 4, 5
    g = torch.Generator().manual_seed(7)
    weights = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.05, 0.05, 0.9]], dtype=torch.float64)
    means = 0.8 * torch.randn(B, K, C, H, W, generator=g, dtype=torch.float64)        # far apart
    factors = 0.4 * torch.randn(B, K, L, C, H, W, generator=g, dtype=torch.float64)
    variances = 0.05 + 0.3 * torch.rand(B, K, C, H, W, generator=g, dtype=torch.float64)
    mfa = MFA(weights, means, factors, variances)
    x = means[:, 1] + 0.3 * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    N = C * H * W
    for where in (torch.ones(B, 1, H, W, dtype=torch.bool), torch.rand(B, 1, H, W, generator=g) < 0.6):
        want = []
        for b in range(B):
            idx = where[b].expand(C, H, W).reshape(-1)
            comps = LowRankMultivariateNormal(means[b].reshape(K, N)[:, idx],
                                              factors[b].reshape(K, L, N)[:, :, idx].transpose(1, 2),
                                              variances[b].reshape(K, N)[:, idx])
            mix = MixtureSameFamily(Categorical(probs=weights[b]), comps)
            want.append(mix.log_prob(x[b].reshape(-1)[idx]))
        want = torch.stack(want)
        got = mfa.log_prob(x, where)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)
        weighted_sum = (weights * mfa.component_log_prob(x, where)).sum(1)
        assert ((got - weighted_sum).abs() > 1.0).all(), (got, weighted_sum)


def test_memory_is_linear_in_subset_size():
    # At 64x64x3 with half the pixels selected a dense |S|x|S| float32 matrix would take 72 MB
    # per sample; the Woodbury path must stay far below. We check no intermediate exceeds O(N*L).
    B, K, L, C, H, W = 2, 1, 4, 3, 64, 64
    mfa = random_mfa(B=B, K=K, L=L, C=C, H=H, W=W, dtype=torch.float32)
    x = torch.rand(B, C, H, W)
    where = torch.rand(B, 1, H, W, generator=torch.Generator().manual_seed(0)) < 0.5
    biggest = 0
    from torch.utils._python_dispatch import TorchDispatchMode

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    biggest = max(biggest, t.numel())
            return out

    with Track():
        lp = mfa.log_prob(x, where)
    assert torch.isfinite(lp).all()
    N = C * H * W
    assert biggest <= B * K * L * N, f"an intermediate of {biggest} elements exceeds O(B*K*L*N) = {B*K*L*N}"


def test_sample_moments_match_mixture_mean_and_variance():
    mfa = random_mfa(B=2, K=2, L=2, C=1, H=3, W=3)
    s = mfa.sample(generator=torch.Generator().manual_seed(0), n=200_000)
    assert s.shape == (200_000, 2, 1, 3, 3)
    torch.testing.assert_close(s.mean(0), mfa.mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(s.var(0), mfa.variance(), atol=0.05, rtol=0.03)
    # covariance of two pixels of one component: a aᵀ off-diagonal
    single = mfa[0:1]
    single = MFA(torch.tensor([[1.0, 0.0]], dtype=torch.float64), single.means, single.factors, single.variances)
    z = single.sample(generator=torch.Generator().manual_seed(1), n=200_000)[:, 0].reshape(200_000, -1)
    emp = torch.cov(z.T)
    A = single.factors[0, 0].reshape(2, -1)
    torch.testing.assert_close(emp, A.T @ A + torch.diag(single.variances[0, 0].reshape(-1)), atol=0.03, rtol=0)


def test_sample_is_reproducible_from_generator():
    mfa = random_mfa()
    a = mfa.sample(generator=torch.Generator().manual_seed(5))
    b = mfa.sample(generator=torch.Generator().manual_seed(5))
    c = mfa.sample(generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_validation_messages():
    mfa = random_mfa(B=2, K=2, L=1, C=1)
    w, m, A, d = mfa.weights, mfa.means, mfa.factors, mfa.variances
    with pytest.raises(ValueError, match=r"variances must be > 0"):
        MFA(w, m, A, d.clone().fill_(0))
    with pytest.raises(ValueError, match=r"weights must sum to 1"):
        MFA(w * 2, m, A, d)
    with pytest.raises(ValueError, match=r"weights must be >= 0"):
        MFA(torch.tensor([[1.5, -0.5], [0.5, 0.5]], dtype=torch.float64), m, A, d)
    with pytest.raises(ValueError, match=r"variances must have the shape of means .*variances=\(2, 2, 1, 4, 5\)"):
        MFA(w, m, A, d[..., :4, :])
    with pytest.raises(ValueError, match=r"factors must have shape \(B, K, L, C, H, W\)"):
        MFA(w, m, A[:, :, :, :, :4], d)
    with pytest.raises(ValueError, match=r"means must have shape"):
        MFA(w, m[:1], A, d)
    with pytest.raises(ValueError, match=r"weights must have shape \(B, K\)"):
        MFA(w[0], m, A, d)
    with pytest.raises(ValueError, match=r"NaN"):
        MFA(w, m.clone().fill_(float("nan")), A, d)
    with pytest.raises(TypeError, match=r"share one dtype"):
        MFA(w.float(), m, A, d)
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"where must be a bool tensor"):
        mfa.log_prob(x, torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match=r"where must have shape \(2, 1, 5, 5\) or \(2, 1, 5, 5\), got \(2, 1, 4, 5\)"):
        mfa.log_prob(x, torch.ones(2, 1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x must have shape \(2, 1, 5, 5\)"):
        mfa.log_prob(x[:1], torch.ones(1, 1, 5, 5, dtype=torch.bool))


def dense_condition(mu, Sigma, x, obs):
    """Brute-force Gaussian conditioning with dense matrices."""
    o, m = obs, ~obs
    S_oo, S_mo, S_mm = Sigma[o][:, o], Sigma[m][:, o], Sigma[m][:, m]
    K = S_mo @ torch.linalg.inv(S_oo)
    return mu[m] + K @ (x[o] - mu[o]), S_mm - K @ S_mo.T


def test_condition_matches_dense_gaussian_conditioning():
    g = torch.Generator().manual_seed(0)
    K, L, C, H, W = 3, 2, 1, 4, 4
    N = C * H * W
    model = ClassicalMFA(
        torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
        torch.randn(K, C, H, W, generator=g, dtype=torch.float64),
        0.5 * torch.randn(K, L, C, H, W, generator=g, dtype=torch.float64),
        torch.rand(K, C, H, W, generator=g, dtype=torch.float64) + 0.2,
    )
    B = 2
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    observed = torch.rand(B, 1, H, W, generator=g) < 0.6
    x_nan = torch.where(observed, x, torch.full_like(x, float("nan")))
    cond = model.condition(x_nan, observed)
    for b in range(B):
        o = observed[b].reshape(-1)
        logw = []
        for k in range(K):
            A = model.factors[k].reshape(L, N).T
            Sigma = A @ A.T + torch.diag(model.variances[k].reshape(-1))
            mu = model.means[k].reshape(-1)
            cm, cS = dense_condition(mu, Sigma, x[b].reshape(-1), o)
            torch.testing.assert_close(cond.means[b, k].reshape(-1)[~o], cm)
            Ac = cond.factors[b, k].reshape(L, N).T[~o]
            torch.testing.assert_close(Ac @ Ac.T + torch.diag(cond.variances[b, k].reshape(-1)[~o]), cS)
            logw.append(math.log(model.weights[k]) + MultivariateNormal(mu[o], Sigma[o][:, o]).log_prob(x[b].reshape(-1)[o]))
        torch.testing.assert_close(cond.weights[b], torch.softmax(torch.stack(logw), 0))
        # observed coordinates: mean = x, no factor mass
        torch.testing.assert_close(cond.means[b, :, :, ].reshape(K, -1)[:, o], x[b].reshape(-1)[o].expand(K, -1))
        assert (cond.factors[b].reshape(K, L, N)[:, :, o] == 0).all()
    # the conditioned MFA is a valid MFA
    MFA(cond.weights, cond.means, cond.factors, cond.variances)


def test_fit_mfa_increases_likelihood_and_recovers_a_known_mixture():
    # Data from a known 2-component MFA on 4x4 images; EM must raise the likelihood monotonically
    # and end near the true model's average log-likelihood.
    g = torch.Generator().manual_seed(0)
    truth = ClassicalMFA(
        torch.tensor([0.4, 0.6], dtype=torch.float64),
        torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4) * 2]).double(),
        0.5 * torch.randn(2, 1, 1, 4, 4, generator=g, dtype=torch.float64),
        torch.full((2, 1, 4, 4), 0.05, dtype=torch.float64),
    )
    data = truth.as_mfa(4000).sample(generator=g)
    model, hist = fit_mfa(data, 2, 1, iterations=60, min_variance=1e-4, progress=False, tol=0)
    assert all(b >= a - 1e-6 for a, b in zip(hist, hist[1:])), "EM log-likelihood must not decrease"
    true_ll = truth.log_prob(data).mean().item()
    fit_ll = model.log_prob(data).mean().item()
    assert fit_ll > true_ll - 0.5, (fit_ll, true_ll)
    assert sorted(model.weights.tolist()) == pytest.approx([0.4, 0.6], abs=0.03)


def test_fit_mfa_bad_input():
    with pytest.raises(ValueError, match=r"images must be a \(N, C, H, W\)"):
        fit_mfa(torch.rand(10, 28, 28), 2, 2)
    with pytest.raises(ValueError, match=r"at least K=5 images"):
        fit_mfa(torch.rand(3, 1, 4, 4), 5, 1)


def test_non_finite_value_at_a_used_coordinate_is_refused():
    """NaN/inf where the density reads x would make every number NaN: a clear error instead.
    NaN outside the coordinates used stays allowed (the missing pixels of an incomplete image)."""
    mfa = random_mfa(B=2, K=2, L=2, C=1, H=4, W=4)
    model = ClassicalMFA(mfa.weights[0], mfa.means[0], mfa.factors[0], mfa.variances[0])
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    where = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    where[:, :, :2] = True
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[1, 0, 0, 1] = bad                                 # inside `where`: used
        with pytest.raises(ValueError, match="non-finite"):
            mfa.log_prob(xb, where)
        with pytest.raises(ValueError, match="non-finite"):
            model.condition(xb, where)                       # observed = where
        xb = x.clone()
        xb[1, 0, 3, 1] = bad                                 # outside: ignored
        assert torch.isfinite(mfa.log_prob(xb, where)).all()
        assert torch.isfinite(model.condition(xb, where).log_prob(x, ~where)).all()


def test_no_factors_is_a_diagonal_gaussian_mixture():
    """L = 0 (allowed by the docstring) once crashed on a reshape; it is a mixture of diagonal
    Gaussians, checked against torch.distributions, and conditioning keeps its empty factors."""
    g = torch.Generator().manual_seed(0)
    B, K, C, H, W = 2, 3, 1, 4, 4
    w = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64), 1)
    m = torch.randn(B, K, C, H, W, generator=g, dtype=torch.float64)
    d = torch.rand(B, K, C, H, W, generator=g, dtype=torch.float64) + 0.1
    mfa = MFA(w, m, torch.zeros(B, K, 0, C, H, W, dtype=torch.float64), d)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    where = torch.rand(B, 1, H, W, generator=g) > 0.5
    for b in range(B):
        s = where[b, 0].reshape(-1)
        comps = torch.stack([MultivariateNormal(m[b, k, 0].reshape(-1)[s], torch.diag(d[b, k, 0].reshape(-1)[s]))
                             .log_prob(x[b, 0].reshape(-1)[s]) for k in range(K)])
        assert float(mfa.log_prob(x, where)[b]) == pytest.approx(float(torch.logsumexp(torch.log(w[b]) + comps, 0)), rel=1e-10)
    cond = ClassicalMFA(w[0], m[0], mfa.factors[0], d[0]).condition(x, where)
    assert cond.factors.shape == (B, K, 0, C, H, W) and torch.isfinite(cond.log_prob(x, ~where)).all()


def test_log_weights_must_agree_with_weights():
    mfa = random_mfa(B=2, K=3, L=1, C=1, H=3, W=3)
    lw = torch.log(mfa.weights)
    assert torch.equal(MFA.from_log_weights(lw, mfa.means, mfa.factors, mfa.variances).weights, torch.exp(lw))
    with pytest.raises(ValueError, match="exp\\(log_weights\\)"):
        MFA(mfa.weights.flip(1), mfa.means, mfa.factors, mfa.variances, log_weights=lw)
