"""Per-layer report of a quantized parameter tree against its float original.

``jqx.report(params, qparams)`` lists, for every quantized leaf, its path,
shape, format, granularity, activation mode, bytes before and after, the
relative error ``||w - dequantize(q)|| / ||w||`` and the SQNR in dB
(``10 log10(sum w^2 / sum (w - w_hat)^2)``, ``inf`` for an exact
reconstruction), plus totals over the whole tree (float leaves included).

Example:
    >>> import jax.numpy as jnp, jqx
    >>> p = {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)}}
    >>> r = jqx.report(p, jqx.quantize(p, jqx.int8_weight_only()))
    >>> r.to_dict()["totals"]["bytes_before"], r.to_dict()["layers"][0]["format"]
    (256, 'int8')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqx.core.numerics import is_conv_kernel
from jqx.core.qarray import QArray, is_qarray
from jqx.core.tree import path_str

__all__ = ["Report", "LayerReport", "report"]


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One quantized leaf of the report (see the module docstring)."""

    path: str
    shape: tuple[int, ...]
    format: str
    granularity: str
    act: str
    bytes_before: int
    bytes_after: int
    rel_error: float
    sqnr_db: float


@dataclasses.dataclass(frozen=True)
class Report:
    """Result of :func:`report`: ``str(r)`` is a table, ``r.to_dict()`` a dict."""

    layers: tuple[LayerReport, ...]
    bytes_before: int
    bytes_after: int
    n_leaves: int

    @property
    def ratio(self) -> float:
        """Compression: bytes before / bytes after (whole tree)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else math.inf

    def totals(self) -> dict[str, Any]:
        qb = sum(lr.bytes_before for lr in self.layers)
        qa = sum(lr.bytes_after for lr in self.layers)
        return {
            "leaves": self.n_leaves,
            "quantized_leaves": len(self.layers),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": self.ratio,
            "quantized_bytes_before": qb,
            "quantized_bytes_after": qa,
        }

    def to_dict(self) -> dict[str, Any]:
        """``{"layers": [per-layer dicts], "totals": {...}}`` (plain Python values)."""
        return {
            "layers": [dataclasses.asdict(lr) for lr in self.layers],
            "totals": self.totals(),
        }

    def __str__(self) -> str:
        head = (
            "path",
            "shape",
            "format",
            "granularity",
            "act",
            "before",
            "after",
            "rel.err",
            "SQNR dB",
        )
        rows = [
            (
                lr.path,
                "x".join(str(s) for s in lr.shape),
                lr.format,
                lr.granularity,
                lr.act,
                _human(lr.bytes_before),
                _human(lr.bytes_after),
                f"{lr.rel_error:.2e}",
                "inf" if math.isinf(lr.sqnr_db) else f"{lr.sqnr_db:.1f}",
            )
            for lr in self.layers
        ]
        t = self.totals()
        rows.append(
            (
                f"total ({t['quantized_leaves']}/{t['leaves']} leaves quantized)",
                "",
                "",
                "",
                "",
                _human(self.bytes_before),
                _human(self.bytes_after),
                f"x{self.ratio:.2f}",
                "",
            )
        )
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        right = {5, 6, 7, 8}

        def fmt(r):
            return "  ".join(
                str(c).rjust(w) if i in right else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()

        sep = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(head), sep, *(fmt(r) for r in rows[:-1]), sep, fmt(rows[-1])])

    __repr__ = __str__


def _human(b: int) -> str:
    x = float(b)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{int(x)} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{b} B"


def _leaf_bytes(leaf) -> int:
    if is_qarray(leaf):
        return leaf.nbytes
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return 0


@jax.jit
def _errors(w, w_hat):
    w = w.astype(jnp.float32)
    d = w - w_hat.astype(jnp.float32)
    return jnp.sum(w * w), jnp.sum(d * d)


def _format_name(q: QArray) -> str:
    # 5- and 6-bit codes (GGUF) live in an 8-bit container format: name their width.
    if q.code_bits is not None:
        return f"{q.format}({q.code_bits}-bit)"
    # Block-scaled layouts (jqx.core.mx): E8M0 block scales are MX; E4M3 block scales
    # under a float32 per-tensor scale are NVFP4.
    scale_dtype = jnp.dtype(q.scale.dtype)
    if scale_dtype == jnp.float8_e8m0fnu:
        return f"mx:{q.format}"
    if q.format == "fp4_e2m1" and scale_dtype == jnp.float8_e4m3fn and q.super_scale is not None:
        return "nvfp4"
    return q.format


def _act_name(q: QArray, path: str = "") -> str:
    act = "-" if q.act is None else f"{q.act.kind}:{q.act.format}"
    if q.act is not None and q.act.granularity == "mx":
        act = f"{q.act.kind}:mx:{q.act.format}"  # per block of 32 along K, E8M0 scales
    if path.rsplit("/", 1)[-1] == "embedding" and q.ndim == 2 and q.block[0] == 1:
        # A table quantized in rows (jqx.Recipe.for_embedding): lookups gather and
        # decode rows; the act spec only applies where it is a matmul weight (attend).
        return "lookup" if q.act is None else f"lookup; attend {act}"
    if q.act is not None and is_conv_kernel(path, q.ndim):
        return act + _conv_compute(q)
    return act


def _conv_compute(q: QArray) -> str:
    """What a conv kernel's W8A8 convolution computes on (``jqx.ops.conv``, Flax's
    ``(*window, in, out)`` layout): nothing to add where it runs on int8 codes with
    int32 sums; the float formulations otherwise."""
    if (
        q.act.kind == "llm_int8"
        or q.act.granularity == "per_block"
        or q.extensions
        or q.in_scale is not None
    ):
        return " not applied (float conv, dequantized kernel)"
    window = q.ndim - 2
    shared = all(b == s for b, s in zip(q.block[:window], q.shape[:window], strict=True))
    if not shared or q.zero_point is not None:
        return " simulated (float conv)"
    return "" if (q.format, q.act.format) == ("int8", "int8") else " (f32 conv of codes)"


def report(params, qparams) -> Report:
    """Compares a quantized tree with the float tree it came from, per layer.

    Args:
      params: the float parameter tree.
      qparams: the same tree with some leaves replaced by :class:`jqx.QArray`
        (e.g. the output of ``jqx.quantize`` or ``jqx.calibrate``).

    Returns:
      A :class:`Report`; ``print(r)`` shows a table, ``r.to_dict()`` gives
      ``{"layers": [...], "totals": {...}}``.

    Raises:
      ValueError: a quantized leaf has no float counterpart at the same path
        in ``params``, or its shape differs.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> p = {"kernel": jnp.ones((4, 4))}
        >>> r = jqx.report(p, jqx.quantize(p, jqx.int8_weight_only()))
        >>> r.layers[0].rel_error
        0.0
    """
    flat_p = {
        path_str(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]
    }
    flat_q = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_qarray)[0]
    layers = []
    before = after = 0
    for k, leaf in flat_q:
        p = path_str(k)
        after += _leaf_bytes(leaf)
        if not is_qarray(leaf):
            before += _leaf_bytes(flat_p.get(p, leaf))
            continue
        if p not in flat_p:
            raise ValueError(
                f"report: the quantized leaf {p} has no float leaf at the same path in params "
                f"(params paths look like {list(flat_p)[:3]}); pass the float tree that "
                "qparams was made from."
            )
        w = flat_p[p]
        if is_qarray(w):
            raise ValueError(
                f"report: params[{p!r}] is already a QArray; pass the float tree as `params`."
            )
        if tuple(w.shape) != tuple(leaf.shape):
            raise ValueError(
                f"report: shape mismatch at {p}: params has {tuple(w.shape)}, qparams has "
                f"{tuple(leaf.shape)}; pass the float tree that qparams was made from."
            )
        b = _leaf_bytes(w)
        before += b
        sw, sd = (float(v) for v in _errors(jnp.asarray(w), leaf.dequantize(jnp.float32)))
        rel = math.sqrt(sd / sw) if sw > 0 else (0.0 if sd == 0 else math.inf)
        sqnr = math.inf if sd == 0 else (10.0 * math.log10(sw / sd) if sw > 0 else -math.inf)
        layers.append(
            LayerReport(
                path=p,
                shape=tuple(leaf.shape),
                format=_format_name(leaf),
                granularity=leaf.granularity,
                act=_act_name(leaf, p),
                bytes_before=b,
                bytes_after=leaf.nbytes,
                rel_error=rel,
                sqnr_db=sqnr,
            )
        )
    return Report(
        layers=tuple(layers), bytes_before=before, bytes_after=after, n_leaves=len(flat_q)
    )
