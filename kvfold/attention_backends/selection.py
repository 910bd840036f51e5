"""Which kvfold method an engine runs and with which options; every refusal happens here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvfold.attention_backends import BACKENDS, canonical_name
from kvfold.options import KvfoldConfigError, MethodOptions, kvfold_section

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from kvfold.attention_backends.paged.backend import KvfoldBackend


def backend_class(name: str) -> type[KvfoldBackend]:
    from vllm.utils.import_utils import resolve_obj_by_qualname

    return resolve_obj_by_qualname(BACKENDS[name])


def method_for(backend_name: str, additional_config: Any) -> str:
    """The kvfold backend that serves ``backend_name`` (a kvfold name, or CUSTOM plus "method")."""
    section = kvfold_section(additional_config) or {}
    method = section.get("method")
    if method is not None and not isinstance(method, str):
        raise KvfoldConfigError(f'kvfold option "method" must be a string, got {method!r}')
    known = ", ".join(BACKENDS)
    if backend_name == "CUSTOM":
        if method is None:
            raise KvfoldConfigError(
                '--attention-backend CUSTOM runs a kvfold method named in --additional-config '
                f"'{{\"kvfold\": {{\"method\": ...}}}}'; none was given. Methods: {known}."
            )
        name = canonical_name(method)
        if name not in BACKENDS:
            raise KvfoldConfigError(f"unknown kvfold method {method!r}. Methods: {known}.")
        return name
    if method is not None and canonical_name(method) != backend_name:
        raise KvfoldConfigError(
            f'kvfold option "method": {method!r} contradicts --attention-backend {backend_name}'
        )
    return backend_name


def options_for(name: str, additional_config: Any) -> MethodOptions:
    """The validated options of kvfold backend ``name``."""
    section = kvfold_section(additional_config) or {}
    section.pop("method", None)  # checked by method_for
    return _parse(name, section)


def _parse(name: str, values: dict[str, Any]) -> MethodOptions:
    from kvfold.options import parse_options

    return parse_options(name, backend_class(name).options_model, values)


def validate_vllm_config(vllm_config: VllmConfig) -> None:
    """Start-up check in the API process: bad kvfold options stop vLLM before any worker starts."""
    backend = vllm_config.attention_config.backend
    selected = backend.name if backend is not None else None
    has_section = kvfold_section(vllm_config.additional_config) is not None
    if selected in BACKENDS or (selected == "CUSTOM" and owns_custom()):
        name = method_for(selected, vllm_config.additional_config)
        options = options_for(name, vllm_config.additional_config)
        cls = backend_class(name)
        if cls.prefix_caching_refusal and vllm_config.cache_config.enable_prefix_caching:
            raise KvfoldConfigError(f"{name} {cls.prefix_caching_refusal}: start vLLM with "
                                    "--no-enable-prefix-caching")
        cls.check_vllm_config(options, vllm_config)
    elif has_section:
        raise KvfoldConfigError(
            "--additional-config has a 'kvfold' section, but the attention backend is "
            f"{selected or 'chosen automatically'}, so no kvfold method would run. "
            f"Select one with --attention-backend ({', '.join(BACKENDS)})."
        )


def owns_custom() -> bool:
    """True when vLLM's CUSTOM slot points at kvfold's dispatcher (another plugin may own it)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from kvfold.attention_backends import CUSTOM_BACKEND

    custom = AttentionBackendEnum.CUSTOM
    return custom.is_overridden() and custom.get_path() == CUSTOM_BACKEND
