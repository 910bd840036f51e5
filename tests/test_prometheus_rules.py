"""deploy/prometheus/kvfold-rules.yaml through Debian's promtool: syntax and rule unit tests."""

from __future__ import annotations

import shutil
import subprocess

from deploy_tools import RULES

PROMTOOL = shutil.which("promtool") or "promtool"  # scripts/setup-deploy-tools.sh installs it


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=RULES.parent,
                          timeout=120)


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_promtool_test_rules() -> None:
    # kvfold-rules.test.yaml: alerts firing (and not yet firing) on synthetic series, recording
    # rules' values; any expectation that does not hold fails promtool.
    result = promtool("test", "rules", "kvfold-rules.test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
