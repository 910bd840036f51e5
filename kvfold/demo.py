"""``kvfold demo``: serve a small model with each backend and compare the KV capacity vLLM reports.

Every backend gets the same KV memory (``VLLM_CPU_KVCACHE_SPACE`` on CPU, the same
``--gpu-memory-utilization`` on a GPU), so the ratio of the token capacities vLLM logs is the
capacity a method buys. The baseline is vLLM's own default backend for the platform.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from kvfold.attention_backends import BACKENDS

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: a small random Llama, written here)")
    parser.add_argument("--workdir", default=".kvfold-demo", help="where the model, logs and results go")
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS), help="kvfold backends to serve")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="KV memory per server (CPU)")
    parser.add_argument("--extra", default="", help="extra `vllm serve` arguments, one string")


def run_demo(ns: argparse.Namespace) -> dict:
    from kvfold.serving import Server
    from kvfold.tiny_model import write_tiny_model

    workdir = Path(ns.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model = Path(ns.model) if ns.model else workdir / "tiny-llama"
    if not ns.model and not (model / "config.json").exists():
        print(f"writing a random 2-layer Llama (GQA 4/2, head dim 64) to {model}")
        write_tiny_model(model, max_position_embeddings=ns.max_model_len)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(ns.kv_cache_gib)}
    # Same engine settings for every backend. Prefix caching is off because TreeKV rewrites blocks;
    # the step budget bounds the chunk a request holds beside its TreeKV budget.
    common = ["--max-model-len", str(ns.max_model_len), "--enforce-eager", "--no-enable-prefix-caching",
              "--max-num-batched-tokens", "512", *ns.extra.split()]
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ and _on_cpu():
        common += ["--gpu-memory-utilization", "0.4"]  # on CPU it only gates a free-memory check
    rows = []
    for backend in [None, *ns.backends]:
        label = backend or "vLLM default"
        args = common + (["--attention-backend", backend] if backend else [])
        if backend == "KVFOLD_VQKV":
            args += ["--additional-config", json.dumps({"kvfold": {"codebooks": str(_codebooks(model, workdir))}})]
        if backend == "KVFOLD_FOURIER":
            args += ["--additional-config", json.dumps({"kvfold": {"dims": str(_fourier_dims(model, workdir))}})]
        print(f"serving with {label} ...", flush=True)
        with Server(model, args, workdir / f"serve-{backend or 'default'}.log", env=env) as server:
            capacity = server.capacity()
            text = server.complete(PROMPT, max_tokens=12)["choices"][0]["text"]
        rows.append({"backend": label, "kv_tokens": capacity.tokens,
                     "max_concurrency": capacity.max_concurrency, "sample": text})
    base = rows[0]["kv_tokens"]
    print(f"\nKV capacity at {ns.kv_cache_gib} GiB of KV memory, {ns.max_model_len}-token requests:")
    print(f"{'backend':<16}{'KV tokens':>12}{'max concurrency':>18}{'vs default':>12}")
    for row in rows:
        row["ratio"] = row["kv_tokens"] / base
        print(f"{row['backend']:<16}{row['kv_tokens']:>12,}{row['max_concurrency']:>17.2f}x"
              f"{row['ratio']:>11.2f}x")
    (workdir / "capacity.json").write_text(json.dumps(rows, indent=2))
    print(f"\nresults: {workdir / 'capacity.json'}; server logs beside it")
    return {"rows": rows}


def _codebooks(model: Path, workdir: Path) -> Path:
    """VQKV codebooks of the demo model (a quick fit: the demo shows capacity, not fidelity)."""
    from kvfold.attention_backends.vqkv.calibrate import calibrate

    out = workdir / "vqkv_codebooks"
    print(f"fitting VQKV codebooks for {model} -> {out} (resumable)")
    calibrate(model, out, num_tokens=8192, seq_len=1024, iterations=5, max_samples=8192)
    return out


def _fourier_dims(model: Path, workdir: Path) -> Path:
    """FourierAttention's compressed dims for the demo model (the paper's schedule, two sequences)."""
    from kvfold.attention_backends.fourier.calibrate import FILE, calibrate

    out = workdir / "fourier_dims"
    if not (out / FILE).exists():
        print(f"choosing FourierAttention's compressed dims for {model} -> {out}")
        calibrate(model, out, num_tokens=8192, seq_len=4096)
    return out


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
