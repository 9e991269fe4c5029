"""jqx.flax layers: error against the float Flax layer on dequantized weights, and
jit latency as a ratio to the float layer (same run, fastest of N calls).

Run: python benchmarks/flax_adapters.py [--m 256] [--k 1024] [--n 1024]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from _stamp import print_stamp
from flax import nnx

import jqx
from jqx.flax import linen as qnn
from jqx.flax import nnx as qnnx

RECIPES = {
    "int8 weight-only": jqx.int8_weight_only(),
    "int4 g128 weight-only": jqx.int4_weight_only(group_size=128),
    "nf4 g64 weight-only": jqx.nf4_weight_only(group_size=64),
    "W8A8 int8 dynamic": jqx.int8_dynamic_activation_int8_weight(),
}


def _best(calls, rounds=30):
    """Fastest time of each (f, args), calls interleaved round by round (noisy shared CPU)."""
    for f, a in calls:
        jax.block_until_ready(f(*a))
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, (f, a) in enumerate(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    a = ap.parse_args()
    x = jax.random.normal(jax.random.key(1), (a.m, a.k))
    v = nn.Dense(a.n).init(jax.random.key(0), x)
    f_float = jax.jit(nn.Dense(a.n).apply)
    lin = qnnx.Linear(a.k, a.n, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(lin)
    print_stamp()
    print(f"Dense {a.m}x{a.k} @ {a.k}x{a.n}")
    print(
        "| recipe | linen rel. err | nnx rel. err | linen latency / float | jqx.quantized(nn.Dense) latency / float |"
    )
    print("|---|---|---|---|---|")
    for name, r in RECIPES.items():
        qv = jqx.quantize(v, r)
        y = jax.jit(qnn.Dense(a.n).apply)(qv, x)
        ref = nn.Dense(a.n).apply(jqx.dequantize(qv), x)
        err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
        qs = jqx.quantize(state, r)
        yn = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))(qs, x)
        refn = nnx.merge(gdef, jqx.dequantize(qs))(x)
        errn = float(jnp.max(jnp.abs(yn - refn)) / jnp.max(jnp.abs(refn)))
        t_float, t_ad, t_tr = _best(
            [
                (f_float, (v, x)),
                (jax.jit(qnn.Dense(a.n).apply), (qv, x)),
                (jax.jit(jqx.quantized(nn.Dense(a.n).apply)), (qv, x)),
            ]
        )
        print(f"| {name} | {err:.1e} | {errn:.1e} | {t_ad / t_float:.2f} | {t_tr / t_float:.2f} |")


if __name__ == "__main__":
    main()
