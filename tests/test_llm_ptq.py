"""LLM.quantize / LLM.allocate on a small random Llama (the real model: benchmarks/llm_ptq.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("tokenizers")
from flax import nnx  # noqa: E402

import jqx  # noqa: E402
from jqx.llm import LLM, Llama, LlamaConfig  # noqa: E402
from jqx.llm.model import fuse_projections  # noqa: E402
from jqx.llm.ptq import transpose_qarray  # noqa: E402

CFG = LlamaConfig(
    vocab_size=96, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, rope_base=1e4
)
IDS = [int(i) for i in np.random.default_rng(0).integers(2, 96, 400)]


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    tok = tiny_tokenizer
    model = Llama(CFG, rngs=nnx.Rngs(0))
    # a smaller embedding keeps the random model's logits soft (a KL that means something)
    model.embed.set_value(model.embed[...] * 0.05)
    fuse_projections(model)
    return LLM(model, tok)


def _weights(llm):
    """path -> float (out, in) of every matmul weight, fused ones split."""
    out = {}
    c = CFG
    nq, nk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for i, b in enumerate(llm.model.blocks):
        a, m = b.attn, b.mlp
        deq = lambda w: w.dequantize(jnp.float32) if jqx.is_qarray(w) else w  # noqa: E731
        if getattr(a, "wqkv", None) is not None:
            w = deq(a.wqkv[...])
            out.update(
                {
                    f"blocks/{i}/attn/wq": w[:nq],
                    f"blocks/{i}/attn/wk": w[nq : nq + nk],
                    f"blocks/{i}/attn/wv": w[nq + nk :],
                }
            )
        else:
            for n in ("wq", "wk", "wv"):
                out[f"blocks/{i}/attn/{n}"] = deq(getattr(a, n)[...])
        out[f"blocks/{i}/attn/wo"] = deq(a.wo[...])
        if getattr(m, "w_gate_up", None) is not None:
            w = deq(m.w_gate_up[...])
            out[f"blocks/{i}/mlp/w_gate"] = w[: c.hidden_dim]
            out[f"blocks/{i}/mlp/w_up"] = w[c.hidden_dim :]
        else:
            out[f"blocks/{i}/mlp/w_gate"] = deq(m.w_gate[...])
            out[f"blocks/{i}/mlp/w_up"] = deq(m.w_up[...])
        out[f"blocks/{i}/mlp/w_down"] = deq(m.w_down[...])
    return out


def _kl(a, b):
    p, q = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def test_rtn_equals_the_recipe_on_each_transposed_weight_and_fuses_again(tiny):
    recipe = jqx.int4_weight_only(group_size=32)
    q = tiny.quantize(recipe)
    assert q.model.blocks[0].attn.wqkv is not None  # fused again: the layouts match
    assert q.model.blocks[0].attn.wqkv[...].block == (1, 32)  # groups along the input axis
    ref, got = _weights(tiny), _weights(q)
    assert len(got) == 7 * CFG.n_layers
    for path, w in ref.items():
        want = recipe.quantize_weight(w.T).dequantize().T
        np.testing.assert_array_equal(got[path], want, err_msg=path)
    assert q.nbytes < tiny.nbytes
    assert _kl(tiny.logits(IDS[:64]), q.logits(IDS[:64])) < 0.05


def test_nvfp4_query_key_value_fuse_with_a_second_level_scale_per_row(tiny):
    """NVFP4's per-tensor scales differ between query, key and value: fused, each keeps
    its own as one per row (the same dequantized weights), and the decode products
    read them as stored (per column of the "kn" view) on the 4-bit kernel."""
    unfused = tiny.quantize(jqx.nvfp4_weight_only(), fuse=False, prepack=False)
    q = tiny.quantize(jqx.nvfp4_weight_only())
    w = q.model.blocks[0].attn.wqkv[...]
    assert w.super_block in ((1, CFG.dim), (CFG.dim, 1))  # per row; per column as "kn"
    got, want = _weights(q), _weights(unfused)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    # the same logits, fused or not (the kernel's per-column scales), to float32 rounding
    np.testing.assert_allclose(q.logits(IDS[:8]), unfused.logits(IDS[:8]), rtol=1e-5, atol=1e-5)


def test_rules_match_attribute_paths(tiny):
    q = tiny.quantize(
        {r"mlp/w_down": jqx.int8_weight_only(), r"attn/wv": None, ".*": jqx.int4_weight_only()},
        fuse=False,
    )
    b = q.model.blocks[1]
    assert b.mlp.w_down[...].format == "int8"
    assert not jqx.is_qarray(b.attn.wv[...])
    assert b.attn.wq[...].format == "uint4"


@pytest.mark.parametrize(
    "recipe",
    [
        jqx.gptq(bits=4, group_size=32, act_order=True),
        jqx.awq(bits=4, group_size=32),
        jqx.smoothquant(),
        jqx.llm_int8(),
        jqx.int8_dynamic_activation_int8_weight(),
    ],
    ids=["gptq_act_order", "awq", "smoothquant", "llm_int8", "w8a8"],
)
def test_calibrated_and_activation_recipes_run_and_stay_close(tiny, recipe):
    q = tiny.quantize(recipe, calibration_text=IDS, window=64, max_windows=2, progress=False)
    kl = _kl(tiny.logits(IDS[:64]), q.logits(IDS[:64]))
    assert kl < 0.05, kl
    g = q.generate(IDS[:5], max_new_tokens=3, stop_at_eos=False)
    assert len(g.tokens[0]) == 3


@pytest.mark.parametrize("recipe", ["int8_weight_only", "w8a8", "smoothquant"])
def test_int8_weights_are_packed_where_the_native_gemm_runs(tiny, recipe):
    """prepack=None packs the int8 (out, in) weights exactly where the native GEMM runs;
    the packed model's logits stay with the unpacked one's (weight-only: the GEMM's
    two-level split; W8A8: bit-identical products, rounding around them)."""
    r = {
        "int8_weight_only": jqx.int8_weight_only(),
        "w8a8": jqx.int8_dynamic_activation_int8_weight(),
        "smoothquant": jqx.smoothquant(),
    }[recipe]
    kw = dict(calibration_text=IDS, window=64, max_windows=2, progress=False)
    plain = tiny.quantize(r, prepack=False, **kw)
    auto = tiny.quantize(r, **kw)
    forced = tiny.quantize(r, prepack=True, **kw)

    def layouts(m):
        qs = [x for x in jax.tree_util.tree_leaves(m.params, is_leaf=jqx.is_qarray)]
        return {x.code_layout for x in qs if jqx.is_qarray(x)}

    assert layouts(plain) == {"plain"} and layouts(forced) == {"vnni"}
    native = jqx.ops.native_status() == "available"
    assert layouts(auto) == ({"vnni"} if native else {"plain"})
    assert forced.nbytes >= plain.nbytes  # the panels' padding, nothing else
    ref = np.asarray(plain.logits(IDS[:64]))
    np.testing.assert_allclose(np.asarray(forced.logits(IDS[:64])), ref, rtol=0, atol=0.05)
    g = forced.generate(IDS[:5], max_new_tokens=3, stop_at_eos=False)
    assert len(g.tokens[0]) == 3


@pytest.mark.parametrize("table", ["int8", "same"])
def test_embedding_quantized_in_rows_for_lookups_and_the_tied_head(tiny, table):
    """embedding=: the table is quantized in rows (a lookup decodes its rows, the tied
    output projection multiplies the codes), stored for the native kernels where they
    run ('vnni' int8, 'kn' 4-bit), with the same logits stored or not."""
    r4 = jqx.int4_weight_only(group_size=32)
    emb = jqx.int8_weight_only() if table == "int8" else True
    plain = tiny.quantize(r4, prepack=False, progress=False, embedding=emb)
    packed = tiny.quantize(r4, prepack=True, progress=False, embedding=emb)
    e = plain.params["embed"].get_value()
    assert jqx.is_qarray(e) and e.shape == (CFG.vocab_size, CFG.dim)
    assert e.format == ("int8" if table == "int8" else "uint4")
    assert e.block == (1, CFG.dim if table == "int8" else 32)  # rows: along the features
    ref = tiny.model.embed[...]
    err = float(jnp.abs(e.dequantize() - ref).max())
    assert err <= (0.01 if table == "int8" else 0.1) * float(jnp.abs(ref).max()), err
    assert packed.params["embed"].get_value().code_layout == ("vnni" if table == "int8" else "kn")
    assert plain.nbytes < tiny.quantize(r4, prepack=False, progress=False).nbytes
    got = np.asarray(packed.logits(IDS[:64]))
    np.testing.assert_allclose(got, np.asarray(plain.logits(IDS[:64])), rtol=0, atol=1e-4)
    assert _kl(tiny.logits(IDS[:64]), jnp.asarray(got)) < 0.05
    g = packed.generate(IDS[:5], max_new_tokens=3, stop_at_eos=False)
    assert g.tokens == plain.generate(IDS[:5], max_new_tokens=3, stop_at_eos=False).tokens


def test_gptq_beats_rtn_at_3_bits_on_the_calibration_text(tiny):
    kw = dict(calibration_text=IDS, window=128, max_windows=3, progress=False)
    ref = tiny.logits(IDS[:128])
    rtn = tiny.quantize(jqx.hqq(bits=3, group_size=32, iters=0))
    gptq = tiny.quantize(jqx.gptq(bits=3, group_size=32), **kw)
    e_rtn = float(jnp.mean((rtn.logits(IDS[:128]) - ref) ** 2))
    e_gptq = float(jnp.mean((gptq.logits(IDS[:128]) - ref) ** 2))
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


def test_transpose_qarray_keeps_in_scale_and_g_idx():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(64, 24)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(128, 64)), jnp.float32)
    f = lambda p, x: x @ p["kernel"]  # noqa: E731
    for recipe in (jqx.awq(bits=4, group_size=32), jqx.gptq(bits=4, group_size=32, act_order=True)):
        q = jqx.calibrate(f, {"kernel": w}, [x], recipe, progress=False)["kernel"]
        t = transpose_qarray(q)
        np.testing.assert_allclose(t.dequantize(), q.dequantize().T, rtol=1e-6, atol=1e-6)
        y = jqx.ops.dot_general(x, t, (((1,), (1,)), ((), ())))
        np.testing.assert_allclose(y, x @ q.dequantize(), rtol=1e-4, atol=1e-4)


def test_allocate_on_the_llm_lands_under_the_budget_and_its_rules_apply(tiny):
    cands = {"int4 g32": jqx.int4_weight_only(group_size=32), "int8": jqx.int8_weight_only()}
    plan = tiny.allocate(
        cands,
        calibration_text=IDS,
        bits_per_weight=6.0,
        window=64,
        max_windows=1,
        progress=False,
    )
    assert len(plan.choice) == 7 * CFG.n_layers
    assert plan.bits_per_weight <= 6.0
    assert set(plan.counts().values()) != {0}
    q = tiny.quantize(plan.rules, fuse=False)
    for path, name in plan.choice.items():
        i, mod, attr = path.split("/")[1:]
        leaf = getattr(getattr(q.model.blocks[int(i)], mod), attr)[...]
        assert leaf.format == cands[name].format, path


# ------------------------------------------------------------------ bad input


def test_a_recipe_that_needs_data_without_a_text_names_the_argument(tiny):
    with pytest.raises(ValueError, match="calibration_text is None"):
        tiny.quantize(jqx.gptq(bits=4, group_size=32))
    with pytest.raises(ValueError, match="calibration_text is None"):
        tiny.allocate([jqx.int8_weight_only()], bits_per_weight=8.5)
    with pytest.raises(ValueError, match="fewer than one calibration window of 256"):
        tiny.quantize(jqx.gptq(bits=4, group_size=32), calibration_text=IDS[:100])
    with pytest.raises(ValueError, match=r"\['observer'\] are jqx.calibrate options"):
        tiny.quantize(jqx.int8_weight_only(), observer="mse")


def test_bad_embedding_recipes_name_the_argument(tiny):
    with pytest.raises(ValueError, match="embedding='int8' must be None"):
        tiny.quantize(jqx.int8_weight_only(), embedding="int8")
    with pytest.raises(ValueError, match="embedding=True takes the weights' recipe"):
        tiny.quantize({".*": jqx.int8_weight_only()}, embedding=True)
    with pytest.raises(ValueError, match="LLM.int8"):
        tiny.quantize(jqx.int8_weight_only(), embedding=jqx.llm_int8())


def test_allocate_budget_below_the_smallest_candidate(tiny):
    with pytest.raises(ValueError, match="bits_per_weight=3.0 is below what the smallest"):
        tiny.allocate(
            [jqx.int4_weight_only(group_size=32)],
            calibration_text=IDS,
            bits_per_weight=3.0,
            window=64,
            max_windows=1,
            progress=False,
        )
