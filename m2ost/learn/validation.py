"""Validation spots: drawn inside the training samples only, to choose the epoch."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from m2ost.errors import InputError
from m2ost.learn.device import derive_seed


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
