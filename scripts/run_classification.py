"""Run (or resume) the classification sweep of issue 4 from the command line.

    .venv/bin/python scripts/run_classification.py --profile cpu                # the profile's whole grid
    .venv/bin/python scripts/run_classification.py --profile cpu --wait         # ... and wait for DMFA/ACFlow
    .venv/bin/python scripts/run_classification.py --profile cpu -p methods=[zero,pc] -p seeds=[0]

Every finished (dataset, mask, method, seed) cell is appended to
``results/classification/<profile>/accuracy.csv`` at once; rerunning the same command skips finished
cells and resumes an interrupted one from its last epoch. Overrides (``-p key=value``, value in
YAML) replace the profile's ``02_classification`` parameters. The Markdown table
(``accuracy.md``) and the figure (``accuracy.png``) beside the CSV are refreshed after every cell
(``--no-report`` to skip); ``--readme README.md`` also refreshes the table in
that file between its ``<!-- classification-table:start/end -->`` markers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from labkit.studies.classification import (paired_markdown, plot_results, read_results, run_sweep, sweep_config,
                                           table_markdown, update_markdown_table)
from labkit.studies.reporting import replace_marked_block

try:
    from labkit.lab.profiles import parse_override
except ImportError:  # before labkit/lab/ existed
    from labkit.profiles import parse_override


def write_report(out_dir, profile: str, readme=None) -> None:
    """``accuracy.md`` (the pivot beside the paper's Table 1), ``accuracy_paired.md`` (per-seed
    differences, :func:`labkit.studies.classification.paired_markdown`) and ``accuracy.png`` from the CSV."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = read_results(out_dir / "accuracy.csv")
    if df.empty:
        return
    (out_dir / "accuracy.md").write_text(
        f"Classification accuracy, profile `{profile}` (mean ± std over seeds; n = seeds)\n\n"
        + table_markdown(df) + "\n")
    fig = plot_results(df, out_dir / "accuracy.png", title=f"MNIST test accuracy, profile {profile}")
    plt.close(fig)
    paired = paired_markdown(df)
    (out_dir / "accuracy_paired.md").write_text(
        f"Per-seed accuracy differences in points, profile `{profile}` (mean ± std over seeds)\n\n" + paired + "\n")
    if readme:
        update_markdown_table(readme, df)
        if "<!-- classification-paired:start -->" in Path(readme).read_text(encoding="utf-8"):
            replace_marked_block(readme, "classification-paired", paired)


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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    for text in args.param:
        _, key, value = parse_override(text)
        overrides[key] = value
    grid, cfg = sweep_config(args.profile, **overrides)
    cfg.progress = not args.no_progress
    out = cfg.results_path()
    print(f"[run_classification] profile {cfg.profile}: {grid} -> {out}", flush=True)
    print(f"[run_classification] {cfg}", flush=True)
    start = time.time()

    # refresh the report after every cell: run one cell at a time
    while True:
        before = len(read_results(out / "accuracy.csv"))
        df = run_sweep(grid["datasets"], grid["masks"], grid["methods"], grid["seeds"], cfg.profile, config=cfg,
                       wait=args.wait, poll_seconds=args.poll_seconds, max_cells=1, progress=cfg.progress)
        if not args.no_report:
            write_report(out, cfg.profile, args.readme)
        finished = len(df) > before
        if not finished or (args.max_cells is not None and len(df) - before >= args.max_cells):
            break
        if args.max_cells is not None:
            args.max_cells -= 1
            if args.max_cells <= 0:
                break
    print(f"[run_classification] stopped after {time.time() - start:.0f} s; {len(df)} rows in {out / 'accuracy.csv'}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
