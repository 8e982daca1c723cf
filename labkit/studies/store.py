"""Result files a crash cannot corrupt: validated result rows, and sets of files written as one.

- :class:`ResultStore`: a CSV with one row per cell key, the cell's settings and inputs beside its
  metrics. Rows are validated on read (a truncated or malformed row is reported with file and line
  and is not a result); two rows with one key are an error naming the file; writes are atomic and
  locked, so sweeps may run side by side. A metric that is not a finite number is refused when
  recorded (:class:`InvalidMetric`), and a row, its details record and its attachments (e.g. per-image
  predictions) are written as one set.
- :func:`write_files`: several files of one folder (CSV, JSON, figure) written as a set: killed at
  any instant, the folder ends with the old set or the new one (readers call :func:`recover`).
  Writers hold a lock on their temporaries; recovery removes only those of dead writers.
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
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

try:
    import fcntl
except ImportError:             # Windows: no advisory locks; one sweep process per results folder
    fcntl = None

from labkit.studies.engine_keys import Cell, canonical_json, canonical

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


#: the suffix of :func:`write_files`' temporaries: only files named so are ever removed by
#: :func:`recover` (another writer's ``.*.tmp``, e.g. a checkpoint being saved, is not its to judge)
_TEMP_SUFFIX = ".set.tmp"


def _lock_new_temp(final: Path) -> tuple[Path, Any]:
    """A new temporary beside ``final``, open and exclusively ``flock``-ed by this process.

    The lock is the sign of a live writer: :func:`recover` removes a temporary only when it can take
    its lock (its writer is gone: the system drops a dead process's locks). A temporary that
    ``recover`` removed between its creation and the lock (``st_nlink`` 0 once locked) is made anew.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_TEMP_SUFFIX, dir=final.parent)
        fh = os.fdopen(fd, "r+b")
        if fcntl is None:
            return Path(name), fh
        fcntl.flock(fh, fcntl.LOCK_EX)
        if os.fstat(fh.fileno()).st_nlink > 0:
            return Path(name), fh
        fh.close()


def _write_temp(final: Path, content: bytes | str | Callable[[Path], Any]) -> tuple[Path, Any]:
    """Write ``content`` to a locked temporary beside ``final``; returns ``(path, open locked file)``:
    the caller closes the file (dropping the lock) once the temporary has been renamed or removed."""
    tmp, fh = _lock_new_temp(final)
    try:
        if callable(content):
            content(tmp)                       # e.g. fig.savefig(tmp, format="png"): same inode, lock kept
            with open(tmp, "rb+") as out:
                os.fsync(out.fileno())
        else:
            fh.write(content.encode() if isinstance(content, str) else bytes(content))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        tmp.unlink(missing_ok=True)
        fh.close()
        raise
    return tmp, fh


_JOURNAL = ".labkit-journal-"


def write_table(df: Any, path: str | os.PathLike, **to_csv) -> Path:
    """Write a DataFrame as CSV atomically (:func:`write_files`): a reader never sees half a table."""
    return write_files({path: df.to_csv(**to_csv)})[0]


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (:func:`write_files`)."""
    return write_files({path: text})[0]


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
    temps, handles = [], []
    committed = False
    try:
        for final, content in zip(finals, files.values()):
            tmp, fh = _write_temp(final, content)
            temps.append(tmp)
            handles.append(fh)
        plan = [[t.name, f.name] for t, f in zip(temps, finals)]
        journal, jh = _write_temp(folder / f"{_JOURNAL}{finals[0].name}.json", json.dumps(plan))
        handles.append(jh)
        journal_final = folder / f"{_JOURNAL}{finals[0].name}-{journal.name.split('.')[-3][-8:]}.json"
        try:
            os.replace(journal, journal_final)         # the commit point
        except BaseException:
            journal.unlink(missing_ok=True)
            raise
        committed = True
        _roll_forward(journal_final)
    except BaseException:
        if not committed:                              # the old set stands: these are garbage
            for t in temps:
                t.unlink(missing_ok=True)
        raise
    finally:
        # the locks go only now: until every rename is done, recover() must leave the temporaries be
        for fh in handles:
            fh.close()
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


def _journal_temps(folder: Path) -> set[str]:
    """The temporaries named by the journals of ``folder`` (committed sets not yet rolled forward)."""
    names: set[str] = set()
    for journal in folder.glob(f"{_JOURNAL}*.json"):
        with contextlib.suppress(OSError, ValueError, TypeError):
            names.update(tmp for tmp, _ in json.loads(journal.read_text()))
    return names


def recover(folder: str | os.PathLike) -> None:
    """Finish any interrupted :func:`write_files` in ``folder`` and remove the temporaries of dead writers.

    A temporary is removed only when its writer is gone: writers hold an exclusive ``flock`` on
    their temporaries until these are renamed, so a temporary whose lock this process can take
    belongs to no live process (however old it is: a writer stopped by Ctrl-Z or a stalled machine
    keeps its lock and its file). Only :func:`write_files`' own temporaries (``*.set.tmp``) are
    judged; without ``fcntl`` (Windows) none is removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for journal in sorted(folder.glob(f"{_JOURNAL}*.json")):
        try:
            _roll_forward(journal)
        except (OSError, ValueError):           # a journal torn before its rename cannot exist; be safe
            journal.unlink(missing_ok=True)
    if fcntl is None:
        return
    for tmp in folder.glob(f".*{_TEMP_SUFFIX}"):
        try:
            fh = open(tmp, "rb")
        except OSError:                         # renamed or removed meanwhile
            continue
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:             # a live writer holds it
                continue
            # a set committed after the journals were rolled forward above names its temporaries
            # in its journal: those are renamed by whoever rolls it forward, never removed
            if tmp.name not in _journal_temps(folder):
                tmp.unlink(missing_ok=True)


# ============================================================================ result rows
class ResultFileError(ValueError):
    """A results file cannot be trusted as a whole (duplicate keys, a foreign header)."""


class SettingsMismatch(ValueError):
    """Rows that a table would combine were made with different settings."""


class InvalidMetric(ValueError):
    """A cell's result holds a metric that is not a finite number (NaN, inf, text): it is refused at
    record time, so the cell is reported failed instead of being "done" with a number that is not one."""


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
        details: an optional JSONL file beside ``path`` that gets one record per recorded row (the
            run's details); the row and its record are written as one set (:func:`write_files`).
        int_coords: coordinates read back as integers (the others stay strings: a precision "32"
            must not come back as the number 32).
        attachments: ``{field: JSONL file beside path}``: a details entry named ``field`` (a dict,
            e.g. a cell's per-image predictions) is taken out of the details record and appended to
            its own file as ``{"key": cell key, **entry}``, in the same set as the row (read back
            with :meth:`read_attachments`). Keeps bulky per-cell data out of the details file.
    """

    def __init__(self, path: str | os.PathLike, *, coords: Sequence[str], metrics: Sequence[str],
                 optional: Sequence[str] = (), details: str | os.PathLike | None = None,
                 int_coords: Sequence[str] = ("seed",),
                 attachments: Mapping[str, str | os.PathLike] | None = None):
        self.path = Path(path)
        self.coords = list(coords)
        self.metrics = list(metrics)
        self.optional = list(optional)
        self.details = Path(details) if details is not None else None
        if self.details is not None and self.details.parent.resolve() != self.path.parent.resolve():
            raise ValueError(f"details file {self.details} must lie beside the results file {self.path}: "
                             "a row and its details are written as one set, in one folder")
        self.attachments = {str(k): Path(v) for k, v in (attachments or {}).items()}
        for field, file in self.attachments.items():
            if file.parent.resolve() != self.path.parent.resolve():
                raise ValueError(f"attachment file {file} ({field!r}) must lie beside the results file {self.path}: "
                                 "a row and its attachments are written as one set, in one folder")
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
        if report:
            lacking = self.rows_without_details(df)
            if lacking:
                print(f"[results] {self.path}: {len(lacking)} row(s) have no record in {self.details} "
                      f"(no provenance: settings and inputs are in the CSV, the run's details are lost): "
                      f"{', '.join(k[:8] for k in lacking[:5])}{' ...' if len(lacking) > 5 else ''}", flush=True)
        return df

    def rows_without_details(self, df=None) -> list[str]:
        """Keys of valid rows that have no record in the details file (``[]`` without one)."""
        if self.details is None:
            return []
        df = self.read(report=False) if df is None else df
        if len(df) == 0:
            return []
        have = {d.get("key") for d in self.read_details(report=False)}
        return [k for k in df["key"] if k not in have]

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
        """The CSV row of ``cell`` with ``metrics`` (missing optional metrics left empty).

        Raises :class:`InvalidMetric` naming the cell and the metric for a required metric that is
        absent and for any given metric that is not a finite number (NaN, inf, text): such a row
        would be dropped on the next read and its cell rerun forever. ``None`` marks an optional
        metric as absent.
        """
        missing = [m for m in self.metrics if metrics.get(m) is None]
        if missing:
            raise InvalidMetric(f"result of {cell.short()} lacks metric(s) {missing}")
        row = {"key": cell.key, **{c: cell.coords[c] for c in self.coords}}
        for m in self.metrics + self.optional:
            v = metrics.get(m)
            if v is not None:
                _check_number(cell, m, v)
                v = canonical(v)                  # numpy / torch scalars as plain numbers
            row[m] = "" if v is None else v
        row.update(settings=canonical_json(cell.settings), inputs=canonical_json(cell.inputs), origin=origin)
        return row

    def record(self, cell: Cell, metrics: Mapping[str, Any], details: Mapping[str, Any] | None = None, *,
               origin: str = "run") -> bool:
        """Add the row of ``cell`` unless its key is there already; returns whether it was added.

        Under the lock, the table (valid rows kept, malformed ones dropped: they were reported on
        read) and the details file with the new record appended are written as one set
        (:func:`write_files`): killed at any instant, the folder holds neither or both, so a row
        never lacks its details. The store's attachments found in ``details`` go to their own
        files in the same set. Raises :class:`InvalidMetric` (nothing written) for a metric that
        is not a finite number.
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
            files: dict[Path, str | bytes] = {self.path: buf.getvalue()}
            details = dict(details) if details is not None else None
            for field, file in self.attachments.items():
                entry = details.pop(field, None) if details is not None else None
                if entry is None:
                    continue
                if not isinstance(entry, Mapping):
                    raise TypeError(f"attachment {field!r} of {cell.short()} must be a dict, got {type(entry).__name__}")
                files[file] = appended(file, json.dumps({**canonical(entry), "key": cell.key}, sort_keys=True))
            if self.details is not None and details is not None:
                line = json.dumps({"key": cell.key, "study": cell.study, "coords": canonical(cell.coords),
                                   **canonical(details)}, sort_keys=True)
                files[self.details] = appended(self.details, line)
            write_files(files)
        return True

    def read_attachments(self, field: str) -> dict[str, dict]:
        """The records of attachment ``field`` by cell key (``{}`` before any was written).

        Raises ``ValueError`` naming the file and line for a line that is not a JSON object with a
        ``key``, and for two different records under one key (one cell, one record).
        """
        if field not in self.attachments:
            raise ValueError(f"{self.path}: no attachment {field!r} (have {sorted(self.attachments)})")
        file = self.attachments[field]
        recover(file.parent)
        if not file.exists():
            return {}
        out: dict[str, dict] = {}
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file}, line {number}: not JSON ({exc.msg})") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                raise ValueError(f"{file}, line {number}: not a record with a cell key")
            if rec["key"] in out and out[rec["key"]] != rec:
                raise ValueError(f"{file}, line {number}: a second, different record for key {rec['key']}")
            out[rec["key"]] = rec
        return out

    def read_details(self, *, report: bool = True) -> list[dict]:
        """The JSONL records (malformed lines skipped, with a message naming file and line when ``report``)."""
        if self.details is None or not self.details.exists():
            return []
        out = []
        for number, line in enumerate(self.details.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if report:
                    print(f"[results] ignoring {self.details}, line {number}: not JSON ({exc.msg})", flush=True)
        return [d for d in out if isinstance(d, dict)]


def appended(path: Path, *lines: str, header: str | None = None) -> bytes:
    """The bytes of ``path`` with ``lines`` added, each a line of its own; a file that does not
    exist starts empty, or with ``header`` as its first line."""
    old = path.read_bytes() if path.exists() else (header + "\n").encode() if header is not None else b""
    if old and not old.endswith(b"\n"):     # a torn last line stays a line of its own
        old += b"\n"
    return old + "".join(line + "\n" for line in lines).encode()


def _check_number(cell: Cell, name: str, value: Any) -> None:
    """Refuse a metric value that is not a finite real number (bools and text included)."""
    ok = not isinstance(value, bool)
    try:
        number = float(value)
    except (TypeError, ValueError):
        ok = False
    else:
        ok = ok and math.isfinite(number)
    if not ok:
        raise InvalidMetric(f"cell {cell.short()} gave metric {name!r} = {value!r}, not a finite number: "
                            "refused (the cell counts as failed; a NaN or inf result is a broken run)")


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


