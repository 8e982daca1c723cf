#!/usr/bin/env python
"""Run (or resume) the WAE study from the command line, and write its README table.

    .venv/bin/python scripts/run_wae.py --profile cpu [--fronts gt zero ...] [--seeds 0 1 2]
                                         [--threads 1] [--wait] [-p key=value ...]
    .venv/bin/python scripts/run_wae.py --profile cpu --table-only   # only the README table and figures

Settings come from the profile's ``03_wae`` section (``profiles/<profile>.yaml``); ``-p key=value``
overrides any of them (values read as YAML). Finished cells are appended to
``results/wae/<profile>/metrics.csv`` one by one, so the command can be interrupted and rerun: it
skips what is done and resumes an interrupted cell from its last epoch. At the end (and with
``--table-only``) the results table is regenerated from the CSV into ``README.md``
between the ``<!-- wae-table:<profile> -->`` markers.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

README = REPO / "README.md"


def write_table(profile: str, csv: Path, readme: Path = README) -> str:
    """Regenerate the table of ``csv`` between ``<!-- wae-table:<profile> -->`` and
    ``<!-- /wae-table:<profile> -->`` in ``readme`` (appended at the end if the markers are absent)."""
    from labkit.studies import wae

    df = wae.read_results(csv)
    table = wae.table_markdown(df)
    seeds = sorted({int(s) for s in df["seed"]}) if len(df) else []
    info = ""
    if len(df):
        info = (f"\n\n_{len(df)} runs; epochs {sorted(set(df['epochs']))}, training images "
                f"{sorted(set(df['n_train']))}, test images {sorted(set(df['n_test']))}, seeds {seeds}; "
                f"generated from `{csv.relative_to(REPO) if csv.is_relative_to(REPO) else csv}` by "
                f"`scripts/run_wae.py --table-only`._")
    block = f"<!-- wae-table:{profile} -->\n{table}{info}\n<!-- /wae-table:{profile} -->"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    pattern = re.compile(rf"<!-- wae-table:{re.escape(profile)} -->.*?<!-- /wae-table:{re.escape(profile)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text(text, encoding="utf-8")
    return table


def main(argv=None) -> int:
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
                    help="run nothing: only redraw the summary figures and rewrite the README table from the CSV")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    import torch

    from labkit.studies import wae

    try:
        from labkit.lab.profiles import notebook_parameters, parse_override
    except ImportError:  # before labkit/lab/ existed
        from labkit.profiles import notebook_parameters, parse_override

    params = notebook_parameters(args.profile, "03_wae")
    for text in args.param:
        _, key, value = parse_override(text)
        params[key] = value
    if args.dataset:
        params["dataset"] = args.dataset
    if args.fronts:
        params["fronts"] = args.fronts
    if args.seeds is not None:
        params["seeds"] = args.seeds
    fields = set(wae.WAEConfig.__dataclass_fields__)
    cfg = wae.WAEConfig(**{k: v for k, v in params.items() if k in fields})
    cfg.profile = args.profile
    cfg.progress = not args.no_progress
    csv = cfg.results_path() / "metrics.csv"
    if not args.table_only:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"[wae] profile {args.profile}: {params}", flush=True)
        wae.run_sweep(params["dataset"], params["fronts"], params["seeds"], args.profile, config=cfg,
                      wait=args.wait, poll_seconds=args.poll)
    write_figures(cfg, params["dataset"], [wae.canonical_front(f) for f in params["fronts"]], params["seeds"])
    print(write_table(args.profile, csv))
    return 0


def write_figures(cfg, dataset: str, fronts, seeds) -> None:
    """The study's summary figures: metrics per front, and reconstructions / prior samples of every
    finished front side by side for the first seed (from the example tensors each cell saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labkit.studies import wae

    df = wae.read_results(cfg.results_path() / "metrics.csv")
    df = df[df["dataset"] == dataset]
    figs = cfg.results_path() / "figures"
    if len(df):
        plt.close(wae.plot_metrics(df, figs / f"{dataset}-metrics.png",
                                   title=f"WAE on incomplete {dataset} ({cfg.profile} profile)"))
    shown = seeds[0]
    examples = {f: wae.load_examples(dataset, f, shown, cfg) for f in fronts}
    examples = {f: e for f, e in examples.items() if e is not None}
    if examples:
        plt.close(wae.plot_front_grid(examples, what="reconstruction", title=f"{dataset}, seed {shown}: reconstructions",
                                      path=figs / f"{dataset}-fronts-s{shown}-reconstruction.png"))
        plt.close(wae.plot_front_grid(examples, what="samples", title=f"{dataset}, seed {shown}: decoded prior samples",
                                      path=figs / f"{dataset}-fronts-s{shown}-samples.png"))


if __name__ == "__main__":
    raise SystemExit(main())
