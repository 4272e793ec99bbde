"""How many spots the embed stage encodes at once: from the memory free for it.

``encoder.batch_size: 0`` (or ``auto``) sizes the batch from the free GPU memory
(``torch.cuda.mem_get_info``) or, on a CPU, the available RAM (``MemAvailable`` of
``/proc/meminfo``), and from the encoder's activation size, measured on one image: the largest
tensor any layer outputs (a ViT's MLP hidden layer, a CNN's first wide map) times a margin for the
tensors alive beside it, plus the features kept per image. Half of the free memory is used: the
weights are already loaded, and the allocator, the data and the other processes need the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from m2ost.learn.training.device import autocast

log = logging.getLogger(__name__)

MAX_BATCH = 512
LIVE_TENSORS = 6   # tensors of the largest layer's size alive at once (input, output, residual, ...)
SHARE = 0.5        # of the free memory


def wants_auto(batch_size) -> bool:
    return batch_size in (0, "0", "auto", None)


def free_memory(device: torch.device) -> int:
    """Bytes free for the batch: on a GPU its free memory, on a CPU the available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # no /proc (macOS): assume 4 GiB


@torch.inference_mode()
def bytes_per_image(encoder, tokens: bool) -> int:
    """Activation bytes one image needs in the encoder (one forward pass on a blank image)."""
    biggest = [0]

    def hook(_module, _inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if torch.is_tensor(t):
                biggest[0] = max(biggest[0], t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in encoder.model.modules()]
    try:
        size = int(encoder.settings["input_px"])
        x = torch.zeros(1, 3, size, size, device=encoder.device)
        with autocast(encoder.device):  # bf16 on a GPU, as Encoder.encode runs
            feats, _, _ = encoder._forward(x)
    finally:
        for h in handles:
            h.remove()
    kept = encoder.dim * 4 + (feats.numel() * 4 * 3 if tokens else 0)  # float32 copies of the outputs
    return LIVE_TENSORS * biggest[0] + kept + 3 * size * size * 4  # + the normalised input


def auto_batch_size(encoder, tokens: bool) -> int:
    """Spots per batch for ``encoder`` on its device (each batch encodes one view at a time)."""
    per_image = bytes_per_image(encoder, tokens)
    free = free_memory(encoder.device)
    batch = int(max(1, min(MAX_BATCH, SHARE * free // max(per_image, 1))))
    log.info("encoder batch size %d: %.1f MB per image, %.1f GB free on %s", batch, per_image / 1e6,
             free / 1e9, encoder.device)
    return batch
