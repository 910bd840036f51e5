"""TreeKV (arXiv 2501.04987): fixed per-request KV budget with tree-structured smooth eviction.

Status: the pure-torch reference (``reference.py``, the specification) and the options exist. The
vLLM backend (paged, per-head slot indirection, bounded block ring) and the Triton kernels do not
exist yet, so ``KVFOLD_TREEKV`` is not registered: selecting it fails with vLLM's "unknown backend".
"""
