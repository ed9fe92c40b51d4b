"""Reader for the Kaggle "Histopathologic Cancer Detection" folder: train/<id>.tif with
train_labels.csv, test/<id>.tif in sample_submission.csv order."""
from __future__ import annotations

from pathlib import Path

from model.core.errors import DataError
from model.data.base import PCAM_CLASSES
from model.data.files import FileSource, list_images, note_skipped, read_labels_csv


class KaggleSource(FileSource):
    """Kaggle "Histopathologic Cancer Detection" layout."""

    def __init__(self, root: Path, split: str = "train"):
        root = Path(root)
        labels_csv = root / "train_labels.csv"
        if split == "train":
            folder = root / "train"
            ids, labels = read_labels_csv(labels_csv)
            paths = [folder / f"{pid}.tif" for pid in ids]
        elif split == "test":
            folder = root / "test"
            if not folder.is_dir():
                raise DataError(f"{root} has no test/ folder.", path=root,
                                fix="Point --data at the Kaggle folder that holds test/.")
            sub = root / "sample_submission.csv"
            skipped: list[str] = []
            files = {p.stem: p for p in list_images(folder, skipped)}
            if sub.exists():
                ids, _ = read_labels_csv(sub)
                missing = [pid for pid in ids if pid not in files]
                if missing:
                    raise DataError(f"{len(missing)} ids of {sub} have no file in {folder} "
                                    f"(e.g. {missing[0]}).", path=sub,
                                    fix="Restore the missing test files or the right "
                                        "sample_submission.csv.")
            else:
                ids = sorted(files)
            if not ids:
                raise DataError(f"{folder} holds no images.", path=folder,
                                fix="Put the Kaggle test/*.tif files there.")
            paths, labels = [files[pid] for pid in ids], None
        else:
            raise DataError(f"Kaggle folders have splits 'train' and 'test', not {split!r}.")
        super().__init__(kind="kaggle", root=root, ids=ids, labels=labels,
                         classes=list(PCAM_CLASSES), split=split)
        if split == "test":
            note_skipped(self, folder, skipped)
        self.paths = paths
        self.folder = folder
        self.confine = (root.resolve(), folder.resolve())

    def unlabelled_files(self) -> list[str]:
        """Files in train/ that have no row in train_labels.csv (names that are not valid
        UTF-8 included, printable: they cannot have a row)."""
        known = set(self.ids)
        skipped: list[str] = []
        files = [p.name for p in list_images(self.folder, skipped) if p.stem not in known]
        return files + skipped


