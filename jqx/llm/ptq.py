"""Re-quantize an :class:`jqx.llm.LLM` with any jqx recipe, and allocate bits per weight.

:meth:`jqx.llm.LLM.quantize` and :meth:`jqx.llm.LLM.allocate` live here. The reference
is the model's float32 weights (a GGUF file's blocks dequantized first). The model
stores its matmul weights as GGUF does, ``(out, in)``; jqx recipes (GPTQ's Hessian,
AWQ's and SmoothQuant's per-input-channel scales) work on ``(in, out)`` kernels. So
the weights are handed to :func:`jqx.quantize` / :func:`jqx.calibrate` /
:func:`jqx.allocate` as ``(in, out)`` kernels named by their attribute paths
(``blocks/3/attn/wv``, ``blocks/3/mlp/w_down``; the paths rules match), the forward
pass reads them transposed (the interpreter follows the transpose, so each weight's
recorded inputs are its own), and each resulting QArray is transposed back to
``(out, in)`` codes and scales (:func:`transpose_qarray`).

Fused query/key/value and gate/up weights are split first (each weight gets its own
recipe and statistics: 7 weights per block) and fused again afterwards where the
quantized layouts match (:func:`jqx.llm.model.fuse_projections`).

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> from jqx.llm.ptq import transpose_qarray
    >>> w = jax.random.normal(jax.random.key(0), (64, 16))
    >>> q = jqx.int4_weight_only(group_size=32).quantize_weight(w)
    >>> t = transpose_qarray(q)
    >>> t.shape, t.block, bool(jnp.array_equal(t.dequantize(), q.dequantize().T))
    ((16, 64), (1, 32), True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from jqx.calibration.allocate import Allocation, allocate
from jqx.calibration.engine import calibrate
from jqx.core.qarray import QArray, is_qarray, kn_eligible, pack_codes
from jqx.core.tree import path_str
from jqx.llm.model import Llama, forward, fuse_projections
from jqx.ops.dispatch import native_status
from jqx.ops.layout import prepack as _prepack
from jqx.recipes.apply import quantize, select
from jqx.recipes.base import Recipe

if TYPE_CHECKING:
    from jqx.llm.runtime import LLM

__all__ = [
    "transpose_qarray",
    "quantize_llm",
    "allocate_llm",
    "calibration_windows",
    "pack_llm_weights",
]


def transpose_qarray(q: QArray) -> QArray:
    """The QArray of ``q.dequantize().T`` for a 2-D ``q``, with the same codes and scales
    moved (4-bit codes repacked along the new last axis); ``in_scale`` and ``g_idx``
    follow the input axis.

    Raises:
      ValueError: ``q`` is not 2-D, or holds two-level (GGUF k-quant) scales.
    """
    # One second-level scale over the whole tensor (NVFP4) transposes with it.
    whole = q.super_block is not None and tuple(q.super_block) == tuple(q.shape)
    whole = whole and q.super_zero is None
    if q.ndim != 2 or (q.super_block is not None and not whole) or q.qhigh is not None:
        raise ValueError(
            f"transpose_qarray: q has shape {q.shape} and format {q.format!r}"
            + (" with two-level scales" if q.super_block is not None else "")
            + "; only 2-D QArrays with one scale per block (jqx recipes' output) can be "
            "transposed."
        )
    codes = q.codes().T
    qvalue = pack_codes(codes, q.fmt)

    def t(a):
        return None if a is None else jnp.swapaxes(a, -1, -2) if a.ndim == 2 else a

    return q.replace(
        qvalue=qvalue,
        scale=t(q.scale),
        zero_point=t(q.zero_point),
        in_scale=t(q.in_scale),
        super_scale=t(q.super_scale),
        super_block=None if q.super_block is None else (q.shape[1], q.shape[0]),
        shape=(q.shape[1], q.shape[0]),
        block=(q.block[1], q.block[0]),
    )


def _split_fused(model: Llama) -> None:
    """Undoes :func:`fuse_projections` in place (float weights)."""
    c = model.config
    nq, nk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for blk in model.blocks:
        a, m = blk.attn, blk.mlp
        w = getattr(a, "wqkv", None)
        if w is not None:
            w = w[...]
            a.wq, a.wk, a.wv = (
                nnx.Param(w[:nq]),
                nnx.Param(w[nq : nq + nk]),
                nnx.Param(w[nq + nk :]),
            )
            del a.wqkv
        w = getattr(m, "w_gate_up", None)
        if w is not None:
            w = w[...]
            m.w_gate, m.w_up = nnx.Param(w[: c.hidden_dim]), nnx.Param(w[c.hidden_dim :])
            del m.w_gate_up


def _is_fused(model: Llama) -> bool:
    return any(getattr(b.attn, "wqkv", None) is not None for b in model.blocks)


def _float_model(llm: LLM) -> Llama:
    """A fresh float32, unfused copy of the model (the reference)."""
    model = nnx.merge(llm._graphdef, llm.dequantize().params)
    _split_fused(model)
    return model


def _kernels_and_fn(model: Llama):
    """``(kernels, fn)``: the matmul weights as ``{path: (in, out)}`` and
    ``fn(kernels, ids) -> logits`` running the model with them."""
    graphdef, state = nnx.split(model)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    kernels = {path_str(p): leaf.T for p, leaf in flat if leaf.ndim == 2 and path_str(p) != "embed"}

    def fn(ks, ids):
        def sub(p, leaf):
            k = ks.get(path_str(p))
            return leaf if k is None else k.T

        m = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(sub, state))
        pad = jnp.zeros((ids.shape[0],), jnp.int32)
        # unrolled: calibration records each weight's own inputs, which a scan over
        # stacked weights would merge
        return forward(m, ids, None, start=0, pad=pad, logits="all", scan=False)[0]

    return kernels, fn


def calibration_windows(
    llm: LLM,
    text: str | Sequence[int] | None,
    *,
    window: int = 256,
    max_windows: int = 8,
    name: str = "calibration_text",
) -> list[jax.Array]:
    """Token windows ``(1, window)`` of a text (or token ids), at most ``max_windows``.

    Raises:
      ValueError: no text, or fewer tokens than one window (the message names ``name``).
    """
    if text is None:
        raise ValueError(
            f"{name} is None, but the recipe needs calibration data (or sensitivities are "
            f"measured on it); pass a text of at least {window} tokens, e.g. "
            "jqx_demo.shakespeare.plays()['hamlet'], or choose a recipe that needs none."
        )
    if not isinstance(window, int) or window < 2 or window > llm.config.context_length:
        raise ValueError(
            f"window={window!r} must be an int in [2, {llm.config.context_length}] (tokens per "
            "calibration window)."
        )
    if not isinstance(max_windows, int) or max_windows < 1:
        raise ValueError(f"max_windows={max_windows!r} must be an int >= 1.")
    ids = llm.tokenizer.encode(text) if isinstance(text, str) else [int(i) for i in text]
    n = min(max_windows, len(ids) // window)
    if n == 0:
        raise ValueError(
            f"{name} has {len(ids)} tokens, fewer than one calibration window of {window}; "
            "give a longer text or a smaller window."
        )
    return [jnp.asarray(ids[i * window : (i + 1) * window], jnp.int32)[None] for i in range(n)]


def _needs_data(kernels, recipe) -> bool:
    return any(r.needs_calibration for _, _, r in select(kernels, recipe, lambda p, x: True))


def _rebuild(llm: LLM, model: Llama, qkernels: Mapping[str, Any], fuse: bool) -> LLM:
    from jqx.llm.runtime import LLM  # noqa: PLC0415  (runtime imports this module lazily)

    graphdef, state = nnx.split(model)

    def sub(p, leaf):
        q = qkernels.get(path_str(p))
        if q is None:
            return leaf
        if is_qarray(q) and q.act is not None and q.act.kind == "llm_int8":
            return q  # kept (in, out): see jqx.llm.model.linear
        return transpose_qarray(q) if is_qarray(q) else q.T

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(sub, state, is_leaf=is_qarray))
    if fuse:
        fuse_projections(model)
    return LLM(model, llm.tokenizer, source=llm.source, cache_dtype=llm.cache_dtype)


def quantize_llm(
    llm: LLM,
    recipe: Recipe | Mapping[str, Recipe | None],
    *,
    calibration_text: str | Sequence[int] | None = None,
    window: int = 256,
    max_windows: int = 8,
    fuse: bool | None = None,
    progress: bool = True,
    prepack: bool | None = None,
    embedding: Recipe | bool | None = None,
    **calibrate_kw,
) -> LLM:
    """See :meth:`jqx.llm.LLM.quantize`."""
    table_recipe = _embedding_recipe(embedding, recipe)
    model = _float_model(llm)
    kernels, fn = _kernels_and_fn(model)
    fuse = _is_fused(nnx.merge(llm._graphdef, llm.params)) if fuse is None else fuse

    def take(path, leaf):
        return path in kernels

    if _needs_data(kernels, recipe):
        batches = calibration_windows(llm, calibration_text, window=window, max_windows=max_windows)
        # The plain layout: the weights are transposed and fused below, then packed
        # as one (pack_llm_weights).
        q = calibrate(
            fn,
            kernels,
            batches,
            recipe,
            filter_fn=take,
            progress=progress,
            prepack=False,
            **calibrate_kw,
        )
    else:
        if calibrate_kw:
            raise ValueError(
                f"{sorted(calibrate_kw)} are jqx.calibrate options, but no selected recipe "
                "needs calibration; drop them."
            )
        q = quantize(kernels, recipe, filter_fn=take)
    if table_recipe is not None:
        # (vocab, dim) rows, already the (out, in) of the tied output projection
        model.embed.set_value(table_recipe.quantize_weight(model.embed[...], path="embed"))
    out = _rebuild(llm, model, q, fuse)
    if prepack is None:
        prepack = native_status() == "available"
    # After fusing: the fused weights are concatenated codes, packed as one.
    return out.with_params(pack_llm_weights(out.params)) if prepack else out


def _embedding_recipe(embedding, recipe) -> Recipe | None:
    """The recipe for the embedding table (quantized in rows), or None to keep it."""
    if embedding is None or embedding is False:
        return None
    if embedding is True:
        if not isinstance(recipe, Recipe):
            raise ValueError(
                "embedding=True takes the weights' recipe, but recipe is a rules mapping; "
                "pass the table's recipe itself, e.g. embedding=jqx.int8_weight_only()."
            )
        embedding = recipe
    if not isinstance(embedding, Recipe):
        raise ValueError(
            f"embedding={embedding!r} must be None (keep the table float32), True (the "
            "weights' recipe) or a jqx recipe, e.g. embedding=jqx.int8_weight_only()."
        )
    r = embedding.for_embedding()  # rows: one scale per row or groups along it
    if r.act is not None and r.act.kind == "llm_int8":
        raise ValueError(
            f"embedding={embedding.name!r}: LLM.int8()'s outlier matmul runs on (in, out) "
            "weights, and the table is looked up by rows; use e.g. "
            "embedding=jqx.int8_weight_only() for the table."
        )
    return r


def pack_llm_weights(params):
    """The model's ``(out, in)`` matmul weights stored for the native kernels: int8 ones
    in the int8 GEMM's panels (:func:`jqx.prepack`, ``"vnni"``), 4-bit and FP8 ones as
    their ``(in, out)`` transpose (``"kn"``: the 4-bit and FP8 decode kernels read it in
    place, ``x @ W.T`` runs on it with no copy, and a table's lookups read its columns).
    A quantized embedding table is stored the same way. Other leaves are returned as
    they are.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> g = jqx.per_group(32, axis=1)
        >>> w = jqx.quantize_array(jnp.ones((8, 64)), "int4", granularity=g)
        >>> pack_llm_weights({"w": w})["w"].code_layout
        'kn'
    """
    params = _prepack(params, layout="vnni")

    def one(leaf):
        if is_qarray(leaf) and kn_eligible(leaf):
            return leaf.with_code_layout("kn")
        return leaf

    return jax.tree_util.tree_map(one, params, is_leaf=is_qarray)


def allocate_llm(
    llm: LLM,
    candidates: Mapping[str, Recipe] | Sequence[Recipe],
    *,
    calibration_text: str | Sequence[int] | None = None,
    bits_per_weight: float | None = None,
    budget_bytes: int | None = None,
    window: int = 256,
    max_windows: int = 2,
    metric: str = "kl",
    progress: bool = True,
) -> Allocation:
    """See :meth:`jqx.llm.LLM.allocate`."""
    model = _float_model(llm)
    kernels, fn = _kernels_and_fn(model)
    batches = calibration_windows(llm, calibration_text, window=window, max_windows=max_windows)
    return allocate(
        fn,
        kernels,
        batches,
        candidates,
        bits_per_weight=bits_per_weight,
        budget_bytes=budget_bytes,
        filter_fn=lambda p, x: p in kernels,
        metric=metric,
        progress=progress,
    )
