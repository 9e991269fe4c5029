"""Grouped-query attention over a KV cache: the XLA formulation, the decode step that
the dispatcher may send to the native CPU kernel, and the quantized cache formats that
decode step reads in place; and :func:`softmax_dot`, a softmax followed by its matmul
(``jqx.quantized``'s reordered attention), on XLA or the native CPU kernel.

:func:`gqa_attention` is masked grouped-query attention for any number of queries;
:func:`decode_attention` is the one-query-per-sequence case of a decode step, which reads
only the visible cache slots ``lo[b] <= s < hi[b]`` when the native kernel runs it.

A quantized cache layer is a :class:`KVCodes` (codes and scales in their own arrays, so
its bytes are what the arrays hold); :func:`kv_init` allocates one, :func:`kv_write`
quantizes new keys or values into it, :func:`kv_dequantize` reads it back as floats.
The formats (:data:`KV_FORMATS`):

- ``"int8"``: per token and kv head, absmax, codes in [-127, 127], float16 scales.
- ``"fp8"``: float8 E4M3 codes with one float32 scale per sequence and kv head, fixed
  by the first write into the empty cache (the prefill): ``max|x| * FP8_HEADROOM /
  448``, so later tokens up to :data:`FP8_HEADROOM` times the prompt's largest value
  keep their precision; larger ones saturate (never inf or NaN).
- ``"int4"``: KIVI's layout: keys per channel over groups of ``group`` tokens, values
  per token over groups of ``group`` channels, 4-bit codes with a scale and a zero
  point (float16) per group, packed two per byte. The keys' slots of the group being
  filled stay in a float residual window until the group is complete, then are
  quantized. The values either do the same (``value_window=True``, KIVI's own code) or,
  since a value group is one token's channels and so complete when the token arrives,
  are quantized at once and keep no window (``value_window=False``: fewer bytes; the
  latest tokens' values are then quantized too).
- Any format may store its keys and values Hadamard-rotated along the head axis
  (``kv_init(rotate=True)``, :attr:`KVCodes.rotated`; the fp8 default of
  :class:`jqx.llm.KVFormat`): attention rotates the query and the output instead.

:func:`decode_attention` applies the scales inside the attention products (scores are
``q . codes`` times the key scales, the value sum weights the codes by probability
times value scale); no dequantized copy of the cache is formed. The native kernel reads
every format in place (int4 through ``jqx_decode_attention_int4``: a key group's scales
multiply the query once per group, its zero points enter as one dot per group).

Example:
    >>> import jax.numpy as jnp
    >>> from jqx.ops.attention import decode_attention
    >>> q = jnp.ones((1, 4, 8)); k = v = jnp.ones((1, 2, 16, 8))
    >>> decode_attention(q, k, v, jnp.array([0]), jnp.array([3])).shape
    (1, 4, 8)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jqx.core import numerics
from jqx.core.qarray import pack_4bit, unpack_4bit
from jqx.kernels.cpu import native
from jqx.ops import dispatch

__all__ = [
    "gqa_attention",
    "decode_attention",
    "KVCodes",
    "KV_FORMATS",
    "FP8_HEADROOM",
    "kv_init",
    "kv_write",
    "kv_dequantize",
    "fp8_values",
    "check_kv_format",
    "softmax_dot",
    "scores_softmax_dot",
    "scores_route",
    "normalised_dot",
]

# A finite mask value: a query that sees no slot (a padding position) gets a uniform
# row instead of NaN, which would reach real queries through the cache (0 * NaN = NaN).
_MASKED = -1e30

KV_FORMATS = ("int8", "fp8", "int4")
# fp8's per-head scale leaves this factor above the prefill's largest |value|: E4M3
# keeps 3 mantissa bits over 2**15 of range, so the headroom costs only the tiniest
# values (docs/guide/llm.md, "Quantized KV cache").
FP8_HEADROOM = 64.0
_FP8_MAX = 448.0
_F16_TINY = float(np.finfo(np.float16).tiny)  # scales below it would be subnormal
_F16_MAX = float(np.finfo(np.float16).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCodes:
    """The keys or the values of one layer of a quantized KV cache.

    Attributes:
      codes: ``(B, KVH, S, D)`` int8 (``"int8"``), the bits of float8_e4m3fn codes as
        uint8 (``"fp8"``: XLA:CPU rewrites a whole float8 buffer to update one slot
        of it, so the cache holds the bytes; :func:`fp8_values` reads them), or
        ``(B, KVH, S, D // 2)`` uint8 with two 4-bit codes per byte, the even channel
        in the low nibble (``"int4"``).
      scale: ``"int8"``: float16 ``(B, KVH, S)``; ``"fp8"``: float32 ``(B, KVH)``
        (0 until the first write); ``"int4"`` keys: float16 ``(B, KVH, S // group,
        D)``, values: float16 ``(B, KVH, S, D // group)``.
      zero: ``"int4"`` only: the zero points, shaped like ``scale`` (integers stored
        as float16); ``x = (code - zero) * scale``.
      residual: ``"int4"`` only: ``(B, KVH, group, D)`` float, the slots of the group
        being filled (slot ``s`` at row ``s % group``); None for values kept without a
        window (every slot then lives in the codes).
      kind: ``"int8"``, ``"fp8"`` or ``"int4"``.
      role: ``"k"`` (keys) or ``"v"`` (values): int4 groups them differently.
      group: int4's group size (0 for the other formats).
      rotated: the keys or values are stored rotated
        (:func:`jqx.core.numerics.hadamard_rotate` along the head axis, before
        quantizing): :func:`kv_dequantize` rotates them back, :func:`decode_attention`
        rotates the query (keys) or its output (values).
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None = None
    residual: jax.Array | None = None
    kind: str = dataclasses.field(metadata=dict(static=True), default="int8")
    role: str = dataclasses.field(metadata=dict(static=True), default="k")
    group: int = dataclasses.field(metadata=dict(static=True), default=0)
    rotated: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The logical ``(B, KVH, S, D)``."""
        b, h, s, d = self.codes.shape
        return (b, h, s, 2 * d if self.kind == "int4" else d)

    @property
    def nbytes(self) -> int:
        """Bytes of every array (codes, scales, zero points, residual window)."""
        arrays = [self.codes, self.scale, self.zero, self.residual]
        return sum(int(a.size) * a.dtype.itemsize for a in arrays if a is not None)


def check_kv_format(kind, head_dim: int, group: int = 32, *, name: str = "kv_cache") -> None:
    """Raises a ValueError that names ``name`` when ``kind`` (with int4's ``group``) is
    not a cache format for heads of ``head_dim`` channels.

    Example:
        >>> check_kv_format("int4", 64, group=48)
        Traceback (most recent call last):
        ...
        ValueError: kv_cache='int4' with group=48: the head size 64 is not a multiple of the group (int4 quantizes each token's values in groups of `group` channels); use a group that divides 64, e.g. 8, 16, 32, 64.
    """
    if kind not in KV_FORMATS:
        raise ValueError(
            f"{name}={kind!r} is not a KV-cache format; use None (a float cache), "
            + ", ".join(repr(f) for f in KV_FORMATS)
            + "."
        )
    if kind != "int4":
        return
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 2:
        raise ValueError(
            f"{name}='int4' with group={group!r}: the group must be an int >= 2 (tokens per "
            "key group, channels per value group); KIVI uses 32."
        )
    if head_dim % group or head_dim % 2:
        divisors = [g for g in (8, 16, 32, 64, 128) if head_dim % g == 0 and g % 2 == 0]
        hint = ", ".join(map(str, divisors)) if divisors else "none: int4 needs an even size"
        raise ValueError(
            f"{name}='int4' with group={group}: the head size {head_dim} is not a multiple of "
            "the group (int4 quantizes each token's values in groups of `group` channels); "
            f"use a group that divides {head_dim}, e.g. {hint}."
        )


def kv_init(
    kind: str,
    role: str,
    shape: tuple[int, int, int, int],
    *,
    group: int = 32,
    dtype=jnp.float32,
    value_window: bool = True,
    rotate: bool = False,
) -> KVCodes:
    """An empty quantized cache layer of logical ``shape = (B, KVH, S, D)``.

    For ``"int4"``, ``S`` is rounded up to a multiple of ``group`` and ``dtype`` is the
    residual window's float type; with ``value_window=False`` a values layer (``role
    "v"``) has no window: each token's values are quantized when written. With
    ``rotate=True`` the layer stores its keys or values Hadamard-rotated
    (:attr:`KVCodes.rotated`).

    Example:
        >>> c = kv_init("int8", "k", (1, 2, 16, 8))
        >>> c.codes.dtype, c.scale.shape, c.nbytes
        (dtype('int8'), (1, 2, 16), 320)
    """
    b, h, s, d = shape
    check_kv_format(kind, d, group)
    if not isinstance(rotate, bool):
        raise ValueError(
            f"kv_init: rotate={rotate!r} must be True or False (whether the layer stores "
            "its keys or values Hadamard-rotated)."
        )
    if kind == "int8":
        scale = jnp.ones((b, h, s), jnp.float16)
        return KVCodes(jnp.zeros(shape, jnp.int8), scale, kind=kind, role=role, rotated=rotate)
    if kind == "fp8":
        codes = jnp.zeros(shape, jnp.uint8)
        scale = jnp.zeros((b, h), jnp.float32)
        return KVCodes(codes, scale, kind=kind, role=role, rotated=rotate)
    s = -(-s // group) * group
    meta = (b, h, s // group, d) if role == "k" else (b, h, s, d // group)
    window = role == "k" or value_window
    return KVCodes(
        jnp.zeros((b, h, s, d // 2), jnp.uint8),
        jnp.ones(meta, jnp.float16),
        jnp.zeros(meta, jnp.float16),
        jnp.zeros((b, h, group, d), dtype) if window else None,
        kind=kind,
        role=role,
        group=group,
        rotated=rotate,
    )


def fp8_values(codes: jax.Array) -> jax.Array:
    """float32 values of fp8 cache codes (float8_e4m3fn bits stored as uint8)."""
    return jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn).astype(jnp.float32)


def _f16_scale(s: jax.Array) -> jax.Array:
    """A float32 scale stored as float16: clipped to float16's normal range (a
    subnormal scale would flush to zero when divided by)."""
    return jnp.clip(s, _F16_TINY, _F16_MAX).astype(jnp.float16)


def _int8_encode(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row (last axis) absmax int8 codes and float16 scales, the codes computed
    with the stored scale."""
    xf = x.astype(jnp.float32)
    s, _ = numerics.scale_from_minmax(
        numerics.nan_min(xf, axis=-1),
        numerics.nan_max(xf, axis=-1),
        qmin=-127,
        qmax=127,
        scheme="absmax",
    )
    s16 = jnp.where(jnp.isnan(s), s, _f16_scale(s).astype(jnp.float32)).astype(jnp.float16)
    codes = numerics.encode_int(xf, s16.astype(jnp.float32)[..., None], None, qmin=-127, qmax=127)
    return codes.astype(jnp.int8), s16


def _int4_encode(x: jax.Array, valid: jax.Array, axis: int):
    """4-bit zero-point codes of ``x`` with one scale and zero point per slice along
    ``axis`` (min and max over the ``valid`` entries only; a slice with none gets the
    all-zero block's scale). Returns ``(codes uint8 0..15, scale f16, zero f16)`` with
    ``axis`` kept as size 1 in the scale and zero."""
    xf = x.astype(jnp.float32)
    mx = numerics.nan_max(jnp.where(valid, xf, -jnp.inf), axis=axis, keepdims=True)
    mn = numerics.nan_min(jnp.where(valid, xf, jnp.inf), axis=axis, keepdims=True)
    empty = mx < mn  # no valid entry: min > max
    mx = jnp.where(empty, 0.0, mx)
    mn = jnp.where(empty, 0.0, mn)
    s, z = numerics.scale_from_minmax(mn, mx, qmin=0, qmax=15, scheme="zero_point")
    s16 = jnp.where(jnp.isnan(s), s, _f16_scale(s).astype(jnp.float32))
    # the zero point from the stored scale, so code(min) = 0 holds for the stored pair
    z = jnp.round(-numerics.div_by_scale(mn, s16))
    z16 = z.astype(jnp.float16).astype(jnp.float32)
    codes = numerics.encode_int(xf, s16, z16, qmin=0, qmax=15)
    return codes.astype(jnp.uint8), s16.astype(jnp.float16), z16.astype(jnp.float16)


def _int4_group(c: KVCodes, x: jax.Array, valid: jax.Array):
    """Codes (packed) and per-group scale and zero of whole groups ``x`` (B, KVH, n *
    group, D): keys per channel over each group's tokens, values per token over each
    group of channels."""
    b, h, n, d = x.shape
    g = c.group
    if c.role == "k":
        xb = x.reshape(b, h, n // g, g, d)
        codes, s, z = _int4_encode(xb, valid.reshape(b, 1, n // g, g, 1), axis=3)
        s, z = s[:, :, :, 0], z[:, :, :, 0]
    else:
        xb = x.reshape(b, h, n, d // g, g)
        codes, s, z = _int4_encode(xb, valid.reshape(b, 1, n, 1, 1), axis=4)
        s, z = s[..., 0], z[..., 0]
    return pack_4bit(codes.reshape(b, h, n, d)), s, z


def kv_write(c: KVCodes, x: jax.Array, start, pad: jax.Array) -> KVCodes:
    """``c`` with ``x`` (B, KVH, T, D) written at slots ``start .. start+T-1``.

    Args:
      c: the cache layer.
      x: float keys or values of the new tokens.
      start: the first slot: a Python int (a prefill or a chunk of one), or a traced
        int scalar (a decode step; an ``"int4"`` layer with a residual window then
        takes one token, T = 1).
      pad: int (B,): each sequence's left padding; slots below it are not real tokens
        (they are left out of fp8's scale and int4's group ranges).

    Returns:
      The updated :class:`KVCodes` (a new pytree; the input is not modified).

    Example:
        >>> import jax.numpy as jnp
        >>> c = kv_write(kv_init("int8", "k", (1, 1, 4, 2)), jnp.ones((1, 1, 1, 2)), 0,
        ...              jnp.zeros((1,), jnp.int32))
        >>> c.codes[0, 0, 0].tolist(), float(c.scale[0, 0, 0])
        ([1, 1], 1.0)
    """
    b, h, t, d = x.shape
    pad = pad.astype(jnp.int32)
    if c.rotated:
        x = numerics.hadamard_rotate(x.astype(jnp.float32))
    if c.kind == "int8":
        codes, s = _int8_encode(x)
        return dataclasses.replace(
            c,
            codes=jax.lax.dynamic_update_slice(c.codes, codes, (0, 0, start, 0)),
            scale=jax.lax.dynamic_update_slice(c.scale, s, (0, 0, start)),
        )
    if c.kind == "fp8":
        slots = start + jnp.arange(t, dtype=jnp.int32)
        valid = slots[None, :] >= pad[:, None]  # (B, T)
        xf = x.astype(jnp.float32)
        amax = numerics.nan_max(jnp.where(valid[:, None, :, None], jnp.abs(xf), 0.0), axis=(2, 3))
        fresh, _ = numerics.scale_from_minmax(
            -amax, amax, qmin=-_FP8_MAX, qmax=_FP8_MAX, denom=_FP8_MAX / FP8_HEADROOM
        )
        s = jnp.where(c.scale > 0, c.scale, fresh)
        codes, _ = numerics.quantize_activation(xf, "fp8_e4m3", scale=s[:, :, None, None])
        codes = jax.lax.bitcast_convert_type(codes, jnp.uint8)
        return dataclasses.replace(
            c, codes=jax.lax.dynamic_update_slice(c.codes, codes, (0, 0, start, 0)), scale=s
        )
    return _int4_write(c, x, start, pad)


def _int4_write(c: KVCodes, x: jax.Array, start, pad: jax.Array) -> KVCodes:
    b, h, t, d = x.shape
    g = c.group
    if c.residual is None:
        # Values without a window: each token is its own groups of channels, quantized
        # and written at its slot now (any number of tokens, static or traced start).
        slots = start + jnp.arange(t, dtype=jnp.int32)
        codes, s, z = _int4_group(c, x, slots[None, :] >= pad[:, None])
        return dataclasses.replace(
            c,
            codes=jax.lax.dynamic_update_slice(c.codes, codes, (0, 0, start, 0)),
            scale=jax.lax.dynamic_update_slice(c.scale, s, (0, 0, start, 0)),
            zero=jax.lax.dynamic_update_slice(c.zero, z, (0, 0, start, 0)),
        )
    res_dtype = c.residual.dtype
    if isinstance(start, (int, np.integer)):
        # Static slots: the residual's slots [g0, start) and the new ones, whole groups
        # quantized, the rest kept as the new residual.
        start = int(start)
        g0 = start // g * g
        seg = jnp.concatenate([c.residual[:, :, : start - g0].astype(x.dtype), x], axis=2)
        end = start + t
        full = (end // g) * g - g0
        out = c
        if full > 0:
            slots = g0 + jnp.arange(full, dtype=jnp.int32)
            valid = slots[None, :] >= pad[:, None]
            codes, s, z = _int4_group(c, seg[:, :, :full], valid)
            gi = (g0 // g, 0) if c.role == "k" else (g0, 0)
            out = dataclasses.replace(
                out,
                codes=jax.lax.dynamic_update_slice(c.codes, codes, (0, 0, g0, 0)),
                scale=jax.lax.dynamic_update_slice(c.scale, s, (0, 0) + gi),
                zero=jax.lax.dynamic_update_slice(c.zero, z, (0, 0) + gi),
            )
        rest = seg[:, :, full:].astype(res_dtype)
        residual = jax.lax.dynamic_update_slice(c.residual, rest, (0, 0, 0, 0))
        return dataclasses.replace(out, residual=residual)
    if t != 1:
        raise ValueError(
            f"kv_write: an int4 cache takes one token per traced start (a decode step), got "
            f"{t}; write a block of tokens with a Python int start."
        )
    # A decode step: the token joins the residual at row start % group. The group is
    # quantized into its slots when this token completes it; until then its slots are
    # read from the residual (decode_attention and kv_dequantize read the residual for
    # the slots of the current group), so the other steps write no codes.
    r = start % g
    g0 = start - r
    residual = jax.lax.dynamic_update_slice(c.residual, x.astype(res_dtype), (0, 0, r, 0))

    def flush(arrays):
        codes_all, scale_all, zero_all, res = arrays
        slots = g0 + jnp.arange(g, dtype=jnp.int32)
        valid = (slots[None, :] >= pad[:, None]) & (slots[None, :] <= start)
        codes, s, z = _int4_group(c, res, valid)
        gi = (g0 // g, 0) if c.role == "k" else (g0, 0)
        return (
            jax.lax.dynamic_update_slice(codes_all, codes, (0, 0, g0, 0)),
            jax.lax.dynamic_update_slice(scale_all, s, (0, 0) + gi),
            jax.lax.dynamic_update_slice(zero_all, z, (0, 0) + gi),
        )

    codes, scale, zero = jax.lax.cond(
        r == g - 1, flush, lambda a: a[:3], (c.codes, c.scale, c.zero, residual)
    )
    return dataclasses.replace(c, codes=codes, scale=scale, zero=zero, residual=residual)


def kv_dequantize(c: KVCodes, n: int | None = None, dtype=jnp.float32) -> jax.Array:
    """The float values of slots ``0 .. n-1`` (default: all), ``(B, KVH, n, D)``. For
    ``"int4"`` with a residual window the slots of the group after the last whole one
    (``n // group * group ..``) come from the window, as :func:`decode_attention` reads
    them.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[[[0.5, -1.0]]]])
        >>> c = kv_write(kv_init("int8", "v", (1, 1, 2, 2)), x, 0, jnp.zeros((1,), jnp.int32))
        >>> c.codes[0, 0, 0].tolist()  # the scale 1/127 is stored in float16
        [64, -127]
        >>> [round(v, 3) for v in kv_dequantize(c, 1)[0, 0, 0].tolist()]
        [0.504, -1.0]
    """
    x = _kv_stored(c, n)
    return (numerics.hadamard_rotate(x) if c.rotated else x).astype(dtype)


def _kv_stored(c: KVCodes, n: int | None) -> jax.Array:
    """float32 slots ``0 .. n-1`` as stored (still rotated for a rotated layer)."""
    b, h, s, d = c.shape
    n = s if n is None else n
    if c.kind == "int8":
        return c.codes[:, :, :n].astype(jnp.float32) * c.scale[:, :, :n, None].astype(jnp.float32)
    if c.kind == "fp8":
        return fp8_values(c.codes[:, :, :n]) * c.scale[:, :, None, None]
    g = c.group
    q = unpack_4bit(c.codes[:, :, :n], d).astype(jnp.float32)
    if c.role == "k":
        ng = -(-n // g)
        sc = jnp.repeat(c.scale[:, :, :ng].astype(jnp.float32), g, axis=2)[:, :, :n]
        zp = jnp.repeat(c.zero[:, :, :ng].astype(jnp.float32), g, axis=2)[:, :, :n]
    else:
        sc = jnp.repeat(c.scale[:, :, :n].astype(jnp.float32), g, axis=3)
        zp = jnp.repeat(c.zero[:, :, :n].astype(jnp.float32), g, axis=3)
    x = (q - zp) * sc
    g0 = n // g * g
    if g0 < n and c.residual is not None:
        x = jnp.concatenate([x[:, :, :g0], c.residual[:, :, : n - g0].astype(jnp.float32)], 2)
    return x


def _p_dims(dimension_numbers, operand: int):
    """(contracting, batch) dims of the probabilities' operand and of the other one."""
    (lc, rc), (lb, rb) = dimension_numbers
    return ((lc, lb), (rc, rb)) if operand == 0 else ((rc, rb), (lc, lb))


def normalised_dot(
    e,
    total,
    other,
    dimension_numbers,
    operand: int = 0,
    precision=None,
    preferred_element_type=None,
):
    """``dot_general(e / total, other)`` computed as ``dot_general(e, other) / total``:
    the product first, then each output divided by its row's sum (XLA).

    ``e`` is a softmax's numerator, ``total`` its sum over the axes the product
    contracts (those axes removed, the others in ``e``'s order), ``operand`` which side
    of the product ``e`` is on. This is ``jqx.quantized``'s reordered attention on XLA
    (docs/guide/run.md#attention): it divides the ``(batch, heads, q, d)`` output
    instead of the ``(batch, heads, q, k)`` probabilities.
    """
    ops = (e, other) if operand == 0 else (other, e)
    y = jax.lax.dot_general(
        *ops, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
    )
    # Where each of e's axes lands in y: batch dims first, then lhs free, then rhs free.
    (pc, pb), (oc, ob) = _p_dims(dimension_numbers, operand)
    ndim = e.ndim
    pos = {a: j for j, a in enumerate(pb)}
    free = [a for a in range(ndim) if a not in pb and a not in pc]
    start = len(pb) + (0 if operand == 0 else other.ndim - len(oc) - len(ob))
    pos.update({a: start + j for j, a in enumerate(free)})
    keep = [a for a in range(ndim) if a not in pc]
    where = [pos[a] for a in keep]
    order = sorted(range(len(keep)), key=lambda t: where[t])
    if order != list(range(len(keep))):
        total = jax.lax.transpose(total, order)
    den = jax.lax.broadcast_in_dim(total, y.shape, tuple(sorted(where)))
    return jax.lax.div(y, den)


@jax.custom_jvp
def _softmax_dot_native(s, v):
    """The native kernel, differentiable: its derivatives are XLA's formula's."""
    return native.softmax_dot(s, v)


@_softmax_dot_native.defjvp
def _softmax_dot_native_jvp(primals, tangents):
    _, dy = jax.jvp(native.softmax_dot_reference, primals, tangents)
    return _softmax_dot_native(*primals), dy


def softmax_dot(
    s,
    other,
    dimension_numbers,
    operand: int = 0,
    *,
    precision=None,
    preferred_element_type=None,
    backend: str | None = None,
):
    """``dot_general(jax.nn.softmax(s), other)``, the softmax over the axes the product
    contracts: attention's probabilities and their product with the values.

    Attention written ``softmax(s) @ v``: ``jqx.quantized`` sends it here on CPU
    (docs/guide/run.md#attention). Two implementations, chosen by
    :func:`jqx.ops.dispatch.choose_softmax_dot`:

    - ``"native"``: ``jqx.kernels.cpu.native.softmax_dot`` (AVX512 or AVX2) on float32
      CPU operands of up to ``Policy.softmax_kernel_max_scores`` scores, after moving
      ``s``'s and ``other``'s axes to ``(batch, free, contracted)`` and ``(batch,
      contracted, free)`` (free where they already are, e.g. flax.linen's ``(b, h, q,
      k)`` scores). It writes neither the shifted scores nor the probabilities.
    - ``"xla"``: :func:`normalised_dot` of ``exp(s - max(s))`` and its sum.

    Both subtract the maximum as ``jax.nn.softmax`` does (the same bits) and are within
    ``(2K + 8) u max|other|`` of the exact value from those shifted scores (K the
    contracted elements, ``u`` the unit roundoff); they round differently after that.
    Both are differentiable: the kernel's derivatives are those of XLA's formula.

    Args:
      s: the scores, any layout.
      other: the values (the product's other operand).
      dimension_numbers: ``lax.dot_general``'s, with ``s`` as operand ``operand``.
      operand: 0 when ``s`` is the product's lhs, 1 when it is the rhs.
      precision, preferred_element_type: as ``lax.dot_general`` (the XLA route).
      backend: None (the dispatcher's choice), ``"xla"`` or ``"native"``.

    Returns:
      What ``lax.dot_general`` of the probabilities and ``other`` returns.

    Raises:
      ValueError: ``operand`` not 0 or 1, or an unknown ``backend``.
      RuntimeError: ``backend="native"`` where the kernel cannot run.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jqx.ops.attention import softmax_dot
        >>> s = jnp.array([[[1.0, 2.0, 3.0]]])  # (b, q, k)
        >>> v = jnp.array([[[1.0], [2.0], [3.0]]])  # (b, k, d)
        >>> y = softmax_dot(s, v, (((2,), (1,)), ((0,), (0,))))
        >>> bool(jnp.allclose(y, jax.nn.softmax(s) @ v))
        True
    """
    if operand not in (0, 1):
        raise ValueError(f"softmax_dot: operand={operand!r} must be 0 (s is the lhs) or 1.")
    (pc, pb), (oc, ob) = _p_dims(dimension_numbers, operand)
    if dispatch.choose_softmax_dot(s, other, backend) == "xla":
        axes = tuple(pc)
        e = jnp.exp(s - jnp.max(s, axis=axes, keepdims=True, initial=-jnp.inf))
        total = jnp.sum(e, axis=axes)
        return normalised_dot(
            e, total, other, dimension_numbers, operand, precision, preferred_element_type
        )
    pfree = [a for a in range(s.ndim) if a not in pb and a not in pc]
    ofree = [a for a in range(other.ndim) if a not in ob and a not in oc]
    batch = [s.shape[a] for a in pb]
    qs, ds = [s.shape[a] for a in pfree], [other.shape[a] for a in ofree]
    g, k = math.prod(batch), math.prod(s.shape[a] for a in pc)
    st = jnp.transpose(s, (*pb, *pfree, *pc)).reshape(g, math.prod(qs), k)
    vt = jnp.transpose(other, (*ob, *oc, *ofree)).reshape(g, k, math.prod(ds))
    y = _softmax_dot_native(st, vt).reshape(*batch, *qs, *ds)
    if operand == 1:  # dot_general puts the lhs's (other's) free dims first
        nb, nq = len(batch), len(qs)
        perm = (*range(nb), *range(nb + nq, nb + nq + len(ds)), *range(nb, nb + nq))
        y = jnp.transpose(y, perm)
    return y.astype(preferred_element_type) if preferred_element_type is not None else y


def apply_score_steps(s, steps):
    """The steps between attention's scores dot and its softmax, in order
    (:func:`scores_softmax_dot`'s ``steps``), as float32 operations on XLA."""
    for step in steps:
        kind = step[0]
        if kind == "mul":
            s = s * step[1]
        elif kind == "div":
            s = s / step[1]
        elif kind == "add":
            s = s + step[1]
        elif kind == "transpose":
            s = jnp.transpose(s, step[1])
        else:  # as jnp.where: a nonzero (or NaN) mask keeps the score
            c = jnp.asarray(step[1])
            s = jnp.where(c != jnp.zeros((), c.dtype), s, step[2])
    return s


@dataclasses.dataclass(frozen=True)
class _ScoresCfg:
    axes: tuple  # q_axes, k_axes, v_axes
    steps: tuple  # names
    fill: float


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _scores_native(cfg: _ScoresCfg, q, k, v, scale, bias, mask):
    """The native kernel, differentiable: its derivatives are XLA's formula's."""
    return native.scores_softmax_dot(
        q, k, v, *cfg.axes, steps=cfg.steps, scale=scale, bias=bias, mask=mask, fill=cfg.fill
    )


@_scores_native.defjvp
def _scores_native_jvp(cfg, primals, tangents):
    def ref(q, k, v, scale, bias, mask):
        return native.scores_softmax_dot_reference(
            q, k, v, *cfg.axes, steps=cfg.steps, scale=scale, bias=bias, mask=mask, fill=cfg.fill
        )

    _, dy = jax.jvp(ref, primals, tangents)
    return _scores_native(cfg, *primals), dy


def _native_steps(steps, s_shape):
    """``(names, scale, bias, mask, fill)`` for the kernel from ``steps``, or None where
    it cannot take them: a kind of step twice (two biases, say) or both a multiply and a
    divide, a scale that is not a float32 scalar, a bias or mask that does not broadcast
    to the scores ``s_shape`` (rank padded with leading 1s), a fill that is not a
    concrete number."""
    names = [st[0] for st in steps]
    if len(set(names)) != len(names) or {"mul", "div"} <= set(names):
        return None
    rank = len(s_shape)
    scale = bias = mask = None
    fill = 0.0

    def fits(a):
        if a.ndim > rank:
            return None
        a = a.reshape((1,) * (rank - a.ndim) + a.shape)
        return a if all(x in (1, n) for x, n in zip(a.shape, s_shape, strict=True)) else None

    for step in steps:
        x = step[1]
        if step[0] in ("mul", "div"):
            x = jnp.asarray(x)
            if x.shape != () or jnp.dtype(x.dtype) != jnp.float32:
                return None
            scale = x
        elif step[0] == "add":
            x = jnp.asarray(x)
            if jnp.dtype(x.dtype) != jnp.float32:
                return None
            bias = fits(x)
            if bias is None:
                return None
        else:
            mask = fits(jnp.asarray(x))
            try:
                fill = float(np.asarray(step[2], np.float32))
            except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
                return None
            if mask is None or np.ndim(step[2]) != 0:
                return None
    return tuple(names), scale, bias, mask, fill


@dataclasses.dataclass(frozen=True)
class _Canonical:
    """One attention rewritten for the kernel (:func:`_canonical`): its operands, the
    scores' shape, and how the product's output maps back to the original's (``extra``
    unit axes appended, then ``perm``; None where nothing changed)."""

    q: jax.Array
    k: jax.Array
    other: jax.Array
    score_dn: tuple
    dn: tuple
    steps: tuple
    s_shape: tuple
    extra: int = 0
    perm: tuple | None = None

    def finish(self, y):
        if self.perm is None:
            return y
        y = y.reshape(y.shape + (1,) * self.extra)
        return jnp.transpose(y, self.perm) if self.perm != tuple(range(y.ndim)) else y


def _canonical(q, k, other, score_dn, dimension_numbers, operand, steps) -> _Canonical | None:
    """The same attention in the kernel's form: no ``("transpose", perm)`` steps, one
    free axis on q and on k. What ``jax.nn.dot_product_attention`` traces to (scores
    ``(b, h, q, g, k)``, transposed before the softmax) becomes that form:

    - the transposes are undone by moving the later steps' operands (bias, mask) to the
      scores dot's own layout and mapping the product's axes through them;
    - q's and k's extra free axes of size 1 are squeezed;
    - a second free axis of q above size 1 (grouped queries: ``g`` query heads share a
      key head) becomes a batch axis, k and v read at stride 0 along it (a unit axis
      each); the larger free axis stays the queries'.

    The kernel's output is then reshaped and transposed to the product's. None where
    that cannot be done: a perm or operand that does not fit, more free axes than that,
    or an axis moved that the product contracts or batches. Unchanged (``perm`` None)
    without transposes, unit axes or grouped queries."""
    (lc, rc), (lb, rb) = score_dn
    nb = len(lb)
    qf = [a for a in range(q.ndim) if a not in lc and a not in lb]
    kf = [a for a in range(k.ndim) if a not in rc and a not in rb]
    r = nb + len(qf) + len(kf)  # the scores dot's rank
    dshape = (*(q.shape[a] for a in lb), *(q.shape[a] for a in qf), *(k.shape[a] for a in kf))
    layout = list(range(r))  # the scores' axis i is the dot's axis layout[i]
    moved = []
    for step in steps:
        if step[0] == "transpose":
            p = tuple(int(a) for a in step[1])
            if sorted(p) != list(range(r)):
                return None
            layout = [layout[a] for a in p]
        elif step[0] in ("add", "where"):
            x = jnp.asarray(step[1])
            if x.ndim > r:
                return None
            x = x.reshape((1,) * (r - x.ndim) + x.shape)
            moved.append((step[0], jnp.transpose(x, np.argsort(layout)), *step[2:]))
        else:
            moved.append(step)

    def roles(x, free, promote: bool):  # (kept, squeezed, made batch) free axes
        big = [a for a in free if x.shape[a] != 1]
        if not free:
            return None, [], []
        if len(big) > (2 if promote else 1):
            return None
        keep = max(big, key=lambda a: x.shape[a]) if big else free[-1]
        return keep, [a for a in free if a != keep and a not in big], [a for a in big if a != keep]

    qroles, kroles = roles(q, qf, True), roles(k, kf, False)
    if qroles is None or kroles is None:
        return None
    (qkeep, dq, gq), (_, dk, _) = qroles, kroles
    if not dq and not dk and not gq and layout == list(range(r)):
        return _Canonical(q, k, other, score_dn, dimension_numbers, tuple(steps), dshape)
    # The scores dot's axes: q's free axes come after the batch ones, k's last.
    qdot = {a: nb + j for j, a in enumerate(qf)}
    drop = [qdot[a] for a in dq] + [nb + len(qf) + kf.index(a) for a in dk]
    promoted = [qdot[a] for a in gq]
    order = [d for d in range(r) if d not in drop and d not in promoted]
    order = order[:nb] + promoted + order[nb:]  # the kernel's scores axes, in the dot's
    (pc, pb), (oc, ob) = _p_dims(dimension_numbers, operand)
    pc, pb = [layout[a] for a in pc], [layout[a] for a in pb]
    if set(drop + promoted) & set(pc + pb):
        return None
    operands = [jnp.asarray(st[1]) for st in moved if st[0] in ("add", "where")]
    if any(x.shape[d] != 1 for x in operands for d in drop):
        return None  # an operand that does not broadcast to the scores

    def to_kernel(x):  # a steps operand, from the dot's layout to the kernel's scores'
        x = jnp.transpose(x, order + drop)
        return x.reshape(x.shape[: len(order)])

    steps2 = tuple(
        (st[0], to_kernel(jnp.asarray(st[1])), *st[2:]) if st[0] in ("add", "where") else st
        for st in moved
    )

    def renumber(axes, gone):
        return [a - sum(g < a for g in gone) for a in axes]

    # q keeps its axes but the squeezed ones; the promoted axes join its batch axes, and
    # k and v get a unit axis (at the end) for each.
    q2 = jnp.squeeze(q, tuple(dq))
    k2 = jnp.squeeze(k, tuple(dk))
    k2 = k2.reshape(k2.shape + (1,) * len(gq))
    v2 = other.reshape(other.shape + (1,) * len(gq))
    kn, vn = k2.ndim - len(gq), other.ndim
    sdn = (
        (tuple(renumber(lc, dq)), tuple(renumber(rc, dk))),
        (
            tuple(renumber(list(lb) + gq, dq)),
            tuple(renumber(rb, dk)) + tuple(range(kn, kn + len(gq))),
        ),
    )
    pc2 = tuple(order.index(a) for a in pc)
    pb2 = tuple(order.index(a) for a in pb + promoted)
    oc2, ob2 = tuple(oc), tuple(ob) + tuple(range(vn, vn + len(gq)))
    dn = ((pc2, oc2), (pb2, ob2)) if operand == 0 else ((oc2, pc2), (ob2, pb2))
    # The output's axes by name: the batch pairs, the other operand's free axes, and the
    # probabilities' free axes named by the scores' axis they are.
    inv = {d: a for a, d in enumerate(layout)}
    (spc, spb), _ = _p_dims(dimension_numbers, operand)
    of = [("o", a) for a in range(other.ndim) if a not in oc and a not in ob]
    sf = [("s", a) for a in range(r) if a not in spc and a not in spb]
    bat = [("b", i) for i in range(len(pb))]
    orig = bat + (sf + of if operand == 0 else of + sf)
    kept = [("s", inv[qdot[qkeep]])] if qkeep is not None else []
    new = bat + [("s", inv[d]) for d in promoted]
    new += kept + of if operand == 0 else of + kept
    new += [("s", inv[d]) for d in drop]
    if sorted(new) != sorted(orig):
        return None  # a probabilities' free axis that is not q's
    perm = tuple(new.index(n) for n in orig)
    s_shape = tuple(dshape[d] for d in order)
    return _Canonical(q2, k2, v2, sdn, dn, steps2, s_shape, len(drop), perm)


def _scores_layout(q, k, other, score_dn, dimension_numbers, operand):
    """The kernel's axis maps ``(q_axes, k_axes, v_axes)`` and whether the product's
    output puts the values' axis before the queries', or None where the operands are
    not laid out as one attention: one query, key and d axis each, the softmax over the
    key axis (the scores' last), and the product contracting it with the batch axes in
    the scores' order."""
    (lc, rc), (lb, rb) = score_dn
    nb = len(lb)
    qf = [a for a in range(q.ndim) if a not in lc and a not in lb]
    kf = [a for a in range(k.ndim) if a not in rc and a not in rb]
    if len(lc) != 1 or len(qf) != 1 or len(kf) != 1 or nb > 4:
        return None
    (pc, pb), (oc, ob) = _p_dims(dimension_numbers, operand)
    of = [a for a in range(other.ndim) if a not in oc and a not in ob]
    if tuple(pc) != (nb + 1,) or tuple(pb) != tuple(range(nb)) or len(of) != 1:
        return None
    axes = ((*lb, qf[0], lc[0]), (*rb, kf[0], rc[0]), (*ob, oc[0], of[0]))
    return axes, operand == 1


def scores_route(
    q,
    k,
    other,
    score_dimension_numbers,
    dimension_numbers,
    operand: int = 0,
    steps=(),
    backend: str | None = None,
) -> str:
    """``"native"`` or ``"xla"``: who computes :func:`scores_softmax_dot` for these
    operands and steps. ``"native"`` needs the operands laid out as one attention the
    kernel takes (one query, key and d axis, the softmax over the keys, at most 4 batch
    axes), steps it takes (a float32 scalar scale, a float32 bias and a mask broadcasting
    to the scores, a concrete fill), and
    :func:`jqx.ops.dispatch.choose_scores_softmax_dot`'s ``"native"``.

    Raises:
      ValueError: ``operand`` not 0 or 1, an unknown step or ``backend``.
      RuntimeError: ``backend="native"`` where the kernel cannot run these.
    """
    return _scores_route(
        q, k, other, score_dimension_numbers, dimension_numbers, operand, steps, backend
    )[0]


def _scores_route(q, k, other, score_dn, dimension_numbers, operand, steps, backend):
    """:func:`scores_route`, and on the native route the kernel's axis maps and prepared
    steps (None on the XLA route)."""
    if operand not in (0, 1):
        raise ValueError(
            f"scores_softmax_dot: operand={operand!r} must be 0 (the probabilities are the "
            "lhs) or 1."
        )
    for step in steps:
        n = {"mul": 2, "div": 2, "add": 2, "where": 3, "transpose": 2}
        if n.get(step[0] if step else None) != len(step):
            raise ValueError(
                f"scores_softmax_dot: step {step!r} must be ('mul', c), ('div', c), "
                "('add', bias), ('where', mask, fill) or ('transpose', permutation)."
            )
    canon = _canonical(q, k, other, score_dn, dimension_numbers, operand, steps)
    layout = prepared = None
    if canon is not None:
        layout = _scores_layout(canon.q, canon.k, canon.other, canon.score_dn, canon.dn, operand)
    if layout is not None:
        prepared = _native_steps(canon.steps, canon.s_shape)
    if backend == "native" and prepared is None:
        raise RuntimeError(
            "scores_softmax_dot(backend='native'): the operands are not laid out as one "
            "attention the kernel takes (one query, key and d axis, the softmax over the "
            "keys, at most 4 batch axes), or a step's operand does not fit it (float32 "
            "scale and bias broadcasting to the scores, a concrete fill). Use backend=None "
            "or 'xla'."
        )
    if prepared is None or dispatch.choose_scores_softmax_dot(q, k, other, backend) != "native":
        return "xla", None
    return "native", (canon, layout, prepared)


def scores_softmax_dot(
    q,
    k,
    other,
    score_dimension_numbers,
    dimension_numbers,
    operand: int = 0,
    *,
    steps=(),
    precision=None,
    preferred_element_type=None,
    backend: str | None = None,
):
    """``dot_general(jax.nn.softmax(steps(dot_general(q, k, score_dimension_numbers))),
    other, dimension_numbers)``: attention from its queries and keys, the softmax over
    the key axis.

    ``steps`` are the operations a model puts between the scores dot and its softmax, in
    order: ``("mul", c)`` / ``("div", c)`` with a float32 scalar ``c`` (the ``1 /
    sqrt(d)`` scale), ``("add", bias)`` with a float32 bias of the scores' rank at that
    step (each dim its size or 1), ``("where", mask, fill)`` (``jnp.where(mask, s,
    fill)``), ``("transpose", permutation)`` (``jnp.transpose(s, permutation)``; the
    softmax is over the last axis after every step). ``jqx.quantized`` sends attention
    written ``softmax(einsum(q, k) ...) @ v`` here on CPU, and
    ``jax.nn.dot_product_attention``'s XLA form (docs/guide/run.md#attention). Two
    implementations, chosen by :func:`jqx.ops.dispatch.choose_scores_softmax_dot`:

    - ``"native"``: ``jqx.kernels.cpu.native.scores_softmax_dot`` (AVX512 or AVX2) on
      float32 operands laid out as one attention (one query, key and d axis, at most 4
      batch axes, the scores ``(batch..., query, key)``; transposes of the scores are
      undone by moving the steps' operands and the product's axes instead, q's or k's
      extra free axes of size 1 squeezed, and a second query axis (grouped queries)
      made a batch axis along which k and v are read at stride 0): it reads q, k and v where
      they are and writes neither the scores nor the probabilities. Each score is one
      fused multiply-add chain over d (within ``gamma_D sum |q k|``, as XLA's dot), the
      steps the same float32 operations, then the softmax and product as
      :func:`softmax_dot`'s kernel.
    - ``"xla"``: the scores with ``lax.dot_general``, the steps, then
      :func:`softmax_dot` (whose own dispatcher picks its kernel or XLA).

    Both are differentiable: the kernel's derivatives are those of XLA's formula.

    Args:
      q, k: the scores dot's operands.
      other: the values (the second product's other operand).
      score_dimension_numbers: ``lax.dot_general``'s for ``q`` and ``k``.
      dimension_numbers: ``lax.dot_general``'s for the probabilities and ``other``,
        the probabilities as operand ``operand``.
      operand: 0 when the probabilities are the product's lhs, 1 when they are the rhs.
      steps: the elementwise steps, as above.
      precision, preferred_element_type: as ``lax.dot_general`` (the XLA route).
      backend: None (the dispatcher's choice), ``"xla"`` or ``"native"``.

    Returns:
      What ``lax.dot_general`` of the probabilities and ``other`` returns.

    Raises:
      ValueError: ``operand`` not 0 or 1, an unknown step or ``backend``.
      RuntimeError: ``backend="native"`` where the kernel cannot run.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jqx.ops.attention import scores_softmax_dot
        >>> q = jnp.ones((1, 2, 4)); k = jnp.ones((1, 3, 4)); v = jnp.ones((1, 3, 5))
        >>> dn = (((2,), (2,)), ((0,), (0,)))  # (b, q, d) x (b, k, d) -> (b, q, k)
        >>> y = scores_softmax_dot(q, k, v, dn, (((2,), (1,)), ((0,), (0,))),
        ...                        steps=(("div", jnp.float32(2.0)),))
        >>> y.shape, float(y[0, 0, 0])
        ((1, 2, 5), 1.0)
    """
    steps = tuple(steps)
    route, native_args = _scores_route(
        q, k, other, score_dimension_numbers, dimension_numbers, operand, steps, backend
    )
    if route == "native":
        canon, (axes, swap), (names, scale, bias, mask, fill) = native_args
        cfg = _ScoresCfg(axes, names, fill)
        y = _scores_native(cfg, canon.q, canon.k, canon.other, scale, bias, mask)
        if swap:  # dot_general puts the lhs's (other's) free axis first
            y = jnp.swapaxes(y, -1, -2)
        y = canon.finish(y)
        return y.astype(preferred_element_type) if preferred_element_type is not None else y
    s = jax.lax.dot_general(q, k, score_dimension_numbers, precision=precision)
    s = apply_score_steps(s, steps)
    return softmax_dot(
        s,
        other,
        dimension_numbers,
        operand,
        precision=precision,
        preferred_element_type=preferred_element_type,
        backend=backend,
    )


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """``softmax(q k^T / sqrt(d) | visible) v`` with grouped-query heads (XLA).

    Args:
      q: float (batch, seq, heads, d).
      k, v: (batch, kv_heads, slots, d), any float dtype (read as float32).
      visible: bool (batch, seq, slots): which slots each query may attend to.

    Returns:
      float32 (batch, seq, heads * d).
    """
    b, t, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    # (b, kvh, g*t, d): the query heads that share a kv head become rows of one product
    qq = q.astype(jnp.float32).reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)
    qq = qq.reshape(b, kvh, g * t, d)
    batch = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(qq, k.astype(jnp.float32), (((3,), (3,)), batch))
    scores = scores.reshape(b, kvh, g, t, -1) * (1.0 / math.sqrt(d))
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kvh, g * t, -1)
    out = jax.lax.dot_general(probs, v.astype(jnp.float32), (((3,), (2,)), batch))
    out = out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h * d)


def decode_attention(
    q: jax.Array,
    k: jax.Array | KVCodes,
    v: jax.Array | KVCodes,
    lo: jax.Array,
    hi: jax.Array,
    *,
    backend: str | None = None,
) -> jax.Array:
    """One query per sequence over cache slots ``lo[b] <= s < hi[b]``.

    Args:
      q: float32 (batch, heads, d).
      k, v: (batch, kv_heads, slots, d), float32 or float16 arrays, or the
        :class:`KVCodes` of a quantized cache (both of one format). An int4 cache
        reads slots ``hi - 1``'s group (from ``(hi - 1) // group * group``) from its
        residual window. Rotated codes (:attr:`KVCodes.rotated`) are read as stored:
        the query is rotated for rotated keys, the output rotated back for rotated
        values.
      lo, hi: int32 (batch,): the visible slots of each sequence (``hi`` may be traced;
        it changes every step without retracing).
      backend: None (the dispatcher's choice), ``"xla"`` or ``"native"``.

    Returns:
      float32 (batch, heads, d); zeros for a sequence with no visible slot.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.ops.attention import decode_attention, kv_init, kv_write
        >>> x = jnp.ones((1, 1, 3, 4))
        >>> k = kv_write(kv_init("int8", "k", (1, 1, 8, 4)), x, 0, jnp.zeros((1,), jnp.int32))
        >>> v = kv_write(kv_init("int8", "v", (1, 1, 8, 4)), x, 0, jnp.zeros((1,), jnp.int32))
        >>> decode_attention(jnp.ones((1, 2, 4)), k, v, jnp.array([0]), jnp.array([3]),
        ...                  backend="xla").tolist()
        [[[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]]
    """
    quantized = isinstance(k, KVCodes)
    if quantized != isinstance(v, KVCodes) or (quantized and k.kind != v.kind):
        raise ValueError(
            "decode_attention: k and v must be both float arrays or both KVCodes of one "
            f"format, got {_what(k)} and {_what(v)}."
        )
    if quantized and (k.rotated or v.rotated):
        # Rotated keys: rot(q) . rot(k) = q . k. Rotated values: the probability-weighted
        # sum of rot(v) is rot(out) (the rotation is linear and its own inverse).
        qr = numerics.hadamard_rotate(q.astype(jnp.float32)) if k.rotated else q
        kp, vp = (dataclasses.replace(c, rotated=False) for c in (k, v))
        out = decode_attention(qr, kp, vp, lo, hi, backend=backend)
        return numerics.hadamard_rotate(out) if v.rotated else out
    impl = dispatch.choose_attention(q, k, backend)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "native":
        lo32, hi32 = lo.astype(jnp.int32), hi.astype(jnp.int32)
        q32 = q.astype(jnp.float32)
        if quantized and k.kind == "int4":
            return native.decode_attention_int4(
                q32,
                k.codes,
                k.scale,
                k.zero,
                k.residual,
                v.codes,
                v.scale,
                v.zero,
                v.residual,
                lo32,
                hi32,
                scale=scale,
            )
        if quantized:
            return native.decode_attention_quantized(
                q32, k.codes, k.scale, v.codes, v.scale, lo32, hi32, scale=scale
            )
        return native.decode_attention(q32, k, v, lo32, hi32, scale=scale)
    b, h, d = q.shape
    if quantized:
        out = _quantized_attention_xla(q, k, v, lo, hi, scale)
    else:
        s = jnp.arange(k.shape[2])
        visible = (s[None, :] >= lo[:, None]) & (s[None, :] < hi[:, None])
        out = gqa_attention(q[:, None], k, v, visible[:, None]).reshape(b, h, d)
    return jnp.where((hi > lo)[:, None, None], out, 0.0)


def _what(x) -> str:
    if isinstance(x, KVCodes):
        return f"KVCodes({x.kind!r})"
    return f"{getattr(x, 'dtype', type(x).__name__)} array"


def _quantized_attention_xla(q, k: KVCodes, v: KVCodes, lo, hi, scale):
    """Decode attention on the codes: the scales enter the products (scores are ``q .
    codes`` times the key scales, values are summed with weights ``p * scale``)."""
    b, h, d = q.shape
    kvh, n = k.codes.shape[1], k.codes.shape[2]
    g = h // kvh
    f32 = jnp.float32
    qg = q.astype(f32).reshape(b, kvh, g, d) * scale
    dn = (((3,), (3,)), ((0, 1), (0, 1)))  # (b, kvh, g, d) . (b, kvh, n, d)
    s = jnp.arange(n, dtype=jnp.int32)
    lo = lo.astype(jnp.int32)
    hi = hi.astype(jnp.int32)
    if k.kind == "int4":
        grp = k.group
        qhi = jnp.where(hi > 0, (hi - 1) // grp * grp, 0)  # the residual's first slot
    else:
        qhi = hi
    vis = (s[None, :] >= lo[:, None]) & (s[None, :] < qhi[:, None])  # (b, n)
    if k.kind == "int8":
        sc = jax.lax.dot_general(qg, k.codes.astype(f32), dn)
        sc = sc * k.scale.astype(f32)[:, :, None, :]
    elif k.kind == "fp8":
        sc = jax.lax.dot_general(qg, fp8_values(k.codes), dn) * k.scale[:, :, None, None]
    else:
        grp = k.group
        codes = unpack_4bit(k.codes, d).astype(f32).reshape(b, kvh, n // grp, grp, d)
        qs = qg[:, :, :, None, :] * k.scale.astype(f32)[:, :, None]  # (b, kvh, g, ng, d)
        sc = jnp.einsum("bkgnd,bkntd->bkgnt", qs, codes)
        sc = sc - jnp.einsum("bkgnd,bknd->bkgn", qs, k.zero.astype(f32))[..., None]
        sc = sc.reshape(b, kvh, g, n)
    sc = jnp.where(vis[:, None, None], sc, _MASKED)
    if k.kind == "int4":
        grp = k.group
        rs = qhi[:, None] + jnp.arange(grp, dtype=jnp.int32)[None, :]  # (b, grp) slots
        rvis = (rs >= lo[:, None]) & (rs < hi[:, None])
        rsc = jax.lax.dot_general(qg, k.residual.astype(f32), dn)
        sc = jnp.concatenate([sc, jnp.where(rvis[:, None, None], rsc, _MASKED)], axis=-1)
    p = jax.nn.softmax(sc, axis=-1)
    pq = p[..., :n]
    if v.kind == "int8":
        w = pq * v.scale.astype(f32)[:, :, None, :]
        out = jax.lax.dot_general(w, v.codes.astype(f32), (((3,), (2,)), ((0, 1), (0, 1))))
    elif v.kind == "fp8":
        out = jax.lax.dot_general(pq, fp8_values(v.codes), (((3,), (2,)), ((0, 1), (0, 1))))
        out = out * v.scale[:, :, None, None]
    else:
        grp = v.group
        codes = unpack_4bit(v.codes, d).astype(f32).reshape(b, kvh, n, d // grp, grp)
        w = pq[..., None] * v.scale.astype(f32)[:, :, None]  # (b, kvh, g, n, nj)
        out = jnp.einsum("bkgsj,bksjc->bkgjc", w, codes)
        out = out - jnp.einsum("bkgsj,bksj->bkgj", w, v.zero.astype(f32))[..., None]
        out = out.reshape(b, kvh, g, d)
        pr = p[..., n:]
        if v.residual is not None:
            window = v.residual
        else:  # the rows past hi are not read: zeros (not whatever their codes hold)
            window = _int4_value_rows(v, jnp.clip(rs, 0, n - 1))
            window = jnp.where(rvis[:, None, :, None], window, 0.0)
        out = out + jax.lax.dot_general(pr, window.astype(f32), (((3,), (2,)), ((0, 1), (0, 1))))
    return out.reshape(b, h, d)


def _int4_value_rows(v: KVCodes, rows: jax.Array) -> jax.Array:
    """float32 values of an int4 values layer at slots ``rows`` (B, R) of each
    sequence: (B, KVH, R, D), read from the codes (the keys' residual slots of a layer
    kept without a value window)."""
    d = v.shape[3]
    at = rows[:, None, :, None]
    codes = unpack_4bit(jnp.take_along_axis(v.codes, at, axis=2), d).astype(jnp.float32)
    sc = jnp.repeat(jnp.take_along_axis(v.scale, at, axis=2).astype(jnp.float32), v.group, 3)
    zp = jnp.repeat(jnp.take_along_axis(v.zero, at, axis=2).astype(jnp.float32), v.group, 3)
    return (codes - zp) * sc
