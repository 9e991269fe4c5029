"""Embedding tables: selection (``embeddings=True``), row layouts, and lookups that
decode only the gathered rows (jqx.quantized, jqx.ops.take, the jqx.flax adapters)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jqx
from jqx.flax import linen as qnn
from jqx.flax import nnx as qnnx

V, F = 1000, 32  # a vocabulary no other array in these jaxprs has
IDS = jnp.array([[1, 5, 999], [0, 0, 7]])

# Largest error of one table entry relative to its row's max |x| (half a grid step,
# with margin): int8 absmax 0.5/127; uint4 with a zero point (max - min)/30 <= 2/30;
# int4 absmax 0.5/7; nf4's widest gap is 0.28 (0.72 -> 1.0); fp4 e2m1's is 2/6; fp8
# e4m3 rounds to 3 mantissa bits (2^-4 of the value).
TABLE_RECIPES = {
    "int8-row": (jqx.int8_weight_only(), 0.0045),
    "int8-g8": (jqx.int8_weight_only(group_size=8), 0.0045),
    "uint4-g8": (jqx.int4_weight_only(group_size=8), 0.07),
    "int4-g8": (jqx.int4_weight_only(group_size=8, scheme="absmax"), 0.08),
    "nf4-g8": (jqx.nf4_weight_only(group_size=8), 0.15),
    "fp4-g8": (jqx.fp4_weight_only("e2m1", group_size=8), 0.17),
    "fp8-row": (jqx.fp8_weight_only(), 0.07),
    "w8a8-row": (jqx.int8_dynamic_activation_int8_weight(), 0.0045),
}


def _table():
    return jax.random.normal(jax.random.key(0), (V, F), jnp.float32)


def _bound_rows(y, y_float, table, ids, tol):
    """Every looked-up entry within ``tol`` x its row's max |x| of the float lookup."""
    row_max = jnp.max(jnp.abs(table), axis=1)[ids][..., None]
    assert y.shape == y_float.shape
    err = np.asarray(jnp.abs(y - y_float) / row_max)
    assert err.max() <= tol, err.max()


def _no_full_table(f, *args):
    """The gathered path ran: no float copy of the whole table in the jaxpr."""
    jp = str(jax.make_jaxpr(f)(*args))
    assert f"f32[{V},{F}]" not in jp, jp


class _Tied(nn.Module):
    @nn.compact
    def __call__(self, tok):
        emb = nn.Embed(V, F)
        h = nn.Dense(F)(emb(tok))
        return emb.attend(h)


# --------------------------------------------------------------------------- selection


def test_default_selection_leaves_tables_float():
    m = _Tied()
    v = m.init(jax.random.key(0), IDS)
    q = jqx.quantize(v, jqx.int8_weight_only())
    assert not jqx.is_qarray(q["params"]["Embed_0"]["embedding"])
    assert jqx.is_qarray(q["params"]["Dense_0"]["kernel"])


@pytest.mark.parametrize("key", list(TABLE_RECIPES))
def test_embeddings_true_quantizes_tables_in_rows(key):
    recipe, _ = TABLE_RECIPES[key]
    v = _Tied().init(jax.random.key(0), IDS)
    q = jqx.quantize(v, recipe, embeddings=True)
    t, k = q["params"]["Embed_0"]["embedding"], q["params"]["Dense_0"]["kernel"]
    assert jqx.is_qarray(t) and jqx.is_qarray(k)
    assert t.format == recipe.format and t.shape == (V, F)
    assert t.block == (1, recipe.group_size or F)  # rows; groups run along the row
    assert k.block == (recipe.group_size or F, 1)  # the kernel keeps the recipe's axis
    assert t.act == recipe.act == k.act  # dynamic act specs apply to a tied attend


def test_calibrated_recipes_give_tables_round_to_nearest_rows():
    e = {"embed": {"embedding": _table()}}
    for recipe in (
        jqx.gptq(bits=4, group_size=8),
        jqx.awq(bits=4, group_size=8),
        jqx.smoothquant(),
        jqx.int8_static_activation_int8_weight(),
    ):
        assert recipe.needs_calibration
        t = jqx.quantize(e, recipe, embeddings=True)["embed"]["embedding"]
        assert t.block[0] == 1 and t.format == recipe.format, recipe.name
        assert t.act is None or t.act.kind == "dynamic"  # a static scale needs calibration
    # The kernels of a calibrated recipe still need jqx.calibrate; the tables do not.
    v = _Tied().init(jax.random.key(0), IDS)
    with pytest.raises(ValueError, match="Dense_0/kernel needs calibration.*embeddings=True"):
        jqx.quantize(v, jqx.gptq(group_size=8), embeddings=True)


def test_rules_and_filter_fn_quantize_tables_in_rows():
    v = _Tied().init(jax.random.key(0), IDS)
    rules = {"Embed_0": jqx.nf4_weight_only(group_size=16), ".*": jqx.int8_weight_only()}
    q = jqx.quantize(v, rules, embeddings=True)
    t = q["params"]["Embed_0"]["embedding"]
    assert t.format == "nf4" and t.block == (1, 16)
    assert q["params"]["Dense_0"]["kernel"].format == "int8"
    # Without embeddings=True a rule naming the table matches no candidate, and says how.
    with pytest.warns(UserWarning, match="embeddings=True"):
        jqx.quantize(v, {"Embed_0": jqx.int8_weight_only()})
    # A filter_fn that selects the table: rows too (a kernel's axis would force a full decode).
    q = jqx.quantize(v, jqx.int8_weight_only(), filter_fn=lambda p, x: x.ndim == 2)
    assert q["params"]["Embed_0"]["embedding"].block == (1, F)


def test_report_says_what_runs():
    v = _Tied().init(jax.random.key(0), IDS)
    acts = {}
    for recipe in (jqx.int8_weight_only(), jqx.int8_dynamic_activation_int8_weight()):
        r = jqx.report(v, jqx.quantize(v, recipe, embeddings=True))
        acts[recipe.name] = {lr.path.split("/")[1]: lr.act for lr in r.layers}
        assert "lookup" in str(r)
    assert acts["int8_weight_only"] == {"Embed_0": "lookup", "Dense_0": "-"}
    assert acts["int8_dynamic_activation_int8_weight"] == {
        "Embed_0": "lookup; attend dynamic:int8",
        "Dense_0": "dynamic:int8",
    }


def test_int8_table_is_about_four_times_smaller():
    v = {"embed": {"embedding": _table()}}
    r = jqx.report(v, jqx.quantize(v, jqx.int8_weight_only(), embeddings=True))
    assert 3.5 < r.ratio < 4.0  # one f32 scale per row of 32 codes: 4 / (1 + 4/32)


# --------------------------------------------------------------------------- lookups


@pytest.mark.parametrize("key", list(TABLE_RECIPES))
def test_lookups_gather_rows_for_every_layout(key):
    recipe, tol = TABLE_RECIPES[key]
    table = _table()
    q = jqx.quantize({"embedding": table}, recipe, embeddings=True)["embedding"]
    ref = jnp.take(table, IDS, axis=0)
    exact = jnp.take(q.dequantize(), IDS, axis=0)
    lookups = {
        "jnp.take": lambda t, i: jnp.take(t, i, axis=0),
        "index": lambda t, i: t[i],
        "jqx.ops.take": jqx.ops.take,
    }
    for name, f in lookups.items():
        g = f if name == "jqx.ops.take" else jqx.quantized(f)
        _no_full_table(g, q, IDS)
        y = g(q, IDS)
        np.testing.assert_allclose(y, exact, rtol=1e-6, atol=1e-6, err_msg=name)
        _bound_rows(y, ref, table, IDS, tol)


@pytest.mark.parametrize("key", ["int8-row", "uint4-g8", "nf4-g8", "w8a8-row"])
def test_linen_embed_and_tied_attend_through_quantized(key):
    recipe, tol = TABLE_RECIPES[key]
    m = _Tied()
    v = m.init(jax.random.key(0), IDS)
    q = jqx.quantize(v, recipe, embeddings=True)
    f = jqx.quantized(m.apply)
    jp = str(jax.make_jaxpr(f)(q, IDS))
    # The lookup gathers rows; only the tied attend may decode the table as a matmul weight.
    lookup = jqx.quantized(lambda p, i: nn.Embed(V, F).apply({"params": p}, i))
    _no_full_table(lookup, q["params"]["Embed_0"], IDS)
    if recipe.act is not None:  # attend ran as an int8 matmul: XLA's, or the native GEMM's
        # on a table jqx.quantize packed for it (panels read in place)
        assert "preferred_element_type=int32" in jp or "jqx_w8a8_vnni" in jp, jp
    y, y_float = jax.jit(f)(q, IDS), m.apply(v, IDS)
    rel = float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float))
    assert rel < 2 * tol + (0.02 if recipe.act else 0.0), rel
    t = v["params"]["Embed_0"]["embedding"]
    _bound_rows(
        lookup(q["params"]["Embed_0"], IDS),
        jnp.take(t, IDS, axis=0),
        t,
        IDS,
        tol,
    )


def test_nnx_embed_through_quantized():
    recipe, tol = TABLE_RECIPES["uint4-g8"]
    m = nnx.Embed(V, F, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(m)
    q = jqx.quantize(state, recipe, embeddings=True)
    assert jqx.is_qarray(q["embedding"].get_value())

    def lookup(s, i):
        return nnx.merge(gdef, s)(i)

    def attend(s, x):
        return nnx.merge(gdef, s).attend(x)

    _no_full_table(jqx.quantized(lookup), q, IDS)
    table = state["embedding"].get_value()
    _bound_rows(jqx.quantized(lookup)(q, IDS), m(IDS), table, IDS, tol)
    x = jax.random.normal(jax.random.key(1), (3, F))
    y, y_float = jqx.quantized(attend)(q, x), m.attend(x)
    assert float(jnp.linalg.norm(y - y_float) / jnp.linalg.norm(y_float)) < 2 * tol


# --------------------------------------------------------------------------- jqx.flax adapters


def test_linen_adapter_embed_without_the_interpreter():
    recipe, tol = TABLE_RECIPES["int4-g8"]
    m = qnn.Embed(V, F)
    ids = jnp.array([[1, -1, 3], [V, 0, 2]])  # -1 wraps, V is out of range: NaN as in Flax
    v = m.init(jax.random.key(0), ids)
    q = jqx.quantize(v, recipe, embeddings=True)
    _no_full_table(lambda p, i: m.apply(p, i), q, ids)
    y = m.apply(q, ids)
    y_deq = nn.Embed(V, F).apply(jqx.dequantize(q), ids)
    np.testing.assert_allclose(y, y_deq, rtol=1e-6, atol=1e-6)  # NaN rows compare equal
    assert bool(jnp.isnan(y[1, 0]).all()) and not bool(jnp.isnan(y[0]).any())
    table = v["params"]["embedding"]
    ok = IDS
    _bound_rows(m.apply(q, ok), jnp.take(table, ok, axis=0), table, ok, tol)
    x = jax.random.normal(jax.random.key(1), (2, F))
    y_att = m.apply(q, x, method="attend")
    y_f = nn.Embed(V, F).apply(v, x, method="attend")
    assert float(jnp.linalg.norm(y_att - y_f) / jnp.linalg.norm(y_f)) < 2 * tol
    # Float params still work, as with Flax's own Embed.
    np.testing.assert_array_equal(m.apply(v, ok), nn.Embed(V, F).apply(v, ok))


def test_nnx_adapter_embed_without_the_interpreter():
    recipe, tol = TABLE_RECIPES["int8-row"]
    m = qnnx.Embed(V, F, rngs=nnx.Rngs(0))
    ref = nnx.Embed(V, F, rngs=nnx.Rngs(0))
    gdef, state = nnx.split(m)
    qm = nnx.merge(gdef, jqx.quantize(state, recipe, embeddings=True))
    _no_full_table(lambda i: qm(i), IDS)
    table = state["embedding"].get_value()
    _bound_rows(qm(IDS), ref(IDS), table, IDS, tol)
    x = jax.random.normal(jax.random.key(1), (2, F))
    assert float(jnp.linalg.norm(qm.attend(x) - ref.attend(x)) / jnp.linalg.norm(ref.attend(x))) < (
        2 * tol
    )
