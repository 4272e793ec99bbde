"""What produced an output: package versions, git commit, the settings used."""

from __future__ import annotations

import functools
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from m2ost import __version__
import contextlib

_PACKAGES = ("numpy", "h5py", "torch", "openslide-python", "openslide-bin", "scanpy",
             "anndata", "squidpy", "scikit-image", "tifffile", "pillow", "snakemake")


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"m2ost": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Commit of the repository holding this package, or 'unknown' outside git."""
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def provenance(settings: dict | None = None) -> dict:
    """A JSON-serialisable record to store with every output."""
    return {"versions": package_versions(), "git_commit": git_commit(),
            "settings": settings or {}}


def provenance_json(settings: dict | None = None) -> str:
    return json.dumps(provenance(settings), sort_keys=True)
