"""Throughput of a foundation-model encoder: tiles/s, megapixels/s, achieved FLOP/s and the
ratio of that to a matmul probe run in the same process (how close the encoder gets to
what the hardware does on its best kernel).

    python benchmarks/encoder_throughput.py --encoder uni --random-weights --device cpu --tiles 4

Prints one JSON line. A tile is one window of the encoder (224 px for uni) unless
``--tile-sp`` says otherwise. FLOPs per tile are counted by
``torch.utils.flop_counter.FlopCounterMode`` on one forward (matmuls, convolutions and
attention; element-wise work such as LayerNorm/GELU is not counted, as usual). The probe is
a square matmul (fp32 on CPU, bf16 on GPU; the encoder's own precision on GPU is bf16
autocast) timed before and after the encoder run; ``flops_ratio`` uses their mean, so
other load on the machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from histosr.benchmark.speed import count_flops, matmul_probe, sync_device


def count_tile_flops(enc, tile) -> int:
    """FLOPs of one embed_tiles call on ``tile`` (1, T, T, 3), by FlopCounterMode."""
    import torch

    with count_flops() as fc, torch.inference_mode():
        enc.embed_tiles(tile)
    return fc["total"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default="uni")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of the same architecture (no checkpoint needed)")
    p.add_argument("--weights", help="checkpoint path (default: $HISTOSR_WEIGHTS_DIR)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16, fp16")
    p.add_argument("--tiles", type=int, default=4)
    p.add_argument("--tile-sp", type=int, help="tile side in superpixels (default: a window)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from histosr.features import get_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(device=args.device, precision=args.precision, batch_size=args.batch_size)
    if args.random_weights:
        kw["random_init"] = True
    elif args.weights:
        kw["weights"] = args.weights
    t0 = time.perf_counter()
    enc = get_encoder(args.encoder, **kw)
    build_s = time.perf_counter() - t0
    if args.compile:
        for attr in ("model", "vit256"):
            if hasattr(enc, attr):
                setattr(enc, attr, torch.compile(getattr(enc, attr)))
    tile_sp = args.tile_sp or enc.window_sp
    T = tile_sp * 16
    rng = np.random.default_rng(0)
    tiles = np.clip(rng.normal([200, 140, 190], 30, (args.tiles, T, T, 3)), 0, 255)
    tiles = tiles.astype(np.uint8)

    flops_tile = count_tile_flops(enc, tiles[:1])
    enc.embed_tiles(tiles[:1])  # warm-up (allocator, oneDNN/cuBLAS plans, compile)
    probe0 = matmul_probe(enc.device)
    sync_device(enc.device)
    t0 = time.perf_counter()
    out = enc.embed_tiles(tiles)
    sync_device(enc.device)
    dt = time.perf_counter() - t0
    probe1 = matmul_probe(enc.device)
    assert out.shape == (args.tiles, tile_sp, tile_sp, enc.dim)
    probe = 0.5 * (probe0 + probe1)
    achieved = flops_tile * args.tiles / dt
    dev = enc.device
    device_name = (torch.cuda.get_device_name(0) if dev.startswith("cuda")
                   else platform.processor() or platform.machine())
    rec = {
        "encoder": enc.name, "weights": enc.meta.get("weights_sha256") or "random",
        "device": dev, "device_name": device_name, "precision": enc.precision,
        "threads": torch.get_num_threads(), "tiles": args.tiles, "tile_px": T,
        "batch_size": args.batch_size, "compile": bool(args.compile),
        "seconds": round(dt, 3), "tiles_per_s": round(args.tiles / dt, 4),
        "megapixels_per_s": round(args.tiles * T * T / dt / 1e6, 4),
        "gflop_per_tile": round(flops_tile / 1e9, 2),
        "achieved_gflops": round(achieved / 1e9, 2),
        "probe_gflops": round(probe / 1e9, 2),
        "probe_gflops_before_after": [round(probe0 / 1e9, 2), round(probe1 / 1e9, 2)],
        "flops_ratio": round(achieved / probe, 3),
        "build_s": round(build_s, 2), "torch": torch.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(),
    }
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
