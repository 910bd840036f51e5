"""One request's FourierAttention cache, step by step: the specification of the paged backend.

It follows the authors' ``DynamicCache`` (arXiv 2506.11886 code) in vLLM's step order. After a step
a request holds ``n`` tokens: ``sink`` initial ones, a middle, and the ``recent`` newest. The middle
stays exact until it is longer than ``2 k`` tokens (the authors' ``maxmidstates``: before that the
``2k`` coefficient rows would hold more numbers than the tokens they replace); from then on each
KV head's compressed dims of the middle are only the projection of the middle onto the ``2 k``
translated-Fourier rows over a fixed window ``T``, and its kept dims stay per token.

* **Decode** (one new token): the cache takes the token first (the token leaving the recent window
  enters the middle), then the query attends, as in the authors' code.
* **Prefill chunk** (several tokens): the chunk attends to the cache as it was plus itself exactly,
  then the cache takes the chunk. A prompt prefilled in one step is attended exactly, as in the
  paper; with chunked prefill, a later chunk sees the earlier chunks' middle compressed.
* **Re-normalisation** (the authors' affine fix of the ``1/k`` reconstruction, per compressed dim,
  from the original middle's mean and max absolute deviation and the reconstruction's): fitted when
  the middle is first compressed and again after every prefill chunk, never in decode. So after a
  prompt of any chunking it is the authors' fit over the whole prompt's middle.

Since the coefficients are linear in the middle, they are stated here as the projection of the whole
current middle; the backend maintains them by rank-1 (decode) and rank-n (chunk) updates.
"""

from __future__ import annotations

import torch

from kvfold.attention_backends.fourier.reference import Normalization, project, reconstruct
from kvfold.attention_backends.paged.attention import causal_gqa_attention


class FourierStream:
    """All KV heads of one layer of one request; ``key_dims[h]``/``value_dims[h]`` are compressed."""

    def __init__(
        self,
        key_dims: list[torch.Tensor],
        value_dims: list[torch.Tensor],
        *,
        sink: int,
        recent: int,
        freqs: int,
        window: int,
        scale: float,
    ) -> None:
        self.dims = {"k": key_dims, "v": value_dims}
        self.sink, self.recent, self.freqs, self.window, self.scale = sink, recent, freqs, window, scale
        self.keys: torch.Tensor | None = None  # every token as it came, [n, Hk, D] float32
        self.values: torch.Tensor | None = None
        self.norms: dict[str, list[Normalization]] = {}

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    def middle_length(self, n: int | None = None) -> int:
        n = len(self) if n is None else n
        return max(0, n - self.sink - self.recent)

    def compressed(self, n: int | None = None) -> bool:
        return self.middle_length(n) > 2 * self.freqs

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention output ``[q, Hq, Dv]`` of a step's queries ``[q, Hq, D]`` with its new K/V."""
        if query.shape[0] == 1:
            self._take(key, value, prefill=False)
            k, v = self.visible()
        else:
            k, v = self.visible() if len(self) else (key[:0].float(), value[:0].float())
            k, v = torch.cat([k, key.float()]), torch.cat([v, value.float()])
            self._take(key, value, prefill=True)
        return causal_gqa_attention(query, k, v, self.scale, k.shape[0] - query.shape[0])

    def _take(self, key: torch.Tensor, value: torch.Tensor, *, prefill: bool) -> None:
        before = self.compressed()
        self.keys = key.float() if self.keys is None else torch.cat([self.keys, key.float()])
        self.values = value.float() if self.values is None else torch.cat([self.values, value.float()])
        if self.compressed() and (prefill or not before):
            self.norms = {kind: [self._fit(kind, h) for h in range(self.keys.shape[1])] for kind in "kv"}

    def _middle(self, kind: str, h: int) -> torch.Tensor:
        x = self.keys if kind == "k" else self.values
        return x[self.sink : self.sink + self.middle_length(), h]

    def _fit(self, kind: str, h: int) -> Normalization:
        middle = self._middle(kind, h)[:, self.dims[kind][h]]
        coef = project(middle, 0, self.window, self.freqs)
        return Normalization.fit(middle, reconstruct(coef, middle.shape[0], self.window))

    def visible(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention sees of the cached tokens: ``[n, Hk, D]`` keys and values, float32."""
        k, v = self.keys.clone(), self.values.clone()
        if not self.compressed():
            return k, v
        end = self.sink + self.middle_length()
        for out, kind in ((k, "k"), (v, "v")):
            for h, dims in enumerate(self.dims[kind]):
                if dims.numel() == 0:
                    continue
                middle = self._middle(kind, h)[:, dims]
                coef = project(middle, 0, self.window, self.freqs)
                rebuilt = self.norms[kind][h].apply(reconstruct(coef, middle.shape[0], self.window))
                out[self.sink : end, h, dims] = rebuilt
        return k, v
