"""Pallas (Triton backend) GPU kernels for quantized matmuls; depends on jax only."""
