"""The ``fourier_vlm`` key of a checkpoint's config.json (or of ``--hf-overrides``), validated.

LLaVA-1.5 compresses before the projector, from the CLIP grid (24x24 at 336 px) to a fixed
``reserve x reserve`` (the authors' ``apply_to_llava(reserve=12)``)::

    "fourier_vlm": {"reserve": 12}            # 576 -> 144 tokens; 8 -> 64, 16 -> 256
    "fourier_vlm": {"reserve": [12, 16]}      # rows x columns

Qwen2-VL compresses after the PatchMerger, per frame, each side scaled by ``ratio`` with the
authors' rounding ``max(int(side * ratio), 1)`` (default 2/3, their released checkpoints)::

    "fourier_vlm": {"ratio": 0.5}

Both accept ``"norm": "ortho"`` (default: the authors' orthonormal transforms, energy-preserving)
or ``"mean"`` (kvfold's option: rescaled so a constant grid keeps its value). No torch, no vLLM:
the API process and the tests use this module too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_KEY = "fourier_vlm"
Side = Annotated[int, Field(strict=True, ge=1)]


class FourierVLMConfigError(ValueError):
    """A ``fourier_vlm`` setting that cannot be served; raised when vLLM builds the model."""


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    norm: Literal["ortho", "mean"] = "ortho"


class LlavaFourierOptions(_Options):
    """LLaVA: the kept grid, square (one int) or ``[rows, columns]``."""

    reserve: Side | tuple[Side, Side] = 12

    def kept(self) -> tuple[int, int]:
        r = self.reserve
        return (r, r) if isinstance(r, int) else (r[0], r[1])


class Qwen2VLFourierOptions(_Options):
    """Qwen2-VL: the per-axis ratio of kept merged tokens, in (0, 1]."""

    ratio: float = Field(default=2 / 3, gt=0, le=1)

    def kept(self, rows: int, cols: int) -> tuple[int, int]:
        """The kept grid of a ``rows x cols`` merged-token frame (the authors' rounding)."""
        return max(int(rows * self.ratio), 1), max(int(cols * self.ratio), 1)


_EXPECTED = {
    "reserve": "a positive integer or a [rows, columns] pair of positive integers",
    "ratio": "a number in (0, 1]",
    "norm": "'ortho' or 'mean'",
}


def _validate(model: type[_Options], raw: Any, architecture: str) -> _Options:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FourierVLMConfigError(
            f"{architecture}: config key '{CONFIG_KEY}' must be a JSON object, got "
            f"{type(raw).__name__}"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems: dict[str, str] = {}
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else "<config>"
            if err["type"] == "extra_forbidden":
                problems[key] = f"unknown key '{key}'"
            elif key in _EXPECTED:  # one line per key, also for the arms of a union
                problems[key] = f"'{key}' must be {_EXPECTED[key]} (got {raw.get(key)!r})"
            else:
                problems[key] = f"'{key}': {err['msg']} (got {err.get('input')!r})"
        allowed = ", ".join(model.model_fields)
        raise FourierVLMConfigError(
            f"{architecture}: invalid '{CONFIG_KEY}' config: {'; '.join(problems.values())} "
            f"(allowed keys: {allowed})"
        ) from None


def llava_options(hf_config: Any, architecture: str = "FourierLlava") -> LlavaFourierOptions:
    """``hf_config.fourier_vlm`` for LLaVA, validated; defaults when the key is absent."""
    return _validate(LlavaFourierOptions, getattr(hf_config, CONFIG_KEY, None), architecture)


def qwen2_vl_options(
    hf_config: Any, architecture: str = "FourierQwen2VL"
) -> Qwen2VLFourierOptions:
    """``hf_config.fourier_vlm`` for Qwen2-VL, validated; defaults when the key is absent."""
    return _validate(Qwen2VLFourierOptions, getattr(hf_config, CONFIG_KEY, None), architecture)
