"""Summarize ``benchmarks/vqkv_prefill.py`` results of several past-kernel versions into one JSON and a plot.

Each input is ``LABEL=PATH`` of a ``vqkv_prefill`` result; the summary keeps, per version and
context, the Triton past, the torch past, the chunk's attention and write (all measured in that
run) and the past's ratio to the attention, plus the settings. The plot shows the Triton past per
context, one line per version, with each run's torch past and attention dashed and dotted.

    python -m benchmarks.vqkv_prefill_summary --out docs/benchmarks/vqkv-prefill-versions-h100.json \\
        "first kernel=p/v1.json" "vector stores=p/vec.json" ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def summarize(label: str, report: dict[str, Any]) -> dict[str, Any]:
    contexts = {}
    for context, entry in report["contexts"].items():
        contexts[context] = {
            "triton_past_ms": entry["triton_past_ms"]["median"],
            "torch_past_ms": entry["torch_past_ms"]["median"],
            "attention_ms": entry["attention_ms"]["median"],
            "write_ms": entry.get("write_ms", {}).get("median"),
            "triton_past_vs_attention": entry["triton_past_vs_attention"],
            "triton_speedup_vs_torch": entry["triton_speedup_vs_torch"],
            "max_abs_diff_bf16": entry["max_abs_diff_bf16"],
        }
    return {"label": label, "device": report["device"], "torch": report["torch"], "chunk": report["chunk"],
            "attention": report["attention"], "settings": report["settings"], "contexts": contexts}


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, version in enumerate(summary):
        points = sorted((int(c), e) for c, e in version["contexts"].items())
        xs = [c for c, _ in points]
        ax.plot(xs, [e["triton_past_ms"] for _, e in points], marker="o", label=version["label"])
        if i == 0:
            ax.plot(xs, [e["torch_past_ms"] for _, e in points], linestyle="--", color="grey",
                    label=f"torch past ({version['label']} run)")
            ax.plot(xs, [e["attention_ms"] for _, e in points], linestyle=":", color="black",
                    label=f"chunk attention: {version['attention']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached tokens before the chunk")
    ax.set_ylabel("ms per layer")
    first = summary[0]
    ax.set_title(f"VQKV prefill: the past of a {first['chunk']}-token chunk, {first['device']}", fontsize=10)
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
