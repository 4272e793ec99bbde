"""Checks that an output opens in the user's tools: scanpy/squidpy over the tissue, QuPath's GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import Collection  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402


def check_draws_over_tissue(adata, sample: str, level0_size: tuple[int, int] | None = None) -> None:
    """``sc.pl.spatial(adata, color=gene)`` and ``squidpy.pl.spatial_scatter`` with no other
    argument draw the H&E and the spots; the hires image covers the slide at its scale factor."""
    import scanpy as sc

    entry = adata.uns["spatial"][sample]
    image = np.asarray(entry["images"]["hires"])
    scalef = float(entry["scalefactors"]["tissue_hires_scalef"])
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert image.std() > 5, "the H&E thumbnail is blank"
    assert float(entry["scalefactors"]["spot_diameter_fullres"]) > 0
    if level0_size is not None:  # the thumbnail is the whole slide, at its scale factor
        assert abs(image.shape[1] / scalef - level0_size[0]) <= 1 / scalef + 1
        assert abs(image.shape[0] / scalef - level0_size[1]) <= 1 / scalef + 1
    xy = np.asarray(adata.obsm["spatial"]) * scalef  # every spot lands on the thumbnail
    assert (xy >= 0).all() and (xy[:, 0] < image.shape[1]).all() and (xy[:, 1] < image.shape[0]).all()
    sc.pl.spatial(adata, color=str(adata.var_names[0]), show=False)
    ax = plt.gcf().axes[0]
    images = [a for a in ax.get_children() if isinstance(a, AxesImage)]
    spots = [c for c in ax.collections if isinstance(c, Collection) and len(c.get_paths()) == adata.n_obs]
    plt.close("all")
    assert images and images[0].get_array().shape[:2] == image.shape[:2], "no H&E drawn"
    assert spots, "no spots drawn"
    import squidpy as sq

    sq.pl.spatial_scatter(adata, color=str(adata.var_names[0]))
    ax = plt.gcf().axes[0]
    drawn = len(ax.images), [len(c.get_paths()) for c in ax.collections]
    plt.close("all")
    assert drawn[0] == 1 and adata.n_obs in drawn[1], f"squidpy drew {drawn}"


def polygon_contains(ring: np.ndarray, x: float, y: float) -> bool:
    """Even-odd rule."""
    inside = False
    for (x1, y1), (x2, y2) in zip(ring[:-1], ring[1:]):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def check_qupath_geojson(path, adata, width: int, height: int, diameter_px: float) -> dict:
    """QuPath's import format: a FeatureCollection of Features with a closed Polygon in level-0 px,
    ``properties.objectType`` and numeric ``measurements`` named by gene; one per spot, each
    polygon a circle of the spot's diameter around its centre."""
    collection = json.loads(Path(path).read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == adata.n_obs
    xy = np.asarray(adata.obsm["spatial"], float)
    genes = list(map(str, adata.var_names))
    for i in (0, len(features) // 2, len(features) - 1):
        f = features[i]
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        props = f["properties"]
        assert props["objectType"] in ("annotation", "detection")
        assert isinstance(props["name"], str) and isinstance(props["classification"]["name"], str)
        measurements = props["measurements"]
        assert isinstance(measurements, dict) and set(genes) <= set(measurements)
        assert all(isinstance(v, (int, float)) for v in measurements.values())
        j = genes.index(genes[-1])
        assert abs(measurements[genes[-1]] - float(np.asarray(adata.X)[i, j])) < 1e-3
        ring = np.asarray(f["geometry"]["coordinates"][0], float)
        assert len(f["geometry"]["coordinates"]) == 1 and (ring[0] == ring[-1]).all() and len(ring) >= 9
        assert (ring[:, 0] > -diameter_px).all() and (ring[:, 0] < width + diameter_px).all()
        assert (ring[:, 1] > -diameter_px).all() and (ring[:, 1] < height + diameter_px).all()
        assert polygon_contains(ring, *xy[i])
        assert not polygon_contains(ring, xy[i, 0] + diameter_px, xy[i, 1])
        radius = np.hypot(*(ring[:-1] - xy[i]).T)
        assert np.allclose(radius, diameter_px / 2, rtol=0.01)
    return collection
