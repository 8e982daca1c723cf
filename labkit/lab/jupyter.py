"""``./lab jupyter``: JupyterLab on the repository, opening ``START_HERE.md``, with the lab's settings.

``python -m labkit.lab.jupyter [jupyter lab options]`` replaces itself with
``python -m jupyterlab --ServerApp.root_dir=<repo> ...`` in the environment :func:`environment`
builds. Everything else lives in files under ``<repo>/.jupyter/`` (see its README.md), found
through two search paths Jupyter adds to (the user's own ``~/.jupyter`` settings still apply and
are never written):

- ``JUPYTER_CONFIG_PATH`` += ``.jupyter``: ``jupyter_server_config.json`` (start page, the ``.py``
  twins hidden from the file browser, no update checks) and
  ``labconfig/default_setting_overrides.json`` (no "get notified about Jupyter news" prompt,
  Markdown files open rendered);
- ``JUPYTER_PATH`` += ``.jupyter``: ``kernels/python3/kernel.json``, the lab's kernel
  (:mod:`labkit.lab.kernel`) in this virtualenv.

Why the root and not ``notebooks/``: ``results/`` and ``docs/`` (figures, CSVs) are one click away.
Why ``START_HERE.md`` rather than an index notebook: it renders without starting a kernel, has no
jupytext twin to keep in step, and reads the same on GitHub and in a terminal.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from labkit import paths
from labkit.lab.venv_check import pythonpath_first

__all__ = ["START_PAGE", "command", "config_dir", "environment", "main"]

START_PAGE = "START_HERE.md"


def config_dir(root: str | os.PathLike | None = None) -> Path:
    """``<repo>/.jupyter``: the lab's Jupyter configuration, settings and kernelspec."""
    return Path(root if root is not None else paths.repo_root()) / ".jupyter"


def _prepend(path: Path, current: str | None) -> str:
    parts = [str(path)] + [p for p in (current or "").split(os.pathsep) if p and p != str(path)]
    return os.pathsep.join(parts)


def environment(root: str | os.PathLike | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with the lab's ``.jupyter`` first on Jupyter's search paths,
    ``LAB_ROOT`` (labkit's idea of the checkout, for the kernels) set to ``root``, and ``root``
    first on ``PYTHONPATH`` with no entry holding another labkit
    (:func:`labkit.lab.venv_check.pythonpath_first`): the kernels start in ``notebooks/`` and would
    otherwise import the labkit of a checkout that ``PYTHONPATH`` names."""

    root = Path(root if root is not None else paths.repo_root()).resolve()
    env = dict(os.environ if base is None else base)
    env["JUPYTER_CONFIG_PATH"] = _prepend(config_dir(root), env.get("JUPYTER_CONFIG_PATH"))
    env["JUPYTER_PATH"] = _prepend(config_dir(root), env.get("JUPYTER_PATH"))
    env["LAB_ROOT"] = str(root)
    env["PYTHONPATH"] = pythonpath_first(root, env.get("PYTHONPATH"))
    return env


def command(root: str | os.PathLike | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The ``jupyter lab`` command line: this Python, the repository as the server's root."""
    root = Path(root if root is not None else paths.repo_root()).resolve()
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in extra:
        cmd.append("--allow-root")  # containers often run as root; Jupyter refuses it by default
    return cmd + list(extra)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = paths.repo_root()
    if not (root / START_PAGE).is_file():
        print(f"[lab jupyter] note: {root / START_PAGE} is missing; JupyterLab opens without its start page",
              file=sys.stderr)
    cmd = command(root, argv)
    os.execve(cmd[0], cmd, environment(root))


if __name__ == "__main__":
    main()
