"""Pack the data folder at a path: open its source (model.data.open), then write the
pack (model.data.pack). Above both, because opening a source looks for packs.
"""
from __future__ import annotations

from pathlib import Path

from model.core.atomic import storage_error
from model.core.errors import DataError
from model.data.open import open_source
from model.data.pack import CHUNK, default_pack_dir, default_workers, write_pack


def pack(data, split: str = "train", *, out=None, force: bool = False,
         workers: int | None = None, progress: bool = True, chunk: int = CHUNK
         ) -> tuple[Path, bool]:
    """Pack the source at `data` (a folder open_source understands) for `split`.

    The pack goes to `out/pack-<split>` when `out` is given, else to default_pack_dir."""

    if data is None or str(data).startswith("synthetic"):
        raise DataError("The synthetic set is generated on the fly; there is nothing to pack.",
                        fix="Pack a Kaggle folder or PCam HDF5 folder.")
    root = Path(data).expanduser()
    if root.is_file():
        raise DataError(f"{root} is a file; pack the folder that holds it.", path=root,
                        fix=f"python -m model.pack {root.parent}")
    if (root / "pack.json").exists():
        raise DataError(f"{root} is already a pack.", path=root,
                        fix="Pack the original data folder.")
    source = open_source(root, split, use_pack=False)  # checks the folder first
    # like open_source, the packed folder is named by the caller's split
    target = Path(out).expanduser() / f"pack-{split}" if out else default_pack_dir(root, split)
    try:
        return write_pack(source, root, target, requested_split=split,
                          workers=workers or default_workers(), chunk=chunk, progress=progress,
                          force=force, data_arg=str(data))
    except OSError as e:  # disk full / read-only: a clear error; the old pack stays as it was

        err = storage_error(e, target)
        if err is None:
            raise
        raise err from None




