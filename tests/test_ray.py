"""The Ray executor: same rows as the local executor, crashed workers retried, failures reported.

One local Ray (2 CPUs) serves the whole module: starting one takes tens of seconds here. The cell
functions live in this module, which the workers import as ``tests.test_ray`` (Ray puts the
driver's working directory on their path).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from labkit.studies import engine  # noqa: E402
from labkit.studies.engine import Cell, LocalExecutor, ResultStore, SweepFailed  # noqa: E402
from labkit.studies.executors import ExecutorError, RayExecutor, cell_device, make_executor  # noqa: E402


# ---------------------------------------------------------------------------- cell functions (run in workers)
def toy_cell(cell: Cell) -> dict:
    """Deterministic metrics from the cell's coordinates and settings; details say where it ran."""
    g = torch.Generator().manual_seed(1000 * cell.coords["x"] + cell.settings["salt"])
    value = float(torch.rand(8, generator=g, dtype=torch.float64).sum()) * cell.settings["scale"]
    return {"metrics": {"value": value, "square": cell.coords["x"] ** 2},
            "details": {"pid": os.getpid(), "threads": torch.get_num_threads(),
                        "cache": os.environ.get("LABKIT_CACHE"),
                        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}}


def _attempt(marker_dir: str, cell: Cell) -> int:
    """Count this attempt at ``cell`` in a file (written before anything can kill the process)."""
    path = Path(marker_dir) / f"attempts-{cell.coords['x']}"
    with open(path, "a") as fh:
        fh.write("x")
    return len(path.read_text())


def crash_first_time(cell: Cell, *, marker_dir: str, victim: int) -> dict:
    """The worker running cell ``victim`` dies on the first attempt (SIGKILL, no cleanup)."""
    if cell.coords["x"] == victim and _attempt(marker_dir, cell) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return toy_cell(cell)


def always_crash(cell: Cell, *, marker_dir: str) -> dict:
    _attempt(marker_dir, cell)
    os.kill(os.getpid(), signal.SIGKILL)


def raise_on(cell: Cell, *, marker_dir: str, bad: int) -> dict:
    if cell.coords["x"] == bad:
        _attempt(marker_dir, cell)
        raise ValueError(f"cell {bad} is broken")
    return toy_cell(cell)


def slow_first(cell: Cell) -> dict:
    if cell.coords["x"] == 0:
        time.sleep(4.0)
    return toy_cell(cell)


@dataclasses.dataclass
class FakeConfig:
    device: str = "cuda"


def _cells(n=4, scale=2.0):
    return [Cell("toy", {"x": x}, {"scale": scale, "salt": 7}) for x in range(n)]


def _store(folder: Path) -> ResultStore:
    return ResultStore(folder / "toy.csv", coords=["x"], metrics=["value", "square"], details=folder / "runs.jsonl",
                       int_coords=("x",))


def _rows(store: ResultStore):
    return store.read().sort_values("key").reset_index(drop=True)


# ---------------------------------------------------------------------------- without a cluster
# These come first: once the module's Ray is up, a new executor reuses it instead of connecting.
def test_unknown_executor_lists_the_valid_ones():
    with pytest.raises(ExecutorError, match=r"unknown executor 'dask'.*local, ray"):
        make_executor("dask")
    assert isinstance(make_executor("local"), LocalExecutor)


def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)      # import ray -> ImportError
    with pytest.raises(ExecutorError, match=r"needs Ray.*pip install"):
        make_executor("ray")


def test_unreachable_address_is_named_at_once():
    if ray.is_initialized():
        pytest.skip("a Ray is already initialised in this process")
    start = time.perf_counter()
    with pytest.raises(ExecutorError, match=r"cannot connect.*'127\.0\.0\.1:1'"):
        make_executor("ray", address="127.0.0.1:1")
    assert time.perf_counter() - start < 15
    with pytest.raises(ExecutorError, match="not 'auto' or host:port"):
        make_executor("ray", address="headnode")


def test_bad_settings_are_refused():
    with pytest.raises(ExecutorError, match="gpus_per_cell"):
        RayExecutor(gpus_per_cell=1.5)
    with pytest.raises(ExecutorError, match="threads"):
        RayExecutor(threads=0)


def test_device_of_a_cell():
    cpu, gpu = Cell("toy", {"x": 0}), Cell("toy", {"x": 0}, {"device": "cuda"})
    assert cell_device(cpu) == "cpu"
    assert cell_device(cpu, cluster_has_gpus=True) == "cuda"           # "auto" follows the cluster
    assert cell_device(gpu) == "cuda"
    assert cell_device(gpu, device="cpu") == "cpu"                     # an explicit device wins
    assert cell_device(Cell("toy", {"device": "cuda:0"})) == "cuda"
    assert cell_device(cpu, functools.partial(toy_cell, device="cuda")) == "cuda"
    assert cell_device(cpu, functools.partial(toy_cell, FakeConfig("cuda"))) == "cuda"
    assert cell_device(cpu, functools.partial(toy_cell, FakeConfig("cpu")), cluster_has_gpus=True) == "cpu"


def test_cells_and_partials_pickle():
    cell = _cells(1)[0]
    back = pickle.loads(pickle.dumps(cell))
    assert back == cell and back.key == cell.key
    fn = pickle.loads(pickle.dumps(functools.partial(crash_first_time, marker_dir="/x", victim=1)))
    assert fn.func is crash_first_time


# ---------------------------------------------------------------------------- one local Ray for the rest
def _session_processes(temp: str, known: set[int]) -> list[str]:
    """Live processes of the test's Ray: the ones seen under this process, or naming its temp dir."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] in known or temp in cmd:
                out.append(f"{p.info['pid']} {cmd[:100]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@pytest.fixture(scope="module")
def cluster():
    """A Ray of 2 CPUs started through the executor, shut down (and checked gone) at the end."""
    # a short path: Ray's unix sockets live under it and socket paths are limited to ~107 bytes
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    cache = tempfile.mkdtemp(prefix="rtcache", dir="/tmp")
    executor = make_executor("ray", num_cpus=2, threads=1, max_retries=2, cache_dir=cache,
                             init_kwargs={"_temp_dir": temp, "log_to_driver": False})
    try:
        yield executor, cache
    finally:
        known = {c.pid for c in psutil.Process().children(recursive=True)}
        executor.close()
        deadline = time.time() + 30
        while _session_processes(temp, known) and time.time() < deadline:
            time.sleep(0.5)
        left = _session_processes(temp, known)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        assert not left, f"Ray processes left after shutdown: {left}"
        assert not ray.is_initialized()


def test_ray_records_the_same_rows_as_local(cluster, tmp_path):
    executor, cache = cluster
    cells = _cells(4)
    local, remote = _store(tmp_path / "local"), _store(tmp_path / "ray")
    engine.run_cells(cells, toy_cell, local, executor=LocalExecutor(), log=lambda s: None)
    out = engine.run_cells(cells, toy_cell, remote, executor=executor, log=lambda s: None)
    assert [o.status for o in out] == ["ran"] * 4
    a, b = _rows(local), _rows(remote)
    assert list(b["key"]) == sorted(c.key for c in cells)
    assert a.equals(b), f"local rows:\n{a}\nray rows:\n{b}"
    details = remote.read_details()
    assert {d["pid"] for d in details}.isdisjoint({os.getpid()})       # ran in workers, not here
    assert {d["threads"] for d in details} == {1}
    assert {d["cache"] for d in details} == {cache}
    assert {d["cuda_visible"] for d in details} == {""}                # CPU cells see no GPU
    # a second run finds every key done and runs nothing
    again = engine.run_cells(cells, toy_cell, remote, executor=executor, log=lambda s: None)
    assert [o.status for o in again] == ["skipped"] * 4


def test_outcomes_come_as_cells_finish(cluster):
    executor, _ = cluster
    cells = _cells(2)
    order = [o.cell.coords["x"] for o in executor.run(slow_first, cells)]
    assert order == [1, 0]


def test_killed_worker_is_retried_and_the_sweep_completes(cluster, tmp_path):
    executor, _ = cluster
    cells = _cells(3, scale=3.0)
    fn = functools.partial(crash_first_time, marker_dir=str(tmp_path), victim=1)
    store = _store(tmp_path / "res")
    out = engine.run_cells(cells, fn, store, executor=executor, log=lambda s: None)
    assert [o.status for o in out] == ["ran"] * 3
    assert (tmp_path / "attempts-1").read_text() == "xx"               # killed once, run again
    rows = _rows(store)
    assert len(rows) == 3
    want = {c.key: toy_cell(c)["metrics"]["value"] for c in cells}
    assert {k: v for k, v in zip(rows["key"], rows["value"])} == pytest.approx(want)


def test_raising_cell_fails_once_and_the_others_are_recorded(cluster, tmp_path):
    executor, _ = cluster
    cells = _cells(3)
    fn = functools.partial(raise_on, marker_dir=str(tmp_path), bad=2)
    store = _store(tmp_path / "res")
    with pytest.raises(SweepFailed) as info:
        engine.run_cells(cells, fn, store, executor=executor, log=lambda s: None)
    assert [o.cell.key for o in info.value.failed] == [cells[2].key]
    assert "ValueError: cell 2 is broken" in str(info.value)
    assert (tmp_path / "attempts-2").read_text() == "x"                # application errors: no retry
    assert sorted(_rows(store)["x"]) == [0, 1]


def test_worker_dying_every_time_fails_after_its_retries(cluster, tmp_path):
    _, cache = cluster
    # a second executor joins the module's Ray (already initialised here) and must leave it running
    executor = make_executor("ray", max_retries=1, cache_dir=cache)
    try:
        out = list(executor.run(functools.partial(always_crash, marker_dir=str(tmp_path)), _cells(1)))
    finally:
        executor.close()
    assert ray.is_initialized()
    assert [o.status for o in out] == ["failed"]
    assert "worker died" in out[0].error and "2 attempt" in out[0].error
    assert (tmp_path / "attempts-0").read_text() == "xx"


def test_cuda_cell_on_a_cluster_without_gpus_fails_at_once(cluster):
    executor, _ = cluster
    assert executor.resources(_cells(1)[0], toy_cell) == {"num_cpus": 1, "num_gpus": 0}
    gpu = Cell("toy", {"x": 0}, {"scale": 1.0, "salt": 7, "device": "cuda"})
    assert executor.resources(gpu) == {"num_cpus": 1, "num_gpus": 1.0}
    out = list(executor.run(toy_cell, [gpu]))
    assert out[0].status == "failed" and "GPU" in out[0].error


def test_unpicklable_cell_function_is_refused(cluster):
    executor, _ = cluster
    lock = threading.Lock()

    def holds_a_lock(cell):
        with lock:
            return toy_cell(cell)

    with pytest.raises(ExecutorError, match="cannot be sent to Ray workers.*module-level"):
        list(executor.run(holds_a_lock, _cells(1)))
