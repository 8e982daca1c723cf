"""The committed notebooks are clean and paired, and the notebook runner runs them in this virtualenv.

Per notebook: no outputs/execution counts, one ``parameters`` cell, a jupytext ``.py`` twin with the
same cells, and a section in every profile. The checker itself is tested on pairs built here, so the
drift check is known to bite even before the lab has notebooks.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from labkit import run_notebooks as rn
from labkit.profiles import REPO_ROOT, available_profiles, notebook_parameters

NOTEBOOKS = rn.list_notebooks()
IDS = [nb.stem for nb in NOTEBOOKS]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_notebook_is_clean_and_paired(notebook):
    problems = rn.check_clean(notebook)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_notebook_has_a_section_in_every_profile(notebook):
    for profile in available_profiles():
        params = notebook_parameters(profile, notebook.stem)  # raises, naming the profile, if absent
        assert params["profile"] == profile and "device" in params


def test_no_orphan_twins():
    """A NN_*.py without its .ipynb (or the reverse) means someone forgot ./lab sync."""
    py = {p.stem for p in rn.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py")}
    ipynb = {p.stem for p in NOTEBOOKS}
    assert py == ipynb, f"unpaired notebooks {sorted(py ^ ipynb)}: run ./lab sync"


def test_pairing_config_names_the_notebooks_folder():
    config = (REPO_ROOT / "jupytext.toml").read_text()
    assert 'formats = "notebooks///ipynb,notebooks///py:percent"' in config


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
        "n = 1\nprofile = 'none'\ndevice = 'cpu'\nfail = False",
        "import os, sys\nprint(sys.executable)\nprint(os.getcwd())\nprint(n, profile, device)",
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
    assert rn.check_clean(nbdir / "00_probe.ipynb")[0].endswith("00_probe.py is missing (run ./lab sync)")


@pytest.mark.slow
def test_main_runs_selected_notebooks_and_names_failures(probe, tmp_path, monkeypatch, capsys):
    nbdir, profile = probe
    monkeypatch.setattr(rn, "NOTEBOOKS_DIR", nbdir)
    out = tmp_path / "out"
    args = ["--profile", str(profile), "--output-dir", str(out)]
    assert rn.main(args + ["--only", "00", "-p", "00_probe.n=7"]) == 0
    text = capsys.readouterr().out
    assert "00_probe" in text and " s  ok" in text and "all 1 notebook(s) ran" in text
    assert "7 probe auto" in nbformat.read(out / "00_probe.ipynb", as_version=4).cells[-2].outputs[0]["text"]

    assert rn.main(args + ["-p", "fail=true"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "asked to fail" in captured.out
    assert "1 of 1 notebook(s) failed: 00_probe" in captured.err


def test_main_rejects_bad_selection(probe, monkeypatch, capsys):
    nbdir, profile = probe
    monkeypatch.setattr(rn, "NOTEBOOKS_DIR", nbdir)
    assert rn.main(["--profile", str(profile), "--only", "zz"]) == 2
    assert "--only 'zz' matches no notebook; notebooks are: 00_probe" in capsys.readouterr().err
    assert rn.main(["--profile", str(profile), "-p", "99_nope.n=1"]) == 2
    assert "unknown notebook(s) ['99_nope']" in capsys.readouterr().err
    assert rn.main(["--profile", str(profile), "--list", "-p", "n=[1, 2]"]) == 0
    assert "00_probe: profile='probe' device='auto' seed=0 n=[1, 2]" in capsys.readouterr().out


def test_select_patterns():
    nbs = [Path(f"{s}.ipynb") for s in ("00_misconv_tour", "01_dmfa", "02_classification")]
    assert [p.stem for p in rn.select(nbs, ["dmfa"])] == ["01_dmfa"]
    assert [p.stem for p in rn.select(nbs, ["0[02]*"])] == ["00_misconv_tour", "02_classification"]
    assert [p.stem for p in rn.select(nbs, ["02,00", "00"])] == ["00_misconv_tour", "02_classification"]
    assert rn.select(nbs, None) == nbs
