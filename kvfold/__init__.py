"""kvfold: long-context KV-cache methods served by vLLM through its plugin interfaces."""

__version__ = "0.1.0"

#: The vLLM release line kvfold is written and tested against.
SUPPORTED_VLLM = "0.32"
