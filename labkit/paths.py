"""Every path labkit derives: the checkout, its results, data, caches, profiles and notebooks.

All helpers read the environment when they are called (nothing is frozen at import), so setting
``LAB_ROOT`` or ``LABKIT_DATA`` after ``import labkit`` is honoured.

- :func:`repo_root`: ``$LAB_ROOT`` if set (``./lab`` exports the folder it lives in), else the
  folder above the ``labkit`` package (the checkout of an editable install).
- :func:`results_dir` ``<repo>/results/...``, :func:`profiles_dir` ``<repo>/profiles``,
  :func:`notebooks_dir` ``<repo>/notebooks``.
- :func:`cache_dir`: ``$LABKIT_CACHE`` if set (e.g. a folder every worker of a cluster sees), else
  ``<repo>/data/cache``.
- :func:`data_dir`: ``$LABKIT_DATA`` if set, else ``<repo>/data`` (where :mod:`labkit.data` looks for
  and downloads data sets).
- :func:`shared_datasets_dir`: ``$LABKIT_SHARED_DATASETS`` if set, else ``<repo>/../shared/datasets``
  (offline copies of the data sets beside the checkout).
- :func:`repo_path`: a path as written in a profile or config: absolute paths stay, relative ones
  are relative to the checkout (not to the working directory).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "cache_dir",
    "data_dir",
    "notebooks_dir",
    "profiles_dir",
    "repo_path",
    "repo_root",
    "results_dir",
    "shared_datasets_dir",
]

_PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def repo_root() -> Path:
    """The checkout whose ``results/``, ``data/``, ``profiles/`` and ``notebooks/`` labkit uses."""
    env = os.environ.get("LAB_ROOT")
    return Path(env).resolve() if env else _PACKAGE_PARENT


def repo_path(path: str | os.PathLike) -> Path:
    """``path`` itself if absolute, else ``repo_root() / path``."""
    p = Path(path)
    return p if p.is_absolute() else repo_root() / p


def results_dir(*parts: str | os.PathLike) -> Path:
    """``<repo>/results/<parts...>`` (e.g. ``results_dir("wae", "quick")``)."""
    return repo_root().joinpath("results", *parts)


def data_dir() -> Path:
    """``$LABKIT_DATA`` if set, else ``<repo>/data``."""
    env = os.environ.get("LABKIT_DATA")
    return Path(env) if env else repo_root() / "data"


def cache_dir(*parts: str | os.PathLike) -> Path:
    """``$LABKIT_CACHE/<parts...>`` if set, else ``<repo>/data/cache/<parts...>``: git-ignored caches
    of frozen imputers' outputs and the like."""
    env = os.environ.get("LABKIT_CACHE")
    return (Path(env) if env else repo_root() / "data" / "cache").joinpath(*parts)


def profiles_dir() -> Path:
    """``<repo>/profiles``: the run profiles (``quick.yaml``, ``cpu.yaml``, ``paper.yaml``)."""
    return repo_root() / "profiles"


def notebooks_dir() -> Path:
    """``<repo>/notebooks``: the notebooks and their jupytext twins."""
    return repo_root() / "notebooks"


def shared_datasets_dir() -> Path:
    """``$LABKIT_SHARED_DATASETS`` if set, else ``<repo>/../shared/datasets`` (offline copies)."""
    env = os.environ.get("LABKIT_SHARED_DATASETS")
    return Path(env) if env else repo_root().parent / "shared" / "datasets"
