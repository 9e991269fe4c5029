"""Recipe constructors: what each one produces, error bounds of quantize_weight,
and errors that list the accepted arguments."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx.core import formats as F

W = jnp.asarray(np.random.default_rng(0).normal(size=(128, 16)).astype(np.float32))


@pytest.mark.parametrize(
    "recipe,fmt,scheme,block,act",
    [
        (jqx.int8_weight_only(), "int8", "absmax", (128, 1), None),
        (jqx.int4_weight_only(), "uint4", "zero_point", (128, 1), None),
        (jqx.int4_weight_only(group_size=32), "uint4", "zero_point", (32, 1), None),
        (jqx.int4_weight_only(group_size=32, scheme="absmax"), "int4", "absmax", (32, 1), None),
        (jqx.fp8_weight_only(), "fp8_e4m3", "absmax", (128, 1), None),
        (jqx.fp8_weight_only("e5m2"), "fp8_e5m2", "absmax", (128, 1), None),
        (jqx.fp4_weight_only(), "fp4_e2m1", "absmax", (32, 1), None),
        (jqx.fp4_weight_only("e1m2", group_size=64), "fp4_e1m2", "absmax", (64, 1), None),
        (jqx.fp4_weight_only(fmt="e3m0"), "fp4_e3m0", "absmax", (32, 1), None),
        (jqx.nf4_weight_only(), "nf4", "absmax", (64, 1), None),
        (
            jqx.int8_dynamic_activation_int8_weight(),
            "int8",
            "absmax",
            (128, 1),
            ("dynamic", "int8"),
        ),
        (
            jqx.fp8_dynamic_activation_fp8_weight(),
            "fp8_e4m3",
            "absmax",
            (128, 1),
            ("dynamic", "fp8_e4m3"),
        ),
        (
            jqx.weight_only("int8", group_size=16, symmetric_range=True),
            "int8",
            "absmax",
            (16, 1),
            None,
        ),
    ],
)
def test_constructors(recipe, fmt, scheme, block, act):
    assert (recipe.format, recipe.scheme) == (fmt, scheme)
    q = recipe.quantize_weight(W, path="p/kernel")
    assert q.format == fmt and q.block == block
    assert (q.zero_point is not None) == (scheme == "zero_point")
    if act is None:
        assert q.act is None
    else:
        assert (q.act.kind, q.act.format, q.act.granularity) == (*act, "per_token")
    f = F.get(fmt)
    S = np.repeat(np.asarray(q.scale), block[0], axis=0)
    v = np.asarray(q.values())
    if f.kind == "int":
        gap = 1.0
    else:  # the widest gap of the grid bounds the local one
        gap = np.diff(np.array(f.values)).max()
    assert np.all(np.abs(np.asarray(q.dequantize()) - np.asarray(W)) <= gap / 2 * S * (1 + 1e-5))
    assert not recipe.needs_calibration and recipe.stats_needed == () and not recipe.sequential
    if f.kind == "int":
        lo = f.qmin_symmetric if recipe.symmetric_range else f.qmin
        assert v.min() >= lo and v.max() <= f.qmax


def test_torchao_convention_through_a_recipe():
    q = jqx.int8_weight_only(convention="torchao").quantize_weight(W)
    np.testing.assert_allclose(
        np.asarray(q.scale[0]), np.abs(np.asarray(W)).max(0) / 127.5, rtol=1e-6
    )
    assert int(q.codes().min()) == -128 or int(q.codes().max()) == 127


def test_static_and_llm_int8_recipes_record_their_spec():
    r = jqx.int8_static_activation_int8_weight()
    assert r.needs_calibration and r.stats_needed == ("hist",)
    assert r.act == jqx.ActSpec("static", "int8", "per_tensor")
    r = jqx.llm_int8(threshold=4.0)
    assert r.act.kind == "llm_int8" and r.act.threshold == 4.0 and not r.needs_calibration


def test_recipes_are_frozen_and_replaceable():
    r = jqx.int8_weight_only()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.format = "int4"
    r2 = r.replace(scale_dtype="bfloat16")
    assert r2.scale_dtype == "bfloat16" and r.scale_dtype == "float32"
    assert r2.quantize_weight(W).scale.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (
            lambda: jqx.int8_weight_only(foo=1),
            TypeError,
            r"int8_weight_only\(\) got unexpected keyword argument\(s\) 'foo'; accepted keywords: scheme, axis",
        ),
        (
            lambda: jqx.nf4_weight_only(format="int8"),
            TypeError,
            r"nf4_weight_only\(\) got unexpected keyword argument\(s\) 'format'; accepted keywords:",
        ),
        (
            lambda: jqx.fp8_weight_only("e2m1"),
            ValueError,
            r"fp8_weight_only\(fmt='e2m1'\): use 'fp8_e4m3' or 'fp8_e5m2'",
        ),
        (
            lambda: jqx.fp4_weight_only("nf4"),
            ValueError,
            r"fp4_weight_only\(fmt='nf4'\): use 'e2m1', 'e1m2' or 'e3m0'",
        ),
        (
            lambda: jqx.fp4_weight_only("e9m9"),
            ValueError,
            r"format='e9m9' is not a known format.*Valid names",
        ),
        (
            lambda: jqx.int4_weight_only(group_size=0),
            ValueError,
            r"group_size=0 must be a positive int \(e.g. 32, 64, 128\)",
        ),
        (
            lambda: jqx.int4_weight_only(group_size=32.0),
            ValueError,
            r"group_size=32.0 must be a positive int",
        ),
        (
            lambda: jqx.int4_weight_only(scheme="minmax"),
            ValueError,
            r"scheme='minmax'\) is not supported; use 'zero_point'",
        ),
        (
            lambda: jqx.weight_only("nf4", scheme="zero_point"),
            ValueError,
            r"zero_point' needs an integer format",
        ),
        (
            lambda: jqx.int8_weight_only(convention="bnb"),
            ValueError,
            r"convention='bnb' is not supported; use 'jqx' or 'torchao'",
        ),
        (
            lambda: jqx.int8_weight_only(scale_dtype="int4"),
            ValueError,
            r"scale_dtype='int4' is not supported; use one of",
        ),
        (
            lambda: jqx.int8_weight_only(granularity="tensor"),
            TypeError,
            r"granularity='tensor' is not a jqx.Granularity",
        ),
        (lambda: jqx.llm_int8(threshold=0), ValueError, r"threshold must be > 0"),
        (
            lambda: jqx.int8_dynamic_activation_int8_weight(act_granularity="row"),
            ValueError,
            r"granularity='row' is not supported; use 'per_token' or 'per_tensor'",
        ),
    ],
)
def test_bad_recipe_arguments_list_what_is_accepted(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_granularity_override():
    r = jqx.int8_weight_only(granularity=jqx.per_block((32, 8)))
    q = r.quantize_weight(W)
    assert q.block == (32, 8) and q.scale.shape == (4, 2)


def test_attention_kernels_get_scales_per_output_head_feature():
    """Flax attention projections (in, heads, head_dim) and (heads, head_dim, out): scales
    are constant along the contracted axes (so an integer matmul can factor them out)."""
    qkv, out = (64, 4, 16), (4, 16, 64)
    r = jqx.int8_dynamic_activation_int8_weight()
    assert r.weight_granularity(qkv, "params/attn/query/kernel").block_shape == (64, 1, 1)
    assert r.weight_granularity(out, "params/attn/out/kernel").block_shape == (4, 16, 1)
    g = jqx.int4_weight_only(group_size=8)
    assert g.weight_granularity(qkv, "attn/value/kernel").axes == (0,)
    assert g.weight_granularity(out, "attn/out/kernel").axes == (1,)  # within a head
    # Any other 3-D kernel keeps the 2-D rule (axis -2).
    assert r.weight_granularity(qkv, "params/Dense_0/kernel").axes == (-2,)
