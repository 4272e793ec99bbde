"""Procedural slide content for the large-slide tests; numpy only, so that a child process
generating a slide imports nothing heavy (its peak memory is measured)."""

from __future__ import annotations

import numpy as np


class StainedStrips:
    """A procedural H&E-coloured slide, cheap to generate: one precomputed strip, shifted per row of tiles."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        x = np.arange(width + 1024, dtype=np.float32)
        y = np.arange(256, dtype=np.float32)
        t = 0.5 + 0.5 * np.sin(x / 97)[None, :] * np.cos(y / 41)[:, None]
        self.strip = np.empty((256, width + 1024, 3), np.uint8)
        for c, (pink, purple) in enumerate(zip((230, 170, 200), (120, 70, 160))):
            self.strip[..., c] = purple + (pink - purple) * t

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        shift = (y // 256 * 97) % 1024
        return self.strip[:h, x + shift:x + shift + w]
