"""Foundation-model presets without their weights: every preset builds the vendor's architecture
(checked on the meta device against the model cards' sizes), loads a file written in the vendor's
layout strictly, forms the documented pooled embedding and token grid, and refuses a damaged or
foreign file in one line naming the file and the preset."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
from realdata import needs_her2st
from safetensors.torch import save_file

from m2ost.errors import InputError
from m2ost.learn.features import presets, sizing
from m2ost.learn.features.embeddings import read_embeddings, write_embeddings
from m2ost.learn.features.encoders import Encoder, create_backbone, encoder_settings, load_encoder

NAMES = list(presets.PRESETS)
SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
# The vendors' own construction, written out here from the model cards (layer classes as objects,
# not through the preset's strings): the file layout a user downloads is this network's state dict.
VENDOR = {
    "resnet50-trunc": ("resnet50", {}),
    "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                                      "dynamic_img_size": True}),
    "uni2-h": ("vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                                         "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                         "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True,
                                         **SWIGLU}),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5,
                                                      "dynamic_img_size": False}),
    "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5,
                                                      "dynamic_img_size": False}),
    "virchow2": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375,
                                          "reg_tokens": 4, "global_pool": "", "dynamic_img_size": True,
                                          **SWIGLU}),
    "prov-gigapath": ("vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16,
                                                   "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                                   "init_values": 1e-5, "mlp_ratio": 5.33334}),
    "h0-mini": ("vit_base_patch14_reg4_dinov2", {"img_size": 224, "global_pool": "", **SWIGLU}),
}
# Parameters (millions) the model cards / papers state: UNI ViT-L/16 303 M, UNI2-h 681 M,
# H-optimus-0/1 1.1 B, Virchow2 632 M, Prov-GigaPath's tile encoder 1.13 B.
PARAMS_M = {"uni": 303, "uni2-h": 681, "h-optimus-0": 1100, "h-optimus-1": 1100, "virchow2": 632,
            "prov-gigapath": 1130}
FILES = {"virchow2": "model.safetensors", "h0-mini": "model.safetensors"}


def _settings(preset: str, weights="w.bin", **extra) -> dict:
    return encoder_settings({"preset": preset, "weights": str(weights), **extra})


@pytest.mark.parametrize("name", NAMES)
def test_preset_builds_the_vendors_architecture(name):
    """On the meta device (no memory): the preset's network has the vendor's keys and shapes,
    the parameter count of the model card, and the documented embedding size."""
    p, s = presets.get(name), _settings(name)
    with torch.device("meta"):
        model, _ = create_backbone(s, load_weights=False)
        if name in VENDOR:
            arch, kwargs = VENDOR[name]
            vendor = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).state_dict()
            vendor = presets.drop_keys(vendor, name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if name in VENDOR:
        assert ours == {k: tuple(v.shape) for k, v in vendor.items()}
    if name in PARAMS_M:
        n = sum(int(np.prod(shape)) for shape in ours.values()) / 1e6
        assert n == pytest.approx(PARAMS_M[name], rel=0.05)  # the cards round (1.1 B)
    assert presets.pooled_width(model, s["pool"]) == p.pooled_dim
    assert int(model.num_features) == p.token_dim
    if hasattr(model, "reg_token") and model.reg_token is not None:  # registers: prefix tokens left out
        assert model.num_prefix_tokens == 1 + model.reg_token.shape[1]


def _vendor_file(name: str, folder, depth: int | None = 1):
    """A checkpoint in the vendor's layout (their construction, random values), ``depth`` blocks."""
    arch, kwargs = VENDOR[name]
    kwargs = {**kwargs, **({"depth": depth} if depth and arch.startswith("vit") else {})}
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=1000 if arch == "resnet50" else 0, **kwargs)
    sd = {k: v if not v.dtype.is_floating_point else torch.rand(v.shape) + 0.5 if k.endswith("running_var")
          else torch.randn(v.shape) * 0.05 for k, v in net.state_dict().items()}
    path = folder / FILES.get(name, "pytorch_model.bin")
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("name", [n for n in NAMES if n in VENDOR])
def test_preset_loads_a_vendor_layout_file_strictly(name, tmp_path):
    """The real load path on a small file (one block; HEST's ResNet50 whole, with the layer4 and
    fc keys that the preset drops): every tensor lands, and the outputs have the documented sizes."""
    p = presets.get(name)
    path, sd = _vendor_file(name, tmp_path)
    small = {"depth": 1} if p.arch.startswith("vit") else {}
    enc = load_encoder({"preset": name, "weights": str(path), "kwargs": small}, "cpu")
    own = enc.model.state_dict()
    for key in own:
        torch.testing.assert_close(own[key], sd[key], rtol=0, atol=0)
    images = np.random.default_rng(0).integers(0, 255, (2, 150, 150, 3), dtype=np.uint8)
    pooled, grid = enc.encode(images, tokens=True)  # resized to the native 224 px first
    assert pooled.shape == (2, p.pooled_dim) and enc.dim == p.pooled_dim
    assert grid.shape == (2, p.grid, p.grid, p.token_dim)
    assert np.isfinite(pooled).all() and np.abs(pooled[0] - pooled[1]).max() > 0
    if p.pool == "cls_mean":  # the class token, then the mean of the patch tokens (no registers)
        np.testing.assert_allclose(pooled[:, p.token_dim:], grid.mean((1, 2)), rtol=1e-4, atol=1e-4)
    if p.pool == "mean":
        np.testing.assert_allclose(pooled, grid.mean((1, 2)), rtol=1e-4, atol=1e-4)


def test_a_damaged_or_foreign_file_fails_in_one_line_naming_file_and_preset(tmp_path):
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError) as err:
        load_encoder({"preset": "uni2-h", "weights": str(bad), "kwargs": {"depth": 1}}, "cpu")
    assert str(bad) in str(err.value) and "uni2-h" in str(err.value) and "\n" not in str(err.value)
    uni, _ = _vendor_file("uni", tmp_path / "", depth=1)  # UNI's file under the UNI2-h preset
    with pytest.raises(InputError) as err:
        load_encoder({"preset": "uni2-h", "weights": str(uni), "kwargs": {"depth": 1}}, "cpu")
    msg = str(err.value)
    assert str(uni) in msg and "preset uni2-h" in msg and "\n" not in msg
    assert "shape mismatches" in msg or "missing keys" in msg


def test_preset_and_explicit_keys():
    """Explicit keys win (kwargs merge key by key); a name other than the preset's is an error;
    a preset without its weights file says which file it needs."""
    s = _settings("uni", mpp=0.25, kwargs={"dynamic_img_size": False})
    assert s["name"] == "vit_large_patch16_224" and s["mpp"] == 0.25 and s["pool"] == "cls"
    assert s["kwargs"] == {**presets.get("uni").kwargs, "dynamic_img_size": False}
    assert s["mean"] == presets.IMAGENET_MEAN and s["levels"] == 0 and s["token_levels"] == 0
    assert encoder_settings(s) == s  # a stored (resolved) record resolves to itself
    with pytest.raises(InputError, match="conflicts with encoder.preset uni"):
        _settings("uni", name="resnet50")
    with pytest.raises(InputError, match="needs encoder.weights: the vendor's pytorch_model.bin"):
        encoder_settings({"preset": "h-optimus-0"})
    with pytest.raises(InputError, match="unknown encoder.preset"):
        _settings("uni3")
    assert encoder_settings({"preset": "efficientnet-lite0"})["levels"] == 3  # the default's own


def test_auto_batch_size_follows_the_free_memory(monkeypatch):
    enc = load_encoder({"levels": 0, "token_levels": 0}, "cpu")
    per_image = sizing.bytes_per_image(enc, tokens=True)
    assert per_image > 3 * 224 * 224 * 4
    monkeypatch.setattr(sizing, "free_memory", lambda device: 40 * per_image)
    assert sizing.auto_batch_size(enc, tokens=True) == 20
    monkeypatch.setattr(sizing, "free_memory", lambda device: 1 << 50)
    assert sizing.auto_batch_size(enc, tokens=True) == sizing.MAX_BATCH


@needs_her2st
def test_h0_mini_on_real_b4_spots(tmp_path, caplog):
    """The whole ViT-B/14 of H0-mini (random weights in the vendor's layout) on real HER2+ views:
    the embed stage stores the 1536 pooled values and the 8 x 8 grid of 768 channels per view
    (encoder.token_grid 8: each cell the mean of 2 x 2 patch tokens), and warns of the view
    that reaches the encoder far from its 0.5 µm/px."""
    from her2st_views import write_section_bundle

    path, _ = _vendor_file("h0-mini", tmp_path, depth=None)
    views, _ = write_section_bundle(tmp_path / "B4.h5", "B4", 3, size=112)
    full = load_encoder({"preset": "h0-mini", "weights": str(path)}, "cpu")
    enc = Encoder(full.model, {**full.settings, "token_grid": 8}, full.weights_file, full.checksum, full.device)
    with caplog.at_level(logging.WARNING):
        write_embeddings(enc, tmp_path / "B4.h5", tmp_path / "emb.h5", sample="B4", tokens=True,
                         batch_size="auto", progress=False)
    assert "view 2 reaches the encoder at 2.76 um/px" in caplog.text
    emb = read_embeddings(tmp_path / "emb.h5", "B4", tokens=True, encoder=enc.record())
    assert emb.pooled.shape == (3, 3, 1536) and emb.tokens.shape == (3, 3, 64, 768) and emb.grid == (8, 8)
    pooled, grid = full.encode(views[0], tokens=True)
    np.testing.assert_allclose(emb.pooled[:, 0], pooled, rtol=1e-3, atol=1e-3)
    by_hand = grid.reshape(3, 8, 2, 8, 2, 768).mean((2, 4)).reshape(3, 64, 768)
    np.testing.assert_allclose(emb.tokens[:, 0].astype(np.float32), by_hand, rtol=1e-2, atol=2e-2)
    assert np.abs(emb.pooled[0, 0] - emb.pooled[1, 0]).max() > 1e-3  # different tissue, different features
    with pytest.raises(InputError, match="token_grid"):  # the cache of another grid is refused
        read_embeddings(tmp_path / "emb.h5", "B4", tokens=True, encoder=full.record())
