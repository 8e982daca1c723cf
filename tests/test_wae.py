"""labkit.models.wae (architectures, losses, the two optimisation steps) and labkit.studies.wae (the
sweep's bookkeeping, notebook 03)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labkit.mfa import MFA
from labkit.models import wae as W
from labkit.studies import wae as WS

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


def test_paper_profile_uses_the_paper_settings():
    p = notebook_parameters("paper", "03_wae")
    s = W.PAPER_SETTINGS["mnist"]
    assert (p["epochs"], p["batch_size"], p["lr"], p["lr_disc"]) == (s["epochs"], s["batch_size"], s["lr"], s["lr_disc"])
    assert len(p["seeds"]) == 3 and p["dataset"] == "mnist"


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
    loss = W.reconstruction_loss(logits, target, counted)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()
    # the NaN target at the uncounted pixel gives no gradient (and no NaN) anywhere
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 1, 0] == 0
    mse = W.reconstruction_loss(logits.detach(), target, counted, "mse")
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
    assert W.reconstruction_loss(logits, target, counted).item() == pytest.approx((a + b) / 2)


def test_reconstruction_loss_rejects_bad_input():
    with pytest.raises(TypeError, match="counted must be a bool"):
        W.reconstruction_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="counted must have shape"):
        W.reconstruction_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(2, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="kind must be"):
        W.reconstruction_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2, dtype=torch.bool), "l1")


def test_adversarial_losses_by_hand():
    d = W.Discriminator(3, ["lin4", "lin1"])
    with torch.no_grad():   # a constant discriminator: D(z) = sigmoid(0.7) for every z
        for p in d.parameters():
            p.zero_()
        d.net[-1].bias.fill_(0.7)
    z = torch.randn(5, 3)
    s = 1 / (1 + math.exp(-0.7))
    assert W.discriminator_loss(d, z, torch.randn(5, 3)).item() == pytest.approx(-math.log(s) - math.log(1 - s), rel=1e-6)
    assert W.encoder_adversarial_loss(d, z).item() == pytest.approx(-math.log(s), rel=1e-6)


# --------------------------------------------------------------------------- the two steps
def _step_setup(front):
    """A tiny WAE with ``front``, its optimisers, a batch, its codes and snapshots of the three nets."""
    torch.manual_seed(0)
    model = _tiny(front)
    opts = W.make_optimizers(model)
    x, missing, complete = _batch()
    z = model.encode(x, missing, _aux(front, complete, missing))
    snaps = _snapshot(model.encoder), _snapshot(model.decoder), _snapshot(model.discriminator)
    return model, opts, x, missing, z, snaps


@pytest.mark.parametrize("front", ["zero", "pc", "gt", "dmfa_misconv_complete"])
def test_discriminator_step_changes_only_the_discriminator(front):
    model, opts, x, missing, z, (enc, dec, disc) = _step_setup(front)
    out = W.discriminator_step(model, opts["discriminator"], z, generator=torch.Generator().manual_seed(1))
    assert set(out) == {"d_loss", "d_prior", "d_encoded"} and all(math.isfinite(v) for v in out.values())
    assert _changed(model.encoder, enc) == set() and _changed(model.decoder, dec) == set()
    assert _changed(model.discriminator, disc) == set(disc)          # every discriminator parameter moved
    assert all(p.grad is None for p in model.autoencoder_parameters())


@pytest.mark.parametrize("front", ["zero", "pc", "gt", "dmfa_misconv_complete"])
def test_autoencoder_step_changes_only_encoder_and_decoder(front):
    model, opts, x, missing, z, (enc, dec, disc) = _step_setup(front)
    out = W.autoencoder_step(model, opts["autoencoder"], z, x, ~missing, lambda_adv=1.0)
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
    opts = W.make_optimizers(model, lr=1e-2)
    first = W.train_step(model, opts, x, missing, generator=torch.Generator().manual_seed(0))
    # the values behind the mask never matter: NaN there or the true pixels give the same step
    torch.manual_seed(0)
    twin = _tiny()
    same = W.train_step(twin, W.make_optimizers(twin, lr=1e-2), complete, missing,
                        generator=torch.Generator().manual_seed(0))
    assert same == pytest.approx(first, rel=1e-5, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        last = W.train_step(model, opts, x, missing, generator=g)
    assert last["recon"] < 0.8 * first["recon"]


def test_train_step_rejects_bad_input():
    model = _tiny()
    opts = W.make_optimizers(model)
    x, missing, _ = _batch(B=2)
    with pytest.raises(ValueError, match="optimizers must have keys"):
        W.train_step(model, {"autoencoder": opts["autoencoder"]}, x, missing)
    with pytest.raises(TypeError, match="missing must be a bool"):
        W.train_step(model, opts, x, missing.float())
    with pytest.raises(ValueError, match="lr_disc must be a positive"):
        W.make_optimizers(model, lr_disc=0.0)


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


def _fake_cell(calls):
    def run(dataset, front, seed, cfg):
        calls.append((dataset, front, seed))
        ex = {k: torch.rand(2, 1, 28, 28) for k in ("input", "reconstruction", "target", "samples")}
        ex["missing"] = torch.zeros(2, 1, 28, 28, dtype=torch.bool)
        row = {"dataset": dataset, "front": front, "seed": seed, **{k: 1.0 for k in WS.METRIC_COLUMNS},
               "epochs": cfg.epochs, "n_train": 10, "n_test": 10}
        return {"row": row, "details": {**row, "wall_seconds": 0.0}, "checkpoint": cfg.scratch_path() / "x.pt",
                "examples": ex}
    return run


def test_sweep_appends_rows_and_skips_finished_cells(tmp_path):
    calls = []
    cfg = WS.WAEConfig(results_dir=str(tmp_path), dmfa_complete=None, progress=False)
    df = WS.run_sweep("mnist", ["zero", "pc", "misconv"], [0, 1], "t", config=cfg, _run_cell=_fake_cell(calls),
                     max_cells=3)
    # seeds outermost; misconv has no DMFA checkpoint configured, so it is skipped
    assert calls == [("mnist", "zero", 0), ("mnist", "pc", 0), ("mnist", "zero", 1)]
    assert list(df.columns) == WS.WAE_COLUMNS and len(df) == 3
    assert (tmp_path / "figures" / "mnist-zero-s0-reconstruction.png").is_file()
    df = WS.run_sweep("mnist", ["zero", "pc", "misconv"], [0, 1], "t", config=cfg, _run_cell=_fake_cell(calls))
    assert calls[3:] == [("mnist", "pc", 1)] and len(df) == 4     # only the unfinished cell ran
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 4
    assert "| zero | 2 |" in WS.table_markdown(df) and "14.90" in WS.table_markdown(df)


def test_sweep_rejects_unknown_settings(tmp_path):
    with pytest.raises(ValueError, match="unknown WAE setting 'epoch'"):
        WS.run_sweep("mnist", ["zero"], [0], "t", results_dir=str(tmp_path), epoch=3)
    with pytest.raises(ValueError, match="no WAE architecture for dataset 'cifar100'"):
        WS.run_sweep("cifar100", ["zero"], [0], "t", results_dir=str(tmp_path))


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
    import pandas as pd

    df = pd.read_csv(tmp_path / "wae" / "metrics.csv")
    assert sorted(df["front"]) == ["gt", "zero"] and list(df.columns) == WS.WAE_COLUMNS
    assert df[WS.METRIC_COLUMNS].notna().all().all()
    assert (tmp_path / "wae" / "figures" / "mnist-gt-s0-samples.png").is_file()
