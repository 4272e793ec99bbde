"""Which interval depth rule holds on a section no model saw, chosen inside the training sections.

The validation spots of a training section cannot show how a new section is covered: the model
trained on that section. This check refits a cheap model kind (the encoder probes, ``ridge``,
``mean``) without one training section at a time, on the split's own gene panel and on the
workflow's cached bundles, expression files and embeddings, and scores the prediction intervals
on every spot of the left-out section: once at the training sections' depths
(``intervals.depth: training``), once at each spot's own library size (``measured``), and their
union (the wider of both bounds). Only the split's training sections are used: its held-out
sections stay unseen, so the rule can be chosen on this.

    python benchmarks/interval_nested_check.py --results results --genes results/genes/loso-C2.txt \\
        --train B4 C3 C4 C5 --kind encoder_ridge [--out /tmp/nested]

Prints, per left-out section: its spots, its median library size against the others', and the
coverage (mean over genes) and mean width of each rule; then the means over the sections.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import anndata
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2ost import defaults  # noqa: E402
from m2ost.eval.intervals import interval_scores, intervals  # noqa: E402
from m2ost.learn.features.fit_on_embeddings import fit_feature_model  # noqa: E402
from m2ost.plan.kinds import FEATURE_KINDS  # noqa: E402
from m2ost.learn.inference.heldout import evaluate  # noqa: E402
from m2ost.learn.inference.predictor import load_model  # noqa: E402
from m2ost.learn.training.calibration import calibration_of  # noqa: E402
from m2ost.learn.training.fit_on_views import fit_model  # noqa: E402

RULES = ("training", "measured", "union")


def paths(results: Path, samples, encoder: str) -> tuple[dict, dict, dict]:
    """Bundles, expression files and embeddings of the workflow's results folder."""
    return ({s: str(results / "bundles" / f"{s}.h5") for s in samples},
            {s: str(results / "expression" / f"{s}.h5ad") for s in samples},
            {s: str(results / "embeddings" / encoder / f"{s}.h5") for s in samples})


def fit(kind: str, files: tuple, genes: str, train: list[str], out: Path) -> Path:
    """``out/model.pt`` of ``kind`` fitted on ``train`` (kept from an earlier run into ``out``)."""
    if (out / "model.pt").exists():
        return out / "model.pt"
    bundles, expressions, embeddings = files
    if kind in FEATURE_KINDS:
        fit_feature_model(kind, bundles, expressions, embeddings, genes, train, {"train": {}}, out)
    else:
        fit_model(kind, bundles, expressions, genes, train, None, {}, out)
    return out / "model.pt"


def rule_scores(model: Path, predictions: Path, level: float, calibration: str) -> dict:
    """Coverage and width of each rule on the evaluated spots (predictions.h5ad, training depth)."""
    adata = anndata.read_h5ad(predictions)
    state = calibration_of(load_model(model, "cpu").meta)
    pred, truth = np.asarray(adata.X), np.asarray(adata.layers["measured"])
    bounds = {"training": intervals(state, pred, level, calibration),
              "measured": intervals(state, pred, level, calibration, adata.obs["total_counts"].to_numpy())}
    bounds["union"] = (np.minimum(bounds["training"][0], bounds["measured"][0]),
                       np.maximum(bounds["training"][1], bounds["measured"][1]))
    return {r: interval_scores(truth, *bounds[r]) for r in RULES}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"), help="the workflow's results folder")
    parser.add_argument("--genes", required=True, help="the split's gene panel (results/genes/{split}.txt)")
    parser.add_argument("--train", nargs="+", required=True, help="the split's training sections")
    parser.add_argument("--kind", default="encoder_ridge", help="a cheap model kind (probes, ridge, mean)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the refitted models go (a temporary folder); models found there are reused")
    workflow = defaults.section("intervals")
    parser.add_argument("--level", type=float, default=workflow["level"])
    parser.add_argument("--calibration", default=workflow["calibration"])
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="nested-"))
    files = paths(args.results, args.train, defaults.section("encoder")["name"])
    print(f"load average {os.getloadavg()[0]:.1f}; {args.kind}, level {args.level}, calibration {args.calibration}")
    print("left out\tspots\tdepth / others'\t" + "\t".join(f"coverage {r}\twidth {r}" for r in RULES))
    rows = []
    for s in args.train:
        rest = [t for t in args.train if t != s]
        model = fit(args.kind, files, args.genes, rest, out / s)
        ev = evaluate(model, *files[:2], [s], out / s / "ev", embeddings=files[2], figures=False,
                      interval_depth="training", interval_level=args.level, interval_calibration=args.calibration)
        scores = rule_scores(model, out / s / "ev" / "predictions.h5ad", args.level, args.calibration)
        depth = anndata.read_h5ad(files[1][s]).obs["total_counts"].median()
        others = np.median([anndata.read_h5ad(files[1][t]).obs["total_counts"].median() for t in rest])
        rows.append(scores)
        print(f"{s}\t{ev['n_spots']}\t{depth / others:.3f}\t" + "\t".join(
            f"{scores[r]['interval_coverage']:.3f}\t{scores[r]['interval_width']:.2f}" for r in RULES), flush=True)
    print("mean\t\t\t" + "\t".join(f"{np.mean([x[r]['interval_coverage'] for x in rows]):.3f}\t"
                                   f"{np.mean([x[r]['interval_width'] for x in rows]):.2f}" for r in RULES))


if __name__ == "__main__":
    main()
