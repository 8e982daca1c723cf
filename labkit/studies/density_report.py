r"""The density study's report: the table of every result next to the authors' figures.

- :func:`density_table`: the Markdown table of every consistent result of a results folder (DMFA,
  classical MFA, ACFlow) next to the authors' figures (:data:`AUTHORS_DENSITY`); a JSON that does
  not summarise the CSV beside it is reported and left out.
- :func:`write_report`: what follows a sweep: the table beside the results and, given a Markdown
  page, in its marked block (:func:`write_block`, markers :func:`table_markers`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from labkit.data import canonical_dataset
from labkit.studies.configs import DensityConfig
from labkit.studies.density_experiment import csv_digest, results_path
from labkit.studies.engine import recover
from labkit.studies.store import write_text

__all__ = ["AUTHORS_DENSITY", "density_table", "table_markers", "write_block", "write_report"]

#: The authors' DMFA density figures: mean per test image over the hidden square, (NLL in nats,
#: sum of squared errors), keyed by (data set, hole side, model).
AUTHORS_DENSITY: dict[tuple[str, int, str], tuple[float, float]] = {
    ("mnist", 10, "dmfa"): (-70.8, 5.46),
    ("mnist", 10, "mfa"): (-14.8, 6.90),
    ("mnist", 18, "dmfa"): (-222.6, 31.66),
    ("mnist", 18, "mfa"): (998.0, 47.89),
}


def _read_summaries(results_dir: Path, key: str) -> tuple[list[tuple[Path, dict, Any]], list[str]]:
    """The consistent (CSV, JSON summary) pairs of ``results_dir``: ``[(csv, summary, frame)]``, and
    one line per pair left out (no digest recorded, or the JSON summarises another CSV)."""
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




def table_markers(dataset: str, marker: str | None = None) -> tuple[str, str]:
    """The begin/end comments around ``dataset``'s table in a Markdown page. MNIST's block is
    ``dmfa-table``, any other data set's ``dmfa-table:<dataset>`` (one page holds both); ``marker``
    names another block."""
    key = canonical_dataset(dataset)
    name = marker or ("dmfa-table" if key == "mnist" else f"dmfa-table:{key}")
    how = "./lab study dmfa --table-only" if key == "mnist" else f"./lab study dmfa -p dataset={key} --table-only"
    return f"<!-- {name}:begin (generated by {how}) -->", f"<!-- {name}:end -->"


def write_block(doc: str | os.PathLike, text: str, begin: str, end: str) -> Path:
    """Replace what lies between ``begin`` and ``end`` in ``doc`` by ``text`` (the block appended,
    markers and all, when the page has none). A begin comment is found by its name whatever its
    note in brackets says. Written atomically: a crash never leaves the page half written."""
    doc = Path(doc)
    page = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    name = re.escape(begin.split(":begin", 1)[0]) + r":begin[^\n]*?-->"
    found = re.search(name, page)
    if found and end in page[found.end():]:
        tail = page[found.end():].split(end, 1)[1]
        page = page[:found.start()] + block + tail
    else:
        page = page + ("\n" if page and not page.endswith("\n") else "") + block + "\n"
    write_text(doc, page)
    return doc


def write_report(cfg: DensityConfig, rows: Any = None, *, doc: str | os.PathLike | None = None,
                 marker: str | None = None) -> list[Path]:
    """What follows a sweep: the density table of :func:`results_path` (every consistent result in
    it, of this grid and any other: DMFAs of other modes and holes, the baselines) written beside
    the results as ``density_table[_<dataset>].md`` and, with ``doc`` (a Markdown page), into its
    block (:func:`table_markers`: the data set's default block, or ``marker``).

    ``rows`` (the sweep's rows, :func:`labkit.studies.density.read_rows`) are not needed: every
    result of the folder writes a JSON summary, which the table reads. Returns the files written.
    """
    key = canonical_dataset(cfg.dataset)
    out = results_path(cfg)
    table = density_table(out, key)
    out.mkdir(parents=True, exist_ok=True)
    beside = out / ("density_table.md" if key == "mnist" else f"density_table_{key}.md")
    written = [write_text(beside, table + "\n")]
    if doc is not None:
        written.append(write_block(doc, table, *table_markers(key, marker)))
    return written
