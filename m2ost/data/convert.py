"""Plain images (JPEG, PNG, untiled TIFF) into pyramidal TIFFs that OpenSlide reads as slides.

TIFFs are read window by window (bounded memory; :class:`~m2ost.data.pyramid.TiffSource`); JPEG and
PNG are decoded whole, which they require. A missing, corrupt or truncated image is an InputError
naming the file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from m2ost.data.pyramid import TiffSource, write_pyramidal_tiff
from m2ost.errors import InputError


@contextlib.contextmanager
def _pil_limits_lifted():
    """Lift PIL's decompression-bomb limit and forbid truncated loads, locally."""
    from PIL import Image, ImageFile

    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    # Whole-slide images legitimately exceed PIL's 89-megapixel default.
    Image.MAX_IMAGE_PIXELS = None
    # A truncated file must fail, never decode to a silently grey remainder.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def read_plain_image(path: str | os.PathLike) -> np.ndarray:
    """Decode a plain JPEG / PNG (or anything PIL reads) to an RGB uint8 array.

    Raises
    ------
    InputError
        If the file is missing, unreadable, corrupt or truncated.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise InputError("image file not found", file=path)
    with _pil_limits_lifted():
        try:
            with Image.open(path) as img:
                img.load()  # decode now, inside the guarded block
                if img.mode != "RGB":
                    img = img.convert("RGB")
                arr = np.asarray(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise InputError(f"cannot decode image: {err}", file=path) from err
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(f"unexpected decoded pixel layout {arr.dtype} {arr.shape}", file=path)
    return arr


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(4)
    return magic[:2] in (b"II", b"MM") and magic[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


def convert_to_pyramid(
    src_image_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    mpp: float,
    **kwargs,
) -> list[tuple[int, int]]:
    """Convert a plain JPEG / PNG / TIFF into a pyramidal tiled TIFF.

    TIFFs are read window by window (bounded memory); JPEG and PNG are decoded
    whole, which they require.

    Parameters
    ----------
    src_image_path
        The plain image.
    dst_path
        The pyramidal TIFF to write (atomically).
    mpp
        Micrometres per pixel of the source image.
    **kwargs
        Passed to :func:`write_pyramidal_tiff` (``tile``, ``quality``, ...).

    Returns
    -------
    list of (height, width)
        The size of every level written.

    Raises
    ------
    InputError
        If the source is missing, unreadable, corrupt or truncated.
    """
    src = Path(src_image_path)
    if not src.is_file():
        raise InputError("image file not found", file=src)
    if _is_tiff(src):
        try:
            source = TiffSource(src)
        except InputError:
            raise
        except Exception as err:  # tifffile raises many types on corrupt headers
            raise InputError(f"cannot read TIFF: {err}", file=src) from err
        try:
            return write_pyramidal_tiff(dst_path, source, mpp, **kwargs)
        finally:
            source.close()
    return write_pyramidal_tiff(dst_path, read_plain_image(src), mpp, **kwargs)
