"""The notebooks stored clean: ``.ipynb`` / jupytext ``.py`` twins in step and without outputs.

``./lab sync`` (:func:`sync`) pairs every ``notebooks/NN_*.ipynb`` with its percent-format ``.py``
and strips outputs (:func:`strip_outputs`, the rules of git's ``labstrip`` filter,
:mod:`labkit.lab.nbstrip`); :func:`check_clean` says what keeps a stored notebook from being clean
(``tests/test_notebooks_clean.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

from labkit import paths
from labkit.lab import nbstrip
from labkit.lab.profiles import inspect_parameters

__all__ = ["check_clean", "strip_outputs", "sync"]


def strip_outputs(path: str | os.PathLike) -> bool:
    """Remove outputs, execution counts and other run state from an .ipynb; True if it changed.

    The same rules as git's ``labstrip`` clean filter (:mod:`labkit.lab.nbstrip`). The file is
    rewritten only when something changed, so clean notebooks keep their mtime (jupytext decides
    which twin is newer by mtime).
    """
    return nbstrip.strip_file(path)


def sync(directory: str | os.PathLike | None = None, *, quiet: bool = False) -> list[Path]:
    """Make every ``NN_*.ipynb`` / ``NN_*.py`` pair consistent (``jupytext --sync``) and output-free.

    A notebook that exists only as a ``.py`` (percent format) gets its ``.ipynb`` created, and vice
    versa. For a pair, jupytext takes the cell inputs from the more recently modified twin.
    Returns the .ipynb files handled.
    """
    from jupytext.cli import jupytext as jupytext_cli

    directory = Path(directory) if directory is not None else paths.notebooks_dir()
    stems = sorted({p.stem for pattern in ("[0-9][0-9]_*.ipynb", "[0-9][0-9]_*.py")
                    for p in directory.glob(pattern)})
    done = []
    for stem in stems:
        ipynb, py = directory / f"{stem}.ipynb", directory / f"{stem}.py"
        if ipynb.exists():
            args = ["--sync", str(ipynb)]  # creates the .py if missing; else inputs from the newer twin
        else:
            args = ["--to", "ipynb", str(py)]  # a notebook written as .py: create its .ipynb
        jupytext_cli((["--quiet"] if quiet else []) + args)
        if not (ipynb.exists() and py.exists()):
            raise RuntimeError(
                f"jupytext did not pair {stem}.ipynb and {stem}.py in {directory}: the pairing comes from "
                "jupytext.toml at the repository root (formats = notebooks///ipynb,notebooks///py:percent)"
            )
        if strip_outputs(ipynb) and not quiet:
            print(f"[lab sync] stripped outputs from {ipynb}")
        if py.stat().st_mtime < ipynb.stat().st_mtime:
            # Jupytext's Jupyter integration refuses a pair whose .ipynb is newer than its text twin.
            os.utime(py)
        done.append(ipynb)
    return done


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def check_clean(ipynb: str | os.PathLike, *, text: str | None = None) -> list[str]:
    """What is wrong with a committed notebook, as messages (empty list: clean).

    Args:
        ipynb: the notebook (its name and its ``.py`` twin's place).
        text: the notebook's JSON to check instead of the file, e.g. what git stores
            (the file through the ``labstrip`` clean filter).

    Checks: no outputs, no execution counts, no saved widget state; exactly one cell tagged
    ``parameters`` (where papermill injects the profile), whose every assignment papermill can
    read; a ``.py`` twin exists and has the same cells (type, source, tags) as the ``.ipynb``.
    Messages say how to fix (``./lab sync``).
    """
    import jupytext
    import nbformat

    ipynb = Path(ipynb)
    problems = []
    nb = nbformat.reads(text, as_version=4) if text is not None else nbformat.read(ipynb, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and cell.get("outputs"):
            problems.append(f"{ipynb.name}: cell {i} has outputs (run ./lab sync to strip them)")
        if cell.cell_type == "code" and cell.get("execution_count") is not None:
            problems.append(f"{ipynb.name}: cell {i} has an execution count (run ./lab sync to strip it)")
    if "widgets" in nb.metadata:
        problems.append(f"{ipynb.name}: notebook metadata holds saved widget state (run ./lab sync)")
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"{ipynb.name}: {len(tagged)} cells tagged 'parameters' (cells {tagged}), expected exactly 1")
    else:
        try:
            inspect_parameters(ipynb, source=nb.cells[tagged[0]].source)
        except ValueError as exc:
            problems.append(str(exc))
    twin = ipynb.with_suffix(".py")
    if not twin.exists():
        problems.append(f"{ipynb.name}: its jupytext twin {twin.name} is missing (run ./lab sync)")
        return problems
    a, b = _cells(nb), _cells(jupytext.read(twin))
    if a != b:
        where = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        problems.append(
            f"{ipynb.name} and {twin.name} have drifted apart ({len(a)} vs {len(b)} cells, first difference "
            f"at cell {where}): run ./lab sync (the more recently modified twin wins)"
        )
    return problems
