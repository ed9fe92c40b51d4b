"""Side-by-side speed of this project's paths vs the stock fastai path, on the same files.

    python -m model.bench                          # CPU, default arch, 1024 patches
    python -m model.bench --n 512 --json bench.json
    python -m model.bench --device cuda --train-archs resnet18,resnet50,densenet169 \\
        --synthetic-n 220025 --compile             # GPU training throughput on a full-size set
    python -m model.bench --quick                  # tiny, seconds (the tests)

Data: --n patches of --data (default ../shared/data/pcam-sample when present, else the built-in
synthetic set) are copied into a temporary Kaggle-layout folder of .tif files, so every path
reads real files; the same patches are also written as an official-layout PCam HDF5 file
(gzip, one chunk per patch) and packed with model.data.packing into a temporary packed cache.

Rows (each: ours, stock, ratio = ours/stock; for ms/patch lower is better):
  read_kaggle   patches/s  KaggleSource.read_batch          | fastai PILImage.create + image2tensor
  read_h5       patches/s  PcamH5Source.read_batch          | (same stock: fastai reads files)
  read_packed   patches/s  packed cache (memmap) read_batch | (same stock)
  train[:ARCH]  img/s      model.training.learner.make_learner: packed cache -> uint8
                           batches -> on-device
                           augmentation + normalisation (BatchTransform) -> model.train's
                           precision (bf16 autocast on CUDA; fp32 on CPU, where bf16 training
                           is slower; --precision overrides), channels_last, whole 96 px patch
                           (--crop 96)               | ImageDataLoaders.from_df
                           + aug_transforms(flip_vert=True, max_warp=0) + Normalize,
                           vision_learner(pretrained=False), fp32
  infer         patches/s  files -> probabilities: model.evaluation.inference.predict_probs
                           | learn.get_preds(dl=learn.dls.test_dl(files)) fp32
  infer_tta8    patches/s  predict_probs(tta=8): the 8 dihedral views | learn.tta(dl, n=8): 8
                           random aug_transforms views + 1 plain pass (fastai's TTA, 9 passes)
  gradcam       ms/patch   files -> heatmaps: model.nets.gradcam.gradcam (batched)
                           | per-image Captum LayerGradCam loop on the fastai learner's model,
                           same layer
Both sides start from random weights (no downloads). Training times `--steps` steps after
`--warmup` steps; each reading row is the best of `--repeats` passes after one warm-up pass
(files in the page cache). Inference uses the weights of our learner after its timed steps,
loaded through model.runs.load.load_run from a run directory written like model.train writes one;
the stock learner gets the same weights (same architecture), which gives the agreement checks:
ours vs a plain fp32 forward of the same weights (max |diff|, AUC diff), stock fastai vs that
fp32 forward, and our Grad-CAM vs the stock Captum loop.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from model.core.atomic import write_csv
from model.core.errors import DataError, PcamLensError
from model.core.runtime import cpu_has_bf16, process_memory_mb, tune_allocator
from model.data.files import FileSource
from model.data.kaggle import KaggleSource
from model.data.open import open_source
from model.data.pack import load_pack
from model.data.packing import pack
from model.data.splits import stratified_split
from model.data.synthetic import SyntheticSource
from model.evaluation.engine import resolve_amp
from model.evaluation.inference import predict_probs
from model.nets.archs import stock_arch
from model.nets.gradcam import gradcam, gradcam_layers
from model.nets.transforms import InputConfig, prepare
from model.runs.format import save_weights
from model.runs.load import load_run
from model.training.config import (
    DataConfig,
    InputChoice,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    ScheduleConfig,
    TrainConfig,
)
from model.training.distributed import unwrap
from model.training.learner import build_for_new_run, make_learner
from model.training.loop import write_new_run_files
from model.training.prepare import prepare_new

REPO = Path(__file__).resolve().parents[2]  # model/benchmarks/suite.py -> the repository
ROW_KEYS = ("read_kaggle", "read_h5", "read_packed", "train", "infer", "infer_tta8", "gradcam")
FULL_KAGGLE_N = 220_025


def default_data() -> str:
    shared = Path(os.environ.get("PCAM_LENS_SHARED", REPO.parent / "shared" / "data"))
    sample = shared.expanduser() / "pcam-sample"
    return str(sample) if (sample / "train_labels.csv").is_file() else "synthetic"


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One measurement of ours against stock."""

    key: str
    what: str
    unit: str  # patches/s, img/s (higher is better) or ms/patch (lower is better)
    ours: float | None
    stock: float | None
    ours_path: str = ""
    stock_path: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """ours / stock, as measured (for ms/patch, < 1 means ours is faster)."""
        if self.ours is None or self.stock is None or self.stock == 0:
            return None
        return self.ours / self.stock

    @property
    def speedup(self) -> float | None:
        """How many times faster ours is (ratio, inverted for ms/patch)."""
        r = self.ratio
        if r is None or r == 0:
            return None
        return 1.0 / r if self.unit.startswith("ms") else r

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "speedup": self.speedup}


@dataclass
class Settings:
    device: str
    arch: str
    precision: str  # our training precision: auto = model.train's choice
    crop: int       # our centre crop = network input (96: the same pixels the stock path sees)
    data: str
    n: int
    bs: int
    steps: int
    warmup: int
    infer_bs: int
    gradcam_n: int
    repeats: int
    train_archs: list[str]
    workers: int | None
    compile: bool
    synthetic_n: int | None
    cache_dir: str | None
    quick: bool


@dataclass
class BenchData:
    """The same patches as files, as HDF5 and as a packed cache."""

    root: Path                # temporary folder holding everything
    kaggle: Path              # Kaggle layout: train/<id>.tif + train_labels.csv
    ids: list[str]
    labels: np.ndarray
    h5: Path                  # camelyonpatch_level_2_split_valid_x.h5 (+ _y.h5)
    pack: Path                # packed cache of `kaggle` (model.pack --out)
    origin: str               # where the patches came from

    @property
    def files(self) -> list[Path]:
        return [self.kaggle / "train" / f"{i}.tif" for i in self.ids]


# --------------------------------------------------------------------------- environment


def hardware_info(device: str) -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_bf16": cpu_has_bf16(),
            "load_avg": [round(v, 2) for v in os.getloadavg()], "device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update({"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                     "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                     "gpu_capability": f"{p.major}.{p.minor}",
                     "gpu_bf16": bool(torch.cuda.is_bf16_supported()),
                     "cuda": torch.version.cuda})
    return info


def versions() -> dict:
    import captum
    import fastai
    import timm
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "fastai": fastai.__version__,
            "timm": timm.__version__, "captum": captum.__version__, "numpy": np.__version__}


class GpuUtilisation:
    """Samples GPU utilisation (%) in a thread: torch.cuda.utilization() (pynvml), else
    nvidia-smi. `stop()` returns {"mean", "max", "samples", "how"}, or None when neither
    works (then nothing is reported)."""

    def __init__(self, index: int = 0, every: float = 0.2):
        self.index, self.every = index, every
        self.samples: list[float] = []
        self.how: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        import torch

        if self.how in (None, "torch.cuda.utilization"):
            try:
                v = float(torch.cuda.utilization(self.index))
                self.how = "torch.cuda.utilization"
                return v
            except Exception:  # no pynvml / NVML: try nvidia-smi
                if self.how is not None:
                    return None
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits", "-i", str(self.index)],
                                 capture_output=True, text=True, timeout=5)
            v = float(out.stdout.strip().splitlines()[0])
            self.how = "nvidia-smi"
            return v
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            self.how = "unavailable"
            return None

    def _loop(self):
        while not self._stop.wait(self.every):
            v = self._read()
            if v is None:
                return
            self.samples.append(v)

    def start(self) -> GpuUtilisation:
        if self._read() is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.samples:
            return None
        return {"mean": round(float(np.mean(self.samples)), 1),
                "max": round(float(np.max(self.samples)), 1), "samples": len(self.samples),
                "how": self.how}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _quiet(*args, **kwargs) -> None:
    pass


# --------------------------------------------------------------------------- data


def _pick(labels: np.ndarray | None, n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """n indices (sorted), stratified by label when there are labels."""
    if n >= n_total:
        return np.arange(n_total)
    if labels is None:
        return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))

    return np.sort(stratified_split(labels, n / n_total, seed).valid_idx)


def write_h5(x: np.ndarray, y: np.ndarray, folder: Path, split: str = "valid") -> Path:
    """An official-layout PCam HDF5 pair: x uint8 [N,96,96,3] gzip-4 with one chunk per patch
    (as the published files), y uint8 [N,1,1,1]."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    xp = folder / f"camelyonpatch_level_2_split_{split}_x.h5"
    with h5py.File(xp, "w") as f:
        f.create_dataset("x", data=x, chunks=(1, *x.shape[1:]), compression="gzip",
                         compression_opts=4)
    with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f.create_dataset("y", data=y.astype(np.uint8).reshape(-1, 1, 1, 1))
    return xp


def prepare_data(spec: str, n: int, root: Path) -> BenchData:
    """Copy (or write) n patches of `spec` into a Kaggle folder, an HDF5 file and a pack."""
    import pandas as pd
    from PIL import Image

    source = open_source(spec, "train", use_pack=False)
    if source.size != 96:
        raise DataError(f"{source.describe_short()} has {source.size}px patches; the bench "
                        "compares 96x96 PCam patches.", fix="Use a Kaggle folder, PCam HDF5 "
                        "files or synthetic.")
    idx = _pick(source.labels, len(source), n)
    ids = [source.ids[i] for i in idx]
    labels = (source.labels[idx] if source.labels is not None
              else np.zeros(len(idx), np.int64)).astype(np.int64)
    kaggle = root / "kaggle"
    (kaggle / "train").mkdir(parents=True)
    x = source.read_batch(idx)
    copy_files = isinstance(source, FileSource) and getattr(source, "expect_size", None)
    for k, (i, pid) in enumerate(zip(idx, ids)):
        dst = kaggle / "train" / f"{pid}.tif"
        if copy_files and source.path_of(int(i)).suffix.lower() == ".tif":
            shutil.copyfile(source.path_of(int(i)), dst)  # the real files, byte for byte
        else:
            Image.fromarray(x[k]).save(dst, format="TIFF")  # uncompressed, like Kaggle's

    write_csv(kaggle / "train_labels.csv", pd.DataFrame({"id": ids, "label": labels}),
              fsync=False)  # a scratch copy in a temp dir; atomic like every other write
    h5 = write_h5(x, labels, root / "h5")
    packed, _ = pack(kaggle, "train", out=root / "packs", progress=False, workers=2)
    origin = "synthetic (generated, written as .tif)" if source.synthetic else str(
        source.describe_short())
    return BenchData(root, kaggle, ids, labels, h5, packed, origin)


def _big_chunk(args) -> tuple[int, np.ndarray]:
    n, seed, start, stop = args
    return start, SyntheticSource(n=n, seed=seed).read_batch(np.arange(start, stop))


def big_synthetic_pack(n: int, where: Path, workers: int) -> Path:
    """A packed cache of n synthetic patches (for GPU training throughput at full Kaggle size).

    Generated in parallel processes (~1 ms per patch per core) into an uncompressed PCam
    HDF5 file, packed with model.pack, and the HDF5 removed. Reused when `where` already
    holds one of n patches."""
    import h5py

    target = where / "pack-train"
    with contextlib.suppress(PcamLensError, OSError, KeyError):
        if len(load_pack(target)) == n:
            return target
    h5dir = where / "h5"
    h5dir.mkdir(parents=True, exist_ok=True)
    labels = SyntheticSource(n=n, seed=0).labels
    chunk = 2048
    t0 = time.perf_counter()
    print(f"generating {n} synthetic patches with {workers} processes ...", file=sys.stderr)
    from concurrent.futures import ProcessPoolExecutor

    with h5py.File(h5dir / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        ds = f.create_dataset("x", shape=(n, 96, 96, 3), dtype=np.uint8,
                              chunks=(min(n, 256), 96, 96, 3))
        jobs = [(n, 0, a, min(a + chunk, n)) for a in range(0, n, chunk)]
        with ProcessPoolExecutor(max(1, workers)) as pool:
            pending: list = []
            for job in jobs + [None] * (2 * workers):  # a window of 2 chunks per process
                if job is not None:
                    pending.append(pool.submit(_big_chunk, job))
                if pending and (job is None or len(pending) > 2 * workers):
                    start, x = pending.pop(0).result()
                    ds[start:start + len(x)] = x
    with h5py.File(h5dir / "camelyonpatch_level_2_split_train_y.h5", "w") as f:
        f.create_dataset("y", data=labels.astype(np.uint8).reshape(-1, 1, 1, 1))
    print(f"generated in {time.perf_counter() - t0:.0f} s; packing ...", file=sys.stderr)
    packed, _ = pack(h5dir, "train", out=where, progress=False, workers=workers, force=True)
    shutil.rmtree(h5dir)  # a pack whose data folder is gone is used as it is
    return packed


# --------------------------------------------------------------------------- (a) reading


def _rate(read, n: int, repeats: int) -> float:
    """Patches per second of `read()` (which reads n patches): best of `repeats` passes after
    one warm-up pass."""
    read()
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - t0)
    return n / best


def bench_reading(data: BenchData, s: Settings) -> list[Row]:
    from fastai.vision.core import PILImage, image2tensor

    n, chunk = len(data.ids), 256
    starts = range(0, n, chunk)

    def batched(src):
        def read():
            for a in starts:
                src.read_batch(np.arange(a, min(a + chunk, n)))
        return read

    files = data.files

    def stock():
        for f in files:
            image2tensor(PILImage.create(f))

    stock_rate = _rate(stock, n, s.repeats)
    stock_path = "fastai PILImage.create(file) + image2tensor, one file at a time"
    kaggle = KaggleSource(data.kaggle, "train")
    h5 = open_source(data.h5, "valid")
    packed = load_pack(data.pack)
    one = "single thread, batches of 256 in order"
    return [
        Row("read_kaggle", "read: Kaggle .tif files", "patches/s",
            _rate(batched(kaggle), n, s.repeats), stock_rate,
            "KaggleSource.read_batch (PIL decode + checks)", stock_path, one),
        Row("read_h5", "read: PCam HDF5 (gzip)", "patches/s",
            _rate(batched(h5), n, s.repeats), stock_rate,
            "PcamH5Source.read_batch (h5py, one gzip chunk per patch)", stock_path, one),
        Row("read_packed", "read: packed cache", "patches/s",
            _rate(batched(packed), n, s.repeats), stock_rate,
            "packed cache read_batch (memmap slice)", stock_path, one),
    ]


# --------------------------------------------------------------------------- (b) training


def make_step_timer(warmup: int, steps: int, device: str, bs: int):
    """A fastai callback that times `steps` training steps after `warmup` steps (across
    epochs if needed), skips validation, and then stops the fit."""
    from fastai.callback.core import Callback, CancelFitException, CancelValidException

    class StepTimer(Callback):
        order = 100

        def __init__(self):
            self.done, self.t0, self.seconds, self.util = 0, None, None, None

        def after_batch(self):
            if not self.training:
                return
            self.done += 1
            if self.done == warmup:
                _sync(device)
                self.util = GpuUtilisation().start() if device == "cuda" else None
                self.t0 = time.perf_counter()
            elif self.done == warmup + steps:
                _sync(device)
                self.seconds = time.perf_counter() - self.t0
                self.util = self.util.stop() if self.util is not None else None
                raise CancelFitException()

        def before_validate(self):
            raise CancelValidException()

        @property
        def img_per_s(self) -> float:
            return steps * bs / self.seconds

    return StepTimer()


def time_training(learn, s: Settings) -> tuple[float, dict | None]:
    """(img/s, GPU utilisation) of `s.steps` steps of `learn` after `s.warmup` steps."""
    timer = make_step_timer(s.warmup, s.steps, s.device, s.bs)
    per_epoch = max(1, len(learn.dls.train))
    epochs = math.ceil((s.warmup + s.steps) / per_epoch) + 1
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, lr=1e-3, cbs=[timer])
    if timer.seconds is None:
        raise PcamLensError(f"The training loader ran out after {timer.done} steps.",
                            fix="Use a larger --n or a smaller --bs.")
    return timer.img_per_s, timer.util


@dataclass
class OurRun:
    learn: object
    prepared: object
    run_dir: Path


def our_learner(data_spec: str, arch: str, run_dir: Path, s: Settings) -> OurRun:
    """This project's learner exactly as model.train builds it (random init), and its run
    directory (config.json, split) written as model.train writes it."""
    import torch

    config = TrainConfig(
        data=DataConfig(spec=data_spec, checks=False),
        model=ModelConfig(arch=arch, pretrained=None),
        input=InputChoice(crop=s.crop, size=s.crop),
        schedule=ScheduleConfig(lr_find=False),
        optim=OptimConfig(bs=s.bs),
        runtime=RuntimeConfig(seed=0, device=s.device, precision=s.precision,
                              workers=s.workers),
        run_dir=str(run_dir))
    p = prepare_new(config, _quiet)
    torch.manual_seed(0)
    model, splitter, facts = build_for_new_run(p.config, p.train_src, _quiet)
    p.facts.update(facts)
    write_new_run_files(p, "python -m model.bench")
    learn, _, _ = make_learner(p.config, InputConfig.from_dict(p.facts["input"]), model,
                               splitter, p, log=_quiet)
    if s.compile:
        learn.create_opt()  # on the plain module: fastai's splitter indexes model[0]
        learn.model = torch.compile(learn.model)
    return OurRun(learn, p, run_dir)


def stock_learner(data: BenchData, valid_ids: set[str], arch: str, s: Settings):
    """The stock fastai path: ImageDataLoaders.from_df on the .tif files, aug_transforms +
    Normalize on the batch, vision_learner with random init, fp32."""
    import pandas as pd
    import torch
    from fastai.data.transforms import Normalize
    from fastai.metrics import accuracy
    from fastai.vision.augment import aug_transforms
    from fastai.vision.core import imagenet_stats
    from fastai.vision.data import ImageDataLoaders
    from fastai.vision.learner import vision_learner

    df = pd.DataFrame({"name": [f"{i}.tif" for i in data.ids], "label": data.labels,
                       "is_valid": [i in valid_ids for i in data.ids]})
    kw = {} if s.workers is None else {"num_workers": s.workers}
    dls = ImageDataLoaders.from_df(
        df, path=data.kaggle, folder="train", fn_col="name", label_col="label",
        valid_col="is_valid", bs=s.bs, device=torch.device(s.device),
        batch_tfms=[*aug_transforms(flip_vert=True, max_warp=0),
                    Normalize.from_stats(*imagenet_stats)], **kw)
    torch.manual_seed(0)
    return vision_learner(dls, stock_arch(arch), pretrained=False, metrics=accuracy)


def _precision_words(p: str) -> str:
    return "fp32" if p == "fp32" else f"{p} autocast" if p == "bf16" else f"{p} mixed precision"


def bench_training(data: BenchData, arch: str, train_data: str, s: Settings, root: Path,
                   key: str) -> tuple[Row, OurRun, object]:
    ours = our_learner(train_data, arch, root / "runs" / arch, s)
    ours_ips, ours_util = time_training(ours.learn, s)
    valid_ids = set(ours.prepared.valid_src.ids) if train_data == str(data.pack) else set()
    stock = stock_learner(data, valid_ids or set(data.ids[::5]), arch, s)
    stock_ips, stock_util = time_training(stock, s)
    precision = ours.prepared.config.runtime.precision
    note = f"{s.steps} steps of {s.bs} after {s.warmup} warm-up steps"
    if train_data != str(data.pack):
        note += f"; ours on {len(ours.prepared.train_src)} training patches of the big " \
                f"synthetic pack, stock on the {len(data.ids)} files"
    extra = {}
    if ours_util or stock_util:
        extra = {"gpu_util_ours": ours_util, "gpu_util_stock": stock_util}
    row = Row(key, f"train step ({arch})", "img/s", ours_ips, stock_ips,
              f"packed cache -> uint8 batches -> on-device aug (BatchTransform) -> "
              f"{_precision_words(precision)}, channels_last"
              + (", torch.compile" if s.compile else ""),
              "from_df .tif files, aug_transforms(flip_vert=True, max_warp=0) + Normalize, "
              "vision_learner(pretrained=False), fp32", note, extra)
    return row, ours, stock


# --------------------------------------------------------------------------- (c, d) inference


def save_run_weights(ours: OurRun):
    """Write our learner's weights as the run's best.safetensors and load the run back the way
    inference does (model.runs.load.load_run)."""

    model = unwrap(getattr(ours.learn.model, "_orig_mod", ours.learn.model))
    save_weights(model, ours.run_dir / "best.safetensors", {"epoch": 0, "auc": None})
    return load_run(ours.run_dir, device=next(model.parameters()).device)


def give_stock_our_weights(stock, loaded) -> str | None:
    """Load our weights into the stock learner's model (same architecture): None when done,
    else why not."""
    try:
        stock.model.load_state_dict(loaded.model.state_dict())
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def fp32_reference(loaded, x: np.ndarray, bs: int) -> np.ndarray:
    """softmax(model(prepare(x)))[:, 1] in plain fp32, the definition ours must match."""
    import torch

    dev = next(loaded.model.parameters()).device
    out = []
    with torch.inference_mode():
        for a in range(0, len(x), bs):
            xb = prepare(torch.from_numpy(x[a:a + bs]).to(dev), loaded.input)
            out.append(torch.softmax(loaded.model(xb).float(), 1)[:, 1].double().cpu())
    return torch.cat(out).numpy()


def _time(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def bench_inference(data: BenchData, loaded, stock, s: Settings) -> tuple[list[Row], dict]:
    source = KaggleSource(data.kaggle, "train")  # the files, not the pack: end to end
    n = len(source)
    files = data.files
    warm = np.arange(min(n, s.infer_bs))

    def ours(tta):
        predict_probs(loaded, source, tta=tta, batch_size=s.infer_bs, indices=warm,
                      progress=False)
        _sync(s.device)
        t, p = _time(lambda: predict_probs(loaded, source, tta=tta, batch_size=s.infer_bs,
                                           progress=False))
        _sync(s.device)
        return n / t, p

    def stock_dl(items, workers):
        # fastai's default keeps its loader worker processes; on a small CPU they compete
        # with the model's threads, so the stock path is timed both ways and the faster wins
        return stock.dls.test_dl(items, bs=s.infer_bs,
                                 **({} if workers is None else {"num_workers": workers}))

    def stock_preds(workers):
        with stock.no_bar():
            stock.get_preds(dl=stock_dl(files[:len(warm)], workers))
            dl = stock_dl(files, workers)
            t, (p, _) = _time(lambda: stock.get_preds(dl=dl))
        return n / t, p[:, 1].double().numpy()

    def stock_tta(workers):
        with stock.no_bar():
            stock.get_preds(dl=stock_dl(files[:len(warm)], workers))
            dl = stock_dl(files, workers)
            t, _ = _time(lambda: stock.tta(dl=dl, n=8))
        return n / t

    amp = resolve_amp("auto", next(loaded.model.parameters()).device)
    ours_what = (f"predict_probs: files -> uint8 batches -> "
                 f"{'bf16 autocast' if amp else 'fp32'}, channels_last, batch {s.infer_bs}")
    ours_rate, ours_p = ours(1)
    configs = {"num_workers=0": 0, "fastai default workers": None}
    if s.workers is not None:
        configs = {f"num_workers={s.workers}": s.workers}
    stock_runs = {name: stock_preds(w) for name, w in configs.items()}
    best = max(stock_runs, key=lambda k: stock_runs[k][0])
    stock_rate, stock_p = stock_runs[best]
    both = ", ".join(f"{k} {v[0]:.0f}/s" for k, v in stock_runs.items())
    ours_tta, _ = ours(8)
    rows = [
        Row("infer", "inference: files -> probabilities", "patches/s", ours_rate, stock_rate,
            ours_what, f"learn.get_preds(dl=learn.dls.test_dl(files, bs={s.infer_bs})), fp32, "
                       f"best stock configuration: {best} ({both})",
            f"warm-up batch first on both paths (start-up not timed); {n} files",
            {f"stock_{k.replace(' ', '_').replace('=', '')}": v[0]
             for k, v in stock_runs.items()}),
        Row("infer_tta8", "inference with 8x TTA", "patches/s", ours_tta,
            stock_tta(configs[best]),
            ours_what.replace("predict_probs", "predict_probs(tta=8)") + ": 8 dihedral views",
            f"learn.tta(dl=test_dl, n=8) with {best}: 8 random aug_transforms views + 1 plain "
            "pass, fp32",
            "fastai's TTA is the stock reference: 9 forward passes per patch vs our 8"),
    ]
    # agreement: the same weights and patches
    x = source.read_batch(np.arange(n))
    ref = fp32_reference(loaded, x, s.infer_bs)
    agree = {"ours_precision": "bf16" if amp is not None else "fp32",
             "ours_vs_fp32_max_abs_diff": float(np.abs(ours_p - ref).max()),
             "ours_vs_fp32_mean_abs_diff": float(np.abs(ours_p - ref).mean()),
             "stock_vs_fp32_max_abs_diff": float(np.abs(stock_p - ref).max())}
    if len(np.unique(data.labels)) == 2:
        from sklearn.metrics import roc_auc_score

        agree.update({"auc_fp32": float(roc_auc_score(data.labels, ref)),
                      "auc_ours": float(roc_auc_score(data.labels, ours_p)),
                      "auc_stock": float(roc_auc_score(data.labels, stock_p))})
        agree["auc_diff_ours_vs_fp32"] = abs(agree["auc_ours"] - agree["auc_fp32"])
    return rows, agree


# --------------------------------------------------------------------------- (e) Grad-CAM


def stock_gradcam(stock, files: list[Path], layer_name: str, size: int) -> np.ndarray:
    """The stock way: one image at a time through fastai's test_dl, Captum LayerGradCam on
    the learner's model, upsampled (bilinear) to the input and divided by its maximum."""
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    model = stock.model.eval()
    lgc = LayerGradCam(model, dict(model.named_modules())[layer_name])
    out = []
    for (xb,) in stock.dls.test_dl(files, bs=1):
        with torch.no_grad():
            target = int(model(xb).argmax(1))
        cam = lgc.attribute(xb, target=target, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam, (size, size), interpolate_mode="bilinear")
        cam = cam[0, 0].detach().clamp_min(0)
        peak = cam.max()
        out.append((cam / peak if peak > 0 else cam).cpu().numpy())
    return np.stack(out)


def bench_gradcam(data: BenchData, loaded, stock, s: Settings) -> tuple[Row, dict]:
    k = min(s.gradcam_n, len(data.ids))
    source = KaggleSource(data.kaggle, "train")
    layer = gradcam_layers(loaded)[0]
    idx = np.arange(k)
    gradcam(loaded, source.read_batch(idx[:1]), layer=layer)  # warm-up
    stock_gradcam(stock, data.files[:1], layer, loaded.input.size)
    t_ours, ours = _time(lambda: gradcam(loaded, source.read_batch(idx), layer=layer))
    t_stock, theirs = _time(lambda: stock_gradcam(stock, data.files[:k], layer,
                                                  loaded.input.size))
    row = Row("gradcam", f"Grad-CAM ({layer})", "ms/patch", 1000 * t_ours / k,
              1000 * t_stock / k, "files -> model.nets.gradcam.gradcam (batched, fp32)",
              "per-image Captum LayerGradCam on the fastai learner's model via test_dl(bs=1)",
              f"{k} patches; lower is better")
    return row, {"gradcam_max_abs_diff": float(np.abs(ours - theirs).max())}


# --------------------------------------------------------------------------- memory


def _rss_child(run_dir: str, n: int, bs: int, q) -> None:
    import tracemalloc

    tune_allocator()  # as in the CLIs
    loaded = load_run(run_dir)
    src = open_source(f"synthetic:n={n},seed=2", "train")
    base = process_memory_mb()
    tracemalloc.start()
    probs = predict_probs(loaded, src, batch_size=bs, progress=False)
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    q.put({"n": n, "batch_size": bs, "rss_before_mb": base.get("rss_mb", float("nan")),
           "peak_rss_mb": process_memory_mb().get("peak_rss_mb", float("nan")),
           "tracemalloc_peak_mb": traced / 2**20, "predicted": int(len(probs))})


def measure_inference_memory(run_dir: Path, sizes: list[int], bs: int) -> list[dict]:
    """Peak RSS of predict_probs over n synthetic patches, each n in a fresh process: with
    memory bounded by the batch size, the peak does not grow with n."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = []
    for n in sizes:
        q = ctx.Queue()
        p = ctx.Process(target=_rss_child, args=(str(run_dir), n, bs, q))
        p.start()
        res = q.get()
        p.join()
        out.append({k: round(v, 1) if isinstance(v, float) else v for k, v in res.items()})
    return out


# --------------------------------------------------------------------------- report


def format_table(rows: list[Row]) -> str:
    def num(v):
        if v is None:
            return "-"
        return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" if v >= 10 else f"{v:.2f}"

    head = f"{'row':<34} {'unit':<10} {'ours':>10} {'stock':>10} {'ours/stock':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"{r.what:<34} {r.unit:<10} {num(r.ours):>10} {num(r.stock):>10} "
                     f"{ratio:>11}")
    return "\n".join(lines)


def format_report(result: dict, rows: list[Row]) -> str:
    hw, st = result["hardware"], result["settings"]
    v = result["versions"]
    out = [f"pcam-lens bench: {st['device']}, arch {st['arch']}, {st['n']} patches from "
           f"{result['data_origin']}",
           f"hardware: {hw['cpu']}, {hw['cores']} cores, bf16 {'yes' if hw['cpu_bf16'] else 'no'}"
           + (f", GPU {hw['gpu']}" if "gpu" in hw else "")
           + f"; load average {hw['load_avg'][0]} / {hw['load_avg'][1]} / {hw['load_avg'][2]}"
           f" (before) -> {result['load_avg_after'][0]} (after)",
           f"versions: torch {v['torch']}, fastai {v['fastai']}, timm {v['timm']}, "
           f"captum {v['captum']}", "", format_table(rows), ""]
    for r in rows:
        out.append(f"{r.what}: ours = {r.ours_path}; stock = {r.stock_path}"
                   + (f" [{r.note}]" if r.note else ""))
        for k, u in r.extra.items():
            if isinstance(u, dict):  # GPU utilisation
                out.append(f"  {k}: mean {u['mean']}%, max {u['max']}% ({u['how']})")
            elif u is not None:  # e.g. each stock configuration's rate
                out.append(f"  {k}: {u:.1f} {r.unit}")
    a = result.get("agreement") or {}
    if a:
        out.append("")
        out.append(f"agreement (same weights, same {st['n']} patches): ours "
                   f"({a['ours_precision']}) vs plain fp32 forward max |diff| "
                   f"{a['ours_vs_fp32_max_abs_diff']:.2e} "
                   f"(mean {a['ours_vs_fp32_mean_abs_diff']:.2e}); stock fastai vs fp32 max "
                   f"|diff| {a['stock_vs_fp32_max_abs_diff']:.2e}"
                   + (f"; AUC fp32 {a['auc_fp32']:.4f}, ours {a['auc_ours']:.4f} (diff "
                      f"{a['auc_diff_ours_vs_fp32']:.4f})" if "auc_fp32" in a else "")
                   + (f"; Grad-CAM ours vs stock max |diff| {a['gradcam_max_abs_diff']:.2e}"
                      if "gradcam_max_abs_diff" in a else ""))
        if a.get("weights_note"):
            out.append(f"  ({a['weights_note']})")
    for m in result.get("memory") or []:
        out.append(f"memory: predict_probs over {m['n']} synthetic patches (batch "
                   f"{m['batch_size']}): peak RSS {m['peak_rss_mb']:.0f} MB (after loading "
                   f"{m['rss_before_mb']:.0f} MB), tracemalloc peak "
                   f"{m['tracemalloc_peak_mb']:.1f} MB")
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise PcamLensError("--device cuda was asked for but no CUDA GPU is visible "
                            f"(torch {torch.__version__}, CUDA build "
                            f"{torch.version.cuda or 'none'}).",
                            fix="Run on a machine with an NVIDIA GPU and a CUDA build of torch, "
                                "or use --device cpu.")


def run_bench(s: Settings, memory: list[int] | None = None) -> tuple[dict, list[Row]]:
    import torch

    check_device(s.device)
    torch.set_num_threads(os.cpu_count() or 1)
    hw = hardware_info(s.device)
    rows: list[Row] = []
    result: dict = {"hardware": hw, "versions": versions(), "settings": asdict(s)}
    seconds = result["section_seconds"] = {}

    @contextlib.contextmanager
    def section(name):
        t0 = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - t0, 1)

    with tempfile.TemporaryDirectory(prefix="pcam-lens-bench-") as tmp:
        root = Path(tmp)
        with section("data"):
            data = prepare_data(s.data, s.n, root)
        result["data_origin"] = data.origin
        s.n = len(data.ids)
        result["settings"]["n"] = s.n
        with section("reading"):
            rows += bench_reading(data, s)
        train_data = str(data.pack)
        if s.synthetic_n:
            where = Path(s.cache_dir) if s.cache_dir else root / "big"
            where.mkdir(parents=True, exist_ok=True)
            with section("synthetic_pack"):
                train_data = str(big_synthetic_pack(s.synthetic_n, where, os.cpu_count() or 1))
        main = None
        for arch in s.train_archs:
            key = "train" if arch == s.arch else f"train:{arch}"
            with section(key):
                row, ours, stock = bench_training(data, arch, train_data, s, root, key)
            rows.append(row)
            if arch == s.arch:
                main = (ours, stock)
            elif s.device == "cuda":
                del ours, stock
                torch.cuda.empty_cache()
        ours, stock = main
        loaded = save_run_weights(ours)
        why = give_stock_our_weights(stock, loaded)
        with section("inference"):
            inf_rows, agree = bench_inference(data, loaded, stock, s)
        rows += inf_rows
        with section("gradcam"):
            cam_row, cam_agree = bench_gradcam(data, loaded, stock, s)
        rows.append(cam_row)
        if why is None:
            agree.update(cam_agree)
        else:
            agree["weights_note"] = f"stock model kept its own weights: {why}"
        agree["weights"] = (f"our learner after {s.warmup + s.steps} training steps from "
                            "random init (near-chance predictions)")
        result["agreement"] = agree
        if memory:
            with section("memory"):
                result["memory"] = measure_inference_memory(ours.run_dir, memory, 256)
    result["rows"] = [r.to_dict() for r in rows]
    result["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    return result, rows
