"""Throughput of an M2OST variant as the training code runs it (bf16 autocast on CUDA): training
and inference spots/s at several batch sizes, eager and ``torch.compile``, peak GPU memory, and
the share of a real training step spent waiting for the DataLoader over HER2+ bundles.

    python benchmarks/gpu_measure.py --variant paper --batches 64,256 --bundles results/bundles/*.h5 \
        --json measure.json

Writes the JSON after every measurement, so a run stopped at its budget keeps what it measured.
Part of benchmarks/gpu_run.sh (phase ``measure``); runs on a CPU too, only slower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2ost.learn.inputs.augment import prepare_batch
from m2ost.learn.inputs.dataset import load_sample
from m2ost.learn.training.device import autocast, pin_memory, resolve_device
from m2ost.learn.inputs.loader import SpotDataset, make_loader
from m2ost.model import build_model, count_parameters


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


class Measure:
    def __init__(self, args):
        self.args = args
        self.device = resolve_device(args.device)
        self.deadline = time.monotonic() + args.budget_s
        torch.manual_seed(0)
        self.model = build_model({"variant": args.variant}, args.genes, args.views, args.img_size).to(self.device)
        self.result = {"device": str(self.device), "variant": args.variant, "views": args.views,
                       "img_size": args.img_size, "genes": args.genes, "torch": torch.__version__,
                       "params_m": round(count_parameters(self.model) / 1e6, 3),
                       "autocast": "bf16" if self.device.type == "cuda" else "none (fp32 on the CPU)",
                       "compile_backend": args.compile_backend, "throughput": [], "loader": [], "skipped": []}
        if self.device.type == "cuda":
            self.result["gpu"] = torch.cuda.get_device_name(self.device)

    def save(self) -> None:
        self.result["load"] = list(os.getloadavg())
        tmp = self.args.json + ".tmp"
        Path(tmp).write_text(json.dumps(self.result, indent=1) + "\n")
        os.replace(tmp, self.args.json)

    def time_left(self, what: str, need: float) -> bool:
        if time.monotonic() + need > self.deadline:
            self.result["skipped"].append(what)
            self.save()
            return False
        return True

    # -- synthetic batches ------------------------------------------------------------------
    def steps(self, model, batch: int, train: bool):
        a, dev = self.args, self.device
        x = torch.randn(batch, a.views, 3, a.img_size, a.img_size, device=dev)
        y = torch.randn(batch, a.genes, device=dev)
        if train:
            opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

            def step():
                with autocast(dev):
                    pred = model(x)
                loss = F.mse_loss(pred.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.model.train()
        else:
            def step():
                with torch.inference_mode(), autocast(dev):
                    model(x)
            self.model.eval()
        return step

    def timed(self, step, n: int) -> list[float]:
        out = []
        for _ in range(n):
            sync(self.device)
            t = time.perf_counter()
            step()
            sync(self.device)
            out.append(time.perf_counter() - t)
        return out

    def throughput(self, model, batch: int, mode: str) -> None:
        row = {"mode": mode, "batch": batch}
        try:
            for phase in ("train", "infer"):
                reset_peak(self.device)
                step = self.steps(model, batch, phase == "train")
                first = self.timed(step, 1)[0]  # compiles, when compiled
                warm = self.timed(step, max(0, self.args.warmup - 1))
                times = self.timed(step, self.args.steps)
                med = statistics.median(times)
                row.update({f"{phase}_spots_s": round(batch / med, 1), f"{phase}_best_spots_s":
                            round(batch / min(times), 1), f"{phase}_step_ms": round(1000 * med, 2),
                            f"{phase}_first_call_s": round(first, 2), f"{phase}_peak_gib": peak_gib(self.device)})
                del warm
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of GPU memory"
        self.result["throughput"].append(row)
        self.save()
        print(json.dumps(row), flush=True)

    # -- the DataLoader feeding real training steps -----------------------------------------
    def loader_wait(self, data, batch: int, workers: int) -> None:
        dev, a = self.device, self.args
        ds = SpotDataset(data, augment=True, seed=0)
        sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0))
        loader = make_loader(ds, batch, workers, pin_memory(dev), sampler=sampler)
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        y = torch.randn(batch, a.genes, device=dev)
        self.model.train()
        waits, totals, sizes, epoch = [], [], [], 0
        it = iter(loader)
        reset_peak(dev)
        for _ in range(a.loader_steps):
            t0 = time.perf_counter()
            try:
                images, _, aug = next(it)
            except StopIteration:  # a new epoch: as in training, workers persist
                epoch += 1
                ds.set_epoch(epoch)
                it = iter(loader)
                images, _, aug = next(it)
            t1 = time.perf_counter()
            x = prepare_batch(images, dev, aug)
            with autocast(dev):
                pred = self.model(x)
            loss = F.mse_loss(pred.float(), y[:len(pred)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(dev)
            waits.append(t1 - t0)
            totals.append(time.perf_counter() - t0)
            sizes.append(len(pred))
        skip = min(2, len(totals) - 1)  # worker start-up and the first allocation
        wait, total = sum(waits[skip:]), sum(totals[skip:])
        row = {"batch": batch, "workers": workers, "steps": len(totals) - skip, "epochs_started": epoch + 1,
               "spots_s": round(sum(sizes[skip:]) / total, 1), "wait_share": round(wait / total, 4),
               "wait_ms_median": round(1000 * statistics.median(waits[skip:]), 2),
               "step_ms_median": round(1000 * statistics.median(totals[skip:]), 2), "peak_gib": peak_gib(dev)}
        ds.close()
        del loader, it
        self.result["loader"].append(row)
        self.save()
        print(json.dumps(row), flush=True)

    def attempt(self, what: str, fn, *args) -> None:
        """Run one measurement; an error is recorded and the next one goes on."""
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001  (e.g. shared memory too small for many workers)
            self.result.setdefault("errors", []).append({"what": what, "error": f"{type(err).__name__}: {err}"})
            self.save()
            print(f"{what}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)

    def run(self) -> None:
        a = self.args
        last = 0.0
        for b in a.batches:
            if self.time_left(f"eager batch {b}", last):
                t = time.monotonic()
                self.attempt(f"eager batch {b}", self.throughput, self.model, b, "eager")
                last = time.monotonic() - t
        if a.bundles:
            data = [load_sample(b, None, None, None, verify=False) for b in a.bundles]
            self.result["loader_spots"] = sum(len(d) for d in data)
            for b in a.loader_batches:
                for w in a.loader_workers:
                    if self.time_left(f"loader batch {b} workers {w}", 0.5 * last):
                        self.attempt(f"loader batch {b} workers {w}", self.loader_wait, data, b, w)
        compiled = torch.compile(self.model, backend=a.compile_backend, dynamic=False)
        need = a.compile_estimate_s
        for b in a.compile_batches:
            if self.time_left(f"compiled batch {b}", need):
                t = time.monotonic()
                self.attempt(f"compiled batch {b}", self.throughput, compiled, b, "compiled")
                need = time.monotonic() - t
        if a.compile_batches and self.time_left("compiled odd batch", 0.5 * need):
            self.attempt("compiled odd batch", self.odd_batch, compiled, max(1, a.compile_batches[0] - 3))
        self.save()

    def odd_batch(self, compiled, batch: int) -> None:
        """The last batch of an epoch is usually smaller: what its recompilation costs."""
        t = time.perf_counter()
        self.steps(compiled, batch, True)()
        sync(self.device)
        self.result["recompile_odd_batch"] = {"batch": batch, "first_call_s": round(time.perf_counter() - t, 2)}


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="paper")
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--genes", type=int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", type=ints, default=[32, 64, 128, 256])
    p.add_argument("--compile-batches", type=ints, default=[64, 256])
    p.add_argument("--compile-backend", default="inductor", help="inductor; eager traces only (CPU tests)")
    p.add_argument("--compile-estimate-s", type=float, default=60.0,
                   help="time a first compiled measurement is assumed to take (compilation included)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    p.add_argument("--bundles", nargs="*", default=[], help="bundles for the DataLoader measurement")
    p.add_argument("--loader-batches", type=ints, default=[64, 256])
    p.add_argument("--loader-workers", type=ints, default=[2, 4, 8])
    p.add_argument("--loader-steps", type=int, default=40)
    p.add_argument("--budget-s", type=float, default=300.0, help="skip what would end past this")
    p.add_argument("--json", required=True, help="output file")
    return p


def main(argv=None) -> None:
    m = Measure(parser().parse_args(argv))
    m.save()
    m.run()


if __name__ == "__main__":
    main()
