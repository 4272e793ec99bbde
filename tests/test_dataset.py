"""The spot dataset: checks on load, view selection, augmentations, device-side preparation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from synthetic import make_sample, panel_genes, write_bundle

from m2ost.dataset import (IMAGENET_MEAN, IMAGENET_STD, SpotDataset, load_sample, load_samples,
                           make_loader, prepare_batch)
from m2ost.errors import InputError

AUG = {"flip": True, "rot90": True, "color_jitter": 0.2}


def _dihedral(img: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of (H, W, 3)."""
    out = []
    for k in range(4):
        r = np.rot90(img, k)
        out += [r, r[:, ::-1]]
    return out


def test_rows_follow_bundle_row_and_padded_spots_drop(tmp_path):
    keep = [0, 2, 3, 5, 6, 7, 9, 11]
    d = make_sample(tmp_path, "S", n_spots=12, expression_rows=keep, padded_rows=[3, 4])
    s = load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")
    assert s.rows.tolist() == keep
    assert s.spot_ids.tolist() == [d["barcodes"][r] for r in keep]
    assert np.allclose(s.targets, d["x"], atol=1e-6)
    dropped = load_sample(d["bundle"], d["expression"], panel_genes(), drop_padded=True,
                          sample="S")
    assert 3 not in dropped.rows and len(dropped) == len(keep) - 1
    # the padded flag is on the last view only: the single-view selection keeps the spot
    single = load_sample(d["bundle"], d["expression"], panel_genes(), views=[0],
                         drop_padded=True, sample="S")
    assert len(single) == len(keep)
    ds = SpotDataset([s])
    img, target, jitter = ds[1]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32, 3)
    assert np.array_equal(img[0].numpy(), d["views"][0][keep[1]])
    assert np.allclose(target.numpy(), d["x"][1], atol=1e-6)
    assert torch.equal(jitter, torch.ones(3))
    assert SpotDataset([single], views=[0])[0][0].shape == (1, 32, 32, 3)


def test_bundle_expression_disagreement_is_refused(tmp_path):
    d = make_sample(tmp_path, "S", n_spots=6)
    with h5py.File(d["bundle"], "r+") as f:  # the bundle now lists other spot ids
        del f["barcode"]
        f.create_dataset("barcode", data=np.array([f"X{i}" for i in range(6)], dtype=object),
                         dtype=h5py.string_dtype())
    with pytest.raises(InputError, match=r"sample S.*6 spot ids differ"):
        load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")


def test_missing_panel_genes_are_named(tmp_path):
    d = make_sample(tmp_path, "S", n_spots=6)
    genes = panel_genes() + ["NOPE1", "NOPE2"]
    with pytest.raises(InputError, match=r"S\.h5ad.*2 of 10 panel genes missing.*NOPE1, NOPE2"):
        load_sample(d["bundle"], d["expression"], genes, sample="S")


def test_views_must_agree_across_samples(tmp_path):
    a = make_sample(tmp_path / "a", "A", n_spots=6)
    b = make_sample(tmp_path / "b", "B", n_spots=6)
    write_bundle(b["bundle"], "B", b["views"], b["coords"], b["barcodes"],
                 fov_um=(55.0, 110.0, 300.0))
    with pytest.raises(InputError, match=r"sample B.*view 2 covers 300"):
        load_samples({"A": a["bundle"], "B": b["bundle"]},
                     {"A": a["expression"], "B": b["expression"]}, panel_genes(), ["A", "B"])
    # ... unless the differing view is not used
    load_samples({"A": a["bundle"], "B": b["bundle"]},
                 {"A": a["expression"], "B": b["expression"]}, panel_genes(), ["A", "B"],
                 views=[0, 1])
    with pytest.raises(InputError, match="views \\[5\\] requested"):
        load_sample(a["bundle"], a["expression"], panel_genes(), views=[5], sample="A")


def test_all_views_get_the_same_geometric_transform(tmp_path):
    d = make_sample(tmp_path, "S", n_spots=16, identical_views=True)
    s = load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")
    ds = SpotDataset([s], augment=AUG, seed=5)
    changed = 0
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            img = ds[i][0].numpy()
            raw = d["views"][0][i]
            assert np.array_equal(img[0], img[1]) and np.array_equal(img[0], img[2])
            assert any(np.array_equal(img[0], t) for t in _dihedral(raw))
            changed += not np.array_equal(img[0], raw)
    assert changed > 10  # the transforms do happen


def test_augmentations_are_redrawn_every_epoch_and_reproducible(study):
    data = load_samples(study["bundles"], study["expressions"], study["genes"], ["A"])
    ds = SpotDataset(data, augment=AUG, seed=1)
    ds.set_epoch(0)
    e0 = [ds[i] for i in range(len(ds))]
    ds.set_epoch(1)
    e1 = [ds[i] for i in range(len(ds))]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(e0, e1))
    assert all(not torch.equal(a[2], b[2]) for a, b in zip(e0, e1))  # jitter drawn per spot
    assert len({tuple(x[2].tolist()) for x in e0}) == len(ds)
    again = SpotDataset(data, augment=AUG, seed=1)  # a fresh dataset: same draws
    again.set_epoch(1)
    assert all(torch.equal(again[i][0], e1[i][0]) and torch.equal(again[i][2], e1[i][2])
               for i in range(len(ds)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(e0, e1))  # targets never change


def test_loader_workers_open_their_own_files(study):
    data = load_samples(study["bundles"], study["expressions"], study["genes"], ["A", "B"])
    ds = SpotDataset(data, augment=AUG, seed=2)
    ds.set_epoch(3)
    ds[0]  # the parent opens a handle before forking
    serial = [b for b in make_loader(ds, 8, workers=0)]
    parallel = [b for b in make_loader(ds, 8, workers=2)]
    for a, b in zip(serial, parallel):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    ds.close()


def test_prepare_batch_normalises_and_jitters_per_spot():
    white = torch.full((2, 1, 4, 4, 3), 255, dtype=torch.uint8)
    x = prepare_batch(white, torch.device("cpu"))
    assert x.shape == (2, 1, 3, 4, 4) and x.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, 0, :, 0, 0], expected)
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 256, (2, 2, 4, 4, 3), dtype=np.uint8))
    jitter = torch.tensor([[1.0, 1.0, 1.0], [1.2, 0.8, 1.1]])
    y = prepare_batch(imgs, torch.device("cpu"), jitter)
    plain = prepare_batch(imgs, torch.device("cpu"))
    assert torch.allclose(y[0], plain[0], atol=1e-6)  # spot 0 untouched
    assert not torch.allclose(y[1], plain[1], atol=1e-3)  # spot 1 jittered
    only1 = prepare_batch(imgs[1:], torch.device("cpu"), jitter[1:])
    assert torch.allclose(only1[0], y[1], atol=1e-6)  # independent of the batch
