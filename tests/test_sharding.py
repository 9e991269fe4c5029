"""Sharding of quantized params: spec derivation here, 8-device equality in a subprocess."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jqx

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_eight_host_devices_match_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_sharding_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("OK ") == 15, r.stdout
    # The many-row W8A8 and float32 lines go through jqx.native's custom calls when
    # they are built.
    assert r.stdout.count("2048 rows") == 4, r.stdout


def test_specs_follow_codes_blocks_and_packing():
    w = jnp.ones((64, 32))
    sizes = {"data": 4, "model": 2}
    # int4 group-wise along the input axis, sharded on the output axis.
    q = jqx.int4_weight_only(group_size=16).quantize_weight(w)
    s = jqx.sharding.qarray_specs(q, P(None, "model"), sizes)
    assert (
        s.qvalue == P(None, "model")
        and s.scale == P(None, "model")
        and s.zero_point == P(None, "model")
    )
    # Sharded on the input axis: 4 groups over 4 devices keep the groups whole.
    s = jqx.sharding.qarray_specs(q, P("data", None), sizes)
    assert s.qvalue == P("data", None) and s.scale == P("data", None)
    # Per-channel int8: one scale row, so the reduced axis is replicated.
    q = jqx.int8_weight_only().quantize_weight(w)
    s = jqx.sharding.qarray_specs(q, P("data", "model"), sizes)
    assert s.qvalue == P("data", "model") and s.scale == P(None, "model")
    # Static activation scales are replicated.
    q = q.replace(act_scale=jnp.ones((1,), jnp.float32))
    assert jqx.sharding.qarray_specs(q, P(None, "model"), sizes).act_scale == P()
    # Groups that would straddle shards: 2 groups of 32 over 4 devices -> replicate that axis.
    q = jqx.int4_weight_only(group_size=32).quantize_weight(w)
    s = jqx.sharding.qarray_specs(q, P("data", None), sizes)
    assert s.qvalue == P("data", None) and s.scale == P(None, None)


def test_g_idx_keeps_per_group_children_whole_along_the_group_axis():
    import jax
    import numpy as np

    from jqx.core.numerics import make_qarray

    k, n, g = 32, 8, 8
    gi = np.random.default_rng(0).permutation(np.arange(k) // g)
    q = make_qarray(
        np.zeros((k, n), np.float32),
        np.ones((k // g, n), np.float32),
        np.zeros((k // g, n), np.float32),
        fmt="uint4",
        shape=(k, n),
        dtype="float32",
        block=(g, 1),
        g_idx=gi,
    )
    sizes = {"data": 4, "model": 2}
    s = jqx.sharding.qarray_specs(q, P("data", "model"), sizes)
    # Codes shard like the array; any row may read any group's scale, so scales and
    # zero points stay whole along the group axis, and the index is replicated.
    assert s.qvalue == P("data", "model") and s.g_idx == P()
    assert s.scale == P(None, "model") and s.zero_point == P(None, "model")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    placed = jqx.shard({"w": q}, mesh, lambda p, x: P("data", "model"))["w"]
    np.testing.assert_array_equal(placed.dequantize(), q.dequantize())


def test_spec_errors_name_the_leaf():
    q = jqx.int8_weight_only().quantize_weight(jnp.ones((64, 30)))
    with pytest.raises(ValueError, match="dense/kernel.*axis 1 \\(size 30\\).*'data'"):
        jqx.sharding.qarray_specs(q, P(None, "data"), {"data": 4}, "dense/kernel")
    with pytest.raises(ValueError, match="mesh axis 'tp'"):
        jqx.sharding.qarray_specs(q, P(None, "tp"), {"data": 4}, "dense/kernel")
    with pytest.raises(ValueError, match="3 entries"):
        jqx.sharding.qarray_specs(q, P(None, None, "data"), {"data": 4}, "dense/kernel")
