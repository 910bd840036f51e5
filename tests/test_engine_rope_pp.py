"""RoPE++ checkpoints in the authors' format, served by real vLLM engines, against the reference.

Each engine run serves one batch of prompts of several lengths and returns the raw logits over the
whole vocabulary for every prompt position and every greedy step, so one start checks prefill,
chunked prefill, decode and batching at once.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from rope_pp_reference import (
    load_reference,
    reference_greedy,
    reference_logits,
    write_rope_pp_checkpoint,
)

pytestmark = pytest.mark.engine

VOCAB = 259
LENGTHS = (5, 37, 200, 300)  # one batch; prompts cross several 128-token blocks
MAX_TOKENS = 8
rng = random.Random(3)
PROMPTS = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in LENGTHS]
TOLERANCE = 1e-3  # relative, float32 vLLM vs float64 reference
KVFOLD_CLASS = "kvfold.models.rope_pp.vllm_llama:RoPEPPLlamaForCausalLM"

# EH halves q/k/v heads (8 -> 4 q, 4 -> 2 kv) and attends with 8 heads; EC keeps 4 q / 2 kv heads
# and attends with 8. PLAIN has the same KV bytes per token as EC and twice EH's.
CHECKPOINTS = {
    "eh": dict(rope_config={"imag": True, "imag_mode": "imag1"},
               num_heads=8, num_kv_heads=4, head_dim=32, seed=11),
    "ec": dict(rope_config={"imag": True, "imag_mode": "imag2", "yarn": True, "factor": 4},
               num_heads=4, num_kv_heads=2, head_dim=64, seed=12),
    "plain": dict(rope_config=None, num_heads=8, num_kv_heads=4, head_dim=32, seed=13),
}
BACKENDS = {
    "CPU_ATTN": dict(attention_backend="CPU_ATTN"),
    # A 64-token step budget cuts the long prompts into chunks attending to cached chunks.
    "KVFOLD_DENSE": dict(attention_backend="KVFOLD_DENSE", enable_chunked_prefill=True,
                         max_num_batched_tokens=64),
}
IMPLS = {"CPU_ATTN": "CPUAttentionBackendImpl", "KVFOLD_DENSE": "DenseImpl"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope_pp")
    return {name: write_rope_pp_checkpoint(root / name, **kw) for name, kw in CHECKPOINTS.items()}


@pytest.fixture(scope="module")
def engine(run_engine, checkpoints):
    """``engine(checkpoint, backend)``: one engine run per pair, shared by the tests."""
    runs = {}

    def get(name: str, backend: str, **env):
        key = (name, backend, tuple(sorted(env.items())))
        if key not in runs:
            runs[key] = run_engine(checkpoints[name], PROMPTS, MAX_TOKENS, full_logits=VOCAB,
                                   env=env or None, **BACKENDS[backend])
        return runs[key]

    return get


@pytest.fixture(scope="module")
def reference(checkpoints):
    """``reference(name, imaginary)``: per prompt (prompt logits, greedy tokens, step logits)."""
    cache = {}

    def get(name: str, imaginary: str = "im"):
        if (name, imaginary) not in cache:
            model = load_reference(checkpoints[name], imaginary)
            cache[name, imaginary] = [
                (reference_logits(model, p)[:-1], *reference_greedy(model, p, MAX_TOKENS))
                for p in PROMPTS
            ]
        return cache[name, imaginary]

    return get


def relative_error(got, ref: torch.Tensor) -> float:
    got = torch.tensor(got, dtype=torch.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return ((got - ref).abs().max() / ref.abs().max()).item()


def worst_errors(run, ref) -> tuple[float, float]:
    """Max relative error over prompts of (prompt logits, greedy-step logits)."""
    prompt = max(relative_error(run["prompt_logits"][i], r[0]) for i, r in enumerate(ref))
    steps = max(relative_error(run["step_logits"][i], r[2]) for i, r in enumerate(ref))
    return prompt, steps


# Both variants on vLLM's CPU backend, and EH (query heads 2x per KV head) on kvfold's dense
# backend too; the model class is the same whatever the backend, so EC on KVFOLD_DENSE would add an
# engine start (~70 s of CI) and no code path.
@pytest.mark.parametrize(("name", "backend"), [("eh", "CPU_ATTN"), ("eh", "KVFOLD_DENSE"), ("ec", "CPU_ATTN")])
def test_logits_and_greedy_match_the_reference(engine, reference, name, backend) -> None:
    run = engine(name, backend)
    assert run["model_class"] == KVFOLD_CLASS
    assert set(run["impls"]) == {IMPLS[backend]}, run["impls"]
    ref = reference(name)
    prompt_err, step_err = worst_errors(run, ref)
    print(f"\n{name} {backend}: max relative logits error prompt {prompt_err:.2e} "
          f"decode {step_err:.2e}")
    assert prompt_err < TOLERANCE and step_err < TOLERANCE
    assert run["tokens"] == [r[1] for r in ref]


@pytest.mark.parametrize("name", ["eh", "ec"])
@pytest.mark.parametrize("imaginary", ["drop", "conjugate"])
def test_wrong_imaginary_heads_do_not_match(engine, reference, name, imaginary) -> None:
    # Negative controls: without the imaginary heads, or with their sign flipped, the reference
    # must be far from vLLM; otherwise the comparison above could not tell.
    prompt_err, step_err = worst_errors(engine(name, "CPU_ATTN"), reference(name, imaginary))
    print(f"\n{name} reference with imaginary={imaginary}: error {prompt_err:.2e}")
    assert prompt_err > 100 * TOLERANCE and step_err > 100 * TOLERANCE


def test_imaginary_heads_share_the_kv_cache(engine) -> None:
    # Same KV memory for every engine: EH stores half of PLAIN's KV heads, EC as many as PLAIN,
    # so the imaginary heads add query heads only, never cache.
    plain = engine("plain", "CPU_ATTN")["num_gpu_blocks"]
    assert engine("eh", "CPU_ATTN")["num_gpu_blocks"] == 2 * plain
    assert engine("ec", "CPU_ATTN")["num_gpu_blocks"] == plain
    assert engine("eh", "KVFOLD_DENSE")["num_gpu_blocks"] == 2 * plain


def test_plain_llama_is_served_exactly_as_stock_vllm(engine) -> None:
    # kvfold registers its class under "LlamaForCausalLM"; without rope_config it must build
    # vLLM's own Llama. VLLM_PLUGINS="" keeps kvfold out of the second engine.
    ours = engine("plain", "CPU_ATTN")
    stock = engine("plain", "CPU_ATTN", VLLM_PLUGINS="")
    assert ours["model_class"] == KVFOLD_CLASS
    assert stock["model_class"] == "vllm.model_executor.models.llama:LlamaForCausalLM"
    assert ours["tokens"] == stock["tokens"]
    assert ours["prompt_logits"] == stock["prompt_logits"]  # bit-identical
    assert ours["step_logits"] == stock["step_logits"]


def test_unsupported_variant_fails_at_load(run_engine, checkpoints, tmp_path) -> None:
    bad = tmp_path / "imagh"
    shutil.copytree(checkpoints["eh"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["rope_config"] = {"imag": True, "imag_mode": "imagh"}
    (bad / "config.json").write_text(json.dumps(config))
    run = run_engine(bad, PROMPTS[:1], 1)
    assert run.returncode != 0
    assert "RoPEPPConfigError: rope_config.imag_mode 'imagh' is an ablation" in run.log


def test_rope_pp_weights_without_rope_config_fail_with_a_hint(run_engine, checkpoints,
                                                              tmp_path) -> None:
    # An authors' checkpoint whose config lost rope_config must not load as a plain Llama.
    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["eh"], bare)
    config = json.loads((bare / "config.json").read_text())
    del config["rope_config"]
    (bare / "config.json").write_text(json.dumps(config))
    run = run_engine(bare, PROMPTS[:1], 1)
    assert run.returncode != 0
    assert "no rope_config (plain Llama)" in run.log and "--hf-overrides" in run.log


def test_hf_overrides_supplies_a_missing_rope_config(run_engine, checkpoints, reference,
                                                    tmp_path) -> None:
    # The fix the error above names: the same files, rope_config passed at start-up.
    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["eh"], bare)
    config = json.loads((bare / "config.json").read_text())
    rope_config = config.pop("rope_config")
    (bare / "config.json").write_text(json.dumps(config))
    run = run_engine(bare, PROMPTS, MAX_TOKENS, full_logits=VOCAB,
                     hf_overrides={"rope_config": rope_config}, **BACKENDS["CPU_ATTN"])
    ref = reference("eh")
    assert max(worst_errors(run, ref)) < TOLERANCE
    assert run["tokens"] == [r[1] for r in ref]
