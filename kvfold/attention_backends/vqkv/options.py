"""VQKV options (``--additional-config '{"kvfold": {...}}'``); the code sizes come from the codebooks."""

from __future__ import annotations

from pydantic import Field

from kvfold.options import MethodOptions


class VQKVOptions(MethodOptions):
    # Required: VQKV without fitted codebooks would be noise, never a silent dense fallback.
    codebooks: str = Field(description="directory written by `kvfold calibrate vqkv`")
    # The paper keeps the first and the most recent tokens exact without saying how many; these are
    # StreamingLLM's 4 sink tokens and the 4 + 508 split TreeKV (same lab) uses for a 512 window.
    sink: int = Field(4, ge=0, description="first tokens of a request kept exact")
    recent: int = Field(508, ge=0, description="tokens before each step kept exact")
