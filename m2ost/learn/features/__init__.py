"""Pretrained features: encoders, the embedding stage, the probes and networks on cached features."""
