"""Progress of a long job in a small JSON file, for a process that watches it (the viewer's
background jobs): {"what", "done", "total", "rate", "eta_s", "updated"}, rewritten
atomically at most every `every_s` seconds and once at the end."""
from __future__ import annotations

import json
import time
from pathlib import Path

from model.core.atomic import write_json


class ProgressFile:
    """A progress callable(done, total) that writes `path`."""

    def __init__(self, path: str | Path, what: str = "", every_s: float = 0.5):
        self.path, self.what, self.every_s = Path(path), what, every_s
        self.t0 = time.time()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        write_json(self.path, {"what": self.what, "done": int(done), "total": int(total),
                               "rate": round(rate, 1),
                               "eta_s": round((total - done) / rate, 1) if rate > 0 else None,
                               "updated": now}, fsync=False)


def read_progress_file(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
