"""The bound the native GEMM's GELU epilogue states, checked against float64.

``jax.nn.gelu(f, approximate=False)`` traces to ``(0.5 f) * erfc((-f) * 0.70710677)``.
The epilogue rounds each multiply as that trace does; only its erfc differs, within
8 ulps of the exact erfc of its float32 argument where that erfc is at least 2^-100
(below, erfc underflows to 0 or a subnormal: the result is at most 2^-99 |0.5 f|).
"""

from __future__ import annotations

import math

import numpy as np

_ERFC = np.vectorize(math.erfc, otypes=[np.float64])
ERFC_ULPS = 8  # docs/internals/native-kernels.md


def gelu_reference(f):
    """(0.5 f, the exact erfc of the trace's float32 argument), both float64."""
    f = np.asarray(f, np.float32)
    half = (np.float32(0.5) * f).astype(np.float64)
    arg = ((-f) * np.float32(0.7071067690849304)).astype(np.float32)
    return half, _ERFC(arg.astype(np.float64))


def assert_gelu_within_bound(f, got) -> None:
    """``got`` is the epilogue's GELU of the float32 pre-activations ``f``."""
    half, erfc = gelu_reference(f)
    got = np.asarray(got, np.float64)
    with np.errstate(invalid="ignore"):
        want = half * erfc
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = ~np.isnan(want)
    u = 2.0**-24
    # erfc within ERFC_ULPS, then the product's rounding.
    bound = np.where(erfc >= 2.0**-100, (ERFC_ULPS + 1) * u * np.abs(want), 2.0**-99 * np.abs(half))
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf])
    ok = fin & ~inf
    err = np.abs(got[ok] - want[ok])
    assert np.all(err <= bound[ok]), f"max excess {np.max(err - bound[ok])}"


TANH_ULPS = 2  # docs/internals/native-kernels.md


def assert_gelu_tanh_within_bound(f, got) -> None:
    """``got`` is the epilogue's ``jax.nn.gelu(f)`` (tanh form) of the float32
    pre-activations ``f``: the trace's float32 roundings, with tanh within TANH_ULPS of
    the exact tanh of its float32 argument."""
    f = np.asarray(f, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        cube = f * (f * f)
        e = np.float32(0.7978845834732056) * (f + np.float32(0.044714998453855515) * cube)
        t = np.tanh(e.astype(np.float64))
        g = 1.0 + t
        want = f.astype(np.float64) * 0.5 * g
    got = np.asarray(got, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    u = 2.0**-24
    half_f = 0.5 * np.abs(f.astype(np.float64))
    with np.errstate(invalid="ignore"):
        bound = (
            half_f * ((TANH_ULPS + 0.01) * u * np.abs(t) + 1.01 * u * np.abs(g))
            + 1.01 * u * np.abs(want)
            + 2.0**-149
        )
    inf = ok & np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf])
    fin = ok & ~inf
    err = np.abs(got[fin] - want[fin])
    assert np.all(err <= bound[fin]), f"max excess {np.max(err - bound[fin])}"
