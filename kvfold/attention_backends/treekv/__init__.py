"""TreeKV (arXiv 2501.04987): fixed per-request KV budget with tree-structured smooth eviction.

``reference.py`` is the specification (dense per-request cache); ``backend.py`` runs it in vLLM's
paged cache with the budget enforced by vLLM's own sliding-window block release (``pages.py`` holds
the per-slot layout). The GPU path is the same pure-torch code: the Triton kernels (decode attention
that also returns the per-entry probabilities, fused slot moves) are not written yet.
"""
