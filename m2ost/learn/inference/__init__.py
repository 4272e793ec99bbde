"""Prediction out: load a model of any kind, score held-out samples, predict new slides, the ensemble."""
