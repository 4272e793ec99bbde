"""Where tensors live and how runs are seeded.

Policy: ``"auto"`` picks CUDA when available, else the CPU. Asking explicitly for CUDA on a
machine without it is an error (``InputError``), not a silent CPU fallback: a run that was meant
for a GPU and quietly takes days on a CPU is worse than a clear message.
"""

from __future__ import annotations

import contextlib
import os
import random
import zlib

import numpy as np
import torch

from m2ost.errors import InputError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn a device setting into a ``torch.device``.

    Parameters
    ----------
    spec
        ``"auto"`` (or None): CUDA when available, else CPU. ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        Under a distributed launch (``LOCAL_RANK`` set), a bare ``"cuda"`` or ``"auto"`` maps to
        ``cuda:<LOCAL_RANK>``.

    Raises
    ------
    InputError
        CUDA asked for but unavailable, a CUDA index out of range, or an unknown setting.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    local_rank = os.environ.get("LOCAL_RANK")
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        spec = "cuda"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"device '{spec}' requested but CUDA is not available on this "
                             "machine; set device: auto (uses CUDA when present) or cpu")
        if spec == "cuda":
            index = int(local_rank) if local_rank is not None else torch.cuda.current_device()
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise InputError(f"device '{spec}' is not a valid CUDA device") from None
        if index >= torch.cuda.device_count():
            raise InputError(f"device '{spec}' requested but only "
                             f"{torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    raise InputError(f"device '{spec}' is not understood; use auto, cpu, cuda or cuda:N")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slow and changes results)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pin_memory(device: torch.device) -> bool:
    """Pinned host memory makes host->GPU copies asynchronous; useless on CPU."""
    return device.type == "cuda"


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes and runs)."""
    seq = np.random.SeedSequence([p if isinstance(p, int) else zlib.crc32(p.encode())
                                  for p in parts])
    return int(seq.generate_state(1, dtype=np.uint64)[0]) >> 1


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; request deterministic kernels.

    Deterministic algorithms are requested with ``warn_only`` so that a CUDA kernel without a
    deterministic version warns instead of failing; on the CPU the kernels used here are
    deterministic, which is what makes a resumed run bit-identical to an uninterrupted one.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """The global RNG states of python, numpy and torch, as checkpoint-safe plain objects."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
