"""Two hooks kvfold adds to the live vLLM platform class, from the general plugin.

* ``check_and_update_config``: vLLM calls it with the complete config in the API process, so bad
  kvfold options stop start-up there, before an engine process is spawned.
* ``get_attn_backend_cls`` (CPU only): vLLM's CpuPlatform runs CPU_ATTN whatever backend was
  selected, logging at INFO. kvfold makes it honour a selected kvfold backend, after the same
  ``validate_configuration`` check CUDA runs (an invalid selection raises; it never falls back).

Extending the resolved class in place, rather than shipping a ``vllm.platform_plugins`` subclass,
also covers ``VLLM_TARGET_DEVICE=cpu`` (which skips platform plugins) and cannot collide with
another out-of-tree platform plugin (two active ones make vLLM refuse to start).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvfold.attention_backends import BACKENDS

if TYPE_CHECKING:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

logger = logging.getLogger("vllm.kvfold")  # vLLM configures its "vllm" logger tree

_MARK = "_kvfold_extended"


def extend_current_platform() -> None:
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if cls.__dict__.get(_MARK):
        return
    original_check = cls.check_and_update_config

    def check_and_update_config(klass: type, vllm_config: Any) -> None:
        original_check(vllm_config)
        from kvfold.attention_backends.selection import validate_vllm_config

        validate_vllm_config(vllm_config)

    cls.check_and_update_config = classmethod(check_and_update_config)

    if current_platform.is_cpu():
        original_select = cls.get_attn_backend_cls

        def get_attn_backend_cls(
            klass: type, selected_backend: Any, attn_selector_config: Any, num_heads: Any = None
        ) -> str:
            path = kvfold_backend_path(klass, selected_backend, attn_selector_config)
            if path is None:
                return original_select(selected_backend, attn_selector_config, num_heads)
            return path

        cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    setattr(cls, _MARK, True)


def kvfold_backend_path(
    platform_cls: type, selected: AttentionBackendEnum | None, selector_config: Any
) -> str | None:
    """The class path for a selected kvfold backend, or None to leave the choice to vLLM."""
    from kvfold.attention_backends.selection import owns_custom

    if selected is None or not (selected.name in BACKENDS or (selected.name == "CUSTOM" and owns_custom())):
        return None
    backend = selected.get_class()
    invalid = backend.validate_configuration(
        device_capability=platform_cls.get_device_capability(), **selector_config._asdict()
    )
    if invalid:
        raise ValueError(f"Selected backend {selected.name} is not valid for this model: {', '.join(invalid)}")
    logger.info("Using %s backend on %s.", selected.name, platform_cls.__name__)
    return f"{backend.__module__}.{backend.__qualname__}"
