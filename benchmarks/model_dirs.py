"""Model directories for benchmarks at real model shapes, without weights or a model hub.

``benchmarks/models/<name>/config.json`` is the checkpoint's own Hugging Face config; vLLM runs it
with ``--load-format dummy`` (random weights), which is all speed and memory measurements need.
vLLM still wants a tokenizer: the byte tokenizer of :mod:`kvfold.tiny_model` (259 ids) is written
next to the config. Prompts are then token ids below 259, valid ids for any of these vocabularies;
generated ids above 258 decode to nothing, which the benchmark does not look at (``--ignore-eos``
fixes the output length).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

MODELS_DIR = Path(__file__).resolve().parent / "models"


def model_names() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())


def config_path(model_name: str) -> Path:
    path = MODELS_DIR / model_name / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model {model_name!r}; known: {', '.join(model_names())}")
    return path


def load_config(model_dir_or_name: str | Path) -> dict[str, Any]:
    """The config.json of a model directory, or of one of :func:`model_names`."""
    path = Path(model_dir_or_name) / "config.json"
    if not path.is_file():
        path = config_path(str(model_dir_or_name))
    return json.loads(path.read_text())


def prepare(model_name: str, out_dir: str | Path) -> Path:
    """Write ``model_name``'s config and the byte tokenizer to ``out_dir``; returns ``out_dir``."""
    from kvfold.tiny_model import write_byte_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_path(model_name), out / "config.json")
    write_byte_tokenizer(out)
    return out


def write_shape_codebooks(config: dict[str, Any], out_dir: str | Path, key_stages: int = 8,
                          value_stages: int = 1, seed: int = 0, value_groups: int = 16) -> Path:
    """Random VQKV codebooks of ``config``'s shape, for dummy-weight runs (speed and memory depend
    on the shape only; a real model's come from ``kvfold calibrate vqkv``). Idempotent."""
    import torch

    from kvfold.attention_backends.vqkv import codebooks as files
    from kvfold.attention_backends.vqkv.reference import LayerCodebooks, ResidualCodebook, rope_branches

    out = Path(out_dir)
    head = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    manifest = files.CodebookManifest(
        num_layers=int(config["num_hidden_layers"]), num_kv_heads=int(config["num_key_value_heads"]),
        head_size=head, head_size_v=head, key_stages=key_stages, value_stages=value_stages,
        value_groups=value_groups, calibration={"source": "random, shape only (benchmarks/model_dirs.py)", "seed": seed})
    files.write_manifest(out, manifest)
    g = torch.Generator().manual_seed(seed)
    for layer in files.missing_layers(out, manifest):
        key = [ResidualCodebook(d, torch.randn(key_stages, 256, d.numel(), generator=g))
               for d in rope_branches(head)]
        value = [ResidualCodebook(d, torch.randn(value_stages, 256, d.numel(), generator=g))
                 for d in torch.arange(head).view(value_groups, -1)]
        files.save_layer(out, layer, LayerCodebooks(head, head, key, value))
    return out
