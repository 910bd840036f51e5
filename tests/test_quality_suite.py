"""The quality suite's pieces that need no engine: configurations, windows, scoring, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.quality import suite


def test_configurations_select_the_backends() -> None:
    calibrated = Path("/cal/m")
    assert suite.config_kwargs("dense", calibrated, 8, "CPU_ATTN") == {"attention_backend": "CPU_ATTN"}
    window = suite.config_kwargs("window512", calibrated, 8, "CPU_ATTN")
    assert window["hf_overrides"]["sliding_window"] == 512
    assert window["hf_overrides"]["layer_types"] == ["sliding_attention"] * 8
    assert suite.config_kwargs("treekv2048", calibrated, 8, "CPU_ATTN")["additional_config"] == {
        "kvfold": {"budget": 2048}}
    assert suite.config_kwargs("vqkv", calibrated, 8, "CPU_ATTN")["additional_config"]["kvfold"]["codebooks"] == (
        "/cal/m/vqkv_codebooks")
    small = suite.config_kwargs("fourier-small", calibrated, 8, "CPU_ATTN")["additional_config"]["kvfold"]
    assert small == {"dims": "/cal/m/fourier_dims", "sink": 4, "recent": 508, "freqs": 256}
    assert suite.calibration("fourier-small", calibrated) == ("fourier", calibrated / "fourier_dims")
    assert suite.calibration("window512", calibrated) is None
    with pytest.raises(ValueError, match="unknown configuration"):
        suite.config_kwargs("treekv", calibrated, 8, "CPU_ATTN")


def test_heldout_windows_are_deterministic_byte_ids() -> None:
    a = suite.heldout_windows([100, 300], 2, seed=0)
    assert a == suite.heldout_windows([100, 300], 2, seed=0)
    assert a != suite.heldout_windows([100, 300], 2, seed=1)
    assert [len(w) for w in a[300]] == [300, 300]
    assert all(3 <= t < 259 for w in a[100] for t in w)


def test_scoring() -> None:
    assert suite.retrieved(" 60494.", 60494) and suite.retrieved(" 604947 ", 60494)
    assert not suite.retrieved(" 6049.", 60494) and not suite.retrieved("no key 60494", 12345)
    summary = suite.nll_summary([1.0, 1.0, 1.0, 3.0])
    assert summary["nll"] == 1.5 and summary["nll_last_quarter"] == 3.0
    assert summary["perplexity"] == pytest.approx(math.exp(3.0))


def test_resume_refuses_other_settings(tmp_path) -> None:
    out = tmp_path / "q"
    out.with_suffix(".json").write_text(json.dumps({
        "lengths": [4096], "passkey_lengths": [], "depths": [0.5], "trials": 1, "windows": 1,
        "chunk": 512, "dtype": "float32", "seed": 0, "models": {}}))
    with pytest.raises(SystemExit, match="other lengths"):
        suite.main(["--models", str(tmp_path / "m"), "--configs", "dense", "--lengths", "2048",
                    "--passkey-lengths", "", "--depths", "0.5", "--trials", "1", "--windows", "1",
                    "--out", str(out), "--resume"])
