"""Profiles (how big each study is) seen from the notebooks: the parameters ``./lab run`` injects.

A profile is ``profiles/<name>.yaml``: one section per notebook, named by its file stem
(``02_classification``), holding only the settings that differ from the study's defaults
(:mod:`labkit.studies.configs`; the ``quick`` profile is the defaults). ``extends: cpu`` takes
another profile's sections underneath; a ``defaults`` section gives its settings to every study
that has them. Reading the files and checking values is :mod:`labkit.config`'s; this module adds
what the notebook runner needs: the parameters a notebook runs with, a check of every profile
section and ``-p`` against the study configs, and papermill's view of a notebook's parameters
cell (:func:`inspect_parameters`), which ``tests/test_configs.py`` holds against the configs.

- ``quick``: minutes on 2 CPU cores, a few hundred images, 1 epoch (also what the tests run);
- ``cpu``: the largest runs that fit a laptop-class CPU (10,000 MNIST images);
- ``paper``: the paper's protocol (epochs, batch sizes, learning rates, 3 seeds), for a GPU.
"""
from __future__ import annotations

import ast
import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from labkit import paths
from labkit.config import parse_override, profile_file, profile_names, read_profile
from labkit.studies.configs import CONFIGS

__all__ = [
    "NOT_LITERAL",
    "Parameter",
    "available_profiles",
    "check_parameters",
    "check_sections",
    "inspect_parameters",
    "load_profile",
    "notebook_parameters",
    "notebook_stems",
    "parameters_cell",
    "parse_override",
    "profile_path",
    "profile_problems",
    "shell_sections",
    "unknown_parameter",
]

#: the profile files (``profiles/``): names and the file of one
available_profiles = profile_names
profile_path = profile_file


def load_profile(name: str | os.PathLike, notebook: str | os.PathLike | None = None, *,
                 directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """A profile's sections ``{"defaults": {...}, "<notebook stem>": {...}}``
    (:func:`labkit.config.read_profile`), or with ``notebook`` that notebook's
    :func:`notebook_parameters`."""
    profile = read_profile(name, directory=directory)
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


def notebook_stems(directory: str | os.PathLike | None = None) -> list[str]:
    """The stems of the lab's notebooks (``NN_name``, from ``.ipynb`` or ``.py`` twins) in ``directory``
    (default ``notebooks/``), sorted; empty when there is no such folder."""
    directory = Path(directory) if directory is not None else paths.notebooks_dir()
    if not directory.is_dir():
        return []
    return sorted({p.stem for pattern in ("[0-9][0-9]_*.ipynb", "[0-9][0-9]_*.py") for p in directory.glob(pattern)})


def shell_sections() -> list[str]:
    """The profile sections of the studies without a notebook (their config's ``NOTEBOOK`` is False:
    ``acflow``), run from the shell only (``./lab study acflow``)."""
    return [section for section, cls in CONFIGS.items() if not cls.NOTEBOOK]


def check_sections(profile: Mapping[str, Any], stems: Iterable[str], *, name: str = "the profile") -> list[str]:
    """One message per section of ``profile`` that names neither a notebook of ``stems`` nor a study
    without a notebook (:func:`shell_sections`; ``defaults`` aside), with the closest valid section:
    a misspelt ``03_wea:`` would otherwise be ignored without a word."""
    valid = sorted(set(stems) | set(shell_sections()))
    problems = []
    for section in profile:
        if section == "defaults" or section in valid:
            continue
        close = difflib.get_close_matches(str(section), ["defaults", *valid], n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"sections are: defaults, {', '.join(valid)}"
        problems.append(f"{name}: section {section!r} names no notebook; {hint}")
    return problems


def notebook_parameters(profile: str | os.PathLike | dict[str, dict[str, Any]], notebook: str | os.PathLike, *,
                        name: str | None = None) -> dict[str, Any]:
    """The parameters a notebook runs with under a profile: ``profile`` (its name), the settings of
    the ``defaults`` section the notebook has, then its own section. A notebook without a section
    runs with its defaults (the quick profile's sections may be empty)."""
    if isinstance(profile, (str, os.PathLike)):
        name = name or _profile_name(profile)
        profile = load_profile(profile)
    if not isinstance(profile, dict):
        raise TypeError(f"profile must be a profile name or a dict from load_profile, got {type(profile).__name__}")
    stem = _notebook_stem(notebook)
    config = CONFIGS.get(stem)
    params: dict[str, Any] = {"profile": name} if name else {}
    for k, v in (profile.get("defaults") or {}).items():
        if config is None or k in config.names():
            params[k] = v
    params.update(profile.get(stem) or {})
    return params


# ------------------------------------------------------------------ the notebooks' parameters cells

_NOT_LITERAL = object()
#: what :attr:`Parameter.default` is when the default is not a Python literal (computed)
NOT_LITERAL = _NOT_LITERAL
_KINDS = {"bool": bool, "int": int, "float": float, "str": str, "list": list, "List": list, "dict": dict,
          "Dict": dict, "tuple": list, "Tuple": list}
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "a mapping"}


@dataclass(frozen=True)
class Parameter:
    """One parameter of a notebook, as papermill infers it from the ``parameters`` cell.

    ``source`` is the default as written (``'500'``, ``'"mnist"'``); ``type_name`` is papermill's
    ``inferred_type_name``: the annotation (``"Optional[int]"``) or ``"None"`` when there is none.
    """

    name: str
    source: str
    type_name: str = "None"
    help: str = ""

    @property
    def default(self) -> Any:
        """The default's value, or a private marker when it is not a Python literal."""
        try:
            return ast.literal_eval(self.source)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return _NOT_LITERAL

    @property
    def _annotation(self) -> tuple[type | None, bool]:
        """(kind named by the annotation or None, whether the annotation allows None)."""
        text = self.type_name.replace(" ", "")
        if text in ("", "None"):
            return None, False
        optional = text.startswith("Optional[") and text.endswith("]")
        if optional:
            text = text[len("Optional["):-1]
        return _KINDS.get(text.split("[", 1)[0]), optional

    @property
    def kind(self) -> type | None:
        """The type a value must have (None: anything), from the annotation, else from the default."""
        annotated, _ = self._annotation
        if annotated is not None:
            return annotated
        default = self.default
        if default is _NOT_LITERAL or default is None:
            return None  # a None (or computed) default accepts anything
        for kind in (bool, int, float, str, list, dict):  # bool first: it is an int subclass
            if isinstance(default, kind):
                return kind
        return list if isinstance(default, tuple) else type(default)

    @property
    def nullable(self) -> bool:
        """Whether ``None`` is a valid value: a None default, or an ``Optional[...]`` annotation."""
        return self.default is None or self._annotation[1]

    def expected(self) -> str:
        """What a value must be, in words (``"an integer or None"``)."""
        kind = self.kind
        words = _KIND_WORDS.get(kind, f"a {getattr(kind, '__name__', kind)}") if kind else "anything"
        return words + (" or None" if self.nullable and kind else "")

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` fits: ints for floats, any list for lists, None only where :attr:`nullable`."""
        kind = self.kind
        if value is None:
            return kind is None or self.nullable
        if kind is None:
            return True
        if kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False  # True is an int to Python, never a count or a rate to a notebook
        if kind is float:
            return isinstance(value, (int, float))
        if kind is list:
            return isinstance(value, (list, tuple))
        return isinstance(value, kind)


def _read_notebook(notebook: str | os.PathLike):
    path = Path(os.fspath(notebook))
    if not path.is_file():
        raise ValueError(f"notebook {os.fspath(notebook)!r} not found")
    if path.suffix == ".ipynb":
        import nbformat

        return nbformat.read(path, as_version=4)
    import jupytext

    return jupytext.read(path)


def parameters_cell(notebook: str | os.PathLike) -> str:
    """The source of the notebook's one cell tagged ``parameters`` (``.ipynb`` or jupytext ``.py``).

    Raises:
        ValueError: no such cell, or more than one (papermill injects after the first only).
    """
    nb = _read_notebook(notebook)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{Path(os.fspath(notebook)).name}: {len(cells)} cells tagged 'parameters', expected exactly 1")
    return cells[0].source


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def inspect_parameters(notebook: str | os.PathLike, *, source: str | None = None) -> dict[str, Parameter]:
    """The notebook's parameters as papermill infers them (its ``PythonTranslator.inspect``).

    Args:
        notebook: an ``.ipynb`` or its jupytext ``.py`` twin (used for the name, and read unless
            ``source`` is given).
        source: the parameters cell's source, if already at hand.

    Raises:
        ValueError: some assignment of the cell is invisible to papermill, so a profile could not
            set it and papermill would warn on every run. The message names each such line; the
            usual cause is a ``=`` inside the trailing comment.
    """
    from papermill.translators import PythonTranslator

    name = Path(os.fspath(notebook)).stem
    if source is None:
        source = parameters_cell(notebook)
    logger = logging.getLogger("papermill")
    collect = _Collect()
    logger.addHandler(collect)
    propagate, logger.propagate = logger.propagate, False  # its warnings become our error below
    try:
        inferred = PythonTranslator.inspect({"source": source})
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate
    params = {p.name: Parameter(p.name, p.default, p.inferred_type_name, p.help) for p in inferred}
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(f"{name}: the parameters cell is not valid Python ({exc})") from exc
    lines = source.splitlines()
    missed = []
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else [])
        for target in targets:
            if isinstance(target, ast.Name) and target.id not in params:
                missed.append(f"line {node.lineno}: {lines[node.lineno - 1].strip()!r}")
    if missed:
        raise ValueError(
            f"{name}: papermill cannot read these assignments of the parameters cell, so they cannot be "
            f"set: {'; '.join(missed)}. Keep one 'name = value  # comment' per line, with no '=' inside "
            "the comment"
        )
    return params


def unknown_parameter(key: str, notebook: str, names: Any) -> str:
    """The error for a parameter ``key`` the notebook does not have, with the closest valid names."""
    names = sorted(names)
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        hint = "its parameters are: " + ", ".join(names)
    return f"unknown parameter {key!r} for {notebook}; {hint}"


def check_parameters(notebook: str, params: Mapping[str, Any], spec: Mapping[str, Parameter] | None = None, *,
                     origins: Mapping[str, str] | None = None) -> None:
    """Check a notebook's parameters before anything runs: against its study's config
    (:mod:`labkit.studies.configs`: names, types, ranges, allowed names), or for a notebook of
    one's own without a config, against ``spec`` (:func:`inspect_parameters`: names and types).

    Raises:
        ValueError: one line per problem, each naming the parameter, what it must be and who set it
            (``origins``: ``"profile quick"``, ``"-p n_images=abc"``).
    """
    origins = origins or {}
    problems = []
    config = CONFIGS.get(notebook)
    for key, value in params.items():
        where = f" (set by {origins[key]})" if key in origins else ""
        if config is not None:
            if key not in config.names():
                problems.append(str(config.unknown(key, where)))
            elif (why := config.value_problem(key, value, origins.get(key))) is not None:
                problems.append(why)
            continue
        spec = spec or {}
        if key not in spec:
            problems.append(unknown_parameter(key, notebook, spec) + where)
        elif not spec[key].accepts(value):
            p = spec[key]
            problems.append(f"parameter {key!r} of {notebook} must be {p.expected()} (default {p.source}), "
                            f"got {type(value).__name__} {value!r}{where}")
    if problems:
        raise ValueError("\n".join(problems))


def profile_problems(profile: str | os.PathLike, stems: Iterable[str] | None = None) -> list[str]:
    """Every section of ``profile`` checked: a section that names no notebook of ``stems``
    (default: the lab's notebooks) nor a study without a notebook (:func:`shell_sections`), and
    every setting against its study's config. Empty: it fits."""
    name = _profile_name(profile)
    loaded = load_profile(profile)
    stems = list(stems) if stems is not None else (notebook_stems() or
                                                   [s for s, cls in CONFIGS.items() if cls.NOTEBOOK])
    problems = check_sections(loaded, stems, name=f"profile {name!r}")
    for stem in [*stems, *(s for s in shell_sections() if s not in stems)]:
        params = notebook_parameters(loaded, stem, name=name)
        params.pop("profile", None)
        try:
            check_parameters(stem, params, origins=dict.fromkeys(params, f"profile {name}"))
        except ValueError as exc:
            problems.extend(str(exc).splitlines())
    return problems
