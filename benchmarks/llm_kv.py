"""Quantized KV caches on SmolLM2-135M against the float cache, in one run.

For each cache format (float32 and float16 caches, ``int8``, ``fp8``, ``int4`` with
groups of 32 and of 64, each also with its values quantized when written instead of
kept in a window, ``-vq``: ``KVFormat("int4", value_window=False)``; ``-rot`` stores
keys and values Hadamard-rotated, ``KVFormat(..., rotate=True)``, which ``fp8`` does by
default and ``fp8-plain`` does not) on a Shakespeare play (at least 2048 tokens):

- cache bytes at 2048 slots and at the model's context (codes, scales, zero points,
  residual window) against a float16 cache;
- perplexity over ``--tokens`` tokens read through the cache: the first token is the
  prefill, every later one a decode step (``LLM.perplexity(kv_cache=...)``), against
  the float32 cache;
- greedy agreement over ``--new-tokens`` generated tokens after a ``--tokens`` prompt:
  teacher forced (each step fed the float cache's token; the share of steps whose
  argmax equals it) and free running (tokens equal before the first difference);
- decode tokens/s with ``--tokens`` cached tokens (batch 1), best of ``--rounds``
  interleaved rounds, against the float32 and float16 caches.

Run: python benchmarks/llm_kv.py [--tokens 2048] [--new-tokens 256] [--rounds 3]
[--parts bytes,perplexity,greedy,speed] (``--parts speed``: the decode speed only)
[--formats int8,fp8,int4,int4-g64,int4-vq,int4-g64-vq,fp8-plain,int8-rot,int4-rot,
int4-g64-vq-rot]
(the float32 and float16 caches always run; the default leaves out the -rot rows)
[--fp8-headroom 16,256] (extra fp8 perplexity rows with other values of
``jqx.ops.attention.FP8_HEADROOM``, the prefill's headroom; default 64)
[--windows N] (the perplexity section over N windows of ``--tokens`` tokens instead
of one: the start and token 4096 of each play in alphabetical order, each format's
change against the float32 cache on the same window, then their mean, smallest and
largest. One window's change moves by about +-0.5 points with the rounding of a few
values; the mean over windows is the format's loss.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stamp import print_stamp  # noqa: E402

FORMATS = (
    "float32",
    "float16",
    "int8",
    "fp8",
    "fp8-plain",
    "int4",
    "int4-g64",
    "int4-vq",
    "int4-g64-vq",
    "int8-rot",
    "int4-rot",
    "int4-g64-vq-rot",
)
DEFAULT_FORMATS = FORMATS[2:9]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048, help="text / cached tokens (>= 2048)")
    ap.add_argument("--new-tokens", type=int, default=256, help="greedy tokens compared")
    ap.add_argument("--speed-tokens", type=int, default=64, help="decode steps timed")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--play", default="hamlet")
    ap.add_argument("--activations", default="float", choices=("float", "int8"))
    ap.add_argument(
        "--parts",
        default="bytes,perplexity,greedy,speed",
        help="comma-separated sections to run (bytes, perplexity, greedy, speed)",
    )
    ap.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help="comma-separated quantized formats (the float32 and float16 caches always run)",
    )
    ap.add_argument(
        "--fp8-headroom",
        default="",
        help="comma-separated FP8_HEADROOM values for extra fp8 perplexity rows",
    )
    ap.add_argument(
        "--windows",
        type=int,
        default=1,
        help="perplexity over this many windows (play starts and token 4096 of each play)",
    )
    args = ap.parse_args()
    if args.windows < 1:
        ap.error(f"--windows {args.windows}: use 1 (one window of --play) or more")
    if args.windows > 1 and args.fp8_headroom:
        ap.error("--fp8-headroom runs on one window: leave out --windows or set it to 1")
    asked = args.formats.split(",")
    if set(asked) - set(FORMATS):
        ap.error(f"--formats: unknown {sorted(set(asked) - set(FORMATS))}; use {FORMATS[2:]}")
    formats = ("float32", "float16") + tuple(f for f in FORMATS[2:] if f in asked)
    parts = set(args.parts.split(","))
    unknown = parts - {"bytes", "perplexity", "greedy", "speed"}
    if unknown:
        ap.error(f"--parts: unknown {sorted(unknown)}; use bytes, perplexity, greedy, speed")
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    print_stamp()

    import jax
    import jax.numpy as jnp

    import jqx
    from jqx.llm import KVCache, KVFormat
    from jqx_demo.shakespeare import plays

    base = jqx.load_llm(activations=args.activations)
    llms = {
        "float32": base,
        "float16": jqx.llm.LLM(
            base.model,
            base.tokenizer,
            types=base.types,
            source=base.source,
            cache_dtype=jnp.float16,
        ),
    }
    fmt_of = {"float32": None, "float16": None, "int8": "int8", "fp8": "fp8", "int4": "int4"}
    fmt_of["int4-g64"] = KVFormat("int4", group=64)
    fmt_of["int4-vq"] = KVFormat("int4", value_window=False)
    fmt_of["int4-g64-vq"] = KVFormat("int4", group=64, value_window=False)
    fmt_of["fp8-plain"] = KVFormat("fp8", rotate=False)
    fmt_of["int8-rot"] = KVFormat("int8", rotate=True)
    fmt_of["int4-rot"] = KVFormat("int4", rotate=True)
    fmt_of["int4-g64-vq-rot"] = KVFormat("int4", group=64, value_window=False, rotate=True)
    llm_of = {f: llms.get(f, base) for f in FORMATS}
    for f in FORMATS:
        if f.startswith("int4"):
            llm_of[f] = llms["float16"]  # the residual window in float16
    ids = base.tokenizer.encode(plays()[args.play])
    n = args.tokens
    if len(ids) < n + args.new_tokens:
        sys.exit(f"the play has {len(ids)} tokens; need {n + args.new_tokens}")
    text_ids, prompt = ids[:n], ids[:n]
    c = base.config
    print(
        f"\nSmolLM2-135M ({c.n_layers} layers, {c.n_kv_heads} kv heads of {c.head_dim}), "
        f"{args.play}: {n} tokens, activations {args.activations}, "
        f"jax devices {jax.devices()}"
    )

    # ------------------------------------------------------------- bytes
    def nbytes(fmt, dtype, slots):
        return jax.eval_shape(
            lambda: KVCache.init(c, batch=1, max_len=slots, dtype=dtype, format=fmt)
        ).nbytes

    if "bytes" in parts:
        bytes_table(formats, nbytes, llm_of, fmt_of, c.context_length)
    if "perplexity" in parts and args.windows > 1:
        windows_table(formats, llm_of, fmt_of, base, n, args.windows)
    elif "perplexity" in parts:
        ppl = perplexity_table(formats, llm_of, fmt_of, text_ids, n, base)
        if args.fp8_headroom:
            headroom_table(args.fp8_headroom, base, text_ids, n, ppl["float32"])
    if "greedy" in parts:
        greedy_table(formats, args, base, llm_of, fmt_of, prompt, n, c)
    if "speed" in parts:
        speed_table(formats, args, llm_of, fmt_of, prompt, n)


def bytes_table(formats, nbytes, llm_of, fmt_of, context) -> None:
    import jax.numpy as jnp

    slots = (2048, context)
    f16 = [nbytes(None, jnp.float16, s) for s in slots]
    print(
        f"\n## Cache bytes at {slots[0]} slots and at the model's context ({slots[1]}) "
        "(batch 1, all layers; scales included)"
    )
    print(f"| cache | MiB at {slots[0]} | vs float16 | MiB at {slots[1]} | vs float16 |")
    print("|---|---|---|---|---|")
    for f in formats:
        cells = []
        for s, ref in zip(slots, f16, strict=True):
            b = nbytes(fmt_of[f], llm_of[f].cache_dtype, s)
            cells.append(f"{b / 2**20:.2f} | {b / ref:.3f}x")
        note = " (float16 residual)" if f.startswith("int4") else ""
        print(f"| {f}{note} | {' | '.join(cells)} |")


def perplexity_table(formats, llm_of, fmt_of, text_ids, n, base) -> dict[str, float]:
    """Prints the perplexity table and returns each format's perplexity."""
    print(f"\n## Perplexity through the cache, {n} tokens (prefill 1, then decode steps)")
    print("| cache | perplexity | vs float32 cache | seconds |\n|---|---|---|---|")
    ppl = {}
    for f in formats:
        t = time.perf_counter()
        kv = "float" if fmt_of[f] is None else fmt_of[f]
        ppl[f] = llm_of[f].perplexity(text_ids, window=n, kv_cache=kv)
        dt = time.perf_counter() - t
        print(f"| {f} | {ppl[f]:.4f} | {100 * (ppl[f] / ppl['float32'] - 1):+.3f}% | {dt:.0f} |")
    one_pass = base.perplexity(text_ids, window=n)
    print(f"(one pass without a cache: {one_pass:.4f})")
    return ppl


def windows_table(formats, llm_of, fmt_of, base, n, count) -> None:
    """Each format's perplexity change against the float32 cache on ``count`` windows of
    ``n`` tokens (the start and token 4096 of each play, plays in alphabetical order)."""
    from jqx_demo.shakespeare import plays

    windows = []
    for name, text in sorted(plays().items()):
        ids = base.tokenizer.encode(text)
        windows += [(name, o, ids[o : o + n]) for o in (0, 4096) if len(ids) >= o + n]
    if len(windows) < count:
        sys.exit(f"--windows {count}: the plays give {len(windows)} windows of {n} tokens")
    windows = windows[:count]
    print(f"\n## Perplexity through the cache over {count} windows of {n} tokens")
    print("(each window: prefill 1, then decode steps; change against the float32 cache)")
    print("| window | " + " | ".join(formats[1:]) + " |")
    print("|---" * len(formats) + "|")
    change = {f: [] for f in formats[1:]}
    for name, off, ids in windows:
        ref = llm_of["float32"].perplexity(ids, window=n, kv_cache="float")
        for f in formats[1:]:
            kv = "float" if fmt_of[f] is None else fmt_of[f]
            change[f].append(100 * (llm_of[f].perplexity(ids, window=n, kv_cache=kv) / ref - 1))
        cells = " | ".join(f"{change[f][-1]:+.3f}%" for f in formats[1:])
        print(f"| {name} @{off} (float32 {ref:.3f}) | {cells} |", flush=True)
    print("\n| cache | mean change | smallest | largest | windows under +0.5% |")
    print("|---|---|---|---|---|")
    for f in formats[1:]:
        c = np.array(change[f])
        under = int((c <= 0.5).sum())
        print(f"| {f} | {c.mean():+.3f}% | {c.min():+.3f}% | {c.max():+.3f}% | {under}/{count} |")


def headroom_table(values, base, text_ids, n, ref) -> None:
    """fp8 perplexity with other prefill headrooms (each on a fresh LLM, so that its
    decode step is traced with the value set), against the float32 cache's ``ref``."""
    import jqx
    from jqx.ops import attention

    default = attention.FP8_HEADROOM
    print(f"\n## fp8 perplexity by FP8_HEADROOM (default {default:g}), {n} tokens")
    print("| FP8_HEADROOM | perplexity | vs float32 cache |\n|---|---|---|")
    try:
        for h in [float(v) for v in values.split(",")]:
            attention.FP8_HEADROOM = h
            fresh = jqx.llm.LLM(base.model, base.tokenizer, types=base.types, source=base.source)
            ppl = fresh.perplexity(text_ids, window=n, kv_cache="fp8")
            print(f"| {h:g} | {ppl:.4f} | {100 * (ppl / ref - 1):+.3f}% |", flush=True)
    finally:
        attention.FP8_HEADROOM = default


def greedy_table(formats, args, base, llm_of, fmt_of, prompt, n, c) -> None:
    import jax
    import jax.numpy as jnp

    from jqx.llm import KVCache
    from jqx.llm.sampling import Sampling

    m = args.new_tokens
    ref = base.generate(prompt, max_new_tokens=m, stop_at_eos=False).tokens[0]
    print(f"\n## Greedy agreement with the float32 cache over {m} tokens after {n}")
    print("| cache | teacher-forced top-1 | free-running: equal before the first difference |")
    print("|---|---|---|")

    def forced(llm, fmt):
        # the compiled prefill and decode steps that generate() runs, fed ref's tokens
        cache = KVCache.init(c, batch=1, max_len=n + m, dtype=llm.cache_dtype, format=fmt)
        pad = jnp.zeros((1,), jnp.int32)
        key, greedy = jax.random.key(0), Sampling()
        tok, _, cache = llm._prefill(
            llm.params, jnp.asarray([prompt], jnp.int32), pad, cache, key, sampling=greedy
        )
        out = [tok]
        for i in range(m - 1):
            tok, _, cache = llm._decode(
                llm.params,
                jnp.asarray([ref[i]], jnp.int32),
                jnp.int32(n + i),
                pad,
                cache,
                key,
                sampling=greedy,
            )
            out.append(tok)
        return np.asarray(jnp.concatenate(out))

    for f in formats:
        agree = float(np.mean(forced(llm_of[f], fmt_of[f]) == np.asarray(ref)))
        free = (
            llm_of[f]
            .generate(prompt, max_new_tokens=m, stop_at_eos=False, kv_cache=fmt_of[f])
            .tokens[0]
        )
        same = next((i for i, (a, b) in enumerate(zip(free, ref, strict=True)) if a != b), m)
        print(f"| {f} | {100 * agree:.1f}% | {same} of {m} |")


def speed_table(formats, args, llm_of, fmt_of, prompt, n) -> None:
    st = args.speed_tokens
    for f in formats:  # compile outside the timed rounds
        llm_of[f].generate(prompt, max_new_tokens=st, stop_at_eos=False, kv_cache=fmt_of[f])
    res: dict[str, list[float]] = {f: [] for f in formats}
    for _ in range(args.rounds):
        for f in formats:
            g = llm_of[f].generate(prompt, max_new_tokens=st, stop_at_eos=False, kv_cache=fmt_of[f])
            res[f].append(g.decode_tokens_per_s)
    print(
        f"\n## Decode speed with {n} cached tokens (batch 1, {st} new tokens), "
        f"best of {args.rounds} interleaved rounds"
    )
    print("| cache | decode tok/s | vs float32 cache | vs float16 cache |\n|---|---|---|---|")
    best = {f: max(v) for f, v in res.items()}
    for f in formats:
        print(
            f"| {f} | {best[f]:.1f} | {best[f] / best['float32']:.2f}x | "
            f"{best[f] / best['float16']:.2f}x |"
        )


if __name__ == "__main__":
    main()
