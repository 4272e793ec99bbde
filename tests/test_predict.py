"""Prediction on an H&E-only slide: the real SVS (CMU-1-Small-Region), end to end."""

from __future__ import annotations

import anndata
import h5py
import numpy as np
import openslide
import pytest

from realdata import SVS, needs_svs
from synthetic import FOV_UM, TINY_MODEL, tiny_train_cfg
from viewer_checks import check_draws_over_tissue, check_qupath_geojson

from m2ost.learn.inference.new_slides import predict_slide
from m2ost.learn.training.fit_on_views import fit_model


@pytest.fixture(scope="module")
def model_file(study, tmp_path_factory):
    """A tiny M2OST trained for one epoch on the synthetic study (3 views of 32 px)."""
    out = tmp_path_factory.mktemp("model")
    fit_model("m2ost", study["bundles"], study["expressions"], study["genes_file"], ["A", "B"],
              TINY_MODEL, tiny_train_cfg(epochs=1), out)
    return out / "model.pt"


@needs_svs
def test_prediction_on_the_real_svs(model_file, study, tmp_path):
    out = predict_slide(SVS, model_file, tmp_path, sample="CMU1", spacing_um=100.0,
                        min_tissue_fraction=0.25, batch_size=16, device="cpu")
    assert out == tmp_path / "CMU1.h5ad"
    adata = anndata.read_h5ad(out)
    with openslide.OpenSlide(str(SVS)) as s:
        width, height = s.dimensions
        mpp = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
    # A 100-µm grid over the tissue of a 1.1 x 1.5 mm region: dozens of spots, every one inside
    # the slide and on tissue, predicted on the model's panel.
    n_spots = adata.n_obs
    assert 20 <= n_spots <= (width * mpp / 100 + 1) * (height * mpp / 100 + 1) * 1.2
    assert list(adata.var_names) == list(study["genes"])
    xy = np.asarray(adata.obsm["spatial"])
    assert xy.shape == (n_spots, 2)
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < width).all()
    assert (xy[:, 1] >= 0).all() and (xy[:, 1] < height).all()
    x = np.asarray(adata.X)
    assert np.isfinite(x).all() and (x.std(axis=0) > 0).any()  # the prediction follows the image
    assert (adata.obs["tissue_fraction"] > 0).all()
    # The views were tiled at the model's fields of view, from the slide's own resolution.
    with h5py.File(tmp_path / "work" / "CMU1.h5", "r") as f:
        assert np.allclose(f.attrs["fov_um"], FOV_UM) and abs(float(f.attrs["mpp"]) - mpp) < 1e-6
        assert f["view_0"].shape[0] == n_spots
    assert (tmp_path / "CMU1.jpg").read_bytes()[:2] == b"\xff\xd8"  # the maps over the H&E, JPEG
    assert not list(tmp_path.rglob("*.tmp*"))  # nothing half-written left behind
    # What the viewers read: the unit, the genes' validation Pearson r, the H&E for scanpy/squidpy,
    # and QuPath's GeoJSON on the original slide (spots of 55 µm, the default).
    assert adata.uns["m2ost"]["unit"] == "log1p CP10k" and set(adata.var["unit"]) == {"log1p CP10k"}
    assert "val_pcc" in adata.var and "log1p" in adata.uns
    check_draws_over_tissue(adata, "CMU1", (width, height))
    check_qupath_geojson(tmp_path / "CMU1.geojson", adata, width, height, 55.0 / mpp)
