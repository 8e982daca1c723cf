r"""MisConv2d's fast path: the same function as :func:`labkit.misconv.misconv_reference`, faster.

:mod:`labkit.misconv` states the layer (the paper's formula and a short reference implementation,
which is also the layer's *eager* path, ``MisConv2d(..., fast=False)``); this module computes the
same output and gradients with less work. ``tests/test_misconv_fast.py`` holds the two equal,
outputs and gradients, in float64 and float32.

1. *Window.* An output whose receptive field holds no missing pixel has ``σ² = 0`` and the
   same ``μ = conv(x⊙(1−J)) + b`` for every component, so its value is ``(Σ_k p_k)·ReLU(μ)``.
   Per image we take the bounding box of the missing pixels, widen it by the kernel's reach
   (stride, padding and dilation included), and run the factor, variance (and for K > 1 the
   mean) convolutions on crops of that size only (the largest box of the batch, so the crops
   stack into one batch). For a square of side I/2 the crop is about a third of the image:
   (L+2)·K full-size convolutions become one full-size convolution plus (L+1)·K (K = 1) or
   (L+2)·K (K > 1) crop-size ones. When the box covers most of the output (scattered noise
   masks) the full-size convolutions are used.
2. *Fusion.* The elementwise part (gather of the window's means, squares and sum over L, the
   expected ReLU, the mixture sum, ReLU outside the window, scatter back) is one
   ``torch.compile``-d function, and its backward another, written by hand from
   ``∂E/∂μ = Φ(t)`` and ``∂E/∂σ² = φ(t)/(2σ)``: a few fused loops instead of a dozen passes
   over memory. The crops are cut by one compiled gather.
3. *Direct kernel.* Without autograd and for few input taps (one channel, 3x3: C·kh·kw ≤ 9),
   the window's convolutions are computed inside the fused kernel itself (an unrolled sum over
   the taps), so their (L+1)·K outputs never go to memory.

On the CPU in float32 the expected ReLU is evaluated as ``ReLU(μ) + σ·φ(u)·g(u)``, u = |μ|/σ,
with ``g(u) = 1 − u·Φ(−u)/φ(u)`` from a polynomial fit (relative error < 1e-6, no cancellation
in the lower tail, one exp; Inductor evaluates ``erfc`` one element at a time). Float64 and
CUDA use ``torch.erfc``. Kernels are compiled per shape (``dynamic=False``); the first call
with a new shape compiles (about 1 to 15 s, cached on disk by Inductor), see
:func:`compile_report`. Importing this module changes nothing; the first compilation raises
``torch._dynamo.config.recompile_limit`` to 64 (process-wide) so that a process meeting several
dtypes / geometries keeps its kernels compiled.

If ``torch.compile`` is unavailable or fails (no C++ compiler, an unsupported platform, or the
environment variable ``LABKIT_MISCONV_COMPILE=0``), the same windowed algorithm runs with the
elementwise part in eager PyTorch (convolutions instead of the direct kernel), and the reason
is logged once (logger ``labkit.misconv``). The fast path's backward is first order only
(``torch.autograd.gradgradcheck`` needs ``fast=False``).

Entry point: :func:`misconv_fast`. Switches: :func:`set_fast_default` / :func:`fast_default`
(which path layers built with ``fast=None`` take), :func:`compile_enabled`, :func:`compile_report`.
``labkit.misconv`` re-exports them.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from labkit.mfa import MFA

__all__ = ["misconv_fast", "set_fast_default", "fast_default", "compile_enabled", "compile_report"]

# One logger for the layer, whichever of its two modules speaks.
log = logging.getLogger("labkit.misconv")

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Use the windowed path only when its crop is at most this fraction of the output: beyond it the
# gather/scatter costs more than the convolutions it saves (benchmarks/bench_misconv.py).
WINDOW_MAX_FRACTION = 0.6
# Without autograd, compute the window's convolutions inside the fused kernel when each output
# has at most this many input taps (C·kh·kw; 9 = one channel, 3x3) and the unrolled sum stays
# small enough to compile quickly (taps·K·(M+1) terms, M = crops per component).
DIRECT_MAX_TAPS = 9
DIRECT_MAX_TERMS = 60

# ---------------------------------------------------------------------------------------------
# Switches
# ---------------------------------------------------------------------------------------------
_FAST_DEFAULT = True
_COMPILE = os.environ.get("LABKIT_MISCONV_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")
_compiled: dict[str, object] = {}        # name -> compiled function, or None once compiling it failed
_compile_seconds: dict[str, float] = {}  # name -> wall time of its first (compiling) call
_limit_warned: set[str] = set()
_DYNAMO_LIMIT_RAISED = False
_DIRECT_EAGER = False  # tests: run the direct kernel even uncompiled (slow, same function)


def set_fast_default(fast: bool) -> None:
    """Choose the path of layers built with ``fast=None`` (the default): fast (True) or eager (False)."""
    global _FAST_DEFAULT
    if not isinstance(fast, bool):
        raise TypeError(f"fast must be a bool, got {type(fast).__name__}")
    _FAST_DEFAULT = fast


def fast_default(device: torch.device | str | None = None) -> bool:
    """Whether layers built with ``fast=None`` take the fast path: the switch
    :func:`set_fast_default` (on unless changed) and, given the ``device`` of the input, only on
    the CPU. On a GPU the eager formula was the faster one at the paper's sizes (16 of 18 settings
    over two runs on an H200, docs/timing.md): the fast path saves arithmetic, which a GPU has to
    spare, at the price of more kernel launches, and it compiles on the first call of each shape."""
    if device is None:
        return _FAST_DEFAULT
    return _FAST_DEFAULT and torch.device(device).type == "cpu"


def compile_enabled() -> bool:
    """Whether the fast path may use ``torch.compile``: not disabled by LABKIT_MISCONV_COMPILE=0
    and no compilation has failed in this process."""
    return _COMPILE and all(v is not None for v in _compiled.values())


def compile_report() -> dict[str, float | None]:
    """Per fused function: seconds its first (compiling) call took, or None where compiling failed."""
    report: dict[str, float | None] = dict(_compile_seconds)
    report.update({name: None for name, fn in _compiled.items() if fn is None})
    return report


_RECOMPILE_LIMIT = 64


def _run_fused(name: str, fn, *args, eager_ok: bool = True, **kwargs):
    """``torch.compile(fn)(*args, **kwargs)``, compiled once per ``name``.

    Where compiling is off or has failed, runs ``fn(*args)`` (keyword arguments only tune the
    compiled version, see :func:`_approx`) — or, with ``eager_ok=False``, returns ``NotImplemented``
    so the caller takes another path (the direct kernel is slow uncompiled).
    """
    global _DYNAMO_LIMIT_RAISED
    if _COMPILE and _compiled.get(name, 0) is not None:
        compiled = _compiled.get(name)
        first = compiled is None
        if first:
            if not _DYNAMO_LIMIT_RAISED:
                # Dynamo recompiles a function for each dtype, grad mode, kernel geometry and
                # loop count (K, L) it meets, and gives up after 8 variants per function: too few
                # for a process that times several layers (benchmarks, tests). Process-wide setting.
                dynamo_config = importlib.import_module("torch._dynamo").config
                if dynamo_config.recompile_limit < _RECOMPILE_LIMIT:
                    log.info("raising torch._dynamo.config.recompile_limit from %d to %d",
                             dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
                    dynamo_config.recompile_limit = _RECOMPILE_LIMIT
                _DYNAMO_LIMIT_RAISED = True
            # dynamic=False: one specialised kernel per shape. Kernels compiled with symbolic
            # sizes (what dynamic=None switches to at the second shape) run up to 3x slower here
            # (the unrolled direct kernel loses its vectorisation). Squares give one window size
            # per data set; spread-out masks take the full-size path; a new shape costs a
            # compilation of a second or two (Inductor caches them on disk).
            compiled = _compiled[name] = torch.compile(fn, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        try:
            out = compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 — whatever the compiler's failure, the eager code is the same function
            msg = str(exc).strip().splitlines()
            if type(exc).__name__ in ("FailOnRecompileLimitHit", "RecompileError"):
                # this variant only: the variants compiled so far stay in use
                if name not in _limit_warned:
                    _limit_warned.add(name)
                    log.warning("%s: torch.compile's recompile limit reached; new variants run uncompiled", name)
            else:
                _compiled[name] = None
                log.warning("torch.compile of %s failed (%s: %s); using its eager version", name,
                            type(exc).__name__, msg[0] if msg else "")
            return fn(*args) if eager_ok else NotImplemented
        if first:
            _compile_seconds[name] = time.perf_counter() - t0
            log.info("compiled %s in %.1f s", name, _compile_seconds[name])
        return out
    return fn(*args) if eager_ok or _DIRECT_EAGER else NotImplemented


def _approx(t: Tensor) -> dict:
    """Compiled kernels on the CPU in float32/16 use the erfc-free fits below: Inductor evaluates
    erfc one element at a time there. Float64 (tests, gradcheck) and CUDA use ``torch.erfc``."""
    return {"approx": t.device.type == "cpu" and t.dtype != torch.float64}


# ---------------------------------------------------------------------------------------------
# Elementwise kernels: plain functions, run eagerly or compiled by _run_fused
# ---------------------------------------------------------------------------------------------
# E[ReLU(N(μ, σ²))] = ReLU(μ) + σ·φ(u)·g(u) and Φ(−u) = φ(u)·R(u), with u = |μ|/σ, φ the standard
# normal pdf, R(u) = Φ(−u)/φ(u) the Mills ratio and g(u) = 1 − u·R(u). (For μ ≥ 0 use
# E(μ) = μ + E(−μ), which holds because E(μ) − E(−μ) = E[Y] = μ.) Both g and R are smooth, so
# g(u) = τ²·P_g(s) and R(u) = τ·P_R(s) with τ = 1/(1 + 0.3u), s = (52τ − 31)/21 ∈ [−1, 1] on
# u ∈ [0, 14], P degree-9 polynomials (least-squares fits to torch.special.erfcx in float64, relative
# error < 5e-8; < 1e-6 evaluated in float32; tests/test_misconv_fast.py checks them). Beyond
# u = 14 φ(u) < 1e-42 and the product vanishes. Unlike μΦ + σφ, the sum ReLU(μ) + σφg has no
# cancellation in the lower tail, and it costs one exp and one division instead of an erfc.
_G_COEFS = (0.3734773531990216, 0.3930136430348152, 0.20074509560854623, 0.04325982523296699,
            -0.006621683656795412, -0.004652840069287482, 0.0003962782262483811, 0.0004701312300455612,
            -4.727176344840164e-05, -4.057284943892937e-05)
_R_COEFS = (0.6442550231746582, 0.4069051168485095, 0.16807966460094134, 0.03723834350136876,
            -0.0008047996585905893, -0.0024464338294417015, -9.507503779259197e-05, 0.0001939058380455065,
            3.1623008877497094e-06, -1.4774700207963888e-05)


def _poly(s: Tensor, coefs) -> Tensor:
    acc = s * coefs[-1] + coefs[-2]
    for c in coefs[-3::-1]:
        acc = acc * s + c
    return acc


def _mills_fit(u: Tensor):
    """``(τ, s)`` of the fits above for ``u ≥ 0``."""
    tau = 1.0 / (1.0 + 0.3 * u)
    return tau, tau * (52.0 / 21.0) - 31.0 / 21.0


def _g_fit(u: Tensor) -> Tensor:
    """g(u) = 1 − u·R(u) for u ≥ 0 (relative error < 1e-6 in float32)."""
    tau, s = _mills_fit(u)
    return tau * tau * _poly(s, _G_COEFS)


def _r_fit(u: Tensor) -> Tensor:
    """Mills ratio R(u) = Φ(−u)/φ(u) for u ≥ 0 (relative error < 1e-6 in float32)."""
    tau, s = _mills_fit(u)
    return tau * _poly(s, _R_COEFS)


def _sigma_t(mu: Tensor, var: Tensor):
    """``(pos, σ, t)``: var > 0, √var (1 where var == 0, so nothing divides by zero), μ/σ."""
    pos = var > 0
    sigma = torch.sqrt(torch.where(pos, var, torch.ones_like(var)))
    return pos, sigma, mu / sigma


def _expected_relu_fwd(mu: Tensor, var: Tensor, approx: bool) -> Tensor:
    """E[ReLU(N(μ, σ²))], elementwise; ``approx``: the erfc-free fit (float32 on the CPU)."""
    pos, sigma, t = _sigma_t(mu, var)
    if approx:
        u = t.abs()
        e = F.relu(mu) + sigma * (torch.exp(-0.5 * u * u) * _INV_SQRT_2PI) * _g_fit(u)
    else:
        cdf = 0.5 * torch.erfc(-t * _INV_SQRT_2)
        e = mu * cdf + sigma * (torch.exp(-0.5 * t * t) * _INV_SQRT_2PI)
    return torch.where(pos, e, F.relu(mu))


def _normal_parts(mu: Tensor, var: Tensor, approx: bool):
    """E with its derivatives ``∂E/∂μ`` and ``∂E/∂σ²``, elementwise.

    For σ² > 0: ∂E/∂μ = Φ(t), ∂E/∂σ² = φ(t)/(2σ), t = μ/σ.
    For σ² = 0: E = ReLU(μ), ∂E/∂μ = 1[μ > 0], ∂E/∂σ² = 0 (what autograd gives :func:`labkit.misconv.expected_relu`).
    """
    pos, sigma, t = _sigma_t(mu, var)
    pdf = torch.exp(-0.5 * t * t) * _INV_SQRT_2PI
    if approx:
        u = t.abs()
        tail = pdf * _r_fit(u)                                                 # Φ(−|t|)
        cdf = torch.where(t < 0, tail, 1.0 - tail)
        e = F.relu(mu) + sigma * pdf * _g_fit(u)
    else:
        cdf = 0.5 * torch.erfc(-t * _INV_SQRT_2)
        e = mu * cdf + sigma * pdf
    e = torch.where(pos, e, F.relu(mu))
    d_mu = torch.where(pos, cdf, (mu > 0).to(mu.dtype))
    d_var = torch.where(pos, pdf * 0.5 / sigma, torch.zeros_like(mu))
    return e, d_mu, d_var


def _full_fwd(mu, fconv, vconv, weights, approx=False):
    """Σ_k p_k E[ReLU(N(μ_k, σ²_k))], σ² = vconv + Σ_l fconv², over the whole output.

    Shapes: mu, vconv ``(B, K, O, n)``; fconv ``(B, K, L, O, n)``; weights ``(B, K)`` -> ``(B, O, n)``.
    """
    var = vconv + (fconv * fconv).sum(2)
    e = _expected_relu_fwd(mu, var, approx)
    return (weights[:, :, None, None] * e).sum(1)


def _full_bwd(g, mu, fconv, vconv, weights, approx=False):
    """Gradients of :func:`_full_fwd` w.r.t. (mu, fconv, vconv, weights) given ``g`` ``(B, O, n)``."""
    var = vconv + (fconv * fconv).sum(2)
    e, d_mu, d_var = _normal_parts(mu, var, approx)
    gp = g[:, None] * weights[:, :, None, None]                                # (B, K, O, n)
    g_var = gp * d_var
    return gp * d_mu, 2.0 * g_var[:, :, None] * fconv, g_var, (g[:, None] * e).sum((2, 3))


def _window_index(rc: Tensor, ho: int, wo: int, Wo: int) -> Tensor:
    """Flat output positions ``(B, 1, ho·wo)`` of the windows whose top-left corners are ``rc`` ``(B, 2)``."""
    i = torch.arange(ho, device=rc.device)
    j = torch.arange(wo, device=rc.device)
    idx = (rc[:, :1] + i)[:, :, None] * Wo + (rc[:, 1:] + j)[:, None, :]
    return idx.reshape(rc.shape[0], 1, ho * wo)


def _window_fwd(mu_full, rc, mwin, fwin, vwin, weights, approx=False):
    """The layer's output from the full-size μ and the window's convolutions.

    Outside the window: (Σ_k p_k)·ReLU(μ). Inside: Σ_k p_k E[ReLU(N(μ + mwin_k, vwin_k + Σ_l fwin_kl²))].

    Shapes: mu_full ``(B, O, Ho, Wo)`` (bias included); rc ``(B, 2)`` int64, each window's first
    output row and column; mwin (None when K = 1: μ_full is then the filled image's conv) and
    vwin ``(B, K, O, ho, wo)``; fwin ``(B, K, L, O, ho, wo)``; weights ``(B, K)`` -> ``(B, O, Ho, Wo)``.
    """
    B, O, Ho, Wo = mu_full.shape
    ho, wo = vwin.shape[-2:]
    flat = mu_full.reshape(B, O, Ho * Wo)
    ix = _window_index(rc, ho, wo, Wo).expand(B, O, ho * wo)
    var = (vwin + (fwin * fwin).sum(2)).reshape(B, -1, O, ho * wo)
    mu = flat.gather(2, ix)[:, None]
    if mwin is not None:
        mu = mu + mwin.reshape(B, -1, O, ho * wo)
    e = (weights[:, :, None, None] * _expected_relu_fwd(mu, var, approx)).sum(1)
    base = weights.sum(1)[:, None, None] * F.relu(flat)
    return base.scatter(2, ix, e).reshape(B, O, Ho, Wo)


def _window_bwd(g, mu_full, rc, mwin, fwin, vwin, weights, approx=False):
    """Gradients of :func:`_window_fwd` w.r.t. (mu_full, mwin, fwin, vwin, weights); ``g`` ``(B, O, Ho, Wo)``."""
    B, O, Ho, Wo = mu_full.shape
    ho, wo = vwin.shape[-2:]
    flat = mu_full.reshape(B, O, Ho * Wo)
    gf = g.reshape(B, O, Ho * Wo)
    ix = _window_index(rc, ho, wo, Wo).expand(B, O, ho * wo)
    var = (vwin + (fwin * fwin).sum(2)).reshape(B, -1, O, ho * wo)
    mu = flat.gather(2, ix)[:, None]
    if mwin is not None:
        mu = mu + mwin.reshape(B, -1, O, ho * wo)
    e, d_mu, d_var = _normal_parts(mu, var, approx)
    gw = gf.gather(2, ix)                                                      # (B, O, n)
    gp = gw[:, None] * weights[:, :, None, None]                               # (B, K, O, n)
    g_mu = gp * d_mu
    g_var = gp * d_var
    relu_full = F.relu(flat)
    # p_k multiplies ReLU(μ) outside the window only: all positions minus the window's.
    outside = (gf * relu_full).sum((1, 2)) - (gw * relu_full.gather(2, ix)).sum((1, 2))
    g_weights = (gw[:, None] * e).sum((2, 3)) + outside[:, None]
    base = weights.sum(1)[:, None, None] * gf * (flat > 0).to(gf.dtype)
    g_mu_full = base.scatter(2, ix, g_mu.sum(1)).reshape(B, O, Ho, Wo)
    g_var = g_var.reshape(vwin.shape)
    g_mwin = g_mu.reshape(mwin.shape) if mwin is not None else None
    return g_mu_full, g_mwin, 2.0 * g_var[:, :, None] * fwin, g_var, g_weights


def _window_fwd_k1(mu_full, rc, fwin, vwin, weights, approx=False):
    return _window_fwd(mu_full, rc, None, fwin, vwin, weights, approx)


def _window_bwd_k1(g, mu_full, rc, fwin, vwin, weights, approx=False):
    g_mu_full, _, g_f, g_v, g_w = _window_bwd(g, mu_full, rc, None, fwin, vwin, weights, approx)
    return g_mu_full, g_f, g_v, g_w


def _window_direct_fwd(mu_full, rc, stack, var_in, weight, weights, conv_geometry: tuple[int, int, int, int],
                       approx=False):
    """:func:`_window_fwd` with the window's convolutions done inside the same fused loop.

    For few input taps (C·kh·kw ≤ :data:`DIRECT_MAX_TAPS`) a convolution is a handful of
    multiply-adds per output; writing its (L+1)·K outputs to memory and reading them back costs
    more than computing them where they are used. Each output of the window sums
    ``weight[o, c, a, b] · crop[c, a·dh + i·sh, b·dw + j·sw]`` over the taps, unrolled here.

    Shapes: mu_full ``(B, O, Ho, Wo)``; rc ``(B, 2)``; stack ``(B, K, M, C, hin, win)`` (M = L for
    K = 1, else 1 + L with the mean crops first); var_in ``(B, K, C, hin, win)``; weight
    ``(O, C, kh, kw)``; weights ``(B, K)``; conv_geometry ``(sh, sw, dh, dw)``.
    """
    B, O, Ho, Wo = mu_full.shape
    _, K, M, C, hin, win = stack.shape
    kh, kw = weight.shape[2], weight.shape[3]
    sh, sw, dh, dw = conv_geometry
    ho, wo = (hin - dh * (kh - 1) - 1) // sh + 1, (win - dw * (kw - 1) - 1) // sw + 1
    acc = [[None] * M for _ in range(K)]
    vacc = [None] * K
    for c in range(C):
        for a in range(kh):
            for b in range(kw):
                w = weight[:, c, a, b].reshape(1, O, 1, 1)
                rows = slice(a * dh, a * dh + (ho - 1) * sh + 1, sh)
                cols = slice(b * dw, b * dw + (wo - 1) * sw + 1, sw)
                for k in range(K):
                    for m in range(M):
                        term = w * stack[:, k, m, c, rows, cols][:, None]
                        acc[k][m] = term if acc[k][m] is None else acc[k][m] + term
                    term = (w * w) * var_in[:, k, c, rows, cols][:, None]
                    vacc[k] = term if vacc[k] is None else vacc[k] + term
    n = ho * wo
    flat = mu_full.reshape(B, O, Ho * Wo)
    ix = _window_index(rc, ho, wo, Wo).expand(B, O, n)
    mu0 = flat.gather(2, ix)
    first = 1 if M > 0 and K > 1 else 0     # K > 1: stack[:, k, 0] is the mean crop
    e = None
    for k in range(K):
        var = vacc[k]
        for m in range(first, M):
            var = var + acc[k][m] * acc[k][m]
        mu = mu0 if first == 0 else mu0 + acc[k][0].reshape(B, O, n)
        ek = weights[:, k, None, None] * _expected_relu_fwd(mu, var.reshape(B, O, n), approx)
        e = ek if e is None else e + ek
    base = weights.sum(1)[:, None, None] * F.relu(flat)
    return base.scatter(2, ix, e).reshape(B, O, Ho, Wo)


def _crop_inputs(x, missing, means, factors, variances, rc, geometry: tuple[int, ...], k1: bool):
    """Everything the window's convolutions read, cropped in one pass over the inputs.

    Shapes: x ``(B, C, H, W)``; missing ``(B, 1|C, H, W)``; means, variances ``(B, K, C, H, W)``;
    factors ``(B, K, L, C, H, W)``; rc ``(B, 2)`` int64 window corners (output coordinates);
    geometry = ``(hin, win, sh, sw, ph, pw)``: crop size, stride and padding.
    Returns ``(full, stack, var_in)``:
      K = 1: full = the filled image ``(B, C, H, W)``; stack = factor crops ``(B, 1, L, C, hin, win)``;
      K > 1: full = x with zeros at missing pixels; stack = [mean, factors] crops ``(B, K, 1+L, C, hin, win)``;
      var_in = variance crops ``(B, K, C, hin, win)``; crops are zero where nothing is missing,
      including the zero padding outside the image.
    """
    B, K, L, C, H, W = factors.shape
    hin, win, sh, sw, ph, pw = geometry
    n = hin * win
    # Input rows/columns of each crop; those outside the image are the zero padding: their index
    # is clamped and their mask cleared.
    rows = rc[:, :1] * sh - ph + torch.arange(hin, device=rc.device)          # (B, hin)
    cols = rc[:, 1:] * sw - pw + torch.arange(win, device=rc.device)          # (B, win)
    inside = (((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]).reshape(B, 1, n)
    flat_in = (rows.clamp(0, H - 1)[:, :, None] * W + cols.clamp(0, W - 1)[:, None, :]).reshape(B, 1, n)
    J = missing.expand(B, C, H, W)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    Cm = missing.shape[1]
    Jc = missing.reshape(B, Cm, H * W).gather(2, flat_in.expand(B, Cm, n)) & inside
    Jc = Jc.expand(B, C, n)[:, None]                                           # (B, 1, C, n)

    def crop(t: Tensor) -> Tensor:                                             # (B, K, M, C, H, W) -> (B, K, M, C, n)
        M = t.shape[2]
        tf = t.reshape(B, K * M * C, H * W)
        return tf.gather(2, flat_in.expand(B, K * M * C, n)).reshape(B, K, M, C, n)

    if k1:
        full = torch.where(J, means[:, 0], x)
        stack = torch.where(Jc[:, :, None], crop(factors), zero)
    else:
        full = torch.where(J, zero, x)
        stack = torch.where(Jc[:, :, None], crop(torch.cat([means[:, :, None], factors], 2)), zero)
    var_in = torch.where(Jc, crop(variances[:, :, None])[:, :, 0], zero)
    return full, stack.reshape(*stack.shape[:4], hin, win), var_in.reshape(B, K, C, hin, win)


class _FullMixture(torch.autograd.Function):
    """:func:`_full_fwd` with the hand-written backward :func:`_full_bwd`."""

    @staticmethod
    def forward(ctx, mu, fconv, vconv, weights):
        ctx.save_for_backward(mu, fconv, vconv, weights)
        return _run_fused("full_fwd", _full_fwd, mu, fconv, vconv, weights, **_approx(mu))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return _run_fused("full_bwd", _full_bwd, g.contiguous(), *ctx.saved_tensors, **_approx(g))


class _WindowMixture(torch.autograd.Function):
    """:func:`_window_fwd` with the hand-written backward :func:`_window_bwd` (``mwin`` None: K = 1)."""

    @staticmethod
    def forward(ctx, mu_full, rc, mwin, fwin, vwin, weights):
        ctx.k1 = mwin is None
        if ctx.k1:
            ctx.save_for_backward(mu_full, rc, fwin, vwin, weights)
            return _run_fused("window_fwd_k1", _window_fwd_k1, mu_full, rc, fwin, vwin, weights, **_approx(mu_full))
        ctx.save_for_backward(mu_full, rc, mwin, fwin, vwin, weights)
        return _run_fused("window_fwd", _window_fwd, mu_full, rc, mwin, fwin, vwin, weights, **_approx(mu_full))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        g = g.contiguous()
        if ctx.k1:
            g_mu, g_f, g_v, g_w = _run_fused("window_bwd_k1", _window_bwd_k1, g, *ctx.saved_tensors, **_approx(g))
            return g_mu, None, None, g_f, g_v, g_w
        g_mu, g_m, g_f, g_v, g_w = _run_fused("window_bwd", _window_bwd, g, *ctx.saved_tensors, **_approx(g))
        return g_mu, None, g_m, g_f, g_v, g_w


# ---------------------------------------------------------------------------------------------
# Window geometry (host side: small integer arithmetic, in NumPy)
# ---------------------------------------------------------------------------------------------
def _span(hit: np.ndarray, n_out: int, k: int, s: int, p: int, d: int):
    """First output index and count, per image, of the outputs whose receptive field (along one
    axis) meets the span of ``hit`` ``(B, n_in)`` bool; count 0 when nothing is hit."""
    n_in = hit.shape[1]
    has = hit.any(1)
    first = hit.argmax(1)
    last = n_in - 1 - hit[:, ::-1].argmax(1)
    # Output i reads inputs i·s − p … i·s − p + d(k−1): it meets [first, last] iff
    # i ≥ ceil((first + p − d(k−1)) / s) and i ≤ floor((last + p) / s).
    lo = np.maximum(-((d * (k - 1) - p - first) // s), 0)
    hi = np.minimum((last + p) // s, n_out - 1)
    return np.where(has, lo, 0), np.where(has, np.maximum(hi - lo + 1, 0), 0)



# ---------------------------------------------------------------------------------------------
# The fast forward
# ---------------------------------------------------------------------------------------------
def misconv_fast(x: Tensor, missing: Tensor, mfa: MFA, weight: Tensor, bias: Tensor | None,
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """``Σ_k p_k E[ReLU(N(μ_k, σ²_k))]``, the function of :func:`labkit.misconv.misconv_reference`.

    Inputs are taken as validated (:class:`labkit.misconv.MisConv2d` does it, finiteness of ``x`` at
    observed pixels included, so this path never sees an observed NaN): x ``(B, C, H, W)``,
    missing bool ``(B, 1 or C, H, W)``, ``mfa`` over images ``(C, H, W)`` with batch B, weight
    ``(O, C, kh, kw)``, bias ``(O,)`` or None; stride, padding, dilation are pairs of ints
    (no string padding). Returns ``(B, O, Ho, Wo)`` in the weight's dtype.
    """
    B, C, H, W = x.shape
    K, L = mfa.n_components, mfa.n_factors
    kh, kw = weight.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    dev = x.device

    def conv(inp: Tensor, w: Tensor, b: Tensor | None, pad=padding) -> Tensor:
        return F.conv2d(inp, w, b, stride, pad, dilation, 1)

    # Rows and columns holding a missing pixel, on the host: the window's size must be known
    # there anyway to shape the crops (one small transfer on a GPU, a view on the CPU).
    if dev.type == "cpu":
        m = missing.numpy()
        hit_r, hit_c = m.any(axis=(1, 3)), m.any(axis=(1, 2))
    else:
        hits = torch.cat([missing.any(3).any(1), missing.any(2).any(1)], 1).cpu().numpy()
        hit_r, hit_c = hits[:, :H], hits[:, H:]
    if not hit_r.any():
        return F.relu(conv(x.to(weight.dtype), weight, bias))
    r_lo, r_n = _span(hit_r, Ho, kh, sh, ph, dh)
    c_lo, c_n = _span(hit_c, Wo, kw, sw, pw, dw)
    ho, wo = max(int(r_n.max()), 1), max(int(c_n.max()), 1)

    dt = weight.dtype
    x = x.to(dt)
    weights, means, factors, variances = (t.to(dt) for t in (mfa.weights, mfa.means, mfa.factors, mfa.variances))
    w2 = weight * weight
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, weight, bias, weights, means, factors, variances) if t is not None)

    if ho * wo > WINDOW_MAX_FRACTION * Ho * Wo:
        # Missing pixels spread over most of the image: full-size convolutions, fused elementwise.
        J = missing.expand(B, C, H, W)
        Jk = J.unsqueeze(1)
        zero = torch.zeros((), dtype=dt, device=dev)
        filled = torch.where(Jk, means, x.unsqueeze(1))                    # (B, K, C, H, W)
        fac = torch.where(Jk.unsqueeze(2), factors, zero)                  # (B, K, L, C, H, W)
        var_in = torch.where(Jk, variances, zero)
        stacked = torch.cat([filled.reshape(B * K, C, H, W), fac.reshape(B * K * L, C, H, W)], dim=0)
        out = conv(stacked, weight, None)
        O = out.shape[1]
        mu = out[: B * K].reshape(B, K, O, Ho * Wo)
        if bias is not None:
            mu = mu + bias.view(1, 1, -1, 1)
        vconv = conv(var_in.reshape(B * K, C, H, W), w2, None).reshape(B, K, O, Ho * Wo)
        fconv = out[B * K:].reshape(B, K, L, O, Ho * Wo)
        if needs_grad:
            return _FullMixture.apply(mu, fconv, vconv, weights).reshape(B, O, Ho, Wo)
        return _run_fused("full_fwd", _full_fwd, mu, fconv, vconv, weights, **_approx(mu)).reshape(B, O, Ho, Wo)

    # ---- windowed path. Windows that would overrun the bottom/right edge move back inside
    # (a larger window is a superset, always allowed).
    rc = torch.from_numpy(np.stack([np.minimum(r_lo, Ho - ho), np.minimum(c_lo, Wo - wo)], 1)).to(dev)
    hin, win = (ho - 1) * sh + dh * (kh - 1) + 1, (wo - 1) * sw + dw * (kw - 1) + 1
    k1 = K == 1
    crop_args = (x, missing, means, factors, variances, rc, (hin, win, sh, sw, ph, pw), k1)
    # Without autograd the cropping runs compiled (one fused gather); with autograd, eagerly.
    full, stack, var_in = _crop_inputs(*crop_args) if needs_grad else _run_fused("crop_inputs", _crop_inputs, *crop_args)
    mu_full = conv(full, weight, bias)
    M = stack.shape[2]
    taps = C * kh * kw
    if not needs_grad and taps <= DIRECT_MAX_TAPS and taps * K * (M + 1) <= DIRECT_MAX_TERMS:
        out = _run_fused("window_direct", _window_direct_fwd, mu_full, rc, stack, var_in, weight, weights,
                         (sh, sw, dh, dw), eager_ok=False, **_approx(mu_full))
        if out is not NotImplemented:
            return out
    vwin = conv(var_in.reshape(B * K, C, hin, win), w2, None, pad=0)
    O = vwin.shape[1]
    vwin = vwin.reshape(B, K, O, ho, wo)
    out = conv(stack.reshape(B * K * M, C, hin, win), weight, None, pad=0).reshape(B, K, M, O, ho, wo)
    mwin, fwin = (None, out) if k1 else (out[:, :, 0], out[:, :, 1:])
    if needs_grad:
        return _WindowMixture.apply(mu_full, rc, mwin, fwin, vwin, weights)
    if k1:
        return _run_fused("window_fwd_k1", _window_fwd_k1, mu_full, rc, fwin, vwin, weights, **_approx(mu_full))
    return _run_fused("window_fwd", _window_fwd, mu_full, rc, mwin, fwin, vwin, weights, **_approx(mu_full))
