"""kvfold.metrics.worker in two worker processes, aggregated as vLLM's /metrics does.

Each child process sets PROMETHEUS_MULTIPROC_DIR before prometheus-client is imported (as a vLLM
worker inherits it), records through the backend-facing API, and exits; this process then reads the
directory with prometheus-client's MultiProcessCollector, the collector vLLM's /metrics uses.
"""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

WORKER = r'''
import sys, time
from kvfold.metrics.worker import backend_metrics
m = backend_metrics("m", "KVFOLD_TREEKV")
m.layer_ready(cache_bytes=1000, state_bytes=24)
m.layer_ready(cache_bytes=1000, state_bytes=24)
m.tokens_evicted(int(sys.argv[1]))
m.cuda_graph_bytes(100)
m.cuda_graph_bytes(250)  # a process-wide total: the latest value counts
m.scratch_reserved(64)
try:
    raise IndexError("slot out of range")
except IndexError as exc:
    m.error(exc)
print("ready", flush=True)
sys.stdin.readline()  # stay alive (live gauges count live processes) until the parent has read
'''


def test_two_workers_add_up_on_one_endpoint(tmp_path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(n)], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE) for n in (3, 4)]
    try:
        for w in workers:
            assert w.stdout.readline().strip() == "ready"
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
        text = generate_latest(registry).decode()
    finally:
        for w in workers:
            w.communicate("\n", timeout=30)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    labels = (("backend", "KVFOLD_TREEKV"), ("model_name", "m"))
    assert samples[("kvfold:tokens_evicted_total", labels)] == 7
    assert samples[("kvfold:kv_cache_bytes", labels)] == 4000  # 2 layers x 2 workers
    assert samples[("kvfold:state_bytes", labels)] == 96
    assert samples[("kvfold:cuda_graph_bytes", labels)] == 500  # 2 workers
    assert samples[("kvfold:scratch_bytes", labels)] == 128
    errors = tuple(sorted(labels + (("kind", "IndexError"),)))
    assert samples[("kvfold:errors_total", errors)] == 2
