"""Decoding one image file into a uint8 RGB array, with the conversions and checks a real
folder of patches needs (grayscale, RGBA, 16-bit, truncated files, decompression bombs)."""
from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from model.core.errors import DataError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")

# A PCam patch has 9,216 pixels; class-folder images (e.g. malaria cells) are a few hundred
# pixels wide. Anything above this is refused before decoding (decompression-bomb guard).
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _to_uint8_rgb(img: Image.Image) -> tuple[np.ndarray, str | None]:
    """Convert any PIL mode to HxWx3 uint8; return a note when a conversion happened."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8), None
    if mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        a = np.asarray(img).astype(np.float64)
        hi = 65535.0 if a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2), f"{mode} (16-bit) scaled to 8-bit RGB"
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(a if a.max() > 1.0 else a * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2), "float image scaled to 8-bit RGB"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite on white: transparent areas of a slide scan are background, not tissue.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB")), \
            f"{mode} converted to RGB (alpha composited on white)"
    if mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB")), f"{mode} converted to RGB"
    if mode.startswith("I;16") or mode.startswith("RGB;16") or mode == "RGBX":
        return np.asarray(img.convert("RGB")), f"{mode} converted to RGB"
    raise DataError(f"Unsupported image mode {mode!r}.",
                    fix="Save the image as 8-bit RGB (PNG or TIFF).")


def decode_image(path: str | Path, *, expect_size: tuple[int, int] | None = None
                 ) -> tuple[np.ndarray, str | None]:
    """Read `path` as HxWx3 uint8 RGB.

    Returns (array, note); note says which conversion was applied, if any. Raises DataError
    naming the file for unreadable, truncated or oversized images, and for a size other than
    `expect_size` (H, W) when given."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise DataError(f"Image {path} has {w}x{h} pixels, over the limit of "
                                    f"{MAX_PIXELS:,}.", path=path,
                                    fix="Use patch-sized images (PCam patches are 96x96).")
                img.load()
                arr, note = _to_uint8_rgb(img)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"Image {path} is too large to decode safely ({e}).", path=path,
                        fix="Use patch-sized images (PCam patches are 96x96).") from None
    except FileNotFoundError:
        raise DataError(f"Image file {path} does not exist.", path=path,
                        fix="Check the path, or remove the id from the labels CSV.") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise DataError(f"Cannot decode image {path}: {type(e).__name__}: {e}.", path=path,
                        fix="Re-export the file, or drop it with --drop-bad.") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DataError(f"Image {path} decoded to shape {arr.shape}, not HxWx3.", path=path,
                        fix="Save it as an RGB image.")
    if expect_size is not None and arr.shape[:2] != tuple(expect_size):
        raise DataError(f"Image {path} is {arr.shape[1]}x{arr.shape[0]} pixels; this source "
                        f"needs {expect_size[1]}x{expect_size[0]} patches.", path=path,
                        fix="Use the original PCam patches, or a class-folder source, which "
                            "resizes.")
    return np.ascontiguousarray(arr), note


def resize_rgb(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size (area interpolation when shrinking, cubic when growing)."""

    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    shrink = arr.shape[0] > size or arr.shape[1] > size
    return cv2.resize(arr, (size, size), interpolation=cv2.INTER_AREA if shrink
                      else cv2.INTER_CUBIC)
