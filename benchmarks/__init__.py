"""GPU benchmark suite for kvfold (serving, decode kernels, plots); see docs/benchmarks.md."""
