"""The whole engine's decode step, served in-process: where a served step's time goes.

``benchmarks/decode_step.py`` times one attention layer; a served step adds the rest of the model,
vLLM's scheduler and sampler, and every layer's host work. This runs vLLM's ``LLMEngine`` in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) at a real model's shape with dummy weights, eager:
``--requests`` prompts of ``--context`` random tokens are prefilled (``--chunk`` tokens a step),
then the engine is stepped by hand with every request decoding, so each timed ``step()`` is one
decode-only step at exactly that batch. A few steps run under ``torch.profiler`` (kernel and host
tables). One backend per process, so each starts on a fresh GPU:

    python -m benchmarks.engine_step --backend KVFOLD_VQKV --requests 16 --context 32000 \\
        --out /tmp/vqkv-16.json
    python -m benchmarks.engine_step --summarize /tmp/*-16.json /tmp/*-48.json --out docs/...json
        # also writes the plot next to it (.png)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any


def decode_rate(result: dict[str, Any]) -> float:
    """Output tokens per second of the run's decode steps: every request gains one token a step."""
    return result["requests"] / (result["decode_step_median_ms"] / 1e3)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One record of several runs, with each kvfold run's step and rate against the FLASH_ATTN run
    of the same batch (``vs_flash_attn_same_batch``) and the FLASH_ATTN run of the most requests
    (``rate_vs_flash_attn_largest``: its capacity when that run filled its KV cache)."""
    dense = {r["requests"]: r for r in results if r["backend"] == "FLASH_ATTN"}
    largest = dense[max(dense)] if dense else None
    rows = []
    for r in results:
        row = {k: r[k] for k in ("backend", "requests", "context", "decode_step_median_ms", "kv_cache_tokens")
               if k in r}
        row["decode_tok_per_s"] = decode_rate(r)
        if r["backend"] != "FLASH_ATTN":
            if r["requests"] in dense:
                row["vs_flash_attn_same_batch"] = (r["decode_step_median_ms"]
                                                   / dense[r["requests"]]["decode_step_median_ms"])
            if largest is not None:
                row["rate_vs_flash_attn_largest"] = decode_rate(r) / decode_rate(largest)
        rows.append(row)
    return {"summary": rows, "runs": results}


def plot(record: dict[str, Any], out: Path) -> None:
    """Decode step and decode rate against requests, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for backend in sorted({r["backend"] for r in record["summary"]}):
        rows = sorted((r for r in record["summary"] if r["backend"] == backend), key=lambda r: r["requests"])
        n = [r["requests"] for r in rows]
        axes[0].plot(n, [r["decode_step_median_ms"] for r in rows], "o-", label=backend)
        axes[1].plot(n, [r["decode_tok_per_s"] for r in rows], "o-", label=backend)
    context = record["summary"][0]["context"]
    axes[0].set(xlabel="requests decoding", ylabel="engine decode step, median (ms)",
                title=f"whole-engine decode step, {context}-token prompts")
    axes[1].set(xlabel="requests decoding", ylabel="output tokens/s", title="decode rate")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model runs in this process
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    from benchmarks import env_info
    from benchmarks.model_dirs import load_config, prepare, write_shape_codebooks

    model_dir = args.model_dir or prepare(args.model, Path(args.work_dir) / "model")
    extra: dict[str, Any] = {}
    if args.backend == "KVFOLD_VQKV":
        books = Path(model_dir) / "vqkv_codebooks"
        if not (books / "vqkv.json").is_file():
            write_shape_codebooks(load_config(model_dir), books)
        extra["additional_config"] = {"kvfold": {"codebooks": str(books)}}
    llm = LLM(str(model_dir), load_format="dummy" if args.model_dir is None else "auto",
              attention_backend=args.backend, enforce_eager=True, max_model_len=args.context + 1024,
              max_num_batched_tokens=args.chunk, max_num_seqs=max(args.requests, 16),
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False, **extra)
    engine = llm.llm_engine
    vocab = engine.model_config.get_vocab_size()
    rng = random.Random(0)
    for i in range(args.requests):
        prompt = {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(args.context)]}
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=args.warmup + args.steps + args.profile_steps
                                                          + 8, ignore_eos=True, temperature=0))
    t0 = time.perf_counter()
    started: set[str] = set()
    prefill_steps = 0
    while len(started) < args.requests:
        prefill_steps += 1
        started.update(o.request_id for o in engine.step() if o.outputs and o.outputs[0].token_ids)
    result: dict[str, Any] = {
        "backend": args.backend, "model": args.model if args.model_dir is None else str(args.model_dir),
        "requests": args.requests, "context": args.context, "chunk": args.chunk,
        "prefill_s": time.perf_counter() - t0, "prefill_steps": prefill_steps,
        "kv_cache_tokens": engine.vllm_config.cache_config.num_gpu_blocks * engine.vllm_config.cache_config.block_size,
        "environment": env_info.collect(),
    }

    def timed(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            engine.step()
            times.append(1e3 * (time.perf_counter() - start))
        return times

    result["warmup_steps_ms"] = timed(args.warmup)
    result["decode_steps_ms"] = timed(args.steps)
    result["decode_step_median_ms"] = statistics.median(result["decode_steps_ms"])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed(args.profile_steps)
    events = prof.key_averages()
    result["profile_steps"] = args.profile_steps
    result["profile_cuda_table"] = events.table(sort_by="cuda_time_total", row_limit=35, max_name_column_width=70)
    result["profile_cpu_table"] = events.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70)
    from kvfold.attention_backends.paged import graphs

    result["kvfold_cuda_graphs"] = {"count": graphs._graphs, "held_mib": graphs._held_bytes / 2**20,
                                    "cap_reached": graphs._cap_reported, "headroom_reached": graphs._room_reported}
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", help="attention backend (one per process)")
    p.add_argument("--model", default="llama-3.1-8b", help="model shape under benchmarks/models (dummy weights)")
    p.add_argument("--model-dir", help="a model directory with real weights instead of --model")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--context", type=int, default=32000, help="prompt tokens per request")
    p.add_argument("--chunk", type=int, default=8192, help="--max-num-batched-tokens")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--work-dir", default="/tmp/engine-step")
    p.add_argument("--summarize", nargs="+", type=Path, help="combine earlier results instead of running")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not args.summarize and not args.backend:
        p.error("--backend is required unless --summarize")
    if args.requests < 1 or args.context < 1 or args.steps < 1:
        p.error("--requests, --context and --steps must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        record = summarize([json.loads(p.read_text()) for p in args.summarize])
    else:
        record = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    if args.summarize:
        plot(record, args.out.with_suffix(".png"))
    for row in record.get("summary", [record]):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
               if not isinstance(v, (dict, list)) and not k.startswith("profile")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
