"""Grad-CAM heatmaps (Captum's LayerGradCam) in patch coordinates, and colour overlays.

    from model.nets.gradcam import gradcam, gradcam_layers, overlay
    heat = gradcam(loaded, patches_uint8)            # float32 [N,96,96] in 0..1
    rgb = overlay(patches_uint8[0], heat[0])         # uint8 [96,96,3]

The patch goes through the evaluation transform (model.nets.transforms.prepare: centre crop, resize,
normalise), Grad-CAM is computed at a body layer in fp32, upsampled (bilinear) to the network
input, and mapped back onto the patch: the resize is undone and the area outside a centre crop
is 0. Each map is divided by its maximum (an all-zero map stays zero).

The loaded model may be shared read-only (viewer sessions), so Captum's hooks go on a private
shallow copy of the module tree whose parameters and buffers are the shared tensors themselves
(nothing is copied, nothing registered on the shared model, eval mode and requires_grad=False
untouched). Gradients flow because the input requires grad: LayerGradCam needs d(logit)/d(layer
output), not gradients of the parameters.
"""
from __future__ import annotations

import copy
import threading
import weakref

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import nn

from model.core.errors import DataError
from model.nets.archs import default_gradcam_layer
from model.nets.transforms import as_patch_array, prepare

_LAYER_CACHE: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()
_LAYER_LOCK = threading.Lock()


def _private_copy(model: nn.Module, grad_layer: str | None = None) -> nn.Module:
    """A copy of the module objects that shares every parameter and buffer tensor.

    With `grad_layer`, only that layer's parameters require grad in the copy (same storage,
    detached): autograd then records the forward pass from that layer on, not from the input.
    Grad-CAM needs nothing before the layer, and saving the high-resolution activations of
    the early blocks for a backward pass that never reaches them cost most of its memory (the
    viewer's Grad-CAM page at 144 px peaked at 1.7 GB resident before)."""
    keep = ({id(p) for p in dict(model.named_modules())[grad_layer].parameters()}
            if grad_layer else None)
    memo = {id(t): t if keep is None else nn.Parameter(t.detach(), requires_grad=id(t) in keep)
            for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _stage_layers(model: nn.Module, input_size: int
                  ) -> tuple[list[str], list[tuple[str, int]]]:
    """The last block of each resolution at the shallowest depth that spans >= 3 resolutions
    (resnet: layer1..layer4, densenet: denseblock1..4, timm effnet: blocks.N), and the
    (block name, output side) pairs of the forward pass, in completion order."""
    net = _private_copy(model)  # hooks on the copy: the shared model is never touched
    done: list[tuple[str, int]] = []
    for name, mod in net[0].named_modules():
        if name and any(True for _ in mod.children()):
            mod.register_forward_hook(lambda m, i, o, n=name: done.append((n, o.shape[-1]))
                                      if isinstance(o, torch.Tensor) and o.ndim == 4 else None)
    net.eval()
    with torch.no_grad():
        net[0](torch.zeros(1, 3, input_size, input_size, device=_device(model)))
    by_depth: dict[int, list[tuple[str, int]]] = {}
    for n, s in done:
        by_depth.setdefault(n.count("."), []).append((n, s))
    for depth in sorted(by_depth):
        rows = by_depth[depth]
        if len({s for _, s in rows}) >= 3:
            last: dict[int, str] = {}
            for n, s in rows:  # completion order: the later block of a size wins
                last[s] = n
            keep = set(last.values())
            return ["0." + n for n, _ in rows if n in keep], done
    # no depth spans 3 resolutions: every block
    return ["0." + n for n, _ in done], done


def gradcam_layers(loaded) -> list[str]:
    """Candidate Grad-CAM layer names (model.named_modules() names), the default first:
    model.nets.archs.default_gradcam_layer (last stride-16 block), then one block per resolution."""

    model = loaded.model
    with _LAYER_LOCK:
        cached = _LAYER_CACHE.get(model)
    if cached is not None:
        return list(cached)
    size = loaded.input.size
    stages, done = _stage_layers(model, size)
    if _device(model).type == "cpu":
        # on a private copy: default_gradcam_layer registers hooks and toggles train/eval
        default = default_gradcam_layer(_private_copy(model), size)
    else:  # default_gradcam_layer feeds a CPU tensor; apply its rule to the recorded pass
        target = max(2, size // 16)
        cands = [n for n, s in done if s == target] or [n for n, _ in done]
        depth = min(n.count(".") for n in cands)
        default = "0." + [n for n in cands if n.count(".") == depth][-1]
    names = [default] + [n for n in stages if n != default]
    with _LAYER_LOCK:
        _LAYER_CACHE[model] = names
    return list(names)


def _to_patch(cam: torch.Tensor, cfg, patch: int) -> torch.Tensor:
    """[N,1,h,w] layer map -> [N,patch,patch]: bilinear to the network input, undo the resize,
    put the crop back in the centre (zeros outside)."""
    cam = F.interpolate(cam, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False)
    crop = min(cfg.crop, patch)
    if cfg.size != crop:
        cam = F.interpolate(cam, size=(crop, crop), mode="bilinear", align_corners=False,
                            antialias=cfg.size > crop)
    if crop < patch:
        o = (patch - crop) // 2
        out = cam.new_zeros(cam.shape[0], 1, patch, patch)
        out[..., o:o + crop, o:o + crop] = cam
        cam = out
    return cam[:, 0]


def _targets(target, n: int, n_classes: int) -> torch.Tensor | None:
    if target is None:
        return None
    t = np.asarray(target)
    if t.ndim == 0:
        t = np.full(n, int(t))
    if t.shape != (n,) or not np.issubdtype(t.dtype, np.integer):
        raise DataError(f"target must be a class index or one per patch ({n}); got {target!r}.")
    if t.min() < 0 or t.max() >= n_classes:
        raise DataError(f"target class must be in 0..{n_classes - 1}; got {target!r}.")
    return torch.as_tensor(t, dtype=torch.long)


def gradcam(loaded, x_uint8: np.ndarray, *, layer: str | None = None, target=None,
            batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heatmaps, float32 [N,H,W] in 0..1 in patch coordinates (N=1 for one patch).

    `layer`: a name from gradcam_layers (default: its first). `target`: None = the predicted
    class of each patch, an int, or one class index per patch."""

    x = as_patch_array(x_uint8)
    n, patch = len(x), x.shape[1]
    cfg = loaded.input
    if cfg.crop > patch:
        raise DataError(f"Patches are {patch}x{patch} but the run crops {cfg.crop}x{cfg.crop}.",
                        fix=f"Resize the patches to {cfg.patch}x{cfg.patch}.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be a positive whole number; got {batch_size!r}.")
    names = dict(loaded.model.named_modules())
    layer = layer or gradcam_layers(loaded)[0]
    if layer not in names or layer == "":
        raise DataError(f"Layer {layer!r} is not a module of this model.",
                        fix=f"Use one of: {', '.join(gradcam_layers(loaded))}.")
    targets = _targets(target, n, len(loaded.classes))
    net = _private_copy(loaded.model, grad_layer=layer)
    net.eval()
    dev = _device(net)
    lgc = LayerGradCam(net, dict(net.named_modules())[layer])
    out = np.zeros((n, patch, patch), np.float32)
    with torch.inference_mode(False), torch.enable_grad():
        for s in range(0, n, batch_size):
            xb = prepare(torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size])).to(dev),
                         cfg)
            if targets is None:
                with torch.no_grad():
                    t = net(xb).argmax(1)
            else:
                t = targets[s:s + batch_size].to(dev)
            cam = lgc.attribute(xb, target=t, relu_attributions=True)
            cam = _to_patch(cam.detach().float().clamp_min(0), cfg, patch)
            peak = cam.flatten(1).amax(1).view(-1, 1, 1)
            cam = torch.where(peak > 0, cam / peak.clamp_min(1e-30), torch.zeros_like(cam))
            out[s:s + len(cam)] = cam.clamp(0, 1).cpu().numpy()
    return out


_COLORMAPS = {name[len("COLORMAP_"):].lower(): name for name in
              ("COLORMAP_JET", "COLORMAP_TURBO", "COLORMAP_INFERNO", "COLORMAP_VIRIDIS",
               "COLORMAP_MAGMA", "COLORMAP_PLASMA", "COLORMAP_HOT", "COLORMAP_BONE")}


def overlay(rgb_uint8: np.ndarray, heat: np.ndarray, alpha: float = 0.5,
            colormap: str = "jet") -> np.ndarray:
    """Blend a 0..1 heatmap, coloured with an OpenCV colormap, over an RGB uint8 image.
    Returns uint8 [H,W,3] (RGB). `heat` is resized to the image when sizes differ."""

    rgb = np.asarray(rgb_uint8)
    heat = np.asarray(heat, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise DataError(f"overlay needs an RGB uint8 [H,W,3] image; got {rgb.dtype}{rgb.shape}.")
    if heat.ndim != 2:
        raise DataError(f"overlay needs a 2-D heatmap [H,W]; got shape {heat.shape}.")
    if not 0.0 <= float(alpha) <= 1.0:
        raise DataError(f"alpha must be in [0, 1]; got {alpha}.")
    key = str(colormap).lower()
    if key not in _COLORMAPS:
        raise DataError(f"Unknown colormap {colormap!r}.", fix=f"Use one of: "
                        f"{', '.join(_COLORMAPS)}.")
    if heat.shape != rgb.shape[:2]:
        heat = cv2.resize(heat, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    h8 = np.clip(np.nan_to_num(heat) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(h8, getattr(cv2, _COLORMAPS[key])),
                          cv2.COLOR_BGR2RGB)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
