"""Single-process pretraining loop over one stage.

A stage is a set of tasks with weights plus optimisation settings (:class:`StageConfig`).
:class:`Pretrainer` runs it: AdamW (no decay on biases and LayerNorm weights), linear /
cosine / constant schedule with warmup, gradient accumulation, clipping, and a
checkpoint every ``checkpoint_every`` optimizer steps holding model, optimizer,
scheduler, RNG states (torch global + the masking generator) and the data position
(epoch, batch within the epoch). ``resume`` continues bit-for-bit on CPU: the batches,
the masking and the dropout of a resumed run equal those of the uninterrupted one.

A non-finite loss or gradient stops the run with :class:`NonFiniteLossError`, naming the
optimizer step, the micro-batch and its pair ids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from vlp.trainer.data import Collator, LengthBucketBatchSampler, PairDataset
from vlp.trainer.tasks import PretrainModel, prepare_batch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vlp-train-checkpoint"
CHECKPOINT_VERSION = 1


class NonFiniteLossError(RuntimeError):
    def __init__(self, message, step, micro_batch, pair_ids, losses):
        super().__init__(message)
        self.step, self.micro_batch, self.pair_ids, self.losses = step, micro_batch, pair_ids, losses


@dataclasses.dataclass
class StageConfig:
    name: str = "stage1"
    tasks: object = dataclasses.field(default_factory=lambda: ["MLM"])
    steps: int = 1000  # optimizer steps
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-6
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    clip_norm: float = 1.0  # 0: no clipping
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0
    bucket_batches: int = 50
    num_workers: int = 0
    text_mask_prob: float = 0.15
    region_mask_prob: float = 0.15

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant, got {self.schedule!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        self.betas = tuple(self.betas)

    @property
    def warmup(self) -> int:
        return self.warmup_steps or int(round(self.warmup_ratio * self.steps))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def lr_lambda(stage: StageConfig) -> Callable[[int], float]:
    warmup, total, kind = stage.warmup, stage.steps, stage.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or "LayerNorm" in name or ".norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": stage.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=stage.lr, betas=stage.betas, eps=stage.eps)


def to_device(value, device):
    """Tensors (also inside dicts, e.g. the hard negatives) moved to ``device``; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Pretrainer:
    """Runs one stage. ``out_dir`` receives ``checkpoint-STEP.pt``, ``last.json`` and
    ``history.jsonl`` (one line of losses/metrics per optimizer step)."""

    def __init__(self, model: PretrainModel, dataset: PairDataset, stage: StageConfig, out_dir,
                 *, device: str = "cpu"):
        self.model, self.dataset, self.stage = model.to(device), dataset, stage
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.optimizer = make_optimizer(model, stage)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(stage))
        self.sampler = LengthBucketBatchSampler(dataset.text_lengths(), stage.batch_size,
                                                bucket_batches=stage.bucket_batches, seed=stage.seed)
        if len(self.sampler) == 0:
            raise ValueError("the dataset is empty: no pair has features")
        self.generator = torch.Generator().manual_seed(stage.seed)  # masking randomness
        self.step = 0
        self.epoch, self.batch_in_epoch = 0, 0
        self.history: list[dict] = []
        torch.manual_seed(stage.seed)

    # -- data position -------------------------------------------------------------
    def _batches(self):
        """Micro-batches from the current position on, across epochs."""
        pad_id = self.model.ctx.pad_id
        while True:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=Collator(pad_id),
                                num_workers=self.stage.num_workers,
                                generator=torch.Generator().manual_seed(self.stage.seed + self.epoch),
                                persistent_workers=False)
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _to_device(self, batch):
        return to_device(batch, self.device)

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "stage": self.stage.to_dict(), "step": self.step,
            "position": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "masking": self.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "tasks": [{"name": t.name, "weight": t.weight} for t in self.model.tasks],
        }

    def save_checkpoint(self) -> Path:
        path = self.out_dir / f"checkpoint-{self.step:07d}.pt"
        _atomic_save(self.state_dict(), path)
        tmp = self.out_dir / "last.json.partial"
        tmp.write_text(json.dumps({"checkpoint": path.name, "step": self.step}))
        os.replace(tmp, self.out_dir / "last.json")
        old = sorted(self.out_dir.glob("checkpoint-*.pt"))
        for stale in old[:-self.stage.keep_checkpoints] if self.stage.keep_checkpoints > 0 else []:
            stale.unlink()
        log.info("saved %s", path)
        return path

    def load_checkpoint(self, path) -> None:
        path = Path(path)
        if path.is_dir():
            pointer = path / "last.json"
            if not pointer.is_file():
                raise FileNotFoundError(f"{path}: no last.json; nothing to resume")
            path = path / json.loads(pointer.read_text())["checkpoint"]
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a vlp-train checkpoint")
        names = [t["name"] for t in state["tasks"]]
        if names != [t.name for t in self.model.tasks]:
            raise ValueError(f"{path}: checkpoint tasks {names} differ from this stage's "
                             f"{[t.name for t in self.model.tasks]}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.epoch = int(state["position"]["epoch"])
        self.batch_in_epoch = int(state["position"]["batch_in_epoch"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["masking"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self._truncate_history()
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                 self.batch_in_epoch)

    def _truncate_history(self) -> None:
        """Drop history lines of steps after the checkpoint (they will be redone)."""
        path = self.out_dir / "history.jsonl"
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.step]
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    # -- training ------------------------------------------------------------------
    def _check(self, value: torch.Tensor, what: str, micro: int, batch: dict, losses: dict) -> None:
        if torch.isfinite(value).all():
            return
        shown = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                 for k, v in losses.items()}
        ids = list(batch.get("pair_id", []))
        message = (f"non-finite {what} at step {self.step + 1} (micro-batch {micro} of "
                   f"{self.stage.grad_accum}, epoch {self.epoch}, batch {self.batch_in_epoch - 1}); "
                   f"task losses {shown}; pair ids: {', '.join(map(str, ids))}")
        raise NonFiniteLossError(message, self.step + 1, micro, ids, shown)

    def train(self, max_steps: Optional[int] = None, callback: Optional[Callable] = None) -> list[dict]:
        """Train until ``stage.steps`` (or ``max_steps`` more steps); returns this call's history."""
        stage = self.stage
        end = stage.steps if max_steps is None else min(stage.steps, self.step + max_steps)
        batches = self._batches()
        self.model.train()
        run_history = []
        started = time.perf_counter()
        while self.step < end:
            self.optimizer.zero_grad(set_to_none=True)
            total_loss, task_losses, metrics = 0.0, {}, {}
            for micro in range(1, stage.grad_accum + 1):
                batch = self._to_device(next(batches))
                prepared = prepare_batch(batch, self.model.tasks, self.generator, self.model.ctx,
                                         stage.text_mask_prob, stage.region_mask_prob)
                loss, losses, batch_metrics = self.model(prepared, self.generator, prepared=True)
                self._check(loss.detach(), "loss", micro, batch, losses)
                (loss / stage.grad_accum).backward()
                total_loss += loss.item() / stage.grad_accum
                for k, v in losses.items():
                    task_losses[k] = task_losses.get(k, 0.0) + v.item() / stage.grad_accum
                for k, v in batch_metrics.items():
                    metrics.setdefault(k, []).append(v)
            if stage.clip_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), stage.clip_norm)
            else:
                norm = torch.norm(torch.stack([p.grad.norm() for p in self.model.parameters()
                                               if p.grad is not None]))
            self._check(norm.detach(), "gradient norm", stage.grad_accum, batch, task_losses)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            entry = {"step": self.step, "loss": total_loss, "lr": lr, "grad_norm": float(norm),
                     "losses": task_losses,
                     "metrics": {k: sum(v) / len(v) for k, v in metrics.items()}}
            run_history.append(entry)
            self.history.append(entry)
            with open(self.out_dir / "history.jsonl", "a") as handle:
                handle.write(json.dumps(entry) + "\n")
            if stage.log_every and self.step % stage.log_every == 0:
                log.info("step %d loss %.4f lr %.2e %s (%.1f s)", self.step, total_loss, lr,
                         " ".join(f"{k}={v:.3f}" for k, v in entry["metrics"].items()),
                         time.perf_counter() - started)
            if callback is not None:
                callback(self, entry)
            if stage.checkpoint_every and self.step % stage.checkpoint_every == 0:
                self.save_checkpoint()
        if self.step == stage.steps and not (stage.checkpoint_every and self.step % stage.checkpoint_every == 0):
            self.save_checkpoint()
        return run_history


@torch.no_grad()
def evaluate(model: PretrainModel, dataset, *, batch_size: int = 64, seed: int = 1234,
             text_mask_prob: float = 0.15, region_mask_prob: float = 0.15, max_batches: Optional[int] = None) -> dict:
    """Mean task metrics over ``dataset`` with fixed masking (``seed``), model in eval mode."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sampler = LengthBucketBatchSampler(dataset.text_lengths(), batch_size, shuffle=False)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(model.ctx.pad_id))
    sums: dict = {}
    device = next(model.parameters()).device
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_device(batch, device)
        prepared = prepare_batch(batch, model.tasks, generator, model.ctx, text_mask_prob, region_mask_prob)
        _, losses, metrics = model(prepared, generator, prepared=True)
        for k, v in list(metrics.items()) + [(f"loss_{k}", l.item()) for k, l in losses.items()]:
            total, count = sums.get(k, (0.0, 0))
            sums[k] = (total + v, count + 1)
    model.train(was_training)
    return {k: total / count for k, (total, count) in sums.items()}
