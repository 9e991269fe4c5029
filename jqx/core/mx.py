"""Microscaling block formats: OCP MX (E8M0 block scales) and NVFP4 (E4M3 block scales).

The scale formulas of the block-scaled formats live here, beside the seed formulas of
:mod:`jqx.core.numerics` (which builds every QArray: :func:`numerics.make_qarray`).

**MX** (OCP Microscaling v1.0): blocks of :data:`MX_BLOCK` = 32 elements along the
reduction axis share one E8M0 scale, a power of two ``2^e`` stored as the byte ``e +
127`` (``ml_dtypes.float8_e8m0fnu``; 255 is NaN, there is no zero). Elements are FP8
E4M3 / E5M2, FP6 E2M3 / E3M2, FP4 E2M1 or INT8, rounded to nearest with ties to even
and saturating at the element format's largest magnitude. The spec's scale is ``2^(floor
(log2 amax) - emax)`` with ``emax = floor(log2(element max))`` (``scale_mode="floor"``);
the other modes published encoders use are selectable (:data:`SCALE_MODES`):

- ``"floor"``: the spec (torchao ``ScaleCalculationMode.FLOOR``); the block's largest
  values may saturate (e.g. amax 7.9 with FP4 E2M1: scale 1, 7.9 -> 6).
- ``"ceil"``: ``floor(log2 amax)`` plus one when amax is not a power of two (torchao
  ``CEIL``): never saturates, loses one binade at the bottom.
- ``"even"``: amax rounded at the element's mantissa width before the floor (torchao
  ``EVEN``): rounds the scale up only where the floor would saturate by more than half
  a step.
- ``"rceil"``: ``2^ceil(log2(amax / element max))`` (torchao ``RCEIL``, the NVIDIA
  cuBLAS / ``cvt.rp.ue8m0`` rule).
- ``"ct"``: compressed-tensors' rule (``generate_mx_scales``): ``"even"`` but with the
  mantissa width of FP4 E2M1 (1 bit) for 4- and 8-bit elements and of FP6 E2M3 (3 bits)
  for 6-bit ones. For MXFP4 it equals ``"even"``; for MXFP8 E4M3 it rounds up earlier.

Exponents are clamped to E8M0's range ``[-127, 127]``: a block of zeros gets ``2^-127``
(and zero codes), as torchao and compressed-tensors give it. Under a scale mode that
rounds up, a block whose amax lies within a rounding of float32's largest value would
dequantize to ``2^128`` (inf): its elements saturate at the largest grid value below
that instead, so every finite input dequantizes to a finite value. A block holding NaN or Inf
gets the NaN scale (byte 255), so its NaN reaches every output; the eager entry points
raise instead (:func:`jqx.core.numerics.check_finite_flag`).

MXINT8: the spec's elements are 8-bit two's complement with an implicit ``2^-6`` (values
-2 .. 1 63/64) and ``emax = 0``. jqx stores the integer codes (symmetric range -127 ..
127) and folds the ``2^-6`` into the stored E8M0 scale (its exponent is the spec's minus
6), so ``dequantize`` stays ``codes * scale``; export adds 6 back.

**NVFP4**: FP4 E2M1 elements in blocks of :data:`NVFP4_BLOCK` = 16, one FP8 E4M3 scale per
block and one float32 per tensor, compressed-tensors' recipe exactly: ``gs = 448 * 6 /
amax(tensor)``, block scale ``e4m3(gs * (amax_block / 6))`` (a zero block gets E4M3's
eps 0.125), elements ``x / (block_scale / gs)`` rounded onto E2M1. The QArray holds the
E4M3 block scales as ``scale`` and ``1 / gs`` as the two-level ``super_scale`` over the
whole tensor (``super_block = shape``).

Storage: FP4 codes two per byte (the sign of a value that rounds to zero is kept: code
8 is -0, as ml_dtypes' own cast and the published packers give it); FP8 and INT8 one
byte; FP6 codes four per three bytes along the last axis
(:func:`jqx.core.qarray.pack_6bit`). ``nbytes`` is 4.25 bits per element for MXFP4,
6.25 for MXFP6, 8.25 for MXFP8 and MXINT8, 4.5 for NVFP4 (plus 4 bytes per tensor).

XLA:CPU flushes float32 subnormals: the E8M0 scale ``2^-127`` decodes to 0 in a CPU
product. It only arises for blocks whose amax is below about ``2^-125 * element max``,
whose values are themselves at or below float32's smallest normal.

Example:
    >>> import jax.numpy as jnp
    >>> q = quantize_mx(jnp.linspace(-1.0, 1.0, 64).reshape(2, 32), "fp4_e2m1")
    >>> q.format, q.scale.dtype.name, q.nbytes * 8 / 64
    ('fp4_e2m1', 'float8_e8m0fnu', 4.25)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jqx.core import formats as _formats
from jqx.core import numerics as _num
from jqx.core.qarray import ActSpec, QArray, packed_along_last

__all__ = [
    "MX_BLOCK",
    "NVFP4_BLOCK",
    "MX_ELEMENTS",
    "SCALE_MODES",
    "check_mx_element",
    "mx_scale_bits",
    "quantize_mx",
    "quantize_nvfp4",
    "fake_quant_mx",
    "mx_blocks",
    "nvfp4_global_scale",
    "e8m0_to_float",
    "encode_mx",
    "nvfp4_block_scale",
    "encode_nvfp4",
]

MX_BLOCK = 32
NVFP4_BLOCK = 16
MX_ELEMENTS = ("fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "int8")
SCALE_MODES = ("floor", "ceil", "even", "rceil", "ct")
ScaleMode = Literal["floor", "ceil", "even", "rceil", "ct"]

_E8M0_NAN = 255
_F32_MANT = 23
# MXINT8's implicit element scale 2^-6 (spec), folded into the stored scale.
_INT8_SHIFT = 6


def check_mx_element(fmt: str | _formats.Format) -> _formats.Format:
    """The element format of an MX block format, or a teaching error.

    Example:
        >>> check_mx_element("e2m1").name
        'fp4_e2m1'
    """
    f = _formats.get(fmt)
    if f.name not in MX_ELEMENTS:
        raise ValueError(
            f"fmt={f.name!r} has no MX form; MX elements are {', '.join(MX_ELEMENTS)} "
            "(OCP Microscaling v1.0). Use e.g. fmt='fp4_e2m1' (MXFP4) or 'fp8_e4m3' (MXFP8)."
        )
    return f


def _check_mode(mode: str) -> None:
    if mode not in SCALE_MODES:
        raise ValueError(
            f"scale_mode={mode!r} is not supported; use one of {', '.join(SCALE_MODES)} "
            "('floor' is the OCP spec's rule)."
        )


def _emax(f: _formats.Format) -> int:
    """The spec's emax: exponent of the element format's largest power of two (0 for INT8)."""
    return 0 if f.kind == "int" else int(math.floor(math.log2(f.max)))


def _round_mbits(f: _formats.Format, mode: str) -> int:
    if mode == "ct":
        return 3 if f.bits == 6 else 1
    return 6 if f.kind == "int" else f.mantissa_bits


def mx_scale_bits(amax: jax.Array, fmt: str | _formats.Format, mode: ScaleMode = "floor"):
    """The E8M0 byte (biased exponent, uint8) of the MX scale of blocks whose largest
    magnitude is ``amax`` (float32), for element format ``fmt`` and scale rounding
    ``mode`` (module docstring). Non-finite ``amax`` gives 255 (NaN). For INT8 the
    byte is the spec's minus 6 (module docstring).

    Example:
        >>> import jax.numpy as jnp
        >>> mx_scale_bits(jnp.array([6.0, 7.9, 0.0]), "fp4_e2m1").tolist()
        [127, 127, 0]
        >>> mx_scale_bits(jnp.array([6.0, 7.9]), "fp4_e2m1", "rceil").tolist()
        [127, 128]
    """
    f = check_mx_element(fmt)
    _check_mode(mode)
    a = jnp.abs(jnp.asarray(amax, jnp.float32))
    finite = jnp.isfinite(a)
    a = jnp.where(finite, a, 0.0)
    if mode == "rceil":
        # amax * (1 / max) in float32, rounded up to a power of two (torchao/cuBLAS).
        d = a * np.float32(1.0 / f.max)
        bits = lax.bitcast_convert_type(d, jnp.int32)
        be = (bits >> _F32_MANT) & 0xFF
        mant = bits & 0x7FFFFF
        up = jnp.where(be == 0, mant > 0x400000, mant != 0)
        # For INT8, f.max is the code limit 127, so this is already the stored scale
        # (the spec's, whose element max is 127 / 64, minus 6).
        e = be + up.astype(jnp.int32) - 127
    else:
        bits = lax.bitcast_convert_type(a, jnp.int32)
        if mode in ("even", "ct"):
            add = 1 << (_F32_MANT - _round_mbits(f, mode) - 1)
            bits = (bits + add) & 0x7F800000
        be = (bits >> _F32_MANT) & 0xFF
        e = be - 127
        if mode == "ceil":
            e = e + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
        e = e - _emax(f) - (_INT8_SHIFT if f.kind == "int" else 0)
    e = jnp.clip(e, -127, 127)
    return jnp.where(finite, e + 127, _E8M0_NAN).astype(jnp.uint8)


def e8m0_to_float(bits: jax.Array) -> jax.Array:
    """float32 value of E8M0 bytes: ``2^(b - 127)``, NaN for 255.

    Example:
        >>> import jax.numpy as jnp
        >>> e8m0_to_float(jnp.array([127, 130, 255], jnp.uint8)).tolist()
        [1.0, 8.0, nan]
    """
    return lax.bitcast_convert_type(bits.astype(jnp.uint8), jnp.float8_e8m0fnu).astype(jnp.float32)


def _inv_pow2(bits: jax.Array) -> jax.Array:
    """``2^(127 - b)`` as a normal float32 (exact reciprocal of the scale; the codes use
    a product, which XLA keeps exact, instead of a division by a subnormal)."""
    b = bits.astype(jnp.int32)
    e = jnp.clip(254 - b, 1, 254)  # biased exponent of 2^-(b-127)
    v = lax.bitcast_convert_type(e << _F32_MANT, jnp.float32)
    return jnp.where(b == _E8M0_NAN, jnp.nan, v)


def _subnormal_parts(x: jax.Array):
    """``(is_subnormal, signed mantissa as float32)`` of float32 ``x``: XLA:CPU flushes
    subnormal operands to zero, so they are rebuilt exactly from their bits."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    mant = (bits & 0x7FFFFF).astype(jnp.float32)
    sub = ((bits & 0x7F800000) == 0) & (mant != 0)
    return sub, jnp.where((bits >> 31) == 1, -mant, mant)


def _pow2(e: jax.Array) -> jax.Array:
    """``2^e`` as float32 for integer ``e``, clamped to the normal range."""
    eb = jnp.clip(e.astype(jnp.int32) + 127, 1, 254)
    return lax.bitcast_convert_type(eb << _F32_MANT, jnp.float32)


def _signed_zero(y, xb, sub, above):
    """Zeros as the published encoders leave them: they divide in IEEE arithmetic
    (no flushing) and then add a +0.0 zero point, so a quotient that is exactly zero
    (zero input, or underflow past half the smallest subnormal) is +0, and a negative
    one that is only tiny stays negative (its FP4 code is 8, -0). XLA:CPU flushes
    those tiny quotients to zero: ``above`` (the quotient scaled by 2^100, computed in
    the normal range) tells them apart."""
    neg = (lax.bitcast_convert_type(xb, jnp.uint32) >> 31) == 1
    nonzero = above > np.float32(2.0**-50)
    return jnp.where(y == 0, jnp.where(nonzero & neg, -0.0, 0.0), y)


def _div_exact_sub(xb: jax.Array, d: jax.Array) -> jax.Array:
    """``x / d`` correctly rounded, also for subnormal ``x``; zeros signed as
    :func:`_signed_zero` says. ``d`` broadcasts against ``xb`` (one divisor per block).

    The divisor is made an elementwise expression of ``xb`` (``d + min(|x|, 0)``, which
    is ``d`` for every non-NaN ``x``; a NaN ``x`` gives NaN either way): XLA rewrites a
    division by a broadcast into a product with its reciprocal, and :func:`_exact_div`'s
    barrier would store the broadcast divisor in full. This way the divisions fuse into
    one pass over ``x``."""
    dd = d + jnp.minimum(jnp.abs(xb), np.float32(0.0))
    y = xb / dd
    sub, m = _subnormal_parts(xb)
    y = jnp.where(sub, ((m / dd) * np.float32(2.0**-75)) * np.float32(2.0**-74), y)
    ax = jnp.abs(xb)
    above = jnp.where(
        sub,
        (jnp.abs(m) / dd) * np.float32(2.0**-49),
        jnp.where(ax < 1, (ax * np.float32(2.0**100)) / dd, jnp.inf),
    )
    return _signed_zero(y, xb, sub, above)


def _encode_elements(y: jax.Array, f: _formats.Format) -> jax.Array:
    """Element codes of already-scaled float32 values (RNE, saturating)."""
    if f.kind == "int":
        return jnp.clip(jnp.round(y), -f.qmax, f.qmax).astype(jnp.int8)
    if f.name == "fp4_e2m1":
        # Sign-magnitude: a negative value that rounds to zero keeps its sign (code 8),
        # as ml_dtypes' cast and the published packers give it.
        mag = _formats.encode(jnp.abs(y), f)
        sign = (lax.bitcast_convert_type(y, jnp.uint32) >> 31).astype(jnp.uint8)
        return mag | (sign << 3)
    return _formats.encode(y, f)


def _materialized(x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """``x``, stored before its users run: XLA fuses neither into nor out of a
    conditional (XLA:CPU drops optimization barriers before fusing). Both branches are
    the same computation, so the predicate only has to be one XLA cannot fold: it reads
    the first element of ``key`` (default ``x``). Pass an array that is already stored
    when ``x``'s producer is expensive: a predicate read from ``x`` is a second user of
    that producer, which XLA then stores separately rather than compute twice."""
    if x.size == 0:
        return x
    k = x if key is None or key.size == 0 else key
    pred = k.ravel()[0].astype(jnp.int32) >= 0

    def copy(v):
        if jnp.issubdtype(v.dtype, jnp.floating):  # through the bits (xor takes integers)
            u = lax.bitcast_convert_type(v, jnp.dtype(f"uint{v.dtype.itemsize * 8}"))
            return lax.bitcast_convert_type(u ^ jnp.zeros((), u.dtype), v.dtype)
        return v ^ jnp.zeros((), v.dtype)

    return lax.cond(pred, copy, copy, x)


def _block_factors(sbits: jax.Array, f: _formats.Format) -> dict[str, jax.Array]:
    """Per-block factors of :func:`_mx_codes_at`, computed once per block.

    XLA would otherwise fuse them into the elementwise loop and recompute them for
    every element. It drops optimization barriers before fusing on CPU, but does not
    fuse a conditional into its users; both branches are this computation, so the
    predicate only has to be one XLA cannot fold."""
    if sbits.size == 0:
        return _block_factors_now(sbits, f)
    return lax.cond(
        sbits.ravel()[0].astype(jnp.int32) < _E8M0_NAN,
        lambda s: _block_factors_now(s, f),
        lambda s: _block_factors_now(s, f),
        sbits,
    )


def _block_factors_now(sbits: jax.Array, f: _formats.Format) -> dict[str, jax.Array]:
    b = sbits.astype(jnp.int32)
    nan = b == _E8M0_NAN
    k = 127 - b
    # Element times scale stays finite in float32 iff v < 2^kc: only blocks whose amax
    # is near float32's largest value with a scale rounded up (every mode but "floor")
    # reach 2^128; their elements saturate at the largest grid value below 2^(128 - e).
    kc = 255 - b
    if f.kind == "int":
        cap = _pow2(jnp.minimum(kc, 16)) - 1.0
    else:
        # The grid's predecessor of 2^kc (2^(kc-1) is a normal value for every element).
        cap = _pow2(jnp.minimum(kc, 64)) * np.float32(1.0 - 2.0 ** -(f.mantissa_bits + 1))
    fac = {
        "inv": _inv_pow2(sbits),
        # One clip: the float32 cap and the element format's saturation.
        "cap": jnp.minimum(cap, np.float32(f.qmax if f.kind == "int" else f.max)),
        # x = m * 2^-149 for subnormal x; split the power so each factor stays normal.
        "p_sub": jnp.where(nan, jnp.nan, _pow2(k - 75)),
        "p_nz": _pow2(k - 49),
        # |x| * 2^k > 2^-150 for normal x iff its bits plus this offset are positive
        # (the exponent as _inv_pow2 clamps it; the offset is capped at 0 to stay in int32).
        "t_off": jnp.minimum(jnp.clip(k, -126, 127) + 23, 0) << _F32_MANT,
        "zero": jnp.where(nan, jnp.nan, np.float32(0.0)),
    }
    return fac


def _scaled_values(xb: jax.Array, fac: dict[str, jax.Array], signed_zero: bool) -> jax.Array:
    """``x / 2^(b - 127)`` exactly, also for subnormal ``x`` (XLA:CPU flushes subnormal
    operands to zero, so they are rebuilt from their bits); NaN in blocks whose scale
    is NaN. With ``signed_zero``, a quotient that is exactly zero (zero input, or an
    underflow past half the smallest subnormal) is +0 and a negative one that is only
    tiny stays -0, as the published encoders leave them: they divide in IEEE arithmetic
    (no flushing) and then add a +0.0 zero point. ``fac`` holds the factors of
    :func:`_block_factors`, broadcast to ``xb``."""
    xi = lax.bitcast_convert_type(xb, jnp.int32)
    ai = xi & 0x7FFFFFFF
    sub = ai < (1 << _F32_MANT)  # subnormal or zero
    m = ai.astype(jnp.float32)
    ys = (m * fac["p_sub"]) * np.float32(2.0**-74)
    y = jnp.where(sub, jnp.where(xi < 0, -ys, ys), xb * fac["inv"])
    if not signed_zero:
        return y  # already NaN in NaN blocks: 0 * NaN, x * NaN
    # XLA:CPU flushes an underflowing product to a zero of the product's sign: only a
    # quotient at or below 2^-150 (+0 in IEEE plus a +0 zero point) needs changing.
    nonzero = jnp.where(sub, m * fac["p_nz"] > np.float32(2.0**-50), ai + fac["t_off"] > 0)
    return jnp.where(nonzero, y, fac["zero"])


def _minifloat_bits(y: jax.Array, f: _formats.Format) -> tuple[jax.Array, jax.Array]:
    """``(sign, magnitude bits)`` (bool, int32) of float32 ``y`` rounded to nearest, ties
    to even, onto the float format ``f`` (``|y| <= f.max``; NaN handled by the caller).

    Integer steps on the float32 representation, which XLA:CPU vectorises (its own
    float8 conversion does not, and FP6 has no XLA type): normal values round their
    mantissa by adding half a step minus one plus the kept mantissa's last bit;
    subnormal ones are ``round(|y| / smallest subnormal)``, whose carry into the
    smallest normal gives that normal's bits."""
    m = f.mantissa_bits
    emin = 1 - f.bias  # exponent of the smallest normal
    yi = lax.bitcast_convert_type(y, jnp.int32)
    a = yi & 0x7FFFFFFF
    sh = _F32_MANT - m
    norm = ((a + ((1 << (sh - 1)) - 1) + ((a >> sh) & 1)) >> sh) - ((127 - f.bias) << m)
    sub = jnp.round(jnp.abs(y) * np.float32(2.0 ** (m - emin))).astype(jnp.int32)
    return yi < 0, jnp.where(a < ((127 + emin) << _F32_MANT), sub, norm)


def _float_codes(y: jax.Array, f: _formats.Format) -> jax.Array:
    """Codes of FP8 / FP6 elements from scaled values clipped to ``f``'s range: FP8 as
    XLA's float8 conversion gives them (-0 kept; NaN is the all-ones magnitude for
    E4M3, 0x7E for E5M2, with the input's sign); FP6 as the table encoder gives them
    (code 0 for zeros of either sign, 63 for NaN)."""
    neg, mag = _minifloat_bits(y, f)
    nan = jnp.isnan(y)
    if f.bits == 8:
        nan_mag = 0x7F if f.name == "fp8_e4m3" else 0x7E
        code = jnp.where(nan, nan_mag, mag) | jnp.where(neg, 0x80, 0)
        return lax.bitcast_convert_type(code.astype(jnp.uint8), f.dtype)
    code = jnp.where(mag == 0, 0, mag | jnp.where(neg, 1 << (f.bits - 1), 0))
    return jnp.where(nan, 63, code).astype(jnp.uint8)


def _times_inv_scale(xb: jax.Array, sbits: jax.Array, axis: int) -> jax.Array:
    """``x / 2^(b - 127)`` as the previous encoder computed it (blocks along ``axis``),
    kept for :func:`_fp8_codes_jvp` only: FP8 codes are differentiable, and their
    derivative is this chain's."""
    k = jnp.expand_dims(127 - sbits.astype(jnp.int32), axis)
    y = xb * jnp.expand_dims(_inv_pow2(sbits), axis)
    sub, m = _subnormal_parts(xb)
    y = jnp.where(sub, (m * _pow2(k - 75)) * _pow2(jnp.full_like(k, -74)), y)
    ax = jnp.abs(xb)
    above = jnp.where(
        sub,
        jnp.abs(m) * _pow2(k - 49),
        jnp.where(ax < 1, (ax * np.float32(2.0**100)) * _pow2(k), ax * _pow2(k + 100)),
    )
    y = _signed_zero(y, xb, sub, above)
    return jnp.where(jnp.expand_dims(sbits, axis) == _E8M0_NAN, jnp.nan, y)


def _fp8_codes_previous(xb: jax.Array, sbits: jax.Array, f: _formats.Format, axis: int):
    kc = jnp.expand_dims(255 - sbits.astype(jnp.int32), axis)
    cap = _pow2(jnp.minimum(kc, 64)) * np.float32(1.0 - 2.0 ** -(f.mantissa_bits + 1))
    y = jnp.clip(_times_inv_scale(xb, sbits, axis), -cap, cap)
    return jnp.clip(y, -f.max, f.max).astype(f.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _fp8_codes(xb: jax.Array, sbits: jax.Array, f: _formats.Format, axis: int) -> jax.Array:
    return _mx_codes_fast(xb, sbits, f, axis)


@_fp8_codes.defjvp
def _fp8_codes_jvp(f, axis, primals, tangents):
    # The fast encoder works on the bits (no derivative); the previous one passed
    # tangents through its float8 conversion, and callers may rely on that.
    xb, sbits = primals
    _, t = jax.jvp(lambda v: _fp8_codes_previous(v, sbits, f, axis), (xb,), (tangents[0],))
    return _fp8_codes(xb, sbits, f, axis), t


def _mx_codes_at(xb: jax.Array, sbits: jax.Array, f: _formats.Format, axis: int) -> jax.Array:
    """Element codes of blocks ``xb`` whose elements run along ``axis`` under E8M0 bytes
    ``sbits`` (``xb``'s shape without ``axis``); :func:`_mx_codes_fast`."""
    if f.kind == "float":
        return _fp8_codes(xb, sbits, f, axis % xb.ndim)
    return _mx_codes_fast(xb, sbits, f, axis)


def _mx_codes_fast(xb: jax.Array, sbits: jax.Array, f: _formats.Format, axis: int) -> jax.Array:
    """Element codes of blocks ``xb`` whose elements run along ``axis`` under E8M0 bytes
    ``sbits`` (``xb``'s shape without ``axis``). One fused elementwise pass: RNE,
    saturating at the element's largest value (and below float32's largest value
    times the scale, see :func:`_block_factors`)."""
    fac = {k: jnp.expand_dims(v, axis) for k, v in _block_factors(sbits, f).items()}
    # The sign of a zero only shows in FP8's and FP4's codes (FP6 and INT8 give 0).
    y = _scaled_values(xb, fac, signed_zero=f.bits in (4, 8) and f.kind != "int")
    y = jnp.clip(y, -fac["cap"], fac["cap"])
    if f.kind == "int":
        return jnp.round(y).astype(jnp.int8)
    if f.name == "fp4_e2m1":
        return _encode_elements(y, f)
    return _float_codes(y, f)


def _mx_codes(xb: jax.Array, sbits: jax.Array, f: _formats.Format) -> jax.Array:
    """Element codes of blocks ``xb`` (blocks on the last axis) under E8M0 bytes ``sbits``."""
    return _mx_codes_at(xb, sbits, f, xb.ndim - 1)


def _move_last(x: jax.Array, axis: int) -> tuple[jax.Array, int]:
    axis = axis % x.ndim
    return jnp.moveaxis(x, axis, -1), axis


def _check_blocks(shape, axis: int, block: int, path: str | None, what: str) -> int:
    if x_ndim := len(shape):
        ax = axis % x_ndim
    else:
        raise ValueError(f"{what}: a scalar has no reduction axis to block; pass an array.")
    k = shape[ax]
    if k % block:
        where = f" of {path}" if path else ""
        raise ValueError(
            f"{what}: axis {ax}{where} has size {k}, not a multiple of the block {block}; "
            f"{what} blocks run along the reduction axis. Pad that axis to a multiple of "
            f"{block}, or exclude this leaf with a rule mapping its path to None."
        )
    return ax


@functools.partial(jax.jit, static_argnames=("fmt_name", "axis", "block", "mode", "act", "dtype"))
def _quantize_mx_core(x, fmt_name, axis, block, mode, act, dtype):
    f = _formats.get(fmt_name)
    # Blocks split in place along ``axis`` (no transpose): codes and scales come out
    # in x's own layout.
    shape = x.shape
    xb = x.astype(jnp.float32).reshape(
        shape[:axis] + (shape[axis] // block, block) + shape[axis + 1 :]
    )
    amax = _num.nan_max(jnp.abs(xb), axis=axis + 1)
    sbits = mx_scale_bits(amax, f, mode)
    codes = _mx_codes_at(xb, sbits, f, axis + 1).reshape(shape)
    if packed_along_last(f):
        # Packing reads each code for two or more stored bytes: fused with the encoder
        # it would encode each element that many times.
        codes = _materialized(codes)
    scale = lax.bitcast_convert_type(sbits, jnp.float8_e8m0fnu)
    blk = tuple(block if i == axis else 1 for i in range(x.ndim))
    q = _num.make_qarray(
        codes, scale, fmt=f, shape=x.shape, dtype=dtype, block=blk, act=act,
        scale_dtype=jnp.float8_e8m0fnu,
    )  # fmt: skip
    return q, jnp.all(sbits != _E8M0_NAN)


def quantize_mx(
    x: jax.Array,
    fmt: str | _formats.Format = "fp4_e2m1",
    *,
    axis: int = -1,
    block: int = MX_BLOCK,
    scale_mode: ScaleMode = "floor",
    act: ActSpec | None = None,
    path: str | None = None,
) -> QArray:
    """Quantizes ``x`` to an MX format: blocks of ``block`` along ``axis`` with one
    E8M0 scale each (module docstring).

    Args:
      x: floating-point array.
      fmt: element format, one of :data:`MX_ELEMENTS`.
      axis: the reduction axis the blocks run along (``-2`` for a Flax kernel ``(in,
        out)``; ``-1`` for a torch ``(out, in)`` weight).
      block: elements per block (32 in the spec).
      scale_mode: how the scale's exponent is rounded (:data:`SCALE_MODES`).
      act: activation spec recorded on the result.
      path: name used in error messages.

    Returns:
      A :class:`QArray` whose ``scale`` is ``float8_e8m0fnu``.

    Raises:
      ValueError: ``fmt`` has no MX form, ``axis`` is not a multiple of ``block``, or
        ``x`` holds NaN/Inf (eagerly; under ``jit`` the block's scale is NaN).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_mx(jnp.array([[0.5, -1.0, 3.0, 6.0]]), "fp4_e2m1", block=4)
        >>> q.dequantize().tolist(), q.scale.astype(jnp.float32).tolist()
        ([[0.5, -1.0, 3.0, 6.0]], [[1.0]])
    """
    f = check_mx_element(fmt)
    _check_mode(scale_mode)
    x = jnp.asarray(x)
    _num._check_float_input(x, path)
    ax = _check_blocks(x.shape, axis, block, path, "MX")
    q, finite = _quantize_mx_core(x, f.name, ax, int(block), scale_mode, act, x.dtype.name)
    _num.check_finite_flag(finite, path)
    return q


def nvfp4_global_scale(amax: jax.Array) -> jax.Array:
    """compressed-tensors' NVFP4 per-tensor scale ``448 * 6 / amax`` (float32; amax
    raised to float32's tiny; a non-finite result becomes 1), rounded as torch rounds
    it: ``python_float / tensor`` is ``reciprocal(tensor) * python_float`` there, two
    roundings (e.g. amax 500 gives 5.3760004, not the correctly rounded 5.376).

    Example:
        >>> import jax.numpy as jnp
        >>> float(nvfp4_global_scale(jnp.float32(2688.0)))
        1.0
    """
    a = jnp.maximum(jnp.abs(jnp.asarray(amax, jnp.float32)), np.finfo(np.float32).tiny)
    gs = jnp.float32(448.0 * 6.0) * _exact_div(jnp.float32(1.0), a)
    return jnp.where(jnp.isfinite(gs), gs, 1.0).astype(jnp.float32)


def _exact_div(a, b):
    """``a / b`` correctly rounded: XLA rewrites a division by a broadcast or constant
    divisor into a product with its reciprocal (1 ulp off in about a third of cases),
    which the barrier prevents; the published encoders divide."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    return jnp.broadcast_to(a, shape) / lax.optimization_barrier(jnp.broadcast_to(b, shape))


@functools.partial(jax.jit, static_argnames=("axis", "block", "act", "dtype"))
def _quantize_nvfp4_core(x, global_amax, axis, block, act, dtype):
    f = _formats.get("fp4_e2m1")
    # Blocks split in place along ``axis`` (no transpose), as _quantize_mx_core does.
    shape = x.shape
    xb = x.astype(jnp.float32).reshape(
        shape[:axis] + (shape[axis] // block, block) + shape[axis + 1 :]
    )
    amax_b = _num.nan_max(jnp.abs(xb), axis=axis + 1)
    tmax = _num.nan_max(amax_b) if global_amax is None else jnp.asarray(global_amax, jnp.float32)
    gs = nvfp4_global_scale(tmax)
    s8 = nvfp4_block_scale(amax_b, gs)
    # Stored once per block: fused into the elementwise pass, the E4M3 rounding and the
    # division would be recomputed for every element.
    eff = _materialized(_exact_div(s8.astype(jnp.float32), gs))
    y = jnp.clip(_div_exact_sub(xb, jnp.expand_dims(eff, axis + 1)), -f.max, f.max)
    # Stored before packing (fused into the packer, the encoder does not vectorise);
    # the predicate reads the stored divisors, not the codes (see _materialized).
    codes = _materialized(_encode_elements(y, f).reshape(shape), key=eff)
    scale = s8
    blk = tuple(block if i == axis else 1 for i in range(x.ndim))
    inv = _exact_div(1.0, gs)
    finite = jnp.isfinite(tmax) & jnp.all(jnp.isfinite(amax_b))
    inv = jnp.where(finite, inv, jnp.nan)
    q = _num.make_qarray(
        codes, scale, fmt=f, shape=x.shape, dtype=dtype, block=blk, act=act,
        super_scale=inv, super_block=tuple(x.shape),
    )  # fmt: skip
    return q, finite


def quantize_nvfp4(
    x: jax.Array,
    *,
    axis: int = -1,
    block: int = NVFP4_BLOCK,
    global_amax: jax.Array | float | None = None,
    act: ActSpec | None = None,
    path: str | None = None,
) -> QArray:
    """Quantizes ``x`` to NVFP4: FP4 E2M1 codes, an FP8 E4M3 scale per ``block`` along
    ``axis`` and one float32 per tensor (module docstring; compressed-tensors' recipe).

    Args:
      x: floating-point array.
      axis: the reduction axis the blocks run along.
      block: elements per block (16 for NVFP4).
      global_amax: the tensor's amax for the per-tensor scale (default: ``x``'s own);
        a calibrated value can be passed (compressed-tensors' ``global_scale``).
      act: activation spec recorded on the result.
      path: name used in error messages.

    Returns:
      A :class:`QArray` with ``float8_e4m3fn`` ``scale`` and the float32 ``super_scale``
      ``1 / global_scale``.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize_nvfp4(jnp.linspace(-1.0, 1.0, 32).reshape(2, 16))
        >>> q.scale.dtype.name, q.nbytes - 4, float(jnp.max(jnp.abs(q.dequantize()))) == 1.0
        ('float8_e4m3fn', 18, True)
    """
    x = jnp.asarray(x)
    _num._check_float_input(x, path)
    ax = _check_blocks(x.shape, axis, block, path, "NVFP4")
    q, finite = _quantize_nvfp4_core(x, global_amax, ax, int(block), act, x.dtype.name)
    _num.check_finite_flag(finite, path)
    return q


def fake_quant_mx(
    x: jax.Array,
    fmt: str | _formats.Format = "fp8_e4m3",
    *,
    axis: int = -1,
    block: int = MX_BLOCK,
    scale_mode: ScaleMode = "floor",
) -> jax.Array:
    """``x`` rounded through the MX format and back, float32 (for dynamic MX activations:
    usable under ``jit``; the product of MX values is exact in float32).

    Example:
        >>> import jax.numpy as jnp
        >>> fake_quant_mx(jnp.array([[1.0, 2.9, -7.9, 0.3]]), "fp4_e2m1", block=4).tolist()
        [[1.0, 3.0, -6.0, 0.5]]
    """
    f = check_mx_element(fmt)
    _check_mode(scale_mode)
    ax = _check_blocks(x.shape, axis, block, None, "MX")
    xl = jnp.moveaxis(x.astype(jnp.float32), ax, -1)
    xb = xl.reshape(xl.shape[:-1] + (xl.shape[-1] // block, block))
    sbits = mx_scale_bits(_num.nan_max(jnp.abs(xb), axis=-1), f, scale_mode)
    codes = _mx_codes(xb, sbits, f)
    v = _formats.decode(codes, f, jnp.float32) * e8m0_to_float(sbits)[..., None]
    return jnp.moveaxis(v.reshape(xl.shape), -1, ax)


def mx_blocks(
    x: jax.Array,
    fmt: str | _formats.Format = "fp8_e4m3",
    *,
    block: int = MX_BLOCK,
    scale_mode: ScaleMode = "floor",
) -> tuple[jax.Array, jax.Array]:
    """``x`` in MX blocks along its last axis, as a block-scaled dot takes it: the
    element values (float32, unscaled, exact in the element format's own dtype) and
    the E8M0 scale bytes (uint8, one per block). ``values * 2^(bytes - 127)`` per block
    is :func:`fake_quant_mx` of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> v, s = mx_blocks(jnp.array([[1.0, 2.9, -7.9, 0.3]]), "fp4_e2m1", block=4)
        >>> v.tolist(), s.tolist()
        ([[1.0, 3.0, -6.0, 0.5]], [[127]])
    """
    f = check_mx_element(fmt)
    _check_mode(scale_mode)
    _check_blocks(x.shape, -1, block, None, "MX")
    xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // block, block))
    sbits = mx_scale_bits(_num.nan_max(jnp.abs(xb), axis=-1), f, scale_mode)
    codes = _mx_codes(xb, sbits, f)
    return _formats.decode(codes, f, jnp.float32).reshape(x.shape), sbits


def mx_block_shape(shape: Sequence[int], axis: int, block: int) -> tuple[int, ...]:
    """The QArray ``block`` of an MX layout: ``block`` along ``axis``, 1 elsewhere."""
    ax = axis % len(shape)
    return tuple(block if i == ax else 1 for i in range(len(shape)))


# Encoders with the block scales given, for algorithms that choose the scales
# themselves (GPTQ over MX grids, jqx.recipes.gptq); the same arithmetic as
# quantize_mx / quantize_nvfp4.


def encode_mx(x: jax.Array, sbits: jax.Array, fmt: str | _formats.Format) -> jax.Array:
    """Element codes of ``x`` ``(..., block)`` in blocks whose E8M0 scale bytes are
    ``sbits`` ``(...)``, as :func:`quantize_mx` encodes them.

    Example:
        >>> import jax.numpy as jnp
        >>> encode_mx(jnp.array([[1.0, -3.0]]), jnp.array([127], jnp.uint8), "e2m1").tolist()
        [[2, 13]]
    """
    f = check_mx_element(fmt)
    xb = jnp.asarray(x, jnp.float32)
    return _mx_codes(xb, jnp.asarray(sbits).astype(jnp.uint8), f)


def nvfp4_block_scale(amax: jax.Array, global_scale: jax.Array) -> jax.Array:
    """E4M3 scales of NVFP4 blocks whose largest magnitude is ``amax`` under the
    per-tensor ``global_scale`` (:func:`nvfp4_global_scale`), as :func:`quantize_nvfp4`.

    Example:
        >>> import jax.numpy as jnp
        >>> nvfp4_block_scale(jnp.array([6.0, 0.0]), jnp.float32(1.0)).astype(float).tolist()
        [1.0, 0.125]
    """
    e4m3 = _formats.get("fp8_e4m3")
    s = jnp.asarray(global_scale, jnp.float32) * _exact_div(amax, 6.0)
    s8 = jnp.clip(s, -e4m3.max, e4m3.max).astype(jnp.float8_e4m3fn)
    return jnp.where(s8.astype(jnp.float32) == 0, jnp.float8_e4m3fn(e4m3.eps), s8)


def encode_nvfp4(x: jax.Array, block_scale: jax.Array, global_scale: jax.Array) -> jax.Array:
    """FP4 E2M1 codes of ``x`` ``(..., block)`` with E4M3 ``block_scale`` ``(...)`` and
    the per-tensor ``global_scale``, as :func:`quantize_nvfp4`.

    Example:
        >>> import jax.numpy as jnp
        >>> encode_nvfp4(jnp.array([[1.0, -6.0]]), jnp.array([1.0]), jnp.float32(1.0)).tolist()
        [[2, 15]]
    """
    f = _formats.get("fp4_e2m1")
    eff = _exact_div(jnp.asarray(block_scale).astype(jnp.float32), global_scale)
    xb = jnp.asarray(x, jnp.float32)
    return _encode_elements(jnp.clip(_div_exact_sub(xb, eff[..., None]), -f.max, f.max), f)
