"""TreeKV options, defaults from the paper's language-modelling setup (Llama-2-7B, cache 1024)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kvfold.options import MethodOptions


class TreeKVOptions(MethodOptions):
    budget: int = Field(1024, gt=0, description="tokens kept per request, layer and KV head")
    sink: int = Field(4, ge=0, description="first tokens, never evicted")
    # The paper's 1024 = 4 sink + 512 tree + 508 recent: the tree gets half the budget. When only
    # the budget is given, the same split applies (2048 -> 4 + 1024 + 1020).
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

    @model_validator(mode="before")
    @classmethod
    def _split_like_the_paper(cls, values: Any) -> Any:
        if isinstance(values, dict) and "recent" not in values:
            budget = values.get("budget", 1024)
            sink = values.get("sink", 4)
            if isinstance(budget, int) and isinstance(sink, int):
                values = {**values, "recent": max(budget - sink - budget // 2, 0)}
        return values

    @model_validator(mode="after")
    def _regions_fit(self) -> TreeKVOptions:
        if self.tree < 2 * self.prefill_block:
            raise ValueError(
                f"budget {self.budget} - sink {self.sink} - recent {self.recent} leaves {self.tree} "
                f"tree slots; TreeKV needs at least two prefill blocks ({2 * self.prefill_block})"
            )
        return self
