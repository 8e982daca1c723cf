r"""One DMFA of the density study: train (or load) it, score it on the test holes, write its files.

Protocol: a model sees each test image with one ``hole x hole`` square hidden
(:func:`labkit.models.dmfa.test_masks`, default side H/2, deterministic in the seed) and is scored
per image on the hidden pixels: negative log-likelihood (nats) and sum of squared errors of its mean.

- :func:`recipe_from`: the DMFA recipe (:class:`labkit.models.dmfa_training.DMFARecipe`) of a
  :class:`~labkit.studies.configs.DensityConfig`, the one place the study turns settings into it;
  :func:`results_path`: where the config's results go.
- :func:`run_experiment`: one point of the grid (mode, missing kind, hole, seed): train or load
  (:func:`labkit.studies.density_checkpoints.load_or_train_dmfa`), score, and write the CSV, JSON
  summary and figures of the result as one set (:func:`labkit.studies.engine.write_files`);
  :func:`result_stem` names them, and the JSON records the digest of its CSV (:func:`csv_digest`).
  A run holds a claim on its file stem (:func:`own_files`) from start to end, so two processes
  never write the same checkpoint, partial checkpoint or result files: the second is refused with
  :class:`FilesBusy`, naming the files.
- :func:`redraw_figure`: a run's inpainting figure drawn again from its own files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from labkit import paths as _paths
from labkit.checks import check_int
from labkit.data import canonical_dataset, load_dataset, train_val_split
from labkit.machine import machine_summary
from labkit.models.dmfa import DATASET_SHAPES, evaluate_dmfa, load_dmfa, test_masks
from labkit.models.dmfa_training import DMFARecipe
from labkit.studies.configs import DensityConfig
from labkit.studies.density_checkpoints import checkpoint_megabytes, jsonable, load_or_train_dmfa
from labkit.studies.density_figures import plot_history, plot_inpainting
from labkit.studies.engine import file_digest, write_files
from labkit.studies.store import claim

__all__ = ["FilesBusy", "csv_digest", "load_split", "own_files", "recipe_from", "redraw_figure", "result_stem",
           "results_path", "run_experiment"]


def recipe_from(cfg: DensityConfig) -> DMFARecipe:
    """The DMFA recipe of a density config: how every DMFA of its grid is built and trained.

    The precision is the config's as given (``"auto"`` stays ``"auto"``: the trainer and the
    checkpoint resolve it for their device; :func:`labkit.studies.density.run` resolves it once
    for the whole grid before anything is planned).
    """
    return DMFARecipe(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, lr_milestones=tuple(cfg.lr_milestones),
                      lr_gamma=cfg.lr_gamma, mse_warmup_epochs=cfg.mse_warmup_epochs, n_components=cfg.n_components,
                      n_factors=cfg.n_factors, precision=cfg.precision, weights_dtype=cfg.weights_dtype)


def results_path(cfg: DensityConfig) -> Path:
    """Where the config's results go: ``cfg.results_dir``, else ``results/dmfa/<profile>``."""
    return Path(cfg.results_dir) if cfg.results_dir else _paths.results_dir("dmfa", cfg.profile)


def csv_digest(source: os.PathLike | str | bytes) -> str:
    """The digest a JSON summary records of the CSV it summarises: sha256 (16 hex digits) of the
    CSV's bytes. ``source``: the file (a :class:`~pathlib.Path`), or its text/bytes before it is written."""
    if isinstance(source, os.PathLike):
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
    out = Path(results_dir)
    with claim(out / "files", f"files-{stem}") as mine:
        if not mine:
            raise FilesBusy(f"another process is writing {stem}.* in {out} (it holds "
                            f"{out / '_scratch' / 'claims' / f'files-{stem}.lock'}); run this again when it has "
                            "finished (a finished run is loaded, not retrained)")
        yield


def timed_evaluate(model, images, missing, *, batch_size, device):
    """:func:`labkit.models.dmfa.evaluate_dmfa` and the seconds it took: ``(scores, seconds)``."""
    started = time.perf_counter()
    df = evaluate_dmfa(model, images, missing, batch_size=batch_size, device=device)
    seconds = time.perf_counter() - started
    return df, seconds


def hole_sides(holes: Sequence[int | None], height: int) -> list[int]:
    """The hole sides to score, ``None`` read as the default ``height // 2`` (as :func:`run_experiment`)."""
    return [height // 2 if h is None else check_int(h, "hole", 1) for h in holes]


def load_split(dataset: str, split: str, limit: int | None):
    """The first ``limit`` images of a split (``None``: all), quietly: every run of the study loads through here."""
    return load_dataset(dataset, split, limit=limit, quiet=True)


def figure_writer(fig, dpi: int = 110):
    """A :func:`labkit.studies.engine.write_files` content callable that saves ``fig`` as PNG."""
    return lambda p: fig.savefig(p, format="png", dpi=dpi)


def csv_text(df) -> str:
    """A per-image score table as the CSV text a result writes (index ``image``, 6 digits)."""
    df.index.name = "image"
    return df.to_csv(float_format="%.6g")


def run_experiment(cfg: DensityConfig, *, mode: str, missing_kind: str = "square", hole: int | None = None,
                   seed: int = 0, device=None, progress: bool = True) -> dict:
    """Train (or load) one DMFA and score it on the test set; write every artefact to ``results_dir``.

    The config gives the data set, the sizes, the DMFA's recipe (:func:`recipe_from`: its precision
    is the training's, scoring is float32; its ``weights_dtype`` how the checkpoint stores the weights,
    and the model is scored, and used by every study, exactly as stored), where the files go
    (:func:`results_path`) and the figure's size; the rest says which point of its grid this is.

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
    key = canonical_dataset(cfg.dataset)
    C, H, W = DATASET_SHAPES[key]
    hole = H // 2 if hole is None else check_int(hole, "hole", 1)
    out = results_path(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # incomplete-data DMFAs of other missing-data kinds (the classification study trains one per
    # mask kind) get their own files: <dataset>_incomplete_<kind>[_h<hole>][_s<seed>]
    stem = result_stem(key, mode if mode == "complete" or missing_kind == "square" else f"{mode}_{missing_kind}", hole,
                       seed=seed)
    with own_files(out, stem):
        return _run_experiment(cfg, key, mode, stem=stem, out=out, hole=hole, missing_kind=missing_kind, seed=seed,
                               device=cfg.device if device is None else device, progress=progress)


def _run_experiment(cfg: DensityConfig, key: str, mode: str, *, stem: str, out: Path, hole: int, missing_kind: str,
                    seed: int, device, progress: bool) -> dict:
    """:func:`run_experiment` once its files are claimed (``stem``: the files it starts from)."""
    import matplotlib.pyplot as plt

    C, H, W = DATASET_SHAPES[key]
    recipe = recipe_from(cfg)
    n_val = cfg.n_val
    train_set = load_split(key, "train", cfg.n_train)
    images = train_set.images
    val_images = None
    if n_val:
        tr, va = train_val_split(len(images), n_val / len(images), seed=seed)
        images, val_images = images[tr], images[va]
    test_set = load_split(key, "test", cfg.n_test)
    test_missing = test_masks(len(test_set), H, W, side=hole, seed=seed, device=test_set.images.device)

    model, meta = load_or_train_dmfa(
        out / f"{stem}.pt", key, recipe, images=images, mode=mode, missing_kind=missing_kind, hole=hole, seed=seed,
        val_images=val_images, device=device, progress=progress,
        # the resumable per-epoch checkpoint (with Adam's state) stays in _scratch/ (git-ignored):
        # delete <stem>.pt and rerun with more epochs to extend a finished run
        partial=out / "_scratch" / f"{stem}.partial.pt", keep_partial=True,
        meta={"data_source": train_set.source, "profile": cfg.profile},
    )
    stem = Path(meta.pop("checkpoint_path")).stem          # <stem>-<digest8> for a model of other settings
    paths = {k: out / f"{stem}{suffix}" for k, suffix in
             (("model", ".pt"), ("csv", ".csv"), ("setting", ".json"), ("history", "_history.json"),
              ("figure", ".png"), ("curves", "_curves.png"))}
    df, seconds = timed_evaluate(model, test_set.images, test_missing, batch_size=256, device=device)
    text = csv_text(df)
    history = meta.pop("history", [])

    figures = {"figure": plot_inpainting(model, test_set.images[:cfg.n_figure], test_missing[:cfg.n_figure], seed=seed,
                                         device=device,
                                         title=f"DMFA ({mode}-data training) on {key} test images, {hole}x{hole} holes")}
    if history:
        figures["curves"] = plot_history(history, title=f"DMFA ({mode}-data training), {key}, {hole}x{hole} holes")

    setting = {
        "model_kind": "dmfa", "dataset": key, "mode": mode, "hole": hole, "profile": cfg.profile,
        "n_train": int(len(images)), "n_val": 0 if val_images is None else int(len(val_images)),
        "n_test": int(len(test_set)), "test_source": test_set.source, **{k: v for k, v in meta.items()},
        "n_components": recipe.n_components, "n_factors": recipe.n_factors,
        "test_nll": float(df["nll"].mean()), "test_sse": float(df["sse"].mean()),
        "test_nll_sem": float(df["nll"].std() / math.sqrt(len(df))) if len(df) > 1 else None,
        "infer_images_per_s": len(test_set) / seconds, "infer_machine": machine_summary(),
        "infer_threads": torch.get_num_threads(),
        "checkpoint_mb": checkpoint_megabytes(paths["model"]),
        "final_val_nll": history[-1].get("val_nll") if history else None,
        "csv_digest": csv_digest(text),
    }
    setting = jsonable(setting)
    files = {paths["csv"]: text, paths["setting"]: json.dumps(setting, indent=1),
             paths["history"]: json.dumps(history, indent=1),
             **{paths[name]: figure_writer(fig) for name, fig in figures.items()}}
    try:
        write_files(files)
    finally:
        for fig in figures.values():
            plt.close(fig)
    setting["paths"] = {k: str(v) for k, v in paths.items()}
    setting["history"] = history
    return setting


def redraw_figure(results_dir: str | os.PathLike, stem: str, *, n_figure: int = 6, device=None) -> Path:
    """Draw ``<stem>.png`` again from the run's own files: its model ``<stem>.pt`` and the setting
    in ``<stem>.json`` (data set, hole, seed, mode), on the same first ``n_figure`` test images and
    holes the run scored. Nothing else is touched (the scores in its CSV/JSON stay as recorded), so a
    change of the figure's code reaches committed results without re-scoring them. Returns the
    figure's path (written atomically)."""
    import matplotlib.pyplot as plt

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
    test_set = load_split(key, "test", n_figure)
    missing = test_masks(s.get("n_test", len(test_set)), H, W, side=hole, seed=seed)[:n_figure]
    fig = plot_inpainting(model, test_set.images[:n_figure], missing, seed=seed, device=device,
                          title=f"DMFA ({s['mode']}-data training) on {key} test images, {hole}x{hole} holes")
    path = out / f"{stem}.png"
    write_files({path: figure_writer(fig)})
    plt.close(fig)
    return path
