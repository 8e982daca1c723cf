r"""Deep mixtures of factor analyzers (DMFA): networks that inpaint with a density, not a point.

A DMFA maps an incomplete image to the parameters of an :class:`~labkit.mfa.MFA` over its pixels,
conditional on the observed ones (Przewięźlikowski, Śmieja, Struski, 2020; MisConv supplementary
section 1.1). Its input is ``[x ⊙ observed, observed]`` (2C channels); the unknown pixels of ``x``
are replaced with ``torch.where`` (never multiplied by 0), so NaN there cannot reach any output.

Parameterisation (misconv-math.md, "DMFA"), for K components and L factors:

- weights   ``softmax`` of K logits;
- means     **unconstrained** (identity), as in the authors' code: a sigmoid would saturate on
            MNIST's exact zeros and starve the mean of gradient;
- factors   ``factor_scale · tanh(raw)``, i.e. bounded in ±0.25 for 1-channel images and ±0.1 for
            RGB, the ranges the authors used;
- variances ``min_variance + sigmoid(raw)`` in ``(min_variance, 1 + min_variance)``; pixels lie in
            [0, 1], so a variance above 1 is never needed, and the floor (default 1e-4) keeps the
            Woodbury factorisation well conditioned in float32.

Architectures (:func:`build_dmfa` picks one per data set):

- :class:`LinearHeadsDMFA` (MNIST, Fashion-MNIST, 1x28x28): the authors' small conv extractor with
  16, 32, 64 and 32 filters followed by one fully-connected head per MFA parameter. **Difference
  from the authors:** they keep the full 28x28 resolution before the heads (25,088 features, about
  118 M parameters, a 470 MB checkpoint). Here the second and third convolutions have stride 2, so
  the heads read 32x7x7 = 1,568 features: 7.4 M parameters and a 29.8 MB checkpoint for K = 1,
  L = 4, 16x smaller and about 10x faster to train on a CPU, while each head is still a full
  linear map onto every pixel (the head, not the extractor, is what makes the prediction global).
- :class:`FullyConvDMFA` (SVHN, CIFAR-10 3x32x32; CelebA 3x64x64): conv-ReLU-BatchNorm blocks
  ``[conv32]x2, down, [conv64]x2, down, [conv128]x4, up, [conv64]x2, up, [conv32]x2`` (CelebA:
  the list about twice as deep, ``[conv32]x4 ... [conv128]x8 ... [conv32]x4``) and one head per
  parameter made of two convolutions (16 filters, then the parameter's channels) with ReLU and
  BatchNorm between them; the K mixture logits come from a global average pool and a linear layer.

Training (:func:`train_dmfa`, built on :func:`labkit.training.fit`, so resumable bit-identically):

- ``mode="complete"``: every batch hides a fresh random square (default side H/2, 1/4 of the
  image) and the loss is the MFA negative log-likelihood of the hidden pixels.
- ``mode="incomplete"``: each training image has its own truly missing region, fixed for the whole
  run (drawn once from the seed, :func:`incomplete_masks`); it is set to NaN before a batch is used
  so that a leak would show. Each batch hides an extra fresh square ``hidden``; the model sees
  ``visible = ~(missing | hidden)`` and the loss is the NLL on ``hidden & ~missing`` only.
- the loss is the NLL summed over an image's supervised pixels and averaged over the images of the
  batch ("per image"); optional MSE warm-up (sum of squared errors of the mixture mean on the same
  pixels) for the first ``mse_warmup_epochs`` epochs; Adam, optional step schedule.

Evaluation: :func:`evaluate_dmfa` (per-image NLL of the missing pixels and SSE of the mixture
mean), :func:`predict_mfa` (batched, no grad), :class:`ClassicalMFAImputer` (the classical MFA
baseline behind the same ``forward(x, missing) -> MFA`` interface).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from labkit import masks as _masks
from labkit.device import resolve_device
from labkit.mfa import MFA, ClassicalMFA

__all__ = [
    "DATASET_SHAPES",
    "AUTHORS_DENSITY",
    "run_acflow_baseline",
    "DMFA",
    "LinearHeadsDMFA",
    "FullyConvDMFA",
    "ClassicalMFAImputer",
    "build_dmfa",
    "incomplete_masks",
    "test_masks",
    "dmfa_loss",
    "train_dmfa",
    "evaluate_dmfa",
    "predict_mfa",
    "load_or_train_dmfa",
    "load_or_fit_mfa",
    "plot_inpainting",
    "plot_history",
    "result_stem",
    "density_table",
    "checkpoint_megabytes",
    "run_experiment",
    "run_mfa_baseline",
    "measure_throughput",
]

#: image shape (C, H, W) of each data set
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "svhn": (3, 32, 32),
    "cifar10": (3, 32, 32),
    "celeba": (3, 64, 64),
}
_ALIASES = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "fmnist": "fashion-mnist", "svhn": "svhn", "cifar10": "cifar10", "cifar-10": "cifar10",
            "celeba": "celeba"}

#: The authors' DMFA density figures (../shared/reference/anchor-numbers.md): mean per test image over
#: the hidden square, (NLL in nats, sum of squared errors), keyed by (data set, hole side, model).
AUTHORS_DENSITY: dict[tuple[str, int, str], tuple[float, float]] = {
    ("mnist", 10, "dmfa"): (-70.8, 5.46),
    ("mnist", 10, "mfa"): (-14.8, 6.90),
    ("mnist", 18, "dmfa"): (-222.6, 31.66),
    ("mnist", 18, "mfa"): (998.0, 47.89),
}


def _dataset_key(dataset: str) -> str:
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be a string, got {type(dataset).__name__}")
    key = dataset.lower().replace("_", "-")
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASET_SHAPES)}")
    return _ALIASES[key]


def _check_int(value, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


# ============================================================================ models
class DMFA(nn.Module):
    """Base class: ``forward(x, missing) -> MFA`` with the parameterisation of the module docstring.

    Subclasses implement :meth:`raw` returning unconstrained tensors
    ``(logits (B,K), means (B,K,C,H,W), factors (B,K,L,C,H,W), variances (B,K,C,H,W))``.

    Attributes:
        image_shape: ``(C, H, W)`` the model accepts.
        n_components: K.  n_factors: L.
        factor_scale: bound of the factors' entries.  min_variance: floor of the variances.
        config: the constructor arguments (JSON-able), recorded in checkpoints' metadata.
    """

    def __init__(self, image_shape: Sequence[int], n_components: int, n_factors: int,
                 factor_scale: float | None, min_variance: float):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        C, H, W = (_check_int(v, "image_shape entries", 1) for v in image_shape)
        self.image_shape = (C, H, W)
        self.n_components = _check_int(n_components, "n_components", 1)
        self.n_factors = _check_int(n_factors, "n_factors", 0)
        if factor_scale is None:
            factor_scale = 0.25 if C == 1 else 0.1
        if not (isinstance(factor_scale, (int, float)) and factor_scale > 0):
            raise ValueError(f"factor_scale must be a positive number, got {factor_scale!r}")
        if not (isinstance(min_variance, (int, float)) and min_variance > 0):
            raise ValueError(f"min_variance must be a positive number, got {min_variance!r}")
        self.factor_scale = float(factor_scale)
        self.min_variance = float(min_variance)

    def raw(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Unconstrained head outputs for ``inputs (B, 2C, H, W)``: weight logits ``(B, K)``, means
        ``(B, K, C, H, W)``, factors ``(B, K, L, C, H, W)``, variances ``(B, K, C, H, W)``.

        Subclasses provide ``extractor`` and the ``weight/mean/factor/variance`` heads (``factor_head``
        is None when L = 0); the heads' outputs are reshaped here.
        """
        B = inputs.shape[0]
        C, H, W = self.image_shape
        K, L = self.n_components, self.n_factors
        f = self.extractor(inputs)
        means = self.mean_head(f).view(B, K, C, H, W)
        if self.factor_head is not None:
            factors = self.factor_head(f).view(B, K, L, C, H, W)
        else:
            factors = f.new_zeros((B, K, 0, C, H, W))
        variances = self.variance_head(f).view(B, K, C, H, W)
        return self.weight_head(f), means, factors, variances

    def model_input(self, x: Tensor, missing: Tensor) -> Tensor:
        """``[x ⊙ observed, observed]``: ``(B, 2C, H, W)``; NaN at missing pixels is harmless.

        Raises TypeError/ValueError naming ``x`` or ``missing`` when shapes/dtypes are wrong.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            C, H, W = self.image_shape
            raise ValueError(f"x must have shape (B, {C}, {H}, {W}) for this DMFA, got {tuple(x.shape)}")
        missing = _masks.check_mask(missing, name="missing", like=x)          # (B, C, H, W) view
        observed = ~missing
        # torch.where, not x * observed: NaN * 0 is NaN.
        xin = torch.where(observed, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return torch.cat([xin, observed.to(x.dtype)], dim=1)

    def forward(self, x: Tensor, missing: Tensor, *, validate: bool = False) -> MFA:
        """The MFA of the image given its observed pixels.

        Args:
            x: ``(B, C, H, W)`` images; values where ``missing`` is True are ignored (NaN allowed).
            missing: bool ``(B, 1, H, W)`` or ``(B, C, H, W)``, True = unknown to the model.
            validate: check the returned MFA (off by default: training builds thousands of them).

        Returns:
            An :class:`MFA` with batch B over all ``C·H·W`` coordinates; its coordinates at the
            missing pixels are the prediction (those at observed pixels are the network's
            reconstruction of known values and should be ignored, as MisConv does).
        """
        inputs = self.model_input(x, missing)
        logits, means, factors, variances = self.raw(inputs)
        return MFA(
            torch.softmax(logits, dim=1),
            means,
            self.factor_scale * torch.tanh(factors),
            self.min_variance + torch.sigmoid(variances),
            validate=validate,
        )


def _he_init(module: nn.Module) -> None:
    """He (Kaiming) normal initialisation of the convolutions feeding ReLUs, zero biases.

    PyTorch's default (uniform, gain 1/sqrt(3) relative to He) shrinks the activations about 3x per
    layer, so after the four MNIST convolutions the heads saw nearly constant features and learnt
    the mean image first; with He init the conditional mean starts improving in the first epoch.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class LinearHeadsDMFA(DMFA):
    """Conv extractor (16, 32, 64, 32 filters, ReLU) and one linear head per MFA parameter.

    Layers for a ``(C, H, W)`` image (H, W divisible by 4), with output sizes for 1x28x28:
        conv5x5(2C→16)          28x28
        conv5x5(16→32), stride 2 14x14
        conv3x3(32→64), stride 2  7x7
        conv3x3(64→32)            7x7   → flatten: 32·(H/4)·(W/4) = 1,568 features
        heads: Linear(1568 → K·C·H·W) means, Linear(→ K·L·C·H·W) factors,
               Linear(→ K·C·H·W) variances, Linear(→ K) mixture logits.

    The authors' network keeps 28x28 up to the heads (about 118 M parameters); the two strides
    here cut the heads 16x (7.4 M parameters, a 29.8 MB checkpoint for K=1, L=4). Checkpoint size
    grows as ``4 bytes · 1568 · (K·(L+2)·C·H·W)``: K=1, L=4 is the largest MNIST setting under 32 MB.
    """

    def __init__(self, image_shape: Sequence[int] = (1, 28, 28), *, n_components: int = 1, n_factors: int = 4,
                 factor_scale: float | None = None, min_variance: float = 1e-4):
        super().__init__(image_shape, n_components, n_factors, factor_scale, min_variance)
        C, H, W = self.image_shape
        if H % 4 or W % 4:
            raise ValueError(f"LinearHeadsDMFA needs H and W divisible by 4, got image_shape {self.image_shape}")
        K, L, N = self.n_components, self.n_factors, C * H * W
        self.extractor = nn.Sequential(
            nn.Conv2d(2 * C, 16, 5, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(),
            _Flatten(),
        )
        features = 32 * (H // 4) * (W // 4)
        self.mean_head = nn.Linear(features, K * N)
        self.factor_head = nn.Linear(features, K * L * N) if L > 0 else None
        self.variance_head = nn.Linear(features, K * N)
        self.weight_head = nn.Linear(features, K)
        _he_init(self.extractor)
        self.config = {"architecture": "linear_heads", "image_shape": list(self.image_shape), "n_components": K,
                       "n_factors": L, "factor_scale": self.factor_scale, "min_variance": self.min_variance}


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    """``conv_n`` of the supplementary: Convolution-ReLU-BatchNorm (3x3, same size)."""
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout)]


#: the supplementary's extractors: (repeats, channels) per stage; "down"/"up" between stages
_FULLCONV_LAYOUTS = {
    "small": [(2, 32), "down", (2, 64), "down", (4, 128), "up", (2, 64), "up", (2, 32)],     # SVHN, CIFAR-10
    "large": [(4, 32), "down", (3, 64), "down", (8, 128), "up", (4, 64), "up", (4, 32)],     # CelebA
}


class FullyConvDMFA(DMFA):
    """Fully convolutional DMFA (SVHN, CIFAR-10: ``layout="small"``; CelebA: ``layout="large"``).

    Extractor (``conv_n`` = Conv3x3-ReLU-BatchNorm; ``down`` = stride-2 Conv3x3-ReLU-BatchNorm;
    ``up`` = stride-2 ConvTranspose4x4-ReLU-BatchNorm, both keeping the channel count):
        small: [conv32]x2, down, [conv64]x2, down, [conv128]x4, up, [conv64]x2, up, [conv32]x2
        large: [conv32]x4, down, [conv64]x3, down, [conv128]x8, up, [conv64]x4, up, [conv32]x4
    Heads (one per parameter): Conv3x3(32→16), ReLU, BatchNorm, Conv3x3(16→K·C) for means and
    variances, (16→K·L·C) for factors; mixture logits: global average pool, Linear(32→K).
    H and W must be divisible by 4.
    """

    def __init__(self, image_shape: Sequence[int] = (3, 32, 32), *, layout: str = "small", n_components: int = 1,
                 n_factors: int = 4, factor_scale: float | None = None, min_variance: float = 1e-4):
        super().__init__(image_shape, n_components, n_factors, factor_scale, min_variance)
        C, H, W = self.image_shape
        if H % 4 or W % 4:
            raise ValueError(f"FullyConvDMFA needs H and W divisible by 4, got image_shape {self.image_shape}")
        if layout not in _FULLCONV_LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(_FULLCONV_LAYOUTS)}, got {layout!r}")
        K, L = self.n_components, self.n_factors
        layers: list[nn.Module] = []
        ch = 2 * C
        for item in _FULLCONV_LAYOUTS[layout]:
            if item == "down":
                layers += [nn.Conv2d(ch, ch, 3, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(ch)]
            elif item == "up":
                layers += [nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(ch)]
            else:
                repeats, width = item
                for _ in range(repeats):
                    layers += _conv_block(ch, width)
                    ch = width
        self.extractor = nn.Sequential(*layers)
        _he_init(self.extractor)

        def head(out_channels: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(ch, 16, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(16),
                                 nn.Conv2d(16, out_channels, 3, padding=1))

        self.mean_head = head(K * C)
        self.factor_head = head(K * L * C) if L > 0 else None
        self.variance_head = head(K * C)
        self.weight_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), _Flatten(), nn.Linear(ch, K))
        self.layout = layout
        self.config = {"architecture": f"fully_conv_{layout}", "image_shape": list(self.image_shape),
                       "n_components": K, "n_factors": L, "factor_scale": self.factor_scale,
                       "min_variance": self.min_variance}


def build_dmfa(dataset: str, *, n_components: int = 1, n_factors: int = 4, factor_scale: float | None = None,
               min_variance: float = 1e-4) -> DMFA:
    """The DMFA architecture for a data set (weights freshly initialised from the global torch RNG).

    ``"mnist"``, ``"fashion-mnist"``: :class:`LinearHeadsDMFA` for 1x28x28;
    ``"svhn"``, ``"cifar10"``: :class:`FullyConvDMFA` (small) for 3x32x32;
    ``"celeba"``: :class:`FullyConvDMFA` (large, about twice as deep) for 3x64x64.
    """
    key = _dataset_key(dataset)
    shape = DATASET_SHAPES[key]
    kw = dict(n_components=n_components, n_factors=n_factors, factor_scale=factor_scale, min_variance=min_variance)
    if key in ("mnist", "fashion-mnist"):
        model = LinearHeadsDMFA(shape, **kw)
    else:
        model = FullyConvDMFA(shape, layout="large" if key == "celeba" else "small", **kw)
    model.config["dataset"] = key
    return model


class ClassicalMFAImputer(nn.Module):
    """The classical MFA baseline behind the DMFA interface: ``forward(x, missing) -> MFA``.

    Wraps a :class:`~labkit.mfa.ClassicalMFA` (one mixture for the whole data set) and returns its
    exact conditional given each image's observed pixels (``ClassicalMFA.condition``).
    """

    def __init__(self, mfa: ClassicalMFA):
        super().__init__()
        if not isinstance(mfa, ClassicalMFA):
            raise TypeError(f"mfa must be a ClassicalMFA, got {type(mfa).__name__}")
        self.mfa = mfa
        self.image_shape = tuple(mfa.means.shape[1:])
        self.n_components = mfa.means.shape[0]
        self.n_factors = mfa.factors.shape[1]

    def forward(self, x: Tensor, missing: Tensor, *, validate: bool = False) -> MFA:
        missing = _masks.check_mask(missing, name="missing", like=x)
        out = self.mfa.condition(x, ~missing)
        if validate:
            out._check()
        return out


# ============================================================================ masks for the protocol
def _derived_seed(seed: int, *words: int) -> int:
    """A seed for a named purpose, unrelated to ``seed``'s other uses (SeedSequence mixing)."""
    state = np.random.SeedSequence([int(seed), *map(int, words)]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


_PURPOSE_MISSING = 0x6D697373     # "miss": the fixed truly-missing masks of incomplete training
_PURPOSE_TEST = 0x74657374        # "test": the evaluation masks


def incomplete_masks(n: int, height: int, width: int, *, kind: str = "square", side: int | None = None,
                     seed: int = 0, device=None, **kw) -> Tensor:
    """The truly missing region of each of ``n`` training images, fixed for a run with ``seed``.

    Drawn once from a generator seeded from ``seed`` (not from the epoch streams), so image ``i``
    has the same mask in every epoch and after a resume. ``kind`` is a :data:`labkit.masks.MASK_KINDS`
    name; ``side`` sets the square's side (default H/2). Returns bool ``(n, 1, height, width)``.
    """
    g = torch.Generator().manual_seed(_derived_seed(seed, _PURPOSE_MISSING))
    if kind == "square" and side is not None:
        kw = {**kw, "side": side}
    return _masks.make_masks(kind, n, height, width, generator=g, device=resolve_device(device), **kw)


def test_masks(n: int, height: int, width: int, *, side: int | None = None, seed: int = 0, device=None) -> Tensor:
    """The evaluation protocol's holes: one ``side x side`` square per test image (default H/2).

    Deterministic in ``seed``, so a DMFA and the classical MFA are scored on the same holes.
    Returns bool ``(n, 1, height, width)``.
    """
    g = torch.Generator().manual_seed(_derived_seed(seed, _PURPOSE_TEST))
    return _masks.square(n, height, width, side=side, generator=g, device=resolve_device(device))


test_masks.__test__ = False  # not a pytest test despite its name


# ============================================================================ loss and training
def dmfa_loss(mfa: MFA, x: Tensor, supervised: Tensor, *, mse_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss on the ``supervised`` coordinates, per image, averaged over the batch.

    Args:
        mfa: the model's prediction (batch B).
        x: ``(B, C, H, W)`` targets; values outside ``supervised`` are ignored (NaN allowed).
        supervised: bool ``(B, 1, H, W)`` or ``(B, C, H, W)``.
        mse_weight: weight of the MSE warm-up term (sum of squared errors of the mixture mean over
            the supervised coordinates, per image).

    Returns:
        ``(loss, metrics)``; metrics hold detached ``nll`` and ``sse`` (means per image) and
        ``nll_px`` (NLL per supervised coordinate, pooled over the batch).
    """
    nll = -mfa.log_prob(x, supervised)                                        # (B,)
    sup = supervised.expand_as(x)
    err = torch.where(sup, mfa.mean() - x, torch.zeros((), dtype=x.dtype, device=x.device))
    sse = (err * err).sum(dim=(1, 2, 3))                                      # (B,)
    loss = nll.mean()
    if mse_weight:
        loss = loss + mse_weight * sse.mean()
    count = sup.sum().clamp_min(1)
    metrics = {"nll": nll.detach().mean(), "sse": sse.detach().mean(), "nll_px": nll.detach().sum() / count}
    return loss, metrics


class _BatchLog:
    """Per-batch training NLL, one list per epoch; an ``extra_state`` of fit so it survives resumes."""

    def __init__(self):
        self.nll: list[list[float]] = []

    def start(self, epoch: int) -> None:
        del self.nll[epoch:]          # a resumed epoch replays from its beginning
        while len(self.nll) <= epoch:
            self.nll.append([])

    def state_dict(self) -> dict:
        return {"nll": [list(e) for e in self.nll]}

    def load_state_dict(self, state: Mapping) -> None:
        self.nll = [list(map(float, e)) for e in state["nll"]]


def _check_images(images: Any, name: str, shape: tuple[int, int, int] | None = None) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {images.dtype}")
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} must have images of shape {tuple(shape)} for this model, got {tuple(images.shape)}")
    return images


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return resolve_device(None)


def train_dmfa(
    model: DMFA,
    images: Tensor,
    *,
    mode: str = "complete",
    missing: Tensor | None = None,
    missing_kind: str = "square",
    hole: int | None = None,
    hidden_hole: int | None = None,
    epochs: int,
    batch_size: int,
    lr: float,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 1.0,
    mse_warmup_epochs: int = 0,
    grad_clip: float | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    device=None,
    progress: bool = True,
    val_images: Tensor | None = None,
    val_missing: Tensor | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Train a DMFA in place (resumable through :func:`labkit.training.fit`).

    Args:
        model: a :class:`DMFA`; moved to ``device``.
        images: ``(N, C, H, W)`` training images in [0, 1]; stay where they are, batches are moved.
        mode: ``"complete"`` (hide a fresh square per batch, learn it) or ``"incomplete"`` (each image
            has a fixed truly missing region, never seen nor supervised; see the module docstring).
        missing: incomplete mode only: the truly missing masks, bool ``(N, 1, H, W)``; default
            :func:`incomplete_masks` of ``missing_kind`` (square side ``hole``) drawn from ``seed``.
        hole: side of the truly missing squares (default H/2).
        hidden_hole: side of the hidden (supervised) squares (default ``hole``, else H/2).
        epochs, batch_size, lr: Adam, ``epochs`` in total (a resumed run continues up to it).
        lr_milestones, lr_gamma: multiply the learning rate by ``lr_gamma`` at these epochs
            (the paper's fully convolutional schedule: ``(10,)``, ``0.25``: 4e-5 then 1e-5).
        mse_warmup_epochs: add the MSE of the mean to the loss during the first epochs.
        grad_clip: clip the gradient's global norm to this value (``None``: no clipping). The NLL
            has heavy tails (a stroke where the model was sure of background costs ~1/(2 d) nats
            per pixel), and clipping keeps such batches from throwing the weights far.
        seed: run seed (model initialisation is the caller's business).
        checkpoint: per-epoch resumable checkpoint (``None``: none).
        val_images, val_missing: optional validation set and its holes (bool ``(M, 1, H, W)``);
            adds ``val_nll``/``val_sse`` (per image) to each epoch's history.
        config: extra JSON-able description stored with the checkpoint (resuming with another
            config raises :class:`labkit.training.CheckpointMismatchError`).

    Returns:
        fit's history: per epoch ``nll``, ``sse``, ``nll_px``, ``loss``, ``lr``, ``val_*``,
        ``seconds``, ``train_seconds`` (without validation), ``batch_nll`` (the per-batch NLLs).
    """
    from labkit.training import fit

    if not isinstance(model, DMFA):
        raise TypeError(f"model must be a DMFA, got {type(model).__name__}")
    images = _check_images(images, "images", model.image_shape)
    if mode not in ("complete", "incomplete"):
        raise ValueError(f"mode must be 'complete' or 'incomplete', got {mode!r}")
    epochs = _check_int(epochs, "epochs", 0)
    batch_size = _check_int(batch_size, "batch_size", 1)
    mse_warmup_epochs = _check_int(mse_warmup_epochs, "mse_warmup_epochs", 0)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    N, C, H, W = images.shape
    if hole is not None:
        _check_int(hole, "hole", 1)
        if hole > min(H, W):
            raise ValueError(f"hole must be <= {min(H, W)} for {H}x{W} images, got {hole}")
    hidden_hole = hidden_hole if hidden_hole is not None else (hole if hole is not None else H // 2)
    _check_int(hidden_hole, "hidden_hole", 1)
    if hidden_hole > min(H, W):
        raise ValueError(f"hidden_hole must be <= {min(H, W)} for {H}x{W} images, got {hidden_hole}")
    device = resolve_device(device)
    model.to(device)

    if mode == "incomplete":
        if missing is None:
            missing = incomplete_masks(N, H, W, kind=missing_kind, side=hole, seed=seed, device=images.device)
        missing = _masks.check_mask(missing, name="missing")
        if missing.shape[0] != N or tuple(missing.shape[2:]) != (H, W) or missing.shape[1] not in (1, C):
            raise ValueError(f"missing must have shape ({N}, 1, {H}, {W}), got {tuple(missing.shape)}")
    elif missing is not None:
        raise ValueError("missing is only used with mode='incomplete' (complete-data training has none)")
    if val_images is not None:
        val_images = _check_images(val_images, "val_images", model.image_shape)
        if val_missing is None:
            val_missing = test_masks(len(val_images), H, W, side=hidden_hole, seed=seed, device=val_images.device)
        _masks.check_mask(val_missing, name="val_missing", like=val_images)

    # fused Adam: one kernel over all parameters instead of ~10 passes over them; on a CPU the
    # 7.4 M-parameter MNIST heads made the unfused update as costly as forward + backward
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(model.parameters(), lr=float(lr), fused=fused or None)
    milestones = sorted(int(m) for m in lr_milestones)
    scheduler = (torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=float(lr_gamma))
                 if milestones else None)
    log = _BatchLog()
    nan = torch.tensor(float("nan"), dtype=images.dtype, device=device)

    def batches(epoch: int, generator: torch.Generator):
        log.start(epoch)
        order = torch.randperm(N, generator=generator)
        return [order[i:i + batch_size] for i in range(0, N, batch_size)]

    def step(idx: Tensor, epoch: int, generator: torch.Generator):
        x = images[idx.to(images.device)].to(device)
        if missing is not None:
            miss = missing[idx.to(missing.device)].to(device)
            # the truly missing pixels become NaN here: if they leaked into the input or the loss,
            # the loss would be NaN
            x = torch.where(miss, nan, x)
        else:
            miss = torch.zeros((len(idx), 1, H, W), dtype=torch.bool, device=device)
        miss, hidden = _masks.training_pair(miss, hidden_kind="square", generator=generator, side=hidden_hole)
        sup = _masks.supervised(miss, hidden)
        unknown = ~_masks.visible(miss, hidden)
        mfa = model(x, unknown)
        loss, metrics = _step_loss(mfa, x, sup, mse_weight=1.0 if epoch < mse_warmup_epochs else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
        optimizer.step()
        log.nll[epoch].append(float(metrics["nll"]))
        return {"loss": loss.detach(), **metrics}

    val_times: dict[int, float] = {}

    def evaluate(epoch: int):
        started = time.perf_counter()
        df = evaluate_dmfa(model, val_images, val_missing, batch_size=max(batch_size, 256), device=device)
        val_times[epoch] = time.perf_counter() - started
        return {"val_nll": float(df["nll"].mean()), "val_sse": float(df["sse"].mean()),
                "val_seconds": val_times[epoch]}

    run_config = {
        "model": getattr(model, "config", {}), "n_images": N, "mode": mode,
        "missing_kind": missing_kind if mode == "incomplete" else None, "hole": hole, "hidden_hole": hidden_hole,
        "batch_size": batch_size, "lr": float(lr), "lr_milestones": milestones, "lr_gamma": float(lr_gamma),
        "mse_warmup_epochs": mse_warmup_epochs, "n_val": None if val_images is None else len(val_images),
        "grad_clip": grad_clip,
    }
    if config:
        run_config["extra"] = dict(config)
    history = fit(
        model, optimizer, batches, step, epochs=epochs, checkpoint=checkpoint, scheduler=scheduler, seed=seed,
        desc=f"DMFA {mode}", progress=progress, extra_state={"batch_log": log}, config=run_config,
        evaluate=evaluate if val_images is not None else None,
    )
    for entry in history:
        e = int(entry["epoch"])
        entry["train_seconds"] = entry["seconds"] - entry.get("val_seconds", 0.0)
        entry["batch_nll"] = list(log.nll[e]) if e < len(log.nll) else []
    return history


def _step_loss(mfa: MFA, x: Tensor, supervised: Tensor, *, mse_weight: float):
    """Indirection for tests (a test replaces it to interrupt training mid-epoch)."""
    return dmfa_loss(mfa, x, supervised, mse_weight=mse_weight)


# ============================================================================ evaluation
def _batched(model: nn.Module, images: Tensor, missing: Tensor, batch_size: int, device, fn, progress=False,
             desc="DMFA"):
    images = _check_images(images, "images")
    missing = _masks.check_mask(missing, name="missing", like=images)
    _check_int(batch_size, "batch_size", 1)
    device = resolve_device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    outs = []
    try:
        from tqdm.auto import tqdm
        starts = range(0, images.shape[0], batch_size)
        with torch.no_grad():
            for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
                x = images[s:s + batch_size].to(device)
                m = missing[s:s + batch_size].to(device)
                outs.append(fn(model(x, m), x, m))
    finally:
        model.train(was_training)
    return outs


def evaluate_dmfa(model: nn.Module, images: Tensor, missing: Tensor, *, batch_size: int = 256, device=None,
                  progress: bool = False):
    """Per-image density scores of the missing pixels.

    Args:
        model: anything with ``forward(x, missing) -> MFA`` (a :class:`DMFA`, :class:`ClassicalMFAImputer`).
        images: ``(N, C, H, W)`` complete images (the ground truth of the missing pixels).
        missing: bool ``(N, 1, H, W)`` or ``(N, C, H, W)``: what the model does not see and is scored on.

    Returns:
        ``pandas.DataFrame`` indexed by image, columns ``nll`` (negative log-likelihood of all
        missing coordinates, nats), ``sse`` (sum of squared errors of the mixture mean there) and
        ``n_missing`` (number of missing coordinates).
    """
    import pandas as pd

    def score(mfa: MFA, x: Tensor, m: Tensor):
        nll, sse = _scores(mfa, x, m)
        return nll.cpu(), sse.cpu(), m.expand_as(x).sum(dim=(1, 2, 3)).cpu()

    outs = _batched(model, images, missing, batch_size, device, score, progress, desc="evaluate")
    nll, sse, count = (torch.cat(t) for t in zip(*outs))
    return pd.DataFrame({"nll": nll.double().numpy(), "sse": sse.double().numpy(), "n_missing": count.numpy()})


def _scores(mfa: MFA, x: Tensor, missing: Tensor) -> tuple[Tensor, Tensor]:
    nll = -mfa.log_prob(x, missing)
    m = missing.expand_as(x)
    err = torch.where(m, mfa.mean() - x, torch.zeros((), dtype=x.dtype, device=x.device))
    return nll, (err * err).sum(dim=(1, 2, 3))


def predict_mfa(model: nn.Module, images: Tensor, missing: Tensor, *, batch_size: int = 256, device=None,
                out_device=None, progress: bool = False) -> MFA:
    """The model's MFAs for a whole data set, batched and without gradients.

    Args:
        images: ``(N, C, H, W)``; values at missing pixels are ignored (NaN allowed).
        missing: bool ``(N, 1, H, W)`` or ``(N, C, H, W)``.
        device: where the model runs (default: where its parameters are).
        out_device: where the result is stored (default: the device of ``images``), e.g. keep a
            whole data set's MFAs on the CPU while the model runs on a GPU.

    Returns:
        One :class:`MFA` with batch N (weights ``(N,K)``, means ``(N,K,C,H,W)``, ...).
        Memory: ``4·N·K·(L+2)·C·H·W`` bytes (188 MB for 10,000 MNIST images, K=1, L=4).
    """
    out_device = images.device if out_device is None else resolve_device(out_device)
    outs = _batched(model, images, missing, batch_size, device, lambda mfa, x, m: mfa.to(out_device), progress,
                    desc="predict")
    return MFA(*(torch.cat([getattr(o, f) for o in outs]) for f in ("weights", "means", "factors", "variances")),
               validate=False)


# ============================================================================ load or train
def _json(value):
    return json.loads(json.dumps(value))


def load_or_train_dmfa(
    path: str | os.PathLike,
    dataset: str,
    *,
    images: Tensor,
    n_components: int = 1,
    n_factors: int = 4,
    mode: str = "complete",
    missing_kind: str = "square",
    hole: int | None = None,
    epochs: int,
    batch_size: int,
    lr: float,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 1.0,
    mse_warmup_epochs: int = 0,
    seed: int = 0,
    val_images: Tensor | None = None,
    val_missing: Tensor | None = None,
    partial: str | os.PathLike | None = None,
    keep_partial: bool = False,
    device=None,
    progress: bool = True,
    quiet: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> tuple[DMFA, dict]:
    """Load the DMFA stored at ``path`` if it exists, else train it (resumably) and store it there.

    The model is built by :func:`build_dmfa` with weights initialised from ``seed``; training goes
    through :func:`train_dmfa` with its per-epoch checkpoint at ``partial`` (default
    :func:`labkit.checkpoint.partial_path`), deleted after the final file is written unless
    ``keep_partial`` (it holds Adam's state: three times the model's size).

    Returns:
        ``(model, meta)``: the model in eval mode on ``device``; ``meta`` records the setting
        (data set, sizes, mode, holes, epochs, seed, learning rate, ...), the history, the machine,
        the wall time and the training throughput (images/s), plus anything in ``meta``.
    """
    from labkit.checkpoint import load_or_train, partial_path

    key = _dataset_key(dataset)
    path = Path(path)
    partial = Path(partial) if partial is not None else partial_path(path)

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derived_seed(seed, 0x696E6974))  # "init"
            return build_dmfa(key, n_components=n_components, n_factors=n_factors)

    def train(model):
        started = time.perf_counter()
        history = train_dmfa(
            model, images, mode=mode, missing_kind=missing_kind, hole=hole, epochs=epochs, batch_size=batch_size,
            lr=lr, lr_milestones=lr_milestones, lr_gamma=lr_gamma, mse_warmup_epochs=mse_warmup_epochs, seed=seed,
            checkpoint=partial, device=device, progress=progress, val_images=val_images, val_missing=val_missing,
        )
        train_s = sum(h["train_seconds"] for h in history)
        info = {
            "dataset": key, "n_train": int(images.shape[0]), "n_val": None if val_images is None else len(val_images),
            "mode": mode, "missing_kind": missing_kind if mode == "incomplete" else None,
            "hole": hole if hole is not None else images.shape[2] // 2, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "lr_milestones": list(lr_milestones), "lr_gamma": lr_gamma,
            "mse_warmup_epochs": mse_warmup_epochs, "seed": seed, "model": model.config,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "train_images_per_s": (images.shape[0] * len(history) / train_s) if train_s > 0 else None,
            "wall_seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads(),
            "history": history,
        }
        if meta:
            info.update(dict(meta))
        return _json(info)

    model, info = load_or_train(path, build, train, device=device, quiet=quiet)
    if not keep_partial and path.exists():
        partial.unlink(missing_ok=True)
    return model, info


def load_or_fit_mfa(
    path: str | os.PathLike,
    images: Tensor,
    *,
    n_components: int,
    n_factors: int,
    iterations: int = 30,
    seed: int = 0,
    device=None,
    progress: bool = True,
    quiet: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> tuple[ClassicalMFAImputer, dict]:
    """Load a classical MFA from ``path`` or fit it by EM (:func:`labkit.mfa.fit_mfa`) and store it.

    Returns ``(imputer, meta)`` where ``imputer`` is a :class:`ClassicalMFAImputer`.
    """
    from labkit.checkpoint import load_or_train
    from labkit.mfa import fit_mfa

    images = _check_images(images, "images")
    shape = tuple(images.shape[1:])

    def build():
        return ClassicalMFAImputer(ClassicalMFA.empty(n_components, n_factors, shape))

    def train(imputer):
        started = time.perf_counter()
        fitted, history = fit_mfa(images, n_components, n_factors, iterations=iterations, seed=seed,
                                  device=device, progress=progress)
        imputer.mfa.load_state_dict(fitted.state_dict())
        info = {"n_train": int(images.shape[0]), "n_components": n_components, "n_factors": n_factors,
                "iterations": iterations, "iterations_run": len(history), "seed": seed,
                "train_loglik_per_image": history, "wall_seconds": time.perf_counter() - started}
        if meta:
            info.update(dict(meta))
        return _json(info)

    return load_or_train(path, build, train, device=device, quiet=quiet)


def checkpoint_megabytes(path: str | os.PathLike) -> float:
    """Size of a file in MB (10^6 bytes)."""
    return os.path.getsize(path) / 1e6


# ============================================================================ figures and tables
def result_stem(dataset: str, mode: str, hole: int | None = None, default_hole: int | None = None) -> str:
    """File stem of a result: ``<dataset>_<mode>`` for the default hole, ``<dataset>_<mode>_h<hole>`` else."""
    key = _dataset_key(dataset)
    if default_hole is None:
        default_hole = DATASET_SHAPES[key][1] // 2
    return f"{key}_{mode}" if hole is None or hole == default_hole else f"{key}_{mode}_h{hole}"


def _show(img: Tensor) -> np.ndarray:
    """(C,H,W) -> array for imshow: (H,W) for 1 channel, (H,W,3) clipped for RGB."""
    img = img.detach().float().cpu()
    if img.shape[0] == 1:
        return img[0].clamp(0, 1).numpy()
    return img.permute(1, 2, 0).clamp(0, 1).numpy()


def plot_inpainting(model: nn.Module, images: Tensor, missing: Tensor, *, n_samples: int = 3, seed: int = 0,
                    device=None, title: str | None = None):
    """A figure, one row per image: original, masked input, mixture mean, samples, per-pixel
    standard deviation and the L factors of the most probable component (missing pixels only).

    Args:
        model: ``forward(x, missing) -> MFA``.
        images: ``(n, C, H, W)`` a few complete images. missing: bool ``(n, 1, H, W)``.
    Returns:
        a matplotlib Figure.
    """
    images = _check_images(images, "images")
    mfa = predict_mfa(model, images, missing, batch_size=len(images), device=device)
    g = torch.Generator(device=mfa.means.device).manual_seed(seed)
    samples = mfa.sample(generator=g, n=n_samples).cpu()                     # (S, n, C, H, W)
    top = mfa.weights.argmax(dim=1).cpu()
    factors = mfa.factors.cpu()[torch.arange(len(images)), top]              # (n, L, C, H, W)
    return _inpainting_figure(images.cpu(), missing.expand_as(images).cpu(), mfa.mean().cpu(), samples,
                              mfa.variance().sqrt().cpu(), factors=factors, title=title)


def _inpainting_figure(x: Tensor, miss: Tensor, mean: Tensor, samples: Tensor, std: Tensor, *,
                       factors: Tensor | None = None, mean_label: str = "mean", title: str | None = None):
    """The inpainting grid shared by the DMFA and ACFlow figures. ``x``, ``miss``, ``mean``, ``std``:
    ``(n, C, H, W)`` on the CPU; ``samples`` ``(S, n, C, H, W)``; ``factors`` ``(n, L, C, H, W)`` or None.
    Observed pixels of every panel come from ``x``; the std and factor panels show missing pixels only."""
    import matplotlib.pyplot as plt

    n_samples, L = samples.shape[0], 0 if factors is None else factors.shape[1]
    cols = ["original", "input", mean_label] + [f"sample {i + 1}" for i in range(n_samples)] + ["std"] + \
           [f"factor {j + 1}" for j in range(L)]
    n = len(x)
    fig, axes = plt.subplots(n, len(cols), figsize=(1.3 * len(cols), 1.4 * n + 0.4), squeeze=False)
    for i in range(n):
        fill = lambda v: torch.where(miss[i], v, x[i])  # noqa: E731 - observed pixels from x
        masked = x[i].expand(3, -1, -1).clone() if x.shape[1] == 1 else x[i].clone()
        m3 = miss[i][:1].expand(3, -1, -1) if x.shape[1] == 1 else miss[i]
        tint = torch.tensor([0.9, 0.2, 0.2]).view(3, 1, 1).expand_as(masked)
        masked = torch.where(m3, tint, masked)
        panels = [_show(x[i]), _show(masked), _show(fill(mean[i]))] + [_show(fill(samples[s, i])) for s in range(n_samples)]
        for j, p in enumerate(panels):
            axes[i, j].imshow(p, cmap="gray", vmin=0, vmax=1)
        sd = torch.where(miss[i], std[i], torch.zeros(())).mean(0).numpy()
        axes[i, len(panels)].imshow(sd, cmap="magma", vmin=0)
        for l in range(L):
            f = torch.where(miss[i], factors[i, l], torch.zeros(())).mean(0).numpy()
            lim = max(float(np.abs(f).max()), 1e-6)
            axes[i, len(panels) + 1 + l].imshow(f, cmap="bwr", vmin=-lim, vmax=lim)
    for j, c in enumerate(cols):
        axes[0, j].set_title(c, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_history(history: Sequence[Mapping[str, Any]], *, title: str | None = None):
    """Training curves: per-batch training NLL (left), per-epoch mean training and validation NLL
    (and validation SSE on a twin axis, right). Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
    batch_nll = [v for h in history for v in h.get("batch_nll", [])]
    per_epoch = max(1, len(history[0].get("batch_nll", []))) if history else 1
    axes[0].plot(np.arange(len(batch_nll)) / per_epoch, batch_nll, lw=0.5)
    axes[0].set(xlabel="epoch", ylabel="NLL per image (nats)", title="training batches")
    if batch_nll:
        lo, hi = np.percentile(batch_nll, [0.5, 99])
        axes[0].set_ylim(lo - 0.05 * abs(hi - lo), hi)
    ep = [h["epoch"] + 1 for h in history]
    axes[1].plot(ep, [h["nll"] for h in history], "o-", ms=3, label="train NLL (epoch mean)")
    if history and "val_nll" in history[0]:
        axes[1].plot(ep, [h["val_nll"] for h in history], "s-", ms=3, label="validation NLL")
        twin = axes[1].twinx()
        twin.plot(ep, [h["val_sse"] for h in history], "^--", ms=3, color="tab:green", label="validation SSE")
        twin.set_ylabel("SSE per image")
        twin.legend(loc="center right", fontsize=8)
    axes[1].set(xlabel="epoch", ylabel="NLL per image (nats)", title="per epoch")
    axes[1].legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def density_table(results_dir: str | os.PathLike, dataset: str = "mnist") -> str:
    """Markdown table of our density results next to the authors' (``AUTHORS_DENSITY``).

    Reads every ``<dataset>_*.csv`` in ``results_dir`` with a ``<stem>.json`` setting beside it
    (``model`` "dmfa"/"mfa", ``mode``, ``hole``, ``n_train``, ``n_test``, ``epochs``...) and
    reports the mean NLL and SSE per test image over the hidden square.
    """
    import pandas as pd

    key = _dataset_key(dataset)
    rows = []
    for csv in sorted(Path(results_dir).glob(f"{key}_*.csv")):
        setting_file = csv.with_suffix(".json")
        if not setting_file.exists():
            continue
        s = json.loads(setting_file.read_text())
        df = pd.read_csv(csv)
        kind = s.get("model_kind", "dmfa")
        hole = int(s["hole"])
        authors = AUTHORS_DENSITY.get((key, hole, kind))
        if kind == "dmfa":
            what = f"DMFA, {s['mode']}-data training (K={s['n_components']}, L={s['n_factors']})"
            if s.get("missing_kind") not in (None, "square"):
                what += f", {s['missing_kind']} missing data"
            setting = f"{s['n_train']} train, {s['epochs']} epochs, lr {s.get('lr', '?')}, seed {s['seed']}"
        elif kind == "acflow":
            what = "ACFlow (flow over the hidden pixels)"
            setting = (f"{s['n_train']} train (mixed masks), {s['epochs']} epochs, SSE of the mean of "
                       f"{s['n_samples']} samples; NLL of dequantised values {df['nll_dequantized'].mean():.1f} "
                       f"({s['test_bits_per_dim']:.2f} bits/pixel)")
        else:
            what = f"classical MFA (K={s['n_components']}, L={s['n_factors']})"
            setting = f"{s['n_train']} train, EM {s.get('iterations_run', s.get('iterations'))} it., seed {s['seed']}"
        rows.append((hole, {"dmfa": 0, "mfa": 1}.get(kind, 2), f"{s.get('mode', '')} {s.get('missing_kind') or ''}",
                     f"| {hole}×{hole} | {what} | {df['nll'].mean():.1f} | {df['sse'].mean():.2f} | "
                     + (f"{authors[0]:.1f} | {authors[1]:.2f}" if authors else "– | –")
                     + f" | {len(df)} test images; {setting} |"))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    head = ("| hole | model | NLL (ours) | SSE (ours) | NLL (authors) | SSE (authors) | setting |\n"
            "|---|---|---|---|---|---|---|")
    return "\n".join([head] + [r[3] for r in rows])


# ============================================================================ experiments (notebook 01, scripts/train_dmfa.py)
def _timed_evaluate(model, images, missing, *, batch_size, device):
    started = time.perf_counter()
    df = evaluate_dmfa(model, images, missing, batch_size=batch_size, device=device)
    seconds = time.perf_counter() - started
    return df, seconds


def _load_split(dataset: str, split: str, limit: int | None):
    from labkit.data import load_dataset

    return load_dataset(dataset, split, limit=limit, quiet=True)


def run_experiment(
    dataset: str = "mnist",
    mode: str = "complete",
    *,
    results_dir: str | os.PathLike,
    n_train: int | None,
    n_val: int = 0,
    n_test: int | None,
    hole: int | None = None,
    epochs: int,
    batch_size: int,
    lr: float,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 1.0,
    mse_warmup_epochs: int = 0,
    n_components: int = 1,
    n_factors: int = 4,
    missing_kind: str = "square",
    seed: int = 0,
    profile: str | None = None,
    n_figure: int = 6,
    device=None,
    progress: bool = True,
) -> dict:
    """Train (or load) one DMFA and score it on the test set; write every artefact to ``results_dir``.

    Data: the first ``n_train`` training images (``None``: all), of which ``n_val`` (a seeded random
    choice, :func:`labkit.data.train_val_split`) are held out for the validation curve; the first
    ``n_test`` test images, each with one ``hole x hole`` square (:func:`test_masks`, default H/2).
    Training hides squares of the same side (and, in incomplete mode, the truly missing regions are
    squares of that side too unless ``missing_kind`` says otherwise).

    Files, with ``stem = result_stem(dataset, mode, hole)``:
        ``<stem>.pt``            the trained model (``load_or_train`` format)
        ``_scratch/<stem>.partial.pt``  the resumable training checkpoint (optimizer and RNG state)
        ``<stem>.csv``           per test image: ``nll``, ``sse``, ``n_missing``
        ``<stem>.json``          the setting, summary metrics, throughput and machine
        ``<stem>_history.json``  the training history (per epoch; per-batch NLL)
        ``<stem>.png``           the inpainting figure of the first ``n_figure`` test images
        ``<stem>_curves.png``    the training curves (:func:`plot_history`)

    Returns the setting dict (also written as ``<stem>.json``) with keys ``paths``, ``test_nll``,
    ``test_sse``, ``train_images_per_s``, ``infer_images_per_s``, ``history``...
    """
    from labkit.checkpoint import machine_description
    from labkit.data import train_val_split

    key = _dataset_key(dataset)
    C, H, W = DATASET_SHAPES[key]
    hole = H // 2 if hole is None else _check_int(hole, "hole", 1)
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    # incomplete-data DMFAs of other missing-data kinds (the classification study trains one per
    # mask kind) get their own files: <dataset>_incomplete_<kind>[_h<hole>]
    stem = result_stem(key, mode if mode == "complete" or missing_kind == "square" else f"{mode}_{missing_kind}", hole)
    paths = {k: out / f"{stem}{suffix}" for k, suffix in
             (("model", ".pt"), ("csv", ".csv"), ("setting", ".json"), ("history", "_history.json"),
              ("figure", ".png"), ("curves", "_curves.png"))}

    train_set = _load_split(key, "train", n_train)
    images = train_set.images
    val_images = None
    if n_val:
        tr, va = train_val_split(len(images), n_val / len(images), seed=seed)
        images, val_images = images[tr], images[va]
    test_set = _load_split(key, "test", n_test)
    test_missing = test_masks(len(test_set), H, W, side=hole, seed=seed, device=test_set.images.device)

    model, meta = load_or_train_dmfa(
        paths["model"], key, images=images, n_components=n_components, n_factors=n_factors, mode=mode,
        missing_kind=missing_kind, hole=hole, epochs=epochs, batch_size=batch_size, lr=lr,
        lr_milestones=lr_milestones, lr_gamma=lr_gamma, mse_warmup_epochs=mse_warmup_epochs, seed=seed,
        val_images=val_images, device=device, progress=progress,
        # the resumable per-epoch checkpoint (with Adam's state) stays in _scratch/ (git-ignored):
        # delete <stem>.pt and rerun with more epochs to extend a finished run
        partial=out / "_scratch" / f"{stem}.partial.pt", keep_partial=True,
        meta={"data_source": train_set.source, "profile": profile},
    )
    df, seconds = _timed_evaluate(model, test_set.images, test_missing, batch_size=256, device=device)
    df.index.name = "image"
    df.to_csv(paths["csv"], float_format="%.6g")
    history = meta.pop("history", [])
    paths["history"].write_text(json.dumps(history, indent=1))

    fig = plot_inpainting(model, test_set.images[:n_figure], test_missing[:n_figure], seed=seed, device=device,
                          title=f"DMFA ({mode}-data training) on {key} test images, {hole}x{hole} holes")
    fig.savefig(paths["figure"], dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    if history:
        fig = plot_history(history, title=f"DMFA ({mode}-data training), {key}, {hole}x{hole} holes")
        fig.savefig(paths["curves"], dpi=110)
        plt.close(fig)

    setting = {
        "model_kind": "dmfa", "dataset": key, "mode": mode, "hole": hole, "profile": profile,
        "n_train": int(len(images)), "n_val": 0 if val_images is None else int(len(val_images)),
        "n_test": int(len(test_set)), "test_source": test_set.source, **{k: v for k, v in meta.items()},
        "n_components": n_components, "n_factors": n_factors,
        "test_nll": float(df["nll"].mean()), "test_sse": float(df["sse"].mean()),
        "test_nll_sem": float(df["nll"].std() / math.sqrt(len(df))) if len(df) > 1 else None,
        "infer_images_per_s": len(test_set) / seconds, "infer_machine": machine_description(),
        "infer_threads": torch.get_num_threads(),
        "checkpoint_mb": checkpoint_megabytes(paths["model"]),
        "final_val_nll": history[-1].get("val_nll") if history else None,
    }
    setting = _json(setting)
    paths["setting"].write_text(json.dumps(setting, indent=1))
    setting["paths"] = {k: str(v) for k, v in paths.items()}
    setting["history"] = history
    return setting


def run_mfa_baseline(
    dataset: str = "mnist",
    *,
    results_dir: str | os.PathLike,
    n_train: int | None,
    n_test: int | None,
    holes: Sequence[int] = (14,),
    n_components: int = 20,
    n_factors: int = 4,
    iterations: int = 30,
    seed: int = 0,
    profile: str | None = None,
    n_figure: int = 6,
    batch_size: int = 64,
    device=None,
    progress: bool = True,
) -> list[dict]:
    """Fit (or load) a classical MFA on the first ``n_train`` training images and score it with the
    same test holes as :func:`run_experiment` (one CSV/JSON/PNG per hole side).

    Files: ``<dataset>_mfa_K<K>_L<L>.pt`` and, per hole, ``<dataset>_mfa_K<K>_L<L>[_h<hole>].{csv,json,png}``.
    """
    from labkit.checkpoint import machine_description

    key = _dataset_key(dataset)
    C, H, W = DATASET_SHAPES[key]
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"mfa_K{n_components}_L{n_factors}"
    train_set = _load_split(key, "train", n_train)
    test_set = _load_split(key, "test", n_test)
    imputer, meta = load_or_fit_mfa(out / f"{key}_{name}.pt", train_set.images, n_components=n_components,
                                    n_factors=n_factors, iterations=iterations, seed=seed, device=device,
                                    progress=progress, meta={"data_source": train_set.source, "profile": profile})
    results = []
    for hole in holes:
        stem = result_stem(key, name, hole)
        test_missing = test_masks(len(test_set), H, W, side=hole, seed=seed, device=test_set.images.device)
        df, seconds = _timed_evaluate(imputer, test_set.images, test_missing, batch_size=batch_size, device=device)
        df.index.name = "image"
        df.to_csv(out / f"{stem}.csv", float_format="%.6g")
        fig = plot_inpainting(imputer, test_set.images[:n_figure], test_missing[:n_figure], seed=seed, device=device,
                              title=f"classical MFA (K={n_components}, L={n_factors}) on {key}, {hole}x{hole} holes")
        fig.savefig(out / f"{stem}.png", dpi=110)
        import matplotlib.pyplot as plt
        plt.close(fig)
        setting = _json({
            "model_kind": "mfa", "dataset": key, "mode": "complete", "hole": hole, "profile": profile,
            "n_test": len(test_set), "test_source": test_set.source, **meta,
            "test_nll": float(df["nll"].mean()), "test_sse": float(df["sse"].mean()),
            "infer_images_per_s": len(test_set) / seconds, "infer_machine": machine_description(),
            "infer_threads": torch.get_num_threads(),
            "checkpoint_mb": checkpoint_megabytes(out / f"{key}_{name}.pt"),
        })
        (out / f"{stem}.json").write_text(json.dumps(setting, indent=1))
        results.append(setting)
    return results


def plot_acflow_inpainting(model, images: Tensor, missing: Tensor, *, n_samples: int = 3, seed: int = 0,
                           title: str | None = None):
    """One row per image: original, masked input, the mean of 16 samples, ``n_samples`` samples and
    the per-pixel standard deviation of the 16 samples (an ACFlow has no closed-form moments)."""
    dev = next(model.parameters()).device
    x = _check_images(images, "images").to(dev)
    miss = missing.to(dev).expand_as(x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        draws = model.sample(x, miss, n_samples=16, generator=g).cpu()    # (16, n, C, H, W)
    return _inpainting_figure(x.cpu(), miss.cpu(), draws.mean(0), draws[:n_samples], draws.std(0),
                              mean_label="mean of 16", title=title)


def run_acflow_baseline(
    dataset: str = "mnist",
    *,
    results_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    n_test: int | None,
    holes: Sequence[int] = (14,),
    n_samples: int = 4,
    seed: int = 0,
    profile: str | None = None,
    n_figure: int = 6,
    batch_size: int = 250,
    device=None,
    progress: bool = True,
) -> list[dict]:
    """Score a trained ACFlow (``scripts/train_acflow.py``) with the same test holes as
    :func:`run_experiment`, so it joins :func:`density_table`.

    Per hole side writes ``<dataset>_acflow[_h<hole>].{csv,json,png}``: per image the NLL of the
    hidden pixels at exact values (the DMFA protocol) and at dequantised values, and the SSE of the
    mean of ``n_samples`` samples (:func:`labkit.acflow.score_holes`). A missing checkpoint raises
    ``FileNotFoundError`` naming the script that trains it.
    """
    import matplotlib.pyplot as plt

    from labkit.acflow import bits_per_dim, load_acflow, score_holes
    from labkit.checkpoint import machine_description

    key = _dataset_key(dataset)
    C, H, W = DATASET_SHAPES[key]
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"no ACFlow checkpoint at {str(checkpoint)!r}; train one with "
                                f"scripts/train_acflow.py --out {checkpoint}")
    model, meta = load_acflow(checkpoint, device=device)
    cfg, train = meta.get("config", {}), meta.get("setting", {})
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_set = _load_split(key, "test", n_test)
    results = []
    for hole in holes:
        stem = result_stem(key, "acflow", hole)
        test_missing = test_masks(len(test_set), H, W, side=hole, seed=seed, device="cpu")
        started = time.perf_counter()
        df = score_holes(model, test_set.images, test_missing, n_samples=n_samples, batch_size=batch_size,
                         seed=seed, progress=progress)
        seconds = time.perf_counter() - started
        df.index.name = "image"
        df.to_csv(out / f"{stem}.csv", float_format="%.6g")
        fig = plot_acflow_inpainting(model, test_set.images[:n_figure], test_missing[:n_figure], seed=seed,
                                     title=f"ACFlow on {key}, {hole}x{hole} holes")
        fig.savefig(out / f"{stem}.png", dpi=110)
        plt.close(fig)
        per_pixel = float(df["nll_dequantized"].sum() / df["n_missing"].sum())
        setting = _json({
            "model_kind": "acflow", "dataset": key, "mode": "complete", "hole": hole, "profile": profile,
            "checkpoint": str(checkpoint), "model": cfg.get("model"),
            "n_train": train.get("n_train", cfg.get("n_images")),
            "epochs": meta.get("epochs", len(meta.get("history", []))),
            "train_masks": train.get("mask_kinds", cfg.get("mask_fn")), "train_data_source": train.get("train_source"),
            "train_seed": meta.get("seed"), "n_parameters": meta.get("n_params"), "n_samples": n_samples, "seed": seed,
            "n_test": len(test_set), "test_source": test_set.source,
            "test_nll": float(df["nll"].mean()), "test_nll_dequantized": float(df["nll_dequantized"].mean()),
            "test_bits_per_dim": float(bits_per_dim(per_pixel)), "test_sse": float(df["sse"].mean()),
            "infer_images_per_s": len(test_set) / seconds, "infer_machine": machine_description(),
            "infer_threads": torch.get_num_threads(),
        })
        (out / f"{stem}.json").write_text(json.dumps(setting, indent=1))
        results.append(setting)
    return results


def measure_throughput(dataset: str = "mnist", *, threads: Sequence[int] = (1, 2), train_batches: int = 20,
                       batch_size: int = 48, infer_images: int = 2000, infer_batch_size: int = 256,
                       device=None, seed: int = 0) -> list[dict]:
    """Training and inference speed of a fresh DMFA (images/s) for each intra-op thread count.

    Training: ``train_batches`` optimisation steps (forward, NLL, backward, fused Adam) on random
    images with a fresh hidden square per batch, after two warm-up steps. Inference: the MFAs and
    scores of ``infer_images`` images (:func:`evaluate_dmfa`). Timings are wall clock: on a machine
    shared with other jobs they measure what this machine delivered at that moment.
    """
    key = _dataset_key(dataset)
    C, H, W = DATASET_SHAPES[key]
    device = resolve_device(device)
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((max(infer_images, batch_size), C, H, W), generator=g)
    holes = test_masks(len(images), H, W, seed=seed, device=images.device)
    out = []
    try:
        for n_threads in threads:
            torch.set_num_threads(int(n_threads))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build_dmfa(key).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda") or None)
            x = images[:batch_size].to(device)

            def step():
                hidden = _masks.square(batch_size, H, W, generator=g, device=device)
                loss, _ = dmfa_loss(model(x, hidden), x, hidden)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(2):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(train_batches):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_rate = train_batches * batch_size / (time.perf_counter() - started)
            evaluate_dmfa(model, images[:infer_batch_size], holes[:infer_batch_size], device=device)  # warm-up
            _, seconds = _timed_evaluate(model, images[:infer_images], holes[:infer_images],
                                         batch_size=infer_batch_size, device=device)
            out.append({"dataset": key, "threads": int(n_threads), "device": str(device),
                        "train_images_per_s": train_rate, "infer_images_per_s": infer_images / seconds,
                        "train_batch_size": batch_size, "infer_batch_size": infer_batch_size})
    finally:
        torch.set_num_threads(before)
    return out
