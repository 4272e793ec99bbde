"""Score a trained model on the held-out samples of its split.

:func:`evaluate` writes, in ``out_dir`` (one directory per model and split):

``per_gene/{sample}.tsv``        gene, pcc, defined, rmse, mae, mean_true, mean_pred
``summary.json``                 per-sample scores and their mean over the held-out samples
``predictions.h5ad``             held-out spots x panel genes: X = prediction,
                                 layers["measured"], layers["lower"]/["upper"] (the prediction
                                 intervals, named in uns["m2ost"]["intervals"]), obs
                                 sample/spot/padded, obsm["spatial"],
                                 uns["spatial"] (H&E for scanpy/squidpy), unit and per-gene PCC in var
``figures/{sample}.maps.jpg``    measured vs predicted over the H&E: best, median (and chosen) gene
``figures/{sample}.genes.png``   per-gene Pearson of the panel; scatter of the best and median gene
``qupath/{sample}.geojson``      spots with measured and predicted expression, for QuPath

The scoring itself (:mod:`m2ost.eval`) needs no torch; this module runs the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from m2ost import defaults
from m2ost.atomic import atomic_path
from m2ost.data.geojson import prediction_geojson
from m2ost.data.spatial import recorded_unit, sample_spatial
from m2ost.errors import InputError
from m2ost.eval.figures import plot_sample
from m2ost.eval.intervals import (CALIBRATIONS, DEPTHS, INTERVAL_METRICS, check_interval_settings, interval_scores,
                                  intervals, quantile_level)
from m2ost.eval.maps import Tissue
from m2ost.eval.metrics import MIN_SPOTS, score
from m2ost.eval.summary import SUMMARY_METRICS, jsonable
from m2ost.learn.inputs.dataset import SampleData, check_same_views, load_sample, read_bundle_info
from m2ost.learn.features.embeddings import read_embeddings
from m2ost.learn.inputs.loader import SpotDataset
from m2ost.learn.inference.predictor import Predictor, load_model
from m2ost.learn.training.calibration import calibration_of
from m2ost.plan.settings import eval_settings
from m2ost.plan.kinds import ENSEMBLE, FEATURE_KINDS
from m2ost.provenance import provenance


def gene_table(predictor: Predictor, unit: str) -> pd.DataFrame:
    """var of a prediction file: the unit, and the model's Pearson r per gene on the validation
    spots of its training samples (which predicted genes to trust; NaN where not recorded)."""
    val = predictor.meta.get("val_gene_pcc_per_gene") or {}
    return pd.DataFrame({"unit": unit, "val_pcc": [float(val.get(g, np.nan)) for g in predictor.genes]},
                        index=pd.Index(predictor.genes, name="gene"))


def check_bundle(predictor: Predictor, info: dict, bundle, sample) -> None:
    """The bundle must offer the model's views at the size and field of view it was trained on."""
    ref = {"n_views": max(predictor.views) + 1,
           "size_px": dict.fromkeys(predictor.views, predictor.img_size),
           "fov_um": dict(zip(predictor.views, predictor.fov_um))}
    check_same_views(ref, info, predictor.views, bundle, sample, "the model's training data")


def predict_sample(predictor: Predictor, data: SampleData, batch_size: int, workers: int,
                    progress: bool, embeddings: str | os.PathLike | None = None) -> np.ndarray:
    if predictor.kind == ENSEMBLE:  # each member as it predicts alone (feature kinds from the cache)
        return sum(w * predict_sample(m, data, batch_size, workers, progress, embeddings)
                   for w, m in predictor.impl).astype(np.float32)
    if embeddings is not None and predictor.kind in FEATURE_KINDS:
        return predict_from_embeddings(predictor, data, embeddings)
    ds = SpotDataset([data], predictor.views)
    try:
        return predictor.predict(ds, batch_size, workers, progress)
    finally:
        ds.close()


def predict_from_embeddings(predictor: Predictor, data: SampleData, path) -> np.ndarray:
    """A feature kind's predictions from the cached embeddings of the sample's spots.

    The file must come from the sample's current bundle and from the model's encoder (same
    settings and weights checksum; :func:`read_embeddings` refuses anything else), so these are
    the features the encoder gives on the views (as m2ost.learn.features.encoded computes them).
    """
    encoded = predictor.impl
    tokens = FEATURE_KINDS[predictor.kind].input == "tokens"
    emb = read_embeddings(path, data.sample, tokens=tokens, bundle=data.bundle, rows=data.rows,
                          encoder=predictor.meta["encoder"])
    pooled = emb.pooled[:, predictor.views]
    x = emb.tokens[:, predictor.views] if tokens else pooled
    return encoded.model.predict(x, tuple(emb.grid), pooled=pooled)


@dataclass(frozen=True)
class _HeldOut:
    """What scoring and drawing the held-out samples of one :func:`evaluate` call share."""

    predictor: Predictor
    state: dict | None  # the model's calibration (None: no prediction intervals)
    level: float
    calibration: str
    depth: str  # intervals.depth: measured or training
    out_dir: Path
    name: str
    split: str | None
    unit: str
    figures: bool
    map_gene: str | None


def evaluate(model_file: str | os.PathLike, bundles: Mapping[str, str],
             expressions: Mapping[str, str], test_samples: Sequence[str],
             out_dir: str | os.PathLike, *, model_name: str | None = None,
             split: str | None = None, device: str | None = None, batch_size: int | None = None,
             workers: int = 0, figures: bool = True, progress: bool = False,
             map_gene: str | None = None, embeddings: Mapping[str, str] | None = None,
             interval_level: float | None = None, interval_calibration: str | None = None,
             interval_depth: str | None = None) -> dict:
    """Predict every spot (with expression) of each held-out sample and score it; write the files
    listed in the module docstring in ``out_dir`` and return the content of ``summary.json``.

    ``model_file`` is a ``model.pt`` of any kind (see
    :func:`m2ost.learn.training.fit_on_views.fit_model`). ``bundles`` and ``expressions`` map
    sample -> bundle / expression path and must hold ``test_samples``, the held-out samples of
    the split: each is scored on its own (per-gene Pearson across its spots), the split's figure
    is the mean over them. ``model_name`` and ``split`` label ``summary.json`` (default: the model
    kind, ""). ``device``, ``batch_size``, ``workers``: the inference settings (device and batch
    size default to the workflow's: ``train.device``, and ``train.eval_batch_size`` or twice
    ``train.batch_size``); padded spots are kept: every spot with expression is scored.
    ``figures``: also draw the figures and write the QuPath GeoJSON. ``map_gene``: a gene mapped
    besides the best and the median one (when in the panel). ``embeddings``: sample -> cached
    embeddings (feature kinds), read instead of encoding the views. ``interval_level``,
    ``interval_calibration``, ``interval_depth``: the prediction intervals (``intervals.level``,
    ``.calibration`` and ``.depth`` by default); their coverage and width on the held-out spots are
    scored for every calibration and depth, the chosen one's go into the means, the h5ad layers,
    the GeoJSON and the maps.
    """
    if not test_samples:
        raise InputError("no held-out samples to evaluate")
    device, batch_size, (level, calibration, depth) = _settings(device, batch_size, interval_level,
                                                                interval_calibration, interval_depth)
    check_interval_settings(level, calibration, depth)  # before any work
    predictor = load_model(model_file, device)
    state = calibration_of(predictor.meta, str(model_file))
    # Every held-out sample is loaded and checked before anything is written: a bad one ends the
    # run with nothing in out_dir that could pass for a (partial) result.
    loaded = {s: _load_held_out(predictor, bundles, expressions, s) for s in test_samples}
    run = _HeldOut(predictor=predictor, state=state, level=level, calibration=calibration, depth=depth,
                   out_dir=Path(out_dir), name=model_name or predictor.kind, split=split,
                   unit=recorded_unit(expressions[test_samples[0]]), figures=figures, map_gene=map_gene)
    per_sample, blocks, spatial = _score_samples(run, test_samples, loaded, bundles, expressions, embeddings,
                                                 (batch_size, workers, progress))
    result = _result(run, model_file, test_samples, per_sample, device, batch_size)
    _write_predictions(blocks, predictor, run.out_dir / "predictions.h5ad", result, run.unit, spatial)
    with atomic_path(run.out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(jsonable(result), indent=2, sort_keys=True) + "\n")
    return result


def _settings(device, batch_size, *interval) -> tuple:
    """(device, batch size, (interval level, calibration, depth)): the workflow's where unset."""
    workflow = eval_settings({k: defaults.section(k) for k in ("train", "evaluate", "intervals")})
    keys = ("interval_level", "interval_calibration", "interval_depth")
    return (workflow["device"] if device is None else device,
            workflow["batch_size"] if batch_size is None else batch_size,
            tuple(workflow[k] if v is None else v for k, v in zip(keys, interval)))


def _load_held_out(predictor: Predictor, bundles: Mapping[str, str], expressions: Mapping[str, str],
                   s: str) -> SampleData:
    """A held-out sample's spots with expression, once its bundle and spot count are checked."""
    if s not in bundles or s not in expressions:
        raise InputError("held-out sample needs a bundle and an expression file", sample=s)
    check_bundle(predictor, read_bundle_info(bundles[s], s), bundles[s], s)
    data = load_sample(bundles[s], expressions[s], predictor.genes, predictor.views,
                       drop_padded=False, sample=s)
    if len(data) < MIN_SPOTS:
        raise InputError(f"held-out sample has {len(data)} spot(s) with expression; per-gene "
                         f"Pearson needs at least {MIN_SPOTS}, so it cannot be scored (move it "
                         "to the training side of the split or leave it out)",
                         file=expressions[s], sample=s)
    return data


def _score_samples(run: _HeldOut, test_samples: Sequence[str], loaded: dict[str, SampleData],
                   bundles: Mapping[str, str], expressions: Mapping[str, str],
                   embeddings: Mapping[str, str] | None,
                   inference: tuple[int, int, bool]) -> tuple[dict, list, dict]:
    """Predict and score each sample in turn, writing its per-gene table (and its figures and
    GeoJSON): (per-sample summaries, (data, pred, per_gene, bounds) blocks, uns["spatial"])."""
    per_sample, blocks, spatial = {}, [], {}
    for s in test_samples:
        data = loaded[s]
        pred = predict_sample(run.predictor, data, *inference, (embeddings or {}).get(s))
        per_gene, summary = score(data.targets, pred, run.predictor.genes, sample=s)
        bounds, by_calibration = sample_intervals(run.state, data, pred, run.level, (run.calibration, run.depth))
        summary.update(by_calibration.get(f"{run.calibration}/{run.depth}",
                                          dict.fromkeys(INTERVAL_METRICS, float("nan"))))
        summary["intervals_by_calibration"] = by_calibration
        with atomic_path(run.out_dir / "per_gene" / f"{s}.tsv") as tmp:
            per_gene.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
        per_sample[s] = summary
        blocks.append((data, pred, per_gene, bounds))
        entry, mpp, diameter_px = sample_spatial(s, bundles[s], expressions[s])
        if entry:
            spatial[s] = entry
        if run.figures:
            _draw_sample(run, s, (data, pred, per_gene, bounds), (entry, mpp, diameter_px))
    return per_sample, blocks, spatial


def _draw_sample(run: _HeldOut, s: str, block: tuple, where: tuple) -> None:
    """figures/{s}.maps.jpg, figures/{s}.genes.png and qupath/{s}.geojson of one sample's
    (data, pred, per_gene, bounds) block, placed by its (uns["spatial"] entry, mpp, spot px)."""
    data, pred, per_gene, bounds = block
    entry, mpp, diameter_px = where
    tissue = Tissue.from_spatial(data.centers, mpp, entry, diameter_px)
    tissue.padded = data.padded.any(axis=1)
    plot_sample(data.targets, pred, per_gene, tissue, run.out_dir / "figures", s, run.name, run.unit,
                run.map_gene, run.split, widths=None if bounds is None else bounds[1] - bounds[0],
                level=run.level)
    prediction_geojson(_sample_adata(data, pred, run.predictor.genes, bounds, run.level), diameter_px,
                       run.out_dir / "qupath" / f"{s}.geojson", f"{run.name} prediction",
                       measured_layer="measured")


def _result(run: _HeldOut, model_file, test_samples: Sequence[str], per_sample: dict, device: str,
            batch_size: int) -> dict:
    """summary.json: the per-sample scores, their means over the held-out samples, the intervals
    and the provenance."""
    means = {k: float(np.nanmean([per_sample[s][k] for s in test_samples]))
             if any(np.isfinite(per_sample[s][k]) for s in test_samples) else float("nan")
             for k in SUMMARY_METRICS}
    return {"model": run.name, "kind": run.predictor.kind, "split": run.split or "",
            "test_samples": list(test_samples),
            "n_spots": int(sum(per_sample[s]["n_spots"] for s in test_samples)),
            "n_genes": len(run.predictor.genes), "mean": means, "samples": per_sample,
            "model_file": str(model_file), "best_epoch": run.predictor.meta.get("best_epoch"),
            "primary_metric": "gene_pcc_mean",
            "intervals": interval_summary(run.state, per_sample, run.level, (run.calibration, run.depth)),
            "provenance": provenance({"model_fingerprint": run.predictor.meta.get("fingerprint"),
                                      "device": device, "batch_size": batch_size})}


def interval_variants() -> list[tuple[str, str]]:
    """The (calibration, depth) pairs an evaluation scores."""
    return [(c, d) for c in CALIBRATIONS for d in DEPTHS]


def sample_intervals(state: dict | None, data: SampleData, pred: np.ndarray, level: float,
                     chosen: tuple[str, str]) -> tuple[tuple[np.ndarray, np.ndarray] | None, dict]:
    """The chosen (calibration, depth)'s (lower, upper) bounds, and every variant's interval scores
    on the sample's spots, keyed "calibration/depth" ({} and None for a model without calibration).
    Depth ``measured`` is ``training`` for a sample without recorded library sizes or a model
    that did not keep its calibration spots."""
    if state is None:
        return None, {}
    bounds, scores = None, {}
    for c, d in interval_variants():
        lower, upper = intervals(state, pred, level, c, data.depth if d == "measured" else None)
        scores[f"{c}/{d}"] = interval_scores(data.targets, lower, upper)
        if (c, d) == chosen:
            bounds = (lower, upper)
    return bounds, scores


def interval_summary(state: dict | None, per_sample: dict, level: float, chosen: tuple[str, str]) -> dict:
    """summary.json's ``intervals``: the level, the calibration and depth chosen, and per variant
    the quantile level used (at the calibration spots' depths) and the mean interval scores over
    the held-out samples."""
    out = {"level": level, "calibration": chosen[0], "depth": chosen[1], "calibrated": state is not None}
    if state is None:
        return out
    out["n_calibration"] = int(state["n_calibration"])
    out["difficulty_penalty"] = float(state["head"]["penalty"])
    out["by_calibration"] = {
        f"{c}/{d}": {"quantile_level": quantile_level(state, level, c),
                     **{k: float(np.mean([v["intervals_by_calibration"][f"{c}/{d}"][k] for v in per_sample.values()]))
                        for k in INTERVAL_METRICS}} for c, d in interval_variants()}
    return out


def interval_layers(bounds, level: float) -> tuple[dict, dict]:
    """(layers, uns record) of an AnnData's prediction intervals (nothing without bounds)."""
    if bounds is None:
        return {}, {}
    return ({"lower": np.asarray(bounds[0], np.float32), "upper": np.asarray(bounds[1], np.float32)},
            {"lower": "lower", "upper": "upper", "level": float(level)})


def _sample_adata(data, pred: np.ndarray, genes, bounds=None, level: float = 0.0) -> anndata.AnnData:
    """One sample's predictions, measurements and intervals (for its GeoJSON)."""
    layers, record = interval_layers(bounds, level)
    adata = anndata.AnnData(X=pred.astype(np.float32), obs=pd.DataFrame({"spot": data.spot_ids.astype(str)}),
                            var=pd.DataFrame(index=pd.Index(genes, name="gene")),
                            layers={"measured": data.targets.astype(np.float32), **layers},
                            obsm={"spatial": data.centers})
    adata.uns["m2ost"] = {"intervals": record} if record else {}
    return adata


def _write_predictions(blocks, predictor: Predictor, path: Path, result: dict, unit: str, spatial: dict) -> None:
    obs = pd.DataFrame({
        "sample": np.concatenate([[d.sample] * len(d) for d, *_ in blocks]),
        "spot": np.concatenate([d.spot_ids for d, *_ in blocks]).astype(str),
        "bundle_row": np.concatenate([d.rows for d, *_ in blocks]),
        "padded": np.concatenate([d.padded.any(axis=1) for d, *_ in blocks]),
    })
    if all(d.depth is not None for d, *_ in blocks):  # the depth the intervals are for (intervals.depth)
        obs["total_counts"] = np.concatenate([d.depth for d, *_ in blocks])
    obs.index = (obs["sample"] + ":" + obs["spot"]).to_numpy()
    obs["sample"] = obs["sample"].astype("category")
    var = gene_table(predictor, unit)
    for d, _, per_gene, _ in blocks:
        var[f"pcc_{d.sample}"] = per_gene["pcc"].to_numpy()
    bounds = None
    if all(b is not None for *_, b in blocks):
        bounds = tuple(np.concatenate([b[i] for *_, b in blocks]) for i in (0, 1))
    layers, record = interval_layers(bounds, result["intervals"]["level"])
    adata = anndata.AnnData(
        X=np.concatenate([p for _, p, _, _ in blocks]).astype(np.float32), obs=obs, var=var,
        layers={"measured": np.concatenate([d.targets for d, *_ in blocks]).astype(np.float32), **layers},
        obsm={"spatial": np.concatenate([d.centers for d, *_ in blocks])})
    adata.uns["m2ost"] = {"model": result["model"], "kind": result["kind"], "split": result["split"],
                          "test_samples": list(result["test_samples"]), "unit": unit,
                          "provenance_json": json.dumps(jsonable(result["provenance"]), sort_keys=True)}
    if record:
        adata.uns["m2ost"]["intervals"] = {**record, **{k: result["intervals"][k] for k in ("calibration", "depth")}}
    adata.uns["log1p"] = {"base": None}  # X and layers["measured"] are log1p-normalised, as in scanpy
    if spatial:
        adata.uns["spatial"] = spatial
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
