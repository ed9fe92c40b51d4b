"""Stand-ins for model.inference / model.gradcam while those modules do not exist yet.

Used only when `import model.inference` / `import model.gradcam` fails (see state.api()).
Same signatures as the model/ contract; delete this file once model/ provides them."""
from __future__ import annotations

import numpy as np
import torch


def predict_arrays(loaded, x_uint8: np.ndarray, tta: int = 1) -> np.ndarray:
    from model.presets import dihedral, prepare

    with torch.inference_mode():
        xb = prepare(torch.from_numpy(np.ascontiguousarray(x_uint8)), loaded.input)
        p = sum(torch.softmax(loaded.model(dihedral(xb, k)).float(), 1)[:, 1]
                for k in range(tta)) / tta
    return p.numpy().astype(np.float64)


def predict_probs(loaded, source, *, tta: int = 1, batch_size: int = 256, indices=None,
                  progress=None) -> np.ndarray:
    idx = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    out = np.empty(len(idx), np.float64)
    for s in range(0, len(idx), batch_size):
        part = idx[s:s + batch_size]
        out[s:s + len(part)] = predict_arrays(loaded, source.read_batch(part), tta)
        if callable(progress):
            progress(s + len(part), len(idx))
    return out


def gradcam_layers(loaded) -> list[str]:
    from model.archs import default_gradcam_layer

    first = default_gradcam_layer(loaded.model, loaded.input.size)
    body = loaded.model[0]
    blocks = [f"0.{n}" for n, m in body.named_children() if any(True for _ in m.children())]
    return [first] + [b for b in reversed(blocks) if b != first]


def gradcam(loaded, x_uint8: np.ndarray, layer: str | None = None, target=None) -> np.ndarray:
    from model.presets import prepare

    model = loaded.model
    layer = layer or gradcam_layers(loaded)[0]
    mod = model.get_submodule(layer)
    acts = {}
    h = mod.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    try:
        with torch.enable_grad():
            xb = prepare(torch.from_numpy(np.ascontiguousarray(x_uint8)), loaded.input)
            xb.requires_grad_(True)
            logits = model(xb)
            cls = logits.argmax(1) if target is None else torch.full(
                (len(xb),), int(target), dtype=torch.long)
            score = logits.gather(1, cls[:, None]).sum()
            a = acts["a"]
            g, = torch.autograd.grad(score, a)
    finally:
        h.remove()
    cam = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x_uint8.shape[1:3], mode="bilinear",
                                          align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
    return cam.detach().float().numpy()


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    import cv2

    if heat.shape != rgb.shape[:2]:
        heat = cv2.resize(heat, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)[..., ::-1]
    return np.uint8(np.clip((1 - alpha) * rgb + alpha * colour, 0, 255))
