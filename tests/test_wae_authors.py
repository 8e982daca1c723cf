"""The WAE trained as the authors' code trains it (recipe "authors": alternating discriminator and
autoencoder steps of one Adam, MSE averaged over all pixels), the joint step kept as
"authors_joint", and the rename of the rows made with the joint step when it was called "authors"."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from labkit.models import wae as W
from labkit.models import wae_training as WT
from labkit.studies import wae as WS
from labkit.studies import wae_cells
from labkit.studies.engine import Cell

#: a small MNIST-shaped WAE with BatchNorm in encoder and decoder (the step tests run in milliseconds)
TINY = {"encoder": ["conv4", "down", "conv4", "lin3"], "decoder": ["lin784", "up", "conv4", "conv1"],
        "discriminator": ["lin8", "lin8", "lin1"]}


def _tiny(seed=0):
    torch.manual_seed(seed)
    return W.WAE("zero", "mnist", architecture=TINY, device="cpu")


def _batch(seed, B=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, 28, 28, generator=g)
    missing = torch.zeros(B, 1, 28, 28, dtype=torch.bool)
    missing[:, :, 7:21, 3:17] = True                       # a 14×14 square: 3/4 of the pixels observed
    return torch.where(missing, torch.tensor(float("nan")), x), missing, x


def _authors_loop(model, batches, *, lr, prior_seed, weight=0.01):
    """The authors' ``train_epoch`` written out with plain torch, as their code reads (under PyTorch
    1.x): one Adam over every parameter; per batch: ``zero_grad`` (zeroing existing gradients),
    encoder and decoder frozen, full forward (encode, D on codes and on prior samples, decode both),
    ``BCELoss(weight)(D(prior), 1) + BCELoss(weight)(D(codes), 0)`` on sigmoid outputs, step; then
    ``zero_grad``, the discriminator frozen, full forward again, ``MSELoss()(decoded * known, x * known)``
    + ``BCELoss(weight)(D(codes), 1)``, step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(prior_seed)
    bce = nn.BCELoss(weight=torch.tensor(weight))
    mse = nn.MSELoss()
    ae = list(model.encoder.parameters()) + list(model.decoder.parameters())
    disc = list(model.discriminator.parameters())

    def forward(x, missing):
        z = model.encode(x, missing)
        d_true = torch.sigmoid(model.discriminator.net(z)).reshape(-1)
        fake = torch.randn(z.shape[0], z.shape[1], generator=g)
        d_fake = torch.sigmoid(model.discriminator.net(fake)).reshape(-1)
        dec = torch.sigmoid(model.decoder(z))
        torch.sigmoid(model.decoder(fake))
        return dec, d_true, d_fake

    model.train()
    for x, missing, complete in batches:
        known = (~missing).float()
        for p in model.parameters():              # Module.zero_grad of PyTorch 1.x
            if p.grad is not None:
                p.grad.zero_()
        for p in ae:
            p.requires_grad_(False)
        for p in disc:
            p.requires_grad_(True)
        _, d_true, d_fake = forward(x, missing)
        (bce(d_fake, torch.ones_like(d_fake)) + bce(d_true, torch.zeros_like(d_true))).backward()
        opt.step()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        for p in ae:
            p.requires_grad_(True)
        for p in disc:
            p.requires_grad_(False)
        dec, d_true, _ = forward(x, missing)
        B = x.shape[0]
        recon = mse((dec * known).reshape(B, -1), (torch.nan_to_num(complete) * known).reshape(B, -1))
        (recon + bce(d_true, torch.ones_like(d_true))).backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return opt


def test_alternating_step_is_the_authors_loop():
    """Two batches through ``train_step(step="alternating")`` and through the loop above end with
    the same weights and BatchNorm statistics: the order of the two steps, the zeroed (not dropped)
    gradients of frozen networks, the loss weights and the all-pixel averaging all agree."""
    model = _tiny()
    twin = copy.deepcopy(model)
    batches = [_batch(1), _batch(2)]
    opts = WT.make_optimizers(model, lr=1e-2, lr_disc=None, recipe="authors")
    g = torch.Generator().manual_seed(7)
    for x, missing, _ in batches:
        out = WT.train_step(model, opts, x, missing, generator=g, lambda_adv=0.01, disc_weight=0.01, recon="mse",
                           step="alternating", recon_average="all_pixels")
    assert set(out) == {"d_loss", "d_prior", "d_encoded", "loss", "recon", "adv"}
    _authors_loop(twin, batches, lr=1e-2, prior_seed=7)
    mine, theirs = model.state_dict(), twin.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.allclose(mine[name].float(), theirs[name].float(), rtol=1e-4, atol=1e-6), name
    # the step moved things at all (a lr of 1e-2 on two batches)
    assert not torch.equal(mine["discriminator.net.0.weight"], _tiny().state_dict()["discriminator.net.0.weight"])


def test_two_optimizer_steps_per_batch_and_momentum_of_frozen_networks():
    """Adam's step counts tell which parameters each step moved: in the first batch the
    discriminator is stepped twice (its own step, then a gradient-free momentum step while frozen)
    and the encoder once (it had no gradient yet at the discriminator's step); from then on every
    parameter takes two Adam steps per batch."""
    model = _tiny()
    opt = WT.make_optimizers(model, lr=1e-3, lr_disc=None, recipe="authors")["all"]
    calls = []
    real_step = opt.step
    opt.step = lambda *a, **k: (calls.append(1), real_step(*a, **k))[1]

    def steps(module):
        return {int(opt.state[p]["step"]) for p in module.parameters()}

    x, missing, _ = _batch(3)
    WT.train_step(model, {"all": opt}, x, missing, generator=torch.Generator().manual_seed(0),
                 lambda_adv=0.01, disc_weight=0.01, recon="mse", step="alternating", recon_average="all_pixels")
    assert len(calls) == 2
    assert steps(model.discriminator) == {2} and steps(model.encoder) == {1} and steps(model.decoder) == {1}
    enc_before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    # the second batch's discriminator step moves the (frozen) encoder by its momentum alone
    step1 = []
    opt.step = lambda *a, **k: (step1.append({n: p.detach().clone() for n, p in model.encoder.named_parameters()})
                                if not step1 else None, real_step(*a, **k))[1]
    x, missing, _ = _batch(4)
    WT.train_step(model, {"all": opt}, x, missing, generator=torch.Generator().manual_seed(1),
                 lambda_adv=0.01, disc_weight=0.01, recon="mse", step="alternating", recon_average="all_pixels")
    assert steps(model.discriminator) == {4} and steps(model.encoder) == {3}
    assert all(torch.equal(step1[0][n], enc_before[n]) for n in enc_before)     # not before the first step ...
    moved = [n for n, p in model.encoder.named_parameters() if not torch.equal(p.detach(), enc_before[n])]
    assert moved                                                                  # ... but by the end


def test_the_autoencoder_step_sees_the_updated_discriminator():
    """The fooling term of step 2 is computed with the discriminator after step 1: its value equals
    BCE(D_new(z), 1) for the codes of the same (unchanged) encoder, not BCE(D_old(z), 1)."""
    model = _tiny()
    opt = WT.make_optimizers(model, lr=5e-2, lr_disc=None, recipe="authors")["all"]
    x, missing, _ = _batch(5)
    before = copy.deepcopy(model)
    seen = {}
    real_step = opt.step

    def spy(*a, **k):
        if "d" not in seen:
            out = real_step(*a, **k)
            seen["d"] = copy.deepcopy(model.discriminator)           # the discriminator after step 1
            return out
        return real_step(*a, **k)

    opt.step = spy
    out = WT.train_step(model, {"all": opt}, x, missing, generator=torch.Generator().manual_seed(0),
                       lambda_adv=0.01, disc_weight=0.01, recon="mse", step="alternating", recon_average="all_pixels")
    # the encoder did not move in step 1 (no momentum yet), so step 2's codes are before's codes
    # (BatchNorm in training mode: the batch statistics, the same batch)
    before.train()
    with torch.no_grad():
        z = before.encode(x, missing)
        new = nn.functional.binary_cross_entropy_with_logits(seen["d"].logits(z), torch.ones(len(z)))
        old = nn.functional.binary_cross_entropy_with_logits(before.discriminator.logits(z), torch.ones(len(z)))
    assert out["adv"] == pytest.approx(float(new), rel=1e-5)
    assert abs(float(new) - float(old)) > 1e-3                          # the two are distinguishable


def test_reconstruction_averaged_over_all_pixels_by_hand():
    """A 2-image batch of 2×2 images, logits 0 (output 0.5). Image 0: target 1, 0, 1, 0 with one
    pixel missing (the last): squared errors 0.25 × 3 counted. Image 1: all 4 counted, target
    0.5 everywhere: errors 0. All-pixel average: 0.75 / 8. Per-image: (0.25 + 0) / 2."""
    logits = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[1.0, 0.0], [1.0, float("nan")]]).reshape(1, 1, 2, 2)
    target = torch.cat([target, torch.full((1, 1, 2, 2), 0.5)])
    counted = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    counted[0, 0, 1, 1] = False
    assert float(WT.reconstruction_loss(logits, target, counted, "mse", "all_pixels")) == pytest.approx(0.75 / 8)
    assert float(WT.reconstruction_loss(logits, target, counted, "mse", "per_image")) == pytest.approx(0.125)
    # BCE at 0.5: log 2 per counted pixel (7 of 8)
    assert float(WT.reconstruction_loss(logits, target, counted, "bce", "all_pixels")) == pytest.approx(7 * math.log(2) / 8)
    # on MNIST squares every image has 3/4 of its pixels counted: the authors' average is 3/4 of ours
    x, missing, complete = _batch(0)
    lg = torch.randn(5, 1, 28, 28)
    a = WT.reconstruction_loss(lg, complete, ~missing, "mse", "all_pixels")
    b = WT.reconstruction_loss(lg, complete, ~missing, "mse", "per_image")
    assert float(a) == pytest.approx(0.75 * float(b), rel=1e-6)
    with pytest.raises(ValueError, match="average must be"):
        WT.reconstruction_loss(logits, target, counted, "mse", "mean")


def test_recipes_and_their_settings():
    joint = W.recipe_settings("authors_joint")
    assert joint == {"recipe": "authors_joint", "optimizers": "one", "lambda_adv": 0.01, "disc_weight": 0.01,
                     "recon": "mse"}
    authors = W.recipe_settings("authors")
    assert authors["step"] == "alternating" and authors["recon_average"] == "all_pixels"
    assert authors["gt_counted"] == "observed"
    assert W.recipe_procedure("authors_joint") == {"step": "joint", "recon_average": "per_image", "gt_counted": "all"}
    assert W.recipe_procedure("supplement")["step"] == "sequential"
    model = _tiny()
    with pytest.raises(ValueError, match="step 'alternating' does not go with"):
        WT.train_step(model, WT.make_optimizers(model, recipe="supplement"), *_batch(0)[:2], step="alternating")


def _plan(tmp_path, recipe, front="zero"):
    from labkit.studies.cells import CellData, cell_masks

    g = torch.Generator().manual_seed(0)
    n, nt = 8, 4
    imgs, labels = torch.rand(n + nt, 1, 28, 28, generator=g), torch.randint(0, 10, (n + nt,), generator=g)
    miss = cell_masks("mnist", "train", "square", 0, n + nt, 28, 28)
    data = CellData("mnist", "square", 0, imgs[:n], labels[:n], miss[:n], torch.arange(n), torch.arange(0),
                    imgs[n:], labels[n:], miss[n:])
    cfg = WS.WAEConfig(recipe=recipe, results_dir=str(tmp_path), n_train=n, n_test=nt, dmfa_complete=None,
                       precision="32", device="cpu")
    return WS.plan_cell("mnist", front, 0, cfg, data=data)


def test_joint_rows_called_authors_are_renamed_with_their_keys(tmp_path):
    joint = _plan(tmp_path, "authors_joint")
    # a row made before the rename: the same cell, settings saying "authors"
    old = Cell("wae", joint.coords, {**joint.settings, "recipe": "authors"}, joint.inputs)
    new_authors = _plan(tmp_path, "authors")
    supplement = _plan(tmp_path, "supplement", front="gt")
    assert len({old.key, joint.key, new_authors.key}) == 3
    store = WS.result_store(tmp_path)
    metrics = {c: 1.0 for c in WS.METRIC_COLUMNS}
    store.record(old, metrics, {"settings": dict(old.settings), "epochs": 1})
    store.record(supplement, metrics, {"settings": dict(supplement.settings)})
    figures = tmp_path / "figures"
    figures.mkdir()
    for what in ("reconstruction", "samples"):
        (figures / f"{WS.cell_stem(old)}-{what}.png").write_bytes(b"png " + what.encode())
    before_supplement_line = [line for line in (tmp_path / "runs.jsonl").read_text().splitlines()
                              if supplement.key in line]
    assert WS.migrate_renamed_recipes(tmp_path, dry_run=True) == [(old.key, joint.key)]
    assert set(store.read()["key"]) == {old.key, supplement.key}          # a dry run writes nothing
    assert WS.migrate_renamed_recipes(tmp_path) == [(old.key, joint.key)]
    df = store.read()
    assert set(df["key"]) == {joint.key, supplement.key}
    row = df[df["key"] == joint.key].iloc[0]
    assert json.loads(row["settings"]) == json.loads(json.dumps(dict(joint.settings)))
    rec = {d["key"]: d for d in store.read_details()}
    assert rec[joint.key]["settings"]["recipe"] == "authors_joint"
    assert rec[joint.key]["recipe_renamed"] == {"from": "authors", "to": "authors_joint", "old_key": old.key}
    assert [line for line in (tmp_path / "runs.jsonl").read_text().splitlines()
            if supplement.key in line] == before_supplement_line            # untouched, byte for byte
    for what in ("reconstruction", "samples"):
        assert (figures / f"{WS.cell_stem(joint)}-{what}.png").read_bytes() == b"png " + what.encode()
        assert not (figures / f"{WS.cell_stem(old)}-{what}.png").exists()
    assert WS.migrate_renamed_recipes(tmp_path) == []                      # nothing left to do


def test_rename_refuses_a_row_whose_key_is_not_its_digest(tmp_path):
    joint = _plan(tmp_path, "authors_joint")
    old = Cell("wae", joint.coords, {**joint.settings, "recipe": "authors"}, joint.inputs)
    WS.result_store(tmp_path).record(old, {c: 1.0 for c in WS.METRIC_COLUMNS}, {})
    csv = tmp_path / "metrics.csv"
    csv.write_text(csv.read_text().replace('"mask"":""square""', '"mask"":""noise""'))
    with pytest.raises(ValueError, match="not the digest"):
        WS.migrate_renamed_recipes(tmp_path)


def test_committed_wae_rows_name_the_step_they_were_made_with():
    """After the rename, no committed row says "authors" without the alternating step's marker."""
    csv = Path(__file__).resolve().parents[1] / "results" / "wae" / "cpu" / "metrics.csv"
    rows = WS.read_results(csv)
    recipes = [json.loads(s).get("recipe") for s in rows["settings"]]
    assert recipes.count("authors_joint") == 15 and recipes.count("supplement") == 15
    assert all("step" in json.loads(s) for s, r in zip(rows["settings"], recipes) if r == "authors")


class _Stop(Exception):
    pass


@pytest.mark.parametrize("recipe, all_counted", [("authors", False), ("authors_joint", True)])
def test_ground_truth_front_counts_what_the_recipe_says(tmp_path, monkeypatch, recipe, all_counted):
    """In the authors' loop the mask does not change with the front: the ground-truth front's loss
    counts the observed pixels only (averaged over all pixels); this lab's ceiling counts them all."""
    seen = {}

    def capture(model, optimizers, x, missing, aux=None, *, target, counted, step, recon_average, **kw):
        seen.update(counted=counted.clone(), missing=missing.clone(), step=step, average=recon_average)
        raise _Stop

    monkeypatch.setattr(wae_cells, "train_step", capture)
    cfg = WS.WAEConfig(recipe=recipe, results_dir=str(tmp_path), n_train=16, n_test=8, epochs=1, batch_size=8,
                       cache_dir=str(tmp_path / "cache"), precision="32", device="cpu", dmfa_complete=None,
                       fronts=["gt"], seeds=[0])
    (cell,) = WS.plan(cfg)
    with pytest.raises(_Stop):
        WS.run_cell(cell, cfg, features=lambda x: x.flatten(1)[:, :4], figures=False, progress=False)
    assert bool(seen["counted"].all()) == all_counted
    if not all_counted:
        assert torch.equal(seen["counted"], ~seen["missing"])
    assert (seen["step"], seen["average"]) == (W.recipe_procedure(recipe)["step"],
                                               W.recipe_procedure(recipe)["recon_average"])
