"""Throughput, peak memory and cache size of the embed stage, for the default encoder and a ViT-L.

Each case runs :func:`m2ost.learn.features.embeddings.write_embeddings` (the embed stage's code,
tokens stored) on a bundle of real HER2+ spots (section B4, three views of 224, 448 and 896 px
at 0.69 µm/px, stored at 224 px) in a fresh process, so its peak resident memory is its own:

``lite0``      the offline default, EfficientNet-Lite0 with its ImageNet weights (levels 3, token_levels 2)
``vitl``       a ViT-L/16 of UNI's architecture (encoder.preset uni) with random weights: the
               compute and the sizes of UNI, without its gated file
``vitl-grid8`` the same with encoder.token_grid 8 (its 14 x 14 token grid cached at 8 x 8)

    python benchmarks/embed_throughput.py --spots 32 --vit-spots 8 [--device cuda]

Prints, per case: spots/s (whole stage: read, encode, write), the batch size (auto: from the free
memory), the peak RSS of the process (and the GPU's peak allocation on CUDA), the cache file's
size per 1,000 spots, the token cache's uncompressed bytes per spot, and the load average.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

CASES = {"lite0": {}, "vitl": {"preset": "uni"}, "vitl-grid8": {"preset": "uni", "token_grid": 8}}


def run_case(case: str, bundle: Path, spots: int, device: str, batch) -> dict:
    """One case in this process (called in a child by :func:`main`, the bundle already written)."""
    import torch

    from m2ost.learn.features.embeddings import write_embeddings
    from m2ost.learn.features.encoders import Encoder, create_backbone, encoder_settings, load_encoder
    from m2ost.learn.training.device import resolve_device

    tmp = Path(tempfile.mkdtemp(prefix="embed_bench_"))
    cfg = CASES[case]
    if cfg.get("preset"):  # the architecture with random weights: no gated file needed
        settings = encoder_settings({**cfg, "weights": "random"})
        model, _ = create_backbone(settings, load_weights=False)
        encoder = Encoder(model, settings, Path("random"), "random", resolve_device(device))
    else:
        encoder = load_encoder(cfg, device)
    if encoder.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    write_embeddings(encoder, bundle, tmp / "emb.h5", sample="B4", tokens=True, batch_size=batch,
                     progress=False)
    seconds = time.perf_counter() - start
    _, grid = encoder.encode(__import__("numpy").zeros((1, 224, 224, 3), "uint8"), tokens=True)
    token_bytes = 3 * grid[0].size * 2  # float16, 3 views
    out = {"case": case, "spots": spots, "seconds": round(seconds, 1), "spots_per_s": round(spots / seconds, 2),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
           "cache_mb_per_1000_spots": round((tmp / "emb.h5").stat().st_size / spots * 1000 / 1e6, 1),
           "token_bytes_per_spot_uncompressed": token_bytes, "grid": list(grid.shape[1:]),
           "pooled_dim": encoder.dim, "device": str(encoder.device)}
    if batch == "auto":  # the size the stage chose (m2ost.learn.features.sizing), for the record
        from m2ost.learn.features.sizing import auto_batch_size

        out["batch"] = auto_batch_size(encoder, tokens=True)
    if encoder.device.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() // 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spots", type=int, default=32, help="spots of the EfficientNet-Lite0 case")
    p.add_argument("--vit-spots", type=int, default=8, help="spots of the ViT-L cases")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="auto", help="encoder.batch_size (auto: from the free memory)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    args = p.parse_args()
    batch = args.batch if args.batch == "auto" else int(args.batch)
    if args.one:
        spots = args.spots if args.one == "lite0" else args.vit_spots
        print(json.dumps(run_case(args.one, Path(args.bundle), spots, args.device, batch)))
        return
    from common import load_average
    from her2st_views import write_section_bundle

    tmp = Path(tempfile.mkdtemp(prefix="embed_bench_"))
    for n in sorted({args.spots, args.vit_spots}):  # the spots, cut from the section (not timed)
        write_section_bundle(tmp / f"B4_{n}.h5", "B4", n, size=224)
    for case in args.cases:
        n = args.spots if case == "lite0" else args.vit_spots
        child = subprocess.run([sys.executable, __file__, "--one", case, "--spots", str(args.spots),
                                "--vit-spots", str(args.vit_spots), "--device", args.device, "--batch", args.batch,
                                "--bundle", str(tmp / f"B4_{n}.h5")], capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result["load_average"] = load_average()
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
