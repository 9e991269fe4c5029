"""Dense layers' bias and GELU inside the native kernels, two-layer MLPs as one native
call, and attention from q and k on the native kernel, on and off, in whole models.

    python benchmarks/epilogue.py                    # MiniLM ports at batch 32 x 128
    python benchmarks/epilogue.py --batch 1 --repeats 30
    python benchmarks/epilogue.py --switch mlp_kernel  # Dense -> GELU -> Dense in one call
    python benchmarks/epilogue.py --switch scores_kernel --ports plain,linen,sdpa
    python benchmarks/epilogue.py --tiny             # the shipped tiny encoder, quick

``--switch epilogue`` (default): under ``jqx.quantized`` a product whose only use is
``+ bias`` (then, optionally, ``jax.nn.gelu(approximate=False)``) runs as one call whose
kernel applies both as it stores its outputs: the native float32 GEMM, and the
AVX512-VNNI W8A8 and int8 weight-only kernels (docs/internals/dispatch.md).
``jqx.ops.policy(epilogue=False)`` runs XLA's add and GELU after the kernel instead.

``--switch mlp_kernel``: a Dense layer with its epilogue whose output feeds only a
second Dense layer runs both as one call of the VNNI kernel (``jqx.ops.mlp``,
``native.w8a8_mlp``; float32: ``native.f32_mlp``), the hidden activations kept per
thread; ``jqx.ops.policy(mlp_kernel=False)`` makes two calls.

``--switch scores_kernel``: attention's scores, softmax and product with the values in
one native call from q and k (``jqx.ops.attention.scores_softmax_dot``; the scores are
never written); ``jqx.ops.policy(scores_kernel=False)``: XLA's scores dot and steps,
then the softmax kernel from the scores. On the ``sdpa`` port
(``jax.nn.dot_product_attention``) "off" is what ``jqx.quantized`` ran before it
recognised that function's transposed scores.

All are timed on the ordinary BERT ports of ``jqx_demo.bert`` (``plain``, ``linen``;
``sdpa`` on request)
with the all-MiniLM-L6-v2 weights: float32 parameters, W8A8 dynamic and int8
weight-only (packed for the kernels, as ``jqx.quantize`` makes them), one call of each
variant per round, best and median of ``--repeats`` rounds, and the ratio of the times
with the switch on to those with it off (best). ``max |diff|``: the largest difference
between the two outputs (with the epilogue, the GELU's erfc and what the next layer's
int8 quantization makes of it; for ``mlp_kernel`` it must be 0; for ``scores_kernel``,
the scores' rounding). ``faults``: minor page
faults per call, on / off (median; the process's ``getrusage``).
"""

from __future__ import annotations

import argparse
import os
import resource
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


SWITCHES = ("epilogue", "mlp_kernel", "scores_kernel")  # jqx.ops.Policy fields


def _fn(apply, switch: str, on: bool):
    def run(v, ids, mask):
        with jqx.ops.policy(**{switch: on}):  # read while tracing
            return jqx.quantized(apply)(v, ids, mask)

    return jax.jit(run)


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--ports", default="plain,linen")
    ap.add_argument("--tiny", action="store_true", help="use the shipped tiny encoder")
    ap.add_argument("--switch", choices=SWITCHES, default="epilogue", help="the policy field")
    args = ap.parse_args(argv)
    recipes = RECIPES
    print_stamp()
    # A kernel that did not build leaves every row on XLA: say so first.
    print(f"jqx native kernels: {jqx.ops.native_status()}")
    enc = minilm.load_tiny() if args.tiny else minilm.load_default()
    rng = np.random.default_rng(0)
    # Token ids inside the vocabulary (the tiny encoder's has 2048: beyond it, NaN rows).
    vocab = enc.config.vocab_size
    ids = jnp.asarray(
        rng.integers(vocab // 30, vocab * 2 // 3, (args.batch, args.tokens)), jnp.int32
    )
    lengths = rng.integers(args.tokens // 2, args.tokens + 1, args.batch)
    mask = jnp.asarray(np.arange(args.tokens)[None, :] < lengths[:, None], jnp.int32)
    print(
        f"{'all-MiniLM-L6-v2' if not args.tiny else 'tiny encoder'}; batch {args.batch} x "
        f"{args.tokens} tokens; best / median of {args.repeats} interleaved rounds; "
        f"1-min load average {os.getloadavg()[0]:.1f} at the start\n"
    )
    print(f"| port | recipe | {args.switch} on ms | off ms | on / off | max abs diff | faults |")
    print("|---|---|---|---|---|---|---|")
    for port in args.ports.split(","):
        p = bert.load_port(port, enc)
        runs = {}
        for name, recipe in recipes.items():
            v = p.variables if recipe is None else jqx.quantize(p.variables, recipe)
            for on in (True, False):
                f = _fn(p.module.apply, args.switch, on)
                runs[name, on] = lambda f=f, v=v: jax.block_until_ready(f(v, ids, mask))
        outs = {k: np.asarray(run()) for k, run in runs.items()}  # compile, warm
        times = {k: [] for k in runs}
        faults = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, run in runs.items():
                f0, t = _minflt(), time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t)
                faults[k].append(_minflt() - f0)
        for name in recipes:
            on, off = times[name, True], times[name, False]
            diff = float(np.max(np.abs(outs[name, True] - outs[name, False])))
            flt = " / ".join(f"{statistics.median(faults[name, o]):.0f}" for o in (True, False))
            print(
                f"| {port} | {name} | {1e3 * min(on):.1f} / {1e3 * statistics.median(on):.1f} "
                f"| {1e3 * min(off):.1f} / {1e3 * statistics.median(off):.1f} "
                f"| {min(on) / min(off):.2f} | {diff:.2g} | {flt} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
