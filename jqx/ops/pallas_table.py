"""Which backend runs a quantized matmul: a small table of measured winners per shape bucket.

``jqx.ops`` asks :func:`choose` when ``backend=None``. The table holds only measured
results (from ``benchmarks/matmul.py`` on a real GPU); an unmeasured device, op or bucket
answers ``"xla"``, so a kernel is only used where it was seen to beat XLA's own quantized
path. On CPU (and TPU) the answer is always ``"xla"``: the kernels there run only in
interpret mode, for testing.

Status: no GPU was available when this table was written, so it is empty and every
GPU query answers ``"xla"``. The GPU numbers are outstanding; fill ``MEASURED`` from a
benchmark run (see docs/sections/kernels.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

OPS = ("w4a16", "int8", "int8_dynamic", "fp8")
# Upper bounds (inclusive) of the M buckets; the last bucket is open-ended.
M_BUCKETS = (1, 16, 64, 256, 1024, 4096)

# MEASURED[device_kind][op][m_bucket] = "pallas" | "xla", for K = N >= 4096 weights.
# device_kind is matched as a case-insensitive substring of jax's Device.device_kind
# (e.g. "H200" matches "NVIDIA H200"). Empty: the GPU numbers are outstanding.
MEASURED: dict[str, dict[str, dict[int, str]]] = {}

# Below this many weight elements the launch overhead dominates; XLA wins or ties.
MIN_WEIGHT_ELEMENTS = 4096 * 4096


def m_bucket(m: int) -> int:
    """The bucket (upper bound) that ``m`` falls into.

    Example:
        >>> m_bucket(3), m_bucket(5000)
        (16, 4096)
    """
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def choose(
    op: str,
    m: int,
    k: int,
    n: int,
    platform: str,
    device_kind: str | None = None,
    *,
    table: Mapping[str, Mapping[str, Mapping[int, str]]] | None = None,
) -> Literal["pallas", "xla"]:
    """``"pallas"`` where the kernel was measured faster than XLA for this bucket, else ``"xla"``.

    Args:
      op: one of ``"w4a16"``, ``"int8"``, ``"int8_dynamic"``, ``"fp8"``.
      m, k, n: the matmul's (M, K) x (K, N) sizes (M = all leading rows).
      platform: ``jax.default_backend()`` style name: "cpu", "gpu"/"cuda", "tpu", ...
      device_kind: ``jax.devices()[0].device_kind``; None matches no measured row.
      table: measured winners to consult; defaults to :data:`MEASURED`.

    Returns:
      ``"pallas"`` or ``"xla"``.

    Raises:
      ValueError: unknown ``op``.

    Example:
        >>> choose("w4a16", 1, 4096, 4096, "cpu")
        'xla'
    """
    if op not in OPS:
        raise ValueError(f"op={op!r} is not a Pallas kernel; use one of {OPS}.")
    if platform not in ("gpu", "cuda"):
        return "xla"
    if device_kind is None or k * n < MIN_WEIGHT_ELEMENTS:
        return "xla"
    for kind, per_op in (MEASURED if table is None else table).items():
        if kind.lower() in device_kind.lower():
            winner = per_op.get(op, {}).get(m_bucket(m), "xla")
            return "pallas" if winner == "pallas" else "xla"
    return "xla"
