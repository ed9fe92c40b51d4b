"""Shared fixtures: where the real PCam sample lies, and small folders of real patches.

The real sample (see /work/shared/data/README.md) is found at <repo>/../shared/data, or at
$PCAM_LENS_SHARED. Tests that need it fail (never skip: a skipped test proves nothing) with
a message saying where it was looked for.
Nothing here writes outside tmp_path."""
from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# the shared run and cross-validation of the session (their modules say what they are)
from fixtures_crossval import tiny_cv  # noqa: F401
from fixtures_runs import tiny_loaded, tiny_run  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _shared_root() -> Path:
    env = os.environ.get("PCAM_LENS_SHARED")
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding pcam-sample/ and pcam-h5-sample/ (read-only: never write there)."""
    root = _shared_root()
    if not root.is_dir():
        pytest.fail(f"real PCam sample not found at {root} (set PCAM_LENS_SHARED to the folder "
                    "holding pcam-sample/ and pcam-h5-sample/)", pytrace=False)
    return root


@pytest.fixture(scope="session")
def kaggle_sample(shared_data) -> Path:
    path = shared_data / "pcam-sample"
    if not (path / "train_labels.csv").is_file():
        pytest.fail(f"Kaggle-layout sample not found at {path}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def h5_sample(shared_data) -> Path:
    path = shared_data / "pcam-h5-sample"
    if not (path / "camelyonpatch_level_2_split_valid_x.h5").is_file():
        pytest.fail(f"PCam HDF5 sample not found at {path}", pytrace=False)
    return path


def read_id_label_csv(path: Path) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [(r["id"], int(r["label"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="session")
def real_patches(kaggle_sample) -> list[tuple[str, int, Path]]:
    """(id, label, path) of the first 40 training patches of the real sample, sorted by id,
    with both classes present."""
    rows = sorted(read_id_label_csv(kaggle_sample / "train_labels.csv"))[:40]
    assert {lab for _, lab in rows} == {0, 1}
    return [(pid, lab, kaggle_sample / "train" / f"{pid}.tif") for pid, lab in rows]


@pytest.fixture(scope="session")
def patch_files(tmp_path_factory) -> list[tuple[str, int, Path]]:
    """Like `real_patches` when the real sample is there; otherwise 40 generated 96x96 RGB
    TIFFs (smooth random colour fields, none near-black/near-white, all different) so that
    tests of checks that do not depend on tissue content still run without the sample."""
    root = _shared_root() / "pcam-sample"
    if (root / "train_labels.csv").is_file():
        rows = sorted(read_id_label_csv(root / "train_labels.csv"))[:40]
        return [(pid, lab, root / "train" / f"{pid}.tif") for pid, lab in rows]
    import cv2
    from PIL import Image

    folder = tmp_path_factory.mktemp("generated-patches")
    rng = np.random.default_rng(0)
    out = []
    for k in range(40):
        coarse = rng.uniform(40, 215, (6, 6, 3)).astype(np.float32)
        img = cv2.resize(coarse, (96, 96), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 8, img.shape), 20, 235).astype(np.uint8)
        pid = f"gen{k:03d}"
        Image.fromarray(img).save(folder / f"{pid}.tif")
        out.append((pid, k % 2, folder / f"{pid}.tif"))
    return out


@pytest.fixture
def make_kaggle(tmp_path, patch_files):
    """Build a Kaggle folder in tmp_path from `patch_files`; returns a function
    (n=40, name="kaggle") -> Path, whose rows go to train_labels.csv."""

    def make(n: int = 40, name: str = "kaggle") -> Path:
        root = tmp_path / name
        (root / "train").mkdir(parents=True)
        with open(root / "train_labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label"])
            for pid, lab, path in patch_files[:n]:
                shutil.copyfile(path, root / "train" / path.name)
                w.writerow([pid, lab])
        return root

    return make


@pytest.fixture
def tif_bytes() -> bytes:
    """The bytes of one real 96x96 RGB Kaggle .tif (or a PIL-written one without the sample)."""
    root = _shared_root() / "pcam-sample" / "train"
    if root.is_dir():
        first = min(p for p in root.iterdir() if p.suffix == ".tif")
        return first.read_bytes()
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
                    ).save(buf, format="TIFF")
    return buf.getvalue()


@pytest.fixture
def fast_dir(tmp_path):
    """A RAM-backed folder when there is one: every review-log commit fsyncs
    (synchronous=FULL), which on a slow disk would make 1,000 commits take 10-20 s. SQLite's
    locking works the same there."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="pcam-lens-test-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
