"""GPTQ (Frantar et al., 2022): Hessian-aware rounding with error feedback.

For a Flax kernel ``W`` of shape ``(K, N)`` used as ``y = x @ W``, the layer
error ``||X W - X Q||^2`` is a quadratic in the rows of ``W`` with Hessian
``H = 2 X^T X / n``. GPTQ quantizes the K input rows one at a time and
spreads each row's rounding error over the rows not yet quantized, through
the upper Cholesky factor of ``H^-1``:

1. ``H = 2 xtx / n`` from the streamed statistics (``jqx.calibration.stats``).
2. Dead inputs (``diag H == 0``): ``H_ii = 1``, weight row set to 0.
3. Dampening: ``H += damp * mean(diag H) * I``.
4. ``U = cholesky(H^-1)`` as an upper factor (via ``cholesky(H)``).
5. Blocks of ``block_size`` rows; inside a block every row update is applied
   at once, the rest of the matrix gets one lazy update per block.
6. Group-wise scales: ``static_groups=True`` computes every group's scale
   from ``W`` up front; otherwise a group's scale is computed when its first
   row is reached, from the weights as updated so far ("dynamic groups").
   ``clip_search=True`` picks each group's range by a search over shrink
   factors (``grid.search_group_params``) instead of its min/max;
   ``float_zero=True`` leaves each group's zero point unrounded.
7. ``act_order``: rows are processed by descending ``diag H``; the
   permutation is undone in the stored QArray.

act_order with groups (``group_layout``, which matters only for
``act_order=True, static_groups=False`` and groups smaller than K):

- ``"g_idx"`` (default; the reference implementation's and AutoGPTQ/GPTQModel's
  ``desc_act=True, static_groups=False``): rows in the full descending-``diag H``
  order, and each group is ``group_size`` consecutive rows of that order, its
  scale computed when its first row is reached. A group then gathers rows from
  anywhere in ``W``, so the QArray carries ``g_idx`` (the group of each input
  row, :mod:`jqx.core.qarray`); its matmuls run as dequantize-then-dot.
- ``"contiguous"``: the groups stay runs of consecutive input rows (an ordinary
  group-wise QArray, which the packed 4-bit kernels read): groups by descending
  ``max(diag H)`` over the group, rows by descending ``diag H`` within a group.
  Its output error is measurably above the ``"g_idx"`` order's (the order
  within the budget of one group is coarser; docs/guide/exchange.md).

With ``static_groups=True`` the full order is used and every row keeps the
scale of its original group (AutoGPTQ's ``static_groups``): no ``g_idx``.

Microscaling grids (``mx=``, :mod:`jqx.recipes.mx`): GPTQ over MXFP4, MXFP6, MXFP8,
MXINT8 or NVFP4 elements. The groups are the format's blocks along K (32 rows; 16 for
NVFP4), and a block's scale is the format's own rule (:mod:`jqx.core.mx`: an E8M0 power
of two from the block's amax with the recipe's ``scale_mode``; for NVFP4 an E4M3 scale
under the per-tensor float32 scale, which is fixed up front from ``max |W|``). With
dynamic groups (the default) the scale is taken from the error-updated weights of the
block when its first row is reached; ``static_groups=True`` takes every block's scale
from the original ``W``. Each row is then rounded onto the element grid with its block's
scale and its error flows on as usual. The result is the QArray
:func:`jqx.core.mx.quantize_mx` / :func:`~jqx.core.mx.quantize_nvfp4` return (blocks
``(32, 1)``), so every MX consumer runs it. An MX QArray has no ``g_idx``: with
``act_order`` and dynamic groups the blocks stay contiguous (``group_layout`` is not
consulted; the ``"contiguous"`` order above).

Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (256, 64))
    >>> w = jax.random.normal(jax.random.key(1), (64, 32))
    >>> q = gptq_quantize(w, 2 * x.T @ x / 256, GPTQ(bits=4, group_size=32))
    >>> q.shape, q.format
    ((64, 32), 'uint4')
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jqx.core import formats as _formats
from jqx.core import mx as _mx
from jqx.core.numerics import (
    check_finite,
    check_group_divides,
    check_group_size,
    make_qarray,
)
from jqx.core.qarray import ActSpec, QArray
from jqx.recipes import grid as _grid
from jqx.recipes.base import Recipe, build
from jqx.recipes.mx import MX

__all__ = ["GPTQ", "gptq", "gptq_quantize", "gptq_hessian"]

_HI = lax.Precision.HIGHEST
# Up to this many blocks the block loop is unrolled (see _gptq_core_perm).
_MAX_UNROLLED_BLOCKS = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ(_grid.IntGridRecipe, Recipe):
    """GPTQ weight-only recipe and settings; build it with :func:`gptq`.

    Needs ``jqx.calibrate`` (statistic ``xtx``); quantizes layers in forward
    order (``sequential``). The fields are the arguments of :func:`gptq`.

    Example:
        >>> r = GPTQ(bits=3, group_size=64, act_order=True)
        >>> r.name, r.format, r.scheme
        ('gptq(bits=3, group_size=64, act_order)', 'uint4', 'zero_point')
    """

    bits: int = 4
    group_size: int | None = 128
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    sym: bool = False
    static_groups: bool = False
    clip_search: bool = False
    group_layout: str = "g_idx"
    mx: MX | None = None
    float_zero: bool = False

    def __post_init__(self):
        _grid.int_grid(self.bits, self.sym, who="gptq")
        if self.mx is not None:
            self._check_mx()
        if self.group_layout not in ("g_idx", "contiguous"):
            raise ValueError(
                f"gptq: group_layout={self.group_layout!r} is not supported; use 'g_idx' (the "
                "reference act_order: groups of consecutive rows in activation order, stored "
                "with a group index) or 'contiguous' (groups of consecutive input rows)."
            )
        check_group_size(self.group_size, who="gptq")
        if (
            isinstance(self.damp, bool)
            or not isinstance(self.damp, (int, float))
            or not 0.0 <= float(self.damp) < 1e6
        ):
            raise ValueError(
                f"gptq: damp={self.damp!r} must be a float >= 0 (fraction of mean(diag H); the "
                "paper uses 0.01)."
            )
        object.__setattr__(self, "damp", float(self.damp))
        if (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size <= 0
        ):
            raise ValueError(
                f"gptq: block_size={self.block_size!r} must be a positive int (e.g. 128)."
            )
        if not isinstance(self.clip_search, bool):
            raise ValueError(f"gptq: clip_search={self.clip_search!r} must be True or False.")
        if not isinstance(self.float_zero, bool):
            raise ValueError(f"gptq: float_zero={self.float_zero!r} must be True or False.")
        if self.float_zero and self.mx is not None:
            raise ValueError(
                f"gptq: float_zero=True with mx={self.mx.name}: MX blocks have a scale and no "
                "zero point. Drop float_zero."
            )
        if self.float_zero and self.sym:
            raise ValueError(
                "gptq: float_zero=True with sym=True: absmax codes have no zero point. Drop "
                "float_zero, or use sym=False (unsigned codes with zero points)."
            )

    def _check_mx(self) -> None:
        m = self.mx
        if not isinstance(m, MX):
            raise ValueError(
                f"gptq: mx={m!r} must be an MX recipe, e.g. mx=jqx.mxfp4_weight_only() or "
                "jqx.nvfp4_weight_only(), or None for an integer grid."
            )
        if m.axis not in (-2, 0):
            raise ValueError(
                f"gptq: mx has axis={m.axis}; GPTQ quantizes (K, N) kernels whose blocks run "
                "along K (axis -2). Use the MX recipe's default axis=-2."
            )
        if self.group_size not in (128, m.block_size):
            raise ValueError(
                f"gptq: group_size={self.group_size} with mx={m.name}: the MX block "
                f"({m.block_size} rows) is the group; drop group_size."
            )
        if self.bits != 4:
            raise ValueError(
                f"gptq: bits={self.bits} with mx={m.name}: the element format "
                f"({m.element}) sets the width; drop bits."
            )
        if self.clip_search:
            raise ValueError(
                "gptq: clip_search=True searches integer ranges and is not supported with mx= "
                "(MX block scales follow the format's rule; choose it with the MX recipe's "
                "scale_mode). Drop clip_search."
            )

    @property
    def grid(self) -> _grid.IntGrid | _BlockGrid:
        """The code grid: integer (``bits``, ``sym``) or the MX recipe's block format."""
        if self.mx is None:
            return _grid.int_grid(self.bits, self.sym, float_zero=self.float_zero)
        return _BlockGrid(self.mx.element, self.mx.layout, self.mx.scale_mode)

    @property
    def scheme(self) -> str:
        return "absmax" if self.mx is not None or self.sym else "zero_point"

    @property
    def act(self) -> ActSpec | None:
        """The MX recipe's activation spec (W4A4 / W8A8 MX); None for integer grids."""
        return None if self.mx is None else self.mx.act

    @property
    def name(self) -> str:
        flags = (
            (", act_order" if self.act_order else "")
            + (", clip_search" if self.clip_search else "")
            + (", float_zero" if self.float_zero else "")
        )
        if self.mx is not None:
            return f"gptq({self.mx.name}{flags}{', static_groups' * self.static_groups})"
        if self.act_order and self.group_layout != "g_idx":
            flags += f", group_layout={self.group_layout}"
        return f"gptq(bits={self.bits}, group_size={self.group_size}{flags})"

    def for_embedding(self) -> Recipe:
        """Round to nearest for an embedding table (the MX recipe's own rows with ``mx``)."""
        return super().for_embedding() if self.mx is None else self.mx.for_embedding()

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def stats_needed(self) -> tuple[str, ...]:
        return ("xtx",)

    @property
    def sequential(self) -> bool:
        return True

    def quantize_weight(self, w: jax.Array, path: str | None = None, stats: Any = None) -> QArray:
        """GPTQ on one kernel from its :class:`jqx.calibration.stats.LayerStats` (``xtx``, ``n``)."""
        if stats is None or getattr(stats, "xtx", None) is None:
            raise ValueError(
                f"gptq needs the calibration statistic 'xtx' for {path or 'this weight'}; run it "
                "with jqx.calibrate(fn, params, batches, jqx.gptq(...))."
            )
        h = gptq_hessian(stats.xtx, stats.n)
        return gptq_quantize(w, h, self, path=path, act=self.act)


def gptq(**kw) -> GPTQ:
    """GPTQ weight-only quantization (Frantar et al., 2022), keyword arguments only.

    Args:
      bits: 2, 3, 4 (default) or 8 (2/3-bit codes live in the 4-bit container).
      group_size: rows of K sharing a scale (default 128); None = per output channel.
      act_order: process inputs by descending ``diag H`` (see module docstring);
        default False.
      damp: dampening as a fraction of ``mean(diag H)`` (default 0.01).
      block_size: rows per lazy batch update (default 128).
      sym: absmax int codes (True) or unsigned codes with zero points (False,
        the default).
      static_groups: compute group scales up front from the float weights
        (default False).
      clip_search: choose each group's range by a search over shrink factors
        (least ``|err|^2.4``, the reference GPTQ's ``--mse``) instead of its
        min/max (default False); slower, better at 3-4 bits.
      float_zero: keep each group's zero point unrounded, ``qmin - min / scale``
        (a float, added before rounding, as HQQ's and GGUF's Q4_1 minimum), so the
        group's min and max land exactly on the end codes (default False: the
        reference GPTQ's integer zero point). Same bytes (float32 zero points either
        way); often a lower error (SmolLM2 4-bit: +26% -> +14% perplexity), not always
        (worse at 3 bits with ``clip_search``; docs/guide/algorithms.md). The GPTQ and
        AWQ exchange formats store integer zero points, so ``jqx.io.exchange`` refuses
        such a weight (its message says so). Not with ``sym=True`` or ``mx``.
      group_layout: with ``act_order`` and dynamic groups: ``"g_idx"`` (default,
        the reference's groups in activation order; the QArray carries ``g_idx``)
        or ``"contiguous"`` (groups of consecutive input rows; no layout
        extension). See the module docstring.
      mx: an MX recipe (``jqx.mxfp4_weight_only()``, ``jqx.mxfp8_weight_only()``,
        ``jqx.mx_weight_only("fp6_e2m3")``, ``jqx.mx_weight_only("int8")``,
        ``jqx.nvfp4_weight_only()``, or with MX activations): GPTQ over that block
        format instead of an integer grid (module docstring); ``bits``,
        ``group_size``, ``sym`` and ``clip_search`` then do not apply. For FP8
        elements prefer ``scale_mode="rceil"``: under the spec's ``"floor"`` the
        feedback saturates values past E4M3's 448 (docs/guide/algorithms.md).
        Default None.

    Returns:
      A :class:`GPTQ` recipe (apply it with ``jqx.calibrate``).

    Example:
        >>> import jqx
        >>> r = jqx.gptq(bits=4, group_size=128)
        >>> r.needs_calibration, r.stats_needed, r.format
        (True, ('xtx',), 'uint4')
        >>> jqx.gptq(mx=jqx.mxfp4_weight_only()).name
        'gptq(mx(fp4_e2m1, scale_mode=floor))'
    """
    return build(GPTQ, "gptq", kw)


def gptq_hessian(xtx: jax.Array, n: int) -> jax.Array:
    """``H = 2 X^T X / n`` from the accumulated ``xtx = sum_rows x^T x``."""
    if n <= 0:
        raise ValueError(f"gptq: n={n} calibration rows; give at least one batch.")
    return 2.0 * jnp.asarray(xtx, jnp.float32) / float(n)


@dataclasses.dataclass(frozen=True)
class _BlockGrid:
    """A microscaling element grid (static, hashable): ``layout`` "mx" (E8M0 block
    scales with ``scale_mode``) or "nvfp4" (E4M3 block scales under a per-tensor scale).
    In the GPTQ loop a block's scale is carried as float32: the E8M0 byte, or the
    E4M3 value."""

    element: str
    layout: str
    scale_mode: str
    sym = True  # no zero points

    @property
    def format(self) -> str:
        return self.element


def _quantizer(grid, clip_search, gs=None):
    """``(params, quant)`` of a grid: ``params(wg, axis)`` is a group's ``(scale, zero)``
    (keepdims; zero None without zero points) and ``quant(w, s, z)`` a row's
    ``(codes as float32, dequantized values)``. ``gs``: NVFP4's per-tensor scale."""
    if isinstance(grid, _grid.IntGrid):
        params = _grid.search_group_params if clip_search else _grid.group_params

        def quant(wr, s, z):
            q = _grid.encode(wr, s, z, grid)
            return q, _grid.dequant(q, s, z)

        return functools.partial(params, grid=grid), quant
    f = _formats.get(grid.element)

    def amax(wg, axis):
        return jnp.max(jnp.abs(wg.astype(jnp.float32)), axis=axis, keepdims=True)

    if grid.layout == "mx":

        def params(wg, axis=0):
            return _mx.mx_scale_bits(amax(wg, axis), f, grid.scale_mode).astype(jnp.float32), None

        def quant(wr, s, z):
            sb = s.astype(jnp.uint8)
            c = _mx.encode_mx(wr[:, None], sb, f)[:, 0]
            return c.astype(jnp.float32), _formats.decode(c, f) * _mx.e8m0_to_float(sb)

        return params, quant
    # The reciprocal of the per-tensor scale as the QArray stores it (super_scale);
    # the barrier keeps XLA from rewriting the division.
    inv = 1.0 / lax.optimization_barrier(gs)

    def params(wg, axis=0):
        return _mx.nvfp4_block_scale(amax(wg, axis), gs).astype(jnp.float32), None

    def quant(wr, s, z):
        c = _mx.encode_nvfp4(wr[:, None], s, gs)[:, 0]
        return c.astype(jnp.float32), _formats.decode(c, f) * (s * inv)

    return params, quant


def _perm(diag_h, k, g, act_order, static_groups, contiguous=True):
    if not act_order:
        return jnp.arange(k)
    if g == k or static_groups or not contiguous:
        return jnp.argsort(-diag_h, stable=True)
    # Group-contiguous order (see the module docstring).
    dg = diag_h.reshape(k // g, g)
    gorder = jnp.argsort(-jnp.max(dg, axis=1), stable=True)
    inner = jnp.argsort(-dg, axis=1, stable=True)
    return (gorder[:, None] * g + inner[gorder]).reshape(k)


def _upper_inverse_factor(h):
    chol = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(h.shape[0], dtype=h.dtype))
    hinv = (hinv + hinv.T) / 2
    return jnp.linalg.cholesky(hinv).T


@functools.partial(
    jax.jit,
    static_argnames=(
        "grid",
        "g",
        "bsz",
        "act_order",
        "static_groups",
        "damp",
        "clip_search",
        "contiguous",
    ),
)
def _gptq_full(
    w, h, grid, g, bsz, act_order, static_groups, damp, clip_search=False, contiguous=True
):
    k = w.shape[0]
    diag = jnp.diag(h)
    dead = diag == 0
    h = jnp.where(jnp.diag(dead), 1.0, h)
    w = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
    perm = _perm(jnp.diag(h), k, g, act_order, static_groups, contiguous)
    hp = h[perm][:, perm]
    u = _upper_inverse_factor(hp)
    ok = jnp.all(jnp.isfinite(u))
    gs = None
    if getattr(grid, "layout", None) == "nvfp4":
        # NVFP4's per-tensor scale, fixed up front (quantize_nvfp4's rule on W).
        gs = _mx.nvfp4_global_scale(jnp.max(jnp.abs(w)))
    # The factor is of the permuted H; _gptq_core_perm permutes w itself.
    codes, srow, zrow = _gptq_core_perm(w, u, perm, grid, g, bsz, static_groups, clip_search, gs)
    return codes, srow, zrow, ok, perm, gs


def _gptq_core_perm(w, up_k, perm, grid, g, bsz, static_groups, clip_search=False, gs=None):
    k, n = w.shape
    group_params, quant = _quantizer(grid, clip_search, gs)
    invperm = jnp.argsort(perm)
    dynamic = g < k and not static_groups
    wp = w[perm]
    if not dynamic:
        s0, z0 = group_params(w.reshape(k // g, g, n), axis=1)
        srow = jnp.repeat(s0[:, 0], g, axis=0)[perm]
        zrow = None if z0 is None else jnp.repeat(z0[:, 0], g, axis=0)[perm]
    nblk = -(-k // bsz)
    kp = nblk * bsz
    pad = kp - k
    # Padding rows: zero weights with an identity factor, so they neither err
    # nor couple to the real rows.
    wp = jnp.pad(wp, ((0, pad), (0, 0)))
    up = jnp.pad(up_k, ((0, pad), (0, pad)))
    up = up.at[jnp.arange(k, kp), jnp.arange(k, kp)].set(1.0)
    if not dynamic:
        srow = jnp.pad(srow, ((0, pad), (0, 0)), constant_values=1.0)
        zrow = None if zrow is None else jnp.pad(zrow, ((0, pad), (0, 0)))
    rows = jnp.arange(kp)

    def quantize_block(i1, w1, u1):
        """GPTQ inside one block (eager row updates); i1 may be traced."""

        def row(i, c):
            w1, err1, q1, s_cur, z_cur, sb, zb = c
            gi = i1 + i
            if dynamic:
                # A group's first row: its scale from the group's weights as
                # updated so far (the group lies inside this block: bsz % g == 0).
                def fresh(_):
                    wg = lax.dynamic_slice_in_dim(w1, i, g, 0)
                    s, z = group_params(wg, axis=0)
                    return s[0], (jnp.zeros_like(s[0]) if z is None else z[0])

                s_cur, z_cur = lax.cond(gi % g == 0, fresh, lambda _: (s_cur, z_cur), None)
                s, z = s_cur, (None if grid.sym else z_cur)
            else:
                s = lax.dynamic_index_in_dim(srow, gi, 0, keepdims=False)
                z = None if zrow is None else lax.dynamic_index_in_dim(zrow, gi, 0, keepdims=False)
            wr = w1[i]
            q, wq = quant(wr, s, z)
            e = (wr - wq) / u1[i, i]
            # u1 is upper triangular, so rows before i are left alone.
            w1 = w1 - jnp.outer(u1[i], e)
            err1 = err1.at[i].set(e)
            q1 = q1.at[i].set(q)
            sb = sb.at[i].set(s)
            if z is not None:
                zb = zb.at[i].set(z)
            return w1, err1, q1, s_cur, z_cur, sb, zb

        zb0 = jnp.zeros((bsz, n), jnp.float32)
        init = (w1, zb0, zb0, jnp.ones((n,), jnp.float32), jnp.zeros((n,), jnp.float32), zb0, zb0)
        _, err1, q1, _, _, sb, zb = lax.fori_loop(0, bsz, row, init)
        return err1, q1, sb, zb

    if nblk <= _MAX_UNROLLED_BLOCKS:
        # Static block offsets: the lazy update touches only the rows after the
        # block (half the flops of the masked full update), at the price of
        # one inner loop per block in the compiled program.
        qs, ss, zs = [], [], []
        for i1 in range(0, kp, bsz):
            i2 = i1 + bsz
            err1, q1, sb, zb = quantize_block(i1, wp[i1:i2], up[i1:i2, i1:i2])
            if i2 < kp:
                wp = wp.at[i2:].add(-jnp.matmul(up[i1:i2, i2:].T, err1, precision=_HI))
            qs.append(q1)
            ss.append(sb)
            zs.append(zb)
        codes, sall, zall = (jnp.concatenate(a, 0) for a in (qs, ss, zs))
        return codes[:k][invperm], sall[:k][invperm], zall[:k][invperm]

    def block(bi, carry):
        wp, codes, sall, zall = carry
        i1 = bi * bsz
        w1 = lax.dynamic_slice_in_dim(wp, i1, bsz, 0)
        u1 = lax.dynamic_slice(up, (i1, i1), (bsz, bsz))
        err1, q1, sb, zb = quantize_block(i1, w1, u1)
        # Lazy batch update of every later row: W[i2:] -= U[i1:i2, i2:]^T Err1.
        ublk = lax.dynamic_slice_in_dim(up, i1, bsz, 0)
        upd = jnp.matmul(ublk.T, err1, precision=_HI)
        wp = jnp.where((rows >= i1 + bsz)[:, None], wp - upd, wp)
        codes = lax.dynamic_update_slice_in_dim(codes, q1, i1, 0)
        sall = lax.dynamic_update_slice_in_dim(sall, sb, i1, 0)
        zall = lax.dynamic_update_slice_in_dim(zall, zb, i1, 0)
        return wp, codes, sall, zall

    zk = jnp.zeros((kp, n), jnp.float32)
    _, codes, sall, zall = lax.fori_loop(0, nblk, block, (wp, zk, zk, zk))
    return codes[:k][invperm], sall[:k][invperm], zall[:k][invperm]


def gptq_quantize(
    w: jax.Array,
    h: jax.Array,
    recipe: GPTQ = GPTQ(),
    *,
    path: str | None = None,
    act=None,
) -> QArray:
    """Quantizes one kernel ``w`` (K, N) with GPTQ given the Hessian ``h`` (K, K).

    Args:
      w: float kernel used as ``x @ w``.
      h: ``2 X^T X / n`` (see :func:`gptq_hessian`), float32 (K, K).
      recipe: the :class:`GPTQ` settings.
      path: the weight's name, for error messages.
      act: ActSpec recorded on the result (None: weight-only).

    Returns:
      A group-wise QArray (block ``(group_size, 1)``; per-channel for
      ``group_size=None``), format int4/uint4 (2-4 bits) or int8/uint8; with
      ``act_order`` and ``group_layout="g_idx"`` (dynamic groups) it carries
      ``g_idx``, the group of each input row. With ``recipe.mx`` the QArray of
      :func:`jqx.core.mx.quantize_mx` (E8M0 scales, blocks ``(32, 1)``) or
      :func:`jqx.core.mx.quantize_nvfp4` (E4M3 scales, blocks ``(16, 1)``, a float32
      ``super_scale``).

    Example:
        >>> import jax.numpy as jnp
        >>> q = gptq_quantize(jnp.ones((8, 4)), jnp.eye(8), GPTQ(group_size=4))
        >>> float(abs(q.dequantize() - 1.0).max())
        0.0
        >>> from jqx.recipes.mx import mxfp4_weight_only
        >>> q = gptq_quantize(jnp.ones((64, 4)), jnp.eye(64), GPTQ(mx=mxfp4_weight_only()))
        >>> q.format, q.block, q.scale.dtype.name, float(abs(q.dequantize() - 1.0).max())
        ('fp4_e2m1', (32, 1), 'float8_e8m0fnu', 0.0)
    """
    if not isinstance(recipe, GPTQ):
        raise TypeError(
            f"gptq_quantize: recipe must be a jqx.GPTQ (e.g. jqx.gptq(bits=4)), got "
            f"{type(recipe).__name__}: {recipe!r}"
        )
    w = _grid.check_kernel(w, "gptq", path)
    k, n = w.shape
    h = jnp.asarray(h, jnp.float32)
    if h.shape != (k, k):
        raise ValueError(
            f"gptq: the Hessian has shape {tuple(h.shape)} but the weight{' ' + path if path else ''} "
            f"has K={k} inputs; expected ({k}, {k}). The calibration data's feature size must "
            "match the weight's input size (axis 0 of the (K, N) kernel)."
        )
    check_finite(w, path, who="gptq")
    if not isinstance(h, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(h))):
        raise ValueError("gptq: the Hessian contains NaN or Inf; check the calibration data.")
    grid = recipe.grid
    if recipe.mx is not None:
        g = recipe.mx.block_size
        if k % g:
            where = f" of {path}" if path else ""
            raise ValueError(
                f"gptq: axis 0 (K){where} has size {k}, not a multiple of the {recipe.mx.name} "
                f"block {g}; the blocks run along K. Pad K to a multiple of {g}, or exclude "
                "this leaf with a rule mapping its path to None."
            )
    else:
        g = check_group_divides(recipe.group_size, k, axis=0, path=path, who="gptq")
    dynamic = g < k and not recipe.static_groups
    bsz = min(recipe.block_size, k)
    if dynamic and bsz % g:
        bsz = g  # groups must start inside a block to see their updated weights
    gidx_form = (
        bool(recipe.act_order)
        and dynamic
        and recipe.group_layout == "g_idx"
        and recipe.mx is None  # an MX QArray has no g_idx: its blocks stay contiguous
    )
    codes, srow, zrow, ok, perm, gs = _gptq_full(
        w,
        h,
        grid,
        g,
        bsz,
        bool(recipe.act_order),
        bool(recipe.static_groups),
        float(recipe.damp),
        bool(recipe.clip_search),
        not gidx_form,
    )
    if not isinstance(ok, jax.core.Tracer) and not bool(ok):
        raise ValueError(
            f"gptq: the Hessian of {path or 'this weight'} is not positive definite after "
            f"dampening (damp={recipe.damp}); it is singular or ill-conditioned. Increase damp "
            "(e.g. 0.1) or give more, more varied calibration rows."
        )
    if recipe.mx is not None:
        return _block_qarray(codes, srow[::g], gs, recipe.mx, w, act)
    g_idx = None
    if gidx_form:
        # Group j is rows perm[j*g : (j+1)*g]; its scale was set at its first row.
        first = perm[::g]
        scale, zero = srow[first], None if grid.sym else zrow[first]
        g_idx = jnp.argsort(perm) // g
    else:
        scale = srow[::g]
        zero = None if grid.sym else zrow[::g]
    return make_qarray(
        codes,
        scale,
        zero,
        fmt=grid.format,
        shape=w.shape,
        dtype=w.dtype,
        block=(g, 1),
        act=act,
        g_idx=g_idx,
    )


def _block_qarray(codes, scale, gs, mx: MX, w, act) -> QArray:
    """The QArray quantize_mx / quantize_nvfp4 build, from GPTQ's codes (float32) and
    block scales (float32 E8M0 bytes or E4M3 values)."""
    f = _formats.get(mx.element)
    codes = codes.astype(f.dtype)
    block = (mx.block_size, 1)
    if mx.layout == "nvfp4":
        inv = 1.0 / lax.optimization_barrier(gs)
        return make_qarray(
            codes,
            scale.astype(jnp.float8_e4m3fn),
            fmt=f,
            shape=w.shape,
            dtype=w.dtype,
            block=block,
            act=act,
            super_scale=inv,
            super_block=tuple(w.shape),
        )
    sbits = lax.bitcast_convert_type(scale.astype(jnp.uint8), jnp.float8_e8m0fnu)
    return make_qarray(
        codes,
        sbits,
        fmt=f,
        shape=w.shape,
        dtype=w.dtype,
        block=block,
        act=act,
        scale_dtype=jnp.float8_e8m0fnu,
    )
