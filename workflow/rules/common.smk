# Sample sheet, splits and helpers shared by the rules; no stage logic lives here.
import json
import shlex
import sys
from pathlib import Path

REPO = Path(workflow.basedir).resolve()
# The rules run `python -m m2ost` from the repository, so they work where the package is
# not installed (as under --use-conda).
sys.path.insert(0, str(REPO))

from m2ost.samplesheet import read_sample_sheet
from m2ost.slide import slide_needs_conversion
from m2ost.splits import make_splits


M2OST = f"PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}} python -m m2ost"
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
    return bundle_files(SAMPLES if not HE_SAMPLES else ST_SAMPLES) + expression_files(ST_SAMPLES)
