"""Small random checkpoints in Hugging Face format, for tests and the demo (no model hub needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>"]


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer (256 byte tokens + specials, no merges) saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)


def write_tiny_model(
    path: str | Path,
    family: Literal["llama", "qwen2"] = "llama",
    *,
    num_layers: int = 2,
    hidden_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> Path:
    """Write a random ``family`` decoder with a byte tokenizer to ``path``; returns ``path``.

    The weights are drawn wider than a trained model's (std 0.08) so the logits are peaked: greedy
    decoding then depends on the attention output, not on float rounding between near-ties.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(SPECIAL_TOKENS) + 256,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.08,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    write_byte_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return path
