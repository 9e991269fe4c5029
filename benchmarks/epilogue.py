"""Dense layers' bias and GELU inside the native kernels, on and off, in whole models.

    python benchmarks/epilogue.py                    # MiniLM ports at batch 32 x 128
    python benchmarks/epilogue.py --batch 1 --repeats 30
    python benchmarks/epilogue.py --tiny             # the shipped tiny encoder, quick

Under ``jqx.quantized`` a product whose only use is ``+ bias`` (then, optionally,
``jax.nn.gelu(approximate=False)``) runs as one call whose kernel applies both as it
stores its outputs: the native float32 GEMM, and the AVX512-VNNI W8A8 and int8
weight-only kernels (docs/internals/dispatch.md). ``jqx.ops.policy(epilogue=False)``
runs XLA's add and GELU after the kernel instead. This times both on the ordinary
BERT ports of ``jqx_demo.bert`` (``plain``, ``linen``) with the all-MiniLM-L6-v2
weights: float32 parameters, W8A8 dynamic and int8 weight-only (packed for the
kernels, as ``jqx.quantize`` makes them), one call of each variant per round, best
and median of ``--repeats`` rounds, and the ratio of the times with the epilogue to
those without (best). ``max |diff|``: the largest difference between the two outputs
(the GELU's erfc, and what the next layer's int8 quantization makes of it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _stamp import print_stamp  # noqa: E402

import jqx  # noqa: E402
from jqx_demo import bert, minilm  # noqa: E402

RECIPES = {
    "float32": None,
    "W8A8 dynamic": jqx.int8_dynamic_activation_int8_weight(),
    "int8 weight-only": jqx.int8_weight_only(),
}


def _fn(apply, epilogue: bool):
    def run(v, ids, mask):
        with jqx.ops.policy(epilogue=epilogue):  # read while tracing
            return jqx.quantized(apply)(v, ids, mask)

    return jax.jit(run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--ports", default="plain,linen")
    ap.add_argument("--tiny", action="store_true", help="use the shipped tiny encoder")
    args = ap.parse_args(argv)
    print_stamp()
    # A kernel that did not build leaves every row on XLA: say so first.
    print(f"jqx native kernels: {jqx.ops.native_status()}")
    enc = minilm.load_tiny() if args.tiny else minilm.load_default()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 20000, (args.batch, args.tokens)), jnp.int32)
    lengths = rng.integers(args.tokens // 2, args.tokens + 1, args.batch)
    mask = jnp.asarray(np.arange(args.tokens)[None, :] < lengths[:, None], jnp.int32)
    print(
        f"{'all-MiniLM-L6-v2' if not args.tiny else 'tiny encoder'}; batch {args.batch} x "
        f"{args.tokens} tokens; best / median of {args.repeats} interleaved rounds; "
        f"1-min load average {os.getloadavg()[0]:.1f} at the start\n"
    )
    print("| port | recipe | epilogue on ms | off ms | on / off | max abs diff |")
    print("|---|---|---|---|---|---|")
    for port in args.ports.split(","):
        p = bert.load_port(port, enc)
        runs = {}
        for name, recipe in RECIPES.items():
            v = p.variables if recipe is None else jqx.quantize(p.variables, recipe)
            for on in (True, False):
                f = _fn(p.module.apply, on)
                runs[name, on] = lambda f=f, v=v: jax.block_until_ready(f(v, ids, mask))
        outs = {k: np.asarray(run()) for k, run in runs.items()}  # compile, warm
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, run in runs.items():
                t = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t)
        for name in RECIPES:
            on, off = times[name, True], times[name, False]
            diff = float(np.max(np.abs(outs[name, True] - outs[name, False])))
            print(
                f"| {port} | {name} | {1e3 * min(on):.1f} / {1e3 * statistics.median(on):.1f} "
                f"| {1e3 * min(off):.1f} / {1e3 * statistics.median(off):.1f} "
                f"| {min(on) / min(off):.2f} | {diff:.2g} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
