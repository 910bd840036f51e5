"""TreeKV options, defaults from the paper's language-modelling setup (Llama-2-7B, cache 1024)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kvfold.options import MethodOptions


class TreeKVOptions(MethodOptions):
    budget: int = Field(1024, gt=0, description="tokens kept per request, layer and KV head")
    sink: int = Field(4, ge=0, description="first tokens, never evicted")
    recent: int = Field(508, ge=0, description="newest tokens, never evicted")
    # Not given by the paper; SnapKV-like windows are 32-64 tokens.
    prefill_block: int = Field(32, gt=0, description="prefill eviction unit and observation window")
    # "rank": the paper's StreamingLLM-style positions (rank inside the cache);
    # "original": keep each token's own position (long-context models may prefer it).
    positions: Literal["rank", "original"] = "rank"

    @property
    def tree(self) -> int:
        """Slots of the tree region, between the sink and the recent window."""
        return self.budget - self.sink - self.recent

    @model_validator(mode="after")
    def _regions_fit(self) -> TreeKVOptions:
        if self.tree < 2 * self.prefill_block:
            raise ValueError(
                f"budget {self.budget} - sink {self.sink} - recent {self.recent} leaves {self.tree} "
                f"tree slots; TreeKV needs at least two prefill blocks ({2 * self.prefill_block})"
            )
        return self
