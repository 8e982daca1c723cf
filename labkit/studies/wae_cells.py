r"""One cell of the WAE study (:mod:`labkit.studies.wae`): train a WAE on incomplete images, score it.

A cell = (dataset, front, seed) under a :class:`~labkit.studies.configs.WAEConfig`. Here: the
config read for one cell (:func:`canonical_front`, :func:`dataset_arch`, :func:`training_settings`,
:func:`imputer_config`, whether a front can run now and the checkpoint it reads), the test metrics
(:func:`evaluate_wae`) and the run of a planned cell (:func:`run_cell`). Planning the grid and
running the sweep is :mod:`labkit.studies.wae`'s.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from labkit import paths
from labkit.checkpoint import atomic_save
from labkit.machine import machine_summary
from labkit.device import resolve_device
from labkit.metrics import frechet_distance, psnr, skimage_psnr_ssim, ssim
from labkit.models.wae import WAE, recipe_procedure, recipe_settings
from labkit.models.wae_training import make_optimizers, train_step
from labkit.precision import grad_scaler, resolve_precision
from labkit.studies import engine
from labkit.masks import with_nan
from labkit.studies.cells import load_cell_data, stable_seed
from labkit.studies.configs import FRONT_ALIASES
from labkit.studies.engine import Cell, InputError
from labkit.studies.imputers import METHODS, ImputerSettings, imputer_settings, method_available
from labkit.studies.wae_features import feature_map, feature_network
from labkit.studies.wae_report import (FD_NAME, SKIMAGE_COLUMNS, cell_stem, plot_reconstructions, plot_samples,
                                       results_path, scratch_path)
from labkit.training import fit

__all__ = ["PRIOR_BLOCK", "canonical_front", "check_inputs_unchanged", "dataset_arch", "evaluate_wae",
           "front_available", "front_inputs", "imputer_config", "resolved", "run_cell", "training_settings"]

#: prior codes of ``fd_samples`` are drawn this many at a time from the seeded generator, whatever the
#: evaluation batch (``eval_batch``, not part of a cell's key) is: the committed rows drew them so
PRIOR_BLOCK = 500


def canonical_front(name: str) -> str:
    """A front's method name in :data:`labkit.studies.imputers.METHODS` (``"misconv"`` -> ``"dmfa_misconv_complete"``)."""
    if not isinstance(name, str):
        raise TypeError(f"front must be a method name, got {type(name).__name__}")
    canon = FRONT_ALIASES.get(name, name)
    if canon not in METHODS:
        valid = ", ".join(list(METHODS) + list(FRONT_ALIASES))
        raise ValueError(f"unknown front {name!r}; valid: {valid}")
    return canon


def dataset_arch(dataset: str) -> str:
    """The WAE architecture of a data set (:data:`labkit.models.wae.ARCHITECTURES`)."""
    key = dataset.lower().replace("_", "-")
    if key in ("mnist", "fashion-mnist"):
        return "mnist"
    if key in ("svhn", "cifar10"):
        return "svhn"
    if key == "celeba":
        return "celeba"
    raise ValueError(f"no WAE architecture for dataset {dataset!r}; known: mnist, fashion-mnist, svhn, cifar10, celeba")


def resolved(cfg):
    """``cfg`` with its precision resolved for its device (``"auto"`` -> ``"bf16-mixed"`` or ``"32"``): the
    name cells record and train with. The device stays as given: ``"auto"`` is resolved where a cell
    runs (an executor places such a cell on whatever its cluster has)."""
    precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    return cfg if precision == cfg.precision else cfg.replace(precision=precision)


def training_settings(cfg) -> dict[str, Any]:
    """The recipe's settings with the config's overrides (:func:`labkit.models.wae.recipe_settings`)."""
    return recipe_settings(cfg.recipe, lambda_adv=cfg.lambda_adv, recon=cfg.recon, lr_disc=cfg.lr_disc)


def imputer_config(cfg, *, progress: bool = True) -> ImputerSettings:
    """The settings of the shared preparers (:func:`labkit.studies.imputers.imputer_settings`): the
    config's checkpoints, k-NN, MFA and ACFlow settings, device and cache (default: the
    classification study's cache). What enters a cell's key from here is ``METHODS[front].settings(...)``."""
    return imputer_settings(cfg, progress=progress)


def front_available(front: str, cfg, dataset: str | None = None) -> str | None:
    """``None`` if ``front`` can run on ``dataset`` (default ``cfg.dataset``) now, else why not (e.g. its
    DMFA checkpoint does not exist yet)."""
    return method_available(canonical_front(front), imputer_config(cfg), dataset or cfg.dataset, cfg.mask)


def front_inputs(front: str, cfg, dataset: str) -> dict:
    """Fingerprints of the checkpoint ``front`` reads (:attr:`Method.inputs`), or
    ``{"unavailable": why}`` while it does not exist (the cell waits)."""
    icfg = imputer_config(cfg)
    why = method_available(front, icfg, dataset, cfg.mask)
    return {"unavailable": why} if why else METHODS[front].inputs(icfg, dataset, cfg.mask)


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
        x_in = with_nan(x, j)
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
def check_inputs_unchanged(cell: Cell, cfg) -> None:
    """The checkpoints the cell reads must be those it was planned with (a file retrained since gets
    another key: the cell must be planned again, not run under the old key)."""
    front, dataset = cell.coords["front"], cell.coords["dataset"]
    if "unavailable" in cell.inputs:
        raise InputError(f"front {front!r} was planned without its checkpoint ({cell.inputs['unavailable']}); "
                         "run the sweep again")
    now = front_inputs(front, cfg, dataset)
    for name, planned in cell.inputs.items():
        if name in ("dmfa", "acflow") and now.get(name) != planned:
            raise InputError(f"{planned['role']} {planned['file']} changed since the sweep was planned (planned sha "
                             f"{planned['sha']}, now {now.get(name, {}).get('sha')}); run the sweep again")
    if cfg.feature_checkpoint:
        fp = engine.input_fingerprint(paths.repo_path(cfg.feature_checkpoint), "feature classifier checkpoint")
        if fp != cell.inputs.get("feature_net"):
            raise InputError(f"feature classifier checkpoint {fp['file']} changed since the sweep was planned")


def run_cell(cell: Cell, cfg, *, features=None, figures: bool = True, progress: bool = True) -> dict:
    """Train and test one planned cell (:func:`labkit.studies.wae.plan_cell`); return ``{"metrics", "details"}``.

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
    dataset, front, seed = cell.coords["dataset"], cell.coords["front"], int(cell.coords["seed"])
    why = front_available(front, cfg, dataset)
    if why:
        raise InputError(f"front {front!r} cannot run: {why}")
    check_inputs_unchanged(cell, cfg)
    dev = resolve_device(cfg.device)
    t0 = time.perf_counter()
    data = load_cell_data(dataset, cfg.mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=0.0,
                          quiet=not progress)
    aux_train, aux_test, info = METHODS[front].prepare(data, imputer_config(cfg, progress=progress))
    fmeta = None
    if features is None:
        fnet, fmeta = feature_network(dataset, cfg, progress=progress)
        features = feature_map(fnet, cfg.eval_batch)
    t_prep = time.perf_counter() - t0

    torch.manual_seed(stable_seed("wae-init", dataset, front, seed))
    model = WAE(front, dataset_arch(dataset), device=dev)
    if tuple(data.train_images.shape[1:]) != model.image_shape:
        raise ValueError(f"{dataset} images have shape {tuple(data.train_images.shape[1:])} but the WAE expects "
                         f"{model.image_shape}")
    training = training_settings(cfg)
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
        x_in = with_nan(x, j)
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
    ckpt = scratch_path(cfg) / "checkpoints" / f"{stem}.partial.pt"
    t1 = time.perf_counter()
    history = fit(model, optimizers, batches, step, epochs=cfg.epochs, checkpoint=ckpt, seed=seed,
                  desc=f"WAE {front} s{seed}", progress=progress, config=run_config,
                  precision=precision, scaler=scaler)
    t_train = time.perf_counter() - t1
    metrics, examples = evaluate_wae(model, data.test_images, data.test_missing, aux_test, features=features,
                                     batch_size=cfg.eval_batch, seed=stable_seed("wae-prior", dataset, seed),
                                     n_examples=cfg.n_figure)
    # Model weights (no optimizer state) and the example tensors, for re-plotting without retraining.
    atomic_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "key": cell.key,
                 "settings": engine.canonical(cell.settings), "examples": examples},
                scratch_path(cfg) / "models" / f"{stem}.pt")
    if figures:
        _write_cell_figures(cell, examples, results_path(cfg))
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


