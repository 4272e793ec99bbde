"""Score a trained model on the held-out samples of its split.

:func:`evaluate` writes, in ``out_dir`` (one directory per model and split):

``per_gene/{sample}.tsv``        gene, pcc, defined, rmse, mae, mean_true, mean_pred
``summary.json``                 per-sample scores and their mean over the held-out samples
``predictions.h5ad``             held-out spots x panel genes: X = prediction,
                                 layers["measured"], obs sample/spot, obsm["spatial"]
``figures/{sample}.maps.png``    measured vs predicted maps of the best and the median gene
``figures/{sample}.pcc_hist.png`` histogram of the per-gene Pearson correlations

The scoring itself (:mod:`m2ost.eval`) needs no torch; this module runs the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from m2ost.atomic import atomic_path
from m2ost.errors import InputError
from m2ost.eval.figures import plot_sample
from m2ost.eval.metrics import MIN_SPOTS, score
from m2ost.eval.summary import SUMMARY_METRICS, jsonable
from m2ost.learn.dataset import SampleData, check_same_views, load_sample, read_bundle_info
from m2ost.learn.embeddings import read_embeddings
from m2ost.learn.loader import SpotDataset
from m2ost.learn.predictor import Predictor, load_model
from m2ost.plan.kinds import FEATURE_KINDS
from m2ost.provenance import provenance

def check_bundle(predictor: Predictor, info: dict, bundle, sample) -> None:
    """The bundle must offer the model's views at the size and field of view it was trained on."""
    ref = {"n_views": max(predictor.views) + 1,
           "size_px": {v: predictor.img_size for v in predictor.views},
           "fov_um": dict(zip(predictor.views, predictor.fov_um))}
    check_same_views(ref, info, predictor.views, bundle, sample, "the model's training data")


def predict_sample(predictor: Predictor, data: SampleData, batch_size: int, workers: int,
                    progress: bool, embeddings: str | os.PathLike | None = None) -> np.ndarray:
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
    the features the encoder gives on the views (as m2ost.learn.encoded computes them).
    """
    encoded = predictor.impl
    tokens = FEATURE_KINDS[predictor.kind].input == "tokens"
    emb = read_embeddings(path, data.sample, tokens=tokens, bundle=data.bundle, rows=data.rows,
                          encoder=predictor.meta["encoder"])
    x = (emb.tokens if tokens else emb.pooled)[:, predictor.views]
    return encoded.model.predict(x, tuple(emb.grid))


def evaluate(model_file: str | os.PathLike, bundles: Mapping[str, str],
             expressions: Mapping[str, str], test_samples: Sequence[str],
             out_dir: str | os.PathLike, *, model_name: str | None = None,
             split: str | None = None, device: str = "auto", batch_size: int = 64,
             workers: int = 0, figures: bool = True, progress: bool = False,
             embeddings: Mapping[str, str] | None = None) -> dict:
    """Predict every spot (with expression) of each held-out sample and score it.

    Parameters
    ----------
    model_file
        ``model.pt`` of any kind (see :func:`m2ost.learn.fit.fit_model`).
    bundles, expressions
        sample -> bundle / expression path; must hold ``test_samples``.
    test_samples
        The held-out samples of the split. Each is scored on its own (per-gene Pearson across
        its spots); the split's figure is the mean over them.
    out_dir
        Receives the files listed in the module docstring.
    model_name, split
        Labels written into ``summary.json`` (default: the model kind, "").
    device, batch_size, workers
        Inference settings. Padded spots are kept: every spot with expression is scored.
    figures
        Also draw the maps and histograms.
    embeddings
        sample -> cached embeddings (feature kinds): read instead of encoding the views.

    Returns
    -------
    dict
        The content of ``summary.json``.
    """
    if not test_samples:
        raise InputError("no held-out samples to evaluate")
    predictor = load_model(model_file, device)
    out_dir = Path(out_dir)
    name = model_name or predictor.kind
    per_sample, blocks, loaded = {}, [], {}
    # Every held-out sample is loaded and checked before anything is written: a bad one ends the
    # run with nothing in out_dir that could pass for a (partial) result.
    for s in test_samples:
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
        loaded[s] = data
    for s in test_samples:
        data = loaded[s]
        pred = predict_sample(predictor, data, batch_size, workers, progress,
                              (embeddings or {}).get(s))
        per_gene, summary = score(data.targets, pred, predictor.genes, sample=s)
        with atomic_path(out_dir / "per_gene" / f"{s}.tsv") as tmp:
            per_gene.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
        per_sample[s] = summary
        blocks.append((data, pred, per_gene))
        if figures:
            plot_sample(data, pred, per_gene, out_dir / "figures", s, name)

    means = {k: float(np.nanmean([per_sample[s][k] for s in test_samples]))
             if any(np.isfinite(per_sample[s][k]) for s in test_samples) else float("nan")
             for k in SUMMARY_METRICS}
    result = {"model": name, "kind": predictor.kind, "split": split or "",
              "test_samples": list(test_samples),
              "n_spots": int(sum(per_sample[s]["n_spots"] for s in test_samples)),
              "n_genes": len(predictor.genes), "mean": means, "samples": per_sample,
              "model_file": str(model_file), "best_epoch": predictor.meta.get("best_epoch"),
              "primary_metric": "gene_pcc_mean",
              "provenance": provenance({"model_fingerprint": predictor.meta.get("fingerprint"),
                                        "device": device, "batch_size": batch_size})}
    _write_predictions(blocks, predictor, out_dir / "predictions.h5ad", result)
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(jsonable(result), indent=2, sort_keys=True) + "\n")
    return result


def _write_predictions(blocks, predictor: Predictor, path: Path, result: dict) -> None:

    obs = pd.DataFrame({
        "sample": np.concatenate([[d.sample] * len(d) for d, _, _ in blocks]),
        "spot": np.concatenate([d.spot_ids for d, _, _ in blocks]).astype(str),
        "bundle_row": np.concatenate([d.rows for d, _, _ in blocks]),
    })
    obs.index = (obs["sample"] + ":" + obs["spot"]).to_numpy()
    obs["sample"] = obs["sample"].astype("category")
    var = pd.DataFrame(index=pd.Index(predictor.genes, name="gene"))
    for d, _, per_gene in blocks:
        var[f"pcc_{d.sample}"] = per_gene["pcc"].to_numpy()
    adata = anndata.AnnData(
        X=np.concatenate([p for _, p, _ in blocks]).astype(np.float32), obs=obs, var=var,
        layers={"measured": np.concatenate([d.targets for d, _, _ in blocks])
                .astype(np.float32)},
        obsm={"spatial": np.concatenate([d.coords for d, _, _ in blocks])})
    adata.uns["m2ost"] = json.dumps(jsonable({k: result[k] for k in
                                               ("model", "kind", "split", "test_samples",
                                                "provenance")}), sort_keys=True)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)

