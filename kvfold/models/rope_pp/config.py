"""The ``rope_config`` key of an authors'-format RoPE++ checkpoint, and the head layout it implies.

The authors (github.com/OpenMOSS/rope_pp, ``train_rope_pp*.py``) save a plain Llama config
(``architectures: ["LlamaForCausalLM"]``, ``model_type: "llama"``) plus one extra key::

    "rope_config": {"imag": true, "imag_mode": "imag1"}          # RoPE++_EH: equal heads
    "rope_config": {"imag": true, "imag_mode": "imag2"}          # RoPE++_EC: equal cache
    "rope_config": {..., "factor": 8}                            # + linear position interpolation
    "rope_config": {..., "yarn": true, "factor": 32}             # + the authors' YaRN variant

Their modelling code ignores ``rope_scaling`` and reads the rotary settings from ``rope_config``
only, so a config that sets both is ambiguous and refused here. No torch, no vLLM: this module is
also what the API process and the tests use to check a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SUPPORTED_MODES = {"imag1": "RoPE++_EH (equal heads)", "imag2": "RoPE++_EC (equal cache)"}
# Ablations present in the authors' modelling code but never trained by their scripts.
ABLATION_MODES = ("imagh", "imago", "imagx")


class RoPEPPConfigError(ValueError):
    """A RoPE++ checkpoint config kvfold cannot serve faithfully; raised at model load."""


class RoPEPPConfig(BaseModel):
    """``config.json["rope_config"]``; unknown keys are an error, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    imag: bool = False
    imag_mode: str | None = None
    #: Linear position interpolation: inverse frequencies divided by ``factor``.
    factor: float = Field(default=1.0, gt=0)
    #: The authors' YaRN: frequencies blended by rotation count over 4096 positions, cos and sin
    #: scaled by 0.1 ln(factor) + 1.
    yarn: bool = False
    #: Set by the authors' evaluation wrapper: rope_theta is multiplied by it.
    scaling_factor: float = Field(default=1.0, gt=0)

    def mode(self) -> Literal["imag1", "imag2"] | None:
        """The RoPE++ variant, or None for real-only RoPE (``imag`` false)."""
        if not self.imag:
            return None  # the authors' code ignores imag_mode when imag is false
        if self.imag_mode in SUPPORTED_MODES:
            return self.imag_mode  # type: ignore[return-value]
        supported = ", ".join(f"'{m}' ({d})" for m, d in SUPPORTED_MODES.items())
        if self.imag_mode in ABLATION_MODES:
            raise RoPEPPConfigError(
                f"rope_config.imag_mode '{self.imag_mode}' is an ablation of the RoPE++ authors' "
                f"code that kvfold does not implement; supported: {supported}"
            )
        raise RoPEPPConfigError(
            f"rope_config.imag_mode {self.imag_mode!r} is unknown; supported: {supported}"
        )


@dataclass(frozen=True)
class HeadLayout:
    """Head counts of one RoPE++ attention layer (totals, before tensor parallelism).

    Each q_proj head h becomes two attention heads, interleaved as [h_re, h_im] (the authors'
    order, which o_proj's input columns follow). Both read the KV head that h reads, so the
    imaginary part costs query heads, never cache.
    """

    num_q_heads: int  # heads produced by q_proj (checkpoint shape)
    num_kv_heads: int  # heads of k_proj / v_proj = heads in the KV cache
    num_attn_heads: int  # heads the attention kernel runs = o_proj input heads
    head_dim: int
    imag: bool

    @property
    def q_heads_per_kv(self) -> int:
        return self.num_attn_heads // self.num_kv_heads


def head_layout(
    num_attention_heads: int, num_key_value_heads: int, head_dim: int, mode: str | None
) -> HeadLayout:
    """The layout for config head counts H, KV under ``mode`` (None, imag1 or imag2)."""
    h, kv = num_attention_heads, num_key_value_heads
    if head_dim % 2:
        raise RoPEPPConfigError(f"RoPE++ needs an even head_dim, got {head_dim}")
    if h <= 0 or kv <= 0 or h % kv:
        raise RoPEPPConfigError(
            f"num_attention_heads ({h}) must be a positive multiple of num_key_value_heads ({kv})"
        )
    if mode is None:
        return HeadLayout(h, kv, h, head_dim, imag=False)
    if mode == "imag1":
        # EH: q/k/v projections have half the heads; real + imaginary restore H attention heads.
        if h % 2 or kv % 2:
            raise RoPEPPConfigError(
                "rope_config.imag_mode 'imag1' (RoPE++_EH) halves the q and kv heads, so "
                f"num_attention_heads ({h}) and num_key_value_heads ({kv}) must both be even"
            )
        return HeadLayout(h // 2, kv // 2, h, head_dim, imag=True)
    if mode == "imag2":
        # EC: full q/k/v projections; 2H attention heads over the unchanged KV cache.
        return HeadLayout(h, kv, 2 * h, head_dim, imag=True)
    raise RoPEPPConfigError(f"unknown RoPE++ mode {mode!r}")


@dataclass(frozen=True)
class RoPEPPModelSpec:
    """Everything the model class needs from an authors'-format config."""

    rope: RoPEPPConfig
    layout: HeadLayout
    rope_theta: float  # already multiplied by rope.scaling_factor


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    # transformers 5 folds rope_theta / rope_scaling into rope_parameters; older configs keep them.
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None)
    if legacy:
        params = {**dict(legacy), **params}
    if "rope_theta" not in params and getattr(hf_config, "rope_theta", None) is not None:
        params["rope_theta"] = hf_config.rope_theta
    return params


def read_spec(hf_config: Any) -> RoPEPPModelSpec | None:
    """The RoPE++ spec of ``hf_config``, or None when it has no ``rope_config`` key (plain Llama).

    Raises :class:`RoPEPPConfigError` naming the problem for anything kvfold cannot serve exactly
    as the authors' code computes it.
    """
    raw = getattr(hf_config, "rope_config", None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RoPEPPConfigError(f"rope_config must be a JSON object, got {type(raw).__name__}")
    try:
        rope = RoPEPPConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            else:
                problems.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
        allowed = ", ".join(RoPEPPConfig.model_fields)
        raise RoPEPPConfigError(
            f"invalid rope_config: {'; '.join(problems)} (allowed keys: {allowed})"
        ) from None
    mode = rope.mode()

    params = _rope_parameters(hf_config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise RoPEPPConfigError(
            f"config sets rope_scaling/rope_parameters type {rope_type!r} as well as rope_config; "
            "the RoPE++ authors' code ignores rope_scaling, so the checkpoint is ambiguous. Put "
            "the scaling in rope_config ('factor', 'yarn') and set rope_scaling to null"
        )
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise RoPEPPConfigError(
            f"partial_rotary_factor {partial} is not supported with rope_config (the authors' "
            "code rotates the whole head)"
        )
    if not getattr(hf_config, "is_causal", True):
        raise RoPEPPConfigError("RoPE++ is a causal decoder; is_causal=false is not supported")

    h = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or h
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // h
    theta = float(params.get("rope_theta", 10000.0)) * rope.scaling_factor
    return RoPEPPModelSpec(rope, head_layout(h, kv, head_dim, mode), theta)
