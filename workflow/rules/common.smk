# Sample sheet, splits and helpers shared by the rules; no stage logic lives here.
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

REPO = Path(workflow.basedir).resolve()
# The rules run `python -m m2ost` from the repository, so they work where the package is
# not installed (as under --use-conda).
sys.path.insert(0, str(REPO))

from m2ost.plan import outputs
from m2ost.plan.formats import slide_needs_conversion
from m2ost.plan.kinds import is_neural
from m2ost.plan.samplesheet import read_sample_sheet, sheet_rows
from m2ost.plan.settings import eval_settings, grid_settings, predict_settings, train_settings
from m2ost.plan.splits import make_splits

# Every shell command sees the repository's package, installed or not (as under --use-conda).
# (Braces doubled twice: once for this f-string, once for Snakemake's formatting of the command.)
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(str(REPO))}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
DATA_ROOT = config["data_root"]
SAMPLES = {s.sample: s for s in read_sample_sheet(config["samples"], DATA_ROOT)}
# The same check as the config's (the workflow catalog's convention); read_sample_sheet has already
# refused what it can name by line, so this mostly documents the columns.
for row in sheet_rows(config["samples"]):
    validate(row, "../schemas/samples.schema.yaml")
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


def _alternatives(names):
    return "|".join(sorted(names)) if names else "(?!x)x"


wildcard_constraints:
    sample=_alternatives(SAMPLES),
    split=_alternatives(list(SPLITS) + [PREDICT_SPLIT]),
    model=_alternatives(config["models"] + [config["predict"]["model"]]),


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
        inputs["spots"] = outputs.SPOTS.format(sample=wildcards.sample)
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


def train_launcher(wildcards):
    """``python``, or torchrun with one process per GPU for the neural models
    (launch.train_processes); m2ost.learn.trainer then trains with DistributedDataParallel."""
    n = config["launch"]["train_processes"]
    if not is_neural(wildcards.model) or n == 1:
        return "python"
    return f"python -m torch.distributed.run --standalone --nproc_per_node={n}"


def summary_files():
    summary = outputs.evaluation("summary")
    return [summary.format(model=m, split=s) for m in config["models"] for s in SPLITS]


def all_targets():
    targets = data_targets() + [outputs.SUMMARY_TABLE]
    targets += outputs.per_sample(outputs.PREDICTION, HE_SAMPLES)
    return targets
