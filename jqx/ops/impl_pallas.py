"""The Pallas kernels (``jqx.kernels.pallas``) as implementations (adapters).

Each kernel takes ``x (M, K) . W (K, N)`` in jqx's QArray layout. ``supports`` states the
kernels' documented limits (dtypes, group sizes, scale layouts), so a kernel is only
called with operands it accepts; when one runs (a measured win on this GPU, or
``backend="pallas"``) is the dispatcher's decision (``jqx.ops.dispatch``; see
docs/internals/dispatch.md). Off-GPU the kernels run in interpret mode.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jqx.core.numerics import quantize_activation
from jqx.core.qarray import QArray
from jqx.ops.problem import Implementation, Problem

_FLOATS = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
_MIN_TILE = 16  # the kernels' smallest Triton dot tile


def _kernels():
    import jqx.kernels.pallas as pk  # noqa: PLC0415 - Pallas is imported only when used

    return pk


def _out_dtype(p: Problem):
    """The kernels write f32, bf16 or f16; anything else is cast from f32."""
    return p.out_dtype if p.out_dtype in _FLOATS else np.dtype(np.float32)


def _plain_kernel_operands(p: Problem) -> bool:
    """2-D ``x (M, K) . W (K, N)`` without ``in_scale``, in float dtypes the kernels take."""
    return (
        p.plain_2d
        and not p.in_scale
        and p.compute_dtype in _FLOATS
        and p.scale_dtype in _FLOATS
        and (p.zero_dtype is None or p.zero_dtype in _FLOATS)
    )


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


class PallasKernel(Implementation):
    """A Pallas kernel; ``op`` names its row in the measured table."""

    op = "?"


class W4A16(PallasKernel):
    """uint4 (zero points) or int4 (symmetric) weight-only, grouped along K."""

    name = "pallas.w4a16"
    op = "w4a16"

    def supports(self, p: Problem) -> bool:
        if p.kind != "weight_only" or not _plain_kernel_operands(p):
            return False
        if p.weight_format not in ("uint4", "int4") or p.block[1] != 1:
            return False
        k, n = p.weight_shape
        g = p.block[0]
        if k % g or p.scale_shape != (k // g, n):
            return False
        if p.zero_point and (p.weight_format == "int4" or p.zero_shape != p.scale_shape):
            return False
        # a power-of-two group, or one with a power-of-two divisor >= the smallest tile
        return _pow2(g) or (g % _MIN_TILE == 0)

    def run(self, x, q: QArray, p):
        y = _kernels().w4a16_matmul(
            x,
            q.qvalue,
            q.scale,
            q.zero_point,
            group_size=q.block[0],
            signed=p.weight_format == "int4",
            out_dtype=_out_dtype(p),
        )
        return y.astype(p.out_dtype)


def _dynamic_per_token(p: Problem, fmt: str) -> bool:
    """W8A8 with ``fmt`` codes on both sides, dynamic per-token activations, one scale
    per output channel, no zero point."""
    return (
        p.kind == "w8a8"
        and _plain_kernel_operands(p)
        and p.weight_format == fmt
        and p.act_format == fmt
        and p.act_kind == "dynamic"
        and p.act_granularity == "per_token"
        and p.block == (p.k, 1)
        and not p.zero_point
    )


# From this many rows the int8 W8A8 kernel reads the weight as (N, K), transposed in the
# call: on an H200 the (N, K) kernel with the transpose took 0.24-0.57x the (K, N)
# kernel's time from 64 rows on (and beat XLA's int8 path from 1024 rows), while at 16
# rows and fewer the transpose costs more than it saves (1.1-1.3x; docs/benchmarks/gpu.md).
INT8_NK_MIN_ROWS = 64


class Int8Dynamic(PallasKernel):
    """W8A8 int8 with the per-token activation quantization fused in."""

    name = "pallas.int8_dynamic"
    op = "int8_dynamic"

    def supports(self, p: Problem) -> bool:
        return _dynamic_per_token(p, "int8")

    def run(self, x, q: QArray, p):
        ws = q.scale.reshape(1, p.n)
        if p.rows >= INT8_NK_MIN_ROWS:
            y = _kernels().int8_matmul_dynamic(
                x, q.qvalue.T, ws, out_dtype=_out_dtype(p), w_layout="nk"
            )
        else:
            y = _kernels().int8_matmul_dynamic(x, q.qvalue, ws, out_dtype=_out_dtype(p))
        return y.astype(p.out_dtype)


class Fp8(PallasKernel):
    """W8A8 fp8 (E4M3) with per-token activation scales."""

    name = "pallas.fp8"
    op = "fp8"

    def supports(self, p: Problem) -> bool:
        return _dynamic_per_token(p, "fp8_e4m3")

    def run(self, x, q: QArray, p):
        xq, xs = quantize_activation(x, "fp8_e4m3", "per_token")
        y = _kernels().fp8_matmul(
            xq, q.qvalue, xs, q.scale.reshape(1, p.n), out_dtype=_out_dtype(p)
        )
        return y.astype(p.out_dtype)


W4A16_KERNEL = W4A16()
INT8_DYNAMIC = Int8Dynamic()
FP8 = Fp8()

ALL = (W4A16_KERNEL, INT8_DYNAMIC, FP8)
