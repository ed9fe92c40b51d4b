"""Background jobs of the viewer: a `python -m model.<tool> ... --progress-file F` subprocess
per job, watched through its progress file (model.core.progress). The page starts a job and
draws `panel(key)` (a fragment that polls); the work itself stays in the model CLI, so a
job survives a browser reload and never blocks the viewer's own process."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import streamlit as st

from model.core.progress import read_progress_file
from viewer.training import log_tail

REPO = Path(__file__).resolve().parent.parent
POLL_S = 1.5


@st.cache_resource(show_spinner=False)
def _jobs() -> dict:
    """key -> {"proc", "log", "progress", "t0", "what"} for this viewer process."""
    return {}


def running(key: str) -> bool:
    job = _jobs().get(key)
    return job is not None and job["proc"].poll() is None


def start(key: str, module: str, args: list[str], what: str) -> None:
    """Start `python -m <module> <args> --progress-file F --no-progress` in the background."""
    if running(key):
        return
    folder = Path(tempfile.mkdtemp(prefix="pcam-lens-job-"))
    log, progress = folder / "job.log", folder / "progress.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", module, *args, "--progress-file", str(progress),
           "--no-progress"]
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    _jobs()[key] = {"proc": proc, "log": log, "progress": progress, "t0": time.time(),
                    "what": what, "cmd": cmd}


def _bar(job: dict) -> None:
    p = read_progress_file(job["progress"])
    elapsed = time.time() - job["t0"]
    done, total = p.get("done", 0), p.get("total") or 0
    if total:
        eta = p.get("eta_s")
        st.progress(min(done / total, 1.0),
                    text=f"{job['what']}: {done:,} of {total:,} {p.get('what', '')} · "
                         f"{p.get('rate', 0):.0f}/s · "
                         + (f"{eta:.0f} s left" if eta is not None else "") )
    else:
        st.progress(0.0, text=f"{job['what']}: starting ({elapsed:.0f} s; reading, "
                              "finding tissue, loading the model)")


@st.fragment(run_every=POLL_S)
def panel(key: str) -> None:
    """The job's progress bar while it runs; when it ends, rerun the page (success) or
    show the end of its log (failure)."""
    job = _jobs().get(key)
    if job is None:
        return
    rc = job["proc"].poll()
    if rc is None:
        _bar(job)
        if st.button("Stop", key=f"stop-{key}", icon=":material/stop:"):
            job["proc"].terminate()
        return
    del _jobs()[key]
    if rc == 0:
        st.rerun(scope="app")
    tail = log_tail(job["log"], 12)
    errors = [ln for ln in tail.splitlines() if ln.startswith("error:")]
    st.session_state[f"job-error-{key}"] = (errors[-1] if errors else
                                            f"{job['what']} failed (exit code {rc}):\n\n{tail}")
    st.rerun(scope="app")


def last_error(key: str) -> str | None:
    return st.session_state.pop(f"job-error-{key}", None)
