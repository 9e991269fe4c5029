"""XLA's float32 dot against PyTorch's (MKL) on MiniLM's shapes, and the summation order
XLA uses: why jqx's float32 path trails PyTorch fp32 (issue #17).

Two tables, one process:

- time: ``jax.jit(a @ b)`` and ``torch.mm`` (``--threads`` threads, default 2) on the
  projections of all-MiniLM-L6-v2 at batch 1 and 32 x 128 tokens (M = 128 and 4096 rows;
  K x N = 384 x 384, 384 x 1536, 1536 x 384), best of ``--repeats`` interleaved calls;
- order: whether XLA's product equals, bit for bit, one fused multiply-add chain per
  output over k = 0..K-1 (the order a native float32 kernel would have to keep to give
  XLA's bits, which jqx's speed paths must), for a spread of shapes.

    python benchmarks/f32_gemm.py            # needs torch (pip install "jqx[bench]")
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _stamp import print_stamp

SHAPES = [(m, k, n) for m in (128, 4096) for k, n in ((384, 384), (384, 1536), (1536, 384))]
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


def _fma_chain(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One fused multiply-add per k, in order, rounded to float32 each step (float64
    holds each float32 product exactly; the float64 sum is rounded once more, which
    differs from a true FMA only on exact float32 ties)."""
    acc = np.zeros((x.shape[0], w.shape[1]), np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    for k in range(x.shape[1]):
        acc = (acc.astype(np.float64) + x64[:, k : k + 1] * w64[k : k + 1, :]).astype(np.float32)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print_stamp()
    print(f"torch {torch.__version__} ({args.threads} threads), XLA cpu as is\n")
    rng = np.random.default_rng(0)
    f = jax.jit(lambda a, b: a @ b)
    print("| M x K x N | XLA ms | XLA GFLOP/s | torch.mm ms | torch GFLOP/s | XLA / torch |")
    print("|---|---|---|---|---|---|")
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((k, n)).astype(np.float32)
        xj, wj, xt, wt = jnp.asarray(x), jnp.asarray(w), torch.from_numpy(x), torch.from_numpy(w)

        def run_x(xj=xj, wj=wj):
            return f(xj, wj).block_until_ready()

        def run_t(xt=xt, wt=wt):
            return torch.mm(xt, wt)

        run_x(), run_t()  # compile, warm
        tj, tt = [], []
        for _ in range(args.repeats):  # interleaved, so load hits both alike
            tj.append(_once(run_x))
            tt.append(_once(run_t))
        a, b = min(tj), min(tt)
        fl = 2 * m * k * n
        print(
            f"| {m} x {k} x {n} | {1e3 * a:.3f} | {fl / a / 1e9:.0f} | {1e3 * b:.3f} "
            f"| {fl / b / 1e9:.0f} | {a / b:.2f} |"
        )
    print("\n| M x K x N | XLA equals one FMA chain per output |")
    print("|---|---|")
    for m, k, n in ORDER_SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((k, n)).astype(np.float32)
        same = float(np.mean(np.asarray(f(x, w)) == _fma_chain(x, w)))
        print(f"| {m} x {k} x {n} | {same:.1%} of outputs |")


if __name__ == "__main__":
    main()
