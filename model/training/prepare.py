"""Step 1 of training: from a TrainConfig (new run) or a run directory (resume) to the
patches a run trains and validates on. Nothing is written here: bad data stops the run
before its directory exists."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.core.errors import DataError, RunError
from model.data.base import PatchSource
from model.data.inspect import InspectReport, filter_source, format_table, inspect_source
from model.data.open import open_source, reopen_source
from model.data.slides import SlideTileSource, is_slide_folder, is_tile_id
from model.data.splits import Split, make_split, stratified_split
from model.review.log import ReviewLog, default_log_path
from model.runs.format import default_runs_root, read_config
from model.training.config import TrainConfig


@dataclass
class Prepared:
    """Everything `fit` needs, built from a config (new run) or config.json (resume).
    `facts` is what the run found out about its data (config.json's data/split sections)."""

    run_dir: Path
    config: TrainConfig  # resolved: no field left to a preset
    facts: dict
    train_src: PatchSource
    valid_src: PatchSource
    train_labels: np.ndarray
    valid_labels: np.ndarray


def subsample(source: PatchSource, n: int, seed: int) -> PatchSource:
    """A stratified random subset of `n` patches (the whole source when it is smaller)."""
    if n >= len(source):
        return source
    s = stratified_split(source.labels, n / len(source), seed)
    return source.subset(s.valid_idx)


def dataset_checks(source: PatchSource, config: TrainConfig, log
                   ) -> tuple[PatchSource, InspectReport]:
    """Inspect every patch; stop on unusable ones unless --drop-bad, then drop what was asked."""
    report = inspect_source(source, progress=True)
    log("Dataset checks:\n" + format_table(report))
    if report.has_problems and not config.data.drop_bad:
        examples = [f"{f['id']} ({what})" for key, what in (
            ("unreadable", "unreadable"), ("wrong_size", "wrong size"),
            ("missing_files", "missing file"), ("duplicate_ids", "duplicate id"))
            for f in getattr(report, key)[:3]]
        raise DataError(f"The dataset checks found {len(report.problem_ids())} unusable patches "
                        f"in {source.describe_short()}, e.g. {', '.join(examples[:5])} "
                        "(table above).",
                        fix="Fix or remove them, or pass --drop-bad to train without them.")
    if report.has_problems or (config.data.drop_outliers and report.outlier_ids()):
        source, dropped = filter_source(source, report, drop_problems=True,
                                        drop_outliers=config.data.drop_outliers)
        log("Dropped: " + ", ".join(f"{k}: {len(v)}" for k, v in dropped.items()))
    return source, report


def apply_review(source: PatchSource, spec: str, log) -> tuple[PatchSource, dict]:
    """Relabel from the review log (flagged patches dropped); `spec` "default" = beside the
    data."""
    path = default_log_path(source.root) if spec == "default" else Path(spec)
    if not Path(path).exists():
        raise DataError(f"Review log {path} does not exist.", path=path,
                        fix="Review patches in the viewer first, or pass the log's path.")
    labels, keep = ReviewLog(path).effective_labels(source.ids, source.labels)
    changed = int((labels != source.labels).sum())
    sub = source.subset(np.flatnonzero(keep))
    sub.labels = labels[keep]
    log(f"Review log {path}: {changed} relabelled, {int((~keep).sum())} flagged and dropped.")
    return sub, {"log": str(path), "relabelled": changed, "dropped": int((~keep).sum())}


def _report_pairs(path: Path) -> list[tuple[str, str]]:
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
        pairs = [(g[0], other) for g in rep["exact_groups"] for other in g[1:]]
        pairs += [(r["id_a"], r["id_b"]) for r in rep["near_pairs"] if not r.get("background")]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise DataError(f"{path} is not a duplicates report ({type(e).__name__}: {e}).",
                        path=path, fix="Write one with python -m model.inspect DATA "
                                       "--duplicates --run RUN --json REPORT.") from None
    return pairs


def group_duplicates(source: PatchSource, path: Path, log) -> dict:
    """Give the pairs of a duplicates report one group each (union-find, together with any
    slide ids), so a grouped split keeps both patches of a pair on one side."""
    pairs = _report_pairs(path)
    pos = {pid: k for k, pid in enumerate(source.ids)}
    parent = list(range(len(source)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if source.groups is not None:  # patches of one slide stay together as well
        first: dict[str, int] = {}
        for i, g in enumerate(source.groups):
            parent[root(i)] = root(first.setdefault(str(g), i))
    used = 0
    for a, b in pairs:
        if a in pos and b in pos:
            parent[root(pos[a])] = root(pos[b])
            used += 1
    source.groups = np.array([f"g{root(i)}" for i in range(len(source))], dtype=object)
    n_groups = len(set(source.groups))
    log(f"Duplicates report {path}: {used} of {len(pairs)} pairs are in the data; "
        f"{n_groups:,} groups, each kept on one side of the split.")
    return {"report": str(path), "pairs": len(pairs), "pairs_in_data": used,
            "groups": n_groups}


def reviewed_slide_patches(folder: Path, spec: str | None) -> SlideTileSource:
    """The slide patches of `folder` reviewed on the Slide page (the review log beside the
    slides, or `spec`'s), labelled as decided; flagged ones left out."""
    path = default_log_path(folder) if spec in (None, "default") else Path(spec)
    if not Path(path).exists():
        raise DataError(f"No review log for the slides in {folder} ({path}).", path=path,
                        fix="Review slide patches on the viewer's Slide page first.")
    df = ReviewLog(path).reviewed_labels()
    df = df[df["final_label"].notna() & df["patch_id"].map(is_tile_id)]
    if len(df) < 2 or df["final_label"].nunique() < 2:
        raise DataError(f"The review log {path} has {len(df)} labelled slide patches"
                        + ("" if len(df) < 2 else " of one class only") + "; training needs "
                        "both classes.", path=path,
                        fix="Label more patches (tumour and no tumour) on the Slide page.")
    return SlideTileSource(folder, list(df["patch_id"]), df["final_label"].astype(int))


def open_training_source(config: TrainConfig) -> PatchSource:
    spec = config.data.spec
    if spec and is_slide_folder(Path(spec).expanduser()):
        if not config.data.labels_from_review:
            raise DataError(f"{spec} is a folder of slides: its training patches are the ones "
                            "reviewed on the Slide page.",
                            fix=f"Add --labels-from-review (model.train --data {spec} "
                                "--labels-from-review).")
        return reviewed_slide_patches(Path(spec).expanduser(), config.data.labels_from_review)
    source = open_source(spec, "train")
    if source.labels is None:
        raise DataError(f"{source.describe_short()} has no labels; training needs labels.",
                        fix="Point --data at labelled data.")
    return source


@dataclass
class PreparedData:
    """The labelled patches of a new run before they are split: opened, subsampled, checked
    and relabelled from the review log as the config says. `config` is resolved for them."""

    source: PatchSource
    config: TrainConfig
    data_facts: dict  # config.json's "data" section


def prepare_data(config: TrainConfig, log) -> PreparedData:
    """Open, subsample, check and relabel the data of a new run (nothing is written)."""
    source = open_training_source(config)
    config = config.resolve(source.synthetic)
    data_desc = source.describe()
    if config.data.max_items:
        source = subsample(source, config.data.max_items, config.runtime.seed)
    checks = None
    if source.synthetic and config.data.checks:
        log("Dataset checks skipped: the synthetic set is generated, its patches are valid "
            "by construction (run python -m model.inspect synthetic to see its statistics).")
    elif config.data.checks:
        source, report = dataset_checks(source, config, log)
        checks = {"problems": len(report.problem_indices()),
                  "outliers": len(report.outlier_indices()),
                  "channel_mean": report.channel_mean, "channel_std": report.channel_std}
    review = None
    if config.data.labels_from_review:
        source, review = apply_review(source, config.data.labels_from_review, log)
    grouped = None
    if config.data.group_duplicates:
        grouped = group_duplicates(source, Path(config.data.group_duplicates), log)
    facts = {**data_desc, "max_items": config.data.max_items, "review": review,
             "checks": checks, "train_ids_file": "train_ids.csv",
             "duplicate_groups": grouped}
    return PreparedData(source, config, facts)


def prepare_split(data: PreparedData, split: Split, run_dir: Path | None = None,
                  config: TrainConfig | None = None) -> Prepared:
    """A run's Prepared from prepared data and a split of it (`config`: the run's own, when
    it differs from the data's, e.g. a cross-validation fold's)."""
    config = config or data.config
    source = data.source
    train_src, valid_src = source.subset(split.train_idx), source.subset(split.valid_idx)
    if run_dir is None:
        run_dir = (Path(config.run_dir) if config.run_dir
                   else default_run_dir(config.model.arch, source))
    facts = {"data": dict(data.data_facts), "split": split.describe()}
    return Prepared(run_dir, config, facts, train_src, valid_src, train_src.labels,
                    valid_src.labels)


def prepare_new(config: TrainConfig, log) -> Prepared:
    """Open, check, relabel and split the data of a new run; resolve the config for it."""
    data = prepare_data(config, log)
    config = data.config
    valid_ids = None if config.split.valid_ids is None else Path(config.split.valid_ids)
    split = make_split(data.source, config.split.valid_pct, config.runtime.seed, valid_ids,
                       config.split.method)
    return prepare_split(data, split)


def default_run_dir(arch: str, source: PatchSource) -> Path:
    name = "synthetic" if source.synthetic else Path(str(source.root)).name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return default_runs_root() / f"{stamp}-{arch}-{name}"


def read_resumable_config(run_dir: Path) -> dict:
    """config.json of a run that has a resume point; RunError otherwise."""
    cfg = read_config(run_dir)
    if not (Path(run_dir) / "resume.safetensors").exists():
        raise RunError(f"{run_dir} has no resume.safetensors: no epoch had completed.",
                       path=run_dir, fix="Start the run again (same arguments, new --run-dir).")
    return cfg


def prepare_resume(run_dir: Path, cfg: dict | None = None) -> Prepared:
    """The run's own split, labels and configuration, read back from its directory (`cfg`:
    its config.json when the caller has read it already)."""
    cfg = cfg if cfg is not None else read_resumable_config(run_dir)
    config = TrainConfig.from_run_config(cfg)
    source = reopen_source(cfg["data"])

    def pick(fname):
        df = pd.read_csv(run_dir / fname, dtype={"id": str})
        idx = [source.index_of(i) for i in df["id"]]
        return source.subset(idx), df["label"].to_numpy(np.int64)

    train_src, train_labels = pick("train_ids.csv")
    valid_src, valid_labels = pick("valid_ids.csv")
    return Prepared(run_dir, config, cfg, train_src, valid_src, train_labels, valid_labels)
