"""GGUF import: a llama.cpp GGUF file as its metadata plus QArrays holding its bytes.

:func:`load` turns each quantized tensor of a file into a :class:`jqx.QArray` that holds
the file's own codes and scales, never a float copy; F32, F16 and BF16 tensors become
jax arrays of that dtype. This module parses the header itself (GGUF versions 2 and 3,
little-endian: metadata, tensor table, alignment) and reads each tensor's bytes from a
read-only map of the file; the ``gguf`` package (the ``jqx[gguf]`` extra, required by
:func:`load`) supplies the GGML type codes and block sizes, and its decoder is the
reference the tests compare against.

Shapes: GGUF lists the fastest axis first, jqx uses numpy order, so ``ffn_down [1536,
576]`` is a ``(576, 1536)`` QArray: 576 rows (output features) of 1536 (input
features), with GGUF's blocks running along each row (``block=(1, 32)``). A matmul
weight is therefore used as ``x @ W.T``; ``jqx.quantized`` follows the transpose.

How each type maps onto a QArray (docs/guide/gguf.md has the bytes):

========  ==================================  ======================================
GGUF      codes                               scales
========  ==================================  ======================================
Q8_0      ``int8``                            fp16 per 32
Q4_0      ``int4`` (``q - 8``)                fp16 per 32
Q4_1      ``uint4``                           fp16 scale and fp16 min per 32
Q5_0      ``int8``, ``code_bits=5`` (q - 16)  fp16 per 32
Q5_1      ``uint8``, ``code_bits=5``          fp16 scale and fp16 min per 32
Q4_K      ``uint4``                           6-bit scale and min codes per 32,
                                              fp16 ``d`` and ``-dmin`` per 256
Q5_K      ``uint8``, ``code_bits=5``          as Q4_K
Q6_K      ``int8``, ``code_bits=6`` (q - 32)  int8 scale codes per 16, fp16 per 256
========  ==================================  ======================================

The bits are the file's, rearranged but never rounded: 4-bit codes are re-packed from
GGUF's nibble order (low nibbles hold elements 0..15 of a block, high nibbles 16..31)
into jqx's (adjacent elements share a byte, low nibble first), so every 4-bit kernel
and every slicing rule of jqx applies unchanged; 5- and 6-bit codes keep GGUF's split
into a low-nibble plane and a high-bit plane (re-packed the same way); codes GGUF
offsets by 8, 16 or 32 are stored in two's complement (the same bits with the top one
flipped); K-quant ``dmin`` is stored negated, because the QArray adds its minimum where
GGUF subtracts it; the K-quants' 6-bit scale and min codes take one byte each (12 bytes
in the file, 16 here: 4 bytes more per 256 elements).

Lossless: ``q.dequantize()`` equals ``gguf.quants.dequantize`` of the same bytes bit for
bit, for every supported type: each product (fp16 scale times a code of at most 7
bits, times a 6- or 8-bit sub-block scale) is exact in float32, so the only rounding is
the final addition of the minimum, which both do once, in the same order.

Example:
    >>> import jqx
    >>> jqx.io.gguf.SUPPORTED_TYPES[:3]
    ('F32', 'F16', 'BF16')
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jqx.core.numerics import make_qarray
from jqx.core.qarray import QArray, is_qarray

__all__ = ["GGUFError", "GGUFFile", "SUPPORTED_TYPES", "load"]

QK_K = 256  # elements per K-quant super-block


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded: corrupt, truncated, an unsupported tensor
    type or architecture, or a missing tensor. The message names the file."""


@dataclasses.dataclass(frozen=True, repr=False, eq=False)  # holds dicts of arrays
class GGUFFile:
    """A loaded GGUF file (see :func:`load`).

    Attributes:
      path: the file's path, as given.
      metadata: key -> plain Python value (str, int, float, bool, or a list of them)
        for every key/value pair of the file, e.g. ``"llama.block_count"``,
        ``"tokenizer.ggml.tokens"``.
      tensors: name -> :class:`jqx.QArray` (quantized types) or jax array (F32, F16,
        BF16), in file order, in numpy axis order (GGUF's shape reversed).
      architecture: ``general.architecture`` (e.g. ``"llama"``), or None.
      types: name -> GGML type name, e.g. ``"Q4_1"``.
      tensor_bytes: bytes the tensors' data take in the file (padding excluded).
    """

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, QArray | jax.Array]
    architecture: str | None
    types: dict[str, str]
    tensor_bytes: int

    @property
    def nbytes(self) -> int:
        """Resident bytes of the loaded tensors (QArrays counted by ``nbytes``)."""
        return sum(
            t.nbytes if is_qarray(t) else int(t.size) * t.dtype.itemsize
            for t in self.tensors.values()
        )

    def __repr__(self) -> str:
        return (
            f"GGUFFile(path={self.path!r}, architecture={self.architecture!r}, "
            f"tensors={len(self.tensors)}, metadata keys={len(self.metadata)}, "
            f"nbytes={self.nbytes}, tensor_bytes={self.tensor_bytes})"
        )


# --------------------------------------------------------------------------- decoders
# Each takes the tensor's blocks as uint8 (n_blocks, type_size) and returns the
# make_qarray arguments besides shape, dtype and block sizes.


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per block -> one float16 per block (the file's bits)."""
    return np.ascontiguousarray(b).view(np.float16)[:, 0]


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1/Q5_x low planes: 16 bytes -> 32 codes, low nibbles first."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 high bits: a little-endian uint32, bit j for element j."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scale codes and eight 6-bit min codes."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _k_low(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low planes: per 64 elements, 32 bytes: low nibbles 0..31, high 32..63."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0xF, q >> 4], axis=2).reshape(-1, QK_K)


def _q8_0(b):
    return dict(codes=b[:, 2:].view(np.int8), scale=_f16(b[:, 0:2]), fmt="int8")


def _q4_0(b):
    # q - 8 as int4's stored nibble (two's complement): the same bits, the top one flipped
    codes = _nibbles32(b[:, 2:18]) ^ np.uint8(8)
    return dict(codes=codes, scale=_f16(b[:, 0:2]), fmt="int4")


def _q4_1(b):
    return dict(
        codes=_nibbles32(b[:, 4:20]),
        scale=_f16(b[:, 0:2]),
        zero_point=_f16(b[:, 2:4]),
        zero_kind="min",
        fmt="uint4",
    )


def _q5_0(b):
    q = _nibbles32(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)
    codes = q.astype(np.int8) - np.int8(16)
    return dict(codes=codes, scale=_f16(b[:, 0:2]), fmt="int8", code_bits=5)


def _q5_1(b):
    q = _nibbles32(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)
    return dict(
        codes=q,
        scale=_f16(b[:, 0:2]),
        zero_point=_f16(b[:, 2:4]),
        zero_kind="min",
        fmt="uint8",
        code_bits=5,
    )


def _k_two_level(b, codes, fmt, code_bits=None):
    sc, mn = _k_scales(b[:, 4:16])
    return dict(
        codes=codes,
        scale=sc,
        zero_point=mn,
        zero_kind="min",
        super_scale=_f16(b[:, 0:2]),
        super_zero=-_f16(b[:, 2:4]),  # exact (a sign flip): the QArray adds its minimum
        fmt=fmt,
        code_bits=code_bits,
    )


def _q4_k(b):
    return _k_two_level(b, _k_low(b[:, 16:144]), "uint4")


def _q5_k(b):
    qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = _k_low(b[:, 48:176]) | ((qh & 1).reshape(-1, QK_K) << 4)
    return _k_two_level(b, q, "uint8", code_bits=5)


def _q6_k(b):
    ql = b[:, 0:128].reshape(-1, 2, 1, 64)
    ql = np.concatenate([ql & 0xF, ql >> 4], axis=2).reshape(-1, QK_K)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ql | ((qh & 3).reshape(-1, QK_K) << 4)
    return dict(
        codes=q.astype(np.int8) - np.int8(32),
        scale=b[:, 192:208].view(np.int8),
        super_scale=_f16(b[:, 208:210]),
        fmt="int8",
        code_bits=6,
    )


# GGML type name -> (block size along the row, sub-block of one scale, decoder).
_DECODERS: dict[str, tuple[int, int, Callable[[np.ndarray], dict]]] = {
    "Q8_0": (32, 32, _q8_0),
    "Q4_0": (32, 32, _q4_0),
    "Q4_1": (32, 32, _q4_1),
    "Q5_0": (32, 32, _q5_0),
    "Q5_1": (32, 32, _q5_1),
    "Q4_K": (QK_K, 32, _q4_k),
    "Q5_K": (QK_K, 32, _q5_k),
    "Q6_K": (QK_K, 16, _q6_k),
}
_FLOATS = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}

SUPPORTED_TYPES: tuple[str, ...] = (*_FLOATS, *_DECODERS)


def _to_qarray(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> QArray:
    """The QArray holding one quantized tensor's bytes (``raw``: uint8, any shape)."""
    super_size, sub, decode = _DECODERS[type_name]
    _, type_size = _sizes(type_name)
    kw = decode(np.asarray(raw, np.uint8).reshape(-1, type_size))
    lead = (1,) * (len(shape) - 1)
    codes = np.asarray(kw.pop("codes")).reshape(shape)
    two_level = "super_scale" in kw
    return make_qarray(
        codes,  # numpy: 4-bit codes are packed on the host (make_qarray)
        jnp.asarray(kw.pop("scale")),
        None if kw.get("zero_point") is None else jnp.asarray(kw.pop("zero_point")),
        shape=shape,
        dtype="float32",
        block=lead + (sub,),
        super_block=lead + (super_size,) if two_level else None,
        scale_dtype=jnp.float16,
        **{k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()},
    )


def _sizes(type_name: str) -> tuple[int, int]:
    """(block size, bytes per block) of a GGML type, from the gguf package."""
    import gguf  # noqa: PLC0415 - an extra, imported where used

    t = gguf.GGMLQuantizationType[type_name]
    return tuple(int(v) for v in gguf.GGML_QUANT_SIZES[t])  # type: ignore[return-value]


# --------------------------------------------------------------------------- reading
# The header is parsed here rather than with gguf.GGUFReader, which reads every element
# of every metadata array through a numpy view of its own: seconds for a tokenizer's
# vocabulary and merges, which one pass over the bytes reads in milliseconds. The layout
# (GGUF v2 and v3, little-endian): magic, version (u32), tensor count and key/value
# count (u64), the key/value pairs, the tensor infos, padding to ``general.alignment``,
# the data. Strings are a u64 byte length and UTF-8 bytes.

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# Metadata value types by their code in the file.
_VALUE_TYPES = (
    "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
    "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64",
)  # fmt: skip
_UINT32, _STRING, _ARRAY = 4, 8, 9
# Codes of the fixed-size types -> their little-endian numpy dtype. Values go through
# numpy's tolist(), as they did through gguf's reader: a FLOAT32 is the Python float of
# the float32 value, a BOOL a Python bool.
_NUMBERS: dict[int, np.dtype] = {
    c: np.dtype(t)
    for c, t in {
        0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
        7: "?", 10: "<u8", 11: "<i8", 12: "<f8",
    }.items()
}  # fmt: skip
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    """A read past the end of the file (or a length field larger than the file)."""


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: list[int]  # GGUF order: fastest axis first
    type_name: str
    begin: int  # absolute byte offset in the file
    n_bytes: int


class _HeaderParser:
    """Reads the header from a buffer of the whole file, keeping a cursor ``off``.

    ``where`` names the part being read, for the error when the bytes run out.
    """

    def __init__(self, path: str, buf: mmap.mmap, size: int):
        self.path, self.buf, self.size = path, buf, size
        self.off = 0
        self.where = "the magic bytes"

    def u32(self) -> int:
        (v,) = _U32.unpack_from(self.buf, self.off)  # struct.error past the end
        self.off += 4
        return v

    def u64(self) -> int:
        (v,) = _U64.unpack_from(self.buf, self.off)
        self.off += 8
        return v

    def take(self, n: int) -> bytes:
        end = self.off + n
        if end > self.size:
            raise _Truncated
        out = self.buf[self.off : end]
        self.off = end
        return out

    def need(self, count: int, each: int) -> None:
        """Refuses a count whose elements (each at least ``each`` bytes) cannot fit:
        a corrupt count fails here, not after a long loop or a huge allocation."""
        if count * each > self.size - self.off:
            raise _Truncated

    def numbers(self, dtype: np.dtype, count: int) -> list:
        self.need(count, dtype.itemsize)
        out = np.frombuffer(self.buf, dtype, count, self.off).tolist()
        self.off += count * dtype.itemsize
        return out

    def strings(self, count: int) -> list[str]:
        # The hot loop of a tokenizer's 10^5 entries: locals only, no method calls.
        self.need(count, 8)
        buf, size, off = self.buf, self.size, self.off
        unpack = _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            (n,) = unpack(buf, off)
            off += 8
            end = off + n
            if end > size:
                raise _Truncated
            append(buf[off:end].decode("utf-8"))
            off = end
        self.off = off
        return out

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _NUMBERS:
            return self.numbers(_NUMBERS[vtype], 1)[0]
        if vtype == _STRING:
            return self.take(self.u64()).decode("utf-8")
        if vtype == _ARRAY:
            return self.array(key)
        raise self.bad_type(vtype, key)

    def array(self, key: str) -> list:
        etype, count = self.u32(), self.u64()
        if count == 0:  # gguf's reader never looked at an empty array's element type
            return []
        if etype in _NUMBERS:
            return self.numbers(_NUMBERS[etype], count)
        if etype == _STRING:
            return self.strings(count)
        if etype == _ARRAY:  # flattened, as gguf's reader did (no known file nests them)
            self.need(count, 12)
            return [v for _ in range(count) for v in self.array(key)]
        raise self.bad_type(etype, key)

    def bad_type(self, code: int, key: str) -> GGUFError:
        return GGUFError(
            f"{self.path}: metadata key {key!r} has value type code {code}, which is no GGUF "
            f"value type (0..{len(_VALUE_TYPES) - 1}: {', '.join(_VALUE_TYPES)}): the file is "
            "corrupt (or newer than this reader); fetch it again."
        )

    def string(self) -> str:
        """A key or tensor name (an undecodable value names its key instead)."""
        start = self.off
        raw = self.take(self.u64())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(
                f"{self.path}: {self.where} has a name at byte {start} that is not UTF-8 "
                f"({e}): the file is corrupt; fetch it again."
            ) from None


def _import_gguf():
    try:
        import gguf  # noqa: PLC0415 - an extra, imported where used
    except ImportError as e:
        raise ImportError(
            "jqx.load_gguf needs the `gguf` package (for its GGML type tables), which is "
            "not installed; install it with: pip install 'jqx[gguf]'"
        ) from e
    return gguf


def _supported_text() -> str:
    return ", ".join(SUPPORTED_TYPES)


def _parse_start(p: _HeaderParser) -> tuple[int, int]:
    """Magic and version; returns (tensor count, key/value count)."""
    head = p.buf[:4]
    if head != _MAGIC[: len(head)]:
        raise GGUFError(
            f"{p.path} does not start with the GGUF magic bytes (its first bytes are "
            f"{head!r}, a GGUF file's are {_MAGIC!r}): it is not a GGUF file."
        )
    p.take(4)
    p.where = "the version"
    version = p.u32()
    if version and not version & 0xFFFF:
        # A small version number written big-endian (gguf's reader detects it this way).
        raise GGUFError(
            f"{p.path} is a byte-swapped (big-endian) GGUF file, which jqx does not read; "
            "convert it to little-endian with gguf's gguf_convert_endian script."
        )
    if version not in _VERSIONS:
        raise GGUFError(
            f"{p.path} is GGUF version {version}; jqx reads versions "
            f"{' and '.join(map(str, _VERSIONS))}. Re-export it with a current llama.cpp "
            "(convert_hf_to_gguf.py writes version 3), or check that it is not corrupt."
        )
    p.where = "the tensor and key/value counts"
    return p.u64(), p.u64()


def _parse_metadata(p: _HeaderParser, count: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The key/value pairs: key -> plain Python value, and key -> value type code."""
    p.need(count, 12)  # a key length and a value type at least
    metadata: dict[str, Any] = {}
    vtypes: dict[str, int] = {}
    for i in range(count):
        p.where = f"metadata key #{i}"
        key = p.string()
        p.where = f"metadata key {key!r}"
        if key in metadata:
            raise GGUFError(
                f"{p.path}: metadata key {key!r} appears twice: the file is corrupt; "
                "fetch it again."
            )
        vtype = p.u32()
        try:
            metadata[key] = p.value(vtype, key)
        except UnicodeDecodeError as e:
            raise GGUFError(
                f"{p.path}: metadata key {key!r} could not be decoded ({e}): the file is corrupt."
            ) from e
        vtypes[key] = vtype
    return metadata, vtypes


def _alignment(path: str, metadata: dict[str, Any], vtypes: dict[str, int]) -> int:
    if "general.alignment" not in metadata:
        return _DEFAULT_ALIGNMENT
    vtype, value = vtypes["general.alignment"], metadata["general.alignment"]
    if vtype != _UINT32:
        name = _VALUE_TYPES[vtype] if vtype < len(_VALUE_TYPES) else vtype
        raise GGUFError(
            f"{path}: general.alignment is of value type {name}, but GGUF stores it as "
            "UINT32: the file is corrupt."
        )
    if value == 0 or value & (value - 1):
        raise GGUFError(
            f"{path}: general.alignment is {value}, but it must be a power of two (GGUF's "
            f"default is {_DEFAULT_ALIGNMENT}): the file is corrupt."
        )
    return value


def _parse_tensor_infos(p: _HeaderParser, count: int) -> list[tuple[str, list[int], int, int]]:
    """(name, dims, GGML type code, offset from the data section) per tensor."""
    p.need(count, 24)  # name length, n_dims, type, offset at least
    out = []
    for i in range(count):
        p.where = f"tensor info #{i}"
        name = p.string()
        p.where = f"the info of tensor {name!r}"
        n_dims = p.u32()
        p.need(n_dims, 8)
        dims = [p.u64() for _ in range(n_dims)]
        out.append((name, dims, p.u32(), p.u64()))
    return out


def _check_tensor_infos(
    path: str, size: int, start: int, raw: list[tuple[str, list[int], int, int]], gguf
) -> list[_TensorInfo]:
    """Type, shape and extent of every tensor, named, before any data is mapped."""
    infos, unsupported = [], []
    for name, dims, code, offset in raw:
        try:
            qtype = gguf.GGMLQuantizationType(code)
        except ValueError:
            raise GGUFError(
                f"{path}: tensor {name!r} has type code {code}, which is no GGML tensor type: "
                "the file is corrupt (or newer than the installed gguf package). jqx reads "
                f"{_supported_text()}."
            ) from None
        if qtype.name not in SUPPORTED_TYPES:
            unsupported.append((name, qtype.name))
            continue
        block, type_size = (int(v) for v in gguf.GGML_QUANT_SIZES[qtype])
        if not dims or dims[0] % block:
            raise GGUFError(
                f"{path}: tensor {name!r} ({qtype.name}) has shape {dims} (fastest axis first); "
                f"its rows are not whole {block}-element blocks: the file is corrupt."
            )
        nbytes = math.prod(dims) // block * type_size
        begin = start + offset
        if begin + nbytes > size:
            raise GGUFError(
                f"{path}: tensor {name!r} ({qtype.name}, {nbytes} bytes at offset {begin}) "
                f"runs past the end of the file ({size} bytes): the file is truncated (an "
                "interrupted download?) or its tensor table is corrupt; fetch it again."
            )
        infos.append(_TensorInfo(name, dims, qtype.name, begin, nbytes))
    if unsupported:
        name, t = unsupported[0]
        more = ""
        if len(unsupported) > 1:
            others = sorted({u[1] for u in unsupported[1:]})
            more = f" (and {len(unsupported) - 1} more tensors of type {', '.join(others)})"
        raise GGUFError(
            f"{path}: tensor {name!r} has type {t}{more}, which jqx does not read; supported: "
            f"{_supported_text()}. Convert the model with llama.cpp's quantize to one of "
            "these (e.g. Q4_K_M, Q8_0)."
        )
    seen: set[str] = set()
    for info in infos:
        if info.name in seen:
            raise GGUFError(
                f"{path}: tensor {info.name!r} appears twice in the tensor table: the file is "
                "corrupt; fetch it again."
            )
        seen.add(info.name)
    return infos


def _read_header(path: str, gguf) -> tuple[dict[str, Any], list[_TensorInfo], mmap.mmap]:
    """The file's metadata and checked tensor infos, and the read-only map of its bytes
    (tensor data is read from it in place)."""
    size = os.path.getsize(path)
    if size == 0:
        raise GGUFError(f"{path} is empty (0 bytes): not a GGUF file; fetch it again.")
    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # keeps its own handle
    p = _HeaderParser(path, buf, size)
    try:
        n_tensors, n_kv = _parse_start(p)
        metadata, vtypes = _parse_metadata(p, n_kv)
        raw_infos = _parse_tensor_infos(p, n_tensors)
    except GGUFError:
        raise
    except (_Truncated, struct.error) as e:
        raise GGUFError(
            f"{path} ({size} bytes) ends inside its GGUF header (reading {p.where} at byte "
            f"{p.off}): the file is truncated (an interrupted download?) or its header is "
            "corrupt; fetch it again."
        ) from e
    except (ValueError, IndexError, OverflowError) as e:  # a safety net: named, wrapped
        raise GGUFError(
            f"{path} ({size} bytes) could not be read as GGUF ({type(e).__name__}: {e}, "
            f"reading {p.where} at byte {p.off}): the file is truncated or corrupt; fetch "
            "it again."
        ) from e
    alignment = _alignment(path, metadata, vtypes)
    start = -(-p.off // alignment) * alignment
    return metadata, _check_tensor_infos(path, size, start, raw_infos, gguf), buf


def _tensor_bytes(buf: mmap.mmap, info: _TensorInfo) -> np.ndarray:
    """The tensor's bytes in the file, as a read-only uint8 view (no copy)."""
    if info.n_bytes == 0:
        return np.zeros(0, np.uint8)
    return np.frombuffer(buf, np.uint8, info.n_bytes, info.begin)


def _check_architecture(path: str, arch, expect) -> None:
    if expect is None:
        return
    allowed = (expect,) if isinstance(expect, str) else tuple(expect)
    if arch in allowed:
        return
    found = "has no general.architecture key" if arch is None else f"is architecture {arch!r}"
    raise GGUFError(
        f"{path} {found}, but {' or '.join(repr(a) for a in allowed)} is expected here; "
        "load a model of a supported architecture, or call load() without "
        "expect_architecture to read any file."
    )


def _check_required(path: str, names: list[str], required: Iterable[str]) -> None:
    missing = [n for n in required if n not in set(names)]
    if not missing:
        return
    close = difflib.get_close_matches(missing[0], names, n=3) or names[:3]
    raise GGUFError(
        f"{path} has no tensor {', '.join(repr(m) for m in missing)} (it has {len(names)} "
        f"tensors, e.g. {', '.join(repr(c) for c in close)}); check the names (GGUF uses "
        "e.g. 'blk.0.attn_q.weight') and that the file is the model you meant."
    )


def load(
    path: str | os.PathLike,
    *,
    required: Iterable[str] = (),
    expect_architecture: str | Sequence[str] | None = None,
) -> GGUFFile:
    """Reads a GGUF file: its metadata and every tensor, quantized ones as QArrays.

    Each quantized tensor becomes a :class:`jqx.QArray` with the file's codes and
    scales (see the module docstring for the layout of each type), whose
    ``dequantize()`` equals ``gguf.quants.dequantize`` of the same bytes bit for bit;
    F32, F16 and BF16 tensors become jax arrays of that dtype. Shapes are in numpy
    order (GGUF's reversed): a matmul weight is ``(out_features, in_features)`` with
    blocks along the input axis, used as ``x @ W.T`` (``jqx.quantized`` follows the
    transpose). Everything is checked before anything is returned: on an error
    nothing is loaded.

    Args:
      path: the ``.gguf`` file.
      required: tensor names that must be present.
      expect_architecture: the ``general.architecture`` value(s) accepted (e.g.
        ``"llama"``); None accepts any.

    Returns:
      A :class:`GGUFFile` (path, metadata, tensors, architecture, types,
      tensor_bytes).

    Raises:
      GGUFError: the file is not GGUF, is truncated or corrupt, holds a tensor type
        outside :data:`SUPPORTED_TYPES`, is of another architecture than expected,
        or lacks a required tensor (a ValueError; the message names the file and
        the tensor).
      ImportError: the ``gguf`` package is missing (``pip install 'jqx[gguf]'``).

    Example:
        >>> import os, tempfile, numpy as np, gguf, jqx
        >>> path = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
        >>> Q8_0 = gguf.GGMLQuantizationType.Q8_0
        >>> raw = gguf.quants.quantize(np.linspace(-1, 1, 256, dtype=np.float32).reshape(4, 64), Q8_0)
        >>> w = gguf.GGUFWriter(path, "llama")
        >>> w.add_tensor("w", raw, raw_dtype=Q8_0)
        >>> w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file()
        >>> w.close()
        >>> f = jqx.load_gguf(path, required=["w"], expect_architecture="llama")
        >>> q = f.tensors["w"]
        >>> f.types["w"], q.shape, q.block, q.nbytes == raw.nbytes
        ('Q8_0', (4, 64), (1, 32), True)
        >>> np.array_equal(np.asarray(q.dequantize()), gguf.quants.dequantize(raw, Q8_0))
        True
    """
    gguf = _import_gguf()
    path = os.fspath(path)
    metadata, infos, buf = _read_header(path, gguf)
    architecture = metadata.get("general.architecture")
    _check_architecture(path, architecture, expect_architecture)
    _check_required(path, [t.name for t in infos], required)
    tensors: dict[str, QArray | jax.Array] = {}
    types: dict[str, str] = {}
    for t in infos:
        name, type_name = t.name, t.type_name
        shape = tuple(reversed(t.dims))
        raw = _tensor_bytes(buf, t)
        try:
            if type_name in _FLOATS:
                data = raw.view(_FLOATS[type_name]).reshape(shape)
                tensors[name] = jnp.array(data)  # a copy: nothing refers to the mapped file
            else:
                tensors[name] = _to_qarray(raw, type_name, shape)
        except (ValueError, TypeError) as e:
            raise GGUFError(
                f"{path}: tensor {name!r} ({type_name}, shape {shape}) could not be "
                f"converted ({e}); the file may be corrupt."
            ) from e
        types[name] = type_name
    return GGUFFile(
        path=path,
        metadata=metadata,
        tensors=tensors,
        architecture=architecture,
        types=types,
        tensor_bytes=sum(t.n_bytes for t in infos),
    )
