"""Duplicates and leakage: exact copies (also flipped or rotated), near-duplicates in a run's
embedding space, and which pairs straddle the run's train/validation split or the data's
train/test folders (`python -m model.inspect DATA --duplicates [--run RUN]`).

Neighbouring patches of one slide look alike and land on both sides of any random split;
PCam's first release also had duplicate patches. A pair split across training and validation
lets a model "validate" on a patch it has practically trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from model.core.errors import PcamLensError
from model.data.base import PatchSource
from model.data.inspect import digest_groups, dihedral_digests
from model.data.open import open_source
from model.evaluation.embeddings import embed_run, near_duplicate_pairs
from model.runs.load import load_run
from model.runs.summary import belongs_to

NEAR_THRESHOLD = 0.98  # cosine of the reduced embeddings; see README for examples at it
MIN_TISSUE = 0.1  # a patch with less stained area is background: background pairs are apart


@dataclass
class DuplicateReport:
    n: int
    exact: list[list[str]]  # groups of ids with the same pixels up to a flip/rotation
    near: pd.DataFrame  # id_a, id_b, cosine, background (pairs not already exact duplicates)
    threshold: float
    straddling: pd.DataFrame = field(default_factory=pd.DataFrame)  # kind, id_a, id_b, sides
    test_copies: list[tuple[str, str]] = field(default_factory=list)  # (train id, test id)
    run: str | None = None

    def to_dict(self) -> dict:
        return {"n": self.n, "exact_groups": self.exact, "n_near_pairs": len(self.near),
                "near_pairs": self.near.to_dict("records"), "threshold": self.threshold,
                "run": self.run, "straddling": self.straddling.to_dict("records"),
                "test_copies": [list(p) for p in self.test_copies]}

    def format(self) -> str:
        lines = [f"{self.n:,} patches: {len(self.exact)} groups of exact duplicates (flips and "
                 f"rotations included), {sum(len(g) for g in self.exact):,} patches in them"]
        for g in self.exact[:5]:
            lines.append("  " + " = ".join(g))
        if self.run:
            tissue = self.near[~self.near["background"]]
            lines.append(f"near-duplicates (run {self.run}, cosine >= {self.threshold}): "
                         f"{len(tissue):,} pairs of tissue patches, "
                         f"{len(self.near) - len(tissue):,} of background patches (< "
                         f"{MIN_TISSUE:.0%} stained area: empty glass looks alike)")
            for r in tissue.head(5).itertuples():
                lines.append(f"  {r.id_a} ~ {r.id_b} (cosine {r.cosine:.4f})")
            n_s = len(self.straddling)
            lines.append(f"pairs split across the run's train/validation: {n_s:,}"
                         + (" — validation is optimistic; train with --split grouped on a "
                            "slide-id source, or drop them" if n_s else ""))
        else:
            lines.append("near-duplicates: pass --run RUN (they are found in its embeddings)")
        lines.append(f"exact copies between train and test: {len(self.test_copies):,}")
        return "\n".join(lines)


def _run_sides(run_dir: Path, source: PatchSource, config: dict) -> dict[str, str]:
    if not belongs_to(config, source):
        return {}
    sides = {}
    for name, side in (("train_ids.csv", "train"), ("valid_ids.csv", "valid")):
        path = Path(run_dir) / name
        if path.exists():
            sides.update({i: side for i in pd.read_csv(path, dtype={"id": str})["id"]})
    return sides


def _straddling(pairs: list[tuple[str, str, str]], sides: dict[str, str]) -> pd.DataFrame:
    rows = [{"kind": kind, "id_a": a, "id_b": b, "side_a": sides[a], "side_b": sides[b]}
            for kind, a, b in pairs if a in sides and b in sides and sides[a] != sides[b]]
    return pd.DataFrame(rows, columns=["kind", "id_a", "id_b", "side_a", "side_b"])


def _test_copies(source: PatchSource, digests: list[bytes]) -> list[tuple[str, str]]:
    """(train id, test id) of test patches that are copies of training patches."""
    if source.split != "train" or source.synthetic or source.root is None:
        return []
    try:
        test = open_source(source.root, "test")
    except PcamLensError:
        return []  # no test folder
    seen = {d: source.ids[i] for i, d in enumerate(digests)}
    test_digests, _ = dihedral_digests(test)
    return [(seen[d], test.ids[i]) for i, d in enumerate(test_digests) if d in seen]


def duplicate_report(source: PatchSource, run_dir=None, threshold: float = NEAR_THRESHOLD,
                     progress=True, log=None) -> DuplicateReport:
    """Exact duplicates always; near-duplicates and split-straddling pairs with `run_dir`
    (background pairs are reported apart and not counted as leakage)."""
    digests, tissue = dihedral_digests(source)
    groups = digest_groups(digests)
    exact = [[source.ids[i] for i in g] for g in groups]
    same = {(g[a], g[b]) for g in groups for a in range(len(g)) for b in range(a + 1, len(g))}
    pairs = [("exact", source.ids[i], source.ids[j]) for i, j in sorted(same)]
    near = pd.DataFrame(columns=["id_a", "id_b", "cosine"])
    report = DuplicateReport(len(source), exact, near, threshold,
                             test_copies=_test_copies(source, digests))
    if run_dir is None:
        return report
    loaded = load_run(run_dir)
    emb = embed_run(loaded, source, progress=progress, log=log)
    p = near_duplicate_pairs(emb, threshold)
    keep = [k for k in range(len(p)) if (int(p[k, 0]), int(p[k, 1])) not in same]
    ids = np.asarray(source.ids, dtype=object)
    a, b = p[keep, 0].astype(int), p[keep, 1].astype(int)
    report.near = pd.DataFrame({
        "id_a": ids[a], "id_b": ids[b], "cosine": p[keep, 2],
        "background": (tissue[a] < MIN_TISSUE) & (tissue[b] < MIN_TISSUE)}).sort_values(
        "cosine", ascending=False, ignore_index=True)
    tissue_pairs = report.near[~report.near["background"]]
    pairs += [("near", a, b) for a, b in zip(tissue_pairs["id_a"], tissue_pairs["id_b"])]
    report.straddling = _straddling(pairs, _run_sides(run_dir, source, loaded.config))
    report.run = loaded.name
    return report
