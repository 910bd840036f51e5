"""FourierAttention (arXiv 2506.11886): long-context-insensitive head dims of the middle tokens kept
as translated-Fourier coefficients, the rest of the K/V per token.

``reference.py`` is the specification (basis, compression, rank-1 updates, re-normalisation,
attention, and the exact query-projection form a kernel uses); ``selection.py`` the offline choice
of compressed dims. ``backend.py`` is the vLLM glue (``KVFOLD_FOURIER``), ``kernels.py`` the Triton decode kernels.
"""
