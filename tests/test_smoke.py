import jax.numpy as jnp

import jqx


def test_int8_round_trip_error_bound():
    x = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(8, 8)
    q = jqx.quantize_array(x, "int8", granularity=jqx.per_tensor())
    s = float(q.scale.ravel()[0])
    assert float(jnp.max(jnp.abs(q.dequantize() - x))) <= s / 2 + 1e-7
