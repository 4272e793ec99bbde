"""Write pyramidal tiled TIFFs that OpenSlide opens as multi-level slides.

The layout is the one OpenSlide's ``generic-tiff`` driver reads as a pyramid: one
top-level IFD per level, every level tiled and JPEG-compressed (YCbCr, 2x2 chroma
subsampling), level ``k`` downsampled ``2**k`` from level 0 by 2x2 area averaging.
The resolution tags (ResolutionUnit centimeter, X/YResolution in pixels per cm)
carry the micrometres per pixel; OpenSlide reports them as ``openslide.mpp-x`` and
``openslide.mpp-y``.

Memory stays bounded for slides of several gigapixels: level 0 is read from the
source one strip of tiles at a time, and each lower level is built strip by strip
into a raw temporary file that the next pass reads back, so no full level is ever
held in memory (peak about ``tile`` rows of the widest level, a few copies).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import tifffile

from m2ost.atomic import atomic_path
from m2ost.errors import InputError

__all__ = [
    "RegionSource",
    "ArraySource",
    "TiffSource",
    "write_pyramidal_tiff",
    "pyramid_shapes",
]

# Uncompressed level-0 size above which the file is written as BigTIFF: classic
# TIFF offsets are 32-bit, and JPEG may compress poorly on noisy images.
_BIGTIFF_RAW_BYTES = 2**31
# Raw tiles handed to the JPEG encoder threads in one batch. tifffile's default (512 MiB) would
# dominate the writer's memory on wide slides; 64 MiB is still hundreds of tiles per batch.
_ENCODE_BATCH_BYTES = 64 * 2**20


@runtime_checkable
class RegionSource(Protocol):
    """Level-0 pixels, given on demand.

    Attributes
    ----------
    height, width : int
        Size of level 0 in pixels.

    Methods
    -------
    read(y, x, h, w)
        Return the RGB uint8 array of shape ``(h, w, 3)`` whose top-left pixel is
        ``(y, x)``. Callers only ask for windows inside the image.
    """

    height: int
    width: int

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray: ...


class ArraySource:
    """A :class:`RegionSource` over an in-memory (or memory-mapped) RGB array."""

    def __init__(self, array: np.ndarray):
        array = np.asarray(array)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(
                f"expected an RGB uint8 array of shape (H, W, 3), got {array.dtype} {array.shape}"
            )
        self.array = array
        self.height, self.width = int(array.shape[0]), int(array.shape[1])

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.array[y : y + h, x : x + w]


class _CallableSource:
    """Adapts a callable ``read(y, x, h, w)`` carrying ``height``/``width`` attributes."""

    def __init__(self, fn):
        self._fn = fn
        self.height, self.width = int(fn.height), int(fn.width)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self._fn(y, x, h, w)


class TiffSource:
    """A :class:`RegionSource` over the first image of a (possibly huge) TIFF.

    Reads through tifffile's zarr store, so only the chunks that cover the
    requested window are decoded. Grey images are expanded to RGB, an alpha
    channel is dropped and 16-bit images are scaled to 8 bits.
    """

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        self._store = tifffile.imread(self.path, aszarr=True, level=0)
        arr = zarr.open(self._store, mode="r")
        if isinstance(arr, zarr.Group):  # multi-level stores open as a group
            arr = arr[sorted(arr.array_keys())[0]]
        self._z = arr
        shape = arr.shape
        if len(shape) == 3 and shape[0] in (3, 4) and shape[2] not in (3, 4):
            raise InputError("planar (channels-first) TIFF is not supported", file=self.path)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
            raise InputError(f"not an RGB or grey image (array shape {shape})", file=self.path)
        if arr.dtype not in (np.uint8, np.uint16):
            raise InputError(f"unsupported pixel type {arr.dtype}", file=self.path)
        self.height, self.width = int(shape[0]), int(shape[1])

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        try:
            window = np.asarray(self._z[y : y + h, x : x + w])
        except Exception as err:  # codecs raise many types on corrupt or truncated data
            raise InputError(f"cannot decode TIFF pixels: {err}", file=self.path) from err
        return _to_rgb8(window)

    def close(self) -> None:
        self._store.close()


def _to_rgb8(a: np.ndarray) -> np.ndarray:
    """Coerce grey / grey+alpha / RGBA / 16-bit pixels to RGB uint8."""
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)  # keep the top byte: 0..65535 -> 0..255
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] in (2, 4):  # drop alpha
        a = a[..., :-1]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


class _RawLevel:
    """A level stored as raw RGB rows in a temporary file (written once, read back).

    Strips are appended with :meth:`append_rows`; :meth:`read` uses ``pread`` so
    reading back costs no more memory than the requested window.
    """

    def __init__(self, directory: Path, height: int, width: int):
        self.height, self.width = height, width
        fd, name = tempfile.mkstemp(prefix=".pyramid-level-", suffix=".raw", dir=directory)
        self.path = Path(name)
        self._fd: int | None = fd
        self._rows_written = 0

    def append_rows(self, rows: np.ndarray) -> None:
        assert rows.shape[1:] == (self.width, 3) and rows.dtype == np.uint8
        os.pwrite(self._fd, np.ascontiguousarray(rows).tobytes(), self._rows_written * self.width * 3)
        self._rows_written += rows.shape[0]

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        assert self._rows_written == self.height, "level read before it was complete"
        # Read whole rows (contiguous on disk), then cut the columns.
        buf = os.pread(self._fd, h * self.width * 3, y * self.width * 3)
        rows = np.frombuffer(buf, dtype=np.uint8).reshape(h, self.width, 3)
        return rows[:, x : x + w]

    def close(self) -> None:
        """Close and delete the file; safe to call more than once."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


def pyramid_shapes(height: int, width: int, min_size: int = 512) -> list[tuple[int, int]]:
    """Level sizes ``(height, width)`` for downsamples 1, 2, 4, ...

    Levels are added while the previous level's longer side exceeds ``min_size``;
    each level is ``ceil(previous / 2)`` so that no edge pixel is lost.
    """
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _downsample2(strip: np.ndarray) -> np.ndarray:
    """2x2 area average of an RGB uint8 strip (odd edges replicated), rounded."""
    from PIL import Image

    h, w = strip.shape[:2]
    if h % 2 or w % 2:
        strip = np.pad(strip, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    # PIL's 2x2 box reduction is (sum + 2) >> 2, bit-identical to the numpy expression
    # ((a + b + c + d + 2) >> 2 in uint16) and about 3x faster; it dominated pyramid writing.
    return np.asarray(Image.fromarray(np.ascontiguousarray(strip)).reduce(2))


def _tiles_of_level(
    source: RegionSource, tile: int, next_level: _RawLevel | None
) -> Iterator[np.ndarray]:
    """Yield ``source``'s tiles in row-major order, one strip of tiles at a time.

    As a side effect each strip is downsampled into ``next_level`` so that the
    next level is ready when this one has been written.
    """
    for y in range(0, source.height, tile):
        h = min(tile, source.height - y)
        strip = _to_rgb8(np.asarray(source.read(y, 0, h, source.width)))
        if strip.shape != (h, source.width, 3):
            raise ValueError(f"source.read returned {strip.shape}, expected {(h, source.width, 3)}")
        if next_level is not None:
            next_level.append_rows(_downsample2(strip))
        for x in range(0, source.width, tile):
            t = strip[:, x : x + tile]
            if t.shape[0] != tile or t.shape[1] != tile:
                # Edge tiles are padded by replication: JPEG blocks stay smooth and
                # readers crop to the level size anyway.
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
            yield t


def _check_pyramid_arguments(mpp, tile: int, quality: int) -> None:
    if not (isinstance(mpp, (int, float, np.floating)) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")


def _as_source(level0) -> RegionSource:
    """An array, a :class:`RegionSource` or a callable with ``height`` and ``width``, as a source."""
    if isinstance(level0, np.ndarray):
        source = ArraySource(level0)
    elif isinstance(level0, RegionSource):
        source = level0
    elif callable(level0) and hasattr(level0, "height") and hasattr(level0, "width"):
        source = _CallableSource(level0)
    else:
        raise TypeError(
            "level0 must be an RGB uint8 array, an object with height, width and read(y, x, h, w), "
            "or a callable (y, x, h, w) -> array with height and width attributes"
        )
    if source.height < 1 or source.width < 1:
        raise ValueError(f"empty image ({source.height} x {source.width})")
    return source


def _write_level(tw: tifffile.TiffWriter, tiles: Iterator[np.ndarray], shape: tuple[int, int], level: int,
                 mpp: float, tile: int, quality: int, workers: int) -> None:
    """One level of the pyramid: JPEG tiles, the resolution tags at its downsample."""
    res = 1e4 / (mpp * 2**level)  # pixels per centimetre at this level
    tw.write(
        tiles,
        shape=(*shape, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",  # tifffile stores JPEG as YCbCr 2x2 from RGB input
        compression="jpeg",
        compressionargs={"level": quality},
        resolution=(res, res),
        resolutionunit="CENTIMETER",
        subfiletype=0 if level == 0 else 1,  # 1 = reduced-resolution image
        software="m2ost",
        metadata=None,  # no JSON description: keeps files byte-reproducible
        maxworkers=workers,
        buffersize=_ENCODE_BATCH_BYTES,
    )


def write_pyramidal_tiff(path: str | os.PathLike, level0: np.ndarray | RegionSource, mpp: float, tile: int = 256,
                         quality: int = 90, min_size: int = 512, *, workers: int = 2) -> list[tuple[int, int]]:
    """Write ``level0`` and its 2x downsamples as a pyramidal tiled JPEG TIFF; returns the size
    ``(height, width)`` of every level written, level 0 first.

    ``path`` is written under a temporary name and renamed when complete. ``level0`` is an RGB
    uint8 array ``(H, W, 3)``; or, for images too large for memory, a :class:`RegionSource`
    (``height``, ``width``, ``read(y, x, h, w)``) or a callable ``(y, x, h, w) -> array`` with
    ``height`` and ``width`` attributes, read one strip of ``tile`` rows at a time. ``mpp``
    (µm per pixel of level 0) goes to the resolution tags; ``tile`` is the tile edge in pixels (a
    multiple of 16, as TIFF requires), ``quality`` the JPEG quality (1-100); levels stop once the
    longer side is at most ``min_size`` pixels; ``workers`` threads JPEG-encode the tiles.
    """
    _check_pyramid_arguments(mpp, tile, quality)
    source = _as_source(level0)
    shapes = pyramid_shapes(source.height, source.width, min_size)
    bigtiff = source.height * source.width * 3 > _BIGTIFF_RAW_BYTES
    path = Path(path)
    with atomic_path(path) as tmp, contextlib.ExitStack() as cleanup, \
            tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        current: RegionSource = source
        for level, shape in enumerate(shapes):
            nxt = None
            if level + 1 < len(shapes):
                nh, nw = shapes[level + 1]
                nxt = _RawLevel(tmp.parent, nh, nw)
                cleanup.callback(nxt.close)
            _write_level(tw, _tiles_of_level(current, tile, nxt), shape, level, mpp, tile, quality, workers)
            if isinstance(current, _RawLevel):
                current.close()  # free its disk space as soon as it is written
            current = nxt  # type: ignore[assignment]
    return shapes
