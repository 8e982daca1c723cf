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
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOC = REPO / "docs" / "wae.md"


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
    ap.add_argument("--doc", default=str(DOC), help="the Markdown file whose table to refresh (default docs/wae.md)")
    ap.add_argument("--marker", default=None,
                    help="the table's marker name in --doc: <!-- wae-table:NAME --> (default: the profile's name)")
    add_executor_arguments(ap)
    args = ap.parse_args(argv)

    import torch

    from labkit.studies import wae
    from labkit.studies.engine import SweepFailed

    from labkit.lab.profiles import apply_overrides, notebook_parameters

    fields = set(wae.WAEConfig.__dataclass_fields__)
    params = notebook_parameters(args.profile, "03_wae")
    try:
        params = apply_overrides(params, args.param, where=f"the {args.profile} profile's 03_wae section",
                                 valid=set(params) | fields)
    except ValueError as exc:
        ap.error(str(exc))
    if args.dataset:
        params["dataset"] = args.dataset
    if args.fronts:
        params["fronts"] = args.fronts
    if args.seeds is not None:
        params["seeds"] = args.seeds
    cfg = wae.WAEConfig(**{k: v for k, v in params.items() if k in fields})
    cfg.profile = args.profile
    cfg.progress = not args.no_progress
    cfg.check()
    fronts = [wae.canonical_front(f) for f in params["fronts"]]
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
    readme = Path(args.doc) if cfg.results_dir is None else cfg.results_path() / "table.md"
    print(write_table(args.profile, cfg, cells, readme, marker=args.marker))
    print(f"[wae] table -> {readme}")
    if failure is not None:
        print(f"[wae] {failure}", file=sys.stderr)
        return 1
    return 0


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
