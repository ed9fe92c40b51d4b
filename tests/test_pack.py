"""model.pack: a packed cache of a Kaggle folder round-trips every patch byte for byte, is used
by open_source only while fresh, and is never left half-written (skipped without the real
sample). Everything is written under tmp_path; the per-user cache points there too."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from model.core.errors import DataError
from model.data import pack as packmod
from model.data.base import SubsetSource
from model.data.kaggle import KaggleSource
from model.data.open import open_source
from model.data.pack import (
    ARRAY_NAME,
    PackedSource,
    load_pack,
    open_packed_if_fresh,
    verify_pack,
)
from model.data.packing import pack
from model.pack import main

N_TRAIN = 200


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PCAM_LENS_CACHE", str(tmp_path / "user-cache"))
    packmod._warned.clear()


@pytest.fixture(scope="session")
def kaggle_template(kaggle_sample, tmp_path_factory):
    """A Kaggle folder with the first 200 training rows of the real sample and its 29 test
    patches; sample_submission.csv is written in reverse order so that "the submission's
    order" differs from the sorted file order."""
    root = tmp_path_factory.mktemp("pack-template") / "kaggle"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    with open(kaggle_sample / "train_labels.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))[:N_TRAIN]
    assert {r["label"] for r in rows} == {"0", "1"}
    with open(root / "train_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        for r in rows:
            shutil.copyfile(kaggle_sample / "train" / f"{r['id']}.tif",
                            root / "train" / f"{r['id']}.tif")
            w.writerow([r["id"], r["label"]])
    with open(kaggle_sample / "sample_submission.csv", encoding="utf-8-sig", newline="") as f:
        sub = list(csv.DictReader(f))
    with open(root / "sample_submission.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        for r in reversed(sub):
            shutil.copyfile(kaggle_sample / "test" / f"{r['id']}.tif",
                            root / "test" / f"{r['id']}.tif")
            w.writerow([r["id"], 0])
    return root


@pytest.fixture
def kaggle(kaggle_template, tmp_path):
    root = tmp_path / "kaggle"
    shutil.copytree(kaggle_template, root)
    return root


def _pack_dir(root, split="train"):
    return root / ".pcam-lens" / f"pack-{split}"


def _leftovers(folder):
    return sorted(p.name for p in folder.glob(".pack-*") if not p.name.endswith(".lock"))


def _bump_mtime(path, seconds=5):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


# --------------------------------------------------------------------------- round trip


def test_pack_round_trips_every_patch(kaggle):
    target, built = pack(kaggle, "train", progress=False, workers=2)
    assert built and target == _pack_dir(kaggle)
    orig = KaggleSource(kaggle, "train")
    src = open_source(kaggle, "train")
    assert isinstance(src, PackedSource) and src.kind == "packed"
    assert len(src) == len(orig) == N_TRAIN
    assert src.ids == orig.ids
    assert src.labels.dtype == np.int64 and np.array_equal(src.labels, orig.labels)
    assert src.classes == orig.classes and src.split == "train" and src.size == 96
    assert src.root == kaggle  # the original folder: review logs stay beside the data
    for i in range(len(orig)):
        a = src.read(i)
        assert a.dtype == np.uint8 and a.flags.writeable
        assert np.array_equal(a, orig.read(i)), i
        assert src.path_of(i) == orig.path_of(i)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, N_TRAIN, 64)
    assert np.array_equal(src.read_batch(idx), orig.read_batch(idx))
    assert src.read_batch([]).shape == (0, 96, 96, 3)
    assert np.array_equal(src.read_range(10, 20), orig.read_batch(range(10, 20)))
    # runs record the real data
    d = src.describe()
    assert d == {**orig.describe(), "packed": True}
    assert d["kind"] == "kaggle" and d["path"] == str(kaggle) and d["split"] == "train"
    assert src.source_kind == "kaggle"
    assert "packed" in src.describe_short()
    # subsets (train/valid splits) keep reading from the pack
    sub = src.subset([3, 1])
    assert isinstance(sub, SubsetSource) and sub.describe()["kind"] == "kaggle"
    assert np.array_equal(sub.read_batch([0, 1]), orig.read_batch([3, 1]))


def test_pack_files_and_pack_json(kaggle):
    target, _ = pack(kaggle, "train", progress=False)
    meta = json.loads((target / "pack.json").read_text())
    raw = (target / ARRAY_NAME).read_bytes()
    assert len(raw) == N_TRAIN * 96 * 96 * 3
    assert meta["sha256"] == hashlib.sha256(raw).hexdigest()
    assert meta["n"] == N_TRAIN and meta["shape"] == [N_TRAIN, 96, 96, 3]
    assert meta["dtype"] == "uint8" and meta["source_kind"] == "kaggle"
    assert meta["split"] == meta["requested_split"] == "train"
    assert meta["classes"] == ["no tumour", "tumour"]
    assert meta["source_root"] == str(kaggle.resolve())
    assert meta["path_layout"] == ["train/", ".tif"]
    fp = meta["fingerprint"]
    assert set(fp["files"]) == {"train_labels.csv"} and set(fp["dirs"]) == {"train"}
    assert fp["n_files"] == N_TRAIN
    # raw C-order bytes: a plain memmap with the recorded shape is the data
    mm = np.memmap(target / ARRAY_NAME, np.uint8, "r", shape=tuple(meta["shape"]))
    assert np.array_equal(mm[7], KaggleSource(kaggle).read(7))
    assert (target / "ids.txt").read_text().split("\n")[:-1] == KaggleSource(kaggle).ids
    assert np.load(target / "labels.npy").tolist() == KaggleSource(kaggle).labels.tolist()
    from model.data.base import ids_fingerprint

    assert meta["ids_sha1"] == ids_fingerprint(KaggleSource(kaggle).ids)
    assert _leftovers(target.parent) == []
    assert oct((target.stat().st_mode) & 0o055) != "0o0"  # readable by others (umask allowing)


def test_up_to_date_pack_is_kept_and_force_rebuilds(kaggle):
    target, built = pack(kaggle, "train", progress=False)
    created = (target / "pack.json").stat().st_mtime_ns
    assert pack(kaggle, "train", progress=False) == (target, False)
    assert (target / "pack.json").stat().st_mtime_ns == created
    assert pack(kaggle, "train", progress=False, force=True) == (target, True)
    assert _leftovers(target.parent) == []
    assert isinstance(open_source(kaggle), PackedSource)


def test_test_split_keeps_sample_submission_order(kaggle):
    target, _ = pack(kaggle, "test", progress=False)
    assert target == _pack_dir(kaggle, "test")
    orig = KaggleSource(kaggle, "test")
    with open(kaggle / "sample_submission.csv", newline="") as f:
        expected = [r["id"] for r in csv.DictReader(f)]
    assert expected != sorted(expected)  # the fixture reversed it
    src = open_source(kaggle, "test")
    assert isinstance(src, PackedSource) and src.split == "test"
    assert src.ids == orig.ids == expected
    assert src.labels is None and not src.labelled
    assert not (target / "labels.npy").exists()
    assert np.array_equal(src.read_batch(range(len(src))), orig.read_batch(range(len(orig))))
    assert src.describe() == {**orig.describe(), "packed": True}
    # the train split has no pack yet: it is read from the files
    assert isinstance(open_source(kaggle, "train"), KaggleSource)
    meta = json.loads((target / "pack.json").read_text())
    assert set(meta["fingerprint"]["files"]) == {"sample_submission.csv"}


def test_pickled_source_does_not_carry_the_pixels(kaggle):
    pack(kaggle, "train", progress=False)
    src = open_source(kaggle)
    src.read(0)
    blob = pickle.dumps(src)
    assert len(blob) < 100_000  # ids and labels, not 5.5 MB of pixels
    again = pickle.loads(blob)
    assert np.array_equal(again.read_batch([5, 9]), src.read_batch([5, 9]))


# --------------------------------------------------------------------------- freshness


def test_touching_a_patch_file_makes_the_pack_stale(kaggle, capsys):
    pack(kaggle, "train", progress=False)
    assert isinstance(open_source(kaggle), PackedSource)
    _bump_mtime(next((kaggle / "train").iterdir()))
    src = open_source(kaggle)
    assert isinstance(src, KaggleSource)
    err = capsys.readouterr().err
    assert "stale" in err and "python -m model.pack" in err and len(err.strip().splitlines()) == 1
    open_source(kaggle)  # warned once per process
    assert capsys.readouterr().err == ""
    # re-running the pack command notices the change and rebuilds
    assert pack(kaggle, "train", progress=False)[1] is True
    assert isinstance(open_source(kaggle), PackedSource)


@pytest.mark.parametrize("change", ["new labelled file", "new unlisted file", "removed file",
                                    "edited labels csv"])
def test_changes_to_the_folder_make_the_pack_stale(kaggle, change):
    pack(kaggle, "train", progress=False)
    first = next(iter(sorted((kaggle / "train").iterdir())))
    if change == "new labelled file":
        shutil.copyfile(first, kaggle / "train" / "extra.tif")
        with open(kaggle / "train_labels.csv", "a", newline="") as f:
            csv.writer(f).writerow(["extra", 1])
    elif change == "new unlisted file":
        shutil.copyfile(first, kaggle / "train" / "extra.tif")
    elif change == "removed file":
        first.unlink()
    else:
        text = (kaggle / "train_labels.csv").read_text()
        (kaggle / "train_labels.csv").write_text(text.replace(",0\n", ",1\n", 1))
    assert open_packed_if_fresh(kaggle, "train") is None
    assert isinstance(open_source(kaggle), KaggleSource)


def test_large_source_check_is_folder_level(kaggle, monkeypatch):
    """Above FULL_CHECK_MAX files the open-time check stats folders, the CSV and a sample
    only: added files are caught, a file overwritten in place is caught by the pack
    command (which always stats every file)."""
    monkeypatch.setattr(packmod, "SAMPLE_FILES", 4)
    pack(kaggle, "train", progress=False)
    monkeypatch.setattr(packmod, "FULL_CHECK_MAX", 0)
    meta = json.loads((_pack_dir(kaggle) / "pack.json").read_text())
    sampled = set(meta["sample"])
    assert len(sampled) == 4
    victim = next(p for p in sorted((kaggle / "train").iterdir())
                  if f"train/{p.name}" not in sampled)
    _bump_mtime(victim)
    assert isinstance(open_packed_if_fresh(kaggle, "train"), PackedSource)  # the trade-off
    assert pack(kaggle, "train", progress=False)[1] is True  # ...caught when re-packing
    _bump_mtime(kaggle / sorted(sampled)[0])
    assert open_packed_if_fresh(kaggle, "train") is None
    pack(kaggle, "train", progress=False)
    shutil.copyfile(victim, kaggle / "train" / "extra.tif")
    assert open_packed_if_fresh(kaggle, "train") is None


def test_damaged_pack_falls_back_with_a_warning(kaggle, capsys):
    target, _ = pack(kaggle, "train", progress=False)
    with open(target / ARRAY_NAME, "r+b") as f:
        f.truncate(1000)
    assert isinstance(open_source(kaggle), KaggleSource)
    assert "stale" in capsys.readouterr().err
    assert pack(kaggle, "train", progress=False)[1] is True  # rebuilt without --force
    assert isinstance(open_source(kaggle), PackedSource)


# --------------------------------------------------------------------------- writing safely


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_pack_leaves_nothing(kaggle, monkeypatch, exc):
    calls = []
    real = packmod._write_chunk

    def failing(f, arr, digest):
        calls.append(len(arr))
        if len(calls) == 2:
            raise exc("killed midway")
        real(f, arr, digest)

    monkeypatch.setattr(packmod, "_write_chunk", failing)
    with pytest.raises(exc):
        pack(kaggle, "train", progress=False, chunk=32, workers=2)
    assert len(calls) == 2
    assert not _pack_dir(kaggle).exists()
    assert _leftovers(kaggle / ".pcam-lens") == []
    assert isinstance(open_source(kaggle), KaggleSource)


def test_failed_rebuild_keeps_the_old_pack(kaggle, monkeypatch):
    target, _ = pack(kaggle, "train", progress=False)
    sha = json.loads((target / "pack.json").read_text())["sha256"]

    def failing(f, arr, digest):
        raise RuntimeError("disk full")

    monkeypatch.setattr(packmod, "_write_chunk", failing)
    with pytest.raises(RuntimeError):
        pack(kaggle, "train", progress=False, force=True)
    assert json.loads((target / "pack.json").read_text())["sha256"] == sha
    assert _leftovers(target.parent) == []
    assert verify_pack(target) and isinstance(open_source(kaggle), PackedSource)


def test_leftovers_of_killed_packs_are_cleaned(kaggle):
    parent = kaggle / ".pcam-lens"
    parent.mkdir()
    dead = parent / ".pack-train.tmp-999999999-abc"  # no such pid
    dead.mkdir()
    (dead / ARRAY_NAME).write_bytes(b"half")
    assert open_packed_if_fresh(kaggle, "train") is None  # never mistaken for a pack
    pack(kaggle, "train", progress=False)
    assert not dead.exists() and _leftovers(parent) == []


def test_unreadable_image_stops_the_pack_naming_the_file(kaggle):
    victim = sorted((kaggle / "train").iterdir())[150]
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(DataError) as e:
        pack(kaggle, "train", progress=False, chunk=32)
    msg = str(e.value)
    assert victim.name in msg and "python -m model.inspect" in msg
    assert e.value.path == str(victim)
    assert not _pack_dir(kaggle).exists() and _leftovers(kaggle / ".pcam-lens") == []


def test_verify_pack_detects_a_flipped_byte(kaggle, capsys):
    target, _ = pack(kaggle, "train", progress=False)
    assert verify_pack(target)
    assert main(["--verify", str(target)]) == 0
    with open(target / ARRAY_NAME, "r+b") as f:
        f.seek(123_457)
        b = f.read(1)
        f.seek(123_457)
        f.write(bytes([b[0] ^ 0x01]))
    assert not verify_pack(target)
    assert main(["--verify", str(kaggle)]) == 1  # finds DATA/.pcam-lens/pack-*
    assert "DAMAGED" in capsys.readouterr().out


# --------------------------------------------------------------------------- locations, CLI


def test_cli_out_folder_and_split_all(kaggle, tmp_path, capsys):
    out = tmp_path / "packs"
    assert main([str(kaggle), "--split", "all", "--out", str(out), "--no-progress",
                 "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "packed 200 patches" in text and "packed 29 patches" in text
    assert (out / "pack-train" / "pack.json").exists()
    assert (out / "pack-test" / "pack.json").exists()
    assert not (kaggle / ".pcam-lens").exists()  # --out writes nothing beside the data
    # the data folder does not know about it...
    assert isinstance(open_source(kaggle), KaggleSource)
    # ...but the --out folder (or the pack folder itself) opens as the data
    src = open_source(out, "train")
    assert isinstance(src, PackedSource) and src.describe()["path"] == str(kaggle.resolve())
    test = open_source(out / "pack-test", "test")
    assert isinstance(test, PackedSource) and test.split == "test"
    assert main([str(kaggle), "--out", str(out), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    # a pack asked for by name that no longer matches its data is an error, not a fallback
    _bump_mtime(kaggle / "train_labels.csv")
    with pytest.raises(DataError, match="stale"):
        open_source(out, "train")


def test_read_only_data_packs_into_the_user_cache(kaggle, tmp_path, monkeypatch):
    monkeypatch.setattr(packmod, "_writable", lambda folder: False)
    target, _ = pack(kaggle, "train", progress=False)
    assert tmp_path / "user-cache" / "packs" in target.parents
    assert target.name == "pack-train" and not (kaggle / ".pcam-lens").exists()
    src = open_source(kaggle)
    assert isinstance(src, PackedSource) and src.root == kaggle


def test_refusals(kaggle, tmp_path, capsys):
    with pytest.raises(DataError, match="synthetic"):
        pack("synthetic")
    with pytest.raises(DataError, match="does not exist"):
        pack(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    classes = tmp_path / "classes"
    for name in ("a", "b"):
        (classes / name).mkdir(parents=True)
        shutil.copyfile(next((kaggle / "train").iterdir()), classes / name / "x.tif")
    with pytest.raises(DataError, match="resizes"):
        pack(classes)
    assert main([str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "error:" in capsys.readouterr().err


def test_load_pack_refuses_other_versions(kaggle):
    target, _ = pack(kaggle, "train", progress=False)
    meta = json.loads((target / "pack.json").read_text())
    meta["version"] = 99
    (target / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="version"):
        load_pack(target)
    assert isinstance(open_source(kaggle), KaggleSource)


def test_pcam_h5_folder_packs_too(h5_sample, tmp_path):
    out = tmp_path / "h5-packs"
    assert main([str(h5_sample), "--out", str(out), "--no-progress"]) == 0
    orig = open_source(h5_sample, use_pack=False)
    src = open_source(out)
    assert isinstance(src, PackedSource) and src.split == orig.split == "valid"
    assert src.ids == orig.ids and np.array_equal(src.labels, orig.labels)
    assert np.array_equal(src.read_batch(range(len(src))), orig.read_batch(range(len(orig))))
    assert src.describe() == {**orig.describe(), "packed": True}
    assert src.path_of(0) is None


def test_loader_workers_read_the_pack(kaggle):
    from model.data.batches import iter_batches

    pack(kaggle, "train", progress=False)
    src = open_source(kaggle)
    got = np.concatenate([x.numpy() for _, x in iter_batches(src, 64, workers=1)])
    assert np.array_equal(got, KaggleSource(kaggle).read_batch(range(N_TRAIN)))
