"""Model factory: a pretrained body (torchvision or timm) plus fastai's head.

The model is always `nn.Sequential(body, head)` built with fastai's own `create_body` /
`add_head`, so fastai's freeze/unfreeze and discriminative learning rates apply, and the same
function rebuilds it from config.json for inference (weights then come from safetensors).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.core.errors import PcamLensError

# fastai, timm and torchvision are imported inside the functions that use them: together they
# add about 10 s to a 2-core start-up (python -X importtime), which tools that never build a
# network (inspect, pack, the viewer's data pages) should not pay.

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "densenet121", "densenet169")
DEFAULT_ARCH = "tf_efficientnet_lite0"  # ImageNet weights install with pip: works offline


@dataclass
class HeadConfig:
    ps: float = 0.5
    concat_pool: bool = True
    lin_ftrs: list[int] | None = None

    def to_dict(self):
        return asdict(self)


def arch_family(arch: str) -> str:
    if arch in TORCHVISION_ARCHS:
        return "torchvision"
    import timm

    if arch in timm.list_models() or timm.is_model(arch):
        return "timm"

    raise PcamLensError(f"Unknown architecture {arch!r}.",
                        fix=f"Use one of {', '.join(TORCHVISION_ARCHS)} or a timm model name "
                            "(e.g. tf_efficientnet_lite0, convnext_nano).")


def _torchvision_body(arch: str, state: dict | None):
    import torchvision
    from fastai.vision.learner import create_body, model_meta

    builder = getattr(torchvision.models, arch)
    net = builder(weights=None)
    if state is not None:
        net.load_state_dict(state)
    meta = model_meta.get(builder, {})
    body = create_body(net, 3, pretrained=state is not None, cut=meta.get("cut"))
    return body, meta.get("split")


def _timm_body(arch: str, state: dict | None):
    import timm
    from fastai.vision.learner import TimmBody, default_split

    net = timm.create_model(arch, pretrained=False)
    if state is not None:
        net.load_state_dict(state)
    net.reset_classifier(0)
    return TimmBody(net, pretrained=state is not None), default_split


def build_model(arch: str, n_out: int = 2, *, state: dict | None = None,
                head: HeadConfig | None = None):
    """Return (model, splitter). `state` is a state dict in the library model's own layout
    (pretrained ImageNet weights) or None for random init."""
    from fastai.callback.hook import num_features_model
    from fastai.vision.learner import add_head, default_split

    head = head or HeadConfig()
    family = arch_family(arch)
    if family == "torchvision":
        body, splitter = _torchvision_body(arch, state)
        nf = num_features_model(nn.Sequential(*body.children()))
        pool = True
    else:
        body, splitter = _timm_body(arch, state)
        nf = body.model.num_features
        pool = body.needs_pool
    model = add_head(body, nf, n_out, init=nn.init.kaiming_normal_, concat_pool=head.concat_pool,
                     pool=pool, lin_ftrs=head.lin_ftrs, ps=head.ps)
    return model, splitter or default_split


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters are (the CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def stock_arch(arch: str):
    """What a fastai notebook passes to `vision_learner` for `arch`: the torchvision function,
    or the timm name (the benchmarks' stock path builds the same network as ours)."""
    if arch_family(arch) == "torchvision":
        import torchvision

        return getattr(torchvision.models, arch)  # fastai's model_meta knows these
    return arch  # vision_learner builds timm models from their name


def pooled_part(model: nn.Sequential) -> nn.Sequential:
    """Body + the head's pooling and flatten (AdaptiveConcatPool2d, Flatten): prepared input
    [B,3,H,W] -> pooled features [B, F], what the rest of the head sees. Shares the weights."""
    return nn.Sequential(model[0], model[1][:2]).train(model.training)


def splitter_for(arch: str):
    """The parameter-group splitter for `arch` (body layers / head) without building weights."""
    if arch_family(arch) == "torchvision":
        import torchvision
        from fastai.vision.learner import default_split, model_meta

        return model_meta.get(getattr(torchvision.models, arch), {}).get("split", default_split)
    from fastai.vision.learner import default_split

    return default_split


def default_gradcam_layer(model: nn.Module, input_size: int) -> str:
    """Name of the default Grad-CAM layer: the last block with stride 16.

    The last block of a CNN sees a 3x3 map at 96 px, too coarse to tell the centre 32x32 from
    the rim; the stride-16 block gives 6x6 (12x12 at 192 px) and still carries semantic
    features. Found by a forward pass, so it works for any torchvision or timm body."""
    target = max(2, input_size // 16)
    done: list[tuple[str, int]] = []  # (name, spatial size) in order of completion
    hooks = [mod.register_forward_hook(
                 lambda m, i, o, n=name: done.append((n, o.shape[-1]))
                 if isinstance(o, torch.Tensor) and o.ndim == 4 else None)
             for name, mod in model[0].named_modules()
             if name and any(True for _ in mod.children())]  # blocks, not single layers
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model[0](torch.zeros(1, 3, input_size, input_size))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    names = [n for n, s in done if s == target] or [n for n, _ in done]
    # the outermost such block, last in execution order (e.g. resnet layer3, not a conv in it)
    depth = min(n.count(".") for n in names)
    return "0." + [n for n in names if n.count(".") == depth][-1]
