"""Score the feature models from cached embeddings, without the workflow's evaluation stage.

The workflow evaluates a feature model by encoding the held-out views on the fly (what predicts
new slides); this script reads the held-out sample's cached embeddings instead, which gives the
same predictions up to float rounding in seconds instead of minutes. Use it to compare encoders
or view sizes quickly; quote the workflow's ``results/metrics/summary.tsv`` as the result.

    python benchmarks/feature_probe.py --workdir results/her2 --splits benchmarks/her2st_cpu.yaml \
        --kinds encoder_ridge encoder_ridge_v0

``--workdir`` is a workflow run that has ``results/{bundles,expression,genes,embeddings}``.
Prints one line per kind and split (mean per-gene PCC over the held-out samples) and the means.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import load_average

from m2ost.data.panel import read_gene_list
from m2ost.eval.metrics import score
from m2ost.learn.inputs.dataset import load_sample
from m2ost.learn.features.embeddings import read_embeddings
from m2ost.learn.features.probes import FEATURE_MODELS
from m2ost.learn.features.fit_on_embeddings import fit_feature_model
from m2ost.learn.inference.predictor import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--splits", required=True, type=Path, help="a config with splits.explicit")
    p.add_argument("--kinds", nargs="+", default=list(FEATURE_MODELS))
    p.add_argument("--encoder", default="tf_efficientnet_lite0", help="embeddings folder")
    p.add_argument("--only", nargs="*", help="split names to run (default all)")
    args = p.parse_args()
    res = args.workdir / "results"
    splits = yaml.safe_load(args.splits.read_text())["splits"]["explicit"]
    print(f"load average at start: {load_average()}")
    scores: dict[str, list[float]] = {k: [] for k in args.kinds}
    for name, split in splits.items():
        if args.only and name not in args.only:
            continue
        samples = split["train"] + split["test"]
        bundles = {s: str(res / f"bundles/{s}.h5") for s in samples}
        expressions = {s: str(res / f"expression/{s}.h5ad") for s in samples}
        embeddings = {s: str(res / f"embeddings/{args.encoder}/{s}.h5") for s in samples}
        genes_file = str(res / f"genes/{name}.txt")
        genes = read_gene_list(genes_file)
        for kind in args.kinds:
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                fitted = fit_feature_model(kind, bundles, expressions, embeddings, genes_file, split["train"],
                                           {"train": {"seed": 0, "val_fraction": 0.1}}, tmp)
                model = load_model(Path(tmp) / "model.pt", "cpu")
            per_sample = []
            for s in split["test"]:
                data = load_sample(bundles[s], expressions[s], genes, model.views, sample=s, verify=False)
                x = read_embeddings(embeddings[s], s, rows=data.rows).pooled[:, model.views]
                _, summary = score(data.targets, model.impl.model.predict(x), genes, sample=s)
                per_sample.append(summary["gene_pcc_mean"])
            scores[kind].append(float(np.mean(per_sample)))
            print(f"{kind:18s} {name:8s} gene PCC {scores[kind][-1]:.4f}  (validation {fitted['val_gene_pcc']:.4f}, "
                  f"{time.time() - t0:.1f} s)", flush=True)
    for kind, values in scores.items():
        print(f"{kind:18s} mean over {len(values)} splits: {np.mean(values):.4f}")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
