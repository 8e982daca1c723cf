"""labkit.precision (names, autocast, scaler, float32 casts) and fit's precision handling."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from labkit import precision as P
from labkit.checkpoint import load_checkpoint
from labkit.mfa import MFA
from labkit.training import CheckpointMismatchError, fit
from tests.conftest import dmfa_recipe

N, BATCH, EPOCHS = 32, 8, 3  # 4 batches per epoch
BF16 = "bf16-mixed"


# ----------------------------------------------------------------------------- names and errors


def test_unknown_names_list_the_valid_ones():
    for bad in ("fp32", "bf16", 32, None, "16"):
        with pytest.raises(ValueError, match=re.escape("valid: '32', 'bf16-mixed', '16-mixed', 'auto'")):
            P.resolve_precision(bad, "cpu")
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        P.autocast("fp16", "cpu").__enter__()
    with pytest.raises(ValueError, match="needs a resolved precision"):
        P.autocast_dtype("auto")
    assert P.autocast_dtype("32") is None and P.autocast_dtype(BF16) is torch.bfloat16


def test_float16_mixed_on_a_cpu_is_a_clear_error():
    msg = r"'16-mixed' .* needs a CUDA device, got 'cpu'; on a CPU use 'bf16-mixed' or 'auto'"
    with pytest.raises(ValueError, match=msg):
        P.resolve_precision("16-mixed", "cpu")
    with pytest.raises(ValueError, match=msg):
        with P.autocast("16-mixed", "cpu"):
            pass
    with pytest.raises(ValueError, match=msg):
        P.grad_scaler("16-mixed", "cpu")
    with pytest.raises(ValueError, match=msg):
        fit(nn.Linear(1, 1), None, lambda e, g: [0], lambda b, e, g: {}, epochs=1, progress=False,
            precision="16-mixed")


@pytest.mark.parametrize("flags, expected", [
    ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}, "32"),
    ({"avx512_bf16": True, "amx_bf16": False}, BF16),
    ({"avx512_bf16": False, "amx_bf16": True}, BF16),
    ({"sve_bf16": True}, BF16),
    ({}, "32"),
])
def test_auto_follows_the_cpu_bf16_capability(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    assert P.cpu_has_native_bf16() is (expected == BF16)
    assert P.resolve_precision("auto", "cpu") == expected
    assert P.resolve_precision("32", "cpu") == "32" and P.resolve_precision(BF16, "cpu") == BF16


def test_auto_is_recorded_resolved_in_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    model, opt, _, batches, step = make_run(BF16)
    fit(model, opt, batches, step, epochs=1, progress=False, precision="auto", checkpoint=tmp_path / "a.pt",
        config={"lr": 0.01})
    assert load_checkpoint(tmp_path / "a.pt")["config"] == {"lr": 0.01, "precision": BF16}
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    model, opt, _, batches, step = make_run("32")
    # a trainer may also put the requested name in its config: it is replaced by the resolved one
    fit(model, opt, batches, step, epochs=1, progress=False, precision="auto", checkpoint=tmp_path / "b.pt",
        config={"precision": "auto"})
    assert load_checkpoint(tmp_path / "b.pt")["config"] == {"precision": "32"}


# ----------------------------------------------------------------------------- autocast, scaler, casts


def test_autocast_is_a_noop_for_32_and_bf16_for_bf16_mixed():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6)
    with P.autocast("32", "cpu"):
        assert conv(x).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")
    with P.autocast(BF16, "cpu"):
        y = conv(x)
        assert y.dtype == torch.bfloat16
        with P.float32_region("cpu"):
            assert conv(P.to_float32(y).narrow(1, 0, 3)).dtype == torch.float32
        assert conv(x).dtype == torch.bfloat16  # autocast is back on after the float32 region


def test_grad_scaler_is_a_passthrough_outside_16_mixed():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    for name in ("32", BF16):
        scaler = P.grad_scaler(name, "cpu")
        assert isinstance(scaler, torch.amp.GradScaler) and not scaler.is_enabled()
        loss = (w * w).sum()
        assert scaler.scale(loss) is loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert scaler.state_dict() == {}
    # two SGD steps of w <- w - 0.5 * 2w = 0: the scaler let opt.step() through both times
    assert torch.equal(w.detach(), torch.zeros(2))


def test_to_float32_casts_low_precision_only_and_keeps_gradients():
    a = torch.randn(3, requires_grad=True)
    b16 = a.to(torch.bfloat16)
    f64 = torch.randn(2, dtype=torch.float64)
    mask = torch.ones(2, dtype=torch.bool)
    out, same64, same_mask, nothing = P.to_float32(b16, f64, mask, None)
    assert out.dtype == torch.float32 and same64 is f64 and same_mask is mask and nothing is None
    assert P.to_float32(torch.ones(1, dtype=torch.float16)).dtype == torch.float32  # one arg: no tuple
    out.sum().backward()
    assert a.grad is not None and torch.equal(a.grad, torch.ones(3))
    with pytest.raises(TypeError, match="got list"):
        P.to_float32([b16])
    with pytest.raises(TypeError, match="at least one"):
        P.to_float32()


class Heads(nn.Module):
    """A tiny conv net giving the four MFA parameters of 1x4x4 images (K=2, L=1)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.mean = nn.Conv2d(8, 2, 3, padding=1)
        self.factor = nn.Conv2d(8, 2, 3, padding=1)
        self.var = nn.Conv2d(8, 2, 3, padding=1)
        self.logit = nn.Linear(8 * 16, 2)

    def forward(self, x):
        h = self.body(x)
        B = x.shape[0]
        return (self.logit(h.flatten(1)), self.mean(h).view(B, 2, 1, 4, 4), self.factor(h).view(B, 2, 1, 1, 4, 4),
                self.var(h).view(B, 2, 1, 4, 4))


def _mfa(logits, means, factors, raw_var):
    return MFA(torch.softmax(logits, 1), means, 0.25 * torch.tanh(factors), 1e-3 + torch.sigmoid(raw_var),
               validate=False)


def test_float32_likelihood_from_bf16_heads():
    torch.manual_seed(0)
    net = Heads()
    x = torch.rand(5, 1, 4, 4)
    where = torch.rand(5, 1, 4, 4) < 0.5
    with P.autocast(BF16, "cpu"):
        heads = net(x)
        assert all(h.dtype == torch.bfloat16 for h in heads[1:])
        with P.float32_region("cpu"):
            mfa = P.to_float32(_mfa(*P.to_float32(*heads)))
            lp = mfa.log_prob(x, where)
    assert lp.dtype == torch.float32 and mfa.means.dtype == torch.float32 and torch.isfinite(lp).all()
    # the float32 region computed exactly what float32 code outside autocast computes from those heads
    ref = _mfa(*(h.detach().float() for h in heads)).log_prob(x, where)
    assert torch.equal(lp.detach(), ref)
    (-lp.mean()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in net.parameters())
    # float32 inputs are not enough: under autocast the likelihood's matmuls would run in bfloat16
    with P.autocast(BF16, "cpu"):
        low = _mfa(*P.to_float32(*net(x)))
        try:
            lp_low = low.log_prob(x, where)
        except RuntimeError as exc:  # e.g. a factorisation without a bfloat16 kernel
            assert "BFloat16" in str(exc)
        else:
            assert not torch.equal(lp_low.detach().float(), ref)


# ----------------------------------------------------------------------------- fit under bf16-mixed


class Interrupted(Exception):
    pass


def tiny_images():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()
    return x, y


def make_run(prec, seed=0, calls=None):
    """Small conv net with dropout and Adam; ``step`` autocasts its forward under ``prec``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = P.grad_scaler(prec, "cpu")
    x, y = tiny_images()
    calls = calls if calls is not None else {"steps": 0, "fail_at": None, "dtypes": set()}

    def batches(epoch, generator):
        order = torch.randperm(N, generator=generator)
        return [order[i:i + BATCH] for i in range(0, N, BATCH)]

    def step(idx, epoch, generator):
        if calls["fail_at"] == (epoch, calls["steps"] % (N // BATCH)):
            raise Interrupted
        calls["steps"] += 1
        noise = 0.05 * torch.randn(len(idx), 3, 8, 8, generator=generator)
        with P.autocast(prec, "cpu"):
            logits = model(x[idx] + noise)
        calls["dtypes"].add(logits.dtype)
        loss = nn.functional.cross_entropy(P.to_float32(logits), y[idx])
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return {"loss": loss.detach()}

    return model, opt, scaler, batches, step


def test_bf16_mixed_trains_with_finite_losses_and_float32_state():
    model, opt, scaler, batches, step = make_run(BF16)
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"steps": 0, "fail_at": None, "dtypes": set()}
    model, opt, scaler, batches, step = make_run(BF16, calls=calls)
    hist = fit(model, opt, batches, step, epochs=EPOCHS, seed=1, progress=False, precision=BF16, scaler=scaler)
    assert calls["dtypes"] == {torch.bfloat16}  # the network really ran in bfloat16
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
    for p0, p in zip(before, model.parameters()):
        assert p.dtype == torch.float32 and not torch.equal(p0, p.detach())
    assert all(v.dtype == torch.float32 for s in opt.state_dict()["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0)


def test_bf16_mixed_resume_is_bit_identical(tmp_path):
    model_a, opt_a, sc_a, batches_a, step_a = make_run(BF16)
    hist_a = fit(model_a, opt_a, batches_a, step_a, epochs=EPOCHS, seed=3, progress=False, precision=BF16,
                 scaler=sc_a, checkpoint=tmp_path / "a.pt")

    path = tmp_path / "b.pt"
    calls = {"steps": 0, "fail_at": (1, 2), "dtypes": set()}
    model_b, opt_b, sc_b, batches_b, step_b = make_run(BF16, calls=calls)
    with pytest.raises(Interrupted):
        fit(model_b, opt_b, batches_b, step_b, epochs=EPOCHS, seed=3, progress=False, precision=BF16,
            scaler=sc_b, checkpoint=path)
    assert load_checkpoint(path)["epoch"] == 1

    model_c, opt_c, sc_c, batches_c, step_c = make_run(BF16, seed=99)
    torch.manual_seed(4321)
    hist_c = fit(model_c, opt_c, batches_c, step_c, epochs=EPOCHS, seed=3, progress=False, precision=BF16,
                 scaler=sc_c, checkpoint=path)
    for (name, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(a, c), f"parameter {name} differs after a bf16-mixed resume"
    for k, v in opt_a.state_dict()["state"].items():
        assert torch.equal(v["exp_avg_sq"], opt_c.state_dict()["state"][k]["exp_avg_sq"])
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(hist_c) == strip(hist_a)
    assert load_checkpoint(path)["config"]["precision"] == BF16


def test_resuming_under_another_precision_is_refused(tmp_path, capsys):
    path = tmp_path / "run.pt"
    model, opt, scaler, batches, step = make_run(BF16)
    fit(model, opt, batches, step, epochs=1, seed=2, progress=False, precision=BF16, scaler=scaler, checkpoint=path,
        config={"lr": 0.01})

    model, opt, scaler, batches, step = make_run("32")
    with pytest.raises(CheckpointMismatchError, match=re.escape(
            "precision: checkpoint 'bf16-mixed', now '32' (resume it with precision='bf16-mixed', "
            "or pass allow_precision_change=True to continue in '32')")):
        fit(model, opt, batches, step, epochs=2, seed=2, progress=False, precision="32", checkpoint=path,
            config={"lr": 0.01})
    with pytest.raises(CheckpointMismatchError, match=r"precision: .*; config differs \(lr: checkpoint 0.01, now 0.1\)"):
        fit(model, opt, batches, step, epochs=2, seed=2, progress=False, precision="32", checkpoint=path,
            config={"lr": 0.1})
    assert load_checkpoint(path)["epoch"] == 1  # nothing was trained by the refused calls

    hist = fit(model, opt, batches, step, epochs=2, seed=2, progress=True, precision="32", checkpoint=path,
               config={"lr": 0.01}, allow_precision_change=True)
    assert "was trained in precision 'bf16-mixed'; continuing in '32'" in capsys.readouterr().out
    stored = load_checkpoint(path)
    assert len(hist) == 2 and stored["config"]["precision"] == "32"
    assert stored["precision_changes"] == [{"epoch": 1, "from": BF16, "to": "32"}]
    # the same precision again: resumes without complaint (a third epoch)
    assert len(fit(model, opt, batches, step, epochs=3, seed=2, progress=False, precision="32", checkpoint=path,
                   config={"lr": 0.01})) == 3


def test_fit_checks_that_the_step_autocasts_with_its_precision():
    model, opt, scaler, batches, step32 = make_run("32")
    with pytest.raises(ValueError, match=r"fit\(precision='bf16-mixed'\) but step\(\) entered .* with '32'"):
        fit(model, opt, batches, step32, epochs=1, progress=False, precision=BF16)

    def plain_step(idx, epoch, generator):  # never enters labkit.precision.autocast
        loss = model(torch.zeros(2, 3, 8, 8)).sum()
        loss.backward()
        return {"loss": loss.detach()}

    with pytest.raises(ValueError, match=r"step\(\) did not run under labkit.precision.autocast\('bf16-mixed'"):
        fit(model, opt, batches, plain_step, epochs=1, progress=False, precision=BF16)
    fit(model, opt, batches, plain_step, epochs=1, progress=False, precision="32")  # fine in float32
    model, opt, scaler, batches, step_bf16 = make_run(BF16)
    with pytest.raises(ValueError, match=r"fit\(precision='32'\) but step\(\) entered .* with 'bf16-mixed'"):
        fit(model, opt, batches, step_bf16, epochs=1, progress=False)
    with pytest.raises(ValueError, match="config says precision '32' but fit was given precision='bf16-mixed'"):
        fit(model, opt, batches, step_bf16, epochs=1, progress=False, precision=BF16, config={"precision": "32"})
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        fit(model, opt, batches, step_bf16, epochs=1, progress=False, precision=BF16, scaler=object())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 mixed precision needs CUDA")
def test_float16_mixed_on_cuda_needs_and_checkpoints_a_scaler(tmp_path):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(32, 4, device=dev)
    scaler = P.grad_scaler("16-mixed", dev)
    assert scaler.is_enabled()

    def step(i, epoch, g):
        with P.autocast("16-mixed", dev):
            out = model(x)
            assert out.dtype == torch.float16
        loss = P.to_float32(out).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return {"loss": loss.detach()}

    with pytest.raises(ValueError, match="'16-mixed' needs an enabled GradScaler"):
        fit(model, opt, lambda e, g: [0], step, epochs=1, progress=False, precision="16-mixed")
    hist = fit(model, opt, lambda e, g: [0, 1], step, epochs=2, progress=False, precision="16-mixed", scaler=scaler,
               checkpoint=tmp_path / "c.pt")
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert load_checkpoint(tmp_path / "c.pt")["scaler"]["scale"] == scaler.get_scale()


# ----------------------------------------------------------------------------- the trainers under bf16-mixed


def _dtypes_of(module: nn.Module, seen: set) -> None:
    """Record the dtype of ``module``'s output every time it runs."""
    module.register_forward_hook(lambda m, i, out: seen.add(out.dtype))


def _finite(history, *keys):
    return all(math.isfinite(h[k]) for h in history for k in keys)


def test_train_dmfa_under_bf16_mixed(tmp_path):
    from labkit.models.dmfa import LinearHeadsDMFA
    from labkit.models.dmfa_training import train_dmfa

    torch.manual_seed(0)
    model = LinearHeadsDMFA((1, 8, 8), n_components=1, n_factors=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv_out = set()
    _dtypes_of(model.extractor[0], conv_out)
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    recipe = dmfa_recipe(epochs=2, batch_size=8, lr=1e-3, mse_warmup_epochs=1, precision=BF16)
    hist = train_dmfa(model, images, recipe, device="cpu",
                      progress=False, checkpoint=tmp_path / "d.pt")
    assert conv_out == {torch.bfloat16}  # the network ran in bfloat16 ...
    assert _finite(hist, "loss", "nll", "sse")  # ... the NLL (epoch 0: with the MSE warm-up) is finite
    assert load_checkpoint(tmp_path / "d.pt")["config"]["precision"] == BF16
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the MFA heads come out float32 under autocast: the likelihood never sees bfloat16
    x, miss = images[:4], torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    miss[:, :, 2:6, 2:6] = True
    with P.autocast(BF16, "cpu"):
        mfa = model(x, miss)
    assert {t.dtype for t in (mfa.weights, mfa.means, mfa.factors, mfa.variances)} == {torch.float32}
    with pytest.raises(CheckpointMismatchError, match="precision: checkpoint 'bf16-mixed', now '32'"):
        train_dmfa(model, images, dmfa_recipe(epochs=3, batch_size=8, lr=1e-3, mse_warmup_epochs=1), device="cpu",
                   progress=False, checkpoint=tmp_path / "d.pt")


def test_train_classifier_under_bf16_mixed_keeps_misconv_float32(tmp_path):
    from types import SimpleNamespace

    from labkit.models.classifier import build_classifier, train_classifier

    g = torch.Generator().manual_seed(2)
    n, size = 16, 12
    missing = torch.zeros(n, 1, size, size, dtype=torch.bool)
    missing[:, :, 3:9, 3:9] = True
    data = SimpleNamespace(train_images=torch.rand(n, 1, size, size, generator=g),
                           train_labels=torch.randint(10, (n,), generator=g), train_missing=missing,
                           fit_idx=torch.arange(12), val_idx=torch.arange(12, 16))

    class RandomMFAs:  # per-image MFAs over the images (K=1, L=2), as the study's MFAAux gives
        def get(self, idx, x, j):
            b = len(idx)
            return MFA(torch.ones(b, 1), torch.full((b, 1, 1, size, size), 0.5), 0.1 * torch.ones(b, 1, 2, 1, size, size),
                       torch.full((b, 1, 1, size, size), 0.05), validate=False)

    torch.manual_seed(0)
    model = build_classifier("mnist", "mfa_misconv", image_size=size)
    front_out, body_out = set(), set()
    _dtypes_of(model.front, front_out)
    _dtypes_of(model.body[1], body_out)  # the body's first convolution
    hist, _ = train_classifier(model, data, RandomMFAs(), epochs=2, batch_size=4, lr=1e-3, seed=0, progress=False,
                               device="cpu", precision=BF16, checkpoint=tmp_path / "c.pt", select="last")
    assert _finite(hist, "loss", "acc", "val_accuracy")
    assert torch.bfloat16 in body_out  # the body trained in bfloat16 ...
    assert front_out == {torch.float32}  # ... MisConv's expected ReLU over the mixture stayed float32
    assert load_checkpoint(tmp_path / "c.pt")["config"]["precision"] == BF16
    # not only its output dtype: inside autocast it computes exactly what it computes in float32
    x, aux = data.train_images[:4], RandomMFAs().get(torch.arange(4), None, None)
    with torch.no_grad():
        ref = model.front(x, missing[:4], aux)
        with P.autocast(BF16, "cpu"):
            assert torch.equal(model.front(x, missing[:4], aux), ref)
            # even when handed a bfloat16 MFA (it is cast back up; the reference sees the same rounding)
            low = MFA(*(t.to(torch.bfloat16) for t in (aux.weights, aux.means, aux.factors, aux.variances)),
                      validate=False)
            got = model.front(x, missing[:4], low)
        assert got.dtype == torch.float32 and torch.equal(got, model.front(x, missing[:4], P.to_float32(low)))


def test_wae_train_step_under_bf16_mixed():
    from labkit.models import wae as W
    from labkit.models import wae_training as WT

    torch.manual_seed(0)
    model = W.WAE("zero", "mnist", architecture={"encoder": ["conv4", "down", "conv4", "lin3"],
                                                 "decoder": ["lin784", "up", "conv4", "conv1"],
                                                 "discriminator": ["lin8", "lin8", "lin1"]}, device="cpu")
    opts = WT.make_optimizers(model, lr=1e-3, lr_disc=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    enc_out, dec_out = set(), set()
    _dtypes_of(model.encoder, enc_out)
    _dtypes_of(model.decoder, dec_out)
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    missing = torch.zeros(6, 1, 28, 28, dtype=torch.bool)
    missing[:, :, 7:21, 7:21] = True
    for _ in range(2):
        out = WT.train_step(model, opts, x, missing, generator=torch.Generator().manual_seed(4), precision=BF16)
        assert all(math.isfinite(v) for v in out.values())
    assert enc_out == {torch.bfloat16} and dec_out == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    # the losses are float32 even when computed from bfloat16 outputs inside autocast
    with P.autocast(BF16, "cpu"):
        logits = model.decoder(model.encode(x, missing))
        rec = WT.reconstruction_loss(logits, x, ~missing)
        adv = WT.encoder_adversarial_loss(model.discriminator, model.encode(x, missing))
    assert logits.dtype == torch.bfloat16 and rec.dtype == torch.float32 and adv.dtype == torch.float32


def test_train_acflow_under_bf16_mixed(tmp_path):
    from labkit.models.acflow_training import train_acflow

    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    model, hist = train_acflow(images, epochs=2, batch_size=4, lr=1e-3, device="cpu", progress=False,
                               model_kwargs=dict(hidden=8, n_blocks=1, n_scales=2, n_couplings=1),
                               precision=BF16, checkpoint=tmp_path / "f.pt")
    assert _finite(hist, "nll_per_missing_pixel") and all(h["skipped"] == 0 for h in hist)
    assert load_checkpoint(tmp_path / "f.pt")["config"]["precision"] == BF16
    coupling = next(m for m in model.modules() if type(m).__name__ == "AffineCoupling")
    net_out = set()
    coupling.net.register_forward_hook(lambda m, i, out: net_out.update(t.dtype for t in out))
    missing = torch.zeros(8, 1, 8, 8, dtype=torch.bool)
    missing[:, :, 2:6, 2:6] = True
    with P.autocast(BF16, "cpu"):
        lp = model.log_prob(images, missing)
        z = torch.randn(8, coupling.channels, coupling.height, coupling.width)
        m = torch.ones_like(z, dtype=torch.bool)
        s, t, _ = coupling._scale_shift(z, m, torch.zeros(8, 2 * coupling.channels, coupling.height, coupling.width))
    assert net_out == {torch.bfloat16} and lp.dtype == torch.float32 and torch.isfinite(lp).all()
    assert s.dtype == t.dtype == torch.float32  # the coupling's scale and shift are float32
