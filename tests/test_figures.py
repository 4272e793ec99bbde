"""Maps over the tissue: the H&E of the real SVS under spots of their true size, measured and
predicted on one robust colour scale with the unit, a scale bar in µm; titles that do not claim a
best gene for a constant predictor, name model, split and held-out sample and do not overlap;
maps saved as JPEG of a bounded size; tables that say what is undefined."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PatchCollection
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from realdata import SVS, needs_svs

from m2ost.eval import figures
from m2ost.eval.figures import (EVALUATION_FIGURES, gene_picks, model_line, plot_model_comparison,
                                plot_prediction_maps, plot_sample, sample_figures)
from m2ost.eval.maps import Tissue, measured_vs_predicted, nice_length_um, robust_limits
from m2ost.eval.metrics import score
from m2ost.eval.summary import SUMMARY_METRICS
from m2ost.eval.tables import SUMMARY_NOTES, write_table_html


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
    fig = measured_vs_predicted(tissue, [("GENE (best gene)", measured, predicted, "PCC 0.90")], "log1p CP10k", "t")
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
    assert he.get_title() == "H&E · GENE (best gene)" and ax_predicted.get_title() == "predicted (PCC 0.90)"


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


# ------------------------------------------------------------------------------ titles and files

def _texts(fig):
    """Every title, the figure's title and the x tick labels, with their boxes in display px."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # also for a figure already saved and closed
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [ax.title for ax in fig.axes if ax.get_title()]
    texts += [t for ax in fig.axes for x, t in zip(ax.get_xticks(), ax.get_xticklabels())
              if t.get_text() and min(ax.get_xlim()) <= x <= max(ax.get_xlim())]  # the drawn ticks
    texts += [t for t in (fig._suptitle,) if t is not None]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts]


def assert_legible(fig):
    """No two titles overlap and every title lies inside the figure."""
    boxes = _texts(fig)
    page = fig.bbox
    for text, box in boxes:
        assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y1 <= page.y1 + 1, f"outside: {text!r}"
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"titles overlap: {a!r} and {b!r}"


def test_the_legibility_check_finds_overlapping_titles():
    """The old titles of the mean predictor's maps: one line per panel, run into the next."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3), layout="constrained")
    for ax, what in zip(axes, ("H&E", "measured", "predicted")):
        ax.set_title(f"GENE_WITH_A_LONG_NAME_3 (most variable measured gene, constant prediction): {what}", fontsize=9)
    with pytest.raises(AssertionError, match="overlap|outside"):
        assert_legible(fig)
    plt.close(fig)


def _spots(n=60, seed=0):
    rng = np.random.default_rng(seed)
    xy = np.column_stack([np.repeat(np.arange(10), n // 10), np.tile(np.arange(n // 10), 10)[:n]]) * 200.0
    truth = rng.gamma(2.0, 1.0, (n, 8))
    return Tissue(xy, 110.0, 0.5), truth, [f"GENE_WITH_A_LONG_NAME_{i}" for i in range(8)]


@pytest.mark.parametrize("kind", ["learned", "mean"])
def test_titles_name_model_split_and_sample_and_do_not_overlap(kind):
    tissue, truth, genes = _spots()
    rng = np.random.default_rng(1)
    pred = truth + rng.normal(0, 1, truth.shape) if kind == "learned" else np.tile(truth.mean(0), (len(truth), 1))
    per_gene, _ = score(truth, pred, genes)
    figs = sample_figures(truth, pred, per_gene, tissue, "P2_S1", kind, "log1p CP10k", genes[3], split="lopo-P2")
    assert set(figs) == set(EVALUATION_FIGURES)
    for fig in figs.values():
        assert fig.get_suptitle() == f"model {kind} trained on split lopo-P2 · held-out sample P2_S1"
        assert_legible(fig)
    titles = [" ".join(ax.get_title().split()) for ax in figs["maps"].axes if ax.get_title()]  # unwrapped
    if kind == "mean":  # the constant predictor: no best gene, no r
        assert any("most variable measured gene" in t for t in titles)
        assert all("PCC undefined" in t for t in titles if t.startswith("predicted"))
        assert not any("best gene" in t for t in titles)


def test_an_undefined_pearson_is_not_drawn_as_zero(tmp_path, monkeypatch):
    """The comparison of the models: a constant predictor's column is hatched and says
    "undefined"; each model's label counts its defined r."""
    drawn = _capture(monkeypatch)
    rows = [{"model": m, "split": s, "gene": f"g{i}", "pcc": (np.nan if m == "mean" else 0.1 * i)}
            for m in ("m2ost", "mean") for s in ("s1", "s2") for i in range(5)]
    rows[0]["pcc"] = np.nan  # one undefined gene of m2ost
    plot_model_comparison(pd.DataFrame(rows), tmp_path / "cmp.png")
    (fig,) = drawn
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["m2ost\n9 of 10 r defined", "mean\n0 of 10 r defined"]
    assert [t.get_text() for t in ax.texts].count("undefined") == 2  # one per split
    # nothing is drawn at 0 for the mean predictor: no point in its column
    xs = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections if len(c.get_offsets())])
    assert (xs < 0.5).all()
    assert_legible(fig)


def test_maps_are_jpeg_with_the_title_and_a_bounded_size(tmp_path):
    """A map figure of the real H&E: JPEG, the title in the file, under 0.6 MB for three rows
    (PNG: about 2 MB)."""
    if not SVS.is_file():
        pytest.skip(f"real SVS slide not found at {SVS}")
    from PIL import Image

    from m2ost.data.slide import metadata_mpp, open_slide
    from m2ost.data.spatial import tissue_image

    image, scalef = tissue_image(SVS, "CMU1")
    with open_slide(SVS) as slide:
        mpp, size = metadata_mpp(slide), slide.dimensions
    step = 100 / mpp
    xs, ys = np.meshgrid(np.arange(0.1, 0.9, step / size[0]) * size[0], np.arange(0.1, 0.9, step / size[1]) * size[1])
    tissue = Tissue(np.column_stack([xs.ravel(), ys.ravel()]), 55 / mpp, mpp, image, scalef)
    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 1.0, (len(tissue.xy), 6))
    pred = truth + rng.normal(0, 1, truth.shape)
    genes = [f"G{i}" for i in range(6)]
    per_gene, _ = score(truth, pred, genes)
    written = plot_sample(truth, pred, per_gene, tissue, tmp_path, "S1", "m2ost", "log1p CP10k", "G3", split="s1")
    assert [p.name for p in written] == ["S1.maps.jpg", "S1.genes.png"]
    with Image.open(written[0]) as im:
        assert im.format == "JPEG" and im.size[0] >= 1200
        assert im.info["comment"].decode() == "model m2ost trained on split s1 · held-out sample S1"
    assert 50_000 < written[0].stat().st_size < 600_000
    with Image.open(written[1]) as im:
        assert im.format == "PNG" and im.info["Title"] == "model m2ost trained on split s1 · held-out sample S1"


def test_prediction_maps_name_the_model(tmp_path, monkeypatch):
    import anndata

    drawn = _capture(monkeypatch)
    tissue, truth, genes = _spots()
    adata = anndata.AnnData(truth.astype(np.float32), var=pd.DataFrame(index=genes))
    adata.uns["m2ost"] = {"model_file": "results/models/m2ost/all/model.pt"}
    plot_prediction_maps(adata, tissue, tmp_path / "P3.jpg", "log1p CP10k", n_genes=3, title="P3: predicted expression")
    assert drawn[0].get_suptitle() == ("P3: predicted expression\n"
                                       "model m2ost trained on split all (every slide with expression)")
    assert_legible(drawn[0])
    assert model_line("/data/elsewhere/my_model.pt") == "model file my_model.pt (/data/elsewhere/my_model.pt)"


def test_table_html_labels_columns_and_says_undefined(tmp_path):
    table = pd.DataFrame({"model": ["m2ost", "mean"], "split": ["s1", "s1"], "test_samples": ["A,B", "A,B"],
                          "gene_pcc_mean": [0.41234, np.nan], "n_genes_defined": [12.0, 0.0]})
    write_table_html(table, tmp_path / "t.html", "Held-out", SUMMARY_NOTES)
    page = (tmp_path / "t.html").read_text()
    assert "<th class='num' scope='col'>gene_<wbr>pcc_<wbr>mean</th>" in page
    assert "<td class='num'>0.412</td>" in page and "<td class='num'><i>undefined</i></td>" in page
    assert "A,<wbr>B" in page  # lists wrap
    for column in ("gene_pcc_mean", "n_genes_defined"):
        assert f"<dt>{column}</dt>" in page
    assert set(SUMMARY_NOTES) >= {"model", "split", "gene_pcc_mean", "n_genes_defined", *SUMMARY_METRICS}


def _capture(monkeypatch) -> list:
    """The figures the plotting functions save (and still save them)."""
    drawn, save = [], figures._savefig

    def keep(fig, path):
        drawn.append(fig)
        return save(fig, path)

    monkeypatch.setattr(figures, "_savefig", keep)
    return drawn
