"""The model kinds, for the planner (Snakefile), the command line and the training code.

Standard library only: the Snakefile imports it while planning.

Feature kinds work on pretrained-encoder features: they train on the cached embeddings of the
training samples (rule ``embed``) and are evaluated and used for prediction from bundles, the
encoder running on the fly (m2ost.learn.encoded). ``input`` says what they read from the
embeddings (``pooled`` features, or the ``tokens`` grid, which the embed stage then stores),
``config`` the config section passed to them as their model settings (None: none), and
``train_keys`` the keys of the ``train`` section they use (None: all), so that a change
elsewhere does not retrain them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureKind:
    input: str
    config: str | None = None
    train_keys: tuple[str, ...] | None = ("seed", "val_fraction", "drop_padded")


NEURAL_KINDS = ("m2ost", "m2ost_single")
BASELINE_KINDS = ("ridge", "mean")
FEATURE_KINDS = {
    "encoder_ridge": FeatureKind("pooled"),     # HEST-Benchmark probe, all views concatenated
    "encoder_ridge_v0": FeatureKind("pooled"),  # the same on view 0 alone
    "m2ost_encoder": FeatureKind("tokens", "m2ost_encoder"),  # M2OST over the encoder's token grids
}
ALL_KINDS = NEURAL_KINDS + BASELINE_KINDS + tuple(FEATURE_KINDS)


def needs_tokens(kinds) -> bool:
    """Whether any of ``kinds`` reads the token grid (the embed stage then stores it)."""
    return any(FEATURE_KINDS[k].input == "tokens" for k in kinds if k in FEATURE_KINDS)
