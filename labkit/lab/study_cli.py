"""``./lab study``: every study run from the shell the same way, with the same flags.

    ./lab study classification --profile cpu                       # the profile's whole grid
    ./lab study classification --profile cpu -p epochs=5 -p seeds=[0]
    ./lab study wae --profile cpu --table-only --doc docs/wae.md   # only the tables
    ./lab study dmfa --profile cpu --executor ray                  # cells as Ray tasks
    ./lab study dmfa --profile cpu --baselines-only                 # only the classical MFA and ACFlow baselines
    ./lab study timing --profile cpu
    ./lab study acflow --profile cpu                               # the ACFlow imputer (trained once: reused)
    ./lab study classification --settings                          # every setting, its value and where it came from
    ./lab study classification --profile cpu --diagnostics --doc docs/classification.md   # the imputers' diagnostics
    ./lab study classification --profile cifar10_authors --table-only --beside cpu   # two budgets side by side
    ./lab study classification --profile cifar10_authors --merge-from DIR   # rows recorded elsewhere, brought home

(``python -m labkit.lab.study_cli ...`` is the same command.) The settings are the study's config
(:mod:`labkit.studies.configs`): its defaults, the profile's section, then each ``-p key=value``
(YAML values, checked: an unknown name or a bad value is an error naming it, nothing runs). The
command then says what it will do before anything trains (:mod:`labkit.lab.runplan`): the data,
whether they are the committed results', where the results go (``-p`` on a grid list — seeds,
masks, methods, fronts, modes, missing kinds, holes — picks cells with the profile's own settings,
which belong to its results; a ``-p`` that changes any other setting makes the run *ad hoc*: it
writes under the git-ignored ``results/<study>/adhoc/``, and ``--into-committed`` grows the
committed results on purpose), the cells found, to run and their
estimated time. Finished cells are recorded one by one, so the command can be interrupted and
rerun: it skips what is done and resumes an interrupted cell. After every recorded cell, and with
``--table-only`` instead of running, the study's tables and figures beside its results are
rewritten (with ``--doc FILE``, also the marked blocks of that Markdown file). A failed cell is
reported and the others run; the command then exits with status 1. The tour (00) and the
draw-a-mask notebook (05) are notebooks only: ``./lab run --only 00``, ``./lab jupyter``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from labkit import paths
from labkit.checkpoint import TableFileError
from labkit.config import parse_override
from labkit.lab import runplan
from labkit.studies.configs import config_class
from labkit.studies.engine import ResultFileError, SweepFailed
from labkit.studies.executors import add_executor_arguments, ExecutorError, make_executor
from labkit.studies.merge import merge_results

__all__ = ["STUDIES", "build_config", "main", "settings_table"]

#: study name -> (its module, its results folder under results/); the notebook-only studies are absent
STUDIES = {"dmfa": ("labkit.studies.density", "dmfa"), "classification": ("labkit.studies.classification", "classification"),
           "wae": ("labkit.studies.wae", "wae"), "timing": ("labkit.studies.timing", "timing"),
           "acflow": ("labkit.studies.acflow_study", "acflow")}
NOTEBOOK_ONLY = {"tour": "00", "draw": "05"}


def _overrides(texts: Sequence[str], section: str) -> tuple[dict[str, Any], dict[str, str]]:
    values, origins = {}, {}
    for text in texts:
        target, key, value = parse_override(text)
        if target is not None and target != section:
            raise ValueError(f"-p {text}: names section {target!r}, but this is the {section} study")
        values[key], origins[key] = value, f"-p {text}"
    return values, origins


def build_config(study: str, profile: str, texts: Sequence[str]):
    """(the profile's config, the run's config: the profile's with every ``-p`` of ``texts``)."""
    cls = config_class(study)
    values, origins = _overrides(texts, cls.SECTION)
    return cls.build(profile), cls.build(profile, values, origins=origins)


def settings_table(cfg, profile_cfg) -> str:
    """Every setting of ``cfg``: its value, where it came from (default / profile / -p) and its doc."""
    defaults = type(cfg).defaults()
    rows = [f"{'setting':<22} {'value':<44} {'from':<8} what it is"]
    for name in cfg.names():
        value = getattr(cfg, name)
        origin = ("-p" if not runplan.same_value(value, getattr(profile_cfg, name)) else
                  "profile" if not runplan.same_value(value, defaults[name]) else "default")
        rows.append(f"{name:<22} {value!r:<44} {origin:<8} {cfg.doc(name)}")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="./lab study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help=f"one of {', '.join(STUDIES)}")
    ap.add_argument("--profile", default="quick", help="profiles/<name>.yaml or a YAML path (default quick)")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of this run (YAML value); repeatable")
    ap.add_argument("--settings", action="store_true", help="print every setting, its value and origin; run nothing")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    ap.add_argument("--results", default=None, metavar="DIR", help="results folder (default results/<study>/<profile>)")
    ap.add_argument("--table-only", action="store_true", help="run nothing: only write the tables of the planned cells")
    ap.add_argument("--doc", default=None, metavar="FILE", help="also refresh the marked tables in this Markdown file")
    ap.add_argument("--marker", default=None, help="with --doc: the name of the marked blocks (default: the study's)")
    ap.add_argument("--report-stem", default=None, metavar="NAME",
                    help="classification: the report's file names beside the CSV (<NAME>.md, <NAME>_paired.md, "
                         "<NAME>.png; default accuracy), e.g. for the CIFAR-10 rows kept beside the MNIST ones")
    ap.add_argument("--beside", default=None, metavar="PROFILE",
                    help="classification: also put the planned rows beside the same data set, masks and methods "
                         "recorded by another profile (another budget): <NAME>_budgets.md, and the "
                         "<marker>-budgets block of --doc")
    ap.add_argument("--merge-from", default=None, metavar="DIR",
                    help="run nothing: add the rows recorded in DIR (another copy of these results, e.g. brought back "
                         "from a GPU machine) for the planned cells not recorded here, with their details, then "
                         "write the tables as --table-only")
    ap.add_argument("--baselines-only", action="store_true",
                    help="dmfa: only the baselines (classical MFA, a trained ACFlow) on the config's holes, not the "
                         "DMFA grid (which runs them after itself)")
    ap.add_argument("--diagnostics", action="store_true",
                    help="classification: the imputers' diagnostics on the first 1,000 test images of the first seed, "
                         "instead of the sweep")
    ap.add_argument("--wait", action="store_true", help="wait for DMFA/ACFlow checkpoints that do not exist yet")
    ap.add_argument("--poll-seconds", type=float, default=300.0, help="seconds between checks with --wait")
    ap.add_argument("--max-cells", type=int, default=None, help="stop after this many cells ran or failed")
    ap.add_argument("--into-committed", action="store_true",
                    help="write into the profile's committed results although -p changes settings (refused on other data)")
    add_executor_arguments(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.study in NOTEBOOK_ONLY:
        ap.error(f"the {args.study} study is a notebook: ./lab run --only {NOTEBOOK_ONLY[args.study]}, or open it "
                 "with ./lab jupyter")
    if args.study not in STUDIES:
        close = [s for s in STUDIES if s.startswith(args.study[:3])]
        ap.error(f"unknown study {args.study!r}; studies are {', '.join(STUDIES)}"
                 + (f" (did you mean {close[0]!r}?)" if close else ""))
    try:
        profile_cfg, cfg = build_config(args.study, args.profile, args.param)
    except ValueError as exc:            # a usage error naming the setting, not a traceback
        ap.error(str(exc))
    if args.settings:
        print(settings_table(cfg, profile_cfg))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    module_name, folder = STUDIES[args.study]
    study = importlib.import_module(module_name)
    name = Path(str(args.profile)).stem
    tag = f"[{args.study}]"
    if args.diagnostics and not hasattr(study, "diagnostics"):
        ap.error(f"the {args.study} study has no diagnostics (--diagnostics runs a study's own diagnostics, "
                 "e.g. ./lab study classification --diagnostics)")
    if not hasattr(study, "plan"):       # a study without cells (timing, acflow): run it whole
        if args.results:
            cfg = cfg.replace(results_dir=args.results)
        results = study.read_results(cfg) if args.table_only else study.run(cfg, progress=not args.no_progress)
        for path in study.write_report(cfg, results, doc=args.doc, **_marker(args)):
            print(f"{tag} wrote {path}", flush=True)
        return 0
    try:
        cfg, dest, cells, changed, splits = _plan(study, folder, name, profile_cfg, cfg, args)
    except ValueError as exc:
        ap.error(str(exc))
    runplan.write_note(dest, profile=name, changed=changed, data=splits)
    if args.diagnostics:                 # where they go was decided like a run's (ad hoc with other settings)
        return _diagnostics(study, cfg, args, tag)

    beside = None
    if args.beside:
        if not hasattr(study, "rows_beside"):
            ap.error(f"the {args.study} study has no budget comparison (--beside is the classification study's)")
        try:
            beside = (Path(args.beside).stem, study.rows_beside(cfg, config_class(args.study).build(args.beside)))
        except ValueError as exc:
            ap.error(str(exc))

    def report(rows):
        extra = {"beside": beside} if beside is not None else {}
        for path in study.write_report(cfg, rows, doc=args.doc, **_marker(args), **extra):
            print(f"{tag} wrote {path}", flush=True)

    if args.baselines_only:
        if not hasattr(study, "run_baselines"):
            ap.error(f"the {args.study} study has no baselines (--baselines-only is the dmfa study's)")
        study.run_baselines(cfg, progress=not args.no_progress)
        report(study.read_rows(cfg, cells))
        return 0
    if args.merge_from:
        if not hasattr(study, "result_store"):
            ap.error(f"the {args.study} study keeps no result table to merge into (--merge-from)")
        try:
            merged = merge_results(study.result_store(study.results_path(cfg)), study.result_store(args.merge_from),
                                   keys={c.key for c in cells})
        except (ValueError, ResultFileError) as exc:
            print(f"{tag} {exc}", flush=True)
            return 1
        print(f"{tag} merged from {args.merge_from}: {merged.summary()}", flush=True)
    if args.table_only or args.merge_from:
        rows = study.read_rows(cfg, cells)
        report(rows)
        print(f"{tag} tables of {len(rows)} of {len(cells)} planned cells written", flush=True)
        return 0

    try:
        executor = make_executor(args.executor, address=args.address, gpus_per_cell=args.gpus_per_cell,
                                 threads=args.threads or 1)
    except ExecutorError as exc:
        print(f"{tag} {exc}", flush=True)
        return 2
    start, failed = time.time(), None
    try:
        rows = study.run(cfg, progress=not args.no_progress, executor=executor, wait=args.wait,
                         poll_seconds=args.poll_seconds, max_cells=args.max_cells, on_record=report)
    except SweepFailed as exc:
        failed, rows = exc, study.read_rows(cfg, cells)
    finally:
        executor.close()
    report(rows)
    print(f"{tag} stopped after {time.time() - start:.0f} s; {len(rows)} of {len(cells)} planned cells recorded "
          f"in {study.results_path(cfg)}", flush=True)
    if failed is not None:
        print(f"{tag} {failed}", flush=True)
        return 1
    return 0


def _diagnostics(study, cfg, args, tag: str) -> int:
    """``--diagnostics``: the study's own diagnostics (its ``diagnostics`` function) instead of its cells."""
    try:
        written = study.diagnostics(cfg, doc=args.doc, table_only=args.table_only, progress=not args.no_progress)
    except TableFileError as exc:        # a recorded table is damaged: nothing was computed or written
        print(f"{tag} {exc}", flush=True)
        return 1
    for path in written:
        print(f"{tag} wrote {path}", flush=True)
    return 0


def _marker(args) -> dict:
    """``marker=`` / ``stem=`` for the study's ``write_report`` when given (else its own defaults)."""
    return {**({"marker": args.marker} if args.marker else {}),
            **({"stem": args.report_stem} if args.report_stem else {})}


def _plan(study, folder: str, name: str, profile_cfg, cfg, args):
    """Say what the run will do (data, destination, cells) and point the config at its results folder."""
    datasets = getattr(cfg, "datasets", None) or [cfg.dataset]
    counts = {"n_train": cfg.n_train, "n_test": cfg.n_test}
    splits = runplan.inspect_and_report(counts, datasets)
    if (counts["n_train"], counts["n_test"]) != (cfg.n_train, cfg.n_test):   # fewer images exist: record the real count
        cfg = cfg.replace(**counts)
    changed = runplan.changed_settings(profile_cfg.as_dict(), cfg.as_dict(), grid=cfg.grid_fields())
    committed = paths.results_dir(folder, name)
    cells = study.plan(cfg)
    match = runplan.match_cells(cells, study.result_store(committed))
    dest = runplan.sweep_destination(folder, name, committed, splits=splits,
                                     writes=("--doc", args.doc, ""), changed=changed,
                                     profile_params=profile_cfg.as_dict(), match=match,
                                     explicit=args.results or cfg.results_dir, into_committed=args.into_committed)
    cfg = cfg.replace(results_dir=str(dest.path))
    sweep = runplan.plan_sweep(folder, cells, study.result_store(dest.path),
                               cost_from=[study.result_store(committed)], group=study.COST_GROUP)
    print(f"[plan] {sweep.line()}", flush=True)
    return cfg, dest, cells, changed, splits


if __name__ == "__main__":
    sys.exit(main())
