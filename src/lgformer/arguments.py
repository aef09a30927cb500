"""The arguments several commands share, spelled and defaulted the same everywhere. A leaf: every
`*/commands.py` imports it, and it imports nothing above the ground floor, so the CLI has no import loop."""

from __future__ import annotations

import argparse

from lgformer.errors import LGFormerError
from lgformer.precision import PRECISIONS, precision_name


def add_device_argument(p: argparse._ActionsContainer) -> None:
    """`--device`, spelled and defaulted the same in every command."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default %(default)s)")


def add_dtype_argument(p: argparse._ActionsContainer, help: str) -> None:
    """`--dtype fp32|bf16|fp16` (torch's float32/bfloat16/float16 accepted), stored as the short name."""
    p.add_argument("--dtype", default="fp32", type=precision_name, choices=list(PRECISIONS), help=help)


def add_overrides_argument(p: argparse._ActionsContainer, help: str) -> None:
    """Repeatable `--set KEY=VALUE` dotted config overrides, collected in `args.overrides`."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def check_at_least(minimum: int, **flags: int | None) -> None:
    """Refuse, before any work, a count flag under `minimum` (e.g. `check_at_least(1, batch_size=0)` names
    `--batch-size 0`); a None flag is left to its default."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise LGFormerError(f"--{name.replace('_', '-')} {value}: expected a whole number >= {minimum}")
