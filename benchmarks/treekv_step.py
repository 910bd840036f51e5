"""Per-layer cost of KVFOLD_TREEKV's forward at a real model's attention shape, with a profile.

One attention layer (Llama-3.1-8B: 32 query heads, 8 KV heads, head dim 128, bf16) runs the vLLM
backend's own ``forward`` on a paged cache: each request is prefilled in chunks past the budget,
then every request decodes together. Reports milliseconds per prefill chunk and per decode step at
each batch size, and the top operations of a ``torch.profiler`` trace of each, so slow paths are
found by measurement. Multiply by the layer count for a model step.

    python -m benchmarks.treekv_step --batches 1,16,64 --out docs/benchmarks/treekv-step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.model_dirs import model_names, prepare

BLOCK = 16


def build_impl(model_dir: Path, budget: int, positions: str, max_len: int):
    from vllm.config import AttentionConfig, CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config

    from kvfold.attention_backends.treekv.backend import TreeKVImpl
    from kvfold.vllm_plugins.general import register

    register()
    config = VllmConfig(
        model_config=ModelConfig(model=str(model_dir), dtype="bfloat16", max_model_len=max_len),
        cache_config=CacheConfig(enable_prefix_caching=False),
        attention_config=AttentionConfig(backend="KVFOLD_TREEKV"),
        additional_config={"kvfold": {"budget": budget, "positions": positions}},
    )
    hf = config.model_config.hf_text_config
    heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    with set_current_vllm_config(config):
        impl = TreeKVImpl(heads, head_dim, head_dim**-0.5, kv_heads)
    return impl, heads, kv_heads, head_dim


def metadata(rows: list[tuple[int, int, int]], tables: torch.Tensor, dev: torch.device):
    """``rows``: (request, tokens before, new tokens); every request owns a contiguous block range."""
    from kvfold.attention_backends.paged.metadata import PagedMetadata

    starts, seq_lens, slots = [0], [], []
    for r, done, n in rows:
        pos = torch.arange(done, done + n, device=dev)
        slots.append(tables[r, pos // BLOCK].long() * BLOCK + pos % BLOCK)
        starts.append(starts[-1] + n)
        seq_lens.append(done + n)
    return PagedMetadata(
        num_reqs=len(rows), num_actual_tokens=starts[-1],
        query_start_loc_cpu=torch.tensor(starts), seq_lens_cpu=torch.tensor(seq_lens),
        block_table=tables[[r for r, _, _ in rows]], slot_mapping=torch.cat(slots),
        max_query_len=max(n for _, _, n in rows), max_seq_len=max(seq_lens),
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(make, repeats: int) -> list[float]:
    """Milliseconds of ``make()()`` (``make`` builds the inputs, untimed), ``repeats`` times."""
    out = []
    for _ in range(repeats):
        fn = make()
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def profile_table(make, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn = make()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run(args: argparse.Namespace) -> dict:
    from kvfold.attention_backends.treekv.pages import content_bytes

    dev = torch.device(args.device)
    model_dir = prepare(args.model, Path(tempfile.mkdtemp()) / args.model)
    batches = [int(b) for b in args.batches.split(",")]
    total = args.prompt + args.chunk + (args.decode_steps + 2) * len(batches)
    impl, heads, kv_heads, head_dim = build_impl(model_dir, args.budget, args.positions, total + 16)
    reqs = max(batches)
    blocks_per_req = -(-total // BLOCK)
    cache = torch.zeros(1 + reqs * blocks_per_req, kv_heads, BLOCK,
                        content_bytes(head_dim, head_dim, torch.bfloat16), dtype=torch.uint8, device=dev)
    tables = (1 + torch.arange(reqs * blocks_per_req, device=dev, dtype=torch.int32)).view(reqs, -1)
    done = [0] * reqs

    def step(rows: list[tuple[int, int]]):
        """The forward of one step (inputs built here, outside what is timed)."""
        md = metadata([(r, done[r], n) for r, n in rows], tables, dev)
        tokens = md.num_actual_tokens
        q = torch.randn(tokens, heads, head_dim, device=dev, dtype=torch.bfloat16)
        k = torch.randn(tokens, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
        v = torch.randn(tokens, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        for r, n in rows:
            done[r] += n
        return lambda: impl.forward(None, q, k, v, cache, md, out)

    report: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "model": args.model, "budget": args.budget,
                    "positions": args.positions, "prompt": args.prompt, "chunk": args.chunk,
                    "shape": {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}}
    chunk_ms: list[float] = []
    for r in range(reqs):  # prefill every request past its budget, one chunk per step
        while done[r] < args.prompt:
            n = min(args.chunk, args.prompt - done[r])
            chunk_ms += timed(lambda: step([(r, n)]), 1)
    report["prefill_chunk_ms"] = {"median": statistics.median(chunk_ms), "chunks": len(chunk_ms)}
    if args.profile:
        report["prefill_profile"] = profile_table(lambda: step([(0, args.chunk)]))
    report["decode_step_ms"] = {}
    for batch in batches:
        rows = [(r, 1) for r in range(batch)]
        step(rows)()  # warm-up (kernel compile for this shape)
        times = timed(lambda: step(rows), args.decode_steps)
        report["decode_step_ms"][str(batch)] = {"median": statistics.median(times), "min": min(times)}
        if args.profile and batch == max(batches):
            report[f"decode_profile_b{batch}"] = profile_table(lambda: step(rows))
        print(f"batch {batch}: decode {statistics.median(times):.2f} ms/layer", flush=True)
    print(f"prefill chunk {report['prefill_chunk_ms']['median']:.2f} ms/layer", flush=True)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.1-8b", choices=model_names())
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--positions", default="original", choices=["original", "rank"])
    p.add_argument("--prompt", type=int, default=6144)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu only to try this script")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/treekv-step.json"))
    args = p.parse_args()
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        if key.endswith("_profile") or key.startswith("decode_profile"):
            print(f"== {key}\n{value}")


if __name__ == "__main__":
    main()
