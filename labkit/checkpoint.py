"""Checkpoints that survive interruptions, and "load if trained, else train" for the notebooks.

- :func:`atomic_save` writes through a temporary file in the target directory, fsyncs it and
  renames it over the target with :func:`os.replace`. A crash or Ctrl-C mid-save therefore leaves
  either the previous checkpoint or the new one, never a truncated file.
- :func:`load_checkpoint` returns ``None`` for an absent file and raises :class:`CheckpointError`
  (naming the path) for an unreadable one, instead of torch's bare unpickling error.
- :func:`load_or_train` is what a notebook cell calls: the first run trains and saves
  ``{"model": state_dict, "meta": {...}}``; later runs load it and say where it came from.
- ``meta['machine']`` records which machine produced a result (:func:`labkit.machine.machine_summary`).
- :func:`read_whole_csv` is the reading side of atomic writes for tables that scripts merge into:
  a CSV cut short or malformed is refused with an error naming the file and line
  (:class:`TableFileError`), never read as the rows that happen to be there.

Resumable *training* (optimizer, RNG, epoch counter) lives in :mod:`labkit.training`; its files go
through the same :func:`atomic_save`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labkit.device import resolve_device
from labkit.machine import machine_summary

__all__ = [
    "CheckpointError",
    "ConfigMismatchError",
    "config_differences",
    "atomic_save",
    "load_checkpoint",
    "load_or_train",
    "partial_path",
    "read_whole_csv",
    "TableFileError",
]


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (corrupt, wrong layout, or from another run)."""


class ConfigMismatchError(CheckpointError, ValueError):
    """A checkpoint exists but was made with another configuration than the one requested."""


class TableFileError(ValueError):
    """A table file (CSV) is empty, cut short or malformed: it cannot be read as a whole."""


def read_whole_csv(path: str | os.PathLike, *, required: Sequence[str] = ()):
    """Read a CSV written whole (e.g. by ``DataFrame.to_csv`` through an atomic write) as a DataFrame,
    refusing one that is not.

    Refused with :class:`TableFileError` naming ``path`` (and the line): an empty file, a last line
    without its line end (the write was cut short), a row with another number of fields than the
    header, a ``required`` column absent from the header or empty in a row. A file that lost whole
    rows at a line end cannot be told from a shorter table; writes that go through a temporary
    file and :func:`os.replace` (:func:`labkit.studies.engine.write_files`) never leave one.
    """
    import pandas as pd

    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise TableFileError(f"{path} is empty: not a table (restore it, or delete it to start afresh)")
    if not data.endswith(b"\n"):
        raise TableFileError(f"{path} ends in the middle of a line: the write that made it was cut short "
                             "(restore it, e.g. with git checkout, or delete it to start afresh)")
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TableFileError(f"{path} is not a readable CSV ({exc})") from exc
    header = rows[0]
    absent = [c for c in required if c not in header]
    if absent:
        raise TableFileError(f"{path} lacks the column(s) {absent} (header: {header})")
    where = [header.index(c) for c in required]
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise TableFileError(f"{path}, line {number}: {len(row)} fields, the header has {len(header)} "
                                 "(a damaged or cut file: restore it, or delete it to start afresh)")
        empty = [required[i] for i, j in enumerate(where) if row[j] == ""]
        if empty:
            raise TableFileError(f"{path}, line {number}: empty {empty}")
    return pd.read_csv(path)


def config_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any],
                       legacy: Mapping[str, Any] | None = None) -> list[str]:
    """The keys of ``wanted`` whose value differs from ``stored`` (JSON-normalised), as
    ``"key: stored X, requested Y"`` lines. ``legacy`` gives the value to assume for keys that a
    file written before the key existed lacks (e.g. ``{"precision": "32"}``)."""
    def norm(v):
        return json.loads(json.dumps(v, sort_keys=True, default=str))

    legacy = dict(legacy or {})
    out = []
    for key in sorted(wanted):
        have = stored[key] if key in stored else legacy.get(key, "<absent>")
        if norm(have) != norm(wanted[key]):
            out.append(f"{key}: stored {have!r}, requested {wanted[key]!r}")
    return out


def _current_umask() -> int:
    # os.umask can only be read by setting it; restore immediately.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` such that an interrupted save never leaves a broken ``path``.

    The object is written to a temporary file in ``path``'s directory (same file system, so the
    final rename is atomic), flushed and fsynced, then moved over ``path`` with :func:`os.replace`.
    Missing parent directories are created. On any failure the temporary file is removed and the
    previous ``path`` (if any) is left untouched.

    Returns the path as a :class:`~pathlib.Path`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory, expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the checkpoint the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Make the rename itself durable (best effort: not every file system supports it).
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = None,
    *,
    weights_only: bool = True,
    input_role: str | None = None,
) -> Any | None:
    """Load a file written by :func:`atomic_save`; ``None`` if ``path`` does not exist.

    ``map_location=None`` keeps tensors where they were saved, except that on a machine without
    CUDA everything is mapped to the CPU (so a GPU-trained checkpoint opens on a laptop).
    ``weights_only=True`` (torch's safe unpickler) accepts tensors, dicts, lists, tuples, numbers
    and strings, which is all labkit stores.

    ``input_role`` says that the file is an *input* of the caller (e.g. "complete-data DMFA
    checkpoint"): its error then says so, instead of suggesting to delete it (deleting an input
    does not retrain it).

    Raises :class:`CheckpointError` naming ``path`` when the file is corrupt or unreadable.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, expected a file")
    if map_location is None and not torch.cuda.is_available():
        map_location = "cpu"
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        what = f"{input_role} {str(path)!r}" if input_role else f"checkpoint {str(path)!r}"
        hint = ("it is an input of this step: restore it, or retrain it with the step that makes it"
                if input_role else "delete it to retrain")
        raise CheckpointError(f"{what} is corrupt or unreadable ({type(exc).__name__}: {exc}); {hint}") from exc


def partial_path(path: str | os.PathLike) -> Path:
    """Where a resumable training run for the final checkpoint ``path`` keeps its progress.

    ``results/x/dmfa.pt`` -> ``results/x/dmfa.partial.pt``. Pass it as ``checkpoint=`` to
    :func:`labkit.training.fit` inside the ``train`` function of :func:`load_or_train`, so an
    interrupted notebook resumes training instead of starting over.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix or '.pt'}")


def _json_check(meta: Any, what: str) -> dict:
    if not isinstance(meta, Mapping):
        raise TypeError(f"{what} must be a dict of JSON-able values, got {type(meta).__name__}")
    try:
        text = json.dumps(dict(meta), sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-able (numbers, strings, lists, dicts): {exc}") from exc
    return json.loads(text)


def _summary(meta: Mapping) -> str:
    items = [f"{k}={v}" for k, v in meta.items() if k not in ("machine", "trained_at")]
    text = ", ".join(items)
    return text if len(text) <= 160 else text[:157] + "..."


def load_or_train(
    path: str | os.PathLike,
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], Mapping[str, Any]],
    *,
    device: str | torch.device | None = None,
    quiet: bool = False,
    config: Mapping[str, Any] | None = None,
    legacy: Mapping[str, Any] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, dict]:
    """Return a trained model: load it from ``path`` if it exists, else train and save it.

    Args:
        path: checkpoint file; it stores ``{"model": state_dict, "meta": meta}``.
        build: ``() -> nn.Module``, builds the untrained architecture (called in both cases).
        train: ``(model) -> meta``, trains the model in place (already on ``device``) and returns a
            JSON-able dict describing the setting (data, sizes, epochs, seed, ...). ``machine``
            (:func:`labkit.machine.machine_summary`), ``trained_at`` and ``train_seconds`` are
            added when absent.
            To survive interruptions, it can run :func:`labkit.training.fit` with
            ``checkpoint=partial_path(path)``; that file is deleted once ``path`` is saved.
        device: where the model lives (``None``/``"auto"``: CUDA if available).
        quiet: suppress the one-line "loaded ..." / "trained ..." message.
        config: the settings the model must have been trained with (sizes, epochs, lr, seed, dtype,
            precision, ...). A stored model is reused only when its meta has every key of ``config``
            with an equal value; otherwise :class:`ConfigMismatchError` names the differences (pick
            another path, or delete the file to retrain). After training, ``config`` is merged into
            the saved meta. ``legacy``: values to assume for keys an older file lacks.
        weights_dtype: store the floating-point weights in this dtype (e.g. ``torch.float16``,
            half the file). The trained model is rounded to the stored values before it is returned,
            so everything computed from it (its scores, the studies that load it) uses exactly the
            weights in the file; the model keeps its own dtype.

    Returns:
        ``(model, meta)`` with the model in eval mode on ``device``.

    Raises:
        CheckpointError: the file is corrupt, lacks ``model``/``meta``, or does not fit ``build()``.
        TypeError: ``build`` did not return an ``nn.Module`` or ``train`` returned non-JSON-able meta.
    """
    path = Path(path)
    device = resolve_device(device)
    model = build()
    if not isinstance(model, nn.Module):
        raise TypeError(f"build() must return an nn.Module, got {type(model).__name__}")
    model = model.to(device)

    stored = load_checkpoint(path, map_location=device)
    if stored is not None:
        if not isinstance(stored, Mapping) or "model" not in stored or "meta" not in stored:
            keys = sorted(stored) if isinstance(stored, Mapping) else type(stored).__name__
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a load_or_train file (expected keys 'model' and "
                f"'meta', found {keys}); delete it to retrain"
            )
        try:
            model.load_state_dict(stored["model"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match the model built now ({exc}); "
                "the architecture changed: delete the file to retrain"
            ) from exc
        meta = dict(stored["meta"])
        if config is not None:
            diffs = config_differences(meta, config, legacy)
            if diffs:
                raise ConfigMismatchError(
                    f"checkpoint {str(path)!r} was trained with another configuration ("
                    + "; ".join(diffs) + "): not reusing it. Use another checkpoint path for the new "
                    "setting, or delete the file to retrain")
        model.eval()
        if not quiet:
            print(f"loaded {path} (trained on {meta.get('machine', 'unknown machine')}, {_summary(meta)})")
        return model, meta

    model.train()
    start = time.perf_counter()
    meta = train(model)
    seconds = time.perf_counter() - start
    meta = _json_check(meta, "train(model) return value (meta)")
    if config is not None:
        meta = {**meta, **_json_check(config, "config")}
    meta.setdefault("machine", machine_summary())
    meta.setdefault("trained_at", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    meta.setdefault("train_seconds", round(seconds, 1))
    # Store tensors on the CPU so the file opens anywhere; load_checkpoint maps them back.
    state = {
        k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()
    }
    if weights_dtype is not None:
        state = {k: v.to(weights_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in state.items()}
        model.load_state_dict(state)         # copies back in the model's dtype: exactly the stored values
    atomic_save({"model": state, "meta": meta}, path)
    # The final checkpoint supersedes a resumable run's progress file (see partial_path).
    partial_path(path).unlink(missing_ok=True)
    model.eval()
    if not quiet:
        print(f"trained and saved {path} in {seconds:.1f} s ({_summary(meta)})")
    return model, meta
