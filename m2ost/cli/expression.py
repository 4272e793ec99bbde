"""Parsers of the subcommands of the expression environment (scanpy; no torch): expression,
gene panels and the summary table of the evaluations."""

from __future__ import annotations

from m2ost.cli.options import add_command
from m2ost.cli.slides import FORMATS

RUN = "m2ost.cli.run_expression"


def add_parsers(sub) -> None:
    p = add_command(sub, "expression", f"{RUN}:expression", "QC and normalise counts, aligned with the bundle")
    p.add_argument("--sample", required=True, help="sample name (for messages)")
    p.add_argument("--format", required=True, choices=FORMATS, help="platform of the counts file")
    p.add_argument("--counts", required=True, help="counts (Visium h5/folder, legacy ST table, h5ad)")
    p.add_argument("--spots", required=True, help="spot table")
    p.add_argument("--slide-info", help="slide info JSON of the prepare stage: its H&E thumbnail goes into "
                   'uns["spatial"] for scanpy/squidpy (default: no image)')
    p.add_argument("--settings", help="JSON: min_counts, target_sum (default: the workflow's)")
    p.add_argument("--out", required=True, help="expression (h5ad)")

    p = add_command(sub, "panel", f"{RUN}:panel", "choose the gene panel from the training samples")
    p.add_argument("--train", nargs="+", required=True, metavar="SAMPLE=H5AD", help="training samples")
    p.add_argument("--other", nargs="*", metavar="SAMPLE=H5AD", help="held-out samples (genes must exist there)")
    p.add_argument("--settings", help="JSON: method, n_genes, list_file, min_spot_fraction (default: the workflow's)")
    p.add_argument("--out", required=True, help="gene list (one per line)")

    p = add_command(sub, "data-summary", f"{RUN}:data_summary",
                    "one line per sample: spots kept and dropped, median library size, genes detected")
    p.add_argument("--expression", nargs="+", required=True, metavar="SAMPLE=H5AD", help="expression files")
    p.add_argument("--low-fraction", type=float, default=0.2,
                   help="warn for a section whose median library size is under this fraction of the cohort's")
    p.add_argument("--out", required=True, help="table (TSV)")
    p.add_argument("--html", help="also the table as an HTML page (for the report)")

    p = add_command(sub, "summary", f"{RUN}:summary", "one table of every (model, split) summary")
    p.add_argument("summaries", nargs="+", help="summary.json files of the evaluate stage")
    p.add_argument("--out", required=True, help="summary table (TSV)")
    p.add_argument("--html", help="also the table as an HTML page (for the report)")
    p.add_argument("--png", help="also a figure of every model's per-gene PCC on every split")
