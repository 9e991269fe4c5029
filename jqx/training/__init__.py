"""Training layer: quantization-aware training (:mod:`jqx.training.qat`), FP8
training (:mod:`jqx.training.fp8`) and mixed precision with loss scaling
(:mod:`jqx.training.mixed_precision`, which needs optax and is imported on
its own).

Example:
    >>> from jqx.training import mixed_precision
    >>> mixed_precision.get_policy("bf16").compute_dtype.name
    'bfloat16'
"""
