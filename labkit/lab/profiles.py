"""Run profiles (how big each notebook's study is) and the notebooks' parameters they feed.

Profiles live in ``profiles/quick.yaml``, ``cpu.yaml`` and ``paper.yaml``.

A profile file is YAML with a ``defaults`` section (parameters every notebook gets, e.g.
``device: auto`` and ``seed: 0``) and one section per notebook, named by the notebook's file stem
(``01_dmfa``). A notebook's parameters are the defaults overridden by its own section; ``./lab run``
injects them into the notebook's ``parameters`` cell with papermill.

- ``quick``: minutes on 2 CPU cores, a few hundred images, 1 epoch (also what the tests run);
- ``cpu``: the largest runs that fit a laptop-class CPU (10,000 MNIST images);
- ``paper``: the paper's protocol (epochs, batch sizes, learning rates, 3 seeds), for a GPU.
"""
from __future__ import annotations

import ast
import difflib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from labkit import paths

__all__ = [
    "Parameter",
    "apply_overrides",
    "available_profiles",
    "check_parameters",
    "inspect_parameters",
    "load_profile",
    "notebook_parameters",
    "parameters_cell",
    "parse_override",
    "profile_path",
    "profile_problems",
    "unknown_parameter",
]

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def __getattr__(name: str) -> Path:
    # Older spellings: module constants, now read from labkit.paths when asked (LAB_ROOT may change).
    if name == "REPO_ROOT":
        return paths.repo_root()
    if name == "PROFILES_DIR":
        return paths.profiles_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available_profiles(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the profile files in ``directory`` (default ``profiles/``), sorted."""
    directory = Path(directory) if directory is not None else paths.profiles_dir()
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
    directory = Path(directory) if directory is not None else paths.profiles_dir()
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
    ``device=cuda`` a string. Two exceptions to YAML 1.1, for what a Python user types: a number
    with an exponent and no dot (``lr=4e-5``, a string to PyYAML) is a float, and ``None`` is
    ``None`` (as are YAML's ``null`` and ``~``); a quoted value stays a string (``precision='"32"'``).
    Returns ``(notebook or None, key, value)``.
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
    quoted = raw.strip()[:1] in ("'", '"')       # precision='"32"' stays the string "32"
    if isinstance(value, str) and value.strip() == "None" and not quoted:
        value = None
    elif isinstance(value, str) and _NUMBER.match(value.strip()) and not quoted:
        number = value.strip()
        value = int(number) if number.lstrip("+-").isdigit() else float(number)
    return (notebook or None), key, value



def apply_overrides(params: Mapping[str, Any], texts: Iterable[str], *, where: str,
                    valid: Iterable[str] | None = None) -> dict[str, Any]:
    """``params`` with each ``key=value`` of ``texts`` (:func:`parse_override`) applied, in order.

    A key outside ``valid`` (default: the keys of ``params``) is a ``ValueError`` that names it,
    ``where`` it was looked up (e.g. "the cpu profile's 03_wae section") and the closest valid keys,
    so that a misspelt override never runs the default silently.
    """
    out = dict(params)
    names = set(out if valid is None else valid)
    for text in texts:
        _, key, value = parse_override(text)
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3)
            raise ValueError(f"-p {text}: {key!r} is not a key of {where}"
                             + (f" (did you mean {', '.join(close)}?)" if close else f" (keys: {', '.join(sorted(names))})"))
        out[key] = value
    return out

# ------------------------------------------------------------------ the notebooks' parameters cells

_NOT_LITERAL = object()
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


def check_parameters(notebook: str, params: Mapping[str, Any], spec: Mapping[str, Parameter], *,
                     origins: Mapping[str, str] | None = None) -> None:
    """Check parameters against a notebook's :func:`inspect_parameters` before anything runs.

    Args:
        notebook: its name, for the messages.
        params: what it would run with.
        spec: its parameters.
        origins: where each key was set (``"profile quick"``, ``"-p n_images=abc"``), for the messages.

    Raises:
        ValueError: one line per problem: an unknown name (with the closest valid names), or a
            value whose type does not fit the default (naming the parameter).
    """
    problems = []
    for key, value in params.items():
        where = f" (set by {origins[key]})" if origins and key in origins else ""
        if key not in spec:
            problems.append(unknown_parameter(key, notebook, spec) + where)
        elif not spec[key].accepts(value):
            p = spec[key]
            problems.append(f"parameter {key!r} of {notebook} must be {p.expected()} (default {p.source}), "
                            f"got {type(value).__name__} {value!r}{where}")
    if problems:
        raise ValueError("\n".join(problems))


def profile_problems(profile: str | os.PathLike, notebooks: Mapping[str, Mapping[str, Parameter]]) -> list[str]:
    """Every key of every section of ``profile`` checked against the notebooks' parameters.

    Args:
        profile: a profile name or YAML path.
        notebooks: notebook stem -> :func:`inspect_parameters`.

    Returns:
        One message per problem (empty: the profile fits): a section for a notebook that does not
        exist, a notebook without a section, an unknown key or a value of the wrong type.
    """
    name = _profile_name(profile)
    loaded = load_profile(profile)
    problems = [f"profile {name!r}: section {s!r} names no notebook (notebooks: {', '.join(sorted(notebooks))})"
                for s in loaded if s != "defaults" and s not in notebooks]
    for stem, spec in notebooks.items():
        if stem not in loaded:
            problems.append(f"profile {name!r} has no section for notebook {stem!r}")
            continue
        params = notebook_parameters(loaded, stem, name=name)
        try:
            check_parameters(stem, params, spec, origins=dict.fromkeys(params, f"profile {name}"))
        except ValueError as exc:
            problems.extend(str(exc).splitlines())
    return problems
