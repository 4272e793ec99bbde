"""Data stages: slides, pyramids, spot tables, tiling into bundles, expression, gene panels.
No torch: these run in the `slides` and `expression` environments."""
