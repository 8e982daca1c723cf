r"""The density study (notebook 01, ``scripts/train_dmfa.py``): DMFA, classical MFA and ACFlow

Reproduces the density comparison of *Estimating Conditional Density of Missing Values Using Deep
Gaussian Mixture Model*, Przewięźlikowski, Śmieja, Struski, ICONIP 2020,
https://arxiv.org/abs/2010.02183, as MisConv's DMFAs are evaluated.

scored on the same test holes.

Protocol: a model sees each test image with one ``hole x hole`` square hidden
(:func:`labkit.models.dmfa.test_masks`, default side H/2, deterministic in the seed) and is scored
per image on the hidden pixels: negative log-likelihood (nats) and sum of squared errors of its
mean (for ACFlow: of the mean of a few samples, :func:`score_holes`).

- :func:`load_or_train_dmfa` / :func:`load_or_fit_mfa`: "load if trained with these settings,
  otherwise train" for a DMFA (:func:`labkit.models.dmfa_training.train_dmfa`, resumable) and a
  classical MFA (EM). The settings are the checkpoint's config: a file trained with other settings
  is never reused nor overwritten; the new model goes to ``<stem>-<digest8>.pt`` and the run says so
  in one line (:func:`config_checkpoint`).
  They live in :mod:`labkit.studies.density_checkpoints` and are re-exported here.
- :func:`run_experiment` (one DMFA), :func:`run_mfa_baseline`, :func:`run_acflow_baseline`: train or
  load, score on the test set and write the CSV, JSON summary and figures of a result as one set
  (:func:`labkit.studies.engine.write_files`); :func:`result_stem` names them, and the JSON records
  the digest of its CSV (:func:`csv_digest`). A run holds a claim on its file stem
  (:func:`own_files`) from start to end, so two processes never write the same checkpoint, partial
  checkpoint or result files: the second is refused with :class:`FilesBusy`, naming the files.
- :func:`density_table`: the Markdown table of every consistent result next to the authors' figures
  (:data:`AUTHORS_DENSITY`); a JSON that does not summarise the CSV beside it is reported and left
  out. :func:`measure_throughput`: training and inference speed.
- the figures (:func:`plot_inpainting`, :func:`plot_history`, :func:`plot_acflow_inpainting`) live in
  :mod:`labkit.studies.density_figures` and are re-exported here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from labkit import masks as _masks
from labkit.device import resolve_device
from labkit.checks import check_int
from labkit.data import canonical_dataset
from labkit.models.acflow import ACFlow
from labkit.models.dmfa import DATASET_SHAPES, build_dmfa, evaluate_dmfa, test_masks
from labkit.models.dmfa_training import dmfa_loss
# the checkpoint side lives in density_checkpoints; re-exported so that ``density.load_or_train_dmfa`` keeps working
from labkit.studies.density_checkpoints import (_json, checkpoint_megabytes, config_checkpoint, load_or_fit_mfa,
                                                load_or_train_dmfa)
from labkit.studies.density_figures import plot_acflow_inpainting, plot_history, plot_inpainting

__all__ = [
    "experiment_from_parameters",
    "AUTHORS_DENSITY",
    "load_or_train_dmfa",
    "load_or_fit_mfa",
    "checkpoint_megabytes",
    "config_checkpoint",
    "csv_digest",
    "result_stem",
    "own_files",
    "FilesBusy",
    "density_table",
    "score_holes",
    "run_experiment",
    "run_mfa_baseline",
    "run_acflow_baseline",
    "measure_throughput",
    "plot_inpainting",
    "plot_history",
    "plot_acflow_inpainting",
]

#: The authors' DMFA density figures: mean per test image over the hidden square, (NLL in nats,
#: sum of squared errors), keyed by (data set, hole side, model).
AUTHORS_DENSITY: dict[tuple[str, int, str], tuple[float, float]] = {
    ("mnist", 10, "dmfa"): (-70.8, 5.46),
    ("mnist", 10, "mfa"): (-14.8, 6.90),
    ("mnist", 18, "dmfa"): (-222.6, 31.66),
    ("mnist", 18, "mfa"): (998.0, 47.89),
}


# ============================================================================ scores and tables
def csv_digest(source: os.PathLike | str | bytes) -> str:
    """The digest a JSON summary records of the CSV it summarises: sha256 (16 hex digits) of the
    CSV's bytes. ``source``: the file (a :class:`~pathlib.Path`), or its text/bytes before it is written."""
    if isinstance(source, os.PathLike):
        from labkit.studies.engine import file_digest

        return file_digest(source)
    data = source.encode() if isinstance(source, str) else bytes(source)
    return hashlib.sha256(data).hexdigest()[:16]


def result_stem(dataset: str, mode: str, hole: int | None = None, default_hole: int | None = None,
                seed: int = 0) -> str:
    """File stem of a result: ``<dataset>_<mode>[_h<hole>][_s<seed>]``, the hole part only for other
    than the default hole (half the image side), the seed part only for seeds other than 0 (the
    committed files are seed 0's), so runs of other seeds never share files."""
    key = canonical_dataset(dataset)
    if default_hole is None:
        default_hole = DATASET_SHAPES[key][1] // 2
    stem = f"{key}_{mode}" if hole is None or hole == default_hole else f"{key}_{mode}_h{hole}"
    return stem if seed == 0 else f"{stem}_s{check_int(seed, 'seed', 0)}"


class FilesBusy(RuntimeError):
    """Another process holds the claim on a result's files (it is training or writing them)."""


@contextlib.contextmanager
def own_files(results_dir: str | os.PathLike, stem: str):
    """Hold the claim on the files ``<results_dir>/<stem>*`` (the checkpoint, its partial checkpoint in
    ``_scratch/``, the CSV, JSON and figures, and any ``<stem>-<digest8>`` file of other settings)
    for the duration of the block.

    The claim is an exclusive lock on ``<results_dir>/_scratch/claims/files-<stem>.lock``
    (:func:`labkit.studies.store.claim`: dropped by the system when the process dies, so a crash
    leaves no stale claim). Raises :class:`FilesBusy` naming the files and the lock when another
    process holds it: two runs that would write the same files never run at once.
    """
    from labkit.studies.store import claim

    out = Path(results_dir)
    with claim(out / "files", f"files-{stem}") as mine:
        if not mine:
            raise FilesBusy(f"another process is writing {stem}.* in {out} (it holds "
                            f"{out / '_scratch' / 'claims' / f'files-{stem}.lock'}); run this again when it has "
                            "finished (a finished run is loaded, not retrained)")
        yield


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
    import pandas as pd

    if not isinstance(images, Tensor) or not isinstance(missing, Tensor):
        raise TypeError("images and missing must be torch.Tensors")
    if images.shape[0] != missing.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and missing {tuple(missing.shape)} differ in N")
    check_int(n_samples, "n_samples")
    check_int(batch_size, "batch_size")
    dev = model._param().device
    was_training = model.training
    model.eval()
    g_deq = torch.Generator().manual_seed(seed)
    g_smp = torch.Generator().manual_seed(seed + 1)
    cols: dict[str, list[Tensor]] = {"nll": [], "nll_dequantized": [], "sse": [], "n_missing": []}
    starts = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

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


def _read_summaries(results_dir: Path, key: str) -> tuple[list[tuple[Path, dict, Any]], list[str]]:
    """The consistent (CSV, JSON summary) pairs of ``results_dir``: ``[(csv, summary, frame)]``, and
    one line per pair left out (no digest recorded, or the JSON summarises another CSV)."""
    import pandas as pd

    from labkit.studies.engine import recover

    recover(results_dir)                      # finish or undo an interrupted write_files first
    pairs, left_out = [], []
    for csv in sorted(Path(results_dir).glob(f"{key}_*.csv")):
        setting_file = csv.with_suffix(".json")
        if not setting_file.exists():
            continue
        try:
            s = json.loads(setting_file.read_text())
        except json.JSONDecodeError as exc:
            left_out.append(f"{setting_file.name}: not valid JSON ({exc.msg})")
            continue
        recorded, actual = s.get("csv_digest"), csv_digest(csv)
        if recorded is None:
            left_out.append(f"{csv.name}: its JSON records no CSV digest (written before digests were recorded: "
                            "run scripts/migrate_results.py density)")
            continue
        if recorded != actual:
            left_out.append(f"{csv.name}: {setting_file.name} summarises another CSV (digest {recorded}, the file "
                            f"has {actual}); rerun that experiment")
            continue
        pairs.append((csv, s, pd.read_csv(csv)))
    return pairs, left_out


def density_table(results_dir: str | os.PathLike, dataset: str = "mnist") -> str:
    """Markdown table of our density results next to the authors' (``AUTHORS_DENSITY``).

    Reads every ``<dataset>_*.csv`` in ``results_dir`` with a ``<stem>.json`` summary beside it
    (``model_kind`` "dmfa"/"mfa"/"acflow", ``mode``, ``hole``, ``n_train``, ``n_test``, ``epochs``...)
    and reports the mean NLL and SSE per test image over the hidden square. Only consistent pairs
    count: the JSON records the digest of the CSV it summarises (``csv_digest``); a pair whose
    digest is missing or differs is left out, printed and listed under the table (never merged).
    """
    key = canonical_dataset(dataset)
    pairs, left_out = _read_summaries(Path(results_dir), key)
    rows = []
    for csv, s, df in pairs:
        kind = s.get("model_kind", "dmfa")
        hole = int(s["hole"])
        authors = AUTHORS_DENSITY.get((key, hole, kind))
        if kind == "dmfa":
            what = f"DMFA, {s['mode']}-data training (K={s['n_components']}, L={s['n_factors']})"
            if s.get("missing_kind") not in (None, "square"):
                what += f", {s['missing_kind']} missing data"
            setting = f"{s['n_train']} train, {s['epochs']} epochs, lr {s.get('lr', '?')}"
            if s.get("lr_milestones"):   # a step schedule: the lr it ends at, and from which epochs
                setting += (f" (×{s.get('lr_gamma')} from epoch "
                            f"{', '.join(str(m + 1) for m in s['lr_milestones'])})")
            if s.get("mse_warmup_epochs"):
                setting += f", MSE warm-up {s['mse_warmup_epochs']} epochs"
            if s.get("precision") not in (None, "32"):
                setting += f", {s['precision']}"
            setting += f", seed {s['seed']}"
        elif kind == "acflow":
            what = "ACFlow (flow over the hidden pixels)"
            setting = (f"{s['n_train']} train (mixed masks), {s['epochs']} epochs, SSE of the mean of "
                       f"{s['n_samples']} samples; NLL of dequantised values {df['nll_dequantized'].mean():.1f} "
                       f"({s['test_bits_per_dim']:.2f} bits/pixel)")
        else:
            what = f"classical MFA (K={s['n_components']}, L={s['n_factors']})"
            setting = f"{s['n_train']} train, EM {s.get('iterations_run', s.get('iterations'))} it., seed {s['seed']}"
        if re.search(r"-[0-9a-f]{8}$", csv.stem):
            setting += f" (`{csv.stem}`)"     # a model trained with other settings than the profile's file
        rows.append((hole, {"dmfa": 0, "mfa": 1}.get(kind, 2), f"{s.get('mode', '')} {s.get('missing_kind') or ''}",
                     f"| {hole}×{hole} | {what} | {df['nll'].mean():.1f} | {df['sse'].mean():.2f} | "
                     + (f"{authors[0]:.1f} | {authors[1]:.2f}" if authors else "– | –")
                     + f" | {len(df)} test images; {setting} |"))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    head = ("| hole | model | NLL (ours) | SSE (ours) | NLL (authors) | SSE (authors) | setting |\n"
            "|---|---|---|---|---|---|---|")
    text = "\n".join([head] + [r[3] for r in rows])
    for line in left_out:
        print(f"[density] left out of the table: {line}", flush=True)
    if left_out:
        text += "\n\nLeft out (inconsistent result files): " + "; ".join(left_out) + "."
    return text


# ============================================================================ experiments (notebook 01, scripts/train_dmfa.py)
def _timed_evaluate(model, images, missing, *, batch_size, device):
    started = time.perf_counter()
    df = evaluate_dmfa(model, images, missing, batch_size=batch_size, device=device)
    seconds = time.perf_counter() - started
    return df, seconds


def _hole_sides(holes: Sequence[int | None], height: int) -> list[int]:
    """The hole sides to score, ``None`` read as the default ``height // 2`` (as :func:`run_experiment`)."""
    return [height // 2 if h is None else check_int(h, "hole", 1) for h in holes]


def _load_split(dataset: str, split: str, limit: int | None):
    from labkit.data import load_dataset

    return load_dataset(dataset, split, limit=limit, quiet=True)


def _figure_writer(fig, dpi: int = 110):
    """A :func:`labkit.studies.engine.write_files` content callable that saves ``fig`` as PNG."""
    return lambda p: fig.savefig(p, format="png", dpi=dpi)


def _csv_text(df) -> str:
    df.index.name = "image"
    return df.to_csv(float_format="%.6g")


def experiment_from_parameters(namespace: Mapping[str, Any], **given) -> dict:
    """:func:`run_experiment` with a notebook's parameters: the names of ``namespace`` (e.g. ``globals()``
    after the parameters cell) that :func:`run_experiment` takes, overridden by ``given``."""
    import inspect

    names = set(inspect.signature(run_experiment).parameters)
    kw = {k: v for k, v in namespace.items() if k in names and not k.startswith("_")}
    kw.update(given)
    return run_experiment(kw.pop("dataset"), kw.pop("mode"), **kw)


def run_experiment(
    dataset: str = "mnist",
    mode: str = "complete",
    *,
    results_dir: str | os.PathLike,
    n_train: int | None,
    n_val: int = 0,
    n_test: int | None,
    hole: int | None = None,
    epochs: int,
    batch_size: int,
    lr: float,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 1.0,
    mse_warmup_epochs: int = 0,
    n_components: int = 1,
    n_factors: int = 4,
    missing_kind: str = "square",
    seed: int = 0,
    profile: str | None = None,
    n_figure: int = 6,
    device=None,
    progress: bool = True,
    precision: str = "32",
    weights_dtype: str = "float32",
) -> dict:
    """Train (or load) one DMFA and score it on the test set; write every artefact to ``results_dir``.

    ``precision``: of the DMFA's training (:func:`load_or_train_dmfa`; scoring is float32).
    ``weights_dtype``: how the checkpoint stores the weights (``"float16"``: half the file; the model
    is scored, and used by every study, exactly as stored; :func:`load_or_train_dmfa`).

    Data: the first ``n_train`` training images (``None``: all), of which ``n_val`` (a seeded random
    choice, :func:`labkit.data.train_val_split`) are held out for the validation curve; the first
    ``n_test`` test images, each with one ``hole x hole`` square (:func:`test_masks`, default H/2).
    Training hides squares of the same side (and, in incomplete mode, the truly missing regions are
    squares of that side too unless ``missing_kind`` says otherwise).

    Files, with ``stem = result_stem(dataset, mode, hole, seed=seed)`` (``<dataset>_incomplete_<kind>``
    for other missing-data kinds, ``_s<seed>`` added for seeds other than 0; ``<stem>-<digest8>`` when
    ``<stem>.pt`` holds a model trained with other settings, see :func:`config_checkpoint`):
        ``<stem>.pt``            the trained model (``load_or_train`` format)
        ``_scratch/<stem>.partial.pt``  the resumable training checkpoint (with the optimizer's state)
        ``<stem>.csv``           per test image: ``nll``, ``sse``, ``n_missing``
        ``<stem>.json``          the setting, summary metrics, throughput, machine and ``csv_digest``
        ``<stem>_history.json``  the training history (per epoch; per-batch NLL)
        ``<stem>.png``           the inpainting figure of the first ``n_figure`` test images
        ``<stem>_curves.png``    the training curves (:func:`plot_history`)
    The last five are written as one set (:func:`labkit.studies.engine.write_files`): interrupted,
    the folder keeps the previous set or holds the new one, never a CSV of one run beside the JSON
    of another. The run holds the claim on ``stem`` throughout (:func:`own_files`): while another
    process runs on these files, it raises :class:`FilesBusy` before reading or writing any of them.

    Returns the setting dict (also written as ``<stem>.json``) with keys ``paths``, ``test_nll``,
    ``test_sse``, ``train_images_per_s``, ``infer_images_per_s``, ``history``...
    """
    key = canonical_dataset(dataset)
    C, H, W = DATASET_SHAPES[key]
    hole = H // 2 if hole is None else check_int(hole, "hole", 1)
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    # incomplete-data DMFAs of other missing-data kinds (the classification study trains one per
    # mask kind) get their own files: <dataset>_incomplete_<kind>[_h<hole>][_s<seed>]
    stem = result_stem(key, mode if mode == "complete" or missing_kind == "square" else f"{mode}_{missing_kind}", hole,
                       seed=seed)
    with own_files(out, stem):
        return _run_experiment(
            key, mode, stem=stem, out=out, n_train=n_train, n_val=n_val, n_test=n_test, hole=hole, epochs=epochs,
            batch_size=batch_size, lr=lr, lr_milestones=lr_milestones, lr_gamma=lr_gamma,
            mse_warmup_epochs=mse_warmup_epochs, n_components=n_components, n_factors=n_factors,
            missing_kind=missing_kind, seed=seed, profile=profile, n_figure=n_figure, device=device,
            progress=progress, precision=precision, weights_dtype=weights_dtype)


def _run_experiment(key: str, mode: str, *, stem: str, out: Path, n_train, n_val, n_test, hole: int, epochs,
                    batch_size, lr, lr_milestones, lr_gamma, mse_warmup_epochs, n_components, n_factors,
                    missing_kind, seed, profile, n_figure, device, progress, precision, weights_dtype) -> dict:
    """:func:`run_experiment` once its files are claimed (``stem``: the files it starts from)."""
    import matplotlib.pyplot as plt

    from labkit.machine import machine_summary
    from labkit.data import train_val_split
    from labkit.studies.engine import write_files

    C, H, W = DATASET_SHAPES[key]
    train_set = _load_split(key, "train", n_train)
    images = train_set.images
    val_images = None
    if n_val:
        tr, va = train_val_split(len(images), n_val / len(images), seed=seed)
        images, val_images = images[tr], images[va]
    test_set = _load_split(key, "test", n_test)
    test_missing = test_masks(len(test_set), H, W, side=hole, seed=seed, device=test_set.images.device)

    model, meta = load_or_train_dmfa(
        out / f"{stem}.pt", key, images=images, n_components=n_components, n_factors=n_factors, mode=mode,
        missing_kind=missing_kind, hole=hole, epochs=epochs, batch_size=batch_size, lr=lr,
        lr_milestones=lr_milestones, lr_gamma=lr_gamma, mse_warmup_epochs=mse_warmup_epochs, seed=seed,
        val_images=val_images, device=device, progress=progress, precision=precision, weights_dtype=weights_dtype,
        # the resumable per-epoch checkpoint (with Adam's state) stays in _scratch/ (git-ignored):
        # delete <stem>.pt and rerun with more epochs to extend a finished run
        partial=out / "_scratch" / f"{stem}.partial.pt", keep_partial=True,
        meta={"data_source": train_set.source, "profile": profile},
    )
    stem = Path(meta.pop("checkpoint_path")).stem          # <stem>-<digest8> for a model of other settings
    paths = {k: out / f"{stem}{suffix}" for k, suffix in
             (("model", ".pt"), ("csv", ".csv"), ("setting", ".json"), ("history", "_history.json"),
              ("figure", ".png"), ("curves", "_curves.png"))}
    df, seconds = _timed_evaluate(model, test_set.images, test_missing, batch_size=256, device=device)
    csv_text = _csv_text(df)
    history = meta.pop("history", [])

    figures = {"figure": plot_inpainting(model, test_set.images[:n_figure], test_missing[:n_figure], seed=seed,
                                         device=device,
                                         title=f"DMFA ({mode}-data training) on {key} test images, {hole}x{hole} holes")}
    if history:
        figures["curves"] = plot_history(history, title=f"DMFA ({mode}-data training), {key}, {hole}x{hole} holes")

    setting = {
        "model_kind": "dmfa", "dataset": key, "mode": mode, "hole": hole, "profile": profile,
        "n_train": int(len(images)), "n_val": 0 if val_images is None else int(len(val_images)),
        "n_test": int(len(test_set)), "test_source": test_set.source, **{k: v for k, v in meta.items()},
        "n_components": n_components, "n_factors": n_factors,
        "test_nll": float(df["nll"].mean()), "test_sse": float(df["sse"].mean()),
        "test_nll_sem": float(df["nll"].std() / math.sqrt(len(df))) if len(df) > 1 else None,
        "infer_images_per_s": len(test_set) / seconds, "infer_machine": machine_summary(),
        "infer_threads": torch.get_num_threads(),
        "checkpoint_mb": checkpoint_megabytes(paths["model"]),
        "final_val_nll": history[-1].get("val_nll") if history else None,
        "csv_digest": csv_digest(csv_text),
    }
    setting = _json(setting)
    files = {paths["csv"]: csv_text, paths["setting"]: json.dumps(setting, indent=1),
             paths["history"]: json.dumps(history, indent=1),
             **{paths[name]: _figure_writer(fig) for name, fig in figures.items()}}
    try:
        write_files(files)
    finally:
        for fig in figures.values():
            plt.close(fig)
    setting["paths"] = {k: str(v) for k, v in paths.items()}
    setting["history"] = history
    return setting


def run_mfa_baseline(
    dataset: str = "mnist",
    *,
    results_dir: str | os.PathLike,
    n_train: int | None,
    n_test: int | None,
    holes: Sequence[int | None] = (None,),
    n_components: int = 20,
    n_factors: int = 4,
    iterations: int = 30,
    seed: int = 0,
    profile: str | None = None,
    n_figure: int = 6,
    batch_size: int = 64,
    device=None,
    progress: bool = True,
) -> list[dict]:
    """Fit (or load) a classical MFA on the first ``n_train`` training images and score it with the
    same test holes as :func:`run_experiment` (one CSV/JSON/PNG set per hole side, written as one
    set with :func:`labkit.studies.engine.write_files`, the JSON recording the CSV's digest).

    Files: ``<dataset>_mfa_K<K>_L<L>.pt`` (``-<digest8>`` added for a model of other settings, as in
    :func:`load_or_fit_mfa`) and, per hole, ``<that stem>[_h<hole>].{csv,json,png}``; the run holds
    the claim on ``<dataset>_mfa_K<K>_L<L>`` throughout (:func:`own_files`).
    """
    key = canonical_dataset(dataset)
    C, H, W = DATASET_SHAPES[key]
    holes = _hole_sides(holes, H)
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"mfa_K{n_components}_L{n_factors}"
    with own_files(out, f"{key}_{name}"):
        return _run_mfa_baseline(key, name, holes=holes, out=out, n_train=n_train, n_test=n_test,
                                 n_components=n_components, n_factors=n_factors, iterations=iterations, seed=seed,
                                 profile=profile, n_figure=n_figure, batch_size=batch_size, device=device,
                                 progress=progress)


def _run_mfa_baseline(key: str, name: str, *, holes: list[int], out: Path, n_train, n_test, n_components, n_factors,
                      iterations, seed, profile, n_figure, batch_size, device, progress) -> list[dict]:
    """:func:`run_mfa_baseline` once its files are claimed."""
    from labkit.machine import machine_summary

    C, H, W = DATASET_SHAPES[key]
    train_set = _load_split(key, "train", n_train)
    test_set = _load_split(key, "test", n_test)
    imputer, meta = load_or_fit_mfa(out / f"{key}_{name}.pt", train_set.images, n_components=n_components,
                                    n_factors=n_factors, iterations=iterations, seed=seed, device=device,
                                    progress=progress, meta={"data_source": train_set.source, "profile": profile})
    model_path = Path(meta.pop("checkpoint_path"))
    tag = model_path.stem[len(f"{key}_{name}"):]           # "" or "-<digest8>"
    results = []
    for hole in holes:
        stem = result_stem(key, name, hole) + tag
        test_missing = test_masks(len(test_set), H, W, side=hole, seed=seed, device=test_set.images.device)
        df, seconds = _timed_evaluate(imputer, test_set.images, test_missing, batch_size=batch_size, device=device)
        csv_text = _csv_text(df)
        fig = plot_inpainting(imputer, test_set.images[:n_figure], test_missing[:n_figure], seed=seed, device=device,
                              title=f"classical MFA (K={n_components}, L={n_factors}) on {key}, {hole}x{hole} holes")
        setting = _json({
            "model_kind": "mfa", "dataset": key, "mode": "complete", "hole": hole, "profile": profile,
            "n_test": len(test_set), "test_source": test_set.source, **meta,
            "test_nll": float(df["nll"].mean()), "test_sse": float(df["sse"].mean()),
            "infer_images_per_s": len(test_set) / seconds, "infer_machine": machine_summary(),
            "infer_threads": torch.get_num_threads(),
            "checkpoint_mb": checkpoint_megabytes(model_path), "csv_digest": csv_digest(csv_text),
        })
        results.append(_write_result_set(out, stem, csv_text, setting, fig))
    return results


def _write_result_set(out: Path, stem: str, csv_text: str, setting: dict, fig) -> dict:
    """The per-image CSV, the JSON summary and the figure of one baseline run, written as one set
    (:func:`labkit.studies.engine.write_files`); returns ``setting`` with their ``paths``."""
    import matplotlib.pyplot as plt

    from labkit.studies.engine import write_files

    try:
        write_files({out / f"{stem}.csv": csv_text, out / f"{stem}.json": json.dumps(setting, indent=1),
                     out / f"{stem}.png": _figure_writer(fig)})
    finally:
        plt.close(fig)
    setting["paths"] = {"csv": str(out / f"{stem}.csv"), "setting": str(out / f"{stem}.json"),
                        "figure": str(out / f"{stem}.png")}
    return setting


def run_acflow_baseline(
    dataset: str = "mnist",
    *,
    results_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    n_test: int | None,
    holes: Sequence[int | None] = (None,),
    n_samples: int = 4,
    seed: int = 0,
    profile: str | None = None,
    n_figure: int = 6,
    batch_size: int = 250,
    device=None,
    progress: bool = True,
) -> list[dict]:
    """Score a trained ACFlow (``scripts/train_acflow.py``) with the same test holes as
    :func:`run_experiment`, so it joins :func:`density_table`.

    Per hole side writes ``<dataset>_acflow[_h<hole>].{csv,json,png}`` as one set
    (:func:`labkit.studies.engine.write_files`; a checkpoint named ``<stem>-<digest8>.pt`` adds
    ``-<digest8>``): per image the NLL of the hidden pixels at exact values (the DMFA protocol) and
    at dequantised values, and the SSE of the mean of ``n_samples`` samples (:func:`score_holes`);
    the JSON records the checkpoint's content hash and the CSV's digest. The checkpoint is an
    input: a missing one raises ``FileNotFoundError`` naming the script that trains it, an
    unreadable one a :class:`labkit.checkpoint.CheckpointError` saying it is an input.
    """
    from labkit.machine import machine_summary
    from labkit.models.acflow_training import bits_per_dim, load_acflow
    from labkit.studies.engine import file_digest

    key = canonical_dataset(dataset)
    C, H, W = DATASET_SHAPES[key]
    holes = _hole_sides(holes, H)
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"no ACFlow checkpoint at {str(checkpoint)!r} (an input of this step); train one "
                                f"with scripts/train_acflow.py --out {checkpoint}")
    model, meta = load_acflow(checkpoint, device=device, input_role="ACFlow checkpoint")
    cfg, train = meta.get("config", {}), meta.get("setting", {})
    tag = "-" + checkpoint.stem.rsplit("-", 1)[1] if "-" in checkpoint.stem else ""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_set = _load_split(key, "test", n_test)
    results = []
    for hole in holes:
        stem = result_stem(key, "acflow", hole) + tag
        test_missing = test_masks(len(test_set), H, W, side=hole, seed=seed, device="cpu")
        started = time.perf_counter()
        df = score_holes(model, test_set.images, test_missing, n_samples=n_samples, batch_size=batch_size,
                         seed=seed, progress=progress)
        seconds = time.perf_counter() - started
        csv_text = _csv_text(df)
        fig = plot_acflow_inpainting(model, test_set.images[:n_figure], test_missing[:n_figure], seed=seed,
                                     title=f"ACFlow on {key}, {hole}x{hole} holes")
        per_pixel = float(df["nll_dequantized"].sum() / df["n_missing"].sum())
        setting = _json({
            "model_kind": "acflow", "dataset": key, "mode": "complete", "hole": hole, "profile": profile,
            "checkpoint": str(checkpoint), "checkpoint_sha": file_digest(checkpoint), "model": cfg.get("model"),
            "n_train": train.get("n_train", cfg.get("n_images")),
            "epochs": meta.get("epochs", len(meta.get("history", []))),
            "train_masks": train.get("mask_kinds", cfg.get("mask_fn")), "train_data_source": train.get("train_source"),
            "train_seed": meta.get("seed"), "n_parameters": meta.get("n_params"), "n_samples": n_samples, "seed": seed,
            "n_test": len(test_set), "test_source": test_set.source,
            "test_nll": float(df["nll"].mean()), "test_nll_dequantized": float(df["nll_dequantized"].mean()),
            "test_bits_per_dim": float(bits_per_dim(per_pixel)), "test_sse": float(df["sse"].mean()),
            "infer_images_per_s": len(test_set) / seconds, "infer_machine": machine_summary(),
            "infer_threads": torch.get_num_threads(), "csv_digest": csv_digest(csv_text),
        })
        results.append(_write_result_set(out, stem, csv_text, setting, fig))
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
            _, seconds = _timed_evaluate(model, images[:infer_images], holes[:infer_images],
                                         batch_size=infer_batch_size, device=device)
            out.append({"dataset": key, "threads": int(n_threads), "device": str(device),
                        "train_images_per_s": train_rate, "infer_images_per_s": infer_images / seconds,
                        "train_batch_size": batch_size, "infer_batch_size": infer_batch_size})
    finally:
        torch.set_num_threads(before)
    return out


def redraw_figure(results_dir: str | os.PathLike, stem: str, *, n_figure: int = 6, device=None) -> Path:
    """Draw ``<stem>.png`` again from the run's own files: its model ``<stem>.pt`` and the setting
    in ``<stem>.json`` (data set, hole, seed, mode), on the same first ``n_figure`` test images and
    holes the run scored. Nothing else is touched (the scores in its CSV/JSON stay as recorded), so a
    change of the figure's code reaches committed results without re-scoring them. Returns the
    figure's path (written atomically)."""
    import json

    from labkit.models.dmfa import load_dmfa
    from labkit.studies.engine import write_files

    out = Path(results_dir)
    setting_file = out / f"{stem}.json"
    if not setting_file.is_file():
        raise FileNotFoundError(f"{setting_file} does not exist: no run of stem {stem!r} in {out}")
    s = json.loads(setting_file.read_text(encoding="utf-8"))
    if s.get("model_kind") != "dmfa":
        raise ValueError(f"{setting_file} is a {s.get('model_kind')!r} run, not a DMFA's")
    key, hole, seed = s["dataset"], int(s["hole"]), int(s.get("seed", 0))
    C, H, W = DATASET_SHAPES[key]
    model, _ = load_dmfa(out / f"{stem}.pt", device=device, input_role="DMFA checkpoint of the figure")
    test_set = _load_split(key, "test", n_figure)
    missing = test_masks(s.get("n_test", len(test_set)), H, W, side=hole, seed=seed)[:n_figure]
    fig = plot_inpainting(model, test_set.images[:n_figure], missing, seed=seed, device=device,
                          title=f"DMFA ({s['mode']}-data training) on {key} test images, {hole}x{hole} holes")
    path = out / f"{stem}.png"
    write_files({path: _figure_writer(fig)})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
