"""The ``./lab`` script's virtualenv handling, its git filter, and the pieces ``./lab jupyter`` uses.

The script runs for real, in a scratch checkout (the script, ``labkit/lab/venv_check.py``,
``nbstrip.py``, a stub ``labkit`` package) with a scratch virtualenv made without pip: its
``pip`` is a stand-in that records its arguments and "installs" the checkout named by ``-e`` the
way an editable install does (a ``.pth`` line), so each case takes a second, offline.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import paths
from labkit.lab import jupyter as lab_jupyter
from labkit.lab.kernel import CudaHomeNotice, quiet_cuda_home_notice

REPO = paths.repo_root()
FAKE_PIP = '''\
"""Stand-in for pip: records its arguments; "installs" the -e checkout as a .pth line (unless told not to)."""
import os, pathlib, sys
args = sys.argv[1:]
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
if not os.environ.get("FAKE_PIP_NOOP"):
    target = args[args.index("-e") + 1].split("[")[0]
    pathlib.Path(__file__).resolve().parents[1].joinpath("labkit_dev.pth").write_text(target + "\\n")
'''


def _site_packages(venv: Path) -> Path:
    [site] = venv.glob("lib/python3*/site-packages")
    return site


@pytest.fixture(scope="module")
def template_venv(tmp_path_factory):
    """A virtualenv without pip (seconds to make), with the stand-in pip; copied per test."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = _site_packages(venv) / "pip"
    pip.mkdir()
    (pip / "__init__.py").write_text("")
    (pip / "__main__.py").write_text(FAKE_PIP)
    return venv


def _checkout(folder: Path) -> Path:
    """A checkout with what ./lab needs: the script, the two helper files, a stub labkit, packaging files."""
    (folder / "labkit" / "lab").mkdir(parents=True)
    shutil.copy(REPO / "lab", folder / "lab")
    for name in ("venv_check.py", "nbstrip.py"):
        shutil.copy(REPO / "labkit" / "lab" / name, folder / "labkit" / "lab" / name)
    (folder / "labkit" / "__init__.py").write_text("")
    (folder / "labkit" / "lab" / "__init__.py").write_text("")
    (folder / "pyproject.toml").write_text("[project]\nname = 'labkit'\n")
    (folder / "constraints.txt").write_text("torch==2.14.1\n")
    return folder


@pytest.fixture
def lab(tmp_path, template_venv):
    """``run(*args, **env)`` runs the scratch checkout's ./lab with the scratch virtualenv as LAB_VENV."""
    checkout = _checkout(tmp_path / "checkout")
    has_git = shutil.which("git") is not None
    if has_git:
        subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    other = tmp_path / "other-clone"
    (other / "labkit").mkdir(parents=True)
    (other / "labkit" / "__init__.py").write_text("")
    venv = tmp_path / "venv"
    shutil.copytree(template_venv, venv, symlinks=True)
    log = tmp_path / "pip.log"

    class Lab:
        root, venv_dir, other_clone, pip_log, git = checkout, venv, other, log, has_git
        pth = _site_packages(venv) / "labkit_dev.pth"

        def run(self, *args, **env):
            full = {k: v for k, v in os.environ.items() if k not in ("LAB_ROOT", "FAKE_PIP_NOOP")}
            full.update(LAB_VENV=str(venv), FAKE_PIP_LOG=str(log), **env)
            return subprocess.run(["bash", str(checkout / "lab"), *args], capture_output=True, text=True,
                                  env=full, timeout=120)

        def pip_calls(self):
            return log.read_text().splitlines() if log.exists() else []

    return Lab()


def test_first_run_installs_with_the_constraints_then_starts_at_once(lab):
    first = lab.run("setup")
    assert first.returncode == 0, first.stderr
    [call] = lab.pip_calls()
    assert f"-c {lab.root / 'constraints.txt'}" in call and call.endswith(f"-e {lab.root}[test]")
    assert "(first install)" in first.stderr
    assert (lab.venv_dir / ".labkit-installed-hash").is_file()
    second = lab.run("setup")
    assert second.returncode == 0 and "is up to date" in second.stderr, second.stderr
    assert len(lab.pip_calls()) == 1


def test_a_changed_constraints_file_means_a_reinstall(lab):
    assert lab.run("setup").returncode == 0
    (lab.root / "constraints.txt").write_text("torch==2.14.2\n")
    again = lab.run("setup")
    assert again.returncode == 0, again.stderr
    assert "pyproject.toml or constraints.txt changed" in again.stderr
    assert len(lab.pip_calls()) == 2


def test_without_a_constraints_file_pip_gets_no_pins(lab):
    (lab.root / "constraints.txt").unlink()
    assert lab.run("setup").returncode == 0
    [call] = lab.pip_calls()
    assert "-c " not in call and call.endswith(f"-e {lab.root}[test]")


def test_a_venv_with_another_checkouts_labkit_is_reinstalled(lab):
    """LAB_VENV made by another clone: its labkit is that clone's, so ./lab reinstalls, saying why."""
    assert lab.run("setup").returncode == 0
    lab.pth.write_text(f"{lab.other_clone}\n")          # what the other clone's pip install -e left
    again = lab.run("setup")
    assert again.returncode == 0, again.stderr
    assert f"imports labkit from {lab.other_clone}, not from this checkout {lab.root}" in again.stderr
    assert len(lab.pip_calls()) == 2
    assert lab.pth.read_text().strip() == str(lab.root)


def test_lab_refuses_when_reinstalling_does_not_help(lab):
    assert lab.run("setup").returncode == 0
    lab.pth.write_text(f"{lab.other_clone}\n")
    refused = lab.run("run", "--list", FAKE_PIP_NOOP="1")
    assert refused.returncode == 1
    assert (f"error: the virtualenv {lab.venv_dir} imports labkit from {lab.other_clone}, not from this "
            f"checkout {lab.root}, even after pip install -e") in refused.stderr
    assert "run:" not in refused.stderr  # it stopped before running anything


def test_venv_check_reports_a_missing_labkit(lab):
    check = subprocess.run([str(lab.venv_dir / "bin" / "python"), "-I", str(lab.root / "labkit/lab/venv_check.py"),
                            str(lab.root)], capture_output=True, text=True, cwd=lab.root)
    # run from the checkout itself, where a plain `python -c "import labkit"` would find it anyway
    assert check.returncode == 1 and check.stdout.startswith("labkit is not installed in ")


def test_every_command_points_git_at_the_strip_filter(lab):
    if not lab.git:
        pytest.skip("git is not installed")
    assert lab.run("setup").returncode == 0
    config = subprocess.run(["git", "-C", str(lab.root), "config", "--get", "filter.labstrip.clean"],
                            capture_output=True, text=True).stdout.strip()
    assert config == f"'{lab.venv_dir}/bin/python' -I '{lab.root}/labkit/lab/nbstrip.py'"


def test_help_names_every_command():
    out = subprocess.run(["bash", str(REPO / "lab"), "help"], capture_output=True, text=True)
    for command in ("run", "test", "jupyter", "sync", "figures", "setup", "help"):
        assert f"./lab {command}" in out.stdout
    bad = subprocess.run(["bash", str(REPO / "lab"), "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown command 'frobnicate'" in bad.stderr


# ------------------------------------------------------------------------------ ./lab jupyter


def test_jupyter_command_serves_the_repository_with_the_labs_config(tmp_path):
    env = lab_jupyter.environment(REPO, base={"JUPYTER_CONFIG_PATH": "/elsewhere", "PATH": "/usr/bin"})
    config = str(REPO / ".jupyter")
    assert env["JUPYTER_CONFIG_PATH"] == os.pathsep.join([config, "/elsewhere"])
    assert env["JUPYTER_PATH"] == config and env["LAB_ROOT"] == str(REPO.resolve())
    cmd = lab_jupyter.command(REPO, ["--no-browser"])
    assert cmd[:4] == [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={REPO.resolve()}"]
    assert cmd[-1] == "--no-browser"
    # Jupyter itself finds the lab's folder first on both search paths
    env = lab_jupyter.environment(REPO, base={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path)})
    found = json.loads(subprocess.run([sys.executable, "-m", "jupyter", "--paths", "--json"], env=env,
                                      capture_output=True, text=True, check=True).stdout)
    assert config in found["config"] and found["data"][0] == config


def test_shipped_jupyter_settings():
    folder = REPO / ".jupyter"
    server = json.loads((folder / "jupyter_server_config.json").read_text())
    assert server["LabApp"]["default_url"] == f"/lab/tree/{lab_jupyter.START_PAGE}"
    assert "[0-9][0-9]_*.py" in server["ContentsManager"]["hide_globs"]
    overrides = json.loads((folder / "labconfig" / "default_setting_overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    kernel = json.loads((folder / "kernels" / "python3" / "kernel.json").read_text())
    assert kernel["argv"][:3] == ["python", "-m", "labkit.lab.kernel"]
    assert kernel["display_name"] == "Python 3 (ipykernel)"  # the notebooks' metadata names it
    assert (REPO / lab_jupyter.START_PAGE).is_file()


def test_kernel_drops_only_torchs_cuda_home_notice():
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet_cuda_home_notice()
    quiet_cuda_home_notice()
    assert sum(isinstance(f, CudaHomeNotice) for f in logger.filters) == 1

    def record(msg, *args):
        return logging.LogRecord(logger.name, logging.WARNING, __file__, 1, msg, args, None)

    assert not logger.filter(record("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local"))
    assert logger.filter(record("Error checking compiler version for %s", "c++"))


# ------------------------------------------------------------------------------ ./lab figures


@pytest.mark.slow
def test_figures_runs_the_tour_and_refreshes_only_docs_figures(tmp_path, monkeypatch):
    """``./lab figures`` in a scratch lab whose tour writes one figure (and leaves an old one alone)."""
    import nbformat

    from labkit.lab import run_notebooks as rn

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "quick.yaml").write_text("defaults: {device: auto, seed: 0}\n00_misconv_tour: {}\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("profile = 'x'\ndevice = 'cpu'\nseed = 0\nwrite = True",
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("from pathlib import Path\nout = Path('..') / 'results' / 'tour' / profile\n"
                                  "out.mkdir(parents=True, exist_ok=True)\n"
                                  "if write:\n    (out / 'masks.png').write_bytes(b'new figure')"),
    ]
    nbformat.write(nb, tmp_path / "notebooks" / "00_misconv_tour.ipynb")
    stale = tmp_path / "results" / "tour" / "quick" / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier run")
    os.utime(stale, (0, 0))
    monkeypatch.setenv("LAB_ROOT", str(tmp_path))

    assert rn.main(["--figures", "--output-dir", str(tmp_path / "executed")]) == 0
    assert sorted(p.name for p in (tmp_path / "docs" / "figures" / "tour").iterdir()) == ["masks.png"]
    assert (tmp_path / "docs" / "figures" / "tour" / "masks.png").read_bytes() == b"new figure"

    nb.cells[0].source = nb.cells[0].source.replace("write = True", "write = False")
    nbformat.write(nb, tmp_path / "notebooks" / "00_misconv_tour.ipynb")
    # the first run's figure is old by now (the freshness check allows a second of clock slack)
    os.utime(tmp_path / "results" / "tour" / "quick" / "masks.png", (0, 0))
    with pytest.raises(RuntimeError, match="the tour ran but wrote no .png"):
        rn.refresh_figures("quick", output_dir=tmp_path / "executed")


def test_the_runner_sends_no_sigint_when_it_shuts_a_kernel_down(monkeypatch):
    """jupyter_client interrupts before every shutdown; an interrupt landing just after the last cell
    made ipykernel log "KeyboardInterrupt caught in kernel" into clean runs. Only that one is dropped."""
    import asyncio

    from jupyter_client.manager import AsyncKernelManager

    from labkit.lab.run_notebooks import _kernel_manager_class

    sent = []

    async def fake_interrupt(self):
        sent.append(self.shutting_down)

    monkeypatch.setattr(AsyncKernelManager, "_async_interrupt_kernel", fake_interrupt)
    km = _kernel_manager_class()()
    assert km.shutdown_wait_time == 30.0
    km.shutting_down = False
    asyncio.run(km._async_interrupt_kernel())          # a user's interrupt still goes through
    km.shutting_down = True
    asyncio.run(km._async_interrupt_kernel())          # the one before a shutdown does not
    assert sent == [False]
