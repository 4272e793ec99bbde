"""Metrics against hand-computed values; evaluation files and aggregation."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from m2ost.errors import InputError
from m2ost.eval.metrics import gene_pcc, score, spot_pcc

R_HAND = 3 / math.sqrt(2 * 14 / 3)  # x = 1,2,3 vs y = 1,2,4: sum(xc*yc)=3, sxx=2, syy=14/3


def _four_genes():
    """3 spots x 4 genes: r = R_HAND, r = -1, truth constant, prediction constant."""
    truth = np.array([[1, 1, 0, 1], [2, 2, 0, 2], [3, 3, 0, 3]], dtype=float)
    pred = np.array([[1, 3, 1, 5], [2, 2, 2, 5], [4, 1, 3, 5]], dtype=float)
    return truth, pred


def test_gene_pcc_hand_values_and_undefined():
    truth, pred = _four_genes()
    r = gene_pcc(truth, pred)
    assert r[0] == pytest.approx(R_HAND, abs=1e-12)
    assert r[1] == pytest.approx(-1.0, abs=1e-12)
    assert np.isnan(r[2])  # zero variance in truth: undefined
    assert r[3] == 0.0  # while training: a constant prediction of a varying gene scores 0


def test_score_summary_hand_values():
    truth, pred = _four_genes()
    per_gene, s = score(truth, pred, ["a", "b", "c", "d"], sample="S1")
    assert list(per_gene.columns) == ["gene", "pcc", "defined", "rmse", "mae", "mean_true",
                                      "mean_pred"]
    # the evaluation: r is undefined where the truth (c) or the prediction (d) is constant
    assert per_gene["defined"].tolist() == [True, True, False, False]
    assert per_gene["pcc"].isna().tolist() == [False, False, True, True]
    assert s["n_genes_defined"] == 2 and s["n_genes_undefined"] == 2
    assert s["gene_pcc_mean"] == pytest.approx((R_HAND - 1) / 2)
    assert s["gene_pcc_median"] == pytest.approx((R_HAND - 1) / 2)
    assert s["gene_pcc_top50"] == pytest.approx((R_HAND - 1) / 2) and s["top_k_used"] == 2
    err = pred - truth
    assert s["rmse"] == pytest.approx(math.sqrt((err ** 2).mean()))
    assert s["mae"] == pytest.approx(np.abs(err).mean())
    # gene a: errors 0, 0, 1 -> rmse sqrt(1/3), mae 1/3
    assert per_gene.loc[0, "rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert per_gene.loc[0, "mae"] == pytest.approx(1 / 3)
    assert per_gene.loc[0, "mean_pred"] == pytest.approx(7 / 3)


def test_spot_pcc_hand_value():
    truth = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    pred = np.array([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    r = spot_pcc(truth, pred)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and np.isnan(r[2])


def test_constant_profile_predictor_exposes_per_spot_metric():
    """The average profile scores high per spot and has no per-gene score (undefined)."""
    rng = np.random.default_rng(0)
    gene_means = np.array([0.1, 0.5, 1.0, 2.0, 3.0, 5.0])
    truth = gene_means + rng.normal(0, 0.3, (200, gene_means.size))
    pred = np.tile(truth.mean(0), (200, 1))  # 0.1 + 0.2 + ... is not exact in floats
    per_gene, s = score(truth, pred, [f"g{i}" for i in range(6)])
    assert s["spot_pcc_paper"] > 0.9
    assert s["n_genes_defined"] == 0 and s["n_genes_undefined"] == 6 and per_gene["pcc"].isna().all()
    assert math.isnan(s["gene_pcc_mean"])
    # a tiny jitter makes the per-gene figure defined, and it is about 0
    noisy = pred + rng.normal(0, 1e-3, pred.shape)
    _, s2 = score(truth, noisy, [f"g{i}" for i in range(6)])
    assert abs(s2["gene_pcc_mean"]) < 0.2 and s2["spot_pcc_paper"] > 0.9


def test_top_k_is_mean_of_best_genes():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(30, 60))
    pred = truth * np.linspace(0, 1, 60) + rng.normal(size=(30, 60))
    per_gene, s = score(truth, pred, [f"g{i}" for i in range(60)])
    best = np.sort(per_gene["pcc"].to_numpy())[::-1][:50]
    assert s["gene_pcc_top50"] == pytest.approx(best.mean()) and s["top_k_used"] == 50


def test_too_few_spots_is_an_error():
    with pytest.raises(InputError, match=r"sample S9.*2 spot\(s\).*at least 3"):
        score(np.ones((2, 3)), np.ones((2, 3)), ["a", "b", "c"], sample="S9")


def test_shape_mismatch_is_an_error():
    with pytest.raises(InputError, match="same"):
        score(np.ones((4, 3)), np.ones((4, 2)), ["a", "b", "c"])


# -------------------------------------------------------------------------------------------
# Evaluation files (the mean baseline: fast, and the textbook constant predictor)
# -------------------------------------------------------------------------------------------

def test_evaluate_mean_baseline_writes_files(study, tmp_path):
    from synthetic import tiny_train_cfg

    from m2ost.eval.summary import aggregate
    from m2ost.learn.inference.heldout import evaluate
    from m2ost.learn.training.fit_on_views import fit_model

    fit_model("mean", study["bundles"], study["expressions"], study["genes_file"], ["A", "B"],
              None, tiny_train_cfg(), tmp_path / "mean")
    res = evaluate(tmp_path / "mean" / "model.pt", study["bundles"], study["expressions"],
                   ["C"], tmp_path / "eval", split="lopo-P2", device="cpu", figures=True)
    per_gene = pd.read_csv(tmp_path / "eval" / "per_gene" / "C.tsv", sep="\t")
    assert len(per_gene) == len(study["genes"]) and not per_gene["defined"].any()
    assert per_gene["pcc"].isna().all()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["mean"]["gene_pcc_mean"] is None  # a constant has no correlation: undefined
    assert summary["mean"]["n_genes_defined"] == 0
    assert summary["mean"]["spot_pcc_paper"] > 0.5
    assert res["n_spots"] == 20
    for f in ("C.maps.jpg", "C.genes.png"):
        assert (tmp_path / "eval" / "figures" / f).stat().st_size > 1000

    import anndata
    pred = anndata.read_h5ad(tmp_path / "eval" / "predictions.h5ad")
    assert pred.shape == (20, len(study["genes"])) and "measured" in pred.layers
    assert pred.obsm["spatial"].shape == (20, 2)
    assert np.allclose(pred.layers["measured"], study["data"]["C"]["x"], atol=1e-6)

    table = aggregate([tmp_path / "eval" / "summary.json"], tmp_path / "summary.tsv")
    assert table["split"].tolist() == ["lopo-P2", "mean"]
    assert (tmp_path / "summary.tsv").exists()


def test_aggregate_rows_and_model_means(tmp_path):
    from m2ost.eval.summary import SUMMARY_METRICS, aggregate

    files = []
    for model, split, pcc in [("m2ost", "s1", 0.2), ("m2ost", "s2", 0.4), ("ridge", "s1", 0.1)]:
        mean = dict.fromkeys(SUMMARY_METRICS, 1.0)
        mean["gene_pcc_mean"] = pcc
        path = tmp_path / f"{model}_{split}.json"
        path.write_text(json.dumps({"model": model, "kind": model, "split": split,
                                    "test_samples": ["X", "Y"], "n_spots": 10, "n_genes": 5,
                                    "mean": mean}))
        files.append(path)
    t = aggregate(files, tmp_path / "summary.tsv")
    assert t[["model", "split"]].values.tolist() == [["m2ost", "s1"], ["m2ost", "s2"],
                                                     ["m2ost", "mean"], ["ridge", "s1"],
                                                     ["ridge", "mean"]]
    row = t[(t.model == "m2ost") & (t.split == "mean")].iloc[0]
    assert row["gene_pcc_mean"] == pytest.approx(0.3) and row["n_spots"] == 20
    back = pd.read_csv(tmp_path / "summary.tsv", sep="\t")
    assert len(back) == 5
