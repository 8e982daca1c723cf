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
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["labkit_checkout", "mismatch"]


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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -I venv_check.py REPO_ROOT", file=sys.stderr)
        sys.exit(2)
    why = mismatch(sys.argv[1])
    if why:
        print(why)
    sys.exit(1 if why else 0)
