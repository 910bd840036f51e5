"""FlashFourierAttention's decode step at a real attention shape, kernel by kernel, without vLLM.

One layer of Llama-3.1-8B's attention (32 query heads, 8 KV heads, head dim 128, bf16) with the
paper's settings (4 sink, 1,020 recent, k = 512, 80% of K and V dims compressed, chosen at random:
the cost depends on the shapes only) in a cache laid out as vLLM 0.32 lays it out. Every request
holds ``--context`` tokens with its middle compressed; each step decodes one token per request
through ``decode.decode_step`` (cache write, coefficient update, both FFTs, the decode pass).
The cache holds random numbers, not a prefilled prompt: outputs are not checked here
(``tests/gpu/check_fourier.py`` checks them against the specification).

Reported per batch: the step's milliseconds (host included; eager, and replayed as a CUDA graph
as the backend runs it), each kernel's device time from the
profiler, the decode pass's achieved bandwidth on the bytes it must move (kept dims of every
token, the exact ring, the middle's spectral scores in and probabilities out), and, measured in
the same run, a dense bf16 decode over the same batch and context with PyTorch's
scaled-dot-product attention (its FlashAttention kernel where it applies): what reading every
token's full K and V costs on this GPU. vLLM's own FLASH_ATTN step is ``benchmarks.decode_step``'s
baseline (that one needs vLLM).

    python -m benchmarks.fourier_kernel --batches 1,16,64 --out docs/benchmarks/fourier-kernel-h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from kvfold.attention_backends.fourier import kernels
from kvfold.attention_backends.fourier.arena import CacheArena
from kvfold.attention_backends.fourier.decode import HeadTables, decode_step, plan_step
from kvfold.attention_backends.fourier.layout import FourierLayout
from kvfold.attention_backends.fourier.selection import select
from kvfold.attention_backends.fourier.step import GraphedDecode
from kvfold.attention_backends.paged.graphs import bucket
from kvfold.attention_backends.paged.transfer import to_device

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def random_dims(fraction: float, seed: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(2, KV_HEADS, HEAD_DIM, generator=g)
    return [select(noise[0], fraction)], [select(noise[1], fraction)]


def build(args: argparse.Namespace, reqs: int, dev: torch.device) -> tuple[CacheArena, HeadTables, torch.Tensor]:
    """An arena of one layer with ``reqs`` requests of ``context + 1`` tokens, each owning a
    contiguous block range after vLLM's null block (its reserved blocks first)."""
    kd, vd = random_dims(args.fraction, seed=0)
    layout = FourierLayout(kd, vd, head_size=HEAD_DIM, head_size_v=HEAD_DIM, dtype=torch.bfloat16,
                           block_size=BLOCK, sink=args.sink, recent=args.recent, freqs=args.freqs)
    if not layout.is_compressed(args.context):
        raise SystemExit(f"--context {args.context} leaves the middle uncompressed; use a longer one")
    blocks = layout.reserved_blocks + -(-(args.context + 1) // BLOCK)
    cache = torch.empty(1 + reqs * blocks, 1, BLOCK, layout.cell_bytes, dtype=torch.uint8, device=dev)
    cache.view(torch.bfloat16).normal_()  # finite garbage: fp32 state rows read as bf16 pairs stay finite
    arena = CacheArena([cache], layout)
    rows = (1 + torch.arange(reqs * blocks, device=dev, dtype=torch.int32)).view(reqs, blocks)
    return arena, HeadTables.build(arena, 0), rows


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


def kernel_times(fn: Callable[[], object], steps: int) -> dict[str, float]:
    """Device milliseconds per step by kernel family (Triton kernels by name, the rest grouped)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    families: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if not device_us or event.key.startswith("aten::"):
            continue  # aten ops are host-side wrappers; their kernels are listed under their own names
        name = event.key
        family = name if name.startswith("_") else ("fft" if "fft" in name.lower() else "torch glue")
        families[family] += device_us / 1e3 / steps
    return dict(sorted(families.items(), key=lambda kv: -kv[1]))


def graph_step_ms(graphed: GraphedDecode, arena: CacheArena, tables: HeadTables, rows: torch.Tensor,
                  qkv: tuple[torch.Tensor, ...], n: int, window: int, repeats: int) -> dict[str, float] | None:
    """The step as the backend runs it: planned on the host, replayed as a CUDA graph
    (``step.GraphedDecode``, one for all batches as a layer has one: graphs share a memory pool,
    and dropping every graph of a pool before the next capture trips an assert in PyTorch's
    allocator); None where the capture did not happen (graph memory limits)."""
    batch = rows.shape[0]
    before = len(graphed.graphed.graphs)
    plan = plan_step(arena.layout, [n] * batch, window, bucket(batch))

    def step() -> torch.Tensor:
        inputs = (*qkv, rows, to_device(plan.per_request, rows.device))
        return graphed(arena, tables, 0, inputs, scale=HEAD_DIM**-0.5, window=window, static=plan.static)

    step()  # runs eagerly and captures
    if len(graphed.graphed.graphs) == before:
        return None
    times = cuda_ms(step, repeats)
    return {"median": statistics.median(times), "min": min(times)}


def decode_pass_bytes(arena: CacheArena, tables: HeadTables, reqs: int, n: int) -> int:
    """What the decode pass must move for ``reqs`` requests of ``n`` tokens."""
    layout = arena.layout
    kept = sum(s.width for kind in ("k", "v") for s in layout.segments[0][kind]) * layout.elem
    compressed = sum(int(d.numel()) for kind in ("k", "v") for d in layout.compressed[0][kind]) * layout.elem
    middle = layout.middle_length(n)
    return reqs * (n * kept + layout.ring_entries * compressed + 2 * HEADS * middle * 4)


def dense_baseline(reqs: int, n: int, dev: torch.device, repeats: int) -> dict:
    """A bf16 decode over full K/V of the same batch and context (PyTorch SDPA)."""
    q = torch.randn(reqs, HEADS, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k = torch.randn(reqs, KV_HEADS, n, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def attend() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    for _ in range(3):
        attend()
    ms = statistics.median(cuda_ms(attend, repeats))
    moved = 2 * k.numel() * k.element_size()
    del k, v
    return {"ms": ms, "bytes": moved, "GB_per_s": moved / ms / 1e6}


def run(args: argparse.Namespace) -> dict:
    dev = torch.device("cuda")
    batches = [int(b) for b in args.batches.split(",")]
    arena, tables, rows = build(args, max(batches), dev)
    n = args.context + 1
    window = args.context + args.max_new - arena.layout.sink - arena.layout.recent
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": __import__("triton").__version__, "context": args.context,
                    "settings": {"sink": args.sink, "recent": args.recent, "freqs": args.freqs,
                                 "compressed_fraction": args.fraction, "window": window},
                    "cell_bytes": arena.layout.cell_bytes, "dense_cell_bytes": arena.layout.dense_cell_bytes,
                    "batches": {}}
    g = torch.Generator(device=dev).manual_seed(0)
    graphed = GraphedDecode()
    for batch in batches:
        q = torch.randn(batch, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(batch, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(batch, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)

        def step() -> torch.Tensor:
            return decode_step(arena, tables, 0, q, k, v, rows[:batch], [n] * batch,
                               scale=HEAD_DIM**-0.5, window=window)

        for _ in range(2):  # compiles
            out = step()
        finite = bool(torch.isfinite(out).all())
        step_ms = cuda_ms(step, args.steps)
        families = kernel_times(step, args.profile_steps)
        moved = decode_pass_bytes(arena, tables, batch, n)
        entry = {"step_ms": {"median": statistics.median(step_ms), "min": min(step_ms)},
                 "kernels_ms": families, "outputs_finite": finite,
                 "decode_pass_bytes": moved}
        if "_decode_pass" in families:
            entry["decode_pass_GB_per_s"] = moved / families["_decode_pass"] / 1e6
        entry["graph_step_ms"] = graph_step_ms(graphed, arena, tables, rows[:batch], (q, k, v), n, window, args.steps)
        entry["dense_sdpa"] = dense_baseline(batch, n, dev, args.steps)
        entry["step_vs_dense"] = entry["step_ms"]["median"] / entry["dense_sdpa"]["ms"]
        if entry["graph_step_ms"]:
            entry["graph_step_vs_dense"] = entry["graph_step_ms"]["median"] / entry["dense_sdpa"]["ms"]
        report["batches"][str(batch)] = entry
        print(json.dumps({batch: entry}), flush=True)
    report["compiled_kernels"] = kernels.compiled_stats()
    if args.sweep:
        report["sweep"] = sweep(args, arena, tables, rows, n, window, dev)
    return report


def configs(spec: str) -> list[dict[str, int]]:
    """``"BLOCK_N=32,64 NUM_WARPS=4,8"`` -> every combination, as kernels' module settings."""
    combos: list[dict[str, int]] = [{}]
    for part in spec.split():
        name, values = part.split("=")
        if not hasattr(kernels, name):
            raise SystemExit(f"--sweep: kernels has no setting {name}")
        combos = [{**c, name: int(v)} for c in combos for v in values.split(",")]
    return combos


def sweep(args: argparse.Namespace, arena: CacheArena, tables: HeadTables, rows: torch.Tensor, n: int,
          window: int, dev: torch.device) -> list[dict]:
    """Kernel settings at ``--sweep-batch``: device time per kernel, and each setting's first
    output against the defaults' (the cache is restored before each, as a step updates it)."""
    batch = args.sweep_batch
    saved = arena.bytes.clone()
    defaults = {name: getattr(kernels, name) for name in configs(args.sweep)[0]}
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(batch, h, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=g)
               for h in (HEADS, KV_HEADS, KV_HEADS))

    def step() -> torch.Tensor:
        return decode_step(arena, tables, 0, q, k, v, rows[:batch], [n] * batch, scale=HEAD_DIM**-0.5,
                           window=window)

    results, reference = [], None
    for config in [{}] + configs(args.sweep):
        for name, value in {**defaults, **config}.items():
            setattr(kernels, name, value)
        arena.bytes.copy_(saved)
        try:
            out = step()
            if reference is None:
                reference = out
            entry = {"config": config or "defaults", "max_abs_diff_vs_defaults": (out - reference).abs().max().item()}
            step()
            entry["kernels_ms"] = kernel_times(step, args.profile_steps)
            entry["step_ms"] = statistics.median(cuda_ms(step, args.steps))
            entry["compiled_kernels"] = kernels.compiled_stats()
        except Exception as exc:  # noqa: BLE001 (a setting that does not compile is a result too)
            entry = {"config": config, "error": repr(exc)[:500]}
        print(json.dumps(entry), flush=True)
        results.append(entry)
    for name, value in defaults.items():
        setattr(kernels, name, value)
    arena.bytes.copy_(saved)
    return results


def plot(report: dict, path: Path) -> Path:
    """Per batch: the eager step, the graph-replayed step, the decode pass alone and the dense
    SDPA decode, in milliseconds (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(report["batches"])
    series = {
        "step, eager": [report["batches"][b]["step_ms"]["median"] for b in batches],
        "step, CUDA graph": [(report["batches"][b].get("graph_step_ms") or {}).get("median", float("nan"))
                             for b in batches],
        "decode pass (both launches)": [report["batches"][b]["kernels_ms"].get("_decode_pass", float("nan"))
                                        for b in batches],
        "dense bf16 SDPA": [report["batches"][b]["dense_sdpa"]["ms"] for b in batches],
    }
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(batches))], values, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("ms per layer and step")
    ax.set_title(f"FourierAttention decode step, {report['context']} tokens, {report['device']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--max-new", type=int, default=512, help="sets the Fourier window T with --context")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=1020)
    p.add_argument("--freqs", type=int, default=512)
    p.add_argument("--fraction", type=float, default=0.8, help="share of K and of V dims compressed")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--sweep", default="", help='kernel settings to try, e.g. "BLOCK_N=32,64 NUM_WARPS=4,8"')
    p.add_argument("--sweep-batch", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["compiled_kernels"]))


if __name__ == "__main__":
    main()
