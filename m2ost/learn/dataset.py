"""Spots as training examples: multi-view images from the bundle, targets from the expression.

Images stay uint8 until they reach the device (a quarter of the bytes to copy); the conversion
to float, the colour jitter and the ImageNet normalisation run there, in :func:`prepare_batch`.

Randomness: the augmentation of item ``i`` in epoch ``e`` is drawn from a generator seeded with
``(seed, e, i)`` only. It is therefore identical whatever ran before, however many DataLoader
workers there are and whichever rank of a distributed run reads the item; a resumed run sees
exactly the augmentations of an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from m2ost.errors import InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATION = {"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

_JITTER_DEFAULT = 0.1  # "mild": factors drawn in [0.9, 1.1]


# --------------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------------

@dataclass
class SampleData:
    """The spots of one sample that a dataset may use, in bundle-row order.

    ``targets`` is None for a sample without expression (prediction only).
    """

    sample: str
    bundle: str
    rows: np.ndarray        # (n,) int64 rows into the bundle datasets
    spot_ids: np.ndarray    # (n,) str
    coords: np.ndarray      # (n, 2) float64 spot centres (x, y), level-0 px
    padded: np.ndarray      # (n, n_selected_views) bool
    targets: np.ndarray | None  # (n, n_genes) float32
    info: dict              # bundle attributes: n_views, size_px, fov_um, mpp

    def __len__(self) -> int:
        return len(self.rows)


def _decode(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values],
                    dtype=object)


def read_bundle_info(bundle: str | os.PathLike, sample: str | None = None) -> dict:
    """The attributes of a spot bundle that matter to a model: views, sizes, fields of view.

    The bundle's datasets are first checked for consistency (:func:`m2ost.data.bundle.read_meta`:
    every view and per-spot dataset present, with one row per spot), so a truncated or edited
    bundle is refused here, naming the file to regenerate.
    """
    from m2ost.data.bundle import read_meta

    read_meta(bundle, sample)
    try:
        with h5py.File(bundle, "r") as f:
            a = f.attrs
            n_views = int(a["n_views"])
            info = {
                "n_views": n_views,
                "n_spots": int(f["barcode"].shape[0]),
                "size_px": [int(v) for v in np.atleast_1d(a["size_px"])],
                "fov_um": [float(v) for v in np.atleast_1d(a["fov_um"])],
                "mpp": float(a["mpp"]) if "mpp" in a else float("nan"),
                "sample": str(a.get("sample", sample or "")),
            }
            missing = [f"view_{v}" for v in range(n_views) if f"view_{v}" not in f]
    except FileNotFoundError:
        raise InputError("spot bundle not found", file=bundle, sample=sample) from None
    except (OSError, KeyError) as err:
        raise InputError(f"not a readable spot bundle ({err})", file=bundle,
                         sample=sample) from None
    if missing:
        raise InputError(f"bundle lacks datasets {', '.join(missing)}", file=bundle,
                         sample=sample)
    return info


def check_views(views: Sequence[int] | None, info: dict, bundle, sample) -> list[int]:
    """Resolve ``views`` (None = all) against a bundle; all selected views must share one
    square size, since the network takes one (V, 3, S, S) tensor."""
    n = info["n_views"]
    views = list(range(n)) if views is None else [int(v) for v in views]
    if not views:
        raise InputError("no views selected", file=bundle, sample=sample)
    bad = [v for v in views if not 0 <= v < n]
    if bad:
        raise InputError(f"views {bad} requested but the bundle has {n} views", file=bundle,
                         sample=sample)
    sizes = {info["size_px"][v] for v in views}
    if len(sizes) != 1:
        raise InputError(f"selected views {views} have different sizes {sorted(sizes)} px; "
                         "the network needs one size", file=bundle, sample=sample)
    return views


def verify_rows(bundle: str | os.PathLike, rows: np.ndarray, sample: str | None = None,
                block: int = 64) -> None:
    """Check the views of the bundle rows ``rows`` against their stored per-spot digests.

    Reads every view of those rows once (one pass, ``block`` rows at a time). Raises InputError
    naming the bundle, the first spot that differs, and what to do (rerun tiling).
    """
    from m2ost.data.bundle import digest_algorithm, spot_digest

    rows = np.unique(np.asarray(rows, dtype=np.int64))
    try:
        with h5py.File(bundle, "r") as f:
            n_views = int(f.attrs["n_views"])
            stored = np.asarray(f["spot_digest"][:], dtype=np.uint64)
            algorithm = digest_algorithm(f, bundle, sample)
            views = [f[f"view_{v}"] for v in range(n_views)]
            barcodes = f["barcode"]
            for start in range(0, len(rows), block):
                part = rows[start:start + block]
                lo, hi = int(part[0]), int(part[-1]) + 1
                if hi - lo <= 4 * len(part):  # dense: one slab per view, then pick the rows
                    blocks = [ds[lo:hi][part - lo] for ds in views]
                else:  # sparse: row by row (one chunk each; h5py's list indexing is far slower)
                    blocks = [np.stack([ds[r] for r in part.tolist()]) for ds in views]
                for k, r in enumerate(part.tolist()):
                    if spot_digest([b[k] for b in blocks], algorithm) != int(stored[r]):
                        spot = barcodes[r]
                        spot = spot.decode() if isinstance(spot, bytes) else str(spot)
                        raise InputError(f"spot {r} ({spot}) does not match its stored digest: the bundle was "
                                         "modified or damaged after tiling; delete it and rerun the tiling stage",
                                         file=bundle, sample=sample)
    except (OSError, KeyError) as err:
        raise InputError(f"unreadable spot bundle ({err}); delete it and rerun the tiling stage",
                         file=bundle, sample=sample) from None


def load_sample(bundle: str | os.PathLike, expression: str | os.PathLike | None = None,
                genes: Sequence[str] | None = None, views: Sequence[int] | None = None,
                drop_padded: bool = False, sample: str | None = None,
                verify: bool = True) -> SampleData:
    """Read the spot table of one sample and, if given, its targets on the gene panel.

    Parameters
    ----------
    bundle
        ``results/bundles/{sample}.h5``.
    expression
        ``results/expression/{sample}.h5ad``; None for an H&E-only slide (all bundle rows,
        no targets).
    genes
        The gene panel (required with ``expression``).
    views
        Views to use (None = all).
    drop_padded
        Drop spots where any selected view reached outside the slide.
    verify
        Check the views of the rows used against their stored digests (:func:`verify_rows`:
        one extra read of those rows), so that a bundle edited or damaged after tiling is
        refused before a model sees it. The shapes are always checked.

    Raises
    ------
    InputError
        Bundle and expression disagree (spot ids of the bundle rows differ from the obs index),
        panel genes missing from the expression, non-finite targets, bad views, a bundle or
        expression file damaged or edited after it was written.
    """
    info = read_bundle_info(bundle, sample)
    views = check_views(views, info, bundle, sample)
    with h5py.File(bundle, "r") as f:
        barcodes = _decode(f["barcode"][:])
        coords_all = np.asarray(f["coords"][:], dtype=np.float64)
        padded_all = (np.asarray(f["padded"][:], dtype=bool) if "padded" in f
                      else np.zeros((len(barcodes), info["n_views"]), dtype=bool))
    if padded_all.ndim == 1:
        padded_all = padded_all[:, None].repeat(info["n_views"], axis=1)

    targets = None
    if expression is None:
        rows = np.arange(len(barcodes), dtype=np.int64)
    else:
        if genes is None:
            raise InputError("a gene panel is needed to read targets", file=expression,
                             sample=sample)
        rows, targets = _read_targets(expression, genes, barcodes, sample)

    spot_ids = barcodes[rows]
    coords = coords_all[rows]
    padded = padded_all[rows][:, views]
    if drop_padded:
        keep = ~padded.any(axis=1)
        if not keep.all():
            log.warning("sample %s: dropped %d of %d spots whose views %s reach outside the "
                        "slide (drop_padded)", sample or info["sample"], int((~keep).sum()),
                        len(keep), views)
        rows, spot_ids, coords, padded = rows[keep], spot_ids[keep], coords[keep], padded[keep]
        if targets is not None:
            targets = targets[keep]
    if verify:
        verify_rows(bundle, rows, sample or info["sample"])
    return SampleData(sample=sample or info["sample"], bundle=str(bundle), rows=rows,
                      spot_ids=spot_ids, coords=coords, padded=padded, targets=targets,
                      info=info)


def _read_targets(expression, genes, barcodes, sample) -> tuple[np.ndarray, np.ndarray]:
    from m2ost.data.expression import read_expression  # anndata is heavy; import only when needed

    adata = read_expression(expression, sample)
    rows = np.asarray(adata.obs["bundle_row"], dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(barcodes)):
        raise InputError(f"bundle_row values outside the bundle's {len(barcodes)} rows",
                         file=expression, sample=sample)
    if np.any(np.diff(rows) <= 0):
        raise InputError("bundle_row is not strictly increasing", file=expression, sample=sample)
    obs_ids = np.asarray(adata.obs_names, dtype=object)
    mismatch = np.flatnonzero(barcodes[rows] != obs_ids)
    if mismatch.size:
        i = mismatch[0]
        raise InputError(f"bundle and expression disagree: {mismatch.size} spot ids differ "
                         f"(first: obs '{obs_ids[i]}' vs bundle row {rows[i]} "
                         f"'{barcodes[rows[i]]}')", file=expression, sample=sample)
    index = adata.var_names.get_indexer(list(genes))
    missing = [g for g, j in zip(genes, index) if j < 0]
    if missing:
        raise InputError(f"{len(missing)} of {len(genes)} panel genes missing from the "
                         f"expression (e.g. {', '.join(missing[:5])})", file=expression,
                         sample=sample)
    x = adata.X[:, index]
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError("expression holds NaN or infinite values on the panel genes",
                         file=expression, sample=sample)
    return rows, x


def load_samples(bundles: Mapping[str, str], expressions: Mapping[str, str],
                 genes: Sequence[str], samples: Sequence[str],
                 views: Sequence[int] | None = None,
                 drop_padded: bool = False, verify: bool = True) -> list[SampleData]:
    """:func:`load_sample` for several samples, checking that their views agree.

    All samples must have the same selected view sizes and fields of view (within 1 %), so that
    one network sees the same physical scales everywhere.
    """
    out = []
    for s in samples:
        if s not in bundles:
            raise InputError("no spot bundle given", sample=s)
        if s not in expressions:
            raise InputError("no expression file given (samples used for training or "
                             "scoring need expression)", sample=s)
        out.append(load_sample(bundles[s], expressions[s], genes, views, drop_padded, sample=s,
                               verify=verify))
    if out:
        ref = out[0]
        vs = check_views(views, ref.info, ref.bundle, ref.sample)
        for d in out[1:]:
            check_same_views(ref.info, d.info, vs, d.bundle, d.sample, ref.sample)
    return out


def check_same_views(ref: dict, info: dict, views: Sequence[int], file, sample,
                     ref_name: str) -> None:
    """Refuse a bundle whose selected views differ in size or field of view from ``ref``."""
    if info["n_views"] <= max(views):
        raise InputError(f"bundle has {info['n_views']} views, {ref_name} has {ref['n_views']}",
                         file=file, sample=sample)
    for v in views:
        if info["size_px"][v] != ref["size_px"][v]:
            raise InputError(f"view {v} is {info['size_px'][v]} px, {ref_name} has "
                             f"{ref['size_px'][v]} px", file=file, sample=sample)
        a, b = info["fov_um"][v], ref["fov_um"][v]
        if abs(a - b) > 0.01 * max(abs(b), 1e-9):
            raise InputError(f"view {v} covers {a} um, {ref_name} covers {b} um; tile all "
                             "samples with the same fields of view", file=file, sample=sample)


# --------------------------------------------------------------------------------------------
# Augmentation settings
# --------------------------------------------------------------------------------------------

def augment_settings(cfg: Mapping | bool | None) -> dict:
    """Normalise the ``augment`` config to flip, rot90, brightness, contrast, saturation.

    ``cfg`` may be None/False (off), True (flips, rotations, mild jitter) or a mapping with
    ``flip`` (bool), ``rot90`` (bool) and ``color_jitter`` (bool, a float applied to all three,
    or a mapping with brightness/contrast/saturation). A jitter strength ``s`` draws a factor
    uniformly in [1 - s, 1 + s].
    """
    if not cfg:
        return {"flip": False, "rot90": False, "brightness": 0.0, "contrast": 0.0,
                "saturation": 0.0}
    if cfg is True:
        cfg = {"flip": True, "rot90": True, "color_jitter": True}
    jitter = cfg.get("color_jitter", False)
    if jitter is True:
        jitter = _JITTER_DEFAULT
    if not isinstance(jitter, Mapping):
        jitter = {k: float(jitter or 0.0) for k in ("brightness", "contrast", "saturation")}
    out = {"flip": bool(cfg.get("flip", False)), "rot90": bool(cfg.get("rot90", False))}
    for k in ("brightness", "contrast", "saturation"):
        s = float(jitter.get(k, 0.0))
        if not 0.0 <= s < 1.0:
            raise InputError(f"color_jitter {k} must be in [0, 1), got {s}")
        out[k] = s
    return out


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

class SpotDataset(Dataset):
    """Items ``(images, target, aug)`` over the spots of several samples.

    ``images`` is the uint8 tensor (V, H, W, 3) of the selected views of one spot, as stored;
    ``target`` the float32 expression on the panel (an empty tensor for samples without
    targets); ``aug`` the float32 (6,) augmentation drawn for this spot: rot90 count, h-flip,
    v-flip, brightness, contrast, saturation (0, 0, 0, 1, 1, 1 without augmentation).
    :func:`prepare_batch` applies it on the device, the same flip/rotation to every view of the
    spot. Flipping 3-byte pixels on the host costs about 4 ms per spot (docs/performance.md), on
    the device next to nothing, and the loader then only copies bytes.

    Parameters
    ----------
    data
        From :func:`load_samples` / :func:`load_sample`.
    views
        Views to read (None = all); must match those used to load ``data``.
    index
        (n, 2) int array of (sample number in ``data``, position in that sample), selecting the
        spots of this dataset (None = all spots of all samples).
    augment
        See :func:`augment_settings`; None = no augmentation.
    seed
        Augmentations depend on (seed, epoch, item) only; see :meth:`set_epoch`.
    """

    def __init__(self, data: Sequence[SampleData], views: Sequence[int] | None = None,
                 index: np.ndarray | None = None, augment: Mapping | bool | None = None,
                 seed: int = 0):
        self.data = list(data)
        if not self.data:
            raise InputError("a dataset needs at least one sample")
        self.views = check_views(views, self.data[0].info, self.data[0].bundle,
                                 self.data[0].sample)
        if index is None:
            index = np.concatenate([np.stack([np.full(len(d), k), np.arange(len(d))], 1)
                                    for k, d in enumerate(self.data)]).astype(np.int64)
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 2)
        self.augment = augment_settings(augment)
        self.seed = int(seed)
        self.epoch = 0
        self._handles: dict[int, h5py.File] = {}
        self._pid: int | None = None
        self._inherited: list = []
        self._view_sets: dict[tuple, list] = {}  # (pid, sample number) -> view readers
        self._fds: dict[int, int] = {}  # sample number -> raw file descriptor (this process)

    # -- bookkeeping ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (call before iterating each epoch)."""
        self.epoch = int(epoch)

    @property
    def image_size(self) -> int:
        return self.data[0].info["size_px"][self.views[0]]

    @property
    def n_genes(self) -> int:
        t = self.data[0].targets
        return 0 if t is None else t.shape[1]

    def targets(self) -> np.ndarray:
        """(n, n_genes) targets of all items, in item order."""
        return np.stack([self.data[k].targets[p] for k, p in self.index]) if len(self) else \
            np.zeros((0, self.n_genes), np.float32)

    def spots(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample names, spot ids, coords) of all items, in item order."""
        names = np.array([self.data[k].sample for k, _ in self.index], dtype=object)
        ids = np.array([self.data[k].spot_ids[p] for k, p in self.index], dtype=object)
        xy = np.array([self.data[k].coords[p] for k, p in self.index]).reshape(-1, 2)
        return names, ids, xy

    # -- HDF5 handles: one set per process ---------------------------------------------------
    def _file(self, k: int) -> h5py.File:
        pid = os.getpid()
        if self._pid != pid:
            # A forked DataLoader worker inherits the parent's handles; HDF5 handles must not be
            # shared across processes, so open new ones (and leave the inherited ones alone).
            self._inherited.append(self._handles)
            self._handles, self._pid, self._fds = {}, pid, {}
        f = self._handles.get(k)
        if f is None:
            f = self._handles[k] = h5py.File(self.data[k].bundle, "r")
        return f

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"], state["_inherited"] = {}, None, []
        state["_view_sets"], state["_fds"] = {}, {}
        return state

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._handles.values():
                f.close()
            for fd in self._fds.values():
                os.close(fd)
        self._handles, self._view_sets, self._fds = {}, {}, {}

    # -- items -------------------------------------------------------------------------------
    def read(self, i: int) -> np.ndarray:
        """The raw uint8 views (V, H, W, 3) of item ``i``, without augmentation."""
        k, p = self.index[i]
        f = self._file(k)
        row = int(self.data[k].rows[p])
        return np.stack([f[f"view_{v}"][row] for v in self.views])

    def _item(self, index) -> tuple[int, int]:
        """``(epoch, item)`` of a sampler index: an item number (the epoch set by
        :meth:`set_epoch`) or an ``(epoch, item)`` pair from :class:`EpochSampler`."""
        if isinstance(index, (tuple, list)):
            return int(index[0]), int(index[1])
        return self.epoch, int(index)

    def draw(self, i: int, epoch: int | None = None) -> tuple[int, bool, bool, np.ndarray]:
        """The augmentation of item ``i`` in ``epoch`` (default: the current one): rot90 count,
        h-flip, v-flip, jitter."""
        a = self.augment
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, int(i)])
        # Always draw every number, so switching one option does not change the others.
        k, hflip, vflip = (int(v) for v in rng.integers(0, 4, 3))
        u = rng.uniform(-1.0, 1.0, 3)
        k = k if a["rot90"] else 0
        hflip = a["flip"] and hflip % 2 == 1
        # Rotations plus one flip already give all 8 symmetries; a v-flip only when no rot90.
        vflip = a["flip"] and not a["rot90"] and vflip % 2 == 1
        jitter = 1.0 + u * np.array([a["brightness"], a["contrast"], a["saturation"]])
        return k, hflip, vflip, jitter.astype(np.float32)

    def _views_of(self, k: int) -> list:
        """Readers of the selected views of sample ``k`` (cached per process): the byte offset
        of every row's chunk where the view is stored as one uncompressed chunk per spot (as
        the tiler writes it), so a row is one ``pread`` into the batch buffer; else the h5py
        dataset."""
        cached = self._view_sets.get((os.getpid(), k))
        if cached is None:
            f = self._file(k)
            cached = []
            for v in self.views:
                ds = f[f"view_{v}"]
                cached.append(_chunk_offsets(ds) if _one_raw_chunk_per_row(ds) else ds)
            if any(isinstance(r, np.ndarray) for r in cached):
                self._fds[k] = os.open(self.data[k].bundle, os.O_RDONLY)
            self._view_sets[(os.getpid(), k)] = cached
        return cached

    def __getitems__(self, indices: Sequence) -> "Batch":
        """A whole batch at once: ``(images (B, V, H, W, 3), targets (B, G), aug (B, 6))``.

        Equal to collating :meth:`__getitem__` item by item, but many times faster: the views
        are read straight into one preallocated batch buffer (in shared memory inside a
        DataLoader worker, so nothing is copied again on the way to the main process), sample
        by sample in file order.
        """
        pairs = [self._item(i) for i in indices]
        idx = np.array([i for _, i in pairs], dtype=np.int64)
        n, size = len(idx), self.image_size
        images = _batch_buffer((n, len(self.views), size, size, 3))
        out = images.numpy()
        ks, ps = self.index[idx, 0], self.index[idx, 1]
        targets = np.zeros((n, self.n_genes), np.float32)
        for k in np.unique(ks):
            positions = np.flatnonzero(ks == k)
            rows = self.data[k].rows[ps[positions]]
            order = np.argsort(rows, kind="stable")
            readers = self._views_of(int(k))
            fd = self._fds.get(int(k))
            for j, row in zip(positions[order].tolist(), rows[order].tolist()):
                for vi, reader in enumerate(readers):
                    if isinstance(reader, np.ndarray):  # raw chunk: straight into the buffer
                        dest = out[j, vi]
                        if os.preadv(fd, [dest], int(reader[row])) != dest.nbytes:
                            raise InputError(f"short read of spot row {row}: the bundle is "
                                             "truncated; delete it and rerun the tiling stage",
                                             file=self.data[k].bundle, sample=self.data[k].sample)
                    else:
                        reader.read_direct(out, np.s_[row], np.s_[j, vi])
            t = self.data[k].targets
            if t is not None:
                targets[positions] = t[ps[positions]]
        aug = (np.stack([self.aug_vector(i, e) for e, i in pairs]) if n
               else np.zeros((0, 6), np.float32))
        return Batch((images, torch.from_numpy(targets), torch.from_numpy(aug)))

    def aug_vector(self, i: int, epoch: int | None = None) -> np.ndarray:
        """The float32 (6,) augmentation of item ``i`` in ``epoch`` (see the class docstring)."""
        a = self.augment
        if not (a["flip"] or a["rot90"] or a["brightness"] or a["contrast"] or a["saturation"]):
            return np.array([0, 0, 0, 1, 1, 1], np.float32)
        k, hflip, vflip, jitter = self.draw(i, epoch)
        return np.concatenate([[k, hflip, vflip], jitter]).astype(np.float32)

    def __getitem__(self, index):
        epoch, i = self._item(index)
        kk, p = self.index[i]
        t = self.data[kk].targets
        target = (torch.from_numpy(t[p].copy()) if t is not None
                  else torch.zeros(0, dtype=torch.float32))
        return (torch.from_numpy(self.read(i)), target,
                torch.from_numpy(self.aug_vector(i, epoch)))


def _one_raw_chunk_per_row(ds: h5py.Dataset) -> bool:
    """True where each row of ``ds`` is one unfiltered (uncompressed) chunk."""
    return (ds.chunks == (1, *ds.shape[1:]) and ds.compression is None
            and ds.id.get_create_plist().get_nfilters() == 0 and ds.dtype == np.uint8)


def _chunk_offsets(ds: h5py.Dataset) -> np.ndarray | h5py.Dataset:
    """The file offset of every row's chunk, or ``ds`` itself if a chunk was never written."""
    offsets = np.empty(ds.shape[0], np.int64)
    zeros = (0,) * (ds.ndim - 1)
    for row in range(ds.shape[0]):
        info = ds.id.get_chunk_info_by_coord((row, *zeros))
        if info.byte_offset is None or info.size != ds.dtype.itemsize * np.prod(ds.shape[1:]):
            return ds
        offsets[row] = info.byte_offset
    return offsets


class Batch(tuple):
    """A batch already collated by :meth:`SpotDataset.__getitems__` (see :func:`collate`)."""


def collate(items):
    """The DataLoader's collate: a :class:`Batch` passes through, a list of items is stacked."""
    if isinstance(items, Batch):
        return tuple(items)
    return default_collate(items)


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in shared memory when called in a DataLoader worker, as
    torch's own collate does, so that sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    numel = int(np.prod(shape))
    elem = torch.empty(0, dtype=torch.uint8)
    storage = elem._typed_storage()._new_shared(numel, device=elem.device)
    return elem.new(storage).resize_(shape)


# --------------------------------------------------------------------------------------------
# On the device
# --------------------------------------------------------------------------------------------

def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (torchvision semantics) with per-spot factors.

    x: float (B, V, 3, H, W) in [0, 1]; factors: (B, 3). All views of a spot share the factors
    (one staining per spot); contrast pivots on each view's own mean grey level.
    """
    f = factors.to(x.device, x.dtype).view(-1, 3, 1, 1, 1, 1).unbind(1)
    b, c, s = f
    x = (x * b).clamp_(0, 1)
    m = _grey(x).mean(dim=(-3, -2, -1), keepdim=True)
    x = (c * x + (1 - c) * m).clamp_(0, 1)
    x = (s * x + (1 - s) * _grey(x)).clamp_(0, 1)
    return x


def apply_geometry(x: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """Rotate and flip each spot of ``x`` (B, V, C, H, W) in place by its ``aug`` (B, >=3, on the
    host) rot90 count, h-flip, v-flip, in that order (``np.rot90`` over (H, W), then W
    reversed, then H reversed); every view of a spot gets the same transform. At most 16
    distinct transforms: one vectorised op each."""
    codes = aug[:, :3].round().long()
    for code in torch.unique(codes, dim=0).tolist():
        k, hflip, vflip = code
        if not (k % 4 or hflip or vflip):
            continue
        sel = torch.nonzero((codes == torch.tensor(code)).all(dim=1)).flatten().to(x.device)
        y = x.index_select(0, sel)  # a copy, so writing back into x is safe
        if k % 4:
            y = torch.rot90(y, k % 4, dims=(-2, -1))
        if hflip:
            y = y.flip(-1)
        if vflip:
            y = y.flip(-2)
        x.index_copy_(0, sel, y)
    return x


def prepare_batch(images: torch.Tensor, device: torch.device,
                  aug: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, V, H, W, 3) on the host -> normalised float32 (B, V, 3, H, W) on ``device``.

    ``aug``: per-spot augmentation from :class:`SpotDataset`, (B, 6) = rot90 count, h-flip,
    v-flip, brightness, contrast, saturation; or (B, 3) colour factors only; None = none.
    The transforms to group by are read from ``aug`` where the loader left it (the host), so
    the device is never waited on for them.
    """
    x = images.to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float().div_(255.0)
    if aug is not None:
        if aug.shape[-1] == 6:
            x = apply_geometry(x, aug)
            aug = aug[:, 3:]
        if not bool(torch.all(aug == 1)):
            x = color_jitter(x, aug.to(device, non_blocking=True))
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)
    return (x - mean) / std


class EpochSampler(Sampler):
    """Yields ``(epoch, item)`` pairs: the items of ``sampler`` with the dataset's epoch, read in
    the main process when an epoch's iteration starts. The workers then need no copy of the
    current epoch, so they can stay alive across epochs (starting them anew each epoch cost a
    third of the loader's throughput on small cohorts) and still draw each epoch's own
    augmentations."""

    def __init__(self, sampler, dataset: SpotDataset):
        self.sampler, self.dataset = sampler, dataset

    def __iter__(self):
        epoch = self.dataset.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def make_loader(dataset: Dataset, batch_size: int, workers: int = 0, pin: bool = False,
                sampler: Sampler | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader with the settings used everywhere (order given by ``sampler`` or fixed).

    For a :class:`SpotDataset` the workers persist across epochs: the sampler hands them the
    epoch with every item (:class:`EpochSampler`), as :meth:`SpotDataset.set_epoch` in the
    main process says it.
    """
    spots = isinstance(dataset, SpotDataset)
    if spots:
        sampler = EpochSampler(sampler if sampler is not None else range(len(dataset)), dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=int(workers), pin_memory=pin, drop_last=drop_last,
                      collate_fn=collate, persistent_workers=spots and int(workers) > 0,
                      prefetch_factor=4 if workers else None)
