"""labkit.training.fit (resumable epoch loop) and labkit.checkpoint (atomic save, load_or_train)."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch import nn

from labkit import checkpoint as ckpt
from labkit.checkpoint import CheckpointError, atomic_save, load_checkpoint, load_or_train
from labkit.machine import machine_summary
from labkit.training import CheckpointMismatchError, epoch_seeds, fit

N, BATCH, EPOCHS = 40, 8, 4  # 5 batches per epoch


class Interrupted(Exception):
    pass


class Counter:
    """An extra_state object: counts batches across runs, so its state must survive a resume."""

    def __init__(self):
        self.seen = 0

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def tiny_data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N, 6, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    return x, y


def make_run(seed=0):
    """Model with dropout, Adam, a step scheduler, and closures that count calls."""
    torch.manual_seed(seed)  # same initial weights for every run
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    counter = Counter()
    x, y = tiny_data()
    calls = {"steps": 0, "epochs": [], "fail_at": None}

    def batches(epoch, generator):
        order = torch.randperm(N, generator=generator)
        return [order[i:i + BATCH] for i in range(0, N, BATCH)]

    def step(idx, epoch, generator):
        if calls["fail_at"] is not None and (epoch, counter.seen % (N // BATCH)) == calls["fail_at"]:
            raise Interrupted(f"simulated interruption in epoch {epoch}")
        calls["steps"] += 1
        calls["epochs"].append(epoch)
        counter.seen += 1
        # the step's own generator: input noise that must also replay identically
        noise = 0.01 * torch.randn(len(idx), 6, generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx] + noise), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "acc": (model(x[idx]).argmax(1) == y[idx]).float().mean()}

    return model, opt, sched, counter, batches, step, calls


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_interrupted_run_resumes_bit_identically(tmp_path):
    config = {"data": "tiny", "n": N, "lr": 1e-2}

    model_a, opt_a, sched_a, counter_a, batches_a, step_a, calls_a = make_run()
    hist_a = fit(model_a, opt_a, batches_a, step_a, epochs=EPOCHS, scheduler=sched_a, seed=7,
                 progress=False, extra_state={"counter": counter_a}, config=config,
                 checkpoint=tmp_path / "a.pt")
    assert calls_a["steps"] == EPOCHS * (N // BATCH)
    assert [h["epoch"] for h in hist_a] == list(range(EPOCHS))

    # Interrupted run: dies in the middle of the 3rd epoch (epoch index 2, at its 3rd batch).
    path = tmp_path / "b.pt"
    model_b, opt_b, sched_b, counter_b, batches_b, step_b, calls_b = make_run()
    calls_b["fail_at"] = (2, 2)
    with pytest.raises(Interrupted):
        fit(model_b, opt_b, batches_b, step_b, epochs=EPOCHS, scheduler=sched_b, seed=7,
            progress=False, extra_state={"counter": counter_b}, config=config, checkpoint=path)
    assert calls_b["steps"] == 2 * (N // BATCH) + 2
    assert load_checkpoint(path)["epoch"] == 2  # only complete epochs are checkpointed

    # "New process": fresh objects (different initial weights even), same checkpoint path.
    model_c, opt_c, sched_c, counter_c, batches_c, step_c, calls_c = make_run(seed=99)
    torch.manual_seed(12345)  # global RNG state at call time must not matter either
    hist_c = fit(model_c, opt_c, batches_c, step_c, epochs=EPOCHS, scheduler=sched_c, seed=7,
                 progress=False, extra_state={"counter": counter_c}, config=config, checkpoint=path)
    assert calls_c["steps"] == 2 * (N // BATCH), "epochs 1-2 must not be redone"
    assert set(calls_c["epochs"]) == {2, 3}
    assert counter_c.seen == counter_a.seen == EPOCHS * (N // BATCH)  # extra_state restored
    for (name, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(a, c), f"parameter {name} differs after resume"
    for k, v in opt_a.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], opt_c.state_dict()["state"][k]["exp_avg"])
    assert sched_c.state_dict()["last_epoch"] == sched_a.state_dict()["last_epoch"] == EPOCHS
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(hist_c) == strip(hist_a)
    # the scheduler halves the LR every 2 epochs, and history records the LR each epoch used
    assert [h["lr"] for h in hist_a] == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3])
    assert not model_c.training  # fit leaves the model in eval mode

    # All epochs done: returns the stored history without training.
    model_d, opt_d, sched_d, counter_d, batches_d, step_d, calls_d = make_run(seed=5)
    hist_d = fit(model_d, opt_d, batches_d, step_d, epochs=EPOCHS, scheduler=sched_d, seed=7,
                 progress=False, extra_state={"counter": counter_d}, config=config, checkpoint=path)
    assert calls_d["steps"] == 0
    assert strip(hist_d) == strip(hist_a)
    assert all(torch.equal(a, d) for a, d in zip(model_a.state_dict().values(), model_d.state_dict().values()))


def test_epoch_order_depends_only_on_seed_and_epoch():
    seen = {}

    def batches(epoch, generator):
        order = torch.randperm(10, generator=generator)
        seen.setdefault(epoch, []).append(order)
        return [order]

    model = nn.Linear(1, 1)
    fit(model, None, batches, lambda b, e, g: {}, epochs=3, seed=1, progress=False)
    fit(model, None, batches, lambda b, e, g: {}, epochs=3, seed=1, progress=False)
    for epoch in range(3):
        assert torch.equal(seen[epoch][0], seen[epoch][1])
    assert not torch.equal(seen[0][0], seen[1][0])
    assert len({epoch_seeds(s, e) for s in range(4) for e in range(4)}) == 16  # no (s, e) collisions


def test_global_rng_is_reseeded_every_epoch():
    """Dropout draws of epoch 1 must not depend on how many numbers epoch 0 drew."""
    draws = {}

    def run(extra_draws):
        def step(batch, epoch, generator):
            if epoch == 0:
                torch.rand(extra_draws)  # epoch 0 consumes a varying amount of the global RNG
            draws.setdefault(extra_draws, []).append(torch.rand(1).item())
            return {}
        fit(nn.Linear(1, 1), None, lambda e, g: [0], step, epochs=2, seed=5, progress=False)

    run(1)
    run(1000)
    assert draws[1][1] == draws[1000][1]
    assert draws[1][0] != draws[1000][0] and draws[1][0] != draws[1][1]


def test_metrics_are_batch_averages():
    values = [1.0, 2.0, 6.0]

    def batches(epoch, generator):
        return list(range(len(values)))

    def step(i, epoch, generator):
        out = {"loss": values[i]}
        if i == 0:
            out["first_only"] = 5.0
        return out

    hist = fit(nn.Linear(1, 1), None, batches, step, epochs=2, progress=False,
               evaluate=lambda epoch: {"val": torch.tensor(epoch * 10.0)})
    assert hist[0]["loss"] == pytest.approx(sum(values) / 3)
    assert hist[0]["first_only"] == 5.0  # averaged over the batches that reported it
    assert hist[1]["val"] == 10.0 and hist[0]["batches"] == 3


def test_checkpoints_hold_no_global_rng_and_older_ones_resume_as_float32(tmp_path):
    """Every epoch re-seeds the global RNG before using it, so a stored RNG state would never be read.
    Checkpoints written before fit knew precisions (an "rng" entry, no "precision" in the config)
    resume as float32 runs, and the stale RNG state in them does not change the result."""
    path = tmp_path / "old.pt"
    model_a, opt_a, sched_a, counter_a, batches_a, step_a, _ = make_run()
    hist_a = fit(model_a, opt_a, batches_a, step_a, epochs=2, seed=4, progress=False, config={"n": N})

    model_b, opt_b, sched_b, counter_b, batches_b, step_b, _ = make_run()
    fit(model_b, opt_b, batches_b, step_b, epochs=1, seed=4, progress=False, config={"n": N}, checkpoint=path)
    stored = load_checkpoint(path)
    assert "rng" not in stored and stored["config"] == {"n": N, "precision": "32"}
    del stored["config"]["precision"], stored["precision_changes"], stored["scaler"]
    stored["rng"] = {"torch": torch.Generator().manual_seed(99).get_state()}  # as the old format stored it
    atomic_save(stored, path)

    with pytest.raises(CheckpointMismatchError, match="precision: checkpoint '32', now 'bf16-mixed'"):
        fit(model_b, opt_b, batches_b, step_b, epochs=2, seed=4, progress=False, config={"n": N}, checkpoint=path,
            precision="bf16-mixed")
    hist_b = fit(model_b, opt_b, batches_b, step_b, epochs=2, seed=4, progress=False, config={"n": N},
                 checkpoint=path)
    assert [h["loss"] for h in hist_b] == [h["loss"] for h in hist_a]
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))


def test_config_seed_and_optimizer_mismatch_raise(tmp_path):
    path = tmp_path / "run.pt"
    model, opt, sched, counter, batches, step, _ = make_run()
    fit(model, opt, batches, step, epochs=1, seed=3, progress=False, config={"lr": 0.01}, checkpoint=path)

    def again(**kw):
        m, o, s, c, b, st, calls = make_run()
        args = dict(epochs=2, seed=3, progress=False, config={"lr": 0.01}, checkpoint=path)
        args.update(kw)
        optimizer = args.pop("optimizer", o)
        fit(m, optimizer, b, st, **args)
        return calls

    with pytest.raises(CheckpointMismatchError, match=r"config differs \(lr: checkpoint 0.01, now 0.02\)"):
        again(config={"lr": 0.02})
    with pytest.raises(CheckpointMismatchError, match="seed: checkpoint 3, now 4"):
        again(seed=4)
    with pytest.raises(CheckpointMismatchError, match="optimizers"):
        again(optimizer={"ae": torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)})
    with pytest.raises(CheckpointMismatchError, match="already trained 1 epochs, now asked for 0"):
        again(epochs=0)
    with pytest.raises(CheckpointMismatchError, match=re.escape(str(path))):
        again(config=None)
    # same settings, more epochs: extends the run by one epoch
    assert again()["steps"] == N // BATCH


def test_fit_rejects_bad_arguments():
    model = nn.Linear(1, 1)
    ok = dict(epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs must be a non-negative int, got -1"):
        fit(model, None, lambda e, g: [0], lambda b, e, g: {}, epochs=-1)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        fit(model, None, lambda e, g: [0], lambda b, e, g: {}, seed=-2, **ok)
    with pytest.raises(TypeError, match="optimizer must be an instance of Optimizer, got str"):
        fit(model, "adam", lambda e, g: [0], lambda b, e, g: {}, **ok)
    with pytest.raises(TypeError, match="config must be JSON-able"):
        fit(model, None, lambda e, g: [0], lambda b, e, g: {}, config={"x": object()}, **ok)
    with pytest.raises(ValueError, match="yielded no batches"):
        fit(model, None, lambda e, g: [], lambda b, e, g: {}, **ok)
    with pytest.raises(TypeError, match="step\\(\\) must return a dict"):
        fit(model, None, lambda e, g: [0], lambda b, e, g: 1.0, **ok)
    with pytest.raises(ValueError, match="metric 'loss' must be a scalar, got a tensor of shape \\(2,\\)"):
        fit(model, None, lambda e, g: [0], lambda b, e, g: {"loss": torch.ones(2)}, **ok)


def test_fit_with_dict_of_optimizers_and_progress_bar(tmp_path, capsys):
    enc, disc = nn.Linear(2, 2), nn.Linear(2, 1)
    model = nn.ModuleDict({"enc": enc, "disc": disc})
    opts = {"ae": torch.optim.SGD(enc.parameters(), lr=0.1), "disc": torch.optim.SGD(disc.parameters(), lr=0.01)}

    def step(batch, epoch, generator):
        for opt in opts.values():
            opt.zero_grad()
        loss = disc(enc(batch)).pow(2).mean()
        loss.backward()
        for opt in opts.values():
            opt.step()
        return {"loss": loss.item()}

    data = lambda epoch, g: [torch.randn(4, 2, generator=g) for _ in range(3)]  # noqa: E731
    hist = fit(model, opts, data, step, epochs=2, desc="wae", checkpoint=tmp_path / "w.pt")
    assert hist[0]["lr_ae"] == 0.1 and hist[0]["lr_disc"] == 0.01
    stored = load_checkpoint(tmp_path / "w.pt")
    assert sorted(stored["optimizer"]) == ["ae", "disc"]
    err = capsys.readouterr().err
    assert "wae 1/2" in err and "wae 2/2" in err  # tqdm bars on stderr
    fit(model, opts, data, step, epochs=2, desc="wae", checkpoint=tmp_path / "w.pt")
    assert "already holds all 2 epochs" in capsys.readouterr().out


# ----------------------------------------------------------------------------- checkpoint.py


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "deep" / "dir" / "x.pt"
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(4)}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.pt"]
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(4))
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600


def test_failing_save_does_not_clobber_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    atomic_save({"version": 1, "w": torch.ones(5)}, path)

    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # some bytes reach the disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"version": 2}, path)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert load_checkpoint(path)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_load_checkpoint_absent_and_corrupt(tmp_path):
    assert load_checkpoint(tmp_path / "nope.pt") is None
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match=r"bad\.pt.*corrupt or unreadable"):
        load_checkpoint(bad)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        load_checkpoint(3)


def test_load_or_train_trains_once_then_loads(tmp_path, capsys):
    path = tmp_path / "m.pt"
    trained = []

    def build():
        return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))

    def train(model):
        trained.append(1)
        with torch.no_grad():
            model[0].weight.fill_(0.5)
        model(torch.randn(4, 3))  # moves the BatchNorm running stats (buffers must be saved too)
        return {"data": "none", "epochs": 1, "seed": 0, "sizes": [3, 3]}

    model1, meta1 = load_or_train(path, build, train, device="cpu")
    assert trained == [1] and not model1.training
    assert "trained and saved" in capsys.readouterr().out
    assert meta1["machine"] == machine_summary() and meta1["sizes"] == [3, 3]

    model2, meta2 = load_or_train(path, build, train, device="cpu")
    assert trained == [1], "second call must load, not train"
    assert not model2.training and meta2 == meta1
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"loaded {path} (trained on {meta1['machine']}") and "epochs=1" in out
    for a, b in zip(model1.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    json.dumps(meta2)  # JSON-able as promised

    load_or_train(path, build, train, device="cpu", quiet=True)
    assert capsys.readouterr().out == ""


def test_load_or_train_errors(tmp_path):
    with pytest.raises(TypeError, match="must be JSON-able"):
        load_or_train(tmp_path / "a.pt", lambda: nn.Linear(1, 1), lambda m: {"x": torch.ones(1)}, device="cpu")
    assert not (tmp_path / "a.pt").exists()
    with pytest.raises(TypeError, match="build\\(\\) must return an nn.Module, got str"):
        load_or_train(tmp_path / "a.pt", lambda: "net", lambda m: {}, device="cpu")
    load_or_train(tmp_path / "b.pt", lambda: nn.Linear(1, 1), lambda m: {}, device="cpu", quiet=True)
    with pytest.raises(CheckpointError, match="does not match the model built now"):
        load_or_train(tmp_path / "b.pt", lambda: nn.Linear(2, 1), lambda m: {}, device="cpu")
    atomic_save({"weights": 1}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not a load_or_train file"):
        load_or_train(tmp_path / "c.pt", lambda: nn.Linear(1, 1), lambda m: {}, device="cpu")


def test_load_or_train_with_resumable_fit(tmp_path):
    """The documented pattern: train() runs fit() on partial_path(path); an interrupted first
    attempt resumes, and the progress file goes away once the final checkpoint exists."""
    path = tmp_path / "net.pt"
    model, opt, sched, counter, batches, step, calls = make_run()

    def train(net):
        fit(net, opt, batches, step, epochs=2, seed=0, progress=False, checkpoint=ckpt.partial_path(path))
        return {"epochs": 2}

    calls["fail_at"] = (1, 0)
    with pytest.raises(Interrupted):
        load_or_train(path, lambda: model, train, device="cpu", quiet=True)
    assert ckpt.partial_path(path).exists() and not path.exists()
    calls["fail_at"] = None
    load_or_train(path, lambda: model, train, device="cpu", quiet=True)
    assert calls["steps"] == 2 * (N // BATCH)  # epoch 0 once, epoch 1 once
    assert path.exists() and not ckpt.partial_path(path).exists()


def test_partial_path_and_machine_summary():
    assert ckpt.partial_path("results/x/dmfa.pt").as_posix() == "results/x/dmfa.partial.pt"
    desc = machine_summary()
    assert f"torch {torch.__version__}" in desc and "cores" in desc
