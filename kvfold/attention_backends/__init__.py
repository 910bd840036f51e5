"""The kvfold attention backends, by the name users pass to ``--attention-backend``.

A method is one sub-package (reference, vLLM glue, kernels) plus one line here. This module must
stay import-light: vLLM's plugin loader imports it in every process before anything else runs.
"""

BACKENDS: dict[str, str] = {
    "KVFOLD_DENSE": "kvfold.attention_backends.dense.backend.DenseBackend",
    "KVFOLD_TREEKV": "kvfold.attention_backends.treekv.backend.TreeKVBackend",
    "KVFOLD_VQKV": "kvfold.attention_backends.vqkv.backend.VQKVBackend",
    "KVFOLD_FOURIER": "kvfold.attention_backends.fourier.backend.FourierBackend",
}

#: KV-cache spec types a method adds to vLLM's allocator, registered in every vLLM process.
KV_CACHE_SPECS: list[str] = ["kvfold.attention_backends.paged.reserved.register"]

#: ``--attention-backend CUSTOM`` dispatches to the method named in ``{"kvfold": {"method": ...}}``.
CUSTOM_BACKEND = "kvfold.attention_backends.custom.CustomBackend"


def canonical_name(method: str) -> str:
    """``dense``, ``kvfold_dense`` and ``KVFOLD_DENSE`` all name the same backend."""
    upper = method.strip().upper()
    return upper if upper.startswith("KVFOLD_") else f"KVFOLD_{upper}"
