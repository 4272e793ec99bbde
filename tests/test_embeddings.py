"""The embedding stage on real H&E spots: what it stores, that it streams, that it is tied to
its bundle and encoder, and that nothing half-written is left."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from realdata import needs_her2st

from m2ost.errors import InputError
from m2ost.learn.features.embeddings import read_embeddings, write_embeddings
from m2ost.learn.features.encoders import load_encoder

pytestmark = needs_her2st
N_SPOTS = 10


@pytest.fixture(scope="module")
def encoder():
    return load_encoder({}, "cpu")


@pytest.fixture(scope="module")
def b4(tmp_path_factory, encoder):
    from her2st_views import write_section_bundle

    root = tmp_path_factory.mktemp("emb")
    views, barcodes = write_section_bundle(root / "B4.h5", "B4", N_SPOTS)
    out = root / "B4.emb.h5"
    attrs = write_embeddings(encoder, root / "B4.h5", out, sample="B4", tokens=True, batch_size=4,
                             progress=False)
    return {"root": root, "bundle": root / "B4.h5", "views": views, "barcodes": barcodes, "out": out,
            "attrs": attrs}


def test_every_spot_and_view_is_encoded_in_bundle_order(b4, encoder):
    emb = read_embeddings(b4["out"], "B4", tokens=True, bundle=b4["bundle"], encoder=encoder.record())
    assert list(emb.barcode) == b4["barcodes"]
    assert emb.pooled.shape == (N_SPOTS, 3, 1752) and emb.pooled.dtype == np.float32
    assert emb.tokens.shape == (N_SPOTS, 3, 49, 1280 + 112 + 320) and emb.tokens.dtype == np.float16
    assert emb.grid == (7, 7)
    assert [v["size_px"] for v in emb.views] == [112, 112, 112]
    assert emb.views[2]["fov_um"] == pytest.approx(896 * 0.69)
    for v in range(3):
        pooled, tokens = encoder.encode(b4["views"][v], tokens=True)
        np.testing.assert_allclose(emb.pooled[:, v], pooled, atol=1e-4)
        np.testing.assert_allclose(emb.tokens[:, v].astype(np.float32),
                                   tokens.reshape(N_SPOTS, 49, -1), atol=2e-2, rtol=1e-2)
    # The views of a spot see different fields: their features differ.
    assert np.abs(emb.pooled[:, 0] - emb.pooled[:, 2]).mean() > 0.05


def test_rows_are_read_in_any_order(b4):
    full = read_embeddings(b4["out"], "B4")
    some = read_embeddings(b4["out"], "B4", rows=[7, 2, 2, 9])
    assert list(some.barcode) == [b4["barcodes"][i] for i in (7, 2, 2, 9)]
    np.testing.assert_array_equal(some.pooled, full.pooled[[7, 2, 2, 9]])
    assert some.tokens is None


def test_result_does_not_depend_on_the_batch_size(b4, encoder, tmp_path):
    """Spots are streamed batch by batch; the batch size changes nothing but memory."""
    other = tmp_path / "B4.h5"
    write_embeddings(encoder, b4["bundle"], other, sample="B4", batch_size=3, progress=False)
    np.testing.assert_allclose(read_embeddings(other).pooled, read_embeddings(b4["out"]).pooled, atol=1e-5)
    with h5py.File(other) as f:
        assert "tokens" not in f and tuple(f.attrs["grid"]) == (0, 0)
    with pytest.raises(InputError, match="no token grid"):
        read_embeddings(other, "B4", tokens=True)


def test_embeddings_of_a_changed_bundle_are_refused(b4, tmp_path):
    import shutil

    bundle = shutil.copy(b4["bundle"], tmp_path / "B4.h5")
    with h5py.File(bundle, "r+") as f:
        f["spot_digest"][3] = f["spot_digest"][3] + 1  # as if spot 3 had been re-tiled
    with pytest.raises(InputError, match="another version of the bundle") as err:
        read_embeddings(b4["out"], "B4", bundle=bundle)
    assert "B4.emb.h5" in str(err.value)


def test_embeddings_of_another_encoder_are_refused(b4, encoder):
    record = encoder.record()
    bigger = {**record, "settings": {**record["settings"], "input_px": 256}}
    with pytest.raises(InputError, match="another encoder .*input_px"):
        read_embeddings(b4["out"], "B4", encoder=bigger)
    with pytest.raises(InputError, match="weights file checksum"):
        read_embeddings(b4["out"], "B4", encoder={**record, "checksum": "0" * 64})
    with pytest.raises(InputError, match="embeddings of sample B4, expected C2"):
        read_embeddings(b4["out"], "C2")


def test_interrupted_run_leaves_no_file(b4, encoder, tmp_path, monkeypatch):
    out = tmp_path / "B4.h5"
    calls = []

    def failing(images, tokens=False):
        calls.append(len(images))
        if len(calls) == 4:
            raise RuntimeError("out of memory")
        return np.zeros((len(images), encoder.dim), np.float32)

    monkeypatch.setattr(encoder, "encode", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        write_embeddings(encoder, b4["bundle"], out, sample="B4", batch_size=4, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="embeddings file not found"):
        read_embeddings(out, "B4")
