"""The recipe protocol and the round-to-nearest recipe.

A recipe is one frozen keyword-only dataclass that is both the configuration
of a method and the code that applies it to one weight. Every recipe
subclasses :class:`Recipe`, a base with no data fields that states what the
rest of jqx may use (``jqx.quantize``, ``jqx.calibrate``, QAT, the report):

- ``name``: a display name (e.g. ``"gptq(bits=4, group_size=128)"``);
- ``format`` (the storage format's name) and ``fmt`` (its :class:`jqx.Format`);
- ``act``: how the activations of the weight's matmul are quantized
  (:class:`jqx.ActSpec`), None for weight-only;
- ``needs_calibration``, ``stats_needed``, ``sequential``: what
  ``jqx.calibrate`` must gather and in which order;
- ``quantize_weight(w, path=None, stats=None) -> QArray``;
- ``for_embedding()``: the recipe an embedding table gets (rows along the
  feature axis, round to nearest, no calibration);
- ``replace(**kw)``: a copy with some fields changed.

:class:`RTN` is round to nearest (``jqx.int8_weight_only()`` and the other
presets build it); GPTQ, HQQ, AWQ and SmoothQuant live in their own modules.
Values that follow from the fields (a GPTQ recipe's storage format, its
display name) are properties, never stored twice.

Example:
    >>> import jqx
    >>> r = jqx.int4_weight_only(group_size=32)
    >>> isinstance(r, jqx.Recipe), type(r).__name__, r.format
    (True, 'RTN', 'uint4')
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from jqx.core import formats as _formats
from jqx.core.numerics import (
    Granularity,
    attention_kernel_contraction,
    check_convention,
    check_granularity,
    check_group_size,
    check_scale_dtype,
    check_scheme,
    conv_kernel_block,
    is_conv_kernel,
    per_block,
    per_group,
    quantize_array,
)
from jqx.core.qarray import ActSpec, QArray

__all__ = ["Recipe", "RTN", "build"]

R = TypeVar("R", bound="Recipe")


class Recipe(abc.ABC):
    """What every jqx recipe provides (a base class with no data fields).

    Subclasses are frozen keyword-only dataclasses; they define ``name``,
    ``format`` and ``quantize_weight`` and override the calibration
    properties when they need data. ``isinstance(r, jqx.Recipe)`` is how
    ``jqx.quantize`` and ``jqx.calibrate`` recognise a recipe.

    Example:
        >>> import jqx
        >>> r = jqx.gptq(bits=3)
        >>> isinstance(r, jqx.Recipe), r.format, r.needs_calibration, r.sequential
        (True, 'uint4', True, True)
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Display name (reports, error messages)."""

    @property
    @abc.abstractmethod
    def format(self) -> str:
        """Name of the weight's storage format."""

    @property
    def fmt(self) -> _formats.Format:
        """The storage :class:`jqx.Format`."""
        return _formats.get(self.format)

    @property
    def act(self) -> ActSpec | None:
        """Activation spec of the weight's matmul; None: weight-only."""
        return None

    @property
    def needs_calibration(self) -> bool:
        """True when the recipe needs activation statistics (``jqx.calibrate``)."""
        return False

    @property
    def stats_needed(self) -> tuple[str, ...]:
        """Statistics (see ``jqx.calibration.stats.STAT_NAMES``) ``jqx.calibrate``
        gathers for this recipe; min/max are always gathered."""
        return ()

    @property
    def sequential(self) -> bool:
        """Quantize layers in forward order, each calibrated on the outputs of
        the already-quantized earlier layers (GPTQ)."""
        return False

    @abc.abstractmethod
    def quantize_weight(self, w: jax.Array, path: str | None = None, stats: Any = None) -> QArray:
        """Quantizes one weight; ``stats`` are its ``LayerStats`` from ``jqx.calibrate``."""

    def for_embedding(self) -> Recipe:
        """The recipe an embedding table ``(rows, features)`` gets when this one selects it.

        A lookup reads whole rows, so a table is quantized in rows: one scale per
        row, or groups of ``group_size`` along the row (the feature axis), so
        ``jqx.quantized`` gathers the codes and scales of the looked-up rows and
        decodes only those. The table is round to nearest in this recipe's
        storage format: a lookup has no matmul input for GPTQ, AWQ or
        SmoothQuant to calibrate on. A dynamic activation spec is kept: it
        applies where the table is a matmul weight (a tied output projection,
        ``Embed.attend``), never to a lookup; a static one is dropped (it would
        need a calibrated scale). Subclasses with more to keep override this.

        Example:
            >>> import jqx
            >>> r = jqx.gptq(bits=4, group_size=32).for_embedding()
            >>> type(r).__name__, r.format, r.group_size, r.axis, r.needs_calibration
            ('RTN', 'uint4', 32, -1, False)
        """
        return RTN(
            name=f"{self.name} (embedding rows)",
            format=self.format,
            scheme=getattr(self, "scheme", "absmax"),
            group_size=getattr(self, "group_size", None),
            axis=-1,
            act=_table_act(self.act),
        )

    def replace(self: R, **kw) -> R:
        """A copy with the given fields changed (validated like the constructor).

        Example:
            >>> import jqx
            >>> jqx.gptq(bits=4).replace(bits=3).name
            'gptq(bits=3, group_size=128)'
        """
        _check_keywords(type(self), f"{type(self).__name__}.replace", kw)
        return dataclasses.replace(self, **kw)


def _table_act(act: ActSpec | None) -> ActSpec | None:
    # A static scale comes from calibrating a matmul's inputs; a table has none to
    # calibrate on when it is looked up, so it stays weight-only.
    return None if act is None or act.kind == "static" else act


def _check_keywords(cls: type, who: str, kw: dict, fixed: tuple[str, ...] = ()) -> None:
    # dataclass' own TypeError names one keyword and not the accepted ones.
    accepted = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed]
    bad = [k for k in kw if k not in accepted]
    if bad:
        raise TypeError(
            f"{who}() got unexpected keyword argument(s) {', '.join(repr(k) for k in bad)}; "
            f"accepted keywords: {', '.join(accepted)}."
        )


def build(cls: type[R], who: str, kw: dict, **fixed) -> R:
    """``cls(**fixed, **kw)`` for a verb-like constructor named ``who``; an
    unknown keyword, or one the constructor fixes, is an error that lists the
    accepted keywords.

    Example:
        >>> build(RTN, "weight_only", {"scheme": "zero_point"}, format="uint8").scheme
        'zero_point'
    """
    _check_keywords(cls, who, kw, tuple(fixed))
    return cls(**fixed, **kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTN(Recipe):
    """Round to nearest: how to quantize a weight (and, via ``act``, its
    matmul's activations) with the seed formulas, no data needed except for a
    static activation scale.

    The presets (``jqx.int8_weight_only()``, ``jqx.int4_weight_only()``, ...)
    build it. Weight granularity is stated along the weight's reduction axis
    (``axis``, default -2: the ``in`` axis of a Flax kernel ``(in, out)``,
    also for scanned kernels ``(layers, in, out)``).

    Attributes:
      name: the constructor that made it (for reports).
      format: weight format name.
      scheme: ``"absmax"`` or ``"zero_point"``.
      group_size: group size along ``axis``; None = per-channel.
      axis: the weight's reduction axis (default -2).
      granularity: overrides ``group_size``/``axis`` when given.
      symmetric_range, convention, scale_dtype: see :func:`jqx.quantize_array`.
      act: activation spec, None for weight-only.
      conv_kernels: how convolution kernels ``(*window, in, out)`` are laid out (with
        the default ``axis`` and no ``granularity``): one scale per output channel, or
        with ``group_size`` per (group of input channels, output channel), shared over
        the window (:func:`jqx.core.numerics.conv_kernel_block`). None (default): the
        kernels whose path names a conv module (:func:`jqx.core.numerics.is_conv_kernel`);
        True: every weight with ndim >= 3; False: none (one scale per window position).

    Example:
        >>> import jax.numpy as jnp
        >>> RTN(format="int4", group_size=2).quantize_weight(jnp.ones((4, 3))).block
        (2, 1)
    """

    name: str = "weight_only"
    format: str = "int8"
    scheme: str = "absmax"
    group_size: int | None = None
    axis: int = -2
    granularity: Granularity | None = None
    symmetric_range: bool = False
    convention: str = "jqx"
    scale_dtype: str = "float32"
    act: ActSpec | None = None
    conv_kernels: bool | None = None

    def __post_init__(self):
        fmt = _formats.get(self.format)
        object.__setattr__(self, "format", fmt.name)
        if self.conv_kernels not in (None, True, False):
            raise ValueError(
                f"conv_kernels={self.conv_kernels!r} is not supported; use None (kernels under "
                "a module named like a conv), True (every weight with ndim >= 3) or False."
            )
        check_scheme(self.scheme, fmt)
        check_group_size(self.group_size)
        check_convention(self.convention)
        check_scale_dtype(self.scale_dtype)
        check_granularity(self.granularity)
        if self.act is not None and not isinstance(self.act, ActSpec):
            raise TypeError(
                f"act={self.act!r} must be a jqx.ActSpec or None, e.g. "
                "jqx.ActSpec('dynamic', 'int8', 'per_token')."
            )

    @property
    def needs_calibration(self) -> bool:
        """A static activation scale comes from ``jqx.calibrate``."""
        return self.act is not None and self.act.kind == "static"

    @property
    def stats_needed(self) -> tuple[str, ...]:
        return ("hist",) if self.needs_calibration else ()

    def weight_granularity(self, shape=None, path: str | None = None) -> Granularity:
        """``granularity``, or groups of ``group_size`` along ``axis``; for a conv
        kernel of ``shape`` at ``path`` (see ``conv_kernels``) the conv layout.

        Example:
            >>> import jqx
            >>> jqx.int8_weight_only().weight_granularity((3, 3, 1, 16), "Conv_0/kernel")
            Granularity(kind='block', axes=(), group_size=None, block_shape=(3, 3, 1, 1))
        """
        if self.granularity is not None:
            return self.granularity
        if shape is not None and self.axis == -2:
            conv = self.conv_kernels
            if conv is None:
                conv = is_conv_kernel(path, len(shape))
            if conv and len(shape) >= 3:
                return per_block(conv_kernel_block(shape, self.group_size, path))
            n = 0 if conv else attention_kernel_contraction(path, len(shape))
            if n and self.group_size is None:  # one scale per output (head, feature)
                return per_block(tuple(shape[:n]) + (1,) * (len(shape) - n))
            if n:  # groups along the last contracted axis (the head size for `out`)
                return per_group(self.group_size, n - 1)
        return per_group(self.group_size, self.axis)

    def for_embedding(self) -> RTN:
        """This recipe with its groups along the rows of a table (``axis=-1``); an
        explicit ``granularity`` is kept. See :meth:`Recipe.for_embedding`.

        Example:
            >>> import jqx
            >>> r = jqx.int8_static_activation_int8_weight().for_embedding()
            >>> r.axis, r.act, r.needs_calibration
            (-1, None, False)
        """
        return dataclasses.replace(self, axis=-1, act=_table_act(self.act))

    def quantize_weight(self, w: jax.Array, path: str | None = None, stats: Any = None) -> QArray:
        """Quantizes one weight (round to nearest; ``stats`` are not used)."""
        return quantize_array(
            w,
            self.format,
            scheme=self.scheme,
            granularity=self.weight_granularity(jnp.shape(w), path),
            symmetric_range=self.symmetric_range,
            convention=self.convention,
            scale_dtype=jnp.dtype(self.scale_dtype),
            act=self.act,
            path=path,
        )
