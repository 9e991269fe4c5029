"""Quantized matmul benchmark: jnp bf16 dot vs XLA's quantized paths vs the Pallas kernels.

For each M and K = N it prints the median time, the ratio to the bf16 dot measured in the
same run (>1 = faster), the achieved fraction of the memory roofline (bytes moved / time,
against a copy bandwidth measured in this run) and of the tensor-core peak (a constant per
known device). Inputs rotate through a pool larger than L2 so caches do not flatter the
numbers; each timing is the median over trials of one jitted launch that runs the
candidate on every input set of the pool (>= 16 calls), with ``block_until_ready``.

GPU run (the numbers that fill ``MEASURED`` in ``jqx/ops/dispatch.py``)::

    python benchmarks/matmul.py --json matmul_gpu.json --emit-dispatch

Without a GPU the script runs a CPU smoke test automatically (tiny sizes, kernels in
interpret mode; the timings say nothing about kernel speed), or force it with
``--cpu-smoke``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stamp import print_stamp  # noqa: E402

from jqx.kernels.pallas.fp8_matmul import fp8_matmul  # noqa: E402
from jqx.kernels.pallas.int8_matmul import (  # noqa: E402
    int8_matmul,
    int8_matmul_dynamic,
    quantize_rows_reference,
)
from jqx.kernels.pallas.w4a16_matmul import (  # noqa: E402
    BlockSizes,
    dequantize_w4,
    w4a16_matmul,
)
from jqx.ops import dispatch  # noqa: E402
from jqx.ops.impl_pallas import INT8_NK_MIN_ROWS  # noqa: E402

# Dense tensor-core peaks in FLOP/s (datasheet numbers, no sparsity).
PEAKS = {
    "H200": {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12},
    "H100": {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12},
    "A100": {"bf16": 312e12, "int8": 624e12, "fp8": None},
    "L4": {"bf16": 121e12, "int8": 242e12, "fp8": 242e12},
}
GROUP = 128
# op name in the dispatch table -> (Pallas candidate, XLA candidate it must beat). The
# Pallas candidate is what jqx.ops' adapter runs (jqx/ops/impl_pallas.py): the int8 W8A8
# adapter transposes the weight for the (N, K) kernel from INT8_NK_MIN_ROWS rows on.
DISPATCH_PAIRS = {
    "w4a16": ("pallas_w4a16", "xla_w4a16"),
    "int8_dynamic": (
        lambda m: "pallas_w8a8_dyn_t" if m >= INT8_NK_MIN_ROWS else "pallas_w8a8_dyn",
        "xla_w8a8_dyn",
    ),
    "int8": ("pallas_w8a8", "xla_w8a8"),
    "fp8": ("pallas_fp8", "xla_fp8"),
}


def _peaks(kind: str) -> dict:
    for name, p in PEAKS.items():
        if name.lower() in kind.lower():
            return p
    return {}


def _time(fn, pool, trials: int) -> float:
    """Median seconds per call of ``fn`` over ``trials``.

    One jitted launch runs ``fn`` once on every argument set of ``pool`` (distinct
    buffers, so caches do not help and XLA cannot merge the calls) and returns every
    output (so nothing is dead code); Python dispatch overhead is paid once per launch,
    not per call.
    """

    def many(*sets):
        return tuple(fn(*args) for args in sets)

    many = jax.jit(many)
    jax.block_until_ready(many(*pool))  # compile + warm up
    per_call = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(many(*pool))
        per_call.append((time.perf_counter() - t0) / len(pool))
    return statistics.median(per_call)


def copy_bandwidth(nbytes: int, pool_len: int, trials: int) -> float:
    """Bytes/s of a read+write elementwise pass over ``nbytes`` (the achievable roofline)."""
    n = nbytes // 4
    pool = [(jnp.full((n,), i, jnp.float32),) for i in range(pool_len)]
    return 2 * n * 4 / _time(lambda a: a + 1.0, pool, trials)


def _pool_size(bytes_per_set: int, target: int, lo: int) -> int:
    return int(min(32, max(lo, math.ceil(target / max(bytes_per_set, 1)))))


def parse_w4_blocks(spec: str) -> BlockSizes:
    """``"bm,bn,bk,split_k,num_warps,num_stages"`` -> :class:`BlockSizes` (for tile sweeps).

    Example:
        >>> parse_w4_blocks("16,64,128,1,4,3").block_n
        64
    """
    parts = spec.split(",")
    if len(parts) != 6 or not all(p.strip().isdigit() for p in parts):
        raise SystemExit(
            f"--w4-blocks {spec!r}: expected six integers "
            "'block_m,block_n,block_k,split_k,num_warps,num_stages', e.g. 16,64,128,1,4,3"
        )
    bm, bn, bk, sk, nw, ns = (int(p) for p in parts)
    return BlockSizes(bm, bn, bk, sk, nw, ns)


def candidates(m: int, k: int, n: int, smoke: bool, seed: int = 0, w4_blocks=()):
    """(name, fn, make_args(i), bytes moved, peak kind) per candidate.

    Inputs are drawn on the device (jax.random), so large pools are cheap to build.
    ``w4_blocks`` adds one ``pallas_w4a16`` candidate per tile configuration (a sweep).
    """
    interpret = True if smoke else None
    g = min(GROUP, k)

    def key(i, salt):
        return jax.random.fold_in(jax.random.key(seed + salt), i)

    def normal(i, salt, shape, dtype):
        return jax.random.normal(key(i, salt), shape, jnp.float32).astype(dtype)

    def ints(i, salt, shape, lo, hi, dtype):
        return jax.random.randint(key(i, salt), shape, lo, hi, jnp.int32).astype(dtype)

    def uniform(i, salt, shape):
        return jax.random.uniform(key(i, salt), shape, jnp.float32, 0.01, 0.1)

    def x_bf16(i):
        return normal(i, 0, (m, k), jnp.bfloat16)

    def w4(i):
        return (
            ints(i, 1, (k, n // 2), 0, 256, jnp.uint8),
            uniform(i, 2, (k // g, n)),
            ints(i, 3, (k // g, n), 0, 16, jnp.float32),
        )

    def w8(i):
        return ints(i, 4, (k, n), -127, 128, jnp.int8), uniform(i, 5, (n,))

    def x8(i):
        return ints(i, 6, (m, k), -127, 128, jnp.int8), uniform(i, 7, (m, 1))

    def f8(i, salt, shape):
        return normal(i, salt, shape, jnp.float8_e4m3fn)

    def w_bf16(i):
        return normal(i, 9, (k, n), jnp.bfloat16)

    out_b = m * n * 2
    x_b = m * k * 2
    s_b = 2 * (k // g) * n * 4
    f32 = jnp.float32

    def dot_bf16(x, w):
        return jnp.dot(x, w, preferred_element_type=f32).astype(jnp.bfloat16)

    def xla_w4a16(x, pw, s, z):
        w = dequantize_w4(pw, s, z, group_size=g).astype(jnp.bfloat16)
        return jnp.dot(x, w, preferred_element_type=f32).astype(jnp.bfloat16)

    def xla_w8a8(xq, xs, wq, ws):
        acc = jax.lax.dot_general(
            xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )
        return (acc.astype(f32) * xs * ws[None, :]).astype(jnp.bfloat16)

    def xla_w8a8_dyn(x, wq, ws):
        xq, xs = quantize_rows_reference(x)
        return xla_w8a8(xq, xs, wq, ws)

    def xla_fp8(xq, wq, xs, ws):
        acc = jax.lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=f32)
        return (acc * xs * ws).astype(jnp.bfloat16)

    one = jnp.ones((), f32)
    sweep = [
        (
            "w4a16_" + "_".join(str(v) for v in dataclasses.astuple(bs)),
            jax.jit(
                functools.partial(
                    w4a16_matmul,
                    group_size=g,
                    out_dtype=jnp.bfloat16,
                    interpret=interpret,
                    block_sizes=bs,
                )
            ),
            lambda i: (x_bf16(i), *w4(i)),
            x_b + k * n // 2 + s_b + out_b,
            "bf16",
        )
        for bs in w4_blocks
    ]
    return [
        (
            "bf16_dot",
            jax.jit(dot_bf16),
            lambda i: (x_bf16(i), w_bf16(i)),
            x_b + k * n * 2 + out_b,
            "bf16",
        ),
        (
            "xla_w4a16",
            jax.jit(xla_w4a16),
            lambda i: (x_bf16(i), *w4(i)),
            x_b + k * n // 2 + s_b + out_b,
            "bf16",
        ),
        (
            "pallas_w4a16",
            jax.jit(
                lambda x, pw, s, z: w4a16_matmul(
                    x, pw, s, z, group_size=g, out_dtype=jnp.bfloat16, interpret=interpret
                )
            ),
            lambda i: (x_bf16(i), *w4(i)),
            x_b + k * n // 2 + s_b + out_b,
            "bf16",
        ),
        ("xla_w8a8", jax.jit(xla_w8a8), lambda i: (*x8(i), *w8(i)), m * k + k * n + out_b, "int8"),
        (
            "pallas_w8a8",
            jax.jit(
                lambda xq, xs, wq, ws: int8_matmul(
                    xq, wq, xs, ws, out_dtype=jnp.bfloat16, interpret=interpret
                )
            ),
            lambda i: (*x8(i), *w8(i)),
            m * k + k * n + out_b,
            "int8",
        ),
        (
            "pallas_w8a8_nk",
            lambda xq, xs, wq, ws: int8_matmul(
                xq, wq, xs, ws, out_dtype=jnp.bfloat16, interpret=interpret, w_layout="nk"
            ),
            lambda i: (*x8(i), ints(i, 4, (n, k), -127, 128, jnp.int8), uniform(i, 5, (n,))),
            m * k + k * n + out_b,
            "int8",
        ),
        (
            "xla_w8a8_dyn",
            jax.jit(xla_w8a8_dyn),
            lambda i: (x_bf16(i), *w8(i)),
            x_b + 2 * m * k + k * n + out_b,
            "int8",
        ),
        (
            "pallas_w8a8_dyn",
            jax.jit(
                lambda x, wq, ws: int8_matmul_dynamic(
                    x, wq, ws, out_dtype=jnp.bfloat16, interpret=interpret
                )
            ),
            lambda i: (x_bf16(i), *w8(i)),
            x_b + 2 * m * k + k * n + out_b,
            "int8",
        ),
        (
            "pallas_w8a8_inl",
            jax.jit(
                lambda x, wq, ws: int8_matmul_dynamic(
                    x, wq, ws, out_dtype=jnp.bfloat16, interpret=interpret, fuse="inline"
                )
            ),
            lambda i: (x_bf16(i), *w8(i)),
            x_b + k * n + out_b,
            "int8",
        ),
        (
            # The (K, N) weight transposed in the call, then the (N, K) kernel: what an
            # adapter can do with jqx's QArray layout as it is.
            "pallas_w8a8_dyn_t",
            jax.jit(
                lambda x, wq, ws: int8_matmul_dynamic(
                    x, wq.T, ws, out_dtype=jnp.bfloat16, interpret=interpret, w_layout="nk"
                )
            ),
            lambda i: (x_bf16(i), *w8(i)),
            x_b + 2 * m * k + 3 * k * n + out_b,
            "int8",
        ),
        (
            "xla_fp8",
            jax.jit(xla_fp8),
            lambda i: (f8(i, 10, (m, k)), f8(i, 11, (k, n)), one, one),
            m * k + k * n + out_b,
            "fp8",
        ),
        (
            "pallas_fp8",
            jax.jit(
                lambda xq, wq, xs, ws: fp8_matmul(
                    xq, wq, xs, ws, out_dtype=jnp.bfloat16, interpret=interpret
                )
            ),
            lambda i: (f8(i, 10, (m, k)), f8(i, 11, (k, n)), one, one),
            m * k + k * n + out_b,
            "fp8",
        ),
        (
            "pallas_fp8_t",
            jax.jit(
                lambda xq, wq, xs, ws: fp8_matmul(
                    xq, wq.T, xs, ws, out_dtype=jnp.bfloat16, interpret=interpret, w_layout="nk"
                )
            ),
            lambda i: (f8(i, 10, (m, k)), f8(i, 11, (k, n)), one, one),
            m * k + 3 * k * n + out_b,
            "fp8",
        ),
        (
            "pallas_fp8_nk",
            lambda xq, wq, xs, ws: fp8_matmul(
                xq, wq, xs, ws, out_dtype=jnp.bfloat16, interpret=interpret, w_layout="nk"
            ),
            lambda i: (f8(i, 10, (m, k)), f8(i, 11, (n, k)), one, one),
            m * k + k * n + out_b,
            "fp8",
        ),
    ] + sweep


def run(
    ms,
    kns,
    smoke: bool,
    min_pool: int,
    trials: int,
    pool_bytes: int,
    only=None,
    w4_blocks=(),
    json_path=None,
) -> list[dict]:
    """Times every candidate; with ``json_path`` the rows so far are rewritten after each
    one, so a run stopped by a time limit keeps what it measured."""
    dev = jax.devices()[0]
    kind = dev.device_kind
    peaks = _peaks(kind)
    bw = copy_bandwidth(min(pool_bytes // 4, 1 << 27), min_pool, trials)
    mode = (
        "CPU SMOKE (kernels in interpret mode; timings say nothing about GPU speed)"
        if smoke
        else "native"
    )
    print(f"# device: {kind} ({jax.default_backend()}), jax {jax.__version__}, mode: {mode}")
    print(f"# measured copy bandwidth: {bw / 1e9:.1f} GB/s; peaks: {peaks or 'unknown device'}")
    print(
        f"# median of {trials} launches; each launch runs >= {min_pool} calls on distinct "
        f"inputs (pool >= {pool_bytes >> 20} MiB when that fits in 32 copies)"
    )
    hdr = (
        f"{'M':>5} {'K=N':>5} {'candidate':<24} {'time_us':>10} {'vs_bf16':>8} "
        f"{'mem_roof':>8} {'tc_peak':>8}"
    )
    print(hdr)
    rows = []
    for kn in kns:
        for m in ms:
            base = None
            for name, fn, make, nbytes, pk in candidates(m, kn, kn, smoke, w4_blocks=w4_blocks):
                if only and name not in only and name != "bf16_dot" and name[:6] != "w4a16_":
                    continue
                pool = [make(i) for i in range(_pool_size(nbytes, pool_bytes, min_pool))]
                try:
                    t = _time(fn, pool, trials)
                except Exception as e:  # noqa: BLE001 - report and keep benchmarking
                    print(f"{m:>5} {kn:>5} {name:<24} failed: {type(e).__name__}: {e}"[:200])
                    continue
                finally:
                    del pool
                base = t if name == "bf16_dot" else base
                flops = 2.0 * m * kn * kn
                peak = peaks.get(pk)
                row = dict(
                    m=m,
                    k=kn,
                    n=kn,
                    candidate=name,
                    time_s=t,
                    vs_bf16=(base / t) if base else None,
                    mem_roofline=(nbytes / t) / bw,
                    tc_peak=(flops / t / peak) if peak else None,
                    device=kind,
                    smoke=smoke,
                )
                rows.append(row)
                if json_path:
                    Path(json_path).write_text(json.dumps(rows, indent=1))
                tcs = f"{row['tc_peak']:.3f}" if peak else "-"
                vs = f"{row['vs_bf16']:.2f}" if row["vs_bf16"] else "-"
                print(
                    f"{m:>5} {kn:>5} {name:<24} {t * 1e6:>10.1f} {vs:>8} "
                    f"{row['mem_roofline']:>8.3f} {tcs:>8}",
                    flush=True,
                )
    return rows


def dispatch_table(rows: list[dict]) -> dict:
    """{op: {m_bucket: winner}}: "pallas" only if it beat XLA's path at every K = N.

    Example:
        >>> rows = [dict(m=1, k=4096, candidate=c, time_s=t)
        ...         for c, t in (("pallas_w4a16", 1.0), ("xla_w4a16", 2.0))]
        >>> dispatch_table(rows)
        {'w4a16': {1: 'pallas'}}
    """
    t = {(r["m"], r["k"], r["candidate"]): r["time_s"] for r in rows}
    table: dict[str, dict[int, str]] = {}
    for op, (pallas_name, xla_name) in DISPATCH_PAIRS.items():
        for m in sorted({r["m"] for r in rows}):
            pn = pallas_name(m) if callable(pallas_name) else pallas_name
            wins = [
                t[(m, k, pn)] < t[(m, k, xla_name)]
                for k in sorted({r["k"] for r in rows})
                if (m, k, pn) in t and (m, k, xla_name) in t
            ]
            if wins:
                table.setdefault(op, {})[dispatch.m_bucket(m)] = "pallas" if all(wins) else "xla"
    return table


def load_rows(paths: list[str]) -> list[dict]:
    """Rows from earlier runs: this script's JSON files, or its printed logs (the table
    lines). A later file's (M, K, candidate) replaces an earlier one's.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "run.log")
        >>> _ = open(f, "w").write("    1  4096 bf16_dot   33.2  1.00  0.320  0.001\\n")
        >>> load_rows([f])[0]["time_s"]
        3.32e-05
    """
    merged: dict[tuple, dict] = {}
    for path in paths:
        text = Path(path).read_text()
        if path.endswith(".json"):
            rows = json.loads(text)
        else:
            rows = []
            for line in text.splitlines():
                f = line.split()
                if len(f) >= 4 and f[0].isdigit() and f[1].isdigit() and f[3] != "failed:":
                    rows.append(
                        dict(
                            m=int(f[0]),
                            k=int(f[1]),
                            n=int(f[1]),
                            candidate=f[2],
                            time_s=float(f[3]) * 1e-6,
                        )
                    )
        for r in rows:
            merged[(r["m"], r["k"], r["candidate"])] = r
    return list(merged.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny sizes, interpret mode (automatic without a GPU)",
    )
    p.add_argument("--m", type=int, nargs="*", help="override the M list")
    p.add_argument("--kn", type=int, nargs="*", help="override the K = N list")
    p.add_argument("--only", nargs="*", help="candidate names to run (bf16_dot always runs)")
    p.add_argument("--min-pool", type=int, default=None, help="calls per timed launch (min)")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument(
        "--table-from",
        nargs="+",
        default=None,
        help="measure nothing: print the MEASURED entry from these JSON files or logs of "
        "earlier GPU runs (later files win for the same M, K and candidate)",
    )
    p.add_argument("--device-kind", default="NVIDIA H200", help="device name for --table-from")
    p.add_argument(
        "--w4-blocks",
        nargs="*",
        default=[],
        help="extra W4A16 tile configurations to time, each 'bm,bn,bk,split_k,warps,stages'",
    )
    p.add_argument("--json", type=str, default=None, help="write the rows here")
    p.add_argument(
        "--emit-dispatch",
        action="store_true",
        help="print a MEASURED entry for jqx/ops/dispatch.py (the Pallas table)",
    )
    a = p.parse_args(argv)
    if a.table_from:
        rows = load_rows(a.table_from)
        print(f"# MEASURED[{a.device_kind!r}] = {dispatch_table(rows)!r}")
        return 0
    print_stamp()
    smoke = a.cpu_smoke or jax.default_backend() != "gpu"
    if smoke:
        ms, kns = a.m or [1, 16], a.kn or [256]
        min_pool, trials, pool_bytes = a.min_pool or 2, a.trials or 3, 1 << 20
    else:
        ms, kns = a.m or [1, 16, 64, 256, 1024, 4096], a.kn or [4096, 8192]
        min_pool, trials, pool_bytes = a.min_pool or 16, a.trials or 15, 512 << 20
    w4_blocks = [parse_w4_blocks(b) for b in a.w4_blocks]
    rows = run(
        ms,
        kns,
        smoke,
        min_pool,
        trials,
        pool_bytes,
        only=a.only,
        w4_blocks=w4_blocks,
        json_path=a.json,
    )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.emit_dispatch:
        kind = jax.devices()[0].device_kind
        print(f"# MEASURED[{kind!r}] = {dispatch_table(rows)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
