"""`lgformer` command line. Each area registers its sub-commands; nothing parses at import time."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from lgformer.errors import LGFormerError
from lgformer.precision import reexec_with_hugepage_heap, tune_cpu_allocator

Handler = Callable[[argparse.Namespace], int | None]


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
    if argv is None:  # run as the `lgformer` program, not called from Python
        reexec_with_hugepage_heap()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    tune_cpu_allocator()  # before the first large tensor of any command
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
