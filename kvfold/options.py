"""Method options from ``--additional-config '{"kvfold": {...}}'``, checked by pydantic at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from kvfold.errors import KvfoldConfigError

SECTION = "kvfold"


class MethodOptions(BaseModel):
    """Base of every method's options: unknown keys are an error, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def kvfold_section(additional_config: Any) -> dict[str, Any] | None:
    """The ``kvfold`` part of vLLM's ``additional_config``, or None when there is none."""
    if not isinstance(additional_config, Mapping) or SECTION not in additional_config:
        return None
    section = additional_config[SECTION]
    if not isinstance(section, Mapping):
        raise KvfoldConfigError(
            f'--additional-config "{SECTION}" must be a JSON object, got {type(section).__name__}'
        )
    return dict(section)


def parse_options(
    backend_name: str, model: type[MethodOptions], values: Mapping[str, Any]
) -> MethodOptions:
    """Validate ``values`` against ``model``; the error names every bad key and the allowed ones."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<options>"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown option '{key}'")
            else:
                problems.append(f"option '{key}': {err['msg']} (got {err.get('input')!r})")
        allowed = ", ".join(sorted(model.model_fields)) or "none"
        raise KvfoldConfigError(
            f"{backend_name}: invalid --additional-config "
            f'{{"{SECTION}": ...}}: {"; ".join(problems)}. Options of {backend_name}: {allowed}.'
        ) from None
