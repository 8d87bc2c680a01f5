"""The pretraining loop over one stage, single process or one rank of a DDP group.

A stage is a set of tasks with weights plus optimisation settings (:class:`StageConfig`)
over one or more data sources (:class:`~vlp.trainer.data.DataSource`, each with its own
tasks and mixing ratio). :class:`Pretrainer` runs it: AdamW (no decay on biases and
LayerNorm weights), linear / cosine / constant schedule with warmup, gradient
accumulation, clipping, autocast (bf16 on CPU or GPU, fp16 with loss scaling on GPU) and a
checkpoint every ``checkpoint_every`` optimizer steps holding model, optimizer, scheduler,
loss scaler and the data position.

Reproducibility: micro-batches are numbered globally (``j``); which source and batch ``j``
reads (:class:`~vlp.trainer.data.MixturePlan`) and every random draw made while training
on it (masking, negatives, dropout) are pure functions of ``(seed, j)``. Hence a resumed
run continues bit-for-bit on CPU, and ``W`` DDP ranks with ``grad_accum`` A compute the
same gradients as one process with ``grad_accum`` W*A: rank ``r`` takes the micro-batches
``j = r mod W``.

A non-finite loss or gradient stops the run with :class:`NonFiniteLossError`, naming the
optimizer step, the micro-batch and its pair ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from vlp.core.durable import atomic_write, atomic_write_json
from vlp.trainer.config import StageConfig
from vlp.trainer.data import (Collator, DataSource, LengthBucketBatchSampler, MixedBatchSampler,
                              MixedDataset, MixturePlan, stable_seed, to_device)
from vlp.trainer.tasks import PretrainModel, prepare_batch

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

CHECKPOINT_FORMAT = "vlp-train-checkpoint"
CHECKPOINT_VERSION = 2


class NonFiniteLossError(RuntimeError):
    def __init__(self, message, step, micro_batch, pair_ids, losses):
        super().__init__(message)
        self.step, self.micro_batch, self.pair_ids, self.losses = step, micro_batch, pair_ids, losses


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


class _Distributed:
    """The collective operations the loop needs; no-ops in a single process."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        if world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise RuntimeError(f"world_size {world_size} needs an initialized torch.distributed process group")
            self.dist = dist

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def any(self, flag: bool, device) -> bool:
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            self.dist.barrier()


def _merge_means(parts: list[dict]) -> dict:
    """{name: (sum, count)} dicts from micro-batches / ranks -> {name: mean}; counts
    (names ending in ``_n``) are added up instead, as whole numbers."""
    totals: dict = {}
    for part in parts:
        for name, (value, count) in part.items():
            old = totals.get(name, (0.0, 0))
            totals[name] = (old[0] + value, old[1] + count)
    return {name: int(round(value)) if name.endswith("_n") else value / count
            for name, (value, count) in totals.items() if count}


def _per_source(gathered: list) -> dict:
    """{source: {"loss": mean, task: mean}} over the micro-batches of one step (all ranks)."""
    by_source: dict = {}
    for part, _, _ in gathered:
        for losses in part:
            by_source.setdefault(losses["source"], []).append({k: v for k, v in losses.items() if k != "source"})
    return {name: _merge_means(parts) for name, parts in by_source.items()}


class RunningLoss:
    """Exponential moving average of one source's total loss (``weight`` per step)."""

    def __init__(self, weight: float = 0.9):
        self.weight, self.value, self.steps = weight, None, 0

    def update(self, loss: float) -> float:
        self.steps += 1
        self.value = loss if self.value is None else self.weight * self.value + (1 - self.weight) * loss
        return self.value


def _sources(data, model: PretrainModel) -> list[DataSource]:
    if isinstance(data, DataSource):
        data = [data]
    if not isinstance(data, (list, tuple)):
        data = [DataSource("pairs", data)]
    names = [t.name for t in model.tasks]
    out = []
    for source in data:
        tasks = tuple(source.tasks) or tuple(names)
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ValueError(f"data source {source.name!r}: task(s) {unknown} are not among the stage's {names}")
        if "ITM_HS" in tasks and getattr(source.dataset, "hard_negatives", None) is None:
            raise ValueError(f"data source {source.name!r} trains ITM_HS but has no hard negatives: "
                             "give its PairDataset hard_negatives=PairStore(...)")
        out.append(dataclasses.replace(source, tasks=tasks))
    return out


def _ignore_interrupts(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process, which stops after the
    current step (a worker dying of it would end the run with a DataLoader error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Pretrainer:
    """Runs one stage. ``out_dir`` receives ``checkpoint-STEP.pt``, ``last.json``,
    ``history.jsonl`` (one line per optimizer step; with several sources also each
    source's losses of the step, see :mod:`vlp.trainer.reporting`) and ``eval.jsonl``;
    with ``world_size > 1`` only rank 0 writes. ``running``: each source's running
    (exponentially averaged) loss, shown by the progress display of a mixed stage.

    ``data``: a :class:`PairDataset` (all tasks on it) or a list of
    :class:`DataSource`. ``evaluator``: called with the model every ``eval_every`` steps
    and at the end of the stage (rank 0); returns a flat dict of metrics.
    """

    def __init__(self, model: PretrainModel, data, stage: StageConfig, out_dir, *, device: str = "cpu",
                 rank: int = 0, world_size: int = 1, evaluator: Optional[Callable] = None,
                 progress: str = "off", step_offset: int = 0):
        from vlp.trainer.reporting import TrainingLog

        self.device = torch.device(device)
        self.model, self.stage = model.to(self.device), stage
        self.sources = _sources(data, model)
        self.dist = _Distributed(rank, world_size)
        self.out_dir = Path(out_dir)
        if rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        samplers = [LengthBucketBatchSampler(s.dataset.text_lengths(), stage.batch_size,
                                             bucket_batches=stage.bucket_batches, seed=stage.seed + 7919 * k)
                    for k, s in enumerate(self.sources)]
        for source, sampler in zip(self.sources, samplers):
            if len(sampler) == 0:
                raise ValueError(f"data source {source.name!r} is empty: no pair has features")
        self.plan = MixturePlan(samplers, [s.ratio for s in self.sources], seed=stage.seed)
        per_step = stage.grad_accum * world_size
        if not stage.steps:
            stage = self.stage = dataclasses.replace(
                stage, steps=max(1, math.ceil(stage.epochs * sum(self.plan.batches_per_epoch) / per_step)),
                epochs=0.0)
        dtype = PRECISIONS[stage.precision]
        if stage.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 training needs a GPU (loss scaling); use precision bf16 on CPU")
        self.autocast = dict(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)
        self.scaler = torch.amp.GradScaler("cuda") if stage.precision == "fp16" else None
        self.optimizer = make_optimizer(model, stage)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(stage))
        self.generator = torch.Generator()  # masking randomness, reseeded per micro-batch
        self.forward = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # sources train different task subsets, so some heads sit out some steps
            self.forward = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.step = 0
        self.micro_batch = 0  # global index of the next micro-batch
        self.history: list[dict] = []
        self.evaluator = evaluator
        self.running = {s.name: RunningLoss() for s in self.sources}  # per-source loss (mixed stages)
        self.progress_mode = progress if rank == 0 else "off"
        self.log = TrainingLog(self.out_dir, stage_name=stage.name, global_step_offset=step_offset) \
            if rank == 0 else None

    @property
    def epoch(self) -> int:
        """Epochs of the first source completed so far (the position of single-source stages)."""
        return self.plan.counts_before(self.micro_batch)[0] // self.plan.batches_per_epoch[0]

    @property
    def batch_in_epoch(self) -> int:
        return self.plan.counts_before(self.micro_batch)[0] % self.plan.batches_per_epoch[0]

    # -- data ----------------------------------------------------------------------
    def _loader(self):
        sampler = MixedBatchSampler(self.plan, self.micro_batch, rank=self.dist.rank,
                                    world_size=self.dist.world_size)
        loader = DataLoader(MixedDataset([s.dataset for s in self.sources]), batch_sampler=sampler,
                            collate_fn=Collator(self.model.ctx.pad_id), num_workers=self.stage.num_workers,
                            generator=torch.Generator().manual_seed(self.stage.seed),
                            pin_memory=self.device.type == "cuda",
                            worker_init_fn=_ignore_interrupts if self.stage.num_workers else None)
        return iter(loader)

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "stage": self.stage.to_dict(), "step": self.step,
            "position": {"micro_batch": self.micro_batch, "world_size": self.dist.world_size},
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "tasks": [{"name": t.name, "weight": t.weight} for t in self.model.tasks],
        }

    def save_checkpoint(self) -> Optional[Path]:
        path = self.out_dir / f"checkpoint-{self.step:07d}.pt"
        if self.dist.rank == 0:
            state = self.state_dict()
            atomic_write(path, lambda handle: torch.save(state, handle))  # a handle: bytes independent of the name
            atomic_write_json(self.out_dir / "last.json",
                              {"checkpoint": path.name, "step": self.step, "steps": self.stage.steps}, indent=None)
            old = sorted(self.out_dir.glob("checkpoint-*.pt"))
            for stale in old[:-self.stage.keep_checkpoints] if self.stage.keep_checkpoints > 0 else []:
                stale.unlink()
            log.info("saved %s", path)
        self.dist.barrier()
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
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: checkpoint version {state.get('version')}, this vlp reads "
                             f"version {CHECKPOINT_VERSION}")
        names = [t["name"] for t in state["tasks"]]
        if names != [t.name for t in self.model.tasks]:
            raise ValueError(f"{path}: checkpoint tasks {names} differ from this stage's "
                             f"{[t.name for t in self.model.tasks]}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.micro_batch = int(state["position"]["micro_batch"])
        saved_world = int(state["position"].get("world_size", 1))
        if saved_world != self.dist.world_size:
            log.warning("%s was written by %d worker(s), resuming with %d: the data continues from micro-batch "
                        "%d, but batches per step change", path, saved_world, self.dist.world_size, self.micro_batch)
        if self.log is not None:
            self.log.truncate(self.step)
        log.info("resumed from %s at step %d (micro-batch %d)", path, self.step, self.micro_batch)

    # -- training ------------------------------------------------------------------
    def _check(self, value: torch.Tensor, what: str, micro: int, batch: dict, losses: dict) -> None:
        bad = not bool(torch.isfinite(value).all())
        if not self.dist.any(bad, value.device):
            return
        shown = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                 for k, v in losses.items()}
        ids = list(batch.get("pair_id", [])) if bad else []
        where = f"rank {self.dist.rank}: " if self.dist.enabled else ""
        source = self.sources[batch.get("source", 0)].name
        message = (f"{where}non-finite {what} at step {self.step + 1} (micro-batch {micro} of "
                   f"{self.stage.grad_accum}, global micro-batch {batch.get('micro_batch')}, source {source}); "
                   f"task losses {shown}; pair ids: {', '.join(map(str, ids)) or 'on another rank'}")
        raise NonFiniteLossError(message, self.step + 1, micro, ids, shown)

    def _micro_step(self, batch: dict, micro: int, sync: bool):
        """Forward + backward of one micro-batch; returns ({task: (loss, 1)}, {metric: (value, 1)}, size)."""
        stage = self.stage
        source = self.sources[batch.get("source", 0)]
        seed = stable_seed(stage.seed, batch["micro_batch"])
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        batch = to_device(batch, self.device)
        prepared = prepare_batch(batch, self.model.select(source.tasks), self.generator, self.model.ctx,
                                 stage.text_mask_prob, stage.region_mask_prob, stage.region_mask_split)
        context = self.forward.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
        with context:
            with torch.autocast(**self.autocast):
                loss, losses, metrics = self.forward(prepared, self.generator, prepared=True, tasks=source.tasks)
            self._check(loss.detach(), "loss", micro, batch, losses)
            scaled = loss / stage.grad_accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        task_losses = {"loss": (loss.item(), 1)}
        task_losses.update({k: (v.item(), 1) for k, v in losses.items()})
        task_losses["source"] = source.name
        return task_losses, {k: (float(v), 1) for k, v in metrics.items()}, len(batch["pair_id"])

    def train(self, max_steps: Optional[int] = None, callback: Optional[Callable] = None,
              should_stop: Optional[Callable[[], bool]] = None) -> list[dict]:
        """Train until ``stage.steps`` (or ``max_steps`` more steps); returns this call's history.

        ``callback(trainer, entry)`` runs after each optimizer step (gradients still set).
        ``should_stop()`` is asked after each optimizer step; when it says so (Ctrl-C), a
        checkpoint is written and training stops, to be resumed from that step.
        """
        from vlp.core.progress import Progress

        stage = self.stage
        end = stage.steps if max_steps is None else min(stage.steps, self.step + max_steps)
        batches = self._loader()
        self.model.train()
        run_history = []
        progress = Progress(stage.steps, f"stage {stage.name}", unit="step", mode=self.progress_mode,
                            initial=self.step)
        try:
            while self.step < end:
                started = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                losses, metrics, samples = [], [], 0
                for micro in range(1, stage.grad_accum + 1):
                    batch = next(batches)
                    task_losses, batch_metrics, size = self._micro_step(batch, micro, sync=micro == stage.grad_accum)
                    losses.append(task_losses)
                    metrics.append(batch_metrics)
                    samples += size
                entry = self._optimizer_step(batch, losses, metrics, samples, started)
                run_history.append(entry)
                if callback is not None:
                    callback(self, entry)
                shown = ({f"loss[{name}]": f"{r.value:.3f}" for name, r in self.running.items() if r.value is not None}
                         if "sources" in entry else {"loss": f"{entry['loss']:.3f}"})
                progress.update(1, **shown, **{"samples/s": f"{entry['samples_per_s']:.0f}"})
                saved = stage.checkpoint_every and self.step % stage.checkpoint_every == 0
                if saved:
                    self.save_checkpoint()
                if should_stop is not None and self.step < stage.steps and should_stop():
                    if not saved:
                        self.save_checkpoint()
                    break
                if stage.eval_every and self.step % stage.eval_every == 0 and self.step < stage.steps:
                    self.run_evaluation()
            if self.step == stage.steps:
                if not (stage.checkpoint_every and self.step % stage.checkpoint_every == 0):
                    self.save_checkpoint()
                self.run_evaluation()
        finally:
            progress.close()
            del batches  # stops DataLoader workers of the endless sampler
        return run_history

    def _optimizer_step(self, batch, losses, metrics, samples, started) -> dict:
        stage = self.stage
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if stage.clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, stage.clip_norm)
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
        # one collective for what the log needs from every rank
        gathered = self.dist.gather((losses, metrics, samples))
        merged_losses = _merge_means([{k: v for k, v in m.items() if k != "source"}
                                      for part, _, _ in gathered for m in part])
        if self.scaler is None:  # with loss scaling an overflow just skips the step
            self._check(norm.detach(), "gradient norm", stage.grad_accum, batch, merged_losses)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.micro_batch += stage.grad_accum * self.dist.world_size
        samples = sum(n for _, _, n in gathered)
        elapsed = time.perf_counter() - started
        total = merged_losses.pop("loss")
        entry = {"step": self.step, "loss": total, "lr": lr, "grad_norm": float(norm),
                 "losses": merged_losses,
                 "metrics": _merge_means([m for _, part, _ in gathered for m in part]),
                 "samples": samples, "samples_per_s": samples / elapsed if elapsed > 0 else 0.0}
        if len(self.sources) > 1:  # a mixed stage: each source's losses apart (their totals differ)
            per_source = _per_source(gathered)
            if len(per_source) == 1:
                entry["source"] = next(iter(per_source))
            entry["sources"] = per_source
            for name, values in per_source.items():
                self.running[name].update(values["loss"])
        self.history.append(entry)
        if self.log is not None:
            self.log.log_step(entry)
        if stage.log_every and self.step % stage.log_every == 0:
            log.info("step %d loss %.4f%s lr %.2e %s (%.0f samples/s)", self.step, total, self._running_text(), lr,
                     " ".join(f"{k}={v}" if k.endswith("_n") else f"{k}={v:.3f}"
                              for k, v in entry["metrics"].items()), entry["samples_per_s"])
        return entry

    def _running_text(self) -> str:
        if len(self.sources) < 2:
            return ""
        return " (" + ", ".join(f"{name} {r.value:.4f}" for name, r in self.running.items()
                                if r.value is not None) + ")"

    def run_evaluation(self) -> Optional[dict]:
        """Held-out metrics from the evaluator (rank 0; the others wait)."""
        result = None
        if self.evaluator is not None and self.dist.rank == 0:
            result = self.evaluator(self.model)
            self.log.log_eval(self.step, result)
            log.info("step %d eval %s", self.step, " ".join(f"{k}={v:.3f}" for k, v in result.items()))
        self.dist.barrier()
        return result

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
