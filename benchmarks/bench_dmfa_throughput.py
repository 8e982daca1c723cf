"""Benchmark: training and inference speed of a fresh DMFA (images/s) per intra-op thread count.

:func:`labkit.studies.density.measure_throughput`: ``--train-batches`` optimisation steps on
random images of the data set's shape (a fresh hidden square per batch, after two warm-up steps),
then the MFAs and scores of ``--infer-images`` images, once per ``--threads`` value. Wall-clock
timings: on a machine shared with other jobs they say what it delivered at that moment.

    .venv/bin/python benchmarks/bench_dmfa_throughput.py                     # MNIST, 1 and 2 threads
    .venv/bin/python benchmarks/bench_dmfa_throughput.py --dataset cifar10 --threads 1 2 4 --device cuda
    .venv/bin/python benchmarks/bench_dmfa_throughput.py --out results/dmfa/cpu/throughput.json

``--out FILE`` also writes the figures with a summary of the machine (the committed
``results/dmfa/cpu/throughput.json`` is such a file, measured with the cpu profile's batch size 48).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from labkit.models.dmfa import DATASET_SHAPES
from labkit.machine import machine_summary
from labkit.studies import density
from labkit.studies.store import write_text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist", choices=sorted(DATASET_SHAPES),
                    help="whose image shape and DMFA (default mnist)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (default 1 2)")
    ap.add_argument("--batch-size", type=int, default=48, help="training batch size (default 48, the cpu profile's)")
    ap.add_argument("--train-batches", type=int, default=20, help="timed training steps (default 20)")
    ap.add_argument("--infer-images", type=int, default=2000, help="images scored for the inference speed")
    ap.add_argument("--infer-batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", metavar="FILE", help="also write the figures and the machine's summary as JSON")
    args = ap.parse_args(argv)
    for name in ("threads", "batch_size", "train_batches", "infer_images", "infer_batch_size"):
        values = getattr(args, name)
        if any(v < 1 for v in (values if isinstance(values, list) else [values])):
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    rows = density.measure_throughput(args.dataset, threads=args.threads, train_batches=args.train_batches,
                                      batch_size=args.batch_size, infer_images=args.infer_images,
                                      infer_batch_size=args.infer_batch_size, device=args.device, seed=args.seed)
    for r in rows:
        print(f"{r['dataset']} on {r['device']}, {r['threads']} thread(s): training {r['train_images_per_s']:.0f} "
              f"images/s (batch {r['train_batch_size']}), inference {r['infer_images_per_s']:.0f} images/s "
              f"(batch {r['infer_batch_size']})", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps({"machine": machine_summary(), "rows": rows}, indent=1))
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
