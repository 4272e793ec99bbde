"""The M2OST network, its size variants and its cost counters."""

from .flops import count_flops, count_parameters
from .m2ost import M2OST
from .variants import VARIANTS, build_model

__all__ = ["M2OST", "VARIANTS", "build_model", "count_flops", "count_parameters"]
