"""The training configuration: one typed dataclass, nested by concern, validated when built.

    config = TrainConfig()                                   # the defaults = the demo
    config = TrainConfig(data=DataConfig(spec="../shared/data/pcam-sample"))
    config = TrainConfig.from_args(get_args_parser().parse_args())   # model/train.py does this
    run_dir = model.training.loop.train(config)

Fields left None take the schedule preset's value when the run starts (`resolve`): "quick" on
the synthetic set, "standard" on real data (see SCHEDULES). The resolved configuration is
written to config.json under "config", next to what the run found out (data description,
split, classes, normalisation) and its provenance (versions, git commit, command), and
`--resume` reads it back with `TrainConfig.from_run_config`, which also converts the first
run format (a "train" section, before this dataclass existed).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields

from model.core.errors import PcamLensError
from model.core.runtime import resolve_device, resolve_precision
from model.data.base import PATCH
from model.nets.archs import DEFAULT_ARCH
from model.nets.transforms import AugmentConfig

# Training schedules by name. "quick" is tuned for a CPU demo, "standard" for a real data set of
# a few thousand patches, "long" for the full 220k Kaggle set on a GPU. (The input transforms
# live in model.nets.transforms; a schedule only says how big the input is.)
SCHEDULES = {
    "quick": dict(frozen_epochs=3, epochs=2, lr=2e-3, wd=0.01, bs=64, crop=64, size=96),
    "standard": dict(frozen_epochs=1, epochs=6, lr=3e-3, wd=0.01, bs=64, crop=96, size=144),
    "long": dict(frozen_epochs=2, epochs=20, lr=1e-3, wd=0.05, bs=128, crop=96, size=192),
}
SPLIT_METHODS = ("auto", "stratified", "grouped")
WEIGHT_SOURCES = ("auto", "pip", "hub")
NORMS = ("weights", "imagenet", "dataset")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MAX_INPUT = 1024  # network input side; beyond it a 96 px patch is only interpolation


class ConfigError(PcamLensError):
    """A configuration value out of range, not one of the choices, or in a bad combination."""


@dataclass
class DataConfig:
    spec: str = "synthetic"  # a path open_source understands, or "synthetic[:n=..,seed=..]"
    max_items: int | None = None  # a stratified random subset of this size
    checks: bool = True  # run the dataset checks (model.data.inspect) first
    drop_bad: bool = False  # drop unusable patches instead of stopping
    drop_outliers: bool = False  # also drop near-black / near-white patches
    labels_from_review: str | None = None  # "default" (the log beside the data) or a log path
    # a duplicates report (python -m model.inspect --duplicates --json): its duplicate and
    # near-duplicate pairs are kept on one side of the split (grouped like slides)
    group_duplicates: str | None = None


@dataclass
class SplitConfig:
    method: str = "auto"  # auto = grouped by slide when slide ids exist, else stratified
    valid_pct: float = 0.2
    valid_ids: str | None = None  # CSV with an 'id' column: the validation set


@dataclass
class ModelConfig:
    arch: str = DEFAULT_ARCH
    pretrained: str | None = "auto"  # auto | pip | hub; None trains from scratch
    # safetensors with the whole network's starting weights (body and head), loaded over the
    # pretrained ones: e.g. a cross-validation fold's head fitted on cached features
    init_weights: str | None = None


@dataclass
class InputChoice:
    crop: int | None = None  # centre crop of the 96 px patch (None: the schedule's)
    size: int | None = None  # network input side (None: the schedule's, or the crop)
    norm: str = "weights"  # normalisation statistics: weights | imagenet | dataset


@dataclass
class ScheduleConfig:
    preset: str = "auto"  # auto | quick | standard | long
    frozen_epochs: int | None = None
    epochs: int | None = None  # epochs of the unfrozen phase
    lr: float | None = None  # max learning rate (None: the schedule's, or lr_find's with lr_auto)
    lr_auto: bool = False  # use lr_find's suggestion
    lr_find: bool = True


@dataclass
class OptimConfig:
    bs: int | None = None  # the global batch (under torchrun split across ranks)
    wd: float | None = None


@dataclass
class AugmentChoice:
    enabled: bool = True
    stain_jitter: float = 0.0  # H&E stain jitter strength; 0.03 is typical

    def augment_config(self) -> AugmentConfig:
        if not self.enabled:
            return AugmentConfig(dihedral=False, rotate_deg=0, brightness=0, contrast=0)
        return AugmentConfig(stain_jitter=self.stain_jitter)


@dataclass
class RuntimeConfig:
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # CPU training resolves to fp32 (bf16 is slower there)
    workers: int | None = None  # data loader worker processes (None: chosen per data set)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputChoice = field(default_factory=InputChoice)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentChoice = field(default_factory=AugmentChoice)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    run_dir: str | None = None  # None: runs/<time>-<arch>-<data>

    def __post_init__(self) -> None:
        validate(self)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_args(cls, args) -> TrainConfig:
        """From the namespace of model/train.py's parser (the only place argv is parsed)."""
        lr, lr_auto = _parse_lr(args.lr)
        return cls(
            data=DataConfig(spec=str(args.data), max_items=args.max_items,
                            checks=not args.no_checks, drop_bad=args.drop_bad,
                            drop_outliers=args.drop_outliers,
                            labels_from_review=args.labels_from_review,
                            group_duplicates=None if args.group_duplicates is None
                            else str(args.group_duplicates)),
            split=SplitConfig(method=args.split, valid_pct=args.valid_pct,
                              valid_ids=None if args.valid_ids is None else str(args.valid_ids)),
            model=ModelConfig(arch=args.arch,
                              pretrained=None if args.no_pretrained else args.pretrained),
            input=InputChoice(crop=args.crop, size=args.size, norm=args.norm),
            schedule=ScheduleConfig(preset=args.preset, frozen_epochs=args.frozen_epochs,
                                    epochs=args.epochs, lr=lr, lr_auto=lr_auto,
                                    lr_find=not args.no_lr_find or lr_auto),
            optim=OptimConfig(bs=args.bs, wd=args.wd),
            augment=AugmentChoice(enabled=not args.no_augment, stain_jitter=args.stain_jitter),
            runtime=RuntimeConfig(seed=args.seed, device=args.device, precision=args.precision,
                                  workers=args.workers),
            run_dir=None if args.run_dir is None else str(args.run_dir))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The inverse of `to_dict` (unknown keys are an error: a typo must not pass)."""
        if not isinstance(d, dict):
            raise ConfigError(f"A training configuration must be a JSON object, not {d!r}.")
        kwargs = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            sub = _SECTIONS.get(f.name)
            if sub is not None:
                if not isinstance(value, dict):
                    raise ConfigError(f"config section {f.name!r} must be an object.")
                known = {g.name for g in fields(sub)}
                extra = sorted(set(value) - known)
                if extra:
                    raise ConfigError(f"config section {f.name!r} has unknown keys {extra}.",
                                      fix=f"Known keys: {', '.join(sorted(known))}.")
                value = sub(**value)
            kwargs[f.name] = value
        extra = sorted(set(d) - {f.name for f in fields(cls)})
        if extra:
            raise ConfigError(f"The training configuration has unknown sections {extra}.")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_run_config(cls, cfg: dict) -> TrainConfig:
        """The resolved configuration of a run, from its config.json (any format version)."""
        if "config" in cfg:
            return cls.from_dict(cfg["config"])
        return _from_v1(cfg)

    # ------------------------------------------------------------------ resolving

    def resolve(self, synthetic: bool) -> TrainConfig:
        """Every None filled in: the schedule preset chosen ('auto': quick on the synthetic set,
        which is easy and serves as a demo; standard on real patches), its values taken where
        nothing was given, device and precision resolved for this machine."""
        preset = self.schedule.preset
        if preset == "auto":
            preset = "quick" if synthetic else "standard"
        values = SCHEDULES[preset]
        crop = self.input.crop or values["crop"]
        # --crop alone means "feed the crop as it is"; the schedule's size goes with its crop
        size = self.input.size or (values["size"] if not self.input.crop else None) or crop
        device = resolve_device(self.runtime.device)
        return dataclasses.replace(
            self,
            input=dataclasses.replace(self.input, crop=crop, size=size),
            schedule=dataclasses.replace(
                self.schedule, preset=preset,
                frozen_epochs=_given(self.schedule.frozen_epochs, values["frozen_epochs"]),
                epochs=_given(self.schedule.epochs, values["epochs"]),
                lr=_given(self.schedule.lr, values["lr"])),
            optim=OptimConfig(bs=_given(self.optim.bs, values["bs"]),
                              wd=_given(self.optim.wd, values["wd"])),
            runtime=dataclasses.replace(
                self.runtime, device=device,
                precision=resolve_precision(self.runtime.precision, device)))

    @property
    def resolved(self) -> bool:
        return self.schedule.preset != "auto" and self.optim.bs is not None

    @property
    def epochs_total(self) -> int:
        return (self.schedule.frozen_epochs or 0) + (self.schedule.epochs or 0)


_SECTIONS = {"data": DataConfig, "split": SplitConfig, "model": ModelConfig,
             "input": InputChoice, "schedule": ScheduleConfig, "optim": OptimConfig,
             "augment": AugmentChoice, "runtime": RuntimeConfig}


def _given(value, default):
    return default if value is None else value


def _parse_lr(text) -> tuple[float | None, bool]:
    if text is None:
        return None, False
    if str(text).strip().lower() == "auto":
        return None, True
    try:
        return float(text), False
    except ValueError:
        raise ConfigError(f"--lr {text!r} is not a number.",
                          fix="Use e.g. --lr 1e-3 or --lr auto.") from None


# --------------------------------------------------------------------------- validation


def _check(ok: bool, what: str, fix: str) -> None:
    if not ok:
        raise ConfigError(what, fix=fix)


def _whole(value, name: str, lo: int, hi: int | None = None, flag: str | None = None) -> None:
    flag = flag or f"--{name.replace('_', '-')}"
    rng = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (
        hi is None or value <= hi)
    _check(ok, f"{flag} {value!r} is not a whole number {rng}.", f"Use {flag} with a value {rng}.")


def _number(value, name: str, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    flag = f"--{name.replace('_', '-')}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    _check(ok, f"{flag} must be between {lo:g} and {hi:g} ({left}{lo:g}, {hi:g}{right}), got "
               f"{value!r}.", f"Use {flag} with a value in {left}{lo:g}, {hi:g}{right}.")


def _choice(value, name: str, choices) -> None:
    flag = f"--{name.replace('_', '-')}"
    _check(value in choices, f"{flag} {value!r} is not one of {', '.join(choices)}.",
           f"Use {flag} {choices[0]} (or {', '.join(choices[1:])}).")


def validate(c: TrainConfig) -> None:
    """Ranges, choices and combinations, whoever built the config (CLI, code, config.json)."""
    for name, sub in _SECTIONS.items():
        _check(isinstance(getattr(c, name), sub), f"config.{name} must be a {sub.__name__}.",
               "Build the configuration with model.training.config's dataclasses.")
    d, s, m, i, sc, o, a, r = (c.data, c.split, c.model, c.input, c.schedule, c.optim,
                               c.augment, c.runtime)
    _check(isinstance(d.spec, str) and d.spec.strip() != "", "--data is empty.",
           "Pass --data with a data folder, a PCam .h5 file, or 'synthetic'.")
    if d.max_items is not None:
        _whole(d.max_items, "max_items", 10)
    _check(not (d.drop_outliers and not d.checks),
           "--drop-outliers needs the dataset checks, which --no-checks turns off.",
           "Drop --no-checks, or drop --drop-outliers.")
    _check(not (d.drop_bad and not d.checks),
           "--drop-bad needs the dataset checks, which --no-checks turns off.",
           "Drop --no-checks, or drop --drop-bad.")
    _choice(s.method, "split", SPLIT_METHODS)
    _number(s.valid_pct, "valid_pct", 0.0, 1.0, lo_open=True, hi_open=True)
    _check(isinstance(m.arch, str) and m.arch.strip() != "", "--arch is empty.",
           f"Use e.g. --arch {DEFAULT_ARCH}.")
    if m.pretrained is not None:
        _choice(m.pretrained, "pretrained", WEIGHT_SOURCES)
    if i.crop is not None:
        _whole(i.crop, "crop", 8, PATCH)
    if i.size is not None:
        _whole(i.size, "size", 16, MAX_INPUT)
    _choice(i.norm, "norm", NORMS)
    _choice(sc.preset, "preset", ("auto", *SCHEDULES))
    if sc.frozen_epochs is not None:
        _whole(sc.frozen_epochs, "frozen_epochs", 0, 1000)
    if sc.epochs is not None:
        _whole(sc.epochs, "epochs", 0, 1000)
    _check(not (sc.frozen_epochs == 0 and sc.epochs == 0),
           "--frozen-epochs 0 and --epochs 0: nothing would be trained.",
           "Give at least one epoch (e.g. --epochs 1).")
    if sc.lr is not None:
        _number(sc.lr, "lr", 0.0, 10.0, lo_open=True)
    _check(not (sc.lr_auto and not sc.lr_find), "--lr auto needs the learning-rate finder.",
           "Drop --no-lr-find, or give --lr a number.")
    if o.bs is not None:
        _whole(o.bs, "bs", 1, 65536)
    if o.wd is not None:
        _number(o.wd, "wd", 0.0, 10.0)
    _number(a.stain_jitter, "stain_jitter", 0.0, 0.5)
    _whole(r.seed, "seed", 0, 2**32 - 1)
    _choice(r.device, "device", DEVICES)
    _choice(r.precision, "precision", PRECISIONS)
    if r.workers is not None:
        _whole(r.workers, "workers", 0, 64)
    _check(not (r.device == "cpu" and r.precision == "fp16"),
           "--precision fp16 is for CUDA; CPUs train in fp32 or bf16.",
           "Use --precision bf16 (or auto) with --device cpu.")


# --------------------------------------------------------------------------- run format 1


def _from_v1(cfg: dict) -> TrainConfig:
    """The converter for run directories written before TrainConfig (run format 1): their
    config.json has the resolved schedule under "train" and the input under "input"."""
    try:
        t, data, split, model = cfg["train"], cfg["data"], cfg["split"], cfg["model"]
        inp = cfg["input"]
    except KeyError as e:
        raise ConfigError(f"config.json lacks the section {e} of run format 1.",
                          fix="Restore config.json from the run, or retrain.") from None
    synthetic = data.get("synthetic")
    spec = (f"synthetic:n={data.get('n')},seed={data.get('seed', 0)}" if synthetic
            else str(data.get("path")))
    aug = t.get("augment")
    review = data.get("review") or {}
    return TrainConfig(
        data=DataConfig(spec=spec, max_items=data.get("max_items"),
                        checks=data.get("checks") is not None or bool(synthetic),
                        labels_from_review=review.get("log")),
        split=SplitConfig(method=split.get("method", "auto") if split.get("method") in
                          SPLIT_METHODS else "auto", valid_pct=split.get("valid_pct", 0.2)),
        model=ModelConfig(arch=model["arch"],
                          pretrained=(cfg.get("pretrained") or {}).get("requested")),
        input=InputChoice(crop=inp.get("crop"), size=inp.get("size"),
                          norm=inp.get("normalisation", "weights")),
        schedule=ScheduleConfig(preset=t.get("preset", "quick"),
                                frozen_epochs=t["frozen_epochs"], epochs=t["epochs"],
                                lr=t["lr"], lr_auto=False, lr_find=bool(t.get("lr_find"))),
        optim=OptimConfig(bs=t["bs"], wd=t["wd"]),
        augment=AugmentChoice(enabled=aug is not None,
                              stain_jitter=(aug or {}).get("stain_jitter", 0.0)),
        runtime=RuntimeConfig(seed=t.get("seed", 0), device=t.get("device", "cpu"),
                              precision=t.get("precision", "fp32"), workers=t.get("workers")),
        run_dir=None)
