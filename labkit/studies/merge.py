"""Merging two copies of one study's results: rows recorded on another machine brought home.

A sweep split across machines (the CPU here, a GPU lent for an hour) leaves two result folders of
one study, each with its table, its details file and its attachments. :func:`merge_results` adds
to one of them the rows of the other that it lacks, each row with its details record and its
attachments, as one set of files under the table's lock (:func:`labkit.studies.store.write_files`):
interrupted at any instant, the folder holds either the old set or the merged one. Rows are copied
as their text, byte for byte, so a merged row reads back exactly as it was recorded.

A key found in both copies is one cell run twice (on two machines its numbers differ within the
rerun drift): the row already here is kept, and the other is listed in the result as kept out.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from labkit.studies.store import ResultStore, appended, locked, write_files

__all__ = ["MergeResult", "merge_results"]


@dataclass
class MergeResult:
    """What :func:`merge_results` did: ``added`` (keys now here, in the other copy's order),
    ``already_here`` (keys both copies hold: the row here was kept), ``not_planned`` (keys of the
    other copy outside ``keys``)."""

    added: list[str] = field(default_factory=list)
    already_here: list[str] = field(default_factory=list)
    not_planned: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.added)} row(s) added, {len(self.already_here)} already here (kept as they are), "
                f"{len(self.not_planned)} of other cells left out")


def _csv_lines(path: Path) -> dict[str, str]:
    """Each data line of a results table by its key (the first field), as written."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    out = {}
    for line in lines:
        fields = next(csv.reader([line]), [])
        if fields:
            out[fields[0]] = line
    return out


def _jsonl_lines(path: Path | None, keys: Collection[str]) -> list[str]:
    """The lines of a JSONL file whose record's ``key`` is in ``keys`` (unreadable lines skipped)."""
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("key") in keys:
            out.append(line)
    return out


def merge_results(into: ResultStore, other: ResultStore, *, keys: Collection[str] | None = None) -> MergeResult:
    """Add to ``into`` the valid rows of ``other`` whose keys it lacks (with ``keys``: only those
    among them), each with its details record and attachment records.

    Raises ``ValueError`` naming both tables when they are not of one study (their columns or
    attachments differ), when ``other`` has no table, or when it lacks the details record of a row
    to be added while ``into`` keeps details (the row would arrive without its provenance).
    """
    if into.path.resolve() == other.path.resolve():
        raise ValueError(f"{other.path} is the table results are merged into: nothing to merge")
    if not other.path.exists():
        raise ValueError(f"{other.path} does not exist: no results to merge from there")
    if into.columns != other.columns or set(into.attachments) != set(other.attachments):
        raise ValueError(f"{other.path} and {into.path} are not tables of one study (columns {other.columns} "
                         f"and {into.columns}, attachments {sorted(other.attachments)} and {sorted(into.attachments)})")
    theirs = list(other.read(report=True)["key"])
    result = MergeResult()
    with locked(into.path):
        here = set(into.read(report=False)["key"])
        for k in theirs:
            (result.already_here if k in here else
             result.not_planned if keys is not None and k not in keys else result.added).append(k)
        if not result.added:
            return result
        new = set(result.added)
        rows = _csv_lines(other.path)
        files: dict[Path, bytes] = {into.path: appended(into.path, *(rows[k] for k in result.added),
                                                        header=other.path.read_text(encoding="utf-8").splitlines()[0])}
        if into.details is not None:
            records = _jsonl_lines(other.details, new)
            lacking = new - {json.loads(line)["key"] for line in records}
            if lacking:
                raise ValueError(f"{other.details or other.path}: no details record for {len(lacking)} row(s) to merge "
                                 f"({', '.join(sorted(k[:8] for k in lacking))}): they would arrive without their "
                                 "provenance; nothing merged")
            files[into.details] = appended(into.details, *records)
        for name, file in into.attachments.items():
            lines = _jsonl_lines(other.attachments[name], new)
            if lines:
                files[file] = appended(file, *lines)
        write_files(files)
    return result
