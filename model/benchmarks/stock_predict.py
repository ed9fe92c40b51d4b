"""The stock fastai inference path a notebook user writes, as its own process so that its
start-up counts as it does for them (`python -m model.bench --inference` runs it):

    learn = vision_learner(dls, arch)            # the run's architecture, the run's weights
    dl = learn.dls.test_dl(files, num_workers=W)  # Resize(96) per item, Normalize per batch
    probs, _ = learn.get_preds(dl=dl)            # fp32

    python -m model.benchmarks.stock_predict RUN KAGGLE_FOLDER OUT.csv --workers 0|default

Prints one JSON line: start-up seconds (imports, learner, weights) and prediction seconds.
The learner gets the run's own weights, crop, size and normalisation, so its probabilities are
the run's (model.bench compares them with ours: 5e-6 apart for a 96 px run; a run that resizes
its crop differs by the resampler, PIL on uint8 here, torch on floats in ours).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # before the heavy imports: they are part of the stock start-up

import fastai.callback.progress  # noqa: E402,F401  (Learner.no_bar; the notebook's callbacks)
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from fastai.data.transforms import Normalize  # noqa: E402
from fastai.vision.augment import CropPad, Resize  # noqa: E402
from fastai.vision.data import ImageDataLoaders  # noqa: E402
from fastai.vision.learner import vision_learner  # noqa: E402

from model.core.atomic import write_csv  # noqa: E402
from model.core.runtime import quiet_known_warnings  # noqa: E402
from model.nets.archs import stock_arch  # noqa: E402
from model.runs.load import load_run  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.benchmarks.stock_predict",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("data", type=Path, help="Kaggle folder: test/*.tif, sample_submission.csv")
    p.add_argument("out", type=Path)
    p.add_argument("--workers", default="0", help="loader workers: a number or 'default'")
    p.add_argument("--bs", type=int, default=64, help="fastai's default batch size")
    return p


def stock_learner(run_dir: Path, files: list[Path], bs: int):
    """vision_learner on the run's architecture with the run's weights and input statistics;
    the DataLoaders only carry the transforms and the two classes."""
    loaded = load_run(run_dir)
    arch = loaded.config["model"]["arch"]
    mean, std = loaded.input.mean, loaded.input.std
    crop = [CropPad(loaded.input.crop)] if loaded.input.crop < loaded.input.patch else []
    dls = ImageDataLoaders.from_lists(
        files[0].parent.parent, files[:2], ["0", "1"], valid_pct=0.5, bs=bs, num_workers=0,
        item_tfms=[*crop, Resize(loaded.input.size)],
        batch_tfms=Normalize.from_stats(mean, std))
    learn = vision_learner(dls, stock_arch(arch), pretrained=False, n_out=len(loaded.classes))
    learn.model.load_state_dict(loaded.model.state_dict())  # same architecture: must fit
    learn.model.eval()
    return learn


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    quiet_known_warnings()
    ids = pd.read_csv(args.data / "sample_submission.csv", dtype={"id": str})["id"].tolist()
    files = [args.data / "test" / f"{i}.tif" for i in ids]
    learn = stock_learner(args.run_dir, files, args.bs)
    workers = {} if args.workers == "default" else {"num_workers": int(args.workers)}
    t1 = time.perf_counter()
    dl = learn.dls.test_dl(files, **workers)
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=dl)
    t2 = time.perf_counter()
    write_csv(args.out, pd.DataFrame({"id": ids, "label": probs[:, 1].double().numpy()}))
    print(json.dumps({"startup_s": round(t1 - T0, 3), "predict_s": round(t2 - t1, 3),
                      "n": len(ids), "workers": args.workers,
                      "loader_workers": dl.num_workers, "torch_threads": torch.get_num_threads(),
                      "bs": args.bs}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
