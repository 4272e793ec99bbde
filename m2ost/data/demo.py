"""The embedded synthetic demo cohort: H&E-like slides with Visium-style expression.

Nothing is downloaded: :func:`make_demo_cohort` draws every slide and count from a
seed. The generative model is built so that the multi-view idea of M2OST is
testable on a laptop:

* each slide has a tissue mask with an irregular border and four *region types*
  (stroma, tumour, immune, adipose) forming smooth blobs a few hundred µm across,
  each with its own stain colour, texture and density of nuclei;
* half of the genes respond to what lies **inside the spot** (region type and
  nucleus density within ``OWN_RADIUS_UM`` of the centre, visible in the 112 µm
  view), the other half to the **neighbourhood** (region composition in the ring
  ``RING_UM`` around the spot, visible only in the 224 / 448 µm views), and a few
  housekeeping genes are flat;
* counts are negative binomial around those rates, times a per-spot library size.

A model that sees all views should therefore beat one that sees the 112 µm view
only, which in turn beats the training-set mean. The ground truth (per-spot
features, gene roles and weights) is written under ``truth/`` so that tests and
notebooks can check that claim.

Layout written under ``out_dir``::

    samples.tsv                                sample sheet (paths relative to out_dir)
    README.md                                  what this folder is
    {sample}/image.tif                         pyramidal tiled TIFF, 0.5 µm/px
    {sample}/outs/filtered_feature_bc_matrix.h5    10x HDF5 v3 (in-tissue spots)
    {sample}/outs/spatial/tissue_positions.csv     Space Ranger >= 2.0 layout
    {sample}/outs/spatial/scalefactors_json.json
    {sample}/outs/spatial/tissue_hires_image.png, tissue_lowres_image.png
    truth/genes.tsv                            role and weights of every gene
    truth/{sample}_spots.tsv                   per-spot ground-truth features
    truth/{he_sample}_counts.tsv               hidden counts of the H&E-only slide

Every output is byte-identical for the same seed and parameters.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from m2ost.atomic import atomic_path
from m2ost.data.pyramid import write_pyramidal_tiff
from m2ost.data.spots import SPOT_DIAMETER_FULLRES_UM

__all__ = ["make_demo_cohort", "DemoCohort", "REGION_TYPES", "OWN_RADIUS_UM", "RING_UM"]

log = logging.getLogger(__name__)

REGION_TYPES = ("stroma", "tumour", "immune", "adipose")
MPP = 0.5  # µm per level-0 pixel of every demo slide
FIELD_UM = 2.0  # µm per pixel of the internal "truth" maps (region labels, nuclei)
OWN_RADIUS_UM = 35.0  # what is "inside" a spot: within the 112 µm view
RING_UM = (80.0, 220.0)  # the neighbourhood: outside the 112 µm view, inside 448 µm
SPOT_DIAMETER_UM = 55.0  # Visium
SPOT_PITCH_UM = 100.0  # Visium centre-to-centre distance
FIDUCIAL_DIAMETER_UM = 89.0  # Space Ranger reports about 1.6 spot diameters
EDGE_MARGIN_UM = 235.0  # no tissue this close to the border: 448 µm views fit

# Per region type: nuclei per mm², nucleus ellipse semi-axes (µm), hematoxylin in
# nuclei and in the cytoplasm/matrix, eosin. Values chosen by eye to look like H&E.
_REGION_STYLE = {
    "stroma": dict(density=700, axes=((4.5, 6.5), (1.4, 2.0)), h_nuc=1.05, h_bg=0.05, eosin=0.80),
    "tumour": dict(density=3200, axes=((3.8, 5.2), (3.0, 4.2)), h_nuc=0.85, h_bg=0.24, eosin=0.42),
    "immune": dict(density=6500, axes=((2.3, 2.9), (2.0, 2.6)), h_nuc=1.55, h_bg=0.12, eosin=0.28),
    "adipose": dict(density=200, axes=((3.5, 4.5), (1.2, 1.6)), h_nuc=1.00, h_bg=0.02, eosin=0.55),
}
# Region prevalence (added to the noise fields before the arg-max).
_REGION_BIAS = np.array([0.35, 0.25, -0.15, -0.35])

# Optical-density stain vectors (R, G, B) of hematoxylin and eosin (Macenko-style).
_H_VEC = np.array([0.5626, 0.7201, 0.4062])
_E_VEC = np.array([0.2159, 0.8012, 0.5581])
_GLASS_OD = 0.02


@dataclass
class DemoCohort:
    """What :func:`make_demo_cohort` wrote.

    Attributes
    ----------
    out_dir : Path
        Root of the cohort.
    sample_sheet : Path
        ``out_dir / "samples.tsv"``.
    samples : pandas.DataFrame
        The sample sheet as written.
    genes : pandas.DataFrame
        One row per gene: ``gene``, ``role`` (``own``, ``neighbourhood``, ``flat``)
        and the weights of the generative model.
    spots : dict of str to pandas.DataFrame
        Per sample, every grid spot with its ground-truth features.
    seconds : float
        Wall time of the generation.
    """

    out_dir: Path
    sample_sheet: Path
    samples: pd.DataFrame
    genes: pd.DataFrame
    spots: dict[str, pd.DataFrame] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- noise


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation.

    Large blurs are computed on a coarser grid and interpolated up, which is
    indistinguishable for such smooth fields and much cheaper.
    """
    step = max(1, int(sigma // 4))
    small = (math.ceil(shape[0] / step) + 3, math.ceil(shape[1] / step) + 3)
    f = ndi.gaussian_filter(rng.standard_normal(small, dtype=np.float32), sigma / step, mode="wrap")
    if step > 1:
        f = ndi.zoom(f, step, order=1, prefilter=False)
    f = f[: shape[0], : shape[1]]
    return (f - f.mean()) / (f.std() + 1e-8)


# ----------------------------------------------------------------------------- slides


@dataclass
class _Stain:
    """Stain appearance of one slide (patient tone plus slide-level jitter)."""

    h_vec: np.ndarray
    e_vec: np.ndarray
    h_scale: float
    e_scale: float
    brightness: float


def _patient_stain(rng: np.random.Generator) -> _Stain:
    def jitter(v):
        v = v + rng.normal(0, 0.03, 3)
        return v / np.linalg.norm(v)

    return _Stain(jitter(_H_VEC), jitter(_E_VEC), rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1), 1.0)


def _slide_stain(rng: np.random.Generator, patient: _Stain) -> _Stain:
    return _Stain(
        patient.h_vec,
        patient.e_vec,
        patient.h_scale * rng.uniform(0.97, 1.03),
        patient.e_scale * rng.uniform(0.97, 1.03),
        rng.uniform(0.97, 1.0),
    )


@dataclass
class _SlideTruth:
    """Ground-truth maps on the FIELD_UM grid and the rendered image."""

    image: np.ndarray  # (H, W, 3) uint8, level 0 at MPP
    labels: np.ndarray  # region index per field pixel, -1 outside tissue
    nuclei_yx_um: np.ndarray  # (n, 2) nucleus centres in µm


def _upsample(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a float32 field (PIL: fast and deterministic)."""
    from PIL import Image

    fh, fw = field.shape
    up = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    # Resize the whole field grid, then crop: field pixel i covers level-0 pixels
    # i*f .. i*f+f-1, so the grid is a whole number of level-0 pixels.
    f = int(round(FIELD_UM / MPP))
    up = up.resize((fw * f, fh * f), Image.Resampling.BILINEAR)
    return np.asarray(up)[:height, :width]


def _tissue_mask(rng, shape, f_um) -> np.ndarray:
    """Irregular blob of tissue centred in the slide, with a few small tears."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    margin = EDGE_MARGIN_UM / f_um
    cy = h / 2 + rng.uniform(-0.05, 0.05) * h
    cx = w / 2 + rng.uniform(-0.05, 0.05) * w
    ry, rx = (h / 2 - margin) * rng.uniform(1.15, 1.35), (w / 2 - margin) * rng.uniform(1.15, 1.35)
    r = np.hypot((yy - cy) / ry, (xx - cx) / rx)
    envelope = (
        1.0
        - r
        + 0.22 * _smooth_noise(rng, shape, 180 / f_um)
        + 0.05 * _smooth_noise(rng, shape, 20 / f_um)
        + 0.015 * _smooth_noise(rng, shape, 4 / f_um)
    )
    # Near the slide border the envelope is clamped by a noisy inset rectangle, so
    # tissue stops EDGE_MARGIN_UM from the edge without a ruler-straight cut.
    d_edge = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))
    clamp = (d_edge - margin - 25 / f_um) / (60 / f_um) + 0.25 * _smooth_noise(rng, shape, 15 / f_um)
    mask = np.minimum(envelope, clamp) > 0.08
    lab, n = ndi.label(mask)
    if n > 1:  # keep the largest piece: one section per slide
        sizes = ndi.sum(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    mask = ndi.binary_fill_holes(mask)
    tears = _smooth_noise(rng, shape, 12 / f_um) > 2.6  # small lumens / tears
    mask &= ~tears
    m = int(round(margin))
    mask[:m] = mask[-m:] = False
    mask[:, :m] = mask[:, -m:] = False
    return mask


def _stamp_bank(rng, axes_um, n: int = 24, mpp: float = MPP) -> list[np.ndarray]:
    """Anti-aliased filled ellipses (alpha in 0..1) of random size and angle."""
    (a_lo, a_hi), (b_lo, b_hi) = axes_um
    stamps = []
    for _ in range(n):
        a = rng.uniform(a_lo, a_hi) / mpp
        b = rng.uniform(b_lo, b_hi) / mpp
        t = rng.uniform(0, np.pi)
        half = int(math.ceil(max(a, b))) + 2
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
        u = xx * math.cos(t) + yy * math.sin(t)
        v = -xx * math.sin(t) + yy * math.cos(t)
        rr = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        stamps.append(np.clip((1.0 - rr) * min(a, b), 0.0, 1.0))
    return stamps


def _voronoi_membranes(rng, shape, f_um, cell_um: float = 38.0) -> np.ndarray:
    """Thin walls between polygonal cells: the look of adipose tissue."""
    n = int(shape[0] * shape[1] * (f_um / cell_um) ** 2)
    seeds = np.ones(shape, bool)
    seeds[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)] = False
    _, (iy, ix) = ndi.distance_transform_edt(seeds, return_indices=True)
    owner = iy.astype(np.int64) * shape[1] + ix
    wall = np.zeros(shape, bool)
    wall[:-1] |= owner[:-1] != owner[1:]
    wall[:, :-1] |= owner[:, :-1] != owner[:, 1:]
    return ndi.gaussian_filter(wall.astype(np.float32), 0.6)


def _make_slide(rng: np.random.Generator, height_px: int, width_px: int, stain: _Stain) -> _SlideTruth:
    """Draw one H&E-like slide and its ground-truth maps."""
    f = int(round(FIELD_UM / MPP))  # level-0 pixels per field pixel
    fh, fw = math.ceil(height_px / f), math.ceil(width_px / f)
    shape = (fh, fw)

    tissue = _tissue_mask(rng, shape, FIELD_UM)

    # Region types: arg-max of smooth random fields -> blobs of a few hundred µm.
    bias = _REGION_BIAS + rng.normal(0, 0.2, len(REGION_TYPES))
    fields = np.stack([_smooth_noise(rng, shape, 75 / FIELD_UM) + b for b in bias])
    labels = np.argmax(fields, axis=0).astype(np.int8)
    labels[~tissue] = -1

    styles = [_REGION_STYLE[k] for k in REGION_TYPES]

    def per_region(key):
        lut = np.array([s[key] for s in styles] + [0.0], dtype=np.float32)
        return lut[labels]  # label -1 picks the trailing 0 (background)

    # Nuclei: inhomogeneous Poisson process; density varies inside regions at the
    # scale of a spot, so "own" nucleus density is informative beyond region type.
    density_mm2 = per_region("density") * np.exp(0.45 * _smooth_noise(rng, shape, 30 / FIELD_UM))
    lam = density_mm2 * (FIELD_UM**2) * 1e-6
    counts = rng.poisson(lam)
    iy, ix = np.nonzero(counts)
    rep = counts[iy, ix]
    ny = (np.repeat(iy, rep) + rng.random(rep.sum())) * FIELD_UM
    nx = (np.repeat(ix, rep) + rng.random(rep.sum())) * FIELD_UM
    ntype = np.repeat(labels[iy, ix], rep)

    # Cytoplasm / matrix stains on the field grid, with texture.
    # The per-region base levels are blurred a little so that region borders do not
    # show the staircase of the label grid; the textures below stay sharp.
    h_bg = ndi.gaussian_filter(per_region("h_bg"), 0.8) * (1 + 0.25 * _smooth_noise(rng, shape, 6 / FIELD_UM))
    eos = ndi.gaussian_filter(per_region("eosin"), 0.8) * (1 + 0.15 * _smooth_noise(rng, shape, 15 / FIELD_UM))
    # Stroma fibres: anisotropic streaks whose orientation drifts smoothly.
    streak_h = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (0.7, 5))
    streak_v = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (5, 0.7))
    mix = 1 / (1 + np.exp(-2 * _smooth_noise(rng, shape, 100 / FIELD_UM)))
    fibres = mix * streak_h + (1 - mix) * streak_v
    fibres /= fibres.std() + 1e-8
    is_stroma = labels == REGION_TYPES.index("stroma")
    eos[is_stroma] *= np.clip(1 + 0.25 * fibres[is_stroma], 0.3, None)
    # Adipose: white vacuoles inside thin pink walls.
    is_fat = labels == REGION_TYPES.index("adipose")
    walls = np.clip(_voronoi_membranes(rng, shape, FIELD_UM) * 2.5, 0, 1)
    eos[is_fat] *= 0.05 + 0.95 * walls[is_fat]
    # Soft tissue border, then up to level-0 resolution.
    soft = ndi.gaussian_filter(tissue.astype(np.float32), 0.8)
    h_bg = _upsample(h_bg * soft, height_px, width_px)
    eos = _upsample(eos * soft, height_px, width_px)

    # Nuclei rendered at full resolution from per-type stamp banks.
    nuc = np.zeros((height_px, width_px), np.float32)
    banks = [_stamp_bank(rng, s["axes"]) for s in styles]
    h_nuc = np.array([s["h_nuc"] for s in styles], np.float32)
    choice = rng.integers(0, 24, len(ny))
    strength = rng.uniform(0.8, 1.15, len(ny)).astype(np.float32)
    py, px = (ny / MPP).astype(int), (nx / MPP).astype(int)
    for k in range(len(ny)):
        s = banks[ntype[k]][choice[k]] * (h_nuc[ntype[k]] * strength[k])
        r = s.shape[0] // 2
        y0, x0 = py[k] - r, px[k] - r
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(height_px, y0 + s.shape[0]), min(width_px, x0 + s.shape[1])
        if ys >= ye or xs >= xe:
            continue
        sub = s[ys - y0 : ye - y0, xs - x0 : xe - x0]
        np.maximum(nuc[ys:ye, xs:xe], sub, out=nuc[ys:ye, xs:xe])

    # Compose with Beer-Lambert optical densities, in row blocks to bound memory.
    # Pixel-level noise (chromatin, sensor grain) comes from one seeded patch read
    # at random offsets: indistinguishable at this amplitude and far cheaper than
    # drawing tens of millions of normals.
    block = 512
    patch = rng.standard_normal((2 * block, 2 * block, 4), dtype=np.float32)
    image = np.empty((height_px, width_px, 3), np.uint8)
    h_vec = (stain.h_vec * stain.h_scale).astype(np.float32)
    e_vec = (stain.e_vec * stain.e_scale).astype(np.float32)
    for y in range(0, height_px, block):
        for x in range(0, width_px, block):
            sy, sx = slice(y, min(height_px, y + block)), slice(x, min(width_px, x + block))
            bh, bw = sy.stop - y, sx.stop - x
            oy, ox = rng.integers(0, block, 2)
            noise = patch[oy : oy + bh, ox : ox + bw]
            n = nuc[sy, sx]
            hmap = h_bg[sy, sx] + n * (1 + 0.18 * noise[..., 3])
            emap = eos[sy, sx] * (1 - 0.75 * np.clip(n / 0.9, 0, 1))  # nuclei displace cytoplasm
            od = hmap[..., None] * h_vec + emap[..., None] * e_vec + _GLASS_OD
            rgb = (255.0 * stain.brightness) * np.exp(-od) + 2.0 * noise[..., :3]
            image[sy, sx] = np.clip(rgb, 0, 255).astype(np.uint8)

    return _SlideTruth(image=image, labels=labels, nuclei_yx_um=np.stack([ny, nx], axis=1))


# ----------------------------------------------------------------------------- spots


def _barcode(array_row: int, array_col: int) -> str:
    """A 16-base barcode tied to the array position (as on real Visium slides).

    An odd multiplier modulo 2**32 is a bijection, so distinct positions never collide.
    """
    idx = (array_row * 128 + array_col) * 2654435761 % 2**32
    bases = "ACGT"
    return "".join(bases[(idx >> (2 * i)) & 3] for i in range(15, -1, -1)) + "-1"


def _spot_grid(rng, height_px: int, width_px: int) -> pd.DataFrame:
    """Visium hexagonal grid positions covering the slide, slightly rotated."""
    row_um = SPOT_PITCH_UM * math.sqrt(3) / 2
    col_um = SPOT_PITCH_UM / 2
    theta = math.radians(rng.uniform(-1.5, 1.5))
    r0, c0 = int(rng.integers(4, 30)), int(rng.integers(4, 40))
    oy, ox = rng.uniform(10, 60), rng.uniform(10, 60)  # µm, first spot near a corner
    h_um, w_um = height_px * MPP, width_px * MPP
    rows, cols, ys, xs = [], [], [], []
    inset = SPOT_DIAMETER_UM / 2 + 5
    for i in range(-2, int(h_um / row_um) + 3):
        for j in range(-2, int(w_um / col_um) + 3):
            r, c = r0 + i, c0 + j
            if (c % 2) != (r % 2):  # hexagonal: odd rows hold odd columns
                continue
            u, v = j * col_um, i * row_um
            x = ox + u * math.cos(theta) - v * math.sin(theta)
            y = oy + u * math.sin(theta) + v * math.cos(theta)
            if inset <= x <= w_um - inset and inset <= y <= h_um - inset:
                rows.append(r), cols.append(c), ys.append(y), xs.append(x)
    grid = pd.DataFrame(
        {
            "barcode": [_barcode(r, c) for r, c in zip(rows, cols)],
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": np.round(np.array(ys) / MPP).astype(int),
            "pxl_col_in_fullres": np.round(np.array(xs) / MPP).astype(int),
        }
    )
    return grid.sort_values(["array_row", "array_col"], kind="stable").reset_index(drop=True)


def _disc_mean(maps: np.ndarray, cy: np.ndarray, cx: np.ndarray, r_in: float, r_out: float) -> np.ndarray:
    """Mean of each map over an annulus (r_in..r_out, field pixels) around each centre.

    Pixels outside the map count as background (zero), like empty glass.
    """
    R = int(math.ceil(r_out))
    yy, xx = np.mgrid[-R : R + 1, -R : R + 1]
    d = np.hypot(yy, xx)
    kernel = ((d <= r_out) & (d >= r_in)).astype(np.float32)
    kernel /= kernel.sum()
    pad = np.pad(maps.astype(np.float32), ((0, 0), (R, R), (R, R)))
    out = np.empty((len(cy), maps.shape[0]), np.float64)
    for i, (y, x) in enumerate(zip(cy, cx)):
        win = pad[:, y : y + 2 * R + 1, x : x + 2 * R + 1]
        out[i] = np.tensordot(win, kernel, axes=([1, 2], [0, 1]))
    return out


def _spot_features(truth: _SlideTruth, grid: pd.DataFrame) -> pd.DataFrame:
    """Ground-truth features of every grid spot: own, neighbourhood, in_tissue."""
    cy = np.round(grid["pxl_row_in_fullres"].to_numpy() * MPP / FIELD_UM).astype(int)
    cx = np.round(grid["pxl_col_in_fullres"].to_numpy() * MPP / FIELD_UM).astype(int)
    k = len(REGION_TYPES)
    onehot = np.stack([truth.labels == i for i in range(k)] + [truth.labels >= 0]).astype(np.float32)
    nuc = np.zeros(truth.labels.shape, np.float32)
    ny = np.clip((truth.nuclei_yx_um[:, 0] / FIELD_UM).astype(int), 0, nuc.shape[0] - 1)
    nx = np.clip((truth.nuclei_yx_um[:, 1] / FIELD_UM).astype(int), 0, nuc.shape[1] - 1)
    np.add.at(nuc, (ny, nx), 1.0)
    maps = np.concatenate([onehot, nuc[None]])

    spot_r = SPOT_DIAMETER_UM / 2 / FIELD_UM
    own_r = OWN_RADIUS_UM / FIELD_UM
    ring = (RING_UM[0] / FIELD_UM, RING_UM[1] / FIELD_UM)
    spot = _disc_mean(maps[k : k + 1], cy, cx, 0, spot_r)[:, 0]
    own = _disc_mean(maps, cy, cx, 0, own_r)
    nbr = _disc_mean(maps[:k], cy, cx, *ring)
    px_area_mm2 = (FIELD_UM * 1e-3) ** 2

    feats = grid.copy()
    feats.insert(1, "in_tissue", (spot >= 0.5).astype(int))
    for i, name in enumerate(REGION_TYPES):
        feats[f"own_{name}"] = own[:, i]
    feats["own_tissue"] = own[:, k]
    feats["own_nuclei_per_mm2"] = own[:, k + 1] / px_area_mm2
    for i, name in enumerate(REGION_TYPES):
        feats[f"ring_{name}"] = nbr[:, i]
    return feats


# ----------------------------------------------------------------------------- genes


def _gene_table(rng: np.random.Generator, n_genes: int) -> pd.DataFrame:
    """Roles and weights of the generative expression model.

    ``log mean = base + sum_k w_own[k] * own_frac[k] + w_nuclei * z(own nuclei)
    + sum_k w_ring[k] * ring_frac[k]``, with only the terms of the gene's role set.
    """
    n_flat = max(1, n_genes // 20)
    n_own = (n_genes - n_flat) // 2
    roles = np.array(["own"] * n_own + ["neighbourhood"] * (n_genes - n_flat - n_own) + ["flat"] * n_flat)
    roles = roles[rng.permutation(n_genes)]
    k = len(REGION_TYPES)
    w_own = np.zeros((n_genes, k))
    w_ring = np.zeros((n_genes, k))
    w_nuc = np.zeros(n_genes)
    counter = {"own": 0, "neighbourhood": 0}
    for g, role in enumerate(roles):
        if role == "flat":
            continue
        i = counter[role]
        counter[role] += 1
        primary = i % k  # cycle so every region type drives some genes
        secondary = (primary + 1 + int(rng.integers(0, k - 1))) % k
        w = np.zeros(k)
        if role == "own":
            w[primary] = rng.uniform(1.8, 2.6)
            w[secondary] = -rng.uniform(0.5, 1.0)
        else:
            # Ring fractions vary about half as much as own fractions (they
            # average over a larger area), so larger weights give a comparable
            # spread of expression.
            w[primary] = rng.uniform(3.0, 4.0)
            w[secondary] = -rng.uniform(0.8, 1.5)
        if role == "own":
            w_own[g] = w
            # Every third own gene is mostly about nucleus density.
            w_nuc[g] = rng.choice([-1, 1]) * (rng.uniform(0.8, 1.1) if i % 3 == 2 else rng.uniform(0, 0.3))
            if i % 3 == 2:
                w_own[g] *= 0.3
        else:
            w_ring[g] = w
    table = pd.DataFrame(
        {
            "gene": [f"GENE{g + 1:03d}" for g in range(n_genes)],
            "gene_id": [f"DEMOG{g + 1:08d}" for g in range(n_genes)],
            "role": roles,
            "base_log_mean": np.log(rng.uniform(4.0, 40.0, n_genes)),
            "dispersion": rng.uniform(5.0, 15.0, n_genes),
            "w_own_nuclei": w_nuc,
        }
    )
    for i, name in enumerate(REGION_TYPES):
        table[f"w_own_{name}"] = w_own[:, i]
    for i, name in enumerate(REGION_TYPES):
        table[f"w_ring_{name}"] = w_ring[:, i]
    return table


def _log_means(genes: pd.DataFrame, feats: pd.DataFrame) -> np.ndarray:
    """Log expected counts (spots x genes) before library size."""
    # Fixed standardisation (not data-driven) so the relation is shared by all slides.
    z_nuc = (feats["own_nuclei_per_mm2"].to_numpy() - 2500.0) / 2000.0
    eta = genes["base_log_mean"].to_numpy()[None, :] + z_nuc[:, None] * genes["w_own_nuclei"].to_numpy()
    for name in REGION_TYPES:
        eta = eta + np.outer(feats[f"own_{name}"], genes[f"w_own_{name}"])
        eta = eta + np.outer(feats[f"ring_{name}"], genes[f"w_ring_{name}"])
    return eta


def _sample_counts(rng, genes: pd.DataFrame, feats: pd.DataFrame, slide_depth: float) -> np.ndarray:
    """Negative-binomial counts (spots x genes), int32."""
    mu = np.exp(_log_means(genes, feats))
    library = slide_depth * np.exp(rng.normal(0, 0.3, len(feats)))
    mu = mu * library[:, None]
    r = genes["dispersion"].to_numpy()[None, :]
    lam = rng.gamma(r, mu / r)  # gamma-Poisson mixture = negative binomial
    return rng.poisson(lam).astype(np.int32)


# ----------------------------------------------------------------------------- writers


def _write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: pd.DataFrame, sample: str) -> None:
    """10x Genomics HDF5 (v3 layout): genes x spots CSC matrix under ``matrix``."""
    import h5py
    from scipy import sparse

    csc = sparse.csc_matrix(counts.T)  # genes x spots; CSC = one column per barcode
    csc.sort_indices()
    n = len(genes)

    def strings(values):
        values = [str(v).encode() for v in values]
        return np.array(values, dtype=f"S{max(1, max(len(v) for v in values))}")

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["chemistry_description"] = np.bytes_("Spatial 3' v1")
        f.attrs["filetype"] = np.bytes_("matrix")
        f.attrs["library_ids"] = strings([sample])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        f.attrs["software_version"] = np.bytes_("m2ost-demo")
        f.attrs["version"] = np.int64(2)
        m = f.create_group("matrix")
        kw = dict(compression="gzip", compression_opts=4, shuffle=True)
        m.create_dataset("barcodes", data=strings(barcodes), **kw)
        m.create_dataset("data", data=csc.data.astype(np.int32), **kw)
        m.create_dataset("indices", data=csc.indices.astype(np.int64), **kw)
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64), **kw)
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("_all_tag_keys", data=strings(["genome"]))
        feat.create_dataset("feature_type", data=strings(["Gene Expression"] * n), **kw)
        feat.create_dataset("genome", data=strings(["DEMO"] * n), **kw)
        feat.create_dataset("id", data=strings(genes["gene_id"]), **kw)
        feat.create_dataset("name", data=strings(genes["gene"]), **kw)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def _write_tsv(path: Path, df: pd.DataFrame, sep: str = "\t") -> None:
    _write_text(path, df.to_csv(sep=sep, index=False, lineterminator="\n", float_format="%.6g"))


def _write_png(path: Path, image: np.ndarray, scale: float) -> None:
    from PIL import Image

    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    with atomic_path(path) as tmp:
        # Fast zlib level: these previews are incompressible grain anyway.
        Image.fromarray(image).resize(size, Image.Resampling.BOX).save(tmp, format="PNG", compress_level=1)


def _write_visium(
    sample_dir: Path, sample: str, image: np.ndarray, feats: pd.DataFrame, counts: np.ndarray, genes: pd.DataFrame
) -> None:
    """Space Ranger-style ``outs/`` for one sample."""
    spatial = sample_dir / "outs" / "spatial"
    positions = feats[
        ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    ]
    _write_tsv(spatial / "tissue_positions.csv", positions, sep=",")
    longest = max(image.shape[:2])
    scale = {
        "spot_diameter_fullres": SPOT_DIAMETER_FULLRES_UM / MPP,  # 10x: a 65 µm spot in full-res px
        "tissue_hires_scalef": min(1.0, 2000 / longest),
        "fiducial_diameter_fullres": FIDUCIAL_DIAMETER_UM / MPP,
        "tissue_lowres_scalef": min(1.0, 600 / longest),
    }
    _write_text(spatial / "scalefactors_json.json", json.dumps(scale, indent=4) + "\n")
    _write_png(spatial / "tissue_hires_image.png", image, scale["tissue_hires_scalef"])
    _write_png(spatial / "tissue_lowres_image.png", image, scale["tissue_lowres_scalef"])
    # Space Ranger lists filtered barcodes in sorted order, not in grid order.
    in_tissue = feats["in_tissue"].to_numpy() == 1
    order = np.argsort(feats.loc[in_tissue, "barcode"].to_numpy(), kind="stable")
    barcodes = feats.loc[in_tissue, "barcode"].to_numpy()[order]
    _write_10x_h5(sample_dir / "outs" / "filtered_feature_bc_matrix.h5", counts[order], list(barcodes), genes, sample)


_README = """\
# m2ost demo cohort (synthetic)

Generated by `m2ost.data.demo.make_demo_cohort(seed={seed})`. Every image and count here
is synthetic; nothing was downloaded. Slides are pyramidal TIFFs at {mpp} µm/px with
10x Visium Space Ranger-style outputs. `{he}` is an H&E-only slide (no expression in
the sample sheet) for the prediction path; its hidden counts are in `truth/`.

Genes with role `own` depend on the region type and nucleus density within
{own:g} µm of the spot centre; `neighbourhood` genes depend on the region
composition {r0:g}-{r1:g} µm away (visible only in the 224 and 448 µm views);
`flat` genes only on library size. See `truth/genes.tsv` and `truth/*_spots.tsv`.
"""


def make_demo_cohort(
    out_dir: str | Path,
    seed: int = 0,
    n_patients: int = 2,
    slides_per_patient: int = 2,
    n_genes: int = 60,
    *,
    slide_um: tuple[float, float] = (1950.0, 2100.0),
    he_only: bool = True,
    depth: float = 1.0,
) -> DemoCohort:
    """Write the synthetic demo cohort (deterministic for a given seed).

    Parameters
    ----------
    out_dir
        Folder to write into (created).
    seed
        Seed of everything: images, grids, genes and counts.
    n_patients, slides_per_patient
        Samples ``P{p}_S{s}`` with Visium-style expression.
    n_genes
        Genes ``GENE001``...; half driven by the spot's own appearance, half by its
        neighbourhood, about 5% flat.
    slide_um
        Range of the slide side lengths in µm (each side drawn uniformly); the
        default gives slides of 3900-4200 px and 200-300 in-tissue spots.
    he_only
        Also write ``P{n_patients + 1}_HE``, an H&E-only slide of a new patient.
    depth
        Scale of the expected counts (sequencing depth).

    Returns
    -------
    DemoCohort
    """
    if n_patients < 1 or slides_per_patient < 1:
        raise ValueError("need at least one patient with one slide")
    if n_genes < 3:
        raise ValueError(f"n_genes must be at least 3 (own, neighbourhood, flat), got {n_genes}")
    if not 2 * EDGE_MARGIN_UM + 200 <= slide_um[0] <= slide_um[1]:
        raise ValueError(f"slide_um must be an increasing range from {2 * EDGE_MARGIN_UM + 200:g} µm, got {slide_um}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(seed)
    gene_seq, *patient_seqs = root.spawn(1 + n_patients + 1)
    genes = _gene_table(np.random.default_rng(gene_seq), n_genes)

    plan = []  # (sample, patient, SeedSequence, has_expression)
    for p in range(n_patients):
        slide_seqs = patient_seqs[p].spawn(slides_per_patient + 1)
        for s in range(slides_per_patient):
            plan.append((f"P{p + 1}_S{s + 1}", f"P{p + 1}", slide_seqs[0], slide_seqs[s + 1]))
    if he_only:
        seqs = patient_seqs[n_patients].spawn(2)
        plan.append((f"P{n_patients + 1}_HE", f"P{n_patients + 1}", seqs[0], seqs[1]))

    rows, spots = [], {}
    he_name = plan[-1][0] if he_only else ""
    for sample, patient, patient_seq, slide_seq in plan:
        # The patient's stain tone comes from the patient's own stream, so it is
        # shared by that patient's slides.
        patient_stain = _patient_stain(np.random.default_rng(patient_seq))
        rng = np.random.default_rng(slide_seq)
        stain = _slide_stain(rng, patient_stain)
        h_px = int(round(rng.uniform(*slide_um) / MPP))
        w_px = int(round(rng.uniform(*slide_um) / MPP))
        truth = _make_slide(rng, h_px, w_px, stain)
        grid = _spot_grid(rng, h_px, w_px)
        feats = _spot_features(truth, grid)
        spots[sample] = feats
        in_tissue = feats["in_tissue"].to_numpy() == 1
        counts = _sample_counts(rng, genes, feats[in_tissue], depth * float(np.exp(rng.normal(0, 0.15))))

        sample_dir = out / sample
        write_pyramidal_tiff(sample_dir / "image.tif", truth.image, mpp=MPP, workers=1)
        _write_tsv(out / "truth" / f"{sample}_spots.tsv", feats)
        expression = sample != he_name
        if expression:
            _write_visium(sample_dir, sample, truth.image, feats, counts, genes)
        else:
            hidden = pd.DataFrame(counts, columns=genes["gene"])
            hidden.insert(0, "barcode", feats.loc[in_tissue, "barcode"].to_numpy())
            _write_tsv(out / "truth" / f"{sample}_counts.tsv", hidden)
        log.info(
            "demo %s (%d/%d): %d x %d px, %d in-tissue spots, %.1f s so far",
            sample, len(rows) + 1, len(plan), w_px, h_px, int(in_tissue.sum()), time.perf_counter() - t0,
        )
        rows.append(
            {
                "sample": sample,
                "patient": patient,
                "slide": f"{sample}/image.tif",
                "format": "visium" if expression else "",
                "counts": f"{sample}/outs/filtered_feature_bc_matrix.h5" if expression else "",
                "positions": f"{sample}/outs/spatial/tissue_positions.csv" if expression else "",
                "mpp": "",
            }
        )

    _write_tsv(out / "truth" / "genes.tsv", genes)
    _write_text(
        out / "README.md",
        _README.format(seed=seed, mpp=MPP, he=he_name or "(none)", own=OWN_RADIUS_UM, r0=RING_UM[0], r1=RING_UM[1]),
    )
    # The sample sheet is written last: its presence means the cohort is complete.
    sheet = pd.DataFrame(rows, columns=["sample", "patient", "slide", "format", "counts", "positions", "mpp"])
    _write_tsv(out / "samples.tsv", sheet)
    return DemoCohort(
        out_dir=out,
        sample_sheet=out / "samples.tsv",
        samples=sheet,
        genes=genes,
        spots=spots,
        seconds=time.perf_counter() - t0,
    )
