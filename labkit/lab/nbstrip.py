"""Strip a notebook's outputs: the lab's git clean filter, and what ``./lab sync`` applies to files.

Why a clean filter: JupyterLab autosaves a notebook with its outputs while it runs, and the
notebooks are committed without them. Rather than asking everyone to strip before each commit,
``.gitattributes`` gives ``notebooks/*.ipynb`` the filter ``labstrip`` and ``./lab`` (every
command) points ``filter.labstrip.clean`` in ``.git/config`` at this file. git then stores the
notebook without outputs: ``git status`` and ``git diff`` stay quiet after a JupyterLab session,
and the outputs remain on screen in the working file.

This file uses only the standard library and is run by path (``python -I .../nbstrip.py``), so
git's frequent calls do not import labkit (which imports torch). Command line::

    python nbstrip.py < executed.ipynb > clean.ipynb     # the git filter
    python nbstrip.py FILE.ipynb ...                      # strip files in place (only if needed)

What is removed (run state, never content): code cells' outputs and execution counts; the cell
metadata keys in :data:`CELL_KEYS` (timings, papermill's bookkeeping, collapsed/scrolled view
state) and an empty ``tags`` list; the notebook metadata keys in :data:`NOTEBOOK_KEYS` (saved widget state, papermill's
record, the kernel's ``language_info``). A notebook with nothing to remove is passed through byte
for byte, so clean notebooks never show as modified.

Safe to interrupt and safe on odd text: a stripped file is written to a temporary file beside it,
flushed, then renamed over the original (an error or a kill leaves the original whole, never a
truncated file), and the filter writes nothing to git until its whole output is encoded. A string
holding a lone UTF-16 surrogate (JSON ``"\\ud800"``, which has no UTF-8 encoding) keeps its
``\\uXXXX`` escape instead of failing the write. ``./lab`` marks the filter ``required``, so git
refuses to stage a notebook when the filter cannot run (its Python gone) rather than storing the
outputs.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

__all__ = ["CELL_KEYS", "NOTEBOOK_KEYS", "strip_notebook", "strip_text", "strip_file"]

CELL_KEYS = ("execution", "ExecuteTime", "papermill", "collapsed", "scrolled")
NOTEBOOK_KEYS = ("widgets", "papermill", "language_info")


def strip_notebook(nb: dict) -> bool:
    """Remove run state from a notebook loaded as JSON (a dict, changed in place); True if anything went."""
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError("not a Jupyter notebook: expected a JSON object with a 'cells' list")
    changed = False
    for cell in nb["cells"]:
        if cell.get("cell_type") == "code":
            if cell.get("outputs"):
                cell["outputs"] = []
                changed = True
            if cell.get("execution_count") is not None:
                cell["execution_count"] = None
                changed = True
        metadata = cell.get("metadata") or {}
        for key in CELL_KEYS:
            if key in metadata:
                del metadata[key]
                changed = True
        if metadata.get("tags") == []:  # JupyterLab leaves an empty list behind after a tag is removed
            del metadata["tags"]
            changed = True
    metadata = nb.get("metadata") or {}
    for key in NOTEBOOK_KEYS:
        if key in metadata:
            del metadata[key]
            changed = True
    return changed


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _dumps(nb: dict) -> str:
    # nbformat's own layout (nbformat.v4.nbjson): one-space indent, sorted keys, UTF-8 text, final newline
    text = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False, separators=(",", ": ")) + "\n"
    # A lone surrogate can only sit inside a JSON string (json.loads pairs the valid ones into one
    # character): write it back as the escape it was read from, which UTF-8 can carry.
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _encode(text: str) -> bytes:
    return text.encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file in the same folder and a rename: the file is
    the old one or the new one, never a part, whatever happens meanwhile."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def strip_text(text: str) -> str:
    """The notebook JSON ``text`` without run state; ``text`` itself when there is nothing to strip."""
    nb = json.loads(text)
    return _dumps(nb) if strip_notebook(nb) else text


def strip_file(path: str | Path) -> bool:
    """Strip ``path`` in place; True if it changed. An unchanged file is not rewritten (its mtime
    matters to jupytext, which pairs twins by modification time)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = strip_text(text)
    if new == text:
        return False
    _write_atomic(path, _encode(new))    # encoded first: a failure leaves the file as it was
    return True


def main(argv: list[str]) -> int:
    if argv:
        for name in argv:
            strip_file(name)
        return 0
    data = sys.stdin.buffer.read()
    if not data.strip():  # an empty file is not a notebook to parse; git may still hand it over
        sys.stdout.buffer.write(data)
        return 0
    try:
        out = _encode(strip_text(data.decode("utf-8")))
    except ValueError as exc:  # json.JSONDecodeError and UnicodeError are ValueErrors
        # the filter is required: git refuses to stage the notebook, and says why through this line
        print(f"labstrip: not stripped ({exc})", file=sys.stderr)
        return 1
    # all of it encoded before the first byte goes out: git never receives a part
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
