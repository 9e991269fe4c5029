"""Quantized KV caches: the int8 / fp8 / int4 (KIVI) formats, attention on their codes
(XLA and the native kernel), the cache's bytes, generation and perplexity through them,
and bad input. Small random shapes and a two-layer model; the real-model check is in
tests/test_llm.py (its module fixture holds the model)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("tokenizers")
from flax import nnx  # noqa: E402

from jqx.core import numerics  # noqa: E402
from jqx.kernels.cpu import native  # noqa: E402
from jqx.llm import LLM, KVCache, KVFormat, Llama, LlamaConfig  # noqa: E402
from jqx.llm.model import forward  # noqa: E402
from jqx.ops import attention as A  # noqa: E402

B, H, KVH, D = 2, 6, 2, 32
PAD = jnp.array([3, 0], jnp.int32)
needs_native = pytest.mark.skipif(
    not native.gguf_available(), reason=f"native attention kernel: {native.gguf_status()}"
)


# Jitted, so that each helper compiles once per shape instead of op by op.
_write_block = jax.jit(A.kv_write, static_argnums=2)
_write_token = jax.jit(A.kv_write)
_dequantize = jax.jit(A.kv_dequantize, static_argnums=1)
_attend_xla = jax.jit(functools.partial(A.decode_attention, backend="xla"))


def _x(seed, n, scale=1.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray((rng.standard_normal((B, KVH, n, D)) * scale).astype(np.float32))


def _cache(
    kind, n_slots, n_written, group=16, seed=0, decode_steps=0, value_window=True, rotate=False
):
    """Keys and values of n_written tokens: a prefill, then single-token decode writes."""
    k_x, v_x = _x(seed, n_written), _x(seed + 1, n_written)
    kw = dict(group=group, value_window=value_window, rotate=rotate)
    k = A.kv_init(kind, "k", (B, KVH, n_slots, D), **kw)
    v = A.kv_init(kind, "v", (B, KVH, n_slots, D), **kw)
    t0 = n_written - decode_steps
    k, v = _write_block(k, k_x[:, :, :t0], 0, PAD), _write_block(v, v_x[:, :, :t0], 0, PAD)
    for t in range(t0, n_written):
        k = _write_token(k, k_x[:, :, t : t + 1], jnp.int32(t), PAD)
        v = _write_token(v, v_x[:, :, t : t + 1], jnp.int32(t), PAD)
    return k, v, k_x, v_x


def _float_attention(q, k, v, hi):
    return _attend_xla(q, k, v, PAD, hi)


# ------------------------------------------------------------------ formats


def test_int8_per_token_absmax_error_bound_and_bytes():
    x = _x(0, 9).at[0, 0, 4].set(0.0).at[1, 1, 5].set(0.75)  # a zero and a constant token
    c = _write_block(A.kv_init("int8", "k", (B, KVH, 16, D)), x, 0, PAD)
    s = c.scale[:, :, :9].astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    # the stored scale is max|x| / 127 rounded to float16; a constant token's is |c|
    # (1 for zeros), so it reconstructs exactly (the seed formulas' rule)
    want = (amax / 127).at[0, 0, 4].set(1.0).at[1, 1, 5].set(0.75)
    np.testing.assert_allclose(s, want, rtol=2**-11)
    err = jnp.abs(_dequantize(c, 9) - x)
    assert bool((err <= 0.5 * s[..., None] * (1 + 1e-3)).all())
    assert float(err[0, 0, 4].max()) == 0.0 and float(err[1, 1, 5].max()) == 0.0
    assert c.nbytes == B * KVH * 16 * (D + 2)  # int8 codes plus a float16 scale per slot


def test_fp8_scale_is_fixed_by_the_prefill_and_later_tokens_saturate():
    x = _x(1, 8)
    c = _write_block(A.kv_init("fp8", "v", (B, KVH, 16, D)), x, 0, PAD)
    valid = (jnp.arange(8)[None, :] >= PAD[:, None])[:, None, :, None]
    amax = jnp.max(jnp.where(valid, jnp.abs(x), 0.0), axis=(2, 3))
    np.testing.assert_allclose(c.scale, amax * A.FP8_HEADROOM / 448, rtol=1e-6)
    err = jnp.abs(_dequantize(c, 8) - x)
    # E4M3: 3 mantissa bits (relative half-step 2**-4), subnormal steps of 2**-9 * scale
    bound = jnp.maximum(2**-4 * jnp.abs(x), 2**-10 * c.scale[:, :, None, None])
    assert bool((jnp.where(valid, err - bound, 0.0) <= 1e-7).all())
    # a later token keeps the scale; one far above the headroom saturates, finite
    big = jnp.full((B, KVH, 1, D), 1e6, jnp.float32)
    c2 = _write_token(c, big, jnp.int32(8), PAD)
    np.testing.assert_array_equal(c2.scale, c.scale)
    top = _dequantize(c2, 9)[:, :, 8]
    np.testing.assert_allclose(top, jnp.broadcast_to(448 * c.scale[..., None], top.shape))


@pytest.mark.parametrize("decode_steps", [0, 11])
def test_int4_kivi_groups_residual_and_error_bound(decode_steps):
    """Keys per channel over 16 tokens, values per token over 16 channels; the 3 tokens
    after the last whole group stay float. Writing token by token gives the same cache
    contents as one block (group 2 is completed by a decode step when decode_steps=11)."""
    k, v, kx, vx = _cache("int4", 64, 35, group=16, decode_steps=decode_steps)
    assert k.codes.shape == (B, KVH, 64, D // 2) and k.scale.shape == (B, KVH, 4, D)
    assert v.scale.shape == (B, KVH, 64, D // 16) and k.residual.shape == (B, KVH, 16, D)
    np.testing.assert_array_equal(k.residual[:, :, :3], kx[:, :, 32:35])  # float window
    kd, vd = _dequantize(k, 35), _dequantize(v, 35)
    valid = (jnp.arange(35)[None, :] >= PAD[:, None])[:, None, :, None]
    ks = jnp.repeat(k.scale[:, :, :3].astype(jnp.float32), 16, axis=2)
    vs = jnp.repeat(v.scale[:, :, :35].astype(jnp.float32), 16, axis=3)
    for got, want, s in ((kd[:, :, :32], kx[:, :, :32], ks), (vd[:, :, :32], vx[:, :, :32], vs)):
        err = jnp.where(valid[:, :, :32], jnp.abs(got - want) - 0.5 * s[:, :, :32] * 1.01, 0)
        assert float(err.max()) <= 1e-6
    if decode_steps:  # token by token == one block
        k1, v1, _, _ = _cache("int4", 64, 35, group=16)
        np.testing.assert_allclose(_dequantize(k1, 35), kd, atol=1e-6)
        np.testing.assert_allclose(_dequantize(v1, 35), vd, atol=1e-6)
        # the group a decode step completed holds the block write's codes and scales ...
        for a, b in ((k, k1), (v, v1)):
            np.testing.assert_array_equal(a.codes[:, :, :32], b.codes[:, :, :32])
            np.testing.assert_array_equal(
                a.scale[:, :, : a.scale.shape[2] // 2], b.scale[:, :, : b.scale.shape[2] // 2]
            )
        # ... and the decode steps of the unfinished group wrote no codes (read from the
        # residual until the group is complete)
        assert not np.asarray(k.codes[:, :, 32:]).any() and not np.asarray(v.codes[:, :, 32:]).any()


@pytest.mark.parametrize("decode_steps", [0, 11])
def test_int4_values_without_a_window_are_quantized_when_written(decode_steps):
    """value_window=False: the keys keep their window, each token's values are codes at
    once (per token over 16 channels), within half a step of the float values at every
    written slot, and token by token gives the block write's codes and scales bit for
    bit."""
    k, v, kx, vx = _cache("int4", 64, 35, decode_steps=decode_steps, value_window=False)
    assert v.residual is None and k.residual.shape == (B, KVH, 16, D)
    assert v.nbytes == B * KVH * 64 * (D // 2 + 2 * 2 * (D // 16))  # codes, scale, zero
    vd = _dequantize(v, 35)
    valid = (jnp.arange(35)[None, :] >= PAD[:, None])[:, None, :, None]
    vs = jnp.repeat(v.scale[:, :, :35].astype(jnp.float32), 16, axis=3)
    err = jnp.where(valid, jnp.abs(vd - vx) - 0.5 * vs * 1.01, 0)
    assert float(err.max()) <= 1e-6 and float(jnp.abs(vd - vx).max()) > 0
    assert not np.asarray(v.codes[:, :, 35:]).any()  # nothing past the written slots
    _, v1, _, _ = _cache("int4", 64, 35, value_window=False)  # one block
    for name in ("codes", "scale", "zero"):
        np.testing.assert_array_equal(getattr(v, name), getattr(v1, name))
    # the keys are the windowed cache's, bit for bit
    k2, _, _, _ = _cache("int4", 64, 35, decode_steps=decode_steps)
    for name in ("codes", "scale", "zero", "residual"):
        np.testing.assert_array_equal(getattr(k, name), getattr(k2, name))


def test_int4_key_ranges_leave_padding_out():
    x = _x(2, 16).at[0, :, 0].set(1e4)  # slot 0 of sequence 0 is padding (PAD[0] = 3)
    c = _write_block(A.kv_init("int4", "k", (B, KVH, 16, D), group=16), x, 0, PAD)
    assert float(jnp.max(c.scale[0].astype(jnp.float32))) < 1.0  # not 1e4 / 15


# ------------------------------------------------------------------ attention on codes


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
def test_attention_on_codes_equals_dequantized_and_bounds_float(kind):
    k, v, kx, vx = _cache(kind, 80, 70, decode_steps=4)
    q = jnp.asarray(np.random.default_rng(3).standard_normal((B, H, D)).astype(np.float32))
    hi = jnp.full((B,), 70, jnp.int32)
    out = _attend_xla(q, k, v, PAD, hi)
    deq = _float_attention(q, _dequantize(k, 70), _dequantize(v, 70), hi)
    np.testing.assert_allclose(out, deq, atol=2e-6, rtol=1e-5)
    ref = _float_attention(q, kx, vx, hi)
    bound = {"int8": 0.02, "fp8": 0.1, "int4": 0.2}[kind]
    assert float(jnp.abs(out - ref).max()) <= bound * float(jnp.abs(ref).max())


@needs_native
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("n", [70, 600])  # 600: several parts per head, merged
def test_native_equals_xla(kind, n):
    k, v, _, _ = _cache(kind, 640, n, decode_steps=2, seed=n)
    q = jnp.asarray(np.random.default_rng(4).standard_normal((B, H, D)).astype(np.float32))
    lo = jnp.array([3, 17], jnp.int32)
    hi = jnp.array([n, n - 5], jnp.int32)
    got = A.decode_attention(q, k, v, lo, hi, backend="native")
    want = _attend_xla(q, k, v, lo, hi)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-5)
    ref = native.decode_attention_quantized_reference(
        q, k.codes, k.scale, v.codes, v.scale, lo, hi, scale=D**-0.5
    )
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=2e-5)
    # nothing visible: zeros
    empty = A.decode_attention(q, k, v, hi, hi, backend="native")
    assert float(jnp.abs(empty).max()) == 0.0


@needs_native
def test_native_is_the_default_for_int8_fp8_and_int4():
    k8, _, _, _ = _cache("int8", 16, 4)
    k4, _, _, _ = _cache("int4", 16, 4)
    q = jnp.zeros((B, H, D), jnp.float32)
    from jqx.ops import dispatch

    assert dispatch.choose_attention(q, k8) == "native"
    assert dispatch.choose_attention(q, k4) == "native"  # jqx_decode_attention_int4
    assert dispatch.choose_attention(q, k4, "xla") == "xla"
    with pytest.raises(RuntimeError, match="int8/fp8/int4 quantized ones"):
        dispatch.choose_attention(jnp.zeros((B, 5, D), jnp.float32), k4, "native")


@needs_native
@pytest.mark.parametrize("value_window", [True, False])
@pytest.mark.parametrize(
    "n, decode_steps",
    [(35, 1), (35, 18), (32, 16)],  # the last: a decode write completes group 16..31
)
def test_native_int4_equals_xla(n, decode_steps, value_window):
    k, v, _, _ = _cache(
        "int4", 64, n, decode_steps=decode_steps, seed=decode_steps, value_window=value_window
    )
    q = jnp.asarray(np.random.default_rng(5).standard_normal((B, H, D)).astype(np.float32))
    for hi in ([n, n], [n, n - 1]):
        hi = jnp.array(hi, jnp.int32)
        got = A.decode_attention(q, k, v, PAD, hi, backend="native")
        np.testing.assert_allclose(got, _attend_xla(q, k, v, PAD, hi), atol=2e-6, rtol=2e-5)


# ------------------------------------------------------------------ rotated caches


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
def test_rotated_cache_reads_back_and_attends_as_its_dequantized_floats(kind):
    """A rotated layer stores Hadamard-rotated codes: kv_dequantize rotates them back
    (the error bound of the plain format, in norm), and attention on the codes (the
    query and the output rotated) equals float attention over those floats."""
    k, v, kx, vx = _cache(kind, 80, 70, decode_steps=4, rotate=True)
    assert k.rotated and v.rotated
    plain, _, _, _ = _cache(kind, 80, 70, decode_steps=4)
    deq = _dequantize(k, 70)
    err = jnp.linalg.norm(deq - kx, axis=-1) / jnp.linalg.norm(kx, axis=-1)
    # int8: half a step of max|x| / 127 per channel, sqrt(D) / 254 in norm; fp8: E4M3's
    # relative half-step 2**-4 (no value is near the subnormals here); int4 (range
    # over 16 tokens per channel): within 1.5x the plain format's error
    plain_err = jnp.linalg.norm(_dequantize(plain, 70) - kx, axis=-1)
    bound = {"int8": D**0.5 / 254, "fp8": 2**-4, "int4": None}[kind]
    if bound is None:
        assert float(jnp.linalg.norm(deq - kx, axis=-1).max()) <= 1.5 * float(plain_err.max())
    else:
        assert float(err.max()) <= bound
    # the stored codes are those of the rotated keys (not of the keys)
    rot = A.kv_dequantize(dataclasses.replace(k, rotated=False), 70)
    np.testing.assert_allclose(rot, numerics.hadamard_rotate(deq), atol=1e-5)
    assert not np.array_equal(np.asarray(k.codes), np.asarray(plain.codes))
    q = jnp.asarray(np.random.default_rng(3).standard_normal((B, H, D)).astype(np.float32))
    hi = jnp.full((B,), 70, jnp.int32)
    out = _attend_xla(q, k, v, PAD, hi)
    want = _float_attention(q, deq, _dequantize(v, 70), hi)
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    if native.gguf_available():
        got = A.decode_attention(q, k, v, PAD, hi, backend="native")
        np.testing.assert_allclose(got, out, atol=2e-6, rtol=2e-5)


def test_rotation_cuts_fp8_error_on_an_outlier_channel():
    """Keys and queries sharing a large channel (as LLM keys do): E4M3's relative error
    on that channel dominates the scores; rotated, it is spread over all channels."""
    rng = np.random.default_rng(8)
    kx = rng.standard_normal((B, KVH, 64, D)).astype(np.float32) * 0.3
    kx[..., 5] += 20.0 + rng.standard_normal((B, KVH, 64)).astype(np.float32)
    q = rng.standard_normal((B, H, D)).astype(np.float32) * 0.3
    q[..., 5] = 2.0
    kx, q = jnp.asarray(kx), jnp.asarray(q)
    vx = _x(9, 64)
    hi = jnp.full((B,), 64, jnp.int32)
    ref = _float_attention(q, kx, vx, hi)
    errs = {}
    for rotate in (False, True):
        k = _write_block(A.kv_init("fp8", "k", (B, KVH, 64, D), rotate=rotate), kx, 0, PAD)
        v = _write_block(A.kv_init("fp8", "v", (B, KVH, 64, D), rotate=rotate), vx, 0, PAD)
        errs[rotate] = float(jnp.abs(_attend_xla(q, k, v, PAD, hi) - ref).max())
    assert errs[True] <= 0.5 * errs[False], errs


def test_kv_format_rotation_defaults_and_bad_input():
    assert KVFormat.parse("fp8", head_dim=64).rotate is True
    assert KVFormat.parse("int8", head_dim=64).rotate is False
    assert KVFormat.parse(KVFormat("fp8", rotate=False), head_dim=64).rotate is False
    assert KVFormat.parse(KVFormat("int4", rotate=True), head_dim=64).rotate is True
    cache = KVCache.init(CFG, batch=1, max_len=8, format="fp8")
    assert cache.k[0].rotated and cache.v[0].rotated
    with pytest.raises(ValueError, match=r"rotate must be True, False or None.*got 'yes'"):
        KVFormat.parse(KVFormat("fp8", rotate="yes"), head_dim=64)
    with pytest.raises(ValueError, match=r"kv_init: rotate=1 must be True or False"):
        A.kv_init("int8", "k", (1, 1, 4, 8), rotate=1)


# ------------------------------------------------------------------ the model

CFG = LlamaConfig(
    vocab_size=96, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, rope_base=1e4
)


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    tok = tiny_tokenizer
    return LLM(Llama(CFG, rngs=nnx.Rngs(0)), tok)


def test_decode_with_quantized_caches_traces_once_and_bounds_the_logits(tiny):
    model = tiny.model
    toks = jnp.asarray(np.random.default_rng(0).integers(2, 96, (2, 30)), jnp.int32)
    pad = jnp.array([2, 0], jnp.int32)
    traces = []

    @jax.jit
    def prefill(cache):
        return forward(model, toks[:, :20], cache, start=0, pad=pad, logits="last")

    @jax.jit
    def step(tok, t, cache):
        traces.append(1)
        return forward(model, tok[:, None], cache, start=t, pad=pad, logits="last")

    formats = (
        "float",
        "int8",
        "fp8",
        KVFormat("int4", group=16),
        KVFormat("int4", group=16, value_window=False),
    )
    out = {}
    for name in formats:
        cache = KVCache.init(CFG, batch=2, max_len=64, format=name)
        _, cache = prefill(cache)
        rows = []
        for t in range(20, 30):
            lg, cache = step(toks[:, t], jnp.int32(t), cache)
            rows.append(lg)
        out[str(name)] = jnp.stack(rows)
    assert len(traces) == len(formats)  # one trace per cache format, none per step
    ref = out["float"]
    for name in formats[1:]:
        err = float(jnp.abs(out[str(name)] - ref).max())
        assert err <= 0.05 * float(jnp.abs(ref).max()), (name, err)


def test_cache_bytes_against_float16_at_smollm2_shape():
    cfg = LlamaConfig(
        vocab_size=64, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=64
    )  # SmolLM2-135M's attention: 3 kv heads of 64
    n = 2048

    def nbytes(fmt, dtype=jnp.float16):
        return jax.eval_shape(
            lambda: KVCache.init(cfg, batch=1, max_len=n, dtype=dtype, format=fmt)
        ).nbytes

    f16 = nbytes(None)
    assert f16 == 2 * 30 * 3 * n * 64 * 2
    assert nbytes("int8") == 2 * 30 * 3 * n * (64 + 2)  # 0.516x: codes + float16 scales
    assert nbytes("fp8") == 2 * 30 * 3 * (n * 64 + 4)  # 0.5x + one scale per head
    assert nbytes(KVFormat("fp8", rotate=False)) == nbytes("fp8")  # rotation stores nothing
    # int4: codes, a float16 scale and zero per group, the float16 residual window
    g = 32
    per_role = n * 32 + 2 * 2 * (n // g) * 64 + g * 64 * 2
    assert nbytes("int4") == 2 * 30 * 3 * per_role
    assert nbytes("int4") <= 0.33 * f16
    # groups of 64, the values without a window: under the 0.3x
    g = 64
    keys = n * 32 + 2 * 2 * (n // g) * 64 + g * 64 * 2
    values = n * 32 + 2 * 2 * n
    fmt = KVFormat("int4", group=64, value_window=False)
    assert nbytes(fmt) == 30 * 3 * (keys + values)
    assert nbytes(fmt) <= 0.3 * f16 < nbytes(KVFormat("int4", group=64))


def test_generate_stream_and_perplexity_with_each_format(tiny):
    prompt = [5, 9, 14, 3, 22, 40, 41, 7]
    ref = tiny.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    for fmt in (
        "int8",
        "fp8",
        KVFormat("fp8", rotate=False),
        KVFormat("int8", rotate=True),
        KVFormat("int4", group=16),
        KVFormat("int4", group=16, value_window=False),
        KVFormat("int4", group=16, rotate=True),
    ):
        before = tiny.trace_counts["decode"]
        g = tiny.generate(prompt, max_new_tokens=6, stop_at_eos=False, kv_cache=fmt)
        assert len(g.tokens[0]) == 6 and tiny.trace_counts["decode"] - before == 1
        if fmt == "int8":
            assert g.tokens == ref.tokens
    text = "".join(tiny.stream(prompt, max_new_tokens=6, stop_at_eos=False, kv_cache="int8"))
    assert (
        text == tiny.generate(prompt, max_new_tokens=6, stop_at_eos=False, kv_cache="int8").text[0]
    )
    ids = list(np.random.default_rng(5).integers(2, 96, 48))
    one_pass = tiny.perplexity(ids, window=24)
    np.testing.assert_allclose(
        tiny.perplexity(ids, window=24, kv_cache="float"), one_pass, rtol=1e-4
    )
    assert abs(tiny.perplexity(ids, window=24, kv_cache="int8") / one_pass - 1) < 0.01


# ------------------------------------------------------------------ bad input


def test_bad_input_names_the_argument_and_what_works(tiny):
    with pytest.raises(ValueError, match=r"kv_cache='int3' is not a KV-cache format.*'int8'"):
        tiny.generate([5, 6], max_new_tokens=2, kv_cache="int3")
    with pytest.raises(ValueError, match=r"group=48: the head size 32 .* e.g. 8, 16, 32"):
        tiny.generate([5, 6], max_new_tokens=2, kv_cache=KVFormat("int4", group=48))
    with pytest.raises(ValueError, match=r"kv_cache=8 must be None"):
        tiny.perplexity([5, 6, 7, 8], window=4, kv_cache=8)
    with pytest.raises(ValueError, match="group=1"):
        A.check_kv_format("int4", 64, group=1)
    with pytest.raises(ValueError, match=r"value_window must be True or False.*got 'no'"):
        tiny.generate([5, 6], max_new_tokens=2, kv_cache=KVFormat("int4", 16, value_window="no"))
    k, v, _, _ = _cache("int8", 16, 4)
    q = jnp.zeros((B, H, D), jnp.float32)
    with pytest.raises(ValueError, match="both float arrays or both KVCodes"):
        A.decode_attention(q, k, jnp.zeros((B, KVH, 16, D)), PAD, PAD + 1)
    c4 = A.kv_init("int4", "k", (B, KVH, 16, D), group=16)
    with pytest.raises(ValueError, match="one token per traced start"):
        jax.jit(A.kv_write)(c4, _x(0, 2), jnp.int32(0), PAD)
