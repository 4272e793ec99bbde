"""Score a trained model on the held-out samples of its split, and predict H&E-only slides.

:func:`evaluate` writes, in ``out_dir`` (one directory per model and split):

``per_gene/{sample}.tsv``        gene, pcc, defined, rmse, mae, mean_true, mean_pred
``summary.json``                 per-sample scores and their mean over the held-out samples
``predictions.h5ad``             held-out spots x panel genes: X = prediction,
                                 layers["measured"], obs sample/spot, obsm["spatial"]
``figures/{sample}.maps.png``    measured vs predicted maps of the best and the median gene
``figures/{sample}.pcc_hist.png`` histogram of the per-gene Pearson correlations

:func:`aggregate` gathers the ``summary.json`` files into ``results/metrics/summary.tsv``.
:func:`predict_bundle` predicts every spot of a bundle (e.g. an H&E-only slide).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import atomic_path
from .dataset import SampleData, SpotDataset, check_same_views, load_sample, read_bundle_info
from .errors import InputError
from .metrics import MIN_SPOTS, TOP_K, score
from .provenance import provenance
from .train import Predictor, load_model

SUMMARY_METRICS = ("gene_pcc_mean", "gene_pcc_median", f"gene_pcc_top{TOP_K}",
                   "spot_pcc_paper", "rmse", "mae", "n_genes_undefined")


def _check_bundle(predictor: Predictor, info: dict, bundle, sample) -> None:
    """The bundle must offer the model's views at the size and field of view it was trained on."""
    ref = {"n_views": max(predictor.views) + 1,
           "size_px": {v: predictor.img_size for v in predictor.views},
           "fov_um": dict(zip(predictor.views, predictor.fov_um))}
    check_same_views(ref, info, predictor.views, bundle, sample, "the model's training data")


def _predict_sample(predictor: Predictor, data: SampleData, batch_size: int, workers: int,
                    progress: bool) -> np.ndarray:
    ds = SpotDataset([data], predictor.views)
    try:
        return predictor.predict(ds, batch_size, workers, progress)
    finally:
        ds.close()


def evaluate(model_file: str | os.PathLike, bundles: Mapping[str, str],
             expressions: Mapping[str, str], test_samples: Sequence[str],
             out_dir: str | os.PathLike, *, model_name: str | None = None,
             split: str | None = None, device: str = "auto", batch_size: int = 64,
             workers: int = 0, figures: bool = True, progress: bool = False) -> dict:
    """Predict every spot (with expression) of each held-out sample and score it.

    Parameters
    ----------
    model_file
        ``model.pt`` of any kind (see :func:`m2ost.train.fit_model`).
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
        _check_bundle(predictor, read_bundle_info(bundles[s], s), bundles[s], s)
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
        pred = _predict_sample(predictor, data, batch_size, workers, progress)
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
        tmp.write_text(json.dumps(_jsonable(result), indent=2, sort_keys=True) + "\n")
    return result


def _jsonable(obj):
    """NaN -> None, so that summary.json is strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _write_predictions(blocks, predictor: Predictor, path: Path, result: dict) -> None:
    import anndata

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
    adata.uns["m2ost"] = json.dumps(_jsonable({k: result[k] for k in
                                               ("model", "kind", "split", "test_samples",
                                                "provenance")}), sort_keys=True)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def predict_bundle(model_file: str | os.PathLike, bundle: str | os.PathLike,
                   out_h5ad: str | os.PathLike, *, sample: str | None = None,
                   device: str = "auto", batch_size: int = 64, workers: int = 0,
                   progress: bool = False):
    """Predict the panel's expression at every spot of a bundle (no expression needed).

    Writes ``out_h5ad``: spots x genes, X = prediction, obs spot ids (index), padded flag,
    tissue fraction; obsm["spatial"]. Returns the AnnData.
    """
    import anndata
    import h5py

    predictor = load_model(model_file, device)
    info = read_bundle_info(bundle, sample)
    _check_bundle(predictor, info, bundle, sample)
    data = load_sample(bundle, None, None, predictor.views, drop_padded=False, sample=sample)
    pred = _predict_sample(predictor, data, batch_size, workers, progress)
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


# --------------------------------------------------------------------------------------------
# Aggregation over models and splits
# --------------------------------------------------------------------------------------------

def aggregate(summary_files: Sequence[str | os.PathLike],
              out_tsv: str | os.PathLike) -> pd.DataFrame:
    """One row per (model, split) from ``summary.json`` files, then one ``mean`` row per model.

    A split's row holds the mean over its held-out samples; a model's ``mean`` row holds the
    mean over its splits (each split weighs the same) and the total number of spots.
    """
    rows = []
    for path in summary_files:
        try:
            s = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read evaluation summary ({err})", file=path) from None
        row = {"model": s["model"], "kind": s["kind"], "split": s["split"],
               "test_samples": ",".join(s["test_samples"]), "n_spots": s["n_spots"],
               "n_genes": s["n_genes"]}
        row.update({k: (np.nan if s["mean"].get(k) is None else s["mean"][k])
                    for k in SUMMARY_METRICS})
        rows.append(row)
    table = pd.DataFrame(rows, columns=["model", "kind", "split", "test_samples", "n_spots",
                                        "n_genes", *SUMMARY_METRICS])
    table = table.sort_values(["model", "split"], kind="stable")
    out = []
    for model, group in table.groupby("model", sort=True):
        out.append(group)
        mean = {"model": model, "kind": group["kind"].iloc[0], "split": "mean",
                "test_samples": f"{len(group)} splits", "n_spots": int(group["n_spots"].sum()),
                "n_genes": group["n_genes"].iloc[0]}
        mean.update({k: group[k].mean() for k in SUMMARY_METRICS})
        out.append(pd.DataFrame([mean]))
    result = pd.concat(out, ignore_index=True) if out else table
    with atomic_path(out_tsv) as tmp:
        result.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
    return result


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def _spacing(xy: np.ndarray) -> float:
    """Median distance to the nearest other spot (the grid pitch)."""
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 1.0
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1])) or 1.0


def _spot_map(ax, xy: np.ndarray, values: np.ndarray):
    """Spots as touching discs at their coordinates, image orientation (y down)."""
    pitch = _spacing(xy)
    lo, hi = xy.min(0) - pitch, xy.max(0) + pitch
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])  # image coordinates: y grows downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    span = float(max(hi - lo))
    width_pt = ax.get_position().width * ax.figure.get_figwidth() * 72
    size = max(1.0, (0.9 * pitch * width_pt / span) ** 2)
    return ax.scatter(xy[:, 0], xy[:, 1], c=values, s=size, cmap="viridis", linewidths=0)


def plot_sample(data: SampleData, pred: np.ndarray, per_gene: pd.DataFrame,
                out_dir: str | os.PathLike, sample: str, model_name: str) -> list[Path]:
    """Maps (measured vs predicted) of the best and the median gene; a per-gene PCC histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    defined = per_gene[per_gene["defined"]].sort_values("pcc", ascending=False)
    picks = []
    if len(defined):
        picks.append(("best", defined.index[0]))
        picks.append(("median", defined.index[len(defined) // 2]))
    else:  # nothing correlates (e.g. a constant predictor): show the most variable gene
        picks.append(("most variable", int(np.argmax(data.targets.var(axis=0)))))
    xy = data.coords
    fig, axes = plt.subplots(len(picks), 2, figsize=(9, 4.2 * len(picks)), squeeze=False)
    for row, (label, j) in enumerate(picks):
        gene, r = per_gene.loc[j, "gene"], per_gene.loc[j, "pcc"]
        for col, (what, values) in enumerate((("measured", data.targets[:, j]),
                                              ("predicted", pred[:, j]))):
            ax = axes[row, col]
            sc = _spot_map(ax, xy, values)
            title = f"{gene} {what}"
            if col == 1:
                title += f" (PCC {r:.2f}, {label} gene)" if np.isfinite(r) else " (PCC undefined)"
            ax.set_title(title, fontsize=9)
            fig.colorbar(sc, ax=ax, shrink=0.7)
    fig.suptitle(f"{model_name}, held-out sample {sample}", fontsize=10)
    fig.tight_layout()
    written.append(_savefig(fig, out_dir / f"{sample}.maps.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    r = per_gene["pcc"].to_numpy()
    ok = r[np.isfinite(r)]
    ax.hist(ok, bins=np.linspace(-1, 1, 41), color="0.4")
    if ok.size:
        ax.axvline(ok.mean(), color="C3", label=f"mean {ok.mean():.3f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("per-gene Pearson r across spots")
    ax.set_ylabel("genes")
    ax.set_title(f"{model_name}, {sample}: {ok.size} genes defined, "
                 f"{r.size - ok.size} undefined", fontsize=9)
    fig.tight_layout()
    written.append(_savefig(fig, out_dir / f"{sample}.pcc_hist.png"))
    return written


def _savefig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
