"""Shared fixtures: the repository on sys.path, one CPU thread, tiny synthetic studies."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# One thread: results identical to those of the subprocesses the tests start, and no fight for
# the few cores of a shared machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread in every test, set again around each one: scanpy's normalisation (numba /
    threadpoolctl) resets the shared OpenMP thread count, and a training run computed in-process
    with 2 threads then differs in the last bits from one in a 1-thread subprocess. Set after each
    test too, so that module-scoped fixtures (set up before a test's own fixtures) see 1 thread."""
    try:
        import torch
    except ImportError:  # tests of modules that need no torch
        yield
        return
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """Three samples (A, B from patient P1; C from P2), 20 spots, 3 views of 32 px, 8 genes."""
    from synthetic import make_study

    return make_study(tmp_path_factory.mktemp("study"))

