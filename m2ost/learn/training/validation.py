"""Validation spots: drawn inside the training samples only, to choose the epoch; the training and
validation datasets of a split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from m2ost.errors import InputError
from m2ost.learn.inputs.dataset import load_samples
from m2ost.learn.training.device import derive_seed
from m2ost.learn.inputs.loader import SpotDataset


def validation_spots(n_spots: Mapping[str, int], val_fraction: float,
                     seed: int) -> dict:
    """Draw validation spots inside each *training* sample.

    Parameters
    ----------
    n_spots
        training sample -> number of usable spots. Held-out samples must not be passed: the
        validation set is used to pick the epoch, so it may never touch a test sample.
    val_fraction
        Fraction of each sample's spots kept for validation, in [0, 1). Each sample with at
        least 2 spots gives at least one validation spot when the fraction is positive.
    seed
        The draw depends only on (seed, sample name), not on the other samples.

    Returns
    -------
    dict
        sample -> (train positions, validation positions), sorted positions into that sample's
        spot list.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = {}
    for sample, n in n_spots.items():
        n_val = int(round(val_fraction * n))
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        rng = np.random.default_rng(derive_seed(seed, "validation", sample))
        perm = rng.permutation(n)
        out[sample] = (np.sort(perm[n_val:]), np.sort(perm[:n_val]))
    return out


def training_data(bundles: Mapping[str, str], expressions: Mapping[str, str],
                  genes: Sequence[str], train_samples: Sequence[str],
                  views: Sequence[int] | None, cfg: Mapping) -> tuple[SpotDataset, SpotDataset]:
    """Training and validation datasets; validation spots come from the training samples."""
    if not train_samples:
        raise InputError("no training samples given")
    data = load_samples(bundles, expressions, genes, list(train_samples), views,
                        drop_padded=bool(cfg["drop_padded"]))
    empty = [d.sample for d in data if len(d) == 0]
    if empty:
        raise InputError(f"no usable spots (all padded or none with expression) in "
                         f"{', '.join(empty[:5])}")
    parts = validation_spots({d.sample: len(d) for d in data}, float(cfg["val_fraction"]),
                             int(cfg["seed"]))
    tr, va = [], []
    for k, d in enumerate(data):
        t, v = parts[d.sample]
        tr.append(np.stack([np.full(len(t), k), t], 1))
        va.append(np.stack([np.full(len(v), k), v], 1))
    train_ds = SpotDataset(data, views, np.concatenate(tr), cfg["augment"], int(cfg["seed"]))
    val_ds = SpotDataset(data, views, np.concatenate(va), None, int(cfg["seed"]))
    return train_ds, val_ds
