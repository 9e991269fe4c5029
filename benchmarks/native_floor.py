"""End-to-end A/B of the dispatcher's native-GEMM floor (``jqx.ops.Policy.native_min_work``).

The same quantized model is traced twice, under the current floor and under
``--floor``, and the two compiled functions are called in alternation (one call
each per round, so machine load hits both alike). Printed per BERT port, recipe
and batch: the native calls in each trace and best / median milliseconds. Single
products near the floor run in 0.1-0.3 ms, where one call's timing is mostly
dispatch noise; a whole model shows what the routing is worth.

    python benchmarks/native_floor.py                 # all-MiniLM-L6-v2, floor 2**26 vs now
    python benchmarks/native_floor.py --floor 22 --batches 1 2 4
    python benchmarks/native_floor.py --tiny          # the shipped tiny encoder, quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jqx  # noqa: E402, I001  # isort: skip

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _stamp import print_stamp  # noqa: E402

from jqx_demo import bert, minilm  # noqa: E402

RECIPES = {
    "W8A8": jqx.int8_dynamic_activation_int8_weight,
    "int8 WO": jqx.int8_weight_only,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--floor", type=int, default=26, help="log2 of the floor to compare")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--ports", default="plain,linen")
    ap.add_argument("--tiny", action="store_true", help="the shipped tiny encoder")
    args = ap.parse_args(argv)
    print_stamp()
    enc = minilm.load_tiny() if args.tiny else minilm.load_minilm()
    now = jqx.ops.current_policy().native_min_work
    other = 1 << args.floor
    print(
        f"native_min_work now 2**{now.bit_length() - 1} (A) vs 2**{args.floor} (B); "
        f"load average {os.getloadavg()[0]:.1f}; {args.rounds} interleaved rounds"
    )
    print(
        "| port | recipe | batch | native calls A / B | best ms A / B | median ms A / B | B / A (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for port in args.ports.split(","):
        p = bert.load_port(port, enc)
        for name, recipe in RECIPES.items():
            v = jqx.quantize(p.variables, recipe())
            for batch in args.batches:
                ids = rng.integers(1, enc.config.vocab_size, (batch, args.seq)).astype(np.int32)
                mask = np.ones((batch, args.seq), np.int32)
                # One wrapped function per floor: jax caches a trace per function, and
                # the policy is read when tracing.
                fwd_a, fwd_b = jqx.quantized(p.module.apply), jqx.quantized(p.module.apply)
                fa, fb = jax.jit(fwd_a), jax.jit(fwd_b)
                jax.block_until_ready(fa(v, ids, mask))
                calls_a = str(jax.make_jaxpr(fwd_a)(v, ids, mask)).count("ffi_call")
                with jqx.ops.policy(native_min_work=other):  # traced (and compiled) here
                    jax.block_until_ready(fb(v, ids, mask))
                    calls_b = str(jax.make_jaxpr(fwd_b)(v, ids, mask)).count("ffi_call")
                ta, tb = [], []
                for _ in range(args.rounds):
                    for f, t in ((fa, ta), (fb, tb)):
                        s = time.perf_counter()
                        jax.block_until_ready(f(v, ids, mask))
                        t.append(time.perf_counter() - s)
                ma, mb = statistics.median(ta), statistics.median(tb)
                print(
                    f"| {port} | {name} | {batch} | {calls_a} / {calls_b} | "
                    f"{min(ta) * 1e3:.1f} / {min(tb) * 1e3:.1f} | {ma * 1e3:.1f} / {mb * 1e3:.1f} | "
                    f"{mb / ma:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
