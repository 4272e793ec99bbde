"""Parsers of the model subcommands (torch environment)."""

from __future__ import annotations

from m2ost.cli.options import add_command
from m2ost.plan.kinds import KINDS

RUN = "m2ost.cli.run_learn"
WORKFLOW = "(default: the workflow's, from the config schema)"


def add_parsers(sub) -> None:
    for add in (_add_train, _add_embed, _add_evaluate, _add_predict, _add_predict_slide, _add_model_info):
        add(sub)


def _add_train(sub) -> None:
    p = add_command(sub, "train", f"{RUN}:train", f"fit a model ({', '.join(KINDS)}) on training samples")
    p.add_argument("--kind", required=True, choices=list(KINDS), help="model kind")
    p.add_argument("--bundle", nargs="+", required=True, metavar="SAMPLE=H5", help="bundles of the training samples")
    p.add_argument("--expression", nargs="+", required=True, metavar="SAMPLE=H5AD",
                   help="expression of the training samples")
    p.add_argument("--embeddings", nargs="+", metavar="SAMPLE=H5",
                   help="embeddings of the training samples (feature kinds: encoder_ridge, ...)")
    p.add_argument("--members", nargs="+", metavar="KIND=MODEL.PT",
                   help="ensemble: its members' model.pt files, trained on the same split")
    p.add_argument("--genes", required=True, help="gene panel file")
    p.add_argument("--settings",
                   help='JSON: {"model": {...}, "train": {...}, "encoder": {...}} (default: the workflow\'s)')
    p.add_argument("--out-dir", required=True, help="folder of model.pt, log.csv and checkpoints")
    p.add_argument("--restart-stale-checkpoint", action="store_true",
                   help="a checkpoint of another run in --out-dir (other settings or data) is deleted and "
                        "training starts over, instead of an error (the workflow's train rule: a changed "
                        "setting reruns the job in the same folder); a checkpoint of this run still resumes")


def _add_embed(sub) -> None:
    p = add_command(sub, "embed", f"{RUN}:embed", "pretrained-encoder features of every spot and view of a bundle")
    p.add_argument("--bundle", required=True, help="bundle of the sample")
    p.add_argument("--sample", required=True, help="sample name")
    p.add_argument("--settings", help='JSON: {"encoder": {...}, "device": "auto"} (encoder: the config section)')
    p.add_argument("--batch-size", type=int, help="spots per encoder batch (default: encoder.batch_size; "
                   "0 or auto there: sized from the free memory)")
    p.add_argument("--out", required=True, help="embeddings file (.h5)")


def _add_evaluate(sub) -> None:
    p = add_command(sub, "evaluate", f"{RUN}:evaluate", "score a model on held-out samples (per-gene Pearson first)")
    p.add_argument("--model", required=True, help="model.pt")
    p.add_argument("--bundle", nargs="+", required=True, metavar="SAMPLE=H5", help="bundles of the held-out samples")
    p.add_argument("--expression", nargs="+", required=True, metavar="SAMPLE=H5AD",
                   help="expression of the held-out samples")
    p.add_argument("--embeddings", nargs="+", metavar="SAMPLE=H5",
                   help="feature kinds: cached embeddings of the held-out samples (else the views are encoded)")
    p.add_argument("--name", help="model name in the summary (default: the model kind)")
    p.add_argument("--split", help="split name in the summary")
    p.add_argument("--settings", help=f"JSON: device, batch_size, workers, map_gene (a gene mapped besides the "
                   f"best and the median one) {WORKFLOW}")
    p.add_argument("--out-dir", required=True, help="folder of summary.json, per_gene/, figures/, predictions.h5ad")


def _add_predict(sub) -> None:
    p = add_command(sub, "predict", f"{RUN}:predict", "predict every spot of a bundle (an H&E-only slide)")
    p.add_argument("--model", required=True, help="model.pt")
    p.add_argument("--bundle", required=True, help="bundle of the slide")
    p.add_argument("--sample", required=True, help="sample name")
    p.add_argument("--settings", help="JSON: device, batch_size, target_sum (the expression stage's, for the unit), "
                   f"spot_diameter_um, map_genes, n_map_genes {WORKFLOW}")
    p.add_argument("--png", help="also draw maps over the H&E, JPEG or PNG by the extension (map_genes, else the "
                   "n_map_genes most variable)")
    p.add_argument("--geojson", help="also write the spots with their predictions for QuPath (GeoJSON)")
    p.add_argument("--out", required=True, help="predictions (h5ad)")


def _add_predict_slide(sub) -> None:
    p = add_command(sub, "predict-slide", f"{RUN}:predict_slide",
                    "predict expression maps for any slide in one call (prepare, grid, tile, predict, map)")
    p.add_argument("--slide", required=True, help="the H&E slide")
    p.add_argument("--model", required=True, help="model.pt from the training stage")
    p.add_argument("--sample", help="name used for the outputs (default: the file name)")
    p.add_argument("--mpp", type=float, help="µm per pixel when the slide has no resolution metadata")
    p.add_argument("--spacing-um", type=float, help=f"spot grid spacing, µm {WORKFLOW}")
    p.add_argument("--min-tissue-fraction", type=float, help=f"tissue needed under a grid spot {WORKFLOW}")
    p.add_argument("--batch-size", type=int, help=f"spots per inference batch {WORKFLOW}")
    p.add_argument("--workers", type=int, default=1, help="tiling processes")
    p.add_argument("--device", help=f"auto, cpu, cuda or cuda:N {WORKFLOW}")
    p.add_argument("--target-sum", type=float,
                   help=f"the expression stage's target_sum the model was trained with (sets the unit) {WORKFLOW}")
    p.add_argument("--spot-diameter-um", type=float,
                   help=f"spot size of the maps, GeoJSON and uns['spatial'] (Visium 55, legacy ST 100) {WORKFLOW}")
    p.add_argument("--genes", nargs="+", help=f"genes to map; without it, the --n-genes most variable {WORKFLOW}")
    p.add_argument("--n-genes", type=int, help=f"how many most variable genes to map without --genes {WORKFLOW}")
    p.add_argument("--out-dir", required=True,
                   help="folder of {sample}.h5ad, {sample}.jpg, {sample}.geojson and work/")


def _add_model_info(sub) -> None:
    p = add_command(sub, "model-info", f"{RUN}:model_info", "parameters and FLOPs of every model variant")
    p.add_argument("--views", type=int, default=3, help="number of views")
    p.add_argument("--img-size", type=int, default=224, help="view size, px")
    p.add_argument("--genes", type=int, default=250, help="panel size")
