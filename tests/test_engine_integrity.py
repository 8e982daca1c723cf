"""No silently wrong number: the engine's caches, keys, result files and failure paths.

Each test guards one way a study could report a number that is not what its row says: a cache
reused for other rows or another data folder, a NaN loss or metric recorded as a result, a live
writer's file removed by recovery, a row without its details, a setting that changes the result
but not the key, and the keys of the committed results.
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import multiprocessing
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit import paths
from labkit.data import train_val_split
from labkit.studies import engine
from labkit.studies import store as store_mod
from labkit.studies.cells import CellData, fingerprint_cell
from labkit.studies.engine import Cell, InvalidMetric, ResultStore, SweepFailed

REPO = Path(__file__).resolve().parents[1]


# ============================================================================ helpers
def _cell_data(n: int = 40, val_fraction: float = 0.1, *, h: int = 8, w: int = 8, n_test: int = 10,
               seed: int = 0) -> CellData:
    """Synthetic cell data: images of rank 4 (so k-NN and an MFA have structure to use), random
    masks, a ``val_fraction`` split as the study makes it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(4, 1, h, w, generator=g)
    coef = torch.rand(n + n_test, 4, generator=g)
    images = (torch.einsum("nk,kchw->nchw", coef, base) / 4 + 0.02 * torch.rand(n + n_test, 1, h, w, generator=g))
    images = images.clamp(0, 1)
    missing = torch.rand(n + n_test, 1, h, w, generator=g) < 0.3
    labels = torch.randint(0, 10, (n + n_test,), generator=g)
    fit_idx, val_idx = train_val_split(n, val_fraction, seed=0)
    data = CellData(dataset="mnist", mask="square", seed=0, train_images=images[:n], train_labels=labels[:n],
                    train_missing=missing[:n], fit_idx=fit_idx, val_idx=val_idx, test_images=images[n:],
                    test_labels=labels[n:], test_missing=missing[n:])
    fingerprint_cell(data)
    return data


def _store(folder: Path) -> ResultStore:
    return ResultStore(folder / "acc.csv", coords=["dataset", "method", "seed"], metrics=["accuracy"],
                       optional=["accuracy_last"], details=folder / "runs.jsonl")


def _cell(method: str = "zero", seed: int = 0, **settings) -> Cell:
    return Cell("t", {"dataset": "mnist", "method": method, "seed": seed}, {"epochs": 1, **settings})


def _other_rows(data: CellData, k: int = 5, keep: int = 0) -> CellData:
    """``data`` with ``k`` fitting rows swapped for validation rows after its first ``keep`` ones:
    the same counts, images, masks and fingerprints (and the same first ``keep`` validation rows),
    other rows to fit on."""
    import dataclasses

    fit = torch.cat([data.val_idx[keep:keep + k], data.fit_idx[k:]]).sort().values
    val = torch.cat([data.val_idx[:keep], data.fit_idx[:k], data.val_idx[keep + k:]])
    return dataclasses.replace(data, fit_idx=fit, val_idx=val)


# ============================================================================ 1. caches keyed by content
def test_knn_cache_is_keyed_by_the_rows_it_is_fitted_on(tmp_path):
    """Another val_fraction with the same knn_fit (same count) fits k-NN on other rows: the cache
    must not hand back the first imputations."""
    from labkit.studies.configs import ClassificationConfig
    from labkit.studies.imputers import imputer_settings, prepare_knn

    def cfg(cache):
        return imputer_settings(ClassificationConfig(knn_fit=12, knn_k=[1], knn_val=4, cache_dir=str(cache),
                                                     device="cpu"), progress=False)

    c = _cell_data(val_fraction=0.3)
    # another val_fraction (what a user changes); other rows to fit on, the same validation rows
    for i, (a, b) in enumerate([(_cell_data(val_fraction=0.1), c), (c, _other_rows(c, 6, keep=4))]):
        assert not torch.equal(a.fit_idx[:12], b.fit_idx[:12])      # knn_fit rows: same count, other rows
        shared = tmp_path / f"shared-{i}"
        first = prepare_knn(a, cfg(shared))[1].images
        reused = prepare_knn(b, cfg(shared))[1].images              # b through the cache a filled
        fresh = prepare_knn(b, cfg(tmp_path / f"fresh-{i}"))[1].images     # b afresh
        assert not torch.equal(first, fresh)                       # the rows matter ...
        assert torch.equal(reused, fresh)                          # ... so the cache must tell them apart


def test_mfa_caches_are_keyed_by_the_rows_and_the_fitted_model(tmp_path):
    """The classical MFA (fitted on the classifier's training rows) and its mean imputations are
    recomputed when val_fraction moves rows out of the fit, never reused."""
    from labkit.studies.configs import ClassificationConfig
    from labkit.studies.imputers import classical_mfa, imputer_settings, prepare_mfa_mean

    def cfg(cache):
        return imputer_settings(ClassificationConfig(mfa_components=2, mfa_factors=1, mfa_iterations=3,
                                                     cache_dir=str(cache), device="cpu"), progress=False)

    a = _cell_data(val_fraction=0.25)
    b = _other_rows(a)                          # the same number of rows to fit on, other rows
    shared = tmp_path / "shared"
    first = prepare_mfa_mean(a, cfg(shared))[1].images
    reused_model = classical_mfa(b, cfg(shared))
    reused = prepare_mfa_mean(b, cfg(shared))[1].images
    fresh_model = classical_mfa(b, cfg(tmp_path / "fresh"))
    fresh = prepare_mfa_mean(b, cfg(tmp_path / "fresh"))[1].images
    assert not torch.equal(first, fresh)
    for k, v in fresh_model.state_dict().items():
        assert torch.equal(reused_model.state_dict()[k], v), k
    assert torch.equal(reused, fresh)


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(head + array.tobytes()))


def _mnist_folder(root: Path, value: int) -> None:
    rng = np.random.default_rng(value)
    for prefix, n in (("train", 12), ("t10k", 6)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = value                                   # tells the two folders apart
        _write_idx(root / "mnist" / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))


def test_cell_data_cache_follows_LABKIT_DATA(tmp_path, monkeypatch):
    from labkit.studies.cells import load_cell_data

    for name, value in (("one", 10), ("two", 200)):
        _mnist_folder(tmp_path / name, value)
    monkeypatch.setenv("LABKIT_SHARED_DATASETS", str(tmp_path / "no-shared"))
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path / "one"))
    one = load_cell_data("mnist", "square", 0, n_train=12, n_test=6)
    monkeypatch.setenv("LABKIT_DATA", str(tmp_path / "two"))
    two = load_cell_data("mnist", "square", 0, n_train=12, n_test=6)
    assert one.train_images[0, 0, 0, 0].item() == pytest.approx(10 / 255)
    assert two.train_images[0, 0, 0, 0].item() == pytest.approx(200 / 255)
    assert two.fingerprints["train"]["sha"] != one.fingerprints["train"]["sha"]


def test_jpeg_decode_cache_follows_its_files(tmp_path):
    """A CIFAR-10 JPEG folder whose file changed is decoded again (its cache is tied to the files'
    names, sizes and modification times)."""
    from PIL import Image

    from labkit import data as D

    folder = tmp_path / "cifar10-jpeg" / "test"
    for c, name in enumerate(D.CIFAR10_CLASSES):
        (folder / name).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 20 * c, dtype=np.uint8)).save(folder / name / "0000.jpg", quality=95)
    first = D.load_dataset("cifar10", "test", root=tmp_path, download=False, quiet=True)
    assert (tmp_path / "cifar10-jpeg" / "cache-test.pt").is_file()
    target = folder / "cat" / "0000.jpg"
    Image.fromarray(np.full((32, 32, 3), 250, dtype=np.uint8)).save(target, quality=95)
    later = time.time() + 5                                       # a replaced file: another size and mtime
    os.utime(target, (later, later))
    again = D.load_dataset("cifar10", "test", root=tmp_path, download=False, quiet=True)
    cat = again.labels.tolist().index(D.CIFAR10_CLASSES.index("cat"))
    assert first.images[cat].mean().item() == pytest.approx(60 / 255, abs=0.02)
    assert again.images[cat].mean().item() == pytest.approx(250 / 255, abs=0.02)
    # an unchanged folder reads the cache (a decode would fail on a file that is not a JPEG)
    before = os.stat(tmp_path / "cifar10-jpeg" / "cache-test.pt").st_mtime_ns
    D.load_dataset("cifar10", "test", root=tmp_path, download=False, quiet=True)
    assert os.stat(tmp_path / "cifar10-jpeg" / "cache-test.pt").st_mtime_ns == before


# ============================================================================ 2. non-finite training loss
def test_classifier_whose_loss_is_nan_fails_instead_of_giving_an_accuracy(tmp_path):
    from labkit.models.classifier import build_classifier, evaluate_accuracy, train_classifier
    from labkit.studies.imputers import AuxSource

    data = _cell_data(n=24, h=28, w=28, n_test=8)

    def fn(cell):
        torch.manual_seed(0)
        model = build_classifier("mnist", "zero", in_channels=1, image_size=28)
        with torch.no_grad():
            model.body[-1].bias.fill_(float("nan"))               # a diverged run: NaN logits, NaN loss
        train_classifier(model, data, AuxSource(), epochs=2, batch_size=8, lr=1e-3, seed=0, device="cpu",
                         progress=False)
        acc = evaluate_accuracy(model, data.test_images, data.test_labels, data.test_missing, AuxSource())
        return {"metrics": {"accuracy": acc}}

    s = _store(tmp_path)
    outcomes = engine.run_cells([_cell()], fn, s, raise_on_failure=False, log=lambda text: None)
    assert [o.status for o in outcomes] == ["failed"]
    assert "FloatingPointError" in outcomes[0].error and "'loss'" in outcomes[0].error
    assert len(s.read()) == 0


def test_fit_stops_at_a_non_finite_loss_before_checkpointing_that_epoch(tmp_path):
    from labkit.training import fit

    model = torch.nn.Linear(2, 1)
    ckpt = tmp_path / "run.pt"
    losses = {0: [1.0, 0.5], 1: [0.4, float("inf")]}

    def step(batch, epoch, g):
        return {"loss": losses[epoch][batch]}

    with pytest.raises(FloatingPointError, match=r"'loss' is inf in epoch 2/2, batch 2"):
        fit(model, None, lambda e, g: [0, 1], step, epochs=2, checkpoint=ckpt, progress=False)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1     # the last good epoch stays the checkpoint
    # a step that reports its skipped batches under another name is not stopped
    assert len(fit(torch.nn.Linear(2, 1), None, lambda e, g: [0], lambda b, e, g: {"nll": float("nan")},
                   epochs=1, progress=False)) == 1


def test_acflow_epoch_with_every_update_skipped_raises():
    from labkit.models.acflow import ACFlow
    from labkit.models.acflow_training import train_acflow

    torch.manual_seed(0)
    model = ACFlow(1, 8, 8, hidden=4, n_scales=1, n_couplings=1)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="every one of the 2 batches"):
        train_acflow(images, epochs=1, batch_size=4, model=model, device="cpu", progress=False,
                     mask_fn=lambda n, g: torch.rand(n, 1, 8, 8, generator=g) < 0.5)


# ============================================================================ 3. NaN / inf metrics
@pytest.mark.parametrize("metrics", [{"accuracy": float("nan")}, {"accuracy": float("inf")},
                                     {"accuracy": "n/a"}, {"accuracy": 0.9, "accuracy_last": float("nan")}])
def test_a_non_finite_metric_fails_the_cell_and_is_never_a_row(tmp_path, metrics):
    s = _store(tmp_path)
    cell = _cell()
    lines: list[str] = []
    for _ in range(2):                                     # the second sweep: failed again, not "ran" again
        with pytest.raises(SweepFailed) as err:
            engine.run_cells([cell], lambda c: {"metrics": metrics}, s, log=lines.append)
        (failed,) = err.value.failed
        bad = next(k for k, v in metrics.items() if not (isinstance(v, float) and math.isfinite(v)))
        assert failed.status == "failed" and repr(bad) in failed.error and cell.label() in failed.error
    assert len(s.read()) == 0 and not (tmp_path / "acc.csv").exists()
    assert not any("] ran " in line for line in lines) and sum("] failed " in line for line in lines) == 2
    with pytest.raises(InvalidMetric, match=r"'accuracy'"):
        s.record(cell, {"accuracy": float("nan")})


def test_optional_metrics_may_be_absent_but_not_nan(tmp_path):
    s = _store(tmp_path)
    assert s.record(_cell(seed=0), {"accuracy": 0.5, "accuracy_last": None})
    assert s.record(_cell(seed=1), {"accuracy": np.float32(0.25)})
    df = s.read()
    assert df["accuracy"].tolist() == [0.5, 0.25] and df["accuracy_last"].isna().all()


# ============================================================================ 4. recovery and live writers
def _writer(folder: str, ready, go, die: bool) -> None:
    def content(path: Path) -> None:
        path.write_text("new, half written")
        ready.set()
        if die:
            os._exit(3)                                    # killed mid-write: its lock dies with it
        go.wait(30)
        path.write_text("new")

    store_mod.write_files({Path(folder) / "a.csv": content})


def _start_writer(folder: Path, die: bool):
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_writer, args=(str(folder), ready, go, die))
    proc.start()
    assert ready.wait(20), "the writer never started"
    return proc, go


def test_recover_never_removes_a_live_writers_temporary(tmp_path):
    (tmp_path / "a.csv").write_text("old")
    proc, go = _start_writer(tmp_path, die=False)
    try:
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".a.csv.")]
        hour_ago = time.time() - 3600                      # a writer paused for an hour (Ctrl-Z, a stalled VM)
        os.utime(tmp, (hour_ago, hour_ago))
        engine.recover(tmp_path)                           # what every reader does first
        assert tmp.exists(), "recover() removed the temporary of a live writer"
    finally:
        go.set()
        proc.join(20)
    assert proc.exitcode == 0
    assert (tmp_path / "a.csv").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_recover_removes_a_dead_writers_temporary(tmp_path):
    (tmp_path / "a.csv").write_text("old")
    proc, _ = _start_writer(tmp_path, die=True)
    proc.join(20)
    assert proc.exitcode == 3
    assert any(p.name.startswith(".a.csv.") for p in tmp_path.iterdir())
    engine.recover(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"] and (tmp_path / "a.csv").read_text() == "old"


def test_recover_leaves_other_writers_temporaries(tmp_path):
    """A checkpoint being saved (``.<name>.<random>.tmp``, no lock protocol) is not recovery's to remove."""
    other = tmp_path / ".model.pt.abc123.tmp"
    other.write_bytes(b"half a checkpoint")
    old = time.time() - 7200
    os.utime(other, (old, old))
    engine.recover(tmp_path)
    assert other.exists()


# ============================================================================ 5. a row never lacks its details
def _keys_without_details(folder: Path) -> list[str]:
    s = _store(folder)
    have = {json.loads(line)["key"] for line in (folder / "runs.jsonl").read_text().splitlines() if line.strip()} \
        if (folder / "runs.jsonl").exists() else set()
    return [k for k in s.read(report=False)["key"] if k not in have]


def test_a_row_and_its_details_are_written_as_one_set(tmp_path, monkeypatch):
    s = _store(tmp_path)
    assert s.record(_cell(seed=0), {"accuracy": 0.5}, {"history": [1, 2]})
    real_replace, real_write_files = os.replace, store_mod.write_files
    # killed at each rename of the set, and just after the set was written
    for seed, die_at in enumerate([1, 2, 3, None], start=1):
        calls = {"n": 0}

        def dying_replace(src, dst, die_at=die_at, calls=calls):
            calls["n"] += 1
            if calls["n"] == die_at:
                raise KeyboardInterrupt("killed")
            return real_replace(src, dst)

        def dying_after(files):
            out = real_write_files(files)
            raise KeyboardInterrupt("killed after the write")

        if die_at is None:
            monkeypatch.setattr(store_mod, "write_files", dying_after)
        else:
            monkeypatch.setattr(store_mod.os, "replace", dying_replace)
        with pytest.raises(KeyboardInterrupt):
            s.record(_cell(seed=seed), {"accuracy": 0.5}, {"history": [seed]})
        monkeypatch.setattr(store_mod.os, "replace", real_replace)
        monkeypatch.setattr(store_mod, "write_files", real_write_files)
        engine.recover(tmp_path)
        assert _keys_without_details(tmp_path) == [], f"killed at rename {die_at}: a row lost its details"
    assert len(s.read()) >= 2


def test_a_row_without_details_is_reported_on_read(tmp_path, capsys):
    s = _store(tmp_path)
    s.record(_cell(seed=0), {"accuracy": 0.5}, {"history": []})
    s.record(_cell(seed=1), {"accuracy": 0.5})                 # recorded without details
    capsys.readouterr()
    s.read()
    out = capsys.readouterr().out
    assert "1 row(s) have no record in" in out and _cell(seed=1).key[:8] in out
    assert s.rows_without_details() == [_cell(seed=1).key]


def test_details_must_lie_beside_the_table(tmp_path):
    with pytest.raises(ValueError, match="beside"):
        ResultStore(tmp_path / "a.csv", coords=["seed"], metrics=["m"], details=tmp_path / "sub" / "runs.jsonl")


# ============================================================================ 6. settings outside the key
def test_acflow_impute_batch_is_in_the_keys_unless_it_is_the_committed_one(monkeypatch):
    from labkit.studies import imputers
    from labkit.studies.classification import cell_settings
    from labkit.studies.configs import ClassificationConfig

    assert "impute_batch" not in cell_settings(ClassificationConfig(precision="32"), "acflow")
    assert cell_settings(ClassificationConfig(precision="32", impute_batch=64), "acflow")["impute_batch"] == 64
    keys = {}

    def cached(folder, name, key, compute, progress=True):      # the cache key ACFlow's imputations get
        keys[key.get("impute_batch", "default")] = engine.digest(key)
        return {"train": None, "test": None}

    monkeypatch.setattr(imputers, "_checkpoint_id", lambda path, role: {"sha": "fixed"})
    monkeypatch.setattr(imputers, "cached", cached)
    data = _cell_data()
    for batch in (256, 64):
        icfg = imputers.imputer_settings(ClassificationConfig(impute_batch=batch, device="cpu"), progress=False)
        imputers.prepare_acflow(data, icfg)
    assert set(keys) == {"default", 64} and keys["default"] != keys[64]


def test_acflow_imputations_depend_on_the_batch():
    """Why impute_batch is keyed: the flow's noise is drawn batch by batch from one generator."""
    from labkit.models.acflow import ACFlow

    torch.manual_seed(0)
    model = ACFlow(1, 8, 8, hidden=4, n_scales=1, n_couplings=1).eval()
    data = _cell_data(n=6, n_test=0)
    x, j = data.train_images, data.train_missing

    def impute(batch):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return torch.cat([model.impute(x[s:s + batch], j[s:s + batch], n_samples=2, generator=g)
                              for s in range(0, len(x), batch)])

    assert (impute(2) - impute(3)).abs().max() > 1e-3


def test_wae_metrics_do_not_depend_on_the_evaluation_batch():
    from labkit.metrics import frechet_distance
    from labkit.models.wae import WAE
    from labkit.studies.imputers import AuxSource
    from labkit.studies.wae import evaluate_wae

    torch.manual_seed(0)
    model = WAE("zero", "mnist", device="cpu").eval()
    data = _cell_data(n=40, h=28, w=28, n_test=0)

    def features(images):
        return torch.nn.functional.avg_pool2d(images.float(), 7).flatten(1)     # (n, 16)

    small, _ = evaluate_wae(model, data.train_images, data.train_missing, AuxSource(), features=features,
                            batch_size=7, seed=3, skimage=False)
    large, _ = evaluate_wae(model, data.train_images, data.train_missing, AuxSource(), features=features,
                            batch_size=500, seed=3, skimage=False)
    assert small.keys() == large.keys()
    for k in small:
        assert small[k] == pytest.approx(large[k], rel=1e-5, abs=1e-6), k
    # fd_samples itself, independently: 40 codes drawn in one call from the seeded generator
    with torch.no_grad():
        codes = model.prior_sample(40, generator=torch.Generator().manual_seed(3))
        want = frechet_distance(features(model.decode(codes)), features(data.train_images))
    assert small["fd_samples"] == pytest.approx(want, rel=1e-5)


def test_classification_eval_batch_does_not_change_the_accuracy():
    from labkit.models.classifier import build_classifier, evaluate_accuracy
    from labkit.studies.imputers import AuxSource

    torch.manual_seed(0)
    model = build_classifier("mnist", "zero", in_channels=1, image_size=28)
    data = _cell_data(n=30, h=28, w=28, n_test=0)
    with torch.no_grad():
        model.body[-1].bias.copy_(torch.linspace(-0.01, 0.01, 10))
    args = (model, data.train_images, data.train_labels, data.train_missing, AuxSource())
    per_image = [evaluate_accuracy(*args, idx=torch.tensor([i]), batch_size=1) for i in range(30)]
    for batch in (4, 500):
        assert evaluate_accuracy(*args, batch_size=batch) == pytest.approx(sum(per_image) / 30)


# ============================================================================ 7. the key holds what changes the result
#: ClassificationConfig fields and where they enter a classification cell's key: its settings (for the
#: methods listed), its inputs (as a content fingerprint of the file), its coordinates (the grid), or
#: nowhere (they change no result)
_IN_SETTINGS = {"epochs": ("zero", 2), "batch_size": ("zero", 12), "lr": ("zero", 3e-4), "n_train": ("zero", 300),
                "n_test": ("zero", 100), "val_fraction": ("zero", 0.2), "select": ("zero", "last"),
                "precision": ("zero", "bf16-mixed"), "knn_fit": ("knn", 100), "knn_k": ("knn", [1, 2]),
                "knn_val": ("knn", 50), "mfa_components": ("mfa_mean", 3), "mfa_factors": ("mfa_misconv", 2),
                "mfa_iterations": ("mfa_mean", 5), "acflow_samples": ("acflow", 8), "impute_batch": ("acflow", 64),
                "init": ("zero", "shared")}
_IN_INPUTS = {"dmfa_complete", "dmfa_incomplete", "acflow", "dmfa_replicates"}   # the DMFA file read, by content
_COORDS = {"dataset", "masks", "methods", "seeds"}
_NEUTRAL = {"profile", "results_dir", "cache_dir", "device", "eval_batch", "committed"}


def test_every_classification_setting_that_changes_a_result_changes_the_key():
    from labkit.studies.classification import cell_settings
    from labkit.studies.configs import ClassificationConfig

    fields = set(ClassificationConfig.names())
    known = set(_IN_SETTINGS) | _IN_INPUTS | _COORDS | _NEUTRAL
    assert known == fields, f"classify the new ClassificationConfig field(s) {sorted(fields - known)}"
    assert _NEUTRAL - {"device"} == set(fields) - set(ClassificationConfig.key_fields())   # as the config says
    base = ClassificationConfig(precision="32", device="cpu")
    for name, (method, value) in _IN_SETTINGS.items():
        other = base.replace(**{name: value})
        a, b = cell_settings(base, method), cell_settings(other, method)
        assert a != b, f"{name} changes the result of {method} but not its key"
        coords = {"dataset": "mnist", "mask": "square", "method": method, "seed": 0}
        assert Cell("classification", coords, a).key != Cell("classification", coords, b).key


def test_auto_precision_is_resolved_in_the_key():
    from labkit.precision import resolve_precision
    from labkit.studies.classification import cell_settings
    from labkit.studies.configs import ClassificationConfig
    from labkit.studies.wae import WAEConfig, plan_cell

    resolved = resolve_precision("auto", torch.device("cpu"))
    assert resolved != "auto"
    auto = cell_settings(ClassificationConfig(precision="auto", device="cpu"), "zero")
    assert auto["precision"] == resolved
    assert auto == cell_settings(ClassificationConfig(precision=resolved, device="cpu"), "zero")
    data = _cell_data(n=8, h=28, w=28, n_test=4)
    wae_cell = plan_cell("mnist", "zero", 0, WAEConfig(precision="auto", device="cpu", feature_n_train=None,
                                                       n_train=8, n_test=4), data=data)
    assert wae_cell.settings["precision"] == resolved


def test_data_fingerprint_covers_every_image_and_label():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(300, 1, 4, 4, generator=g), torch.randint(0, 10, (300,), generator=g)
    sha = engine.data_fingerprint(images, labels)["sha"]
    last = images.clone()
    last[299, 0, 3, 3] += 1e-3
    assert engine.data_fingerprint(last, labels)["sha"] != sha
    relabelled = labels.clone()
    relabelled[299] = (labels[299] + 1) % 10
    assert engine.data_fingerprint(images, relabelled)["sha"] != sha


def test_masks_digest_covers_train_and_test_masks():
    base = fingerprint_cell(_cell_data())["masks"]
    for split in ("train", "test"):
        data = _cell_data()
        data.fingerprints = {}
        m = getattr(data, f"{split}_missing")
        m[-1, 0, -1, -1] = ~m[-1, 0, -1, -1]
        assert fingerprint_cell(data)["masks"] != base, f"a {split} mask changed but the digest did not"


def test_record_replaces_the_table_atomically(tmp_path):
    """The table is written to a temporary and renamed over the old one: a reader holding the old
    file keeps it whole, never a half-rewritten one."""
    s = _store(tmp_path)
    s.record(_cell(seed=0), {"accuracy": 0.5}, {})
    with open(s.path, "rb") as held:
        before = held.read()
        s.record(_cell(seed=1), {"accuracy": 0.6}, {})
        assert os.fstat(held.fileno()).st_ino != os.stat(s.path).st_ino
        held.seek(0)
        assert held.read() == before
    assert len(s.read()) == 2


# ============================================================================ committed keys stay valid
def _committed(study_dir: str, name: str) -> list[dict]:
    return list(csv.DictReader(open(REPO / "results" / study_dir / name, newline="")))


@pytest.mark.parametrize("study,csv_path", [("classification", ("classification/cpu", "accuracy.csv")),
                                            ("wae", ("wae/cpu", "metrics.csv"))])
def test_committed_keys_are_the_keys_of_their_stored_cells(study, csv_path):
    rows = _committed(*csv_path)
    assert rows
    coords = ["dataset", "mask", "method", "seed"] if study == "classification" else ["dataset", "front", "seed"]
    for row in rows:
        c = {k: (int(row[k]) if k == "seed" else row[k]) for k in coords}
        cell = Cell(study, c, json.loads(row["settings"]), json.loads(row["inputs"]))
        assert cell.key == row["key"], f"{csv_path}: the key of {cell.label()} changed"


@pytest.mark.skipif(not (paths.shared_datasets_dir() / "mnist").is_dir(), reason="no offline MNIST copy")
def test_committed_classification_cells_are_planned_with_their_keys(tmp_path, monkeypatch):
    """The cpu profile's cells planned today (settings, data, masks and checkpoint fingerprints)
    have the keys of the committed rows: the sweep finds them done."""
    from labkit.studies import classification as clf
    from labkit.studies.configs import ClassificationConfig

    monkeypatch.setenv("LABKIT_DATA", str(tmp_path))     # the offline copy, as the committed sweep read
    cfg = ClassificationConfig.build("cpu")
    done = {row["key"] for row in _committed("classification/cpu", "accuracy.csv")}
    cells = clf.plan(cfg.replace(masks=["square"], seeds=[0])) \
        + clf.plan(cfg.replace(masks=["noise"], methods=["knn", "acflow", "dmfa_misconv_incomplete"], seeds=[2]))
    missing = [c.short() for c in cells if c.key not in done]
    assert not missing, f"committed rows no longer found by their cells: {missing}"
