"""Tiling throughput and memory: the project's tiler against the naive way and the decode floor.

Measured in one run, on two slides:

- ``her2st``: HER2+ section B4 (9272 x 9923 px, 0.69 µm/px, 284 spots) converted to a
  pyramidal TIFF, with the HER2+ views (224/448/896 px fields -> 224 px, levels 0/1/2) and
  with the default µm views (112/224/448 µm -> 224 px, resized).
- ``large``: a generated 40,000 x 30,000 px (1.2 gigapixel) slide at 0.25 µm/px, JPEG tiles
  of 256 px, 4,899 spots on a 100-µm hexagonal grid over the tissue, views of
  112/224/448 µm at 224 px (levels 1/2/3, no resizing). Generated once into the work
  directory; later runs reuse it.

For each case:

- ``tiler``: ``tile_slide(strategy="pyramid")`` with 1 and 2 workers, all spots; peak memory
  of the whole process tree (sampled PSS and RSS sums, and the sum of per-process high-water marks).
- ``naive``: ``tile_slide(strategy="naive")``: every view read at level 0 then resized (what
  the authors did). On ``large`` only on a random subset of spots (``--naive-spots``), with the
  tiler timed on the same subset for a like-for-like ratio; the full-slide time is extrapolated.
- ``floor``: decode once every tile of the chosen levels that any view touches
  (``needed_level_tiles``), writing nothing: the tile bytes read with ``os.pread`` and decoded
  by libjpeg-turbo through ``imagecodecs.jpeg8_decode`` (the fastest decoder of these JPEG
  tiles available here), split over 1 and 2 processes; and, for reference, OpenSlide's
  ``read_region`` of exactly one tile.

Every measurement runs in a fresh child process (``--child``), so memory is that of the run;
wall-clock and CPU seconds (of the process tree) are both reported. Before the cases, the
cost of each piece (tile decode, OpenSlide read_region, digest, tissue fraction, HDF5 write)
is timed alone; ``--profile`` / ``--py-spy`` add where-the-time-goes tables.

Examples
--------
Everything in docs/performance.md (12 minutes on 2 busy cores once the large slide exists;
generating it takes about 1 more; ``--py-spy`` needs ``pip install py-spy``)::

    python benchmarks/tiling.py --profile --py-spy --repeat-large 2

The tiler of an older version of the package (here: before the optimisation)::

    git archive d3c00b9 m2ost | tar -x -C /tmp/m2ost-before
    python benchmarks/tiling.py --package-root /tmp/m2ost-before --skip naive,floor,components --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from common import SHARED_DATA, WORK, ensure_slide, hex_spots, load_average, machine_info, run_measured  # noqa: E402

HER2ST_VIEWS = [{"fov_px": 224, "size_px": 224}, {"fov_px": 448, "size_px": 224}, {"fov_px": 896, "size_px": 224}]
UM_VIEWS = [{"fov_um": 112, "size_px": 224}, {"fov_um": 224, "size_px": 224}, {"fov_um": 448, "size_px": 224}]


# --- child: one measurement -------------------------------------------------------------

def _spots_table(spec):
    import pandas as pd

    table = pd.read_csv(spec["spots"], sep="\t", dtype={"spot_id": str})
    if spec.get("subset"):
        table = table.iloc[np.load(spec["subset"])].reset_index(drop=True)
    return table


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have ended."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child_tile(spec: dict) -> dict:
    if spec.get("package_root"):
        sys.path.insert(0, spec["package_root"])
        for name in [m for m in sys.modules if m == "m2ost" or m.startswith("m2ost.")]:
            del sys.modules[name]
    from m2ost.data import tiling

    if spec.get("reader") == "openslide":
        _force_openslide(tiling)
    table = _spots_table(spec)
    views = [tiling.View.from_config(v) for v in spec["views"]]
    out = Path(spec["out"])
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu0, start = _cpu_seconds(), time.perf_counter()
    result = tiling.tile_slide("bench", spec["slide"], table, spec["mpp"], views, out, workers=spec["workers"],
                               strategy=spec["strategy"], progress=False)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    breakdown = None
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf)
        stats.sort_stats("tottime").print_stats(18)
        Path(spec["profile"]).write_text(buf.getvalue())
        breakdown = _breakdown(stats.stats, seconds)
    size = out.stat().st_size
    out.unlink()
    return {"seconds": seconds, "cpu_s": cpu, "n": len(table), "bundle_mib": size / 2**20,
            "reader": result.get("reader"),
            "tiles_decoded": result.get("tiles_decoded"), "module": tiling.__file__, "breakdown": breakdown}


def _force_openslide(tiling) -> None:
    """Have the tiler read through OpenSlide's read_region, never its direct TIFF reader."""
    if hasattr(tiling, "READER"):  # an older package: the switch was a module global
        tiling.READER = "openslide"
        return
    from m2ost.data.tiling import parallel, reader

    def openslide_reader(slide_path, levels, cache_bytes=reader.CACHE_BYTES):
        import openslide

        slide = openslide.OpenSlide(str(slide_path))
        slide.set_cache(openslide.OpenSlideCache(cache_bytes))
        return slide

    parallel.open_reader = openslide_reader  # the workers are forked: they inherit it


def needed_level_tiles(slide, xy: np.ndarray, plans) -> dict[int, set]:
    """The (col, row, tile width, tile height) tiles of each used level that any view touches.

    The same tiles, by the same arithmetic, as the direct reader decodes (for the decode floor);
    ``slide`` is an OpenSlide handle.
    """
    from m2ost.data.tiling.views import tile_span, view_origin

    tiles: dict[int, set] = {}
    props = slide.properties
    for plan in plans:
        tw = int(props.get(f"openslide.level[{plan.level}].tile-width", 256))
        th = int(props.get(f"openslide.level[{plan.level}].tile-height", 256))
        width, height = slide.level_dimensions[plan.level]
        wanted = tiles.setdefault(plan.level, set())
        for cx, cy in np.asarray(xy, np.float64).tolist():
            _, _, lx, ly = view_origin(cx, cy, plan)
            for ty in tile_span(ly, plan.read_px, height, th):
                for tx in tile_span(lx, plan.read_px, width, tw):
                    wanted.add((tx, ty, tw, th))
    return tiles


# Where the 1-worker tiler's time goes: (label, file suffix, function, own time only?).
# The entries do not nest in one another, so their times add up.
_PARTS = [
    ("read + decode tiles", ("tiling.py", "tiling/reader.py"), "_tile", False),
    ("read + decode (OpenSlide read_region)", "lowlevel.py", "read_region", False),
    ("cut views out of tiles (numpy copies, bookkeeping)", ("tiling.py", "tiling/reader.py"), "read_level", True),
    ("resize (PIL, Lanczos)", "Image.py", "resize", False),
    ("tissue fraction", ("tiling.py", "tiling/parallel.py"), "tissue_fraction", False),
    ("digest (xxh3 of every view)", "bundle.py", "spot_digest", False),
    ("write views (HDF5 whole-chunk writes)", "bundle.py", "write", True),
    ("HDF5 create + close, rename", "bundle.py", "__exit__", False),
]


def _breakdown(stats: dict, seconds: float) -> list:
    """Seconds per part of the work, from cProfile's table; the rest is 'other'."""
    rows = []
    for label, suffix, func, own in _PARTS:
        total = sum((tt if own else ct) for (path, _, name), (_, _, tt, ct, _) in stats.items()
                    if path.endswith(suffix) and name == func)
        if total:
            rows.append((label, total))
    rows.append(("other (Python per view and per spot, planning, queueing)", seconds - sum(t for _, t in rows)))
    return rows


def _tiff_level_pages(path: str, level_dimensions, levels):
    """The tiled TIFF directory of each OpenSlide level (matched by size)."""
    import tifffile

    tif = tifffile.TiffFile(path)
    pages = {}
    for level in levels:
        w, h = level_dimensions[level]
        match = [p for p in tif.pages if p.is_tiled and p.imagewidth == w and p.imagelength == h]
        assert len(match) == 1 and match[0].compression == 7, f"level {level}: expected one JPEG-tiled directory"
        pages[level] = match[0]
    return tif, pages


def _decode_imagecodecs(path, jobs, tables, out_q=None):
    import imagecodecs

    fd = os.open(path, os.O_RDONLY)
    n_bytes = 0
    try:
        for offset, count, level in jobs:
            data = os.pread(fd, count, offset)
            n_bytes += count
            imagecodecs.jpeg8_decode(data, tables=tables[level])
    finally:
        os.close(fd)
    return n_bytes


def _decode_openslide(path, jobs, _tables, out_q=None):
    import openslide

    slide = openslide.OpenSlide(path)
    for x0, y0, level, w, h in jobs:
        slide.read_region((x0, y0), level, (w, h))
    slide.close()
    return 0


def child_floor(spec: dict) -> dict:
    """Decode every needed tile once (the decode floor), over ``workers`` forked processes."""
    import multiprocessing as mp

    import openslide

    from m2ost.data import tiling

    table = _spots_table(spec)
    views = [tiling.View.from_config(v) for v in spec["views"]]
    slide = openslide.OpenSlide(spec["slide"])
    plans = tiling.plan_views(views, spec["mpp"], slide.level_downsamples)
    xy = table[["x", "y"]].to_numpy(np.float64)
    start = time.perf_counter()
    needed = needed_level_tiles(slide, xy, plans)
    list_s = time.perf_counter() - start
    levels = sorted(needed)
    tif, pages = _tiff_level_pages(spec["slide"], slide.level_dimensions, levels)
    tables = {lv: pages[lv].jpegtables for lv in levels}
    jobs, compressed, pixels = [], 0, 0
    for level in levels:
        page = pages[level]
        across = -(-page.imagewidth // page.tilewidth)
        for tx, ty, tw, th in sorted(needed[level], key=lambda t: (t[1], t[0])):
            i = ty * across + tx
            compressed += page.databytecounts[i]
            pixels += tw * th
            if spec["decoder"] == "imagecodecs":
                jobs.append((page.dataoffsets[i], page.databytecounts[i], level))
            else:
                ds = slide.level_downsamples[level]
                w, h = slide.level_dimensions[level]
                jobs.append((int(round(tx * tw * ds)), int(round(ty * th * ds)), level,
                             min(tw, w - tx * tw), min(th, h - ty * th)))
    slide.close()
    tif.close()
    decode = _decode_imagecodecs if spec["decoder"] == "imagecodecs" else _decode_openslide
    workers = spec["workers"]
    cpu0, start = _cpu_seconds(), time.perf_counter()
    if workers <= 1:
        decode(spec["slide"], jobs, tables)
    else:
        ctx = mp.get_context("fork")
        parts = np.array_split(np.arange(len(jobs)), workers)
        procs = [ctx.Process(target=decode, args=(spec["slide"], [jobs[i] for i in part], tables)) for part in parts]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        assert all(p.exitcode == 0 for p in procs)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    return {"seconds": seconds, "cpu_s": cpu, "n": len(table), "tiles": len(jobs), "list_s": list_s,
            "compressed_mib": compressed / 2**20, "decoded_mpx": pixels / 1e6,
            "tiles_per_level": {str(lv): len(needed[lv]) for lv in levels}}


# --- parent -------------------------------------------------------------------------------

def combine(runs: list[dict]) -> dict:
    """Several runs of one measurement: median time and CPU, largest memory."""
    out = dict(runs[0])
    out["all_seconds"] = [r["seconds"] for r in runs]
    out["seconds"] = statistics.median(out["all_seconds"])
    out["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    for key in ("peak_rss_mib", "peak_pss_mib", "hwm_sum_mib"):
        out[key] = max(r.get(key) or 0 for r in runs)
    out["rate"] = out["n"] / out["seconds"]
    out["loads"] = [r["load"] for r in runs]
    return out


def prepare_her2st(work: Path, data: Path) -> dict:
    import pandas as pd

    from m2ost.data.convert import convert_to_pyramid

    image = data / "her2st" / "images" / "HE" / "B4.jpg"
    positions = data / "her2st" / "spot-selections" / "B4_selection.tsv"
    slide, mpp = work / "B4.tif", 0.69
    if not slide.is_file():
        print(f"converting {image.name} to a pyramidal TIFF (once)", flush=True)
        convert_to_pyramid(image, slide, mpp)
    table = pd.read_csv(positions, sep="\t")
    spots = pd.DataFrame({"spot_id": [f"{x}x{y}" for x, y in zip(table["x"], table["y"])],
                          "x": table["pixel_x"], "y": table["pixel_y"]})
    spots.to_csv(work / "B4_spots.tsv", sep="\t", index=False)
    return {"slide": str(slide), "spots": str(work / "B4_spots.tsv"), "mpp": mpp, "n": len(spots)}


def prepare_large(work: Path, height: int, width: int, mpp: float) -> dict:
    import pandas as pd

    slide = work / f"large_{width}x{height}_{mpp}.tif"
    source, meta = ensure_slide(slide, height, width, mpp)
    xy = hex_spots(source)
    spots = pd.DataFrame({"spot_id": [f"s{i}" for i in range(len(xy))], "x": xy[:, 0], "y": xy[:, 1]})
    spots.to_csv(work / "large_spots.tsv", sep="\t", index=False)
    return {"slide": str(slide), "spots": str(work / "large_spots.tsv"), "mpp": mpp, "n": len(spots),
            "slide_mib": meta["bytes"] / 2**20, "generate_s": meta.get("generate_s")}


def describe(label: str, r: dict) -> str:
    runs = ", ".join(f"{s:.2f}" for s in r["all_seconds"])
    text = f"{label}: {r['seconds']:.2f} s ({r['cpu_s']:.2f} s CPU) = {r['rate']:.1f} spots/s [runs {runs} s]"
    if "tiles" in r:
        return text + (f"; {r['tiles']} tiles {json.dumps(r['tiles_per_level'])}, {r['compressed_mib']:.0f} MiB "
                       f"compressed, {r['decoded_mpx']:.0f} Mpx")
    return text + (f"; reader {r['reader']}, {r['tiles_decoded']} tiles decoded; peak memory of the process tree "
                   f"PSS {r['peak_pss_mib']:.0f} MiB, RSS {r['peak_rss_mib']:.0f} MiB (sum of per-process "
                   f"high-water marks {r['hwm_sum_mib']:.0f} MiB); bundle {r['bundle_mib']:.0f} MiB")


def run_case(name: str, slide: dict, views: list, naive_subset: int | None, repeat: int, args, work: Path) -> dict:
    """All measurements of one case, interleaved round by round (the load drifts: ratios stay fair)."""
    skip = set(filter(None, args.skip.split(",")))
    base = {"slide": slide["slide"], "spots": slide["spots"], "mpp": slide["mpp"], "views": views}
    tile = {**base, "mode": "tile", "reader": args.reader, "out": str(work / "bench.h5"),
            "package_root": args.package_root}
    jobs = {f"tiler, {w} worker(s)": {**tile, "strategy": "pyramid", "workers": w} for w in args.workers}
    if "naive" not in skip:
        naive = {**tile, "strategy": "naive", "workers": 1}
        if naive_subset:
            subset = np.sort(np.random.default_rng(0).choice(slide["n"], size=min(naive_subset, slide["n"]),
                                                             replace=False))
            np.save(work / "naive_subset.npy", subset)
            naive["subset"] = str(work / "naive_subset.npy")
            jobs["tiler, 1 worker, naive's spots"] = {**naive, "strategy": "pyramid"}
        jobs["naive, 1 worker" + (f", random {len(subset)} spots" if naive_subset else "")] = naive
    if "floor" not in skip:
        for w in args.workers:
            jobs[f"decode floor (imagecodecs), {w} process(es)"] = {**base, "mode": "floor", "decoder": "imagecodecs",
                                                                     "workers": w}
        if "openslide-floor" not in skip:
            jobs["decode floor (OpenSlide read_region per tile), 1 process"] = {
                **base, "mode": "floor", "decoder": "openslide", "workers": 1}
    runs: dict[str, list] = {label: [] for label in jobs}
    for r in range(repeat):
        for label, spec in jobs.items():
            result = run_measured([sys.executable, __file__, "--child", json.dumps(spec)])
            result["load"] = load_average()
            runs[label].append(result)
            print(f"  round {r + 1}/{repeat}: {label}: {result['seconds']:.2f} s (load {result['load']})", flush=True)
    results = {label: combine(rs) for label, rs in runs.items()}
    print(f"\n### {name}: {slide['n']} spots, median of {repeat} round(s)")
    for label, r in results.items():
        print(describe(label, r))
    if args.profile and 1 in args.workers:
        profile = work / f"profile_{Path(slide['slide']).stem}_{len(views)}v_{views[0].get('fov_um', 0)}.txt"
        spec = {**jobs["tiler, 1 worker(s)"], "profile": str(profile)}
        r = run_measured([sys.executable, __file__, "--child", json.dumps(spec)])
        print(f"profiled tiler run, 1 worker (cProfile on, so slower): {r['seconds']:.2f} s; where the time goes "
              f"(top functions in {profile}):")
        for label, t in r["breakdown"] or []:
            print(f"  {label:58s} {t:6.2f} s  {100 * t / r['seconds']:4.0f} %")
    if args.py_spy and 1 in args.workers:
        stacks = work / f"py-spy_{Path(slide['slide']).stem}_{views[0].get('fov_um', 0)}.txt"
        parts = py_spy_breakdown({**jobs["tiler, 1 worker(s)"]}, stacks)
        if parts:
            total = sum(t for _, t in parts)
            print(f"sampled tiler run, 1 worker (py-spy at 200 Hz, native frames; {total:.1f} s of samples inside "
                  f"tile_slide; stacks in {stacks}):")
            for label, t in parts:
                print(f"  {label:58s} {t:6.2f} s  {100 * t / total:4.0f} %")
    print(flush=True)
    return results


def _old_tissue_fraction(rgb: np.ndarray) -> float:
    """tissue_fraction as it was before the optimisation (reductions over the channel axis)."""
    spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)
    mean = rgb.mean(axis=-1)
    return float(np.mean((spread > 18) & (mean < 225)))


def _best_of(fn, number: int, rounds: int = 3) -> float:
    """Seconds per call, best of ``rounds`` (the least disturbed by other jobs)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def components(slide_path: str, work: Path) -> None:
    """Cost of the pieces of the tiler's work, one at a time (in this process; best of 3)."""
    import hashlib

    import h5py
    import imagecodecs
    import openslide
    import tifffile

    from m2ost.data import tiling
    from m2ost.data.bundle import spot_digest

    print("### components (best of 3 repetitions each, this process)")
    # Tiles: the 400 largest (most detailed) tiles of level 1.
    with tifffile.TiffFile(slide_path) as tif:
        page = tif.pages[1]
        order = np.argsort(page.databytecounts)[::-1][:400]
        across = -(-page.imagewidth // page.tilewidth)
        fd = os.open(slide_path, os.O_RDONLY)
        data = [os.pread(fd, page.databytecounts[i], page.dataoffsets[i]) for i in order]
        os.close(fd)
    t_dec = _best_of(lambda: [imagecodecs.jpeg8_decode(d) for d in data], 1) / len(data)
    slide = openslide.OpenSlide(slide_path)
    ds = slide.level_downsamples[1]
    where = [(int(i % across * 256 * ds), int(i // across * 256 * ds)) for i in order]
    start = time.perf_counter()
    for xy in where:
        slide.read_region(xy, 1, (256, 256))
    t_os_cold = (time.perf_counter() - start) / len(where)
    t_os_warm = _best_of(lambda: [slide.read_region(xy, 1, (256, 256)) for xy in where], 1) / len(where)
    slide.close()
    print(f"decode one 256-px JPEG tile (level 1, mean {np.mean([len(d) for d in data]) / 1024:.1f} KiB): "
          f"imagecodecs {t_dec * 1e3:.2f} ms; OpenSlide read_region of the same tile {t_os_cold * 1e3:.2f} ms "
          f"(first read), {t_os_warm * 1e3:.2f} ms (tile in OpenSlide's cache: {t_os_warm / 65536 * 1e9:.0f} ns/px "
          "of compositing and conversion)")
    # One spot's output: three 224-px views of the slide.
    reader = tiling.open_reader(slide_path, [1, 2, 3])
    views = [reader.read_level(lv, 2000 // 2 ** (lv - 1), 1500 // 2 ** (lv - 1), 224, 224) for lv in (1, 2, 3)]
    reader.close()
    nbytes = sum(v.nbytes for v in views)
    t_xxh = _best_of(lambda: spot_digest(views), 300)
    t_blake = _best_of(lambda: spot_digest(views, "blake2b-64"), 300)
    t_sha = _best_of(lambda: hashlib.sha256(b"".join(v.data for v in views)), 300)
    print(f"digest of one spot ({nbytes} bytes): xxh3-64 (the bundle's) {t_xxh * 1e3:.3f} ms = "
          f"{nbytes / t_xxh / 1e9:.2f} GB/s; blake2b-64 (format 1) {t_blake * 1e3:.2f} ms = "
          f"{nbytes / t_blake / 1e9:.2f} GB/s; sha256 {t_sha * 1e3:.2f} ms = {nbytes / t_sha / 1e9:.2f} GB/s")
    t_old = _best_of(lambda: _old_tissue_fraction(views[0]), 50)
    t_new = _best_of(lambda: tiling.tissue_fraction(views[0]), 300)
    assert _old_tissue_fraction(views[0]) == tiling.tissue_fraction(views[0])
    print(f"tissue fraction of one 224-px view: before {t_old * 1e3:.2f} ms, now {t_new * 1e3:.2f} ms (same value)")
    n = 600
    path = work / "components.h5"
    timings = {}
    for mode in ("slice", "chunk"):
        with h5py.File(path, "w") as f:
            dsets = [f.create_dataset(f"v{v}", (n, 224, 224, 3), np.uint8, chunks=(1, 224, 224, 3)) for v in range(3)]
            start = time.perf_counter()
            for i in range(n):
                for dset, view in zip(dsets, views):
                    if mode == "slice":
                        dset[i] = view
                    else:
                        dset.id.write_direct_chunk((i, 0, 0, 0), view)
            timings[mode] = (time.perf_counter() - start) / n
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    start = time.perf_counter()
    for i in range(n):
        for k, view in enumerate(views):
            os.pwrite(fd, view, (3 * i + k) * view.nbytes)
    t_raw = (time.perf_counter() - start) / n
    os.close(fd)
    path.unlink()
    print(f"write one spot to HDF5 (uncompressed, one chunk per view): h5py slice assignment "
          f"{timings['slice'] * 1e3:.2f} ms, whole-chunk write {timings['chunk'] * 1e3:.2f} ms "
          f"({nbytes / timings['chunk'] / 1e9:.2f} GB/s); plain os.pwrite of the same bytes {t_raw * 1e3:.2f} ms "
          f"({nbytes / t_raw / 1e9:.2f} GB/s)\n", flush=True)


# py-spy categories, first match wins (a decode happens inside read_level, so it comes first).
_SPY_PARTS = [
    ("read + decode tiles (pread, tifffile -> libjpeg-turbo)", ("TiffTileReader._tile",)),
    ("read + decode (OpenSlide read_region)", ("read_region (openslide",)),
    ("resize (PIL, Lanczos)", ("resize (PIL",)),
    ("digest (xxh3 of every view)", ("spot_digest",)),
    ("tissue fraction", ("tissue_fraction",)),
    ("write views to HDF5", ("BundleWriter.write", "BundleWriter.__exit__", "BundleWriter.__enter__")),
    ("cut views out of tiles (numpy copies, bookkeeping)", ("read_level",)),
    ("garbage collector", ("gc_collect",)),
]


def py_spy_breakdown(spec: dict, out: Path) -> list | None:
    """Sample a child run with py-spy (native frames too); seconds of samples per part of the work."""
    import shutil
    import subprocess

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("py-spy not installed (pip install py-spy): no sampling profile")
        return None
    rate = 200
    cmd = [exe, "record", "-r", str(rate), "-f", "raw", "--native", "-o", str(out), "--",
           sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        print(f"py-spy failed: {done.stderr[-500:]}")
        return None
    parts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "tile_slide" not in stack or "TMonitor" in stack:  # start-up, imports; tqdm's sleeping thread
            continue
        label = next((lb for lb, keys in _SPY_PARTS if any(k in stack for k in keys)),
                     "other (Python per view and per spot, planning, queueing)")
        parts[label] = parts.get(label, 0) + int(count)
    return [(label, parts[label] / rate) for label in [lb for lb, _ in _SPY_PARTS] +
            ["other (Python per view and per spot, planning, queueing)"] if label in parts]


def get(results: dict, prefix: str) -> dict | None:
    return next((r for label, r in results.items() if label.startswith(prefix)), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=WORK / "tiling",
                        help="slides, spot tables and temporary bundles (default: benchmarks/results/tiling)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder (../shared/data)")
    parser.add_argument("--slides", default="her2st,large", help="comma-separated: her2st, large")
    parser.add_argument("--large-size", default="40000x30000", help="width x height of the generated slide")
    parser.add_argument("--large-mpp", type=float, default=0.25)
    parser.add_argument("--naive-spots", type=int, default=300, help="random spots timed naively on the large slide")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="rounds on the small slide (medians are reported)")
    parser.add_argument("--repeat-large", type=int, default=1, help="rounds on the large slide")
    parser.add_argument("--skip", default="", help="comma-separated: naive, floor, openslide-floor, components")
    parser.add_argument("--reader", choices=["auto", "openslide"], default="auto",
                        help="the tiler's reader; 'openslide' forces OpenSlide's read_region")
    parser.add_argument("--package-root", help="import m2ost for the tiler runs from this folder (an older version)")
    parser.add_argument("--profile", action="store_true", help="also profile a 1-worker tiler run (cProfile)")
    parser.add_argument("--py-spy", action="store_true",
                        help="also sample a 1-worker tiler run with py-spy (pip install py-spy; lower overhead)")
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = child_tile(spec) if spec["mode"] == "tile" else child_floor(spec)
        print(json.dumps(result))
        return

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.large_size.lower().split("x"))
    info = machine_info()
    import imagecodecs
    import openslide

    print(f"# tiling benchmark\nmachine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']:.0f} GiB, "
          f"Python {info['python']}, OpenSlide {openslide.__library_version__}, imagecodecs "
          f"{imagecodecs.__version__} ({imagecodecs.jpeg8_version()}); load average at start {info['load']}")
    if args.package_root:
        print(f"tiler runs import m2ost from {args.package_root}")
    if args.reader != "auto":
        print(f"tiler reader forced to {args.reader}")
    cases = []
    if "her2st" in args.slides:
        b4 = prepare_her2st(work, args.data)
        cases.append(("B4, HER2+ views (224/448/896 px -> 224)", b4, HER2ST_VIEWS, None, args.repeat))
        cases.append(("B4, default views (112/224/448 µm -> 224)", b4, UM_VIEWS, None, args.repeat))
    if "large" in args.slides:
        large = prepare_large(work, height, width, args.large_mpp)
        print(f"large slide: {width} x {height} px ({width * height / 1e9:.2f} Gpx) at {args.large_mpp} µm/px, "
              f"{large['slide_mib']:.0f} MiB, {large['n']} spots", flush=True)
        cases.append((f"generated {width // 1000}k x {height // 1000}k, 112/224/448 µm -> 224", large, UM_VIEWS,
                      args.naive_spots, args.repeat_large))
    if "large" in args.slides and "components" not in set(args.skip.split(",")):
        components(large["slide"], work)
    rows = [(name, slide, run_case(name, slide, views, subset, repeat, args, work))
            for name, slide, views, subset, repeat in cases]

    print("## summary (medians; wall-clock unless said)\n")
    print("| case | spots | tiler 1 w | tiler 2 w | naive | tiler / naive | floor 1 p | floor 2 p "
          "| tiler / floor, wall (1 w; 2 w) | tiler / floor, CPU (1 w; 2 w) | peak PSS / RSS MiB (1 w; 2 w) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for name, slide, res in rows:
        t1, t2 = get(res, "tiler, 1 worker(s)"), get(res, "tiler, 2 worker(s)")
        naive, same = get(res, "naive"), get(res, "tiler, 1 worker, naive's")
        f1, f2 = get(res, "decode floor (imagecodecs), 1"), get(res, "decode floor (imagecodecs), 2")
        rate = lambda r: f"{r['rate']:.0f} spots/s" if r else "-"  # noqa: E731
        speedup = "-"
        if naive and (same or t1):
            speedup = f"{(same or t1)['rate'] / naive['rate']:.0f}x"
            if same:
                speedup += f" on the same {naive['n']} spots; {slide['n'] / naive['rate'] / t1['seconds']:.0f}x " \
                           "extrapolated to all"
        naive_cell = (f"{naive['rate']:.1f} spots/s" + (f" ({naive['n']} spots)" if same else "")) if naive else "-"
        wall = "; ".join(f"{t['seconds'] / f['seconds']:.2f}x" for t, f in ((t1, f1), (t2, f2)) if t and f) or "-"
        cpu = "; ".join(f"{t['cpu_s'] / f['cpu_s']:.2f}x" for t, f in ((t1, f1), (t2, f2)) if t and f) or "-"
        mem = "; ".join(f"{t['peak_pss_mib']:.0f} / {t['peak_rss_mib']:.0f}" for t in (t1, t2) if t)
        t2_cell = rate(t2) + (f" ({t2['rate'] / t1['rate']:.2f}x)" if t1 and t2 else "")
        print(f"| {name} | {slide['n']} | {rate(t1)} | {t2_cell} | {naive_cell} | {speedup} | {rate(f1)} | {rate(f2)} "
              f"| {wall} | {cpu} | {mem} |")
        if name.startswith("generated"):
            if naive and same:
                x = same["rate"] / naive["rate"]
                verdicts.append(f"tiler >= 10x naive (same spots, 1 worker): {x:.0f}x -> "
                                f"{'met' if x >= 10 else 'NOT met'}")
            if t1 and f1:
                x = t1["seconds"] / f1["seconds"]
                verdicts.append(f"tiler <= 1.5x decode floor (1 worker vs 1 process, wall): {x:.2f}x "
                                f"-> {'met' if x <= 1.5 else 'NOT met'}")
            tilers = [r for label, r in res.items() if label.startswith("tiler, ") and "naive" not in label]
            peak = max(max(r["peak_rss_mib"], r["hwm_sum_mib"]) for r in tilers)
            verdicts.append(f"tiler peak memory < 1 GiB (largest of the tree's summed RSS and summed high-water "
                            f"marks, any worker count): {peak:.0f} MiB -> {'met' if peak < 1024 else 'NOT met'}")
    print(f"\nload average at the end: {load_average()}")
    if verdicts:
        print("\ntargets (large slide):\n" + "\n".join(f"- {v}" for v in verdicts))


if __name__ == "__main__":
    main()
