"""The model kinds: what each is and what the workflow does with it (standard library only).

One registry, read by the Snakefile while planning (which kinds need the neural training
launcher, which read the cached encoder embeddings, which settings reach their ``train`` rule)
and by the package (the ``--kind`` choices, the code that fits a kind, the kinds a ``model.pt``
may hold).

Four families:

- ``neural``: trained by the network loop on the bundles' views (``m2ost.learn.training.trainer``: torch,
  GPUs, the distributed launcher, the ``model`` settings or those of its own section).
- ``baseline``: fitted in one pass on the bundles' views (``m2ost.learn.training.baselines.BASELINES``).
- ``feature``: fitted on the cached pretrained-encoder embeddings of the training samples (rule
  ``embed``; ``m2ost.learn.features.probes.FEATURE_MODELS``), evaluated and used for prediction
  from bundles with the encoder running on the fly (``m2ost.learn.features.encoded``). ``input`` says what
  they read from the embeddings (``pooled`` features, or the ``tokens`` grid, which the embed
  stage then stores); ``config`` names the config section passed to them as their model settings.
- ``ensemble``: the weighted average of other kinds trained on the same split (its ``config``
  section names them), the weights chosen on the validation spots (``m2ost.learn.inference.ensemble``).

Adding a kind: add a :class:`ModelKind` here; implement it in :mod:`m2ost.learn` under the same
name; add the name to the ``models`` and ``predict.model`` enums of
``m2ost/schemas/config.schema.yaml`` (``tests/test_layout.py`` checks they match).
"""

from __future__ import annotations

from dataclasses import dataclass

from m2ost.errors import InputError

# The training settings that a baseline uses (which spots it fits on, and how they are read):
# a change of any other training setting must not refit it.
BASELINE_TRAIN_KEYS = ("seed", "val_fraction", "drop_padded", "workers")
# A feature model's spots: the same training/validation draw as every other kind (its own
# training settings, m2ost_encoder's, are in its config section).
FEATURE_TRAIN_KEYS = ("seed", "val_fraction", "drop_padded")
# An ensemble's validation spots must be those its members held out: the same draw settings.
ENSEMBLE_TRAIN_KEYS = FEATURE_TRAIN_KEYS
ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class ModelKind:
    """One model kind.

    ``family``: ``neural``, ``baseline``, ``feature`` or ``ensemble`` (module docstring).
    ``train_keys``: the ``train`` settings it uses (None = all of them): its ``train`` job gets
    only these, so a change of another one does not refit it.
    ``views``: the views it always uses (None = every view of the bundle).
    ``input``: for feature kinds, what they read from the embeddings.
    ``config``: the config section holding its model settings (None: ``model`` for the neural
    kinds, none for the others).
    ``encoder_weights``: builds the pretrained encoder itself from its weights file (the
    ``encoder`` settings join its model settings).
    """

    name: str
    family: str
    description: str
    train_keys: tuple[str, ...] | None = None
    views: tuple[int, ...] | None = None
    input: str | None = None
    config: str | None = None
    encoder_weights: bool = False

    @property
    def neural(self) -> bool:
        return self.family == "neural"


KINDS: dict[str, ModelKind] = {k.name: k for k in (
    ModelKind("m2ost", "neural", "M2OST on every view"),
    ModelKind("m2ost_single", "neural", "M2OST on view 0 only (the single-view ablation)", views=(0,)),
    ModelKind("ridge", "baseline", "ridge regression on handcrafted colour and texture features of the views",
              train_keys=BASELINE_TRAIN_KEYS),
    ModelKind("mean", "baseline", "the training-set mean expression for every spot", train_keys=BASELINE_TRAIN_KEYS),
    ModelKind("encoder_ridge", "feature", "HEST-Benchmark probe: PCA 256 + ridge on the encoder features of "
              "all views", train_keys=FEATURE_TRAIN_KEYS, input="pooled"),
    ModelKind("encoder_ridge_v0", "feature", "HEST-Benchmark probe on the encoder features of view 0",
              train_keys=FEATURE_TRAIN_KEYS, input="pooled"),
    ModelKind("m2ost_encoder", "feature", "M2OST over the encoder's token grids of the views (deformable: coarser "
              "views also carry the finer views' tokens)", train_keys=FEATURE_TRAIN_KEYS, input="tokens",
              config="m2ost_encoder"),
    ModelKind("m2ost_finetune", "neural", "M2OST over the encoder's token grids as m2ost_encoder, the encoder running "
              "on the views and its last stages fine-tuned (a GPU job)", config="m2ost_finetune",
              encoder_weights=True),
    ModelKind(ENSEMBLE, "ensemble", "weighted average of the models in ensemble.members, the weights chosen on "
              "the validation spots", train_keys=ENSEMBLE_TRAIN_KEYS, config="ensemble"),
)}

NEURAL_KINDS = tuple(n for n, k in KINDS.items() if k.family == "neural")
BASELINE_KINDS = tuple(n for n, k in KINDS.items() if k.family == "baseline")
FEATURE_KINDS = {n: k for n, k in KINDS.items() if k.family == "feature"}
ALL_KINDS = tuple(KINDS)


def model_kind(name: str) -> ModelKind:
    """The kind called ``name``; an InputError listing the kinds otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise InputError(f"model kind '{name}' is not one of {', '.join(KINDS)}") from None


def is_neural(name: str) -> bool:
    return model_kind(name).neural


def ensemble_members(config) -> list[str]:
    """The member kinds of the ensemble in a workflow config (checked: no ensemble inside)."""
    members = list(config.get(ENSEMBLE, {}).get("members", []))
    if ENSEMBLE in members or not members:
        raise InputError("ensemble.members must name at least one model kind other than ensemble")
    for m in members:
        model_kind(m)
    return members


def uses_kinds(kinds, config) -> list[str]:
    """``kinds`` with the ensemble's members added where the ensemble is among them."""
    out = list(kinds)
    if ENSEMBLE in out:
        out += [m for m in ensemble_members(config) if m not in out]
    return out


def needs_tokens(kinds) -> bool:
    """Whether any of ``kinds`` reads the token grid (the embed stage then stores it)."""
    return any(KINDS[k].input == "tokens" for k in kinds if k in KINDS)
