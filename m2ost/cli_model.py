"""Subcommands of the model stages: train, evaluate, summarize, predict."""

from __future__ import annotations


def add_parsers(sub) -> None:
    """Register the model subcommands on the ``m2ost`` parser."""
