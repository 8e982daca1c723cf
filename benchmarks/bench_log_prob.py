"""Benchmark: MFA negative log-likelihood at CelebA size, Woodbury (labkit) vs a dense |S|x|S| Gaussian.

Setting (the DMFA training loss on CelebA): images 3x64x64, a 32x32 square hidden (a quarter of the
pixels, |S| = 3 * 32 * 32 = 3072 coordinates per image), K = 1 component, L = 4 factors, float32.

- ``MFA.log_prob`` (labkit.mfa): Woodbury identity and determinant lemma, only an LxL matrix is
  factorised; memory O(N·L) per image (N = C·H·W; the coordinates outside S are masked, not gathered).
- dense: gather S, build Σ_S = A_S A_Sᵀ + diag(d_S) (|S|x|S|) for the whole batch, batched
  Cholesky, triangular solve, log-det: what the authors' public code did. Run on the first few
  images of the same batch so that it fits.

Prints time per batch and per image and the peak memory of each computation (CUDA: the caching
allocator's peak; CPU: the peak resident set size of a fresh child process running only that
computation, over its resident size just before), the per-image memory ratio (goal: >= 100x) and
the largest difference between the two log-densities on the images both computed.

    .venv/bin/python benchmarks/bench_log_prob.py [--batch 64] [--dense-batch 4] [--device cpu]
                                                  [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

C, H, W, SIDE, K, L = 3, 64, 64, 32, 1, 4
_LOG_2PI = math.log(2 * math.pi)


def make_problem(batch: int, device: torch.device, seed: int = 0):
    """An MFA like a DMFA's output, images, and one 32x32 hidden square per image (no big temporaries)."""
    from labkit.masks import square
    from labkit.mfa import MFA

    g = torch.Generator(device="cpu").manual_seed(seed)
    means = torch.rand((batch, K, C, H, W), generator=g).to(device)
    factors = torch.rand((batch, K, L, C, H, W), generator=g).to(device)
    factors.sub_(0.5).mul_(0.2)                                   # in ±0.1, the RGB bound
    variances = torch.rand((batch, K, C, H, W), generator=g).to(device)
    variances.mul_(0.05).add_(1e-3)
    weights = torch.full((batch, K), 1.0 / K, device=device)
    x = torch.rand((batch, C, H, W), generator=g).to(device)
    where = square(batch, H, W, side=SIDE, generator=g, device=device)
    return MFA(weights, means, factors, variances, validate=False), x, where


def dense_log_prob(mfa, x, where) -> torch.Tensor:
    """log p(x_S) with the full |S|x|S| covariance of every image of the batch at once (batched
    Cholesky, as the public code did). Every mask must select the same number of coordinates."""
    B, N = x.shape[0], C * H * W
    sel = where.expand(B, C, H, W).reshape(B, N)
    counts = sel.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("dense_log_prob needs masks of equal size")
    idx = sel.nonzero()[:, 1].reshape(B, 1, -1)                         # (B, 1, |S|)
    S = idx.shape[-1]
    Kc = mfa.n_components
    xs = x.reshape(B, 1, N).gather(-1, idx)                             # (B, 1, |S|)
    m = mfa.means.reshape(B, Kc, N).gather(-1, idx.expand(B, Kc, S))
    A = mfa.factors.reshape(B, Kc * L, N).gather(-1, idx.expand(B, Kc * L, S)).reshape(B, Kc, L, S)
    d = mfa.variances.reshape(B, Kc, N).gather(-1, idx.expand(B, Kc, S))
    sigma = torch.einsum("bkls,bklt->bkst", A, A)                       # (B, K, |S|, |S|)
    sigma.diagonal(dim1=-2, dim2=-1).add_(d)
    chol = torch.linalg.cholesky(sigma)
    del sigma
    z = torch.linalg.solve_triangular(chol, (xs - m).unsqueeze(-1), upper=False).squeeze(-1)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    comp = -0.5 * ((z * z).sum(-1) + logdet + S * _LOG_2PI)            # (B, K)
    return torch.logsumexp(torch.log(mfa.weights) + comp, dim=1)


def run_once(method: str, batch: int, device: torch.device, repeats: int, problem_batch: int) -> dict:
    """Time ``method`` on the first ``batch`` images of a ``problem_batch`` problem and measure its
    peak memory in this process (meant to be a fresh child). Both methods see the same images."""
    warm_mfa, warm_x, warm_w = make_problem(1, device, seed=1)  # load kernels, start thread pools
    fn = (lambda m, x, w: m.log_prob(x, w)) if method == "woodbury" else dense_log_prob
    fn(warm_mfa, warm_x, warm_w)
    del warm_mfa, warm_x, warm_w
    mfa, x, where = make_problem(problem_batch, device)
    mfa, x, where = mfa[:batch], x[:batch], where[:batch]
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    with torch.no_grad():
        lp = fn(mfa, x, where)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(mfa, x, where)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return {"method": method, "batch": batch, "seconds": statistics.median(times), "peak_bytes": max(peak, 0),
            "log_prob": lp.double().cpu().tolist()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(method: str, batch: int, device: str, threads: int, repeats: int, problem_batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--batch", str(batch), "--device", device,
           "--threads", str(threads), "--repeats", str(repeats), "--problem-batch", str(problem_batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="batch of MFA.log_prob (default 64)")
    p.add_argument("--dense-batch", type=int, default=4, help="batch of the dense computation (default 4)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", choices=["woodbury", "dense"], help=argparse.SUPPRESS)
    p.add_argument("--problem-batch", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from labkit.device import resolve_device

    device = resolve_device(args.device)
    if args.child:
        print(json.dumps(run_once(args.child, args.batch, device, args.repeats, args.problem_batch or args.batch)))
        return

    S = C * SIDE * SIDE
    print(f"MFA NLL at CelebA size: {C}x{H}x{W} images, {SIDE}x{SIDE} hidden (|S| = {S} coordinates), "
          f"K={K}, L={L}, float32, {device}, {args.threads} thread(s)")
    ours = child("woodbury", args.batch, str(device), args.threads, args.repeats, args.batch)
    dense = child("dense", args.dense_batch, str(device), args.threads, max(1, min(args.repeats, 3)), args.batch)
    print(f"{'method':<28}{'batch':>6}{'time/batch':>13}{'time/image':>13}{'peak memory':>14}{'memory/image':>15}")
    for r, name in ((ours, "MFA.log_prob (Woodbury)"), (dense, "dense |S|x|S| Cholesky")):
        print(f"{name:<28}{r['batch']:>6}{r['seconds'] * 1e3:>10.1f} ms{r['seconds'] / r['batch'] * 1e3:>10.2f} ms"
              f"{r['peak_bytes'] / 2**20:>11.1f} MB{r['peak_bytes'] / r['batch'] / 2**20:>12.2f} MB")
    per_ours = ours["peak_bytes"] / ours["batch"]
    per_dense = dense["peak_bytes"] / dense["batch"]
    ratio = per_dense / per_ours if per_ours > 0 else float("inf")
    print(f"memory per image, dense / Woodbury: {ratio:.0f}x (goal >= 100x: {'met' if ratio >= 100 else 'NOT met'})")
    print(f"time per image, dense / Woodbury: {dense['seconds'] / dense['batch'] / (ours['seconds'] / ours['batch']):.0f}x")
    n = min(ours["batch"], dense["batch"])
    diff = max(abs(a - b) for a, b in zip(ours["log_prob"][:n], dense["log_prob"][:n]))
    scale = max(abs(b) for b in dense["log_prob"][:n])
    print(f"largest |log p difference| on the {n} common images: {diff:.3g} nats (of |log p| up to {scale:.4g})")
    print(f"Σ_S alone is {S * S * 4 / 2**20:.1f} MB per image and component; the Woodbury path keeps "
          f"O(N·L) = {C * H * W * (L + 4) * 4 / 2**20:.2f} MB per image")


if __name__ == "__main__":
    main()
