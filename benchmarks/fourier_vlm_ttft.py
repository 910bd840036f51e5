"""Fourier-VLM time to first token: LLaVA-1.5 with 576 (stock) vs 144 vs 64 vision tokens.

One offline vLLM engine per variant, each in its own process (one after the other, so the GPU
holds one model at a time): the stock ``LlavaForConditionalGeneration`` for 576 tokens, kvfold's
``FourierLlavaForConditionalGeneration`` with ``fourier_vlm.reserve`` 12 (144) and 8 (64), all
from the same directory (``--hf-overrides`` style, as on a stock checkpoint). For each batch size B
the engine is given B requests at once, each with its own random image and the same question,
``max_tokens=1``; the time until all B first tokens exist (``generate`` wall time, image
preprocessing included) and every request's own TTFT (vLLM's ``first_token_latency``) are recorded
over ``--repeats`` batches after ``--warmup`` unmeasured ones. Prefix caching and the multimodal
processor cache are off and every image is new, so every batch is a full prefill. Prefill FLOPs
come from the config (benchmarks/vlm_flops.py). The JSON is rewritten after every variant and
merged with the variants already in ``--out``, so variants can be run by separate commands.

GPU, LLaVA-1.5-7B shape (benchmarks/models/llava-1.5-7b/config.json) with dummy weights:

    python -m benchmarks.fourier_vlm_ttft --model llava-1.5-7b --work-dir LOGS

CPU, a tiny random LLaVA with the same 24x24 vision grid (a check that the script works):

    python -m benchmarks.fourier_vlm_ttft --tiny

Results of separate commands (``--variants 576 --out A.json`` ...) combine with

    python -m benchmarks.fourier_vlm_ttft --merge A.json B.json C.json --out MERGED.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import env_info
from benchmarks.model_dirs import load_config
from benchmarks.vlm_flops import LlavaShape, request_flops

REPO = Path(__file__).resolve().parent.parent
FOURIER_ARCH = "FourierLlavaForConditionalGeneration"
STOCK_ARCH = "LlavaForConditionalGeneration"
QUESTION = "What is shown in this image? Describe it in detail."
IMAGE_SIZE = (640, 480)  # a typical photo; LLaVA resizes and crops it to 336x336


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", default="llava-1.5-7b",
                       help="a shape under benchmarks/models/ (config.json only, dummy weights)")
    where.add_argument("--model-dir", type=Path,
                       help="a complete LLaVA directory (weights, tokenizer, processor)")
    where.add_argument("--tiny", action="store_true",
                       help="a small random LLaVA (kvfold.tiny_vlm), CPU-sized, real weights")
    p.add_argument("--variants", default="576,144,64",
                   help="vision tokens per image: the full grid (stock class) or a square r*r")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--repeats", type=int, default=None, help="measured batches (default 10, tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured batches (default 3, tiny 1)")
    p.add_argument("--dtype", default=None, help="default bfloat16 (tiny: float32)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM's default when unset (recorded in the result)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no torch.compile / CUDA graphs (always on with --tiny)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--variant-timeout", type=float, default=900.0,
                   help="seconds for one variant's measurements once its engine is up")
    p.add_argument("--start-retries", type=int, default=1,
                   help="an engine that is not ready after --startup-timeout is killed and retried")
    p.add_argument("--out", type=Path, help="result JSON (default docs/benchmarks/"
                   "fourier-vlm-ttft-MODEL.json); a plot PNG is written beside it")
    p.add_argument("--work-dir", type=Path,
                   help="model dir, engine specs and logs (default TMPDIR/fourier-vlm-ttft-NAME)")
    args = p.parse_args(argv)
    args.variants = [int(v) for v in args.variants.split(",") if v]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.repeats = args.repeats if args.repeats is not None else (3 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    if args.tiny:
        args.enforce_eager = True
    name = "tiny-cpu" if args.tiny else (args.model_dir.name if args.model_dir else args.model)
    args.name = name
    args.out = args.out or REPO / "docs" / "benchmarks" / f"fourier-vlm-ttft-{name}.json"
    args.work_dir = args.work_dir or Path(tempfile.gettempdir()) / f"fourier-vlm-ttft-{name}"
    return args


# ------------------------------------------------------------------------------------------------
# Variants and the model directory


def variant_overrides(vision_tokens: int, grid: int) -> dict[str, Any]:
    """``hf_overrides`` for a variant: none for the full grid (vLLM's stock LLaVA), else Fourier."""
    if vision_tokens == grid * grid:
        return {}
    side = math.isqrt(vision_tokens)
    if side * side != vision_tokens or not 1 <= side < grid:
        raise ValueError(f"{vision_tokens} vision tokens: need {grid * grid} (stock) or a square "
                         f"r*r with r < {grid}")
    return {"architectures": [FOURIER_ARCH], "fourier_vlm": {"reserve": side}}


def prepare_model_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """(directory to serve, whether its weights are dummy)."""
    if args.model_dir:
        return args.model_dir, False
    out = args.work_dir / "model"
    if args.tiny:
        from kvfold.tiny_vlm import write_tiny_llava

        if not (out / "config.json").is_file():
            write_tiny_llava(out)
        return out, False
    config = load_config(args.model)
    if config.get("model_type") != "llava":
        raise ValueError(f"{args.model} is not a LLaVA config")
    from kvfold.tiny_vlm import LLAVA_IMAGE_TOKEN, llava_processor

    out.mkdir(parents=True, exist_ok=True)
    vision = config["vision_config"]
    processor = llava_processor(out, image_size=vision["image_size"],
                                patch_size=vision["patch_size"])
    processor.save_pretrained(out)
    # The byte tokenizer's <image> id replaces 32000 (any id below the vocabulary works with
    # dummy weights; the shapes are the checkpoint's).
    config["image_token_index"] = processor.tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    config["pad_token_id"] = None
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return out, True


def flops_table(config: dict[str, Any], variants: list[int], text_tokens: int) -> dict[str, Any]:
    shape = LlavaShape.from_config(config)
    table = {}
    for v in variants:
        side = shape.grid if v == shape.grid ** 2 else math.isqrt(v)
        table[str(v)] = request_flops(shape, text_tokens, (side, side))
    return table


# ------------------------------------------------------------------------------------------------
# One variant: an engine in a child process


def random_image(seed: int, size: tuple[int, int] = IMAGE_SIZE):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def child_main(spec_path: str) -> None:
    """Run one variant: ``spec`` = {"llm": {...}, "batch_sizes", "repeats", "warmup", "out",
    "ready"}; writes the measurements to spec["out"]."""
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(**spec["llm"])
    startup_s = time.perf_counter() - started
    Path(spec["ready"]).write_text("ready")
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    prompt = f"USER: <image>\n{QUESTION} ASSISTANT:"
    seed = spec["seed"]
    result: dict[str, Any] = {
        "startup_s": startup_s,
        "max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens,
        "resolved_architecture": llm.llm_engine.vllm_config.model_config.architecture,
        "batches": {},
    }
    for batch in spec["batch_sizes"]:
        walls, per_request, prompt_tokens = [], [], set()
        for rep in range(spec["warmup"] + spec["repeats"]):
            requests = []
            for _ in range(batch):
                seed += 1
                requests.append({"prompt": prompt, "multi_modal_data": {"image": random_image(seed)}})
            t0 = time.perf_counter()
            outs = llm.generate(requests, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            if rep < spec["warmup"]:
                continue
            walls.append(wall)
            for o in outs:
                prompt_tokens.add(len(o.prompt_token_ids))
                if o.metrics is not None and o.metrics.first_token_latency > 0:
                    per_request.append(o.metrics.first_token_latency)
        result["batches"][str(batch)] = {
            "prompt_tokens": sorted(prompt_tokens),
            "wall_s": walls,
            "wall_median_s": statistics.median(walls),
            "request_ttft_mean_s": statistics.fmean(per_request) if per_request else None,
            "request_ttft_median_s": statistics.median(per_request) if per_request else None,
            "request_ttft_max_s": max(per_request) if per_request else None,
            "requests_measured": len(per_request),
        }
        Path(spec["out"]).write_text(json.dumps(result))
    Path(spec["out"]).write_text(json.dumps(result))


class Stopped(Exception):
    """SIGTERM (e.g. ``timeout -s TERM``): stop the running engine, keep what was measured."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Stopped()


def engine_kwargs(args: argparse.Namespace, model_dir: Path, dummy: bool, vision_tokens: int,
                  grid: int) -> dict[str, Any]:
    """The ``LLM(**kwargs)`` of one variant (vLLM's EngineArgs fields)."""
    llm: dict[str, Any] = {
        "model": str(model_dir), "dtype": args.dtype, "max_model_len": args.max_model_len,
        "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": args.enforce_eager,
        "enable_prefix_caching": False, "mm_processor_cache_gb": 0,
        "limit_mm_per_prompt": {"image": 1}, "max_num_seqs": max(max(args.batch_sizes), 8),
        "disable_log_stats": False,
    }
    if dummy:
        llm["load_format"] = "dummy"
    if args.max_num_batched_tokens:
        llm["max_num_batched_tokens"] = args.max_num_batched_tokens
    overrides = variant_overrides(vision_tokens, grid)
    if overrides:
        llm["hf_overrides"] = overrides
    return llm


def run_variant(args: argparse.Namespace, model_dir: Path, dummy: bool, vision_tokens: int,
                grid: int, log_dir: Path) -> dict[str, Any]:
    llm = engine_kwargs(args, model_dir, dummy, vision_tokens, grid)
    overrides = llm.get("hf_overrides", {})
    record: dict[str, Any] = {"vision_tokens": vision_tokens, "hf_overrides": overrides,
                              "architecture": (overrides or {"architectures": [STOCK_ARCH]})
                              ["architectures"][0]}
    for attempt in range(args.start_retries + 1):
        tag = f"{vision_tokens}-try{attempt}"
        spec_path, out_path, ready = (log_dir / f"{tag}.spec.json", log_dir / f"{tag}.out.json",
                                      log_dir / f"{tag}.ready")
        for path in (out_path, ready):
            path.unlink(missing_ok=True)
        spec_path.write_text(json.dumps({
            "llm": llm, "batch_sizes": args.batch_sizes, "repeats": args.repeats,
            "warmup": args.warmup, "out": str(out_path), "ready": str(ready),
            "seed": 1000 * vision_tokens}))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
        with open(log_dir / f"{tag}.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.fourier_vlm_ttft", "--child", str(spec_path)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.monotonic() + args.startup_timeout
                while proc.poll() is None and not ready.exists() and time.monotonic() < deadline:
                    time.sleep(1)
                if proc.poll() is None and not ready.exists():
                    record.setdefault("start_timeouts", []).append(attempt)
                    continue
                try:
                    proc.wait(timeout=args.variant_timeout)
                except subprocess.TimeoutExpired:
                    record["measure_timeout_s"] = args.variant_timeout
            finally:
                if proc.poll() is None:  # a start that hung, or SIGTERM: the whole group goes
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        env_info.wait_for_gpu_memory()
        record["log"] = str(log_dir / f"{tag}.log")
        if out_path.is_file():  # written after every batch size: partial runs keep theirs
            record.update(json.loads(out_path.read_text()))
        record["status"] = "ok" if proc.returncode == 0 else f"failed (rc={proc.returncode})"
        if proc.returncode != 0:
            record["log_tail"] = (log_dir / f"{tag}.log").read_text(errors="replace")[-4000:]
        return record
    record["status"] = f"not ready after {args.startup_timeout:.0f}s ({args.start_retries + 1} starts)"
    return record


# ------------------------------------------------------------------------------------------------
# Summary, JSON, plot


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """TTFT and FLOPs of each variant relative to the full grid, per batch size."""
    by_tokens = {str(v["vision_tokens"]): v for v in run["variants"] if v.get("batches")}
    full = str(max((v["vision_tokens"] for v in run["variants"]), default=0))
    out: dict[str, Any] = {}
    if full not in by_tokens:
        return out
    for batch in run["batch_sizes"]:
        b = str(batch)
        ref = by_tokens[full]["batches"].get(b)
        if ref is None:
            continue
        rows = {}
        for tokens, variant in by_tokens.items():
            cur = variant["batches"].get(b)
            if cur is None:
                continue
            flops, ref_flops = run["flops"][tokens]["total"], run["flops"][full]["total"]
            rows[tokens] = {
                "wall_median_s": cur["wall_median_s"],
                "ttft_change_pct": 100 * (cur["wall_median_s"] / ref["wall_median_s"] - 1),
                "request_ttft_mean_s": cur["request_ttft_mean_s"],
                "request_ttft_change_pct": (
                    100 * (cur["request_ttft_mean_s"] / ref["request_ttft_mean_s"] - 1)
                    if cur["request_ttft_mean_s"] and ref["request_ttft_mean_s"] else None),
                "prefill_tflops_per_request": flops / 1e12,
                "flops_change_pct": 100 * (flops / ref_flops - 1),
                "prompt_tokens": cur["prompt_tokens"],
            }
        out[b] = rows
    return out


def save(run: dict[str, Any], path: Path) -> None:
    run["summary"] = summarize(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=2))
    tmp.replace(path)


def plot(run: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted((v for v in run["variants"] if v.get("batches")),
                      key=lambda v: -v["vision_tokens"])
    batches = [str(b) for b in run["batch_sizes"]]
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.2 * (len(batches) + 1), 3.8))
    labels = [f"{v['vision_tokens']}" for v in variants]
    for ax, b in zip(axes, batches):
        ms = [1000 * v["batches"][b]["wall_median_s"] if b in v["batches"] else 0 for v in variants]
        bars = ax.bar(labels, ms, color=["#888888", "#3b7dd8", "#1f4e9c"][: len(ms)])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(f"batch {b}: time to first token")
        ax.set_xlabel("vision tokens per image")
        ax.set_ylabel("ms (median)")
    ax = axes[-1]
    flops = [run["flops"][str(v["vision_tokens"])]["total"] for v in variants]
    scale, unit = (1e12, "TFLOPs") if max(flops, default=0) >= 1e12 else (1e9, "GFLOPs")
    bars = ax.bar(labels, [f / scale for f in flops],
                  color=["#888888", "#3b7dd8", "#1f4e9c"][: len(flops)])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_title(f"prefill {unit} per request (analytic)")
    ax.set_xlabel("vision tokens per image")
    fig.suptitle(f"Fourier-VLM, LLaVA-1.5 {run['model']} on {run['env'].get('device') or 'CPU'}",
                 fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def merge(paths: Sequence[Path], out: Path) -> dict[str, Any]:
    """One result from several runs (e.g. one variant per command): the later file wins a variant."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    merged = {**runs[0], "variants": [], "flops": {}, "merged_from": [str(p) for p in paths]}
    for run in runs:
        merged["flops"].update(run["flops"])
        keep = [v for v in merged["variants"]
                if v["vision_tokens"] not in {x["vision_tokens"] for x in run["variants"]}]
        merged["variants"] = keep + run["variants"]
    merged["variants"].sort(key=lambda x: -x["vision_tokens"])
    save(merged, out)
    plot(merged, out)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        child_main(argv[1])
        return 0
    if argv[:1] == ["--merge"]:
        out_at = argv.index("--out")
        merged = merge([Path(p) for p in argv[1:out_at]], Path(argv[out_at + 1]))
        print(json.dumps(merged["summary"], indent=2))
        return 0
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir, dummy = prepare_model_dir(args)
    config = json.loads((model_dir / "config.json").read_text())
    grid = LlavaShape.from_config(config).grid
    for v in args.variants:
        variant_overrides(v, grid)  # refuse a bad variant before any engine starts
    text_tokens = len(f"USER: \n{QUESTION} ASSISTANT:".encode())  # the byte tokenizer
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    kept = [v for v in previous.get("variants", []) if v["vision_tokens"] not in args.variants]
    run: dict[str, Any] = {
        "kind": "fourier_vlm_ttft", "model": args.name, "model_dir": str(model_dir),
        "dummy_weights": dummy, "dtype": args.dtype, "enforce_eager": args.enforce_eager,
        "batch_sizes": args.batch_sizes, "repeats": args.repeats, "warmup": args.warmup,
        "question": QUESTION, "image_size": list(IMAGE_SIZE), "text_tokens": text_tokens,
        "env": env_info.collect(), "command": " ".join(["python -m benchmarks.fourier_vlm_ttft",
                                                          *argv]),
        "flops": flops_table(config, sorted({*args.variants, *(v["vision_tokens"] for v in kept)}),
                             text_tokens),
        "variants": kept,
    }
    signal.signal(signal.SIGTERM, _on_sigterm)
    for v in args.variants:
        print(f"variant {v} vision tokens ...", flush=True)
        try:
            record = run_variant(args, model_dir, dummy, v, grid, args.work_dir)
        except Stopped:
            print("stopped by SIGTERM; results so far are in the JSON", flush=True)
            break
        run["variants"] = [x for x in run["variants"] if x["vision_tokens"] != v] + [record]
        run["variants"].sort(key=lambda x: -x["vision_tokens"])
        save(run, args.out)
        print(f"  {record['status']}: " + ", ".join(
            f"batch {b}: {1000 * r['wall_median_s']:.1f} ms ({r['prompt_tokens']} prompt tokens)"
            for b, r in record.get("batches", {}).items()), flush=True)
    png = plot(run, args.out)
    print(json.dumps(run["summary"], indent=2))
    print(f"wrote {args.out} and {png}")
    if args.tiny and not args.model_dir:
        shutil.rmtree(args.work_dir / "model", ignore_errors=True)
    return 0 if all(v.get("status") == "ok" for v in run["variants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
