"""MiniLM port: reference embedding, tokenizer, shipped tiny encoder, quantized accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx_demo import minilm

needs_weights = pytest.mark.skipif(
    not minilm.weights_available(),
    reason=f"all-MiniLM-L6-v2 weights package is not installed ({minilm.INSTALL_HINT})",
)

FOX = "The quick brown fox jumps over the lazy dog."
# sentence-transformers' all-MiniLM-L6-v2 (torch) embedding of FOX, first entries.
FOX_REF = np.array([0.04393, 0.05893, 0.04818], np.float32)


@pytest.fixture(scope="module")
def real():
    if not minilm.weights_available():
        pytest.skip(f"all-MiniLM-L6-v2 weights package is not installed ({minilm.INSTALL_HINT})")
    return minilm.load_minilm()


@pytest.fixture(scope="module")
def tiny():
    return minilm.load_tiny()


def _cos(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@needs_weights
def test_reference_embedding(real):
    e = real.embed([FOX])
    np.testing.assert_allclose(e[0, :3], FOX_REF, atol=1e-4)
    assert abs(np.linalg.norm(e[0]) - 1.0) < 1e-5


@needs_weights
def test_param_count_and_selection(real):
    n = sum(x.size for x in jax.tree_util.tree_leaves(real.variables))
    assert 22_500_000 < n < 22_800_000
    # The default selection takes exactly the 6 x 6 matmul kernels.
    q = jqx.quantize(real.variables, jqx.int8_weight_only())
    kinds = [x for x in jax.tree_util.tree_leaves(q, is_leaf=jqx.is_qarray) if jqx.is_qarray(x)]
    assert len(kinds) == 36


@needs_weights
def test_padding_does_not_change_embedding(real):
    ids, mask = real.tokenize([FOX], pad_to=32)
    e = np.asarray(real.module.apply(real.variables, ids, mask))
    np.testing.assert_allclose(e[0, :3], FOX_REF, atol=1e-4)


@needs_weights
def test_quantized_minilm_cosine_bounds(real):
    sents = minilm.load_sentences(16)
    ids, mask = real.tokenize(sents, max_len=64, pad_to=64)
    ref = np.asarray(jax.jit(real.module.apply)(real.variables, ids, mask))
    fwd = jax.jit(jqx.quantized(real.module.apply))
    # Bounds from benchmarks/minilm.py on 128 sentences (int8 0.9994, int4 g32
    # 0.970) less a margin for the 16 used here.
    for recipe, bound in [
        (jqx.int8_weight_only(), 0.999),
        (jqx.int4_weight_only(group_size=32), 0.95),
    ]:
        e = np.asarray(fwd(jqx.quantize(real.variables, recipe), ids, mask))
        assert _cos(e, ref).mean() > bound, recipe.name


def test_tokenize_shapes_and_truncation(tiny):
    ids, mask = tiny.tokenize(["a b c d e f g h i j k l m n o p", "short."], max_len=8, pad_to=8)
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == np.int32
    assert mask[0].sum() == 8 and 0 < mask[1].sum() < 8
    sep = tiny.tokenizer.token_to_id("[SEP]")
    assert ids[0, -1] == sep  # truncation keeps [SEP]
    assert ids[1, mask[1].sum() - 1] == sep


def test_tokenize_rejects_a_bare_string(tiny):
    with pytest.raises(TypeError, match=r"wrap it in a list"):
        tiny.tokenize("one sentence")


def test_mean_pool_ignores_padding():
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 4)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    e = np.asarray(minilm.mean_pool(h, mask))
    want = np.asarray(h[0, :3].mean(0))
    np.testing.assert_allclose(e[0], want / np.linalg.norm(want), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-6)


def test_tiny_encoder_is_a_working_sentence_encoder(tiny):
    e = tiny.embed(["The king is dead.", "The king has died.", "Bring me more wine, boy!"])
    assert e.shape == (3, tiny.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
    assert np.all(np.isfinite(e))


def test_tiny_quantized_cosine_bounds(tiny):
    sents = minilm.load_sentences(32)
    ids, mask = tiny.tokenize(sents, max_len=64, pad_to=64)
    ref = np.asarray(jax.jit(tiny.module.apply)(tiny.variables, ids, mask))
    fwd = jax.jit(jqx.quantized(tiny.module.apply))
    # Measured (python -m jqx demo --tiny): int8 0.99995, int4 g32 0.989.
    for recipe, bound in [
        (jqx.int8_weight_only(), 0.9995),
        (jqx.int4_weight_only(group_size=32), 0.97),
    ]:
        e = np.asarray(fwd(jqx.quantize(tiny.variables, recipe), ids, mask))
        c = _cos(e, ref)
        assert c.mean() > bound, (recipe.name, c.mean())
        assert c.mean() < 1.0 - 1e-7, "quantization changed nothing: weights were not quantized"


def test_params_from_hf_names_missing_weight():
    with pytest.raises(KeyError, match=r"embeddings.word_embeddings.weight"):
        minilm.params_from_hf({}, minilm.BertConfig(num_layers=1))


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match=r"num_heads=5"):
        minilm.BertConfig(hidden_size=384, num_heads=5)


def test_sentences_are_shipped():
    s = minilm.load_sentences()
    assert len(s) >= 300 and all(len(x.split()) >= 5 for x in s)
