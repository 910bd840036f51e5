"""RoPE++ (Liu et al., arXiv 2512.07525): real and imaginary attention heads over one KV cache.

- ``config``: the ``rope_config`` key of an authors'-format checkpoint, validated, and the head
  layout it implies (no torch, no vLLM).
- ``rotary``: the rotary tables and the imaginary query in pure torch (the readable math).
- ``vllm_llama``: the vLLM model class (Llama family), registered in ``kvfold.models.MODELS``.
"""
