"""jqx's own checkpoint format: save and load quantized trees exactly and safely.

One file in the safetensors layout (an 8-byte little-endian header size, a JSON
header, then the raw bytes of every tensor), so ``safetensors`` can read its
tensors. jqx's own description sits in the header's ``__metadata__``: a versioned
(``"jqx_format": "1"``) JSON record of the tree structure, of every QArray's static
fields (format, logical shape and dtype, block, activation spec, layout extensions)
and of every tensor's real dtype, shape and CRC-32. :func:`load` memory-maps the
file and rebuilds the same pytree, each array copied once from the mapping (never
through a float copy). See ``docs/guide/checkpoints.md``.

Example:
    >>> import tempfile, os, jax.numpy as jnp, jqx
    >>> from jqx.io.checkpoint import save, load
    >>> tree = jqx.quantize({"dense": {"kernel": jnp.ones((8, 4))}}, jqx.int8_weight_only())
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> save(path, tree, metadata={"step": 10})
    >>> back = load(path)
    >>> back["dense"]["kernel"].format, read_metadata(path)["step"]
    ('int8', 10)
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tempfile
import uuid
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from jqx.core.numerics import stored_qarray
from jqx.core.qarray import QARRAY_CHILDREN, ActSpec, QArray, is_qarray
from jqx.core.sharding import tree_shardings
from jqx.recipes.base import Recipe

__all__ = ["CheckpointError", "FORMAT_VERSION", "save", "load", "read_metadata", "read_recipe"]

FORMAT_VERSION = 1

# A header larger than this is not a header (safetensors uses the same bound).
_MAX_HEADER = 100 * 1024 * 1024

# numpy dtype name -> safetensors dtype; anything else (ml_dtypes fp8, int4, fp4, ...) is
# stored as raw bytes ("U8"), which every safetensors reader can load whatever its numpy.
_ST_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file, the
    tensor (or tree path) and the problem."""


# --------------------------------------------------------------------------- dtypes


def _np_dtype(name: str, path: str, tensor: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        pass
    if hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    raise CheckpointError(
        f"{path}: tensor {tensor!r} has dtype {name!r}, which this numpy/ml_dtypes cannot "
        "represent; upgrade ml_dtypes."
    )


# --------------------------------------------------------------------------- writing


def qarray_static(x: QArray) -> dict[str, Any]:
    """A QArray's static fields as JSON values: what its arrays alone do not say.

    Checkpoints store it beside the codes and scales; two QArrays with equal arrays but
    different static fields (e.g. W8A8 and int8 weight-only) differ here.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.quantize_array(jnp.ones((4, 8)), "int8")
        >>> qarray_static(q)["format"], qarray_static(q)["act"]
        ('int8', None)
    """
    out = {
        "format": x.format,
        "shape": list(x.shape),
        "dtype": str(x.dtype),
        "block": list(x.block),
        "act": None if x.act is None else dataclasses.asdict(x.act),
        "zero_kind": x.zero_kind,
        "code_bits": x.code_bits,
        "super_block": None if x.super_block is None else list(x.super_block),
    }
    if x.code_layout != "plain":  # "vnni" (jqx.prepack) or "kn"; absent means "plain"
        out["code_layout"] = x.code_layout
    return out


class _Writer:
    """Walks a tree into a JSON structure, collecting the tensors in order."""

    def __init__(self, path: str):
        self.path = path
        self.tensors: list[tuple[str, np.ndarray]] = []
        self.names: set[str] = set()

    def _name(self, path: str) -> str:
        name = path or "<root>"
        if name in self.names:
            i = 1
            while f"{name}#{i}" in self.names:
                i += 1
            name = f"{name}#{i}"
        self.names.add(name)
        return name

    def tensor(self, x, path: str) -> dict:
        rec: dict[str, Any] = {}
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            rec["prng_impl"] = str(jax.random.key_impl(x))
            x = jax.random.key_data(x)
        # (np.ascontiguousarray would turn a 0-d array into 1-d)
        a = np.require(np.asarray(x), requirements="C")
        name = self._name(path)
        self.tensors.append((name, a))
        rec.update(name=name, dtype=a.dtype.name, shape=list(a.shape))
        return rec

    def node(self, x, path: str) -> dict:
        def sub(k):
            return f"{path}/{k}" if path else str(k)

        if x is None:
            return {"t": "none"}
        if isinstance(x, QArray):
            children = {}
            for c in QARRAY_CHILDREN:
                v = getattr(x, c)
                children[c] = None if v is None else self.tensor(v, f"{path}.{c}")
            return {"t": "qarray", "static": qarray_static(x), "children": children}
        if isinstance(x, (jax.Array, np.ndarray)):
            kind = "numpy" if isinstance(x, np.ndarray) else "jax"
            return {"t": kind, **self.tensor(x, path)}
        variable = _nnx_variable_type(x, self.path, path)
        if variable is not None:
            meta = dict(x.get_metadata())
            enc = _encode_meta(meta)
            try:
                ok = _decode_meta(json.loads(json.dumps(enc))) == meta
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise CheckpointError(
                    f"{self.path}: the nnx {variable} at {path or '<root>'!r} has metadata "
                    f"{meta!r} that JSON cannot hold exactly (str keys; str, number, bool, None, "
                    "list, tuple and dict values); drop or simplify that metadata first."
                )
            meta = enc
            return {
                "t": "nnx_variable",
                "cls": variable,
                "meta": meta,
                "value": self.node(x.get_value(), path),
            }
        if isinstance(x, Mapping):
            keys, values = [], []
            # State.items() wraps nested dicts in State; its own mapping holds them as
            # stored, so the rebuilt State has the same pytree structure.
            items = x._mapping if _is_nnx_state(x) and hasattr(x, "_mapping") else x
            for k, v in items.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise CheckpointError(
                        f"{self.path}: the mapping at {path or '<root>'!r} has key {k!r} of type "
                        f"{type(k).__name__}; checkpoints accept str or int keys. Convert the "
                        "keys to strings first."
                    )
                keys.append(k)
                values.append(self.node(v, sub(k)))
            t = "nnx_state" if _is_nnx_state(x) else "dict"
            return {"t": t, "keys": keys, "values": values}
        if isinstance(x, (list, tuple)) and type(x) in (list, tuple):
            return {
                "t": type(x).__name__,
                "values": [self.node(v, sub(i)) for i, v in enumerate(x)],
            }
        raise CheckpointError(
            f"{self.path}: the leaf at {path or '<root>'!r} is a {type(x).__module__}."
            f"{type(x).__qualname__}; checkpoints hold nested dict/list/tuple/None, jax or numpy "
            "arrays, jqx.QArray and flax.nnx State/Variables. Convert it to an array (e.g. "
            "np.asarray) or drop it from the tree."
        )


def _is_nnx_state(x) -> bool:
    t = type(x)
    return t.__name__ == "State" and t.__module__.startswith("flax.nnx")


def _encode_meta(v):
    """JSON for Variable metadata, tuples tagged so they come back as tuples."""
    if isinstance(v, tuple):
        return {"__tuple__": [_encode_meta(e) for e in v]}
    if isinstance(v, list):
        return [_encode_meta(e) for e in v]
    if isinstance(v, dict):
        return {k: _encode_meta(e) for k, e in v.items()}
    return v


def _decode_meta(v):
    if isinstance(v, dict):
        if set(v) == {"__tuple__"}:
            return tuple(_decode_meta(e) for e in v["__tuple__"])
        return {k: _decode_meta(e) for k, e in v.items()}
    if isinstance(v, list):
        return [_decode_meta(e) for e in v]
    return v


def _nnx_variable_type(x, file: str, path: str) -> str | None:
    """The class name of a flax.nnx Variable (``"Param"``), else None."""
    for t in type(x).__mro__:
        if t.__name__ == "Variable" and t.__module__.startswith("flax.nnx"):
            cls = type(x)
            if not cls.__module__.startswith("flax.nnx"):
                raise CheckpointError(
                    f"{file}: the leaf at {path or '<root>'!r} is the nnx Variable subclass {cls.__module__}.{cls.__qualname__} is not one of "
                    "flax.nnx's own; checkpoints rebuild flax.nnx Variable types only. Convert the "
                    "state with nnx.State.to_pure_dict() first."
                )
            return cls.__qualname__
    return None


def _bytes(a: np.ndarray) -> np.ndarray:
    # ml_dtypes arrays do not export the buffer protocol; their uint8 view does.
    return a.reshape(-1).view(np.uint8)


INDEX = "jqx-index.json"


def _recipe_record(recipe) -> Any:
    """The recipe (or rules) as JSON: each recipe's repr, which rebuilds it."""
    if recipe is None:
        return None
    if isinstance(recipe, Recipe):
        return repr(recipe)
    if isinstance(recipe, str):
        return recipe
    if isinstance(recipe, Mapping) and all(isinstance(k, str) for k in recipe):
        return {k: None if r is None else _recipe_record(r) for k, r in recipe.items()}
    raise CheckpointError(
        f"recipe={recipe!r} must be a jqx recipe, a rules dict {{regex: recipe or None}} or a "
        "string; pass the recipe given to jqx.quantize."
    )


def _user_json(path: str, metadata) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise CheckpointError(
            f"{path}: metadata={metadata!r} must be a dict with str keys and JSON values."
        )
    try:
        return json.dumps(dict(metadata))
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: metadata is not JSON-serialisable ({e}); pass str keys and JSON "
            "values (str, numbers, bools, None, lists, dicts)."
        ) from None


def _fsync_dir(directory: str) -> None:
    # A rename is durable only once the directory entry is on disk.
    if hasattr(os, "O_DIRECTORY"):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Runs ``write(f)`` on a temporary file beside ``path``, then flushes, fsyncs and
    renames it over ``path``: a killed process leaves the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _write_file(path: str, tensors: list[tuple[str, np.ndarray]], meta: dict[str, str]) -> None:
    """One safetensors file holding ``tensors``, with jqx's ``meta`` and per-tensor records."""
    header: dict[str, Any] = {}
    records = {}
    offset = 0
    for name, a in tensors:
        n = a.nbytes
        st = _ST_DTYPES.get(a.dtype.name)
        shape = list(a.shape) if st is not None else [n]
        header[name] = {
            "dtype": st or "U8",
            "shape": shape,
            "data_offsets": [offset, offset + n],
        }
        records[name] = {
            "dtype": a.dtype.name,
            "shape": list(a.shape),
            "crc32": zlib.crc32(_bytes(a)) if n else 0,
        }
        offset += n
    header["__metadata__"] = {
        "jqx_format": str(FORMAT_VERSION),
        **meta,
        "jqx_tensors": json.dumps(records, separators=(",", ":")),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    # safetensors pads the header with spaces so the data starts 8-byte aligned.
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, a in tensors:
            if a.nbytes:
                f.write(_bytes(a))

    _atomic_write(path, write)


def save(
    path: str | os.PathLike,
    tree: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    recipe: Any = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes ``tree`` to one checkpoint file (or a directory of shards), atomically.

    The bytes go to a temporary file in the same directory, which is flushed,
    fsynced and renamed over ``path``: a process killed mid-write leaves the old
    file (or none) in place, never a torn one. With ``max_shard_bytes``, ``path`` is a
    directory: the tensors go to shard files of at most that many bytes (a larger
    tensor gets a shard of its own), then ``jqx-index.json`` (the tree, and which
    shard holds each tensor) is renamed into place last, and only then are the
    previous save's shards removed; a killed save leaves the previous index and its
    shards intact.

    Args:
      path: the file to write (``.safetensors`` by convention), or the directory
        with ``max_shard_bytes``.
      tree: nested dict (linen ``FrozenDict`` is saved as a dict) / list / tuple /
        None, jax or numpy arrays, :class:`jqx.QArray` s, or a ``flax.nnx.State``
        (rebuilt as one on load).
      metadata: optional user dict (str keys, JSON-serialisable values), returned by
        :func:`read_metadata`.
      recipe: optional recipe (or ``{regex: recipe}`` rules) that made the tree,
        recorded as its repr and returned by :func:`read_recipe`.
      max_shard_bytes: write a directory of shards of at most this many bytes
        (e.g. ``4 * 2**30``) instead of one file.

    Raises:
      CheckpointError: an unsupported leaf or key (named by its tree path), or
        metadata that is not JSON-serialisable.

    Example:
        >>> import tempfile, os, numpy as np
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> save(p, {"w": np.arange(3, dtype=np.int8)})
        >>> load(p)["w"].tolist()
        [0, 1, 2]
    """
    path = os.fspath(path)
    user = _user_json(path, metadata)
    rec = json.dumps(_recipe_record(recipe))
    if max_shard_bytes is not None and (
        isinstance(max_shard_bytes, bool)
        or not isinstance(max_shard_bytes, (int, np.integer))
        or max_shard_bytes < 1
    ):
        raise CheckpointError(
            f"{path}: max_shard_bytes={max_shard_bytes!r} must be a positive int (bytes per "
            "shard, e.g. 4 * 2**30), or None for one file."
        )
    w = _Writer(path)
    structure = json.dumps(w.node(tree, ""), separators=(",", ":"))
    meta = {"jqx_tree": structure, "jqx_user": user, "jqx_recipe": rec}
    if max_shard_bytes is None:
        _write_file(path, w.tensors, meta)
        return
    _save_shards(path, w.tensors, meta, int(max_shard_bytes))


def _save_shards(path: str, tensors, meta: dict[str, str], max_bytes: int) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(
            f"{path} is a file; a sharded save (max_shard_bytes=) writes a directory. Pass "
            "another path or remove the file."
        )
    os.makedirs(path, exist_ok=True)
    groups: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, a in tensors:
        if groups[-1] and size + a.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, a))
        size += a.nbytes
    # A fresh prefix per save: the previous index's shards are never overwritten.
    prefix = f"jqx-{uuid.uuid4().hex[:8]}"
    n = len(groups)
    shards: dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        flat = {
            "t": "dict",
            "keys": [name for name, _ in group],
            "values": [
                {"t": "jax", "name": name, "dtype": a.dtype.name, "shape": list(a.shape)}
                for name, a in group
            ],
        }
        _write_file(
            os.path.join(path, fname),
            group,
            {"jqx_tree": json.dumps(flat, separators=(",", ":")), "jqx_shard_of": INDEX},
        )
        shards.update((name, fname) for name, _ in group)
    index = {"jqx_format": str(FORMAT_VERSION), **meta, "jqx_shards": shards}
    raw = json.dumps(index, separators=(",", ":")).encode()
    _atomic_write(os.path.join(path, INDEX), lambda f: f.write(raw))
    # Only now is the previous save unreferenced.
    keep = set(shards.values())
    for old in os.listdir(path):
        if old.startswith("jqx-") and old.endswith(".safetensors") and old not in keep:
            os.unlink(os.path.join(path, old))


# --------------------------------------------------------------------------- reading


class _File:
    """A parsed, checked checkpoint header and a memory map of its data."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    self._fail(f"is truncated: {size} bytes, shorter than the 8-byte header size")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    self._fail(
                        f"has a bad or truncated header: it declares {n} header bytes but the "
                        f"file has {size} bytes; it is not a jqx checkpoint or was cut short"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._fail(f"has a bad header (not JSON: {e}); it is not a jqx checkpoint")
        meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
        if not isinstance(meta, dict) or "jqx_format" not in meta:
            self._fail(
                "is a safetensors file without jqx's metadata (no 'jqx_format'); read it with "
                "the safetensors package instead"
            )
        try:
            version = int(meta["jqx_format"])
        except ValueError:
            self._fail(f"has a bad jqx_format={meta['jqx_format']!r}")
        if version > FORMAT_VERSION:
            self._fail(
                f"has jqx_format {version}, newer than this jqx reads ({FORMAT_VERSION}); "
                "upgrade jqx to load it"
            )
        try:
            self.tree = json.loads(meta["jqx_tree"])
            self.records = json.loads(meta["jqx_tensors"])
            self.user = json.loads(meta.get("jqx_user", "{}"))
            self.recipe = json.loads(meta.get("jqx_recipe", "null"))
        except (KeyError, json.JSONDecodeError) as e:
            self._fail(f"has a bad jqx header ({type(e).__name__}: {e})")
        self.header = header
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        self._mm = None

    def _fail(self, problem: str, tensor: str | None = None):
        where = f", tensor {tensor!r}" if tensor is not None else ""
        raise CheckpointError(f"checkpoint {self.path}{where} {problem}.")

    def mm(self) -> np.ndarray:
        if self._mm is None:
            if self.data_size == 0:
                self._mm = np.zeros(0, np.uint8)
            else:
                # Copy-on-write: arrays that alias the mapping can never write into the file.
                self._mm = np.memmap(
                    self.path, np.uint8, mode="c", offset=self.data_start, shape=self.data_size
                )
        return self._mm

    def array(self, name: str, verify: bool) -> np.ndarray:
        """A view of tensor ``name`` in the mapping, checked against its record."""
        rec = self.records.get(name)
        ent = self.header.get(name)
        if rec is None or ent is None:
            self._fail("is missing from the file (the tree refers to it)", name)
        dtype = _np_dtype(rec["dtype"], self.path, name)
        shape = tuple(rec["shape"])
        start, end = ent["data_offsets"]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != nbytes:
            self._fail(
                f"has {end - start} bytes but its dtype {dtype.name} and shape {shape} need "
                f"{nbytes}",
                name,
            )
        if end > self.data_size:
            self._fail(
                f"is truncated: its bytes end at {end} but the data section has "
                f"{self.data_size} bytes",
                name,
            )
        b = self.mm()[start:end]
        if verify and nbytes and zlib.crc32(b) != rec["crc32"]:
            self._fail("is corrupted: its CRC-32 does not match the one recorded at save", name)
        return b.view(dtype).reshape(shape)


class _Dir:
    """A sharded checkpoint: ``jqx-index.json`` (tree, metadata, tensor -> shard) and
    its shard files, each opened (and memory-mapped) when a tensor in it is read."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        try:
            with open(index, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint {path} is a directory without {INDEX}; it is not a sharded jqx "
                "checkpoint (or its save never finished)."
            ) from None
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint {index}: {e}") from None
        try:
            meta = json.loads(raw)
            version = int(meta["jqx_format"])
            self.tree = json.loads(meta["jqx_tree"])
            self.user = json.loads(meta.get("jqx_user", "{}"))
            self.recipe = json.loads(meta.get("jqx_recipe", "null"))
            self.shards = dict(meta["jqx_shards"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            self._fail(f"has a bad {INDEX} ({type(e).__name__}: {e})")
        if version > FORMAT_VERSION:
            self._fail(
                f"has jqx_format {version}, newer than this jqx reads ({FORMAT_VERSION}); "
                "upgrade jqx to load it"
            )
        self._files: dict[str, _File] = {}

    def _fail(self, problem: str, tensor: str | None = None):
        where = f", tensor {tensor!r}" if tensor is not None else ""
        raise CheckpointError(f"checkpoint {self.path}{where} {problem}.")

    def array(self, name: str, verify: bool) -> np.ndarray:
        fname = self.shards.get(name)
        if fname is None:
            self._fail(f"is not in {INDEX}'s shard list (the tree refers to it)", name)
        if fname not in self._files:
            shard = os.path.join(self.path, fname)
            if not os.path.exists(shard):
                self._fail(f"is in shard {fname}, which is missing", name)
            self._files[fname] = _File(shard)
        return self._files[fname].array(name, verify)


def _open(path: str) -> _File | _Dir:
    return _Dir(path) if os.path.isdir(path) else _File(path)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a tensor goes while the tree's shardings are worked out."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _build(
    f: _File | _Dir, node: dict, leaf: Callable[[dict, str], Any], wrap: bool, path: str = ""
):
    def sub(k):
        return f"{path}/{k}" if path else str(k)

    t = node["t"]
    if t == "none":
        return None
    if t in ("jax", "numpy"):
        return leaf(node, path)
    if t == "qarray":
        s = node["static"]
        children = {
            c: None if r is None else leaf({**r, "t": "jax"}, f"{path}.{c}")
            for c, r in node["children"].items()
        }
        return stored_qarray(
            **children,
            format=s["format"],
            shape=s["shape"],
            dtype=s["dtype"],
            block=s["block"],
            act=None if s["act"] is None else ActSpec(**s["act"]),
            zero_kind=s["zero_kind"],
            code_bits=s["code_bits"],
            super_block=s["super_block"],
            code_layout=s.get("code_layout", "plain"),
        )
    if t == "nnx_variable":
        value = _build(f, node["value"], leaf, wrap, path)
        if not wrap:
            return value
        from flax import nnx  # noqa: PLC0415  (flax is an extra, needed only for nnx trees)

        cls = getattr(nnx, node["cls"], None)
        if cls is None:
            f._fail(f"holds an nnx Variable of type {node['cls']!r}, unknown to this flax", path)
        return cls(value, **_decode_meta(node["meta"]))
    if t in ("dict", "nnx_state"):
        d = {
            k: _build(f, v, leaf, wrap, sub(k))
            for k, v in zip(node["keys"], node["values"], strict=True)
        }
        if t == "nnx_state" and wrap:
            from flax import nnx  # noqa: PLC0415

            return nnx.State(d)
        return d
    if t in ("list", "tuple"):
        items = [_build(f, v, leaf, wrap, sub(i)) for i, v in enumerate(node["values"])]
        return items if t == "list" else tuple(items)
    f._fail(f"has an unknown tree node type {t!r} at {path or '<root>'!r}")


def _rebuild(f: _File | _Dir, leaf: Callable[[dict, str], Any], wrap: bool):
    """:func:`_build` from the file's tree record; a malformed record (which the
    per-tensor checksums do not cover) is reported as a bad header."""
    try:
        return _build(f, f.tree, leaf, wrap)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        f._fail(f"has a bad jqx tree record ({type(e).__name__}: {e}); the header was altered")


def _like_layouts(tree, like):
    """``tree`` with each QArray in the code layout of ``like``'s (plain, ``"vnni"``
    panels, ``"kn"``): ``jqx.quantize`` packs int8 weights where the native GEMM runs,
    so a tree saved on one machine restores into a template made on another. Leaves
    that cannot take the layout stay as read, for :func:`_check_like` to report."""
    got, got_def = jax.tree_util.tree_flatten(tree, is_leaf=is_qarray)
    want, want_def = jax.tree_util.tree_flatten(like, is_leaf=is_qarray)
    if got_def != want_def:
        return tree

    def one(a, b):
        if not (is_qarray(a) and is_qarray(b)) or a.code_layout == b.code_layout:
            return a
        try:
            return a.with_code_layout(b.code_layout)
        except ValueError:
            return a

    return jax.tree_util.tree_unflatten(
        got_def, [one(a, b) for a, b in zip(got, want, strict=True)]
    )


def _check_like(f: _File | _Dir, tree, like) -> None:
    got, got_def = jax.tree_util.tree_flatten_with_path(tree)
    want, want_def = jax.tree_util.tree_flatten_with_path(like)
    if got_def != want_def:
        raise CheckpointError(
            f"checkpoint {f.path} does not match the expected tree: the file holds\n  {got_def}\n"
            f"but like= has\n  {want_def}\nLoad without like= to inspect what the file holds."
        )
    for (p, a), (_, b) in zip(got, want, strict=True):
        sa, sb = tuple(np.shape(a)), tuple(np.shape(b))
        da, db = np.dtype(a.dtype), np.dtype(b.dtype)
        if sa != sb or da != db:
            raise CheckpointError(
                f"checkpoint {f.path}, tensor {jax.tree_util.keystr(p)}: the file holds "
                f"{da.name}{list(sa)} but like= expects {db.name}{list(sb)}."
            )


def load(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    spec_fn: Callable[[str, Any], Any] | None = None,
    verify: bool = True,
    like: Any = None,
) -> Any:
    """Reads a checkpoint written by :func:`save` and returns the same pytree.

    The file is memory-mapped; each array is copied once from the mapping onto its
    device (no float copy is made). With ``mesh``, every leaf is placed on the mesh
    with :func:`jqx.sharding.tree_shardings` (a QArray's codes and scales sharded
    consistently) and each device reads only its own slice of the mapping.

    Args:
      path: the checkpoint file, or the directory of a sharded save.
      mesh: optional device mesh to place the leaves on.
      spec_fn: with ``mesh``: ``(path, leaf) -> PartitionSpec | None`` for the
        *logical* array at ``path`` (e.g. ``"params/dense/kernel"``); ``leaf`` has
        ``shape`` and ``dtype`` (a QArray's children are placeholders). None
        replicates everything.
      verify: check every tensor's CRC-32 (reads each tensor once in full).
      like: optional tree the result must match (structure, QArray static fields,
        shapes and dtypes), e.g. the float model's quantized template. A QArray
        whose code layout alone differs from ``like``'s (``jqx.quantize`` packs int8
        weights where the native GEMM runs, so a template made on one machine may
        be packed and a file saved on another plain) is converted to ``like``'s
        layout: the same values.

    Returns:
      The tree: jax arrays (numpy arrays where numpy was saved), QArrays, dicts,
      lists, tuples, None and ``flax.nnx.State`` as saved.

    Raises:
      CheckpointError: naming the file, the tensor and the problem (truncated,
        bad header, checksum mismatch, newer format version, missing tensor,
        mismatch with ``like``).

    Example:
        >>> import tempfile, os, jax.numpy as jnp
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> save(p, [jnp.ones(2), None])
        >>> load(p)
        [Array([1., 1.], dtype=float32), None]
    """
    path = os.fspath(path)
    f = _open(path)
    if spec_fn is not None and mesh is None:
        raise CheckpointError(
            f"load({path!r}): spec_fn= was given without mesh=; pass the mesh to shard on."
        )

    def numpy_leaf(rec, p):
        a = f.array(rec["name"], verify)
        # jax copies from the mapping straight onto the device; numpy leaves get their
        # own memory so they outlive the mapping.
        return _finish(a if rec["t"] == "jax" else np.array(a), rec, as_jax=rec["t"] == "jax")

    if mesh is None:
        tree = _rebuild(f, numpy_leaf, wrap=True)
    else:
        sharding = _shardings(f, mesh, spec_fn)

        def sharded_leaf(rec, p):
            if rec["t"] == "numpy":
                return numpy_leaf(rec, p)
            a = f.array(rec["name"], verify)
            x = jax.make_array_from_callback(a.shape, sharding[rec["name"]], lambda i: a[i])
            return _finish(x, rec, as_jax=True)

        tree = _rebuild(f, sharded_leaf, wrap=True)
    if like is not None:
        tree = _like_layouts(tree, like)
        _check_like(f, tree, like)
    return tree


def _finish(a, rec: dict, as_jax: bool):
    if as_jax and not isinstance(a, jax.Array):
        a = jax.device_put(a)
    if "prng_impl" in rec:
        a = jax.random.wrap_key_data(a, impl=rec["prng_impl"])
    return a


def _shardings(f: _File | _Dir, mesh: Mesh, spec_fn) -> dict[str, Any]:
    """tensor name -> NamedSharding, from the tree's placeholders."""

    def slot(rec, p):
        return _Slot(rec["name"], tuple(rec["shape"]), _np_dtype(rec["dtype"], f.path, p))

    skeleton = _rebuild(f, slot, wrap=False)
    shardings = tree_shardings(skeleton, mesh, spec_fn or (lambda p, x: None))
    out = {}

    def collect(s, sh):
        out[s.name] = sh

    jax.tree_util.tree_map(collect, skeleton, shardings)
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The user ``metadata`` dict saved with the checkpoint (empty if none).

    Reads only the header, never the tensors.

    Example:
        >>> import tempfile, os, numpy as np
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> save(p, {}, metadata={"recipe": "int8_weight_only"})
        >>> read_metadata(p)
        {'recipe': 'int8_weight_only'}
    """
    return _open(os.fspath(path)).user


def read_recipe(path: str | os.PathLike) -> Any:
    """The ``recipe=`` saved with the checkpoint: a recipe's repr (which rebuilds it,
    e.g. ``eval(s, {"GPTQ": jqx.GPTQ})``), ``{regex: repr}`` for rules, or None.

    Example:
        >>> import tempfile, os, jax.numpy as jnp, jqx
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> r = jqx.int8_weight_only()
        >>> save(p, jqx.quantize({"kernel": jnp.ones((4, 4))}, r), recipe=r)
        >>> read_recipe(p).startswith("RTN(name='int8_weight_only'")
        True
    """
    return _open(os.fspath(path)).recipe
