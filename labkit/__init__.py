"""labkit: the importable core of misconv-lab.

MisConv (Przewięźlikowski, Śmieja, Struski, Tabor): a conv+ReLU layer whose output is the exact
expected activation when the missing pixels follow a mixture of factor analyzers (MFA).
See docs/ARCHITECTURE.md for the module map and conventions.
"""
from labkit.device import default_device, resolve_device

__version__ = "0.1.0"
__all__ = ["default_device", "resolve_device"]
