"""benchmarks/bert_cpu.py's ``jit_apply``: ``--chunk`` runs the JAX rows a few batch rows
at a time in one program, with the same embeddings as the whole batch."""

from __future__ import annotations

import _benchmarks  # tests/_benchmarks.py
import jax
import numpy as np
import pytest

import jqx
from jqx_demo import bert, minilm


@pytest.fixture(scope="module")
def bench():
    return _benchmarks.load("bert_cpu")


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunks_give_the_whole_batch_embeddings(bench, chunk):
    p = bert.load_port("plain", minilm.load_tiny())
    rng = np.random.default_rng(0)
    ids = rng.integers(1, p.config.vocab_size, (7, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2, 9:] = 0  # one padded row: the chunks carry their own masks
    apply = jqx.quantized(p.module.apply)
    w8a8 = jqx.quantize(p.variables, jqx.int8_dynamic_activation_int8_weight())
    for variables in (p.variables, w8a8):
        whole = np.asarray(jax.jit(apply)(variables, ids, mask))
        got = np.asarray(bench.jit_apply(apply, chunk)(variables, ids, mask))
        assert got.shape == whole.shape == (7, p.config.hidden_size)
        # Row by row the same model; XLA's row reductions may round differently at
        # another row count (a few float32 ulps of the unit-norm embeddings), and in
        # W8A8 such a difference can move an int8 code (about 1/127 of a row's range).
        tol = 1e-6 if variables is p.variables else 2e-2
        np.testing.assert_allclose(got, whole, atol=tol)
        # Each row is what a batch of that row alone gives: chunks share nothing.
        for i in (0, 2, 6):
            one = np.asarray(jax.jit(apply)(variables, ids[i : i + 1], mask[i : i + 1]))
            np.testing.assert_allclose(got[i], one[0], atol=tol)
