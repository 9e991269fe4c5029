"""Sharding quantized parameter trees consistently with their codes.

A QArray's children have different shapes from the logical array: packed
4-bit codes halve the last axis, scales and zero points have one entry per
block (``shape // block``), ``in_scale`` is broadcastable (e.g. ``(K, 1)``).
Given the :class:`jax.sharding.PartitionSpec` of the *logical* weight, each
child gets the same mesh axis on the same logical axis wherever that keeps
shards aligned with blocks (the axis has more than one block and the block
count divides evenly over the mesh axis); otherwise that axis of the child
is replicated, which is always consistent. ``act_scale`` is replicated.

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> from jax.sharding import PartitionSpec as P
    >>> q = jqx.quantize_array(jnp.ones((64, 32)), "uint4", scheme="zero_point",
    ...                        granularity=jqx.per_group(16, axis=0))
    >>> specs = jqx.sharding.qarray_specs(q, P(None, "model"), {"model": 2})
    >>> specs.qvalue, specs.scale
    (P(None, 'model'), P(None, 'model'))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jqx.core.qarray import QARRAY_CHILDREN, QArray, is_qarray
from jqx.core.tree import path_str

__all__ = ["qarray_specs", "tree_shardings", "shard"]

SpecFn = Callable[[str, Any], "PartitionSpec | None"]


def _axis_size(entry, sizes: Mapping[str, int]) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(int(sizes[n]) for n in names)


def _child_spec(child_shape, logical_shape, entries, sizes, path, child) -> PartitionSpec:
    """Spec for one child whose axes align with the logical axes from the right."""
    nd, ln = len(child_shape), len(logical_shape)
    out = []
    for j, n in enumerate(child_shape):
        i = j + (ln - nd)
        e = entries[i] if 0 <= i < ln else None
        if e is not None and n > 1 and n % _axis_size(e, sizes) == 0:
            out.append(e)
        else:
            out.append(None)
    return PartitionSpec(*out)


def qarray_specs(
    q: QArray, spec: PartitionSpec | None, axis_sizes: Mapping[str, int], path: str = ""
) -> QArray:
    """PartitionSpecs for each child of ``q``, from the spec of the logical array.

    Args:
      q: the QArray.
      spec: PartitionSpec of the logical (dequantized) array, or None (replicated).
      axis_sizes: mesh axis name -> size (e.g. ``dict(mesh.shape)``).
      path: the leaf's path, for error messages.

    Returns:
      A QArray with the same static metadata whose children are PartitionSpecs
      (None children stay None).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> from jax.sharding import PartitionSpec as P
        >>> q = jqx.quantize_array(jnp.ones((8, 4)), "int8", granularity=jqx.per_channel(-1))
        >>> jqx.sharding.qarray_specs(q, P(None, "m"), {"m": 2}).scale
        P(None, 'm')
    """
    entries = tuple(spec) if spec is not None else ()
    if len(entries) > len(q.shape):
        raise ValueError(
            f"the PartitionSpec {spec} for {path or 'a QArray'} has {len(entries)} entries but the "
            f"array has shape {q.shape}; give at most one entry per axis."
        )
    for e in entries:
        for n in e if isinstance(e, tuple) else (e,):
            if n is not None and n not in axis_sizes:
                raise ValueError(
                    f"the PartitionSpec {spec} for {path or 'a QArray'} names mesh axis {n!r}, but "
                    f"the mesh has axes {tuple(axis_sizes)}."
                )
    entries = entries + (None,) * (len(q.shape) - len(entries))
    for i, (e, s) in enumerate(zip(entries, q.shape, strict=True)):
        if e is not None and s % _axis_size(e, axis_sizes):
            raise ValueError(
                f"{path or 'a QArray'}: axis {i} (size {s}) does not divide over mesh axis {e!r} "
                f"(size {_axis_size(e, axis_sizes)}); pick a mesh axis whose size divides it or "
                "leave that axis unsharded (None)."
            )

    if q.code_layout == "kn":
        # Children hold the (in, out) transpose: their specs are the view's, whose
        # axes are this weight's swapped.
        view = qarray_specs(q._kn_view(), PartitionSpec(entries[1], entries[0]), axis_sizes, path)
        specs = q.replace(**{name: getattr(view, name) for name in QARRAY_CHILDREN})
        return specs.replace(g_idx=None if q.g_idx is None else PartitionSpec())

    # With a group index, any row of the group axis may read any group's scale: the
    # per-group children stay whole along that axis (g_idx itself is replicated).
    group_free = entries
    if q.g_idx is not None:
        ga = q.group_axis() - (len(q.qvalue.shape) - len(q.shape))
        group_free = tuple(None if i == ga else e for i, e in enumerate(entries))

    def child(name):
        v = getattr(q, name)
        if v is None:
            return None
        if name in ("act_scale", "g_idx"):
            return PartitionSpec()
        if name == "qvalue" and q.code_layout == "vnni":
            return _vnni_spec(q, entries, axis_sizes, path)
        per_group = name in ("scale", "zero_point", "super_scale", "super_zero")
        ents = group_free if per_group else entries
        return _child_spec(tuple(v.shape), q.shape, ents, axis_sizes, path, name)

    return q.replace(
        qvalue=child("qvalue"),
        scale=child("scale"),
        zero_point=child("zero_point"),
        in_scale=child("in_scale"),
        act_scale=child("act_scale"),
        qhigh=child("qhigh"),
        super_scale=child("super_scale"),
        super_zero=child("super_zero"),
        g_idx=child("g_idx"),
    )


def _vnni_spec(q: QArray, entries, axis_sizes, path: str) -> PartitionSpec:
    """The spec of ``"vnni"`` panels ``(ceil(N/16), ceil(K/4), 64)`` (``jqx.prepack``)
    from the logical entries: K's and N's mesh axes move to the panel axes, when every
    shard holds whole panels (N a multiple of 16 per shard, K of 4)."""
    k_axes, n_axes = q._vnni_axes()
    k_ents = [entries[a] for a in k_axes if entries[a] is not None]
    n_ents = [entries[a] for a in n_axes if entries[a] is not None]
    if len(k_ents) > 1 or len(n_ents) > 1:
        raise ValueError(
            f"{path or 'a QArray'} is packed for the native int8 GEMM (code_layout='vnni'), "
            f"so its input axes {tuple(q.shape[a] for a in k_axes)} and output axes "
            f"{tuple(q.shape[a] for a in n_axes)} can "
            f"each take one mesh axis; the spec gives {tuple(entries)}. Unpack it first with "
            "jqx.prepack(tree, layout='plain')."
        )
    k, n = q._vnni_kn()
    ek = k_ents[0] if k_ents else None
    en = n_ents[0] if n_ents else None
    for e, size, unit, what in ((ek, k, 4, "K"), (en, n, 16, "N")):
        # One shard holds every (padded) panel whatever the size.
        ways = 1 if e is None else _axis_size(e, axis_sizes)
        if ways > 1 and size % (unit * ways):
            raise ValueError(
                f"{path or 'a QArray'} is packed for the native int8 GEMM (code_layout='vnni'): "
                f"its panels split {what}={size} in units of {unit}, which do not divide over "
                f"mesh axis {e!r} (size {_axis_size(e, axis_sizes)}). Unpack it first with "
                "jqx.prepack(tree, layout='plain'), or shard another axis."
            )
    return PartitionSpec(en, ek, None)


def tree_shardings(tree, mesh: Mesh, spec_fn: SpecFn):
    """A tree of :class:`NamedSharding` matching ``tree`` (QArrays child by child).

    Args:
      tree: params with float leaves and/or QArrays.
      mesh: the device mesh.
      spec_fn: ``(path, leaf) -> PartitionSpec | None`` giving the spec of
        the *logical* array (for a QArray: its dequantized shape); None
        replicates.

    Returns:
      A pytree usable as ``jax.device_put(tree, shardings)`` or as
      ``jax.jit(..., in_shardings=...)``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jqx
        >>> from jax.sharding import Mesh, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
        >>> t = jqx.quantize({"kernel": jnp.ones((8, 4))}, jqx.int8_weight_only())
        >>> s = jqx.sharding.tree_shardings(t, mesh, lambda p, x: P(None, "model"))
        >>> s["kernel"].qvalue.spec
        P(None, 'model')
    """
    sizes = dict(mesh.shape)

    def f(path, leaf):
        p = path_str(path)
        spec = spec_fn(p, leaf)
        if is_qarray(leaf):
            specs = qarray_specs(leaf, spec, sizes, p)
            return jax.tree_util.tree_map(
                lambda s: NamedSharding(mesh, s),
                specs,
                is_leaf=lambda x: isinstance(x, PartitionSpec),
            )
        if spec is not None and len(tuple(spec)) > getattr(leaf, "ndim", 0):
            raise ValueError(
                f"the PartitionSpec {spec} for {p} has more entries than the leaf's "
                f"{getattr(leaf, 'ndim', 0)} dims (shape {getattr(leaf, 'shape', ())})."
            )
        return NamedSharding(mesh, spec if spec is not None else PartitionSpec())

    return jax.tree_util.tree_map_with_path(f, tree, is_leaf=is_qarray)


def shard(tree, mesh: Mesh, spec_fn: SpecFn):
    """Places ``tree`` on ``mesh``: ``jax.device_put(tree, tree_shardings(tree, mesh, spec_fn))``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, jqx
        >>> from jax.sharding import Mesh, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
        >>> t = jqx.shard(jqx.quantize({"kernel": jnp.ones((8, 4))}, jqx.int8_weight_only()),
        ...               mesh, lambda p, x: P(None, "model"))
        >>> t["kernel"].qvalue.sharding.spec
        P(None, 'model')
    """
    return jax.device_put(tree, tree_shardings(tree, mesh, spec_fn))
