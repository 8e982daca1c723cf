"""Argument checks shared by the models and the studies, so that a bad setting reads the same
wherever it is given."""
from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["check_images", "check_int"]


def check_int(value, name: str, least: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer (Python or NumPy, not a bool) ``>= least``.

    Raises TypeError (not an integer) or ValueError (below ``least``), both naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


def check_images(images, name: str, shape: tuple[int, int, int] | None = None) -> Tensor:
    """``images`` itself if it is a floating-point tensor ``(N, C, H, W)`` with ``N >= 1`` (and
    ``(C, H, W) == shape`` where given); TypeError or ValueError naming ``name`` otherwise."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {images.dtype}")
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} must have images of shape {tuple(shape)} for this model, got {tuple(images.shape)}")
    return images
