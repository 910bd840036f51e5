"""VQKV's decode step at a real attention shape, kernel by kernel, without vLLM.

One layer of Llama-3.1-8B's attention (32 query heads, 8 KV heads, head dim 128, bf16, block size
16) with VQKV's defaults (``VQKVOptions``: 4 sink and 508 recent tokens kept exact; ``kvfold
calibrate vqkv``: 8 stages per key RoPE branch and 16 value stages of 256 codewords, so 32 one-byte
codes per token and KV head) on random codebooks built here, in a paged cache laid out as the
backend lays it out (each request's reserved blocks holding its exact ring first, then its position
blocks). Every request holds ``--context`` tokens of random (valid) codes and exact ring entries of
random bf16 K/V; each step decodes one token per request through ``decode.decode_step``, the
function the backend's decode path runs (inside a CUDA graph there): ADC tables, the Triton split
and merge kernels over the coded middle, the exact sink/recent tokens in torch, and the merge of
the two softmaxes. The backend writes the new token's codes and its exact ring copy after
attention, outside ``decode_step``; that write (encode kernel, scatter of codes and ring entry) is
timed on its own. Outputs are not checked against a model here (``tests/test_vqkv_kernels.py``
does that); the first batch compares the kernel with its torch specification on these codes.

Reported per batch: milliseconds of the step (host included; eager and replayed as a CUDA graph),
each kernel's device time from the profiler, the bytes the step must read (codes of every coded
token, the exact ring's cells, the codebooks) and the achieved bandwidth on them, the split
kernel's own bytes and its L2 gathers (the value codewords it sums per token), the launch plan,
and, measured in the same run, a dense bf16 decode over the same batch and context with PyTorch's
scaled-dot-product attention: what reading every token's full K and V costs on this GPU. Compiled
kernels' registers, spills and shared memory come from the objects Triton's launches return.

    python -m benchmarks.vqkv_kernel --batches 1,16,64 --out docs/benchmarks/vqkv-kernel-h100.json
    TRITON_INTERPRET=1 python -m benchmarks.vqkv_kernel --device cpu --context 600 --batches 1,2 \\
        --steps 2 --out /tmp/vqkv-kernel.json   # a smoke test: Triton's interpreter, wall-clock times

Imports only torch, Triton and kvfold's VQKV modules that need neither vLLM nor pydantic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvfold.attention_backends.vqkv import encode as vq_encode
from kvfold.attention_backends.vqkv import kernels, ring
from kvfold.attention_backends.vqkv.calibrate import (
    DEFAULT_KEY_STAGES,
    DEFAULT_VALUE_GROUPS,
    DEFAULT_VALUE_STAGES,
)
from kvfold.attention_backends.vqkv.decode import decode_step
from kvfold.attention_backends.vqkv.pages import PageLayout, write_cells
from kvfold.attention_backends.vqkv.reference import (
    CODEBOOK_SIZE,
    LayerCodebooks,
    ResidualCodebook,
    rope_branches,
    value_groups,
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
# VQKVOptions' defaults (options.py imports pydantic; tests/test_benchmarks.py checks they agree).
SINK, RECENT = 4, 508
# backend.py's (it imports vLLM; the test checks they agree): the longest coded range is rounded up
# to LONGEST_STEP and block-table rows padded to TABLE_COLUMNS columns, as the backend calls it.
LONGEST_STEP, TABLE_COLUMNS = 1024, 64
KERNEL_SETTINGS = ("BLOCK_N", "NUM_WARPS", "TARGET_PROGRAMS", "VECTOR_GATHER", "EXACT_KEY_ROWS", "HEADS_INNER",
                   "SMALL_BATCH", "ring.BLOCK_E", "ring.NUM_WARPS", "ring.RING_SPLITS")


def random_books(key_stages: int, value_stages: int, dev: torch.device, seed: int = 0,
                 groups: int = 1) -> LayerCodebooks:
    """Random codebooks of the model's shape (``model_dirs.write_shape_codebooks``'s, in memory),
    float32 on ``dev`` as the backend holds them; scaled so a reconstruction has unit variance."""
    g = torch.Generator().manual_seed(seed)

    def book(dims: torch.Tensor, stages: int) -> ResidualCodebook:
        words = torch.randn(stages, CODEBOOK_SIZE, dims.numel(), generator=g) * stages**-0.5
        return ResidualCodebook(dims.to(dev), words.to(dev))

    key = [book(d, key_stages) for d in rope_branches(HEAD_DIM)]
    value = [book(dims, value_stages) for dims in value_groups(HEAD_DIM, groups)]
    return LayerCodebooks(HEAD_DIM, HEAD_DIM, key, value)


def coded_length(layout: PageLayout, computed: int) -> int:
    """Positions of a request with ``computed`` cached tokens that the kernel reads from codes."""
    return max(computed - layout.recent - min(layout.sink, computed), 0)


def build(args: argparse.Namespace, reqs: int, dev: torch.device
          ) -> tuple[torch.Tensor, torch.Tensor, PageLayout, LayerCodebooks]:
    """(cache, block table, layout, codebooks) of one layer with ``reqs`` requests of ``context``
    cached tokens and room for the next, each owning a contiguous block range after vLLM's null
    block (its reserved blocks first)."""
    books = random_books(args.key_stages, args.value_stages, dev, groups=args.value_groups)
    layout = PageLayout(books.num_codes, HEAD_DIM, HEAD_DIM, torch.bfloat16, args.sink, args.recent, BLOCK)
    if coded_length(layout, args.context) <= 0:
        raise SystemExit(f"--context {args.context} leaves nothing coded beyond {args.sink} sink and "
                         f"{args.recent} recent tokens; use a longer one")
    per_req = layout.reserved_blocks + -(-(args.context + 1) // BLOCK)
    g = torch.Generator(device=dev).manual_seed(0)
    cache = torch.randint(0, CODEBOOK_SIZE, (1 + reqs * per_req, KV_HEADS, BLOCK, layout.num_codes),
                          dtype=torch.uint8, device=dev, generator=g)  # every code a valid index
    tables = (1 + torch.arange(reqs * per_req, device=dev, dtype=torch.int32)).view(reqs, per_req)
    tables = torch.nn.functional.pad(tables, (0, -per_req % TABLE_COLUMNS))  # null-block columns
    # The exact ring: finite bf16 K/V in every entry (random bytes would read as NaNs), written as
    # the backend writes it, a few requests at a time.
    entries = torch.arange(layout.ring_entries, device=dev)
    for r0 in range(0, reqs, 8):
        rows = tables[r0 : r0 + 8]
        blocks, slots = layout.ring_cells(rows, entries.expand(rows.shape[0], -1))
        k = torch.randn(blocks.shape[0] * layout.ring_entries, KV_HEADS, HEAD_DIM, device=dev,
                        dtype=torch.bfloat16, generator=g)
        write_cells(cache, blocks, slots, layout.pack_exact(k, torch.randn_like(k)))
    return cache, tables, layout, books


def write_token(cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, layout: PageLayout, books: LayerCodebooks) -> None:
    """``backend.write_step`` for one decoded token per request: its codes, and its exact copy in
    the ring (a new token is always among the recent ones when the ring has any)."""
    if kernels.triton_enabled(key.device) and ring.usable(key, cache, layout):  # as the backend does
        request = torch.arange(rows.shape[0], device=key.device)
        vq_encode.encode_into(cache, rows, request, positions, layout.reserved_blocks, key, value, books)
        if layout.recent:
            ring.write_ring(cache, rows, request, positions, request, key, value, layout)
        return
    blocks, slots = layout.code_cells(rows, positions)
    write_cells(cache, blocks, slots, vq_encode.encode(key, value, books))
    if layout.recent:
        blocks, slots = layout.ring_cells(rows, layout.ring_index(positions))
        write_cells(cache, blocks, slots, layout.pack_exact(key, value))


def cuda_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def wall_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    """Host milliseconds (CPU runs: everything is synchronous there)."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "steps": len(times)}


def kernel_times(fn: Callable[[], object], steps: int) -> tuple[dict[str, float], list[list]]:
    """Device milliseconds per step by kernel family (Triton kernels by name, cuBLAS GEMMs, the rest
    grouped as torch glue), and the five costliest glue kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    families: dict[str, float] = defaultdict(float)
    glue: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if not device_us or event.key.startswith("aten::"):
            continue  # aten ops are host-side wrappers; their kernels are listed under their own names
        name, ms = event.key, device_us / 1e3 / steps
        if name.startswith("_"):
            families[name] += ms
        elif any(word in name.lower() for word in ("gemm", "cutlass", "xmma", "cublas")):
            families["gemm"] += ms
        else:
            families["torch glue"] += ms
            glue[name[:100]] += ms
    top = sorted(glue.items(), key=lambda kv: -kv[1])[:5]
    return dict(sorted(families.items(), key=lambda kv: -kv[1])), [[n, round(ms, 5)] for n, ms in top]


# Compiled kernels of the launches (the objects Triton's JITFunction.run returns), by name and the
# constexprs that tell their variants apart.
_LAUNCHED: dict[str, Any] = {}
_VARIANT_KEYS = ("STAGES", "DB", "BLOCK_M", "BLOCK_N", "BLOCK_S")


def record_launches() -> None:
    """Wrap the VQKV kernels' ``run`` so each launch's compiled kernel is kept (CUDA only: the
    interpreter compiles nothing)."""
    jitted = dict(zip(("_decode_split", "_merge_splits"), kernels._kernels()))
    jitted["_encode_residual"] = vq_encode._kernel()
    for name, fn in jitted.items():
        if getattr(fn, "_vqkv_bench_wrapped", False):
            continue
        original = fn.run

        def run(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            kernel = _original(*args, **kwargs)
            if kernel is not None:
                variant = ",".join(f"{k}={kwargs[k]}" for k in _VARIANT_KEYS if k in kwargs)
                _LAUNCHED[f"{_name}[{variant}]" if variant else _name] = kernel
            return kernel

        fn.run = run
        fn._vqkv_bench_wrapped = True


def compiled_stats() -> dict[str, dict[str, int]]:
    stats = {}
    for name, kernel in sorted(_LAUNCHED.items()):
        fields = {"n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
                  "shared": getattr(getattr(kernel, "metadata", None), "shared", None),
                  "num_warps": getattr(getattr(kernel, "metadata", None), "num_warps", None),
                  "num_stages": getattr(getattr(kernel, "metadata", None), "num_stages", None)}
        stats[name] = {k: int(v) for k, v in fields.items() if v is not None}
    return stats


def step_bytes(layout: PageLayout, books: LayerCodebooks, reqs: int, computed: int) -> dict[str, int]:
    """What a decode step of ``reqs`` requests with ``computed`` cached tokens each must read.

    ``must_read``: every coded token's codes, the exact ring's cells (sink and recent entries, read
    whole) and the codebooks as the kernels read them (the key codebooks as the float32 matrix of
    the ADC-table GEMM, the value codebook in bf16). ``split_kernel``: what the split kernel reads
    (codes, value codebook, and the ADC tables ``[R, Hq, key_codes, 256]`` float32 the GEMM writes
    each step). ``l2_gathers``: the codebook and table elements the split kernel gathers per coded
    token and KV head (every value stage's codeword row; every key code's table entry per query
    head of the group): far more than the bytes above, served by L2 and L1.
    """
    coded = coded_length(layout, computed)
    codes = reqs * KV_HEADS * coded * layout.num_codes
    ring = reqs * KV_HEADS * layout.ring_entries * layout.cells_per_entry * layout.num_codes
    key_matrix = HEAD_DIM * books.key_codes * CODEBOOK_SIZE * 4
    stages = books.value[0].stages  # per group; a group's stages cover its dims only
    value_book = stages * CODEBOOK_SIZE * HEAD_DIM * 2
    tables = reqs * HEADS * books.key_codes * CODEBOOK_SIZE * 4
    group = HEADS // KV_HEADS
    gathers = reqs * KV_HEADS * coded * (stages * HEAD_DIM * 2 + books.key_codes * group * 4)
    return {"codes": codes, "ring": ring, "key_codebook_matrix": key_matrix, "value_codebook": value_book,
            "must_read": codes + ring + key_matrix + value_book, "adc_tables": tables,
            "split_kernel": codes + value_book + tables, "l2_gathers": gathers}


def launch_plan(reqs: int, longest: int) -> dict[str, int]:
    """The split kernel's grid as ``kernels.decode_attention`` chooses it for this batch."""
    block_n = kernels.block_n_for(HEAD_DIM, reqs, KV_HEADS)
    splits, chunk = kernels.num_splits_for(reqs, KV_HEADS, longest, block_n)
    return {"grid": [reqs, KV_HEADS, splits], "programs": reqs * KV_HEADS * splits, "splits": splits,
            "chunk": chunk, "tiles_per_program": chunk // block_n, "BLOCK_N": block_n,
            "BLOCK_G": max(16, kernels._pow2(HEADS // KV_HEADS)), "num_warps": kernels.NUM_WARPS,
            "longest": longest}


def dense_baseline(reqs: int, n: int, dev: torch.device, repeats: int) -> dict:
    """A bf16 decode over full K/V of the same batch and context (PyTorch SDPA)."""
    q = torch.randn(reqs, HEADS, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k = torch.randn(reqs, KV_HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def attend() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    for _ in range(3):
        attend()
    timer = cuda_ms if dev.type == "cuda" else wall_ms
    ms = statistics.median(timer(attend, repeats))
    moved = 2 * k.numel() * k.element_size()
    del k, v
    return {"ms": ms, "bytes": moved, "GB_per_s": moved / ms / 1e6}


def graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (as the backend replays its decode step)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def check_kernel(query: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, layout: PageLayout,
                 books: LayerCodebooks, computed: int, longest: int) -> dict[str, float]:
    """The kernel's coded-range attention against its torch specification, on request 0."""
    q, r = query[:1], rows[:1]
    starts = torch.full((1,), min(layout.sink, computed), device=query.device)
    ends = starts + coded_length(layout, computed)
    scale = HEAD_DIM**-0.5
    out, lse = kernels.decode_attention(q, cache, r, layout.reserved_blocks, starts, ends, books, scale,
                                        longest=longest)
    ref_out, ref_lse = kernels.decode_attention_torch(q, cache, r, layout.reserved_blocks, starts, ends,
                                                      books, scale)
    return {"max_abs_err_out": float((out - ref_out).abs().max()),
            "max_abs_err_lse": float((lse - ref_lse).abs().max()),
            "max_abs_out": float(ref_out.abs().max())}


def check_ring(step: Callable[[], torch.Tensor], out: torch.Tensor) -> dict[str, float]:
    """The step as run (exact tokens in the ring kernel where it applies) against the same step
    with the exact tokens gathered and attended in torch, as the specification does."""
    if not ring.usable(*_RING_ARGS):
        return {"ring_kernel": False}
    saved = ring.usable
    ring.usable = lambda *a: False
    try:
        want = step()
    finally:
        ring.usable = saved
    return {"ring_kernel": True, "max_abs_err": float((out - want).abs().max()),
            "max_abs_out": float(want.abs().max())}


_RING_ARGS: tuple = ()


def check_write(cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, layout: PageLayout, books: LayerCodebooks) -> dict[str, int | bool]:
    """The write as run (encode into the cells, ring copy in Triton, where they apply) against the
    torch write (codes tensor, pack_exact, scatters), on copies of the cache: bytes that differ
    (an entry's padding after its K/V bytes is left as it was by the kernel; none at 8B shape)."""
    got, want = cache.clone(), cache.clone()
    write_token(got, rows, positions, key, value, layout, books)
    saved = ring.usable
    ring.usable = lambda *a: False
    try:
        write_token(want, rows, positions, key, value, layout, books)
    finally:
        ring.usable = saved
    pad = layout.cells_per_entry * layout.num_codes - layout.exact_bytes
    return {"kernels": ring.usable(key, cache, layout), "bytes_differing": int((got != want).sum()),
            "bytes_written": int((want != cache).sum()), "pad_bytes_per_entry": pad}


def run(args: argparse.Namespace) -> dict:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not kernels.triton_enabled(dev):
        print("warning: no CUDA and TRITON_INTERPRET unset: decode_attention runs its torch "
              "specification, not the Triton kernel", flush=True)
    if cuda:
        record_launches()
    batches = [int(b) for b in args.batches.split(",")]
    cache, tables, layout, books = build(args, max(batches), dev)
    computed = args.context
    n = computed + 1  # with the new token
    longest = -(-coded_length(layout, computed) // LONGEST_STEP) * LONGEST_STEP
    timer = cuda_ms if cuda else wall_ms
    report: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "triton": __import__("triton").__version__, "triton_interpreter": interpreted,
        "kernel": "triton" if kernels.triton_enabled(dev) else "torch specification",
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK,
                  "dtype": "bfloat16"},
        "context": args.context,
        "settings": {"sink": args.sink, "recent": args.recent, "key_stages": args.key_stages,
                     "value_stages": args.value_stages, "value_groups": args.value_groups,
                     "kernel_settings": {name: getattr(ring if name.startswith("ring.") else kernels,
                                                        name.rpartition(".")[2]) for name in KERNEL_SETTINGS},
                     "codebook_size": CODEBOOK_SIZE,
                     "num_codes": layout.num_codes, "cells_per_entry": layout.cells_per_entry,
                     "reserved_blocks": layout.reserved_blocks, "coded_tokens": coded_length(layout, computed)},
        "batches": {},
    }
    g = torch.Generator(device=dev).manual_seed(1)
    for i, batch in enumerate(batches):
        q = torch.randn(batch, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(batch, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(batch, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
        rows = tables[:batch]
        seq_lens = torch.full((batch,), n, device=dev, dtype=torch.long)
        positions = torch.full((batch,), computed, device=dev, dtype=torch.long)

        global _RING_ARGS
        _RING_ARGS = (q, cache, layout)

        def step() -> torch.Tensor:
            return decode_step(q, k, v, cache, rows, seq_lens, layout, books, HEAD_DIM**-0.5, longest=longest)

        def write() -> None:
            write_token(cache, rows, positions, k, v, layout, books)

        for _ in range(2):  # compiles
            write()
            out = step()
        entry: dict = {"launch_plan": launch_plan(batch, longest),
                       "outputs_finite": bool(torch.isfinite(out).all())}
        if i == 0:
            entry["check_vs_torch_spec"] = check_kernel(q, cache, rows, layout, books, computed, longest)
            entry["check_step_vs_torch_ring"] = check_ring(step, out)
            entry["check_write_vs_torch"] = check_write(cache, rows, positions, -k, -v, layout, books)
        entry["decode_ms"] = summary(timer(step, args.steps))
        entry["write_ms"] = summary(timer(write, args.steps))
        moved = step_bytes(layout, books, batch, computed)
        entry["bytes"] = moved
        wall = entry["decode_ms"]["median"]
        entry["must_read_GB_per_s_wall"] = moved["must_read"] / wall / 1e6
        if cuda:
            try:
                entry["decode_graph_ms"] = summary(cuda_ms(graph_replay(step), args.steps))
            except Exception as exc:  # recorded: the eager numbers stand without it
                entry["decode_graph_ms"] = {"error": repr(exc)[:500]}
            families, glue = kernel_times(step, args.profile_steps)
            entry["kernels_ms"], entry["glue_top_ms"] = families, glue
            entry["kernels_total_ms"] = sum(families.values())
            entry["write_kernels_ms"], _ = kernel_times(write, args.profile_steps)
            entry["must_read_GB_per_s_device"] = moved["must_read"] / entry["kernels_total_ms"] / 1e6
            split_ms = families.get("_decode_split")
            if split_ms:
                entry["split_kernel_GB_per_s"] = moved["split_kernel"] / split_ms / 1e6
                entry["split_kernel_l2_gather_GB_per_s"] = moved["l2_gathers"] / split_ms / 1e6
        entry["dense_sdpa"] = dense_baseline(batch, n, dev, args.steps)
        entry["decode_vs_dense"] = wall / entry["dense_sdpa"]["ms"]
        if "median" in entry.get("decode_graph_ms", {}):  # without the eager step's host time
            entry["decode_graph_vs_dense"] = entry["decode_graph_ms"]["median"] / entry["dense_sdpa"]["ms"]
        report["batches"][str(batch)] = entry
        print(json.dumps({batch: entry}), flush=True)
    report["compiled_kernels"] = compiled_stats() if cuda else {}
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--context", type=int, default=32768, help="cached tokens per request before the step")
    p.add_argument("--sink", type=int, default=SINK)
    p.add_argument("--recent", type=int, default=RECENT)
    p.add_argument("--key-stages", type=int, default=DEFAULT_KEY_STAGES, help="per key RoPE branch")
    p.add_argument("--value-stages", type=int, default=DEFAULT_VALUE_STAGES, help="per value group")
    p.add_argument("--value-groups", type=int, default=DEFAULT_VALUE_GROUPS)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help=f"a decode-kernel setting for this run, one of {', '.join(KERNEL_SETTINGS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--device", default="cuda",
                   help="cpu to smoke-test under TRITON_INTERPRET=1 (wall-clock times, no profiler)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def apply_settings(pairs: list[str]) -> None:
    """``--set NAME=VALUE``: module-level settings of ``vqkv/kernels.py`` (ints or true/false)."""
    for pair in pairs:
        name, _, raw = pair.partition("=")
        if name not in KERNEL_SETTINGS or not raw:
            raise SystemExit(f"--set {pair}: expected NAME=VALUE with NAME in {KERNEL_SETTINGS}")
        value = raw.lower() == "true" if raw.lower() in ("true", "false") else int(raw)
        module, _, attribute = name.rpartition(".")
        setattr(ring if module == "ring" else kernels, attribute, value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_settings(args.set)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["compiled_kernels"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
