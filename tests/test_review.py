"""Tests for the pathologist review log (model/review/log.py)."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.core.errors import PcamLensError
from model.review import log as review
from model.review.log import ReviewError, ReviewLog, default_log_path, review_queue


@pytest.fixture
def log(tmp_path) -> ReviewLog:
    return ReviewLog(tmp_path / "logs" / "review_log.sqlite")


def _raw(log: ReviewLog) -> sqlite3.Connection:
    return sqlite3.connect(log.path, isolation_level=None, check_same_thread=False)


# --------------------------------------------------------------------------- recording

def test_record_returns_increasing_seq_and_history_keeps_everything(log):
    s1 = log.record("Dr A", "run1", "p1", "confirm", 1, source="kaggle:/data")
    s2 = log.record("Dr A", "run1", "p2", "relabel", 1, new_label=0, note="necrosis, no tumour")
    s3 = log.record("Dr B", "run1", "p3", "flag", 0, flag_reason="out_of_focus")
    s4 = log.record("Dr B", "run2", "p1", "skip", 1)
    assert [s1, s2, s3, s4] == sorted({s1, s2, s3, s4})
    h = log.history()
    assert h["seq"].tolist() == [s1, s2, s3, s4]
    assert h["patch_id"].tolist() == ["p1", "p2", "p3", "p1"]
    assert h["action"].tolist() == ["confirm", "relabel", "flag", "skip"]
    assert h.loc[0, "source"] == "kaggle:/data"
    assert h.loc[1, "new_label"] == 0 and h.loc[1, "note"] == "necrosis, no tumour"
    assert h.loc[2, "flag_reason"] == "out_of_focus" and h.loc[2, "reviewer"] == "Dr B"
    assert pd.isna(h.loc[0, "new_label"]) and h.loc[0, "flag_reason"] is None
    assert log.history("p1")["seq"].tolist() == [s1, s4]
    assert log.history("nope").empty and list(log.history("nope").columns) == \
        review.HISTORY_COLUMNS
    # UTC ISO-8601 with microseconds
    t = h.loc[0, "time"]
    assert t.endswith("+00:00") and len(t.split(".")[1].split("+")[0]) == 6
    assert pd.Timestamp(t).tzinfo is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(reviewer="", action="confirm", old_label=1), "reviewer"),
    (dict(reviewer="   ", action="confirm", old_label=1), "reviewer"),
    (dict(reviewer="A", action="approve", old_label=1), "action"),
    (dict(reviewer="A", action="relabel", old_label=1), "new label"),
    (dict(reviewer="A", action="relabel", old_label=1, new_label=1), "changes nothing"),
    (dict(reviewer="A", action="relabel", old_label=1, new_label=2), "0 or 1"),
    (dict(reviewer="A", action="flag", old_label=1), "reason"),
    (dict(reviewer="A", action="flag", old_label=1, flag_reason="blurry"), "reason"),
    (dict(reviewer="A", action="confirm", old_label=1, new_label=0), "only valid"),
    (dict(reviewer="A", action="confirm", old_label=1, flag_reason="other"), "only valid"),
    (dict(reviewer="A", action="confirm", old_label=None), "no label"),
    (dict(reviewer="A", action="confirm", old_label="1"), "0 or 1"),
])
def test_invalid_decisions_are_refused_and_not_written(log, kwargs, match):
    with pytest.raises(ReviewError, match=match) as e:
        log.record(run="r", patch_id="p1", **kwargs)
    assert isinstance(e.value, PcamLensError) and isinstance(e.value, ValueError)
    assert log.history().empty


def test_reviewer_is_stored_as_given_and_numpy_labels_are_accepted(log):
    log.record(" dr. Ann ", "r", "p1", "relabel", np.int64(0), new_label=np.int64(1))
    log.record("x", "r", "p2", "confirm", 1.0)  # a float cell from a DataFrame
    h = log.history()
    assert h.loc[0, "reviewer"] == " dr. Ann "
    assert h["old_label"].tolist() == [0, 1] and h.loc[0, "new_label"] == 1


# --------------------------------------------------------------------------- append-only

def test_log_is_append_only_for_any_connection(log):
    log.record("A", "r", "p1", "confirm", 1)
    log.record("A", "r", "p2", "relabel", 1, new_label=0)
    before = log.history()
    con = _raw(log)
    try:
        for sql in ["UPDATE decisions SET new_label = 1 WHERE patch_id = 'p2'",
                    "UPDATE decisions SET reviewer = 'B'",
                    "DELETE FROM decisions WHERE seq = 1",
                    "DELETE FROM decisions",
                    "INSERT OR REPLACE INTO decisions (seq, time, reviewer, patch_id, action, "
                    "old_label) VALUES (1, 't', 'B', 'p1', 'skip', 1)",
                    "INSERT INTO decisions (seq, time, reviewer, patch_id, action, old_label) "
                    "VALUES (2, 't', 'B', 'p2', 'skip', 1) ON CONFLICT (seq) DO UPDATE "
                    "SET action = 'skip'"]:
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                con.execute(sql)
        # the CHECK constraints hold for direct writers too
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("INSERT INTO decisions (time, reviewer, patch_id, action) "
                        "VALUES ('t', 'B', 'p9', 'approve')")
    finally:
        con.close()
    pd.testing.assert_frame_equal(log.history(), before)


# --------------------------------------------------------------------------- latest

def test_latest_is_the_highest_seq_not_the_latest_time(log, monkeypatch):
    # clocks going backwards (NTP step, another machine): seq must still decide
    clock = iter(f"2030-01-01T00:00:{59 - i:02d}.000000+00:00" for i in range(60))
    monkeypatch.setattr(review, "_now", lambda: next(clock))
    log.record("A", "r", "p1", "confirm", 1)
    log.record("B", "r", "p1", "relabel", 1, new_label=0, note="second look")
    log.record("C", "r", "p1", "skip", 1)  # a skip never overrides a decision
    log.record("A", "r", "p2", "flag", 0, flag_reason="artefact")
    log.record("A", "r", "p2", "confirm", 0)  # un-flag by confirming
    log.record("A", "r", "p3", "skip", 0)  # only skipped: not in latest
    log.record("B", "r", "p4", "relabel", 0, new_label=1)
    log.record("B", "r", "p4", "flag", 0, flag_reason="no_tissue")
    lt = log.latest()
    assert list(lt.columns) == review.LATEST_COLUMNS
    assert lt["patch_id"].is_unique
    got = lt.set_index("patch_id")
    assert set(got.index) == {"p1", "p2", "p4"}
    assert got.loc["p1", "action"] == "relabel" and got.loc["p1", "new_label"] == 0
    assert got.loc["p1", "reviewer"] == "B" and got.loc["p1", "note"] == "second look"
    assert got.loc["p2", "action"] == "confirm"
    assert got.loc["p4", "action"] == "flag" and got.loc["p4", "flag_reason"] == "no_tissue"
    # same answer every time
    pd.testing.assert_frame_equal(log.latest(), lt)


def test_reviewed_ids_include_skips_and_filter_by_run(log):
    log.record("A", "run1", "p1", "skip", 1)
    log.record("A", "run1", "p2", "confirm", 1)
    log.record("A", "run2", "p3", "flag", 0, flag_reason="other")
    assert log.reviewed_ids() == {"p1", "p2", "p3"}
    assert log.reviewed_ids("run1") == {"p1", "p2"}
    assert log.reviewed_ids("run3") == set()


def test_effective_labels(log):
    ids = ["a", "b", "c", "d", "e"]
    labels = np.array([1, 0, 1, 0, 1])
    log.record("A", "r", "a", "relabel", 1, new_label=0)
    log.record("A", "r", "b", "flag", 0, flag_reason="artefact")
    log.record("A", "r", "c", "confirm", 1)
    log.record("A", "r", "d", "relabel", 0, new_label=1)
    log.record("A", "r", "d", "skip", 1)  # skip does not undo the relabel
    log.record("A", "r", "zz", "relabel", 1, new_label=0)  # not in this set: ignored
    out, keep = log.effective_labels(ids, labels)
    assert out.tolist() == [0, 0, 1, 1, 1]
    assert keep.tolist() == [True, False, True, True, True]
    assert out.dtype == np.int64 and keep.dtype == bool
    assert labels.tolist() == [1, 0, 1, 0, 1]  # input not modified
    # a later decision replaces an earlier one
    log.record("A", "r", "b", "confirm", 0)
    log.record("A", "r", "a", "relabel", 0, new_label=1)
    out, keep = log.effective_labels(ids, labels)
    assert out.tolist() == [1, 0, 1, 1, 1] and keep.all()
    with pytest.raises(ReviewError):
        log.effective_labels(ids, labels[:3])


def test_effective_labels_on_an_empty_log(log):
    out, keep = log.effective_labels(["a", "b"], [0, 1])
    assert out.tolist() == [0, 1] and keep.tolist() == [True, True]


# --------------------------------------------------------------------------- export, stats

def test_export_csv_round_trip(log, tmp_path):
    log.record("A", "r", "p1", "confirm", 1, note='says "tumour", clearly')
    log.record("A", "r", "p2", "relabel", 1, new_label=0, note="line one\nline two")
    log.record("B", "r", "p3", "flag", 0, flag_reason="no_tissue")
    log.record("B", "r", "p4", "skip", 0)
    log.record("B", "r", "p1", "relabel", 1, new_label=0)  # p1: latest wins
    out = tmp_path / "export" / "reviewed_labels.csv"
    df = log.export_csv(out)
    assert list(df.columns) == review.EXPORT_COLUMNS
    assert df["patch_id"].tolist() == ["p2", "p3", "p1"]  # one row per patch, p4 skipped
    back = pd.read_csv(out, dtype={"patch_id": str, "note": str, "flag_reason": str},
                       keep_default_na=False, na_values={"final_label": [""]})
    assert back["patch_id"].tolist() == df["patch_id"].tolist()
    final = dict(zip(back["patch_id"], back["final_label"]))
    assert final["p1"] == 0 and final["p2"] == 0 and pd.isna(final["p3"])  # flagged: no label
    assert back.set_index("patch_id").loc["p3", "flag_reason"] == "no_tissue"
    assert back.set_index("patch_id").loc["p2", "note"] == "line one\nline two"
    assert back["time"].tolist() == df["time"].tolist()
    assert back["reviewer"].tolist() == ["A", "B", "B"]
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temp files left


def test_export_of_an_empty_log_has_the_header(log, tmp_path):
    df = log.export_csv(tmp_path / "e.csv")
    assert df.empty
    assert (tmp_path / "e.csv").read_text().strip() == ",".join(review.EXPORT_COLUMNS)


def test_stats(log):
    assert log.stats()["n_decisions"] == 0
    log.record("A", "r", "p1", "confirm", 1)
    log.record("A", "r", "p1", "relabel", 1, new_label=0)
    log.record("B", "r", "p2", "flag", 0, flag_reason="artefact")
    log.record("C", "r", "p3", "skip", 0)
    s = log.stats()
    assert s["n_decisions"] == 4
    assert s["actions"] == {"confirm": 1, "relabel": 1, "flag": 1, "skip": 1}
    assert s["latest"] == {"confirm": 0, "relabel": 1, "flag": 1}
    assert s["n_patches"] == 3 and s["n_reviewers"] == 3


# --------------------------------------------------------------------------- the file

def test_survives_reopen(tmp_path):
    path = tmp_path / "review_log.sqlite"
    first = ReviewLog(path)
    first.record("A", "r", "p1", "relabel", 1, new_label=0)
    first.record("A", "r", "p2", "flag", 1, flag_reason="artefact")
    del first
    again = ReviewLog(path)
    assert again.history()["patch_id"].tolist() == ["p1", "p2"]
    seq = again.record("B", "r", "p3", "confirm", 0)
    assert seq == 3
    assert ReviewLog(path).stats()["n_decisions"] == 3
    own = again._connect()
    try:  # every connection commits durably and waits for a busy lock
        assert own.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert own.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    finally:
        own.close()
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                           ).fetchone()[0] == "1"
    finally:
        con.close()


def test_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "review_log.sqlite"
    ReviewLog(path).record("A", "r", "p1", "confirm", 1)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(PcamLensError, match="schema version 2.*newer") as e:
        ReviewLog(path)
    assert e.value.path == str(path) and e.value.fix
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                           ).fetchone()[0] == "2"
        assert con.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 1
    finally:
        con.close()


def test_a_file_that_is_not_a_log_is_a_clear_error(tmp_path):
    path = tmp_path / "review_log.sqlite"
    path.write_bytes(b"this is not sqlite at all " * 100)
    with pytest.raises(PcamLensError, match="not a readable review log") as e:
        ReviewLog(path)
    assert e.value.fix



@pytest.mark.parametrize("lock_folder", [False, True], ids=["file-read-only", "folder-read-only"])
def test_a_log_that_cannot_be_written_opens_read_only(tmp_path, lock_folder):
    """A colleague's log on a read-only share: everything can be read, nothing written, and
    the file is left byte-for-byte as it was."""
    folder = tmp_path / "share"
    path = folder / "review_log.sqlite"
    w = ReviewLog(path)
    w.record("A", "r", "p1", "relabel", 1, new_label=0)
    w.record("A", "r", "p2", "flag", 0, flag_reason="no_tissue")
    w.record("B", "r", "p1", "confirm", 0)
    expected = w.history()
    con = _raw(w)  # checkpoint the WAL into the main file, as a closed log would be
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    for extra in ("-wal", "-shm"):
        Path(f"{path}{extra}").unlink(missing_ok=True)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    path.chmod(0o444)
    if lock_folder:
        folder.chmod(0o555)
    try:
        ro = ReviewLog(path)
        assert ro.read_only
        pd.testing.assert_frame_equal(ro.history(), expected)
        assert ro.latest().set_index("patch_id")["action"].to_dict() == {
            "p1": "confirm", "p2": "flag"}
        assert ro.stats()["n_decisions"] == 3
        with pytest.raises(review.StorageError, match="read-only") as e:
            ro.record("C", "r", "p3", "confirm", 1)
        assert e.value.fix
        if lock_folder:  # (a writable folder gets SQLite's usual -wal/-shm companions)
            assert sorted(p.name for p in folder.iterdir()) == ["review_log.sqlite"]
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert ReviewLog(path).record("C", "r", "p3", "confirm", 1) == 4  # writable again


def test_read_only_open_of_a_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(PcamLensError, match="no review log") as e:
        ReviewLog(tmp_path / "nope.sqlite", read_only=True)
    assert e.value.fix
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.close()
    with pytest.raises(PcamLensError, match="not a pcam-lens review log"):
        ReviewLog(other, read_only=True)

# --------------------------------------------------------------------------- concurrency

N_PER_WORKER = 500


def _worker(path: str, name: str, n: int, start) -> None:
    from model.review.log import ReviewLog as Log

    log = Log(path)  # both processes also create the schema at the same time
    start.wait(30)
    for i in range(n):
        log.record(name, "run", f"{name}-{i:04d}", "relabel" if i % 2 else "confirm", 1,
                   new_label=0 if i % 2 else None)


def test_two_processes_writing_at_once_lose_nothing(fast_dir):
    path = fast_dir / "shared" / "review_log.sqlite"
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(str(path), f"w{k}", N_PER_WORKER, start))
             for k in range(2)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    time.sleep(0.5)  # let both import and open the log
    start.set()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    h = ReviewLog(path).history()
    assert len(h) == 2 * N_PER_WORKER
    assert h["seq"].is_unique and h["seq"].is_monotonic_increasing
    assert h["patch_id"].is_unique
    for k in range(2):
        mine = h[h["reviewer"] == f"w{k}"]
        assert len(mine) == N_PER_WORKER
        # each process's own decisions are in the order it made them
        assert mine["patch_id"].tolist() == [f"w{k}-{i:04d}" for i in range(N_PER_WORKER)]
    assert time.monotonic() - t0 < 60


def test_threads_sharing_one_log_object(log):
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(40):
                log.record(f"t{k}", "r", f"t{k}-{i}", "skip", 0)
                log.latest()  # reads interleaved with writes
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    h = log.history()
    assert len(h) == 160 and h["seq"].is_unique


def test_a_locked_log_is_retried_until_free(log, monkeypatch):
    # a short busy timeout forces the retry loop to do the waiting
    monkeypatch.setattr(review, "BUSY_TIMEOUT_S", 0.02)
    monkeypatch.setattr(review, "MAX_ATTEMPTS", 50)  # far more than 0.3 s of retrying
    con = _raw(log)
    con.execute("BEGIN EXCLUSIVE")  # another writer holds the lock ...
    timer = threading.Timer(0.3, con.execute, args=("COMMIT",))  # ... for 0.3 s
    timer.start()
    try:
        t0 = time.monotonic()
        seq = log.record("A", "r", "p1", "confirm", 1)
        assert time.monotonic() - t0 >= 0.2
    finally:
        timer.join()
        con.close()
    assert seq == 1 and len(log.history()) == 1


def test_a_log_locked_for_good_gives_a_clear_error(log, monkeypatch):
    monkeypatch.setattr(review, "BUSY_TIMEOUT_S", 0.01)
    monkeypatch.setattr(review, "MAX_ATTEMPTS", 3)
    con = _raw(log)
    con.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(PcamLensError, match="locked"):
            log.record("A", "r", "p1", "confirm", 1)
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert log.history().empty


# --------------------------------------------------------------------------- where the log lives

def _key(p: Path) -> str:
    return hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:16]


def test_log_lives_beside_writable_data_and_probe_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PCAM_LENS_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    data.mkdir()
    assert default_log_path(data) == data / ".pcam-lens" / "review_log.sqlite"
    assert list(data.iterdir()) == []  # the probe file is gone, nothing created
    assert default_log_path(data, writable=lambda d: True) == \
        data / ".pcam-lens" / "review_log.sqlite"


def test_read_only_data_falls_back_to_pcam_lens_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PCAM_LENS_HOME", str(home))
    data = tmp_path / "data"
    data.mkdir()
    seen = []
    path = default_log_path(data, writable=lambda d: seen.append(d) or False)
    assert seen == [data]
    assert path == home / "reviews" / _key(data) / "review_log.sqlite"
    # the fallback is usable
    ReviewLog(path).record("A", "r", "p1", "confirm", 1)
    assert not (data / ".pcam-lens").exists()
    # two data folders never share a fallback log
    other = tmp_path / "other"
    other.mkdir()
    assert default_log_path(other, writable=lambda d: False).parent != path.parent


def test_real_probe_detects_an_unwritable_log_folder(tmp_path, monkeypatch):
    # works as root too: a *file* named .pcam-lens cannot hold the log
    home = tmp_path / "home"
    monkeypatch.setenv("PCAM_LENS_HOME", str(home))
    data = tmp_path / "data"
    data.mkdir()
    (data / ".pcam-lens").write_text("not a folder")
    assert default_log_path(data) == home / "reviews" / _key(data) / "review_log.sqlite"
    # data root that is not a folder at all (its parent is a file)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    gone = blocker / "data"
    assert default_log_path(gone) == home / "reviews" / _key(gone) / "review_log.sqlite"


def test_read_only_data_dir_with_chmod(tmp_path, monkeypatch):
    """A folder with no write bit is read-only for pcam-lens even when this process could
    write there anyway (root): the log goes to the per-user folder."""
    home = tmp_path / "home"
    monkeypatch.setenv("PCAM_LENS_HOME", str(home))
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    try:
        assert default_log_path(data) == home / "reviews" / _key(data) / "review_log.sqlite"
    finally:
        data.chmod(0o755)


def test_synthetic_data_uses_the_per_user_log(tmp_path, monkeypatch):
    monkeypatch.setenv("PCAM_LENS_HOME", str(tmp_path / "home"))
    assert default_log_path(None) == tmp_path / "home" / "reviews" / "synthetic" / \
        "review_log.sqlite"
    monkeypatch.delenv("PCAM_LENS_HOME")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_log_path(None) == tmp_path / "user" / ".local" / "share" / "pcam-lens" / \
        "reviews" / "synthetic" / "review_log.sqlite"


def test_an_existing_fallback_log_is_not_hidden_when_data_becomes_writable(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("PCAM_LENS_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    data.mkdir()
    fallback = default_log_path(data, writable=lambda d: False)
    ReviewLog(fallback).record("A", "r", "p1", "relabel", 1, new_label=0)
    assert default_log_path(data, writable=lambda d: True) == fallback
    # but a log beside the data, once it exists, is the one used
    ReviewLog(data / ".pcam-lens" / "review_log.sqlite")
    assert default_log_path(data, writable=lambda d: True) == \
        data / ".pcam-lens" / "review_log.sqlite"


def test_a_single_file_data_root_puts_the_log_beside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PCAM_LENS_HOME", str(tmp_path / "home"))
    h5 = tmp_path / "camelyonpatch_level_2_split_test_x.h5"
    h5.write_bytes(b"")
    assert default_log_path(h5) == tmp_path / ".pcam-lens" / "review_log.sqlite"


# --------------------------------------------------------------------------- the queue

@pytest.fixture
def preds() -> pd.DataFrame:
    return pd.DataFrame({
        "id":    ["a", "b", "c", "d", "e", "f"],
        "label": [0, 1, 1, 0, 1, 0],
        "prob":  [0.9, 0.2, 0.45, 0.55, 0.99, 0.01],
        "loss":  [2.3, 1.6, 0.8, 0.8, 0.01, 0.01],
    }).sample(frac=1.0, random_state=3)  # row order must not matter


def test_queue_top_losses(preds):
    q, done, total = review_queue(preds, "top_losses")
    assert q["id"].tolist() == ["a", "b", "c", "d", "e", "f"]  # ties broken by id
    assert (done, total) == (0, 6)


def test_queue_uncertain(preds):
    q, _, _ = review_queue(preds, "uncertain")
    assert q["id"].tolist()[:2] == ["c", "d"]  # |p-0.5| = 0.05, then by loss, then id
    assert q["id"].tolist() == ["c", "d", "b", "a", "e", "f"]


def test_queue_false_negatives_first(preds):
    q, _, _ = review_queue(preds, "false_negatives_first")
    # label 1 & prob < 0.5: b (loss 1.6), c (0.8); then the rest by loss
    assert q["id"].tolist() == ["b", "c", "a", "d", "e", "f"]


def test_queue_excludes_reviewed_and_reports_progress(preds, log):
    log.record("A", "r", "a", "confirm", 0)
    log.record("A", "r", "c", "skip", 1)
    log.record("A", "r", "not-in-this-run", "confirm", 1)
    q, done, total = review_queue(preds, "top_losses", log.reviewed_ids())
    assert q["id"].tolist() == ["b", "d", "e", "f"]
    assert (done, total) == (2, 6)
    # rows keep their columns and original index
    assert set(q.columns) == set(preds.columns)
    assert preds.loc[q.index, "id"].tolist() == q["id"].tolist()


def test_queue_validates_its_input(preds):
    with pytest.raises(ReviewError, match="order"):
        review_queue(preds, "random")
    with pytest.raises(ReviewError, match="label"):
        review_queue(preds.drop(columns=["label"]), "false_negatives_first")
    q, done, total = review_queue(preds, "top_losses", reviewed=set(preds["id"]))
    assert q.empty and (done, total) == (6, 6)


def test_fallback_locations_share_one_key_even_for_non_utf8_paths(tmp_path, monkeypatch):
    """The review log's and the pack's per-user folders name a data folder by the same key
    (model.core.paths.path_key), also when its path is not valid UTF-8 (which used to crash
    the review log's fallback)."""
    import os

    from model.core.paths import path_key
    from model.data.pack import fallback_pack_dir

    monkeypatch.setenv("PCAM_LENS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PCAM_LENS_CACHE", str(tmp_path / "cache"))
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/data-\xff"))
    odd.mkdir()
    log = review.fallback_log_path(odd)
    key = path_key(odd)
    assert log == tmp_path / "home" / "reviews" / key / "review_log.sqlite"
    assert fallback_pack_dir(odd, "train").parent.name == key
    assert path_key(tmp_path) != key
