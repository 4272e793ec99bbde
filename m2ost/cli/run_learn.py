"""What the model subcommands run (torch)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from m2ost import defaults
from m2ost.cli.options import parse_pairs, parse_settings
from m2ost.learn.features.embeddings import write_embeddings
from m2ost.learn.features.encoders import encoder_settings, load_encoder
from m2ost.learn.inference.ensemble import fit_ensemble
from m2ost.learn.inference.heldout import evaluate as evaluate_model
from m2ost.learn.training.fit_on_views import fit_model
from m2ost.learn.features.fit_on_embeddings import fit_feature_model
from m2ost.learn.inference.new_slides import predict_bundle, prediction_outputs
from m2ost.learn.inference.new_slides import predict_slide as predict_one_slide
from m2ost.model.info import print_variants
from m2ost.errors import InputError, StaleCheckpoint
from m2ost.plan.kinds import ENSEMBLE, FEATURE_KINDS, model_kind
from m2ost.plan.settings import ENCODER_NETWORK_KEYS

log = logging.getLogger("m2ost")


def train(args) -> None:
    try:
        _train(args)
    except StaleCheckpoint as err:
        if not args.restart_stale_checkpoint:
            raise
        log.warning("[file %s] the checkpoint of another run (other settings or data): deleted, training "
                    "starts over", err.file)
        shutil.rmtree(Path(err.file).parent, ignore_errors=True)  # every process of a torchrun job
        _train(args)


def _train(args) -> None:
    settings = parse_settings(args.settings)
    expressions = parse_pairs(args.expression, "--expression")
    # Unset model and training settings are the workflow's (the config schema's).
    if args.kind == ENSEMBLE:
        if not args.members:
            raise InputError("train --kind ensemble needs --members KIND=MODEL.PT ...")
        fit_ensemble(parse_pairs(args.members, "--members"), parse_pairs(args.bundle, "--bundle"), expressions,
                     parse_pairs(args.embeddings, "--embeddings") if args.embeddings else {}, args.genes,
                     list(expressions), settings, args.out_dir)
        return
    if args.kind in FEATURE_KINDS:
        fit_feature_model(args.kind, parse_pairs(args.bundle, "--bundle"), expressions,
                          parse_pairs(args.embeddings, "--embeddings"), args.genes, list(expressions), settings,
                          args.out_dir)
        return
    spec = model_kind(args.kind)
    model = dict(settings.get("model") or {})
    encoder = model.pop("encoder", None)
    model = defaults.settings(spec.config or "model", model)
    if spec.encoder_weights:  # the encoder's settings in full: they identify the trained network
        model["encoder"] = {k: v for k, v in encoder_settings(encoder).items() if k in ENCODER_NETWORK_KEYS}
    fit_model(args.kind, parse_pairs(args.bundle, "--bundle"), expressions, args.genes, list(expressions),
              model, settings.get("train", {}), args.out_dir)


def embed(args) -> None:
    settings = parse_settings(args.settings)
    device = settings["device"] if "device" in settings else defaults.section("train")["device"]
    encoder = load_encoder(settings.get("encoder"), device)  # the one merge and check of the settings
    cfg = encoder.settings
    write_embeddings(encoder, args.bundle, args.out, sample=args.sample, tokens=bool(cfg["tokens"]),
                     batch_size=args.batch_size or cfg["batch_size"], progress=True)
    log.info("embeddings of %s written to %s", args.sample, args.out)


def evaluate(args) -> None:
    settings = parse_settings(args.settings)
    expressions = parse_pairs(args.expression, "--expression")
    evaluate_model(args.model, parse_pairs(args.bundle, "--bundle"), expressions, list(expressions), args.out_dir,
                   model_name=args.name, split=args.split, device=settings.get("device"),
                   batch_size=settings.get("batch_size"), workers=settings.get("workers", 0),
                   map_gene=settings.get("map_gene"), interval_level=settings.get("interval_level"),
                   interval_calibration=settings.get("interval_calibration"),
                   interval_depth=settings.get("interval_depth"),
                   embeddings=parse_pairs(args.embeddings, "--embeddings") if args.embeddings else None)


def predict(args) -> None:
    settings = parse_settings(args.settings)
    adata = predict_bundle(args.model, args.bundle, args.out, sample=args.sample,
                           device=settings.get("device"), batch_size=settings.get("batch_size"),
                           target_sum=settings.get("target_sum"), spot_diameter_um=settings.get("spot_diameter_um"),
                           interval_level=settings.get("interval_level"),
                           interval_calibration=settings.get("interval_calibration"))
    prediction_outputs(adata, args.png, args.geojson, settings.get("map_genes"), settings.get("n_map_genes"))


def predict_slide(args) -> None:
    out = predict_one_slide(args.slide, args.model, args.out_dir, sample=args.sample, mpp=args.mpp,
                            spacing_um=args.spacing_um, min_tissue_fraction=args.min_tissue_fraction,
                            batch_size=args.batch_size, workers=args.workers, device=args.device,
                            target_sum=args.target_sum, spot_diameter_um=args.spot_diameter_um,
                            genes=args.genes, n_genes=args.n_genes)
    log.info("predictions written to %s", out)


def model_info(args) -> None:
    print_variants(args.views, args.img_size, args.genes)
