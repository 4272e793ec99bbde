"""Which settings reach each rule (standard library only).

Every setting reaches a rule through ``params:``, so a changed setting reruns exactly the jobs
that use it. Each rule's params are built here, by one function of the (validated,
default-filled) workflow config, and :data:`READS` / :func:`train_reads` declare the config keys
each one reads (a section name: all its keys). ``tests/test_plan_settings.py`` changes every key
of the schema in turn and checks that exactly the jobs declaring it get other params.

Keys that no rule's params read, and why, are in :data:`PLAN_KEYS` (they decide which jobs
exist, their inputs or their resources, not what a job computes from its inputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from m2ost.plan.kinds import ALL_KINDS, model_kind, needs_tokens, uses_kinds

# The encoder settings, in three subsets (each a superset of the one before):
# what builds the network and its input (the kind that fine-tunes the encoder reads these),
ENCODER_NETWORK_KEYS = ("name", "weights", "input_px", "mean", "std", "kwargs", "preset")
# what changes the pooled features (the pooled feature kinds read these),
ENCODER_POOLED_KEYS = ENCODER_NETWORK_KEYS + ("tta", "levels", "pool")
# and what changes the token grids too (m2ost_encoder reads these; the record of every embeddings
# file and feature model holds them).
ENCODER_TOKEN_KEYS = ("token_levels", "token_grid")
ENCODER_FEATURE_KEYS = ENCODER_POOLED_KEYS + ENCODER_TOKEN_KEYS
# The embed stage reads the whole section (mpp: a warning; tokens, batch_size: what is stored, how fast).

# Config keys that reach no job's params: they decide which jobs exist, where the files are,
# or a job's resources.
PLAN_KEYS = {
    "samples": "the sample sheet: which samples exist (its rows reach the jobs as inputs)",
    "data_root": "where the sheet's relative paths point (the jobs' input files; the demo's output folder)",
    "demo.enabled": "whether the demo_cohort rule exists",
    "splits": "which splits exist and the samples of each (the jobs' inputs)",
    "models": "which kinds are trained and scored (with those of predict.model and ensemble.members, "
              "whether the embed stage stores the token grids)",
    "predict.model": "the kind trained on all samples to predict the H&E-only slides",
    "predict.model_path": "a model trained elsewhere: an input of predict, and no training",
    "tiling.threads": "the tile jobs' threads (the result does not depend on them)",
}


def _pick(section: Mapping, keys) -> dict:
    return {key: section[key] for key in keys}


def encoder_reads(keys) -> tuple[str, ...]:
    return tuple(f"encoder.{key}" for key in keys)


def train_reads(kind: str) -> tuple[str, ...]:
    """The config keys the ``train`` job of model kind ``kind`` reads (its params)."""
    k = model_kind(kind)
    train = ("train",) if k.train_keys is None else tuple(f"train.{key}" for key in k.train_keys)
    if k.neural:
        encoder = encoder_reads(ENCODER_NETWORK_KEYS) if k.encoder_weights else ()
        return train + (k.config or "model",) + encoder + ("launch.train_processes",)
    if k.family == "feature":
        encoder = encoder_reads(ENCODER_FEATURE_KEYS if k.input == "tokens" else ENCODER_POOLED_KEYS)
        return train + encoder + ((k.config,) if k.config else ())
    return train + ((k.config,) if k.config else ())


def train_settings(kind: str, config: Mapping) -> dict:
    """The ``--settings`` of a ``train`` job: only what the model kind uses, so changing a setting
    refits just the kinds it affects."""
    k = model_kind(kind)
    train = dict(config["train"]) if k.train_keys is None else _pick(config["train"], k.train_keys)
    if k.neural:
        model = dict(config[k.config or "model"])
        if k.encoder_weights:  # what defines the encoder and its input, not how embeddings are stored
            model["encoder"] = _pick(config["encoder"], ENCODER_NETWORK_KEYS)
        return {"model": model, "train": train}
    if k.family == "feature":  # the encoder that made its features (not how they were batched or stored)
        keys = ENCODER_FEATURE_KEYS if k.input == "tokens" else ENCODER_POOLED_KEYS
        out = {"train": train, "encoder": _pick(config["encoder"], keys)}
        if k.config:
            out["model"] = dict(config[k.config])
        return out
    if k.config:  # the ensemble: its members and grid
        return {"model": dict(config[k.config]), "train": train}
    return {"train": train}


def train_launcher(kind: str, config: Mapping) -> str:
    """``python``, or torchrun with one process per GPU for the neural kinds
    (launch.train_processes); m2ost.learn.training.trainer then trains with DistributedDataParallel."""
    n = config["launch"]["train_processes"]
    if not model_kind(kind).neural or n == 1:
        return "python"
    return f"python -m torch.distributed.run --standalone --nproc_per_node={n}"


def embed_settings(config: Mapping) -> dict:
    """The ``--settings`` of an ``embed`` job: the encoder section, the token grids stored when a
    selected model reads them, and the device."""
    encoder = dict(config["encoder"])
    used = uses_kinds(list(config["models"]) + [config["predict"]["model"]], config)
    encoder["tokens"] = bool(encoder["tokens"]) or needs_tokens(used)
    return {"encoder": encoder, "device": config["train"]["device"]}


def eval_batch_size(train: Mapping) -> int:
    """Spots per inference batch when scoring: ``eval_batch_size``, or twice the training batch."""
    return int(train["eval_batch_size"]) or 2 * int(train["batch_size"])


def interval_settings(config: Mapping) -> dict:
    """The prediction intervals' level and calibration (evaluate and predict jobs)."""
    return {"interval_level": config["intervals"]["level"],
            "interval_calibration": config["intervals"]["calibration"]}


def eval_settings(config: Mapping) -> dict:
    """The ``--settings`` of an ``evaluate`` job (the intervals at the held-out spots' depths)."""
    return {"device": config["train"]["device"], "batch_size": eval_batch_size(config["train"]),
            "map_gene": config["evaluate"]["map_gene"], **interval_settings(config),
            "interval_depth": config["intervals"]["depth"]}


def predict_settings(config: Mapping) -> dict:
    """The ``--settings`` of a ``predict`` job (H&E-only slides): inference, the unit of the
    expression stage, and what the maps and the GeoJSON draw."""
    predict = config["predict"]
    return {"device": config["train"]["device"], "batch_size": predict["batch_size"],
            "target_sum": config["expression"]["target_sum"],
            **_pick(predict, ("spot_diameter_um", "map_genes", "n_map_genes")),
            **interval_settings(config)}


def grid_settings(config: Mapping) -> dict:
    """The ``--settings`` of a ``grid_spots`` job (the spot grid of an H&E-only slide)."""
    return _pick(config["predict"], ("spot_spacing_um", "min_tissue_fraction"))


def tile_settings(config: Mapping) -> dict:
    """The ``--settings`` of a ``tile`` job: the views, and how coarse a slide may be for them."""
    return {"views": config["views"], **_pick(config["tiling"], ("max_upscale", "allow_upscale"))}


def prepare_settings(config: Mapping) -> dict:
    """The ``--settings`` of a ``prepare_slide`` job: the plausible range of µm per pixel."""
    return _pick(config["slides"], ("mpp_range",))


def convert_settings(config: Mapping) -> dict:
    """The ``--settings`` of a ``convert_slide`` job: the pyramid's tiles and the µm/px range."""
    return dict(config["slides"])


def array_pitch_um(config: Mapping, sheet_pitch: float | None) -> float:
    """The array pitch of a sample (``--array-pitch-um`` of its spots, prepare_slide and
    convert_slide jobs): the sheet's, else ``spots.array_pitch_um`` (0: the platform's)."""
    return sheet_pitch or config["spots"]["array_pitch_um"]


def spots_flag(config: Mapping) -> str:
    """The flag of a ``spots`` job: off-tissue spots kept or not."""
    return "" if config["spots"]["in_tissue_only"] else "--keep-off-tissue"


def expression_settings(config: Mapping) -> dict:
    """The ``--settings`` of an ``expression`` job (QC and normalisation)."""
    return _pick(config["expression"], ("min_counts", "target_sum"))


def data_summary_settings(config: Mapping) -> dict:
    """The settings of the ``data_summary`` job (the low-library warning)."""
    return _pick(config["expression"], ("low_library_fraction",))


def panel_settings(config: Mapping) -> dict:
    """The ``--settings`` of a ``panel`` job; the gene list file resolved against data_root."""
    panel = dict(config["panel"])
    if panel["list_file"]:
        panel["list_file"] = str(Path(config["data_root"]) / panel["list_file"])
    return panel


def demo_settings(config: Mapping) -> dict:
    """The ``--settings`` of the ``demo_cohort`` job (its seed included)."""
    return {key: value for key, value in config["demo"].items() if key != "enabled"}


# rule -> (its params' settings from the config, the config keys it reads); ``train``'s depend on
# the model kind (:func:`train_settings`, :func:`train_reads`).
_SPOTS = ("spots.array_pitch_um",)
READS = {
    "demo_cohort": (demo_settings, ("demo.seed", "demo.n_patients", "demo.slides_per_patient", "demo.n_genes",
                                    "demo.slide_um")),
    "spots": (lambda c: {"flag": spots_flag(c), "pitch": array_pitch_um(c, None)},
              ("spots.in_tissue_only",) + _SPOTS),
    "prepare_slide": (lambda c: {**prepare_settings(c), "pitch": array_pitch_um(c, None)},
                      ("slides.mpp_range",) + _SPOTS),
    "convert_slide": (lambda c: {**convert_settings(c), "pitch": array_pitch_um(c, None)}, ("slides",) + _SPOTS),
    "tile": (tile_settings, ("views", "tiling.max_upscale", "tiling.allow_upscale")),
    "expression": (expression_settings, ("expression.min_counts", "expression.target_sum")),
    "data_summary": (data_summary_settings, ("expression.low_library_fraction",)),
    "panel": (panel_settings, ("panel", "data_root")),
    "embed": (embed_settings, ("encoder", "train.device")),
    "evaluate": (eval_settings, ("train.device", "train.eval_batch_size", "train.batch_size", "evaluate.map_gene",
                                 "intervals")),
    "grid_spots": (grid_settings, ("predict.spot_spacing_um", "predict.min_tissue_fraction")),
    "predict": (predict_settings, ("train.device", "predict.batch_size", "expression.target_sum",
                                   "predict.spot_diameter_um", "predict.map_genes", "predict.n_map_genes",
                                   "intervals.level", "intervals.calibration")),
}


def job_settings(config: Mapping) -> dict[str, dict]:
    """The settings of every rule's jobs, ``train`` once per model kind (``train[KIND]``), from
    the functions above: what a config change reruns."""
    out = {rule: build(config) for rule, (build, _) in READS.items()}
    for kind in ALL_KINDS:
        out[f"train[{kind}]"] = {"settings": train_settings(kind, config), "launcher": train_launcher(kind, config)}
    return out


def job_reads() -> dict[str, tuple[str, ...]]:
    """The config keys each job of :func:`job_settings` declares it reads."""
    out = {rule: reads for rule, (_, reads) in READS.items()}
    out.update({f"train[{kind}]": train_reads(kind) for kind in ALL_KINDS})
    return out
