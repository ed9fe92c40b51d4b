"""Does the review loop find wrong labels, and does fixing them give the AUC back?

    python -m model.bench --label-noise 0.1 --data ../shared/data/pcam-sample

On real labelled patches (a Kaggle folder):
1. a stratified held-out set (`holdout`, 1/6 by default) is put aside: never trained on,
   never used to choose anything; the rest is the pool the experiment works on;
2. `rate` of the pool's labels are flipped (seeded; the flips are written to flips.csv) into a
   copy of the folder whose train/ is a link to the original (no patch is copied);
3. cross-validation (model.oof.crossval, one shared feature cache) on the clean pool, on the
   noisy pool, and on the noisy pool after the top-N "likely label errors" were decided as a
   pathologist would (N = the number flipped): a flipped label is relabelled to the truth, any
   other confirmed, through the review log beside the noisy data and --labels-from-review;
4. ranking quality: precision and recall of the flipped ids among the top k of cleanlab's
   "likely label errors" over all pool patches, of "top losses" of one ordinary run's
   validation split (fold 0: an ordinary run with a 20 % validation split), of top OOF losses,
   and of random order, at k = N and at 5/10/20 % of the pool reviewed;
5. the fold ensemble of each cross-validation is evaluated on the held-out set
   (model.evaluation.evaluate with the cross-validation directory): AUC before noise, with
   noise, after the review; also each fold model alone on the same patches.

Writes `<out>/label_noise.json`, `precision_at_k.csv` and `precision_at_k.png`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.core.atomic import write_csv, write_json
from model.core.errors import DataError
from model.data.kaggle import KaggleSource
from model.data.open import open_source
from model.data.splits import stratified_split
from model.evaluation.evaluate import evaluate_run
from model.oof.crossval import CVConfig, run_crossval
from model.oof.queue import build_queue
from model.review.log import ReviewLog, default_log_path
from model.training.config import DataConfig

REVIEWER = "label-noise experiment (ground truth)"


@dataclass
class NoiseConfig:
    data: str = "../shared/data/pcam-sample"
    rate: float = 0.1
    out: str = "runs/label-noise"
    holdout: float = 1 / 6
    seed: int = 0
    cv: CVConfig = dataclasses.field(default_factory=CVConfig)

    def __post_init__(self) -> None:
        if not 0 < self.rate < 0.5:
            raise DataError(f"--label-noise must be between 0 and 0.5; got {self.rate}.",
                            fix="Use e.g. --label-noise 0.1 (10 % of the labels flipped).")


# --------------------------------------------------------------------------- data copies


def _kaggle_copy(src: KaggleSource, folder: Path, ids: list[str], labels: np.ndarray) -> Path:
    """A Kaggle folder holding `ids` with `labels`, its train/ a link to the original's."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "train"
    if not link.exists():
        os.symlink(src.folder.resolve(), link, target_is_directory=True)
    write_csv(folder / "train_labels.csv", pd.DataFrame({"id": ids, "label": labels}))
    return folder


def make_noisy_sets(cfg: NoiseConfig) -> dict:
    """Held-out, clean-pool and noisy-pool folders, and the flips (seeded)."""
    out = Path(cfg.out)
    src = open_source(cfg.data, "train")
    if not isinstance(src, KaggleSource):
        raise DataError(f"The label-noise experiment needs a Kaggle folder (train/ + "
                        f"train_labels.csv); {cfg.data} is {src.describe_short()}.",
                        fix="Use --data ../shared/data/pcam-sample or the Kaggle folder.")
    labels = np.asarray(src.labels, np.int64)
    split = stratified_split(labels, cfg.holdout, cfg.seed)
    ids = np.asarray(src.ids, dtype=object)
    pool_ids, pool_y = list(ids[split.train_idx]), labels[split.train_idx]
    rng = np.random.default_rng(cfg.seed)
    n_flip = int(round(cfg.rate * len(pool_ids)))
    flip = np.sort(rng.choice(len(pool_ids), n_flip, replace=False))
    noisy_y = pool_y.copy()
    noisy_y[flip] = 1 - noisy_y[flip]
    flips = pd.DataFrame({"id": [pool_ids[i] for i in flip], "true_label": pool_y[flip],
                          "noisy_label": noisy_y[flip]})
    write_csv(out / "flips.csv", flips)
    return {
        "heldout": _kaggle_copy(src, out / "data-heldout", list(ids[split.valid_idx]),
                                labels[split.valid_idx]),
        "clean": _kaggle_copy(src, out / "data-clean", pool_ids, pool_y),
        "noisy": _kaggle_copy(src, out / "data-noisy", pool_ids, noisy_y),
        "flips": flips, "n_pool": len(pool_ids), "n_heldout": len(split.valid_idx)}


# --------------------------------------------------------------------------- ranking


def precision_recall_at(ranked_ids: list[str], flipped: set[str], k: int) -> tuple[float, float]:
    top = ranked_ids[:k]
    hits = sum(1 for i in top if i in flipped)
    return (hits / len(top) if top else float("nan"), hits / len(flipped))


def rankings(cv_dir: Path, pool_ids: list[str], seed: int) -> dict[str, list[str]]:
    """The orders compared: cleanlab's over the pool, OOF top losses over the pool, the top
    losses of fold 0's validation split (one ordinary run), and random order."""
    oof = pd.read_csv(cv_dir / "oof_predictions.csv", dtype={"id": str})
    label_errors = list(build_queue(cv_dir, "label_errors", include_reviewed=True).table["id"])
    oof_losses = list(build_queue(cv_dir, "top_losses", include_reviewed=True).table["id"])
    run_losses = list(build_queue(cv_dir / "fold-0", "top_losses",
                                  include_reviewed=True).table["id"])
    rng = np.random.default_rng(seed + 1)
    random_order = list(np.asarray(pool_ids, dtype=object)[rng.permutation(len(pool_ids))])
    if len(oof) != len(pool_ids):
        raise DataError(f"{cv_dir} does not cover the pool ({len(oof)} of {len(pool_ids)}).")
    return {"likely label errors (cleanlab, OOF, all patches)": label_errors,
            "top losses (OOF, all patches)": oof_losses,
            "top losses (one run's validation split)": run_losses,
            "random order": random_order}


def ranking_table(orders: dict[str, list[str]], flipped: set[str], n_pool: int) -> pd.DataFrame:
    ks = {"k = N flipped": len(flipped), "5 % reviewed": round(0.05 * n_pool),
          "10 % reviewed": round(0.10 * n_pool), "20 % reviewed": round(0.20 * n_pool)}
    rows = []
    for name, ranked in orders.items():
        for what, k in ks.items():
            p, r = precision_recall_at(ranked, flipped, k)
            rows.append({"order": name, "at": what, "k": k, "reviewable": len(ranked),
                         "precision": p, "recall": r})
    return pd.DataFrame(rows)


def precision_curves(orders: dict[str, list[str]], flipped: set[str]) -> pd.DataFrame:
    rows = []
    for name, ranked in orders.items():
        hits = np.cumsum([i in flipped for i in ranked])
        for k in range(10, len(ranked) + 1, 10):
            rows.append({"order": name, "k": k, "precision": hits[k - 1] / k,
                         "recall": hits[k - 1] / len(flipped)})
    return pd.DataFrame(rows)


def plot_curves(curves: pd.DataFrame, n_flipped: int, path: Path) -> None:
    import matplotlib  # noqa: PLC0415  (fastai's dependency; only the experiment draws)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    # cleanlab's self-confidence and the OOF loss order two-class labels alike: the second is
    # dashed so that both stay visible
    styles = ["-", "--", "-", "-"]
    for (name, g), ls in zip(curves.groupby("order", sort=False), styles):
        ax.plot(g["k"], g["precision"], ls, label=name, lw=2 if ls == "-" else 1.5)
    ax.axvline(n_flipped, color="grey", ls=":", lw=1)
    ax.text(n_flipped, 0.02, " k = N flipped", color="grey", fontsize=8)
    ax.set_xlabel("patches reviewed (k, in queue order)")
    ax.set_ylabel("precision at k (flipped labels found / k)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Finding flipped labels in the shared PCam sample")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the loop


def review_top(noisy: Path, cv_dir: Path, flips: pd.DataFrame, n: int) -> dict:
    """The top-n likely label errors decided as a pathologist with the truth would: relabel
    the flipped ones, confirm the rest (through the review log beside the noisy data)."""
    truth = dict(zip(flips["id"], flips["true_label"]))
    top = build_queue(cv_dir, "label_errors", include_reviewed=True).table.head(n)
    log = ReviewLog(default_log_path(noisy))
    relabelled = 0
    for row in top.itertuples():
        if row.id in truth:
            log.record(REVIEWER, cv_dir.name, row.id, "relabel", int(row.label),
                       new_label=int(truth[row.id]))
            relabelled += 1
        else:
            log.record(REVIEWER, cv_dir.name, row.id, "confirm", int(row.label))
    return {"reviewed": int(len(top)), "relabelled": relabelled, "log": str(log.path)}


def _cv(cfg: NoiseConfig, name: str, data: Path, features: Path, log,
        labels_from_review: str | None = None) -> tuple[Path, float]:
    t0 = time.time()
    train = dataclasses.replace(cfg.cv.train, data=DataConfig(
        spec=str(data), labels_from_review=labels_from_review),
        run_dir=str(Path(cfg.out) / f"cv-{name}"))
    cv_dir = run_crossval(dataclasses.replace(cfg.cv, train=train,
                                              features_dir=str(features)), log)
    return cv_dir, time.time() - t0


def _heldout_auc(cv_dir: Path, heldout: Path) -> dict:
    res = evaluate_run(cv_dir, data=str(heldout), progress=False, n_boot=1000)
    m = res.metrics
    return {"auc": m["auc"], "auc_ci": m["auc_ci"], "member_auc": m["ensemble"]["member_auc"],
            "mean_member_auc": m["ensemble"]["mean_member_auc"],
            "n_training_overlap": m["n_training_overlap"]}


def run_label_noise(cfg: NoiseConfig, log=print) -> dict:
    out = Path(cfg.out)
    if (out / "label_noise.json").exists() or any(out.glob("cv-*/cv.json")):
        raise DataError(f"{out} already holds a label-noise experiment.", path=out,
                        fix="Pass another --out, or remove that folder.")
    t_start = time.time()
    sets = make_noisy_sets(cfg)
    flips = sets["flips"]
    flipped = set(flips["id"])
    n = len(flipped)
    log(f"Label noise: {n} of {sets['n_pool']} pool labels flipped ({cfg.rate:.0%}); "
        f"{sets['n_heldout']} held out. Folder: {out}")
    features = out / "features"
    seconds = {}
    cv_clean, seconds["cv_clean"] = _cv(cfg, "clean", sets["clean"], features, log)
    cv_noisy, seconds["cv_noisy"] = _cv(cfg, "noisy", sets["noisy"], features, log)
    pool_ids = list(pd.read_csv(cv_noisy / "folds.csv", dtype={"id": str})["id"])
    orders = rankings(cv_noisy, pool_ids, cfg.seed)
    table = ranking_table(orders, flipped, sets["n_pool"])
    curves = precision_curves(orders, flipped)
    review = review_top(sets["noisy"], cv_noisy, flips, n)
    cv_fixed, seconds["cv_reviewed"] = _cv(cfg, "reviewed", sets["noisy"], features, log,
                                           labels_from_review="default")
    t0 = time.time()
    auc = {"clean": _heldout_auc(cv_clean, sets["heldout"]),
           "noisy": _heldout_auc(cv_noisy, sets["heldout"]),
           "reviewed": _heldout_auc(cv_fixed, sets["heldout"])}
    seconds["heldout_evaluations"] = time.time() - t0
    lost = auc["clean"]["auc"] - auc["noisy"]["auc"]
    recovered = auc["reviewed"]["auc"] - auc["noisy"]["auc"]
    at_n = table[table["at"] == "k = N flipped"].set_index("order")["precision"].to_dict()
    seconds["total"] = time.time() - t_start
    result = {
        "data": cfg.data, "rate": cfg.rate, "seed": cfg.seed, "n_pool": sets["n_pool"],
        "n_heldout": sets["n_heldout"], "n_flipped": n, "cv": cfg.cv.to_dict(),
        "precision_at_n": at_n, "review": review, "heldout_auc": auc,
        "auc_lost_to_noise": lost, "auc_recovered": recovered,
        "fraction_recovered": recovered / lost if lost > 0 else None,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "dirs": {"clean": str(cv_clean), "noisy": str(cv_noisy), "reviewed": str(cv_fixed)}}
    write_csv(out / "precision_at_k.csv", table)
    write_csv(out / "precision_curves.csv", curves)
    plot_curves(curves, n, out / "precision_at_k.png")
    write_json(out / "label_noise.json", result)
    log(format_result(result, table))
    return result


def score_crossval(out, cv_dir) -> pd.DataFrame:
    """The ranking table of another cross-validation of the experiment's noisy data (e.g. with
    --finetune-epochs 1) against its flips.csv: what a different model buys the ranking."""
    out, cv_dir = Path(out), Path(cv_dir)
    try:
        flips = pd.read_csv(out / "flips.csv", dtype={"id": str})
    except OSError:
        raise DataError(f"{out} holds no flips.csv of a label-noise experiment.", path=out,
                        fix="Pass the --out folder of python -m model.bench --label-noise."
                        ) from None
    pool_ids = list(pd.read_csv(cv_dir / "folds.csv", dtype={"id": str})["id"])
    table = ranking_table(rankings(cv_dir, pool_ids, 0), set(flips["id"]), len(pool_ids))
    write_csv(cv_dir / "precision_at_k.csv", table)
    return table


def format_result(r: dict, table: pd.DataFrame) -> str:
    lines = [f"Label noise {r['rate']:.0%}: {r['n_flipped']} of {r['n_pool']} pool labels "
             f"flipped; {r['n_heldout']} held-out patches never used.", "",
             "order | at | k | precision | recall", "---|---|---|---|---"]
    for row in table.itertuples():
        lines.append(f"{row.order} | {row.at} | {row.k} | {row.precision:.3f} | "
                     f"{row.recall:.3f}")
    a = r["heldout_auc"]
    lines += ["", "held-out AUC (fold ensemble; mean of the single fold models):"]
    for name in ("clean", "noisy", "reviewed"):
        lines.append(f"  {name:9s} {a[name]['auc']:.4f} (95% CI {a[name]['auc_ci'][0]:.4f}-"
                     f"{a[name]['auc_ci'][1]:.4f}); single models {a[name]['mean_member_auc']:.4f}")
    frac = r["fraction_recovered"]
    lines.append(f"AUC lost to noise {r['auc_lost_to_noise']:.4f}, recovered "
                 f"{r['auc_recovered']:.4f}"
                 + (f" ({frac:.0%} of the loss)" if frac is not None else ""))
    lines.append("Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
    return "\n".join(lines)
