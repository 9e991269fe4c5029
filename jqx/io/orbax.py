"""Quantized trees in orbax-checkpoint: save, check and restore (sharded) QArrays.

A :class:`jqx.QArray` is a pytree whose children are arrays (codes, scales, ...), so
orbax saves it like any other state, asynchronously and from many hosts. What orbax
does not keep are its *static* fields (format, block, activation spec, ...): they live
in the pytree structure, which a restore takes from the target the caller passes.
Restoring W8A8 data into an int8 weight-only target would therefore succeed and run
the wrong computation. These helpers close that gap:

- :func:`save_args` wraps the tree in ``orbax.checkpoint.args.StandardSave`` with a
  description of every QArray's static fields in the item's custom metadata;
- :func:`restore` reads that description, checks it against the target (an error
  names the tensor and both descriptions), and restores onto the target's devices or
  onto a new ``mesh`` (codes and scales sharded consistently, as
  :func:`jqx.sharding.tree_shardings` places them);
- :func:`restore_args` and :func:`check` are the two halves, for callers that drive
  orbax themselves (e.g. inside an ``ocp.args.Composite``).

Needs ``orbax-checkpoint`` (``pip install 'jqx[orbax]'``); see
``docs/guide/checkpoints.md``.

Example:
    >>> import tempfile, os, jax.numpy as jnp, jqx
    >>> import orbax.checkpoint as ocp
    >>> from jqx.io import orbax as jqo
    >>> state = {"w": jqx.quantize({"kernel": jnp.ones((8, 4))}, jqx.int8_weight_only())}
    >>> mngr = ocp.CheckpointManager(tempfile.mkdtemp())
    >>> mngr.save(1, args=jqo.save_args(state))
    True
    >>> mngr.wait_until_finished()
    >>> jqo.restore(mngr, 1, state)["w"]["kernel"].format
    'int8'
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import Mesh

from jqx.core.qarray import is_qarray
from jqx.core.sharding import tree_shardings
from jqx.core.tree import path_str
from jqx.io.checkpoint import FORMAT_VERSION, CheckpointError, qarray_static

__all__ = ["describe", "save_args", "restore_args", "check", "restore"]

# The key under which the description sits in the item's custom metadata.
KEY = "jqx"


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "jqx.io.orbax needs orbax-checkpoint: pip install 'jqx[orbax]' "
            "(or pip install orbax-checkpoint)."
        ) from None
    return ocp


def describe(tree: Any) -> dict[str, Any]:
    """The JSON description :func:`save_args` stores: each QArray's static fields by path.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> t = {"d": jqx.quantize({"kernel": jnp.ones((8, 4))}, jqx.int8_weight_only())}
        >>> sorted(describe(t)["qarrays"])
        ['d/kernel']
    """
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)[0]:
        if is_qarray(leaf):
            out[path_str(path)] = qarray_static(leaf)
    return {"version": str(FORMAT_VERSION), "qarrays": out}


def save_args(tree: Any, *, custom_metadata: Mapping[str, Any] | None = None):
    """``ocp.args.StandardSave(tree)`` that also records every QArray's static fields.

    Args:
      tree: the state to save (QArrays, arrays, optax states, ...).
      custom_metadata: optional JSON dict of your own, stored beside jqx's entry
        (the key ``"jqx"`` is jqx's).

    Returns:
      The save args, for ``CheckpointManager.save(step, args=...)``,
      ``Checkpointer.save(path, args=...)`` or an ``ocp.args.Composite``.

    Raises:
      ValueError: ``custom_metadata`` is not a JSON dict or uses the key ``"jqx"``.
    """
    ocp = _ocp()
    meta = dict(custom_metadata or {})
    if KEY in meta:
        raise ValueError(
            f"custom_metadata has the key {KEY!r}, which jqx uses for its own description; "
            "rename that entry."
        )
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"custom_metadata is not JSON-serialisable ({e}); pass str keys and JSON values."
        ) from None
    meta[KEY] = describe(tree)
    return ocp.args.StandardSave(tree, custom_metadata=meta)


def _abstract(target: Any, mesh: Mesh | None, spec_fn) -> Any:
    def sds(x, sharding=None):
        sharding = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    if mesh is None:
        return jax.tree.map(sds, target)
    shardings = tree_shardings(target, mesh, spec_fn or (lambda p, x: None))
    return jax.tree.map(sds, target, shardings)


def restore_args(
    target: Any,
    *,
    mesh: Mesh | None = None,
    spec_fn: Callable[[str, Any], Any] | None = None,
):
    """``ocp.args.StandardRestore`` for a target that holds QArrays.

    Args:
      target: a tree with the structure to restore into (arrays or
        ``jax.ShapeDtypeStruct`` leaves; QArrays give the static fields).
      mesh: optional mesh to place the restored leaves on (may differ from the
        mesh the checkpoint was saved from).
      spec_fn: with ``mesh``: ``(path, leaf) -> PartitionSpec | None`` for the
        *logical* array at ``path``; None replicates. Without ``mesh`` each leaf
        goes where the target's leaf is (its ``sharding``), else to the default
        device.

    Returns:
      The restore args. Restoring with them does not check the static fields:
      call :func:`check` first, or use :func:`restore`.
    """
    if spec_fn is not None and mesh is None:
        raise ValueError("spec_fn= needs mesh=: pass the mesh the specs refer to.")
    return _ocp().args.StandardRestore(_abstract(target, mesh, spec_fn))


def _stored_description(meta: Any) -> dict[str, Any] | None:
    """jqx's entry from a StepMetadata, TreeMetadata or plain custom-metadata dict."""
    for obj in (meta, getattr(meta, "item_metadata", None)):
        cm = obj if isinstance(obj, Mapping) else getattr(obj, "custom_metadata", None)
        if isinstance(cm, Mapping) and KEY in cm:
            return cm[KEY]
    return None


def check(stored: Any, target: Any, *, where: str = "checkpoint") -> None:
    """Raises :class:`jqx.CheckpointError` unless ``target``'s QArrays are the stored ones.

    Args:
      stored: the item's metadata (``CheckpointManager.item_metadata(step)``,
        ``Checkpointer.metadata(path)``) or the custom-metadata dict itself.
      target: the tree the caller will restore into.
      where: the checkpoint's name, for the message.
    """
    desc = _stored_description(stored)
    if desc is None:
        raise CheckpointError(
            f"{where} has no jqx description of its QArrays (it was saved without "
            "jqx.io.orbax.save_args), so their formats and activation specs cannot be "
            "checked. Save with save_args, or restore with orbax directly if you are sure "
            "the target's recipe is the one that made the checkpoint."
        )
    version = str(desc.get("version", ""))
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: jqx description version {version!r} is newer than this jqx reads "
            f"({FORMAT_VERSION}); upgrade jqx."
        )
    have = desc.get("qarrays", {})
    want = describe(target)["qarrays"]
    for path in sorted(set(have) | set(want)):
        if path not in want:
            raise CheckpointError(
                f"{where}, tensor {path!r}: the checkpoint holds a QArray "
                f"({have[path]['format']}) where the target has a plain array; build the "
                "target with the recipe that made the checkpoint."
            )
        if path not in have:
            raise CheckpointError(
                f"{where}, tensor {path!r}: the target expects a QArray ({want[path]['format']}) "
                "where the checkpoint holds a plain array."
            )
        if have[path] != want[path]:
            diff = {
                k: (have[path].get(k), v) for k, v in want[path].items() if have[path].get(k) != v
            }
            detail = "; ".join(f"{k}: checkpoint {a!r}, target {b!r}" for k, (a, b) in diff.items())
            if set(diff) == {"code_layout"}:  # jqx.quantize packs where the native GEMM runs
                have_l, want_l = (v or "plain" for v in diff["code_layout"])
                raise CheckpointError(
                    f"{where}, tensor {path!r}: the checkpoint's codes are in the {have_l!r} "
                    f"layout and the target's in {want_l!r}; build the target in the "
                    "checkpoint's layout (jqx.quantize(..., prepack=False) for 'plain', "
                    "jqx.prepack(target, layout='vnni') for 'vnni'), then jqx.prepack the "
                    "restored tree to the layout you run."
                )
            raise CheckpointError(
                f"{where}, tensor {path!r}: the checkpoint's QArray differs from the "
                f"target's ({detail}); build the target with the recipe that made the "
                "checkpoint."
            )


def restore(
    checkpointer: Any,
    step_or_path: Any,
    target: Any,
    *,
    mesh: Mesh | None = None,
    spec_fn: Callable[[str, Any], Any] | None = None,
) -> Any:
    """Checks and restores a tree with QArrays from an orbax checkpoint.

    Args:
      checkpointer: an ``ocp.CheckpointManager`` (then ``step_or_path`` is the
        step) or an ``ocp.Checkpointer`` / ``ocp.StandardCheckpointer`` (then it is
        the checkpoint's directory).
      step_or_path: the step, or the directory.
      target: the tree to restore into (see :func:`restore_args`).
      mesh: optional mesh to place the leaves on (may differ from the saving one).
      spec_fn: with ``mesh``: the logical ``PartitionSpec`` per path (None
        replicates).

    Returns:
      The restored tree, with the target's structure and QArray static fields.

    Raises:
      CheckpointError: the checkpoint was not saved with :func:`save_args`, or a
        QArray differs from the target's (named by its path).
    """
    ocp = _ocp()
    args = restore_args(target, mesh=mesh, spec_fn=spec_fn)
    if isinstance(checkpointer, ocp.CheckpointManager):
        where = f"checkpoint step {step_or_path} in {checkpointer.directory}"
        check(checkpointer.item_metadata(step_or_path), target, where=where)
        return checkpointer.restore(step_or_path, args=args)
    where = f"checkpoint {step_or_path}"
    check(checkpointer.metadata(step_or_path), target, where=where)
    if isinstance(checkpointer, ocp.StandardCheckpointer):
        return checkpointer.restore(step_or_path, args.item)
    return checkpointer.restore(step_or_path, args=args)
