"""Helpers shared by the Pallas kernels (jax only; never imports jqx)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
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


def scaled_matmul_kernel(
    x_ref,
    w_ref,
    xs_ref,
    ws_ref,
    *rest,
    m,
    k,
    n,
    bm,
    bn,
    bk,
    acc_dtype,
    has_bias,
    quantize_x=False,
    w_nk=False,
):
    """``(x @ w) * x_scale[:, None] * w_scale[None, :] (+ bias)`` for one (bm, bn) tile.

    Shared by the int8 (int32 accumulator) and fp8 (f32 accumulator) kernels. Every edge
    (M, N, K) is masked with zero fill, so no operand is padded or copied. With
    ``quantize_x`` the x tiles arrive in high precision and are quantized to int8 in
    registers with the given per-row scale (``clip(round(x / scale), -127, 127)``).
    With ``w_nk`` the weight is stored (N, K) (K contiguous), the operand layout Hopper's
    8-bit tensor-core instructions read directly.
    """
    if has_bias:
        b_ref, o_ref = rest
    else:
        (o_ref,) = rest
    i = pl.program_id(0)
    j = pl.program_id(1)
    mask_m, mask_n, mask_k = m % bm != 0, n % bn != 0, k % bk != 0
    rows = i * bm + jnp.arange(bm)
    cols = j * bn + jnp.arange(bn)
    row_ok = rows < m
    col_ok = cols < n
    rmask = row_ok[:, None] if mask_m else None
    cmask = col_ok[None, :] if mask_n else None
    # Masked rows get scale 1 so an inline quantizer never divides 0 by 0.
    xs = pl_triton.load(
        xs_ref.at[pl.ds(i * bm, bm), pl.ds(0, 1)], mask=rmask, other=None if rmask is None else 1.0
    )

    def body(t, acc):
        k0 = t * bk
        k_ok = (k0 + jnp.arange(bk)) < k
        xmask = row_ok[:, None] & k_ok[None, :] if (mask_m or mask_k) else None
        x = pl_triton.load(
            x_ref.at[pl.ds(i * bm, bm), pl.ds(k0, bk)],
            mask=xmask,
            other=None if xmask is None else jnp.zeros((), x_ref.dtype),
        )
        if w_nk:
            wmask = col_ok[:, None] & k_ok[None, :] if (mask_n or mask_k) else None
            w_at = w_ref.at[pl.ds(j * bn, bn), pl.ds(k0, bk)]
        else:
            wmask = k_ok[:, None] & col_ok[None, :] if (mask_n or mask_k) else None
            w_at = w_ref.at[pl.ds(k0, bk), pl.ds(j * bn, bn)]
        w = pl_triton.load(
            w_at, mask=wmask, other=None if wmask is None else jnp.zeros((), w_ref.dtype)
        )
        if quantize_x:
            q = round_half_even(x.astype(jnp.float32) / xs)
            x = jnp.clip(q, -127.0, 127.0).astype(jnp.int8)
        dims = (((1,), (1,)), ((), ())) if w_nk else (((1,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(x, w, dims, preferred_element_type=acc_dtype)

    acc = jax.lax.fori_loop(0, cdiv(k, bk), body, jnp.zeros((bm, bn), acc_dtype))
    ws = pl_triton.load(
        ws_ref.at[pl.ds(0, 1), pl.ds(j * bn, bn)], mask=cmask, other=None if cmask is None else 0.0
    )
    out = acc.astype(jnp.float32) * xs * ws
    if has_bias:
        out = out + pl_triton.load(
            b_ref.at[pl.ds(0, 1), pl.ds(j * bn, bn)],
            mask=cmask,
            other=None if cmask is None else 0.0,
        )
    omask = None
    if mask_m or mask_n:
        omask = row_ok[:, None] & col_ok[None, :]
    pl_triton.store(
        o_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], out.astype(o_ref.dtype), mask=omask
    )


def as_row_scale(arg: str, s: jax.Array, m: int) -> jax.Array:
    """Per-row (M, 1) f32 scale from a scalar, (1,), (1, 1), (M,) or (M, 1) array."""
    s = jnp.asarray(s)
    require_dtype(arg, s.dtype, (jnp.float32, jnp.bfloat16, jnp.float16))
    if s.size == 1:
        return jnp.broadcast_to(s.reshape(1, 1).astype(jnp.float32), (m, 1))
    if s.shape in ((m,), (m, 1)):
        return s.reshape(m, 1).astype(jnp.float32)
    raise NotImplementedError(
        f"{arg} has shape {s.shape}; supported: per-tensor (scalar, (1,), (1, 1)) or per-row "
        f"({m},) / ({m}, 1)."
    )


def as_col_scale(arg: str, s: jax.Array, n: int) -> jax.Array:
    """Per-column (1, N) f32 scale from a scalar, (1,), (1, 1), (N,) or (1, N) array."""
    s = jnp.asarray(s)
    require_dtype(arg, s.dtype, (jnp.float32, jnp.bfloat16, jnp.float16))
    if s.size == 1:
        return jnp.broadcast_to(s.reshape(1, 1).astype(jnp.float32), (1, n))
    if s.shape in ((n,), (1, n)):
        return s.reshape(1, n).astype(jnp.float32)
    raise NotImplementedError(
        f"{arg} has shape {s.shape}; supported: per-tensor (scalar, (1,), (1, 1)) or "
        f"per-column ({n},) / (1, {n})."
    )


def check_matmul_operands(
    x: jax.Array, w: jax.Array, xname: str, wname: str, w_layout: str = "kn"
) -> tuple:
    """(M, K, N) of ``x @ w`` where w is (K, N) (``w_layout="kn"``) or (N, K) (``"nk"``)."""
    if w_layout not in ("kn", "nk"):
        raise NotImplementedError(
            f"w_layout={w_layout!r} is not supported; use 'kn' for a (K, N) weight or 'nk' "
            "for (N, K)."
        )
    wk = 0 if w_layout == "kn" else 1
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[wk]:
        want = "(K, N)" if w_layout == "kn" else "(N, K)"
        raise ValueError(
            f"{xname} has shape {x.shape} and {wname} has shape {w.shape}; expected (M, K) and "
            f"{want} (w_layout={w_layout!r}) with the same K. Reshape leading axes into M first."
        )
    return x.shape[0], x.shape[1], w.shape[1 - wk]


def triton_kernels_for_cuda(fn: Callable[..., Any], *specs: jax.ShapeDtypeStruct) -> list[dict]:
    """Lowers ``fn`` for CUDA (sm_90 when no GPU is attached) and returns each Pallas kernel
    as ``{"name", "grid", "num_warps", "num_stages", "ir"}`` with the Triton IR as text.

    This checks everything jax does for the GPU build (Pallas -> Triton IR, types of every
    ``tt.dot``); what it cannot check is Triton's own compilation of that IR to PTX, which
    XLA runs only on a GPU. Uses jax's private Triton dialect bindings (``jax._src.lib``),
    so it may need updating with jax.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> triton_kernels_for_cuda(lambda a: a + 1, jax.ShapeDtypeStruct((2,), jnp.float32))
        []
    """
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    lowered = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))
    module = lowered.compiler_ir("stablehlo")
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call":
                        target = ir.StringAttr(child.operation.attributes["call_target_name"])
                        if target.value == "__gpu$xla.gpu.triton":
                            calls.append(child.operation)
                    walk(child.operation)

    walk(module.operation)
    out = []
    for call in calls:
        cfg = ir.DictAttr(call.attributes["mhlo.backend_config"])
        with jax_mlir.make_ir_context() as ctx:
            tt_dialect.register_dialect(ctx)
            text = str(ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes))
        out.append(
            {
                "name": ir.StringAttr(cfg["name"]).value if "name" in cfg else "",
                "grid": tuple(ir.IntegerAttr(cfg[f"grid_{a}"]).value for a in "xyz"),
                "num_warps": ir.IntegerAttr(cfg["num_warps"]).value,
                "num_stages": ir.IntegerAttr(cfg["num_stages"]).value,
                "ir": text,
            }
        )
    return out
