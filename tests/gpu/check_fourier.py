"""On a GPU: KVFOLD_FOURIER's compiled Triton decode path against the specification (no vLLM needed).

Not part of CI (no GPU there); needs torch, Triton and pydantic only:
    python tests/gpu/check_fourier.py OUT.json
Runs the paged steps of tests/fourier_steps.py through ``step.attend_step`` on CUDA (decode through
the compiled kernels, prefill through the torch path) and compares every step's outputs with
``stream.FourierStream``: the test's small shapes (float32 layer-major, bfloat16 block-major, a
head with every K dim compressed, one with no V dim compressed) and Llama-3.1-8B's attention shape
with the paper's settings (4 sink, 1020 recent, 512 frequencies, 80% of dims compressed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]

from fourier_steps import run_steps  # noqa: E402

from kvfold.attention_backends.fourier.layout import FourierLayout  # noqa: E402
from kvfold.attention_backends.fourier.selection import select  # noqa: E402
from kvfold.attention_backends.fourier.step import GraphedDecode, attend_step  # noqa: E402


def random_dims(layers: int, heads: int, size: int, fractions: tuple[float, float], seed: int):
    g = torch.Generator().manual_seed(seed)
    out = ([], [])
    for _ in range(layers):
        noise = torch.rand(2, heads, size, generator=g)
        for kind in range(2):
            out[kind].append(select(noise[kind], fractions[kind]))
    return out


def check(name: str, layout: FourierLayout, *, heads: int, window: int, order: str, plans=None,
          num_blocks: int = 300, atol: float = 2e-4, graphs: bool = False) -> dict:
    """``graphs``: decode through ``step.GraphedDecode`` (padded batches replayed as CUDA graphs;
    run with KVFOLD_CUDA_GRAPHS=strict so a failed capture fails the check)."""
    tables: dict[int, object] = {}
    graphed = {i: GraphedDecode() for i in range(layout.num_layers)} if graphs else {}

    def attend(arena, index, q, k, v, block_table, requests, out) -> None:
        tables[index] = attend_step(arena, index, tables.get(index), q, k, v, block_table, requests, out,
                                    scale=layout.head_size**-0.5, window=window, graphed=graphed.get(index))

    started = time.monotonic()
    kwargs = {"plans": plans} if plans else {}
    worst = run_steps(layout, attend, heads=heads, window=window, scale=layout.head_size**-0.5,
                      device="cuda", order=order, num_blocks=num_blocks, atol=atol, **kwargs)
    result = {"case": name, "ok": True, "max_abs_error": worst, "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(result), flush=True)
    return result


def failed(name: str, exc: Exception) -> dict:
    result = {"case": name, "ok": False, "error": repr(exc)[:2000]}
    print(json.dumps(result), flush=True)
    return result


def main(out: str, which: str = "all") -> None:
    """``which``: ``small`` (the test's shapes), ``llama`` (Llama-3.1-8B's), or ``all``."""
    assert torch.cuda.is_available(), "needs CUDA"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
    kd, vd = random_dims(2, 2, 64, (0.6, 0.8), seed=3)
    kd[0][0], vd[1][1] = torch.arange(64), torch.arange(0)
    for dtype, order in ((torch.bfloat16, "block-major"), (torch.float32, "layer-major")) if which != "llama" else ():
        layout = FourierLayout(kd, vd, head_size=64, head_size_v=64, dtype=dtype, block_size=16,
                               sink=4, recent=20, freqs=8)
        try:
            results["cases"].append(check(f"small {dtype} {order}", layout, heads=4, window=512 - 24, order=order))
        except Exception as exc:  # noqa: BLE001 (recorded; the other cases still run)
            results["cases"].append(failed(f"small {dtype} {order}", exc))
        Path(out).write_text(json.dumps(results, indent=1))
    if which == "small":
        return
    kd, vd = random_dims(2, 8, 128, (0.8, 0.8), seed=0)
    layout = FourierLayout(kd, vd, head_size=128, head_size_v=128, dtype=torch.bfloat16, block_size=16,
                           sink=4, recent=1020, freqs=512)
    plans = {0: [2600] + [1] * 6, 1: [1500, 700] + [1] * 6, 2: [2040] + [1] * 12}
    for graphs in (False, True):
        name = "llama-3.1-8b shape, paper settings" + (", CUDA graphs" if graphs else "")
        try:
            results["cases"].append(check(name, layout, heads=32, window=32768 - 1024, order="layer-major",
                                          plans=plans, num_blocks=3 * (layout.reserved_blocks + 200),
                                          atol=2e-3, graphs=graphs))
        except Exception as exc:  # noqa: BLE001
            results["cases"].append(failed(name, exc))
    Path(out).write_text(json.dumps(results, indent=1))
    print("all ok" if all(c["ok"] for c in results["cases"]) else "FAILED", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
