"""Every link inside the repository's markdown points at something that exists.

For each tracked-style markdown file (``README.md``, ``START_HERE.md``, ``docs/``, ``data/``,
``.jupyter/`` and the notes under ``results/``) every relative link and image — inline
``[text](target)``, reference definitions ``[id]: target``, HTML ``href``/``src`` — must name an
existing file or folder, and an anchor ``#part`` must be one of the target file's headings as
GitHub spells them (its slug: lower case, punctuation dropped, spaces to hyphens, ``-1``, ``-2``
for repeats) or an explicit ``<a id=...>``. Links in code spans and fenced code blocks are not
links. Web addresses are not checked (no network).

Markdown images must also say what they show: an empty alt text (``![](...)``) or one that only
repeats the file name fails.

The checker is tested on small files written here, so it is known to catch a missing file, a
missing anchor and a wrong slug before it is trusted with the repository.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

from labkit import paths

REPO = paths.repo_root()
#: where the repository's own markdown lives (results/ holds generated tables and notes)
MARKDOWN_GLOBS = ("*.md", "docs/**/*.md", "data/**/*.md", ".jupyter/**/*.md", "results/**/*.md")

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
# [text](target "title") and ![alt](target); the text may hold one level of brackets (a badge)
_INLINE = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\"|\s+'[^']*')?\s*\)")
_REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^>]*>|\S+)", re.M)
_HTML_TAG = re.compile(r"<(a|img|source)\b[^>]*>", re.I)
_HTML_ID = re.compile(r"<[a-z][^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def markdown_files(root: Path = REPO) -> list[Path]:
    """The markdown files under ``root`` that :data:`MARKDOWN_GLOBS` name (no virtualenvs, no .git)."""
    found = set()
    for pattern in MARKDOWN_GLOBS:
        for p in root.glob(pattern):
            rel = p.relative_to(root).parts
            if p.is_file() and not any(part in {".git", ".venv", "node_modules"} for part in rel):
                found.add(p)
    return sorted(found)


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            continue
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip()[len(m.group(1)):]:
                fence = None
            continue
        out.append((n, line))
    return out


def heading_text(raw: str) -> str:
    """A heading's text as GitHub renders it: code spans keep their content, links their text,
    emphasis markers and HTML tags go."""
    parts = []
    last = 0
    for m in _CODE_SPAN.finditer(raw):           # code keeps every character, markup around it goes
        parts.append(_strip_markup(raw[last:m.start()]))
        parts.append(m.group(2).strip())
        last = m.end()
    parts.append(_strip_markup(raw[last:]))
    return "".join(parts).strip()


def _strip_markup(text: str) -> str:
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"(\*{1,3}|(?<!\w)_{1,3}|_{1,3}(?!\w))", "", text)


def slug(text: str) -> str:
    """GitHub's anchor for a heading's text: lower case; every character that is not a letter, a
    digit, ``_``, ``-`` or a space dropped; each space a hyphen."""
    out = []
    for ch in text.lower():
        cat = unicodedata.category(ch)
        if ch in "_-" or cat[0] in "LN" or cat == "Mn":
            out.append(ch)
        elif ch == " ":
            out.append("-")
    return "".join(out)


def anchors(text: str) -> set[str]:
    """Every anchor a markdown text defines: its headings' slugs (repeats get ``-1``, ``-2``, ...)
    and explicit HTML ``id``/``name`` attributes."""
    seen: dict[str, int] = {}
    found = set()
    prose = _prose_lines(text)
    for i, (n, line) in enumerate(prose):
        m = _ATX.match(line)
        title = None
        if m:
            title = m.group(2)
        elif i > 0 and _SETEXT.match(line) and prose[i - 1][0] == n - 1 and prose[i - 1][1].strip() \
                and not _ATX.match(prose[i - 1][1]):
            title = prose[i - 1][1]
        if title is not None:
            base = slug(heading_text(title))
            k = seen.get(base, 0)
            found.add(base if k == 0 else f"{base}-{k}")
            seen[base] = k + 1
        found.update(_HTML_ID.findall(line))
    return found


def links(text: str) -> list[tuple[int, str, bool, str]]:
    """``(line, target, is_image, alt_or_text)`` for every link outside code (reference
    definitions and HTML attributes included)."""
    out = []
    for n, line in _prose_lines(text):
        bare = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        for m in _INLINE.finditer(bare):
            target = m.group(3).strip("<>")
            out.append((n, target, m.group(1) == "!", m.group(2)))
        for m in _REFDEF.finditer(bare):
            out.append((n, m.group(1).strip("<>"), False, ""))
        for m in _HTML_TAG.finditer(bare):
            attrs = {k.lower(): v for k, v in re.findall(r"\b(href|src|alt)\s*=\s*[\"']([^\"']*)[\"']", m.group(0), re.I)}
            if "href" in attrs or "src" in attrs:
                is_image = m.group(1).lower() == "img"
                out.append((n, attrs.get("href", attrs.get("src")), is_image, attrs.get("alt", "")))
    return out


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)) or target.startswith("//")


def check_file(md: Path, root: Path = REPO) -> list[str]:
    """Problems with ``md``'s links: missing files, missing anchors, images without alt text."""
    problems = []
    text = md.read_text(encoding="utf-8")
    own = None
    rel_md = md.relative_to(root)
    for n, target, is_image, label in links(text):
        where = f"{rel_md}:{n}"
        if is_image:
            name = Path(unquote(target.split("#")[0])).name
            words = label.strip()
            if not words or words.lower() in {name.lower(), Path(name).stem.lower(), "image", "figure", "screenshot"}:
                problems.append(f"{where}: image {target!r} has no alt text saying what it shows ({label!r})")
        if not target or _is_external(target):
            continue
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part.split("?")[0])
        if path_part:
            dest = (root / path_part.lstrip("/")) if path_part.startswith("/") else (md.parent / path_part)
            dest = Path(dest)
            try:
                dest.resolve().relative_to(root.resolve())
            except ValueError:
                problems.append(f"{where}: {target!r} points outside the repository")
                continue
            if not dest.exists():
                problems.append(f"{where}: {target!r}: no such file {dest.relative_to(root) if dest.is_relative_to(root) else dest}")
                continue
        else:
            dest = md
        if anchor and dest.suffix.lower() == ".md" and dest.is_file():
            if dest == md:
                own = own if own is not None else anchors(text)
                targets = own
            else:
                targets = anchors(dest.read_text(encoding="utf-8"))
            if unquote(anchor).lower() not in {a.lower() for a in targets}:
                close = sorted(a for a in targets if a.split("-")[0] == anchor.split("-")[0])[:5]
                problems.append(f"{where}: {target!r}: no heading with the anchor #{anchor} in "
                                f"{dest.relative_to(root)}" + (f" (similar: {', '.join(close)})" if close else ""))
    return problems


# ------------------------------------------------------------------------------ the checker itself
@pytest.mark.parametrize("heading, expected", [
    ("Results (`cpu` profile): the Table-1 grid", "results-cpu-profile-the-table-1-grid"),
    ("On a GPU: one run on an NVIDIA H200", "on-a-gpu-one-run-on-an-nvidia-h200"),
    ("How to reproduce / resume", "how-to-reproduce--resume"),
    ("The earlier trapezoid (`trapezoid_inside`)", "the-earlier-trapezoid-trapezoid_inside"),
    ("CIFAR-10 (profile `cpu`, `results/cifar10_*`)", "cifar-10-profile-cpu-resultscifar10_"),
    ("*Emphasis* and __strong__ words", "emphasis-and-strong-words"),
    ("**Bold** and [a link](x.md) — dash", "bold-and-a-link--dash"),
    ("Przewięźlikowski et al.", "przewięźlikowski-et-al"),
    ("MisConv: E[ReLU(w·x + b)]", "misconv-ereluwx--b"),
])
def test_slug_follows_githubs_rule(heading, expected):
    assert slug(heading_text(heading)) == expected


def test_checker_finds_missing_files_anchors_and_alt_texts(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "fig.png").write_bytes(b"png")
    (tmp_path / "docs" / "b.md").write_text(
        "# B: the title\n\n## Results (`cpu` profile)\n\n## Results (`cpu` profile)\n\nOther\n-----\n"
        "<a id=\"kept-anchor\"></a>\n```\n# not a heading\n```\n", encoding="utf-8")
    good = ("[ok](b.md#results-cpu-profile) [again](b.md#results-cpu-profile-1) [setext](b.md#other) "
            "[html](b.md#kept-anchor) [self](#top-heading) [dir](../docs/) [web](https://example.org/x#y)\n"
            "![the noise mask over a digit](fig.png)\n`[code](nothere.md)`\n")
    (tmp_path / "docs" / "a.md").write_text("# Top heading\n\n" + good, encoding="utf-8")
    assert check_file(tmp_path / "docs" / "a.md", tmp_path) == []

    bad = ("# Top heading\n\n[gone](missing.md)\n[stale](b.md#results-cpu)\n[self](#nowhere)\n"
           "![](fig.png)\n![fig.png](fig.png)\n[skip](b.md#not-a-heading)\n[out](../../etc/passwd)\n"
           "<img src=\"nothere.png\" alt=\"a chart\">\n[ref]: missing-too.md\n")
    (tmp_path / "docs" / "c.md").write_text(bad, encoding="utf-8")
    problems = check_file(tmp_path / "docs" / "c.md", tmp_path)
    lines = sorted(int(p.split(":")[1]) for p in problems)
    assert lines == [3, 4, 5, 6, 7, 8, 9, 10, 11], "\n".join(problems)
    assert any("no such file docs/missing.md" in p for p in problems)
    assert any("#results-cpu" in p and "similar: results-cpu-profile" in p for p in problems)


def test_the_markdown_files_are_found():
    found = {p.relative_to(REPO).as_posix() for p in markdown_files()}
    assert {"README.md", "START_HERE.md", "docs/density.md", "docs/classification.md"} <= found


# ------------------------------------------------------------------------------ the repository
@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_and_anchors_resolve(md):
    problems = check_file(md)
    assert not problems, "\n".join(problems)
