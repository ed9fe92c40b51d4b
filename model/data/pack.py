"""Packed cache: a data folder turned into one memory-mappable array.

Decoding 220k small TIFFs costs far more than training wants to wait for; slicing one
memory-mapped uint8 array costs nothing. A pack is a folder:

    patches.u8   the patches as raw C-order uint8 bytes, shape [N, 96, 96, 3], no header
    ids.txt      one id per line, in the source's order
    labels.npy   int64 [N] class indices (absent for unlabelled data)
    groups.txt   one group (slide) id per line (only when the source has groups)
    paths.txt    each patch's file, relative to the data folder (only when the file names do
                 not follow `<prefix><id><suffix>`, which pack.json then records instead)
    pack.json    format version, the original source's description, split, n, shape, dtype,
                 sha256 of patches.u8, the source fingerprint, creation time, classes

Why raw bytes rather than .npy: pack.json has to be read anyway (ids, fingerprint), so the
shape lives there; then `np.memmap(path, uint8, "r", shape=...)` needs no header parsing, the
array file is exactly N*96*96*3 bytes (the size check on every open is one comparison), the
sha256 covers pixels only, and writing is a plain stream of chunks. Any tool can read it
(`np.fromfile`, `np.memmap`, `mmap`) given the shape in pack.json.

Where: `DATA/.pcam-lens/pack-<split>/` (beside the data, like the review log), or with DATA
not writable `$PCAM_LENS_CACHE/packs/<key>/pack-<split>/` (default `~/.cache/pcam-lens`;
<key> = first 16 hex digits of the sha1 of the resolved data path), or `--out DIR` ->
`DIR/pack-<split>/`. `open_source(DATA)` uses a fresh pack from the first two places
transparently; `open_source(DIR)` or `open_source(DIR/pack-<split>)` opens one made with --out.

Writing streams chunks from a thread pool (bounded memory), hashes while writing, validates
every patch, fsyncs, and renames a finished temporary folder into place: an interrupted or
killed pack never leaves a folder that could be opened as a pack. A broken image stops the
pack with a DataError naming the file: a pack is an exact stand-in for the source, same ids
in the same order, so it refuses rather than silently leaving patches out.

Freshness (checked on every open, stat calls only, nothing is read or hashed):
- always: mtime and entry count of each folder holding patch files (catches added, removed
  and renamed files), size+mtime of the labels CSV (train_labels.csv, or
  sample_submission.csv for a test split; HDF5 files for PCam), and size+mtime of 64 files
  spread over the source (catches a folder rewritten wholesale);
- additionally, for sources of at most FULL_CHECK_MAX files: size+mtime of every file.
Stat-ing all 220k files of the full Kaggle set costs ~1 s of CPU (3-4 s wall on a busy
2-core machine), too slow for every open; so on large sources a file overwritten in place
(same name, folder unchanged) is noticed only by `python -m model.pack DATA`, which always
compares every file's size+mtime and rebuilds when any changed. A stale pack is ignored with
a one-line warning saying how to rebuild it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from model.core.atomic import can_create_files, marked_read_only
from model.core.errors import DataError, PcamLensError
from model.core.paths import DATA_SUBDIR, cache_base, path_key
from model.data.base import PatchSource, ids_fingerprint
from model.data.files import FileSource
from model.data.hdf5 import PcamH5Source
from model.data.kaggle import KaggleSource

FORMAT = "pcam-lens-pack"
FORMAT_VERSION = 1
ARRAY_NAME = "patches.u8"
FULL_CHECK_MAX = 20_000  # sources with at most this many files get every file stat-ed on open
SAMPLE_FILES = 64  # files whose stat is checked on every open, whatever the size
CHUNK = 256  # patches per thread-pool task when packing
_warned: set[tuple[str, str]] = set()


# --------------------------------------------------------------------------- locations


def fallback_pack_dir(root: Path, split: str) -> Path:
    return cache_base() / "packs" / path_key(root) / f"pack-{split}"


def _writable(folder: Path) -> bool:
    """Can we create files in `folder` (creating it first if needed)? A real probe, because
    os.access says yes to root on read-only mounts."""

    if marked_read_only(folder):
        return False

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return can_create_files(folder)


def default_pack_dir(root: Path, split: str) -> Path:
    """DATA/.pcam-lens/pack-<split> when that folder is writable, else the per-user cache.
    Creates DATA/.pcam-lens when it can (before fingerprinting: creating it changes DATA's
    mtime)."""
    beside = Path(root) / DATA_SUBDIR
    if _writable(beside):
        return beside / f"pack-{split}"
    return fallback_pack_dir(root, split)


def candidate_dirs(root: Path, split: str) -> list[Path]:
    """Where open_source looks for a pack of (root, split), in order."""
    return [Path(root) / DATA_SUBDIR / f"pack-{split}", fallback_pack_dir(root, split)]


# --------------------------------------------------------------------------- fingerprint


def _relpath(p: Path, root: Path) -> str:
    try:
        return Path(p).relative_to(root).as_posix()
    except ValueError:
        raise DataError(f"{p} is outside the data folder {root}; cannot pack it.", path=p,
                        fix="Pack a source whose files lie inside its folder.") from None


def _stat(root_fd: int, rel: str) -> list[int] | None:
    try:
        st = os.stat(rel, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _dir_state(root_fd: int, rel: str) -> list[int] | None:
    """[mtime_ns, number of entries] of a folder (all entries: skipping dot files would cost a
    Python-level pass over 220k names on every open)."""
    try:
        st = os.stat(rel, dir_fd=root_fd)
        fd = os.open(rel, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0), dir_fd=root_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        n = len(os.listdir(fd))
    finally:
        os.close(fd)
    return [int(st.st_mtime_ns), n]


def _stats_sha1(root_fd: int, rels: Sequence[str]) -> str:
    h = hashlib.sha1()
    for rel in rels:
        st = _stat(root_fd, rel)
        h.update(f"{rel}\0{st}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _sample(rels_sorted: Sequence[str]) -> list[str]:
    n = len(rels_sorted)
    if n <= SAMPLE_FILES:
        return list(rels_sorted)
    return [rels_sorted[int(k)] for k in np.linspace(0, n - 1, SAMPLE_FILES).round()]


def _open_root(root: Path) -> int:
    return os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def quick_fingerprint(root: Path, plan: dict) -> dict:
    """Folder states, meta-file stats and the sample's stat digest (no per-file stat)."""
    fd = _open_root(root)
    try:
        return {"dirs": {d: _dir_state(fd, d) for d in plan["dirs"]},
                "files": {f: _stat(fd, f) for f in plan["meta_files"]},
                "sample_sha1": _stats_sha1(fd, plan["sample"])}
    finally:
        os.close(fd)


def full_fingerprint(root: Path, rels_sorted: Sequence[str]) -> str:
    """sha1 over (relative path, size, mtime) of every patch file, in sorted order."""
    fd = _open_root(root)
    try:
        return _stats_sha1(fd, rels_sorted)
    finally:
        os.close(fd)


def _fingerprint(root: Path, plan: dict, rels_sorted: Sequence[str]) -> dict:
    return {**quick_fingerprint(root, plan), "n_files": len(rels_sorted),
            "files_sha1": full_fingerprint(root, rels_sorted)}


# --------------------------------------------------------------------------- planning


def _plan(source: PatchSource, root: Path) -> dict:
    """What a pack of `source` depends on, as paths relative to `root`."""

    if isinstance(source, FileSource):
        if getattr(source, "expect_size", None) is None:
            raise DataError(
                f"{source.describe_short()} resizes its images to the size a model asks for, "
                "so a pack at one size could be served to a model that needs another; packing "
                "is for fixed-size patch sources (Kaggle folders, PCam HDF5).",
                path=root, fix="Train straight from the folder (it is read once into memory "
                               "when it fits), or convert it into a Kaggle-layout folder.")
        rels = [_relpath(p, root) for p in source.paths]
        dirs = sorted({str(Path(r).parent.as_posix()) for r in rels})
        meta = []
        if isinstance(source, KaggleSource):
            meta = ["train_labels.csv"] if source.split == "train" else ["sample_submission.csv"]
        return {"rels": rels, "dirs": dirs, "meta_files": meta}
    if isinstance(source, PcamH5Source):
        x = source.x_path
        rels = [_relpath(x, root)]
        meta = [_relpath(x.with_name(x.name.replace("_x.h5", suffix)), root)
                for suffix in ("_y.h5", "_meta.csv")] + ["ids.csv"]
        return {"rels": rels, "dirs": [], "meta_files": meta}
    raise DataError(f"{source.describe_short()} has no files to pack (kind {source.kind}).",
                    fix="Pack a Kaggle folder or PCam HDF5 files; the synthetic set is "
                        "generated on the fly and needs no pack.")


def _path_layout(ids: Sequence[str], rels: Sequence[str]) -> tuple[str, str] | None:
    """(prefix, suffix) when every rel path is prefix + id + suffix."""
    if not ids or len(rels) != len(ids):
        return None
    k = rels[0].find(ids[0])
    if k < 0:
        return None
    prefix, suffix = rels[0][:k], rels[0][k + len(ids[0]):]
    if all(r == f"{prefix}{pid}{suffix}" for pid, r in zip(ids, rels)):
        return prefix, suffix
    return None


# --------------------------------------------------------------------------- the source


def _read_text_lines(dir_fd: int, name: str) -> list[str]:
    with open(os.open(name, os.O_RDONLY, dir_fd=dir_fd), "rb", closefd=True) as f:
        text = f.read().decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class PackedSource(PatchSource):
    """A pack opened as a source: ids, labels, classes and split of the original source, with
    `root` the ORIGINAL data folder (review logs and run names stay with the data) and
    `describe()` the original source's description plus "packed": True."""

    def __init__(self, pack_dir: Path, root: Path, meta: dict, ids: list[str],
                 labels: np.ndarray | None, groups: np.ndarray | None, dir_fd: int | None = None):
        shape = tuple(meta["shape"])
        super().__init__(kind="packed", root=Path(root), ids=ids, labels=labels,
                         classes=list(meta["classes"]), split=meta.get("split"), groups=groups,
                         notes=list(meta.get("notes") or []), size=int(shape[1]))
        self.pack_dir = Path(pack_dir)
        self.meta = meta
        self.shape = shape
        self.source_kind = meta["source"]["kind"]  # what the original source is ("kaggle")
        self._paths: list[str] | None = None
        self._mm = None
        if dir_fd is not None:
            self._mm = self._map(os.open(ARRAY_NAME, os.O_RDONLY, dir_fd=dir_fd))

    def _map(self, fd: int) -> np.memmap:
        with open(fd, "rb", closefd=True) as f:
            size = os.fstat(f.fileno()).st_size
            want = int(np.prod(self.shape))
            if size != want:
                raise DataError(f"{self.pack_dir / ARRAY_NAME} has {size} bytes, expected "
                                f"{want} for {list(self.shape)}.", path=self.pack_dir,
                                fix="Rebuild it: "
                                + rebuild_command(self.root, self.meta, force=True))
            return np.memmap(f, dtype=np.uint8, mode="r", shape=self.shape)

    def _array(self) -> np.memmap:
        if self._mm is None:  # after unpickling (spawned DataLoader workers)
            cur = json.loads((self.pack_dir / "pack.json").read_text(encoding="utf-8"))
            if cur.get("sha256") != self.meta.get("sha256"):
                raise DataError(f"The pack {self.pack_dir} was rebuilt while in use.",
                                path=self.pack_dir, fix="Start the run again.")
            self._mm = self._map(os.open(self.pack_dir / ARRAY_NAME, os.O_RDONLY))
        return self._mm

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_mm"] = None  # never pickle the mapped pixels
        return state

    def read(self, i: int) -> np.ndarray:
        return np.array(self._array()[int(i)])

    def read_batch(self, indices: Sequence[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            return np.empty((0, *self.shape[1:]), np.uint8)
        return np.asarray(self._array()[idx])  # fancy indexing copies

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Patches start..stop-1 as one copy (sequential reading)."""
        return np.array(self._array()[start:stop])

    def path_of(self, i: int) -> Path | None:
        layout = self.meta.get("path_layout")
        if layout is not None:
            return self.root / f"{layout[0]}{self.ids[i]}{layout[1]}"
        if self.meta.get("has_paths"):
            if self._paths is None:
                fd = _open_root(self.pack_dir)
                try:
                    self._paths = _read_text_lines(fd, "paths.txt")
                finally:
                    os.close(fd)
            return self.root / self._paths[i]
        return None

    def describe(self) -> dict:
        d = dict(self.meta["source"])
        rel = self.meta.get("source_path_rel", ".")
        d["path"] = str(self.root) if rel == "." else str(self.root / rel)
        d["n"] = len(self)
        d["packed"] = True
        return d

    def describe_short(self) -> str:
        return (f"{self.source_kind} source {self.describe()['path']} "
                f"({self.split or 'all'}, {len(self)} patches, packed)")


def load_pack(pack_dir: Path, root: Path | None = None) -> PackedSource:
    """Open the pack in `pack_dir` without any freshness check. `root` is the data folder to
    report (default: the one recorded at pack time). All files are opened through one
    descriptor of the folder, so a pack replaced meanwhile cannot mix old and new files."""
    pack_dir = Path(pack_dir)
    try:
        dfd = _open_root(pack_dir)
    except FileNotFoundError:
        raise DataError(f"No pack at {pack_dir}.", path=pack_dir,
                        fix="Build one with python -m model.pack DATA.") from None
    try:
        with open(os.open("pack.json", os.O_RDONLY, dir_fd=dfd), "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise DataError(f"{pack_dir} is not a version-{FORMAT_VERSION} pcam-lens pack.",
                            path=pack_dir,
                            fix=f"Rebuild it: {rebuild_command(root, meta, force=True)}")
        n = int(meta["n"])
        with open(os.open("ids.txt", os.O_RDONLY, dir_fd=dfd), "rb") as f:
            raw = f.read()
        if hashlib.sha1(raw).hexdigest() != meta["ids_txt_sha1"]:
            raise DataError(f"{pack_dir}/ids.txt does not match its pack.json.", path=pack_dir,
                            fix=f"Rebuild it: {rebuild_command(root, meta, force=True)}")
        ids = raw.decode("utf-8", "surrogateescape").split("\n")[:-1]
        labels = groups = None
        if meta.get("labelled"):
            with open(os.open("labels.npy", os.O_RDONLY, dir_fd=dfd), "rb") as f:
                labels = np.load(f, allow_pickle=False).astype(np.int64, copy=False)
        if meta.get("has_groups"):
            groups = np.asarray(_read_text_lines(dfd, "groups.txt"))
        if len(ids) != n or (labels is not None and labels.shape != (n,)) \
                or (groups is not None and len(groups) != n):
            raise DataError(f"{pack_dir}: ids, labels or groups do not have {n} rows.",
                            path=pack_dir,
                            fix=f"Rebuild it: {rebuild_command(root, meta, force=True)}")
        root = Path(meta["source_root"]) if root is None else Path(root)
        return PackedSource(pack_dir, root, meta, ids, labels, groups, dir_fd=dfd)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{pack_dir} is not a readable pack ({type(e).__name__}: {e}).",
                        path=pack_dir, fix="Delete it and pack again.") from None
    finally:
        os.close(dfd)


def rebuild_command(root, meta: dict | None, *, force: bool = False,
                    out: Path | None = None) -> str:
    """The command line that rebuilds the pack described by `meta` (a stale pack is rebuilt
    without --force; a damaged one with the same fingerprint needs it)."""
    split = (meta or {}).get("requested_split") or "train"
    where = root if root is not None else (meta or {}).get("source_root", "DATA")
    return (f"python -m model.pack {where} --split {split}" + (f" --out {out}" if out else "")
            + (" --force" if force else ""))


def pack_state(pack: PackedSource, root: Path, *, full: bool | None = None) -> str | None:
    """None when the pack still matches the data at `root`, else the reason it does not.
    `full` stats every file (default: only for sources of at most FULL_CHECK_MAX files)."""
    meta = pack.meta
    fp = meta["fingerprint"]
    plan = {"dirs": list(fp["dirs"]), "meta_files": list(fp["files"]),
            "sample": meta["sample"]}
    try:
        now = quick_fingerprint(root, plan)
    except OSError as e:
        return f"cannot stat the data ({e})"
    for d, state in fp["dirs"].items():
        if now["dirs"][d] != state:
            return f"files were added to or removed from {d}/" if now["dirs"][d] else \
                f"{d}/ is gone"
    for f, state in fp["files"].items():
        if now["files"][f] != state:
            return f"{f} changed"
    if now["sample_sha1"] != fp["sample_sha1"]:
        return "patch files changed"
    if full is None:
        full = fp["n_files"] <= FULL_CHECK_MAX
    if full and full_fingerprint(root, _source_rels(pack)) != fp["files_sha1"]:
        return "patch files changed"
    return None


def _source_rels(pack: PackedSource) -> list[str]:
    layout = pack.meta.get("path_layout")
    if layout is not None:
        rels = [f"{layout[0]}{pid}{layout[1]}" for pid in pack.ids]
    elif pack.meta.get("has_paths"):
        pack.path_of(0)
        rels = list(pack._paths)
    else:
        rels = list(pack.meta.get("data_files") or [])
    return sorted(set(rels))


def _warn(pack_dir: Path, reason: str, root, meta) -> None:
    key = (str(pack_dir), reason)
    if key in _warned:
        return
    _warned.add(key)
    print(f"pcam-lens: the packed cache {pack_dir} is stale ({reason}); reading the original "
          f"files instead. Rebuild it: {rebuild_command(root, meta)}", file=sys.stderr)


def open_packed_if_fresh(path, split) -> PackedSource | None:
    """A PackedSource for the data folder `path` when a pack of (path, split) exists and
    still matches the folder; None otherwise (a stale pack gets a one-line warning).

    `path` may also be a pack folder itself (made with --out) or a folder holding
    pack-<split>/. Such a pack was asked for by name: when its data folder still exists and
    has changed, that is a DataError (not a silent fallback); when the data folder is gone
    (a pack copied to another machine) the pack is used as it is."""
    path = Path(path)
    split = split or "train"
    explicit = None
    if (path / "pack.json").is_file():
        explicit = path
    elif (path / f"pack-{split}" / "pack.json").is_file():
        explicit = path / f"pack-{split}"
    if explicit is not None:
        pack = load_pack(explicit)
        root = pack.root
        if root.is_dir():
            reason = pack_state(pack, root)
            if reason:
                raise DataError(f"The pack {explicit} is stale: {reason} in {root}.",
                                path=explicit, fix="Rebuild it: " + rebuild_command(
                                    root, pack.meta, out=explicit.parent))
        return pack
    for cand in candidate_dirs(path, split):
        if not (cand / "pack.json").is_file():
            continue
        meta = None
        try:
            pack = load_pack(cand, root=path)
            meta = pack.meta
            reason = pack_state(pack, path)
        except (PcamLensError, OSError, KeyError, ValueError, TypeError) as e:
            reason = f"unreadable: {e}"
        if reason is None:
            return pack
        _warn(cand, reason, path, meta or {"requested_split": split})
    return None


# --------------------------------------------------------------------------- writing


def _fsync_path(path: Path, directory: bool = False) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_chunk(f, arr: np.ndarray, digest) -> None:
    """Append one chunk of patches to the array file and the running sha256."""
    buf = memoryview(np.ascontiguousarray(arr)).cast("B")
    digest.update(buf)
    f.write(buf)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _clean_leftovers(parent: Path, split: str) -> None:
    """Remove temporary folders of killed packs (their pid no longer runs)."""
    for prefix in (f".pack-{split}.tmp-", f".pack-{split}.old-"):
        for d in parent.glob(prefix + "*"):
            try:
                pid = int(d.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if pid == os.getpid() or not _pid_alive(pid):
                shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _lock(parent: Path, split: str):
    import fcntl

    fd = os.open(parent / f".pack-{split}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"Another pack into {parent / f'pack-{split}'} is running.",
                            path=parent, fix="Wait for it to finish.") from None
        yield
    finally:
        os.close(fd)


def _bad_patch(source: PatchSource, i: int, e: Exception, data: str) -> DataError:
    msg = str(e)
    fix = getattr(e, "fix", None)
    if fix and msg.endswith(f" Fix: {fix}"):
        msg = msg[: -len(f" Fix: {fix}")]
    path = source.path_of(i)
    return DataError(
        f"Cannot pack patch {i} (id {source.ids[i]}): {msg}", path=path,
        fix=f"A pack holds every patch of the source, so it stops at bad files instead of "
            f"leaving ids out. List them all with `python -m model.inspect {data}`, replace or "
            f"delete them (and their rows in the labels CSV), then pack again. Until then, "
            f"train from the folder with --drop-bad.")


def _read_chunk(source: PatchSource, start: int, stop: int, data: str) -> np.ndarray:
    s = source.size
    if not isinstance(source, FileSource):  # HDF5: one read per chunk, not one per row
        with contextlib.suppress(DataError, OSError):
            arr = np.asarray(source.read_batch(np.arange(start, stop)))
            if arr.dtype == np.uint8 and arr.shape == (stop - start, s, s, 3):
                return arr
        # fall through: find the bad row one by one
    out = np.empty((stop - start, s, s, 3), np.uint8)
    for k, i in enumerate(range(start, stop)):
        try:
            arr = source.read(i)
        except (DataError, OSError) as e:
            raise _bad_patch(source, i, e, data) from None
        arr = np.asarray(arr)
        if arr.dtype != np.uint8 or arr.shape != (s, s, 3):
            raise _bad_patch(source, i, ValueError(
                f"it is {arr.dtype}{list(arr.shape)}, not uint8[{s}, {s}, 3]"), data)
        out[k] = arr
    return out


def _progress(total: int, enabled: bool):

    # disable=None: no bar when stderr is not a terminal (a log file would fill with redraws)
    return tqdm(total=total, unit="patch", desc="packing", disable=None if enabled else True,
                mininterval=0.5, file=sys.stderr)


def _refuse_line_breaks(source: PatchSource, root: Path) -> None:
    """ids.txt and groups.txt hold one value per line."""
    for label, values in (("id", source.ids), ("group", source.groups if source.groups
                                               is not None else [])):
        bad = next((v for v in values if "\n" in str(v) or "\r" in str(v)), None)
        if bad is not None:
            raise DataError(f"{label} {bad!r} contains a line break; a pack stores one per line.",
                            path=root, fix="Rename the file.")


def _up_to_date(target: Path, root: Path, fingerprint: dict, n: int) -> bool:
    if not target.exists():
        return False
    try:
        old = load_pack(target, root=root)
    except (PcamLensError, OSError):
        return False
    return old.meta["fingerprint"] == fingerprint and len(old) == n


def _require_space(parent: Path, n: int, size: int) -> None:
    need = n * size * size * 3
    free = shutil.disk_usage(parent).free
    if free < need + (64 << 20):
        raise DataError(f"Packing {n} patches needs {need / 1e9:.2f} GB in {parent}, which "
                        f"has {free / 1e9:.2f} GB free.", path=parent,
                        fix="Free some space, or pass --out with a folder on another disk.")


def _stream_array(source: PatchSource, tmp: Path, *, workers: int, chunk: int, progress: bool,
                  data_arg: str) -> str:
    """Decode the patches in a thread pool (at most 2 chunks per worker in flight: bounded
    memory) and append them to tmp/patches.u8 in order; return its sha256."""
    n = len(source)
    digest = hashlib.sha256()
    bar = _progress(n, progress)
    try:
        with open(tmp / ARRAY_NAME, "wb") as f, ThreadPoolExecutor(max(1, workers)) as pool:
            pending: deque = deque()
            try:
                for start in range(0, n, chunk):
                    pending.append(pool.submit(_read_chunk, source, start,
                                               min(start + chunk, n), data_arg))
                    while len(pending) > 2 * max(1, workers):
                        arr = pending.popleft().result()
                        _write_chunk(f, arr, digest)
                        bar.update(len(arr))
                while pending:
                    arr = pending.popleft().result()
                    _write_chunk(f, arr, digest)
                    bar.update(len(arr))
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
            f.flush()
            os.fsync(f.fileno())
    finally:
        bar.close()
    return digest.hexdigest()


def _write_index_files(source: PatchSource, tmp: Path, rels: list[str]
                       ) -> tuple[bytes, tuple[str, str] | None, bool]:
    """ids.txt, labels.npy, groups.txt and (when file names do not follow one pattern)
    paths.txt; returns (ids.txt bytes, path layout, whether paths.txt was written)."""
    ids_raw = ("\n".join(source.ids) + "\n").encode("utf-8", "surrogateescape")
    _write_file(tmp / "ids.txt", ids_raw)
    if source.labels is not None:
        with open(tmp / "labels.npy", "wb") as f:
            np.save(f, np.asarray(source.labels, dtype=np.int64), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    if source.groups is not None:
        _write_file(tmp / "groups.txt", ("\n".join(map(str, source.groups)) + "\n")
                    .encode("utf-8", "surrogateescape"))
    layout = _path_layout(source.ids, rels) if isinstance(source, FileSource) else None
    has_paths = isinstance(source, FileSource) and layout is None
    if has_paths:
        _write_file(tmp / "paths.txt", ("\n".join(rels) + "\n").encode("utf-8", "surrogateescape"))
    return ids_raw, layout, has_paths


def _swap_into_place(tmp: Path, target: Path, split_name: str) -> None:
    """Rename the finished temporary folder over `target` (the old pack moved aside first)."""
    parent = target.parent
    _fsync_path(tmp, directory=True)
    old = None
    if target.exists():
        old = parent / f".pack-{split_name}.old-{os.getpid()}-{os.urandom(4).hex()}"
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_path(parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_pack(source: PatchSource, root: Path, target: Path, *, requested_split: str,
               workers: int = 4, chunk: int = CHUNK, progress: bool = True,
               force: bool = False, data_arg: str | None = None) -> tuple[Path, bool]:
    """Pack `source` (whose files lie under `root`) into the folder `target`.

    Returns (target, built); built is False when an up-to-date pack was already there.
    Everything is written into a temporary sibling folder that is renamed into place at the
    end; on any error (or Ctrl-C) it is removed and an existing pack stays as it was."""
    root, target = Path(root), Path(target)
    data_arg = data_arg or str(root)
    plan = _plan(source, root)
    rels = plan.pop("rels")
    _refuse_line_breaks(source, root)
    rels_sorted = sorted(set(rels))
    plan["sample"] = _sample(rels_sorted)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    n, s = len(source), source.size
    split_name = target.name.removeprefix("pack-")
    with _lock(parent, split_name):
        _clean_leftovers(parent, split_name)
        fp = _fingerprint(root, plan, rels_sorted)
        if not force and _up_to_date(target, root, fp, n):
            return target, False
        _require_space(parent, n, s)
        tmp = Path(tempfile.mkdtemp(prefix=f".pack-{split_name}.tmp-{os.getpid()}-",
                                    dir=parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; packs are shared like data
        t0 = time.perf_counter()
        try:
            sha256 = _stream_array(source, tmp, workers=workers, chunk=chunk,
                                   progress=progress, data_arg=data_arg)
            ids_raw, layout, has_paths = _write_index_files(source, tmp, rels)
            desc = source.describe()
            src_path = Path(desc["path"]) if desc.get("path") else root
            meta = {
                "format": FORMAT, "version": FORMAT_VERSION,
                "source": desc, "source_kind": source.kind,
                "source_root": os.path.abspath(root),  # as the source names it: links kept
                "source_path_rel": "." if src_path == root else _relpath(src_path, root),
                "requested_split": requested_split, "split": source.split,
                "n": n, "shape": [n, s, s, 3], "dtype": "uint8", "order": "C",
                "array": ARRAY_NAME, "sha256": sha256,
                "ids_txt_sha1": hashlib.sha1(ids_raw).hexdigest(),
                "ids_sha1": ids_fingerprint(source.ids),
                "labelled": source.labels is not None, "has_groups": source.groups is not None,
                "classes": list(source.classes),
                "path_layout": list(layout) if layout else None, "has_paths": has_paths,
                "data_files": rels_sorted if not isinstance(source, FileSource) else None,
                "fingerprint": fp, "sample": plan["sample"],
                "notes": list(source.notes)[:20],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            if _fingerprint(root, plan, rels_sorted) != fp:
                raise DataError(f"The data in {root} changed while it was being packed.",
                                path=root, fix="Pack again once nothing writes to it.")
            _write_file(tmp / "pack.json", (json.dumps(meta, indent=1) + "\n").encode())
            _swap_into_place(tmp, target, split_name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target, True


def verify_pack(pack_dir) -> bool:
    """Recompute the sha256 of the array file (and check ids/labels/size); True when the pack
    is intact. Reads the whole array."""
    try:
        p = load_pack(Path(pack_dir))
    except (PcamLensError, OSError):
        return False
    h = hashlib.sha256()
    with open(Path(pack_dir) / ARRAY_NAME, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest() == p.meta["sha256"]


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 2))


# --------------------------------------------------------------------------- CLI
