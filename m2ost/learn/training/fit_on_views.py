"""Fit any model kind on the training samples of a split: the networks train, the baselines fit."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from m2ost.data.panel import read_gene_list
from m2ost.errors import InputError
from m2ost.learn.training.baselines import BASELINES
from m2ost.learn.training.calibration import validation_record
from m2ost.learn.training.checkpoints import model_payload, save_checkpoint, write_log
from m2ost.learn.training.device import seed_everything
from m2ost.learn.training.identity import model_fingerprint, train_settings
from m2ost.learn.training.trainer import train
from m2ost.learn.training.validation import training_data
from m2ost.plan.kinds import model_kind


def fit_model(kind: str, bundles: Mapping[str, str], expressions: Mapping[str, str],
              genes_file: str, train_samples: Sequence[str], model_cfg: Mapping | None,
              train_cfg: Mapping | None, out_dir: str | os.PathLike,
              views: Sequence[int] | None = None) -> dict:
    """Fit any model kind on the training samples of a split and write ``out_dir/model.pt``.

    Parameters
    ----------
    kind
        ``m2ost`` (all views, or ``views``), ``m2ost_single`` (view 0 only), ``ridge`` (features
        of all views, or ``views``), ``mean``.
    model_cfg
        Network settings for the neural kinds; ignored by the baselines.
    train_cfg
        The ``train`` section (m2ost/schemas/config.schema.yaml); the baselines use seed, val_fraction,
        drop_padded, workers.

    Other parameters as in :func:`m2ost.learn.training.trainer.train`. Returns a dict of what was fitted.
    """
    spec = model_kind(kind)
    if spec.family == "feature":
        raise InputError(f"model kind '{kind}' trains on encoder embeddings: use "
                         "m2ost.learn.features.fit_on_embeddings.fit_feature_model (m2ost train --embeddings)")
    if spec.views is not None:
        if views is not None and list(views) != list(spec.views):
            raise InputError(f"{kind} uses views {list(spec.views)} only, got views {list(views)}")
        views = list(spec.views)
    if spec.neural:
        return train(bundles, expressions, genes_file, train_samples, model_cfg or {},
                     train_cfg, out_dir, views, kind)
    return fit_baseline(kind, bundles, expressions, genes_file, train_samples, train_cfg,
                        out_dir, views)


def fit_baseline(kind: str, bundles: Mapping[str, str], expressions: Mapping[str, str],
                 genes_file: str, train_samples: Sequence[str], train_cfg: Mapping | None,
                 out_dir: str | os.PathLike, views: Sequence[int] | None = None) -> dict:
    """Fit the ``mean`` or ``ridge`` baseline on the same train/validation spots as a network."""
    if kind not in BASELINES:
        raise InputError(f"model kind '{kind}' has no baseline implementation in "
                         "m2ost.learn.training.baselines.BASELINES")
    cfg = train_settings(train_cfg)
    cfg["augment"] = None  # baselines see the spots as they are
    seed_everything(int(cfg["seed"]))
    genes = read_gene_list(genes_file)
    train_ds, val_ds = training_data(bundles, expressions, genes, train_samples, views, cfg)
    predictor = BASELINES[kind]()
    rows = predictor.fit(train_ds, val_ds, int(cfg["workers"]))
    views = train_ds.views
    info = train_ds.data[0].info
    fov = [info["fov_um"][v] for v in views]
    fp = model_fingerprint(kind, {}, genes, views, train_ds.image_size, fov)
    payload = model_payload(kind, genes, views, train_ds.image_size, fov, {}, cfg,
                            train_samples, fp)
    payload["state"] = predictor.state()
    if len(val_ds):  # per-gene Pearson and interval calibration on the validation spots
        payload.update(validation_record(val_ds.targets(), predictor.predict(val_ds), val_ds.index[:, 0],
                                         genes, int(cfg["seed"]), val_ds.depths()))
    out_dir = Path(out_dir)
    save_checkpoint(payload, out_dir / "model.pt")
    write_log(rows, out_dir / "log.csv")
    chosen = next((r for r in rows if r.get("chosen", True)), rows[0])
    return {"kind": kind, "model_file": str(out_dir / "model.pt"),
            "val_gene_pcc": chosen["val_gene_pcc"], "val_loss": chosen["val_loss"],
            **({"alpha": predictor.alpha} if kind == "ridge" else {})}
