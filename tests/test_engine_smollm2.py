"""KVFOLD_DENSE on a real pretrained model (SmolLM2-135M-Instruct, GQA 9:3) against CPU_ATTN."""

import pytest

pytestmark = pytest.mark.engine

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
]


@pytest.fixture(scope="module")
def chat_prompts(smollm2) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in QUESTIONS]
    long_context = " ".join(f"Line {i}: the river flows past stone {i * 7 % 13}." for i in range(60))
    prompts.append(tok(long_context)["input_ids"])  # several hundred tokens, several blocks
    return [list(p if isinstance(p, list) else p["input_ids"]) for p in prompts]


def test_dense_equals_cpu_attn_on_smollm2(run_engine, smollm2, chat_prompts) -> None:
    common = {"max_model_len": 2048}
    reference = run_engine(smollm2, chat_prompts, 24, attention_backend="CPU_ATTN", **common)
    run = run_engine(smollm2, chat_prompts, 24, attention_backend="KVFOLD_DENSE", **common)
    assert set(run["impls"]) == {"DenseImpl"} and len(run["impls"]) == 30
    assert run["tokens"] == reference["tokens"]
    worst = max(abs(a - b) for x, y in zip(run["logprobs"], reference["logprobs"]) for a, b in zip(x, y))
    assert worst < 1e-3, worst

    from transformers import AutoTokenizer

    answer = AutoTokenizer.from_pretrained(smollm2).decode(run["tokens"][0])
    assert "Paris" in answer  # the dequantized checkpoint is a working model, not noise
