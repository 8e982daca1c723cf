r"""Wasserstein autoencoders (WAE-GAN, Tolstikhin et al. 2018) trained on incomplete images.

Papers: Tolstikhin et al., *Wasserstein Auto-Encoders*, ICLR 2018, https://arxiv.org/abs/1711.01558;
the architectures and the study are MisConv's supplementary section 1.3 (*MisConv: Convolutional
Neural Networks for Missing Data*, Przewięźlikowski, Śmieja, Struski, Tabor, WACV 2022,
https://arxiv.org/abs/2110.14010).

The encoder's first conv+ReLU is a missing-data *front* (:mod:`labkit.models.fronts`: zero imputation,
partial convolution, DMFA mean imputation, MisConv, ground truth, ...); the rest is the
architecture of the paper's supplementary material, section 1.3 (:data:`ARCHITECTURES`).

Model (:class:`WAE`):

- encoder ``Q(z|x)``, deterministic: front (conv + ReLU) -> BatchNorm -> ``conv_n`` blocks
  (3×3 conv, ReLU, BatchNorm) and ``down`` layers (3×3 conv, stride 2) -> ReLU -> linear to the
  latent space ``z ∈ R^d``;
- decoder: linear -> reshape -> ReLU -> ``up`` layers (3×3 transposed conv, stride 2) and
  ``conv_n`` blocks -> a plain 3×3 conv to the image channels; it returns logits, the image is
  their sigmoid (pixels in [0, 1]);
- discriminator on ``z``: ``[linear 64, ReLU] × 4`` -> linear 1 -> sigmoid, the probability that
  ``z`` came from the prior ``N(0, I)``.

Losses (per batch of B images; ``counted`` = the pixels the loss sees):

- discriminator: ``w_D · [BCE(D(z_prior), 1) + BCE(D(z_encoded), 0)]``, the encodings detached;
- autoencoder: ``reconstruction + λ · BCE(D(z_encoded), 1)`` (``−λ log D(z)``: the encoder tries to
  make its codes look like prior samples), with ``reconstruction`` = the binary cross-entropy
  (``recon="bce"``) or the squared error (``recon="mse"``) between the decoded image and the
  target, **averaged over each image's counted pixels, then over the batch**. Counted pixels: the
  observed ones for every front trained on incomplete images; all pixels for the ground-truth
  front, whose encoder sees the complete images (the ceiling of the study).

Three training recipes (:data:`RECIPES`):

- ``"authors"``, what the MisConv authors' training loop does (their ``train_epoch``), step by step
  (:func:`~labkit.models.wae_training.alternating_step`). **One** Adam (lr 4e-4) over encoder, decoder *and* discriminator;
  per batch two forward passes and two optimiser steps: first the gradients are zeroed (zeroed,
  not dropped: the PyTorch 1.x ``zero_grad`` their code ran under), encoder and decoder frozen, the
  whole model run (encode, discriminate codes and prior samples, decode codes and prior samples),
  and the optimiser stepped on the discriminator loss ``w_D · [BCE(D(z_prior), 1) + BCE(D(z), 0)]``;
  then the gradients zeroed again, the discriminator frozen, the model run again (the new
  discriminator sees the codes), and the optimiser stepped on ``reconstruction + λ · BCE(D(z), 1)``.
  ``w_D = λ = 0.01``, MSE reconstruction **averaged over all B·C·H·W pixels** with the missing ones
  zeroed in output and target (so on MNIST squares it weighs 3/4 of the per-observed-pixel mean),
  and the loss counts the observed pixels for every front, the ground-truth one included (their
  mask does not change with the front). Because frozen parameters keep a zero gradient, Adam still
  moves them by their momentum in the other network's step (each parameter takes two Adam steps
  per batch, one of them gradient-free), and each forward pass in training mode updates the
  BatchNorm statistics, the decoder's also with decoded prior samples: both as in their runs.
  Their discriminator ends in a sigmoid scored by ``BCELoss`` (log clamped at −100); here the
  logits go to ``binary_cross_entropy_with_logits``: the same loss except for saturated outputs.
- ``"authors_joint"``, this lab's first reading of the authors' code (the committed ``cpu`` rows
  were made with it, then called "authors"): the same optimiser and weights, but one forward pass
  and one step (:func:`~labkit.models.wae_training.joint_step`) that takes both gradients at once (each loss reaches only its
  own networks: the codes are detached in the discriminator loss, the discriminator frozen in the
  fooling term), and the reconstruction averaged per image over its counted pixels.
- ``"supplement"``, the supplementary's description read literally: two Adam optimizers,
  4e-4 for encoder + decoder and ``lr_disc`` (4e-6) for the discriminator, ``λ`` as configured
  (1 by default), BCE reconstruction. One step (:func:`~labkit.models.wae_training.train_step`) encodes the batch once, then
  makes a discriminator step (:func:`~labkit.models.wae_training.discriminator_step`, only the discriminator's parameters
  move) and an autoencoder step (:func:`~labkit.models.wae_training.autoencoder_step`, only the encoder's and decoder's
  parameters move; the discriminator is frozen while its gradient is taken, so its ``.grad`` stays
  empty). At 4e-6 the discriminator barely moves in a few epochs, which the study reports as is.

In every recipe Adam normalises each parameter's gradient, so ``w_D`` barely changes the
discriminator's updates under one optimiser: its effective learning rate is 4e-4, not the
supplement's "4e-6" (= 4e-4 × 0.01).

The losses, the optimizers and the training steps of the recipes are in
:mod:`labkit.models.wae_training`. The study that trains and scores these models on incomplete images (data, fronts' auxiliaries,
metrics, the resumable sweep, tables and figures) is :mod:`labkit.studies.wae`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from labkit.device import resolve_device
from labkit.models.fronts import FRONTS, Front, make_front

__all__ = [
    "ARCHITECTURES",
    "PAPER_SETTINGS",
    "Decoder",
    "Discriminator",
    "Encoder",
    "WAE",
    "RECIPES",
    "recipe_procedure",
    "recipe_settings",
]

#: Layer lists of the supplementary material, section 1.3 (conv_n = 3×3 conv + ReLU + BatchNorm,
#: down/up = stride-2 conv / transposed conv, lin_n = linear). The CelebA lists in the paper name
#: no resampling layers although the latent ``lin_8192 = 512 × 4 × 4`` implies four: our reading
#: puts a ``down`` after each group of the encoder and an ``up`` before each group of the decoder.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mnist": {
        "image_shape": (1, 28, 28),
        "encoder": ["conv32", "conv40", "down", "conv80", "down", "lin20"],
        "decoder": ["lin3920", "up", "conv80", "up", "conv40", "conv40", "conv1"],
        "discriminator": ["lin64"] * 4 + ["lin1"],
    },
    "svhn": {
        "image_shape": (3, 32, 32),
        "encoder": ["conv32", "conv96", "conv96", "down", "conv192", "conv192", "down", "lin20"],
        "decoder": ["lin12288", "up", "conv192", "conv192", "up", "conv96", "conv96", "conv96", "conv3"],
        "discriminator": ["lin64"] * 4 + ["lin1"],
    },
    "celeba": {
        "image_shape": (3, 64, 64),
        "encoder": ["conv32"] + ["conv64"] * 4 + ["down"] + ["conv128"] * 4 + ["down"]
        + ["conv256"] * 4 + ["down"] + ["conv512"] * 4 + ["down", "lin64"],
        "decoder": ["lin8192", "up"] + ["conv512"] * 4 + ["up"] + ["conv256"] * 4 + ["up"]
        + ["conv128"] * 4 + ["up"] + ["conv64"] * 5 + ["conv3"],
        "discriminator": ["lin512"] * 4 + ["lin1"],
    },
}

#: Training settings of the supplementary material, section 1.3.
PAPER_SETTINGS: dict[str, dict[str, float | int]] = {
    "mnist": {"epochs": 20, "batch_size": 128, "lr": 4e-4, "lr_disc": 4e-6},
    "svhn": {"epochs": 50, "batch_size": 64, "lr": 4e-4, "lr_disc": 4e-6},
    "celeba": {"epochs": 50, "batch_size": 16, "lr": 1e-4, "lr_disc": 2.5e-6},
}

#: The training recipes (module docstring): ``optimizers`` "one" (one Adam over all three networks)
#: or "two" (autoencoder and discriminator apart, ``lr_disc`` for the latter); ``lambda_adv`` (λ),
#: ``disc_weight`` (w_D) and ``recon`` are the recipe's defaults. ``procedure``: how a batch is
#: trained (:data:`PROCEDURE_DEFAULTS` where absent): ``step`` "alternating" (:func:`~labkit.models.wae_training.alternating_step`),
#: "joint" (:func:`~labkit.models.wae_training.joint_step`) or "sequential" (one encoding, :func:`~labkit.models.wae_training.discriminator_step` then
#: :func:`~labkit.models.wae_training.autoencoder_step`); ``recon_average`` "all_pixels" (sum over counted pixels / B·C·H·W) or
#: "per_image" (each image's mean over its counted pixels, then the batch mean); ``gt_counted``
#: "observed" (the ground-truth front's loss counts the observed pixels, like every other front's)
#: or "all" (it counts every pixel: the ceiling of the study).
RECIPES: dict[str, dict[str, Any]] = {
    "authors": {"optimizers": "one", "lambda_adv": 0.01, "disc_weight": 0.01, "recon": "mse", "lr_disc": None,
                "procedure": {"step": "alternating", "recon_average": "all_pixels", "gt_counted": "observed"}},
    "authors_joint": {"optimizers": "one", "lambda_adv": 0.01, "disc_weight": 0.01, "recon": "mse", "lr_disc": None,
                      "procedure": {"step": "joint"}},
    "supplement": {"optimizers": "two", "lambda_adv": 1.0, "disc_weight": 1.0, "recon": "bce", "lr_disc": 4e-6,
                   "procedure": {"step": "sequential"}},
}
#: what a recipe's ``procedure`` leaves out
PROCEDURE_DEFAULTS = {"recon_average": "per_image", "gt_counted": "all"}


def recipe_procedure(recipe: str) -> dict[str, str]:
    """``{"step", "recon_average", "gt_counted"}`` of a recipe (:data:`RECIPES`)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown WAE recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    return {**PROCEDURE_DEFAULTS, **RECIPES[recipe]["procedure"]}


def recipe_settings(recipe: str, *, lambda_adv: float | None = None, recon: str | None = None,
                    lr_disc: float | None = None) -> dict[str, Any]:
    """The settings of a training recipe, with the given values in place of its defaults.

    Returns ``{"recipe", "optimizers", "lambda_adv", "disc_weight", "recon"}``, plus ``lr_disc`` for
    the two-optimizer recipe and, for ``"authors"``, its procedure (``step``, ``recon_average``,
    ``gt_counted``: so that its cells' keys can never be those of the rows made with the joint step
    when it was called "authors"). Raises ``ValueError`` for an unknown recipe or reconstruction
    loss, and for ``lr_disc`` given to a one-optimizer recipe (it has no discriminator learning rate).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown WAE recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    base = RECIPES[recipe]
    if base["optimizers"] == "one" and lr_disc is not None:
        raise ValueError(f"recipe {recipe!r} trains the discriminator with the autoencoder's optimizer (one Adam, "
                         f"lr); lr_disc={lr_disc!r} has no meaning there: leave it None or use recipe 'supplement'")
    out = {"recipe": recipe, "optimizers": base["optimizers"],
           "lambda_adv": float(base["lambda_adv"] if lambda_adv is None else lambda_adv),
           "disc_weight": float(base["disc_weight"]), "recon": base["recon"] if recon is None else recon}
    if out["recon"] not in ("bce", "mse"):
        raise ValueError(f"recon must be 'bce' or 'mse', got {out['recon']!r}")
    if isinstance(lambda_adv, bool) or not math.isfinite(out["lambda_adv"]) or out["lambda_adv"] < 0:
        raise ValueError(f"lambda_adv must be a non-negative number, got {lambda_adv!r}")
    if base["optimizers"] == "two":
        out["lr_disc"] = float(base["lr_disc"] if lr_disc is None else lr_disc)
    if recipe == "authors":
        out.update(recipe_procedure(recipe))
    return out


_TOKEN = re.compile(r"^(conv|lin)(\d+)$|^(down|up)$")


def _parse(spec: Sequence[str], what: str) -> list[tuple[str, int]]:
    """``["conv32", "down", "lin20"]`` -> ``[("conv", 32), ("down", 0), ("lin", 20)]``."""
    if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"{what} must be a non-empty list of layer names like 'conv32', 'down', 'lin20', got {spec!r}")
    out = []
    for tok in spec:
        m = _TOKEN.match(tok) if isinstance(tok, str) else None
        if m is None:
            raise ValueError(f"{what}: unknown layer {tok!r}; use convN, linN, down or up")
        out.append((m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), 0))
        if out[-1][0] in ("conv", "lin") and out[-1][1] < 1:
            raise ValueError(f"{what}: layer {tok!r} needs at least one unit")
    return out


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """``conv_n`` of the supplementary: 3×3 conv (same size) -> ReLU -> BatchNorm."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout))


# --------------------------------------------------------------------------- networks
class Encoder(nn.Module):
    """Deterministic encoder: front -> BatchNorm -> conv/down body -> ReLU -> linear to ``R^d``.

    Args:
        front: a :mod:`labkit.models.fronts` registry name (``"zero"``, ``"pc"``, ``"dmfa_mean_complete"``,
            ``"dmfa_misconv_complete"``, ``"gt"``, ...) or a :class:`~labkit.models.fronts.Front` subclass;
            it is the first ``conv_n``'s convolution + ReLU.
        image_shape: ``(C, H, W)``.
        spec: layer names; must start with ``convN`` and end with ``linD`` (D = latent size).

    ``forward(x, missing, aux=None)``: ``x (B, C, H, W)``, ``missing`` bool ``(B, 1|C, H, W)``,
    ``aux`` as ``self.front.aux_kind`` says -> ``z (B, D)``.
    """

    def __init__(self, front: str | type[Front], image_shape: Sequence[int], spec: Sequence[str]):
        super().__init__()
        layers = _parse(spec, "encoder")
        c, h, w = (int(v) for v in image_shape)
        if layers[0][0] != "conv" or layers[-1][0] != "lin" or any(k == "lin" for k, _ in layers[:-1]):
            raise ValueError(f"encoder must start with convN and end with its only linN layer, got {list(spec)}")
        first = layers[0][1]
        self.front = make_front(front, c, first, kernel_size=3, padding=1)
        body: list[nn.Module] = [nn.BatchNorm2d(first)]
        ch = first
        for kind, n in layers[1:-1]:
            if kind == "conv":
                body.append(_conv_block(ch, n))
                ch = n
            elif kind == "down":
                body.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                h, w = (h + 1) // 2, (w + 1) // 2
            else:
                raise ValueError(f"encoder: 'up' layers belong to the decoder, got {list(spec)}")
        self.body = nn.Sequential(*body)
        self.latent_dim = layers[-1][1]
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(ch * h * w, self.latent_dim))

    @property
    def aux_kind(self) -> str:
        return self.front.aux_kind

    def forward(self, x: Tensor, missing: Tensor, aux=None) -> Tensor:
        return self.head(self.body(self.front(x, missing, aux)))


class Decoder(nn.Module):
    """Decoder: linear -> reshape -> ReLU -> up/conv body -> 3×3 conv to the image channels (logits).

    The linear layer's size fixes the starting grid: ``channels = size / (H/2^u · W/2^u)`` with ``u``
    the number of ``up`` layers (MNIST: 3920 = 80 × 7 × 7).

    ``forward(z)``: ``z (B, D)`` -> logits ``(B, C, H, W)``; :meth:`WAE.decode` applies the sigmoid.
    """

    def __init__(self, latent_dim: int, image_shape: Sequence[int], spec: Sequence[str]):
        super().__init__()
        layers = _parse(spec, "decoder")
        c, h, w = (int(v) for v in image_shape)
        if layers[0][0] != "lin" or layers[-1][0] != "conv" or any(k == "lin" for k, _ in layers[1:]):
            raise ValueError(f"decoder must start with its only linN layer and end with convC, got {list(spec)}")
        if layers[-1][1] != c:
            raise ValueError(f"decoder's last layer must output the image's {c} channels, got {spec[-1]!r}")
        ups = sum(k == "up" for k, _ in layers)
        h0, w0 = h // 2**ups, w // 2**ups
        size = layers[0][1]
        if h0 * 2**ups != h or w0 * 2**ups != w or size % (h0 * w0):
            raise ValueError(
                f"decoder: {ups} up layers cannot reach {h}x{w} from a {size}-unit linear layer "
                f"(needs a multiple of {h0}x{w0} and H, W divisible by {2**ups})"
            )
        ch = size // (h0 * w0)
        self.stem = nn.Sequential(nn.Linear(latent_dim, size), nn.Unflatten(1, (ch, h0, w0)), nn.ReLU())
        body: list[nn.Module] = []
        for kind, n in layers[1:-1]:
            if kind == "conv":
                body.append(_conv_block(ch, n))
                ch = n
            elif kind == "up":
                body.append(nn.ConvTranspose2d(ch, ch, 3, stride=2, padding=1, output_padding=1))
            else:
                raise ValueError(f"decoder: 'down' layers belong to the encoder, got {list(spec)}")
        body.append(nn.Conv2d(ch, c, 3, padding=1))
        self.body = nn.Sequential(*body)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.stem(z))


class Discriminator(nn.Module):
    """MLP on latent codes: ``[linear n, ReLU] × k`` -> linear 1 -> sigmoid.

    ``logits(z)``: ``(B, D)`` -> ``(B,)`` (what the losses use, for numerical stability);
    ``forward(z)``: the probability ``sigmoid(logits)`` that ``z`` was drawn from the prior.
    """

    def __init__(self, latent_dim: int, spec: Sequence[str]):
        super().__init__()
        layers = _parse(spec, "discriminator")
        if any(k != "lin" for k, _ in layers) or layers[-1][1] != 1:
            raise ValueError(f"discriminator must be linN layers ending with lin1, got {list(spec)}")
        mods: list[nn.Module] = []
        width = latent_dim
        for _, n in layers[:-1]:
            mods += [nn.Linear(width, n), nn.ReLU()]
            width = n
        mods.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*mods)

    def logits(self, z: Tensor) -> Tensor:
        return self.net(z).squeeze(1)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(z))


class WAE(nn.Module):
    """A WAE-GAN whose encoder starts with a missing-data front.

    Args:
        front: front name or class (see :class:`Encoder`).
        dataset: key of :data:`ARCHITECTURES` (``"mnist"``, ``"svhn"``, ``"celeba"``), or ``None``
            with ``architecture`` given.
        architecture: a dict like those of :data:`ARCHITECTURES` (``image_shape``, ``encoder``,
            ``decoder``, ``discriminator``); overrides ``dataset``'s entries key by key.
        device: where the parameters live (``None``: :func:`labkit.device.resolve_device`).

    Attributes: ``encoder``, ``decoder``, ``discriminator``, ``latent_dim``, ``image_shape``,
    ``front_name``.
    """

    def __init__(self, front: str | type[Front] = "zero", dataset: str | None = "mnist", *,
                 architecture: Mapping[str, Any] | None = None, device=None):
        super().__init__()
        arch: dict[str, Any] = {}
        if dataset is not None:
            if not isinstance(dataset, str) or dataset.lower() not in ARCHITECTURES:
                raise ValueError(f"unknown dataset {dataset!r} for the WAE; known: {', '.join(ARCHITECTURES)}")
            arch.update(ARCHITECTURES[dataset.lower()])
        if architecture is not None:
            if not isinstance(architecture, Mapping):
                raise TypeError(f"architecture must be a dict, got {type(architecture).__name__}")
            arch.update(architecture)
        missing_keys = [k for k in ("image_shape", "encoder", "decoder", "discriminator") if k not in arch]
        if missing_keys:
            raise ValueError(f"architecture lacks {missing_keys} (give a dataset or a complete architecture)")
        shape = tuple(int(v) for v in arch["image_shape"])
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {arch['image_shape']!r}")
        if isinstance(front, str) and front not in FRONTS:
            raise ValueError(f"unknown front {front!r}; valid names: {', '.join(FRONTS)}")
        self.front_name = front if isinstance(front, str) else front.__name__
        self.image_shape = shape
        self.architecture = {k: (list(v) if not isinstance(v, str) else v) for k, v in arch.items()}
        self.encoder = Encoder(front, shape, arch["encoder"])
        self.latent_dim = self.encoder.latent_dim
        self.decoder = Decoder(self.latent_dim, shape, arch["decoder"])
        self.discriminator = Discriminator(self.latent_dim, arch["discriminator"])
        self.to(resolve_device(device))

    @property
    def aux_kind(self) -> str:
        """What the front needs as ``aux``: "none", "images" or "mfa" (see :mod:`labkit.models.fronts`)."""
        return self.encoder.aux_kind

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's and decoder's parameters (what the autoencoder optimizer updates)."""
        return list(self.encoder.parameters()) + list(self.decoder.parameters())

    def encode(self, x: Tensor, missing: Tensor, aux=None) -> Tensor:
        """``(B, C, H, W)`` images with ``missing`` pixels (+ the front's ``aux``) -> codes ``(B, D)``."""
        return self.encoder(x, missing, aux)

    def decode(self, z: Tensor) -> Tensor:
        """Codes ``(B, D)`` -> images ``(B, C, H, W)`` in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    def forward(self, x: Tensor, missing: Tensor, aux=None) -> Tensor:
        """The reconstruction ``(B, C, H, W)`` in [0, 1] of incomplete images."""
        return self.decode(self.encode(x, missing, aux))

    def prior_sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` codes from the prior ``N(0, I)``, ``(n, D)`` on the model's device.

        Drawn on the generator's device (CPU for a CPU generator) and moved, so a seed gives the
        same codes on every device.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        dev = next(self.parameters()).device
        draw_on = generator.device if generator is not None else dev
        return torch.randn(n, self.latent_dim, generator=generator, device=draw_on).to(dev)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images decoded from prior codes, ``(n, C, H, W)`` in [0, 1]."""
        return self.decode(self.prior_sample(n, generator=generator))
