"""A feature model with its encoder: predicts spots from their images, as every other kind.

Evaluation and prediction of a feature kind read the views from the bundle and encode them on
the fly with the encoder the model was trained on (its settings are stored in ``model.pt``, not
its weights; the weights file must have the stored checksum). What is evaluated on a held-out
slide is therefore exactly what predicts a new H&E-only slide, with no embeddings file needed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from m2ost.errors import InputError
from m2ost.learn.features.encoders import Encoder, load_encoder, stored_settings
from m2ost.learn.features.probes import FeatureModel
from m2ost.learn.features.registry import FEATURE_MODELS
from m2ost.plan.kinds import FEATURE_KINDS


class EncodedModel:
    """``predict(dataset)`` for a feature model: encode each batch's views, then predict."""

    def __init__(self, encoder: Encoder, model: FeatureModel, grid: tuple[int, int] = (0, 0)):
        self.encoder, self.model, self.grid = encoder, model, tuple(grid)
        self.tokens = FEATURE_KINDS[model.kind].input == "tokens"

    def features(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(the model's input (B, V, ...), pooled features (B, V, D)) of uint8 views
        (B, V, H, W, 3), as the embed stage stores them (tokens rounded to float16 like the
        cache); for pooled kinds both are the pooled features."""
        images = torch.as_tensor(images)
        out, pooled = [], []
        for v in range(images.shape[1]):
            enc = self.encoder.encode(images[:, v], tokens=self.tokens)
            if self.tokens:
                pool, grid = enc
                out.append(grid.reshape(len(grid), -1, grid.shape[-1]).astype(np.float16))
            else:
                pool = enc
                out.append(enc)
            pooled.append(pool)
        return np.stack(out, 1), np.stack(pooled, 1)

    def predict(self, dataset, batch_size: int = 64, workers: int = 0,
                progress: bool = False) -> np.ndarray:
        """(n_items, n_genes) float32 predictions of a SpotDataset (no augmentation)."""
        n, preds = len(dataset), []
        for start in tqdm(range(0, n, batch_size), disable=not progress, desc="predict", leave=False):
            images, _, _ = dataset.__getitems__(list(range(start, min(n, start + batch_size))))
            x, pooled = self.features(images)
            preds.append(self.model.predict(x, self.grid, pooled=pooled))
        return np.concatenate(preds) if preds else np.zeros((0, 0), np.float32)


def encoder_record_check(encoder: Encoder, record: Mapping, where=None) -> None:
    """The loaded encoder must be the one the model was trained with (same weights file bytes)."""
    if encoder.checksum != record["checksum"]:
        raise InputError(f"encoder weights differ from those the model was trained with "
                         f"(sha256 {encoder.checksum[:12]} vs {str(record['checksum'])[:12]})",
                         file=encoder.weights_file)
    if encoder.dim != int(record["dim"]):
        raise InputError(f"encoder gives {encoder.dim} features, the model was trained on "
                         f"{record['dim']}", file=where)


def load_encoded(payload: Mapping, device: torch.device) -> EncodedModel:
    """The EncodedModel stored in a ``model.pt`` payload of a feature kind."""
    kind = payload["kind"]
    record = payload["encoder"]
    encoder = load_encoder(stored_settings(record), device)
    encoder_record_check(encoder, record)
    settings = payload.get("model_cfg", {})
    model = FEATURE_MODELS[kind].from_state(payload["state"], settings.get("model"),
                                            payload.get("train_cfg"))
    return EncodedModel(encoder, model, tuple(payload.get("grid", (0, 0))))
