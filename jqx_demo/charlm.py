"""A small character-level decoder-only transformer (Flax NNX) on Shakespeare.

The evaluation bed for post-training quantization and the model of the
training examples. Every matmul weight is an ``nnx.Linear`` ``kernel`` of
shape ``(in, out)``, so ``jqx.quantize``'s default selection finds exactly
them (qkv, attention output, MLP in/out of each block, and the untied output
head); embeddings, positions and LayerNorms stay float.

The forward pass is a plain function of ``(params, tokens)`` where ``params``
is a nested dict of arrays (``nnx.to_pure_dict`` of the model's state), so it
composes with ``jax.jit``, ``jax.grad``, ``jqx.quantized`` and mixed-precision
casting:

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jqx_demo import charlm
    >>> cfg = charlm.CharLMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=16)
    >>> model = charlm.CharLM(cfg, rngs=nnx.Rngs(0))
    >>> params = charlm.get_params(model)
    >>> logits = charlm.apply_fn(cfg)(params, jnp.zeros((2, 16), jnp.int32))
    >>> logits.shape
    (2, 16, 84)

The trained checkpoint lives in ``jqx_demo/data/charlm.safetensors``
(made by ``python examples/train_charlm.py``); :func:`load_checkpoint` /
:func:`load_params` read it and :func:`evaluate` scores any forward function
on the held-out plays in nats and bits per character.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqx_demo.shakespeare import VOCAB, eval_windows, load_shakespeare

__all__ = [
    "CharLMConfig",
    "CharLM",
    "DEFAULT_CHECKPOINT",
    "get_params",
    "apply_fn",
    "cross_entropy",
    "loss_fn",
    "evaluate",
    "save_checkpoint",
    "load_params",
    "load_checkpoint",
    "bits_per_char",
    "load_shakespeare",
]

DEFAULT_CHECKPOINT = pathlib.Path(
    str(importlib.resources.files("jqx_demo") / "data" / "charlm.safetensors")
)

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class CharLMConfig:
    """Shape of the model. The defaults are the cached checkpoint's (0.83M params).

    ``d_model`` and ``d_ff`` are multiples of 128 so group-wise recipes with
    ``group_size=128`` divide every kernel's input axis (``fc2``'s 512 holds
    four groups; the 84-row embedding is not a kernel). The size is what a
    10-20 minute CPU training run can fill: on 2 shared cores a wider model
    sees too few characters in that time to beat this one.
    """

    vocab_size: int = len(VOCAB)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    max_len: int = 128

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"CharLMConfig.{name} must be a positive int, got {v!r}.")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"CharLMConfig: n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                "pick n_heads among the divisors of d_model (e.g. 4 or 8 for 256)."
            )

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown CharLMConfig fields {sorted(unknown)}; known: {sorted(known)}."
            )
        return cls(**{k: int(v) for k, v in d.items()})


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    # 16-bit dots accumulate in f32 and round once: more accurate, and on XLA:CPU
    # a bf16-output dot is 3-5x slower than one with an f32 result.
    if preferred_element_type is None and lhs.dtype in _HALF and rhs.dtype == lhs.dtype:
        out = jax.lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=jnp.float32,
            **kw,
        )
        return out.astype(lhs.dtype)
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kw,
    )


def _linear(
    d_in: int, d_out: int, rngs: nnx.Rngs, std: float = 0.02, bias: bool = True
) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        kernel_init=nnx.initializers.normal(std),
        dot_general=_dot_general,
        rngs=rngs,
    )


class Embed(nnx.Module):
    """Token embedding table; returns rows in the table's own dtype.

    (``nnx.Embed`` casts its output back to the dtype it was built with, which
    would undo a bf16/fp16 policy's cast of the parameters.)
    """

    def __init__(self, vocab_size: int, d: int, rngs: nnx.Rngs):
        self.embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (vocab_size, d), jnp.float32)
        )

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0)


class LayerNorm(nnx.Module):
    """LayerNorm whose statistics are always computed in float32 (output in the input's dtype)."""

    def __init__(self, d: int, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention; softmax in float32."""

    def __init__(self, cfg: CharLMConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.qkv = _linear(d, 3 * d, rngs)
        self.out = _linear(d, d, rngs, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def __call__(self, x):
        b, t, d = x.shape
        h = self.n_heads
        qkv = self.qkv(x).reshape(b, t, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        logits = logits * (1.0 / math.sqrt(d // h))
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        logits = jnp.where(causal, logits, jnp.float32(-1e30))
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhts,bshd->bthd", w, v, preferred_element_type=jnp.float32)
        return self.out(o.astype(x.dtype).reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, cfg: CharLMConfig, rngs: nnx.Rngs):
        self.fc1 = _linear(cfg.d_model, cfg.d_ff, rngs)
        self.fc2 = _linear(cfg.d_ff, cfg.d_model, rngs, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: CharLMConfig, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, rngs)
        self.ln2 = LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharLM(nnx.Module):
    """Decoder-only character transformer: ``tokens (B, T) int -> logits (B, T, vocab)``.

    Computes in the dtype of its parameters (cast the params for bf16/fp16);
    LayerNorm statistics and attention softmax stay in float32.

    Args:
      config: a :class:`CharLMConfig`.
      rngs: ``nnx.Rngs`` for the initialisation.

    Example:
        >>> cfg = CharLMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=8)
        >>> CharLM(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 8), jnp.int32)).shape
        (1, 8, 84)
    """

    def __init__(self, config: CharLMConfig, rngs: nnx.Rngs):
        if not isinstance(config, CharLMConfig):
            raise TypeError(f"config must be a CharLMConfig, got {type(config).__name__}.")
        self.config = config
        d = config.d_model
        self.embed = Embed(config.vocab_size, d, rngs)
        self.pos_embedding = nnx.Param(
            nnx.initializers.normal(0.01)(rngs.params(), (config.max_len, d))
        )
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.n_layers)])
        self.ln_f = LayerNorm(d)
        self.head = _linear(d, config.vocab_size, rngs, bias=False)

    def __call__(self, tokens):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be an int array of shape (batch, time), got {tokens.dtype}{tokens.shape}."
            )
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(
                f"tokens has {t} positions but the model has max_len={self.config.max_len}; "
                f"evaluate in windows of at most {self.config.max_len}."
            )
        x = self.embed(tokens)
        x = x + self.pos_embedding[...][:t].astype(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def get_params(model: CharLM) -> dict:
    """The model's parameters as a nested dict of arrays (paths like ``blocks/0/attn/qkv/kernel``).

    Example:
        >>> cfg = CharLMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=8)
        >>> get_params(CharLM(cfg, rngs=nnx.Rngs(0)))["head"]["kernel"].shape
        (32, 84)
    """
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.cache
def apply_fn(config: CharLMConfig) -> Callable[[dict, jax.Array], jax.Array]:
    """The forward pass as a pure function ``f(params, tokens) -> logits``.

    ``params`` is the dict of :func:`get_params` (any leaf may be cast, or be a
    QArray under ``jqx.quantized``). Cached per config, so ``jax.jit`` of the
    result is reused.

    Example:
        >>> cfg = CharLMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=8)
        >>> p = get_params(CharLM(cfg, rngs=nnx.Rngs(0)))
        >>> apply_fn(cfg)(p, jnp.ones((2, 8), jnp.int32)).shape
        (2, 8, 84)
    """
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: CharLM(config, rngs=nnx.Rngs(0))), nnx.Param
    )

    def f(params, tokens):
        state = jax.tree.map(lambda x: x, abstract)  # fresh copy: replace_by_pure_dict mutates
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)(tokens)

    f.__name__ = f"charlm_apply_d{config.d_model}_l{config.n_layers}"
    return f


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-character cross-entropy in nats, computed in float32.

    Example:
        >>> round(float(cross_entropy(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32))), 4)  # log(4)
        1.3863
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1))


def loss_fn(params: dict, batch: jax.Array, config: CharLMConfig) -> jax.Array:
    """Cross-entropy (nats) of ``batch`` windows ``(B, T + 1)``: inputs ``[:, :-1]``, targets ``[:, 1:]``.

    Example:
        >>> cfg = CharLMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=8)
        >>> p = get_params(CharLM(cfg, rngs=nnx.Rngs(0)))
        >>> bool(abs(loss_fn(p, jnp.ones((2, 9), jnp.int32), cfg) - math.log(84)) < 0.1)
        True
    """
    logits = apply_fn(config)(params, batch[:, :-1])
    return cross_entropy(logits, batch[:, 1:])


def bits_per_char(nats: float) -> float:
    """Nats per character to bits per character."""
    return float(nats) / math.log(2.0)


def evaluate(
    model_or_fn: CharLM | Callable[[jax.Array], jax.Array],
    val_ids: np.ndarray | None = None,
    *,
    seq_len: int = 128,
    n_windows: int | None = 256,
    batch_size: int = 32,
) -> tuple[float, float]:
    """Validation loss of a model or of any ``tokens -> logits`` function.

    Scores the same fixed windows every time (:func:`~jqx_demo.shakespeare.eval_windows`
    from the start of the held-out plays; 256 windows of 128 = 32768 predicted
    characters by default), so float and quantized runs are paired.

    Args:
      model_or_fn: a :class:`CharLM`, or a callable ``tokens (B, T) -> logits``
        (e.g. ``lambda t: jax.jit(jqx.quantized(apply_fn(cfg)))(qparams, t)``).
        The callable is jitted here.
      val_ids: validation ids; default: ``load_shakespeare().val``.
      seq_len: window length (at most the model's ``max_len``).
      n_windows: how many windows; None for the whole validation text.
      batch_size: windows per forward call (the last batch is padded and masked).

    Returns:
      ``(loss_nats, bits_per_char)``.

    Example:
        >>> cfg = CharLMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=8)
        >>> loss, bpc = evaluate(CharLM(cfg, rngs=nnx.Rngs(0)), seq_len=8, n_windows=4)
        >>> 6.0 < bpc < 6.6  # untrained: about log2(84)
        True
    """
    if val_ids is None:
        val_ids = load_shakespeare().val
    if isinstance(model_or_fn, CharLM):
        cfg = model_or_fn.config
        params = get_params(model_or_fn)
        f = apply_fn(cfg)

        def fn(t):
            return f(params, t)

    elif callable(model_or_fn):
        fn = model_or_fn
    else:
        raise TypeError(
            f"model_or_fn must be a CharLM or a callable tokens -> logits, got {type(model_or_fn).__name__}."
        )
    windows = eval_windows(val_ids, seq_len, n_windows)

    @jax.jit
    def nll_sum(w, valid):
        logits = fn(w[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, w[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid[:, None], nll, jnp.float32(0.0)))

    total = 0.0
    n = windows.shape[0]
    for i in range(0, n, batch_size):
        w = windows[i : i + batch_size]
        valid = np.ones((batch_size,), bool)
        if w.shape[0] < batch_size:  # pad to one shape: one compilation
            valid[w.shape[0] :] = False
            w = np.concatenate([w, np.zeros((batch_size - w.shape[0], w.shape[1]), np.int32)])
        total += float(nll_sum(jnp.asarray(w), jnp.asarray(valid)))
    loss = total / (n * seq_len)
    return loss, bits_per_char(loss)


def _flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def save_checkpoint(
    model_or_params: CharLM | dict,
    path: str | pathlib.Path,
    config: CharLMConfig | None = None,
    **metadata,
) -> None:
    """Writes float32 params + config (+ any JSON-able metadata) to a safetensors file.

    Example:
        >>> import tempfile, os
        >>> cfg = CharLMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=8)
        >>> m = CharLM(cfg, rngs=nnx.Rngs(0))
        >>> p = os.path.join(tempfile.mkdtemp(), "lm.safetensors")
        >>> save_checkpoint(m, p, steps=0); load_checkpoint(p).config == cfg
        True
    """
    from safetensors.numpy import save_file

    if isinstance(model_or_params, CharLM):
        config = model_or_params.config
        params = get_params(model_or_params)
    else:
        params = model_or_params
        if config is None:
            raise ValueError("save_checkpoint(params_dict, ...) needs config=CharLMConfig(...).")
    flat = {
        k: np.ascontiguousarray(np.asarray(v, dtype=np.float32))
        for k, v in _flatten(params).items()
    }
    meta = {"config": json.dumps(config.to_dict()), "vocab": json.dumps(VOCAB)}
    meta.update({k: json.dumps(v) for k, v in metadata.items()})
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path), metadata=meta)


def load_params(path: str | pathlib.Path | None = None) -> tuple[CharLMConfig, dict, dict]:
    """Reads a checkpoint: ``(config, params, metadata)``; shapes checked against the config.

    Args:
      path: a ``.safetensors`` file; default: the cached ``jqx_demo/data/charlm.safetensors``.

    Example:
        >>> cfg, params, meta = load_params()  # the cached checkpoint
        >>> meta["steps"], params["head"]["kernel"].shape
        (1200, (128, 84))
    """
    from safetensors import safe_open

    path = pathlib.Path(DEFAULT_CHECKPOINT if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(
            f"char LM checkpoint {path} not found; create it with `python examples/train_charlm.py` "
            "(about 10 minutes on 2 CPU cores) or pass path= to an existing one."
        )
    with safe_open(str(path), framework="numpy") as f:
        raw_meta = f.metadata() or {}
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    if "config" not in raw_meta:
        raise ValueError(
            f"{path} has no 'config' metadata; it was not written by jqx_demo.charlm.save_checkpoint."
        )
    meta = {k: json.loads(v) for k, v in raw_meta.items()}
    config = CharLMConfig.from_dict(meta.pop("config"))
    if meta.get("vocab", VOCAB) != VOCAB:
        raise ValueError(
            f"{path} was trained with a different vocabulary than jqx_demo.shakespeare.VOCAB."
        )
    expected = _flatten(
        nnx.to_pure_dict(
            nnx.state(nnx.eval_shape(lambda: CharLM(config, rngs=nnx.Rngs(0))), nnx.Param)
        )
    )
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"{path} does not match {config}: missing {missing}, unexpected {extra}.")
    params: dict = {}
    for key, spec in expected.items():
        a = arrays[key]
        if tuple(a.shape) != tuple(spec.shape):
            raise ValueError(
                f"{path}: {key} has shape {a.shape}, the config expects {tuple(spec.shape)}."
            )
        node = params
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[parts[-1]] = jnp.asarray(a, dtype=spec.dtype)
    return config, params, meta


def load_checkpoint(path: str | pathlib.Path | None = None) -> CharLM:
    """The trained :class:`CharLM` from a checkpoint (default: the cached one).

    Raises FileNotFoundError (with the command that makes it) when absent.

    Example:
        >>> model = load_checkpoint()
        >>> model.config.d_model
        128
        >>> loss, bpc = evaluate(model)  # doctest: +SKIP
    """
    config, params, _ = load_params(path)
    model = CharLM(config, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    return model
