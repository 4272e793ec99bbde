"""What a training run writes: checkpoints, ``model.pt`` and ``log.csv``.

Every file is written atomically (a killed run leaves the previous version or none), and a
file that cannot be read is refused naming it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from m2ost.atomic import atomic_path
from m2ost.errors import InputError
from m2ost.learn.inputs.augment import NORMALISATION
from m2ost.learn.training.identity import MODEL_FORMAT
from m2ost.provenance import provenance

LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "val_gene_pcc", "lr", "seconds")


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save`` to ``path``, atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint or ``model.pt`` on the CPU (tensors and plain types only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise InputError(f"cannot read checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); delete it to start "
                         "over", file=path) from None


def write_log(rows: list[dict], path: Path) -> None:
    """``log.csv``: one row per epoch (or per penalty tried, for ridge), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        w = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else list(LOG_COLUMNS),
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def model_payload(kind: str, genes: Sequence[str], views: Sequence[int], img_size: int,
                  fov: Sequence[float], model_cfg: Mapping, cfg: Mapping, train_samples: Sequence[str],
                  fingerprint: str) -> dict:
    """The record of ``model.pt`` without the weights: what the model is and how it was trained."""
    return {"format": MODEL_FORMAT, "kind": kind, "genes": list(genes), "views": list(views),
            "img_size": int(img_size), "fov_um": [float(f) for f in fov],
            "model_cfg": dict(model_cfg), "normalisation": NORMALISATION,
            "target": "log1p-normalised expression (X of the expression files)",
            "train_samples": list(train_samples), "train_cfg": dict(cfg),
            "fingerprint": fingerprint,
            "provenance": json.dumps(provenance({"kind": kind, "model_cfg": dict(model_cfg),
                                                 "train_cfg": dict(cfg),
                                                 "train_samples": list(train_samples)}),
                                     sort_keys=True)}


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``log.csv``, numbers as floats (for tests and reports)."""
    def num(v: str):
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as handle:
        return [{k: num(v) for k, v in row.items()} for row in csv.DictReader(handle)]
