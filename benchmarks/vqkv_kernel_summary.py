"""Summarize ``benchmarks/vqkv_kernel.py`` results of several kernel versions into one JSON and a plot.

Each input is ``LABEL=PATH`` of a ``vqkv_kernel`` result; the summary keeps, per version and batch,
the graph-replayed step (eager where no GPU ran), the split kernel's and the ring kernel's device time, the dense SDPA
baseline measured in the same run and the step's ratio to it, plus the settings and the compiled
kernels' registers. The plot shows the step's ratio to SDPA per batch, one line per version.

    python -m benchmarks.vqkv_kernel_summary --out docs/benchmarks/vqkv-kernel-versions-h100.json \\
        "one codebook=r1/g1.json" "16 groups=r2/g16.json" ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def summarize(label: str, report: dict[str, Any]) -> dict[str, Any]:
    batches = {}
    for batch, entry in report["batches"].items():
        kernels = entry.get("kernels_ms", {})
        graph = entry.get("decode_graph_ms", {}).get("median")
        batches[batch] = {
            # The graph-replayed step where CUDA ran, else the eager one (CPU smoke runs).
            "step": "cuda graph" if graph is not None else "eager",
            "step_ms": graph if graph is not None else entry["decode_ms"]["median"],
            "split_kernel_ms": kernels.get("_decode_split"),
            "ring_kernel_ms": kernels.get("_exact_ring"),
            "torch_glue_ms": kernels.get("torch glue"),
            "write_ms_eager": entry.get("write_ms", {}).get("median"),
            "dense_sdpa_ms": entry["dense_sdpa"]["ms"],
            "step_vs_sdpa": entry.get("decode_graph_vs_dense") or entry["decode_vs_dense"],
        }
    compiled = {name: {k: v for k, v in stats.items() if k in ("n_regs", "n_spills", "num_warps")}
                for name, stats in report.get("compiled_kernels", {}).items() if "split" in name}
    return {"label": label, "device": report["device"], "context": report["context"],
            "settings": report["settings"], "compiled_split_kernels": compiled, "batches": batches}


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for version in summary:
        points = sorted((int(b), e["step_vs_sdpa"]) for b, e in version["batches"].items() if e["step_vs_sdpa"])
        ax.plot([b for b, _ in points], [r for _, r in points], marker="o", label=version["label"])
    ax.axhline(1.3, color="grey", linestyle="--", linewidth=1, label="target 1.3x")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests in the decode batch")
    ax.set_ylabel("step time / dense bf16 SDPA (same run)")
    first = summary[0]
    ax.set_title(f"VQKV decode step per layer, {first['context']} tokens/request, {first['device']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=PATH")
    p.add_argument("--out", type=Path, required=True, help="summary JSON; the plot goes next to it (.png)")
    args = p.parse_args(argv)
    summary = []
    for run in args.runs:
        label, _, path = run.partition("=")
        if not path:
            raise SystemExit(f"{run}: expected LABEL=PATH")
        summary.append(summarize(label, json.loads(Path(path).read_text())))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
