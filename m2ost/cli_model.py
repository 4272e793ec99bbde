"""Subcommands of the model stages: train, evaluate, summarize, grid, predict."""

from __future__ import annotations

import logging

log = logging.getLogger("m2ost")


def _settings(text):
    from .cli import _settings as parse

    return parse(text)


def _pairs(values, what):
    from .cli import _pairs as parse

    return parse(values, what)


def cmd_train(args) -> None:
    from .train import fit_model

    settings = _settings(args.settings)
    fit_model(args.kind, _pairs(args.bundle, "--bundle"), _pairs(args.expression, "--expression"), args.genes,
              list(_pairs(args.expression, "--expression")), settings.get("model", {}), settings.get("train", {}),
              args.out_dir)


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate

    settings = _settings(args.settings)
    bundles, expressions = _pairs(args.bundle, "--bundle"), _pairs(args.expression, "--expression")
    evaluate(args.model, bundles, expressions, list(expressions), args.out_dir, model_name=args.name,
             split=args.split, device=settings.get("device", "auto"), batch_size=settings.get("batch_size", 64),
             workers=settings.get("workers", 0))


def cmd_summarize(args) -> None:
    from .evaluate import aggregate

    table = aggregate(args.summaries, args.out)
    log.info("\n%s", table.to_string(index=False))


def cmd_grid(args) -> None:
    from .predict import grid_spots
    from .slide import read_slide_info
    from .spots import write_spots

    settings = _settings(args.settings)
    info = read_slide_info(args.slide_info, args.sample)
    table = grid_spots(args.sample, info, settings.get("spot_spacing_um", 100.0),
                       settings.get("min_tissue_fraction", 0.25))
    write_spots(table, args.out)


def cmd_predict_bundle(args) -> None:
    from .evaluate import predict_bundle
    from .predict import plot_prediction_maps

    settings = _settings(args.settings)
    adata = predict_bundle(args.model, args.bundle, args.out, sample=args.sample,
                           device=settings.get("device", "auto"), batch_size=settings.get("batch_size", 64))
    if args.png:
        plot_prediction_maps(adata, args.png, title=f"{args.sample}: predicted expression")


def cmd_predict(args) -> None:
    from .predict import predict_slide

    out = predict_slide(args.slide, args.model, args.out_dir, sample=args.sample, mpp=args.mpp,
                        spacing_um=args.spacing_um, min_tissue_fraction=args.min_tissue_fraction,
                        batch_size=args.batch_size, workers=args.workers, device=args.device)
    log.info("predictions written to %s", out)


def cmd_model_info(args) -> None:
    from .model.info import main

    main()


def add_parsers(sub) -> None:
    """Register the model subcommands on the ``m2ost`` parser."""
    p = sub.add_parser("train", help="fit a model (m2ost, m2ost_single, ridge, mean) on training samples")
    p.add_argument("--kind", required=True, choices=["m2ost", "m2ost_single", "ridge", "mean"])
    p.add_argument("--bundle", nargs="+", required=True, metavar="SAMPLE=H5")
    p.add_argument("--expression", nargs="+", required=True, metavar="SAMPLE=H5AD")
    p.add_argument("--genes", required=True, help="gene panel file")
    p.add_argument("--settings", help='JSON: {"model": {...}, "train": {...}}')
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a model on held-out samples (per-gene Pearson first)")
    p.add_argument("--model", required=True)
    p.add_argument("--bundle", nargs="+", required=True, metavar="SAMPLE=H5")
    p.add_argument("--expression", nargs="+", required=True, metavar="SAMPLE=H5AD")
    p.add_argument("--name", help="model name in the summary")
    p.add_argument("--split", help="split name in the summary")
    p.add_argument("--settings", help="JSON: device, batch_size, workers")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("summarize", help="one table of every (model, split) summary")
    p.add_argument("summaries", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("grid", help="spot grid over the tissue of an H&E-only slide")
    p.add_argument("--sample", required=True)
    p.add_argument("--slide-info", required=True)
    p.add_argument("--settings", help="JSON: spot_spacing_um, min_tissue_fraction")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("predict-bundle", help="predict every spot of a bundle")
    p.add_argument("--model", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--sample", required=True)
    p.add_argument("--settings", help="JSON: device, batch_size")
    p.add_argument("--png", help="also draw maps of the most variable predicted genes")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_predict_bundle)

    p = sub.add_parser("predict", help="predict expression maps for any slide (all steps in one)")
    p.add_argument("--slide", required=True)
    p.add_argument("--model", required=True, help="model.pt from the training stage")
    p.add_argument("--sample", help="name used for the outputs (default: the file name)")
    p.add_argument("--mpp", type=float, help="µm per pixel when the slide has no metadata")
    p.add_argument("--spacing-um", type=float, default=100.0)
    p.add_argument("--min-tissue-fraction", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("model-info", help="parameters and FLOPs of every model variant")
    p.set_defaults(func=cmd_model_info)
