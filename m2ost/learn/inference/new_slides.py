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

from m2ost import defaults
from m2ost.atomic import atomic_path
from m2ost.data.geojson import prediction_geojson
from m2ost.data.grid import grid_spots
from m2ost.data.slide import prepare_slide
from m2ost.data.spatial import expression_unit, sample_spatial
from m2ost.data.spots import write_spots
from m2ost.data.tiling import View, tile_slide
from m2ost.eval.figures import plot_prediction_maps
from m2ost.eval.maps import Tissue
from m2ost.learn.inputs.dataset import load_sample, read_bundle_info
from m2ost.learn.inference.heldout import check_bundle, gene_table, interval_layers, predict_sample
from m2ost.learn.inference.predictor import load_model
from m2ost.learn.training.calibration import prediction_intervals
from m2ost.plan.formats import slide_needs_conversion
from m2ost.plan.settings import predict_settings
from m2ost.provenance import provenance


def predict_bundle(model_file: str | os.PathLike, bundle: str | os.PathLike,
                   out_h5ad: str | os.PathLike, *, sample: str | None = None,
                   device: str | None = None, batch_size: int | None = None, workers: int = 0,
                   progress: bool = False, target_sum: float | None = None,
                   spot_diameter_um: float | None = None, interval_level: float | None = None,
                   interval_calibration: str | None = None):
    """Predict the panel's expression at every spot of a bundle (no expression needed).

    Writes ``out_h5ad``: spots x genes, X = prediction (log1p of counts scaled to ``target_sum``,
    the expression stage's unit), obs spot ids (index), padded flag, tissue fraction;
    obsm["spatial"]; var unit and val_pcc (the model's per-gene Pearson r on its validation
    spots); layers["lower"] and ["upper"], the prediction intervals (named, with their level, in
    uns["m2ost"]["intervals"]; absent for a model without calibration); uns["spatial"] (the
    H&E, spots of ``spot_diameter_um``) for scanpy and squidpy. Returns the AnnData. Unset
    settings are the workflow's (``train.device``, ``predict.batch_size``,
    ``expression.target_sum``, ``predict.spot_diameter_um``, ``intervals``).
    """
    device, batch_size = _inference(device, batch_size)
    settings = defaults.section("intervals")
    level = settings["level"] if interval_level is None else float(interval_level)
    calibration = settings["calibration"] if interval_calibration is None else interval_calibration
    target_sum = defaults.section("expression")["target_sum"] if target_sum is None else target_sum
    spot_diameter_um = defaults.section("predict")["spot_diameter_um"] if spot_diameter_um is None else spot_diameter_um

    predictor = load_model(model_file, device)
    info = read_bundle_info(bundle, sample)
    check_bundle(predictor, info, bundle, sample)
    data = load_sample(bundle, None, None, predictor.views, drop_padded=False, sample=sample)
    pred = predict_sample(predictor, data, batch_size, workers, progress)
    adata = _bundle_adata(predictor, data, pred, model_file, bundle, target_sum=target_sum,
                          spot_diameter_um=spot_diameter_um, level=level, calibration=calibration)
    with atomic_path(out_h5ad) as tmp:
        adata.write_h5ad(tmp)
    return adata


def _bundle_adata(predictor, data, pred: np.ndarray, model_file, bundle, *, target_sum: float,
                  spot_diameter_um: float, level: float, calibration: str) -> anndata.AnnData:
    """The AnnData that :func:`predict_bundle` writes (described there) of the bundle's predictions."""
    with h5py.File(bundle, "r") as f:
        tissue = (np.asarray(f["tissue_fraction"][:], np.float32)[data.rows]
                  if "tissue_fraction" in f else np.full(len(data), np.nan, np.float32))
    obs = pd.DataFrame({"padded": data.padded.any(axis=1), "tissue_fraction": tissue},
                       index=pd.Index(data.spot_ids.astype(str), name="spot"))
    unit = expression_unit(target_sum)
    layers, record = interval_layers(prediction_intervals(predictor.meta, pred, level, calibration,
                                                          str(model_file)), level)
    adata = anndata.AnnData(X=pred.astype(np.float32), obs=obs, var=gene_table(predictor, unit),
                            obsm={"spatial": data.centers}, layers=layers)
    entry, mpp, diameter_px = sample_spatial(data.sample, bundle, diameter_um=spot_diameter_um)
    adata.uns["m2ost"] = {"sample": data.sample, "model_file": str(model_file), "unit": unit,
                          "spot_diameter_px": diameter_px, "mpp": mpp,
                          "provenance_json": json.dumps(provenance({
                              "model_file": str(model_file), "model_fingerprint": predictor.meta.get("fingerprint"),
                              "bundle": str(bundle), "sample": data.sample}), sort_keys=True)}
    if record:
        adata.uns["m2ost"]["intervals"] = {**record, "calibration": calibration}
    adata.uns["log1p"] = {"base": None}  # X is log1p-normalised, as after sc.pp.log1p
    if entry:
        adata.uns["spatial"] = {data.sample: entry}
    return adata


def prediction_outputs(adata, png=None, geojson=None, genes: list[str] | None = None,
                       n_genes: int | None = None) -> None:
    """The maps over the H&E and the QuPath GeoJSON of a prediction file's AnnData. Unset, the
    genes are the workflow's (``predict.map_genes``, else the ``predict.n_map_genes`` most variable)."""
    workflow = defaults.section("predict")
    genes = workflow["map_genes"] if genes is None else genes
    n_genes = workflow["n_map_genes"] if n_genes is None else n_genes
    record = adata.uns["m2ost"]
    sample = record["sample"]
    entry = adata.uns.get("spatial", {}).get(sample)
    if png:
        tissue = Tissue.from_spatial(adata.obsm["spatial"], record["mpp"], entry, record["spot_diameter_px"])
        tissue.padded = adata.obs["padded"].to_numpy(bool) if "padded" in adata.obs else None
        plot_prediction_maps(adata, tissue, png, record["unit"], genes, n_genes, f"{sample}: predicted expression")
    if geojson:
        prediction_geojson(adata, record["spot_diameter_px"], geojson)


def _inference(device: str | None, batch_size: int | None) -> tuple[str, int]:
    workflow = predict_settings({section: defaults.section(section)
                                 for section in ("train", "predict", "expression", "intervals")})
    return (workflow["device"] if device is None else device,
            workflow["batch_size"] if batch_size is None else batch_size)


def model_views(model_file) -> list:
    """The views a trained model expects, to tile a new slide the same way."""

    predictor = load_model(model_file, "cpu")
    meta = predictor.meta
    fov_um = list(meta["fov_um"])
    if len(fov_um) != len(predictor.views):
        fov_um = [fov_um[v] for v in predictor.views]
    return [View(predictor.img_size, fov_um=float(f)) for f in fov_um]


def predict_slide(slide_path, model_file, out_dir, *, sample: str | None = None, mpp: float | None = None,
                  spacing_um: float | None = None, min_tissue_fraction: float | None = None,
                  batch_size: int | None = None, workers: int = 1, device: str | None = None,
                  target_sum: float | None = None, spot_diameter_um: float | None = None,
                  genes: list[str] | None = None, n_genes: int | None = None) -> Path:
    """Everything for one slide in one call (``m2ost predict-slide``): prepare, grid, tile, predict, map.

    Writes ``{out_dir}/{sample}.h5ad``, ``{sample}.jpg`` (maps over the H&E) and
    ``{sample}.geojson`` (QuPath); intermediate files (converted pyramid, spot table, bundle)
    go to ``{out_dir}/work``. Unset settings are the workflow's (``predict``, ``train.device``
    and ``expression.target_sum`` in the config schema).
    """

    sample = sample or Path(slide_path).stem
    out_dir = Path(out_dir)
    work = out_dir / "work"
    converted = work / f"{sample}.tif" if slide_needs_conversion(str(slide_path)) else None
    info = prepare_slide(sample, slide_path, work / f"{sample}.json", converted_path=converted, sheet_mpp=mpp,
                         override_name="--mpp option")
    table = grid_spots(sample, info, spacing_um, min_tissue_fraction)
    write_spots(table, work / f"{sample}.tsv")
    views = model_views(model_file)
    bundle = work / f"{sample}.h5"
    tile_slide(sample, info["slide"], table, info["mpp"], views, bundle, workers=workers,
               mpp_source=info["mpp_source"], provenance=provenance({"views": [v.__dict__ for v in views]}))
    out = out_dir / f"{sample}.h5ad"
    adata = predict_bundle(model_file, bundle, out, sample=sample, device=device, batch_size=batch_size,
                           target_sum=target_sum, spot_diameter_um=spot_diameter_um)
    prediction_outputs(adata, out_dir / f"{sample}.jpg", out_dir / f"{sample}.geojson", genes, n_genes)
    return out

