"""Model ports used by the demo and benchmarks (Flax linen).

Example:
    >>> from jqx.models import minilm
    >>> minilm.MINILM_L6.hidden_size
    384
"""

from jqx.models import minilm

__all__ = ["minilm"]
