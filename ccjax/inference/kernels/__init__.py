"""Inference kernels, one module per backend."""
