"""Run profiles: how big each notebook's study is (``profiles/quick.yaml``, ``cpu.yaml``, ``paper.yaml``).

A profile file is YAML with a ``defaults`` section (parameters every notebook gets, e.g.
``device: auto`` and ``seed: 0``) and one section per notebook, named by the notebook's file stem
(``01_dmfa``). A notebook's parameters are the defaults overridden by its own section; ``./lab run``
injects them into the notebook's ``parameters`` cell with papermill.

- ``quick``: minutes on 2 CPU cores, a few hundred images, 1 epoch (also what the tests run);
- ``cpu``: the largest runs that fit a laptop-class CPU (10,000 MNIST images);
- ``paper``: the paper's protocol (epochs, batch sizes, learning rates, 3 seeds), for a GPU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "PROFILES_DIR",
    "available_profiles",
    "load_profile",
    "notebook_parameters",
    "parse_override",
    "profile_path",
]

# The checkout whose notebooks/, profiles/ and results/ the lab uses. ``./lab`` exports LAB_ROOT
# (the folder it lives in); otherwise it is the folder above this package.
REPO_ROOT = Path(os.environ.get("LAB_ROOT") or Path(__file__).resolve().parents[1]).resolve()
PROFILES_DIR = REPO_ROOT / "profiles"


def available_profiles(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the profile files in ``directory`` (default ``profiles/``), sorted."""
    directory = Path(directory) if directory is not None else PROFILES_DIR
    return sorted(p.stem for p in directory.glob("*.yaml"))


def profile_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """The file of profile ``name``: ``profiles/<name>.yaml``, or ``name`` itself if it is a YAML path."""
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"profile must be a profile name or a path to a .yaml file, got {type(name).__name__}")
    text = os.fspath(name)
    if text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"profile file {text!r} does not exist")
        return path
    directory = Path(directory) if directory is not None else PROFILES_DIR
    path = directory / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(available_profiles(directory)) or "none"
        raise ValueError(f"unknown profile {text!r}: profiles in {directory} are {known}")
    return path


def load_profile(
    name: str | os.PathLike,
    notebook: str | os.PathLike | None = None,
    *,
    directory: str | os.PathLike | None = None,
) -> dict[str, dict[str, Any]]:
    """Read a profile: ``{"defaults": {...}, "<notebook stem>": {...}, ...}``.

    Args:
        name: ``"quick"``, ``"cpu"``, ``"paper"`` (files in ``directory``), or a path to a YAML file.
        notebook: if given, return :func:`notebook_parameters` for that notebook instead.
        directory: where the named profiles live (default: the repository's ``profiles/``).

    Raises:
        ValueError: unknown profile (the message lists the existing ones), or a malformed file:
            not a mapping of sections, a section that is not a mapping, or a parameter name that
            is not a Python identifier (papermill assigns each one as a variable).
    """
    path = profile_path(name, directory)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"profile file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"profile file {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
    profile: dict[str, dict[str, Any]] = {}
    for section, params in data.items():
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ValueError(
                f"profile file {str(path)!r}: section {section!r} must be a mapping of parameters, "
                f"got {type(params).__name__}"
            )
        for key in params:
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(
                    f"profile file {str(path)!r}: parameter {key!r} in section {section!r} is not a "
                    "valid Python identifier"
                )
        profile[str(section)] = dict(params)
    profile.setdefault("defaults", {})
    if notebook is not None:
        return notebook_parameters(profile, notebook, name=_profile_name(name))
    return profile


def _profile_name(name: str | os.PathLike) -> str:
    return Path(os.fspath(name)).stem


def _notebook_stem(notebook: str | os.PathLike) -> str:
    if not isinstance(notebook, (str, os.PathLike)):
        raise TypeError(f"notebook must be a notebook name like '01_dmfa', got {type(notebook).__name__}")
    stem = Path(os.fspath(notebook)).name
    for suffix in (".ipynb", ".py"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem


def notebook_parameters(
    profile: str | os.PathLike | dict[str, dict[str, Any]],
    notebook: str | os.PathLike,
    *,
    name: str | None = None,
) -> dict[str, Any]:
    """The parameters a notebook runs with under a profile: ``defaults`` overridden by its section.

    Args:
        profile: a profile name/path (then it is loaded) or a dict from :func:`load_profile`.
        notebook: the notebook's stem (``"01_dmfa"``), file name or path.
        name: the profile's name, added as parameter ``profile`` (automatic when ``profile`` is a name).

    Returns:
        A new dict; includes ``profile`` (when the name is known) unless the file sets it itself.

    Raises:
        ValueError: the profile has no section for the notebook (the message lists the sections).
    """
    if isinstance(profile, (str, os.PathLike)):
        name = name or _profile_name(profile)
        profile = load_profile(profile)
    if not isinstance(profile, dict):
        raise TypeError(f"profile must be a profile name or a dict from load_profile, got {type(profile).__name__}")
    stem = _notebook_stem(notebook)
    if stem not in profile:
        sections = ", ".join(s for s in profile if s != "defaults") or "none"
        label = f"profile {name!r}" if name else "the profile"
        raise ValueError(f"{label} has no section for notebook {stem!r}; its notebook sections are: {sections}")
    params: dict[str, Any] = {}
    if name:
        params["profile"] = name
    params.update(profile.get("defaults") or {})
    params.update(profile[stem] or {})
    return params


def parse_override(text: str) -> tuple[str | None, str, Any]:
    """Parse a command-line override ``key=value`` or ``notebook.key=value``.

    The value is read as YAML, so ``epochs=3`` gives an int, ``masks=[square,noise]`` a list and
    ``device=cuda`` a string. Returns ``(notebook or None, key, value)``.
    """
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value or notebook.key=value")
    target, raw = text.split("=", 1)
    notebook, _, key = target.rpartition(".")
    if not key.isidentifier():
        raise ValueError(f"override {text!r}: {key!r} is not a valid parameter name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: value {raw!r} is not valid YAML ({exc})") from exc
    return (notebook or None), key, value
