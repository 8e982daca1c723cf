"""The lab's Python kernel: ipykernel, minus torch's CUDA_HOME notice on machines without a GPU.

``python -m labkit.lab.kernel -f CONNECTION_FILE`` is what the papermill runner
(:mod:`labkit.lab.run_notebooks`) and the kernelspec ``./lab jupyter`` ships
(``.jupyter/kernels/python3/kernel.json``) start.

Why: the first ``torch.compile`` (MisConv's fast path) imports ``torch.utils.cpp_extension``,
which logs "No CUDA runtime is found, using CUDA_HOME='...'" (a warning on the
``torch.utils.cpp_extension`` logger, from ``_find_cuda_home``) whenever an ``nvcc`` or
``/usr/local/cuda`` exists but no GPU does. It says nothing about the notebook's results and lands
in the notebook's output as a red stderr line. Only that one message of that one logger is
dropped; every other torch warning still shows.
"""
from __future__ import annotations

from labkit._torch_notices import CudaHomeNotice, quiet_cuda_home_notice

__all__ = ["CudaHomeNotice", "quiet_cuda_home_notice"]


if __name__ == "__main__":
    quiet_cuda_home_notice()
    from ipykernel.kernelapp import launch_new_instance

    launch_new_instance()
