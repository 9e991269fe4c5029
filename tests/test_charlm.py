"""The Shakespeare char LM evaluation bed: data, model, checkpoint, evaluation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jqx
from jqx import mixed_precision as mp
from jqx_demo import charlm
from jqx_demo.shakespeare import (
    VAL_WORKS,
    VOCAB,
    decode,
    encode,
    eval_windows,
    load_shakespeare,
    sample_batch,
)

TINY = charlm.CharLMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=16)
# The float forward, compiled once for the (2, 16) tokens every test uses: eager, each
# op of the model would be dispatched (and compiled) on its own in every test.
APPLY = jax.jit(charlm.apply_fn(TINY))


@pytest.fixture(scope="module")
def tiny():
    model = charlm.CharLM(TINY, rngs=nnx.Rngs(0))
    return model, charlm.get_params(model)


@pytest.fixture(scope="module")
def data():
    return load_shakespeare()


def tokens(seed=0, b=2, t=16):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, len(VOCAB), dtype=jnp.int32)


# ---------------------------------------------------------------- data


def test_corpus_split_and_vocab(data):
    assert len(VOCAB) == 84 and len(set(VOCAB)) == 84
    assert data.vocab == VOCAB
    assert data.train.dtype == np.int32 and data.val.dtype == np.int32
    assert 0 <= data.train.min() and data.train.max() < 84 and data.val.max() < 84
    n = len(data.train) + len(data.val)
    assert 4_500_000 < n < 5_500_000
    assert 0.07 < len(data.val) / n < 0.15  # four held-out plays, about 10%
    # Every character of the vocabulary occurs in the corpus.
    assert len(np.unique(np.concatenate([data.train, data.val]))) == 84
    assert len(VAL_WORKS) == 4
    # Validation starts with the first held-out play, unseen in training.
    head = decode(data.val[:200])
    assert "TROILUS" in head.upper()
    train_text_sample = decode(data.train[:2_000_000])
    assert head[:120] not in train_text_sample


def test_encode_decode_and_errors():
    s = "To be, or not to be: that is the question.\n"
    assert decode(encode(s)) == s
    with pytest.raises(ValueError, match="not in the 84-character"):
        encode("café")


def test_batches_are_shifted_windows(data):
    w = sample_batch(data.train, 3, 16, np.random.default_rng(0))
    assert w.shape == (3, 17) and w.dtype == np.int32
    # Each window is a contiguous slice (checked on ids that are their own offsets).
    ramp = sample_batch(np.arange(1000, dtype=np.int32), 8, 16, np.random.default_rng(1))
    assert np.all(np.diff(ramp, axis=1) == 1)
    ev = eval_windows(data.val, 16, 5)
    np.testing.assert_array_equal(ev.reshape(-1), data.val[: 5 * 17])
    with pytest.raises(ValueError, match="seq_len"):
        sample_batch(data.train[:10], 1, 16, np.random.default_rng(0))


# ---------------------------------------------------------------- model


def test_apply_fn_matches_module_and_is_causal(tiny):
    model, params = tiny
    t = tokens()
    f = APPLY
    out = f(params, t)
    assert out.shape == (2, 16, 84) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(t)), rtol=1e-5, atol=1e-5)
    # Changing the last token must not change any earlier position's logits.
    t2 = t.at[:, -1].set((t[:, -1] + 1) % 84)
    out2 = f(params, t2)
    np.testing.assert_allclose(np.asarray(out2[:, :-1]), np.asarray(out[:, :-1]), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(out2[:, -1] - out[:, -1]))) > 1e-4


def test_untrained_loss_is_about_log_vocab(tiny):
    _, params = tiny
    w = jnp.asarray(np.random.default_rng(0).integers(0, 84, (4, 17)), jnp.int32)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, w: charlm.loss_fn(p, w, TINY)))(params, w)
    assert abs(float(loss) - math.log(84)) < 0.1
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_default_selection_finds_exactly_the_matmul_kernels(tiny):
    _, params = tiny
    q = jqx.quantize(params, jqx.int8_weight_only())
    quantized = sorted(
        jqx.path_str(p)
        for p, leaf in jax.tree_util.tree_flatten_with_path(q, is_leaf=jqx.is_qarray)[0]
        if jqx.is_qarray(leaf)
    )
    expected = sorted(
        [
            f"blocks/{i}/{m}"
            for i in range(2)
            for m in ("attn/qkv/kernel", "attn/out/kernel", "mlp/fc1/kernel", "mlp/fc2/kernel")
        ]
        + ["head/kernel"]
    )
    assert quantized == expected


def test_int8_weights_stay_close_to_float(tiny):
    _, params = tiny
    t = tokens(1)
    ref = APPLY(params, t)
    deq = jqx.dequantize(jqx.quantize(params, jqx.int8_weight_only()))
    out = APPLY(deq, t)
    assert float(jnp.max(jnp.abs(out - ref))) < 0.02 * float(jnp.max(jnp.abs(ref)))


def test_runs_under_jqx_quantized(tiny):
    _, params = tiny
    t = tokens(2)
    ref = APPLY(params, t)
    q = jqx.quantize(params, jqx.int8_weight_only())
    out = jax.jit(jqx.quantized(charlm.apply_fn(TINY)))(q, t)
    assert out.shape == ref.shape
    assert float(jnp.max(jnp.abs(out - ref))) < 0.02 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("spec, tol", [("bf16", 0.05), ("fp16", 0.01)])
def test_half_precision_forward_close_to_f32(tiny, spec, tol):
    """Runs under strict dtype promotion: every mixed-dtype op in the model is explicit."""
    _, params = tiny
    t = tokens(3)
    ref = APPLY(params, t)
    out = jax.jit(mp.get_policy(spec).apply(charlm.apply_fn(TINY)))(params, t)
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) < tol * float(jnp.max(jnp.abs(ref)))


def test_config_and_input_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="n_heads=3 does not divide d_model=32"):
        charlm.CharLMConfig(d_model=32, n_heads=3)
    with pytest.raises(ValueError, match="max_len=16"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="int array"):
        model(jnp.zeros((1, 4), jnp.float32))


# ---------------------------------------------------------------- checkpoint + evaluation


def test_checkpoint_roundtrip_and_errors(tiny, tmp_path):
    model, params = tiny
    path = tmp_path / "lm.safetensors"
    charlm.save_checkpoint(model, path, steps=7)
    cfg, loaded, meta = charlm.load_params(path)
    assert cfg == TINY and meta["steps"] == 7
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    m2 = charlm.load_checkpoint(path)
    np.testing.assert_array_equal(np.asarray(m2(tokens())), np.asarray(model(tokens())))

    with pytest.raises(FileNotFoundError, match="train_charlm.py"):
        charlm.load_params(tmp_path / "absent.safetensors")
    # A checkpoint whose shapes disagree with its config is refused by name.
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        meta_raw = f.metadata()
    arrays["head/kernel"] = arrays["head/kernel"][:, :80]
    bad = tmp_path / "bad.safetensors"
    save_file(arrays, str(bad), metadata=meta_raw)
    with pytest.raises(ValueError, match="head/kernel has shape"):
        charlm.load_params(bad)


def test_evaluate_pads_the_last_batch_exactly(tiny, data):
    model, params = tiny
    f = charlm.apply_fn(TINY)
    a = charlm.evaluate(lambda t: f(params, t), data.val, seq_len=16, n_windows=6, batch_size=4)
    b = charlm.evaluate(model, data.val, seq_len=16, n_windows=6, batch_size=6)
    assert abs(a[0] - b[0]) < 1e-5
    assert abs(a[1] - a[0] / math.log(2)) < 1e-9


def test_cached_checkpoint_beats_the_bigram_model(data):
    """The committed checkpoint loads and scores well below the bigram model's 3.67 bits/char."""
    cfg, params, meta = charlm.load_params()
    assert cfg == charlm.CharLMConfig()
    loss, bpc = charlm.evaluate(lambda t: charlm.apply_fn(cfg)(params, t), data.val)
    assert bpc < 3.0, bpc
    # The same windows as training's final evaluation: the same number up to f32 noise.
    assert abs(bpc - meta["val_bits_per_char"]) < 1e-3
