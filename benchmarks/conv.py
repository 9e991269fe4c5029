"""Quantized convolutions on a real small CNN: accuracy per recipe and jit latency of a
batch-64 forward pass against the float32 model, measured in the same run.

The CNN is examples/train_digits_cnn.py's (trained here on scikit-learn's digits,
a few seconds). Each recipe's quantized parameters run through
``jqx.quantized(model.apply)`` under ``jax.jit``; the float model is the plain
``jax.jit(model.apply)``. Timings: rounds interleaved over all models (the machine is
shared and noisy), the median of each model's per-round times, as a ratio to the float
model's. A per-layer table (``--layers``) times each conv alone with each
implementation (``jqx.ops.explain_conv`` names them): the native AVX2 kernel
(``native.conv_int8``, the default on CPU) and XLA's formulations.

Run: python benchmarks/conv.py [--epochs 30] [--rounds 30] [--calls 20] [--layers]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from _stamp import print_stamp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

from train_digits_cnn import accuracy, quantize, recipes, train  # noqa: E402

import jqx  # noqa: E402


def _interleaved(calls, rounds: int, n: int) -> list[float]:
    """Median over rounds of each call's mean time (ms) over ``n`` calls; the calls
    take turns within every round."""
    for f, a in calls:
        jax.block_until_ready(f(*a))
    per = [[] for _ in calls]
    for _ in range(rounds):
        for i, (f, a) in enumerate(calls):
            t0 = time.perf_counter()
            for _ in range(n):
                y = f(*a)
            jax.block_until_ready(y)
            per[i].append((time.perf_counter() - t0) / n * 1e3)
    return [statistics.median(p) for p in per]


def model_table(args) -> None:
    t0 = time.time()
    model, params, (x_tr, _, x_te, y_te) = train(args.epochs, seed=args.seed)
    print(f"trained DigitsCNN for {args.epochs} epochs in {time.time() - t0:.1f}s\n")
    fwd = jax.jit(model.apply)
    qfwd = jax.jit(jqx.quantized(model.apply))
    x64 = jnp.asarray(x_te[:64])
    acc_f = accuracy(fwd, params, x_te, y_te)
    rows, calls = [], [(fwd, (params, x64))]
    for name, r in recipes().items():
        q = quantize(model, params, r, x_tr)
        rows.append((name, accuracy(qfwd, q, x_te, y_te)))
        calls.append((qfwd, (q, x64)))
    times = _interleaved(calls, args.rounds, args.calls)
    print(f"DigitsCNN, test set {len(y_te)} images, forward on a batch of 64 under jit")
    print("| recipe | test accuracy (%) | vs float (points) | ms / batch 64 | vs float32 |")
    print("|---|---|---|---|---|")
    print(f"| float32 | {acc_f:.2f} | | {times[0]:.3f} | 1.00 |")
    for (name, acc), t in zip(rows, times[1:], strict=True):
        print(f"| {name} | {acc:.2f} | {acc - acc_f:+.2f} | {t:.3f} | {t / times[0]:.2f} |")


def layer_table(args) -> None:
    """Each conv of the CNN alone (batch 64): the float conv against each
    implementation a W8A8 int8 kernel can take (forced with ``jqx.ops.policy``)."""
    from jax import lax  # noqa: PLC0415

    dn = ("NHWC", "HWIO", "NHWC")
    shapes = [(8, 1, 16), (8, 16, 32), (4, 32, 64), (8, 2, 16), (8, 4, 16), (8, 8, 16)]
    r = jqx.int8_dynamic_activation_int8_weight()
    print("\nOne 3x3 SAME conv, batch 64, ms (ratio to the float32 conv)")
    print(
        "| HxW, in -> out | float32 | native.conv_int8 | xla.conv_int8 | xla.conv_int8_taps "
        "| int8 weight-only |"
    )
    print("|---|---|---|---|---|---|")
    for hw, cin, cout in shapes:
        x = jax.random.normal(jax.random.key(0), (64, hw, hw, cin))
        w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
        q = r.quantize_weight(w, path="conv/kernel")
        qw = jqx.int8_weight_only().quantize_weight(w, path="conv/kernel")

        def run(taps_max, kernel, x=x, backend="xla"):
            with jqx.ops.policy(conv_taps_max_in=taps_max):
                return (
                    jax.jit(
                        lambda a, k: jqx.ops.conv_general_dilated(
                            a, k, (1, 1), "SAME", dimension_numbers=dn, backend=backend
                        )
                    )
                    .lower(x, kernel)
                    .compile()
                )

        f32 = jax.jit(
            lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
        )
        t = _interleaved(
            [
                (f32, (x, w)),
                (run(0, q, backend="native"), (x, q)),
                (run(0, q), (x, q)),
                (run(10**9, q), (x, q)),
                (run(0, qw), (x, qw)),
            ],
            args.rounds,
            args.calls,
        )
        cells = " | ".join(f"{v:.3f} ({v / t[0]:.2f})" for v in t[1:])
        print(f"| {hw}x{hw}, {cin} -> {cout} | {t[0]:.3f} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--layers", action="store_true", help="also time each conv alone")
    args = ap.parse_args()
    print_stamp()
    model_table(args)
    if args.layers:
        layer_table(args)


if __name__ == "__main__":
    main()
