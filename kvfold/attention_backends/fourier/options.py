"""FourierAttention options (``--additional-config '{"kvfold": {...}}'``).

The compressed dims come from ``kvfold calibrate fourier``; sink, recent and frequencies default to
the values that calibration used (the paper's 4, 1020 and 512).
"""

from __future__ import annotations

from pydantic import Field

from kvfold.options import MethodOptions


class FourierOptions(MethodOptions):
    # Required: which dims a layer may compress is the method; without it nothing is FourierAttention.
    dims: str = Field(description="directory written by `kvfold calibrate fourier` (fourier.json)")
    sink: int | None = Field(None, ge=0, description="first tokens kept exact (default: calibration's)")
    recent: int | None = Field(None, ge=1, description="newest tokens kept exact (default: calibration's)")
    freqs: int | None = Field(None, ge=1, description="Fourier frequencies k, 2k coefficient rows "
                              "(default: calibration's)")
    # The authors fix T per request to prompt + max new tokens - 1024; a vLLM attention backend never
    # sees a request's max_tokens, so T is fixed per engine: the longest middle a request can have.
    window: int | None = Field(None, ge=2, description="translated-Fourier window T in middle tokens "
                               "(default: max model length - sink - recent)")
