"""The WAE study's feature network: the classifier whose penultimate features the Fréchet distances
compare (trained on complete images, stored under a digest of its settings and data)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from labkit import paths
from labkit.checkpoint import CheckpointError, load_checkpoint, load_or_train
from labkit.device import resolve_device
from labkit.models.classifier import build_classifier, evaluate_accuracy, train_classifier
from labkit.studies import engine
from labkit.studies.cells import CellData, load_cell_data
from labkit.studies.engine import InputError
from labkit.studies.imputers import TensorAux
from labkit.studies.wae_report import scratch_path

__all__ = ["FEATURE_RECIPE", "classifier_features", "feature_data", "feature_map", "feature_network"]

#: the feature classifier's training recipe (the classification study's: Adam 1e-3, batch 24)
FEATURE_RECIPE = {"batch_size": 24, "lr": 1e-3, "seed": 0, "init_seed": 12345, "select": "last",
                  "front": "gt", "layer": "input of the last linear layer"}


def feature_data(dataset: str, cfg, data: CellData | None = None) -> CellData:
    """The cell data whose (complete) training images the feature classifier trains on: the first
    ``cfg.feature_n_train`` training images (default: those of the cells, ``data`` when given)."""
    n = cfg.n_train if cfg.feature_n_train is None else cfg.feature_n_train
    if data is not None and n == cfg.n_train:
        return data
    return load_cell_data(dataset, cfg.mask, 0, n_train=n, n_test=cfg.n_test, val_fraction=0.0)


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


def feature_map(model: nn.Module, batch_size: int):
    """``images (n, C, H, W) -> features (n, F)`` with the classifier ``model`` (:func:`classifier_features`)."""
    def features(images: Tensor) -> Tensor:
        return classifier_features(model, images, batch_size=batch_size)
    return features


_FEATURE_NETS: dict[str, tuple[nn.Module, dict]] = {}


def feature_network(dataset: str, cfg, *, progress: bool = True):
    """The lab's feature network for the Fréchet distances: the classification study's classifier
    with the ground-truth front, trained on complete training images (:data:`FEATURE_RECIPE`,
    ``cfg.feature_epochs`` epochs).

    Stored as ``<scratch>/feature-net-<dataset>-<digest>.pt``, the digest covering its training
    settings and the content hash of its training images, so another setting or other data trains
    another file (a stored one is reused only with an equal config). With ``cfg.feature_checkpoint``
    that file is loaded instead (an input of the study). Returns ``(classifier, meta)``;
    ``meta["test_accuracy"]`` is on the complete test images. ``progress``: its training's bars.
    """
    dev = resolve_device(cfg.device)
    data = feature_data(dataset, cfg)
    C, H = data.train_images.shape[1], data.train_images.shape[2]
    arch = data.arch

    def build():
        torch.manual_seed(FEATURE_RECIPE["init_seed"])
        return build_classifier(arch, "gt", in_channels=C, image_size=H)

    if cfg.feature_checkpoint:
        path = paths.repo_path(cfg.feature_checkpoint)
        stored = load_checkpoint(path, map_location=dev, input_role="feature classifier checkpoint")
        if stored is None:
            raise InputError(f"feature classifier checkpoint {str(path)!r} does not exist (it is an input of this "
                             "study: train or restore it)")
        model = build().to(dev)
        try:
            model.load_state_dict(stored["model"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"feature classifier checkpoint {str(path)!r} does not fit the {arch} classifier "
                                  f"({type(exc).__name__}: {exc}); it is an input of this study") from exc
        return model.eval(), dict(stored.get("meta") or {})

    config = {"dataset": dataset, "arch": arch, **FEATURE_RECIPE, "epochs": cfg.feature_epochs,
              "n_train": int(len(data.train_images)),
              "train_sha": engine.tensor_digest(data.train_images, data.train_labels)}
    path = scratch_path(cfg) / f"feature-net-{dataset}-{engine.digest(config, 8)}.pt"
    memo = str(path.resolve())
    if memo in _FEATURE_NETS and path.is_file():
        return _FEATURE_NETS[memo]

    def train(model):
        model.to(dev)
        train_classifier(model, data, TensorAux(data.train_images), epochs=cfg.feature_epochs,
                         batch_size=FEATURE_RECIPE["batch_size"], lr=FEATURE_RECIPE["lr"], seed=FEATURE_RECIPE["seed"],
                         select=FEATURE_RECIPE["select"], device=dev, progress=progress)
        none = torch.zeros_like(data.test_missing)
        acc = evaluate_accuracy(model, data.test_images, data.test_labels, none, TensorAux(data.test_images),
                                batch_size=cfg.eval_batch)
        return {"test_accuracy": round(acc, 4), "n_test": len(data.test_images),
                "features": "input of the last linear layer (lin20 after ReLU)"}

    _FEATURE_NETS[memo] = load_or_train(path, build, train, device=dev, quiet=not progress, config=config)
    return _FEATURE_NETS[memo]
