"""VQKV's prefill chunk at a real attention shape, without vLLM's engine: what rebuilding the past
costs next to the attention itself.

A chunk of a long prompt attends to all earlier tokens of its request, which VQKV holds as codes. For
one layer of Llama-3.1-8B's attention (the shape, codebooks and paged cache of
``benchmarks.vqkv_kernel``: 32 query / 8 KV heads, head dim 128, bf16, VQKV's default code layout) and
a request with ``context`` cached tokens, each chunk is timed three ways, on the device (CUDA events):

* ``torch_past_ms``: the torch path (``past.read_past``: gather cells, float32 embedding-bag rebuild,
  exact ring patched in; then the concatenation with the chunk and the bf16 copies);
* ``triton_past_ms``: ``past.past_into`` into the bf16 K/V buffer and the chunk copied after it,
  what the backend runs on CUDA;
* ``attention_ms``: the chunk's causal attention over past + chunk (vLLM's flash attention when
  importable, as the backend calls it; torch SDPA's flash kernel over GQA-expanded K/V otherwise):
  what a dense backend's prefill spends on attention for the same chunk;
* ``write_ms``: the chunk's write into the cache as the backend does it on CUDA (``encode_into``:
  every token's codes; ``ring.write_ring``: the exact copies the ring keeps).

The two pasts are compared (largest difference after bf16 rounding). Ratios are against the
attention in the same run.

    python -m benchmarks.vqkv_prefill --contexts 4096,16384,32768 --out docs/benchmarks/vqkv-prefill-h100.json
    TRITON_INTERPRET=1 python -m benchmarks.vqkv_prefill --device cpu --contexts 600 --chunk 64 \\
        --repeats 1 --out /tmp/vqkv-prefill.json   # a smoke test in Triton's interpreter
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import vqkv_kernel as vk
from kvfold.attention_backends.vqkv import encode as vq_encode
from kvfold.attention_backends.vqkv import kernels, past, ring

SETTINGS = ("BLOCK_T", "NUM_WARPS", "BOOK_16BIT")  # past.py's, for --set


def flash_attention() -> tuple[str, Callable[..., torch.Tensor]]:
    """(name, fn(query, key, value, scale, computed)) of the attention the backend's prefill runs."""
    try:
        from kvfold.attention_backends.paged.attention import prefill_attention
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func  # noqa: F401

        return "vllm flash_attn_varlen_func", prefill_attention
    except Exception:  # no vLLM on this machine: torch's flash kernel, same FLOPs
        pass

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, computed: int):
        group = query.shape[1] // key.shape[1]
        q = query.transpose(0, 1)[None]
        k = key.repeat_interleave(group, 1).transpose(0, 1)[None]
        v = value.repeat_interleave(group, 1).transpose(0, 1)[None]
        mask = None
        if query.device.type != "cuda" or computed:  # bottom-right causal: the chunk's rows are last
            mask = torch.arange(key.shape[0], device=q.device)[None, :] <= (
                torch.arange(query.shape[0], device=q.device)[:, None] + computed)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)[0].transpose(0, 1)

    return "torch sdpa (GQA expanded)", sdpa


def run(args: argparse.Namespace) -> dict:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    contexts = [int(c) for c in args.contexts.split(",")]
    shape_args = argparse.Namespace(key_stages=args.key_stages, value_stages=args.value_stages,
                                    value_groups=args.value_groups, sink=args.sink, recent=args.recent,
                                    context=max(contexts) + args.chunk)
    cache, tables, layout, books = vk.build(shape_args, 1, dev)
    row = tables[0]
    assert past.usable(cache, layout, torch.bfloat16)
    name, attention = flash_attention()
    timer = vk.cuda_ms if cuda else vk.wall_ms
    g = torch.Generator(device=dev).manual_seed(2)
    chunk = args.chunk
    query = torch.randn(chunk, vk.HEADS, vk.HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
    key = torch.randn(chunk, vk.KV_HEADS, vk.HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
    value = torch.randn_like(key)
    scale = vk.HEAD_DIM**-0.5
    report: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "shape": {"heads": vk.HEADS, "kv_heads": vk.KV_HEADS, "head_dim": vk.HEAD_DIM, "dtype": "bfloat16"},
        "chunk": chunk, "attention": name,
        "settings": {"sink": args.sink, "recent": args.recent, "key_stages": args.key_stages,
                     "value_stages": args.value_stages, "value_groups": args.value_groups,
                     "num_codes": layout.num_codes, **{name: getattr(past, name) for name in SETTINGS}},
        "contexts": {},
    }
    for computed in contexts:
        total = computed + chunk

        def torch_past() -> tuple[torch.Tensor, torch.Tensor]:
            past_k, past_v = past.read_past(cache, row, computed, layout, books)
            k = torch.cat([past_k, key.float()]).to(torch.bfloat16)
            v = torch.cat([past_v, value.float()]).to(torch.bfloat16)
            return k, v

        def triton_past() -> tuple[torch.Tensor, torch.Tensor]:
            k = key.new_empty(total, vk.KV_HEADS, vk.HEAD_DIM)
            v = value.new_empty(total, vk.KV_HEADS, vk.HEAD_DIM)
            past.past_into(cache, row, computed, layout, books, k, v)
            k[computed:], v[computed:] = key, value
            return k, v

        request = torch.zeros(chunk, dtype=torch.long, device=dev)
        positions = computed + torch.arange(chunk, device=dev)
        kept = (positions >= total - layout.recent).nonzero().flatten()

        def write() -> None:
            vq_encode.encode_into(cache, tables, request, positions, layout.reserved_blocks, key, value, books)
            ring.write_ring(cache, tables, request, positions, kept, key, value, layout)

        k_t, v_t = torch_past()
        k_f, v_f = triton_past()
        diff = max(float((k_t.float() - k_f.float()).abs().max()), float((v_t.float() - v_f.float()).abs().max()))
        attention(query, k_f, v_f, scale, computed)  # compiles / warms up
        entry = {
            "max_abs_diff_bf16": diff,
            "torch_past_ms": vk.summary(timer(torch_past, args.repeats)),
            "triton_past_ms": vk.summary(timer(triton_past, args.repeats)),
            "attention_ms": vk.summary(timer(lambda: attention(query, k_f, v_f, scale, computed), args.repeats)),
            "write_ms": vk.summary(timer(write, args.repeats)),
            # What past_into must move: the codes once, the bf16 K/V once.
            "past_bytes": computed * vk.KV_HEADS * (layout.num_codes + 2 * 2 * vk.HEAD_DIM),
        }
        med = {k: entry[k]["median"] for k in ("torch_past_ms", "triton_past_ms", "attention_ms", "write_ms")}
        entry["triton_speedup_vs_torch"] = med["torch_past_ms"] / med["triton_past_ms"]
        entry["triton_past_vs_attention"] = med["triton_past_ms"] / med["attention_ms"]
        entry["torch_past_vs_attention"] = med["torch_past_ms"] / med["attention_ms"]
        entry["triton_past_GB_per_s"] = entry["past_bytes"] / med["triton_past_ms"] / 1e6
        # The chunk's attention work as the backend does it, against a dense backend's attention.
        entry["chunk_vs_attention"] = (med["triton_past_ms"] + med["attention_ms"] + med["write_ms"]) / med["attention_ms"]
        report["contexts"][str(computed)] = entry
        print(json.dumps({computed: entry}), flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="4096,16384,32768", help="cached tokens before the chunk")
    p.add_argument("--chunk", type=int, default=1024, help="the serving benchmark's --max-num-batched-tokens")
    p.add_argument("--sink", type=int, default=vk.SINK)
    p.add_argument("--recent", type=int, default=vk.RECENT)
    p.add_argument("--key-stages", type=int, default=vk.DEFAULT_KEY_STAGES)
    p.add_argument("--value-stages", type=int, default=vk.DEFAULT_VALUE_STAGES)
    p.add_argument("--value-groups", type=int, default=vk.DEFAULT_VALUE_GROUPS)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help=f"a past.py setting for this run: one of {', '.join(SETTINGS)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for pair in args.set:
        name, _, raw = pair.partition("=")
        if name not in SETTINGS or not raw:
            raise SystemExit(f"--set {pair}: expected NAME=VALUE with NAME in {SETTINGS}")
        setattr(past, name, raw.lower() == "true" if raw.lower() in ("true", "false") else int(raw))
    if not kernels.triton_enabled(torch.device(args.device)):
        raise SystemExit("past_into needs CUDA or TRITON_INTERPRET=1")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
