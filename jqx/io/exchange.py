"""Exchange formats: GPTQ, AWQ and compressed-tensors checkpoints in and out of jqx.

A checkpoint directory holds ``config.json`` (its ``quantization_config`` says the
method) and ``*.safetensors``. :func:`load` turns it into a flat dict from tensor name
to value: each quantized linear layer becomes one :class:`jqx.QArray` under the name its
float weight has (``model.layers.0.self_attn.q_proj.weight``), of shape ``(out, in)``
like that weight, holding the file's own codes, scales and zero points; every other
tensor stays an array of its stored dtype. :func:`save` writes such a dict back in one
of the layouts. docs/guide/exchange.md has the layouts bit by bit.

The codes are never rounded: the packed int32 words are unpacked and re-packed into
jqx's containers (2-, 3- and 4-bit codes two per byte as ``uint4``/``int4``, 8-bit
codes one per byte), scales keep their stored dtype, zero points are the exact integers
the format means. ``q.dequantize()`` equals the reference dequantization bit for bit.
A layout jqx cannot hold packed (another method, bit width or packing) is an error,
never a silent float copy.

============================  ==========================  ============================
layout                        codes                       scales, zero points
============================  ==========================  ============================
GPTQ (v1, v2), bits 2/3/4/8   ``uint4`` / ``uint8``       fp16 per group, zero points
                              (+ ``g_idx`` for desc_act)  (v1 stores them minus one)
AWQ gemm, 4 bits              ``uint4``                   fp16 per group, zero points
compressed-tensors            ``int4``/``int8`` (sym) or  per group/channel/tensor,
pack-quantized                ``uint4``/``uint8`` (asym)  zero points when asymmetric
compressed-tensors            ``int8``                    per channel / tensor / block
int-quantized
compressed-tensors            ``fp8_e4m3``                per channel / tensor / block
float-quantized
compressed-tensors            ``fp4_e2m1``                E8M0 per block of 32
mxfp4-pack-quantized
compressed-tensors            ``fp4_e2m1``                E4M3 per block of 16, float32
nvfp4-pack-quantized                                      per tensor (``super_scale``)
============================  ==========================  ============================

Example:
    >>> import jqx.io.exchange as ex
    >>> ex.unpack_int32(ex.pack_int32([[1], [2], [3]], 3, axis=0), 3, 3, axis=0).ravel().tolist()
    [1, 2, 3]
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jqx.core.numerics import check_g_idx, make_qarray
from jqx.core.qarray import ActSpec, QArray

__all__ = [
    "ExchangeError",
    "SUPPORTED",
    "load",
    "save",
    "pack_int32",
    "unpack_int32",
    "to_out_in",
    "LLAMA_NAMES",
    "llama_to_gguf",
    "llama_from_gguf",
]

SUPPORTED = {
    "gptq": "bits 2, 3, 4, 8; checkpoint_format gptq (v1) or gptq_v2; desc_act",
    "awq": "version gemm, 4 bits",
    "compressed-tensors": (
        "formats pack-quantized, int-quantized, float-quantized, mxfp4-pack-quantized, "
        "nvfp4-pack-quantized"
    ),
}

# AutoAWQ's gemm packing puts output column 8c + AWQ_ORDER[i] at bits 4i of word c.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_GPTQ_BITS = (2, 3, 4, 8)
# compressed-tensors' FP4 formats: (strategy, group size its compressors write).
_FP4_FORMATS = {"mxfp4-pack-quantized": ("group", 32), "nvfp4-pack-quantized": ("tensor_group", 16)}
_CT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", *_FP4_FORMATS)


class ExchangeError(ValueError):
    """A checkpoint that cannot be imported or a tree that cannot be exported; the
    message names the directory, the tensor and what is supported."""


# --------------------------------------------------------------------------- bit packing


def pack_int32(values, bits: int, axis: int = 0) -> np.ndarray:
    """Packs unsigned ``bits``-bit values into int32 words along ``axis``, least
    significant bits first as one continuous bit stream: value ``j`` starts at bit
    ``j * bits`` (so 3-bit values straddle words), 32 values fill ``bits`` words, and the
    axis ends after ``ceil(n * bits / 32)`` words. This is GPTQ's and compressed-tensors'
    packing (for 2, 4 and 8 bits it is the same as ``32 // bits`` values per word).

    Example:
        >>> pack_int32([[1], [2]], 4, axis=0).ravel().tolist()
        [33]
    """
    v = np.moveaxis(np.asarray(values, np.uint64), axis, -1)
    n = v.shape[-1]
    pad = -n % 32
    v = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)]).reshape(v.shape[:-1] + (-1, 32))
    mask = np.uint64((1 << bits) - 1)
    out = np.zeros(v.shape[:-1] + (bits + 1,), np.uint64)
    for j in range(32):
        start = j * bits
        w, off = divmod(start, 32)
        out[..., w] |= ((v[..., j] & mask) << np.uint64(off)) & np.uint64(0xFFFFFFFF)
        if off + bits > 32:
            out[..., w + 1] |= (v[..., j] & mask) >> np.uint64(32 - off)
    out = out[..., :bits].reshape(v.shape[:-2] + (-1,))[..., : math.ceil(n * bits / 32)]
    return np.moveaxis(out.astype(np.uint32).view(np.int32), -1, axis)


def unpack_int32(words, bits: int, n: int, axis: int = 0) -> np.ndarray:
    """Inverse of :func:`pack_int32`: ``n`` unsigned values (int32) along ``axis``.

    Example:
        >>> unpack_int32([[33]], 4, 2, axis=0).ravel().tolist()
        [1, 2]
    """
    w = np.moveaxis(np.asarray(words).astype(np.int32).view(np.uint32), axis, -1)
    w = w.astype(np.uint64)
    ngroups = math.ceil(n / 32)
    w = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, ngroups * bits + 1 - w.shape[-1])])
    mask = np.uint64((1 << bits) - 1)
    out = np.zeros(w.shape[:-1] + (ngroups * 32,), np.uint64)
    for j in range(ngroups * 32):
        start = j * bits
        i, off = divmod(start, 32)
        x = w[..., i] >> np.uint64(off)
        if off + bits > 32:
            x = x | (w[..., i + 1] << np.uint64(32 - off))
        out[..., j] = x & mask
    return np.moveaxis(out[..., :n].astype(np.int32), -1, axis)


def _awq_pack(values: np.ndarray) -> np.ndarray:
    """(rows, cols) 4-bit values -> (rows, cols / 8) int32 words in AWQ's order."""
    v = np.asarray(values, np.uint32).reshape(values.shape[0], -1, 8)
    out = np.zeros(v.shape[:2], np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        out |= (v[..., col] & 0xF) << np.uint32(4 * i)
    return out.view(np.int32)


def _awq_unpack(words: np.ndarray) -> np.ndarray:
    w = np.asarray(words).astype(np.int32).view(np.uint32)
    out = np.zeros(w.shape + (8,), np.int32)
    for i, col in enumerate(AWQ_ORDER):
        out[..., col] = (w >> np.uint32(4 * i)) & 0xF
    return out.reshape(w.shape[0], -1)


# --------------------------------------------------------------------------- reading


def _read_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.exists(cfg_path):
        raise ExchangeError(
            f"{path}: not a checkpoint directory: it needs config.json (with a "
            "quantization_config) and *.safetensors files."
        )
    with open(cfg_path) as fh:
        config = json.load(fh)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ExchangeError(f"{path}: no *.safetensors file beside config.json.")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(_read_safetensors(f))
    return config, tensors


# safetensors dtype codes; read and written here because safetensors' numpy API has no
# float8 (compressed-tensors' float-quantized weights).
_ST_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    with open(file, "rb") as fh:
        raw = fh.read()
    try:
        (hlen,) = np.frombuffer(raw[:8], "<u8")
        header = json.loads(raw[8 : 8 + int(hlen)])
    except (ValueError, IndexError) as e:
        raise ExchangeError(f"{file}: not a safetensors file ({e}).") from None
    base = 8 + int(hlen)
    out = {}
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(rec["dtype"])
        if dt is None:
            raise ExchangeError(
                f"{file}: tensor {name!r} has dtype {rec['dtype']}; supported: "
                f"{', '.join(_ST_DTYPES)}."
            )
        a, b = rec["data_offsets"]
        out[name] = np.frombuffer(raw[base + a : base + b], dt).reshape(rec["shape"]).copy()
    return out


def _write_safetensors(file: str, tensors: Mapping[str, np.ndarray]) -> None:
    header, chunks, pos = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _ST_CODES:
            raise ExchangeError(
                f"{file}: tensor {name!r} has dtype {a.dtype}, which safetensors cannot "
                f"hold; supported: {', '.join(str(d) for d in _ST_CODES)}."
            )
        data = a.tobytes()
        header[name] = {
            "dtype": _ST_CODES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [pos, pos + len(data)],
        }
        chunks.append(data)
        pos += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(file, "wb") as fh:
        fh.write(np.uint64(len(h)).tobytes() + h + b"".join(chunks))


def _need(tensors, name: str, path: str, method: str) -> np.ndarray:
    if name not in tensors:
        raise ExchangeError(
            f"{path}: tensor {name!r} is missing; a {method} layer needs it beside the "
            "others of its module."
        )
    return tensors[name]


def _check_shape(a: np.ndarray, want, name: str, path: str, why: str) -> None:
    if tuple(a.shape) != tuple(want):
        raise ExchangeError(
            f"{path}: tensor {name!r} has shape {tuple(a.shape)} but {why} needs "
            f"{tuple(want)}; the tensors disagree with config.json."
        )


def _gidx_or_none(g_idx, k: int, g: int, shape, block, name: str, path: str):
    """None when ``g_idx`` is the plain ``i // g`` map (no extension needed)."""
    if g_idx is None:
        return None
    g_idx = np.asarray(g_idx).astype(np.int64).reshape(-1)
    try:
        check_g_idx(g_idx, shape, block, name=f"{path}: tensor {name!r}")
    except ValueError as e:
        raise ExchangeError(str(e)) from None
    if np.array_equal(g_idx, np.arange(k) // g):
        return None
    return g_idx


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Imports a GPTQ, AWQ or compressed-tensors checkpoint directory.

    Args:
      path: a directory with ``config.json`` (its ``quantization_config``) and
        ``*.safetensors``.

    Returns:
      A flat dict: ``"<module>.weight"`` -> :class:`jqx.QArray` ``(out, in)`` for every
      quantized linear layer (codes and scales as stored; ``g_idx`` for GPTQ's
      desc_act), every other tensor -> numpy array as stored.

    Raises:
      ExchangeError: an unsupported method, bit width or format; a missing tensor;
        shapes that disagree with the config; a ``g_idx`` that is not a group map.

    Example:
        >>> import jqx
        >>> tree = jqx.io.exchange.load("my-gptq-model")  # doctest: +SKIP
    """
    path = os.fspath(path)
    config, tensors = _read_dir(path)
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping):
        raise ExchangeError(
            f"{path}: config.json has no quantization_config; supported methods: "
            + "; ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
            + ". (A float checkpoint needs no import: read it with safetensors.)"
        )
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        return _load_gptq(path, qc, tensors)
    if method == "awq":
        return _load_awq(path, qc, tensors)
    if method == "compressed-tensors":
        return _load_ct(path, qc, tensors)
    raise ExchangeError(
        f"{path}: quantization_config.quant_method={qc.get('quant_method')!r} is not "
        "supported; supported: " + "; ".join(f"{k} ({v})" for k, v in SUPPORTED.items()) + "."
    )


def _modules(tensors, suffix: str) -> list[str]:
    return sorted(n[: -len(suffix)] for n in tensors if n.endswith(suffix))


def _rest(tensors, used: set) -> dict[str, np.ndarray]:
    return {n: a for n, a in tensors.items() if n not in used}


def _group(qc, k: int, name: str, path: str) -> int:
    g = qc.get("group_size", -1)
    g = k if g in (-1, None) else int(g)
    if g <= 0 or k % g:
        raise ExchangeError(
            f"{path}: group_size={qc.get('group_size')} does not divide the {k} inputs of "
            f"{name!r}; jqx holds groups that tile the input axis."
        )
    return g


def _load_gptq(path, qc, tensors) -> dict[str, Any]:
    bits = qc.get("bits")
    if bits not in _GPTQ_BITS:
        raise ExchangeError(
            f"{path}: GPTQ bits={bits!r} is not supported; supported: {list(_GPTQ_BITS)}."
        )
    fmt_ver = qc.get("checkpoint_format", "gptq")
    if fmt_ver not in ("gptq", "gptq_v2"):
        raise ExchangeError(
            f"{path}: GPTQ checkpoint_format={fmt_ver!r} is not supported; supported: 'gptq' "
            "(v1: zero points stored minus one) and 'gptq_v2'. Repack other layouts (e.g. "
            "marlin) to one of them with the tool that wrote them."
        )
    out: dict[str, Any] = {}
    used: set[str] = set()
    for m in _modules(tensors, ".qweight"):
        names = {s: f"{m}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")}
        qw = tensors[names["qweight"]]
        qz = _need(tensors, names["qzeros"], path, "GPTQ")
        sc = _need(tensors, names["scales"], path, "GPTQ")
        n = sc.shape[-1]
        k = qw.shape[0] * 32 // bits
        g = _group(qc, k, m, path)
        groups = k // g
        _check_shape(qw, (k * bits // 32, n), names["qweight"], path, f"bits={bits}")
        _check_shape(sc, (groups, n), names["scales"], path, f"group_size={g} over {k} inputs")
        _check_shape(qz, (groups, math.ceil(n * bits / 32)), names["qzeros"], path, f"bits={bits}")
        codes = unpack_int32(qw, bits, k, axis=0).T  # (out, in)
        zeros = unpack_int32(qz, bits, n, axis=1).astype(np.float32)
        if fmt_ver == "gptq":
            zeros = zeros + 1  # v1 stores zero points minus one
        gi = tensors.get(names["g_idx"])
        if gi is not None:
            _check_shape(gi, (k,), names["g_idx"], path, f"a layer with {k} inputs")
        gi = _gidx_or_none(gi, k, g, (n, k), (1, g), names["g_idx"], path)
        out[f"{m}.weight"] = make_qarray(
            codes.astype(np.uint8),
            sc.T,
            zeros.T,
            fmt="uint4" if bits <= 4 else "uint8",
            shape=(n, k),
            dtype=sc.dtype,
            block=(1, g),
            scale_dtype=sc.dtype,
            g_idx=gi,
        )
        used |= {v for v in names.values() if v in tensors}
    return {**_rest(tensors, used), **out}


def _load_awq(path, qc, tensors) -> dict[str, Any]:
    bits = qc.get("bits", qc.get("w_bit"))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise ExchangeError(
            f"{path}: AWQ bits={bits!r}, version={qc.get('version')!r} is not supported; "
            "supported: bits 4 with version 'gemm' (GEMV and Marlin layouts are not)."
        )
    out: dict[str, Any] = {}
    used: set[str] = set()
    for m in _modules(tensors, ".qweight"):
        names = {s: f"{m}.{s}" for s in ("qweight", "qzeros", "scales")}
        qw = tensors[names["qweight"]]
        qz = _need(tensors, names["qzeros"], path, "AWQ")
        sc = _need(tensors, names["scales"], path, "AWQ")
        k, n = qw.shape[0], sc.shape[-1]
        g = _group(qc, k, m, path)
        _check_shape(qw, (k, n // 8), names["qweight"], path, "AWQ gemm (8 codes per word)")
        _check_shape(sc, (k // g, n), names["scales"], path, f"group_size={g}")
        _check_shape(qz, (k // g, n // 8), names["qzeros"], path, f"group_size={g}")
        codes = _awq_unpack(qw).T
        zeros = _awq_unpack(qz).astype(np.float32)
        out[f"{m}.weight"] = make_qarray(
            codes.astype(np.uint8),
            sc.T,
            zeros.T,
            fmt="uint4",
            shape=(n, k),
            dtype=sc.dtype,
            block=(1, g),
            scale_dtype=sc.dtype,
        )
        used |= set(names.values())
    return {**_rest(tensors, used), **out}


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target in ("Linear", "torch.nn.Linear")


def _ct_scheme(qc, module: str):
    for gname, grp in (qc.get("config_groups") or {}).items():
        if any(_matches(t, module) for t in grp.get("targets", [])):
            return gname, grp
    return None, None


def _load_ct(path, qc, tensors) -> dict[str, Any]:
    out: dict[str, Any] = {}
    used: set[str] = set()
    ignore = qc.get("ignore") or []
    mods = sorted(set(_modules(tensors, ".weight_scale")))
    for m in mods:
        if any(_matches(t, m) and t not in ("Linear", "torch.nn.Linear") for t in ignore):
            continue  # an ignored layer is float in the file: left as stored
        gname, grp = _ct_scheme(qc, m)
        if grp is None:
            raise ExchangeError(
                f"{path}: module {m!r} has weight_scale but matches no config_groups target "
                "and is not in ignore; the config does not describe it."
            )
        fmt = grp.get("format") or qc.get("format")
        if fmt not in _CT_FORMATS:
            raise ExchangeError(
                f"{path}: compressed-tensors format={fmt!r} (group {gname!r}) is not supported; "
                f"supported: {', '.join(_CT_FORMATS)}."
            )
        if fmt in _FP4_FORMATS:
            out[f"{m}.weight"] = _load_ct_fp4(path, m, fmt, gname, grp, tensors, used)
            continue
        w_args = grp.get("weights") or {}
        bits = int(w_args.get("num_bits", 8))
        sym = bool(w_args.get("symmetric", True))
        sc = tensors[f"{m}.weight_scale"]
        used.add(f"{m}.weight_scale")
        zp_name, gi_name = f"{m}.weight_zero_point", f"{m}.weight_g_idx"
        if fmt == "pack-quantized":
            if bits > 8:
                raise ExchangeError(
                    f"{path}: pack-quantized num_bits={bits} for {m!r}; supported: 1 to 8."
                )
            packed = _need(tensors, f"{m}.weight_packed", path, "pack-quantized")
            shape = tuple(
                int(s) for s in _need(tensors, f"{m}.weight_shape", path, "pack-quantized")
            )
            used |= {f"{m}.weight_packed", f"{m}.weight_shape"}
            n, k = shape
            _check_shape(
                packed,
                (n, math.ceil(k * bits / 32)),
                f"{m}.weight_packed",
                path,
                f"weight_shape {shape} at num_bits={bits}",
            )
            u = unpack_int32(packed, bits, k, axis=1)  # values offset by 2**(bits-1)
            off = 1 << (bits - 1)
            zero = None
            if not sym:
                zp = _need(tensors, zp_name, path, "asymmetric pack-quantized")
                used.add(zp_name)
                if zp.dtype == np.int32 and zp.shape[0] != n and sc.shape[0] == n:
                    zp = unpack_int32(zp, bits, n, axis=0)  # packed along the outputs
                else:
                    zp = zp.astype(np.int32) + off
                zero = np.asarray(zp, np.float32)
                codes = u.astype(np.uint8)
                jfmt = "uint4" if bits <= 4 else "uint8"
            else:
                codes = (u - off).astype(np.int8)
                jfmt = "int4" if bits <= 4 else "int8"
        else:
            w = _need(tensors, f"{m}.weight", path, fmt)
            used.add(f"{m}.weight")
            n, k = w.shape
            want = np.int8 if fmt == "int-quantized" else ml_dtypes.float8_e4m3fn
            if w.dtype != np.dtype(want):
                raise ExchangeError(
                    f"{path}: tensor {m + '.weight'!r} has dtype {w.dtype}; {fmt} stores "
                    f"{np.dtype(want).name} weights."
                )
            codes = w
            jfmt = "int8" if fmt == "int-quantized" else "fp8_e4m3"
            zero = None
            if zp_name in tensors and not sym:
                zero = tensors[zp_name].astype(np.float32)
                used.add(zp_name)
        s2 = sc.reshape(sc.shape[0], -1) if sc.ndim >= 1 and sc.size > 1 else sc.reshape(1, 1)
        if n % s2.shape[0] or k % s2.shape[1]:
            raise ExchangeError(
                f"{path}: tensor {m + '.weight_scale'!r} has shape {tuple(sc.shape)}, which does "
                f"not tile the weight ({n}, {k}); jqx holds blocks that divide the shape."
            )
        block = (n // s2.shape[0], k // s2.shape[1])
        gi = tensors.get(gi_name)
        if gi is not None:
            used.add(gi_name)
            _check_shape(gi, (k,), gi_name, path, f"a layer with {k} inputs")
            gi = _gidx_or_none(gi, k, block[1], (n, k), block, gi_name, path)
        act, act_scale = _ct_act(grp, tensors, m, path, used)
        out[f"{m}.weight"] = make_qarray(
            codes,
            s2,
            None if zero is None else zero.reshape(s2.shape),
            fmt=jfmt,
            shape=(n, k),
            dtype=sc.dtype if sc.dtype != np.float32 else np.float32,
            block=block,
            scale_dtype=sc.dtype,
            g_idx=gi,
            act=act,
            act_scale=act_scale,
        )
    return {**_rest(tensors, used), **out}


def _ct_act(grp, tensors, m, path, used):
    a = grp.get("input_activations")
    if not a:
        return None, None
    fmt = "int8" if a.get("type", "int") == "int" else "fp8_e4m3"
    if a.get("dynamic", False):
        gran = "per_token" if a.get("strategy") == "token" else "per_tensor"
        return ActSpec(kind="dynamic", format=fmt, granularity=gran), None
    s = _need(tensors, f"{m}.input_scale", path, "static input quantization")
    used.add(f"{m}.input_scale")
    return ActSpec(kind="static", format=fmt, granularity="per_tensor"), jnp.asarray(
        s.astype(np.float32).reshape(())
    )


# --------------------------------------------------------------------------- FP4 (MX, NVFP4)

# E2M1 magnitudes (code & 7); compressed-tensors' kE2M1ToFloat.
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _fp4_codes(packed: np.ndarray) -> np.ndarray:
    """(rows, k/2) bytes -> (rows, k) E2M1 codes: element ``2j`` in the low nibble of
    byte ``j``, ``2j + 1`` in the high one (compressed-tensors' ``pack_fp4_to_uint8``)."""
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def _fp4_pack(codes: np.ndarray) -> np.ndarray:
    c = np.asarray(codes).astype(np.uint8)
    return (c[:, 0::2] & 0xF) | ((c[:, 1::2] & 0xF) << 4)


def _ct_nvfp4_values(s8: np.ndarray, gs: np.float32) -> np.ndarray:
    """compressed-tensors' dequantization of every E2M1 magnitude under block scales
    ``s8`` (float32): ``bf16(code * fl32(s8 / global_scale))``, as uint16 bits."""
    eff = (s8 / gs).astype(np.float32)
    v = (_E2M1[:, None] * eff[None, :]).astype(np.float32)
    return v.astype(ml_dtypes.bfloat16).view(np.uint16)


def _jqx_nvfp4_values(s8: np.ndarray, ss: np.float32) -> np.ndarray:
    """The same for a QArray's two-level dequantization ``code * fl32(s8 * super_scale)``."""
    eff = (s8 * ss).astype(np.float32)
    v = (_E2M1[:, None] * eff[None, :]).astype(np.float32)
    return v.astype(ml_dtypes.bfloat16).view(np.uint16)


def _near(x: np.float32, ulps: int = 4) -> list[np.float32]:
    """``x`` and the float32 values within ``ulps`` of it."""
    out, lo, hi = [x], x, x
    for _ in range(ulps):
        lo, hi = np.nextafter(lo, np.float32(0)), np.nextafter(hi, np.float32(np.inf))
        out += [lo, hi]
    return out


def _nvfp4_super_scale(s8: np.ndarray, gs: np.float32) -> np.float32:
    """The QArray's ``super_scale`` for a file's ``weight_global_scale``: ``1 / gs``
    rounded (what jqx.core.mx stores), or a float32 next to it where that one's product
    would round one of the layer's values differently from compressed-tensors' division
    (compressed-tensors divides the block scale by ``gs``; a QArray multiplies)."""
    base = np.float32(1) / gs
    want = _ct_nvfp4_values(s8, gs)
    for c in sorted(_near(base), key=lambda c: abs(float(c) - 1 / float(gs))):
        if np.array_equal(_jqx_nvfp4_values(s8, c), want):
            return c
    # None found: a product may then round one bfloat16 ulp off the reference's.
    return base


def _nvfp4_global_scale(s8: np.ndarray, ss: np.float32) -> np.float32:
    """Inverse of :func:`_nvfp4_super_scale`: the ``weight_global_scale`` whose division
    gives the QArray's values; first those whose rounded reciprocal is ``ss``, so that an
    imported file's own global scale comes back (unless two share that reciprocal)."""
    base = np.float32(1) / ss
    want = _jqx_nvfp4_values(s8, ss)

    def key(c):
        return (np.float32(1) / c != ss, abs(float(c) - 1 / float(ss)))

    for c in sorted(_near(base), key=key):
        if np.array_equal(_ct_nvfp4_values(s8, c), want):
            return c
    return base


def _load_ct_fp4(path, m, fmt, gname, grp, tensors, used) -> QArray:
    """One ``mxfp4-pack-quantized`` / ``nvfp4-pack-quantized`` layer: the packed E2M1
    codes, the block scales in their dtype (E8M0 / E4M3) and, for NVFP4, the per-tensor
    scale as the QArray's ``super_scale`` (the reciprocal of ``weight_global_scale``)."""
    default_g = _FP4_FORMATS[fmt][1]
    w_args = grp.get("weights") or {}
    if (
        int(w_args.get("num_bits", 4)) != 4
        or w_args.get("type", "float") != "float"
        or not w_args.get("symmetric", True)
    ):
        raise ExchangeError(
            f"{path}: config group {gname!r} ({fmt}) has weights num_bits="
            f"{w_args.get('num_bits')!r}, type={w_args.get('type')!r}, symmetric="
            f"{w_args.get('symmetric')!r}; {fmt} stores symmetric FP4 E2M1 weights (num_bits "
            "4, type 'float', symmetric true). The config does not describe its tensors."
        )
    if grp.get("input_activations"):
        raise ExchangeError(
            f"{path}: config group {gname!r} ({fmt}) quantizes the input activations; jqx "
            "imports the weight-only schemes of this format (MXFP4A16, NVFP4A16). Import a "
            "weight-only checkpoint, or delete input_activations from config.json to load "
            "the weights and quantize activations with a jqx recipe "
            "(jqx.mx_dynamic_activation_mx_weight)."
        )
    g = int(w_args.get("group_size") or default_g)
    pn, sn, gn = f"{m}.weight_packed", f"{m}.weight_scale", f"{m}.weight_global_scale"
    packed = _need(tensors, pn, path, fmt)
    sc = tensors[sn]
    used |= {pn, sn}
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ExchangeError(
            f"{path}: tensor {pn!r} is {packed.dtype} of shape {tuple(packed.shape)}; {fmt} "
            "stores uint8 (out, in / 2): two FP4 codes per byte. The file is not this format."
        )
    n, k = packed.shape[0], 2 * packed.shape[1]
    if g <= 0 or k % g:
        raise ExchangeError(
            f"{path}: tensor {pn!r} of shape {tuple(packed.shape)} holds {k} inputs per row, "
            f"not a multiple of group_size={g}; {fmt} blocks run along the inputs. The "
            f"checkpoint disagrees with its config: set group_size to a divisor of {k} (the "
            "one it was written with), or re-export the layer."
        )
    _check_shape(sc, (n, k // g), sn, path, f"{fmt} with group_size={g} over {k} inputs")
    codes = _fp4_codes(packed)
    if fmt == "mxfp4-pack-quantized":
        if sc.dtype != np.uint8:
            raise ExchangeError(
                f"{path}: tensor {sn!r} has dtype {sc.dtype}; mxfp4-pack-quantized stores "
                "E8M0 scales as uint8 (the biased exponent)."
            )
        return make_qarray(
            codes,
            sc.view(ml_dtypes.float8_e8m0fnu),
            fmt="fp4_e2m1",
            shape=(n, k),
            dtype=jnp.bfloat16,  # compressed-tensors decompresses to bfloat16
            block=(1, g),
            scale_dtype=jnp.float8_e8m0fnu,
        )
    if sc.dtype != np.dtype(ml_dtypes.float8_e4m3fn):
        raise ExchangeError(
            f"{path}: tensor {sn!r} has dtype {sc.dtype}; nvfp4-pack-quantized stores "
            "float8_e4m3fn block scales."
        )
    if gn not in tensors:
        raise ExchangeError(
            f"{path}: tensor {gn!r} is missing; an nvfp4-pack-quantized layer keeps its "
            "per-tensor scale there (float32, one value, 448 * 6 / amax) beside "
            f"{pn!r}. Re-export the checkpoint with it (strategy 'tensor_group'), or as "
            "mxfp4-pack-quantized, which has no per-tensor scale."
        )
    gsa = tensors[gn]
    used.add(gn)
    gs = np.float32(gsa.reshape(-1)[0]) if gsa.size == 1 else None
    if gs is None or not np.isfinite(gs) or gs <= 0:
        raise ExchangeError(
            f"{path}: tensor {gn!r} is {gsa.reshape(-1)[:4].tolist()} (shape "
            f"{tuple(gsa.shape)}); nvfp4-pack-quantized needs one finite positive float32 "
            "per layer."
        )
    s8 = np.unique(sc.astype(np.float32))
    return make_qarray(
        codes,
        sc,
        fmt="fp4_e2m1",
        shape=(n, k),
        dtype=jnp.bfloat16,
        block=(1, g),
        super_scale=_nvfp4_super_scale(s8, gs),
        super_block=(n, k),
        scale_dtype=jnp.float32,
    )


# --------------------------------------------------------------------------- writing


def to_out_in(q: QArray) -> QArray:
    """A 2-D QArray in the ``(out, in)`` orientation of a linear layer's ``weight`` from
    a Flax kernel ``(in, out)`` (e.g. :func:`jqx.gptq_quantize`'s result): codes, scales,
    zero points transposed; ``g_idx`` kept. No value changes.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.quantize_array(jnp.ones((8, 2)), "int8", granularity=jqx.per_group(4, 0))
        >>> to_out_in(q).shape, to_out_in(q).block
        ((2, 8), (1, 4))
    """
    per_tensor = q.super_scale is not None and tuple(q.super_block) == tuple(q.shape)
    if q.ndim != 2 or q.qhigh is not None or (q.super_scale is not None and not per_tensor):
        raise ExchangeError(
            f"to_out_in: a 2-D QArray without split code planes or two-level scales (other "
            f"than one super_scale over the whole tensor, as NVFP4's) is needed; got {q!r}."
        )
    k, n = q.shape
    if per_tensor:
        return make_qarray(
            q.codes().T,
            q.scale.T,
            fmt=q.format,
            shape=(n, k),
            dtype=q.dtype,
            block=(q.block[1], q.block[0]),
            scale_dtype=q.super_scale.dtype,
            act=q.act,
            act_scale=q.act_scale,
            super_scale=q.super_scale,
            super_block=(n, k),
        )
    return make_qarray(
        q.codes().T,
        q.scale.T,
        None if q.zero_point is None else q.zero_point.T,
        fmt=q.format,
        shape=(n, k),
        dtype=q.dtype,
        block=(q.block[1], q.block[0]),
        scale_dtype=q.scale.dtype,
        act=q.act,
        act_scale=q.act_scale,
        g_idx=q.g_idx,
        zero_kind=q.zero_kind,
    )


def _group_of(q: QArray, name: str, method: str) -> int:
    n, k = q.shape
    if (
        q.ndim != 2
        or q.block[0] != 1
        or q.zero_kind != "code"
        or q.extensions
        not in (
            (),
            ("g_idx",),
        )
        or q.in_scale is not None
    ):
        raise ExchangeError(
            f"{name}: {method} stores (out, in) weights with groups along the inputs (block "
            f"(1, g)) and plain zero points; got {q!r}. Use jqx.io.exchange.to_out_in for a "
            "Flax (in, out) kernel; in_scale, float minimums and GGUF layouts do not map."
        )
    return q.block[1]


def _unsigned(q: QArray, bits: int, name: str, method: str):
    """(codes, zero points) as unsigned ``bits``-bit integers, (out, in) and (out, groups)."""
    c = np.asarray(q.codes()).astype(np.int64)
    if q.zero_point is None:
        if not q.fmt.signed:
            raise ExchangeError(
                f"{name}: unsigned codes without zero points do not map to {method}."
            )
        c = c + (1 << (bits - 1))
        z = np.full(q.scale.shape, 1 << (bits - 1), np.int64)
    else:
        z = np.asarray(q.zero_point).astype(np.float64)
        if not np.array_equal(z, np.round(z)):
            raise ExchangeError(f"{name}: {method} needs integer zero points; got fractional ones.")
        z = z.astype(np.int64)
        if q.fmt.signed:
            c, z = c + (1 << (bits - 1)), z + (1 << (bits - 1))
    hi = (1 << bits) - 1
    if c.min() < 0 or c.max() > hi or z.min() < 0 or z.max() > hi:
        raise ExchangeError(
            f"{name}: codes or zero points outside [0, {hi}] cannot be stored with bits={bits} "
            f"in {method}; pass the bit width the weight was quantized with."
        )
    return c, z


def _bits_of(q: QArray, bits: int | None) -> int:
    return bits if bits is not None else (4 if q.fmt.bits == 4 else 8)


def save(
    tree: Mapping[str, Any],
    path: str | os.PathLike,
    method: str = "gptq",
    *,
    bits: int | None = None,
    checkpoint_format: str = "gptq",
    ct_format: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Writes a flat ``{name: QArray | array}`` dict as a checkpoint directory.

    Args:
      tree: ``"<module>.weight"`` -> QArray ``(out, in)`` with block ``(1, g)`` (see
        :func:`to_out_in`), other names -> arrays (written as they are).
      path: the directory (created).
      method: ``"gptq"``, ``"awq"`` or ``"compressed-tensors"``.
      bits: code width for GPTQ (2, 3, 4, 8) and pack-quantized; default: the
        container's (4 or 8).
      checkpoint_format: GPTQ ``"gptq"`` (v1, zero points minus one) or ``"gptq_v2"``.
      ct_format: compressed-tensors format; default ``pack-quantized`` for 4-bit
        integer containers, ``int-quantized`` for int8, ``float-quantized`` for fp8,
        ``mxfp4-pack-quantized`` / ``nvfp4-pack-quantized`` for MX / NVFP4 FP4 weights
        (block ``(1, g)``; weight-only).
      config: other ``config.json`` entries (e.g. the model's architecture).

    Raises:
      ExchangeError: a QArray whose layout the method cannot store.

    Example:
        >>> import jqx
        >>> jqx.io.exchange.save(tree, "out-dir", "gptq", bits=4)  # doctest: +SKIP
    """
    path = os.fspath(path)
    if method not in SUPPORTED:
        raise ExchangeError(
            f"save: method={method!r} is not supported; use one of {list(SUPPORTED)}."
        )
    if method == "gptq" and checkpoint_format not in ("gptq", "gptq_v2"):
        raise ExchangeError(
            f"save: checkpoint_format={checkpoint_format!r}; use 'gptq' (v1) or 'gptq_v2'."
        )
    tensors: dict[str, np.ndarray] = {}
    qinfo: dict[str, Any] = {}
    for name, v in tree.items():
        if not isinstance(v, QArray):
            tensors[name] = np.ascontiguousarray(np.asarray(v))
            continue
        m = name[: -len(".weight")] if name.endswith(".weight") else name
        v = v.with_code_layout("plain")  # the file formats store (out, in) codes
        writer = {"gptq": _save_gptq, "awq": _save_awq, "compressed-tensors": _save_ct}[method]
        info = writer(v, m, tensors, bits, checkpoint_format, ct_format)
        old = qinfo.setdefault("layer", info)
        if {k: x for k, x in old.items() if k != "desc_act"} != {
            k: x for k, x in info.items() if k != "desc_act"
        }:
            raise ExchangeError(
                f"{name}: its layout {info} differs from another layer's {old}; one "
                f"{method} config describes every layer alike. Quantize them alike."
            )
        if method == "gptq":  # a GPTQ key; compressed-tensors' config refuses unknown ones
            old["desc_act"] = old.get("desc_act", False) or info.get("desc_act", False)
    layer = qinfo.get("layer", {})
    if method == "gptq":
        qc = {"quant_method": "gptq", "checkpoint_format": checkpoint_format, **layer}
    elif method == "awq":
        qc = {"quant_method": "awq", "version": "gemm", "zero_point": True, **layer}
    else:
        fmt = layer.pop("format", "pack-quantized")
        qc = {
            "quant_method": "compressed-tensors",
            "format": fmt,
            "config_groups": {"group_0": {"targets": ["Linear"], **layer}},
            "ignore": [],
            # the readers (compressed-tensors, transformers) take the weights as packed
            # only when the status says so
            "quantization_status": "compressed",
        }
    os.makedirs(path, exist_ok=True)
    cfg = dict(config or {})
    cfg["quantization_config"] = qc
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)
    _write_safetensors(os.path.join(path, "model.safetensors"), tensors)


def _f16(a) -> np.ndarray:
    return np.asarray(a).astype(np.float16)


def _save_gptq(q, m, tensors, bits, ver, _ct):
    g = _group_of(q, m, "GPTQ")
    bits = _bits_of(q, bits)
    if bits not in _GPTQ_BITS:
        raise ExchangeError(f"{m}: GPTQ bits={bits}; supported: {list(_GPTQ_BITS)}.")
    n, k = q.shape
    if k % 32:
        raise ExchangeError(
            f"{m}: GPTQ packs 32 inputs per group of words; {k} inputs is not a multiple of 32."
        )
    c, z = _unsigned(q, bits, m, "GPTQ")
    if ver == "gptq":
        if z.min() < 1:
            raise ExchangeError(
                f"{m}: a zero point of 0 cannot be stored in GPTQ v1 (it stores zero minus "
                "one); use checkpoint_format='gptq_v2'."
            )
        z = z - 1
    tensors[f"{m}.qweight"] = pack_int32(c.T, bits, axis=0)
    tensors[f"{m}.qzeros"] = pack_int32(z.T, bits, axis=1)
    tensors[f"{m}.scales"] = _f16(q.scale.T)
    gi = np.arange(k) // g if q.g_idx is None else np.asarray(q.g_idx)
    tensors[f"{m}.g_idx"] = gi.astype(np.int32)
    sym = bool(np.all(z + (1 if ver == "gptq" else 0) == (1 << (bits - 1))))
    return {
        "bits": bits,
        "group_size": g if g < k else -1,
        "sym": sym,
        "desc_act": q.g_idx is not None,
    }


def _save_awq(q, m, tensors, bits, _ver, _ct):
    g = _group_of(q, m, "AWQ")
    if q.g_idx is not None:
        raise ExchangeError(f"{m}: AWQ has no g_idx; this weight's groups are not contiguous.")
    c, z = _unsigned(q, 4, m, "AWQ")
    if q.shape[0] % 8:
        raise ExchangeError(
            f"{m}: AWQ packs 8 outputs per word; {q.shape[0]} is not a multiple of 8."
        )
    tensors[f"{m}.qweight"] = _awq_pack(c.T)
    tensors[f"{m}.qzeros"] = _awq_pack(z.T)
    tensors[f"{m}.scales"] = _f16(q.scale.T)
    return {"bits": 4, "group_size": g}


def _save_ct(q, m, tensors, bits, _ver, ct_format):
    if q.format == "fp4_e2m1" or ct_format in _FP4_FORMATS:
        return _save_ct_fp4(q, m, tensors, ct_format)
    n, k = q.shape
    fmt = ct_format or (
        "pack-quantized"
        if q.fmt.bits == 4
        else "int-quantized"
        if q.fmt.kind == "int"
        else "float-quantized"
    )
    g = q.block[1]
    strategy = (
        "tensor"
        if q.block == (n, k)
        else "channel"
        if q.block == (1, k)
        else ("group" if q.block[0] == 1 else "block")
    )
    w = {"num_bits": 8, "type": "int", "symmetric": q.zero_point is None, "strategy": strategy}
    if strategy == "group":
        w["group_size"] = g
    if strategy == "block":
        w["block_structure"] = list(q.block)
    tensors[f"{m}.weight_scale"] = np.asarray(q.scale)
    if q.g_idx is not None:
        tensors[f"{m}.weight_g_idx"] = np.asarray(q.g_idx).astype(np.int32)
    if fmt == "pack-quantized":
        bits = _bits_of(q, bits)
        c, z = _unsigned(q, bits, m, "pack-quantized")
        w["num_bits"] = bits
        tensors[f"{m}.weight_packed"] = pack_int32(c, bits, axis=1)
        tensors[f"{m}.weight_shape"] = np.array([n, k], np.int64)
        if q.zero_point is not None:
            tensors[f"{m}.weight_zero_point"] = pack_int32(z, bits, axis=0)
    elif fmt in ("int-quantized", "float-quantized"):
        want = "int8" if fmt == "int-quantized" else "fp8_e4m3"
        if q.format != want or q.extensions not in ((), ("g_idx",)):
            raise ExchangeError(f"{m}: {fmt} stores {want} codes; this weight is {q!r}.")
        tensors[f"{m}.weight"] = np.asarray(q.codes())
        if q.zero_point is not None:
            tensors[f"{m}.weight_zero_point"] = np.asarray(q.zero_point).astype(np.int8)
        if fmt == "float-quantized":
            w["type"] = "float"
    else:
        raise ExchangeError(f"{m}: ct_format={fmt!r}; use one of {', '.join(_CT_FORMATS)}.")
    info: dict[str, Any] = {"format": fmt, "weights": w}
    if q.act is not None:
        a = {
            "num_bits": 8,
            "type": "int" if q.act.format == "int8" else "float",
            "dynamic": q.act.kind == "dynamic",
            "symmetric": True,
            "strategy": "token" if q.act.granularity == "per_token" else "tensor",
        }
        info["input_activations"] = a
        if q.act.kind == "static":
            tensors[f"{m}.input_scale"] = np.asarray(q.act_scale, np.float32).reshape(1)
    return info


def _save_ct_fp4(q: QArray, m: str, tensors, ct_format) -> dict[str, Any]:
    """An MX (E8M0) or NVFP4 (E4M3 + per-tensor) FP4 QArray in compressed-tensors'
    ``mxfp4-pack-quantized`` / ``nvfp4-pack-quantized`` layout."""
    nv = q.super_scale is not None
    fmt = "nvfp4-pack-quantized" if nv else "mxfp4-pack-quantized"
    sdt = jnp.dtype(q.scale.dtype)
    ok = (
        q.format == "fp4_e2m1"
        and q.ndim == 2
        and q.block[0] == 1
        and q.zero_point is None
        and q.in_scale is None
        and q.g_idx is None
        and sdt == (jnp.float8_e4m3fn if nv else jnp.float8_e8m0fnu)
        and (not nv or tuple(q.super_block) == tuple(q.shape))
    )
    if not ok:
        raise ExchangeError(
            f"{m}: compressed-tensors' FP4 formats store an (out, in) fp4_e2m1 weight with "
            "blocks along the inputs (block (1, g)) and no zero point, g_idx or in_scale: "
            "E8M0 scales for mxfp4-pack-quantized (jqx.mxfp4_weight_only, jqx.quantize_mx), "
            "E4M3 scales and one per-tensor super_scale for nvfp4-pack-quantized "
            f"(jqx.nvfp4_weight_only, jqx.quantize_nvfp4); got {q!r}. Use "
            "jqx.io.exchange.to_out_in for a Flax (in, out) kernel."
        )
    if ct_format not in (None, fmt):
        raise ExchangeError(
            f"{m}: ct_format={ct_format!r} but this weight is {fmt.split('-')[0].upper()} "
            f"({sdt.name} scales); pass ct_format={fmt!r} or None."
        )
    if q.act is not None:
        raise ExchangeError(
            f"{m}: the weight carries an activation spec ({q.act}); jqx exports {fmt} "
            "weight-only (MXFP4A16 / NVFP4A16). Quantize the weights without act."
        )
    n, k = q.shape
    if k % 2:
        raise ExchangeError(f"{m}: {fmt} packs two codes per byte; {k} inputs is odd.")
    g = q.block[1]
    tensors[f"{m}.weight_packed"] = _fp4_pack(np.asarray(q.codes()))
    sc = np.asarray(q.scale)
    w = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": g,
        "strategy": _FP4_FORMATS[fmt][0],
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn" if nv else "torch.uint8",
    }
    if nv:
        tensors[f"{m}.weight_scale"] = sc
        ss = np.float32(np.asarray(q.super_scale, np.float32).reshape(-1)[0])
        gs = _nvfp4_global_scale(np.unique(sc.astype(np.float32)), ss)
        tensors[f"{m}.weight_global_scale"] = np.array([gs], np.float32)
    else:
        tensors[f"{m}.weight_scale"] = sc.view(np.uint8)
    return {"format": fmt, "weights": w}


# --------------------------------------------------------------------------- Llama names

# GGUF tensor name (jqx.llm's) -> Hugging Face Llama name (the checkpoints' own).
LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _rope_rows(n: int, heads: int) -> np.ndarray:
    """Row order of llama.cpp's conversion: GGUF row ``r`` is HF row ``idx[r]`` (each
    head's two RoPE halves interleaved into adjacent pairs)."""
    return np.arange(n).reshape(heads, 2, n // heads // 2).swapaxes(1, 2).reshape(-1)


def _take_rows(v, idx: np.ndarray, name: str):
    if not isinstance(v, QArray):
        return np.asarray(v)[idx]
    per_tensor = v.super_scale is not None and tuple(v.super_block) == tuple(v.shape)
    if (
        v.ndim != 2
        or v.block[0] != 1
        or v.qhigh is not None
        or (v.super_scale is not None and not per_tensor)
    ):
        raise ExchangeError(
            f"{name}: reordering the rows of a query/key weight needs one scale per row "
            f"(block (1, g)) and at most one super_scale for the whole tensor; got {v!r}."
        )
    return v.replace(
        qvalue=v.qvalue[idx],
        scale=v.scale[idx],
        zero_point=None if v.zero_point is None else v.zero_point[idx],
    )


def _rename(tree, n_heads: int, n_kv_heads: int, to_gguf: bool) -> dict[str, Any]:
    pairs = {}
    layers = {
        int(m.group(1)) for k in tree for m in [re.search(r"(?:layers|blk)\.(\d+)\.", k)] if m
    }
    for g, h in LLAMA_NAMES.items():
        for i in sorted(layers) if "{i}" in g else [None]:
            gg, hh = (g, h) if i is None else (g.format(i=i), h.format(i=i))
            pairs[hh if to_gguf else gg] = gg if to_gguf else hh
    out = {}
    for name, v in tree.items():
        new = pairs.get(name, name)
        heads = n_heads if ("q_proj" in name or "attn_q" in name) else n_kv_heads
        if any(s in name for s in ("q_proj", "k_proj", "attn_q.", "attn_k.")):
            idx = _rope_rows(v.shape[0], heads)
            v = _take_rows(v, idx if to_gguf else np.argsort(idx), name)
        out[new] = v
    return out


def llama_to_gguf(tree: Mapping[str, Any], n_heads: int, n_kv_heads: int) -> dict[str, Any]:
    """Hugging Face Llama tensor names -> GGUF names (``jqx.llm``'s), with the query and
    key rows reordered as llama.cpp's conversion does (QArrays keep their codes).

    Example:
        >>> import numpy as np
        >>> t = llama_to_gguf({"model.layers.0.self_attn.k_proj.weight": np.arange(4.0)[:, None]},
        ...                   2, 1)
        >>> t["blk.0.attn_k.weight"].ravel().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """
    return _rename(tree, n_heads, n_kv_heads, True)


def llama_from_gguf(tensors: Mapping[str, Any], n_heads: int, n_kv_heads: int) -> dict[str, Any]:
    """Inverse of :func:`llama_to_gguf`.

    Example:
        >>> import numpy as np
        >>> t = llama_from_gguf({"blk.0.attn_k.weight": np.array([[0.0], [2.0], [1.0], [3.0]])},
        ...                     2, 1)
        >>> t["model.layers.0.self_attn.k_proj.weight"].ravel().tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    return _rename(tensors, n_heads, n_kv_heads, False)
