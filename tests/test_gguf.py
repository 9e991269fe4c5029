"""GGUF import (jqx.io.gguf): every supported type bit-exact against gguf's own
dequantize, on random blocks, on gguf-quantized random floats, on files written with
gguf.GGUFWriter and on a real published file; bad files raise errors that name the
file and the tensor; imported weights run under jqx.quantized."""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx.io.gguf import SUPPORTED_TYPES, GGUFError

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

QUANT = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of each block's fp16 fields (scale d, min m / dmin).
F16_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}
# Types gguf can also quantize (numpy reference quantizers).
GGUF_QUANTIZES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _sizes(name):
    return tuple(int(v) for v in gguf.GGML_QUANT_SIZES[T[name]])


def random_blocks(name, shape, seed=0):
    """Random bytes for a tensor of numpy ``shape`` (rows along the last axis) whose fp16
    fields are finite: random bytes are valid blocks, but an fp16 field of random bits
    can be inf/NaN; clearing its top exponent bit makes it finite (subnormals stay)."""
    rng = np.random.default_rng(seed)
    block, type_size = _sizes(name)
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        bits = np.ascontiguousarray(raw[:, off : off + 2]).view(np.uint16)
        finite = np.isfinite(bits.view(np.float16))
        bits = np.where(finite, bits, bits & np.uint16(0xBFFF))
        raw[:, off : off + 2] = bits.view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block * type_size)


def to_qarray(raw, name, shape):
    """The import path of one tensor, without a file."""
    from jqx.io.gguf import _to_qarray  # noqa: PLC0415

    return _to_qarray(raw, name, tuple(shape))


def assert_bit_exact(got, ref):
    got = np.asarray(got, np.float32)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.view(np.uint32), np.asarray(ref, np.float32).view(np.uint32))


def write_gguf(path, tensors, arch="llama", metadata=None):
    """A GGUF file: ``tensors`` maps name -> (numpy array, raw GGML type or None)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, (kind, value) in (metadata or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    for name, (data, raw_type) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# --------------------------------------------------------------------------- every type, bit-exact


@pytest.mark.parametrize("name", QUANT)
def test_random_blocks_bit_exact(name):
    block, _ = _sizes(name)
    shape = (8, 4 * block)
    raw = random_blocks(name, shape, seed=QUANT.index(name))
    q = to_qarray(raw, name, shape)
    assert q.shape == shape and q.dtype == "float32"
    assert q.nbytes <= 1.03 * raw.nbytes  # only K-quants' 6-bit scale codes take a byte each
    assert_bit_exact(q.dequantize(), gguf.quants.dequantize(raw, T[name]))


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K"])
@pytest.mark.parametrize("lead", [(), (2, 3)])
def test_other_ranks_bit_exact(name, lead):
    """1-D tensors and stacked ones (e.g. MoE experts): blocks run along the last axis."""
    block, _ = _sizes(name)
    shape = lead + (2 * block,)
    raw = random_blocks(name, shape, seed=7)
    q = to_qarray(raw, name, shape)
    assert q.block == (1,) * len(lead) + ((16 if name == "Q6_K" else 32),)
    assert_bit_exact(q.dequantize(), gguf.quants.dequantize(raw, T[name]))


@pytest.mark.parametrize("name", GGUF_QUANTIZES)
def test_gguf_quantized_floats_bit_exact(name):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 128)) * rng.uniform(0.01, 3.0, (16, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, T[name])
    q = to_qarray(raw, name, w.shape)
    ref = gguf.quants.dequantize(raw, T[name])
    assert_bit_exact(q.dequantize(), ref)
    assert float(np.abs(ref - w).max()) < 0.2 * float(np.abs(w).max())  # a sane quantization


def test_layouts_hold_the_files_bits():
    """Q4_1 keeps fp16 scale and min; K-quants keep the 6-bit codes, d and -dmin."""
    raw = random_blocks("Q4_1", (2, 64))
    q = to_qarray(raw, "Q4_1", (2, 64))
    blocks = raw.reshape(-1, 20)
    np.testing.assert_array_equal(
        np.asarray(q.scale).view(np.uint16).ravel(), blocks[:, 0:2].copy().view(np.uint16).ravel()
    )
    assert q.format == "uint4" and q.zero_kind == "min" and q.zero_point.dtype == jnp.float16
    # jqx's packing: element 2i in the low nibble of byte i (GGUF: element i and i + 16)
    codes = np.concatenate([blocks[:, 4:20] & 0xF, blocks[:, 4:20] >> 4], axis=1).reshape(2, 64)
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    np.testing.assert_array_equal(np.asarray(q.qvalue) & 0xF, codes[:, 0::2])

    raw = random_blocks("Q4_K", (1, 256))
    q = to_qarray(raw, "Q4_K", (1, 256))
    assert q.extensions == ("min", "super_scale") and q.super_block == (1, 256)
    assert q.scale.dtype == jnp.uint8 and int(q.scale.max()) < 64
    np.testing.assert_array_equal(
        np.asarray(q.super_scale).view(np.uint16), raw[:, 0:2].copy().view(np.uint16)
    )
    dmin = raw[:, 2:4].copy().view(np.float16)
    np.testing.assert_array_equal(np.asarray(q.super_zero), -dmin)

    raw = random_blocks("Q6_K", (1, 256))
    q = to_qarray(raw, "Q6_K", (1, 256))
    assert (q.format, q.code_bits, q.block) == ("int8", 6, (1, 16))
    assert q.nbytes == raw.nbytes  # 128 low + 64 high + 16 scales + 2 = 210, as in the file
    assert -32 <= int(q.codes().min()) and int(q.codes().max()) <= 31


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    tensors = {}
    for name in QUANT:
        block, _ = _sizes(name)
        tensors[f"q.{name}"] = (random_blocks(name, (3, 2 * block), seed=11), T[name])
    tensors["f.F32"] = (rng.standard_normal((4, 6)).astype(np.float32), None)
    tensors["f.F16"] = (rng.standard_normal((5,)).astype(np.float16), None)
    bf16 = rng.standard_normal((2, 3)).astype(np.float32)
    bf16_bytes = gguf.quants.quantize(bf16, T.BF16)  # uint8 (2, 6)
    tensors["f.BF16"] = (bf16_bytes, T.BF16)
    metadata = {
        "test.count": ("uint32", 30),
        "test.eps": ("float32", 1e-5),
        "test.flag": ("bool", True),
        "test.name": ("string", "tiny"),
        "test.words": ("array", ["a", "bc"]),
        "test.ids": ("array", [3, 1, 2]),
    }
    return write_gguf(tmp_path_factory.mktemp("gguf") / "every.gguf", tensors, metadata=metadata)


def test_load_every_type_bit_exact(every_type_file):
    f = jqx.load_gguf(every_type_file, expect_architecture="llama")
    reader = gguf.GGUFReader(every_type_file)
    assert f.architecture == "llama" and f.path == every_type_file
    assert list(f.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        got = f.tensors[t.name]
        assert f.types[t.name] == t.tensor_type.name
        assert tuple(got.shape) == tuple(reversed(t.shape.tolist()))
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        if jqx.is_qarray(got):
            got = got.dequantize()
        else:
            assert (
                got.dtype
                == {"F32": jnp.float32, "F16": jnp.float16, "BF16": jnp.bfloat16}[
                    t.tensor_type.name
                ]
            )
        assert_bit_exact(np.asarray(got).astype(np.float32), np.asarray(ref).reshape(got.shape))
    assert f.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert f.nbytes <= 1.05 * f.tensor_bytes
    assert set(f.types.values()) == set(SUPPORTED_TYPES)
    assert "every.gguf" in repr(f) and "tensors=11" in repr(f)


def test_metadata_is_plain_python(every_type_file):
    m = jqx.load_gguf(every_type_file).metadata
    assert m["general.architecture"] == "llama"
    assert m["test.count"] == 30 and type(m["test.count"]) is int
    assert m["test.eps"] == pytest.approx(1e-5) and type(m["test.eps"]) is float
    assert m["test.flag"] is True
    assert m["test.name"] == "tiny"
    assert m["test.words"] == ["a", "bc"] and m["test.ids"] == [3, 1, 2]
    assert not any(k.startswith("GGUF.") for k in m)


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def small_file(tmp_path):
    raw = random_blocks("Q4_1", (4, 64))
    w = np.ones((4,), np.float32)
    return write_gguf(
        tmp_path / "small.gguf",
        {"blk.0.attn_q.weight": (raw, T.Q4_1), "blk.0.attn_norm.weight": (w, None)},
    )


def test_truncated_file_names_file_and_tensor(small_file, tmp_path):
    last = gguf.GGUFReader(small_file).tensors[-1]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(small_file, "rb").read()[: last.data_offset + 4])
    with pytest.raises(GGUFError, match="truncated") as e:
        jqx.load_gguf(cut)
    assert str(cut) in str(e.value) and "'blk.0.attn_norm.weight'" in str(e.value)


@pytest.mark.parametrize("keep", [0, 3, 40, 200])
def test_truncated_header_names_the_file(small_file, tmp_path, keep):
    cut = tmp_path / f"head{keep}.gguf"
    cut.write_bytes(open(small_file, "rb").read()[:keep])
    with pytest.raises(GGUFError) as e:
        jqx.load_gguf(cut)
    assert str(cut) in str(e.value)
    assert any(w in str(e.value) for w in ("truncated", "empty", "magic", "corrupt"))


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"{not gguf at all}" * 10)
    with pytest.raises(GGUFError, match="magic"):
        jqx.load_gguf(p)


def test_corrupt_type_code_names_tensor_and_supported_types(small_file, tmp_path):
    data = bytearray(open(small_file, "rb").read())
    name = b"blk.0.attn_q.weight"
    pos = data.find(name)  # tensor info: name, n_dims (u32), dims (u64 each), type (u32)
    at = pos + len(name) + 4 + 8 * 2
    assert int.from_bytes(data[at : at + 4], "little") == int(T.Q4_1)
    data[at : at + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "badtype.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="no GGML tensor type") as e:
        jqx.load_gguf(bad)
    msg = str(e.value)
    assert str(bad) in msg and "'blk.0.attn_q.weight'" in msg and "Q4_K" in msg


def test_unsupported_type_names_tensor_type_and_supported(tmp_path):
    block, size = _sizes("Q2_K")
    raw = np.zeros((2, size), np.uint8)
    p = write_gguf(
        tmp_path / "q2k.gguf",
        {"ok": (np.ones(3, np.float32), None), "blk.0.ffn_up.weight": (raw, T.Q2_K)},
    )
    with pytest.raises(GGUFError) as e:
        jqx.load_gguf(p)
    msg = str(e.value)
    assert p in msg and "'blk.0.ffn_up.weight'" in msg and "Q2_K" in msg
    assert all(t in msg for t in SUPPORTED_TYPES)


def test_unexpected_architecture(small_file, tmp_path):
    p = write_gguf(tmp_path / "mamba.gguf", {"w": (np.ones(3, np.float32), None)}, arch="mamba")
    with pytest.raises(GGUFError, match="architecture 'mamba'.*'llama'") as e:
        jqx.load_gguf(p, expect_architecture="llama")
    assert p in str(e.value)
    assert jqx.load_gguf(p, expect_architecture=("llama", "mamba")).architecture == "mamba"


def test_missing_tensor_names_it_and_close_matches(small_file):
    with pytest.raises(GGUFError, match="'blk.0.attn_k.weight'") as e:
        jqx.load_gguf(small_file, required=["blk.0.attn_q.weight", "blk.0.attn_k.weight"])
    assert small_file in str(e.value) and "'blk.0.attn_q.weight'" in str(e.value)


def test_missing_gguf_package_says_how_to_install(small_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"pip install 'jqx\[gguf\]'"):
        jqx.load_gguf(small_file)


# --------------------------------------------------------------------------- the header parser

# One value of every GGUF metadata type, as written with GGUFWriter, and the plain Python
# value it reads back as (a FLOAT32 is the Python float of the float32 value).
EVERY_VALUE_TYPE = {
    "UINT8": (200, 200),
    "INT8": (-100, -100),
    "UINT16": (60000, 60000),
    "INT16": (-30000, -30000),
    "UINT32": (4_000_000_000, 4_000_000_000),
    "INT32": (-2_000_000_000, -2_000_000_000),
    "FLOAT32": (0.1, float(np.float32(0.1))),
    "BOOL": (True, True),
    "STRING": ("héllo ✓", "héllo ✓"),
    "UINT64": (2**63 + 5, 2**63 + 5),
    "INT64": (-(2**62), -(2**62)),
    "FLOAT64": (0.1, 0.1),
}


def test_every_metadata_value_type_reads_back(tmp_path):
    VT = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(tmp_path / "kv.gguf"), "llama")
    for name, (value, _) in EVERY_VALUE_TYPE.items():
        w.add_key_value(f"s.{name}", value, VT[name])
        w.add_key_value(f"a.{name}", [value, value], VT.ARRAY, sub_type=VT[name])
    w.add_key_value("s.false", False, VT.BOOL)
    w.add_array("a.strings", ["", "x", "ünï"])
    w.add_tensor("w", np.ones(3, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = jqx.load_gguf(tmp_path / "kv.gguf").metadata
    for name, (_, expected) in EVERY_VALUE_TYPE.items():
        assert m[f"s.{name}"] == expected and type(m[f"s.{name}"]) is type(expected), name
        assert m[f"a.{name}"] == [expected] * 2, name
        assert all(type(v) is type(expected) for v in m[f"a.{name}"]), name
    assert m["s.false"] is False and m["a.strings"] == ["", "x", "ünï"]
    assert list(m)[0] == "general.architecture"  # file order


def test_non_default_alignment_is_honoured(tmp_path):
    """Tensors of odd byte sizes, each padded to 256 bytes: data read at the right offsets."""
    rng = np.random.default_rng(4)
    tensors = {
        "a": rng.standard_normal(3).astype(np.float32),
        "b": rng.standard_normal((5, 7)).astype(np.float16),
        "c": rng.standard_normal((2, 3)).astype(np.float32),
    }
    w = gguf.GGUFWriter(str(tmp_path / "aligned.gguf"), "llama")
    w.add_custom_alignment(256)
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    offsets = [t.data_offset for t in gguf.GGUFReader(tmp_path / "aligned.gguf").tensors]
    assert all(o % 256 == 0 for o in offsets) and offsets[1] - offsets[0] == 256
    f = jqx.load_gguf(tmp_path / "aligned.gguf")
    assert f.metadata["general.alignment"] == 256
    for name, data in tensors.items():
        np.testing.assert_array_equal(np.asarray(f.tensors[name]), data)


def _kv(key, vtype, payload):
    k = key.encode()
    return len(k).to_bytes(8, "little") + k + vtype.to_bytes(4, "little") + payload


def _raw_gguf(path, kvs, version=3):
    """A GGUF file of key/value pairs only (no tensors), bytes as given."""
    head = b"GGUF" + version.to_bytes(4, "little") + (0).to_bytes(8, "little")
    path.write_bytes(head + len(kvs).to_bytes(8, "little") + b"".join(kvs))
    return path


def _u64(n):
    return n.to_bytes(8, "little")


def test_empty_array_reads_as_empty_list(tmp_path):
    # GGUFWriter refuses empty arrays; other writers do not.
    p = _raw_gguf(tmp_path / "empty.gguf", [_kv("a", 9, (4).to_bytes(4, "little") + _u64(0))])
    assert jqx.load_gguf(p).metadata == {"a": []}


@pytest.mark.parametrize("version", [1, 4, 99])
def test_unsupported_version_names_it(small_file, tmp_path, version):
    data = bytearray(open(small_file, "rb").read())
    data[4:8] = version.to_bytes(4, "little")
    p = tmp_path / "v.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=f"version {version}; jqx reads versions 2 and 3") as e:
        jqx.load_gguf(p)
    assert str(p) in str(e.value)


def test_version_2_is_read(small_file, tmp_path):
    data = bytearray(open(small_file, "rb").read())
    data[4:8] = (2).to_bytes(4, "little")  # v2 and v3 headers are laid out alike
    p = tmp_path / "v2.gguf"
    p.write_bytes(bytes(data))
    assert list(jqx.load_gguf(p).tensors) == ["blk.0.attn_q.weight", "blk.0.attn_norm.weight"]


def test_big_endian_file_is_refused(tmp_path):
    p = str(tmp_path / "be.gguf")
    w = gguf.GGUFWriter(p, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("w", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="big-endian.*gguf_convert_endian") as e:
        jqx.load_gguf(p)
    assert p in str(e.value)


@pytest.mark.parametrize(
    "kvs,match",
    [
        ([_kv("s", 8, _u64(1000) + b"abc")], r"metadata key 's' at byte .*truncated"),
        (
            [_kv("a", 9, (4).to_bytes(4, "little") + _u64(2**62))],
            r"metadata key 'a' at byte .*truncated",
        ),
        (
            [_kv("a", 9, (8).to_bytes(4, "little") + _u64(2**40))],
            r"metadata key 'a' at byte .*truncated",
        ),
        ([_kv("x", 13, b"")], r"'x' has value type code 13, which is no GGUF value type"),
        ([_kv("s", 8, _u64(2) + b"\xff\xfe")], r"'s' could not be decoded.*corrupt"),
        ([_kv("s", 8, _u64(1) + b"a")] * 2, r"'s' appears twice"),
        ([_kv("general.alignment", 4, (48).to_bytes(4, "little"))], r"alignment is 48.*power"),
        ([_kv("general.alignment", 10, _u64(64))], r"alignment is of value type UINT64"),
    ],
)
def test_corrupt_metadata_names_the_key(tmp_path, kvs, match):
    p = _raw_gguf(tmp_path / "bad.gguf", kvs)
    with pytest.raises(GGUFError, match=match) as e:
        jqx.load_gguf(p)
    assert str(p) in str(e.value)


def test_damaged_header_raises_only_gguf_errors(small_file, tmp_path):
    """Every cut of the header and every byte of it set to 0x00 or 0xFF: a GGUFError
    naming the file (never a bare struct, index or unicode error), or a file that loads."""
    data = open(small_file, "rb").read()
    header = gguf.GGUFReader(small_file).data_offset
    p = tmp_path / "damaged.gguf"
    cases = [data[:n] for n in range(1, header)]
    cases += [data[:i] + bytes([b]) + data[i + 1 :] for i in range(header) for b in (0x00, 0xFF)]
    for case in cases:
        p.write_bytes(case)
        try:  # the missing tensor fails any file that parses, before tensors are converted
            jqx.load_gguf(p, required=["no such tensor"])
        except GGUFError as e:
            assert str(p) in str(e)
        else:
            raise AssertionError("a required tensor the file lacks was not reported")


# --------------------------------------------------------------------------- running imported weights


def _matmul_case(name, rows, cols, seed):
    q = to_qarray(random_blocks(name, (rows, cols), seed=seed), name, (rows, cols))
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((3, cols)).astype(np.float32))
    return q, x


def _assert_close_to_float_matmul(y, x, w):
    """Within float32 summation-order error of ``x @ w.T``."""
    bound = 1e-5 * float((jnp.abs(x) @ jnp.abs(w).T).max())
    assert float(jnp.abs(y - x @ w.T).max()) <= bound


def _check_quantized_matmul(q, x):
    y = jax.jit(jqx.quantized(lambda w, x: x @ w.T))(q, x)
    _assert_close_to_float_matmul(y, x, q.dequantize())


@pytest.mark.parametrize("name,cols", [("Q4_1", 96), ("Q4_K", 512), ("Q6_K", 256), ("Q5_K", 256)])
def test_quantized_matmul_with_transposed_weight(name, cols):
    """``x @ W.T`` with W (out, in) as imported: the interpreter follows the transpose."""
    _check_quantized_matmul(*_matmul_case(name, 8, cols, seed=5))


def test_quantized_matmul_one_block_per_row_float_min():
    """One block covering the contraction: the dispatcher must not take a fast path
    that reads the float minimum as an integer zero point."""
    _check_quantized_matmul(*_matmul_case("Q4_1", 8, 32, seed=6))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_scan_over_stacked_layers_and_embedding_lookup(name):
    q, x = _matmul_case(name, 8, 256, seed=9)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), q, q)
    stacked = stacked.replace(
        shape=(2, *q.shape), block=(1, *q.block), super_block=(1, *q.super_block)
    )

    def layers(ws, x):
        return jax.lax.scan(lambda c, w: (c, x @ w.T), 0, ws)[1]

    y = jax.jit(jqx.quantized(layers))(stacked, x)
    _assert_close_to_float_matmul(y[1], x, q.dequantize())
    ids = jnp.array([[7, 0], [3, 3]])
    rows = jax.jit(jqx.quantized(lambda w, i: jnp.take(w, i, axis=0)))(q, ids)
    assert_bit_exact(rows, np.asarray(q.dequantize())[np.asarray(ids)])


# --------------------------------------------------------------------------- a published file


@pytest.mark.slow
def test_smollm2_every_tensor_bit_exact_and_resident_bytes(smollm2_gguf):
    # The file as read once per test process (conftest.smollm2_gguf); expect_architecture
    # and required= are checked on small files above.
    f = smollm2_gguf
    assert f.architecture == "llama"
    for name in ("token_embd.weight", "blk.29.ffn_down.weight", "output_norm.weight"):
        assert name in f.tensors
    assert f.metadata["llama.block_count"] == 30 and f.metadata["tokenizer.ggml.bos_token_id"] == 1
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
    counts = {t: list(f.types.values()).count(t) for t in set(f.types.values())}
    assert counts == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    down = f.tensors["blk.0.ffn_down.weight"]
    assert down.shape == (576, 1536) and down.block == (1, 32)

    t0 = time.perf_counter()
    from jqx.llm.runtime import default_model_path  # noqa: PLC0415

    reader = gguf.GGUFReader(default_model_path())
    for t in reader.tensors:  # all 272 tensors
        got = f.tensors[t.name]
        got = got.dequantize() if jqx.is_qarray(got) else got
        assert_bit_exact(got, gguf.quants.dequantize(t.data, t.tensor_type))
    t_check = time.perf_counter() - t0
    ratio = f.nbytes / f.tensor_bytes
    print(
        f"\nSmolLM2-135M Q4_1: resident {f.nbytes} B / file tensors {f.tensor_bytes} B = "
        f"{ratio:.4f}; bit-exact check of {len(reader.tensors)} tensors "
        f"{t_check:.1f} s"
    )
    assert ratio <= 1.05
