"""Where and in which precision a model runs: the device by name, and the compute precision by name (one
table for every command and the API).

fp32 is plain float32 (no autocast); bf16 and fp16 are autocast dtypes. torch's names (float32, bfloat16,
float16) are accepted as well. Importing this module does not import torch (the CLI builds its parser
from it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import warnings
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from lgformer.errors import LGFormerError

if TYPE_CHECKING:
    import torch

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short name -> torch's name
_SHORT = {long: short for short, long in PRECISIONS.items()}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_LIMIT = 1 << 30
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_HUGETLB = "glibc.malloc.hugetlb"


class PrecisionWarning(UserWarning):
    """The precision asked for runs slower than fp32 on this machine."""


@cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ('vendor_id', 'model name', 'cpu family', ...); empty
    where there is no such file (not Linux). Read up to the blank line that ends the first processor's block:
    the model package asks at import, and on a many-core machine the file repeats the block per core."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), Path("/proc/cpuinfo").open() as info:
        for line in info:
            if not line.strip():
                if fields:
                    break
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


@cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 products natively (AVX512-BF16 or AMX). Elsewhere oneDNN emulates them,
    and bf16 autocast runs slower than fp32 (README, "Speed")."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def precision_name(name: str) -> str:
    """The short name of a precision (bfloat16 -> bf16); other strings come back unchanged, so that an
    argparse `type=precision_name` leaves unknown names to its `choices` check."""
    return _SHORT.get(name, name)


def autocast_dtype(name: str, device: torch.device | None = None) -> torch.dtype | None:
    """Precision name -> autocast dtype (None: fp32). Given a device, fp16 is refused off CUDA, and bf16 on a
    CPU without bf16 units gets a `PrecisionWarning`."""
    import torch

    short = precision_name(name)
    if short not in PRECISIONS:
        raise LGFormerError(f"dtype {name!r}; valid: {', '.join(PRECISIONS)} (or {', '.join(_SHORT)})")
    if short == "fp16" and device is not None and device.type != "cuda":
        raise LGFormerError(f"dtype {name!r} needs a GPU; on CPU use bf16 or fp32")
    if short == "bf16" and device is not None and device.type == "cpu" and not cpu_has_bf16_units():
        warnings.warn(
            "bf16 on a CPU without bf16 units (AVX512-BF16 or AMX): its products are emulated and run slower "
            "than fp32 here",
            PrecisionWarning,
            stacklevel=2,
        )
    return None if short == "fp32" else getattr(torch, PRECISIONS[short])


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast at `dtype` on `device`, or nothing for fp32 (dtype None)."""
    import torch

    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' (this process's GPU if there is one, else the CPU), 'cpu', 'cuda' (GPU `local_rank`) or
    'cuda:N'; a GPU is made the current one."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LGFormerError("--device cuda asked for, but no CUDA GPU is visible")
        dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
        return dev
    if device == "cpu":
        return torch.device("cpu")
    raise LGFormerError(f"--device {device!r}; valid: auto, cpu, cuda, cuda:N")


@cache
def tune_cpu_allocator() -> bool:
    """Serve tensors up to 1 GiB from glibc's heap instead of fresh `mmap` pages (Linux, once per process).

    glibc maps every allocation above 32 MB afresh and returns it on free, so each large activation of a
    forward or backward pass page-faults and zero-fills its memory again (what that costs: README, "Speed").
    Raising the mmap and trim thresholds keeps those pages in the heap for reuse; peak resident memory stays
    about the same. The command line, the engine's `setup` and `Segmenter` call this (the command line
    also backs that heap with 2 MB pages: `reexec_with_hugepage_heap`); set LGFORMER_MALLOC_TUNING=0 to
    leave the allocator alone. Returns whether the thresholds were set.
    """
    if os.environ.get("LGFORMER_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_LIMIT) and libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_LIMIT)
        )
    except (OSError, AttributeError):  # not glibc
        return False


def transparent_hugepage_mode() -> str | None:
    """The kernel's transparent-huge-page mode for anonymous memory (always, madvise or never); None where
    the kernel does not say (not Linux, no THP)."""
    try:
        text = _THP_MODE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def hugepage_heap_environment(
    environ: Mapping[str, str], thp_mode: str | None = None
) -> dict[str, str] | None:
    """`environ` with glibc's `glibc.malloc.hugetlb=1` tunable added to GLIBC_TUNABLES, or None where it
    would change nothing or is not wanted.

    Where the kernel gives 2 MB pages only to memory that asks for them (THP mode `madvise`, the usual
    default), glibc asks for them for its heap with this tunable, which it reads when a process starts. The
    heap that `tune_cpu_allocator` keeps large tensors in is then backed by 2 MB pages, which the
    memory-bound work of a training step gains from (README, "Speed"). None: LGFORMER_MALLOC_TUNING=0,
    THP mode (`thp_mode`, else the kernel's) not `madvise`, no glibc 2.35 or later, or GLIBC_TUNABLES already
    names the tunable (that choice stands).
    """
    mode = thp_mode if thp_mode is not None else transparent_hugepage_mode()
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get("LGFORMER_MALLOC_TUNING", "1") == "0" or mode != "madvise" or _HUGETLB in tunables:
        return None
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        glibc = tuple(int(part) for part in version.split(".")[:2])
    except (AttributeError, OSError, ValueError):  # not glibc
        return None
    if name != "glibc" or glibc < (2, 35):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{_HUGETLB}=1"]))}


def allocator_name() -> str:
    """How this process's CPU memory allocator is set, for benchmark reports: its defaults or the tuned glibc
    heap (`tune_cpu_allocator`, if it was called), and on Linux whether the kernel backs it with 2 MB
    pages."""
    tuned = tune_cpu_allocator.cache_info().currsize > 0 and tune_cpu_allocator()  # cached: no side effect
    name = "tuned glibc heap" if tuned else "allocator defaults"
    mode = transparent_hugepage_mode()
    if mode is None:
        return name
    asked = f"{_HUGETLB}=1" in os.environ.get("GLIBC_TUNABLES", "")
    return f"{name}, {'2 MB' if mode == 'always' or (mode == 'madvise' and asked) else '4 KB'} pages"


def reexec_with_hugepage_heap() -> None:
    """Start this program again in the same process (same pid, arguments and open files) with
    `hugepage_heap_environment`, where that adds the tunable; otherwise return. For a program's entry point
    before it does any work (the `lgformer` command, the benchmark scripts): a library cannot restart the
    process that imports it, and calls `tune_cpu_allocator` alone."""
    env = hugepage_heap_environment(os.environ)
    argv = getattr(sys, "orig_argv", None)
    if env is None or not sys.executable or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # the interpreter cannot be started again: go on with 4 KB pages
        return
