"""Pretrained encoders: the default EfficientNet-Lite0 reproduces the reference package on real
H&E, any timm architecture loads local weights, and bad weights end in one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from realdata import REPO, needs_her2st

from m2ost.errors import InputError
from m2ost.learn.features.encoders import (DEFAULT_WEIGHTS, default_weights_file, encoder_settings,
                                  load_encoder, stored_settings)

SCHEMA = REPO / "m2ost/schemas/config.schema.yaml"


@pytest.fixture(scope="module")
def b4_crops():
    """Three real 224-px H&E crops of B4 (0.69 µm/px: the default encoder's input size)."""
    from her2st_views import spot_views

    views, _, _ = spot_views("B4", 3, fovs_px=(224,), size=224)
    return views[0]


@pytest.fixture(scope="module")
def lite0():
    return load_encoder({}, "cpu")


def test_schema_defaults_are_the_encoder_defaults():
    props = yaml.safe_load(SCHEMA.read_text())["properties"]["encoder"]["properties"]
    assert encoder_settings(None) == {k: v.get("default") for k, v in props.items()}
    assert props["weights"]["default"] == DEFAULT_WEIGHTS
    with pytest.raises(InputError, match=r"encoder\.input_px must be >= 16, got 8"):
        encoder_settings({"input_px": 8})
    with pytest.raises(InputError, match=r"encoder\.std\[1\] must be > 0"):
        encoder_settings({"std": [0.5, 0, 0.5]})
    with pytest.raises(InputError, match=r"encoder\.mean needs at least 3 values"):
        encoder_settings({"mean": [0.5, 0.5]})


@needs_her2st
def test_default_encoder_reproduces_the_reference_efficientnet_lite0(b4_crops, lite0):
    """timm's network with the renamed weights gives the reference package's features."""
    EfficientNet = pytest.importorskip("efficientnet_lite_pytorch", reason="reference package "
                                       "efficientnet-lite-pytorch (test extra) not installed").EfficientNet
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(default_weights_file())).eval()
    x = torch.from_numpy(b4_crops).permute(0, 3, 1, 2).float() / 255.0
    x = (x - 127.0 / 255) / (128.0 / 255)  # the TensorFlow Lite models' input scaling
    with torch.no_grad():
        feats = ref.extract_features(x)
        logits = ref(x)
        stages = _reference_stage_outputs(ref, x)
    pooled, tokens = lite0.encode(b4_crops, tokens=True)
    assert lite0.blocks == [1280, 40, 112, 320]  # the output, then the last three stages (levels 3)
    assert pooled.shape == (3, 1752) and pooled.dtype == np.float32
    assert tokens.shape == (3, 7, 7, 1712)  # the output's 1280 channels, then 2 stages' (token_levels 2)
    tokens = tokens[..., :1280]
    np.testing.assert_allclose(pooled[:, :1280], feats.mean((2, 3)).numpy(), rtol=0, atol=2e-3)
    start = 1280
    for channels in (40, 112, 320):  # each stage's pooled map, as the reference computes it
        np.testing.assert_allclose(pooled[:, start:start + channels], stages[channels].mean((2, 3)).numpy(),
                                   rtol=0, atol=2e-3)
        start += channels
    pooled = pooled[:, :1280]
    np.testing.assert_allclose(tokens, feats.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-2)
    # The ImageNet head of the same file on our pooled features gives the reference logits:
    # the weights are the right ones, not just a network of the right shape.
    sd = torch.load(default_weights_file(), map_location="cpu", weights_only=True)
    ours = torch.from_numpy(pooled) @ sd["_fc.weight"].T + sd["_fc.bias"]
    np.testing.assert_allclose(ours.numpy(), logits.numpy(), rtol=0, atol=2e-2)
    # H&E tissue differs between crops: the features are not a constant.
    assert np.abs(pooled[0] - pooled[1]).max() > 0.1


def _reference_stage_outputs(ref, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """The last block output of each stage of the reference network, by channel count (the
    reference package's extract_features, stopped along the way)."""
    x = ref._swish(ref._bn0(ref._conv_stem(x)))
    out = {}
    for block in ref._blocks:
        x = block(x)
        out[x.shape[1]] = x
    return out


def test_levels_0_gives_the_output_alone_and_old_records_mean_levels_0():
    plain = load_encoder({"levels": 0}, "cpu")
    assert plain.blocks == [1280] and plain.dim == 1280
    old_record = {"settings": {k: v for k, v in plain.record()["settings"].items() if k != "levels"}}
    assert stored_settings(old_record)["levels"] == 0  # models saved before levels existed
    with pytest.raises(InputError, match="levels must be >= 0"):
        encoder_settings({"levels": -1})


@needs_her2st
def test_token_levels_append_the_stages_maps_pooled_to_the_grid(b4_crops, lite0):
    """encoder.token_levels 2 (the default): every token carries the output's channels, then the
    112-channel stage (14 x 14, averaged 2 x 2 onto the 7 x 7 grid), then the 320-channel stage."""
    enc, plain = lite0, load_encoder({"token_levels": 0}, "cpu")
    assert enc.token_blocks == [1280, 112, 320] and enc.record()["token_blocks"] == [1280, 112, 320]
    assert plain.token_blocks == [1280] and enc.blocks == plain.blocks  # pooled features unchanged
    pooled, grid = enc.encode(b4_crops, tokens=True)
    pooled0, grid0 = plain.encode(b4_crops, tokens=True)
    assert grid.shape == (3, 7, 7, 1712)
    np.testing.assert_array_equal(pooled, pooled0)
    np.testing.assert_array_equal(grid[..., :1280], grid0)
    x = torch.from_numpy(b4_crops).permute(0, 3, 1, 2).float() / 255.0
    x = (x - 0.498) / 0.502
    with torch.no_grad():
        _, (s112, s320) = plain.model.forward_intermediates(x, indices=2, intermediates_only=False)
    by_hand = s112.reshape(3, 112, 7, 2, 7, 2).mean((3, 5)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(grid[..., 1280:1392], by_hand, rtol=0, atol=1e-4)
    np.testing.assert_allclose(grid[..., 1392:], s320.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-4)
    # the stages' pooled means are the pooled features' stage blocks: the same maps
    np.testing.assert_allclose(grid[..., 1392:].mean((1, 2)), pooled[:, -320:], rtol=0, atol=1e-4)
    # a grid that is not a multiple (112-px input: 7 x 7 stage onto a 4 x 4 grid) is pooled too
    _, small = load_encoder({"input_px": 112}, "cpu").encode(b4_crops, tokens=True)
    assert small.shape == (3, 4, 4, 1712) and np.isfinite(small).all()
    old_record = {"settings": {k: v for k, v in enc.record()["settings"].items() if k != "token_levels"}}
    assert stored_settings(old_record)["token_levels"] == 0  # files and models saved before it
    with pytest.raises(InputError, match="token_levels must be >= 0"):
        encoder_settings({"token_levels": -1})


@needs_her2st
def test_symmetric_padding_variant_would_not_reproduce_the_reference(b4_crops, lite0):
    """Why the default is tf_efficientnet_lite0: timm's efficientnet_lite0 pads symmetrically
    and, with the same weights, computes other features."""
    other = load_encoder({"name": "efficientnet_lite0"}, "cpu")
    assert np.abs(other.encode(b4_crops) - lite0.encode(b4_crops)).max() > 0.1


@needs_her2st
def test_views_are_resized_to_the_input_size(b4_crops, lite0):
    small = b4_crops[:, ::2, ::2].copy()  # 112 px
    pooled, tokens = lite0.encode(small, tokens=True)
    assert pooled.shape == (3, 1752) and tokens.shape == (3, 7, 7, 1712)
    assert np.corrcoef(pooled.ravel(), lite0.encode(b4_crops).ravel())[0, 1] > 0.8  # same tissue, half the detail


@needs_her2st
def test_tta_features_do_not_depend_on_the_orientation(b4_crops, lite0):
    """encoder.tta averages over the 8 flips/rotations: a turned or mirrored crop gives the same
    pooled features and the turned token grid; without tta it does not."""
    tta = load_encoder({"tta": True}, "cpu")
    pooled, grid = tta.encode(b4_crops, tokens=True)
    turned = np.ascontiguousarray(np.rot90(b4_crops, 1, axes=(1, 2))[:, :, ::-1])
    pooled_t, grid_t = tta.encode(turned, tokens=True)
    np.testing.assert_allclose(pooled_t, pooled, rtol=0, atol=1e-4)
    np.testing.assert_allclose(grid_t, np.rot90(grid, 1, axes=(1, 2))[:, :, ::-1], rtol=0, atol=1e-4)
    assert np.abs(lite0.encode(turned) - lite0.encode(b4_crops)).max() > 0.05
    # The average of the plain encoder over the eight orientations, computed by hand.
    by_hand = np.mean([lite0.encode(np.ascontiguousarray(np.rot90(b4_crops, k, axes=(1, 2))[:, :, ::-1] if f
                                                         else np.rot90(b4_crops, k, axes=(1, 2))))
                       for f in (False, True) for k in range(4)], 0)
    np.testing.assert_allclose(pooled, by_hand, rtol=0, atol=1e-4)
    assert tta.record()["settings"]["tta"] is True  # embeddings and models record it


def test_missing_weights_file_is_one_clear_error(tmp_path):
    path = tmp_path / "uni.bin"
    with pytest.raises(InputError, match="encoder weights file not found") as err:
        load_encoder({"name": "resnet18", "weights": str(path)}, "cpu")
    assert str(path) in str(err.value)


def test_weights_of_another_architecture_are_refused(tmp_path):
    with pytest.raises(InputError, match="is not; set encoder.name") as err:
        load_encoder({"name": "resnet18", "weights": DEFAULT_WEIGHTS}, "cpu")
    assert "efficientnet-lite0" in str(err.value)
    import timm

    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    with pytest.raises(InputError, match="do not fit the architecture 'resnet34'.*missing keys") as err:
        load_encoder({"name": "resnet34", "weights": str(path)}, "cpu")
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="shape mismatches"):
        load_encoder({"name": "resnet50", "weights": str(path)}, "cpu")


def test_user_checkpoint_with_prefix_and_classifier_loads(tmp_path):
    """A checkpoint as training scripts save it (wrapped, 'module.' prefix, a classifier head)
    loads into the encoder: the head is dropped, every other tensor is used."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=5).eval()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    cfg = {"name": "resnet18", "input_px": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    a = load_encoder({**cfg, "weights": str(tmp_path / "ckpt.pt")}, "cpu")
    b = load_encoder({**cfg, "weights": str(tmp_path / "w.safetensors")}, "cpu")
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - a._mean) / a._std
    with torch.no_grad():
        want = net.forward_head(net.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(a.encode(images)[:, :512], want, atol=1e-5)
    np.testing.assert_allclose(b.encode(images), a.encode(images), atol=1e-5)
    assert a.checksum != b.checksum
    # levels 3 on a ResNet: layer2-4 pooled beside the output (layer4 is also the output)
    assert a.blocks == [512, 128, 256, 512] and a.dim == 1408
    np.testing.assert_allclose(a.encode(images)[:, -512:], want, atol=1e-5)


def test_unknown_settings_and_architectures_are_refused():
    with pytest.raises(InputError, match=r"unknown setting encoder\.colour"):
        encoder_settings({"colour": 1})
    with pytest.raises(InputError, match="cannot be built by timm"):
        load_encoder({"name": "no_such_net_v9"}, "cpu")
    with pytest.raises(InputError, match="cannot read encoder weights"):
        load_encoder({"name": "resnet18", "weights": str(SCHEMA)}, "cpu")
