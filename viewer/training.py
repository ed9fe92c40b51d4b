"""The "Train a demo model" button: runs `python -m model.train ... --preset quick` as a
subprocess and polls its progress.json. Training logic stays in model.train."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import streamlit as st

from model.runs.format import read_progress

REPO = Path(__file__).resolve().parent.parent
POLL_S = 2
GIVE_UP_S = 3 * 3600  # stop polling a job that has not finished after this long


@st.cache_resource(show_spinner=False)
def _jobs() -> dict:
    """Training subprocesses started by this viewer process: run_dir -> job dict."""
    return {}


def command(run_dir: Path, spec: str) -> list[str]:
    return [sys.executable, "-m", "model.train", "--run-dir", str(run_dir), "--data", spec,
            "--preset", "quick"]


def start(spec: str, root: Path) -> Path:
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir = root / name
    log = root / f"{name}.log"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(command(run_dir, spec), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    _jobs()[str(run_dir)] = {"proc": proc, "log": log, "t0": time.time(), "spec": spec}
    return run_dir


def log_tail(path: Path, n: int = 25) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    # progress bars redraw with \r: keep what the last redraw left
    lines = [ln.split("\r")[-1] for ln in text.splitlines()]
    return "\n".join(lines[-n:])


def _duration(spec: str) -> str:
    """What the wait will be, as measured (README, Results): the quick preset trains the
    5,000-patch synthetic set in 2 min 11 s on an idle 2-core CPU; real folders are read and
    checked first and take longer with their size."""
    if spec.startswith("synthetic"):
        return "about 2-3 minutes on a 2-core CPU, under a minute on a GPU"
    return ("a few minutes per 5,000 patches on a 2-core CPU (the patches are checked and read "
            "first), much less on a GPU")


def demo_button(spec: str, root: Path, key: str = "demo") -> None:
    st.caption(f"Trains `{Path(sys.executable).name} -m model.train --data {spec} --preset "
               f"quick` in the background ({_duration(spec)}; progress below).")
    if st.button("Train a demo model", key=key, type="primary", icon=":material/model_training:",
                 disabled=bool(_jobs())):
        start(spec, root)
        st.rerun()


def has_jobs() -> bool:
    return bool(_jobs())


@st.fragment(run_every=POLL_S)
def progress_panel() -> None:
    """Progress of running training jobs; when one finishes, select it and rerun the app."""

    for run_dir, job in list(_jobs().items()):
        name = Path(run_dir).name
        rc = job["proc"].poll()
        elapsed = time.time() - job["t0"]
        if rc is None and elapsed < GIVE_UP_S:
            prog = read_progress(Path(run_dir))
            done, total = prog.get("epochs_done", 0), prog.get("epochs_total")
            frac = done / total if total else 0.0
            what = f"epoch {done} of {total}" if total else "preparing (data checks, lr_find)"
            st.progress(min(frac, 1.0), text=f"Training {name}: {what} · {elapsed:.0f} s")
            last = log_tail(job["log"], 1).strip()
            if last:
                st.caption(last[-160:])
            if st.button("Stop training", key=f"stop-{name}", icon=":material/stop:"):
                job["proc"].terminate()
            continue
        del _jobs()[run_dir]
        if rc == 0:
            st.session_state["_select_run"] = name
            st.session_state["_flash"] = f"Demo model {name} trained."
            st.rerun(scope="app")
        elif rc is None:
            st.warning(f"Training {name} has run for {elapsed / 3600:.1f} h; no longer "
                       f"watching it. Log: {job['log']}")
        else:
            st.session_state["_flash_error"] = (
                f"Training {name} failed (exit code {rc}). Last lines of {job['log']}:\n\n"
                + log_tail(job["log"]))
            st.rerun(scope="app")
