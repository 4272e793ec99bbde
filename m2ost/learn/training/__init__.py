"""Training: devices and seeds, the network loop, checkpoints, baselines, fitting a kind on the views."""
