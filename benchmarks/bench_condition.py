"""Benchmark: the cost of exact float32 conditioning, and of the DMFA loss that shares its formula.

Before, ``MFA.component_log_prob`` used the textbook Woodbury form ``rᵀD⁻¹r − uᵀM⁻¹u`` summed in
the input's dtype, and ``ClassicalMFA.condition`` returned linear responsibilities. In float32 on
the lab's sharp classical MFAs both lost up to thousands of nats per image (tests/test_mfa_precision.py).
Now the Mahalanobis term is ``|D^{-1/2}(r − Az)|² + |z|²`` (no cancellation) with float64 sums, and
responsibilities are kept in log space. This script times the two formulas interleaved in one
process (so a busy machine slows both alike) and prints the ratio and each one's error against
float64:

1. ``condition`` + hidden-pixel NLL of the committed classical MFA (K=50, L=6) on real test images
   (MNIST 14×14 hole, CIFAR-10 16×16 hole), float32;
2. the DMFA training loss, forward + backward, at the MNIST and CIFAR-10 training shapes
   (K=1, L=4, batch 48/64), float32.

    .venv/bin/python benchmarks/bench_condition.py [--images 256] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from labkit.data import load_dataset
from labkit.mfa import MFA, ClassicalMFA, _where_mask
from labkit.models.dmfa import test_masks

ROOT = Path(__file__).resolve().parents[1]
_LOG_2PI = math.log(2 * math.pi)


def textbook_component_log_prob(mfa: MFA, x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The former formula, transcribed: rᵀD⁻¹r − |L⁻¹u|², sums in the input's dtype. ``(B, K)``."""
    B, K, L = mfa.batch_size, mfa.n_components, mfa.n_factors
    where = _where_mask(where, B, mfa.image_shape)
    w = where.reshape(B, 1, -1).to(x.dtype)
    d = mfa.variances.reshape(B, K, -1)
    inv_d = w / d
    A = mfa.factors.reshape(B, K, L, -1) * w.unsqueeze(1)
    M = torch.einsum("bkln,bkn,bkmn->bklm", A, inv_d, A) + torch.eye(L, dtype=x.dtype)
    chol = torch.linalg.cholesky(M)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1) + (torch.log(d) * w).sum(-1)
    xs = torch.where(where, x, torch.zeros((), dtype=x.dtype))
    r = (xs.reshape(B, 1, -1) - mfa.means.reshape(B, K, -1)) * w
    u = torch.einsum("bkln,bkn->bkl", A, r * inv_d)
    v = torch.linalg.solve_triangular(chol, u.unsqueeze(-1), upper=False).squeeze(-1)
    maha = (r * r * inv_d).sum(-1) - (v * v).sum(-1)
    return -0.5 * (maha + logdet + w.sum(-1) * _LOG_2PI)


def textbook_condition(model: ClassicalMFA, x, observed) -> MFA:
    """The former ``ClassicalMFA.condition``, transcribed: textbook log-densities in the input's
    dtype and linear (softmax) responsibilities, which underflow to 0 in float32."""
    B = x.shape[0]
    full = model.as_mfa(B)
    K, L = full.n_components, full.n_factors
    obs = _where_mask(observed, B, full.image_shape)
    w = obs.reshape(B, 1, -1).to(x.dtype)
    inv_d = w / full.variances.reshape(B, K, -1)
    A = full.factors.reshape(B, K, L, -1) * w.unsqueeze(1)
    M = torch.einsum("bkln,bkn,bkmn->bklm", A, inv_d, A) + torch.eye(L, dtype=x.dtype)
    chol = torch.linalg.cholesky(M)
    comp_lp = textbook_component_log_prob(full, x, obs)
    xs = torch.where(obs, x, torch.zeros((), dtype=x.dtype))
    r = (xs.reshape(B, 1, -1) - full.means.reshape(B, K, -1)) * w
    u = torch.einsum("bkln,bkn->bkl", A, r * inv_d)
    z = torch.cholesky_solve(u.unsqueeze(-1), chol).squeeze(-1)
    A_full = full.factors.reshape(B, K, L, -1)
    cmean = full.means.reshape(B, K, -1) + torch.einsum("bkl,bkln->bkn", z, A_full)
    cfac = torch.linalg.solve_triangular(chol, A_full, upper=False) * (~obs).reshape(B, 1, 1, -1).to(x.dtype)
    cmean = torch.where(obs.reshape(B, 1, -1).expand_as(cmean), xs.reshape(B, 1, -1).expand_as(cmean), cmean)
    weights = torch.softmax(torch.log(model.weights)[None] + comp_lp, dim=1)
    return MFA(weights, cmean.reshape(full.means.shape), cfac.reshape(full.factors.shape),
               full.variances.contiguous(), validate=False)


def textbook_condition_nll(model: ClassicalMFA, x, missing):
    """The former route end to end: former ``condition``, then the textbook hidden-pixel NLL."""
    c = textbook_condition(model, x, ~missing)
    return -torch.logsumexp(torch.log(c.weights) + textbook_component_log_prob(c, x, missing), dim=1)


def exact_condition_nll(model: ClassicalMFA, x, missing):
    return -model.condition(x, ~missing).log_prob(x, missing)


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def load_mfa(name):
    stored = torch.load(ROOT / f"results/dmfa/cpu/{name}_mfa_K50_L6.pt", map_location="cpu", weights_only=False)
    state = {k.removeprefix("mfa."): v for k, v in stored["model"].items()}
    K, L, *shape = state["factors"].shape
    model = ClassicalMFA.empty(K, L, tuple(shape))
    model.load_state_dict(state)
    return model


def bench_condition(name, n, repeats):
    model = load_mfa(name)
    x = load_dataset(name, "test", limit=n, quiet=True).images
    missing = test_masks(n, x.shape[2], x.shape[3], seed=0)
    m64 = ClassicalMFA(*(t.double() for t in (model.weights, model.means, model.factors, model.variances)))
    ref = exact_condition_nll(m64, x.double(), missing)
    rows = []
    for _ in range(2):                      # interleave: old, new, old, new
        for label, fn in (("textbook (before)", textbook_condition_nll), ("exact (now)", exact_condition_nll)):
            with torch.no_grad():
                nll, t = timed(lambda: fn(model, x, missing), repeats)
            rows.append((label, t, float((nll.double() - ref).abs().max()), float((nll.double() - ref).abs().mean())))
    print(f"\n{name}: condition + hidden NLL, {n} test images, K=50 L=6, float32, median of {repeats} (x2 interleaved)")
    print("| formula | s per image | worst |error| vs float64 (nats) | mean |error| |")
    print("|---|---|---|---|")
    for label in ("textbook (before)", "exact (now)"):
        ts = [r for r in rows if r[0] == label]
        print(f"| {label} | {min(r[1] for r in ts) / n * 1e3:.3f} ms | {ts[0][2]:.4g} | {ts[0][3]:.4g} |")
    t_old = min(r[1] for r in rows if r[0].startswith("textbook"))
    t_new = min(r[1] for r in rows if r[0].startswith("exact"))
    print(f"cost of the fix: {t_new / t_old:.2f}x the former time")


def bench_loss(name, batch, repeats):
    C, H = (1, 28) if name == "mnist" else (3, 32)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(batch, 1, *s, generator=g).requires_grad_() for s in
              ((C, H, H), (4, C, H, H), (C, H, H))]
    x = torch.rand(batch, C, H, H, generator=g)
    missing = test_masks(batch, H, H, seed=0)

    def mfa():
        m, a, v = params
        return MFA(torch.ones(batch, 1), m, 0.25 * torch.tanh(a), 1e-4 + torch.sigmoid(v), validate=False)

    def step(fn):
        def run():
            loss = fn(mfa()).mean()
            loss.backward()
            return loss
        return run

    old = step(lambda f: -torch.logsumexp(textbook_component_log_prob(f, x, missing), 1))
    new = step(lambda f: -f.log_prob(x, missing))
    times = {"textbook (before)": [], "exact (now)": []}
    for _ in range(2):
        for label, fn in (("textbook (before)", old), ("exact (now)", new)):
            times[label].append(timed(fn, repeats)[1])
    t_old, t_new = min(times["textbook (before)"]), min(times["exact (now)"])
    print(f"{name}: DMFA loss forward+backward, batch {batch}, K=1 L=4: before {t_old * 1e3:.2f} ms, "
          f"now {t_new * 1e3:.2f} ms ({t_new / t_old:.2f}x)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} thread(s)")
    for name in ("mnist", "cifar10"):
        bench_condition(name, a.images, a.repeats)
    print()
    bench_loss("mnist", 48, a.repeats * 4)
    bench_loss("cifar10", 64, a.repeats * 4)


if __name__ == "__main__":
    main()
