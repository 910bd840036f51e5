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
