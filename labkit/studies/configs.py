"""Every study's settings, written once: the default of each, what it is, what values it takes.

One frozen dataclass per study (the mechanics: :mod:`labkit.config`). The defaults are the
``quick`` profile (every notebook in about three minutes on two CPU cores); ``profiles/cpu.yaml``
and ``profiles/paper.yaml`` hold only what differs, and each notebook's parameters cell repeats
these defaults (``tests/test_configs.py`` checks that they agree). To change a setting for one run::

    ./lab study classification --profile cpu -p epochs=5          # the shell
    ./lab run --only 02 -p epochs=5                                # the notebook, headless
    epochs = 5                                                     # the notebook's parameters cell

and from Python ``ClassificationConfig.build("cpu", {"epochs": 5})``. ``device = "auto"`` is CUDA
when available, else the CPU; ``precision = "auto"`` is bf16-mixed where the device computes
bf16 natively, else float32 (:mod:`labkit.precision`); both are resolved once, when the run starts,
and recorded with its results.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from labkit.config import StudyConfig, at_least, choices, fraction, list_of, positive_number, setting
from labkit import data
from labkit.masks import MASK_KINDS
from labkit.device import resolve_device
from labkit.models.wae import RECIPES, recipe_settings
from labkit.precision import PRECISIONS, resolve_precision
from labkit.studies.imputers import METHODS

__all__ = ["ACFlowConfig", "CONFIGS", "ClassificationConfig", "DensityConfig", "DrawConfig", "TimingConfig", "TourConfig",
           "WAEConfig", "config_class"]

_POSITIVE, _NATURAL = at_least(1), at_least(0)
_DATASET = choices(lambda: list(data.DATASET_ALIASES), "a data set")
_PRECISION = choices(PRECISIONS, "a precision name (quote it: precision='\"32\"')")
#: WAE front names beside the methods' names (``misconv``: MisConv over the complete-data DMFA)
FRONT_ALIASES = {"dmfa_mean": "dmfa_mean_complete", "misconv": "dmfa_misconv_complete"}


def _device(v: Any) -> str | None:
    words = "'auto' or a torch device name (cpu, cuda, cuda:1, mps)"
    if v is None or v == "auto":
        return None
    if not isinstance(v, str):
        return words
    import torch

    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return words
    return None


def _holes(v: Any) -> str | None:
    words = "a non-empty list of hole sides (integers >= 1, or None: half the image side) without repeats"
    if v is None:
        return None
    ok = isinstance(v, (list, tuple)) and v and all(h is None or (isinstance(h, int) and not isinstance(h, bool)
                                                                  and h >= 1) for h in v)
    return None if ok and len(set(v)) == len(v) else words


_DEVICE_DOC = "where tensors live: 'auto' (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:1'"
_PROFILE_DOC = "the profile these settings came from (names the results folder)"
_COMMITTED_DOC = "the profile whose committed results are shown beside this run's (None: none)"


@dataclass(frozen=True)
class _Study(StudyConfig):
    """The two settings every study has, first in each config."""

    profile: str = setting("quick", _PROFILE_DOC, key=False)
    device: str = setting("auto", _DEVICE_DOC, rule=_device)


@dataclass(frozen=True)
class TourConfig(_Study):
    """Notebook 00: MisConv's formulas on real digits, checked against Monte Carlo."""

    STUDY = "tour"
    SECTION = "00_misconv_tour"

    seed: int = setting(0, "seed of the masks, the MFA fit and the Monte Carlo draws", rule=_NATURAL)
    n_images: int = setting(8, "digits shown per figure", rule=_POSITIVE)
    mc_samples: int = setting(20000, "largest Monte Carlo sample size in the convergence plots", rule=_POSITIVE)
    n_fit: int = setting(1000, "training digits the classical MFA is fitted on", rule=_POSITIVE)
    mfa_components: int = setting(4, "classical MFA: components K", rule=_POSITIVE)
    mfa_factors: int = setting(4, "classical MFA: factors L", rule=_POSITIVE)


@dataclass(frozen=True)
class DensityConfig(_Study):
    """Notebook 01 and the DMFA sweep: train (or load) a DMFA, score it on hidden squares."""

    STUDY = "dmfa"
    SECTION = "01_dmfa"

    dataset: str = setting("mnist", "data set", rule=_DATASET)
    modes: list[str] = setting(["incomplete"], "training modes of the grid: complete (whole images), incomplete "
                               "(images with truly missing parts)",
                               rule=list_of(choices(("complete", "incomplete"), "a training mode"), "training modes",
                                            unique=True), grid=True)
    missing_kinds: list[str] = setting(["square"], "kinds of the incomplete images' truly missing parts (complete "
                                       "runs have none)",
                                       rule=list_of(choices(MASK_KINDS, "a mask kind"), "mask kinds", unique=True), grid=True)
    holes: list[int | None] = setting([None], "sides of the square holes in pixels, train and test (None: half "
                                      "the image side)", rule=_holes, grid=True)
    seeds: list[int] = setting([0], "seeds: model initialisation, masks and validation split",
                               rule=list_of(_NATURAL, "integers >= 0", unique=True), grid=True)
    epochs: int = setting(1, "training epochs", rule=_POSITIVE)
    n_train: int | None = setting(2000, "training images: the first n of the split (None: all), n_val held out",
                                  rule=_POSITIVE)
    n_val: int = setting(200, "validation images for the per-epoch curve (0: none)", rule=_NATURAL)
    n_test: int | None = setting(100, "test images: the first n (None: all)", rule=_POSITIVE)
    batch_size: int = setting(48, "training batch size", rule=_POSITIVE)
    lr: float = setting(1e-3, "Adam learning rate", rule=positive_number())
    lr_milestones: list[int] = setting([], "epochs at which the learning rate is multiplied by lr_gamma",
                                       rule=list_of(_NATURAL, "integers >= 0", nonempty=False))
    lr_gamma: float = setting(1.0, "learning-rate factor at each milestone", rule=positive_number())
    mse_warmup_epochs: int = setting(0, "add the MSE of the mean during the first epochs (fully conv models)",
                                     rule=_NATURAL)
    precision: str = setting("auto", "training precision: '32', 'bf16-mixed', '16-mixed' (CUDA) or 'auto'",
                             rule=_PRECISION)
    n_components: int = setting(1, "DMFA: mixture components K", rule=_POSITIVE)
    n_factors: int = setting(4, "DMFA: factors L", rule=_POSITIVE)
    weights_dtype: str = setting("float32", "how the checkpoint stores the weights (float16: half the file)",
                                 rule=choices(("float32", "float16"), "a storage dtype for the weights"))
    mfa_components: int = setting(10, "classical MFA baseline: K (0: skip the baseline)", rule=_NATURAL)
    mfa_factors: int = setting(4, "classical MFA baseline: L", rule=_POSITIVE)
    mfa_iterations: int = setting(10, "classical MFA baseline: EM iterations", rule=_POSITIVE)
    acflow: str | None = setting("results/acflow/acflow_{dataset}.pt",
                                 "trained ACFlow scored on the same holes, if it exists ('' or None: skip)")
    acflow_samples: int = setting(4, "ACFlow imputation: the mean of this many samples", rule=_POSITIVE)
    n_figure: int = setting(6, "test images in the inpainting figure", rule=_POSITIVE, key=False)
    threads: int = setting(1, "torch intra-op threads (0: torch's default)", rule=_NATURAL, key=False)
    results_dir: str | None = setting(None, "where results go (None: results/dmfa/<profile>)", key=False)
    committed: str | None = setting("cpu", _COMMITTED_DOC, key=False)


@dataclass(frozen=True)
class ClassificationConfig(_Study):
    """Notebook 02: a small CNN whose first layer is a missing-data front (Table 1)."""

    STUDY = "classification"
    SECTION = "02_classification"

    dataset: str = setting("mnist", "data set", rule=_DATASET)
    masks: list[str] = setting(["square"], "mask kinds (columns of the table)",
                               rule=list_of(choices(MASK_KINDS, "a mask kind"), "mask kinds", unique=True), grid=True)
    methods: list[str] = setting(["zero", "dmfa_mean_complete", "dmfa_misconv_complete", "gt"],
                                 "missing-data fronts (rows of the table)",
                                 rule=list_of(choices(lambda: list(METHODS), "a method"), "method names",
                                              unique=True), grid=True)
    seeds: list[int] = setting([0], "seeds: masks, validation split and the classifier's initialisation",
                               rule=list_of(_NATURAL, "integers >= 0", unique=True), grid=True)
    epochs: int | None = setting(1, "training epochs (None: the paper's value for the data set)", rule=_POSITIVE)
    batch_size: int | None = setting(24, "training batch size (None: the paper's)", rule=_POSITIVE)
    lr: float | None = setting(1e-3, "Adam learning rate (None: the paper's)", rule=positive_number())
    n_train: int | None = setting(6000, "training images loaded, a validation split carved out (None: all)",
                                  rule=_POSITIVE)
    n_test: int | None = setting(1000, "test images (None: all)", rule=_POSITIVE)
    val_fraction: float = setting(0.1, "share of the training images held out to pick the epoch", rule=fraction)
    select: str = setting("best_val", "the epoch reported: best validation accuracy, or the last",
                          rule=choices(("best_val", "last"), "an epoch selection"))
    precision: str = setting("auto", "training precision: '32', 'bf16-mixed', '16-mixed' (CUDA) or 'auto'",
                             rule=_PRECISION)
    init: str = setting("method", "classifier initialisation: 'method' (drawn per method and seed) or 'shared' "
                        "(cells of one seed start from the same weights)",
                        rule=choices(("method", "shared"), "an initialisation scheme"))
    knn_fit: int | None = setting(5000, "incomplete training images the KNNImputer is fitted on", rule=_POSITIVE)
    knn_k: list[int] = setting([1, 3, 5, 10], "candidate numbers of neighbours, chosen on validation",
                               rule=list_of(_POSITIVE, "integers >= 1", unique=True))
    knn_val: int = setting(500, "validation images used to choose k", rule=_POSITIVE)
    mfa_components: int = setting(4, "classical MFA: K", rule=_POSITIVE)
    mfa_factors: int = setting(4, "classical MFA: L", rule=_POSITIVE)
    mfa_iterations: int = setting(30, "classical MFA: EM iterations", rule=_POSITIVE)
    dmfa_complete: str | None = setting("results/dmfa/cpu/{dataset}_complete.pt",
                                        "complete-data DMFA checkpoint ({dataset}, {replicate} filled in)")
    dmfa_incomplete: str | None = setting("results/dmfa/cpu/{dataset}_incomplete{mask_suffix}.pt",
                                          "incomplete-data DMFA per mask kind ({mask_suffix}: '' for square, "
                                          "'_trapezoid', '_noise')")
    dmfa_replicates: int = setting(1, "square masks: seed s reads DMFA replicate s % dmfa_replicates",
                                   rule=_POSITIVE)
    acflow: str | None = setting("results/acflow/acflow_{dataset}.pt", "ACFlow checkpoint (./lab study acflow)")
    acflow_samples: int = setting(4, "ACFlow imputation: the mean of this many samples", rule=_POSITIVE)
    impute_batch: int = setting(256, "ACFlow imputation batch (its sampling noise depends on it)", rule=_POSITIVE)
    eval_batch: int = setting(500, "test-time batch size", rule=_POSITIVE, key=False)
    cache_dir: str | None = setting(None, "imputers' cache (None: data/cache/classification)", key=False)
    results_dir: str | None = setting(None, "where results go (None: results/classification/<profile>)", key=False)
    committed: str | None = setting("cpu", _COMMITTED_DOC, key=False)


@dataclass(frozen=True)
class WAEConfig(_Study):
    """Notebook 03: a Wasserstein autoencoder whose encoder starts with a missing-data front."""

    STUDY = "wae"
    SECTION = "03_wae"

    dataset: str = setting("mnist", "data set", rule=_DATASET)
    fronts: list[str] = setting(["gt", "zero", "misconv"], "encoder fronts (method names; aliases misconv, dmfa_mean)",
                                rule=list_of(choices(lambda: list(METHODS) + list(FRONT_ALIASES), "a front"),
                                             "front names", unique=True), grid=True)
    seeds: list[int] = setting([0], "seeds", rule=list_of(_NATURAL, "integers >= 0", unique=True), grid=True)
    recipe: str = setting("authors", "training loop and losses (labkit.models.wae.RECIPES)",
                          rule=choices(lambda: list(RECIPES), "a WAE recipe"))
    epochs: int = setting(1, "training epochs", rule=_POSITIVE)
    batch_size: int = setting(8, "training batch size", rule=_POSITIVE)
    lr: float = setting(1e-3, "Adam: encoder and decoder (recipe authors: the discriminator too)",
                        rule=positive_number())
    lr_disc: float | None = setting(None, "recipe supplement only: the discriminator's Adam (None: 4e-6)",
                                    rule=positive_number())
    lambda_adv: float | None = setting(None, "weight of the encoder's fooling term (None: the recipe's)",
                                       rule=positive_number(strict=False))
    recon: str | None = setting(None, "reconstruction loss mse | bce (None: the recipe's)",
                                rule=choices(("mse", "bce"), "a reconstruction loss"))
    precision: str = setting("auto", "training precision: '32', 'bf16-mixed', '16-mixed' (CUDA) or 'auto'",
                             rule=_PRECISION)
    n_train: int | None = setting(2000, "first images of the training split (None: all)", rule=at_least(2))
    n_test: int | None = setting(200, "first images of the test split (None: all)", rule=at_least(2))
    mask: str = setting("square", "missing-data kind of train and test images",
                        rule=choices(MASK_KINDS, "a mask kind"))
    feature_epochs: int = setting(1, "epochs of the feature classifier for the Fréchet distances", rule=_POSITIVE)
    feature_n_train: int | None = setting(None, "its training images (None: n_train)", rule=at_least(2))
    feature_checkpoint: str | None = setting(None, "a trained feature classifier instead of training one")
    eval_batch: int = setting(500, "evaluation batch size", rule=_POSITIVE, key=False)
    n_figure: int = setting(8, "images in the reconstruction and sample figures", rule=_POSITIVE, key=False)
    dmfa_complete: str | None = setting("results/dmfa/cpu/{dataset}_complete.pt", "complete-data DMFA checkpoint")
    dmfa_incomplete: str | None = setting("results/dmfa/cpu/{dataset}_incomplete{mask_suffix}.pt",
                                          "incomplete-data DMFA per mask kind")
    acflow: str | None = setting("results/acflow/acflow_{dataset}.pt", "ACFlow checkpoint")
    knn_fit: int | None = setting(5000, "k-NN front: incomplete training images the KNNImputer is fitted on",
                                  rule=_POSITIVE)
    knn_k: list[int] = setting([1, 3, 5, 10], "k-NN front: candidate numbers of neighbours",
                               rule=list_of(_POSITIVE, "integers >= 1", unique=True))
    knn_val: int = setting(500, "k-NN front: validation images used to choose k", rule=_POSITIVE)
    mfa_components: int = setting(4, "MFA fronts: classical MFA components K", rule=_POSITIVE)
    mfa_factors: int = setting(4, "MFA fronts: factors L", rule=_POSITIVE)
    mfa_iterations: int = setting(30, "MFA fronts: EM iterations", rule=_POSITIVE)
    acflow_samples: int = setting(4, "ACFlow front: the mean of this many samples", rule=_POSITIVE)
    impute_batch: int = setting(256, "ACFlow imputation batch (its sampling noise depends on it)", rule=_POSITIVE)
    wait: bool = setting(False, "wait for DMFA checkpoints that do not exist yet", key=False)
    threads: int | None = setting(None, "torch CPU threads (None: torch's default)", rule=_NATURAL, key=False)
    cache_dir: str | None = setting(None, "imputers' cache (None: the classification study's)", key=False)
    results_dir: str | None = setting(None, "where results go (None: results/wae/<profile>)", key=False)
    committed: str | None = setting("cpu", _COMMITTED_DOC, key=False)

    def check(self) -> list[str]:
        """The recipe's overrides must fit the recipe (``lr_disc`` only with two optimizers, ``recon``
        mse | bce) and the precision must run on the device (``16-mixed``: CUDA only)."""
        problems = []
        # a value its own rule refuses is reported once, by its rule
        if not any(self.value_problem(k, getattr(self, k)) for k in ("recipe", "lambda_adv", "recon", "lr_disc")):
            try:
                recipe_settings(self.recipe, lambda_adv=self.lambda_adv, recon=self.recon, lr_disc=self.lr_disc)
            except ValueError as exc:
                problems.append(f"{self.SECTION}: {exc}")
        if not self.value_problem("precision", self.precision) and _device(self.device) is None:
            try:
                resolve_precision(self.precision, resolve_device(self.device))
            except ValueError as exc:
                problems.append(f"{self.SECTION}: {exc}")
        return problems


@dataclass(frozen=True)
class TimingConfig(_Study):
    """Notebook 04: MisConv against a plain convolution, interleaved measurements (Table 2)."""

    STUDY = "timing"
    SECTION = "04_timing"

    seed: int = setting(0, "seed of the inputs", rule=_NATURAL)
    repeats: int = setting(20, "measurements per setting and layer (paper: 5000)", rule=_POSITIVE)
    sizes: list[int] = setting([28], "image sizes (channels: 1 for 28, else 3; hole: size // 2)",
                               rule=list_of(_POSITIVE, "integers >= 1"))
    batch_sizes: list[int] = setting([16], "batch sizes", rule=list_of(_POSITIVE, "integers >= 1"))
    eager_repeats: int = setting(3, "measurements of the eager path (0: skip it)", rule=_NATURAL)
    threads: int = setting(1, "torch intra-op threads (0: leave the default)", rule=_NATURAL)
    clock: str = setting("auto", "auto | wall | cpu", rule=choices(("auto", "wall", "cpu"), "a clock"))
    tune_malloc: bool = setting(True, "keep freed memory in the process (labkit.studies.timing.tune_malloc)")
    backward: bool = setting(True, "also time forward + backward")
    component_cell: list[int] = setting([28, 16], "image size and batch of the K / L sweep",
                                        rule=list_of(_POSITIVE, "integers >= 1 (image size, batch)", length=2))
    Ks: list[int] = setting([1, 2], "components K swept ([]: no K / L sweep)",
                            rule=list_of(_POSITIVE, "integers >= 1", nonempty=False))
    Ls: list[int] = setting([1, 4], "factors L swept ([]: no K / L sweep)",
                            rule=list_of(_POSITIVE, "integers >= 1", nonempty=False))
    end_to_end_datasets: list[str] = setting(["mnist"], "data sets of the end-to-end timing ([]: skip)",
                                             rule=list_of(_DATASET, "data set names", nonempty=False))
    end_to_end_batch: int = setting(16, "end-to-end batch size", rule=_POSITIVE)
    end_to_end_repeats: int = setting(3, "end-to-end measurements", rule=_POSITIVE)
    results_dir: str | None = setting(None, "where results go (None: results/timing/<profile>)", key=False)


@dataclass(frozen=True)
class DrawConfig(_Study):
    """Notebook 05: draw a hole into a digit and watch the models."""

    STUDY = "draw"
    SECTION = "05_draw_a_mask"

    seed: int = setting(0, "seed of the fallback models and the DMFA samples", rule=_NATURAL)
    dataset: str = setting("mnist", "data set", rule=_DATASET)
    image_index: int = setting(0, "the test image shown first", rule=_NATURAL)
    n_images: int = setting(200, "the first n_images test images can be picked", rule=_POSITIVE)
    scale: int = setting(10, "canvas pixels per image pixel", rule=_POSITIVE)
    brush: float = setting(1.5, "brush diameter in image pixels", rule=positive_number())
    n_samples: int = setting(3, "DMFA samples shown", rule=_POSITIVE)
    dmfa_checkpoint: str | None = setting(None, "None: the DMFA study's checkpoint, else this file")
    out_dir: str | None = setting(None, "None: results/draw (the classifiers and any fallback DMFA)", key=False)
    n_train: int = setting(2000, "classifier training images (when results/draw lacks a checkpoint)",
                           rule=_POSITIVE)
    epochs: int = setting(2, "classifier epochs", rule=_POSITIVE)
    dmfa_n_train: int = setting(1000, "fallback DMFA training images (when no DMFA checkpoint exists)",
                                rule=_POSITIVE)
    dmfa_epochs: int = setting(1, "fallback DMFA epochs", rule=_POSITIVE)


@dataclass(frozen=True)
class ACFlowConfig(_Study):
    """The ACFlow imputer the density and classification studies score: train it (or find it trained).

    No notebook: ``./lab study acflow --profile cpu`` trains the committed checkpoint's settings.
    """

    STUDY = "acflow"
    SECTION = "acflow"
    NOTEBOOK = False

    dataset: str = setting("mnist", "data set", rule=_DATASET)
    n_train: int = setting(2000, "training images: the first n of the training split", rule=_POSITIVE)
    n_val: int = setting(200, "validation images: the first n of the test split, fixed masks (0: none)",
                         rule=_NATURAL)
    masks: list[str] = setting(["square", "trapezoid", "noise"], "mask kinds mixed in training, one drawn per image",
                               rule=list_of(choices(MASK_KINDS, "a mask kind"), "mask kinds", unique=True))
    epochs: int = setting(1, "total epochs (a larger value continues the progress of the same settings)",
                          rule=_POSITIVE)
    batch_size: int = setting(64, "training batch size", rule=_POSITIVE)
    lr: float = setting(1e-3, "Adam learning rate", rule=positive_number())
    seed: int = setting(0, "seed: initialisation, batches, masks and the validation masks", rule=_NATURAL)
    precision: str = setting("32", "training precision: '32', 'bf16-mixed', '16-mixed' (CUDA) or 'auto'",
                             rule=_PRECISION)
    hidden: int = setting(32, "ACFlow: channels of the coupling networks", rule=_POSITIVE)
    n_blocks: int = setting(1, "ACFlow: residual blocks per coupling network", rule=_NATURAL)
    n_scales: int = setting(3, "ACFlow: scales (a squeeze between two)", rule=_POSITIVE)
    n_couplings: int = setting(3, "ACFlow: couplings per scale", rule=_POSITIVE)
    max_batches: int | None = setting(None, "cap on the batches of an epoch (None: every batch; smoke runs)",
                                      rule=_POSITIVE)
    checkpoint: str = setting("results/acflow/acflow_{dataset}.pt",
                              "the trained model's file ({dataset} filled in); a file of other settings there "
                              "is kept, this run's model goes to <stem>-<digest8>.pt", key=False)
    threads: int = setting(1, "torch intra-op threads (0: torch's default)", rule=_NATURAL, key=False)
    results_dir: str | None = setting(None, "folder of the checkpoint and its report (None: the checkpoint "
                                      "setting's folder)", key=False)


#: profile section (notebook stem, or the study's name for a study without a notebook) -> its study's config
CONFIGS: dict[str, type[StudyConfig]] = {c.SECTION: c for c in (TourConfig, DensityConfig, ClassificationConfig,
                                                                  WAEConfig, TimingConfig, DrawConfig, ACFlowConfig)}


def config_class(name: str) -> type[StudyConfig]:
    """The config of a study, by study name (``classification``) or section (``02_classification``)."""
    for cls in CONFIGS.values():
        if name in (cls.STUDY, cls.SECTION):
            return cls
    valid = [c.STUDY for c in CONFIGS.values()]
    close = difflib.get_close_matches(str(name), valid + list(CONFIGS), n=1, cutoff=0.5)
    raise ValueError(f"unknown study {name!r}; studies are {', '.join(valid)}"
                     + (f" (did you mean {close[0]!r}?)" if close else ""))
