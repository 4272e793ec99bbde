"""Write outputs under a temporary name and rename them when complete."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` only on success.

    A crash or exception removes the temporary file, so no half-written output
    ever carries the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix: some writers (anndata, tifffile) look at it.
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
