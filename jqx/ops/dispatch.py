"""The one place that decides which implementation runs a quantized matmul.

``jqx.ops.dot_general`` describes its product as a :class:`~jqx.ops.problem.Problem` and
calls :func:`choose` once. Everything that depends on where and how fast is here and
nowhere else: the platform, the shape thresholds measured on XLA:CPU (applied only on
CPU), the table of measured Pallas wins on GPUs, the ``JQX_NATIVE`` environment variable
and the availability of the native CPU kernels. The thresholds live in :class:`Policy`,
which :func:`policy` overrides for the code traced inside it.

``backend`` means exactly what it says:

- ``None``: the measured choice: on CPU, the native kernels where they are available
  and the product is big enough to pay for them, else the fastest XLA formulation for
  the shape; on a GPU, a Pallas kernel where the table says it beat XLA on this device;
  elsewhere XLA's direct formulations. MX products (W4A4 / W8A8 MX) run as
  ``jax.nn.scaled_matmul`` on GPUs whose compute capability has MX tensor cores
  (:data:`SCALED_MATMUL_MIN_CAPABILITY`), as the exact emulation everywhere else.
- ``"xla"``: XLA formulations only (never a native or Pallas kernel), chosen by the same
  policy.
- ``"native"``: the native CPU kernel wherever one supports the product, whatever its
  size; XLA for products no native kernel computes. Raises when the kernels are not
  available (see :func:`native_status`).
- ``"pallas"``: the Pallas kernel wherever one supports the product (interpret mode off
  GPU); XLA for the rest.

Why each threshold has its value, and the benchmark that measures it:
docs/internals/dispatch.md.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> q = jqx.int8_dynamic_activation_int8_weight().quantize_weight(jnp.ones((64, 32)))
    >>> x = jnp.ones((2048, 64))
    >>> DN = (((1,), (0,)), ((), ()))
    >>> with jqx.ops.policy(platform="cpu", native_available=False):
    ...     jqx.ops.explain(x, q, DN)
    'xla.bf16_dot'
    >>> with jqx.ops.policy(platform="cpu", native_available=False, w8a8_bf16_min_rows=4096):
    ...     jqx.ops.explain(x, q, DN)
    'xla.int32_dot'
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from typing import Literal

import jax
import jax.numpy as jnp

from jqx.kernels.cpu import native as _native_kernels
from jqx.ops import impl_native, impl_pallas, impl_xla
from jqx.ops.problem import Implementation, Problem

__all__ = [
    "BACKENDS",
    "MEASURED",
    "Policy",
    "SCALED_MATMUL_MIN_CAPABILITY",
    "choose",
    "choose_float_dot",
    "choose_scores_softmax_dot",
    "current_policy",
    "m_bucket",
    "measured_winner",
    "native_status",
    "policy",
    "reorder_softmax",
]

BACKENDS = (None, "xla", "native", "pallas")

# --------------------------------------------------------------------------- GPU table

OPS = ("w4a16", "int8", "int8_dynamic", "fp8")
# Upper bounds (inclusive) of the M buckets; the last bucket is open-ended.
M_BUCKETS = (1, 16, 64, 256, 1024, 4096)

# MEASURED[device_kind][op][m_bucket] = "pallas" | "xla", for K = N >= 4096 weights, from
# ``python benchmarks/matmul.py --emit-dispatch`` on the GPU (a kernel wins a bucket only
# if it beat XLA's path at every K = N measured). device_kind is matched as a
# case-insensitive substring of jax's Device.device_kind ("H200" matches "NVIDIA H200").
# A device model not listed answers "xla" everywhere.
MEASURED: dict[str, dict[str, dict[int, str]]] = {
    # One H200 (jax 0.11.2, CUDA 13), K = N in {4096, 8192}, 2026-12-04; the runs and
    # the command that merges them into this entry: docs/benchmarks/gpu.md.
    "H200": {
        "w4a16": {1: "pallas", 16: "pallas", 64: "pallas", 256: "xla", 1024: "xla", 4096: "xla"},
        "int8_dynamic": {
            1: "xla",
            16: "xla",
            64: "xla",
            256: "xla",
            1024: "pallas",
            4096: "pallas",
        },
        "int8": {1: "pallas", 16: "xla", 64: "xla", 256: "xla", 1024: "xla", 4096: "xla"},
        "fp8": {1: "xla", 16: "xla", 64: "xla", 256: "pallas", 1024: "pallas", 4096: "xla"},
    },
}

# Below this many weight elements the launch overhead dominates; XLA wins or ties.
MIN_WEIGHT_ELEMENTS = 4096 * 4096

# Block-scaled MX matmuls (jax.nn.scaled_matmul, cuDNN's MX kernels) need the MX tensor
# cores of Blackwell GPUs (compute capability 10.0 and later); below it, and on every
# CPU, MX products run as the exact emulation (docs/guide/mx.md).
SCALED_MATMUL_MIN_CAPABILITY = (10, 0)


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


def measured_winner(
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
        >>> measured_winner("w4a16", 1, 4096, 4096, "cpu")
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


# --------------------------------------------------------------------------- policy


@dataclasses.dataclass(frozen=True)
class Policy:
    """The dispatcher's inputs besides the product itself; defaults are the measured ones.

    The size thresholds were measured on a 2-core XLA:CPU (docs/internals/dispatch.md
    says how, and why each has its value); they apply only when the platform is CPU.
    Override fields with :func:`policy`, e.g. to force a formulation in a test or a
    benchmark. A policy is read while tracing: a ``jax.jit`` function keeps the choice
    made when it was traced.

    Attributes:
      platform: the platform whose measurements apply; None: ``jax.default_backend()``
        (set it when lowering for another platform, e.g. "cuda" on a CPU-only host).
      device_kind: the GPU model matched against the Pallas table; None: that of
        ``jax.devices()[0]``.
      compute_capability: the GPU's compute capability, e.g. ``"10.0"``, for the MX
        route (:data:`SCALED_MATMUL_MIN_CAPABILITY`); None: that of ``jax.devices()[0]``
        on a GPU (set it when lowering for a GPU on a CPU-only host).
      native_available: whether the native CPU kernels may run. None: unless
        ``JQX_NATIVE=0``, when ``jqx.kernels.cpu.native.available()`` (built on first
        need); False: never; True: treat them as available without asking (routing
        tests on machines without the kernels; running them there raises).
      native_min_work: rows x K x N from which the native int8 GEMM beats XLA.
      native_min_weight: K x N from which it beats XLA at any number of rows.
      native_decode_rows: up to this many rows the GEMM reads the weight in place...
      native_min_weight_decode: ...so it pays from this K x N on.
      w4_native_min_weight: K x N from which the native 4-bit and FP8 decode kernels
        beat XLA (1 to 16 rows).
      llm_int8_native_min_weight: the same for LLM.int8()'s decode route.
      w8a8_bf16_min_rows: rows from which an int8 W8A8 product runs as a bf16 dot
        rather than an int32 one (XLA:CPU).
      two_level_max_rows: rows up to which int8 weight-only products split the
        activations into two int8 levels on XLA...
      two_level_min_weight: ...for weights of at least this many elements.
      pad_single_row: pad a one-row int8 dot to two rows (XLA:CPU's one-row int8 dot is
        off its fast path).
      conv_taps_max_in: W8A8 int8 convolutions with at most this many input channels
        run as one int8 matmul per window position (XLA:CPU); more run as XLA's int8
        convolution. Applies where the native conv kernel does not run.
      conv_native_min_work: multiply-adds (output elements x window x input channels)
        from which a W8A8 int8 convolution runs on the native AVX2 kernel
        (``native.conv_int8``) rather than XLA, when that kernel is available.
      pallas_table: measured Pallas winners ``{device_kind: {op: {m_bucket: winner}}}``;
        None: :data:`MEASURED`.
      softmax_reorder: whether :func:`jqx.quantized` computes ``softmax(s) @ v`` as
        ``(exp(s - max) @ v) / sum`` (see :func:`reorder_softmax`). None: the measured
        choice (on CPU only); True: wherever the rewrite is valid; False: never, so
        attention runs exactly as written.
      softmax_kernel: whether a reordered softmax-then-matmul (and
        :func:`jqx.ops.attention.softmax_dot`) may run on the native kernel
        (``native.softmax_dot``) where it is available; False: XLA's formulation.
      softmax_kernel_max_scores: ...up to this many scores per call (all of them, e.g.
        batch x heads x queries x keys): above it XLA (measured: docs/internals/dispatch.md).
      scores_kernel: whether a reordered attention whose scores are a dot of q and k
        (then a scale, a bias, a mask) may run whole on the native kernel
        (``native.scores_softmax_dot``, :func:`jqx.ops.attention.scores_softmax_dot`),
        the scores never written; False: the scores on XLA, then as ``softmax_kernel``.
      f32_kernel: whether :func:`jqx.quantized`'s float32 products (no QArray operand;
        :func:`jqx.ops.float_dot_general`) may run on the native float32 GEMM
        (``native.f32_matmul``) where it is available; False: XLA's dot, bit for bit.
      f32_kernel_min_rows: ...from this many rows (the lhs's free elements) on...
      f32_kernel_min_work: ...and this many multiply-adds (rows x K x N).
      epilogue: whether a product on a native kernel (the float32 GEMM; the AVX512-VNNI
        W8A8 and int8 weight-only GEMM) applies the bias add and activation (GELU,
        either form, or ReLU) that follow it inside the kernel, on each output block
        while it is in cache (:func:`jqx.ops.float_dot_general`'s and
        :func:`jqx.ops.dot_general`'s ``bias`` and ``activation``; the bias and ReLU
        bit for bit, the GELU within the bound stated there); False: XLA's add and
        activation after the kernel, bit for bit as written.
      mlp_kernel: whether two dense layers in a row (:func:`jqx.ops.mlp`, and the
        ``Dense -> activation -> Dense`` chains :func:`jqx.quantized` finds) run as one
        native call where both products would run on the same kernel with their
        epilogues (needs ``epilogue``): the AVX512-VNNI kernel for int8 weights
        (``native.w8a8_mlp``), the float32 GEMM for float32 ones (``native.f32_mlp``);
        the same bits, the hidden activations never written. False: two calls.
      mlp_kernel_min_rows: ...from this many rows of x on (below it the int8 calls'
        split of the weights' columns over the threads is faster; float32 products take
        the GEMM only from ``f32_kernel_min_rows``).
    """

    platform: str | None = None
    device_kind: str | None = None
    compute_capability: str | None = None
    native_available: bool | None = None
    native_min_work: int = 1 << 23
    native_min_weight: int = 1 << 22
    native_decode_rows: int = 6
    native_min_weight_decode: int = 1 << 18
    w4_native_min_weight: int = 1 << 14
    llm_int8_native_min_weight: int = 1 << 16
    w8a8_bf16_min_rows: int = 1024
    two_level_max_rows: int = 64
    two_level_min_weight: int = 1 << 20
    pad_single_row: bool = True
    conv_taps_max_in: int = 4
    conv_native_min_work: int = 0
    pallas_table: Mapping[str, Mapping[str, Mapping[int, str]]] | None = None
    softmax_reorder: bool | None = None
    softmax_kernel: bool = True
    softmax_kernel_max_scores: int = 1 << 19
    scores_kernel: bool = True
    f32_kernel: bool = True
    f32_kernel_min_rows: int = 2048
    f32_kernel_min_work: int = 1 << 21
    epilogue: bool = True
    mlp_kernel: bool = True
    mlp_kernel_min_rows: int = 256


_DEFAULT = Policy()
_CURRENT: contextvars.ContextVar[Policy | None] = contextvars.ContextVar(
    "jqx_ops_policy", default=None
)


def current_policy() -> Policy:
    """The :class:`Policy` in force (the defaults, or the innermost :func:`policy`).

    Example:
        >>> import jqx
        >>> jqx.ops.current_policy().w8a8_bf16_min_rows
        1024
    """
    return _CURRENT.get() or _DEFAULT


@contextlib.contextmanager
def policy(**overrides) -> Iterator[Policy]:
    """Overrides :class:`Policy` fields for the matmuls traced inside the ``with`` block.

    A trace-time setting: it affects functions traced inside the block, not ``jit``
    functions already traced. jax keeps its traces per Python function, so a new
    ``jax.jit`` around a function already traced with other settings reuses that
    trace; wrap a new function object instead (e.g. a new ``jqx.quantized(apply)``).

    Args:
      **overrides: :class:`Policy` fields and their values.

    Yields:
      The policy in force inside the block.

    Raises:
      TypeError: a name that is not a Policy field.

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> q = jqx.int8_weight_only().quantize_weight(jnp.ones((1024, 1024)))
        >>> DN = (((1,), (0,)), ((), ()))
        >>> with jqx.ops.policy(platform="cpu", native_available=False):
        ...     jqx.ops.explain(jnp.ones((1, 1024)), q, DN)
        'xla.two_level_int8'
        >>> with jqx.ops.policy(platform="cpu", two_level_min_weight=1 << 30):
        ...     jqx.ops.explain(jnp.ones((1, 1024)), q, DN, backend="xla")
        'xla.decoded_dot'
    """
    fields = {f.name for f in dataclasses.fields(Policy)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"jqx.ops.policy got {', '.join(map(repr, unknown))}, which "
            f"{'is not a Policy field' if len(unknown) == 1 else 'are not Policy fields'}; "
            f"the fields are {', '.join(sorted(fields))}."
        )
    in_force = dataclasses.replace(current_policy(), **overrides)
    token = _CURRENT.set(in_force)
    try:
        yield in_force
    finally:
        _CURRENT.reset(token)


def _platform(pol: Policy) -> str:
    return pol.platform or jax.default_backend()


def reorder_softmax() -> bool:
    """Whether :func:`jqx.quantized` moves a softmax's normalisation after the matmul
    that consumes the probabilities, in the :class:`Policy` in force.

    The reordering rounds differently from the program as written (within the bound
    stated in docs/guide/run.md); ``policy(softmax_reorder=False)`` keeps it exact.

    Example:
        >>> import jqx
        >>> with jqx.ops.policy(platform="cpu"):
        ...     jqx.ops.dispatch.reorder_softmax()
        True
        >>> with jqx.ops.policy(platform="cpu", softmax_reorder=False):
        ...     jqx.ops.dispatch.reorder_softmax()
        False
    """
    pol = current_policy()
    if pol.softmax_reorder is not None:
        return pol.softmax_reorder
    # Measured faster on XLA:CPU (benchmarks/attention_order.py); not measured elsewhere.
    return _platform(pol) == "cpu"


def _gguf_route(backend: str | None, fn: str) -> tuple[Policy, str | None]:
    """The policy in force and the AVX2 kernels' availability (``_gguf_reason``) for an
    attention op's ``backend``; the reason is None when ``backend="xla"`` asks for XLA.

    Raises:
      ValueError: a backend other than None, ``"xla"`` or ``"native"``.
    """
    if backend not in (None, "xla", "native"):
        raise ValueError(f"{fn}: backend={backend!r} must be None, 'xla' or 'native'.")
    pol = current_policy()
    return pol, None if backend == "xla" else _gguf_reason(pol, _platform(pol))


def _float32_kernel_route(fn: str, backend, **arrays) -> tuple[Policy, str | None, bool]:
    """For an attention kernel on float32 operands: the policy, the kernels'
    availability (``_gguf_route``; None when ``backend="xla"``) and whether every array is
    float32.

    Raises:
      ValueError: an unknown ``backend``.
      RuntimeError: ``backend="native"`` where the kernel cannot run these operands.
    """
    pol, reason = _gguf_route(backend, fn)
    f32 = jnp.dtype(jnp.float32)
    fits = all(jnp.dtype(a.dtype) == f32 for a in arrays.values())
    if backend == "native" and (reason != "available" or not fits):
        got = ", ".join(f"{n} {a.dtype}" for n, a in arrays.items())
        raise RuntimeError(
            f"{fn}(backend='native'): the native kernel cannot run this: "
            + (reason if reason != "available" else got)
            + " (it takes float32 operands). Use backend=None or 'xla'."
        )
    return pol, reason, fits


def choose_softmax_dot(s, other, backend: str | None = None) -> str:
    """``"native"`` or ``"xla"``: who computes :func:`jqx.ops.attention.softmax_dot` for
    these operands (the scores ``s`` and the other operand of the matmul).

    The native kernel (``native.softmax_dot``, AVX512 or AVX2) takes float32 operands
    on CPU where its library is available and the policy's ``softmax_kernel`` allows
    it, up to ``softmax_kernel_max_scores`` scores (2^19: the scores of 12 heads x 128
    tokens at batch 2, 2 MiB). There it beats XLA's exps, row sums, transposes and
    batched dot (MiniLM's W8A8 at batch 1-2: 0.80x the time); from batch 4 XLA, which
    fuses the exps into its dot rather than reading the scores back from memory, is as
    fast or faster (docs/internals/dispatch.md).

    Raises:
      ValueError: an unknown ``backend``.
      RuntimeError: ``backend="native"`` where the kernel cannot run these operands.
    """
    pol, reason, fits = _float32_kernel_route("softmax_dot", backend, s=s, other=other)
    if reason is None or backend == "native":
        return "xla" if reason is None else "native"
    small = math.prod(s.shape) <= pol.softmax_kernel_max_scores
    return "native" if pol.softmax_kernel and small and reason == "available" and fits else "xla"


def choose_scores_softmax_dot(q, k, other, backend: str | None = None) -> str:
    """``"native"`` or ``"xla"``: who computes
    :func:`jqx.ops.attention.scores_softmax_dot` for these operands (the dot's ``q`` and
    ``k`` and the values ``other``).

    The native kernel (``native.scores_softmax_dot``, AVX512 or AVX2) takes float32
    operands on CPU where its library is available and the policy's ``scores_kernel``
    allows it, at any size: it reads q, k and v where they are (no transposes) and never
    writes the scores. MiniLM's attention alone took 0.39x XLA's time at batch 1 and
    0.32x at batch 32; the whole W8A8 model 0.87-0.92x (docs/internals/dispatch.md).
    XLA computes the scores otherwise, then :func:`choose_softmax_dot` decides the rest.

    Raises:
      ValueError: an unknown ``backend``.
      RuntimeError: ``backend="native"`` where the kernel cannot run these operands.
    """
    pol, reason, fits = _float32_kernel_route("scores_softmax_dot", backend, q=q, k=k, v=other)
    if reason is None or backend == "native":
        return "xla" if reason is None else "native"
    return "native" if pol.scores_kernel and reason == "available" and fits else "xla"


def float_dot_shape(lhs, rhs, dimension_numbers) -> tuple[int, int, int] | None:
    """``(rows, K, N)`` when ``dot_general(lhs, rhs, dimension_numbers)`` is one matrix
    product the native float32 GEMM takes as it is laid out: no batch dims, lhs
    contracting its last axes in order and rhs its first axes in order (``x @ W`` for
    ``nn.Dense``, ``nn.DenseGeneral``'s 3-D kernels, ``einsum("...k,kn->...n")``);
    else None. Reshaping such operands to 2-D copies nothing."""
    (lc, rc), (lb, rb) = dimension_numbers
    c = len(lc)
    if lb or rb or c == 0 or len(rc) != c or rhs.ndim <= c:
        return None
    if tuple(lc) != tuple(range(lhs.ndim - c, lhs.ndim)) or tuple(rc) != tuple(range(c)):
        return None
    k = math.prod(lhs.shape[lhs.ndim - c :])
    return math.prod(lhs.shape[: lhs.ndim - c]), k, math.prod(rhs.shape[c:])


def epilogue_possible(backend: str | None = None) -> bool:
    """Whether a product's bias add and activation may run inside a native kernel under
    the :class:`Policy` in force and ``backend`` (``Policy.epilogue``, the CPU platform,
    no ``"xla"`` or ``"pallas"`` backend): then :func:`jqx.quantized` hands them to
    ``jqx.ops`` with the product, and the route chosen for the product decides."""
    pol = current_policy()
    return backend not in ("xla", "pallas") and pol.epilogue and _platform(pol) == "cpu"


def float_kernel_possible(backend: str | None = None) -> bool:
    """Whether any float product may run on the native float32 GEMM under the
    :class:`Policy` in force and ``backend``: the cheap conditions only (the kernels'
    availability, which builds them, is asked by :func:`choose_float_dot` for the
    products that need it)."""
    pol = current_policy()
    return backend not in ("xla", "pallas") and pol.f32_kernel and _platform(pol) == "cpu"


def choose_float_dot(
    lhs, rhs, dimension_numbers, preferred_element_type=None, backend: str | None = None
) -> str:
    """``"native"`` or ``"xla"``: who computes a float product with no QArray operand
    (:func:`jqx.ops.float_dot_general`, which :func:`jqx.quantized` calls for them).

    The native float32 GEMM (``native.f32_matmul``) takes float32 operands laid out as
    one matrix product (:func:`float_dot_shape`), on CPU, where its library is
    available and the policy's ``f32_kernel`` allows it, from ``f32_kernel_min_rows``
    rows and ``f32_kernel_min_work`` multiply-adds: from there on it beat XLA's dot in a
    chain of products as a model runs them (below, XLA was as fast or faster: 1.06-1.08x
    the time at 128-512 rows; docs/internals/dispatch.md). ``backend="native"`` drops the size
    rule (the kernel for every product it takes); ``"xla"`` and ``"pallas"`` keep XLA's
    dot. Never raises for a product the kernel does not take: that one runs on XLA.

    Raises:
      ValueError: an unknown ``backend``.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"float_dot_general: backend={backend!r} must be None, 'xla', 'native' or 'pallas'."
        )
    pol = current_policy()
    if backend in ("xla", "pallas") or not pol.f32_kernel:
        return "xla"
    f32 = jnp.dtype(jnp.float32)
    if jnp.dtype(lhs.dtype) != f32 or jnp.dtype(rhs.dtype) != f32:
        return "xla"
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != f32:
        return "xla"
    shape = float_dot_shape(lhs, rhs, dimension_numbers)
    if shape is None:
        return "xla"
    m, k, n = shape
    big = m >= pol.f32_kernel_min_rows and m * k * n >= pol.f32_kernel_min_work
    if backend != "native" and not big:
        return "xla"  # decided without asking for (and so building) the kernels
    return "native" if _native_reason(pol, _platform(pol)) == "available" else "xla"


def _native_reason(pol: Policy, platform: str, library: str = "avx512") -> str:
    """``"available"``, or why a native kernel library may not run: ``"avx512"`` (the
    int8 GEMM and the 4-bit kernel), ``"gguf"`` (the AVX2 GGUF block kernels and
    decode attention) or ``"conv"`` (the AVX2 int8 convolution)."""
    if platform != "cpu":
        return f"they run on the CPU backend and this one is {platform!r}"
    if pol.native_available is not None:
        return "available" if pol.native_available else "off (policy native_available=False)"
    if os.environ.get("JQX_NATIVE", "1") == "0":
        return "disabled by JQX_NATIVE=0"
    if library == "conv":
        return _native_kernels.conv_status()
    return _native_kernels.gguf_status() if library == "gguf" else _native_kernels.status()


def _gguf_reason(pol: Policy, platform: str) -> str:
    return _native_reason(pol, platform, "gguf")


def native_status() -> str:
    """``"available"``, or why ``jqx.ops`` does not run the native CPU kernels here
    (``JQX_NATIVE=0``, the policy, another platform, or the kernel module's own
    reason: no compiler, no AVX512-VNNI, not x86-64). Builds them on first call.

    Example:
        >>> import jqx
        >>> with jqx.ops.policy(native_available=False, platform="cpu"):
        ...     jqx.ops.native_status()
        'off (policy native_available=False)'
    """
    pol = current_policy()
    return _native_reason(pol, _platform(pol))


def _capability(pol: Policy, platform: str) -> tuple[int, int] | None:
    """The GPU's compute capability as (major, minor); None off CUDA GPUs or when the
    device does not say."""
    if platform not in ("gpu", "cuda"):
        return None
    cc = pol.compute_capability
    if cc is None:
        cc = getattr(jax.devices()[0], "compute_capability", None)
    if cc is None:
        return None
    major, _, minor = str(cc).partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        raise ValueError(
            f"compute_capability={cc!r} is not a CUDA compute capability; give it as "
            "'major.minor', e.g. '10.0', or None to read it from the device."
        ) from None


def _scaled_matmul_runs(p: Problem, pol: Policy) -> bool:
    """The MX product can run as ``jax.nn.scaled_matmul`` here: the adapter supports
    it and the GPU has MX tensor cores. Never on CPU (no lowering there)."""
    if not impl_xla.SCALED_MATMUL.supports(p):
        return False
    cc = _capability(pol, _platform(pol))
    return cc is not None and cc >= SCALED_MATMUL_MIN_CAPABILITY


def _first(impls, p: Problem) -> Implementation | None:
    return next((i for i in impls if i.supports(p)), None)


def _xla(p: Problem, pol: Policy, cpu: bool) -> Implementation:
    """The XLA formulation: on CPU by the measured thresholds, elsewhere the direct one
    (no CPU measurement transfers to another platform)."""
    if p.kind == "weight_only":
        if (
            cpu
            and impl_xla.TWO_LEVEL_INT8.supports(p)
            and p.rows <= pol.two_level_max_rows
            and p.weight_size >= pol.two_level_min_weight
        ):
            return impl_xla.TWO_LEVEL_INT8
        if impl_xla.DECODED_DOT.supports(p):
            return impl_xla.DECODED_DOT
        return impl_xla.DEQUANTIZE_DOT
    if p.kind == "w8a8":
        if impl_xla.INT32_DOT.supports(p):
            if cpu and p.rows >= pol.w8a8_bf16_min_rows:
                return impl_xla.BF16_DOT
            if cpu and pol.pad_single_row and impl_xla.INT32_DOT_PADDED.supports(p):
                return impl_xla.INT32_DOT_PADDED
            return impl_xla.INT32_DOT
        return _first((impl_xla.BF16_DOT, impl_xla.DECODED_F32_DOT, impl_xla.SIMULATED_W8A8), p)
    if p.kind == "llm_int8":
        return impl_xla.LLM_INT8
    if p.kind == "gguf_q8":
        return impl_xla.GGUF_Q8
    if p.kind == "mx":
        # The block-scaled dot where the GPU has MX tensor cores; elsewhere (every
        # CPU) the exact emulation.
        if _scaled_matmul_runs(p, pol):
            return impl_xla.SCALED_MATMUL
        return impl_xla.MX_EMULATED
    return impl_xla.DEQUANTIZE_DOT


def _native_pays(p: Problem, pol: Policy) -> Implementation | None:
    """The native kernel for ``p`` if one supports it and ``p`` is big enough to pay."""
    kn = p.k * p.n

    def gemm_pays(rows: int) -> bool:
        decode = rows <= pol.native_decode_rows and kn >= pol.native_min_weight_decode
        return rows * kn >= pol.native_min_work or kn >= pol.native_min_weight or decode

    if p.code_layout == "vnni":
        # Packed ahead for the GEMM (jqx.prepack): any other path would unpack the
        # weight on every call, so the GEMM runs it at every size.
        return _first((impl_native.W8A8_VNNI, impl_native.INT8_GEMM, impl_native.TWO_LEVEL_VNNI), p)
    if impl_native.W4_DECODE.supports(p) and kn >= pol.w4_native_min_weight:
        return impl_native.W4_DECODE
    if impl_native.FP8_DECODE.supports(p) and kn >= pol.w4_native_min_weight:
        return impl_native.FP8_DECODE
    if impl_native.LLM_INT8_DECODE.supports(p) and kn >= pol.llm_int8_native_min_weight:
        return impl_native.LLM_INT8_DECODE
    # W8A8 with the activation quantization in the kernel; up to native_decode_rows
    # the GEMM reads the weight in place (no packing), which the fused call does not.
    if impl_native.W8A8_VNNI.supports(p) and p.rows > pol.native_decode_rows and gemm_pays(p.rows):
        return impl_native.W8A8_VNNI
    if impl_native.INT8_GEMM.supports(p) and gemm_pays(p.rows):
        return impl_native.INT8_GEMM
    # The two-level split feeds the GEMM twice x's rows: split inside the kernel above
    # native_decode_rows code rows, as W8A8; below, XLA splits and the GEMM reads the
    # weight in place.
    if impl_native.TWO_LEVEL.supports(p) and gemm_pays(2 * p.rows):
        if 2 * p.rows > pol.native_decode_rows:
            return impl_native.TWO_LEVEL_VNNI
        return impl_native.TWO_LEVEL
    return None


def choose(p: Problem, backend: str | None = None) -> Implementation:
    """The implementation that runs ``p`` under ``backend`` and the current policy.

    Args:
      p: the product, as ``jqx.ops.dot_general`` describes it.
      backend: ``None``, ``"xla"``, ``"native"`` or ``"pallas"`` (see the module doc).

    Returns:
      An implementation whose ``supports(p)`` is true.

    Raises:
      RuntimeError: ``backend="native"`` where the native kernels cannot run.
    """
    pol = current_policy()
    platform = _platform(pol)
    cpu = platform == "cpu"
    if backend == "xla":
        return _xla(p, pol, cpu)
    if backend == "pallas":
        return _first(impl_pallas.ALL, p) or _xla(p, pol, cpu)
    if backend == "native":
        gguf = _first(impl_native.GGUF, p)
        if gguf is not None and _gguf_reason(pol, platform) == "available":
            return gguf
        reason = _native_reason(pol, platform)
        if reason != "available":
            raise RuntimeError(
                f"backend='native' asks for jqx's native CPU kernels, which cannot run here: "
                f"{reason}. Use backend=None (the measured choice) or backend='xla'."
            )
        return _first(impl_native.ALL, p) or _xla(p, pol, cpu)
    if cpu:
        # GGUF block layouts at decode sizes: the AVX2 kernel reads the blocks in place,
        # where XLA would dequantize the whole weight on every call.
        gguf = _first(impl_native.GGUF, p)
        if gguf is not None and _gguf_reason(pol, platform) == "available":
            return gguf
        impl = _native_pays(p, pol)
        # Availability last: asking builds the kernels, only once a product needs them.
        if impl is not None and _native_reason(pol, platform) == "available":
            return impl
        # W8A8 int8 where the AVX512 GEMM does not run: the AVX2 kernel with the
        # activation quantization fused in (docs/internals/native-kernels.md).
        if (
            impl_native.W8A8_FUSED.supports(p)
            and p.rows * p.k * p.n >= pol.native_min_work
            and _native_reason(pol, platform, "conv") == "available"
        ):
            return impl_native.W8A8_FUSED
    elif platform in ("gpu", "cuda"):
        kind = pol.device_kind or jax.devices()[0].device_kind
        for impl in impl_pallas.ALL:
            if impl.supports(p) and (
                measured_winner(impl.op, p.rows, p.k, p.n, platform, kind, table=pol.pallas_table)
                == "pallas"
            ):
                return impl
    return _xla(p, pol, cpu)


def _conv_work(p) -> int:
    """Multiply-adds of a convolution: output elements x window x input channels."""
    n = p.x_shape[0] * p.w_shape[-1] * p.in_channels
    for k in p.w_shape[:-2]:
        n *= k
    for o in p.out_spatial:
        n *= o
    return n


def choose_conv(p, backend: str | None = None):
    """The implementation that runs the convolution ``p`` (a
    :class:`jqx.ops.conv.ConvProblem`) under ``backend`` and the current policy.

    On CPU, int8 W8A8 convolutions run on the native AVX2 kernel
    (``native.conv_int8``) where it supports them, is available and the convolution
    has at least ``Policy.conv_native_min_work`` multiply-adds; ``backend="native"``
    asks for it whatever the size and raises where it cannot run, as for matmuls. Otherwise XLA: int8 W8A8 convolutions with few input
    channels as one int8 matmul per window position (``Policy.conv_taps_max_in``), the
    rest as XLA's convolutions. No Pallas kernel computes convolutions.

    Raises:
      RuntimeError: ``backend="native"`` where the native kernel cannot run.
    """
    from jqx.ops import conv as _conv  # noqa: PLC0415 (conv imports this module)

    pol = current_policy()
    platform = _platform(pol)
    native = _conv.CONV_NATIVE_INT8
    if backend == "native":
        reason = _native_reason(pol, platform, "conv")
        if reason != "available":
            raise RuntimeError(
                f"backend='native' asks for jqx's native CPU kernels, which cannot run here: "
                f"{reason}. Use backend=None (the measured choice) or backend='xla'."
            )
        if native.supports(p):
            return native
    if p.kind != "w8a8":
        return _conv.CONV_DEQUANTIZE
    if (
        backend is None
        and platform == "cpu"
        and native.supports(p)
        and _conv_work(p) >= pol.conv_native_min_work
        # Availability last: asking builds the kernel, only once a conv needs it.
        and _native_reason(pol, platform, "conv") == "available"
    ):
        return native
    if p.int8_codes:
        taps = _conv.CONV_INT8_TAPS
        if platform == "cpu" and taps.supports(p) and p.in_channels <= pol.conv_taps_max_in:
            return taps
        return _conv.CONV_INT8
    return _conv.CONV_DECODED_F32 if p.factored else _conv.CONV_SIMULATED


def choose_attention(q, k, backend: str | None = None) -> str:
    """``"xla"`` or ``"native"``: who runs a decode step's attention
    (:func:`jqx.ops.attention.decode_attention`) for these operands."""
    pol, reason = _gguf_route(backend, "decode_attention")
    if reason is None:
        return "xla"
    # A quantized cache (jqx.ops.attention.KVCodes): the kernel reads int8, fp8 and
    # int4 (KIVI) codes in place.
    kind = getattr(k, "kind", None)
    codes = k.codes if kind is not None else k
    fits = (
        q.ndim == 3
        and codes.ndim == 4
        and (
            kind in ("int8", "fp8", "int4")
            or (kind is None and codes.dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16)))
        )
        and q.shape[1] % codes.shape[1] == 0
    )
    if backend == "native" and (reason != "available" or not fits):
        what = f"a {kind} cache" if kind is not None else f"cache {codes.shape} {codes.dtype}"
        raise RuntimeError(
            "decode_attention(backend='native'): the native kernel cannot run this: "
            + (reason if reason != "available" else f"q {q.shape}, {what}")
            + " (it takes float32/float16 caches and int8/fp8/int4 quantized ones). Use "
            "backend=None or 'xla'."
        )
    # The native kernel reads only the visible slots; XLA's dot on the updated cache
    # also copies every cache buffer per step (docs/internals/dispatch.md).
    return "native" if reason == "available" and fits else "xla"
