"""Run the lab's notebooks headless with papermill (what ``./lab run`` calls), and keep them clean.

Command line::

    python -m labkit.run_notebooks [--profile quick|cpu|paper|FILE.yaml] [--only PATTERN ...]
                                   [-p key=value ...] [-p 01_dmfa.key=value ...] [--output-dir DIR]
    python -m labkit.run_notebooks --list      # the notebooks and their parameters, run nothing
    python -m labkit.run_notebooks --sync      # jupytext-sync .ipynb/.py twins and strip outputs

Every ``notebooks/NN_*.ipynb`` runs in order with the profile's parameters (see
:mod:`labkit.profiles`) plus ``profile`` and ``device``; the executed copy, with its outputs, goes
to ``results/notebooks/<profile>/<name>.ipynb``. The notebook's working directory is
``notebooks/``. Exit status 1 if any notebook failed (each failure is named).

The kernel is always the Python running this module (the virtualenv's): the notebook runs under
``kernel_name="python3"`` resolved to ``sys.executable``, never to a ``python3`` kernelspec that
some other installation registered for the user.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from labkit.profiles import REPO_ROOT, notebook_parameters, parse_override

__all__ = ["NOTEBOOKS_DIR", "RESULTS_DIR", "check_clean", "execute", "list_notebooks", "main", "select", "strip_outputs", "sync"]

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
RESULTS_DIR = REPO_ROOT / "results"
KERNEL_NAME = "python3"


def list_notebooks(directory: str | os.PathLike | None = None) -> list[Path]:
    """The lab's notebooks ``NN_*.ipynb`` in ``directory`` (default ``notebooks/``), in run order."""
    directory = Path(directory) if directory is not None else NOTEBOOKS_DIR
    return sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb") if p.is_file())


def select(notebooks: Sequence[Path], patterns: Iterable[str] | None) -> list[Path]:
    """Notebooks whose stem matches any pattern (a glob, or else a substring: ``00``, ``dmfa``, ``0[12]*``).

    Patterns may also be comma-separated. ``None``/empty selects all. A pattern that matches
    nothing raises ``ValueError`` listing the notebooks, so a typo never silently runs nothing.
    """
    wanted = [p.strip() for pat in (patterns or []) for p in pat.split(",") if p.strip()]
    if not wanted:
        return list(notebooks)
    chosen = []
    for pattern in wanted:
        glob = any(ch in pattern for ch in "*?[")
        hits = [nb for nb in notebooks if (fnmatch.fnmatch(nb.stem, pattern) if glob else pattern in nb.stem)]
        if not hits:
            names = ", ".join(nb.stem for nb in notebooks) or "none"
            raise ValueError(f"--only {pattern!r} matches no notebook; notebooks are: {names}")
        chosen.extend(hits)
    return [nb for nb in notebooks if nb in chosen]  # run order, no duplicates


def _resolve_notebook(name: str | os.PathLike, directory: Path) -> Path:
    path = Path(os.fspath(name))
    if path.suffix != ".ipynb":
        path = path.with_name(path.name + ".ipynb")
    if not path.is_absolute() and path.parent == Path("."):
        path = directory / path
    if not path.is_file():
        names = ", ".join(nb.stem for nb in list_notebooks(directory)) or "none"
        raise ValueError(f"notebook {os.fspath(name)!r} not found at {path}; notebooks are: {names}")
    return path


def _kernel_manager_class():
    """An AsyncKernelManager whose ``python3`` kernel is this interpreter (see module docstring)."""
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPythonSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            if kernel_name == KERNEL_NAME:
                # get_kernel_dict() puts sys.executable in argv: the virtualenv running this module.
                return self.kernel_spec_class(resource_dir=RESOURCES, **get_kernel_dict())
            return super().get_kernel_spec(kernel_name)

    class ThisPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return ThisPythonSpecs(data_dir=self.data_dir)

    return ThisPythonKernelManager


def execute(
    notebook_name: str | os.PathLike,
    profile: str | os.PathLike = "quick",
    output_dir: str | os.PathLike | None = None,
    *,
    notebooks_dir: str | os.PathLike | None = None,
    timeout: float | None = None,
    **overrides: Any,
) -> Path:
    """Execute one notebook with a profile's parameters; return the executed copy's path.

    Args:
        notebook_name: ``"01_dmfa"``, ``"01_dmfa.ipynb"`` or a path to a notebook.
        profile: profile name or YAML path (:mod:`labkit.profiles`).
        output_dir: where the executed notebook goes (default ``results/notebooks/<profile>/``).
        notebooks_dir: where bare names are looked up (default ``notebooks/``).
        timeout: per-cell time limit in seconds (``None``: none).
        **overrides: parameters that replace the profile's (e.g. ``epochs=1, device="cpu"``).

    The notebook runs with working directory = its own folder, in a kernel of the current
    interpreter. Raises ``papermill.PapermillExecutionError`` if a cell fails (the executed copy,
    with the traceback, is still written).
    """
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else NOTEBOOKS_DIR
    path = _resolve_notebook(notebook_name, notebooks_dir)
    profile_name = Path(os.fspath(profile)).stem
    params = notebook_parameters(profile, path.stem)
    params.update(overrides)
    out_dir = Path(output_dir) if output_dir is not None else RESULTS_DIR / "notebooks" / profile_name
    return _papermill(path, out_dir / path.name, params, profile_name=profile_name, timeout=timeout)


def _papermill(path: Path, output: Path, params: dict[str, Any], *, profile_name: str,
               timeout: float | None) -> Path:
    import papermill

    params = dict(params)
    params.setdefault("profile", profile_name)
    params.setdefault("device", "auto")
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(path),
        str(output),
        parameters=params,
        kernel_name=KERNEL_NAME,
        kernel_manager_class=_kernel_manager_class(),
        cwd=str(path.parent),
        log_output=False,
        progress_bar=False,
        execution_timeout=timeout,
    )
    return output


# ------------------------------------------------------------------------------------------ sync


def strip_outputs(path: str | os.PathLike) -> bool:
    """Remove outputs, execution counts and widget state from an .ipynb; True if it changed.

    The file is rewritten only when something changed, so clean notebooks keep their mtime
    (jupytext decides which twin is newer by mtime).
    """
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code":
            if cell.get("outputs"):
                cell.outputs = []
                changed = True
            if cell.get("execution_count") is not None:
                cell.execution_count = None
                changed = True
        for key in ("execution", "ExecuteTime", "papermill"):
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    for key in ("widgets", "papermill"):
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


def sync(directory: str | os.PathLike | None = None, *, quiet: bool = False) -> list[Path]:
    """Make every ``NN_*.ipynb`` / ``NN_*.py`` pair consistent (``jupytext --sync``) and output-free.

    A notebook that exists only as a ``.py`` (percent format) gets its ``.ipynb`` created, and vice
    versa. For a pair, jupytext takes the cell inputs from the more recently modified twin.
    Returns the .ipynb files handled.
    """
    from jupytext.cli import jupytext as jupytext_cli

    directory = Path(directory) if directory is not None else NOTEBOOKS_DIR
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


def _cells(path: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    import jupytext

    nb = jupytext.read(path)
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def check_clean(ipynb: str | os.PathLike) -> list[str]:
    """What is wrong with a committed notebook, as messages (empty list: clean).

    Checks: no outputs, no execution counts, no saved widget state; exactly one cell tagged
    ``parameters`` (where papermill injects the profile); a ``.py`` twin exists and has the same
    cells (type, source, tags) as the ``.ipynb``. Messages say how to fix (``./lab sync``).
    """
    import nbformat

    ipynb = Path(ipynb)
    problems = []
    nb = nbformat.read(ipynb, as_version=4)
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
    twin = ipynb.with_suffix(".py")
    if not twin.exists():
        problems.append(f"{ipynb.name}: its jupytext twin {twin.name} is missing (run ./lab sync)")
        return problems
    a, b = _cells(ipynb), _cells(twin)
    if a != b:
        where = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        problems.append(
            f"{ipynb.name} and {twin.name} have drifted apart ({len(a)} vs {len(b)} cells, first difference "
            f"at cell {where}): run ./lab sync (the more recently modified twin wins)"
        )
    return problems


# ------------------------------------------------------------------------------------------ CLI


def _format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labkit.run_notebooks",
        description="Run notebooks/NN_*.ipynb in order with papermill, using a profile's parameters.",
    )
    parser.add_argument("--profile", default="quick",
                        help="quick (default), cpu, paper, or a path to a profile YAML file")
    parser.add_argument("--only", action="append", metavar="PATTERN",
                        help="run only notebooks whose name contains PATTERN (or matches a glob); repeatable")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter for all notebooks (KEY=VALUE) or one (NOTEBOOK.KEY=VALUE); "
                             "VALUE is YAML: 3, 0.5, [a,b], cuda")
    parser.add_argument("--output-dir", help="where executed notebooks go (default results/notebooks/<profile>)")
    parser.add_argument("--timeout", type=float, default=None, help="per-cell time limit, seconds")
    parser.add_argument("--list", action="store_true", help="print the notebooks and their parameters, run nothing")
    parser.add_argument("--sync", action="store_true", help="jupytext-sync the .ipynb/.py twins and strip outputs")
    args = parser.parse_args(argv)

    if args.sync:
        handled = sync()
        print(f"[lab sync] {len(handled)} notebook(s) in {NOTEBOOKS_DIR} paired and clean")
        return 0

    try:
        notebooks = select(list_notebooks(), args.only)
        overrides = [parse_override(text) for text in args.param]
        plans = []
        for nb in notebooks:
            params = notebook_parameters(args.profile, nb.stem)
            for target, key, value in overrides:
                if target is None or target == nb.stem:
                    params[key] = value
            plans.append((nb, params))
        unknown = {t for t, _, _ in overrides if t is not None} - {nb.stem for nb in list_notebooks()}
        if unknown:
            raise ValueError(f"-p names unknown notebook(s) {sorted(unknown)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if not plans:
        print(f"no notebooks matching notebooks/[0-9][0-9]_*.ipynb in {NOTEBOOKS_DIR}")
        return 0
    profile_name = Path(args.profile).stem
    out_dir = Path(args.output_dir) if args.output_dir else RESULTS_DIR / "notebooks" / profile_name
    if args.list:
        for nb, params in plans:
            print(f"{nb.stem}: {_format_params(params)}")
        return 0

    print(f"[lab run] profile {profile_name}: {len(plans)} notebook(s) -> {out_dir}", flush=True)
    failures = []
    total_start = time.perf_counter()
    for nb, params in plans:
        start = time.perf_counter()
        print(f"[lab run] {nb.stem} ... ({_format_params(params)})", flush=True)
        try:
            output = _papermill(nb, out_dir / nb.name, params, profile_name=profile_name, timeout=args.timeout)
            status = f"ok      -> {output.relative_to(REPO_ROOT) if output.is_relative_to(REPO_ROOT) else output}"
        except KeyboardInterrupt:
            print(f"[lab run] {nb.stem} interrupted", flush=True)
            raise
        except Exception as exc:  # noqa: BLE001 - report every notebook, then fail at the end
            failures.append(nb.stem)
            reason = str(exc).strip().splitlines()
            reason = reason[-1] if reason else type(exc).__name__
            status = f"FAILED  ({type(exc).__name__}: {reason[:300]}); see {out_dir / nb.name}"
        print(f"[lab run] {nb.stem:<24} {time.perf_counter() - start:8.1f} s  {status}", flush=True)
    elapsed = time.perf_counter() - total_start
    if failures:
        print(f"[lab run] {len(failures)} of {len(plans)} notebook(s) failed: {', '.join(failures)} "
              f"({elapsed:.1f} s)", file=sys.stderr)
        return 1
    print(f"[lab run] all {len(plans)} notebook(s) ran in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
