"""The `mlximg` command line."""

import argparse
import sys

from . import __version__


def _info(args: argparse.Namespace) -> int:
    from .info import info

    for key, value in info().items():
        print(f"{key:<14}{value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlximg", description="Diffusion-transformer image generation on MLX.")
    parser.add_argument("--version", action="version", version=f"mlximg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backend, device, dtype policy, BLAS and versions").set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"mlximg: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
