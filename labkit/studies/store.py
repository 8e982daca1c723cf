"""Result files a crash cannot corrupt: validated result rows, and sets of files written as one.

- :class:`ResultStore`: a CSV with one row per cell key, the cell's settings and inputs beside its
  metrics. Rows are validated on read (a truncated or malformed row is reported with file and line
  and is not a result); two rows with one key are an error naming the file; writes are atomic and
  locked, so sweeps may run side by side.
- :func:`write_files`: several files of one folder (CSV, JSON, figure) written as a set: killed at
  any instant, the folder ends with the old set or the new one (readers call :func:`recover`).
- :func:`check_uniform`: the refusal to put rows made with different settings in one table.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

try:
    import fcntl
except ImportError:             # Windows: no advisory locks; one sweep process per results folder
    fcntl = None

from labkit.studies.engine_keys import Cell, _dumps, canonical

# ============================================================================ atomic files
@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock on ``.<name>.lock`` beside ``path`` (sweeps may run side by side)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def claim(path: str | os.PathLike, key: str):
    """Claim the cell ``key`` of the results file ``path`` for this process, without waiting.

    Yields True when claimed, False when another process holds the claim (it is running that cell).
    The claim is an exclusive ``flock`` on ``_scratch/claims/<key>.lock`` beside the file, held
    until the block ends; the system drops it when its process dies, so a crash leaves no stale
    claim. Without ``fcntl`` (Windows) every claim succeeds.
    """
    if fcntl is None:
        yield True
        return
    lock = Path(path).parent / "_scratch" / "claims" / f"{key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_temp(final: Path, content: bytes | str | Callable[[Path], Any]) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    tmp = Path(tmp)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)                       # e.g. fig.savefig(tmp, format="png")
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        else:
            data = content.encode() if isinstance(content, str) else bytes(content)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


_JOURNAL = ".labkit-journal-"


def write_files(files: Mapping[str | os.PathLike, bytes | str | Callable[[Path], Any]]) -> list[Path]:
    """Write several files of one folder as a set: killed at any instant, the folder ends with all
    the old files or all the new ones (after :func:`recover`, which every reader calls).

    Each value is the content (``str``/``bytes``) or a callable that writes a given temporary path
    (for figures: ``lambda p: fig.savefig(p, format="png")``). All temporaries are written and
    fsynced first; then a journal naming the renames is written atomically; then the renames run and
    the journal is deleted. A crash before the journal leaves the old set (and stray temporaries that
    :func:`recover` removes); a crash after it is rolled forward by :func:`recover`.
    """
    finals = [Path(p) for p in files]
    if not finals:
        return []
    folder = finals[0].parent
    if any(p.parent.resolve() != folder.resolve() for p in finals):
        raise ValueError(f"write_files writes one folder's files; got {sorted({str(p.parent) for p in finals})}")
    recover(folder)
    temps = []
    try:
        for final, content in zip(finals, files.values()):
            temps.append(_write_temp(final, content))
    except BaseException:
        for t in temps:
            t.unlink(missing_ok=True)
        raise
    plan = [[t.name, f.name] for t, f in zip(temps, finals)]
    journal = _write_temp(folder / f"{_JOURNAL}{finals[0].name}.json", json.dumps(plan))
    journal_final = folder / f"{_JOURNAL}{finals[0].name}-{journal.name[-12:-4]}.json"
    os.replace(journal, journal_final)         # the commit point
    _roll_forward(journal_final)
    return finals


def _roll_forward(journal: Path) -> None:
    folder = journal.parent
    try:
        plan = json.loads(journal.read_text())
    except FileNotFoundError:                  # another process finished this set already
        return
    for tmp, final in plan:
        # another writer's recover() may be rolling the same journal forward: a temporary that has
        # vanished was renamed by it
        with contextlib.suppress(FileNotFoundError):
            os.replace(folder / tmp, folder / final)
    journal.unlink(missing_ok=True)


def recover(folder: str | os.PathLike) -> None:
    """Finish any interrupted :func:`write_files` in ``folder`` and remove stray temporaries."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for journal in sorted(folder.glob(f"{_JOURNAL}*.json")):
        try:
            _roll_forward(journal)
        except (OSError, ValueError):           # a journal torn before its rename cannot exist; be safe
            journal.unlink(missing_ok=True)
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        # a temporary older than a minute belongs to no live writer (writers rename within seconds)
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > 60:
                tmp.unlink()


# ============================================================================ result rows
class ResultFileError(ValueError):
    """A results file cannot be trusted as a whole (duplicate keys, a foreign header)."""


class SettingsMismatch(ValueError):
    """Rows that a table would combine were made with different settings."""


@dataclasses.dataclass
class Problem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}, line {self.line}: {self.reason}"


class ResultStore:
    """A CSV of result rows, one per cell key, with the cell's settings and inputs beside it.

    Columns: ``key``, the coordinate columns, the metric columns (numbers; required unless listed in
    ``optional``), ``settings`` and ``inputs`` (JSON), ``origin`` ("run" or how the row got there,
    e.g. "migrated"). Rows are validated on read (:meth:`read`); writes rewrite the whole file
    atomically under a lock, so sweeps may run side by side and a crash never leaves half a row.

    Args:
        path: the CSV file.
        coords: coordinate column names (strings or ints as written by the study).
        metrics: numeric result columns every row must have.
        optional: numeric columns that may be empty (NaN), e.g. added after old rows were made.
        details: an optional JSONL file that gets one record per recorded row (the run's details).
        int_coords: coordinates read back as integers (the others stay strings: a precision "32"
            must not come back as the number 32).
    """

    def __init__(self, path: str | os.PathLike, *, coords: Sequence[str], metrics: Sequence[str],
                 optional: Sequence[str] = (), details: str | os.PathLike | None = None,
                 int_coords: Sequence[str] = ("seed",)):
        self.path = Path(path)
        self.coords = list(coords)
        self.metrics = list(metrics)
        self.optional = list(optional)
        self.details = Path(details) if details is not None else None
        self.int_coords = [c for c in int_coords if c in self.coords]
        self.columns = ["key", *self.coords, *self.metrics, *self.optional, "settings", "inputs", "origin"]
        self.problems: list[Problem] = []

    # -------------------------------------------------------------------- reading
    def read(self, *, report: bool = True):
        """The valid rows as a DataFrame (``settings``/``inputs`` as JSON strings).

        Malformed rows (wrong field count, a missing or non-numeric metric, bad JSON, a truncated
        last line) are skipped and listed in ``self.problems`` (printed when ``report``): they are not
        results, so their cells run again. Raises :class:`ResultFileError` for two rows with one key
        or a header that is not this store's.
        """
        import pandas as pd

        self.problems = []
        recover(self.path.parent)
        empty = pd.DataFrame(columns=self.columns)
        if not self.path.exists():
            return empty
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        if not text.strip():
            self._problem(1, "the file is empty (0 bytes or blank): no results in it", report)
            return empty
        lines = text.splitlines()
        header = next(csv.reader([lines[0]]))
        if header != self.columns:
            raise ResultFileError(
                f"{self.path}: header {header} is not this study's ({self.columns}); "
                "an old-format file needs migrating (scripts/migrate_results.py) or another results folder")
        rows, seen = [], {}
        truncated_tail = not text.endswith("\n")
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            fields = next(csv.reader([line]), [])
            why = self._invalid(fields)
            if why is None and truncated_tail and number == len(lines):
                why = "the last line has no line end (the write was cut short)"
            if why:
                self._problem(number, why, report)
                continue
            row = dict(zip(self.columns, fields))
            if row["key"] in seen:
                raise ResultFileError(f"{self.path}: key {row['key']} appears twice (lines {seen[row['key']]} and "
                                      f"{number}); one cell, one row: remove one of them")
            seen[row["key"]] = number
            rows.append(row)
        df = pd.DataFrame(rows, columns=self.columns)
        for c in self.metrics + self.optional:
            df[c] = pd.to_numeric(df[c], errors="coerce")
        for c in self.int_coords:
            df[c] = df[c].astype(int)
        return df

    def _invalid(self, fields: list[str]) -> str | None:
        if len(fields) != len(self.columns):
            return f"{len(fields)} fields, expected {len(self.columns)} ({', '.join(self.columns)})"
        row = dict(zip(self.columns, fields))
        if len(row["key"]) < 8:
            return f"key {row['key']!r} is not a cell key"
        for c in self.coords:
            if row[c] == "":
                return f"coordinate {c!r} is empty"
        for c in self.int_coords:
            if not row[c].lstrip("-").isdigit():
                return f"coordinate {c!r} is {row[c]!r}, not an integer"
        for c in self.metrics:
            try:
                value = float(row[c])
            except ValueError:
                return f"metric {c!r} is {row[c]!r}, not a number"
            if not math.isfinite(value):
                return f"metric {c!r} is {row[c]!r}"
        for c in self.optional:
            if row[c] not in ("", "nan", "NaN"):
                try:
                    float(row[c])
                except ValueError:
                    return f"column {c!r} is {row[c]!r}, not a number"
        for c in ("settings", "inputs"):
            try:
                if not isinstance(json.loads(row[c]), dict):
                    return f"{c} is not a JSON object"
            except json.JSONDecodeError as exc:
                return f"{c} is not valid JSON ({exc.msg})"
        return None

    def _problem(self, line: int, reason: str, report: bool) -> None:
        p = Problem(str(self.path), line, reason)
        self.problems.append(p)
        if report:
            print(f"[results] ignoring {p} (not a result; its cell will run again)", flush=True)

    def claim(self, key: str):
        """:func:`claim` for a cell of this store (a context manager yielding True or False)."""
        return claim(self.path, key)

    def done_keys(self) -> set[str]:
        return set(self.read(report=False)["key"])

    # -------------------------------------------------------------------- writing
    def row_for(self, cell: Cell, metrics: Mapping[str, Any], *, origin: str = "run") -> dict:
        """The CSV row of ``cell`` with ``metrics`` (missing optional metrics left empty)."""
        missing = [m for m in self.metrics if m not in metrics]
        if missing:
            raise ValueError(f"result of {cell.short()} lacks metric(s) {missing}")
        row = {"key": cell.key, **{c: cell.coords[c] for c in self.coords}}
        for m in self.metrics + self.optional:
            v = metrics.get(m)
            row[m] = "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
        row.update(settings=_dumps(cell.settings), inputs=_dumps(cell.inputs), origin=origin)
        return row

    def record(self, cell: Cell, metrics: Mapping[str, Any], details: Mapping[str, Any] | None = None, *,
               origin: str = "run") -> bool:
        """Add the row of ``cell`` unless its key is there already; returns whether it was added.

        The table is rewritten to a temporary file and renamed over the old one under the lock;
        valid rows are kept, malformed ones dropped (they were reported on read). The details go to
        the JSONL file (with the key) after the row is in.
        """
        row = self.row_for(cell, metrics, origin=origin)
        with locked(self.path):
            df = self.read(report=False)
            if (df["key"] == cell.key).any():
                return False
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
            writer.writeheader()
            for r in df.to_dict("records"):
                writer.writerow({c: _cell_text(r[c]) for c in self.columns})
            writer.writerow({c: _cell_text(row[c]) for c in self.columns})
            write_files({self.path: buf.getvalue()})
            if self.details is not None and details is not None:
                with open(self.details, "a") as fh:
                    fh.write(json.dumps({"key": cell.key, "study": cell.study, "coords": canonical(cell.coords),
                                         **canonical(details)}, sort_keys=True) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
        return True

    def read_details(self) -> list[dict]:
        """The JSONL records (malformed lines skipped with a message naming file and line)."""
        if self.details is None or not self.details.exists():
            return []
        out = []
        for number, line in enumerate(self.details.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                print(f"[results] ignoring {self.details}, line {number}: not JSON ({exc.msg})", flush=True)
        return out


def _cell_text(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return ""
    return v


def check_uniform(df, *, ignore: Iterable[str] = (), what: str = "this table") -> dict:
    """The settings shared by every row of ``df``; raises :class:`SettingsMismatch` naming the settings
    whose values differ (a table must not average or set side by side rows made differently).

    ``ignore`` lists settings allowed to differ (e.g. method-specific ones in a table of methods).
    Settings present in only some rows count as differing too.
    """
    if len(df) == 0:
        return {}
    ignore = set(ignore)
    parsed = [json.loads(s) if isinstance(s, str) else dict(s) for s in df["settings"]]
    names = set().union(*parsed) - ignore
    shared, differ = {}, {}
    for name in sorted(names):
        values = {json.dumps(p.get(name, "<absent>"), sort_keys=True) for p in parsed}
        if len(values) == 1:
            shared[name] = parsed[0][name]
        else:
            differ[name] = sorted(values)
    if differ:
        lines = "; ".join(f"{k} = {' / '.join(v[:4])}" for k, v in differ.items())
        raise SettingsMismatch(f"{what} would combine rows made with different settings: {lines}. "
                               "Select rows with one setting (e.g. the keys of the cells you ran).")
    return shared


