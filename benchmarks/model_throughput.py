"""Training and inference throughput of an M2OST variant, in spots per second.

Examples
--------
CPU figure tracked by the project (paper configuration, batch 16, 2 threads)::

    python benchmarks/model_throughput.py --variant paper --batch 16 --threads 2

On a GPU this also reports bf16 autocast and the peak memory at batch 64 and 256.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from m2ost.model import build_model, count_flops, count_parameters  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure(model, batch: int, args, device: torch.device, dtype: torch.dtype | None) -> dict:
    """Spots/s (median and best step) of training (forward, backward, AdamW) and inference."""
    x = torch.randn(batch, args.views, 3, args.img_size, args.img_size, device=device)
    y = torch.randn(batch, args.genes, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def train_step():
        with autocast:
            loss = F.mse_loss(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def infer():
        with autocast:
            model(x)

    model.train()
    t_train = timed(train_step, args.steps, args.warmup, device)
    model.eval()
    t_infer = timed(infer, args.steps, args.warmup, device)
    # median: typical figure; best: least disturbed by other load on a shared machine
    runs = (("train", t_train), ("infer", t_infer))
    stats = (("median", statistics.median), ("best", min))
    return {f"{name}_{stat}": batch / f(times) for name, times in runs for stat, f in stats}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="paper")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    model = build_model({"variant": args.variant}, args.genes, args.views, args.img_size).to(device)
    macs = count_flops(model, args.views, args.img_size)
    print(f"variant {args.variant}: {count_parameters(model) / 1e6:.3f} M parameters, "
          f"{macs['linear'] / 1e9:.2f} GMACs linear, "
          f"{macs['total'] / 1e9:.2f} GMACs with attention "
          f"| {args.views} views of {args.img_size} px, {args.genes} genes")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}"
          f"{', compiled' if args.compile else ''}, load average {load} (figures are wall-clock: "
          "other load on the machine lowers them)")
    if args.compile:
        model = torch.compile(model)
        args.warmup = max(args.warmup, 3)  # the first calls of each mode compile

    runs = [(args.batch, None)]
    if device.type == "cuda":
        runs += [(b, dt) for b in (64, 256) for dt in (None, torch.bfloat16)]
    for batch, dtype in runs:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            r = measure(model, batch, args, device, dtype)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch:4d} {'bf16 autocast' if dtype else 'fp32':13s} out of GPU memory")
            continue
        line = (f"batch {batch:4d} {'bf16 autocast' if dtype else 'fp32':13s} "
                f"train {r['train_median']:8.2f} spots/s (best {r['train_best']:.2f})   "
                f"inference {r['infer_median']:8.2f} spots/s (best {r['infer_best']:.2f})")
        if device.type == "cuda":
            line += f"   peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (training)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
