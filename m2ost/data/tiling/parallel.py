"""Cutting the views of many spots: thin bands of spots over worker processes, into shared memory."""

from __future__ import annotations

import ctypes
import gc
import math
import mmap
import multiprocessing as mp
import os
import queue
import signal

import numpy as np

from m2ost.data.bundle import spot_digest
from m2ost.data.tiling.reader import TiffTileReader, open_reader, read_view
from m2ost.data.tiling.views import ReadPlan

CHUNK_SPOTS = 32
SLOTS_PER_WORKER = 3


def tissue_fraction(rgb: np.ndarray) -> float:
    """Fraction of stained pixels: coloured (channel spread > 18) and not near-white (mean < 225)."""
    r, g, b = rgb.reshape(-1, 3).T.copy()  # planar copy: the arithmetic below then runs on contiguous rows
    spread = np.maximum(np.maximum(r, g), b)
    spread -= np.minimum(np.minimum(r, g), b)
    total = r.astype(np.uint16)
    total += g
    total += b  # mean < 225 <=> sum < 675, exactly, for integer sums
    return float(np.count_nonzero((spread > 18) & (total < 675)) / r.size)



def _processing_order(xy: np.ndarray, plans: list[ReadPlan]) -> np.ndarray:
    """Spot indices in thin horizontal bands (one 256-px tile row of the finest level used),
    alternately left to right and right to left, so the tiles a view needs were mostly
    decoded for its neighbours and are freed soon after."""
    band_height = 256 * min(p.downsample for p in plans)
    band = np.floor((xy[:, 1] - xy[:, 1].min()) / band_height).astype(np.int64)
    x = np.where(band % 2 == 0, xy[:, 0], -xy[:, 0])
    return np.lexsort((x, band))


def _spot_chunks(slide_path: str, xy: np.ndarray, plans: list[ReadPlan], order: np.ndarray,
                 buffers=None, stats: dict | None = None):
    """Cut the views of the spots ``order`` (in that order), CHUNK_SPOTS spots at a time.

    Yields ``(spot indices, [view arrays], padded, tissue fraction, digests)``; the view
    arrays come from ``buffers(n)`` when given, else are new.
    """
    reader = open_reader(slide_path, [p.level for p in plans])
    direct = isinstance(reader, TiffTileReader)
    # The loop makes no reference cycles, but allocates enough small objects to trigger
    # collections that rescan the whole heap (pandas, h5py, ...): 3% of the time, for nothing.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        dims = reader.dimensions
        if direct:
            reader.expect(xy[order], plans)
        centres = xy.tolist()  # Python floats: the per-view arithmetic is several times faster than on numpy scalars
        for start in range(0, len(order), CHUNK_SPOTS):
            idx = order[start:start + CHUNK_SPOTS]
            n = len(idx)
            arrays = buffers(n) if buffers else [np.empty((n, p.size_px, p.size_px, 3), np.uint8) for p in plans]
            padded = np.zeros((n, len(plans)), bool)
            tissue = np.empty(n, np.float32)
            digests = np.empty(n, np.uint64)
            for k, i in enumerate(idx.tolist()):
                cx, cy = centres[i]
                for v, plan in enumerate(plans):
                    _, padded[k, v] = read_view(reader, cx, cy, plan, dims, out=arrays[v][k])
                tissue[k] = tissue_fraction(arrays[0][k])
                digests[k] = spot_digest([a[k] for a in arrays])
            yield idx, arrays, padded, tissue, digests
    finally:
        if gc_was_enabled:
            gc.enable()
        if stats is not None:
            stats["reader"] = "tiff" if direct else "openslide"
            stats["tiles_decoded"] = stats.get("tiles_decoded", 0) + (reader.tiles_decoded if direct else 0)
        reader.close()


def _slot_arrays(arena, offset: int, plans: list[ReadPlan], n: int) -> list[np.ndarray]:
    """The view arrays of one shared-memory slot (room for CHUNK_SPOTS spots), first ``n`` spots."""
    arrays = []
    for p in plans:
        count = CHUNK_SPOTS * p.size_px * p.size_px * 3
        arrays.append(np.frombuffer(arena, np.uint8, count, offset).reshape(CHUNK_SPOTS, p.size_px, p.size_px, 3)[:n])
        offset += count
    return arrays


def _die_with_parent() -> None:
    """Have the kernel kill this worker when the tiling process dies, even by SIGKILL (Linux).

    Otherwise a worker of a killed tiler waits forever for a free slot, holding its memory and
    the inherited handle of the unfinished bundle.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers end with the queue instead
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _worker(slide_path, xy, plans, order, arena, slot_bytes, free_slots, out_queue, w) -> None:
    _die_with_parent()
    try:
        slot = [None]

        def buffers(n):
            slot[0] = free_slots.get()
            return _slot_arrays(arena, slot[0] * slot_bytes, plans, n)

        stats: dict = {}
        for idx, _, padded, tissue, digests in _spot_chunks(slide_path, xy, plans, order, buffers, stats):
            out_queue.put(("chunk", w, slot[0], idx, padded, tissue, digests))
        out_queue.put(("done", w, stats))
    except BaseException as err:  # report any failure to the writer instead of hanging it
        out_queue.put(("error", w, f"{type(err).__name__}: {err}"))


def iter_chunks(slide_path: str, xy: np.ndarray, plans: list[ReadPlan], workers: int = 1,
                stats: dict | None = None):
    """Yield ``(spot indices, [view arrays], padded, tissue, digests)`` chunks from ``workers`` processes.

    With several workers the view arrays live in shared memory and are valid only until the
    next chunk is asked for: the slot then goes back to its worker.
    """
    order = _processing_order(xy, plans)
    workers = max(1, min(int(workers), math.ceil(len(order) / CHUNK_SPOTS)))
    if workers == 1:
        yield from _spot_chunks(slide_path, xy, plans, order, stats=stats)
        return
    slot_bytes = CHUNK_SPOTS * sum(p.size_px * p.size_px * 3 for p in plans)
    arena = mmap.mmap(-1, workers * SLOTS_PER_WORKER * slot_bytes)  # anonymous, shared with forked workers
    ctx = mp.get_context("fork")  # workers need only numpy and the readers; no re-import of __main__
    out_queue = ctx.Queue()
    free = [ctx.SimpleQueue() for _ in range(workers)]
    for w in range(workers):
        for s in range(SLOTS_PER_WORKER):
            free[w].put(w * SLOTS_PER_WORKER + s)
    # Each worker owns a contiguous run of bands: the tiles it decodes are its own.
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(slide_path, xy, plans, part, arena, slot_bytes, free[w], out_queue, w))
             for w, part in enumerate(np.array_split(order, workers))]
    for p in procs:
        p.start()
    try:
        for w, slot, idx, padded, tissue, digests in _worker_chunks(out_queue, procs, stats):
            yield idx, _slot_arrays(arena, slot * slot_bytes, plans, len(idx)), padded, tissue, digests
            free[w].put(slot)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


def _worker_chunks(out_queue, procs: list, stats: dict | None):
    """The workers' chunk messages ``(worker, slot, idx, padded, tissue, digests)`` until every worker
    is done (their statistics added to ``stats``); a worker's error, or all dead, raises."""
    running = len(procs)
    while running:
        try:
            item = out_queue.get(timeout=5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                raise RuntimeError("tiling workers died without reporting (killed, out of memory?)") from None
            continue
        if item[0] == "error":
            raise RuntimeError(f"tiling worker failed: {item[2]}")
        if item[0] == "done":
            running -= 1
            if stats is not None:
                stats["reader"] = item[2].get("reader")
                stats["tiles_decoded"] = stats.get("tiles_decoded", 0) + item[2].get("tiles_decoded", 0)
            continue
        yield item[1:]
