"""Speed of the jitted quantize core, as ratios to one elementwise pass.

Quantizes a 4096x4096 float32 weight under jit (int8 per output channel, int4
group-128 with zero points, and for reference NF4 group-64 and FP8 per
channel) and divides each median time by the median time of one elementwise
pass over the same array, ``jnp.round(w * c)``, measured in the same run (these
machines are shared and noisy: only the ratios mean something). Target from
the issue: <= 4x for int8 and int4.

Run:
    python benchmarks/quantize.py [--n 4096] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from _stamp import print_stamp

import jqx


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="the weight is n x n float32")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)

    w = jax.random.normal(jax.random.key(0), (args.n, args.n), jnp.float32)
    c = jnp.float32(3.0)
    baseline = jax.jit(lambda w, c: jnp.round(w * c))
    cases = {
        "int8 per-channel": jqx.int8_weight_only(),
        "int4 group-128 (uint4 + zero point)": jqx.int4_weight_only(group_size=128),
        "nf4 group-64": jqx.nf4_weight_only(group_size=64),
        "fp8_e4m3 per-channel": jqx.fp8_weight_only(),
    }
    # Interleave baseline and case timings so load changes hit both alike.
    rows = []
    for name, recipe in cases.items():
        f = jax.jit(recipe.quantize_weight)
        tb = _median_seconds(baseline, w, c, repeats=args.repeats)
        tq = _median_seconds(f, w, repeats=args.repeats)
        deq = jax.jit(lambda q: q.dequantize())
        td = _median_seconds(deq, f(w), repeats=args.repeats)
        rows.append((name, tq / tb, td / tb, tb))
    print_stamp()
    print(
        f"jax {jax.__version__}, {jax.default_backend()}, weight {args.n}x{args.n} float32, "
        f"median of {args.repeats}"
    )
    print(f"{'recipe':<38} {'quantize / pass':>16} {'dequantize / pass':>18} {'pass ms':>8}")
    for name, rq, rd, tb in rows:
        print(f"{name:<38} {rq:>15.2f}x {rd:>17.2f}x {tb * 1e3:>8.1f}")


if __name__ == "__main__":
    main()
