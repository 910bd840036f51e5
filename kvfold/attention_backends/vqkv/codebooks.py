"""VQKV codebook files: what ``kvfold calibrate vqkv`` writes and the backend loads by path.

A codebook directory holds ``vqkv.json`` (the settings every layer shares, and what they were fitted
on) and one ``layer_NNN.safetensors`` per attention layer (codewords float32, branch dims int64).
Layers are written one by one, so an interrupted calibration resumes at the first missing layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kvfold.attention_backends.vqkv.reference import (
    CODEBOOK_SIZE,
    LayerCodebooks,
    ResidualCodebook,
)

MANIFEST = "vqkv.json"
FORMAT_VERSION = 1


class CodebookManifest(BaseModel):
    """Shape of a codebook set; the backend refuses a model it does not match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_size: int = Field(gt=0)
    head_size_v: int = Field(gt=0)
    codebook_size: int = CODEBOOK_SIZE
    key_stages: int = Field(gt=0, description="residual stages per key branch")
    value_stages: int = Field(gt=0, description="residual stages per value group")
    # Contiguous equal groups of value dims, each its own residual codebook (reference.value_groups).
    # 1 is the paper's whole-value codebook; files written before groups existed load as 1.
    value_groups: int = Field(1, gt=0)
    keys: str = "post-rope"  # vLLM hands the backend rotated keys; the codebooks must match
    #: Provenance, free-form: model path, calibration text, token count, iterations.
    calibration: dict[str, Any] = Field(default_factory=dict)

    @property
    def num_codes(self) -> int:
        return 2 * self.key_stages + self.value_groups * self.value_stages


def layer_file(directory: Path, index: int) -> Path:
    return directory / f"layer_{index:03d}.safetensors"


def save_layer(directory: Path, index: int, books: LayerCodebooks) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, books_of in (("key", books.key), ("value", books.value)):
        for b, book in enumerate(books_of):
            tensors[f"{name}.{b}.codewords"] = book.codewords.float().contiguous()
            tensors[f"{name}.{b}.dims"] = book.dims.long()
    partial = layer_file(directory, index).with_suffix(".partial")
    save_file(tensors, partial)
    partial.replace(layer_file(directory, index))  # a killed run never leaves a half-written layer


def write_manifest(directory: Path, manifest: CodebookManifest) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / (MANIFEST + ".partial")
    partial.write_text(manifest.model_dump_json(indent=2) + "\n")
    # Calibration rewrites the manifest after every layer; a killed run must not leave it torn.
    partial.replace(directory / MANIFEST)


def read_manifest(directory: str | Path) -> CodebookManifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no VQKV codebooks at {directory} ({MANIFEST} missing): fit them with "
            "`kvfold calibrate vqkv MODEL --out DIR` and pass "
            '--additional-config \'{"kvfold": {"codebooks": "DIR"}}\''
        )
    return CodebookManifest.model_validate(json.loads(path.read_text()))


def missing_layers(directory: str | Path, manifest: CodebookManifest) -> list[int]:
    return [i for i in range(manifest.num_layers) if not layer_file(Path(directory), i).is_file()]


def load_layer(directory: str | Path, index: int, manifest: CodebookManifest) -> LayerCodebooks:
    from safetensors.torch import load_file

    tensors = load_file(layer_file(Path(directory), index))
    def books(name: str, count: int) -> list[ResidualCodebook]:
        return [ResidualCodebook(tensors[f"{name}.{b}.dims"], tensors[f"{name}.{b}.codewords"])
                for b in range(count)]

    key = books("key", 2)
    if "value.codewords" in tensors:  # written before value groups existed: one group
        value = [ResidualCodebook(tensors["value.dims"], tensors["value.codewords"])]
    else:
        value = books("value", manifest.value_groups)
    stages = [b.stages for b in key] + [b.stages for b in value]
    expected = [manifest.key_stages] * 2 + [manifest.value_stages] * manifest.value_groups
    if stages != expected:
        raise ValueError(f"{layer_file(Path(directory), index)}: stages {stages} differ from "
                         f"{MANIFEST}'s {expected}")
    return LayerCodebooks(manifest.head_size, manifest.head_size_v, key, value)
