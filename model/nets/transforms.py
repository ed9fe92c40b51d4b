"""Input transforms: how uint8 patches become model inputs, and histology-safe augmentation.

Everything here works on whole batches of tensors on the model's device (CPU or GPU), so the
data loader only moves uint8 bytes and no per-image Python runs in the hot loop.

Input pipeline (same for training, evaluation, inference and Grad-CAM):
    uint8 [B,H,W,3] -> float [B,3,H,W] in 0..1 -> centre crop -> resize -> normalise
Augmentation (training only), chosen for H&E patches: dihedral flips/90° rotations (tissue has
no orientation), a small free rotation with reflection padding (no shear or scaling: no
warping of cell shapes), brightness/contrast, optional H&E stain jitter.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from model.core.errors import DataError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class InputConfig:
    """Recorded in config.json; everything needed to feed a trained model the same way."""

    patch: int = 96         # side of the stored patch
    crop: int = 96          # centre crop (96 = whole patch; 64/48 focus on the labelled centre)
    size: int = 96          # side fed to the network (e.g. 192/224 upsamples)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    normalisation: str = "imagenet"  # imagenet | weights | dataset

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class AugmentConfig:
    dihedral: bool = True
    rotate_deg: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.1
    stain_jitter: float = 0.0   # 0 = off; ~0.03-0.05 is a typical H&E jitter strength

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] (or [H,W,3]) -> float32 [B,3,H,W] in 0..1, channels_last memory."""
    if x_uint8.ndim == 3:
        x_uint8 = x_uint8[None]
    x = x_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def crop_resize(x: torch.Tensor, cfg: InputConfig) -> torch.Tensor:
    """Centre crop to cfg.crop, then resize to cfg.size (bilinear, antialiased when shrinking)."""
    h = x.shape[-1]
    if cfg.crop < h:
        o = (h - cfg.crop) // 2
        x = x[..., o:o + cfg.crop, o:o + cfg.crop]
    if x.shape[-1] != cfg.size:
        x = F.interpolate(x, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > cfg.size)
    return x


def normalise(x: torch.Tensor, cfg: InputConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def prepare(x_uint8: torch.Tensor, cfg: InputConfig) -> torch.Tensor:
    """The evaluation transform: uint8 BHWC -> normalised float BCHW (channels_last)."""
    return normalise(crop_resize(to_float(x_uint8), cfg), cfg).contiguous(
        memory_format=torch.channels_last)


def as_patch_array(x, what: str = "x_uint8") -> np.ndarray:
    """Validate an uint8 RGB patch array: [N,H,W,3] (or one [H,W,3], made [1,H,W,3])."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
        raise DataError(f"{what} must be square RGB patches [N,H,W,3] or one [H,W,3]; got shape "
                        f"{x.shape}.", fix="Decode images to RGB uint8 arrays (e.g. 96x96x3).")
    if x.dtype != np.uint8:
        raise DataError(f"{what} must be uint8 (0..255); got {x.dtype}.",
                        fix="Pass the decoded image bytes, not normalised floats.")
    return x


# --------------------------------------------------------------------------- dihedral group


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k in 0..7): rot90 by k%4, flipped if k>=4."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


def batch_views(x: torch.Tensor, views: int):
    """The first `views` dihedral views of a prepared batch [B,C,H,W] (k = 0 is the batch
    itself), each in channels_last: the TTA views inference and features run."""
    for k in range(views):
        yield x if k == 0 else dihedral(x, k).contiguous(memory_format=torch.channels_last)


def dihedral_views(rgb: np.ndarray, views: int = 8) -> list[np.ndarray]:
    """The first `views` dihedral views of one HWC patch, in the order of `dihedral` (what the
    TTA views of model.evaluation.inference see), for showing them."""
    out = []
    for k in range(views):
        v = rgb[:, ::-1] if k >= 4 else rgb
        out.append(np.ascontiguousarray(np.rot90(v, k % 4, axes=(0, 1))))
    return out


def _batch_dihedral(x: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for k in range(8):
        sel = (ks == k).nonzero(as_tuple=True)[0]
        if len(sel):
            out[sel] = dihedral(x[sel], k)
    return out


# --------------------------------------------------------------------------- stain jitter

# Ruifrok & Johnston H&E-DAB stain vectors (as in skimage.color.hed_from_rgb).
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def stain_jitter(x: torch.Tensor, sigma: float, gen: torch.Generator | None) -> torch.Tensor:
    """Perturb each stain's optical density: hed' = hed * (1 + a) + b, a,b ~ U(-sigma, sigma)."""
    b = x.shape[0]
    od = -torch.log(x.clamp_min(1e-6))  # optical density, [B,3,H,W]
    m = _HED_FROM_RGB.to(x.device, x.dtype)
    hed = torch.einsum("bchw,cd->bdhw", od, m)
    a = (torch.rand(b, 3, 1, 1, generator=gen, device="cpu") * 2 - 1) * sigma
    s = (torch.rand(b, 3, 1, 1, generator=gen, device="cpu") * 2 - 1) * sigma
    hed = hed * (1 + a.to(x.device, x.dtype)) + s.to(x.device, x.dtype)
    od = torch.einsum("bdhw,dc->bchw", hed, _RGB_FROM_HED.to(x.device, x.dtype))
    return torch.exp(-od).clamp(0, 1)


# --------------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None
            ) -> torch.Tensor:
    """Random histology-safe augmentation of float [B,3,H,W] in 0..1 (before normalisation).

    Random numbers come from `gen` (on CPU) so a seeded run is reproducible on any device."""
    b = x.shape[0]
    dev = x.device
    if cfg.dihedral:
        x = _batch_dihedral(x, torch.randint(0, 8, (b,), generator=gen).to(dev))
    if cfg.rotate_deg > 0:
        ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(cfg.rotate_deg)
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
    if cfg.stain_jitter > 0:
        x = stain_jitter(x, cfg.stain_jitter, gen)
    if cfg.contrast > 0 or cfg.brightness > 0:
        c = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * cfg.contrast
        br = (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * cfg.brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c.to(dev, x.dtype) + mean + br.to(dev, x.dtype)).clamp(0, 1)
    return x.contiguous(memory_format=torch.channels_last)


def train_transform(x_uint8: torch.Tensor, icfg: InputConfig, acfg: AugmentConfig,
                    gen: torch.Generator | None = None) -> torch.Tensor:
    """Training transform: augment the whole patch (so rotations draw from real context, not
    padding), then crop/resize/normalise exactly like evaluation."""
    x = augment(to_float(x_uint8), acfg, gen)
    return normalise(crop_resize(x, icfg), icfg).contiguous(memory_format=torch.channels_last)


def augmentation_views(x_uint8: np.ndarray, cfg: AugmentConfig, n: int = 6, seed: int = 0
                       ) -> list[np.ndarray]:
    """`n` random training augmentations of one uint8 [H,W,3] patch, as uint8 images (what
    the training loop shows the network, before cropping and normalisation)."""
    gen = torch.Generator().manual_seed(seed)
    xb = to_float(torch.from_numpy(np.repeat(np.asarray(x_uint8)[None], n, 0)))
    out = augment(xb, cfg, gen).permute(0, 2, 3, 1).numpy()
    return list((out * 255 + 0.5).clip(0, 255).astype(np.uint8))
