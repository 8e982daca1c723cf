"""The one torch log message labkit silences: "No CUDA runtime is found, using CUDA_HOME=...".

torch logs it when ``torch.utils.cpp_extension`` is first imported (by ``torch.compile`` and by
``torch.utils.benchmark``) on a machine with a CUDA toolkit but no GPU. labkit builds no CUDA
extension, so the notice says nothing about its results. Kept apart from :mod:`labkit.lab.kernel`
(which re-exports it) so that importing the package never imports the kernel module that
``python -m labkit.lab.kernel`` runs as ``__main__``.
"""
from __future__ import annotations

import logging

__all__ = ["CudaHomeNotice", "quiet_cuda_home_notice"]


class CudaHomeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." record; passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_cuda_home_notice() -> None:
    """Install :class:`CudaHomeNotice` on torch's ``torch.utils.cpp_extension`` logger (once).

    Works before torch is imported: the logger object is created here and torch keeps its filters.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, CudaHomeNotice) for f in logger.filters):
        logger.addFilter(CudaHomeNotice())
