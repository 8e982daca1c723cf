r"""MisConv2d on a GPU: the whole layer in one Triton kernel, forward and backward.

:mod:`labkit.misconv` states the layer (for component k, ``μ_k = conv(x⊙(1−J) + m_k⊙J, W) + b``,
``σ²_k = Σ_l conv(a_kl⊙J, W)² + conv(d_k⊙J, W⊙W)``, output ``Σ_k p_k E[ReLU(N(μ_k, σ²_k))]``) and
its eager formula, the reference. At the paper's sizes a GPU spends its time launching kernels,
not computing: the eager formula launches about twenty (three ``conv2d`` calls and a dozen
elementwise passes), the windowed CPU path of :mod:`labkit.misconv_fast` more. This module
computes the same function with:

- **forward: one kernel launch.** Each program takes a block of output pixels of one image and a
  block of output channels. It gathers, per tap of the filter, the input patch of every
  convolution the layer needs straight from ``x``, ``missing`` and the MFA (``x`` where observed,
  ``m_k`` where missing, zero in the padding; ``a_kl⊙J``; ``d_k⊙J``), multiplies it with ``Wᵀ``
  (``(W⊙W)ᵀ`` for the variances, squared in the kernel) by ``tl.dot``, and goes on in registers:
  ``Σ_l f²``, the expected ReLU, the mixture. The (L+2)·K convolutions' outputs never go to
  memory, nothing is stacked or padded beforehand, and ``x`` is never read at a missing pixel
  (its masked loads skip them), so NaN there is harmless.
- **backward: one kernel launch, plus one small sum per gradient asked for.** The same kernel
  (``BACKWARD``) recomputes μ_k, σ²_k and the factor outputs, forms the gradients with respect
  to them (``∂E/∂μ = Φ(t)``, ``∂E/∂σ² = φ(t)/(2σ)``, ``∂σ²/∂f_l = 2f_l``) and contracts them
  with the same patches: ``∂W`` (``Wᵀ`` and ``2W⊙`` for the squared-weight path), ``∂b`` and
  ``∂p_k`` as per-program partial sums (no atomics: deterministic), which one ``sum`` each reduces.
  Gradients for ``x`` or the MFA (a network that trains through its imputer, ``gradcheck``) take a
  second route: the kernel also writes the gradients of the convolutions' outputs, two
  ``conv2d_input`` calls turn them into input gradients, and a second Triton kernel routes those
  to ``x`` (observed pixels), ``m``, ``a``, ``d`` (missing pixels). The backward is first order only.

Launches per call: forward 1 (``relu(conv2d(x))``: 2); backward for weight and bias 1 + 2 sums
(+ 1 sum for the mixture weights); with input gradients as well, + 2 ``conv2d_input``, one ``W⊙W``
and the routing kernel. ``tests/test_misconv_triton.py`` counts them.

**Numerics.** ``E = μΦ(t) + σφ(t)`` (t = μ/σ) is evaluated with ``Φ(t) = ½ + ½ erf(t/√2)`` for
``|t| < U0``; in the tails, where ``1 + erf`` and ``μΦ + σφ`` cancel, as ``E = ReLU(μ) + σφ(u)g(u)``
and ``Φ(−u) = φ(u)R(u)`` (u = |t|, ``R`` the Mills ratio Φ(−u)/φ(u), ``g = 1 − uR``) with ``R``
and ``g`` from Laplace's continued fraction ``R(u) = 1/(u + 1/(u + 2/(u + 3/(u + …))))`` cut at
N_CF terms (``g = c/(u + c)`` with ``c`` the fraction after its first level: no cancellation).
Float32: U0 = 2, 24 terms; float64: U0 = 3, 48 terms (relative error of ``g`` below 4e-7 and
3e-15 at the switch, less beyond; ``tests/test_misconv_triton.py`` checks them). Triton has no
``erfc`` that its interpreter can run, which is why the tails are written out. Where ``σ² = 0``
(receptive field fully observed) the kernel returns ``ReLU(μ)`` with ``∂/∂μ = 1[μ > 0]`` and
``∂/∂σ² = 0``, the gradients autograd gives the eager formula. Float32 inputs use TF32 products
exactly when PyTorch's cuDNN convolutions do (``torch.backends.cudnn.allow_tf32``), float64 and
the interpreter exact ones. Only float32 and float64, filters with ``C·kh·kw ≤ 128`` (the first
layers MisConv is for: 1 or 3 channels) and numeric padding; :func:`unsupported` says why not.

**Testing without a GPU.** Triton's interpreter runs these kernels on CPU tensors with NumPy. In
triton 3.8 ``TRITON_INTERPRET=1`` is read when ``triton.jit`` wraps a function, not when triton is
imported; this module wraps its kernels on first use, once per mode, so setting the variable any
time before the first call (``monkeypatch.setenv`` in a test) is enough. One catch: triton's own
library helpers (``tl.sum``, ``tl.zeros``, ``tl.cdiv``, …) are themselves ``triton.jit``
functions wrapped at import, which the interpreter cannot call unless the variable was set before
triton was imported; so the kernels use only builtins (``tl.full`` for zeros, row sums as a
``tl.dot`` with a block of ones). CPU tensors run only under the interpreter (slow: for tests);
CUDA tensors run the compiled kernels, or the interpreter if ``TRITON_INTERPRET=1``. The tests
also compile the kernels ahead of time for an H100/H200 (``sm_90``) with triton's own compiler,
which needs no GPU.

Entry points: :func:`misconv_triton` (the layer; :class:`labkit.misconv.MisConv2d` with
``fast="triton"``, or ``fast=None`` on a CUDA device, calls it), :func:`available`,
:func:`unsupported`, :func:`triton_default`. Importing this module does not need triton.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from labkit import misconv_fast as _fast
from labkit.mfa import MFA

try:
    import triton
    import triton.language as tl
except ImportError as _exc:  # labkit runs without triton; only this path needs it
    triton = tl = None
    _IMPORT_ERROR: str | None = f"triton is not importable ({type(_exc).__name__}: {_exc})"
else:
    _IMPORT_ERROR = None

__all__ = ["misconv_triton", "available", "unsupported", "triton_default", "MAX_TAPS"]

#: Largest ``C·kh·kw`` the kernel takes: one block of taps per program (a ``tl.dot`` operand).
MAX_TAPS = 128
#: ``(U0, N_CF)`` per dtype: the tails' switch point and the continued fraction's length.
TAIL = {torch.float32: (2.0, 24), torch.float64: (3.0, 48)}

_KERNELS: dict[bool, tuple] = {}   # interpret? -> (main kernel, input-gradient kernel)


def available() -> bool:
    """Whether triton is importable (the path can run on CUDA, or on the CPU under the interpreter)."""
    return _IMPORT_ERROR is None


def _interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (read now, as triton.jit does)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def unsupported(device: torch.device | str, weight: Tensor, padding) -> str | None:
    """Why the Triton path cannot compute a layer with this ``weight`` ``(O, C, kh, kw)`` and
    ``padding`` on inputs on ``device``; None when it can."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return (f"it runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, "
                f"slow: for tests); got a tensor on {device}")
    if weight.dtype not in TAIL:
        return f"it computes in float32 or float64, the weight is {weight.dtype}"
    if isinstance(padding, str):
        return f"it takes numeric padding, got padding={padding!r}"
    taps = weight.shape[1] * weight.shape[2] * weight.shape[3]
    if taps > MAX_TAPS:
        return f"it takes filters with C·kh·kw <= {MAX_TAPS}, got {tuple(weight.shape[1:])} ({taps} taps)"
    return None


#: whether ``fast=None`` may take this path on CUDA; off until the GPU benchmark has measured it
#: faster than the eager formula (the measured GPU default). ``LABKIT_MISCONV_TRITON=1`` or
#: :func:`set_triton_default` turns it on.
_PREFER = os.environ.get("LABKIT_MISCONV_TRITON", "0") == "1"


def set_triton_default(prefer: bool) -> None:
    """Let layers built with ``fast=None`` take this path on CUDA (True) or not (False, the default)."""
    global _PREFER
    if not isinstance(prefer, bool):
        raise TypeError(f"prefer must be a bool, got {type(prefer).__name__}")
    _PREFER = prefer


def triton_default(device: torch.device | str | None) -> bool:
    """Whether layers built with ``fast=None`` take this path for inputs on ``device``: on CUDA
    devices when triton is importable and the path was chosen (:func:`set_triton_default` or
    ``LABKIT_MISCONV_TRITON=1``), unless :func:`labkit.misconv.set_fast_default` turned the fast
    paths off. Off by default: ``fast=None`` takes the fastest *measured* path per device, and on
    a GPU that is the eager formula until ``benchmarks/bench_misconv_gpu.py`` has measured this
    one (docs/timing.md, "A fused GPU path")."""
    if device is None or not _PREFER or _IMPORT_ERROR is not None or not _fast.fast_default():
        return False
    return torch.device(device).type == "cuda"


# ---------------------------------------------------------------------------------------------
# The kernels. Plain functions here, wrapped by triton.jit on first use (see _kernels): the same
# source runs compiled on a GPU and interpreted on the CPU. Builtins only (module docstring).
# ---------------------------------------------------------------------------------------------
def _misconv_kernel(
        x_ptr, j_ptr, m_ptr, a_ptr, d_ptr, w_ptr, bias_ptr, p_ptr, io_ptr,
        pw_ptr, pb_ptr, pp_ptr, g1_ptr, g2_ptr,
        C, H, W, Wo, P, O, j_bstride, j_cstride, n_pblocks, iters,
        sh, sw, ph, pw, dh, dw,
        K: tl.constexpr, L: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr, STORE_G: tl.constexpr,
        BP: tl.constexpr, BO: tl.constexpr, BJ: tl.constexpr,
        U0: tl.constexpr, N_CF: tl.constexpr, PREC: tl.constexpr):
    """Blocks of BP output pixels (rows) × BO output channels (columns) of image b: ``iters``
    consecutive pixel blocks per program.

    x (B, C, H, W); j (B, 1|C, H, W) uint8 or int32 (:func:`_mask`), nonzero = missing (strides
    j_bstride, j_cstride = 0 or H·W); m, d (B, K, C, H, W); a (B, K, L, C, H, W);
    w (O, C·KH·KW); bias (O,); p (B, K). Forward: io = out (B, O, P), P = Ho·Wo.
    Backward: io = the gradient of out; writes partial sums per program of ∂W, pw (T, O, C·KH·KW),
    and of ∂b, pb (T, O) (T = B·programs along axis 0), per pixel block of ∂p, pp
    (B·n_pblocks, K, O), and with STORE_G the gradients of the convolutions' outputs
    g1 (B, K, 1+L, O, P) (μ_k first, then f_kl) and g2 (B, K, O, P) (conv(d_k⊙J, W⊙W)).
    """
    pid_g = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    HW = H * W
    CHW = C * HW
    CKK = C * KH * KW
    o = pid_o * BO + tl.arange(0, BO)                                            # output channels
    o_ok = o < O
    jj = tl.arange(0, BJ)                                                        # taps (c, kh, kw), the weight's order
    j_ok = jj < CKK
    c = jj // (KH * KW)
    r = jj % (KH * KW)
    wt = tl.load(w_ptr + o[None, :] * CKK + jj[:, None], mask=j_ok[:, None] & o_ok[None, :], other=0.0)  # Wᵀ (BJ, BO)
    wt2 = wt * wt                                                                # (W⊙W)ᵀ
    if HAS_BIAS:
        bias = tl.load(bias_ptr + o, mask=o_ok, other=0.0)
    else:
        bias = tl.full([BO], 0.0, wt.dtype)
    if BACKWARD:
        dw_acc = tl.full([BJ, BO], 0.0, wt.dtype)                                # ∂/∂Wᵀ through W
        dw2_acc = tl.full([BJ, BO], 0.0, wt.dtype)                               # ∂/∂(W⊙W)ᵀ
        gb_acc = tl.full([BP, BO], 0.0, wt.dtype)                                # Σ ∂/∂μ_k, for ∂b
        ones = tl.full([16, BP], 1.0, wt.dtype)                                  # row sums as products
        row0 = (tl.arange(0, 16) == 0)[:, None] & o_ok[None, :]
        zero_rows = tl.arange(0, 16)[:, None] * 0                                # (16, 1) zeros
    for it in range(iters):
        pblk = pid_g * iters + it
        p = pblk * BP + tl.arange(0, BP)                                         # output pixels (oh, ow)
        p_ok = p < P
        oh = p // Wo
        ow = p % Wo
        ih = (oh * sh - ph)[:, None] + ((r // KW) * dh)[None, :]                 # (BP, BJ) input rows
        iw = (ow * sw - pw)[:, None] + ((r % KW) * dw)[None, :]
        inside = p_ok[:, None] & j_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        sp = c[None, :] * HW + ih * W + iw                                       # offset in a (C, H, W) image
        jv = tl.load(j_ptr + b * j_bstride + c[None, :] * j_cstride + ih * W + iw, mask=inside, other=0)
        miss = inside & (jv != 0)
        seen = inside & (jv == 0)
        xv = tl.load(x_ptr + b * CHW + sp, mask=seen, other=0.0)                 # x where observed: never a missing pixel
        io_off = (b * O + o[None, :]) * P + p[:, None]                           # (BP, BO) in (B, O, P)
        io_ok = p_ok[:, None] & o_ok[None, :]
        if BACKWARD:
            g = tl.load(io_ptr + io_off, mask=io_ok, other=0.0)
        else:
            acc = tl.full([BP, BO], 0.0, wt.dtype)
        for k in range(K):
            bk = b * K + k
            mv = tl.load(m_ptr + bk * CHW + sp, mask=miss, other=0.0)
            filled = xv + mv                                                     # x⊙(1−J) + m_k⊙J (disjoint)
            mu = tl.dot(filled, wt, input_precision=PREC) + bias[None, :]        # μ_k (BP, BO)
            dv = tl.load(d_ptr + bk * CHW + sp, mask=miss, other=0.0)            # d_k⊙J
            var = tl.dot(dv, wt2, input_precision=PREC)                          # conv(d_k⊙J, W⊙W)
            for l in range(L):
                av = tl.load(a_ptr + (bk * L + l) * CHW + sp, mask=miss, other=0.0)  # a_kl⊙J
                f = tl.dot(av, wt, input_precision=PREC)                         # conv(a_kl⊙J, W)
                var += f * f                                                     # σ²_k
            # E[ReLU(N(μ, σ²))] and its derivatives (module docstring: central part and tails)
            pos = var > 0
            sigma = tl.sqrt(tl.where(pos, var, 1.0))
            t = mu / sigma
            u = tl.abs(t)
            pdf = tl.exp(-0.5 * t * t) * 0.3989422804014327                     # φ(t)
            cdf_c = 0.5 + 0.5 * tl.erf(t * 0.7071067811865476)                  # Φ(t), |t| < U0
            e_c = mu * cdf_c + sigma * pdf
            uc = tl.maximum(u, U0)
            cf = tl.full([BP, BO], 0.0, wt.dtype)
            for i in tl.static_range(N_CF - 1):
                cf = (N_CF - i) / (uc + cf)                                      # n/(u + (n+1)/(u + …)), n = N_CF … 2
            c1 = 1.0 / (uc + cf)
            d1 = uc + c1                                                         # 1/R(u)
            tail = pdf / d1                                                      # Φ(−u) = φ(u)R(u)
            relu = tl.maximum(mu, 0.0)
            e_t = relu + sigma * pdf * (c1 / d1)                                 # ReLU(μ) + σφ(u)g(u)
            central = u < U0
            e = tl.where(pos, tl.where(central, e_c, e_t), relu)                 # E[ReLU(N(μ_k, σ²_k))]
            pk = tl.load(p_ptr + bk)
            if BACKWARD:
                cdf = tl.where(pos, tl.where(central, cdf_c, tl.where(t < 0, tail, 1.0 - tail)),
                               (mu > 0).to(mu.dtype))                            # ∂E/∂μ
                dvar = tl.where(pos, pdf * 0.5 / sigma, 0.0)                     # ∂E/∂σ²
                gp = g * pk
                g_mu = gp * cdf                                                  # ∂/∂μ_k
                g_v = gp * dvar                                                  # ∂/∂σ²_k
                gb_acc += g_mu
                ge = tl.dot(ones, g * e, input_precision="ieee")                 # Σ_rows g·E_k in each row: ∂p_k
                tl.store(pp_ptr + ((b * n_pblocks + pblk) * K + k) * O + o[None, :] + zero_rows, ge,
                         mask=row0 & (pblk < n_pblocks))
                dw_acc += tl.dot(tl.trans(filled), g_mu, input_precision=PREC)
                dw2_acc += tl.dot(tl.trans(dv), g_v, input_precision=PREC)
                if STORE_G:
                    tl.store(g1_ptr + ((bk * (1 + L)) * O + o[None, :]) * P + p[:, None], g_mu, mask=io_ok)
                    tl.store(g2_ptr + (bk * O + o[None, :]) * P + p[:, None], g_v, mask=io_ok)
                for l in range(L):
                    av = tl.load(a_ptr + (bk * L + l) * CHW + sp, mask=miss, other=0.0)
                    f = tl.dot(av, wt, input_precision=PREC)
                    g_f = 2.0 * g_v * f                                          # ∂/∂f_kl = 2 f_kl ∂/∂σ²_k
                    dw_acc += tl.dot(tl.trans(av), g_f, input_precision=PREC)
                    if STORE_G:
                        tl.store(g1_ptr + ((bk * (1 + L) + 1 + l) * O + o[None, :]) * P + p[:, None], g_f, mask=io_ok)
            else:
                acc += pk * e                                                    # Σ_k p_k E_k
        if not BACKWARD:
            tl.store(io_ptr + io_off, acc, mask=io_ok)
    if BACKWARD:
        tile = b * tl.num_programs(0) + pid_g
        dw = dw_acc + 2.0 * wt * dw2_acc                                         # ∂Wᵀ, both paths
        tl.store(pw_ptr + (tile * O + o[None, :]) * CKK + jj[:, None], dw, mask=j_ok[:, None] & o_ok[None, :])
        gb = tl.dot(ones, gb_acc, input_precision="ieee")
        tl.store(pb_ptr + tile * O + o[None, :] + zero_rows, gb, mask=row0)


def _input_grad_kernel(gs1_ptr, gs2_ptr, j_ptr, gx_ptr, gm_ptr, ga_ptr, gd_ptr,
                       CHW, HW, j_bstride, j_cstride,
                       K: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr):
    """Route the gradients of the convolutions' inputs to x and the MFA, for BLOCK pixels of image b.

    gs1 (B, K, 1+L, C, H, W): w.r.t. the filled images and a_kl⊙J; gs2 (B, K, C, H, W): w.r.t.
    d_k⊙J. Writes gx (B, C, H, W) = Σ_k gs1[:, k, 0] where observed (0 where missing), gm, gd
    (B, K, C, H, W) and ga (B, K, L, C, H, W): their inputs where missing, 0 where observed.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q = pid * BLOCK + tl.arange(0, BLOCK)
    ok = q < CHW
    jv = tl.load(j_ptr + b * j_bstride + (q // HW) * j_cstride + q % HW, mask=ok, other=0)
    miss = jv != 0
    gx = tl.full([BLOCK], 0.0, gx_ptr.dtype.element_ty)
    for k in range(K):
        bk = b * K + k
        g0 = tl.load(gs1_ptr + bk * (1 + L) * CHW + q, mask=ok, other=0.0)
        gx += tl.where(miss, 0.0, g0)
        tl.store(gm_ptr + bk * CHW + q, tl.where(miss, g0, 0.0), mask=ok)
        for l in range(L):
            gl = tl.load(gs1_ptr + (bk * (1 + L) + 1 + l) * CHW + q, mask=ok, other=0.0)
            tl.store(ga_ptr + (bk * L + l) * CHW + q, tl.where(miss, gl, 0.0), mask=ok)
        gv = tl.load(gs2_ptr + bk * CHW + q, mask=ok, other=0.0)
        tl.store(gd_ptr + bk * CHW + q, tl.where(miss, gv, 0.0), mask=ok)
    tl.store(gx_ptr + b * CHW + q, gx, mask=ok)


def _kernels(interpret: bool):
    """The two kernels wrapped by ``triton.jit`` for one mode (compiled, or interpreted): built on
    first use, while ``TRITON_INTERPRET`` says that mode (triton.jit reads it then)."""
    kernels = _KERNELS.get(interpret)
    if kernels is None:
        if _interpreting() != interpret:  # pragma: no cover - the caller reads the same variable
            raise RuntimeError("TRITON_INTERPRET changed while the Triton MisConv kernels were being built")
        kernels = _KERNELS[interpret] = (triton.jit(_misconv_kernel), triton.jit(_input_grad_kernel))
    return kernels


# ---------------------------------------------------------------------------------------------
# Launch plans (also what the tests compile ahead of time for sm_90)
# ---------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _precision(dtype: torch.dtype, interpret: bool) -> str:
    """TF32 products for float32 exactly where cuDNN's convolutions would use them."""
    if dtype == torch.float32 and not interpret and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


class _Geometry:
    """Shapes of one call: x (B, C, H, W), K components, L factors, weight (O, C, KH, KW),
    stride/padding/dilation pairs, output (Ho, Wo), the mask's strides."""

    def __init__(self, x: Tensor, missing: Tensor, K: int, L: int, weight: Tensor, stride, padding, dilation):
        self.B, self.C, self.H, self.W = x.shape
        self.K, self.L = K, L
        self.O, _, self.KH, self.KW = weight.shape
        (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw) = stride, padding, dilation
        self.Ho = (self.H + 2 * self.ph - self.dh * (self.KH - 1) - 1) // self.sh + 1
        self.Wo = (self.W + 2 * self.pw - self.dw * (self.KW - 1) - 1) // self.sw + 1
        if self.Ho < 1 or self.Wo < 1:
            raise ValueError(f"input of {self.H}x{self.W} pixels is too small for kernel ({self.KH}, {self.KW}) "
                             f"with stride {stride}, padding {padding} and dilation {dilation}: "
                             f"output would be {self.Ho}x{self.Wo}")
        self.P = self.Ho * self.Wo
        self.taps = self.C * self.KH * self.KW
        self.j_bstride = missing.shape[1] * self.H * self.W
        self.j_cstride = self.H * self.W if missing.shape[1] != 1 else 0
        self.stride, self.padding, self.dilation = (self.sh, self.sw), (self.ph, self.pw), (self.dh, self.dw)


#: Backward: pixel blocks per program (None: chosen from the GPU's size, 1 under the interpreter).
#: Tests set it to run the kernel's loop over blocks.
BACKWARD_ITERS: int | None = None


class _Tiling:
    """Tile sizes of one launch of the main kernel: BO output channels (16 or 32), BJ taps (all
    of them, a power of two ≥ 16: tl.dot's smallest operand), BP output pixels; ``iters`` pixel
    blocks per program; the grid."""

    def __init__(self, geo: _Geometry, backward: bool, device: torch.device):
        self.BJ = max(16, _pow2(geo.taps))
        self.BO = max(16, min(32, _pow2(geo.O)))
        # Register budget, from triton's compiler for sm_90 in float32 (cuobjdump -res-usage; see
        # tests/test_misconv_triton.py): forward 64 pixels × 32 channels, 8 warps, no software
        # pipelining: ~140 registers, no spills; the backward keeps more tiles alive (32 pixels:
        # 255 registers and a few spilled bytes), and wide patches (BJ > 32) take more per pixel.
        self.BP = 32 if backward or self.BJ > 32 else 64
        self.n_pblocks = -(-geo.P // self.BP)
        self.n_oblocks = -(-geo.O // self.BO)
        iters = 1
        if backward:
            if BACKWARD_ITERS is not None:
                iters = BACKWARD_ITERS
            elif device.type == "cuda":
                # a few programs per SM is enough; more of them only multiplies the ∂W partial sums
                programs = geo.B * self.n_pblocks * self.n_oblocks
                iters = max(1, min(16, programs // (4 * torch.cuda.get_device_properties(device).multi_processor_count)))
        self.iters = min(iters, self.n_pblocks)
        self.n_groups = -(-self.n_pblocks // self.iters)
        self.grid = (self.n_groups, self.n_oblocks, geo.B)
        self.num_warps, self.num_stages = 8, 1


def _main_plan(geo: _Geometry, tiling: _Tiling, tensors: dict[str, Tensor], *, backward: bool, store_g: bool,
               has_bias: bool, interpret: bool) -> tuple[tuple[int, int, int], dict, dict, dict]:
    """``(grid, args, constexprs, options)`` of one launch of the main kernel; ``tensors`` maps
    its pointer arguments (x … g2) to tensors."""
    dtype = tensors["x"].dtype
    u0, n_cf = TAIL[dtype]
    args = {f"{name}_ptr": tensors[name] for name in ("x", "j", "m", "a", "d", "w", "bias", "p", "io",
                                                       "pw", "pb", "pp", "g1", "g2")}
    args.update(C=geo.C, H=geo.H, W=geo.W, Wo=geo.Wo, P=geo.P, O=geo.O, j_bstride=geo.j_bstride,
                j_cstride=geo.j_cstride, n_pblocks=tiling.n_pblocks, iters=tiling.iters, sh=geo.sh, sw=geo.sw,
                ph=geo.ph, pw=geo.pw, dh=geo.dh, dw=geo.dw)
    constexprs = dict(K=geo.K, L=geo.L, KH=geo.KH, KW=geo.KW, HAS_BIAS=has_bias, BACKWARD=backward,
                      STORE_G=store_g, BP=tiling.BP, BO=tiling.BO, BJ=tiling.BJ, U0=u0, N_CF=n_cf,
                      PREC=_precision(dtype, interpret))
    return tiling.grid, args, constexprs, dict(num_warps=tiling.num_warps, num_stages=tiling.num_stages)


_INPUT_GRAD_BLOCK = 256


def _input_grad_plan(geo: _Geometry, tensors: dict[str, Tensor]):
    """``(grid, args, constexprs, options)`` of the input-gradient kernel."""
    chw = geo.C * geo.H * geo.W
    args = {f"{name}_ptr": tensors[name] for name in ("gs1", "gs2", "j", "gx", "gm", "ga", "gd")}
    args.update(CHW=chw, HW=geo.H * geo.W, j_bstride=geo.j_bstride, j_cstride=geo.j_cstride)
    constexprs = dict(K=geo.K, L=geo.L, BLOCK=_INPUT_GRAD_BLOCK)
    return (-(-chw // _INPUT_GRAD_BLOCK), geo.B), args, constexprs, dict(num_warps=4, num_stages=1)


def _launch(kernel, plan) -> None:
    grid, args, constexprs, options = plan
    kernel[grid](**args, **constexprs, **options)


def _mask(missing: Tensor, dtype: torch.dtype) -> Tensor:
    """The missing mask as the kernels read it: the bool tensor's bytes (no copy) for float32;
    int32 for float64, whose kernels triton 3.8 fails to compile for sm_90 when an operand of
    ``tl.dot`` depends on an 8- or 16-bit load (fp64 MMA operand conversion)."""
    return missing.view(torch.uint8) if dtype == torch.float32 else missing.to(torch.int32)


class _MisConvTriton(torch.autograd.Function):
    """The layer as one autograd node: forward and backward by the kernels above."""

    @staticmethod
    def forward(ctx, x, missing, p, m, a, d, weight, bias, geo: _Geometry, interpret: bool):
        j = _mask(missing, x.dtype)
        ctx.geo, ctx.interpret = geo, interpret
        ctx.save_for_backward(x, j, p, m, a, d, weight, bias)
        out = torch.empty(geo.B, geo.O, geo.Ho, geo.Wo, dtype=x.dtype, device=x.device)
        tensors = dict(x=x, j=j, m=m, a=a if geo.L else d, d=d, w=weight, bias=bias if bias is not None else weight,
                       p=p, io=out, pw=out, pb=out, pp=out, g1=out, g2=out)
        _launch(_kernels(interpret)[0], _main_plan(geo, _Tiling(geo, False, x.device), tensors, backward=False,
                                                   store_g=False, has_bias=bias is not None, interpret=interpret))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, j, p, m, a, d, weight, bias = ctx.saved_tensors
        geo, interpret = ctx.geo, ctx.interpret
        need = ctx.needs_input_grad
        need_inputs = need[0] or need[3] or need[4] or need[5]
        dt, dev = x.dtype, x.device
        tiling = _Tiling(geo, True, dev)
        programs = geo.B * tiling.n_groups
        pw = torch.empty(programs, geo.O, geo.taps, dtype=dt, device=dev)
        pb = torch.empty(programs, geo.O, dtype=dt, device=dev)
        pp = torch.empty(geo.B * tiling.n_pblocks, geo.K, geo.O, dtype=dt, device=dev)
        if need_inputs:
            g1 = torch.empty(geo.B, geo.K, 1 + geo.L, geo.O, geo.P, dtype=dt, device=dev)
            g2 = torch.empty(geo.B, geo.K, geo.O, geo.P, dtype=dt, device=dev)
        else:
            g1 = g2 = pw
        tensors = dict(x=x, j=j, m=m, a=a if geo.L else d, d=d, w=weight, bias=bias if bias is not None else weight,
                       p=p, io=grad.contiguous(), pw=pw, pb=pb, pp=pp, g1=g1, g2=g2)
        main, route = _kernels(interpret)
        _launch(main, _main_plan(geo, tiling, tensors, backward=True, store_g=need_inputs, has_bias=bias is not None,
                                 interpret=interpret))
        g_weight = pw.sum(0).view(weight.shape) if need[6] else None
        g_bias = pb.sum(0) if bias is not None and need[7] else None
        g_p = pp.view(geo.B, tiling.n_pblocks, geo.K, geo.O).sum((1, 3)) if need[2] else None
        g_x = g_m = g_a = g_d = None
        if need_inputs:
            B, K, L, C, H, W = geo.B, geo.K, geo.L, geo.C, geo.H, geo.W
            conv_in = torch.nn.grad.conv2d_input
            gs1 = conv_in((B * K * (1 + L), C, H, W), weight, g1.view(B * K * (1 + L), geo.O, geo.Ho, geo.Wo),
                          geo.stride, geo.padding, geo.dilation)
            gs2 = conv_in((B * K, C, H, W), weight * weight, g2.view(B * K, geo.O, geo.Ho, geo.Wo),
                          geo.stride, geo.padding, geo.dilation)
            g_x, g_m, g_a, g_d = (torch.empty_like(t) for t in (x, m, a, d))
            _launch(route, _input_grad_plan(geo, dict(gs1=gs1, gs2=gs2, j=j, gx=g_x, gm=g_m, ga=g_a if L else g_d,
                                                      gd=g_d)))
        return (g_x if need[0] else None, None, g_p, g_m if need[3] else None, g_a if need[4] else None,
                g_d if need[5] else None, g_weight, g_bias, None, None)


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------
def misconv_triton(x: Tensor, missing: Tensor, mfa: MFA, weight: Tensor, bias: Tensor | None,
                   stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """``Σ_k p_k E[ReLU(N(μ_k, σ²_k))]``, the function of :func:`labkit.misconv.misconv_reference`,
    by the fused Triton kernels (differentiable w.r.t. x, the MFA, weight and bias; first order).

    Inputs are taken as validated (:class:`labkit.misconv.MisConv2d` does it): x ``(B, C, H, W)``,
    missing bool ``(B, 1 or C, H, W)``, ``mfa`` over images ``(C, H, W)`` with batch B, weight
    ``(O, C, kh, kw)``, bias ``(O,)`` or None; stride, padding, dilation pairs of ints. Returns
    ``(B, O, Ho, Wo)`` in the weight's dtype. ValueError, naming the reason, where the path cannot
    run (:func:`unsupported`: no triton, a CPU tensor outside the interpreter, a dtype other than
    float32/float64, string padding, more than :data:`MAX_TAPS` taps) or the output would be empty.
    """
    reason = unsupported(x.device, weight, padding)
    if reason is not None:
        raise ValueError(f"MisConv2d's Triton path cannot run this call: {reason}")
    others = {"missing": missing, "weight": weight, "bias": bias, "mfa.means": mfa.means}
    wrong = {name: str(t.device) for name, t in others.items() if t is not None and t.device != x.device}
    if wrong:
        raise ValueError(f"MisConv2d's Triton path needs every input on x's device ({x.device}), got {wrong}")
    dt = weight.dtype
    geo = _Geometry(x, missing, mfa.n_components, mfa.n_factors, weight, stride, padding, dilation)
    out_shape = (geo.B, geo.O, geo.Ho, geo.Wo)
    if geo.B == 0:
        return x.new_zeros(out_shape, dtype=dt)
    interpret = x.device.type == "cpu" or _interpreting()
    cast = lambda t: t.to(dt).contiguous()  # noqa: E731 - autograd carries the casts' gradients
    return _MisConvTriton.apply(cast(x), missing.contiguous(), cast(mfa.weights), cast(mfa.means), cast(mfa.factors),
                                cast(mfa.variances), weight.contiguous(), None if bias is None else cast(bias),
                                geo, interpret)
