"""The training golden (shared/reference/official-training/README.md): the authors' recipe, step for step.

The authors recorded three AdamW steps of their `train.py` on one fixed batch, from the crc32 weight recipe
over the whole model (BERT included), fp32. Here the official preset is built with every stochastic part off
(`model.drop_path=0`, `model.text_dropout=0`), filled with the same recipe through the authors' layout, and
trained for the same steps by the functions `lgformer train` itself uses (`freeze`, `build_optimizer` with
`param_groups`, `set_lr` with `lr_factor`, `backward_batches` with `mask_loss`, `optimizer_update`), under
torchrun and with accumulation too. The candidate is written in the golden's own format (`candidate`), and
`compare` holds it against the golden with the README's checks and tolerances.

How our recipe meets the authors' quirks (README of the repository, "The training golden"): BERT's embeddings
and the last stage's gates have no gradient here (frozen), where the authors compute gradients that their
optimizer never reads (embeddings: in no group; gates: their outputs unused, so the gradient stays None).
The updates are the same; the gradient-None check therefore compares the parameters the authors' optimizer
holds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from lgformer import config as config_mod
from lgformer.config import Config
from lgformer.convert.official import infer_preset, official_name
from lgformer.convert.verify import VARIANTS, build_recipe_model
from lgformer.engine import distributed as D
from lgformer.engine import train as T
from lgformer.errors import LGFormerError
from lgformer.files import atomic_write
from lgformer.safe_load import load_safetensors_file

RECORDED_TOTAL = 4  # the recorded run's schedule length: len(data_loader_train) * epochs = 4 * 1
STEPS = 3
FULL_UPDATE_LIMIT = 50_000  # full update tensors are stored for parameters up to this size
INPUTS = ("image", "input_ids", "attention_mask", "target")
GROUPS = ("backbone_no_decay", "backbone_decay", "classifier", "text_encoder.encoder.layer")
WEIGHT_DECAY = 0.01


def authors_group(key: str) -> int | None:
    """The authors' optimizer group of parameter `key` (train.py L188-210), None for BERT's embeddings."""
    if key.startswith("backbone."):
        no_decay = any(w in key for w in ("norm", "absolute_pos_embed", "relative_position_bias_table"))
        return 0 if no_decay else 1
    if key.startswith("classifier."):
        return 2
    if key.startswith("text_encoder.encoder.layer."):
        return 3
    return None


@dataclass(frozen=True)
class Check:
    name: str
    value: float | str
    tolerance: str
    passed: bool

    def line(self) -> str:
        value = f"{self.value:.3e}" if isinstance(self.value, float) else self.value
        return f"{self.name}: {value} (tolerance {self.tolerance}) {'PASS' if self.passed else 'FAIL'}"


def read_golden(path: str | Path, variant: str) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The golden's tensors and metadata lists, checked for the inputs and for `variant`'s size."""
    path = Path(path)
    if not path.is_file():
        raise LGFormerError(f"golden file {path} not found")
    if variant not in VARIANTS:
        raise LGFormerError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    data = load_safetensors_file(path, "the training golden")
    missing = [k for k in (*INPUTS, "loss", "lr", "logits_step1_0") if k not in data]
    if missing:
        raise LGFormerError(f"{path}: missing tensor {missing[0]!r} (not a training golden?)")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        raw = handle.metadata() or {}
    _check_variant(data, variant, path)
    meta = {}
    for key in ("zero_update_keys", "grad_none_keys"):
        try:
            meta[key] = json.loads(raw[key])
        except (KeyError, ValueError):
            raise LGFormerError(f"{path}: metadata {key!r} missing or not JSON") from None
    return data, meta


def _check_variant(data: dict[str, torch.Tensor], variant: str, path: Path) -> None:
    """The golden's network, read from its parameter names and its stored (small) update tensors."""
    shapes = {k.removeprefix("update."): v for k, v in data.items() if k.startswith("update.")}
    names = {k.removeprefix("param_sq."): data[k] for k in data if k.startswith("param_sq.")}
    try:
        found = infer_preset({**names, **shapes})
    except LGFormerError:
        raise LGFormerError(f"{path}: not a training golden of an LGFormer Swin model") from None
    if found != VARIANTS[variant]:
        preset, window = found
        raise LGFormerError(
            f"{path} is not a {variant} training golden: it holds {preset} with window {window}"
        )


def training_config(variant: str, overrides: tuple[str, ...] = ()) -> Config:
    """The official preset of `variant` with its stochastic parts off and fp32 (the recorded run)."""
    preset, window = VARIANTS[variant]
    cfg = config_mod.load(preset, ["model.drop_path=0", "model.text_dropout=0", "train.amp=off", *overrides])
    cfg.model.window = window
    return cfg


def candidate(
    data: dict[str, torch.Tensor],
    variant: str,
    device: str = "cpu",
    device_batch: int | None = None,
    overrides: tuple[str, ...] = (),
    steps: int = STEPS,
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]] | None:
    """Run the first `steps` recorded steps with our training code; the results in the golden's format
    (`update*` is the update after `steps` steps; None on every process but the first)."""
    if not 1 <= steps <= STEPS:
        raise LGFormerError(f"--steps {steps}: the golden records 1 to {STEPS} steps")
    world, dev = D.setup(device)
    cfg = training_config(variant, overrides)
    tc = cfg.train
    batch = int(data["image"].shape[0])
    tc.batch_size, tc.device_batch = batch, device_batch
    micro, accum = T.batch_split(tc, world.size)
    model = build_recipe_model(variant, text_encoder=True, model_cfg=cfg.model).to(dev)
    T.freeze(model, tc)
    optimizer = T.build_optimizer(model, tc)
    params = {official_name(n): p for n, p in model.named_parameters()}
    _check_same_network(data, params, variant)
    if len(data["input_ids"][0]) != cfg.model.max_tokens:
        raise LGFormerError(
            f"golden token length {len(data['input_ids'][0])}; the model needs {cfg.model.max_tokens}"
        )
    inputs = {
        "image": data["image"],
        "ids": data["input_ids"],
        "text_mask": data["attention_mask"],
        "mask": data["target"].float(),
    }
    p0 = {k: p.detach().clone() for k, p in params.items()}
    T.set_train_mode(model, tc)
    out: dict[str, torch.Tensor] = {}
    if world.main:  # the first forward's outputs, at the input size (train mode, initial weights)
        with torch.no_grad():
            logits = model(inputs["image"].to(dev), inputs["text_mask"].to(dev), ids=inputs["ids"].to(dev))
        for i in range(logits.shape[1]):
            out[f"logits_step1_{i}"] = logits[:, i : i + 1].float().cpu().contiguous()
    net = DistributedDataParallel(model) if world.size > 1 else model
    losses, lrs = [], []
    grads: dict[str, torch.Tensor | None] = {}
    p1: dict[str, torch.Tensor] = {}
    for step in range(steps):
        T.set_lr(optimizer, step, RECORDED_TOTAL, tc)
        lrs.append(_group_rates(optimizer, params))
        T.set_train_mode(model, tc)
        loss = T.backward_batches(
            net, _micro_batches(inputs, world, micro, accum), accum, cfg.model, dev, None
        )
        losses.append(float(D.all_reduce_sum(loss)) / world.size)
        if step == 0:
            grads = {k: None if p.grad is None else p.grad.detach().clone() for k, p in params.items()}
        T.optimizer_update(model, optimizer, None, tc.clip_grad)
        if step == 0:
            p1 = {k: p.detach().clone() for k, p in params.items()}
    D.barrier()
    if not world.main:
        return None
    for k in INPUTS:
        out[k] = data[k]
    out["loss"] = torch.tensor(losses, dtype=torch.float64)
    out["lr"] = torch.tensor(lrs, dtype=torch.float64)
    for key, p in params.items():
        init = p0[key].double()
        out[f"param_sq.{key}"] = (init * init).sum().reshape(1)
        for prefix, after in (("update", p.detach()), ("update1", p1[key])):
            delta = (after - p0[key]).double()
            out[f"{prefix}_sum.{key}"] = delta.sum().reshape(1)
            out[f"{prefix}_l2.{key}"] = delta.norm().reshape(1)
            out[f"{prefix}_dot_param.{key}"] = (delta * init).sum().reshape(1)
            if p.numel() <= FULL_UPDATE_LIMIT:
                out[f"{prefix}.{key}"] = _authors_shape(key, (after - p0[key]).float().cpu())
        grad = grads[key]
        if grad is not None:
            out[f"grad1_sum.{key}"] = grad.double().sum().reshape(1)
            out[f"grad1_l2.{key}"] = grad.double().norm().reshape(1)
    meta = {
        "zero_update_keys": sorted(k for k, p in params.items() if torch.equal(p.detach(), p0[k])),
        "grad_none_keys": sorted(k for k, g in grads.items() if g is None),
    }
    return {k: v.cpu() for k, v in out.items()}, meta


def _check_same_network(data: dict[str, torch.Tensor], params: dict[str, torch.Tensor], variant: str) -> None:
    """The golden must hold exactly our parameters, started from the same recipe values."""
    theirs = {k.removeprefix("param_sq.") for k in data if k.startswith("param_sq.")}
    extra, lacking = sorted(theirs - set(params)), sorted(set(params) - theirs)
    if extra or lacking:
        first = (extra or lacking)[0]
        raise LGFormerError(
            f"the golden is not a {variant} training golden: {len(extra)} of its parameters are not in the "
            f"{variant} model and {len(lacking)} of the model's are not in it (e.g. {first})"
        )
    for key, p in params.items():
        expected = float(data[f"param_sq.{key}"])
        if not math.isclose(float(p.detach().double().square().sum()), expected, rel_tol=1e-5):
            raise LGFormerError(
                f"the golden's {key} does not start from the weight recipe (param_sq differs)"
            )


def _authors_shape(key: str, value: torch.Tensor) -> torch.Tensor:
    """The VLBA 1x1 Conv1d weights carry a trailing kernel dimension in the authors' layout."""
    return (
        value.unsqueeze(-1) if ".fusion." in key and key.endswith(".weight") and value.dim() == 2 else value
    )


def _group_rates(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> list[float]:
    """The rate each of the authors' four groups gets from our optimizer (their members must agree)."""
    rate_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    rates: list[set[float]] = [set() for _ in GROUPS]
    for key, p in params.items():
        group = authors_group(key)
        if group is not None and id(p) in rate_of:
            rates[group].add(rate_of[id(p)])
    return [max(r) if len(r) == 1 else math.nan for r in rates]


def _micro_batches(
    inputs: dict[str, torch.Tensor], world: D.World, micro: int, accum: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's share of the batch: `accum` micro-batches of `micro` samples."""
    start = world.rank * micro * accum
    for j in range(accum):
        rows = slice(start + j * micro, start + (j + 1) * micro)
        yield {k: v[rows] for k, v in inputs.items()}


def write_candidate(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, list[str]]) -> None:
    metadata = {k: json.dumps(v) for k, v in meta.items()} | {"group_names": json.dumps(list(GROUPS))}
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata))


# ------------------------------------------------------------------------------------------- comparison


def compare(
    cand: dict[str, torch.Tensor],
    cand_meta: dict[str, list[str]],
    ref: dict[str, torch.Tensor],
    ref_meta: dict[str, list[str]],
) -> list[Check]:
    """The README's checks of a candidate against the golden, both in the golden's format."""
    keys = sorted(k.removeprefix("param_sq.") for k in ref if k.startswith("param_sq."))
    missing = [k for k in keys if f"param_sq.{k}" not in cand]
    if missing:
        raise LGFormerError(
            f"candidate has no parameter {missing[0]!r} of the golden ({len(missing)} missing)"
        )
    structural = {
        k.removeprefix("structural_zero_grad."): v.bool() for k, v in ref.items() if "structural" in k
    }
    lr0 = float(ref["lr"][0].max())
    checks = []

    steps = cand["loss"].numel()  # a shorter candidate (--steps) gets the checks of its steps only
    lr_rel = ((cand["lr"] - ref["lr"][:steps]).abs() / ref["lr"][:steps]).nan_to_num(math.inf).max().item()
    checks.append(Check("lr max rel", lr_rel, "1e-9", lr_rel <= 1e-9))
    loss_rel = ((cand["loss"] - ref["loss"][:steps]).abs() / ref["loss"][:steps].abs()).tolist()
    checks.append(Check("loss step 1 rel", loss_rel[0], "1e-4", loss_rel[0] <= 1e-4))
    if steps == STEPS:
        checks.append(Check("loss steps 2-3 max rel", max(loss_rel[1:]), "1e-2", max(loss_rel[1:]) <= 1e-2))

    outputs = sorted(k for k in ref if k.startswith("logits_step1_"))
    logit_rel = max(
        ((cand[k].double() - ref[k].double()).abs().max() / ref[k].double().abs().max()).item()
        if k in cand
        else math.inf
        for k in outputs
    )
    checks.append(Check("logits step 1 max abs diff / max abs", logit_rel, "1e-3", logit_rel <= 1e-3))

    # gradients: per-tensor L2 of the non-structural tensors; the None set among what the optimizer holds.
    # Tensors whose every element has an exactly-zero gradient (a bias right before an instance norm) are
    # left out of the key sets: the authors' Adam turns their rounding noise into updates, ours freezes them.
    whole = {k for k, mask in structural.items() if bool(mask.all())}
    optimized = {k for k in keys if authors_group(k) is not None} - whole
    grad_rel = 0.0
    for k in keys:
        if f"grad1_l2.{k}" in ref and f"grad1_l2.{k}" in cand and k not in whole:
            a, b = float(cand[f"grad1_l2.{k}"]), float(ref[f"grad1_l2.{k}"])
            grad_rel = max(grad_rel, abs(a - b) / b if b else math.inf)
    checks.append(Check("grad step 1 per-tensor L2 max rel", grad_rel, "2e-2", grad_rel <= 2e-2))
    ours_none, ref_none = (
        set(cand_meta["grad_none_keys"]) & optimized,
        set(ref_meta["grad_none_keys"]) & optimized,
    )
    checks.append(_set_check("grad step 1 None set (optimized parameters)", ours_none, ref_none))

    # step-1 update, element by element (non-structural elements of the stored tensors)
    diffs = []
    for k in keys:
        if f"update1.{k}" in ref:
            diff = (cand[f"update1.{k}"].double() - ref[f"update1.{k}"].double()).abs().flatten() / lr0
            if k in structural:
                diff = diff[~structural[k].flatten()]
            diffs.append(diff)
    every = torch.cat(diffs)
    off = float((every > 1e-3).double().mean())
    median = float(every.median())
    checks.append(Check("update step 1 fraction off by > 1e-3 lr0", off, "5e-3", off <= 5e-3))
    checks.append(Check("update step 1 median diff / lr0", median, "1e-3", median <= 1e-3))

    # the weight-decay statistic r_g per authors' group, on step 1 and on the 3-step update
    statistics = [("update1", float(ref["lr"][0, 0]), 0.2, "step 1")]
    if steps == STEPS:
        statistics.append(("update", float(ref["lr"][:, 0].sum()), 0.25, "3 steps"))
    for prefix, lr_sum, tolerance, label in statistics:
        for g, name in enumerate(GROUPS):
            members = [k for k in keys if authors_group(k) == g and k not in structural]
            shift = sum(
                float(cand[f"{prefix}_dot_param.{k}"] - ref[f"{prefix}_dot_param.{k}"]) for k in members
            )
            scale = lr_sum * WEIGHT_DECAY * sum(float(ref[f"param_sq.{k}"]) for k in members)
            r = shift / scale
            checks.append(
                Check(f"weight decay r_{g} ({name}) {label}", r, f"abs {tolerance}", abs(r) <= tolerance)
            )

    if steps == STEPS:
        checks += _update_norms(cand, ref, keys)
    checks.append(
        _set_check(
            "exactly-zero-update keys",
            set(cand_meta["zero_update_keys"]) - whole,
            set(ref_meta["zero_update_keys"]) - whole,
        )
    )
    return checks


def _update_norms(
    cand: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], keys: list[str]
) -> list[Check]:
    """The 3-step update's L2 norms: median per-tensor relative difference, and the overall scale."""
    rels = []
    total_cand = total_ref = 0.0
    for k in keys:
        a, b = float(cand[f"update_l2.{k}"]), float(ref[f"update_l2.{k}"])
        total_cand, total_ref = total_cand + a * a, total_ref + b * b
        if b:
            rels.append(abs(a - b) / b)
    median_rel = float(torch.tensor(rels).median()) if rels else math.inf
    overall = abs(math.sqrt(total_cand) - math.sqrt(total_ref)) / math.sqrt(total_ref)
    return [
        Check("update 3 steps L2 median per-tensor rel", median_rel, "2e-2", median_rel <= 2e-2),
        Check("update 3 steps L2 overall rel", overall, "2e-2", overall <= 2e-2),
    ]


def _set_check(name: str, ours: set[str], ref: set[str]) -> Check:
    extra, lacking = sorted(ours - ref), sorted(ref - ours)
    if not extra and not lacking:
        return Check(name, f"equal ({len(ref)} keys)", "equal", True)
    parts = [
        f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
        for label, items in (("extra:", extra), ("missing:", lacking))
        if items
    ]
    return Check(name, "; ".join(parts), "equal", False)
