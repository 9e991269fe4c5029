"""The Llama architecture's hyper-parameters, read from a GGUF file's metadata.

Example:
    >>> from jqx.llm.config import LlamaConfig
    >>> c = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)
    >>> c.head_dim, c.group_size
    (8, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["LlamaConfig", "ARCHITECTURES"]

# GGUF architectures that share Llama's block (GQA attention with RoPE on adjacent
# pairs, RMSNorm, SwiGLU MLP). Others raise with this list.
ARCHITECTURES = ("llama",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama hyper-parameters.

    Attributes:
      vocab_size: number of tokens.
      dim: model width (``embedding_length``).
      n_layers: transformer blocks.
      n_heads: query heads.
      n_kv_heads: key/value heads (grouped-query attention when fewer than n_heads).
      hidden_dim: MLP width (``feed_forward_length``).
      rope_base: RoPE frequency base.
      rope_dim: dimensions of each head that RoPE rotates (the head size for Llama).
      norm_eps: RMSNorm epsilon.
      context_length: the longest sequence the model was trained for.
      tied_embedding: the output projection is the token embedding (no ``output.weight``).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    rope_base: float = 10000.0
    rope_dim: int | None = None
    norm_eps: float = 1e-5
    context_length: int = 2048
    tied_embedding: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"LlamaConfig: {name}={v!r} must be a positive int.")
        if self.dim % self.n_heads:
            raise ValueError(
                f"LlamaConfig: dim={self.dim} is not a multiple of n_heads={self.n_heads}."
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads} (grouped-query attention shares each key/value "
                "head among a whole number of query heads)."
            )
        if self.rope_dim is not None and (self.rope_dim % 2 or self.rope_dim > self.head_dim):
            raise ValueError(
                f"LlamaConfig: rope_dim={self.rope_dim} must be even and at most the head size "
                f"{self.head_dim}."
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], *, source: str = "<metadata>", tied: bool = True
    ) -> LlamaConfig:
        """The configuration of a Llama-architecture GGUF file.

        Args:
          metadata: the file's key/value metadata (``jqx.load_gguf(path).metadata``).
          source: the file's name, for error messages.
          tied: whether the file has no ``output.weight`` (the embedding is reused).

        Raises:
          ValueError: another architecture, or a required key is missing.
        """
        arch = metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"{source}: general.architecture={arch!r} is not supported by jqx.llm; "
                f"supported: {', '.join(ARCHITECTURES)} (GQA attention with RoPE, RMSNorm, "
                "SwiGLU)."
            )

        def get(key, default=dataclasses.MISSING):
            full = f"{arch}.{key}"
            if full in metadata:
                return metadata[full]
            if default is dataclasses.MISSING:
                raise ValueError(
                    f"{source}: the metadata key {full!r} is missing; a {arch} GGUF file "
                    "needs it to build the model."
                )
            return default

        n_heads = int(get("attention.head_count"))
        vocab = get("vocab_size", None)
        if vocab is None:
            tokens = metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ValueError(
                    f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present."
                )
            vocab = len(tokens)
        dim = int(get("embedding_length"))
        return cls(
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            hidden_dim=int(get("feed_forward_length")),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_dim=int(get("rope.dimension_count", dim // n_heads)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=int(get("context_length", 2048)),
            tied_embedding=tied,
        )
