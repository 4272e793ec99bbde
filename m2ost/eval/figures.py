"""Figures of the evaluation and prediction stages (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from m2ost.atomic import atomic_path  # noqa: E402

def _spacing(xy: np.ndarray) -> float:
    """Median distance to the nearest other spot (the grid pitch)."""

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


def plot_sample(data, pred: np.ndarray, per_gene: pd.DataFrame,
                out_dir: str | os.PathLike, sample: str, model_name: str) -> list[Path]:
    """Maps (measured vs predicted) of the best and the median gene; a per-gene PCC histogram."""

    out_dir = Path(out_dir)
    written = []
    defined = per_gene[per_gene["defined"]].sort_values("pcc", ascending=False)
    picks = []
    if len(defined):
        picks.append(("best", defined.index[0]))
        picks.append(("median", defined.index[len(defined) // 2]))
    else:  # nothing correlates (e.g. a constant predictor): show the most variable gene
        picks.append(("most variable", int(np.argmax(data.targets.var(axis=0)))))
    xy = data.centers
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


def plot_prediction_maps(adata, out_png, n_genes: int = 6, title: str = "") -> None:
    """Predicted expression of the most variable predicted genes, one panel each."""


    x = np.asarray(adata.X)
    order = np.argsort(-x.var(axis=0))[:n_genes]
    cols = min(3, len(order))
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    xy = adata.obsm["spatial"]
    for ax, g in zip(axes.ravel(), order):
        points = ax.scatter(xy[:, 0], xy[:, 1], c=x[:, g], s=8, cmap="viridis")
        ax.set_title(str(adata.var_names[g]))
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(points, ax=ax, shrink=0.7)
    for ax in axes.ravel()[len(order):]:
        ax.axis("off")
    fig.suptitle(title or "predicted expression")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _savefig(fig, path: Path) -> Path:

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path

