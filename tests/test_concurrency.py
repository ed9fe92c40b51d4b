"""Concurrent reviewers on one review log (model.review.ReviewLog).

tests/test_review.py already shows that two processes writing 500 decisions each about
*different* patches lose nothing. Here two processes decide about the *same* patches,
interleaved, while a third process keeps reading: no decision is lost or doubled, `seq` gives
one total order that agrees with each writer's own order and with the recorded times, the
current decision of every patch is the non-skip decision with the highest `seq`, and the
export and `effective_labels` say exactly what `latest()` says."""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pandas as pd
import pytest

from model.review.log import ReviewLog

N_PER_WORKER = 500
N_PATCHES = 37  # prime, so that the two writers' patch sequences interleave differently
ACTIONS = ("confirm", "relabel", "flag", "skip")


def _label_of(patch: int) -> int:
    return patch % 2


def _patch_id(patch: int) -> str:
    return f"p{patch:03d}"


def _plan(worker: int, i: int) -> dict:
    """The i-th decision of `worker`: both workers cycle over the same patches."""
    patch = (i * (3 if worker == 0 else 5) + worker) % N_PATCHES
    action = ACTIONS[(i + 2 * worker) % len(ACTIONS)]
    old = _label_of(patch)
    return {"reviewer": f"dr {worker}", "run": "run-a", "patch_id": _patch_id(patch),
            "action": action, "old_label": old,
            "new_label": 1 - old if action == "relabel" else None,
            "flag_reason": "artefact" if action == "flag" else None,
            "note": f"w{worker}-{i:04d}"}


def _writer(path: str, worker: int, start) -> None:
    log = ReviewLog(path)  # both also create the schema at the same moment
    start.wait(60)
    for i in range(N_PER_WORKER):
        log.record(**_plan(worker, i))


def _reader(path: str, start, stop, out) -> None:
    """Reads while the writers write: never an error, counts never go down."""
    log = ReviewLog(path)
    start.wait(60)
    seen, reads = [], 0
    try:
        while not stop.is_set():
            n = log.stats()["n_decisions"]
            latest = log.latest()
            assert latest["patch_id"].is_unique
            seen.append(n)
            reads += 1
        out.put(("ok", reads, seen == sorted(seen), seen[-1] if seen else 0))
    except BaseException as e:  # noqa: BLE001
        out.put(("error", f"{type(e).__name__}: {e}", False, 0))


@pytest.fixture
def contested_log(fast_dir):
    """The log after two writers decided 500 times each about the same 37 patches while a
    reader read; returns (log, reader result, seconds)."""
    path = fast_dir / "review_log.sqlite"
    ctx = mp.get_context("spawn")
    start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(str(path), k, start)) for k in range(2)]
    reader = ctx.Process(target=_reader, args=(str(path), start, stop, out))
    t0 = time.monotonic()
    for p in (*writers, reader):
        p.start()
    time.sleep(0.5)
    start.set()
    try:
        for p in writers:
            p.join(120)
        stop.set()
        result = out.get(timeout=60)
        reader.join(30)
    finally:
        for p in (*writers, reader):
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in writers] == [0, 0]
    return ReviewLog(path), result, time.monotonic() - t0


def test_same_patches_from_two_processes(contested_log, tmp_path):
    log, reader, seconds = contested_log
    h = log.history()

    # nothing lost, nothing doubled
    assert len(h) == 2 * N_PER_WORKER
    assert h["seq"].is_unique and h["seq"].is_monotonic_increasing
    assert sorted(h["note"]) == sorted(f"w{k}-{i:04d}" for k in range(2)
                                       for i in range(N_PER_WORKER))
    # the rows are exactly what was asked for
    for k in range(2):
        mine = h[h["reviewer"] == f"dr {k}"]
        assert mine["note"].tolist() == [f"w{k}-{i:04d}" for i in range(N_PER_WORKER)]
        want = pd.DataFrame([_plan(k, i) for i in range(N_PER_WORKER)])
        assert mine["patch_id"].tolist() == want["patch_id"].tolist()
        assert mine["action"].tolist() == want["action"].tolist()
    # the writers really did interleave on the same patches
    both = h.groupby("patch_id")["reviewer"].nunique()
    assert (both == 2).all() and len(both) == N_PATCHES
    switches = int((h["reviewer"] != h["reviewer"].shift()).sum())
    assert switches > 10, f"the two writers hardly overlapped ({switches} switches)"
    # one total order: seq, and the times recorded under the write lock follow it
    assert h["time"].is_monotonic_increasing

    # the latest decision per patch is the non-skip one with the highest seq
    latest = log.latest()
    decided = h[h["action"] != "skip"]
    expected = decided.loc[decided.groupby("patch_id")["seq"].idxmax()].sort_values("seq")
    assert latest["patch_id"].tolist() == expected["patch_id"].tolist()
    for col in ("action", "reviewer", "note", "old_label", "new_label", "flag_reason", "time"):
        assert latest[col].tolist() == expected[col].tolist(), col
    pd.testing.assert_frame_equal(latest, log.latest())  # deterministic

    # the export says what latest() says
    out = tmp_path / "reviewed.csv"
    exported = log.export_csv(out)
    back = pd.read_csv(out, dtype={"patch_id": str, "note": str, "reviewer": str})
    assert back["patch_id"].tolist() == latest["patch_id"].tolist()
    assert back["action"].tolist() == latest["action"].tolist()
    assert back["reviewer"].tolist() == latest["reviewer"].tolist()
    assert back["note"].tolist() == latest["note"].tolist()
    final = [int(r.new_label) if r.action == "relabel" else
             (None if r.action == "flag" else int(r.old_label))
             for r in latest.itertuples()]
    got = [None if pd.isna(v) else int(v) for v in back["final_label"]]
    assert got == final
    assert len(exported) == len(back)

    # and training with --labels-from-review would see the same
    ids = [_patch_id(p) for p in range(N_PATCHES)]
    labels = np.array([_label_of(p) for p in range(N_PATCHES)])
    eff, keep = log.effective_labels(ids, labels)
    cur = latest.set_index("patch_id")
    for pid, lab, kept in zip(ids, eff, keep):
        if pid not in cur.index:
            assert kept and lab == _label_of(int(pid[1:]))
            continue
        a = cur.loc[pid, "action"]
        assert kept == (a != "flag")
        assert lab == (cur.loc[pid, "new_label"] if a == "relabel" else _label_of(int(pid[1:])))

    stats = log.stats()
    assert stats["n_decisions"] == 2 * N_PER_WORKER and stats["n_reviewers"] == 2
    assert sum(stats["latest"].values()) == len(latest)

    # the reader never failed and never saw the log shrink
    status, reads, monotonic, last = reader
    assert status == "ok", reads
    assert reads > 0 and monotonic and last <= 2 * N_PER_WORKER
    assert seconds < 30, f"took {seconds:.1f} s"
