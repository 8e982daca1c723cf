"""labkit.studies.density_sweep and ``./lab study dmfa`` (its grid): DMFA runs as engine cells.

Tiny runs on the offline MNIST (40 training images, 20 test images, one epoch: a few seconds a
cell), each in a temporary results folder.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

from labkit.lab import study_cli
from labkit.studies import density, density_experiment
from labkit.studies.configs import DensityConfig
from labkit.studies.density_sweep import (COMPLETE_KIND, _stem, density_store, plan_density_cells, run_density_cell,
                                          run_density_sweep)
from labkit.studies.engine import LocalExecutor, SweepFailed

REPO = Path(__file__).resolve().parents[1]
TINY = DensityConfig(n_train=40, n_val=0, n_test=20, epochs=1, batch_size=20, lr=1e-3, n_figure=2, device="cpu",
                     precision="32")


def _grid(modes, kinds, holes, seeds, cfg=TINY, **changes):
    return cfg.replace(modes=modes, missing_kinds=kinds, holes=holes, seeds=seeds, **changes)


pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_result(*, fail_seed: int | None = None, calls: list | None = None):
    """A stand-in for run_experiment: records its arguments, raises for ``fail_seed``."""
    def fake(cfg, **kw):
        if calls is not None:
            calls.append({"cfg": cfg, **kw})
        if kw["seed"] == fail_seed:
            raise RuntimeError(f"planted failure of seed {fail_seed}")
        return {"n_train": cfg.n_train, "n_val": None, "n_test": cfg.n_test, "test_nll": -10.0 - kw["seed"],
                "test_sse": 3.0 + kw["seed"], "paths": {"csv": str(Path(cfg.results_dir) / "x.csv")}}
    return fake


# ---------------------------------------------------------------------------- planning
def test_the_grid_has_one_complete_cell_per_hole_and_seed():
    cells = plan_density_cells(_grid(["complete", "incomplete"], ["square", "noise"], [None, 10], [0, 1]))
    coords = [(c.coords["mode"], c.coords["missing_kind"], c.coords["hole"], c.coords["seed"]) for c in cells]
    assert coords == [(m, k, h, s) for s in (0, 1) for h in (14, 10)
                      for m, k in (("complete", COMPLETE_KIND), ("incomplete", "square"), ("incomplete", "noise"))]
    assert len({c.key for c in cells}) == len(cells)
    s = cells[0].settings
    assert s == {"n_train": 40, "n_val": 0, "n_test": 20, "epochs": 1, "batch_size": 20, "lr": 1e-3,
                 "lr_milestones": [], "lr_gamma": 1.0, "mse_warmup_epochs": 0, "n_components": 1, "n_factors": 4,
                 "precision": "32"}
    # the same hole written twice (None is 14 on MNIST) is one cell, not two
    assert len(plan_density_cells(_grid(["complete"], ["square"], [None, 14], [0]))) == 1
    # the config refuses what the plan could not hold
    with pytest.raises(ValueError, match="training mode"):
        _grid(["sideways"], ["square"], [14], [0])
    with pytest.raises(ValueError, match="mask kind.*blob"):
        _grid(["incomplete"], ["blob"], [14], [0])
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        TINY.replace(epoch=3)


def test_keys_change_with_a_setting_and_with_the_data_not_with_run_options(monkeypatch, tmp_path):
    grid = _grid(["complete", "incomplete"], ["square"], [14], [0])
    base = plan_density_cells(grid)
    # run options (where files go, figure size, profile name, threads) are not settings
    same = plan_density_cells(grid.replace(results_dir=str(tmp_path), n_figure=5, profile="x", threads=2))
    assert [c.key for c in same] == [c.key for c in base]
    # a setting: other keys, same coordinates
    longer = plan_density_cells(grid.replace(epochs=2))
    assert [c.coords for c in longer] == [c.coords for c in base]
    assert not {c.key for c in longer} & {c.key for c in base}
    assert longer[0].settings["epochs"] == 2
    # other images, same count and source: other keys
    real = density_experiment.load_split

    def other_images(dataset, split, limit):
        got = real(dataset, split, limit)
        if split == "train":
            got.images = got.images.flip(-1).contiguous()
        return got

    monkeypatch.setattr(density_experiment, "load_split", other_images)
    flipped = plan_density_cells(grid)
    assert [c.coords for c in flipped] == [c.coords for c in base]
    assert not {c.key for c in flipped} & {c.key for c in base}
    assert flipped[0].inputs["test"] == base[0].inputs["test"]


def test_every_cell_of_a_grid_has_its_own_file_stem():
    cells = plan_density_cells(_grid(["complete", "incomplete"], ["square", "noise"], [14, 10], [0, 1, 2]))
    stems = [_stem(c) for c in cells]
    assert len(set(stems)) == len(cells) == 18
    # seed 0 keeps the committed names; other seeds add _s<seed>
    assert {"mnist_complete", "mnist_incomplete", "mnist_incomplete_noise_h10", "mnist_complete_s2",
            "mnist_incomplete_noise_h10_s1"} <= set(stems)


# ---------------------------------------------------------------------------- running
def test_a_sweep_records_one_row_per_cell_and_a_rerun_skips_them(tmp_path):
    params = _grid(["complete"], ["square"], [14], [0, 1], results_dir=str(tmp_path))
    cells = plan_density_cells(params)
    out = run_density_sweep(params, executor=LocalExecutor(), progress=False)
    assert [o.status for o in out] == ["ran", "ran"]
    rows = density_store(tmp_path).read()
    assert sorted(rows["key"]) == sorted(c.key for c in cells)
    assert set(rows["missing_kind"]) == {COMPLETE_KIND} and sorted(rows["seed"]) == [0, 1]
    # each row holds what the run's JSON summary says, and its files are the run's own
    details = {d["key"]: d for d in density_store(tmp_path).read_details()}
    stems = set()
    for r in rows.itertuples():
        summary = json.loads((tmp_path / details[r.key]["files"]["setting"]).read_text())
        assert summary["seed"] == r.seed and summary["epochs"] == 1
        assert r.test_nll == pytest.approx(summary["test_nll"]) and r.test_sse == pytest.approx(summary["test_sse"])
        stems.add(Path(details[r.key]["files"]["csv"]).stem)
    assert len(stems) == 2                      # seed 1 got its own files beside seed 0's
    before = (tmp_path / "density.csv").read_bytes()
    again = density.run(params, progress=False)        # the study's entry point: the same cells, skipped
    assert sorted(again["key"]) == sorted(c.key for c in cells)
    assert (tmp_path / "density.csv").read_bytes() == before


def test_run_density_cell_passes_the_cells_settings_and_writes_no_row(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(density_experiment, "run_experiment", _fake_result(calls=calls))
    cfg = _grid(["incomplete"], ["noise"], [10], [3], epochs=4, lr=0.01, results_dir=str(tmp_path))
    [cell] = plan_density_cells(cfg)
    out = run_density_cell(cell, cfg, progress=False)
    assert out["metrics"] == {"test_nll": -13.0, "test_sse": 6.0}
    [kw] = calls
    assert (kw["mode"], kw["missing_kind"], kw["hole"], kw["seed"]) == ("incomplete", "noise", 10, 3)
    recipe = density.recipe_from(kw["cfg"])
    assert (recipe.epochs, recipe.lr, kw["cfg"].n_train, kw["cfg"].n_test, recipe.precision) == (4, 0.01, 40, 20, "32")
    assert not (tmp_path / "density.csv").exists()
    # a config other than the one the cell was planned from is refused before anything runs
    with pytest.raises(Exception, match="planned with other settings.*epochs"):
        run_density_cell(cell, cfg.replace(epochs=5))
    # images other than those planned on (another data file on a worker) are refused
    real = density_experiment.load_split

    def other_images(dataset, split, limit):
        got = real(dataset, split, limit)
        got.images = 1 - got.images
        return got

    monkeypatch.setattr(density_experiment, "load_split", other_images)
    with pytest.raises(Exception, match="differ from those the cell was planned on"):
        run_density_cell(cell, cfg)
    assert len(calls) == 1


def test_a_failing_cell_is_reported_and_the_other_is_recorded(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(density_experiment, "run_experiment", _fake_result(fail_seed=1))
    params = _grid(["complete"], ["square"], [14], [0, 1], results_dir=str(tmp_path))
    with pytest.raises(SweepFailed) as info:
        density.run(params, progress=False)
    [failed] = info.value.failed
    assert failed.cell.coords["seed"] == 1 and "planted failure of seed 1" in failed.error
    rows = density_store(tmp_path).read()
    assert list(rows["seed"]) == [0] and list(rows["test_nll"]) == [-10.0]


def test_the_command_takes_the_grid_and_executor_flags_and_refuses_bad_values(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        study_cli.main(["dmfa", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--executor", "--address", "--gpus-per-cell", "--param", "--table-only", "--doc", "--into-committed"):
        assert flag in text
    base = ["dmfa", "--results", str(tmp_path), "--no-progress", "-p", "n_train=40", "-p", "n_val=0", "-p", "n_test=20"]
    for bad in (["-p", "modes=[complete,complete]"], ["-p", "missing_kinds=[squares]"], ["-p", "seeds=[-1]"],
                ["-p", "modes=complete"]):
        with pytest.raises(SystemExit) as info:
            study_cli.main([*base, *bad])
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'modes' of 01_dmfa" in err and "'missing_kinds' of 01_dmfa" in err and "'seeds' of 01_dmfa" in err
    assert "did you mean 'square'?" in err
    # an executor that cannot be built: exit status 2, nothing run
    assert study_cli.main([*base, "--executor", "ray", "--address", "nowhere"]) == 2
    assert not (tmp_path / "density.csv").exists()


# ---------------------------------------------------------------------------- Ray
def test_ray_records_the_same_rows_as_local(tmp_path):
    pytest.importorskip("ray")
    from labkit.studies.executors import make_executor

    grid = _grid(["complete", "incomplete"], ["square"], [14], [0])
    local = run_density_sweep(grid.replace(results_dir=str(tmp_path / "local")), progress=False)
    assert [o.status for o in local] == ["ran", "ran"]
    # a short path: Ray's unix sockets live under it (socket paths are limited to ~107 bytes)
    temp = tempfile.mkdtemp(prefix="rd", dir="/tmp")
    started = time.perf_counter()
    executor = make_executor("ray", num_cpus=2, threads=1, init_kwargs={"_temp_dir": temp, "log_to_driver": False})
    try:
        remote = run_density_sweep(grid.replace(results_dir=str(tmp_path / "ray")), executor=executor, progress=False)
    finally:
        executor.close()
        shutil.rmtree(temp, ignore_errors=True)
    print(f"two density cells on Ray: {time.perf_counter() - started:.0f} s")
    assert [o.status for o in remote] == ["ran", "ran"]
    a = density_store(tmp_path / "local").read().sort_values("key").reset_index(drop=True)
    b = density_store(tmp_path / "ray").read().sort_values("key").reset_index(drop=True)
    assert list(a["key"]) == list(b["key"])
    for m in ("test_nll", "test_sse"):
        assert list(b[m]) == pytest.approx(list(a[m]), rel=1e-5)
    assert {d["files"]["csv"] for d in density_store(tmp_path / "ray").read_details()} == \
        {"mnist_complete.csv", "mnist_incomplete.csv"}


def test_p_values_reach_the_runs_and_a_misspelt_one_is_named(monkeypatch, tmp_path, capsys):
    """The CIFAR-10 recipe's settings (docs/density.md) reach every cell's run as given."""
    calls = []
    monkeypatch.setattr(density_experiment, "run_experiment", _fake_result(calls=calls))
    monkeypatch.setattr(density, "run_baselines", lambda cfg, **kw: [])
    base = ["dmfa", "--results", str(tmp_path), "--no-progress", "-p", "n_train=40", "-p", "n_val=0", "-p", "n_test=20",
            "-p", "modes=[complete]", "-p", "device=cpu"]
    assert study_cli.main([*base, "-p", "precision=bf16-mixed", "-p", "lr_milestones=[10]", "-p", "lr_gamma=0.25",
                           "-p", "mse_warmup_epochs=10", "-p", "epochs=12"]) == 0
    [kw] = calls
    cfg = kw["cfg"]
    assert (cfg.precision, list(cfg.lr_milestones), cfg.lr_gamma, cfg.mse_warmup_epochs, cfg.epochs, kw["mode"]) == \
        ("bf16-mixed", [10], 0.25, 10, 12, "complete")
    with pytest.raises(SystemExit) as info:
        study_cli.main([*base, "-p", "mse_warmup=1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown setting 'mse_warmup'" in err and "mse_warmup_epochs" in err
    assert len(calls) == 1


def test_each_data_set_has_its_own_table_in_the_docs(monkeypatch, tmp_path):
    from labkit.studies import density_report

    monkeypatch.setattr(density_report, "density_table", lambda results_dir, dataset: f"| table of {dataset} |")
    mnist_begin, mnist_end = density.table_markers("mnist")
    doc = tmp_path / "density.md"
    doc.write_text(f"intro\n{mnist_begin}\nold mnist\n{mnist_end}\nmiddle\n")
    cifar = TINY.replace(dataset="cifar10", results_dir=str(tmp_path))
    density.write_report(cifar, doc=doc)
    written = density.write_report(cifar, doc=doc)          # again: replaced in place, not appended twice
    assert written == [tmp_path / "density_table_cifar10.md", doc]
    density.write_report(TINY.replace(results_dir=str(tmp_path)), doc=doc)
    text = doc.read_text()
    begin, end = density.table_markers("cifar10")
    assert text.count(begin) == 1 and text.count("| table of cifar10 |") == 1
    assert text.index("middle") < text.index(begin)       # appended after what was there
    assert f"{mnist_begin}\n| table of mnist |\n{mnist_end}\nmiddle" in text
    assert "old mnist" not in text
    assert (tmp_path / "density_table.md").read_text() == "| table of mnist |\n"
