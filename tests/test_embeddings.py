"""Embeddings (model.evaluation.embeddings), similar patches, duplicates and leakage
(model.evaluation.duplicates, python -m model.inspect --duplicates), and the Map page."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_runs import TINY_CONFIG, write_untrained_run
from PIL import Image

from model.data.open import open_source
from model.evaluation.duplicates import duplicate_report
from model.evaluation.embeddings import (
    MIN_UMAP,
    embed_run,
    embedding_map,
    load_embeddings,
    near_duplicate_pairs,
    rows_in_region,
)
from model.evaluation.features import pooled
from model.inspect import main as inspect_main
from model.nets.transforms import prepare
from model.runs.format import save_weights
from model.runs.load import load_run
from model.training.config import DataConfig, SplitConfig
from viewer import scatter


@pytest.fixture
def dup_folder(make_kaggle):
    """24 real patches plus an exact copy of the first and a flipped copy of the second."""
    root = make_kaggle(n=24)
    labels = pd.read_csv(root / "train_labels.csv", dtype={"id": str})
    a, b = labels["id"][0], labels["id"][1]
    shutil.copyfile(root / "train" / f"{a}.tif", root / "train" / "copy_a.tif")
    x = np.asarray(Image.open(root / "train" / f"{b}.tif"))
    Image.fromarray(np.ascontiguousarray(x[:, ::-1])).save(root / "train" / "flip_b.tif")
    extra = pd.DataFrame({"id": ["copy_a", "flip_b"],
                          "label": [labels["label"][0], labels["label"][1]]})
    pd.concat([labels, extra]).to_csv(root / "train_labels.csv", index=False)
    return root, a, b


def test_embeddings_equal_a_direct_forward_pass(tiny_loaded, tmp_path, dup_folder):
    root, _, _ = dup_folder
    loaded = load_run(shutil.copytree(tiny_loaded.run_dir, tmp_path / "run"))
    src = open_source(root, "train")
    emb = embed_run(loaded, src, progress=False)
    feats = np.memmap(next((tmp_path / "run" / "embeddings").glob("features-*.f16")),
                      dtype=np.float16, mode="r").reshape(len(src), 1, -1)
    with torch.inference_mode():
        x = prepare(torch.from_numpy(src.read_batch(range(len(src)))), loaded.input)
        direct = pooled(loaded.model, x).numpy()
    # float16 storage: relative error below 1e-3 of each row's scale
    err = np.abs(feats[:, 0].astype(np.float32) - direct).max(1) / np.abs(direct).max(1)
    assert err.max() < 1e-3
    assert emb.vectors.shape == (len(src), emb.meta["dim"])
    assert np.allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-5)
    # cached: found without computing; a changed checkpoint makes it stale
    assert load_embeddings(loaded, src) is not None
    model = loaded.model
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    save_weights(model, loaded.run_dir / "best.safetensors")
    changed = load_run(loaded.run_dir)
    assert load_embeddings(changed, src) is None
    again = embed_run(changed, src, progress=False)
    assert again.dir != emb.dir and not np.allclose(again.vectors, emb.vectors)


def test_nearest_neighbour_is_itself_then_its_flipped_copy(tiny_loaded, tmp_path, dup_folder):
    root, _, b = dup_folder
    loaded = load_run(shutil.copytree(tiny_loaded.run_dir, tmp_path / "run"))
    src = open_source(root, "train")
    emb = embed_run(loaded, src, views=8, progress=False)  # TTA-averaged: flip-invariant
    i = src.index_of(b)
    rows, cos = emb.similar(i, k=2, exclude_self=False)
    assert rows[0] == i and cos[0] == pytest.approx(1, abs=1e-5)
    assert src.ids[rows[1]] == "flip_b" and cos[1] > 0.999
    rows, _ = emb.similar(i, k=3)
    assert i not in rows and len(rows) == 3
    assert embedding_map(emb, "pca").shape == (len(src), 2)


@pytest.mark.slow
def test_umap_map_is_cached(tiny_loaded, tmp_path, dup_folder):
    """UMAP (numba compiles on first use: ~20 s) on 26 patches, cached beside."""
    root, _, _ = dup_folder
    loaded = load_run(shutil.copytree(tiny_loaded.run_dir, tmp_path / "run"))
    src = open_source(root, "train")
    emb = embed_run(loaded, src, progress=False)
    assert len(src) >= MIN_UMAP
    xy = embedding_map(emb, "umap")
    assert xy.shape == (len(src), 2) and np.isfinite(xy).all()
    assert np.array_equal(np.load(emb.dir / "map-umap.npy", allow_pickle=False), xy)
    assert "map_umap" in load_embeddings(loaded, src).meta["seconds"]


@pytest.mark.slow
def test_duplicates_and_a_pair_split_across_train_and_validation(dup_folder, tmp_path,
                                                                 capsys):
    root, a, b = dup_folder
    valid = tmp_path / "valid.csv"
    pd.DataFrame({"id": ["copy_a", *[f for f in pd.read_csv(root / "train_labels.csv",
                                                           dtype={"id": str})["id"][2:8]]]}
                 ).to_csv(valid, index=False)
    config = dataclasses.replace(TINY_CONFIG, data=DataConfig(spec=str(root), checks=False),
                                 split=SplitConfig(valid_ids=str(valid)))
    run = write_untrained_run(tmp_path / "run", config)
    rep = duplicate_report(open_source(root, "train"), run, threshold=0.999, progress=False)
    groups = sorted(sorted(g) for g in rep.exact)
    assert groups == sorted([sorted([a, "copy_a"]), sorted([b, "flip_b"])])
    straddle = rep.straddling
    assert len(straddle) >= 1
    assert {a, "copy_a"} == set(straddle.loc[straddle["kind"] == "exact",
                                             ["id_a", "id_b"]].iloc[0])
    # the command line prints the same and writes JSON
    out = tmp_path / "dups.json"
    assert inspect_main([str(root), "--duplicates", "--run", str(run), "--json", str(out),
                         "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "2 groups of exact duplicates" in text and "train/validation: " in text
    assert out.exists()


def test_near_duplicate_pairs_are_exact_products():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(300, 8)).astype(np.float32)
    v[7] = v[3] + 0.001
    v /= np.linalg.norm(v, axis=1, keepdims=True)

    class E:
        vectors = v

    pairs = near_duplicate_pairs(E, 0.999, block=64)
    assert [(int(i), int(j)) for i, j, _ in pairs] == [(3, 7)]


def test_bad_inputs_for_embeddings(tiny_loaded, tmp_path, dup_folder, capsys):
    root, _, _ = dup_folder
    loaded = load_run(shutil.copytree(tiny_loaded.run_dir, tmp_path / "run"))
    src = open_source(root, "train")
    emb = embed_run(loaded, src, progress=False)
    # a truncated reduced copy is recomputed, not trusted
    (emb.dir / "reduced.npy").write_bytes(b"\x93NUMPY")
    assert load_embeddings(loaded, src) is None
    assert embed_run(loaded, src, progress=False).vectors.shape == emb.vectors.shape
    from model.embed import main as embed_main

    assert embed_main([str(tmp_path / "run"), "--data", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err
    assert inspect_main([str(root), "--duplicates", "--threshold", "1.5"]) == 2


def test_training_option_keeps_duplicate_pairs_on_one_side(dup_folder, tmp_path):
    from model.core.atomic import write_json
    from model.core.errors import DataError
    from model.training.config import TrainConfig
    from model.training.prepare import prepare_new

    root, a, b = dup_folder
    report = tmp_path / "dups.json"
    write_json(report, duplicate_report(open_source(root, "train"), progress=False).to_dict())
    for seed in range(6):
        cfg = dataclasses.replace(TINY_CONFIG, data=DataConfig(
            spec=str(root), checks=False, group_duplicates=str(report)),
            split=SplitConfig(valid_pct=0.3),
            runtime=dataclasses.replace(TINY_CONFIG.runtime, seed=seed))
        p = prepare_new(cfg, lambda *_: None)
        valid = set(p.valid_src.ids)
        assert (a in valid) == ("copy_a" in valid) and (b in valid) == ("flip_b" in valid)
        assert p.facts["split"]["method"] == "grouped-by-slide"
        assert p.facts["data"]["duplicate_groups"]["pairs_in_data"] == 2
    (tmp_path / "bad.json").write_text("{}")
    cfg = dataclasses.replace(TINY_CONFIG, data=DataConfig(
        spec=str(root), checks=False, group_duplicates=str(tmp_path / "bad.json")))
    with pytest.raises(DataError, match="not a duplicates report"):
        prepare_new(cfg, lambda *_: None)
    assert isinstance(TrainConfig.from_dict(cfg.to_dict()), TrainConfig)


def test_a_box_or_lasso_selects_all_points_inside_not_only_the_drawn_sample():
    g = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)  # 10×10
    rows = rows_in_region(g, box=((2.5, 4.5), (7.5, 5.5)))  # corners in either order
    assert sorted(map(tuple, g[rows])) == [(x, y) for x in (3.0, 4.0) for y in (6.0, 7.0)]
    tri = rows_in_region(g, lasso=([-0.5, 4.0, -0.5], [-0.5, -0.5, 4.0]))  # x + y < 3.5
    assert {tuple(p) for p in g[tri]} == {(x, y) for x in range(4) for y in range(4)
                                          if x + y <= 3}
    assert rows_in_region(g, lasso=([0, 1], [0, 1])).size == 0  # not a polygon
    # the map's sample: small groups whole, the rest drawn at random up to POINTS_MAX
    n = scatter.POINTS_MAX * 3
    groups = pd.Series(np.where(np.arange(n) < 500, "incorrect", "correct"))
    sample = scatter.sample_rows(groups, n)
    assert len(sample) == scatter.POINTS_MAX and set(range(500)) <= set(sample.tolist())
    assert np.all(np.diff(sample) > 0)


def test_every_point_is_drawn_into_the_map_image_in_its_colour():
    xy = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    rgb = np.array([[255, 0, 0], [0, 0, 255], [0, 0, 255], [0, 255, 0]], np.uint8)
    img = np.asarray(scatter.raster(xy, rgb, (0.0, 1.0, 0.0, 1.0), size=(11, 11)))
    assert tuple(img[10, 0, :3]) == (255, 0, 0)  # (0, 0): bottom left
    assert tuple(img[0, 10, :3]) == (0, 0, 255) and tuple(img[5, 5, :3]) == (0, 255, 0)
    assert img[0, 10, 3] > img[10, 0, 3] > 0  # two points there: more opaque
    assert img[5, 8, 3] == 0  # glass between the dots stays transparent
    assert (img[..., 3] > 0).sum() == 2 * 4 + 9  # 3×3 dots, two clipped to 2×2 at corners
