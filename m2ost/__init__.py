"""M2OST: predict spatial transcriptomics from multi-scale H&E views.

``__version__`` is the package's version, written here alone: pyproject.toml reads it
(``[tool.setuptools.dynamic]``), ``m2ost --version`` prints it and every output records it.
"""

__version__ = "0.2.0"
