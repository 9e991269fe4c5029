"""Next-token sampling: greedy, temperature, top-k and top-p, with an explicit PRNG key.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jqx.llm.sampling import Sampling, sample
    >>> logits = jnp.array([[0.0, 3.0, 1.0]])
    >>> sample(logits, jax.random.key(0), Sampling()).tolist()     # greedy
    [1]
    >>> sample(logits, jax.random.key(0), Sampling(temperature=1.0, top_k=1)).tolist()
    [1]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["Sampling", "sample"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
      temperature: 0 for greedy decoding (argmax); otherwise logits are divided by it
        before sampling (> 0).
      top_k: keep only the k most likely tokens (0 = all).
      top_p: keep the smallest set of most likely tokens whose probability reaches
        ``top_p`` (nucleus sampling; 1.0 = all). In (0, 1].
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or not t >= 0 or t != t or t == float("inf"):
            raise ValueError(
                f"temperature={t!r} must be a finite number >= 0 (0 = greedy; 0.7 is a "
                "common choice for sampling)."
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k={k!r} must be an int >= 0 (0 keeps every token; e.g. 40).")
        if not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p={p!r} must be in (0, 1] (1.0 keeps every token; e.g. 0.9).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row of ``logits`` (batch, vocab), as int32 (batch,).

    Greedy when ``sampling.temperature == 0`` (the key is unused); otherwise the
    tokens kept by top-k and top-p are drawn with ``jax.random.categorical``.
    """
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, sampling.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= sampling.top_p  # the most likely token is always kept
        drop = (
            jnp.zeros_like(drop_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(drop_sorted)
        )
        x = jnp.where(drop, -jnp.inf, x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
