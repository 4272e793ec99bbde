"""Stain augmentation (HED jitter): it moves the haematoxylin, eosin and DAB amounts exactly as
scikit-image's colour deconvolution measures them, once per spot for all its views, and adding it
leaves every other augmentation draw unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from realdata import REPO, needs_her2st
from skimage.color import rgb2hed
from synthetic import make_sample, panel_genes

from m2ost.errors import InputError
from m2ost.learn.inputs.augment import (AUG_LENGTH, IMAGENET_MEAN, IMAGENET_STD, NO_AUGMENTATION, augment_settings,
                                 color_jitter, hed_jitter, prepare_batch)
from m2ost.learn.inputs.dataset import load_sample
from m2ost.learn.inputs.loader import SpotDataset, make_loader

LOG_ADJUST = -np.log(1e-6)  # rgb2hed divides optical densities by this


@pytest.fixture(scope="module")
def b4_crops():
    """Four real 112-px H&E crops of B4."""
    from her2st_views import spot_views

    views, _, _ = spot_views("B4", 4, fovs_px=(224,), size=112)
    return views[0]


def _floats(crops: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(crops).permute(0, 3, 1, 2).unsqueeze(1).float() / 255.0


@needs_her2st
def test_hed_jitter_moves_stains_as_scikit_image_measures_them(b4_crops):
    x = _floats(b4_crops)
    same = hed_jitter(x, torch.ones(len(x), 3), torch.zeros(len(x), 3))
    assert (same - x).abs().max() < 1e-5  # neutral draw: the crop back

    rng = np.random.default_rng(3)
    alpha = torch.from_numpy(rng.uniform(0.8, 1.2, (len(x), 3))).float()
    beta = torch.from_numpy(rng.uniform(0.0, 0.1, (len(x), 3))).float()  # kept positive: E is near 0
    y = hed_jitter(x, alpha, beta)
    assert (y - x).abs().mean() > 0.01  # visibly restained
    checked = 0
    for i, crop in enumerate(b4_crops):
        before = rgb2hed(crop)
        after_img = y[i, 0].permute(1, 2, 0).double().numpy()
        after = rgb2hed(after_img)
        expected = before * alpha[i].numpy() + beta[i].numpy() / LOG_ADJUST
        # rgb2hed clips each negative amount to 0, and clipped RGB values lose information:
        # compare, stain by stain, where neither happened
        unclipped = ((after_img > 1e-4) & (after_img < 1 - 1e-4)).all(-1)
        for stain in range(2):  # haematoxylin, eosin (DAB is near zero on H&E)
            ok = (before[..., stain] > 0) & (expected[..., stain] > 0) & unclipped
            assert ok.mean() > 0.25, "too few comparable pixels on a real H&E crop"
            np.testing.assert_allclose(after[ok, stain], expected[ok, stain], atol=2e-5)
            checked += ok.sum()
    assert checked > 1000


@needs_her2st
def test_haematoxylin_moves_alone(b4_crops):
    x = _floats(b4_crops)
    more_h = hed_jitter(x, torch.tensor([[1.3, 1.0, 1.0]] * len(x)), torch.zeros(len(x), 3))
    h_before = np.mean([rgb2hed(c)[..., 0].mean() for c in b4_crops])
    hed_after = np.stack([rgb2hed(more_h[i, 0].permute(1, 2, 0).double().numpy()) for i in range(len(x))])
    e_before = np.mean([rgb2hed(c)[..., 1].mean() for c in b4_crops])
    assert hed_after[..., 0].mean() > 1.2 * h_before
    assert abs(hed_after[..., 1].mean() - e_before) < 0.05 * e_before
    less_h = hed_jitter(x, torch.ones(len(x), 3), torch.tensor([[-0.1, 0.0, 0.0]] * len(x)))
    h_less = np.mean([rgb2hed(less_h[i, 0].permute(1, 2, 0).double().numpy())[..., 0].mean()
                      for i in range(len(x))])
    assert h_less < h_before - 0.5 * 0.1 / LOG_ADJUST  # a negative shift removes haematoxylin


def test_settings_and_schema_agree_and_bad_strengths_are_refused():
    schema = yaml.safe_load((REPO / "m2ost/schemas/config.schema.yaml").read_text())
    aug = schema["properties"]["train"]["properties"]["augment"]["properties"]
    assert augment_settings({"hed_jitter": aug["hed_jitter"]["default"]})["hed"] == 0.0
    assert augment_settings({"hed_jitter": 0.05})["hed"] == 0.05
    assert augment_settings(None)["hed"] == 0.0
    with pytest.raises(InputError, match="hed_jitter"):
        augment_settings({"hed_jitter": 1.5})


def test_stain_draw_is_per_spot_within_bounds_and_leaves_other_draws_alone(tmp_path):
    d = make_sample(tmp_path, "S", n_spots=16, identical_views=True)
    s = load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")
    base = {"flip": True, "rot90": True, "color_jitter": 0.1}
    plain = SpotDataset([s], augment=base, seed=7)
    stained = SpotDataset([s], augment={**base, "hed_jitter": 0.05}, seed=7)
    for ds in (plain, stained):
        ds.set_epoch(2)
    a = np.stack([plain.aug_vector(i) for i in range(len(plain))])
    b = np.stack([stained.aug_vector(i) for i in range(len(stained))])
    assert a.shape == b.shape == (len(plain), AUG_LENGTH)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])  # flips, rotations, colour: unchanged
    np.testing.assert_array_equal(a[:, 6:], np.broadcast_to(NO_AUGMENTATION[6:], a[:, 6:].shape))
    assert np.all(np.abs(b[:, 6:9] - 1) <= 0.05 + 1e-7) and np.all(np.abs(b[:, 9:]) <= 0.05 + 1e-7)
    assert len({tuple(r) for r in b[:, 6:].round(6)}) == len(b)  # one draw per spot

    images, _, aug = next(iter(make_loader(stained, len(stained))))
    x = prepare_batch(images, torch.device("cpu"), aug)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # views share the stain
    y = prepare_batch(images, torch.device("cpu"), aug[:, :6])  # the same without stain jitter
    assert (x - y).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3  # every spot restained


def test_prepare_batch_applies_geometry_then_stain_then_colour():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(20, 250, (2, 2, 6, 6, 3), dtype=np.uint8))
    aug = torch.tensor([[1, 1, 0, 1.1, 0.9, 1.05, 1.1, 0.95, 1.0, 0.02, -0.03, 0.01],
                        list(NO_AUGMENTATION)], dtype=torch.float32)
    got = prepare_batch(images, torch.device("cpu"), aug)
    x = images.permute(0, 1, 4, 2, 3).float() / 255.0
    by_hand = torch.rot90(x[:1], 1, dims=(-2, -1)).flip(-1)
    by_hand = hed_jitter(by_hand, aug[:1, 6:9], aug[:1, 9:])
    by_hand = color_jitter(by_hand, aug[:1, 3:6])
    mean, std = (torch.tensor(v).view(1, 1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    assert torch.allclose(got[:1], (by_hand - mean) / std, atol=1e-5)
    # the other order (colour before stain) is a different image: the order is tested
    other = hed_jitter(color_jitter(torch.rot90(x[:1], 1, dims=(-2, -1)).flip(-1), aug[:1, 3:6]),
                       aug[:1, 6:9], aug[:1, 9:])
    assert not torch.allclose(got[:1], (other - mean) / std, atol=1e-3)
    assert torch.allclose(got[1:], prepare_batch(images[1:], torch.device("cpu")), atol=1e-6)
