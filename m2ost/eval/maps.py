"""Expression maps over the tissue: spots as semi-transparent discs of their true diameter drawn
over the H&E thumbnail, one colour scale per gene for measured and predicted, a scale bar in µm.

Coordinates are level-0 px of the slide throughout; the thumbnail is placed with its scale
factor (``uns["spatial"]`` layout, :mod:`m2ost.data.spatial`).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Circle  # noqa: E402
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar  # noqa: E402

SPOT_ALPHA = 0.8
CMAP = "viridis"
# Robust colour limits: the 1st and 99th percentiles, so a few extreme spots do not wash out the map.
LIMIT_PERCENTILES = (1.0, 99.0)
WIDTH_CMAP = "magma"  # interval widths: their own scale and colours, apart from expression
PADDED_COLOUR = "red"
# Panel titles: 9 pt, wrapped at 44 characters (a 4-inch panel holds about 50 at 9 pt).
TITLE_SIZE = 9
TITLE_CHARS = 44
SUPTITLE_SIZE = 11


@dataclass
class Tissue:
    """Where the spots of one sample lie: centres and diameter in level-0 px, the µm per px, and
    the H&E thumbnail (None: drawn without it) with its scale (thumbnail px per level-0 px)."""

    xy: np.ndarray
    diameter_px: float
    mpp: float
    image: np.ndarray | None = None
    scalef: float = 1.0
    padded: np.ndarray | None = None  # spots whose views reached past the slide: ringed on the maps

    @classmethod
    def from_spatial(cls, xy, mpp: float, entry: dict | None, diameter_px: float) -> Tissue:
        if not entry:
            return cls(np.asarray(xy, float), diameter_px, mpp)
        factors = entry["scalefactors"]
        return cls(np.asarray(xy, float), float(factors["spot_diameter_fullres"]), mpp,
                   np.asarray(entry["images"]["hires"]), float(factors["tissue_hires_scalef"]))


def robust_limits(*values: np.ndarray) -> tuple[float, float]:
    """Shared colour limits of several arrays (measured and predicted): robust percentiles."""
    finite = np.concatenate([np.asarray(v, float).ravel() for v in values])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, LIMIT_PERCENTILES)
    if hi <= lo:  # a constant map: widen around the value so the colour bar stays readable
        lo, hi = lo - 0.5, hi + 0.5
    return float(lo), float(hi)


def nice_length_um(span_um: float) -> float:
    """A round scale bar length of about a fifth of the view."""
    target = max(span_um / 5, 1e-6)
    base = 10 ** math.floor(math.log10(target))
    return max(m * base for m in (1, 2, 5) if m * base <= target)


def _frame(ax, tissue: Tissue) -> None:
    """The view: the spots with a margin of one spot, image orientation (y down), no ticks."""
    margin = 1.5 * tissue.diameter_px
    lo, hi = tissue.xy.min(0) - margin, tissue.xy.max(0) + margin
    if tissue.image is not None:  # never beyond the slide
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.array(tissue.image.shape[1::-1]) / tissue.scalef)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def draw_tissue(ax, tissue: Tissue) -> None:
    """The H&E thumbnail in level-0 px coordinates."""
    if tissue.image is not None:
        h, w = tissue.image.shape[:2]
        ax.imshow(tissue.image, extent=(0, w / tissue.scalef, h / tissue.scalef, 0), interpolation="lanczos")
    _frame(ax, tissue)


def scale_bar(ax, tissue: Tissue) -> None:
    span_um = (ax.get_xlim()[1] - ax.get_xlim()[0]) * tissue.mpp
    length = nice_length_um(span_um)
    label = f"{length / 1000:g} mm" if length >= 1000 else f"{length:g} µm"
    bar = AnchoredSizeBar(ax.transData, length / tissue.mpp, label, "lower right", pad=0.4, sep=3,
                          color="black", frameon=True, size_vertical=tissue.diameter_px / 8, fontproperties={"size": 7})
    bar.patch.set_alpha(0.7)
    ax.add_artist(bar)


def draw_spots(ax, tissue: Tissue, values: np.ndarray, norm: Normalize, cmap: str = CMAP):
    """Spots as discs of their true diameter over the H&E; returns the collection (for a colour bar)."""
    draw_tissue(ax, tissue)
    discs = [Circle((x, y), tissue.diameter_px / 2) for x, y in tissue.xy]
    spots = PatchCollection(discs, cmap=cmap, norm=norm, alpha=SPOT_ALPHA, linewidths=0)
    spots.set_array(np.asarray(values, float))
    ax.add_collection(spots)
    mark_padded(ax, tissue)
    scale_bar(ax, tissue)
    return spots


def mark_padded(ax, tissue: Tissue) -> None:
    """Ring the spots whose views were padded (reached outside the slide), named in the legend."""
    if tissue.padded is None or not np.any(tissue.padded):
        return
    rings = [Circle((x, y), tissue.diameter_px / 2) for x, y in tissue.xy[np.asarray(tissue.padded, bool)]]
    ax.add_collection(PatchCollection(rings, facecolor="none", edgecolor=PADDED_COLOUR, linewidths=0.8))
    ax.plot([], [], "o", mfc="none", mec=PADDED_COLOUR, label="view padded")
    ax.legend(loc="lower left", fontsize=6, framealpha=0.7)


def panel_title(text: str, width: int = TITLE_CHARS) -> str:
    """A panel title wrapped to the panel's width (long gene labels must not run into the next panel)."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=True)) or text


def value_map(fig, ax, tissue: Tissue, values: np.ndarray, title: str, unit: str,
              norm: Normalize | None = None, cmap: str = CMAP):
    """One map of any per-spot value over the H&E, on ``norm`` (default: its own robust scale),
    with a colour bar labelled ``unit``. Returns the spots (a shared colour bar may use them)."""
    spots = draw_spots(ax, tissue, values, norm or Normalize(*robust_limits(values)), cmap)
    ax.set_title(panel_title(title), fontsize=TITLE_SIZE)
    if norm is None:
        fig.colorbar(spots, ax=ax, shrink=0.75).set_label(unit, fontsize=8)
    return spots


def measured_vs_predicted(tissue: Tissue, rows: list[tuple], unit: str, title: str, width_label: str = ""):
    """One row per gene: H&E (titled with the row's label), measured, predicted (titled with
    ``predicted_note``), on one colour scale per row. ``rows`` holds (row label, measured values,
    predicted values, predicted_note[, interval widths]); with widths, a fourth panel maps them on
    their own scale (``width_label`` names them). Returns the figure."""
    n_cols = 4 if any(len(r) > 4 for r in rows) else 3
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(4.3 * n_cols, 4.3 * len(rows)), squeeze=False,
                             layout="constrained")
    for (label, measured, predicted, note, *width), ax_row in zip(rows, axes):
        if width:
            uncertainty_panel(fig, ax_row[3], tissue, width[0], width_label, unit)
        draw_tissue(ax_row[0], tissue)
        scale_bar(ax_row[0], tissue)
        ax_row[0].set_title(panel_title(f"H&E · {label}"), fontsize=TITLE_SIZE)
        norm = Normalize(*robust_limits(measured, predicted))
        value_map(fig, ax_row[1], tissue, measured, "measured", unit, norm)
        spots = value_map(fig, ax_row[2], tissue, predicted, f"predicted ({note})" if note else "predicted",
                          unit, norm)
        bar = fig.colorbar(spots, ax=list(ax_row[:3]), shrink=0.8)  # space taken from the row, panels stay equal
        bar.set_label(unit, fontsize=8)
    fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    return fig


def gene_panels(tissue: Tissue, values: dict[str, np.ndarray], unit: str, title: str, cols: int = 4,
                widths: dict[str, np.ndarray] | None = None, width_label: str = "interval width"):
    """The H&E, then one map per entry of ``values`` (title -> per-spot values), each on its own
    robust scale; with ``widths`` (title -> interval widths), each map is followed by its widths'
    map, in pairs. Returns the figure."""
    widths = widths or {}
    panels = [None] + ([False] if widths and cols % 2 == 0 else [])  # pairs start at an even column
    for name in values:
        panels += [("values", name)] + ([("width", name)] if name in widths else [])
    n = len(panels)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.2 * rows), squeeze=False, layout="constrained")
    flat = axes.ravel()
    draw_tissue(flat[0], tissue)
    scale_bar(flat[0], tissue)
    flat[0].set_title("H&E", fontsize=TITLE_SIZE)
    for ax, panel in zip(flat[1:], panels[1:]):
        if not panel:
            ax.axis("off")
        elif panel[0] == "width":
            uncertainty_panel(fig, ax, tissue, widths[panel[1]], f"{panel[1]}: {width_label}", unit)
        else:
            value_map(fig, ax, tissue, values[panel[1]], panel[1], unit)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    return fig


def uncertainty_panel(fig, ax, tissue: Tissue, width: np.ndarray, title: str, unit: str) -> None:
    """A map of interval widths on its own scale and colours (with its colour bar)."""
    value_map(fig, ax, tissue, width, title, f"interval width, {unit}", cmap=WIDTH_CMAP)
