"""kvfold's transformers-side RoPE++ model (what the calibration commands load) against the float64
complex-arithmetic reference, for EH and EC, default RoPE and the authors' YaRN, with and without a
KV cache; and the calibration loader picking it for a RoPE++ checkpoint."""

from __future__ import annotations

import pytest
import torch
from rope_pp_reference import load_reference, reference_logits, write_rope_pp_checkpoint

from kvfold.attention_backends.vqkv.calibrate import load_model
from kvfold.models.rope_pp.hf_model import HFRoPEPPAttention

CASES = {
    "eh": ({"imag": True, "imag_mode": "imag1"}, 8, 4, 32),
    "ec-yarn": ({"imag": True, "imag_mode": "imag2", "yarn": True, "factor": 4.0}, 4, 2, 64),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    rope_config, heads, kv_heads, head_dim = CASES[request.param]
    return write_rope_pp_checkpoint(tmp_path_factory.mktemp(request.param), rope_config,
                                    num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_logits_equal_the_complex_reference(checkpoint) -> None:
    model = load_model(checkpoint, torch.float64, "cpu")
    assert all(isinstance(layer.self_attn, HFRoPEPPAttention) for layer in model.model.layers)
    ids = torch.randint(3, 259, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]), use_cache=False).logits[0]
    reference = reference_logits(load_reference(checkpoint), ids)
    # The rotary table is float32, as in vLLM and kvfold's vLLM class; the reference's is float64.
    assert _relative(ours, reference) < 2e-5
    wrong = reference_logits(load_reference(checkpoint, imaginary="conjugate"), ids)
    assert _relative(ours, wrong) > 0.05  # the comparison can tell a wrong imaginary head


def test_cached_chunks_equal_one_pass(checkpoint) -> None:
    """Two chunks through transformers' DynamicCache = one pass (the cache the VQKV calibration reads)."""
    from transformers import DynamicCache

    model = load_model(checkpoint, torch.float64, "cpu")
    ids = torch.randint(3, 259, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        cache = DynamicCache()
        first = model(ids[:, :50], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 50:], past_key_values=cache, use_cache=True).logits
    assert _relative(torch.cat((first, second), dim=1), whole) < 1e-12
    assert cache.layers[0].keys.shape[2] == 90


def test_truncated_to_the_first_layers(checkpoint) -> None:
    model = load_model(checkpoint, torch.float32, "cpu", num_layers=1)
    assert len(model.model.layers) == 1
