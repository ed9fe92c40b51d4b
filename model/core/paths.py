"""Where pcam-lens keeps what it writes outside a run directory, in one place.

Beside the data when its folder is writable (`DATA/.pcam-lens/`: packs, review log, dataset
reports stay with the patches they describe, whoever opens them), else per user:

- caches (packs, converted weights): `$PCAM_LENS_CACHE`, else `$XDG_CACHE_HOME/pcam-lens`,
  else `~/.cache/pcam-lens`;
- data worth keeping (review logs, viewer settings): `$PCAM_LENS_HOME`, else
  `$XDG_DATA_HOME/pcam-lens`, else `~/.local/share/pcam-lens`.

A data folder is named in the per-user places by `path_key`: the first 16 hex digits of the
SHA-1 of its resolved path. File names that are not valid UTF-8 reach Python as lone
surrogates; they are hashed as they are ("surrogatepass"), so every such path has a key.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

DATA_SUBDIR = ".pcam-lens"
CACHE_ENV = "PCAM_LENS_CACHE"
HOME_ENV = "PCAM_LENS_HOME"


def _base(env: str, xdg: str, default: Path) -> Path:
    value = os.environ.get(env)
    if value:
        return Path(value).expanduser()
    root = os.environ.get(xdg)
    return (Path(root).expanduser() if root else default) / "pcam-lens"


def cache_base() -> Path:
    return _base(CACHE_ENV, "XDG_CACHE_HOME", Path.home() / ".cache")


def user_data_base() -> Path:
    return _base(HOME_ENV, "XDG_DATA_HOME", Path.home() / ".local" / "share")


def path_key(root: str | os.PathLike) -> str:
    resolved = str(Path(root).expanduser().resolve())
    return hashlib.sha1(resolved.encode("utf-8", "surrogatepass")).hexdigest()[:16]
