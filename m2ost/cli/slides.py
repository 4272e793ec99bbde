"""Parsers of the subcommands of the slides environment (no torch, no scanpy)."""

from __future__ import annotations

from m2ost.cli.options import add_command

RUN = "m2ost.cli.run_slides"
FORMATS = ["visium", "legacy_st", "h5ad", "hest"]


def add_parsers(sub) -> None:
    p = add_command(sub, "demo-cohort", f"{RUN}:demo_cohort", "generate the synthetic demo cohort",
                    aliases=("demo",))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, help="random seed of the cohort (default: the workflow's demo.seed)")
    p.add_argument("--settings",
                   help="JSON: n_patients, slides_per_patient, n_genes, slide_um (default: the workflow's)")

    p = add_command(sub, "spots", f"{RUN}:spots", "read a spot position file into a spot table")
    p.add_argument("--sample", required=True, help="sample name (for messages)")
    p.add_argument("--format", required=True, choices=FORMATS, help="platform of the positions file")
    p.add_argument("--positions", required=True,
                   help="positions file (Visium tissue_positions, legacy ST selection, h5ad)")
    p.add_argument("--keep-off-tissue", action="store_true", help="keep spots flagged off tissue")
    p.add_argument("--scalefactors", help="Visium scalefactors_json.json (default: beside --positions)")
    _scale_options(p)
    p.add_argument("--out", required=True, help="spot table (TSV)")

    p = add_command(sub, "prepare-slide", f"{RUN}:prepare_slide",
                    "make a slide OpenSlide-readable and record its resolution", aliases=("convert-slide",))
    p.add_argument("--sample", required=True, help="sample name (for messages)")
    p.add_argument("--slide", required=True, help="the H&E slide")
    p.add_argument("--spots", help="spot table, to estimate the resolution from the spot grid")
    p.add_argument("--format", help="platform of the spot grid (visium, legacy_st)")
    p.add_argument("--mpp", type=float, help="µm per pixel (overrides the slide metadata)")
    p.add_argument("--mpp-source", default="sample sheet", help="where --mpp comes from (for messages)")
    p.add_argument("--scalefactors", help="Visium scalefactors_json.json (its spot diameter gives a resolution)")
    p.add_argument("--hest-metadata", help="HEST-1k metadata/{id}.json (pixel_size_um_estimated)")
    _scale_options(p)
    p.add_argument("--converted", help="write a pyramidal TIFF here (plain images)")
    p.add_argument("--settings", help="JSON: tile_size, jpeg_quality, mpp_range (default: the workflow's)")
    p.add_argument("--out", required=True, help="slide information (JSON)")

    p = add_command(sub, "tile", f"{RUN}:tile", "tile every spot into a multi-view HDF5 bundle")
    p.add_argument("--sample", required=True, help="sample name (for messages)")
    p.add_argument("--slide-info", required=True, help="slide information from prepare-slide")
    p.add_argument("--spots", required=True, help="spot table")
    p.add_argument("--settings",
                   help="JSON: views [{fov_um|fov_px, size_px}], strategy, max_upscale, allow_upscale "
                        "(default: the workflow's views and tiling settings)")
    p.add_argument("--workers", type=int, help="reader processes (default: the workflow's tiling.threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="bundle (HDF5)")

    p = add_command(sub, "grid-spots", f"{RUN}:grid_spots", "spot grid over the tissue of an H&E-only slide")
    p.add_argument("--sample", required=True, help="sample name (for messages)")
    p.add_argument("--slide-info", required=True, help="slide information from prepare-slide")
    p.add_argument("--settings", help="JSON: spot_spacing_um, min_tissue_fraction (default: the workflow's)")
    p.add_argument("--out", required=True, help="spot table (TSV)")


def _scale_options(p) -> None:
    p.add_argument("--slide-scale", default="",
                   help="the slide is the full-resolution image downscaled by this factor, or by the scale "
                        "factor of this key (tissue_hires_scalef, tissue_lowres_scalef)")
    p.add_argument("--array-pitch-um", type=float,
                   help="centre-to-centre distance of the array's nearest spots, µm (default: the platform's, from "
                        "the spot indices: legacy ST 1k array 200, 2k array (checkerboard indices) 141; Visium 100)")
