"""m2ost_encoder on real HER2+ spots: it learns (well above a shuffled-target control), it
resumes, its settings agree with the config schema, and it saves and loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import pandas as pd
import pytest
import yaml
from realdata import HER2ST, her2st_files, needs_her2st

from m2ost.errors import InputError, StaleCheckpoint
from m2ost.learn.features.encoders import load_encoder
from m2ost.learn.features.probes import FeatureSet
from m2ost.learn.features.registry import FEATURE_MODELS
from m2ost.learn.features.token_training import fit_network
from m2ost.learn.features.token_model import M2OSTEncoder, m2ost_encoder_settings
from m2ost.learn.training.validation import validation_spots
from m2ost.model.token_m2ost import TokenM2OST

SCHEMA = Path(__file__).resolve().parents[1] / "m2ost" / "schemas" / "config.schema.yaml"
N_SPOTS, N_GENES = 150, 30
# small and quick: 64-px encoder input (a 2 x 2 token grid per view), a narrow network
FAST = {"dim": 32, "heads": 2, "mlp_dim": 64, "epochs": 15, "patience": 0, "batch_size": 32, "blend_ridge": False,
        "lr": 1e-3, "warmup_epochs": 1}


def test_defaults_agree_with_the_config_schema():
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["m2ost_encoder"]["properties"]
    assert {k: v["default"] for k, v in schema.items()} == m2ost_encoder_settings(None)
    assert FEATURE_MODELS["m2ost_encoder"] is M2OSTEncoder
    with pytest.raises(InputError, match=r"unknown setting m2ost_encoder\.depht"):
        m2ost_encoder_settings({"depht": 3})
    with pytest.raises(InputError, match="finetune_blocks"):
        m2ost_encoder_settings({"finetune_blocks": 2})
    # models saved before m2ost_finetune existed record finetune_blocks 0: they still load
    assert m2ost_encoder_settings({"finetune_blocks": 0, "depth": 3}) == {**m2ost_encoder_settings(None), "depth": 3}


@pytest.fixture(scope="module")
def c3_tokens():
    """Tokens of the three views and log1p-CPM targets of N_SPOTS real C3 spots."""
    from her2st_views import spot_views

    views, barcodes, _ = spot_views("C3", N_SPOTS)
    encoder = load_encoder({"input_px": 64}, "cpu")
    blocks = tuple(encoder.token_blocks)  # the output's channels, then two stages' (token_levels 2)
    x = np.stack([encoder.encode(v, tokens=True)[1].reshape(N_SPOTS, -1, sum(blocks)) for v in views], 1)
    counts = pd.read_csv(her2st_files("C3")["counts"], sep="\t", index_col=0)
    panel = (HER2ST / "gene-panels" / "m2ost_250.txt").read_text().split()
    keep = np.isin(barcodes, counts.index)  # a few spots of the selection have no counts row
    counts = counts.loc[np.asarray(barcodes)[keep]]
    x = x[keep]
    y = np.log1p(counts[panel].to_numpy(np.float64) / counts.sum(1).to_numpy()[:, None] * 1e6)
    n = len(y)
    train, val = validation_spots({"C3": n}, 0.3, 0)["C3"]
    genes = np.argsort(-y[train].var(0))[:N_GENES]  # most variable on the training spots
    y = y[:, genes].astype(np.float32)
    group = np.zeros(n, int)
    return (FeatureSet(x[train].astype(np.float16), y[train], group[train], token_blocks=blocks),
            FeatureSet(x[val].astype(np.float16), y[val], group[val], token_blocks=blocks))


@needs_her2st
def test_learns_real_expression_well_above_a_shuffled_control(c3_tokens):
    train, val = c3_tokens
    model = M2OSTEncoder(FAST, {"seed": 0})
    rows = model.fit(train, val)
    real = max(r["val_gene_pcc"] for r in rows)
    shuffled = FeatureSet(train.x, train.y[np.random.default_rng(0).permutation(len(train))], train.group,
                          token_blocks=train.token_blocks)
    control = max(r["val_gene_pcc"] for r in M2OSTEncoder(FAST, {"seed": 0}).fit(shuffled, val))
    print("real", real, "control", control)
    assert real > 0.15, real
    assert real > control + 0.1, (real, control)
    # the chosen epoch is the one kept, and the model round-trips through its state
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["val_gene_pcc"] == real
    again = M2OSTEncoder.from_state(model.state(), FAST)
    np.testing.assert_array_equal(again.predict(val.x), model.predict(val.x))


@needs_her2st
def test_stage_channels_of_the_tokens_are_weighed_equally(c3_tokens):
    """encoder.token_levels: the tokens carry the output's channels and two stages' (real C3
    spots); each block reaches the network at a mean channel variance of 1, the scale is fitted
    on the training tokens only and travels with the model."""
    tr, va = c3_tokens
    blocks = tuple(tr.token_blocks)
    assert blocks == (1280, 112, 320)
    raw_var = tr.x.astype(np.float64).reshape(-1, tr.x.shape[-1]).var(0)
    starts = np.cumsum((0,) + blocks)
    raw = [raw_var[a:b].mean() for a, b in zip(starts, starts[1:])]
    assert max(raw) / min(raw) > 2  # unscaled, one block would dominate the LayerNorm
    model = M2OSTEncoder({**FAST, "epochs": 2}, {"seed": 0})
    model.fit(tr, va)
    var = model._project(tr.x).astype(np.float64).reshape(-1, tr.x.shape[-1]).var(0)
    for a, b in zip(starts, starts[1:]):
        assert var[a:b].mean() == pytest.approx(1.0, rel=0.1)
    again = M2OSTEncoder.from_state(model.state(), FAST)
    np.testing.assert_array_equal(again.token_scale, model.token_scale)
    np.testing.assert_array_equal(again.predict(va.x), model.predict(va.x))
    plain = M2OSTEncoder({**FAST, "epochs": 1}, {"seed": 0})
    plain.fit(FeatureSet(tr.x[..., :1280], tr.y, tr.group), FeatureSet(va.x[..., :1280], va.y, va.group))
    assert plain.token_scale is None  # the output's channels alone: nothing to weigh
    with pytest.raises(InputError, match="token blocks"):
        M2OSTEncoder(FAST, {"seed": 0}).fit(FeatureSet(tr.x, tr.y, tr.group, token_blocks=(1280, 112)), va)


@needs_her2st
def test_interrupted_training_resumes_to_the_same_weights(c3_tokens, tmp_path, monkeypatch):
    import m2ost.learn.features.token_training as ft

    train, val = c3_tokens
    cfg = {"epochs": 4, "patience": 0, "batch_size": 32, "lr": 1e-3}
    sizes = (N_GENES, 3, train.x.shape[2], train.x.shape[3])

    def build():
        return TokenM2OST(*sizes, dim=16, heads=2, mlp_dim=32, dropout=0.1, token_mask_ratio=0.25)

    args = (build, train.x[None], train.y, val.x, val.y, val.group)
    full = fit_network(*args, cfg)
    calls = []
    real_write = ft._write_log

    def killed_after_epoch_2(rows, path):
        real_write(rows, path)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "_write_log", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit_network(*args, cfg, tmp_path)
    monkeypatch.setattr(ft, "_write_log", real_write)
    resumed = fit_network(*args, cfg, tmp_path)
    assert [r["epoch"] for r in resumed["log"]] == [1, 2, 3, 4]
    assert resumed["best_epoch"] == full["best_epoch"]
    for k, v in full["state_dict"].items():
        np.testing.assert_array_equal(v.numpy(), resumed["state_dict"][k].numpy())
    with pytest.raises(StaleCheckpoint, match="different run"):  # a checkpoint of other settings
        fit_network(*args, {**cfg, "lr": 1e-2}, tmp_path)


# --------------------------------------------------------------------------------------------
# Through the workflow's functions, on the synthetic study (A, B train; C held out)

SMALL = {"dim": 16, "heads": 2, "mlp_dim": 32, "epochs": 3, "patience": 0, "token_pca": 32}  # PCA path too
TRAIN = {"seed": 7, "val_fraction": 0.2, "drop_padded": True, "device": "cpu"}


@pytest.fixture(scope="module")
def study_tokens(tmp_path_factory):
    from synthetic import make_study

    from m2ost.learn.features.embeddings import write_embeddings

    root = tmp_path_factory.mktemp("tokens")
    study = make_study(root / "study", n_spots=40)
    encoder = load_encoder({"input_px": 64}, "cpu")
    files = {}
    for s, bundle in study["bundles"].items():
        files[s] = str(root / f"{s}.h5")
        write_embeddings(encoder, bundle, files[s], sample=s, tokens=True, batch_size=16, progress=False)
    return study, files


def test_fit_reads_only_training_slides_and_scores_from_the_cache_as_from_bundles(study_tokens, tmp_path):
    import anndata

    from m2ost.learn.inference.heldout import evaluate
    from m2ost.learn.features.fit_on_embeddings import fit_feature_model

    study, files = study_tokens
    out = tmp_path / "model"
    # the held-out slide's embeddings are not given: training and validation never read them
    train_files = {s: files[s] for s in ("A", "B")}
    result = fit_feature_model("m2ost_encoder", study["bundles"], study["expressions"], train_files,
                               study["genes_file"], ["A", "B"], {"train": TRAIN, "model": SMALL,
                                                                 "encoder": {"input_px": 64}}, out)
    assert result["n_train"] + result["n_val"] == 80  # the 40 spots of A and of B, none of C
    log = pd.read_csv(out / "log.csv")
    assert list(log["epoch"][:3]) == ["1", "2", "3"] and log["chosen"].sum() == 1
    on_the_fly = evaluate(out / "model.pt", study["bundles"], study["expressions"], ["C"], tmp_path / "a",
                          device="cpu", figures=False)
    cached = evaluate(out / "model.pt", study["bundles"], study["expressions"], ["C"], tmp_path / "b",
                      device="cpu", figures=False, embeddings={"C": files["C"]})
    a = anndata.read_h5ad(tmp_path / "a" / "predictions.h5ad")
    b = anndata.read_h5ad(tmp_path / "b" / "predictions.h5ad")
    np.testing.assert_allclose(a.X, b.X, atol=1e-4)
    assert on_the_fly["mean"]["gene_pcc_mean"] == pytest.approx(cached["mean"]["gene_pcc_mean"], abs=1e-4)
    # The probe it averages with reads the embeddings' pooled features (output and stages), not
    # the mean token: prediction needs them, and mixes network and probe by the stored weight.
    from m2ost.learn.features.embeddings import read_embeddings

    state = torch.load(out / "model.pt", weights_only=True)["state"]
    assert state["ridge_input"] == "pooled" and state["ridge"] is not None
    model = M2OSTEncoder.from_state(state, SMALL)
    emb = read_embeddings(files["C"], "C", tokens=True)
    assert emb.pooled.shape[-1] > emb.tokens.shape[-1]  # the stages are in the pooled features
    model.weight = 0.5
    both = model.predict(emb.tokens, pooled=emb.pooled)
    by_hand = 0.5 * model._net_predict(emb.tokens) + 0.5 * model.ridge.predict(emb.pooled)
    np.testing.assert_allclose(both, by_hand, atol=1e-5)
    with pytest.raises(InputError, match="pooled features"):
        model.predict(emb.tokens)
    with pytest.raises(InputError, match="embeddings of sample A, expected C"):  # not its own cache
        evaluate(out / "model.pt", study["bundles"], study["expressions"], ["C"], tmp_path / "c",
                 device="cpu", figures=False, embeddings={"C": files["A"]})


def test_token_levels_reach_the_model(study_tokens, tmp_path):
    """The cached tokens carry the stages (token_levels 2, the default), the model is built on
    them and records the setting (its on-the-fly encoder follows it: the test above gives the
    same predictions from bundles as from the cache); embeddings of another token_levels are
    refused."""
    from m2ost.learn.features.fit_on_embeddings import fit_feature_model

    study, files = study_tokens
    settings = {"train": TRAIN, "model": {**SMALL, "token_pca": 0}, "encoder": {"input_px": 64, "token_levels": 2}}
    out = tmp_path / "model"
    fit_feature_model("m2ost_encoder", study["bundles"], study["expressions"], {s: files[s] for s in "AB"},
                      study["genes_file"], ["A", "B"], settings, out)
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["encoder"]["settings"]["token_levels"] == 2
    assert payload["state"]["sizes"]["in_dim"] == 1280 + 112 + 320
    assert payload["state"]["token_scale"] is not None
    settings["encoder"]["token_levels"] = 0
    with pytest.raises(InputError, match="differs in: token_levels"):
        fit_feature_model("m2ost_encoder", study["bundles"], study["expressions"], {s: files[s] for s in "AB"},
                          study["genes_file"], ["A", "B"], settings, tmp_path / "other")
