r"""The WAE study (notebook 03, ``scripts/run_wae.py``): WAE-GANs trained on incomplete images.

Reproduces the WAE study of *MisConv: Convolutional Neural Networks for Missing Data*,
Przewięźlikowski, Śmieja, Struski, Tabor, WACV 2022, https://arxiv.org/abs/2110.14010 (supplementary
section 1.3).

One *cell* = (dataset, front, seed): a :class:`labkit.models.wae.WAE` whose encoder starts with the
front is trained on incomplete images and scored on the complete test images. The data, the fixed
per-image masks (:mod:`labkit.studies.cells`) and the fronts' auxiliaries (imputations, per-image
MFAs: :mod:`labkit.studies.imputers`) are those of the classification study: same masks, same
on-disk caches.

The sweep runs on the study engine (:mod:`labkit.studies.engine`): :func:`plan_cells` turns the
settings into :class:`~labkit.studies.engine.Cell` s whose keys digest the coordinates, every
setting that changes the result (sizes, epochs, batch size, learning rates, recipe, λ,
reconstruction loss, precision, the feature network's training) and the fingerprints of the inputs
(the images and labels used, the masks, the DMFA/ACFlow checkpoint the front reads, a given feature
classifier). :func:`run_sweep` runs the cells not yet in ``results/wae/<profile>/metrics.csv``
(:func:`result_store`; details per run in ``runs.jsonl``): a failing cell is reported, the others
run, and :class:`~labkit.studies.engine.SweepFailed` lists the failures at the end.

:func:`summary_table` / :func:`table_markdown` / :func:`plot_metrics` (in :mod:`labkit.studies.wae_report`,
re-exported here) report the rows of the planned cells (:func:`~labkit.studies.engine.check_uniform`
refuses to put rows made with other settings side by side) next to the authors' numbers
(:data:`AUTHORS_WAE_MNIST`). Metrics
(:mod:`labkit.metrics`): PSNR and SSIM over the missing region and the whole image; the whole-image
PSNR/SSIM as scikit-image computes them when called like the authors did
(``psnr_all_skimage``/``ssim_all_skimage``: its float SSIM assumes a data range of 2); Fréchet
distances between features of the lab's own classifier (:func:`feature_network`; :data:`FD_NAME`),
since no Inception weights can be downloaded here.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from labkit import paths
from labkit.device import resolve_device
from labkit.models.wae import WAE, make_optimizers, recipe_procedure, recipe_settings, train_step
from labkit.studies import engine
from labkit.studies.cells import _stable_seed, fingerprint_cell, load_cell_data
from labkit.studies.engine import Cell, InputError, ResultStore, SweepFailed
from labkit.studies.imputers import METHODS, ImputerConfig, method_available
# the feature network lives in wae_features, the report side (tables, figures) in wae_report; re-exported so that ``wae.table_markdown`` keeps working
from labkit.studies.wae_features import _feature_map, classifier_features, feature_network  # noqa: F401
from labkit.studies.wae_report import (AUTHORS_WAE_MNIST, COLUMN_NAMES, FD_NAME, FRONT_ORDER, FRONT_SETTINGS,
                                       plot_front_grid, plot_metrics, plot_reconstructions, plot_samples,
                                       settings_line, shared_settings, summary_table, table_markdown)

__all__ = [
    "config_from_parameters",
    "AUTHORS_WAE_MNIST",
    "COLUMN_NAMES",
    "COORDS",
    "FD_NAME",
    "FRONT_ALIASES",
    "FRONT_ORDER",
    "FRONT_SETTINGS",
    "METRIC_COLUMNS",
    "SKIMAGE_COLUMNS",
    "WAEConfig",
    "canonical_front",
    "classifier_features",
    "evaluate_wae",
    "feature_network",
    "front_available",
    "load_examples",
    "migrate_renamed_recipes",
    "RENAMED_RECIPES",
    "plan_cell",
    "plan_cells",
    "plot_front_grid",
    "plot_metrics",
    "plot_reconstructions",
    "plot_samples",
    "read_results",
    "result_store",
    "run_cell",
    "run_sweep",
    "settings_line",
    "shared_settings",
    "summary_table",
    "table_markdown",
]

COORDS = ["dataset", "front", "seed"]
METRIC_COLUMNS = ["psnr_missing", "ssim_missing", "psnr_all", "ssim_all", "fd_reconstruction", "fd_samples"]
#: whole-image PSNR/SSIM as scikit-image computes them when called like the authors did
#: (:func:`labkit.metrics.skimage_psnr_ssim`); optional: rows migrated from before they existed lack them
SKIMAGE_COLUMNS = ["psnr_all_skimage", "ssim_all_skimage"]

#: prior codes of ``fd_samples`` are drawn this many at a time from the seeded generator, whatever the
#: evaluation batch (``eval_batch``, not part of a cell's key) is: the committed rows drew them so
PRIOR_BLOCK = 500

#: short names accepted for the study's fronts (the CSV records the canonical method name)
FRONT_ALIASES = {"dmfa_mean": "dmfa_mean_complete", "misconv": "dmfa_misconv_complete"}

#: the feature classifier's training recipe (the classification study's: Adam 1e-3, batch 24)
FEATURE_RECIPE = {"batch_size": 24, "lr": 1e-3, "seed": 0, "init_seed": 12345, "select": "last",
                  "front": "gt", "layer": "input of the last linear layer"}


def canonical_front(name: str) -> str:
    """A front's method name in :data:`labkit.studies.imputers.METHODS` (``"misconv"`` -> ``"dmfa_misconv_complete"``)."""
    if not isinstance(name, str):
        raise TypeError(f"front must be a method name, got {type(name).__name__}")
    canon = FRONT_ALIASES.get(name, name)
    if canon not in METHODS:
        valid = ", ".join(list(METHODS) + list(FRONT_ALIASES))
        raise ValueError(f"unknown front {name!r}; valid: {valid}")
    return canon


def _with_nan(x: Tensor, missing: Tensor) -> Tensor:
    return torch.where(missing.expand_as(x), torch.full((), float("nan"), dtype=x.dtype, device=x.device), x)


def _dataset_arch(dataset: str) -> str:
    key = dataset.lower().replace("_", "-")
    if key in ("mnist", "fashion-mnist"):
        return "mnist"
    if key in ("svhn", "cifar10"):
        return "svhn"
    if key == "celeba":
        return "celeba"
    raise ValueError(f"no WAE architecture for dataset {dataset!r}; known: mnist, fashion-mnist, svhn, cifar10, celeba")


@dataclass
class WAEConfig:
    """Settings of a WAE sweep besides its grid (filled from a profile's ``03_wae`` section).

    ``n_train``/``n_test``: first images of each split (``None``: all). ``mask``: the missing-data
    kind of train and test images (``"square"``: side H/2, 14×14 on MNIST). ``recipe``: ``"authors"``
    (their training loop: one Adam for the three networks, per batch a discriminator step then an
    autoencoder step, discriminator loss weight 0.01, λ = 0.01, MSE averaged over all pixels),
    ``"authors_joint"`` (the same optimiser and weights in one joint step, MSE per observed pixel:
    the committed ``cpu`` rows) or ``"supplement"`` (two Adams, ``lr_disc`` for the discriminator,
    λ = 1, BCE); see :data:`labkit.models.wae.RECIPES`. ``lambda_adv``/``recon``/``lr_disc``: ``None`` = the
    recipe's value. ``precision``: of the WAE's training (:mod:`labkit.precision`).
    ``feature_epochs``/``feature_n_train``: the classifier whose penultimate features the Fréchet
    distances use (trained on complete images), unless ``feature_checkpoint`` names a trained one.
    ``dmfa_complete``/``dmfa_incomplete``/``acflow``: checkpoints the fronts that need them read
    (templates: ``{dataset}``, ``{mask_suffix}``, see :meth:`ImputerConfig.resolve`).
    """

    profile: str = "quick"
    epochs: int = 1
    batch_size: int = 128
    lr: float = 4e-4
    recipe: str = "authors"
    lr_disc: float | None = None
    lambda_adv: float | None = None
    recon: str | None = None
    precision: str = "32"
    n_train: int | None = 500
    n_test: int | None = 100
    mask: str = "square"
    feature_epochs: int = 3
    feature_n_train: int | None = None       # None: the same images as n_train
    feature_checkpoint: str | None = None    # a trained feature classifier (an input), instead of training one
    eval_batch: int = 500
    n_figure: int = 8
    dmfa_complete: str | None = "results/dmfa/cpu/{dataset}_complete.pt"     # {dataset} is filled in
    dmfa_incomplete: str | None = "results/dmfa/cpu/{dataset}_incomplete{mask_suffix}.pt"
    acflow: str | None = "results/acflow/acflow_{dataset}.pt"
    results_dir: str | None = None           # default results/wae/<profile>
    cache_dir: str | None = None             # default: the classification study's cache
    device: Any = None
    progress: bool = True

    def results_path(self) -> Path:
        return Path(self.results_dir) if self.results_dir else paths.results_dir("wae", self.profile)

    def scratch_path(self) -> Path:
        """Git-ignored working files: checkpoints, the feature network, example tensors."""
        return self.results_path() / "_scratch"

    def imputer_config(self) -> ImputerConfig:
        """The settings of the shared preparers (:mod:`labkit.studies.imputers`): this sweep's
        checkpoints, device and cache (default: the classification study's cache)."""
        kw = dict(dmfa_complete=self.dmfa_complete, dmfa_incomplete=self.dmfa_incomplete, acflow=self.acflow,
                  device=self.device, progress=self.progress)
        if self.cache_dir:
            kw["cache_dir"] = self.cache_dir
        return ImputerConfig(**kw)

    def training(self) -> dict[str, Any]:
        """The recipe's settings with this config's overrides (:func:`labkit.models.wae.recipe_settings`)."""
        return recipe_settings(self.recipe, lambda_adv=self.lambda_adv, recon=self.recon, lr_disc=self.lr_disc)

    def check(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch", "feature_epochs", "n_figure"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("n_train", "n_test", "feature_n_train"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
                raise ValueError(f"{name} must be an int >= 2 or None, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        self.training()          # raises for an unknown recipe, a bad recon, lr_disc with the one-optimizer recipe
        self.resolved_precision()

    def resolved_precision(self) -> str:
        """``precision`` resolved for this config's device (``"auto"`` becomes a concrete name)."""
        from labkit.precision import resolve_precision

        return resolve_precision(self.precision, resolve_device(self.device))


def config_from_parameters(namespace: Mapping[str, Any], **given) -> WAEConfig:
    """A :class:`WAEConfig` from a notebook's parameters: the names of ``namespace`` (e.g. ``globals()``
    after the parameters cell) that are its fields, overridden by ``given``; checked."""
    fields = WAEConfig.__dataclass_fields__
    kw = {k: v for k, v in namespace.items() if k in fields and not k.startswith("_")}
    kw.update(given)
    cfg = WAEConfig(**kw)
    cfg.check()
    return cfg


def front_available(front: str, cfg: WAEConfig, dataset: str = "mnist") -> str | None:
    """``None`` if ``front`` can run on ``dataset`` now, else why not (e.g. its DMFA checkpoint does not exist yet)."""
    return method_available(canonical_front(front), cfg.imputer_config(), dataset, cfg.mask)


# --------------------------------------------------------------------------- planning
def _front_inputs(front: str, cfg: WAEConfig, dataset: str) -> dict:
    """Fingerprints of the checkpoint ``front`` reads (:attr:`Method.inputs`), or
    ``{"unavailable": why}`` while it does not exist (the cell waits)."""
    icfg = cfg.imputer_config()
    why = method_available(front, icfg, dataset, cfg.mask)
    return {"unavailable": why} if why else METHODS[front].inputs(icfg, dataset, cfg.mask)


def _feature_data(dataset: str, cfg: WAEConfig, data=None):
    """The cell data whose (complete) training images the feature classifier trains on: the first
    ``feature_n_train`` training images (default: those of the cells, ``data`` when given)."""
    n = cfg.n_train if cfg.feature_n_train is None else cfg.feature_n_train
    if data is not None and n == cfg.n_train:
        return data
    return load_cell_data(dataset, cfg.mask, 0, n_train=n, n_test=cfg.n_test, val_fraction=0.0)


def _feature_spec(dataset: str, cfg: WAEConfig, data) -> tuple[dict, dict]:
    """(settings, inputs) of the feature network: a trained file (an input), or how to train one."""
    if cfg.feature_checkpoint:
        return {}, {"feature_net": engine.input_fingerprint(paths.repo_path(cfg.feature_checkpoint),
                                                            "feature classifier checkpoint")}
    fdata = _feature_data(dataset, cfg, data)
    settings = {"features": {**FEATURE_RECIPE, "epochs": cfg.feature_epochs, "n_train": int(len(fdata.train_images))}}
    inputs = {}
    if fdata is not data:
        inputs["feature_data"] = fingerprint_cell(fdata)["train"]
    return settings, inputs


def plan_cell(dataset: str, front: str, seed: int, cfg: WAEConfig, *, data=None) -> Cell:
    """The :class:`~labkit.studies.engine.Cell` of (dataset, front, seed) under ``cfg``.

    Settings: sizes actually used, mask kind, epochs, batch size, lr, the recipe's settings
    (recipe, λ, discriminator weight, reconstruction loss, ``lr_disc`` for "supplement"),
    precision, the WAE architecture, the feature network's training and the front's imputer
    settings (k-NN, MFA, ACFlow only). Inputs: fingerprints of the training and test images with
    labels, a digest of both splits' masks, the front's checkpoint and a given feature classifier
    (``inputs["unavailable"]`` says why a front's checkpoint is missing). ``data``: the cell data of
    (dataset, seed) if already loaded.
    """
    front = canonical_front(front)
    arch = _dataset_arch(dataset)
    if data is None:
        data = load_cell_data(dataset, cfg.mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=0.0,
                              quiet=True)
    training = cfg.training()
    training.pop("optimizers")               # follows from the recipe
    settings = {"mask": cfg.mask, "n_train": int(len(data.train_images)), "n_test": int(len(data.test_images)),
                "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": float(cfg.lr), **training,
                "precision": cfg.resolved_precision(), "architecture": arch}
    imputer = METHODS[front].settings(cfg.imputer_config())
    if imputer:
        settings["imputer"] = imputer
    fp = fingerprint_cell(data)
    inputs = {"train": fp["train"], "test": fp["test"], "masks": fp["masks"], **_front_inputs(front, cfg, dataset)}
    f_settings, f_inputs = _feature_spec(dataset, cfg, data)
    settings.update(f_settings)
    inputs.update(f_inputs)
    return Cell("wae", {"dataset": dataset, "front": front, "seed": int(seed)}, settings, inputs)


def plan_cells(datasets: Sequence[str] | str, fronts: Sequence[str], seeds: Sequence[int], cfg: WAEConfig) -> list[Cell]:
    """The grid in run order: seeds outermost, so every front has seed 0 before any has seed 1."""
    if isinstance(datasets, str):
        datasets = [datasets]
    cells = []
    for s in seeds:
        for d in datasets:
            data = load_cell_data(d, cfg.mask, s, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=0.0, quiet=True)
            cells += [plan_cell(d, f, s, cfg, data=data) for f in fronts]
    return cells


def result_store(results_dir: str | Path) -> ResultStore:
    """The study's results: ``<results_dir>/metrics.csv`` (one row per cell key) and ``runs.jsonl``.

    ``results_dir`` may also be the path of ``metrics.csv`` itself.
    """
    folder = Path(results_dir)
    if folder.suffix == ".csv":
        folder = folder.parent
    return ResultStore(folder / "metrics.csv", coords=COORDS, metrics=METRIC_COLUMNS, optional=SKIMAGE_COLUMNS,
                       details=folder / "runs.jsonl")


def read_results(results_dir: str | Path):
    """The valid rows of the study's results (:meth:`ResultStore.read`) as a DataFrame."""
    return result_store(results_dir).read()


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_wae(model: WAE, images: Tensor, missing: Tensor, aux_source, *, features, batch_size: int = 500,
                 seed: int = 0, n_examples: int = 8, skimage: bool = True) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Test metrics of a trained WAE against the complete images.

    Args:
        model: the WAE (put in eval mode).
        images: complete test images ``(N, C, H, W)`` (CPU); the model sees them with NaN at
            ``missing`` (bool ``(N, 1, H, W)``) plus ``aux_source.get(idx, x, missing)``.
        features: ``images (n, C, H, W) -> (n, F)`` feature map for the Fréchet distances.
        seed: of the ``N`` prior samples for ``fd_samples`` (drawn :data:`PRIOR_BLOCK` codes at a
            time, so the metrics do not depend on ``batch_size``, the evaluation batch).
        skimage: also compute ``psnr_all_skimage``/``ssim_all_skimage``
            (:func:`labkit.metrics.skimage_psnr_ssim`: scikit-image on the whole image, called as
            the authors did; its float SSIM assumes a data range of 2).

    Returns:
        ``(metrics, examples)``: metrics = means over the test images of per-image PSNR/SSIM over
        the missing region and over the whole image (the raw decoder output, no observed pixels
        pasted back), ``fd_reconstruction`` (reconstructions vs complete images) and ``fd_samples``
        (decoded prior samples vs complete images); examples = the first ``n_examples`` inputs
        (NaN at missing), reconstructions, complete images, masks and prior samples (CPU).
    """
    from labkit.metrics import frechet_distance, psnr, skimage_psnr_ssim, ssim

    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    n = images.shape[0]
    names = ["psnr_missing", "ssim_missing", "psnr_all", "ssim_all"] + (SKIMAGE_COLUMNS if skimage else [])
    per: dict[str, list[Tensor]] = {k: [] for k in names}
    f_rec, f_real, first = [], [], None
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))
        x, j = images[idx].to(dev), missing[idx].to(dev)
        x_in = _with_nan(x, j)
        rec = model(x_in, j, aux_source.get(idx, x_in, j)).float()
        per["psnr_missing"].append(psnr(rec, x, j).cpu())
        per["ssim_missing"].append(ssim(rec, x, j).cpu())
        per["psnr_all"].append(psnr(rec, x).cpu())
        per["ssim_all"].append(ssim(rec, x).cpu())
        if skimage:
            p_sk, s_sk = skimage_psnr_ssim(rec, x)
            per["psnr_all_skimage"].append(p_sk)
            per["ssim_all_skimage"].append(s_sk)
        f_rec.append(features(rec))
        f_real.append(features(x))
        if first is None:
            k = min(n_examples, len(idx))
            first = {"input": x_in[:k].cpu(), "reconstruction": rec[:k].cpu(), "target": x[:k].cpu(),
                     "missing": j[:k].cpu()}
    # The prior codes are drawn PRIOR_BLOCK at a time whatever batch_size is (a generator's stream
    # depends on how it is split into calls), then decoded batch_size at a time: fd_samples does not
    # depend on the evaluation batch, and equals what the committed rows (batch 500) drew.
    g = torch.Generator().manual_seed(int(seed))
    codes = torch.cat([model.prior_sample(min(PRIOR_BLOCK, n - s), generator=g) for s in range(0, n, PRIOR_BLOCK)])
    f_smp, shown = [], []
    for s in range(0, n, batch_size):
        smp = model.decode(codes[s:s + batch_size]).float()
        f_smp.append(features(smp))
        if sum(len(t) for t in shown) < max(n_examples, 16):
            shown.append(smp[:max(n_examples, 16)].cpu())
    samples = torch.cat(shown)[:max(n_examples, 16)]
    model.train(was)
    metrics: dict[str, float] = {}
    for k, v in per.items():
        v = torch.cat(v)
        # nanmean: an image whose region has no SSIM window centre gives NaN (see labkit.metrics);
        # an image decoded perfectly has an infinite PSNR: such values are left out of the mean
        metrics[k] = float(v[torch.isfinite(v)].mean()) if bool(torch.isfinite(v).any()) else float("nan")
    real = torch.cat(f_real)
    metrics["fd_reconstruction"] = frechet_distance(torch.cat(f_rec), real)
    metrics["fd_samples"] = frechet_distance(torch.cat(f_smp), real)
    first["samples"] = samples
    return metrics, first


# --------------------------------------------------------------------------- one cell
def cell_stem(cell: Cell) -> str:
    """File stem of a cell's working files and figures: ``<dataset>-<front>-s<seed>-<key[:8]>``."""
    c = cell.coords
    return f"{c['dataset']}-{c['front']}-s{int(c['seed'])}-{cell.key[:8]}"


def _check_inputs_unchanged(cell: Cell, cfg: WAEConfig) -> None:
    """The checkpoints the cell reads must be those it was planned with (a file retrained since gets
    another key: the cell must be planned again, not run under the old key)."""
    front, dataset = cell.coords["front"], cell.coords["dataset"]
    if "unavailable" in cell.inputs:
        raise InputError(f"front {front!r} was planned without its checkpoint ({cell.inputs['unavailable']}); "
                         "run the sweep again")
    now = _front_inputs(front, cfg, dataset)
    for name, planned in cell.inputs.items():
        if name in ("dmfa", "acflow") and now.get(name) != planned:
            raise InputError(f"{planned['role']} {planned['file']} changed since the sweep was planned (planned sha "
                             f"{planned['sha']}, now {now.get(name, {}).get('sha')}); run the sweep again")
    if cfg.feature_checkpoint:
        fp = engine.input_fingerprint(paths.repo_path(cfg.feature_checkpoint), "feature classifier checkpoint")
        if fp != cell.inputs.get("feature_net"):
            raise InputError(f"feature classifier checkpoint {fp['file']} changed since the sweep was planned")


def run_cell(cell: Cell, cfg: WAEConfig, *, features=None, figures: bool = True) -> dict:
    """Train and test one planned cell (:func:`plan_cell`); return ``{"metrics", "details"}``.

    Training: the first ``cfg.n_train`` training images, each with its fixed mask
    (:func:`labkit.studies.cells.cell_masks`, shared with the classification study), NaN at missing
    pixels; the reconstruction loss counts observed pixels only, except for the ground-truth front
    (complete images in, all pixels counted; in the ``"authors"`` recipe its loss too counts the
    observed pixels only, as in their code). The recipe (``cfg.recipe``) chooses the optimizers,
    the step and the losses (:data:`labkit.models.wae.RECIPES`). Resumable: :func:`labkit.training.fit`
    checkpoints every epoch to ``<scratch>/checkpoints/<stem>.partial.pt`` (:func:`cell_stem`: the
    key is in the name). ``features``: the feature map of the Fréchet distances (default:
    :func:`feature_network`'s penultimate layer).

    Writes (besides the result row, which the sweep's driver records): the model and example
    tensors ``<scratch>/models/<stem>.pt`` and, with ``figures``, ``figures/<stem>-reconstruction.png``
    and ``figures/<stem>-samples.png`` (one set, :func:`labkit.studies.engine.write_files`).
    """
    from labkit.checkpoint import atomic_save
    from labkit.machine import machine_summary
    from labkit.training import fit
    from labkit.precision import grad_scaler, resolve_precision

    cfg.check()
    dataset, front, seed = cell.coords["dataset"], cell.coords["front"], int(cell.coords["seed"])
    why = front_available(front, cfg, dataset)
    if why:
        raise InputError(f"front {front!r} cannot run: {why}")
    _check_inputs_unchanged(cell, cfg)
    dev = resolve_device(cfg.device)
    t0 = time.perf_counter()
    data = load_cell_data(dataset, cfg.mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=0.0,
                          quiet=not cfg.progress)
    aux_train, aux_test, info = METHODS[front].prepare(data, cfg.imputer_config())
    fmeta = None
    if features is None:
        fnet, fmeta = feature_network(dataset, cfg)
        features = _feature_map(fnet, cfg.eval_batch)
    t_prep = time.perf_counter() - t0

    torch.manual_seed(_stable_seed("wae-init", dataset, front, seed))
    model = WAE(front, _dataset_arch(dataset), device=dev)
    if tuple(data.train_images.shape[1:]) != model.image_shape:
        raise ValueError(f"{dataset} images have shape {tuple(data.train_images.shape[1:])} but the WAE expects "
                         f"{model.image_shape}")
    training = cfg.training()
    procedure = recipe_procedure(cfg.recipe)
    optimizers = make_optimizers(model, cfg.lr, training.get("lr_disc"), recipe=cfg.recipe)
    # the ceiling: complete images in and, unless the recipe counts observed pixels for every front
    # (the authors' loop does), every pixel in the loss
    gt_all = front == "gt" and procedure["gt_counted"] == "all"
    n = len(data.train_images)
    # the partial checkpoint belongs to this cell only: resuming it under another key is refused by fit
    run_config = {"cell": cell.key, "architecture": model.architecture}
    precision = resolve_precision(cell.settings.get("precision", "32"), dev)
    scaler = grad_scaler(precision, dev)   # a pass-through except for 16-mixed

    def batches(epoch, g):
        order = torch.randperm(n, generator=g)
        return [order[s:s + cfg.batch_size] for s in range(0, n, cfg.batch_size)]

    def step(idx, epoch, g):
        x, j = data.train_images[idx].to(dev), data.train_missing[idx].to(dev)
        x_in = _with_nan(x, j)
        aux = aux_train.get(idx, x_in, j)
        if gt_all:
            target, counted = x, torch.ones_like(j)
        else:    # the loss never sees a missing pixel
            target, counted = x_in, ~j
        return train_step(model, optimizers, x_in, j, aux, target=target, counted=counted, generator=g,
                          lambda_adv=training["lambda_adv"], recon=training["recon"],
                          disc_weight=training["disc_weight"], precision=precision, scaler=scaler,
                          step=procedure["step"], recon_average=procedure["recon_average"])

    stem = cell_stem(cell)
    ckpt = cfg.scratch_path() / "checkpoints" / f"{stem}.partial.pt"
    t1 = time.perf_counter()
    history = fit(model, optimizers, batches, step, epochs=cfg.epochs, checkpoint=ckpt, seed=seed,
                  desc=f"WAE {front} s{seed}", progress=cfg.progress, config=run_config,
                  precision=precision, scaler=scaler)
    t_train = time.perf_counter() - t1
    metrics, examples = evaluate_wae(model, data.test_images, data.test_missing, aux_test, features=features,
                                     batch_size=cfg.eval_batch, seed=_stable_seed("wae-prior", dataset, seed),
                                     n_examples=cfg.n_figure)
    # Model weights (no optimizer state) and the example tensors, for re-plotting without retraining.
    atomic_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "key": cell.key,
                 "settings": engine.canonical(cell.settings), "examples": examples},
                cfg.scratch_path() / "models" / f"{stem}.pt")
    if figures:
        _write_cell_figures(cell, examples, cfg.results_path())
    ckpt.unlink(missing_ok=True)
    details = {"settings": engine.canonical(cell.settings), "prepare_seconds": round(t_prep, 1),
               "train_seconds": round(t_train, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
               "machine": machine_summary(), "device": str(dev), "profile": cfg.profile, "data": data.sources,
               "fd": FD_NAME, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
               "history": [{k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in h.items()}
                           for h in history], **info}
    if fmeta is not None:
        details["feature_net"] = fmeta
    return {"metrics": {k: round(float(v), 5) for k, v in metrics.items()}, "details": details}


def _write_cell_figures(cell: Cell, examples: Mapping[str, Tensor], results_dir: Path) -> None:
    """The reconstruction and prior-sample figures of a cell, written as one set."""
    import matplotlib.pyplot as plt

    c = cell.coords
    label = f"{c['dataset']}, {c['front']}, seed {c['seed']}"
    figs = {"reconstruction": plot_reconstructions(examples, title=label),
            "samples": plot_samples(examples["samples"], title=f"{label}: prior samples")}
    folder = results_dir / "figures"
    try:
        engine.write_files({folder / f"{cell_stem(cell)}-{name}.png":
                            functools.partial(lambda fig, p: fig.savefig(p, format="png", dpi=100), fig)
                            for name, fig in figs.items()})
    finally:
        for fig in figs.values():
            plt.close(fig)


def _cell_job(cfg: WAEConfig, cell: Cell) -> dict:
    """What the engine runs for a cell (module level, so that executors can pickle it with ``cfg``)."""
    return run_cell(cell, cfg)


# --------------------------------------------------------------------------- the sweep
def _config(profile: str, config: WAEConfig | None, overrides: Mapping[str, Any]) -> WAEConfig:
    cfg = replace(config) if config is not None else WAEConfig(profile=profile)
    cfg.profile = profile
    for k, v in overrides.items():
        if k not in WAEConfig.__dataclass_fields__:
            raise ValueError(f"unknown WAE setting {k!r}; valid: {', '.join(WAEConfig.__dataclass_fields__)}")
        setattr(cfg, k, v)
    cfg.check()
    return cfg


def run_sweep(datasets: Sequence[str] | str, fronts: Sequence[str], seeds: Sequence[int], profile: str = "quick", *,
              config: WAEConfig | None = None, wait: bool = False, poll_seconds: float = 300.0,
              max_cells: int | None = None, executor=None, cell_fn=None, **overrides):
    """Run every planned cell (:func:`plan_cells`) whose key is not yet in ``<results_dir>/metrics.csv``.

    The engine (:func:`labkit.studies.engine.run_cells`) records each finished cell at once (its
    settings and input fingerprints beside its metrics; details in ``runs.jsonl``); a rerun skips
    done cells, and an interrupted cell resumes from its last finished epoch. Fronts whose
    checkpoint (DMFA, ACFlow) does not exist yet wait: they are left for a later run, or waited for
    with ``wait=True`` (the cells are planned again once it appears: its fingerprint is part of the
    key). A failing cell is reported and the others run; at the end :class:`SweepFailed` lists the
    failures.

    ``overrides`` replace :class:`WAEConfig` fields (epochs, n_train, device, ...); ``executor``:
    where cells run (default: one after another here); ``cell_fn(cfg, cell) -> {"metrics",
    "details"}`` replaces :func:`run_cell` (tests). Returns the rows of the planned cells.
    """
    cfg = _config(profile, config, overrides)
    if isinstance(datasets, str):
        datasets = [datasets]
    for d in datasets:
        _dataset_arch(d)
    fronts = [canonical_front(f) for f in fronts]
    store = result_store(cfg.results_path())
    fn = functools.partial(cell_fn or _cell_job, cfg)
    failed: dict[str, engine.CellOutcome] = {}
    budget = max_cells
    while True:
        cells = plan_cells(datasets, fronts, seeds, cfg)
        outcomes = engine.run_cells(
            cells, fn, store, executor=executor, max_cells=budget, raise_on_failure=False,
            available=lambda c: front_available(c.coords["front"], cfg, c.coords["dataset"]))
        for o in outcomes:
            if o.status == "failed":
                failed[o.cell.key] = o
        if budget is not None:
            budget -= sum(o.status in ("ran", "failed") for o in outcomes)
        waiting = [o for o in outcomes if o.status == "waiting"]
        if not waiting or not wait or (budget is not None and budget <= 0):
            break
        time.sleep(poll_seconds)
    if budget is None or budget > 0:
        outcomes = engine.retry_held(outcomes, fn, store, executor=executor)
    failed.update({o.cell.key: o for o in outcomes if o.status == "failed"})
    unfinished = engine.held_unfinished(outcomes)
    if unfinished:
        print(f"[wae] {engine.unfinished_text(unfinished)}", flush=True)
    if failed or unfinished:
        raise engine.SweepIncomplete(list(failed.values()), unfinished)
    df = store.read()
    return df[df["key"].isin([c.key for c in cells])].reset_index(drop=True)


# --------------------------------------------------------------------------- the joint step's rename
#: recipe names rows may carry from before a rename -> (their name now, the marker of the new
#: recipe's settings that such rows lack): the joint step was called "authors" until the authors'
#: alternating step took the name
RENAMED_RECIPES = {"authors": ("authors_joint", "step")}


def migrate_renamed_recipes(results_dir: str | Path, *, dry_run: bool = False) -> list[tuple[str, str]]:
    """Rename the recipe of rows made under its old name (:data:`RENAMED_RECIPES`), with their keys.

    A row of ``<results_dir>/metrics.csv`` whose settings say recipe "authors" without a ``step``
    was made with the joint step (now ``"authors_joint"``): its settings get the new name and its key
    is recomputed from coordinates, new settings and inputs (the key of the same cell planned with
    ``recipe="authors_joint"``). Its ``runs.jsonl`` record gets the new key and settings and a
    ``recipe_renamed`` note; its figures ``figures/<stem>-*.png`` and working files
    ``_scratch/models/<stem>.pt`` (:func:`cell_stem`) move to the new stem. The CSV and the JSONL
    are written as one set. Every other row and line stays byte for byte. A row whose stored key
    is not the digest of its stored coordinates, settings and inputs is refused (``ValueError``):
    its key cannot be carried over. Returns ``[(old key, new key), ...]`` (nothing written with
    ``dry_run``); a second run finds nothing to do.
    """
    import csv
    import io
    import json

    from labkit.checkpoint import atomic_save, load_checkpoint

    store = result_store(results_dir)
    folder = store.path.parent
    if not store.path.exists():
        return []
    with engine.locked(store.path):
        engine.recover(folder)
        text = store.path.read_text(encoding="utf-8")
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames != store.columns:
            raise ValueError(f"{store.path}: header {reader.fieldnames} is not the WAE study's {store.columns}")
        rows = list(reader)
        renames: dict[str, tuple[str, dict, dict]] = {}
        for row in rows:
            settings = json.loads(row["settings"])
            old_name = settings.get("recipe")
            if old_name not in RENAMED_RECIPES or RENAMED_RECIPES[old_name][1] in settings:
                continue
            coords = {"dataset": row["dataset"], "front": row["front"], "seed": int(row["seed"])}
            inputs = json.loads(row["inputs"])
            if Cell("wae", coords, settings, inputs).key != row["key"]:
                raise ValueError(f"{store.path}: row {row['key']} ({coords}) has a key that is not the digest of its "
                                 "stored coordinates, settings and inputs: it cannot be renamed safely")
            new_settings = {**settings, "recipe": RENAMED_RECIPES[old_name][0]}
            new_key = Cell("wae", coords, new_settings, inputs).key
            renames[row["key"]] = (new_key, new_settings, coords)
            row["key"], row["settings"] = new_key, _settings_json(new_settings)
        if not renames or dry_run:
            return [(old, new) for old, (new, _, _) in renames.items()]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=store.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        files = {store.path: out.getvalue()}
        if store.details is not None and store.details.exists():
            lines = store.details.read_text(encoding="utf-8").splitlines(keepends=True)
            for i, line in enumerate(lines):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(rec, dict) or rec.get("key") not in renames:
                    continue
                new_key, new_settings, _ = renames[rec["key"]]
                rec.update(key=new_key, recipe_renamed={"from": rec.get("settings", {}).get("recipe", "authors"),
                                                        "to": new_settings["recipe"], "old_key": rec["key"]})
                if "settings" in rec:
                    rec["settings"] = engine.canonical(new_settings)
                lines[i] = json.dumps(rec, sort_keys=True) + ("\n" if line.endswith("\n") else "")
            files[store.details] = "".join(lines)
        engine.write_files(files)
    for old_key, (new_key, new_settings, coords) in renames.items():
        stem = f"{coords['dataset']}-{coords['front']}-s{coords['seed']}"
        for what in ("reconstruction", "samples"):
            old_fig = folder / "figures" / f"{stem}-{old_key[:8]}-{what}.png"
            if old_fig.exists():
                old_fig.replace(folder / "figures" / f"{stem}-{new_key[:8]}-{what}.png")
        old_model = folder / "_scratch" / "models" / f"{stem}-{old_key[:8]}.pt"
        if old_model.exists():
            stored = load_checkpoint(old_model, map_location="cpu")
            stored.update(key=new_key, settings=engine.canonical(new_settings))
            atomic_save(stored, folder / "_scratch" / "models" / f"{stem}-{new_key[:8]}.pt")
            old_model.unlink()
    return [(old, new) for old, (new, _, _) in renames.items()]


def _settings_json(obj: Any) -> str:
    """``obj`` as the canonical JSON the store writes in its ``settings``/``inputs`` columns."""
    from labkit.studies.engine_keys import _dumps

    return _dumps(obj)


def load_examples(cell: Cell, cfg: WAEConfig) -> dict[str, Tensor] | None:
    """The example tensors saved by :func:`run_cell` for a finished cell (``None`` if absent)."""
    from labkit.checkpoint import load_checkpoint

    path = cfg.scratch_path() / "models" / f"{cell_stem(cell)}.pt"
    stored = load_checkpoint(path, map_location="cpu") if path.exists() else None
    return None if stored is None else stored["examples"]
