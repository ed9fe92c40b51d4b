"""Images a user uploads (the viewer's Inference page), decoded exactly like data files:
the same conversions and the same pixel limit (model.data.images.decode_image), resized to
the run's patch size with a note when they are another size."""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.core.atomic import write_bytes
from model.core.errors import PcamLensError
from model.data.base import PATCH
from model.data.images import decode_image, resize_rgb


@dataclass
class DecodedUploads:
    ids: list[str] = field(default_factory=list)  # file stems made safe, unique
    pixels: list[np.ndarray] = field(default_factory=list)  # uint8 [patch, patch, 3] each
    notes: list[str] = field(default_factory=list)  # one line per conversion or skipped file


def _safe_id(name: str, k: int, seen: set[str]) -> str:
    pid = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem) or f"upload{k}"
    while pid in seen:
        pid += "_dup"
    seen.add(pid)
    return pid


def decode_uploads(files: list[tuple[str, bytes]], patch: int = PATCH) -> DecodedUploads:
    """(name, bytes) pairs -> patches of side `patch`. A file that is not a readable image is
    skipped with a note. Decoding goes through a private temporary folder so that the bytes
    take the same path as a data file's."""
    out, seen = DecodedUploads(), set()
    with tempfile.TemporaryDirectory(prefix="pcam-lens-upload-") as tmp:
        for k, (raw_name, data) in enumerate(files):
            name = Path(raw_name).name
            path = Path(tmp) / f"{k:04d}{Path(name).suffix.lower() or '.png'}"
            write_bytes(path, data, fsync=False)  # a scratch copy in a private folder
            try:
                arr, note = decode_image(path)
            except PcamLensError:
                out.notes.append(f"{name}: not a readable image (PNG, JPEG or TIFF expected); "
                                 "skipped.")
                continue
            if note:
                out.notes.append(f"{name}: {note}.")
            if arr.shape[:2] != (patch, patch):
                out.notes.append(f"{name}: {arr.shape[1]}x{arr.shape[0]} pixels, resized to "
                                 f"{patch}x{patch} (the run's patches are {patch}x{patch}; "
                                 "predictions on other scales are unreliable).")
                arr = resize_rgb(arr, patch)
            out.ids.append(_safe_id(name, k, seen))
            out.pixels.append(arr)
    return out
