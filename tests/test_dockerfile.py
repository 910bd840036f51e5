"""deploy/Dockerfile: what can be checked without a container registry.

The CI machine reaches no container registry, so the image itself is not built here. These tests
check what the image's build would use: the kvfold wheel that ``pip install /tmp/kvfold-src``
produces (built for real, from exactly the files the Dockerfile copies), and the Dockerfile's
choices against the package and the chart.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml
from deploy_tools import DEPLOY, REPO

import kvfold

DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines()
            if line.split(None, 1)[:1] == [name]]


def test_base_image_is_the_supported_vllm_release() -> None:
    (arg,) = [a for a in instructions("ARG") if a.startswith("VLLM_VERSION=")]
    version = arg.split("=", 1)[1]
    assert version.startswith(kvfold.SUPPORTED_VLLM + ".")
    assert instructions("FROM") == ["vllm/vllm-openai:v${VLLM_VERSION}"]


def test_image_runs_kvfold_serve_as_non_root() -> None:
    (user,) = instructions("USER")
    assert user.split(":")[0] not in ("0", "root")
    assert instructions("ENTRYPOINT") == ['["kvfold", "serve"]']
    chart = yaml.safe_load((REPO / "helm" / "kvfold" / "values.yaml").read_text())
    assert int(user) == chart["podSecurityContext"]["runAsUser"]
    chart_meta = yaml.safe_load((REPO / "helm" / "kvfold" / "Chart.yaml").read_text())
    assert chart_meta["appVersion"] == kvfold.__version__  # the chart's default image tag


def test_the_copied_files_build_a_wheel_with_the_plugins(tmp_path: Path) -> None:
    ignore = [p for p in (REPO / ".dockerignore").read_text().split() if p]
    sources = [c.split()[:-1] for c in instructions("COPY")]
    src = tmp_path / "kvfold-src"
    src.mkdir()
    for group in sources:
        for name in group:
            # .dockerignore: everything is excluded except what is re-included with "!".
            assert any(fnmatch.fnmatch(name, p[1:].rstrip("/")) for p in ignore if p.startswith("!"))
            subprocess.run(["cp", "-r", str(REPO / name), str(src / name)], check=True)
    # --no-build-isolation: setuptools from this venv (an isolated build would fetch it).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("kvfold-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in files if n.endswith("entry_points.txt"))
    assert "kvfold/metrics/stat_logger.py" in files and "kvfold/metrics/worker.py" in files
    source_modules = {str(p.relative_to(REPO)) for p in (REPO / "kvfold").rglob("*.py")}
    assert source_modules <= files
    assert "[vllm.stat_logger_plugins]\nkvfold = kvfold.metrics.stat_logger:KvfoldStatLogger" in entry_points
    assert "[vllm.general_plugins]\nkvfold = kvfold.vllm_plugins.general:register" in entry_points
