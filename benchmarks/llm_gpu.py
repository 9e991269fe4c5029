"""Decode speed of jqx's Llama runtime on one GPU: bf16, int8 and int4 weights, XLA and Pallas.

Builds a Llama model with random weights in the shapes of a real one (``--config``:
SmolLM2-135M, Llama-3.2-1B or Llama-3.1-8B; no download), created on the device in
bfloat16 and scaled like a trained model's (normal / sqrt(fan_in), the embedding too).
The query/key/value and gate/up weights are fused as ``jqx.load_llm`` fuses them. Each
weight format then runs through ``jqx.llm.forward`` with a KV cache, as
``LLM.generate`` runs it (float32 activations): one jitted prefill of ``--prompt-len``
tokens (``--prefill steps``: the prompt through the decode step, token by token, which
saves compiling a prefill per format), then ``--steps`` calls of one jitted decode
step. Both are compiled ahead of time (their seconds are printed apart); a warm-up pass
runs first, then ``--reps`` timed passes, each between ``jax.block_until_ready``
calls. Every format decodes the same tokens, the reference's (bf16's) greedy
continuation fed step by step, so the work is the same and each step's greedy
agreement is defined.

Formats (``--formats``, comma separated). Every matmul weight of the blocks, and the
output projection when it is not tied, is quantized; the embedding (and so a tied
output projection) stays bf16, as ``LLM.quantize`` leaves it:

- ``bf16``: bfloat16 weights, no quantization.
- ``int8``: int8 weight-only, one scale per output channel (XLA).
- ``int4-xla``: int4 weight-only (uint4 codes, a scale and zero point per group of 128
  inputs; 64 for SmolLM2, whose width 576 is not a multiple of 128) through XLA,
  stored ``(out, in)`` as the runtime stores every weight.
- ``int4-pallas``: the same codes and scales stored ``(in, out)`` and run by the Pallas
  W4A16 kernel. The runtime's matmuls pass no ``backend=``, and its ``(out, in)``
  weights are not a layout the kernel takes (it reads ``x (M, K) . W (K, N)``), so
  this format runs the runtime's forward under ``jqx.quantized(..., backend="pallas")``
  with the weights transposed back inside the function (the interpreter folds the
  transpose into the product). The per-format line counts the kernel's Triton calls
  in the lowered decode step (one per block matmul on a GPU; 0 in interpret mode).
- ``int4-xla-kn`` (not in the default list): the ``(in, out)`` storage of int4-pallas
  through ``jqx.quantized(..., backend="xla")``, to tell the kernel from the layout.

Every format runs under ``jqx.ops.policy(pallas_table={}, native_available=False,
softmax_reorder=False)``: XLA wherever a format does not ask for Pallas, whatever the
measured table says (on CPU: no native kernels), and attention as written.

Columns: weight bytes (``jqx.tree_nbytes`` of all parameters: packed codes, scales,
zero points, the bf16 embedding, the norms), the matmul implementation
``jqx.ops.explain`` names for the decode step's weights, compile seconds (prefill +
step, each traced, lowered and compiled), prefill ms, decode ms per token (a pass's
decode time over its steps, median of the passes) and tokens/s (batch total),
speed-up against bf16 in the same run, the largest absolute difference of the last
step's logits from bf16's, and in how many steps the greedy token equals bf16's.
``--json PATH`` rewrites the rows after each format, so a run stopped by a time limit
keeps what it measured.

Off a GPU (or with ``--smoke``) it runs a tiny model for a few steps, the Pallas kernel
in interpret mode: a check of the script, not a measurement.

Usage:
    python benchmarks/llm_gpu.py --config llama-1b --json llm_gpu_1b.json
    python benchmarks/llm_gpu.py --config llama-1b --prefill steps   # less to compile
    python benchmarks/llm_gpu.py --config llama-8b --formats bf16,int4-xla,int4-pallas
    python benchmarks/llm_gpu.py --config smollm2-135m --formats bf16,int4-xla,int4-pallas
    python benchmarks/llm_gpu.py --smoke               # tiny model on CPU, about 20 s
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jqx
from jqx.core.qarray import QArray, is_qarray
from jqx.llm import KVCache, Llama, LlamaConfig, forward
from jqx.llm.model import fuse_projections
from jqx.llm.ptq import transpose_qarray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stamp import print_stamp  # noqa: E402

# Shapes of the real models (RoPE scaling and other details that do not change the
# work of a decode step are left out).
CONFIGS: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        hidden_dim=1536,
        rope_base=100000.0,
        context_length=8192,
        tied_embedding=True,
    ),
    "llama-1b": LlamaConfig(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=8192,
        rope_base=500000.0,
        context_length=131072,
        tied_embedding=True,
    ),
    "llama-8b": LlamaConfig(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=14336,
        rope_base=500000.0,
        context_length=131072,
        tied_embedding=False,
    ),
    # --smoke: every input width a multiple of 128, so the int4 g128 weights reach the
    # Pallas kernel (interpreted off GPU)
    "tiny": LlamaConfig(
        vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256
    ),
}

# SmolLM2's width 576 is 4.5 groups of 128: its int4 formats use groups of 64.
DEFAULT_GROUP = {"smollm2-135m": 64}


@dataclasses.dataclass(frozen=True)
class Format:
    """A weight format and how its decode step runs.

    Attributes:
      name: the ``--formats`` name.
      bits: 16 (no quantization), 8 or 4.
      layout: ``"nk"``: matmul weights stored ``(out, in)`` and run by the runtime as
        it is; ``"kn"``: stored ``(in, out)``, run under ``jqx.quantized``.
      backend: the ``jqx.ops`` backend of its quantized matmuls.
      label: what the table says.
    """

    name: str
    bits: int
    layout: str
    backend: str
    label: str


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("bf16", 16, "nk", "xla", "bf16"),
        Format("int8", 8, "nk", "xla", "int8 weight-only, XLA"),
        Format("int4-xla", 4, "nk", "xla", "int4 g{g} weight-only, XLA"),
        Format("int4-pallas", 4, "kn", "pallas", "int4 g{g} weight-only, Pallas W4A16"),
        Format("int4-xla-kn", 4, "kn", "xla", "int4 g{g} weight-only, XLA, (in, out)"),
    )
}
DEFAULT_FORMATS = ("bf16", "int8", "int4-xla", "int4-pallas")

# The custom call a Pallas kernel lowers to on a CUDA GPU (Triton); counted in the
# decode step's lowered program, to show that the kernel, not XLA, ran.
TRITON_CALL = "xla.gpu.triton"


# --------------------------------------------------------------------------- arguments


def _positive(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < 1:
            raise argparse.ArgumentTypeError(f"{name}={text!r} must be a positive integer.")
        return v

    return parse


def _formats(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if not names or unknown:
        what = "unknown " + ", ".join(map(repr, unknown)) if unknown else "no format"
        raise argparse.ArgumentTypeError(
            f"--formats={text!r}: {what}; give a comma-separated list of {', '.join(FORMATS)}."
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--formats={text!r} names a format twice.")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=[c for c in CONFIGS if c != "tiny"], default="llama-1b")
    ap.add_argument(
        "--formats",
        type=_formats,
        default=list(DEFAULT_FORMATS),
        help=f"comma separated, of {', '.join(FORMATS)} (default: {','.join(DEFAULT_FORMATS)})",
    )
    ap.add_argument("--steps", type=_positive("--steps"), default=None, help="decode steps (64)")
    ap.add_argument(
        "--prompt-len", type=_positive("--prompt-len"), default=None, help="prefill tokens (128)"
    )
    ap.add_argument("--reps", type=_positive("--reps"), default=None, help="timed passes (5)")
    ap.add_argument("--batch", type=_positive("--batch"), default=1, help="sequences")
    ap.add_argument(
        "--group-size",
        type=_positive("--group-size"),
        default=None,
        help="int4 group size (default 128; 64 for smollm2-135m)",
    )
    ap.add_argument("--cache-dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument(
        "--prefill",
        choices=("block", "steps"),
        default="block",
        help="block: one jitted prefill call (compiled per format); steps: the prompt "
        "through the decode step, one token per call (no prefill to compile)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the rows here after each format")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, few steps (automatic off a GPU): checks the script",
    )
    a = ap.parse_args(argv)
    if not a.smoke and jax.default_backend() != "gpu":
        print(f"no GPU (jax backend {jax.default_backend()!r}): running --smoke")
    a.smoke = a.smoke or jax.default_backend() != "gpu"
    small = {"steps": 4, "prompt_len": 16, "reps": 2} if a.smoke else {}
    for name, full in (("steps", 64), ("prompt_len", 128), ("reps", 5)):
        if getattr(a, name) is None:
            setattr(a, name, small.get(name, full))
    a.config_name = "tiny" if a.smoke else a.config
    if a.group_size is None:
        a.group_size = DEFAULT_GROUP.get(a.config_name, 128)
    return a


def _check_group(cfg: LlamaConfig, group: int, formats: Sequence[str], config_name: str) -> None:
    """int4 groups run along each weight's input width: every width must divide."""
    if not any(FORMATS[f].bits == 4 for f in formats):
        return
    widths = {"dim": cfg.dim, "n_heads * head_dim": cfg.n_heads * cfg.head_dim}
    widths["hidden_dim"] = cfg.hidden_dim
    bad = {k: v for k, v in widths.items() if v % group}
    if bad:
        fits = [g for g in (256, 128, 64, 32, 16) if all(v % g == 0 for v in widths.values())]
        raise ValueError(
            f"--group-size={group} does not divide the input widths "
            f"{', '.join(f'{k}={v}' for k, v in bad.items())} of --config {config_name}; "
            f"use --group-size {fits[0] if fits else 'N'} (a divisor of every width)."
        )


# --------------------------------------------------------------------------- model


def _is_matmul(path: str, leaf) -> bool:
    """A weight the formats quantize: 2-D, not the embedding (a tied output projection
    stays the bf16 embedding)."""
    return getattr(leaf, "ndim", 0) == 2 and path != "embed"


@functools.partial(jax.jit, static_argnums=(1,))
def _normal_bf16(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return jax.random.normal(key, shape, jnp.bfloat16) * (1.0 / math.sqrt(shape[1]))


def build_model(cfg: LlamaConfig, seed: int) -> tuple[Any, Any]:
    """``(graphdef, state)`` of a fused Llama with random bf16 weights made on the device:
    every 2-D weight ``(out, in)`` (the embedding ``(vocab, dim)`` too) is
    normal / sqrt(in); the norms are ones (float32)."""
    graphdef, shapes = nnx.split(Llama(cfg, rngs=None))
    key = jax.random.key(seed)
    counter = iter(range(1 << 30))

    def make(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return _normal_bf16(jax.random.fold_in(key, next(counter)), tuple(leaf.shape))
        return leaf

    state = jax.tree.map(make, shapes)
    model = fuse_projections(nnx.merge(graphdef, state))  # as jqx.load_llm does
    return nnx.split(model)


def _quantizer(fmt: Format, group: int) -> Callable[[jax.Array], QArray]:
    """bf16 ``(out, in)`` weight -> QArray in the format's layout (one jit, traced once
    per weight shape). Groups and channels are those of the ``(in, out)`` kernel, as
    ``LLM.quantize`` has them; the ``(out, in)`` layout is the same codes transposed."""
    recipe = jqx.int8_weight_only() if fmt.bits == 8 else jqx.int4_weight_only(group_size=group)
    if fmt.layout == "nk":
        return jax.jit(lambda w: transpose_qarray(recipe.quantize_weight(w.T)))
    return jax.jit(lambda w: recipe.quantize_weight(w.T))


def format_params(state, fmt: Format, group: int):
    """The model's parameters in ``fmt`` (the bf16 state itself for bf16)."""
    if fmt.bits == 16:
        return state
    q = _quantizer(fmt, group)
    return jax.tree_util.tree_map_with_path(
        lambda p, w: q(w) if _is_matmul(jqx.path_str(p), w) else w, state
    )


def _nk_view(state):
    """``(in, out)`` matmul weights seen as the runtime's ``(out, in)`` (inside
    ``jqx.quantized`` the transpose is a view the interpreter folds into the product)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, w: w.T if _is_matmul(jqx.path_str(p), w) else w, state
    )


def step_functions(graphdef, fmt: Format) -> tuple[Callable, Callable]:
    """``(prefill, step)``: ``prefill(params, tokens, pad, cache)`` and
    ``step(params, tok, t, pad, cache)``, each returning ``(greedy token, logits of the
    last position, cache)``."""

    def prefill(params, tokens, pad, cache):
        model = nnx.merge(graphdef, _nk_view(params) if fmt.layout == "kn" else params)
        logits, cache = forward(model, tokens, cache, start=0, pad=pad, logits="last")
        return jnp.argmax(logits, -1).astype(jnp.int32), logits, cache

    def step(params, tok, t, pad, cache):
        model = nnx.merge(graphdef, _nk_view(params) if fmt.layout == "kn" else params)
        logits, cache = forward(model, tok[:, None], cache, start=t, pad=pad, logits="last")
        return jnp.argmax(logits, -1).astype(jnp.int32), logits, cache

    if fmt.layout == "kn":
        return (
            jqx.quantized(prefill, backend=fmt.backend),
            jqx.quantized(step, backend=fmt.backend),
        )
    return prefill, step


def _policy():
    """XLA unless a format asks for Pallas explicitly; attention as written."""
    return jqx.ops.policy(pallas_table={}, native_available=False, softmax_reorder=False)


def implementations(params, fmt: Format, rows: int) -> str:
    """What ``jqx.ops`` runs for the decode step's matmul weights, e.g.
    ``pallas.w4a16 x64``; float weights are ``lax.dot_general``."""
    counts: collections.Counter[str] = collections.Counter()
    dn = (((1,), (0,)), ((), ())) if fmt.layout == "kn" else (((1,), (1,)), ((), ()))
    with _policy():
        for path, w in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
            if not _is_matmul(jqx.path_str(path), w):
                continue
            if not is_qarray(w):
                counts["lax.dot_general"] += 1
                continue
            k = w.shape[0] if fmt.layout == "kn" else w.shape[1]
            x = jax.ShapeDtypeStruct((rows, k), jnp.float32)
            counts[jqx.ops.explain(x, w, dn, backend=fmt.backend)] += 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class Compiled:
    prefill: Any
    step: Any
    prefill_s: float
    step_s: float
    kernel_calls: int  # Pallas (Triton) custom calls in the lowered decode step; 0 off GPU


def compile_steps(
    graphdef, fmt: Format, params, prompt, pad, cache, *, block_prefill: bool = True
) -> Compiled:
    """Both functions traced, lowered and compiled ahead of time (cache donated); with
    ``block_prefill=False`` only the step (the prompt then goes through it token by
    token)."""
    prefill_fn, step_fn = step_functions(graphdef, fmt)
    tok = jnp.zeros((prompt.shape[0],), jnp.int32)
    with _policy():
        t0 = time.perf_counter()
        prefill = None
        if block_prefill:
            prefill = jax.jit(prefill_fn, donate_argnums=3).lower(params, prompt, pad, cache)
            prefill = prefill.compile()
        t1 = time.perf_counter()
        lowered = jax.jit(step_fn, donate_argnums=4).lower(params, tok, jnp.int32(0), pad, cache)
        step = lowered.compile()
        t2 = time.perf_counter()
    calls = lowered.as_text().count(TRITON_CALL)
    return Compiled(prefill, step, t1 - t0, t2 - t1, calls)


@dataclasses.dataclass
class Pass:
    prefill_s: float
    decode_s: float
    prefill_token: np.ndarray  # (batch,)
    tokens: np.ndarray  # (steps, batch): each step's greedy token
    last_logits: np.ndarray  # (batch, vocab), float32


@dataclasses.dataclass
class Inputs:
    """Device arrays made before any timed region."""

    prompt: jax.Array  # (batch, prompt_len) int32
    pad: jax.Array  # (batch,) int32 zeros
    prompt_columns: list[jax.Array]  # prompt[:, i] and its slot i, for a prefill
    prompt_slots: list[jax.Array]  # through the decode step
    positions: list[jax.Array]  # the decode steps' slots


def run_pass(c: Compiled, params, x: Inputs, new_cache, feed) -> Pass:
    """One prefill and ``len(x.positions)`` decode steps. ``feed``: the token each step
    reads (device arrays), or None to feed each step's own greedy token."""
    cache = new_cache()
    jax.block_until_ready((params, cache))
    pad, positions = x.pad, x.positions
    t0 = time.perf_counter()
    if c.prefill is not None:
        tok, logits, cache = c.prefill(params, x.prompt, pad, cache)
    else:
        for col, t in zip(x.prompt_columns, x.prompt_slots, strict=True):
            tok, logits, cache = c.step(params, col, t, pad, cache)
    jax.block_until_ready(tok)
    t1 = time.perf_counter()
    first, toks = tok, []
    for i, t in enumerate(positions):
        tok, logits, cache = c.step(params, tok if feed is None else feed[i], t, pad, cache)
        toks.append(tok)
    jax.block_until_ready((toks, logits, cache))
    t2 = time.perf_counter()
    return Pass(
        prefill_s=t1 - t0,
        decode_s=(t2 - t1) / len(positions),
        prefill_token=np.asarray(first),
        tokens=np.stack([np.asarray(x) for x in toks]),
        last_logits=np.asarray(logits, np.float32),
    )


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def print_table(rows: list[dict], ref: str) -> None:
    print(
        f"\n| format | weights | matmuls (decode) | compile s (prefill+step) | prefill ms | "
        f"ms/token | tokens/s | speed-up vs {ref} | max abs logit diff vs {ref} | "
        f"greedy = {ref} |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['label']} | {_mib(r['weight_bytes'])} | {r['matmuls']} | "
            f"{r['compile_prefill_s']:.1f}+{r['compile_step_s']:.1f} | {r['prefill_ms']:.2f} | "
            f"{r['ms_per_token']:.3f} | {r['tokens_per_s']:.1f} | {r['speedup_vs_ref']:.2f}x | "
            f"{r['max_abs_logit_diff']:.4g} | {r['greedy_agree']}/{r['greedy_total']} |"
        )


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; returns ``{"rows": [...], "last_logits": {format: array},
    "reference": name, ...}`` (the rows are what ``--json`` writes)."""
    started = time.perf_counter()
    a = parse_args(argv)
    cfg = CONFIGS[a.config_name]
    _check_group(cfg, a.group_size, a.formats, a.config_name)
    need = a.prompt_len + a.steps
    if need > cfg.context_length:
        raise ValueError(
            f"--prompt-len {a.prompt_len} + --steps {a.steps} = {need} exceeds the context of "
            f"{cfg.context_length} tokens of {a.config_name}; lower one of them."
        )
    stamp = print_stamp()
    dev = jax.devices()[0]
    ref = "bf16" if "bf16" in a.formats else a.formats[0]
    formats = [ref] + [f for f in a.formats if f != ref]
    print(
        f"jax {jax.__version__}, {jax.default_backend()}: {dev.device_kind}; "
        f"config {a.config_name}"
        + (" (--smoke: a check of the script, not a measurement)" if a.smoke else "")
    )
    print(
        f"  {cfg.n_layers} layers, dim {cfg.dim}, heads {cfg.n_heads}/{cfg.n_kv_heads} kv, "
        f"hidden {cfg.hidden_dim}, vocab {cfg.vocab_size}, "
        f"{'tied' if cfg.tied_embedding else 'untied'} embedding; batch {a.batch}, "
        f"prompt {a.prompt_len}, {a.steps} decode steps x {a.reps} passes, int4 groups of "
        f"{a.group_size}, {a.cache_dtype} cache, prefill {a.prefill}; reference {ref}"
    )

    t = time.perf_counter()
    graphdef, state = build_model(cfg, a.seed)
    jax.block_until_ready(state)
    print(f"  random bf16 weights on the device: {time.perf_counter() - t:.1f} s")

    rng = np.random.default_rng(a.seed)
    prompt = rng.integers(0, cfg.vocab_size, (a.batch, a.prompt_len), np.int32)
    inputs = Inputs(
        prompt=jnp.asarray(prompt),
        pad=jnp.zeros((a.batch,), jnp.int32),
        prompt_columns=[jnp.asarray(prompt[:, i]) for i in range(a.prompt_len)],
        prompt_slots=[jnp.asarray(i, jnp.int32) for i in range(a.prompt_len)],
        positions=[jnp.asarray(a.prompt_len + i, jnp.int32) for i in range(a.steps)],
    )
    max_len = -(-need // 256) * 256
    cache_dtype = jnp.dtype(a.cache_dtype)

    def new_cache() -> KVCache:
        return KVCache.init(cfg, batch=a.batch, max_len=max_len, dtype=cache_dtype)

    feed = None  # the reference's greedy tokens, once it has run
    ref_pass: Pass | None = None
    rows: list[dict] = []
    last_logits: dict[str, np.ndarray] = {}
    doc = {
        "stamp": stamp,
        "device": dev.device_kind,
        "config": a.config_name,
        "model": dataclasses.asdict(cfg),
        "args": {
            k: getattr(a, k)
            for k in ("formats", "steps", "prompt_len", "reps", "batch", "group_size", "prefill")
        }
        | {"cache_dtype": a.cache_dtype, "smoke": a.smoke},
        "reference": ref,
        "rows": rows,
    }
    for name in formats:
        fmt = FORMATS[name]
        t = time.perf_counter()
        params = format_params(state, fmt, a.group_size)
        jax.block_until_ready(params)
        quantize_s = time.perf_counter() - t
        matmuls = implementations(params, fmt, a.batch)
        c = compile_steps(
            graphdef,
            fmt,
            params,
            inputs.prompt,
            inputs.pad,
            new_cache(),
            block_prefill=a.prefill == "block",
        )
        warm = run_pass(c, params, inputs, new_cache, feed)
        if feed is None:  # the reference: its own greedy tokens, fed to every format
            ref_pass = warm
            toks = np.concatenate([warm.prefill_token[None], warm.tokens[:-1]])
            feed = [jnp.asarray(x) for x in toks]
            warm = run_pass(c, params, inputs, new_cache, feed)
        passes = [run_pass(c, params, inputs, new_cache, feed) for _ in range(a.reps)]
        ms = [p.decode_s * 1e3 for p in passes]
        med = statistics.median(ms)
        ref_ms = rows[0]["ms_per_token"] if rows else med
        agree = int((warm.tokens == ref_pass.tokens).sum())
        row = {
            "format": name,
            "label": fmt.label.format(g=a.group_size),
            "weight_bytes": jqx.tree_nbytes(params),
            "summary": jqx.summary(params),
            "matmuls": matmuls,
            "quantize_s": quantize_s,
            "compile_prefill_s": c.prefill_s,
            "compile_step_s": c.step_s,
            "pallas_calls_per_step": c.kernel_calls,
            "prefill_ms": statistics.median(p.prefill_s * 1e3 for p in passes),
            "ms_per_token": med,
            "ms_per_token_passes": ms,
            "tokens_per_s": a.batch * 1e3 / med,
            "speedup_vs_ref": ref_ms / med,
            "max_abs_logit_diff": float(np.abs(warm.last_logits - ref_pass.last_logits).max()),
            "ref_logit_std": float(ref_pass.last_logits.std()),
            "greedy_agree": agree,
            "greedy_total": int(ref_pass.tokens.size),
        }
        rows.append(row)
        doc["elapsed_s"] = time.perf_counter() - started
        last_logits[name] = warm.last_logits
        print(
            f"  {name}: {_mib(row['weight_bytes'])}, quantize {quantize_s:.1f} s, compile "
            f"{c.prefill_s:.1f} + {c.step_s:.1f} s, {med:.3f} ms/token "
            f"({', '.join(f'{x:.3f}' for x in ms)}); {matmuls}; "
            f"{c.kernel_calls} Pallas calls in the lowered step",
            flush=True,
        )
        if fmt.backend == "pallas" and not a.smoke and c.kernel_calls == 0:
            print(f"  WARNING: {name}'s decode step has no Pallas call: XLA ran its matmuls.")
        if a.json:
            _write_json(a.json, doc)
        del params, c, passes

    print_table(rows, ref)
    print(
        f"\nLogit scale: the reference's last logits have std {rows[0]['ref_logit_std']:.3g}. "
        "Greedy agreement counts decode steps (x batch) whose greedy token equals the "
        "reference's, every format reading the reference's tokens."
    )
    if "int4-xla" in last_logits and "int4-pallas" in last_logits:
        d = float(np.abs(last_logits["int4-pallas"] - last_logits["int4-xla"]).max())
        doc["int4_pallas_vs_xla_max_abs_logit_diff"] = d
        print(f"int4-pallas vs int4-xla (the same codes): max abs logit diff {d:.3g}")
    doc["elapsed_s"] = time.perf_counter() - started
    print(f"total {doc['elapsed_s']:.1f} s (from the start of main)")
    if a.json:
        _write_json(a.json, doc)
    return {**doc, "last_logits": last_logits}


if __name__ == "__main__":
    main()
