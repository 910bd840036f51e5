"""``vllm.general_plugins`` entry point: makes the kvfold backends selectable by name.

vLLM calls :func:`register` in every process (API server, engine core, workers) before it builds a
model. It must be idempotent and cheap, and must not initialise CUDA.
"""

from __future__ import annotations

import logging

import kvfold
from kvfold.attention_backends import BACKENDS, CUSTOM_BACKEND, KV_CACHE_SPECS
from kvfold.models import MODELS

logger = logging.getLogger("vllm.kvfold")  # vLLM configures its "vllm" logger tree


def register() -> None:
    import vllm

    if not vllm.__version__.startswith(kvfold.SUPPORTED_VLLM + "."):
        # Raising here would break every vLLM start, with or without kvfold selected.
        logger.warning(
            "kvfold %s supports vLLM %s.x, found %s: kvfold backends are NOT registered",
            kvfold.__version__, kvfold.SUPPORTED_VLLM, vllm.__version__,
        )
        return
    for name in BACKENDS:
        ensure_member(name)
    _claim_custom()
    _register_kv_cache_specs()
    _register_models()
    from kvfold.vllm_plugins.platform import extend_current_platform

    extend_current_platform()


def ensure_member(name: str):
    """The ``AttentionBackendEnum`` member for kvfold backend ``name``, created if missing.

    Enum members pickle by value (the class path), and vLLM's spawned engine process unpickles its
    config before it loads plugins, where a runtime-created value is unknown. So each kvfold member
    pickles as a call of this importable function, which recreates it in the receiving process.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if name not in AttentionBackendEnum.__members__:
        register_backend(name, BACKENDS[name])  # never the decorator form: its value "" aliases
    member = AttentionBackendEnum[name]
    member.__reduce_ex__ = lambda protocol, _name=name: (ensure_member, (_name,))
    return member


def _register_kv_cache_specs() -> None:
    from vllm.utils.import_utils import resolve_obj_by_qualname

    for qualname in KV_CACHE_SPECS:
        resolve_obj_by_qualname(qualname)()


def _register_models() -> None:
    from vllm import ModelRegistry

    from kvfold.models.fourier_vlm.torchvision_free import ensure_importable

    # vLLM's LLaVA / Qwen2-VL modules (Fourier-VLM's bases) import a torchvision-backed helper;
    # without torchvision (the CPU torch build) they get the identical PIL-backend helper.
    try:
        ensure_importable()
    except Exception:  # never break text-only models over a vision helper
        logger.warning("kvfold: torchvision-free imports for LLaVA/Qwen2-VL not set up",
                       exc_info=True)
    for arch, qualname in MODELS.items():
        ModelRegistry.register_model(arch, qualname)  # lazy "module:Class": imported on use


def _claim_custom() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != CUSTOM_BACKEND:
        logger.info("kvfold leaves CUSTOM to %s, registered by another plugin", custom.get_path())
        return
    register_backend(custom, CUSTOM_BACKEND)
