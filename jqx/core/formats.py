"""Number formats: one registry, facts from ml_dtypes, emulation where it has none.

Every format jqx can store weights or activations in is a frozen `Format`.
Limits of formats that ml_dtypes provides come from `ml_dtypes.finfo` /
`ml_dtypes.iinfo`; the emulated 4-bit formats (FP4 E1M2, FP4 E3M0, NF4) are
derived from their sign/exponent/mantissa split (or their published table)
and stored as 4-bit codes decoded with a 16-entry table.

The emulated minifloats follow the usual sign/exponent/mantissa rule with the
IEEE bias ``2^(E-1) - 1``, every code finite (no inf, no NaN, like the OCP
``fn`` formats), exponent field 0 subnormal: ``(-1)^s * m/2^M * 2^(1-bias)``,
otherwise ``(-1)^s * (1 + m/2^M) * 2^(e-bias)``:

- FP4 E1M2: bias 0; subnormals 0.5, 1, 1.5; normals 2 .. 3.5 (max 3.5).
- FP4 E3M0: bias 3; no mantissa bits, so exponent field 0 is only +-0 (no
  subnormals); normals are the powers of two 2^-2 .. 2^4 (max 16).
- FP4 E2M1 is ml_dtypes' ``float4_e2m1fn`` (bias 1, subnormal 0.5, max 6);
  the same rule reproduces its table exactly.

Both zero codes (+0 and -0) decode to 0. Rounding onto every grid is to the
nearest value with ties to the even code (even mantissa; for E3M0 the even
exponent field; for NF4 the even index), saturating at +-max. Where ml_dtypes
has the type this equals its own cast for every finite input (tested
exhaustively on the value grid, its midpoints and their neighbours). XLA:CPU
flushes float32 subnormals to zero, so subnormals of bf16/fp32 do not survive a
cast there.

Example:
    >>> import jqx
    >>> jqx.formats.get("e4m3").max
    448.0
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = ["Format", "get", "names", "round_to_format", "encode", "decode", "FORMATS"]

Kind = Literal["int", "float", "table"]


@dataclasses.dataclass(frozen=True)
class Format:
    """A number format.

    Attributes:
      name: canonical name, e.g. ``"fp8_e4m3"``.
      kind: ``"int"`` (integer codes), ``"float"`` (a dtype XLA computes in) or
        ``"table"`` (4-bit codes decoded by a 16-entry table; the FP6 formats of
        MX: 6-bit codes, one per byte, a 64-entry table).
      bits: bits per stored element.
      signed: whether negative values are representable.
      exponent_bits, mantissa_bits: the float split (0, bits-1 for ints).
      bias: exponent bias of float formats (None for ints and NF4).
      storage_dtype: dtype of stored codes before packing (uint8 for 4-bit).
      packed: 4-bit formats store two codes per uint8.
      qmin, qmax: integer code range (two's complement for signed ints).
      max: largest finite magnitude (qmax for ints).
      smallest_normal, smallest_subnormal, eps: float facts (1, 1, 1 for ints).
      has_inf, has_nan, has_subnormals: special values of the encoding.
      values: sorted distinct representable values (formats of <= 8 bits).
      codes: the stored code of each entry of ``values``.
      decode_table: value of each code of a ``table`` format.
      aliases: other accepted names.
    """

    name: str
    kind: Kind
    bits: int
    signed: bool
    exponent_bits: int
    mantissa_bits: int
    bias: int | None
    storage_dtype: str
    packed: bool
    qmin: float
    qmax: float
    max: float
    smallest_normal: float
    smallest_subnormal: float
    eps: float
    has_inf: bool
    has_nan: bool
    has_subnormals: bool
    values: tuple[float, ...] | None
    codes: tuple[int, ...] | None
    decode_table: tuple[float, ...] | None
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def dtype(self):
        """The numpy/ml_dtypes dtype of stored codes (before 4-bit packing)."""
        return (
            np.dtype(self.storage_dtype)
            if self.storage_dtype != "bfloat16"
            else np.dtype(ml_dtypes.bfloat16)
        )

    @property
    def is_int(self) -> bool:
        return self.kind == "int"

    @property
    def qmin_symmetric(self) -> float:
        """Lower code of the sign-magnitude (symmetric) range, -(2^(n-1)-1)."""
        return -self.qmax if self.signed else self.qmin

    @property
    def is_wide_float(self) -> bool:
        """bf16 / fp16 / fp32: stored by a plain cast, no scale needed."""
        return self.kind == "float" and self.bits >= 16

    def __repr__(self) -> str:
        return f"Format({self.name})"

    def layout(self) -> str:
        """The bit layout: ``S EEEE MMM`` for floats, ``S IIIIIII`` for signed
        ints, ``IIII`` for unsigned ints, ``IIII (table index)`` for NF4; long
        fields are written as counts (``S E8 M23``)."""
        if self.kind == "int":
            mag = "I" * (self.bits - 1 if self.signed else self.bits)
            return f"S {mag}" if self.signed else mag
        if self.name == "nf4":
            return "IIII (table index)"
        if self.exponent_bits + self.mantissa_bits > 10:
            return f"S E{self.exponent_bits} M{self.mantissa_bits}"
        parts = ["S", "E" * self.exponent_bits, "M" * self.mantissa_bits]
        return " ".join(p for p in parts if p)


# --------------------------------------------------------------------------- builders


def _float_format(name: str, dtype, aliases=(), description="") -> Format:
    info = ml_dtypes.finfo(dtype)
    bits = int(info.bits)
    values = codes = None
    has_inf = has_nan = False
    if bits <= 8:
        raw = np.arange(2**bits, dtype=np.uint8)
        f = raw.view(dtype).astype(np.float32)
        has_inf = bool(np.isinf(f).any())
        has_nan = bool(np.isnan(f).any())
        finite = np.isfinite(f)
        # One entry per distinct value; +0 (the even code) represents zero.
        order = {}
        for c, v in zip(raw[finite], f[finite], strict=True):
            v = float(v)
            if v == 0.0:
                v = 0.0
            if v not in order:
                order[v] = int(c)
        values = tuple(sorted(order))
        codes = tuple(order[v] for v in values)
    else:
        probe = np.array([np.inf, np.nan], np.float32).astype(dtype).astype(np.float32)
        has_inf, has_nan = bool(np.isinf(probe[0])), bool(np.isnan(probe[1]))
    mx = float(info.max)
    return Format(
        name=name,
        kind="float",
        bits=bits,
        signed=True,
        exponent_bits=int(info.nexp),
        mantissa_bits=int(info.nmant),
        bias=int(1 - info.minexp),
        storage_dtype=np.dtype(dtype).name,
        packed=bits == 4,
        qmin=-mx,
        qmax=mx,
        max=mx,
        smallest_normal=float(info.smallest_normal),
        smallest_subnormal=float(info.smallest_subnormal),
        eps=float(info.eps),
        has_inf=has_inf,
        has_nan=has_nan,
        has_subnormals=float(info.smallest_subnormal) < float(info.smallest_normal),
        values=values,
        codes=codes,
        decode_table=None,
        aliases=tuple(aliases),
        description=description,
    )


def _int_format(name: str, dtype, aliases=(), description="") -> Format:
    info = ml_dtypes.iinfo(dtype)
    bits = int(info.bits)
    lo, hi = int(info.min), int(info.max)
    values = tuple(float(v) for v in range(lo, hi + 1))
    codes = tuple(v & (2**bits - 1) for v in range(lo, hi + 1))
    return Format(
        name=name,
        kind="int",
        bits=bits,
        signed=lo < 0,
        exponent_bits=0,
        mantissa_bits=bits - (1 if lo < 0 else 0),
        bias=None,
        storage_dtype=np.dtype(dtype).name if bits == 8 else "uint8",
        packed=bits == 4,
        qmin=float(lo),
        qmax=float(hi),
        max=float(hi),
        smallest_normal=1.0,
        smallest_subnormal=1.0,
        eps=1.0,
        has_inf=False,
        has_nan=False,
        has_subnormals=False,
        values=values,
        codes=codes,
        decode_table=None,
        aliases=tuple(aliases),
        description=description,
    )


def minifloat_values(exponent_bits: int, mantissa_bits: int, bias: int) -> np.ndarray:
    """Values of the 2^(1+e+m) codes of a sign/exponent/mantissa format with no
    inf or NaN (every code finite, "fn" style). Code layout: S E..E M..M.

    Exponent field 0 is subnormal: ``(-1)^s * (m / 2^M) * 2^(1 - bias)``;
    otherwise ``(-1)^s * (1 + m / 2^M) * 2^(e - bias)``.
    """
    n = 2 ** (1 + exponent_bits + mantissa_bits)
    out = np.zeros(n, np.float64)
    for code in range(n):
        s = code >> (exponent_bits + mantissa_bits)
        e = (code >> mantissa_bits) & (2**exponent_bits - 1)
        m = code & (2**mantissa_bits - 1)
        frac = m / 2**mantissa_bits
        v = frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias)
        out[code] = -v if s else v
    return out


def _ml_dtypes_table(dtype, bits: int = 4) -> np.ndarray:
    """Values of the ``2**bits`` codes of a narrow ml_dtypes float, in code order."""
    return np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float64)


def _table_format(
    name: str,
    table: np.ndarray,
    e: int,
    m: int,
    bias: int | None,
    aliases=(),
    description="",
    info=None,
    bits: int = 4,
) -> Format:
    table = np.asarray(table, np.float64)
    order: dict[float, int] = {}
    for code, v in enumerate(table):
        v = float(v) + 0.0  # -0.0 -> 0.0
        if v not in order:
            order[v] = code
    values = tuple(sorted(order))
    codes = tuple(order[v] for v in values)
    pos = np.array([v for v in values if v > 0])
    mx = float(np.max(np.abs(table)))
    # Subnormals of a minifloat: nonzero codes with exponent field 0.
    if bias is not None:
        sub = [abs(v) for c, v in enumerate(table) if v != 0 and ((c >> m) & (2**e - 1)) == 0]
        normal = [abs(v) for c, v in enumerate(table) if ((c >> m) & (2**e - 1)) != 0]
        smallest_normal = float(min(normal))
        smallest_sub = float(min(sub)) if sub else smallest_normal
        eps = 2.0**-m
    else:
        smallest_normal = smallest_sub = float(pos.min())
        # NF4's spacing near 1.0 plays the role of eps.
        eps = float(1.0 - pos[pos < 1.0].max())
    if info is not None:
        # ml_dtypes has this type: its finfo is the authority for the limits.
        if float(info.max) != mx:
            raise AssertionError(f"{name}: table max {mx} != ml_dtypes finfo max {info.max}")
        mx = float(info.max)
        smallest_normal = float(info.smallest_normal)
        smallest_sub = float(info.smallest_subnormal)
        eps = float(info.eps)
        bias = int(1 - info.minexp)
    return Format(
        name=name,
        kind="table",
        bits=bits,
        signed=True,
        exponent_bits=e,
        mantissa_bits=m,
        bias=bias,
        storage_dtype="uint8",
        # 4-bit codes two per byte; 6-bit (FP6) codes one per byte, unpacked.
        packed=bits == 4,
        qmin=-mx,
        qmax=mx,
        max=mx,
        smallest_normal=smallest_normal,
        smallest_subnormal=smallest_sub,
        eps=eps,
        has_inf=False,
        has_nan=False,
        has_subnormals=smallest_sub < smallest_normal,
        values=values,
        codes=codes,
        decode_table=tuple(float(v) for v in table),
        aliases=tuple(aliases),
        description=description,
    )


# NF4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero; these are the published constants (bitsandbytes).
_NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


def _build() -> dict[str, Format]:
    fmts = [
        _int_format("int8", np.int8, ("i8", "s8"), "8-bit two's complement integer"),
        _int_format("uint8", np.uint8, ("u8",), "8-bit unsigned integer"),
        _int_format("int4", ml_dtypes.int4, ("i4", "s4"), "4-bit two's complement integer"),
        _int_format("uint4", ml_dtypes.uint4, ("u4",), "4-bit unsigned integer"),
        _float_format(
            "fp8_e4m3",
            ml_dtypes.float8_e4m3fn,
            ("e4m3", "float8_e4m3fn", "fp8", "e4m3fn"),
            "OCP FP8 E4M3 (fn: no inf, NaN only at S.1111.111)",
        ),
        _float_format(
            "fp8_e5m2", ml_dtypes.float8_e5m2, ("e5m2", "float8_e5m2"), "OCP FP8 E5M2 (IEEE-like)"
        ),
        _table_format(
            "fp4_e2m1",
            _ml_dtypes_table(ml_dtypes.float4_e2m1fn),
            2,
            1,
            1,
            ("e2m1", "float4_e2m1fn", "fp4", "mxfp4"),
            "OCP MX FP4 E2M1: bias 1, one subnormal (0.5), no inf/NaN",
            info=ml_dtypes.finfo(ml_dtypes.float4_e2m1fn),
        ),
        _table_format(
            "fp6_e2m3",
            _ml_dtypes_table(ml_dtypes.float6_e2m3fn, 6),
            2,
            3,
            1,
            ("e2m3", "float6_e2m3fn", "fp6"),
            "OCP MX FP6 E2M3: bias 1, no inf/NaN, max 7.5 (one code per byte)",
            info=ml_dtypes.finfo(ml_dtypes.float6_e2m3fn),
            bits=6,
        ),
        _table_format(
            "fp6_e3m2",
            _ml_dtypes_table(ml_dtypes.float6_e3m2fn, 6),
            3,
            2,
            3,
            ("e3m2", "float6_e3m2fn"),
            "OCP MX FP6 E3M2: bias 3, no inf/NaN, max 28 (one code per byte)",
            info=ml_dtypes.finfo(ml_dtypes.float6_e3m2fn),
            bits=6,
        ),
        _table_format(
            "fp4_e1m2",
            minifloat_values(1, 2, 0),
            1,
            2,
            0,
            ("e1m2",),
            "FP4 E1M2 (emulated): bias 0, subnormals 0.5..1.5, no inf/NaN",
        ),
        _table_format(
            "fp4_e3m0",
            minifloat_values(3, 0, 3),
            3,
            0,
            3,
            ("e3m0",),
            "FP4 E3M0 (emulated): bias 3, powers of two 2^-2..2^4, no subnormals, no inf/NaN",
        ),
        _table_format(
            "nf4", _NF4, 0, 0, None, ("normalfloat4",), "QLoRA NormalFloat4: N(0,1) quantiles"
        ),
        _float_format("bf16", ml_dtypes.bfloat16, ("bfloat16",), "bfloat16"),
        _float_format("fp16", np.float16, ("float16", "f16", "half"), "IEEE half"),
        _float_format("fp32", np.float32, ("float32", "f32"), "IEEE single"),
    ]
    return {f.name: f for f in fmts}


FORMATS: dict[str, Format] = _build()
_ALIASES = {a.lower(): f.name for f in FORMATS.values() for a in (f.name, *f.aliases)}


def names() -> list[str]:
    """Canonical names of all formats."""
    return list(FORMATS)


def get(fmt: str | Format) -> Format:
    """Looks a format up by name or alias (case-insensitive).

    Example:
        >>> get("float8_e4m3fn").name
        'fp8_e4m3'
    """
    if isinstance(fmt, Format):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a str or jqx.formats.Format, got {type(fmt).__name__}")
    key = fmt.lower()
    if key in _ALIASES:
        return FORMATS[_ALIASES[key]]
    close = difflib.get_close_matches(key, list(_ALIASES), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"format={fmt!r} is not a known format.{hint} Valid names: {', '.join(FORMATS)} "
        f"(aliases: {', '.join(sorted(a for a in _ALIASES if a not in FORMATS))})."
    )


def int_container(bits: int, signed: bool) -> tuple[Format, float, float]:
    """The integer storage format for ``bits``-bit codes and their code range.

    Codes of 2 and 3 bits live in the 4-bit container with a narrower range;
    4 and 8 bits use the container's own range. The range of the narrower
    codes is the two's-complement (signed) or unsigned range of ``bits`` bits,
    the same rule ml_dtypes' ``iinfo`` applies to the full-width containers.

    Example:
        >>> fmt, lo, hi = int_container(3, signed=True)
        >>> fmt.name, lo, hi
        ('int4', -4.0, 3.0)
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits!r} is not supported; use one of (2, 3, 4, 8).")
    fmt = get(("int" if signed else "uint") + ("8" if bits == 8 else "4"))
    if bits == fmt.bits:
        return fmt, fmt.qmin, fmt.qmax
    if signed:
        return fmt, -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    return fmt, 0.0, float(2**bits - 1)


# --------------------------------------------------------------------------- rounding


def _boundaries(fmt: Format) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decision boundaries between neighbouring values of a table format.

    Returns ``(m, up_on_tie, step)`` (float32, bool, int32), one entry per gap:
    ``x`` belongs above gap ``k`` when ``x > m[k]``, or ``x == m[k]`` and
    ``up_on_tie[k]``; crossing gap ``k`` changes the code by ``step[k]``.
    ``m[k]`` is the exact midpoint rounded down to float32, so the strict
    comparison of a float32 ``x`` is exact nearest rounding; an exact tie is only
    possible where the midpoint is a float32, and then goes to the even code.
    """
    vals = np.array(fmt.values, np.float64)
    codes = np.array(fmt.codes, np.int64)
    mid = (vals[1:] + vals[:-1]) / 2  # exact: neighbours share a small exponent range
    m = mid.astype(np.float32)
    too_high = m.astype(np.float64) > mid
    m[too_high] = np.nextafter(m[too_high], np.float32(-np.inf))
    exact = m.astype(np.float64) == mid
    up_on_tie = exact & (codes[1:] % 2 == 0)
    step = (codes[1:] - codes[:-1]).astype(np.int32)
    return m, up_on_tie, step


def _table_encode(x: jax.Array, fmt: Format) -> jax.Array:
    # One fused elementwise chain of compares (no searchsorted, no gather): this is
    # ~10x faster than a binary search on CPU for a 16-entry table.
    m, up_on_tie, step = _boundaries(fmt)
    x = x.astype(jnp.float32)
    code = jnp.full(x.shape, fmt.codes[0], jnp.int32)
    for mk, tk, sk in zip(m.tolist(), up_on_tie.tolist(), step.tolist(), strict=True):
        above = (x >= mk) if tk else (x > mk)
        code = code + jnp.where(above, jnp.int32(sk), jnp.int32(0))
    return code.astype(jnp.uint8)


def encode(x: jax.Array, fmt: str | Format) -> jax.Array:
    """Rounds already-scaled values onto ``fmt``'s grid and returns stored codes.

    Int formats: round half to even, clamp to [qmin, qmax], stored in the
    format's integer dtype (int8 / uint8; 4-bit codes as the low nibble of a
    uint8, two's complement for int4). Float formats of 8 bits and more: the
    dtype itself, saturating at +-max. Table formats: the 4-bit code, uint8.
    """
    fmt = get(fmt)
    if fmt.kind == "int":
        q = jnp.clip(jnp.round(x.astype(jnp.float32)), fmt.qmin, fmt.qmax)
        if fmt.bits == 8:
            return q.astype(fmt.dtype)
        return (q.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    if fmt.kind == "float":
        xf = x.astype(jnp.float32) if fmt.bits < 32 else x
        return jnp.clip(xf, -fmt.max, fmt.max).astype(fmt.dtype)
    return _table_encode(x, fmt)


def decode(codes: jax.Array, fmt: str | Format, dtype=jnp.float32) -> jax.Array:
    """Values of stored codes (inverse of :func:`encode` on the grid)."""
    fmt = get(fmt)
    if fmt.kind == "int":
        if fmt.bits == 8:
            return codes.astype(dtype)
        c = codes.astype(jnp.int32)
        if fmt.signed:
            c = jnp.where(c >= 8, c - 16, c)
        return c.astype(dtype)
    if fmt.kind == "float":
        return codes.astype(dtype)
    table = jnp.asarray(np.array(fmt.decode_table, np.float32))
    return table[codes.astype(jnp.int32)].astype(dtype)


def round_to_format(x: jax.Array, fmt: str | Format) -> jax.Array:
    """Rounds ``x`` to the nearest value of ``fmt`` (ties to even, saturating
    at +-max, never inf/NaN for finite input) and returns it as float32.

    Example:
        >>> import jax.numpy as jnp
        >>> round_to_format(jnp.array([0.7, 5.0, 100.0]), "e2m1").tolist()
        [0.5, 4.0, 6.0]
    """
    fmt = get(fmt)
    return decode(encode(x, fmt), fmt, jnp.float32)
