"""The per-image predictions of a classification cell: the label its classifier gave each test
image and whether it was right, stored beside the cell's row.

:func:`predict` computes them, :func:`encode_predictions` turns them into the record the result
store writes to ``predictions.jsonl`` (an attachment, in the same set as the row),
:func:`decode_predictions` reads one back after checking it belongs to its row, and
:func:`with_predictions` adds them to a table of rows. The paired statistics
(:mod:`labkit.studies.paired_stats`) use them where they exist.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from labkit.masks import with_nan
from labkit.studies.engine import ResultStore

__all__ = ["PREDICTIONS_FORMAT", "decode_predictions", "encode_predictions", "predict", "with_predictions"]

#: characters of the predicted labels (one per test image): labels 0-35
_LABEL_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
PREDICTIONS_FORMAT = "labels-base36/correct-packbits-hex"


def encode_predictions(predicted: torch.Tensor, correct: torch.Tensor, test_fingerprint: dict) -> dict:
    """The predictions record of a cell: ``predicted (n_test,)`` integer labels (0-35) and ``correct
    (n_test,)`` booleans, as text (one character per label; the flags as packed bits in hex), with
    the fingerprint of the test data they belong to. Written to ``predictions.jsonl`` under the
    cell key by the store (an attachment, in the same set as the row)."""
    predicted = torch.as_tensor(predicted).reshape(-1)
    correct = torch.as_tensor(correct).reshape(-1)
    if predicted.dtype.is_floating_point or predicted.dtype == torch.bool:
        raise TypeError(f"predicted labels must be integers, got {predicted.dtype}")
    if correct.dtype != torch.bool or correct.shape != predicted.shape:
        raise ValueError(f"correct must be booleans of predicted's shape {tuple(predicted.shape)}, got "
                         f"{correct.dtype} {tuple(correct.shape)}")
    if len(predicted) and (int(predicted.min()) < 0 or int(predicted.max()) >= len(_LABEL_CHARS)):
        raise ValueError(f"predicted labels must lie in 0..{len(_LABEL_CHARS) - 1}, got "
                         f"{int(predicted.min())}..{int(predicted.max())}")
    n = int(test_fingerprint.get("n", -1))
    if n != len(predicted):
        raise ValueError(f"{len(predicted)} predictions for a test set of {n} images")
    return {"format": PREDICTIONS_FORMAT, "test": dict(test_fingerprint), "n": n,
            "predicted": "".join(_LABEL_CHARS[int(v)] for v in predicted.tolist()),
            "correct": np.packbits(correct.numpy().astype(np.uint8)).tobytes().hex()}


def decode_predictions(record: dict, row) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted (n,) int8, correct (n,) bool)`` NumPy arrays of a predictions record, after
    checking that it belongs to ``row`` (a result row: ``key``, ``inputs`` JSON, ``accuracy``): the
    same key, the same test data fingerprint, as many images, and the row's accuracy. Raises
    ``ValueError`` naming what differs."""
    key = row["key"]
    if record.get("key") != key:
        raise ValueError(f"predictions record of key {record.get('key')} offered for row {key}")
    if record.get("format") != PREDICTIONS_FORMAT:
        raise ValueError(f"predictions of {key}: unknown format {record.get('format')!r}")
    inputs = json.loads(row["inputs"]) if isinstance(row["inputs"], str) else dict(row["inputs"])
    if record.get("test") != inputs.get("test"):
        raise ValueError(f"predictions of {key} were made on other test data ({record.get('test')}) than its row's "
                         f"({inputs.get('test')})")
    n = int(record["n"])
    text = record["predicted"]
    if len(text) != n:
        raise ValueError(f"predictions of {key}: {len(text)} labels for {n} test images")
    predicted = np.frombuffer(text.encode(), dtype=np.uint8)
    predicted = np.where(predicted >= ord("a"), predicted - ord("a") + 10, predicted - ord("0")).astype(np.int8)
    bits = np.frombuffer(bytes.fromhex(record["correct"]), dtype=np.uint8)
    if len(bits) != (n + 7) // 8:
        raise ValueError(f"predictions of {key}: {len(bits) * 8} correctness bits for {n} test images")
    correct = np.unpackbits(bits)[:n].astype(bool)
    acc = float(row["accuracy"])
    if abs(correct.mean() - acc) > 5.5e-6:        # the row's accuracy is rounded to 5 decimals
        raise ValueError(f"predictions of {key} give accuracy {correct.mean():.6f}, its row {acc}: not the same run")
    return predicted, correct


def with_predictions(df, store: ResultStore):
    """``df`` (rows of ``store``) with a ``correct`` column: each row's per-image correctness flags
    (:func:`decode_predictions`) where its cell stored predictions, else None."""
    records = store.read_attachments("predictions") if "predictions" in store.attachments else {}
    df = df.copy()
    df["correct"] = [decode_predictions(records[r["key"]], r)[1] if r["key"] in records else None
                     for r in df.to_dict("records")] if len(df) else []
    return df


def predict(model, images: torch.Tensor, missing: torch.Tensor, aux, *, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels ``(n,)`` (int64, CPU) of ``images (n, C, H, W)`` with ``missing`` pixels (bool
    ``(n, 1|C, H, W)``; NaN is put there), in eval mode without gradients: the computation of
    :func:`labkit.models.classifier.evaluate_accuracy`, keeping each image's answer."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            b = torch.arange(s, min(s + batch_size, len(images)))
            x, j = images[b].to(dev), missing[b].to(dev)
            x = with_nan(x, j.expand_as(x))
            out.append(model(x, j, aux.get(b, x, j)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
