"""Per-layer decode step of kvfold backends against FLASH_ATTN at equal batch and context.

One attention layer at a real model's shape (Llama-3.1-8B: 32 query heads, 8 KV heads, head dim
128, bf16) runs each kvfold backend's own vLLM ``forward`` on its paged cache: every request is
prefilled in chunks to ``--context`` tokens, then the requests decode together, one token per
step, as in a served decode step (cache write, attention, and each backend's host-side step
bookkeeping; CUDA-graph replay where the backend uses it). The baseline, measured in the same run
on the same GPU, is what vLLM's FLASH_ATTN does for that layer: ``reshape_and_cache_flash`` of the
new token into a bf16 paged cache, then ``flash_attn_varlen_func`` over the block table.

Milliseconds are per layer; a model step multiplies them by the layer count and adds the rest of
the model (the same for every backend). ``decode_step_ms`` times one ``forward`` on fresh step
metadata, so a backend's once-per-step host work (batch planning and copies it caches in the
step's metadata for the other layers) counts whole in every number; ``decode_step_amortized_ms``
times ``--layers`` forwards on the same step's metadata (the model's layer count by default) and
divides by it, as a served step spreads that work over its layers. VQKV runs on random codebooks of the model's shape, and
FourierAttention on dims chosen at random in the paper's middle-layer shares (80% of K and V dims;
the paper's sink 4, recent 1,020, k = 512 unless given): their cost depends on the shapes, not on
the values. FourierAttention's dims file and cache arena cover every layer of a model, so it runs
on a one-layer copy of the model's config.

    python -m benchmarks.decode_step --backends KVFOLD_VQKV,KVFOLD_TREEKV --context 32768 \\
        --batches 1,8,16 --out docs/benchmarks/decode-step-h200.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.model_dirs import load_config, model_names, prepare, write_shape_codebooks

BLOCK = 16
LAYER = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
KVFOLD_BACKENDS = ("KVFOLD_VQKV", "KVFOLD_TREEKV", "KVFOLD_FOURIER")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(make: Callable[[], Callable[[], Any]], repeats: int) -> list[float]:
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


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "steps": len(times)}


def build_impl(name: str, model_dir: Path, max_len: int, options: dict[str, Any]):
    """The backend's attention impl as vLLM builds it (its options validated the same way)."""
    from vllm.config import AttentionConfig, CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config

    from kvfold.vllm_plugins.general import register

    register()
    config = VllmConfig(
        model_config=ModelConfig(model=str(model_dir), dtype="bfloat16", max_model_len=max_len),
        cache_config=CacheConfig(enable_prefix_caching=False),
        attention_config=AttentionConfig(backend=name),
        additional_config={"kvfold": options},
    )
    hf = config.model_config.hf_text_config
    heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    if name == "KVFOLD_VQKV":
        from kvfold.attention_backends.vqkv.backend import VQKVImpl as impl_class
    elif name == "KVFOLD_FOURIER":
        from kvfold.attention_backends.fourier.backend import FourierImpl as impl_class
    else:
        from kvfold.attention_backends.treekv.backend import TreeKVImpl as impl_class
    with set_current_vllm_config(config):
        impl = impl_class(heads, head_dim, head_dim**-0.5, kv_heads)
    return impl, (heads, kv_heads, head_dim)


def one_layer_model(model_dir: Path) -> Path:
    """A copy of ``model_dir`` (config and tokenizer, no weights) with one decoder layer."""
    out = Path(tempfile.mkdtemp()) / f"{model_dir.name}-1-layer"
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def paged_cache(name: str, impl: Any, shape: tuple[int, int, int], reqs: int, total: int,
                dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache, block table): every request owns a contiguous range of blocks after the null block,
    its reserved blocks (VQKV's exact ring) first, as kvfold's block managers lay them out."""
    _, kv_heads, head_dim = shape
    blocks = -(-total // BLOCK)
    if name == "KVFOLD_VQKV":
        from kvfold.attention_backends.vqkv.pages import PageLayout

        num_codes = impl.manifest.num_codes
        layout = PageLayout(num_codes, head_dim, head_dim, torch.bfloat16, impl.options.sink,
                            impl.options.recent, BLOCK)
        blocks += layout.reserved_blocks
        cells = num_codes
    elif name == "KVFOLD_FOURIER":
        from kvfold.attention_backends.fourier.arena import CacheArena
        from kvfold.attention_backends.fourier.backend import layout_for

        layout = layout_for(impl.options, torch.bfloat16, BLOCK)
        blocks += layout.reserved_blocks
        cache = torch.zeros(1 + reqs * blocks, 1, BLOCK, layout.cell_bytes, dtype=torch.uint8, device=dev)
        impl.arena = CacheArena([cache], layout)  # vLLM's forward context would hand every layer's view
        tables = (1 + torch.arange(reqs * blocks, device=dev, dtype=torch.int32)).view(reqs, blocks)
        return cache, tables
    else:
        from kvfold.attention_backends.treekv.pages import content_bytes

        cells = content_bytes(head_dim, head_dim, torch.bfloat16)
    cache = torch.zeros(1 + reqs * blocks, kv_heads, BLOCK, cells, dtype=torch.uint8, device=dev)
    tables = (1 + torch.arange(reqs * blocks, device=dev, dtype=torch.int32)).view(reqs, blocks)
    return cache, tables


def metadata(rows: list[tuple[int, int, int]], tables: torch.Tensor, reserved: int, dev: torch.device):
    """``rows``: (request, tokens before, new tokens)."""
    from kvfold.attention_backends.paged.metadata import PagedMetadata

    starts, seq_lens, slots = [0], [], []
    for r, done, n in rows:
        pos = torch.arange(done, done + n, device=dev)
        slots.append(tables[r, reserved + pos // BLOCK].long() * BLOCK + pos % BLOCK)
        starts.append(starts[-1] + n)
        seq_lens.append(done + n)
    width = reserved + -(-max(seq_lens) // BLOCK)  # vLLM hands over the columns the batch needs
    return PagedMetadata(
        num_reqs=len(rows), num_actual_tokens=starts[-1],
        query_start_loc_cpu=torch.tensor(starts), seq_lens_cpu=torch.tensor(seq_lens),
        block_table=tables[[r for r, _, _ in rows], :width], slot_mapping=torch.cat(slots),
        max_query_len=max(n for _, _, n in rows), max_seq_len=max(seq_lens),
    )


def run_kvfold(name: str, model_dir: Path, args: argparse.Namespace, dev: torch.device) -> dict:
    batches = [int(b) for b in args.batches.split(",")]
    total = args.context + (args.decode_steps + 2) * len(batches) + 16
    if name not in KVFOLD_BACKENDS:
        raise ValueError(f"{name} is not a kvfold backend")
    layers = layers_for(args, model_dir)  # the full model's (FourierAttention runs a one-layer copy)
    if name == "KVFOLD_TREEKV":
        options: dict[str, Any] = {"budget": args.budget, "positions": args.treekv_positions}
    elif name == "KVFOLD_FOURIER":
        from kvfold.attention_backends.fourier import calibrate as fourier_files

        model_dir = one_layer_model(model_dir)
        dims = Path(tempfile.mkdtemp()) / "fourier_dims"
        fourier_files.write(fourier_files.random_dims(
            model_dir, seed=0, recent=args.fourier_recent, freqs=args.fourier_freqs, fractions=(0.8, 0.8)), dims)
        options = {"dims": str(dims)}
    else:  # random codebooks of the model's shape: the cost depends on the shape only
        options = {"codebooks": str(write_shape_codebooks(load_config(model_dir), Path(tempfile.mkdtemp())))}
    impl, shape = build_impl(name, model_dir, total + BLOCK, options)
    heads, kv_heads, head_dim = shape
    reqs = max(batches)
    cache, tables = paged_cache(name, impl, shape, reqs, total, dev)
    reserved = 0
    if name == "KVFOLD_VQKV":
        reserved = impl._page_layout(cache).reserved_blocks
    elif name == "KVFOLD_FOURIER":
        reserved = impl.arena.layout.reserved_blocks
    done = [0] * reqs

    def step(rows: list[tuple[int, int]], layers: int = 1) -> Callable[[], None]:
        """One step's forward, ``layers`` times on the same metadata (the layers of a model step)."""
        md = metadata([(r, done[r], n) for r, n in rows], tables, reserved, dev)
        tokens = md.num_actual_tokens
        q = torch.randn(tokens, heads, head_dim, device=dev, dtype=torch.bfloat16)
        k = torch.randn(tokens, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
        v = torch.randn(tokens, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        for r, n in rows:
            done[r] += n

        def forward() -> None:
            for _ in range(layers):
                impl.forward(LAYER, q, k, v, cache, md, out)
        return forward

    chunk_ms: list[float] = []
    for r in range(reqs):
        while done[r] < args.context:
            n = min(args.chunk, args.context - done[r])
            chunk_ms += timed(lambda: step([(r, n)]), 1)
    report: dict = {"options": {k: v for k, v in options.items() if k != "codebooks"},
                    "prefill_chunk_ms": summary(chunk_ms), "decode_step_ms": {}, "decode_step_amortized_ms": {}}
    for batch in batches:
        rows = [(r, 1) for r in range(batch)]
        for _ in range(2):  # warm-up: kernel compiles and graph capture for this shape
            step(rows)()
        report["decode_step_ms"][str(batch)] = summary(timed(lambda: step(rows), args.decode_steps))
        report["decode_step_amortized_ms"][str(batch)] = per_layer(
            timed(lambda: step(rows, layers), args.amortized_steps), layers)
    if name == "KVFOLD_FOURIER":
        from kvfold.attention_backends.fourier.kernels import compiled_stats

        report["compiled_kernels"] = compiled_stats()
    if args.profile:
        profile_steps(lambda: step([(r, 1) for r in range(batches[-1])]), args.profile, name)
    return report


def layers_for(args: argparse.Namespace, model_dir: Path) -> int:
    """``--layers``, or the model's layer count."""
    return args.layers or int(load_config(model_dir)["num_hidden_layers"])


def per_layer(times: list[float], layers: int) -> dict[str, float]:
    return {**summary([t / layers for t in times]), "layers": layers}


def profile_steps(make: Callable[[], Callable[[], Any]], path: Path, name: str, steps: int = 5) -> None:
    """Append to ``path`` the operators of ``steps`` decode steps at the last batch, by device and
    by host time: where a backend's step goes when its milliseconds are far off the baseline's."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    fns = [make() for _ in range(steps)]
    _sync()
    with profile(activities=activities) as prof:
        for fn in fns:
            fn()
        _sync()
    table = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"# {name}: {steps} decode steps\n")
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            if key == "self_cuda_time_total" and len(activities) == 1:
                continue
            f.write(f"## by {key}\n{table.table(sort_by=key, row_limit=40, max_name_column_width=60)}\n")


def window_of(name: str) -> int | None:
    """The window of a ``SLIDING_WINDOW_N`` name (vLLM's sliding window on FLASH_ATTN), else None."""
    match = re.fullmatch(r"SLIDING_WINDOW_(\d+)", name)
    return int(match.group(1)) if match else None


def run_flash(model_dir: Path, args: argparse.Namespace, dev: torch.device, window: int | None = None) -> dict:
    """vLLM's FLASH_ATTN decode work for one layer: cache write of the new token, paged attention
    (over the last ``window`` tokens only, as vLLM runs a sliding-window model, when given)."""
    from vllm import _custom_ops as ops
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    config = load_config(model_dir)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    batches = [int(b) for b in args.batches.split(",")]
    reqs = max(batches)
    blocks = -(-(args.context + args.decode_steps + 8) // BLOCK)
    key_cache = torch.randn(reqs * blocks + 1, BLOCK, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    tables = (1 + torch.arange(reqs * blocks, device=dev, dtype=torch.int32)).view(reqs, blocks)
    one = torch.ones((), device=dev)
    layers = layers_for(args, model_dir)
    report: dict = {"decode_step_ms": {}, "decode_step_amortized_ms": {}}
    for batch in batches:
        seq_lens = torch.full((batch,), args.context + 1, device=dev, dtype=torch.int32)
        cu_q = torch.arange(batch + 1, device=dev, dtype=torch.int32)
        slots = tables[:batch, args.context // BLOCK].long() * BLOCK + args.context % BLOCK

        def make() -> Callable[[], None]:
            q = torch.randn(batch, heads, head_dim, device=dev, dtype=torch.bfloat16)
            k = torch.randn(batch, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            out = torch.empty_like(q)

            def forward() -> None:
                ops.reshape_and_cache_flash(k, v, key_cache, value_cache, slots, "auto", one, one)
                flash_attn_varlen_func(
                    q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1,
                    seqused_k=seq_lens, max_seqlen_k=args.context + 1, softmax_scale=head_dim**-0.5,
                    causal=True, block_table=tables[:batch], fa_version=args.fa_version,
                    window_size=[window - 1, 0] if window else None)
            return forward

        def make_layers() -> Callable[[], None]:
            forward = make()
            return lambda: [forward() for _ in range(layers)]

        for _ in range(2):
            make()()
        report["decode_step_ms"][str(batch)] = summary(timed(make, args.decode_steps))
        report["decode_step_amortized_ms"][str(batch)] = per_layer(timed(make_layers, args.amortized_steps), layers)
    return report


def run(args: argparse.Namespace) -> dict:
    dev = torch.device(args.device)
    model_dir = prepare(args.model, Path(tempfile.mkdtemp()) / args.model)
    report: dict = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "model": args.model, "context": args.context, "chunk": args.chunk, "batches": args.batches,
        "per": "one attention layer", "backends": {},
    }
    for name, is_flash in plan_backends([n for n in args.backends.split(",") if n], dev.type == "cuda"):
        try:
            result = (run_flash(model_dir, args, dev, window_of(name)) if is_flash
                      else run_kvfold(name, model_dir, args, dev))
        except Exception as exc:  # recorded, so one backend's failure leaves the others' numbers
            if not args.keep_going:
                raise
            result = {"error": repr(exc)[:2000]}
        report["backends"][name] = result
        print(name, json.dumps(result.get("decode_step_ms", result)), flush=True)
        write(report, args.out)
    base = report["backends"].get("FLASH_ATTN", {})
    if "decode_step_ms" in base:
        for name, result in report["backends"].items():
            if "decode_step_ms" not in result:
                continue
            result["decode_vs_flash_attn"] = {
                b: result["decode_step_ms"][b]["median"] / base["decode_step_ms"][b]["median"]
                for b in result["decode_step_ms"]}
            amortized, base_amortized = result.get("decode_step_amortized_ms", {}), base.get("decode_step_amortized_ms", {})
            result["amortized_vs_flash_attn"] = {
                b: amortized[b]["median"] / base_amortized[b]["median"] for b in amortized if b in base_amortized}
    return report


def plan_backends(names: list[str], cuda: bool) -> list[tuple[str, bool]]:
    """``(name, is FlashAttention)`` in the order they run: on CUDA the FLASH_ATTN baseline first,
    added when not asked for, so every ratio has its baseline from the same run."""
    flash = [n for n in names if n == "FLASH_ATTN" or window_of(n)]
    unknown = sorted(set(names) - set(KVFOLD_BACKENDS) - set(flash))
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; known: {', '.join(KVFOLD_BACKENDS)}, "
                         "FLASH_ATTN, SLIDING_WINDOW_N")
    if not cuda and flash:
        raise SystemExit(f"{', '.join(flash)} (FlashAttention baselines) need CUDA")
    if cuda and "FLASH_ATTN" not in names:
        names = ["FLASH_ATTN", *names]
    return [(n, n == "FLASH_ATTN" or window_of(n) is not None) for n in names]


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


def plot(report: dict, path: Path) -> None:
    """Milliseconds per layer and decode step against batch size, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in report["backends"].items():
        steps = result.get("decode_step_ms")
        if not steps:
            continue
        batches = sorted(steps, key=int)
        line = ax.plot([int(b) for b in batches], [steps[b]["median"] for b in batches], marker="o", label=name)[0]
        amortized = result.get("decode_step_amortized_ms", {})
        if amortized:
            ax.plot([int(b) for b in batches if b in amortized], [amortized[b]["median"] for b in batches if b in amortized],
                    linestyle="--", marker=".", color=line.get_color(),
                    label=f"{name}, step's host work over {next(iter(amortized.values()))['layers']} layers")
    ax.set(xscale="log", yscale="log", xlabel="requests decoding together",
           ylabel="ms per layer per decode step",
           title=f"{report['model']}, {report['context']} tokens each, {report['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.1-8b", choices=model_names())
    p.add_argument("--backends", default="KVFOLD_VQKV,KVFOLD_TREEKV,KVFOLD_FOURIER",
                   help="comma-separated; FLASH_ATTN (the baseline, CUDA only) is added on CUDA; "
                        "SLIDING_WINDOW_N is FLASH_ATTN over the last N tokens (CUDA only)")
    p.add_argument("--context", type=int, default=32768, help="tokens per request before decoding")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (as --max-num-batched-tokens)")
    p.add_argument("--batches", default="1,8,16")
    p.add_argument("--budget", type=int, default=2048, help="KVFOLD_TREEKV's budget")
    p.add_argument("--treekv-positions", default="original", choices=["original", "rank"])
    p.add_argument("--fourier-recent", type=int, default=1020, help="KVFOLD_FOURIER's exact recent tokens")
    p.add_argument("--fourier-freqs", type=int, default=512, help="KVFOLD_FOURIER's k")
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=0,
                   help="forwards per step for decode_step_amortized_ms (0: the model's layer count)")
    p.add_argument("--amortized-steps", type=int, default=5, help="steps timed for decode_step_amortized_ms")
    p.add_argument("--fa-version", type=int, default=3, help="3 on Hopper, as vLLM picks there")
    p.add_argument("--device", default="cuda", help="cpu only to try this script (no baseline)")
    p.add_argument("--replot", type=Path, help="only redraw the plot of this result JSON")
    p.add_argument("--profile", type=Path,
                   help="append each kvfold backend's operator profile at the largest batch to this file")
    p.add_argument("--keep-going", action="store_true", help="record a backend's error, run the rest")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/decode-step.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    report = run(args)
    write(report, args.out)
    plot(report, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
