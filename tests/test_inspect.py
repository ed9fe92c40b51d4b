"""model.inspect: the report finds exactly the injected faults, the CLI's exit codes and JSON,
filter_source, and plausible colour statistics on the real sample."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from model.core.errors import DataError
from model.data.base import PCAM_CLASSES, PatchSource, SubsetSource
from model.data.inspect import InspectReport, filter_source, inspect_source
from model.data.open import open_source
from model.inspect import main

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _add(root, pid, label, image=None, data: bytes | None = None, listed=True):
    """Add a row to train_labels.csv (when listed) and a file (array or raw bytes)."""
    if listed:
        with open(root / "train_labels.csv", "a", newline="") as f:
            csv.writer(f).writerow([pid, label])
    dest = root / "train" / f"{pid}.tif"
    if image is not None:
        Image.fromarray(image).save(dest)
    elif data is not None:
        dest.write_bytes(data)


@pytest.fixture
def faulty(make_kaggle, patch_files):
    """40 real patches plus one of each fault."""
    root = make_kaggle(40)
    rng = np.random.default_rng(0)
    _add(root, "black", 0, image=rng.integers(0, 10, (96, 96, 3), dtype=np.uint8))
    _add(root, "white", 0, image=rng.integers(246, 256, (96, 96, 3), dtype=np.uint8))
    _add(root, "truncated", 1, data=patch_files[0][2].read_bytes()[:1000])
    _add(root, "missing", 1)  # listed, no file
    _add(root, "extra", 0, image=rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),
         listed=False)
    _add(root, "narrow", 1, image=rng.integers(0, 256, (96, 95, 3), dtype=np.uint8))
    return root


def _ids(findings):
    return [f["id"] for f in findings]


def _expected_stats(src, good_indices):
    """Channel mean/std computed the slow, obvious way."""
    px = np.concatenate([src.read(i).reshape(-1, 3).astype(np.float64) / 255
                         for i in good_indices])
    return px.mean(0), px.std(0)


def test_report_finds_exactly_the_injected_faults(faulty, patch_files):
    src = open_source(faulty)
    assert len(src) == 45
    rep = inspect_source(src, progress=False, workers=3)
    assert rep.n_total == 45 and rep.n_inspected == 44 and not rep.sampled
    assert _ids(rep.unreadable) == ["truncated"]
    assert "truncated.tif" in rep.unreadable[0]["message"]
    assert [(f["id"], f["size"], f["expected"]) for f in rep.wrong_size] == \
        [("narrow", "95x96", "96x96")]
    assert _ids(rep.missing_files) == ["missing"]
    assert rep.missing_files[0]["path"].endswith("missing.tif")
    assert rep.unlabelled_files == ["extra.tif"]
    assert _ids(rep.near_black) == ["black"] and rep.near_black[0]["max"] == 9
    assert _ids(rep.near_white) == ["white"] and rep.near_white[0]["min"] == 246
    assert rep.duplicate_ids == [] and rep.converted == [] and rep.identical_images == []
    assert rep.problem_ids() == {"truncated", "narrow", "missing"}
    assert rep.outlier_ids() == {"black", "white"}
    assert rep.problem_indices() == {src.index_of(p) for p in ("truncated", "narrow", "missing")}
    assert rep.has_problems
    n_pos = sum(lab for _, lab, _ in patch_files[:40]) + 3
    assert rep.class_counts == {PCAM_CLASSES[0]: 45 - n_pos, PCAM_CLASSES[1]: n_pos}
    good = [i for i, pid in enumerate(src.ids) if pid not in rep.problem_ids()]
    assert len(good) == 42
    mean, std = _expected_stats(src, good)
    assert rep.n_pixels == 42 * 96 * 96
    np.testing.assert_allclose(rep.channel_mean, mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(rep.channel_std, std, rtol=0, atol=1e-9)
    table = rep.table()
    assert list(table.columns) == ["check", "count", "examples"]
    rows = {r.check: (r.count, r.examples) for r in table.itertuples()}
    assert rows["unreadable"] == (1, "truncated")
    assert rows["labels without files"] == (1, "missing")
    assert rows["files without labels"] == (1, "extra.tif")
    assert rows["near-black"] == (1, "black") and rows["near-white"] == (1, "white")
    assert rows["patches inspected"][0] == 44


def test_report_round_trips_through_json(faulty):
    src = open_source(faulty)
    rep = inspect_source(src, progress=False)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["problem_count"] == 3 and d["outlier_count"] == 2
    back = InspectReport.from_dict(d)
    assert back.problem_ids() == rep.problem_ids() and back.outlier_ids() == rep.outlier_ids()


def test_filter_source(faulty):
    src = open_source(faulty)
    rep = inspect_source(src, progress=False)
    sub, dropped = filter_source(src, rep)
    assert isinstance(sub, SubsetSource) and len(sub) == 42
    assert dropped == {"unreadable": ["truncated"], "wrong_size": ["narrow"],
                       "missing_file": ["missing"]}
    assert not {"truncated", "narrow", "missing"} & set(sub.ids)
    batch = sub.read_batch(range(len(sub)))  # everything left decodes
    assert batch.shape == (42, 96, 96, 3)
    assert list(sub.labels) == [src.labels[src.index_of(p)] for p in sub.ids]

    sub2, dropped2 = filter_source(src, rep.to_dict(), drop_outliers=True)
    assert len(sub2) == 40 and dropped2["near_black"] == ["black"]
    assert dropped2["near_white"] == ["white"]
    sub3, dropped3 = filter_source(src, rep, drop_problems=False, drop_outliers=True)
    assert len(sub3) == 43 and set(dropped3) == {"near_black", "near_white"}

    other = open_source(faulty).subset(range(10))
    with pytest.raises(DataError, match="different data set"):
        filter_source(other, rep)


def test_duplicates_converted_and_identical_images(tmp_path, make_kaggle, patch_files):
    root = make_kaggle(6)
    # same pixels under a new id, and a grayscale patch
    _add(root, "copy", patch_files[2][1], data=patch_files[2][2].read_bytes())
    gray = np.asarray(Image.open(patch_files[3][2]).convert("L"))
    _add(root, "gray", 0, image=gray)
    rep = inspect_source(open_source(root), progress=False)
    assert rep.identical_images == [[patch_files[2][0], "copy"]]  # in index order
    assert _ids(rep.converted) == ["gray"] and "L converted" in rep.converted[0]["note"]
    assert not rep.has_problems  # notes only

    # duplicate ids cannot come from a Kaggle CSV (it collapses them) but can from a flat
    # folder with a.png and a.tif; the first copy is kept
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.open(patch_files[0][2]).save(flat / "a.png")
    (flat / "a.tif").write_bytes(patch_files[1][2].read_bytes())
    (flat / "b.tif").write_bytes(patch_files[2][2].read_bytes())
    src = open_source(flat)
    rep = inspect_source(src, progress=False)
    assert [(d["id"], d["index"], d["first_index"]) for d in rep.duplicate_ids] == [("a", 1, 0)]
    sub, dropped = filter_source(src, rep)
    assert dropped == {"duplicate_id": ["a"]} and sub.ids == ["a", "b"]
    assert np.array_equal(sub.read(0), src.read(0))


class _FlakySource(PatchSource):
    """A non-file source whose row 3 cannot be read and row 5 is all black; rows 6 and 7 sit
    just outside the near-black / near-white thresholds."""

    def __init__(self):
        super().__init__(kind="fake", root=None, ids=[f"r{i}" for i in range(8)],
                         labels=np.array([0, 1] * 4), classes=list(PCAM_CLASSES))

    def read(self, i):
        if i == 3:
            raise DataError("row 3 is corrupt")
        if i == 5:
            return np.zeros((96, 96, 3), np.uint8)
        if i == 6:
            return np.full((96, 96, 3), 10, np.uint8)  # max 10: not near-black (max < 10)
        if i == 7:
            return np.full((96, 96, 3), 245, np.uint8)  # min 245: not near-white (min > 245)
        return np.random.default_rng(i).integers(0, 256, (96, 96, 3), dtype=np.uint8)


def test_generic_source_falls_back_to_single_reads():
    rep = inspect_source(_FlakySource(), progress=False)
    assert [(f["id"], f["message"]) for f in rep.unreadable] == [("r3", "row 3 is corrupt")]
    assert _ids(rep.near_black) == ["r5"] and rep.n_inspected == 8
    assert rep.near_white == []
    assert rep.missing_files == [] and rep.unlabelled_files == []
    assert rep.class_counts == {PCAM_CLASSES[0]: 4, PCAM_CLASSES[1]: 4}


def test_max_items_samples(faulty):
    src = open_source(faulty)
    rep = inspect_source(src, progress=False, max_items=10)
    assert rep.n_inspected == 10 and rep.sampled
    assert _ids(rep.missing_files) == ["missing"]  # file checks still cover everything
    assert rep.class_counts is not None and sum(rep.class_counts.values()) == 45
    assert inspect_source(src, progress=False, max_items=10).to_dict()["near_black"] == \
        rep.to_dict()["near_black"]  # seeded: repeatable


def test_h5_sample_through_generic_path(h5_sample):
    rep = inspect_source(open_source(h5_sample), progress=False)
    assert rep.n_inspected == 512 and not rep.has_problems
    assert rep.class_counts == {PCAM_CLASSES[0]: 284, PCAM_CLASSES[1]: 228}
    assert rep.identical_images == []


def test_synthetic_source_is_not_special():
    rep = inspect_source(open_source("synthetic:n=24,seed=0"), progress=False)
    assert rep.n_inspected == 24 and rep.n_pixels == 24 * 96 * 96
    assert not rep.has_problems and rep.channel_mean is not None


def test_real_sample_channel_statistics(kaggle_sample):
    """H&E: pink-purple, so green (absorbed by both stains) is the darkest channel. Measured
    on all 6000 patches: mean R 0.705 G 0.550 B 0.700, std R 0.238 G 0.282 B 0.215."""
    rep = inspect_source(open_source(kaggle_sample), progress=False, max_items=1500)
    r, g, b = rep.channel_mean
    assert 0.66 < r < 0.75 and 0.50 < g < 0.60 and 0.66 < b < 0.74, rep.channel_mean
    assert g < r - 0.1 and g < b - 0.1
    assert all(0.18 < s < 0.32 for s in rep.channel_std), rep.channel_std
    assert not rep.has_problems and rep.near_black == [] and rep.near_white == []


# --------------------------------------------------------------------------- CLI


def test_cli_exits_1_on_problems_and_writes_json(faulty, tmp_path, capsys):
    out = tmp_path / "reports" / "r.json"
    assert main([str(faulty), "--json", str(out), "--no-progress", "--workers", "2"]) == 1
    text = capsys.readouterr().out
    assert "unreadable" in text and "truncated" in text and f"wrote {out}" in text
    d = json.loads(out.read_text())
    assert d["problem_count"] == 3 and _ids(d["wrong_size"]) == ["narrow"]
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left nothing behind


def test_cli_exits_0_on_clean_folder_and_writes_default_json(make_kaggle, capsys):
    root = make_kaggle(12)
    assert main([str(root), "--no-progress"]) == 0
    out = root / ".pcam-lens" / "inspect.json"
    assert f"wrote {out}" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["n_inspected"] == 12 and d["problem_count"] == 0


def test_cli_exits_2_on_bad_data(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


@pytest.mark.slow  # starts Python subprocesses (torch import each)
def test_cli_as_module(faulty, tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "model.inspect", str(faulty), "--json", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "near-white" in p.stdout and json.loads(out.read_text())["outlier_count"] == 2
    p = subprocess.run([sys.executable, "-m", "model.inspect", str(tmp_path / "missing")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
