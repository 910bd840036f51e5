"""benchmarks/quality/passkey.py: prompt construction, answer parsing, and one real engine run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from benchmarks.quality import passkey


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_length_and_needle_depth(tokenizer, depth: float) -> None:
    ids = passkey.build_prompt(tokenizer, 1024, depth, 40719)
    assert len(ids) == 1024
    text = tokenizer.decode(ids)
    assert text.count("40719") == 2 and text.endswith(passkey.QUESTION)
    where = text.index("The pass key is 40719") / len(text)
    assert abs(where - depth) < 0.12  # the intro and the question sit outside the haystack
    with pytest.raises(ValueError, match="no room"):
        passkey.build_prompt(tokenizer, 40, depth, 40719)


def test_answer_parsing() -> None:
    assert passkey.answer_key(" 40719. Remember") == 40719
    assert passkey.answer_key(" 4071") is None
    assert passkey.answer_key(" the key: 40719 and 12345") == 40719
    assert passkey.answer_key(" none") is None


@pytest.mark.engine
def test_harness_runs_a_backend_and_reports_a_failed_one(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "passkey"
    passkey.main(["--model", str(tiny_llama), "--backends", 'KVFOLD_DENSE;KVFOLD_TREEKV:{"budget":"x"}',
                  "--lengths", "600", "--depths", "0.5", "--trials", "2", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    dense = result["backends"]["KVFOLD_DENSE"]
    assert set(dense["accuracy"]) == {"600@0.5"} and len(dense["answers"]) == 2
    assert 0 <= dense["overall"] <= 1 and dense["kv_cache_tokens"] > 0
    failed = result["backends"]['KVFOLD_TREEKV{"budget":"x"}']
    assert "engine failed" in failed["error"] and "budget" in failed["log_tail"]
    assert out.with_suffix(".png").stat().st_size > 0
