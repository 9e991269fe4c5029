"""Row lookups in quantized tables: an embedding reads only the rows it needs.

:func:`take` gathers rows of a 2-D :class:`jqx.QArray` (codes, scales, zero points,
high-bit planes and two-level scales alike) and dequantizes only those rows, so a
lookup in a 49152 x 576 table costs what the looked-up rows cost, never a float copy
of the table. ``jqx.quantize(params, recipe, embeddings=True)`` makes such tables
from Flax ``Embed`` parameters (one scale per row, or groups along the row);
``jqx.quantized`` and the ``jqx.flax`` ``Embed`` layers look them up this way.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> table = jnp.arange(32.0).reshape(4, 8)
    >>> q = jqx.quantize_array(table, "int8", granularity=jqx.per_channel(axis=0))
    >>> jqx.ops.take(q, jnp.array([3, 0])).shape
    (2, 8)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqx.core.qarray import QArray, is_qarray

__all__ = ["take", "take_rows"]


def _rows(a: jax.Array | None, ids: jax.Array, n_rows: int, block_rows: int, axis: int = 0):
    """Rows of a per-block child for the logical rows ``ids``; broadcast children
    (one row) are repeated so the result is per row. ``axis=1``: the child is stored
    transposed (a ``"kn"`` QArray's), its columns are the rows."""
    if a is None or a.ndim != 2:
        return a
    n = a.shape[axis]
    if n == 1:
        idx = jnp.zeros_like(ids)
    elif n == n_rows:
        idx = ids
    elif n == -(-n_rows // block_rows):
        idx = ids // block_rows
    else:
        raise ValueError(f"a child of shape {a.shape} does not map onto {n_rows} rows")
    return a[idx] if axis == 0 else a[:, idx].T


def take_rows(q: QArray, ids: jax.Array) -> QArray:
    """The QArray of rows ``ids`` (1-D int array) of a 2-D QArray, without decoding.

    Every child that has one entry per row (or per block of rows) is gathered; the
    result has one scale per row-block of 1, so it dequantizes to exactly
    ``q.dequantize()[ids]``.

    Raises:
      ValueError: ``q`` is not 2-D or ``ids`` is not 1-D.
    """
    if q.ndim != 2:
        raise ValueError(
            f"jqx.ops.take: the table must be a 2-D QArray (rows x features); got shape {q.shape}."
        )
    if ids.ndim != 1:
        raise ValueError(f"take_rows: ids must be 1-D; got shape {ids.shape}.")
    if q.code_layout == "kn" and q.g_idx is not None:
        q = q.with_code_layout("plain")  # rows sorted by group: decoded whole
    n, b0 = q.shape[0], q.block[0]
    sb0 = q.super_block[0] if q.super_block is not None else 1
    ax = 1 if q.code_layout == "kn" else 0  # "kn" children are the transpose's
    kw = {
        "qvalue": q.row_codes(ids),  # read out of the panels of a jqx.prepack'd table
        "code_layout": "plain",
        "qhigh": None if q.qhigh is None else q.qhigh[ids],
        "scale": _rows(q.scale, ids, n, b0, ax),
        "zero_point": _rows(q.zero_point, ids, n, b0, ax),
        "super_scale": _rows(q.super_scale, ids, n, sb0, ax),
        "super_zero": _rows(q.super_zero, ids, n, sb0, ax),
        "in_scale": _rows(q.in_scale, ids, n, 1, ax),
        "shape": (int(ids.shape[0]), q.shape[1]),
        "block": (1, q.block[1]),
    }
    if q.super_block is not None:
        kw["super_block"] = (1, q.super_block[1])
    return q.replace(**kw)


def take(table, ids, *, dtype=None) -> jax.Array:
    """``table[ids]`` for a float array or a 2-D :class:`jqx.QArray` (an embedding lookup).

    For a QArray only the gathered rows are decoded: memory and time scale with
    ``ids.size``, not with the table.

    Args:
      table: a ``(rows, features)`` array or QArray.
      ids: integer array of any shape; values must be in ``[0, rows)``.
      dtype: result dtype (default: the table's logical dtype).

    Returns:
      An array of shape ``ids.shape + (features,)``.

    Raises:
      ValueError: the table is not 2-D, or ``ids`` is not an integer array.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.quantize_array(jnp.eye(4), "int8", granularity=jqx.per_channel(axis=0))
        >>> jqx.ops.take(q, jnp.array([[1], [2]])).tolist()
        [[[0.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 0.0]]]
    """
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"jqx.ops.take: ids must be an integer array; got dtype {ids.dtype}. Cast token "
            "ids with .astype(jnp.int32)."
        )
    if not is_qarray(table):
        out = jnp.take(table, ids, axis=0)
        return out if dtype is None else out.astype(dtype)
    flat = ids.reshape(-1)
    rows = take_rows(table, flat).dequantize(dtype)
    return rows.reshape(ids.shape + (table.shape[1],))
