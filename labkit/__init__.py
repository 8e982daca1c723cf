"""labkit: the importable core of misconv-lab.

MisConv (Przewięźlikowski, Śmieja, Struski, Tabor): a conv+ReLU layer whose output is the exact
expected activation when the missing pixels follow a mixture of factor analyzers (MFA).
See docs/ARCHITECTURE.md for the module map and conventions.

Importing labkit prints nothing. It installs one logging filter: torch logs "No CUDA runtime is
found, using CUDA_HOME=..." when ``torch.utils.cpp_extension`` is first imported (by
``torch.compile``, which MisConv's fast path uses, and by ``torch.utils.benchmark``, which the
timing study uses) on a machine with a CUDA toolkit but no GPU. labkit builds no CUDA extension,
so the notice says nothing about its results; the filter drops that one message of that one
logger (:mod:`labkit._torch_notices`; the notebook kernel :mod:`labkit.lab.kernel` installs the same one) and nothing else.
"""
from labkit.device import default_device, resolve_device
from labkit._torch_notices import quiet_cuda_home_notice as _quiet_cuda_home_notice

_quiet_cuda_home_notice()

__version__ = "0.1.0"
__all__ = ["default_device", "resolve_device"]
