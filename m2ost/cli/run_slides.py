"""What the subcommands of the slides environment run."""

from __future__ import annotations

import logging

from m2ost import defaults
from m2ost.cli.options import parse_settings
from m2ost.data.demo import make_demo_cohort
from m2ost.data.grid import grid_spots as make_grid
from m2ost.data.slide import prepare_slide as prepare
from m2ost.data.slide import read_slide_info
from m2ost.data.spots import read_positions, read_spots, write_spots
from m2ost.data.tiling import View, tile_slide
from m2ost.provenance import provenance

log = logging.getLogger("m2ost")


def demo_cohort(args) -> None:
    settings = defaults.settings("demo", parse_settings(args.settings))
    settings.pop("enabled")
    seed = settings.pop("seed")
    make_demo_cohort(args.out, seed=seed if args.seed is None else args.seed, **settings)


def spots(args) -> None:
    table = read_positions(args.format, args.positions, args.sample, in_tissue_only=not args.keep_off_tissue,
                           scalefactors=args.scalefactors, slide_scale=args.slide_scale, pitch_um=args.array_pitch_um)
    write_spots(table, args.out)
    log.info("%s: %d spots written to %s", args.sample, len(table), args.out)


def prepare_slide(args) -> None:
    prepare(args.sample, args.slide, args.out, converted_path=args.converted, sheet_mpp=args.mpp,
            spots_tsv=args.spots, fmt=args.format or "", override_name=args.mpp_source,
            scalefactors=args.scalefactors, slide_scale=args.slide_scale, hest_metadata=args.hest_metadata,
            array_pitch_um=args.array_pitch_um, **defaults.settings("slides", parse_settings(args.settings)))


def tile(args) -> None:
    settings = {"views": defaults.section("views"), **parse_settings(args.settings)}
    info = read_slide_info(args.slide_info, args.sample)
    views = [View.from_config(v) for v in settings["views"]]
    tiling = defaults.section("tiling")
    workers = tiling["threads"] if args.workers is None else args.workers
    tile_slide(args.sample, info["slide"], read_spots(args.spots, args.sample), info["mpp"], views, args.out,
               workers=workers, strategy=settings.get("strategy", "pyramid"), mpp_source=info["mpp_source"],
               provenance=provenance(settings), progress=not args.no_progress,
               max_upscale=settings.get("max_upscale", tiling["max_upscale"]),
               allow_upscale=settings.get("allow_upscale", tiling["allow_upscale"]))


def grid_spots(args) -> None:
    settings = parse_settings(args.settings)
    info = read_slide_info(args.slide_info, args.sample)
    table = make_grid(args.sample, info, settings.get("spot_spacing_um"), settings.get("min_tissue_fraction"))
    write_spots(table, args.out)
