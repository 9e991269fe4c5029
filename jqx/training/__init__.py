"""Training with quantization and reduced precision (optax- and Flax-compatible).

Example:
    >>> from jqx.training import mixed_precision
    >>> mixed_precision.get_policy("bf16").compute_dtype.name
    'bfloat16'
"""

from jqx.training import fp8, mixed_precision, qat

__all__ = ["mixed_precision", "qat", "fp8"]
