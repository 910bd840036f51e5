"""Helpers of the deployment tests: a real Prometheus process and metric names in PromQL."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import requests

from kvfold.serving import free_port, wait_until_ready

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "kvfold-rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "kvfold-dashboard.json"


class Prometheus:
    """Debian's ``prometheus`` on a free loopback port, scraping ``target`` every second."""

    def __init__(self, target: str, workdir: Path, rule_files: list[Path]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        rules = "\n".join(f"  - {p}" for p in rule_files)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n{rules}\n"
            "scrape_configs:\n  - job_name: kvfold\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        binary = shutil.which("prometheus")
        assert binary, "prometheus not installed: run scripts/setup-deploy-tools.sh"
        self._log = open(self.workdir / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.config}",
             f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_until_ready(f"{self.url}/-/ready", self.process, 60, self.log_text)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self._log.close()

    def log_text(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def query(self, promql: str) -> list[dict]:
        response = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout: float = 45) -> list[dict]:
        """The first non-empty result of ``promql`` (scrapes and rule evaluations take seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result:
                return result
            time.sleep(1)
        raise AssertionError(f"no result for {promql!r} after {timeout}s")

    def metric_names(self) -> set[str]:
        response = requests.get(f"{self.url}/api/v1/label/__name__/values", timeout=10)
        return set(response.json()["data"])


# Metric names in PromQL: identifiers with colons, not followed by "(" (functions) and not label
# names, keywords or durations. Good enough for dashboard and rule expressions we write ourselves.
_IDENT = re.compile(r"(?<![\w:.\"'$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:(\"])")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "sum", "max", "min", "avg", "count", "topk", "inf", "nan"}


def metric_names_in(promql: str) -> set[str]:
    stripped = re.sub(r"\{[^}]*\}", "", promql)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped)
    return {name for name in _IDENT.findall(stripped)
            if name not in _KEYWORDS and not re.fullmatch(r"\d+\w*", name)}
