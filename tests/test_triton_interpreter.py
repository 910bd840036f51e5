"""Runs the tests marked ``triton`` in a pytest started with ``TRITON_INTERPRET=1``.

Triton reads that variable when it is first imported (its standard library is jitted then), and
vLLM imports triton long before any test runs, so those tests cannot switch it on in this process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the interpreted run")
def test_triton_kernels_in_the_interpreter() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "triton", "-p", "no:cacheprovider", str(HERE)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=1200,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary, summary
