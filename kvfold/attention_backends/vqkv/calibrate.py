"""``kvfold calibrate vqkv MODEL --out DIR``: fit VQKV codebooks to a model's own post-RoPE K/V.

Calibration runs the Hugging Face model over text, takes the rotated keys and the values from its
cache (what vLLM hands the attention backend), and fits one :class:`LayerCodebooks` per layer with
residual k-means (:func:`reference.fit_residual`): two key branches (the high- and low-frequency RoPE
dims) of ``key_stages`` stages each and ``value_groups`` contiguous groups of value dims with
``value_stages`` stages each. The KV
heads of a layer share its codebooks, so a layer's samples pool tokens and heads.

Defaults, sized for a CPU and a small model such as SmolLM2-135M (the paper fits on ~10M tokens of
the model's own KV with a GPU); times measured on 2 shared CPU cores:

* ``DEFAULT_TOKENS = 65536`` tokens in ``DEFAULT_SEQ_LEN = 2048``-token sequences: the forward pass
  of SmolLM2 over them takes 2-4 minutes. 2048 rather than 1024 because the key pairs whose rotation
  period is a few thousand tokens then show more of their angles; contexts served much longer than
  ``seq_len`` put those pairs at angles calibration never saw.
* ``DEFAULT_MAX_SAMPLES = 65536`` vectors per layer, drawn evenly from the sequences: 256 rows per
  codeword of a stage. Against 16384 rows it lowers SmolLM2's held-out error by ~6% (K) and 6-11%
  (V) relative; against 32768 by 1.5-3.5%, at twice the fitting time: 45-120 s per layer with 8 + 8
  key stages and one 16-stage value codebook (the 16 one-stage value groups of today's default fit
  no slower), so 30 layers take 25-60 minutes on 2 cores (``--max-samples 32768`` halves that; more
  cores or ``--device cuda`` much more).
* ``DEFAULT_ITERATIONS = 20`` Lloyd iterations per stage; 10 gave a held-out error within 1%.

The first ``SINK_POSITIONS`` tokens of each sequence are left out of the samples: the backend keeps a
request's sink tokens exact, so codewords spent on their (atypical) K/V would never be read.

A run is resumable: settings and provenance go to ``vqkv.json`` first, the sampled K/V to
``samples/`` (so a resumed run skips the forward pass), and layers are written one by one. A rerun
with the same settings fits only the layers still missing; with other settings it refuses to mix
codebooks of two calibrations in one directory. The module imports torch lazily: the ``kvfold``
command builds its parser from :func:`add_arguments` for every subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kvfold.attention_backends.vqkv.codebooks import CodebookManifest
    from kvfold.attention_backends.vqkv.reference import LayerCodebooks

DEFAULT_KEY_STAGES = 8
# The value as 16 groups of one stage (product quantization, 16 bytes): docs/vqkv.md has why. The
# paper's layout is --value-groups 1 --value-stages 16 (the same bytes).
DEFAULT_VALUE_STAGES = 1
DEFAULT_VALUE_GROUPS = 16
DEFAULT_TOKENS = 65536
DEFAULT_SEQ_LEN = 2048
DEFAULT_ITERATIONS = 20
DEFAULT_MAX_SAMPLES = 65536
SINK_POSITIONS = 4  # the backend's default ``sink``: those tokens are never read from codes

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
# Test suites are mostly generated data and odd literals; site-packages is not the stdlib.
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
STDLIB_CHARS = 8192  # ~2k tokens of Python for a BPE tokenizer
SAMPLES_DIR = "samples"
# Provenance that changes the codebooks; a resumed run must agree on all of it.
SETTINGS_KEYS = ("model", "text", "tokens", "seq_len", "iterations", "max_samples", "seed", "dtype",
                 "sink_positions")


class CalibrationError(ValueError):
    """A calibration that cannot run as asked (model, settings or output directory)."""


# ---------------------------------------------------------------------------------------------
# Text


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(paths: Sequence[Path], suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Path]:
    """Files among ``paths`` (directories recursed, sorted) with one of ``suffixes``."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(
                f for f in sorted(path.rglob("*"))
                if f.is_file() and f.suffix in suffixes
                and not SKIPPED_DIRS.intersection(f.relative_to(path).parts[:-1])
            )
        else:
            raise CalibrationError(f"calibration text {path} does not exist")
    return found


def calibration_texts(paths: Sequence[Path] | None) -> Iterator[str]:
    """The calibration documents, in a fixed order.

    ``None`` means the ``.py`` sources of Python's standard library (present on every machine, and
    free of the held-out text the tests evaluate on), each cut to its first ``STDLIB_CHARS``
    characters so the default token budget spans dozens of modules rather than the first two large
    ones in sorted order. Files and directories given are read whole.
    """
    if paths is None:
        for file in text_files([stdlib_dir()], (".py",)):
            text = file.read_text(encoding="utf-8", errors="replace")[:STDLIB_CHARS]
            if text.strip():
                yield text
        return
    for file in text_files(paths):
        text = file.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text


def text_source(paths: Sequence[Path] | None) -> str | list[str]:
    """How the provenance names the calibration text."""
    if paths is None:
        return f"python-stdlib:{stdlib_dir()}"
    return [str(Path(p).resolve()) for p in paths]


def _start_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS, if the model expects one)."""
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return list(with_special[: len(with_special) - len(plain)]) if with_special[-len(plain):] == plain else []


def token_sequences(tokenizer: Any, texts: Iterable[str], num_tokens: int, seq_len: int) -> Iterator[list[int]]:
    """Sequences of ``seq_len`` tokens (the last may be shorter), ``num_tokens`` in all.

    Documents are joined with EOS, and each sequence starts with the tokens the tokenizer puts
    before a text (BOS where the model expects one), as a served prompt does.
    """
    prefix = _start_tokens(tokenizer)
    body = seq_len - len(prefix)
    if body <= SINK_POSITIONS:
        raise CalibrationError(f"--seq-len {seq_len} is too short")
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pending: list[int] = []
    produced = 0
    for text in texts:
        if num_tokens - produced - len(prefix) <= SINK_POSITIONS:
            return  # the budget is spent: read no further documents
        # A token spans well under 16 characters: no need to tokenize the rest of a large file.
        ids = tokenizer(text[: 16 * (num_tokens - produced)], add_special_tokens=False).input_ids
        pending.extend(ids + separator)
        while len(pending) >= body:
            take = min(body, num_tokens - produced - len(prefix))
            if take <= SINK_POSITIONS:
                return
            yield prefix + pending[:take]
            produced, pending = produced + len(prefix) + take, pending[body:]
    take = min(len(pending), num_tokens - produced - len(prefix))
    if take > SINK_POSITIONS:  # the text ran out first: its tail is one shorter sequence
        yield prefix + pending[:take]


# ---------------------------------------------------------------------------------------------
# Model


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope_parameter_sets(config: Any) -> list[dict]:
    """The RoPE parameter dicts of a config (transformers 5 may nest them by layer type)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params] if isinstance(params, dict) else []


def model_shape(model_dir: str | Path) -> dict[str, int]:
    """Layers, KV heads and head sizes of a plain-RoPE decoder; :class:`CalibrationError` otherwise.

    "Plain" means every layer attends with full-width neox RoPE (the layout of
    :func:`reference.rope_branches`): no partial rotary dims, no latent (MLA) KV, no encoder.
    """
    from transformers import AutoConfig

    config = _text_config(AutoConfig.from_pretrained(model_dir))
    name = f"{model_dir} ({getattr(config, 'model_type', '?')})"
    if getattr(config, "is_encoder_decoder", False):
        raise CalibrationError(f"{name}: VQKV calibrates decoder-only models")
    if getattr(config, "kv_lora_rank", None):
        raise CalibrationError(f"{name}: latent (MLA) KV is not a per-head K/V cache")
    ropes = _rope_parameter_sets(config)
    if not ropes and getattr(config, "rope_theta", None) is None:
        raise CalibrationError(f"{name}: no rotary position embedding; VQKV splits keys by RoPE frequency")
    heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    partial = [getattr(config, "partial_rotary_factor", None), getattr(config, "rotary_pct", None)]
    partial += [r.get("partial_rotary_factor") for r in ropes]
    rotary_dim = getattr(config, "rotary_dim", None)
    if any(p not in (None, 1, 1.0) for p in partial) or rotary_dim not in (None, head_size):
        raise CalibrationError(f"{name}: partial rotary embedding; VQKV needs RoPE on all key dims")
    if head_size % 4:
        raise CalibrationError(f"{name}: head dim {head_size} % 4 != 0 (two RoPE branches of pairs)")
    return {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_size": head_size,
        "head_size_v": getattr(config, "v_head_dim", None) or head_size,
    }


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model(model_dir: str | Path, dtype: str | torch.dtype, device: str, num_layers: int | None = None):
    """The HF model in eval mode; ``num_layers`` keeps only the first layers (fewer to run)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    text = _text_config(config)
    if num_layers is not None and num_layers < text.num_hidden_layers:
        text.num_hidden_layers = num_layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:num_layers]
    from kvfold.models.rope_pp.hf_model import is_rope_pp, load_rope_pp

    if is_rope_pp(config):  # transformers' Llama does not fit a RoPE++ checkpoint's weights
        model = load_rope_pp(model_dir, config, _torch_dtype(dtype))
        return model.to(device).eval()
    # Quiet: the layers left out would be reported as unexpected weights, and the loading bar
    # would interleave with the calibration's own.
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=_torch_dtype(dtype))
    return model.to(device).eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _layer_kv(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``index`` of a forward's cache as ``[B, Hk, T, D]`` keys and values."""
    if hasattr(cache, "layers"):  # transformers >= 4.56: DynamicCache of DynamicLayer
        layer = cache.layers[index]
        return layer.keys, layer.values
    if hasattr(cache, "key_cache"):  # transformers 4.5x before the layer refactor
        return cache.key_cache[index], cache.value_cache[index]
    return cache[index][0], cache[index][1]  # legacy tuple of (key, value)


def _sample_rows(count: int, quota: int | None, generator: torch.Generator) -> torch.Tensor | None:
    import torch

    if quota is None or quota >= count:
        return None
    return torch.randperm(count, generator=generator)[:quota].sort().values


def collect_kv(
    model_dir: str | Path,
    texts: Iterable[str],
    num_tokens: int,
    seq_len: int,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    *,
    layers: Sequence[int] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE ``(keys [M, D], values [M, Dv])`` float32 on the CPU, per layer.

    Rows are (sequence, token, KV head) flattened, without each sequence's first ``SINK_POSITIONS``
    tokens. ``max_samples`` keeps that many rows per layer, drawn evenly from every sequence (the
    same rows for every layer) so memory stays bounded; ``layers`` limits what is kept and run.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    shape = model_shape(model_dir)
    wanted = list(range(shape["num_layers"])) if layers is None else sorted(set(layers))
    model = load_model(model_dir, dtype, device, num_layers=wanted[-1] + 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_positions = getattr(_text_config(model.config), "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise CalibrationError(f"--seq-len {seq_len} exceeds the model's {max_positions} positions")
    num_sequences = math.ceil(num_tokens / seq_len)
    quota = None if max_samples is None else math.ceil(max_samples / num_sequences)
    generator = torch.Generator().manual_seed(seed)
    keys: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    values: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    sequences = token_sequences(tokenizer, texts, num_tokens, seq_len)
    with torch.inference_mode():
        for ids in tqdm(sequences, total=num_sequences, desc="K/V", unit="seq", disable=not progress):
            # The base model: the LM head is not needed, and is a large GEMM over the vocabulary.
            out = model.base_model(input_ids=torch.tensor([ids], device=device), use_cache=True)
            rows = None
            for i in wanted:
                k, v = _layer_kv(out.past_key_values, i)
                k = _flatten(k, shape["head_size"], shape["num_kv_heads"], i, "keys")
                v = _flatten(v, shape["head_size_v"], shape["num_kv_heads"], i, "values")
                if rows is None:
                    rows = _sample_rows(k.shape[0], quota, generator)
                keys[i].append(k if rows is None else k[rows])
                values[i].append(v if rows is None else v[rows])
    if not keys[wanted[0]]:
        raise CalibrationError("the calibration text gave no token sequences")
    return {i: _concat(keys[i], values[i], max_samples) for i in wanted}


def _flatten(x: torch.Tensor, size: int, heads: int, layer: int, what: str) -> torch.Tensor:
    """``[1, Hk, T, D]`` cache entry -> ``[(T - sink) * Hk, D]`` float32 CPU rows."""
    if x.dim() != 4 or x.shape[1] != heads or x.shape[-1] != size:
        raise CalibrationError(
            f"layer {layer} cached {what} of shape {tuple(x.shape)}, expected [1, {heads}, T, {size}]: "
            "not a plain per-head K/V cache"
        )
    return x[0, :, SINK_POSITIONS:].transpose(0, 1).reshape(-1, size).float().cpu()


def _concat(keys: list[torch.Tensor], values: list[torch.Tensor], limit: int | None):
    import torch

    k, v = torch.cat(keys), torch.cat(values)
    return (k[:limit], v[:limit]) if limit is not None else (k, v)


# ---------------------------------------------------------------------------------------------
# Fitting


def fit_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_stages: int,
    value_stages: int,
    iterations: int,
    seed: int,
    device: str = "cpu",
    value_groups: int = 1,
) -> LayerCodebooks:
    """Codebooks of one layer from its ``[M, D]`` keys and ``[M, Dv]`` values."""
    import torch

    from kvfold.attention_backends.vqkv.reference import (
        LayerCodebooks,
        ResidualCodebook,
        fit_residual,
        rope_branches,
    )
    from kvfold.attention_backends.vqkv.reference import value_groups as split_value

    def fit(x: torch.Tensor, stages: int, branch: int) -> torch.Tensor:
        return fit_residual(x.to(device), stages, iterations, seed=seed * 1009 + branch).cpu()

    head_size, head_size_v = keys.shape[-1], values.shape[-1]
    key = [ResidualCodebook(dims, fit(keys[:, dims], key_stages, b))
           for b, dims in enumerate(rope_branches(head_size))]
    value = [ResidualCodebook(dims, fit(values[:, dims], value_stages, 2 + g))
             for g, dims in enumerate(split_value(head_size_v, value_groups))]
    return LayerCodebooks(head_size, head_size_v, key, value)


def layer_errors(books: LayerCodebooks, keys: torch.Tensor, values: torch.Tensor,
                 device: str = "cpu") -> dict[str, float]:
    """Relative reconstruction errors ``||K̂ - K|| / ||K||`` and the same for V."""
    from kvfold.attention_backends.vqkv.reference import relative_error

    k, v = keys.to(device), values.to(device)
    approx_k, approx_v = books.reconstruct(k, v)
    return {"key": round(relative_error(approx_k, k), 5), "value": round(relative_error(approx_v, v), 5)}


# ---------------------------------------------------------------------------------------------
# Output directory


def _settings(manifest: CodebookManifest) -> dict[str, Any]:
    shape = manifest.model_dump(exclude={"calibration"})
    return {**shape, **{k: manifest.calibration.get(k) for k in SETTINGS_KEYS}}


def prepare_output(out_dir: Path, manifest: CodebookManifest) -> CodebookManifest:
    """Write ``manifest`` to a new ``out_dir``, or return the one a matching earlier run left there."""
    from pydantic import ValidationError

    from kvfold.attention_backends.vqkv.codebooks import (
        MANIFEST,
        read_manifest,
        write_manifest,
    )

    advice = "pass another --out, or delete it to start over"
    if not (out_dir / MANIFEST).exists():
        if any(out_dir.glob("layer_*.safetensors")):
            raise CalibrationError(f"{out_dir} holds codebook layers but no {MANIFEST}: {advice}")
        write_manifest(out_dir, manifest)
        return manifest
    try:
        existing = read_manifest(out_dir)
    except (ValidationError, ValueError) as err:
        raise CalibrationError(f"{out_dir / MANIFEST} is not a VQKV manifest ({err}): {advice}") from err
    old, new = _settings(existing), _settings(manifest)
    differ = {k: (old[k], new[k]) for k in new if old.get(k) != new[k]}
    if differ:
        listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise CalibrationError(f"{out_dir} holds codebooks calibrated with other settings ({listed}): {advice}")
    return existing


def samples_file(out_dir: Path, index: int) -> Path:
    return out_dir / SAMPLES_DIR / f"layer_{index:03d}.safetensors"


def save_samples(out_dir: Path, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path = samples_file(out_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"keys": keys.contiguous(), "values": values.contiguous()}, partial)
    partial.replace(path)  # a killed run leaves whole sample files or none


def load_samples(out_dir: Path, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(samples_file(out_dir, index))
    return tensors["keys"], tensors["values"]


def _with_errors(manifest: CodebookManifest, index: int, samples: int,
                 errors: dict[str, float]) -> CodebookManifest:
    rows = [r for r in manifest.calibration.get("errors", []) if r["layer"] != index]
    rows.append({"layer": index, "samples": samples, **errors})
    calibration = {**manifest.calibration, "errors": sorted(rows, key=lambda r: r["layer"])}
    return manifest.model_copy(update={"calibration": calibration})


# ---------------------------------------------------------------------------------------------
# The command


def calibrate(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    key_stages: int = DEFAULT_KEY_STAGES,
    value_stages: int = DEFAULT_VALUE_STAGES,
    value_groups: int = DEFAULT_VALUE_GROUPS,
    num_tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    iterations: int = DEFAULT_ITERATIONS,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    texts: Sequence[Path] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    layers: Sequence[int] | None = None,
    progress: bool = True,
) -> CodebookManifest:
    """Fit and write the codebooks of ``model_dir`` to ``out_dir``; returns the final manifest.

    ``texts`` are calibration files or directories (default: the Python standard library, see
    :func:`calibration_texts`). ``layers`` fits only those layers (tests); the manifest still
    describes the whole model and :func:`codebooks.missing_layers` lists the others.

    ``manifest.calibration["errors"]`` holds each fitted layer's relative K and V error on the rows
    it was fitted on: a lower bound; on other text the value error can be twice as large.
    """
    from tqdm.auto import tqdm

    from kvfold.attention_backends.vqkv.codebooks import (
        CodebookManifest,
        missing_layers,
        save_layer,
        write_manifest,
    )
    from kvfold.attention_backends.vqkv.reference import CODEBOOK_SIZE

    out = Path(out_dir)
    shape = model_shape(model_dir)
    if max_samples < CODEBOOK_SIZE:
        raise CalibrationError(f"--max-samples {max_samples} < {CODEBOOK_SIZE}: each codeword needs samples")
    wanted = _wanted_layers(layers, shape["num_layers"])
    provenance = {
        "model": str(Path(model_dir).resolve()), "text": text_source(texts), "tokens": num_tokens,
        "seq_len": seq_len, "iterations": iterations, "max_samples": max_samples, "seed": seed,
        "dtype": dtype, "sink_positions": SINK_POSITIONS,
    }
    if value_groups < 1 or shape["head_size_v"] % value_groups:
        raise CalibrationError(f"--value-groups {value_groups} does not divide the value's "
                               f"{shape['head_size_v']} dims")
    manifest = CodebookManifest(**shape, key_stages=key_stages, value_stages=value_stages,
                                value_groups=value_groups, calibration=provenance)
    manifest = prepare_output(out, manifest)
    todo = [i for i in missing_layers(out, manifest) if i in wanted]
    if progress and len(todo) < len(wanted):
        tqdm.write(f"{out}: {len(wanted) - len(todo)} of {len(wanted)} layers already fitted, resuming")
    _collect_missing_samples(out, model_dir, todo, texts, num_tokens, seq_len, device, dtype,
                             max_samples, seed, progress)
    for index in tqdm(todo, desc="codebooks", unit="layer", disable=not progress):
        keys, values = load_samples(out, index)
        books = fit_layer(keys, values, key_stages, value_stages, iterations, seed + index, device,
                          value_groups)
        save_layer(out, index, books)
        manifest = _with_errors(manifest, index, keys.shape[0], layer_errors(books, keys, values, device))
        write_manifest(out, manifest)
        samples_file(out, index).unlink()
    _drop_samples(out, manifest)
    return manifest


def _wanted_layers(layers: Sequence[int] | None, num_layers: int) -> set[int]:
    if layers is None:
        return set(range(num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise CalibrationError(f"layers {bad} out of range: the model has {num_layers}")
    return set(layers)


def _collect_missing_samples(out: Path, model_dir: str | Path, todo: list[int],
                             texts: Sequence[Path] | None, num_tokens: int, seq_len: int,
                             device: str, dtype: str, max_samples: int, seed: int,
                             progress: bool) -> None:
    """Run the model once for the layers to fit whose samples no earlier run cached."""
    from kvfold.attention_backends.vqkv.reference import CODEBOOK_SIZE

    need = [i for i in todo if not samples_file(out, i).is_file()]
    if not need:
        return
    collected = collect_kv(model_dir, calibration_texts(texts), num_tokens, seq_len, device, dtype,
                           layers=need, max_samples=max_samples, seed=seed, progress=progress)
    for index, (keys, values) in collected.items():
        if keys.shape[0] < CODEBOOK_SIZE:
            raise CalibrationError(
                f"only {keys.shape[0]} K/V samples per layer, {CODEBOOK_SIZE} codewords need more: "
                "raise --tokens or give more --text"
            )
        save_samples(out, index, keys, values)


def _drop_samples(out: Path, manifest: CodebookManifest) -> None:
    from kvfold.attention_backends.vqkv.codebooks import missing_layers

    samples = out / SAMPLES_DIR
    if samples.is_dir() and (not missing_layers(out, manifest) or not any(samples.iterdir())):
        shutil.rmtree(samples)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``kvfold calibrate vqkv`` options."""
    parser.add_argument("model", help="Hugging Face model directory (a plain-RoPE decoder)")
    parser.add_argument("--out", help="codebook directory (default: MODEL/vqkv_codebooks)")
    parser.add_argument("--key-stages", type=int, default=DEFAULT_KEY_STAGES,
                        help="residual stages per key RoPE branch (bytes per key: 2x this)")
    parser.add_argument("--value-stages", type=int, default=DEFAULT_VALUE_STAGES,
                        help="residual stages per value group (bytes per value: groups x this)")
    parser.add_argument("--value-groups", type=int, default=DEFAULT_VALUE_GROUPS,
                        help="contiguous groups of value dims, each with its own residual codebooks "
                             "(1: the paper's; more: a faster decode kernel, some fidelity lost)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per sequence")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help="k-means iterations per stage")
    parser.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES,
                        help="K/V vectors per layer the codebooks are fitted on")
    parser.add_argument("--text", type=Path, action="append",
                        help="calibration text file or directory (repeatable; default: Python's "
                             "standard library sources)")
    parser.add_argument("--device", default="cpu", help="torch device for the model and the fitting")
    parser.add_argument("--dtype", default="float32", help="model dtype for the forward pass")
    parser.add_argument("--seed", type=int, default=0)


def run_cli(ns: argparse.Namespace) -> CodebookManifest:
    out = Path(ns.out) if ns.out else Path(ns.model) / "vqkv_codebooks"
    try:
        manifest = calibrate(
            ns.model, out, key_stages=ns.key_stages, value_stages=ns.value_stages,
            value_groups=ns.value_groups,
            num_tokens=ns.tokens, seq_len=ns.seq_len, iterations=ns.iterations,
            max_samples=ns.max_samples, texts=ns.text, device=ns.device, dtype=ns.dtype, seed=ns.seed,
        )
    except CalibrationError as err:
        raise SystemExit(f"kvfold calibrate vqkv: {err}") from err
    errors = manifest.calibration.get("errors", [])
    if errors:
        mean_k = sum(r["key"] for r in errors) / len(errors)
        mean_v = sum(r["value"] for r in errors) / len(errors)
        print(f"{out}: {len(errors)} layers, {manifest.num_codes} bytes per token and KV head; "
              f"mean relative error on the samples: K {mean_k:.3f}, V {mean_v:.3f}")
    return manifest
