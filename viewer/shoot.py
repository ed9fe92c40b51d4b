"""Screenshot every page of the viewer in headless Chromium (a development helper).

    python -m viewer.shoot --out /tmp/shots [--data /path --kind kaggle] [--runs runs]
                           [--run NAME] [--port 8599] [--chromium /usr/bin/chromium]

Starts `streamlit run viewer/app.py` with a private PCAM_LENS_HOME (the settings in it choose
the data source and run), opens each page, waits until Streamlit has finished running, saves
<out>/<page>.png and prints how long each page took to render, and the viewer process's
resident memory after each page and at its peak (Linux /proc: VmRSS, VmHWM), with a JSON copy
in <out>/shoot.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model.core.runtime import process_memory_mb  # noqa: E402

PAGES = ["browse", "dataset", "map", "runs", "metrics", "gradcam", "review", "inference",
         "slide"]


def wait_idle(page, timeout_s: float = 120.0) -> float:
    """Seconds until the app stops running (status widget gone, no spinner, content shown)."""
    t0 = time.perf_counter()
    page.wait_for_selector("[data-testid='stMain']", timeout=timeout_s * 1000)
    quiet_since = None
    while time.perf_counter() - t0 < timeout_s:
        busy = page.locator("[data-testid='stStatusWidget'], [data-testid='stSpinner'], "
                            "[data-testid='stSkeleton']").count() > 0
        has_title = page.locator("h1").count() > 0
        if not busy and has_title:
            quiet_since = quiet_since or time.perf_counter()
            if time.perf_counter() - quiet_since > 0.3:
                return quiet_since - t0
        else:
            quiet_since = None
        time.sleep(0.05)
    return float("nan")


def time_paging(page, n: int) -> None:
    """Click Next n times; print the time until the new page's images are all loaded."""
    times = []
    for _ in range(n):
        first_img = page.locator("[data-testid='stImage'] img").first.get_attribute("src")
        t0 = time.perf_counter()
        page.get_by_role("button", name="Next").click()
        page.wait_for_function(
            "old => { const imgs = [...document.querySelectorAll(\"[data-testid='stImage'] img\")];"
            " return imgs.length > 0 && imgs[0].getAttribute('src') !== old"
            " && imgs.every(i => i.complete && i.naturalWidth > 0); }",
            arg=first_img, timeout=60000, polling=20)
        times.append(time.perf_counter() - t0)
        wait_idle(page)
    print("browse paging (click Next -> all 48 images shown):",
          ", ".join(f"{t:.2f} s" for t in times))


def time_map(page, rounds: int) -> dict:
    """Map page in one browser session: sidebar click -> every WebGL trace drawn and the app
    idle, then a box drag over the middle of the map -> the selection grid shown. Seconds."""
    nav = page.locator("[data-testid='stSidebarNavLink']")
    out = {"open_s": [], "select_s": []}
    for _ in range(rounds):
        nav.filter(has_text="Browse").first.click()
        wait_idle(page)
        t0 = time.perf_counter()
        nav.filter(has_text="Map").first.click()
        page.wait_for_selector(".js-plotly-plot .nsewdrag", timeout=120000)
        page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')]"
                               ".some(p => p._fullData && p._fullData.length > 0)",
                               timeout=120000, polling=20)
        out["open_s"].append(time.perf_counter() - t0 + wait_idle(page))
        box = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
        t0 = time.perf_counter()
        page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6,
                        steps=6)
        page.mouse.up()
        page.get_by_text("Selection:").wait_for(timeout=120000)
        page.wait_for_function(
            "() => { const imgs = [...document.querySelectorAll(\"[data-testid='stImage'] img\")];"
            " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
            timeout=120000, polling=20)
        out["select_s"].append(time.perf_counter() - t0)
        wait_idle(page)
    print("map: open (nav click -> points drawn, app idle):",
          ", ".join(f"{t:.2f} s" for t in out["open_s"]),
          "| box selection -> grid of patches:", ", ".join(f"{t:.2f} s" for t in out["select_s"]))
    return out


def start_server(port: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamlit", "run", "viewer/app.py", "--server.port", str(port),
           "--server.headless", "true"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/_stcore/health"
    for _ in range(120):
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("streamlit did not start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/shots"))
    ap.add_argument("--data", default="", help="data path (empty: the synthetic set)")
    ap.add_argument("--kind", default="path", help="sidebar source kind for --data")
    ap.add_argument("--split", default="train")
    ap.add_argument("--runs", default=str(REPO / "runs"))
    ap.add_argument("--run", default=None, help="run name (default: newest)")
    ap.add_argument("--reviewer", default="")
    ap.add_argument("--port", type=int, default=8599)
    ap.add_argument("--pages", nargs="*", default=PAGES)
    ap.add_argument("--prefix", default="")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--paging", type=int, default=0,
                    help="on Browse, click Next this many times and time each page")
    ap.add_argument("--map-timing", type=int, default=0,
                    help="after the pages, time opening the Map page and a box selection N times")
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="pcam-lens-shoot-"))
    settings = {"source_kind": args.kind if args.data else "synthetic", "path": args.data,
                "split": args.split, "run": args.run, "runs_root": None,
                "checkpoint": "best", "reviewer": args.reviewer}
    (home / "viewer.json").write_text(json.dumps(settings))
    env = {**os.environ, "PCAM_LENS_HOME": str(home), "PCAM_LENS_RUNS": args.runs,
           "PYTHONWARNINGS": "ignore"}
    args.out.mkdir(parents=True, exist_ok=True)
    proc = start_server(args.port, env)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            report = {"data": args.data or "synthetic", "pages": {}}
            for name in args.pages:
                # the default page (Browse) lives at the root URL
                page.goto(f"http://127.0.0.1:{args.port}/{'' if name == 'browse' else name}")
                first = wait_idle(page)
                page.reload()  # second visit: caches warm, as a user sees it when paging
                warm = wait_idle(page)
                shot = args.out / f"{args.prefix}{name}.png"
                page.screenshot(path=str(shot), full_page=True)
                mem = process_memory_mb(proc.pid)
                report["pages"][name] = {"first_s": first, "warm_s": warm, **mem}
                print(f"{name:10s} first {first:6.2f} s  warm {warm:6.2f} s  "
                      f"RSS {mem.get('rss_mb', float('nan')):6.0f} MB  -> {shot}")
                if name == "browse" and args.paging:
                    time_paging(page, args.paging)
            if args.map_timing:
                report["map_timing"] = time_map(page, args.map_timing)
                page.screenshot(path=str(args.out / f"{args.prefix}map-selection.png"),
                                full_page=True)
            browser.close()
        report["viewer_peak_rss_mb"] = process_memory_mb(proc.pid).get("peak_rss_mb")
        print(f"viewer process peak RSS: {report['viewer_peak_rss_mb']:.0f} MB")
        (args.out / "shoot.json").write_text(json.dumps(report, indent=1))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
