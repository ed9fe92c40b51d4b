"""Whole-slide heatmaps (model.slides, python -m model.slide): geometry against model.predict on
slides assembled from real patches, the real SVS, GeoJSON, reuse and atomic results, batches and
shards, review ids, bad input; the synthetic slide's ground truth with a trained run (slow)."""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from matplotlib.path import Path as Polygon
from PIL import Image

from model.data.slides import open_slide, parse_tile_id, read_tile_id
from model.evaluation.inference import predict_arrays
from model.slides import outputs
from model.slides.geometry import PCAM_MPP, plan_grid
from model.slides.heatmap import SlideConfig, compute_heatmap
from model.slides.job import batch_job, heatmap_job, shard_of, slide_paths, write_table
from model.slides.outputs import read_result, regions_geojson
from model.slides.score import score_heatmap
from model.slides.synthetic import read_truth, synthetic_slide
from model.slides.tiles import read_block, tile_id
from model.training.distributed import Dist

SVS = "slides/CMU-1-Small-Region.svs"
K = 4  # the mosaic is K x K real patches


@pytest.fixture(scope="module")
def mosaic(patch_files) -> np.ndarray:
    """K x K real PCam patches side by side: uint8 [96K, 96K, 3]."""
    tiles = [np.asarray(Image.open(p).convert("RGB")) for _, _, p in patch_files[:K * K]]
    rows = [np.concatenate(tiles[r * K:(r + 1) * K], axis=1) for r in range(K)]
    return np.concatenate(rows, axis=0)


def pyramid_tiff(path: Path, img: np.ndarray, mpp: float, levels: int = 2) -> Path:
    """A tiled pyramidal TIFF with resolution tags, as OpenSlide's generic TIFF reads it."""
    res = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, tile=(128, 128), photometric="rgb", compression="zlib",
                  resolution=res, resolutionunit="CENTIMETER")
        if levels < 2:
            return path
        half = np.asarray(Image.fromarray(img).resize((img.shape[1] // 2, img.shape[0] // 2)))
        tif.write(half, tile=(128, 128), photometric="rgb", compression="zlib",
                  subfiletype=1, resolution=(res[0] / 2, res[1] / 2),
                  resolutionunit="CENTIMETER")
    return path


def block_cells() -> list[tuple[int, int, int]]:
    """(row, col, patch index) of the cells whose tile is exactly one mosaic patch."""
    return [(3 * i + 1, 3 * j + 1, i * K + j) for i in range(K) for j in range(K)]


@pytest.mark.parametrize("kind", ["openslide", "plain", "upsampled"])
def test_heatmap_cells_equal_model_predict_on_the_same_patches(kind, mosaic, tiny_loaded,
                                                               tmp_path):
    """Cell (3i+1, 3j+1)'s tile is patch (i, j): its heatmap value is what model.predict
    gives that patch (fp32, same engine). `upsampled`: the mosaic at 2x (0.486 µm/px, as a
    20x scan, one level only) is read and shrunk by 2 back to the model's resolution."""
    if kind == "openslide":
        path, mpp = pyramid_tiff(tmp_path / "m.tiff", mosaic, PCAM_MPP), None
    elif kind == "plain":
        path, mpp = tmp_path / "m.png", PCAM_MPP
        Image.fromarray(mosaic).save(path)
    else:
        path, mpp = pyramid_tiff(tmp_path / "m2.tiff", mosaic.repeat(2, 0).repeat(2, 1),
                                 PCAM_MPP / 2, levels=1), None
    slide = open_slide(path, mpp=mpp)
    assert slide.backend == ("pillow" if kind == "plain" else "openslide")
    cfg = SlideConfig(precision="fp32", min_tissue=0.0, batch_size=64)
    hm = compute_heatmap(tiny_loaded, slide, cfg, progress=False)
    g = hm.grid
    assert (g.rows, g.cols) == (3 * K, 3 * K)  # 96K px / 32 px cells
    assert g.scale == (2.0 if kind == "upsampled" else 1.0)
    patches = np.stack([mosaic[96 * (k // K):96 * (k // K + 1), 96 * (k % K):96 * (k % K + 1)]
                        for _, _, k in block_cells()])
    want = predict_arrays(tiny_loaded, patches, precision="fp32")
    got = np.array([hm.probs[r, c] for r, c, _ in block_cells()])
    np.testing.assert_allclose(got, want, atol=2e-6)  # float32 heatmap of the same forward
    # and a tile between four patches is the mosaic's pixels there, context rim included
    x = read_block(slide, g, 2, 2, 1, 1)
    np.testing.assert_array_equal(x, mosaic[32:128, 32:128])


@pytest.mark.slow  # 6 s: the real slide through the whole job
def test_real_svs_heatmap_shape_tissue_and_outputs(shared_data, tiny_loaded, tmp_path):
    """OpenSlide's Aperio test slide: 2220 x 2967 px at 0.499 µm/px is read at 0.972 µm/px
    (factor 1.948): 36 x 48 cells of 62.3 level-0 px. Tissue covers the tissue, not the glass."""
    path = shared_data / SVS
    cfg = SlideConfig(precision="fp32")
    res, reused = heatmap_job(tiny_loaded, path, cfg, tmp_path / "cmu", progress=False)
    assert not reused
    g = res.meta["grid"]
    assert (g["rows"], g["cols"]) == (48, 36)
    assert g["factor"] == pytest.approx(0.972 / 0.499) and g["level"] == 0
    assert res.probs.shape == (48, 36)
    tissue = res.image("tissue") > 0
    share = tissue.mean()
    assert 0.2 < share < 0.6, share  # the strip of tissue, not the glass around it
    h, w = tissue.shape
    assert not tissue[: h // 10, : w // 10].any()  # top-left corner: glass
    thumb = res.image("thumbnail").astype(int)
    assert thumb[tissue].mean() < thumb[~tissue].mean() - 40  # stained is darker than glass
    ran = np.isfinite(res.probs)
    assert 500 < ran.sum() < 48 * 36 and res.summary["tiles"] == ran.sum()
    engine = res.summary["engine"]  # what ran is recorded beside the numbers
    assert engine["backend"] in ("eager", "onnxruntime") and engine["why"], engine
    for name in ("heatmap.npy", "heatmap.json", "overlay.png", "tissue.png", "thumbnail.png",
                 "regions.geojson", "summary.json"):
        assert (res.dir / name).is_file(), name
    assert not list(tmp_path.glob(".*.tmp"))  # nothing staged is left behind
    # the same arguments again: the finished result is reused, not recomputed
    mtime = (res.dir / "heatmap.npy").stat().st_mtime_ns
    again, reused = heatmap_job(tiny_loaded, path, cfg, tmp_path / "cmu", progress=False)
    assert reused and (res.dir / "heatmap.npy").stat().st_mtime_ns == mtime
    # another threshold re-exports the regions without running the model
    hi, reused = heatmap_job(tiny_loaded, path, SlideConfig(precision="fp32", threshold=0.9),
                             tmp_path / "cmu", progress=False)
    assert reused and hi.summary["threshold"] == 0.9
    assert hi.summary["tumour_mm2"] <= res.summary["tumour_mm2"]


def test_geojson_polygons_cover_the_hot_cells_in_level0_coordinates():
    probs = np.full((12, 10), 0.1, np.float32)
    probs[2:5, 2:6] = 0.9  # a 3 x 4 region with a hole
    probs[3, 3] = 0.2
    probs[9, 8] = 0.95  # a single cell
    probs[0, 0] = np.nan  # not tissue
    grid = plan_grid(type("Sl", (), {"mpp": 0.5, "dimensions": (620, 740), "path": "x",
                                     "level_downsamples": [1.0]})())
    assert (grid.rows, grid.cols) == (12, 10) and grid.cell0 == pytest.approx(62.208)
    geo = regions_geojson(probs, grid, 0.5, "s")
    json.loads(json.dumps(geo))  # plain JSON
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 2
    for f in geo["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert f["properties"]["classification"]["name"] == "Tumor"
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4  # closed rings
            xy = np.array(ring)
            assert (xy >= 0).all() and (xy[:, 0] <= grid.cols * grid.cell0).all()
            assert (xy[:, 1] <= grid.rows * grid.cell0).all()
    big = max(geo["features"], key=lambda f: f["properties"]["measurements"]["cells"])
    assert big["properties"]["measurements"]["cells"] == 11
    assert len(big["geometry"]["coordinates"]) == 2  # the hole is an inner ring
    outer, hole = (Polygon(np.array(r)) for r in big["geometry"]["coordinates"])
    centre = lambda r, c: ((c + 0.5) * grid.cell0, (r + 0.5) * grid.cell0)  # noqa: E731
    for r in range(12):
        for c in range(10):
            inside = outer.contains_point(centre(r, c)) and not hole.contains_point(centre(r, c))
            assert inside == bool((r, c) != (3, 3) and 2 <= r < 5 and 2 <= c < 6), (r, c)


def test_tile_ids_read_back_the_same_patch(shared_data):
    slide = open_slide(shared_data / SVS)
    grid = plan_grid(slide)
    tid = tile_id(slide, grid, 20, 15)
    name, level, x0, y0, w0 = parse_tile_id(tid)
    assert name == "CMU-1-Small-Region.svs" and level == 0 and w0 == 187
    a, b = read_block(slide, grid, 20, 15, 1, 1), read_tile_id(slide, tid)
    assert a.shape == b.shape == (96, 96, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2  # same place, rounding apart


@pytest.mark.slow
def test_batches_shards_and_the_summary_table(mosaic, tiny_loaded, tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    for k in range(3):
        pyramid_tiff(folder / f"s{k}.tiff", np.roll(mosaic, 96 * k, axis=1), PCAM_MPP)
    (folder / "notes.txt").write_text("not a slide")
    paths = slide_paths(folder)
    assert [p.name for p in paths] == ["s0.tiff", "s1.tiff", "s2.tiff"]
    listed = tmp_path / "list.txt"
    listed.write_text("# tonight\nslides/s2.tiff\nslides/s0.tiff\n")
    assert slide_paths(listed) == [folder / "s2.tiff", folder / "s0.tiff"]
    # torchrun: every WORLD-th slide from RANK, each exactly once
    shards = [shard_of(paths, Dist(r, 2, r, 2)) for r in range(2)]
    assert sorted(p.name for s in shards for p in s) == ["s0.tiff", "s1.tiff", "s2.tiff"]
    cfg = SlideConfig(precision="fp32", min_tissue=0.0)
    out = tmp_path / "out"
    tables = [batch_job(tiny_loaded, s, cfg, out, progress=False, log=lambda *_: None)
              for s in shards]
    assert write_table(tables[1], out, Dist(1, 2, 1, 2)) is None  # rank 1 writes its part
    merged = pd.read_csv(write_table(tables[0], out, Dist(0, 2, 0, 2)))
    assert sorted(Path(s).name for s in merged["slide"]) == ["s0.tiff", "s1.tiff", "s2.tiff"]
    assert (merged["status"] == "done").all() and not list(out.glob("slides.part*"))
    assert len({read_result(Path(d)).meta["key"] for d in merged["out"]}) == 3


def test_a_failed_write_leaves_no_result_and_a_rerun_finishes(mosaic, tiny_loaded, tmp_path,
                                                               monkeypatch):
    path = pyramid_tiff(tmp_path / "m.tiff", mosaic, PCAM_MPP)
    cfg = SlideConfig(precision="fp32", min_tissue=0.0)
    out = tmp_path / "res"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "regions_geojson", boom)
    with pytest.raises(OSError):
        heatmap_job(tiny_loaded, path, cfg, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".res.*"))
    monkeypatch.undo()
    res, reused = heatmap_job(tiny_loaded, path, cfg, out, progress=False)
    assert not reused and read_result(out) is not None


def _cli(argv, capsys) -> tuple[int, str, str]:
    mod = importlib.import_module("model.slide")
    capsys.readouterr()
    rc = mod.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_slides_get_one_line_errors_and_nothing_written(tiny_run, shared_data, mosaic,
                                                            tmp_path, capsys):
    cases = {}
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide")
    cases["not a slide"] = ([text], "not a readable .svs slide")
    trunc = tmp_path / "cut.svs"
    trunc.write_bytes((shared_data / SVS).read_bytes()[:60_000])
    cases["truncated"] = ([trunc], "slide")
    doc = tmp_path / "scan.docx"
    doc.write_bytes(b"PK\x03\x04")
    cases["unsupported"] = ([doc], "not a slide format")
    plain = tmp_path / "plain.png"
    Image.fromarray(mosaic).save(plain)
    cases["no mpp"] = ([plain], "microns")
    white = tmp_path / "white.png"
    Image.fromarray(np.full((600, 600, 3), 245, np.uint8)).save(white)
    cases["no tissue"] = ([white, "--mpp", "0.972"], "No tissue")
    cases["too coarse"] = ([plain, "--mpp", "4"], "coarser than")
    cases["missing"] = ([tmp_path / "nope.svs"], "does not exist")
    for name, (args, words) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        rc, _, err = _cli([tiny_run, "--slide", *args, "--out", out, "--no-progress"], capsys)
        assert rc == 2, (name, err)
        assert err.startswith("error: ") and "Fix:" in err and words in err, (name, err)
        assert "Traceback" not in err and not out.exists(), name
    # a result folder that cannot be written: one line, and nothing half-written
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = _cli([tiny_run, "--slide", plain, "--mpp", "0.972", "--out", ro / "r",
                           "--no-progress"], capsys)
    finally:
        ro.chmod(0o755)
    if rc != 0:  # root ignores the permission bits; everyone else gets the storage error
        assert rc == 2 and "Cannot write" in err and "Fix:" in err
        assert not list(ro.iterdir())


@pytest.mark.slow
def test_synthetic_slide_heatmap_finds_its_tumour_regions(tmp_path, capsys):
    """A run trained on the synthetic patches finds the synthetic slide's metastases: cell AUC
    and region sensitivity well above chance, against the painted ground truth."""
    from model.train import main as train_main

    run = tmp_path / "syn"
    assert train_main(["--data", "synthetic:n=1200", "--no-checks", "--no-lr-find",
                       "--frozen-epochs", "2", "--epochs", "0", "--bs", "64",
                       "--run-dir", str(run)]) == 0
    path, truth = synthetic_slide(2048, seed=1, folder=tmp_path / "slides")
    assert read_truth(path) is not None and truth.positive.sum() > 100
    slide = open_slide(path)
    assert slide.backend == "openslide" and slide.mpp == pytest.approx(PCAM_MPP)
    assert slide.level_count == 4
    rc, out, err = _cli([run, "--slide", path, "--no-progress"], capsys)
    assert rc == 0, err
    res = read_result(next((run / "slides").iterdir()))
    score = score_heatmap(res.probs, truth, 0.5)
    print(out, score)
    assert score["cell_auc"] > 0.8, score
    assert score["regions_found"] >= score["regions"] - 1, score
    assert json.loads((res.dir / "truth_score.json").read_text())["cell_auc"] == \
        score["cell_auc"]


def test_synthetic_slide_truth_matches_its_painting(tmp_path):
    path, truth = synthetic_slide(2048, seed=3, folder=tmp_path)
    slide = open_slide(path)
    assert slide.dimensions == (2048, 2048) and slide.vendor == "generic-tiff"
    assert truth.cells.shape == (64, 64)
    ids = {q["id"] for q in truth.regions}
    assert set(np.unique(truth.cells)) - {0} <= ids and len(ids) >= 2
    # tumour cells are pale, big-nucleus tissue; glass cells are bright and grey
    img = slide.read(0, 0, 0, 2048, 2048).astype(np.float32)
    cell = img.reshape(64, 32, 64, 32, 3).mean(axis=(1, 3))
    sat = cell.max(-1) - cell.min(-1)
    assert sat[truth.positive].mean() > 40 > sat[:2, :2].mean()  # stained vs glass corner
    again, truth2 = synthetic_slide(2048, seed=3, folder=tmp_path)
    np.testing.assert_array_equal(truth.cells, truth2.cells)  # cached, not repainted
    shutil.rmtree(tmp_path)


def _reviewed_slides(folder: Path, mosaic: np.ndarray, n: int = 12) -> list[str]:
    """A folder with one slide and `n` of its patches labelled in the log beside it, as the
    Slide page records them (alternating tumour / no tumour; one more flagged)."""
    from model.review.log import ReviewLog, default_log_path

    folder.mkdir()
    path = pyramid_tiff(folder / "node.tiff", mosaic, PCAM_MPP)
    slide = open_slide(path)
    grid = plan_grid(slide)
    log = ReviewLog(default_log_path(path))
    ids = [tile_id(slide, grid, 3 * (k // K) + 1, 3 * (k % K) + 1) for k in range(n + 1)]
    for k, tid in enumerate(ids[:n]):
        log.record("Dr Slide", "run", tid, "relabel", None, new_label=k % 2)
    log.record("Dr Slide", "run", ids[n], "flag", None, flag_reason="artefact")
    return ids


def test_reviewed_slide_patches_become_a_training_source(mosaic, tmp_path):
    from model.data.open import open_source, reopen_source
    from model.training.prepare import reviewed_slide_patches

    ids = _reviewed_slides(tmp_path / "slides", mosaic)
    with pytest.raises(Exception, match="folder of whole-slide images"):
        open_source(tmp_path / "slides")
    src = reviewed_slide_patches(tmp_path / "slides", None)
    assert src.ids == ids[:12] and src.labels.tolist() == [k % 2 for k in range(12)]
    x = src.read_batch([0, 5])
    np.testing.assert_array_equal(x[0], mosaic[:96, :96])  # the patch under the cell's tile
    np.testing.assert_array_equal(x[1], mosaic[96:192, 96:192])
    again = reopen_source(src.describe())  # what evaluate does with a run's config.json
    assert again.ids == src.ids and again.labels.tolist() == src.labels.tolist()


@pytest.mark.slow
def test_training_reads_reviewed_slide_patches_back_from_the_slide(mosaic, tmp_path):
    from model.runs.format import read_config
    from model.train import main as train_main

    ids = _reviewed_slides(tmp_path / "slides", mosaic, n=16)
    run = tmp_path / "run"
    assert train_main(["--data", str(tmp_path / "slides"), "--labels-from-review",
                       "--no-pretrained", "--arch", "resnet18", "--no-lr-find", "--no-checks",
                       "--frozen-epochs", "0", "--epochs", "1", "--bs", "4", "--valid-pct", "0.25",
                       "--run-dir", str(run)]) == 0
    used = set(pd.read_csv(run / "train_ids.csv")["id"]) | set(
        pd.read_csv(run / "valid_ids.csv")["id"])
    assert used == set(ids[:16])  # the flagged patch is left out
    assert read_config(run)["data"]["kind"] == "slide-tiles"
