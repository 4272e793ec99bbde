"""Every feature kind (m2ost.plan.kinds.FEATURE_KINDS) -> its model class."""

from __future__ import annotations

from m2ost.learn.features import probes as feature_models
from m2ost.learn.features.token_model import M2OSTEncoder

FEATURE_MODELS: dict[str, type] = {**feature_models.FEATURE_MODELS, "m2ost_encoder": M2OSTEncoder}
