"""The paged-KV machinery every kvfold backend shares (pure torch, runs on CPU and CUDA)."""
