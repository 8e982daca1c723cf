"""Mixed-precision training: Lightning's precision names on top of ``torch.autocast``.

Names (as in PyTorch Lightning):

- ``"32"``: float32 everywhere (autocast off, no gradient scaling).
- ``"bf16-mixed"``: the forward pass runs under ``torch.autocast(dtype=torch.bfloat16)``;
  parameters, gradients, optimizer state and the loss stay float32. bfloat16 has float32's
  exponent range, so no gradient scaling is needed.
- ``"16-mixed"``: autocast to float16 with a :class:`torch.amp.GradScaler` (float16 gradients
  underflow without scaling). CUDA only.
- ``"auto"``: ``"bf16-mixed"`` where the device computes bfloat16 natively (a CPU with
  AVX512-BF16 or AMX-BF16, ARM SVE-BF16; a CUDA GPU for which ``torch.cuda.is_bf16_supported``
  holds), else ``"32"``. :func:`resolve_precision` turns it into one of the three above.

How a training step uses it (``fit`` records the precision, the step places the autocast)::

    prec = resolve_precision("auto", device)
    scaler = grad_scaler(prec, device)
    with autocast(prec, device):                 # forward only
        heads = network(x)                       # bfloat16 activations
    loss = likelihood(*to_float32(*heads))       # float32, outside autocast
    optimizer.zero_grad()
    scaler.scale(loss).backward()                # backward outside autocast
    scaler.step(optimizer)
    scaler.update()

Why backward must run outside autocast: autograd replays the forward's ops under the autocast
state of the thread that calls ``backward``, so a float32 region of the forward (a likelihood, a
Cholesky, MisConv's expected ReLU) would get its gradient computed in bfloat16. Measured: the
gradient of ``(bf16 matmul → float32 matmul → sum of squares)`` differs by 0.6 % relative when
backward runs inside autocast. Code that must stay float32 inside an autocast forward runs under
:func:`float32_region`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from labkit.device import resolve_device

__all__ = [
    "PRECISIONS",
    "autocast",
    "autocast_dtype",
    "cpu_has_native_bf16",
    "device_has_native_bf16",
    "float32_region",
    "recording",
    "grad_scaler",
    "resolve_precision",
    "to_float32",
]

#: the precision names :func:`resolve_precision` accepts
PRECISIONS = ("32", "bf16-mixed", "16-mixed", "auto")
_RESOLVED = ("32", "bf16-mixed", "16-mixed")
_DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
#: CPU feature flags (torch.cpu.get_capabilities / /proc/cpuinfo names) that mean native bf16 math
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "sve_bf16", "bf16")


def _device(device: Any) -> torch.device:
    return resolve_device(device)


def _check_name(precision: Any) -> str:
    # int 32 and "fp32"/"float32" are not accepted: one spelling per precision keeps configs
    # and checkpoints comparable.
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(repr(p) for p in PRECISIONS)}")
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16, AMX-BF16 or ARM SVE/NEON BF16).

    ``torch.backends.cpu.get_cpu_capability()`` only says ``"AVX512"``, which does not tell
    AVX512-BF16 apart, so this reads the feature flags (``torch.cpu.get_capabilities``, else
    ``/proc/cpuinfo``).
    """
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            caps = get()
            return any(bool(caps.get(flag, False)) for flag in _CPU_BF16_FLAGS)
        except (RuntimeError, AttributeError):  # pragma: no cover - torch without cpuinfo
            pass
    try:  # pragma: no cover - older torch
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _CPU_BF16_FLAGS)
    except OSError:  # pragma: no cover
        pass
    return False  # pragma: no cover


def device_has_native_bf16(device: Any) -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: :func:`cpu_has_native_bf16`; CUDA:
    ``torch.cuda.is_bf16_supported`` without emulation; other devices: False)."""
    dev = _device(device)
    if dev.type == "cpu":
        return cpu_has_native_bf16()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(dev):
            try:
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # pragma: no cover - older torch without the keyword
                return bool(torch.cuda.is_bf16_supported())
    return False


def resolve_precision(precision: str, device: Any = None) -> str:
    """``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (never ``"auto"``) for training on ``device``.

    Args:
        precision: one of :data:`PRECISIONS`.
        device: where the model trains (``None``: :func:`labkit.device.resolve_device`).

    Raises:
        ValueError: an unknown name (the message lists the valid ones); ``"16-mixed"`` on a device
            other than CUDA; ``"bf16-mixed"`` on a device where torch has no bfloat16 autocast.
    """
    name = _check_name(precision)
    dev = _device(device)
    if name == "auto":
        return "bf16-mixed" if device_has_native_bf16(dev) else "32"
    if name == "16-mixed" and dev.type != "cuda":
        raise ValueError(
            f"precision '16-mixed' (float16 autocast with gradient scaling) needs a CUDA device, got {str(dev)!r}; "
            "on a CPU use 'bf16-mixed' or 'auto'"
        )
    if name == "bf16-mixed":
        if dev.type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision 'bf16-mixed' is not supported by {torch.cuda.get_device_name(dev)}; "
                             "use '16-mixed' or '32'")
        if not torch.amp.is_autocast_available(dev.type):
            raise ValueError(f"precision 'bf16-mixed': torch has no autocast for device type {dev.type!r}; use '32'")
    return name


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision: bfloat16, float16, or None for ``"32"``."""
    name = _check_name(precision)
    if name == "auto":
        raise ValueError("autocast_dtype needs a resolved precision; call resolve_precision(precision, device) first")
    return _DTYPES[name]


# ---------------------------------------------------------------------------- what a step entered
# labkit.training.fit checks that a step run under a mixed precision really entered autocast with
# it; otherwise a run recorded as "bf16-mixed" would silently train in float32.
_local = threading.local()


def _record(name: str) -> None:
    stack = getattr(_local, "stack", None)
    if stack:
        stack[-1].add(name)


@contextlib.contextmanager
def recording() -> Iterator[set[str]]:
    """Collect the resolved precisions :func:`autocast` was entered with inside the block."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    seen: set[str] = set()
    stack.append(seen)
    try:
        yield seen
    finally:
        stack.pop()


@contextlib.contextmanager
def autocast(precision: str, device: Any = None) -> Iterator[None]:
    """Run the block under ``torch.autocast`` for ``precision`` (a no-op for ``"32"``).

    Wrap the forward pass only; compute float32 losses and call ``backward`` outside (see the
    module docstring). ``precision`` may be ``"auto"`` (resolved for ``device``).
    """
    dev = _device(device)
    name = resolve_precision(precision, dev)
    _record(name)
    dtype = _DTYPES[name]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=dev.type, dtype=dtype):
        yield


@contextlib.contextmanager
def float32_region(device: Any = None) -> Iterator[None]:
    """Disable autocast inside an autocast block: ops run in their inputs' dtype (cast them with
    :func:`to_float32`). For likelihoods, Cholesky factorisations, MisConv's expected ReLU."""
    dev = _device(device)
    if not torch.amp.is_autocast_available(dev.type):
        yield
        return
    with torch.autocast(device_type=dev.type, enabled=False):
        yield


def grad_scaler(precision: str, device: Any = None) -> torch.amp.GradScaler:
    """A :class:`torch.amp.GradScaler` for ``"16-mixed"``; a disabled one (every method a
    pass-through: ``scale(loss)`` returns ``loss``, ``step(opt)`` calls ``opt.step()``,
    ``unscale_``/``update`` do nothing, ``state_dict()`` is ``{}``) for the other precisions.
    """
    dev = _device(device)
    name = resolve_precision(precision, dev)
    kind = dev.type if torch.amp.is_autocast_available(dev.type) else "cpu"
    return torch.amp.GradScaler(kind, enabled=(name == "16-mixed"))


def _cast(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _cast(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init
                   and isinstance(getattr(value, f.name), Tensor)}
        return dataclasses.replace(value, **changes) if changes else value
    if value is None:
        return None
    raise TypeError(f"to_float32 takes tensors, dataclasses of tensors (e.g. an MFA) or None, got {type(value).__name__}")


def to_float32(*tensors: Any) -> Any:
    """Cast bfloat16/float16 tensors to float32 (other tensors unchanged; gradients flow through).

    Accepts tensors, ``None`` and dataclasses holding tensors (a :class:`labkit.mfa.MFA`: its
    fields are cast). Returns the single value for one argument, else a tuple in order.
    """
    if not tensors:
        raise TypeError("to_float32 needs at least one tensor")
    out = tuple(_cast(t) for t in tensors)
    return out[0] if len(out) == 1 else out

