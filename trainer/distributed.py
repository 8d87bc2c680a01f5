"""Data-parallel training on Ray Train workers (``vlp-train pretrain|finetune --num-workers N``).

Each worker is one DDP rank (gloo on CPU, nccl on GPU; Ray Train sets up the process
group) and runs :func:`vlp.trainer.schedule.run_stages` with its rank: it reads the
micro-batches ``j = rank mod N`` of every stage's plan, gradients are averaged by DDP,
and rank 0 writes checkpoints, history and TensorBoard events. The run directory must be
reachable by every worker (one machine, or a shared file system on a cluster).

Because the micro-batches and all the randomness spent on them depend only on the
global micro-batch index, N workers with ``grad_accum`` A take the same optimizer steps
as one process with ``grad_accum`` N*A (up to the order of float additions), and a run
can resume with a different number of workers.

Finetuning (:func:`run_distributed_finetune`) runs the same way: every worker builds the
task's model and runs :func:`vlp.trainer.finetune.finetune` with its rank; rank 0 alone
writes the run folder (labels.json, init.json, checkpoints, history, best.pt/best.json,
results.json) and runs the validation passes, on the whole validation split, while the
other ranks wait, so the best checkpoint is chosen as in one process.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Optional

from vlp.core.durable import atomic_write_json
from vlp.trainer.config import TrainConfig, as_config

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def _worker_loop(settings: dict) -> None:
    import ray.train
    from ray.train.torch import get_device
    import torch

    from vlp.trainer.schedule import run_stages

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(settings["threads"])))
    device = str(get_device()) if settings["use_gpu"] else "cpu"
    summaries = run_stages(settings["config"], settings["out_dir"], device=device,
                           stop_after_steps=settings["stop_after_steps"], rank=rank, world_size=world_size)
    if rank == 0:
        for summary in summaries:
            summary.pop("history", None)
        atomic_write_json(Path(settings["out_dir"]) / SUMMARY_FILE, summaries, indent=1)


def _finetune_worker_loop(settings: dict) -> None:
    import ray.train
    from ray.train.torch import get_device
    import torch

    from vlp.trainer.finetune import finetune

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(settings["threads"])))
    device = str(get_device()) if settings["use_gpu"] else "cpu"
    summary = finetune(settings["config"], settings["out_dir"], init=settings["init"], device=device,
                       stop_after_steps=settings["stop_after_steps"], rank=rank, world_size=world_size)
    if rank == 0:
        summary.pop("history", None)
        atomic_write_json(Path(settings["out_dir"]) / SUMMARY_FILE, summary, indent=1)


class _HistoryWatcher(threading.Thread):
    """Shows the workers' progress on the driver by reading rank 0's ``history.jsonl``
    (worker output does not reach the driver)."""

    def __init__(self, config: TrainConfig, out_dir: Path, mode: str, every_s: float = 2.0):
        super().__init__(daemon=True)
        self.stages = [(stage.name, config.stage_dir(out_dir, i), stage.steps) for i, stage in enumerate(config.stages)]
        self.mode, self.every_s = mode, every_s
        self.stopped = threading.Event()

    def _latest(self, path: Path) -> Optional[dict]:
        try:
            with open(path, "rb") as handle:
                handle.seek(max(0, path.stat().st_size - 4096))
                lines = handle.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return None

    def run(self) -> None:
        from vlp.core.progress import Progress

        bars: dict = {}
        while not self.stopped.wait(self.every_s):
            for name, stage_dir, steps in self.stages:
                entry = self._latest(stage_dir / "history.jsonl")
                if entry is None:
                    continue
                bar = bars.get(name)
                if bar is None:
                    for other in bars.values():
                        other.close()
                    bar = bars[name] = Progress(steps, f"stage {name}", unit="step", mode=self.mode,
                                                initial=entry["step"])
                if entry["step"] > bar.done:
                    bar.update(entry["step"] - bar.done, loss=f"{entry['loss']:.3f}",
                               **{"samples/s": f"{entry.get('samples_per_s', 0):.0f}"})
        for bar in bars.values():
            bar.close()


def run_distributed(config, out_dir, *, num_workers: int, device: str = "auto",
                    stop_after_steps: Optional[int] = None, address: Optional[str] = None,
                    cpus_per_worker: Optional[int] = None, progress: str = "off") -> list[dict]:
    """Run ``config`` on ``num_workers`` Ray Train workers; returns the stage summaries
    (without per-step history: read ``history.jsonl``).

    ``device``: ``cuda`` (one GPU per worker), ``cpu``, or ``auto`` (GPUs when the Ray
    cluster has at least ``num_workers``). Without ``address`` a local Ray instance is
    started for the run and stopped after it.
    """
    config = as_config(config)
    return _fit(_worker_loop, {"config": config, "stop_after_steps": stop_after_steps}, config, out_dir,
                name="pretrain", num_workers=num_workers, device=device, address=address,
                cpus_per_worker=cpus_per_worker, progress=progress)


def run_distributed_finetune(config, out_dir, *, num_workers: int, init=None, device: str = "auto",
                             stop_after_steps: Optional[int] = None, address: Optional[str] = None,
                             cpus_per_worker: Optional[int] = None, progress: str = "off") -> dict:
    """Finetune ``config`` (a :class:`~vlp.trainer.config.FinetuneConfig`) on
    ``num_workers`` Ray Train workers, as :func:`vlp.trainer.finetune.finetune` does in one
    process; returns rank 0's summary (without per-step history). ``init`` must be a
    checkpoint or run folder every worker can read (a BERT directory goes into
    ``model.text_checkpoint`` beforehand). Other arguments as :func:`run_distributed`.
    """
    return _fit(_finetune_worker_loop, {"config": config, "init": str(init) if init is not None else None,
                                        "stop_after_steps": stop_after_steps}, config, out_dir,
                name="finetune", num_workers=num_workers, device=device, address=address,
                cpus_per_worker=cpus_per_worker, progress=progress)


def _fit(loop, settings: dict, config, out_dir, *, name: str, num_workers: int, device: str,
         address: Optional[str], cpus_per_worker: Optional[int], progress: str):
    """Start (or join) Ray, run ``loop`` on ``num_workers`` TorchTrainer workers and return
    what rank 0 wrote to OUT/summary.json; a worker's error becomes one RuntimeError line."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise ValueError("num_workers must be at least 1")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)  # a summary of an earlier call must not pass for this one's
    started = False
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
        started = True
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if device == "auto":
            use_gpu = gpus >= num_workers
        elif device in ("cuda", "gpu"):
            if gpus < num_workers:
                raise ValueError(f"--device cuda with {num_workers} workers needs {num_workers} GPUs; "
                                 f"the Ray cluster has {gpus}")
            use_gpu = True
        elif device == "cpu":
            use_gpu = False
        else:
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        cpus = int(resources.get("CPU", 1))
        per_worker = cpus_per_worker or max(1, cpus // num_workers)
        if not use_gpu and per_worker * num_workers > cpus:
            raise ValueError(f"{num_workers} workers x {per_worker} CPUs need {num_workers * per_worker} CPUs; "
                             f"the Ray cluster has {cpus}")
        settings = {**settings, "out_dir": str(out_dir), "use_gpu": use_gpu, "threads": per_worker}
        trainer = TorchTrainer(
            loop, train_loop_config=settings,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": per_worker}),
            run_config=RunConfig(storage_path=str(out_dir / ".ray-train"), name=name))
        log.info("%s on %d Ray worker(s), %s, %d CPU(s) each", name, num_workers, "GPU" if use_gpu else "CPU",
                 per_worker)
        watcher = _HistoryWatcher(config, out_dir, progress) if progress != "off" else None
        if watcher is not None:
            watcher.start()
        try:
            trainer.fit()
        except Exception as error:  # the worker's own exception is the useful part
            raise RuntimeError(f"distributed training failed: {_root_message(error)}") from error
        finally:
            if watcher is not None:
                watcher.stopped.set()
                watcher.join()
    finally:
        if started:
            ray.shutdown()
    return json.loads(summary_path.read_text())


def _root_message(error: BaseException) -> str:
    """One line for a chain of wrapped worker errors: the lowest failed rank's own exception
    (Ray Train's ``WorkerGroupError.worker_failures``), innermost cause first; its message's
    first line (a traceback text: its last line, the ``Type: message`` one)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            inner = failures[min(failures)]
        else:
            inner = error.__cause__ or getattr(error, "cause", None) or error.__context__
        if inner is None or not isinstance(inner, BaseException):
            break
        error = inner
    message = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]
