"""``m2ost_finetune``: M2OST over the token grids of a pretrained encoder whose last stages train too.

``m2ost_encoder`` learns on the frozen encoder's cached tokens (CPU-friendly). This kind runs
the encoder inside the network (:class:`m2ost.model.token_m2ost.EncoderTokenM2OST`): the views
are augmented (flips, rotations, colour and stain jitter of the ``train`` section) before the
encoder sees them, and its last ``finetune_blocks`` stages adapt to H&E and to the gene panel.
It is a neural kind: m2ost.learn.training.trainer trains it on the bundles' views like ``m2ost`` (GPU,
bf16, checkpoints, resume, DistributedDataParallel), and it predicts from views like ``m2ost``.

Its model settings are the ``m2ost_finetune`` section of the config plus the encoder's
(``encoder``: the settings that define the network and its input). ``model.pt`` holds the whole
network, fine-tuned encoder included, so predicting needs no weights file.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from m2ost import defaults
from m2ost.errors import InputError
from m2ost.learn.inputs.augment import IMAGENET_MEAN, IMAGENET_STD
from m2ost.learn.features.encoders import create_backbone, encoder_settings
from m2ost.learn.features.token_model import NETWORK_KEYS
from m2ost.model.token_m2ost import EncoderTokenM2OST, TokenM2OST
from m2ost.plan.settings import ENCODER_NETWORK_KEYS

SECTION = "m2ost_finetune"


def finetune_settings(cfg: Mapping | None) -> dict:
    """``cfg`` (the section, without ``encoder``) over the schema's defaults, checked."""
    return defaults.settings(SECTION, cfg)


def is_finetune_config(model_cfg: Mapping) -> bool:
    """Whether a neural model configuration is this kind's (it names its encoder)."""
    return "encoder" in model_cfg


def build_finetune_network(model_cfg: Mapping, n_genes: int, n_views: int,
                           pretrained: bool = True) -> EncoderTokenM2OST:
    """The network of ``model_cfg`` (``{**section, "encoder": {...}}``).

    ``pretrained``: load the encoder's weights file (training); False builds the architecture
    only, for a ``model.pt`` whose stored weights replace all of them (prediction).
    """
    cfg = dict(model_cfg)
    enc = encoder_settings({k: v for k, v in cfg.pop("encoder").items() if k in ENCODER_NETWORK_KEYS})
    settings = finetune_settings(cfg)
    backbone, _ = create_backbone(enc, load_weights=pretrained)
    backbone.eval()
    px = int(enc["input_px"])
    with torch.no_grad():  # the size of the token grid
        f = backbone.forward_features(torch.zeros(1, 3, px, px))
    prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    n_tokens = f.shape[2] * f.shape[3] if f.ndim == 4 else f.shape[1] - prefix
    in_dim = f.shape[1] if f.ndim == 4 else f.shape[2]
    try:
        head = TokenM2OST(n_genes, n_views, int(n_tokens), int(in_dim),
                          **{k: settings[k] for k in NETWORK_KEYS})
        net = EncoderTokenM2OST(backbone, head, int(settings["finetune_blocks"]), prefix, px,
                                IMAGENET_MEAN, IMAGENET_STD, enc["mean"], enc["std"],
                                float(settings["encoder_lr_scale"]))
    except ValueError as err:
        raise InputError(f"{SECTION} configuration rejected: {err}") from None
    return net
