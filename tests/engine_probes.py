"""Functions the engine driver runs inside vLLM's worker (an importable module, so they pickle)."""


def attention_impls(model) -> list[str]:
    """The attention implementation class of every attention layer the worker built."""
    return [type(m.impl).__name__ for m in model.modules() if hasattr(m, "impl")]


def model_class(model) -> str:
    """``module:Class`` of the model the worker built (which registered class vLLM chose)."""
    return f"{type(model).__module__}:{type(model).__qualname__}"
