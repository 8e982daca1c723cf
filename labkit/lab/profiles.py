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
import contextvars
import dataclasses
import difflib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from labkit import paths

__all__ = [
    "NOT_LITERAL",
    "RULES",
    "Parameter",
    "apply_overrides",
    "check_sections",
    "notebook_stems",
    "rule_problem",
    "script_spec",
    "study_parameters",
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
    base_name = data.pop("extends", None)
    profile: dict[str, dict[str, Any]] = {}
    if base_name is not None:
        # "extends: cpu": every section of that profile, with this file's parameters on top (a study
        # setting of its own, e.g. more seeds, without copying the rest)
        if not isinstance(base_name, str) or _profile_name(base_name) == _profile_name(path):
            raise ValueError(f"profile file {str(path)!r}: 'extends' must name another profile, got {base_name!r}")
        chain = _EXTENDING.get() + (str(path),)
        if len(chain) > 8:
            raise ValueError(f"profiles extend each other in a loop: {' -> '.join(chain)}")
        token = _EXTENDING.set(chain)
        try:
            profile = {k: dict(v) for k, v in load_profile(base_name, directory=path.parent).items()}
        finally:
            _EXTENDING.reset(token)
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
        profile[str(section)] = {**profile.get(str(section), {}), **params}
    profile.setdefault("defaults", {})
    if notebook is not None:
        return notebook_parameters(profile, notebook, name=_profile_name(name))
    return profile


#: the profile files being read through ``extends`` (to refuse a loop)
_EXTENDING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("profiles_extending", default=())


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


def check_sections(profile: Mapping[str, Any], stems: Iterable[str], *, name: str = "the profile") -> list[str]:
    """One message per section of ``profile`` that names no notebook of ``stems`` (``defaults`` aside),
    with the closest valid section: a misspelt ``03_wea:`` would otherwise be ignored without a word."""
    stems = sorted(stems)
    problems = []
    for section in profile:
        if section == "defaults" or section in stems:
            continue
        close = difflib.get_close_matches(str(section), ["defaults", *stems], n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"sections are: defaults, {', '.join(stems)}"
        problems.append(f"{name}: section {section!r} names no notebook; {hint}")
    return problems


def _package_notebooks() -> Path:
    """The notebooks beside this package (its checkout's), for a ``LAB_ROOT`` that holds none."""
    return Path(__file__).resolve().parents[2] / "notebooks"


def study_parameters(profile: str | os.PathLike, notebook: str, *,
                     notebooks_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a study's script starts from: :func:`notebook_parameters` of ``notebook``, after every
    section of the profile was checked against the notebooks (:func:`check_sections`).

    Raises:
        ValueError: a section that names no notebook (with the closest valid one), or what
            :func:`load_profile` / :func:`notebook_parameters` raise.
    """
    loaded = load_profile(profile)
    name = f"profile {_profile_name(profile)!r}"
    problems = check_sections(loaded, notebook_stems(notebooks_dir) or notebook_stems(_package_notebooks()),
                              name=name)
    if problems:
        raise ValueError("\n".join(problems))
    return notebook_parameters(loaded, notebook, name=_profile_name(profile))


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


# ------------------------------------------------------------------ value rules (range, allowed names)
#
# The type of a value comes from the notebook's parameters cell (:class:`Parameter`); what values
# make sense comes from here, by parameter name, the same for ``./lab run -p``, the profiles and the
# scripts' ``-p`` (one validator: :func:`check_parameters`). A rule returns None for a fitting value,
# else what is expected, in words. ``None`` always passes a rule: whether a parameter takes None is
# its type's business (``Optional[...]`` or a None default).

Rule = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_rule(low: int) -> Rule:
    words = f"an integer >= {low}"
    return lambda v: None if v is None or (_is_int(v) and v >= low) else words


def _number_rule(low: float, *, strict: bool, high: float | None = None) -> Rule:
    words = f"a number {'>' if strict else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")

    def rule(v):
        if v is None:
            return None
        if not _is_number(v) or (v <= low if strict else v < low) or (high is not None and v >= high):
            return words
        return None
    return rule


def _names_rule(names: Callable[[], Iterable[str]], what: str) -> Rule:
    def rule(v):
        if v is None:
            return None
        valid = list(names())
        if isinstance(v, str) and v in valid:
            return None
        close = difflib.get_close_matches(str(v), valid, n=1, cutoff=0.5) if isinstance(v, str) else []
        return f"{what}: one of {', '.join(map(repr, valid))}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return rule


def _list_rule(item: Rule, item_words: str, *, nonempty: bool = True, unique: bool = False,
               length: int | None = None) -> Rule:
    size = f"a list of {length}" if length else ("a non-empty list of" if nonempty else "a list of")
    words = f"{size} {item_words}" + (" without repeats" if unique else "")

    def rule(v):
        if v is None:
            return None
        if not isinstance(v, (list, tuple)) or (nonempty and not v) or (length and len(v) != length):
            return words
        for x in v:
            why = item(x) if x is not None else "not None"
            if why:
                return f"{words} (item {x!r}: expected {why})"
        if unique and len(set(map(repr, v))) != len(v):
            return words
        return None
    return rule


def _methods() -> list[str]:
    from labkit.studies.imputers import METHODS

    return list(METHODS)


def _fronts() -> list[str]:
    from labkit.studies.wae import FRONT_ALIASES

    return _methods() + list(FRONT_ALIASES)


def _mask_kinds() -> list[str]:
    from labkit.masks import MASK_KINDS

    return list(MASK_KINDS)


def _datasets() -> list[str]:
    from labkit.data import DATASET_ALIASES

    return sorted(DATASET_ALIASES)


def _precisions() -> list[str]:
    from labkit.precision import PRECISIONS

    return list(PRECISIONS)


def _recipes() -> list[str]:
    from labkit.models.wae import RECIPES

    return list(RECIPES)


def _device_rule(v: Any) -> str | None:
    words = "'auto' or a torch device name (cpu, cuda, cuda:1, mps)"
    if v is None:
        return None
    if not isinstance(v, str):
        return words
    if v == "auto":
        return None
    import torch

    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return words
    return None


_POSITIVE = _int_rule(1)
_NATURAL = _int_rule(0)

#: parameter name -> rule, for every notebook and script that has the parameter
RULES: dict[str, Rule] = {
    **dict.fromkeys(("epochs", "batch_size", "n_train", "n_test", "hole", "n_components", "n_factors", "mfa_factors",
                     "mfa_iterations", "knn_fit", "knn_val", "acflow_samples", "feature_epochs", "feature_n_train",
                     "eval_batch", "impute_batch", "n_figure", "n_images", "mc_samples", "n_fit", "repeats",
                     "end_to_end_batch", "end_to_end_repeats", "n_samples", "scale", "dmfa_n_train", "dmfa_epochs"),
                    _POSITIVE),
    **dict.fromkeys(("n_val", "seed", "mse_warmup_epochs", "mfa_components", "threads", "eager_repeats",
                     "image_index"), _NATURAL),
    **dict.fromkeys(("lr", "lr_disc", "lr_gamma", "brush"), _number_rule(0, strict=True)),
    "lambda_adv": _number_rule(0, strict=False),
    "val_fraction": _number_rule(0, strict=False, high=1),
    "seeds": _list_rule(_NATURAL, "integers >= 0", unique=True),
    "lr_milestones": _list_rule(_NATURAL, "integers >= 0", nonempty=False),
    "knn_k": _list_rule(_POSITIVE, "integers >= 1", unique=True),
    **dict.fromkeys(("sizes", "batch_sizes", "Ks", "Ls"), _list_rule(_POSITIVE, "integers >= 1")),
    "component_cell": _list_rule(_POSITIVE, "integers >= 1 (image size, batch)", length=2),
    "precision": _names_rule(_precisions, "a precision name (quote it: precision='\"32\"')"),
    "methods": _list_rule(_names_rule(_methods, "a method"), "method names", unique=True),
    "fronts": _list_rule(_names_rule(_fronts, "a front"), "front names", unique=True),
    "masks": _list_rule(_names_rule(_mask_kinds, "a mask kind"), "mask kinds", unique=True),
    "dataset": _names_rule(_datasets, "a data set"),
    "datasets": _list_rule(_names_rule(_datasets, "a data set"), "data set names", unique=True),
    "end_to_end_datasets": _list_rule(_names_rule(_datasets, "a data set"), "data set names", nonempty=False),
    "mode": _names_rule(lambda: ["complete", "incomplete"], "a training mode"),
    "recipe": _names_rule(_recipes, "a WAE recipe"),
    "recon": _names_rule(lambda: ["mse", "bce"], "a reconstruction loss"),
    "select": _names_rule(lambda: ["best_val", "last"], "an epoch selection"),
    "clock": _names_rule(lambda: ["auto", "wall", "cpu"], "a clock"),
    "weights_dtype": _names_rule(lambda: ["float32", "float16"], "a storage dtype for the weights"),
    "dmfa_replicates": _POSITIVE,
    "device": _device_rule,
}


def rule_problem(key: str, value: Any) -> str | None:
    """What ``value`` of parameter ``key`` should be, in words, when :data:`RULES` rejects it; else None."""
    rule = RULES.get(key)
    return rule(value) if rule is not None else None


def _annotation_name(annotation: Any) -> str:
    """A dataclass field's annotation in papermill's words (``"int | None"`` -> ``"Optional[int]"``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|")]
    if len(parts) == 2 and "None" in parts:
        parts.remove("None")
        return f"Optional[{parts[0]}]"
    return text if len(parts) == 1 else "None"


def script_spec(notebook: str, *configs: type, extra: Mapping[str, Parameter] | None = None,
                notebooks_dir: str | os.PathLike | None = None) -> dict[str, Parameter]:
    """The parameters a study's script takes: the fields of its config dataclasses (``configs``),
    then the notebook's parameters cell (:func:`inspect_parameters`, which wins: it is what
    ``./lab run -p`` checks), then ``extra``. Feed it to :func:`check_parameters`."""
    spec: dict[str, Parameter] = {}
    for config in configs:
        for f in dataclasses.fields(config):
            if f.default is not dataclasses.MISSING:
                source = repr(f.default)
            else:
                source = "None"
            spec[f.name] = Parameter(f.name, source, _annotation_name(f.type))
    directory = Path(notebooks_dir) if notebooks_dir is not None else paths.notebooks_dir()
    path = directory / f"{notebook}.ipynb"
    if not path.is_file():   # LAB_ROOT elsewhere (a results folder of its own): the notebook beside this package
        path = _package_notebooks() / f"{notebook}.ipynb"
    if path.is_file():
        spec.update(inspect_parameters(path))
    spec.update(extra or {})
    return spec


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
        ValueError: one line per problem: an unknown name (with the closest valid names), a
            value whose type does not fit the default, or one out of range or not among the
            allowed names (:data:`RULES`), each naming the parameter and what it must be.
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
        elif (why := rule_problem(key, value)) is not None:
            problems.append(f"parameter {key!r} of {notebook} must be {why}, got {value!r}{where}")
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
    problems = check_sections(loaded, notebooks, name=f"profile {name!r}")
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
