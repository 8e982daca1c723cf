"""Where tensors live. Every model and study takes a ``device`` argument; ``None`` means this default."""
from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when a GPU is usable, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` -> :func:`default_device`; anything else -> ``torch.device(device)``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return default_device()
    return torch.device(device)
