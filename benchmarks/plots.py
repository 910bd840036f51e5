"""Plots of the benchmark JSONs (``serving.py`` and ``kernels.py`` results) as PNG files.

    python -m benchmarks.plots docs/benchmarks/serving-llama-3.1-8b.json \\
        docs/benchmarks/kernels-nvidia-h100-80gb-hbm3.json --out-dir docs/benchmarks

Serving: capacity (vLLM's max concurrency at --max-model-len), output tokens/s per workload,
median TTFT and TPOT (p99 as a marker). Kernels: time per call against batch size, and achieved
bandwidth as a share of the measured copy bandwidth, one panel per context length (TreeKV's
budget counts as its context). Only what the files hold is drawn; missing entries are left out.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _pyplot() -> Any:
    """pyplot on the file-only backend (no display on the machines this runs on)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

KERNEL_STYLE = {"fa3": "o-", "fa3_fp8": "s--", "triton": "^-", "treekv": "D-"}


def _stem(run: dict[str, Any]) -> str:
    if run.get("kind") == "serving":
        return "serving-" + Path(str(run.get("model", "model"))).name
    device = str(run.get("environment", {}).get("device", "device")).lower()
    return "kernels-" + "".join(c if c.isalnum() else "-" for c in device).strip("-")


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _grouped_bars(ax: Axes, groups: list[str], series: dict[str, list[float | None]],
                  ylabel: str, log: bool = False) -> None:
    """Bars of each series (backend) side by side within each group (workload)."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        ax.bar(xs, heights, width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def plot_serving(run: dict[str, Any], out_dir: Path) -> list[Path]:
    stem, model = _stem(run), Path(str(run.get("model", ""))).name
    backends: dict[str, Any] = run.get("backends", {})
    ratios: dict[str, Any] = run.get("ratios", {})
    device = run.get("environment", {}).get("device", "")
    written: list[Path] = []
    plt = _pyplot()

    with_capacity = {n: b for n, b in backends.items() if b.get("capacity")}
    if with_capacity:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(with_capacity) + 2), 4.5))
        names = list(with_capacity)
        values = [with_capacity[n]["capacity"]["max_concurrency"] for n in names]
        bars = ax.bar(range(len(names)), values, color="tab:blue")
        for bar, name in zip(bars, names):
            ratio = ratios.get(name, {}).get("max_concurrency")
            label = f"{bar.get_height():.1f}" + (f"\n(x{ratio:.2f})" if ratio else "")
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(values) * 1.2)  # room for the labels
        max_len = next(iter(with_capacity.values()))["capacity"]["max_model_len"]
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(f"requests of {max_len:,} tokens that fit")
        ax.set_title(f"KV capacity, {model} {device} (vLLM's max concurrency; x vs {run.get('reference')})",
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        written.append(_save(fig, out_dir / f"{stem}-capacity.png"))

    workloads = list(dict.fromkeys(w for b in backends.values() for w, r in b.get("workloads", {}).items()
                                   if r.get("status") == "ok"))  # in run order
    if not workloads:
        return written

    def series(key: str) -> dict[str, list[float | None]]:
        out = {}
        for name, b in backends.items():
            values = []
            for w in workloads:
                r = b.get("workloads", {}).get(w, {})
                values.append(r.get("vllm", {}).get(key) if r.get("status") == "ok" else None)
            if any(v is not None for v in values):
                out[name] = values
        return out

    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(workloads) + 2), 4.5))
    _grouped_bars(ax, workloads, series("output_throughput"), "output tokens/s")
    ax.set_title(f"Output throughput, {model} {device}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    written.append(_save(fig, out_dir / f"{stem}-throughput.png"))

    fig, axes = plt.subplots(1, 2, figsize=(max(10, 4 * len(workloads) + 2), 4.5))
    for ax, metric, title in ((axes[0], "ttft", "time to first token"),
                              (axes[1], "tpot", "time per output token")):
        med = series(f"median_{metric}_ms")
        _grouped_bars(ax, workloads, med, f"median {metric.upper()} (ms)", log=True)
        p99 = series(f"p99_{metric}_ms")
        width = 0.8 / max(len(med), 1)
        for i, name in enumerate(med):
            xs = [g + (i - (len(med) - 1) / 2) * width for g in range(len(workloads))]
            pts = [(x, v) for x, v in zip(xs, p99.get(name, [])) if v]
            if pts:
                ax.plot(*zip(*pts), "k_", markersize=8)
        ax.set_title(f"{title} (bar: median, dash: p99)", fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    written.append(_save(fig, out_dir / f"{stem}-latency.png"))
    return written


def plot_kernels(run: dict[str, Any], out_dir: Path) -> list[Path]:
    stem = _stem(run)
    ok = [m for m in run.get("measurements", []) if m.get("status") == "ok"]
    if not ok:
        return []
    contexts = sorted({m["context"] for m in ok})
    kernels = [k for k in KERNEL_STYLE if any(m["kernel"] == k for m in ok)]
    kernels += sorted({m["kernel"] for m in ok} - set(kernels))
    cols = min(3, len(contexts))
    rows = math.ceil(len(contexts) / cols)
    device = run.get("environment", {}).get("device", "")
    hbm = run.get("hbm", {}).get("copy_gbps")
    written = []
    plt = _pyplot()
    for key, ylabel, name, log in (
        ("time_us", "time per call (us)", "time", True),
        ("pct_of_hbm_copy", "% of measured copy bandwidth", "bandwidth", False),
    ):
        fig, axes = plt.subplots(rows, cols, figsize=(max(4.6 * cols, 7), 3.6 * rows + 0.6), squeeze=False)
        for ax, context in zip(axes.flat, contexts):
            for kernel in kernels:
                pts = sorted((m["batch"], m[key]) for m in ok
                             if m["kernel"] == kernel and m["context"] == context and m.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), KERNEL_STYLE.get(kernel, ".-"), label=kernel)
            ax.set_xscale("log", base=2)
            if log:
                ax.set_yscale("log")
            else:
                ax.set_ylim(0, max(110, ax.get_ylim()[1]))
                ax.axhline(100, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{context:,} tokens per request and head", fontsize=9)
            ax.set_xlabel("batch (requests)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(contexts):]:
            ax.set_visible(False)
        shape = run.get("shape", {})
        fig.suptitle(f"Decode attention, one layer ({shape.get('num_heads')}q/{shape.get('num_kv_heads')}kv "
                     f"heads, dim {shape.get('head_dim')}), {device}"
                     + (f"\nmeasured copy bandwidth {hbm:,.0f} GB/s" if hbm else ""), fontsize=10)
        written.append(_save(fig, out_dir / f"{stem}-{name}.png"))
    return written


def plot_files(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        if run.get("kind") == "serving":
            written += plot_serving(run, out_dir)
        elif run.get("kind") == "kernels":
            written += plot_kernels(run, out_dir)
        else:
            raise ValueError(f"{path}: not a serving or kernels result (no 'kind')")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks")
    args = p.parse_args(argv)
    for path in plot_files(args.results, args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
