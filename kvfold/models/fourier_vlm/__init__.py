"""Fourier-VLM (Wang et al., arXiv 2508.06038): vision tokens compressed in the 2-D DCT domain.

- ``dct``: orthonormal DCT-II / inverse via FFT and the compression op (the reference; no vLLM).
- ``spectral_resize``: the same linear map as two small matrix products (what the models run).
- ``config``: the ``fourier_vlm`` config key, validated with pydantic (no torch, no vLLM).
- ``llava``: ``FourierLlavaForConditionalGeneration`` (compression before the projector).
- ``qwen2_vl``: ``FourierQwen2VLForConditionalGeneration`` (after the PatchMerger, per frame).
- ``torchvision_free``: lets vLLM's LLaVA / Qwen2-VL modules import without torchvision.

See docs/fourier-vlm.md.
"""
