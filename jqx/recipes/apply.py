"""Applying recipes to a pytree: select the weights (filter or rules) and quantize them.

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
    >>> q = jqx.quantize(params, jqx.int8_weight_only())
    >>> type(q["dense"]["kernel"]).__name__, type(q["dense"]["bias"]).__name__
    ('QArray', 'ArrayImpl')

Embedding tables (leaves named ``embedding``, as Flax's ``Embed`` names its
table) join with ``embeddings=True``; a table is always quantized in rows
(:meth:`jqx.Recipe.for_embedding`), so a lookup decodes only the rows it reads.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jqx.core.qarray import is_qarray
from jqx.core.tree import path_str
from jqx.recipes.base import Recipe

__all__ = ["quantize", "default_filter", "is_embedding_table", "select"]

Rules = Mapping[str, "Recipe | None"]


def _is_matmul_weight(path: str, leaf) -> bool:
    return path.rsplit("/", 1)[-1] == "kernel" and getattr(leaf, "ndim", 0) >= 2


def is_embedding_table(path: str, leaf) -> bool:
    """Embedding tables: 2-D float leaves named ``embedding`` (Flax linen ``nn.Embed``
    and ``nnx.Embed`` name their ``(num_embeddings, features)`` table so).

    Example:
        >>> import jax.numpy as jnp
        >>> is_embedding_table("params/Embed_0/embedding", jnp.ones((50, 8)))
        True
    """
    return (
        path.rsplit("/", 1)[-1] == "embedding"
        and getattr(leaf, "ndim", 0) == 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
    )


def default_filter(path: str, leaf) -> bool:
    """Matmul weights: leaves named ``kernel`` with ndim >= 2 and a float dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> default_filter("params/Dense_0/kernel", jnp.ones((4, 4))), default_filter(
        ...     "params/Dense_0/bias", jnp.ones(4))
        (True, False)
    """
    return _is_matmul_weight(path, leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)


def _check_recipe(r, where):
    if r is not None and not isinstance(r, Recipe):
        raise TypeError(
            f"{where} must be a jqx recipe (e.g. jqx.int8_weight_only()) or None, got "
            f"{type(r).__name__}: {r!r}"
        )


def select(
    params,
    recipe: Recipe | Rules,
    filter_fn: Callable[[str, Any], bool] | None = None,
    *,
    embeddings: bool = False,
):
    """Lists ``(path, leaf, recipe)`` for every leaf the recipe/rules select,
    and warns about rules that matched nothing. Shared with ``jqx.calibrate``.

    Candidates are the leaves ``filter_fn(path, leaf)`` accepts; without a
    filter_fn, the matmul weights (``kernel`` leaves with ndim >= 2; with a
    single recipe, float ones only). ``embeddings=True`` adds the embedding
    tables (:func:`is_embedding_table`). With rules, the first rule whose regex
    matches (``re.search``) a candidate's path decides; a candidate no rule
    matches stays as it is. A non-float leaf that ends up selected raises. An
    embedding table, however selected, gets ``recipe.for_embedding()``.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> p = {"a": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
        >>> [path for path, _, _ in select(p, jqx.int8_weight_only())]
        ['a/kernel']
    """
    if isinstance(recipe, Mapping):
        rules = []
        for pat, r in recipe.items():
            if not isinstance(pat, str):
                raise TypeError(
                    f"rules key {pat!r} must be a regex string on paths like 'layers/0/kernel'."
                )
            _check_recipe(r, f"rules[{pat!r}]")
            try:
                rules.append((pat, re.compile(pat), r))
            except re.error as e:
                raise ValueError(
                    f"rules key {pat!r} is not a valid regular expression ({e}); escape special "
                    "characters with re.escape or a raw string."
                ) from e
    else:
        if recipe is None:
            raise TypeError(
                "recipe must be a jqx recipe (e.g. jqx.int8_weight_only()) or a dict of rules "
                "{regex_on_path: recipe_or_None}, got None."
            )
        _check_recipe(recipe, "recipe")
        rules = None
    used = set()
    out = []
    candidates = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
        if is_qarray(leaf) or not hasattr(leaf, "dtype"):
            continue  # already quantized, or not an array
        p = path_str(path)
        table = is_embedding_table(p, leaf)
        if filter_fn is not None:
            take = filter_fn(p, leaf)
        elif rules is None:
            take = default_filter(p, leaf)
        else:
            # Non-float kernels stay candidates so a rule that selects one errors.
            take = _is_matmul_weight(p, leaf)
        if not (take or (embeddings and table)):
            continue
        candidates.append(p)
        if rules is None:
            out.append((p, leaf, recipe.for_embedding() if table else recipe))
            continue
        for pat, rx, r in rules:
            if rx.search(p):
                used.add(pat)
                if r is not None:
                    out.append((p, leaf, r.for_embedding() if table else r))
                break
    for p, leaf, _ in out:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"{p} (dtype={leaf.dtype}) was selected for quantization but only float arrays "
                f"can be quantized; map it to None with a rule placed first (e.g. "
                f"{{{re.escape(p) + '$'!r}: None}}) or pass a filter_fn that rejects it."
            )
    if rules is not None:
        unused = [pat for pat, _, _ in rules if pat not in used]
        if unused:
            warnings.warn(
                f"jqx.quantize: rule(s) {unused} matched no leaf (earlier rules win). Candidate "
                f"paths look like {candidates[:3]}"
                + (
                    ""
                    if filter_fn
                    else " (by default only 'kernel' leaves with ndim >= 2; embedding tables "
                    "join with embeddings=True)"
                )
                + ".",
                stacklevel=3,
            )
    return out


def quantize(
    params,
    recipe: Recipe | Rules,
    filter_fn: Callable[[str, Any], bool] | None = None,
    *,
    embeddings: bool = False,
):
    """``jqx.quantize`` without its last step, packing int8 weights for the native GEMM
    (:func:`jqx.ops.layout.quantize` adds it: this layer cannot see the platform). The
    arguments, result and errors are ``jqx.quantize``'s; internal callers that pack
    themselves (``LLM.quantize``) or must keep the plain layout call this one.
    """
    chosen = select(params, recipe, filter_fn, embeddings=embeddings)
    for p, _, r in chosen:
        if r.needs_calibration:
            raise ValueError(
                f"recipe {r.name!r} selected for {p} needs calibration data; use "
                "jqx.calibrate(fn, params, batches, recipe) instead of jqx.quantize"
                + (
                    " (embedding tables need none: jqx.quantize(calibrated, recipe, "
                    "embeddings=True) then adds them)."
                    if embeddings
                    else "."
                )
            )
    replace = {p: r.quantize_weight(leaf, path=p) for p, leaf, r in chosen}

    def f(path, leaf):
        return replace.get(path_str(path), leaf)

    return jax.tree_util.tree_map_with_path(f, params, is_leaf=is_qarray)
