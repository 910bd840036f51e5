"""Prefill time of LLaVA-1.5 with 576 (stock) vs 144 vs 64 vision tokens, without vLLM.

What a request's time to first token is made of on the GPU: the vision tower over the image, the
Fourier-VLM compression (``kvfold.models.fourier_vlm.spectral_resize``, the op the vLLM class runs),
the projector, and the language model's prefill over text + vision tokens (with its KV cache
written) and the first token's logits. Run through transformers' own LLaVA modules with random
weights (transformers' init, run on the device: the time of dense matrix products does not depend
on the values), CUDA-event timed, median of repeats. It leaves out what vLLM adds around a
prefill (scheduling, tokenization, image preprocessing, sampling), which is the same for every
variant; ``benchmarks/fourier_vlm_ttft.py`` measures TTFT through vLLM itself where vLLM runs.

    python -m benchmarks.fourier_vlm_prefill --out docs/benchmarks/fourier-vlm-prefill-DEVICE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "benchmarks" / "models" / "llava-1.5-7b" / "config.json"


def build(config_path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig.from_dict(json.loads(config_path.read_text()))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # built on the device: transformers' random init runs there, buffers included
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval(), config  # the config names float16; every part the same dtype


def prefill(model, config, pixels: torch.Tensor, text: torch.Tensor, keep: int | None) -> torch.Tensor:
    """First-token logits of a batch of one image + ``text`` token prompts."""
    from kvfold.models.fourier_vlm.spectral_resize import compress_tokens

    inner = model.model
    grid = config.vision_config.image_size // config.vision_config.patch_size
    hidden = inner.vision_tower(pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    features = hidden[:, 1:]  # "default" strategy: the class token is dropped
    if keep is not None:
        features = compress_tokens(features, (grid, grid), (keep, keep)).to(features.dtype)
    image = inner.multi_modal_projector(features)
    words = inner.language_model.embed_tokens(text)
    embeds = torch.cat([words[:, :1], image, words[:, 1:]], 1)  # BOS, image, then the question
    out = inner.language_model(inputs_embeds=embeds, use_cache=True)
    return model.lm_head(out.last_hidden_state[:, -1])


def time_variant(model, config, batch: int, keep: int | None, text_tokens: int, repeats: int,
                 device: torch.device) -> dict:
    size = config.vision_config.image_size
    g = torch.Generator(device=device).manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=next(model.parameters()).dtype, generator=g)
    vocab = model.model.language_model.embed_tokens.num_embeddings
    text = torch.randint(3, vocab - 1, (batch, text_tokens), device=device, generator=g)
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):  # two warm-ups
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                prefill(model, config, pixels, text, keep)
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end)
            else:  # a smoke run of the script
                began = time.perf_counter()
                prefill(model, config, pixels, text, keep)
                elapsed = 1e3 * (time.perf_counter() - began)
            if i >= 2:
                times.append(elapsed)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats_ms": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--vision-tokens", default="576,144,64", help="576 = stock; r*r = reserve r")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    from benchmarks.vlm_flops import LlavaShape, request_flops

    started = time.monotonic()
    model, config = build(args.config, device, torch.bfloat16)
    hf = json.loads(args.config.read_text())
    shape = LlavaShape.from_config(hf)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"kind": "fourier_vlm_prefill", "device": name,
              "torch": torch.__version__, "config": str(args.config),
              "text_tokens": args.text_tokens, "command": [sys.executable, *sys.argv], "runs": []}
    for batch in (int(b) for b in args.batches.split(",")):
        for tokens in (int(t) for t in args.vision_tokens.split(",")):
            keep = None if tokens == grid * grid else int(round(tokens**0.5))
            run = {"batch": batch, "vision_tokens": tokens,
                   **time_variant(model, config, batch, keep, args.text_tokens, args.repeats, device),
                   "flops_per_request": request_flops(shape, args.text_tokens, (keep or grid, keep or grid))}
            result["runs"].append(run)
            print(json.dumps({k: run[k] for k in ("batch", "vision_tokens", "median_ms")}), flush=True)
            args.out.write_text(json.dumps(result, indent=1))
    for run in result["runs"]:
        base = next(r for r in result["runs"] if r["batch"] == run["batch"] and r["vision_tokens"] == grid * grid)
        run["vs_576"] = run["median_ms"] / base["median_ms"]
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
