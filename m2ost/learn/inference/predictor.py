"""Predicting with a trained model of any kind: load ``model.pt``, run it over a SpotDataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from m2ost.errors import InputError
from m2ost.learn.inputs.augment import prepare_batch
from m2ost.learn.training.baselines import BASELINES
from m2ost.learn.training.checkpoints import load_checkpoint
from m2ost.learn.training.device import autocast, pin_memory, resolve_device
from m2ost.learn.features.encoded import load_encoded
from m2ost.learn.inputs.loader import SpotDataset, make_loader
from m2ost.learn.training.network import build_network
from m2ost.learn.training.identity import MODEL_FORMAT
from m2ost.plan.kinds import ALL_KINDS, ENSEMBLE, FEATURE_KINDS


def predict_network(model: torch.nn.Module, dataset: SpotDataset, device: torch.device,
                    batch_size: int = 64, workers: int = 0, progress: bool = False) -> np.ndarray:
    """(n_items, n_genes) float32 predictions in item order (no augmentation is applied).

    Worker processes start anew at each call (the validation of every epoch): no more of them
    than the batches after the first, which the main process would wait for anyway."""
    batches = -(-len(dataset) // batch_size)
    loader = make_loader(dataset, batch_size, max(0, min(workers, batches - 1)), pin_memory(device))
    model.eval()
    out = []
    with torch.inference_mode():
        for images, _, _ in tqdm(loader, disable=not progress, desc="predict", leave=False):
            x = prepare_batch(images, device)
            with autocast(device):
                y = model(x)
            out.append(y.float())  # kept on the device: one copy back at the end, no wait per batch
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).cpu().numpy()



class Predictor:
    """A trained model of any kind, loaded from ``model.pt``.

    Attributes: ``kind``, ``genes``, ``views``, ``img_size``, ``fov_um``, ``meta`` (the whole
    stored record except the weights). :meth:`predict` turns a SpotDataset (built with
    ``views``) into an (n_items, n_genes) float32 array.
    """

    def __init__(self, meta: dict, impl, device: torch.device):
        self.meta, self.impl, self.device = meta, impl, device
        self.kind = meta["kind"]
        self.genes = list(meta["genes"])
        self.views = list(meta["views"])
        self.img_size = int(meta["img_size"])
        self.fov_um = list(meta["fov_um"])

    def predict(self, dataset: SpotDataset, batch_size: int = 64, workers: int = 0,
                progress: bool = False) -> np.ndarray:
        if list(dataset.views) != self.views:
            raise InputError(f"dataset views {dataset.views} differ from the model's {self.views}")
        if self.kind == ENSEMBLE:  # each member on its own views, then the weighted average
            return sum(w * m.predict(SpotDataset(dataset.data, m.views, dataset.index), batch_size, workers,
                                     progress) for w, m in self.impl)
        if isinstance(self.impl, torch.nn.Module):
            return predict_network(self.impl, dataset, self.device, batch_size, workers,
                                   progress)
        if self.kind in FEATURE_KINDS:
            return self.impl.predict(dataset, batch_size, workers, progress)
        return self.impl.predict(dataset, batch_size, workers)


def load_model(path: str | os.PathLike, device: str = "auto") -> Predictor:
    """Load ``model.pt`` of any kind (see :func:`m2ost.learn.training.fit_on_views.fit_model`) for prediction."""
    path = Path(path)
    if not path.exists():
        raise InputError("model file not found (train the model first)", file=path)
    return predictor_from_payload(load_checkpoint(path), device, path)


def predictor_from_payload(payload: dict, device: str | torch.device = "auto", path=None) -> Predictor:
    """The Predictor of a loaded ``model.pt`` payload (``path``: named in errors)."""
    if payload.get("format") != MODEL_FORMAT or payload.get("kind") not in ALL_KINDS:
        raise InputError("not a model file written by m2ost (unknown format or kind)", file=path)
    dev = resolve_device(device) if isinstance(device, str) else device
    kind = payload["kind"]
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "state")}
    if kind == ENSEMBLE:  # (weight, member Predictor) pairs; the members are stored whole
        state = payload["state"]
        impl = [(float(w), predictor_from_payload(m, dev, path)) for w, m in zip(state["weights"], state["members"])]
    elif kind in BASELINES:
        impl = BASELINES[kind].from_state(payload["state"])
    elif kind in FEATURE_KINDS:  # the encoder runs on the views, then the feature model
        impl = load_encoded(payload, dev)
    else:
        impl = build_network(payload["model_cfg"], len(payload["genes"]), len(payload["views"]),
                             payload["img_size"], pretrained=False)  # every weight is in the payload
        impl.load_state_dict(payload["state_dict"])
        impl.to(dev).eval()
    return Predictor(meta, impl, dev)
