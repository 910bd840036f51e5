"""vLLM's ``CUSTOM`` backend slot, dispatched to the kvfold method named in the kvfold options.

``--attention-backend CUSTOM --additional-config '{"kvfold": {"method": "dense"}}'`` is the
selection that needs no dynamic enum member, for tools that only know vLLM's built-in names.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.attention.backend import AttentionImpl, MultipleOf
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kvfold.attention_backends.paged.backend import KvfoldBackend
from kvfold.attention_backends.paged.metadata import PagedMetadataBuilder
from kvfold.attention_backends.selection import backend_class, method_for
from kvfold.options import KvfoldConfigError

# vLLM asks some questions (customize_spec) outside its config context; by then the layers of this
# process were built, which resolved the method under the config, so remember it per process.
_resolved: type[KvfoldBackend] | None = None


def _method() -> type[KvfoldBackend]:
    global _resolved
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is not None:
        _resolved = backend_class(method_for("CUSTOM", config.additional_config))
    if _resolved is None:
        raise KvfoldConfigError("CUSTOM: the kvfold method is unknown outside vLLM's config")
    return _resolved


class CustomBackend(KvfoldBackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return _method().get_impl_cls()

    @staticmethod
    def get_builder_cls() -> type[PagedMetadataBuilder]:
        return _method().get_builder_cls()

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return _method().get_supported_kernel_block_sizes(kv_cache_spec)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return _method().customize_spec(spec)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...] | None:
        return _method().supported_kv_cache_layouts()

    @classmethod
    def validate_configuration(cls, **kwargs: Any) -> list[str]:
        return _method().validate_configuration(**kwargs)
