"""Prometheus multiprocess mode for ``kvfold serve``: how worker-side values reach ``/metrics``.

vLLM serves ``/metrics`` from the API process. Values set in the engine-core and worker processes
reach it only through prometheus-client's multiprocess mode: every process writes its values to
memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR`` and the API server's
``MultiProcessCollector`` adds them up. prometheus-client reads the variable once, when it is first
imported, so it has to be set before vLLM (or anything else) imports it; and the directory must be
empty at start-up, or a previous run's counters are added in.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"
logger = logging.getLogger("vllm.kvfold.metrics")


def ensure_multiproc_dir() -> str | None:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory unless the user chose one.

    Returns the directory in use, or None when it is too late (prometheus-client already imported
    in single-process mode: switching now would hide the metrics it already holds).
    """
    if ENV in os.environ:
        return os.environ[ENV]
    if "prometheus_client" in sys.modules:
        logger.warning("prometheus_client already imported; kvfold worker metrics stay unexported")
        return None
    path = tempfile.mkdtemp(prefix="kvfold-prometheus-")
    os.environ[ENV] = path
    # Children (engine core, workers) inherit the variable; only this process removes the files.
    pid = os.getpid()
    atexit.register(lambda: os.getpid() == pid and shutil.rmtree(path, ignore_errors=True))
    return path
