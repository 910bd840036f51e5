"""VQKV (arXiv 2603.16435): residual vector-quantized K/V, one byte per codebook index.

``reference.py`` is the specification (encode, decode, attention over codes, codebook fitting);
``codebooks.py`` the files ``kvfold calibrate vqkv`` writes (``calibrate.py``); ``pages.py`` the
paged layout and ``spec.py`` its accounting in vLLM's allocator; ``backend.py`` the vLLM glue;
``kernels.py`` the Triton decode attention over codes.
"""
