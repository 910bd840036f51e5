"""Worker-side ``kvfold:*`` metrics: what a backend records where it runs.

A method calls these from its ``KvfoldImpl`` (the base class already reports cache bytes, state
bytes and errors); it never creates Prometheus objects itself. In a vLLM worker process the values
land in prometheus-client's multiprocess files when ``PROMETHEUS_MULTIPROC_DIR`` was set before vLLM
started, and the API server's ``/metrics`` (vLLM's ``MultiProcessCollector``) adds them up. Without
that variable they stay in the worker's own registry, which nothing serves: the metrics are then
absent from ``/metrics``, never wrong.
"""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Gauge

from kvfold.metrics import names


@lru_cache(maxsize=None)  # one collector per family and process: the registry refuses duplicates
def _family(family: names.MetricFamily) -> Gauge | Counter:
    if family.kind == "counter":
        return Counter(family.name, family.help, family.labels)
    # livesum: every worker (tensor-parallel rank) holds its own share; dead workers drop out.
    return Gauge(family.name, family.help, family.labels, multiprocess_mode="livesum")


class BackendMetrics:
    """The worker-side metrics of one kvfold backend serving one model."""

    def __init__(self, model_name: str, backend: str) -> None:
        self.labels = {"model_name": model_name, "backend": backend}
        # Created now so that a scrape shows 0 before anything was evicted (a method that never
        # evicts reports 0, not an absent series). The byte gauges appear only once a layer
        # reported, so they never show a 0 that is not a measurement.
        self._evicted = _family(names.TOKENS_EVICTED).labels(**self.labels)

    def tokens_evicted(self, count: int) -> None:
        """``count`` cached tokens were dropped from the KV cache."""
        self._evicted.inc(count)

    def error(self, exc: BaseException) -> None:
        """A backend operation raised ``exc`` (counted by exception class)."""
        _family(names.ERRORS).labels(**self.labels, kind=type(exc).__name__).inc()

    def layer_ready(self, cache_bytes: int, state_bytes: int) -> None:
        """One attention layer attends over ``cache_bytes`` of paged KV and holds ``state_bytes``."""
        _family(names.KV_CACHE_BYTES).labels(**self.labels).inc(cache_bytes)
        _family(names.STATE_BYTES).labels(**self.labels).inc(state_bytes)

    def cuda_graph_bytes(self, nbytes: int) -> None:
        """kvfold's CUDA graphs in this worker now keep ``nbytes`` (a process-wide total)."""
        _family(names.CUDA_GRAPH_BYTES).labels(**self.labels).set(nbytes)

    def scratch_reserved(self, nbytes: int) -> None:
        """The memory profile reserved ``nbytes`` for one step's temporary memory (layers share it)."""
        _family(names.SCRATCH_BYTES).labels(**self.labels).set(nbytes)


@lru_cache(maxsize=None)
def backend_metrics(model_name: str, backend: str) -> BackendMetrics:
    return BackendMetrics(model_name, backend)
