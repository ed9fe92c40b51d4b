"""Opening the real sample through every kind of source (skipped without the sample)."""
from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from model.data.folders import ClassFolderSource, ImageFolderSource
from model.data.hdf5 import PcamH5Source
from model.data.kaggle import KaggleSource
from model.data.open import open_source


def _csv_ids(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [r["id"] for r in csv.DictReader(f)]


# --------------------------------------------------------------------------- Kaggle


def test_kaggle_train_split(kaggle_sample):
    src = open_source(kaggle_sample, "train")
    assert isinstance(src, KaggleSource)
    assert len(src) == 6000 and len(set(src.ids)) == 6000
    assert src.ids == _csv_ids(kaggle_sample / "train_labels.csv")
    assert src.labels.dtype == np.int64
    assert np.bincount(src.labels).tolist() == [3525, 2475]
    assert src.classes == ["no tumour", "tumour"]
    for i in (0, 1, 2999, 5999):
        a = src.read(i)
        assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
        assert src.path_of(i).name == f"{src.ids[i]}.tif"
        # pixels are what PIL decodes from that very file
        assert np.array_equal(a, np.asarray(Image.open(src.path_of(i)).convert("RGB")))
    assert src.unlabelled_files() == []


def test_kaggle_read_batch_matches_read(kaggle_sample):
    src = open_source(kaggle_sample, "train")
    idx = [5, 0, 5, 4321, 17, 0]
    batch = src.read_batch(idx)
    assert batch.shape == (6, 96, 96, 3) and batch.dtype == np.uint8
    for k, i in enumerate(idx):
        assert np.array_equal(batch[k], src.read(i))
    assert not np.array_equal(batch[0], batch[1])


def test_kaggle_test_split_follows_sample_submission(kaggle_sample):
    src = open_source(kaggle_sample, "test")
    assert isinstance(src, KaggleSource) and src.split == "test"
    assert src.labels is None and not src.labelled
    expected = _csv_ids(kaggle_sample / "sample_submission.csv")
    assert len(expected) == 29
    assert src.ids == expected  # the submission's order, not the folder's
    a = src.read(28)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8


# --------------------------------------------------------------------------- HDF5


def test_h5_sample(h5_sample):
    src = open_source(h5_sample, "train")  # only the valid split exists: falls back to it
    assert isinstance(src, PcamH5Source) and src.split == "valid"
    assert len(src) == 512
    assert src.ids == _csv_ids(h5_sample / "ids.csv")
    assert set(np.unique(src.labels).tolist()) == {0, 1}
    a = src.read(0)
    assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
    # a single _x.h5 file opens the same data, with its _y.h5 labels
    one = open_source(h5_sample / "camelyonpatch_level_2_split_valid_x.h5")
    assert one.ids == src.ids and np.array_equal(one.labels, src.labels)


def test_h5_labels_match_kaggle_csv(h5_sample, kaggle_sample):
    h5 = open_source(h5_sample)
    with open(h5_sample / "ids.csv", encoding="utf-8-sig", newline="") as f:
        csv_labels = [int(r["label"]) for r in csv.DictReader(f)]
    assert h5.labels.tolist() == csv_labels
    kg = open_source(kaggle_sample)
    assert [int(kg.labels[kg.index_of(pid)]) for pid in h5.ids] == csv_labels


def test_h5_pixels_equal_kaggle_tifs(h5_sample, kaggle_sample):
    """The HDF5 row of an id holds exactly the pixels of that id's Kaggle .tif."""
    h5, kg = open_source(h5_sample), open_source(kaggle_sample)
    rows = [0, 1, 2, 100, 255, 256, 399, 511]
    batch = h5.read_batch(rows)
    for k, r in enumerate(rows):
        tif = kg.read(kg.index_of(h5.ids[r]))
        assert np.array_equal(batch[k], tif), h5.ids[r]
        assert np.array_equal(h5.read(r), tif)
    # and different rows are different patches
    assert not np.array_equal(batch[0], batch[1])


def test_h5_read_batch_unsorted_and_duplicate_indices(h5_sample):
    src = open_source(h5_sample)
    idx = [511, 3, 200, 3, 0, 511, 42]
    batch = src.read_batch(idx)
    assert batch.shape == (len(idx), 96, 96, 3)
    for k, i in enumerate(idx):
        assert np.array_equal(batch[k], src.read(i)), (k, i)
    assert np.array_equal(batch[1], batch[3]) and np.array_equal(batch[0], batch[5])
    assert not np.array_equal(batch[0], batch[1])
    assert src.read_batch(np.array([], dtype=np.int64)).shape == (0, 96, 96, 3)
    # a subset view keeps the mapping
    sub = src.subset([10, 5, 7])
    assert sub.ids == [src.ids[10], src.ids[5], src.ids[7]]
    assert np.array_equal(sub.read_batch([2, 0]), src.read_batch([7, 10]))


# --------------------------------------------------------------------------- folders


def test_class_folders_resize_and_put_positive_at_index_1(tmp_path, real_patches):
    root = tmp_path / "malaria"
    originals = {}
    for k, (pid, _, path) in enumerate(real_patches[:6]):
        cls = "Parasitized" if k % 2 else "Uninfected"  # P sorts first: must still be class 1
        size = 50 if k < 3 else 120
        (root / cls).mkdir(parents=True, exist_ok=True)
        img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        img.save(root / cls / f"{pid[:8]}.png")
        originals[f"{cls}/{pid[:8]}"] = np.asarray(img)
    src = open_source(root)
    assert isinstance(src, ClassFolderSource)
    assert src.classes == ["Uninfected", "Parasitized"]
    assert len(src) == 6
    for i, pid in enumerate(src.ids):
        cls = pid.split("/")[0]
        assert src.labels[i] == (1 if cls == "Parasitized" else 0)
        a = src.read(i)
        assert a.shape == (96, 96, 3) and a.dtype == np.uint8
        # resized, not cropped or padded: the mean colour survives resizing
        assert np.abs(a.mean((0, 1)) - originals[pid].mean((0, 1))).max() < 3
    assert np.array_equal(src.read_batch([0, 5])[1], src.read(5))


def test_flat_image_folder_is_unlabelled(tmp_path, real_patches):
    folder = tmp_path / "patches"
    folder.mkdir()
    for _, _, path in real_patches[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    src = open_source(folder, "test")
    assert isinstance(src, ImageFolderSource)
    assert src.labels is None and not src.labelled
    assert src.ids == sorted(pid for pid, _, _ in real_patches[:4])
    for i, (_, _, path) in enumerate(sorted(real_patches[:4])):
        assert np.array_equal(src.read(i), np.asarray(Image.open(path).convert("RGB")))
    # the split does not matter for a flat folder
    assert isinstance(open_source(folder, "train"), ImageFolderSource)
