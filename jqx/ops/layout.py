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

See docs/guide/run.md ("CPU serving: pack int8 weights once").
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import jax

from jqx.core.numerics import is_conv_kernel
from jqx.core.qarray import QArray, is_qarray, vnni_eligible
from jqx.core.tree import path_str
from jqx.ops import dispatch

__all__ = ["prepack"]


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
        >>> q = jqx.quantize({"kernel": jnp.ones((64, 32))}, jqx.int8_weight_only())
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
    target = "plain" if layout == "plain" else "vnni"

    def one(path, leaf):
        if not is_qarray(leaf):
            return leaf
        q: QArray = leaf
        if target == "plain":
            return q.with_code_layout("plain")
        # Convolution kernels run on the convolution paths, which read (K, N) codes.
        if vnni_eligible(q) and not is_conv_kernel(path_str(path), q.ndim):
            return q.with_code_layout("vnni")
        return q

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_qarray)
