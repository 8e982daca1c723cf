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
"""
from __future__ import annotations

import json
import sys
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


def _dumps(nb: dict) -> str:
    # nbformat's own layout (nbformat.v4.nbjson): one-space indent, sorted keys, UTF-8 text, final newline
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False, separators=(",", ": ")) + "\n"


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
    path.write_text(new, encoding="utf-8")
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
    text = data.decode("utf-8")
    try:
        out = strip_text(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        # git keeps the file as it is if the filter fails; say why instead of storing a traceback
        print(f"labstrip: not stripped ({exc})", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(out.encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
