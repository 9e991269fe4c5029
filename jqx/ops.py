"""Quantized matmuls: ``jqx.ops.dot_general`` on QArray operands (placeholder)."""

from __future__ import annotations

import jax
from jax import lax

from jqx.qarray import QArray, is_qarray

__all__ = ["dot_general"]


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *, backend=None):
    """Reference: dequantize then dot."""
    if is_qarray(lhs):
        lhs = lhs.dequantize()
    if is_qarray(rhs):
        rhs = rhs.dequantize()
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type)
