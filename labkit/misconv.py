r"""MisConv: a CNN's first convolution + ReLU, taken in expectation over the missing pixels.

Paper: M. Przewięźlikowski, M. Śmieja, Ł. Struski, J. Tabor, *MisConv: Convolutional Neural
Networks for Missing Data*, WACV 2022, https://arxiv.org/abs/2110.14010 — the method's closed
form for the expected value of the convolution followed by ReLU when the missing pixels are
drawn from a mixture of factor analyzers (MFA, :mod:`labkit.mfa`; predicted per image by the DMFA
of arXiv:2010.02183 or conditioned from a classical MFA).

The math. An image ``x`` ``(C, H, W)`` has missing pixels ``J`` (True = missing). The complete
image is the random ``X = x⊙(1−J) + Z⊙J`` with ``Z ~ Σ_k p_k N(m_k, A_k A_kᵀ + diag(d_k))``
(K components, L factors ``a_k1 … a_kL`` per component, each shaped like the image). Convolution
is linear, so under component k every output unit ``conv(X, W) + b`` is Gaussian with

    μ_k  = conv(x⊙(1−J) + m_k⊙J, W) + b                      (mean: observed x, missing m_k)
    σ²_k = Σ_l conv(a_kl⊙J, W)² + conv(d_k⊙J, W⊙W)           (variance: no bias, nothing observed)

(the covariance is low rank plus diagonal, so the variance of a weighted sum of pixels needs
only L + 1 convolutions). The expected ReLU of a Gaussian is, with Φ, φ the standard normal
cdf and pdf,

    E[ReLU(N(μ, σ²))] = μ·Φ(μ/σ) + σ·φ(μ/σ)        (→ ReLU(μ) as σ → 0),

and the layer returns the mixture

    out = Σ_k p_k · E[ReLU(N(μ_k, σ²_k))]                     shape (B, C_out, H_out, W_out).

This module holds, in order: :func:`expected_relu` (the formula), :func:`misconv_reference` (the
layer in a few plain ``conv2d`` calls; also the layer's *eager* path), the authors' published
first layer as a labelled ablation (:func:`authors_expected_relu`, :func:`misconv_authors`), and
the :class:`MisConv2d` module, which dispatches between them, the fused fast path of
:mod:`labkit.misconv_fast` (same function, less work; the default on the CPU, see
:func:`set_fast_default`) and the one-kernel GPU path of :mod:`labkit.misconv_triton` (the default
on CUDA devices).
``W⊙W`` is computed from the weight on every call (never a separate parameter), so the weight
receives gradient through both the mean and the variance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from labkit import masks as _masks
from labkit import misconv_triton as _triton
from labkit.mfa import MFA
from labkit.misconv_fast import compile_enabled, compile_report, fast_default, misconv_fast, set_fast_default

__all__ = ["MisConv2d", "VARIANTS", "expected_relu", "misconv_reference", "authors_expected_relu",
           "misconv_authors", "set_fast_default", "fast_default", "compile_enabled", "compile_report"]

VARIANTS = ("exact", "authors")
_INV_SQRT_2 = 0.7071067811865476            # 1/√2
_INV_SQRT_2PI = 0.3989422804014327          # 1/√(2π)


# ---------------------------------------------------------------------------------------------
# The formula
# ---------------------------------------------------------------------------------------------
def expected_relu(mu: Tensor, var: Tensor) -> Tensor:
    """``E[ReLU(Y)] = μ·Φ(μ/σ) + σ·φ(μ/σ)`` for ``Y ~ N(mu, var)``, elementwise (any shape).

    Exactly ``relu(mu)`` where ``var == 0``. Φ is computed as ``½·erfc(−t/√2)``, accurate in the
    lower tail where ``1 + erf`` cancels.
    """
    pos = var > 0
    # Substitute 1 where var == 0 so neither sqrt' nor μ/σ sees a zero (no inf/NaN in gradients).
    sigma = torch.sqrt(torch.where(pos, var, torch.ones_like(var)))
    t = mu / sigma
    cdf = 0.5 * torch.erfc(-t * _INV_SQRT_2)
    pdf = torch.exp(-0.5 * t * t) * _INV_SQRT_2PI
    return torch.where(pos, mu * cdf + sigma * pdf, F.relu(mu))


def _check_inputs(x, missing, mfa, in_channels: int) -> Tensor:
    """Validate the layer's inputs; return ``missing`` expanded to ``x.shape`` ``(B, C, H, W)``."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must have shape (B, {in_channels}, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    if not isinstance(missing, Tensor) or missing.dtype != torch.bool:
        raise TypeError(
            f"missing must be a bool tensor (True = missing), got {getattr(missing, 'dtype', type(missing).__name__)}")
    if missing.dim() != 4 or missing.shape[0] != B or missing.shape[2:] != (H, W) or missing.shape[1] not in (1, C):
        raise ValueError(f"missing must have shape ({B}, 1, {H}, {W}) or ({B}, {C}, {H}, {W}), got {tuple(missing.shape)}")
    if not isinstance(mfa, MFA):
        raise TypeError(f"mfa must be a labkit.mfa.MFA, got {type(mfa).__name__}")
    if mfa.batch_size != B or mfa.image_shape != (C, H, W):
        raise ValueError(f"mfa describes images of shape {mfa.image_shape} in a batch of {mfa.batch_size}, "
                         f"but x has shape {tuple(x.shape)}")
    # NaN at missing pixels is allowed (never read); at an observed one it would reach the output.
    _masks.check_observed_finite(x, missing, name="x")
    return missing.expand(B, C, H, W)


def _check_weight(weight, bias) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 4 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor (C_out, C_in, kh, kw), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")


# ---------------------------------------------------------------------------------------------
# The reference implementation (the layer's eager path)
# ---------------------------------------------------------------------------------------------
def misconv_reference(x: Tensor, missing: Tensor, mfa: MFA, weight: Tensor, bias: Tensor | None = None,
                      stride=1, padding=0, dilation=1) -> Tensor:
    """``Σ_k p_k E[ReLU(N(μ_k, σ²_k))]`` (module docstring), computed as written: (L+2)·K
    convolutions of the input's size in three ``conv2d`` calls, the rest elementwise.

    Args:
        x: ``(B, C, H, W)`` float; values at missing pixels are ignored (NaN allowed); a NaN or
            inf at an observed pixel raises ValueError.
        missing: bool ``(B, 1, H, W)`` or ``(B, C, H, W)``, True = missing.
        mfa: :class:`labkit.mfa.MFA` with batch B over images ``(C, H, W)``.
        weight: ``(O, C, kh, kw)``; bias: ``(O,)`` or None; stride, padding, dilation as for
            :func:`torch.nn.functional.conv2d` (groups 1, zero padding).

    Returns:
        ``(B, O, H_out, W_out)`` in the weight's dtype (x and the MFA are cast to it).
    """
    _check_weight(weight, bias)
    J = _check_inputs(x, missing, mfa, weight.shape[1])
    B = x.shape[0]
    K, L = mfa.n_components, mfa.n_factors
    dt = weight.dtype
    zero = torch.zeros((), dtype=dt, device=x.device)
    Jk = J[:, None]                                                            # (B, 1, C, H, W)

    def conv(t: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        return F.conv2d(t, w, b, stride, padding, dilation, 1)

    # torch.where, not products: x's NaN at missing pixels never reaches an output or a gradient.
    filled = torch.where(Jk, mfa.means.to(dt), x.to(dt)[:, None])              # x⊙(1−J) + m_k⊙J: (B, K, C, H, W)
    a = torch.where(Jk[:, :, None], mfa.factors.to(dt), zero)                  # a_kl⊙J: (B, K, L, C, H, W)
    d = torch.where(Jk, mfa.variances.to(dt), zero)                            # d_k⊙J: (B, K, C, H, W)
    mu = conv(filled.flatten(0, 1), weight, bias)                              # μ_k: (B·K, O, Ho, Wo)
    O, Ho, Wo = mu.shape[1:]
    mu = mu.reshape(B, K, O, Ho, Wo)
    var = conv(d.flatten(0, 1), weight * weight).reshape(B, K, O, Ho, Wo)      # conv(d_k⊙J, W⊙W): (B, K, O, Ho, Wo)
    fac = conv(a.flatten(0, 2), weight).reshape(B, K, L, O, Ho, Wo)            # conv(a_kl⊙J, W): (B, K, L, O, Ho, Wo)
    var = var + (fac * fac).sum(2)                                             # σ²_k: (B, K, O, Ho, Wo)
    e = expected_relu(mu, var)                                                 # E[ReLU(N(μ_k, σ²_k))]: (B, K, O, Ho, Wo)
    return torch.einsum("bk,bkohw->bohw", mfa.weights.to(dt), e)               # Σ_k p_k E_k: (B, O, Ho, Wo)


# ---------------------------------------------------------------------------------------------
# The authors' published layer: an ablation, to reproduce their numbers. Not to be used.
# ---------------------------------------------------------------------------------------------
def authors_expected_relu(mu: Tensor, var: Tensor) -> Tensor:
    """The authors' expected ReLU, ``μ·Φ(μ/σ) + σ·φ(μ/σ)/2``: the σφ term is halved.

    Their code writes ``(μ + σ·√(2π)⁻¹·exp(−μ²/2σ²) + μ·erf(μ/σ√2)) / 2``, which halves the
    ``σφ`` term along with ``μ(1 + erf)``. ``relu(mu)`` where ``var == 0``. Unlike an expected
    ReLU it can be negative: for μ = −2σ it is ≈ −0.018σ.
    """
    pos = var > 0
    sigma = torch.sqrt(torch.where(pos, var, torch.ones_like(var)))
    t = mu / sigma
    e = mu * (0.5 * torch.erfc(-t * _INV_SQRT_2)) + 0.5 * sigma * torch.exp(-0.5 * t * t) * _INV_SQRT_2PI
    return torch.where(pos, e, F.relu(mu))


def _authors_padding(weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    """The "same" padding the authors' layer needs; ValueError naming any other setting."""
    kh, kw = weight.shape[-2:]
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    if pair(stride) != (1, 1):
        raise ValueError(f"variant='authors' supports stride=1 only, got stride={stride}")
    if pair(dilation) != (1, 1):
        raise ValueError(f"variant='authors' supports dilation=1 only, got dilation={dilation}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"variant='authors' needs an odd kernel (its output pixel is the window's centre), "
                         f"got kernel_size=({kh}, {kw})")
    same = ((kh - 1) // 2, (kw - 1) // 2)
    if padding != "same" and pair(padding) != same:
        raise ValueError(f"variant='authors' needs 'same' padding, padding={same} for a ({kh}, {kw}) kernel, "
                         f"got padding={padding!r}")
    return same


def misconv_authors(x: Tensor, missing: Tensor, mfa: MFA, weight: Tensor, bias: Tensor | None = None,
                    stride=1, padding="same", dilation=1) -> Tensor:
    """The first layer as the authors published it (``ConVar`` in mprzewie/dmfa_inpainting,
    ``inpainting/custom_layers.py``), from the same inputs as :func:`misconv_reference`.

    It exists to reproduce the authors' numbers and to measure what the differences cost; it is
    not the expectation the paper derives (a Monte Carlo test shows it far off). It differs from
    the exact layer in four ways:

    1. ``E[ReLU] = μ·Φ(μ/σ) + σ·φ(μ/σ)/2`` (:func:`authors_expected_relu`);
    2. the bias enters the variance and the factor convolutions:
       ``σ'²_k = Σ_l (conv(A_kl, W) + b)² + conv(D_k, W⊙W) + b²``;
    3. the MFA's mean ``M_k``, factors ``A_k`` and variances ``D_k`` are used at *every* pixel of
       the window, observed neighbours included: ``μ'_k = conv(M_k, W) + b``, nothing masked by J;
    4. the mixture ``Σ_k p_k E'_k`` is output only where the window's centre pixel is missing
       (``missing[:, 0]``, the first channel's mask, as in their code); everywhere else the output
       is ``ReLU(conv(x with 0 at missing pixels, W) + b)``.

    Only stride 1, dilation 1, an odd kernel and "same" padding (``(k−1)/2``) are supported
    (output pixel = window centre); anything else raises ValueError. ``bias=None`` means b = 0.
    Returns ``(B, O, H, W)``.
    """
    _check_weight(weight, bias)
    J = _check_inputs(x, missing, mfa, weight.shape[1])
    pad = _authors_padding(weight, stride, padding, dilation)
    B, C, H, W = x.shape
    K, L = mfa.n_components, mfa.n_factors
    dt = weight.dtype
    b = bias if bias is not None else torch.zeros(weight.shape[0], dtype=dt, device=weight.device)
    O = weight.shape[0]

    def conv(t: Tensor, w: Tensor, bb: Tensor) -> Tensor:
        return F.conv2d(t, w, bb, 1, pad)

    mu = conv(mfa.means.to(dt).flatten(0, 1), weight, b).reshape(B, K, O, H, W)                  # conv(M_k, W) + b
    var = conv(mfa.variances.to(dt).flatten(0, 1), weight * weight, b * b).reshape(B, K, O, H, W)  # conv(D_k, W⊙W) + b²
    fac = conv(mfa.factors.to(dt).flatten(0, 2), weight, b).reshape(B, K, L, O, H, W)            # conv(A_kl, W) + b
    var = var + (fac * fac).sum(2)                                                              # σ'²_k: (B, K, O, H, W)
    mix = torch.einsum("bk,bkohw->bohw", mfa.weights.to(dt), authors_expected_relu(mu, var))     # (B, O, H, W)
    known = F.relu(conv(torch.where(J, torch.zeros((), dtype=dt, device=x.device), x.to(dt)), weight, b))
    return torch.where(missing[:, :1], mix, known)                                              # centre missing?


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------
class MisConv2d(torch.nn.Conv2d):
    """A ``Conv2d`` + ReLU that takes the exact expectation over missing pixels.

    Same constructor as :class:`torch.nn.Conv2d` (in/out channels, kernel_size, stride, padding,
    dilation, bias, device, dtype), plus two keywords:

    - ``fast``: True for the windowed, fused path (:mod:`labkit.misconv_fast`), False for the
      eager :func:`misconv_reference`, ``"triton"`` for the one-kernel GPU path
      (:mod:`labkit.misconv_triton`; CUDA inputs, or CPU ones under Triton's interpreter; a
      ValueError names what it cannot run). None (default) picks the fastest measured path per
      input device: :func:`fast_default` of the device (the windowed path on the CPU, the eager
      formula on a GPU), or the Triton path on CUDA once chosen
      (``labkit.misconv_triton.set_triton_default(True)`` or ``LABKIT_MISCONV_TRITON=1``; it has
      not been timed on a GPU yet) where the layer fits it (float32/float64, numeric padding,
      ``C·kh·kw ≤ 128``); :func:`set_fast_default` (False) turns the fast paths off. All compute
      the same function.
    - ``variant``: ``"exact"`` (default) the expectation above; ``"authors"`` the authors'
      published layer (:func:`misconv_authors`), an ablation for reproducing their numbers, only
      for stride 1, dilation 1, an odd kernel and "same" padding (ValueError otherwise).

    ``groups != 1`` and ``padding_mode != "zeros"`` are rejected: reflect/replicate padding
    duplicates a missing pixel, which correlates two inputs that the diagonal-variance formula
    treats as independent.

    ``forward(x)`` is plain ``relu(conv2d(x))``; ``forward(x, missing, mfa)`` the expected activation.

    Shapes:
        x        ``(B, C_in, H, W)``, float; values at missing pixels ignored (NaN allowed); a NaN
                 or inf at an observed pixel (any pixel in plain mode) raises ValueError
        missing  bool ``(B, 1, H, W)`` or ``(B, C_in, H, W)``, True = missing
        mfa      :class:`labkit.mfa.MFA` with batch B and image shape ``(C_in, H, W)``
        output   ``(B, C_out, H_out, W_out)``
    """

    def __init__(self, *args, fast: bool | None = None, variant: str = "exact", **kwargs):
        groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
        padding_mode = kwargs.get("padding_mode", args[8] if len(args) > 8 else "zeros")
        if groups != 1:
            raise ValueError(f"MisConv2d supports groups=1 only, got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(
                f"MisConv2d supports padding_mode='zeros' only, got {padding_mode!r}: other modes copy "
                "missing pixels into the border, which breaks the independent-variance formula")
        if fast is not None and not isinstance(fast, bool) and fast != "triton":
            raise TypeError(f"fast must be True, False or None (or 'triton'), got {fast!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        super().__init__(*args, **kwargs)
        self.fast = fast
        self.variant = variant
        if variant == "authors":
            _authors_padding(self.weight, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (super().extra_repr() + ("" if self.fast is None else f", fast={self.fast!r}")
                + ("" if self.variant == "exact" else f", variant={self.variant!r}"))

    def forward(self, x: Tensor, missing: Tensor | None = None, mfa: MFA | None = None) -> Tensor:
        if missing is None and mfa is None:
            if isinstance(x, Tensor) and x.is_floating_point():
                _masks.check_observed_finite(x, None, name="x")
            return F.relu(super().forward(x))
        if missing is None or mfa is None:
            raise ValueError("MisConv2d.forward needs both missing and mfa, or neither (plain conv+ReLU)")
        J = _check_inputs(x, missing, mfa, self.in_channels)
        if self.variant == "authors":
            return misconv_authors(x, missing, mfa, self.weight, self.bias, self.stride, self.padding, self.dilation)
        fast = self.fast
        if fast is None:
            triton_ok = (_triton.triton_default(x.device)
                         and _triton.unsupported(x.device, self.weight, self.padding) is None)
            fast = "triton" if triton_ok else fast_default(x.device)
        if fast == "triton":
            return _triton.misconv_triton(x, missing, mfa, self.weight, self.bias, self.stride, self.padding,
                                          self.dilation)
        if fast is True and not isinstance(self.padding, str):
            return misconv_fast(x, missing, mfa, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if not bool(J.any()):
            # Nothing missing: the expectation is the plain layer; skip the (L+2)·K convolutions.
            return F.relu(super().forward(x))
        return misconv_reference(x, missing, mfa, self.weight, self.bias, self.stride, self.padding, self.dilation)

