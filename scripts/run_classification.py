"""Run (or resume) the classification sweep (notebook 02's study) from the command line, or only its report.

    .venv/bin/python scripts/run_classification.py --profile cpu                # the profile's whole grid
    .venv/bin/python scripts/run_classification.py --profile cpu --wait         # ... and wait for DMFA/ACFlow
    .venv/bin/python scripts/run_classification.py --profile cpu -p methods=[zero,pc] -p seeds=[0]

Every finished cell is recorded in ``results/classification/<profile>/accuracy.csv`` at once, under
its key (its coordinates, settings and the fingerprints of its data and checkpoints): rerunning the
same command skips finished cells and resumes an interrupted one from its last epoch; a rerun with
other settings runs new cells. Overrides (``-p key=value``, value in YAML) replace the profile's
``02_classification`` parameters. The Markdown table (``accuracy.md``) and the figure
(``accuracy.png``) beside the CSV are refreshed after every cell (``--no-report`` to skip); they
show the rows of the planned cells. ``--readme docs/classification.md`` also refreshes the tables in
that file between its ``<!-- classification-table:start/end -->`` (and ``classification-paired``)
markers. A cell that fails is reported and the others run; the command then exits with status 1,
listing the failed cells. ``--executor ray`` runs the cells as Ray tasks, side by side on this
machine's cores and GPUs (``--gpus-per-cell``) or on a running cluster (``--address auto``); the
results are written here, by this process, either way (docs/cluster.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from labkit.studies.classification import (paired_markdown, plot_results, run_sweep, sweep_config, table_markdown,
                                           update_markdown_table)
from labkit.studies.classification_tables import settings_line
from labkit.studies.engine import SweepFailed
from labkit.studies.executors import add_executor_arguments
from labkit.studies.reporting import replace_marked_block

try:
    from labkit.lab.profiles import parse_override
except ImportError:  # before labkit/lab/ existed
    from labkit.profiles import parse_override


def write_report(out_dir, profile: str, df, readme=None, *, stem: str = "accuracy",
                 markers: str = "classification") -> None:
    """``accuracy.md`` (the pivot beside the paper's Table 1), ``accuracy_paired.md`` (per-seed
    differences, :func:`labkit.studies.classification.paired_markdown`) and ``accuracy.png`` from the
    rows ``df`` (the planned cells), written as one set (:func:`labkit.studies.engine.write_files`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.studies.engine import write_files

    if df.empty:
        return
    title = f"{', '.join(sorted(set(df['dataset'])))} test accuracy, profile {profile}"
    fig = plot_results(df, None, title=title)
    paired = paired_markdown(df)
    write_files({
        out_dir / f"{stem}.md": f"Classification accuracy, profile `{profile}` (mean ± std over seeds; n = seeds); "
                                 f"{settings_line(df)}\n\n" + table_markdown(df) + "\n",
        out_dir / f"{stem}_paired.md": f"Per-seed accuracy differences in points, profile `{profile}` "
                                        "(labkit.studies.paired_stats)\n\n" + paired + "\n",
        out_dir / f"{stem}.png": lambda p: fig.savefig(p, dpi=120, format="png"),
    })
    plt.close(fig)
    if readme:
        update_markdown_table(readme, df, name=f"{markers}-table")
        if f"<!-- {markers}-paired:start -->" in Path(readme).read_text(encoding="utf-8"):
            replace_marked_block(readme, f"{markers}-paired", paired)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--wait", action="store_true", help="poll for DMFA/ACFlow checkpoints until every cell is done")
    ap.add_argument("--poll-seconds", type=float, default=300.0)
    ap.add_argument("--max-cells", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--readme", default=None,
                    help="also refresh the table between <!-- classification-table:start/end --> in this Markdown file")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: only write the report (and --readme tables) of the planned cells' rows")
    ap.add_argument("--report-stem", default="accuracy",
                    help="file names of the report beside the CSV: <stem>.md, <stem>_paired.md, <stem>.png")
    ap.add_argument("--markers", default="classification",
                    help="with --readme: fill <!-- NAME-table:start/end --> and <!-- NAME-paired:start/end -->")
    add_executor_arguments(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # a malformed or unknown -p is a usage error naming the key, not a traceback
        overrides = {key: value for _, key, value in map(parse_override, args.param)}
        grid, cfg = sweep_config(args.profile, **overrides)
    except ValueError as exc:
        ap.error(str(exc))
    cfg.progress = not args.no_progress
    out = cfg.results_path()
    print(f"[run_classification] profile {cfg.profile}: {grid} -> {out}", flush=True)
    print(f"[run_classification] {cfg}", flush=True)
    start = time.time()

    def report(df):
        if not args.no_report:
            write_report(out, cfg.profile, df, args.readme, stem=args.report_stem, markers=args.markers)

    if args.table_only:
        from labkit.studies.classification import plan_cells, read_results

        keys = {c.key for c in plan_cells(grid["datasets"], grid["masks"], grid["methods"], grid["seeds"], cfg)}
        df = read_results(out / "accuracy.csv")
        df = df[df["key"].isin(keys)]
        args.no_report = False
        report(df)
        print(f"[run_classification] report of {len(df)} of {len(keys)} planned cells written", flush=True)
        return 0

    from labkit.studies.executors import ExecutorError, make_executor

    try:
        executor = make_executor(args.executor, address=args.address, gpus_per_cell=args.gpus_per_cell,
                                 threads=args.threads or 1)
    except ExecutorError as exc:
        print(f"[run_classification] {exc}", flush=True)
        return 2
    failed = None
    try:
        df = run_sweep(grid["datasets"], grid["masks"], grid["methods"], grid["seeds"], cfg.profile, config=cfg,
                       wait=args.wait, poll_seconds=args.poll_seconds, max_cells=args.max_cells,
                       progress=cfg.progress, on_record=report, executor=executor)
    except SweepFailed as exc:
        failed = exc
        from labkit.studies.classification import read_results, plan_cells

        keys = {c.key for c in plan_cells(grid["datasets"], grid["masks"], grid["methods"], grid["seeds"], cfg)}
        df = read_results(out / "accuracy.csv")
        df = df[df["key"].isin(keys)]
    finally:
        executor.close()
    report(df)
    print(f"[run_classification] stopped after {time.time() - start:.0f} s; {len(df)} of the planned cells "
          f"recorded in {out / 'accuracy.csv'}", flush=True)
    if failed is not None:
        print(f"[run_classification] {failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
