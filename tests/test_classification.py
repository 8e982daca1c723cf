"""The classifiers (labkit.models.classifier), the study cells and preparers (labkit.studies.cells,
imputers) and the resumable sweep (labkit.studies.classification); notebook 02 smoke run."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from labkit.mfa import fit_mfa
from labkit.models import classifier as models_clf
from labkit.models.classifier import build_classifier, train_classifier
from labkit.studies import classification as clf
from labkit.studies import imputers
from labkit.masks import with_nan
from labkit.studies.cells import CellData, cell_masks
from labkit.studies.classification import ACCURACY_COLUMNS, pivot_table, table_markdown
from labkit.studies.configs import ClassificationConfig
from labkit.studies.imputers import METHODS, imputer_settings
from labkit.studies.reporting import replace_marked_block


pytestmark = pytest.mark.usefixtures("eager_misconv")  # see tests/conftest.py


def _tiny_data(n=48, n_test=16, mask="square", seed=0, C=1, S=12) -> CellData:
    g = torch.Generator().manual_seed(seed)
    # two classes that differ in which half is bright: learnable in one epoch
    labels = torch.randint(0, 2, (n + n_test,), generator=g)
    imgs = 0.2 * torch.rand(n + n_test, C, S, S, generator=g)
    imgs[labels == 1, :, :, : S // 2] += 0.7
    imgs[labels == 0, :, :, S // 2:] += 0.7
    imgs = imgs.clamp(0, 1)
    miss = cell_masks("tiny", "train", mask, seed, n + n_test, S, S)
    idx = torch.arange(n)
    return CellData("mnist", mask, seed, imgs[:n], labels[:n], miss[:n], idx[: n - 8], idx[n - 8:],
                    imgs[n:], labels[n:], miss[n:])


def test_architectures_output_logits_for_every_front():
    x = torch.rand(4, 1, 28, 28)
    missing = cell_masks("mnist", "train", "square", 0, 4, 28, 28)
    for name in ("zero", "mask", "pc", "knn", "gt"):
        model = build_classifier("mnist", name)
        aux = x if METHODS[name].front.aux_kind == "images" else None
        assert model(x.masked_fill(missing, float("nan")), missing, aux).shape == (4, 10)
    cifar = build_classifier("cifar10", "zero")
    assert cifar(torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32, dtype=torch.bool)).shape == (2, 10)
    assert sum(isinstance(m, torch.nn.Dropout) for m in cifar.modules()) == 6
    # MNIST: conv32 (front) + down + 2 x conv64, lin20, lin10
    convs = [m for m in build_classifier("mnist", "zero").modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64] and convs[1].stride == (2, 2)
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build_classifier("vgg", "zero")
    # build_classifier takes its front from the front registry: it must agree with the method registry
    assert all(type(build_classifier("mnist", name).front) is METHODS[name].front for name in METHODS)


def test_cell_masks_are_fixed_per_dataset_split_kind_seed():
    a = cell_masks("mnist", "train", "noise", 0, 5, 28, 28)
    assert a.dtype == torch.bool and a.shape == (5, 1, 28, 28)
    assert torch.equal(a, cell_masks("mnist", "train", "noise", 0, 5, 28, 28))
    assert not torch.equal(a, cell_masks("mnist", "train", "noise", 1, 5, 28, 28))
    assert not torch.equal(a, cell_masks("mnist", "test", "noise", 0, 5, 28, 28))
    assert (a.sum((1, 2, 3)) == round(0.75 * 784)).all()
    sq = cell_masks("mnist", "test", "square", 2, 5, 28, 28)
    assert (sq.sum((1, 2, 3)) == 14 * 14).all()


def test_mfa_aux_sources_give_batches_of_mfas():
    d = _tiny_data()
    model, _ = fit_mfa(d.train_images, 2, 2, iterations=3, progress=False)
    src = imputers.ConditionedMFAAux(model)
    b = torch.tensor([0, 3, 5])
    x = with_nan(d.train_images[b], d.train_missing[b])
    mfa = src.get(b, x, d.train_missing[b])
    assert mfa.batch_size == 3 and torch.isfinite(mfa.means).all()
    # conditional means equal x at observed pixels
    obs = ~d.train_missing[b].expand_as(x)
    assert torch.allclose(mfa.means[:, 0][obs], d.train_images[b][obs])
    # the float16 cache round trip renormalises weights and keeps variances positive
    stored = imputers.MFAAux(imputers._mfa_fields(mfa))
    back = stored.get(torch.arange(3), x, d.train_missing[b])
    torch.testing.assert_close(back.weights.sum(1), torch.ones(3))
    assert (back.variances > 0).all()
    torch.testing.assert_close(back.means, mfa.means, atol=2e-3, rtol=2e-3)


def test_knn_imputation_uses_only_observed_training_values(tmp_path):
    d = _tiny_data(n=60, mask="noise")
    cfg = _imputer(cache_dir=str(tmp_path), knn_k=[1, 3], knn_val=8, knn_fit=40)
    tr, te, info = imputers.prepare_knn(d, cfg)
    assert info["knn_k"] in (1, 3) and set(info["knn_val_sse_per_image"]) == {1, 3}
    assert tr.images.shape == d.train_images.shape and torch.isfinite(tr.images.float()).all()
    miss = d.train_missing.expand_as(d.train_images)
    obs = ~miss
    torch.testing.assert_close(tr.images.float()[obs], d.train_images[obs], atol=1e-3, rtol=0)
    if info["knn_k"] == 1:
        # k = 1: every imputed value is an *observed* value of a fitted image at the same pixel
        fit = d.fit_idx[:40]
        donors = torch.where(miss[fit], torch.nan, d.train_images[fit])    # (40, 1, H, W)
        filled = tr.images.float()
        for i in range(5):
            vals = filled[i][miss[i]]
            cand = donors[:, miss[i]]                                      # (40, n_missing)
            assert torch.isclose(cand, vals.expand_as(cand), atol=1e-3).any(0).all()
    # cached: a second call computes nothing (no new file, same values)
    files = sorted(tmp_path.iterdir())
    tr2, _, _ = imputers.prepare_knn(d, cfg)
    assert sorted(tmp_path.iterdir()) == files and torch.equal(tr2.images, tr.images)


def test_mfa_mean_imputation_keeps_observed_pixels(tmp_path):
    d = _tiny_data()
    cfg = _imputer(cache_dir=str(tmp_path), mfa_components=2, mfa_factors=2, mfa_iterations=3)
    tr, te, _ = imputers.prepare_mfa_mean(d, cfg)
    obs = ~d.test_missing.expand_as(d.test_images)
    torch.testing.assert_close(te.images.float()[obs], d.test_images[obs], atol=1e-3, rtol=0)
    assert torch.isfinite(te.images.float()).all()


def test_dmfa_preparers_with_a_checkpoint(tmp_path):
    """The DMFA methods read a load_or_train checkpoint and cache per-image MFAs."""
    from labkit.checkpoint import atomic_save
    from labkit.models.dmfa import build_dmfa

    torch.manual_seed(0)
    model = build_dmfa("mnist", n_components=1, n_factors=2)
    path = tmp_path / "mnist_complete.pt"
    atomic_save({"model": model.state_dict(), "meta": {"model": model.config}}, path)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(12, 1, 28, 28, generator=g)
    miss = cell_masks("mnist", "train", "square", 0, 12, 28, 28)
    d = CellData("mnist", "square", 0, imgs[:8], torch.zeros(8, dtype=torch.long), miss[:8], torch.arange(6),
                 torch.arange(6, 8), imgs[8:], torch.zeros(4, dtype=torch.long), miss[8:])
    cfg = _imputer(cache_dir=str(tmp_path / "cache"), dmfa_complete=str(tmp_path / "{dataset}_complete.pt"),
                   impute_batch=5)
    assert imputers.method_available("dmfa_misconv_complete", cfg) is None
    assert "does not exist" in imputers.method_available("dmfa_misconv_incomplete",
                                                         _imputer(dmfa_incomplete=str(tmp_path / "nope.pt")))
    # one incomplete-data DMFA per mask kind: {mask_suffix} is "" for squares, "_<kind>" otherwise
    per_kind = _imputer(dmfa_incomplete=str(tmp_path / "{dataset}_incomplete{mask_suffix}.pt"))
    atomic_save({"model": model.state_dict(), "meta": {"model": model.config}}, tmp_path / "mnist_incomplete_noise.pt")
    assert per_kind.resolve(per_kind.dmfa_incomplete, "mnist", "trapezoid") == tmp_path / "mnist_incomplete_trapezoid.pt"
    assert per_kind.resolve(per_kind.dmfa_incomplete, "mnist") == tmp_path / "mnist_incomplete.pt"
    assert imputers.method_available("dmfa_mean_incomplete", per_kind, "mnist", "noise") is None
    why = imputers.method_available("dmfa_mean_incomplete", per_kind, "mnist", "trapezoid")
    assert "mnist_incomplete_trapezoid.pt does not exist" in why
    why = imputers.method_available("dmfa_mean_incomplete", per_kind, "mnist", "square")
    assert "mnist_incomplete.pt does not exist" in why
    tr, te, _ = METHODS["dmfa_misconv_complete"].prepare(d, cfg)
    mfa = te.get(torch.tensor([1, 2]), imgs[9:11], miss[9:11])
    ref = model.eval()(imgs[9:11], miss[9:11])
    torch.testing.assert_close(mfa.means, ref.means, atol=2e-3, rtol=2e-3)
    trm, tem, _ = METHODS["dmfa_mean_complete"].prepare(d, cfg)
    m = miss[9:11].expand(-1, 1, -1, -1)
    torch.testing.assert_close(tem.images[1:3][m], ref.mean()[m], atol=2e-3, rtol=2e-3)


def _imputer(**settings) -> imputers.ImputerSettings:
    """The preparers' settings of a classification config with ``settings`` (on the CPU, quiet)."""
    return imputer_settings(ClassificationConfig(device="cpu", **settings), progress=False)


def _config(tmp_path, masks=("square",), methods=("zero",), seeds=(0,), **settings) -> ClassificationConfig:
    """A small sweep's config writing into ``tmp_path``."""
    return ClassificationConfig(profile="t", results_dir=str(tmp_path), masks=list(masks), methods=list(methods),
                                seeds=list(seeds), **{"n_train": 60, "n_test": 20, **settings})


def _fake_runner(calls):
    def run(cell, cfg):
        dataset, mask, method, seed = (cell.coords[k] for k in ("dataset", "mask", "method", "seed"))
        calls.append((dataset, mask, method, seed))
        return {"metrics": {"accuracy": 0.5 + 0.01 * seed}, "details": {"wall_seconds": 0.0}}
    return run


def test_sweep_skips_finished_cells_and_orders_seeds_outermost(tmp_path):
    calls = []
    cfg = _config(tmp_path, ["square", "noise"], ["zero", "pc"], [0, 1])
    kw = dict(_run_cell=_fake_runner(calls), progress=False)
    df = clf.run(cfg, max_cells=3, **kw)
    assert len(df) == 3 and len(calls) == 3
    assert calls == [("mnist", "square", "zero", 0), ("mnist", "square", "pc", 0), ("mnist", "noise", "zero", 0)]
    df = clf.run(cfg, **kw)   # "after a kill"
    assert len(calls) == 8 and len(set(calls)) == 8 and len(df) == 8
    assert list(df.columns)[:len(ACCURACY_COLUMNS)] == ACCURACY_COLUMNS
    clf.run(cfg, **kw)
    assert len(calls) == 8  # nothing recomputed
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 8


def test_sweep_runs_unavailable_methods_when_their_checkpoint_appears(tmp_path):
    calls = []
    ck = tmp_path / "dmfa_{dataset}.pt"
    cfg = _config(tmp_path, ["square"], ["zero", "dmfa_misconv_complete"], [0, 1], dmfa_complete=str(ck))
    clf.run(cfg, _run_cell=_fake_runner(calls), progress=False)
    assert [c[2] for c in calls] == ["zero", "zero"]
    (tmp_path / "dmfa_mnist.pt").write_bytes(b"x")
    clf.run(cfg, _run_cell=_fake_runner(calls), progress=False)
    assert [c[2:] for c in calls[2:]] == [("dmfa_misconv_complete", 0), ("dmfa_misconv_complete", 1)]


def test_sweep_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="(?s)methods.*item 'misconv'"):
        _config(tmp_path, methods=["misconv"])
    with pytest.raises(ValueError, match="(?s)masks.*item 'circle'"):
        _config(tmp_path, masks=["circle"])
    with pytest.raises(ValueError, match="unknown setting 'epoch'.*did you mean 'epochs'"):
        _config(tmp_path).replace(epoch=3)
    assert not (tmp_path / "accuracy.csv").exists()


class _Stop(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    d = _tiny_data()
    torch.manual_seed(0)
    ref = build_classifier("mnist", "zero", image_size=12)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    kw = dict(epochs=2, batch_size=8, lr=1e-3, seed=3, progress=False, device="cpu", select="last")
    train_classifier(ref, d, imputers.AuxSource(), checkpoint=tmp_path / "a.pt", **kw)

    model = build_classifier("mnist", "zero", image_size=12)
    model.load_state_dict(init)
    calls = {"n": 0}
    orig = models_clf.F.cross_entropy

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6 + 2:   # during epoch 2 (5 batches per epoch)
            raise _Stop
        return orig(*a, **k)

    models_clf.F.cross_entropy = flaky
    try:
        with pytest.raises(_Stop):
            train_classifier(model, d, imputers.AuxSource(), checkpoint=tmp_path / "b.pt", **kw)
    finally:
        models_clf.F.cross_entropy = orig
    model2 = build_classifier("mnist", "zero", image_size=12)   # a fresh process would rebuild the model
    hist, _ = train_classifier(model2, d, imputers.AuxSource(), checkpoint=tmp_path / "b.pt", **kw)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[k], v)


def test_real_cell_end_to_end_tiny(tmp_path, monkeypatch):
    """A real (tiny) cell: NaN at missing pixels everywhere, a CSV row and a runs.jsonl record."""
    d = _tiny_data()
    monkeypatch.setattr(clf, "load_cell_data", lambda *a, **k: d)
    cfg = _config(tmp_path, methods=["zero", "mfa_misconv"], cache_dir=str(tmp_path / "c"), epochs=1, batch_size=8,
                  mfa_components=2, mfa_factors=2, mfa_iterations=2, device="cpu")
    monkeypatch.setattr(clf, "build_classifier", lambda arch, m, **k: build_classifier(arch, m, in_channels=1,
                                                                                        image_size=12))
    clf._PLAN_DATA.clear()                  # the plan's fingerprints: of the tiny data too
    df = clf.run(cfg, progress=False)
    assert set(df["method"]) == {"zero", "mfa_misconv"}
    assert ((df["accuracy"] >= 0) & (df["accuracy"] <= 1)).all()
    assert ((df["accuracy_last"] >= 0) & (df["accuracy_last"] <= 1)).all()
    rec = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert {"batch_size", "lr", "wall_seconds", "machine", "epoch_selected", "key"} <= set(rec[0])
    assert all(r["n_train"] == 40 for r in rec)
    assert not list((tmp_path / "c" / "runs").rglob("*.pt"))   # checkpoints deleted after the row


def test_pivot_table_mean_std_and_paper_columns():
    df = pd.DataFrame([
        {"dataset": "mnist", "mask": "square", "method": "zero", "seed": s, "accuracy": a, "n_train": 1,
         "n_test": 1, "epochs": 1} for s, a in enumerate([0.90, 0.92, 0.94])
    ] + [{"dataset": "mnist", "mask": "square", "method": "dmfa_misconv_complete", "seed": 0, "accuracy": 0.95,
          "n_train": 1, "n_test": 1, "epochs": 1}])
    piv = pivot_table(df)
    assert piv.loc["zero", "square"] == f"0.920 ± {np.std([0.90, 0.92, 0.94], ddof=1):.3f} (n=3)"
    assert piv.loc["zero", "paper square"] == "0.910"
    assert piv.loc["dmfa_misconv_complete", "square"] == "0.950 (n=1)"
    md = table_markdown(df)
    assert "**0.950 (n=1)**" in md and md.count("\n") == 3


def test_cifar10_pivot_shows_the_authors_logs_and_not_the_mnist_paper():
    rows = [("zero", 0, 0.42), ("zero", 1, 0.44), ("knn", 0, 0.46), ("gt", 0, 0.54)]
    df = pd.DataFrame([{"dataset": "cifar10", "mask": "square", "method": m, "seed": s, "accuracy": a}
                       for m, s, a in rows])
    piv = pivot_table(df)
    assert "paper square" not in piv.columns and "authors' code, square" not in piv.columns
    assert piv.loc["zero", "authors' log, square"] == "0.7580 / 0.7482"      # their two zero runs
    assert piv.loc["gt", "authors' log, square"] == "0.8590"
    assert piv.loc["knn", "authors' log, square"] == ""                       # not in their logs
    mnist = pivot_table(df.assign(dataset="mnist"))
    assert "authors' log, square" not in mnist.columns and mnist.loc["zero", "paper square"] == "0.910"


def test_update_markdown_table_replaces_only_between_markers(tmp_path):
    df = pd.DataFrame([{"dataset": "mnist", "mask": "noise", "method": "pc", "seed": 0, "accuracy": 0.8,
                        "n_train": 1, "n_test": 1, "epochs": 1}])
    md = tmp_path / "r.md"
    md.write_text("before\n<!-- classification-table:start -->\nold\n<!-- classification-table:end -->\nafter\n")
    assert clf.update_markdown_table(md, df)
    text = md.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| pc | **0.800 (n=1)** | 0.804 |" in text
    assert not clf.update_markdown_table(md, df)          # unchanged the second time
    (tmp_path / "bad.md").write_text("no markers")
    with pytest.raises(ValueError, match="lacks the markers"):
        clf.update_markdown_table(tmp_path / "bad.md", df)


def test_imputation_quality_reports_errors_and_nll(tmp_path, monkeypatch):
    from labkit.studies import classification_diagnostics as diag

    d = _tiny_data()
    monkeypatch.setattr(diag, "load_cell_data", lambda *a, **k: d)
    cfg = ClassificationConfig(cache_dir=str(tmp_path), mfa_components=2, mfa_factors=2, mfa_iterations=3,
                               dmfa_complete=str(tmp_path / "no_such_dmfa.pt"), device="cpu")
    q = diag.imputation_quality("mnist", "square", 0, ["zero", "mfa_mean", "mfa_misconv", "dmfa_mean_complete"],
                                cfg, n=10, progress=False)
    assert list(q.index) == ["zero", "mfa_mean", "mfa_misconv"]   # the DMFA has no checkpoint here
    hole = d.test_missing[:10].expand_as(d.test_images[:10])
    zero_sse = float((d.test_images[:10] ** 2)[hole].sum() / 10)
    assert q.loc["zero", "sse"] == pytest.approx(zero_sse, rel=1e-5)
    # the conditional mean of mfa_misconv's MFA is the mfa_mean imputation
    assert q.loc["mfa_misconv", "sse"] == pytest.approx(q.loc["mfa_mean", "sse"], rel=1e-2)
    assert np.isfinite(q.loc["mfa_misconv", "nll"]) and q.loc["mfa_misconv", "pred_std"] > 0


def test_diagnostics_write_the_tables_keep_other_masks_and_fill_the_doc_block(tmp_path, monkeypatch):
    from labkit.studies import classification_diagnostics as diag

    monkeypatch.setattr(diag, "load_cell_data", lambda dataset, mask, seed, **k: _tiny_data(mask=mask, seed=seed))
    cfg = ClassificationConfig(profile="t", results_dir=str(tmp_path / "res"), cache_dir=str(tmp_path / "cache"),
                               masks=["square", "noise"], seeds=[3, 0], mfa_components=2, mfa_factors=2,
                               mfa_iterations=3, dmfa_complete=str(tmp_path / "none.pt"), device="cpu")
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- imputation-quality:start -->\nold\n<!-- imputation-quality:end -->\nafter\n")
    written = clf.diagnostics(cfg, n=10, methods=["knn", "mfa_misconv", "dmfa_misconv_complete"], doc=doc,
                              progress=False)
    res = tmp_path / "res"
    # no complete-data DMFA here: its method is skipped and the MisConv-against-mean-fill table is not written
    assert written == [res / "imputation_quality.csv", res / "mask_coverage.csv", res / "imputation_quality.json", doc]
    table = pd.read_csv(res / "imputation_quality.csv")
    assert list(zip(table["mask"], table["method"])) == [(m, k) for m in ("square", "noise")
                                                         for k in ("knn", "mfa_misconv")]
    assert (table["seed"] == 3).all() and (table["n_test_images"] == 10).all()      # the first seed of the grid
    mfa = table[table["method"] == "mfa_misconv"]
    assert np.allclose(mfa["rmse"], (mfa["sse"] / mfa["missing_pixels"]) ** 0.5, atol=2e-4) and mfa["nll"].notna().all()
    assert list(pd.read_csv(res / "mask_coverage.csv")["mask"]) == ["square", "noise"]
    text = doc.read_text()
    assert "old" not in text and "| noise (" in text and "| classical MFA (K = 4, L = 4) |" in text
    assert text.startswith("before\n") and text.endswith("after\n")
    # one mask again: its rows are replaced, the other mask's stay
    again = clf.diagnostics(cfg.replace(masks=["noise"]), seed=0, n=10, methods=["knn"], progress=False)
    table = pd.read_csv(res / "imputation_quality.csv")
    assert list(zip(table["mask"], table["method"], table["seed"])) == [
        ("square", "knn", 3), ("square", "mfa_misconv", 3), ("noise", "knn", 0)]
    assert doc not in again
    # --table-only: the recorded table into the doc, nothing computed
    monkeypatch.setattr(diag, "imputation_quality", lambda *a, **k: pytest.fail("computed with table_only"))
    doc.write_text("<!-- imputation-quality:start -->\n<!-- imputation-quality:end -->\n")
    assert clf.diagnostics(cfg, table_only=True, doc=doc) == [doc]
    assert "| noise (" in doc.read_text() and "seed 3" in doc.read_text()


def test_none_hyperparameters_are_the_papers_for_the_data_set(tmp_path):
    cfg = ClassificationConfig.build("quick", {"epochs": None, "masks": ["noise"]})
    assert cfg.epochs is None and clf.effective(cfg).epochs == 10 and clf.effective(cfg).batch_size == 24
    cifar = clf.effective(cfg.replace(dataset="cifar10", batch_size=None, lr=None))
    assert (cifar.epochs, cifar.batch_size, cifar.lr) == (35, 64, 1e-4)
    assert clf.effective(cfg.replace(epochs=3)).epochs == 3                    # a value given stays
    # the keys carry the paper's values, so None and the values written out are the same cells
    assert clf.cell_settings(cfg, "zero") == clf.cell_settings(cfg.replace(epochs=10), "zero")
    calls = []
    clf.run(_config(tmp_path, epochs=None), _run_cell=lambda cell, cfg: calls.append(cfg.epochs) or
            {"metrics": {"accuracy": 0.5}}, progress=False)
    assert calls == [10] and list(clf.read_results(tmp_path)["epochs"]) == [10]
    with pytest.raises(ValueError, match="unknown setting 'epochz'"):
        ClassificationConfig.build("quick", {"epochz": 3})


@pytest.mark.slow
def test_notebook_02_smoke(tmp_path):
    """Papermill run of notebook 02 on the offline MNIST copy: two methods, one mask, one epoch."""
    import nbformat

    try:
        from labkit.lab.run_notebooks import execute
    except ImportError:  # before labkit/lab/ existed
        from labkit.run_notebooks import execute

    out = execute("02_classification", "quick", output_dir=tmp_path, masks=["square"], methods=["zero", "pc"],
                  epochs=1, seeds=[0], n_train=300, n_test=100, results_dir=str(tmp_path / "res"),
                  device="cpu")
    df = clf.read_results(tmp_path / "res" / "accuracy.csv")
    assert sorted(df["method"]) == ["pc", "zero"] and (df["n_test"] == 100).all()
    assert (tmp_path / "res" / "accuracy.png").exists()
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    shown = "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "paper square" in shown                       # Table 1, shown once, as Markdown


def test_paired_differences_by_hand():
    import pandas as pd

    rows = [("square", "misconv", 0, 0.90), ("square", "mean", 0, 0.88), ("square", "misconv", 1, 0.91),
            ("square", "mean", 1, 0.92), ("square", "misconv", 2, 0.95),          # seed 2: no baseline
            ("noise", "misconv", 0, 0.80), ("noise", "mean", 0, 0.70)]
    df = pd.DataFrame([{"dataset": "mnist", "mask": m, "method": k, "seed": s, "accuracy": a} for m, k, s, a in rows])
    out = clf.paired_differences(df, "misconv", "mean")
    sq = out.loc[("mnist", "square")]
    assert sq["n"] == 2 and sq["seeds"] == [0.02, -0.01]
    assert sq["mean"] == pytest.approx(0.005) and sq["std"] == pytest.approx((2 * 0.015 ** 2) ** 0.5)
    no = out.loc[("mnist", "noise")]
    assert no["n"] == 1 and no["mean"] == pytest.approx(0.10) and math.isnan(no["std"])
    with pytest.raises(ValueError, match="no results for method 'knn'"):
        clf.paired_differences(df, "knn", "mean")


def test_paired_markdown_and_marked_blocks(tmp_path):
    import pandas as pd

    rows = [("square", "dmfa_misconv_complete", 0, 0.90), ("square", "dmfa_mean_complete", 0, 0.88),
            ("square", "dmfa_misconv_complete", 1, 0.91), ("square", "dmfa_mean_complete", 1, 0.92),
            ("noise", "dmfa_misconv_complete", 0, 0.80), ("noise", "dmfa_mean_complete", 0, 0.70)]
    df = pd.DataFrame([{"dataset": "mnist", "mask": m, "method": k, "seed": s, "accuracy": a} for m, k, s, a in rows])
    md = clf.paired_markdown(df)
    lines = md.splitlines()
    assert lines[0].startswith("| method − other method | mask | seeds | per seed | mean ± 95 % CI over seeds (t) |")
    assert len(lines) == 4                                   # only the pair with results: one row per mask
    # square: +2 and -1 points; half-width t(0.975, 1) = 12.706 × sd 2.121 / sqrt 2 = 19.06; t = 0.333, p = 0.795
    assert lines[2] == ("| `dmfa_misconv_complete` − `dmfa_mean_complete` | square | 2 | +2.00, -1.00 | +0.50 ± 19.06 | "
                        "0.795 | – | – | no difference resolved |")
    assert "| noise | 1 | +10.00 | +10.00 (one seed: no interval) |" in lines[3]
    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- x:start -->\nold\n<!-- x:end -->\nrest\n")
    assert replace_marked_block(doc, "x", md)
    assert doc.read_text() == f"intro\n<!-- x:start -->\n{md}\n<!-- x:end -->\nrest\n"
    assert not replace_marked_block(doc, "x", md)        # unchanged: no write
    with pytest.raises(ValueError, match="lacks the markers"):
        replace_marked_block(doc, "y", md)


def test_sweep_with_a_cell_held_by_another_copy_does_not_end_quietly(tmp_path):
    """The same sweep started twice splits its cells by claims. A cell the other copy still holds
    at the end is tried once more (a dead copy releases its claims) and otherwise named as not
    finished, with a non-zero exit (SweepIncomplete), never a quiet success."""
    from contextlib import ExitStack

    from labkit.studies.engine import SweepIncomplete

    cfg = _config(tmp_path, methods=["zero", "pc"])
    held = [c for c in clf.plan(cfg) if c.coords["method"] == "pc"][0]
    store = clf.result_store(tmp_path)
    calls = []
    with ExitStack() as other:                                   # "the other copy", alive, never recording
        assert other.enter_context(store.claim(held.key)) is True
        with pytest.raises(SweepIncomplete, match="not finished") as info:
            clf.run(cfg, _run_cell=_fake_runner(calls), progress=False)
    assert [o.cell.key for o in info.value.unfinished] == [held.key]
    assert [c[2] for c in calls] == ["zero"]

    class DiesMidway:                                            # the other copy dies before the end
        def __init__(self):
            self.stack = ExitStack()
            assert self.stack.enter_context(store.claim(held.key)) is True

        def __call__(self, cell, cfg):
            if cell.key != held.key:
                self.stack.close()                               # its claim goes with it
            return _fake_runner(calls)(cell, cfg)

    calls.clear()
    cfg = _config(tmp_path / "b", methods=["pc", "zero"])
    store = clf.result_store(tmp_path / "b")
    clf.run(cfg, _run_cell=DiesMidway(), progress=False)
    assert [c[2] for c in calls] == ["zero", "pc"]               # pc: held when its turn came, run on the retry
    assert set(clf.read_results(tmp_path / "b" / "accuracy.csv")["method"]) == {"zero", "pc"}


def test_a_data_set_that_cannot_be_loaded_fails_its_cells_by_name(tmp_path, monkeypatch):
    """A data set that cannot be loaded fails its cells, named, when the sweep ends (exit 1), not
    with a traceback while planning; another data set's sweep into the same folder runs."""
    from labkit.studies.engine import SweepFailed

    real = clf.load_cell_data

    def load(dataset, *a, **k):
        if dataset == "svhn":
            raise FileNotFoundError("SVHN (train) not found: put train_32x32.mat in data/svhn")
        return real(dataset, *a, **k)

    monkeypatch.setattr(clf, "load_cell_data", load)
    clf._PLAN_DATA.clear()
    calls = []
    with pytest.raises(SweepFailed, match=r"(?s)svhn/square/zero/s0.*train_32x32\.mat.*svhn/square/pc/s0") as info:
        clf.run(_config(tmp_path, methods=["zero", "pc"], dataset="svhn"), _run_cell=_fake_runner(calls),
                progress=False)
    assert calls == [] and [o.cell.coords["method"] for o in info.value.failed] == ["zero", "pc"]
    clf.run(_config(tmp_path), _run_cell=_fake_runner(calls), progress=False)
    assert [c[0] for c in calls] == ["mnist"]


def test_dmfa_replicates_give_square_cells_their_seed_groups_dmfa(tmp_path):
    """dmfa_replicates=3: square-mask cells of seed s read DMFA seed s % 3 (the original file for 0,
    "_s1"/"_s2" for the others); other mask kinds keep their one DMFA; the default (1) is the
    original file for every seed, as the committed cells had it."""
    t = str(tmp_path / "{dataset}_incomplete{mask_suffix}{replicate}.pt")
    one, three = _imputer(), _imputer(dmfa_replicates=3)
    names = [three.resolve(t, "mnist", "square", s).name for s in range(10)]
    assert names == ["mnist_incomplete.pt", "mnist_incomplete_s1.pt", "mnist_incomplete_s2.pt"] * 3 + \
        ["mnist_incomplete.pt"]
    assert {three.resolve(t, "mnist", "noise", s).name for s in range(10)} == {"mnist_incomplete_noise.pt"}
    assert {one.resolve(t, "mnist", "square", s).name for s in range(10)} == {"mnist_incomplete.pt"}
    for r in ("", "_s1", "_s2"):
        (tmp_path / f"mnist_complete{r}.pt").write_bytes(r.encode() or b"0")
    cfg = _config(tmp_path, ["square", "noise"], ["dmfa_mean_complete"], [0, 1, 3], dmfa_replicates=3,
                  dmfa_complete=str(tmp_path / "{dataset}_complete{replicate}.pt"))
    cells = clf.plan(cfg)
    sha = {(c.coords["mask"], c.coords["seed"]): c.inputs["dmfa"]["sha"] for c in cells}
    assert sha[("square", 0)] == sha[("square", 3)] != sha[("square", 1)]
    assert sha[("noise", 0)] == sha[("noise", 1)] == sha[("noise", 3)] == sha[("square", 0)]


def test_write_report_writes_the_tables_the_figure_and_the_marked_blocks(tmp_path):
    cfg = _config(tmp_path, methods=["dmfa_misconv_complete", "dmfa_mean_complete"], seeds=[0, 1],
                  dmfa_complete=str(tmp_path / "dmfa.pt"))
    (tmp_path / "dmfa.pt").write_bytes(b"a stand-in: the fake runner never reads it")
    calls = []
    clf.run(cfg, _run_cell=_fake_runner(calls), progress=False)
    rows = clf.read_rows(cfg, clf.plan(cfg))
    assert len(rows) == 4 and clf.write_report(cfg, rows.iloc[:0]) == []
    doc = tmp_path / "doc.md"
    doc.write_text("x\n<!-- clf-table:start -->\n<!-- clf-table:end -->\n<!-- clf-paired:start -->\n"
                   "<!-- clf-paired:end -->\n")
    written = clf.write_report(cfg, rows, doc=doc, marker="clf", stem="acc")
    assert [p.name for p in written] == ["acc.md", "acc_paired.md", "acc.png", "acc_paired.png", "doc.md"]
    assert all(p.is_file() for p in written) and written[0].parent == tmp_path
    text = doc.read_text()
    assert "| dmfa_misconv_complete |" in text and "`dmfa_misconv_complete` − `dmfa_mean_complete`" in text


def test_write_report_beside_another_budget_adds_its_pairs_curves_and_block(tmp_path):
    """With ``beside``: the budgets table, the training curves (where histories exist) and the
    paired table holds the budget pairs too (DMFA mean over the incomplete-data DMFA − zero is not
    one of the Table-1 pairs); without it, neither."""
    def rows_of(folder, epochs, n):
        cfg = _config(folder, methods=["zero", "dmfa_mean_incomplete"], seeds=[0, 1],
                      dmfa_incomplete=str(tmp_path / "dmfa.pt"))

        def run(cell, cfg):
            seed, meth = cell.coords["seed"], cell.coords["method"]
            acc = 0.5 + 0.01 * seed + (0.02 if meth != "zero" else 0.0)
            return {"metrics": {"accuracy": acc},
                    "details": {"n_train": n, "history": [{"epoch": e, "val_accuracy": acc} for e in range(epochs)]}}
        clf.run(cfg, _run_cell=run, progress=False)
        return cfg, clf.read_rows(cfg, clf.plan(cfg))

    (tmp_path / "dmfa.pt").write_bytes(b"a stand-in: the runner never reads it")
    _, small = rows_of(tmp_path / "small", 2, 100)
    cfg, full = rows_of(tmp_path / "full", 4, 1000)
    assert full["history"].map(len).tolist() == [4, 4, 4, 4] and set(full["images_per_epoch"]) == {1000}
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- b-table:start -->\n<!-- b-table:end -->\n<!-- b-paired:start -->\n<!-- b-paired:end -->\n"
                   "<!-- b-budgets:start -->\n<!-- b-budgets:end -->\n")
    names = [p.name for p in clf.write_report(cfg, full, doc=doc, marker="b", beside=("small", small))]
    assert {"accuracy_budgets.md", "accuracy_budgets.png"} <= set(names)
    pair = "| `dmfa_mean_incomplete` − `zero` | square | 2 | +2.00, +2.00 |"
    assert pair in (tmp_path / "full" / "accuracy_paired.md").read_text()
    text = doc.read_text()
    assert pair in text and "| `dmfa_mean_incomplete` − `zero` | +2.00 ± 0.00 (n=2" in text
    names = [p.name for p in clf.write_report(cfg, full)]
    assert "accuracy_budgets.md" not in names and pair not in (tmp_path / "full" / "accuracy_paired.md").read_text()


def test_seeds_markdown_gives_each_cells_own_accuracy_with_its_last_epoch():
    """Per seed, the validation-picked accuracy with the last epoch's in brackets, a dash for a
    seed without a row, methods in the table order (zero before the DMFA fronts) and a mask column
    only where there are several; the expected lines are written out by hand."""
    import pandas as pd

    from labkit.studies.classification_tables import seeds_markdown

    df = pd.DataFrame([("dmfa_mean_incomplete", "square", 1, 0.6651, 0.6664),
                       ("zero", "square", 0, 0.6562, 0.6565), ("zero", "square", 1, 0.6428, 0.6428),
                       ("dmfa_mean_incomplete", "square", 0, 0.6631, 0.6704)],
                      columns=["method", "mask", "seed", "accuracy", "accuracy_last"])
    assert seeds_markdown(df).splitlines() == [
        "| method | seed 0 | seed 1 |", "|---|---|---|",
        "| zero | 0.6562 (0.6565) | 0.6428 (0.6428) |",
        "| dmfa_mean_incomplete | 0.6631 (0.6704) | 0.6651 (0.6664) |"]
    two = pd.concat([df.iloc[:2], pd.DataFrame([("zero", "noise", 1, 0.9, float("nan"))], columns=df.columns)])
    assert seeds_markdown(two).splitlines()[2:] == [
        "| zero | square | 0.6562 (0.6565) | – |", "| zero | noise | – | 0.9000 |",
        "| dmfa_mean_incomplete | square | – | 0.6651 (0.6664) |"]
    assert seeds_markdown(df.iloc[:0]) == "(no results yet)"


def test_write_report_fills_the_seeds_block_where_the_doc_has_one(tmp_path):
    cfg = _config(tmp_path, methods=["zero", "pc"], seeds=[0, 1])
    clf.run(cfg, _run_cell=_fake_runner([]), progress=False)
    rows = clf.read_rows(cfg, clf.plan(cfg))
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- s-table:start -->\n<!-- s-table:end -->\n<!-- s-seeds:start -->\n<!-- s-seeds:end -->\n")
    clf.write_report(cfg, rows, doc=doc, marker="s")
    block = doc.read_text().split("<!-- s-seeds:start -->\n")[1].split("\n<!-- s-seeds:end -->")[0]
    assert block.splitlines() == ["| method | seed 0 | seed 1 |", "|---|---|---|",
                                  "| zero | 0.5000 | 0.5100 |", "| pc | 0.5000 | 0.5100 |"]
