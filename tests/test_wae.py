"""labkit.models.wae and wae_training (architectures, losses, the optimisation steps) and
labkit.studies.wae (the sweep's bookkeeping, its report, notebook 03)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from labkit.mfa import MFA
from labkit.models import wae as W
from labkit.models import wae_training as WT
from labkit.studies import wae as WS
from labkit.studies.engine import InputError, SettingsMismatch, SweepFailed

REPO = Path(__file__).resolve().parents[1]

try:
    from labkit.lab.profiles import notebook_parameters
except ImportError:  # before labkit/lab/ existed
    from labkit.profiles import notebook_parameters


@pytest.fixture(autouse=True)
def _small_and_eager():
    """One thread (two OpenMP threads on a busy 2-core machine are many times slower than one) and
    MisConv's eager path (its fast path spends seconds compiling on first use)."""
    from labkit import misconv

    threads, fast = torch.get_num_threads(), misconv.fast_default()
    torch.set_num_threads(1)
    misconv.set_fast_default(False)
    yield
    torch.set_num_threads(threads)
    misconv.set_fast_default(fast)


def _batch(B=4, C=1, H=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, C, H, H, generator=g)
    missing = torch.zeros(B, 1, H, H, dtype=torch.bool)
    missing[:, :, 7:21, 3:17] = True
    return torch.where(missing.expand_as(x), torch.tensor(float("nan")), x), missing, x


def _random_mfa(B, C=1, H=28, L=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MFA(torch.ones(B, 1), torch.rand(B, 1, C, H, H, generator=g),
               0.05 * torch.randn(B, 1, L, C, H, H, generator=g), 0.01 + 0.02 * torch.rand(B, 1, C, H, H, generator=g))


def _aux(front, x_complete, missing):
    kind = _tiny(front).aux_kind
    if kind == "images":
        return x_complete
    if kind == "mfa":
        return _random_mfa(x_complete.shape[0])
    return None


#: a small MNIST-shaped WAE (same layer kinds as the paper's) so that the step tests run in milliseconds
TINY = {"encoder": ["conv4", "down", "conv4", "lin3"], "decoder": ["lin784", "up", "conv4", "conv1"],
        "discriminator": ["lin8", "lin8", "lin1"]}


def _tiny(front="zero"):
    return W.WAE(front, "mnist", architecture=TINY, device="cpu")


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(module, before):
    return {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}


# --------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("dataset, shape, latent", [("mnist", (1, 28, 28), 20), ("svhn", (3, 32, 32), 20),
                                                    ("celeba", (3, 64, 64), 64)])
def test_architectures_map_images_to_codes_and_back(dataset, shape, latent):
    torch.manual_seed(0)
    model = W.WAE("zero", dataset, device="cpu").eval()
    x = torch.rand(2, *shape)
    missing = torch.zeros(2, 1, *shape[1:], dtype=torch.bool)
    with torch.no_grad():
        z = model.encode(x, missing)
        rec = model.decode(z)
        p = model.discriminator(z)
    assert model.latent_dim == latent and z.shape == (2, latent)
    assert rec.shape == (2, *shape) and bool(((rec >= 0) & (rec <= 1)).all())
    assert p.shape == (2,) and bool(((p > 0) & (p < 1)).all())


def test_mnist_layers_follow_the_supplementary():
    model = W.WAE("zero", "mnist", device="cpu")
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    # conv32 (the front), conv40, down (stride 2), conv80, down (stride 2)
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(32, 1), (40, 1), (40, 2), (80, 1), (80, 2)]
    assert model.encoder.head[-1].in_features == 80 * 7 * 7 and model.encoder.head[-1].out_features == 20
    assert model.decoder.stem[0].out_features == 3920
    linears = [m for m in model.discriminator.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [64, 64, 64, 64, 1]
    assert W.PAPER_SETTINGS["mnist"] == {"epochs": 20, "batch_size": 128, "lr": 4e-4, "lr_disc": 4e-6}


def test_paper_and_cpu_profiles_train_as_the_authors_did():
    p = WS.WAEConfig.build("paper")
    s = W.PAPER_SETTINGS["mnist"]
    assert (p.recipe, p.epochs, p.batch_size, p.lr) == ("authors", s["epochs"], s["batch_size"], s["lr"])
    assert p.lr_disc is None and p.lambda_adv is None         # the recipe's: one Adam, weight 0.01 = λ
    assert len(p.seeds) == 3 and p.dataset == "mnist"
    c = WS.WAEConfig.build("cpu")
    assert (c.recipe, c.n_train, c.epochs, c.seeds) == ("authors", 10000, 5, [0, 1, 2])
    assert c.fronts == ["gt", "zero", "pc", "dmfa_mean_incomplete", "dmfa_misconv_incomplete"]
    for profile in ("paper", "cpu", "quick"):                 # every profile's section makes a valid config
        cfg = WS.WAEConfig.build(profile)
        assert WS.training_settings(cfg) == {"recipe": "authors", "optimizers": "one", "lambda_adv": 0.01, "disc_weight": 0.01,
                                  "recon": "mse", "step": "alternating", "recon_average": "all_pixels",
                                  "gt_counted": "observed"}


def test_recipe_settings_and_their_errors():
    assert W.recipe_settings("supplement") == {"recipe": "supplement", "optimizers": "two", "lambda_adv": 1.0,
                                               "disc_weight": 1.0, "recon": "bce", "lr_disc": 4e-6}
    assert W.recipe_settings("supplement", lr_disc=2e-4, lambda_adv=0.5)["lr_disc"] == 2e-4
    with pytest.raises(ValueError, match="lr_disc=0.0002 has no meaning.*supplement"):
        W.recipe_settings("authors", lr_disc=2e-4)
    with pytest.raises(ValueError, match="unknown WAE recipe 'paper'"):
        W.recipe_settings("paper")
    with pytest.raises(ValueError, match="recon must be"):
        W.recipe_settings("authors", recon="l1")
    with pytest.raises(ValueError, match="lr_disc=0.0002 has no meaning"):   # refused when the config is made
        WS.WAEConfig(lr_disc=2e-4)
    assert WS.WAEConfig(recipe="supplement", lr_disc=2e-4).lr_disc == 2e-4
    with pytest.raises(ValueError, match="16-mixed.*needs a CUDA device"):
        WS.WAEConfig(precision="16-mixed", device="cpu")


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        ({"dataset": "imagenet"}, ValueError, "unknown dataset 'imagenet'"),
        ({"front": "magic"}, ValueError, "unknown front 'magic'"),
        ({"architecture": {"encoder": ["conv32", "dense9", "lin2"]}}, ValueError, "unknown layer 'dense9'"),
        ({"architecture": {"encoder": ["down", "lin2"]}}, ValueError, "must start with convN"),
        ({"architecture": {"decoder": ["lin100", "up", "conv1"]}}, ValueError, "cannot reach 28x28"),
        ({"architecture": {"decoder": ["lin3920", "up", "up", "conv3"]}}, ValueError, "1 channels"),
        ({"architecture": {"discriminator": ["lin8", "lin2"]}}, ValueError, "ending with lin1"),
    ],
)
def test_bad_models_are_rejected(kwargs, exc, text):
    kwargs = {"front": "zero", "dataset": "mnist", **kwargs}
    with pytest.raises(exc, match=text):
        W.WAE(kwargs.pop("front"), kwargs.pop("dataset"), device="cpu", **kwargs)


def test_canonical_front_names():
    assert WS.canonical_front("misconv") == "dmfa_misconv_complete"
    assert WS.canonical_front("dmfa_mean") == "dmfa_mean_complete"
    assert WS.canonical_front("pc") == "pc"
    with pytest.raises(ValueError, match="unknown front 'nope'"):
        WS.canonical_front("nope")


# --------------------------------------------------------------------------- losses
def test_reconstruction_loss_by_hand_and_only_on_counted_pixels():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])               # (1, 1, 2, 2)
    target = torch.tensor([[[[0.5, 1.0], [float("nan"), 0.2]]]])
    counted = torch.tensor([[[[True, True], [False, True]]]])
    expect = sum(-(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))
                 for z, t in ((0.0, 0.5), (2.0, 1.0), (3.0, 0.2))) / 3
    logits.requires_grad_(True)
    loss = WT.reconstruction_loss(logits, target, counted)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()
    # the NaN target at the uncounted pixel gives no gradient (and no NaN) anywhere
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 1, 0] == 0
    mse = WT.reconstruction_loss(logits.detach(), target, counted, "mse")
    s = torch.sigmoid(torch.tensor([0.0, 2.0, 3.0]))
    assert mse.item() == pytest.approx(((s - torch.tensor([0.5, 1.0, 0.2])) ** 2).mean().item(), rel=1e-6)


def test_reconstruction_loss_is_a_per_image_mean():
    # image 0 counts 1 pixel with loss a, image 1 counts 4 pixels with loss b: (a + b) / 2
    logits = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    counted = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    counted[0, 0, 0, 0] = True
    counted[1] = True
    a = b = math.log(2.0)
    assert WT.reconstruction_loss(logits, target, counted).item() == pytest.approx((a + b) / 2)


def test_reconstruction_loss_rejects_bad_input():
    with pytest.raises(TypeError, match="counted must be a bool"):
        WT.reconstruction_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="counted must have shape"):
        WT.reconstruction_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(2, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="kind must be"):
        WT.reconstruction_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2, dtype=torch.bool), "l1")


def test_adversarial_losses_by_hand():
    d = W.Discriminator(3, ["lin4", "lin1"])
    with torch.no_grad():   # a constant discriminator: D(z) = sigmoid(0.7) for every z
        for p in d.parameters():
            p.zero_()
        d.net[-1].bias.fill_(0.7)
    z = torch.randn(5, 3)
    s = 1 / (1 + math.exp(-0.7))
    assert WT.discriminator_loss(d, z, torch.randn(5, 3)).item() == pytest.approx(-math.log(s) - math.log(1 - s), rel=1e-6)
    assert WT.encoder_adversarial_loss(d, z).item() == pytest.approx(-math.log(s), rel=1e-6)


# --------------------------------------------------------------------------- the two steps
def _step_setup(front):
    """A tiny WAE with ``front``, its optimisers, a batch, its codes and snapshots of the three nets."""
    torch.manual_seed(0)
    model = _tiny(front)
    opts = WT.make_optimizers(model)
    x, missing, complete = _batch()
    z = model.encode(x, missing, _aux(front, complete, missing))
    snaps = _snapshot(model.encoder), _snapshot(model.decoder), _snapshot(model.discriminator)
    return model, opts, x, missing, z, snaps


@pytest.mark.parametrize("front", ["zero", "pc", "gt", "dmfa_misconv_complete"])
def test_discriminator_step_changes_only_the_discriminator(front):
    model, opts, x, missing, z, (enc, dec, disc) = _step_setup(front)
    out = WT.discriminator_step(model, opts["discriminator"], z, generator=torch.Generator().manual_seed(1))
    assert set(out) == {"d_loss", "d_prior", "d_encoded"} and all(math.isfinite(v) for v in out.values())
    assert _changed(model.encoder, enc) == set() and _changed(model.decoder, dec) == set()
    assert _changed(model.discriminator, disc) == set(disc)          # every discriminator parameter moved
    assert all(p.grad is None for p in model.autoencoder_parameters())


@pytest.mark.parametrize("front", ["zero", "pc", "gt", "dmfa_misconv_complete"])
def test_autoencoder_step_changes_only_encoder_and_decoder(front):
    model, opts, x, missing, z, (enc, dec, disc) = _step_setup(front)
    out = WT.autoencoder_step(model, opts["autoencoder"], z, x, ~missing, lambda_adv=1.0)
    assert set(out) == {"loss", "recon", "adv"} and all(math.isfinite(v) for v in out.values())
    assert _changed(model.discriminator, disc) == set()
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert all(p.requires_grad for p in model.discriminator.parameters())   # unfrozen afterwards
    # the front's convolution and the decoder's last layer both learned
    assert any(n.startswith("front.conv") for n in _changed(model.encoder, enc))
    assert {"body.{}.weight".format(len(model.decoder.body) - 1)} <= _changed(model.decoder, dec)


def test_train_step_ignores_missing_pixels_and_learns():
    g0 = torch.Generator().manual_seed(3)
    complete = (torch.rand(8, 1, 28, 28, generator=g0) > 0.85).float()   # sparse binary "strokes"
    missing = torch.zeros(8, 1, 28, 28, dtype=torch.bool)
    missing[:, :, 7:21, 3:17] = True
    x = torch.where(missing, torch.tensor(float("nan")), complete)
    torch.manual_seed(0)
    model = _tiny()
    opts = WT.make_optimizers(model, lr=1e-2)
    first = WT.train_step(model, opts, x, missing, generator=torch.Generator().manual_seed(0))
    # the values behind the mask never matter: NaN there or the true pixels give the same step
    torch.manual_seed(0)
    twin = _tiny()
    same = WT.train_step(twin, WT.make_optimizers(twin, lr=1e-2), complete, missing,
                        generator=torch.Generator().manual_seed(0))
    assert same == pytest.approx(first, rel=1e-5, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        last = WT.train_step(model, opts, x, missing, generator=g)
    assert last["recon"] < 0.8 * first["recon"]


def test_train_step_rejects_bad_input():
    model = _tiny()
    opts = WT.make_optimizers(model)
    x, missing, _ = _batch(B=2)
    with pytest.raises(ValueError, match="optimizers must have keys.*'all'"):
        WT.train_step(model, {"autoencoder": opts["autoencoder"]}, x, missing)
    with pytest.raises(TypeError, match="missing must be a bool"):
        WT.train_step(model, opts, x, missing.float())
    with pytest.raises(ValueError, match="lr_disc must be a positive"):
        WT.make_optimizers(model, lr_disc=0.0)


def _authors_reference_grads(model, x, missing, complete, *, generator_seed, disc_weight=0.01, lambda_adv=0.01):
    """The gradients of the joint step (recipe "authors_joint"), taken by hand on a copy of ``model``: the discriminator's
    from ``disc_weight`` x its BCE only (codes detached); encoder's and decoder's from MSE over the
    observed pixels + ``lambda_adv`` x the fooling BCE, the discriminator held fixed."""
    import copy

    twin = copy.deepcopy(model)
    z = twin.encode(x, missing)
    z_prior = twin.prior_sample(z.shape[0], generator=torch.Generator().manual_seed(generator_seed))
    d_params = list(twin.discriminator.parameters())
    real, fake = twin.discriminator.logits(z_prior), twin.discriminator.logits(z.detach())
    d_loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
              + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    d_grads = torch.autograd.grad(disc_weight * d_loss, d_params)
    rec = torch.sigmoid(twin.decoder(z))
    obs = (~missing).expand_as(complete)
    mse = (torch.where(obs, rec - complete, torch.zeros(())) ** 2).flatten(1).sum(1) / obs.flatten(1).sum(1)
    fool = F.binary_cross_entropy_with_logits(twin.discriminator.logits(z), torch.ones(z.shape[0]))
    ae_params = twin.autoencoder_parameters()
    ae_grads = torch.autograd.grad(mse.mean() + lambda_adv * fool, ae_params)
    return d_grads, ae_grads


def test_authors_joint_recipe_one_adam_weighted_losses_and_mse():
    torch.manual_seed(0)
    model = _tiny()
    opts = WT.make_optimizers(model, lr=4e-4, lr_disc=None, recipe="authors_joint")
    assert list(opts) == ["all"] and opts["all"].param_groups[0]["lr"] == 4e-4
    ids = {id(p) for p in opts["all"].param_groups[0]["params"]}
    assert ids == {id(p) for p in model.parameters()}                  # encoder, decoder and discriminator
    x, missing, complete = _batch(B=6)
    d_ref, ae_ref = _authors_reference_grads(model, x, missing, complete, generator_seed=3)
    before = _snapshot(model)
    out = WT.train_step(model, opts, x, missing, generator=torch.Generator().manual_seed(3), lambda_adv=0.01,
                       recon="mse", disc_weight=0.01)
    assert set(out) == {"d_loss", "d_prior", "d_encoded", "loss", "recon", "adv"}
    # one step moved all three networks ...
    assert _changed(model, before) == set(before)
    # ... with exactly the recipe's gradients (left in .grad by the step)
    for p, g in zip(model.discriminator.parameters(), d_ref):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)
    for p, g in zip(model.autoencoder_parameters(), ae_ref):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)
    # the supplement's optimizers are two, with their own rates
    two = WT.make_optimizers(model, lr=4e-4, lr_disc=2e-4, recipe="supplement")
    assert sorted(two) == ["autoencoder", "discriminator"] and two["discriminator"].param_groups[0]["lr"] == 2e-4


def test_prior_samples_are_seeded_standard_normal():
    model = _tiny()
    a = model.prior_sample(4000, generator=torch.Generator().manual_seed(5))
    b = model.prior_sample(4000, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (4000, 3)
    assert abs(a.mean().item()) < 0.02 and abs(a.var().item() - 1) < 0.03


# --------------------------------------------------------------------------- evaluation and sweep bookkeeping
def test_evaluate_wae_scores_against_the_complete_images():
    from labkit.metrics import frechet_distance, psnr, ssim
    from labkit.studies.imputers import AuxSource

    torch.manual_seed(0)
    model = _tiny()
    _, missing, complete = _batch(B=6, seed=4)
    feats = lambda imgs: imgs.flatten(1)[:, ::97].double()  # noqa: E731  (a cheap stand-in feature map)
    metrics, ex = WS.evaluate_wae(model, complete, missing, AuxSource(), features=feats, batch_size=4,
                                  n_examples=3)
    model.eval()
    with torch.no_grad():
        rec = model(torch.where(missing.expand_as(complete), torch.tensor(float("nan")), complete), missing)
    assert metrics["psnr_missing"] == pytest.approx(psnr(rec, complete, missing).mean().item(), rel=1e-5)
    assert metrics["ssim_all"] == pytest.approx(ssim(rec, complete).mean().item(), rel=1e-5)
    assert metrics["fd_reconstruction"] == pytest.approx(frechet_distance(feats(rec), feats(complete)), rel=1e-4)
    assert ex["reconstruction"].shape == (3, 1, 28, 28) and torch.isnan(ex["input"][missing[:3].expand(3, 1, 28, 28)]).all()


def _fake_cell(calls, fail=()):
    """A stand-in for run_cell: records the cell, returns made-up metrics (no skimage columns for
    ``pc``, like a migrated row), raises for fronts in ``fail``."""
    def run(cfg, cell):
        calls.append((cell.coords["dataset"], cell.coords["front"], cell.coords["seed"], cfg.epochs))
        if cell.coords["front"] in fail:
            raise RuntimeError(f"input checkpoint of {cell.coords['front']} cannot be read")
        metrics = {k: 1.0 + cell.coords["seed"] for k in WS.METRIC_COLUMNS}
        if cell.coords["front"] != "pc":
            metrics.update(psnr_all_skimage=2.0, ssim_all_skimage=0.5)
        return {"metrics": metrics, "details": {"note": "fake"}}
    return run


def _small_cfg(tmp_path, **kw):
    kw = {"n_train": 20, "n_test": 10, "dmfa_complete": None, **kw}
    return WS.WAEConfig(results_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), **kw)


def test_sweep_records_keyed_rows_and_skips_only_cells_with_the_same_key(tmp_path, capsys):
    calls = []
    cfg = _small_cfg(tmp_path, fronts=["zero", "pc", "misconv"], seeds=[0, 1])
    df = WS.run(cfg, progress=False, cell_fn=_fake_cell(calls), max_cells=3)
    # seeds outermost; misconv has no DMFA checkpoint configured, so it waits
    assert calls == [("mnist", "zero", 0, 1), ("mnist", "pc", 0, 1), ("mnist", "zero", 1, 1)]
    assert "waiting mnist/dmfa_misconv_complete/s0" in capsys.readouterr().out
    store = WS.result_store(tmp_path)
    assert store.columns == ["key", *WS.COORDS, *WS.METRIC_COLUMNS, *WS.SKIMAGE_COLUMNS, "settings", "inputs", "origin"]
    assert len(df) == 3 and set(df["origin"]) == {"run"}
    first = json.loads(df["settings"][0])
    assert (first["recipe"], first["epochs"], first["recon"], first["lambda_adv"], first["n_train"]) == \
        ("authors", 1, "mse", 0.01, 20)
    assert {"train", "test", "masks"} <= set(json.loads(df["inputs"][0]))
    # a rerun runs only the unfinished cell
    df = WS.run(cfg, progress=False, cell_fn=_fake_cell(calls))
    assert calls[3:] == [("mnist", "pc", 1, 1)] and len(df) == 4
    assert len(store.read_details()) == 4
    # other settings are other cells: nothing is skipped, and the table shows the planned rows only
    df2 = WS.run(cfg.replace(fronts=["zero", "pc"], seeds=[0], epochs=2), progress=False, cell_fn=_fake_cell(calls))
    assert calls[4:] == [("mnist", "zero", 0, 2), ("mnist", "pc", 0, 2)] and len(df2) == 2
    everything = WS.read_results(tmp_path)
    assert len(everything) == 6
    with pytest.raises(SettingsMismatch, match="epochs"):
        WS.summary_table(everything)
    table = WS.table_markdown(everything, df2["key"])
    assert "| zero | 1 |" in table and "14.90" in table and "recipe authors; 2 epoch(s)" in table
    assert "data range of 2" in table
    # pc has no scikit-image value (optional column): shown as a dash, the other metrics as usual
    pc = [line for line in table.splitlines() if line.startswith("| pc |")][0]
    assert "–" in pc and "1.00" in pc


def test_a_failing_cell_is_reported_and_the_others_run(tmp_path):
    calls = []
    cfg = _small_cfg(tmp_path, fronts=["zero", "pc", "gt"])
    with pytest.raises(SweepFailed, match=r"(?s)1 cell\(s\) failed.*mnist/pc/s0.*cannot be read"):
        WS.run(cfg, progress=False, cell_fn=_fake_cell(calls, fail={"pc"}))
    assert sorted(WS.read_results(tmp_path)["front"]) == ["gt", "zero"]


def test_a_failed_sweep_still_gets_its_report_beside_the_results_and_the_docs_only_on_request(tmp_path):
    cfg = _small_cfg(tmp_path / "res", fronts=["zero", "pc"])
    with pytest.raises(SweepFailed, match="mnist/pc/s0"):
        WS.run(cfg, progress=False, cell_fn=_fake_cell([], fail={"pc"}))
    rows = WS.read_rows(cfg, WS.plan(cfg))
    readme = (REPO / "README.md").read_bytes()
    written = WS.write_report(cfg, rows)
    assert (REPO / "README.md").read_bytes() == readme
    table = (tmp_path / "res" / "table.md").read_text()
    assert "| zero | 1 |" in table and "_1 of 2 planned runs; seeds [0]" in table
    assert table.startswith("<!-- wae-table:quick -->")                 # the marker: the profile's name
    assert tmp_path / "res" / "figures" / "mnist-metrics.png" in written
    assert all(p.is_file() for p in written)
    # a document: only its marked block is replaced
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- wae-table:quick -->\nold\n<!-- /wae-table:quick -->\nafter\n")
    assert doc in WS.write_report(cfg, rows, doc=doc)
    text = doc.read_text()
    assert text.startswith("before\n<!-- wae-table:quick -->\n| front |") and "old" not in text
    assert text.endswith("<!-- /wae-table:quick -->\nafter\n") and "| zero | 1 |" in text
    with pytest.raises(ValueError, match="lacks the markers <!-- wae-table:other -->"):
        WS.write_report(cfg, rows, doc=doc, marker="other")


def test_keys_follow_the_checkpoint_a_front_reads(tmp_path):
    from labkit.checkpoint import atomic_save

    ckpt = tmp_path / "dmfa.pt"
    atomic_save({"model": {}, "meta": {"v": 1}}, ckpt)
    cfg = _small_cfg(tmp_path, dmfa_complete=str(ckpt))
    a = WS.plan_cell("mnist", "dmfa_mean_complete", 0, cfg)
    assert a.inputs["dmfa"]["role"] == "complete-data DMFA checkpoint"
    assert a.key == WS.plan_cell("mnist", "dmfa_mean_complete", 0, cfg).key
    atomic_save({"model": {}, "meta": {"v": 2}}, ckpt)            # retrained: another cell
    b = WS.plan_cell("mnist", "dmfa_mean_complete", 0, cfg)
    assert a.key != b.key
    # a cell planned with the old file refuses to run on the new one
    with pytest.raises(InputError, match="changed since the sweep was planned"):
        WS.check_inputs_unchanged(a, cfg)
    # the zero front reads no checkpoint: its key does not move
    assert "dmfa" not in WS.plan_cell("mnist", "zero", 0, cfg).inputs
    # other training images (another n_train) are other inputs
    assert WS.plan_cell("mnist", "zero", 0, _small_cfg(tmp_path, n_train=30)).inputs["train"]["n"] == 30


def test_one_real_cell_end_to_end(tmp_path):
    """A real (tiny) cell: trained, scored with the skimage columns, figures under its key, no
    partial checkpoint left, and found done by a rerun."""
    cfg = WS.WAEConfig(results_dir=str(tmp_path), n_train=48, n_test=16, epochs=1, batch_size=16, feature_epochs=1,
                       lr=4e-4, precision="32", fronts=["zero"], seeds=[0], cache_dir=str(tmp_path / "cache"),
                       eval_batch=16, n_figure=4)
    df = WS.run(cfg, progress=False)
    (cell,) = WS.plan(cfg)
    assert list(df["key"]) == [cell.key]
    row = df.iloc[0]
    assert all(math.isfinite(row[c]) for c in WS.METRIC_COLUMNS + WS.SKIMAGE_COLUMNS)
    stem = WS.cell_stem(cell)
    assert (tmp_path / "figures" / f"{stem}-reconstruction.png").is_file()
    assert (tmp_path / "figures" / f"{stem}-samples.png").is_file()
    assert not list((tmp_path / "_scratch" / "checkpoints").glob("*.partial.pt"))
    assert WS.load_examples(cell, cfg)["reconstruction"].shape == (4, 1, 28, 28)
    details = WS.result_store(tmp_path).read_details()[0]
    assert details["key"] == cell.key and details["history"][0]["batches"] == 3
    outcomes = []
    WS.run(cfg, progress=False, cell_fn=lambda c, x: outcomes.append(x))
    assert outcomes == []
    # the report draws the fronts side by side from the example tensors the cell saved
    written = WS.write_report(cfg, df)
    assert tmp_path / "figures" / "mnist-fronts-s0-reconstruction.png" in written
    assert (tmp_path / "figures" / "mnist-fronts-s0-samples.png").is_file()


def _migration_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("migrate_results_script", REPO / "scripts" / "migrate_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_migrated_rows_get_the_keys_the_sweep_plans(tmp_path):
    """An old-format metrics.csv + runs.jsonl (supplement recipe, 1 epoch, lr_disc 2e-4, BCE) becomes
    keyed rows with origin "migrated"; a sweep with those settings then finds them done."""
    from labkit.studies.cells import load_cell_data

    mig = _migration_script()
    folder = tmp_path / "cpu"
    (folder / "figures").mkdir(parents=True)
    data = load_cell_data("mnist", "square", 0, n_train=20, n_test=10, val_fraction=0.0)
    old = dict(batch_size=32, epochs=1, lr=4e-4, lr_disc=2e-4, lambda_adv=1.0, recon="bce", n_train=20, n_test=10,
               mask="square")
    rows, records = [], []
    for i, front in enumerate(["gt", "zero"]):
        metrics = {k: float(i + 1) for k in WS.METRIC_COLUMNS}
        rows.append({"dataset": "mnist", "front": front, "seed": 0, **metrics, "epochs": 1, "n_train": 20, "n_test": 10})
        records.append({**old, **metrics, "dataset": "mnist", "front": front, "seed": 0, "profile": "cpu",
                        "data": data.sources, "finished_at": "2026-11-24 03:44:53",
                        "architecture": W.WAE(front, "mnist", device="cpu").architecture,
                        "feature_net": {"epochs": 3, "n_train": 20}})
    import pandas as pd

    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    (folder / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "figures" / "mnist-zero-s0-samples.png").write_bytes(b"png")
    assert mig._wae_folder(folder, "cpu", dry_run=False) == 0

    df = WS.read_results(folder)
    assert sorted(df["front"]) == ["gt", "zero"] and set(df["origin"]) == {"migrated"}
    assert df[WS.SKIMAGE_COLUMNS].isna().all().all()              # optional: they did not exist then
    assert float(df[df["front"] == "zero"]["psnr_all"].iloc[0]) == 2.0
    cfg = WS.WAEConfig(recipe="supplement", lr_disc=2e-4, lambda_adv=1.0, recon="bce", epochs=1, batch_size=32,
                       lr=4e-4, precision="32", n_train=20, n_test=10, feature_epochs=3, results_dir=str(folder),
                       fronts=["gt", "zero"], seeds=[0])
    cells = WS.plan(cfg)
    assert sorted(df["key"]) == sorted(c.key for c in cells)
    calls = []
    WS.run(cfg, progress=False, cell_fn=_fake_cell(calls))
    assert calls == []                                             # found done
    zero = [c for c in cells if c.coords["front"] == "zero"][0]
    assert (folder / "figures" / f"{WS.cell_stem(zero)}-samples.png").read_bytes() == b"png"
    assert "migrated_from" in WS.result_store(folder).read_details()[0]
    # the authors' recipe is another cell; a second migration finds nothing to do
    assert WS.plan(cfg.replace(fronts=["zero"], recipe="authors", lr_disc=None, lambda_adv=None,
                               recon=None))[0].key != zero.key
    assert mig._wae_folder(folder, "cpu", dry_run=False) == 0 and len(WS.read_results(folder)) == 2


def test_a_config_refuses_unknown_settings_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown setting 'epoch' for 03_wae.*did you mean 'epochs'"):
        WS.WAEConfig.build("quick", {"epoch": 3, "results_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="setting 'dataset' of 03_wae must be a data set.*got 'cifar100'"):
        WS.WAEConfig.build("quick", {"dataset": "cifar100"})
    with pytest.raises(ValueError, match="no WAE architecture for dataset 'cifar100'"):
        WS.dataset_arch("cifar100")
    with pytest.raises(ValueError, match="setting 'recipe' of 03_wae must be a WAE recipe.*got 'fast'"):
        WS.WAEConfig.build("quick", {"recipe": "fast"})
    with pytest.raises(ValueError, match="setting 'fronts' of 03_wae must be .*'magic'"):
        WS.WAEConfig.build("quick", {"fronts": ["zero", "magic"]})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- notebook 03 (papermill)
@pytest.mark.slow
def test_notebook_03_smoke_run(tmp_path):
    try:
        from labkit.lab.run_notebooks import execute
    except ImportError:  # before labkit/lab/ existed
        from labkit.run_notebooks import execute

    out = execute("03_wae", "quick", output_dir=tmp_path, results_dir=str(tmp_path / "wae"), device="cpu",
                  fronts=["zero", "gt"], epochs=1, n_train=128, n_test=64, batch_size=64, feature_epochs=1,
                  seeds=[0], threads=1)
    assert out.is_file()
    df = WS.read_results(tmp_path / "wae")
    assert sorted(df["front"]) == ["gt", "zero"] and list(df.columns) == WS.result_store(tmp_path / "wae").columns
    assert df[WS.METRIC_COLUMNS + WS.SKIMAGE_COLUMNS].notna().all().all()
    assert len(list((tmp_path / "wae" / "figures").glob("mnist-gt-s0-*-samples.png"))) == 1


def test_sweep_with_a_cell_held_by_another_copy_does_not_end_quietly(tmp_path):
    """A cell the other copy of the same sweep still holds at the end is named as not finished
    (SweepIncomplete, a non-zero exit in run_wae.py); once that copy is gone, a retry runs it."""
    from contextlib import ExitStack

    from labkit.studies.engine import SweepIncomplete

    calls = []
    cfg = _small_cfg(tmp_path, fronts=["pc", "zero"])
    held = [c for c in WS.plan(cfg) if c.coords["front"] == "pc"][0]
    store = WS.result_store(tmp_path)
    with ExitStack() as other:
        assert other.enter_context(store.claim(held.key)) is True
        with pytest.raises(SweepIncomplete, match="not finished"):
            WS.run(cfg, progress=False, cell_fn=_fake_cell(calls))
    assert [c[1] for c in calls] == ["zero"]
    WS.run(cfg, progress=False, cell_fn=_fake_cell(calls))
    assert [c[1] for c in calls] == ["zero", "pc"]


def test_paired_differences_between_fronts_match_a_hand_computation():
    """Per-seed differences and the t interval over three seeds, computed here by hand
    (t_{0.975, 2} = 4.302653): the report's paired table says the same, and names a tie."""
    import pandas as pd

    from labkit.studies import wae_report

    rows = pd.DataFrame([{"dataset": "mnist", "front": f, "seed": s, "key": f"{f}{s}", **{m: 0.0 for m in
                                                                                        wae_report.PAIRED_METRICS}}
                         for f in ("dmfa_mean_incomplete", "dmfa_misconv_incomplete", "zero") for s in (0, 1, 2)])
    psnr = {("dmfa_mean_incomplete", 0): 13.0, ("dmfa_mean_incomplete", 1): 13.5, ("dmfa_mean_incomplete", 2): 13.2,
            ("dmfa_misconv_incomplete", 0): 12.0, ("dmfa_misconv_incomplete", 1): 12.1,
            ("dmfa_misconv_incomplete", 2): 12.6}
    rows["psnr_all"] = [psnr.get((f, s), 10.0) for f, s in zip(rows["front"], rows["seed"])]
    got = {(r["front"], r["other"], r["metric"]): r for r in wae_report.paired_rows(rows)}
    r = got[("dmfa_misconv_incomplete", "dmfa_mean_incomplete", "psnr_all")]
    d = [-1.0, -1.4, -0.6]
    mean = sum(d) / 3
    sd = (sum((x - mean) ** 2 for x in d) / 2) ** 0.5
    assert r["differences"] == pytest.approx(d) and r["mean"] == pytest.approx(mean)
    assert r["half_width"] == pytest.approx(4.302653 * sd / 3 ** 0.5, rel=1e-5)
    assert r["high"] < 0                                        # resolved: MisConv below mean imputation
    tie = got[("dmfa_misconv_incomplete", "dmfa_mean_incomplete", "ssim_all")]
    assert tie["differences"] == [0.0, 0.0, 0.0] and tie["half_width"] == 0
    md = wae_report.paired_markdown(rows)
    assert "| `dmfa_misconv_incomplete` − `dmfa_mean_incomplete` | PSNR all (dB) | 3 | -1.00, -1.40, -0.60 |" in md
    assert "resolved" in md and ("dmfa_misconv_complete", "dmfa_mean_complete", "psnr_all") not in got  # absent fronts
