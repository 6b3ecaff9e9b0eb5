"""Command line: ``python -m ttconv {demo}`` (also installed as ``ttconv``)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttconv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="convert a conv layer and print its errors and exact spectrum")
    demo.add_argument("--channels", type=int, default=128)
    demo.add_argument("--input-size", type=int, default=16)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    options = _build_parser().parse_args(argv)
    if options.command == "demo":
        from .demo import run_demo

        print("\n".join(run_demo(options.channels, options.input_size)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
