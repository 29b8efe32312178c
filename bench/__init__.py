"""fusedrl benchmark suite: ``python -m bench --help``.

fusedrl (every available backend) against eager PyTorch, torch.compile of the eager code, the peers
that are installed (Liger Kernel, verl's fused and chunked kernels, Cut Cross-Entropy) and the bare
GEMM floor, on a random (near-uniform softmax) and a peaked (LM-like, mean entropy ~0.5 nats)
regime. Writes results.md, results.json and plot.png (bench/results/README.md explains them).
"""
