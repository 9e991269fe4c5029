"""Helpers shared by the Pallas kernels (jax only; never imports jqx)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pl_triton

# Triton's tl.dot needs every tile dimension >= 16.
MIN_DOT_TILE = 16


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def next_pow2(v: int) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


def largest_pow2_divisor(v: int, cap: int) -> int:
    """Largest power of two that divides ``v`` and is <= ``cap``."""
    p = 1
    while p * 2 <= cap and v % (p * 2) == 0:
        p *= 2
    return p


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` means: interpret on CPU/TPU, run natively on a GPU backend."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def compiler_params(num_warps: int, num_stages: int) -> pl_triton.CompilerParams:
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def check_block(name: str, value: int, minimum: int = MIN_DOT_TILE) -> None:
    if not is_pow2(value) or value < minimum:
        raise NotImplementedError(
            f"{name}={value} is not supported: Triton tiles must be powers of two >= {minimum} "
            f"(e.g. {minimum}, {minimum * 2}, 64, 128); pick one of those."
        )


def dtype_name(d: Any) -> str:
    return jnp.dtype(d).name


def require_dtype(arg: str, got: Any, accepted: Sequence[Any]) -> None:
    names = [dtype_name(a) for a in accepted]
    if dtype_name(got) not in names:
        raise NotImplementedError(
            f"{arg} has dtype {dtype_name(got)}, which this Pallas kernel does not support; it "
            f"accepts {names}. Cast it, or use backend='xla'."
        )


def round_half_even(v: jax.Array) -> jax.Array:
    """Round to nearest, ties to even, from floor only.

    Why: the Triton lowering has no rule for ``lax.round``; ``floor`` lowers everywhere.
    """
    f = jnp.floor(v)
    d = v - f
    f_is_odd = (f - 2.0 * jnp.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & f_is_odd)
    return jnp.where(up, f + 1.0, f)


def lower_for_cuda(fn: Callable[..., Any], *specs: jax.ShapeDtypeStruct) -> str:
    """Lowers ``fn`` for CUDA (works without a GPU) and returns the StableHLO text.

    The Pallas kernel is lowered to Triton IR by jax's own Pallas-Triton lowering and
    embedded as a ``__gpu$xla.gpu.triton`` custom call; Triton's compilation of that IR
    to PTX happens only when XLA compiles on a GPU, so it is not covered here.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> txt = lower_for_cuda(lambda a: a + 1, jax.ShapeDtypeStruct((2,), jnp.float32))
        >>> "stablehlo" in txt
        True
    """
    lowered = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))
    return lowered.as_text()
