"""Conditioning the lab's own EM-fitted classical MFAs in float32 gives float64's numbers.

The committed classical MFAs (K = 50, L = 6, variance floor 1e-3) are sharp: conditioned on the
observed pixels of a real test image, most responsibilities are below float32's smallest number,
and the Woodbury form of the Mahalanobis term cancels thousands of nats. Both once cost up to
thousands of nats per image in float32. Here, on real MNIST and CIFAR-10 test images with the
evaluation protocol's holes, float32 must match float64 within 0.01 nat per image on every image;
the float64 route itself is held to dense Gaussian conditioning with ``torch.distributions``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from labkit import paths
from labkit.mfa import ClassicalMFA
from labkit.models.dmfa import test_masks

ROOT = Path(__file__).resolve().parents[1]
MFAS = {"mnist": ROOT / "results/dmfa/cpu/mnist_mfa_K50_L6.pt",
        "cifar10": ROOT / "results/dmfa/cpu/cifar10_mfa_K50_L6.pt"}
N_IMAGES = {"mnist": 300, "cifar10": 120}


def _committed_mfa(name: str) -> ClassicalMFA:
    stored = torch.load(MFAS[name], map_location="cpu", weights_only=False)
    state = {k.removeprefix("mfa."): v for k, v in stored["model"].items()}
    K, L, *shape = state["factors"].shape
    model = ClassicalMFA.empty(K, L, tuple(shape))
    model.load_state_dict(state)
    return model


def _test_images(name: str, n: int) -> torch.Tensor:
    from labkit.data import load_dataset

    shared = paths.shared_datasets_dir()
    have = (shared / "mnist").is_dir() if name == "mnist" else (shared / "cifar10-jpeg" / "cifar10-jpeg.tar.gz").is_file()
    if not have:
        pytest.skip(f"no offline {name} copy under {shared} (set LABKIT_SHARED_DATASETS)")
    return load_dataset(name, "test", limit=n, quiet=True, download=False).images


def _both(name: str):
    model = _committed_mfa(name)
    x = _test_images(name, N_IMAGES[name])
    C, H, W = x.shape[1:]
    missing = test_masks(x.shape[0], H, W, seed=0)
    m64 = ClassicalMFA(*(t.double() for t in (model.weights, model.means, model.factors, model.variances)))
    c32, c64 = model.condition(x, ~missing), m64.condition(x.double(), ~missing)
    nll32, nll64 = -c32.log_prob(x, missing), -c64.log_prob(x.double(), missing)
    return x, missing, m64, (c32, nll32), (c64, nll64)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_float32_conditioning_matches_float64_on_every_image(name):
    _, _, _, (c32, nll32), (c64, nll64) = _both(name)
    assert c32.weights.dtype == torch.float32 and nll32.dtype == torch.float32
    err = (nll32.double() - nll64).abs()
    assert float(err.max()) < 0.01, f"{name}: worst image off by {float(err.max()):.4g} nats (image {int(err.argmax())})"
    # responsibilities (linear and, where they matter, log), conditional means, factors
    assert float((c32.weights.double() - c64.weights).abs().max()) < 1e-3
    relevant = c64.log_weights > -30
    assert float((c32.log_weights.double() - c64.log_weights).abs()[relevant].max()) < 0.01
    assert float((c32.means.double() - c64.means).abs().max()) < 1e-3
    assert float((c32.factors.double() - c64.factors).abs().max()) < 1e-3
    # the mixture must be sharp for this test to mean anything: responsibilities below float32's range
    assert bool((c64.weights < 1e-38).any()), "the committed MFA is no longer sharp: the test lost its point"


def test_float64_conditioning_matches_dense_gaussian_conditioning_on_real_digits():
    """Independent check of the reference: the hidden pixels' conditional density by dense Schur
    complements per component and torch.distributions' mixture, for a few real digits."""
    model = _committed_mfa("mnist")
    x = _test_images("mnist", 4).double()
    missing = test_masks(4, 28, 28, seed=0)
    m = ClassicalMFA(*(t.double() for t in (model.weights, model.means, model.factors, model.variances)))
    ours = -m.condition(x, ~missing).log_prob(x, missing)
    K = m.weights.shape[0]
    mu = m.means.reshape(K, -1)
    A = m.factors.reshape(K, m.factors.shape[1], -1)
    cov = A.transpose(1, 2) @ A + torch.diag_embed(m.variances.reshape(K, -1))       # (K, N, N)
    for b in range(4):
        h = missing[b, 0].reshape(-1)
        o = ~h
        xo, xh = x[b, 0].reshape(-1)[o], x[b, 0].reshape(-1)[h]
        Soo, Sho, Shh = cov[:, o][:, :, o], cov[:, h][:, :, o], cov[:, h][:, :, h]
        Loo = torch.linalg.cholesky(Soo)
        gain = torch.cholesky_solve(Sho.transpose(1, 2), Loo).transpose(1, 2)          # Σ_ho Σ_oo⁻¹
        cmu = mu[:, h] + (gain @ (xo - mu[:, o]).unsqueeze(-1)).squeeze(-1)
        ccov = Shh - gain @ Sho.transpose(1, 2)
        ccov = 0.5 * (ccov + ccov.transpose(1, 2))
        log_resp = torch.log(m.weights) + MultivariateNormal(mu[:, o], scale_tril=Loo, validate_args=False).log_prob(xo)
        mix = MixtureSameFamily(Categorical(logits=log_resp), MultivariateNormal(cmu, ccov), validate_args=False)
        ref = -mix.log_prob(xh)
        assert abs(float(ours[b]) - float(ref)) < 1e-5 * max(1.0, abs(float(ref))), (b, float(ours[b]), float(ref))


def test_log_weights_survive_batch_operations():
    model = _committed_mfa("mnist")
    x = _test_images("mnist", 6)
    missing = test_masks(6, 28, 28, seed=0)
    c = model.condition(x, ~missing)
    for got in (c[2:5], c.detach(), c.to(torch.float64)):
        assert got.log_weights is not None
    from labkit.mfa import MFA
    joined = MFA.cat([c[:2], c[2:]])
    assert torch.equal(joined.log_weights, c.log_weights)
    ref = -c.log_prob(x, missing)
    assert torch.equal(-joined.log_prob(x, missing), ref)


@pytest.mark.parametrize("stem,name", [("mnist_complete", "mnist"), ("cifar10_complete", "cifar10")])
def test_committed_dmfas_rescore_to_their_committed_scores(stem, name):
    """The DMFA loss and scores share ``MFA.log_prob``: its new Mahalanobis form must leave the
    committed DMFA numbers where they were (written by the former formula), within 0.01 nat."""
    import pandas as pd

    from labkit.models.dmfa import evaluate_dmfa, load_dmfa

    x = _test_images(name, 200)
    model, _ = load_dmfa(ROOT / "results/dmfa/cpu" / f"{stem}.pt", device="cpu")
    missing = test_masks(x.shape[0], x.shape[2], x.shape[3], seed=0)
    got = evaluate_dmfa(model, x, missing)
    ref = pd.read_csv(ROOT / "results/dmfa/cpu" / f"{stem}.csv").iloc[: len(got)]
    assert float((got["nll"] - ref["nll"]).abs().max()) < 0.01
    assert float((got["sse"] - ref["sse"]).abs().max()) < 1e-3
