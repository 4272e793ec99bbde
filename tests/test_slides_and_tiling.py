"""Slide preparation and multi-view tiling, on the real HER2+ section B4 and the real SVS."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from m2ost.data import bundle
from m2ost.data import slide
from m2ost.data import spots
from m2ost.data import tiling
from m2ost.data.tiling import parallel as tiling_parallel
from m2ost.errors import InputError
from realdata import HER2ST_SECTIONS, SVS, her2st_files, needs_her2st, needs_svs

HER2ST_VIEWS = [tiling.View(224, fov_px=224), tiling.View(224, fov_px=448), tiling.View(224, fov_px=896)]


@pytest.fixture(scope="module")
def b4(tmp_path_factory):
    """B4 converted to a pyramid and 12 of its spots tiled with the authors' fields of view."""
    out = tmp_path_factory.mktemp("b4")
    files = her2st_files("B4")
    table = spots.read_positions("legacy_st", files["positions"], "B4")
    spots.write_spots(table, out / "spots.tsv")
    info = slide.prepare_slide("B4", files["image"], out / "B4.json", converted_path=out / "B4.tif",
                               spots_tsv=out / "spots.tsv", fmt="legacy_st")
    subset = table.iloc[::24].reset_index(drop=True)
    tiling.tile_slide("B4", info["slide"], subset, info["mpp"], HER2ST_VIEWS, out / "B4.h5", progress=False)
    return {"info": info, "spots": subset, "bundle": out / "B4.h5", "image": files["image"]}


@needs_her2st
@pytest.mark.parametrize("section", HER2ST_SECTIONS)
def test_resolution_estimated_from_spot_grid(section):
    table = spots.read_positions("legacy_st", her2st_files(section)["positions"], section)
    mpp = spots.estimate_mpp_from_grid(table, "legacy_st", section)
    assert abs(mpp - 0.69) / 0.69 < 0.05


@needs_her2st
def test_converted_pyramid_carries_resolution(b4):
    info = b4["info"]
    assert info["level_count"] >= 4
    assert info["mpp_source"].startswith("estimated")
    with slide.open_slide(info["slide"]) as s:
        assert slide.metadata_mpp(s) == pytest.approx(info["mpp"], rel=1e-3)
        assert s.level_downsamples[2] == pytest.approx(4, rel=1e-3)


@needs_her2st
def test_view0_matches_crop_of_original_jpeg(b4):
    Image.MAX_IMAGE_PIXELS = None
    original = np.asarray(Image.open(b4["image"]).convert("RGB"))
    with h5py.File(b4["bundle"]) as f:
        view0 = f["view_0"][:]
        centers = f["centers"][:]
        corners = f["coords"][:]
        assert f["coords"].attrs["patch_size_level0"] == 224
        assert abs(f.attrs["mpp"] - 0.69) / 0.69 < 0.05
    # HEST's coords: view 0's top-left corner (the centre rounded apart from the corner: 1 px at most)
    assert np.abs(corners - (centers - 112)).max() <= 1
    for k in range(len(centers)):
        x, y = centers[k]
        crop = original[y - 112:y + 112, x - 112:x + 112].astype(float)
        diff = np.abs(view0[k].astype(float) - crop).mean()
        assert diff < 6, f"spot {k}: view 0 differs from the JPEG crop by {diff:.1f} grey levels"
        # A crop shifted by 20 px must differ much more: the test can tell a misplaced view.
        shifted = original[y - 112 + 20:y + 132, x - 112:x + 112].astype(float)
        assert np.abs(view0[k].astype(float) - shifted).mean() > diff + 3


@needs_her2st
def test_views_share_the_spot_centre(b4):
    with h5py.File(b4["bundle"]) as f:
        v0, v1, v2 = (f[f"view_{i}"][:].astype(float) for i in range(3))
    # The centre half of view 1 (448 px field) shows view 0's field at half the resolution.
    for coarse, fine, _factor in ((v1, v0, 2), (v2, v1, 2)):
        centre = coarse[:, 56:168, 56:168]
        fine_small = np.stack([np.asarray(Image.fromarray(im.astype(np.uint8)).resize((112, 112), Image.BOX))
                               for im in fine]).astype(float)
        assert np.abs(centre - fine_small).mean() < 8
        off_centre = coarse[:, 0:112, 0:112]
        assert np.abs(off_centre - fine_small).mean() > np.abs(centre - fine_small).mean() + 3


@needs_her2st
def test_bundle_layout(b4):
    meta = bundle.verify_bundle(b4["bundle"], "B4")
    assert meta["n_views"] == 3 and meta["n_spots"] == len(b4["spots"])
    assert meta["spot_ids"] == b4["spots"]["spot_id"].tolist()
    assert list(meta["size_px"]) == [224, 224, 224]
    assert list(meta["levels"]) == [0, 1, 2]
    with h5py.File(b4["bundle"]) as f:
        assert f["img"].id == f["view_0"].id  # HEST-compatible hard link
        assert f["view_0"].chunks == (1, 224, 224, 3)
        assert (f["tissue_fraction"][:] > 0.2).mean() > 0.8


@needs_svs
def test_real_svs_opens_with_metadata_resolution_and_tiles(tmp_path):
    with slide.open_slide(SVS) as s:
        assert slide.metadata_mpp(s) == pytest.approx(0.499, abs=1e-3)
        w, h = s.dimensions
    info = slide.prepare_slide("CMU1", SVS, tmp_path / "cmu1.json")
    assert info["mpp_source"] == "slide metadata"
    xs, ys = np.meshgrid(np.arange(300, w - 300, 400), np.arange(300, h - 300, 400))
    table = pd.DataFrame({"spot_id": [f"s{i}" for i in range(xs.size)], "x": xs.ravel().astype(float),
                          "y": ys.ravel().astype(float), "array_row": np.nan, "array_col": np.nan})
    views = [tiling.View(64, fov_um=56), tiling.View(64, fov_um=112), tiling.View(64, fov_um=224)]
    result = tiling.tile_slide("CMU1", SVS, table, info["mpp"], views, tmp_path / "cmu1.h5", progress=False)
    assert result["n_spots"] == xs.size
    with h5py.File(tmp_path / "cmu1.h5") as f:
        assert f["view_2"].shape == (xs.size, 64, 64, 3)
        assert f["tissue_fraction"][:].max() > 0.5
        assert not f["padded"][:].any()


def test_level_choice_never_upsamples():
    downsamples = [1.0, 2.0, 4.0, 8.0, 16.0]
    views = [tiling.View(224, fov_um=112), tiling.View(224, fov_um=224), tiling.View(224, fov_um=448),
             tiling.View(224, fov_um=300)]
    plans = tiling.plan_views(views, 0.25, downsamples)
    assert [p.level for p in plans] == [1, 2, 3, 2]
    assert [p.read_px for p in plans] == [224, 224, 224, 300]
    naive = tiling.plan_views(views, 0.25, downsamples, strategy="naive")
    assert [p.level for p in naive] == [0, 0, 0, 0]


def _synthetic_slide(tmp_path, size=1536, mpp=0.5):
    from m2ost.data.pyramid import write_pyramidal_tiff

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([128 + 60 * np.sin(xx / 37.0), 120 + 50 * np.cos(yy / 23.0),
                      150 + 40 * np.sin((xx + yy) / 51.0)], -1)
    image += rng.normal(0, 4, image.shape)
    path = tmp_path / "synthetic.tif"
    write_pyramidal_tiff(path, np.clip(image, 0, 255).astype(np.uint8), mpp, quality=95)
    return path


def test_pyramid_path_equals_naive_path(tmp_path):
    path = _synthetic_slide(tmp_path)
    xs, ys = np.meshgrid(np.arange(250, 1300, 180), np.arange(250, 1300, 180))
    table = pd.DataFrame({"spot_id": [f"s{i}" for i in range(xs.size)], "x": xs.ravel() + 0.3,
                          "y": ys.ravel() + 0.6, "array_row": np.nan, "array_col": np.nan})
    views = [tiling.View(64, fov_um=32), tiling.View(64, fov_um=128), tiling.View(64, fov_um=256)]
    for strategy in ("pyramid", "naive"):
        tiling.tile_slide("syn", path, table, 0.5, views, tmp_path / f"{strategy}.h5", strategy=strategy,
                          progress=False, workers=2 if strategy == "pyramid" else 1)
    with h5py.File(tmp_path / "pyramid.h5") as fast, h5py.File(tmp_path / "naive.h5") as slow:
        assert list(fast.attrs["levels"]) == [0, 2, 2] and list(slow.attrs["levels"]) == [0, 0, 0]
        for v in range(3):
            a, b = fast[f"view_{v}"][:].astype(float), slow[f"view_{v}"][:].astype(float)
            assert np.abs(a - b).mean() < 3, f"view {v}"
        assert (fast["barcode"][:] == slow["barcode"][:]).all()


def test_padding_flags_and_all_outside_error(tmp_path):
    path = _synthetic_slide(tmp_path, size=768)
    table = pd.DataFrame({"spot_id": ["edge", "inside"], "x": [10.0, 384.0], "y": [384.0, 384.0],
                          "array_row": np.nan, "array_col": np.nan})
    views = [tiling.View(32, fov_um=32), tiling.View(32, fov_um=256)]
    tiling.tile_slide("syn", path, table, 0.5, views, tmp_path / "pad.h5", progress=False)
    with h5py.File(tmp_path / "pad.h5") as f:
        assert f["padded"][:].tolist() == [[True, True], [False, False]]
        assert (f["view_1"][0][:, :12] >= 250).all()  # left of the slide edge is white
    outside = table.assign(x=[5000.0, 6000.0])
    with pytest.raises(InputError, match="all 2 spot centres lie outside"):
        tiling.tile_slide("syn", path, outside, 0.5, views, tmp_path / "out.h5", progress=False)
    assert not (tmp_path / "out.h5").exists()


def test_interrupted_tiling_leaves_no_bundle(tmp_path, monkeypatch):
    path = _synthetic_slide(tmp_path, size=768)
    table = pd.DataFrame({"spot_id": [f"s{i}" for i in range(40)], "x": np.linspace(100, 600, 40),
                          "y": np.full(40, 384.0), "array_row": np.nan, "array_col": np.nan})
    calls = {"n": 0}
    real = tiling_parallel.read_view

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tiling_parallel, "read_view", dying)
    with pytest.raises(KeyboardInterrupt):
        tiling.tile_slide("syn", path, table, 0.5, [tiling.View(32, fov_um=32)], tmp_path / "b.h5", progress=False)
    assert list(tmp_path.glob("*.h5")) == []
    monkeypatch.setattr(tiling_parallel, "read_view", real)
    tiling.tile_slide("syn", path, table, 0.5, [tiling.View(32, fov_um=32)], tmp_path / "b.h5", progress=False)
    assert bundle.verify_bundle(tmp_path / "b.h5")["n_spots"] == 40


def test_edited_bundle_is_detected(tmp_path):
    path = _synthetic_slide(tmp_path, size=768)
    table = pd.DataFrame({"spot_id": ["a", "b"], "x": [300.0, 400.0], "y": [300.0, 400.0],
                          "array_row": np.nan, "array_col": np.nan})
    out = tmp_path / "b.h5"
    tiling.tile_slide("syn", path, table, 0.5, [tiling.View(32, fov_um=32), tiling.View(32, fov_um=64)],
                      out, progress=False)
    with h5py.File(out, "r+") as f:
        f["view_1"][1, 0, 0] = [0, 0, 0] if f["view_1"][1, 0, 0].sum() else [9, 9, 9]
    with pytest.raises(InputError, match=r"spot 1 \(b\) does not match"):
        bundle.verify_bundle(out, "syn")
    with h5py.File(out, "r+") as f:
        data = f["view_1"][:1]
        del f["view_1"]
        f["view_1"] = data
    with pytest.raises(InputError, match="view_1 has 1 spots, expected 2"):
        bundle.read_meta(out, "syn")


def test_missing_and_corrupt_slides(tmp_path):
    with pytest.raises(InputError, match="slide not found"):
        slide.open_slide(tmp_path / "nope.svs", "S1")
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(InputError, match=r"\[sample S1, file .*bad.svs\]"):
        slide.open_slide(bad, "S1")
