"""Where W8A8 int8 dynamic time goes on MiniLM at batch x seq tokens, against float32.

    python benchmarks/w8a8_profile.py                     # all parts, all-MiniLM-L6-v2
    python benchmarks/w8a8_profile.py --part matmul       # per-matmul-shape formulations only
    python benchmarks/w8a8_profile.py --part model --repeats 9
    python benchmarks/w8a8_profile.py --tiny              # the shipped tiny encoder, quick
    python benchmarks/w8a8_profile.py --part faults       # minor page faults per call
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/w8a8_profile.py --part faults   # ... with glibc keeping its memory

The parts, each timed under ``jit`` with calls interleaved across variants
(median of ``--repeats``; wall clock and process CPU time, since this 2-core
machine is shared and wall times swing with other jobs' load):

- ``matmul``: at each of MiniLM's matmul shapes ((rows, 384) x (384, 384),
  (384, 1536), (1536, 384) with rows = batch x seq): the f32 dot, the int8 x
  int8 -> int32 dot, the same int8 codes as a bf16 x bf16 -> f32 dot, the
  per-token activation quantization alone, ``jqx.native``'s VNNI int8 GEMM
  (when built), its AVX2 W8A8 kernel with the quantization fused in
  (``jqx.native.w8a8_matmul``, when built), the whole W8A8 product with the
  int32 dot and with the bf16 dot, and ``jqx.ops.dot_general`` as shipped; as
  ratios to the f32 dot.
- ``model``: the whole encoder: float32, W8A8 through ``jqx.ops`` as shipped
  (the native kernels when built), W8A8 forced onto XLA's bf16 dot and onto its
  int32 dot, and a floor with every weight matmul
  replaced by zeros (what attention, softmax, GELU, LayerNorm and the
  embeddings cost on their own, i.e. the time no matmul formulation can
  remove).
- ``faults``: minor page faults per steady-state call of each model variant (memory
  mapped and first touched per call), under the glibc malloc settings in the
  environment.
- ``hlo``: the optimized HLO of the W8A8 model: how many activation
  quantizations there are for the 36 matmuls (query/key/value share one input:
  quantized once when XLA CSEs it), and which int32/float conversions are
  left as separate passes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _stamp import print_stamp  # noqa: E402

import jqx  # noqa: E402
from jqx_demo import minilm  # noqa: E402

DN = (((1,), (0,)), ((), ()))


def _round_robin(fns: dict, reps: int) -> dict:
    """name -> (median wall s, median CPU s); one call of each per round."""
    for f, a in fns.values():
        jax.block_until_ready(f(*a))  # compile + warm up
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for k, (f, a) in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(f(*a))
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def _print_ratios(res: dict, base: str, unit_ms: bool = True) -> None:
    bw, bc = res[base]
    print(f"  {'variant':34s} {'wall ms':>9s} {'/ f32':>6s} {'cpu ms':>9s} {'/ f32':>6s}")
    for k, (w, c) in res.items():
        print(f"  {k:34s} {1e3 * w:9.2f} {w / bw:6.2f} {1e3 * c:9.2f} {c / bc:6.2f}")


def _quant(x):
    """Per-token absmax int8 codes (as float) and scale, as jqx.ops computes them."""
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    s = amax / 127.0
    s = jnp.where(s > 0, s, 1.0)
    return jnp.clip(jnp.round(x / s), -127, 127), s


def part_matmul(rows: int, shapes, reps: int) -> None:
    print(f"\n== matmul formulations at {rows} rows (ratios to the f32 dot, same run)")
    r = np.random.default_rng(0)
    for k, n in shapes:
        x = jnp.asarray(r.normal(size=(rows, k)), jnp.float32)
        w = jnp.asarray(r.normal(size=(k, n)) / k**0.5, jnp.float32)
        q = jqx.int8_dynamic_activation_int8_weight().quantize_weight(w)
        x8 = jnp.asarray(r.integers(-127, 128, (rows, k)), jnp.int8)
        ws = q.scale.reshape(1, n)

        def w8a8_int32(x, w8, ws):
            c, s = _quant(x)
            acc = lax.dot_general(c.astype(jnp.int8), w8, DN, preferred_element_type=jnp.int32)
            return acc.astype(jnp.float32) * s * ws

        def w8a8_bf16(x, w8, ws):
            c, s = _quant(x)
            y = lax.dot_general(
                c.astype(jnp.bfloat16),
                w8.astype(jnp.bfloat16),
                DN,
                preferred_element_type=jnp.float32,
            )
            return y * s * ws

        fns = {
            "f32 dot": (jax.jit(lambda a, b: a @ b), (x, w)),
            "int8 x int8 -> int32 dot": (
                jax.jit(lambda a, b: lax.dot_general(a, b, DN, preferred_element_type=jnp.int32)),
                (x8, q.qvalue),
            ),
            "int8 codes as bf16 -> f32 dot": (
                jax.jit(
                    lambda a, b: lax.dot_general(
                        a.astype(jnp.bfloat16),
                        b.astype(jnp.bfloat16),
                        DN,
                        preferred_element_type=jnp.float32,
                    )
                ),
                (x8, q.qvalue),
            ),
            "quantize x only": (jax.jit(lambda a: _quant(a)[0].astype(jnp.int8)), (x,)),
            **(
                {
                    "jqx.native int8 GEMM (VNNI)": (
                        jax.jit(jqx.native.int8_matmul),
                        (x8, q.qvalue),
                    )
                }
                if jqx.ops.native_status() == "available"
                else {}
            ),
            **(
                {
                    "jqx.native W8A8 fused (AVX2)": (
                        jax.jit(jqx.native.w8a8_matmul),
                        (x, q.qvalue, ws.reshape(n).astype(jnp.float32)),
                    )
                }
                if jqx.native.conv_available()
                else {}
            ),
            "W8A8 int32 dot + rescale": (jax.jit(w8a8_int32), (x, q.qvalue, ws)),
            "W8A8 bf16 dot + rescale": (jax.jit(w8a8_bf16), (x, q.qvalue, ws)),
            "jqx.ops.dot_general W8A8": (
                jax.jit(lambda a, b: jqx.ops.dot_general(a, b, DN)),
                (x, q),
            ),
        }
        print(f"\n(rows {rows}) x ({k}, {n})")
        _print_ratios(_round_robin(fns, reps), "f32 dot")


def _zero_rule(path, lhs, rhs, dn, precision, pet, w_is_lhs):
    """A matmul that costs (almost) nothing: x's own columns, tiled or cut to the
    product's shape (x (..., K) @ W (K, N)). Not zeros or a broadcast, which
    XLA would fold through the attention that follows."""
    (xc, wc), (xb, wb) = dn
    x, w = (rhs, lhs) if w_is_lhs else (lhs, rhs)
    if w_is_lhs or xb or tuple(wc) != (0,) or len(w.shape) != 2:
        raise NotImplementedError(f"floor rule expects x @ W (K, N); got dn={dn} at {path}")
    k, n = w.shape
    y = x if n <= k else jnp.concatenate([x] * (-(-n // k)), axis=-1)
    return y[..., :n].astype(pet or x.dtype)


# Each int8 W8A8 formulation as jqx.ops' public switches: (backend, policy overrides).
# The policy is read while tracing (docs/internals/dispatch.md); huge = never.
_FORMULATIONS = {
    "native": (None, {}),  # as shipped: jqx.native's VNNI GEMM when it pays, else XLA's choice
    "bf16": ("xla", {}),  # XLA only: its bf16 dot from 1024 rows on CPU (before jqx.native)
    "int32": ("xla", {"w8a8_bf16_min_rows": 1 << 62}),  # XLA's int32 dot at every size
}


class _W8A8As:
    """``jit(quantized(fn, backend=...))`` traced under one W8A8 formulation's policy."""

    def __init__(self, fn, name: str):
        backend, self.overrides = _FORMULATIONS[name]
        self.inner = jax.jit(jqx.quantized(fn, backend=backend))

    def __call__(self, *args):
        with jqx.ops.policy(**self.overrides):  # only read while tracing
            return self.inner(*args)

    def lower(self, *args):
        with jqx.ops.policy(**self.overrides):
            return self.inner.lower(*args)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def part_faults(enc, ids, mask, reps: int) -> None:
    """Minor page faults per steady-state call of the whole model (after two warm-up
    calls), per variant: memory the call maps and first touches (malloc handing large
    blocks back to the OS and taking them again shows up here). Set glibc's
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ on the command line to see how
    much of it is the allocator's (docs/internals/native-kernels.md)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"\n== minor page faults per steady-state call ({env or 'glibc malloc defaults'})")
    qp = jqx.quantize(enc.variables, jqx.int8_dynamic_activation_int8_weight())
    fns = {
        "float32": (jax.jit(enc.module.apply), enc.variables),
        "W8A8 jqx.ops (shipped)": (jax.jit(jqx.quantized(enc.module.apply)), qp),
        "W8A8 bf16 dot (XLA only)": (_W8A8As(enc.module.apply, "bf16"), qp),
        "W8A8 int32 dot (XLA only)": (_W8A8As(enc.module.apply, "int32"), qp),
    }
    print(f"  {'variant':34s} {'faults/call':>12s} {'MB/call':>8s} {'wall ms':>9s}")
    for name, (f, v) in fns.items():
        for _ in range(2):
            jax.block_until_ready(f(v, ids, mask))
        f0, t0 = _minor_faults(), time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(f(v, ids, mask))
        per = (_minor_faults() - f0) / reps
        ms = 1e3 * (time.perf_counter() - t0) / reps
        print(f"  {name:34s} {per:12.0f} {per * 4096 / 2**20:8.1f} {ms:9.1f}")


def part_model(enc, ids, mask, reps: int) -> None:
    print(f"\n== whole model at {ids.shape[0]} x {ids.shape[1]} tokens (ratios to float32)")
    qp = jqx.quantize(enc.variables, jqx.int8_dynamic_activation_int8_weight())
    paths = [
        jqx.path_str(p)
        for p, leaf in jax.tree_util.tree_flatten_with_path(enc.variables)[0]
        if jqx.path_str(p).endswith("kernel") and leaf.ndim == 2
    ]
    fns = {
        "float32": (jax.jit(enc.module.apply), enc.variables),
        "W8A8 jqx.ops (shipped)": (jax.jit(jqx.quantized(enc.module.apply)), qp),
        "W8A8 bf16 dot (XLA only)": (_W8A8As(enc.module.apply, "bf16"), qp),
        "W8A8 int32 dot (XLA only)": (_W8A8As(enc.module.apply, "int32"), qp),
        "floor: weight matmuls ~ free": (
            jax.jit(jqx.transform.map_dots(enc.module.apply, paths, _zero_rule)),
            enc.variables,
        ),
    }
    ref = np.asarray(fns["float32"][0](enc.variables, ids, mask))
    print(f"  jqx.native (as jqx.ops sees it): {jqx.ops.native_status()}")
    for name in ("W8A8 jqx.ops (shipped)", "W8A8 bf16 dot (XLA only)", "W8A8 int32 dot (XLA only)"):
        f, v = fns[name]
        e = np.asarray(f(v, ids, mask))
        cos = np.mean(np.sum(e * ref, -1))
        print(f"  {name}: embedding cosine to float32 (random ids) {cos:.5f}")
    res = _round_robin({k: (f, (v, ids, mask)) for k, (f, v) in fns.items()}, reps)
    _print_ratios(res, "float32")
    bw, bc = res["float32"]
    for k, (w, c) in res.items():
        print(f"  speedup vs float32: {k:34s} wall {bw / w:5.2f}x  cpu {bc / c:5.2f}x")


def _computations(txt: str) -> dict:
    """name -> body text of each HLO computation."""
    out, name, body = {}, None, []
    for ln in txt.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) \(.*\{$", ln)
        if m:
            name, body = m.group(1), []
        elif ln.startswith("}") and name:
            out[name] = "\n".join(body)
            name = None
        elif name:
            body.append(ln)
    return out


def part_floor(cfg, batch: int, seq: int, reps: int) -> None:
    """The non-matmul work of one encoder layer, piece by piece, times the layer count."""
    b, t, h, i = batch, seq, cfg.hidden_size, cfg.intermediate_size
    nh = cfg.num_heads
    hd = h // nh
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(b, t, nh, hd)), jnp.float32) for _ in range(3))
    bias = jnp.zeros((b, 1, 1, t), jnp.float32)
    x = jnp.asarray(r.normal(size=(b, t, h)), jnp.float32)
    y = jnp.asarray(r.normal(size=(b, t, i)), jnp.float32)
    ln = nn.LayerNorm(epsilon=cfg.layer_norm_eps)
    lnp = ln.init(jax.random.key(0), x)

    def attention(q, k, v, bias):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(hd)) + bias
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h)

    def attention_sdpa(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias).reshape(b, t, h)

    fns = {
        "attention (einsum, softmax, einsum)": (jax.jit(attention), (q, k, v, bias)),
        "  same via jax.nn.dot_product_attention": (jax.jit(attention_sdpa), (q, k, v, bias)),
        "erf GELU (b, t, 1536)": (jax.jit(lambda a: nn.gelu(a, approximate=False)), (y,)),
        "  tanh GELU (b, t, 1536)": (jax.jit(lambda a: nn.gelu(a, approximate=True)), (y,)),
        "residual + LayerNorm (b, t, 384)": (jax.jit(lambda a, c: ln.apply(lnp, a + c)), (x, x)),
    }
    print(f"\n== non-matmul pieces of one layer at {b} x {t} tokens (x {cfg.num_layers} layers)")
    res = _round_robin(fns, reps)
    print(f"  {'piece':42s} {'wall ms':>9s} {'x layers':>9s} {'cpu ms':>9s}")
    for name, (w, c) in res.items():
        print(f"  {name:42s} {1e3 * w:9.2f} {1e3 * w * cfg.num_layers:9.1f} {1e3 * c:9.2f}")


class _SoftmaxAttentionLayer(minilm._Layer):
    """What-if (not used by jqx): the textbook ``softmax -> einsum`` attention
    that jqx/models/minilm.py used before it moved softmax's normalisation
    after the P.V product; same parameters and function (to float32
    rounding). Kept to measure what that change bought: the model's own layer
    is the fast one, this is the slow baseline."""

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        b, t, h = x.shape
        nh, hd = c.num_heads, c.hidden_size // c.num_heads

        def heads(name):
            return nn.Dense(h, name=name)(x).reshape(b, t, nh, hd)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(hd)) + bias
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm")(
            x + nn.Dense(h, name="attention_out")(ctx)
        )
        y = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(
            x + nn.Dense(h, name="output")(y)
        )


@contextlib.contextmanager
def _softmax_attention():
    saved = minilm._Layer
    minilm._Layer = _SoftmaxAttentionLayer
    try:
        yield
    finally:
        minilm._Layer = saved


class _Traced:
    """A jitted fn whose first call (the trace) runs inside ``ctx()``."""

    def __init__(self, fn, ctx):
        # a fresh function: jit caches traces by function, and a bound method
        # compares equal to the one the plain float32 variant jitted
        self.fn, self.ctx = jax.jit(lambda *a: fn(*a)), ctx

    def __call__(self, *args):
        with self.ctx():
            return self.fn(*args)


def part_whatif(enc, ids, mask, reps: int) -> None:
    print("\n== what-if: MiniLM with the old softmax-then-einsum attention (minilm.py unchanged)")
    qp = jqx.quantize(enc.variables, jqx.int8_dynamic_activation_int8_weight())
    fns = {
        "float32": (jax.jit(enc.module.apply), enc.variables),
        "W8A8 jqx.ops": (jax.jit(jqx.quantized(enc.module.apply)), qp),
        "float32, softmax attention": (
            _Traced(enc.module.apply, _softmax_attention),
            enc.variables,
        ),
        "W8A8 jqx.ops, softmax attention": (
            _Traced(jqx.quantized(enc.module.apply), _softmax_attention),
            qp,
        ),
    }
    ref = np.asarray(fns["float32"][0](enc.variables, ids, mask))
    for name in ("float32, softmax attention", "W8A8 jqx.ops, softmax attention"):
        f, v = fns[name]
        e = np.asarray(f(v, ids, mask))
        print(f"  {name}: max |embedding - float32| {np.max(np.abs(e - ref)):.2e}")
    res = _round_robin({k: (f, (v, ids, mask)) for k, (f, v) in fns.items()}, reps)
    _print_ratios(res, "float32")
    for base, q in (
        ("float32", "W8A8 jqx.ops"),
        ("float32, softmax attention", "W8A8 jqx.ops, softmax attention"),
    ):
        print(
            f"  W8A8 speedup over {base:24s} wall {res[base][0] / res[q][0]:5.2f}x  "
            f"cpu {res[base][1] / res[q][1]:5.2f}x"
        )


def part_hlo(enc, ids, mask, dump: str | None) -> None:
    qp = jqx.quantize(enc.variables, jqx.int8_dynamic_activation_int8_weight())
    for label, fn in (
        ("jqx.ops as shipped", _W8A8As(enc.module.apply, "native")),
        ("bf16 dot (XLA only)", _W8A8As(enc.module.apply, "bf16")),
        ("int32 dot (XLA only)", _W8A8As(enc.module.apply, "int32")),
    ):
        print(f"\n== optimized HLO of the W8A8 model, {label}")
        txt = fn.lower(qp, ids, mask).compile().as_text()
        _hlo_stats(txt, qp)
        if dump and label.startswith("jqx"):
            with open(dump, "w") as fh:
                fh.write(txt)
            print(f"  full optimized HLO written to {dump}")


def _hlo_stats(txt: str, qp) -> None:
    leaves = jax.tree_util.tree_leaves(qp, is_leaf=jqx.is_qarray)
    n_mm = sum(1 for leaf in leaves if jqx.is_qarray(leaf))
    comps = _computations(txt)
    entry = next(v for k, v in comps.items() if k.startswith("main"))

    def has(comp, op, seen=()):
        body = comps.get(comp, "")
        if op in body:
            return True
        return any(
            has(c, op, seen + (comp,))
            for c in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", body)
            if c not in seen
        )

    calls = [
        (ln.strip(), m.group(1))
        for ln in entry.splitlines()
        if (m := re.search(r"calls=%([\w.\-]+)", ln))
    ]
    quant = [ln for ln, c in calls if has(c, "round-nearest-even")]
    quant_in_dot = [
        ln for ln in quant if has(re.search(r"calls=%([\w.\-]+)", ln).group(1), " dot(")
    ]
    s32_out = [ln for ln, _ in calls if re.match(r"%\S+ = s32\[", ln)]
    s32_cvt = [ln for ln, c in calls if "wrapped_convert" in ln and "s32[" in comps.get(c, "")]
    w_cvt = [ln for ln, _ in calls if re.match(r"%\S+ = bf16\[\d+,\d+\]", ln) and "qvalue" in ln]
    print(f"  quantized matmul weights: {n_mm}")
    print(f"  fusions that quantize activations (contain round-nearest-even): {len(quant)}")
    print(f"    of which also hold the matmul (quantize + dot in one fusion): {len(quant_in_dot)}")
    print(
        f"  matmul outputs written as int32: {len(s32_out)}, "
        f"converted to f32 in a pass of their own: {len(s32_cvt)}"
    )
    print(f"  int8 -> bf16 weight conversions as fusions of their own: {len(w_cvt)}")
    n_native = txt.count('custom_call_target="jqx_int8_gemm"')
    print(f"  jqx.native int8 GEMM custom calls: {n_native}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--part",
        choices=("all", "matmul", "model", "floor", "whatif", "hlo", "faults"),
        default="all",
    )
    ap.add_argument("--tiny", action="store_true", help="use the shipped tiny encoder")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dump-hlo", default=None, help="write the W8A8 model's optimized HLO here")
    args = ap.parse_args(argv)
    print_stamp()
    t0 = time.perf_counter()
    enc = (
        minilm.load_tiny() if args.tiny or not minilm.weights_available() else minilm.load_minilm()
    )
    c = enc.config
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, c.vocab_size, (args.batch, args.seq_len)), jnp.int32)
    mask = jnp.ones((args.batch, args.seq_len), jnp.int32)
    print(
        f"{enc.name}: {c.num_layers} layers, hidden {c.hidden_size}, {args.batch} x {args.seq_len} "
        f"tokens, median of {args.repeats}, {jax.default_backend()} x {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    h, i = c.hidden_size, c.intermediate_size
    if args.part in ("all", "hlo"):
        part_hlo(enc, ids, mask, args.dump_hlo)
    if args.part in ("all", "matmul"):
        part_matmul(args.batch * args.seq_len, [(h, h), (h, i), (i, h)], args.repeats)
    if args.part in ("all", "floor"):
        part_floor(c, args.batch, args.seq_len, args.repeats)
    if args.part in ("all", "model"):
        part_model(enc, ids, mask, args.repeats)
    if args.part in ("all", "faults"):
        part_faults(enc, ids, mask, args.repeats)
    if args.part in ("all", "whatif"):
        part_whatif(enc, ids, mask, args.repeats)
    print(f"\n({time.perf_counter() - t0:.0f}s, load average now {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
