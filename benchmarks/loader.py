"""Spots per second delivered by the training DataLoader, from bundles on local disk.

Reads every bundle given (3 views of 224 px by default), augmentations on (flips, 90-degree
rotations, colour-jitter factors drawn per spot), shuffled as in training, for 0, 1 and 2
worker processes. Prints one line per setting and the ratio to the target (2,000 spots/s).

    python benchmarks/loader.py results/bundles/B4.h5 results/bundles/C2.h5 --batch 64

``--layouts`` also rewrites the first bundle with other HDF5 layouts (gzip, lzf, one contiguous
block) and reports the in-process rate and file size of each: the evidence for the bundle's
layout (uncompressed, one chunk per spot and view).

Each setting first reads the files once (untimed) so the page cache is warm for all of them;
the figure is then the steady rate of a GPU-bound training loop that never waits on disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import h5py
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2ost.learn.inputs.dataset import load_sample  # noqa: E402
from m2ost.learn.inputs.loader import SpotDataset, make_loader  # noqa: E402

TARGET = 2000.0


def measure(data, workers: int, batch: int, seconds: float, pin: bool) -> float:
    dataset = SpotDataset(data, augment=True, seed=0)
    loader = make_loader(dataset, batch, workers=workers, pin=pin,
                         sampler=torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    n, start, epoch = 0, None, 0
    while True:
        dataset.set_epoch(epoch)
        for images, _target, _jitter in loader:
            if start is None:  # skip worker start-up
                start = time.perf_counter()
                continue
            n += images.shape[0]
            if time.perf_counter() - start > seconds:
                return n / (time.perf_counter() - start)
        epoch += 1


LAYOUTS = {
    "uncompressed, 1 spot per chunk (the tiler's)": {"chunks": True},
    "gzip level 1, 1 spot per chunk": {"chunks": True, "compression": "gzip", "compression_opts": 1},
    "lzf, 1 spot per chunk": {"chunks": True, "compression": "lzf"},
    "contiguous (no chunks)": {"chunks": None},
}


def compare_layouts(bundle: str, batch: int, seconds: float) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, opts in LAYOUTS.items():
            path = os.path.join(tmp, "layout.h5")
            with h5py.File(bundle, "r") as src, h5py.File(path, "w") as dst:
                dst.attrs.update(src.attrs)
                for key in src:
                    if not key.startswith("view_"):
                        if key != "img":  # the hard link to view_0 (HEST layout) is left out
                            src.copy(key, dst)
                        continue
                    data = src[key][:]
                    kw = dict(opts)
                    if kw.pop("chunks") is True:
                        kw["chunks"] = (1, *data.shape[1:])
                    dst.create_dataset(key, data=data, **kw)
            data = [load_sample(path, None, None, None, verify=False)]
            rate = measure(data, 0, batch, seconds, pin=False)
            print(f"layout {name}: {rate:8.0f} spots/s in-process, "
                  f"{os.path.getsize(path) / 2 ** 20:.0f} MiB", flush=True)
            os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--layouts", action="store_true",
                        help="also compare HDF5 layouts on the first bundle")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = [load_sample(b, None, None, None, verify=False) for b in args.bundles]
    n_spots = sum(len(d) for d in data)
    with h5py.File(args.bundles[0]) as f:
        shapes = [f[f"view_{v}"].shape[1:] for v in range(int(f.attrs["n_views"]))]
        chunks = f["view_0"].chunks
        compression = f["view_0"].compression
    size_mb = sum(os.path.getsize(b) for b in args.bundles) / 2 ** 20
    for b in args.bundles:  # warm the page cache
        with open(b, "rb") as fh:
            while fh.read(1 << 24):
                pass
    print(f"bundles: {len(args.bundles)} files, {n_spots} spots, {size_mb:.0f} MiB; views {shapes}; "
          f"chunks {chunks}; compression {compression}; batch {args.batch}; cores {os.cpu_count()}; "
          f"load {os.getloadavg()[0]:.2f}")
    for w in [int(x) for x in args.workers.split(",")]:
        rate = measure(data, w, args.batch, args.seconds, pin=torch.cuda.is_available())
        print(f"workers={w}: {rate:8.0f} spots/s  ({rate / TARGET:.2f}x the {TARGET:.0f} spots/s target)",
              flush=True)
    if args.layouts:
        compare_layouts(args.bundles[0], args.batch, args.seconds)


if __name__ == "__main__":
    main()
