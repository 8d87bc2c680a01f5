"""Finetuning and evaluation on downstream tasks (``vlp-train finetune`` / ``evaluate``).

One loop for every task: a :class:`~vlp.trainer.config.FinetuneConfig` names a
downstream task (:mod:`vlp.trainer.downstream`), and :func:`finetune` builds a
:class:`~vlp.trainer.downstream.FinetuneModel` (an encoder with the task's head) and runs
it with the pretraining :class:`~vlp.trainer.pretrain.Pretrainer`: the same optimizer and
schedule, checkpoints, exact resume, AMP, Ctrl-C and TensorBoard. A run folder holds::

    config.yaml          the config, normalised (as for pretraining)
    labels.json          the task's label list (answers, genres, ...) in head order
    01-finetune/         checkpoints, history.jsonl, eval.jsonl (validation metrics), tensorboard/
    best.pt, best.json   the weights of the best validation step by the task's main metric
    results.json         best step and metrics, the final validation metrics, later evaluations
    results.md           the same as a markdown table (after vlp-train evaluate)

``init`` (``--init``): a ``vlp-train pretrain`` run folder (the last checkpoint of its last
stage), one stage's folder, a checkpoint file (``checkpoint-*.pt``, a finetune ``best.pt``
or a plain state dict), a BERT directory (the text side, as ``model.text_checkpoint``), or
None (random init). From a checkpoint only the encoder's tensors are taken; pretraining
heads are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from vlp.core.durable import atomic_write, atomic_write_json, atomic_write_text
from vlp.trainer.config import CONFIG_FILE, FINETUNE_TASKS, ConfigError, FinetuneConfig, read_yaml

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.pt"
BEST_INFO = "best.json"
RESULTS_FILE = "results.json"
RESULTS_TABLE = "results.md"
BEST_FORMAT = "vlp-finetune-best"


class InitError(ValueError):
    """``--init`` names something that cannot initialise the model."""


# -- stores ----------------------------------------------------------------------------

def check_finetune_stores(config: FinetuneConfig) -> None:
    """Open the task's stores before anything is written: a missing store, a pair store of
    another kind, a split with no pairs or features of the wrong size are ConfigErrors
    naming the config file and the key."""
    try:
        _check_stores(config)
    except ConfigError as error:
        raise ConfigError(f"{config.path}: {error}" if config.path else str(error)) from None


def _check_stores(config: FinetuneConfig) -> None:
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.data import split_filter

    task = config.task
    try:
        pairs = PairStore(task.pairs)
    except Exception as error:
        raise ConfigError(f"task.pairs: {error}") from None
    wanted = FINETUNE_TASKS[task.name]
    if pairs.kind != wanted:
        raise ConfigError(f"task.pairs: {task.pairs} holds {pairs.kind} pairs; task {task.name} needs {wanted} pairs")
    for key in ("train_split", "val_split"):
        try:
            split_filter(pairs, list(getattr(task, key)))
        except ValueError as error:
            raise ConfigError(f"task.{key}: {error}") from None
    try:
        features = FeatureStore(task.features)
    except Exception as error:
        raise ConfigError(f"task.features: {error}") from None
    if getattr(task, "hard_negatives", None):
        try:
            hard = PairStore(task.hard_negatives)
        except Exception as error:
            raise ConfigError(f"task.hard_negatives: {error}") from None
        if hard.kind != "hard_negatives":
            raise ConfigError(f"task.hard_negatives: {task.hard_negatives} holds {hard.kind} pairs, not hard_negatives")
    feature_dim = config.model.visual_config().feature_dim
    if features.feature_dim != feature_dim:
        raise ConfigError(f"task.features: {task.features} holds {features.feature_dim}-d features, "
                          f"model.visual.feature_dim is {feature_dim}: set model.visual.feature_dim: "
                          f"{features.feature_dim}")


# -- init ------------------------------------------------------------------------------

def is_bert_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and (path / "vocab.txt").is_file()


def init_checkpoint(init) -> Path:
    """The checkpoint file ``init`` stands for (a run folder: its last stage's last
    checkpoint; a stage folder: its last checkpoint; a file: itself)."""
    path = Path(init)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InitError(f"--init {init}: no such file or folder")
    if (path / "last.json").is_file():
        stage_dir = path
    else:
        stages = sorted(p.parent for p in path.glob("*/last.json"))
        if not stages:
            raise InitError(f"--init {init}: neither a vlp-train pretrain run folder (no NN-stage/last.json), "
                            "a checkpoint file nor a BERT directory (config.json + vocab.txt)")
        stage_dir = stages[-1]
    info = json.loads((stage_dir / "last.json").read_text())
    if int(info.get("step", 0)) < int(info.get("steps", 0)):
        log.warning("%s: the stage stopped at step %s of %s; its last checkpoint is used", stage_dir,
                    info.get("step"), info.get("steps"))
    return stage_dir / info["checkpoint"]


def encoder_state(init) -> tuple[dict, str]:
    """The encoder tensors (keys without the ``encoder.`` prefix) of the checkpoint ``init``
    names, and where they came from."""
    path = init_checkpoint(init)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or not readable
        raise InitError(f"--init {path}: cannot read a checkpoint ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InitError(f"--init {path}: not a model checkpoint")
    encoder = {k[len("encoder."):]: v for k, v in state.items() if isinstance(k, str) and k.startswith("encoder.")}
    if not encoder:
        raise InitError(f"--init {path}: holds no encoder weights (no 'encoder.*' tensors)")
    return encoder, str(path)


def load_encoder(model, state: dict, source: str) -> int:
    """Copy ``state`` into ``model.encoder``; every encoder tensor must be there with its
    shape (a model config that differs from the pretraining one is named)."""
    own = model.encoder.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise InitError(f"--init {source}: lacks {len(missing)} encoder tensor(s) of this model, e.g. {missing[0]} "
                        "(was it pretrained with another model: architecture?)")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise InitError(f"--init {source}: {key} has shape {tuple(state[key].shape)}, this model's is "
                            f"{tuple(value.shape)}: give the config the pretraining run's model: section")
    model.encoder.load_state_dict({k: state[k] for k in own})
    return len(own)


# -- building ----------------------------------------------------------------------------

def _labels(config: FinetuneConfig, pairs, out_dir: Optional[Path], *, write: bool = True) -> tuple[list, str]:
    from vlp.trainer.downstream import LABELS_FILE
    from vlp.trainer.finetune_tasks import task_labels

    saved = out_dir / LABELS_FILE if out_dir is not None else None
    if saved is not None and saved.is_file():
        data = json.loads(saved.read_text())
        return data["labels"], data.get("source", str(saved))
    task = config.task
    try:
        labels, source = task_labels(task.name, pairs, split=task.train_split, answer_vocab=task.answer_vocab)
    except ValueError as error:
        raise ConfigError(f"{config.path or 'config'}: task: {error}") from None
    if not labels:
        raise ConfigError(f"{config.path or 'config'}: task: the {'/'.join(task.train_split)} pairs of {task.pairs} "
                          "give no labels (no answers / genres)")
    if saved is not None and write:
        atomic_write_json(saved, {"task": task.name, "source": source, "labels": labels}, indent=0)
    return labels, source


def make_task(config: FinetuneConfig, labels):
    from vlp.trainer.finetune_tasks import task_class

    task = config.task
    extra = {}
    if task.name == "retrieval":
        extra = {k: getattr(task, k) for k in ("negatives", "candidates", "margin", "shortlist")
                 if getattr(task, k) is not None}
    if task.name == "vcr":  # VL-BERT's masked RoI classification while finetuning
        extra = {"roi_mask_prob": getattr(task, "roi_mask_prob", None) or 0.0}
    return task_class(task.name)(labels, head=task.head, loss=task.loss, setting=task.setting, **extra)


def task_dataset(config: FinetuneConfig, task, pairs, features, tokenizer, split, *, seed: int = 0,
                 train: bool = False):
    from vlp.trainer.data import PairDataset

    spec = config.task
    hard = None
    if getattr(spec, "hard_negatives", None) and train:  # retrieval's hard negative images
        from vlp.schemas.pairs import PairStore

        hard = PairStore(spec.hard_negatives)
    if hasattr(task, "dataset"):  # a task with its own examples (vcr: four candidates per question)
        return task.dataset(pairs, features, tokenizer, max_text_len=spec.max_text_len, max_regions=spec.max_regions,
                            box_dims=config.model.visual_config().box_dims, seed=seed,
                            split=list(split) if split else None)
    return PairDataset(pairs, features, tokenizer, max_text_len=spec.max_text_len, max_regions=spec.max_regions,
                       box_dims=config.model.visual_config().box_dims, seed=seed,
                       split=list(split) if split else None, targets=task.target, second_image=task.second_image,
                       hard_negatives=hard)


def build_model(config: FinetuneConfig, task, tokenizer):
    from vlp.trainer.downstream import FinetuneModel
    from vlp.trainer.schedule import build_encoder
    from vlp.trainer.tasks import TaskContext

    torch.manual_seed(config.seed)
    encoder = build_encoder(config, tokenizer)
    torch.manual_seed(config.seed + 1)  # the head: the same init with or without --init
    return FinetuneModel(encoder, task, TaskContext.from_tokenizer(tokenizer))


class BestCheckpoint:
    """Keeps ``best.pt`` (weights, step, metrics, task) of the best validation step by
    ``metric`` (higher is better); ``best.json`` says which, and survives a resume."""

    def __init__(self, run_dir, metric: str):
        self.run_dir, self.metric = Path(run_dir), metric
        info = self.run_dir / BEST_INFO
        self.info = json.loads(info.read_text()) if info.is_file() else None

    def update(self, step: int, metrics: dict, model) -> bool:
        value = metrics.get(self.metric)
        if value is None:
            return False
        if self.info is not None and not value > self.info["value"]:
            return False
        if self.info is not None and step <= self.info["step"] and value <= self.info["value"]:
            return False
        state = {"format": BEST_FORMAT, "step": int(step), "metric": self.metric, "value": float(value),
                 "metrics": metrics, "task": model.task.to_dict(),
                 "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
        atomic_write(self.run_dir / BEST_CHECKPOINT, lambda handle: torch.save(state, handle))
        self.info = {"step": int(step), "metric": self.metric, "value": float(value), "metrics": metrics}
        atomic_write_json(self.run_dir / BEST_INFO, self.info, indent=1)
        return True


def finetune(config: FinetuneConfig, out_dir, *, init=None, device: str = "cpu", progress: str = "off",
             stop_after_steps: Optional[int] = None, should_stop=None, num_workers: Optional[int] = None,
             rank: int = 0, world_size: int = 1) -> dict:
    """Finetune ``config``'s task into ``out_dir`` (continuing a run there from its last
    checkpoint); returns a summary (steps, last loss, best step and metric, final metrics).

    ``init``: see the module docstring (a BERT directory is passed as
    ``model.text_checkpoint`` instead, before this is called). ``num_workers``: DataLoader
    workers (overrides ``train.num_workers``). ``rank``/``world_size``: this process's
    place in an initialised DDP group (:func:`vlp.trainer.distributed.run_distributed_finetune`):
    rank 0 alone writes the run folder and evaluates; the others train and wait.
    """
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.data import DataSource, load_tokenizer
    from vlp.trainer.pretrain import Pretrainer, _Distributed

    check_finetune_stores(config)
    out_dir = Path(out_dir)
    lead = rank == 0
    group = _Distributed(rank, world_size)
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
    if lead and not (out_dir / CONFIG_FILE).is_file():  # the CLI writes it first (prepare_run_folder)
        import yaml

        atomic_write_text(out_dir / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    stage = config.train if num_workers is None else dataclasses.replace(config.train, num_workers=num_workers)
    spec = config.task
    model_spec = config.model
    tokenizer = load_tokenizer(model_spec.vocab or model_spec.text_checkpoint)
    pairs, features = PairStore(spec.pairs), FeatureStore(spec.features)
    stage_dir = config.stage_dir(out_dir)
    resuming = (stage_dir / "last.json").is_file()  # read by every rank before any writes a checkpoint
    if lead:
        labels, label_source = _labels(config, pairs, out_dir)
    group.barrier()
    if not lead:  # rank 0's labels.json: the head order is the same on every rank
        labels, label_source = _labels(config, pairs, out_dir, write=False)
    task = make_task(config, labels)
    model = build_model(config, task, tokenizer)
    init_info = None
    if init is not None and not resuming:
        state, source = encoder_state(init)
        count = load_encoder(model, state, source)
        init_info = {"checkpoint": source, "tensors": count}
        if lead:
            atomic_write_json(out_dir / "init.json", init_info, indent=1)
            log.info("encoder initialised from %s (%d tensors)", source, count)
    elif (out_dir / "init.json").is_file():
        init_info = json.loads((out_dir / "init.json").read_text())
    trainable = model.freeze_base() if spec.freeze_base else sum(p.numel() for p in model.parameters())
    train_set = task_dataset(config, task, pairs, features, tokenizer, spec.train_split, seed=stage.seed, train=True)
    if hasattr(task, "bind"):  # retrieval: mines hard negatives with the model, draws candidates from train_set
        task.bind(model, train_set)
    val_set = task_dataset(config, task, pairs, features, tokenizer, spec.val_split)
    if len(val_set) == 0:
        raise ConfigError(f"{config.path or 'config'}: task.val_split: no {'/'.join(spec.val_split)} pair has features")
    best = BestCheckpoint(out_dir, task.main_metric) if lead else None
    holder: dict = {}

    def evaluator(model_) -> dict:  # rank 0 only (Pretrainer.run_evaluation), on the unwrapped model
        from vlp.trainer.downstream import evaluate_task

        metrics, _, _ = evaluate_task(model_, val_set, batch_size=spec.eval_batch_size, max_items=spec.eval_max_items)
        best.update(holder["trainer"].step, metrics, model_)
        return metrics

    trainer = Pretrainer(model, [DataSource("train", train_set, (task.name,))], stage, stage_dir, device=device,
                         evaluator=evaluator, progress=progress, rank=rank, world_size=world_size)
    holder["trainer"] = trainer
    history = []
    if resuming:
        trainer.load_checkpoint(stage_dir)
    try:
        if trainer.step < trainer.stage.steps:  # a finished run is only reported
            history = trainer.train(max_steps=stop_after_steps, should_stop=should_stop)
    finally:
        trainer.close()
    finals = _read_eval(stage_dir) if lead else []
    summary = {"task": spec.name, "dir": str(stage_dir), "start_step": history[0]["step"] - 1 if history else trainer.step,
               "end_step": trainer.step, "steps": trainer.stage.steps,
               "last_loss": history[-1]["loss"] if history else None, "labels": len(labels),
               "label_source": label_source, "train_pairs": len(train_set), "val_pairs": len(val_set),
               "skipped_pairs": {"train": train_set.skipped, "val": val_set.skipped},
               "freeze_base": spec.freeze_base, "trainable_parameters": trainable, "init": init_info,
               "best": best.info if best is not None else None,
               "final": finals[-1] if finals and trainer.step >= trainer.stage.steps else None}
    if lead and trainer.step >= trainer.stage.steps:
        results = _read_results(out_dir)
        results.update({k: summary[k] for k in ("task", "steps", "labels", "label_source", "freeze_base",
                                                "trainable_parameters", "init", "best", "final")})
        results["main_metric"] = task.main_metric
        atomic_write_json(out_dir / RESULTS_FILE, results, indent=1)
    summary["history"] = history
    return summary


def _read_eval(stage_dir: Path) -> list[dict]:
    from vlp.trainer.reporting import read_jsonl

    path = stage_dir / "eval.jsonl"
    return read_jsonl(path) if path.is_file() else []


def _read_results(out_dir: Path) -> dict:
    path = out_dir / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# -- evaluate ----------------------------------------------------------------------------

def load_run(run_dir, *, device: str = "cpu"):
    """``(config, model)`` of a finetune run folder, the model holding ``best.pt``'s weights."""
    from vlp.trainer.data import load_tokenizer

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE}; not a vlp-train finetune run folder")
    config = FinetuneConfig.from_dict(read_yaml(run_dir / CONFIG_FILE), run_dir / CONFIG_FILE)
    best_path = run_dir / BEST_CHECKPOINT
    if not best_path.is_file():
        raise FileNotFoundError(f"{best_path}: no best checkpoint yet (the run has not been evaluated on its "
                                "validation split: let it finish or reach eval_every)")
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    if best.get("format") != BEST_FORMAT:
        raise ValueError(f"{best_path}: not a vlp-train finetune checkpoint")
    tokenizer = load_tokenizer(config.model.vocab or config.model.text_checkpoint)
    task = make_task(config, best["task"]["labels"])
    model = build_model(config, task, tokenizer)
    model.load_state_dict(best["model"])
    model.to(device)
    model.best = {k: best[k] for k in ("step", "metric", "value")}
    model.tokenizer = tokenizer
    return config, model


def evaluate_run(run_dir, pairs_dir, features_dir, *, split=("test",), predictions=None, device: str = "cpu",
                 batch_size: Optional[int] = None, shortlist: Optional[int] = None, num_workers: int = 1,
                 progress: str = "off") -> dict:
    """Score ``best.pt`` of ``run_dir`` on the ``split`` pairs of ``pairs_dir``; records the
    metrics in RUN_DIR/results.json (under ``evaluations``, by pair store and split) and
    RUN_DIR/results.md; ``predictions``: also write the per-item predictions there in the
    task's official format. Returns the evaluation's entry. Retrieval only: ``shortlist`` K
    (first-stage shortlist, overrides task.shortlist), ``num_workers`` (Ray workers scoring the
    N x M pairs), ``progress`` (the scoring's progress display)."""
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.downstream import evaluate_task

    run_dir = Path(run_dir)
    config, model = load_run(run_dir, device=device)
    task = model.task
    pairs = PairStore(pairs_dir)
    wanted = FINETUNE_TASKS[task.key]
    if pairs.kind != wanted:
        raise ValueError(f"{pairs_dir}: holds {pairs.kind} pairs; the run's task {task.key} needs {wanted} pairs")
    features = FeatureStore(features_dir)
    split = [split] if isinstance(split, str) else (list(split) if split else None)
    dataset = task_dataset(config, task, pairs, features, model.tokenizer, split)
    if len(dataset) == 0:
        raise ValueError(f"{pairs_dir}: no pair of split {'/'.join(split or ['(all)'])} has features in {features_dir}")
    if task.key == "retrieval":
        task.shortlist = shortlist if shortlist is not None else task.shortlist
        task.num_workers, task.progress = num_workers, progress
    metrics, rows, predicted = evaluate_task(model, dataset, batch_size=batch_size or config.task.eval_batch_size)
    entry = {"pairs": str(pairs_dir), "features": str(features_dir), "split": "/".join(split) if split else "all",
             "best_step": model.best["step"], "metrics": metrics, "skipped_pairs": dataset.skipped}
    if predictions is not None:
        from vlp.trainer.metrics import write_predictions

        prediction_rows = [task.prediction_row(p, a) for p, a in zip(rows, predicted)]
        if hasattr(task, "write_predictions"):  # retrieval: ranked image ids per caption
            written = task.write_predictions(prediction_rows, predictions)
        else:
            written = write_predictions(task.key, prediction_rows, predictions)
        entry["predictions"] = str(written)
    results = _read_results(run_dir)
    results.setdefault("task", task.key)
    results.setdefault("main_metric", task.main_metric)
    results.setdefault("evaluations", {})[f"{Path(pairs_dir).name}:{entry['split']}"] = entry
    atomic_write_json(run_dir / RESULTS_FILE, results, indent=1)
    atomic_write_text(run_dir / RESULTS_TABLE, results_markdown(results))
    return entry


def results_markdown(results: dict) -> str:
    """The markdown table of a run's results (:func:`vlp.trainer.metrics.results_table`):
    the best validation step and every later evaluation, one row each."""
    from vlp.trainer.metrics import results_table

    task = str(results.get("task"))
    rows: dict = {}
    best = results.get("best")
    if best:
        rows[f"validation (best step {best['step']})"] = best["metrics"]
    for name, entry in (results.get("evaluations") or {}).items():
        rows[name] = entry["metrics"]
    return results_table({task: rows}) if rows else ""
