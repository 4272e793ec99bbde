"""Learning: datasets and loaders, training, baselines, checkpoints, inference (torch)."""
