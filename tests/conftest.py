"""Shared fixtures: small random checkpoints and a runner for real vLLM engines in subprocesses."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Triton's interpreter must be chosen before triton is first imported, so the tests that need it
# run in a pytest of their own (tests/test_triton_interpreter.py) started with TRITON_INTERPRET=1.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config: pytest.Config) -> None:
    # xdist (--dist loadfile) would hand out the files with the most tests first, so the single-test
    # files that run longest (the interpreted Triton run, SmolLM2's engines) were dealt out last and
    # one worker ran them alone at the end; pytest_collection_modifyitems orders the files instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    # vLLM's CPU worker binds its OpenMP threads to core 0 ("auto") in every engine, so the
    # engines of two xdist workers computed on one core while the other idled (a pair of
    # generation-heavy engines: 77 s together, 60 s bound apart, on 2 cores). Each xdist worker's
    # engines (and servers, inherited through the environment) get a core of their own.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and len(cores) > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[int(worker[2:]) % len(cores)])


# The files that take longest (the last CI run's --durations), dealt out to xdist workers first.
LONGEST_FIRST = ("test_quality_slice.py", "test_triton_interpreter.py")


def _file_rank(items: list[pytest.Item]) -> dict[Path, int]:
    """0, 1, ... for LONGEST_FIRST, then files with an engine-marked test, then the rest."""
    engine_files = {item.path for item in items if "engine" in item.keywords}
    rank = {}
    for item in items:
        if item.path.parent == HERE and item.path.name in LONGEST_FIRST:
            rank[item.path] = LONGEST_FIRST.index(item.path.name)
        else:
            rank.setdefault(item.path, len(LONGEST_FIRST) + (item.path not in engine_files))
    return rank


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Longest files first (a stable sort: each file's tests stay together and in their order).
    rank = _file_rank(items)
    items.sort(key=lambda item: rank[item.path])
    skip = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 from process start (run by "
                            "tests/test_triton_interpreter.py)")
    for item in items:
        if "triton" in item.keywords and not INTERPRETED:
            item.add_marker(skip)
# Every engine gets the same KV memory, so capacities compare; 0.4 only gates vLLM's CPU
# free-memory check (it asks for 92% of NUMA node 0 by default, more than a CI box has free).
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
ENGINE_DEFAULTS = {"enforce_eager": True, "dtype": "float32", "max_model_len": 1024,
                   "gpu_memory_utilization": 0.4, "disable_log_stats": False}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kvfold.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kvfold.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "qwen2", "qwen2", seed=1)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kvfold.fixtures.smollm2 import write_smollm2

    return write_smollm2(tmp_path_factory.mktemp("models") / "smollm2")


class EngineRun:
    """Result of one engine process: its JSON output (or None) and its log."""

    def __init__(self, result: dict | None, log: str, returncode: int) -> None:
        self.result, self.log, self.returncode = result, log, returncode

    def __getitem__(self, key: str):
        assert self.result is not None, f"engine failed (rc={self.returncode}):\n{self.log[-6000:]}"
        return self.result[key]


def _settled(env: dict) -> dict:
    """The environment an engine server's import depends on: all of it but pytest's note of the
    running test (which changes with every test; the server passes it on to each run)."""
    return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


class EngineServer:
    """``engine_driver.py --serve`` in one environment: runs a spec in a child forked after the
    driver's vLLM import, so an engine run costs no API-process import (~15 s of CPU each)."""

    def __init__(self, env: dict, cwd: Path) -> None:
        self.env, self.stderr, self.pending = env, cwd / "server.log", b""
        with open(self.stderr, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "engine_driver.py"), "--serve"], env=env, cwd=cwd,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)

    def _answer(self, timeout: float) -> dict | None:
        """The server's next answer line, or None after ``timeout`` s without one (read from the
        raw pipe: a buffered readline could swallow an answer that select() then never sees)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            if not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            assert chunk, f"engine server exited:\n{self.stderr.read_text()[-6000:]}"
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, spec_path: Path, out_path: Path, timeout: float) -> tuple[str, str, int]:
        stdout, stderr = spec_path.with_suffix(".stdout"), spec_path.with_suffix(".stderr")
        request = [str(spec_path), str(out_path), str(stdout), str(stderr),
                   os.environ.get("PYTEST_CURRENT_TEST")]
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        pid = self._answer(60)["pid"]
        done = self._answer(timeout)
        if done is None:  # the driver and its engine's processes are killed, the test fails
            os.killpg(pid, signal.SIGKILL)
            self._answer(60)
            raise subprocess.TimeoutExpired(["engine_driver.py", str(spec_path)], timeout)
        return stdout.read_text(), stderr.read_text(), done["returncode"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


@pytest.fixture(scope="session")
def run_engine(tmp_path_factory: pytest.TempPathFactory):
    """``run_engine(model, prompts, max_tokens, env={...}, **llm_kwargs) -> EngineRun``.

    ``full_logits=V`` also returns raw logits over the whole vocabulary (see engine_driver.py).
    A run in the session's base environment goes through an :class:`EngineServer`; one with its
    own ``env`` or ``plugins_first`` (state the server's import would have settled before) starts a
    driver process of its own.
    """
    counter = iter(range(1000))
    tmp_path = tmp_path_factory.mktemp("engines")
    servers: list[EngineServer] = []

    def run(model: Path, prompts: list[list[int]], max_tokens: int, *, env: dict | None = None,
            plugins_first: bool = False, full_logits: int | None = None,
            timeout: float = 600, **llm) -> EngineRun:
        tag = next(counter)
        spec = {"llm": {"model": str(model), **ENGINE_DEFAULTS, **llm}, "prompts": prompts,
                "max_tokens": max_tokens, "plugins_first": plugins_first,
                "full_logits": full_logits}
        spec_path, out_path = tmp_path / f"spec{tag}.json", tmp_path / f"out{tag}.json"
        spec_path.write_text(json.dumps(spec))
        full_env = {**os.environ, **ENGINE_ENV, **(env or {})}
        if not env and not plugins_first:
            if servers and _settled(servers[-1].env) != _settled(full_env):
                servers.pop().close()
            if not servers:
                servers.append(EngineServer(full_env, tmp_path))
            stdout, stderr, returncode = servers[-1].run(spec_path, out_path, timeout)
        else:
            proc = subprocess.run(
                [sys.executable, str(HERE / "engine_driver.py"), str(spec_path), str(out_path)],
                env=full_env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
            )
            stdout, stderr, returncode = proc.stdout, proc.stderr, proc.returncode
        result = json.loads(out_path.read_text()) if returncode == 0 else None
        return EngineRun(result, stdout + stderr, returncode)

    yield run
    for server in servers:
        server.close()
