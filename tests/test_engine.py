"""The study engine's bookkeeping: keys, result files, atomic sets of files, caches, failures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from labkit.studies import engine, store
from labkit.studies.engine import Cell, ResultFileError, ResultStore, SettingsMismatch, SweepFailed


def _cell(seed=0, epochs=1, sha="aaaa", method="zero"):
    return Cell("demo", {"dataset": "mnist", "method": method, "seed": seed}, {"epochs": epochs, "lr": 1e-3},
                {"data": {"sha": sha}})


def _store(tmp_path, name="acc.csv"):
    return ResultStore(tmp_path / name, coords=["dataset", "method", "seed"], metrics=["accuracy"],
                       optional=["accuracy_last"], details=tmp_path / "runs.jsonl")


# ---------------------------------------------------------------------------- keys
def test_key_depends_on_settings_inputs_and_coords_only():
    a = _cell()
    assert a.key == _cell().key
    assert a.key != _cell(epochs=3).key
    assert a.key != _cell(sha="bbbb").key
    assert a.key != _cell(seed=1).key
    # equal values written differently give one key
    t = Cell("demo", {"seed": 0}, {"sizes": (1, 2), "n": torch.tensor(3)})
    l = Cell("demo", {"seed": 0}, {"sizes": [1, 2], "n": 3})
    assert t.key == l.key
    assert a.short().startswith("mnist/zero/s0 #")


def test_data_fingerprint_sees_the_images_not_only_their_count():
    x = torch.rand(5, 1, 4, 4)
    y = torch.arange(5)
    a = engine.data_fingerprint(x, y, name="mnist", split="train")
    b = engine.data_fingerprint(x.flip(0), y, name="mnist", split="train")
    c = engine.data_fingerprint(x, y.flip(0), name="mnist", split="train")
    assert a["n"] == b["n"] == 5
    assert len({a["sha"], b["sha"], c["sha"]}) == 3
    assert engine.data_fingerprint(x.clone(), y.clone(), name="mnist", split="train") == a


def test_input_fingerprint_changes_with_content_and_names_missing_inputs(tmp_path):
    p = tmp_path / "dmfa.pt"
    p.write_bytes(b"one")
    a = engine.input_fingerprint(p, "complete-data DMFA checkpoint")
    p.write_bytes(b"two")
    os.utime(p, ns=(1, 1))   # another mtime: the memo must not hide the new content
    b = engine.input_fingerprint(p, "complete-data DMFA checkpoint")
    assert a["sha"] != b["sha"]
    with pytest.raises(engine.InputError, match="complete-data DMFA checkpoint.*does not exist.*input"):
        engine.input_fingerprint(tmp_path / "nope.pt", "complete-data DMFA checkpoint")


# ---------------------------------------------------------------------------- result files
def test_record_then_done_and_no_second_row(tmp_path):
    s = _store(tmp_path)
    assert s.record(_cell(), {"accuracy": 0.9}, {"history": [1, 2]})
    assert not s.record(_cell(), {"accuracy": 0.5})
    df = s.read()
    assert list(df["accuracy"]) == [0.9]
    assert s.done_keys() == {_cell().key}
    assert _cell(epochs=3).key not in s.done_keys()
    assert s.read_details()[0]["key"] == _cell().key


def test_truncated_last_row_is_not_a_result(tmp_path, capsys):
    s = _store(tmp_path)
    s.record(_cell(0), {"accuracy": 0.9})
    s.record(_cell(1), {"accuracy": 0.8})
    text = s.path.read_text()
    s.path.write_text(text[: len(text) - 40])     # cut inside the last row
    df = s.read()
    assert list(df["seed"]) == [0]
    assert s.problems and s.problems[0].line == 3
    out = capsys.readouterr().out
    assert str(s.path) in out and "line 3" in out
    # a row cut right after its metric (all fields but no newline) is not a result either
    s.path.write_text(text.rstrip("\n"))
    assert list(s.read()["seed"]) == [0]


def test_malformed_rows_are_reported_with_file_and_line(tmp_path):
    s = _store(tmp_path)
    s.record(_cell(0), {"accuracy": 0.9})
    header, row = s.path.read_text().splitlines()
    bad_metric = row.replace(",0.9,", ",abc,")
    short = ",".join(row.split(",")[:4])
    s.path.write_text("\n".join([header, row.replace(_cell(0).key, "f" * 16), bad_metric, short]) + "\n")
    df = s.read()
    assert len(df) == 1
    reasons = [str(p) for p in s.problems]
    assert any("line 3" in r and "not a number" in r for r in reasons)
    assert any("line 4" in r and "fields" in r for r in reasons)


def test_zero_byte_file_gives_no_number_and_no_traceback(tmp_path):
    s = _store(tmp_path)
    s.path.write_bytes(b"")
    df = s.read()
    assert len(df) == 0 and "empty" in s.problems[0].reason
    assert s.record(_cell(), {"accuracy": 0.7})
    assert list(s.read()["accuracy"]) == [0.7]


def test_duplicate_key_is_an_error_naming_the_file(tmp_path):
    s = _store(tmp_path)
    s.record(_cell(), {"accuracy": 0.9})
    header, row = s.path.read_text().splitlines()
    s.path.write_text("\n".join([header, row, row]) + "\n")
    with pytest.raises(ResultFileError, match=r"acc\.csv.*appears twice.*lines 2 and 3"):
        s.read()


def test_old_header_is_refused_with_the_way_out(tmp_path):
    s = _store(tmp_path)
    s.path.write_text("dataset,mask,method,seed,accuracy\nmnist,square,mask,0,0.1\n")
    with pytest.raises(ResultFileError, match="migrat"):
        s.read()


def test_tables_refuse_to_mix_settings():
    import pandas as pd

    rows = [{"settings": '{"epochs": 1, "lr": 0.001}'}, {"settings": '{"epochs": 3, "lr": 0.001}'}]
    with pytest.raises(SettingsMismatch, match="epochs"):
        engine.check_uniform(pd.DataFrame(rows))
    assert engine.check_uniform(pd.DataFrame(rows), ignore=["epochs"]) == {"lr": 0.001}


# ---------------------------------------------------------------------------- sets of files
def _set(folder: Path, tag: str):
    return {folder / "a.csv": f"csv {tag}", folder / "a.json": f"json {tag}",
            folder / "a.png": lambda p: p.write_bytes(f"png {tag}".encode())}


def _contents(folder: Path):
    return sorted((p.name, p.read_text()) for p in folder.iterdir() if not p.name.startswith("."))


def test_write_files_killed_before_commit_leaves_the_old_set(tmp_path, monkeypatch):
    engine.write_files(_set(tmp_path, "old"))
    real = os.replace

    def dying_replace(src, dst):
        if store._JOURNAL in str(dst):
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(store.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        engine.write_files(_set(tmp_path, "new"))
    monkeypatch.setattr(store.os, "replace", real)
    engine.recover(tmp_path)
    assert _contents(tmp_path) == [("a.csv", "csv old"), ("a.json", "json old"), ("a.png", "png old")]


def test_write_files_killed_between_renames_is_rolled_forward(tmp_path, monkeypatch):
    engine.write_files(_set(tmp_path, "old"))
    real = os.replace
    calls = {"n": 0}

    def dying_replace(src, dst):
        if store._JOURNAL not in str(dst):
            calls["n"] += 1
            if calls["n"] == 2:                  # the CSV is renamed, the JSON and the PNG are not
                raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(store.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        engine.write_files(_set(tmp_path, "new"))
    monkeypatch.setattr(store.os, "replace", real)
    assert ("a.csv", "csv new") in _contents(tmp_path) and ("a.json", "json old") in _contents(tmp_path)
    engine.recover(tmp_path)                    # what every reader does first
    assert _contents(tmp_path) == [("a.csv", "csv new"), ("a.json", "json new"), ("a.png", "png new")]
    assert not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------------------- caches
def test_cache_recomputes_when_its_inputs_change(tmp_path):
    calls = []

    def compute(v):
        return lambda: calls.append(v) or torch.tensor([v])

    a = engine.cached(tmp_path, "imp", {"data": "sha1"}, compute(1.0), progress=False)
    b = engine.cached(tmp_path, "imp", {"data": "sha1"}, compute(2.0), progress=False)
    c = engine.cached(tmp_path, "imp", {"data": "sha2"}, compute(3.0), progress=False)
    assert (float(a), float(b), float(c)) == (1.0, 1.0, 3.0) and calls == [1.0, 3.0]
    # a corrupt cache file is recomputed, not an error
    for p in tmp_path.glob("imp-*.pt"):
        p.write_bytes(b"garbage")
    d = engine.cached(tmp_path, "imp", {"data": "sha2"}, compute(4.0), progress=False)
    assert float(d) == 4.0


# ---------------------------------------------------------------------------- running
def test_one_failing_cell_does_not_stop_the_others(tmp_path, capsys):
    s = _store(tmp_path)
    cells = [_cell(seed) for seed in range(3)]

    def fn(cell):
        if cell.coords["seed"] == 1:
            raise RuntimeError("input checkpoint x.pt cannot be read")
        return {"metrics": {"accuracy": 0.5 + cell.coords["seed"] / 10}, "details": {}}

    with pytest.raises(SweepFailed, match=r"(?s)1 cell\(s\) failed.*s1.*x\.pt") as info:
        engine.run_cells(cells, fn, s)
    assert [o.cell.coords["seed"] for o in info.value.failed] == [1]
    assert sorted(s.read()["seed"]) == [0, 2]
    out = capsys.readouterr().out
    assert "ran mnist/zero/s0" in out and "failed mnist/zero/s1" in out
    # the rerun skips what is done and retries the failed cell
    outcomes = engine.run_cells(cells, lambda c: {"metrics": {"accuracy": 0.1}}, s)
    assert [o.status for o in outcomes] == ["skipped", "ran", "skipped"]


def test_other_settings_make_a_new_row(tmp_path):
    s = _store(tmp_path)
    engine.run_cells([_cell(epochs=1)], lambda c: {"metrics": {"accuracy": 0.6}}, s)
    outcomes = engine.run_cells([_cell(epochs=3)], lambda c: {"metrics": {"accuracy": 0.8}}, s)
    assert outcomes[0].status == "ran"
    df = s.read()
    assert sorted(df["accuracy"]) == [0.6, 0.8]
    with pytest.raises(SettingsMismatch, match="epochs"):
        engine.check_uniform(df)


def test_unavailable_cells_wait_and_are_reported_once(tmp_path, capsys):
    s = _store(tmp_path)
    cells = [_cell(0, method="dmfa"), _cell(0, method="zero")]
    out = engine.run_cells(cells, lambda c: {"metrics": {"accuracy": 0.5}}, s,
                           available=lambda c: "no checkpoint yet" if c.coords["method"] == "dmfa" else None)
    assert [o.status for o in out] == ["waiting", "ran"]
    assert capsys.readouterr().out.count("no checkpoint yet") == 1


def test_a_cell_another_process_is_running_is_left_to_it(tmp_path, capsys):
    """The claim is an flock: a second open file description in this process stands for the other
    process; while it holds cell s1's claim, the sweep runs s0 and s2 and leaves s1 waiting."""
    s = _store(tmp_path)
    cells = [_cell(seed) for seed in range(3)]
    ran = []
    with s.claim(cells[1].key) as mine:
        assert mine
        with s.claim(cells[1].key) as again:
            assert not again                                   # held: nobody else gets it
        out = engine.run_cells(cells, lambda c: ran.append(c.coords["seed"]) or {"metrics": {"accuracy": 0.5}}, s)
    assert ran == [0, 2] and [o.status for o in out] == ["ran", "waiting", "ran"]
    assert "waiting mnist/zero/s1" in capsys.readouterr().out and "another process is running it" in out[1].error
    with s.claim(cells[1].key) as mine:                        # released with the block
        assert mine
    assert (tmp_path / "_scratch" / "claims" / f"{cells[1].key}.lock").exists()


def test_a_cell_recorded_meanwhile_is_skipped_not_run_again(tmp_path, capsys):
    s = _store(tmp_path)
    cells = [_cell(seed) for seed in range(3)]
    ran = []

    def fn(cell):
        ran.append(cell.coords["seed"])
        if cell.coords["seed"] == 0:                           # meanwhile another process finished s1
            s.record(cells[1], {"accuracy": 0.9})
        return {"metrics": {"accuracy": 0.5}}

    out = engine.run_cells(cells, fn, s)
    assert ran == [0, 2] and [o.status for o in out] == ["ran", "skipped", "ran"]
    assert "skipped mnist/zero/s1 #" in capsys.readouterr().out
    assert sorted(s.read()["accuracy"]) == [0.5, 0.5, 0.9]


def test_waiting_for_another_process_ends_when_it_records_the_cell(tmp_path, monkeypatch):
    """With wait=True a claimed cell is polled until the other process records it, then skipped."""
    import contextlib

    s = _store(tmp_path)
    cells = [_cell(0), _cell(1)]
    other = contextlib.ExitStack()
    assert other.enter_context(s.claim(cells[1].key))
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        assert len(polls) < 5, "still polling for a cell another process has recorded"
    monkeypatch.setattr(engine.time, "sleep", sleep)

    def log(text):
        if "waiting" in text:                                  # the other process finishes s1
            s.record(cells[1], {"accuracy": 0.7})
            other.close()

    out = engine.run_cells(cells, lambda c: {"metrics": {"accuracy": 0.5}}, s, wait=True, poll_seconds=0.01, log=log)
    assert [o.status for o in out] == ["ran", "skipped"]
    assert sorted(s.read()["accuracy"]) == [0.5, 0.7]


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_with_another_config_is_not_reused(tmp_path):
    from torch import nn

    from labkit.checkpoint import CheckpointError, ConfigMismatchError, load_checkpoint, load_or_train

    path = tmp_path / "m.pt"
    trained = []

    def train(model):
        trained.append(1)
        return {"note": "tiny"}

    load_or_train(path, lambda: nn.Linear(2, 2), train, device="cpu", quiet=True,
                  config={"epochs": 1, "lr": 1e-3, "precision": "32"})
    load_or_train(path, lambda: nn.Linear(2, 2), train, device="cpu", quiet=True,
                  config={"epochs": 1, "lr": 1e-3, "precision": "32"})
    assert trained == [1]
    with pytest.raises(ConfigMismatchError, match=r"epochs: stored 1, requested 2.*lr: stored 0.001, requested 0.01"):
        load_or_train(path, lambda: nn.Linear(2, 2), train, device="cpu", quiet=True,
                      config={"epochs": 2, "lr": 1e-2, "precision": "32"})
    with pytest.raises(ConfigMismatchError, match="precision"):
        load_or_train(path, lambda: nn.Linear(2, 2), train, device="cpu", quiet=True,
                      config={"epochs": 1, "lr": 1e-3, "precision": "bf16-mixed"})
    # an unreadable *input* says it is an input, not "delete it to retrain"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="(?s)complete-data DMFA checkpoint.*input of this step") as info:
        load_checkpoint(path, input_role="complete-data DMFA checkpoint")
    assert "delete it" not in str(info.value)


# ---------------------------------------------------------------------------- merging two copies
def _attached_store(folder):
    folder.mkdir(parents=True, exist_ok=True)
    return ResultStore(folder / "acc.csv", coords=["dataset", "method", "seed"], metrics=["accuracy"],
                       optional=["accuracy_last"], details=folder / "runs.jsonl",
                       attachments={"predictions": folder / "pred.jsonl"})


def test_merge_adds_the_missing_rows_with_their_details_and_attachments(tmp_path):
    """Rows recorded on another machine come home byte for byte, with their records; a key both
    copies hold keeps the row here; keys outside the plan stay out."""
    from labkit.studies.merge import merge_results

    here, there = _attached_store(tmp_path / "here"), _attached_store(tmp_path / "there")
    here.record(_cell(0), {"accuracy": 0.9}, {"history": [0], "predictions": {"p": "AAA"}})
    there.record(_cell(0), {"accuracy": 0.8}, {"history": [9], "predictions": {"p": "ZZZ"}})   # a rerun there
    there.record(_cell(1), {"accuracy": 0.7, "accuracy_last": 0.65}, {"history": [1], "predictions": {"p": "BBB"}})
    there.record(_cell(2), {"accuracy": 0.6}, {"history": [2], "predictions": {"p": "CCC"}})
    there_line = (tmp_path / "there" / "acc.csv").read_text().splitlines()[2]

    r = merge_results(here, there, keys={_cell(0).key, _cell(1).key})
    assert r.added == [_cell(1).key] and r.already_here == [_cell(0).key] and r.not_planned == [_cell(2).key]
    df = here.read()
    assert list(df["key"]) == [_cell(0).key, _cell(1).key]
    assert list(df["accuracy"]) == [0.9, 0.7] and df["accuracy_last"].iloc[1] == 0.65
    assert (tmp_path / "here" / "acc.csv").read_text().splitlines()[2] == there_line      # the row as written there
    assert [d["history"] for d in here.read_details()] == [[0], [1]]
    assert {k: v["p"] for k, v in here.read_attachments("predictions").items()} == {_cell(0).key: "AAA",
                                                                                   _cell(1).key: "BBB"}
    again = merge_results(here, there, keys={_cell(0).key, _cell(1).key})      # idempotent
    assert again.added == [] and len(here.read()) == 2
    fresh = _attached_store(tmp_path / "fresh")                                # into a folder without results
    assert merge_results(fresh, there).added == [_cell(0).key, _cell(1).key, _cell(2).key]
    assert fresh.read()["accuracy"].tolist() == [0.8, 0.7, 0.6]


def test_merge_refuses_other_studies_and_rows_without_provenance(tmp_path):
    from labkit.studies.merge import merge_results

    here = _attached_store(tmp_path / "here")
    with pytest.raises(ValueError, match="does not exist"):
        merge_results(here, _attached_store(tmp_path / "empty"))
    other = ResultStore(tmp_path / "wae" / "m.csv", coords=["dataset", "front", "seed"], metrics=["psnr"],
                        details=tmp_path / "wae" / "runs.jsonl")
    (tmp_path / "wae").mkdir()
    other.record(Cell("demo", {"dataset": "mnist", "front": "zero", "seed": 0}, {}, {}), {"psnr": 20.0}, {})
    with pytest.raises(ValueError, match="not tables of one study"):
        merge_results(here, other)
    there = _attached_store(tmp_path / "there")
    there.record(_cell(1), {"accuracy": 0.7}, {"history": [1]})
    (tmp_path / "there" / "runs.jsonl").write_text("")                        # its details lost
    with pytest.raises(ValueError, match="without their provenance"):
        merge_results(here, there)
    assert not (tmp_path / "here" / "acc.csv").exists()                       # nothing written
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_results(here, here)
