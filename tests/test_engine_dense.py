"""KVFOLD_DENSE inside real vLLM engines (default multiprocess mode) against the built-in CPU_ATTN."""

import random

import pytest

pytestmark = pytest.mark.engine

LENGTHS = (5, 37, 200, 300)  # one batch; prompts cross several 128-token blocks
MAX_TOKENS = 24
rng = random.Random(0)
PROMPTS = [[rng.randrange(3, 259) for _ in range(n)] for n in LENGTHS]


def assert_same_greedy(run, baseline) -> None:
    assert run["tokens"] == baseline["tokens"]
    worst = max(abs(a - b) for x, y in zip(run["logprobs"], baseline["logprobs"]) for a, b in zip(x, y))
    assert worst < 1e-3, f"sampled-token logprobs differ by {worst}"


def assert_ran(run, impl: str) -> None:
    assert run["impls"] and set(run["impls"]) == {impl}, run["impls"]


@pytest.fixture(scope="module")
def baseline(run_engine, tiny_llama):
    run = run_engine(tiny_llama, PROMPTS, MAX_TOKENS, attention_backend="CPU_ATTN")
    assert_ran(run, "CPUAttentionBackendImpl")
    return run


def test_dense_equals_cpu_attn_token_for_token(run_engine, tiny_llama, baseline) -> None:
    run = run_engine(tiny_llama, PROMPTS, MAX_TOKENS, attention_backend="KVFOLD_DENSE")
    assert_ran(run, "DenseImpl")
    assert_same_greedy(run, baseline)
    # The dense layout is vLLM's standard page: the same memory holds the same number of blocks.
    assert run["num_gpu_blocks"] == baseline["num_gpu_blocks"]


def test_chunked_prefill(run_engine, tiny_llama, baseline) -> None:
    # A 64-token step budget cuts the 200- and 300-token prompts into chunks that attend to
    # the chunks already in the paged cache, mixed with other requests' decode tokens.
    run = run_engine(tiny_llama, PROMPTS, MAX_TOKENS, attention_backend="KVFOLD_DENSE",
                     enable_chunked_prefill=True, max_num_batched_tokens=64)
    assert_ran(run, "DenseImpl")
    assert_same_greedy(run, baseline)


def test_preemption_by_recompute(run_engine, tiny_llama) -> None:
    prompts = [[rng.randrange(3, 259) for _ in range(60)] for _ in range(4)]
    common = {"max_model_len": 256, "block_size": 32}
    reference = run_engine(tiny_llama, prompts, 48, attention_backend="CPU_ATTN", **common)
    # 4 prompts fit in 8 blocks of 32, but 48 decode steps each need 16: requests get preempted
    # and recomputed into other blocks.
    run = run_engine(tiny_llama, prompts, 48, attention_backend="KVFOLD_DENSE",
                     num_gpu_blocks_override=10, **common)
    assert_ran(run, "DenseImpl")
    assert run["metrics"]["vllm:num_preemptions"] > 0
    assert_same_greedy(run, reference)


def test_custom_slot_dispatches_to_the_named_method(run_engine, tiny_llama, baseline) -> None:
    run = run_engine(tiny_llama, PROMPTS, MAX_TOKENS, attention_backend="CUSTOM",
                     additional_config={"kvfold": {"method": "dense"}})
    assert_ran(run, "DenseImpl")
    assert_same_greedy(run, baseline)


def test_selection_through_attention_config(run_engine, tiny_llama, baseline) -> None:
    # LLM(attention_config=...) validates the name before EngineArgs loads plugins: users load
    # them first, as vLLM documents for plugin names.
    run = run_engine(tiny_llama, PROMPTS, MAX_TOKENS, plugins_first=True,
                     attention_config={"backend": "KVFOLD_DENSE"})
    assert_ran(run, "DenseImpl")
    assert_same_greedy(run, baseline)


def test_head_major_layout(run_engine, tiny_llama, baseline) -> None:
    run = run_engine(tiny_llama, PROMPTS, MAX_TOKENS, attention_backend="KVFOLD_DENSE",
                     env={"VLLM_KV_CACHE_LAYOUT": "HND"})
    assert "Using LBHNC KV cache layout" in run.log
    assert_ran(run, "DenseImpl")
    assert_same_greedy(run, baseline)


def test_target_device_cpu_still_honours_the_selection(run_engine, tiny_llama, baseline) -> None:
    # VLLM_TARGET_DEVICE=cpu makes vLLM skip platform plugins; kvfold's selection must not depend on one.
    run = run_engine(tiny_llama, PROMPTS, MAX_TOKENS, attention_backend="KVFOLD_DENSE",
                     env={"VLLM_TARGET_DEVICE": "cpu"})
    assert_ran(run, "DenseImpl")
    assert_same_greedy(run, baseline)


def test_qwen2_with_qkv_bias(run_engine, tiny_qwen2) -> None:
    reference = run_engine(tiny_qwen2, PROMPTS, MAX_TOKENS, attention_backend="CPU_ATTN")
    run = run_engine(tiny_qwen2, PROMPTS, MAX_TOKENS, attention_backend="KVFOLD_DENSE")
    assert_ran(run, "DenseImpl")
    assert_same_greedy(run, reference)


@pytest.mark.parametrize("backend,config,message", [
    ("KVFOLD_DENSE", {"kvfold": {"budget": 2048}}, "KVFOLD_DENSE: invalid --additional-config"
                                                    ' {"kvfold": ...}: unknown option \'budget\''),
    ("CUSTOM", {"kvfold": {"method": "nope"}}, "unknown kvfold method 'nope'"),
    ("CPU_ATTN", {"kvfold": {}}, "no kvfold method would run"),
])
def test_bad_selection_stops_startup_before_the_engine_starts(
    run_engine, tiny_llama, backend, config, message
) -> None:
    run = run_engine(tiny_llama, PROMPTS[:1], 1, attention_backend=backend,
                     additional_config=config, timeout=180)
    assert run.returncode != 0
    assert message in run.log
    assert "EngineCore" not in run.log  # refused in the API process, before any spawn
