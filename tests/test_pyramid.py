"""Tests of m2ost.data.pyramid: pyramidal TIFFs that OpenSlide reads as multi-level slides."""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

openslide = pytest.importorskip("openslide")

from m2ost.data.convert import convert_to_pyramid, read_plain_image  # noqa: E402
from m2ost.data.pyramid import pyramid_shapes, write_pyramidal_tiff  # noqa: E402
from m2ost.errors import InputError  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (JPEG-friendly, so pixel checks can be tight)."""
    rng = np.random.default_rng(seed)
    a = ndi.gaussian_filter(rng.random((h, w, 3), dtype=np.float32), (12, 12, 0))
    a = (a - a.min()) / (a.max() - a.min())
    return (a * 255).astype(np.uint8)


def read_level(slide, level: int) -> np.ndarray:
    w, h = slide.level_dimensions[level]
    return np.asarray(slide.read_region((0, 0), level, (w, h)).convert("RGB"))


def test_pyramid_shapes():
    assert pyramid_shapes(400, 300, min_size=512) == [(400, 300)]
    assert pyramid_shapes(1025, 700, min_size=512) == [(1025, 700), (513, 350), (257, 175)]
    assert pyramid_shapes(2048, 2048, min_size=512)[-1] == (512, 512)


def test_write_array_opens_as_pyramid(tmp_path):
    img = smooth_rgb(1300, 1100)
    out = tmp_path / "slide.tif"
    shapes = write_pyramidal_tiff(out, img, mpp=0.5, tile=256, quality=90, min_size=300)
    assert shapes == [(1300, 1100), (650, 550), (325, 275), (163, 138)]

    slide = openslide.OpenSlide(str(out))
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_count == 4
    assert slide.level_dimensions == tuple((w, h) for h, w in shapes)
    np.testing.assert_allclose(slide.level_downsamples, [1, 2, 4, 8], rtol=0.01)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)

    # Level 0 matches within JPEG tolerance; level 1 is the 2x2 area average.
    assert np.abs(read_level(slide, 0).astype(int) - img).mean() < 2.0
    expect1 = img.reshape(650, 2, 550, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(read_level(slide, 1) - expect1).mean() < 2.0

    page = tifffile.TiffFile(out).pages[0]
    assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
    assert page.photometric == tifffile.PHOTOMETRIC.YCBCR


def test_streaming_source_matches_array_and_reads_strips(tmp_path):
    img = smooth_rgb(700, 900, seed=1)
    reads = []

    class Source:
        height, width = img.shape[:2]

        def read(self, y, x, h, w):
            reads.append((y, x, h, w))
            return img[y : y + h, x : x + w]

    def read(y, x, h, w):
        return img[y : y + h, x : x + w]

    read.height, read.width = img.shape[:2]

    a, b, c = tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "c.tif"
    write_pyramidal_tiff(a, img, mpp=0.25, tile=128)
    write_pyramidal_tiff(b, Source(), mpp=0.25, tile=128)
    write_pyramidal_tiff(c, read, mpp=0.25, tile=128)  # a bare callable works too
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    # Bounded memory: the source is only ever asked for one strip of tiles.
    assert max(h for _, _, h, _ in reads) <= 128
    assert sum(h for _, _, h, _ in reads) == img.shape[0]


def test_output_is_deterministic(tmp_path):
    img = smooth_rgb(600, 520, seed=2)
    digests = set()
    for i, workers in enumerate((1, 2)):
        out = tmp_path / f"{i}.tif"
        write_pyramidal_tiff(out, img, mpp=0.5, min_size=128, workers=workers)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_failed_write_leaves_nothing(tmp_path):
    class Broken:
        height, width = 1000, 800

        def read(self, y, x, h, w):
            if y >= 512:
                raise RuntimeError("source died")
            return np.zeros((h, w, 3), np.uint8)

    with pytest.raises(RuntimeError, match="source died"):
        write_pyramidal_tiff(tmp_path / "x.tif", Broken(), mpp=0.5)
    assert list(tmp_path.iterdir()) == []  # no final file, no temporaries


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_rejects_bad_mpp(tmp_path, bad):
    with pytest.raises(ValueError, match="mpp"):
        write_pyramidal_tiff(tmp_path / "x.tif", smooth_rgb(64, 64), mpp=bad)


def test_convert_png_and_grey16_tiff(tmp_path):
    img = smooth_rgb(640, 560, seed=3)
    Image.fromarray(img).save(tmp_path / "he.png")
    convert_to_pyramid(tmp_path / "he.png", tmp_path / "he.tif", mpp=0.8, min_size=256)
    slide = openslide.OpenSlide(str(tmp_path / "he.tif"))
    assert slide.level_count == 3
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.8)
    assert np.abs(read_level(slide, 0).astype(int) - img).mean() < 2.0

    grey = (img[..., 0].astype(np.uint16) * 257)
    tifffile.imwrite(tmp_path / "grey.tif", grey, tile=(128, 128))
    convert_to_pyramid(tmp_path / "grey.tif", tmp_path / "grey_pyr.tif", mpp=0.5)
    out = read_level(openslide.OpenSlide(str(tmp_path / "grey_pyr.tif")), 0).astype(int)
    assert np.abs(out - img[..., :1]).mean() < 2.0


def test_truncated_or_corrupt_images_are_input_errors(tmp_path):
    img = smooth_rgb(512, 512, seed=4)
    Image.fromarray(img).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    tifffile.imwrite(tmp_path / "ok.tif", img, tile=(128, 128))
    tif = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(tif[: len(tif) // 2])

    for name in ("trunc.jpg", "junk.png", "trunc.tif", "missing.jpg"):
        with pytest.raises(InputError) as err:
            convert_to_pyramid(tmp_path / name, tmp_path / f"{name}.out.tif", mpp=0.5)
        assert name in str(err.value)
        assert not (tmp_path / f"{name}.out.tif").exists()


def test_pil_limits_are_restored(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    Image.fromarray(smooth_rgb(64, 64)).save(tmp_path / "s.png")
    read_plain_image(tmp_path / "s.png")
    assert before == Image.MAX_IMAGE_PIXELS


@pytest.mark.skipif(
    not (SHARED_DATA / "her2st" / "images" / "HE" / "B4.jpg").is_file(),
    reason=f"shared test data not found at {SHARED_DATA} (../shared/data from the repository root)",
)
def test_real_her2st_jpeg(tmp_path):
    src = SHARED_DATA / "her2st" / "images" / "HE" / "B4.jpg"
    out = tmp_path / "B4.tif"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # 92 megapixels exceeds PIL's default bomb limit: the limit must be lifted.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        convert_to_pyramid(src, out, mpp=0.69)
    elapsed = time.perf_counter() - t0

    slide = openslide.OpenSlide(str(out))
    assert slide.dimensions == (9272, 9923)
    assert slide.level_count == 6
    np.testing.assert_allclose(slide.level_downsamples, [1, 2, 4, 8, 16, 32], rtol=0.01)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.69)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.69)
    # Compare a central window of level 0 with the decoded JPEG.
    ref = read_plain_image(src)
    got = np.asarray(slide.read_region((3000, 3000), 0, (2000, 2000)).convert("RGB"))
    assert np.abs(got.astype(int) - ref[3000:5000, 3000:5000]).mean() < 2.0
    assert elapsed < 120, f"conversion took {elapsed:.1f} s"

    # QuPath GeoJSON of the section's spots (100 µm legacy ST spots) fits the original JPEG and
    # the converted pyramid alike: each circle encloses its spot centre, and the pixels around
    # the centre are the same in both images (the pyramid's level 0 is the JPEG, unscaled).
    from viewer_checks import polygon_contains

    from m2ost.data.geojson import spot_features
    from m2ost.data.spots import read_positions

    table = read_positions("legacy_st", SHARED_DATA / "her2st" / "spot-selections" / "B4_selection.tsv", "B4")
    xy = table[["x", "y"]].to_numpy(float)
    features = spot_features(table["spot_id"], xy, 100 / 0.69, {"row": np.arange(len(table))}, "spot")["features"]
    assert len(features) == len(table) > 200
    for i in range(0, len(features), 25):
        ring = np.asarray(features[i]["geometry"]["coordinates"][0])
        x, y = xy[i]
        assert polygon_contains(ring, x, y) and features[i]["properties"]["measurements"]["row"] == i
        assert (ring.min(0) >= 0).all() and ring[:, 0].max() < 9272 and ring[:, 1].max() < 9923
        cx, cy = int(round(x)), int(round(y))
        window = np.asarray(slide.read_region((cx - 16, cy - 16), 0, (32, 32)).convert("RGB")).astype(int)
        assert np.abs(window - ref[cy - 16:cy + 16, cx - 16:cx + 16]).mean() < 4.0
