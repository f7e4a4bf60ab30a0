"""Pure array maths (numpy, scipy, tensorly): factors, block terms, ranks, least squares,
knapsack allocation, low-rank + sparse, sparsity, SuRP's successive pruning, whitening.
Imports neither onnx nor onnxruntime."""
