"""A transformers-side FourierAttention model, for tests: greedy generation to compare vLLM with.

Transformers' own Llama (embeddings, norms, RoPE, MLP, lm_head) with every layer's attention
replaced by :class:`kvfold.attention_backends.fourier.stream.FourierStream` (one per layer), fed in
the steps vLLM takes: the prompt in chunks of ``chunk`` tokens, then one token per step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvfold.attention_backends.fourier.calibrate import read
from kvfold.attention_backends.fourier.stream import FourierStream


def generate(model_dir: Path, dims_dir: Path, prompt: list[int], max_tokens: int, *, sink: int,
             recent: int, freqs: int, window: int, chunk: int | None = None) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs (float32) for one prompt."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dims = read(dims_dir)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        attn.fourier = FourierStream(
            [torch.tensor(h, dtype=torch.long) for h in dims.layers[index].key_dims],
            [torch.tensor(h, dtype=torch.long) for h in dims.layers[index].value_dims],
            sink=sink, recent=recent, freqs=freqs, window=window, scale=head_dim**-0.5)

        def forward(hidden_states, position_embeddings, attention_mask=None, _attn=attn, **kwargs):
            length = hidden_states.shape[1]
            q, k, v = (proj(hidden_states).view(1, length, -1, head_dim).transpose(1, 2)
                       for proj in (_attn.q_proj, _attn.k_proj, _attn.v_proj))
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
            out = _attn.fourier.step(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
            return _attn.o_proj(out.reshape(1, length, -1)), None

        attn.forward = forward

    steps = [prompt[i : i + (chunk or len(prompt))] for i in range(0, len(prompt), chunk or len(prompt))]
    done, tokens, logprobs = 0, [], []
    with torch.no_grad():
        while len(tokens) < max_tokens:
            ids = steps.pop(0) if steps else [tokens[-1]]
            positions = torch.arange(done, done + len(ids))[None]
            logits = model(torch.tensor([ids]), position_ids=positions, use_cache=False).logits[0, -1]
            done += len(ids)
            if steps:
                continue  # a prompt chunk that is not the last samples nothing
            lp = torch.log_softmax(logits.float(), -1)
            tokens.append(int(lp.argmax()))
            logprobs.append(float(lp.max()))
    return tokens, logprobs
