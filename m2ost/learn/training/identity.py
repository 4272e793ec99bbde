"""Training settings and the fingerprints that identify a model and a training run.

A run resumes from its checkpoint only when the model (kind, configuration, panel, views,
input), the training samples and the settings that shape the optimisation are those the
checkpoint was written with (:func:`run_parts`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from m2ost import defaults
from m2ost.learn.inputs.augment import NORMALISATION

MODEL_FORMAT = 1

# Settings that do not change the optimisation path of the epochs already run: a checkpoint
# may resume under new values of these (e.g. more patience). ``epochs`` joins them when there is
# no schedule, since then the first k epochs do not depend on the total (a run can be extended);
# under the cosine schedule the learning rate of every step depends on it.
RESUME_NEUTRAL = ("workers", "device", "progress", "eval_batch_size", "patience", "compile")


def train_settings(train_cfg: Mapping | None) -> dict:
    """``train_cfg`` over the ``train`` section's defaults, checked against the config schema
    (m2ost.defaults.settings: unknown keys, types and ranges are errors)."""
    return defaults.settings("train", train_cfg)


def digest(obj) -> str:
    """A short stable hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(kind: str, model_cfg: Mapping, genes: Sequence[str], views: Sequence[int],
                      img_size: int, fov_um: Sequence[float]) -> str:
    """What a trained model is: its kind and configuration, gene panel, views and input."""
    return digest({"kind": kind, "model_cfg": dict(model_cfg), "genes": list(genes),
                   "views": list(views), "img_size": int(img_size),
                   "fov_um": [round(float(f), 3) for f in fov_um],
                   "normalisation": NORMALISATION})


def run_parts(model_fp: str, train_samples: Sequence[str], cfg: Mapping) -> dict:
    """The components of a run's identity, compared one by one when resuming."""
    neutral = RESUME_NEUTRAL + (("epochs",) if cfg["scheduler"] in ("none", None) else ())
    return {"model": model_fp,
            "train_samples": digest(sorted(train_samples)),
            "settings": digest({k: v for k, v in cfg.items() if k not in neutral})}
