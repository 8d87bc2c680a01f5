"""``vlp-train captioner``: XE then (optionally) SCST, each a stage of the one training loop.

A run folder holds::

    config.yaml        the config, normalised
    vocab.txt          the tokenizer's vocabulary (the model folder is self-contained)
    01-xe/ 02-scst/    the loop's stage folders: checkpoints, history.jsonl, eval.jsonl
                       (held-out CIDEr-D / BLEU-4 of greedy captions), tensorboard/
    captioner.pt       the final weights + model config (what generate-captions loads);
                       captioner-xe.pt: the weights after XE
    results.json       COCO caption metrics on the test split after each stage (xe, scst)

Resume: a stopped stage continues from its last checkpoint (exact, as in pretraining); a
finished stage is skipped and its final weights carried into the next.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

from vlp.core.durable import atomic_write, atomic_write_json
from vlp.trainer.captioning.config import CaptionerConfig
from vlp.trainer.schedule import finished_stage_state

log = logging.getLogger(__name__)

MODEL_FILE = "captioner.pt"
XE_MODEL_FILE = "captioner-xe.pt"
MODEL_FORMAT = "vlp-captioner"
RESULTS_FILE = "results.json"
VOCAB_FILE = "vocab.txt"


def check_captioner_stores(config: CaptionerConfig) -> None:
    """Open the stores before anything is written (ConfigError naming the key)."""
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.config import ConfigError
    from vlp.trainer.data import split_filter

    where = config.path or "config"
    try:
        pairs = PairStore(config.data.pairs)
    except Exception as error:
        raise ConfigError(f"{where}: data.pairs: {error}") from None
    if pairs.kind not in ("caption", "generated"):
        raise ConfigError(f"{where}: data.pairs: {config.data.pairs} holds {pairs.kind} pairs; the captioner "
                          "trains on caption pairs")
    for key in ("train_split", "val_split"):
        try:
            split_filter(pairs, list(getattr(config.data, key)) if getattr(config.data, key) else None)
        except ValueError as error:
            raise ConfigError(f"{where}: data.{key}: {error}") from None
    try:
        features = FeatureStore(config.data.features)
    except Exception as error:
        raise ConfigError(f"{where}: data.features: {error}") from None
    if features.feature_dim != config.model.feature_dim:
        raise ConfigError(f"{where}: data.features: {config.data.features} holds {features.feature_dim}-d features, "
                          f"model.feature_dim is {config.model.feature_dim}: set model.feature_dim: "
                          f"{features.feature_dim}")
    try:
        from vlp.trainer.data import load_tokenizer

        load_tokenizer(config.vocab_path())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{where}: model.vocab: {error}") from None


def build_net(model_config, tokenizer, seed: int = 0):
    from vlp.trainer.captioning.model import CaptionerNet, Tokens

    torch.manual_seed(seed)
    return CaptionerNet(model_config, Tokens.from_tokenizer(tokenizer))


def save_model(path: Path, net, config: CaptionerConfig, stage: str, step: int) -> None:
    state = {"format": MODEL_FORMAT, "version": 1, "stage": stage, "step": int(step),
             "model_config": net.config.to_dict(), "preset": config.preset,
             "state": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    atomic_write(path, lambda handle: torch.save(state, handle))


def evaluate_images(net, tokenizer, dataset, references: dict, *, batch_size: int = 64, decoding: str = "greedy",
                    beam_size: int = 3, device="cpu", full: bool = False) -> tuple[dict, dict]:
    """Captions of the images of ``dataset`` (one example per image) and their metrics:
    ``full``: every COCO metric (:func:`caption_metrics`), else CIDEr-D and BLEU-4 in Python."""
    from vlp.trainer.captioning.model import decode, texts
    from vlp.trainer.data import Collator, to_device

    was_training = net.training
    net.eval()
    collate = Collator(tokenizer.pad_token_id)
    predictions: dict = {}
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset.example(i) for i in range(start, min(len(dataset), start + batch_size))])
            batch = to_device(batch, device)
            seqs, _ = decode(net, *net.batch_inputs(batch), decoding=decoding, beam_size=beam_size)
            predictions.update(zip(batch["image_id"], texts(tokenizer, seqs)))
    finally:
        net.train(was_training)
    return score_predictions(predictions, references, full=full), predictions


def score_predictions(predictions: dict, references: dict, *, full: bool = False) -> dict:
    if full:
        from vlp.trainer.captioning.metrics import caption_metrics

        return caption_metrics(predictions, references)
    from pycocoevalcap.bleu.bleu import Bleu

    from vlp.trainer.captioning.cider import corpus_cider_d, simple_tokens

    ids = list(predictions)
    res = {k: [" ".join(simple_tokens(predictions[k]))] for k in ids}
    gts = {k: [" ".join(simple_tokens(r)) for r in references[k]] for k in ids}
    cider, _ = corpus_cider_d({k: v[0] for k, v in res.items()}, gts) if len(ids) > 1 else (0.0, {})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr-D": float(cider), "BLEU-4": float(bleu[3]), "n": len(ids)}


def train_captioner(config: CaptionerConfig, out_dir, *, device: str = "cpu", progress: str = "off",
                    stop_after_steps: Optional[int] = None, should_stop=None, evaluate_test: bool = True,
                    rank: int = 0, world_size: int = 1) -> list[dict]:
    """Run the XE stage, then SCST when configured; returns one summary per stage.

    ``rank``/``world_size``: this process's place in a DDP group (:func:`run_distributed_captioner`):
    rank 0 alone writes the run folder and evaluates; the others train and wait."""
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.captioning.task import (SCST, CaptionModel, CaptionXE, ImageDataset, make_scorer,
                                             references_by_image)
    from vlp.trainer.data import DataSource, PairDataset, load_tokenizer
    from vlp.trainer.pretrain import Pretrainer
    from vlp.trainer.schedule import hand_over
    from vlp.trainer.tasks import TaskContext

    from vlp.trainer.pretrain import _Distributed

    check_captioner_stores(config)
    out_dir = Path(out_dir)
    lead = rank == 0
    group = _Distributed(rank, world_size)
    vocab = Path(config.vocab_path())
    vocab_file = vocab / "vocab.txt" if vocab.is_dir() else vocab
    if lead:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / VOCAB_FILE).is_file():
            shutil.copyfile(vocab_file, out_dir / VOCAB_FILE)
    tokenizer = load_tokenizer(vocab_file)
    ctx = TaskContext.from_tokenizer(tokenizer)
    pairs, features = PairStore(config.data.pairs), FeatureStore(config.data.features)
    data, mc = config.data, config.model
    common = dict(max_text_len=mc.max_caption_len + 2, max_regions=mc.max_regions, box_dims=mc.box_dims)
    train_refs = references_by_image(pairs, data.train_split)
    val_refs = references_by_image(pairs, data.val_split)
    val_images = ImageDataset(pairs, features, tokenizer, split=list(data.val_split) if data.val_split else None,
                              max_images=config.eval.max_images, **common)
    net = build_net(mc, tokenizer, config.seed)
    summaries: list[dict] = []
    previous: Optional[dict] = None
    budget = stop_after_steps
    offset = 0
    results_path = out_dir / RESULTS_FILE
    for index, stage in enumerate(config.stages):
        stage_dir = config.stage_dir(out_dir, index)
        finished = finished_stage_state(stage_dir)
        resuming = (stage_dir / "last.json").is_file()  # read by every rank before any writes a checkpoint
        group.barrier()
        if finished is not None:
            summaries.append({"stage": stage.name, "dir": str(stage_dir), "skipped": True})
            previous = finished["model"]
            offset += int(finished["step"])
            continue
        if stage.name == "xe":
            task = CaptionXE()
            dataset = PairDataset(pairs, features, tokenizer, split=list(data.train_split) if data.train_split
                                  else None, seed=stage.seed, **common)
        else:
            task = SCST(scorer=make_scorer(train_refs), tokenizer=tokenizer, samples=config.scst_options["samples"])
            dataset = ImageDataset(pairs, features, tokenizer, split=list(data.train_split) if data.train_split
                                   else None, seed=stage.seed, max_images=config.scst_options["max_images"], **common)
        model = CaptionModel(net, task, ctx)
        if previous is not None:
            hand_over(model, previous)

        def evaluator(model_) -> dict:
            metrics, _ = evaluate_images(model_.encoder, tokenizer, val_images, val_refs,
                                         batch_size=config.eval.batch_size, decoding=config.eval.decoding,
                                         beam_size=config.eval.beam_size, device=device)
            return {k: v for k, v in metrics.items() if k != "n"}

        trainer = Pretrainer(model, [DataSource("train", dataset, (task.name,))], stage, stage_dir, device=device,
                             evaluator=evaluator, progress=progress, step_offset=offset, rank=rank,
                             world_size=world_size)
        if resuming:
            trainer.load_checkpoint(stage_dir)
        start = trainer.step
        try:
            history = trainer.train(max_steps=budget, should_stop=should_stop)
            if trainer.step < trainer.stage.steps and history:  # stopped early: resumable from here
                pointer = stage_dir / "last.json"
                if not pointer.is_file() or json.loads(pointer.read_text())["step"] != trainer.step:
                    trainer.save_checkpoint()
        finally:
            trainer.close()
        summary = {"stage": stage.name, "dir": str(stage_dir), "skipped": False, "start_step": start,
                   "end_step": trainer.step, "steps": trainer.stage.steps,
                   "last_loss": history[-1]["loss"] if history else None, "history": history}
        summaries.append(summary)
        if budget is not None:
            budget -= trainer.step - start
        if trainer.step < trainer.stage.steps:
            break
        net = model.encoder
        if lead:
            save_model(out_dir / MODEL_FILE, net, config, stage.name, trainer.step)
            if stage.name == "xe":
                shutil.copyfile(out_dir / MODEL_FILE, out_dir / XE_MODEL_FILE)
        if lead and evaluate_test and data.test_split:
            results = json.loads(results_path.read_text()) if results_path.is_file() else {}
            results[stage.name] = test_metrics(net, tokenizer, pairs, features, config, device=device)
            atomic_write_json(results_path, results, indent=1)
            summary["test"] = results[stage.name]
        group.barrier()
        previous = {k: v.detach().clone() for k, v in model.state_dict().items()}
        offset += trainer.step
    return summaries


def _captioner_worker_loop(settings: dict) -> None:
    import ray.train
    from ray.train.torch import get_device

    from vlp.trainer.distributed import SUMMARY_FILE

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(settings["threads"])))
    device = str(get_device()) if settings["use_gpu"] else "cpu"
    summaries = train_captioner(settings["config"], settings["out_dir"], device=device,
                                stop_after_steps=settings["stop_after_steps"], rank=rank, world_size=world_size,
                                evaluate_test=settings["evaluate_test"])
    if rank == 0:
        for summary in summaries:
            summary.pop("history", None)
        atomic_write_json(Path(settings["out_dir"]) / SUMMARY_FILE, summaries, indent=1)


def run_distributed_captioner(config: CaptionerConfig, out_dir, *, num_workers: int, device: str = "auto",
                              stop_after_steps: Optional[int] = None, address: Optional[str] = None,
                              cpus_per_worker: Optional[int] = None, progress: str = "off",
                              evaluate_test: bool = True) -> list[dict]:
    """:func:`train_captioner` on ``num_workers`` Ray Train DDP workers (as ``vlp-train pretrain
    --num-workers``: gloo on CPU, nccl on GPU; rank 0 writes and evaluates). The stage summaries
    come back without per-step history."""
    from vlp.trainer.distributed import _fit

    return _fit(_captioner_worker_loop, {"config": config, "stop_after_steps": stop_after_steps,
                                         "evaluate_test": evaluate_test}, config, out_dir, name="captioner",
                num_workers=num_workers, device=device, address=address, cpus_per_worker=cpus_per_worker,
                progress=progress)


def test_metrics(net, tokenizer, pairs, features, config: CaptionerConfig, *, device="cpu") -> dict:
    """Every COCO caption metric of greedy (or the eval section's) captions on the test split."""
    from vlp.trainer.captioning.task import ImageDataset, references_by_image

    mc = config.model
    try:
        dataset = ImageDataset(pairs, features, tokenizer, split=list(config.data.test_split),
                               max_text_len=mc.max_caption_len + 2, max_regions=mc.max_regions, box_dims=mc.box_dims)
    except ValueError as error:  # no pair of that split
        return {"error": str(error)}
    metrics, _ = evaluate_images(net, tokenizer, dataset, references_by_image(pairs, config.data.test_split),
                                 batch_size=config.eval.batch_size, decoding=config.eval.decoding,
                                 beam_size=config.eval.beam_size, device=device, full=True)
    metrics["split"] = "/".join(config.data.test_split)
    metrics["decoding"] = config.eval.decoding
    return metrics


def load_captioner(run_dir, *, device: str = "cpu"):
    """``(net, tokenizer, info)`` of a captioner run folder (or a captioner.pt file beside
    its vocab.txt); ``info``: stage, step, sha256 of the weights file."""
    from vlp.schemas.shards import sha256_file
    from vlp.trainer.captioning.model import CaptionerModelConfig
    from vlp.trainer.data import load_tokenizer

    path = Path(run_dir)
    model_file = path / MODEL_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: no captioner weights (a vlp-train captioner run folder has "
                                f"{MODEL_FILE} once its XE stage finished)")
    vocab = model_file.parent / VOCAB_FILE
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab}: the captioner's vocabulary is missing")
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{model_file}: cannot read captioner weights ({error})") from None
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise ValueError(f"{model_file}: not a vlp captioner file")
    tokenizer = load_tokenizer(vocab)
    try:
        net = build_net(CaptionerModelConfig(**state["model_config"]), tokenizer)
        net.load_state_dict(state["state"])
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"{model_file}: weights do not fit the model ({str(error).splitlines()[0]})") from None
    net.to(device).eval()
    info = {"file": str(model_file), "sha256": sha256_file(model_file), "stage": state.get("stage"),
            "step": state.get("step")}
    return net, tokenizer, info
