"""M2OST: predict spatial transcriptomics from multi-scale H&E views."""

__version__ = "0.1.0"
