"""The fast path for plain RGB TIFF patches (model.data.images._plain_rgb_tiff) gives PIL's
pixels exactly, on real patches and on every TIFF variant it must leave to PIL."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from model.core.errors import DataError
from model.data import images
from model.data.images import decode_image


def _pil(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_real_patches_decode_to_pils_pixels_through_the_fast_path(kaggle_sample):
    files = sorted((kaggle_sample / "train").glob("*.tif"))[:400] + sorted(
        (kaggle_sample / "test").glob("*.tif"))
    assert len(files) > 400
    for f in files:
        fast = images._fast_decode(f)
        assert fast is not None, f"{f.name}: a real PCam patch missed the fast path"
        np.testing.assert_array_equal(fast, _pil(f))
        arr, note = decode_image(f, expect_size=(96, 96))
        assert note is None and arr.flags.writeable and arr.flags.c_contiguous


def _rgb(seed=0, h=96, w=96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("variant", ["strips", "big-endian", "lzw", "planar", "tiled",
                                     "gray", "rgba", "16-bit"])
def test_every_tiff_variant_decodes_as_pil_does(tmp_path, variant):
    """Strips and byte order are read by the fast path; compression, planar or tiled layout,
    other sample counts and depths go to PIL. Either way the pixels are PIL's."""
    path = tmp_path / f"{variant}.tif"
    rgb = _rgb(1)
    kw = {"photometric": "rgb"}
    data = rgb
    if variant == "strips":
        kw["rowsperstrip"] = 10
    elif variant == "big-endian":
        kw["byteorder"] = ">"
    elif variant == "lzw":
        kw["compression"] = "lzw"
    elif variant == "planar":
        data, kw = np.moveaxis(rgb, 2, 0).copy(), {"photometric": "rgb", "planarconfig": 2}
    elif variant == "tiled":
        data, kw = _rgb(2, 128, 128), {"photometric": "rgb", "tile": (64, 64)}
    elif variant == "gray":
        data, kw = rgb[..., 0].copy(), {"photometric": "minisblack"}
    elif variant == "rgba":
        data = np.dstack([rgb, np.full((96, 96), 255, np.uint8)])
        kw = {"photometric": "rgb", "extrasamples": [2]}
    elif variant == "16-bit":
        data = rgb.astype(np.uint16) * 257
    tifffile.imwrite(path, data, **kw)
    fast = images._fast_decode(path)
    assert (fast is not None) == (variant in ("strips", "big-endian"))
    arr, _ = decode_image(path)
    if variant != "16-bit":  # PIL has no 16-bit RGB mode; the slow path scales it
        np.testing.assert_array_equal(arr, _pil(path))


def test_a_truncated_patch_is_refused_with_pils_message_not_read_short(tmp_path,
                                                                         kaggle_sample):
    good = sorted((kaggle_sample / "train").glob("*.tif"))[0]
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[:20_000])
    assert images._fast_decode(cut) is None
    with pytest.raises(DataError, match="cut.tif"):
        decode_image(cut)


def test_a_large_tiff_goes_to_pils_size_guard(tmp_path, monkeypatch):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, _rgb(3, 200, 200), photometric="rgb")
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    assert images._fast_decode(path) is None  # over the pixel limit: PIL's checks decide
