"""Helpers shared by the benchmark scripts: where things are, what machine this is, and how
much memory a whole process tree used.

Nothing here times anything by itself; the scripts do, and print what they measured.

Also here: a generated, tissue-like, gigapixel pyramidal slide and a Visium-density spot grid
on it (:func:`ensure_slide`, :func:`hex_spots`). The slide is written strip by strip through
:mod:`m2ost.data.pyramid`'s ``RegionSource`` interface, so memory stays bounded (a few hundred MB)
whatever its size. The texture is procedural: pink stroma with fibres, purple nuclei of 6 to
10 µm, pale lumens, optical blur and sensor noise, under a smooth tissue mask that leaves
about half the glass white. It only has to give JPEG tiles of realistic size and decode cost,
and white background where a real slide has glass. Everything is a deterministic function
of (height, width, mpp, seed).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # the real public data, beside the repository
WORK = REPO / "benchmarks" / "results"  # git-ignored


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_info() -> dict:
    """CPU model, cores usable by this process, memory, load average, Python."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "mem_gib": mem_gib, "load": load_average(),
            "python": platform.python_version()}


def _children_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except OSError:
                continue
            for k in kids:
                found.append(int(k))
                todo.append(int(k))
    return found


def _memory_kib(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, peak RSS) of one process in KiB from /proc (zeros when it is gone)."""
    rss = pss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss, hwm


def run_measured(cmd: list[str], interval: float = 0.05, env: dict | None = None) -> dict:
    """Run ``cmd``; return its JSON result (last stdout line) and the peak memory of its process tree.

    The tree (the child and all its descendants) is sampled every ``interval`` s:
    ``peak_pss_mib`` is the largest sum of PSS over the tree (shared pages split between
    the processes that map them: the honest total), ``peak_rss_mib`` the largest sum of RSS
    (shared pages counted once per process: over-states), ``hwm_sum_mib`` the sum over every
    process seen of its kernel high-water mark (VmHWM: catches peaks between samples, but
    forked workers start with their parent's resident pages, so it over-states too).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_rss = peak_pss = 0
    hwm: dict[int, int] = {}
    while proc.poll() is None:
        rss = pss = 0
        for pid in [proc.pid, *_children_of(proc.pid)]:
            r, p, h = _memory_kib(pid)
            rss += r
            pss += p
            hwm[pid] = max(hwm.get(pid, 0), h)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(interval)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(err)
        raise RuntimeError(f"benchmark child failed ({proc.returncode}): {' '.join(cmd)}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    result.update(peak_rss_mib=peak_rss / 1024, peak_pss_mib=peak_pss / 1024,
                  hwm_sum_mib=sum(hwm.values()) / 1024, wall_s=wall, stderr=err)
    return result


# --- a generated gigapixel slide ---------------------------------------------------------

GENERATOR_VERSION = 2
PATCH = 2048  # texture patch edge (px); the slide is a mosaic of randomly offset windows of it
BLOCK = 1024  # mosaic cell edge (px); a multiple of the 256-px strips
MASK_CELL = 64  # the tissue mask is drawn on a grid this many px per cell, then smoothed


def _texture_patch(rng: np.random.Generator, mpp: float) -> np.ndarray:
    """A periodic (PATCH x PATCH) H&E-like RGB patch."""
    from scipy import ndimage
    from skimage.draw import ellipse

    n = PATCH
    # Stroma: pink, with fibres (anisotropic smooth noise) and slow density changes.
    fib = ndimage.gaussian_filter(rng.normal(size=(n, n)), sigma=(2.0, 14.0), mode="wrap")
    yy, xx = np.mgrid[0:n, 0:n]
    fib = fib[yy, (xx + yy) % n]  # shear: oblique fibres, still periodic
    slow = ndimage.gaussian_filter(rng.normal(size=(n, n)), sigma=60, mode="wrap")
    fib = (fib - fib.mean()) / fib.std()
    slow = (slow - slow.mean()) / slow.std()
    density = np.clip(0.55 + 0.25 * fib + 0.15 * slow, 0, 1)[..., None]
    white = np.array([242.0, 236.0, 240.0])
    eosin = np.array([214.0, 120.0, 170.0])
    img = white + (eosin - white) * density
    # Lumens: pale irregular holes.
    for _ in range(10):
        cy, cx = rng.uniform(0, n, 2)
        ry, rx = rng.uniform(30, 120, 2) / (mpp / 0.25)
        rr, cc = ellipse(cy, cx, ry, rx, rotation=rng.uniform(0, np.pi))
        img[rr % n, cc % n] = white * 0.7 + img[rr % n, cc % n] * 0.3
    # Nuclei: dark purple ellipses of 6-10 µm, denser in "tumour" patches.
    hema = np.array([75.0, 50.0, 130.0])
    crowd = ndimage.gaussian_filter(rng.normal(size=(n // 16, n // 16)), sigma=4, mode="wrap")
    crowd = np.repeat(np.repeat(crowd > 0.0, 16, 0), 16, 1)
    n_nuclei = int(n * n * (mpp / 1e3) ** 2 / (22e-3 ** 2))  # one per 22 x 22 µm on average
    for _ in range(n_nuclei * 2):
        cy, cx = rng.uniform(0, n, 2)
        if not crowd[int(cy), int(cx)] and rng.random() < 0.7:
            continue
        r = rng.uniform(3.0, 5.0) / mpp
        rr, cc = ellipse(cy, cx, r, r * rng.uniform(0.55, 1.0), rotation=rng.uniform(0, np.pi))
        shade = rng.uniform(0.75, 1.0)
        img[rr % n, cc % n] = hema * shade + rng.normal(0, 6, 3)
    img = ndimage.gaussian_filter(img, sigma=(1.1, 1.1, 0), mode="wrap")  # optics
    img += rng.normal(0, 3.0, img.shape)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


class TissueSource:
    """A ``RegionSource`` (height, width, read(y, x, h, w)) of the generated slide."""

    def __init__(self, height: int, width: int, mpp: float, seed: int = 0):
        from scipy import ndimage

        self.height, self.width, self.mpp, self.seed = int(height), int(width), float(mpp), int(seed)
        self._tex = None  # made on the first read: the spot grid needs only the mask
        rows, cols = math.ceil(self.height / BLOCK), math.ceil(self.width / BLOCK)
        self._offsets = np.random.default_rng([seed, 1]).integers(0, PATCH, size=(rows, cols, 2))
        # Tissue mask: a few smooth blobs covering about 55% of the glass, none at the border.
        rng = np.random.default_rng([seed, 2])
        mh, mw = math.ceil(self.height / MASK_CELL) + 1, math.ceil(self.width / MASK_CELL) + 1
        field = ndimage.gaussian_filter(rng.normal(size=(mh, mw)), sigma=max(mh, mw) / 14, mode="reflect")
        yy, xx = np.mgrid[0:mh, 0:mw]
        vignette = np.minimum(np.minimum(yy, mh - 1 - yy) / mh, np.minimum(xx, mw - 1 - xx) / mw)
        field = (field - field.mean()) / field.std() + 40 * np.minimum(vignette - 0.08, 0)
        self._mask = np.clip((field - np.quantile(field, 0.40)) * 4, 0, 1).astype(np.float32)

    def tissue(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue weight (0..1) at level-0 points (bilinear in the mask grid)."""
        from scipy import ndimage

        return ndimage.map_coordinates(self._mask, [np.asarray(y) / MASK_CELL, np.asarray(x) / MASK_CELL],
                                       order=1, mode="nearest")

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self._tex is None:
            patch = _texture_patch(np.random.default_rng([self.seed, 0]), self.mpp)
            self._tex = np.tile(patch, (2, 2, 1))  # any PATCH window at offsets < PATCH is one slice
        out = np.empty((h, w, 3), np.uint8)
        for by in range(y // BLOCK, (y + h - 1) // BLOCK + 1):
            y0, y1 = max(y, by * BLOCK), min(y + h, (by + 1) * BLOCK)
            for bx in range(x // BLOCK, (x + w - 1) // BLOCK + 1):
                x0, x1 = max(x, bx * BLOCK), min(x + w, (bx + 1) * BLOCK)
                oy, ox = self._offsets[by, bx]
                ty, tx = oy + (y0 - by * BLOCK), ox + (x0 - bx * BLOCK)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = self._tex[ty:ty + y1 - y0, tx:tx + x1 - x0]
        # Blend with white outside the tissue (mask bilinearly upsampled to the strip).
        from PIL import Image

        m = Image.fromarray(self._mask).resize(
            (w, h), Image.Resampling.BILINEAR,
            box=(x / MASK_CELL, y / MASK_CELL, (x + w) / MASK_CELL, (y + h) / MASK_CELL))
        m8 = (np.asarray(m) * 255 + 0.5).astype(np.uint16)[..., None]
        if m8.max() == 0:
            out[:] = 255
            return out
        inv = 255 - out.astype(np.uint16)
        return (255 - (inv * m8 + 127) // 255).astype(np.uint8)


def hex_spots(source: TissueSource, pitch_um: float = 100.0, margin_px: float = 0.0) -> np.ndarray:
    """Spot centres (x, y) in level-0 px: a hexagonal grid of ``pitch_um`` over the tissue."""
    pitch = pitch_um / source.mpp
    row_step = pitch * math.sqrt(3) / 2
    pts = []
    for r, y in enumerate(np.arange(pitch / 2 + margin_px, source.height - margin_px, row_step)):
        xs = np.arange(pitch / 2 + margin_px + (pitch / 2 if r % 2 else 0), source.width - margin_px, pitch)
        pts.append(np.column_stack([xs, np.full_like(xs, y)]))
    xy = np.concatenate(pts)
    return xy[source.tissue(xy[:, 0], xy[:, 1]) > 0.5]


def ensure_slide(path: Path, height: int, width: int, mpp: float, seed: int = 0, quality: int = 90,
                 log=print) -> tuple[TissueSource, dict]:
    """Generate the slide at ``path`` unless a file made with the same parameters is there."""
    from m2ost.data.pyramid import write_pyramidal_tiff

    source = TissueSource(height, width, mpp, seed)
    params = {"generator": GENERATOR_VERSION, "height": height, "width": width, "mpp": mpp, "seed": seed,
              "quality": quality, "tile": 256}
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params and meta.get("bytes") == path.stat().st_size:
            return source, meta
    log(f"generating {width} x {height} px slide at {mpp} µm/px -> {path} (once; later runs reuse it)")
    start = time.perf_counter()
    shapes = write_pyramidal_tiff(path, source, mpp, tile=256, quality=quality, workers=2)
    meta = {"params": params, "bytes": path.stat().st_size, "levels": shapes,
            "generate_s": time.perf_counter() - start}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"generated in {meta['generate_s']:.0f} s, {meta['bytes'] / 2**20:.0f} MiB")
    return source, meta
