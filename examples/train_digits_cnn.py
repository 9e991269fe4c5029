"""A small CNN on scikit-learn's handwritten digits, then quantized with jqx.

    python examples/train_digits_cnn.py            # train (a few seconds), quantize, score
    python examples/train_digits_cnn.py --epochs 5

The data are the 1797 8x8 digit images that ship inside scikit-learn
(``sklearn.datasets.load_digits``: no download), split 80/20 with a fixed seed. The
model is an ordinary ``flax.linen`` CNN (three convolutions, a pooling and a dense
head). After training, the float parameters are quantized with a few recipes and each
quantized model is scored through ``jqx.quantized(model.apply)``; the W8A8 recipes
run their convolutions on int8 codes (on CPU, jqx's native AVX2 conv kernel;
docs/guide/conv.md). ``benchmarks/conv.py``
imports :func:`train` and adds the speed.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jqx


class DigitsCNN(nn.Module):
    """8x8x1 images -> 10 logits: conv 16, conv 32, 2x2 max pool, conv 64,
    global average, dense 10."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(10)(x)


def load_data(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: images ``(n, 8, 8, 1)`` in [0, 1] and
    int labels, 80/20 split by a fixed permutation."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 (an optional dependency)

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def train(epochs: int = 30, batch: int = 64, lr: float = 3e-3, seed: int = 0, verbose=False):
    """Trains :class:`DigitsCNN`; returns ``(model, params, data)`` with ``data`` as
    :func:`load_data` gives it."""
    data = load_data(seed)
    x_tr, y_tr = data[0], data[1]
    model = DigitsCNN()
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        def loss(p):
            logits = model.apply(p, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        lv, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, lv

    rng = np.random.default_rng(seed + 1)
    n = len(y_tr) - len(y_tr) % batch  # whole batches: one compiled step
    for epoch in range(epochs):
        order = rng.permutation(len(y_tr))[:n]
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            params, state, lv = step(params, state, x_tr[idx], y_tr[idx])
        if verbose and (epoch + 1) % 10 == 0:
            print(f"  epoch {epoch + 1:3d}  train loss {float(lv):.4f}", flush=True)
    return model, params, data


def accuracy(apply_fn, params, x, y) -> float:
    """Top-1 accuracy (%) of ``apply_fn(params, x)``."""
    logits = apply_fn(params, jnp.asarray(x))
    return float(100.0 * np.mean(np.asarray(jnp.argmax(logits, -1)) == y))


def recipes() -> dict:
    """The recipes the example and the benchmark compare. The first conv has one input
    channel, so 4-bit group-wise (groups along the input channels) cannot group it: it
    stays per output channel there."""
    return {
        "int8 weight-only": jqx.int8_weight_only(),
        "W8A8 int8 dynamic": jqx.int8_dynamic_activation_int8_weight(),
        "W8A8 int8 dynamic per-tensor": jqx.int8_dynamic_activation_int8_weight(
            act_granularity="per_tensor"
        ),
        "W8A8 int8 static": jqx.int8_static_activation_int8_weight(),
        "int4 g16 weight-only": {
            "Conv_0": jqx.int4_weight_only(group_size=None),
            ".*": jqx.int4_weight_only(group_size=16),
        },
        "W8A8 fp8 dynamic": jqx.fp8_dynamic_activation_fp8_weight(),
    }


def quantize(model, params, recipe, calib_x):
    """``jqx.calibrate`` for recipes with static activation scales, else ``jqx.quantize``."""
    rs = recipe.values() if isinstance(recipe, dict) else [recipe]
    if any(r is not None and r.needs_calibration for r in rs):
        batches = [calib_x[i : i + 64] for i in range(0, min(len(calib_x), 512), 64)]
        return jqx.calibrate(model.apply, params, batches, recipe, progress=False)
    return jqx.quantize(params, recipe)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    model, params, (x_tr, _, x_te, y_te) = train(args.epochs, seed=args.seed, verbose=True)
    print(f"trained in {time.time() - t0:.1f}s")
    fwd = jax.jit(model.apply)
    qfwd = jax.jit(jqx.quantized(model.apply))
    print(f"float32: test accuracy {accuracy(fwd, params, x_te, y_te):.2f}%")
    for name, r in recipes().items():
        q = quantize(model, params, r, x_tr)
        print(f"{name}: test accuracy {accuracy(qfwd, q, x_te, y_te):.2f}%")
    print(jqx.report(params, quantize(model, params, recipes()["W8A8 int8 dynamic"], x_tr)))


if __name__ == "__main__":
    main()
