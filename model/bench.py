"""Side-by-side speed of this project's paths vs the stock fastai path, on the same files.

    python -m model.bench                          # CPU, default arch, 1024 patches
    python -m model.bench --n 512 --json bench.json
    python -m model.bench --device cuda --train-archs resnet18,resnet50,densenet169 \
        --synthetic-n 220025 --compile             # GPU training throughput on a full-size set
    python -m model.bench --quick                  # tiny, seconds (the tests)
    python -m model.bench --slide --run runs/<name>  # slide heatmaps vs the naive tile loop
    python -m model.bench --inference --run runs/<name>  # files -> submission, 24,000 real
                                                   # patches: stock vs ours, every backend
    python -m model.bench --label-noise 0.1 --data ../shared/data/pcam-sample --out runs/ln
                                                   # the review-loop experiment (minutes)

What each row measures, and how: model/benchmarks/suite.py; end-to-end inference:
model/benchmarks/inference.py; the label-noise experiment: model/benchmarks/label_noise.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from model.benchmarks.inference import (
    InferenceBenchConfig,
    format_inference_report,
    run_inference_bench,
)
from model.benchmarks.label_noise import NoiseConfig, run_label_noise, score_crossval
from model.benchmarks.slide import bench_slide
from model.benchmarks.suite import FULL_KAGGLE_N, Settings, default_data, format_report, run_bench
from model.core.atomic import write_json
from model.core.cli import run_cli
from model.core.errors import DataError
from model.core.runtime import BACKENDS
from model.nets.archs import DEFAULT_ARCH
from model.oof.crossval import CVConfig
from model.runs.load import load_run
from model.slides.heatmap import SlideConfig
from model.training.config import ModelConfig, RuntimeConfig, TrainConfig


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", default=DEFAULT_ARCH, help=f"default {DEFAULT_ARCH}")
    p.add_argument("--data", default=None,
                   help="Kaggle folder, PCam HDF5 or 'synthetic' (default: "
                        "../shared/data/pcam-sample when present, else synthetic)")
    p.add_argument("--n", type=int, default=None, help="patches (default 1024; --quick 16)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    p.add_argument("--quick", action="store_true", help="everything tiny (for the tests)")
    p.add_argument("--bs", type=int, help="training batch (default 64 on CPU, 256 on CUDA)")
    p.add_argument("--steps", type=int, help="timed training steps (default 10 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, help="untimed training steps first (default 2 / 10)")
    p.add_argument("--infer-bs", type=int, default=None, help="inference batch (default 256)")
    p.add_argument("--gradcam-n", type=int, default=None, help="Grad-CAM patches (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="passes per reading row (3)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers for both paths (default: each path's own default)")
    p.add_argument("--train-archs", default=None,
                   help="comma-separated archs for training rows (default: --arch; with "
                        "--device cuda: --arch,resnet18,resnet50,densenet169)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="our training precision (auto = model.train's choice: bf16 on CUDA, "
                        "fp32 on CPU where bf16 training is slower); stock is always fp32")
    p.add_argument("--crop", type=int, default=96,
                   help="our centre crop and network input side (default 96 = the whole "
                        "patch, as the stock path sees it; model.train's default is 64)")
    p.add_argument("--compile", action="store_true", help="torch.compile our training model")
    p.add_argument("--synthetic-n", type=int, default=None, metavar="N",
                   help=f"train ours on a packed synthetic set of N patches (full Kaggle size: "
                        f"{FULL_KAGGLE_N}); generated once, ~1 ms per patch per core")
    p.add_argument("--cache-dir", default=None,
                   help="keep the --synthetic-n pack here and reuse it (default: a temp dir)")
    p.add_argument("--memory", default=None, metavar="N1,N2",
                   help="also measure peak RSS of predict_probs over these numbers of "
                        "synthetic patches (each in a fresh process)")
    inf = p.add_argument_group("end-to-end inference, files -> submission (instead of the "
                               "speed rows)")
    inf.add_argument("--inference", action="store_true",
                     help="stock fastai (num_workers=0 and default) vs model.predict with each "
                          "backend, each in its own process, on --n files (default 24000: the "
                          "sample repeated) of --data, with --run's weights")
    inf.add_argument("--backends", default="auto,eager,compile,onnx",
                     help="model.predict backends to time (default %(default)s)")
    sl = p.add_argument_group("slide heatmap speed (instead of the speed rows)")
    sl.add_argument("--slide", nargs="?", const="synthetic", default=None, metavar="PATH",
                    help="time model.slide's path against the naive per-tile loop (default "
                         "slide: the synthetic demo)")
    sl.add_argument("--run", type=Path, default=None, help="the run for --slide / --inference")
    sl.add_argument("--backend", choices=["eager", "compile", "onnx"], default="eager",
                    help="how ours runs the network for --slide (the naive loop: eager)")
    sl.add_argument("--naive-tiles", type=int, default=256,
                    help="tiles the naive loop runs (it is slow; default 256)")
    n = p.add_argument_group("label-noise experiment (instead of the speed rows)")
    n.add_argument("--label-noise", type=float, metavar="RATE",
                   help="flip this fraction of the labels and measure the review loop")
    n.add_argument("--out", default="runs/label-noise", help="its output folder")
    n.add_argument("--folds", type=int, default=5)
    n.add_argument("--finetune-epochs", type=int, default=0)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--score-cv", type=Path, metavar="CV_DIR",
                   help="score another cross-validation of --out's noisy data against its "
                        "flips (e.g. one run with --finetune-epochs 1)")
    return p


def noise_config(args) -> NoiseConfig:
    train = TrainConfig(model=ModelConfig(arch=args.arch),
                        runtime=RuntimeConfig(seed=args.seed, device=args.device))
    return NoiseConfig(data=args.data or default_data(), rate=args.label_noise, out=args.out,
                       seed=args.seed, cv=CVConfig(train=train, folds=args.folds,
                                                   finetune_epochs=args.finetune_epochs))


def inference_config(args) -> InferenceBenchConfig:
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise DataError(f"--backends {args.backends!r}: unknown {', '.join(bad) or 'empty'}.",
                        fix="Use a comma list of auto, eager, compile, onnx.")
    n = args.n if args.n is not None else 64 if args.quick else 24_000
    if n < 2:
        raise DataError("--n must be at least 2 for --inference.")
    return InferenceBenchConfig(run=args.run, data=args.data or default_data(), n=n,
                                backends=backends, stock=("0",) if args.quick else
                                ("0", "default"), model_n=min(n, 256 if args.quick else 2048))


def settings_from_args(args) -> Settings:
    q, cuda = args.quick, args.device == "cuda"

    def pick(v, quick, gpu, cpu):
        return v if v is not None else quick if q else gpu if cuda else cpu

    archs = [args.arch]
    extra = args.train_archs.split(",") if args.train_archs else (
        ["resnet18", "resnet50", "densenet169"] if cuda and not q else [])
    archs += [a.strip() for a in extra if a.strip() and a.strip() not in archs]
    s = Settings(device=args.device, arch=args.arch, precision=args.precision, crop=args.crop,
                 data=args.data or default_data(),
                 n=pick(args.n, 16, 1024, 1024), bs=pick(args.bs, 4, 256, 64),
                 steps=pick(args.steps, 2, 50, 10), warmup=pick(args.warmup, 1, 10, 2),
                 infer_bs=pick(args.infer_bs, 16, 256, 256),
                 gradcam_n=pick(args.gradcam_n, 2, 64, 32), repeats=pick(args.repeats, 1, 3, 3),
                 train_archs=archs, workers=args.workers if args.workers is not None
                 else (0 if q else None), compile=args.compile, synthetic_n=args.synthetic_n,
                 cache_dir=args.cache_dir, quick=q)
    for name in ("n", "bs", "steps", "warmup", "infer_bs", "gradcam_n", "repeats"):
        if getattr(s, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1.")
    return s


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise DataError(f"--memory {text!r} is not a list of patch counts.",
                        fix="Use e.g. --memory 1000,5000.")
    return sizes


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body():
        if args.score_cv is not None:
            print(score_crossval(args.out, args.score_cv).to_string(index=False))
            return
        if args.slide is not None:
            if args.run is None:
                raise DataError("--slide needs --run RUN (the model to time).",
                                fix="Add --run runs/<name>.")
            b = bench_slide(load_run(args.run), None if args.slide == "synthetic"
                            else args.slide, naive_tiles=args.naive_tiles,
                            cfg=SlideConfig(backend=args.backend))
            print(b.report())
            if args.json:
                write_json(args.json, {**b.__dict__, "speedup": b.speedup,
                                       "of_model": b.of_model})
            return
        if args.inference:
            if args.run is None:
                raise DataError("--inference needs --run RUN (the model to time).",
                                fix="Add --run runs/<name>.")
            load_run(args.run)  # a bad run fails here, before minutes of set-up
            res = run_inference_bench(inference_config(args))
            print(format_inference_report(res))
            if args.json:
                write_json(args.json, res)
            return
        if args.label_noise is not None:
            run_label_noise(noise_config(args))
            return
        s = settings_from_args(args)
        result, rows = run_bench(s, _sizes(args.memory) if args.memory else None)
        print(format_report(result, rows))
        if args.json:

            write_json(args.json, result)
            print(f"\nWritten: {args.json}")

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
