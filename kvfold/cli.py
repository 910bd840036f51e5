"""The ``kvfold`` command.

``kvfold serve MODEL --attention-backend KVFOLD_DENSE ...`` is vLLM's ``vllm serve`` (any vLLM
subcommand passes through unchanged); ``kvfold demo`` shows the KV capacity of each backend;
``kvfold calibrate METHOD MODEL`` fits what a method needs from a model (``vqkv``: its codebooks; ``fourier``: the compressed head dims).
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
    add_calibrate_parser(sub)
    ns = parser.parse_args(args)
    if ns.command == "demo":
        run_demo(ns)
    elif ns.command == "calibrate":
        ns.run(ns)


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    """``kvfold calibrate METHOD ...``: one sub-subcommand per method that fits something."""
    from kvfold.attention_backends.fourier import calibrate as fourier
    from kvfold.attention_backends.vqkv import calibrate as vqkv

    calibrate = sub.add_parser("calibrate", help="fit a method's data to a model (e.g. VQKV codebooks)")
    methods = calibrate.add_subparsers(dest="method", required=True, metavar="METHOD")
    parser = methods.add_parser("vqkv", help="fit VQKV codebooks to the model's own keys and values",
                                description=vqkv.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    vqkv.add_arguments(parser)
    parser.set_defaults(run=vqkv.run_cli)
    parser = methods.add_parser("fourier", help="choose the head dims FourierAttention compresses",
                                description=fourier.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    fourier.add_arguments(parser)
    parser.set_defaults(run=fourier.run_cli)


if __name__ == "__main__":
    main()
