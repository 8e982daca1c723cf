r"""Missing-data fronts: the first conv+ReLU of a network, one class per way of handling missing pixels.

Paper: *MisConv: Convolutional Neural Networks for Missing Data*, Przewięźlikowski, Śmieja, Struski,
Tabor, WACV 2022, https://arxiv.org/abs/2110.14010 (the MisConv layer; supplementary
Table 1's baselines). Partial convolution: Liu et al., *Image Inpainting for Irregular Holes Using
Partial Convolutions*, ECCV 2018, https://arxiv.org/abs/1804.07723.

A *front* replaces the first ``conv + ReLU`` of a classifier (the classification study) or of an
encoder (the WAE study). Every front has the same constructor and the same call::

    front = FrontClass(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
    y = front(x, missing, aux=None)

    x        (B, C, H, W) float; values at missing pixels are ignored (NaN allowed: they never
             reach the output; every front selects with ``torch.where``, never by multiplying);
             a NaN or inf at an observed pixel raises ValueError (it would reach the output)
    missing  bool (B, 1, H, W) or (B, C, H, W), True = missing
    aux      what the method needs besides (x, missing), see ``front.aux_kind``:
               "none"   nothing (zero, mask, partial convolution)
               "images" (B, C, H, W) float: imputed images (k-NN, MFA/DMFA mean, ACFlow) whose
                        values are used at missing pixels only, or the complete images (ground truth)
               "mfa"    a :class:`labkit.mfa.MFA` with batch B over images (C, H, W) (MisConv)
    y        (B, out_channels, H', W'), the conv output size; finite for finite inputs at observed
             pixels. The ReLU is included; BatchNorm etc. belong to the body that follows.

The fronts (``FRONTS`` maps the method names of :mod:`labkit.studies.imputers` to these classes):

- :class:`ZeroFront`            conv(x with 0 at missing pixels) + ReLU
- :class:`MaskFront`            conv([x with 0 at missing, missing as 0/1 channels]) + ReLU: the
                                 conv has ``2·C`` input channels (the mask expanded to C channels)
- :class:`PartialConvFront`     partial convolution (Liu et al., 2018): over each window,
                                 ``W·(X⊙M)·sum(1)/sum(M) + b`` where the window holds an observed
                                 pixel, 0 where it holds none (zero padding counts as unobserved),
                                 then ReLU; M = observed, sum(1) = C·k_h·k_w
- :class:`ImputationFront` and its named subclasses :class:`KNNFront`, :class:`MFAMeanFront`,
  :class:`ACFlowFront`           conv(x at observed pixels, ``aux`` at missing ones) + ReLU
- :class:`GroundTruthFront`     conv(aux) + ReLU with ``aux`` the complete images (the ceiling)
- :class:`MisConvFront`         the exact expected conv+ReLU over the missing pixels drawn from the
                                 MFA ``aux`` (:class:`labkit.misconv.MisConv2d`)

Expensive auxiliaries (imputations, per-image MFAs) are computed once per data set by the
*preparers* in :mod:`labkit.studies.imputers` (the imputer is frozen), cached on disk, and handed to the
front batch by batch; the front itself stays a cheap, trainable conv.

Reuse (e.g. the WAE encoder): build ``make_front(name_or_class, C, 32, kernel_size=3,
padding=1)`` and call it with the same ``(x, missing, aux)``; ``front.aux_kind`` says what to pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit import masks as _masks
from labkit.mfa import MFA
from labkit.misconv import MisConv2d
from labkit.precision import float32_region, to_float32

__all__ = [
    "Front",
    "ZeroFront",
    "MaskFront",
    "PartialConvFront",
    "ImputationFront",
    "KNNFront",
    "MFAMeanFront",
    "ACFlowFront",
    "GroundTruthFront",
    "MisConvFront",
    "AuthorsMisConvFront",
    "FRONTS",
    "make_front",
]


def _check_inputs(x: Tensor, missing: Tensor, in_channels: int) -> Tensor:
    """Validate ``x``/``missing``; return ``missing`` expanded to ``x.shape``."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must have shape (B, {in_channels}, H, W), got {tuple(x.shape)}")
    if not isinstance(missing, Tensor) or missing.dtype != torch.bool:
        raise TypeError(
            f"missing must be a bool tensor (True = missing), got {getattr(missing, 'dtype', type(missing).__name__)}"
        )
    B, C, H, W = x.shape
    if missing.dim() != 4 or missing.shape[0] != B or missing.shape[2:] != (H, W) or missing.shape[1] not in (1, C):
        raise ValueError(f"missing must have shape ({B}, 1, {H}, {W}) or ({B}, {C}, {H}, {W}), got {tuple(missing.shape)}")
    if missing.device != x.device:
        raise ValueError(f"missing is on {missing.device} but x is on {x.device}")
    # NaN at missing pixels never reaches the output; at an observed one it would, silently.
    _masks.check_observed_finite(x, missing, name="x")
    return missing.expand(B, C, H, W)


def _check_images_aux(aux, x: Tensor, what: str) -> Tensor:
    if aux is None:
        raise ValueError(f"this front needs aux = {what} of shape {tuple(x.shape)}, got None")
    if not isinstance(aux, Tensor) or not aux.is_floating_point():
        raise TypeError(f"aux must be a float tensor ({what}), got {getattr(aux, 'dtype', type(aux).__name__)}")
    if aux.shape != x.shape:
        raise ValueError(f"aux ({what}) must have the shape of x {tuple(x.shape)}, got {tuple(aux.shape)}")
    if aux.device != x.device:
        raise ValueError(f"aux ({what}) is on {aux.device} but x is on {x.device}")
    return aux


class Front(nn.Module):
    """Base class: a ``Conv2d`` (``self.conv``) + ReLU that knows how to treat missing pixels.

    Args:
        in_channels: C, channels of the images.
        out_channels: filters of the first convolution.
        kernel_size, stride, padding: as for :class:`torch.nn.Conv2d` (zero padding).
        bias: whether the convolution has a bias.

    Subclasses set ``aux_kind`` ("none", "images" or "mfa") and implement ``_forward``.
    """

    aux_kind = "none"
    #: extra input channels the convolution sees per image channel (MaskFront: 1, the mask)
    _extra_channels_per_channel = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=1, bias: bool = True):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        conv_in = in_channels * (1 + self._extra_channels_per_channel)
        self.conv = self._make_conv(conv_in, out_channels, kernel_size, stride, padding, bias)

    def _make_conv(self, cin, cout, kernel_size, stride, padding, bias) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=bias)

    def forward(self, x: Tensor, missing: Tensor, aux=None) -> Tensor:
        J = _check_inputs(x, missing, self.in_channels)
        return self._forward(x, J, aux)

    def _forward(self, x: Tensor, J: Tensor, aux) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"aux_kind={self.aux_kind!r}"


def _zero_fill(x: Tensor, J: Tensor) -> Tensor:
    return torch.where(J, torch.zeros((), dtype=x.dtype, device=x.device), x)


class ZeroFront(Front):
    """conv(x with 0 at missing pixels) + ReLU."""

    def _forward(self, x, J, aux):
        return F.relu(self.conv(_zero_fill(x, J)))


class MaskFront(Front):
    """conv([x with 0 at missing pixels, missing as float 0/1]) + ReLU; the conv sees 2·C channels."""

    _extra_channels_per_channel = 1

    def _forward(self, x, J, aux):
        return F.relu(self.conv(torch.cat([_zero_fill(x, J), J.to(x.dtype)], dim=1)))


class PartialConvFront(Front):
    """Partial convolution (Liu et al., 2018) + ReLU.

    With M = observed (1 at observed pixels, 0 at missing ones and in the zero padding) and a
    window of ``C·k_h·k_w`` inputs, every output unit is

        W·(X⊙M) · (C·k_h·k_w) / sum(M in the window) + b   if the window holds an observed pixel,
        0                                                   if it holds none,

    followed by ReLU. ``sum(M)`` is a convolution of M with an all-ones kernel of the same
    stride/padding/dilation.
    """

    def _forward(self, x, J, aux):
        conv = self.conv
        obs = (~J).to(x.dtype)
        raw = F.conv2d(_zero_fill(x, J), conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        ones = torch.ones((1, obs.shape[1], *conv.kernel_size), dtype=x.dtype, device=x.device)
        count = F.conv2d(obs, ones, None, conv.stride, conv.padding, conv.dilation)     # (B, 1, H', W')
        window = float(obs.shape[1] * conv.kernel_size[0] * conv.kernel_size[1])
        has = count > 0
        # Substitute 1 where the window is empty so the division never makes inf/NaN (also in grads).
        scale = window / torch.where(has, count, torch.ones_like(count))
        out = raw * scale
        if conv.bias is not None:
            out = out + conv.bias.view(1, -1, 1, 1)
        return F.relu(torch.where(has, out, torch.zeros((), dtype=out.dtype, device=out.device)))


class ImputationFront(Front):
    """conv(x at observed pixels, ``aux`` at missing ones) + ReLU; ``aux`` = imputed images (B, C, H, W).

    Only the missing pixels of ``aux`` are used, so an imputer that also rewrites observed pixels
    cannot change the result; its values at missing pixels must be finite (ValueError otherwise).
    """

    aux_kind = "images"

    def _forward(self, x, J, aux):
        aux = _check_images_aux(aux, x, "imputed images")
        filled = torch.where(J, aux.to(x.dtype), x)
        # x is finite at observed pixels (checked), so a non-finite value here is the imputer's. A
        # NaN or inf makes the sum non-finite (cheap); only then are the values counted.
        if not bool(filled.detach().sum(dtype=torch.float32).isfinite()):
            bad = int((~torch.isfinite(filled)).sum())
            if bad:
                raise ValueError(f"aux (imputed images) is not finite (NaN or inf) at {bad} missing pixel value(s); "
                                 "the imputation must give a finite value at every missing pixel")
        return F.relu(self.conv(filled))


class KNNFront(ImputationFront):
    """k-NN imputation (scikit-learn ``KNNImputer``), then conv + ReLU."""


class MFAMeanFront(ImputationFront):
    """Conditional-mean imputation by an MFA (classical or deep), then conv + ReLU (no variance)."""


class ACFlowFront(ImputationFront):
    """ACFlow imputation, then conv + ReLU."""


class GroundTruthFront(Front):
    """conv(complete images) + ReLU: ``aux`` = the complete images (the ceiling; ``x`` is unused
    apart from its shape, ``missing`` is ignored)."""

    aux_kind = "images"

    def _forward(self, x, J, aux):
        aux = _check_images_aux(aux, x, "complete images")
        if not bool(torch.isfinite(aux).all()):
            raise ValueError("aux (complete images) contains NaN or infinite values")
        return F.relu(self.conv(aux.to(x.dtype)))


class MisConvFront(Front):
    """MisConv: the exact expected conv+ReLU over the missing pixels, ``aux`` = :class:`MFA` (batch B).

    ``aux=None`` is accepted only when nothing is missing (then it is plain conv + ReLU).
    """

    aux_kind = "mfa"

    def _make_conv(self, cin, cout, kernel_size, stride, padding, bias):
        return MisConv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=bias)

    def _forward(self, x, J, aux):
        if aux is None:
            if bool(J.any()):
                raise ValueError("MisConvFront needs aux = an MFA over the images when pixels are missing, got None")
            return self.conv(x)
        if not isinstance(aux, MFA):
            raise TypeError(f"aux must be a labkit.mfa.MFA, got {type(aux).__name__}")
        # MisConv2d itself only reads x at observed pixels (torch.where), so NaN there is harmless.
        # The expected ReLU over the mixture (Gaussian pdf/cdf terms, the mixture's weighted sum)
        # stays float32 inside a mixed-precision forward: autocast off, inputs cast back up.
        with float32_region(x.device):
            return self.conv(to_float32(x), J, to_float32(aux))


class AuthorsMisConvFront(MisConvFront):
    """The authors' published first layer (``MisConv2d(variant="authors")``) over the same ``aux`` MFA.

    A labelled ablation, kept to tell whether the paper's numbers owe something to the four ways
    that layer differs from the exact expectation (see :class:`labkit.misconv.MisConv2d`); it is
    fed the MFA the DMFA predicts at every pixel, as the authors' code was. Not for other use.
    """

    def _make_conv(self, cin, cout, kernel_size, stride, padding, bias):
        return MisConv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=bias, variant="authors")


#: registry names (see labkit.studies.imputers.METHODS) -> front class
FRONTS: dict[str, type[Front]] = {
    "zero": ZeroFront,
    "mask": MaskFront,
    "pc": PartialConvFront,
    "knn": KNNFront,
    "mfa_mean": MFAMeanFront,
    "mfa_misconv": MisConvFront,
    "dmfa_mean_complete": MFAMeanFront,
    "dmfa_misconv_complete": MisConvFront,
    "dmfa_mean_incomplete": MFAMeanFront,
    "dmfa_misconv_incomplete": MisConvFront,
    "dmfa_authors_complete": AuthorsMisConvFront,
    "dmfa_authors_incomplete": AuthorsMisConvFront,
    "acflow": ACFlowFront,
    "gt": GroundTruthFront,
}


def make_front(kind: str | type[Front], in_channels: int, out_channels: int, **conv_kwargs) -> Front:
    """Build a front by registry name (``FRONTS``) or class; ``conv_kwargs``: kernel_size, stride, padding, bias."""
    if isinstance(kind, str):
        if kind not in FRONTS:
            raise ValueError(f"unknown front {kind!r}; valid names: {', '.join(FRONTS)}")
        cls = FRONTS[kind]
    elif isinstance(kind, type) and issubclass(kind, Front):
        cls = kind
    else:
        raise TypeError(f"kind must be a front name or a Front subclass, got {kind!r}")
    return cls(in_channels, out_channels, **conv_kwargs)
