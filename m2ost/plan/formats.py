"""Which slides OpenSlide reads in place and which are converted first (standard library only:
the Snakefile decides this while planning)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

PLAIN_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp"}
TIFF_EXTENSIONS = {".tif", ".tiff"}


def _tiff_first_ifd_is_tiled(path: str) -> bool:
    """True when the first image of a (Big)TIFF is tiled, which OpenSlide's generic TIFF reader needs."""
    with open(path, "rb") as fh:
        head = fh.read(16)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            return False
        end = "<" if head[:2] == b"II" else ">"
        magic = struct.unpack(end + "H", head[2:4])[0]
        if magic == 42:
            fh.seek(struct.unpack(end + "I", head[4:8])[0])
            n = struct.unpack(end + "H", fh.read(2))[0]
            entries, size = fh.read(12 * n), 12
        elif magic == 43:
            fh.seek(struct.unpack(end + "Q", head[8:16])[0])
            n = struct.unpack(end + "Q", fh.read(8))[0]
            entries, size = fh.read(20 * n), 20
        else:
            return False
    tags = {struct.unpack(end + "H", entries[i:i + 2])[0] for i in range(0, len(entries) - size + 1, size)}
    return 322 in tags  # TileWidth


def slide_needs_conversion(path: str) -> bool:
    """Whether a slide must be converted to a pyramidal TIFF before OpenSlide can read it.

    Plain JPEG/PNG/BMP always; a TIFF when it is stripped rather than tiled (a missing file
    is left to the later stages, which report it). Vendor formats are read in place.
    """
    ext = Path(path).suffix.lower()
    if ext in PLAIN_EXTENSIONS:
        return True
    if ext in TIFF_EXTENSIONS and os.path.isfile(path):
        try:
            return not _tiff_first_ifd_is_tiled(path)
        except (OSError, struct.error):
            return False
    return False
