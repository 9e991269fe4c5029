"""Decode-sized inference on this CPU: a stack of MLP blocks at 1-16 tokens.

An LLM's decode step multiplies a few token rows by every weight once, so it
reads the weights and does little arithmetic: that is where small weights pay.
This runs a residual stack of ``x + gelu(norm(x) @ W1) @ W2`` blocks
(``--layers`` blocks, width ``--d``, hidden ``--ff``; random weights, scaled
like a trained model's) through ``jax.jit(jqx.quantized(fn))`` for each recipe
and prints milliseconds per call, the ratio to float32 measured in the same
run (calls interleaved, median of ``--reps``), and the output's relative
error against float32. The weights (hundreds of MB in float32) are far larger
than the CPU caches, so every call streams them from memory.

Usage:
    python benchmarks/decode.py                       # d 2048, ff 8192, 4 blocks, M 1 4 16
    python benchmarks/decode.py --tokens 1 --reps 30
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from _stamp import print_stamp  # noqa: E402
from ops import _round_robin  # benchmarks/ops.py: interleaved medians

import jqx

RECIPES = {
    "float32": None,
    "int8 weight-only": jqx.int8_weight_only(),
    "int4 g128 weight-only": jqx.int4_weight_only(group_size=128),
    "nf4 g64 weight-only": jqx.nf4_weight_only(group_size=64),
    "W8A8 int8 dynamic": jqx.int8_dynamic_activation_int8_weight(),
}


def init(key, layers: int, d: int, ff: int) -> dict:
    """{"block_i": {"up": {"kernel"}, "down": {"kernel"}}} with 1/sqrt(fan_in) scales."""
    params = {}
    for i, k in enumerate(jax.random.split(key, layers)):
        k1, k2 = jax.random.split(k)
        params[f"block_{i}"] = {
            "up": {"kernel": jax.random.normal(k1, (d, ff), jnp.float32) / d**0.5},
            "down": {"kernel": jax.random.normal(k2, (ff, d), jnp.float32) / ff**0.5},
        }
    return params


def forward(params: dict, x: jax.Array) -> jax.Array:
    for name in sorted(params, key=lambda s: int(s.split("_")[1])):
        p = params[name]
        h = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        x = x + jax.nn.gelu(h @ p["up"]["kernel"]) @ p["down"]["kernel"]
    return x


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args(argv)
    print_stamp()

    params = init(jax.random.key(0), a.layers, a.d, a.ff)
    trees = {n: params if r is None else jqx.quantize(params, r) for n, r in RECIPES.items()}
    fwd = jax.jit(jqx.quantized(forward))
    mib = {n: jqx.tree_nbytes(t) / 2**20 for n, t in trees.items()}
    print(
        f"jax {jax.__version__}, {jax.default_backend()}, jqx.native: {jqx.ops.native_status()}; "
        f"{a.layers} blocks, d {a.d}, ff {a.ff} ({mib['float32']:.0f} MiB float32)"
    )
    cols = {}
    for m in a.tokens:
        x = jax.random.normal(jax.random.key(m), (m, a.d), jnp.float32)
        ref = forward(params, x)
        names = list(trees)
        times = _round_robin([fwd] * len(names), [(trees[n], x) for n in names], a.reps)
        for n, t in zip(names, times, strict=True):
            err = float(jnp.linalg.norm(fwd(trees[n], x) - ref) / jnp.linalg.norm(ref))
            cols.setdefault(n, {})[m] = (t * 1e3, t / times[0], err)
        print(f"  M={m}: " + ", ".join(f"{n} {cols[n][m][0]:.2f} ms" for n in names))

    print()
    head = " | ".join(f"M={m} ms (x f32)" for m in a.tokens)
    print(f"| recipe | weights MiB | {head} | rel. error (M={a.tokens[0]}) |")
    print("|---|---:|" + "---:|" * len(a.tokens) + "---:|")
    for n, per in cols.items():
        cells = " | ".join(f"{per[m][0]:.2f} ({per[m][1]:.2f})" for m in a.tokens)
        print(f"| {n} | {mib[n]:.0f} | {cells} | {per[a.tokens[0]][2]:.4f} |")


if __name__ == "__main__":
    main()
