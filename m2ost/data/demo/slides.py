"""H&E-like slides: tissue mask, region types, stain, nuclei and membranes, drawn from a seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from m2ost.data.demo.params import EDGE_MARGIN_UM, FIELD_UM, MPP, REGION_TYPES

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


def patient_stain(rng: np.random.Generator) -> _Stain:
    def jitter(v):
        v = v + rng.normal(0, 0.03, 3)
        return v / np.linalg.norm(v)

    return _Stain(jitter(_H_VEC), jitter(_E_VEC), rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1), 1.0)


def slide_stain(rng: np.random.Generator, patient: _Stain) -> _Stain:
    return _Stain(
        patient.h_vec,
        patient.e_vec,
        patient.h_scale * rng.uniform(0.97, 1.03),
        patient.e_scale * rng.uniform(0.97, 1.03),
        rng.uniform(0.97, 1.0),
    )


@dataclass
class SlideTruth:
    """Ground-truth maps on the FIELD_UM grid and the rendered image."""

    image: np.ndarray  # (H, W, 3) uint8, level 0 at MPP
    labels: np.ndarray  # region index per field pixel, -1 outside tissue
    nuclei_yx_um: np.ndarray  # (n, 2) nucleus centres in µm


def _upsample(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a float32 field (PIL: fast and deterministic)."""
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


def _per_region(labels: np.ndarray, key: str) -> np.ndarray:
    """A region style's value at every field pixel (0 outside tissue)."""
    lut = np.array([_REGION_STYLE[k][key] for k in REGION_TYPES] + [0.0], dtype=np.float32)
    return lut[labels]  # label -1 picks the trailing 0 (background)


def _region_labels(rng, shape, tissue: np.ndarray) -> np.ndarray:
    """Region types: arg-max of smooth random fields -> blobs of a few hundred µm; -1 off tissue."""
    bias = _REGION_BIAS + rng.normal(0, 0.2, len(REGION_TYPES))
    fields = np.stack([_smooth_noise(rng, shape, 75 / FIELD_UM) + b for b in bias])
    labels = np.argmax(fields, axis=0).astype(np.int8)
    labels[~tissue] = -1
    return labels


def _nuclei(rng, shape, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nucleus centres (y, x in µm) and region types: an inhomogeneous Poisson process whose
    density varies inside regions at the scale of a spot, so "own" nucleus density is informative
    beyond region type."""
    density_mm2 = _per_region(labels, "density") * np.exp(0.45 * _smooth_noise(rng, shape, 30 / FIELD_UM))
    lam = density_mm2 * (FIELD_UM**2) * 1e-6
    counts = rng.poisson(lam)
    iy, ix = np.nonzero(counts)
    rep = counts[iy, ix]
    ny = (np.repeat(iy, rep) + rng.random(rep.sum())) * FIELD_UM
    nx = (np.repeat(ix, rep) + rng.random(rep.sum())) * FIELD_UM
    return ny, nx, np.repeat(labels[iy, ix], rep)


def _stain_maps(rng, shape, labels: np.ndarray, tissue: np.ndarray, height_px: int, width_px: int):
    """Cytoplasm / matrix hematoxylin and eosin at level 0, with texture: stroma fibres, adipose walls.

    The per-region base levels are blurred a little so that region borders do not show the
    staircase of the label grid; the textures stay sharp.
    """
    h_bg = ndi.gaussian_filter(_per_region(labels, "h_bg"), 0.8) * (1 + 0.25 * _smooth_noise(rng, shape, 6 / FIELD_UM))
    eos = ndi.gaussian_filter(_per_region(labels, "eosin"), 0.8) * (1 + 0.15 * _smooth_noise(rng, shape, 15 / FIELD_UM))
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
    return _upsample(h_bg * soft, height_px, width_px), _upsample(eos * soft, height_px, width_px)


def _render_nuclei(rng, ny, nx, ntype, height_px: int, width_px: int) -> np.ndarray:
    """Nuclei hematoxylin at full resolution, stamped from per-type banks of ellipses."""
    nuc = np.zeros((height_px, width_px), np.float32)
    styles = [_REGION_STYLE[k] for k in REGION_TYPES]
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
    return nuc


def _compose(rng, stain: _Stain, h_bg: np.ndarray, eos: np.ndarray, nuc: np.ndarray) -> np.ndarray:
    """RGB from Beer-Lambert optical densities, in row blocks to bound memory.

    Pixel-level noise (chromatin, sensor grain) comes from one seeded patch read at random
    offsets: indistinguishable at this amplitude and far cheaper than drawing tens of millions
    of normals.
    """
    height_px, width_px = nuc.shape
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
    return image


def make_slide(rng: np.random.Generator, height_px: int, width_px: int, stain: _Stain) -> SlideTruth:
    """Draw one H&E-like slide and its ground-truth maps (each step draws from ``rng`` in turn)."""
    f = int(round(FIELD_UM / MPP))  # level-0 pixels per field pixel
    shape = (math.ceil(height_px / f), math.ceil(width_px / f))
    tissue = _tissue_mask(rng, shape, FIELD_UM)
    labels = _region_labels(rng, shape, tissue)
    ny, nx, ntype = _nuclei(rng, shape, labels)
    h_bg, eos = _stain_maps(rng, shape, labels, tissue, height_px, width_px)
    nuc = _render_nuclei(rng, ny, nx, ntype, height_px, width_px)
    image = _compose(rng, stain, h_bg, eos, nuc)
    return SlideTruth(image=image, labels=labels, nuclei_yx_um=np.stack([ny, nx], axis=1))
