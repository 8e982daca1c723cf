"""JupyterLab in a real browser: the start page, and the draw-a-mask notebook, in Chromium driven by Playwright.

Each test starts JupyterLab on 127.0.0.1 (a free port, a random token; throw-away user config,
data, settings, workspace and runtime folders) the way ``./lab jupyter`` does
(:mod:`labkit.lab.jupyter`: the lab's ``.jupyter/`` settings and kernelspec), and stops the server's
process group (and any kernel it started) by process id in every outcome.

- Start page: the server at the repository root opens ``START_HERE.md`` rendered, the file
  browser lists each notebook once (the jupytext ``.py`` twins are hidden) and no "get notified
  about Jupyter news" prompt appears.
- Draw a mask: a temporary copy of ``notebooks/05_draw_a_mask.ipynb`` (JupyterLab autosaves
  outputs into the notebook it runs) runs all cells from the Run menu. The drawing canvas must show
  the test digit, pixel for pixel; the app must fit the notebook with the file browser open at
  1280, 1440 and 1920 pixels of window width; a real mouse drag across the canvas must mark exactly
  the pixels under the stroke (and show them red on the canvas) and change the probability panel;
  after the page is reloaded (a new browser client of the same kernel) the canvas must show the
  digit and the stroke again.

Screenshots go to ``results/screenshots/`` (ignored by git). With ``LAB_UPDATE_FIGURES=1`` they
replace the committed copies in ``docs/figures/`` (``jupyterlab_start.png``, ``draw_a_mask.png``)
instead, so an ordinary test run never changes a tracked file.

The browser: ``$LABKIT_CHROMIUM`` if set, else Debian's ``/usr/bin/chromium`` (``apt-get install
chromium``), else a ``chromium`` on the PATH, else the Chromium that ``python -m playwright install
chromium`` downloads. Without one, or without the Python package ``playwright``, the tests skip and
say how to get it (:func:`skip_reason`; ``tests/conftest.py`` prints the same in pytest's header).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from labkit import paths
from labkit.lab import jupyter as lab_jupyter

REPO = paths.repo_root()
NOTEBOOK = REPO / "notebooks" / "05_draw_a_mask.ipynb"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
GET_CHROMIUM = ("install one with `apt-get install chromium` (Debian/Ubuntu) or `python -m playwright install "
                "chromium`, or point LABKIT_CHROMIUM at a Chromium or Chrome binary")
#: window widths the draw-a-mask app must fit, with JupyterLab's file browser open
WINDOW_WIDTHS = (1280, 1440, 1920)


def find_chromium() -> Path | None:
    """The Chromium the tests drive: ``$LABKIT_CHROMIUM`` (must exist if set), ``/usr/bin/chromium``,
    ``chromium`` on the PATH, or the one ``python -m playwright install chromium`` put in its cache."""
    env = os.environ.get("LABKIT_CHROMIUM")
    if env:
        return Path(env) if Path(env).is_file() else None
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    cache = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or Path.home() / ".cache" / "ms-playwright")
    found = sorted(cache.glob("chromium-*/chrome-linux*/chrome")) if cache.is_dir() else []
    return found[-1] if found else None


def skip_reason() -> str | None:
    """Why the browser tests cannot run here (and how to fix it), or None when they can."""
    if find_chromium() is None:
        where = (f"LABKIT_CHROMIUM={os.environ['LABKIT_CHROMIUM']} does not exist"
                 if os.environ.get("LABKIT_CHROMIUM") else "no Chromium found")
        return f"{where}: {GET_CHROMIUM}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install playwright)"
    return None


def screenshot_path(name: str) -> Path:
    """``results/screenshots/<name>.png`` (ignored), or the committed ``docs/figures/<name>.png``
    when ``LAB_UPDATE_FIGURES=1``."""
    if os.environ.get("LAB_UPDATE_FIGURES") == "1":
        return REPO / "docs" / "figures" / f"{name}.png"
    return paths.results_dir("screenshots", f"{name}.png")


@contextlib.contextmanager
def _chromium_page(pw, tmp_path: Path, width: int, height: int):
    """A page of a headless Chromium; a failure inside first saves what the page showed to
    ``tmp_path/failure.png``; the browser is closed in any case."""
    browser = pw.chromium.launch(executable_path=str(find_chromium()), headless=True, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": width, "height": height})
    try:
        yield page
    except Exception:
        try:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        browser.close()


@contextlib.contextmanager
def _reported(server, tmp_path: Path):
    """Stop the JupyterLab ``server`` in any case; a failure names the screenshot and the server's log."""
    try:
        yield
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}\n(screenshot: {tmp_path / 'failure.png'})\n"
                             f"--- JupyterLab log (tail) ---\n{server.log_tail()}") from exc
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_notebook(folder: Path, overrides: dict) -> Path:
    """Copy the notebook into ``folder``, appending ``overrides`` to its parameters cell."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# set by tests/test_browser.py\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    nb.metadata.pop("jupytext", None)      # no .py twin in the temporary folder
    out = folder / NOTEBOOK.name
    nbformat.write(nb, out)
    return out


class JupyterLab:
    """A JupyterLab server in its own process group; ``stop()`` ends it (and its kernels) by pid."""

    def __init__(self, root: Path, scratch: Path):
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        dirs = {k: scratch / k for k in ("config", "data", "runtime", "settings", "workspaces", "ipython")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        # the lab's settings (.jupyter/: start page, hidden twins, no news prompt, its kernelspec) as
        # ./lab jupyter has them; the user-level folders are scratch, so nothing of the user's applies
        env = dict(lab_jupyter.environment(REPO), JUPYTER_CONFIG_DIR=str(dirs["config"]),
                   JUPYTER_DATA_DIR=str(dirs["data"]), JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
                   JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]), JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]),
                   IPYTHONDIR=str(dirs["ipython"]), PYTHONUNBUFFERED="1")
        # sys.executable is the virtualenv's python: the server and, through the lab's "python3"
        # kernelspec whose argv[0] "python" jupyter_client maps to sys.executable, the kernel run in it.
        cmd = lab_jupyter.command(root, ["--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
                                         "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}"])
        self.log_path = scratch / "jupyterlab.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.children: set[int] = set()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def api(self, path: str, method: str = "GET", timeout: float = 5.0):
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("/api/status", timeout=2.0)
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"JupyterLab did not answer on {self.base} within {timeout:.0f} s:\n{self.log_tail()}")

    def remember_children(self) -> None:
        """Record the pids of the server's descendants (kernels run in sessions of their own)."""
        import psutil

        try:
            self.children |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            pass

    def stop(self) -> None:
        import psutil

        self.remember_children()
        if self.proc.poll() is None:
            try:
                self.api("/api/shutdown", method="POST", timeout=5.0)   # shuts the kernels down too
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)
        for pid in self.children:                                        # a kernel left behind
            try:
                p = psutil.Process(pid)
                if p.is_running():
                    p.kill()
            except psutil.Error:
                pass
        self._log.close()


def _dismiss_dialogs(page) -> None:
    """Accept any JupyterLab dialog (e.g. a kernel choice) so it cannot block the clicks."""
    for button in page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept").all():
        try:
            button.click(timeout=1000)
        except Exception:  # noqa: BLE001 - the dialog may close by itself meanwhile
            pass


def _kernel_status(page) -> str:
    """The status bar's kernel item, e.g. ``"Python 3 (ipykernel) | Idle"`` (empty if not shown yet)."""
    for text in page.locator(".jp-StatusBar-TextItem").all_inner_texts():
        if " | " in text:
            return text.strip()
    return ""


def _wait_kernel_idle(page, timeout_s: float) -> None:
    """Wait until the notebook's kernel is connected and idle, accepting a kernel dialog if one shows.

    The "Select Kernel" dialog appears when the notebook opens before the kernel specs have
    loaded (a race on a slow machine); accepting it starts the default, the venv's python3.
    """
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if page.locator(".jp-Dialog").count():
            _dismiss_dialogs(page)
        last = _kernel_status(page)
        if (last.endswith("| Idle") and not page.locator(".jp-Dialog").count()
                and page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count()):
            return
        time.sleep(0.25)
    raise TimeoutError(f"the kernel was not idle within {timeout_s:.0f} s (status bar: {last!r})")


def _wait_js(page, expression: str, arg, timeout_s: float, what: str) -> None:
    """``page.wait_for_function`` with a failure that says what was awaited."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(expression, arg=arg, timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}") from None


# ------------------------------------------------------------------------------ the drawing canvas
#: JS: how many of the canvas's image pixels differ from ``arg.rgb`` (row-major (H, W, 3) bytes),
#: read at the centre of each ``arg.scale`` x ``arg.scale`` block; a pixel never painted (alpha 0)
#: differs. -1 while the canvas is missing or of another size.
CANVAS_MISMATCHES = """(arg) => {
  const c = document.querySelector('canvas.draw-canvas');
  if (!c || c.width !== arg.w * arg.scale || c.height !== arg.h * arg.scale) return -1;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const half = Math.floor(arg.scale / 2);
  let bad = 0;
  for (let r = 0; r < arg.h; r++) {
    for (let q = 0; q < arg.w; q++) {
      const i = ((r * arg.scale + half) * c.width + q * arg.scale + half) * 4;
      const e = (r * arg.w + q) * 3;
      if (d[i + 3] !== 255 || Math.abs(d[i] - arg.rgb[e]) > 1 || Math.abs(d[i + 1] - arg.rgb[e + 1]) > 1
          || Math.abs(d[i + 2] - arg.rgb[e + 2]) > 1) bad++;
    }
  }
  return bad;
}"""

#: JS: the right edges of the app's parts (their content included) and of the output area that holds it (px)
APP_EXTENT = """() => {
  const canvas = document.querySelector('canvas.draw-canvas');
  const out = canvas.closest('.jp-OutputArea-output').getBoundingClientRect();
  const parts = {};
  for (const cls of ['draw-canvas', 'draw-panels', 'draw-intensity-bar', 'draw-std-bar', 'draw-probs', 'draw-count']) {
    const e = document.querySelector('.' + cls);
    // the part's own box and everything drawn inside it (content may overflow a shrunk box)
    parts[cls] = e ? Math.max(...[e, ...e.querySelectorAll('*')].map(x => x.getBoundingClientRect().right)) : null;
  }
  const sidebar = document.querySelector('#jp-left-stack');
  return {right: out.right, parts, sidebar: sidebar ? sidebar.getBoundingClientRect().width : 0};
}"""


def expected_canvas(image, missing) -> list[int]:
    """What the canvas must show: :func:`labkit.studies.draw.overlay_rgb` of ``image`` ``(1, H, W)``
    and bool ``missing`` ``(H, W)``, as row-major ``(H, W, 3)`` bytes."""
    from labkit.studies.draw import overlay_rgb

    return (overlay_rgb(image, missing) * 255).round().astype("uint8").reshape(-1).tolist()


def _wait_canvas_shows(page, rgb: list[int], h: int, w: int, scale: int, timeout_s: float, what: str) -> None:
    """Wait until the canvas shows ``rgb`` exactly; else fail saying how many pixels differ."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    arg = {"rgb": rgb, "h": h, "w": w, "scale": scale}
    try:
        page.wait_for_function(f"(arg) => ({CANVAS_MISMATCHES})(arg) === 0", arg=arg, timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        bad = page.evaluate(CANVAS_MISMATCHES, arg)
        state = "missing" if bad < 0 else ("blank" if bad == h * w else f"{bad} of {h * w} pixels wrong")
        raise AssertionError(f"{what}: the drawing canvas is {state} after {timeout_s:.0f} s") from None


def _saved_outputs(server, name: str) -> list[str]:
    """The MIME types of the outputs in the notebook file as saved on the server."""
    nb = server.api(f"/api/contents/{name}?content=1")["content"]
    return [m for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            for m in (o.get("data") or {"stream": 1})]


def _save_notebook(page, server, name: str, timeout_s: float = 30) -> None:
    """Save through the notebook's toolbar until the file on the server holds the app's output
    (a click that lands while JupyterLab is busy can be lost, so it is repeated)."""
    widget = "application/vnd.jupyter.widget-view+json"
    deadline = time.monotonic() + timeout_s
    while True:
        page.locator(".jp-NotebookPanel-toolbar [data-command='docmanager:save']").first.click()
        retry = time.monotonic() + 5
        while time.monotonic() < min(retry, deadline):
            if widget in _saved_outputs(server, name):
                return
            time.sleep(0.3)
        if time.monotonic() >= deadline:
            raise AssertionError(f"the notebook was not saved with the app's output within {timeout_s:.0f} s; "
                                 f"the file's outputs: {_saved_outputs(server, name)}")


@pytest.mark.browser
def test_draw_a_stroke_in_chromium(tmp_path, tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    from labkit.data import load_dataset
    from labkit.lab.notices import shown_source
    from labkit.studies.draw_app import COMPLETE, MISCONV, ZERO
    from tests.test_draw import notebook_model_overrides

    # the committed checkpoints, or tiny models trained once per session (then the kernel only loads)
    overrides = {"n_images": 20, "device": "cpu", **notebook_model_overrides(tmp_path_factory)}
    started = time.monotonic()
    root = tmp_path / "lab"
    root.mkdir()
    _prepare_notebook(root, overrides)
    # the digit the app shows first (image_index 0): the same data as the kernel's, checked below
    digit = load_dataset("mnist", "test", limit=1, quiet=True)
    image = digit.images[0]                                               # (1, 28, 28)
    _, h, w = image.shape
    scale = 10
    empty = torch.zeros(h, w, dtype=torch.bool)
    stroked = empty.clone()
    stroked[14, 4:24] = True                                              # what the drag below marks

    server = JupyterLab(root, tmp_path / "jupyter")
    with _reported(server, tmp_path):
        server.wait_ready()
        with sync_playwright() as pw, _chromium_page(pw, tmp_path, max(WINDOW_WIDTHS), 1000) as page:
            page.on("dialog", lambda dialog: dialog.accept())           # a "leave the page?" on reload
            page.goto(f"{server.base}/lab/tree/{NOTEBOOK.name}?token={server.token}", timeout=60_000)
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            _wait_kernel_idle(page, 60)
            server.remember_children()

            # Run > Run All Cells, through the menu like a user
            page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-item", has=page.locator(".lm-Menu-itemLabel",
                                                            has_text=re.compile(r"^Run All Cells$"))).click()
            # the last cell's output (its source says the same words, hence the output area)
            page.locator(".jp-OutputArea-output", has_text="mask cleared").wait_for(
                state="attached", timeout=90_000)
            _wait_kernel_idle(page, 30)
            server.remember_children()
            assert page.locator(".jp-OutputArea-output", has_text=f"data: {shown_source(digit)}").count() == 1, \
                "the kernel loaded other data than this test's reference digit"

            canvas = page.locator("canvas.draw-canvas")
            canvas.scroll_into_view_if_needed()
            _wait_canvas_shows(page, expected_canvas(image, empty), h, w, scale, 15, "after Run All")

            # the whole app inside the notebook, the file browser open, at each window width
            assert page.locator("#jp-left-stack").is_visible(), "the file browser should be open"
            for width in WINDOW_WIDTHS:
                page.set_viewport_size({"width": width, "height": 1000})
                page.wait_for_timeout(500)                                # the layout settles
                extent = page.evaluate(APP_EXTENT)
                cut = {k: round(v) for k, v in extent["parts"].items() if v is None or v > extent["right"] + 0.5}
                assert not cut, (f"at {width} px (file browser {extent['sidebar']:.0f} px wide) these parts of the "
                                 f"app reach past the notebook's right edge {extent['right']:.0f} px: {cut}")

            page.set_viewport_size({"width": 1440, "height": 1000})
            canvas.scroll_into_view_if_needed()
            count = page.locator(".draw-count")
            probs = page.locator(".draw-probs")
            _wait_js(page, "() => /missing pixels: 0 \\//.test(document.querySelector('.draw-count').innerText)",
                     None, 10, "the count to show 0 missing pixels after Run All")
            probs_before = probs.inner_html()
            exact_before = json.loads(probs.locator("[data-probs]").get_attribute("data-probs"))
            box = canvas.bounding_box()
            assert box and round(box["width"]) == w * scale and round(box["height"]) == h * scale, box

            # A horizontal drag along the centres of image row 14 from column 4 to column 23
            # (canvas x 45..235 at scale 10): brush 1.5 paints exactly those 20 pixels.
            y = box["y"] + 145
            page.mouse.move(box["x"] + 45, y)
            page.mouse.down()
            page.mouse.move(box["x"] + 235, y, steps=12)
            page.mouse.up()

            _wait_js(page, "() => !/missing pixels: 0 \\//.test(document.querySelector('.draw-count').innerText)",
                     None, 20, "the missing-pixel count to change after the stroke")
            _wait_js(page, "(before) => document.querySelector('.draw-probs').innerHTML !== before",
                     probs_before, 20, "the probability panel to be redrawn after the stroke")
            _wait_kernel_idle(page, 20)
            text = count.inner_text()
            n = int(re.search(r"missing pixels:\s*(\d+)\s*/\s*784", text).group(1))
            assert n == 20, f"the stroke should mark row 14, columns 4..23 (20 pixels); the page says {text!r}"
            assert "MisConv (DMFA)" in probs.inner_text()
            # the masked classifiers' probabilities moved; the complete-image reference did not
            exact = json.loads(probs.locator("[data-probs]").get_attribute("data-probs"))
            assert set(exact) == {MISCONV, ZERO, COMPLETE}
            for name in (MISCONV, ZERO):
                assert exact[name] != exact_before[name], f"{name}: probabilities unchanged by the stroke"
            assert exact[COMPLETE] == exact_before[COMPLETE]
            _wait_canvas_shows(page, expected_canvas(image, stroked), h, w, scale, 10, "after the stroke")

            shot = screenshot_path("draw_a_mask")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.locator(".jp-OutputArea-output", has=canvas).screenshot(path=str(shot))

            # A new browser client of the same kernel: save (so the page reopens with the widget's
            # output), reload, and the canvas must be painted again with the digit and the stroke.
            _save_notebook(page, server, NOTEBOOK.name)
            page.reload(timeout=60_000)
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            _wait_kernel_idle(page, 60)
            page.locator("canvas.draw-canvas").wait_for(state="attached", timeout=60_000)
            page.locator("canvas.draw-canvas").scroll_into_view_if_needed()
            _wait_canvas_shows(page, expected_canvas(image, stroked), h, w, scale, 20, "after a page reload")
    assert server.proc.poll() is not None
    assert time.monotonic() - started < 180, "the browser test should take about a minute"
    # the committed notebook was never served, so it is untouched and output-free
    from labkit.lab.run_notebooks import check_clean

    assert check_clean(NOTEBOOK) == []


def test_every_canvas_batch_names_its_canvas(monkeypatch):
    """What a browser page that connects later needs (no browser here): ipycanvas's page-side
    manager draws only on a canvas a batch has named, so each batch the app sends, the repaint for
    a new client included, starts by naming the app's canvas."""
    pytest.importorskip("ipycanvas")
    from ipycanvas.canvas import COMMANDS

    from labkit.studies.draw_app import build_app
    from tests.test_draw import FakeDMFA, Recorder

    images = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    app = build_app(images, None, dmfa=FakeDMFA(), classifiers={"c": Recorder(784)}, scale=10, n_samples=1)
    sent = []
    monkeypatch.setattr(app.canvas._canvas_manager, "_send_custom",
                        lambda command, buffers=(): sent.append(command))
    switch = [COMMANDS["switchCanvas"], [f"IPY_MODEL_{app.canvas.model_id}"]]

    app.canvas._handle_frontend_event(None, {"event": "client_ready"}, [])   # a page reloaded
    changed = app.stroke([(45, 145), (235, 145)])                             # then a stroke
    app.select(1)                                                             # another image
    assert changed == 20 and len(sent) == 3, sent
    for batch, rects in zip(sent, (28 * 28, changed, 28 * 28)):
        assert batch[0] == switch, f"a batch that does not name its canvas first: {batch[:2]}"
        # then one fillStyledRects: a square per image pixel repainted (all of them, or the stroke's)
        assert [c[0] for c in batch[1:]] == [COMMANDS["fillStyledRects"]]
        assert list(batch[1][1][0]["shape"]) == [rects]


def _git_status() -> str | None:
    """``git status --porcelain`` of what a JupyterLab session could write into: the lab's settings
    folder, the start page, results/ (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all", "--",
                              ".jupyter", "START_HERE.md", "results"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout if out.returncode == 0 else None


@pytest.mark.browser
def test_jupyterlab_opens_the_start_page(tmp_path):
    """``./lab jupyter``'s landing page: START_HERE.md rendered, each notebook listed once, no news prompt."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    before = _git_status()
    server = JupyterLab(REPO, tmp_path / "jupyter")
    with _reported(server, tmp_path):
        server.wait_ready()
        # the file browser's view of notebooks/: each notebook once, the .py twins hidden
        listed = sorted(item["name"] for item in server.api("/api/contents/notebooks")["content"])
        expected = sorted(p.name for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        assert [n for n in listed if n.startswith(tuple("0123456789"))] == expected, listed
        with sync_playwright() as pw, _chromium_page(pw, tmp_path, 1280, 800) as page:
            # the bare address, as a user opens the URL the server prints: it lands on the start page
            page.goto(f"{server.base}/?token={server.token}", timeout=60_000)
            heading = page.locator(".jp-RenderedMarkdown h1", has_text="misconv-lab: start here")
            heading.wait_for(state="visible", timeout=60_000)
            assert "/lab/tree/START_HERE.md" in page.url
            links = page.locator(".jp-RenderedMarkdown a[href*='notebooks/']")
            assert [a.inner_text() for a in links.all()][0].startswith("00")
            assert links.count() == len(expected)
            # the repository root is served: results/ and docs/ are in the file browser
            items = page.locator(".jp-DirListing-itemText")
            items.first.wait_for(timeout=30_000)
            names = set(items.all_inner_texts())
            assert {"notebooks", "results", "docs", "START_HERE.md"} <= names, names
            # JupyterLab asks about news a moment after start-up unless told not to
            time.sleep(3)
            assert page.get_by_text("Jupyter news").count() == 0, "the news prompt is showing"
            shot = screenshot_path("jupyterlab_start")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
    if before is not None and os.environ.get("LAB_UPDATE_FIGURES") != "1":
        assert _git_status() == before, "serving the repository changed files git sees"
