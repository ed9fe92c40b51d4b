"""Small helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import csv
from pathlib import Path


def write_rows(path: Path, rows, header=("id", "label"), encoding="utf-8") -> Path:
    """A CSV file with `header` (None: no header line) and `rows`, as a user's tool would
    write it (`encoding="utf-8-sig"` adds a BOM)."""
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path
