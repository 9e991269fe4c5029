"""QArray: a quantized array as a self-describing pytree.

Children (arrays, traced under jit): ``qvalue`` (stored codes; 4-bit codes
packed two per uint8 along the last axis, low nibble first; 6-bit (FP6) codes
four per three bytes along the last axis, :func:`pack_6bit`), ``scale``,
``zero_point`` (or None), ``in_scale`` (per-input-channel AWQ/SmoothQuant
factor, broadcastable to the logical shape, or None) and ``act_scale`` (the
static activation scale from calibration, or None).

Static metadata: ``format`` (name), logical ``shape`` and ``dtype``, ``block``
(per-axis block sizes: ``scale.shape == shape // block``) and ``act`` (how the
activations of this weight's matmul are quantized; None for weight-only).

Layout extensions (GGUF's layouts; all absent, i.e. None / ``"code"``, for every
QArray jqx makes itself; :attr:`QArray.extensions` lists those in use):

- ``code_bits`` (static, 5 or 6) with the child ``qhigh``: codes wider than 4 bits
  in an 8-bit container format (``int8``/``uint8`` give the signedness) are stored
  as two planes, as GGUF stores them: ``qvalue`` holds the low 4 bits of each code
  (packed like 4-bit codes) and ``qhigh`` the bits above them (:func:`pack_bits`:
  8 one-bit or 4 two-bit fields per byte along the last axis, lowest bits first).
  Signed codes are two's complement in ``code_bits`` bits.
- ``zero_kind`` (static): ``"code"`` (default) means ``zero_point`` is on the code
  grid and subtracted before scaling, ``(codes - zero_point) * scale``; ``"min"``
  means it is a float minimum added after scaling, ``codes * scale + zero_point``
  (GGUF's Q4_1, Q5_1 and K-quant mins).
- ``super_block`` (static) with the children ``super_scale`` and ``super_zero``:
  two-level scales. ``scale`` (and ``zero_point``, when ``super_zero`` is given)
  then hold integer codes per block, and the block's scale is ``scale *
  super_scale`` (its minimum ``zero_point * super_zero``) with one float
  ``super_scale`` per super-block: ``super_scale.shape == shape // super_block``.
- ``g_idx`` (child, int32, one entry per index of the group axis: the last axis whose
  block is above 1, e.g. the input axis of an ``(out, in)`` weight with block ``(1,
  g)``): the group of each index. Index ``i`` of that axis uses scale (and zero point)
  ``g_idx[i]`` instead of ``i // g``, so a group may gather any indices (GPTQ's
  ``act_order``/``desc_act`` layout). ``scale.shape`` stays ``shape // block``.

Code layout (static ``code_layout``, not an extension: every path reads it):
``"plain"`` (the default: ``qvalue`` has the logical shape, packed along the last axis
as above) or ``"vnni"``: an int8 weight's codes as ``(K, N)`` (its leading axes
:func:`vnni_split` merged into K, the rest into N; an ``(out, in)`` weight transposed)
stored in the native AVX512-VNNI GEMM's panel layout, ``(ceil(N/16), ceil(K/4), 64)``
(``jqx.kernels.cpu.native.pack_int8``), so that the kernel does not pack the weight on
every call. :func:`jqx.prepack` makes it; :meth:`QArray.codes`, :meth:`QArray.dequantize`
and every ``jqx.ops`` path read it (paths other than the native GEMM unpack it per call).
``"kn"``: a 2-D ``(out, in)`` 4-bit weight (GGUF's and PyTorch's orientation, used as
``x @ W.T``) whose children hold its ``(in, out)`` transpose (codes packed along
``out``, scales ``(in / g, out)``): ``jqx.ops`` runs ``x @ W.T`` as ``x @ V`` on that
``(in, out)`` view with no copy, where the native 4-bit decode kernel reads it
(``jqx.llm``'s ``LLM.quantize`` stores its 4-bit weights so, :func:`kn_eligible`).
With a ``g_idx`` (GPTQ's act_order) the stored transpose has the inputs sorted by group,
and ``g_idx`` holds that order: ``x @ W.T == x[..., g_idx] @ view``.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> q = jqx.quantize_array(jnp.ones((4, 6)), "int4", granularity=jqx.per_tensor())
    >>> q.nbytes < 4 * 6
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jqx.core import formats as _formats
from jqx.kernels.cpu.native import pack_int8, unpack_int8

__all__ = [
    "QArray",
    "QARRAY_CHILDREN",
    "ActSpec",
    "pack_4bit",
    "unpack_4bit",
    "pack_6bit",
    "unpack_6bit",
    "pack_codes",
    "unpack_codes",
    "packed_along_last",
    "pack_bits",
    "unpack_bits",
    "is_qarray",
    "kn_eligible",
    "vnni_eligible",
    "vnni_split",
]


# The MX element formats (jqx.core.mx.MX_ELEMENTS; that module imports this one).
_MX_ELEMENTS = ("fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "int8")


@dataclasses.dataclass(frozen=True)
class ActSpec:
    """How the activations entering a quantized weight's matmul are quantized.

    Attributes:
      kind: ``"dynamic"`` (scale computed per call), ``"static"`` (scale from
        calibration, stored in ``QArray.act_scale``) or ``"llm_int8"`` (dynamic
        int8 with 16-bit outlier columns above ``threshold``).
      format: activation format name, ``"int8"`` or ``"fp8_e4m3"``.
      granularity: ``"per_token"`` (one scale per row), ``"per_tensor"``, or
        ``"per_block"``: one float16 scale per row and per block of the weight along
        the contraction, int8 only (llama.cpp's Q8_0/Q8_1 activations; for GGUF block
        layouts, see ``jqx.core.numerics.quantize_activation_blocks``).
        ``"mx"``: per block of 32 along the contraction with an E8M0 scale, in any MX
        element format (``jqx.core.mx``; dynamic only).
      threshold: LLM.int8() outlier threshold on |x|.
    """

    kind: Literal["dynamic", "static", "llm_int8"] = "dynamic"
    format: str = "int8"
    granularity: Literal["per_token", "per_tensor", "per_block", "mx"] = "per_token"
    threshold: float | None = None

    def __post_init__(self):
        if self.granularity == "mx":
            # MX activations: per block of 32 along the contraction, E8M0 scales
            # (jqx.core.mx); any MX element format, dynamic only.
            fmt = _formats.get(self.format)
            if self.kind != "dynamic" or fmt.name not in _MX_ELEMENTS:
                raise ValueError(
                    f"ActSpec granularity='mx' is dynamic with an MX element format "
                    f"({', '.join(_MX_ELEMENTS)}); got kind={self.kind!r}, "
                    f"format={self.format!r}."
                )
            object.__setattr__(self, "format", fmt.name)
            return
        if self.kind not in ("dynamic", "static", "llm_int8"):
            raise ValueError(
                f"ActSpec kind={self.kind!r} is not supported; use 'dynamic', 'static' or 'llm_int8'."
            )
        if self.granularity not in ("per_token", "per_tensor", "per_block"):
            raise ValueError(
                f"ActSpec granularity={self.granularity!r} is not supported; use 'per_token' or "
                "'per_tensor' (or 'per_block' for GGUF block layouts, 'mx' for MX blocks)."
            )
        if self.granularity == "per_block" and (self.kind, self.format) != ("dynamic", "int8"):
            raise ValueError(
                f"ActSpec granularity='per_block' is dynamic int8 only; got kind={self.kind!r}, "
                f"format={self.format!r}."
            )
        fmt = _formats.get(self.format)
        if fmt.name not in ("int8", "fp8_e4m3", "fp8_e5m2"):
            raise ValueError(
                f"ActSpec format={self.format!r}: activations are quantized to int8, fp8_e4m3 or "
                "fp8_e5m2."
            )
        object.__setattr__(self, "format", fmt.name)


def pack_4bit(codes: jax.Array) -> jax.Array:
    """Packs 4-bit codes (uint8 values 0..15) two per byte along the last axis,
    low nibble first. An odd last axis is padded with one zero nibble. A numpy array
    is packed with numpy (on the host: no compilation per shape, e.g. for a file's
    tensors) and stays a numpy array."""
    xp = np if isinstance(codes, np.ndarray) else jnp
    if codes.ndim == 0:
        codes = codes.reshape(1)
    n = codes.shape[-1]
    if n % 2:
        codes = xp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    c = codes.astype(xp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return c[..., 0] | (c[..., 1] << 4)


def unpack_4bit(packed: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`pack_4bit`: uint8 codes 0..15, last axis of length ``n``."""
    lo = packed & 0xF
    hi = packed >> 4
    c = jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return c[..., :n]


def pack_6bit(codes: jax.Array) -> jax.Array:
    """Packs 6-bit codes (uint8 values 0..63) four per three bytes along the last axis,
    as one little-endian bit stream: code ``i`` of each group of four occupies bits
    ``6 i .. 6 i + 5`` of the group's 24 bits, byte 0 holding bits 0..7. The last axis
    is padded with zero codes to a multiple of four.

    Example:
        >>> import jax.numpy as jnp
        >>> pack_6bit(jnp.array([1, 2, 3, 63], jnp.uint8)).tolist()
        [129, 48, 252]
    """
    if codes.ndim == 0:
        codes = codes.reshape(1)
    pad = -codes.shape[-1] % 4
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 4, 4)
    c0, c1, c2, c3 = (c[..., i] for i in range(4))
    # uint8 shifts drop the bits that spill into the next byte.
    b = jnp.stack([c0 | (c1 << 6), (c1 >> 2) | (c2 << 4), (c2 >> 4) | (c3 << 2)], axis=-1)
    return b.reshape(*c.shape[:-2], c.shape[-2] * 3)


def unpack_6bit(packed: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`pack_6bit`: uint8 codes 0..63, last axis of length ``n``.

    Example:
        >>> import jax.numpy as jnp
        >>> unpack_6bit(jnp.array([129, 48, 252], jnp.uint8), 4).tolist()
        [1, 2, 3, 63]
    """
    b = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 3, 3)
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    c = jnp.stack(
        [b0 & 63, (b0 >> 6) | ((b1 & 15) << 2), (b1 >> 4) | ((b2 & 3) << 4), b2 >> 2], axis=-1
    )
    return c.reshape(*b.shape[:-2], b.shape[-2] * 4)[..., :n]


def packed_along_last(fmt: _formats.Format) -> bool:
    """Whether codes of ``fmt`` are stored packed along the last axis: 4-bit formats
    (two per byte) and the 6-bit FP6 formats (four per three bytes).

    Example:
        >>> from jqx.core import formats
        >>> [packed_along_last(formats.get(f)) for f in ("int4", "fp6_e3m2", "fp8_e4m3")]
        [True, True, False]
    """
    return fmt.packed or (fmt.bits == 6 and fmt.kind == "table")


def pack_codes(codes: jax.Array, fmt: _formats.Format) -> jax.Array:
    """The stored form of codes of ``fmt`` (logical shape): packed along the last axis
    for 4- and 6-bit formats (:func:`packed_along_last`), unchanged otherwise.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.core import formats
        >>> pack_codes(jnp.zeros((2, 8), jnp.uint8), formats.get("fp6_e2m3")).shape
        (2, 6)
    """
    if fmt.packed:
        return pack_4bit(codes)
    if packed_along_last(fmt):
        return pack_6bit(codes)
    return codes


def unpack_codes(packed: jax.Array, fmt: _formats.Format, n: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: codes with a last axis of length ``n``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.core import formats
        >>> f = formats.get("fp6_e2m3")
        >>> unpack_codes(pack_codes(jnp.arange(6, dtype=jnp.uint8), f), f, 6).tolist()
        [0, 1, 2, 3, 4, 5]
    """
    if fmt.packed:
        return unpack_4bit(packed, n)
    if packed_along_last(fmt):
        return unpack_6bit(packed, n)
    return packed


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """Packs ``bits``-bit codes (``bits`` in 1, 2, 4; uint8 values below
    ``2**bits``) ``8 // bits`` per byte along the last axis, lowest bits first:
    element ``i`` of each group lands at bit ``(i % (8 // bits)) * bits``. The last
    axis is padded with zero codes to a whole byte. ``pack_bits(c, 4)`` equals
    :func:`pack_4bit`.

    Example:
        >>> import jax.numpy as jnp
        >>> pack_bits(jnp.array([1, 0, 1, 1, 0, 0, 0, 1], jnp.uint8), 1).tolist()
        [141]
    """
    if bits not in (1, 2, 4):
        raise ValueError(f"pack_bits(bits={bits!r}): use 1, 2 or 4 bits per code.")
    per = 8 // bits
    if codes.ndim == 0:
        codes = codes.reshape(1)
    pad = -codes.shape[-1] % per
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = c[..., 0]
    for i in range(1, per):
        out = out | (c[..., i] << (i * bits))
    return out


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack_bits`: uint8 codes below ``2**bits``, last axis of length ``n``."""
    per = 8 // bits
    mask = (1 << bits) - 1
    c = jnp.stack([(packed >> (i * bits)) & mask for i in range(per)], axis=-1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n]


def _granularity_name(shape, block) -> str:
    """``per-tensor``, ``per-channel(axis 1)`` (one scale per index of axis 1),
    ``group128(axis 0)`` or ``block64x64``."""
    shape, block = tuple(shape), tuple(block)
    if all(b == s for b, s in zip(block, shape, strict=True)):
        return "per-tensor"
    partial = [i for i, (b, s) in enumerate(zip(block, shape, strict=True)) if 1 < b < s]
    if len(partial) == 1 and all(
        b in (1, s) for i, (b, s) in enumerate(zip(block, shape, strict=True)) if i != partial[0]
    ):
        if all(b == 1 for i, b in enumerate(block) if i != partial[0]):
            return f"group{block[partial[0]]}(axis {partial[0]})"
    if partial:
        return "block" + "x".join(str(b) for b in block)
    kept = [i for i, (b, s) in enumerate(zip(block, shape, strict=True)) if b == 1 and s > 1]
    return f"per-channel(axis {','.join(str(i) for i in kept)})"


# The array fields of a QArray (its pytree children), in field order.
QARRAY_CHILDREN = (
    "qvalue",
    "scale",
    "zero_point",
    "in_scale",
    "act_scale",
    "qhigh",
    "super_scale",
    "super_zero",
    "g_idx",
)


@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized array. See the module docstring for the fields."""

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    in_scale: jax.Array | None
    act_scale: jax.Array | None
    format: str = dataclasses.field(metadata=dict(static=True), default="int8")
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    dtype: str = dataclasses.field(metadata=dict(static=True), default="float32")
    block: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())
    act: ActSpec | None = dataclasses.field(metadata=dict(static=True), default=None)
    # Layout extensions (module docstring); absent for jqx's own QArrays.
    zero_kind: Literal["code", "min"] = dataclasses.field(
        metadata=dict(static=True), default="code"
    )
    code_bits: int | None = dataclasses.field(metadata=dict(static=True), default=None)
    super_block: tuple[int, ...] | None = dataclasses.field(
        metadata=dict(static=True), default=None
    )
    qhigh: jax.Array | None = None
    super_scale: jax.Array | None = None
    super_zero: jax.Array | None = None
    g_idx: jax.Array | None = None
    code_layout: Literal["plain", "vnni", "kn"] = dataclasses.field(
        metadata=dict(static=True), default="plain"
    )

    # ------------------------------------------------------------------ facts
    @property
    def fmt(self) -> _formats.Format:
        return _formats.get(self.format)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def packed(self) -> bool:
        """Whether ``qvalue`` holds codes packed along the last axis (4-bit: two per
        byte; FP6: four per three bytes), so it cannot be sliced along that axis."""
        return packed_along_last(self.fmt)

    @property
    def granularity(self) -> str:
        """Readable granularity, e.g. ``per-channel(axis 1)`` or ``group128(axis 0)``."""
        return _granularity_name(self.shape, self.block)

    @property
    def extensions(self) -> tuple[str, ...]:
        """The layout extensions in use (module docstring): ``()`` for every QArray
        jqx makes itself; ``"code_bits"`` (codes split into a low and a high plane),
        ``"min"`` (``zero_point`` is a float minimum added after scaling) and
        ``"super_scale"`` (two-level scales) and ``"g_idx"`` (a group index per
        index of the group axis). Code that reads ``qvalue``, ``scale`` or
        ``zero_point`` directly must handle these or use :meth:`dequantize`.

        Example:
            >>> import jax.numpy as jnp, jqx
            >>> jqx.quantize_array(jnp.ones((2, 4)), "int8").extensions
            ()
        """
        ext = []
        if self.qhigh is not None:
            ext.append("code_bits")
        if self.zero_kind != "code":
            ext.append("min")
        if self.super_scale is not None:
            ext.append("super_scale")
        if self.g_idx is not None:
            ext.append("g_idx")
        return tuple(ext)

    @property
    def nbytes(self) -> int:
        """True storage footprint in bytes: codes, scales, zero points and any
        per-channel factors."""
        total = 0
        for a in (getattr(self, name) for name in QARRAY_CHILDREN):
            if a is not None:
                total += int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        return total

    def __repr__(self) -> str:
        extra = f", act={self.act.kind}:{self.act.format}" if self.act else ""
        extra += ", in_scale" if self.in_scale is not None else ""
        extra += f", code_bits={self.code_bits}" if self.code_bits is not None else ""
        extra += ", zero=min" if self.zero_kind != "code" else ""
        extra += f", super_block={self.super_block}" if self.super_scale is not None else ""
        extra += ", g_idx" if self.g_idx is not None else ""
        extra += f", code_layout={self.code_layout}" if self.code_layout != "plain" else ""
        # The shape of the arrays held (a vmapped quantize stacks members in front), so
        # that shape and nbytes describe the same thing; granularity is per member.
        shape, _ = self._layout()
        return (
            f"QArray(shape={shape}, dtype={self.dtype}, format={self.format}, "
            f"granularity={self.granularity}, nbytes={self.nbytes}{extra})"
        )

    # ------------------------------------------------------------------ values
    def _layout(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Logical (shape, block) of the arrays actually held.

        Under ``jax.vmap`` the children gain or lose leading axes while the
        static metadata stays as it was: a vmapped ``quantize_array`` returns
        codes with an extra leading batch axis, and vmapping over a stacked
        QArray (``in_axes=0``) strips its leading axis. Leading batch axes get
        block size 1 (each batch element has its own scales).
        """
        # pack_4bit stores a 0-d array as one byte of shape (1,)
        packed = self.packed or self.qhigh is not None
        own_ndim = len(self.shape) if self.shape or not packed else 1
        if self.code_layout == "vnni":
            own_ndim = 3  # (K, N) as (ceil(N/16), ceil(K/4), 64)
        extra = self.qvalue.ndim - own_ndim
        if extra > 0:
            lead = tuple(self.qvalue.shape[:extra])
            return lead + tuple(self.shape), (1,) * extra + tuple(self.block)
        if extra < 0:
            return tuple(self.shape[-extra:]), tuple(self.block[-extra:])
        return tuple(self.shape), tuple(self.block)

    def codes(self) -> jax.Array:
        """Unpacked stored codes with the logical shape."""
        fmt = self.fmt
        q = self.qvalue
        shape, _ = self._layout()
        if self.qhigh is not None:
            n = shape[-1] if shape else 1
            hi = unpack_bits(self.qhigh, self.code_bits - 4, n)
            c = unpack_4bit(q, n) | (hi << 4)
            if fmt.signed:
                # two's complement in code_bits bits: (c ^ half) - half sign-extends
                half = 1 << (self.code_bits - 1)
                c = (c.astype(jnp.int16) ^ half) - half
            return c.astype(fmt.dtype).reshape(shape)
        if self.code_layout == "kn":
            return self._kn_unpermute(self._kn_view().codes()).T
        if self.code_layout == "vnni":
            kn = unpack_int8(q, self._vnni_kn())
            if vnni_split(tuple(self.shape), tuple(self.block)) == -1:
                return kn.T
            return kn.reshape(shape)
        if self.packed:
            n = shape[-1] if shape else 1
            q = unpack_codes(q, fmt, n).reshape(shape)
        return q

    def row_codes(self, ids: jax.Array) -> jax.Array:
        """The stored codes of rows ``ids`` (an int array of any shape, values in range)
        of a 2-D QArray, in the plain layout (``ids.shape + qvalue's row``); from a
        ``"vnni"`` layout read out of the panels, without unpacking the rest; from a
        ``"kn"`` one read as columns of the stored transpose (with a ``g_idx``, whose
        rows are sorted by group: decoded whole)."""
        if self.code_layout == "kn":
            if self.g_idx is not None:
                return pack_codes(self.codes()[ids], self.fmt)
            if self.fmt.packed:  # 4-bit, two columns per byte, low nibble first
                col = self.qvalue[:, ids // 2]
                col = (col >> (4 * (ids % 2)).astype(col.dtype)) & 0xF
            else:
                col = self.qvalue[:, ids]
            return pack_codes(jnp.moveaxis(col, 0, -1), self.fmt)
        if self.code_layout != "vnni":
            return self.qvalue[ids]
        npan, kq, _ = self.qvalue.shape
        p = self.qvalue.reshape(npan, kq, 16, 4)
        if vnni_split(tuple(self.shape), tuple(self.block)) == -1:
            # (out, in): row n is column n of the packed (K, N), all of its k.
            rows = p[ids // 16, :, ids % 16, :]  # ids.shape + (kq, 4)
            return rows.reshape(*ids.shape, 4 * kq)[..., : self.shape[1]]
        rows = p[:, ids // 4, :, ids % 4]  # advanced indices apart: ids.shape + (npan, 16)
        return rows.reshape(*ids.shape, 16 * npan)[..., : self.shape[1]]

    def with_code_layout(self, layout: Literal["plain", "vnni", "kn"]) -> QArray:
        """This QArray with its codes stored in ``layout`` (module docstring): the same
        values, the same bytes up to the panels' padding. ``"vnni"`` takes what
        :func:`vnni_eligible` accepts, ``"kn"`` what :func:`kn_eligible` accepts;
        ``"plain"`` undoes either.

        Raises:
          ValueError: an unknown ``layout``, or one this QArray cannot take.

        Example:
            >>> import jax.numpy as jnp, jqx
            >>> q = jqx.quantize_array(jnp.ones((8, 20)), "int8")
            >>> p = q.with_code_layout("vnni")
            >>> p.qvalue.shape, bool((p.dequantize() == q.dequantize()).all())
            ((2, 2, 64), True)
        """
        if layout not in ("plain", "vnni", "kn"):
            raise ValueError(
                f"QArray.with_code_layout(layout={layout!r}): use 'plain', 'vnni' or 'kn'."
            )
        if layout == self.code_layout:
            return self
        if self.code_layout == "kn":
            plain = self._kn_view()._swapped(qvalue=pack_codes(self.codes(), self.fmt))
            if self.g_idx is not None:  # the stored row order back to GPTQ's group map
                inv = jnp.argsort(self.g_idx)
                plain = plain.replace(g_idx=(inv // self.block[1]).astype(jnp.int32))
            return plain.with_code_layout(layout)
        if layout == "plain":
            return self.replace(qvalue=self.codes(), code_layout="plain")
        if layout == "kn":
            if self.code_layout != "plain" or not kn_eligible(self):
                raise ValueError(
                    f"QArray.with_code_layout('kn') takes a 2-D (out, in) QArray in the plain "
                    f"layout, 4-bit, weight-only, without layout extensions, with blocks "
                    f"(1, g) along its input axis; got {self!r}."
                )
            # With GPTQ's act_order the inputs are sorted by group, so each group's g
            # inputs are consecutive rows of the stored transpose; g_idx keeps that order.
            order = _kn_order(self)
            rows = self.codes().T
            if order is not None:
                order = jnp.asarray(order)
                rows = rows[order]
            t = self._swapped(qvalue=pack_codes(rows, self.fmt))
            return self.replace(
                qvalue=t.qvalue,
                scale=t.scale,
                zero_point=t.zero_point,
                in_scale=t.in_scale,
                super_scale=t.super_scale,
                g_idx=order,
                code_layout="kn",
            )
        if not vnni_eligible(self):
            raise ValueError(
                f"QArray.with_code_layout('vnni') takes an int8 QArray without layout "
                f"extensions whose blocks split it into a contraction K and outputs N "
                f"(vnni_split; the native int8 GEMM's weights); got {self!r}. Leave this one "
                "in the plain layout."
            )
        return self.replace(qvalue=pack_int8(self._vnni_codes_kn()), code_layout="vnni")

    def _swapped(self, **kw) -> QArray:
        """This 2-D QArray's metadata and per-block children (scale, zero point,
        in_scale) transposed; ``kw`` replaces further fields (the codes)."""

        def t(a):
            return None if a is None else jnp.swapaxes(a, -1, -2) if a.ndim == 2 else a

        return self.replace(
            scale=t(self.scale),
            zero_point=t(self.zero_point),
            in_scale=t(self.in_scale),
            super_scale=t(self.super_scale),
            shape=(self.shape[1], self.shape[0]),
            block=(self.block[1], self.block[0]),
            super_block=_swap2(self.super_block),
            **kw,
        )

    def _vnni_in_out_view(self) -> QArray:
        """A ``"vnni"`` ``(out, in)`` weight (:func:`vnni_split` -1) as the ``(in, out)``
        weight its panels already hold: scales transposed, codes untouched."""
        return self._swapped()

    def _kn_view(self) -> QArray:
        """A ``"kn"`` QArray's children as what they are: the plain ``(in, out)``
        QArray of its transpose (no copy); with ``g_idx``, of its transpose with the
        inputs in the order ``g_idx`` lists (each group's inputs consecutive), so
        ``x @ W.T == x[..., g_idx] @ view``."""
        return self.replace(
            shape=(self.shape[1], self.shape[0]),
            block=(self.block[1], self.block[0]),
            super_block=_swap2(self.super_block),
            g_idx=None,
            code_layout="plain",
        )

    def _kn_unpermute(self, rows: jax.Array) -> jax.Array:
        """The view's ``(in, out)`` rows back in input order."""
        return rows if self.g_idx is None else rows[jnp.argsort(self.g_idx)]

    def _vnni_axes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(K's axes, N's axes) of the ``"vnni"`` layout (:func:`vnni_split`)."""
        s = vnni_split(tuple(self.shape), tuple(self.block))
        if s == -1:  # (out, in)
            return (1,), (0,)
        return tuple(range(s)), tuple(range(s, len(self.shape)))

    def _vnni_kn(self) -> tuple[int, int]:
        """(K, N) of the ``"vnni"`` layout: the logical shape split by :func:`vnni_split`."""
        k_axes, n_axes = self._vnni_axes()
        return math.prod(self.shape[a] for a in k_axes), math.prod(self.shape[a] for a in n_axes)

    def _vnni_codes_kn(self) -> jax.Array:
        """The codes as the ``(K, N)`` matrix that the ``"vnni"`` layout packs."""
        c = self.codes()
        if vnni_split(tuple(self.shape), tuple(self.block)) == -1:
            return c.T
        return c.reshape(self._vnni_kn())

    def values(self) -> jax.Array:
        """Grid values of the codes (before scaling), float32, logical shape."""
        return _formats.decode(self.codes(), self.fmt, jnp.float32)

    def blocked(self, a: jax.Array) -> jax.Array:
        """Reshape ``a`` (logical shape) to (n0, b0, n1, b1, ...)."""
        dims = []
        for s, b in zip(*self._layout(), strict=True):
            dims += [s // b, b]
        return a.reshape(dims)

    def expand(self, per_block: jax.Array) -> jax.Array:
        """Broadcasts a per-block array (shape // block) to the blocked view."""
        dims = []
        for n in per_block.shape:
            dims += [n, 1]
        return per_block.reshape(dims)

    def _two_level(self, codes: jax.Array, per_super: jax.Array) -> jax.Array:
        """Two-level scales: ``codes`` (per block) times ``per_super`` (per
        super-block, broadcast over the blocks it covers), float32, per block."""
        shape, block = self._layout()
        extra = len(shape) - len(self.shape)
        sb = tuple(self.super_block)
        sb = (1,) * extra + sb if extra >= 0 else sb[-extra:]
        dims, sdims = [], []
        for s, b, n in zip(sb, block, per_super.shape, strict=True):
            dims += [n, s // b]
            sdims += [n, 1]
        c = codes.astype(jnp.float32).reshape(dims)
        return (c * per_super.astype(jnp.float32).reshape(sdims)).reshape(codes.shape)

    def dequantize(self, dtype=None) -> jax.Array:
        """The logical array (pure): ``(values - zero_point) * scale / in_scale``, or
        ``(values * scale + zero_point) / in_scale`` with ``zero_kind="min"``; with
        two-level scales ``scale`` is ``scale * super_scale`` per block (module docstring).

        Example:
            >>> import jax.numpy as jnp, jqx
            >>> q = jqx.quantize_array(jnp.array([127.0, -64.0]), "int8")
            >>> q.dequantize().tolist()
            [127.0, -64.0]
        """
        return _dequantize_jit(self, None if dtype is None else jnp.dtype(dtype))

    def group_axis(self) -> int:
        """The axis (of the arrays held) that ``g_idx`` indexes: the last one whose
        block is above 1 (the last axis when every block is 1)."""
        _, block = self._layout()
        big = [i for i, b in enumerate(block) if b > 1]
        return big[-1] if big else len(block) - 1

    def _per_element(self, per_block: jax.Array) -> jax.Array:
        """A per-block array gathered through ``g_idx`` onto every index of the group
        axis, float32 (the other axes have block 1: one entry per index already)."""
        ax = self.group_axis()
        a = per_block.astype(jnp.float32)
        g = self.g_idx
        lead = g.ndim - 1  # a vmapped QArray stacks its members in front of g_idx too
        tail = (1,) * (a.ndim - ax - 1)
        idx = g.reshape(g.shape[:lead] + (1,) * (ax - lead) + g.shape[-1:] + tail)
        return jnp.take_along_axis(a, idx.astype(jnp.int32), axis=ax)

    def _dequantize(self, dtype) -> jax.Array:
        if self.code_layout == "kn":
            return self._kn_unpermute(self._kn_view()._dequantize(dtype)).T
        shape, _ = self._layout()
        if self.g_idx is not None:
            # Groups gathered through g_idx: scales per element, not per block.
            v = self.values()
            s = self._per_element(self.scale)
            if self.zero_kind == "min":
                v = v * s + self._per_element(self.zero_point)
            else:
                if self.zero_point is not None:
                    v = v - self._per_element(self.zero_point)
                v = v * s
            v = v.reshape(shape)
            if self.in_scale is not None:
                v = v / self.in_scale.astype(jnp.float32)
            return v.astype(dtype or self.dtype)
        v = self.blocked(self.values())
        if self.super_scale is not None:
            s = self._two_level(self.scale, self.super_scale)
        else:
            s = self.scale.astype(jnp.float32)
        if self.zero_kind == "min":
            # GGUF's order: codes * scale, then + min (the product is exact in float32
            # for GGUF's widths, so only the sum rounds, as in gguf's dequantize).
            if self.super_zero is not None:
                m = self._two_level(self.zero_point, self.super_zero)
            else:
                m = self.zero_point.astype(jnp.float32)
            v = v * self.expand(s) + self.expand(m)
        else:
            if self.zero_point is not None:
                v = v - self.expand(self.zero_point.astype(jnp.float32))
            v = v * self.expand(s)
        v = v.reshape(shape)
        if self.in_scale is not None:
            v = v / self.in_scale.astype(jnp.float32)
        return v.astype(dtype or self.dtype)

    def __jax_array__(self):
        raise TypeError(
            f"A jqx.QArray {self.shape} ({self.format}) was used as a plain array. Wrap the "
            "function that uses it with jqx.quantized(fn) (e.g. jax.jit(jqx.quantized("
            "model.apply))), or call jqx.dequantize(tree) first."
        )

    def __getitem__(self, key):
        # flax.nnx reads params as `variable[...]`; a full read is the QArray itself.
        if key is Ellipsis:
            return self
        raise TypeError(
            f"A jqx.QArray {self.shape} cannot be indexed with {key!r}; only q[...] (the whole "
            "array) is supported. Wrap the function with jqx.quantized(fn), or dequantize first."
        )

    def replace(self, **kw) -> QArray:
        return dataclasses.replace(self, **kw)


jax.tree_util.register_dataclass(QArray)


# One compiled program per layout instead of a dozen eager op dispatches; under an
# outer jit it is simply inlined.
_dequantize_jit = jax.jit(QArray._dequantize, static_argnums=1)


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def kn_eligible(q: QArray) -> bool:
    """Whether ``q`` can take the ``"kn"`` code layout: a 2-D ``(out, in)`` 4-bit
    weight-only QArray in the plain layout, without layout extensions other than a
    ``g_idx`` whose groups hold ``g`` inputs each (GPTQ's act_order), grouped (or one
    scale per row) along its input axis: block ``(1, g)``, ``g > 1``. An ``in_scale``
    (AWQ's) is taken as ``(1, in)``, without ``g_idx``: it moves with the transpose
    and divides x before the product; so is NVFP4's per-tensor second-level scale
    (:func:`foldable_super_scale`), its super-blocks swapped with it.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> kn_eligible(jqx.quantize_array(jnp.ones((8, 64)), "int4",
        ...                                granularity=jqx.per_group(32, axis=1)))
        True
    """
    ok = (
        q.ndim == 2
        and ((q.fmt.packed and q.fmt.bits == 4) or q.fmt.name in ("fp8_e4m3", "fp8_e5m2"))
        and q.act is None
        and q.code_layout == "plain"
        and (q.extensions in ((), ("g_idx",)) or foldable_super_scale(q))
        and (q.in_scale is None or (q.g_idx is None and q.in_scale.shape == (1, q.shape[1])))
        and q.block[0] == 1
        and q.block[1] > 1
        and q.qvalue.ndim == 2
    )
    return ok and (q.g_idx is None or _kn_order(q) is not None)


def foldable_super_scale(q: QArray) -> bool:
    """Whether ``q``'s only layout extension is a second-level scale (NVFP4's float32
    per tensor, or per stacked tensor once fused): it then folds into the block scales
    exactly as :meth:`QArray.dequantize` applies it (:func:`fold_super_scale`)."""
    return q.extensions == ("super_scale",) and q.super_zero is None


def fold_super_scale(q: QArray) -> QArray:
    """A :func:`foldable_super_scale` QArray as the plain one whose float32 block scales are
    its two-level scales (``scale * super_scale``, rounded once, as ``dequantize``
    computes them): the same values, so every kernel that takes plain block scales runs
    it (4 bytes per block instead of the stored 1 + 4 per tensor; made per call, not
    stored).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.quantize_nvfp4(jnp.linspace(-1.0, 1.0, 64).reshape(2, 32))
        >>> f = fold_super_scale(q)
        >>> f.extensions, bool((f.dequantize() == q.dequantize()).all())
        ((), True)
    """
    return q.replace(scale=q._two_level(q.scale, q.super_scale), super_scale=None, super_block=None)


def _swap2(t: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return None if t is None else (t[1], t[0])


def _kn_order(q: QArray) -> np.ndarray | None:
    """For a ``g_idx`` (GPTQ act_order) whose groups each hold exactly ``g`` inputs: the
    inputs sorted by group (stable), so each group's inputs are consecutive; else None
    (no ``g_idx``, a traced one, or unequal groups)."""
    if q.g_idx is None or isinstance(q.g_idx, jax.core.Tracer) or q.g_idx.ndim != 1:
        return None
    g = np.asarray(q.g_idx)
    groups = q.shape[1] // q.block[1]
    counts = np.bincount(g, minlength=groups)
    if counts.shape[0] != groups or not np.all(counts == q.block[1]):
        return None
    return np.argsort(g, kind="stable").astype(np.int32)


def vnni_split(shape: tuple[int, ...], block: tuple[int, ...]) -> int | None:
    """How a weight of ``shape`` and ``block`` splits into the contraction K and the
    outputs N of its ``"vnni"`` layout: ``s > 0``: its leading ``s`` axes are K, the rest
    N; ``-1``: a 2-D ``(out, in)`` weight contracted on its last axis (GGUF's and
    PyTorch's orientation, ``x @ W.T``); None where the blocks do not say. 2-D: ``1``
    when the scale is constant along axis 0 (a per-channel or per-tensor ``(in, out)``
    kernel), else ``-1`` when it is constant along axis 1 with one scale per row (an
    ``(out, in)`` weight, or a per-row embedding table: a tied output head is ``x @
    E.T``, and a lookup reads rows out of the panels, :meth:`QArray.row_codes`). More
    axes (Flax ``DenseGeneral`` kernels, e.g. ``(in, heads, head_dim)`` or ``(heads,
    head_dim, out)``): the leading axes whole in their block (the scale is constant
    along them: the contraction) followed only by axes with blocks of 1.

    Example:
        >>> vnni_split((384, 12, 32), (384, 1, 1)), vnni_split((12, 32, 384), (12, 32, 1))
        (1, 2)
        >>> vnni_split((1536, 576), (1, 576))  # (out, in), one scale per output row
        -1
        >>> vnni_split((4, 8, 16), (4, 8, 16)) is None  # per tensor: K is not known
        True
    """
    if len(shape) == 2:
        if block[0] == shape[0]:
            return 1  # per channel or per tensor: a Dense kernel (in, out)
        if block[1] == shape[1] and block[0] == 1:
            return -1  # (out, in), one scale per output row
        return None
    s = 0
    while s < len(shape) and block[s] == shape[s]:
        s += 1
    if s == 0 or s == len(shape) or any(b != 1 for b in block[s:]):
        return None
    return s


def vnni_eligible(q: QArray) -> bool:
    """Whether ``q`` can take the ``"vnni"`` code layout: an int8 QArray (not stacked)
    of at least 2 axes that split into K and N (:func:`vnni_split`), without layout
    extensions, in the plain layout, weight-only or with int8 activations per token or
    per tensor (the products the native GEMM computes; not LLM.int8(), not fp8 or MX
    activations).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> vnni_eligible(jqx.quantize_array(jnp.ones((8, 8)), "int8"))
        True
        >>> vnni_eligible(jqx.quantize_array(jnp.ones((8, 8)), "int4"))
        False
    """
    act = q.act
    native_act = act is None or (
        act.format == "int8"
        and act.kind in ("dynamic", "static")
        and act.granularity in ("per_token", "per_tensor")
    )
    return (
        q.format == "int8"
        and native_act
        and q.ndim >= 2
        and q.code_layout == "plain"
        and not q.extensions
        and q.qvalue.ndim == q.ndim
        and jnp.dtype(q.qvalue.dtype) == jnp.int8
        and vnni_split(tuple(q.shape), tuple(q.block)) is not None
    )
