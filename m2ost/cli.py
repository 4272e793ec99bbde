"""The ``m2ost`` command line: one subcommand per stage, calling the same functions as the rules.

Settings that are nested in the config (views, training, ...) are passed as JSON with
``--settings``; everything else is a plain option. Bad input ends with one line on stderr,
``m2ost: error: [sample S, file F] problem``, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import InputError

log = logging.getLogger("m2ost")


def _settings(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"--settings is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise InputError("--settings must be a JSON object")
    return value


def cmd_demo(args) -> None:
    from .demo import make_demo_cohort

    make_demo_cohort(args.out, seed=args.seed, **_settings(args.settings))


def cmd_spots(args) -> None:
    from .spots import read_positions, write_spots

    table = read_positions(args.format, args.positions, args.sample, in_tissue_only=not args.keep_off_tissue,
                           scalefactors=args.scalefactors)
    write_spots(table, args.out)
    log.info("%s: %d spots written to %s", args.sample, len(table), args.out)


def cmd_prepare_slide(args) -> None:
    from .slide import prepare_slide

    prepare_slide(args.sample, args.slide, args.out, converted_path=args.converted, sheet_mpp=args.mpp,
                  spots_tsv=args.spots, fmt=args.format or "", **_settings(args.settings))


def cmd_tile(args) -> None:
    from .provenance import provenance
    from .slide import read_slide_info
    from .spots import read_spots
    from .tiling import View, tile_slide

    settings = _settings(args.settings)
    info = read_slide_info(args.slide_info, args.sample)
    views = [View.from_config(v) for v in settings["views"]]
    tile_slide(args.sample, info["slide"], read_spots(args.spots, args.sample), info["mpp"], views, args.out,
               workers=args.workers, strategy=settings.get("strategy", "pyramid"), mpp_source=info["mpp_source"],
               provenance=provenance(settings), progress=not args.no_progress)


def cmd_expression(args) -> None:
    from .expression import build_expression
    from .provenance import provenance
    from .spots import read_spots

    settings = _settings(args.settings)
    build_expression(args.sample, args.format, args.counts, read_spots(args.spots, args.sample), args.out,
                     min_counts=settings.get("min_counts", 100), target_sum=settings.get("target_sum", 1e4),
                     provenance=provenance(settings))


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """Parse ``sample=path`` arguments."""
    out = {}
    for item in values or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise InputError(f"{what} must be given as SAMPLE=PATH, got {item!r}")
        out[name] = path
    return out


def cmd_panel(args) -> None:
    from .panel import select_panel, write_panel

    settings = _settings(args.settings)
    genes = select_panel(settings.get("method", "top_mean"), int(settings.get("n_genes", 50)),
                         _pairs(args.train, "--train"), _pairs(args.other, "--other"),
                         list_file=settings.get("list_file") or None,
                         min_spot_fraction=settings.get("min_spot_fraction", 0.1))
    write_panel(genes, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2ost", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"m2ost {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate the synthetic demo cohort")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", help="JSON: n_patients, slides_per_patient, n_genes, ...")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("spots", help="read a spot position file into a spot table")
    p.add_argument("--sample", required=True)
    p.add_argument("--format", required=True, choices=["visium", "legacy_st", "h5ad"])
    p.add_argument("--positions", required=True)
    p.add_argument("--keep-off-tissue", action="store_true")
    p.add_argument("--scalefactors", help="Visium scalefactors_json.json (default: beside --positions)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_spots)

    p = sub.add_parser("prepare-slide", help="make a slide OpenSlide-readable and record its resolution")
    p.add_argument("--sample", required=True)
    p.add_argument("--slide", required=True)
    p.add_argument("--spots", help="spot table, to estimate the resolution from the spot grid")
    p.add_argument("--format", help="platform of the spot grid (visium, legacy_st)")
    p.add_argument("--mpp", type=float, help="µm per pixel (overrides the slide metadata)")
    p.add_argument("--converted", help="write a pyramidal TIFF here (plain images)")
    p.add_argument("--settings", help="JSON: tile_size, jpeg_quality")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prepare_slide)

    p = sub.add_parser("tile", help="tile every spot into a multi-view HDF5 bundle")
    p.add_argument("--sample", required=True)
    p.add_argument("--slide-info", required=True)
    p.add_argument("--spots", required=True)
    p.add_argument("--settings", required=True, help="JSON: views [{fov_um|fov_px, size_px}], strategy")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("expression", help="QC and normalise counts, aligned with the bundle")
    p.add_argument("--sample", required=True)
    p.add_argument("--format", required=True, choices=["visium", "legacy_st", "h5ad"])
    p.add_argument("--counts", required=True)
    p.add_argument("--spots", required=True)
    p.add_argument("--settings", help="JSON: min_counts, target_sum")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_expression)

    p = sub.add_parser("panel", help="choose the gene panel from the training samples")
    p.add_argument("--train", nargs="+", required=True, metavar="SAMPLE=H5AD")
    p.add_argument("--other", nargs="*", metavar="SAMPLE=H5AD", help="held-out samples (genes must exist there)")
    p.add_argument("--settings", help="JSON: method, n_genes, list_file, min_spot_fraction")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_panel)

    from . import cli_model

    cli_model.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        args.func(args)
    except Exception as err:
        # m2ost.train (and torch) only where the command imported it: the conda envs of the
        # slide and expression rules have no torch.
        train = sys.modules.get(f"{__package__}.train")
        if not isinstance(err, InputError) and not (train and isinstance(err, train.TrainingDiverged)):
            raise
        print(f"m2ost: error: {err}", file=sys.stderr)
        return 1
    return 0
