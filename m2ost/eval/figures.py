"""Figures of the evaluation, prediction and summary stages (matplotlib, Agg backend, written atomically).

Per held-out sample (evaluation), two figures of fixed names, so the report offers the same
figures for every sample: ``{sample}.maps.jpg`` (measured vs predicted over the H&E) and
``{sample}.genes.png`` (per-gene Pearson of the whole panel, scatter of the best and median gene).
Maps over the H&E are JPEG (a photograph compresses 10-20 times better than as PNG, and the
report that embeds them stays small enough to send); line plots stay PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from m2ost.atomic import atomic_path  # noqa: E402
from m2ost.plan import outputs  # noqa: E402
from m2ost.eval.maps import Tissue, gene_panels, measured_vs_predicted, panel_title  # noqa: E402

EVALUATION_FIGURES = {"maps": "jpg", "genes": "png"}  # figure -> file extension
DPI = 110
# Maps over the H&E: JPEG at quality 65 and 100 dpi, where the H&E reads as in the lossless
# figure. A 3-row map of a demo slide with its interval widths (4 columns, 1720 x 1290 px) takes
# 0.35 MB (2-row, the mean predictor: 0.24 MB); the 3-column map was 2.9 MB as PNG at 110 dpi.
# So the demo's report (32 maps) stays under 25 MB.
JPEG_QUALITY = 65
MAP_DPI = 100


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


def who(model_name: str, split: str | None, sample: str) -> str:
    """The line naming what a figure shows: model, training split, held-out sample."""
    trained = f" trained on split {split}" if split else ""
    return f"model {model_name}{trained} · held-out sample {sample}"


def plot_sample(targets: np.ndarray, pred: np.ndarray, per_gene: pd.DataFrame, tissue: Tissue,
                out_dir: str | os.PathLike, sample: str, model_name: str, unit: str,
                chosen_gene: str | None = None, split: str | None = None, widths: np.ndarray | None = None,
                level: float | None = None) -> list[Path]:
    """The evaluation figures of one held-out sample (see the module docstring); ``widths``
    (spots x genes, the prediction intervals' widths at ``level``) add an uncertainty map per gene."""
    figs = sample_figures(targets, pred, per_gene, tissue, sample, model_name, unit, chosen_gene, split,
                          widths, level)
    return [_savefig(fig, Path(out_dir) / figure_name(sample, name)) for name, fig in figs.items()]


def sample_figures(targets: np.ndarray, pred: np.ndarray, per_gene: pd.DataFrame, tissue: Tissue, sample: str,
                   model_name: str, unit: str, chosen_gene: str | None = None, split: str | None = None,
                   widths: np.ndarray | None = None, level: float | None = None) -> dict:
    """figure name (:data:`EVALUATION_FIGURES`) -> the figure, titled with model, split and sample."""
    rows = []
    constant = bool((np.ptp(pred, axis=0) == 0).all())
    for label, j in gene_picks(per_gene, targets, pred, chosen_gene):
        gene, r = per_gene.loc[j, "gene"], per_gene.loc[j, "pcc"]
        note = "constant prediction, PCC undefined" if constant else _pcc_text(r)
        rows.append((f"{gene} ({label})", targets[:, j], pred[:, j], note)
                    + (() if widths is None else (widths[:, j],)))
    title = who(model_name, split, sample)
    return {"maps": measured_vs_predicted(tissue, rows, unit, title, width_label(level)),
            "genes": gene_scores(targets, pred, per_gene, unit, title)}


def figure_name(sample: str, figure: str) -> str:
    """The file name of one evaluation figure of a held-out sample."""
    return f"{sample}.{figure}.{EVALUATION_FIGURES[figure]}"


def gene_scores(targets: np.ndarray, pred: np.ndarray, per_gene: pd.DataFrame, unit: str, title: str):
    """Per-gene Pearson r of the panel, sorted, best and worst named; measured vs predicted of the
    best and the median gene (of the most variable gene for a constant prediction)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    constant = bool((np.ptp(pred, axis=0) == 0).all())
    _pcc_bars(axes[0], per_gene, constant)
    picks = gene_picks(per_gene, targets, pred)[:2]  # best and median, or the most variable gene
    for ax in axes[1 + len(picks):]:
        ax.axis("off")
    for ax, (label, j) in zip(axes[1:], picks):
        ax.scatter(targets[:, j], pred[:, j], s=6, alpha=0.6, color="C0", linewidths=0)
        lo = float(min(targets[:, j].min(), pred[:, j].min()))
        hi = float(max(targets[:, j].max(), pred[:, j].max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.7, ls="--")
        ax.set_xlabel(f"measured, {unit}", fontsize=8)
        ax.set_ylabel(f"predicted, {unit}", fontsize=8)
        score = "constant prediction, PCC undefined" if constant else _pcc_text(per_gene.loc[j, "pcc"])
        ax.set_title(panel_title(f"{per_gene.loc[j, 'gene']} ({label}, {score})"), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _pcc_bars(ax, per_gene: pd.DataFrame, constant: bool) -> None:
    """The defined per-gene r, best to worst, with their mean; the undefined ones counted (all
    undefined: a hatched panel that says so)."""
    scores = per_gene[per_gene["defined"]].sort_values("pcc", ascending=False).reset_index()
    undefined = int((~per_gene["defined"]).sum())
    if len(scores):
        ax.bar(np.arange(len(scores)), scores["pcc"], width=1.0, color="0.45")
        for i, ha in ((0, "left"), (len(scores) - 1, "right")):
            ax.annotate(f"{scores.loc[i, 'gene']} {scores.loc[i, 'pcc']:.2f}", (i, scores.loc[i, "pcc"]),
                        xytext=(0, 6 if scores.loc[i, "pcc"] >= 0 else -12), textcoords="offset points",
                        ha=ha, fontsize=8, color="C3")
        ax.axhline(scores["pcc"].mean(), color="C0", lw=1,
                   label=f"mean of the {len(scores)} defined: {scores['pcc'].mean():.3f}")
        ax.legend(fontsize=8, loc="upper right")
    else:  # e.g. a constant prediction: Pearson r is undefined for every gene
        ax.axhspan(-1, 1, facecolor="none", hatch="//", edgecolor="0.75", lw=0)
        ax.text(0.5, 0.5, f"Pearson r undefined for all {undefined} genes", transform=ax.transAxes,
                ha="center", va="center", fontsize=9, bbox={"facecolor": "white", "edgecolor": "0.6"})
    ax.axhline(0, color="0.2", lw=0.5)
    ax.set_xlim(-1, max(len(scores), 1))
    ax.set_ylim(-1, 1)
    ax.set_xticks([])
    ax.set_xlabel(f"{len(scores)} genes, best to worst" + (f" ({undefined} undefined)" if undefined else "")
                  if len(scores) else f"{undefined} genes, none with a defined r")
    ax.set_ylabel("Pearson r across spots")
    ax.set_title("per-gene PCC" + (" (constant prediction: r undefined)" if constant else ""), fontsize=9)


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
    heading = (title or "predicted expression") + "\n" + model_line(adata.uns.get("m2ost", {}).get("model_file"))
    bounds = adata.uns.get("m2ost", {}).get("intervals") or {}
    widths = ({labels[g]: np.asarray(adata.layers[bounds["upper"]] - adata.layers[bounds["lower"]])[:, names.index(g)]
               for g in chosen} if bounds else None)
    fig = gene_panels(tissue, {labels[g]: x[:, names.index(g)] for g in chosen}, unit, heading, widths=widths,
                      width_label=width_label(bounds.get("level")))
    _savefig(fig, Path(out_png))
    return chosen


def model_line(model_file) -> str:
    """Which model made a prediction: the workflow's kind and training split when the file is one
    of its models (``results/models/{model}/{split}/model.pt``), else the model file."""
    if not model_file:
        return "model unknown"
    parts = Path(model_file).parts
    if len(parts) >= 4 and parts[-1] == outputs.MODEL_FILE and parts[-4] == "models":
        kind, split = parts[-3], parts[-2]
        scope = " (every slide with expression)" if split == "all" else ""
        return f"model {kind} trained on split {split}{scope}"
    return f"model file {Path(model_file).name} ({model_file})"


def plot_model_comparison(per_gene: pd.DataFrame, out_png) -> None:
    """Per-gene PCC of every model on every split: boxes with the genes as points. An undefined r
    (NaN) is not drawn; a (model, split) without any defined r is a hatched box marked
    "undefined", and each model's label counts its defined scores.

    ``per_gene`` has columns model, split, gene, pcc (one row per gene, model and split).
    """
    models = sorted(per_gene["model"].unique())
    splits = sorted(per_gene["split"].unique())
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(models) * len(splits) + 2), 4.6))
    width = 0.8 / max(len(splits), 1)
    rng = np.random.default_rng(0)  # jitter of the points only
    for i, split in enumerate(splits):
        data, where = [], []
        for m, model in enumerate(models):
            r = per_gene.loc[(per_gene["model"] == model) & (per_gene["split"] == split), "pcc"].to_numpy(float)
            x = m + (i - (len(splits) - 1) / 2) * width
            r = r[np.isfinite(r)]
            if r.size:
                data.append(r)
                where.append(x)
                ax.scatter(x + rng.uniform(-width / 4, width / 4, r.size), r, s=5, color=f"C{i}", alpha=0.5,
                           linewidths=0)
            else:
                ax.bar(x, 2, bottom=-1, width=width * 0.8, color="none", edgecolor=f"C{i}", hatch="//", lw=0.5)
                ax.text(x, 0, "undefined", rotation=90, ha="center", va="center", fontsize=8,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        if data:
            ax.boxplot(data, positions=where, widths=width * 0.8, showfliers=False,
                       medianprops={"color": f"C{i}"}, boxprops={"color": f"C{i}"},
                       whiskerprops={"color": f"C{i}"}, capprops={"color": f"C{i}"})
        ax.plot([], [], color=f"C{i}", label=split)
    ax.axhline(0, color="0.3", lw=0.5)
    ax.set_xticks(range(len(models)), [_defined_label(per_gene, m) for m in models], fontsize=8)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("per-gene Pearson r (held-out spots)")
    ax.set_title("Per-gene PCC of every model on every split (an undefined r is not drawn)", fontsize=10)
    ax.legend(title="split", fontsize=8, title_fontsize=8, loc="lower right")
    fig.tight_layout()
    _savefig(fig, Path(out_png))


def _defined_label(per_gene: pd.DataFrame, model: str) -> str:
    r = per_gene.loc[per_gene["model"] == model, "pcc"].to_numpy(float)
    return f"{model}\n{int(np.isfinite(r).sum())} of {r.size} r defined"


def _savefig(fig, path: Path) -> Path:
    """PNG, or JPEG (``.jpg``/``.jpeg``: maps over the H&E) at :data:`JPEG_QUALITY`; the figure's
    title also goes into the file (PNG ``Title``, JPEG comment), for viewers and checks."""
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    title = fig.get_suptitle()
    jpeg_options = {"quality": JPEG_QUALITY, "optimize": True, "progressive": True, "comment": title}
    options = {"pil_kwargs": jpeg_options} if jpeg else {"metadata": {"Title": title}}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=MAP_DPI if jpeg else DPI, format="jpeg" if jpeg else "png", **options)
    plt.close(fig)
    return path
