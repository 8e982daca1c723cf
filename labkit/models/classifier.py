r"""The paper's classifiers with a pluggable missing-data front, their trainer and their accuracy.

Architectures (supplementary section 1.2; ``conv_n`` = conv3×3 (pad 1) → ReLU → BatchNorm,
``down`` = conv3×3 stride 2 (pad 1, channels kept) → ReLU → BatchNorm, ``lin_n`` = Linear → ReLU,
the last ``lin10`` gives logits):

- ``"mnist"`` (also SVHN): ``[conv32, down, [conv64]×2, lin20, lin10]``
- ``"cifar10"``: ``[[conv32, drop0.3]×2, down, [conv64, drop0.3]×3, lin128, drop0.3, lin10]``

The first conv32's ``conv + ReLU`` is the *front* (:mod:`labkit.models.fronts`); its BatchNorm starts
the body. ``Classifier.forward(x, missing, aux)`` returns logits ``(B, 10)``.

:func:`train_classifier` (Adam, cross-entropy, resumable through :func:`labkit.training.fit`, the
epoch with the best validation accuracy kept) and :func:`evaluate_accuracy` read their images from
a data holder with the fields of :class:`labkit.studies.cells.CellData` and the front's ``aux`` from
an object with ``get(idx, x, missing)`` (:class:`labkit.studies.imputers.AuxSource`); images reach
the model with NaN at missing pixels, which proves that nothing leaks through them.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labkit.device import resolve_device
from labkit.masks import with_nan
from labkit.models.fronts import Front, make_front
from labkit.precision import autocast, grad_scaler, resolve_precision, to_float32
from labkit.training import fit

__all__ = [
    "ARCHITECTURES",
    "Classifier",
    "build_classifier",
    "evaluate_accuracy",
    "train_classifier",
]


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

    ``front``: a name of :data:`labkit.models.fronts.FRONTS` (the method names of
    :data:`labkit.studies.imputers.METHODS`), or a Front subclass.
    ``in_channels``/``image_size`` default to the data set's (1×28 for MNIST, 3×32 otherwise).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    C = in_channels if in_channels is not None else (1 if arch == "mnist" else 3)
    S = image_size if image_size is not None else (28 if arch == "mnist" else 32)
    if S % 2:
        raise ValueError(f"image_size must be even (one stride-2 downsampling), got {S}")
    first = make_front(front, C, 32, kernel_size=3, stride=1, padding=1)
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


# ============================================================================ train / evaluate
def evaluate_accuracy(model: Classifier, images: Tensor, labels: Tensor, missing: Tensor, aux: Any,
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
            x = with_nan(x, j.expand_as(x))
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


def train_classifier(model: Classifier, data: Any, aux_train: Any, *, epochs: int, batch_size: int,
                     lr: float, seed: int, checkpoint: str | os.PathLike | None = None, select: str = "best_val",
                     device=None, progress: bool = True, config: dict | None = None,
                     eval_batch: int = 500, precision: str = "32",
                     keep_last_state: bool = False) -> tuple[list[dict], dict]:
    """Train with Adam + cross-entropy on ``data.fit_idx`` (resumable through ``checkpoint``).

    ``precision`` (``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` on CUDA, ``"auto"``; see
    :mod:`labkit.precision`): the forward pass runs under autocast, except a MisConv front, whose
    expected ReLU over the MFA stays float32 (:class:`~labkit.models.fronts.MisConvFront`); the
    cross-entropy and backward run in float32. Recorded in the checkpoint. Validation runs in float32.

    ``select="best_val"`` restores the weights of the epoch with the best validation accuracy
    (ties: the earlier epoch); ``"last"`` keeps the last epoch. Returns ``(history, info)`` with
    ``info = {"epoch_selected", "val_accuracy"}`` (plus, with ``keep_last_state``, ``"last_state"``: the last epoch's weights on the
    CPU, when the best validation epoch was restored).
    """

    if select not in ("best_val", "last"):
        raise ValueError(f"select must be 'best_val' or 'last', got {select!r}")
    dev = resolve_device(device)
    model.to(dev)
    precision = resolve_precision(precision, dev)
    scaler = grad_scaler(precision, dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    fit_idx = data.fit_idx
    n = len(fit_idx)
    best = _Best()

    def batches(epoch, g):
        order = fit_idx[torch.randperm(n, generator=g)]
        return [order[s:s + batch_size] for s in range(0, n, batch_size)]

    def step(b, epoch, g):
        x, j = data.train_images[b].to(dev), data.train_missing[b].to(dev)
        x = with_nan(x, j.expand_as(x))
        y = data.train_labels[b].to(dev)
        aux = aux_train.get(b, x, j)
        with autocast(precision, dev):
            logits = model(x, j, aux)
        logits = to_float32(logits)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
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
                  evaluate=evaluate if len(data.val_idx) else None, precision=precision, scaler=scaler)
    info = {"epoch_selected": len(history) - 1, "val_accuracy": history[-1].get("val_accuracy") if history else None}
    if select == "best_val" and best.state is not None:
        # the last epoch's weights stay available: the authors reported the last epoch's accuracy
        last_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best.state)
        info = {"epoch_selected": best.epoch, "val_accuracy": best.acc}
        if keep_last_state:
            info["last_state"] = last_state
    model.eval()
    return history, info
