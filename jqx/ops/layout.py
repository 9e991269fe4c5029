"""Weights laid out ahead for the kernel that runs them: :func:`prepack`.

The native int8 GEMM (``jqx.kernels.cpu.native``, AVX512-VNNI) multiplies by weight
panels of 16 columns x 4 rows. A weight stored ``(K, N)`` is packed into them on every
call: a write of the whole weight before any product, which at few rows (batch-1
latency, decode) is a large part of the call. :func:`prepack` does it once, after
``jqx.quantize``: each eligible int8 QArray keeps its values and scales and stores its
codes in the panel layout (``QArray.code_layout == "vnni"``), and the dispatcher runs
such weights on the GEMM at every size. Paths that do not read the panels (XLA, Pallas,
the AVX2 kernel) unpack them per call, so a packed tree still runs anywhere, only
slower there: pack where the GEMM runs (:func:`jqx.ops.native_status`).

:func:`quantize` (``jqx.quantize``) is the recipes layer's quantize followed by this
packing where the GEMM runs (``prepack=None``), as PyTorch's dynamic quantization and
ONNX Runtime pack their int8 weights once when the model is converted or loaded: the
recipes layer cannot see the platform, so the decision lives here, beside the
dispatcher's :func:`jqx.ops.native_status`.

See docs/guide/run.md ("CPU serving: pack int8 weights once").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax

from jqx.core.numerics import is_conv_kernel
from jqx.core.qarray import is_qarray, vnni_eligible
from jqx.core.tree import path_str
from jqx.ops import dispatch
from jqx.recipes import apply as _apply
from jqx.recipes.base import Recipe

__all__ = ["prepack", "quantize"]


def prepack(tree: Any, *, layout: Literal["native", "vnni", "plain"] = "native") -> Any:
    """``tree`` with its int8 weights' codes stored in the layout the native GEMM reads.

    Every int8 :class:`jqx.QArray` without layout extensions whose scale is constant
    along its contraction (int8 weight-only per channel, W8A8 dynamic and static,
    SmoothQuant: Flax ``Dense`` kernels ``(in, out)``, ``DenseGeneral`` attention
    kernels, ``(out, in)`` weights with one scale per row and so per-row embedding
    tables; see :func:`jqx.core.qarray.vnni_split`; not convolution kernels, LLM.int8()
    or fp8/MX-activation weights) gets
    :meth:`QArray.with_code_layout("vnni") <jqx.QArray.with_code_layout>`: the same
    values, scales and (up to the panels' padding to 16 columns and 4 rows) bytes;
    the native GEMM then skips packing the weight on every call, and runs the weight at
    every size. Other leaves are returned as they are. Pure: a new tree, the input is
    unchanged.

    Args:
      tree: a pytree with QArrays (e.g. ``jqx.quantize``'s result).
      layout: ``"native"`` (default): pack when the native GEMM runs here
        (:func:`jqx.ops.native_status` is ``"available"``), else warn and return
        ``tree`` unchanged; ``"vnni"``: pack whatever the machine (e.g. to save a tree
        for a machine that has the GEMM); ``"plain"``: undo, every QArray back to its
        plain layout (``"vnni"`` and ``LLM.quantize``'s ``"kn"`` alike).

    Returns:
      The tree with packed (or, for ``"plain"``, unpacked) QArrays.

    Raises:
      ValueError: an unknown ``layout``.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.quantize({"kernel": jnp.ones((64, 32))}, jqx.int8_weight_only(), prepack=False)
        >>> p = jqx.prepack(q, layout="vnni")
        >>> p["kernel"].code_layout, p["kernel"].qvalue.shape
        ('vnni', (2, 16, 64))
        >>> bool((jqx.dequantize(p)["kernel"] == jqx.dequantize(q)["kernel"]).all())
        True
    """
    if layout not in ("native", "vnni", "plain"):
        raise ValueError(
            f"jqx.prepack(layout={layout!r}): use 'native' (pack where the native int8 GEMM "
            "runs), 'vnni' (pack anyway) or 'plain' (unpack)."
        )
    if layout == "native":
        reason = dispatch.native_status()
        if reason != "available":
            warnings.warn(
                f"jqx.prepack: the native int8 GEMM does not run here ({reason}), so the "
                "tree is returned unpacked (other paths would unpack it on every call). "
                "Pass layout='vnni' to pack it anyway.",
                stacklevel=2,
            )
            return tree
    if layout == "plain":
        return jax.tree_util.tree_map(
            lambda q: q.with_code_layout("plain") if is_qarray(q) else q, tree, is_leaf=is_qarray
        )
    return _pack(tree, whole_panels=False)


def quantize(
    params,
    recipe: Recipe | _apply.Rules,
    filter_fn: Callable[[str, Any], bool] | None = None,
    *,
    embeddings: bool = False,
    prepack: bool | None = None,
):
    """Returns ``params`` with the selected leaves replaced by QArrays (pure).

    Args:
      params: any pytree of arrays (Flax linen variables, an nnx State, dicts).
      recipe: a recipe, or rules ``{regex_on_path: recipe_or_None}``; the first
        rule whose regex matches (``re.search``) a candidate's path decides, and
        None leaves it in float. Rules that match no leaf are reported with a
        warning (``UserWarning``).
      filter_fn: ``(path, leaf) -> bool`` choosing the candidate leaves; default:
        matmul weights (``kernel`` leaves with ndim >= 2, see
        :func:`default_filter`). Paths look like ``params/Dense_0/kernel``
        (linen) or ``layers/0/kernel`` (nnx State).
      embeddings: also quantize the embedding tables (2-D leaves named
        ``embedding``: Flax ``nn.Embed`` / ``nnx.Embed``). Off by default so a
        tree quantized before keeps its bytes and accuracy: a table's error
        reaches every token, so it is a choice. A table is quantized in rows with
        ``recipe.for_embedding()`` (round to nearest in the recipe's format, one
        scale per row or groups along the row, weight-only for lookups), so
        ``jqx.quantized`` decodes only the looked-up rows and a tied
        ``Embed.attend`` uses it as a matmul weight. It needs no calibration, so
        after ``jqx.calibrate`` the same call adds the tables.
      prepack: store the int8 weights' codes in the native GEMM's panels
        (:func:`prepack`, ``QArray.code_layout == "vnni"``), so no call packs them
        again, as PyTorch's dynamic quantization and ONNX Runtime pack theirs once.
        ``None`` (default): where the native int8 GEMM runs
        (:func:`jqx.ops.native_status` is ``"available"``: x86-64 with AVX512-VNNI,
        CPU backend) in a process with one device, the weights whose input size is a
        multiple of 4 and output size a multiple of 16 (whole panels: the bytes do not
        change); else the plain layout. ``True``: every eligible weight, whatever the
        machine (e.g. to save for such a machine; panels padded to 16 columns and 4
        rows). ``False``: the plain ``(in, out)`` codes (e.g. to shard along any axis,
        or to run on a GPU from this tree). Values and scales do not depend on it.
        Results can move by a rounding step, because packed weights run on the
        native GEMM at every size, where small plain ones run on XLA: W8A8 products
        are exact either way, but XLA fuses its rescale with what follows; int8
        weight-only products run the GEMM's two-level activation split (``|error|
        <= max|x_row| / 32511`` per unit of ``sum |w|``, docs/internals/dispatch.md).

    Returns:
      The same tree structure, with QArrays in place of the selected leaves.
      ``jqx.prepack(tree, layout="plain")`` gives the plain layout of a packed tree.

    Raises:
      ValueError: NaN/Inf in a selected weight (names its path), a group size that
        does not divide the axis, or a recipe that needs calibration.
      TypeError: a non-float leaf selected, or a recipe that is not a jqx recipe,
        or a ``prepack`` that is not None, True or False.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> p = {"a": {"kernel": jnp.ones((8, 8))}, "b": {"kernel": jnp.ones((8, 8))}}
        >>> q = jqx.quantize(p, {"a/": jqx.int4_weight_only(group_size=4), ".*": jqx.int8_weight_only()})
        >>> q["a"]["kernel"].format, q["b"]["kernel"].format
        ('uint4', 'int8')
        >>> v = {"embed": {"embedding": jnp.ones((100, 16))}, "out": {"kernel": jnp.ones((16, 4))}}
        >>> q = jqx.quantize(v, jqx.int8_weight_only(), embeddings=True)
        >>> q["embed"]["embedding"].block  # one scale per row
        (1, 16)
        >>> w = {"kernel": jnp.ones((64, 32))}
        >>> jqx.quantize(w, jqx.int8_weight_only(), prepack=False)["kernel"].code_layout
        'plain'
        >>> jqx.quantize(w, jqx.int8_weight_only(), prepack=True)["kernel"].qvalue.shape
        (2, 16, 64)
    """
    check_prepack("jqx.quantize", prepack)
    return pack_default(_apply.quantize(params, recipe, filter_fn, embeddings=embeddings), prepack)


def check_prepack(where: str, prepack: Any) -> None:
    """Raises TypeError unless ``prepack`` is None, True or False."""
    if not (prepack is None or isinstance(prepack, bool)):
        raise TypeError(
            f"{where}(prepack={prepack!r}): use None (pack the int8 weights where the native "
            "GEMM runs), True (pack them anyway) or False (keep the plain layout)."
        )


def pack_default(tree: Any, prepack: bool | None) -> Any:
    """``tree`` packed for the native GEMM as ``jqx.quantize(prepack=)`` says: ``True``
    every eligible int8 weight; ``None`` those whose panels need no padding (``K`` a
    multiple of 4, ``N`` of 16: the bytes do not change), and only where the GEMM runs
    (:func:`jqx.ops.native_status`) in a process with one device (with several, the tree
    is most likely about to be sharded, which the plain layout allows along any axis);
    ``False`` none."""
    if prepack is False:
        return tree
    whole = prepack is None
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)[0]
    if not any(_packable(p, leaf, whole) for p, leaf in leaves):
        return tree  # nothing to pack: no platform query (it builds the native kernels)
    if whole and (dispatch.native_status() != "available" or jax.device_count() != 1):
        return tree
    return _pack(tree, whole_panels=whole)


def _packable(path, leaf: Any, whole_panels: bool) -> bool:
    """Whether the native GEMM can read ``leaf`` packed (with ``whole_panels``: and its
    panels of 4 rows x 16 columns need no padding). Convolution kernels run on the
    convolution paths, which read (K, N) codes."""
    if not is_qarray(leaf) or not vnni_eligible(leaf) or is_conv_kernel(path_str(path), leaf.ndim):
        return False
    k, n = leaf._vnni_kn()
    return not (whole_panels and (k % 4 or n % 16))


def _pack(tree: Any, *, whole_panels: bool) -> Any:
    """``tree`` with every :func:`_packable` QArray in the panel layout."""
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: leaf.with_code_layout("vnni") if _packable(p, leaf, whole_panels) else leaf,
        tree,
        is_leaf=is_qarray,
    )
