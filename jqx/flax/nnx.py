"""Quantized flax.nnx layers: ``Linear`` and ``Einsum``.

``flax.nnx.Linear`` / ``flax.nnx.Einsum`` with ``promote_dtype=`` (nnx passes
one tuple; QArrays pass through), ``dot_general=`` (nnx also passes
``out_sharding=``) and, for Einsum, ``einsum_op=`` injected. Parameter names
are Flax's: split a float model, ``jqx.quantize`` its State, merge it back
(or ``nnx.update``) and call it.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> from flax import nnx
    >>> from jqx.flax import nnx as qnnx
    >>> m = qnnx.Linear(32, 8, rngs=nnx.Rngs(0))
    >>> gdef, state = nnx.split(m)
    >>> qm = nnx.merge(gdef, jqx.quantize(state, jqx.int8_weight_only()))
    >>> qm(jnp.ones((2, 32))).shape
    (2, 8)
"""

from __future__ import annotations

import functools

from flax import nnx as _nnx

from jqx.flax._inject import einsum, make_dot_general, promote_dtype_tuple

__all__ = ["Linear", "Einsum"]


class Linear(_nnx.Linear):
    """``flax.nnx.Linear`` whose ``kernel`` may hold a :class:`jqx.QArray`.

    Takes Flax's arguments, plus ``backend`` (``jqx.ops`` backend, None = auto).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> Linear(4, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 4))).shape
        (1, 2)
    """

    def __init__(self, in_features: int, out_features: int, *, backend: str | None = None, **kw):
        kw.setdefault("dot_general", make_dot_general(backend))
        kw.setdefault("promote_dtype", promote_dtype_tuple)
        super().__init__(in_features, out_features, **kw)


class Einsum(_nnx.Einsum):
    """``flax.nnx.Einsum`` whose ``kernel`` may hold a :class:`jqx.QArray`.

    Takes Flax's arguments, plus ``backend`` (``jqx.ops`` backend, None = auto).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> Einsum("bk,kn->bn", (4, 2), (2,), rngs=nnx.Rngs(0))(jnp.ones((1, 4))).shape
        (1, 2)
    """

    def __init__(
        self, einsum_str: str, kernel_shape, bias_shape=None, *, backend: str | None = None, **kw
    ):
        kw.setdefault("einsum_op", functools.partial(einsum, backend=backend))
        kw.setdefault("promote_dtype", promote_dtype_tuple)
        super().__init__(einsum_str, kernel_shape, bias_shape, **kw)
