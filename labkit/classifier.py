r"""Classifiers with a pluggable missing-data front, and the resumable classification sweep (issue 4).

Architectures (supplementary section 1.2; ``conv_n`` = conv3×3 (pad 1) → ReLU → BatchNorm,
``down`` = conv3×3 stride 2 (pad 1, channels kept) → ReLU → BatchNorm, ``lin_n`` = Linear → ReLU,
the last ``lin10`` gives logits):

- ``"mnist"`` (also SVHN): ``[conv32, down, [conv64]×2, lin20, lin10]``
- ``"cifar10"``: ``[[conv32, drop0.3]×2, down, [conv64, drop0.3]×3, lin128, drop0.3, lin10]``

The first conv32's ``conv + ReLU`` is the *front* (:mod:`labkit.fronts`); its BatchNorm starts the
body. ``Classifier.forward(x, missing, aux)`` returns logits ``(B, 10)``.

Methods
-------
``METHODS`` maps a name to a :class:`Method`: the front class and the *preparer* that computes,
once per (data set, mask kind, seed), what the front needs besides ``(x, missing)`` (``aux``):

=========================  ===========================================================================
zero                       zero imputation
mask                       zero imputation + the mask as extra input channel(s)
pc                         partial convolution (Liu et al. 2018)
knn                        scikit-learn ``KNNImputer`` fitted on *incomplete* training images (NaN at
                           missing), ``n_neighbors`` chosen on a validation split (see :func:`prepare_knn`)
mfa_mean                   classical MFA (EM, fitted on the complete training images): conditional mean
mfa_misconv                MisConv over the classical MFA conditioned on each image's observed pixels
dmfa_mean_complete         DMFA (trained on complete images) mean imputation, no variance
dmfa_misconv_complete      MisConv over the complete-data DMFA
dmfa_mean_incomplete       same with the DMFA trained on incomplete images
dmfa_misconv_incomplete
acflow                     ACFlow imputation (mean of samples from the trained flow)
gt                         ground truth: the complete images (the ceiling)
=========================  ===========================================================================

Imputers are frozen, so their outputs are cached on disk under ``cache_dir`` (default
``data/cache/classification/``, git-ignored), keyed by everything that determines them.

Protocol of one cell (dataset, mask, method, seed)
---------------------------------------------------
- Training images: the first ``n_train`` of the training split; a validation split
  (``val_fraction``, :func:`labkit.data.train_val_split` with seed 0) is carved out of them and
  used only to pick the epoch (best validation accuracy) and k-NN's ``k``; the classifier trains on
  the rest. Test: the first ``n_test`` test images, used only for the final number.
- Masks: one per image, fixed per (dataset, split, mask kind, seed) by a seeded generator
  (:func:`cell_masks`); training and test carry the same kind of missing data.
- ``x`` reaches the front with NaN at missing pixels (proves that nothing leaks through them).
- Adam, cross-entropy; :func:`labkit.training.fit` checkpoints every epoch, so an interrupted cell
  resumes mid-training; the checkpoint is deleted once the cell's row is written.

Sweep
-----
:func:`run_sweep` writes ``<results_dir>/accuracy.csv`` (columns ``ACCURACY_COLUMNS``) one row per
finished cell (write to a temporary file, then rename), skips cells already there, and appends a
JSON line per cell to ``runs.jsonl`` (batch size, lr, wall time, machine, per-epoch history).
Cells whose method is not available yet (no DMFA/ACFlow checkpoint) are skipped, or waited for
with ``wait=True``. Order: every method on every mask for seed 0 before any later seed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.device import resolve_device
from labkit.sweeps import append_csv_row, append_jsonl, read_table
from labkit.fronts import (ACFlowFront, Front, GroundTruthFront, KNNFront, MaskFront, MFAMeanFront,
                           MisConvFront, PartialConvFront, ZeroFront)
from labkit.mfa import MFA, ClassicalMFA

__all__ = [
    "ACCURACY_COLUMNS",
    "ARCHITECTURES",
    "METHODS",
    "METHOD_ORDER",
    "PAPER_TABLE1",
    "AUTHORS_SQUARE",
    "Classifier",
    "Method",
    "SweepConfig",
    "build_classifier",
    "cell_masks",
    "evaluate_accuracy",
    "train_classifier",
    "run_cell",
    "run_sweep",
    "sweep_config",
    "load_dmfa",
    "PAPER_HYPERPARAMETERS",
    "read_results",
    "pivot_table",
    "table_markdown",
    "plot_results",
    "update_markdown_table",
    "imputation_quality",
    "method_available",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / "data" / "cache" / "classification"
ACCURACY_COLUMNS = ["dataset", "mask", "method", "seed", "accuracy", "n_train", "n_test", "epochs"]

#: display order of the methods (tables, plots)
METHOD_ORDER = ["zero", "mask", "knn", "pc", "mfa_mean", "mfa_misconv", "dmfa_mean_complete",
                "dmfa_misconv_complete", "dmfa_mean_incomplete", "dmfa_misconv_incomplete", "acflow", "gt"]

#: the paper's supplementary Table 1 (MNIST): method -> {mask: accuracy}. The paper's "MisConv" row
#: is shown beside both DMFA-MisConv variants (the paper does not say which DMFA it used there).
PAPER_TABLE1 = {
    "zero": {"square": 0.910, "trapezoid": 0.891, "noise": 0.946},
    "mask": {"square": 0.926, "trapezoid": 0.905, "noise": 0.703},
    "knn": {"square": 0.874, "trapezoid": 0.854, "noise": 0.912},
    "pc": {"square": 0.920, "trapezoid": 0.674, "noise": 0.804},
    "acflow": {"square": 0.908, "trapezoid": 0.799, "noise": 0.788},
    "dmfa_misconv_complete": {"square": 0.931, "trapezoid": 0.918, "noise": 0.966},
    "dmfa_misconv_incomplete": {"square": 0.931, "trapezoid": 0.918, "noise": 0.966},
    "gt": {"square": 0.992, "trapezoid": 0.992, "noise": 0.992},
}
#: the authors' public code, single-seed MNIST runs, 14×14 squares (anchor-numbers.md)
AUTHORS_SQUARE = {
    "gt": 0.9907, "dmfa_misconv_incomplete": 0.9312, "dmfa_misconv_complete": 0.9268,
    "dmfa_mean_complete": 0.9272, "mask": 0.9251, "dmfa_mean_incomplete": 0.9239, "mfa_mean": 0.9221,
    "pc": 0.9203, "zero": 0.9105, "acflow": 0.9081, "knn": 0.8748,
}


# ============================================================================ architectures
def _block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(), nn.BatchNorm2d(cout)]


ARCHITECTURES = ("mnist", "svhn", "cifar10")


class Classifier(nn.Module):
    """A missing-data front followed by a conv/linear body; ``forward(x, missing, aux) -> (B, n_classes)``.

    Build it with :func:`build_classifier`. ``x`` (B, C, H, W) with anything (NaN included) at
    missing pixels; ``missing`` bool (B, 1 or C, H, W); ``aux`` as ``front.aux_kind`` says.
    """

    def __init__(self, front: Front, body: nn.Sequential):
        super().__init__()
        self.front = front
        self.body = body

    def forward(self, x: Tensor, missing: Tensor, aux=None) -> Tensor:
        return self.body(self.front(x, missing, aux))


def build_classifier(arch: str, front: str | type[Front], *, in_channels: int | None = None,
                     image_size: int | None = None, n_classes: int = 10) -> Classifier:
    """The paper's classifier for ``arch`` ("mnist", "svhn" or "cifar10") with the given front.

    ``front``: a method name of ``METHODS`` / :data:`labkit.fronts.FRONTS`, or a Front subclass.
    ``in_channels``/``image_size`` default to the data set's (1×28 for MNIST, 3×32 otherwise).
    """
    from labkit.fronts import make_front

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    C = in_channels if in_channels is not None else (1 if arch == "mnist" else 3)
    S = image_size if image_size is not None else (28 if arch == "mnist" else 32)
    if S % 2:
        raise ValueError(f"image_size must be even (one stride-2 downsampling), got {S}")
    name = METHODS[front].front if isinstance(front, str) and front in METHODS else front
    first = make_front(name, C, 32, kernel_size=3, stride=1, padding=1)
    flat = 64 * (S // 2) * (S // 2)
    if arch in ("mnist", "svhn"):
        layers = [nn.BatchNorm2d(32), *_block(32, 32, stride=2), *_block(32, 64), *_block(64, 64),
                  nn.Flatten(), nn.Linear(flat, 20), nn.ReLU(), nn.Linear(20, n_classes)]
    else:
        layers = [nn.BatchNorm2d(32), nn.Dropout(0.3), *_block(32, 32), nn.Dropout(0.3),
                  *_block(32, 32, stride=2),
                  *_block(32, 64), nn.Dropout(0.3), *_block(64, 64), nn.Dropout(0.3), *_block(64, 64),
                  nn.Dropout(0.3), nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.3),
                  nn.Linear(128, n_classes)]
    return Classifier(first, nn.Sequential(*layers))


# ============================================================================ auxiliaries per batch
class AuxSource:
    """What a front needs besides ``(x, missing)``, batch by batch: ``get(idx, x, missing) -> aux``.

    ``idx`` indexes the data set the source was prepared for (a CPU int64 tensor); ``x``/``missing``
    are the batch already on the device.
    """

    def get(self, idx: Tensor, x: Tensor, missing: Tensor):
        return None


class TensorAux(AuxSource):
    """Per-image tensors ``(N, C, H, W)`` (imputed or complete images), stored on the CPU (maybe float16)."""

    def __init__(self, images: Tensor):
        self.images = images

    def get(self, idx, x, missing):
        return self.images[idx].to(device=x.device, dtype=x.dtype)


class MFAAux(AuxSource):
    """Per-image MFAs (weights (N,K), means (N,K,C,H,W), factors (N,K,L,C,H,W), variances), maybe float16."""

    def __init__(self, fields: dict[str, Tensor]):
        self.fields = fields

    def get(self, idx, x, missing):
        f = {k: v[idx].to(device=x.device, dtype=x.dtype) for k, v in self.fields.items()}
        w = f["weights"]
        w = w / w.sum(1, keepdim=True)                 # float16 storage: renormalise
        d = f["variances"].clamp_min(1e-6)             # float16 may round tiny variances to 0
        return MFA(w, f["means"], f["factors"], d, validate=False)


class ConditionedMFAAux(AuxSource):
    """A classical MFA conditioned on each batch's observed pixels (cheap: O(B·K·N·L²)), on the fly."""

    def __init__(self, model: ClassicalMFA):
        self.model = model

    def get(self, idx, x, missing):
        model = self.model.to(x.device)
        with torch.no_grad():
            return model.to(dtype=x.dtype).condition(x, ~missing).detach()


def _mfa_fields(mfa: MFA, dtype=torch.float16) -> dict[str, Tensor]:
    return {"weights": mfa.weights.detach().cpu().to(dtype), "means": mfa.means.detach().cpu().to(dtype),
            "factors": mfa.factors.detach().cpu().to(dtype), "variances": mfa.variances.detach().cpu().to(dtype)}


# ============================================================================ data for one cell
def _stable_seed(*parts: Any) -> int:
    words = [zlib.crc32(str(p).encode()) if not isinstance(p, (int, np.integer)) else int(p) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def cell_masks(dataset: str, split: str, kind: str, seed: int, n: int, height: int, width: int) -> Tensor:
    """The fixed masks of (dataset, split, mask kind, seed): bool ``(n, 1, H, W)`` on the CPU.

    Drawn by :func:`labkit.masks.make_masks` from a CPU generator seeded from all four names, so a
    rerun (or another machine) gets the same masks.
    """
    from labkit.masks import make_masks

    g = torch.Generator().manual_seed(_stable_seed("masks", dataset, split, kind, int(seed)))
    return make_masks(kind, n, height, width, generator=g, device="cpu")


@dataclass
class CellData:
    """Images (complete, CPU float32), labels, masks of one (dataset, mask, seed), split three ways."""

    dataset: str
    mask: str
    seed: int
    train_images: Tensor          # (n_train_total, C, H, W): training + validation images
    train_labels: Tensor
    train_missing: Tensor         # bool (n_train_total, 1, H, W)
    fit_idx: Tensor               # indices into train_* the classifier trains on
    val_idx: Tensor               # indices into train_* for model selection
    test_images: Tensor
    test_labels: Tensor
    test_missing: Tensor
    sources: str = ""

    @property
    def arch(self) -> str:
        return "mnist" if self.dataset in ("mnist", "fashion-mnist") else ("cifar10" if self.dataset == "cifar10" else "svhn")

    def key(self, split: str) -> dict:
        n = len(self.train_images) if split == "train" else len(self.test_images)
        return {"dataset": self.dataset, "split": split, "n": n, "mask": self.mask, "seed": self.seed}

    def splits(self) -> tuple[tuple[str, Tensor, Tensor], ...]:
        """``(name, images, missing)`` for the training and the test split, in that order."""
        return ("train", self.train_images, self.train_missing), ("test", self.test_images, self.test_missing)


_DATA_CACHE: dict = {}


def load_cell_data(dataset: str, mask: str, seed: int, *, n_train: int | None, n_test: int | None,
                   val_fraction: float = 0.1, quiet: bool = True) -> CellData:
    """Load the images and make the masks of one (dataset, mask, seed) (images cached in memory)."""
    from labkit.data import load_dataset, train_val_split

    key = (dataset, n_train, n_test)
    if key not in _DATA_CACHE:
        tr = load_dataset(dataset, "train", limit=n_train, quiet=quiet)
        te = load_dataset(dataset, "test", limit=n_test, quiet=quiet)
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = (tr, te)
    tr, te = _DATA_CACHE[key]
    _, _, H, W = tr.images.shape
    fit_idx, val_idx = train_val_split(len(tr), val_fraction, seed=0)
    return CellData(
        dataset=dataset, mask=mask, seed=int(seed),
        train_images=tr.images, train_labels=tr.labels,
        train_missing=cell_masks(dataset, "train", mask, seed, len(tr), H, W),
        fit_idx=fit_idx, val_idx=val_idx,
        test_images=te.images, test_labels=te.labels,
        test_missing=cell_masks(dataset, "test", mask, seed, len(te), H, W),
        sources=f"train: {tr.source}; test: {te.source}",
    )


def _with_nan(x: Tensor, missing: Tensor) -> Tensor:
    return torch.where(missing, torch.full((), float("nan"), dtype=x.dtype, device=x.device), x)


# ============================================================================ caching
def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _file_id(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def cached(cache_dir: Path, name: str, key: dict, compute: Callable[[], Any], *, progress: bool = True) -> Any:
    """``compute()`` once per ``key``; stored as ``cache_dir/<name>-<hash(key)>.pt`` (atomic write)."""
    from labkit.checkpoint import atomic_save, load_checkpoint

    path = Path(cache_dir) / f"{name}-{_hash(key)}.pt"
    stored = load_checkpoint(path, map_location="cpu") if path.exists() else None
    if stored is not None and stored.get("key") == json.loads(json.dumps(key, sort_keys=True, default=str)):
        return stored["value"]
    start = time.perf_counter()
    value = compute()
    if progress:
        print(f"[cache] {name}: computed in {time.perf_counter() - start:.1f} s -> {path.name}", flush=True)
    atomic_save({"key": json.loads(json.dumps(key, sort_keys=True, default=str)), "value": value,
                 "seconds": time.perf_counter() - start}, path)
    return value


# ============================================================================ preparers
@dataclass
class SweepConfig:
    """Everything a sweep needs besides the grid (filled from a profile's ``02_classification`` section)."""

    profile: str = "quick"
    epochs: int = 1
    batch_size: int = 24
    lr: float = 1e-3
    n_train: int | None = 500
    n_test: int | None = 200
    val_fraction: float = 0.1
    select: str = "best_val"                  # "best_val" (epoch with the best validation accuracy) | "last"
    knn_fit: int | None = 5000                # incomplete training images the KNNImputer is fitted on
    knn_k: Sequence[int] = (1, 3, 5, 10)       # candidates for n_neighbors, chosen on validation
    knn_val: int = 500                        # validation images used to choose k
    mfa_components: int = 10
    mfa_factors: int = 4
    mfa_iterations: int = 30
    dmfa_complete: str | None = "results/dmfa/cpu/{dataset}_complete.pt"      # {dataset} is filled in
    dmfa_incomplete: str | None = "results/dmfa/cpu/{dataset}_incomplete{mask_suffix}.pt"   # one per mask kind
    acflow: str | None = "results/acflow/acflow_{dataset}.pt"
    acflow_samples: int = 4
    impute_batch: int = 256
    eval_batch: int = 500
    results_dir: str | None = None            # default results/classification/<profile>
    cache_dir: str | None = None              # default data/cache/classification
    device: Any = None
    progress: bool = True

    def results_path(self) -> Path:
        return Path(self.results_dir) if self.results_dir else REPO_ROOT / "results" / "classification" / self.profile

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else DEFAULT_CACHE

    def resolve(self, path: str | None, dataset: str = "mnist", mask: str | None = None) -> Path | None:
        """A checkpoint path template made concrete: ``{dataset}`` is the data set's name and
        ``{mask_suffix}`` is ``""`` for square masks (or no mask) and ``"_<kind>"`` otherwise, so the
        incomplete-data DMFA of each mask kind can be its own file (trained on that kind's missing data)."""
        if not path:
            return None
        suffix = "" if mask in (None, "square") else f"_{mask}"
        p = Path(str(path).replace("{dataset}", dataset).replace("{mask_suffix}", suffix))
        return p if p.is_absolute() else REPO_ROOT / p


#: the paper's classifier hyper-parameters (supplementary 1.2): dataset -> (epochs, batch size, lr)
PAPER_HYPERPARAMETERS = {"mnist": (10, 24, 1e-3), "fashion-mnist": (10, 24, 1e-3), "svhn": (25, 24, 1e-3),
                         "cifar10": (35, 64, 1e-4)}

#: the notebook parameters that are not SweepConfig fields
GRID_KEYS = ("dataset", "datasets", "masks", "methods", "seeds")


def sweep_config(profile: str = "quick", **overrides) -> tuple[dict, SweepConfig]:
    """Grid and :class:`SweepConfig` from a profile's ``02_classification`` section plus overrides.

    Returns ``({"datasets", "masks", "methods", "seeds"}, config)``. ``epochs``, ``batch_size`` or
    ``lr`` set to ``None`` mean the paper's value for the (first) data set (``PAPER_HYPERPARAMETERS``).
    Unknown keys raise ``ValueError`` naming them; ``device``/``seed``/``profile`` defaults are ignored.
    """
    from labkit.profiles import load_profile

    params = load_profile(profile, "02_classification")
    params.update({k: v for k, v in overrides.items()})
    params.pop("seed", None)
    name = params.pop("profile", profile)
    datasets = params.pop("datasets", None) or [params.pop("dataset", "mnist")]
    params.pop("dataset", None)
    if isinstance(datasets, str):
        datasets = [datasets]
    grid = {"datasets": list(datasets), "masks": list(params.pop("masks", ["square"])),
            "methods": list(params.pop("methods", ["zero"])), "seeds": [int(s) for s in params.pop("seeds", [0])]}
    fields = SweepConfig.__dataclass_fields__
    unknown = sorted(k for k in params if k not in fields)
    if unknown:
        raise ValueError(f"unknown 02_classification parameter(s) {unknown}; valid: "
                         f"{', '.join(list(GRID_KEYS) + list(fields))}")
    paper = PAPER_HYPERPARAMETERS.get(grid["datasets"][0], PAPER_HYPERPARAMETERS["mnist"])
    for i, k in enumerate(("epochs", "batch_size", "lr")):
        if params.get(k, 0) is None:
            params[k] = paper[i]
    cfg = SweepConfig(profile=str(name), **params)
    return grid, cfg


@dataclass
class Method:
    """A classification method: its front class, its preparer and when it can run."""

    name: str
    front: type[Front]
    prepare: Callable[[CellData, SweepConfig], tuple[AuxSource, AuxSource, dict]]
    needs: Callable[..., str | None] = field(default=lambda cfg, dataset="mnist", mask=None: None)
    description: str = ""


def _no_aux(data, cfg):
    return AuxSource(), AuxSource(), {}


def _gt(data, cfg):
    return TensorAux(data.train_images), TensorAux(data.test_images), {}


def _chunks(n: int, size: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------- k-NN
def _knn_impute(imputer, images: Tensor, missing: Tensor, desc: str, progress: bool, chunk: int = 250) -> Tensor:
    N = images.shape[0]
    flat = _with_nan(images, missing.expand_as(images)).reshape(N, -1).numpy().astype(np.float64)
    out = np.empty_like(flat)
    for s in _chunks(N, chunk, desc, progress):
        out[s:s + chunk] = imputer.transform(flat[s:s + chunk])
    res = torch.from_numpy(out).to(torch.float32).reshape(images.shape)
    return torch.where(missing.expand_as(images), res, images)


def prepare_knn(data: CellData, cfg: SweepConfig):
    """k-NN imputation with scikit-learn's ``KNNImputer`` (uniform weights, nan-Euclidean distance).

    - fitted on the *incomplete* training images (NaN at missing pixels; no complete image is
      used), at most ``cfg.knn_fit`` of them (the first ones of the classifier's training split);
    - ``n_neighbors`` chosen from ``cfg.knn_k`` on ``cfg.knn_val`` validation images: an extra
      square (1/4 of the image) is hidden among their *observed* pixels and the k with the lowest
      squared error there wins (only observed values are ever compared);
    - train, validation and test images are then imputed in chunks (progress bar).
    """
    from sklearn.impute import KNNImputer

    from labkit.masks import make_masks

    fit_rows = data.fit_idx[: cfg.knn_fit] if cfg.knn_fit else data.fit_idx
    key = {**data.key("train"), "test": data.key("test"), "method": "knn", "fit": len(fit_rows),
           "k": list(cfg.knn_k), "val": cfg.knn_val, "v": 1}

    def compute():
        N, C, H, W = data.train_images.shape
        X_fit = _with_nan(data.train_images[fit_rows], data.train_missing[fit_rows].expand(-1, C, -1, -1))
        X_fit = X_fit.reshape(len(fit_rows), -1).numpy().astype(np.float64)
        # choose k: hide an extra square among the observed pixels of validation images
        vidx = data.val_idx[: cfg.knn_val]
        g = torch.Generator().manual_seed(_stable_seed("knn-hidden", data.dataset, data.mask, data.seed))
        hidden = make_masks("square", len(vidx), H, W, generator=g, device="cpu") & ~data.train_missing[vidx]
        vmiss = data.train_missing[vidx] | hidden
        scores = {}
        for k in cfg.knn_k:
            imp = KNNImputer(n_neighbors=int(k), keep_empty_features=True).fit(X_fit)
            filled = _knn_impute(imp, data.train_images[vidx], vmiss, f"knn k={k} (val)", cfg.progress)
            h = hidden.expand_as(filled)
            err = ((filled - data.train_images[vidx]) ** 2)[h].sum() / len(vidx)
            scores[int(k)] = float(err)
        best = min(scores, key=scores.get)
        imp = KNNImputer(n_neighbors=best, keep_empty_features=True).fit(X_fit)
        t0 = time.perf_counter()
        tr = _knn_impute(imp, data.train_images, data.train_missing, f"knn k={best} train", cfg.progress)
        te = _knn_impute(imp, data.test_images, data.test_missing, f"knn k={best} test", cfg.progress)
        return {"train": tr.half(), "test": te.half(), "k": best, "val_sse_per_image": scores,
                "impute_seconds": time.perf_counter() - t0, "n_fit": len(fit_rows)}

    v = cached(cfg.cache_path(), f"knn-{data.dataset}-{data.mask}-s{data.seed}", key, compute, progress=cfg.progress)
    info = {"knn_k": v["k"], "knn_val_sse_per_image": v["val_sse_per_image"], "knn_n_fit": v["n_fit"],
            "knn_impute_seconds": round(v["impute_seconds"], 1)}
    return TensorAux(v["train"]), TensorAux(v["test"]), info


# ---------------------------------------------------------------------------- classical MFA
def classical_mfa(data: CellData, cfg: SweepConfig) -> ClassicalMFA:
    """The classical MFA of the data set: EM (:func:`labkit.mfa.fit_mfa`) on the complete images of
    the classifier's training split (not the validation or test images), cached."""
    from labkit.mfa import fit_mfa

    K, L = cfg.mfa_components, cfg.mfa_factors
    C, H, W = data.train_images.shape[1:]
    key = {"dataset": data.dataset, "n": len(data.train_images), "fit": len(data.fit_idx), "K": K, "L": L,
           "iterations": cfg.mfa_iterations, "v": 1}

    def compute():
        model, history = fit_mfa(data.train_images[data.fit_idx], K, L, iterations=cfg.mfa_iterations,
                                 seed=0, progress=cfg.progress)
        return {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "history": history}

    v = cached(cfg.cache_path(), f"mfa-{data.dataset}-K{K}-L{L}", key, compute, progress=cfg.progress)
    model = ClassicalMFA.empty(K, L, (C, H, W))
    model.load_state_dict(v["state"])
    return model


def _mfa_mean_images(model: ClassicalMFA, images: Tensor, missing: Tensor, cfg: SweepConfig, desc: str) -> Tensor:
    dev = resolve_device(cfg.device)
    m = model.to(dev)
    out = torch.empty_like(images)
    for s in _chunks(len(images), cfg.impute_batch, desc, cfg.progress):
        x = images[s:s + cfg.impute_batch].to(dev)
        j = missing[s:s + cfg.impute_batch].to(dev)
        with torch.no_grad():
            mean = m.condition(_with_nan(x, j.expand_as(x)), ~j).mean()
        out[s:s + cfg.impute_batch] = torch.where(j.expand_as(x), mean, x).cpu()
    return out


def prepare_mfa_mean(data: CellData, cfg: SweepConfig):
    model = classical_mfa(data, cfg)
    key = {**data.key("train"), "test": data.key("test"), "method": "mfa_mean", "K": cfg.mfa_components,
           "L": cfg.mfa_factors, "iterations": cfg.mfa_iterations, "v": 1}

    def compute():
        return {"train": _mfa_mean_images(model, data.train_images, data.train_missing, cfg, "MFA mean train").half(),
                "test": _mfa_mean_images(model, data.test_images, data.test_missing, cfg, "MFA mean test").half()}

    v = cached(cfg.cache_path(), f"mfamean-{data.dataset}-{data.mask}-s{data.seed}", key, compute, progress=cfg.progress)
    return TensorAux(v["train"]), TensorAux(v["test"]), {"mfa_K": cfg.mfa_components, "mfa_L": cfg.mfa_factors}


def prepare_mfa_misconv(data: CellData, cfg: SweepConfig):
    model = classical_mfa(data, cfg)
    src = ConditionedMFAAux(model)
    return src, src, {"mfa_K": cfg.mfa_components, "mfa_L": cfg.mfa_factors}


# ---------------------------------------------------------------------------- DMFA
def _dmfa_path(cfg: SweepConfig, variant: str, dataset: str = "mnist", mask: str | None = None) -> Path | None:
    return cfg.resolve(cfg.dmfa_complete if variant == "complete" else cfg.dmfa_incomplete, dataset, mask)


def load_dmfa(path: str | os.PathLike, device=None):
    """A trained DMFA from a :func:`labkit.dmfa.load_or_train_dmfa` file (``{"model", "meta"}``,
    ``meta["model"]`` = the constructor config), in eval mode on ``device``."""
    from labkit import dmfa as dmfa_mod
    from labkit.checkpoint import CheckpointError, load_checkpoint

    dev = resolve_device(device)
    stored = load_checkpoint(path, map_location=dev)
    if stored is None:
        raise FileNotFoundError(f"no DMFA checkpoint at {str(path)!r}")
    try:
        conf = stored["meta"]["model"]
        model = dmfa_mod.build_dmfa(conf.get("dataset", stored["meta"].get("dataset")),
                                    n_components=conf["n_components"], n_factors=conf["n_factors"],
                                    factor_scale=conf.get("factor_scale"), min_variance=conf.get("min_variance", 1e-4))
        model.load_state_dict(stored["model"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a DMFA checkpoint ({type(exc).__name__}: {exc})") from exc
    return model.to(dev).eval(), dict(stored["meta"])


def _dmfa_needs(variant: str):
    def needs(cfg: SweepConfig, dataset: str = "mnist", mask: str | None = None) -> str | None:
        p = _dmfa_path(cfg, variant, dataset, mask)
        if p is None:
            return f"no {variant}-data DMFA checkpoint configured"
        if not p.is_file():
            return f"{variant}-data DMFA checkpoint {p} does not exist yet"
        return None
    return needs


def _dmfa_mfas(data: CellData, cfg: SweepConfig, variant: str) -> dict:
    """Per-image DMFA outputs for train and test (fields stored float16), cached."""
    from labkit import dmfa as dmfa_mod

    path = _dmfa_path(cfg, variant, data.dataset, data.mask)
    key = {**data.key("train"), "test": data.key("test"), "method": f"dmfa_{variant}", "checkpoint": _file_id(path),
           "v": 1}

    def compute():
        dev = resolve_device(cfg.device)
        model, _ = load_dmfa(path, device=dev)
        out = {}
        for split, images, missing in data.splits():
            mfa = dmfa_mod.predict_mfa(model, _with_nan(images, missing.expand_as(images)), missing,
                                       batch_size=cfg.impute_batch, device=dev, out_device="cpu")
            out[split] = _mfa_fields(mfa)
        return out

    return cached(cfg.cache_path(), f"dmfa{variant}-{data.dataset}-{data.mask}-s{data.seed}", key, compute,
                  progress=cfg.progress)


def _prepare_dmfa_mean(variant: str):
    def prepare(data, cfg):
        v = _dmfa_mfas(data, cfg, variant)
        out = []
        for split, images, missing in data.splits():
            f = v[split]
            w = f["weights"].float()
            mean = torch.einsum("bk,bkchw->bchw", w / w.sum(1, keepdim=True), f["means"].float())
            out.append(TensorAux(torch.where(missing.expand_as(images), mean, images)))
        path = _dmfa_path(cfg, variant, data.dataset, data.mask)
        return out[0], out[1], {"dmfa": str(path), "dmfa_checkpoint": _file_id(path)}
    return prepare


def _prepare_dmfa_misconv(variant: str):
    def prepare(data, cfg):
        v = _dmfa_mfas(data, cfg, variant)
        path = _dmfa_path(cfg, variant, data.dataset, data.mask)
        return MFAAux(v["train"]), MFAAux(v["test"]), {"dmfa": str(path), "dmfa_checkpoint": _file_id(path)}
    return prepare


# ---------------------------------------------------------------------------- ACFlow
def _acflow_needs(cfg: SweepConfig, dataset: str = "mnist", mask: str | None = None) -> str | None:
    p = cfg.resolve(cfg.acflow, dataset)
    if p is None:
        return "no ACFlow checkpoint configured"
    if not p.is_file():
        return f"ACFlow checkpoint {p} does not exist yet"
    return None


def prepare_acflow(data: CellData, cfg: SweepConfig):
    """ACFlow imputation: the mean of ``cfg.acflow_samples`` samples of the missing pixels (seeded)."""
    from labkit.acflow import load_acflow

    path = cfg.resolve(cfg.acflow, data.dataset)
    key = {**data.key("train"), "test": data.key("test"), "method": "acflow", "checkpoint": _file_id(path),
           "samples": cfg.acflow_samples, "v": 1}

    def compute():
        dev = resolve_device(cfg.device)
        model, _ = load_acflow(path, device=dev)
        out = {}
        for split, images, missing in data.splits():
            g = torch.Generator(device=dev).manual_seed(_stable_seed("acflow", data.dataset, split, data.mask, data.seed))
            res = torch.empty_like(images)
            for s in _chunks(len(images), cfg.impute_batch, f"ACFlow {split}", cfg.progress):
                x = images[s:s + cfg.impute_batch].to(dev)
                j = missing[s:s + cfg.impute_batch].to(dev)
                res[s:s + cfg.impute_batch] = model.impute(x, j, n_samples=cfg.acflow_samples, generator=g).cpu()
            out[split] = res.half()
        return out

    v = cached(cfg.cache_path(), f"acflow-{data.dataset}-{data.mask}-s{data.seed}", key, compute, progress=cfg.progress)
    info = {"acflow": str(path), "acflow_samples": cfg.acflow_samples, "acflow_checkpoint": key["checkpoint"]}
    return TensorAux(v["train"]), TensorAux(v["test"]), info


METHODS: dict[str, Method] = {
    "zero": Method("zero", ZeroFront, _no_aux, description="zero imputation"),
    "mask": Method("mask", MaskFront, _no_aux, description="zero imputation + mask channel"),
    "pc": Method("pc", PartialConvFront, _no_aux, description="partial convolution"),
    "knn": Method("knn", KNNFront, prepare_knn, description="k-NN imputation (KNNImputer on incomplete images)"),
    "mfa_mean": Method("mfa_mean", MFAMeanFront, prepare_mfa_mean, description="classical MFA conditional mean"),
    "mfa_misconv": Method("mfa_misconv", MisConvFront, prepare_mfa_misconv, description="MisConv, classical MFA"),
    "dmfa_mean_complete": Method("dmfa_mean_complete", MFAMeanFront, _prepare_dmfa_mean("complete"),
                                 _dmfa_needs("complete"), "DMFA mean imputation (complete-data DMFA)"),
    "dmfa_misconv_complete": Method("dmfa_misconv_complete", MisConvFront, _prepare_dmfa_misconv("complete"),
                                    _dmfa_needs("complete"), "MisConv, complete-data DMFA"),
    "dmfa_mean_incomplete": Method("dmfa_mean_incomplete", MFAMeanFront, _prepare_dmfa_mean("incomplete"),
                                   _dmfa_needs("incomplete"), "DMFA mean imputation (incomplete-data DMFA)"),
    "dmfa_misconv_incomplete": Method("dmfa_misconv_incomplete", MisConvFront, _prepare_dmfa_misconv("incomplete"),
                                      _dmfa_needs("incomplete"), "MisConv, incomplete-data DMFA"),
    "acflow": Method("acflow", ACFlowFront, prepare_acflow, _acflow_needs, "ACFlow imputation"),
    "gt": Method("gt", GroundTruthFront, _gt, description="ground truth (complete images)"),
}


def method_available(name: str, cfg: SweepConfig, dataset: str = "mnist", mask: str | None = None) -> str | None:
    """``None`` if method ``name`` can run now on ``dataset`` with ``mask``-kind missing data, else why
    not (e.g. its checkpoint does not exist yet)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name].needs(cfg, dataset, mask)


# ============================================================================ train / evaluate
def evaluate_accuracy(model: Classifier, images: Tensor, labels: Tensor, missing: Tensor, aux: AuxSource,
                      idx: Tensor | None = None, *, batch_size: int = 500, device=None) -> float:
    """Accuracy of ``model`` on ``images[idx]`` (NaN put at missing pixels), in eval mode, no grad."""
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    idx = torch.arange(len(images)) if idx is None else idx
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(idx), batch_size):
            b = idx[s:s + batch_size]
            x, j = images[b].to(dev), missing[b].to(dev)
            x = _with_nan(x, j.expand_as(x))
            logits = model(x, j, aux.get(b, x, j))
            correct += int((logits.argmax(1).cpu() == labels[b]).sum())
    model.train(was_training)
    return correct / max(1, len(idx))


class _Best:
    """The best-validation weights seen so far (saved in fit's checkpoint through ``extra_state``)."""

    def __init__(self):
        self.acc = -1.0
        self.epoch = -1
        self.state: dict | None = None

    def state_dict(self):
        return {"acc": self.acc, "epoch": self.epoch, "state": self.state}

    def load_state_dict(self, d):
        self.acc, self.epoch, self.state = d["acc"], d["epoch"], d["state"]


def train_classifier(model: Classifier, data: CellData, aux_train: AuxSource, *, epochs: int, batch_size: int,
                     lr: float, seed: int, checkpoint: str | os.PathLike | None = None, select: str = "best_val",
                     device=None, progress: bool = True, config: dict | None = None,
                     eval_batch: int = 500) -> tuple[list[dict], dict]:
    """Train with Adam + cross-entropy on ``data.fit_idx`` (resumable through ``checkpoint``).

    ``select="best_val"`` restores the weights of the epoch with the best validation accuracy
    (ties: the earlier epoch); ``"last"`` keeps the last epoch. Returns ``(history, info)`` with
    ``info = {"epoch_selected", "val_accuracy"}``.
    """
    from labkit.training import fit

    if select not in ("best_val", "last"):
        raise ValueError(f"select must be 'best_val' or 'last', got {select!r}")
    dev = resolve_device(device)
    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    fit_idx = data.fit_idx
    n = len(fit_idx)
    best = _Best()

    def batches(epoch, g):
        order = fit_idx[torch.randperm(n, generator=g)]
        return [order[s:s + batch_size] for s in range(0, n, batch_size)]

    def step(b, epoch, g):
        x, j = data.train_images[b].to(dev), data.train_missing[b].to(dev)
        x = _with_nan(x, j.expand_as(x))
        y = data.train_labels[b].to(dev)
        logits = model(x, j, aux_train.get(b, x, j))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    def evaluate(epoch):
        acc = evaluate_accuracy(model, data.train_images, data.train_labels, data.train_missing, aux_train,
                                data.val_idx, batch_size=eval_batch)
        if acc > best.acc:
            best.acc, best.epoch = acc, epoch
            best.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return {"val_accuracy": acc}

    history = fit(model, opt, batches, step, epochs=epochs, checkpoint=checkpoint, seed=seed, desc="classifier",
                  progress=progress, extra_state={"best": best}, config=config,
                  evaluate=evaluate if len(data.val_idx) else None)
    info = {"epoch_selected": len(history) - 1, "val_accuracy": history[-1].get("val_accuracy") if history else None}
    if select == "best_val" and best.state is not None:
        model.load_state_dict(best.state)
        info = {"epoch_selected": best.epoch, "val_accuracy": best.acc}
    model.eval()
    return history, info


# ============================================================================ results files
def read_results(path: str | os.PathLike):
    """The accuracy CSV as a pandas DataFrame (empty with ``ACCURACY_COLUMNS`` if absent)."""
    return read_table(path, ACCURACY_COLUMNS)


def _append_row(path: Path, row: dict) -> bool:
    """Add ``row`` to the CSV atomically unless its cell is there already (see
    :func:`labkit.sweeps.append_csv_row`); returns whether it was added."""
    return append_csv_row(path, row, ACCURACY_COLUMNS, key=["dataset", "mask", "method", "seed"])


_append_jsonl = append_jsonl



def _done(df) -> set[tuple]:
    return {(str(r.dataset), str(r.mask), str(r.method), int(r.seed)) for r in df.itertuples()}


# ============================================================================ one cell / the sweep
def run_cell(dataset: str, mask: str, method: str, seed: int, cfg: SweepConfig) -> dict:
    """Train and test one (dataset, mask, method, seed); return the CSV row plus details (not written)."""
    from labkit.checkpoint import machine_description

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    why = method_available(method, cfg, dataset, mask)
    if why:
        raise RuntimeError(f"method {method!r} cannot run: {why}")
    dev = resolve_device(cfg.device)
    t0 = time.perf_counter()
    data = load_cell_data(dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test, val_fraction=cfg.val_fraction,
                          quiet=not cfg.progress)
    aux_train, aux_test, info = METHODS[method].prepare(data, cfg)
    t_prep = time.perf_counter() - t0
    torch.manual_seed(_stable_seed("init", dataset, mask, method, seed))
    C, H, _ = data.train_images.shape[1:]
    model = build_classifier(data.arch, method, in_channels=C, image_size=H).to(dev)
    run_config = {"dataset": dataset, "mask": mask, "method": method, "n_train": len(data.fit_idx),
                  "n_val": len(data.val_idx), "n_test": len(data.test_images), "batch_size": cfg.batch_size,
                  "lr": cfg.lr, "select": cfg.select}
    ckpt = cfg.cache_path() / "runs" / cfg.profile / f"{dataset}-{mask}-{method}-s{seed}.partial.pt"
    t1 = time.perf_counter()
    history, sel = train_classifier(model, data, aux_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                    seed=seed, checkpoint=ckpt, select=cfg.select, device=dev,
                                    progress=cfg.progress, config=run_config, eval_batch=cfg.eval_batch)
    t_train = time.perf_counter() - t1
    acc = evaluate_accuracy(model, data.test_images, data.test_labels, data.test_missing, aux_test,
                            batch_size=cfg.eval_batch)
    row = {"dataset": dataset, "mask": mask, "method": method, "seed": int(seed), "accuracy": round(acc, 5),
           "n_train": len(data.fit_idx), "n_test": len(data.test_images), "epochs": cfg.epochs}
    details = {**row, "n_val": len(data.val_idx), "batch_size": cfg.batch_size, "lr": cfg.lr, "select": cfg.select,
               **sel, "prepare_seconds": round(t_prep, 1), "train_seconds": round(t_train, 1),
               "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine_description(),
               "device": str(dev), "profile": cfg.profile, "data": data.sources,
               "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
               "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in history],
               **info}
    return {"row": row, "details": details, "checkpoint": ckpt}


_REPORTED: dict[str, set] = {}


def plan_cells(datasets: Sequence[str], masks: Sequence[str], methods: Sequence[str], seeds: Sequence[int]) -> list[tuple]:
    """The grid in run order: seeds outermost, so every method sees every mask at seed 0 first."""
    return [(d, m, meth, int(s)) for s in seeds for d in datasets for m in masks for meth in methods]


def run_sweep(datasets: Sequence[str], masks: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
              profile: str = "quick", *, config: SweepConfig | None = None, wait: bool = False,
              poll_seconds: float = 300.0, max_cells: int | None = None, device=None,
              progress: bool = True, _run_cell: Callable = None, **overrides) -> "Any":
    """Run every (dataset, mask, method, seed) cell not yet in ``<results_dir>/accuracy.csv``.

    Args:
        datasets, masks, methods, seeds: the grid (methods: names of ``METHODS``).
        profile: names the results folder (``results/classification/<profile>``) and the checkpoints.
        config: a :class:`SweepConfig`; ``overrides`` (epochs, batch_size, lr, n_train, ...) replace fields.
        wait: when methods are unavailable (no DMFA/ACFlow checkpoint yet), poll every
            ``poll_seconds`` until they appear, instead of returning without them.
        max_cells: stop after this many newly finished cells.

    Each finished cell is appended to the CSV at once (atomically) and described in ``runs.jsonl``;
    a rerun skips finished cells, and an interrupted cell resumes from its epoch checkpoint.
    The next cell is always the first unfinished, runnable one in :func:`plan_cells` order, so a
    method that becomes available later (a checkpoint lands) jumps ahead of later seeds.

    Returns the CSV's DataFrame.
    """
    cfg = config or SweepConfig(profile=profile)
    cfg.profile = profile
    if device is not None:
        cfg.device = device
    cfg.progress = progress
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown sweep setting {k!r}; valid: {', '.join(cfg.__dataclass_fields__)}")
        setattr(cfg, k, v)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    from labkit.masks import MASK_KINDS

    for m in masks:
        if m not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {m!r}; valid: {', '.join(MASK_KINDS)}")
    out = cfg.results_path()
    csv = out / "accuracy.csv"
    cells = plan_cells(datasets, masks, methods, seeds)
    runner = _run_cell or run_cell
    finished = 0
    reported = _REPORTED.setdefault(str(csv), set())   # say "skipping X" once per results file
    while True:
        done = _done(read_results(csv))
        todo = [c for c in cells if c not in done]
        runnable = [c for c in todo if method_available(c[2], cfg, c[0], c[1]) is None]
        for c in todo:
            why = method_available(c[2], cfg, c[0], c[1])
            if why and (c[2], c[1]) not in reported:
                print(f"[sweep] skipping {c[2]} on {c[1]} masks for now: {why}", flush=True)
                reported.add((c[2], c[1]))
        if not todo:
            print(f"[sweep] all {len(cells)} cells done -> {csv}", flush=True)
            break
        if not runnable:
            if not wait:
                print(f"[sweep] {len(todo)} cells wait for unavailable methods; rerun later", flush=True)
                break
            time.sleep(poll_seconds)
            continue
        d, m, meth, s = runnable[0]
        print(f"[sweep] {len(cells) - len(todo) + 1}/{len(cells)}: {d} {m} {meth} seed {s}", flush=True)
        res = runner(d, m, meth, s, cfg)
        if _append_row(csv, res["row"]):      # False: another sweep process finished this cell first
            _append_jsonl(out / "runs.jsonl", res["details"])
        ckpt = res.get("checkpoint")
        if ckpt is not None:
            Path(ckpt).unlink(missing_ok=True)
        print(f"[sweep] {d} {m} {meth} seed {s}: accuracy {res['row']['accuracy']:.4f}"
              + (f" ({res['details'].get('wall_seconds')} s)" if "details" in res else ""), flush=True)
        finished += 1
        if max_cells is not None and finished >= max_cells:
            break
    return read_results(csv)


# ============================================================================ diagnostics
def imputation_quality(dataset: str, mask: str, seed: int, methods: Sequence[str], cfg: SweepConfig, *,
                       n: int = 1000) -> "Any":
    """How good each method's imputer is on the first ``n`` *test* images of a cell (diagnostics only;
    never used to choose anything): per image, the sum of squared errors of the imputation at the
    missing pixels (``sse``), and for MFA-based methods the negative log-likelihood of the true missing
    pixels under the per-image MFA (``nll``, nats) and the mean predicted standard deviation there
    (``pred_std``). Uses the same (cached) preparers as the sweep. Returns a pandas DataFrame.
    """
    import pandas as pd

    data = load_cell_data(dataset, mask, seed, n_train=cfg.n_train, n_test=cfg.n_test,
                          val_fraction=cfg.val_fraction)
    idx = torch.arange(min(n, len(data.test_images)))
    x_true = data.test_images[idx]
    miss = data.test_missing[idx]
    J = miss.expand_as(x_true)
    x = _with_nan(x_true, J)
    rows = []
    for name in methods:
        if method_available(name, cfg, dataset, mask):
            continue
        _, aux_test, _ = METHODS[name].prepare(data, cfg)
        rec = {"method": name}
        if METHODS[name].front.aux_kind == "mfa":
            starts = range(0, len(idx), 250)
            mfas = [aux_test.get(idx[s:s + 250], x[s:s + 250], miss[s:s + 250]) for s in starts]
            nll = torch.cat([-m.log_prob(x_true[s:s + 250], miss[s:s + 250]) for s, m in zip(starts, mfas)])
            mean = torch.cat([m.mean() for m in mfas])
            var = torch.cat([m.variance() for m in mfas])
            rec["nll"] = float(nll.mean())
            rec["pred_std"] = float(var.sqrt()[J].mean())
        elif METHODS[name].front.aux_kind == "images" and name != "gt":
            mean = aux_test.get(idx, x, miss)
        else:
            mean = torch.zeros_like(x_true)   # zero / mask / pc: the hole is treated as 0 (or skipped)
        err = torch.where(J, mean - x_true, torch.zeros((), dtype=x_true.dtype))
        rec["sse"] = float((err ** 2).sum((1, 2, 3)).mean())
        rec["missing_pixels"] = float(J.sum((1, 2, 3)).float().mean())
        rows.append(rec)
    return pd.DataFrame(rows).set_index("method")


# ============================================================================ tables and plots
def pivot_table(df, *, with_paper: bool = True, dataset: str | None = None):
    """Table-1-style pivot: rows = methods, columns = masks, cells ``"mean ± std (n)"`` over seeds.

    With ``with_paper`` the paper's Table 1 value follows each column ("paper <mask>"), and the
    authors' single-seed square numbers a last column. Returns a pandas DataFrame of strings.
    """
    import pandas as pd

    if dataset is not None:
        df = df[df["dataset"] == dataset]
    if df.empty:
        return pd.DataFrame()
    masks = [m for m in ("square", "trapezoid", "noise") if m in set(df["mask"])]
    methods = [m for m in METHOD_ORDER if m in set(df["method"])] + sorted(set(df["method"]) - set(METHOD_ORDER))
    g = df.groupby(["method", "mask"])["accuracy"]
    mean, std, cnt = g.mean(), g.std(ddof=1), g.count()
    rows = []
    for meth in methods:
        row = {"method": meth}
        for mk in masks:
            if (meth, mk) in mean.index:
                n = int(cnt[(meth, mk)])
                s = std[(meth, mk)]
                row[mk] = f"{mean[(meth, mk)]:.3f} ± {s:.3f} (n={n})" if n > 1 else f"{mean[(meth, mk)]:.3f} (n=1)"
            else:
                row[mk] = ""
            if with_paper:
                p = PAPER_TABLE1.get(meth, {}).get(mk)
                row[f"paper {mk}"] = f"{p:.3f}" if p is not None else ""
        if with_paper:
            a = AUTHORS_SQUARE.get(meth)
            row["authors' code, square"] = f"{a:.4f}" if a is not None else ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def paired_differences(df, method: str, baseline: str):
    """Accuracy of ``method`` minus ``baseline``, seed by seed, per (dataset, mask).

    Cells with the same seed share their masks, initialisation and batch order, so the per-seed
    difference removes most of the noise that separate means carry. Returns a DataFrame indexed by
    (dataset, mask) with ``mean``, ``std`` (over seeds; NaN for one seed), ``n`` and ``seeds`` (the
    per-seed differences, seed order); only seeds where both methods finished count.
    """
    import pandas as pd

    for m in (method, baseline):
        if m not in set(df["method"]):
            raise ValueError(f"no results for method {m!r}; have {sorted(set(df['method']))}")
    a = df[df["method"] == method].set_index(["dataset", "mask", "seed"])["accuracy"]
    b = df[df["method"] == baseline].set_index(["dataset", "mask", "seed"])["accuracy"]
    d = (a - b).dropna().sort_index()
    rows = []
    for (ds, mk), grp in d.groupby(level=["dataset", "mask"]):
        rows.append({"dataset": ds, "mask": mk, "mean": float(grp.mean()),
                     "std": float(grp.std(ddof=1)) if len(grp) > 1 else float("nan"), "n": int(len(grp)),
                     "seeds": [round(float(v), 4) for v in grp]})
    return pd.DataFrame(rows, columns=["dataset", "mask", "mean", "std", "n", "seeds"]).set_index(["dataset", "mask"])


def table_markdown(df, **kw) -> str:
    """:func:`pivot_table` as a Markdown table (for the README), best mean per mask in bold."""
    import pandas as pd

    piv = pivot_table(df, **kw)
    if piv.empty:
        return "(no results yet)"
    means = df.groupby(["method", "mask"])["accuracy"].mean()
    best = {mk: means.xs(mk, level="mask").drop(labels=["gt"], errors="ignore").idxmax()
            for mk in set(df["mask"]) if not means.xs(mk, level="mask").drop(labels=["gt"], errors="ignore").empty}
    cols = list(piv.columns)
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for meth, row in piv.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if c in best and best[c] == meth and v:
                v = f"**{v}**"
            cells.append(v)
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_markdown_table(md_path: str | os.PathLike, df, *, name: str = "classification-table", **kw) -> bool:
    """Replace the text between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` in ``md_path``
    with :func:`table_markdown` of ``df`` (plus a line saying how many cells it holds).

    Returns True if the file changed. Raises ``ValueError`` if the markers are missing.
    """
    n_cells = len(df)
    seeds = sorted(set(int(s) for s in df["seed"])) if n_cells else []
    body = (f"_Generated from the CSV by `labkit.classifier.update_markdown_table`: {n_cells} cells, "
            f"seeds {seeds}._\n\n" + table_markdown(df, **kw))
    return replace_marked_block(md_path, name, body)


def replace_marked_block(md_path: str | os.PathLike, name: str, body: str) -> bool:
    """Put ``body`` between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` in ``md_path``.

    Returns True if the file changed. Raises ``ValueError`` if the markers are missing.
    """
    path = Path(md_path)
    text = path.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{path} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = head + start + "\n" + body.strip("\n") + "\n" + end + tail
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False


#: what the paired table compares: (MisConv over a density, mean imputation from the same density)
#: and MisConv against the two strongest density-free baselines
PAIRS = [("dmfa_misconv_complete", "dmfa_mean_complete"), ("dmfa_misconv_incomplete", "dmfa_mean_incomplete"),
         ("mfa_misconv", "mfa_mean"), ("dmfa_misconv_complete", "pc"), ("dmfa_misconv_complete", "mask"),
         ("dmfa_misconv_incomplete", "pc")]


def paired_markdown(df, pairs: Sequence[tuple[str, str]] = PAIRS) -> str:
    """:func:`paired_differences` for ``pairs`` as a Markdown table: one row per pair, one column per
    mask, cells "mean ± std (n)" in accuracy *points* (×100). Pairs lacking results are left out."""
    masks = [m for m in ("square", "trapezoid", "noise") if m in set(df["mask"])]
    lines = ["| MisConv variant − other method | " + " | ".join(masks) + " |", "|---" * (len(masks) + 1) + "|"]
    have = set(df["method"])
    for a, b in pairs:
        if not {a, b} <= have:
            continue
        d = paired_differences(df, a, b)
        cells = []
        for mk in masks:
            rows = d[d.index.get_level_values("mask") == mk]
            if rows.empty:
                cells.append("")
                continue
            r = rows.iloc[0]
            sd = "" if r["n"] < 2 else f" ± {100 * r['std']:.2f}"
            cells.append(f"{100 * r['mean']:+.2f}{sd} (n={int(r['n'])})")
        lines.append(f"| `{a}` − `{b}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(df, path: str | os.PathLike | None = None, *, title: str | None = None):
    """Bar chart: accuracy per method (mean over seeds, error bars = std; dots = seeds) per mask,
    with the paper's Table 1 values as black ticks. Saves to ``path`` when given; returns the figure."""
    import matplotlib

    if path is not None:
        matplotlib.use(matplotlib.get_backend())
    import matplotlib.pyplot as plt

    masks = [m for m in ("square", "trapezoid", "noise") if m in set(df["mask"])]
    methods = [m for m in METHOD_ORDER if m in set(df["method"])]
    # one y range per mask: the trapezoid column sits ~30 points below the others, and a shared axis
    # would flatten the differences that matter within each column
    fig, axes = plt.subplots(1, max(1, len(masks)), figsize=(4.2 * max(1, len(masks)), 4.6), squeeze=False)
    for ax, mk in zip(axes[0], masks):
        sub = df[df["mask"] == mk]
        for i, meth in enumerate(methods):
            acc = sub[sub["method"] == meth]["accuracy"].to_numpy()
            if len(acc) == 0:
                continue
            ax.bar(i, acc.mean(), yerr=acc.std(ddof=1) if len(acc) > 1 else 0, color="C0" if "misconv" not in meth
                   else "C3", alpha=0.75, capsize=3)
            ax.plot(np.full(len(acc), i), acc, "k.", ms=3)
            p = PAPER_TABLE1.get(meth, {}).get(mk)
            if p is not None:
                ax.plot([i - 0.4, i + 0.4], [p, p], "k-", lw=2)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_title(mk)
        shown = list(sub["accuracy"]) + [v for m in methods if (v := PAPER_TABLE1.get(m, {}).get(mk)) is not None]
        ax.set_ylim(max(0.0, min(shown) - 0.03), 1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    legend = "bars: ours (mean ± std over seeds, dots: seeds; red: MisConv); black ticks: paper's Table 1"
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=10)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
