"""What the subcommands of the expression environment run."""

from __future__ import annotations

import logging

from m2ost import defaults
from m2ost.cli.options import parse_pairs, parse_settings
from m2ost.data.expression import build_expression
from m2ost.data.panel import select_panel, write_panel
from m2ost.data.quality import quality_table, write_quality_table
from m2ost.data.slide import read_slide_info
from m2ost.data.spatial import slide_spatial, spot_diameter_um
from m2ost.data.spots import read_spots
from m2ost.eval.figures import plot_model_comparison
from m2ost.eval.summary import aggregate, per_gene_scores
from m2ost.eval.tables import QUALITY_NOTES, SUMMARY_NOTES, write_table_html
from m2ost.provenance import provenance

log = logging.getLogger("m2ost")


def expression(args) -> None:
    settings = defaults.settings("expression", parse_settings(args.settings))
    spatial = None
    if args.slide_info:
        info = read_slide_info(args.slide_info, args.sample)
        diameter = spot_diameter_um(args.format, info.get("array_pitch_um"))
        spatial = slide_spatial(info["slide"], info["mpp"], diameter, args.sample)
    build_expression(args.sample, args.format, args.counts, read_spots(args.spots, args.sample), args.out,
                     min_counts=settings["min_counts"], target_sum=settings["target_sum"],
                     provenance=provenance(settings), spatial=spatial)


def panel(args) -> None:
    settings = defaults.settings("panel", parse_settings(args.settings))
    genes = select_panel(settings["method"], int(settings["n_genes"]),
                         parse_pairs(args.train, "--train"), parse_pairs(args.other, "--other"),
                         list_file=settings["list_file"] or None, min_spot_fraction=settings["min_spot_fraction"])
    write_panel(genes, args.out)


def summary(args) -> None:
    table = aggregate(args.summaries, args.out)
    log.info("\n%s", table.to_string(index=False))
    if args.html:
        write_table_html(table, args.html, "Held-out evaluation: mean over the held-out samples of each split",
                         SUMMARY_NOTES)
    if args.png:
        plot_model_comparison(per_gene_scores(args.summaries), args.png)


def data_summary(args) -> None:
    table = quality_table(parse_pairs(args.expression, "--expression"), args.low_fraction)
    text = write_quality_table(table, args.out)
    if args.html:
        write_table_html(table, args.html, "Data quality per sample", QUALITY_NOTES)
    # On stdout, which the workflow shows on the terminal at the end of the data stages.
    print(f"m2ost: data quality per sample ({args.out}):\n{text}")
