"""AdamW that keeps the products' weights in bf16 between steps: the `bf16-weights` fast path of CPU bf16
training.

Under CPU bf16 autocast a training step casts every weight of a product (linear, convolution) to bf16, and
autograd casts its bf16 gradient back to fp32 for the fp32 weight: two passes over the weights besides the
optimizer's. `Bf16WeightsAdamW` is `torch.optim.AdamW(fused=True)` (the same state and checkpoints) that
folds both into its update:

- its first step is the plain one, watched (`CastWatch`): a weight is taken when the forward and backward
  used it only through autocast's cast to bf16;
- from then on, inside `lent()`, such a weight's `.data` is its bf16 copy: autocast has nothing to cast, the
  gradient stays bf16, and `step` updates the fp32 master from it with the C kernel `adamw.c` (PyTorch's
  fused AdamW, in its order of operations), writing the bf16 copy the next step computes with.

Outside `lent()` (evaluation, checkpoints) every parameter holds its fp32 master. The numbers are the plain
bf16 step's: the bf16 copy is autocast's cast of the master, the update PyTorch's on the gradient autocast's
cast would give. For one process and one micro-batch per step (`Trainer`): summed over micro-batches or
processes, the gradients would be summed in bf16. The watch sees operators, not reads of a weight's `.dtype`
or of its memory by a C kernel: the model asks an empty buffer for its dtype (`LGFormer.dtype`), and the
tests pin whole training steps to the plain ones bit for bit.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lgformer.model import fast
from lgformer.model.fast import native


@cache
def adamw_kernel() -> ctypes.CDLL | None:
    """`adamw.c` built and loaded with its signature, or None where it cannot be built (warned once)."""
    arguments = [ctypes.c_void_p] * 7 + [ctypes.c_int64] + [ctypes.c_int] * 2 + [ctypes.c_float] * 5
    return native.kernel("adamw", lgformer_adamw_bf16=arguments)


class CastWatch(TorchDispatchMode):
    """Records, while `on`, which of `params` the ops use, and whether only through a cast to bf16."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__()
        self.params = {id(p): p for p in params}
        self.cast: set[int] = set()
        self.other: set[int] = set()
        self.on = True

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.on:
            to_bf16 = func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, Tensor) and id(t) in self.params:
                    (self.cast if to_bf16 else self.other).add(id(t))
        return func(*args, **kwargs)

    def only_cast(self) -> list[nn.Parameter]:
        """The parameters used, and used only through a cast to bf16."""
        return [p for i, p in self.params.items() if i in self.cast and i not in self.other]


class Bf16WeightsAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW(..., fused=True)` whose products' weights are bf16 inside `lent()` (module
    docstring). Clip gradients with its `clip_grad_norm_`: inside `lent()` some are bf16."""

    def __init__(self, params: Any, **options: Any) -> None:
        super().__init__(params, fused=True, **options)
        # after the watched step: weight -> its bf16 copy, and its version when the copy was last made
        self._copies: dict[nn.Parameter, Tensor] | None = None
        self._versions: dict[nn.Parameter, int] = {}
        self._masters: dict[nn.Parameter, Tensor] = {}  # inside lent(): weight -> its fp32 master
        self._watch: CastWatch | None = None
        self._coef = 1.0

    def _applies(self) -> bool:
        """The path's switch is on, its kernel built, and the groups differ at most in rate and decay (the
        kernel takes one β1, β2 and ε) with neither AMSGrad nor maximize."""
        shared = {(tuple(g["betas"]), g["eps"]) for g in self.param_groups}
        plain = len(shared) == 1 and not any(g["amsgrad"] or g["maximize"] for g in self.param_groups)
        return plain and fast.enabled("bf16-weights") and adamw_kernel() is not None

    def _trainable(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"] if p.device.type == "cpu"]

    @contextlib.contextmanager
    def lent(self) -> Iterator[None]:
        """One training step's forward, backward, clipping and `step`: the first time the plain step, watched;
        after it, with the weights it found in bf16. Their gradients left unused at the end are dropped."""
        if not self._applies():
            yield
            return
        if self._copies is None:
            self._watch = CastWatch(self._trainable())
            try:
                with self._watch:
                    yield
                chosen = self._watch.only_cast()
            finally:
                self._watch = None
            self._copies = {p: p.detach().to(torch.bfloat16) for p in chosen}
            self._versions = {p: p._version for p in chosen}
            return
        for p, copy in self._copies.items():
            if p._version != self._versions[p]:  # changed since (a plain step, load_state_dict): cast again
                copy.copy_(p.detach())
            self._masters[p] = p.data
            p.data = copy
        try:
            yield
        finally:
            for p, master in self._masters.items():
                if p.grad is not None and p.grad.dtype != master.dtype:
                    p.grad = None
                p.data = master
                # the kernel wrote the master unseen by autograd: caches keyed on the version must see it
                torch.autograd.graph.increment_version(p)
                self._versions[p] = p._version
            self._masters.clear()

    def _stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.on = False

    @torch.no_grad()
    def clip_grad_norm_(self, params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
        """`torch.nn.utils.clip_grad_norm_(params, max_norm)` (the same sums, in the same order), the bf16
        gradients' norms in fp32: fp32 gradients are scaled in place, bf16 ones as `step` reads them. Returns
        the total norm."""
        self._stop_watching()
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        total = torch.linalg.vector_norm(torch.stack(norms))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        fp32 = [g for g in grads if g.dtype != torch.bfloat16]
        if fp32:
            torch._foreach_mul_(fp32, coef)
        self._coef = float(coef)
        return total

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """AdamW: the lent weights by the C kernel from their bf16 gradients, the rest by PyTorch's."""
        self._stop_watching()
        taken = [
            (group, p, p.grad)
            for group in self.param_groups
            for p in group["params"]
            if p in self._masters and p.grad is not None
        ]
        for _, p, _ in taken:
            p.grad = None  # hidden from PyTorch's update
        try:
            loss = super().step(closure)
            if taken:
                self._update(taken)
        finally:
            for _, p, grad in taken:
                p.grad = grad
            self._coef = 1.0
        return loss

    def _update(self, taken: list[tuple[dict[str, Any], nn.Parameter, Tensor]]) -> None:
        """The C kernel's update of the lent weights `taken` (group, weight, its bf16 gradient)."""
        beta1, beta2 = taken[0][0]["betas"]
        arrays: list[list[Tensor]] = [[], [], [], [], []]
        sizes, scalars = [], []
        for group, p, grad in taken:
            master, state = self._masters[p], self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["step"] += 1
            if grad.stride() != master.stride():
                grad = torch.empty_like(p).copy_(grad)
            for array, t in zip(arrays, (master, state["exp_avg"], state["exp_avg_sq"], grad, p.data)):
                array.append(t)
            step, lr, wd = float(state["step"]), float(group["lr"]), group["weight_decay"]
            scalars += [1 - lr * wd, -(lr / (1 - beta1**step)), math.sqrt(1 - beta2**step)]
            sizes.append(master.numel())
        pointers = [(ctypes.c_void_p * len(taken))(*(t.data_ptr() for t in array)) for array in arrays]
        per_tensor = torch.tensor(scalars, dtype=torch.float32)  # rounded as PyTorch's kernel rounds them
        failed = adamw_kernel().lgformer_adamw_bf16(
            *pointers,
            (ctypes.c_int64 * len(sizes))(*sizes),
            per_tensor.data_ptr(),
            sum(sizes),
            len(taken),
            torch.get_num_threads(),
            1 - beta1,
            beta2,
            1 - beta2,
            taken[0][0]["eps"],
            self._coef,
        )
        native.check(failed, "adamw")
