"""The ACFlow study: train the ACFlow imputer (:mod:`labkit.models.acflow`) the density and
classification studies score, resumably, and reuse a trained one only when it has the same settings.

The study of an :class:`~labkit.studies.configs.ACFlowConfig` (no notebook; from the shell
``./lab study acflow --profile cpu``, the committed ``results/acflow/acflow_mnist.pt``):

- :func:`run`           train the config's model, or find it trained; returns its ``meta``;
- :func:`read_results`  the ``meta`` of the config's trained model (``--table-only``);
- :func:`write_report`  its training history beside it (and a marked block of a doc).

The settings (data set, sizes, the training images' content hash, mask kinds, model size, epochs,
batch size, lr, seed, precision) are the checkpoint's ``meta["train_config"]``. If the config's
file (:func:`checkpoint_path`) holds a model trained with them, it is kept and nothing is trained.
If it holds a model trained with other settings, it is neither reused nor overwritten: the model of
these settings goes to ``<stem>-<digest8>.pt`` beside it (a digest of the settings, git-ignored
under ``results/acflow/``), and the run says so in one line
(:func:`labkit.studies.density_checkpoints.config_checkpoint`). Files written before the precision
was recorded count as float32 trained on today's data; their mask kind ``trapezoid`` was the
inside-the-image trapezoid (now ``trapezoid_inside``).

Progress lives in ``<stem>.<digest8>.partial.pt`` (a :func:`labkit.training.fit` checkpoint written
after every epoch, named after the settings other than the epochs): rerunning the same command
resumes an interrupted run, and a run with more ``epochs`` continues from the progress of the same
settings when it is still there. The trained model is written as ``{"model": state_dict, "meta":
{...}}`` (:func:`labkit.models.acflow_training.load_acflow` reads it); ``meta`` records the settings,
the per-epoch history, the throughput and the machine.

Validation: the first ``n_val`` *test* images with fixed mixed masks (seeded), NLL per missing pixel
and bits/dim after every epoch (monitored only: nothing is selected on it).
"""
from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

import torch

from labkit.checkpoint import atomic_save
from labkit.config import parse_override
from labkit.data import load_dataset
from labkit.device import resolve_device
from labkit.machine import machine_summary
from labkit.models.acflow import ACFlow
from labkit.models.acflow_training import load_acflow, study_mask_fn, train_acflow
from labkit.precision import resolve_precision
from labkit.studies.configs import ACFlowConfig
from labkit.studies.density_checkpoints import config_checkpoint
from labkit.studies.engine_keys import digest, tensor_digest
from labkit.studies.reporting import replace_marked_block
from labkit.studies.store import write_text

__all__ = ["DEFAULT_MARKER", "RENAMED_MASKS", "checkpoint_path", "command_line", "history_table", "read_results",
           "results_path", "run", "stored_settings", "write_report"]

#: mask kinds renamed since old checkpoints recorded them
RENAMED_MASKS = {"trapezoid": "trapezoid_inside"}
#: the marked block of a doc :func:`write_report` fills by default
DEFAULT_MARKER = "acflow-training"


def stored_settings(meta: dict) -> dict:
    """The training settings a stored ACFlow checkpoint's ``meta`` records, in today's words
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


def results_path(cfg: ACFlowConfig) -> Path:
    """The folder of the checkpoint and its report: ``cfg.results_dir``, else the folder of
    ``cfg.checkpoint`` (``results/acflow``)."""
    return Path(cfg.results_dir) if cfg.results_dir else checkpoint_path(cfg.replace(results_dir=None)).parent


def checkpoint_path(cfg: ACFlowConfig) -> Path:
    """The file the config's model is looked for in (``cfg.checkpoint`` with ``{dataset}`` filled in;
    with ``cfg.results_dir``, that file's name in that folder). A file of other settings there sends
    this config's model to ``<stem>-<digest8>.pt`` (:func:`run`)."""
    path = Path(cfg.checkpoint.format(dataset=cfg.dataset))
    return Path(cfg.results_dir) / path.name if cfg.results_dir else path


def command_line(cfg: ACFlowConfig) -> str:
    """The shell command that trains ``cfg``'s model: ``./lab study acflow`` with a ``-p`` for every
    setting that differs from the defaults (the profile's name aside: the values say it all)."""
    words = ["./lab", "study", "acflow"]
    for key, value in cfg.changed().items():
        if key != "profile":
            words += ["-p", shlex.quote(f"{key}={_yaml_text(value)}")]
    return " ".join(words)


def _yaml_text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_yaml_text(v) for v in value) + "]"
    if value is None:
        return "None"
    text = str(value)
    if isinstance(value, str) and parse_override(f"x={text}")[2] != value:
        text = repr(value)              # '32' must stay a string
    return text


def _prepare(cfg: ACFlowConfig) -> dict[str, Any]:
    """The data, masks and settings of ``cfg``, and the file its model belongs in."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    train = load_dataset(cfg.dataset, "train", limit=cfg.n_train, quiet=True)
    images = train.images
    c, h, w = images.shape[1:]
    mask_fn = study_mask_fn(h, w, tuple(cfg.masks))
    val_images = val_missing = val_source = None
    if cfg.n_val > 0:
        test = load_dataset(cfg.dataset, "test", limit=cfg.n_val, quiet=True)
        val_images, val_source = test.images, test.source
        # fixed validation masks: the same for every epoch and every resumed run
        val_missing = mask_fn(len(test), torch.Generator().manual_seed(10_000 + cfg.seed))
    model_kwargs = dict(hidden=cfg.hidden, n_blocks=cfg.n_blocks, n_scales=cfg.n_scales, n_couplings=cfg.n_couplings)
    n_val = 0 if val_images is None else len(val_images)
    setting = {"dataset": cfg.dataset, "train_source": train.source, "n_train": len(train), "n_val": n_val,
               "val_source": val_source, "mask_kinds": list(cfg.masks)}
    train_config = json.loads(json.dumps({
        "dataset": cfg.dataset, "n_train": len(train), "n_val": n_val, "train_source": train.source,
        "mask_kinds": list(cfg.masks), "model": ACFlow(c, h, w, **model_kwargs).config, "batch_size": cfg.batch_size,
        "lr": cfg.lr, "max_batches": cfg.max_batches, "epochs": cfg.epochs, "seed": cfg.seed,
        "precision": precision, "train_data_sha": tensor_digest(images)}))
    requested = checkpoint_path(cfg)
    out, _ = config_checkpoint(requested, train_config, view=stored_settings,
                               legacy={"precision": "32", "train_data_sha": train_config["train_data_sha"]})
    return dict(device=device, precision=precision, train=train, images=images, mask_fn=mask_fn,
                val_images=val_images, val_missing=val_missing, model_kwargs=model_kwargs, setting=setting,
                train_config=train_config, requested=requested, out=out)


def run(cfg: ACFlowConfig, *, progress: bool = True) -> dict:
    """Train ``cfg``'s ACFlow, or find it trained; returns the checkpoint's ``meta`` (with
    ``checkpoint_path``, the file, and ``trained``: whether this call trained it).

    The data are the first ``n_train`` training images (fewer when the split has fewer, said in a
    note) of ``cfg.dataset``, (N, C, H, W) in [0, 1]; the checkpoint's file: see the module's doc.
    ``cfg.threads`` (0: left as they are) sets torch's intra-op threads before anything runs.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    p = _prepare(cfg)
    out, train, images = p["out"], p["train"], p["images"]
    if len(train) < cfg.n_train:
        print(f"note: only {len(train)} training images available ({train.source})", flush=True)
    if out.exists():
        _, meta = load_acflow(out, device="cpu", input_role="trained ACFlow")
        print(f"{out} was trained with these settings ({meta.get('epochs')} epochs, {meta.get('trained_at', '?')}): "
              "kept, nothing to train (delete it to retrain)", flush=True)
        return {**meta, "checkpoint_path": str(out), "trained": False}
    # the data enter by content (train_data_sha), never by the path in train_source: the same images
    # reached through another clone or a symlink continue the same progress
    resume_key = {k: v for k, v in p["train_config"].items() if k not in ("epochs", "train_source")}
    # named after the settings but the epochs, so that a run with more epochs continues this one's progress
    partial = out.with_name(f"{p['requested'].stem}.{digest(resume_key, 8)}.partial{out.suffix or '.pt'}")
    device = p["device"]
    print(f"ACFlow on {cfg.dataset}: {len(train)} train images {tuple(images.shape[1:])}, "
          f"{p['setting']['n_val']} val, device {device}, {torch.get_num_threads()} threads; progress in {partial}",
          flush=True)
    started = time.perf_counter()
    model, history = train_acflow(
        images, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, mask_fn=p["mask_fn"], seed=cfg.seed,
        checkpoint=partial, device=device, progress=progress, model_kwargs=p["model_kwargs"],
        val_images=p["val_images"], val_missing=p["val_missing"], max_batches=cfg.max_batches,
        config={"setting": p["setting"]}, precision=p["precision"])
    wall = time.perf_counter() - started
    if progress:
        print("\n".join(_epoch_line(e) for e in history), flush=True)
    seconds = [e["seconds"] for e in history]
    n_params = sum(q.numel() for q in model.parameters())
    meta = {
        "config": {"model": model.config, "batch_size": cfg.batch_size, "lr": cfg.lr, "max_batches": cfg.max_batches,
                   "precision": p["precision"]},
        "setting": p["setting"],
        "train_config": p["train_config"],
        "epochs": len(history),
        "seed": cfg.seed,
        "n_params": n_params,
        "history": history,
        "seconds_per_epoch": sum(seconds) / len(seconds) if seconds else None,
        "train_seconds_total": sum(seconds),
        "machine": machine_summary(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "trained_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "resume_command": command_line(cfg),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = json.loads(json.dumps(meta))
    atomic_save({"model": state, "meta": meta}, out)
    load_acflow(out, device="cpu", input_role="ACFlow checkpoint just written")  # it must load back
    print(f"wrote {out} ({n_params} parameters, {len(history)} epochs, {meta['seconds_per_epoch'] or 0:.1f} s/epoch "
          f"on {meta['machine']}; this call {wall:.0f} s)", flush=True)
    return {**meta, "checkpoint_path": str(out), "trained": True}


def read_results(cfg: ACFlowConfig) -> dict:
    """The ``meta`` of ``cfg``'s trained model (with ``checkpoint_path`` and ``trained`` False), found
    like :func:`run` finds it, without training; ``FileNotFoundError`` when it was not trained yet."""
    out = _prepare(cfg)["out"]
    if not out.exists():
        raise FileNotFoundError(f"no ACFlow trained with these settings at {out}; train it with {command_line(cfg)}")
    _, meta = load_acflow(out, device="cpu", input_role="trained ACFlow")
    return {**meta, "checkpoint_path": str(out), "trained": False}


def _epoch_line(e: dict) -> str:
    val = (f", val {e['val_nll_per_missing_pixel']:.4f} nats ({e['val_bits_per_dim']:.3f} bits/dim)"
           if "val_nll_per_missing_pixel" in e else "")
    return (f"epoch {e['epoch'] + 1}: train {e.get('nll_per_missing_pixel', float('nan')):.4f} nats/missing px "
            f"({e.get('bits_per_dim', float('nan')):.3f} bits/dim){val}; {e['seconds']:.1f} s, "
            f"{e['images_per_second']:.1f} img/s, skipped {e.get('skipped', 0) * e['batches']:.0f} steps")


def history_table(meta: dict) -> str:
    """The training of a checkpoint's ``meta`` as Markdown: one line of settings and machine, then
    one row per epoch (train and validation NLL per missing pixel in nats, bits/dim, seconds, img/s)."""
    s = stored_settings(meta)
    model = s.get("model") or {}
    head = (f"{s.get('dataset')}: {s.get('n_train')} training images, masks {', '.join(s.get('mask_kinds') or [])}; "
            f"{s.get('n_val')} validation images; batch {s.get('batch_size')}, Adam {s.get('lr')}, seed "
            f"{s.get('seed')}, precision {s.get('precision', '32')}; hidden {model.get('hidden')}, n_blocks "
            f"{model.get('n_blocks')}, n_scales {model.get('n_scales')}, n_couplings {model.get('n_couplings')} "
            f"({meta.get('n_params', '?')} parameters); {meta.get('machine', '?')}, {meta.get('threads', '?')} "
            f"thread(s), trained {meta.get('trained_at', '?')}")
    rows = [head, "", "| epoch | train NLL (nats/px) | train bits/dim | val NLL (nats/px) | val bits/dim | s | img/s |",
            "|---|---|---|---|---|---|---|"]

    def num(e: dict, key: str, fmt: str) -> str:
        return format(e[key], fmt) if e.get(key) is not None else "–"

    for e in meta.get("history") or []:
        rows.append(f"| {e['epoch'] + 1} | {num(e, 'nll_per_missing_pixel', '.4f')} | {num(e, 'bits_per_dim', '.3f')} "
                    f"| {num(e, 'val_nll_per_missing_pixel', '.4f')} | {num(e, 'val_bits_per_dim', '.3f')} "
                    f"| {num(e, 'seconds', '.0f')} | {num(e, 'images_per_second', '.1f')} |")
    return "\n".join(rows) + "\n"


def write_report(cfg: ACFlowConfig, results: dict, *, doc: str | os.PathLike | None = None,
                 marker: str | None = None) -> list[Path]:
    """The training history of :func:`run`'s (or :func:`read_results`'s) ``meta`` beside its
    checkpoint, ``<checkpoint stem>.md`` (:func:`history_table`); with ``doc`` (a Markdown file)
    also the block ``marker`` (default :data:`DEFAULT_MARKER`) in it (``ValueError`` when the doc
    lacks the block's markers). Returns the files written."""
    checkpoint = Path(results["checkpoint_path"])
    table = history_table(results)
    written = [write_text(checkpoint.with_suffix(".md"), f"# ACFlow: {checkpoint.name}\n\n{table}")]
    if doc is not None and replace_marked_block(doc, marker or DEFAULT_MARKER, table):
        written.append(Path(doc))
    return written
