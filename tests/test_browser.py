"""The viewer in a real browser: `streamlit run viewer/app.py` driven by Playwright + Chromium.

What AppTest (tests/test_viewer_apptest.py) cannot show: the app started the way a user starts
it — `streamlit run viewer/app.py` from the repository root, which puts only viewer/ on
sys.path, so the app itself must make `model` importable (the server gets no PYTHONPATH) —
renders every page in Chromium without an exception, the Browse detail dialog opens, and a
review decision clicked in the browser lands in the SQLite review log.

Needs Debian's Chromium at /usr/bin/chromium (`apt-get install chromium`; Playwright's own
browser download is not used; `bash .ci/run` installs it). Without it the tests fail with
that fix rather than skip. One screenshot per page goes to
tests/_artifacts/browser/ (git-ignored). PCAM_LENS_HOME / PCAM_LENS_RUNS point into tmp dirs.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "_artifacts" / "browser"
CHROMIUM = Path(os.environ.get("PCAM_LENS_CHROMIUM", "/usr/bin/chromium"))
# (sidebar label, page title (h1), screenshot name)
PAGES = [("Browse", "Browse patches", "browse"), ("Dataset", "Dataset", "dataset"),
         ("Map", "Map", "map-empty"),
         ("Runs", "Runs", "runs"), ("Metrics", "Metrics", "metrics"),
         ("Grad-CAM", "Grad-CAM", "gradcam"), ("Review", "Review", "review"),
         ("Inference", "Inference", "inference"), ("Slide", "Slide", "slide-empty")]
TINY_ARGS = ["--no-pretrained", "--arch", "resnet18", "--data", "synthetic:n=96", "--no-checks",
             "--no-lr-find", "--frozen-epochs", "0", "--epochs", "1", "--bs", "32",
             "--seed", "0", "--workers", "0"]
START_TIMEOUT_S = 90  # server health endpoint
PAGE_TIMEOUT_S = 90  # one page (first visits load torch, the model, Grad-CAM)
QUIET_MS = 600  # the app must stay idle this long to count as rendered
REVIEWER = "Dr Browser"


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"the playwright package cannot be imported ({e}); pip install -r requirements.txt"
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    return None


def _require_browser() -> None:
    """Chromium/Playwright missing is a failure naming the fix, never a skip: a skipped
    browser test would prove nothing about the app a user starts."""
    why = _missing()
    if why:
        pytest.fail(f"{why}. `bash .ci/run` installs both.", pytrace=False)


def test_browser_is_available():
    """Fails (does not skip) without Chromium/Playwright."""
    _require_browser()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sync_playwright():
    _require_browser()
    from playwright.sync_api import sync_playwright

    return sync_playwright


def build_tiny_run(runs: Path) -> Path:
    """`runs/tiny`: resnet18 from scratch, one epoch on 96 synthetic patches (the numbers mean
    nothing; ~20 s on 2 busy cores, most of it importing fastai)."""
    from model.train import main

    rc = main([*TINY_ARGS, "--run-dir", str(runs / "tiny")])
    assert rc == 0, f"training the tiny run failed (exit {rc})"
    return runs / "tiny"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path, home: Path, runs: Path):
        self.proc, self.url, self.log, self.home, self.runs = proc, url, log, home, runs

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no server log)"


@pytest.fixture(scope="module")
def server(tmp_path_factory, sync_playwright):
    """`streamlit run viewer/app.py` from the repository root on a free port, with a tiny
    trained run in its runs folder (trained while the server starts); always stopped."""
    tmp = tmp_path_factory.mktemp("browser-server")
    home, runs_dir = tmp / "home", tmp / "runs"
    home.mkdir()
    runs_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the app must find model/
    env.update(PCAM_LENS_HOME=str(home), PCAM_LENS_RUNS=str(runs_dir),
               PYTHONWARNINGS="ignore", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    port = _free_port()
    log = tmp / "streamlit.log"
    cmd = [sys.executable, "-m", "streamlit", "run", "viewer/app.py", "--server.port", str(port),
           "--server.headless", "true", "--server.fileWatcherType", "none"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(proc, f"http://127.0.0.1:{port}", log, home, runs_dir)
    try:
        t0 = time.perf_counter()
        build_tiny_run(runs_dir)
        t_train = time.perf_counter() - t0
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with code {proc.returncode} before serving:\n"
                            f"{srv.log_tail()}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{srv.url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit not healthy after {START_TIMEOUT_S} s:\n"
                            f"{srv.log_tail()}", pytrace=False)
            time.sleep(0.25)  # polling the health endpoint, nothing to wait on
        print(f"\ntiny run trained in {t_train:.1f} s; server healthy "
              f"{time.perf_counter() - t0 - t_train:.1f} s later")
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def page(sync_playwright, server):
    """One browser tab on the app, shared by the tests of this module (one Streamlit session)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.set_default_timeout(PAGE_TIMEOUT_S * 1000)
            tab.goto(server.url + "/")
            print(f"first page (Browse) rendered in "
                  f"{wait_rendered(tab, server, 'Browse patches'):.1f} s")
            yield tab
        finally:
            browser.close()


# --------------------------------------------------------------------------- helpers

# True once the app has finished a run: connected, script not running, no "Running..." status
# widget, spinner or stale element, and (if given) the expected page title shown; it must stay
# so for QUIET_MS, because a page may rerun itself (st.rerun, fragments, dialogs).
IDLE_JS = """([title, quietMs]) => {
  const app = document.querySelector("[data-testid='stApp']");
  const idle = app && app.dataset.testConnectionState === "CONNECTED"
    && app.dataset.testScriptState === "notRunning"
    && !document.querySelector("[data-testid='stStatusWidget'], [data-testid='stSpinner'], "
                               + "[data-testid='stSkeleton'], [data-stale='true']")
    && (!title || [...document.querySelectorAll("[data-testid='stMain'] h1")]
                  .some(h => h.textContent.trim() === title));
  if (!idle) { window.__pcamQuiet = null; return false; }
  window.__pcamQuiet = window.__pcamQuiet || performance.now();
  return performance.now() - window.__pcamQuiet >= quietMs;
}"""


def wait_rendered(tab, server: Server, title: str | None = None) -> float:
    """Seconds until the app has finished rendering (see IDLE_JS)."""
    t0 = time.perf_counter()
    tab.evaluate("window.__pcamQuiet = null")
    try:
        tab.wait_for_function(IDLE_JS, arg=[title, QUIET_MS], polling=100,
                              timeout=PAGE_TIMEOUT_S * 1000)
    except Exception as e:  # playwright TimeoutError: say what the page showed
        shot = ARTIFACTS / "timeout.png"
        tab.screenshot(path=str(shot), full_page=True)
        pytest.fail(f"the app did not finish rendering {title or 'the page'!r} within "
                    f"{PAGE_TIMEOUT_S} s ({type(e).__name__}); screenshot {shot}\n"
                    f"page text: {_main_text(tab)[:1500]}\nserver log:\n{server.log_tail()}",
                    pytrace=False)
    return time.perf_counter() - t0 - QUIET_MS / 1000


def _main_text(tab) -> str:
    # textContent, not innerText: also the text in collapsed expanders (folded tracebacks)
    return tab.evaluate("document.querySelector(\"[data-testid='stApp']\")?.textContent || ''")


def assert_no_error(tab, server: Server, where: str) -> None:
    n_exc = tab.locator("[data-testid='stException']").count()
    text = _main_text(tab)
    bad = [m for m in ("Traceback", "Unexpected error (", "No module named") if m in text]
    assert n_exc == 0 and not bad, (
        f"{where}: {n_exc} stException element(s), markers {bad}\n{text[:3000]}\n"
        f"server log:\n{server.log_tail()}")


def screenshot(tab, name: str) -> Path:
    """The whole page into ARTIFACTS/<name>.png. Streamlit scrolls inside stMain, so the
    window is made as tall as the content for the shot (at most 4000 px), then restored."""
    path = ARTIFACTS / f"{name}.png"
    size = tab.viewport_size
    tall = tab.evaluate("Math.max(...[...document.querySelectorAll(\"[data-testid='stMain'], "
                        "[data-testid='stMain'] > *\")].map(e => e.scrollHeight))")
    tab.set_viewport_size({"width": size["width"], "height": max(size["height"],
                                                                 min(int(tall), 4000))})
    try:
        tab.screenshot(path=str(path), animations="disabled")
    finally:
        tab.set_viewport_size(size)
    assert path.stat().st_size > 0
    return path


def goto(tab, server: Server, label: str, title: str) -> float:
    """Click `label` in the sidebar navigation and wait for the page to render."""
    nav = tab.locator("[data-testid='stSidebarNav'] a[data-testid='stSidebarNavLink']",
                      has_text=label)
    nav.first.click()
    seconds = wait_rendered(tab, server, title)
    assert_no_error(tab, server, label)
    return seconds


# --------------------------------------------------------------------------- tests


def test_every_page_renders_in_chromium(page, server):
    # app.py imported model/ (no PYTHONPATH in the server's env): model.run listed the run,
    # model.data.open opened the synthetic set
    assert_no_error(page, server, "first load")
    run = page.locator("[data-testid='stSidebar'] input[aria-label='Run']").input_value()
    assert run.startswith("tiny · complete"), run
    assert "Run: tiny" in page.locator("[data-testid='stMain']").inner_text()
    times = {}
    for label, title, name in [*PAGES[1:], PAGES[0]]:  # the app opens on Browse: end there
        times[label] = goto(page, server, label, title)
        assert page.locator("[data-testid='stMain'] h1").first.inner_text().strip() == title
        screenshot(page, name)
    print("render times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    assert "Traceback" not in server.log_tail(200_000), server.log_tail()


def test_browse_detail_shows_the_patch(page, server):
    goto(page, server, "Browse", "Browse patches")
    card = page.locator("[data-testid='stMain'] [data-testid='stImageCaption']").first
    pid = card.inner_text().split(" · ")[0].strip().rstrip("…")  # "<id> · <label> · p=..."
    assert pid, card.inner_text()
    page.locator("[data-testid='stMain']").get_by_role("button", name="details").first.click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for(state="visible")
    wait_rendered(page, server, "Browse patches")
    assert_no_error(page, server, "Browse detail")
    text = dialog.inner_text()
    assert pid in text and "Augmentation preview" in text, text
    assert dialog.locator("img").count() >= 3  # patch, Grad-CAM, augmentations
    page.screenshot(path=str(ARTIFACTS / "browse-detail.png"))  # the dialog is fixed size
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")


def test_review_decision_reaches_the_log(page, server, monkeypatch):
    from model.review.log import ReviewLog, default_log_path

    goto(page, server, "Review", "Review")
    name = page.locator("[data-testid='stSidebar'] input[aria-label='Reviewer name']")
    if name.input_value() != REVIEWER:
        name.fill(REVIEWER)
        name.press("Enter")
        page.locator("[data-testid='stMain']").get_by_text(
            f"Recording as {REVIEWER}").wait_for()
        wait_rendered(page, server, "Review")
    heading = page.locator("[data-testid='stMain'] h3", has_text="Patch ").first
    pid = heading.inner_text().strip().removeprefix("Patch ").strip()
    confirm = page.get_by_role("button", name="Confirm label")
    assert confirm.is_enabled()
    confirm.click()
    page.get_by_text("Saved decision #").wait_for()
    wait_rendered(page, server, "Review")
    assert_no_error(page, server, "Review after Confirm")
    assert heading.inner_text().strip() != f"Patch {pid}"  # the queue moved on
    screenshot(page, "review-decided")

    monkeypatch.setenv("PCAM_LENS_HOME", str(server.home))  # the synthetic set's fallback log
    log_path = default_log_path(None)
    assert log_path.is_relative_to(server.home), log_path
    hist = ReviewLog(log_path).history()
    assert len(hist) == 1, hist
    row = hist.iloc[0]
    assert (row["reviewer"], row["action"], row["run"], row["patch_id"]) == (
        REVIEWER, "confirm", "tiny", pid)



def test_review_queue_of_out_of_fold_predictions(page, server):
    """A cross-validation of the synthetic set appears in the runs folder: Review switches to
    its whole-set queue, likely label errors first, and says why the patch is there (label
    quality, the 8 TTA views with their probabilities)."""
    from model.crossval import main as crossval_main

    rc = crossval_main(["--data", "synthetic:n=96", "--no-checks", "--arch", "test_efficientnet",
                        "--no-pretrained", "--folds", "3", "--head-epochs", "2", "--device",
                        "cpu", "--run-dir", str(server.runs / "cv-synthetic")])
    assert rc == 0
    goto(page, server, "Browse", "Browse patches")
    goto(page, server, "Review", "Review")
    main = page.locator("[data-testid='stMain']")
    main.get_by_text("Why it is here").wait_for()
    text = main.inner_text()
    assert "Likely label errors" in text and "out-of-fold predictions of all 96" in text
    assert "Label quality" in text and "TTA views" in text
    assert main.get_by_text("p=").count() >= 8  # the strip of views with probabilities
    screenshot(page, "review-oof")


def test_map_box_selection_fills_the_grid(page, server):
    """Map: compute the embeddings of the synthetic set (5,000 patches), draw the PCA layout
    in WebGL, drag a box over it: the selected patches appear below."""
    goto(page, server, "Map", "Map")
    main = page.locator("[data-testid='stMain']")
    button = main.get_by_role("button", name="Compute the embeddings")
    if button.count():
        button.click()
        main.get_by_text("Colour by").wait_for(timeout=240_000)
        wait_rendered(page, server, "Map")
    assert "PCA (fast)" in main.inner_text()  # the default layout until UMAP is computed
    plot = main.locator(".js-plotly-plot .nsewdrag").first
    plot.wait_for()
    box = plot.bounding_box()
    t0 = time.perf_counter()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    main.get_by_text("Selection:").wait_for(timeout=60_000)
    wait_rendered(page, server, "Map")
    print(f"box selection to grid: {time.perf_counter() - t0:.2f} s")
    assert_no_error(page, server, "Map selection")
    assert main.get_by_role("button", name="details").count() >= 1
    screenshot(page, "map")


def test_slide_heatmap_zoom_and_a_cell_to_review(page, server, shared_data):
    """Slide: the real SVS through the background job, the heatmap over the slide, a box
    zooms in at full resolution, a box on a cell opens its patch (Grad-CAM too), and the
    patch goes to review."""
    goto(page, server, "Slide", "Slide")
    main = page.locator("[data-testid='stMain']")
    name = page.locator("[data-testid='stSidebar'] input[aria-label='Reviewer name']")
    if not name.input_value():
        name.fill(REVIEWER)
        name.press("Enter")
        wait_rendered(page, server, "Slide")
    main.get_by_text("A slide file").click()
    wait_rendered(page, server, "Slide")
    field = main.get_by_label("Slide path")
    field.fill(str(shared_data / "slides" / "CMU-1-Small-Region.svs"))
    field.press("Enter")
    wait_rendered(page, server, "Slide")
    main.get_by_role("button", name="Compute the heatmap").click()
    t0 = time.perf_counter()
    main.get_by_text("Tiles run").wait_for(timeout=240_000)  # the job finished, page reran
    print(f"slide heatmap job: {time.perf_counter() - t0:.1f} s")
    wait_rendered(page, server, "Slide")
    assert_no_error(page, server, "Slide")
    assert "731" in main.inner_text()  # tiles of the 48 x 36 grid over tissue

    def drag(plot, a: float, b: float) -> None:
        plot.scroll_into_view_if_needed()  # mouse events need it inside the viewport
        box = plot.bounding_box()
        page.mouse.move(box["x"] + box["width"] * a, box["y"] + box["height"] * a)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * b, box["y"] + box["height"] * b, steps=4)
        page.mouse.up()

    drag(main.locator(".js-plotly-plot .nsewdrag").first, 0.35, 0.55)
    main.get_by_text("Zoom: level-0 box").wait_for(timeout=60_000)
    wait_rendered(page, server, "Slide")
    drag(main.locator(".js-plotly-plot .nsewdrag").nth(1), 0.47, 0.53)
    try:
        main.get_by_text("Cell (").wait_for(timeout=60_000)
    except Exception:
        screenshot(page, "slide-timeout")
        raise
    wait_rendered(page, server, "Slide")
    assert_no_error(page, server, "Slide cell")
    assert "Grad-CAM" in main.inner_text() and "CMU-1-Small-Region.svs:L0:" in main.inner_text()
    main.get_by_role("button", name="Tumour", exact=True).click()
    main.get_by_text("Saved decision").wait_for(timeout=30_000)
    screenshot(page, "slide")
