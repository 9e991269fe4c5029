"""The decode kernels' floor (``jqx.ops.Policy.w4_native_min_weight``): native against XLA.

One product ``x (rows, K) @ W (K, N)`` per shape, for the weight-only 4-bit (int4 g32)
and FP8 recipes and LLM.int8(), each run through ``jqx.ops.dot_general`` with
``backend="native"`` and ``backend="xla"`` under ``jit``, the two calls interleaved
(best of ``--rounds`` rounds of ``--calls`` calls each). The shapes are an LLM's small
projections (SmolLM2-135M's key and value, 576 x 192) and smaller, where the floor
decides. The weight is the same one call after call, so it stays in cache: this
measures the per-call cost, not the memory stream (benchmarks/prepack.py --llm does).

    python benchmarks/decode_floor.py
    python benchmarks/decode_floor.py --rows 1 4 16 --shapes 576x192 256x256
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jqx  # noqa: E402, I001  # isort: skip

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _stamp import print_stamp  # noqa: E402

RECIPES = {
    "int4 g32": lambda: jqx.int4_weight_only(group_size=32),
    "fp8 e4m3": jqx.fp8_weight_only,
    "LLM.int8()": jqx.llm_int8,
}
DN = (((1,), (0,)), ((), ()))


def _best_us(f, args, calls: int, rounds: int) -> list[float]:
    """Per-call microseconds of each function in ``f``, interleaved, best round."""
    for g in f:
        jax.block_until_ready(g(*args))
    best = [float("inf")] * len(f)
    for _ in range(rounds):
        for i, g in enumerate(f):
            t0 = time.perf_counter()
            for _ in range(calls):
                y = g(*args)
            jax.block_until_ready(y)
            best[i] = min(best[i], (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument(
        "--shapes", nargs="+", default=["576x192", "576x576", "384x128", "256x256", "128x128"]
    )
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if jqx.ops.native_status() != "available":
        print(f"the native kernels do not run here: {jqx.ops.native_status()}")
        return 0
    print_stamp()
    pol = jqx.ops.current_policy()
    print(
        f"floors now: w4_native_min_weight = {pol.w4_native_min_weight}, "
        f"llm_int8_native_min_weight = {pol.llm_int8_native_min_weight}"
    )
    print("\n| K x N | rows | recipe | native us | XLA us | XLA / native | route (backend=None) |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
            for name, recipe in RECIPES.items():
                q = recipe().quantize_weight(w)
                fs = [
                    jax.jit(lambda a, q, be=be: jqx.ops.dot_general(a, q, DN, backend=be))
                    for be in ("native", "xla")
                ]
                nat, xla = _best_us(fs, (x, q), args.calls, args.rounds)
                route = jqx.ops.explain(x, q, DN)
                print(
                    f"| {k} x {n} | {rows} | {name} | {nat:.1f} | {xla:.1f} | "
                    f"{xla / nat:.2f}x | {route} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
