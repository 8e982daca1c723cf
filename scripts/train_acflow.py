#!/usr/bin/env python
"""Train the ACFlow imputer (labkit.models.acflow) on MNIST, resumably; reuse it only if trained with these settings.

    .venv/bin/python scripts/train_acflow.py --n-train 10000 --epochs 10 --out results/acflow/acflow_mnist.pt

The settings (data set, sizes, the training images' content hash, mask kinds, model size, epochs,
batch size, lr, seed, precision) are the checkpoint's config. If ``--out`` holds a model trained
with them, it is kept and nothing is trained. If it holds a model trained with other settings, it
is neither reused nor overwritten: the model of these settings goes to ``<out stem>-<digest8>.pt``
(a digest of the settings), and the run says so in one line. Checkpoints written before the
precision was recorded count as float32 trained on today's data; their mask kind "trapezoid" was
the inside-the-image trapezoid (now ``trapezoid_inside``).

Progress lives in ``<--out stem>.<digest8>.partial.pt`` (a labkit.training.fit checkpoint written after
every epoch, named after the settings other than the epochs): rerunning the same command resumes
an interrupted run, and a run with a larger ``--epochs`` continues from the progress of the same
settings when it is still there. When the run reaches ``--epochs`` the trained model is written
as ``{"model": state_dict, "meta": {...}}`` (load it with ``labkit.models.acflow_training.load_acflow``);
``meta`` records the setting (``meta["train_config"]``), per-epoch history, throughput and the machine.

Validation: the first ``--n-val`` MNIST *test* images with fixed mixed masks (square / trapezoid /
noise, seeded), NLL per missing pixel and bits/dim after every epoch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from labkit.checkpoint import atomic_save
from labkit.data import load_dataset
from labkit.device import resolve_device
from labkit.machine import machine_summary
from labkit.models.acflow import ACFlow
from labkit.models.acflow_training import load_acflow, study_mask_fn, train_acflow
from labkit.precision import PRECISIONS, resolve_precision
from labkit.studies.density import config_checkpoint
from labkit.studies.engine import digest, tensor_digest

#: mask kinds renamed since old checkpoints recorded them
RENAMED_MASKS = {"trapezoid": "trapezoid_inside"}


def stored_settings(meta: dict) -> dict:
    """The training settings a stored ACFlow checkpoint's ``meta`` records, in this script's words
    (``meta["train_config"]``; files written before it existed: rebuilt from ``config``/``setting``)."""
    if "train_config" in meta:
        return dict(meta["train_config"])
    cfg, setting = dict(meta.get("config") or {}), dict(meta.get("setting") or {})
    kinds = setting.get("mask_kinds") or []
    if "precision" not in cfg:                  # before the half-plane trapezoid existed
        kinds = [RENAMED_MASKS.get(k, k) for k in kinds]
    out = {"dataset": setting.get("dataset"), "n_train": setting.get("n_train"), "n_val": setting.get("n_val"),
           "train_source": setting.get("train_source"), "mask_kinds": kinds, "model": cfg.get("model"),
           "batch_size": cfg.get("batch_size"), "lr": cfg.get("lr"), "max_batches": cfg.get("max_batches"),
           "epochs": meta.get("epochs"), "seed": meta.get("seed")}
    if "precision" in cfg:
        out["precision"] = cfg["precision"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="labkit.data name (default mnist)")
    p.add_argument("--n-train", type=int, default=10_000, help="first N training images (default 10000)")
    p.add_argument("--n-val", type=int, default=1_000, help="first N test images for validation NLL (0: none)")
    p.add_argument("--epochs", type=int, default=10, help="total epochs (a larger value extends a finished run)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=32, help="channels of the coupling nets")
    p.add_argument("--n-blocks", type=int, default=1, help="residual blocks per coupling net")
    p.add_argument("--n-scales", type=int, default=3)
    p.add_argument("--n-couplings", type=int, default=3)
    p.add_argument("--masks", default="square,trapezoid,noise", help="mask kinds mixed in training")
    p.add_argument("--max-batches", type=int, default=None, help="cap batches per epoch (smoke runs)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default="results/acflow/acflow_mnist.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--precision", default="32", choices=PRECISIONS,
                   help="training precision (labkit.precision; auto: bf16-mixed where the device has bf16)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    requested = Path(args.out)

    train = load_dataset(args.dataset, "train", limit=args.n_train, quiet=True)
    if len(train) < args.n_train:
        print(f"note: only {len(train)} training images available ({train.source})")
    images = train.images
    c, h, w = images.shape[1:]
    kinds = tuple(k.strip() for k in args.masks.split(",") if k.strip())
    mask_fn = study_mask_fn(h, w, kinds)

    val_images = val_missing = None
    val_source = None
    if args.n_val > 0:
        test = load_dataset(args.dataset, "test", limit=args.n_val, quiet=True)
        val_images, val_source = test.images, test.source
        # Fixed validation masks: same for every epoch and every resumed run.
        val_missing = mask_fn(len(test), torch.Generator().manual_seed(10_000 + args.seed))

    model_kwargs = dict(hidden=args.hidden, n_blocks=args.n_blocks, n_scales=args.n_scales,
                        n_couplings=args.n_couplings)
    setting = {
        "dataset": args.dataset,
        "train_source": train.source,
        "n_train": len(train),
        "n_val": 0 if val_images is None else len(val_images),
        "val_source": val_source,
        "mask_kinds": list(kinds),
    }
    train_config = json.loads(json.dumps({
        "dataset": args.dataset, "n_train": len(train), "n_val": setting["n_val"], "train_source": train.source,
        "mask_kinds": list(kinds), "model": ACFlow(c, h, w, **model_kwargs).config, "batch_size": args.batch_size,
        "lr": args.lr, "max_batches": args.max_batches, "epochs": args.epochs, "seed": args.seed,
        "precision": resolve_precision(args.precision, device), "train_data_sha": tensor_digest(images)}))
    out, _ = config_checkpoint(requested, train_config, view=stored_settings,
                               legacy={"precision": "32", "train_data_sha": train_config["train_data_sha"]})
    if out.exists():
        _, meta = load_acflow(out, device="cpu", input_role="trained ACFlow")
        print(f"{out} was trained with these settings ({meta.get('epochs')} epochs, {meta.get('trained_at', '?')}): "
              "kept, nothing to train (delete it to retrain)")
        return 0
    # the data enter by content (train_data_sha), never by the path in train_source: the same images
    # reached through another clone or a symlink continue the same progress
    resume_key = {k: v for k, v in train_config.items() if k not in ("epochs", "train_source")}
    # named after the settings but the epochs, so that a run with more epochs continues this one's progress
    partial = out.with_name(f"{requested.stem}.{digest(resume_key, 8)}.partial{out.suffix or '.pt'}")
    print(f"ACFlow on {args.dataset}: {len(train)} train images {tuple(images.shape[1:])}, "
          f"{setting['n_val']} val, device {device}, {torch.get_num_threads()} threads; progress in {partial}")
    started = time.perf_counter()
    model, history = train_acflow(
        images, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, mask_fn=mask_fn,
        seed=args.seed, checkpoint=partial, device=device, progress=not args.no_progress,
        model_kwargs=model_kwargs, val_images=val_images, val_missing=val_missing,
        max_batches=args.max_batches, config={"setting": setting}, precision=args.precision,
    )
    wall = time.perf_counter() - started
    n_params = sum(q.numel() for q in model.parameters())
    for e in history:
        val = f", val {e['val_nll_per_missing_pixel']:.4f} nats ({e['val_bits_per_dim']:.3f} bits/dim)" \
            if "val_nll_per_missing_pixel" in e else ""
        print(f"epoch {e['epoch'] + 1}: train {e.get('nll_per_missing_pixel', float('nan')):.4f} nats/missing px "
              f"({e.get('bits_per_dim', float('nan')):.3f} bits/dim){val}; {e['seconds']:.1f} s, "
              f"{e['images_per_second']:.1f} img/s, skipped {e.get('skipped', 0) * e['batches']:.0f} steps")

    seconds = [e["seconds"] for e in history]
    meta = {
        "config": {"model": model.config, "batch_size": args.batch_size, "lr": args.lr,
                   "max_batches": args.max_batches, "precision": resolve_precision(args.precision, device)},
        "setting": setting,
        "train_config": train_config,
        "epochs": len(history),
        "seed": args.seed,
        "n_params": n_params,
        "history": history,
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else None,
        "train_seconds_total": sum(seconds),
        "machine": machine_summary(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "trained_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "resume_command": " ".join([sys.executable, *sys.argv]),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"model": state, "meta": json.loads(json.dumps(meta))}, out)
    load_acflow(out, device="cpu", input_role="ACFlow checkpoint just written")  # it must load back
    print(f"wrote {out} ({n_params} parameters, {len(history)} epochs, "
          f"{meta['seconds_per_epoch'] or 0:.1f} s/epoch on {meta['machine']}; this call {wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
