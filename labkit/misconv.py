r"""MisConv2d: the exact expected conv+ReLU activation over missing pixels drawn from an MFA.

The random complete image is ``X = x⊙(1−J) + Z⊙J`` with ``J`` the missing mask and ``Z`` drawn
from an MFA. Convolution is linear, so for mixture component k every output unit is Gaussian:

    μ_k  = conv(x⊙(1−J) + m_k⊙J, W) + b                          (one filled image per component)
    σ²_k = Σ_j conv(a_kj⊙J, W)² + conv(d_k⊙J, W⊙W)              (no bias, nothing observed)

and the layer returns the mixture of expected ReLUs

    E[ReLU(N(μ, σ²))] = μ·Φ(μ/σ) + σ·φ(μ/σ)       →  ReLU(μ) as σ → 0,
    out = Σ_k p_k · E[ReLU(N(μ_k, σ²_k))].

Cost: (L+2)·K convolutions of the input's size (one for the filled image, L for the factors,
one with W⊙W for the variances), batched into two ``conv2d`` calls, plus elementwise work.
``W⊙W`` is computed from ``self.weight`` on every call (never a separate parameter), so the
weight receives gradient through both paths.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from labkit.mfa import MFA

__all__ = ["MisConv2d", "expected_relu"]

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def expected_relu(mu: Tensor, var: Tensor) -> Tensor:
    """``E[ReLU(Y)]`` for ``Y ~ N(mu, var)``, elementwise; exactly ``relu(mu)`` where ``var == 0``.

    Φ is computed as ``½·erfc(−t/√2)``, accurate in the lower tail where ``1 + erf`` cancels.
    """
    pos = var > 0
    # Substitute 1 where var == 0 so neither sqrt' nor μ/σ sees a zero (no inf/NaN in gradients).
    sigma = torch.sqrt(torch.where(pos, var, torch.ones_like(var)))
    t = mu / sigma
    cdf = 0.5 * torch.erfc(-t * _INV_SQRT_2)
    pdf = torch.exp(-0.5 * t * t) * _INV_SQRT_2PI
    return torch.where(pos, mu * cdf + sigma * pdf, F.relu(mu))


class MisConv2d(torch.nn.Conv2d):
    """A ``Conv2d`` + ReLU that takes the exact expectation over missing pixels.

    Same constructor as :class:`torch.nn.Conv2d` for in/out channels, kernel_size, stride,
    padding, dilation, bias, device and dtype. ``groups != 1`` and ``padding_mode != "zeros"``
    are rejected: reflect/replicate padding duplicates a missing pixel, which correlates two
    inputs that the diagonal-variance formula treats as independent.

    ``forward(x)`` is plain ``relu(conv2d(x))``.
    ``forward(x, missing, mfa)`` is the expected activation (see the module docstring).

    Shapes:
        x        ``(B, C_in, H, W)``, float; values at missing pixels ignored (NaN allowed)
        missing  bool ``(B, 1, H, W)`` or ``(B, C_in, H, W)``, True = missing
        mfa      :class:`labkit.mfa.MFA` with batch B and image shape ``(C_in, H, W)``
        output   ``(B, C_out, H_out, W_out)``
    """

    def __init__(self, *args, **kwargs):
        groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
        padding_mode = kwargs.get("padding_mode", args[8] if len(args) > 8 else "zeros")
        if groups != 1:
            raise ValueError(f"MisConv2d supports groups=1 only, got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(
                f"MisConv2d supports padding_mode='zeros' only, got {padding_mode!r}: other modes copy "
                "missing pixels into the border, which breaks the independent-variance formula"
            )
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ validation
    def _validate(self, x: Tensor, missing: Tensor, mfa: MFA) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        B, C, H, W = x.shape
        if not isinstance(missing, Tensor) or missing.dtype != torch.bool:
            raise TypeError(
                f"missing must be a bool tensor (True = missing), got {getattr(missing, 'dtype', type(missing).__name__)}"
            )
        if missing.dim() != 4 or missing.shape[0] != B or missing.shape[2:] != (H, W) or missing.shape[1] not in (1, C):
            raise ValueError(f"missing must have shape ({B}, 1, {H}, {W}) or ({B}, {C}, {H}, {W}), got {tuple(missing.shape)}")
        if not isinstance(mfa, MFA):
            raise TypeError(f"mfa must be a labkit.mfa.MFA, got {type(mfa).__name__}")
        if mfa.batch_size != B or mfa.image_shape != (C, H, W):
            raise ValueError(
                f"mfa describes images of shape {mfa.image_shape} in a batch of {mfa.batch_size}, "
                f"but x has shape {tuple(x.shape)}"
            )
        return missing.expand(B, C, H, W)

    def _conv(self, inp: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(inp, weight, bias, self.stride, self.padding, self.dilation, 1)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, missing: Tensor | None = None, mfa: MFA | None = None) -> Tensor:
        if missing is None and mfa is None:
            return F.relu(super().forward(x))
        if missing is None or mfa is None:
            raise ValueError("MisConv2d.forward needs both missing and mfa, or neither (plain conv+ReLU)")
        J = self._validate(x, missing, mfa)
        if not bool(J.any()):
            # Nothing missing: the expectation is the plain layer; skip the (L+2)·K convolutions.
            return F.relu(super().forward(x))
        B, C, H, W = x.shape
        K, L = mfa.n_components, mfa.n_factors
        dt = self.weight.dtype
        x = x.to(dt)
        Jk = J.unsqueeze(1)                                                    # (B, 1, C, H, W)
        zero = torch.zeros((), dtype=dt, device=x.device)
        # Observed pixels from x, missing ones from each component's mean; torch.where keeps NaN out.
        filled = torch.where(Jk, mfa.means.to(dt), x.unsqueeze(1))            # (B, K, C, H, W)
        fac = torch.where(Jk.unsqueeze(2), mfa.factors.to(dt), zero)          # (B, K, L, C, H, W)
        var_in = torch.where(Jk, mfa.variances.to(dt), zero)                   # (B, K, C, H, W)

        # One conv call for the filled images and all factors (same weight, bias only on the mean).
        stacked = torch.cat([filled.reshape(B * K, C, H, W), fac.reshape(B * K * L, C, H, W)], dim=0)
        out = self._conv(stacked, self.weight, None)
        Ho, Wo = out.shape[-2:]
        mu = out[: B * K].reshape(B, K, -1, Ho, Wo)
        if self.bias is not None:
            mu = mu + self.bias.view(1, 1, -1, 1, 1)
        var = self._conv(var_in.reshape(B * K, C, H, W), self.weight * self.weight, None).reshape(B, K, -1, Ho, Wo)
        if L > 0:
            fconv = out[B * K:].reshape(B, K, L, -1, Ho, Wo)
            var = var + (fconv * fconv).sum(2)
        e = expected_relu(mu, var)                                             # (B, K, C_out, Ho, Wo)
        return torch.einsum("bk,bkohw->bohw", mfa.weights.to(dt), e)
