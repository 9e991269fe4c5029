import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx


def _params():
    k0, k1 = jax.random.split(jax.random.key(0))
    return {
        "params": {
            "d0": {"kernel": jax.random.normal(k0, (64, 32)), "bias": jnp.zeros(32)},
            "d1": {"kernel": jax.random.normal(k1, (32, 16))},
        }
    }


def test_report_values_match_float_reference():
    p = _params()
    q = jqx.quantize(
        p, {"d0/kernel": jqx.int4_weight_only(group_size=32), "d1/kernel": jqx.int8_weight_only()}
    )
    r = jqx.report(p, q)
    d = r.to_dict()
    assert [lr["path"] for lr in d["layers"]] == ["params/d0/kernel", "params/d1/kernel"]
    for lr in d["layers"]:
        parts = lr["path"].split("/")
        w = np.asarray(p[parts[0]][parts[1]][parts[2]], np.float64)
        wq = np.asarray(q[parts[0]][parts[1]][parts[2]].dequantize(), np.float64)
        rel = np.linalg.norm(w - wq) / np.linalg.norm(w)
        sqnr = 10 * np.log10(np.sum(w**2) / np.sum((w - wq) ** 2))
        assert abs(lr["rel_error"] - rel) <= 1e-5 * rel
        assert abs(lr["sqnr_db"] - sqnr) <= 1e-3
        assert lr["bytes_before"] == w.size * 4
    l0, l1 = d["layers"]
    assert l0["format"] == "uint4" and l1["format"] == "int8"
    assert l0["bytes_after"] == 64 * 32 // 2 + 2 * 32 * 4 * 2  # codes + scale + zero point
    assert l0["granularity"].startswith("group32")
    # int8 per-channel is far more accurate than int4 g32 on a Gaussian (~6 dB/bit).
    assert l1["sqnr_db"] > l0["sqnr_db"] + 15
    t = d["totals"]
    assert t["bytes_before"] == (64 * 32 + 32 + 32 * 16) * 4
    assert t["bytes_after"] == l0["bytes_after"] + l1["bytes_after"] + 32 * 4
    assert t["leaves"] == 3 and t["quantized_leaves"] == 2
    assert abs(t["ratio"] - t["bytes_before"] / t["bytes_after"]) < 1e-12


def test_report_text_lists_every_layer_and_total():
    p = _params()
    q = jqx.quantize(p, jqx.int8_dynamic_activation_int8_weight())
    s = str(jqx.report(p, q))
    assert "params/d0/kernel" in s and "params/d1/kernel" in s
    assert "dynamic:int8" in s and "SQNR" in s and "total (2/3 leaves quantized)" in s


def test_exact_reconstruction_reports_inf_sqnr():
    p = {"kernel": jnp.ones((8, 8))}
    r = jqx.report(p, jqx.quantize(p, jqx.int8_weight_only()))
    assert r.layers[0].rel_error == 0.0 and math.isinf(r.layers[0].sqnr_db)
    assert "inf" in str(r)


def test_report_bad_input_names_the_path():
    p = _params()
    q = jqx.quantize(p, jqx.int8_weight_only())
    with pytest.raises(ValueError, match="params/d0/kernel"):
        jqx.report({"other": p["params"]}, q)
    bad = jax.tree_util.tree_map(lambda x: x, p)
    bad["params"]["d0"]["kernel"] = jnp.zeros((32, 64))
    with pytest.raises(ValueError, match="shape mismatch at params/d0/kernel"):
        jqx.report(bad, q)
