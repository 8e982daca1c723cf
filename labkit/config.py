"""Study settings: one frozen dataclass per study, each field written once with its type, default
and one line of doc; profiles are small override files checked against it.

A study's settings come from three layers, always in this order and always through
:meth:`StudyConfig.build`::

    the config class's defaults            labkit/studies/configs.py   (the quick profile's values)
      <- the profile's section             profiles/<profile>.yaml     (only what differs)
      <- the overrides of one run          -p key=value, or the notebook's parameters cell

so "where is the default of ``epochs`` for the classification study, and how do I change it for
one run" has one answer: ``ClassificationConfig`` in ``labkit/studies/configs.py``, and
``./lab study classification -p epochs=5`` (or ``epochs = 5`` in notebook 02's parameters cell).

Every value is checked when the config is made (:meth:`StudyConfig.problems`): an unknown name is
an error that names the closest valid ones, a value of the wrong type or out of range an error that
says what it must be and who set it (the profile, ``-p``, the notebook). A config is frozen: code
that needs another setting makes a new one with :meth:`StudyConfig.replace`, so the settings a run
records are the settings it ran with.

This module is the mechanics only (no study is named here); ``labkit.studies.configs`` holds the
seven study configs.
"""
from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping

import yaml

from labkit import paths

__all__ = [
    "Rule",
    "StudyConfig",
    "at_least",
    "choices",
    "fraction",
    "list_of",
    "parse_override",
    "positive_number",
    "profile_file",
    "profile_names",
    "read_profile",
    "setting",
]

# ----------------------------------------------------------------------------------- value rules
# A rule says what a value must be, in words, when it does not fit, else None. ``None`` always
# passes a rule: whether a field takes None is its annotation's business (``int | None``).
Rule = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def at_least(low: int) -> Rule:
    """An integer >= ``low``."""
    words = f"an integer >= {low}"
    return lambda v: None if v is None or (_is_int(v) and v >= low) else words


def positive_number(*, strict: bool = True) -> Rule:
    """A finite number > 0 (``strict``) or >= 0."""
    words = f"a number {'>' if strict else '>='} 0"

    def rule(v):
        if v is None:
            return None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return None if ok and (v > 0 if strict else v >= 0) else words
    return rule


def fraction(v: Any) -> str | None:
    """A number in [0, 1)."""
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
    return None if ok else "a number >= 0 and < 1"


def choices(names: Iterable[str] | Callable[[], Iterable[str]], what: str) -> Rule:
    """One of ``names`` (a callable is asked when checking: a registry filled at import time)."""
    def rule(v):
        if v is None:
            return None
        valid = list(names() if callable(names) else names)
        if isinstance(v, str) and v in valid:
            return None
        close = difflib.get_close_matches(str(v), valid, n=1, cutoff=0.5) if isinstance(v, str) else []
        return f"{what}: one of {', '.join(map(repr, valid))}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return rule


def list_of(item: Rule, item_words: str, *, nonempty: bool = True, unique: bool = False,
            length: int | None = None) -> Rule:
    """A list whose items each pass ``item``."""
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


def setting(default: Any, doc: str, *, rule: Rule | None = None, key: bool = True, grid: bool = False) -> Any:
    """A config field: its default, one line of doc and an optional value rule.

    ``key=False`` marks a field that never changes a result (where results go, what is shown
    beside them), so that tables can say which settings a row's key covers. ``grid=True`` marks a
    list of grid coordinates (seeds, masks, methods): a run of some of a profile's values runs some
    of the profile's own cells, not other settings.
    A list default is copied for every config (a dataclass field may not share a mutable default).
    """
    meta = {"doc": doc, "rule": rule, "key": key, "grid": grid}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------- types
_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "a mapping"}


def _type_words(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "anything"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [a for a in args if a is not type(None)]
        words = " or ".join(_type_words(a) for a in parts)
        return words + (" or None" if len(parts) < len(args) else "")
    if origin is list:
        return f"a list of {_type_words(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    return _WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _fits(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_fits(a, value) for a in args)
    if hint is type(None):
        return value is None
    if origin is list or hint is list:
        return isinstance(value, (list, tuple)) and (not args or all(_fits(args[0], v) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False                    # True is an int to Python, never a count or a rate to a study
    if hint is float:
        return isinstance(value, (int, float))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _normalised(hint: Any, value: Any) -> Any:
    """Tuples as lists, integers given for a float field as floats (``lr: 1`` is ``1.0``)."""
    if isinstance(value, tuple):
        value = list(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    floats = hint is float or (origin in (typing.Union, getattr(__import__("types"), "UnionType", None))
                               and float in args and int not in args)
    if floats and _is_int(value):
        return float(value)
    return value


# ----------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class StudyConfig:
    """Base of the study configs: validation, the profile/override layers, copies with changes.

    Subclasses are frozen dataclasses whose fields are made with :func:`setting`, and set
    ``STUDY`` (the study's name, as ``./lab study`` spells it) and ``SECTION`` (the profile section
    and notebook stem, e.g. ``"02_classification"``; ``NOTEBOOK = False`` for a study that has no
    notebook, whose section is then its own name).
    """

    STUDY: ClassVar[str] = ""
    SECTION: ClassVar[str] = ""
    #: False for a study run from the shell only (its ``SECTION`` then names no notebook)
    NOTEBOOK: ClassVar[bool] = True

    def __post_init__(self):
        hints = self._hints()
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _normalised(hints[f.name], getattr(self, f.name)))
        problems = self.problems()
        if problems:
            raise ValueError("\n".join(problems))

    # -- what the class declares
    @classmethod
    def _hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def names(cls) -> list[str]:
        """The field names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default value."""
        out = {}
        for f in dataclasses.fields(cls):
            out[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
        return out

    @classmethod
    def doc(cls, name: str) -> str:
        """The one line of doc of field ``name``."""
        return cls._field(name).metadata.get("doc", "")

    @classmethod
    def expected(cls, name: str) -> str:
        """What a value of ``name`` must be, in words (its type, then its rule's words if any)."""
        return _type_words(cls._hints()[name])

    @classmethod
    def key_fields(cls) -> list[str]:
        """The fields that may change a result (all but those declared ``key=False``)."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("key", True)]

    @classmethod
    def grid_fields(cls) -> list[str]:
        """The fields that list grid coordinates (declared ``grid=True``)."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("grid", False)]

    @classmethod
    def _field(cls, name: str) -> dataclasses.Field:
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f
        raise cls.unknown(name)

    @classmethod
    def unknown(cls, name: str, where: str = "") -> ValueError:
        """The error for a name that is not a field, with the closest valid names."""
        close = difflib.get_close_matches(str(name), cls.names(), n=3, cutoff=0.6)
        hint = ("did you mean " + " or ".join(map(repr, close)) + "?") if close else \
            "its settings are: " + ", ".join(cls.names())
        return ValueError(f"unknown setting {name!r} for {cls.SECTION or cls.__name__}{where}; {hint}")

    @classmethod
    def value_problem(cls, name: str, value: Any, origin: str | None = None) -> str | None:
        """Why ``value`` does not fit field ``name`` (None: it fits), naming who set it."""
        hint = cls._hints()[name]
        where = f" (set by {origin})" if origin else ""
        label = f"setting {name!r} of {cls.SECTION or cls.__name__}"
        if not _fits(hint, value):
            return f"{label} must be {_type_words(hint)}, got {type(value).__name__} {value!r}{where}"
        rule = cls._field(name).metadata.get("rule")
        why = rule(value) if rule is not None else None
        if why is not None:
            return f"{label} must be {why}, got {value!r}{where}"
        return None

    def problems(self, origins: Mapping[str, str] | None = None) -> list[str]:
        """One line per field whose value does not fit (empty: the config is valid)."""
        origins = origins or {}
        out = []
        for name in self.names():
            why = self.value_problem(name, getattr(self, name), origins.get(name))
            if why:
                out.append(why)
        return out + self.check()

    def check(self) -> list[str]:
        """Problems that involve several fields (subclasses add theirs)."""
        return []

    # -- making configs
    @classmethod
    def build(cls, profile: str | os.PathLike | None = "quick", overrides: Mapping[str, Any] | None = None, *,
              origin: str = "-p", origins: Mapping[str, str] | None = None) -> "StudyConfig":
        """The config of a run: defaults, then the profile's section, then ``overrides``.

        Args:
            profile: a profile name (``profiles/<name>.yaml``) or YAML path; None: the defaults only.
            overrides: settings of this run (``-p`` on the command line, a notebook's parameters).
            origin: who set the overrides, for the messages (``"-p"``, ``"the notebook"``).
            origins: per override, who set it as the user wrote it (``"-p lr=abc"``), instead of ``origin``.

        Raises:
            ValueError: every problem at once, one per line: an unknown name (with the closest
                valid ones), a value of the wrong type or out of range (naming who set it).
        """
        given, values, where = origins, {}, {}
        problems: list[str] = []
        if profile is not None:
            name = Path(os.fspath(profile)).stem
            sections = read_profile(profile)
            # a ``defaults`` section gives its settings to every study that has them
            section = {**{k: v for k, v in (sections.get("defaults") or {}).items() if k in cls.names()},
                       **(sections.get(cls.SECTION) or {})}
            for k, v in section.items():
                if k not in cls.names():
                    problems.append(str(cls.unknown(k, f" (profile {name})")))
                    continue
                values[k], where[k] = v, f"profile {name}"
            if "profile" in cls.names():
                values.setdefault("profile", name)
        for k, v in (overrides or {}).items():
            if k not in cls.names():
                problems.append(str(cls.unknown(k, f" (set by {(given or {}).get(k) or origin})")))
                continue
            values[k], where[k] = v, (given or {}).get(k) or (f"{origin} {k}={v!r}" if origin == "-p" else origin)
        for k, v in values.items():
            why = cls.value_problem(k, _normalised(cls._hints()[k], v), where.get(k))
            if why:
                problems.append(why)
        if problems:
            raise ValueError("\n".join(problems))
        return cls(**values)

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any], *, profile: str | None = None) -> "StudyConfig":
        """The config of a notebook's parameters cell: the names of ``namespace`` (``globals()``
        after the cell) that are fields. The cell holds the whole set (papermill injected the
        profile's values into it), so no profile file is read again."""
        given = {k: namespace[k] for k in cls.names() if k in namespace}
        if profile is not None and "profile" in cls.names():
            given["profile"] = profile
        return cls.build(None, given, origin="the notebook's parameters")

    def replace(self, **changes: Any) -> "StudyConfig":
        """A copy with ``changes`` (checked like :meth:`build`'s overrides)."""
        for k in changes:
            if k not in self.names():
                raise self.unknown(k)
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Every field and its value (lists copied)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in
                ((n, getattr(self, n)) for n in self.names())}

    def changed(self) -> dict[str, Any]:
        """The fields whose value is not the class default."""
        base = self.defaults()
        return {k: v for k, v in self.as_dict().items() if v != base[k]}

    @classmethod
    def describe(cls) -> str:
        """The settings as a Markdown table: name, default, what it is."""
        rows = ["| setting | default | what it is |", "|---|---|---|"]
        for name, default in cls.defaults().items():
            rows.append(f"| `{name}` | `{default!r}` | {cls.doc(name)} |")
        return "\n".join(rows)


# ----------------------------------------------------------------------------------- profile files
def profile_names(directory: str | os.PathLike | None = None) -> list[str]:
    """The names of the profile files in ``directory`` (default ``profiles/``), sorted."""
    directory = Path(directory) if directory is not None else paths.profiles_dir()
    return sorted(p.stem for p in directory.glob("*.yaml"))


def profile_file(name: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
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
        known = ", ".join(profile_names(directory)) or "none"
        raise ValueError(f"unknown profile {text!r}: profiles in {directory} are {known}")
    return path


#: the profile files being read through ``extends`` (to refuse a loop)
_EXTENDING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("profiles_extending", default=())


def read_profile(name: str | os.PathLike, *, directory: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """A profile file: ``{section: {setting: value}}``, with the sections of the profile it
    ``extends:`` underneath (``extends: cpu`` takes every section of ``cpu.yaml`` and puts this
    file's settings on top).

    Raises:
        ValueError: unknown profile (naming the existing ones), invalid YAML, a section that is not
            a mapping, a setting name that is not an identifier, or profiles extending in a loop.
    """
    path = profile_file(name, directory)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"profile file {str(path)!r} is not valid YAML: {exc}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"profile file {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("extends", None)
    out: dict[str, dict[str, Any]] = {}
    if base is not None:
        if not isinstance(base, str) or Path(base).stem == path.stem:
            raise ValueError(f"profile file {str(path)!r}: 'extends' must name another profile, got {base!r}")
        chain = _EXTENDING.get() + (str(path),)
        if len(chain) > 8:
            raise ValueError(f"profiles extend each other in a loop: {' -> '.join(chain)}")
        token = _EXTENDING.set(chain)
        try:
            # a profile beside this file, else the lab's (a profile of one's own may extend cpu)
            beside = (path.parent / f"{base}.yaml").is_file() or base.endswith((".yaml", ".yml"))
            out = {k: dict(v) for k, v in read_profile(base, directory=path.parent if beside else None).items()}
        finally:
            _EXTENDING.reset(token)
    for section, params in data.items():
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise ValueError(f"profile file {str(path)!r}: section {section!r} must be a mapping of settings, "
                             f"got {type(params).__name__}")
        for key in params:
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"profile file {str(path)!r}: setting {key!r} in section {section!r} is not a "
                                 "valid Python identifier")
        out[str(section)] = {**out.get(str(section), {}), **params}
    return out


# ----------------------------------------------------------------------------------- -p key=value
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_override(text: str) -> tuple[str | None, str, Any]:
    """A command-line override ``key=value`` or ``section.key=value`` -> ``(section or None, key, value)``.

    The value is read as YAML, so ``epochs=3`` gives an int, ``masks=[square,noise]`` a list and
    ``device=cuda`` a string. Two exceptions to YAML 1.1, for what a Python user types: a number
    with an exponent and no dot (``lr=4e-5``, a string to PyYAML) is a float, and ``None`` is
    ``None`` (as are YAML's ``null`` and ``~``); a quoted value stays a string (``precision='"32"'``).
    """
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value or notebook.key=value")
    target, raw = text.split("=", 1)
    section, _, key = target.rpartition(".")
    if not key.isidentifier():
        raise ValueError(f"override {text!r}: {key!r} is not a valid parameter name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: value {raw!r} is not valid YAML ({exc})") from exc
    quoted = raw.strip()[:1] in ("'", '"')
    if isinstance(value, str) and value.strip() == "None" and not quoted:
        value = None
    elif isinstance(value, str) and _NUMBER.match(value.strip()) and not quoted:
        number = value.strip()
        value = int(number) if number.lstrip("+-").isdigit() else float(number)
    return (section or None), key, value
