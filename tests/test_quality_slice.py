"""CI's slice of the quality benchmark: the RoPE++ fixture through every kvfold backend in real vLLM.

One 2,048-token held-out window (perplexity, chunked prefill of 512) and three passkey prompts of
2,048 tokens (keys at 10/50/90% depth) per configuration, calibrations done here at reduced size.
Each backend compresses at this length: TreeKV at budget 512, VQKV beyond 4 + 508 exact tokens,
FourierAttention with 4 + 508 exact and 256 frequencies.

Bounds, from the full run (docs/quality.md, "Quality vs KV memory on the fixtures"): at 2k every
configuration's perplexity is within 0.6% of dense's and at 4k-8k within 2.3% (fourier-small 6.6%),
so QUALITY_BOUND = 5% at 2k is far outside the noise and inside what a broken method produces.
Passkey: dense finds all three; every method finds the 90%-depth key (it lies in every method's exact
recent region); VQKV, which keeps every token as codes, also finds the 50%-depth key, which lies in
its coded region (the full run: 6/6 at 2k; this slice's smaller calibration misses the 10% key).
TreeKV and FourierAttention lose the older keys at this budget in the full run too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.quality import suite

pytestmark = pytest.mark.engine

FIXTURE = Path(__file__).resolve().parent.parent / "benchmarks" / "quality" / "fixtures" / "rope_pp"
METHODS = ("treekv512", "vqkv", "fourier-small")
# Perplexity of a method / the dense run's, on the same window (see the module doc for the source).
QUALITY_BOUND = 1.05


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("quality")
    assert suite.main([
        "--models", str(FIXTURE), "--configs", ",".join(("dense", *METHODS)),
        "--lengths", "2048", "--windows", "1", "--passkey-lengths", "2048", "--depths", "0.1,0.5,0.9",
        "--trials", "1", "--calibration-dir", str(tmp / "calibration"),
        "--calibrate-args", "vqkv=--tokens 8192 --max-samples 4096 --iterations 4",
        "--calibrate-args", "fourier=--tokens 8192", "--out", str(tmp / "slice"),
    ]) == 0
    return json.loads((tmp / "slice.json").read_text())["models"]["rope_pp"]["runs"]


def test_every_configuration_ran(result) -> None:
    failed = {label: run["error"][-800:] for label, run in result.items() if "error" in run}
    assert not failed, failed


def test_dense_retrieves_every_key(result) -> None:
    assert result["dense"]["passkey_overall"] == 1.0, result["dense"]["passkey_answers"]


@pytest.mark.parametrize("method", METHODS)
def test_method_quality_within_bound(result, method) -> None:
    dense = result["dense"]["perplexity"]["2048"]["perplexity"]
    ours = result[method]["perplexity"]["2048"]["perplexity"]
    assert ours <= QUALITY_BOUND * dense, (method, ours, dense)
    assert result[method]["passkey"]["2048@0.9"] == 1.0, result[method]["passkey_answers"]


def test_vqkv_retrieves_a_key_from_its_codes(result) -> None:
    assert result["vqkv"]["passkey"]["2048@0.5"] == 1.0, result["vqkv"]["passkey_answers"]


@pytest.mark.parametrize("method", METHODS)
def test_method_uses_less_kv_than_dense(result, method) -> None:
    assert result[method]["kv_bytes_fraction"] < 1.0
