"""File formats into and out of jqx (the io layer): jqx's own checkpoints
(:mod:`jqx.io.checkpoint`: ``jqx.save`` / ``jqx.load``), quantized trees in
orbax-checkpoint (:mod:`jqx.io.orbax`), GGUF import, and GPTQ / AWQ /
compressed-tensors checkpoints in and out (:mod:`jqx.io.exchange`).

A file's quantized tensors become :class:`jqx.QArray` s holding the file's own codes
and scales (never a float copy), so what is resident is what the file stores.

Example:
    >>> import jqx.io
    >>> "Q4_K" in jqx.io.gguf.SUPPORTED_TYPES
    True
"""

from jqx.io import checkpoint as checkpoint
from jqx.io import exchange as exchange
from jqx.io import gguf as gguf
from jqx.io import orbax as orbax
from jqx.io.checkpoint import CheckpointError as CheckpointError
from jqx.io.exchange import ExchangeError as ExchangeError
from jqx.io.gguf import GGUFError as GGUFError
from jqx.io.gguf import GGUFFile as GGUFFile

__all__ = [
    "CheckpointError",
    "ExchangeError",
    "GGUFError",
    "GGUFFile",
    "checkpoint",
    "exchange",
    "gguf",
    "orbax",
]
