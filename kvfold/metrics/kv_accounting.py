"""KV bytes per token, the bf16 baseline and capacity, from vLLM's config and a backend's spec.

The bytes come from the same calculation vLLM's allocator uses: build the layer's standard
``FullAttentionSpec``, let the backend customize it (``customize_spec``, where a compressing method
shrinks the page or bounds a request's blocks) and take what a request of ``max_model_len`` tokens
holds, per token of its context. vLLM's platform code sizes
hybrid pages the same way (``backend_cls.customize_spec(FullAttentionSpec(...)).page_size_bytes``).
All numbers are per worker: with tensor parallelism a worker holds its share of the KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import AttentionSpec

    from kvfold.attention_backends.paged.backend import KvfoldBackend


def standard_layer_spec(vllm_config: VllmConfig, dtype: torch.dtype | None = None) -> AttentionSpec:
    """vLLM's uncustomized page of one attention layer (``dtype``: the KV-cache dtype by default)."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    model, cache = vllm_config.model_config, vllm_config.cache_config
    if dtype is None:
        dtype = kv_cache_dtype_str_to_dtype(cache.cache_dtype, model)
    return FullAttentionSpec(
        block_size=cache.block_size,
        num_kv_heads=model.get_num_kv_heads(vllm_config.parallel_config),
        head_size=model.get_head_size(),
        dtype=dtype,
    )


def attention_layers(vllm_config: VllmConfig) -> int:
    """Attention layers one worker holds (the first pipeline stage's when pipeline-parallel)."""
    return vllm_config.model_config.get_num_layers_by_block_type(
        vllm_config.parallel_config, "attention"
    )


def bytes_per_token(spec: AttentionSpec, layers: int, vllm_config: VllmConfig) -> float:
    """Bytes a request of ``max_model_len`` tokens holds, per token of that context.

    For full attention this is the page size over the block size. A method that bounds a request's
    blocks (TreeKV's window spec) holds fewer bytes than its context, exactly as vLLM's own
    max-concurrency figure counts them.
    """
    max_len = vllm_config.model_config.max_model_len
    return spec.max_memory_usage_bytes(vllm_config) * layers / max_len


@dataclass(frozen=True)
class KvAccounting:
    """What the API process knows about the KV cache of a kvfold engine."""

    kv_bytes_per_token: float
    bf16_bytes_per_token: float
    capacity_tokens: int | None  # None until the engine reported its allocation

    @property
    def compression_ratio(self) -> float:
        return self.bf16_bytes_per_token / self.kv_bytes_per_token


def kv_accounting(backend: type[KvfoldBackend], vllm_config: VllmConfig) -> KvAccounting:
    layers = attention_layers(vllm_config)
    baseline = bytes_per_token(standard_layer_spec(vllm_config, torch.bfloat16), layers, vllm_config)
    return KvAccounting(
        kv_bytes_per_token=backend.kv_bytes_per_token(vllm_config),
        bf16_bytes_per_token=baseline,
        # vLLM's own group-aware count (the "KV cache size: N tokens" log line), per engine.
        capacity_tokens=vllm_config.cache_config.kv_cache_size_tokens,
    )
