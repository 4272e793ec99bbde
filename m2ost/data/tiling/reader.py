"""Reading views from a slide: a direct reader for tiled TIFF slides, OpenSlide otherwise.

OpenSlide's ``read_region`` costs several times the JPEG decode in cairo compositing and colour
conversion; :class:`TiffTileReader` decodes the tiles itself and cuts views in numpy. It is
checked against OpenSlide when it opens (:func:`open_reader`) and steps aside on any
disagreement.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import openslide
import tifffile
from PIL import Image

from m2ost.data.tiling.views import ReadPlan, tile_span, view_origin

log = logging.getLogger(__name__)

# Decoded tiles held per worker, at most: reference counting frees tiles as soon as their
# last view is cut (35 MB at the peak for a 40,000-px-wide slide and 112-448 µm views); the
# cap only bounds pathological cases (very wide slides, huge views), at the price of
# decoding some tiles twice.
CACHE_BYTES = 192 * 1024 * 1024
WHITE = 255
# OpenSlide vendors whose levels are exactly the tiled TIFF directories of the same size.
DIRECT_VENDORS = ("generic-tiff", "aperio")


class _NotDirect(Exception):
    """The slide cannot (or should not) be read by :class:`TiffTileReader`."""


@dataclass
class _TiffLevel:
    page: object
    offsets: np.ndarray
    counts: np.ndarray
    width: int
    height: int
    tile_w: int
    tile_h: int
    across: int


class TiffTileReader:
    """Pyramid levels of a tiled TIFF slide, read and decoded tile by tile without OpenSlide.

    Holds decoded tiles in a cache from which :meth:`read_level` cuts regions; tiles are
    dropped when the views announced with :meth:`expect` no longer need them, or, oldest
    first, when the cache exceeds ``cache_bytes``. Pixels outside a level are
    white, as OpenSlide's transparent pixels become once put on white. Use :func:`open_reader`,
    which checks the reader against OpenSlide before trusting it.
    """

    def __init__(self, path, level_dimensions, level_downsamples, levels, cache_bytes: int = CACHE_BYTES):
        self.path = str(path)
        self.level_dimensions = [tuple(int(v) for v in d) for d in level_dimensions]
        self.level_downsamples = [float(d) for d in level_downsamples]
        self.dimensions = self.level_dimensions[0]
        self.cache_bytes = int(cache_bytes)
        self.tiles_decoded = 0
        self._cache: OrderedDict = OrderedDict()
        self._bytes = 0
        self._refs: dict = {}
        self._levels: dict[int, _TiffLevel] = {}
        self._tif = tifffile.TiffFile(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            pages = list(self._tif.pages)
            for level in sorted(set(levels)):
                w, h = self.level_dimensions[level]
                match = [p for p in pages if getattr(p, "is_tiled", False) and p.imagewidth == w
                         and p.imagelength == h]
                if len(match) != 1:
                    raise _NotDirect(f"level {level}: {len(match)} tiled TIFF directories of {w} x {h} px")
                page = match[0]
                if (page.samplesperpixel != 3 or page.bitspersample != 8 or int(page.planarconfig) != 1
                        or page.imagedepth != 1 or page.tiledepth != 1 or len(page.dataoffsets) !=
                        math.ceil(w / page.tilewidth) * math.ceil(h / page.tilelength)):
                    raise _NotDirect(f"level {level}: not an 8-bit RGB single-plane tiled image")
                self._levels[level] = _TiffLevel(page, np.asarray(page.dataoffsets, np.int64),
                                                 np.asarray(page.databytecounts, np.int64), w, h,
                                                 int(page.tilewidth), int(page.tilelength),
                                                 math.ceil(w / page.tilewidth))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._tif.close()
        self._cache.clear()
        self._bytes = 0

    def _tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        key = (level, tx, ty)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        lv = self._levels[level]
        i = ty * lv.across + tx
        count = int(lv.counts[i])
        full = (lv.tile_h, lv.tile_w, 3)
        if count == 0:  # a sparse TIFF's missing tile: transparent for OpenSlide, so white
            tile = np.full(full, WHITE, np.uint8)
        else:
            data = os.pread(self._fd, count, int(lv.offsets[i]))
            tile = lv.page.decode(data, i, jpegtables=getattr(lv.page, "jpegtables", None))[0]
            if tile is None:
                raise OSError(f"{self.path}: level {level} tile {tx},{ty} cannot be decoded")
            tile = tile.reshape(tile.shape[-3:]) if tile.ndim > 3 else tile
            if tile.shape != full:
                padded = np.full(full, WHITE, np.uint8)
                th, tw = min(tile.shape[0], full[0]), min(tile.shape[1], full[1])
                padded[:th, :tw] = tile[:th, :tw, :3]
                tile = padded
        self.tiles_decoded += 1
        self._cache[key] = tile
        self._bytes += tile.nbytes
        while self._bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes
        return tile

    def expect(self, xy: np.ndarray, plans: list[ReadPlan]) -> None:
        """Announce the views (all ``plans`` at every centre of ``xy``) about to be read."""
        refs = self._refs
        for plan in plans:
            lv = self._levels[plan.level]
            for cx, cy in np.asarray(xy, np.float64).tolist():
                _, _, lx, ly = view_origin(cx, cy, plan)
                for ty in tile_span(ly, plan.read_px, lv.height, lv.tile_h):
                    for tx in tile_span(lx, plan.read_px, lv.width, lv.tile_w):
                        key = (plan.level, tx, ty)
                        refs[key] = refs.get(key, 0) + 1

    def read_level(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
        """The (h, w, 3) RGB pixels whose top-left is (x, y) in ``level``'s own pixels."""
        lv = self._levels[level]
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        th, tw = lv.tile_h, lv.tile_w
        iy0, iy1, ix0, ix1 = max(y, 0), min(y + h, lv.height), max(x, 0), min(x + w, lv.width)
        if iy0 != y or ix0 != x or iy1 != y + h or ix1 != x + w:
            out[...] = WHITE
            if iy0 >= iy1 or ix0 >= ix1:
                return out
        cache, refs = self._cache, self._refs
        for ty in range(iy0 // th, (iy1 - 1) // th + 1):
            oy = ty * th
            y0, y1 = max(iy0, oy), min(iy1, oy + th)
            for tx in range(ix0 // tw, (ix1 - 1) // tw + 1):
                ox = tx * tw
                x0, x1 = max(ix0, ox), min(ix1, ox + tw)
                key = (level, tx, ty)
                tile = cache.get(key)
                if tile is None:
                    tile = self._tile(level, tx, ty)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
                n = refs.get(key)
                if n is not None:
                    if n > 1:
                        refs[key] = n - 1
                    else:  # the last view that needed this tile: drop it
                        del refs[key]
                        dropped = cache.pop(key, None)
                        if dropped is not None:
                            self._bytes -= dropped.nbytes
        return out

    def check_against(self, slide) -> None:
        """Compare, per level, the most detailed tile with OpenSlide's pixels; raise _NotDirect if they differ.

        OpenSlide places a level's region at fractional pixels (level-0 coordinates divided by
        the downsample) and interpolates, which also leaves half-transparent seams at tile
        edges; so the comparison leaves out an 8-px border and is on 8 x 8 block means. A wrong
        colour space, channel order, directory or tile order differs by tens of grey levels.
        """
        for level, lv in self._levels.items():
            i = int(np.argmax(lv.counts))
            tx, ty = i % lv.across, i // lv.across
            w = min(lv.tile_w, lv.width - tx * lv.tile_w) // 8 * 8
            h = min(lv.tile_h, lv.height - ty * lv.tile_h) // 8 * 8
            if w < 24 or h < 24:
                continue
            ds = self.level_downsamples[level]
            ours = self._tile(level, tx, ty)[8:h - 8, 8:w - 8].astype(np.float32)
            rgba = np.asarray(slide.read_region((int(round(tx * lv.tile_w * ds)), int(round(ty * lv.tile_h * ds))),
                                                level, (w, h)))[8:h - 8, 8:w - 8].astype(np.float32)
            a = rgba[..., 3:] / 255.0
            theirs = rgba[..., :3] * a + WHITE * (1.0 - a)
            blocks = [x.reshape(h // 8 - 2, 8, w // 8 - 2, 8, 3).mean(axis=(1, 3)) for x in (ours, theirs)]
            diff = float(np.abs(blocks[0] - blocks[1]).mean())
            if diff > 3.0:
                raise _NotDirect(f"level {level}: tiles differ from OpenSlide's pixels by {diff:.1f} grey levels")
        self._cache.clear()
        self._bytes = 0
        self.tiles_decoded = 0



def open_reader(slide_path, levels, cache_bytes: int = CACHE_BYTES):
    """The fastest faithful reader of ``levels`` of a slide: a checked TiffTileReader, else OpenSlide."""
    slide = openslide.OpenSlide(str(slide_path))
    vendor = slide.properties.get("openslide.vendor", "")
    if vendor in DIRECT_VENDORS:
        reader = None
        try:
            reader = TiffTileReader(slide_path, slide.level_dimensions, slide.level_downsamples, levels, cache_bytes)
            reader.check_against(slide)
            slide.close()
            return reader
        except Exception as err:  # anything unexpected: OpenSlide knows the format better
            log.info("%s: reading through OpenSlide (%s)", slide_path, err)
            if reader is not None:
                reader.close()
    slide.set_cache(openslide.OpenSlideCache(cache_bytes))
    return slide


def read_view(slide, cx: float, cy: float, plan: ReadPlan, dims: tuple[int, int],
              out: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Read one view centred on (cx, cy) level-0 px; returns (uint8 RGB, padded).

    ``slide`` is an OpenSlide handle or a :class:`TiffTileReader`; with ``out`` the view is
    written there (and returned).
    """
    x0, y0, lx, ly = view_origin(cx, cy, plan)
    span = int(round(plan.fov0))
    padded = x0 < 0 or y0 < 0 or x0 + span > dims[0] or y0 + span > dims[1]
    same_size = plan.read_px == plan.size_px
    if isinstance(slide, TiffTileReader):
        rgb = slide.read_level(plan.level, lx, ly, plan.read_px, plan.read_px, out=out if same_size else None)
    else:
        region = slide.read_region((x0, y0), plan.level, (plan.read_px, plan.read_px))
        rgba = np.asarray(region)
        alpha = rgba[..., 3]
        if padded or alpha.min() < 255:
            # OpenSlide marks pixels outside the slide as transparent: put them on white.
            a = alpha[..., None].astype(np.float32) / 255.0
            rgb = (rgba[..., :3] * a + WHITE * (1.0 - a) + 0.5).astype(np.uint8)
        else:
            rgb = rgba[..., :3]
    if not same_size:
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(
            (plan.size_px, plan.size_px), Image.Resampling.LANCZOS))
    if out is None:
        return np.ascontiguousarray(rgb), padded
    if rgb is not out:
        out[...] = rgb
    return out, padded
