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
EMBEDDINGS = "results/embeddings/{encoder}/{sample}.h5"  # the pretrained encoder's features of a bundle
EXPRESSION = "results/expression/{sample}.h5ad"
PREDICTION = "results/predictions/{sample}.h5ad"
PREDICTION_MAP = "results/predictions/{sample}.jpg"  # maps over the H&E are JPEG (m2ost.eval.figures)
PREDICTION_GEOJSON = "results/predictions/{sample}.geojson"  # QuPath

# Per cohort
DATA_SUMMARY = "results/qc/data_summary.tsv"  # one line per sample with expression: spots, library size, genes
DATA_SUMMARY_HTML = "results/qc/data_summary.html"  # the same, labelled, for the report

# Per split, and per model kind and split
PANEL = "results/genes/{split}.txt"
MODEL_DIR = "results/models/{model}/{split}"
EVALUATION_DIR = "results/metrics/{model}/{split}"
SUMMARY_TABLE = "results/metrics/summary.tsv"
SUMMARY_HTML = "results/metrics/summary.html"
SUMMARY_FIGURE = "results/metrics/per_gene_pcc.png"  # every model's per-gene PCC on every split

# Inside a model's folder (m2ost.learn.training.fit_on_views, m2ost.learn.training.trainer)
MODEL_FILE = "model.pt"
TRAINING_LOG = "log.csv"
CHECKPOINTS = "checkpoints"

# Inside an evaluation's folder (m2ost.learn.inference.heldout)
EVALUATION_SUMMARY = "summary.json"
EVALUATION_PREDICTIONS = "predictions.h5ad"
EVALUATION_PER_GENE = "per_gene"
EVALUATION_FIGURES = "figures"  # {sample}.maps.jpg, {sample}.genes.png (m2ost.eval.figures)
EVALUATION_QUPATH = "qupath"  # {sample}.geojson

MODEL = f"{MODEL_DIR}/{MODEL_FILE}"


def evaluation(part: str) -> str:
    """The pattern of one output of an evaluation (``summary``, ``predictions``, ``per_gene``,
    ``figures``, ``qupath``)."""
    names = {"summary": EVALUATION_SUMMARY, "predictions": EVALUATION_PREDICTIONS,
             "per_gene": EVALUATION_PER_GENE, "figures": EVALUATION_FIGURES, "qupath": EVALUATION_QUPATH}
    return f"{EVALUATION_DIR}/{names[part]}"


def per_sample(pattern: str, samples) -> list[str]:
    """``pattern`` filled for each sample."""
    return [pattern.format(sample=s) for s in samples]
