"""Per-image predictions of the classification cells (stored with the row, bound to the cell key and
the test data) and the shared initialisation scheme (labkit.studies.classification)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labkit.models.classifier import build_classifier, evaluate_accuracy
from labkit.studies import classification as clf
from labkit.studies import store as store_mod
from labkit.studies.cells import stable_seed
from labkit.studies.configs import ClassificationConfig
from labkit.studies.engine import Cell
from labkit.studies.imputers import AuxSource

pytestmark = pytest.mark.usefixtures("eager_misconv")  # see tests/conftest.py

TEST_FP = {"n": 5, "name": "mnist", "sha": "abc", "shape": [1, 28, 28], "source": "", "split": "test"}


def _row(key="k" * 16, acc=0.6, test=TEST_FP):
    return {"key": key, "accuracy": acc, "inputs": json.dumps({"test": test})}


# ------------------------------------------------------------------ the record
def test_predictions_round_trip_and_binding():
    pred = torch.tensor([3, 0, 9, 12, 7])
    correct = torch.tensor([True, False, True, True, False])
    rec = {**clf.encode_predictions(pred, correct, TEST_FP), "key": "k" * 16}
    assert rec["predicted"] == "309c7" and rec["n"] == 5
    p, c = clf.decode_predictions(rec, _row())
    assert p.dtype == np.int8 and p.tolist() == [3, 0, 9, 12, 7] and c.tolist() == correct.tolist()
    with pytest.raises(ValueError, match="offered for row"):
        clf.decode_predictions(rec, _row(key="x" * 16))
    with pytest.raises(ValueError, match="other test data"):
        clf.decode_predictions(rec, _row(test={**TEST_FP, "sha": "def"}))
    with pytest.raises(ValueError, match="not the same run"):
        clf.decode_predictions(rec, _row(acc=0.8))
    with pytest.raises(ValueError, match="5 labels for 6"):
        clf.decode_predictions({**rec, "n": 6}, _row())
    with pytest.raises(ValueError, match="predictions for a test set of 4"):
        clf.encode_predictions(pred, correct, {**TEST_FP, "n": 4})
    with pytest.raises(ValueError, match="0..35"):
        clf.encode_predictions(torch.tensor([0, 1, 2, 3, 36]), correct, TEST_FP)


def test_store_writes_predictions_in_the_rows_set(tmp_path, monkeypatch):
    store = clf.result_store(tmp_path)
    cell = Cell("classification", {"dataset": "mnist", "mask": "square", "method": "zero", "seed": 0},
                {"epochs": 1}, {"test": TEST_FP})
    rec = clf.encode_predictions(torch.tensor([1, 1, 2, 0, 4]), torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool),
                                 TEST_FP)
    seen = []
    real = store_mod.write_files

    def spy(files):
        seen.append(sorted(p.name for p in files))
        return real(files)

    monkeypatch.setattr(store_mod, "write_files", spy)
    assert store.record(cell, {"accuracy": 0.6}, {"lr": 0.001, "predictions": rec})
    assert seen == [["accuracy.csv", "predictions.jsonl", "runs.jsonl"]]        # one set
    details = store.read_details()
    assert len(details) == 1 and "predictions" not in details[0]               # kept out of runs.jsonl
    assert store.read_attachments("predictions")[cell.key]["predicted"] == "11204"
    df = clf.read_results(tmp_path)
    assert df.loc[0, "correct"].tolist() == [True, False, True, True, False]
    # a second, different record under the key is refused on read
    with open(tmp_path / "predictions.jsonl", "a") as fh:
        fh.write(json.dumps({**rec, "predicted": "00000", "key": cell.key}) + "\n")
    with pytest.raises(ValueError, match="second, different record"):
        clf.read_results(tmp_path)


def test_rows_without_predictions_read_as_none(tmp_path):
    store = clf.result_store(tmp_path)
    cell = Cell("classification", {"dataset": "mnist", "mask": "square", "method": "zero", "seed": 0}, {}, {})
    store.record(cell, {"accuracy": 0.5}, {"lr": 0.001})
    df = clf.read_results(tmp_path / "accuracy.csv")
    assert list(df["correct"]) == [None]


def test_predict_agrees_with_evaluate_accuracy():
    torch.manual_seed(0)
    model = build_classifier("mnist", "zero", in_channels=1, image_size=12)
    images = torch.rand(23, 1, 12, 12)
    missing = torch.rand(23, 1, 12, 12) < 0.3
    labels = torch.randint(0, 10, (23,))
    pred = clf.predict(model, images, missing, AuxSource(), batch_size=5)
    assert pred.shape == (23,) and pred.dtype == torch.long
    acc = evaluate_accuracy(model, images, labels, missing, AuxSource(), batch_size=7)
    assert int((pred == labels).sum()) / 23 == acc
    with torch.no_grad():      # and they are the argmax of the NaN-filled images' logits
        model.eval()
        x = torch.where(missing, torch.full((), float("nan")), images)
        assert torch.equal(pred, model(x, missing, None).argmax(1))


# ------------------------------------------------------------------ initialisation
def test_shared_init_shares_every_layer_of_agreeing_shape():
    kw = dict(in_channels=1, image_size=28, init="shared")
    ref, own = clf.init_classifier("mnist", "zero", "mnist", "square", 3, **kw)
    assert own == []
    for method in ("gt", "pc", "dmfa_misconv_complete"):
        other, own = clf.init_classifier("mnist", method, "mnist", "noise", 3, **kw)
        assert own == []
        for (n1, p1), (n2, p2) in zip(ref.state_dict().items(), other.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2), (method, n1)
    mask, own = clf.init_classifier("mnist", "mask", "mnist", "square", 3, **kw)
    assert own == ["front.conv"]
    for name, p in mask.state_dict().items():
        same = p.shape == ref.state_dict()[name].shape and torch.equal(p, ref.state_dict()[name])
        assert same == (not name.startswith("front.conv")), name
    # another seed, other weights
    other_seed, _ = clf.init_classifier("mnist", "zero", "mnist", "square", 4, **kw)
    assert not torch.equal(other_seed.body[-1].weight, ref.body[-1].weight)


def test_method_init_is_the_committed_draw_and_stays_out_of_the_key():
    model, own = clf.init_classifier("mnist", "pc", "mnist", "square", 2, in_channels=1, image_size=28)
    torch.manual_seed(stable_seed("init", "mnist", "square", "pc", 2))
    legacy = build_classifier("mnist", "pc", in_channels=1, image_size=28)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), legacy.state_dict().values()))
    assert "front.conv" in own and len(own) > 5
    zero, _ = clf.init_classifier("mnist", "zero", "mnist", "square", 2, in_channels=1, image_size=28)
    assert not torch.equal(zero.body[-1].weight, model.body[-1].weight)     # the methods' draws differ
    cfg = ClassificationConfig()
    assert "init" not in clf.cell_settings(cfg, "zero")
    assert clf.cell_settings(cfg.replace(init="shared"), "zero")["init"] == "shared"
    with pytest.raises(ValueError, match="init.*must be an initialisation scheme"):
        cfg.replace(init="same")
    with pytest.raises(ValueError, match="init must be one of"):
        clf.init_classifier("mnist", "zero", "mnist", "square", 0, in_channels=1, image_size=28, init="same")


# ------------------------------------------------------------------ a real cell
def _tiny_cell_data(dataset, mask, seed, n_train=None, n_test=None, val_fraction=0.1, quiet=True):
    """A learnable two-class set of 12×12 images (bright left or right half), 64 + 30 images."""
    from labkit.studies.cells import CellData, cell_masks

    g = torch.Generator().manual_seed(seed)
    n, nt, S = 64, 30, 12
    labels = torch.randint(0, 2, (n + nt,), generator=g)
    imgs = 0.2 * torch.rand(n + nt, 1, S, S, generator=g)
    imgs[labels == 1, :, :, : S // 2] += 0.7
    imgs[labels == 0, :, :, S // 2:] += 0.7
    miss = cell_masks("tiny", "train", mask, seed, n + nt, S, S)
    idx = torch.arange(n)
    return CellData("mnist", mask, seed, imgs[:n], labels[:n], miss[:n], idx[:56], idx[56:],
                    imgs[n:], labels[n:], miss[n:])


def test_real_cell_stores_predictions_that_give_its_accuracy(tmp_path, monkeypatch):
    monkeypatch.setattr(clf, "load_cell_data", _tiny_cell_data)
    clf._PLAN_DATA.clear()
    cfg = ClassificationConfig(profile="t", results_dir=str(tmp_path), masks=["square"], methods=["zero", "gt"],
                               seeds=[0], n_train=64, n_test=30, epochs=1, init="shared", device="cpu")
    df = clf.run(cfg, progress=False)
    assert len(df) == 2
    for _, r in df.iterrows():
        assert r["correct"] is not None and len(r["correct"]) == 30
        assert r["correct"].mean() == pytest.approx(r["accuracy"], abs=1e-5)
        assert json.loads(r["settings"])["init"] == "shared"
    details = clf.result_store(tmp_path).read_details()
    assert all(d["init"] == "shared" and d["init_own_layers"] == [] for d in details)
    from labkit.studies.paired_stats import paired_comparison

    out = paired_comparison(df, "gt", "zero", n_boot=200).loc[("mnist", "square")]
    assert out["n_predictions"] == 1 and out["mcnemar_p_per_seed"] is not None
    assert out["mcnemar_n_ab"] - out["mcnemar_n_ba"] == round(30 * out["mean"])


def test_rows_carry_the_training_history_of_their_run_record(tmp_path):
    """``read_results`` binds each row to its own cell's history (by key), and a row whose record
    has none reads as None rather than borrowing another's."""
    store = clf.result_store(tmp_path)
    cells = [Cell("classification", {"dataset": "mnist", "mask": "square", "method": m, "seed": 0}, {}, {})
             for m in ("zero", "gt", "mask")]
    hist = {"zero": [{"epoch": 0, "val_accuracy": 0.5}, {"epoch": 1, "val_accuracy": 0.6}],
            "gt": [{"epoch": 0, "val_accuracy": 0.9}]}
    for cell in cells:
        meth = cell.coords["method"]
        details = {"n_train": 900 if meth == "zero" else 300, **({"history": hist[meth]} if meth in hist else {})}
        store.record(cell, {"accuracy": 0.5}, details)
    df = clf.read_results(tmp_path).set_index("method")
    assert df.loc["zero", "history"] == hist["zero"] and df.loc["zero", "images_per_epoch"] == 900
    assert df.loc["gt", "history"] == hist["gt"] and df.loc["gt", "images_per_epoch"] == 300
    assert df.loc["mask", "history"] is None
