"""RoPE++ config validation and rotary math (no engine): fast checks of every rule and identity."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from kvfold.models.rope_pp.config import RoPEPPConfig, RoPEPPConfigError, head_layout, read_spec
from kvfold.models.rope_pp.rotary import (
    cos_sin_cache,
    imaginary_query,
    inverse_frequencies,
    with_imaginary_heads,
)


def llama_config(rope_config=None, heads=8, kv_heads=4, head_dim=32, **extra):
    """A config object shaped like the authors' (attributes as transformers exposes them)."""
    cfg = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads,
                          head_dim=head_dim, hidden_size=256,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra)
    if rope_config is not None:
        cfg.rope_config = rope_config
    return cfg


def test_no_rope_config_means_plain_llama() -> None:
    assert read_spec(llama_config()) is None


@pytest.mark.parametrize("mode, q, kv, attn", [("imag1", 4, 2, 8), ("imag2", 8, 4, 16)])
def test_layouts_of_the_authors_variants(mode, q, kv, attn) -> None:
    spec = read_spec(llama_config({"imag": True, "imag_mode": mode}))
    layout = spec.layout
    assert (layout.num_q_heads, layout.num_kv_heads, layout.num_attn_heads) == (q, kv, attn)
    assert layout.imag and layout.q_heads_per_kv == attn // kv


def test_imag_false_keeps_the_heads_and_ignores_imag_mode() -> None:
    # The authors' real-RoPE baselines carry {"imag": false, "imag_mode": "imag1"}.
    layout = read_spec(llama_config({"imag": False, "imag_mode": "imag1"})).layout
    assert (layout.num_q_heads, layout.num_kv_heads, layout.num_attn_heads) == (8, 4, 8)
    assert not layout.imag


@pytest.mark.parametrize(
    "rope_config, extra, message",
    [
        ({"imag": True, "imag_mode": "imag3"}, {}, "imag_mode 'imag3' is unknown"),
        ({"imag": True}, {}, "imag_mode None is unknown"),
        ({"imag": True, "imag_mode": "imagh"}, {}, "ablation of the RoPE++ authors' code"),
        ({"imag": True, "imag_mode": "imag1", "theta": 5}, {}, "unknown key 'theta'"),
        ({"imag": True, "imag_mode": "imag1", "factor": 0}, {}, "'factor'"),
        ({"imag": True, "imag_mode": "imag1"}, {"kv_heads": 1, "heads": 8}, "must both be even"),
        ({"imag": True, "imag_mode": "imag1"}, {"kv_heads": 4, "heads": 6}, "positive multiple"),
        ({"imag": True, "imag_mode": "imag2"}, {"head_dim": 33}, "even head_dim"),
        ("imag1", {}, "must be a JSON object"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(rope_config, extra, message) -> None:
    with pytest.raises(RoPEPPConfigError, match=re.escape(message)):
        read_spec(llama_config(rope_config, **extra))


def test_rope_scaling_beside_rope_config_is_ambiguous() -> None:
    cfg = llama_config({"imag": True, "imag_mode": "imag1"})
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(RoPEPPConfigError, match="ambiguous"):
        read_spec(cfg)


def test_scaling_factor_multiplies_rope_theta() -> None:
    spec = read_spec(llama_config({"imag": False, "scaling_factor": 4}))
    assert spec.rope_theta == 40000.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def test_imaginary_query_is_the_authors_formula() -> None:
    # The authors write q_im = q sin - rotate_half(q) cos on the unrotated q; kvfold rotates q
    # once (vLLM's op) and derives q_im from the result. Both must be the same vector.
    torch.manual_seed(0)
    q = torch.randn(7, 3, 16, dtype=torch.float64)
    inv_freq, _ = inverse_frequencies(16, 10000.0, RoPEPPConfig())
    angles = torch.arange(7, dtype=torch.float64)[:, None] * inv_freq.double()
    cos = torch.cat((angles.cos(), angles.cos()), -1)[:, None]
    sin = torch.cat((angles.sin(), angles.sin()), -1)[:, None]
    q_rope = q * cos + rotate_half(q) * sin
    torch.testing.assert_close(imaginary_query(q_rope), q * sin - rotate_half(q) * cos)


def test_imaginary_score_is_the_imaginary_part_of_the_complex_product() -> None:
    torch.manual_seed(1)
    d = 16
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    inv_freq, _ = inverse_frequencies(d, 10000.0, RoPEPPConfig())
    t, s = 11, 4

    def rope(x, pos):
        a = pos * inv_freq.double()
        c, sn = torch.cat((a.cos(), a.cos())), torch.cat((a.sin(), a.sin()))
        return x * c + rotate_half(x) * sn

    w = (torch.complex(q[: d // 2], q[d // 2 :]) * torch.complex(k[: d // 2], -k[d // 2 :])
         * torch.polar(torch.ones(d // 2, dtype=torch.float64), (t - s) * inv_freq.double())).sum()
    assert torch.isclose(rope(q, t) @ rope(k, s), w.real)
    assert torch.isclose(imaginary_query(rope(q, t)) @ rope(k, s), w.imag)
    assert not torch.isclose(w.imag, w.real)  # the two heads really see different scores


def test_heads_are_interleaved_real_then_imaginary() -> None:
    q = torch.randn(5, 3, 8)
    out = with_imaginary_heads(q)
    assert out.shape == (5, 6, 8)
    for h in range(3):
        torch.testing.assert_close(out[:, 2 * h], q[:, h])
        torch.testing.assert_close(out[:, 2 * h + 1], imaginary_query(q[:, h]))


def test_default_table_equals_vllm_rope() -> None:
    # Without scaling, kvfold's table must be exactly the one vLLM's get_rope builds for Llama.
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):  # vLLM's custom ops read it when built
        vllm_rope = get_rope(32, max_position=512, rope_parameters={"rope_theta": 10000.0},
                             dtype=torch.float32)
    inv_freq, mscale = inverse_frequencies(32, 10000.0, RoPEPPConfig())
    assert mscale == 1.0
    assert torch.equal(cos_sin_cache(inv_freq, mscale, 512), vllm_rope.cos_sin_cache)


def test_linear_factor_divides_every_frequency() -> None:
    base, _ = inverse_frequencies(64, 10000.0, RoPEPPConfig())
    pi, mscale = inverse_frequencies(64, 10000.0, RoPEPPConfig(factor=8))
    torch.testing.assert_close(pi, base / 8)
    assert mscale == 1.0


def test_authors_yarn_keeps_fast_and_interpolates_slow_frequencies() -> None:
    d, factor = 64, 16.0
    base, _ = inverse_frequencies(d, 10000.0, RoPEPPConfig())
    yarn, mscale = inverse_frequencies(d, 10000.0, RoPEPPConfig(yarn=True, factor=factor))
    turns = 4096 * base / (2 * math.pi)
    fast, slow = turns >= 32, turns <= 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()  # all three regimes present
    torch.testing.assert_close(yarn[fast], base[fast])
    torch.testing.assert_close(yarn[slow], base[slow] / factor)
    mid = ~fast & ~slow
    assert ((yarn[mid] < base[mid]) & (yarn[mid] > base[mid] / factor)).all()
    assert mscale == pytest.approx(1 + 0.1 * math.log(factor))
    table = cos_sin_cache(yarn, mscale, 10)
    assert torch.allclose(table[:, : d // 2] ** 2 + table[:, d // 2 :] ** 2,
                          torch.tensor(mscale**2))


def test_head_layout_refuses_non_positive_heads() -> None:
    with pytest.raises(RoPEPPConfigError):
        head_layout(0, 1, 32, "imag2")


def test_plugin_registers_the_rope_pp_architectures() -> None:
    from vllm import ModelRegistry

    from kvfold.models import MODELS
    from kvfold.vllm_plugins.general import register

    register()
    for arch in ("LlamaForCausalLM", "RoPEPPLlamaForCausalLM"):
        entry = ModelRegistry.models[arch]
        assert f"{entry.module_name}:{entry.class_name}" == MODELS[arch]
        assert MODELS[arch] == "kvfold.models.rope_pp.vllm_llama:RoPEPPLlamaForCausalLM"


def test_the_class_is_vllms_llama() -> None:
    # Interfaces vLLM checks on the class (PP, LoRA, quantization, ...) are inherited unchanged.
    from vllm.model_executor.models.llama import LlamaForCausalLM

    from kvfold.models.rope_pp.vllm_llama import RoPEPPLlamaForCausalLM

    assert issubclass(RoPEPPLlamaForCausalLM, LlamaForCausalLM)
    assert RoPEPPLlamaForCausalLM.packed_modules_mapping == LlamaForCausalLM.packed_modules_mapping
