"""The ``kvfold`` command.

``kvfold serve MODEL --attention-backend KVFOLD_DENSE ...`` is vLLM's ``vllm serve`` (any vLLM
subcommand passes through unchanged); ``kvfold demo`` shows the KV capacity of each backend.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

VLLM_SUBCOMMANDS = {"serve", "bench", "chat", "complete", "run-batch", "collect-env", "launch"}


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in VLLM_SUBCOMMANDS:
        from kvfold.vllm_cli import run

        run(args)
        return
    parser = argparse.ArgumentParser(prog="kvfold", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in sorted(VLLM_SUBCOMMANDS):
        sub.add_parser(name, help=f"vLLM's `vllm {name}` (arguments pass through)")
    demo = sub.add_parser("demo", help="serve a small model with each backend, print KV capacity")
    from kvfold.demo import add_arguments, run_demo

    add_arguments(demo)
    ns = parser.parse_args(args)
    if ns.command == "demo":
        run_demo(ns)


if __name__ == "__main__":
    main()
