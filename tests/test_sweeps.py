"""labkit.sweeps: result rows written by several sweep processes at once are all kept."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from labkit.sweeps import append_csv_row, append_jsonl

COLUMNS = ["worker", "i"]


def _read(path: Path):
    import pandas as pd

    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=COLUMNS)


def _writer(path: str, worker: int, n: int) -> None:
    for i in range(n):
        append_csv_row(Path(path), {"worker": worker, "i": i, "ignored": 1}, COLUMNS, _read)
        append_jsonl(Path(path).with_suffix(".jsonl"), {"worker": worker, "i": i})


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_concurrent_writers_lose_no_row(tmp_path):
    # Without the lock, two read-modify-rename cycles that overlap drop one of the two rows; with
    # 3 workers x 40 rows back to back that happens in practically every run.
    path = tmp_path / "accuracy.csv"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    df = _read(path)
    assert list(df.columns) == COLUMNS
    assert sorted(zip(df["worker"], df["i"])) == [(w, i) for w in range(3) for i in range(40)]
    lines = path.with_suffix(".jsonl").read_text().splitlines()
    assert sorted((r["worker"], r["i"]) for r in map(json.loads, lines)) == [(w, i) for w in range(3) for i in range(40)]
    assert not list(tmp_path.glob("*.tmp"))              # no temporary file left behind


def test_a_cell_already_in_the_table_is_not_added_twice(tmp_path):
    path = tmp_path / "accuracy.csv"
    assert append_csv_row(path, {"worker": 1, "i": 0}, COLUMNS, key=COLUMNS)
    assert append_csv_row(path, {"worker": 1, "i": 1}, COLUMNS, key=COLUMNS)
    assert not append_csv_row(path, {"worker": 1, "i": 0}, COLUMNS, key=COLUMNS)   # the same cell again
    assert append_csv_row(path, {"worker": 1, "i": 0}, COLUMNS)                     # no key: appended
    assert _read(path).values.tolist() == [[1, 0], [1, 1], [1, 0]]
