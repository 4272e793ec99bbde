"""The spot bundle: one HDF5 file per slide holding every view of every spot.

Layout (HEST's patch layout where it costs nothing):

``view_0`` .. ``view_{V-1}``  uint8 (n_spots, H, W, 3), one spot per chunk
``img``                       hard link to ``view_0`` (HEST patch layout)
``barcode``                   (n_spots,) spot ids, UTF-8
``coords``                    (n_spots, 2) int64 top-left corner (x, y) of view 0, level-0 px: HEST's (and
                              CLAM's) meaning; attributes patch_size_level0 (view 0's side, level-0 px),
                              patch_size (its side as stored, px), patch_level (0)
``centers``                   (n_spots, 2) int64 spot centre (x, y), level-0 px; every view is centred here
``padded``                    (n_spots, V) bool, the view reached outside the slide
``tissue_fraction``           (n_spots,) float32, stained fraction of view 0
``spot_digest``               (n_spots,) uint64, hash of the spot's views (detects edits)
attributes                    n_views, n_spots, mpp, mpp_source, fov_um, fov_px, size_px, levels,
                              sample, slide, provenance (JSON), format_version, digest_algorithm

Format 3 (this version) added ``centers``; bundles of formats 1 and 2 held the spot centres
under ``coords`` and are still read (:func:`read_centers`). Format 1 hashed with blake2b.

Views are stored uncompressed: the loader must deliver thousands of spots per second and
decompression would cost more than the disk reads it saves (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import json
import os

import h5py
import numpy as np
import xxhash

from m2ost.atomic import atomic_path
from m2ost.errors import InputError

FORMAT_VERSION = 3
# From this format on, ``coords`` is the top-left corner of view 0 and ``centers`` the spot centre.
FIRST_FORMAT_WITH_CENTERS = 3
# xxh3 hashes at memory speed (about 25x blake2b, which took a third of the tiling time);
# format-1 bundles carry no digest_algorithm attribute and were hashed with blake2b.
DIGEST_ALGORITHM = "xxh3_64"
_LEGACY_DIGEST = "blake2b-64"


def spot_digest(views: list[np.ndarray], algorithm: str = DIGEST_ALGORITHM) -> int:
    """A 64-bit hash of one spot's views, stored per spot so edits and corruption are found."""
    if algorithm == DIGEST_ALGORITHM:
        h = xxhash.xxh3_64()
    elif algorithm == _LEGACY_DIGEST:
        h = hashlib.blake2b(digest_size=8)
    else:
        raise ValueError(f"unknown spot digest algorithm {algorithm!r}")
    for v in views:
        h.update(np.ascontiguousarray(v).data)
    return h.intdigest() if algorithm == DIGEST_ALGORITHM else int.from_bytes(h.digest(), "little")


def digest_algorithm(f: h5py.File, path=None, sample: str | None = None) -> str:
    """The digest algorithm of an open bundle (format 1: blake2b)."""
    name = f.attrs.get("digest_algorithm", _LEGACY_DIGEST)
    name = name.decode() if isinstance(name, bytes) else str(name)
    if name not in (DIGEST_ALGORITHM, _LEGACY_DIGEST):
        raise InputError(f"bundle uses an unknown spot digest '{name}'; rerun tiling with this "
                         "version", file=path, sample=sample)
    return name


def format_version(f: h5py.File) -> int:
    """The format of an open bundle (1 where the attribute is missing: the first bundles)."""
    return int(f.attrs.get("format_version", 1))


def read_centers(f: h5py.File) -> np.ndarray:
    """The (n_spots, 2) spot centres (x, y), level-0 px, of an open bundle of any format."""
    name = "centers" if format_version(f) >= FIRST_FORMAT_WITH_CENTERS else "coords"
    return np.asarray(f[name][:], dtype=np.float64)


class BundleWriter:
    """Create a bundle under a temporary name; it gets its final name only when complete.

    ``centers``: spot centres (x, y); ``corners``: top-left corner (x, y) of view 0 (both level-0
    px); ``patch_size_level0``: view 0's side in level-0 px.
    """

    def __init__(self, path, spot_ids: list[str], centers: np.ndarray, corners: np.ndarray, sizes: list[int],
                 attrs: dict, provenance: dict | None = None, patch_size_level0: int = 0):
        self.path = path
        self._ctx = atomic_path(path)
        self.n = len(spot_ids)
        self.spot_ids, self.centers, self.corners, self.sizes = spot_ids, centers, corners, sizes
        self.patch_size_level0 = int(patch_size_level0)
        self.attrs = attrs
        self.provenance = provenance or {}
        self._written = np.zeros(self.n, bool)
        # Per-spot metadata is small: kept here and stored once, when the bundle is complete.
        self._padded = np.zeros((self.n, len(sizes)), bool)
        self._tissue = np.zeros(self.n, np.float32)
        self._digest = np.zeros(self.n, np.uint64)

    def __enter__(self) -> BundleWriter:
        tmp = self._ctx.__enter__()
        self.h5 = h5py.File(tmp, "w")
        f = self.h5
        self.views = [f.create_dataset(f"view_{v}", (self.n, s, s, 3), np.uint8, chunks=(1, s, s, 3))
                      for v, s in enumerate(self.sizes)]
        self._chunk_shapes = [ds.shape[1:] for ds in self.views]
        f["img"] = self.views[0]
        f.create_dataset("barcode", data=np.array(self.spot_ids, dtype=object), dtype=h5py.string_dtype())
        coords = f.create_dataset("coords", data=np.asarray(self.corners, np.int64))
        coords.attrs.update({"patch_size_level0": self.patch_size_level0, "patch_size": int(self.sizes[0]),
                             "patch_level": 0})
        f.create_dataset("centers", data=np.asarray(self.centers, np.int64))
        self.padded = f.create_dataset("padded", (self.n, len(self.sizes)), bool)
        self.tissue = f.create_dataset("tissue_fraction", (self.n,), np.float32)
        self.digest = f.create_dataset("spot_digest", (self.n,), np.uint64)
        for key, value in self.attrs.items():
            f.attrs[key] = value
        f.attrs["n_views"] = len(self.sizes)
        f.attrs["n_spots"] = self.n
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["digest_algorithm"] = DIGEST_ALGORITHM
        f.attrs["provenance"] = json.dumps(self.provenance, sort_keys=True)
        return self

    def write(self, idx, arrays: list[np.ndarray], padded: np.ndarray, tissue: np.ndarray,
              digests: np.ndarray | None = None) -> None:
        """Store the views of the spots ``idx`` (any order); ``digests`` are computed when not given."""
        idx = np.asarray(idx, np.int64)
        for k, i in enumerate(idx.tolist()):
            views = [a[k] for a in arrays]
            for ds, shape, view in zip(self.views, self._chunk_shapes, views):
                if view.dtype == np.uint8 and view.shape == shape and view.flags.c_contiguous:
                    # One spot is one uncompressed chunk: hand HDF5 the bytes, no selection machinery.
                    ds.id.write_direct_chunk((i, 0, 0, 0), view)
                else:
                    ds[i] = view
            self._digest[i] = spot_digest(views) if digests is None else digests[k]
        self._padded[idx] = padded
        self._tissue[idx] = tissue
        self._written[idx] = True

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.padded[...] = self._padded
                self.tissue[...] = self._tissue
                self.digest[...] = self._digest
        finally:
            self.h5.close()
        if exc_type is None and not self._written.all():
            err = RuntimeError(f"bundle {self.path}: {int((~self._written).sum())} spots were never written")
            self._ctx.__exit__(RuntimeError, err, None)  # removes the temporary file
            raise err
        return self._ctx.__exit__(exc_type, exc, tb)


def read_meta(path, sample: str | None = None) -> dict:
    """Attributes and shapes of a bundle, checked for internal consistency (cheap)."""
    if not os.path.isfile(path):
        raise InputError("bundle not found (run the tiling stage)", file=path, sample=sample)
    try:
        with h5py.File(path, "r") as f:
            meta = dict(f.attrs)
            n_views = int(meta.get("n_views", -1))
            n = int(meta.get("n_spots", -1))
            problems = []
            keys = ["barcode", "coords", "padded", "tissue_fraction", "spot_digest"]
            if format_version(f) >= FIRST_FORMAT_WITH_CENTERS:
                keys.append("centers")
            for key in keys:
                if key not in f:
                    problems.append(f"dataset {key} missing")
                elif f[key].shape[0] != n:
                    problems.append(f"{key} has {f[key].shape[0]} rows, expected {n}")
            shapes = []
            for v in range(n_views):
                name = f"view_{v}"
                if name not in f:
                    problems.append(f"{name} missing")
                    continue
                shape = f[name].shape
                shapes.append(shape)
                if shape[0] != n:
                    problems.append(f"{name} has {shape[0]} spots, expected {n} (views disagree)")
            if n_views < 1:
                problems.append("no views")
            if problems:
                raise InputError(f"corrupt bundle ({'; '.join(problems)}); delete it and rerun tiling",
                                 file=path, sample=sample)
            meta["view_shapes"] = shapes
            meta["spot_ids"] = [s.decode() if isinstance(s, bytes) else str(s) for s in f["barcode"][:]]
            return meta
    except (OSError, KeyError) as err:
        raise InputError(f"unreadable bundle ({err}); delete it and rerun tiling", file=path, sample=sample) from None


def verify_bundle(path, sample: str | None = None) -> dict:
    """Full check: shapes, then every spot's views against its stored digest."""
    meta = read_meta(path, sample)
    try:
        with h5py.File(path, "r") as f:
            digests = f["spot_digest"][:]
            algorithm = digest_algorithm(f, path, sample)
            views = [f[f"view_{v}"] for v in range(int(meta["n_views"]))]
            step = 64
            for start in range(0, int(meta["n_spots"]), step):
                blocks = [ds[start:start + step] for ds in views]
                for k in range(blocks[0].shape[0]):
                    if spot_digest([b[k] for b in blocks], algorithm) != int(digests[start + k]):
                        raise InputError(f"spot {start + k} ({meta['spot_ids'][start + k]}) does not match its "
                                         "stored digest: the bundle was modified or damaged; delete it and rerun "
                                         "tiling", file=path, sample=sample)
    except OSError as err:
        raise InputError(f"unreadable bundle ({err}); delete it and rerun tiling", file=path, sample=sample) from None
    return meta
