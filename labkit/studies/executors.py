"""Where a study's cells run: one after another here, or as Ray tasks on a workstation or a cluster.

:func:`make_executor` builds one by name (``"local"`` or ``"ray"``); the sweep scripts pass it to
:func:`labkit.studies.engine.run_cells`, which stays the only writer of result files. An executor's
``run(fn, cells)`` yields one :class:`~labkit.studies.engine.CellOutcome` per cell as cells finish.

:class:`RayExecutor` sends each cell to a Ray task:

- **Resources.** A cell on CUDA takes ``gpus_per_cell`` of a GPU (a fraction lets several cells
  share one) and ``threads`` CPUs (the host thread that drives it); a CPU cell takes ``threads``
  CPUs. Its device is, first found: the ``device`` given to :meth:`RayExecutor.run` or to the
  executor; ``cell.settings["device"]`` or ``cell.coords["device"]``; the ``device`` of the cell
  function (a keyword of a ``functools.partial`` or an attribute of its config object); else
  ``"auto"``, which means CUDA when the cluster has GPUs. Ray hides the GPUs from a CPU cell
  (``CUDA_VISIBLE_DEVICES=""``) and shows a CUDA cell only the one it was given, so inside the task
  ``"auto"`` and ``"cuda"`` land where Ray scheduled the cell (use ``"cuda"``, not ``"cuda:1"``).
- **Threads.** Each task calls ``torch.set_num_threads(threads)`` and gets ``OMP_NUM_THREADS=threads``.
- **Failures.** A cell function that raises is a failed cell at once, not retried: study code is
  deterministic, so it would raise again (the local executor does the same). A task whose worker
  process dies (killed, out of memory, its node lost) is retried by Ray up to ``max_retries`` times,
  then reported as a failed cell naming the crash.
- **Pickling.** The cell function and the cells travel to the workers by cloudpickle. Make the cell
  function a module-level function or a ``functools.partial`` of one with picklable arguments (a
  config dataclass); its module must be importable on every worker (same checkout or installed
  package on every node). A function that cannot be pickled is refused before any cell starts.
- **Files.** Workers write no result file: they return the metrics/details dict to the driver. They
  load their data sets themselves; caches go to ``cache_dir`` (passed to the workers as
  ``LABKIT_CACHE``; put it on a path every node sees) and are keyed by the fingerprints of what
  they hold, so sharing them or rebuilding them per worker are both safe. ``LAB_ROOT``,
  ``LABKIT_DATA`` and ``LABKIT_SHARED_DATASETS`` set in the driver are passed on too.
- **Lifetime.** Without an address the executor starts a Ray of its own on this machine (sized by
  ``num_cpus``, default all cores) and :meth:`RayExecutor.close` shuts it down; with an address
  (``"auto"`` or ``host:port``) it joins a running cluster and ``close`` only disconnects from it.
  A Ray already initialised in this process is used as it is and left alone.
"""
from __future__ import annotations

import functools
import os
import socket
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from labkit.studies.engine import Cell, CellOutcome, LocalExecutor, run_one

__all__ = ["EXECUTORS", "ExecutorError", "RayExecutor", "cell_device", "make_executor"]

EXECUTORS = ("local", "ray")

RAY_INSTALL_HINT = "pip install 'ray==2.60.0' (it is part of the lab extra: pip install -e '.[lab]')"

# environment variables of the driver that workers need to find the same checkout, data and caches
_FORWARDED_ENV = ("LAB_ROOT", "LABKIT_DATA", "LABKIT_SHARED_DATASETS", "LABKIT_CACHE")


class ExecutorError(RuntimeError):
    """An executor cannot be built or used (unknown name, Ray missing, no cluster at an address, ...)."""


def make_executor(name: str = "local", *, address: str | None = None, num_cpus: int | None = None,
                  gpus_per_cell: float = 1.0, threads: int = 1, max_retries: int = 2,
                  cache_dir: str | os.PathLike | None = None, device: str | None = None,
                  init_kwargs: Mapping[str, Any] | None = None):
    """An executor by name: ``"local"`` -> :class:`~labkit.studies.engine.LocalExecutor`,
    ``"ray"`` -> :class:`RayExecutor` (the other arguments are the Ray executor's).

    Raises:
        ExecutorError: unknown ``name`` (the message lists the valid ones), Ray not installed, or no
            Ray cluster reachable at ``address``.
    """
    if not isinstance(name, str) or name.lower() not in EXECUTORS:
        raise ExecutorError(f"unknown executor {name!r}; valid executors: {', '.join(EXECUTORS)}")
    if name.lower() == "local":
        return LocalExecutor()
    return RayExecutor(address=address, num_cpus=num_cpus, gpus_per_cell=gpus_per_cell, threads=threads,
                       max_retries=max_retries, cache_dir=cache_dir, device=device, init_kwargs=init_kwargs)


def add_executor_arguments(parser) -> None:
    """The sweep scripts' executor flags: ``--executor``, ``--address``, ``--gpus-per-cell``."""
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local: cells one after another here (default); ray: one Ray task per cell "
                             "(docs/cluster.md)")
    parser.add_argument("--address", default=None,
                        help="with --executor ray: join the Ray cluster at ADDR ('auto' or host:6379); "
                             "default: start one here")
    parser.add_argument("--gpus-per-cell", type=float, default=1.0,
                        help="with --executor ray: the share of a GPU each CUDA cell takes (default 1)")


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ExecutorError(f"the ray executor needs Ray, which is not installed here ({exc}); "
                            f"install it with {RAY_INSTALL_HINT}") from exc
    return ray


def _device_of_function(fn: Any) -> Any:
    """The device a cell function declares: ``fn.device``, a ``device=`` keyword of a partial, or the
    ``device`` attribute of a partial's config argument; ``None`` if it declares none."""
    if getattr(fn, "device", None) is not None:
        return fn.device
    if isinstance(fn, functools.partial):
        if fn.keywords.get("device") is not None:
            return fn.keywords["device"]
        for arg in list(fn.args) + list(fn.keywords.values()):
            if getattr(arg, "device", None) is not None and not hasattr(arg, "shape"):   # not a tensor's
                return arg.device
        return _device_of_function(fn.func)
    return None


def cell_device(cell: Cell, fn: Any = None, device: Any = None, *, cluster_has_gpus: bool = False) -> str:
    """``"cuda"`` or ``"cpu"``: the kind of device ``cell`` runs on (see the module doc for the order).

    ``"auto"`` (or nothing said) is CUDA when ``cluster_has_gpus``; ``"cuda:N"`` is CUDA; anything
    else (``"cpu"``, ``"mps"``) takes CPUs.
    """
    for found in (device, cell.settings.get("device"), cell.coords.get("device"), _device_of_function(fn)):
        if found is not None:
            device = str(found)
            break
    else:
        device = "auto"
    if device == "auto":
        return "cuda" if cluster_has_gpus else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def _run_in_worker(fn: Callable[[Cell], Mapping], cell: Cell, threads: int) -> CellOutcome:
    """The body of one Ray task: run ``fn(cell)`` with ``threads`` intra-op threads.

    Exceptions of ``fn`` become a "failed" outcome (as in the local executor); the outcome, with the
    metrics/details dict, goes back to the driver, which records it.
    """
    import torch


    torch.set_num_threads(threads)
    return run_one(fn, cell)


def _usable_cpus() -> int:
    """The cores this process may use (its affinity: a SLURM or container limit), else all of them."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast when nothing listens at a ``host:port`` address (Ray itself retries for minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ExecutorError(f"Ray address {address!r} is not 'auto' or host:port (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ExecutorError(
            f"cannot connect to a Ray cluster at address {address!r}: nothing answers there ({exc}). "
            "Is `ray start --head` running on that machine, and is the port open?") from exc


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].rstrip(".") if text else type(exc).__name__
    return (line[:limit] + "...") if len(line) > limit else line


class RayExecutor:
    """Runs each cell as a Ray task and yields outcomes as tasks complete.

    Args:
        address: ``None`` starts a Ray on this machine; ``"auto"`` joins the cluster started here with
            ``ray start`` (or named by ``RAY_ADDRESS``); ``"host:port"`` joins that head node.
        num_cpus: the CPUs of a Ray this executor starts (default: all of this machine's).
        gpus_per_cell: the share of a GPU one CUDA cell takes (0.5: two cells per GPU; 2: two GPUs).
        threads: CPUs per cell, and torch's intra-op threads in the task.
        max_retries: how many times a task whose worker died is run again before its cell fails.
        cache_dir: a cache folder every worker sees, given to the workers as ``LABKIT_CACHE``.
        device: the device of every cell (else found per cell: see :func:`cell_device`).
        init_kwargs: extra keyword arguments for ``ray.init`` (e.g. ``{"_temp_dir": ...}``).
    """

    name = "ray"

    def __init__(self, *, address: str | None = None, num_cpus: int | None = None, gpus_per_cell: float = 1.0,
                 threads: int = 1, max_retries: int = 2, cache_dir: str | os.PathLike | None = None,
                 device: str | None = None, init_kwargs: Mapping[str, Any] | None = None):
        if not isinstance(gpus_per_cell, (int, float)) or isinstance(gpus_per_cell, bool) or gpus_per_cell <= 0:
            raise ExecutorError(f"gpus_per_cell must be a positive number, got {gpus_per_cell!r}")
        if gpus_per_cell > 1 and float(gpus_per_cell) != int(gpus_per_cell):
            raise ExecutorError(f"gpus_per_cell above 1 must be a whole number of GPUs (Ray's rule), "
                                f"got {gpus_per_cell!r}")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ExecutorError(f"threads must be a whole number >= 1, got {threads!r}")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise ExecutorError(f"max_retries must be a whole number >= 0, got {max_retries!r}")
        if num_cpus is not None and (not isinstance(num_cpus, int) or num_cpus < 1):
            raise ExecutorError(f"num_cpus must be a whole number >= 1, got {num_cpus!r}")
        self.address = address
        self.gpus_per_cell = float(gpus_per_cell)
        self.threads = threads
        self.max_retries = max_retries
        self.device = device
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.ray = _import_ray()
        # shut down at close only what this executor set up: a Ray it started (or a connection it
        # opened); never one that was running in this process already
        self._connected_here = False
        if self.ray.is_initialized():
            return
        init = {"include_dashboard": False, **dict(init_kwargs or {})}
        if address is None:
            init.update(address="local", num_cpus=num_cpus or _usable_cpus())
        else:
            _check_reachable(address)
            init.update(address=address)
        try:
            self.ray.init(**init)
        except Exception as exc:   # Ray raises ConnectionError, RuntimeError or ValueError here
            if address is None:
                raise ExecutorError(f"could not start a local Ray: {_first_line(exc)}") from exc
            raise ExecutorError(
                f"cannot connect to a Ray cluster at address {address!r}: {_first_line(exc)}. Start one with "
                "`ray start --head` (then --address auto on that machine, or <head-ip>:6379 elsewhere), "
                "or leave out the address to start a Ray on this machine") from exc
        self._connected_here = True

    # ------------------------------------------------------------------ cluster facts
    def _node_resources(self) -> list[dict]:
        return [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive", True)]

    def cluster_has_gpus(self) -> bool:
        return any(r.get("GPU", 0) > 0 for r in self._node_resources())

    def _environment(self, cuda: bool) -> dict[str, str]:
        env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
        if self.cache_dir is not None:
            env["LABKIT_CACHE"] = self.cache_dir
        env["OMP_NUM_THREADS"] = str(self.threads)
        if not cuda:
            # Ray leaves CUDA_VISIBLE_DEVICES alone for tasks without GPUs; hide them so that a cell
            # on "auto" cannot take a GPU nobody reserved for it
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def resources(self, cell: Cell, fn: Any = None, device: Any = None, *, has_gpus: bool | None = None) -> dict:
        """The Ray resources of ``cell``'s task: ``{"num_cpus": ..., "num_gpus": ...}``."""
        if has_gpus is None:
            has_gpus = self.cluster_has_gpus()
        cuda = cell_device(cell, fn, device if device is not None else self.device, cluster_has_gpus=has_gpus) == "cuda"
        return {"num_cpus": self.threads, "num_gpus": self.gpus_per_cell if cuda else 0}

    @staticmethod
    def _infeasible(res: Mapping[str, float], nodes: list[dict]) -> str | None:
        if any(r.get("CPU", 0) >= res["num_cpus"] and r.get("GPU", 0) >= res["num_gpus"] for r in nodes):
            return None
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no nodes"
        return (f"no node of the Ray cluster has {res['num_cpus']:g} CPU and {res['num_gpus']:g} GPU for this cell "
                f"(nodes: {have}); lower --gpus-per-cell/threads, run it on the CPU, or add such a node")

    # ------------------------------------------------------------------ running
    def run(self, fn: Callable[[Cell], Mapping], cells: Sequence[Cell], device: Any = None) -> Iterator[CellOutcome]:
        """Submit every cell as a task; yield each :class:`CellOutcome` as its task completes."""
        ray = self.ray
        cells = list(cells)
        if not cells:
            return
        try:
            fn_ref = ray.put(fn)
        except Exception as exc:
            raise ExecutorError(
                f"the cell function {fn!r} cannot be sent to Ray workers ({type(exc).__name__}: {_first_line(exc)}); "
                "make it a module-level function or functools.partial(module_function, config) with "
                "picklable arguments") from exc
        remote = ray.remote(_run_in_worker)
        nodes = self._node_resources()                 # asked once per run, not once per cell
        has_gpus = any(r.get("GPU", 0) > 0 for r in nodes)
        pending: dict[Any, tuple[Cell, float]] = {}
        try:
            for cell in cells:
                res = self.resources(cell, fn, device, has_gpus=has_gpus)
                why = self._infeasible(res, nodes)
                if why:
                    yield CellOutcome(cell, "failed", error=why)
                    continue
                task = remote.options(
                    num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_retries=self.max_retries,
                    retry_exceptions=False, runtime_env={"env_vars": self._environment(res["num_gpus"] > 0)},
                    name=f"cell {cell.short()}")
                pending[task.remote(fn_ref, cell, self.threads)] = (cell, time.perf_counter())
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    cell, started = pending.pop(ref)
                    yield self._outcome(ref, cell, started)
        finally:
            # the driver stopped early (Ctrl-C, an error while recording): stop the cells still queued
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:   # already finished or its worker gone; nothing left to stop
                    pass

    def _outcome(self, ref: Any, cell: Cell, started: float) -> CellOutcome:
        ray = self.ray
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            # run_one catches the cell function's exceptions, so this is the task itself failing:
            # typically the function or a module it needs could not be loaded on the worker
            return CellOutcome(cell, "failed", seconds=time.perf_counter() - started,
                               error=f"the Ray task failed ({_first_line(exc)}); is the cell function's "
                                     "module importable on every worker?")
        except ray.exceptions.RayError as exc:
            return CellOutcome(cell, "failed", seconds=time.perf_counter() - started,
                               error=f"its worker died ({type(exc).__name__}) on each of {self.max_retries + 1} "
                                     f"attempt(s): {_first_line(exc)}")
        if not isinstance(outcome, CellOutcome):
            return CellOutcome(cell, "failed", error=f"the Ray task returned {type(outcome).__name__}, not an outcome")
        return outcome

    def close(self) -> None:
        """Shut down the Ray this executor started (a joined cluster is only disconnected from)."""
        if self._connected_here and self.ray.is_initialized():
            self.ray.shutdown()
        self._connected_here = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
