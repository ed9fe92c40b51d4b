"""Bad inputs to the sources: each one must raise DataError with a message that says what is
wrong (or, for the harmless ones, open fine). Nothing here needs the real sample except the
truncated-TIFF case, which falls back to a PIL-written TIFF."""
from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import write_rows
from PIL import Image

from model.core.errors import DataError, PcamLensError
from model.data.files import read_labels_csv
from model.data.images import MAX_PIXELS, decode_image
from model.data.kaggle import KaggleSource
from model.data.open import open_source

X_NAME = "camelyonpatch_level_2_split_valid_x.h5"
Y_NAME = "camelyonpatch_level_2_split_valid_y.h5"


def patch(seed=0, h=96, w=96):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def kaggle(tmp_path, rows, images=None, header=("id", "label")) -> Path:
    """A Kaggle folder with train_labels.csv `rows`; images: id -> array or bytes (default: a
    random 96x96 patch for every id in rows)."""
    root = tmp_path / "kaggle"
    (root / "train").mkdir(parents=True)
    write_rows(root / "train_labels.csv", rows, header=header)
    if images is None:
        images = {str(r[0]): patch(k) for k, r in enumerate(rows)}
    for pid, img in images.items():
        dest = root / "train" / f"{pid}.tif"
        if isinstance(img, bytes):
            dest.write_bytes(img)
        else:
            Image.fromarray(img).save(dest)
    return root


def raises(fragment: str, fn, *args, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    assert fragment.lower() in str(info.value).lower(), str(info.value)
    assert isinstance(info.value, PcamLensError)
    return info.value


# --------------------------------------------------------------------------- folders


def test_missing_folder(tmp_path):
    e = raises("does not exist", open_source, tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    raises("is empty", open_source, tmp_path / "empty")


def test_folder_with_train_but_no_labels_csv(tmp_path):
    (tmp_path / "k" / "train").mkdir(parents=True)
    Image.fromarray(patch()).save(tmp_path / "k" / "train" / "a.tif")
    raises("train_labels.csv", open_source, tmp_path / "k")


def test_test_split_without_test_folder(tmp_path):
    root = kaggle(tmp_path, [("a", 0)])
    raises("no test/ folder", open_source, root, "test")


def test_test_split_with_ids_missing_from_folder(tmp_path):
    root = kaggle(tmp_path, [("a", 0)])
    (root / "test").mkdir()
    Image.fromarray(patch()).save(root / "test" / "t1.tif")
    write_rows(root / "sample_submission.csv", [("t1", 0), ("t2", 0)])
    raises("have no file", open_source, root, "test")


# --------------------------------------------------------------------------- CSV


def test_csv_without_id_label_columns(tmp_path):
    root = kaggle(tmp_path, [("a", 0)], header=("name", "target"))
    raises("needs 'id' and 'label'", open_source, root)


def test_csv_without_header(tmp_path):
    root = kaggle(tmp_path, [("a", 0), ("b", 1)], header=None)
    raises("needs 'id' and 'label'", open_source, root)


def test_csv_with_no_rows(tmp_path):
    root = kaggle(tmp_path, [])
    raises("has no rows", open_source, root)


@pytest.mark.parametrize("label", ["2", "-1", "yes", "", "0.5", "nan"])
def test_bad_labels(tmp_path, label):
    root = kaggle(tmp_path, [("a", 0), ("b", label)], images={"a": patch(), "b": patch(1)})
    e = raises("is not one of [0, 1]", open_source, root)
    assert "row 3" in str(e)


def test_float_labels_that_are_integers_are_accepted(tmp_path):
    root = kaggle(tmp_path, [("a", "0.0"), ("b", " 1 ")], images={"a": patch(), "b": patch(1)})
    assert open_source(root).labels.tolist() == [0, 1]


@pytest.mark.parametrize("bad_id", ["../x", "/etc/passwd", "a/b", "a\\b", "..", "a b", "é"])
def test_ids_that_are_not_plain_file_names(tmp_path, bad_id):
    root = kaggle(tmp_path, [("a", 0), (bad_id, 1)], images={"a": patch()})
    raises("is not a plain file name", open_source, root)


def test_empty_id(tmp_path):
    root = kaggle(tmp_path, [("a", 0), ("", 1)], images={"a": patch()})
    raises("empty id", open_source, root)


def test_duplicate_ids_with_conflicting_labels(tmp_path):
    root = kaggle(tmp_path, [("a", 0), ("b", 1), ("a", 1)],
                  images={"a": patch(), "b": patch(1)})
    e = raises("appears twice", open_source, root)
    assert "row 4" in str(e) and "labels 0 and 1" in str(e)


def test_identical_duplicate_ids_collapse(tmp_path):
    root = kaggle(tmp_path, [("a", 0), ("b", 1), ("a", 0), ("b", 1.0)],
                  images={"a": patch(), "b": patch(1)})
    src = open_source(root)
    assert src.ids == ["a", "b"] and src.labels.tolist() == [0, 1]


def test_csv_with_bom_extra_columns_and_odd_header_case(tmp_path):
    root = tmp_path / "k"
    (root / "train").mkdir(parents=True)
    for k, pid in enumerate(["a", "b", "c"]):
        Image.fromarray(patch(k)).save(root / "train" / f"{pid}.tif")
    write_rows(root / "train_labels.csv",
              [("slide1", "a", 1, "x"), ("slide2", "b", 0, "y"), ("slide2", "c", 1, "z")],
              header=("wsi", " ID", "Label ", "comment"), encoding="utf-8-sig")
    assert (root / "train_labels.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    src = open_source(root)
    assert src.ids == ["a", "b", "c"] and src.labels.tolist() == [1, 0, 1]
    assert np.array_equal(src.read(1), patch(1))


def test_csv_that_is_not_utf8(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes(b"id,label\n\xff\xfe\x00a,0\n")
    raises("not UTF-8", read_labels_csv, csv_path)


def test_missing_labels_csv(tmp_path):
    raises("does not exist", read_labels_csv, tmp_path / "train_labels.csv")


def test_labelled_id_without_file_fails_on_read(tmp_path):
    root = kaggle(tmp_path, [("a", 0), ("gone", 1)], images={"a": patch()})
    src = open_source(root)  # opening is cheap: files are checked when read (or inspected)
    assert len(src) == 2
    raises("does not exist", src.read, 1)


# --------------------------------------------------------------------------- images


def test_truncated_tif(tmp_path, tif_bytes):
    root = kaggle(tmp_path, [("a", 0), ("b", 1)], images={"a": tif_bytes, "b": tif_bytes[:1000]})
    src = open_source(root)
    assert src.read(0).shape == (96, 96, 3)
    e = raises("Cannot decode image", src.read, 1)
    assert "b.tif" in str(e)


def test_zero_byte_file(tmp_path):
    root = kaggle(tmp_path, [("a", 0)], images={"a": b""})
    e = raises("Cannot decode image", open_source(root).read, 0)
    assert "a.tif" in str(e)


def test_text_file_named_tif(tmp_path):
    root = kaggle(tmp_path, [("a", 0)], images={"a": b"id,label\nfoo,1\n"})
    raises("Cannot decode image", open_source(root).read, 0)


def test_png_renamed_tif_decodes(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(patch(3)).save(buf, format="PNG")
    root = kaggle(tmp_path, [("a", 0)], images={"a": buf.getvalue()})
    src = open_source(root)
    assert np.array_equal(src.read(0), patch(3))
    assert src.notes == []


def test_16bit_grayscale_tif_is_converted_with_a_note(tmp_path):
    gray = np.random.default_rng(0).integers(0, 65536, (96, 96), dtype=np.uint16)
    gray[0, 0], gray[0, 1] = 0, 65535
    root = kaggle(tmp_path, [("a", 0)], images={})
    Image.fromarray(gray).save(root / "train" / "a.tif")
    src = open_source(root)
    a = src.read(0)
    assert a.dtype == np.uint8 and a.shape == (96, 96, 3)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert a[0, 0, 0] == 0 and a[0, 1, 0] == 255
    expected = np.clip(gray / 65535.0 * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(a[..., 0], expected)
    assert any("16-bit" in n for n in src.notes), src.notes
    arr, note = decode_image(root / "train" / "a.tif")
    assert "16-bit" in note


def test_8bit_grayscale_is_converted_with_a_note(tmp_path):
    root = kaggle(tmp_path, [("a", 0)], images={"a": np.repeat(patch()[..., :1], 3, 2)})
    Image.fromarray(patch()[..., 0]).save(root / "train" / "a.tif")
    arr, note = decode_image(root / "train" / "a.tif")
    assert np.array_equal(arr[..., 2], patch()[..., 0]) and note.startswith("L converted")


def test_rgba_png_is_composited_on_white_with_a_note(tmp_path):
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[..., :3] = patch(5)
    rgba[:48, :, 3] = 255  # top half opaque, bottom half transparent
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rgba, "RGBA").save(folder / "x.png")
    src = open_source(folder)
    a = src.read(0)
    assert np.array_equal(a[:48], patch(5)[:48])
    assert (a[48:] == 255).all()
    assert any("RGBA" in n and "white" in n for n in src.notes), src.notes


def test_wrong_size_patch_in_kaggle_folder(tmp_path):
    root = kaggle(tmp_path, [("a", 0), ("b", 1)], images={"a": patch(), "b": patch(1, 96, 95)})
    src = open_source(root)
    e = raises("96x96", src.read, 1)
    assert "95x96" in str(e) and "b.tif" in str(e)
    raises("96x96", src.read_batch, [0, 1])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit grayscale) with a tiny IDAT: costs
    nothing to write, and PIL learns the size from the header alone."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [20_000, 7_000])  # > 2x the limit, and just over the limit
def test_decompression_bomb(tmp_path, side):
    assert MAX_PIXELS < side * side
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(_png_header_only(side, side))
    src = open_source(folder)
    e = raises("bomb.png", src.read, 0)
    assert "too large" in str(e) or "over the limit" in str(e)


def test_decompression_bomb_in_class_folders(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "cf" / cls).mkdir(parents=True)
        Image.fromarray(patch()).save(tmp_path / "cf" / cls / "ok.png")
    (tmp_path / "cf" / "b" / "zz.png").write_bytes(_png_header_only(30_000, 30_000))
    src = open_source(tmp_path / "cf")
    raises("zz.png", src.read, src.ids.index("b/zz"))


# --------------------------------------------------------------------------- HDF5


def _h5(path: Path, name: str, data) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data)
    return path


def test_gzipped_h5_file(tmp_path):
    gz = tmp_path / (X_NAME + ".gz")
    gz.write_bytes(gzip.compress(b"not really hdf5"))
    raises("gunzip", open_source, gz)


def test_folder_of_gzipped_h5_files(tmp_path):
    (tmp_path / "pcam").mkdir()
    (tmp_path / "pcam" / (X_NAME + ".gz")).write_bytes(gzip.compress(b"x"))
    raises("gunzip", open_source, tmp_path / "pcam")


@pytest.mark.parametrize("data, fragment", [
    (np.zeros((4, 96, 96, 3), np.float32), "float32"),
    (np.zeros((4, 64, 64, 3), np.uint8), "[4, 64, 64, 3]"),
    (np.zeros((4, 96, 96), np.uint8), "expected uint8"),
])
def test_h5_wrong_dtype_or_shape(tmp_path, data, fragment):
    x = _h5(tmp_path / X_NAME, "x", data)
    e = raises(fragment, open_source, x)
    assert "expected uint8 [N,96,96,3]" in str(e)


def test_h5_empty(tmp_path):
    x = _h5(tmp_path / X_NAME, "x", np.zeros((0, 96, 96, 3), np.uint8))
    raises("holds no patches", open_source, x)


def test_h5_without_x_dataset(tmp_path):
    x = _h5(tmp_path / X_NAME, "images", np.zeros((2, 96, 96, 3), np.uint8))
    raises("no dataset 'x'", open_source, x)


def test_h5_y_with_different_n(tmp_path):
    _h5(tmp_path / X_NAME, "x", np.zeros((4, 96, 96, 3), np.uint8))
    _h5(tmp_path / Y_NAME, "y", np.zeros((3, 1, 1, 1), np.uint8))
    e = raises("has 3 labels for 4 patches", open_source, tmp_path)
    assert Y_NAME in str(e)


def test_h5_y_with_bad_labels(tmp_path):
    _h5(tmp_path / X_NAME, "x", np.zeros((2, 96, 96, 3), np.uint8))
    _h5(tmp_path / Y_NAME, "y", np.array([0, 2], np.uint8).reshape(2, 1, 1, 1))
    raises("labels other than 0/1", open_source, tmp_path)


def test_truncated_h5(tmp_path):
    x = _h5(tmp_path / "full.h5", "x", np.zeros((4, 96, 96, 3), np.uint8))
    (tmp_path / X_NAME).write_bytes(x.read_bytes()[:500])
    x.unlink()
    raises("Cannot open", open_source, tmp_path / X_NAME)


def test_valid_small_h5_opens(tmp_path):
    data = np.stack([patch(k) for k in range(3)])
    _h5(tmp_path / X_NAME, "x", data)
    _h5(tmp_path / Y_NAME, "y", np.array([1, 0, 1], np.uint8).reshape(3, 1, 1, 1))
    src = open_source(tmp_path)
    assert src.ids == ["valid-000000", "valid-000001", "valid-000002"]
    assert src.labels.tolist() == [1, 0, 1]
    assert np.array_equal(src.read_batch([2, 0, 2]), data[[2, 0, 2]])


def test_unknown_file_type(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    raises("expected a folder", open_source, tmp_path / "data.zip")


def test_bad_kaggle_split(tmp_path):
    root = kaggle(tmp_path, [("a", 0)])
    raises("not 'valid'", KaggleSource, root, "valid")
