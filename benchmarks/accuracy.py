"""Accuracy of the post-training quantization algorithms.

Part 1 (always): the issue's synthetic goals, on the layers the tests use:
GPTQ / act_order vs round to nearest (output error), HQQ vs RTN (weight
error), AWQ vs RTN (output error), LLM.int8() and SmoothQuant vs plain W8A8
(relative output error).

Part 2 (when the char LM checkpoint exists, ``python examples/train_charlm.py``):
validation bits/char and perplexity of the Shakespeare char LM for float,
RTN, GPTQ, GPTQ act_order, HQQ and AWQ at 4 and 3 bits (g128 and per
channel), and W8A8 / SmoothQuant W8A8 / LLM.int8(), with the seconds each
method took (calibration included).

Part 3: the same methods on the sentence encoder all-MiniLM-L6-v2 (or the
shipped tiny encoder without the weights package): mean / min cosine of the
sentence embeddings to float, calibrated on 64 of the shipped sentences and
evaluated on the next ``--sentences`` (``--calib N`` > 64 adds the sentences
after the evaluation set; padding is left out of the statistics with
``row_mask`` unless ``--no-row-mask``).

Usage:
    python benchmarks/accuracy.py                  # all three parts
    python benchmarks/accuracy.py --synthetic-only
    python benchmarks/accuracy.py --lm-only [--checkpoint PATH] [--windows 256]
    python benchmarks/accuracy.py --minilm-only [--tiny-encoder] [--sentences 128] [--calib 64]
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from _stamp import print_stamp

import jqx
from jqx.recipes.awq import AWQ, awq_quantize
from jqx.recipes.gptq import GPTQ, gptq_hessian, gptq_quantize
from jqx.recipes.grid import rtn_quantize
from jqx.recipes.hqq import HQQ, hqq_quantize
from jqx.recipes.llm_int8 import llm_int8_matmul
from jqx.recipes.smoothquant import smoothquant_quantize


def _gptq_layer(seed, outliers):
    ks = jax.random.split(jax.random.key(seed), 4)
    k, n, m = 256, 64, 1024
    w = jax.random.normal(ks[0], (k, n)) * 0.05
    x = jax.random.normal(ks[1], (m, 64)) @ jax.random.normal(ks[2], (64, k)) / 8
    x = x + 0.3 * jax.random.normal(ks[3], (m, k))
    if outliers == "scattered":
        idx = jax.random.choice(jax.random.fold_in(ks[0], 1), k, (8,), replace=False)
    else:
        idx = jnp.arange(8)
    return w, x.at[:, idx].multiply(10.0)


def _out_err(x, w, wq):
    d = x @ w - x @ wq
    return float(jnp.sum(d * d))


def _w8a8(x, q):
    if q.in_scale is not None:
        x = x / q.in_scale[:, 0]
    xc, xs = jqx.quantize_activation(x, "int8", "per_token")
    acc = jax.lax.dot_general(
        xc, q.qvalue, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
    )
    return acc.astype(jnp.float32) * xs * q.scale.reshape(1, -1)


def synthetic() -> None:
    rows = []
    for layout in ("scattered", "front"):
        for seed in (0, 1, 2):
            w, x = _gptq_layer(seed, layout)
            h = gptq_hessian(x.T @ x, x.shape[0])
            e_rtn = _out_err(x, w, rtn_quantize(w, 4, 128).dequantize())
            for name, cfg in [
                ("GPTQ", GPTQ(group_size=128)),
                ("GPTQ act_order", GPTQ(group_size=128, act_order=True)),
                (
                    "GPTQ act_order static_groups",
                    GPTQ(group_size=128, act_order=True, static_groups=True),
                ),
            ]:
                r = _out_err(x, w, gptq_quantize(w, h, cfg).dequantize()) / e_rtn
                rows.append(
                    (
                        f"{name}, 4-bit g128, outliers {layout}, seed {seed}",
                        "output error / RTN",
                        f"{r:.3f}",
                        "<= 0.25",
                    )
                )
    for dist in ("normal", "student-t(4)"):
        key = jax.random.key(0)
        w = (
            jax.random.normal(key, (1024, 512))
            if dist == "normal"
            else jax.random.t(key, 4.0, (1024, 512))
        ) * 0.02
        e_r = float(jnp.sum((w - rtn_quantize(w, 4, 64).dequantize()) ** 2))
        for opt in (False, True):
            e_h = float(
                jnp.sum(
                    (w - hqq_quantize(w, HQQ(group_size=64, optimize_scale=opt)).dequantize()) ** 2
                )
            )
            rows.append(
                (
                    f"HQQ{' +scale' if opt else ''}, 4-bit g64, {dist} weights",
                    "weight sq. error / RTN",
                    f"{e_h / e_r:.3f}",
                    "<= 0.96",
                )
            )
    ks = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(ks[0], (256, 64)) * 0.05
    x = jax.random.normal(ks[1], (512, 256)) * jnp.exp(jax.random.normal(ks[2], (256,)) * 0.8)
    e_rtn = _out_err(x, w, rtn_quantize(w, 4, 128).dequantize())
    e_awq = _out_err(x, w, awq_quantize(w, x, AWQ(group_size=128)).dequantize())
    rows.append(
        (
            "AWQ, 4-bit g128, log-normal channel scales",
            "output error / RTN",
            f"{e_awq / e_rtn:.3f}",
            "< 1",
        )
    )
    w = jax.random.normal(jax.random.key(0), (1024, 256)) * 0.05
    q = jqx.quantize({"kernel": w}, jqx.llm_int8())["kernel"]
    for seed in (1, 2, 3):
        ks = jax.random.split(jax.random.key(seed), 4)
        x = jax.random.normal(ks[0], (256, 1024))
        cols = jax.random.choice(ks[1], 1024, (6,), replace=False)
        mag = jax.random.uniform(ks[2], (256, 6), minval=8.0, maxval=20.0)
        x = x.at[:, cols].set(mag * jnp.sign(jax.random.normal(ks[3], (256, 6))))
        y = jnp.matmul(x, w, precision="highest")
        rel = lambda a, y=y: float(jnp.linalg.norm(a - y) / jnp.linalg.norm(y))  # noqa: E731
        rows.append(
            (
                f"LLM.int8(), 6 outlier cols 8-20, seed {seed}",
                "rel. output error",
                f"{rel(llm_int8_matmul(x, q)):.4f}",
                "< 0.01",
            )
        )
        rows.append(
            (
                f"plain W8A8, same input, seed {seed}",
                "rel. output error",
                f"{rel(_w8a8(x, q)):.4f}",
                "> 0.025",
            )
        )
        sq = smoothquant_quantize(w, jnp.max(jnp.abs(x), axis=0), 0.5)
        rows.append(
            (
                f"SmoothQuant(0.5) W8A8, same input, seed {seed}",
                "rel. output error",
                f"{rel(_w8a8(x, sq)):.4f}",
                "-",
            )
        )
    print("| case | metric | value | goal |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


_BITS, _GROUPS = (4, 3), (128, None)


def _methods(bits_list=None, groups=None):
    bits_list, groups = bits_list or _BITS, groups or _GROUPS
    methods = [("float", None)]
    for bits in bits_list:
        for g in groups:
            gs = f"g{g}" if g else "per-channel"
            methods += [
                (f"RTN {bits}-bit {gs}", ("rtn", bits, g)),
                (f"GPTQ {bits}-bit {gs}", jqx.gptq(bits=bits, group_size=g)),
                (
                    f"GPTQ act_order {bits}-bit {gs}",
                    jqx.gptq(bits=bits, group_size=g, act_order=True),
                ),
                (
                    f"GPTQ act_order clip_search {bits}-bit {gs}",
                    jqx.gptq(bits=bits, group_size=g, act_order=True, clip_search=True),
                ),
                (f"HQQ {bits}-bit {gs}", jqx.hqq(bits=bits, group_size=g)),
                (f"AWQ {bits}-bit {gs}", jqx.awq(bits=bits, group_size=g)),
            ]
    return methods + [
        ("W8A8 int8 dynamic", jqx.int8_dynamic_activation_int8_weight()),
        ("SmoothQuant(0.5) W8A8", jqx.smoothquant(alpha=0.5)),
        ("LLM.int8() t=6", jqx.llm_int8(threshold=6.0)),
    ]


def _apply_method(recipe, fn, params, calib, row_mask=None):
    """Quantized params and the seconds it took (calibration included)."""
    t = time.perf_counter()
    if recipe is None:
        qp = params
    elif isinstance(recipe, tuple):  # RTN on the same integer grid as GPTQ/AWQ (also 3-bit)
        _, bits, g = recipe
        qp = jax.tree_util.tree_map_with_path(
            lambda path, leaf: (
                rtn_quantize(leaf, bits, g)
                if jqx.default_filter(jqx.path_str(path), leaf)
                else leaf
            ),
            params,
        )
    elif recipe.needs_calibration:
        qp = jqx.calibrate(fn, params, calib, recipe, progress=False, row_mask=row_mask)
    else:
        qp = jqx.quantize(params, recipe)
    jax.block_until_ready(jax.tree_util.tree_leaves(qp))
    return qp, time.perf_counter() - t


def charlm(n_windows: int, checkpoint: str | None = None) -> None:
    from jqx_demo import charlm as cl  # noqa: PLC0415

    try:
        cfg, params, _ = cl.load_params(checkpoint)
    except FileNotFoundError as e:
        print(f"\n(char LM table skipped: {e})")
        return
    from jqx_demo.shakespeare import load_shakespeare  # noqa: PLC0415

    data = load_shakespeare()
    f = cl.apply_fn(cfg)
    # Calibration: 32 windows of the training text (never the validation text).
    seq = min(128, cfg.max_len)
    starts = range(0, 32 * 997, 997)
    calib = [
        jnp.asarray([data.train[s : s + seq] for s in starts[i : i + 8]], jnp.int32)
        for i in range(0, 32, 8)
    ]

    def score(p):
        fq = jax.jit(jqx.quantized(f))
        loss, bpc = cl.evaluate(lambda t: fq(p, t), data.val, seq_len=seq, n_windows=n_windows)
        return bpc, math.exp(loss)

    print(f"\nchar LM ({cfg}), validation: {n_windows} windows of {seq} characters")
    print("| method | bits/char | perplexity | seconds |")
    print("|---|---|---|---|")
    for name, recipe in _methods():
        qp, secs = _apply_method(recipe, f, params, calib)
        bpc, ppl = score(qp)
        print(f"| {name} | {bpc:.4f} | {ppl:.3f} | {secs:.1f} |")


def minilm_table(n_eval: int, tiny: bool = False, n_calib: int = 64, mask: bool = True) -> None:
    from jqx_demo import minilm  # noqa: PLC0415

    enc = minilm.load_tiny() if tiny or not minilm.weights_available() else minilm.load_minilm()
    sents = minilm.load_sentences()
    # Calibration: the first 64 sentences, then (for n_calib > 64) the ones after
    # the evaluation set; never an evaluated sentence.
    eval_s = sents[64 : 64 + n_eval]
    calib_s = sents[: min(64, n_calib)] + sents[64 + n_eval :][: max(0, n_calib - 64)]

    def batches(ss, bs=16):
        out = []
        for i in range(0, len(ss), bs):
            chunk = ss[i : i + bs]
            ids, mask = enc.tokenize(chunk, max_len=128, pad_to=128)
            if len(chunk) < bs:  # one shape: one compilation
                pad = bs - len(chunk)
                ids = np.concatenate([ids, np.zeros((pad, 128), np.int32)])
                mask = np.concatenate([mask, np.zeros((pad, 128), np.int32)])
                mask[len(chunk) :, 0] = 1
            out.append((jnp.asarray(ids), jnp.asarray(mask), len(chunk)))
        return out

    calib = [
        tuple(jnp.asarray(a) for a in enc.tokenize(calib_s[i : i + 16], max_len=128, pad_to=128))
        for i in range(0, len(calib_s), 16)
    ]
    row_mask = (lambda ids, m: m) if mask else None  # padding out of the statistics
    ev = batches(eval_s)
    fn = enc.module.apply
    fq = jax.jit(jqx.quantized(fn))

    def embed(v):
        return np.concatenate([np.asarray(fq(v, ids, mask))[:n] for ids, mask, n in ev])

    ref = embed(enc.variables)
    print(
        f"\nsentence encoder {enc.name}: cosine of {len(eval_s)} sentence embeddings to float; "
        f"{len(calib_s)} calibration sentences (padded to 128, "
        f"{'padding masked out' if mask else 'padding counted'})"
    )
    print("| method | mean cosine | min cosine | seconds |")
    print("|---|---|---|---|")
    for name, recipe in _methods():
        try:
            qv, secs = _apply_method(recipe, fn, enc.variables, calib, row_mask)
        except ValueError as e:  # e.g. a group size that does not divide a kernel
            print(f"| {name} | - | - | ({str(e)[:60]}...) |")
            continue
        e = embed(qv)
        cos = np.sum(e * ref, -1) / (np.linalg.norm(e, axis=-1) * np.linalg.norm(ref, axis=-1))
        print(f"| {name} | {cos.mean():.4f} | {cos.min():.4f} | {secs:.1f} |")


def main() -> None:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-only", action="store_true")
    ap.add_argument("--lm-only", action="store_true")
    ap.add_argument("--minilm-only", action="store_true")
    ap.add_argument("--tiny-encoder", action="store_true", help="the shipped tiny encoder (quick)")
    ap.add_argument("--sentences", type=int, default=128, help="evaluation sentences (MiniLM)")
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences (MiniLM)")
    ap.add_argument(
        "--no-row-mask",
        action="store_true",
        help="count the padding tokens in the calibration statistics (as before row_mask)",
    )
    ap.add_argument("--bits", default="4,3", help="weight bits of the weight-only rows, e.g. 4")
    ap.add_argument("--groups", default="128,none", help="group sizes, e.g. 128 or 128,none")
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument(
        "--checkpoint", default=None, help="char LM .safetensors (default: the cached one)"
    )
    args = ap.parse_args()
    print_stamp()
    global _BITS, _GROUPS
    _BITS = tuple(int(b) for b in args.bits.split(","))
    _GROUPS = tuple(None if g.lower() == "none" else int(g) for g in args.groups.split(","))
    only = args.synthetic_only or args.lm_only or args.minilm_only
    if args.synthetic_only or not only:
        synthetic()
    if args.lm_only or not only:
        charlm(args.windows, args.checkpoint)
    if args.minilm_only or not only:
        minilm_table(args.sentences, args.tiny_encoder, args.calib, not args.no_row_mask)


if __name__ == "__main__":
    main()
