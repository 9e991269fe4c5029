"""all-MiniLM-L6-v2 written the ordinary way: two Flax BERT ports a user would write.

:mod:`jqx_demo.minilm` is jqx's own port, tuned for XLA:CPU (its attention
moves the softmax normalisation after the second einsum). A user's model is
not written that way, so speed measured on it alone flatters jqx. This module
holds the two ordinary ports that ``benchmarks/bert_cpu.py`` measures beside
PyTorch and ONNX Runtime:

- :class:`PlainBert`: attention as Flax BERT ports write it, ``einsum(q, k)``,
  then ``softmax``, then ``einsum`` with ``v``; ``nn.Dense`` projections;
  erf-GELU; post-LayerNorm.
- ``sdpa``: :class:`PlainBert` with ``attention="dot_product_attention"``: the same
  layers, attention by ``jax.nn.dot_product_attention`` (JAX's own attention function).
- :class:`LinenBert`: built from Flax's own layers,
  ``nn.MultiHeadDotProductAttention`` (its projections are
  ``nn.DenseGeneral`` with 3-D kernels), ``nn.Dense``, ``nn.LayerNorm``,
  ``nn.Embed``.

Both end in :func:`jqx_demo.minilm.mean_pool`, load the weights that
:mod:`jqx_demo.minilm` loads (converted from its float variables by
:func:`plain_variables` / :func:`linen_variables`), and reuse its tokenizer,
so their embeddings equal the tuned port's to float tolerance.
:func:`hf_state_dict` maps the same arrays back to a Hugging Face
``BertModel`` state dict, the weights of the torch and ONNX peers.

Example:
    >>> from jqx_demo import bert, minilm
    >>> port = bert.load_plain(minilm.load_tiny())
    >>> port.embed(["A small example."]).shape
    (1, 128)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jqx_demo import minilm
from jqx_demo.minilm import MINILM_L6, BertConfig, Encoder, mean_pool

__all__ = [
    "PORTS",
    "PlainBert",
    "LinenBert",
    "plain_variables",
    "linen_variables",
    "load_plain",
    "load_linen",
    "load_port",
    "hf_state_dict",
    "torch_bert",
]

PORTS = ("plain", "linen", "sdpa")
ATTENTION = ("einsum", "dot_product_attention")  # PlainBert's ``attention``


def _key_bias(attention_mask: jax.Array, dtype) -> jax.Array:
    # Hugging Face's Flax BERT masks padded keys with the dtype's lowest value.
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


class _Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        c = self.config
        pos = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
            + nn.Embed(c.max_position, c.hidden_size, name="position_embeddings")(pos)
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
                token_type_ids
            )
        )
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)


class _PlainSelfAttention(nn.Module):
    config: BertConfig
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        b, t, h = x.shape
        nh, hd = c.num_heads, h // c.num_heads
        q = nn.Dense(h, name="query")(x).reshape(b, t, nh, hd)
        k = nn.Dense(h, name="key")(x).reshape(b, t, nh, hd)
        v = nn.Dense(h, name="value")(x).reshape(b, t, nh, hd)
        if self.attention == "dot_product_attention":
            ctx = jax.nn.dot_product_attention(q, k, v, bias=bias).reshape(b, t, h)
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(hd)) + bias
            probs = jax.nn.softmax(scores, axis=-1)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(
            x + nn.Dense(h, name="output")(ctx)
        )


class _PlainLayer(nn.Module):
    config: BertConfig
    attention: str = "einsum"

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        x = _PlainSelfAttention(c, self.attention, name="attention")(x, bias)
        y = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(
            x + nn.Dense(c.hidden_size, name="output")(y)
        )


class PlainBert(nn.Module):
    """BERT sentence encoder with softmax-then-einsum attention: ``(ids, mask) -> (B, H)``.

    The way Flax BERT ports write attention: scores by ``einsum``, additive
    key mask, ``jax.nn.softmax``, ``einsum`` with the values. With
    ``attention="dot_product_attention"`` (the ``sdpa`` port) the same layers call
    ``jax.nn.dot_product_attention(q, k, v, bias=...)`` instead (same parameters).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = minilm.BertConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
        ...                         intermediate_size=16, max_position=8)
        >>> ids = jnp.ones((1, 4), jnp.int32)
        >>> v = PlainBert(cfg).init(jax.random.key(0), ids, ids)
        >>> PlainBert(cfg).apply(v, ids, ids).shape
        (1, 8)
    """

    config: BertConfig = MINILM_L6
    attention: str = "einsum"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        c = self.config
        if self.attention not in ATTENTION:
            raise ValueError(f"PlainBert: attention={self.attention!r} is not one of {ATTENTION}.")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = _Embeddings(c, name="embeddings")(input_ids, token_type_ids)
        bias = _key_bias(attention_mask, x.dtype)
        for i in range(c.num_layers):
            x = _PlainLayer(c, self.attention, name=f"layer_{i}")(x, bias)
        return mean_pool(x, attention_mask)


class _LinenLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        attn = nn.MultiHeadDotProductAttention(
            num_heads=c.num_heads,
            qkv_features=c.hidden_size,
            out_features=c.hidden_size,
            name="attention",
        )(x, mask=mask)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm")(x + attn)
        y = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(
            x + nn.Dense(c.hidden_size, name="output")(y)
        )


class LinenBert(nn.Module):
    """BERT sentence encoder from Flax's own layers: ``(ids, mask) -> (B, H)``.

    Attention is ``nn.MultiHeadDotProductAttention`` with a boolean key mask;
    its ``query``/``key``/``value`` kernels are ``(hidden, heads, head_dim)``
    and its ``out`` kernel ``(heads, head_dim, hidden)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = minilm.BertConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
        ...                         intermediate_size=16, max_position=8)
        >>> ids = jnp.ones((1, 4), jnp.int32)
        >>> v = LinenBert(cfg).init(jax.random.key(0), ids, ids)
        >>> v["params"]["layer_0"]["attention"]["query"]["kernel"].shape
        (8, 2, 4)
    """

    config: BertConfig = MINILM_L6

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        c = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = _Embeddings(c, name="embeddings")(input_ids, token_type_ids)
        mask = (attention_mask > 0)[:, None, None, :]
        for i in range(c.num_layers):
            x = _LinenLayer(c, name=f"layer_{i}")(x, mask)
        return mean_pool(x, attention_mask)


# ---------------------------------------------------------------- weights


def _tuned(variables: dict[str, Any], config: BertConfig) -> dict[str, Any]:
    """The ``bert`` subtree of a :mod:`jqx_demo.minilm` variables dict, checked."""
    try:
        p = variables["params"]["bert"]
    except (KeyError, TypeError):
        raise ValueError(
            "variables must be the float variables of jqx_demo.minilm's SentenceEncoder "
            f"({{'params': {{'bert': ...}}}}); got top-level keys {sorted(variables)[:4]}. "
            "Pass minilm.load_minilm().variables or minilm.load_tiny().variables."
        ) from None
    missing = [f"layer_{i}" for i in range(config.num_layers) if f"layer_{i}" not in p]
    if missing:
        raise ValueError(
            f"variables have no {missing[0]!r} but config.num_layers={config.num_layers}; "
            "pass the config the variables were loaded with (Encoder.config)."
        )
    return p


def _embeddings(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "word_embeddings": p["word_embeddings"],
        "position_embeddings": p["position_embeddings"],
        "token_type_embeddings": p["token_type_embeddings"],
        "LayerNorm": p["embeddings_norm"],
    }


def plain_variables(variables: dict[str, Any], config: BertConfig = MINILM_L6) -> dict[str, Any]:
    """:class:`PlainBert` variables from :mod:`jqx_demo.minilm`'s float variables.

    The arrays are shared, not copied.

    Args:
      variables: ``Encoder.variables`` of :func:`jqx_demo.minilm.load_minilm` or
        :func:`~jqx_demo.minilm.load_tiny`.
      config: the encoder's config (``Encoder.config``).

    Returns:
      ``{"params": ...}`` for ``PlainBert(config).apply``.

    Example:
        >>> enc = minilm.load_tiny()
        >>> v = plain_variables(enc.variables, enc.config)
        >>> sorted(v["params"]["layer_0"]["attention"])
        ['LayerNorm', 'key', 'output', 'query', 'value']
    """
    p = _tuned(variables, config)
    out: dict[str, Any] = {"embeddings": _embeddings(p)}
    for i in range(config.num_layers):
        lp = p[f"layer_{i}"]
        out[f"layer_{i}"] = {
            "attention": {
                "query": lp["query"],
                "key": lp["key"],
                "value": lp["value"],
                "output": lp["attention_out"],
                "LayerNorm": lp["attention_norm"],
            },
            "intermediate": lp["intermediate"],
            "output": lp["output"],
            "LayerNorm": lp["output_norm"],
        }
    return {"params": out}


def linen_variables(variables: dict[str, Any], config: BertConfig = MINILM_L6) -> dict[str, Any]:
    """:class:`LinenBert` variables from :mod:`jqx_demo.minilm`'s float variables.

    The ``(hidden, hidden)`` attention kernels are reshaped to the per-head
    layout of ``nn.MultiHeadDotProductAttention``.

    Args:
      variables: ``Encoder.variables`` of :func:`jqx_demo.minilm.load_minilm` or
        :func:`~jqx_demo.minilm.load_tiny`.
      config: the encoder's config (``Encoder.config``).

    Returns:
      ``{"params": ...}`` for ``LinenBert(config).apply``.

    Example:
        >>> enc = minilm.load_tiny()
        >>> v = linen_variables(enc.variables, enc.config)
        >>> v["params"]["layer_0"]["attention"]["out"]["kernel"].shape
        (4, 32, 128)
    """
    p = _tuned(variables, config)
    h, nh = config.hidden_size, config.num_heads
    hd = h // nh

    def qkv(d):
        return {"kernel": d["kernel"].reshape(h, nh, hd), "bias": d["bias"].reshape(nh, hd)}

    out: dict[str, Any] = {"embeddings": _embeddings(p)}
    for i in range(config.num_layers):
        lp = p[f"layer_{i}"]
        out[f"layer_{i}"] = {
            "attention": {
                "query": qkv(lp["query"]),
                "key": qkv(lp["key"]),
                "value": qkv(lp["value"]),
                "out": {
                    "kernel": lp["attention_out"]["kernel"].reshape(nh, hd, h),
                    "bias": lp["attention_out"]["bias"],
                },
            },
            "attention_norm": lp["attention_norm"],
            "intermediate": lp["intermediate"],
            "output": lp["output"],
            "output_norm": lp["output_norm"],
        }
    return {"params": out}


def load_port(port: str, enc: Encoder | None = None) -> Encoder:
    """One of the ordinary ports (``"plain"``, ``"linen"`` or ``"sdpa"``) with ``enc``'s
    weights.

    Args:
      port: ``"plain"`` (:class:`PlainBert`), ``"linen"`` (:class:`LinenBert`) or
        ``"sdpa"`` (:class:`PlainBert` with ``jax.nn.dot_product_attention``).
      enc: the :mod:`jqx_demo.minilm` encoder whose weights and tokenizer to use;
        default :func:`jqx_demo.minilm.load_default`.

    Returns:
      An :class:`~jqx_demo.minilm.Encoder` whose ``module`` is the port, so
      ``tokenize`` and ``embed`` work as for the tuned port.

    Example:
        >>> load_port("linen", minilm.load_tiny()).module.__class__.__name__
        'LinenBert'
    """
    if port not in PORTS:
        raise ValueError(f"port={port!r} is not a BERT port here; use one of {PORTS}.")
    enc = minilm.load_default() if enc is None else enc
    if port == "linen":
        module, convert = LinenBert(enc.config), linen_variables
    else:
        attention = "einsum" if port == "plain" else "dot_product_attention"
        module, convert = PlainBert(enc.config, attention), plain_variables
    return Encoder(
        f"{enc.name} ({port})", module, convert(enc.variables, enc.config), enc.tokenizer
    )


def load_plain(enc: Encoder | None = None) -> Encoder:
    """:class:`PlainBert` with ``enc``'s weights (default: :func:`minilm.load_default`).

    Example:
        >>> load_plain(minilm.load_tiny()).name
        'tiny (plain)'
    """
    return load_port("plain", enc)


def load_linen(enc: Encoder | None = None) -> Encoder:
    """:class:`LinenBert` with ``enc``'s weights (default: :func:`minilm.load_default`).

    Example:
        >>> load_linen(minilm.load_tiny()).name
        'tiny (linen)'
    """
    return load_port("linen", enc)


# ---------------------------------------------------------------- torch peer


def hf_state_dict(
    variables: dict[str, Any], config: BertConfig = MINILM_L6
) -> dict[str, np.ndarray]:
    """A Hugging Face ``BertModel`` state dict (numpy) of :mod:`jqx_demo.minilm`'s variables.

    The inverse of :func:`jqx_demo.minilm.params_from_hf`: Flax ``kernel``
    ``(in, out)`` becomes torch ``weight`` ``(out, in)``. The pooler, which
    mean pooling does not use, is absent.

    Args:
      variables: ``Encoder.variables`` of the tuned port.
      config: the encoder's config.

    Returns:
      ``{"embeddings.word_embeddings.weight": array, ...}`` (float32).

    Example:
        >>> enc = minilm.load_tiny()
        >>> sd = hf_state_dict(enc.variables, enc.config)
        >>> sd["encoder.layer.0.intermediate.dense.weight"].shape
        (512, 128)
    """
    p = _tuned(variables, config)

    def arr(x):
        # A writable copy: torch.from_numpy warns on the read-only views of jax arrays.
        return np.array(x, dtype=np.float32, order="C")

    sd: dict[str, np.ndarray] = {}

    def dense(name, d):
        sd[name + ".weight"] = arr(np.asarray(d["kernel"]).T)
        sd[name + ".bias"] = arr(d["bias"])

    def norm(name, d):
        sd[name + ".weight"] = arr(d["scale"])
        sd[name + ".bias"] = arr(d["bias"])

    for e in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        sd[f"embeddings.{e}.weight"] = arr(p[e]["embedding"])
    norm("embeddings.LayerNorm", p["embeddings_norm"])
    for i in range(config.num_layers):
        lp, e = p[f"layer_{i}"], f"encoder.layer.{i}."
        dense(e + "attention.self.query", lp["query"])
        dense(e + "attention.self.key", lp["key"])
        dense(e + "attention.self.value", lp["value"])
        dense(e + "attention.output.dense", lp["attention_out"])
        norm(e + "attention.output.LayerNorm", lp["attention_norm"])
        dense(e + "intermediate.dense", lp["intermediate"])
        dense(e + "output.dense", lp["output"])
        norm(e + "output.LayerNorm", lp["output_norm"])
    return sd


def torch_bert(enc: Encoder) -> Any:
    """A torch sentence encoder with ``enc``'s weights: ``(ids, mask) -> (B, H)`` unit vectors.

    A ``transformers.BertModel`` built from ``enc.config`` (transformers'
    default attention, no pooler) with :func:`hf_state_dict` loaded, followed by the same mean
    pooling and L2 normalisation, in eval mode. Needs ``torch`` and
    ``transformers`` (benchmark extras, imported here only).

    Args:
      enc: a :mod:`jqx_demo.minilm` encoder (the tuned port's variables).

    Returns:
      A ``torch.nn.Module``.

    Example:
        >>> import torch  # doctest: +SKIP
        >>> m = torch_bert(minilm.load_tiny())  # doctest: +SKIP
        >>> ids = torch.ones((1, 4), dtype=torch.int64)  # doctest: +SKIP
        >>> tuple(m(ids, ids).shape)  # doctest: +SKIP
        (1, 128)
    """
    import torch
    import transformers

    c = enc.config
    hf = transformers.BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position,
        type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertModel(hf, add_pooling_layer=False)
    sd = {k: torch.from_numpy(v) for k, v in hf_state_dict(enc.variables, c).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # position_ids / token_type_ids are buffers the model fills itself.
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(
            f"torch BertModel does not match the weights: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}; is transformers' BertModel layout unchanged?"
        )

    class _Sentence(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            s = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(s, p=2.0, dim=-1, eps=1e-12)

    return _Sentence(model).eval()
