"""Microscaling recipes: MX (E8M0 block scales) and NVFP4 weights, and MX activations.

:class:`MX` is one frozen recipe for every block-scaled format of
:mod:`jqx.core.mx`; the constructors name the common ones. With ``act_format`` the
matmul's activations are quantized at run time in the same way (per block of 32
along K, E8M0 scales): W4A4 / W8A8 MX. On backends without MX hardware (every CPU)
the product is emulated exactly: both operands are decoded to float32 (MX values
and their products are exact there) and one float32 dot accumulates. On GPUs with MX
tensor cores (compute capability 10.0 and later) MXFP8 and MXFP4 products run as
``jax.nn.scaled_matmul``; ``jqx.ops.explain`` says which. See docs/guide/mx.md.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> q = jqx.mxfp4_weight_only().quantize_weight(jnp.ones((64, 8)))
    >>> q.format, q.block, q.scale.dtype.name
    ('fp4_e2m1', (32, 1), 'float8_e8m0fnu')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jqx.core import formats as _formats
from jqx.core import mx as _mx
from jqx.core.qarray import ActSpec, QArray
from jqx.recipes.base import Recipe, build

__all__ = [
    "MX",
    "mx_weight_only",
    "mxfp4_weight_only",
    "mxfp8_weight_only",
    "nvfp4_weight_only",
    "mx_dynamic_activation_mx_weight",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MX(Recipe):
    """Block-scaled weights (MX or NVFP4), optionally with dynamic MX activations.

    Attributes:
      element: element format (:data:`jqx.core.mx.MX_ELEMENTS`; ``"fp4_e2m1"`` for NVFP4).
      layout: ``"mx"`` (E8M0 scale per block of 32) or ``"nvfp4"`` (E4M3 scale per
        block of 16 and one float32 per tensor).
      block: elements per block; None: 32 for MX, 16 for NVFP4.
      scale_mode: MX scale rounding (:data:`jqx.core.mx.SCALE_MODES`; MX only).
      axis: the weight's reduction axis (-2: the ``in`` axis of a Flax kernel).
      act_format: None (weight-only) or the element format of the activations,
        quantized per block of 32 along the contraction at run time.
    """

    element: str = "fp4_e2m1"
    layout: str = "mx"
    block: int | None = None
    scale_mode: str = "floor"
    axis: int = -2
    act_format: str | None = None

    def __post_init__(self):
        if self.layout not in ("mx", "nvfp4"):
            raise ValueError(
                f"layout={self.layout!r} is not supported; use 'mx' (E8M0 block scales) or "
                "'nvfp4' (E4M3 block scales and a float32 per tensor)."
            )
        f = _mx.check_mx_element(self.element)
        if self.layout == "nvfp4" and f.name != "fp4_e2m1":
            raise ValueError(
                f"layout='nvfp4' stores FP4 E2M1 elements; got element={self.element!r}. Use "
                "element='fp4_e2m1', or layout='mx' for other element formats."
            )
        object.__setattr__(self, "element", f.name)
        if self.scale_mode not in _mx.SCALE_MODES:
            raise ValueError(
                f"scale_mode={self.scale_mode!r} is not supported; use one of "
                f"{', '.join(_mx.SCALE_MODES)} ('floor' is the OCP spec's rule)."
            )
        if self.block is not None and (not isinstance(self.block, int) or self.block <= 0):
            raise ValueError(f"block={self.block!r} must be a positive int (32 for MX) or None.")
        if self.act_format is not None:
            object.__setattr__(self, "act_format", _mx.check_mx_element(self.act_format).name)

    @property
    def name(self) -> str:
        if self.layout == "nvfp4":
            base = "nvfp4"
        else:
            base = f"mx({self.element}, scale_mode={self.scale_mode})"
        return base + (f" + act mx({self.act_format})" if self.act_format else "")

    @property
    def format(self) -> str:
        return self.element

    @property
    def act(self) -> ActSpec | None:
        if self.act_format is None:
            return None
        return ActSpec(kind="dynamic", format=self.act_format, granularity="mx")

    @property
    def block_size(self) -> int:
        """Elements per block (the default of the layout when ``block`` is None)."""
        if self.block is not None:
            return self.block
        return _mx.NVFP4_BLOCK if self.layout == "nvfp4" else _mx.MX_BLOCK

    def quantize_weight(self, w: jax.Array, path: str | None = None, stats: Any = None) -> QArray:
        """Quantizes one weight with blocks along ``axis`` (``stats`` are not used)."""
        if self.layout == "nvfp4":
            return _mx.quantize_nvfp4(
                w, axis=self.axis, block=self.block_size, act=self.act, path=path
            )
        return _mx.quantize_mx(
            w,
            self.element,
            axis=self.axis,
            block=self.block_size,
            scale_mode=self.scale_mode,
            act=self.act,
            path=path,
        )

    def for_embedding(self) -> MX:
        """This recipe with its blocks along the rows of a table (``axis=-1``).

        Example:
            >>> import jqx
            >>> jqx.mxfp8_weight_only().for_embedding().axis
            -1
        """
        return dataclasses.replace(self, axis=-1)


def mx_weight_only(fmt: str = "fp4_e2m1", **kw) -> MX:
    """MX weight-only: ``fmt`` elements (:data:`jqx.core.mx.MX_ELEMENTS`) in blocks of
    32 along the reduction axis with an E8M0 scale each. Keywords: ``scale_mode``,
    ``block``, ``axis`` (see :class:`MX`).

    Example:
        >>> mx_weight_only("fp6_e2m3").name
        'mx(fp6_e2m3, scale_mode=floor)'
    """
    return build(MX, "mx_weight_only", kw, element=_formats.get(fmt).name, layout="mx")


def mxfp4_weight_only(**kw) -> MX:
    """MXFP4 weight-only (FP4 E2M1, blocks of 32, E8M0 scales: 4.25 bits per weight).

    Example:
        >>> mxfp4_weight_only(scale_mode="ct").scale_mode
        'ct'
    """
    return build(MX, "mxfp4_weight_only", kw, element="fp4_e2m1", layout="mx")


def mxfp8_weight_only(**kw) -> MX:
    """MXFP8 weight-only (FP8 E4M3, blocks of 32, E8M0 scales: 8.25 bits per weight).

    Example:
        >>> mxfp8_weight_only().format
        'fp8_e4m3'
    """
    return build(MX, "mxfp8_weight_only", kw, element="fp8_e4m3", layout="mx")


def nvfp4_weight_only(**kw) -> MX:
    """NVFP4 weight-only (FP4 E2M1, blocks of 16, E4M3 scales and one float32 per
    tensor: 4.5 bits per weight), compressed-tensors' encoder bit for bit.

    Example:
        >>> nvfp4_weight_only().block_size
        16
    """
    return build(MX, "nvfp4_weight_only", kw, element="fp4_e2m1", layout="nvfp4")


def mx_dynamic_activation_mx_weight(fmt: str = "fp4_e2m1", act_fmt: str | None = None, **kw) -> MX:
    """MX weights and activations quantized per block of 32 along K at run time: W4A4
    (``fmt="fp4_e2m1"``) or W8A8 (``fmt="fp8_e4m3"``) MX. ``act_fmt`` defaults to
    ``fmt``. Keywords as :func:`mx_weight_only`.

    Example:
        >>> mx_dynamic_activation_mx_weight("fp8_e4m3").act.granularity
        'mx'
    """
    f = _formats.get(fmt).name
    a = f if act_fmt is None else _formats.get(act_fmt).name
    return build(MX, "mx_dynamic_activation_mx_weight", kw, element=f, layout="mx", act_format=a)
