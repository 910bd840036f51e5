"""Base classes of a kvfold attention backend on vLLM's paged KV cache.

A method subclasses :class:`KvfoldBackend` (what vLLM asks about the backend: name, supported
configurations, KV layout) and :class:`KvfoldImpl` (writes new K/V into the cache, attends).

Metrics interface (``kvfold:*`` on ``/metrics``, see ``kvfold.metrics``): a method that shrinks the
page does so in ``customize_spec`` and :meth:`KvfoldBackend.kv_bytes_per_token` follows from it; a
method holding state outside the paged cache returns its size from :meth:`KvfoldImpl.state_bytes`;
a method that drops cached tokens calls ``self.metrics.tokens_evicted(n)``. Exceptions raised by
``write_kv``/``attend`` are counted by the base class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionType,
    MultipleOf,
)

from kvfold.attention_backends.paged.metadata import PagedMetadata, PagedMetadataBuilder
from kvfold.metrics.worker import BackendMetrics, backend_metrics
from kvfold.options import KvfoldConfigError, MethodOptions

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.config.cache import CacheDType


# vLLM asks a backend for its KV spec (customize_spec) outside its config context; the layers built
# in this process under the config record their method's options here first.
_options_seen: dict[str, MethodOptions] = {}


def spec_options(name: str) -> MethodOptions:
    """Method ``name``'s options where ``customize_spec`` runs: from vLLM's current config when
    there is one, else as the layers built in this process recorded them."""
    from vllm.config import get_current_vllm_config_or_none

    from kvfold.attention_backends.selection import options_for

    config = get_current_vllm_config_or_none()
    if config is not None:
        return options_for(name, config.additional_config)
    if name not in _options_seen:
        raise KvfoldConfigError(f"{name}: options unknown outside vLLM's config context")
    return _options_seen[name]


class KvfoldBackend(AttentionBackend):
    """What vLLM's selector and KV-cache allocator ask of a kvfold backend."""

    forward_includes_kv_cache_update: bool = False  # vLLM calls impl.do_kv_cache_update first
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[CacheDType]] = ["auto", "float16", "bfloat16"]
    options_model: ClassVar[type[MethodOptions]] = MethodOptions
    #: Why vLLM's prefix caching cannot share this method's blocks, or None when it can. Read by
    #: the start-up check and by the Helm chart test (the chart adds --no-enable-prefix-caching).
    prefix_caching_refusal: ClassVar[str | None] = None

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @staticmethod
    def get_builder_cls() -> type[PagedMetadataBuilder]:
        return PagedMetadataBuilder

    @classmethod
    def check_vllm_config(cls, options: MethodOptions, vllm_config: VllmConfig) -> None:
        """Refuse, at start-up, an engine configuration the method cannot serve correctly."""

    @classmethod
    def kv_bytes_per_token(cls, vllm_config: VllmConfig) -> float:
        """KV-cache bytes one worker stores per cached token over all its attention layers.

        Derived from this backend's ``customize_spec`` applied to vLLM's standard page, i.e. the
        page vLLM really allocates; a method overrides ``customize_spec``, not this.
        """
        from vllm.config import set_current_vllm_config

        from kvfold.metrics.kv_accounting import attention_layers, bytes_per_token, standard_layer_spec

        with set_current_vllm_config(vllm_config):  # customize_spec may read the method's options
            spec = cls.customize_spec(standard_layer_spec(vllm_config))
        return bytes_per_token(spec, attention_layers(vllm_config), vllm_config)


class KvfoldImpl(AttentionImpl[PagedMetadata]):
    """Shared forward plumbing; a method implements :meth:`write_kv` and :meth:`attend`."""

    #: The registered backend name, used to find this method's options.
    method_name: ClassVar[str]
    options_model: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra_impl_args: Any,
    ) -> None:
        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logits soft-capping": logits_soft_cap not in (None, 0),
            f"attention type {attn_type!r}": attn_type != AttentionType.DECODER,
        }
        unsupported.update({name: value is not None for name, value in extra_impl_args.items()})
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise KvfoldConfigError(
                f"{self.method_name} does not support {', '.join(refused)} "
                "(needed by this model's attention layers)"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        self.options = self._current_options()
        _options_seen[self.method_name] = self.options
        self.metrics: BackendMetrics = self._current_metrics()
        # A layer sharing another layer's cache must not count that cache twice.
        self._cache_reported = kv_sharing_target_layer_name is not None

    @classmethod
    def _current_options(cls) -> MethodOptions:
        from vllm.config import get_current_vllm_config

        from kvfold.attention_backends.selection import options_for

        return options_for(cls.method_name, get_current_vllm_config().additional_config)

    @classmethod
    def _current_metrics(cls) -> BackendMetrics:
        from vllm.config import get_current_vllm_config

        from kvfold.metrics.names import served_model_name

        return backend_metrics(served_model_name(get_current_vllm_config()), cls.method_name)

    def state_bytes(self) -> int:
        """Bytes of method state this layer holds outside the paged KV cache (codebooks, bases)."""
        return 0

    def profile_scratch_bytes(self) -> int:
        """Temporary GPU memory a step of this layer may take beyond vLLM's own activations (K/V a
        prefill chunk rebuilds from compressed pages, decode scratch)."""
        return 0

    def reserve_scratch(self, device: torch.device) -> torch.Tensor | None:
        """Allocate :meth:`profile_scratch_bytes` once and drop it, in vLLM's memory-profiling run:
        its peak then counts that memory as activations and sizes the KV cache to leave it free,
        instead of a long prefill running the GPU out of memory mid-serving. CUDA only (the CPU
        KV cache is sized by ``VLLM_CPU_KVCACHE_SPACE``)."""
        nbytes = self.profile_scratch_bytes()
        if not nbytes or device.type != "cuda":
            return None
        self.metrics.scratch_reserved(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        try:
            self.write_kv(layer, key, value, kv_cache, slot_mapping)
        except Exception as exc:
            self.metrics.error(exc)
            raise

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: PagedMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{self.method_name} does not fuse output quantization")
        if attn_metadata is None:  # profiling / dummy run: nothing is cached yet
            self.reserve_scratch(query.device)
            return output
        if not self._cache_reported:
            # The first real forward is the first time this layer sees its allocated cache.
            self.metrics.layer_ready(kv_cache.numel() * kv_cache.element_size(), self.state_bytes())
            self._cache_reported = True
        n = attn_metadata.num_actual_tokens
        try:
            self.attend(layer, query[:n], key[:n], value[:n], kv_cache, attn_metadata, output[:n])
        except Exception as exc:
            self.metrics.error(exc)
            raise
        return output

    def write_kv(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        raise NotImplementedError

    def attend(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: PagedMetadata,
        output: torch.Tensor,
    ) -> None:
        """Write attention of ``query`` ``[T, Hq, D]`` into ``output`` ``[T, Hq, Dv]``.

        ``key``/``value`` are this step's new tokens; a backend whose ``forward_includes_kv_cache_update``
        is False has already stored them through :meth:`write_kv`.
        """
        raise NotImplementedError
