"""Start ``kvfold serve`` as a child process, wait until it answers, stop it cleanly.

Used by ``kvfold demo`` and the end-to-end tests; the server is vLLM's own OpenAI-compatible one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

CAPACITY_LINE = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)


@dataclass(frozen=True)
class KvCapacity:
    """vLLM's own report of the KV cache it allocated (its start-up log line)."""

    tokens: int
    max_model_len: int
    max_concurrency: float


def parse_capacity(log: str) -> KvCapacity:
    """vLLM's KV-capacity report from a server's or an engine's log."""
    match = CAPACITY_LINE.search(log)
    if match is None:
        raise RuntimeError("vLLM logged no KV cache size line")
    tokens, max_len, conc = match.groups()
    return KvCapacity(int(tokens.replace(",", "")), int(max_len.replace(",", "")), float(conc))


def wait_until_ready(
    url: str, process: subprocess.Popen, timeout: float, log_tail: Callable[[], str]
) -> None:
    """Poll ``url`` until it answers 200; fail early, with the log, if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log_tail()}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout}s:\n{log_tail()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int, grace: float) -> list[int]:
    """Live (non-zombie) processes of group ``pgid`` still there after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.5)


class Server:
    """``with Server(model, ["--attention-backend", "KVFOLD_DENSE"], log) as s: s.url ...``"""

    def __init__(
        self,
        model: str | Path,
        args: Sequence[str],
        log_path: str | Path,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.command = [
            sys.executable, "-m", "kvfold", "serve", str(model),
            "--host", "127.0.0.1", "--port", str(self.port), *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.stragglers: list[int] = []

    def __enter__(self) -> Server:
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,  # one process group: the engine core and workers stop with it
        )
        try:
            wait_until_ready(f"{self.url}/health", self.process, self.startup_timeout, self.log_tail)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGINT (vLLM's graceful shutdown), then SIGKILL of the whole group if it hangs.

        ``self.stragglers`` records whether any engine process outlived the API server by more
        than a few seconds (a shutdown leak, which the final SIGKILL then cleans up).
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.stragglers = _group_members(self.process.pid, grace=10.0)
        if self.stragglers:
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def capacity(self) -> KvCapacity:
        return parse_capacity(self.log_text())

    def complete(self, prompt: str | list[int], max_tokens: int = 16) -> dict:
        served = requests.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]
        response = requests.post(
            f"{self.url}/v1/completions",
            json={"model": served, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
            timeout=120,
        )
        response.raise_for_status()
        return response.json()
