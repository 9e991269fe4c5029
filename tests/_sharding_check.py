"""Run by tests/test_sharding.py in its own process with 8 host CPU devices.

For each recipe: quantized params + jqx.quantized inference on a (data=4,
model=2) mesh, weights sharded on their output axis and the batch on the
data axis, must give the single-device output (and the single-device output
must be within the recipe's bound of the float model on dequantized weights).
Prints one line per case and exits non-zero on the first failure.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jqx  # noqa: E402
from jqx.flax import linen as qnn  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
assert jax.device_count() == 8, jax.devices()

D_IN, D_H, D_OUT, B = 64, 128, 32, 16


class MLP(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(self.dense(D_H, name="up")(x))
        return self.dense(D_OUT, name="down")(h)


def spec_fn(path, leaf):
    if path.endswith("kernel"):
        return P(None, "model")  # output axis
    if path.endswith("bias"):
        return P("model")
    return None


def spec_fn_row_parallel(path, leaf):
    """Megatron-style: "up" split on its output axis, "down" on its input (contraction) axis."""
    if path.endswith("up/kernel"):
        return P(None, "model")
    if path.endswith("up/bias"):
        return P("model")
    if path.endswith("down/kernel"):
        return P("model", None)
    return None


def main() -> int:
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    x = jax.random.normal(jax.random.key(1), (B, D_IN))
    batches = [jax.random.normal(jax.random.key(2 + i), (B, D_IN)) for i in range(2)]
    recipes = {
        "int8": (jqx.int8_weight_only(), 1e-4),
        "int4_g16": (jqx.int4_weight_only(group_size=16), 1e-4),
        "nf4_g16": (jqx.nf4_weight_only(group_size=16), 1e-4),
        "fp8": (jqx.fp8_weight_only(), 1e-4),
        "w8a8_int8": (jqx.int8_dynamic_activation_int8_weight(), 3e-2),
        "w8a8_static": (jqx.int8_static_activation_int8_weight(), 3e-2),
    }
    failed = 0
    # With several devices jqx.quantize keeps the plain layout (the tree is about to be
    # sharded), also where the native GEMM runs.
    probe = jqx.quantize({"kernel": np.ones((D_IN, D_H), np.float32)}, recipes["w8a8_int8"][0])
    if probe["kernel"].code_layout != "plain":
        print(f"FAIL jqx.quantize packed with 8 devices: {probe['kernel'].code_layout}")
        failed += 1
    # The adapter layer shares the sharding machinery with the interpreter: two of its
    # recipes (one weight-only, one calibrated W8A8) cover what it adds.
    adapter_recipes = ("int8", "w8a8_static")
    for dense_name, dense in (("nn.Dense", nn.Dense), ("jqx.flax.linen.Dense", qnn.Dense)):
        model = MLP(dense)
        params = model.init(jax.random.key(0), x)
        apply = model.apply if dense is qnn.Dense else jqx.quantized(model.apply)
        for name, (recipe, rel_bound) in recipes.items():
            if dense is qnn.Dense and name not in adapter_recipes:
                continue
            if recipe.needs_calibration:
                qp = jqx.calibrate(model.apply, params, batches, recipe, progress=False)
            else:
                qp = jqx.quantize(params, recipe)
            f = jax.jit(apply)
            y1 = np.asarray(f(qp, x))  # one device
            y_deq = np.asarray(model.apply(jqx.dequantize(qp), x))
            scale = float(np.max(np.abs(y_deq)))
            ok_ref = float(np.max(np.abs(y1 - y_deq))) <= rel_bound * scale

            qp8 = jqx.shard(qp, mesh, spec_fn)
            x8 = jax.device_put(x, NamedSharding(mesh, P("data", None)))
            k = qp8["params"]["up"]["kernel"]
            placed = (
                k.qvalue.sharding.spec == P(None, "model")
                and k.scale.sharding.spec in (P(None, "model"), P())
                and len({d for s in k.qvalue.addressable_shards for d in [s.device]}) == 8
                and k.qvalue.addressable_shards[0].data.shape[-1] == k.qvalue.shape[-1] // 2
            )
            y8 = f(qp8, x8)
            diff = float(np.max(np.abs(np.asarray(y8) - y1)))
            same = diff <= 1e-5 * scale
            ok = ok_ref and placed and same
            failed += not ok
            print(
                f"{'OK  ' if ok else 'FAIL'} {dense_name:22s} {name:12s} 8-dev vs 1-dev max|diff|="
                f"{diff:.2e} (scale {scale:.2f}), 1-dev vs float-on-dequantized "
                f"{float(np.max(np.abs(y1 - y_deq))):.2e}, shards placed={placed}, "
                f"out sharding={y8.sharding.spec}"
            )
    # Contraction axis sharded too (partial sums reduced across "model").
    model = MLP(nn.Dense)
    params = model.init(jax.random.key(0), x)
    f = jax.jit(jqx.quantized(model.apply))
    x8 = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    for name in ("int8", "int4_g16", "w8a8_int8"):
        qp = jqx.quantize(params, recipes[name][0])
        y1 = np.asarray(f(qp, x))
        scale = float(np.max(np.abs(y1)))
        qp8 = jqx.shard(qp, mesh, spec_fn_row_parallel)
        k = qp8["params"]["down"]["kernel"]
        placed = k.qvalue.sharding.spec == P("model", None)
        diff = float(np.max(np.abs(np.asarray(f(qp8, x8)) - y1)))
        ok = placed and diff <= 1e-5 * scale
        failed += not ok
        print(
            f"{'OK  ' if ok else 'FAIL'} row-parallel down   {name:12s} 8-dev vs 1-dev max|diff|={diff:.2e}"
        )
    # Many rows: W8A8 int8 takes jqx.native's custom call (when built) under the mesh.
    xb = jax.random.normal(jax.random.key(7), (2048, D_IN))
    xb8 = jax.device_put(xb, NamedSharding(mesh, P("data", None)))
    qp = jqx.quantize(params, recipes["w8a8_int8"][0])
    y1 = np.asarray(f(qp, xb))
    scale = float(np.max(np.abs(y1)))
    for layout, sfn in (("column-parallel", spec_fn), ("row-parallel", spec_fn_row_parallel)):
        diff = float(np.max(np.abs(np.asarray(f(jqx.shard(qp, mesh, sfn), xb8)) - y1)))
        ok = diff <= 1e-5 * scale
        failed += not ok
        print(
            f"{'OK  ' if ok else 'FAIL'} 2048 rows {layout:15s} w8a8_int8 (native: "
            f"{jqx.native.status()}) 8-dev vs 1-dev max|diff|={diff:.2e}"
        )
    # Many rows of float32 products: jqx.native's float32 GEMM (when built) under the mesh,
    # both layers in one call (jqx_f32_mlp: the MLP is up -> GELU -> down).
    text = f.lower(params, xb).as_text()
    ok_route = "jqx_f32_mlp" in text or jqx.native.status() != "available"
    y1 = np.asarray(f(params, xb))
    scale = float(np.max(np.abs(y1)))
    for layout, sfn in (("column-parallel", spec_fn), ("row-parallel", spec_fn_row_parallel)):
        diff = float(np.max(np.abs(np.asarray(f(jqx.shard(params, mesh, sfn), xb8)) - y1)))
        ok = ok_route and diff <= 1e-5 * scale
        failed += not ok
        print(
            f"{'OK  ' if ok else 'FAIL'} 2048 rows {layout:15s} float32   (native: "
            f"{jqx.native.status()}, on the float32 GEMM: {ok_route}) 8-dev vs 1-dev "
            f"max|diff|={diff:.2e}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
