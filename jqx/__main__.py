"""Command line: ``python -m jqx formats [NAME]``, ``python -m jqx demo``."""

from __future__ import annotations

import argparse
import sys


def _cmd_formats(args) -> int:
    from jqx import cli_formats

    print(cli_formats.render(args.name))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jqx", description="jqx: quantization for JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("formats", help="the anatomy of every number format, or of one")
    p.add_argument("name", nargs="?", default=None, help="a format name, e.g. e4m3 or nf4")
    p.set_defaults(func=_cmd_formats)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
