"""Bookkeeping shared by the resumable sweeps (classification, WAE): result rows that survive an
interruption at any instant."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:             # Windows: no advisory locks; one sweep process per results folder
    fcntl = None


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``<path>.lock`` so that sweeps running side by side (say, one per
    method group) never read the table while another is replacing it, and no row is lost."""
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


def read_table(path: str | os.PathLike, columns: list[str]):
    """The CSV at ``path`` as a pandas DataFrame, or an empty one with ``columns`` if it is absent."""
    import pandas as pd

    path = Path(path)
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=columns)


def append_csv_row(path: Path, row: dict, columns: list[str], read=None, *, key: list[str] | None = None) -> bool:
    """Add ``row`` (its ``columns``) to the CSV at ``path`` atomically.

    The whole table is rewritten to a temporary file in the same folder, fsynced and renamed over
    the old one, so a crash leaves either the old or the new table, never half a line.
    ``read(path)`` returns the current table as a DataFrame (default: :func:`read_table`).
    With ``key`` (the columns naming a cell), a row whose cell is already in the table is not
    added (two sweeps that raced for the same cell leave one row); returns whether it was added.
    """
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        df = read(path) if read is not None else read_table(path, columns)
        if key and not df.empty and (df[key].astype(str) == [str(row[k]) for k in key]).all(axis=1).any():
            return False
        new = pd.DataFrame([{c: row[c] for c in columns}])
        df = new if df.empty else pd.concat([df, new], ignore_index=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".csv.tmp", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            df.to_csv(fh, index=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return True


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON record (a run's details) as a line, flushed to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path), open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
