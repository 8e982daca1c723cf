"""The classification study's protocol: results and caches bound to the data and settings that made
them, failures isolated, and no ground truth leaking into an imputer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from labkit.lab import study_cli
from labkit.studies import classification as clf
from labkit.studies.configs import ClassificationConfig
from labkit.studies.engine import SweepFailed
from labkit.studies.imputers import METHODS, imputer_settings
from tests.test_classification import _tiny_data

pytestmark = pytest.mark.usefixtures("eager_misconv")  # see tests/conftest.py


def _other_images(d, seed=7):
    """The same cell (names, counts, masks) with other images: what another data source gives."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(seed)
    return replace(d, train_images=torch.rand(d.train_images.shape, generator=g),
                   test_images=torch.rand(d.test_images.shape, generator=g), fingerprints={})


def _fake(calls, value=0.5):
    def run(cell, cfg):
        calls.append(tuple(cell.coords.values()))
        return {"metrics": {"accuracy": value + 0.01 * cell.coords["seed"], "accuracy_last": value},
                "details": {"epochs": cfg.epochs}}
    return run


# ---------------------------------------------------------------------------- caches
@pytest.mark.parametrize("method", ["mfa_mean", "knn"])
def test_imputation_cache_is_bound_to_the_images_it_was_built_from(tmp_path, method):
    cfg = imputer_settings(ClassificationConfig(cache_dir=str(tmp_path), mfa_components=1, mfa_factors=1,
                                                mfa_iterations=2, knn_k=[1], knn_val=4), progress=False)
    a = _tiny_data()
    b = _other_images(a)
    METHODS[method].prepare(a, cfg)
    _, te_b, _ = METHODS[method].prepare(b, cfg)
    observed = ~b.test_missing.expand_as(b.test_images)
    # the imputation of *these* images: equal to them wherever they are observed
    torch.testing.assert_close(te_b.images.float()[observed], b.test_images.half().float()[observed])


# ---------------------------------------------------------------------------- results
def test_a_rerun_with_other_settings_computes_a_new_row(tmp_path):
    calls = []
    cfg = ClassificationConfig(profile="t", results_dir=str(tmp_path), masks=["square"], methods=["zero"], seeds=[0],
                               n_train=60, n_test=20, epochs=1)
    clf.run(cfg, _run_cell=_fake(calls, 0.5), progress=False)
    clf.run(cfg, _run_cell=_fake(calls, 0.9), progress=False)      # same settings: skipped
    assert len(calls) == 1
    df = clf.run(cfg.replace(epochs=3, lr=0.1), _run_cell=_fake(calls, 0.7), progress=False)
    assert cfg.epochs == 1                                           # the config handed in is never changed
    assert len(calls) == 2 and list(df["accuracy"]) == [0.7] and list(df["epochs"]) == [3]
    everything = clf.read_results(tmp_path / "accuracy.csv")
    assert sorted(everything["accuracy"]) == [0.5, 0.7]
    with pytest.raises(ValueError, match="epochs.*lr|lr.*epochs"):       # one table, two settings: refused
        clf.pivot_table(everything)


def test_a_truncated_row_is_not_a_result_and_its_cell_reruns(tmp_path, capsys):
    calls = []
    cfg = ClassificationConfig(profile="t", results_dir=str(tmp_path), masks=["square"], methods=["zero", "mask"],
                               seeds=[0], n_train=60, n_test=20)
    clf.run(cfg, _run_cell=_fake(calls), progress=False)
    csv = tmp_path / "accuracy.csv"
    text = csv.read_text()
    csv.write_text(text[:-30])                        # the last row is cut short
    df = clf.run(cfg, _run_cell=_fake(calls), progress=False)
    assert [c[2] for c in calls] == ["zero", "mask", "mask"] and len(df) == 2
    assert "line 3" in capsys.readouterr().out


def test_one_failing_cell_is_reported_and_the_others_run(tmp_path):
    calls = []
    ok = _fake(calls)

    def run(cell, cfg):
        if cell.coords["method"] == "mask":
            raise RuntimeError("boom in the mask cell")
        return ok(cell, cfg)

    cfg = ClassificationConfig(profile="t", results_dir=str(tmp_path), masks=["square"], methods=["zero", "mask", "pc"],
                               seeds=[0], n_train=60, n_test=20)
    with pytest.raises(SweepFailed, match="(?s)mnist/square/mask/s0.*boom") as info:
        clf.run(cfg, _run_cell=run, progress=False)
    assert [o.cell.coords["method"] for o in info.value.failed] == ["mask"]
    assert sorted(clf.read_results(tmp_path / "accuracy.csv")["method"]) == ["pc", "zero"]


def test_the_command_exits_non_zero_listing_failed_cells(tmp_path, monkeypatch, capsys):
    def run(cell, cfg, **kw):
        if cell.coords["method"] == "pc":
            raise RuntimeError("pc exploded")
        return {"metrics": {"accuracy": 0.5}, "details": {}}

    monkeypatch.setattr(clf, "run_cell", run)
    code = study_cli.main(["classification", "--profile", "quick", "--no-progress", "-p", f"results_dir={tmp_path}",
                           "-p", "n_train=60", "-p", "n_test=20", "-p", "methods=[zero,pc]", "-p", "masks=[square]",
                           "-p", "seeds=[0]"])
    out = capsys.readouterr().out
    assert code == 1 and "pc exploded" in out and "mnist/square/pc/s0" in out
    assert list(clf.read_results(tmp_path / "accuracy.csv")["method"]) == ["zero"]


def test_the_command_names_a_misspelt_or_malformed_override(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(clf, "run_cell", lambda cell, cfg, **kw: ran.append(cell) or {"metrics": {"accuracy": 0.5}})
    for bad, message in (("epoch=2", "unknown setting 'epoch' for 02_classification (set by -p epoch=2); "
                                     "did you mean 'epochs'?"),
                         ("epochs", "override 'epochs' must look like key=value")):
        with pytest.raises(SystemExit) as info:
            study_cli.main(["classification", "--profile", "quick", "--no-progress", "-p", f"results_dir={tmp_path}",
                            "-p", bad])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert not ran and not (tmp_path / "accuracy.csv").exists()


def test_an_unreadable_input_checkpoint_fails_its_cells_only_and_says_it_is_an_input(tmp_path):
    bad = tmp_path / "dmfa.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = ClassificationConfig(profile="t", results_dir=str(tmp_path / "res"), cache_dir=str(tmp_path / "cache"),
                               masks=["square"], methods=["dmfa_mean_complete", "zero"], seeds=[0], n_train=60,
                               n_test=20, epochs=1, dmfa_complete=str(bad), device="cpu")
    with pytest.raises(SweepFailed) as info:
        clf.run(cfg, progress=False)
    (failure,) = info.value.failed
    assert "complete-data DMFA checkpoint" in failure.error and "input" in failure.error
    assert "delete it to retrain" not in failure.error
    assert list(clf.read_results(tmp_path / "res" / "accuracy.csv")["method"]) == ["zero"]


def test_a_cell_refuses_data_other_than_the_plans(tmp_path, monkeypatch):
    cfg = ClassificationConfig(profile="t", results_dir=str(tmp_path), masks=["square"], methods=["zero"], seeds=[0],
                               n_train=48, n_test=16, epochs=1, batch_size=8, precision="32", device="cpu")
    d = _tiny_data()
    monkeypatch.setattr(clf, "load_cell_data", lambda *a, **k: d)
    clf._PLAN_DATA.clear()
    (cell,) = clf.plan(cfg)
    monkeypatch.setattr(clf, "load_cell_data", lambda *a, **k: _other_images(d))
    with pytest.raises(Exception, match="train data this process loaded differ from the plan"):
        clf.run_cell(cell, cfg, progress=False)


# ---------------------------------------------------------------------------- no ground truth in k-NN
class _RecordingKNN:
    """Stands in for scikit-learn's KNNImputer: records what it is fitted on, fills NaN with 0.5."""

    fits: list = []

    def __init__(self, n_neighbors=5, keep_empty_features=True):
        self.k = n_neighbors

    def fit(self, X):
        _RecordingKNN.fits.append(np.array(X, copy=True))
        return self

    def transform(self, X):
        return np.where(np.isnan(X), 0.5, X)


def test_knn_is_fitted_on_incomplete_images_only(tmp_path, monkeypatch):
    import sklearn.impute

    monkeypatch.setattr(sklearn.impute, "KNNImputer", _RecordingKNN)
    _RecordingKNN.fits = []
    d = _tiny_data()
    cfg = imputer_settings(ClassificationConfig(cache_dir=str(tmp_path), knn_k=[1, 3], knn_val=8, knn_fit=20),
                           progress=False)
    METHODS["knn"].prepare(d, cfg)
    rows = d.fit_idx[:20]
    images = d.train_images[rows].reshape(20, -1).numpy()
    missing = d.train_missing[rows].expand_as(d.train_images[rows]).reshape(20, -1).numpy()
    assert _RecordingKNN.fits, "the imputer was never fitted"
    for X in _RecordingKNN.fits:
        assert np.isnan(X[missing]).all(), "the k-NN imputer saw pixels that are missing (ground truth)"
        np.testing.assert_allclose(X[~missing], images[~missing], rtol=1e-6)


def test_knn_chooses_k_without_looking_at_the_truly_missing_pixels(tmp_path):
    d = _tiny_data()
    # the truly missing pixels' values are unknown: make them NaN, so any use of them shows up
    J = d.train_missing.expand_as(d.train_images)
    d.train_images = torch.where(J, torch.full_like(d.train_images, float("nan")), d.train_images)
    cfg = imputer_settings(ClassificationConfig(cache_dir=str(tmp_path), knn_k=[1, 2, 3], knn_val=8, knn_fit=30),
                           progress=False)
    _, _, info = METHODS["knn"].prepare(d, cfg)
    scores = info["knn_val_sse_per_image"]
    assert all(np.isfinite(v) for v in scores.values()), scores
    assert info["knn_k"] == min(scores, key=scores.get)


def test_a_checkpoint_that_appears_mid_sweep_runs_before_later_seeds(tmp_path):
    calls = []
    ck = tmp_path / "dmfa_mnist.pt"

    def run(cell, cfg):
        calls.append((cell.coords["method"], cell.coords["seed"]))
        ck.write_bytes(b"trained meanwhile")          # the DMFA lands while the first cell runs
        return {"metrics": {"accuracy": 0.5}}

    cfg = ClassificationConfig(profile="t", results_dir=str(tmp_path), dmfa_complete=str(tmp_path / "dmfa_{dataset}.pt"),
                               masks=["square"], methods=["zero", "dmfa_misconv_complete"], seeds=[0, 1], n_train=60,
                               n_test=20)
    clf.run(cfg, _run_cell=run, progress=False)
    assert calls == [("zero", 0), ("dmfa_misconv_complete", 0), ("zero", 1), ("dmfa_misconv_complete", 1)]
