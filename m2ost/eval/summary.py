"""The summary table: one row per (model, split) from the ``summary.json`` files, and their means."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from m2ost.atomic import atomic_path
from m2ost.errors import InputError
from m2ost.eval.intervals import INTERVAL_METRICS
from m2ost.eval.metrics import TOP_K

# The gene_pcc columns average the genes whose Pearson r is defined (n_genes_defined of them);
# NaN ("undefined"), e.g. for a constant predictor, where no gene has one. interval_*: coverage
# of the prediction intervals on the held-out spots (mean over genes, the 10th percentile over
# genes) and their mean width (m2ost.eval.intervals.interval_scores).
SUMMARY_METRICS = ("gene_pcc_mean", "n_genes_defined", "gene_pcc_median", f"gene_pcc_top{TOP_K}",
                   "spot_pcc_paper", "rmse", "mae", *INTERVAL_METRICS)



def jsonable(obj):
    """NaN -> None, so that summary.json is strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def aggregate(summary_files: Sequence[str | os.PathLike],
              out_tsv: str | os.PathLike) -> pd.DataFrame:
    """One row per (model, split) from ``summary.json`` files, then one ``mean`` row per model.

    A split's row holds the mean over its held-out samples; a model's ``mean`` row holds the
    mean over its splits (each split weighs the same) and the total number of spots.
    """
    rows = []
    for path in summary_files:
        try:
            s = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read evaluation summary ({err})", file=path) from None
        row = {"model": s["model"], "kind": s["kind"], "split": s["split"],
               "test_samples": ",".join(s["test_samples"]), "n_spots": s["n_spots"],
               "n_genes": s["n_genes"]}
        row.update({k: (np.nan if s["mean"].get(k) is None else s["mean"][k])
                    for k in SUMMARY_METRICS})
        rows.append(row)
    table = pd.DataFrame(rows, columns=["model", "kind", "split", "test_samples", "n_spots",
                                        "n_genes", *SUMMARY_METRICS])
    table = table.sort_values(["model", "split"], kind="stable")
    out = []
    for model, group in table.groupby("model", sort=True):
        out.append(group)
        mean = {"model": model, "kind": group["kind"].iloc[0], "split": "mean",
                "test_samples": f"{len(group)} splits", "n_spots": int(group["n_spots"].sum()),
                "n_genes": group["n_genes"].iloc[0]}
        mean.update({k: group[k].mean() for k in SUMMARY_METRICS})
        out.append(pd.DataFrame([mean]))
    result = pd.concat(out, ignore_index=True) if out else table
    with atomic_path(out_tsv) as tmp:
        result.to_csv(tmp, sep="\t", index=False, float_format="%.4f", na_rep="NaN")
    return result



def per_gene_scores(summary_files: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Per-gene Pearson r of every (model, split, held-out sample): model, split, sample, gene, pcc.

    Read from the ``per_gene/{sample}.tsv`` files beside each ``summary.json``.
    """
    frames = []
    for path in summary_files:
        s = json.loads(Path(path).read_text())
        for sample in s["test_samples"]:
            table = Path(path).parent / "per_gene" / f"{sample}.tsv"
            try:
                scores = pd.read_csv(table, sep="\t", usecols=["gene", "pcc"])
            except (OSError, ValueError, pd.errors.ParserError) as err:
                raise InputError(f"cannot read per-gene scores ({err})".splitlines()[0], file=table,
                                 sample=sample) from None
            frames.append(scores.assign(model=s["model"], split=s["split"], sample=sample))
    columns = ["model", "split", "sample", "gene", "pcc"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
