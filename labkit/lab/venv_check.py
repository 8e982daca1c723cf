"""Does a virtualenv import this checkout's labkit? ``./lab`` asks before every command.

Why: ``LAB_VENV`` may point at a virtualenv another checkout created (a second clone, a git
worktree). Its ``pip install -e`` made ``import labkit`` mean *that* checkout's code. ``./lab run``
exports ``LAB_ROOT`` (so results land here) but papermill's kernels start in ``notebooks/``, where
``labkit`` resolves through the virtualenv: the notebooks would run the other checkout's library
on this checkout's data, silently. ``./lab`` reinstalls (``pip install -e``) when this check fails
and refuses to go on if it still fails.

Run by path with the virtualenv's Python in isolated mode, so neither the working directory nor
this file's folder can supply ``labkit``::

    VENV/bin/python -I labkit/lab/venv_check.py REPO_ROOT   # exit 0: fine; 1: the reason on stdout

Only the standard library; ``labkit`` is located (``importlib.util.find_spec``), never imported,
so a broken or foreign labkit cannot run code here.

The same question for the kernels that ``./lab run`` and ``./lab jupyter`` start:
:func:`pythonpath_first` builds their ``PYTHONPATH`` so that a ``PYTHONPATH`` pointing at another
checkout cannot hand them that checkout's labkit (a kernel's working directory is ``notebooks/``,
where ``labkit`` resolves through ``PYTHONPATH`` before the virtualenv).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["labkit_checkout", "mismatch", "pythonpath_first"]


def labkit_checkout() -> Path | None:
    """The folder holding the ``labkit`` package this Python imports (its checkout), or None."""
    try:
        spec = importlib.util.find_spec("labkit")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        return Path(spec.origin).resolve().parent.parent
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]).resolve().parent if locations else None


def mismatch(root: str | os.PathLike) -> str | None:
    """Why this Python's ``labkit`` is not the one in ``root`` (None when it is)."""
    root = Path(root).resolve()
    found = labkit_checkout()
    if found is None:
        return f"labkit is not installed in {sys.prefix}"
    if found != root:
        return f"the virtualenv {sys.prefix} imports labkit from {found}, not from this checkout {root}"
    return None


def _holds_labkit(folder: Path) -> bool:
    return (folder / "labkit" / "__init__.py").is_file()


def pythonpath_first(home: str | os.PathLike, current: str | None) -> str:
    """A ``PYTHONPATH`` whose first entry is ``home`` (the folder holding the labkit to import),
    followed by the entries of ``current`` except those that hold another ``labkit`` package."""
    home = Path(home).resolve()
    keep = [str(home)]
    for entry in (current or "").split(os.pathsep):
        if not entry:
            continue
        folder = Path(entry).resolve()
        if folder == home or _holds_labkit(folder):
            continue
        keep.append(entry)
    return os.pathsep.join(keep)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -I venv_check.py REPO_ROOT", file=sys.stderr)
        sys.exit(2)
    why = mismatch(sys.argv[1])
    if why:
        print(why)
    sys.exit(1 if why else 0)
