"""Every Pallas kernel lowers for CUDA on a CPU-only machine.

What is checked: jax's Pallas -> Triton lowering of each kernel (targeting sm_90 when no
GPU is attached) for decode and prefill shapes, ragged and aligned; the kernel is embedded
as XLA's Triton custom call with the expected grid; the Triton IR has the tensor-core dot
with the promised operand and accumulator types (bf16/f16 -> f32, f32 as IEEE not TF32,
i8 -> i32, f8E4M3FN -> f32) and the in-tile nibble split. What is not checked: Triton's
compilation of that IR to PTX/cubin, which runs only on a GPU (the GPU test mode covers it).
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from jqx.kernels.pallas import fp8_matmul, int8_matmul, int8_matmul_dynamic, w4a16_matmul
from jqx.kernels.pallas._common import lower_for_cuda, triton_kernels_for_cuda
from jqx.kernels.pallas.w4a16_matmul import BlockSizes as W4BlockSizes

S = jax.ShapeDtypeStruct


def _dots(ir_text):
    return [line for line in ir_text.splitlines() if "tt.dot " in line]


@pytest.mark.parametrize(
    "m, k, n, g, signed, x_dtype",
    [
        (1, 4096, 4096, 128, False, jnp.bfloat16),
        (16, 4096, 4096, 32, True, jnp.float16),
        (100, 384, 200, 64, False, jnp.bfloat16),
        (3, 256, 96, 256, False, jnp.float32),
        (1024, 1024, 1024, 128, True, jnp.bfloat16),
    ],
)
def test_w4a16_lowers(m, k, n, g, signed, x_dtype):
    f = functools.partial(w4a16_matmul, group_size=g, signed=signed, interpret=False)
    specs = [S((m, k), x_dtype), S((k, (n + 1) // 2), jnp.uint8), S((k // g, n), jnp.float32)]
    if not signed:
        specs.append(S((k // g, n), jnp.bfloat16))
    [kern] = triton_kernels_for_cuda(f, *specs)
    assert kern["name"] == "w4a16_matmul"
    d = W4BlockSizes.get_default(m, k, n, g)
    # Two dots (low and high nibbles) per group that a K tile holds.
    dots = _dots(kern["ir"])
    assert len(dots) == 2 * (d.block_k // min(d.block_k, g))
    xt = {jnp.bfloat16: "bf16", jnp.float16: "f16", jnp.float32: "f32"}[x_dtype]
    for dot in dots:
        # The raw codes enter the dot in x's dtype: no f32 weight tile.
        assert re.search(
            rf"tensor<\d+x\d+x{xt}> \* tensor<\d+x\d+x{xt}> -> tensor<\d+x\d+xf32>", dot
        ), dot
        if x_dtype == jnp.float32:
            # IEEE is Triton's default and is printed by omission; TF32 would be spelled out.
            assert "tf32" not in dot
        else:
            assert "f32> * tensor" not in dot
    # Each group's scales are split into even/odd columns (tt.split), and the two f32
    # accumulators are interleaved once, before the store (tt.join).
    assert "tt.split" in kern["ir"]
    assert re.search(r"tt\.join .*xf32>", kern["ir"])
    if signed:
        assert "arith.shrsi" in kern["ir"]
    assert kern["grid"] == (-(-m // d.block_m), -(-n // d.block_n), d.split_k)


@pytest.mark.parametrize("m, k, n", [(1, 4096, 4096), (17, 200, 96), (4096, 4096, 4096)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_lowers(m, k, n, with_bias):
    f = functools.partial(int8_matmul, out_dtype=jnp.bfloat16, interpret=False)
    specs = [S((m, k), jnp.int8), S((k, n), jnp.int8), S((m, 1), jnp.float32), S((n,), jnp.float32)]
    if with_bias:
        specs.append(S((n,), jnp.float32))
    [kern] = triton_kernels_for_cuda(f, *specs)
    [dot] = _dots(kern["ir"])
    assert re.search(r"tensor<\d+x\d+xi8> \* tensor<\d+x\d+xi8> -> tensor<\d+x\d+xi32>", dot)


@pytest.mark.parametrize("m, k, n", [(1, 4096, 4096), (100, 384, 130)])
def test_int8_dynamic_lowers_two_kernels(m, k, n):
    f = functools.partial(int8_matmul_dynamic, out_dtype=jnp.bfloat16, interpret=False)
    kernels = triton_kernels_for_cuda(
        f, S((m, k), jnp.bfloat16), S((k, n), jnp.int8), S((n,), jnp.float32)
    )
    names = [kk["name"] for kk in kernels]
    assert names == ["int8_quantize_rows", "int8_matmul"], names
    quant, mm = kernels
    assert not _dots(quant["ir"])
    assert re.search(r"arith\.fptosi .* to tensor<\d+x\d+xi8>", quant["ir"])
    assert re.search(r"tt\.store .*ptr<i8>>", quant["ir"])
    assert re.search(r"xi8> \* tensor<\d+x\d+xi8> -> tensor<\d+x\d+xi32>", _dots(mm["ir"])[0])


def test_int8_dynamic_inline_quantizes_in_registers():
    f = functools.partial(int8_matmul_dynamic, fuse="inline", interpret=False)
    kernels = triton_kernels_for_cuda(
        f, S((17, 4096), jnp.bfloat16), S((4096, 4096), jnp.int8), S((4096,), jnp.float32)
    )
    assert [kk["name"] for kk in kernels] == ["int8_row_scales", "int8_matmul_inline_quant"]
    scales, mm = kernels
    assert "ptr<i8>" not in scales["ir"]  # writes only the (M, 1) scales
    assert re.search(r"tt\.load .*ptr<bf16>>", mm["ir"])  # reads x in bf16 ...
    assert re.search(r"arith\.fptosi .* to tensor<\d+x\d+xi8>", mm["ir"])  # ... quantizes
    assert re.search(r"xi8> \* tensor<\d+x\d+xi8> -> tensor<\d+x\d+xi32>", _dots(mm["ir"])[0])


@pytest.mark.parametrize("w_layout", ["kn", "nk"])
@pytest.mark.parametrize("m, k, n", [(1, 4096, 4096), (17, 200, 96), (4096, 8192, 8192)])
def test_fp8_lowers(m, k, n, w_layout):
    f = functools.partial(fp8_matmul, out_dtype=jnp.bfloat16, interpret=False, w_layout=w_layout)
    [kern] = triton_kernels_for_cuda(
        f,
        S((m, k), jnp.float8_e4m3fn),
        S((k, n) if w_layout == "kn" else (n, k), jnp.float8_e4m3fn),
        S((), jnp.float32),
        S((1, n), jnp.float32),
    )
    [dot] = _dots(kern["ir"])
    assert re.search(r"xf8E4M3FN> \* tensor<\d+x\d+xf8E4M3FN> -> tensor<\d+x\d+xf32>", dot), dot
    # An (N, K) tile is fed to the dot through a register transpose of a K-contiguous load.
    assert ("tt.trans" in kern["ir"]) == (w_layout == "nk")


def test_grid_matches_block_sizes():
    from jqx.kernels.pallas.int8_matmul import BlockSizes

    bs = BlockSizes(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=2)
    f = functools.partial(int8_matmul, out_dtype=jnp.float32, block_sizes=bs, interpret=False)
    [kern] = triton_kernels_for_cuda(
        f,
        S((100, 256), jnp.int8),
        S((256, 300), jnp.int8),
        S((100, 1), jnp.float32),
        S((300,), jnp.float32),
    )
    assert kern["grid"] == (2, 3, 1)
    assert (kern["num_warps"], kern["num_stages"]) == (4, 2)


def test_stablehlo_has_triton_custom_call():
    f = functools.partial(w4a16_matmul, group_size=32, interpret=False)
    txt = lower_for_cuda(
        f, S((1, 256), jnp.bfloat16), S((256, 64), jnp.uint8), S((8, 128), jnp.float32)
    )
    assert txt.count("__gpu$xla.gpu.triton") == 1


def test_dispatch_table():
    from jqx.ops import dispatch

    big = (4096, 4096)
    # Off-GPU, and on a GPU model without a measurement, XLA is used.
    assert dispatch.measured_winner("w4a16", 1, *big, "cpu") == "xla"
    assert dispatch.measured_winner("w4a16", 1, *big, "gpu", "NVIDIA A100") == "xla"
    # The shipped H200 entry (docs/benchmarks/gpu.md): W4A16 at decode sizes, int8 W8A8
    # from 1024 rows.
    assert dispatch.measured_winner("w4a16", 1, *big, "gpu", "NVIDIA H200") == "pallas"
    assert dispatch.measured_winner("w4a16", 4096, *big, "gpu", "NVIDIA H200") == "xla"
    assert dispatch.measured_winner("int8_dynamic", 2048, *big, "gpu", "NVIDIA H200") == "pallas"
    assert dispatch.measured_winner("int8_dynamic", 16, *big, "gpu", "NVIDIA H200") == "xla"
    table = {"H200": {"w4a16": {1: "pallas", 16: "pallas"}, "fp8": {4096: "pallas"}}}
    assert dispatch.measured_winner("w4a16", 1, *big, "gpu", "NVIDIA H200", table=table) == "pallas"
    assert (
        dispatch.measured_winner("w4a16", 9, *big, "cuda", "NVIDIA H200", table=table) == "pallas"
    )
    assert dispatch.measured_winner("w4a16", 64, *big, "gpu", "NVIDIA H200", table=table) == "xla"
    assert (
        dispatch.measured_winner("fp8", 9000, *big, "gpu", "NVIDIA H200", table=table) == "pallas"
    )
    assert dispatch.measured_winner("w4a16", 1, *big, "gpu", "NVIDIA A100", table=table) == "xla"
    assert dispatch.measured_winner("w4a16", 1, *big, "cpu", "NVIDIA H200", table=table) == "xla"
    assert (
        dispatch.measured_winner("w4a16", 1, 256, 256, "gpu", "NVIDIA H200", table=table) == "xla"
    )
    assert [dispatch.m_bucket(m) for m in (1, 2, 16, 17, 4096, 10**6)] == [
        1,
        16,
        16,
        64,
        4096,
        4096,
    ]
    with pytest.raises(ValueError, match="op='int4'"):
        dispatch.measured_winner("int4", 1, *big, "gpu")
