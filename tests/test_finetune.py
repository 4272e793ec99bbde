"""m2ost_finetune: M2OST over the encoder's tokens with the encoder's last stages fine-tuned.

On real HER2+ views: before training, the network sees exactly the tokens the frozen encoder
caches; only the chosen stages and the new layers train, the encoder's at its own learning
rate; it learns real expression (well above a shuffled-target control); model.pt predicts
without the weights file and gives the trained network's predictions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from realdata import HER2ST, her2st_files, needs_her2st
from synthetic import write_expression, write_genes

from m2ost import defaults
from m2ost.errors import InputError
from m2ost.learn.inputs.augment import prepare_batch
from m2ost.learn.inputs.dataset import load_sample
from m2ost.learn.features.encoders import load_encoder
from m2ost.learn.features.finetune import build_finetune_network, finetune_settings
from m2ost.learn.training.fit_on_views import fit_model
from m2ost.learn.inputs.loader import SpotDataset
from m2ost.learn.training.network import param_groups
from m2ost.learn.inference.predictor import load_model
from m2ost.learn.features.token_model import NETWORK_KEYS
from m2ost.plan.settings import train_settings

N_SPOTS, N_GENES = 150, 30
ENCODER = {"input_px": 64}  # 112-px views seen at 64 px: a 2 x 2 token grid, quick on a CPU
FAST = {"finetune_blocks": 1, "dim": 32, "heads": 2, "mlp_dim": 64, "encoder": ENCODER}
TRAIN = {"epochs": 8, "batch_size": 16, "lr": 1e-3, "workers": 0, "patience": 0, "seed": 0,
         "device": "cpu", "val_fraction": 0.3, "warmup_epochs": 1}


def test_settings_come_from_the_schema_and_share_the_token_network_defaults():
    schema = yaml.safe_load(defaults.schema_path().read_text())["properties"]
    section = schema["m2ost_finetune"]["properties"]
    assert finetune_settings(None) == {k: v["default"] for k, v in section.items()}
    token_network = defaults.section("m2ost_encoder")
    assert {k: section[k]["default"] for k in NETWORK_KEYS} == {k: token_network[k] for k in NETWORK_KEYS}
    with pytest.raises(InputError, match=r"unknown setting m2ost_finetune\.depht"):
        finetune_settings({"depht": 2})
    # the workflow gives the kind its section, the encoder that defines the network, and the
    # training section; not the settings of how embeddings are stored
    config = defaults.config_defaults()
    config["encoder"].update(tta=True, tokens=True, input_px=96)
    got = train_settings("m2ost_finetune", config)
    assert {k: v for k, v in got["model"].items() if k != "encoder"} == config["m2ost_finetune"]
    assert got["model"]["encoder"]["input_px"] == 96 and "tta" not in got["model"]["encoder"]
    assert got["train"] == config["train"]


@pytest.fixture(scope="module")
def b4_views():
    from her2st_views import spot_views

    views, _, _ = spot_views("B4", 6)
    return np.stack(views, 1)  # (6, 3 views, 112, 112, 3) uint8


@needs_her2st
def test_untrained_network_sees_the_tokens_of_the_frozen_encoder(b4_views):
    """The views, normalised for M2OST, are renormalised and resized for the encoder exactly as
    the embed stage prepares them."""
    net = build_finetune_network(FAST, n_genes=5, n_views=3).eval()
    with torch.no_grad():
        tokens = net.tokens(prepare_batch(torch.from_numpy(b4_views), torch.device("cpu"))).numpy()
    encoder = load_encoder(ENCODER, "cpu")
    for v in range(3):
        _, grid = encoder.encode(b4_views[:, v], tokens=True)
        ref = grid.reshape(len(grid), -1, grid.shape[-1])[..., :1280]  # the output's channels (token_levels aside)
        assert tokens.shape[2:] == ref.shape[1:] == (4, 1280)
        np.testing.assert_allclose(tokens[:, v], ref, atol=2e-3 * np.abs(ref).max())


def test_only_the_last_stages_and_the_new_layers_train_at_their_rates():
    net = build_finetune_network({**FAST, "encoder_lr_scale": 0.2}, n_genes=5, n_views=3)
    last = len(net.backbone.blocks) - 1
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert {n for n in trained if n.startswith("backbone.")} == {
        n for n, _ in net.named_parameters()
        if n.startswith((f"backbone.blocks.{last}.", "backbone.conv_head", "backbone.bn2"))}
    assert {n for n, _ in net.named_parameters() if n.startswith("net.")} <= trained
    groups = param_groups(net, 0.05, 1e-3)
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.05
    backbone = {id(p) for n, p in net.named_parameters() if n.startswith("backbone.") and p.requires_grad}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= backbone if g["lr"] == pytest.approx(2e-4) else not ids & backbone
    assert sum(len(g["params"]) for g in groups) == len(trained)
    net.train()
    assert not net.backbone.training and net.net.training  # pretrained batch-norm statistics kept
    frozen = build_finetune_network({**FAST, "finetune_blocks": 0}, n_genes=5, n_views=3)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


@pytest.fixture(scope="module")
def c3_study(tmp_path_factory):
    """A bundle of N_SPOTS real C3 spots (three 112-px views) and the log1p-CPM expression of
    the N_GENES most variable panel genes, real and shuffled over the spots, in the workflow's
    file layouts."""
    from her2st_views import write_section_bundle

    root = tmp_path_factory.mktemp("c3")
    _, barcodes = write_section_bundle(root / "C3.h5", "C3", N_SPOTS)
    counts = pd.read_csv(her2st_files("C3")["counts"], sep="\t", index_col=0)
    panel = (HER2ST / "gene-panels" / "m2ost_250.txt").read_text().split()
    rows = np.flatnonzero(np.isin(barcodes, counts.index))  # a few spots have no counts row
    c = counts.loc[np.asarray(barcodes)[rows]]
    y = np.log1p(c[panel].to_numpy(np.float64) / c.sum(1).to_numpy()[:, None] * 1e6)
    keep = np.argsort(-y.var(0))[:N_GENES]
    genes, y = [panel[i] for i in keep], y[:, keep]
    coords = np.zeros((N_SPOTS, 2))
    shuffled = y[np.random.default_rng(0).permutation(len(y))]
    return {"bundle": str(root / "C3.h5"), "genes_file": write_genes(root / "genes.txt", genes),
            "expression": {name: str(write_expression(root / f"{name}.h5ad", "C3", barcodes, rows, values,
                                                      genes, coords))
                           for name, values in (("real", y), ("shuffled", shuffled))}}


@needs_her2st
def test_learns_real_expression_and_predicts_from_model_pt_alone(c3_study, tmp_path):
    def fit(which, out):
        result = fit_model("m2ost_finetune", {"C3": c3_study["bundle"]}, {"C3": c3_study["expression"][which]},
                           c3_study["genes_file"], ["C3"], FAST, TRAIN, out)
        return result["best_val_gene_pcc"]

    real = fit("real", tmp_path / "real")
    control = fit("shuffled", tmp_path / "shuffled")
    print("real", real, "control", control)
    assert real > 0.12, real
    assert real > control + 0.1, (real, control)

    # model.pt holds the fine-tuned encoder: it predicts with no weights file to read, and
    # gives what the trained network gives
    payload = torch.load(tmp_path / "real" / "model.pt", weights_only=True)
    assert any(k.startswith("backbone.blocks.6.") for k in payload["state_dict"])
    payload["model_cfg"]["encoder"]["weights"] = str(tmp_path / "gone.pth")
    torch.save(payload, tmp_path / "moved.pt")
    predictor = load_model(tmp_path / "moved.pt", "cpu")
    ds = SpotDataset([load_sample(c3_study["bundle"], c3_study["expression"]["real"], predictor.genes)],
                     predictor.views)
    pred = predictor.predict(ds, batch_size=32)
    net = build_finetune_network(payload["model_cfg"], len(predictor.genes), 3, pretrained=False)
    net.load_state_dict(payload["state_dict"])
    net.eval()
    images, _, _ = ds.__getitems__(list(range(8)))
    with torch.no_grad():
        ref = net(prepare_batch(images, torch.device("cpu"))).numpy()
    np.testing.assert_allclose(pred[:8], ref, rtol=1e-5, atol=1e-5)
    assert set(payload["val_gene_pcc_per_gene"]) == set(predictor.genes)


def test_a_weights_file_that_is_missing_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="encoder weights file not found"):
        build_finetune_network({**FAST, "encoder": {**ENCODER, "weights": str(tmp_path / "uni.pth")}}, 5, 3)

