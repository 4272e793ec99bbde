"""Write outputs under a temporary name and rename them when complete."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from pathlib import Path
from collections.abc import Iterator

log = logging.getLogger(__name__)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale(final: Path) -> None:
    """Delete temporaries of ``final`` left by killed writers of this host (their process is gone).

    A process killed outright (SIGKILL, lost power) cannot remove its temporary file; the next
    writer of the same output does, so a rerun leaves no half-written file behind. Temporaries
    of other hosts (shared file systems) or of live processes are left alone.
    """
    prefix, suffix = f".{final.stem}.tmp-{_host()}-", final.suffix
    for path in final.parent.glob(f"{prefix}*{suffix}"):
        pid = path.name[len(prefix):len(path.name) - len(suffix)]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                path.unlink()
                log.info("removed %s, left by an interrupted run", path)
            except OSError:
                pass


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` only on success.

    A crash or exception removes the temporary file, so no half-written output
    ever carries the final name. Temporaries left by killed writers are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    # Keep the suffix: some writers (anndata, tifffile) look at it.
    tmp = final.with_name(f".{final.stem}.tmp-{_host()}-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
