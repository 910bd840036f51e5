"""Entry points vLLM loads: ``general`` (registration in every process)."""
