"""Pytree utilities on quantized trees: paths, dequantize, bytes, summary.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> q = jqx.quantize({"kernel": jnp.ones((4, 4))}, jqx.int8_weight_only())
    >>> jqx.tree_nbytes(q)
    32
"""

from __future__ import annotations

import jax
import numpy as np

from jqx.core.qarray import is_qarray

__all__ = ["path_str", "dequantize", "tree_nbytes", "summary"]


def path_str(path) -> str:
    """``params/dense/kernel`` for a jax key path (nnx's trailing ``.value`` dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value" and len(parts) > 1:
        parts = parts[:-1]
    return "/".join(parts)


def dequantize(tree, dtype=None):
    """Replaces every QArray in ``tree`` (or a single QArray) by its float value.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.quantize({"kernel": jnp.ones((4, 4))}, jqx.int8_weight_only())
        >>> jqx.dequantize(q)["kernel"].dtype
        dtype('float32')
    """
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if is_qarray(x) else x, tree, is_leaf=is_qarray
    )


def tree_nbytes(tree) -> int:
    """Total storage bytes of a tree (QArrays counted by their packed footprint).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> jqx.tree_nbytes(jqx.quantize({"kernel": jnp.ones((4, 4))}, jqx.int8_weight_only()))
        32
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray):
        if is_qarray(leaf):
            total += leaf.nbytes
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def summary(tree) -> str:
    """One line: leaves, quantized leaves, bytes, and bytes by format.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> jqx.summary(jqx.quantize({"kernel": jnp.ones((4, 4))}, jqx.int8_weight_only()))
        '1 leaves (1 quantized), 32 B [int8: 32 B]'
    """
    by_fmt: dict[str, int] = {}
    n = nq = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray):
        n += 1
        if is_qarray(leaf):
            nq += 1
            by_fmt[leaf.format] = by_fmt.get(leaf.format, 0) + leaf.nbytes
        elif hasattr(leaf, "dtype"):
            k = np.dtype(leaf.dtype).name
            by_fmt[k] = by_fmt.get(k, 0) + int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    parts = ", ".join(f"{k}: {_human(v)}" for k, v in sorted(by_fmt.items()))
    return f"{n} leaves ({nq} quantized), {_human(tree_nbytes(tree))} [{parts}]"


def _human(b: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1024
    return f"{b} B"
