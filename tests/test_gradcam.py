"""Tests for Grad-CAM (model/nets/gradcam.py): shapes and ranges on a tiny trained run, where the
heat goes on a handmade model that only looks at one box, and that the shared model is left
exactly as it was (no hooks, eval mode, requires_grad False, same weights)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.core.errors import DataError
from model.data.base import centre_box
from model.data.open import open_source
from model.nets.gradcam import gradcam, gradcam_layers, overlay
from model.nets.transforms import InputConfig
from model.runs.load import LoadedRun


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    src = open_source("synthetic:n=6,seed=11", "train")
    return src.read_batch(np.arange(len(src)))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not getattr(m, "_backward_pre_hooks", None) for m in model.modules())


# --------------------------------------------------------------------------- tiny run


def test_gradcam_shape_dtype_range(tiny_loaded, patches):
    heat = gradcam(tiny_loaded, patches, batch_size=4)
    assert heat.shape == (6, 96, 96) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1
    for h in heat:  # each map is either all zero or peaks at exactly 1
        assert h.max() == 0 or h.max() == pytest.approx(1.0)
    one = gradcam(tiny_loaded, patches[0])
    assert one.shape == (1, 96, 96)
    # a batch of 6 and a batch of 1 take different oneDNN kernels: float32 rounding only
    np.testing.assert_allclose(one[0], heat[0], atol=1e-4)


def test_gradcam_layers_default_first(tiny_loaded, patches):
    from model.nets.archs import default_gradcam_layer

    names = gradcam_layers(tiny_loaded)
    assert names[0] == default_gradcam_layer(tiny_loaded.model, tiny_loaded.input.size) == "0.6"
    assert sorted(names) == ["0.4", "0.5", "0.6", "0.7"]
    for name in names:
        h = gradcam(tiny_loaded, patches[:2], layer=name)
        assert h.shape == (2, 96, 96) and np.isfinite(h).all()


def test_gradcam_targets(tiny_loaded, patches):
    a = gradcam(tiny_loaded, patches[:3], target=1)
    b = gradcam(tiny_loaded, patches[:3], target=[1, 1, 1])
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(DataError):
        gradcam(tiny_loaded, patches[:3], target=2)
    with pytest.raises(DataError):
        gradcam(tiny_loaded, patches[:3], target=[0, 1])
    with pytest.raises(DataError, match="not a module"):
        gradcam(tiny_loaded, patches[:1], layer="0.99")
    with pytest.raises(DataError, match="uint8"):
        gradcam(tiny_loaded, patches.astype(np.float32))


def test_gradcam_leaves_shared_model_untouched(tiny_loaded, patches):
    model = tiny_loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradcam(tiny_loaded, patches[:2])
    gradcam_layers(tiny_loaded)
    assert _no_hooks(model)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- handmade model


class BoxOnly(nn.Module):
    """Zero everything outside the part of its input that shows patch box (x0, y0, x1, y1)
    under `cfg` (centre crop, then resize), at whatever resolution the input has."""

    def __init__(self, box: tuple[int, int, int, int], cfg: InputConfig):
        super().__init__()
        self.box, self.cfg = box, cfg

    def forward(self, x):
        side = x.shape[-1]
        o = (self.cfg.patch - self.cfg.crop) // 2
        x0, y0, x1, y1 = [round((v - o) * side / self.cfg.crop) for v in self.box]
        mask = torch.zeros(1, 1, side, side, dtype=x.dtype, device=x.device)
        mask[..., max(y0, 0):y1, max(x0, 0):x1] = 1
        return x * mask


def box_model(box, cfg: InputConfig) -> LoadedRun:
    """nn.Sequential(body, head) whose logits depend only on the pixels of `box`, and whose
    activations are zero outside it: every body stage ends by masking. Stage "0.1" is at the
    input resolution, stage "0.2" at half of it (so its map is upsampled). The head averages
    and gives class 1 positive weights."""
    torch.manual_seed(0)
    body = nn.Sequential(
        BoxOnly(box, cfg),
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), BoxOnly(box, cfg)),
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), BoxOnly(box, cfg)),
    )
    lin = nn.Linear(8, 2)
    with torch.no_grad():
        lin.weight[0].fill_(-1.0)
        lin.weight[1].fill_(1.0)
        lin.bias.zero_()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)
    model = nn.Sequential(body, head).eval().to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedRun(run_dir=Path("handmade"), config={}, model=model, input=cfg,
                     classes=["no tumour", "tumour"], checkpoint="handmade",
                     checkpoint_mtime=0.0)


@pytest.mark.parametrize("layer", ["0.1", "0.2"])
@pytest.mark.parametrize("cfg", [InputConfig(), InputConfig(crop=64, size=128),
                                 InputConfig(crop=48, size=48)],
                         ids=["96-96", "crop64-size128", "crop48"])
@pytest.mark.parametrize("box", [centre_box(96), (36, 40, 52, 60)], ids=["centre", "offset"])
def test_gradcam_mass_inside_the_box_the_model_looks_at(patches, cfg, box, layer):
    loaded = box_model(box, cfg)
    heat = gradcam(loaded, patches, layer=layer, target=1)
    x0, y0, x1, y1 = box
    inside = heat[:, y0:y1, x0:x1].sum(axis=(1, 2))
    total = heat.sum(axis=(1, 2))
    assert (total > 0).all()
    assert (inside / total > 0.8).all(), inside / total
    assert _no_hooks(loaded.model)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_gradcam_default_target_is_predicted_class(patches):
    loaded = box_model(centre_box(96), InputConfig())
    x = torch.from_numpy(patches)
    from model.nets.transforms import prepare

    with torch.no_grad():
        pred = loaded.model(prepare(x, loaded.input)).argmax(1).numpy()
    np.testing.assert_allclose(gradcam(loaded, patches, layer="0.1"),
                               gradcam(loaded, patches, layer="0.1", target=pred), atol=1e-6)


def test_gradcam_outside_centre_crop_is_zero(patches):
    cfg = InputConfig(crop=48, size=96)
    loaded = box_model((0, 0, 96, 96), cfg)  # looks at the whole crop
    heat = gradcam(loaded, patches[:2], layer="0.1", target=1)
    assert heat[:, :24].max() == 0 and heat[:, 72:].max() == 0
    assert heat[:, :, :24].max() == 0 and heat[:, :, 72:].max() == 0
    assert heat[:, 24:72, 24:72].max() == pytest.approx(1.0)


# --------------------------------------------------------------------------- overlay


def test_overlay(patches):
    rgb = patches[0]
    heat = np.linspace(0, 1, 96 * 96, dtype=np.float32).reshape(96, 96)
    out = overlay(rgb, heat)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(rgb, heat, alpha=0.0), rgb)
    full = overlay(rgb, heat, alpha=1.0)
    assert full[0, 0, 2] > full[0, 0, 0]   # low heat is blue in jet
    assert full[-1, -1, 0] > full[-1, -1, 2]  # high heat is red
    assert overlay(rgb, heat[::2, ::2]).shape == (96, 96, 3)  # heat resized to the image
    with pytest.raises(DataError):
        overlay(rgb, heat, colormap="nope")
    with pytest.raises(DataError):
        overlay(rgb.astype(np.float32), heat)
