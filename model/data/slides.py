"""Whole-slide images: one reader for OpenSlide formats, large plain TIFFs and ordinary images.

    slide = open_slide("tumour_001.svs")            # mpp from the slide's properties
    slide = open_slide("scan.png", mpp=0.5)         # a plain image needs its microns per pixel
    rgb = slide.read(level, x0, y0, w, h)           # uint8 [h, w, 3]; x0, y0 in level-0 pixels
    src = SlideTileSource(folder, tile_ids, labels) # reviewed slide patches, for training

OpenSlide (openslide-python with the openslide-bin wheel, no system library) reads Aperio
.svs, Hamamatsu .ndpi, MIRAX .mrxs, Leica .scn, Philips, Ventana and pyramidal tiled TIFF.
Anything OpenSlide does not recognise is read with tifffile (one TIFF page, tiles decoded on
demand through its memory map where the file is uncompressed) or Pillow (small images, read
whole once). Areas outside the slide and transparent pixels read as white glass, the way a
scanner shows an empty slide.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile
from PIL import Image

from model.core.errors import DataError
from model.data.base import PATCH, PCAM_CLASSES, PatchSource

OPENSLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
                      ".svslide", ".bif", ".dcm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
PLAIN_IMAGE_MAX_PIXELS = 400_000_000  # Pillow reads the whole image: 1.2 GB of RGB at most
GLASS = 255


@dataclass
class Slide:
    """A whole-slide image: level 0 size and resolution, the pyramid, and region reads."""

    path: Path
    backend: str  # "openslide", "tifffile" or "pillow"
    dimensions: tuple[int, int]  # level 0 (width, height)
    mpp: float  # microns per pixel at level 0
    mpp_source: str  # "slide" (from its properties) or "given" (--mpp)
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    vendor: str = ""
    _handle: object = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """uint8 RGB [h, w, 3] of level `level`, its top left at level-0 pixel (x0, y0)."""
        if self.backend == "openslide":
            return _openslide_rgb(self._handle.read_region((int(x0), int(y0)), level,
                                                           (int(w), int(h))))
        ds = self.level_downsamples[level]
        return _crop(self._handle, int(round(x0 / ds)), int(round(y0 / ds)), int(w), int(h))

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """(uint8 RGB thumbnail, its downsample from level 0): the whole slide, longest side
        at most `max_side`, from the smallest level that is still large enough."""
        w0, h0 = self.dimensions
        ds = max(w0, h0) / max_side
        level = max((k for k, d in enumerate(self.level_downsamples) if d <= max(ds, 1)),
                    default=0)
        lw, lh = self.level_dimensions[level]
        region = self.read(level, 0, 0, lw, lh)
        tw, th = max(1, round(w0 / max(ds, 1))), max(1, round(h0 / max(ds, 1)))
        thumb = np.asarray(Image.fromarray(region).resize((tw, th), Image.Resampling.BOX))
        return thumb, w0 / tw

    def describe(self) -> dict:
        return {"path": str(self.path), "backend": self.backend, "vendor": self.vendor,
                "dimensions": list(self.dimensions), "mpp": self.mpp,
                "mpp_source": self.mpp_source, "levels": self.level_count,
                "level_downsamples": [round(d, 4) for d in self.level_downsamples]}

    def close(self) -> None:
        if self.backend == "openslide" and self._handle is not None:
            self._handle.close()


def _openslide_rgb(region: Image.Image) -> np.ndarray:
    """RGBA from OpenSlide (transparent = outside the scanned area) on white glass."""
    a = np.asarray(region)
    rgb = a[..., :3].astype(np.float32)
    alpha = a[..., 3:4].astype(np.float32) / 255.0
    if alpha.min() == 1.0:
        return np.ascontiguousarray(a[..., :3])
    return (rgb * alpha + GLASS * (1 - alpha)).round().astype(np.uint8)


def _crop(arr: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """A [h, w, 3] window of an in-memory or memory-mapped image, white where it lies outside."""
    out = np.full((h, w, 3), GLASS, np.uint8)
    H, W = arr.shape[:2]
    xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if xa < xb and ya < yb:
        out[ya - y:yb - y, xa - x:xb - x] = arr[ya:yb, xa:xb, :3]
    return out


def _check_mpp(mpp, path: Path, source: str) -> float:
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or not 0.05 <= value <= 50:
        raise DataError(f"The resolution {mpp!r} µm/px of {path} ({source}) is not a "
                        "microscope resolution.",
                        fix="Give the slide's microns per pixel with --mpp (e.g. 0.25 for "
                            "40x, 0.5 for 20x, 1.0 for 10x).")
    return value


def _no_mpp(path: Path, why: str) -> DataError:
    return DataError(f"{path} does not say how many microns one pixel is ({why}).",
                     fix="Give it with --mpp (e.g. --mpp 0.25 for a 40x scan, 0.5 for 20x, "
                         "0.97 for PCam's 10x).")


def _open_openslide(path: Path, mpp: float | None) -> Slide:
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as e:
        raise DataError(f"{path} is a {path.suffix} file OpenSlide cannot read ({e}); it may "
                        "be truncated or damaged.",
                        fix="Copy the slide again from the scanner or archive.") from None
    props = handle.properties
    given = mpp is not None
    if not given:
        mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
        if mpp is None:
            handle.close()
            raise _no_mpp(path, "no openslide.mpp-x property")
    return Slide(path=path, backend="openslide", dimensions=tuple(handle.dimensions),
                 mpp=_check_mpp(mpp, path, "--mpp" if given else "openslide.mpp-x"),
                 mpp_source="given" if given else "slide",
                 level_dimensions=[tuple(d) for d in handle.level_dimensions],
                 level_downsamples=[float(d) for d in handle.level_downsamples],
                 vendor=props.get(openslide.PROPERTY_NAME_VENDOR, ""), _handle=handle)


def _open_plain(path: Path, mpp: float | None) -> Slide:
    """A TIFF OpenSlide does not know (one page, any layout) or an ordinary image."""
    if mpp is None:
        raise _no_mpp(path, "a plain image carries no slide resolution OpenSlide can read")
    mpp = _check_mpp(mpp, path, "--mpp")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr, backend = _tiff_array(path), "tifffile"
        else:
            arr, backend = _pillow_array(path), "pillow"
    except (OSError, ValueError, tifffile.TiffFileError) as e:
        raise DataError(f"{path} could not be read as an image ({type(e).__name__}: "
                        f"{str(e)[:160]}); it may be truncated or not an image.",
                        fix="Check the file, or export the slide again.") from None
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise DataError(f"{path} is not an RGB image (shape {arr.shape}).",
                        fix="Give an RGB slide or image.")
    h, w = arr.shape[:2]
    return Slide(path=path, backend=backend, dimensions=(w, h), mpp=mpp, mpp_source="given",
                 level_dimensions=[(w, h)], level_downsamples=[1.0], _handle=arr)


def _tiff_array(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if page.is_contiguous and page.compression == 1:
            return tifffile.memmap(path, page=0, mode="r")  # pages read as they are touched
        return page.asarray()


def _pillow_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.width * im.height > PLAIN_IMAGE_MAX_PIXELS:
            raise DataError(f"{path} is {im.width}x{im.height} px: too large to read whole.",
                            fix="Convert it to a pyramidal tiled TIFF (e.g. vips tiffsave "
                                "--tile --pyramid) and give that.")
        return np.asarray(im.convert("RGB"))


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image; `mpp` (µm per level-0 pixel) overrides the slide's own."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"The slide {path} does not exist.", fix="Check the path.")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a slide.",
                        fix="Give a slide file, or a folder of slides to --slide of "
                            "model.slide (each slide is then done in turn).")
    suffix = path.suffix.lower()
    if suffix not in OPENSLIDE_SUFFIXES + IMAGE_SUFFIXES:
        raise DataError(f"{path} is not a slide format pcam-lens reads "
                        f"({suffix or 'no suffix'}).",
                        fix="Give an OpenSlide format (" + ", ".join(OPENSLIDE_SUFFIXES)
                            + ") or a plain image (" + ", ".join(IMAGE_SUFFIXES)
                            + ") with --mpp.")
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        fmt = None
    if fmt is not None:
        return _open_openslide(path, mpp)
    if suffix in (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif"):
        raise DataError(f"{path} is not a readable {suffix} slide (OpenSlide does not "
                        "recognise it; truncated, damaged or not a slide).",
                        fix="Copy the slide again from the scanner or archive.")
    return _open_plain(path, mpp)


# --------------------------------------------------------------------------- slide patches


def parse_tile_id(tid: str) -> tuple[str, int, int, int, int]:
    """(slide file name, level, x0, y0, side in level-0 px) of a slide patch id
    ("<slide file>:L<level>:x<x0>:y<y0>:w<side>", model.slides.tiles.tile_id)."""
    try:
        name, level, x, y, w = tid.rsplit(":", 4)
        if (level[:1], x[:1], y[:1], w[:1]) != ("L", "x", "y", "w"):
            raise ValueError
        return name, int(level[1:]), int(x[1:]), int(y[1:]), int(w[1:])
    except ValueError:
        raise DataError(f"{tid!r} is not a slide patch id (<slide>:L<level>:x<x>:y<y>:w<side>)."
                        ) from None


def is_tile_id(tid: str) -> bool:
    try:
        parse_tile_id(tid)
        return True
    except DataError:
        return False


def read_tile_id(slide: Slide, tid: str, patch: int = PATCH) -> np.ndarray:
    """uint8 [patch, patch, 3]: the slide patch an id names, read again from its slide."""
    _, level, x0, y0, w0 = parse_tile_id(tid)
    ds = slide.level_downsamples[level]
    side = max(1, round(w0 / ds))
    region = slide.read(level, x0, y0, side, side)
    if side == patch:
        return region
    return cv2.resize(region, (patch, patch), interpolation=cv2.INTER_AREA)


SLIDE_ONLY_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")


def _is_slide_tiff(p: Path) -> bool:
    try:  # a PCam patch .tif is a plain strip TIFF: OpenSlide does not recognise it
        return openslide.OpenSlide.detect_format(str(p)) is not None
    except openslide.OpenSlideError:
        return False


def is_slide_folder(path: Path) -> bool:
    """A folder of whole-slide images (scanner formats, or TIFFs OpenSlide recognises as
    tiled slides), not of patches: its patches come from review."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() in SLIDE_ONLY_SUFFIXES for p in files):
        return True
    tiffs = [p for p in files if p.suffix.lower() in (".tif", ".tiff")][:3]
    return bool(tiffs) and all(_is_slide_tiff(p) for p in tiffs)


class SlideTileSource(PatchSource):
    """Patches of the slides in `folder` named by slide patch ids (those a pathologist
    reviewed on the Slide page), read again from the slides at the model's resolution."""

    def __init__(self, folder: Path, tile_ids: Sequence[str], labels=None, mpp=None):
        folder = Path(folder)
        for tid in tile_ids:
            name = parse_tile_id(tid)[0]
            if not (folder / name).is_file():
                raise DataError(f"The reviewed patch {tid} names the slide {name}, which is not "
                                f"in {folder}.", path=folder,
                                fix="Keep the slides beside their review log.")
        super().__init__(kind="slide-tiles", root=folder, ids=list(tile_ids),
                         labels=None if labels is None else np.asarray(labels, np.int64),
                         classes=list(PCAM_CLASSES), split="train")
        self.mpp = mpp
        self._slides: dict[str, Slide] = {}

    def read(self, i: int) -> np.ndarray:
        tid = self.ids[int(i)]
        name = parse_tile_id(tid)[0]
        if name not in self._slides:
            self._slides[name] = open_slide(self.root / name, mpp=self.mpp)
        return read_tile_id(self._slides[name], tid)

    def __getstate__(self):  # loader workers open their own slide handles
        d = dict(self.__dict__)
        d["_slides"] = {}
        return d

    def describe(self) -> dict:
        d = super().describe()
        d.update(tile_ids=list(self.ids), mpp=self.mpp,
                 tile_labels=None if self.labels is None else self.labels.tolist())
        return d
