"""kvfold's vLLM model classes, by the architecture name vLLM reads from ``config.json``.

Import-light on purpose: vLLM's general plugin imports this module in every process, and the
classes are registered as ``"module:Class"`` strings that vLLM imports only when it builds a model.
"""

_ROPE_PP_LLAMA = "kvfold.models.rope_pp.vllm_llama:RoPEPPLlamaForCausalLM"

MODELS: dict[str, str] = {
    # kvfold's own name, for configs that want to be explicit.
    "RoPEPPLlamaForCausalLM": _ROPE_PP_LLAMA,
    # The RoPE++ authors save their checkpoints as plain "LlamaForCausalLM" (model_type "llama")
    # with an extra "rope_config" key, so this name must reach kvfold's class for
    # `vllm serve DIR` to work unchanged. Without "rope_config" the class builds exactly vLLM's
    # own Llama (same layers, same loader): see docs/rope-pp.md.
    "LlamaForCausalLM": _ROPE_PP_LLAMA,
    # Fourier-VLM (arXiv 2508.06038): DCT low-pass compression of the vision tokens. Own names
    # only, so stock checkpoints opt in with --hf-overrides '{"architectures": [...]}'.
    "FourierLlavaForConditionalGeneration":
        "kvfold.models.fourier_vlm.llava:FourierLlavaForConditionalGeneration",
    "FourierQwen2VLForConditionalGeneration":
        "kvfold.models.fourier_vlm.qwen2_vl:FourierQwen2VLForConditionalGeneration",
}
