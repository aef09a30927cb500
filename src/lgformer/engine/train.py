"""Training loop: the authors' recipe (docs/architecture.md#training-recipe) on one CPU, one GPU or many
processes under torchrun.

One optimizer step consumes one global batch = per-device batch x processes x accumulation steps; the
data order depends only on the seed and the step (`TrainSampler`), so a run resumed from its `last`
checkpoint replays exactly the batches and updates of a run that never stopped.

Output folder:
  last/    weights + config (the format every command loads) + trainer_state.pt, every validation
           and every `save_every` steps
  best/    weights + config of the best validation oIoU
  log.jsonl  one line per logged step and per validation;  plots.png  loss, lr and validation curves
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lgformer import config as config_mod
from lgformer.checkpoint import load_model, load_training_state, read_config, save_model
from lgformer.config import NO_TARGET_FIELDS, Config, ModelConfig, TrainConfig
from lgformer.engine import distributed as D
from lgformer.engine.evaluate import evaluate_model
from lgformer.errors import LGFormerError
from lgformer.files import atomic_write, recover_folder
from lgformer.model.fast.adamw import Bf16WeightsAdamW
from lgformer.precision import autocast, autocast_dtype

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
PLOT_SECONDS = 60.0


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `train.amp` on `device` (None: fp32). 'auto' is the authors' fp16 AMP on GPU
    and plain fp32 on CPU, where only bf16 autocast is offered."""
    if amp not in AMP_CHOICES:
        raise LGFormerError(f"train.amp={amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if amp == "fp16" and device.type != "cuda":
        raise LGFormerError("train.amp=fp16 needs a GPU; on CPU use train.amp=bf16 or off")
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return autocast_dtype("fp32" if amp == "off" else amp, device)


def batch_split(tc: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) so that micro x world x accumulation = global batch."""
    micro = tc.device_batch or max(tc.batch_size // world_size, 1)
    accum, rest = divmod(tc.batch_size, micro * world_size)
    if rest or accum < 1:
        raise LGFormerError(
            f"global batch train.batch_size={tc.batch_size} is not a multiple of {micro} per device x "
            f"{world_size} process(es); set train.device_batch to a divisor"
        )
    return micro, accum


def freeze(model: nn.Module, tc: TrainConfig) -> None:
    """Frozen parts get no gradient: BERT's embeddings (the authors leave them out of the optimizer) or
    the whole text encoder (lite recipe)."""
    if tc.freeze_text_encoder:
        model.text_encoder.requires_grad_(False)
    elif tc.freeze_bert_embeddings:
        model.text_encoder.bert.embeddings.requires_grad_(False)


def build_optimizer(
    model: nn.Module, tc: TrainConfig, amp: torch.dtype | None = None, processes: int = 1, accum: int = 1
) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; betas (0.9, 0.999), eps 1e-8 as the authors. The fused kernel (CPU and GPU)
    is the fastest update. A CPU model trained under bf16 autocast (`amp`) by one process, one micro-batch a
    step, gets `Bf16WeightsAdamW`: the same update, the products' weights kept bf16 between steps (summed
    over micro-batches or processes, their gradients would be summed in bf16). Take each step inside
    `lent(optimizer)`."""
    groups, options = param_groups(model, tc), dict(lr=tc.lr, weight_decay=tc.weight_decay)
    cpu = next(model.parameters()).device.type == "cpu"
    if amp == torch.bfloat16 and cpu and processes == 1 and accum == 1:
        return Bf16WeightsAdamW(groups, **options)
    return torch.optim.AdamW(groups, fused=True, **options)


def lent(optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager:
    """The context of one step's forward, backward and update: `Bf16WeightsAdamW.lent`, else nothing."""
    return optimizer.lent() if isinstance(optimizer, Bf16WeightsAdamW) else contextlib.nullcontext()


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, tc: TrainConfig) -> float:
    """Set every group's rate for optimizer step `step` (0 first) of `total`; returns the schedule factor."""
    factor = lr_factor(step, total, tc.warmup_steps, tc.poly_power)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    return factor


def backward_batches(
    net: nn.Module,
    batches: Iterator[dict[str, Any]],
    accum: int,
    m: ModelConfig,
    device: torch.device,
    dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward and backward of `accum` micro-batches, each loss divided by `accum` so the gradients are the
    mean over them (DDP then averages over processes, synchronising on the last one only); returns the
    summed loss of this process, detached."""
    from lgformer.model.loss import mask_loss, target_loss

    ddp = net if isinstance(net, DistributedDataParallel) else None
    loss_sum = torch.zeros((), device=device)
    for j in range(accum):
        batch = next(batches)
        with ddp.no_sync() if ddp is not None and j < accum - 1 else contextlib.nullcontext():
            with autocast(device, dtype):
                image, text_mask, ids = (batch[k].to(device) for k in ("image", "text_mask", "ids"))
                outputs = dict(upsample=False, all_outputs=m.loss_all_outputs, with_target=True)
                logits, target = net(image, text_mask, ids=ids, **outputs)
                loss = mask_loss(
                    logits, batch["mask"].to(device), m.loss_pos_weight, m.loss_all_outputs, m.loss_resolution
                )
                if target is not None:
                    loss = loss + m.no_target_weight * target_loss(target, batch["targets"].to(device))
                loss = loss / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
    return loss_sum


def clip_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Scale `model`'s gradients to a global norm of at most `max_norm`: PyTorch's `clip_grad_norm_`, or
    `Bf16WeightsAdamW`'s own (the same sums) where some gradients are bf16."""
    if isinstance(optimizer, Bf16WeightsAdamW):
        optimizer.clip_grad_norm_(model.parameters(), max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def optimizer_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    clip_grad: float | None,
) -> None:
    """The end of a training step: clip the true gradients (unscaled first under fp16), step, zero them."""
    if clip_grad:
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip_gradients(model, optimizer, clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def set_train_mode(model: nn.Module, tc: TrainConfig) -> None:
    """Train mode (dropout, drop-path), except a frozen text encoder and, if asked, BatchNorm statistics."""
    model.train()
    if tc.freeze_text_encoder:
        model.text_encoder.eval()
    if tc.freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def param_groups(model: nn.Module, tc: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups (docs/architecture.md#training-recipe): no weight decay on the trunk's normalisation
    layers and position tables
    and on the stage output norms (the authors' `backbone.norm{i}`); everything else decays. The
    pretrained trunk and text encoder use `lr_pretrained`, the new parts `lr`."""
    trunk_norms = {
        id(p)
        for module in model.image_encoder.trunk.modules()
        if isinstance(module, NORMS)
        for p in module.parameters(recurse=False)
    }
    lr_pre = tc.lr if tc.lr_pretrained is None else tc.lr_pretrained
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        trunk = name.startswith("image_encoder.trunk.")
        pretrained = trunk or name.startswith("text_encoder.")
        decay = not (
            id(p) in trunk_norms
            or (trunk and any(key in name for key in NO_DECAY_NAMES))
            or name.startswith("image_encoder.out_norms.")
        )
        key = ("pretrained" if pretrained else "new", decay)
        group = groups.setdefault(
            key,
            {
                "name": f"{key[0]}{'' if decay else '-no-decay'}",
                "params": [],
                "lr": lr_pre if pretrained else tc.lr,
                "weight_decay": tc.weight_decay if decay else 0.0,
            },
        )
        group["params"].append(p)
    for group in groups.values():
        group["initial_lr"] = group["lr"]
    return list(groups.values())


def lr_factor(step: int, total: int, warmup: int, power: float) -> float:
    """Polynomial decay per iteration, lr0 (1 - step/total)^power with step = 0 first
    (docs/architecture.md#training-recipe), times a
    linear warm-up over the first `warmup` steps."""
    poly = max(0.0, 1.0 - step / total) ** power
    return poly * min(1.0, (step + 1) / warmup) if warmup else poly


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _check_same_model(saved: Config, cfg: Config, where: Path) -> None:
    if saved.model != cfg.model:
        diff = [k for k, v in config_mod.to_dict(saved.model).items() if getattr(cfg.model, k) != v]
        raise LGFormerError(
            f"{where} is a {saved.preset or saved.model.backbone!r} checkpoint; the config describes another "
            f"model (differs in model.{', model.'.join(diff[:5])})"
        )


@dataclass
class TrainResult:
    step: int
    stopped_early: bool
    best_oiou: float | None
    last: Path
    train_seconds: float  # wall time spent in this run's steps and validations, over all its sessions


class Log:
    """JSONL log (rank 0) with PNG plots regenerated at most every PLOT_SECONDS and at every validation."""

    def __init__(self, out: Path, keep_until: int | None) -> None:
        self.path = out / "log.jsonl"
        self.plot_path = out / "plots.png"
        self.records: list[dict[str, Any]] = []
        if keep_until is not None and self.path.is_file():  # resume: drop what the checkpoint does not cover
            self.records = [r for r in self._read() if r["step"] <= keep_until]
            body = "".join(json.dumps(r) + "\n" for r in self.records)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(body))
        else:
            self.path.write_text("")
        self.last_plot = 0.0

    def _read(self) -> list[dict[str, Any]]:
        """The logged records; a last line cut short (the process killed while appending it) is dropped."""
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise LGFormerError(f"{self.path}: record {number} is not valid JSON") from None
        return records

    def write(self, record: dict[str, Any], plot: bool = False) -> None:
        self.records.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if plot or time.monotonic() - self.last_plot > PLOT_SECONDS:
            self.plot()

    def plot(self) -> None:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

        steps = [r for r in self.records if "loss" in r]
        vals = [r for r in self.records if "val" in r]
        fig = Figure(figsize=(15, 4), layout="tight")
        axes = fig.subplots(1, 3)
        axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps])
        axes[0].set(title="training loss", xlabel="step", yscale="log")
        axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps])
        axes[1].set(title="learning rate (new parts)", xlabel="step")
        for metric in ("oIoU", "mIoU", "P@0.5", "P@0.9"):
            xs, ys = [r["step"] for r in vals], [r["val"][metric] for r in vals]
            axes[2].plot(xs, ys, marker="o", label=metric)
        axes[2].set(title="validation (%)", xlabel="step")
        if vals:
            axes[2].legend()
        atomic_write(self.plot_path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
        self.last_plot = time.monotonic()


def recover_run(out: Path) -> None:
    """Finish or undo the checkpoint swap a killed save left in run folder `out` (on the first process)."""
    if D.world().main:
        for name in ("last", "best"):
            note = recover_folder(out / name)
            if note:
                print(note)


class Trainer:
    """One run in `out`: a new one from `cfg`, or (`resume=True`) the run in `out` continued from
    `out/last` with its optimizer, step, best score and RNG states. `fit()` trains to the end."""

    def __init__(self, cfg: Config, out: str | Path, *, resume: bool = False, device: str = "auto") -> None:
        from lgformer.data.dataset import build_dataset
        from lgformer.model.build import build_model, validate
        from lgformer.text.tokenizer import Tokenizer

        self.cfg, self.tc, self.out = cfg, cfg.train, Path(out)
        tc = self.tc
        validate(cfg.model)  # before the data is read
        recover_run(self.out)
        if resume:
            _check_same_model(read_config(self.out / "last")[0], cfg, self.out / "last")
        elif (self.out / "last").exists():
            raise LGFormerError(f"{self.out} already holds a run; continue it with --resume {self.out}")
        self.world, self.device = D.setup(device)
        self.dtype = amp_dtype(tc.amp, self.device)
        self.micro, self.accum = batch_split(tc, self.world.size)
        seed_everything(tc.seed + self.world.rank, tc.deterministic)

        tokenizer = Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens)
        self.train_set = build_dataset(
            cfg.data, tc.train_split, train=True, tokenizer=tokenizer, seed=tc.seed
        )
        self.val_set = None
        if tc.val_split:
            self.val_set = build_dataset(cfg.data, tc.val_split, train=False, tokenizer=tokenizer)
        self.sampler = D.TrainSampler(
            len(self.train_set), tc.batch_size, self.world.rank, self.world.size, tc.seed
        )
        self.per_epoch = self.sampler.steps_per_epoch
        self.total = tc.max_steps or tc.epochs * self.per_epoch

        if resume:
            self.model, _ = load_model(self.out / "last", self.device)
        else:
            self.model = build_model(cfg.model, pretrained=tc.pretrained).to(self.device)
            if tc.init_from:
                self._initialise(tc.init_from)
        freeze(self.model, tc)
        # A frozen pretrained text encoder is not stored: checkpoints reload it from its source.
        self.exclude = ("text_encoder.",) if tc.pretrained and tc.freeze_text_encoder else ()
        self.optimizer = build_optimizer(self.model, tc, self.dtype, self.world.size, self.accum)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.step, self.best, self.saved_step = 0, None, None
        self.seconds_before = 0.0  # time of the sessions before a resume
        if resume:
            self._restore(load_training_state(self.out / "last"), read_config(self.out / "last")[1])
        self.ddp = None
        if self.world.size > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.log = None
        if self.world.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log = Log(self.out, keep_until=self.step if resume else None)
            config_mod.save(cfg, self.out / "config.yaml")
            self._describe()

    def _initialise(self, source: str) -> None:
        """Fine-tuning: every weight from checkpoint `source`, whose network must be this config's; a source
        without the no-target head starts a run with one (the head starts fresh)."""
        from lgformer.predictor import resolve_checkpoint

        folder = resolve_checkpoint(source)
        saved = read_config(folder)[0]
        adds_head = self.cfg.model.no_target_head and not saved.model.no_target_head
        if adds_head:
            head = {name: getattr(self.cfg.model, name) for name in NO_TARGET_FIELDS}
            saved = dataclasses.replace(saved, model=dataclasses.replace(saved.model, **head))
        _check_same_model(saved, self.cfg, folder)
        state = load_model(folder)[0].state_dict()
        missing = self.model.load_state_dict(state, strict=not adds_head).missing_keys
        if adds_head:
            assert all(key.startswith("target_head.") for key in missing), missing
            if self.world.rank == 0:
                print(f"initialised from {folder}; its network has no no-target head: the head starts fresh")

    def _describe(self) -> None:
        tc = self.tc
        print(
            f"global batch {tc.batch_size} = {self.micro} per device x {self.world.size} process(es) x "
            f"{self.accum} accumulation step(s); {self.per_epoch} steps per epoch "
            f"({len(self.train_set)} samples), {self.total} steps in all"
        )
        for g in self.optimizer.param_groups:
            count = sum(p.numel() for p in g["params"])
            print(
                f"  group {g['name']:<18} {count:>12,d} params  "
                f"lr {g['initial_lr']:g}  wd {g['weight_decay']:g}"
            )
        if self.step:
            print(f"resumed from {self.out / 'last'} at step {self.step}")

    def _restore(self, state: dict[str, Any], meta: dict[str, Any]) -> None:
        if meta.get("step") != state["step"]:
            raise LGFormerError(
                f"{self.out / 'last'}: weights (step {meta.get('step')}) and trainer state "
                f"(step {state['step']}) disagree; the run was interrupted while saving"
            )
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:  # written by a version that trained another set of parameters
            raise LGFormerError(
                f"{self.out / 'last'}: optimizer state does not fit this model's trainable parameters ({exc})"
            ) from None
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.best, self.saved_step = state["step"], state["best_oiou"], state["step"]
        self.seconds_before = state["train_seconds"]
        if len(state["rng"]) == self.world.size:
            _set_rng_state(state["rng"][self.world.rank])
        else:  # another number of processes: exactness is impossible anyway, stay reproducible
            seed_everything(self.tc.seed + self.world.rank + self.step, self.tc.deterministic)

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to `total` steps; `stop_after` ends (and saves) earlier without touching the schedule."""
        from tqdm import tqdm

        self.clock = self.window_start = time.monotonic()
        self.window: list[float] = []
        stop = self.total if stop_after is None else min(stop_after, self.total)
        with tqdm(
            total=self.total, initial=self.step, disable=not self.world.main, dynamic_ncols=True
        ) as bar:
            while self.step < stop:
                batches = self._epoch_batches()
                for _ in range(self.step % self.per_epoch, self.per_epoch):
                    loss = self._optimizer_step(batches)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr:.2e}")
                    self._log(loss)
                    self._validate_or_save(bar, last=self.step == stop)
                    if self.step == stop:
                        break
        if self.log is not None:
            self.log.plot()
        return TrainResult(self.step, self.step < self.total, self.best, self.out / "last", self.seconds)

    def _epoch_batches(self) -> Any:
        """Iterator over this rank's micro-batches from the current step to the end of its epoch."""
        from lgformer.data.dataset import collate

        epoch, start = divmod(self.step, self.per_epoch)
        self.sampler.set_epoch(epoch, start)
        self.train_set.set_epoch(epoch)
        loader = DataLoader(
            self.train_set,
            batch_size=self.micro,
            sampler=self.sampler,
            num_workers=self.tc.workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.tc.seed + epoch),
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def _log(self, loss: float) -> None:
        """Every `log_every` steps (and the last): the mean loss since the previous line, lr, speed, time."""
        self.window.append(loss)
        if self.log is None or (self.step % self.tc.log_every and self.step != self.total):
            return
        record = {
            "step": self.step,
            "epoch": round(self.step / self.per_epoch, 4),
            "loss": sum(self.window) / len(self.window),
            "lr": self.lr,
            "steps_per_s": len(self.window) / max(time.monotonic() - self.window_start, 1e-9),
            "train_s": round(self.seconds, 1),
        }
        self.log.write(record)
        self.window, self.window_start = [], time.monotonic()

    def _validate_or_save(self, bar: Any, last: bool) -> None:
        """Validate (and save `last`, maybe `best`) when due; else save `last` at epoch ends, every
        `save_every` steps and when the run stops."""
        tc = self.tc
        end_of_epoch = self.step % self.per_epoch == 0
        due = self.step % tc.val_every == 0 if tc.val_every else end_of_epoch
        if self.val_set is not None and (due or self.step == self.total):
            val = self.validate()
            if self.world.main:
                bar.write(f"step {self.step}: {tc.val_split} oIoU {val['oIoU']:.2f}  mIoU {val['mIoU']:.2f}")
            self.save(val)
        elif last or end_of_epoch or (tc.save_every and self.step % tc.save_every == 0):
            self.save(None)

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.clock

    def _optimizer_step(self, batches: Any) -> float:
        """One update from `accum` micro-batches; returns the loss averaged over the global batch."""
        tc = self.tc
        self.lr = tc.lr * set_lr(
            self.optimizer, self.step, self.total, tc
        )  # the new parts' rate, for the log
        set_train_mode(self.model, tc)
        with lent(self.optimizer):
            loss_sum = backward_batches(
                self.ddp or self.model,
                batches,
                self.accum,
                self.cfg.model,
                self.device,
                self.dtype,
                self.scaler,
            )
            value = float(D.all_reduce_sum(loss_sum)) / self.world.size
            if not math.isfinite(value):
                where = "none" if self.saved_step is None else f"{self.out / 'last'} (step {self.saved_step})"
                raise LGFormerError(
                    f"step {self.step + 1}: loss is {value}; run stopped. Last good checkpoint: {where}"
                )
            optimizer_update(self.model, self.optimizer, self.scaler, tc.clip_grad)
        self.step += 1
        return value

    def validate(self) -> dict[str, Any]:
        """Metrics on the validation split (resized protocol, complete on every rank); logged on rank 0."""
        self.model.eval()
        counts = evaluate_model(
            self.model,
            self.val_set,
            self.device,
            batch_size=self.micro,
            dtype=self.dtype,
            workers=self.tc.workers,
        )
        val = counts.summary()
        if self.log is not None:
            record = {
                "step": self.step,
                "epoch": round(self.step / self.per_epoch, 4),
                "split": self.tc.val_split,
            }
            self.log.write({**record, "val": val}, plot=True)
        return val

    def save(self, val: dict[str, Any] | None) -> None:
        """Write `last` (weights, config, trainer state with every rank's RNG) and, if `val` improves the
        best oIoU, `best`. Collective: every rank calls it."""
        rng = [None] * self.world.size
        if self.world.size > 1:
            torch.distributed.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        improved = val is not None and (self.best is None or val["oIoU"] > self.best)
        if improved:
            self.best = val["oIoU"]
        if self.world.main:
            meta = {"step": self.step, "epoch": self.step / self.per_epoch}
            if improved:
                save_model(
                    self.out / "best", self.model, self.cfg, exclude=self.exclude, extra={**meta, "val": val}
                )
            state = {
                "step": self.step,
                "best_oiou": self.best,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "rng": rng,
                "train_seconds": self.seconds,
            }
            save_model(
                self.out / "last",
                self.model,
                self.cfg,
                exclude=self.exclude,
                extra=meta,
                training_state=state,
            )
        self.saved_step = self.step
        D.barrier()


def train(
    cfg: Config, out: str | Path, *, resume: bool = False, device: str = "auto", stop_after: int | None = None
) -> TrainResult:
    """Train `cfg` into `out` (or continue the run there); see `Trainer`."""
    return Trainer(cfg, out, resume=resume, device=device).fit(stop_after)
