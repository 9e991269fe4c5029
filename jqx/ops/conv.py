"""Quantized convolutions: what ``jqx.ops.conv_general_dilated`` computes.

Same semantics as ``jax.lax.conv_general_dilated`` on the dequantized kernel (within
the quantization error), honouring the kernel's activation spec ``q.act``. As for
matmuls (``jqx.ops.matmul``), this module states the product as a
:class:`ConvProblem` (static facts only) and asks the dispatcher
(:func:`jqx.ops.dispatch.choose_conv`) once which implementation runs it; the
implementations below are adapters with a ``supports`` check and no policy.

What is computed (the problem's ``kind``):

- ``weight_only`` (``q.act is None``): ``conv(x, dequantize(W))``;
- ``w8a8`` (a dynamic or static activation spec): ``conv(quantize(x), dequantize(W))``
  with x quantized per tensor (``per_tensor``, or the calibrated static scale) or per
  sample (``per_token``: a conv has no per-row scale that factors out of the window
  sum, so a "token" is one example of the batch), and, when the kernel is grouped
  along its input channels, per (sample, group). When the kernel's scales are shared
  over the window (jqx's conv layout, :func:`jqx.core.numerics.conv_kernel_block`) the
  scales factor out of the sum and the convolution runs on the codes: int8 x int8 ->
  int32 for int8 weights and activations, exact; decoded codes in float32 for fp8.
  Other layouts (one scale per window position, zero points) run the same numerics
  simulated: quantize-dequantize x, then a float convolution;
- ``dequantize`` (layout extensions, an ``in_scale``, or an activation spec no
  convolution defines: LLM.int8(), GGUF per-block): ``conv(x, W.dequantize())``, the
  activations left in float (``jqx.report`` says so).

Which implementation runs, and why: docs/internals/dispatch.md ("Convolutions"). On
CPU, int8 W8A8 convolutions run on the native AVX2 kernel (``native.conv_int8``,
bit-identical to XLA's int8 convolution) where it is available.

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> w = jqx.int8_dynamic_activation_int8_weight().quantize_weight(
    ...     jnp.ones((3, 3, 2, 4)), path="Conv_0/kernel")
    >>> x = jnp.ones((1, 5, 5, 2))
    >>> y = jqx.ops.conv_general_dilated(x, w, (1, 1), "SAME",
    ...                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> y.shape, float(y[0, 2, 2, 0])
    ((1, 5, 5, 4), 18.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jqx.core import formats as _formats
from jqx.core.numerics import absmax_scale, keep_nan_rows, quantize_activation
from jqx.core.qarray import QArray, is_qarray
from jqx.ops import dispatch
from jqx.ops.problem import decoded

__all__ = [
    "ConvProblem",
    "ConvImplementation",
    "conv_general_dilated",
    "describe_conv",
    "explain_conv",
    "ALL",
]

ConvKind = Literal["weight_only", "w8a8", "dequantize"]

_F32 = np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class ConvProblem:
    """One ``conv(x, W)`` with a quantized kernel ``W``, described by static facts.

    Shapes and the layout are stated in the canonical channels-last layout every
    implementation computes in: x ``(N, *spatial, C)``, W ``(*window, I, O)``, output
    ``(N, *spatial', O)`` (Flax's NHWC / HWIO need no transpose).

    Attributes:
      kind: ``"weight_only"``, ``"w8a8"`` or ``"dequantize"`` (module docstring).
      x_shape, w_shape: canonical shapes of the activation and the kernel.
      window_strides, padding, lhs_dilation, rhs_dilation: as for ``lax``, the padding
        resolved to explicit ``(low, high)`` pairs.
      feature_group_count, batch_group_count: as for ``lax``.
      weight_format: ``W.format``.
      block: ``W.block`` in the canonical kernel layout.
      zero_point: ``W`` has a zero point.
      act_format, act_kind, act_granularity: ``W.act``'s fields (None: weight-only).
      compute_dtype: the dtype float convolutions take ``x`` in.
      out_dtype: the result's dtype.
      precision: ``precision`` as given.
      w_perm: the permutation from the kernel's stored layout to the canonical one.
    """

    kind: ConvKind
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    window_strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    feature_group_count: int
    batch_group_count: int
    weight_format: str
    block: tuple[int, ...]
    zero_point: bool
    act_format: str | None
    act_kind: str | None
    act_granularity: str | None
    compute_dtype: np.dtype
    out_dtype: np.dtype
    precision: Any = None
    w_perm: tuple[int, ...] = ()

    @property
    def nd(self) -> int:
        """Number of spatial dims."""
        return len(self.x_shape) - 2

    @property
    def in_channels(self) -> int:
        """Input channels per feature group (the kernel's ``I``)."""
        return self.w_shape[-2]

    @property
    def window_shared(self) -> bool:
        """The kernel's scales are shared over the whole window (jqx's conv layout)."""
        return all(self.block[i] == self.w_shape[i] for i in range(self.nd))

    @property
    def in_groups(self) -> int:
        """Scale groups along the kernel's input channels (1: one scale per output)."""
        return self.in_channels // self.block[-2]

    @property
    def factored(self) -> bool:
        """Both scales factor out of the window sum, so the convolution can run on the
        codes: W8A8, scales shared over the window, no zero point, and groups along
        the input channels only without feature groups."""
        return (
            self.kind == "w8a8"
            and self.window_shared
            and not self.zero_point
            and self.batch_group_count == 1
            and (self.in_groups == 1 or self.feature_group_count == 1)
        )

    @property
    def int8_codes(self) -> bool:
        """:attr:`factored` with int8 weight and activation codes (int32 sums)."""
        return self.factored and self.weight_format == "int8" and self.act_format == "int8"

    @property
    def out_spatial(self) -> tuple[int, ...]:
        """The output's spatial sizes (input dilation included)."""
        return tuple(
            ((n - 1) * ld + 1 + lo + hi - (k - 1) * d - 1) // s + 1
            for n, (lo, hi), k, d, s, ld in zip(
                self.x_shape[1:-1],
                self.padding,
                self.w_shape[:-2],
                self.rhs_dilation,
                self.window_strides,
                self.lhs_dilation,
                strict=True,
            )
        )

    @property
    def act_groups(self) -> int:
        """Activation scale groups along x's channels: per (sample, group) when the
        kernel is grouped along its input channels and x is quantized per sample."""
        return self.in_groups if self.act_granularity == "per_token" else 1


class ConvImplementation:
    """A way to compute a :class:`ConvProblem` (an adapter: ``supports`` says what it
    can compute, never whether it is the fastest; that is the dispatcher's job)."""

    name: ClassVar[str] = "?"

    def supports(self, p: ConvProblem) -> bool:
        raise NotImplementedError

    def run(self, x: jax.Array, q: QArray, p: ConvProblem) -> jax.Array:
        """``x`` in the canonical layout, ``q`` as stored (:func:`kernel_in` reads it in
        the canonical layout); returns the canonical output."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<jqx.ops conv implementation {self.name}>"


# --------------------------------------------------------------------------- shared terms


def _canonical_dn(nd: int) -> lax.ConvDimensionNumbers:
    sp = tuple(range(1, nd + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, nd + 1) + sp,
        rhs_spec=(nd + 1, nd) + tuple(range(nd)),
        out_spec=(0, nd + 1) + sp,
    )


def kernel_in(p: ConvProblem, w: jax.Array) -> jax.Array:
    """A kernel-shaped array (codes, decoded codes, the dequantized kernel) or a
    per-block array (scales) in the canonical layout."""
    perm = p.w_perm or tuple(range(w.ndim))
    return w if perm == tuple(range(w.ndim)) else jnp.transpose(w, perm)


def _lax_conv(x, w, p: ConvProblem, *, feature_group_count=None, pet=None) -> jax.Array:
    return lax.conv_general_dilated(
        x,
        w,
        p.window_strides,
        p.padding,
        lhs_dilation=p.lhs_dilation,
        rhs_dilation=p.rhs_dilation,
        dimension_numbers=_canonical_dn(p.nd),
        feature_group_count=feature_group_count or p.feature_group_count,
        batch_group_count=p.batch_group_count,
        precision=p.precision,
        preferred_element_type=pet,
    )


def activation_codes(x: jax.Array, q: QArray, p: ConvProblem) -> tuple[jax.Array, jax.Array]:
    """x's codes as ``q.act`` asks for a convolution, and the float32 scale broadcastable
    to x ``(N, *spatial, C)``: the static scale; per tensor; or per sample and, with
    :attr:`ConvProblem.act_groups` groups, per (sample, channel group)."""
    fmt = _formats.get(p.act_format)
    xf = x.astype(jnp.float32)
    if p.act_kind == "static":
        # A sample holding NaN gets a NaN scale (its int8 codes cannot carry the NaN):
        # every output of that sample is NaN, as under a dynamic per-sample scale.
        s = q.act_scale.astype(jnp.float32).reshape((1,) * xf.ndim)
        s = keep_nan_rows(xf, s, tuple(range(1, xf.ndim)))
    elif p.act_granularity == "per_token":
        g = p.act_groups
        xg = xf.reshape(xf.shape[:-1] + (g, xf.shape[-1] // g))
        axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
        s = absmax_scale(xg, axes, fmt)  # (N, 1.., G, 1)
        codes, _ = quantize_activation(xg, fmt, scale=s)
        return codes.reshape(xf.shape), s.reshape(s.shape[:-2] + (g,))
    else:
        s = absmax_scale(xf, None, fmt)
    return quantize_activation(xf, fmt, scale=s)


def _weight_scale(q: QArray, p: ConvProblem) -> jax.Array:
    """The kernel's scale as ``(G, O)`` float32 (window-shared layouts only)."""
    s = kernel_in(p, q.scale.astype(jnp.float32))
    s = s.reshape(s.shape[-2:])
    return jnp.repeat(s, p.block[-1], axis=-1) if p.block[-1] > 1 else s


def _factored_conv(x: jax.Array, q: QArray, p: ConvProblem, codes_dtype) -> jax.Array:
    """``conv(x, W)`` on the codes, both scales applied to the sums: int8 codes with
    int32 sums (``codes_dtype=int8``), or decoded codes in float32. A kernel grouped
    along its input channels runs as a grouped convolution, one group of outputs per
    scale group, summed after scaling."""
    xq, xs = activation_codes(x, q, p)
    ws = _weight_scale(q, p)
    if codes_dtype == jnp.int8:
        wq, pet = kernel_in(p, q.codes()), jnp.int32
    else:
        xq = _formats.decode(xq, p.act_format, jnp.float32)
        wq, pet = kernel_in(p, decoded(q, jnp.float32)), None
    g_count = p.in_groups
    if g_count == 1:
        acc = _lax_conv(xq, wq, p, pet=pet).astype(jnp.float32)
        xs = xs.reshape(xs.shape[0:1] + (1,) * (acc.ndim - 1))
        return (acc * xs * ws[0]).astype(p.out_dtype)
    # (*window, G*g, O) -> (*window, g, G*O): feature group j sees x's channels of
    # group j and yields that group's O partial outputs.
    win, (cin, cout) = p.w_shape[:-2], p.w_shape[-2:]
    g = cin // g_count
    wg = wq.reshape(win + (g_count, g, cout))
    wg = jnp.moveaxis(wg, -3, -2).reshape(win + (g, g_count * cout))
    acc = _lax_conv(xq, wg, p, feature_group_count=g_count, pet=pet).astype(jnp.float32)
    acc = acc.reshape(acc.shape[:-1] + (g_count, cout))
    xs = xs.reshape(xs.shape[0:1] + (1,) * (acc.ndim - 3) + (xs.shape[-1], 1))
    return jnp.sum(acc * xs * ws, axis=-2).astype(p.out_dtype)


# --------------------------------------------------------------------------- implementations


class ConvDequantize(ConvImplementation):
    """Dequantize the kernel, then XLA's float convolution: always correct."""

    name = "xla.conv_dequantize"

    def supports(self, p: ConvProblem) -> bool:
        return p.kind in ("weight_only", "dequantize")

    def run(self, x, q, p):
        cdt = p.compute_dtype
        acc = _F32 if cdt != _F32 and np.dtype(cdt).itemsize == 2 else None
        y = _lax_conv(x.astype(cdt), kernel_in(p, q.dequantize(cdt)), p, pet=acc)
        return y.astype(p.out_dtype)


class ConvInt8(ConvImplementation):
    """W8A8 int8: XLA's int8 x int8 -> int32 convolution on the codes, exact sums."""

    name = "xla.conv_int8"

    def supports(self, p: ConvProblem) -> bool:
        return p.int8_codes

    def run(self, x, q, p):
        return _factored_conv(x, q, p, jnp.int8)


class ConvInt8Taps(ConvImplementation):
    """W8A8 int8 as one int8 x int8 -> int32 matmul per window position, summed:
    ``sum_t shift_t(x) . W[t]``. For few input channels XLA:CPU's convolution is
    mostly overhead and these small matmuls are cheaper (docs/internals/dispatch.md)."""

    name = "xla.conv_int8_taps"

    def supports(self, p: ConvProblem) -> bool:
        return p.int8_codes and p.in_groups == 1 and p.feature_group_count == 1

    def run(self, x, q, p):
        xq, xs = activation_codes(x, q, p)
        wq = kernel_in(p, q.codes())
        nd = p.nd
        pads = [(0, 0, 0)] + [
            (lo, hi, d - 1) for (lo, hi), d in zip(p.padding, p.lhs_dilation, strict=True)
        ]
        xp = lax.pad(xq, jnp.array(0, xq.dtype), pads + [(0, 0, 0)])
        win = p.w_shape[:nd]
        out = [
            (xp.shape[1 + i] - (win[i] - 1) * p.rhs_dilation[i] - 1) // p.window_strides[i] + 1
            for i in range(nd)
        ]
        acc = None
        for tap in np.ndindex(*win):
            start = [0] + [t * d for t, d in zip(tap, p.rhs_dilation, strict=True)] + [0]
            limit = (
                [xp.shape[0]]
                + [
                    s + (o - 1) * st + 1
                    for s, o, st in zip(start[1:-1], out, p.window_strides, strict=True)
                ]
                + [xp.shape[-1]]
            )
            xt = lax.slice(xp, start, limit, (1, *p.window_strides, 1))
            t = lax.dot_general(
                xt, wq[tap], (((nd + 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
            )
            acc = t if acc is None else acc + t
        ws = _weight_scale(q, p)[0]
        xs = xs.reshape(xs.shape[0:1] + (1,) * (acc.ndim - 1))
        return (acc.astype(jnp.float32) * xs * ws).astype(p.out_dtype)


class ConvNativeInt8(ConvImplementation):
    """W8A8 int8 on jqx's native AVX2 kernel (``jqx/kernels/cpu/conv_int8.cc``): x
    quantized, the windows gathered, int8 x int8 -> int32 sums and the rescale in one
    custom call, no im2col. Bit-identical to :class:`ConvInt8` (same codes, exact
    sums, the rescale in the same order). 1-D and 2-D, strides, padding of at least 0,
    any kernel dilation; one scale per output channel, no groups, no input dilation."""

    name = "native.conv_int8"

    def supports(self, p: ConvProblem) -> bool:
        return (
            p.int8_codes
            and p.nd in (1, 2)
            and p.in_groups == 1
            and p.feature_group_count == 1
            and all(d == 1 for d in p.lhs_dilation)
            and all(lo >= 0 and hi >= 0 for lo, hi in p.padding)
            and all(s > 0 for s in p.x_shape + p.w_shape)
            and all(o > 0 for o in p.out_spatial)
        )

    def run(self, x, q, p):
        from jqx.kernels.cpu import native  # noqa: PLC0415 (builds the kernel on first use)

        if not native.conv_available():
            raise RuntimeError(
                f"the native int8 convolution kernel cannot run here: {native.conv_status()}. "
                "Use backend=None (the measured choice) or backend='xla'."
            )
        wq = kernel_in(p, q.codes()).astype(jnp.int8)
        ws = _weight_scale(q, p)[0]
        if p.act_kind == "static":
            mode, xs = 0, q.act_scale.astype(jnp.float32).reshape(1)
        else:
            mode, xs = (2 if p.act_granularity == "per_token" else 1), jnp.ones((1,), jnp.float32)
        one = p.nd == 1  # a 1-D conv is a 2-D one of height 1
        xf = x.astype(jnp.float32)
        if one:
            xf, wq = xf[:, None], wq[None]
        strides = (1,) * one + p.window_strides
        pads = ((0, 0),) * one + p.padding
        dil = (1,) * one + p.rhs_dilation
        out = (1,) * one + p.out_spatial
        y = jax.ffi.ffi_call(
            native.CONV_INT8_TARGET,
            jax.ShapeDtypeStruct((xf.shape[0], *out, p.w_shape[-1]), jnp.float32),
            vmap_method="sequential",
        )(
            xf,
            wq,
            ws,
            xs,
            sh=np.int64(strides[0]),
            sw=np.int64(strides[1]),
            ph=np.int64(pads[0][0]),
            pw=np.int64(pads[1][0]),
            dh=np.int64(dil[0]),
            dw=np.int64(dil[1]),
            mode=np.int64(mode),
        )
        return (y[:, 0] if one else y).astype(p.out_dtype)


class ConvDecodedF32(ConvImplementation):
    """W8A8 with scales that factor out but codes that are not both int8 (fp8): the
    decoded codes (exact in float32) convolved in float32, then both scales."""

    name = "xla.conv_decoded_f32"

    def supports(self, p: ConvProblem) -> bool:
        return p.factored

    def run(self, x, q, p):
        return _factored_conv(x, q, p, jnp.float32)


class ConvSimulated(ConvImplementation):
    """W8A8 numerics in float: x quantized and decoded as ``q.act`` says, the kernel
    dequantized, one float convolution (layouts whose scales vary over the window)."""

    name = "xla.conv_simulated"

    def supports(self, p: ConvProblem) -> bool:
        return p.kind == "w8a8"

    def run(self, x, q, p):
        sim = dataclasses.replace(p, block=p.w_shape[:-2] + (p.in_channels, 1))  # per sample
        xq, xs = activation_codes(x, q, sim)
        xd = _formats.decode(xq, p.act_format, jnp.float32) * xs.reshape(
            xs.shape[0:1] + (1,) * (x.ndim - 1)
        )
        return _lax_conv(xd, kernel_in(p, q.dequantize(jnp.float32)), p).astype(p.out_dtype)


CONV_DEQUANTIZE = ConvDequantize()
CONV_INT8 = ConvInt8()
CONV_INT8_TAPS = ConvInt8Taps()
CONV_DECODED_F32 = ConvDecodedF32()
CONV_SIMULATED = ConvSimulated()
CONV_NATIVE_INT8 = ConvNativeInt8()
ALL = (
    CONV_NATIVE_INT8,
    CONV_INT8_TAPS,
    CONV_INT8,
    CONV_DECODED_F32,
    CONV_SIMULATED,
    CONV_DEQUANTIZE,
)


# --------------------------------------------------------------------------- the product


def _perms(dnums: lax.ConvDimensionNumbers):
    """Permutations into the canonical layout (x, kernel) and out of it (output)."""
    ls, rs, os_ = dnums
    x_perm = (ls[0], *ls[2:], ls[1])
    w_perm = (*rs[2:], rs[1], rs[0])
    out_axes = (os_[0], *os_[2:], os_[1])
    return x_perm, w_perm, tuple(int(i) for i in np.argsort(out_axes))


def _resolve_padding(padding, x_shape, w_shape, strides, rhs_dilation):
    """``padding`` as explicit pairs, resolved as ``lax.conv_general_dilated`` does."""
    if isinstance(padding, str):
        eff = [0 if k == 0 else 1 + r * (k - 1) for k, r in zip(w_shape, rhs_dilation, strict=True)]
        return tuple(
            tuple(int(v) for v in pr) for pr in lax.padtype_to_pads(x_shape, eff, strides, padding)
        )
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _out_dtype(x_dtype, pet) -> np.dtype:
    if pet is not None:
        return np.dtype(pet)
    return np.dtype(x_dtype) if jnp.issubdtype(x_dtype, jnp.floating) else _F32


def _check_static_scale(q: QArray) -> None:
    if q.act.kind == "static" and q.act_scale is None:
        raise ValueError(
            f"QArray {q.shape} has a static activation spec (act={q.act}) but act_scale is "
            "None: its activation scale was never calibrated. Run jqx.calibrate(fn, params, "
            "batches, recipe) to set it, or use a dynamic recipe such as "
            "jqx.int8_dynamic_activation_int8_weight()."
        )
    if q.act.kind == "static" and q.act_scale.size != 1:
        raise NotImplementedError(
            f"QArray {q.shape} has act_scale of shape {tuple(q.act_scale.shape)} (one static "
            "scale per stacked layer); a convolution needs a single scale: slice the layer "
            "first or use a dynamic recipe."
        )


def describe_conv(
    x_shape: Sequence[int],
    x_dtype,
    q: QArray,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> tuple[ConvProblem, tuple]:
    """The :class:`ConvProblem` for ``conv(x, q)``, and the permutations ``(x_perm,
    w_perm, out_perm)`` between the caller's layout and the canonical one."""
    x_shape = tuple(int(s) for s in x_shape)
    nd = len(x_shape) - 2
    if len(q.shape) != nd + 2:
        raise ValueError(
            f"jqx.ops.conv_general_dilated: the kernel {q.shape} ({q.format}) has "
            f"{len(q.shape)} dims but the input {x_shape} has {len(x_shape)}; a convolution "
            "with N spatial dims takes an (N + 2)-dim input and kernel."
        )
    dnums = lax.conv_dimension_numbers(x_shape, tuple(q.shape), dimension_numbers)
    x_perm, w_perm, out_perm = _perms(dnums)
    xc = tuple(x_shape[a] for a in x_perm)
    wc = tuple(q.shape[a] for a in w_perm)
    strides = tuple(int(s) for s in window_strides)
    ld = tuple(int(d) for d in (lhs_dilation or (1,) * nd))
    rd = tuple(int(d) for d in (rhs_dilation or (1,) * nd))
    if isinstance(padding, str) and any(d != 1 for d in ld):
        raise ValueError(  # lax's own message: both accept the same arguments
            "String padding is not implemented for transposed convolution using this op. "
            "Please either exactly specify the required padding or use conv_transpose."
        )
    pads = _resolve_padding(padding, xc[1:-1], wc[:-2], strides, rd)
    act = q.act
    if (
        q.extensions
        or q.in_scale is not None
        or (act is not None and (act.kind == "llm_int8" or act.granularity == "per_block"))
    ):
        # What no convolution formulation reads (a float minimum, two-level scales, an
        # in_scale) or defines (LLM.int8()'s outlier split, GGUF's per-block
        # activations): the float conv on the dequantized kernel, as before this module
        # existed; jqx.report says the activation spec is not applied.
        kind = "dequantize"
    elif act is None:
        kind = "weight_only"
    else:
        kind = "w8a8"
        _check_static_scale(q)
    p = ConvProblem(
        kind=kind,
        x_shape=xc,
        w_shape=wc,
        window_strides=strides,
        padding=pads,
        lhs_dilation=ld,
        rhs_dilation=rd,
        feature_group_count=int(feature_group_count),
        batch_group_count=int(batch_group_count),
        weight_format=q.format,
        block=tuple(q.block[a] for a in w_perm),
        zero_point=q.zero_point is not None,
        act_format=None if act is None else _formats.get(act.format).name,
        act_kind=None if act is None else act.kind,
        act_granularity=None if act is None else act.granularity,
        compute_dtype=np.dtype(x_dtype) if jnp.issubdtype(x_dtype, jnp.floating) else _F32,
        out_dtype=_out_dtype(x_dtype, preferred_element_type),
        precision=precision,
        w_perm=w_perm,
    )
    return p, (x_perm, w_perm, out_perm)


def _check_backend(backend) -> None:
    if backend not in dispatch.BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not supported; use None (the measured choice), 'xla', "
            "'native' (jqx's CPU kernels) or 'pallas'."
        )


def conv_general_dilated(
    lhs: jax.Array,
    rhs: QArray | jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    backend: str | None = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` whose kernel ``rhs`` may be a :class:`jqx.QArray`.

    Args:
      lhs: the input (a float array).
      rhs: the kernel: a QArray (or a plain array, passed to ``lax``).
      window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type: as
        for ``lax.conv_general_dilated`` (``lhs_dilation`` is how transposed
        convolutions, e.g. ``lax.conv_transpose``, reach it).
      backend: ``None`` (the measured choice: on CPU, int8 W8A8 convolutions on jqx's
        native AVX2 kernel where it applies), ``"xla"``, ``"native"`` (that kernel
        wherever it supports the convolution, XLA for the rest; raises where it cannot
        run) or ``"pallas"`` (XLA: no Pallas conv kernel). See
        docs/internals/dispatch.md.

    Returns:
      The convolution, in ``lax``'s output layout. Bias is not added (Flax adds it).

    Raises:
      ValueError: an unknown ``backend``, a static activation spec never calibrated,
        or a kernel whose rank does not match the input's.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> w = jqx.int8_weight_only().quantize_weight(jnp.ones((3, 3, 1, 2)), path="conv/kernel")
        >>> y = jqx.ops.conv_general_dilated(jnp.ones((2, 4, 4, 1)), w, (1, 1), "VALID",
        ...                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
        >>> y.shape, float(y[0, 0, 0, 0])
        ((2, 2, 2, 2), 9.0)
    """
    _check_backend(backend)
    kw = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if is_qarray(lhs):
        lhs = lhs.dequantize()  # a quantized input is rare: keep the kernel quantized
    if not is_qarray(rhs):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)
    x = jnp.asarray(lhs)
    p, (x_perm, w_perm, out_perm) = describe_conv(
        x.shape, x.dtype, rhs, window_strides, padding, **kw
    )
    impl = dispatch.choose_conv(p, backend)
    xc = x if x_perm == tuple(range(x.ndim)) else jnp.transpose(x, x_perm)
    y = impl.run(xc, rhs, p)
    return y if out_perm == tuple(range(y.ndim)) else jnp.transpose(y, out_perm)


def explain_conv(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    backend: str | None = None,
) -> str:
    """The name of the implementation :func:`conv_general_dilated` would run.

    Takes its arguments (only shapes and dtypes are read); ``"lax.conv_general_dilated"``
    when the kernel is not quantized. Names: docs/internals/dispatch.md.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> w = jqx.int8_dynamic_activation_int8_weight().quantize_weight(
        ...     jnp.ones((3, 3, 16, 8)), path="conv/kernel")
        >>> x, dn = jnp.ones((2, 8, 8, 16)), ("NHWC", "HWIO", "NHWC")
        >>> jqx.ops.explain_conv(x, w, (1, 1), "SAME", dimension_numbers=dn, backend="xla")
        'xla.conv_int8'
        >>> with jqx.ops.policy(platform="cpu", native_available=True):  # the AVX2 kernel
        ...     jqx.ops.explain_conv(x, w, (1, 1), "SAME", dimension_numbers=dn)
        'native.conv_int8'
    """
    _check_backend(backend)
    if not is_qarray(rhs):
        return "lax.conv_general_dilated"
    if not (hasattr(lhs, "shape") and hasattr(lhs, "dtype")):
        lhs = jnp.asarray(lhs)
    p, _ = describe_conv(
        lhs.shape,
        np.dtype(lhs.dtype),
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
    )
    return dispatch.choose_conv(p, backend).name
