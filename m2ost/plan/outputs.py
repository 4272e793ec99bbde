"""Where the workflow writes: every output path pattern, written once (standard library only).

The rules take their ``output:`` (and the inputs of later rules) from here; the package uses the
names of the files it writes inside a folder (a model's, an evaluation's). Patterns use the
rules' wildcards: ``{sample}``, ``{split}``, ``{model}``.
"""

from __future__ import annotations

# Per sample
SLIDE_INFO = "results/slides/{sample}.json"
PYRAMID = "results/slides/{sample}.tif"  # plain images converted to a pyramidal TIFF
SPOTS = "results/spots/{sample}.tsv"
BUNDLE = "results/bundles/{sample}.h5"
EXPRESSION = "results/expression/{sample}.h5ad"
PREDICTION = "results/predictions/{sample}.h5ad"
PREDICTION_MAP = "results/predictions/{sample}.png"

# Per split, and per model kind and split
PANEL = "results/genes/{split}.txt"
MODEL_DIR = "results/models/{model}/{split}"
EVALUATION_DIR = "results/metrics/{model}/{split}"
SUMMARY_TABLE = "results/metrics/summary.tsv"

# Inside a model's folder (m2ost.learn.fit, m2ost.learn.trainer)
MODEL_FILE = "model.pt"
TRAINING_LOG = "log.csv"
CHECKPOINTS = "checkpoints"

# Inside an evaluation's folder (m2ost.learn.evaluate)
EVALUATION_SUMMARY = "summary.json"
EVALUATION_PREDICTIONS = "predictions.h5ad"
EVALUATION_PER_GENE = "per_gene"
EVALUATION_FIGURES = "figures"

MODEL = f"{MODEL_DIR}/{MODEL_FILE}"


def evaluation(part: str) -> str:
    """The pattern of one output of an evaluation (``summary``, ``predictions``, ``per_gene``,
    ``figures``)."""
    names = {"summary": EVALUATION_SUMMARY, "predictions": EVALUATION_PREDICTIONS,
             "per_gene": EVALUATION_PER_GENE, "figures": EVALUATION_FIGURES}
    return f"{EVALUATION_DIR}/{names[part]}"


def per_sample(pattern: str, samples) -> list[str]:
    """``pattern`` filled for each sample."""
    return [pattern.format(sample=s) for s in samples]
