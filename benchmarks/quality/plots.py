"""Plots of the quality benchmarks (matplotlib, Agg): fixture training curves, perplexity by context.

    python -m benchmarks.quality.plots curves benchmarks/quality/fixtures/curves.json docs/benchmarks/fixtures-training.png
    python -m benchmarks.quality.plots perplexity docs/benchmarks/quality-fixtures-cpu.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(curves: dict, path: Path) -> None:
    """Next-token loss and passkey-answer loss per step, one line per fixture."""
    plt = _pyplot()
    steps = curves["steps"]
    names = [k for k in steps[0] if isinstance(steps[0][k], list)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    titles = ("next-token loss (nats/byte)", "passkey answer loss", "passkey answer-token accuracy")
    for index, (ax, title) in enumerate(zip(axes, titles)):
        for name in names:
            xs = [row["tokens"] / 1e6 for row in steps]
            ys = [row[name][index] for row in steps]
            ax.plot(xs, ys, label=name, linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training tokens per model (M)")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(top=min(3.0, axes[0].get_ylim()[1]))
    axes[0].legend()
    fig.suptitle(f"fixture training: {curves['trained_steps']} steps x {curves['args']['batch']} x "
                 f"{curves['args']['seq_len']} tokens, both models on the same batches", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def perplexity(result: dict, path: Path) -> None:
    """Perplexity by context length, one panel per fixture, one line per backend configuration."""
    plt = _pyplot()
    models = list(result["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        runs = result["models"][model]["runs"]
        for label, run in runs.items():
            points = [(int(n), v["perplexity"]) for n, v in run.get("perplexity", {}).items()]
            if not points:
                continue
            points.sort()
            style = "-" if run.get("kind") == "kvfold" else "--"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3,
                    label=f"{label} ({run['kv_bytes_fraction']:.2f}x KV)" if run.get("kv_bytes_fraction") else label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens); trained at " + str(result["models"][model].get("trained_context", "?")))
        ax.set_ylabel("perplexity per byte token (last quarter of each window)")
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> int:
    kind, source = argv[0], Path(argv[1])
    data = json.loads(source.read_text())
    if kind == "curves":
        training_curves(data, Path(argv[2]))
    elif kind == "perplexity":
        perplexity(data, Path(argv[2]) if len(argv) > 2 else source.with_suffix(".png"))
    else:
        raise SystemExit(f"unknown plot {kind!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
