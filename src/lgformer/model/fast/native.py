"""C kernels shipped as source in this folder, built on first use with the system's C compiler and loaded
through ctypes.

Why C: a few CPU passes have no fast stock PyTorch op (the deformable sampler's backward scatters channel
by channel in `grid_sampler_2d_backward`). Plain C with no PyTorch headers builds in a second, needs no build
step at install, and where it cannot be built the model keeps its PyTorch path: `library` warns once
(`NativeWarning`) and returns None.

Where PyTorch runs on GNU OpenMP (its Linux wheels), the kernels are built with `-fopenmp` and run their
threads on PyTorch's own OpenMP workers (`parallel.h` says why); elsewhere, where that build fails, or with
`LGFORMER_OPENMP=0`, on POSIX threads.

A kernel is built once per source, compiler and CPU (it is tuned to the CPU, `-march=native`) into the cache
folder: `$LGFORMER_CACHE`, else `$XDG_CACHE_HOME/lgformer`, else `~/.cache/lgformer`. `$CC` names the compiler
(default `cc`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from lgformer.precision import cpu_info

CACHE_ENV = "LGFORMER_CACHE"
OPENMP_ENV = "LGFORMER_OPENMP"  # 0: the kernels run on POSIX threads
# Sums may be reordered (vectorised), NaN and infinities kept; -march=native where the compiler knows it.
FLOAT_FLAGS = ("-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
FLAG_SETS = (("-O3", "-march=native", *FLOAT_FLAGS), ("-O3", *FLOAT_FLAGS))
OPENMP = "-fopenmp"


class NativeWarning(UserWarning):
    """A C kernel could not be built or loaded: the slower PyTorch path runs instead."""


def fp32(t: Tensor | None) -> Tensor | None:
    """`t` as the kernels read it: contiguous float32 (None stays None)."""
    return None if t is None else t.to(torch.float32).contiguous()


def pointer(t: Tensor | None) -> int | None:
    """The address ctypes passes for `t` (NULL for None)."""
    return None if t is None else t.data_ptr()


def signature(addresses: int, sizes: int, ints: int) -> list[type]:
    """A kernel function's argument types: `addresses` pointers, then `sizes` int64s, then `ints` ints."""
    return [ctypes.c_void_p] * addresses + [ctypes.c_int64] * sizes + [ctypes.c_int] * ints


def check(failed: int, name: str) -> None:
    """Raise for a kernel call that returned non-zero: out of memory for its sums (the only way they fail)."""
    if failed:
        raise MemoryError(f"{name}.c: out of memory for its sums")


def affine_grads(weight: Tensor | None, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """A norm kernel's fp32 weight and bias gradients in the weight's dtype (as they are with no weight)."""
    if weight is None:
        return grads
    return tuple(None if g is None else g.to(weight.dtype) for g in grads)


def cache_folder() -> Path:
    """Where built kernels are kept (module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lgformer"


def gnu_openmp_loaded() -> bool:
    """Whether this process has GNU OpenMP (libgomp) loaded, as PyTorch's Linux wheels do."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def flag_sets() -> list[tuple[str, ...]]:
    """The compiler flags to try, best first: with OpenMP where PyTorch's libgomp is loaded (and
    `LGFORMER_OPENMP` is not 0), then without."""
    wanted = os.environ.get(OPENMP_ENV, "1") != "0" and gnu_openmp_loaded()
    openmp = [(*flags, OPENMP) for flags in FLAG_SETS] if wanted else []
    return [*openmp, *FLAG_SETS]


def _build(compiler: str, flags: tuple[str, ...], source: Path, target: Path) -> str | None:
    """Compile `source` into the shared library `target` (written whole, then renamed); None, or why not."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        return f"cannot write {target.parent} ({exc.strerror or exc})"
    os.close(fd)
    command = [compiler, *flags, "-shared", "-fPIC", "-pthread", "-o", tmp, str(source)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode:
            return f"{' '.join(command)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(command)} failed: {exc}"
    finally:
        Path(tmp).unlink(missing_ok=True)


def kernel(name: str, returns: type | None = ctypes.c_int, **functions: list[type]) -> ctypes.CDLL | None:
    """`library(name)` with its `functions`' argument types (`signature`) and return type set; None where it
    cannot be built (warned once)."""
    lib = library(name)
    for function, arguments in functions.items() if lib is not None else ():
        getattr(lib, function).argtypes = arguments
        getattr(lib, function).restype = returns
    return lib


@cache
def library(name: str) -> ctypes.CDLL | None:
    """The kernel `name` (this folder's `name.c`, which may include its `.h` files) built and loaded; None,
    warned once, where it cannot be."""
    source = Path(__file__).with_name(f"{name}.c")
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        reason = f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH"
    else:
        machine = [platform.machine(), cpu_info().get("model name", ""), cpu_info().get("flags", "")]
        text = "\0".join(path.read_text() for path in [source, *sorted(source.parent.glob("*.h"))])
        for flags in flag_sets():
            key = "\0".join([text, os.path.realpath(compiler), *flags, *machine])
            target = cache_folder() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
            reason = None if target.exists() else _build(compiler, flags, source, target)
            if reason is None:
                try:
                    return ctypes.CDLL(str(target))
                except OSError as exc:
                    reason = f"cannot load {target} ({exc})"
    warnings.warn(
        f"lgformer: the C kernel {name}.c is not built ({reason}); its slower PyTorch path runs instead",
        NativeWarning,
        stacklevel=3,
    )
    return None
