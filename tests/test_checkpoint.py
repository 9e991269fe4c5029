"""jqx.io.checkpoint: save -> load is exact for every format, recipe and tree kind; the file
is compact and safetensors-readable; writes are atomic; bad files raise errors that name
the file, the tensor and the problem; a sharded load places codes and scales consistently."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jqx
from jqx.io.checkpoint import CheckpointError, load, read_metadata, read_recipe, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_tree(a, b):
    """Identical structure and static fields (QArray metadata is part of the treedef),
    and every leaf identical in dtype, shape and bytes."""
    la, da = jax.tree_util.tree_flatten(a)
    lb, db = jax.tree_util.tree_flatten(b)
    assert da == db
    for x, y in zip(la, lb, strict=True):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def roundtrip(tmp_path, tree, **kw):
    p = tmp_path / "ckpt.safetensors"
    save(p, tree, **kw)
    return load(p)


# --------------------------------------------------------------------------- exact round trips

FORMATS = ["int8", "uint8", "int4", "uint4", "fp8_e4m3", "fp8_e5m2", "nf4"]
FORMATS += ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"]
GRANULARITIES = {
    "tensor": lambda: jqx.per_tensor(),
    "channel": lambda: jqx.per_channel(-1),
    "group": lambda: jqx.per_group(8, axis=0),
    "block": lambda: jqx.per_block((8, 8)),
}
W = jax.random.normal(jax.random.key(0), (16, 24)) * 3.0


# zero points need an integer grid; every format takes absmax.
FORMAT_SCHEMES = [(f, "absmax") for f in FORMATS] + [
    (f, "zero_point") for f in ("int8", "uint8", "int4", "uint4")
]


@given(
    fmt_scheme=st.sampled_from(FORMAT_SCHEMES),
    gran=st.sampled_from(sorted(GRANULARITIES)),
    act=st.sampled_from([None, jqx.ActSpec("dynamic", "int8", "per_token")]),
)
def test_every_format_scheme_granularity_round_trips_exactly(
    tmp_path_factory, fmt_scheme, gran, act
):
    fmt, scheme = fmt_scheme
    q = jqx.quantize_array(W, fmt, scheme=scheme, granularity=GRANULARITIES[gran](), act=act)
    back = roundtrip(tmp_path_factory.mktemp("p"), {"w": q})
    assert_same_tree({"w": q}, back)
    np.testing.assert_array_equal(back["w"].dequantize(), q.dequantize())


def test_gguf_layout_extensions_round_trip(tmp_path):
    gguf_test = pytest.importorskip("test_gguf")  # its block generator and import path
    tree = {
        name: gguf_test.to_qarray(gguf_test.random_blocks(name, (2, 256), seed=i), name, (2, 256))
        for i, name in enumerate(["Q4_1", "Q5_0", "Q5_K", "Q6_K"])
    }
    assert {e for q in tree.values() for e in q.extensions} == {"min", "code_bits", "super_scale"}
    back = roundtrip(tmp_path, tree)
    assert_same_tree(tree, back)


def test_plain_tree_kinds_round_trip(tmp_path):
    tree = {
        "a": [jnp.arange(3, dtype=jnp.int32), None, (np.float16(1.5) * np.ones(2, np.float16),)],
        "b": {"c": jnp.ones((2, 3), jnp.bfloat16), "d": np.zeros((0, 4), np.float32)},
        "e": jnp.array(2.5),
        "key": jax.random.key(7),
        "ints": {3: jnp.array([True, False]), 1: jnp.zeros(1, jnp.uint16)},
    }
    back = roundtrip(tmp_path, tree)
    assert_same_tree(tree, back)
    assert isinstance(back["a"][2][0], np.ndarray) and isinstance(back["e"], jax.Array)
    assert list(back) == list(tree)


def _linen_mlp():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jax.nn.relu(nn.Dense(32)(x))
            return nn.Dense(16)(x)

    m = MLP()
    x = jax.random.normal(jax.random.key(1), (8, 16))
    return m, m.init(jax.random.key(0), x), x


def _recipes():
    return {
        "int8": jqx.int8_weight_only(),
        "int4": jqx.int4_weight_only(group_size=8),
        "nf4": jqx.nf4_weight_only(group_size=8),
        "fp8": jqx.fp8_weight_only(),
        "w8a8": jqx.int8_dynamic_activation_int8_weight(),
        "static_w8a8": jqx.int8_static_activation_int8_weight(),
        "llm_int8": jqx.llm_int8(),
        "gptq": jqx.gptq(bits=4, group_size=8, act_order=True),
        "hqq": jqx.hqq(group_size=8),
        "awq": jqx.awq(group_size=8),
        "smoothquant": jqx.smoothquant(),
    }


def test_every_recipe_on_linen_round_trips_with_identical_outputs(tmp_path):
    model, variables, x = _linen_mlp()
    batches = [x, x * 2.0]
    fwd = jax.jit(jqx.quantized(model.apply))
    ref = model.apply(variables, x)  # the float reference, once
    for name, recipe in _recipes().items():
        q = jqx.calibrate(model.apply, variables, batches, recipe, progress=False)
        back = roundtrip(tmp_path, q, metadata={"recipe": name})
        assert_same_tree(q, back)
        assert read_metadata(tmp_path / "ckpt.safetensors") == {"recipe": name}
        y_back = fwd(back, x)
        np.testing.assert_array_equal(y_back, fwd(q, x), err_msg=name)
        # The float reference bounds the quantized model (a sanity check that the
        # loaded tree is a working model, not just equal bytes).
        assert float(jnp.max(jnp.abs(y_back - ref))) < 0.5 * float(jnp.max(jnp.abs(ref)))


def test_nnx_state_round_trips_and_merges(tmp_path):
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(16, 32, rngs=rngs)
            self.b = nnx.Linear(32, 8, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    gdef, state = nnx.split(Net(nnx.Rngs(0)))
    qstate = jqx.quantize(state, jqx.int4_weight_only(group_size=8))
    # Variable metadata (here a tuple and a dict) is part of the treedef.
    qstate["extra"] = nnx.Param(jnp.ones(3), axes=("model",), note={"k": [1, 2]})
    back = roundtrip(tmp_path, qstate)
    assert type(back) is type(qstate)
    assert_same_tree(qstate, back)
    assert back["extra"].get_metadata()["axes"] == ("model",)
    del qstate["extra"], back["extra"]
    x = jax.random.normal(jax.random.key(2), (4, 16))
    run = jqx.quantized(lambda s, x: nnx.merge(gdef, s)(x))
    np.testing.assert_array_equal(run(back, x), run(qstate, x))
    ref = nnx.merge(gdef, state)(x)
    assert float(jnp.max(jnp.abs(run(back, x) - ref))) < 0.25 * float(jnp.max(jnp.abs(ref)))


def test_fresh_process_gives_bit_identical_outputs(tmp_path):
    model, variables, x = _linen_mlp()
    q = jqx.quantize(variables, jqx.int4_weight_only(group_size=8))
    path = tmp_path / "m.safetensors"
    save(path, {"variables": q, "x": x})
    y = jax.jit(jqx.quantized(model.apply))(q, x)
    script = textwrap.dedent(f"""
        import jax, numpy as np, flax.linen as nn, jqx
        from jqx.io.checkpoint import load
        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = jax.nn.relu(nn.Dense(32)(x))
                return nn.Dense(16)(x)
        t = load({str(path)!r})
        y = jax.jit(jqx.quantized(MLP().apply))(t["variables"], t["x"])
        np.save({str(tmp_path / "y.npy")!r}, np.asarray(y))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120)
    got = np.load(tmp_path / "y.npy")
    assert got.tobytes() == np.asarray(y).tobytes()


# --------------------------------------------------------------------------- the file


def test_file_within_two_percent_of_packed_bytes_and_safetensors_reads_it(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    keys = jax.random.split(jax.random.key(3), 4)
    tree = {f"layer{i}": {"kernel": jax.random.normal(k, (512, 512))} for i, k in enumerate(keys)}
    q = jqx.quantize(tree, jqx.int4_weight_only(group_size=32))
    path = tmp_path / "m.safetensors"
    save(path, q)
    packed = jqx.tree_nbytes(q)
    assert packed <= os.path.getsize(path) <= 1.02 * packed
    tensors = st_numpy.load_file(str(path))
    np.testing.assert_array_equal(tensors["layer0/kernel.qvalue"], q["layer0"]["kernel"].qvalue)
    np.testing.assert_array_equal(tensors["layer3/kernel.scale"], q["layer3"]["kernel"].scale)


def test_metadata_round_trips_and_is_validated(tmp_path):
    meta = {"step": 3, "name": "x", "nested": {"a": [1, 2.5, None, True]}}
    save(tmp_path / "a", {"w": jnp.ones(2)}, metadata=meta)
    assert read_metadata(tmp_path / "a") == meta
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save(tmp_path / "b", {}, metadata={"bad": object()})
    assert not os.path.exists(tmp_path / "b")


def test_like_checks_structure_shapes_and_dtypes(tmp_path):
    q = jqx.quantize({"kernel": jnp.ones((8, 8))}, jqx.int8_weight_only())
    save(tmp_path / "c", q)
    assert_same_tree(load(tmp_path / "c", like=q), q)
    other = jqx.quantize({"kernel": jnp.ones((8, 8))}, jqx.int4_weight_only(group_size=4))
    with pytest.raises(CheckpointError, match=r"c does not match the expected tree"):
        load(tmp_path / "c", like=other)
    with pytest.raises(
        CheckpointError, match=r"\['kernel'\]\.qvalue: the file holds int8\[8, 8\] but"
    ):
        load(tmp_path / "c", like=jax.tree.map(lambda a: a.astype(jnp.uint8), q))


def test_like_takes_the_templates_code_layout(tmp_path):
    """A plain tree restores into a packed template (jqx.quantize's default where the
    native GEMM runs) and the other way round, with the same values; the layout is the
    only difference allowed."""
    w = {"kernel": jnp.linspace(-1, 1, 64 * 32).reshape(64, 32)}
    plain = jqx.quantize(w, jqx.int8_dynamic_activation_int8_weight(), prepack=False)
    packed = jqx.prepack(plain, layout="vnni")
    for saved, template in ((plain, packed), (packed, plain)):
        save(tmp_path / "c", saved)
        got = load(tmp_path / "c", like=template)
        assert got["kernel"].code_layout == template["kernel"].code_layout
        assert_same_tree(got, template)
        abstract = jax.eval_shape(lambda t=template: t)
        assert load(tmp_path / "c", like=abstract)["kernel"].code_layout == (
            template["kernel"].code_layout
        )
    wo = jqx.prepack(jqx.quantize(w, jqx.int8_weight_only(), prepack=False), layout="vnni")
    with pytest.raises(CheckpointError, match=r"c does not match the expected tree"):
        load(tmp_path / "c", like=wo)  # packed like the file, but weight-only


def test_w8a8_data_never_loads_into_a_weight_only_target(tmp_path):
    # Same leaves (int8 codes, float32 scales); only the activation spec differs.
    w = {"kernel": jnp.linspace(-1, 1, 64).reshape(8, 8)}
    w8a8, wo = (
        jqx.quantize(w, jqx.int8_dynamic_activation_int8_weight()),
        jqx.quantize(w, jqx.int8_weight_only()),
    )
    save(tmp_path / "w8a8", w8a8)
    with pytest.raises(CheckpointError, match=r"w8a8 does not match the expected tree"):
        load(tmp_path / "w8a8", like=wo)
    assert_same_tree(load(tmp_path / "w8a8", like=w8a8), w8a8)


# --------------------------------------------------------------------------- errors


def _small(tmp_path):
    path = tmp_path / "s.safetensors"
    save(path, {"a": jnp.arange(16, dtype=jnp.float32), "b": jnp.ones(64, jnp.int8)})
    return path


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])


def test_truncated_file_names_file_and_tensor(tmp_path):
    path = _small(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match=r"s.safetensors, tensor 'b' is truncated"):
        load(path)
    path.write_bytes(raw[:20])
    with pytest.raises(CheckpointError, match=r"s.safetensors has a bad or truncated header"):
        load(path)
    path.write_bytes(raw[:3])
    with pytest.raises(CheckpointError, match=r"is truncated: 3 bytes"):
        load(path)


def test_corrupted_tensor_fails_its_checksum(tmp_path):
    path = _small(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of tensor 'b'
    path.write_bytes(bytes(raw))
    with pytest.raises(
        CheckpointError, match=r"s.safetensors, tensor 'b' is corrupted: its CRC-32"
    ):
        load(path)
    assert int(load(path, verify=False)["b"][-1]) == 1 ^ 0xFF - 256


def test_bad_header_newer_version_missing_tensor_foreign_file(tmp_path):
    path = _small(tmp_path)

    def newer(h):
        h["__metadata__"]["jqx_format"] = "2"

    _rewrite_header(path, newer)
    with pytest.raises(CheckpointError, match=r"has jqx_format 2, newer .* upgrade jqx"):
        load(path)
    path = _small(tmp_path)
    _rewrite_header(path, lambda h: h.pop("a"))
    with pytest.raises(CheckpointError, match=r"tensor 'a' is missing from the file"):
        load(path)
    path = _small(tmp_path)
    _rewrite_header(path, lambda h: h.pop("__metadata__"))
    with pytest.raises(CheckpointError, match=r"without jqx's metadata"):
        load(path)
    path = _small(tmp_path)

    def bad_tree(h):
        h["__metadata__"]["jqx_tree"] = json.dumps({"t": "dict", "keys": ["a"]})

    _rewrite_header(path, bad_tree)
    with pytest.raises(CheckpointError, match=r"has a bad jqx tree record \(KeyError"):
        load(path)
    path.write_bytes(struct.pack("<Q", 8) + b"not json" + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"s.safetensors has a bad header \(not JSON"):
        load(path)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*nope"):
        load(tmp_path / "nope")


def test_unsupported_leaf_names_path_and_type(tmp_path):
    with pytest.raises(CheckpointError, match=r"leaf at 'a/1' is a builtins.float; checkpoints"):
        save(tmp_path / "x", {"a": [jnp.ones(1), 1.5]})
    nnx = pytest.importorskip("flax.nnx")
    with pytest.raises(CheckpointError, match=r"the nnx Param at 'p' has metadata .* JSON cannot"):
        save(tmp_path / "x", {"p": nnx.Param(jnp.ones(1), odd=object())})
    with pytest.raises(CheckpointError, match=r"has key \(1, 2\) of type tuple"):
        save(tmp_path / "x", {(1, 2): jnp.ones(1)})
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------- atomic write

_KILLED_WRITER = """
import os, sys, time, jax.numpy as jnp
from jqx.io.checkpoint import save

def hang():
    print("writing", flush=True)
    time.sleep(600)

if sys.argv[2] == "in_data":  # stop after the header and the first tensor's bytes
    fdopen = os.fdopen

    class Slow:
        def __init__(self, f):
            self.f, self.n = f, 0
        def __enter__(self):
            return self
        def __exit__(self, *a):
            self.f.close()
        def write(self, b):
            self.n += 1
            out = self.f.write(b)
            if self.n == 3:
                self.f.flush()
                hang()
            return out
        def __getattr__(self, k):
            return getattr(self.f, k)

    os.fdopen = lambda *a, **k: Slow(fdopen(*a, **k))
else:  # every byte written; stop before the rename
    os.fsync = lambda fd: hang()
save(sys.argv[1], {"a": jnp.full((1 << 20,), 2.0), "b": jnp.full((1 << 20,), 3.0)})
"""


@pytest.mark.parametrize("when", ["in_data", "before_rename"])
def test_writer_killed_mid_write_leaves_the_old_file(tmp_path, when):
    path = tmp_path / "m.safetensors"
    old = {"w": jnp.full((1 << 10,), 1.0)}
    save(path, old)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path), when],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        temps = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        assert len(temps) == 1
        size = os.path.getsize(tmp_path / temps[0])
        assert (4 << 20 < size < 8 << 20) if when == "in_data" else size > 8 << 20
    finally:
        proc.kill()
        proc.wait()
    assert_same_tree(load(path), old)


# --------------------------------------------------------------------------- shard directories


def _big_tree():
    k = jax.random.split(jax.random.key(3), 3)
    rules = {"a": jqx.int4_weight_only(group_size=16), "b": jqx.int8_weight_only()}
    q = jqx.quantize(
        {
            "a": {"kernel": jax.random.normal(k[0], (64, 48))},
            "b": {"kernel": jax.random.normal(k[1], (48, 32))},
        },
        rules,
    )
    return {"q": q, "emb": jax.random.normal(k[2], (100, 16)), "n": np.arange(5)}, rules


def test_directory_of_shards_round_trips_and_records_the_recipe(tmp_path):
    tree, rules = _big_tree()
    d = tmp_path / "model"
    save(d, tree, metadata={"step": 3}, recipe=rules, max_shard_bytes=4096)
    index = json.loads((d / "jqx-index.json").read_text())
    shards = sorted(set(index["jqx_shards"].values()))
    assert len(shards) >= 3 and sorted(p.name for p in d.glob("*.safetensors")) == shards
    for name in shards:  # no shard over the limit unless one tensor alone is larger
        st_header = json.loads(
            open(d / name, "rb").read()[8:][: struct.unpack("<Q", open(d / name, "rb").read(8))[0]]
        )
        sizes = [
            e["data_offsets"][1] - e["data_offsets"][0]
            for k, e in st_header.items()
            if k != "__metadata__"
        ]
        assert sum(sizes) <= 4096 or len(sizes) == 1
    back = load(d)
    assert_same_tree(back, tree)
    assert_same_tree(load(d, like=tree), tree)
    assert read_metadata(d) == {"step": 3}
    assert read_recipe(d) == {"a": repr(rules["a"]), "b": repr(rules["b"])}
    assert eval(read_recipe(d)["a"], {"RTN": jqx.RTN}) == rules["a"]
    # A second save replaces the first; its shards are removed once the new index is in.
    save(d, {"w": jnp.ones(3)}, max_shard_bytes=4096)
    assert len(list(d.glob("*.safetensors"))) == 1
    assert_same_tree(load(d), {"w": jnp.ones(3)})


def test_a_failed_sharded_save_leaves_the_previous_one(tmp_path, monkeypatch):
    from jqx.io import checkpoint as ck

    tree, _ = _big_tree()
    d = tmp_path / "model"
    save(d, tree, max_shard_bytes=4096)
    before = sorted(p.name for p in d.iterdir())
    calls = {"n": 0}
    real = ck._write_file

    def dies_on_the_third_shard(path, tensors, meta):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        real(path, tensors, meta)

    monkeypatch.setattr(ck, "_write_file", dies_on_the_third_shard)
    with pytest.raises(RuntimeError, match="killed"):
        save(d, {k: jnp.zeros((32, 32)) for k in "abcd"}, max_shard_bytes=4096)
    monkeypatch.undo()
    assert_same_tree(load(d), tree)  # the old index still names the old, intact shards
    assert set(before) <= {p.name for p in d.iterdir()}


def test_shard_directory_errors(tmp_path):
    tree, _ = _big_tree()
    d = tmp_path / "model"
    save(d, tree, max_shard_bytes=4096)
    index = json.loads((d / "jqx-index.json").read_text())
    name, shard = next(iter(index["jqx_shards"].items()))
    os.unlink(d / shard)
    with pytest.raises(
        CheckpointError, match=rf"tensor '{name}' is in shard {shard}, which is missing"
    ):
        load(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="directory without jqx-index.json"):
        load(empty)
    with pytest.raises(CheckpointError, match="max_shard_bytes=0 must be a positive int"):
        save(tmp_path / "x", tree, max_shard_bytes=0)
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file; a sharded save"):
        save(tmp_path / "f", tree, max_shard_bytes=4096)
    with pytest.raises(CheckpointError, match="recipe=3 must be a jqx recipe"):
        save(tmp_path / "y.safetensors", tree, recipe=3)


# --------------------------------------------------------------------------- sharded load

_SHARDED = """
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np, jqx
from jax.sharding import Mesh, PartitionSpec as P
from jqx.io.checkpoint import load, save

mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
w = jax.random.normal(jax.random.key(0), (64, 32))
tree = {"q": jqx.quantize_array(w, "uint4", scheme="zero_point",
                                granularity=jqx.per_group(8, axis=0)),
        "bias": jnp.arange(32.0), "n": np.arange(4)}
save(sys.argv[1], tree)
spec = lambda p, x: P("data", "model") if p == "q" else (P("model") if p == "bias" else None)
back = load(sys.argv[1], mesh=mesh, spec_fn=spec)
want = jqx.sharding.tree_shardings(tree, mesh, spec)
for name in ("qvalue", "scale", "zero_point"):
    got = getattr(back["q"], name)
    assert got.sharding.spec == getattr(want["q"], name).spec, name
    assert len(got.sharding.device_set) == 8
    np.testing.assert_array_equal(got, getattr(tree["q"], name))
    for s in got.addressable_shards:  # each device holds only its slice
        assert s.data.shape != got.shape or got.sharding.spec == P()
assert back["bias"].sharding.spec == P("model")
assert isinstance(back["n"], np.ndarray)
x = jax.random.normal(jax.random.key(1), (4, 64))
y = jax.jit(jqx.quantized(lambda t, x: x @ t["q"]))(back, x)
# Sharded matmuls sum in another order: bound against the float reference of the same codes.
ref = np.asarray(x, np.float64) @ np.asarray(tree["q"].dequantize(), np.float64)
np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_sharded_load_on_eight_devices(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(tmp_path / "s.safetensors")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
