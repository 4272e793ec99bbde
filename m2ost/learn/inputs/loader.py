"""Spots as training examples: batches of multi-view images from the bundle, with targets.

Randomness: the augmentation of item ``i`` in epoch ``e`` is drawn from a generator seeded with
``(seed, e, i)`` only. It is therefore identical whatever ran before, however many DataLoader
workers there are and whichever rank of a distributed run reads the item; a resumed run sees
exactly the augmentations of an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from m2ost.errors import InputError
from m2ost.learn.inputs.augment import AUG_LENGTH, NO_AUGMENTATION, augment_settings, is_active
from m2ost.learn.inputs.dataset import SampleData, check_views, depths_of


class SpotDataset(Dataset):
    """Items ``(images, target, aug)`` over the spots of several samples.

    ``images`` is the uint8 tensor (V, H, W, 3) of the selected views of one spot, as stored;
    ``target`` the float32 expression on the panel (an empty tensor for samples without
    targets); ``aug`` the float32 (12,) augmentation drawn for this spot: rot90 count, h-flip,
    v-flip, brightness, contrast, saturation, HED alpha x 3, HED beta x 3
    (:data:`~m2ost.learn.inputs.augment.NO_AUGMENTATION` without augmentation).
    :func:`~m2ost.learn.inputs.augment.prepare_batch` applies it on the device, the same flip/rotation
    to every view of the spot. Flipping 3-byte pixels on the host costs about 4 ms per spot (docs/performance.md), on
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
        See :func:`~m2ost.learn.inputs.augment.augment_settings`; None = no augmentation.
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

    def depths(self) -> tuple[np.ndarray, float] | None:
        """(library sizes, target sum) of all items, in item order, where recorded
        (:func:`~m2ost.learn.inputs.dataset.depths_of`)."""
        return depths_of([self.data[k] for k in self.index[:, 0]], [[p] for p in self.index[:, 1]])

    def spots(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample names, spot ids, spot centres) of all items, in item order."""
        names = np.array([self.data[k].sample for k, _ in self.index], dtype=object)
        ids = np.array([self.data[k].spot_ids[p] for k, p in self.index], dtype=object)
        xy = np.array([self.data[k].centers[p] for k, p in self.index]).reshape(-1, 2)
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
        h-flip, v-flip, and the 9 stain/colour numbers (brightness, contrast, saturation
        factors, HED alpha, HED beta)."""
        a = self.augment
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, int(i)])
        # Always draw every number, so switching one option does not change the others.
        k, hflip, vflip = (int(v) for v in rng.integers(0, 4, 3))
        u = rng.uniform(-1.0, 1.0, 3)
        # Drawn after the others, so adding stain jitter left the earlier draws as they were.
        h = rng.uniform(-1.0, 1.0, 6)
        k = k if a["rot90"] else 0
        hflip = a["flip"] and hflip % 2 == 1
        # Rotations plus one flip already give all 8 symmetries; a v-flip only when no rot90.
        vflip = a["flip"] and not a["rot90"] and vflip % 2 == 1
        jitter = 1.0 + u * np.array([a["brightness"], a["contrast"], a["saturation"]])
        alpha, beta = 1.0 + h[:3] * a["hed"], h[3:] * a["hed"]
        return k, hflip, vflip, np.concatenate([jitter, alpha, beta]).astype(np.float32)

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

    def __getitems__(self, indices: Sequence) -> Batch:
        """A whole batch at once: ``(images (B, V, H, W, 3), targets (B, G), aug (B, 12))``.

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
               else np.zeros((0, AUG_LENGTH), np.float32))
        return Batch((images, torch.from_numpy(targets), torch.from_numpy(aug)))

    def aug_vector(self, i: int, epoch: int | None = None) -> np.ndarray:
        """The float32 (12,) augmentation of item ``i`` in ``epoch`` (see the class docstring)."""
        if not is_active(self.augment):
            return np.array(NO_AUGMENTATION, np.float32)
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
