"""Quantized matmul formulations on this CPU, as ratios to the float32 dot.

For a K x N weight and several M, times each XLA formulation under jit
(median of repeats, block_until_ready) and prints time / time(f32 dot)
measured in the same run. The CPU thresholds of ``jqx.ops``' dispatcher
(``jqx.ops.Policy``, docs/internals/dispatch.md) come from this table;
``jqx.ops`` rows run the dispatcher's choice, ``jqx.ops xla`` rows the same
with ``backend="xla"`` (no native kernel).

Usage:
    python benchmarks/ops.py                 # K = N = 4096, M in 1 2 16 256 4096
    python benchmarks/ops.py --k 1024 --n 1024 --m 1 16 256 --only jqx
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from _stamp import print_stamp  # noqa: E402
from jax import lax

import jqx

DN = (((1,), (0,)), ((), ()))


def _round_robin(fns, args, reps: int) -> list[float]:
    """Median time of each fn; the fns run interleaved, one call each per round,
    so load from other processes on this shared machine hits all of them alike."""
    for f, a in zip(fns, args, strict=True):
        jax.block_until_ready(f(*a))  # compile + warm up
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, (f, a) in enumerate(zip(fns, args, strict=True)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def formulations(k: int, n: int, key):
    """name -> (fn(x, params), params). Each fn is jitted by the caller."""
    kw, _ = jax.random.split(key)
    w = jax.random.normal(kw, (k, n), jnp.float32) / k**0.5
    q8 = jqx.int8_weight_only().quantize_weight(w)
    q4 = jqx.int4_weight_only(group_size=128).quantize_weight(w)
    qnf4 = jqx.nf4_weight_only(group_size=64).quantize_weight(w)
    qfp8 = jqx.fp8_weight_only().quantize_weight(w)
    qw8a8 = jqx.int8_dynamic_activation_int8_weight().quantize_weight(w)
    qf8a8 = jqx.fp8_dynamic_activation_fp8_weight().quantize_weight(w)
    s8 = q8.scale.reshape(1, n)

    def deq_dot(x, q):
        return x @ q.dequantize()

    def codes_then_scale(x, q):
        # scale is constant along K: dot on raw codes, scale the output columns
        return lax.dot_general(
            x, q.qvalue, DN, preferred_element_type=jnp.float32
        ) * q.scale.reshape(1, -1)

    def codes_f32_then_scale(x, q):
        return (x @ q.qvalue.astype(jnp.float32)) * q.scale.reshape(1, -1)

    def grouped_int4(x, q):
        g = q.block[0]
        G = k // g
        v = q.codes().astype(jnp.float32).reshape(G, g, n)
        xg = x.reshape(-1, G, g)
        y = jnp.einsum("mGg,Ggn->Gmn", xg, v, preferred_element_type=jnp.float32)
        xs = xg.sum(-1)  # (m, G)
        z = q.zero_point.astype(jnp.float32)  # (G, n)
        s = q.scale.astype(jnp.float32)
        y = y - xs.T[:, :, None] * z[:, None, :]
        return jnp.einsum("Gmn,Gn->mn", y, s)

    def w8a8_int(x, q):
        xq, xs = jqx.quantize_activation(x, "int8")
        y = lax.dot_general(xq, q.qvalue, DN, preferred_element_type=jnp.int32)
        return y.astype(jnp.float32) * xs * q.scale.reshape(1, -1)

    def via_bf16(fmt):
        """W8A8 with ``fmt`` activation codes, both code sets exact in bfloat16."""

        def f(x, q):
            xq, xs = jqx.quantize_activation(x, fmt)
            y = lax.dot_general(
                xq.astype(jnp.bfloat16),
                q.qvalue.astype(jnp.bfloat16),
                DN,
                preferred_element_type=jnp.float32,
            )
            return y * xs * q.scale.reshape(1, -1)

        return f

    def w8a8_native(x, q):
        xq, xs = jqx.quantize_activation(x, "int8")
        y = jqx.native.int8_matmul(xq, q.qvalue)
        return y.astype(jnp.float32) * xs * q.scale.reshape(1, -1)

    def fp8_native(x, q):
        xq, xs = jqx.quantize_activation(x, "fp8_e4m3")
        y = lax.dot_general(xq, q.qvalue, DN, preferred_element_type=jnp.float32)
        return y * xs * q.scale.reshape(1, -1)

    def fp8_as_f32(x, q):
        xq, xs = jqx.quantize_activation(x, "fp8_e4m3")
        y = xq.astype(jnp.float32) @ q.qvalue.astype(jnp.float32)
        return y * xs * q.scale.reshape(1, -1)

    def int8_two_level(x, q):
        # x ~ s1*q1 + s2*q2 (a second int8 pass on the residual): two int8 dots
        s1 = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127
        s1 = jnp.where(s1 > 0, s1, 1.0)
        q1 = jnp.clip(jnp.round(x / s1), -127, 127)
        s2 = s1 / 254
        q2 = jnp.clip(jnp.round((x - q1 * s1) / s2), -127, 127)
        both = jnp.concatenate([q1, q2]).astype(jnp.int8)
        a = lax.dot_general(both, q.qvalue, DN, preferred_element_type=jnp.int32).astype(
            jnp.float32
        )
        m = x.shape[0]
        return (a[:m] * s1 + a[m:] * s2) * q.scale.reshape(1, -1)

    def jqx_ops(x, q):
        return jqx.ops.dot_general(x, q, DN)

    def jqx_ops_xla(x, q):
        return jqx.ops.dot_general(x, q, DN, backend="xla")

    del s8
    return {
        "f32 dot": (lambda x, w: x @ w, w),
        "int8 A16 dequant-then-dot": (deq_dot, q8),
        "int8 A16 mixed dot(int8 codes)*scale": (codes_then_scale, q8),
        "int8 A16 dot(f32(codes))*scale": (codes_f32_then_scale, q8),
        "int8 A16 two-level int8 activations": (int8_two_level, q8),
        "int8 A16 jqx.ops": (jqx_ops, q8),
        "int8 A16 jqx.ops xla": (jqx_ops_xla, q8),
        "uint4 g128 A16 dequant-then-dot": (deq_dot, q4),
        "uint4 g128 A16 grouped dot": (grouped_int4, q4),
        "uint4 g128 A16 jqx.ops": (jqx_ops, q4),
        "uint4 g128 A16 jqx.ops xla": (jqx_ops_xla, q4),
        "nf4 g64 A16 dequant-then-dot": (deq_dot, qnf4),
        "nf4 g64 A16 jqx.ops": (jqx_ops, qnf4),
        "fp8 A16 dequant-then-dot": (deq_dot, qfp8),
        "fp8 A16 mixed dot(fp8 codes)*scale": (codes_then_scale, qfp8),
        "fp8 A16 jqx.ops": (jqx_ops, qfp8),
        "W8A8 int8 int32-dot": (w8a8_int, qw8a8),
        "W8A8 int8 bf16-dot": (via_bf16("int8"), qw8a8),
        **(
            {"W8A8 int8 jqx.native VNNI GEMM": (w8a8_native, qw8a8)}
            if jqx.ops.native_status() == "available"
            else {}
        ),
        "W8A8 int8 jqx.ops": (jqx_ops, qw8a8),
        "W8A8 int8 jqx.ops xla": (jqx_ops_xla, qw8a8),
        "W8A8 fp8 native fp8 dot": (fp8_native, qf8a8),
        "W8A8 fp8 via bf16 dot": (via_bf16("fp8_e4m3"), qf8a8),
        "W8A8 fp8 via f32 dot": (fp8_as_f32, qf8a8),
        "W8A8 fp8 jqx.ops": (jqx_ops, qf8a8),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 16, 256, 4096])
    ap.add_argument("--only", default="", help="substring filter on formulation names")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args(argv)
    print_stamp()
    key = jax.random.key(0)
    forms = formulations(a.k, a.n, key)
    names = [nm for nm in forms if nm == "f32 dot" or a.only in nm]
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, K={a.k} N={a.n}; "
        "time / time(f32 dot) in the same run (lower is faster)",
        flush=True,
    )
    jitted = {nm: jax.jit(forms[nm][0]) for nm in names}
    rows = {nm: [] for nm in names}
    base_ms = []
    for m in a.m:
        x = jax.random.normal(jax.random.key(1), (m, a.k), jnp.float32)
        reps = a.reps if m < 1024 else max(2, a.reps // 3)
        ts = _round_robin([jitted[nm] for nm in names], [(x, forms[nm][1]) for nm in names], reps)
        t0 = ts[names.index("f32 dot")]
        base_ms.append(t0 * 1e3)
        for nm, t in zip(names, ts, strict=True):
            rows[nm].append(t / t0)
        print(
            f"  M={m}: f32 dot {t0 * 1e3:.2f} ms; "
            + ", ".join(
                f"{nm} {t / t0:.2f}" for nm, t in zip(names, ts, strict=True) if nm != "f32 dot"
            ),
            flush=True,
        )
    print()
    print("| formulation | " + " | ".join(f"M={m}" for m in a.m) + " |")
    print("|---|" + "---:|" * len(a.m))
    print("| f32 dot (ms) | " + " | ".join(f"{b:.2f}" for b in base_ms) + " |")
    for nm in names:
        if nm != "f32 dot":
            print(f"| {nm} | " + " | ".join(f"{r:.2f}" for r in rows[nm]) + " |")


if __name__ == "__main__":
    main()
