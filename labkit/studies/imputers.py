r"""The missing-data methods of the studies: what each front needs besides ``(x, missing)``.

``METHODS`` maps a name to a :class:`Method`: the front class and the *preparer* that computes,
once per (data set, mask kind, seed) cell (:class:`labkit.studies.cells.CellData`), what the front
needs (``aux``), as an :class:`AuxSource` per split that hands it out batch by batch:

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
``data/cache/classification/``, git-ignored; :func:`cached`), keyed by everything that determines
them: the content hashes of the split and its masks, *which* rows a model was fitted on (a digest of
the row indices into that hashed split: :func:`rows_fingerprint`, so another ``val_fraction`` or
``knn_fit`` is another key even at the same count), the fitted model itself (the MFA mean imputation
is keyed by a digest of the MFA's parameters) and every setting that changes the values. The
preparers read their settings from an :class:`ImputerSettings`, made from a study's config by
:func:`imputer_settings` (the classification and the WAE study share them); :func:`method_available` says
whether a method's checkpoint (DMFA, ACFlow) exists yet.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from labkit import paths
from labkit.checkpoint import CheckpointError
from labkit.device import resolve_device
import labkit.mfa
from labkit.mfa import ClassicalMFA, MFA
from labkit.models.dmfa import load_dmfa, predict_mfa
from labkit.models.acflow_training import load_acflow
from labkit.models.fronts import (ACFlowFront, AuthorsMisConvFront, Front, GroundTruthFront, KNNFront, MaskFront,
                                  MFAMeanFront, MisConvFront, PartialConvFront, ZeroFront)
from labkit.masks import make_masks, with_nan
from labkit.studies.cells import CellData, stable_seed
from labkit.studies.engine import cached, digest, input_fingerprint, InputError, tensor_digest

__all__ = [
    "ACFLOW_IMPUTE_BATCH",
    "METHODS",
    "AuxSource",
    "ConditionedMFAAux",
    "IMPUTER_FIELDS",
    "ImputerSettings",
    "MFAAux",
    "Method",
    "TensorAux",
    "cached",
    "classical_mfa",
    "imputer_settings",
    "method_available",
    "model_fingerprint",
    "prepare_acflow",
    "prepare_knn",
    "prepare_mfa_mean",
    "prepare_mfa_misconv",
    "rows_fingerprint",
]


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


# ============================================================================ caching
def _checkpoint_id(path: Path, role: str) -> dict:
    """The content fingerprint of a checkpoint an imputer reads (it is an input: errors say so)."""
    return input_fingerprint(path, role)


def rows_fingerprint(data: CellData, rows: Tensor) -> dict:
    """What identifies the training rows ``rows`` (int64 indices into ``data.train_*``) a model is
    fitted on: the content hash of the whole training split and its masks (:meth:`CellData.key`)
    and a digest of the indices, so two selections of the same size (another ``val_fraction``,
    another ``knn_fit``) never share a cache entry."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    base = data.key("train")
    return {"data": base["data"], "masks": base["masks"], "n": int(len(rows)), "rows": tensor_digest(rows)}


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, dtypes, shapes, values)."""
    return digest({name: tensor_digest(t) for name, t in model.state_dict().items()})


# ============================================================================ settings
@dataclass(frozen=True)
class ImputerSettings:
    """What the preparers read: k-NN and MFA settings, the DMFA/ACFlow checkpoints, the cache, the
    device. Made from a study's config by :func:`imputer_settings` (no defaults here: the study
    configs hold them, :mod:`labkit.studies.configs`).

    Checkpoint paths are templates (see :meth:`resolve`); relative ones are relative to the
    checkout (:func:`labkit.paths.repo_path`).
    """

    knn_fit: int | None             # incomplete training images the KNNImputer is fitted on (None: all)
    knn_k: tuple[int, ...]          # candidates for n_neighbors, chosen on validation
    knn_val: int                    # validation images used to choose k
    mfa_components: int
    mfa_factors: int
    mfa_iterations: int
    dmfa_complete: str | None
    dmfa_incomplete: str | None
    dmfa_replicates: int            # independently trained DMFAs per kind, for square masks (see resolve)
    acflow: str | None
    acflow_samples: int
    impute_batch: int               # ACFlow's sampling noise depends on it (see ACFLOW_IMPUTE_BATCH)
    cache_dir: str | None           # None: data/cache/classification
    device: torch.device
    progress: bool

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else paths.cache_dir("classification")

    def resolve(self, path: str | None, dataset: str = "mnist", mask: str | None = None,
                seed: int = 0) -> Path | None:
        """A checkpoint path template made concrete: ``{dataset}`` is the data set's name and
        ``{mask_suffix}`` is ``""`` for square masks (or no mask) and ``"_<kind>"`` otherwise, so the
        incomplete-data DMFA of each mask kind can be its own file (trained on that kind's missing data).

        ``{replicate}`` picks one of ``dmfa_replicates`` independently trained DMFAs: on square masks
        the cell of seed ``s`` uses replicate ``r = s % dmfa_replicates``, the file of DMFA seed ``r``
        (``""`` for r = 0, the original file; ``"_s<r>"`` otherwise, as ``./lab study dmfa
        -p seeds=[...]`` names them). Other mask kinds keep replicate 0: one DMFA of their kind was trained."""
        if not path:
            return None
        suffix = "" if mask in (None, "square") else f"_{mask}"
        r = int(seed) % int(self.dmfa_replicates) if mask in (None, "square") else 0
        return paths.repo_path(str(path).replace("{dataset}", dataset).replace("{mask_suffix}", suffix)
                               .replace("{replicate}", f"_s{r}" if r else ""))


#: the fields :func:`imputer_settings` reads from a study config (all required but ``dmfa_replicates``)
IMPUTER_FIELDS = ("knn_fit", "knn_k", "knn_val", "mfa_components", "mfa_factors", "mfa_iterations", "dmfa_complete",
                  "dmfa_incomplete", "acflow", "acflow_samples", "impute_batch", "cache_dir", "device")


def imputer_settings(cfg: Any, *, device: str | torch.device | None = None, progress: bool = True) -> ImputerSettings:
    """The preparers' settings taken from a study config (classification, WAE).

    Reads these attributes of ``cfg`` (:data:`IMPUTER_FIELDS`): ``knn_fit``, ``knn_k``, ``knn_val``,
    ``mfa_components``, ``mfa_factors``, ``mfa_iterations``, ``dmfa_complete``, ``dmfa_incomplete``,
    ``acflow``, ``acflow_samples``, ``impute_batch``, ``cache_dir`` and ``device`` (resolved here
    unless ``device`` is given: :func:`labkit.device.resolve_device`); every one is required, since
    the k-NN, MFA and ACFlow values enter the keys of the cells of those methods. The one optional
    attribute is ``dmfa_replicates`` (default 1: one DMFA per mask kind, what a study that never
    trained replicates reads). ``progress``: show the imputers' progress bars (not a setting of any
    result).

    Raises:
        TypeError: ``cfg`` lacks required attributes (named).
    """
    lacking = [name for name in IMPUTER_FIELDS if not hasattr(cfg, name)]
    if lacking:
        raise TypeError(f"{type(cfg).__name__} lacks the imputer setting(s) {', '.join(lacking)} "
                        "(labkit.studies.imputers.imputer_settings reads them)")
    return ImputerSettings(
        knn_fit=cfg.knn_fit, knn_k=tuple(int(k) for k in cfg.knn_k), knn_val=cfg.knn_val,
        mfa_components=cfg.mfa_components, mfa_factors=cfg.mfa_factors, mfa_iterations=cfg.mfa_iterations,
        dmfa_complete=cfg.dmfa_complete, dmfa_incomplete=cfg.dmfa_incomplete,
        dmfa_replicates=int(getattr(cfg, "dmfa_replicates", 1)), acflow=cfg.acflow, acflow_samples=cfg.acflow_samples,
        impute_batch=cfg.impute_batch, cache_dir=cfg.cache_dir,
        device=resolve_device(cfg.device if device is None else device), progress=bool(progress))


# ============================================================================ methods
@dataclass
class Method:
    """A missing-data method: its front class, its preparer and when it can run."""

    name: str
    front: type[Front]
    prepare: Callable[[CellData, ImputerSettings], tuple[AuxSource, AuxSource, dict]]
    needs: Callable[..., str | None] = field(default=lambda cfg, dataset="mnist", mask=None, seed=0: None)
    description: str = ""
    settings: Callable[[ImputerSettings], dict] = field(default=lambda cfg: {})
    inputs: Callable[..., dict] = field(default=lambda cfg, dataset="mnist", mask=None, seed=0: {})


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
    flat = with_nan(images, missing.expand_as(images)).reshape(N, -1).numpy().astype(np.float64)
    out = np.empty_like(flat)
    for s in _chunks(N, chunk, desc, progress):
        out[s:s + chunk] = imputer.transform(flat[s:s + chunk])
    res = torch.from_numpy(out).to(torch.float32).reshape(images.shape)
    return torch.where(missing.expand_as(images), res, images)


def prepare_knn(data: CellData, cfg: ImputerSettings):
    """k-NN imputation with scikit-learn's ``KNNImputer`` (uniform weights, nan-Euclidean distance).

    - fitted on the *incomplete* training images (NaN at missing pixels; no complete image is
      used), at most ``cfg.knn_fit`` of them (the first ones of the classifier's training split);
    - ``n_neighbors`` chosen from ``cfg.knn_k`` on ``cfg.knn_val`` validation images: an extra
      square (1/4 of the image) is hidden among their *observed* pixels and the k with the lowest
      squared error there wins (only observed values are ever compared);
    - train, validation and test images are then imputed in chunks (progress bar).
    """
    from sklearn.impute import KNNImputer


    fit_rows = data.fit_idx[: cfg.knn_fit] if cfg.knn_fit else data.fit_idx
    # the rows it is fitted on and the validation rows choosing k, by content, not by count
    key = {**data.key("train"), "test": data.key("test"), "method": "knn", "fit": rows_fingerprint(data, fit_rows),
           "k": list(cfg.knn_k), "val": rows_fingerprint(data, data.val_idx[: cfg.knn_val]), "v": 3}

    def compute():
        N, C, H, W = data.train_images.shape
        X_fit = with_nan(data.train_images[fit_rows], data.train_missing[fit_rows].expand(-1, C, -1, -1))
        X_fit = X_fit.reshape(len(fit_rows), -1).numpy().astype(np.float64)
        # choose k: hide an extra square among the observed pixels of validation images
        vidx = data.val_idx[: cfg.knn_val]
        g = torch.Generator().manual_seed(stable_seed("knn-hidden", data.dataset, data.mask, data.seed))
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
def classical_mfa(data: CellData, cfg: ImputerSettings) -> ClassicalMFA:
    """The classical MFA of the data set: EM (:func:`labkit.mfa.fit_mfa`) on the complete images of
    the classifier's training split (not the validation or test images), cached."""

    K, L = cfg.mfa_components, cfg.mfa_factors
    C, H, W = data.train_images.shape[1:]
    fit = rows_fingerprint(data, data.fit_idx)
    fit.pop("masks")                  # fitted on the complete images: the masks play no part
    key = {"dataset": data.dataset, "data": data.key("train")["data"], "n": len(data.train_images),
           "fit": fit, "K": K, "L": L, "iterations": cfg.mfa_iterations, "v": 3}

    def compute():
        model, history = labkit.mfa.fit_mfa(data.train_images[data.fit_idx], K, L, iterations=cfg.mfa_iterations,
                                 seed=0, progress=cfg.progress)
        return {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "history": history}

    v = cached(cfg.cache_path(), f"mfa-{data.dataset}-K{K}-L{L}", key, compute, progress=cfg.progress)
    model = ClassicalMFA.empty(K, L, (C, H, W))
    model.load_state_dict(v["state"])
    return model


def _mfa_mean_images(model: ClassicalMFA, images: Tensor, missing: Tensor, cfg: ImputerSettings, desc: str) -> Tensor:
    dev = cfg.device
    m = model.to(dev)
    out = torch.empty_like(images)
    for s in _chunks(len(images), cfg.impute_batch, desc, cfg.progress):
        x = images[s:s + cfg.impute_batch].to(dev)
        j = missing[s:s + cfg.impute_batch].to(dev)
        with torch.no_grad():
            mean = m.condition(with_nan(x, j.expand_as(x)), ~j).mean()
        out[s:s + cfg.impute_batch] = torch.where(j.expand_as(x), mean, x).cpu()
    return out


def prepare_mfa_mean(data: CellData, cfg: ImputerSettings):
    model = classical_mfa(data, cfg)
    # keyed by the fitted MFA itself: another fit (other rows, settings, data) is another key
    key = {**data.key("train"), "test": data.key("test"), "method": "mfa_mean", "K": cfg.mfa_components,
           "L": cfg.mfa_factors, "iterations": cfg.mfa_iterations, "model": model_fingerprint(model), "v": 3}

    def compute():
        return {"train": _mfa_mean_images(model, data.train_images, data.train_missing, cfg, "MFA mean train").half(),
                "test": _mfa_mean_images(model, data.test_images, data.test_missing, cfg, "MFA mean test").half()}

    v = cached(cfg.cache_path(), f"mfamean-{data.dataset}-{data.mask}-s{data.seed}", key, compute, progress=cfg.progress)
    return TensorAux(v["train"]), TensorAux(v["test"]), {"mfa_K": cfg.mfa_components, "mfa_L": cfg.mfa_factors}


def prepare_mfa_misconv(data: CellData, cfg: ImputerSettings):
    model = classical_mfa(data, cfg)
    src = ConditionedMFAAux(model)
    return src, src, {"mfa_K": cfg.mfa_components, "mfa_L": cfg.mfa_factors}


# ---------------------------------------------------------------------------- DMFA
def _load_input(loader, path: Path, role: str, device):
    """``loader(path, device=device)``; an unreadable file is reported as the *input* it is."""

    try:
        return loader(path, device=device)
    except (CheckpointError, OSError) as exc:
        cause = exc.__cause__ or exc          # the reader's own error, without a loader's generic advice
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise InputError(f"{role} {str(path)!r} cannot be used ({type(cause).__name__}: {first}); it is an "
                         "input of this study: restore it, or retrain it with the command that makes it "
                         "(./lab study dmfa, ./lab study acflow --profile cpu)") from exc


def _dmfa_path(cfg: ImputerSettings, variant: str, dataset: str = "mnist", mask: str | None = None,
               seed: int = 0) -> Path | None:
    return cfg.resolve(cfg.dmfa_complete if variant == "complete" else cfg.dmfa_incomplete, dataset, mask, seed)


def _dmfa_needs(variant: str):
    def needs(cfg: ImputerSettings, dataset: str = "mnist", mask: str | None = None, seed: int = 0) -> str | None:
        p = _dmfa_path(cfg, variant, dataset, mask, seed)
        if p is None:
            return f"no {variant}-data DMFA checkpoint configured"
        if not p.is_file():
            return f"{variant}-data DMFA checkpoint {p} does not exist yet"
        return None
    return needs


def _dmfa_mfas(data: CellData, cfg: ImputerSettings, variant: str) -> dict:
    """Per-image DMFA outputs for train and test (fields stored float16), cached."""

    path = _dmfa_path(cfg, variant, data.dataset, data.mask, data.seed)
    key = {**data.key("train"), "test": data.key("test"), "method": f"dmfa_{variant}",
           "checkpoint": _checkpoint_id(path, f"{variant}-data DMFA checkpoint"), "v": 2}

    def compute():
        dev = cfg.device
        model, _ = _load_input(load_dmfa, path, f"{variant}-data DMFA checkpoint", dev)
        out = {}
        for split, images, missing in data.splits():
            mfa = predict_mfa(model, with_nan(images, missing.expand_as(images)), missing,
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
        path = _dmfa_path(cfg, variant, data.dataset, data.mask, data.seed)
        return out[0], out[1], {"dmfa": str(path), "dmfa_checkpoint": _checkpoint_id(path, f"{variant}-data DMFA checkpoint")}
    return prepare


def _prepare_dmfa_misconv(variant: str):
    def prepare(data, cfg):
        v = _dmfa_mfas(data, cfg, variant)
        path = _dmfa_path(cfg, variant, data.dataset, data.mask, data.seed)
        return MFAAux(v["train"]), MFAAux(v["test"]), {"dmfa": str(path), "dmfa_checkpoint": _checkpoint_id(path, f"{variant}-data DMFA checkpoint")}
    return prepare


# ---------------------------------------------------------------------------- ACFlow
def _acflow_needs(cfg: ImputerSettings, dataset: str = "mnist", mask: str | None = None, seed: int = 0) -> str | None:
    p = cfg.resolve(cfg.acflow, dataset)
    if p is None:
        return "no ACFlow checkpoint configured"
    if not p.is_file():
        return f"ACFlow checkpoint {p} does not exist yet"
    return None


#: the ``impute_batch`` every committed ACFlow result was made with. ACFlow draws its sampling noise
#: batch by batch from one seeded generator, so the imputations depend on the batch (by up to 0.5 on
#: a pixel): another batch enters the cell key and the cache key, this one is left out of both (so
#: the committed keys stay those of their cells)
ACFLOW_IMPUTE_BATCH = 256


def _acflow_batch_setting(cfg: ImputerSettings) -> dict:
    """``{}`` for the committed ``impute_batch`` (:data:`ACFLOW_IMPUTE_BATCH`), else ``{"impute_batch": n}``."""
    n = int(cfg.impute_batch)
    return {} if n == ACFLOW_IMPUTE_BATCH else {"impute_batch": n}


def prepare_acflow(data: CellData, cfg: ImputerSettings):
    """ACFlow imputation: the mean of ``cfg.acflow_samples`` samples of the missing pixels (seeded).

    The noise is drawn ``cfg.impute_batch`` images at a time from one generator per split, so the
    values depend on ``impute_batch``: it is part of the keys unless it is :data:`ACFLOW_IMPUTE_BATCH`.
    """

    path = cfg.resolve(cfg.acflow, data.dataset)
    key = {**data.key("train"), "test": data.key("test"), "method": "acflow",
           "checkpoint": _checkpoint_id(path, "ACFlow checkpoint"), "samples": cfg.acflow_samples,
           **_acflow_batch_setting(cfg), "v": 2}

    def compute():
        dev = cfg.device
        model, _ = _load_input(load_acflow, path, "ACFlow checkpoint", dev)
        out = {}
        for split, images, missing in data.splits():
            g = torch.Generator(device=dev).manual_seed(stable_seed("acflow", data.dataset, split, data.mask, data.seed))
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


def _knn_settings(cfg: ImputerSettings) -> dict:
    return {"knn_fit": cfg.knn_fit, "knn_k": list(cfg.knn_k), "knn_val": cfg.knn_val}


def _mfa_settings(cfg: ImputerSettings) -> dict:
    return {"mfa_components": cfg.mfa_components, "mfa_factors": cfg.mfa_factors,
            "mfa_iterations": cfg.mfa_iterations}


def _dmfa_inputs(variant: str):
    def inputs(cfg: ImputerSettings, dataset: str = "mnist", mask: str | None = None, seed: int = 0) -> dict:
        return {"dmfa": _checkpoint_id(_dmfa_path(cfg, variant, dataset, mask, seed), f"{variant}-data DMFA checkpoint")}
    return inputs


def _acflow_inputs(cfg: ImputerSettings, dataset: str = "mnist", mask: str | None = None, seed: int = 0) -> dict:
    return {"acflow": _checkpoint_id(cfg.resolve(cfg.acflow, dataset), "ACFlow checkpoint")}


def _dmfa_method(name: str, front: type[Front], variant: str, kind: str, description: str) -> Method:
    prepare = _prepare_dmfa_mean(variant) if kind == "mean" else _prepare_dmfa_misconv(variant)
    return Method(name, front, prepare, _dmfa_needs(variant), description, inputs=_dmfa_inputs(variant))


METHODS: dict[str, Method] = {
    "zero": Method("zero", ZeroFront, _no_aux, description="zero imputation"),
    "mask": Method("mask", MaskFront, _no_aux, description="zero imputation + mask channel"),
    "pc": Method("pc", PartialConvFront, _no_aux, description="partial convolution"),
    "knn": Method("knn", KNNFront, prepare_knn, description="k-NN imputation (KNNImputer on incomplete images)",
                  settings=_knn_settings),
    "mfa_mean": Method("mfa_mean", MFAMeanFront, prepare_mfa_mean, description="classical MFA conditional mean",
                       settings=_mfa_settings),
    "mfa_misconv": Method("mfa_misconv", MisConvFront, prepare_mfa_misconv, description="MisConv, classical MFA",
                          settings=_mfa_settings),
    "dmfa_mean_complete": _dmfa_method("dmfa_mean_complete", MFAMeanFront, "complete", "mean",
                                       "DMFA mean imputation (complete-data DMFA)"),
    "dmfa_misconv_complete": _dmfa_method("dmfa_misconv_complete", MisConvFront, "complete", "misconv",
                                          "MisConv, complete-data DMFA"),
    "dmfa_mean_incomplete": _dmfa_method("dmfa_mean_incomplete", MFAMeanFront, "incomplete", "mean",
                                         "DMFA mean imputation (incomplete-data DMFA)"),
    "dmfa_misconv_incomplete": _dmfa_method("dmfa_misconv_incomplete", MisConvFront, "incomplete", "misconv",
                                            "MisConv, incomplete-data DMFA"),
    "dmfa_authors_complete": _dmfa_method("dmfa_authors_complete", AuthorsMisConvFront, "complete", "misconv",
                                          "the authors' first layer (ablation), complete-data DMFA"),
    "dmfa_authors_incomplete": _dmfa_method("dmfa_authors_incomplete", AuthorsMisConvFront, "incomplete", "misconv",
                                            "the authors' first layer (ablation), incomplete-data DMFA"),
    "acflow": Method("acflow", ACFlowFront, prepare_acflow, _acflow_needs, "ACFlow imputation",
                     settings=lambda cfg: {"acflow_samples": cfg.acflow_samples, **_acflow_batch_setting(cfg)},
                     inputs=_acflow_inputs),
    "gt": Method("gt", GroundTruthFront, _gt, description="ground truth (complete images)"),
}


def method_available(name: str, cfg: ImputerSettings, dataset: str = "mnist", mask: str | None = None,
                     seed: int = 0) -> str | None:
    """``None`` if method ``name`` can run now on ``dataset`` with ``mask``-kind missing data (and the
    DMFA replicate of ``seed``), else why not (e.g. its checkpoint does not exist yet)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name].needs(cfg, dataset, mask, seed)
