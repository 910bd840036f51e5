"""The attention configurations compared by ``benchmarks/serving.py``, as ``vllm serve`` arguments.

How vLLM 0.32 runs a Llama (or Qwen2) with its own sliding window (read in the installed package):

- ``model_executor/models/llama.py`` gives a layer ``per_layer_sliding_window=config.sliding_window``
  only when ``config.layer_types[i] == "sliding_attention"``; Llama's config has no ``layer_types``.
- ``engine/arg_utils.py`` sets ``CacheConfig.sliding_window = config.sliding_window`` when the model
  has no ``layer_types`` or all of them are ``"sliding_attention"``; ``Attention`` falls back to it
  for layers without a per-layer window (Qwen2's ``Attention`` never passes one).
- ``--hf-overrides`` with flat values is applied by ``config.update(...)`` after loading, so
  ``layer_types`` is not recomputed from ``use_sliding_window``/``max_window_layers`` (Qwen2).

So ``--hf-overrides '{"sliding_window": W, "use_sliding_window": true, "layer_types":
["sliding_attention", ...one per layer]}'`` makes every layer a sliding-window layer of ``W`` tokens on
both families: the KV cache manager then allocates a ``SlidingWindowSpec`` (frees blocks that fall
out of the window, reports the larger capacity), and FlashAttention gets ``window_size=(W-1, 0)``.
``max_model_len`` is not capped (vLLM caps it only with ``--disable-sliding-window``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# Names in the order they are run: the reference first (ratios need it), then kvfold's methods and
# vLLM's own window at the same budgets, then the rest.
DEFAULT_BACKENDS = [
    "FLASH_ATTN",
    "KVFOLD_TREEKV_2048",
    "SLIDING_WINDOW_2048",
    "FLASH_ATTN_FP8",
    "KVFOLD_TREEKV_4096",
    "SLIDING_WINDOW_4096",
    "TRITON_ATTN",
    "KVFOLD_DENSE",
]
REFERENCE_BACKEND = "FLASH_ATTN"


def sliding_window_overrides(config: dict[str, Any], window: int) -> dict[str, Any]:
    """``--hf-overrides`` that make every layer of ``config``'s model a ``window``-token window."""
    return {
        "sliding_window": window,
        "use_sliding_window": True,  # Qwen2's own switch; an unused attribute on Llama
        "layer_types": ["sliding_attention"] * int(config["num_hidden_layers"]),
    }


def treekv_config(budget: int, positions: str = "original") -> dict[str, Any]:
    # "original": TreeKV's default "rank" positions refuse Llama-3.1's llama3 RoPE scaling; the same
    # mode on every model keeps the runs comparable.
    return {"kvfold": {"budget": budget, "positions": positions}}


def server_args(
    name: str, config: dict[str, Any], treekv_positions: str = "original",
    vqkv_codebooks: str | None = None, fourier_dims: str | None = None,
) -> list[str]:
    """``vllm serve`` arguments selecting backend ``name`` (model-specific where needed).

    Known names: FLASH_ATTN, FLASH_ATTN_FP8, TRITON_ATTN, KVFOLD_DENSE, KVFOLD_TREEKV_<budget>,
    SLIDING_WINDOW_<window> (FlashAttention with vLLM's own window), KVFOLD_VQKV (codebooks from
    ``vqkv_codebooks``), KVFOLD_FOURIER (dims from ``fourier_dims``). Any other name is passed as
    ``--attention-backend NAME`` (e.g. CPU_ATTN for a CPU smoke run).
    """
    if name == "KVFOLD_FOURIER":
        if not fourier_dims:
            raise ValueError("KVFOLD_FOURIER needs a dims directory")
        return ["--attention-backend", name,
                "--additional-config", json.dumps({"kvfold": {"dims": str(fourier_dims)}})]
    if name == "FLASH_ATTN_FP8":
        return ["--attention-backend", "FLASH_ATTN", "--kv-cache-dtype", "fp8"]
    if name.startswith("KVFOLD_TREEKV_"):
        budget = _suffix_int(name)
        return ["--attention-backend", "KVFOLD_TREEKV",
                "--additional-config", json.dumps(treekv_config(budget, treekv_positions))]
    if name == "KVFOLD_VQKV":
        if not vqkv_codebooks:
            raise ValueError("KVFOLD_VQKV needs a codebook directory")
        return ["--attention-backend", name,
                "--additional-config", json.dumps({"kvfold": {"codebooks": str(vqkv_codebooks)}})]
    if name.startswith("SLIDING_WINDOW"):
        window = _suffix_int(name)
        base = name.split(":", 1)[1] if ":" in name else "FLASH_ATTN"
        return ["--attention-backend", base,
                "--hf-overrides", json.dumps(sliding_window_overrides(config, window))]
    return ["--attention-backend", name]


def _suffix_int(name: str) -> int:
    """``KVFOLD_TREEKV_2048`` -> 2048; ``SLIDING_WINDOW_2048:CPU_ATTN`` -> 2048."""
    head = name.split(":", 1)[0]
    try:
        return int(head.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"{name!r} needs a token count suffix, e.g. {head}_2048") from None


def validate(names: Sequence[str]) -> None:
    """Fail before any server starts on a malformed name."""
    for name in names:
        if name.startswith(("KVFOLD_TREEKV_", "SLIDING_WINDOW")):
            _suffix_int(name)
