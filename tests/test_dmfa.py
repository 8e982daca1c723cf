"""labkit.models.dmfa / dmfa_training: DMFA architectures, training (complete / incomplete data, resumable),
evaluation; the density study's tables and runners (labkit.studies.density)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from labkit.masks import square
from labkit.mfa import fit_mfa
from labkit.models import dmfa as dm
from labkit.models import dmfa_training as dmt
from labkit.models.dmfa import (
    ClassicalMFAImputer,
    FullyConvDMFA,
    LinearHeadsDMFA,
    build_dmfa,
    evaluate_dmfa,
    incomplete_masks,
    predict_mfa,
    test_masks,
)
from labkit.models.dmfa_training import dmfa_loss, train_dmfa
from labkit.studies.configs import DensityConfig
from labkit.studies.density import csv_digest, density_table, run_experiment
from tests.conftest import dmfa_recipe


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread. Two OpenMP threads on a busy 2-core machine spin-wait
    for each other and make a 12x12 convolution ~100x slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g)


def _holes(n, h, w, side, seed=1):
    return square(n, h, w, side=side, generator=torch.Generator().manual_seed(seed), device="cpu")


# ----------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "svhn", "cifar10", "celeba"])
def test_forward_shapes_finite_and_blind_to_missing_values(dataset):
    torch.manual_seed(0)
    model = build_dmfa(dataset).eval()
    C, H, W = dm.DATASET_SHAPES[dataset]
    assert model.image_shape == (C, H, W)
    x = _images(2, (C, H, W))
    miss = _holes(2, H, W, H // 2)
    x_nan = torch.where(miss, torch.tensor(float("nan")), x)
    x_big = torch.where(miss, torch.tensor(1e6), x)
    with torch.no_grad():
        out = model(x_nan, miss, validate=True)   # validate: finite, positive variances, weights sum to 1
        other = model(x_big, miss)
    assert out.weights.shape == (2, 1)
    assert out.means.shape == (2, 1, C, H, W)
    assert out.factors.shape == (2, 1, 4, C, H, W)
    assert out.variances.shape == (2, 1, C, H, W)
    # values at missing pixels do not matter at all: bit-identical MFAs
    for f in ("weights", "means", "factors", "variances"):
        assert torch.equal(getattr(out, f), getattr(other, f)), f
    # the log-density of the hidden pixels is finite
    assert torch.isfinite(out.log_prob(x, miss)).all()


def test_architectures_match_the_supplementary():
    mnist, svhn, celeba = build_dmfa("mnist"), build_dmfa("svhn"), build_dmfa("celeba")
    assert isinstance(mnist, LinearHeadsDMFA)
    convs = [m.out_channels for m in mnist.extractor if isinstance(m, torch.nn.Conv2d)]
    assert convs == [16, 32, 64, 32]
    assert isinstance(svhn, FullyConvDMFA) and svhn.layout == "small"
    assert isinstance(celeba, FullyConvDMFA) and celeba.layout == "large"

    def widths(model):
        return [m.out_channels for m in model.extractor if type(m) is torch.nn.Conv2d and m.stride == (1, 1)]
    assert widths(svhn) == [32] * 2 + [64] * 2 + [128] * 4 + [64] * 2 + [32] * 2
    assert widths(celeba) == [32] * 4 + [64] * 3 + [128] * 8 + [64] * 4 + [32] * 4
    n_small = sum(p.numel() for p in svhn.parameters())
    n_large = sum(p.numel() for p in celeba.parameters())
    assert 1.5 < n_large / n_small < 2.5       # "about twice as large"
    assert build_dmfa("cifar10").image_shape == (3, 32, 32)


def test_mnist_checkpoint_is_at_most_32_megabytes(tmp_path):
    model = build_dmfa("mnist")
    path = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "meta": {}}, path)
    assert path.stat().st_size <= 32e6
    # and far smaller than the authors' ~118 M parameter network
    assert sum(p.numel() for p in model.parameters()) < 118e6 / 10


@pytest.mark.parametrize("model", [
    LinearHeadsDMFA((1, 12, 12), n_components=3, n_factors=2),
    FullyConvDMFA((3, 8, 8), n_components=2, n_factors=3),
])
def test_several_components_validate_and_respect_bounds(model):
    torch.manual_seed(0)
    C, H, W = model.image_shape
    # extreme raw outputs (±1e4): the parameterisation must still give bounded, valid MFAs
    raw = model.raw
    model.raw = lambda inputs: tuple(t * 1e4 for t in raw(inputs))
    model.eval()
    x = _images(4, (C, H, W))
    miss = _holes(4, H, W, H // 2)
    with torch.no_grad():
        out = model(x, miss, validate=True)
    assert out.n_components == model.n_components and out.n_factors == model.n_factors
    assert torch.allclose(out.weights.sum(1), torch.ones(4))
    assert out.factors.abs().max() <= model.factor_scale
    assert out.variances.min() >= model.min_variance
    assert model.factor_scale == (0.25 if C == 1 else 0.1)


def test_per_channel_missing_masks_are_accepted():
    model = FullyConvDMFA((3, 8, 8), n_factors=1).eval()
    x = _images(2, (3, 8, 8))
    miss = torch.zeros(2, 3, 8, 8, dtype=torch.bool)
    miss[:, 1, :4] = True
    with torch.no_grad():
        a = model(torch.where(miss, torch.tensor(float("nan")), x), miss, validate=True)
    assert torch.isfinite(a.means).all()


def test_bad_inputs_raise_with_the_argument_named():
    model = build_dmfa("mnist")
    x = torch.rand(2, 1, 28, 28)
    miss = torch.zeros(2, 1, 28, 28, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 28, 28\).*\(2, 3, 28, 28\)"):
        model(torch.rand(2, 3, 28, 28), miss)
    with pytest.raises(TypeError, match="missing must be a bool tensor"):
        model(x, miss.float())
    with pytest.raises(ValueError, match="missing has shape"):
        model(x, miss[:1])
    with pytest.raises(TypeError, match="x must be a floating-point"):
        model(x.long(), miss)
    with pytest.raises(ValueError, match="unknown data set 'imagenet'; valid names: mnist, fashion-mnist"):
        build_dmfa("imagenet")
    with pytest.raises(ValueError, match="n_components must be >= 1"):
        build_dmfa("mnist", n_components=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        LinearHeadsDMFA((1, 10, 10))
    with pytest.raises(ValueError, match="mode must be 'complete' or 'incomplete'"):
        train_dmfa(model, x, dmfa_recipe(epochs=1, batch_size=2, lr=1e-3), mode="partial", progress=False)
    with pytest.raises(ValueError, match=r"images must have images of shape \(1, 28, 28\)"):
        train_dmfa(model, torch.rand(2, 1, 8, 8), dmfa_recipe(epochs=1, batch_size=2, lr=1e-3), progress=False)
    with pytest.raises(ValueError, match="hole must be <= 28"):
        train_dmfa(model, x, dmfa_recipe(epochs=1, batch_size=2, lr=1e-3), hole=30, progress=False)
    with pytest.raises(ValueError, match="missing is only used with mode='incomplete'"):
        train_dmfa(model, x, dmfa_recipe(epochs=1, batch_size=2, lr=1e-3), missing=miss, progress=False)


# ----------------------------------------------------------------------------------- loss
def test_loss_is_per_image_nll_of_supervised_pixels_plus_optional_mse(make_mfa):
    mfa = make_mfa(B=3, K=2, L=2, C=1, H=5, W=5, dtype=torch.float32)
    x = torch.rand(3, 1, 5, 5)
    sup = _holes(3, 5, 5, 2)
    x_nan = torch.where(sup, x, torch.tensor(float("nan")))       # NaN outside the supervised set
    loss, metrics = dmfa_loss(mfa, x_nan, sup)
    expected = -mfa.log_prob(x, sup).mean()
    assert torch.allclose(loss, expected)
    mean = mfa.mean()
    sse = ((mean - x) ** 2 * sup).sum(dim=(1, 2, 3))
    loss_mse, m2 = dmfa_loss(mfa, x_nan, sup, mse_weight=1.0)
    assert torch.allclose(loss_mse, expected + sse.mean())
    assert torch.allclose(m2["sse"], sse.mean())
    assert torch.allclose(metrics["nll_px"], -mfa.log_prob(x, sup).sum() / sup.sum())


# ----------------------------------------------------------------------------------- training
def _tiny_model(seed=0, K=1):
    torch.manual_seed(seed)
    return LinearHeadsDMFA((1, 12, 12), n_components=K, n_factors=2)


class Interrupted(Exception):
    pass


def test_interrupted_training_resumes_to_identical_weights(tmp_path, monkeypatch):
    images = _images(40, (1, 12, 12))
    recipe = dmfa_recipe(epochs=3, batch_size=8, lr=1e-3, mse_warmup_epochs=1, lr_milestones=(2,), lr_gamma=0.5)
    kw = dict(mode="incomplete", hole=6, seed=3, progress=False, device="cpu")
    reference = _tiny_model(K=2)
    ref_history = train_dmfa(reference, images, recipe, checkpoint=tmp_path / "ref.pt", **kw)

    model = _tiny_model(K=2)
    calls = {"n": 0}
    original = dmt._step_loss

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5 + 3:            # epoch 1 (0-based), batch 3 of 5
            raise Interrupted("simulated Ctrl-C mid-epoch")
        return original(*args, **kwargs)

    monkeypatch.setattr(dmt, "_step_loss", failing)
    with pytest.raises(Interrupted):
        train_dmfa(model, images, recipe, checkpoint=tmp_path / "run.pt", **kw)
    monkeypatch.setattr(dmt, "_step_loss", original)

    resumed = _tiny_model(seed=99, K=2)   # a fresh process would build different initial weights
    history = train_dmfa(resumed, images, recipe, checkpoint=tmp_path / "run.pt", **kw)
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["nll"] for h in history] == [h["nll"] for h in ref_history]
    assert [h["batch_nll"] for h in history] == [h["batch_nll"] for h in ref_history]
    assert [h["lr"] for h in history] == [1e-3, 1e-3, 5e-4]
    # MSE warm-up only in epoch 0
    assert history[0]["loss"] > history[0]["nll"] and history[1]["loss"] == history[1]["nll"]


def test_incomplete_mode_never_feeds_nor_supervises_truly_missing_pixels(monkeypatch):
    n, hole, seed = 24, 6, 5
    images = _images(n, (1, 12, 12))
    missing = incomplete_masks(n, 12, 12, side=hole, seed=seed, device="cpu")
    assert missing.sum(dim=(1, 2, 3)).eq(hole * hole).all()
    # fixed per image: the same masks whenever they are drawn for this seed
    assert torch.equal(missing, incomplete_masks(n, 12, 12, side=hole, seed=seed, device="cpu"))
    assert not torch.equal(missing, incomplete_masks(n, 12, 12, side=hole, seed=seed + 1, device="cpu"))

    # record what the model is given and what the loss supervises
    seen = []
    original_input = LinearHeadsDMFA.model_input

    def spy(self, x, miss):
        seen.append((x.clone(), miss.clone()))
        return original_input(self, x, miss)

    monkeypatch.setattr(LinearHeadsDMFA, "model_input", spy)
    sup_seen = []
    original_loss = dmt._step_loss

    def loss_spy(mfa, x, sup, **kw):
        sup_seen.append((x.clone(), sup.clone()))
        return original_loss(mfa, x, sup, **kw)

    monkeypatch.setattr(dmt, "_step_loss", loss_spy)

    runs = []
    for sentinel in (float("nan"), 1e6):
        poisoned = torch.where(missing, torch.tensor(sentinel), images)
        model = _tiny_model()
        recipe = dmfa_recipe(epochs=2, batch_size=8, lr=1e-3)
        history = train_dmfa(model, poisoned, recipe, mode="incomplete", hole=hole, seed=seed, progress=False,
                             device="cpu")
        assert all(math.isfinite(h["nll"]) for h in history)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        runs.append(model.state_dict())
    # garbage at the truly missing pixels changes nothing: bit-identical weights
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    # every batch: sentinel pixels are always marked unknown to the model and never supervised
    for x, unknown in seen:
        bad = torch.isnan(x) | (x == 1e6)
        assert bad.any() and not (bad & ~unknown).any()
    for x, sup in sup_seen:
        bad = torch.isnan(x) | (x == 1e6)
        assert not (bad & sup).any()
        assert sup.any()
    # passing the masks explicitly is the same run as letting train_dmfa draw them from the seed
    model = _tiny_model()
    recipe = dmfa_recipe(epochs=2, batch_size=8, lr=1e-3)
    train_dmfa(model, torch.where(missing, torch.tensor(0.5), images), recipe, mode="incomplete", missing=missing,
               hole=hole, seed=seed, progress=False, device="cpu")
    for k in runs[0]:
        assert torch.equal(runs[0][k], model.state_dict()[k]), k


def test_incomplete_data_dmfa_input_hides_every_supervised_pixel(monkeypatch):
    """What the network is given: its unknown set must be the truly missing pixels together with the
    hidden ones, so no pixel the loss supervises is ever part of the input."""
    n, hole, seed = 24, 6, 7
    images = _images(n, (1, 12, 12))
    given, supervised = [], []
    forward = LinearHeadsDMFA.forward

    def spy_forward(self, x, missing, **kw):
        given.append((x.detach().clone(), missing.clone()))
        return forward(self, x, missing, **kw)

    monkeypatch.setattr(LinearHeadsDMFA, "forward", spy_forward)
    step_loss = dmt._step_loss

    def loss_spy(mfa, x, sup, **kw):
        supervised.append(sup.clone())
        return step_loss(mfa, x, sup, **kw)

    monkeypatch.setattr(dmt, "_step_loss", loss_spy)
    recipe = dmfa_recipe(epochs=2, batch_size=8, lr=1e-3)
    train_dmfa(_tiny_model(), images, recipe, mode="incomplete", hole=hole, seed=seed,
               progress=False, device="cpu")
    assert len(given) == len(supervised) == 2 * math.ceil(n / 8)
    for (x, unknown), sup in zip(given, supervised):
        unknown, sup = unknown.expand_as(x), sup.expand_as(x)
        truly_missing = torch.isnan(x)           # train_dmfa puts NaN there
        assert sup.any() and truly_missing.any()
        assert not (sup & ~unknown).any()        # every supervised pixel is hidden from the input
        assert not (sup & truly_missing).any()   # and none is truly missing
        assert torch.equal(unknown, truly_missing | sup)


def test_training_lowers_validation_nll():
    images = _images(64, (1, 12, 12))
    # smooth images: a learnable structure (the model must predict a hidden block from its border)
    images = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)
    val = images[48:]
    model = _tiny_model()
    holes = test_masks(16, 12, 12, side=6, seed=0, device="cpu")
    before = evaluate_dmfa(model, val, holes)["nll"].mean()
    history = train_dmfa(model, images[:48], dmfa_recipe(epochs=3, batch_size=8, lr=2e-3), progress=False, device="cpu",
                         val_images=val, val_missing=holes)
    assert history[-1]["val_nll"] < before
    assert history[-1]["val_nll"] == pytest.approx(evaluate_dmfa(model, val, holes)["nll"].mean(), rel=1e-5)
    assert len(history[0]["batch_nll"]) == 6


# ----------------------------------------------------------------------------------- evaluation
def test_evaluate_and_predict_agree_with_direct_computation():
    model = _tiny_model(K=2).eval()
    images = _images(10, (1, 12, 12))
    holes = test_masks(10, 12, 12, side=5, seed=2, device="cpu")
    assert holes.sum(dim=(1, 2, 3)).eq(25).all()
    df = evaluate_dmfa(model, images, holes, batch_size=3)
    df_one = evaluate_dmfa(model, images, holes, batch_size=100)
    assert list(df.columns) == ["nll", "sse", "n_missing"] and len(df) == 10
    assert (df["n_missing"] == 25).all()
    assert torch.allclose(torch.tensor(df["nll"].values), torch.tensor(df_one["nll"].values), rtol=1e-5)
    with torch.no_grad():
        mfa = model(images, holes)
    nll = -mfa.log_prob(images, holes)
    sse = ((mfa.mean() - images) ** 2 * holes).sum(dim=(1, 2, 3))
    assert torch.allclose(torch.tensor(df["nll"].values, dtype=torch.float32), nll, rtol=1e-5)
    assert torch.allclose(torch.tensor(df["sse"].values, dtype=torch.float32), sse, rtol=1e-5)
    batched = predict_mfa(model, images, holes, batch_size=4)
    assert batched.batch_size == 10
    for f in ("weights", "means", "factors", "variances"):
        assert torch.allclose(getattr(batched, f), getattr(mfa, f), atol=1e-6)
    assert model.training is False


def test_classical_mfa_imputer_is_the_exact_conditional():
    images = torch.nn.functional.avg_pool2d(_images(200, (1, 8, 8)), 3, stride=1, padding=1)
    fitted, _ = fit_mfa(images, 3, 2, iterations=5, progress=False, device="cpu")
    imputer = ClassicalMFAImputer(fitted)
    test = images[:6]
    holes = test_masks(6, 8, 8, side=4, seed=0, device="cpu")
    df = evaluate_dmfa(imputer, test, holes)
    cond = fitted.condition(test, ~holes)
    assert torch.allclose(torch.tensor(df["nll"].values, dtype=torch.float32), -cond.log_prob(test, holes), rtol=1e-5)
    # NaN at the missing pixels does not change the prediction
    with torch.no_grad():
        a = imputer(torch.where(holes, torch.tensor(float("nan")), test), holes, validate=True)
    assert torch.allclose(a.means, cond.means)


def _summary_pair(folder, stem, nll, *, digest=True, **setting):
    """A CSV of per-image scores and its JSON summary (with the CSV's digest unless ``digest=False``)."""
    import pandas as pd

    csv = folder / f"{stem}.csv"
    pd.DataFrame({"nll": nll, "sse": [5.0, 7.0], "n_missing": [100, 100]}).to_csv(csv)
    summary = {"model_kind": "dmfa", "mode": "complete", "hole": 10, "n_components": 1, "n_factors": 4,
               "n_train": 9500, "epochs": 12, "seed": 0, **setting}
    if digest:
        summary["csv_digest"] = csv_digest(csv)
    (folder / f"{stem}.json").write_text(json.dumps(summary))
    return csv


def test_density_table_puts_our_numbers_next_to_the_authors(tmp_path):
    _summary_pair(tmp_path, "mnist_complete_h10", [-60.0, -80.0])
    table = density_table(tmp_path)
    row = [line for line in table.splitlines() if line.startswith("| 10×10")][0]
    assert "-70.0" in row and "6.00" in row       # ours: means of the CSV
    assert "-70.8" in row and "5.46" in row       # the authors'


def test_density_table_leaves_out_pairs_whose_json_summarises_another_csv(tmp_path, capsys):
    _summary_pair(tmp_path, "mnist_complete_h10", [-60.0, -80.0])
    stale = _summary_pair(tmp_path, "mnist_incomplete_h10", [-1.0, -3.0], mode="incomplete")
    stale.write_text(stale.read_text().replace("-3.0", "-5.0"))      # the CSV of a later run
    _summary_pair(tmp_path, "mnist_incomplete_noise_h10", [-2.0, -4.0], digest=False, mode="incomplete",
                  missing_kind="noise")
    table = density_table(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| 10×10")]
    assert len(rows) == 1 and "complete-data" in rows[0]          # never merged
    out = capsys.readouterr().out
    assert "mnist_incomplete_h10.csv: mnist_incomplete_h10.json summarises another CSV" in out
    assert "mnist_incomplete_noise_h10.csv: its JSON records no CSV digest" in out and "migrate_results" in out
    assert "Left out" in table and "mnist_incomplete_h10.csv" in table


def _tiny_experiment(folder, **kw):
    cfg = DensityConfig(results_dir=str(folder), n_train=24, n_val=0, n_test=4, epochs=1, batch_size=12, lr=1e-3,
                        n_figure=2, device="cpu", precision="32").replace(**kw)
    return run_experiment(cfg, mode="complete", hole=14, progress=False)


def test_run_experiment_writes_its_files_as_one_set(tmp_path, monkeypatch):
    import pandas as pd

    from labkit.studies import store

    first = _tiny_experiment(tmp_path)
    names = ("mnist_complete.csv", "mnist_complete.json", "mnist_complete_history.json", "mnist_complete.png",
             "mnist_complete_curves.png")
    before = {n: (tmp_path / n).read_bytes() for n in names}
    assert json.loads(before["mnist_complete.json"])["csv_digest"] == csv_digest(tmp_path / "mnist_complete.csv")
    assert first["n_test"] == 4
    # the second run (another test set, so another CSV) dies while writing its second file
    real, calls = store._write_temp, {"n": 0}

    def dying(final, content):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed between two writes")
        return real(final, content)

    monkeypatch.setattr(store, "_write_temp", dying)
    with pytest.raises(KeyboardInterrupt):
        _tiny_experiment(tmp_path, n_test=6)
    monkeypatch.setattr(store, "_write_temp", real)
    assert {n: (tmp_path / n).read_bytes() for n in names} == before          # the old set, whole
    assert len(pd.read_csv(tmp_path / "mnist_complete.csv")) == 4
    assert "| 14×14 | DMFA" in density_table(tmp_path)
    # uninterrupted, the new set replaces the old one
    _tiny_experiment(tmp_path, n_test=6)
    assert len(pd.read_csv(tmp_path / "mnist_complete.csv")) == 6
    assert json.loads((tmp_path / "mnist_complete.json").read_text())["n_test"] == 6
    assert "6 test images" in density_table(tmp_path)


def test_a_checkpoint_of_other_settings_is_neither_reused_nor_overwritten(tmp_path, capsys):
    _tiny_experiment(tmp_path)
    model_file = tmp_path / "mnist_complete.pt"
    original = model_file.read_bytes()
    capsys.readouterr()
    again = _tiny_experiment(tmp_path)                              # same settings: loaded
    assert again["paths"]["model"] == str(model_file) and "other settings" not in capsys.readouterr().out
    other = _tiny_experiment(tmp_path, epochs=2, lr=0.01)
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if "other settings" in l]
    assert len(line) == 1 and "mnist_complete.pt" in line[0]
    assert "epochs: stored 1, requested 2" in line[0] and "lr: stored 0.001, requested 0.01" in line[0]
    derived = Path(other["paths"]["model"])
    assert derived.name.startswith("mnist_complete-") and derived.is_file() and derived.name in line[0]
    assert Path(other["paths"]["csv"]).stem == derived.stem and other["epochs"] == 2
    assert model_file.read_bytes() == original                        # untouched
    assert json.loads((tmp_path / "mnist_complete.json").read_text())["epochs"] == 1
    table = density_table(tmp_path)
    assert table.count("| 14×14 | DMFA") == 2 and derived.stem in table
    # the same other settings again: the derived model is loaded, not retrained
    third = _tiny_experiment(tmp_path, epochs=2, lr=0.01)
    assert third["paths"]["model"] == str(derived) and third["trained_at"] == other["trained_at"]


def test_old_checkpoints_count_as_float32_and_trapezoid_inside(tmp_path, capsys):
    from labkit.checkpoint import ConfigMismatchError, atomic_save
    from labkit.studies.density import config_checkpoint

    config = {"epochs": 20, "missing_kind": "trapezoid_inside", "precision": "32", "train_data_sha": "abc"}
    legacy = {"precision": "32", "train_data_sha": "abc"}
    old = tmp_path / "mnist_incomplete_trapezoid_inside.pt"
    atomic_save({"model": {}, "meta": {"epochs": 20, "missing_kind": "trapezoid"}}, old)   # no precision: old
    assert config_checkpoint(old, config, legacy=legacy) == (old, {**config, "missing_kind": "trapezoid"})
    # a file that records its precision means what it says
    new = tmp_path / "new.pt"
    atomic_save({"model": {}, "meta": {**config, "missing_kind": "trapezoid", "precision": "32"}}, new)
    path, _ = config_checkpoint(new, config, legacy=legacy)
    assert path != new and path.name.startswith("new-")
    assert "missing_kind: stored 'trapezoid', requested 'trapezoid_inside'" in capsys.readouterr().out
    # an old file trained in another precision is another model
    path, _ = config_checkpoint(old, {**config, "precision": "bf16-mixed"}, legacy=legacy)
    assert path != old
    # a derived file that does not hold its settings is an error, not a reuse
    atomic_save({"model": {}, "meta": {"epochs": 3}}, path)
    with pytest.raises(ConfigMismatchError, match="named after these settings"):
        config_checkpoint(old, {**config, "precision": "bf16-mixed"}, legacy=legacy)


def test_unreadable_dmfa_checkpoints_are_reported_as_inputs(tmp_path):
    from labkit.checkpoint import CheckpointError

    bad = tmp_path / "mnist_incomplete.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="(?s)incomplete-data DMFA checkpoint.*mnist_incomplete.pt.*input") as info:
        dm.load_dmfa(bad, device="cpu", input_role="incomplete-data DMFA checkpoint")
    assert "delete it" not in str(info.value)
    with pytest.raises(CheckpointError, match="DMFA checkpoint .*nope.pt.* does not exist.*input"):
        dm.load_dmfa(tmp_path / "nope.pt", device="cpu")


def test_run_acflow_baseline_scores_the_dmfa_holes_and_joins_the_table(tmp_path):
    # A fresh (identity) flow saved like ./lab study acflow does: the runner must score it on
    # exactly the DMFA protocol's holes (test_masks) and write files density_table picks up.
    import pandas as pd

    from labkit.checkpoint import atomic_save
    from labkit.models.acflow import ACFlow
    from labkit.studies.density import run_acflow_baseline, score_holes

    model = ACFlow(1, 28, 28, hidden=4, n_blocks=0, n_scales=2, n_couplings=1)
    cfg = DensityConfig(results_dir=str(tmp_path), n_test=6, acflow_samples=2, n_figure=2, device="cpu")
    ckpt = tmp_path / "acflow.pt"
    atomic_save({"model": model.state_dict(), "meta": {"config": {"model": model.config}, "epochs": 0,
                 "setting": {"n_train": 7, "mask_kinds": ["square"]}}}, ckpt)
    with pytest.raises(FileNotFoundError, match="./lab study acflow"):
        run_acflow_baseline(cfg.replace(n_test=4), checkpoint=tmp_path / "nope.pt", progress=False)
    [r] = run_acflow_baseline(cfg, checkpoint=ckpt, holes=[10], progress=False)
    df = pd.read_csv(tmp_path / "mnist_acflow_h10.csv")
    assert len(df) == 6 and (df["n_missing"] == 100).all()
    from labkit.data import load_dataset

    images = load_dataset("mnist", "test", limit=6, quiet=True).images
    ref = score_holes(model, images, test_masks(6, 28, 28, side=10, seed=0), n_samples=2, seed=0)
    assert df["nll"].to_numpy() == pytest.approx(ref["nll"].to_numpy(), rel=1e-5)
    assert r["test_sse"] == pytest.approx(ref["sse"].mean(), rel=1e-5)
    assert r["n_train"] == 7 and r["n_samples"] == 2 and (tmp_path / "mnist_acflow_h10.png").exists()
    row = [line for line in density_table(tmp_path).splitlines() if "ACFlow" in line][0]
    assert row.startswith("| 10×10") and f"{df['nll'].mean():.1f}" in row and "bits/pixel" in row


# ----------------------------------------------------------------------------------- notebook 01
@pytest.mark.slow
def test_notebook_01_smoke_run_lowers_the_training_nll(tmp_path):
    """Papermill run of notebooks/01_dmfa.ipynb on the offline MNIST copy: one epoch, a few hundred
    images; the notebook writes its artefacts to a temporary results folder."""
    import pandas as pd

    try:
        from labkit.lab.run_notebooks import execute
    except ImportError:  # before labkit/lab/ existed
        from labkit.run_notebooks import execute

    results = tmp_path / "results"
    execute("01_dmfa", "quick", output_dir=tmp_path, results_dir=str(results), n_train=400, n_val=40, n_test=60,
            epochs=1, threads=1, device="cpu", mfa_components=10, mfa_iterations=3, timeout=300)
    history = json.loads((results / "mnist_incomplete_history.json").read_text())
    assert len(history) == 1
    nll = history[0]["batch_nll"]
    assert len(nll) == math.ceil(360 / 48)
    assert sum(nll[-2:]) / 2 < sum(nll[:2]) / 2        # the training NLL went down
    scores = pd.read_csv(results / "mnist_incomplete.csv")
    assert len(scores) == 60 and scores["nll"].notna().all() and (scores["n_missing"] == 14 * 14).all()
    setting = json.loads((results / "mnist_incomplete.json").read_text())
    assert setting["n_train"] == 360 and setting["n_val"] == 40 and setting["mode"] == "incomplete"
    assert setting["train_images_per_s"] > 0 and setting["infer_images_per_s"] > 0
    assert (results / "mnist_incomplete.png").stat().st_size > 10_000
    assert (results / "mnist_incomplete.pt").stat().st_size <= 32e6
    assert (results / "_scratch" / "mnist_incomplete.partial.pt").exists()   # resumable state kept aside
    assert (results / "mnist_mfa_K10_L4.csv").exists()
    # the committed ACFlow checkpoint is scored on the same 60 holes (its row of the density table)
    acflow = pd.read_csv(results / "mnist_acflow.csv")
    assert len(acflow) == 60 and acflow[["nll", "nll_dequantized", "sse"]].notna().all().all()
    assert (acflow["n_missing"] == 14 * 14).all()
    assert "ACFlow" in density_table(results)


def test_channels_last_training_matches_the_default_layout():
    """The layout changes where values sit in memory, not what is computed: the same weights give the
    same MFA in both layouts, and a float32 epoch the same losses (Adam turns last-bit differences of
    near-zero gradients into lr-sized weight steps, so weights are not compared after training)."""
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    missing = square(8, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    a = dm.FullyConvDMFA((3, 8, 8), n_factors=1).eval()
    b = dm.FullyConvDMFA((3, 8, 8), n_factors=1).eval()
    b.load_state_dict(a.state_dict())
    b.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ma = a(images, missing)
        mb = b(images.contiguous(memory_format=torch.channels_last), missing.contiguous(memory_format=torch.channels_last))
    for field in ("weights", "means", "factors", "variances"):
        torch.testing.assert_close(getattr(mb, field), getattr(ma, field), rtol=1e-5, atol=1e-6)
    histories = []
    for layout in (False, True):
        torch.manual_seed(0)
        model = dm.FullyConvDMFA((3, 8, 8), n_factors=1)
        recipe = dmfa_recipe(epochs=1, batch_size=4, lr=1e-3, precision="32", channels_last=layout)
        histories.append(dmt.train_dmfa(model, images, recipe, seed=0, device="cpu",
                                        progress=False))
        if layout:
            convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
            assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert histories[1][0]["nll"] == pytest.approx(histories[0][0]["nll"], rel=5e-3)
