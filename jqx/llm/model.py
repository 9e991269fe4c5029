"""A Llama model in Flax NNX whose weights may be :class:`jqx.QArray`s, with a KV cache.

The blocks are the Llama architecture as llama.cpp runs it: grouped-query attention with
RoPE applied to adjacent pairs of each head's dimensions (the order in which GGUF files
store the query and key rows), RMSNorm, a SwiGLU MLP, and an optional tied embedding.
Every matmul weight is stored as GGUF stores it, ``(out_features, in_features)``, and is
applied with :func:`jqx.ops.dot_general`, so a weight may be a float array or any
QArray (the GGUF file's own blocks, or a jqx recipe's); the embedding lookup reads only
the rows it needs (:func:`jqx.ops.take`), and a tied output projection is a quantized
matmul with the same table.

The model is a pure function of its state under ``jit``: :func:`forward` runs it on a
token block at given cache positions and returns the logits and the updated
:class:`KVCache`. Generation lives in :mod:`jqx.llm.runtime`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jqx.llm.config import LlamaConfig
    >>> from jqx.llm.model import Llama, KVCache, forward
    >>> cfg = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)
    >>> model = Llama(cfg, rngs=nnx.Rngs(0))
    >>> cache = KVCache.init(cfg, batch=1, max_len=16)
    >>> logits, cache = forward(model, jnp.array([[1, 2, 3]]), cache, start=0,
    ...                         pad=jnp.zeros((1,), jnp.int32))
    >>> logits.shape
    (1, 3, 64)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jqx import ops
from jqx.core.qarray import QArray
from jqx.llm.config import LlamaConfig
from jqx.ops.attention import (
    KVCodes,
    check_kv_format,
    decode_attention,
    gqa_attention,
    kv_dequantize,
    kv_init,
    kv_write,
)

__all__ = ["Llama", "KVCache", "KVFormat", "forward", "fuse_projections", "rope", "linear"]

_DN = (((1,), (1,)), ((), ()))  # x (rows, in) . W (out, in) -> (rows, out)


_DN_IN_OUT = (((1,), (0,)), ((), ()))  # x (rows, in) . W (in, out)


def _in_out(w) -> bool:
    """LLM.int8()'s outlier matmul is defined on ``(in, out)`` weights only
    (:mod:`jqx.ops`), so such a weight is stored ``(in, out)``; every other weight is
    ``(out, in)`` as GGUF stores it."""
    return isinstance(w, QArray) and w.act is not None and w.act.kind == "llm_int8"


def linear(x: jax.Array, w) -> jax.Array:
    """``x @ w.T`` for ``w`` of shape ``(out, in)``: an array or a QArray (an LLM.int8()
    QArray is stored ``(in, out)`` and used as ``x @ w``)."""
    lead = x.shape[:-1]
    dn = _DN_IN_OUT if _in_out(w) else _DN
    y = ops.dot_general(x.reshape(-1, x.shape[-1]), w, dn, preferred_element_type=jnp.float32)
    return y.reshape(lead + (y.shape[-1],))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    ms = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(ms + eps) * weight.astype(jnp.float32)


def rope(x: jax.Array, positions: jax.Array, base: float, rope_dim: int) -> jax.Array:
    """Rotary embedding on adjacent pairs ``(x[2i], x[2i+1])`` of the first ``rope_dim``
    dimensions of the last axis (llama.cpp's ``LLAMA_ROPE_TYPE_NORM``).

    Args:
      x: ``(batch, seq, heads, head_dim)``.
      positions: ``(batch, seq)`` integer positions.
    """
    half = rope_dim // 2
    inv = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rope_dim)
    ang = positions.astype(jnp.float32)[..., None] * inv  # (batch, seq, half)
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    pairs = rot.reshape(rot.shape[:-1] + (half, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    out = out.reshape(rot.shape)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """A KV-cache format: what ``kv_cache=`` of :meth:`jqx.llm.LLM.generate` takes
    (a plain string means the defaults).

    Attributes:
      name: ``"int8"`` (per token and kv head, absmax, float16 scales), ``"fp8"``
        (E4M3 codes, one scale per kv head fixed by the prefill) or ``"int4"`` (KIVI:
        keys per channel over groups of ``group`` tokens, values per token over groups
        of ``group`` channels, the group being filled kept in float).
      group: int4's group size (tokens per key group, channels per value group); it
        must divide the model's head size.
      value_window: int4 only. True (KIVI's code): the values of the group being
        filled stay in a float window too. False: each token's values are quantized
        when written (a value group is one token's channels, complete at once): no
        value window, fewer bytes (with ``group=64``, 0.30x a float16 cache at 2048
        slots against 0.31x), the latest tokens' values quantized
        (docs/benchmarks/llm_kv.md).
      rotate: store the keys and values Hadamard-rotated along the head axis
        (:func:`jqx.core.numerics.hadamard_rotate`, an orthogonal map that spreads a
        few large channels over all of them; attention rotates the query and its
        output instead, so the result is the same in exact arithmetic). None (the
        default) means True for ``"fp8"``, whose E4M3 error in the attention scores it
        cuts (perplexity on SmolLM2, the mean over 8 windows of 2048 tokens: +1.05% ->
        +0.38%, docs/benchmarks/llm_kv.md), and False for ``"int8"`` and ``"int4"``.

    Example:
        >>> KVFormat.parse("int4", head_dim=64)
        KVFormat(name='int4', group=32, value_window=True, rotate=False)
        >>> KVFormat.parse("fp8", head_dim=64).rotate
        True
    """

    name: str
    group: int = 32
    value_window: bool = True
    rotate: bool | None = None

    @classmethod
    def parse(cls, value, *, head_dim: int, name: str = "kv_cache") -> KVFormat | None:
        """None (a float cache), a format name, or a KVFormat, checked against the
        model's ``head_dim``.

        Raises:
          ValueError: an unknown name, or an int4 group that does not divide
            ``head_dim`` (the message names ``name`` and what works).
        """
        if value is None or value == "float":
            return None
        fmt = value if isinstance(value, cls) else None
        if fmt is None:
            if not isinstance(value, str):
                raise ValueError(
                    f"{name}={value!r} must be None (a float cache), a format name ('int8', "
                    "'fp8', 'int4') or a jqx.llm.KVFormat."
                )
            fmt = cls(value)
        check_kv_format(fmt.name, head_dim, fmt.group, name=name)
        if not isinstance(fmt.value_window, bool):
            raise ValueError(
                f"{name}={fmt!r}: value_window must be True or False (whether int4 keeps "
                f"the values of the group being filled in float), got {fmt.value_window!r}."
            )
        if fmt.rotate is None:
            return dataclasses.replace(fmt, rotate=fmt.name == "fp8")
        if not isinstance(fmt.rotate, bool):
            raise ValueError(
                f"{name}={fmt!r}: rotate must be True, False or None (the format's default: "
                f"True for 'fp8'), got {fmt.rotate!r}."
            )
        return fmt


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, preallocated to ``max_len`` positions.

    A float cache holds ``k[i]`` and ``v[i]`` as ``(batch, n_kv_heads, max_len,
    head_dim)`` arrays; a quantized one (``format=``) holds a
    :class:`jqx.ops.attention.KVCodes` per layer (codes, scales and, for int4, the
    float residual window, each in its own array). Slot ``s`` of every sequence in the
    batch holds the token written at step ``s``; prompts are left padded, so a
    sequence's first real token is at slot ``pad[b]``.
    """

    k: tuple[jax.Array | KVCodes, ...]
    v: tuple[jax.Array | KVCodes, ...]

    @classmethod
    def init(
        cls,
        config: LlamaConfig,
        *,
        batch: int,
        max_len: int,
        dtype=jnp.float32,
        format: str | KVFormat | None = None,
    ) -> KVCache:
        """An empty cache. ``dtype`` is a float cache's dtype (and int4's residual
        window's); ``format`` a quantized format (see :class:`KVFormat`)."""
        fmt = KVFormat.parse(format, head_dim=config.head_dim, name="format")
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        if fmt is None:
            zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
            return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)))

        def layer(role):
            return kv_init(
                fmt.name,
                role,
                shape,
                group=fmt.group,
                dtype=dtype,
                value_window=fmt.value_window,
                rotate=fmt.rotate,
            )

        n = config.n_layers
        return cls(k=tuple(layer("k") for _ in range(n)), v=tuple(layer("v") for _ in range(n)))

    @property
    def format(self) -> str:
        """``"float"``, ``"int8"``, ``"fp8"`` or ``"int4"``."""
        first = self.k[0]
        return first.kind if isinstance(first, KVCodes) else "float"

    @property
    def max_len(self) -> int:
        first = self.k[0]
        return first.codes.shape[2] if isinstance(first, KVCodes) else first.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: every array of every layer (codes, scales, zero
        points and residual windows of a quantized cache)."""
        return sum(
            x.nbytes if isinstance(x, KVCodes) else int(x.size) * x.dtype.itemsize
            for x in self.k + self.v
        )


def _param(value) -> nnx.Param:
    return nnx.Param(value)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = _param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


def _init_linear(rngs: nnx.Rngs | None, out_features: int, in_features: int) -> nnx.Param:
    if rngs is None:  # shapes only: the weights come from a file
        return _param(jax.ShapeDtypeStruct((out_features, in_features), jnp.float32))
    std = 1.0 / math.sqrt(in_features)
    return _param(jax.random.normal(rngs.params(), (out_features, in_features)) * std)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None):
        c = config
        self.wq = _init_linear(rngs, c.n_heads * c.head_dim, c.dim)
        self.wk = _init_linear(rngs, c.n_kv_heads * c.head_dim, c.dim)
        self.wv = _init_linear(rngs, c.n_kv_heads * c.head_dim, c.dim)
        self.wo = _init_linear(rngs, c.dim, c.n_heads * c.head_dim)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None):
        self.w_gate = _init_linear(rngs, config.hidden_dim, config.dim)
        self.w_up = _init_linear(rngs, config.hidden_dim, config.dim)
        self.w_down = _init_linear(rngs, config.dim, config.hidden_dim)

    def __call__(self, x):
        fused = getattr(self, "w_gate_up", None)
        if fused is not None:
            g, u = jnp.split(linear(x, fused[...]), 2, axis=-1)
        else:
            g = linear(x, self.w_gate[...])
            u = linear(x, self.w_up[...])
        return linear(jax.nn.silu(g) * u, self.w_down[...])


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None):
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, rngs=rngs)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config, rngs=rngs)


class Llama(nnx.Module):
    """The Llama model. Parameters are ``nnx.Param``s that may hold QArrays.

    Attributes mirror GGUF's tensor names (:data:`GGUF_NAMES` in :mod:`jqx.llm.runtime`):
    ``embed`` (``token_embd``), ``blocks[i].attn.wq`` (``blk.i.attn_q``) ..., ``norm``
    (``output_norm``), ``output`` (``output``; None when tied to ``embed``).

    ``rngs=None`` builds the structure only: every matmul weight and the embedding are
    ``jax.ShapeDtypeStruct`` placeholders to be set from a file (what
    :func:`jqx.llm.load_llm` does, instead of tracing random initialisers under
    ``nnx.eval_shape``); the norms' weights are ones.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None):
        self.config = config
        shape = (config.vocab_size, config.dim)
        self.embed = _param(
            jax.ShapeDtypeStruct(shape, jnp.float32)
            if rngs is None
            else jax.random.normal(rngs.params(), shape)
        )
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = (
            None if config.tied_embedding else _init_linear(rngs, config.vocab_size, config.dim)
        )


def _per_row_super_scale(w: QArray) -> QArray:
    """A 2-D weight's per-tensor second-level scale (NVFP4's) as one per row: the same
    values (``dequantize`` is unchanged), so tensors of different row counts and scales
    stack (query, key and value)."""
    if w.ndim != 2 or w.super_scale is None or w.super_zero is not None:
        return w
    if tuple(w.super_block) != tuple(w.shape):
        return w
    rows = jnp.broadcast_to(w.super_scale.reshape(1, 1), (w.shape[0], 1))
    return w.replace(super_block=(1, w.shape[1]), super_scale=rows)


def _concat_rows(ws: list):
    """One ``(sum of rows, in)`` weight from weights of equal layout, or None when
    their layouts differ (e.g. a GGUF file that mixes block types)."""
    if all(isinstance(w, jax.Array) for w in ws):
        return jnp.concatenate(ws, axis=0) if len({w.dtype for w in ws}) == 1 else None
    if not all(isinstance(w, QArray) for w in ws):
        return None
    if any(w.code_layout != "plain" for w in ws):
        return None  # packed children are not rows of the weight
    if len({w.super_block for w in ws}) > 1:
        ws = [_per_row_super_scale(w) for w in ws]
    first = ws[0]

    def static(w):
        return (
            w.format,
            w.dtype,
            w.block,
            w.act,
            w.zero_kind,
            w.code_bits,
            w.super_block,
            w.shape[1:],
        )

    if any(static(w) != static(first) for w in ws):
        return None
    children = {}
    for name in ("qvalue", "scale", "zero_point", "qhigh", "super_scale", "super_zero"):
        vals = [getattr(w, name) for w in ws]
        if all(v is None for v in vals):
            children[name] = None
        elif any(v is None for v in vals) or any(v.ndim != 2 for v in vals):
            return None
        else:
            children[name] = jnp.concatenate(vals, axis=0)
    if any(
        w.in_scale is not None or w.act_scale is not None or w.g_idx is not None or _in_out(w)
        for w in ws
    ):
        return None
    rows = sum(w.shape[0] for w in ws)
    if any(w.shape[0] % w.block[0] for w in ws):
        return None
    return first.replace(shape=(rows,) + tuple(first.shape[1:]), **children)


def fuse_projections(model: Llama) -> Llama:
    """Stacks each block's query, key and value weights into one ``attn.wqkv`` and the
    MLP's gate and up weights into one ``mlp.w_gate_up`` (in place; returns ``model``),
    where their layouts match: one matmul instead of three (and two) per block, the
    same numbers. Weights that cannot be stacked stay separate."""
    for blk in model.blocks:
        a, m = blk.attn, blk.mlp
        qkv = _concat_rows([a.wq[...], a.wk[...], a.wv[...]])
        if qkv is not None:
            a.wqkv = _param(qkv)
            a.wq = a.wk = a.wv = None
        gu = _concat_rows([m.w_gate[...], m.w_up[...]])
        if gu is not None:
            m.w_gate_up = _param(gu)
            m.w_gate = m.w_up = None
    return model


def _visible(q_pos, pad, n_valid, slots):
    """(batch, seq, slots): slot ``s`` is visible to the query at absolute slot
    ``q_pos[t]`` iff ``pad[b] <= s <= q_pos[t]`` and ``s < n_valid``."""
    s = jnp.arange(slots)
    visible = (s[None, :] <= q_pos[:, None]) & (s[None, :] < n_valid)
    return visible[None] & (s[None, None, :] >= pad[:, None, None])


def _quantized_layer(q, k, v, ck: KVCodes, cv: KVCodes, start, pad, q_pos):
    """One layer's attention with a quantized cache: the new keys and values are
    written (quantized), a decode step reads the codes in place, a block of tokens at
    a static ``start`` attends to its own float keys and values and the dequantized
    earlier slots (a prompt is exact; only later tokens see its quantization)."""
    b, t = q.shape[:2]
    if t == 1 and not isinstance(start, int):
        ck = kv_write(ck, k, start, pad)
        cv = kv_write(cv, v, start, pad)
        o = decode_attention(q[:, 0], ck, cv, pad, jnp.full_like(pad, start + 1))
        return o, ck, cv
    if not isinstance(start, int):
        raise ValueError(
            f"forward: a quantized KV cache takes a block of {t} tokens only at a Python int "
            "start (a prefill); a traced start is a decode step of one token."
        )
    kk, vv = k, v
    if start > 0:  # the earlier slots as the cache holds them before this block
        kk = jnp.concatenate([kv_dequantize(ck, start), k.astype(jnp.float32)], axis=2)
        vv = jnp.concatenate([kv_dequantize(cv, start), v.astype(jnp.float32)], axis=2)
    ck = kv_write(ck, k, start, pad)
    cv = kv_write(cv, v, start, pad)
    return gqa_attention(q, kk, vv, _visible(q_pos, pad, start + t, start + t)), ck, cv


def _qkv(blk, c: LlamaConfig, x, positions):
    """One block's queries ``(b, t, heads, d)`` and keys and values ``(b, kv_heads, t, d)``
    of the normalised input, RoPE applied."""
    b, t = x.shape[:2]
    h = blk.attn_norm(x)
    a = blk.attn
    fused = getattr(a, "wqkv", None)
    if fused is not None:
        nq, nk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        y = linear(h, fused[...])
        q, k, v = y[..., :nq], y[..., nq : nq + nk], y[..., nq + nk :]
    else:
        q, k, v = linear(h, a.wq[...]), linear(h, a.wk[...]), linear(h, a.wv[...])
    q = q.reshape(b, t, c.n_heads, c.head_dim)
    k = k.reshape(b, t, c.n_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.n_kv_heads, c.head_dim)
    rd = c.rope_dim or c.head_dim
    q = rope(q, positions, c.rope_base, rd)
    k = rope(k, positions, c.rope_base, rd)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _block_out(blk, c: LlamaConfig, x, o):
    """The block's output from its input ``x`` and its attention ``o`` (b, t, heads, d)
    or (b, t, heads * d): output projection, residual, MLP, residual."""
    b, t = x.shape[:2]
    x = x + linear(o.reshape(b, t, c.n_heads * c.head_dim), blk.attn.wo[...])
    return x + blk.mlp(blk.ffn_norm(x))


def _runs(splits) -> list[tuple[int, int]]:
    """``(first, stop)`` index ranges of consecutive blocks (given as ``nnx.split``
    pairs) whose parameters have the same structure, shapes and dtypes (one scan each);
    blocks that differ (a GGUF mix, a per-layer allocation) start a new run."""

    def signature(split):
        graphdef, state = split
        leaves, treedef = jax.tree.flatten(state)
        return graphdef, treedef, tuple((x.shape, x.dtype) for x in leaves)

    sigs = [signature(s) for s in splits]
    runs, first = [], 0
    for i in range(1, len(sigs) + 1):
        if i == len(sigs) or sigs[i] != sigs[first]:
            runs.append((first, i))
            first = i
    return runs


def _scanned_blocks(model: Llama, x, positions, visible, cache_dtype):
    """All blocks on a block of tokens at slot 0 (a prefill, or scoring without a cache):
    each run of identical blocks is one ``lax.scan`` over their stacked parameters, so
    the compiled program (and its compile time) does not grow with the depth. Returns
    ``x`` and each layer's keys and values (float32; as the cache dtype rounds them when
    ``cache_dtype`` is given), to be written to the cache by the caller."""
    c = model.config
    splits = [nnx.split(b) for b in model.blocks]
    ks, vs = [], []

    def layer(blk, x):
        q, k, v = _qkv(blk, c, x, positions)
        if cache_dtype is not None:  # attention reads the keys as the float cache holds them
            k, v = k.astype(cache_dtype), v.astype(cache_dtype)
        o = gqa_attention(q, k, v, visible)
        return _block_out(blk, c, x, o), k, v

    for first, stop in _runs(splits):
        graphdef = splits[first][0]
        if stop - first == 1:
            x, k, v = layer(nnx.merge(graphdef, splits[first][1]), x)
            ks.append(k)
            vs.append(v)
            continue
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(st for _, st in splits[first:stop]))

        def body(x, state, graphdef=graphdef):
            x, k, v = layer(nnx.merge(graphdef, state), x)
            return x, (k, v)

        x, (k_run, v_run) = jax.lax.scan(body, x, stacked)
        ks.extend(k_run[j] for j in range(stop - first))
        vs.extend(v_run[j] for j in range(stop - first))
    return x, ks, vs


def forward(
    model: Llama,
    tokens: jax.Array,
    cache: KVCache | None,
    *,
    start,
    pad: jax.Array,
    logits: str = "all",
    scan: bool | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Runs the model on ``tokens`` (batch, seq) written at cache slots
    ``start .. start+seq-1``.

    Args:
      model: the :class:`Llama` (float or quantized parameters).
      tokens: ``(batch, seq)`` int token ids (left padded; pad tokens are masked).
      cache: the :class:`KVCache` to read and update, or None to attend within
        ``tokens`` only (perplexity, one-shot scoring).
      start: the slot of ``tokens[:, 0]``: a Python int, or a traced int scalar for
        the decode step (its value changes per token without retracing).
      pad: ``(batch,)`` number of left-padding slots of each sequence.
      logits: ``"all"`` (every position) or ``"last"`` (the last position only).
      scan: run each run of consecutive blocks with identical parameter layouts as
        one ``lax.scan`` over their stacked weights: the same numbers, bit for bit, and
        a compile time that does not grow with the depth, for one copy of the stacked
        weights per call. None (the default) scans when ``cache`` is None (scoring:
        :meth:`LLM.logits`, :meth:`LLM.perplexity`, where the copy is small beside the
        work of a long sequence); True also scans a prefill (``start=0`` with a cache);
        False unrolls every call. A decode step, or any call at ``start > 0``, always
        unrolls (it reads each weight in place). Measured in docs/benchmarks/llm.md.

    Returns:
      ``(logits, cache)``: float32 logits ``(batch, seq, vocab)`` or ``(batch, vocab)``,
      and the updated cache (None when ``cache`` was None).
    """
    c = model.config
    b, t = tokens.shape
    x = ops.take(model.embed[...], tokens, dtype=jnp.float32)
    q_pos = start + jnp.arange(t)  # absolute slots of the queries
    positions = q_pos[None, :] - pad[:, None]  # RoPE positions: 0 at the first real token
    new_k, new_v = [], []
    if scan is None:
        scan = cache is None
    if scan and isinstance(start, int) and start == 0 and len(model.blocks) > 1:
        quantized = cache is not None and isinstance(cache.k[0], KVCodes)
        float_dtype = None if cache is None or quantized else cache.k[0].dtype
        x, ks, vs = _scanned_blocks(model, x, positions, _visible(q_pos, pad, t, t), float_dtype)
        for i, (k, v) in enumerate(zip(ks, vs, strict=True) if cache is not None else ()):
            if isinstance(cache.k[i], KVCodes):
                new_k.append(kv_write(cache.k[i], k, 0, pad))
                new_v.append(kv_write(cache.v[i], v, 0, pad))
            else:
                new_k.append(jax.lax.dynamic_update_slice(cache.k[i], k, (0, 0, 0, 0)))
                new_v.append(jax.lax.dynamic_update_slice(cache.v[i], v, (0, 0, 0, 0)))
    else:
        for i, blk in enumerate(model.blocks):
            q, k, v = _qkv(blk, c, x, positions)
            if cache is not None and isinstance(cache.k[i], KVCodes):
                o, ck, cv = _quantized_layer(q, k, v, cache.k[i], cache.v[i], start, pad, q_pos)
                new_k.append(ck)
                new_v.append(cv)
                x = _block_out(blk, c, x, o)
                continue
            if cache is None:
                kk, vv, n_valid = k, v, t
            else:
                kk = jax.lax.dynamic_update_slice(
                    cache.k[i], k.astype(cache.k[i].dtype), (0, 0, start, 0)
                )
                vv = jax.lax.dynamic_update_slice(
                    cache.v[i], v.astype(cache.v[i].dtype), (0, 0, start, 0)
                )
                new_k.append(kk)
                new_v.append(vv)
                n_valid = start + t
            if cache is not None and isinstance(start, int):
                # prefill: a static start bounds the slots that can be visible
                kk, vv = kk[:, :, : start + t], vv[:, :, : start + t]
            if cache is not None and t == 1 and not isinstance(start, int):
                # the decode step: one query per sequence over slots pad[b] .. start
                o = decode_attention(q[:, 0], kk, vv, pad, jnp.full_like(pad, start + 1))
            else:
                q_rel = q_pos if cache is not None else jnp.arange(t)
                o = gqa_attention(q, kk, vv, _visible(q_rel, pad, n_valid, kk.shape[2]))
            x = _block_out(blk, c, x, o)
    if logits == "last":
        x = x[:, -1]
    x = model.norm(x)
    out_w = model.embed[...] if model.output is None else model.output[...]
    out = linear(x, out_w)
    new_cache = None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v))
    return out, new_cache
