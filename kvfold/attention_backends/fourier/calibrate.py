"""``kvfold calibrate fourier MODEL --out DIR``: choose the head dims FourierAttention compresses.

As the authors' search (``compressed_dims_search``): the model runs over calibration text with
forward hooks on every layer's ``k_proj``/``v_proj`` (pre-RoPE outputs), each sequence's middle
(after ``sink``, before the last ``recent`` tokens) is compressed dim by dim with ``freqs``
frequencies and rebuilt, and the per-dim squared error is averaged over sequences. Per layer the
lowest-error fraction of the ``KV heads x D`` dims is compressed (:mod:`selection`, the paper's
schedule by default). The result is ``DIR/fourier.json`` (:class:`FourierDims`), written atomically.

Defaults: the paper's 4 sink, 1020 recent and 512 frequencies; 4096-token sequences (the paper
searches on 32k prompts; SmolLM2's context is 8k), 16384 tokens: the middle of a sequence must be
longer than the ``2 x freqs`` coefficient rows or every dim rebuilds almost exactly and the errors
rank nothing (refused). Text: Python's standard library sources, as ``kvfold calibrate vqkv``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from kvfold.attention_backends.vqkv.calibrate import (
    CalibrationError,
    calibration_texts,
    load_model,
    text_source,
    token_sequences,
)

FILE = "fourier.json"
FORMAT_VERSION = 1


class LayerDims(BaseModel):
    key_fraction: float
    value_fraction: float
    key_dims: list[list[int]]  # per KV head, the compressed dims (sorted)
    value_dims: list[list[int]]
    key_error: list[list[float]]  # per KV head and dim, the calibration's mean squared error
    value_error: list[list[float]]


class FourierDims(BaseModel):
    """What ``kvfold calibrate fourier`` writes and the backend will read."""

    format_version: int = FORMAT_VERSION
    num_layers: int
    num_kv_heads: int
    head_size: int
    head_size_v: int
    sink: int
    recent: int
    freqs: int
    seq_len: int
    tokens: int
    text: str | list[str]
    model: str
    layers: list[LayerDims] = Field(default_factory=list)

    @property
    def compressed_fraction(self) -> float:
        """Share of all K and V dims compressed, over layers and heads."""
        total = 2 * self.num_layers * self.num_kv_heads * self.head_size
        return sum(len(h) for layer in self.layers for h in layer.key_dims + layer.value_dims) / total


def read(path: str | Path) -> FourierDims:
    file = Path(path) / FILE
    if not file.is_file():
        raise CalibrationError(f"{file} does not exist: run `kvfold calibrate fourier MODEL --out {path}`")
    return FourierDims.model_validate_json(file.read_text())


def _projections(model: Any) -> list[tuple[Any, Any]]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise CalibrationError(f"{type(model).__name__}: no model.layers[i].self_attn to hook")
    attn = [layer.self_attn for layer in layers]
    if not all(hasattr(a, "k_proj") and hasattr(a, "v_proj") for a in attn):
        raise CalibrationError(f"{type(model).__name__}: attention without k_proj/v_proj")
    return [(a.k_proj, a.v_proj) for a in attn]


def calibrate(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    num_tokens: int = 16384,
    seq_len: int = 4096,
    sink: int = 4,
    recent: int = 1020,
    freqs: int = 512,
    fractions: tuple[float, float] | None = None,
    texts: Sequence[Path] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    num_layers: int | None = None,
    progress: bool = True,
) -> FourierDims:
    """Select the compressed dims of ``model_dir`` and write ``out_dir/fourier.json``.

    ``fractions`` = (key, value) for every layer instead of the paper's schedule; ``num_layers``
    calibrates only the first layers (tests).
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from kvfold.attention_backends.fourier.selection import dim_errors, paper_fractions, select

    middle = seq_len - sink - recent
    if middle <= 2 * freqs:
        raise CalibrationError(
            f"--seq-len {seq_len} leaves a middle of {middle} tokens after {sink} sink and {recent} recent, "
            f"not longer than the {2 * freqs} coefficient rows of {freqs} frequencies: every dim would "
            "rebuild almost exactly. Use a longer --seq-len or fewer --freqs."
        )
    model = load_model(model_dir, dtype, device, num_layers)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    total_layers = int(json.loads((Path(model_dir) / "config.json").read_text()).get("num_hidden_layers",
                                                                                      config.num_hidden_layers))
    projections = _projections(model)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, (k_proj, v_proj) in enumerate(projections):
        for what, module in (("k", k_proj), ("v", v_proj)):
            def hook(_module, _inputs, output, key=(index, what)) -> None:
                captured[key] = output[0].detach().float().cpu()  # [T, Hk * D] of batch row 0
            hooks.append(module.register_forward_hook(hook))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sums = {key: torch.zeros(kv_heads, head_size) for i in range(len(projections)) for key in ((i, "k"), (i, "v"))}
    counted = 0
    sequences = [s for s in token_sequences(tokenizer, calibration_texts(texts), num_tokens, seq_len)
                 if len(s) == seq_len]
    if not sequences:
        raise CalibrationError(f"the calibration text gave no full {seq_len}-token sequence")
    try:
        for ids in tqdm(sequences, desc="fourier calibration", unit="seq", disable=not progress):
            with torch.no_grad():
                model(torch.tensor([ids], device=device), use_cache=False)
            for key, out in captured.items():
                x = out.view(len(ids), kv_heads, -1)
                sums[key] += dim_errors(x, sink, recent, freqs)
            counted += 1
    finally:
        for handle in hooks:
            handle.remove()

    layers = []
    for index in range(len(projections)):
        kf, vf = fractions if fractions is not None else paper_fractions(index, total_layers)
        key_error, value_error = sums[(index, "k")] / counted, sums[(index, "v")] / counted
        layers.append(LayerDims(
            key_fraction=kf, value_fraction=vf,
            key_dims=[d.tolist() for d in select(key_error, kf)],
            value_dims=[d.tolist() for d in select(value_error, vf)],
            key_error=key_error.tolist(), value_error=value_error.tolist()))
    dims = FourierDims(
        num_layers=len(projections), num_kv_heads=kv_heads, head_size=head_size, head_size_v=head_size,
        sink=sink, recent=recent, freqs=freqs, seq_len=seq_len, tokens=counted * seq_len,
        text=text_source(texts), model=str(Path(model_dir).resolve()), layers=layers)
    write(dims, out_dir)
    return dims


def write(dims: FourierDims, out_dir: str | Path) -> None:
    """``out_dir/fourier.json``, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (FILE + ".tmp")
    tmp.write_text(dims.model_dump_json(indent=1))
    os.replace(tmp, out / FILE)


def random_dims(
    model_dir: str | Path,
    *,
    seed: int,
    sink: int = 4,
    recent: int = 1020,
    freqs: int = 512,
    fractions: tuple[float, float] | None = None,
) -> FourierDims:
    """Dims chosen at random in the paper's per-layer proportions, for a model whose weights carry
    no signal (speed and memory runs with dummy weights): same memory and work as calibrated dims,
    no claim on quality. ``text`` says so."""
    import torch

    from kvfold.attention_backends.fourier.selection import paper_fractions, select

    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_size = config.get("head_dim") or config["hidden_size"] // heads
    g = torch.Generator().manual_seed(seed)
    entries = []
    for index in range(layers):
        kf, vf = fractions if fractions is not None else paper_fractions(index, layers)
        noise = torch.rand(2, kv_heads, head_size, generator=g)
        entries.append(LayerDims(
            key_fraction=kf, value_fraction=vf,
            key_dims=[d.tolist() for d in select(noise[0], kf)],
            value_dims=[d.tolist() for d in select(noise[1], vf)],
            key_error=noise[0].tolist(), value_error=noise[1].tolist()))
    return FourierDims(
        num_layers=layers, num_kv_heads=kv_heads, head_size=head_size, head_size_v=head_size,
        sink=sink, recent=recent, freqs=freqs, seq_len=0, tokens=0, text=f"random (seed {seed})",
        model=str(Path(model_dir).resolve()), layers=entries)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face model directory")
    parser.add_argument("--out", required=True, type=Path, help="directory for fourier.json")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--recent", type=int, default=1020)
    parser.add_argument("--freqs", type=int, default=512, help="frequencies k (2k coefficient rows)")
    parser.add_argument("--fractions", help="KEY,VALUE compressed fraction for every layer "
                        "(default: the paper's per-layer schedule)")
    parser.add_argument("--text", type=Path, nargs="*", help="text files/directories (default: stdlib)")
    parser.add_argument("--random", type=int, metavar="SEED",
                        help="no calibration: dims at random in the schedule's proportions, for speed "
                        "and memory runs on dummy weights (no quality claim)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")


def run_cli(ns: argparse.Namespace) -> FourierDims:
    fractions = None
    if ns.fractions:
        try:
            key, value = (float(x) for x in ns.fractions.split(","))
        except ValueError as exc:
            raise SystemExit(f"--fractions {ns.fractions!r}: expected KEY,VALUE such as 0.8,0.8") from exc
        fractions = (key, value)
    if ns.random is not None:
        dims = random_dims(ns.model, seed=ns.random, sink=ns.sink, recent=ns.recent, freqs=ns.freqs,
                           fractions=fractions)
        write(dims, ns.out)
        print(f"wrote {Path(ns.out) / FILE} (random dims, seed {ns.random}): {dims.num_layers} layers, "
              f"{100 * dims.compressed_fraction:.1f}% of K/V dims compressed")
        return dims
    try:
        dims = calibrate(ns.model, ns.out, num_tokens=ns.tokens, seq_len=ns.seq_len, sink=ns.sink,
                         recent=ns.recent, freqs=ns.freqs, fractions=fractions, texts=ns.text,
                         device=ns.device, dtype=ns.dtype)
    except CalibrationError as exc:
        raise SystemExit(f"kvfold calibrate fourier: {exc}") from exc
    print(f"wrote {Path(ns.out) / FILE}: {dims.num_layers} layers, "
          f"{100 * dims.compressed_fraction:.1f}% of K/V dims compressed")
    return dims
