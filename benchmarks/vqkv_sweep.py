"""Sweep of VQKV's decode-kernel tile parameters (positions per tile, warps) against FA3 on one GPU.

Each (batch, context) is timed for FA3 bf16 (the baseline, same process, same cache layout) and
for VQKV at every ``--block-n`` x ``--warps`` pair, one layer's call in a CUDA graph, caches rotated
over enough layers to defeat L2 (``benchmarks.kernels``' timing). The fastest pair over all shapes
(geometric mean of the time ratio to FA3) is what ``kvfold.attention_backends.vqkv.kernels`` uses.

    python -m benchmarks.vqkv_sweep --out docs/benchmarks/vqkv-kernel-sweep-h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import env_info
from benchmarks.kernels import MAX_LAYERS, ROTATE_TARGET_BYTES, Shape, build_fa3, build_vqkv, time_calls
from benchmarks.kernels import parse_ints as parse_sizes
from benchmarks.model_dirs import load_config
from kvfold.attention_backends.vqkv import kernels as vqkv_kernels


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--contexts", default="4k,32k")
    p.add_argument("--block-n", default="16,32,64")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def layers_for(bytes_per_layer: int) -> int:
    return max(1, min(MAX_LAYERS, math.ceil(ROTATE_TARGET_BYTES / max(bytes_per_layer, 1))))


def timed(build, layers: int, device: torch.device, args: argparse.Namespace) -> float:
    calls = [build()[0] for _ in range(layers)]
    times, _, _ = time_calls(calls, device, args.iters, args.repeats)
    return min(times)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda")
    config = load_config(args.model)
    shape = Shape(config["num_attention_heads"], config["num_key_value_heads"],
                  config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    pairs = [(b, w) for b in parse_sizes(args.block_n) for w in parse_sizes(args.warps)]
    rows = []
    started = time.monotonic()
    sizes = [(b, c) for b in parse_sizes(args.batches) for c in parse_sizes(args.contexts)]
    for batch, context in tqdm(sizes, desc="sizes"):
        dense = shape.kv_bytes(batch * context)
        row = {"batch": batch, "context": context,
               "fa3_us": timed(lambda: build_fa3(shape, batch, context, device), layers_for(dense), device, args),
               "vqkv_us": {}}
        coded = dense * 32 // (4 * shape.head_dim)
        for block_n, warps in pairs:
            vqkv_kernels.BLOCK_N, vqkv_kernels.NUM_WARPS = block_n, warps
            try:
                us = timed(lambda: build_vqkv(shape, batch, context, device), layers_for(coded), device, args)
            except Exception as exc:  # noqa: BLE001 (a pair that does not compile is recorded)
                row["vqkv_us"][f"{block_n}x{warps}"] = f"failed: {exc!r}"[:300]
                continue
            row["vqkv_us"][f"{block_n}x{warps}"] = round(us, 2)
        rows.append(row)
        tqdm.write(json.dumps(row))
    scores = {}
    for block_n, warps in pairs:
        key = f"{block_n}x{warps}"
        ratios = [r["vqkv_us"][key] / r["fa3_us"] for r in rows if isinstance(r["vqkv_us"].get(key), float)]
        if len(ratios) == len(rows):
            scores[key] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    result = {"kind": "vqkv_kernel_sweep", "model": args.model, "shape": shape.__dict__,
              "environment": env_info.collect(), "rows": rows,
              "geomean_ratio_to_fa3": {k: round(v, 3) for k, v in scores.items()},
              "best": min(scores, key=scores.get) if scores else None,
              "elapsed_s": round(time.monotonic() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"best": result["best"], "geomean": result["geomean_ratio_to_fa3"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
