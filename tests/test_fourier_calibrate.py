"""``kvfold calibrate fourier``: the selection file from the CLI on a tiny random Llama, refusals, and
on SmolLM2 (real weights) a selection that holds on held-out text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvfold.attention_backends.fourier import calibrate as calib
from kvfold.attention_backends.fourier.selection import dim_errors, paper_fractions
from kvfold.cli import main

HELD_OUT = Path("/usr/share/common-licenses/GPL-3")


def test_cli_writes_the_schedule(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "dims"
    main(["calibrate", "fourier", str(tiny_llama), "--out", str(out), "--tokens", "1800", "--seq-len", "600",
          "--recent", "60", "--freqs", "64"])
    dims = calib.read(out)
    assert (dims.sink, dims.recent, dims.freqs, dims.tokens) == (4, 60, 64, 1800)
    size = dims.num_kv_heads * dims.head_size
    for index, layer in enumerate(dims.layers):
        assert (layer.key_fraction, layer.value_fraction) == paper_fractions(index, dims.num_layers)
        assert sum(map(len, layer.key_dims)) == round(layer.key_fraction * size)
        assert sum(map(len, layer.value_dims)) == round(layer.value_fraction * size)
        # the compressed dims are the lowest-error ones of the layer
        errors = torch.tensor(layer.key_error)
        chosen = torch.zeros_like(errors, dtype=torch.bool)
        for h, d in enumerate(layer.key_dims):
            chosen[h, d] = True
        assert errors[chosen].max() <= errors[~chosen].min()
    main(["calibrate", "fourier", str(tiny_llama), "--out", str(out), "--tokens", "1200", "--seq-len", "600",
          "--recent", "60", "--freqs", "64", "--fractions", "0.5,0.25"])
    again = calib.read(out)
    assert [(layer.key_fraction, layer.value_fraction) for layer in again.layers] == [(0.5, 0.25)] * dims.num_layers


def test_refusals(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="coefficient rows"):
        main(["calibrate", "fourier", str(tiny_llama), "--out", str(tmp_path), "--seq-len", "2048"])
    with pytest.raises(SystemExit, match="KEY,VALUE"):
        main(["calibrate", "fourier", str(tiny_llama), "--out", str(tmp_path), "--fractions", "0.8"])
    with pytest.raises(calib.CalibrationError, match="kvfold calibrate fourier"):
        calib.read(tmp_path)


def held_out_kv(model_dir: Path, layers: int, seq_len: int) -> dict[tuple[int, str], torch.Tensor]:
    """Pre-RoPE K/V ``[T, Hk * D]`` of the first ``layers`` layers on the held-out text."""
    from transformers import AutoTokenizer

    model = calib.load_model(model_dir, "float32", "cpu", layers)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(HELD_OUT.read_text(), add_special_tokens=False).input_ids[:seq_len]
    captured = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, key=(i, w): captured.__setitem__(key, out[0]))
             for i, pair in enumerate(calib._projections(model)) for w, m in zip("kv", pair)]
    with torch.no_grad():
        model(torch.tensor([ids]), use_cache=False)
    for h in hooks:
        h.remove()
    return captured


def test_smollm2_selection_holds_on_held_out_text(smollm2: Path, tmp_path: Path) -> None:
    # Calibrated on two 4096-token stdlib sequences (first 3 layers), checked on 4096 tokens of
    # GPL-3: the compressed dims rebuild with far less error than the kept ones, and than a random
    # selection of the same size.
    layers = 3
    dims = calib.calibrate(smollm2, tmp_path, num_tokens=8192, seq_len=4096, num_layers=layers, progress=False)
    assert dims.num_layers == layers and dims.num_kv_heads == 3 and dims.head_size == 64
    held = held_out_kv(smollm2, layers, 4096)
    g = torch.Generator().manual_seed(0)
    for index, layer in enumerate(dims.layers):
        for what, chosen_dims in (("k", layer.key_dims), ("v", layer.value_dims)):
            errors = dim_errors(held[(index, what)].view(4096, 3, 64), 4, 1020, 512)
            chosen = torch.zeros_like(errors, dtype=torch.bool)
            for h, d in enumerate(chosen_dims):
                chosen[h, d] = True
            random = torch.zeros(errors.numel(), dtype=torch.bool)
            random[torch.randperm(errors.numel(), generator=g)[: int(chosen.sum())]] = True
            compressed, kept = errors[chosen].mean(), errors[~chosen].mean()
            assert compressed < 0.5 * kept, (index, what, float(compressed), float(kept))
            assert compressed < errors.flatten()[random].mean(), (index, what)
