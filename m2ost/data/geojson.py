"""Spots as QuPath objects: a GeoJSON FeatureCollection that QuPath imports onto the slide
(File > Import objects from file, or drag and drop).

QuPath's GeoJSON: coordinates in pixels of the full-resolution image, origin at its top-left
corner; each Feature's ``properties`` hold ``objectType`` ("detection" here: light objects that
QuPath lists in its detection table and colours by a measurement under Measure > Show
measurement maps), ``name``, ``classification`` and ``measurements`` ({name: number}).

Spot centres are level-0 px of the slide the pipeline read. For a plain image (JPEG/PNG/TIFF)
that is the converted pyramid, whose level 0 holds the original's pixels unscaled
(:mod:`m2ost.data.pyramid`), so the same coordinates fit the original image in QuPath.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from m2ost.atomic import atomic_path

# Vertices of a spot's circle: enough to look round at any zoom QuPath offers for a 55 µm spot.
CIRCLE_VERTICES = 32


def circle(x: float, y: float, radius: float, n: int = CIRCLE_VERTICES) -> list[list[float]]:
    """A closed ring (GeoJSON: first vertex repeated last), counter-clockwise in image axes."""
    angles = np.linspace(0, 2 * math.pi, n, endpoint=False)
    ring = [[round(x + radius * math.cos(a), 2), round(y + radius * math.sin(a), 2)] for a in angles]
    return ring + [ring[0]]


def spot_features(spot_ids: Sequence[str], xy: np.ndarray, diameter_px: float,
                  measurements: Mapping[str, np.ndarray], classification: str) -> dict:
    """The FeatureCollection: one detection per spot, its circle, and one measurement per column
    of ``measurements`` (name -> values per spot; NaN values are left out, as JSON has none)."""
    columns = {name: np.asarray(v, dtype=float) for name, v in measurements.items()}
    features = []
    for i, spot in enumerate(spot_ids):
        x, y = float(xy[i, 0]), float(xy[i, 1])
        values = {name: round(float(v[i]), 5) for name, v in columns.items() if math.isfinite(v[i])}
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [circle(x, y, diameter_px / 2)]},
            "properties": {"objectType": "detection", "name": str(spot),
                           "classification": {"name": classification},
                           "measurements": values},
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(collection: dict, path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(collection, separators=(",", ":")) + "\n")


def prediction_geojson(adata, diameter_px: float, path, classification: str = "m2ost prediction",
                       measured_layer: str | None = None) -> None:
    """GeoJSON of an h5ad of predictions (spots x genes, ``obsm["spatial"]`` level-0 centres):
    one measurement per gene (the prediction), ``measured: GENE`` from ``measured_layer``, and
    ``lower: GENE`` / ``upper: GENE``, the prediction interval, from the layers that
    ``uns["m2ost"]["intervals"]`` names (when present)."""
    x = np.asarray(adata.X)
    genes = list(map(str, adata.var_names))
    values = {g: x[:, j] for j, g in enumerate(genes)}
    layers = [(measured_layer, "measured")] if measured_layer else []
    record = adata.uns.get("m2ost", {}).get("intervals") or {}
    layers += [(record[b], b) for b in ("lower", "upper") if b in record]
    for layer, label in layers:
        values.update({f"{label}: {g}": v for g, v in zip(genes, np.asarray(adata.layers[layer]).T)})
    ids = adata.obs["spot"].astype(str).to_numpy() if "spot" in adata.obs else np.asarray(adata.obs_names, str)
    write_geojson(spot_features(ids, np.asarray(adata.obsm["spatial"], float), diameter_px, values,
                                classification), path)
