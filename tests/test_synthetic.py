"""The built-in synthetic set: deterministic, PCam label rule exact, balanced, right types."""
import numpy as np
import pytest

from model.data import synthetic
from model.data.synthetic import SyntheticSource, make_patch

N = 500


@pytest.fixture(scope="module")
def patches():
    return [make_patch(0, i) for i in range(N)]


def test_deterministic_and_order_independent():
    a = make_patch(3, 17)
    make_patch(3, 5)  # touching another patch must not change patch 17
    b = make_patch(3, 17)
    assert a[0].tobytes() == b[0].tobytes() and (a[1] == b[1]).all() and a[2] == b[2]
    assert make_patch(4, 17)[0].tobytes() != a[0].tobytes()
    src = SyntheticSource(n=20, seed=3)
    assert src.read(17).tobytes() == a[0].tobytes()
    assert SyntheticSource(n=20, seed=3).read_batch([17, 2])[0].tobytes() == a[0].tobytes()


def test_dtype_and_shape(patches):
    img, mask, label = patches[0]
    assert img.dtype == np.uint8 and img.shape == (96, 96, 3)
    assert mask.dtype == bool and mask.shape == (96, 96)
    assert isinstance(label, int)


def test_label_is_centre_rule(patches):
    src = SyntheticSource(n=N, seed=0)
    for i, (_, mask, label) in enumerate(patches):
        assert label == int(mask[32:64, 32:64].any()), i
        assert src.labels[i] == label, i  # labels known up front match the painted mask
    assert (src.mask(7) == patches[7][1]).all()


def test_rim_only_negatives_exist(patches):
    rim = [i for i, (_, m, lab) in enumerate(patches) if lab == 0 and m.any()]
    negatives = sum(lab == 0 for _, _, lab in patches)
    assert 0.15 * negatives < len(rim) < 0.45 * negatives


def test_balance_and_metadata():
    src = SyntheticSource()
    assert len(src) == synthetic.DEFAULT_N and src.labels.dtype == np.int64
    assert 0.35 <= src.labels.mean() <= 0.6
    assert src.ids[5] == "synth-0-00005" and src.synthetic and src.root is None
    assert src.classes == ["no tumour", "tumour"] and src.split == "train"
    assert src.describe()["seed"] == 0 and src.describe()["n"] == synthetic.DEFAULT_N
    assert "SYNTHETIC" in src.describe_short()
