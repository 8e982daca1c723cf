"""Reporting helpers shared by every study: generated blocks in Markdown files.

A study writes its tables into a document (the README, a results page) between two HTML comments,
``<!-- name:start -->`` and ``<!-- name:end -->``; :func:`replace_marked_block` rewrites what lies
between them and leaves the rest of the file alone.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["replace_marked_block"]


def replace_marked_block(md_path: str | os.PathLike, name: str, body: str) -> bool:
    """Put ``body`` between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` in ``md_path``.

    Returns True if the file changed. Raises ``ValueError`` if the markers are missing.
    """
    path = Path(md_path)
    text = path.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{path} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = head + start + "\n" + body.strip("\n") + "\n" + end + tail
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False
