"""Training loop: the authors' recipe (spec §8) on one CPU, one GPU or many processes under torchrun.

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
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lgformer import config as config_mod
from lgformer.config import Config, TrainConfig
from lgformer.engine import distributed as D
from lgformer.engine.checkpoint import atomic_write, load_model, load_training_state, save_model, save_training_state
from lgformer.engine.evaluate import evaluate_model
from lgformer.errors import LGFormerError

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
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def batch_split(tc: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) so that micro x world x accumulation = global batch."""
    micro = tc.device_batch or tc.batch_size // world_size
    accum, rest = divmod(tc.batch_size, micro * world_size)
    if rest or accum < 1 or (tc.device_batch is None and tc.batch_size % world_size):
        raise LGFormerError(
            f"train.batch_size={tc.batch_size} is not a multiple of train.device_batch={micro} x "
            f"{world_size} processes"
        )
    return micro, accum


def freeze(model: nn.Module, tc: TrainConfig) -> None:
    """Frozen parts get no gradient: BERT's embeddings (the authors leave them out of the optimizer) or
    the whole text encoder (lite recipe)."""
    if tc.freeze_text_encoder:
        model.text_encoder.requires_grad_(False)
    elif tc.freeze_bert_embeddings:
        model.text_encoder.bert.embeddings.requires_grad_(False)


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
    """AdamW groups (spec §8): no weight decay on the trunk's normalisation layers and position tables
    and on the stage output norms (the authors' `backbone.norm{i}`); everything else decays. The
    pretrained trunk and text encoder use `lr_pretrained`, the new parts `lr`."""
    no_decay: set[str] = {
        f"image_encoder.trunk.{mod_name}.{p_name}".replace("..", ".")
        for mod_name, module in model.image_encoder.trunk.named_modules()
        if isinstance(module, NORMS)
        for p_name, _ in module.named_parameters(recurse=False)
    }
    lr_pre = tc.lr if tc.lr_pretrained is None else tc.lr_pretrained
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        trunk = name.startswith("image_encoder.trunk.")
        pretrained = trunk or name.startswith("text_encoder.")
        decay = not (
            name in no_decay
            or (trunk and any(key in name for key in NO_DECAY_NAMES))
            or name.startswith("image_encoder.out_norms.")
        )
        key = ("pretrained" if pretrained else "new", decay)
        group = groups.setdefault(key, {
            "name": f"{key[0]}{'' if decay else '-no-decay'}",
            "params": [],
            "lr": lr_pre if pretrained else tc.lr,
            "weight_decay": tc.weight_decay if decay else 0.0,
        })
        group["params"].append(p)
    for group in groups.values():
        group["initial_lr"] = group["lr"]
    return list(groups.values())


def lr_factor(step: int, total: int, warmup: int, power: float) -> float:
    """Polynomial decay per iteration, lr0 (1 - step/total)^power with step = 0 first (spec §8), times a
    linear warm-up over the first `warmup` steps."""
    poly = max(0.0, 1.0 - step / total) ** power
    return poly * min(1.0, (step + 1) / warmup) if warmup else poly


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@dataclass
class TrainResult:
    step: int
    stopped_early: bool
    best_oiou: float | None
    last: Path


class Log:
    """JSONL log (rank 0) with PNG plots regenerated at most every PLOT_SECONDS and at every validation."""

    def __init__(self, out: Path, keep_until: int | None) -> None:
        self.path = out / "log.jsonl"
        self.plot_path = out / "plots.png"
        self.records: list[dict[str, Any]] = []
        if keep_until is not None and self.path.is_file():  # resume: drop what the checkpoint does not cover
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["step"] <= keep_until]
            body = "".join(json.dumps(r) + "\n" for r in self.records)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(body))
        else:
            self.path.write_text("")
        self.last_plot = 0.0

    def write(self, record: dict[str, Any], plot: bool = False) -> None:
        self.records.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if plot or time.monotonic() - self.last_plot > PLOT_SECONDS:
            self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r for r in self.records if "loss" in r]
        vals = [r for r in self.records if "val" in r]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps])
        axes[0].set(title="training loss", xlabel="step", yscale="log")
        axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps])
        axes[1].set(title="learning rate (new parts)", xlabel="step")
        for metric in ("oIoU", "mIoU", "P@0.5", "P@0.9"):
            axes[2].plot([r["step"] for r in vals], [r["val"][metric] for r in vals], marker="o", label=metric)
        axes[2].set(title="validation (%)", xlabel="step")
        if vals:
            axes[2].legend()
        fig.tight_layout()
        atomic_write(self.plot_path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
        plt.close(fig)
        self.last_plot = time.monotonic()


def train(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    stop_after: int | None = None,
) -> TrainResult:
    """Train `cfg` into `out` (or continue the run in `out` from `out/last`). `stop_after` ends the run
    after that many optimizer steps without touching the schedule (the remaining steps can be resumed)."""
    from tqdm import tqdm

    from lgformer.data import build_dataset, collate
    from lgformer.model.build import build_model
    from lgformer.model.loss import mask_loss
    from lgformer.model.text_encoder import Tokenizer

    tc = cfg.train
    out = Path(out)
    w, dev = D.setup(device)
    dtype = amp_dtype(tc.amp, dev)
    micro, accum = batch_split(tc, w.size)
    seed_everything(tc.seed + w.rank, tc.deterministic)

    tokenizer = Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens)
    train_set = build_dataset(cfg.data, tc.train_split, train=True, tokenizer=tokenizer)
    val_set = build_dataset(cfg.data, tc.val_split, train=False, tokenizer=tokenizer) if tc.val_split else None
    sampler = D.TrainSampler(len(train_set), tc.batch_size, w.rank, w.size, tc.seed)
    per_epoch = sampler.steps_per_epoch
    total = tc.max_steps or tc.epochs * per_epoch

    if resume:
        model, _ = load_model(out / "last", dev)
        state = load_training_state(out / "last")
    else:
        model = build_model(cfg.model, pretrained=tc.pretrained).to(dev)
        state = None
    freeze(model, tc)
    optimizer = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, weight_decay=tc.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    step, best = 0, None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, best = state["step"], state["best_oiou"]
        rng = state["rng"]
        if len(rng) == w.size:
            _set_rng_state(rng[w.rank])
        else:
            seed_everything(tc.seed + w.rank + step, tc.deterministic)
    exclude = ("text_encoder.",) if tc.pretrained and tc.freeze_text_encoder else ()
    ddp = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None) if w.size > 1 else None
    net = ddp or model

    log = Log(out, keep_until=step if resume else None) if w.main else None
    if w.main:
        out.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, out / "config.yaml")
        print(f"global batch {tc.batch_size} = {micro} per device x {w.size} process(es) x {accum} "
              f"accumulation step(s); {per_epoch} steps per epoch ({len(train_set)} samples), {total} steps in all")
        for g in optimizer.param_groups:
            count = sum(p.numel() for p in g["params"])
            print(f"  group {g['name']:<22} {count:>12,d} params  lr {g['initial_lr']:g}  wd {g['weight_decay']:g}")
        if step:
            print(f"resumed from {out / 'last'} at step {step}")

    def save(val: dict[str, Any] | None) -> None:
        nonlocal best
        rng = [None] * w.size
        if w.size > 1:
            torch.distributed.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        improved = val is not None and (best is None or val["oIoU"] > best)
        if improved:
            best = val["oIoU"]
        if w.main:
            meta = {"step": step, "epoch": step / per_epoch}
            if improved:
                save_model(out / "best", model, cfg, exclude=exclude, extra={**meta, "val": val})
            save_training_state(out / "last", {
                "step": step,
                "best_oiou": best,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "rng": rng,
            })
            save_model(out / "last", model, cfg, exclude=exclude, extra=meta)
        D.barrier()

    bar = tqdm(total=total, initial=step, disable=not w.main, dynamic_ncols=True, desc="train")
    window_loss, window_steps, window_start = 0.0, 0, time.monotonic()
    stopped = False
    while step < total and not stopped:
        epoch, start = divmod(step, per_epoch)
        sampler.set_epoch(epoch, start)
        train_set.set_epoch(epoch)
        loader = DataLoader(
            train_set, batch_size=micro, sampler=sampler, num_workers=tc.workers, collate_fn=collate,
            generator=torch.Generator().manual_seed(tc.seed + epoch), pin_memory=dev.type == "cuda",
        )
        batches = iter(loader)
        for _ in range(start, per_epoch):
            factor = lr_factor(step, total, tc.warmup_steps, tc.poly_power)
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * factor
            set_train_mode(model, tc)
            loss_sum = torch.zeros((), device=dev)
            for j in range(accum):
                batch = next(batches)
                sync = ddp.no_sync() if ddp is not None and j < accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast(dev, dtype):
                        logits = net(batch["image"].to(dev), batch["text_mask"].to(dev), ids=batch["ids"].to(dev),
                                     upsample=False)
                        m = cfg.model
                        loss = mask_loss(logits, batch["mask"].to(dev), m.loss_pos_weight, m.loss_all_outputs,
                                         m.loss_resolution) / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += loss.detach()
            loss_value = float(D.all_reduce_sum(loss_sum)) / w.size
            if not math.isfinite(loss_value):
                bar.close()
                where = f"{out / 'last'} (step {step})" if (out / "last").is_dir() else "none yet"
                raise LGFormerError(f"step {step + 1}: loss is {loss_value}; stopped. Last good checkpoint: {where}")
            if scaler is not None:
                scaler.unscale_(optimizer)
            if tc.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_loss += loss_value
            window_steps += 1
            lr_new = optimizer.param_groups[0]["lr"]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_new:.2e}")
            if log is not None and (step % tc.log_every == 0 or step == total):
                elapsed = time.monotonic() - window_start
                log.write({"step": step, "epoch": round(step / per_epoch, 4), "loss": window_loss / window_steps,
                           "lr": lr_new, "steps_per_s": window_steps / max(elapsed, 1e-9)})
                window_loss, window_steps, window_start = 0.0, 0, time.monotonic()
            end_of_epoch = step % per_epoch == 0
            validate = val_set is not None and (
                step == total or (step % tc.val_every == 0 if tc.val_every else end_of_epoch)
            )
            stopped = stop_after is not None and step >= stop_after
            if validate:
                model.eval()
                counts = evaluate_model(model, val_set, dev, batch_size=micro, dtype=dtype, workers=tc.workers)
                val = counts.summary()
                if log is not None:
                    log.write({"step": step, "epoch": round(step / per_epoch, 4), "split": tc.val_split,
                               "val": val}, plot=True)
                    bar.write(f"step {step}: {tc.val_split} oIoU {val['oIoU']:.2f} mIoU {val['mIoU']:.2f}")
                save(val)
            elif stopped or step == total or (tc.save_every and step % tc.save_every == 0):
                save(None)
            if stopped or step == total:
                break
    bar.close()
    if log is not None:
        log.plot()
    return TrainResult(step, step < total, best, out / "last")
