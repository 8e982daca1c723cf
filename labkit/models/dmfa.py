r"""Deep mixtures of factor analyzers (DMFA): networks that inpaint with a density, not a point.

Paper: *Estimating Conditional Density of Missing Values Using Deep Gaussian Mixture Model*,
Przewięźlikowski, Śmieja, Struski, ICONIP 2020, https://arxiv.org/abs/2010.02183; the architectures
are MisConv's supplementary section 1.1 (*MisConv: Convolutional Neural Networks for Missing Data*,
Przewięźlikowski, Śmieja, Struski, Tabor, WACV 2022, https://arxiv.org/abs/2110.14010).

A DMFA maps an incomplete image to the parameters of an :class:`~labkit.mfa.MFA` over its pixels,
conditional on the observed ones (Przewięźlikowski, Śmieja, Struski, 2020; MisConv supplementary
section 1.1). Its input is ``[x ⊙ observed, observed]`` (2C channels); the unknown pixels of ``x``
are replaced with ``torch.where`` (never multiplied by 0), so NaN there cannot reach any output.

Parameterisation (docs/math.md, "DMFA"), for K components and L factors:

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

This module also holds the evaluation protocol's masks (:func:`incomplete_masks`, :func:`test_masks`),
inference (:func:`evaluate_dmfa`: per-image NLL of the missing pixels and SSE of the mixture mean;
:func:`predict_mfa`: batched, no grad), :class:`ClassicalMFAImputer` (the classical MFA baseline
behind the same ``forward(x, missing) -> MFA`` interface) and :func:`load_dmfa` (a trained DMFA from
its checkpoint). The loss and the trainer are in :mod:`labkit.models.dmfa_training`; the density
study (load or train, scores, figures, tables) is :mod:`labkit.studies.density`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from labkit import masks as _masks
from labkit.checkpoint import CheckpointError, load_checkpoint
from labkit.checks import check_images, check_int
from labkit.data import canonical_dataset
from labkit.device import resolve_device
from labkit.mfa import MFA, ClassicalMFA
from labkit.precision import to_float32

__all__ = [
    "DATASET_SHAPES",
    "DMFA",
    "LinearHeadsDMFA",
    "FullyConvDMFA",
    "ClassicalMFAImputer",
    "build_dmfa",
    "incomplete_masks",
    "test_masks",
    "evaluate_dmfa",
    "predict_mfa",
    "load_dmfa",
    "derived_seed",
]

#: image shape (C, H, W) of each data set
DATASET_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "svhn": (3, 32, 32),
    "cifar10": (3, 32, 32),
    "celeba": (3, 64, 64),
}
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
        C, H, W = (check_int(v, "image_shape entries", 1) for v in image_shape)
        self.image_shape = (C, H, W)
        self.n_components = check_int(n_components, "n_components", 1)
        self.n_factors = check_int(n_factors, "n_factors", 0)
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

        Raises TypeError/ValueError naming ``x`` or ``missing`` when shapes/dtypes are wrong, and
        ValueError naming ``x`` when an observed pixel is NaN or inf (it would make every head NaN).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            C, H, W = self.image_shape
            raise ValueError(f"x must have shape (B, {C}, {H}, {W}) for this DMFA, got {tuple(x.shape)}")
        missing = _masks.check_mask(missing, name="missing", like=x)          # (B, C, H, W) view
        _masks.check_observed_finite(x, missing, name="x")
        observed = ~missing
        # torch.where, not x * observed: NaN * 0 is NaN.
        xin = torch.where(observed, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return torch.cat([xin, observed.to(x.dtype)], dim=1)

    def forward(self, x: Tensor, missing: Tensor, *, validate: bool = False) -> MFA:
        """The MFA of the image given its observed pixels.

        Args:
            x: ``(B, C, H, W)`` images; values where ``missing`` is True are ignored (NaN allowed);
                a NaN or inf where it is False raises ValueError.
            missing: bool ``(B, 1, H, W)`` or ``(B, C, H, W)``, True = unknown to the model.
            validate: check the returned MFA (off by default: training builds thousands of them).

        Returns:
            An :class:`MFA` with batch B over all ``C·H·W`` coordinates; its coordinates at the
            missing pixels are the prediction (those at observed pixels are the network's
            reconstruction of known values and should be ignored, as MisConv does).
        """
        inputs = self.model_input(x, missing)
        # Under a mixed-precision autocast the heads come out in bfloat16/float16; the MFA is built
        # in float32 (a variance near its 1e-4 floor keeps 3 digits in bfloat16, and the likelihood
        # divides by it), so the returned MFA is float32 in every precision.
        logits, means, factors, variances = to_float32(*self.raw(inputs))
        return MFA.from_log_weights(
            torch.log_softmax(logits, dim=1),
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
    key = canonical_dataset(dataset)
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
            out.check()
        return out


# ============================================================================ masks for the protocol
def derived_seed(seed: int, *words: int) -> int:
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
    g = torch.Generator().manual_seed(derived_seed(seed, _PURPOSE_MISSING))
    if kind == "square" and side is not None:
        kw = {**kw, "side": side}
    return _masks.make_masks(kind, n, height, width, generator=g, device=resolve_device(device), **kw)


def test_masks(n: int, height: int, width: int, *, side: int | None = None, seed: int = 0, device=None) -> Tensor:
    """The evaluation protocol's holes: one ``side x side`` square per test image (default H/2).

    Deterministic in ``seed``, so a DMFA and the classical MFA are scored on the same holes.
    Returns bool ``(n, 1, height, width)``.
    """
    g = torch.Generator().manual_seed(derived_seed(seed, _PURPOSE_TEST))
    return _masks.square(n, height, width, side=side, generator=g, device=resolve_device(device))


test_masks.__test__ = False  # not a pytest test despite its name


# ============================================================================ inference
def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return resolve_device(None)


def _batched(model: nn.Module, images: Tensor, missing: Tensor, batch_size: int, device, fn, progress=False,
             desc="DMFA"):
    images = check_images(images, "images")
    missing = _masks.check_mask(missing, name="missing", like=images)
    check_int(batch_size, "batch_size", 1)
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
    return MFA.cat(outs)


# ============================================================================ loading
def load_dmfa(path: str | os.PathLike, device=None, *, input_role: str = "DMFA checkpoint") -> tuple[DMFA, dict]:
    """Load a DMFA written by :func:`labkit.studies.density.load_or_train_dmfa` (``{"model", "meta"}``).

    The architecture comes from ``meta["model"]`` (the model's ``config``: data set, K, L, factor
    scale, variance floor), so any K and L load. Returns ``(model in eval mode on device, meta)``.
    The file is an *input* of the caller (``input_role`` names it, e.g. "incomplete-data DMFA
    checkpoint"): a missing, corrupt or mismatching file raises
    :class:`labkit.checkpoint.CheckpointError` naming the path and saying that it is an input to
    restore or retrain (``./lab study dmfa``), not an output to delete.
    """

    device = resolve_device(device)
    where = f"{input_role} {str(path)!r}"
    hint = "it is an input of this step: restore it, or retrain it with ./lab study dmfa"
    stored = load_checkpoint(path, map_location=device, input_role=input_role)
    if stored is None:
        raise CheckpointError(f"{where} does not exist; {hint}")
    if not isinstance(stored, Mapping) or "model" not in stored or "meta" not in stored:
        raise CheckpointError(f"{where} is not a DMFA checkpoint (expected keys 'model' and 'meta'); {hint}")
    meta = dict(stored["meta"])
    try:
        cfg = dict(meta.get("model") or {})
        model = build_dmfa(cfg.get("dataset", meta.get("dataset", "mnist")),
                           n_components=cfg.get("n_components", 1), n_factors=cfg.get("n_factors", 4),
                           factor_scale=cfg.get("factor_scale"), min_variance=cfg.get("min_variance", 1e-4))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} is not a DMFA checkpoint ({type(exc).__name__}: {exc}); {hint}") from exc
    try:
        model.load_state_dict(stored["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{where} does not match its recorded architecture ({exc}); {hint}") from exc
    return model.to(device).eval(), meta
