"""Draw DMFA runs' inpainting figures (``<stem>.png``) again from their own model and setting.

After a change of the figure's code: each named run's ``<stem>.pt`` and ``<stem>.json`` in the
profile's density results (:func:`labkit.studies.density.results_path` of its
:class:`~labkit.studies.configs.DensityConfig`, or ``--results``) give the model, data set, hole
and seed; the figure is drawn on the same first ``n_figure`` test images (the profile's) and holes
the run scored (:func:`labkit.studies.density.redraw_figure`). The scores in its CSV/JSON stay as
recorded.

    .venv/bin/python scripts/redraw_dmfa_figures.py --profile cpu mnist_complete mnist_incomplete_h10
"""
from __future__ import annotations

import argparse
import sys

from labkit.studies import density
from labkit.studies.configs import DensityConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stems", nargs="+", metavar="STEM", help="runs' file stems, e.g. mnist_complete_h10")
    ap.add_argument("--profile", required=True, help="profile whose 01_dmfa section names the results")
    ap.add_argument("--results", metavar="DIR", help="the results folder instead (default: the profile's)")
    ap.add_argument("--device", default="cpu", help="where the models run (default cpu)")
    args = ap.parse_args(argv)
    try:
        cfg = DensityConfig.build(args.profile)
    except ValueError as exc:            # an unknown profile or a bad value in it: a usage error naming it
        ap.error(str(exc))
    if args.results:
        cfg = cfg.replace(results_dir=args.results)
    folder = density.results_path(cfg)
    failed = 0
    for stem in args.stems:
        try:
            print(f"[redraw] {density.redraw_figure(folder, stem, n_figure=cfg.n_figure, device=args.device)}",
                  flush=True)
        except (FileNotFoundError, ValueError) as exc:       # no such run, or not a DMFA's: say so, draw the others
            print(f"[redraw] {stem}: {exc}", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
