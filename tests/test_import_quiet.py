"""Importing labkit prints nothing, on a machine with a CUDA toolkit but no GPU too.

torch logs "No CUDA runtime is found, using CUDA_HOME=..." when ``torch.utils.cpp_extension`` is
imported on such a machine; some labkit modules import torch parts that import it. The check runs
a fresh Python with ``CUDA_HOME`` pointing at an existing folder (what torch takes for a toolkit)
and imports every labkit module in it: stdout and stderr must stay empty.
"""
from __future__ import annotations

import os
import subprocess
import sys

from labkit import paths

IMPORT_ALL = """
import labkit, labkit.misconv
import importlib, pkgutil
for m in pkgutil.walk_packages(labkit.__path__, "labkit."):
    importlib.import_module(m.name)
"""


def test_importing_labkit_prints_nothing(tmp_path):
    env = dict(os.environ, CUDA_HOME=str(tmp_path), PYTHONPATH=str(paths.repo_root()), OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    run = subprocess.run([sys.executable, "-c", IMPORT_ALL], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == "" and run.stderr == "", f"stdout: {run.stdout[-2000:]!r}\nstderr: {run.stderr[-2000:]!r}"
