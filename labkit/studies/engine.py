"""The study engine: the bookkeeping every study shares, written once.

A study is a grid of **cells**. A cell is its study, its grid coordinates (data set, mask, method,
seed, ...), every setting that changes its result (sizes, epochs, lr, batch size, precision, ...)
and the **fingerprints of its inputs** (the data actually used, as a content hash of the images and
labels; the content hash of every checkpoint it reads). Its key is a digest of all of that, so

- a cell is *done* only when a result row with the same key exists: a rerun with other settings, on
  other images or over a retrained checkpoint computes a new row instead of reusing an old one;
- caches (imputations, per-image MFAs) are stored under the fingerprints of what produced them, and
  a mismatch recomputes;
- result files are written atomically and validated on read: a truncated or malformed row is
  reported with its file and line and is not a result (its cell reruns); two rows with one key are
  an error naming the file; a result whose metric is NaN, inf or not a number is refused when
  recorded (:class:`InvalidMetric`): the cell is reported failed, never "ran";
- a row and its details record (the JSONL beside the CSV) are written as one set;
- a study that writes several files (CSV, JSON, figure) writes them as one set
  (:func:`write_files`): killed at any instant, the folder holds the old set or the new one;
- a cell that fails is reported (which, why) and the others still run; the sweep ends with
  :class:`SweepFailed` listing the failed cells.

Executors decide where cells run (:class:`LocalExecutor`, one after another in this process; other
executors, e.g. a Ray cluster, implement the same ``run(fn, cells)`` generator). The driver is the
only writer of result files: executors hand back rows, :func:`run_cells` records them.

Where things live: keys and fingerprints in :mod:`labkit.studies.engine_keys`, result files in
:mod:`labkit.studies.store`; this module re-exports both and adds caches and the cell runner.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from labkit.checkpoint import atomic_save, CheckpointError, load_checkpoint
from labkit.studies.engine_keys import (Cell, InputError, canonical, data_fingerprint, digest, file_digest,
                                        input_fingerprint, settings_differences, tensor_digest)
from labkit.studies.store import (InvalidMetric, Problem, ResultFileError, ResultStore, SettingsMismatch,
                                  check_uniform, locked, recover, write_files)

__all__ = [
    "canonical", "digest", "tensor_digest", "file_digest", "data_fingerprint", "input_fingerprint",
    "Cell", "ResultStore", "ResultFileError", "SettingsMismatch", "check_uniform", "settings_differences",
    "write_files", "recover", "cached", "InputError", "CellOutcome", "SweepFailed", "SweepIncomplete",
    "HELD_BY_OTHER", "retry_held", "held_unfinished", "unfinished_text", "LocalExecutor",
    "run_cells", "run_one", "locked", "Problem", "InvalidMetric",
]


# ============================================================================ caches
def cached(cache_dir: str | os.PathLike, name: str, key: Mapping[str, Any], compute: Callable[[], Any], *,
           progress: bool = True) -> Any:
    """``compute()`` once per ``key``, stored as ``<cache_dir>/<name>-<digest(key)>.pt``.

    ``key`` must hold the fingerprints of everything the value depends on (data content hashes,
    mask hashes, checkpoint content hashes, settings). The stored key is compared in full on load;
    a mismatch or an unreadable file recomputes (never reuses).
    """

    path = Path(cache_dir) / f"{name}-{digest(key)}.pt"
    want = canonical(key)
    stored = None
    if path.exists():
        try:
            stored = load_checkpoint(path, map_location="cpu")
        except (CheckpointError, OSError, RuntimeError) as exc:
            print(f"[cache] {path.name} is unreadable ({exc}); recomputing", flush=True)
    if isinstance(stored, Mapping) and stored.get("key") == want:
        return stored["value"]
    start = time.perf_counter()
    value = compute()
    if progress:
        print(f"[cache] {name}: computed in {time.perf_counter() - start:.1f} s -> {path.name}", flush=True)
    atomic_save({"key": want, "value": value, "seconds": time.perf_counter() - start}, path)
    return value


# ============================================================================ running cells
@dataclasses.dataclass
class CellOutcome:
    """What happened to one cell: ``status`` is "ran", "skipped" (done before), "failed" or "waiting"."""

    cell: Cell
    status: str
    metrics: dict | None = None
    details: dict | None = None
    error: str | None = None
    seconds: float = 0.0


class SweepFailed(RuntimeError):
    """Some cells failed; the others ran. ``failed`` lists the outcomes."""

    def __init__(self, failed: Sequence[CellOutcome]):
        self.failed = list(failed)
        lines = "\n".join(f"  - {o.cell.short()}: {o.error}" for o in self.failed)
        super().__init__(f"{len(self.failed)} cell(s) failed:\n{lines}")


def run_one(fn: Callable[[Cell], Mapping], cell: Cell) -> CellOutcome:
    """Run ``fn(cell)`` and turn what happens into a :class:`CellOutcome` (an exception becomes a
    "failed" outcome naming it and where it was raised). Executors call this in their workers."""
    start = time.perf_counter()
    try:
        result = fn(cell)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:   # one bad cell must not stop the others
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
        return CellOutcome(cell, "failed", error=f"{type(exc).__name__}: {exc}{at}",
                           seconds=time.perf_counter() - start)
    if not isinstance(result, Mapping) or "metrics" not in result:
        return CellOutcome(cell, "failed", error="the cell function returned no {'metrics': ...} dict",
                           seconds=time.perf_counter() - start)
    return CellOutcome(cell, "ran", metrics=dict(result["metrics"]), details=dict(result.get("details") or {}),
                       seconds=time.perf_counter() - start)


#: the error of a cell that came back "waiting" because another process holds its claim
HELD_BY_OTHER = "another process is running it"


class SweepIncomplete(SweepFailed):
    """A sweep that did not record every planned cell: ``failed`` (the cells that raised) and
    ``unfinished`` (cells another process held, running them, and had not recorded by the end)."""

    def __init__(self, failed: Sequence[CellOutcome], unfinished: Sequence[CellOutcome], resume: str = ""):
        self.failed = list(failed)
        self.unfinished = list(unfinished)
        parts = []
        if self.failed:
            parts.append(f"{len(self.failed)} cell(s) failed:\n" +
                         "\n".join(f"  - {o.cell.short()}: {o.error}" for o in self.failed))
        if self.unfinished:
            parts.append(unfinished_text(self.unfinished, resume))
        RuntimeError.__init__(self, "\n".join(parts))


def unfinished_text(unfinished: Sequence[CellOutcome], resume: str = "") -> str:
    """What to tell the user about cells another process held and never recorded."""
    how = resume or "run the same sweep again"
    return (f"{len(unfinished)} cell(s) not finished (another process held them and has not recorded them):\n"
            + "\n".join(f"  - {o.cell.short()}: {o.error or 'held by another process'}" for o in unfinished)
            + f"\n  If that process is still running, they will be recorded when it ends; if it died, {how}: "
              "recorded cells are skipped and these run.")


def retry_held(outcomes: Sequence[CellOutcome], fn: Callable[[Cell], Mapping], store: "ResultStore", *,
               executor: Any = None, log: Callable[[str], None] | None = None) -> list[CellOutcome]:
    """Try once more the cells that came back "waiting" because another process held them (that
    process may have died, releasing its claims); returns ``outcomes`` with those updated. Cells
    still held stay "waiting": the caller reports them as unfinished (:class:`SweepIncomplete`)."""
    held = [o.cell for o in outcomes if o.status == "waiting" and o.error == HELD_BY_OTHER]
    if not held:
        return list(outcomes)
    (log or (lambda text: print(text, flush=True)))(
        f"[sweep] {len(held)} cell(s) were held by another process: trying them once more")
    again = {o.cell.key: o for o in run_cells(held, fn, store, executor=executor, raise_on_failure=False, log=log)}
    return [again.get(o.cell.key, o) for o in outcomes]


def held_unfinished(outcomes: Sequence[CellOutcome]) -> list[CellOutcome]:
    """The outcomes still "waiting" on another process's claim."""
    return [o for o in outcomes if o.status == "waiting" and o.error == HELD_BY_OTHER]


def _claimed(executor: Any, fn: Callable[[Cell], Mapping], cells: Sequence[Cell],
             store: ResultStore) -> Iterator[CellOutcome]:
    """``executor.run`` one cell at a time, each under its claim: a cell another process holds
    comes back "waiting", one recorded since the store was read comes back "skipped". The claim
    is held while the caller records the outcome (the generator is suspended inside it)."""
    for cell in cells:
        with store.claim(cell.key) as mine:
            if not mine:
                yield CellOutcome(cell, "waiting", error=HELD_BY_OTHER)
            elif cell.key in store.done_keys():
                yield CellOutcome(cell, "skipped")
            else:
                yield from executor.run(fn, [cell])


class LocalExecutor:
    """Runs cells one after another in this process (the default executor).

    ``claims``: :func:`run_cells` claims each cell just before it runs (:meth:`ResultStore.claim`)
    and skips one that another process is running or has recorded meanwhile, so that the same
    sweep started twice on one results folder splits its cells instead of running them twice.
    """

    name = "local"
    claims = True

    def run(self, fn: Callable[[Cell], Mapping], cells: Sequence[Cell]) -> Iterator[CellOutcome]:
        for cell in cells:
            yield run_one(fn, cell)

    def close(self) -> None:
        pass


def run_cells(cells: Sequence[Cell], fn: Callable[[Cell], Mapping], store: ResultStore, *,
              executor: Any = None, available: Callable[[Cell], str | None] | None = None,
              wait: bool = False, poll_seconds: float = 300.0, max_cells: int | None = None,
              raise_on_failure: bool = True, log: Callable[[str], None] | None = None,
              on_outcome: Callable[[CellOutcome], None] | None = None) -> list[CellOutcome]:
    """Run every cell of ``cells`` whose key is not yet in ``store``, recording each row as it arrives.

    Args:
        cells: the planned cells, in run order.
        fn: ``fn(cell) -> {"metrics": {...}, "details": {...}}``; it must not write the store.
        store: where rows go (the driver is its only writer).
        executor: where cells run (default :class:`LocalExecutor`); anything with
            ``run(fn, cells) -> iterator of CellOutcome``.
        available: ``available(cell) -> None`` if the cell can run now, else why not (a checkpoint
            it needs does not exist yet); such cells are reported once and left for later.
        wait: poll every ``poll_seconds`` for unavailable cells instead of leaving them.
        max_cells: stop after this many cells ran or failed.
        raise_on_failure: raise :class:`SweepFailed` at the end if a cell failed.
        on_outcome: called with each ran/failed outcome after it is recorded (e.g. to refresh a report).

    Prints one line per cell: ``ran`` / ``skipped`` / ``failed`` / ``waiting`` with its short key.
    Returns the outcomes of every cell.
    """
    say = log or (lambda text: print(text, flush=True))
    executor = executor or LocalExecutor()
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        dup = sorted({c.short() for c in cells if keys.count(c.key) > 1})
        raise ValueError(f"the plan holds the same cell twice: {dup}")
    outcomes: dict[str, CellOutcome] = {}
    reported_waiting: set[str] = set()
    total = len(cells)
    n_done = 0
    first = True
    while True:
        # the first read reports malformed rows (file and line); later reads stay quiet
        done = set(store.read(report=first)["key"])
        first = False
        todo = []
        for c in cells:
            if c.key in done:
                # also a cell left waiting that another process has finished meanwhile
                if c.key not in outcomes or outcomes[c.key].status == "waiting":
                    outcomes[c.key] = CellOutcome(c, "skipped")
                    say(f"[{c.study}] skipped {c.short()} (done)")
            elif c.key not in outcomes or outcomes[c.key].status == "waiting":
                todo.append(c)
        runnable = []
        for c in todo:
            why = available(c) if available else None
            if why:
                if c.key not in reported_waiting:
                    say(f"[{c.study}] waiting {c.short()}: {why}")
                    reported_waiting.add(c.key)
                outcomes[c.key] = CellOutcome(c, "waiting", error=why)
            else:
                runnable.append(c)
        if max_cells is not None:
            runnable = runnable[:max(0, max_cells - n_done)]
        claims = getattr(executor, "claims", False)
        for outcome in (_claimed(executor, fn, runnable, store) if claims else executor.run(fn, runnable)):
            c = outcome.cell
            outcomes[c.key] = outcome
            if outcome.status == "skipped":
                say(f"[{c.study}] skipped {c.short()} (done by another process)")
                continue
            if outcome.status == "waiting":
                if c.key not in reported_waiting:
                    say(f"[{c.study}] waiting {c.short()}: {outcome.error}")
                    reported_waiting.add(c.key)
                continue
            n_done += 1
            if outcome.status == "ran":
                try:
                    added = store.record(c, outcome.metrics, {**(outcome.details or {}),
                                                              "seconds": round(outcome.seconds, 1)})
                except InvalidMetric as exc:     # a NaN/inf result is a failure, not a row
                    outcome = dataclasses.replace(outcome, status="failed", error=f"InvalidMetric: {exc}")
                    outcomes[c.key] = outcome
            if outcome.status == "ran":
                shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in list(outcome.metrics.items())[:2])
                note = "" if added else " (another process recorded it first)"
                say(f"[{c.study}] ran {c.short()}: {shown} ({outcome.seconds:.0f} s){note}")
            else:
                say(f"[{c.study}] failed {c.short()}: {outcome.error}")
            if on_outcome is not None:
                on_outcome(outcome)
        waiting = [o for o in outcomes.values() if o.status == "waiting"]
        if not waiting or not wait or (max_cells is not None and n_done >= max_cells):
            break
        time.sleep(poll_seconds)
    result = [outcomes[c.key] for c in cells if c.key in outcomes]
    counts = {s: sum(o.status == s for o in result) for s in ("ran", "skipped", "failed", "waiting")}
    say(f"[sweep] {total} cells: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + f" -> {store.path}")
    failed = [o for o in result if o.status == "failed"]
    if failed and raise_on_failure:
        raise SweepFailed(failed)
    return result
