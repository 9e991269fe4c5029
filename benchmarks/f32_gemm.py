"""The float32 matrix product three ways on MiniLM's and SmolLM2's shapes: XLA's dot,
jqx's native float32 GEMM (``jqx.native.f32_matmul``, which ``jqx.quantized`` runs for
float products) and PyTorch's (MKL), and the summation orders (issue #17).

Three tables, one process:

- time: ``jax.jit(a @ b)``, ``jax.jit(native.f32_matmul)`` and ``torch.mm``
  (``--threads`` threads, default 2; XLA and jqx use the process's cores) on the
  projections of all-MiniLM-L6-v2 at batch 1 and 32 x 128 tokens (M = 128 and 4096 rows;
  K x N = 384 x 384, 384 x 1536, 1536 x 384), on few rows and on SmolLM2-135M's
  prefill shapes, best of ``--repeats`` interleaved calls (each after an untimed one);
- chain (``--chain-repeats``, 0 skips it): a jitted chain of MiniLM's MLP products
  (6 x (x @ W1 (384 x 1536), then @ W2 (1536 x 384))) at 128 to 8192 rows, XLA's dot
  against the native GEMM: products as a model runs them, where XLA's per-call
  overhead does not count (``Policy.f32_kernel_min_rows`` is set from it);
- epilogue (``--epilogue-repeats``, 0 skips it): a Dense layer with the exact GELU,
  ``gelu(x @ W + b)``, on XLA, on the native GEMM with XLA's add and GELU after it, and
  with both inside the GEMM (``native.f32_matmul(x, W, b, "gelu")``), beside torch's
  ``gelu(addmm(b, x, W))``, on MiniLM's and SmolLM2's MLP shapes;
- order: the share of outputs where XLA's product and jqx's equal, bit for bit, one
  fused multiply-add chain per output over k = 0..K-1 (jqx's order, always; XLA's
  depends on the shape), for a spread of shapes.

    python benchmarks/f32_gemm.py            # needs torch (pip install "jqx[bench]")
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _stamp import print_stamp  # noqa: E402

from jqx.kernels.cpu import native  # noqa: E402

SHAPES = [
    *((m, k, n) for m in (128, 4096) for k, n in ((384, 384), (384, 1536), (1536, 384))),
    (16, 384, 384),
    (32, 384, 1536),
    (512, 576, 1536),  # SmolLM2-135M prefill: the MLP's up and down projections
    (512, 1536, 576),
]
ORDER_SHAPES = [
    (1, 384, 384),
    (3, 384, 1536),
    (17, 33, 45),
    (64, 384, 384),
    (128, 1536, 384),
    (128, 4096, 32),
    (1000, 384, 96),
    (4096, 384, 64),
]


def _once(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def _best(runs: dict, repeats: int) -> dict:
    """Best seconds of each of ``runs`` (name -> call), after one warm-up call each, over
    ``repeats`` interleaved rounds, so machine load hits all alike. Each timed call
    follows an untimed one: right after another engine's call, a call also pays for that
    engine's threads, which spin on for a while (torch's OpenMP pool, XLA's, jqx's); a
    user runs one engine in a loop."""
    for run in runs.values():  # compile, warm
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            run()
            times[name].append(_once(run))
    return {name: min(t) for name, t in times.items()}


def _fma_chain(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One fused multiply-add per k, in order, rounded to float32 each step (float64
    holds each float32 product exactly; the float64 sum is rounded once more, which
    differs from a true FMA only on exact float32 ties)."""
    acc = np.zeros((x.shape[0], w.shape[1]), np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    for k in range(x.shape[1]):
        acc = (acc.astype(np.float64) + x64[:, k : k + 1] * w64[k : k + 1, :]).astype(np.float32)
    return acc


def _chain(g, rng, repeats: int) -> None:
    """Six MLP blocks' products in one jit, XLA's dot against the native GEMM."""
    w1 = jnp.asarray(rng.standard_normal((384, 1536)) * 0.05, jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((1536, 384)) * 0.05, jnp.float32)

    def chain(x, dot):
        for _ in range(6):
            x = dot(dot(x, w1), w2) * 0.1
        return x

    fx = jax.jit(lambda x: chain(x, lambda a, b: a @ b))
    fn = jax.jit(lambda x: chain(x, g))
    print("\n| rows | XLA ms | jqx native ms | jqx time / XLA |")
    print("|---|---|---|---|")
    for m in (128, 512, 1024, 2048, 4096, 8192):
        x = jnp.asarray(rng.standard_normal((m, 384)), jnp.float32)
        runs = {
            "xla": lambda x=x: fx(x).block_until_ready(),
            "jqx": lambda x=x: fn(x).block_until_ready(),
        }
        best = _best(runs, repeats)
        a, b = best["xla"], best["jqx"]
        print(f"| {m} | {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.2f} |")


EPILOGUE_SHAPES = [(128, 384, 1536), (4096, 384, 1536), (4096, 384, 384), (512, 576, 1536)]


def _epilogue(rng, repeats: int) -> None:
    """gelu(x @ W + b): XLA, native GEMM then XLA's ops, all in the GEMM, and torch."""
    import torch

    gelu = jax.jit(lambda a, b, c: jax.nn.gelu(a @ b + c, approximate=False))
    after = jax.jit(lambda a, b, c: jax.nn.gelu(native.f32_matmul(a, b) + c, approximate=False))
    fused = jax.jit(lambda a, b, c: native.f32_matmul(a, b, c, "gelu"))
    print(
        "\n| M x K x N | XLA ms | GEMM, then XLA's add + GELU ms | all in the GEMM ms "
        "| torch ms | in the GEMM / after it | in the GEMM / torch |"
    )
    print("|---|---|---|---|---|---|---|")
    for m, k, n in EPILOGUE_SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        xj, wj, bj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)
        xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
        ops = (xj, wj, bj)
        runs = {
            "xla": lambda ops=ops: gelu(*ops).block_until_ready(),
            "after": lambda ops=ops: after(*ops).block_until_ready(),
            "fused": lambda ops=ops: fused(*ops).block_until_ready(),
            "torch": lambda t=(bt, xt, wt): torch.nn.functional.gelu(torch.addmm(*t)),
        }
        t = {name: 1e3 * v for name, v in _best(runs, repeats).items()}
        print(
            f"| {m} x {k} x {n} | {t['xla']:.2f} | {t['after']:.2f} | {t['fused']:.2f} "
            f"| {t['torch']:.2f} | {t['fused'] / t['after']:.2f} | {t['fused'] / t['torch']:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--chain-repeats", type=int, default=8)
    ap.add_argument("--epilogue-repeats", type=int, default=10)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print_stamp()
    print(f"torch {torch.__version__} ({args.threads} threads), XLA cpu as is\n")
    rng = np.random.default_rng(0)
    f = jax.jit(lambda a, b: a @ b)
    g = jax.jit(native.f32_matmul) if native.available() else None
    if g is None:
        print(f"(the native float32 GEMM is not available here: {native.status()})\n")
    print(
        "| M x K x N | XLA GFLOP/s | jqx native GFLOP/s | torch.mm GFLOP/s "
        "| XLA time / torch | jqx time / torch | jqx time / XLA |"
    )
    print("|---|---|---|---|---|---|---|")
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((k, n)).astype(np.float32)
        xj, wj, xt, wt = jnp.asarray(x), jnp.asarray(w), torch.from_numpy(x), torch.from_numpy(w)
        runs = {
            "xla": lambda xj=xj, wj=wj: f(xj, wj).block_until_ready(),
            "torch": lambda xt=xt, wt=wt: torch.mm(xt, wt),
        }
        if g is not None:
            runs["jqx"] = lambda xj=xj, wj=wj: g(xj, wj).block_until_ready()
        best = _best(runs, args.repeats)
        fl = 2 * m * k * n
        jqx_cells = (
            (
                f"{fl / best['jqx'] / 1e9:.0f}",
                f"{best['jqx'] / best['torch']:.2f}",
                f"{best['jqx'] / best['xla']:.2f}",
            )
            if "jqx" in best
            else ("-", "-", "-")
        )
        print(
            f"| {m} x {k} x {n} | {fl / best['xla'] / 1e9:.0f} | {jqx_cells[0]} "
            f"| {fl / best['torch'] / 1e9:.0f} | {best['xla'] / best['torch']:.2f} "
            f"| {jqx_cells[1]} | {jqx_cells[2]} |"
        )
    if g is not None and args.chain_repeats > 0:
        _chain(g, rng, args.chain_repeats)
    if g is not None and args.epilogue_repeats > 0:
        _epilogue(rng, args.epilogue_repeats)
    print("\n| M x K x N | XLA equals one FMA chain per output | jqx native does |")
    print("|---|---|---|")
    for m, k, n in ORDER_SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((k, n)).astype(np.float32)
        chain = _fma_chain(x, w)
        same = float(np.mean(np.asarray(f(x, w)) == chain))
        ours = f"{float(np.mean(np.asarray(g(x, w)) == chain)):.1%}" if g is not None else "-"
        print(f"| {m} x {k} x {n} | {same:.1%} of outputs | {ours} of outputs |")


if __name__ == "__main__":
    main()
