"""Which settings reach each rule (standard library only).

Every setting reaches a rule through ``params:``, so a changed setting reruns exactly the jobs
that use it; these functions decide what each job gets from the (validated, default-filled)
workflow config.
"""

from __future__ import annotations

from collections.abc import Mapping

from m2ost.plan.kinds import model_kind

# The encoder settings a kind that fine-tunes the encoder is built from (m2ost.learn.features.finetune).
ENCODER_NETWORK_KEYS = ("name", "weights", "input_px", "mean", "std", "kwargs", "preset")


def train_settings(kind: str, config: Mapping) -> dict:
    """The ``--settings`` of a ``train`` job: only what the model kind uses, so changing a setting
    refits just the kinds it affects."""
    k = model_kind(kind)
    train = dict(config["train"])
    if k.train_keys is not None:
        train = {key: value for key, value in train.items() if key in k.train_keys}
    if k.neural:
        model = dict(config[k.config or "model"])
        if k.encoder_weights:  # what defines the encoder and its input, not how embeddings are stored
            model["encoder"] = {key: config["encoder"][key] for key in ENCODER_NETWORK_KEYS}
        return {"model": model, "train": train}
    if k.family == "feature":  # the encoder that made its features (not how they were batched or stored)
        skip = ("tokens", "batch_size") + (() if k.input == "tokens" else ("token_levels", "token_grid"))
        out = {"train": train, "encoder": {key: value for key, value in config["encoder"].items()
                                           if key not in skip}}
        if k.config:
            out["model"] = dict(config[k.config])
        return out
    if k.config:  # the ensemble: its members and grid
        return {"model": dict(config[k.config]), "train": train}
    return {"train": train}


def eval_batch_size(train: Mapping) -> int:
    """Spots per inference batch when scoring: ``eval_batch_size``, or twice the training batch."""
    return int(train["eval_batch_size"]) or 2 * int(train["batch_size"])


def interval_settings(config: Mapping) -> dict:
    """The prediction intervals' level and calibration (evaluate and predict jobs)."""
    return {"interval_level": config["intervals"]["level"],
            "interval_calibration": config["intervals"]["calibration"]}


def eval_settings(config: Mapping) -> dict:
    """The ``--settings`` of an ``evaluate`` job."""
    return {"device": config["train"]["device"], "batch_size": eval_batch_size(config["train"]),
            "map_gene": config["evaluate"]["map_gene"], **interval_settings(config)}


def predict_settings(config: Mapping) -> dict:
    """The ``--settings`` of a ``predict`` job (H&E-only slides): inference, the unit of the
    expression stage, and what the maps and the GeoJSON draw."""
    predict = config["predict"]
    return {"device": config["train"]["device"], "batch_size": predict["batch_size"],
            "target_sum": config["expression"]["target_sum"],
            **{key: predict[key] for key in ("spot_diameter_um", "map_genes", "n_map_genes")},
            **interval_settings(config)}


def grid_settings(config: Mapping) -> dict:
    """The ``--settings`` of a ``grid_spots`` job (the spot grid of an H&E-only slide)."""
    return {key: config["predict"][key] for key in ("spot_spacing_um", "min_tissue_fraction")}


def tile_settings(config: Mapping) -> dict:
    """The ``--settings`` of a ``tile`` job: the views, and how coarse a slide may be for them."""
    return {"views": config["views"], **{key: config["tiling"][key] for key in ("max_upscale", "allow_upscale")}}


def prepare_settings(config: Mapping) -> dict:
    """The ``--settings`` of a ``prepare_slide`` job: the plausible range of µm per pixel."""
    return {"mpp_range": config["slides"]["mpp_range"]}
