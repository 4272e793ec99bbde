"""Prediction: every spot of a bundle, and H&E-only slides in one call.

The grid spots of an H&E-only slide are tiled into a bundle like any other slide (so the views
are exactly those the model was trained on) and predicted batch by batch from it: no slide's
views are ever held in memory at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd

from m2ost.atomic import atomic_path
from m2ost.data.grid import grid_spots
from m2ost.data.slide import prepare_slide
from m2ost.data.spots import write_spots
from m2ost.data.tiling import View, tile_slide
from m2ost.eval.figures import plot_prediction_maps
from m2ost.learn.dataset import load_sample, read_bundle_info
from m2ost.learn.evaluate import check_bundle, predict_sample
from m2ost.learn.predictor import load_model
from m2ost.plan.formats import slide_needs_conversion
from m2ost.provenance import provenance

def predict_bundle(model_file: str | os.PathLike, bundle: str | os.PathLike,
                   out_h5ad: str | os.PathLike, *, sample: str | None = None,
                   device: str = "auto", batch_size: int = 64, workers: int = 0,
                   progress: bool = False):
    """Predict the panel's expression at every spot of a bundle (no expression needed).

    Writes ``out_h5ad``: spots x genes, X = prediction, obs spot ids (index), padded flag,
    tissue fraction; obsm["spatial"]. Returns the AnnData.
    """

    predictor = load_model(model_file, device)
    info = read_bundle_info(bundle, sample)
    check_bundle(predictor, info, bundle, sample)
    data = load_sample(bundle, None, None, predictor.views, drop_padded=False, sample=sample)
    pred = predict_sample(predictor, data, batch_size, workers, progress)
    with h5py.File(bundle, "r") as f:
        tissue = (np.asarray(f["tissue_fraction"][:], np.float32)[data.rows]
                  if "tissue_fraction" in f else np.full(len(data), np.nan, np.float32))
    obs = pd.DataFrame({"padded": data.padded.any(axis=1), "tissue_fraction": tissue},
                       index=pd.Index(data.spot_ids.astype(str), name="spot"))
    adata = anndata.AnnData(X=pred.astype(np.float32), obs=obs,
                            var=pd.DataFrame(index=pd.Index(predictor.genes, name="gene")),
                            obsm={"spatial": data.coords})
    adata.uns["m2ost"] = json.dumps(provenance({"model_file": str(model_file),
                                                "model_fingerprint":
                                                    predictor.meta.get("fingerprint"),
                                                "bundle": str(bundle), "sample": data.sample}),
                                    sort_keys=True)
    with atomic_path(out_h5ad) as tmp:
        adata.write_h5ad(tmp)
    return adata


def model_views(model_file) -> list:
    """The views a trained model expects, to tile a new slide the same way."""

    predictor = load_model(model_file, "cpu")
    meta = predictor.meta
    fov_um = list(meta["fov_um"])
    if len(fov_um) != len(predictor.views):
        fov_um = [fov_um[v] for v in predictor.views]
    return [View(predictor.img_size, fov_um=float(f)) for f in fov_um]


def predict_slide(slide_path, model_file, out_dir, *, sample: str | None = None, mpp: float | None = None,
                  spacing_um: float = 100.0, min_tissue_fraction: float = 0.25, batch_size: int = 64,
                  workers: int = 1, device: str = "auto") -> Path:
    """Everything for one slide in one call (``m2ost predict``): prepare, grid, tile, predict, map.

    Writes ``{out_dir}/{sample}.h5ad`` and ``{out_dir}/{sample}.png``; intermediate files
    (converted pyramid, spot table, bundle) go to ``{out_dir}/work``.
    """

    sample = sample or Path(slide_path).stem
    out_dir = Path(out_dir)
    work = out_dir / "work"
    converted = work / f"{sample}.tif" if slide_needs_conversion(str(slide_path)) else None
    info = prepare_slide(sample, slide_path, work / f"{sample}.json", converted_path=converted, sheet_mpp=mpp)
    table = grid_spots(sample, info, spacing_um, min_tissue_fraction)
    write_spots(table, work / f"{sample}.tsv")
    views = model_views(model_file)
    bundle = work / f"{sample}.h5"
    tile_slide(sample, info["slide"], table, info["mpp"], views, bundle, workers=workers,
               mpp_source=info["mpp_source"], provenance=provenance({"views": [v.__dict__ for v in views]}))
    out = out_dir / f"{sample}.h5ad"
    adata = predict_bundle(model_file, bundle, out, sample=sample, device=device, batch_size=batch_size)
    plot_prediction_maps(adata, out_dir / f"{sample}.png", title=f"{sample}: predicted expression")
    return out

