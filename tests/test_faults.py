"""Fault suite: bad inputs, interruptions, full or read-only disks and unsafe files, each
exercised end to end through the command-line tools (`model.train/inspect/evaluate/predict/
pack`, their `main(argv)` in-process; a few as real `python -m` subprocesses).

Every refused input must give: exit status 2 (PcamLensError), a message naming the file or the
problem, no traceback, and no partial output (no run directory, no submission, no evaluation
folder, no pack, no *.tmp file). Harmless oddities (a PNG named .tif, 16-bit, grayscale, RGBA,
a CSV with a BOM and extra columns, a file name that is not UTF-8) must work, with a note
where something was converted or ignored.

Data: small folders made from real patches of the shared PCam sample (generated patches when it
is absent, see conftest.patch_files), the built-in synthetic set, and one tiny trained run
(resnet18 from scratch, one epoch on 96 synthetic patches) for evaluate/predict.
"""
from __future__ import annotations

import ast
import errno
import gzip
import importlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tomllib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import write_rows
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SYNTH_TEST = "synthetic:n=12,seed=7"
X_TEST = "camelyonpatch_level_2_split_test_x.h5"
X_VALID = "camelyonpatch_level_2_split_valid_x.h5"
Y_VALID = "camelyonpatch_level_2_split_valid_y.h5"
# small & fast from-scratch training for the tests that must train more than once
SMALL_TRAIN = ["--no-pretrained", "--arch", "mobilenetv3_small_050", "--no-lr-find",
               "--bs", "8", "--seed", "0"]


@pytest.fixture(autouse=True)
def _private_homes(tmp_path, monkeypatch):
    """Review logs and pack caches go to tmp, never to ~."""
    monkeypatch.setenv("PCAM_LENS_HOME", str(tmp_path / "_home"))
    monkeypatch.setenv("PCAM_LENS_CACHE", str(tmp_path / "_cache"))
    monkeypatch.setenv("PCAM_LENS_RUNS", str(tmp_path / "_runs"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny real run for evaluate/predict (shared read-only by the whole module)."""
    from model.train import main

    run = tmp_path_factory.mktemp("faults-run") / "tiny"
    rc = main(["--no-pretrained", "--arch", "resnet18", "--data", "synthetic:n=96",
               "--no-checks", "--no-lr-find", "--frozen-epochs", "0", "--epochs", "1",
               "--bs", "16", "--run-dir", str(run)])
    assert rc == 0
    return run


# --------------------------------------------------------------------------- helpers


def cli(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `python -m model.<module> argv` in-process; (exit status, stdout, stderr). An
    exception escaping main() is what would print a traceback: it fails the test as such."""
    mod = importlib.import_module(f"model.{module}")
    capsys.readouterr()
    try:
        rc = mod.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    except BaseException as e:  # noqa: BLE001
        pytest.fail(f"python -m model.{module} {' '.join(map(str, argv))} would print a "
                    f"traceback: {type(e).__name__}: {e}")
    out, err = capsys.readouterr()
    return rc, out, err


def files_under(root: Path) -> set[Path]:
    return {p for p in Path(root).rglob("*") if p.is_file() or p.is_symlink()}


def temp_files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


def real_patch(patch_files, k: int) -> np.ndarray:
    return np.asarray(Image.open(patch_files[k][2]).convert("RGB"))


def kaggle_dir(root: Path, patch_files, n: int = 12, *, rows=None,
               images: dict | None = None) -> Path:
    """A Kaggle folder: train/<id>.tif for the first `n` patches and train_labels.csv.
    `rows` replaces the CSV rows; `images` maps id -> bytes / array / None (no file) and
    overrides or adds files."""
    (root / "train").mkdir(parents=True)
    chosen = patch_files[:n]
    for pid, _, path in chosen:
        shutil.copyfile(path, root / "train" / f"{pid}.tif")
    for pid, img in (images or {}).items():
        dest = root / "train" / f"{pid}.tif"
        if img is None:
            dest.unlink(missing_ok=True)
        elif isinstance(img, bytes):
            dest.write_bytes(img)
        else:
            Image.fromarray(img).save(dest)
    write_rows(root / "train_labels.csv",
               rows if rows is not None else [(pid, lab) for pid, lab, _ in chosen])
    return root


def image_folder(root: Path, patch_files, n: int = 4) -> Path:
    root.mkdir(parents=True)
    for pid, _, path in patch_files[:n]:
        shutil.copyfile(path, root / f"{pid}.tif")
    return root


def h5(path: Path, name: str, data) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height with almost no pixel data (a 'bomb')."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def encoded(img: np.ndarray | Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format=fmt)
    return buf.getvalue()


def copy_run(run: Path, dest: Path, files=("config.json", "valid_ids.csv", "train_ids.csv")
             ) -> Path:
    dest.mkdir(parents=True)
    for name in files:
        shutil.copyfile(run / name, dest / name)
    return dest


# --------------------------------------------------------------------------- the table
#
# Each case builds its input in `tmp` and returns the argv of one CLI. Refusals (rc 2) must
# leave no new file anywhere under tmp; for the others `check` looks at the outcome.


@dataclass
class Case:
    kind: str  # the fault kind (several cases may exercise one kind through several CLIs)
    cli: str
    setup: Callable  # (tmp, ctx) -> argv
    rc: int = 2
    # must all appear in stderr (rc 2) or stdout (rc 0/1); a callable gets the Ctx
    fragments: tuple[str | Callable, ...] = ()
    needs_run: bool = False
    check: Callable | None = None  # (tmp, out, err) -> None, for rc 0/1


class Ctx:
    def __init__(self, patch_files, run=None):
        self.patches, self.run = patch_files, run


def _train(data, tmp, *extra):
    return ["--data", data, "--run-dir", tmp / "run", *SMALL_TRAIN, "--frozen-epochs", "0",
            "--epochs", "1", *extra]


def _predict(c: Ctx, data, tmp, *extra):
    return [c.run, "--data", data, "--out", tmp / "out" / "submission.csv", "--no-progress",
            "--batch-size", "8", *extra]


def _evaluate(run, tmp, *extra):
    return [run, "--out", tmp / "eval", "--no-progress", "--n-boot", "20", *extra]


def _truncated(tmp, c):
    pid = c.patches[3][0]
    kaggle_dir(tmp / "k", c.patches, images={pid: c.patches[3][2].read_bytes()[:1000]})
    return _train(tmp / "k", tmp)


def _zero_byte(tmp, c):
    pid = c.patches[2][0]
    kaggle_dir(tmp / "k", c.patches, images={pid: b""})
    return _train(tmp / "k", tmp, "--no-checks")  # no checks: the loader itself must refuse


def _converted(kind):
    def setup(tmp, c):
        a = real_patch(c.patches, 1)
        img = {"png": encoded(a, "PNG"),
               "16bit": encoded(Image.fromarray(a[..., 0].astype(np.uint16) * 257), "TIFF"),
               "gray": encoded(a[..., 1], "TIFF"),
               "rgba": encoded(np.dstack([a, np.full(a.shape[:2], 200, np.uint8)]), "PNG")}[kind]
        kaggle_dir(tmp / "k", c.patches, images={c.patches[1][0]: img})
        return [tmp / "k", "--json", tmp / "report.json", "--no-progress"]
    return setup


def _check_converted(note):
    def check(tmp, out, err):
        rep = json.loads((tmp / "report.json").read_text())
        if note is None:
            assert rep["converted"] == [] and rep["unreadable"] == []
        else:
            assert [c["note"] for c in rep["converted"]] and note in rep["converted"][0]["note"]
        assert "converted images" in out
    return check


def _wrong_size(tmp, c):
    kaggle_dir(tmp / "k", c.patches, images={c.patches[4][0]: real_patch(c.patches, 4)[:, :95]})
    return _train(tmp / "k", tmp)


def _bom_extra_columns(tmp, c):
    root = kaggle_dir(tmp / "k", c.patches)
    rows = [("slide", p, lab, "x") for p, lab, _ in c.patches[:12]]
    write_rows(root / "train_labels.csv", rows, header=("wsi", "ID ", " Label", "note"),
               encoding="utf-8-sig")
    assert (root / "train_labels.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    return [root, "--json", tmp / "report.json", "--no-progress"]


def _rows(c, n=12):
    return [(p, lab) for p, lab, _ in c.patches[:n]]


def _duplicate_conflict(tmp, c):
    rows = _rows(c) + [(c.patches[0][0], 1 - c.patches[0][1])]
    kaggle_dir(tmp / "k", c.patches, rows=rows)
    return _train(tmp / "k", tmp)


def _bad_label(value):
    def setup(tmp, c):
        rows = _rows(c)
        rows[1] = (rows[1][0], value)
        kaggle_dir(tmp / "k", c.patches, rows=rows)
        return _train(tmp / "k", tmp)
    return setup


def _bad_id(value):
    def setup(tmp, c):
        kaggle_dir(tmp / "k", c.patches, rows=_rows(c) + [(value, 0)])
        return _train(tmp / "k", tmp)
    return setup


def _non_utf8_name_inspect(tmp, c):
    root = kaggle_dir(tmp / "k", c.patches)
    (root / "train").joinpath(os.fsdecode(b"caf\xe9-\xff.tif")).write_bytes(
        c.patches[20][2].read_bytes())
    return [root, "--json", tmp / "report.json", "--no-progress"]


def _check_non_utf8_inspect(tmp, out, err):
    rep = json.loads((tmp / "report.json").read_text())
    assert rep["unlabelled_files"] == ["caf\\xe9-\\xff.tif"]
    assert "files without labels" in out and "caf\\xe9-\\xff.tif" in out


def _non_utf8_name_predict(tmp, c):
    folder = image_folder(tmp / "imgs", c.patches, 3)
    folder.joinpath(os.fsdecode(b"bad-\xff.tif")).write_bytes(c.patches[9][2].read_bytes())
    return _predict(c, folder, tmp)


def _check_non_utf8_predict(tmp, out, err):
    sub = pd.read_csv(tmp / "out" / "submission.csv", dtype={"id": str})
    assert len(sub) == 3 and not any("bad" in i for i in sub["id"])
    assert "not valid UTF-8" in out and "bad-\\xff.tif" in out


def _non_utf8_csv(tmp, c):
    root = kaggle_dir(tmp / "k", c.patches)
    (root / "train_labels.csv").write_bytes(
        b"id,label\n" + c.patches[0][0].encode() + b",0\n\xff\xfeabc,1\n")
    return [root, "--no-progress"]


def _h5_bad(data):
    def setup(tmp, c):
        h5(tmp / X_VALID, "x", data)
        return _train(tmp / X_VALID, tmp)
    return setup


def _h5_patches(c, n=6):
    return np.stack([real_patch(c.patches, k) for k in range(n)])


def _h5_no_y_train(tmp, c):
    h5(tmp / X_VALID, "x", _h5_patches(c))
    return _train(tmp / X_VALID, tmp)


def _h5_no_y_predict(tmp, c):
    (tmp / "h5").mkdir()
    h5(tmp / "h5" / X_TEST, "x", _h5_patches(c))
    return _predict(c, tmp / "h5" / X_TEST, tmp)


def _check_h5_predict(tmp, out, err):
    sub = pd.read_csv(tmp / "out" / "submission.csv")
    assert list(sub.columns) == ["id", "label"] and len(sub) == 6


def _h5_gz(tmp, c):
    (tmp / (X_VALID + ".gz")).write_bytes(gzip.compress(b"hdf5 would be here"))
    return _train(tmp / (X_VALID + ".gz"), tmp)


def _bomb_predict(tmp, c):
    folder = image_folder(tmp / "imgs", c.patches, 3)
    (folder / "zz-bomb.png").write_bytes(png_header_only(30_000, 30_000))
    return _predict(c, folder, tmp)


def _no_run(tmp, c):
    return [tmp / "no-such-run", "--data", SYNTH_TEST, "--out", tmp / "out" / "s.csv"]


def _resume_no_run(tmp, c):
    return ["--resume", tmp / "no-such-run"]


def _missing_weights(tmp, c):
    run = copy_run(c.run, tmp / "r")
    return _predict(Ctx(c.patches, run), SYNTH_TEST, tmp)


def _corrupt_weights(tmp, c):
    run = copy_run(c.run, tmp / "r")
    (run / "best.safetensors").write_bytes((c.run / "best.safetensors").read_bytes()[:4096])
    return _predict(Ctx(c.patches, run), SYNTH_TEST, tmp)


def _future_config(tmp, c):
    run = copy_run(c.run, tmp / "r")
    cfg = json.loads((run / "config.json").read_text())
    cfg["format_version"] = 99
    (run / "config.json").write_text(json.dumps(cfg))
    return _evaluate(run, tmp)


def _invalid_config(tmp, c):
    run = copy_run(c.run, tmp / "r")
    (run / "config.json").write_text('{"format": "pcam-lens-run", ')
    return _evaluate(run, tmp)


def _flag(*argv):
    def setup(tmp, c):
        return ["--data", "synthetic:n=32", "--run-dir", tmp / "run", "--no-checks",
                "--no-pretrained", *argv]
    return setup


def _tta9(tmp, c):
    return _predict(c, SYNTH_TEST, tmp, "--tta", "9")


def _eval_threshold(tmp, c):
    return _evaluate(c.run, tmp, "--threshold", "1.5")


def _batch_size0(tmp, c):
    return _predict(c, SYNTH_TEST, tmp, "--batch-size", "0")


def _out_is_folder(tmp, c):
    (tmp / "out" / "submission.csv").mkdir(parents=True)
    return _predict(c, SYNTH_TEST, tmp)


def _empty_folder(tmp, c):
    (tmp / "empty").mkdir()
    return _train(tmp / "empty", tmp)


def _non_images(tmp, c):
    (tmp / "docs").mkdir()
    (tmp / "docs" / "notes.txt").write_text("hello")
    (tmp / "docs" / "slides.pdf").write_bytes(b"%PDF-1.4")
    return _train(tmp / "docs", tmp)


def _kaggle_no_labels_csv(tmp, c):
    root = kaggle_dir(tmp / "k", c.patches)
    (root / "train_labels.csv").unlink()
    return _train(root, tmp)


def _labels_without_files(tmp, c):
    gone = c.patches[5][0]
    kaggle_dir(tmp / "k", c.patches, images={gone: None})
    return _train(tmp / "k", tmp)


def _symlink_out(tmp, c):
    outside = tmp / "outside"
    outside.mkdir()
    shutil.copyfile(c.patches[30][2], outside / "secret.tif")
    root = kaggle_dir(tmp / "k", c.patches, rows=_rows(c) + [("linked", 1)])
    os.symlink(outside / "secret.tif", root / "train" / "linked.tif")
    return _train(root, tmp)


def _symlink_out_predict(tmp, c):
    outside = tmp / "outside"
    outside.mkdir()
    shutil.copyfile(c.patches[30][2], outside / "secret.tif")
    root = kaggle_dir(tmp / "k", c.patches)
    (root / "test").mkdir()
    shutil.copyfile(c.patches[0][2], root / "test" / "t0.tif")
    os.symlink(outside / "secret.tif", root / "test" / "t1.tif")
    return _predict(c, root, tmp)


def _pack_truncated(tmp, c):
    pid = c.patches[6][0]
    kaggle_dir(tmp / "k", c.patches, images={pid: c.patches[6][2].read_bytes()[:700]})
    return [tmp / "k", "--out", tmp / "packs", "--no-progress"]


def _inspect_missing(tmp, c):
    return [tmp / "nowhere", "--no-progress"]


CASES = [
    Case("truncated TIFF", "train", _truncated,
         fragments=("unusable patches", lambda c: f"{c.patches[3][0]} (unreadable)",
                    "--drop-bad")),
    Case("0-byte file", "train", _zero_byte,
         fragments=("Cannot decode image", lambda c: f"{c.patches[2][0]}.tif")),
    Case("PNG renamed .tif (works)", "inspect", _converted("png"), rc=0,
         check=_check_converted(None)),
    Case("16-bit TIFF (converted with a note)", "inspect", _converted("16bit"), rc=0,
         check=_check_converted("16-bit")),
    Case("grayscale (converted)", "inspect", _converted("gray"), rc=0,
         check=_check_converted("L converted")),
    Case("RGBA (converted)", "inspect", _converted("rgba"), rc=0,
         check=_check_converted("alpha composited on white")),
    Case("95x96 patch", "train", _wrong_size,
         fragments=(lambda c: f"{c.patches[4][0]} (wrong size)", "--drop-bad")),
    Case("CSV with BOM and extra columns (works)", "inspect", _bom_extra_columns, rc=0,
         fragments=("patches inspected",), check=_check_converted(None)),
    Case("duplicate ids with conflicting labels", "train", _duplicate_conflict,
         fragments=("appears twice", "train_labels.csv")),
    Case("label 2", "train", _bad_label("2"), fragments=("label '2'", "row 3")),
    Case("label -1", "train", _bad_label("-1"), fragments=("label '-1'", "row 3")),
    Case("label 'yes'", "train", _bad_label("yes"), fragments=("label 'yes'", "row 3")),
    Case("id with ../", "train", _bad_id("../../etc/x"), fragments=("not a plain file name",
                                                                   "train_labels.csv")),
    Case("id that is an absolute path", "train", _bad_id("/etc/passwd"),
         fragments=("not a plain file name",)),
    Case("non-UTF-8 file name in train/ (a file without labels)", "inspect",
         _non_utf8_name_inspect, rc=0, check=_check_non_utf8_inspect),
    Case("non-UTF-8 file name in a test folder (ignored with a note)", "predict",
         _non_utf8_name_predict, rc=0, needs_run=True, check=_check_non_utf8_predict),
    Case("non-UTF-8 CSV", "inspect", _non_utf8_csv, fragments=("not UTF-8",
                                                             "train_labels.csv")),
    Case("HDF5 with wrong dtype", "train", _h5_bad(np.zeros((4, 96, 96, 3), np.float32)),
         fragments=("float32", "expected uint8", X_VALID)),
    Case("HDF5 with wrong shape", "train", _h5_bad(np.zeros((4, 64, 64, 3), np.uint8)),
         fragments=("[4, 64, 64, 3]", X_VALID)),
    Case("empty HDF5", "train", _h5_bad(np.zeros((0, 96, 96, 3), np.uint8)),
         fragments=("holds no patches", X_VALID)),
    Case("missing _y.h5 file: training needs labels", "train", _h5_no_y_train,
         fragments=("has no labels", "training needs labels")),
    Case("missing _y.h5 file: prediction works", "predict", _h5_no_y_predict, rc=0,
         needs_run=True, check=_check_h5_predict),
    Case(".h5.gz", "train", _h5_gz, fragments=("gzip", "gunzip -k")),
    Case("decompression bomb image", "predict", _bomb_predict, needs_run=True,
         fragments=("zz-bomb.png", "too large to decode safely")),
    Case("nonexistent run", "predict", _no_run, fragments=("does not exist", "no-such-run")),
    Case("resume of a nonexistent run", "train", _resume_no_run,
         fragments=("does not exist", "no-such-run")),
    Case("run with missing weights", "predict", _missing_weights, needs_run=True,
         fragments=("best.safetensors is missing",)),
    Case("run with corrupted (truncated) weights", "predict", _corrupt_weights,
         needs_run=True, fragments=("is corrupted", "best.safetensors")),
    Case("config.json from a future version", "evaluate", _future_config, needs_run=True,
         fragments=("version 99", "Upgrade pcam-lens")),
    Case("config.json that is not JSON", "evaluate", _invalid_config, needs_run=True,
         fragments=("not valid JSON", "config.json")),
    Case("unknown --arch", "train", _flag("--arch", "resnet-9000"),
         fragments=("Unknown architecture 'resnet-9000'",)),
    Case("--valid-pct 1.5", "train", _flag("--arch", "resnet18", "--valid-pct", "1.5"),
         fragments=("--valid-pct must be between 0 and 1",)),
    Case("--lr abc", "train", _flag("--lr", "abc"), fragments=("--lr 'abc' is not a number",)),
    Case("--tta 9", "predict", _tta9, needs_run=True, fragments=("tta must be", "got 9")),
    Case("--threshold 1.5", "evaluate", _eval_threshold, needs_run=True,
         fragments=("threshold must be in [0, 1]",)),
    Case("--batch-size 0", "predict", _batch_size0, needs_run=True,
         fragments=("batch_size must be a positive",)),
    Case("--out is a folder", "predict", _out_is_folder, needs_run=True,
         fragments=("submission.csv", "is a folder")),
    Case("empty folder", "train", _empty_folder, fragments=("is empty",)),
    Case("folder of non-images", "train", _non_images,
         fragments=("holds no images", "notes.txt")),
    Case("Kaggle folder without train_labels.csv", "train", _kaggle_no_labels_csv,
         fragments=("train_labels.csv does not exist",)),
    Case("labels CSV listing ids without files", "train", _labels_without_files,
         fragments=(lambda c: f"{c.patches[5][0]} (missing file)", "--drop-bad")),
    Case("symlink in train/ pointing outside the data folder", "train", _symlink_out,
         fragments=("linked (unreadable)", "--drop-bad")),
    Case("symlink in test/ pointing outside the data folder", "predict",
         _symlink_out_predict, needs_run=True, fragments=("symbolic link", "t1.tif")),
    Case("pack of a folder with a truncated TIFF", "pack", _pack_truncated,
         fragments=("Cannot pack patch", lambda c: f"{c.patches[6][0]}.tif")),
    Case("inspect of a missing folder", "inspect", _inspect_missing,
         fragments=("does not exist", "nowhere")),
]
FAULT_KINDS = {c.kind for c in CASES}


def test_the_suite_covers_at_least_25_fault_kinds():
    assert len(CASES) == len({(c.kind, c.cli) for c in CASES})
    assert len(FAULT_KINDS) >= 25, len(FAULT_KINDS)
    assert {c.cli for c in CASES} == {"train", "inspect", "evaluate", "predict", "pack"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.cli}: {c.kind}")
def test_fault(case: Case, tmp_path, patch_files, capsys, request):
    ctx = Ctx(patch_files, request.getfixturevalue("trained_run") if case.needs_run else None)
    work = tmp_path / "w"
    work.mkdir()
    argv = case.setup(work, ctx)
    run_before = files_under(ctx.run) if ctx.run else set()
    before = files_under(work)
    rc, out, err = cli(case.cli, argv, capsys)
    text = err if case.rc == 2 else out
    assert rc == case.rc, f"exit {rc}, expected {case.rc}\nstdout: {out[-2000:]}\nstderr: {err}"
    assert "Traceback" not in err and "Traceback" not in out
    for frag in case.fragments:
        frag = frag(ctx) if callable(frag) else frag
        assert frag in text, f"{frag!r} not in:\n{text}"
    if case.rc == 2:
        # one message line (progress bars may precede it on stderr)
        assert len([ln for ln in err.splitlines() if ln.startswith(("error:", "usage:"))]) == 1, err
        new = {p for p in files_under(work) - before if not p.name.endswith(".lock")}
        assert not new, f"partial output left behind: {sorted(map(str, new))}"
        assert not (work / "run").exists(), "a failed training left a run directory"
    else:
        case.check(work, out, err)
    assert not temp_files(work), temp_files(work)
    if ctx.run:
        assert files_under(ctx.run) == run_before, "the shared run was modified"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is visible")
def test_device_cuda_without_gpu(tmp_path, capsys):
    rc, out, err = cli("train", _flag("--device", "cuda")(tmp_path, None), capsys)
    assert rc == 2 and "no CUDA GPU is visible" in err and "--device cpu" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_truncated_tiff_is_named_by_inspect(tmp_path, patch_files, capsys):
    pid = patch_files[3][0]
    kaggle_dir(tmp_path / "k", patch_files, images={pid: patch_files[3][2].read_bytes()[:1000]})
    rc, out, err = cli("inspect", [tmp_path / "k", "--json", tmp_path / "r.json",
                                   "--no-progress"], capsys)
    assert rc == 1 and "unreadable" in out and pid in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [u["id"] for u in rep["unreadable"]] == [pid]
    assert f"{pid}.tif" in rep["unreadable"][0]["message"]


def test_symlinks_inside_the_data_folder_are_fine_outside_refused(tmp_path, patch_files,
                                                                    capsys):
    """Decision: a patch file that is a symbolic link resolving outside the data folder is not
    read (DataError naming it; inspect counts it unreadable; --drop-bad drops it). Links inside
    the folder, and a linked train/ folder as a whole, are followed."""
    from model.core.errors import DataError
    from model.data.open import open_source

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(patch_files[30][2], outside / "secret.tif")
    root = kaggle_dir(tmp_path / "k", patch_files,
                      rows=_rows(Ctx(patch_files)) + [("inside", 0), ("escape", 1)])
    os.symlink(root / "train" / f"{patch_files[0][0]}.tif", root / "train" / "inside.tif")
    os.symlink(outside / "secret.tif", root / "train" / "escape.tif")
    src = open_source(root, use_pack=False)
    assert src.read(src.index_of("inside")).shape == (96, 96, 3)
    with pytest.raises(DataError, match="symbolic link") as e:
        src.read(src.index_of("escape"))
    assert "escape.tif" in str(e.value) and str(outside / "secret.tif") in str(e.value)
    rc, out, _ = cli("inspect", [root, "--json", tmp_path / "r.json", "--no-progress"], capsys)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rc == 1 and [u["id"] for u in rep["unreadable"]] == ["escape"]
    # a linked train/ folder (data on another disk) is fine
    moved = tmp_path / "elsewhere"
    shutil.move(root / "train", moved)
    (moved / "escape.tif").unlink()
    os.symlink(moved, root / "train")
    write_rows(root / "train_labels.csv", _rows(Ctx(patch_files)))
    rc, out, _ = cli("inspect", [root, "--json", tmp_path / "r2.json", "--no-progress"],
                     capsys)
    assert rc == 0, out


@pytest.mark.slow
def test_labels_without_files_train_with_drop_bad(tmp_path, patch_files, capsys):
    """The same folder that is refused without --drop-bad trains with it, the missing patch
    left out of the split."""
    gone = patch_files[5][0]
    kaggle_dir(tmp_path / "k", patch_files, n=24, images={gone: None})
    rc, out, err = cli("train", [*_train(tmp_path / "k", tmp_path), "--drop-bad"], capsys)
    assert rc == 0, err
    assert "Dropped" in out and "Traceback" not in err
    ids = set(pd.read_csv(tmp_path / "run" / "train_ids.csv", dtype={"id": str})["id"]) | set(
        pd.read_csv(tmp_path / "run" / "valid_ids.csv", dtype={"id": str})["id"])
    assert len(ids) == 23 and gone not in ids


@pytest.mark.slow  # starts Python subprocesses (torch import each)
def test_cli_subprocesses_exit_2_without_traceback(tmp_path, patch_files):
    """The same refusals as real processes: `python -m model.<cli>`, exit status 2, one
    'error:' line naming the problem, nothing written."""
    rows = _rows(Ctx(patch_files))
    rows[1] = (rows[1][0], "yes")
    kaggle_dir(tmp_path / "k", patch_files, rows=rows)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    runs = [
        (["model.train", *map(str, _train(tmp_path / "k", tmp_path))], "label 'yes'"),
        (["model.predict", str(tmp_path / "nope"), "--data", SYNTH_TEST, "--out",
          str(tmp_path / "s.csv")], "does not exist"),
    ]
    for argv, fragment in runs:
        before = files_under(tmp_path)
        r = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error:") and fragment in r.stderr
        assert "Traceback" not in r.stderr + r.stdout
        assert files_under(tmp_path) == before


# --------------------------------------------------------------------------- interruption

_SLOW_WRITER = textwrap.dedent('''
    """Test harness (not production code): run a CLI with model.core.atomic's writer patched to
    stop between writing the temporary file and renaming it, so that the test can SIGKILL
    the process at exactly that moment. argv: MARKER TARGET_NAME NTH MODULE ARGS..."""
    import sys, time
    from pathlib import Path

    sys.path.insert(0, {repo!r})
    marker, target, nth, module = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    import model.core.atomic as A

    calls = {{"n": 0}}

    def stall(path, f):
        if Path(path).name != target:
            return
        calls["n"] += 1
        if calls["n"] == nth:
            f.flush()
            Path(marker).write_text(str(calls["n"]))
            time.sleep(600)  # the test kills us here: temp file complete, not yet renamed

    def write_bytes(path, data, *, fsync=True):
        with A.atomic_open(path, "wb", fsync=fsync) as f:
            f.write(data)
            stall(path, f)

    def write_csv(path, df, *, fsync=True):
        with A.atomic_open(path, "w", fsync=fsync) as f:
            text = df.to_csv(index=False)
            f.write(text[: len(text) // 2])  # half a file on disk under the temp name
            stall(path, f)
            f.write(text[len(text) // 2:])

    A.write_bytes, A.write_csv = write_bytes, write_csv
    import importlib
    sys.exit(importlib.import_module("model." + module).main(sys.argv[5:]))
''')


def _run_until_stalled(tmp_path, target: str, nth: int, module: str, args: list,
                       timeout: float = 300) -> subprocess.Popen:
    script = tmp_path / "slow_writer.py"
    script.write_text(_SLOW_WRITER.format(repo=str(REPO)))
    marker = tmp_path / f"stalled-{target}-{nth}"
    log = open(tmp_path / f"{module}.log", "wb")
    proc = subprocess.Popen([sys.executable, str(script), str(marker), target, str(nth),
                             module, *map(str, args)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    t0 = time.time()
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"{module} ended (exit {proc.returncode}) before the "
                                     f"write to stall:\n"
                                     + (tmp_path / f"{module}.log").read_text()[-3000:])
            assert time.time() - t0 < timeout, "too slow to reach the write"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("nth, epochs_kept", [(2, 0), (3, 1)],
                         ids=["during the first epoch's checkpoint",
                              "during the second epoch's checkpoint"])
def test_sigkill_during_checkpoint_write_then_resume(tmp_path, nth, epochs_kept):
    """SIGKILL between writing resume.safetensors' temp file and renaming it (the riskiest
    moment of a checkpoint): the run stays loadable, the half-made checkpoint is invisible to
    loaders, and --resume removes the leftover and completes the run. Write 1 of
    resume.safetensors is the resume point before the first epoch, write 2 commits epoch 1,
    write 3 epoch 2."""
    from model.runs.format import list_runs, read_safetensors
    from model.runs.load import load_run
    from model.train import main as train_main

    run = tmp_path / "runs" / "cut"
    _run_until_stalled(tmp_path, "resume.safetensors", nth, "train",
                       ["--data", "synthetic:n=48", "--no-checks", *SMALL_TRAIN,
                        "--frozen-epochs", "1", "--epochs", "1", "--run-dir", run])
    leftovers = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".resume.safetensors.")
    assert list_runs(run.parent) == [run]
    loaded = load_run(run)  # best.safetensors of the epoch that just finished
    assert loaded.checkpoint == "best"
    _, meta = read_safetensors(run / "resume.safetensors")
    assert meta["progress"]["epochs_done"] == epochs_kept  # the previous commit, intact
    assert json.loads((run / "progress.json").read_text())["status"] == "running"
    assert train_main(["--resume", str(run)]) == 0
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    hist = pd.read_csv(run / "history.csv")
    assert list(hist.epoch) == [0, 1] and list(hist.phase) == ["frozen", "unfrozen"]
    assert json.loads((run / "progress.json").read_text())["status"] == "complete"
    load_run(run)


@pytest.mark.slow
def test_sigkill_while_writing_the_submission(trained_run, tmp_path):
    """Prediction killed with half the submission written: the old submission is untouched
    (byte for byte), no truncated file carries the submission's name, and the only leftover
    is a hidden temp file."""
    out = tmp_path / "preds" / "submission.csv"
    out.parent.mkdir()
    out.write_text("id,label\nold,0.5\n")
    _run_until_stalled(tmp_path, "submission.csv", 1, "predict",
                       [trained_run, "--data", SYNTH_TEST, "--out", out, "--no-progress"])
    assert out.read_text() == "id,label\nold,0.5\n"
    names = sorted(p.name for p in out.parent.iterdir())
    assert names[1:] == ["submission.csv"] and re.fullmatch(
        r"\.submission\.csv\.\w{8}\.tmp", names[0]), names
    # a new prediction replaces the old submission completely
    from model.predict import main as predict_main

    assert predict_main([str(trained_run), "--data", SYNTH_TEST, "--out", str(out),
                         "--no-progress"]) == 0
    assert len(pd.read_csv(out)) == 12


def test_every_file_write_in_model_goes_through_atomic():
    """No direct writes in model/: open(..., 'w'), .to_csv(path), .write_text/.write_bytes,
    np.save(path), json.dump, torch.save, except inside model/core/atomic.py, the pack
    builder, which writes a temporary folder that is renamed into place as a whole, and the
    feature cache, whose rows count as written only once its JSON (written atomically) says
    so. Every subpackage of model/ is scanned."""
    features = REPO / "model" / "evaluation" / "features.py"
    allowed = {REPO / "model" / "core" / "atomic.py", PACK_MODULE, features}
    # the feature cache opens only its own data file, and commits through write_json
    assert re.findall(r'open\(([^,]+), "wb"\)', features.read_text()) == ["path"]
    assert "write_json(meta_path" in features.read_text()
    bad = []
    scanned = _sources("model")
    assert len(scanned) > 30 and any(p.parent.name == "training" for p in scanned)
    for py in scanned:
        if py in allowed:
            continue
        tree = ast.parse(py.read_text(), str(py))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = ast.unparse(f.value) if isinstance(f, ast.Attribute) else ""
            if name == "open" and owner in ("", "io", "os"):
                modes = [a for a in node.args[1:2]] + [k.value for k in node.keywords
                                                        if k.arg == "mode"]
                mode = modes[0].value if modes and isinstance(modes[0], ast.Constant) else "r"
                if owner == "os" or any(c in str(mode) for c in "wax+"):
                    bad.append(f"{py.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
            elif name in ("write_text", "write_bytes") and isinstance(f, ast.Attribute):
                bad.append(f"{py.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
            elif name == "to_csv" and (node.args or any(k.arg == "path_or_buf"
                                                        for k in node.keywords)):
                bad.append(f"{py.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
            elif (owner, name) in (("np", "save"), ("numpy", "save"), ("json", "dump"),
                                   ("torch", "save"), ("np", "savez")):
                bad.append(f"{py.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
    # the pack builder writes only under its temporary folder
    pack_src = PACK_MODULE.read_text()
    for m in re.finditer(r'open\(([^,]+), "wb"\)', pack_src):
        assert m.group(1).startswith("tmp /") or m.group(1) == "path", m.group(0)
    assert not bad, "direct (non-atomic) writes:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- disk full


def _fail_writes_under(monkeypatch, folder: Path, err: int, how: str = "replace"):
    """Make the atomic writer fail with `err` for targets under `folder`: at the rename
    ("replace", the temp file was written: disk full at the last moment) or when creating the
    temp file ("mkstemp": read-only file system)."""
    folder = str(folder)
    if how == "replace":
        real = os.replace

        def replace(src, dst, *a, **kw):
            if str(dst).startswith(folder):
                raise OSError(err, os.strerror(err), str(dst))
            return real(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", replace)
    else:
        import tempfile

        real = tempfile.mkstemp

        def mkstemp(*a, **kw):
            if str(kw.get("dir", "")).startswith(folder):
                raise OSError(err, os.strerror(err), str(kw.get("dir")))
            return real(*a, **kw)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def _bytes_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


DISK_ERRORS = [(errno.ENOSPC, "replace", "disk full"), (errno.EROFS, "mkstemp", "read-only"),
               (errno.EDQUOT, "replace", "disk quota exceeded")]


@pytest.mark.parametrize("err, how, words", DISK_ERRORS, ids=["ENOSPC", "EROFS", "EDQUOT"])
def test_evaluate_on_a_full_or_read_only_disk(trained_run, tmp_path, capsys, monkeypatch,
                                              err, how, words):
    out = tmp_path / "eval"
    rc, _, e = cli("evaluate", _evaluate(trained_run, tmp_path), capsys)
    assert rc == 0, e
    before = _bytes_of(out)
    _fail_writes_under(monkeypatch, out, err, how)
    rc, _, e = cli("evaluate", _evaluate(trained_run, tmp_path, "--threshold", "0.3"), capsys)
    assert rc == 2 and e.startswith("error:") and "Traceback" not in e
    assert words in e and str(out) in e, e
    assert _bytes_of(out) == before  # the previous evaluation, byte for byte
    assert not temp_files(tmp_path)


@pytest.mark.parametrize("err, how, words", DISK_ERRORS, ids=["ENOSPC", "EROFS", "EDQUOT"])
def test_predict_on_a_full_or_read_only_disk(trained_run, tmp_path, capsys, monkeypatch,
                                             err, how, words):
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    out.write_text("id,label\nold,0.25\n")
    _fail_writes_under(monkeypatch, out.parent, err, how)
    rc, _, e = cli("predict", [trained_run, "--data", SYNTH_TEST, "--out", out,
                               "--no-progress"], capsys)
    assert rc == 2 and words in e and str(out) in e and "Traceback" not in e, e
    assert out.read_text() == "id,label\nold,0.25\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["submission.csv"]


def test_training_into_a_read_only_folder_leaves_nothing(tmp_path, capsys, monkeypatch):
    _fail_writes_under(monkeypatch, tmp_path / "run", errno.EROFS, "mkstemp")
    rc, _, e = cli("train", [*_flag()(tmp_path, None), "--arch", "mobilenetv3_small_050",
                             "--epochs", "1", "--frozen-epochs", "0", "--no-lr-find"], capsys)
    assert rc == 2 and "read-only" in e and str(tmp_path / "run") in e, e
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_disk_full_mid_training_keeps_the_run_and_resume_completes(tmp_path, capsys,
                                                                   monkeypatch):
    """The disk fills up while epoch 2 is being saved: a clear error, every file of epoch 1
    intact byte for byte, and once there is space again --resume completes the run."""
    import model.core.atomic as A

    run = tmp_path / "run"
    real_open, real_replace, snapshot, calls = A.atomic_open, os.replace, {}, []

    def atomic_open(path, *a, **kw):
        if Path(path).name == "history.csv":
            calls.append(path)
            if len(calls) == 2:  # the first write of epoch 2
                snapshot.update(_bytes_of(run))  # what epoch 1 left
                _fail_writes_under(monkeypatch, run, errno.ENOSPC)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(A, "atomic_open", atomic_open)
    rc, _, e = cli("train", ["--data", "synthetic:n=48", "--no-checks", *SMALL_TRAIN,
                             "--frozen-epochs", "1", "--epochs", "1", "--run-dir", run], capsys)
    assert rc == 2 and "disk full" in e and str(run / "history.csv") in e, e
    assert "Traceback" not in e
    assert snapshot and _bytes_of(run) == snapshot
    monkeypatch.setattr(A, "atomic_open", real_open)
    monkeypatch.setattr(os, "replace", real_replace)
    rc, _, e = cli("train", ["--resume", run], capsys)
    assert rc == 0, e
    assert list(pd.read_csv(run / "history.csv").epoch) == [0, 1]


def test_pack_on_a_full_disk_leaves_no_pack(tmp_path, patch_files, capsys, monkeypatch):
    root = kaggle_dir(tmp_path / "k", patch_files)
    import tempfile

    real = tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        if str(kw.get("dir", "")).startswith(str(tmp_path / "packs")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    rc, _, e = cli("pack", [root, "--out", tmp_path / "packs", "--no-progress"], capsys)
    assert rc == 2 and "disk full" in e and "Traceback" not in e, e
    if (tmp_path / "packs").exists():  # the lock file (kept by design) and nothing else
        assert [p.name for p in files_under(tmp_path / "packs")] == [".pack-train.lock"]


@pytest.mark.parametrize("failure", ["readonly", "full"])
def test_review_log_on_a_full_or_read_only_disk(tmp_path, monkeypatch, failure):
    """A real SQLite 'attempt to write a readonly database' / 'database or disk is full':
    StorageError naming the log, the decisions recorded before unchanged."""
    import sqlite3

    from model.core.errors import PcamLensError, StorageError
    from model.review.log import ReviewLog

    log = ReviewLog(tmp_path / "review_log.sqlite")
    for i in range(5):
        log.record("dr a", "run", f"p{i}", "confirm", 1)
    before = log.history()
    real_connect = ReviewLog._connect

    def connect(self):
        if failure == "readonly":
            return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10,
                                   isolation_level=None)
        con = real_connect(self)
        con.execute(f"PRAGMA max_page_count = {con.execute('PRAGMA page_count').fetchone()[0]}")
        return con

    monkeypatch.setattr(ReviewLog, "_connect", connect)
    with pytest.raises(StorageError) as info:
        for i in range(200):
            log.record("dr a", "run", f"q{i}", "flag", 1, flag_reason="other", note="x" * 2000)
    msg = str(info.value)
    assert isinstance(info.value, PcamLensError) and str(log.path) in msg
    assert ("disk full" if failure == "full" else "read-only") in msg
    monkeypatch.setattr(ReviewLog, "_connect", real_connect)
    after = log.history()
    pd.testing.assert_frame_equal(after.iloc[:len(before)], before)
    assert (after["action"].iloc[len(before):] == "flag").all()  # only whole decisions


def test_review_export_on_a_full_disk_keeps_the_old_export(tmp_path, monkeypatch):
    from model.core.errors import StorageError
    from model.review.log import ReviewLog

    log = ReviewLog(tmp_path / "log.sqlite")
    log.record("dr a", "run", "p1", "relabel", 1, new_label=0)
    out = tmp_path / "exports" / "reviewed.csv"
    log.export_csv(out)
    before = out.read_bytes()
    log.record("dr a", "run", "p2", "confirm", 0)
    _fail_writes_under(monkeypatch, out.parent, errno.ENOSPC)
    with pytest.raises(StorageError, match="disk full"):
        log.export_csv(out)
    assert out.read_bytes() == before and not temp_files(tmp_path)


# --------------------------------------------------------------------------- security


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


OPT_IN_MODULE = REPO / "model" / "runs" / "load.py"  # load_export_pkl, behind allow_pickle
PACK_MODULE = REPO / "model" / "data" / "pack.py"


def _sources(*folders: str) -> list[Path]:
    return sorted(p for d in folders for p in (REPO / d).rglob("*.py")
                  if "__pycache__" not in p.parts)


def test_no_unpickling_outside_the_explicit_opt_in():
    """torch.load only with weights_only=True; no pickle.load(s), joblib.load, dill,
    np.load(allow_pickle=True), and fastai's load_learner only in load_export_pkl, after its
    allow_pickle check."""
    bad = []
    for py in _sources("model", "viewer"):
        tree = ast.parse(py.read_text(), str(py))
        for node, fn in _calls(tree):
            where = f"{py.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}"
            kw = {k.arg: k.value for k in node.keywords}
            if fn.endswith("torch.load"):
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    bad.append(where)
            elif fn in ("pickle.load", "pickle.loads", "joblib.load", "dill.load",
                        "dill.loads", "cloudpickle.load", "cloudpickle.loads",
                        "pickle.Unpickler", "torch.serialization.load"):
                bad.append(where)
            elif fn.endswith("np.load") or fn.endswith("numpy.load"):
                v = kw.get("allow_pickle")
                if not (isinstance(v, ast.Constant) and v.value is False):
                    bad.append(where)
            elif fn.endswith("load_learner"):
                if py != OPT_IN_MODULE:
                    bad.append(where)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and py != OPT_IN_MODULE and any(
                    a.name in ("load_learner", "load") and node.module in (
                        "fastai.learner", "pickle", "joblib", "dill") for a in node.names):
                bad.append(f"{py.relative_to(REPO)}:{node.lineno} imports "
                           f"{node.module}.{node.names[0].name}")
    assert not bad, "unpickling outside the opt-in:\n" + "\n".join(bad)
    run_src = OPT_IN_MODULE.read_text()
    fn = run_src[run_src.index("def load_export_pkl"):]
    assert fn.index("if not allow_pickle") < fn.index("load_learner(")


def test_load_export_pkl_refuses_without_opt_in(tmp_path):
    """A malicious export.pkl would create a file when unpickled: without allow_pickle it is
    never opened."""
    import pickle

    from model.core.errors import RunError
    from model.runs.load import load_export_pkl

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    pkl = tmp_path / "export.pkl"
    pkl.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(RunError, match="Refusing to unpickle"):
        load_export_pkl(pkl)
    with pytest.raises(RunError):
        load_export_pkl(pkl, allow_pickle=False)
    assert not marker.exists()


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    """model.data.images.MAX_PIXELS is checked on the header: a PNG claiming 30000x30000 pixels
    (900 M, 2.7 GB decoded) is refused without any pixel being decoded, as is one just over
    the limit."""
    from model.core.errors import DataError
    from model.data.images import MAX_PIXELS, decode_image

    decoded = []
    real_load = Image.Image.load

    def load(self, *a, **kw):
        if self.size[0] * self.size[1] > MAX_PIXELS:
            decoded.append(self.size)
        return real_load(self, *a, **kw)

    monkeypatch.setattr(Image.Image, "load", load)
    for side in (30_000, int(MAX_PIXELS ** 0.5) + 1):
        path = tmp_path / f"bomb{side}.png"
        path.write_bytes(png_header_only(side, side))
        t0 = time.perf_counter()
        with pytest.raises(DataError) as info:
            decode_image(path)
        assert time.perf_counter() - t0 < 2
        assert path.name in str(info.value) and ("over the limit" in str(info.value)
                                                 or "too large" in str(info.value))
    assert decoded == []
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS <= 50_000_000


def test_viewer_binds_localhost_and_limits_uploads():
    """.streamlit/config.toml binds 127.0.0.1 and caps uploads; every st.file_uploader in the
    viewer sits next to a count limit and decodes through model.data.uploads.decode_uploads,
    which decodes with model.data.images.decode_image (the pixel limit)."""
    cfg_path = REPO / ".streamlit" / "config.toml"
    assert cfg_path.is_file(), "no .streamlit/config.toml: the viewer would bind 0.0.0.0"
    cfg = tomllib.loads(cfg_path.read_text())
    assert cfg["server"]["address"] in ("127.0.0.1", "localhost")
    assert 1 <= int(cfg["server"].get("maxUploadSize", 200)) <= 200
    uploads = (REPO / "model" / "data" / "uploads.py").read_text()
    assert "decode_image(path)" in uploads and "from model.data.images import" in uploads
    uploaders = [p for p in _sources("viewer") if "file_uploader(" in p.read_text()]
    assert uploaders, "the viewer has no upload any more? update this test"
    for py in uploaders:
        text = py.read_text()
        assert "decode_uploads" in text, f"{py}: uploads not decoded by model.data.uploads"
        assert re.search(r"len\(\w+\)\s*>\s*\w+", text), f"{py}: no limit on the file count"
        assert re.search(r"MAX_(MB|BYTES|UPLOAD)|max_upload_size|maxUploadSize", text), \
            f"{py}: no size limit"


def test_csv_ids_cannot_leave_the_data_folder(tmp_path, patch_files):
    """Every id read from a CSV is a plain file name (covered per CLI above); here the same
    through every CSV reader the CLIs use: train_labels.csv, sample_submission.csv, --valid-ids."""
    from model.core.errors import DataError
    from model.data.open import open_source
    from model.data.splits import make_split

    root = kaggle_dir(tmp_path / "k", patch_files)
    (root / "test").mkdir()
    shutil.copyfile(patch_files[0][2], root / "test" / "t0.tif")
    write_rows(root / "sample_submission.csv", [("t0", 0), ("../train/" + patch_files[1][0], 0)])
    with pytest.raises(DataError, match="not a plain file name"):
        open_source(root, "test", use_pack=False)
    src = open_source(root, use_pack=False)
    write_rows(tmp_path / "valid.csv", [("../../x", 0)])
    with pytest.raises(DataError):
        make_split(src, valid_ids=tmp_path / "valid.csv")
