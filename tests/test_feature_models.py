"""Models over encoder features: the HEST-Benchmark probe, training from the cached embeddings
and evaluation from the bundles (the encoder on the fly) giving the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import N_GENES, embed_study

from m2ost.errors import InputError
from m2ost.learn.features.embeddings import read_embeddings
from m2ost.learn.inference.heldout import evaluate
from m2ost.learn.features.probes import PCA_COMPONENTS, EncoderRidge, FeatureSet
from m2ost.learn.training.fit_on_views import fit_model
from m2ost.learn.features.fit_on_embeddings import feature_data, fit_feature_model
from m2ost.learn.inference.predictor import load_model
from m2ost.learn.training.identity import train_settings
from m2ost.learn.training.trainer import training_data

# The synthetic views are 32 px: a 64-px encoder input keeps the tests fast (12x fewer pixels).
ENCODER = {"input_px": 64}
TRAIN = {"seed": 7, "val_fraction": 0.2, "drop_padded": True, "device": "cpu"}


def _linear_problem(rng, n, dim=300, genes=5, noise=0.3):
    """Features of low rank (as encoder features are) plus noise; expression linear in the latent."""
    z = rng.normal(size=(n, 12))
    x = (z @ rng.normal(size=(12, 2 * dim)) + rng.normal(size=(n, 2 * dim))).reshape(n, 2, dim)
    y = z @ rng.normal(size=(12, genes)) + noise * rng.normal(size=(n, genes))
    return x.astype(np.float32), y.astype(np.float32)


def test_probe_learns_a_linear_signal_and_nothing_from_noise():
    rng = np.random.default_rng(0)
    x, y = _linear_problem(rng, 400)
    group = np.repeat([0, 1], 200)
    train, val = FeatureSet(x[:300], y[:300], group[:300]), FeatureSet(x[300:], y[300:], group[300:])
    model = EncoderRidge()
    rows = model.fit(train, val)
    assert model.components.shape == (PCA_COMPONENTS, 600)
    assert sum(r["chosen"] for r in rows) == 1
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["val_gene_pcc"] == max(r["val_gene_pcc"] for r in rows) > 0.7
    shuffled = EncoderRidge()
    rows = shuffled.fit(FeatureSet(x[:300], rng.permutation(y[:300]), group[:300]), val)
    assert max(r["val_gene_pcc"] for r in rows) < 0.3
    # State round trip: the same predictions.
    again = EncoderRidge.from_state(model.state())
    np.testing.assert_array_equal(again.predict(x[300:]), model.predict(x[300:]))


def test_probe_caps_the_components_at_the_number_of_training_spots():
    rng = np.random.default_rng(1)
    x, y = _linear_problem(rng, 60)
    model = EncoderRidge()
    model.fit(FeatureSet(x[:50], y[:50], np.zeros(50, int)), FeatureSet(x[50:], y[50:], np.zeros(10, int)))
    assert model.components.shape == (50, 600)
    assert model.predict(x[50:]).shape == (10, 5)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The synthetic study (A, B: patient P1; C: P2), 48 spots per sample."""
    from synthetic import make_study

    return make_study(tmp_path_factory.mktemp("study48"), n_spots=48)


@pytest.fixture(scope="module")
def embedded(study, tmp_path_factory):
    """The study embedded by the default encoder."""
    return embed_study(study, tmp_path_factory.mktemp("embedded"), ENCODER)


@pytest.fixture(scope="module")
def ridge_ab(study, embedded):
    out = embedded["root"] / "encoder_ridge"
    result = fit_feature_model("encoder_ridge", study["bundles"], study["expressions"], embedded["files"],
                               study["genes_file"], ["A", "B"], {"train": TRAIN, "encoder": ENCODER}, out)
    return out, result


def test_trains_on_the_spots_and_validation_draw_of_the_other_kinds(study, embedded):
    """The same training and validation spots, in the same order, as the networks and the
    handcrafted ridge (trainer.training_data): held-out C is neither trained nor validated on."""
    cfg = train_settings(TRAIN)
    train, val, data, record, views = feature_data("encoder_ridge", study["bundles"], study["expressions"],
                                                   embedded["files"], study["genes"], ["A", "B"], cfg)
    train_ds, val_ds = training_data(study["bundles"], study["expressions"], study["genes"], ["A", "B"], None, cfg)
    assert len(train) == len(train_ds) and len(val) == len(val_ds) > 0
    np.testing.assert_array_equal(train.y, train_ds.targets())
    np.testing.assert_array_equal(val.y, val_ds.targets())
    np.testing.assert_array_equal(val.group, val_ds.index[:, 0])
    assert [d.sample for d in data] == ["A", "B"] and views == [0, 1, 2]
    assert record["checksum"] == embedded["encoder"].checksum
    assert train.x.shape == (len(train), 3, 1752)


def test_evaluation_from_bundles_equals_prediction_from_the_cache(study, embedded, ridge_ab, tmp_path):
    """What is scored (views encoded on the fly) is what the cached features give."""
    out, _ = ridge_ab
    model = load_model(out / "model.pt", "cpu")
    assert model.kind == "encoder_ridge" and model.views == [0, 1, 2]
    summary = evaluate(out / "model.pt", study["bundles"], study["expressions"], ["C"], tmp_path,
                       device="cpu", batch_size=7, figures=False)
    import anndata

    pred = anndata.read_h5ad(tmp_path / "predictions.h5ad")
    rows = pred.obs["bundle_row"].to_numpy()
    cached = read_embeddings(embedded["files"]["C"], "C", rows=rows).pooled
    np.testing.assert_allclose(pred.X, model.impl.model.predict(cached), atol=1e-3)
    # Learning test: the spot colour drives the synthetic expression; the probe finds it.
    assert summary["mean"]["gene_pcc_mean"] > 0.5


def test_view0_probe_uses_view_0_only(study, embedded, tmp_path):
    fit_feature_model("encoder_ridge_v0", study["bundles"], study["expressions"], embedded["files"],
                      study["genes_file"], ["A", "B"], {"train": TRAIN}, tmp_path)
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert payload["views"] == [0] and payload["state"]["components"].shape[1] == 1752
    assert len(payload["genes"]) == N_GENES
    assert payload["intervals"]["scores"].shape[1] == N_GENES  # calibrated on the validation spots


def test_model_stores_the_encoder_settings_not_its_weights(ridge_ab, embedded, tmp_path):
    out, _ = ridge_ab
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["encoder"]["checksum"] == embedded["encoder"].checksum
    assert payload["encoder"]["settings"]["name"] == "tf_efficientnet_lite0"
    assert sum(t.numel() for t in payload["state"].values() if torch.is_tensor(t)) < 2e6
    # A model whose encoder weights changed since training is refused.
    payload["encoder"]["checksum"] = "f" * 64
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(InputError, match="encoder weights differ from those the model was trained with"):
        load_model(tmp_path / "model.pt", "cpu")


def test_embeddings_of_another_encoder_config_are_refused(study, embedded, tmp_path):
    with pytest.raises(InputError, match="another encoder .*input_px"):
        fit_feature_model("encoder_ridge", study["bundles"], study["expressions"], embedded["files"],
                          study["genes_file"], ["A", "B"], {"train": TRAIN, "encoder": {"input_px": 96}},
                          tmp_path)
    with pytest.raises(InputError, match="no embeddings file given"):
        fit_feature_model("encoder_ridge", study["bundles"], study["expressions"], {"A": embedded["files"]["A"]},
                          study["genes_file"], ["A", "B"], {"train": TRAIN}, tmp_path)
    with pytest.raises(InputError, match="trains on encoder embeddings"):
        fit_model("encoder_ridge", study["bundles"], study["expressions"], study["genes_file"], ["A"], {}, {},
                  tmp_path)


def test_probe_trains_on_embeddings_of_any_token_levels(study, embedded, tmp_path):
    """The probes read the pooled features, which token_levels does not change: embeddings stored
    with the stage tokens (the default) serve a config that stores the output's tokens alone (the
    demo's), and the other way round."""
    assert read_embeddings(embedded["files"]["A"], "A").encoder["settings"]["token_levels"] == 2
    result = fit_feature_model("encoder_ridge", study["bundles"], study["expressions"], embedded["files"],
                               study["genes_file"], ["A", "B"],
                               {"train": TRAIN, "encoder": {**ENCODER, "token_levels": 0}}, tmp_path)
    assert (tmp_path / "model.pt").exists() and result["n_train"] > 0
    # and it is scored from cached embeddings whose token grids differ from its record's
    record = load_model(tmp_path / "model.pt").meta["encoder"]
    other = {**record, "settings": {**record["settings"], "token_levels": 0}}
    assert len(read_embeddings(embedded["files"]["C"], "C", encoder=other).barcode) == 48
    with pytest.raises(InputError, match="differs in: input_px"):  # what the pooled features depend on
        read_embeddings(embedded["files"]["C"], "C",
                        encoder={**other, "settings": {**other["settings"], "input_px": 96}})


def test_probe_weighs_each_feature_block_equally():
    """The encoder's output and its intermediate stages (Encoder.blocks) are scaled to the same
    total variance before the PCA: multiplying one block by 1000 changes nothing, whereas without
    the block sizes the PCA would follow the big block."""
    rng = np.random.default_rng(0)
    n = 120
    x = rng.normal(size=(n, 2, 30)).astype(np.float32)
    y = (x[:, :, :10].sum(axis=(1, 2), keepdims=False)[:, None] * np.ones((1, 4))
         + rng.normal(scale=0.5, size=(n, 4))).astype(np.float32)
    group = np.zeros(n, int)
    loud = x.copy()
    loud[..., 10:] *= 1000.0  # the second block in other units

    def fitted(features, blocks):
        m = EncoderRidge()
        m.fit(FeatureSet(features[:90], y[:90], group[:90], blocks=blocks),
              FeatureSet(features[90:], y[90:], group[90:], blocks=blocks))
        return m

    a, b = fitted(x, (10, 20)), fitted(loud, (10, 20))
    np.testing.assert_allclose(a.predict(x), b.predict(loud), rtol=1e-4, atol=1e-4)
    unscaled = fitted(loud, ())
    assert np.abs(unscaled.predict(loud) - b.predict(loud)).max() > 0.1
    again = EncoderRidge.from_state(b.state())
    np.testing.assert_allclose(again.predict(loud), b.predict(loud), atol=1e-5)
    with pytest.raises(InputError, match="do not add up"):
        fitted(x, (10, 10))


def test_token_levels_reach_the_token_kind_only():
    """encoder.token_levels changes the cached token grids, not the pooled features: it is a
    setting of m2ost_encoder's training job, not of the probes' (nor of m2ost_finetune's,
    which builds its own tokens from the output)."""
    from m2ost import defaults
    from m2ost.plan.settings import train_settings as job_settings

    config = defaults.config_defaults()
    config["encoder"]["token_levels"] = 2
    assert job_settings("m2ost_encoder", config)["encoder"]["token_levels"] == 2
    for kind in ("encoder_ridge", "encoder_ridge_v0"):
        enc = job_settings(kind, config)["encoder"]
        assert "token_levels" not in enc and enc["levels"] == config["encoder"]["levels"]
    assert "token_levels" not in job_settings("m2ost_finetune", config)["model"]["encoder"]
