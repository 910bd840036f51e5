"""kvfold's Prometheus metrics (``kvfold:*``), exported on vLLM's ``/metrics``.

Two sources, one endpoint:

- :mod:`kvfold.metrics.stat_logger` runs in the API process (``vllm.stat_logger_plugins`` entry
  point) and publishes what follows from the engine configuration and the backend's customized KV
  spec: bytes per token, the bf16 baseline, the compression ratio and the KV capacity in tokens.
- :mod:`kvfold.metrics.worker` runs in the worker processes (called by ``KvfoldImpl``) and
  publishes what only a worker sees: the KV-cache bytes it attends over, method state bytes, tokens
  evicted and errors. These reach the API server's ``/metrics`` through prometheus-client's
  multiprocess mode, i.e. only when ``PROMETHEUS_MULTIPROC_DIR`` is set before vLLM starts
  (``kvfold serve`` sets a fresh one itself; see :mod:`kvfold.metrics.multiproc`).

Every metric, its type and its meaning is declared once, in :mod:`kvfold.metrics.names`.
"""
