"""Screenshot a slice of an executed notebook, for the figures in docs/ that show a quick run.

The cells from the markdown cell whose text starts with START up to (not including) the one
starting with END (or the end of the notebook), outputs only (no code, no stderr such as progress
bars), rendered by nbconvert's lab template and photographed full-page by headless Chromium through
Playwright; the PNG is then reduced to 256 colours. The committed screenshots come from a fresh
`./lab run` (quick profile) and these two commands:

    .venv/bin/python scripts/notebook_screenshot.py results/notebooks/quick/02_classification.ipynb \\
        "## Table 1, ours beside the paper's" "## The committed" docs/figures/quick_02_classification.png
    .venv/bin/python scripts/notebook_screenshot.py results/notebooks/quick/03_wae.ipynb \\
        "## 4. Reconstructions and samples" "## 5. Reading the numbers" docs/figures/quick_03_wae.png

Chromium: $LABKIT_CHROMIUM, /usr/bin/chromium, or Playwright's own (`python -m playwright install chromium`).
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
from pathlib import Path

import nbformat


def notebook_slice(nb, start: str, end: str | None):
    """The cells from the markdown cell starting with ``start`` up to the one starting with ``end``."""
    def heads(text):
        return [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.lstrip().startswith(text)]

    first = heads(start)
    if not first:
        raise SystemExit(f"no markdown cell starts with {start!r}")
    i0 = first[0]
    i1 = next((i for i in heads(end) if i > i0), len(nb.cells)) if end else len(nb.cells)
    part = copy.deepcopy(nb)
    part.cells = nb.cells[i0:i1]
    for c in part.cells:                 # progress bars and log lines are not what a reader looks at
        if c.cell_type == "code":
            c.outputs = [o for o in c.outputs if o.get("name") != "stderr"]
    return part


def chromium() -> str | None:
    for candidate in (os.environ.get("LABKIT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None                          # Playwright's own browser


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebook")
    p.add_argument("start")
    p.add_argument("end")
    p.add_argument("out")
    p.add_argument("--width", type=int, default=1000)
    a = p.parse_args(argv)
    from nbconvert import HTMLExporter
    from PIL import Image
    from playwright.sync_api import sync_playwright

    part = notebook_slice(nbformat.read(a.notebook, as_version=4), a.start, a.end or None)
    exporter = HTMLExporter(template_name="lab")
    exporter.exclude_input = exporter.exclude_input_prompt = exporter.exclude_output_prompt = True
    html, _ = exporter.from_notebook_node(part)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "slice.html"
        page.write_text(html, encoding="utf-8")
        shot = Path(tmp) / "shot.png"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium(), headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            tab = browser.new_page(viewport={"width": a.width, "height": 800})
            tab.goto(page.resolve().as_uri())
            tab.wait_for_timeout(1500)
            tab.screenshot(path=str(shot), full_page=True)
            browser.close()
        Image.open(shot).convert("RGB").quantize(256).save(a.out, optimize=True)
    print(a.out, Path(a.out).stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
