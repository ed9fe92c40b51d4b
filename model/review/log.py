"""The pathologist review log: an append-only record of decisions about patches.

A pathologist looks at the model's top losses in the viewer and, per patch, confirms the label,
relabels it, flags the patch as unusable (artefact, out of focus, no tissue, other) or skips it.
Every decision is appended to a SQLite file; nothing is ever updated or deleted, so the log is
also the audit trail (who decided what, when, looking at which run). The current state of a
patch is its latest non-skip decision (highest `seq`).

Storage and why it is SQLite:

- One file, stdlib only, transactional. Each decision is its own short `BEGIN IMMEDIATE`
  transaction, committed at once with `synchronous=FULL`, so a decision the viewer has
  acknowledged survives a crash or a power cut.
- WAL journal mode: readers (the viewer re-running its script) never block the writer and the
  writer never blocks readers. Two viewer sessions (two browser tabs, two pathologists on one
  server, Streamlit's script threads) may write at the same time: SQLite serialises them, the
  busy timeout (10 s) waits for the lock, and a bounded retry loop with jittered backoff covers
  the cases where SQLite gives up early. No decision is lost or doubled.
- A connection is opened per call and closed afterwards, so a `ReviewLog` object can be shared
  between threads and processes freely.
- WAL needs shared memory between the processes that use the file: keep the log on a local
  disk, not on a network share (NFS/SMB).

Append-only is enforced in the file itself: triggers abort any UPDATE or DELETE of a decision
(and an `INSERT OR REPLACE` over an existing one), whoever opens the file. This protects the
history against mistakes, not against someone who can rewrite the file: it is not tamper-proof,
and `reviewer` is a name typed by the user, not an authenticated identity.

Where the log lives (`default_log_path`): beside the data, in `<data>/.pcam-lens/`, so that
the decisions travel with the patches they are about and every run on that data sees them.
When the data folder cannot be written (a read-only mount, a shared archive, someone else's
folder) or there is no folder (the built-in synthetic set), the log goes to a per-user folder
keyed by the data path instead, so reviewing still works and two data sets never share a log.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from model.core.atomic import can_create_files, marked_read_only, write_csv
from model.core.errors import PcamLensError, StorageError
from model.core.paths import DATA_SUBDIR, HOME_ENV, path_key, user_data_base

SCHEMA_VERSION = 1
LOG_NAME = "review_log.sqlite"
ACTIONS = ("confirm", "relabel", "flag", "skip")
FLAG_REASONS = ("artefact", "out_of_focus", "no_tissue", "other")
QUEUE_ORDERS = ("top_losses", "uncertain", "false_negatives_first", "label_errors", "spread")

BUSY_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 5  # each waits up to BUSY_TIMEOUT_S: a writer gives up after about 50 s
_BACKOFF_BASE_S = 0.02
_BACKOFF_CAP_S = 1.0

HISTORY_COLUMNS = ["seq", "time", "reviewer", "run", "source", "patch_id", "action",
                   "old_label", "new_label", "flag_reason", "note"]
LATEST_COLUMNS = ["patch_id", "action", "old_label", "new_label", "flag_reason", "reviewer",
                  "time", "note", "run"]
EXPORT_COLUMNS = ["patch_id", "final_label", "old_label", "action", "flag_reason", "reviewer",
                  "time", "note"]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    time        TEXT NOT NULL,
    reviewer    TEXT NOT NULL CHECK (length(trim(reviewer)) > 0),
    run         TEXT NOT NULL DEFAULT '',
    source      TEXT NOT NULL DEFAULT '',
    patch_id    TEXT NOT NULL CHECK (length(patch_id) > 0),
    action      TEXT NOT NULL CHECK (action IN ({", ".join(f"'{a}'" for a in ACTIONS)})),
    old_label   INTEGER CHECK (old_label IS NULL OR old_label IN (0, 1)),
    new_label   INTEGER CHECK (new_label IS NULL OR new_label IN (0, 1)),
    flag_reason TEXT CHECK (flag_reason IS NULL OR flag_reason IN
                            ({", ".join(f"'{r}'" for r in FLAG_REASONS)})),
    note        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS decisions_patch ON decisions (patch_id, seq);
CREATE TRIGGER IF NOT EXISTS decisions_no_update BEFORE UPDATE ON decisions
BEGIN
    SELECT RAISE(ABORT, 'the review log is append-only: decisions cannot be changed');
END;
CREATE TRIGGER IF NOT EXISTS decisions_no_delete BEFORE DELETE ON decisions
BEGIN
    SELECT RAISE(ABORT, 'the review log is append-only: decisions cannot be deleted');
END;
-- INSERT OR REPLACE deletes the old row without firing DELETE triggers: refuse it too.
CREATE TRIGGER IF NOT EXISTS decisions_no_replace BEFORE INSERT ON decisions
WHEN EXISTS (SELECT 1 FROM decisions WHERE seq = NEW.seq)
BEGIN
    SELECT RAISE(ABORT, 'the review log is append-only: decisions cannot be replaced');
END;
"""


class ReviewError(PcamLensError, ValueError):
    """An invalid decision (bad action, missing reviewer, relabel to the same label, ...)."""


# --------------------------------------------------------------------------- where the log lives

def _dir_is_writable(data_dir: Path) -> bool:
    """True when the review log can be created and written beside the data.

    This really creates (and removes) a probe file: `os.access` is wrong for root, for ACLs
    and for some network file systems. SQLite also needs to create `-wal`/`-shm` files next
    to the log, so the folder must be writable, not just the log file."""

    sub = data_dir / DATA_SUBDIR
    target = sub if sub.exists() else data_dir
    if not target.is_dir() or marked_read_only(data_dir):
        return False
    log = sub / LOG_NAME
    if log.exists() and not os.access(log, os.R_OK | os.W_OK):
        return False

    return can_create_files(target)


def _log_is_writable(log: Path) -> bool:
    """Can this process append to the existing log `log`? SQLite writes the file and creates
    `-wal`/`-shm`/journal files beside it, so both must be possible."""

    folder = log.parent
    if marked_read_only(folder) or not (log.stat().st_mode & 0o222):
        return False
    return os.access(log, os.W_OK) and can_create_files(folder)


def fallback_log_path(data_root: Path | None) -> Path:
    """The per-user log for `data_root`: `$PCAM_LENS_HOME/reviews/<key>/review_log.sqlite`,
    with `PCAM_LENS_HOME` defaulting to `~/.local/share/pcam-lens` (or `$XDG_DATA_HOME/
    pcam-lens`). `<key>` is the first 16 hex digits of the SHA-1 of the resolved data path,
    or `synthetic` for the built-in synthetic set."""
    if data_root is None:
        key = "synthetic"
    else:
        key = path_key(data_root)
    return user_data_base() / "reviews" / key / LOG_NAME


def default_log_path(data_root: Path | None, *,
                     writable: Callable[[Path], bool] | None = None) -> Path:
    """Where the review log for the data at `data_root` lives.

    - `<data_root>/.pcam-lens/review_log.sqlite` when the data folder is writable: the
      decisions stay with the data they describe, whichever run or machine looks at it.
    - otherwise (read-only data, or `data_root` None for the synthetic set) the per-user
      `fallback_log_path(data_root)`, so reviewing still works.
    - a fallback log that already exists wins over a beside-the-data log that does not yet:
      decisions made while the data was read-only are not hidden once it becomes writable.

    `writable(folder) -> bool` replaces the real probe (for tests). Nothing is created here
    except a probe file that is removed at once."""
    if data_root is None:
        return fallback_log_path(None)
    root = Path(data_root).expanduser()
    if root.is_file():  # e.g. one .h5 file: the log goes beside it
        root = root.parent
    primary = root / DATA_SUBDIR / LOG_NAME
    fallback = fallback_log_path(root)
    if not primary.exists() and fallback.exists():
        return fallback
    probe = writable or _dir_is_writable
    return primary if probe(root) else fallback


# --------------------------------------------------------------------------- helpers

def _now() -> str:
    """UTC ISO-8601 with microseconds, e.g. 2024-05-01T12:34:56.123456+00:00."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _is_busy(e: BaseException) -> bool:
    msg = str(e).lower()
    return isinstance(e, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


def _label(value, name: str, *, allow_none: bool) -> int | None:
    """0/1 from an int, a numpy integer or an integral float (a pandas cell); None/NaN/NA
    mean "no label"."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating))
                                           and np.isnan(value)):
        if allow_none:
            return None
        raise ReviewError(f"{name} is missing.", fix=f"Pass {name} as 0 or 1.")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ReviewError(f"{name} must be the integer 0 or 1, not {value!r}.",
                          fix=f"Pass {name} as 0 or 1.")
    if int(value) not in (0, 1):
        raise ReviewError(f"{name} must be 0 or 1, not {int(value)}.",
                          fix=f"Pass {name} as 0 or 1.")
    return int(value)


def _text(value, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ReviewError(f"{name} must be text, not {type(value).__name__}.")
    return value


# --------------------------------------------------------------------------- the log

class ReviewLog:
    """An append-only log of review decisions in one SQLite file.

    Safe to share between threads and processes: every call opens its own connection.

    `read_only=None` (default) opens an existing log that this process cannot write (a
    read-only file, folder or mount, e.g. a colleague's log on an archive share) for reading
    only: history, latest decisions and exports work, `record` raises a StorageError. A log
    that does not exist yet is created."""

    def __init__(self, path: str | os.PathLike, *, read_only: bool | None = None):
        self.path = Path(path).expanduser()
        if read_only is None:
            read_only = self.path.is_file() and not _log_is_writable(self.path)
        self.read_only = bool(read_only)
        if self.read_only:
            if not self.path.is_file():
                raise PcamLensError(f"There is no review log at {self.path}.", path=self.path,
                                    fix="Check the path; a log is created by the first "
                                        "decision recorded in the viewer.")
            self._retry(self._check_version, write=False)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PcamLensError(f"Cannot create the folder for the review log: {e}.",
                                path=self.path.parent,
                                fix=f"Make it writable, or set {HOME_ENV} to a writable "
                                    f"folder.") from None
        self._init_schema()

    def __repr__(self) -> str:
        return f"ReviewLog({str(self.path)!r})"

    # -- connections and transactions

    def _connect(self) -> sqlite3.Connection:
        try:
            con = self._open_read_only() if self.read_only else sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                check_same_thread=False)
        except sqlite3.Error as e:
            raise self._open_error(e) from None
        try:
            con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if not self.read_only:
                con.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as e:
            con.close()
            if _is_busy(e):
                raise
            raise self._open_error(e) from None
        return con

    def _open_read_only(self) -> sqlite3.Connection:
        """`mode=ro` sees the latest committed decisions, but a WAL log needs its `-shm` file:
        in a folder nobody may write and with no `-shm` left behind, SQLite refuses, and the
        file can then only be read as `immutable` (safe there: with no `-wal` file nothing is
        appending to it). A folder marked read-only is read that way first, so that not even
        root leaves `-wal`/`-shm` files in it."""

        uri = f"file:{quote(str(self.path.resolve()))}"
        modes = ["?mode=ro", "?immutable=1"]
        if marked_read_only(self.path.parent) and not Path(f"{self.path}-wal").exists():
            modes.reverse()
        for k, mode in enumerate(modes):
            con = sqlite3.connect(uri + mode, uri=True, timeout=BUSY_TIMEOUT_S,
                                  isolation_level=None, check_same_thread=False)
            try:
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return con
            except sqlite3.OperationalError:
                con.close()
                if k == len(modes) - 1:
                    raise
        raise AssertionError("unreachable")

    def _open_error(self, e: sqlite3.Error) -> PcamLensError:
        msg = str(e)
        low = msg.lower()
        if "disk is full" in low or "readonly" in low or "read-only" in low:
            full = "full" in low
            return StorageError(
                f"Cannot write the review log {self.path}: "
                + ("disk full" if full else "read-only database or file system")
                + f" ({msg}). Nothing was written; the decisions recorded before are "
                  "kept.", path=self.path,
                fix=("Free some space on that disk" if full else
                     "Make the log and its folder writable")
                + f", or set {HOME_ENV} to a folder on another disk and review again.",
                errno=errno.ENOSPC if full else errno.EROFS)
        if "not a database" in msg or "malformed" in msg:
            return PcamLensError(f"{self.path} is not a readable review log ({msg}).",
                                 path=self.path,
                                 fix="Move the file aside; a new, empty log will be created.")
        return PcamLensError(f"Cannot open the review log {self.path}: {msg}.", path=self.path,
                             fix=f"Check that the folder is writable and on a local disk, or "
                                 f"set {HOME_ENV} to another folder.")

    def _retry(self, fn: Callable[[sqlite3.Connection], object], *, write: bool):
        """Run `fn(con)` on a fresh connection; inside `BEGIN IMMEDIATE ... COMMIT` when
        `write`. Retries (bounded, jittered exponential backoff) while the file is locked."""
        last: BaseException | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                con = self._connect()
            except sqlite3.OperationalError as e:  # busy while setting pragmas
                last = e
            else:
                try:
                    if not write:
                        return fn(con)
                    con.execute("BEGIN IMMEDIATE")
                    try:
                        out = fn(con)
                        con.execute("COMMIT")
                        return out
                    except BaseException:
                        if con.in_transaction:
                            with contextlib.suppress(sqlite3.Error):
                                con.execute("ROLLBACK")
                        raise
                except sqlite3.OperationalError as e:
                    if not _is_busy(e):
                        raise self._db_error(e) from None
                    last = e
                except PcamLensError:
                    raise
                except sqlite3.Error as e:
                    raise self._db_error(e) from None
                finally:
                    con.close()
            if attempt + 1 < MAX_ATTEMPTS:  # "equal jitter": at least half the step
                step = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** attempt)
                time.sleep(step / 2 + random.uniform(0, step / 2))
        raise PcamLensError(f"The review log {self.path} stayed locked by another process "
                            f"({last}).", path=self.path,
                            fix="Try again; if it persists, close other viewers using this "
                                "log, and keep the log on a local disk.")

    def _db_error(self, e: sqlite3.Error) -> PcamLensError:
        if isinstance(e, sqlite3.OperationalError):
            return self._open_error(e)
        return PcamLensError(f"The review log {self.path} refused the operation: {e}.",
                             path=self.path)

    def _check_version(self, con: sqlite3.Connection) -> None:
        """Refuse a log written by another schema version (a missing meta table is a new or
        empty file: fine for writing, and for reading it holds no decisions)."""
        has_meta = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                               "AND name = 'meta'").fetchone()
        row = has_meta and con.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                       ).fetchone()
        if self.read_only and not row:
            raise PcamLensError(f"{self.path} is not a pcam-lens review log (no schema "
                                "version).", path=self.path,
                                fix="Point at a review_log.sqlite written by the viewer.")
        if not row:
            return
        try:
            version = int(row[0])
        except ValueError:
            version = -1
        if version > SCHEMA_VERSION or version < 1:
            raise PcamLensError(
                f"The review log {self.path} has schema version {row[0]}; this "
                f"pcam-lens reads version {SCHEMA_VERSION}"
                + (" (the log was written by a newer pcam-lens)."
                   if version > SCHEMA_VERSION else "."),
                path=self.path,
                fix="Upgrade pcam-lens, or move the file aside to start a new "
                    "log (the old one is left untouched).")

    def _init_schema(self) -> None:
        def init(con: sqlite3.Connection) -> None:
            self._check_version(con)
            for stmt in _split_sql(_SCHEMA):
                con.execute(stmt)
            con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),))
            con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created', ?)",
                        (_now(),))

        def wal(con: sqlite3.Connection) -> str:
            # Persistent: set once per file. On file systems without shared memory SQLite
            # stays in rollback-journal mode, which is slower but equally safe.
            return con.execute("PRAGMA journal_mode = WAL").fetchone()[0]

        self._retry(init, write=True)
        self._retry(wal, write=False)

    # -- writing

    def record(self, reviewer: str, run: str, patch_id: str, action: str, old_label,
               new_label=None, flag_reason: str | None = None, note: str = "",
               source: str = "") -> int:
        """Append one decision and return its `seq`. It is on disk when this returns.

        - reviewer: a non-empty name, stored as given (it is not authentication)
        - action: confirm | relabel | flag | skip
        - old_label: the label shown to the reviewer (0/1; None only for unlabelled data,
          which cannot be confirmed)
        - relabel needs new_label (0/1) different from old_label; flag needs flag_reason
          (artefact | out_of_focus | no_tissue | other); new_label/flag_reason are refused
          for actions they do not belong to."""
        if self.read_only:
            raise StorageError(f"The review log {self.path} is open read-only (this process "
                               "cannot write it); the decision was not recorded.",
                               path=self.path, errno=errno.EROFS,
                               fix=f"Make the log and its folder writable, or review into "
                                   f"your own log (set {HOME_ENV}, or copy the file).")
        if not isinstance(reviewer, str) or not reviewer.strip():
            raise ReviewError("A reviewer name is required for every decision.",
                              fix="Enter your name in the viewer before reviewing.")
        if not isinstance(patch_id, str) or not patch_id:
            raise ReviewError(f"patch_id must be a non-empty string, not {patch_id!r}.")
        if action not in ACTIONS:
            raise ReviewError(f"Unknown review action {action!r}.",
                              fix=f"Use one of: {', '.join(ACTIONS)}.")
        old = _label(old_label, "old_label", allow_none=True)
        new = _label(new_label, "new_label", allow_none=True)
        run, source, note = _text(run, "run"), _text(source, "source"), _text(note, "note")
        if flag_reason is not None and not isinstance(flag_reason, str):
            raise ReviewError(f"flag_reason must be text, not {flag_reason!r}.")
        if action == "relabel":
            if new is None:
                raise ReviewError("A relabel needs the new label.", fix="Pass new_label=0 or 1.")
            if new == old:
                raise ReviewError(f"Relabelling patch {patch_id} to its current label {new} "
                                  "changes nothing.", fix="Use action 'confirm' instead.")
        elif new is not None:
            raise ReviewError(f"new_label is only valid with action 'relabel', not {action!r}.")
        if action == "flag":
            if flag_reason not in FLAG_REASONS:
                raise ReviewError(f"A flag needs a reason, got {flag_reason!r}.",
                                  fix=f"Use one of: {', '.join(FLAG_REASONS)}.")
        elif flag_reason is not None:
            raise ReviewError(f"flag_reason is only valid with action 'flag', not {action!r}.")
        if action == "confirm" and old is None:
            raise ReviewError(f"Patch {patch_id} has no label to confirm.",
                              fix="Use 'relabel' to give it a label.")

        def insert(con: sqlite3.Connection) -> int:
            # the time is taken under the write lock, so time order follows seq order
            cur = con.execute(
                "INSERT INTO decisions (time, reviewer, run, source, patch_id, action, "
                "old_label, new_label, flag_reason, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (_now(), reviewer, run, source, patch_id, action, old, new, flag_reason, note))
            return int(cur.lastrowid)

        return self._retry(insert, write=True)

    # -- reading

    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        return self._retry(lambda con: con.execute(sql, tuple(params)).fetchall(), write=False)

    @staticmethod
    def _frame(rows: list[tuple], columns: list[str]) -> pd.DataFrame:
        """Labels as nullable Int64, seq as int64, text as object with None for NULL."""
        data = {}
        for i, c in enumerate(columns):
            values = [r[i] for r in rows]
            if c == "seq":
                data[c] = pd.Series(values, dtype="int64")
            elif c in ("old_label", "new_label"):
                data[c] = pd.Series(values, dtype="Int64")
            else:
                data[c] = pd.Series(values, dtype=object)
        return pd.DataFrame(data, columns=columns)

    def history(self, patch_id: str | None = None) -> pd.DataFrame:
        """Every decision (or those for one patch), in `seq` order."""
        cols = ", ".join(HISTORY_COLUMNS)
        if patch_id is None:
            rows = self._query(f"SELECT {cols} FROM decisions ORDER BY seq")
        else:
            rows = self._query(f"SELECT {cols} FROM decisions WHERE patch_id = ? ORDER BY seq",
                               (patch_id,))
        return self._frame(rows, HISTORY_COLUMNS)

    def latest(self) -> pd.DataFrame:
        """The current decision per patch: its non-skip decision with the highest `seq`
        (not the latest `time`: clocks can disagree, seq cannot). Patches that were only
        skipped are absent. One row per patch, in `seq` order."""
        cols = ", ".join(f"d.{c}" for c in LATEST_COLUMNS)
        rows = self._query(
            f"SELECT {cols} FROM decisions AS d JOIN "
            "(SELECT MAX(seq) AS seq FROM decisions WHERE action != 'skip' GROUP BY patch_id)"
            " AS last ON d.seq = last.seq ORDER BY d.seq")
        return self._frame(rows, LATEST_COLUMNS)

    def reviewed_ids(self, run: str | None = None) -> set[str]:
        """Patch ids with any decision, skips included (so a queue resumes where it was
        left), optionally only decisions made while reviewing `run`."""
        if run is None:
            rows = self._query("SELECT DISTINCT patch_id FROM decisions")
        else:
            rows = self._query("SELECT DISTINCT patch_id FROM decisions WHERE run = ?", (run,))
        return {r[0] for r in rows}

    def effective_labels(self, ids: Sequence[str], labels) -> tuple[np.ndarray, np.ndarray]:
        """Apply the latest decisions to (ids, labels).

        Returns (labels, keep): a new int64 array where relabelled patches carry the new
        label, and a bool mask that is False for flagged patches (to be excluded). Confirmed
        and unreviewed patches are unchanged; decisions about ids not in `ids` are ignored."""
        ids = [str(i) for i in ids]
        if labels is None:
            raise ReviewError("effective_labels needs the labels of the patches.")
        out = np.asarray(labels).astype(np.int64, copy=True).reshape(-1)
        if len(out) != len(ids):
            raise ReviewError(f"effective_labels got {len(ids)} ids but {len(out)} labels.")
        keep = np.ones(len(ids), dtype=bool)
        latest = self.latest()
        if latest.empty:
            return out, keep
        pos: dict[str, list[int]] = {}
        for i, pid in enumerate(ids):
            pos.setdefault(pid, []).append(i)
        for pid, action, new in zip(latest["patch_id"], latest["action"], latest["new_label"]):
            where = pos.get(pid)
            if not where:
                continue
            if action == "relabel":
                out[where] = int(new)
            elif action == "flag":
                keep[where] = False
        return out, keep

    def reviewed_labels(self) -> pd.DataFrame:
        """One row per reviewed patch (latest non-skip decision): patch_id, final_label
        (the new label for a relabel, the old one for a confirm, empty for a flagged patch,
        which is excluded), old_label, action, flag_reason, reviewer, time, note."""
        latest = self.latest()
        final = latest["new_label"].where(latest["action"] == "relabel", latest["old_label"])
        final = final.where(latest["action"] != "flag", pd.NA).astype("Int64")
        df = latest.assign(final_label=final)
        return df[EXPORT_COLUMNS].reset_index(drop=True)

    def export_csv(self, path: str | os.PathLike) -> pd.DataFrame:
        """Write `reviewed_labels()` to `path` atomically and return it."""
        df = self.reviewed_labels()
        write_csv(path, df)
        return df

    def stats(self) -> dict:
        """{'n_decisions', 'actions': {action: count of all decisions}, 'latest': {action:
        count of patches whose current decision is that action}, 'n_patches' (with any
        decision), 'n_reviewers', 'path'}."""
        def q(con: sqlite3.Connection):
            by_action = dict(con.execute(
                "SELECT action, COUNT(*) FROM decisions GROUP BY action").fetchall())
            latest = dict(con.execute(
                "SELECT d.action, COUNT(*) FROM decisions AS d JOIN (SELECT MAX(seq) AS seq "
                "FROM decisions WHERE action != 'skip' GROUP BY patch_id) AS l "
                "ON d.seq = l.seq GROUP BY d.action").fetchall())
            n, n_patches, n_reviewers = con.execute(
                "SELECT COUNT(*), COUNT(DISTINCT patch_id), COUNT(DISTINCT reviewer) "
                "FROM decisions").fetchone()
            return by_action, latest, n, n_patches, n_reviewers

        by_action, latest, n, n_patches, n_reviewers = self._retry(q, write=False)
        return {"n_decisions": int(n),
                "actions": {a: int(by_action.get(a, 0)) for a in ACTIONS},
                "latest": {a: int(latest.get(a, 0)) for a in ACTIONS if a != "skip"},
                "n_patches": int(n_patches), "n_reviewers": int(n_reviewers),
                "path": str(self.path)}


def _split_sql(script: str) -> Iterator[str]:
    """Split the schema into statements (sqlite3.complete_statement keeps triggers whole);
    executescript() cannot be used because it commits the open transaction."""
    buf = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--") and not buf.strip():
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()


# --------------------------------------------------------------------------- the queue

def review_queue(df: pd.DataFrame, order: str = "top_losses",
                 reviewed: Iterable[str] = ()) -> tuple[pd.DataFrame, int, int]:
    """What is left to review, in review order.

    `df` holds predictions with columns id, label, prob (P(positive)) and loss. Returns
    (queue, n_done, n_total): the rows whose id is not in `reviewed`, sorted by `order`;
    n_done counts the ids of `df` that are in `reviewed`, n_total the ids of `df`.

    - top_losses: highest loss first
    - uncertain: prob closest to 0.5 first
    - false_negatives_first: tumours predicted negative (label 1, prob < 0.5) by loss,
      then everything else by loss
    - label_errors: confident learning's ranking (cleanlab, out-of-fold predictions): the
      patches it flags first, each group by label quality (lowest first), then by loss
    - spread: the widest spread of the 8 TTA views' probabilities first (`tta_spread`), or
      of the fold models' (`fold_std`) when there is no TTA spread

    Ties are broken by id, so the order does not depend on the row order of `df`; NaN
    losses/probabilities go last. The original index is kept."""
    if order not in QUEUE_ORDERS:
        raise ReviewError(f"Unknown review order {order!r}.",
                          fix=f"Use one of: {', '.join(QUEUE_ORDERS)}.")
    spread_col = "tta_spread" if "tta_spread" in df.columns else "fold_std"
    need = {"top_losses": ["id", "loss"], "uncertain": ["id", "prob", "loss"],
            "false_negatives_first": ["id", "label", "prob", "loss"],
            "label_errors": ["id", "label_quality", "label_issue", "loss"],
            "spread": ["id", spread_col, "loss"]}[order]
    missing = [c for c in need if c not in df.columns]
    if missing:
        fix = ("Run python -m model.crossval on this data: its out-of-fold predictions carry "
               "the label quality and the TTA spread." if order in ("label_errors", "spread")
               else "Review the predictions of a run evaluated on labelled data.")
        raise ReviewError(f"The predictions table lacks column(s) {', '.join(missing)} "
                          f"needed for the {order!r} review order.", fix=fix)
    reviewed = {str(r) for r in reviewed}
    ids = df["id"].astype(str)
    done_mask = ids.isin(reviewed)
    n_total = int(ids.nunique())
    n_done = int(ids[done_mask].nunique())
    rest = df.loc[~done_mask.to_numpy()]
    key = pd.DataFrame({"id": rest["id"].astype(str).to_numpy(),
                        "neg_loss": -pd.to_numeric(rest["loss"], errors="coerce").to_numpy()})
    if order == "top_losses":
        by = ["neg_loss", "id"]
    elif order == "uncertain":
        prob = pd.to_numeric(rest["prob"], errors="coerce").to_numpy()
        key["dist"] = np.abs(prob - 0.5)
        by = ["dist", "neg_loss", "id"]
    elif order == "false_negatives_first":
        prob = pd.to_numeric(rest["prob"], errors="coerce").to_numpy()
        label = pd.to_numeric(rest["label"], errors="coerce").to_numpy()
        key["not_fn"] = ~((label == 1) & (prob < 0.5))
        by = ["not_fn", "neg_loss", "id"]
    elif order == "label_errors":
        key["not_flagged"] = ~rest["label_issue"].astype(bool).to_numpy()
        key["quality"] = pd.to_numeric(rest["label_quality"], errors="coerce").to_numpy()
        by = ["not_flagged", "quality", "neg_loss", "id"]
    else:
        key["neg_spread"] = -pd.to_numeric(rest[spread_col], errors="coerce").to_numpy()
        by = ["neg_spread", "neg_loss", "id"]
    positions = key.sort_values(by, kind="mergesort", na_position="last").index.to_numpy()
    return rest.iloc[positions], n_done, n_total
