"""`lgformer` command line. Each area registers its sub-commands; nothing parses at import time."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from lgformer.errors import LGFormerError
from lgformer.precision import PRECISIONS, precision_name

Handler = Callable[[argparse.Namespace], int | None]


def add_device_argument(p: argparse._ActionsContainer) -> None:
    """`--device`, spelled and defaulted the same in every command."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default %(default)s)")


def add_dtype_argument(p: argparse._ActionsContainer, help: str) -> None:
    """`--dtype fp32|bf16|fp16` (torch's float32/bfloat16/float16 accepted), stored as the short name."""
    p.add_argument("--dtype", default="fp32", type=precision_name, choices=list(PRECISIONS), help=help)


def add_overrides_argument(p: argparse._ActionsContainer, help: str) -> None:
    """Repeatable `--set KEY=VALUE` dotted config overrides, collected in `args.overrides`."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    from lgformer.app import commands as app_commands
    from lgformer.convert import commands as convert_commands
    from lgformer.data import commands as data_commands
    from lgformer.engine import commands as engine_commands
    from lgformer.model import commands as model_commands

    return [
        app_commands.register,
        model_commands.register,
        convert_commands.register,
        data_commands.register,
        engine_commands.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lgformer",
        description="LGFormer referring image segmentation: the paper's network, data, training and tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return int(handler(args) or 0)
    except LGFormerError as exc:
        print(f"lgformer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
