r"""The density study's baselines and speed: the classical MFA, ACFlow, DMFA throughput.

- :func:`run_mfa_baseline`: a classical MFA (EM, one mixture for the whole data set) conditioned on
  each test image's observed pixels, scored on the DMFA's test holes;
- :func:`run_acflow_baseline`: a trained ACFlow scored on the same holes (:func:`score_holes`);
- :func:`measure_throughput`: a fresh DMFA's training and inference speed.

Both baselines take the study's config (:class:`~labkit.studies.configs.DensityConfig`: data set,
sizes, their own K, L, iterations, samples, where results go) and write their CSV, JSON summary
and figure as one set, which :func:`labkit.studies.density_report.density_table` reads.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from labkit import masks as _masks
from labkit import paths as _paths
from labkit.checks import check_int
from labkit.data import canonical_dataset
from labkit.device import resolve_device
from labkit.machine import machine_summary
from labkit.models.acflow import ACFlow
from labkit.models.acflow_training import bits_per_dim, load_acflow
from labkit.models.dmfa import DATASET_SHAPES, build_dmfa, evaluate_dmfa, test_masks
from labkit.models.dmfa_training import dmfa_loss
from labkit.studies.configs import DensityConfig
from labkit.studies.density_checkpoints import checkpoint_megabytes, jsonable, load_or_fit_mfa
from labkit.studies.density_experiment import (csv_digest, csv_text, figure_writer, hole_sides, load_split, own_files,
                                               result_stem, results_path, timed_evaluate)
from labkit.studies.density_figures import plot_acflow_inpainting, plot_inpainting
from labkit.studies.engine import file_digest, write_files

__all__ = ["acflow_checkpoint", "measure_throughput", "run_acflow_baseline", "run_mfa_baseline", "score_holes"]


def acflow_checkpoint(cfg: DensityConfig) -> Path | None:
    """The config's ACFlow checkpoint (``acflow`` with ``{dataset}`` filled in), None when it names none."""
    return _paths.repo_path(cfg.acflow.format(dataset=cfg.dataset)) if cfg.acflow else None


@torch.no_grad()
def score_holes(
    model: ACFlow,
    images: Tensor,
    missing: Tensor,
    *,
    n_samples: int = 4,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> "Any":
    """Per-image density scores of the hidden pixels, on the DMFA study's protocol (notebook 01).

    Args:
        images: (N, C, H, W) in [0, 1]; missing: bool (N, 1 or C, H, W), the hidden pixels.
        n_samples: samples averaged for the imputation whose SSE is reported (as in the
            classification front); seed: seeds the dequantisation noise and the samples.
    Returns:
        a DataFrame, one row per image: ``nll`` = −log p(x_m | x_o) in nats at the *exact* pixel
        values (the protocol the DMFA and classical MFA are scored with), ``nll_dequantized`` =
        −log p(y_m | x_o) at dequantised values y = (255·x + u)/256 (what the flow was trained
        on; the honest one for a flow, see the module docstring), ``sse`` = squared error of the
        ``n_samples``-sample mean over the hidden pixels, ``n_missing``.

    Why two NLLs: a continuous density evaluated at exact 8-bit values can be made arbitrarily
    large (MNIST is mostly exact zeros), so neither the DMFA's nor the flow's point density is a
    likelihood of the data; the dequantised one is bounded (≤ log 256 ≈ 5.5 nats per pixel) and
    comparable across papers.
    """
    if not isinstance(images, Tensor) or not isinstance(missing, Tensor):
        raise TypeError("images and missing must be torch.Tensors")
    if images.shape[0] != missing.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and missing {tuple(missing.shape)} differ in N")
    check_int(n_samples, "n_samples", 1)
    check_int(batch_size, "batch_size", 1)
    dev = model._param().device
    was_training = model.training
    model.eval()
    g_deq = torch.Generator().manual_seed(seed)
    g_smp = torch.Generator().manual_seed(seed + 1)
    cols: dict[str, list[Tensor]] = {"nll": [], "nll_dequantized": [], "sse": [], "n_missing": []}
    starts = range(0, images.shape[0], batch_size)
    if progress:
        starts = tqdm(starts, desc="ACFlow scores", unit="batch")
    for i in starts:
        xb = images[i:i + batch_size].to(dev)
        mb = missing[i:i + batch_size].to(dev).expand_as(xb)
        cols["nll"].append(-model.log_prob(xb, mb, dequantize=False).cpu())
        cols["nll_dequantized"].append(-model.log_prob(xb, mb, dequantize=True, generator=g_deq).cpu())
        filled = model.impute(xb, mb, n_samples=n_samples, generator=g_smp)
        err = torch.where(mb, filled - xb, torch.zeros((), dtype=xb.dtype, device=dev))
        cols["sse"].append((err * err).sum(dim=(1, 2, 3)).cpu())
        cols["n_missing"].append(mb.sum(dim=(1, 2, 3)).cpu())
    model.train(was_training)
    return pd.DataFrame({k: torch.cat(v).double().numpy() if k != "n_missing" else torch.cat(v).numpy()
                         for k, v in cols.items()})


def run_mfa_baseline(cfg: DensityConfig, *, holes: Sequence[int | None] | None = None, seed: int | None = None,
                     batch_size: int = 64, device=None, progress: bool = True) -> list[dict]:
    """Fit (or load) the config's classical MFA (``mfa_components``, ``mfa_factors``,
    ``mfa_iterations``) on its first ``n_train`` training images and score it with the same test
    holes as :func:`~labkit.studies.density_experiment.run_experiment` (one CSV/JSON/PNG set per
    hole side, written as one set with :func:`labkit.studies.engine.write_files`, the JSON recording
    the CSV's digest). ``holes``: default the config's; ``seed``: default its first.

    Files (in :func:`~labkit.studies.density_experiment.results_path`): ``<dataset>_mfa_K<K>_L<L>.pt``
    (``-<digest8>`` added for a model of other settings, as in :func:`load_or_fit_mfa`) and, per hole,
    ``<that stem>[_h<hole>].{csv,json,png}``; the run holds the claim on ``<dataset>_mfa_K<K>_L<L>``
    throughout (:func:`~labkit.studies.density_experiment.own_files`).
    """
    key = canonical_dataset(cfg.dataset)
    C, H, W = DATASET_SHAPES[key]
    sides = hole_sides(cfg.holes if holes is None else holes, H)
    out = results_path(cfg)
    out.mkdir(parents=True, exist_ok=True)
    name = f"mfa_K{cfg.mfa_components}_L{cfg.mfa_factors}"
    with own_files(out, f"{key}_{name}"):
        return _run_mfa_baseline(cfg, key, name, holes=sides, out=out, seed=cfg.seeds[0] if seed is None else seed,
                                 batch_size=batch_size, device=cfg.device if device is None else device,
                                 progress=progress)


def _run_mfa_baseline(cfg: DensityConfig, key: str, name: str, *, holes: list[int], out: Path, seed: int,
                      batch_size: int, device, progress: bool) -> list[dict]:
    """:func:`run_mfa_baseline` once its files are claimed."""
    C, H, W = DATASET_SHAPES[key]
    K, L, n_figure = cfg.mfa_components, cfg.mfa_factors, cfg.n_figure
    train_set = load_split(key, "train", cfg.n_train)
    test_set = load_split(key, "test", cfg.n_test)
    imputer, meta = load_or_fit_mfa(out / f"{key}_{name}.pt", train_set.images, n_components=K, n_factors=L,
                                    iterations=cfg.mfa_iterations, seed=seed, device=device, progress=progress,
                                    meta={"data_source": train_set.source, "profile": cfg.profile})
    model_path = Path(meta.pop("checkpoint_path"))
    tag = model_path.stem[len(f"{key}_{name}"):]           # "" or "-<digest8>"
    results = []
    for hole in holes:
        stem = result_stem(key, name, hole, seed=seed) + tag
        test_missing = test_masks(len(test_set), H, W, side=hole, seed=seed, device=test_set.images.device)
        df, seconds = timed_evaluate(imputer, test_set.images, test_missing, batch_size=batch_size, device=device)
        text = csv_text(df)
        fig = plot_inpainting(imputer, test_set.images[:n_figure], test_missing[:n_figure], seed=seed, device=device,
                              title=f"classical MFA (K={K}, L={L}) on {key}, {hole}x{hole} holes")
        setting = jsonable({
            "model_kind": "mfa", "dataset": key, "mode": "complete", "hole": hole, "profile": cfg.profile,
            "n_test": len(test_set), "test_source": test_set.source, **meta,
            "test_nll": float(df["nll"].mean()), "test_sse": float(df["sse"].mean()),
            "infer_images_per_s": len(test_set) / seconds, "infer_machine": machine_summary(),
            "infer_threads": torch.get_num_threads(),
            "checkpoint_mb": checkpoint_megabytes(model_path), "csv_digest": csv_digest(text),
        })
        results.append(_write_result_set(out, stem, text, setting, fig))
    return results


def _write_result_set(out: Path, stem: str, csv_text: str, setting: dict, fig) -> dict:
    """The per-image CSV, the JSON summary and the figure of one baseline run, written as one set
    (:func:`labkit.studies.engine.write_files`); returns ``setting`` with their ``paths``."""
    import matplotlib.pyplot as plt

    try:
        write_files({out / f"{stem}.csv": csv_text, out / f"{stem}.json": json.dumps(setting, indent=1),
                     out / f"{stem}.png": figure_writer(fig)})
    finally:
        plt.close(fig)
    setting["paths"] = {"csv": str(out / f"{stem}.csv"), "setting": str(out / f"{stem}.json"),
                        "figure": str(out / f"{stem}.png")}
    return setting


def run_acflow_baseline(cfg: DensityConfig, *, checkpoint: str | os.PathLike | None = None,
                        holes: Sequence[int | None] | None = None, seed: int | None = None, batch_size: int = 250,
                        device=None, progress: bool = True) -> list[dict]:
    """Score a trained ACFlow (``./lab study acflow``; default the config's ``acflow`` with its
    data set filled in) with the same test holes as
    :func:`~labkit.studies.density_experiment.run_experiment`, so it joins :func:`density_table`.
    ``holes``: default the config's; ``seed``: default its first; ``acflow_samples`` samples.

    Per hole side writes ``<dataset>_acflow[_h<hole>].{csv,json,png}`` as one set
    (:func:`labkit.studies.engine.write_files`; a checkpoint named ``<stem>-<digest8>.pt`` adds
    ``-<digest8>``): per image the NLL of the hidden pixels at exact values (the DMFA protocol) and
    at dequantised values, and the SSE of the mean of the samples (:func:`score_holes`); the JSON
    records the checkpoint's content hash and the CSV's digest. The checkpoint is an input: a
    missing one raises ``FileNotFoundError`` naming the command that trains it, an unreadable one a
    :class:`labkit.checkpoint.CheckpointError` saying it is an input.
    """
    key = canonical_dataset(cfg.dataset)
    C, H, W = DATASET_SHAPES[key]
    holes = hole_sides(cfg.holes if holes is None else holes, H)
    seed = cfg.seeds[0] if seed is None else seed
    n_samples, n_figure = cfg.acflow_samples, cfg.n_figure
    device = cfg.device if device is None else device
    if checkpoint is None:
        if not cfg.acflow:
            raise ValueError("the config names no ACFlow checkpoint (acflow is empty)")
        checkpoint = acflow_checkpoint(cfg)
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"no ACFlow checkpoint at {str(checkpoint)!r} (an input of this step); train one "
                                f"with ./lab study acflow --profile cpu -p checkpoint={checkpoint}")
    model, meta = load_acflow(checkpoint, device=device, input_role="ACFlow checkpoint")
    flow_cfg, train = meta.get("config", {}), meta.get("setting", {})
    tag = "-" + checkpoint.stem.rsplit("-", 1)[1] if "-" in checkpoint.stem else ""
    out = results_path(cfg)
    out.mkdir(parents=True, exist_ok=True)
    test_set = load_split(key, "test", cfg.n_test)
    results = []
    for hole in holes:
        stem = result_stem(key, "acflow", hole, seed=seed) + tag
        test_missing = test_masks(len(test_set), H, W, side=hole, seed=seed, device="cpu")
        started = time.perf_counter()
        df = score_holes(model, test_set.images, test_missing, n_samples=n_samples, batch_size=batch_size,
                         seed=seed, progress=progress)
        seconds = time.perf_counter() - started
        text = csv_text(df)
        fig = plot_acflow_inpainting(model, test_set.images[:n_figure], test_missing[:n_figure], seed=seed,
                                     title=f"ACFlow on {key}, {hole}x{hole} holes")
        per_pixel = float(df["nll_dequantized"].sum() / df["n_missing"].sum())
        setting = jsonable({
            "model_kind": "acflow", "dataset": key, "mode": "complete", "hole": hole, "profile": cfg.profile,
            "checkpoint": str(checkpoint), "checkpoint_sha": file_digest(checkpoint), "model": flow_cfg.get("model"),
            "n_train": train.get("n_train", flow_cfg.get("n_images")),
            "epochs": meta.get("epochs", len(meta.get("history", []))),
            "train_masks": train.get("mask_kinds", flow_cfg.get("mask_fn")), "train_data_source": train.get("train_source"),
            "train_seed": meta.get("seed"), "n_parameters": meta.get("n_params"), "n_samples": n_samples, "seed": seed,
            "n_test": len(test_set), "test_source": test_set.source,
            "test_nll": float(df["nll"].mean()), "test_nll_dequantized": float(df["nll_dequantized"].mean()),
            "test_bits_per_dim": float(bits_per_dim(per_pixel)), "test_sse": float(df["sse"].mean()),
            "infer_images_per_s": len(test_set) / seconds, "infer_machine": machine_summary(),
            "infer_threads": torch.get_num_threads(), "csv_digest": csv_digest(text),
        })
        results.append(_write_result_set(out, stem, text, setting, fig))
    return results


def measure_throughput(dataset: str = "mnist", *, threads: Sequence[int] = (1, 2), train_batches: int = 20,
                       batch_size: int = 48, infer_images: int = 2000, infer_batch_size: int = 256,
                       device=None, seed: int = 0) -> list[dict]:
    """Training and inference speed of a fresh DMFA (images/s) for each intra-op thread count.

    Training: ``train_batches`` optimisation steps (forward, NLL, backward, fused Adam) on random
    images with a fresh hidden square per batch, after two warm-up steps. Inference: the MFAs and
    scores of ``infer_images`` images (:func:`evaluate_dmfa`). Timings are wall clock: on a machine
    shared with other jobs they measure what this machine delivered at that moment.
    """
    key = canonical_dataset(dataset)
    C, H, W = DATASET_SHAPES[key]
    device = resolve_device(device)
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((max(infer_images, batch_size), C, H, W), generator=g)
    holes = test_masks(len(images), H, W, seed=seed, device=images.device)
    out = []
    try:
        for n_threads in threads:
            torch.set_num_threads(int(n_threads))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build_dmfa(key).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda") or None)
            x = images[:batch_size].to(device)

            def step():
                hidden = _masks.square(batch_size, H, W, generator=g, device=device)
                loss, _ = dmfa_loss(model(x, hidden), x, hidden)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(2):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(train_batches):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_rate = train_batches * batch_size / (time.perf_counter() - started)
            evaluate_dmfa(model, images[:infer_batch_size], holes[:infer_batch_size], device=device)  # warm-up
            _, seconds = timed_evaluate(model, images[:infer_images], holes[:infer_images],
                                         batch_size=infer_batch_size, device=device)
            out.append({"dataset": key, "threads": int(n_threads), "device": str(device),
                        "train_images_per_s": train_rate, "infer_images_per_s": infer_images / seconds,
                        "train_batch_size": batch_size, "infer_batch_size": infer_batch_size})
    finally:
        torch.set_num_threads(before)
    return out


