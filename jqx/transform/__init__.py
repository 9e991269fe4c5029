"""Transform layer: ``jqx.quantized(fn)``, the jaxpr interpreter that runs any
function on a tree holding QArrays (see :mod:`jqx.transform.interpreter`).

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> q = jqx.quantize({"w": jnp.ones((8, 4))}, jqx.int8_weight_only(),
    ...                  filter_fn=lambda p, x: x.ndim == 2)
    >>> jax.jit(jqx.quantized(lambda p, x: x @ p["w"]))(q, jnp.ones((2, 8))).shape
    (2, 4)
"""

from jqx.transform.interpreter import DotRule, capture_inputs, map_dots, quantized

__all__ = ["quantized", "map_dots", "capture_inputs", "DotRule"]
