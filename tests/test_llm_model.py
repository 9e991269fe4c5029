"""jqx.llm.model: the Llama forward pass, RoPE, the KV cache, and quantized weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import jqx  # noqa: E402
from jqx.llm.config import LlamaConfig  # noqa: E402
from jqx.llm.model import KVCache, Llama, forward, rope  # noqa: E402

CFG = LlamaConfig(
    vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, rope_base=1e4
)


def _model(cfg=CFG, seed=0):
    return Llama(cfg, rngs=nnx.Rngs(seed))


# Jitted once per shape: op-by-op (eager) the tiny model compiles each primitive
# separately, which made these tests the suite's slowest.
_forward = jax.jit(forward, static_argnames=("logits", "scan"))
# start as a Python int: the prefill's program (static start; the one that can scan)
_prefill = jax.jit(forward, static_argnames=("start", "logits", "scan"))


def _score(model, tokens):
    pad = jnp.zeros((tokens.shape[0],), jnp.int32)
    return _forward(model, tokens, None, start=0, pad=pad)[0]


# ------------------------------------------------------------------ config


def test_config_from_real_metadata_and_errors():
    meta = {
        "general.architecture": "llama",
        "llama.block_count": 30,
        "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.rope.freq_base": 100000.0,
        "llama.vocab_size": 49152,
    }
    c = LlamaConfig.from_gguf_metadata(meta)
    assert (c.head_dim, c.group_size, c.rope_base, c.n_layers) == (64, 3, 1e5, 30)
    with pytest.raises(ValueError, match=r"general.architecture='gpt2'.*supported: llama"):
        LlamaConfig.from_gguf_metadata({**meta, "general.architecture": "gpt2"}, source="m.gguf")
    bad = dict(meta)
    del bad["llama.block_count"]
    with pytest.raises(ValueError, match=r"m.gguf: the metadata key 'llama.block_count'"):
        LlamaConfig.from_gguf_metadata(bad, source="m.gguf")
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of n_kv_heads=3"):
        LlamaConfig(vocab_size=8, dim=8, n_layers=1, n_heads=4, n_kv_heads=3, hidden_dim=8)


# ------------------------------------------------------------------ rope


def test_structure_only_model_has_shapes_and_no_values():
    """Llama(rngs=None), what load_llm fills from a file: every weight a ShapeDtypeStruct
    of the randomly initialised model's shape; the norms are ones."""
    abstract, real = Llama(CFG, rngs=None), _model()
    a, r = nnx.state(abstract), nnx.state(real)
    pairs = list(zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(r), strict=True))
    assert len(pairs) == 2 + CFG.n_layers * 9
    for x, y in pairs:
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
        assert isinstance(x, jax.ShapeDtypeStruct) == (x.ndim == 2)
    np.testing.assert_array_equal(abstract.norm.weight[...], np.ones(CFG.dim, np.float32))


@settings(max_examples=20, deadline=None)
@given(m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(0, 300))
def test_rope_is_a_rotation_that_depends_on_relative_position(m, n, shift):
    rng = np.random.default_rng(m * 1000 + n)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def at(x, p):
        return rope(x, jnp.array([[p]]), 1e4, 16)

    # norm preserved
    np.testing.assert_allclose(jnp.linalg.norm(at(q, m)), jnp.linalg.norm(q), rtol=1e-5)
    # <R_m q, R_n k> == <R_{m+s} q, R_{n+s} k>
    a = float(jnp.vdot(at(q, m), at(k, n)))
    b = float(jnp.vdot(at(q, m + shift), at(k, n + shift)))
    assert abs(a - b) <= 1e-3 * (1 + abs(a))


def test_rope_rotates_adjacent_pairs_like_llama_cpp():
    # position 1, first pair has frequency 1: (x0, x1) -> (x0 cos1 - x1 sin1, x0 sin1 + x1 cos1)
    x = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0)
    y = np.asarray(rope(x, jnp.array([[1]]), 1e4, 4))[0, 0, 0]
    np.testing.assert_allclose(y, [np.cos(1.0), np.sin(1.0), 0, 0], atol=1e-6)


# ------------------------------------------------------------------ cache


def test_prefill_plus_decode_equals_full_forward():
    model = _model()
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    full = _score(model, toks)
    cache = KVCache.init(CFG, batch=2, max_len=32)
    pad = jnp.zeros((2,), jnp.int32)
    logits, cache = _forward(model, toks[:, :7], cache, start=0, pad=pad)
    np.testing.assert_allclose(logits, full[:, :7], atol=2e-4, rtol=2e-4)
    for t in range(7, 12):
        lg, cache = _forward(
            model, toks[:, t : t + 1], cache, start=jnp.int32(t), pad=pad, logits="last"
        )
        np.testing.assert_allclose(lg, full[:, t], atol=2e-4, rtol=2e-4)


def test_left_padding_is_masked():
    model = _model()
    rng = np.random.default_rng(1)
    a = rng.integers(0, CFG.vocab_size, 5)
    b = rng.integers(0, CFG.vocab_size, 9)
    toks = np.zeros((2, 9), np.int32)
    toks[0, 4:] = a
    toks[0, :4] = 7  # garbage in the padding must not matter
    toks[1] = b
    cache = KVCache.init(CFG, batch=2, max_len=16)
    pad = jnp.array([4, 0], jnp.int32)
    lg, cache = _forward(model, jnp.asarray(toks), cache, start=0, pad=pad, logits="last")
    alone = _score(model, jnp.asarray(a[None]))[0, -1]
    np.testing.assert_allclose(lg[0], alone, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(lg[1], _score(model, jnp.asarray(b[None]))[0, -1], atol=2e-4)
    # one decode step continues both
    nxt = jnp.array([3, 5], jnp.int32)
    lg2, _ = _forward(model, nxt[:, None], cache, start=jnp.int32(9), pad=pad, logits="last")
    alone2 = _score(model, jnp.asarray(np.append(a, 3)[None]))[0, -1]
    np.testing.assert_allclose(lg2[0], alone2, atol=2e-4, rtol=2e-4)


def _mixed_model():
    """Five blocks: 0-1 float, 2 int8 per row, 3-4 float: three runs (2, 1, 2)."""
    cfg = LlamaConfig(
        vocab_size=96, dim=64, n_layers=5, n_heads=4, n_kv_heads=2, hidden_dim=128, rope_base=1e4
    )
    model = _model(cfg, seed=3)
    gd, state = nnx.split(model)
    recipe = jqx.weight_only("int8", granularity=jqx.per_channel(axis=0))
    qstate = jqx.quantize(
        state, recipe, filter_fn=lambda path, leaf: leaf.ndim == 2 and "blocks/2/" in path
    )
    return cfg, nnx.merge(gd, qstate)


@pytest.mark.parametrize("cache_format", [None, "float", "float16", "int8", "int4"])
def test_scanned_blocks_equal_unrolled_bit_for_bit(cache_format):
    """forward(scan=True) runs each run of identically laid-out blocks as one lax.scan:
    logits and every cache array are the unrolled program's, bit for bit, also when the
    blocks differ in format (runs of 2, 1 and 2 blocks here)."""
    from jqx.llm.model import _runs

    cfg, model = _mixed_model()
    assert _runs([nnx.split(b) for b in model.blocks]) == [(0, 2), (2, 3), (3, 5)]
    toks = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    pad = jnp.array([3, 0], jnp.int32)
    if cache_format is None:
        cache = None
    elif cache_format.startswith("float"):
        dtype = jnp.float16 if cache_format == "float16" else jnp.float32
        cache = KVCache.init(cfg, batch=2, max_len=16, dtype=dtype)
    else:
        fmt = jqx.llm.KVFormat(cache_format, group=8) if cache_format == "int4" else cache_format
        cache = KVCache.init(cfg, batch=2, max_len=16, format=fmt)
    got = _prefill(model, toks, cache, start=0, pad=pad, scan=True)
    ref = _prefill(model, toks, cache, start=0, pad=pad, scan=False)
    # every cache array too: a decode step after either prefill reads the same bits
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scan_default_is_scoring_only():
    """The default scans a call without a cache (scoring) and unrolls a prefill: the
    scanned program holds a while loop, the unrolled one none."""
    cfg, model = _mixed_model()
    toks = jnp.zeros((1, 4), jnp.int32)
    pad = jnp.zeros((1,), jnp.int32)
    cache = KVCache.init(cfg, batch=1, max_len=8)

    def hlo(c, **kw):
        f = jax.jit(lambda m, t, c: forward(m, t, c, start=0, pad=pad, **kw))
        return f.lower(model, toks, c).as_text()

    assert "while" in hlo(None)
    assert "while" not in hlo(cache)
    assert "while" in hlo(cache, scan=True)
    assert "while" not in hlo(None, scan=False)


def test_cache_bytes():
    cache = KVCache.init(CFG, batch=3, max_len=40)
    assert cache.nbytes == 2 * CFG.n_layers * 3 * CFG.n_kv_heads * 40 * CFG.head_dim * 4
    assert cache.max_len == 40


# ------------------------------------------------------------------ quantized weights


def test_quantized_weights_run_through_jqx_ops_and_bound_the_error():
    """Weights stored (out, in) as QArrays (here jqx's own int8 per-row) give logits close
    to the float model's; the embedding lookup reads rows of the QArray."""
    model = _model()
    gd, state = nnx.split(model)

    def q8(path, leaf):
        return leaf.ndim == 2

    qstate = jqx.quantize(
        state, jqx.weight_only("int8", granularity=jqx.per_channel(axis=0)), filter_fn=q8
    )
    leaves = jax.tree_util.tree_leaves(qstate, is_leaf=jqx.core.qarray.is_qarray)
    assert sum(isinstance(x, jqx.QArray) for x in leaves) == 1 + CFG.n_layers * 7
    qmodel = nnx.merge(gd, qstate)
    toks = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (1, 10)), jnp.int32)
    ref = _score(nnx.merge(gd, state), toks)
    got = jax.jit(lambda m, t: _score(m, t))(qmodel, toks)
    err = float(jnp.abs(got - ref).max())
    assert err <= 0.05 * float(jnp.abs(ref).max()), err


def test_take_reads_rows_of_a_quantized_table():
    table = jnp.asarray(np.random.default_rng(3).normal(size=(50, 64)), jnp.float32)
    for recipe in (
        jqx.weight_only("int8", granularity=jqx.per_channel(axis=0)),
        jqx.weight_only("int8", granularity=jqx.per_channel(axis=1)),
        jqx.weight_only("uint4", scheme="zero_point", granularity=jqx.per_group(32, axis=1)),
    ):
        q = recipe.quantize_weight(table)
        ids = jnp.array([[0, 49], [7, 7]])
        got = jqx.ops.take(q, ids)
        np.testing.assert_array_equal(got, q.dequantize()[ids])
    with pytest.raises(ValueError, match="ids must be an integer array"):
        jqx.ops.take(q, jnp.array([1.0]))
