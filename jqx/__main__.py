"""Command line: ``python -m jqx formats [NAME]``, ``python -m jqx demo``."""

from __future__ import annotations

import argparse
import sys


def _cmd_formats(args) -> int:
    from jqx import cli_formats

    print(cli_formats.render(args.name))
    return 0


def _cmd_demo(args) -> int:
    from jqx import demo

    return demo.main(args)


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
        "--recipes", default="all", help="comma-separated keys (int8,int4-g32,...) or 'all'"
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
    d.add_argument("--plot", default=None, metavar="PNG", help="write accuracy vs size to this PNG")
    d.add_argument("--tiny", action="store_true", help="use the shipped tiny encoder")
    d.add_argument("--quiet", action="store_true", help="no progress lines")
    d.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
