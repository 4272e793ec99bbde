"""What every model kind stores from its validation predictions, and the intervals it then gives.

:func:`validation_record` is the one place a kind turns its predictions of the validation spots
into the per-gene Pearson r (``val_gene_pcc_per_gene``) and the interval calibration
(``intervals``, :mod:`m2ost.eval.intervals`), both stored in ``model.pt``. The calibration is
stored as tensors and plain values (``model.pt`` is read with ``weights_only``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from m2ost.eval.intervals import fit_calibration, intervals
from m2ost.eval.metrics import gene_pcc_by_group

log = logging.getLogger(__name__)


def _to_stored(obj):
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _to_stored(v) for k, v in obj.items()}
    return obj


def _from_stored(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _from_stored(v) for k, v in obj.items()}
    return obj


def validation_record(truth: np.ndarray, pred: np.ndarray, group: np.ndarray, genes: Sequence[str],
                      seed: int, depth: tuple[np.ndarray, float] | None = None) -> dict:
    """``{"val_gene_pcc_per_gene": ..., "intervals": ...}`` for ``model.pt`` from the validation
    spots' targets, predictions and training-sample numbers (no intervals with < 2 spots);
    ``depth``: their library sizes and the normalisation's target sum, where known
    (:func:`m2ost.learn.inputs.dataset.depths_of`), for intervals at other depths."""
    truth, pred = np.asarray(truth, np.float32), np.asarray(pred, np.float32)
    record = {"val_gene_pcc_per_gene": gene_pcc_by_group(truth, pred, group, genes)}
    state = fit_calibration(pred, truth, np.asarray(group), int(seed), *(depth or (None, None)))
    if state is not None:
        record["intervals"] = _to_stored(state)
        log.info("intervals calibrated on %d validation spots (difficulty head fitted on %d, penalty %g)",
                 state["n_calibration"], state["n_fit"], state["head"]["penalty"])
    return record


def calibration_of(meta: Mapping, where: str = "model") -> dict | None:
    """The stored calibration of a model's record; None (with a warning) for a model without one."""
    state = meta.get("intervals")
    if state is None:
        log.warning("%s has no interval calibration (trained before m2ost stored one, or without "
                    "validation spots): predictions come without intervals; retrain it to get them", where)
        return None
    return _from_stored(dict(state))


def prediction_intervals(meta: Mapping, pred: np.ndarray, level: float, calibration: str,
                         where: str = "model") -> tuple[np.ndarray, np.ndarray] | None:
    """(lower, upper) of ``pred`` from the model's stored calibration, or None without one (the
    depth unknown: a measurement as deep as the calibration spots)."""
    state = calibration_of(meta, where)
    return None if state is None else intervals(state, pred, float(level), str(calibration))
