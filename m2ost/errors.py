"""The errors shown to the user as one line: bad input (naming the file, the sample and the
problem) and a training that diverged."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input. ``str(err)`` is the one line shown to the user."""

    def __init__(self, problem: str, *, file: object = None, sample: str | None = None):
        self.problem = problem
        self.file = None if file is None else str(file)
        self.sample = sample
        super().__init__(problem)

    def __str__(self) -> str:
        where = []
        if self.sample:
            where.append(f"sample {self.sample}")
        if self.file:
            where.append(f"file {self.file}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return f"{prefix}{self.problem}"


class StaleCheckpoint(InputError):
    """The output folder holds the checkpoint of another run (other settings, data or model)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
