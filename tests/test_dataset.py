"""The spot dataset: checks on load, view selection, augmentations, device-side preparation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from synthetic import make_sample, panel_genes, write_bundle

from m2ost.learn.inputs.augment import IMAGENET_MEAN, IMAGENET_STD, NO_AUGMENTATION, prepare_batch
from m2ost.learn.inputs.dataset import load_sample, load_samples
from m2ost.learn.inputs.loader import SpotDataset, make_loader
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
    img, target, aug = ds[1]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32, 3)
    assert np.array_equal(img[0].numpy(), d["views"][0][keep[1]])
    assert np.allclose(target.numpy(), d["x"][1], atol=1e-6)
    assert aug.tolist() == list(NO_AUGMENTATION)  # no augmentation
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


def _normalised(raw: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) as prepare_batch normalises it."""
    x = torch.from_numpy(np.ascontiguousarray(raw)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_all_views_get_the_same_geometric_transform(tmp_path):
    d = make_sample(tmp_path, "S", n_spots=16, identical_views=True)
    s = load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")
    ds = SpotDataset([s], augment={"flip": True, "rot90": True}, seed=5)
    changed = 0
    for epoch in range(2):
        ds.set_epoch(epoch)
        images, _, aug = next(iter(make_loader(ds, len(ds))))
        x = prepare_batch(images, torch.device("cpu"), aug)
        for i in range(len(ds)):
            raw = d["views"][0][i]
            assert torch.equal(x[i, 0], x[i, 1]) and torch.equal(x[i, 0], x[i, 2])
            # exactly the transform drawn: np.rot90, then h-flip, then v-flip
            k, hflip, vflip = (int(v) for v in aug[i, :3])
            expected = np.rot90(raw, k)
            expected = expected[:, ::-1] if hflip else expected
            expected = expected[::-1] if vflip else expected
            assert torch.allclose(x[i, 0], _normalised(expected), atol=1e-6)
            assert any(np.array_equal(expected, t) for t in _dihedral(raw))
            changed += not np.array_equal(expected, raw)
    assert changed > 10  # the transforms do happen


def test_batched_reads_equal_item_reads(study):
    data = load_samples(study["bundles"], study["expressions"], study["genes"], ["A", "B"])
    ds = SpotDataset(data, augment=AUG, seed=4)
    ds.set_epoch(2)
    order = np.random.default_rng(0).permutation(len(ds))[:12].tolist()  # both samples, shuffled
    batched = ds.__getitems__(order)
    assert all(isinstance(r, np.ndarray) for r in ds._views_of(0))  # the raw-chunk fast path
    items = [ds[i] for i in order]  # h5py reads
    for part, name in enumerate(("images", "targets", "aug")):
        assert torch.equal(batched[part], torch.stack([it[part] for it in items])), name
    ds.close()


def test_batched_reads_of_a_compressed_bundle_go_through_h5py(tmp_path):
    d = make_sample(tmp_path, "S", n_spots=8)
    with h5py.File(d["bundle"], "r+") as f:  # as another tool might write it: gzip chunks
        for v in range(3):
            data = f[f"view_{v}"][:]
            del f[f"view_{v}"]
            f.create_dataset(f"view_{v}", data=data, chunks=(1, 32, 32, 3), compression="gzip")
    s = load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")
    ds = SpotDataset([s])
    batch = ds.__getitems__([5, 1, 3])
    assert all(isinstance(r, h5py.Dataset) for r in ds._views_of(0))
    for j, i in enumerate([5, 1, 3]):
        assert np.array_equal(batch[0][j, 2].numpy(), d["views"][2][s.rows[i]])
    ds.close()


def test_augmentations_are_redrawn_every_epoch_and_reproducible(study):
    data = load_samples(study["bundles"], study["expressions"], study["genes"], ["A"])
    ds = SpotDataset(data, augment=AUG, seed=1)
    ds.set_epoch(0)
    e0 = [ds[i] for i in range(len(ds))]
    ds.set_epoch(1)
    e1 = [ds[i] for i in range(len(ds))]
    assert any(not torch.equal(a[2][:3], b[2][:3]) for a, b in zip(e0, e1))  # geometry
    assert all(not torch.equal(a[2][3:], b[2][3:]) for a, b in zip(e0, e1))  # jitter per spot
    assert len({tuple(x[2].tolist()) for x in e0}) == len(ds)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e0, e1))  # images leave raw
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
    serial = list(make_loader(ds, 8, workers=0))
    loader = make_loader(ds, 8, workers=2)
    parallel = list(loader)
    for a, b in zip(serial, parallel):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the workers persist across epochs, yet draw the augmentations of the epoch set now
    ds.set_epoch(4)
    again = list(loader)
    ds.set_epoch(4)
    serial4 = list(make_loader(ds, 8, workers=0))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(again, serial4))
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(again, parallel))
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


def test_format_1_bundles_with_blake2b_digests_still_verify(tmp_path):
    from m2ost.data.bundle import spot_digest

    d = make_sample(tmp_path, "S", n_spots=6)
    with h5py.File(d["bundle"], "r+") as f:  # as written before xxh3: no attribute, blake2b
        del f.attrs["digest_algorithm"]
        f["spot_digest"][:] = [spot_digest([v[i] for v in d["views"]], "blake2b-64")
                               for i in range(6)]
    assert len(load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")) == 6
    with h5py.File(d["bundle"], "r+") as f:  # xxh3 digests under the old format: refused
        f["spot_digest"][:] = [spot_digest([v[i] for v in d["views"]]) for i in range(6)]
    with pytest.raises(InputError, match=r"sample S.*does not match its stored digest"):
        load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")


def test_format_2_bundles_with_centres_under_coords_still_load(tmp_path):
    """Format 3 moved the spot centres to ``centers`` (``coords`` is now HEST's top-left corner);
    a format-2 bundle, which held the centres under ``coords``, gives the same spots."""
    from synthetic import write_bundle

    d = make_sample(tmp_path, "S", n_spots=9)
    old = write_bundle(tmp_path / "old" / "S.h5", "S", d["views"], d["coords"], d["barcodes"], format_version=2)
    with h5py.File(old) as f:
        assert "centers" not in f and f.attrs["format_version"] == 2
    with h5py.File(d["bundle"]) as f:  # format 3: the corner of the 55-µm view 0 at 0.5 µm/px
        assert np.array_equal(f["coords"][:], np.asarray(d["coords"]) - 55)
    new_sample = load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")
    old_sample = load_sample(old, d["expression"], panel_genes(), sample="S")
    assert np.array_equal(new_sample.centers, np.asarray(d["coords"], float)[new_sample.rows])
    assert np.array_equal(old_sample.centers, new_sample.centers)
    with h5py.File(d["bundle"], "r+") as f:  # a format-3 bundle without its centres is refused
        del f["centers"]
    with pytest.raises(InputError, match=r"sample S.*dataset centers missing"):
        load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")
