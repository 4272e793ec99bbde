"""The ensemble kind: weights chosen on the validation spots that every member held out; what
it stores predicts like the weighted average of its members, from bundles or cached embeddings."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import torch
from synthetic import embed_study

from m2ost.errors import InputError
from m2ost.learn.training.checkpoints import read_log
from m2ost.learn.inference.ensemble import choose_weights, fit_ensemble, simplex_weights
from m2ost.learn.inference.heldout import evaluate
from m2ost.learn.features.probes import per_sample_pcc
from m2ost.learn.training.fit_on_views import fit_model
from m2ost.learn.features.fit_on_embeddings import fit_feature_model
from m2ost.learn.inference.predictor import load_model
from m2ost.plan.kinds import ensemble_members, uses_kinds

ENCODER = {"input_px": 64}  # the synthetic views are 32 px
TRAIN = {"seed": 7, "val_fraction": 0.25, "drop_padded": False, "device": "cpu"}


def test_weight_grid_covers_the_simplex():
    grid = simplex_weights(3, 0.1)
    assert len(grid) == 66 and len(set(grid)) == 66  # C(10 + 2, 2)
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w in grid)
    assert (1.0, 0.0, 0.0) in grid and simplex_weights(1, 0.25) == [(1.0,)]
    with pytest.raises(InputError, match="must divide 1"):
        simplex_weights(2, 0.3)


def test_weights_drop_noise_and_average_independent_errors():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(400, 6))
    group = np.repeat([0, 1], 200)
    a = truth + rng.normal(size=truth.shape)  # two members as good as each other, errors independent
    b = truth + rng.normal(size=truth.shape)
    noise = rng.normal(size=truth.shape)
    weights, rows = choose_weights([a, b, noise], truth, group, 0.1)
    assert weights[2] == 0 and 0.3 <= weights[0] <= 0.7 and abs(weights[0] + weights[1] - 1) < 1e-9
    best = max(r["val_gene_pcc"] for r in rows)
    assert best > max(per_sample_pcc(truth, a, group), per_sample_pcc(truth, b, group)) + 0.05
    # A constant member (the mean predictor) changes no Pearson r: the tie goes to the lower error
    # (here the accurate member alone: shrinking it towards an offset constant only adds error).
    const = np.broadcast_to(truth.mean(0) + 3.0, truth.shape)
    weights, _ = choose_weights([truth + 0.1 * noise, const], truth, group, 0.1)
    assert weights == (1.0, 0.0)


def test_members_come_from_the_config_and_join_the_kinds_to_train():
    config = {"ensemble": {"members": ["m2ost", "ridge"]}}
    assert ensemble_members(config) == ["m2ost", "ridge"]
    assert uses_kinds(["mean", "ensemble"], config) == ["mean", "ensemble", "m2ost", "ridge"]
    assert uses_kinds(["mean"], config) == ["mean"]
    with pytest.raises(InputError, match="other than ensemble"):
        ensemble_members({"ensemble": {"members": ["ensemble"]}})
    with pytest.raises(InputError, match="not one of"):
        ensemble_members({"ensemble": {"members": ["m2ost", "unet"]}})


@pytest.fixture(scope="module")
def members(study, tmp_path_factory):
    """ridge, mean and encoder_ridge on samples A and B of the synthetic study, and C's embeddings."""
    root = tmp_path_factory.mktemp("members")
    emb = embed_study(study, root, ENCODER)["files"]
    files = {}
    for kind in ("ridge", "mean"):
        fit_model(kind, study["bundles"], study["expressions"], study["genes_file"], ["A", "B"], {}, TRAIN,
                  root / kind)
        files[kind] = str(root / kind / "model.pt")
    fit_feature_model("encoder_ridge", study["bundles"], study["expressions"], emb, study["genes_file"], ["A", "B"],
                      {"train": TRAIN, "encoder": ENCODER}, root / "encoder_ridge")
    files["encoder_ridge"] = str(root / "encoder_ridge" / "model.pt")
    out = root / "ensemble"
    result = fit_ensemble(files, study["bundles"], study["expressions"], {s: emb[s] for s in "AB"},
                          study["genes_file"], ["A", "B"], {"model": {"step": 0.1}, "train": TRAIN}, out)
    return {"files": files, "emb": emb, "out": out, "result": result, "root": root}


def test_ensemble_predicts_the_weighted_average_of_its_members(study, members, tmp_path):
    model = load_model(members["out"] / "model.pt", "cpu")
    weights = members["result"]["weights"]
    assert model.kind == "ensemble" and model.views == [0, 1, 2]
    assert abs(sum(weights.values()) - 1) < 1e-9 and all(w > 0 for w in weights.values())
    assert [m.kind for _, m in model.impl] == list(weights)
    # Scored on held-out C from the bundles (the encoder on the fly) and from the cached embeddings.
    on_the_fly = evaluate(members["out"] / "model.pt", study["bundles"], study["expressions"], ["C"],
                          tmp_path / "fly", device="cpu", figures=False)
    cached = evaluate(members["out"] / "model.pt", study["bundles"], study["expressions"], ["C"],
                      tmp_path / "cache", device="cpu", figures=False, embeddings={"C": members["emb"]["C"]})
    expected = 0
    for kind, w in weights.items():
        evaluate(members["files"][kind], study["bundles"], study["expressions"], ["C"], tmp_path / kind,
                 device="cpu", figures=False)
        expected = expected + w * anndata.read_h5ad(tmp_path / kind / "predictions.h5ad").X
    for run in ("fly", "cache"):
        np.testing.assert_allclose(anndata.read_h5ad(tmp_path / run / "predictions.h5ad").X, expected, atol=2e-3)
    assert abs(on_the_fly["mean"]["gene_pcc_mean"] - cached["mean"]["gene_pcc_mean"]) < 1e-3
    # Learning test: the synthetic expression follows the spot colour, so the held-out patient is predicted.
    assert cached["mean"]["gene_pcc_mean"] > 0.5


def test_ensemble_is_at_least_its_best_member_on_the_validation_spots(members):
    """Each member alone is on the grid, so the chosen weights are no worse there; the member
    scores come from the members' own logs (the same validation spots)."""
    rows = read_log(members["out"] / "log.csv")
    chosen = [r for r in rows if r["chosen"] == "True"]
    assert len(chosen) == 1 and len(rows) == len(simplex_weights(3, 0.1))
    alone = {r["weights"]: float(r["val_gene_pcc"]) for r in rows if "=1 " in r["weights"] + " "}
    assert len(alone) == 3
    assert float(chosen[0]["val_gene_pcc"]) >= max(v for v in alone.values() if np.isfinite(v))
    payload = torch.load(members["out"] / "model.pt", weights_only=True)
    val = payload["val_gene_pcc_per_gene"]
    assert set(val) == set(payload["genes"]) and np.nanmean(list(val.values())) > 0
    # the ensemble's own interval calibration, from its weighted validation predictions, and each kept
    # member's (m2ost.learn.training.calibration.validation_record)
    assert payload["intervals"]["scores"].shape[1] == len(payload["genes"])
    assert all("intervals" in m for m in payload["state"]["members"])


def test_members_that_held_out_other_spots_or_genes_are_refused(study, members, tmp_path):
    files = dict(members["files"])
    fit_model("ridge", study["bundles"], study["expressions"], study["genes_file"], ["A", "B"], {},
              {**TRAIN, "val_fraction": 0.1}, tmp_path / "ridge")
    files["ridge"] = str(tmp_path / "ridge" / "model.pt")
    with pytest.raises(InputError, match="member ridge held out other validation spots .*val_fraction"):
        fit_ensemble(files, study["bundles"], study["expressions"], members["emb"], study["genes_file"],
                     ["A", "B"], {"train": TRAIN}, tmp_path / "ens")
    with pytest.raises(InputError, match="member ridge was trained on samples"):
        fit_ensemble({"ridge": members["files"]["ridge"]}, study["bundles"], study["expressions"], {},
                     study["genes_file"], ["A"], {"train": TRAIN}, tmp_path / "ens")
    other_genes = tmp_path / "genes.txt"
    other_genes.write_text("\n".join(reversed(study["genes"])) + "\n")
    with pytest.raises(InputError, match="member ridge was trained on another gene panel"):
        fit_ensemble({"ridge": members["files"]["ridge"]}, study["bundles"], study["expressions"], {},
                     str(other_genes), ["A", "B"], {"train": TRAIN}, tmp_path / "ens")
    assert not (tmp_path / "ens" / "model.pt").exists()
