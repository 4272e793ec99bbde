"""Fit a feature kind (m2ost.plan.kinds.FEATURE_KINDS) on the embeddings of the training samples.

The spots, their targets and the validation draw are exactly those of the other kinds
(the same ``load_samples`` and ``validation_spots`` with the same seed and ``val_fraction``):
only the features come from the embeddings files instead of the images. Writes ``model.pt``
(the feature model's state, the encoder's settings and weights checksum, not its weights) and
``log.csv``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from m2ost.data.panel import read_gene_list
from m2ost.errors import InputError
from m2ost.learn.training.calibration import validation_record
from m2ost.learn.training.checkpoints import model_payload, save_checkpoint, write_log
from m2ost.learn.inputs.dataset import depths_of, load_samples
from m2ost.learn.training.device import seed_everything
from m2ost.learn.features.embeddings import read_embeddings
from m2ost.learn.features.encoders import FEATURE_KEYS, encoder_settings, file_checksum, weights_path
from m2ost.learn.features.probes import FeatureSet
from m2ost.learn.features.registry import FEATURE_MODELS
from m2ost.learn.training.identity import model_fingerprint, train_settings
from m2ost.learn.training.validation import validation_spots
from m2ost.plan.kinds import FEATURE_KINDS

log = logging.getLogger(__name__)


def expected_encoder(encoder_cfg: Mapping | None) -> dict | None:
    """The record (settings, weights checksum) embeddings must carry for ``encoder_cfg``."""
    if encoder_cfg is None:
        return None
    settings = encoder_settings(encoder_cfg)
    path = weights_path(settings)
    if not path.is_file():
        raise InputError("encoder weights file not found (encoder.weights)", file=path)
    return {"settings": {k: settings[k] for k in FEATURE_KEYS}, "checksum": file_checksum(path)}


def feature_data(kind: str, bundles: Mapping[str, str], expressions: Mapping[str, str],
                 embeddings: Mapping[str, str], genes: Sequence[str], train_samples: Sequence[str],
                 cfg: Mapping, encoder: Mapping | None = None):
    """(train FeatureSet, validation FeatureSet, the samples' SampleData, encoder record, views)."""
    cls = FEATURE_MODELS[kind]
    tokens = FEATURE_KINDS[kind].input == "tokens"
    data = load_samples(bundles, expressions, genes, list(train_samples), cls.views,
                        drop_padded=bool(cfg["drop_padded"]), verify=False)
    views = list(range(data[0].info["n_views"])) if cls.views is None else list(cls.views)
    empty = [d.sample for d in data if len(d) == 0]
    if empty:
        raise InputError(f"no usable spots (all padded or none with expression) in {', '.join(empty[:5])}")
    parts = validation_spots({d.sample: len(d) for d in data}, float(cfg["val_fraction"]), int(cfg["seed"]))
    xs = {"train": [], "val": []}
    pools = {"train": [], "val": []}
    ys = {"train": [], "val": []}
    groups = {"train": [], "val": []}
    record, grid = None, (0, 0)
    for k, d in enumerate(data):
        if d.sample not in embeddings:
            raise InputError("no embeddings file given", sample=d.sample)
        emb = read_embeddings(embeddings[d.sample], d.sample, tokens=tokens, bundle=d.bundle, rows=d.rows,
                              encoder=encoder)
        if list(emb.barcode) != list(d.spot_ids):
            raise InputError("embeddings and bundle spot ids differ; rerun the embed stage",
                             file=embeddings[d.sample], sample=d.sample)
        this = {key: emb.encoder[key] for key in ("settings", "checksum", "dim")}
        if record is not None and this != record:
            raise InputError(f"embeddings of {d.sample} come from another encoder than those of "
                             f"{data[0].sample}", file=embeddings[d.sample], sample=d.sample)
        record, grid = this, emb.grid
        x = (emb.tokens if tokens else emb.pooled)[:, views]
        for part, pos in zip(("train", "val"), parts[d.sample]):
            xs[part].append(x[pos])
            if tokens:
                pools[part].append(emb.pooled[pos][:, views])
            ys[part].append(d.targets[pos])
            groups[part].append(np.full(len(pos), k))
    blocks = tuple(emb.encoder.get("blocks", ()))
    token_blocks = tuple(emb.encoder.get("token_blocks", ())) if tokens else ()
    sets = [FeatureSet(np.concatenate(xs[p]), np.concatenate(ys[p]).astype(np.float32),
                       np.concatenate(groups[p]), grid, blocks,
                       np.concatenate(pools[p]) if tokens else None, token_blocks,
                       depths_of(data, [parts[d.sample][i] for d in data]))
            for i, p in enumerate(("train", "val"))]
    return sets[0], sets[1], data, record, views


def fit_feature_model(kind: str, bundles: Mapping[str, str], expressions: Mapping[str, str],
                      embeddings: Mapping[str, str], genes_file: str, train_samples: Sequence[str],
                      settings: Mapping | None, out_dir: str | os.PathLike) -> dict:
    """Fit feature kind ``kind`` and write ``out_dir/model.pt`` and ``log.csv``.

    ``settings``: ``{"model": the kind's config section, "train": {...}, "encoder": {...}}``;
    with ``encoder`` given, every embeddings file must have been computed with it (same
    settings and weights bytes).
    """
    if kind not in FEATURE_MODELS:
        raise InputError(f"'{kind}' is not a feature model kind ({', '.join(FEATURE_MODELS)})")
    settings = dict(settings or {})
    cfg = train_settings(settings.get("train"))
    cfg["augment"] = None
    seed_everything(int(cfg["seed"]))
    genes = read_gene_list(genes_file)
    train, val, data, record, views = feature_data(kind, bundles, expressions, embeddings, genes,
                                                   train_samples, cfg, expected_encoder(settings.get("encoder")))
    model_cfg = settings.get("model") or {}
    model = FEATURE_MODELS[kind](model_cfg, cfg)
    rows = model.fit(train, val, out_dir)
    info = data[0].info
    img_size, fov = info["size_px"][views[0]], [info["fov_um"][v] for v in views]
    stored_cfg = {"model": model_cfg, "encoder": record}
    fp = model_fingerprint(kind, stored_cfg, genes, views, img_size, fov)
    payload = model_payload(kind, genes, views, img_size, fov, stored_cfg, cfg, train_samples, fp)
    payload.update(state=model.state(), encoder=record, grid=list(train.grid))
    if len(val):  # per-gene Pearson and interval calibration on the validation spots
        payload.update(validation_record(val.y, model.predict(val.x, tuple(val.grid), pooled=val.pooled),
                                         val.group, genes, int(cfg["seed"]), val.depth))
    out_dir = Path(out_dir)
    save_checkpoint(payload, out_dir / "model.pt")
    write_log(rows, out_dir / "log.csv")
    chosen = next((r for r in rows if r.get("chosen", True)), rows[-1])
    log.info("%s: %d training and %d validation spots, validation gene PCC %.4f", kind, len(train),
             len(val), chosen.get("val_gene_pcc", float("nan")))
    return {"kind": kind, "model_file": str(out_dir / "model.pt"), "n_train": len(train), "n_val": len(val),
            "val_gene_pcc": chosen.get("val_gene_pcc"), "val_loss": chosen.get("val_loss")}
