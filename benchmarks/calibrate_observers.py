"""Static W8A8 on the sentence encoder: which activation observer keeps accuracy best.

For each observer, calibrates ``jqx.int8_static_activation_int8_weight()`` on
held-out sentences and reports the mean / min cosine similarity of the
embeddings to the float model on the evaluation sentences, next to dynamic
per-token W8A8 as the reference point, and the calibration time as a ratio
to one float forward pass over the calibration set (same run).

Run: python benchmarks/calibrate_observers.py [--n-eval 256] [--n-calib 64]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _stamp import print_stamp

import jqx
from jqx_demo import minilm


def _batches(enc, sents, bs, length):
    out = []
    for i in range(0, len(sents), bs):
        ids, mask = enc.tokenize(sents[i : i + bs], max_len=length, pad_to=length)
        out.append((jnp.asarray(ids), jnp.asarray(mask)))
    return out


def _cos(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--len", type=int, default=64)
    a = ap.parse_args()
    enc = minilm.load_default()
    sents = minilm.load_sentences()
    calib = _batches(enc, sents[-a.n_calib :], 32, a.len)
    evalb = _batches(enc, sents[: a.n_eval], 32, a.len)
    params = enc.variables
    ffwd = jax.jit(enc.module.apply)
    qfwd = jax.jit(jqx.quantized(enc.module.apply))
    ref = np.concatenate([np.asarray(ffwd(params, *b)) for b in evalb])
    for b in calib:
        jax.block_until_ready(ffwd(params, *b))
    t0 = time.perf_counter()
    for b in calib:
        jax.block_until_ready(ffwd(params, *b))
    t_fwd = time.perf_counter() - t0

    rows = []
    qp = jqx.quantize(params, jqx.int8_dynamic_activation_int8_weight())
    c = _cos(np.concatenate([np.asarray(qfwd(qp, *b)) for b in evalb]), ref)
    rows.append(("dynamic per-token (no calibration)", c.mean(), c.min(), float("nan")))
    for obs, kw in (
        ("minmax", {}),
        ("moving_average_minmax", {}),
        ("percentile", {"percentile": 99.99}),
        ("percentile", {"percentile": 99.9}),
        ("mse", {}),
    ):
        t0 = time.perf_counter()
        qp = jqx.calibrate(
            enc.module.apply,
            params,
            calib,
            jqx.int8_static_activation_int8_weight(),
            observer=obs,
            progress=False,
            **kw,
        )
        t_cal = time.perf_counter() - t0
        c = _cos(np.concatenate([np.asarray(qfwd(qp, *b)) for b in evalb]), ref)
        label = obs + (f" {kw['percentile']}" if kw else "")
        rows.append((f"static, {label}", c.mean(), c.min(), t_cal / t_fwd))
    print_stamp()
    print(f"model: {enc.name}; {a.n_eval} eval / {a.n_calib} calibration sentences, length {a.len}")
    print(
        "| W8A8 int8 activation scales | mean cosine | min cosine | calibration time / float pass |"
    )
    print("|---|---|---|---|")
    for name, m, mn, t in rows:
        ts = "-" if np.isnan(t) else f"{t:.0f}x"
        print(f"| {name} | {m:.5f} | {mn:.5f} | {ts} |")


if __name__ == "__main__":
    main()
