"""The ordinary BERT ports (jqx_demo.bert) match the tuned MiniLM port, float and quantized."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx.kernels.cpu import native
from jqx_demo import bert, minilm

SENTENCES = minilm.load_sentences(6) + ["Short.", "A somewhat longer sentence, with punctuation!"]


@pytest.fixture(scope="module")
def tiny():
    return minilm.load_tiny()


@pytest.fixture(scope="module")
def real():
    if not minilm.weights_available():
        pytest.skip(f"all-MiniLM-L6-v2 weights package is not installed ({minilm.INSTALL_HINT})")
    return minilm.load_minilm()


def _cos(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _same_embeddings(enc, port):
    ref = enc.embed(SENTENCES)
    got = bert.load_port(port, enc).embed(SENTENCES)
    assert got.shape == ref.shape
    # Same function, different association order of the float sums.
    np.testing.assert_allclose(got, ref, atol=2e-6)


@pytest.mark.parametrize("port", bert.PORTS)
def test_tiny_ports_match_tuned_port(tiny, port):
    _same_embeddings(tiny, port)


@pytest.mark.parametrize("port", bert.PORTS)
def test_minilm_ports_match_tuned_port(real, port):
    _same_embeddings(real, port)


@pytest.mark.parametrize("port", bert.PORTS)
def test_padding_does_not_change_embedding(tiny, port):
    p = bert.load_port(port, tiny)
    ids, mask = p.tokenize(SENTENCES[:1])
    pids, pmask = p.tokenize(SENTENCES[:1], pad_to=ids.shape[1] + 9)
    a = np.asarray(p.module.apply(p.variables, ids, mask))
    b = np.asarray(p.module.apply(p.variables, pids, pmask))
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("port", bert.PORTS)
def test_quantized_ports_select_every_matmul_and_stay_close(tiny, port):
    # The linen port's attention kernels are 3-D (nn.DenseGeneral); the default
    # selection must still take all of them, and the error bound must hold.
    p = bert.load_port(port, tiny)
    ref = tiny.embed(SENTENCES)
    ids, mask = p.tokenize(SENTENCES)
    fwd = jax.jit(jqx.quantized(p.module.apply))
    for recipe, bound in (
        (jqx.int8_weight_only(), 0.999),
        (jqx.int8_dynamic_activation_int8_weight(), 0.99),
    ):
        q = jqx.quantize(p.variables, recipe)
        leaves = jax.tree_util.tree_leaves(q, is_leaf=jqx.is_qarray)
        assert sum(jqx.is_qarray(x) for x in leaves) == 6 * tiny.config.num_layers
        assert _cos(np.asarray(fwd(q, ids, mask)), ref).min() > bound


@pytest.mark.parametrize("port", bert.PORTS)
def test_every_port_attention_runs_on_the_scores_kernel(tiny, port):
    # However the attention is written (einsum and jax.nn.softmax, flax.linen's layer,
    # jax.nn.dot_product_attention), jqx.quantized runs it on the native kernel from q
    # and k where that kernel is built.
    if not native.gguf_available():
        pytest.skip(native.gguf_status())
    p = bert.load_port(port, tiny)
    ids, mask = p.tokenize(SENTENCES)
    q = jqx.quantize(p.variables, jqx.int8_dynamic_activation_int8_weight())
    text = str(jax.make_jaxpr(jqx.quantized(p.module.apply))(q, ids, mask))
    targets = (native.SCORES_SOFTMAX_DOT_TARGET, native.SCORES_SOFTMAX_DOT_AVX512_TARGET)
    calls = re.findall(r"\bjqx_\w+", text)
    assert sum(c in targets for c in calls) == tiny.config.num_layers


def test_variables_are_the_tuned_arrays(tiny):
    v = bert.linen_variables(tiny.variables, tiny.config)["params"]["layer_1"]["attention"]
    k = np.asarray(tiny.variables["params"]["bert"]["layer_1"]["query"]["kernel"])
    np.testing.assert_array_equal(np.asarray(v["query"]["kernel"]).reshape(k.shape), k)


def test_hf_state_dict_round_trips(tiny):
    sd = bert.hf_state_dict(tiny.variables, tiny.config)
    back = minilm.params_from_hf(sd, tiny.config)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        jax.tree_util.tree_map(np.asarray, back),
        jax.tree_util.tree_map(np.asarray, tiny.variables),
    )


def test_errors_teach(tiny):
    with pytest.raises(ValueError, match=r"port='bart'.*\('plain', 'linen', 'sdpa'\)"):
        bert.load_port("bart", tiny)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"attention='flash' is not one of \('einsum'"):
        bert.PlainBert(tiny.config, "flash").init(jax.random.key(0), ids, ids)
    with pytest.raises(ValueError, match="minilm.load_tiny"):
        bert.plain_variables({"params": {}}, tiny.config)
    with pytest.raises(ValueError, match="num_layers=6"):
        bert.linen_variables(tiny.variables, minilm.MINILM_L6)


def test_torch_bert_matches(tiny):
    torch = pytest.importorskip(
        "torch", reason="torch is a benchmark extra (pip install jqx[bench])"
    )
    pytest.importorskip("transformers", reason="transformers is only needed for the torch peer")
    ids, mask = tiny.tokenize(SENTENCES)
    with torch.no_grad():
        got = bert.torch_bert(tiny)(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
    np.testing.assert_allclose(got.numpy(), tiny.embed(SENTENCES), atol=2e-6)
