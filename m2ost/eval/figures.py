"""Figures of the evaluation, prediction and summary stages (matplotlib, Agg backend, written atomically).

Per held-out sample (evaluation), two figures of fixed names, so the report offers the same
figures for every sample: ``{sample}.maps.png`` (measured vs predicted over the H&E) and
``{sample}.genes.png`` (per-gene Pearson of the whole panel, scatter of the best and median gene).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from m2ost.atomic import atomic_path  # noqa: E402
from m2ost.eval.maps import Tissue, gene_panels, measured_vs_predicted  # noqa: E402

EVALUATION_FIGURES = ("maps", "genes")


def gene_picks(per_gene: pd.DataFrame, targets: np.ndarray, pred: np.ndarray,
               chosen: str | None = None) -> list[tuple[str, int]]:
    """(label, column) of the genes to map: the best and the median by Pearson r, and the chosen one.

    Where the prediction is constant (the mean baseline) or no gene has a defined r, nothing is
    "best": the most variable measured gene is shown instead, and said so.
    """
    defined = per_gene[per_gene["defined"]].sort_values("pcc", ascending=False)
    picks = []
    constant = bool((np.ptp(pred, axis=0) == 0).all())
    if len(defined) and not constant:
        picks.append(("best gene", int(defined.index[0])))
        picks.append(("median gene", int(defined.index[len(defined) // 2])))
    else:
        picks.append(("most variable measured gene", int(np.argmax(targets.var(axis=0)))))
    genes = list(per_gene["gene"])
    if chosen and chosen in genes and genes.index(chosen) not in [j for _, j in picks]:
        picks.append(("chosen gene", genes.index(chosen)))
    return picks


def _pcc_text(r: float) -> str:
    return f"PCC {r:.2f}" if np.isfinite(r) else "PCC undefined"


def plot_sample(targets: np.ndarray, pred: np.ndarray, per_gene: pd.DataFrame, tissue: Tissue,
                out_dir: str | os.PathLike, sample: str, model_name: str, unit: str,
                chosen_gene: str | None = None, widths: np.ndarray | None = None,
                level: float | None = None) -> list[Path]:
    """The evaluation figures of one held-out sample (see the module docstring); ``widths``
    (spots x genes, the prediction intervals' widths at ``level``) add an uncertainty map per gene."""
    out_dir = Path(out_dir)
    rows = []
    constant = bool((np.ptp(pred, axis=0) == 0).all())
    for label, j in gene_picks(per_gene, targets, pred, chosen_gene):
        gene, r = per_gene.loc[j, "gene"], per_gene.loc[j, "pcc"]
        score = "constant prediction" if constant else _pcc_text(r)
        rows.append((f"{gene} ({label}, {score})", targets[:, j], pred[:, j])
                    + (() if widths is None else (widths[:, j],)))
    fig = measured_vs_predicted(tissue, rows, unit, f"{model_name}, held-out sample {sample}",
                                width_label(level))
    written = [_savefig(fig, out_dir / f"{sample}.maps.png")]
    fig = gene_scores(targets, pred, per_gene, unit, f"{model_name}, held-out sample {sample}")
    written.append(_savefig(fig, out_dir / f"{sample}.genes.png"))
    return written


def gene_scores(targets: np.ndarray, pred: np.ndarray, per_gene: pd.DataFrame, unit: str, title: str):
    """Per-gene Pearson r of the panel, sorted, best and worst named; measured vs predicted of the
    best and the median gene."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    constant = bool((np.ptp(pred, axis=0) == 0).all())
    ax = axes[0]
    scores = per_gene[per_gene["defined"]].sort_values("pcc", ascending=False).reset_index()
    undefined = int((~per_gene["defined"]).sum())
    if len(scores):
        ax.bar(np.arange(len(scores)), scores["pcc"], width=1.0, color="0.45")
        for i, ha in ((0, "left"), (len(scores) - 1, "right")):
            ax.annotate(f"{scores.loc[i, 'gene']} {scores.loc[i, 'pcc']:.2f}", (i, scores.loc[i, "pcc"]),
                        xytext=(0, 6 if scores.loc[i, "pcc"] >= 0 else -12), textcoords="offset points",
                        ha=ha, fontsize=8, color="C3")
        ax.axhline(scores["pcc"].mean(), color="C0", lw=1, label=f"mean {scores['pcc'].mean():.3f}")
        ax.legend(fontsize=8, loc="upper right")
    ax.axhline(0, color="0.2", lw=0.5)
    ax.set_xlim(-1, max(len(scores), 1))
    ax.set_ylim(-1, 1)
    ax.set_xticks([])
    ax.set_xlabel(f"{len(scores)} genes, best to worst" + (f" ({undefined} undefined)" if undefined else ""))
    ax.set_ylabel("Pearson r across spots")
    ax.set_title("per-gene PCC" + (" (constant prediction: no gene is predicted)" if constant else ""), fontsize=9)
    for ax, k in zip(axes[1:], (0, len(scores) // 2)):
        if k >= len(scores):
            ax.axis("off")
            continue
        j = int(scores.loc[k, "index"])
        ax.scatter(targets[:, j], pred[:, j], s=6, alpha=0.6, color="C0", linewidths=0)
        lo = float(min(targets[:, j].min(), pred[:, j].min()))
        hi = float(max(targets[:, j].max(), pred[:, j].max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.7, ls="--")
        ax.set_xlabel(f"measured, {unit}", fontsize=8)
        ax.set_ylabel(f"predicted, {unit}", fontsize=8)
        which = "constant prediction" if constant else ("best gene" if k == 0 else "median gene")
        ax.set_title(f"{scores.loc[k, 'gene']} ({which}, PCC {scores.loc[k, 'pcc']:.2f})", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def width_label(level: float | None) -> str:
    """What an uncertainty map shows."""
    return f"{level:.0%} interval width" if level else "interval width"


def most_variable(x: np.ndarray, names, n: int) -> list[str]:
    order = np.argsort(-np.asarray(x).var(axis=0), kind="stable")[:n]
    return [str(names[g]) for g in order]


def plot_prediction_maps(adata, tissue: Tissue, out_png, unit: str, genes: list[str] | None = None,
                         n_genes: int = 6, title: str = "") -> list[str]:
    """Predicted expression over the slide: the H&E, then one map per gene (``genes``, default the
    ``n_genes`` most variable predicted ones). Returns the genes drawn."""
    x = np.asarray(adata.X)
    names = list(map(str, adata.var_names))
    chosen = [g for g in (genes or []) if g in names] or most_variable(x, names, n_genes)
    val = adata.var.get("val_pcc")
    labels = {g: g if val is None or not np.isfinite(val[g]) else f"{g} (validation PCC {val[g]:.2f})"
              for g in chosen}
    bounds = adata.uns.get("m2ost", {}).get("intervals") or {}
    widths = ({labels[g]: np.asarray(adata.layers[bounds["upper"]] - adata.layers[bounds["lower"]])[:, names.index(g)]
               for g in chosen} if bounds else None)
    fig = gene_panels(tissue, {labels[g]: x[:, names.index(g)] for g in chosen}, unit,
                      title or "predicted expression", widths=widths, width_label=width_label(bounds.get("level")))
    _savefig(fig, Path(out_png))
    return chosen


def plot_model_comparison(per_gene: pd.DataFrame, out_png) -> None:
    """Per-gene PCC of every model on every split: boxes with the genes as points.

    ``per_gene`` has columns model, split, gene, pcc (one row per gene, model and split).
    """
    models = sorted(per_gene["model"].unique())
    splits = sorted(per_gene["split"].unique())
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(models) * len(splits) + 2), 4.2))
    width = 0.8 / max(len(splits), 1)
    rng = np.random.default_rng(0)  # jitter of the points only
    for i, split in enumerate(splits):
        data, where = [], []
        for m, model in enumerate(models):
            r = per_gene.loc[(per_gene["model"] == model) & (per_gene["split"] == split), "pcc"].to_numpy(float)
            r = r[np.isfinite(r)]
            x = m + (i - (len(splits) - 1) / 2) * width
            if r.size:
                data.append(r)
                where.append(x)
                ax.scatter(x + rng.uniform(-width / 4, width / 4, r.size), r, s=5, color=f"C{i}", alpha=0.5,
                           linewidths=0)
        if data:
            ax.boxplot(data, positions=where, widths=width * 0.8, showfliers=False,
                       medianprops={"color": f"C{i}"}, boxprops={"color": f"C{i}"},
                       whiskerprops={"color": f"C{i}"}, capprops={"color": f"C{i}"})
        ax.plot([], [], color=f"C{i}", label=split)
    ax.axhline(0, color="0.3", lw=0.5)
    ax.set_xticks(range(len(models)), models)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylabel("per-gene Pearson r (held-out spots)")
    ax.set_title("Per-gene PCC of every model on every split (undefined genes left out)", fontsize=10)
    ax.legend(title="split", fontsize=8, title_fontsize=8, loc="best")
    fig.tight_layout()
    _savefig(fig, Path(out_png))


def write_table_html(table: pd.DataFrame, out_html, title: str) -> None:
    """The summary table as a small self-contained HTML page (the report shows it inline)."""
    body = table.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="NA", border=0,
                         classes="summary")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>{t}</title><style>"
            "body{{font-family:sans-serif;font-size:13px}} table{{border-collapse:collapse}}"
            "th,td{{padding:3px 8px;text-align:right;border-bottom:1px solid #ddd}}"
            "th{{background:#f3f3f3}}</style></head><body><h3>{t}</h3>{b}</body></html>\n")
    with atomic_path(out_html) as tmp:
        tmp.write_text(page.format(t=html.escape(title), b=body))


def _savefig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
