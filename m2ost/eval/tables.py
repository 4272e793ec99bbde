"""The report's tables as small self-contained HTML pages: labelled columns, numbers to 3
decimals, an undefined value written as such, and a page that fits the report's frame."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from m2ost.atomic import atomic_path
from m2ost.eval.metrics import TOP_K

SUMMARY_NOTES = {
    "model": "the model's name in the workflow (models:)",
    "kind": "the model kind",
    "split": "the training/held-out split; 'mean' rows average the model's splits (each split weighs the same)",
    "test_samples": "the held-out samples of the split (the model never saw them)",
    "n_spots": "held-out spots scored",
    "n_genes": "genes of the panel",
    "gene_pcc_mean": "primary metric: per-gene Pearson r across the spots of each held-out sample, averaged over "
                     "the genes where r is defined (undefined: the prediction or the measurement is constant, "
                     "as for the mean predictor), then over the held-out samples",
    "n_genes_defined": "genes with a defined Pearson r, which the gene_pcc columns average",
    "gene_pcc_median": "the median of the defined per-gene Pearson r",
    f"gene_pcc_top{TOP_K}": f"the mean of the {TOP_K} best defined per-gene Pearson r",
    "spot_pcc_paper": "per-spot Pearson r across genes (the M2OST paper's figure); inflated by the differences in "
                      "mean expression between genes: a constant average profile scores high on it",
    "rmse": "root mean squared error of the normalised expression (log1p CP10k)",
    "mae": "mean absolute error of the normalised expression",
    "interval_coverage": "share of held-out spots whose measured value lies inside its prediction interval "
                         "(level intervals.level), mean over genes",
    "interval_coverage_gene_p10": "the same for the worst tenth of genes (10th percentile over genes)",
    "interval_width": "the prediction intervals' mean width (docs/uncertainty.md)",
}

QUALITY_NOTES = {
    "sample": "the sample of the sample sheet",
    "spots_in_table": "spots of the sample's spot table",
    "spots_kept": "spots with counts, at or above expression.min_counts: the spots the models see",
    "dropped_no_counts": "spots of the table without a row in the counts",
    "dropped_low_counts": "spots under expression.min_counts",
    "count_rows_without_spot": "rows of the counts that name no spot of the table",
    "median_library_size": "median counts per kept spot",
    "genes_detected": "genes with a count in at least one kept spot",
    "warning": "a median library size under expression.low_library_fraction of the cohort's median",
}


TABLE_STYLE = ("body{font-family:sans-serif;font-size:13px;margin:8px}"
               "table{border-collapse:collapse;max-width:100%}"
               "th,td{padding:3px 6px;text-align:right;border-bottom:1px solid #ddd;vertical-align:bottom}"
               "th{background:#f3f3f3}td.num{white-space:nowrap}"
               "td.text,th.text{text-align:left}td.text{max-width:16em}"
               "dl{margin-top:12px;max-width:60em}dt{font-weight:bold;float:left;clear:left;margin-right:6px}"
               "dd{margin:0 0 3px 0}")


def _breakable(text: str) -> str:
    """Escaped, with a line break allowed after each underscore and comma (a narrow frame wraps
    ``gene_pcc_mean`` and sample lists rather than cutting them off)."""
    return html.escape(text).replace("_", "_<wbr>").replace(",", ",<wbr>")


def _cell(value, text: bool) -> str:
    if text:
        return _breakable(str(value))
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "<i>undefined</i>"
    if isinstance(value, (float, np.floating)):
        return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 10 else f"{value:.3f}"
    return html.escape(str(value))


def write_table_html(table: pd.DataFrame, out_html, title: str, notes: dict[str, str] | None = None) -> None:
    """A table as a small self-contained HTML page that fits a narrow frame (the report shows it
    inline): headers wrap at underscores, numbers to 3 decimals, NaN as *undefined*, and each
    column of ``notes`` explained below the table."""
    text = [not pd.api.types.is_numeric_dtype(table[c]) for c in table.columns]
    head = "".join(f"<th class='{'text' if t else 'num'}' scope='col'>{_breakable(str(c))}</th>"
                   for c, t in zip(table.columns, text))
    body = "".join("<tr>" + "".join(f"<td class='{'text' if t else 'num'}'>{_cell(v, t)}</td>"
                                    for v, t in zip(row, text)) + "</tr>"
                   for row in table.itertuples(index=False))
    legend = "".join(f"<dt>{html.escape(c)}</dt><dd>{html.escape(d)}</dd>" for c, d in (notes or {}).items())
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{TABLE_STYLE}</style></head><body><h3>{html.escape(title)}</h3>"
            f"<table class='summary'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            + (f"<dl>{legend}</dl>" if legend else "") + "</body></html>\n")
    with atomic_path(out_html) as tmp:
        tmp.write_text(page)
