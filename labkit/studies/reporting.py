"""Reporting helpers shared by every study: generated blocks in Markdown files, and committed
results shown beside a live run.

A study writes its tables into a document (the README, a results page) between two HTML comments,
``<!-- name:start -->`` and ``<!-- name:end -->``; :func:`replace_marked_block` rewrites what lies
between them and leaves the rest of the file alone, and :func:`marked_block` reads it back (also the
``<!-- name:begin ... -->`` and ``<!-- name -->`` ... ``<!-- /name -->`` spellings that some
documents use).

A notebook run with a small profile (``quick``) trains for seconds: it shows that the pipeline
works, but some effects (a DMFA whose mean looks like a digit, a WAE whose prior samples do) need
the hours of the ``cpu`` profile. :func:`committed_results` gathers what the repository holds from
such a run (tables, figures) with a label that says plainly whose results they are and how their
settings differ from the live run's, so a notebook can show them beside its own output, the way a
tutorial loads a pre-trained model next to a toy training run.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit import paths
from labkit.studies.configs import CONFIGS

__all__ = ["BlockNotFound", "CommittedResults", "SETTING_KEYS", "committed_results", "committed_sources",
           "marked_block", "replace_marked_block"]


class BlockNotFound(ValueError):
    """A Markdown file holds no start marker of the block asked for (:func:`marked_block`)."""


def replace_marked_block(md_path: str | os.PathLike, name: str, body: str) -> bool:
    """Put ``body`` between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->`` in ``md_path``.

    Returns True if the file changed. Raises ``ValueError`` if the markers are missing.
    """
    path = Path(md_path)
    text = path.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"{path} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    new = head + start + "\n" + body.strip("\n") + "\n" + end + tail
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False


def marked_block(md_path: str | os.PathLike, name: str) -> str:
    """The text between the markers of block ``name`` in ``md_path``, stripped of blank edges.

    Start marker: ``<!-- name:start -->``, ``<!-- name:begin (any comment) -->`` or ``<!-- name -->``;
    end marker: ``<!-- name:end -->`` or ``<!-- /name -->`` (the first one after the start). A longer
    name that merely begins with ``name`` (``wae-table:cpu-supplement`` for ``wae-table:cpu``) is
    another block. Raises :class:`BlockNotFound` (a ``ValueError``) when the file has no start
    marker, ``ValueError`` when it has two or the end marker is missing; both name the file and block.
    """
    path = Path(md_path)
    text = path.read_text(encoding="utf-8")
    n = re.escape(name)
    starts = list(re.finditer(rf"<!--\s*{n}(?::(?:start|begin)(?:\s[^>]*)?)?\s*-->", text))
    if not starts:
        raise BlockNotFound(f"{path} has no block {name!r} (no <!-- {name}:start -->, <!-- {name}:begin ... --> "
                            f"or <!-- {name} -->)")
    if len(starts) > 1:
        raise ValueError(f"{path} has {len(starts)} start markers of block {name!r} "
                         f"(<!-- {name}:start -->, <!-- {name}:begin ... --> or <!-- {name} -->); expected 1")
    end = re.compile(rf"<!--\s*(?:/{n}|{n}:end)\s*-->").search(text, starts[0].end())
    if end is None:
        raise ValueError(f"{path}: block {name!r} has no end marker (<!-- {name}:end --> or <!-- /{name} -->)")
    return text[starts[0].end():end.start()].strip("\n")


#: the settings a "this run / committed run" comparison states, in this order (those both runs have)
SETTING_KEYS = ("dataset", "mode", "modes", "n_train", "n_val", "n_test", "epochs", "batch_size", "lr",
                "lr_milestones", "precision", "seeds", "masks", "methods", "fronts", "recipe")


def _shown(value: Any) -> str:
    if value is None:
        return "all"            # the profiles' null sizes: the whole split
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class CommittedResults:
    """Results of one profile's runs committed to the repository, to show beside a live run.

    ``setting``: the profile that made them (``"cpu"``); ``live_profile``: the live run's.
    ``settings``: ``(name, this run's value, committed value)`` for :data:`SETTING_KEYS` both have.
    ``tables``: ``(source, Markdown)`` pairs; ``figures``: paths of PNG files; ``missing``: sources
    asked for that the checkout lacks (a file, or a block of a file), said in :meth:`markdown`.
    ``note``: why the live run does not show the effect itself (Markdown).
    """

    setting: str
    live_profile: str
    settings: tuple[tuple[str, str, str], ...]
    tables: tuple[tuple[str, str], ...]
    figures: tuple[Path, ...]
    missing: tuple[str, ...] = ()
    note: str = ""

    def heading(self) -> str:
        """The label above the committed results: not this run, which profile, why they are here."""
        text = (f"**Beside this run: the committed `{self.setting}` results. Not this run:** "
                f"what follows was made by the `{self.setting}` profile (the same code, "
                f"larger sizes: table below) and committed to the repository; this cell only loads it. "
                f"The live run above used the `{self.live_profile}` profile.")
        return f"{text} {self.note.strip()}" if self.note.strip() else text

    def settings_markdown(self) -> str:
        """The settings that differ between the two runs, side by side (Markdown table)."""
        rows = [(k, a, b) for k, a, b in self.settings if a != b]
        if not rows:
            return ""
        lines = [f"| setting | this run (`{self.live_profile}`) | committed (`{self.setting}`) |", "|---|---|---|"]
        lines += [f"| {k} | {a} | {b} |" for k, a, b in rows]
        return "\n".join(lines)

    def markdown(self, *, figures: bool = True) -> str:
        """Heading, settings, tables (each with its source) and, with ``figures``, the figures' paths."""
        parts = [self.heading()]
        if self.settings_markdown():
            parts.append(self.settings_markdown())
        for source, table in self.tables:
            parts.append(f"_Committed `{self.setting}` table, from `{source}`:_\n\n{table}")
        if figures:
            parts += [f"_Committed `{self.setting}` figure: `{_relative(p)}`_" for p in self.figures]
        if self.missing:
            parts.append(f"_No committed `{self.setting}` result for this setting at: "
                         + ", ".join(f"`{m}`" for m in self.missing) + "._")
        return "\n\n".join(parts)

    def show(self) -> None:
        """Display the heading, settings and tables, then each figure under its caption (IPython)."""
        from IPython.display import Image, Markdown, display

        display(Markdown(self.markdown(figures=False)))
        for path in self.figures:
            display(Markdown(f"**Committed `{self.setting}` figure, not this run:** `{_relative(path)}`"))
            display(Image(filename=str(path)))


def _relative(path: Path) -> str:
    root = paths.repo_root()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def committed_sources(notebook: str, dataset: str = "mnist", mode: str | None = None,
                      setting: str = "cpu") -> tuple[list[str], list[str]]:
    """``(tables, figures)``: what the repository holds from ``setting``'s runs of ``notebook`` for
    ``dataset``, as paths relative to the repository (a table may be ``file#block``). Where a data
    set has no committed result the path names what would hold it (:func:`committed_results`
    reports it missing). ``mode``: the DMFA's training mode (notebook 01; default incomplete).

    - ``01_dmfa``: the density table the DMFA script generates into ``docs/density.md`` (block
      ``dmfa-table``, ``dmfa-table:<dataset>`` for other data sets) and the inpainting figure of the
      ``<dataset>_<mode>`` DMFA (the same first test images and holes as the notebook's figure).
    - ``02_classification``: the sweep's Table 1 and paired differences (``accuracy.md``,
      ``accuracy_paired.md``; ``<dataset>.md`` ... for other data sets) and its dot chart.
    - ``03_wae``: the sweep's table in ``docs/wae.md`` (block ``wae-table:<setting>``, MNIST;
      ``wae-table:<setting>-<dataset>`` otherwise) and the seed-0 reconstruction and prior-sample grids.
    """
    mnist = dataset == "mnist"
    if notebook == "01_dmfa":
        return ([f"docs/density.md#dmfa-table{'' if mnist else ':' + dataset}"],
                [f"results/dmfa/{setting}/{dataset}_{mode or 'incomplete'}.png"])
    if notebook == "02_classification":
        stem = f"results/classification/{setting}/{'accuracy' if mnist else dataset}"
        return [f"{stem}.md", f"{stem}_paired.md"], [f"{stem}.png"]
    if notebook == "03_wae":
        return ([f"docs/wae.md#wae-table:{setting}{'' if mnist else '-' + dataset}"],
                [f"results/wae/{setting}/figures/{dataset}-fronts-s0-{what}.png"
                 for what in ("reconstruction", "samples")])
    raise ValueError(f"no committed results are known for notebook {notebook!r}; known: 01_dmfa, 02_classification, "
                     "03_wae")


def committed_results(notebook: str, live: Mapping[str, Any], *, setting: str | None = "cpu", note: str = "",
                      tables: Sequence[str] | None = None, figures: Sequence[str] | None = None,
                      profiles_dir: str | os.PathLike | None = None) -> CommittedResults | None:
    """The committed results of profile ``setting`` for ``notebook``, labelled for a live run.

    Args:
        notebook: the notebook's profile section (``"03_wae"``): where ``setting``'s parameters are read.
        live: the live run's parameters (a notebook's ``globals()`` after its parameters cell); must
            hold ``profile``; its ``dataset`` and ``mode`` choose the default sources.
        tables, figures: paths relative to the repository (a table: a Markdown file, or a block of
            one, ``file#block``: :func:`marked_block`); default: :func:`committed_sources`.
        setting: the profile whose results are shown; ``None`` or ``""``: none.
        note: a sentence saying why the live run does not show the effect itself.
        profiles_dir: where the profiles are (default: the repository's ``profiles/``).

    Returns ``None`` when there is nothing to put beside the run: no ``setting``, or the live run
    *is* that profile's. Sources the checkout lacks (a data set without committed results) are
    listed in ``missing`` and said in the Markdown, never dropped silently.

    Raises:
        ValueError: ``live`` has no ``profile``; ``setting`` is not a profile or has no section for
            ``notebook`` (:meth:`labkit.config.StudyConfig.build`'s message); a table's file has
            its block twice or only a start (a broken document, not a missing result).
    """
    if "profile" not in live:
        raise ValueError("live parameters lack 'profile' (pass the notebook's globals() after its parameters cell)")
    live_profile = str(live["profile"])
    if not setting or live_profile == setting:
        return None
    # the committed profile's whole config (its file holds only what differs from the defaults)
    profile = Path(profiles_dir) / f"{setting}.yaml" if profiles_dir is not None else setting
    committed = CONFIGS[notebook].build(profile).as_dict()
    if tables is None or figures is None:
        default_tables, default_figures = committed_sources(notebook, str(live.get("dataset", "mnist")),
                                                            live.get("mode"), setting)
        tables = default_tables if tables is None else tables
        figures = default_figures if figures is None else figures
    compared = tuple((k, _shown(live[k]), _shown(committed[k])) for k in SETTING_KEYS if k in live and k in committed)
    found_tables, found_figures, missing = [], [], []
    for source in tables:
        file, _, block = str(source).partition("#")
        path = paths.repo_path(file)
        if not path.is_file():
            missing.append(source)
            continue
        if not block:
            found_tables.append((source, path.read_text(encoding="utf-8").strip("\n")))
            continue
        try:
            found_tables.append((source, marked_block(path, block)))
        except BlockNotFound:
            missing.append(source)                 # no such block: no committed result of this kind
    for source in figures:
        path = paths.repo_path(source)
        if path.is_file():
            found_figures.append(path)
        else:
            missing.append(source)
    return CommittedResults(setting=setting, live_profile=live_profile, settings=compared, tables=tuple(found_tables),
                            figures=tuple(found_figures), missing=tuple(missing), note=note)
