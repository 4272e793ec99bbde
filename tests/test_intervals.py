"""Prediction intervals per spot and gene (m2ost.eval.intervals, docs/uncertainty.md): calibrated
coverage, widths that follow the difficulty, the model file, and where the user sees them."""

from __future__ import annotations

import json
import logging

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from realdata import HER2ST, her2st_files, needs_her2st
from synthetic import make_study, tiny_train_cfg, write_expression, write_genes

from m2ost.errors import InputError
from m2ost.eval.intervals import fit_calibration, interval_scores, intervals, quantile_level
from m2ost.eval.summary import aggregate
from m2ost.learn.inference.heldout import evaluate
from m2ost.learn.inference.new_slides import predict_bundle, prediction_outputs
from m2ost.learn.inference.predictor import load_model
from m2ost.learn.training.fit_on_views import fit_model

LEVEL = 0.9


def heteroscedastic(rng, n: int, n_genes: int = 20, noise: float = 1.0, shift: float = 0.0):
    """Predictions and truths whose error grows with the first predicted gene's distance from its
    mean (the difficulty), the same law for every gene; ``noise`` scales the error, ``shift`` adds
    a bias. Values lie around 10, far from 0, the least a log1p expression measures."""
    pred = 10 + rng.normal(0, 1, (n, n_genes))
    sigma = 0.1 + np.abs(pred[:, :1] - 10)  # (n, 1): hard spots are those with an unusual first gene
    truth = pred + noise * sigma * rng.normal(0, 1, (n, n_genes)) + shift
    return pred, truth, np.broadcast_to(sigma, pred.shape)


def test_coverage_is_nominal_on_exchangeable_spots_and_not_under_shift():
    rng = np.random.default_rng(0)
    pred, truth, _ = heteroscedastic(rng, 600)
    state = fit_calibration(pred, truth, rng.integers(0, 3, 600), seed=1)
    coverage = {}
    for name, kw in (("same", {}), ("noisier", {"noise": 2.0}), ("biased", {"shift": 2.0})):
        test_pred, test_truth, _ = heteroscedastic(np.random.default_rng(5), 4000, **kw)
        lower, upper = intervals(state, test_pred, LEVEL, "spots")
        coverage[name] = interval_scores(test_truth, lower, upper)["interval_coverage"]
    # exchangeable: at least the level (the conformal guarantee), not much more (300 scores)
    assert LEVEL - 0.02 <= coverage["same"] <= LEVEL + 0.05, coverage
    # a test set unlike the calibration spots is visibly under-covered
    assert coverage["noisier"] < LEVEL - 0.1 and coverage["biased"] < LEVEL - 0.1, coverage


def test_intervals_widen_where_the_difficulty_says_so():
    rng = np.random.default_rng(1)
    pred, truth, _ = heteroscedastic(rng, 800)
    state = fit_calibration(pred, truth, np.zeros(800, int), seed=2)
    assert np.isfinite(state["head"]["penalty"])  # the head learnt something: not a constant
    test_pred, test_truth, sigma = heteroscedastic(np.random.default_rng(9), 4000)
    lower, upper = intervals(state, test_pred, LEVEL, "spots")
    width = upper - lower
    assert np.corrcoef(width.ravel(), sigma.ravel())[0, 1] > 0.8
    hard = sigma[:, 0] > np.quantile(sigma[:, 0], 0.8)
    assert width[hard].mean() > 2 * width[~hard].mean()  # true spread: 2.8 times
    # and so each group of spots is covered: the hard fifth as well as the easy spots
    inside = (test_truth >= lower) & (test_truth <= upper)
    assert inside[hard].mean() > LEVEL - 0.05 and inside[~hard].mean() > LEVEL - 0.05
    # a constant width (plain conformal) would under-cover the hard spots
    half = np.quantile(np.abs(truth - pred), LEVEL)
    assert (np.abs(test_truth - test_pred)[hard] <= half).mean() < LEVEL - 0.15


def test_sections_calibration_widens_when_training_sections_differ():
    rng = np.random.default_rng(2)
    blocks = [heteroscedastic(rng, 150, noise=s) for s in (0.5, 1.0, 2.0)]
    pred = np.concatenate([b[0] for b in blocks])
    truth = np.concatenate([b[1] for b in blocks])
    group = np.repeat([0, 1, 2], 150)
    state = fit_calibration(pred, truth, group, seed=3)
    assert quantile_level(state, LEVEL, "spots") == LEVEL
    raised = quantile_level(state, LEVEL, "sections")
    assert LEVEL < raised < 1.0
    # sections alike: nothing to raise (up to a step)
    same = fit_calibration(*heteroscedastic(rng, 450)[:2], group, seed=3)
    assert quantile_level(same, LEVEL, "sections") <= LEVEL + 0.02
    with pytest.raises(InputError, match="calibration"):
        quantile_level(state, LEVEL, "patients")


@pytest.fixture(scope="module")
def ridge_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("intervals")
    study = make_study(root / "study", n_spots=60, padded_rows=(0, 5))
    fit_model("ridge", study["bundles"], study["expressions"], study["genes_file"], ["A", "B"], None,
              tiny_train_cfg(val_fraction=0.3), root / "ridge")
    return study, root / "ridge" / "model.pt"


def test_model_file_round_trip_and_evaluation_outputs(ridge_model, tmp_path):
    study, model_file = ridge_model
    payload = torch.load(model_file, weights_only=True)
    stored = payload["intervals"]
    assert isinstance(stored["scores"], torch.Tensor) and stored["scores"].shape[1] == len(study["genes"])
    result = evaluate(model_file, study["bundles"], study["expressions"], ["C"], tmp_path, device="cpu")
    mean = result["mean"]
    assert 0.5 < mean["interval_coverage"] <= 1.0 and mean["interval_width"] > 0
    assert mean["interval_coverage_gene_p10"] <= mean["interval_coverage"]
    assert set(result["intervals"]["by_calibration"]) == {"spots/measured", "spots/training", "sections/measured",
                                                          "sections/training"}
    # the same bounds from the model file as from the state computed here
    adata = anndata.read_h5ad(tmp_path / "predictions.h5ad")
    record = adata.uns["m2ost"]["intervals"]
    lower, upper = adata.layers[record["lower"]], adata.layers[record["upper"]]
    state = load_model(model_file, "cpu").meta["intervals"]
    state = {k: ({kk: vv.numpy() if torch.is_tensor(vv) else vv for kk, vv in v.items()} if isinstance(v, dict)
                 else v.numpy() if torch.is_tensor(v) else v) for k, v in state.items()}
    ref = intervals(state, np.asarray(adata.X), record["level"], record["calibration"])
    np.testing.assert_allclose(lower, ref[0], rtol=1e-5, atol=1e-5)
    assert (lower <= adata.X).all() and (upper >= adata.X).all()
    inside = (adata.layers["measured"] >= lower) & (adata.layers["measured"] <= upper)
    assert abs(inside.mean(0).mean() - mean["interval_coverage"]) < 1e-9
    assert adata.obs["padded"].tolist()[:6] == [True, False, False, False, False, True]
    feature = json.loads((tmp_path / "qupath" / "C.geojson").read_text())["features"][1]
    values = feature["properties"]["measurements"]
    gene = study["genes"][0]
    assert values[f"lower: {gene}"] <= values[gene] <= values[f"upper: {gene}"]
    table = aggregate([tmp_path / "summary.json"], tmp_path / "summary.tsv")
    assert {"interval_coverage", "interval_coverage_gene_p10", "interval_width"} <= set(table.columns)
    assert (tmp_path / "figures" / "C.maps.jpg").stat().st_size > 0


def test_a_model_without_calibration_still_predicts(ridge_model, tmp_path, caplog):
    study, model_file = ridge_model
    payload = torch.load(model_file, weights_only=True)
    del payload["intervals"]
    torch.save(payload, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING):
        result = evaluate(tmp_path / "old.pt", study["bundles"], study["expressions"], ["C"], tmp_path / "ev",
                          device="cpu", figures=False)
    assert "no interval calibration" in caplog.text
    assert np.isnan(result["mean"]["interval_coverage"]) and not result["intervals"]["calibrated"]
    assert np.isfinite(result["mean"]["gene_pcc_mean"])
    adata = anndata.read_h5ad(tmp_path / "ev" / "predictions.h5ad")
    assert "lower" not in adata.layers and "intervals" not in adata.uns["m2ost"]
    pred = predict_bundle(tmp_path / "old.pt", study["bundles"]["C"], tmp_path / "C.h5ad", sample="C", device="cpu")
    assert "lower" not in pred.layers


@needs_her2st
def test_a_model_from_before_the_depths_gives_its_intervals_at_the_training_depth(her2st_pair, tmp_path):
    """A 0.2.0 model.pt (intervals format 1: no validation spots, no seed) still evaluates; its
    intervals at the measured depth are those at the training depth."""
    data = her2st_pair
    fit_model("ridge", {"C3": data["bundles"]["C3"]}, {"C3": data["expressions"]["C3"]}, data["genes_file"],
              ["C3"], None, tiny_train_cfg(val_fraction=0.4), tmp_path / "model")
    payload = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    assert payload["intervals"]["spots"]["depth"].shape == payload["intervals"]["spots"]["group"].shape
    for key in ("spots", "seed"):
        del payload["intervals"][key]
    payload["intervals"]["format"] = 1
    torch.save(payload, tmp_path / "old.pt")
    result = evaluate(tmp_path / "old.pt", data["bundles"], data["expressions"], ["B4"], tmp_path / "ev",
                      device="cpu", figures=False)
    by = result["intervals"]["by_calibration"]
    assert by["sections/measured"] == by["sections/training"] and 0 < by["sections/measured"]["interval_coverage"] < 1


@pytest.fixture(scope="module")
def her2st_pair(tmp_path_factory):
    """Real C3 (training), C4 and B4 (held out; B4 sequenced about 14 times less deeply) spots:
    three 112-px views cut from the JPEGs, the log1p-CPM of C3's 30 most variable panel genes
    with the library sizes, and each section's H&E for the viewers."""
    from PIL import Image

    from her2st_views import MPP, section_image, write_section_bundle
    from m2ost.data.spatial import SPOT_DIAMETER_UM

    root = tmp_path_factory.mktemp("her2st_intervals")
    panel = (HER2ST / "gene-panels" / "m2ost_250.txt").read_text().split()
    out = {"bundles": {}, "expressions": {}, "size": {}}
    genes = None
    for section in ("C3", "C4", "B4"):
        image = section_image(section)
        out["size"][section] = image.shape[1::-1]
        _, barcodes = write_section_bundle(root / f"{section}.h5", section, 160, image=image)
        counts = pd.read_csv(her2st_files(section)["counts"], sep="\t", index_col=0)
        rows = np.flatnonzero(np.isin(barcodes, counts.index))
        c = counts.loc[np.asarray(barcodes)[rows]]
        lib = c.sum(1).to_numpy(np.float64)
        y = np.log1p(c[panel].to_numpy(np.float64) / lib[:, None] * 1e6)
        genes = genes or [panel[i] for i in np.argsort(-y.var(0))[:30]]
        y = y[:, [panel.index(g) for g in genes]]
        positions = pd.read_csv(her2st_files(section)["positions"], sep="\t")
        xy = {f"{x}x{yy}": (px, py) for x, yy, px, py in zip(positions.x, positions.y, positions.pixel_x,
                                                            positions.pixel_y)}
        coords = np.array([xy[b] for b in barcodes])
        path = write_expression(root / f"{section}.h5ad", section, barcodes, rows, y, genes, coords, (lib, 1e6))
        scalef = 0.1
        thumb = np.asarray(Image.fromarray(image).resize((round(image.shape[1] * scalef),
                                                          round(image.shape[0] * scalef))))
        adata = anndata.read_h5ad(path)
        adata.uns["spatial"] = {section: {"images": {"hires": thumb}, "scalefactors": {
            "tissue_hires_scalef": scalef, "spot_diameter_fullres": SPOT_DIAMETER_UM["legacy_st"] / MPP}}}
        adata.write_h5ad(path)
        out["bundles"][section], out["expressions"][section] = str(root / f"{section}.h5"), str(path)
    out["genes_file"] = write_genes(root / "genes.txt", genes)
    return out


@needs_her2st
def test_real_her2st_intervals_reach_the_viewers(her2st_pair, tmp_path):
    import matplotlib.pyplot as plt
    import scanpy as sc
    from viewer_checks import check_draws_over_tissue

    data = her2st_pair
    fit_model("ridge", {"C3": data["bundles"]["C3"]}, {"C3": data["expressions"]["C3"]}, data["genes_file"],
              ["C3"], None, tiny_train_cfg(val_fraction=0.4), tmp_path / "model")
    model_file = tmp_path / "model" / "model.pt"
    result = evaluate(model_file, data["bundles"], data["expressions"], ["C4"], tmp_path / "ev", device="cpu")
    print("C3 -> C4 ridge intervals:", result["intervals"])
    cov = result["mean"]["interval_coverage"]
    assert 0.5 < cov <= 1.0 and result["mean"]["interval_width"] > 0  # measured on another section
    adata = anndata.read_h5ad(tmp_path / "ev" / "predictions.h5ad")
    check_draws_over_tissue(adata, "C4", data["size"]["C4"])
    for layer in ("lower", "upper"):  # the bounds, drawn by scanpy over the H&E like any layer
        sc.pl.spatial(adata, color=str(adata.var_names[0]), layer=adata.uns["m2ost"]["intervals"][layer], show=False)
        ax = plt.gcf().axes[0]
        drawn = [c for c in ax.collections if len(c.get_paths()) == adata.n_obs]
        assert drawn and np.allclose(np.sort(drawn[0].get_array()),
                                     np.sort(adata.layers[layer][:, 0]), atol=1e-5)
        plt.close("all")
    # the H&E-only path: a prediction file with its bounds, and a map figure with the widths
    pred = predict_bundle(model_file, data["bundles"]["C4"], tmp_path / "C4.h5ad", sample="C4", device="cpu",
                          spot_diameter_um=100.0)
    assert (pred.layers["upper"] >= pred.layers["lower"]).all()
    prediction_outputs(pred, tmp_path / "C4.png", tmp_path / "C4.geojson", n_genes=2)
    assert (tmp_path / "C4.png").stat().st_size > 0


@needs_her2st
def test_real_her2st_patient_b_is_covered_at_its_own_depth(her2st_pair, tmp_path):
    """Trained on C3, held out B4 (another patient, about 14 times shallower): the intervals at the
    training depth miss its zeros; thinned to each B4 spot's library size they cover it."""
    data = her2st_pair
    fit_model("ridge", {"C3": data["bundles"]["C3"]}, {"C3": data["expressions"]["C3"]}, data["genes_file"],
              ["C3"], None, tiny_train_cfg(val_fraction=0.4), tmp_path / "model")
    result = evaluate(tmp_path / "model" / "model.pt", data["bundles"], data["expressions"], ["B4", "C4"],
                      tmp_path / "ev", device="cpu", figures=False)
    cov = {(s, v): result["samples"][s]["intervals_by_calibration"][f"sections/{v}"]["interval_coverage"]
           for s in ("B4", "C4") for v in ("training", "measured")}
    print("C3 -> B4, C4 ridge coverage:", cov)
    assert cov["B4", "training"] < LEVEL - 0.05, cov  # 0.83 when written
    assert cov["B4", "measured"] >= LEVEL - 0.03 and cov["B4", "measured"] > cov["B4", "training"] + 0.04, cov
    assert abs(cov["C4", "measured"] - cov["C4", "training"]) < 0.05, cov  # as deep as C3: little changes
    assert result["intervals"]["depth"] == "measured"
    assert result["samples"]["B4"]["interval_coverage"] == cov["B4", "measured"]
    adata = anndata.read_h5ad(tmp_path / "ev" / "predictions.h5ad")
    assert adata.uns["m2ost"]["intervals"]["depth"] == "measured"
    b4 = adata[adata.obs["sample"] == "B4"]
    assert np.median(b4.obs["total_counts"]) < 0.2 * np.median(adata[adata.obs["sample"] == "C4"].obs["total_counts"])


def test_the_level_and_calibration_reach_the_rules_and_the_intervals(ridge_model, tmp_path):
    from m2ost import defaults
    from m2ost.plan.settings import eval_settings, predict_settings

    config = defaults.config_defaults()
    config["intervals"] = {"level": 0.5, "calibration": "spots", "depth": "training"}
    for settings in (eval_settings(config), predict_settings(config)):
        assert settings["interval_level"] == 0.5 and settings["interval_calibration"] == "spots"
    # only an evaluation knows the measured depth of its spots
    assert eval_settings(config)["interval_depth"] == "training" and "interval_depth" not in predict_settings(config)
    study, model_file = ridge_model
    widths = {}
    for level in (0.5, 0.9):
        result = evaluate(model_file, study["bundles"], study["expressions"], ["C"], tmp_path / str(level),
                          device="cpu", figures=False, interval_level=level, interval_calibration="spots")
        assert result["intervals"]["level"] == level and result["intervals"]["calibration"] == "spots"
        widths[level] = result["mean"]["interval_width"]
    assert widths[0.5] < widths[0.9]
    with pytest.raises(InputError, match="level"):
        evaluate(model_file, study["bundles"], study["expressions"], ["C"], tmp_path / "bad", device="cpu",
                 figures=False, interval_level=1.5)
    with pytest.raises(InputError, match="intervals.depth"):
        evaluate(model_file, study["bundles"], study["expressions"], ["C"], tmp_path / "bad", device="cpu",
                 figures=False, interval_depth="deep")


def sequenced(rng, n: int, depth: tuple[float, float], target_sum: float = 1e4, n_genes: int = 30):
    """Spots measured at library sizes drawn in ``depth``: the model's predictions (the log1p of
    each spot's true expression, which it knows up to a small error), the measured log1p
    expression of Poisson counts at that depth, and the library sizes."""
    share = np.exp(rng.normal(np.linspace(-9, -4, n_genes), 0.8, (n, n_genes)))  # of the spot's transcripts
    lib = rng.uniform(*depth, n)
    counts = rng.poisson(share * lib[:, None])
    truth = np.log1p(counts / lib[:, None] * target_sum)
    pred = np.log1p(share * target_sum) + rng.normal(0, 0.1, share.shape)
    return pred, truth, lib


def test_a_shallower_section_is_covered_once_the_calibration_is_thinned_to_its_depth():
    rng = np.random.default_rng(4)
    pred, truth, lib = sequenced(rng, 600, (6000, 12000))
    state = fit_calibration(pred, truth, rng.integers(0, 3, 600), seed=1, depth=lib, target_sum=1e4)
    coverage = {}
    for name, depth in (("as deep", (6000, 12000)), ("14x shallower", (450, 900))):
        test_pred, test_truth, test_lib = sequenced(np.random.default_rng(8), 3000, depth)
        for mode, spot_depth in (("training", None), ("measured", test_lib)):
            lower, upper = intervals(state, test_pred, LEVEL, "spots", spot_depth)
            coverage[name, mode] = interval_scores(test_truth, lower, upper)["interval_coverage"]
    print(coverage)
    # the calibration's own depth: both near the level
    assert LEVEL - 0.03 <= coverage["as deep", "training"] <= LEVEL + 0.05, coverage
    assert LEVEL - 0.03 <= coverage["as deep", "measured"] <= LEVEL + 0.06, coverage
    # shallower: the plain calibration falls short, thinned to each spot's depth it does not
    assert coverage["14x shallower", "training"] < LEVEL - 0.1, coverage
    assert LEVEL - 0.03 <= coverage["14x shallower", "measured"] <= LEVEL + 0.06, coverage
    # the same bounds from the same state: thinning is seeded
    again = intervals(state, test_pred, LEVEL, "spots", test_lib)
    np.testing.assert_array_equal(again[0], intervals(state, test_pred, LEVEL, "spots", test_lib)[0])


@pytest.mark.slow
def test_every_kind_keeps_its_calibration_spots_with_their_own_depths(tmp_path_factory):
    """In the workflow (every model kind of the fast config), each stored validation spot's
    measured values and library size are those of one spot of a training section: the depths
    reach the calibration aligned with the targets, whatever path a kind takes."""
    import yaml
    from workflow_helpers import FAST_CONFIG, local_run

    run = local_run(tmp_path_factory)
    config = yaml.safe_load((run.workdir / FAST_CONFIG).read_text())
    checked = set()
    for model_file in sorted(run.workdir.glob("results/models/*/*/model.pt")):
        kind, split = model_file.parent.parent.name, model_file.parent.name
        payload = torch.load(model_file, map_location="cpu", weights_only=True)
        spots = payload["intervals"]["spots"]
        genes = list(payload["genes"])
        known = {}
        every = sorted(f.stem for f in run.workdir.glob("results/expression/*.h5ad"))  # split "all": predict.model
        for sample in config["splits"]["explicit"].get(split, {"train": every})["train"]:
            adata = anndata.read_h5ad(run.workdir / f"results/expression/{sample}.h5ad")
            x = adata[:, genes].X
            x = x.toarray() if hasattr(x, "toarray") else x
            known.update({(round(float(d)), tuple(np.round(row, 4))): sample
                          for d, row in zip(adata.obs["total_counts"], x)})
        pairs = zip(spots["depth"].numpy(), spots["truth"].numpy())
        missing = [d for d, row in pairs if (round(float(d)), tuple(np.round(row, 4))) not in known]
        n = payload["intervals"]["n_fit"] + payload["intervals"]["n_calibration"]
        assert not missing and len(spots["depth"]) == n, (kind, split, len(missing))
        checked.add(kind)
    assert checked == set(config["models"]), checked
    summary = json.loads(next(run.workdir.glob("results/metrics/*/*/summary.json")).read_text())
    assert summary["intervals"]["depth"] == "measured"
