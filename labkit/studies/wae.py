r"""The WAE study (notebook 03, ``scripts/run_wae.py``): WAE-GANs trained on incomplete images.

One *cell* = (dataset, front, seed): a :class:`labkit.models.wae.WAE` whose encoder starts with the
front is trained on incomplete images and scored on the complete test images. The data, the fixed
per-image masks (:mod:`labkit.studies.cells`) and the fronts' auxiliaries (imputations, per-image
MFAs: :mod:`labkit.studies.imputers`) are those of the classification study: same masks, same
on-disk caches.

:func:`run_cell` trains and scores one cell, :func:`run_sweep` runs a resumable grid into
``results/wae/<profile>/metrics.csv`` (columns :data:`WAE_COLUMNS`) with figures, and
:func:`summary_table` / :func:`table_markdown` / :func:`plot_metrics` report it next to the authors'
numbers (:data:`AUTHORS_WAE_MNIST`). Metrics (:mod:`labkit.metrics`): PSNR and SSIM over the missing
region and the whole image, and Fréchet distances between features of the lab's own classifier
(:func:`feature_network`; :data:`FD_NAME`), since no Inception weights can be downloaded here.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from labkit import paths
from labkit.device import resolve_device
from labkit.models.classifier import build_classifier, evaluate_accuracy, train_classifier
from labkit.models.wae import WAE, make_optimizers, train_step
from labkit.studies.cells import _stable_seed, load_cell_data
from labkit.studies.imputers import METHODS, ImputerConfig, TensorAux, method_available
from labkit.sweeps import append_csv_row, append_jsonl, read_table

__all__ = [
    "AUTHORS_WAE_MNIST",
    "FD_NAME",
    "FRONT_ALIASES",
    "METRIC_COLUMNS",
    "WAE_COLUMNS",
    "WAEConfig",
    "canonical_front",
    "classifier_features",
    "evaluate_wae",
    "feature_network",
    "front_available",
    "load_examples",
    "plan_cells",
    "plot_front_grid",
    "plot_metrics",
    "plot_reconstructions",
    "plot_samples",
    "read_results",
    "run_cell",
    "run_sweep",
    "summary_table",
    "table_markdown",
]

METRIC_COLUMNS = ["psnr_missing", "ssim_missing", "psnr_all", "ssim_all", "fd_reconstruction", "fd_samples"]
WAE_COLUMNS = ["dataset", "front", "seed", *METRIC_COLUMNS, "epochs", "n_train", "n_test"]

#: short names accepted for the study's fronts (the CSV records the canonical method name)
FRONT_ALIASES = {"dmfa_mean": "dmfa_mean_complete", "misconv": "dmfa_misconv_complete"}
#: display order and labels
FRONT_ORDER = ["gt", "zero", "mask", "knn", "pc", "mfa_mean", "mfa_misconv", "dmfa_mean_complete",
               "dmfa_misconv_complete", "dmfa_mean_incomplete", "dmfa_misconv_incomplete", "acflow"]

#: the authors' public code, MNIST WAE at epoch 20 (validation): front -> (PSNR, SSIM).
#: Their PSNR/SSIM are scikit-image's on the whole decoded image (SSIM with its
#: default 7×7 uniform window); which DMFA (complete- or incomplete-data) they used is not stated:
#: we show their numbers beside our complete-data DMFA fronts.
AUTHORS_WAE_MNIST = {
    "gt": (20.72, 0.908),
    "dmfa_mean_complete": (15.85, 0.750),
    "dmfa_misconv_complete": (15.14, 0.714),
    "zero": (14.90, 0.707),
    "pc": (13.68, 0.628),
}

FD_NAME = "FD (lab classifier features)"


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
    kind of train and test images (``"square"``: side H/2, 14×14 on MNIST). ``lambda_adv``: weight
    of the adversarial term; ``recon``: ``"bce"`` or ``"mse"``. ``feature_epochs``/``feature_n_train``:
    the classifier whose penultimate features the Fréchet distances use (trained on complete images).
    ``dmfa_complete``/``dmfa_incomplete``/``acflow``: checkpoints the fronts that need them read.
    """

    profile: str = "quick"
    epochs: int = 1
    batch_size: int = 128
    lr: float = 4e-4
    lr_disc: float = 4e-6
    lambda_adv: float = 1.0
    recon: str = "bce"
    n_train: int | None = 500
    n_test: int | None = 100
    mask: str = "square"
    feature_epochs: int = 3
    feature_n_train: int | None = None       # None: the same images as n_train
    eval_batch: int = 500
    n_figure: int = 8
    dmfa_complete: str | None = "results/dmfa/cpu/{dataset}_complete.pt"     # {dataset} is filled in
    dmfa_incomplete: str | None = "results/dmfa/cpu/{dataset}_incomplete.pt"
    acflow: str | None = "results/acflow/acflow.pt"
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

    def check(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch", "feature_epochs", "n_figure"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("n_train", "n_test", "feature_n_train"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
                raise ValueError(f"{name} must be an int >= 2 or None, got {v!r}")
        if self.recon not in ("bce", "mse"):
            raise ValueError(f"recon must be 'bce' or 'mse', got {self.recon!r}")


def front_available(front: str, cfg: WAEConfig, dataset: str = "mnist") -> str | None:
    """``None`` if ``front`` can run on ``dataset`` now, else why not (e.g. its DMFA checkpoint does not exist yet)."""
    return method_available(canonical_front(front), cfg.imputer_config(), dataset)


# --------------------------------------------------------------------------- feature network
def classifier_features(model: nn.Module, images: Tensor, *, batch_size: int = 500) -> Tensor:
    """Penultimate-layer features ``(N, F)`` (the input of the last linear layer) of a
    :class:`labkit.models.classifier.Classifier` with a ground-truth front, for complete ``images (N, C, H, W)``."""
    body = model.body
    if not isinstance(body[-1], nn.Linear):
        raise TypeError(f"the classifier's body must end with its output nn.Linear, got {type(body[-1]).__name__}")
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            x = images[s:s + batch_size].to(dev, torch.float32)
            none = torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=torch.bool, device=dev)
            out.append(body[:-1](model.front(x, none, x)).cpu())
    model.train(was)
    return torch.cat(out)


def _feature_map(model: nn.Module, batch_size: int):
    """``images -> features`` with the classifier ``model`` (see :func:`classifier_features`)."""
    def features(images: Tensor) -> Tensor:
        return classifier_features(model, images, batch_size=batch_size)
    return features


def feature_network(dataset: str, cfg: WAEConfig):
    """The lab's feature network for the Fréchet distances: the classification study's classifier
    with the ground-truth front, trained on complete training images (Adam 1e-3, batch 24,
    ``cfg.feature_epochs`` epochs), loaded from ``<scratch>/feature-net-<dataset>.pt`` if trained
    before. Returns ``(classifier, meta)``; ``meta["test_accuracy"]`` is on the complete test images.
    """
    from labkit.checkpoint import load_or_train

    dev = resolve_device(cfg.device)
    n_train = cfg.feature_n_train if cfg.feature_n_train is not None else cfg.n_train
    data = load_cell_data(dataset, cfg.mask, 0, n_train=n_train, n_test=cfg.n_test, val_fraction=0.0)
    C, H = data.train_images.shape[1], data.train_images.shape[2]
    arch = data.arch
    path = cfg.scratch_path() / f"feature-net-{dataset}-n{len(data.train_images)}-e{cfg.feature_epochs}.pt"

    def build():
        torch.manual_seed(12345)
        return build_classifier(arch, "gt", in_channels=C, image_size=H)

    def train(model):
        model.to(dev)
        aux = TensorAux(data.train_images)
        train_classifier(model, data, aux, epochs=cfg.feature_epochs, batch_size=24, lr=1e-3, seed=0,
                         select="last", device=dev, progress=cfg.progress)
        none = torch.zeros_like(data.test_missing)
        acc = evaluate_accuracy(model, data.test_images, data.test_labels, none, TensorAux(data.test_images),
                                batch_size=cfg.eval_batch)
        return {"dataset": dataset, "arch": arch, "n_train": len(data.train_images), "epochs": cfg.feature_epochs,
                "test_accuracy": round(acc, 4), "n_test": len(data.test_images),
                "features": "input of the last linear layer (lin20 after ReLU)"}

    return load_or_train(path, build, train, device=dev, quiet=not cfg.progress)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_wae(model: WAE, images: Tensor, missing: Tensor, aux_source, *, features, batch_size: int = 500,
                 seed: int = 0, n_examples: int = 8) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Test metrics of a trained WAE against the complete images.

    Args:
        model: the WAE (put in eval mode).
        images: complete test images ``(N, C, H, W)`` (CPU); the model sees them with NaN at
            ``missing`` (bool ``(N, 1, H, W)``) plus ``aux_source.get(idx, x, missing)``.
        features: ``images (n, C, H, W) -> (n, F)`` feature map for the Fréchet distances.
        seed: of the ``N`` prior samples for ``fd_samples``.

    Returns:
        ``(metrics, examples)``: metrics = means over the test images of per-image PSNR/SSIM over
        the missing region and over the whole image (the raw decoder output, no observed pixels
        pasted back), ``fd_reconstruction`` (reconstructions vs complete images) and ``fd_samples``
        (decoded prior samples vs complete images); examples = the first ``n_examples`` inputs
        (NaN at missing), reconstructions, complete images, masks and prior samples (CPU).
    """
    from labkit.metrics import frechet_distance, psnr, ssim

    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    n = images.shape[0]
    per: dict[str, list[Tensor]] = {k: [] for k in ("psnr_missing", "ssim_missing", "psnr_all", "ssim_all")}
    f_rec, f_real, first = [], [], None
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))
        x, j = images[idx].to(dev), missing[idx].to(dev)
        x_in = _with_nan(x, j)
        rec = model(x_in, j, aux_source.get(idx, x_in, j))
        per["psnr_missing"].append(psnr(rec, x, j).cpu())
        per["ssim_missing"].append(ssim(rec, x, j).cpu())
        per["psnr_all"].append(psnr(rec, x).cpu())
        per["ssim_all"].append(ssim(rec, x).cpu())
        f_rec.append(features(rec))
        f_real.append(features(x))
        if first is None:
            k = min(n_examples, len(idx))
            first = {"input": x_in[:k].cpu(), "reconstruction": rec[:k].cpu(), "target": x[:k].cpu(),
                     "missing": j[:k].cpu()}
    g = torch.Generator().manual_seed(int(seed))
    f_smp, samples = [], None
    for s in range(0, n, batch_size):
        smp = model.sample(min(batch_size, n - s), generator=g)
        f_smp.append(features(smp))
        if samples is None:
            samples = smp[:max(n_examples, 16)].cpu()
    model.train(was)
    metrics: dict[str, float] = {}
    for k, v in per.items():
        v = torch.cat(v)
        # nanmean: an image whose region has no SSIM window centre gives NaN (see labkit.metrics)
        metrics[k] = float(v[torch.isfinite(v)].mean()) if bool(torch.isfinite(v).any()) else float("nan")
    real = torch.cat(f_real)
    metrics["fd_reconstruction"] = frechet_distance(torch.cat(f_rec), real)
    metrics["fd_samples"] = frechet_distance(torch.cat(f_smp), real)
    first["samples"] = samples
    return metrics, first


# --------------------------------------------------------------------------- figures
def _to_rgb(img: Tensor, missing: Tensor | None = None) -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> ``(H, W, 3)`` numpy; missing pixels shown in a muted red."""
    x = img.detach().float().cpu()
    if x.shape[0] == 1:
        x = x.expand(3, *x.shape[1:])
    x = torch.nan_to_num(x, nan=0.0).clamp(0, 1)
    if missing is not None:
        m = missing.detach().cpu().expand_as(x)
        red = torch.tensor([0.75, 0.25, 0.25]).view(3, 1, 1).expand_as(x)
        x = torch.where(m, red, x)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def plot_reconstructions(examples: Mapping[str, Tensor], *, title: str | None = None, path=None):
    """Three rows: incomplete input (missing pixels red), reconstruction, ground truth. Returns the figure."""
    import matplotlib.pyplot as plt

    k = examples["target"].shape[0]
    fig, axes = plt.subplots(3, k, figsize=(1.1 * k + 1.4, 3.6), squeeze=False)
    rows = [("input", lambda i: _to_rgb(examples["input"][i], examples["missing"][i])),
            ("reconstruction", lambda i: _to_rgb(examples["reconstruction"][i])),
            ("ground truth", lambda i: _to_rgb(examples["target"][i]))]
    _image_rows(axes, [(label, [get(i) for i in range(k)]) for label, get in rows], fontsize=9)
    return _finish_figure(fig, title, path)


def _image_rows(axes, rows, *, fontsize: int) -> None:
    """Fill a grid of axes: ``rows`` = [(label, [RGB arrays, one per column])], label on the left."""
    for r, (label, images) in enumerate(rows):
        for i, img in enumerate(images):
            axes[r][i].imshow(img, interpolation="nearest")
            axes[r][i].set_xticks([]), axes[r][i].set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=fontsize)


def _finish_figure(fig, title: str | None, path, dpi: int = 100):
    """Title, tight layout and (when ``path`` is given) a PNG; returns the figure."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def plot_samples(samples: Tensor, *, ncols: int = 8, title: str | None = None, path=None):
    """A grid of decoded prior samples ``(n, C, H, W)``. Returns the figure."""
    import matplotlib.pyplot as plt

    n = samples.shape[0]
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.0 * ncols, 1.0 * nrows + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            ax.imshow(_to_rgb(samples[i]), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.axis("off")
    return _finish_figure(fig, title, path)


def plot_front_grid(examples_by_front: Mapping[str, Mapping[str, Tensor]], *, what: str = "reconstruction",
                    title: str | None = None, path=None):
    """One row per front (``what`` = "reconstruction" or "samples"), with the incomplete inputs and
    the ground truth as the first and last rows for reconstructions. Returns the figure."""
    import matplotlib.pyplot as plt

    if not examples_by_front:
        raise ValueError("examples_by_front is empty")
    fronts = list(examples_by_front)
    any_ex = examples_by_front[fronts[0]]
    if what == "reconstruction":
        rows = [("input", any_ex["input"], any_ex["missing"])]
        rows += [(f, examples_by_front[f]["reconstruction"], None) for f in fronts]
        rows += [("ground truth", any_ex["target"], None)]
    elif what == "samples":
        rows = [(f, examples_by_front[f]["samples"], None) for f in fronts]
    else:
        raise ValueError(f"what must be 'reconstruction' or 'samples', got {what!r}")
    k = min(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.0 * k + 2.2, 1.05 * len(rows) + 0.4), squeeze=False)
    _image_rows(axes, [(label, [_to_rgb(imgs[i], None if miss is None else miss[i]) for i in range(k)])
                       for label, imgs, miss in rows], fontsize=8)
    return _finish_figure(fig, title, path)


# --------------------------------------------------------------------------- one cell
def cell_stem(dataset: str, front: str, seed: int) -> str:
    return f"{dataset}-{front}-s{int(seed)}"


def run_cell(dataset: str, front: str, seed: int, cfg: WAEConfig, *, features=None) -> dict:
    """Train and test one (dataset, front, seed); return ``{"row", "details", "checkpoint", "examples"}``.

    Training: the first ``cfg.n_train`` training images, each with its fixed mask
    (:func:`labkit.studies.cells.cell_masks`, shared with the classification study), NaN at missing
    pixels; the reconstruction loss counts observed pixels only, except for the ground-truth front
    (complete images in, all pixels counted). Resumable: :func:`labkit.training.fit` checkpoints
    every epoch to ``<scratch>/checkpoints/<cell>.partial.pt``. ``features``: the feature map of
    the Fréchet distances (default: :func:`feature_network`'s penultimate layer).
    """
    from labkit.checkpoint import atomic_save, machine_description
    from labkit.training import fit

    cfg.check()
    front = canonical_front(front)
    why = front_available(front, cfg, dataset)
    if why:
        raise RuntimeError(f"front {front!r} cannot run: {why}")
    dev = resolve_device(cfg.device)
    t0 = time.perf_counter()
    data = load_cell_data(dataset, cfg.mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=0.0,
                          quiet=not cfg.progress)
    aux_train, aux_test, info = METHODS[front].prepare(data, cfg.imputer_config())
    if features is None:
        fnet, fmeta = feature_network(dataset, cfg)
        features = _feature_map(fnet, cfg.eval_batch)
        info = {**info, "feature_net": fmeta}
    t_prep = time.perf_counter() - t0

    torch.manual_seed(_stable_seed("wae-init", dataset, front, seed))
    model = WAE(front, _dataset_arch(dataset), device=dev)
    if tuple(data.train_images.shape[1:]) != model.image_shape:
        raise ValueError(f"{dataset} images have shape {tuple(data.train_images.shape[1:])} but the WAE expects "
                         f"{model.image_shape}")
    optimizers = make_optimizers(model, cfg.lr, cfg.lr_disc)
    gt = front == "gt"
    n = len(data.train_images)
    run_config = {"dataset": dataset, "front": front, "mask": cfg.mask, "n_train": n, "batch_size": cfg.batch_size,
                  "lr": cfg.lr, "lr_disc": cfg.lr_disc, "lambda_adv": cfg.lambda_adv, "recon": cfg.recon,
                  "architecture": model.architecture}

    def batches(epoch, g):
        order = torch.randperm(n, generator=g)
        return [order[s:s + cfg.batch_size] for s in range(0, n, cfg.batch_size)]

    def step(idx, epoch, g):
        x, j = data.train_images[idx].to(dev), data.train_missing[idx].to(dev)
        x_in = _with_nan(x, j)
        aux = aux_train.get(idx, x_in, j)
        if gt:   # the ceiling: complete images in, every pixel in the loss
            target, counted = x, torch.ones_like(j)
        else:    # incomplete images: the loss never sees a missing pixel
            target, counted = x_in, ~j
        return train_step(model, optimizers, x_in, j, aux, target=target, counted=counted, generator=g,
                          lambda_adv=cfg.lambda_adv, recon=cfg.recon)

    ckpt = cfg.scratch_path() / "checkpoints" / f"{cell_stem(dataset, front, seed)}.partial.pt"
    t1 = time.perf_counter()
    history = fit(model, optimizers, batches, step, epochs=cfg.epochs, checkpoint=ckpt, seed=int(seed),
                  desc=f"WAE {front} s{seed}", progress=cfg.progress, config=run_config)
    t_train = time.perf_counter() - t1
    metrics, examples = evaluate_wae(model, data.test_images, data.test_missing, aux_test, features=features,
                                     batch_size=cfg.eval_batch, seed=_stable_seed("wae-prior", dataset, seed),
                                     n_examples=cfg.n_figure)
    # Model weights (no optimizer state) and the example tensors, for re-plotting without retraining.
    atomic_save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": run_config,
                 "examples": examples}, cfg.scratch_path() / "models" / f"{cell_stem(dataset, front, seed)}.pt")
    row = {"dataset": dataset, "front": front, "seed": int(seed),
           **{k: round(float(metrics[k]), 5) for k in METRIC_COLUMNS},
           "epochs": cfg.epochs, "n_train": n, "n_test": len(data.test_images)}
    details = {**row, **run_config, "prepare_seconds": round(t_prep, 1), "train_seconds": round(t_train, 1),
               "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine_description(),
               "device": str(dev), "profile": cfg.profile, "data": data.sources, "fd": FD_NAME,
               "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
               "history": [{k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in h.items()} for h in history],
               **info}
    return {"row": row, "details": details, "checkpoint": ckpt, "examples": examples}


# --------------------------------------------------------------------------- results files
def read_results(path) -> "Any":
    """The metrics CSV as a pandas DataFrame (empty with :data:`WAE_COLUMNS` if absent)."""
    return read_table(path, WAE_COLUMNS)


def _append_row(path: Path, row: dict) -> bool:
    """Add ``row`` to the CSV atomically unless its cell is there already (see
    :func:`labkit.sweeps.append_csv_row`); returns whether it was added."""
    return append_csv_row(path, row, WAE_COLUMNS, key=["dataset", "front", "seed"])


_append_jsonl = append_jsonl


def plan_cells(datasets: Sequence[str], fronts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, str, int]]:
    """The grid in run order: seeds outermost, so every front has seed 0 before any has seed 1."""
    return [(d, canonical_front(f), int(s)) for s in seeds for d in datasets for f in fronts]


def run_sweep(datasets: Sequence[str] | str, fronts: Sequence[str], seeds: Sequence[int], profile: str = "quick", *,
              config: WAEConfig | None = None, wait: bool = False, poll_seconds: float = 300.0,
              max_cells: int | None = None, figures: bool = True, _run_cell=None, **overrides) -> "Any":
    """Run every (dataset, front, seed) cell not yet in ``<results_dir>/metrics.csv``.

    Each finished cell is appended to the CSV at once (atomically), described in ``runs.jsonl``
    (settings, timings, per-epoch history) and drawn to ``figures/<cell>-reconstruction.png`` and
    ``figures/<cell>-samples.png``; its epoch checkpoint is then deleted. A rerun skips finished
    cells, and an interrupted cell resumes from its last finished epoch. Fronts whose checkpoint
    (DMFA, ACFlow) does not exist yet are skipped, or waited for with ``wait=True``.

    ``overrides`` replace :class:`WAEConfig` fields (epochs, n_train, device, ...). Returns the CSV.
    """
    import matplotlib.pyplot as plt

    cfg = config or WAEConfig(profile=profile)
    cfg.profile = profile
    for k, v in overrides.items():
        if k not in WAEConfig.__dataclass_fields__:
            raise ValueError(f"unknown WAE setting {k!r}; valid: {', '.join(WAEConfig.__dataclass_fields__)}")
        setattr(cfg, k, v)
    cfg.check()
    if isinstance(datasets, str):
        datasets = [datasets]
    for d in datasets:
        _dataset_arch(d)
    out = cfg.results_path()
    csv = out / "metrics.csv"
    cells = plan_cells(datasets, fronts, seeds)
    finished = 0
    reported: set[str] = set()
    feature_maps: dict[str, Any] = {}
    while True:
        df = read_results(csv)
        done = {(str(r.dataset), str(r.front), int(r.seed)) for r in df.itertuples()}
        todo = [c for c in cells if c not in done]
        if not todo:
            print(f"[wae] all {len(cells)} cells done -> {csv}", flush=True)
            break
        runnable = []
        for c in todo:
            why = front_available(c[1], cfg, c[0])
            if why is None:
                runnable.append(c)
            elif c[1] not in reported:
                print(f"[wae] skipping {c[1]} for now: {why}", flush=True)
                reported.add(c[1])
        if not runnable:
            if not wait:
                print(f"[wae] {len(todo)} cells wait for unavailable fronts; rerun later", flush=True)
                break
            time.sleep(poll_seconds)
            continue
        d, f, s = runnable[0]
        print(f"[wae] {len(cells) - len(todo) + 1}/{len(cells)}: {d} {f} seed {s}", flush=True)
        if _run_cell is not None:  # tests: a stand-in for run_cell, no feature network
            res = _run_cell(d, f, s, cfg)
        else:
            if d not in feature_maps:
                fnet, fmeta = feature_network(d, cfg)
                print(f"[wae] feature network for {d}: test accuracy {fmeta.get('test_accuracy')}", flush=True)
                feature_maps[d] = (fmeta, _feature_map(fnet, cfg.eval_batch))
            fmeta, fmap = feature_maps[d]
            res = run_cell(d, f, s, cfg, features=fmap)
            res["details"]["feature_net"] = fmeta
        if figures:
            stem = cell_stem(d, f, s)
            plt.close(plot_reconstructions(res["examples"], title=f"{d}, {f}, seed {s}",
                                           path=out / "figures" / f"{stem}-reconstruction.png"))
            plt.close(plot_samples(res["examples"]["samples"], title=f"{d}, {f}, seed {s}: prior samples",
                                   path=out / "figures" / f"{stem}-samples.png"))
        if _append_row(csv, res["row"]):      # False: another sweep process finished this cell first
            _append_jsonl(out / "runs.jsonl", res["details"])
        Path(res["checkpoint"]).unlink(missing_ok=True)
        r = res["row"]
        print(f"[wae] {d} {f} seed {s}: PSNR missing {r['psnr_missing']:.2f} all {r['psnr_all']:.2f}, "
              f"SSIM missing {r['ssim_missing']:.3f} all {r['ssim_all']:.3f}, FD rec {r['fd_reconstruction']:.2f} "
              f"samples {r['fd_samples']:.2f} ({res['details']['wall_seconds']} s)", flush=True)
        finished += 1
        if max_cells is not None and finished >= max_cells:
            break
    return read_results(csv)


def load_examples(dataset: str, front: str, seed: int, cfg: WAEConfig) -> dict[str, Tensor] | None:
    """The example tensors saved by :func:`run_cell` for a finished cell (``None`` if absent)."""
    from labkit.checkpoint import load_checkpoint

    path = cfg.scratch_path() / "models" / f"{cell_stem(dataset, canonical_front(front), seed)}.pt"
    stored = load_checkpoint(path, map_location="cpu") if path.exists() else None
    return None if stored is None else stored["examples"]


# --------------------------------------------------------------------------- tables
def summary_table(df, *, dataset: str | None = None, with_authors: bool = True):
    """Rows = fronts; columns = each metric as ``"mean ± std"`` over seeds, ``n`` seeds, and (MNIST)
    the authors' PSNR/SSIM. Returns a pandas DataFrame of strings."""
    import pandas as pd

    if dataset is not None:
        df = df[df["dataset"] == dataset]
    if df.empty:
        return pd.DataFrame()
    fronts = [f for f in FRONT_ORDER if f in set(df["front"])] + sorted(set(df["front"]) - set(FRONT_ORDER))
    digits = {"psnr_missing": 2, "psnr_all": 2, "ssim_missing": 3, "ssim_all": 3, "fd_reconstruction": 2,
              "fd_samples": 2}
    rows = []
    for f in fronts:
        sub = df[df["front"] == f]
        row = {"front": f, "seeds": str(len(sub))}
        for col in METRIC_COLUMNS:
            v = sub[col].astype(float)
            d = digits[col]
            row[col] = f"{v.mean():.{d}f} ± {v.std(ddof=1):.{d}f}" if len(v) > 1 else f"{v.mean():.{d}f}"
        if with_authors:
            a = AUTHORS_WAE_MNIST.get(f) if set(df["dataset"]) <= {"mnist"} else None
            row["authors PSNR"] = f"{a[0]:.2f}" if a else ""
            row["authors SSIM"] = f"{a[1]:.3f}" if a else ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("front")


def table_markdown(df, **kw) -> str:
    """:func:`summary_table` as a Markdown table (for the README)."""
    tab = summary_table(df, **kw)
    if tab.empty:
        return "(no results yet)"
    names = {"psnr_missing": "PSNR missing (dB)", "ssim_missing": "SSIM missing", "psnr_all": "PSNR all (dB)",
             "ssim_all": "SSIM all", "fd_reconstruction": f"{FD_NAME}: reconstructions",
             "fd_samples": f"{FD_NAME}: prior samples"}
    cols = list(tab.columns)
    lines = ["| front | " + " | ".join(names.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for f, row in tab.iterrows():
        lines.append(f"| {f} | " + " | ".join(row[c] for c in cols) + " |")
    return "\n".join(lines)


def plot_metrics(df, path=None, *, title: str | None = None):
    """Three panels per front: PSNR, SSIM (missing region / whole image) and the two Fréchet
    distances; bars = mean over seeds, dots = seeds, black ticks = the authors' PSNR/SSIM (MNIST,
    whole image, their metric implementation). Saves to ``path`` when given; returns the figure."""
    import matplotlib.pyplot as plt

    fronts = [f for f in FRONT_ORDER if f in set(df["front"])] + sorted(set(df["front"]) - set(FRONT_ORDER))
    panels = [("PSNR (dB)", ("psnr_missing", "psnr_all"), 0), ("SSIM", ("ssim_missing", "ssim_all"), 1),
              (FD_NAME, ("fd_reconstruction", "fd_samples"), None)]
    labels = {"psnr_missing": "missing region", "psnr_all": "whole image", "ssim_missing": "missing region",
              "ssim_all": "whole image", "fd_reconstruction": "reconstructions", "fd_samples": "prior samples"}
    fig, axes = plt.subplots(1, 3, figsize=(4.0 * 3, 4.4))
    x = np.arange(len(fronts))
    mnist_only = set(df["dataset"]) <= {"mnist"}
    for ax, (name, cols, authors_idx) in zip(axes, panels):
        for k, col in enumerate(cols):
            vals = [df[df["front"] == f][col].astype(float).to_numpy() for f in fronts]
            pos = x + (k - 0.5) * 0.38
            ax.bar(pos, [v.mean() if len(v) else np.nan for v in vals], width=0.36, alpha=0.75,
                   color=f"C{k}", label=labels[col])
            for p, v in zip(pos, vals):
                ax.plot(np.full(len(v), p), v, "k.", ms=3)
        if authors_idx is not None and mnist_only:
            label = "authors (whole image)"
            for i, f in enumerate(fronts):
                a = AUTHORS_WAE_MNIST.get(f)
                if a is not None:   # beside the whole-image bar
                    ax.plot([i + 0.01, i + 0.37], [a[authors_idx]] * 2, "k-", lw=2, label=label)
                    label = None
        ax.set_xticks(x)
        ax.set_xticklabels(fronts, rotation=60, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _finish_figure(fig, title, path, dpi=110)
