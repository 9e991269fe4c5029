"""Attention written softmax-then-einsum, under ``jax.jit`` and under ``jqx.quantized``.

    python benchmarks/attention_order.py                    # all parts at BERT shapes
    python benchmarks/attention_order.py --part bare        # the attention alone
    python benchmarks/attention_order.py --part sdpa        # jax.nn.dot_product_attention
    python benchmarks/attention_order.py --part block --repeats 9
    python benchmarks/attention_order.py --part model --batch 32 --tokens 128

``jqx.quantized`` computes ``softmax(s) @ v`` as ``(exp(s - max) @ v) / sum``
where that is valid (docs/guide/run.md#attention); ``jqx.ops.policy(softmax_reorder=False)``
runs the attention as written. Variants, timed under ``jit`` with one call of each
per round (median wall and process CPU time of ``--repeats`` rounds; these machines
are shared, so only ratios within one run mean anything):

- ``f32``: ``jax.jit(apply)`` on the float variables, as written (the baseline);
- ``f32 reordered``: ``jax.jit(jqx.quantized(apply))`` on the same float variables:
  only the rewrite changes (on CPU the native ``scores_softmax_dot`` kernel computes
  the whole attention from q and k where it is available);
- ``f32 reordered, no scores kernel`` / ``w8a8 ...``: the same with
  ``jqx.ops.policy(scores_kernel=False)``: the scores on XLA, then the native
  ``softmax_dot`` kernel (up to 2^19 scores) or XLA;
- ``f32 reordered, XLA`` / ``w8a8 reordered, XLA``: the same with
  ``jqx.ops.policy(softmax_kernel=False, scores_kernel=False)``: XLA's
  ``(exp(s - max) @ v) / sum``;
- ``w8a8 as written`` / ``w8a8 reordered``: int8 dynamic-activation, int8-weight
  matmuls (``jqx.int8_dynamic_activation_int8_weight()``), rewrite off / on;
- ``w8a8 + int8 attention``: ``activation_matmuls="int8"`` as well (q @ k^T and
  p @ v on per-row int8 codes; opt-in, lossy, computes p as written).

Parts:

- ``bare``: the attention alone (``einsum``, additive padding mask,
  ``jax.nn.softmax``, ``einsum``) on random q, k, v: ``f32``, ``f32 reordered`` and
  ``int8 attention`` (``activation_matmuls="int8"``);
- ``sdpa``: ``jax.nn.dot_product_attention`` alone (no mask, a padding bias, a padding
  ``mask=``, causal, and causal with grouped queries: 8 query heads over 2 and over 1
  key heads; head size 64), the same variants but int8 attention. The kernel skips
  keys masked at either end of every row of its tile (padding ``mask=``, causal), so
  those forms run faster than the unmasked one;
- ``block``: one ``flax.linen.MultiHeadDotProductAttention`` with a padding mask on
  ``(batch, tokens, heads x head_dim)`` activations, at BERT-base (12 x 64), MiniLM
  (12 x 32) and 6 x 64 heads;
- ``kernel``: the native ``softmax_dot`` kernel alone (AVX512 and AVX2 builds, where
  they run) against XLA's ``(exp(s - max) @ v) / sum`` on the same contiguous
  ``(G, Q, K)`` scores and ``(G, K, D)`` values, ``G = batch x 12`` heads, ``D = 32``
  (MiniLM's attention); then the native ``scores_softmax_dot`` kernel against XLA's
  reordered attention from the same ``(b, t, 12, 32)`` q, k, v (scale and padding
  bias included); then the kernel with a causal, a right-padding and a sliding-window
  mask given last, as a ``where`` step or an additive bias of 0 / -1e30 (the keys
  masked at either end of every row of a tile skipped), against the same scores with a
  division by 1 after the bias (the same bits, every key computed);
- ``model``: the ordinary BERT ports of ``jqx_demo.bert`` (``plain``: einsum,
  ``jax.nn.softmax``, einsum; ``linen``: Flax's attention layer; ``sdpa``:
  ``jax.nn.dot_product_attention``) with the
  all-MiniLM-L6-v2 weights (the shipped tiny encoder without them), on random
  token ids with every sequence padded to a different length.

``--kernel-max-scores N`` sets ``jqx.ops.policy(softmax_kernel_max_scores=N)`` for the
whole run: the "reordered" variants then take the native kernel up to N scores per call
(default: the policy's, 2^19), so the kernel and XLA's reorder can be compared at any
batch.

Beside the times: each variant's max |difference| from ``f32`` and from its
as-written twin (``f32`` for ``f32 reordered``, ``w8a8 as written`` for the other
two): the rewrite's rounding, or the quantization error.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _stamp import print_stamp  # noqa: E402

import jqx  # noqa: E402

W8A8 = jqx.int8_dynamic_activation_int8_weight()
AS_WRITTEN = {"softmax_reorder": False}
# Reordered on XLA, on neither native kernel; and without the scores kernel (the scores
# on XLA, then softmax_dot's size rule: its kernel up to 2^19 scores, else XLA).
XLA_REORDER = {"softmax_kernel": False, "scores_kernel": False}
NO_SCORES = {"scores_kernel": False}


def _compiled(fn, args, **policy):
    """``jax.jit(fn)`` traced (and compiled) inside ``jqx.ops.policy(**policy)``: the
    policy is read while tracing, so the jitted function keeps that choice."""
    f = jax.jit(fn)
    ctx = jqx.ops.policy(**policy) if policy else contextlib.nullcontext()
    with ctx:
        out = jax.block_until_ready(f(*args))
    return f, out


def _round_robin(fns: dict, reps: int) -> dict:
    """name -> (median wall s, median CPU s); one call of each per round."""
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for k, (f, a) in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(f(*a))
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def _variants(apply, variables, args) -> tuple[dict, dict]:
    """The five variants of the module docstring: name -> (jitted fn, args), and
    name -> (max |output - f32|, max |output - its as-written twin| or None)."""
    qvars = jqx.quantize(variables, W8A8)
    q = jqx.quantized(apply)
    q8 = jqx.quantized(apply, activation_matmuls="int8")
    f32, y32 = _compiled(apply, (variables, *args))
    f32r, y32r = _compiled(q, (variables, *args))
    wq, yq = _compiled(q, (qvars, *args), **AS_WRITTEN)
    wqr, yqr = _compiled(jqx.quantized(apply), (qvars, *args))
    f32x, y32x = _compiled(jqx.quantized(apply), (variables, *args), **XLA_REORDER)
    wqx, yqx = _compiled(jqx.quantized(apply), (qvars, *args), **XLA_REORDER)
    f32n, y32n = _compiled(jqx.quantized(apply), (variables, *args), **NO_SCORES)
    wqn, yqn = _compiled(jqx.quantized(apply), (qvars, *args), **NO_SCORES)
    w8, y8 = _compiled(q8, (qvars, *args))

    def diff(a, b):
        return max(
            float(jnp.max(jnp.abs(x - y)))
            for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True)
        )

    fns = {
        "f32": (f32, (variables, *args)),
        "f32 reordered": (f32r, (variables, *args)),
        "f32 reordered, no scores kernel": (f32n, (variables, *args)),
        "f32 reordered, XLA": (f32x, (variables, *args)),
        "w8a8 as written": (wq, (qvars, *args)),
        "w8a8 reordered": (wqr, (qvars, *args)),
        "w8a8 reordered, no scores kernel": (wqn, (qvars, *args)),
        "w8a8 reordered, XLA": (wqx, (qvars, *args)),
        "w8a8 + int8 attention": (w8, (qvars, *args)),
    }
    outs = {
        "f32": y32,
        "f32 reordered": y32r,
        "f32 reordered, no scores kernel": y32n,
        "f32 reordered, XLA": y32x,
        "w8a8 as written": yq,
        "w8a8 reordered": yqr,
        "w8a8 reordered, no scores kernel": yqn,
        "w8a8 reordered, XLA": yqx,
        "w8a8 + int8 attention": y8,
    }
    twins = {
        "f32 reordered": y32,
        "f32 reordered, no scores kernel": y32,
        "f32 reordered, XLA": y32,
        "w8a8 reordered": yq,
        "w8a8 reordered, no scores kernel": yq,
        "w8a8 reordered, XLA": yq,
        "w8a8 + int8 attention": yq,
    }
    diffs = {k: (diff(y, y32), diff(y, twins[k]) if k in twins else None) for k, y in outs.items()}
    return fns, diffs


def _print(res: dict, diffs: dict, base: str = "f32") -> None:
    bw, bc = res[base]
    print(
        f"  {'variant':32s} {'wall ms':>9s} {'/ f32':>6s} {'cpu ms':>9s} {'/ f32':>6s}"
        f"  {'max|d| f32':>10s}  {'max|d| as written':>17s}"
    )
    for k, (w, c) in res.items():
        d32, dtw = diffs[k]
        d = f"{d32:10.2e}  {dtw:17.2e}" if dtw is not None else f"{d32:10.2e}"
        print(f"  {k:32s} {1e3 * w:9.1f} {w / bw:6.2f} {1e3 * c:9.1f} {c / bc:6.2f}  {d}")


def _lengths(batch: int, tokens: int) -> np.ndarray:
    return np.linspace(tokens // 4, tokens, batch).astype(np.int32)


def _attention(q, k, v, bias):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(q.shape[-1])) + bias
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _alone(fn, args, title: str, reps: int, int8: bool = True) -> None:
    """One attention function alone: as written, reordered (the kernels), without the
    scores kernel, on XLA, and (``int8``) with int8 attention products."""
    f32, y32 = _compiled(fn, args)
    variants = {
        "f32 reordered": _compiled(jqx.quantized(fn), args),
        "f32 reordered, no scores kernel": _compiled(jqx.quantized(fn), args, **NO_SCORES),
        "f32 reordered, XLA": _compiled(jqx.quantized(fn), args, **XLA_REORDER),
    }
    if int8:
        variants["int8 attention"] = _compiled(jqx.quantized(fn, activation_matmuls="int8"), args)
    print(f"\n== {title}")
    fns = {"f32": (f32, args), **{name: (f, args) for name, (f, _) in variants.items()}}
    d = {"f32": (0.0, None)}
    for name, (_, y) in variants.items():
        d[name] = (float(jnp.max(jnp.abs(y - y32))), None)
    _print(_round_robin(fns, reps), d)


def part_bare(batch: int, tokens: int, reps: int) -> None:
    r = np.random.default_rng(2)
    valid = np.arange(tokens)[None] < _lengths(batch, tokens)[:, None]
    bias = jnp.asarray(np.where(valid, 0.0, np.finfo(np.float32).min)[:, None, None, :])
    for heads, hd in ((12, 64), (12, 32), (6, 64)):
        q, k, v = (
            jnp.asarray(r.standard_normal((batch, tokens, heads, hd)), jnp.float32)
            for _ in range(3)
        )
        _alone(
            _attention,
            (q, k, v, bias),
            f"einsum, jax.nn.softmax, einsum alone: batch {batch} x {tokens} tokens, "
            f"{heads} heads x {hd}, additive padding mask",
            reps,
        )


def part_sdpa(batch: int, tokens: int, reps: int) -> None:
    """``jax.nn.dot_product_attention`` alone: no mask, a padding bias, a padding mask
    (``mask=``: the kernel skips each sequence's padded keys), causal (the kernel skips
    the keys past the diagonal), and grouped queries (8 query heads over 2 and over 1
    key heads), head size 64. Sequence lengths spread from a quarter of ``tokens`` to
    all of it."""
    r = np.random.default_rng(3)
    valid = np.arange(tokens)[None] < _lengths(batch, tokens)[:, None]
    bias = jnp.asarray(np.where(valid, 0.0, np.finfo(np.float32).min)[:, None, None, :])
    q = jnp.asarray(r.standard_normal((batch, tokens, 8, 64)), jnp.float32)
    kv = [jnp.asarray(r.standard_normal((batch, tokens, 8, 64)), jnp.float32) for _ in "kv"]
    mask = jnp.asarray(valid[:, None, None, :])
    forms = (
        (
            "no mask, 8 heads",
            8,
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
        ),
        (
            "padding bias, 8 heads",
            8,
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=bias),
        ),
        (
            "padding mask (mask=), 8 heads",
            8,
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask),
        ),
        (
            "causal, 8 heads",
            8,
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
        ),
        (
            "causal, 8 query heads over 2 key heads",
            2,
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
        ),
        (
            "causal, 8 query heads over 1 key head",
            1,
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
        ),
    )
    for title, heads, fn in forms:
        args = (q, kv[0][:, :, :heads], kv[1][:, :, :heads])
        _alone(
            fn,
            args,
            f"jax.nn.dot_product_attention alone: batch {batch} x {tokens} tokens, {title}",
            reps,
            int8=False,
        )


def _print_vs_xla(fns: dict, res: dict, base: str, y_xla, view=lambda y: y) -> None:
    """Each variant's median times against ``base``'s and its max |difference| from
    ``y_xla`` (``view`` puts its output in ``y_xla``'s layout)."""
    bw, bc = res[base]
    print(
        f"  {'variant':24s} {'wall ms':>9s} {'/ xla':>6s} {'cpu ms':>9s} {'/ xla':>6s}  max|d| xla"
    )
    for name, (f, a) in fns.items():
        w, c = res[name]
        d = float(jnp.max(jnp.abs(view(f(*a)) - y_xla)))
        print(f"  {name:24s} {1e3 * w:9.3f} {w / bw:6.2f} {1e3 * c:9.3f} {c / bc:6.2f}  {d:10.2e}")


def part_kernel(batch: int, tokens: int, reps: int) -> None:
    from jqx.kernels.cpu import native

    r = np.random.default_rng(3)
    g = batch * 12
    x = jnp.asarray(r.standard_normal((g, tokens, tokens)).astype(np.float32) * 3)
    v = jnp.asarray(r.standard_normal((g, tokens, 32)), jnp.float32)
    y_xla = native.softmax_dot_reference(x, v)
    fns = {"xla softmax(s) @ v": (jax.jit(native.softmax_dot_reference), (x, v))}
    for isa, ok in (("avx512", native.available()), ("avx2", native.gguf_available())):
        if ok:
            fns[f"kernel, {isa}"] = (
                jax.jit(functools.partial(native.softmax_dot, isa=isa)),
                (x, v),
            )
    print(
        f"\n== softmax(x) @ v alone: G = {g} (batch {batch} x 12 heads), Q = K = {tokens}, D = 32"
    )
    _print_vs_xla(fns, _round_robin(fns, reps), "xla softmax(s) @ v", y_xla)

    # The whole attention from (b, t, h, d) q, k, v: XLA's reordered formula (what
    # jqx.quantized runs without the kernels) against the scores kernel.
    q, k, v = (
        jnp.asarray(r.standard_normal((batch, tokens, 12, 32)), jnp.float32) for _ in range(3)
    )
    valid = np.arange(tokens)[None] < _lengths(batch, tokens)[:, None]
    bias = jnp.asarray(np.where(valid, 0.0, np.finfo(np.float32).min)[:, None, None, :])
    scale = jnp.float32(np.sqrt(32.0))
    ax = (0, 2, 1, 3)

    def xla_attention(q, k, v, bias):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / scale + bias
        e = jnp.exp(s - jnp.max(s, -1, keepdims=True))
        y = jnp.einsum("bhqk,bkhd->bqhd", e, v)
        return y / jnp.sum(e, -1).transpose(0, 2, 1)[..., None]

    args = (q, k, v, bias)
    y_xla = jax.jit(xla_attention)(*args).transpose(0, 2, 1, 3)
    fns = {"xla reordered attention": (jax.jit(xla_attention), args)}
    for isa, ok in (("avx512", native.available()), ("avx2", native.gguf_available())):
        if ok:
            fns[f"scores kernel, {isa}"] = (
                jax.jit(
                    lambda q, k, v, b, isa=isa: native.scores_softmax_dot(
                        q, k, v, ax, ax, ax, steps=("div", "add"), scale=scale, bias=b, isa=isa
                    ).transpose(0, 2, 1, 3)
                ),
                args,
            )
    print(
        f"\n== attention from q, k, v (b, t, h, d) alone: batch {batch}, {tokens} tokens, "
        "12 heads x 32, scale and padding bias"
    )
    _print_vs_xla(
        fns,
        _round_robin(fns, reps),
        "xla reordered attention",
        y_xla,
        lambda y: y.transpose(0, 2, 1, 3),
    )

    # Masked keys skipped: the mask as the last step, a where or an additive bias of 0 /
    # -1e30 (the kernel skips the keys masked at either end of every row of a tile),
    # against the same scores with a division by 1 after the bias (the same bits; every
    # key computed): causal, right padding, and a causal sliding window of tokens / 8
    # keys. q is scaled beforehand.
    causal = np.tri(tokens, tokens, 0, dtype=bool)[None, None]
    window = causal & ~np.tri(tokens, tokens, -max(tokens // 8, 1), dtype=bool)[None, None]
    masks = {"causal": causal, "padding": valid[:, None, None, :], "window": window}
    qs = q / scale
    one = jnp.float32(1.0)
    for isa, ok in (("avx512", native.available()), ("avx2", native.gguf_available())):
        if not ok:
            continue
        fns = {}
        for name, m in masks.items():
            bias_m = jnp.asarray(np.where(m, 0.0, -1e30).astype(np.float32))
            kernel = functools.partial(native.scores_softmax_dot, isa=isa)
            fns[f"{name} whole"] = (
                jax.jit(
                    lambda q, k, v, b, f=kernel: f(
                        q, k, v, ax, ax, ax, steps=("add", "div"), scale=one, bias=b
                    )
                ),
                (qs, k, v, bias_m),
            )
            fns[f"{name} where"] = (
                jax.jit(
                    lambda q, k, v, m, f=kernel: f(
                        q, k, v, ax, ax, ax, steps=("where",), mask=m, fill=-1e30
                    )
                ),
                (qs, k, v, jnp.asarray(m)),
            )
            fns[f"{name} additive"] = (
                jax.jit(
                    lambda q, k, v, b, f=kernel: f(q, k, v, ax, ax, ax, steps=("add",), bias=b)
                ),
                (qs, k, v, bias_m),
            )
        res = _round_robin(fns, reps)
        print(
            f"\n== scores kernel ({isa}) with masked keys: batch {batch}, {tokens} tokens, "
            f"12 heads x 32 (padding lengths {_lengths(batch, tokens).min()}..{tokens}); "
            "median ms, and / whole"
        )
        for name in masks:
            (w0, c0), (w1, c1), (w2, c2) = (
                res[f"{name} {x}"] for x in ("whole", "where", "additive")
            )
            print(
                f"  {name:8s} whole {1e3 * w0:7.2f}   where {1e3 * w1:7.2f} ({w1 / w0:4.2f}, "
                f"cpu {c1 / c0:4.2f})   additive {1e3 * w2:7.2f} ({w2 / w0:4.2f}, cpu {c2 / c0:4.2f})"
            )


def _masked(m: nn.Module, variables, x, mask):
    return m.apply(variables, x, mask=mask)


def part_block(batch: int, tokens: int, reps: int) -> None:
    r = np.random.default_rng(0)
    valid = (np.arange(tokens)[None] < _lengths(batch, tokens)[:, None]).astype(np.float32)
    mask = nn.make_attention_mask(jnp.ones((batch, tokens)), jnp.asarray(valid))
    for heads, hd in ((12, 64), (12, 32), (6, 64)):
        width = heads * hd
        m = nn.MultiHeadDotProductAttention(
            num_heads=heads, qkv_features=width, out_features=width, deterministic=True
        )
        x = jnp.asarray(r.standard_normal((batch, tokens, width)), jnp.float32)
        variables = m.init(jax.random.key(0), x[:1], mask=mask[:1])
        print(
            f"\n== flax.linen MultiHeadDotProductAttention, batch {batch} x {tokens} tokens, "
            f"{heads} heads x {hd} (width {width}), padding mask"
        )
        fns, diffs = _variants(functools.partial(_masked, m), variables, (x, mask))
        _print(_round_robin(fns, reps), diffs)


def part_model(batch: int, tokens: int, reps: int) -> None:
    try:
        from jqx_demo import bert, minilm
    except ImportError as e:
        print(f"\n== model: skipped, jqx_demo.bert is not importable ({e})")
        return
    enc = minilm.load_default()
    r = np.random.default_rng(1)
    lengths = _lengths(batch, tokens)
    ids = r.integers(1000, enc.config.vocab_size, (batch, tokens)).astype(np.int32)
    attn = (np.arange(tokens)[None] < lengths[:, None]).astype(np.int32)
    ids = jnp.asarray(np.where(attn > 0, ids, 0))
    attn = jnp.asarray(attn)
    for port in bert.PORTS:
        e = bert.load_port(port, enc)
        print(
            f"\n== {e.name}: whole encoder, batch {batch} x {tokens} tokens "
            f"(lengths {lengths.min()}..{lengths.max()})"
        )
        fns, diffs = _variants(e.module.apply, e.variables, (ids, attn))
        _print(_round_robin(fns, reps), diffs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--part", choices=("all", "bare", "sdpa", "kernel", "block", "model"), default="all"
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--kernel-max-scores",
        type=float,
        default=None,
        help="jqx.ops.policy(softmax_kernel_max_scores=N) for the run (default: the policy's)",
    )
    a = ap.parse_args(argv)
    if a.kernel_max_scores is not None:
        n = int(a.kernel_max_scores)
        ctx = jqx.ops.policy(softmax_kernel_max_scores=n)
        ctx.__enter__()  # for the whole run: every variant is traced inside it
        print(f"jqx.ops.policy(softmax_kernel_max_scores={n})")
    print_stamp()
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    if a.part in ("all", "bare"):
        part_bare(a.batch, a.tokens, a.repeats)
    if a.part in ("all", "sdpa"):
        part_sdpa(a.batch, a.tokens, a.repeats)
    if a.part in ("all", "kernel"):
        part_kernel(a.batch, a.tokens, a.repeats)
    if a.part in ("all", "block"):
        part_block(a.batch, a.tokens, a.repeats)
    if a.part in ("all", "model"):
        part_model(a.batch, a.tokens, a.repeats)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
