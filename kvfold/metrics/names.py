"""The ``kvfold:*`` metric families: one declaration each, used by the exporters, docs and tests.

Labels: ``model_name`` (vLLM's served model name, as on ``vllm:*`` series) and ``backend`` (the
kvfold method that runs, e.g. ``KVFOLD_DENSE``, also when selected through ``CUSTOM``);
``errors_total`` adds ``kind`` (the exception class). Never ``vllm:``: vLLM's default Prometheus
logger unregisters every ``vllm:*`` collector it did not create.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

PREFIX = "kvfold:"
LABELS: tuple[str, ...] = ("model_name", "backend")


@dataclass(frozen=True)
class MetricFamily:
    name: str  # without the ``_total`` suffix prometheus-client adds to counters
    kind: Literal["gauge", "counter"]
    help: str
    process: Literal["api", "worker"]  # where the value is computed
    extra_labels: tuple[str, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return LABELS + self.extra_labels

    @property
    def series(self) -> str:
        """The name a scrape shows (counters end in ``_total``)."""
        return self.name + ("_total" if self.kind == "counter" else "")


KV_BYTES_PER_TOKEN = MetricFamily(
    "kvfold:kv_bytes_per_token", "gauge",
    "KV-cache bytes one worker holds per context token of a max-model-length request, over all "
    "its attention layers, from the backend's customized KV spec (page size / block size for full "
    "attention; less for a method that bounds a request's blocks).", "api")
KV_BYTES_PER_TOKEN_BF16 = MetricFamily(
    "kvfold:kv_bytes_per_token_bf16_baseline", "gauge",
    "The same for vLLM's standard page at bfloat16 (the uncompressed baseline) for this model and "
    "parallel layout.", "api")
COMPRESSION_RATIO = MetricFamily(
    "kvfold:compression_ratio", "gauge",
    "kvfold:kv_bytes_per_token_bf16_baseline / kvfold:kv_bytes_per_token (above 1: fewer bytes than "
    "bf16; a float32 model without compression is 0.5).", "api")
KV_CAPACITY_TOKENS = MetricFamily(
    "kvfold:kv_capacity_tokens", "gauge",
    "Tokens the allocated KV cache holds (vLLM's num_gpu_blocks x block_size, summed over engines "
    "as vLLM reports num_gpu_blocks).", "api")
KV_CACHE_BYTES = MetricFamily(
    "kvfold:kv_cache_bytes", "gauge",
    "Bytes of paged KV cache the kvfold attention layers of the workers attend over, measured in "
    "the workers from the cache tensors (published at each layer's first forward).", "worker")
STATE_BYTES = MetricFamily(
    "kvfold:state_bytes", "gauge",
    "Bytes of method state held outside the paged KV cache (codebooks, spectral bases), summed over "
    "layers and workers; 0 for methods without such state.", "worker")
CUDA_GRAPH_BYTES = MetricFamily(
    "kvfold:cuda_graph_bytes", "gauge",
    "GPU memory kept by the CUDA graphs kvfold captures of its decode steps (input copies, outputs, "
    "what each capture left allocated), outside vLLM's KV-cache accounting; at most "
    "KVFOLD_CUDA_GRAPH_MEMORY_MB per worker. Absent until a first capture.", "worker")
SCRATCH_BYTES = MetricFamily(
    "kvfold:scratch_bytes", "gauge",
    "Temporary GPU memory one step of a kvfold layer may take (K/V a prefill chunk rebuilds, decode "
    "scratch), reserved in vLLM's memory-profiling run so that the KV cache leaves room for it; per "
    "worker. Absent on CPU and for methods that need none.", "worker")
TOKENS_EVICTED = MetricFamily(
    "kvfold:tokens_evicted", "counter",
    "Cached tokens a method dropped from the KV cache (TreeKV); stays 0 for methods that never "
    "evict.", "worker")
ERRORS = MetricFamily(
    "kvfold:errors", "counter",
    "Exceptions raised inside a kvfold backend's cache write or attention, by exception class; "
    "absent until the first error.", "worker", extra_labels=("kind",))

FAMILIES: tuple[MetricFamily, ...] = (
    KV_BYTES_PER_TOKEN, KV_BYTES_PER_TOKEN_BF16, COMPRESSION_RATIO, KV_CAPACITY_TOKENS,
    KV_CACHE_BYTES, STATE_BYTES, CUDA_GRAPH_BYTES, SCRATCH_BYTES, TOKENS_EVICTED, ERRORS,
)


def served_model_name(vllm_config: Any) -> str:
    """The ``model_name`` label value, as vLLM's own ``vllm:*`` series carry it."""
    name = vllm_config.model_config.served_model_name
    return name[0] if isinstance(name, (list, tuple)) else str(name)
