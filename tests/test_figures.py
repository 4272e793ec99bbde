"""Maps over the tissue: the H&E of the real SVS under spots of their true size, measured and
predicted on one robust colour scale with the unit, a scale bar in µm; titles that do not claim a
best gene for a constant predictor."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PatchCollection
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from realdata import SVS, needs_svs

from m2ost.eval.figures import gene_picks
from m2ost.eval.maps import Tissue, measured_vs_predicted, nice_length_um, robust_limits
from m2ost.eval.metrics import score


@pytest.fixture(scope="module")
def svs_tissue():
    from m2ost.data.slide import metadata_mpp, open_slide
    from m2ost.data.spatial import tissue_image

    image, scalef = tissue_image(SVS, "CMU1")
    with open_slide(SVS) as slide:
        mpp, size = metadata_mpp(slide), slide.dimensions
    # A 100 µm grid of 55 µm spots over the middle of the slide.
    step = 100 / mpp
    xs, ys = np.meshgrid(np.arange(0.3, 0.7, step / size[0]) * size[0], np.arange(0.3, 0.7, step / size[1]) * size[1])
    return Tissue(np.column_stack([xs.ravel(), ys.ravel()]), 55 / mpp, mpp, image, scalef), size


@needs_svs
def test_measured_and_predicted_share_a_robust_scale_over_the_he(svs_tissue):
    tissue, (width, height) = svs_tissue
    rng = np.random.default_rng(0)
    measured = rng.gamma(2.0, 1.0, len(tissue.xy))
    measured[0] = 50.0  # one extreme spot must not stretch the scale
    predicted = 0.5 * measured + rng.normal(0, 0.3, len(measured))
    fig = measured_vs_predicted(tissue, [("GENE (best gene, PCC 0.90)", measured, predicted)], "log1p CP10k", "t")
    he, ax_measured, ax_predicted = fig.axes[:3]
    # The H&E spans the whole slide in level-0 px.
    left, right, bottom, top = he.images[0].get_extent()
    assert (left, top) == (0, 0)
    assert right == pytest.approx(width, rel=0.01) and bottom == pytest.approx(height, rel=0.01)
    spots = [next(c for c in ax.collections if isinstance(c, PatchCollection)) for ax in (ax_measured, ax_predicted)]
    assert spots[0].get_clim() == spots[1].get_clim() == robust_limits(measured, predicted)
    assert spots[0].get_clim()[1] < 50.0
    assert ax_measured.images and ax_predicted.images  # spots over the H&E
    # Each spot is a disc of the spot's true diameter at its centre.
    box = spots[0].get_paths()[0].get_extents()
    assert box.width == pytest.approx(tissue.diameter_px, rel=0.01) and box.height == pytest.approx(box.width)
    assert ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2) == pytest.approx(tuple(tissue.xy[0]))
    assert fig.axes[3].get_ylabel() == "log1p CP10k"  # the colour bar names the unit
    bars = [a for a in ax_measured.artists if isinstance(a, AnchoredSizeBar)]
    assert bars and bars[0].txt_label.get_text().endswith("µm")
    assert ax_predicted.get_title().startswith("GENE (best gene")


def test_scale_bar_lengths_are_round():
    assert [nice_length_um(s) for s in (90, 600, 1300, 5000, 26000)] == [10, 100, 200, 1000, 5000]


def test_constant_predictor_claims_no_best_gene():
    rng = np.random.default_rng(1)
    truth = rng.gamma(2.0, 1.0, (40, 5))
    constant = np.tile(truth.mean(axis=0), (40, 1))
    per_gene, _ = score(truth, constant, [f"g{i}" for i in range(5)])
    picks = gene_picks(per_gene, truth, constant, chosen="g3")
    assert [label for label, _ in picks] == ["most variable measured gene", "chosen gene"]
    assert picks[0][1] == int(np.argmax(truth.var(axis=0)))
    learned = truth + rng.normal(0, 0.5, truth.shape)
    per_gene, _ = score(truth, learned, [f"g{i}" for i in range(5)])
    best = int(per_gene["pcc"].idxmax())
    assert gene_picks(pd.DataFrame(per_gene), truth, learned)[0] == ("best gene", best)
