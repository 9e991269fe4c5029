"""jqx.io.orbax: quantized training states through orbax-checkpoint, checked and resharded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jqx
from jqx.io import orbax as jqo

ocp = pytest.importorskip("orbax.checkpoint")

ROOT = Path(__file__).resolve().parent.parent


def _state():
    """A QLoRA-style training state: frozen quantized weights (int4 g16, W8A8, fp8),
    float LoRA factors with their Adam state, and an FP8 delayed-scaling state."""
    k = jax.random.split(jax.random.key(0), 4)
    base = {
        "attn": {"kernel": jax.random.normal(k[0], (64, 32))},
        "mlp": {"kernel": jax.random.normal(k[1], (32, 64))},
        "out": {"kernel": jax.random.normal(k[2], (64, 16))},
    }
    rules = {
        "attn": jqx.int4_weight_only(group_size=16),
        "mlp": jqx.int8_dynamic_activation_int8_weight(),
        "out": jqx.fp8_weight_only(),
    }
    frozen = jqx.quantize(base, rules)
    lora = {"a": jax.random.normal(k[3], (64, 4)) * 0.01, "b": jnp.zeros((4, 32))}
    opt = optax.adam(1e-3)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes dtypes
        opt_state = opt.update(jax.tree.map(jnp.ones_like, lora), opt.init(lora), lora)[1]
    fp8 = jqx.fp8.init_state({"lora": {"kernel": lora["a"]}}, history_len=16)
    return {"frozen": frozen, "lora": lora, "opt": opt_state, "fp8": fp8, "step": jnp.int32(7)}


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_training_state_round_trips_through_an_async_manager(tmp_path):
    state = _state()
    mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(max_to_keep=1))
    for step in (1, 2):
        mngr.save(step, args=jqo.save_args(state, custom_metadata={"run": "qlora"}))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2]
    back = jqo.restore(mngr, 2, state)
    _same(back, state)
    for name in ("attn", "mlp", "out"):
        q, r = state["frozen"][name]["kernel"], back["frozen"][name]["kernel"]
        assert (r.format, r.block, r.act) == (q.format, q.block, q.act)
    assert mngr.item_metadata(2).custom_metadata["run"] == "qlora"
    # The restored state computes exactly what the saved one did.
    x = jax.random.normal(jax.random.key(5), (3, 32))
    f = jax.jit(jqx.quantized(lambda p, x: x @ p["mlp"]["kernel"]))
    np.testing.assert_array_equal(f(back["frozen"], x), f(state["frozen"], x))
    # Restoring from abstract leaves works as well (no arrays needed to build the target).
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    _same(jqo.restore(mngr, 2, abstract), state)


def test_checkpointer_and_standard_checkpointer(tmp_path):
    state = _state()["frozen"]
    ck = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    ck.save(tmp_path / "a", args=jqo.save_args(state))
    _same(jqo.restore(ck, tmp_path / "a", state), state)
    std = ocp.StandardCheckpointer()
    std.save(tmp_path / "b", state, custom_metadata=jqo.save_args(state).custom_metadata)
    std.wait_until_finished()
    _same(jqo.restore(std, tmp_path / "b", state), state)


def test_the_wrong_recipe_never_restores_silently(tmp_path):
    w = {"d": {"kernel": jax.random.normal(jax.random.key(1), (32, 16))}}
    w8a8 = jqx.quantize(w, jqx.int8_dynamic_activation_int8_weight())
    ck = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    ck.save(tmp_path / "c", args=jqo.save_args(w8a8))
    # Same arrays (int8 codes, float32 scales): only the activation spec differs.
    with pytest.raises(jqx.CheckpointError, match=r"tensor 'd/kernel'.*act: checkpoint"):
        jqo.restore(ck, tmp_path / "c", jqx.quantize(w, jqx.int8_weight_only()))
    with pytest.raises(jqx.CheckpointError, match=r"'d/kernel'.*target has a plain array"):
        jqo.restore(ck, tmp_path / "c", w)
    with pytest.raises(jqx.CheckpointError, match=r"target expects a QArray \(int8\)"):
        jqo.check({"jqx": jqo.describe(w)}, w8a8)


def test_a_layout_mismatch_names_both_layouts_and_the_fix(tmp_path):
    """jqx.quantize packs int8 weights where the native GEMM runs, so a target built on
    one machine can be packed and a checkpoint from another plain: the error says so."""
    w = {"d": {"kernel": jax.random.normal(jax.random.key(1), (32, 16))}}
    r = jqx.int8_dynamic_activation_int8_weight()
    plain, packed = jqx.quantize(w, r, prepack=False), jqx.quantize(w, r, prepack=True)
    ck = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    ck.save(tmp_path / "c", args=jqo.save_args(plain))
    with pytest.raises(
        jqx.CheckpointError,
        match=r"'d/kernel'.*in the 'plain' layout and the target's in 'vnni'.*prepack=False",
    ):
        jqo.restore(ck, tmp_path / "c", packed)
    _same(jqo.restore(ck, tmp_path / "c", plain), plain)


def test_without_save_args_or_from_a_newer_jqx_it_says_so(tmp_path):
    q = jqx.quantize({"kernel": jnp.ones((8, 4))}, jqx.int8_weight_only())
    ck = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    ck.save(tmp_path / "plain", args=ocp.args.StandardSave(q))
    with pytest.raises(jqx.CheckpointError, match="saved without jqx.io.orbax.save_args"):
        jqo.restore(ck, tmp_path / "plain", q)
    newer = {"jqx": dict(jqo.describe(q), version="99")}
    with pytest.raises(jqx.CheckpointError, match="version '99' is newer"):
        jqo.check(newer, q)


def test_bad_arguments():
    with pytest.raises(ValueError, match="key 'jqx'"):
        jqo.save_args({}, custom_metadata={"jqx": 1})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        jqo.save_args({}, custom_metadata={"x": object()})
    with pytest.raises(ValueError, match="spec_fn= needs mesh="):
        jqo.restore_args({}, spec_fn=lambda p, x: None)


_RESHARD = """
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np, jqx, orbax.checkpoint as ocp
from jax.sharding import Mesh, PartitionSpec as P
from jqx.io import orbax as jqo

w = {"attn": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))},
     "mlp": {"kernel": jax.random.normal(jax.random.key(1), (32, 64))}}
q = jqx.quantize(w, {"attn": jqx.int4_weight_only(group_size=16),
                     "mlp": jqx.int8_dynamic_activation_int8_weight()})
state = {"params": q, "mu": jnp.arange(64.0)}
# Saved from a 1-D mesh, the weights split on their output axis ...
m1 = Mesh(np.array(jax.devices()), ("model",))
out_axis = lambda p, x: P(None, "model") if p.endswith("kernel") else P("model")
saved = jax.device_put(state, jqx.sharding.tree_shardings(state, m1, out_axis))
mngr = ocp.CheckpointManager(sys.argv[1])
mngr.save(1, args=jqo.save_args(saved))
mngr.wait_until_finished()
# ... restored onto a 2 x 4 mesh, split on the input axis and replicated over "data".
m2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
in_axis = lambda p, x: P("model", None) if p.endswith("kernel") else None
back = jqo.restore(mngr, 1, state, mesh=m2, spec_fn=in_axis)
want = jqx.sharding.tree_shardings(state, m2, in_axis)
for got, exp, orig in zip(jax.tree.leaves(back), jax.tree.leaves(want), jax.tree.leaves(state)):
    assert got.sharding.mesh.shape == m2.shape and got.sharding.spec == exp.spec, (got.sharding, exp)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(orig))
assert back["params"]["attn"]["kernel"].qvalue.sharding.spec == P("model", None)
x = jax.random.normal(jax.random.key(2), (4, 64))
f = jax.jit(jqx.quantized(lambda p, x: x @ p["attn"]["kernel"]))
ref = np.asarray(x, np.float64) @ np.asarray(q["attn"]["kernel"].dequantize(), np.float64)
np.testing.assert_allclose(f(back["params"], x), ref, rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_restore_onto_a_different_mesh_and_sharding(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _RESHARD, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
