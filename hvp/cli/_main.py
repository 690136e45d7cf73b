"""Entry point of the ``hvp`` console script."""

from __future__ import annotations

import argparse
import sys

from hvp._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvp",
        description="Hessian-vector products and curvature analysis for JAX models.",
    )
    parser.add_argument("--version", action="version", version=f"hvp {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
