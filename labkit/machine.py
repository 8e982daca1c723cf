"""Which machine a result comes from, and the one process setting that changes timings on it.

:func:`machine_description` is the full record (a dict: the timing tables store its fields),
:func:`machine_summary` the one line that checkpoints and result files store under ``machine``.
:func:`tune_malloc` keeps freed memory in the process (see its docstring); the description says
whether it is on, since it changes small-layer timings on the CPU several-fold.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from typing import Any

import torch

from labkit.device import resolve_device
from labkit.misconv_fast import compile_enabled

__all__ = ["machine_description", "machine_summary", "tune_malloc", "malloc_tuned", "cpu_model"]

_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``: M_MMAP_MAX = 0, M_TRIM_THRESHOLD and
    M_TOP_PAD large), so new tensors reuse pages instead of faulting fresh ones. Returns whether it
    applied (False off glibc). Irreversible for the process; harmless apart from a larger RSS."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
        ok &= libc.mallopt(M_TOP_PAD, 64 << 20) == 1
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` has been applied in this process."""
    return _MALLOC_TUNED


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` knows (may be "")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device=None) -> dict[str, Any]:
    """Where figures come from, for ``device`` (default: :func:`labkit.device.resolve_device`'s):
    ``device``, ``gpu`` (its name, "" off CUDA), ``cpu``, ``cpu_cores`` (``os.cpu_count()``),
    ``torch_threads``, ``torch``, ``python``, ``load_average_1_5_15``, ``misconv_compile``
    (whether MisConv's fast path may use torch.compile), ``malloc_tuned`` (:func:`tune_malloc`)
    and ``time`` (local, ``YYYY-mm-dd HH:MM:SS``)."""
    dev = resolve_device(device)
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "",
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15": tuple(round(v, 2) for v in load),
        "misconv_compile": compile_enabled(),
        "malloc_tuned": malloc_tuned(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def machine_summary() -> str:
    """One line saying where a result was computed: CPU model, the cores this process may use,
    torch version, every CUDA device (or "no CUDA"). Stored as ``machine`` in checkpoints and
    result files.

    Example: ``"AMD EPYC (2 cores), torch 2.14.1, CUDA: NVIDIA H100 80GB HBM3"``.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 0
    parts = [f"{cpu_model() or 'unknown CPU'} ({cores} cores)", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append("CUDA: " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    else:
        parts.append("no CUDA")
    return ", ".join(parts)
