"""Evaluation: metrics, summary tables and figures. No torch: the `summary` rule runs without it."""
