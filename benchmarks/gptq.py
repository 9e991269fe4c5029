"""GPTQ speed on one layer: seconds for a K x N kernel with M calibration rows.

Prints the time of GPTQ (first call, i.e. with compilation, and a second,
compiled call), the time to form H = 2 X^T X / M, and round-to-nearest of the
same kernel as the baseline measured in the same run, plus the output-error
ratio GPTQ / RTN on the (random) calibration data.

Usage:
    python benchmarks/gptq.py                 # 4096 x 4096, 2048 rows (the issue's size)
    python benchmarks/gptq.py --k 1024 --n 1024 --m 512
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from _stamp import print_stamp

from jqx.recipes.gptq import GPTQ, gptq_hessian, gptq_quantize
from jqx.recipes.grid import rtn_quantize

_CPU: dict = {}


def _time(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    jax.block_until_ready(jax.tree_util.tree_leaves(out))
    _CPU[fn] = time.process_time() - c  # all threads of this process: robust to a loaded machine
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    args = ap.parse_args()

    ks = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(ks[0], (args.k, args.n)) * 0.02
    # Correlated calibration rows: a 64-dimensional latent plus noise.
    x = jax.random.normal(ks[1], (args.m, 64)) @ jax.random.normal(ks[2], (64, args.k)) / 8
    x = x + 0.3 * jax.random.normal(ks[1], (args.m, args.k))
    jax.block_until_ready(x)
    recipe = GPTQ(bits=args.bits, group_size=args.group_size, act_order=args.act_order)

    f_h = lambda: gptq_hessian(x.T @ x, args.m)  # noqa: E731
    f_r = lambda: rtn_quantize(w, args.bits, args.group_size)  # noqa: E731
    f_g = lambda: gptq_quantize(w, h, recipe)  # noqa: E731
    f_g0 = lambda: gptq_quantize(w, h, recipe)  # noqa: E731
    t_h, h = _time(f_h)
    _time(f_r)
    t_rtn, q_rtn = _time(f_r)
    t_g0, _ = _time(f_g0)
    t_g, q = _time(f_g)

    y = x @ w
    e_g = float(jnp.sum((y - x @ q.dequantize()) ** 2))
    e_r = float(jnp.sum((y - x @ q_rtn.dequantize()) ** 2))
    print(
        f"GPTQ {args.bits}-bit g{args.group_size}{' act_order' if args.act_order else ''}: "
        f"K={args.k} N={args.n} M={args.m}, {jax.device_count()} {jax.default_backend()} device(s)"
    )
    print_stamp()
    print("| step | wall s | process CPU s | wall ratio to RTN |")
    print("|---|---|---|---|")
    print(f"| H = 2 X^T X / M | {t_h:.2f} | {_CPU[f_h]:.2f} | {t_h / t_rtn:.1f}x |")
    print(f"| RTN (compiled) | {t_rtn:.3f} | {_CPU[f_r]:.3f} | 1.0x |")
    print(
        f"| GPTQ, first call (with compile) | {t_g0:.2f} | {_CPU[f_g0]:.2f} | {t_g0 / t_rtn:.0f}x |"
    )
    print(f"| GPTQ, compiled | {t_g:.2f} | {_CPU[f_g]:.2f} | {t_g / t_rtn:.0f}x |")
    print(f"output error GPTQ / RTN: {e_g / e_r:.3f}")


if __name__ == "__main__":
    main()
