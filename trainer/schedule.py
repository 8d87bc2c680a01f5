"""Multi-stage pretraining from a YAML config.

A config names the model, the feature store and a list of stages; each stage has its
own pair store, tasks with weights and optimisation settings (the fields of
:class:`~vlp.trainer.config.StageConfig`; the whole file is a
:class:`~vlp.trainer.config.TrainConfig`)::

    model:
      text_checkpoint: /models/bert-base-uncased   # BERT dir: config.json, vocab.txt, weights
      # or, without a checkpoint: vocab: path/vocab.txt and bert: {hidden_size: 64, ...}
      visual: {feature_dim: 2048, box_dims: 5, region_positions: shared, image_token: false}
    data:
      features: /data/coco-features
      max_text_len: 40
      max_regions: 100
    stages:
      - name: labels
        pairs: /data/coco-objects-labels
        tasks: {MLM: 1.0, MOC: 1.0}
        steps: 20000
        batch_size: 256
        lr: 1.0e-4
      - name: captions
        pairs: /data/coco-captions
        hard_negatives: null          # a hard_negatives pair store for ITM_HS
        tasks: {MLM: 1.0, MOC: 1.0, ITM: 1.0}
        steps: 50000

Hand-over: stage k+1 starts from the encoder weights at the end of stage k; heads of
tasks that appear in both stages are carried over, new tasks get new heads; the
optimizer and schedule start afresh. Each stage writes to ``OUT/NN-name/``. Running the
same config again skips finished stages and resumes an unfinished one from its last
checkpoint (bit-exact on CPU). The run-folder rules (``--resume``, ``config.yaml``) and
the choice between this process and Ray workers are :mod:`vlp.trainer.runs`'.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional, Union

import torch

from vlp.trainer.config import (ConfigError, SourceConfig, StageConfig, TrainConfig, as_config, load_config,
                                validate_config)

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "StageConfig", "TrainConfig", "build_encoder", "build_tokenizer", "check_stores",
           "hand_over", "load_config", "run_stages", "shipped_configs", "source_specs", "stage_trainer",
           "validate_config"]


def source_specs(stage) -> list[SourceConfig]:
    """The data sources of a stage (a StageConfig of a TrainConfig, or a plain stage dict)."""
    if isinstance(stage, dict):
        stage = TrainConfig.from_dict({"model": {"vocab": "-"}, "data": {"features": "-"},
                                       "stages": [stage]}).stages[0]
    return list(stage.sources)


def check_stores(config: Union[TrainConfig, dict]) -> None:
    """Open every store the config names, before anything is trained or written: a
    missing or wrong store, or a feature store whose feature size is not the model's
    ``visual.feature_dim``, is reported with the config file and the key."""
    config = as_config(config)
    try:
        _check_stores(config)
    except ConfigError as error:
        raise ConfigError(f"{config.path}: {error}" if config.path else str(error)) from None


def _check_stores(config: TrainConfig) -> None:
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.data import split_filter

    feature_dim = config.model.visual_config().feature_dim
    places = [("eval", config.eval, None)] if config.eval is not None else []
    for i, stage in enumerate(config.stages):
        for k, spec in enumerate(stage.sources):
            places.append((f"stages[{i}]" + (f".sources[{k}]" if len(stage.sources) > 1 or spec.name != "pairs"
                                             else ""), spec, i))
    checked: set = set()
    for where, spec, stage_index in places:
        for key, store_class in (("pairs", PairStore), ("hard_negatives", PairStore), ("features", FeatureStore)):
            path, label = getattr(spec, key, None), f"{where}.{key}"
            if key == "features" and path == config.data.features:
                label = "data.features"
            identity = (key, str(path), spec.split if key == "pairs" else None)
            if not path or identity in checked:
                continue
            try:
                store = store_class(path)
            except Exception as error:  # the stores' own errors say what is wrong with the folder
                raise ConfigError(f"{label}: {error}") from None
            if key == "hard_negatives" and store.kind != "hard_negatives":
                raise ConfigError(f"{label}: {path} holds {store.kind} pairs, not hard_negatives "
                                  "(build it with vlp-build hard-negatives)")
            if key == "pairs" and spec.split is not None:
                try:
                    split_filter(store, list(spec.split))
                except ValueError as error:
                    raise ConfigError(f"{where}.split: {error}") from None
            if key == "features" and store.feature_dim != feature_dim:
                raise ConfigError(f"{label}: {path} holds {store.feature_dim}-d features, model.visual.feature_dim "
                                  f"is {feature_dim}: set model.visual.feature_dim: {store.feature_dim}")
            checked.add(identity)
        if stage_index is not None:
            try:
                check_class_distribution(spec, source_task_names(config.stages[stage_index], spec),
                                         FeatureStore(spec.features))
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None


def build_tokenizer(config: Union[TrainConfig, dict]):
    from vlp.trainer.data import load_tokenizer

    model = _model_config(config)
    return load_tokenizer(model.vocab or model.text_checkpoint)


def _model_config(config):
    """``model:`` of a TrainConfig, a FinetuneConfig or a plain pretraining dict."""
    return config.model if hasattr(config, "model") else as_config(config).model


def _data_config(config):
    """The ``data:`` section of a TrainConfig / FinetuneConfig (or of its dict form)."""
    return config.data if hasattr(config, "data") else as_config(config).data


def build_encoder(config: Union[TrainConfig, dict], tokenizer):
    """The encoder named by ``model`` (single-stream; ``architecture: lxmert_s`` for LXMERT-S,
    ``two_stream`` for the ViLBERT-style two-stream encoder)."""
    from vlp.trainer.model import SingleStreamEncoder, tiny_bert_config

    model = _model_config(config)
    visual = model.visual_config()
    if model.architecture == "lxmert_s":
        from vlp.trainer.lxmert import CrossModalEncoder

        return CrossModalEncoder.build(model.to_dict(), visual, tokenizer)
    if model.architecture == "two_stream":
        from vlp.trainer.two_stream import TwoStreamEncoder

        encoder = TwoStreamEncoder.build(model.to_dict(), visual, tokenizer)
    elif model.text_checkpoint:
        encoder = SingleStreamEncoder.from_pretrained_text(model.text_checkpoint, visual, **model.bert)
    else:
        encoder = SingleStreamEncoder(tiny_bert_config(len(tokenizer), **model.bert), visual)
    if visual.normalize_features:  # a checkpoint loaded later (resume, --init) brings its own
        from vlp.schemas import FeatureStore
        from vlp.trainer.data import feature_statistics

        encoder.set_feature_statistics(*feature_statistics(FeatureStore(_data_config(config).features)))
    if encoder.word_embeddings.num_embeddings < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary "
                         f"{encoder.word_embeddings.num_embeddings}")
    return encoder


def finished_stage_state(stage_dir: Path) -> Optional[dict]:
    """The checkpoint state of a finished stage, or None."""
    import json

    pointer = stage_dir / "last.json"
    if not pointer.is_file():
        return None
    info = json.loads(pointer.read_text())
    if int(info["step"]) < int(info["steps"]):
        return None
    return torch.load(stage_dir / info["checkpoint"], map_location="cpu", weights_only=True)


def hand_over(model, state: dict) -> list[str]:
    """Load the encoder and the heads of shared tasks from a previous stage's model state.

    Returns the names of the carried-over heads.
    """
    own = model.state_dict()
    encoder = {k: v for k, v in state.items() if k.startswith("encoder.")}
    missing = [k for k in own if k.startswith("encoder.") and k not in encoder]
    if missing:
        raise ValueError(f"the previous stage's model lacks {len(missing)} encoder tensor(s), e.g. {missing[0]}")
    carried = [name for name in model.heads if any(k.startswith(f"heads.{name}.") for k in state)]
    heads = {k: v for k, v in state.items() if any(k.startswith(f"heads.{n}.") for n in carried)}
    result = model.load_state_dict({**encoder, **heads}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected tensors in hand-over: {result.unexpected_keys[:3]}")
    return carried


class _Stores:
    """Feature and pair stores opened once per run (sources of several stages share them)."""

    def __init__(self):
        self._open: dict = {}

    def features(self, path):
        from vlp.schemas import FeatureStore

        key = ("features", str(path))
        if key not in self._open:
            self._open[key] = FeatureStore(path)
        return self._open[key]

    def pairs(self, path):
        from vlp.schemas.pairs import PairStore

        key = ("pairs", str(path))
        if key not in self._open:
            self._open[key] = PairStore(path)
        return self._open[key]


def _dataset(spec, stores: _Stores, tokenizer, box_dims: int, seed: int):
    """The PairDataset of a SourceConfig or EvalConfig (effective values already resolved)."""
    from vlp.trainer.data import PairDataset

    hard = stores.pairs(spec.hard_negatives) if getattr(spec, "hard_negatives", None) else None
    return PairDataset(stores.pairs(spec.pairs), stores.features(spec.features), tokenizer,
                       max_text_len=spec.max_text_len, max_regions=spec.max_regions, box_dims=box_dims,
                       hard_negatives=hard, hard_negative_top=getattr(spec, "hard_negative_top", 5),
                       seed=seed, append_labels=getattr(spec, "append_labels", 0),
                       split=list(spec.split) if spec.split else None,
                       answer_text=getattr(spec, "answer_text", False))


def source_task_names(stage, source) -> tuple:
    """The tasks a source trains: its own list, or else all of its stage's."""
    from vlp.trainer.tasks import make_tasks

    return tuple(source.tasks) or tuple(t.name for t in make_tasks(stage.tasks))


def check_class_distribution(spec, task_names, features) -> None:
    """MOC_KL's target is the detector's class distribution: a source that trains it on a
    store without ``cls_prob`` is refused (a silent fall-back to the top class would be
    another task than the config names)."""
    if "MOC_KL" in task_names and "cls_prob" not in features.fields:
        raise ConfigError(
            f"source {spec.name!r}: MOC_KL needs the detector's class distribution, and "
            f"{getattr(features, 'root', features)} has no cls_prob. Extract with "
            "`vlp-extract ... --set with_probs=true` (1601 float16 per region: about 3.2 KB, "
            "115 KB for a 36-region image), or train MOC (the top class) instead.")


def _evaluator(config: TrainConfig, stores: _Stores, tokenizer, box_dims: int):
    """A callable model -> metrics on the config's held-out pairs (``eval:``), or None."""
    spec = config.eval
    if spec is None:
        return None
    from vlp.trainer.evaluation import evaluate_during_training

    dataset = _dataset(spec, stores, tokenizer, box_dims, seed=0)
    options = dict(batch_size=spec.batch_size, max_batches=spec.max_batches,
                   retrieval_images=spec.retrieval_images, prefix="")
    return lambda model: evaluate_during_training(model, dataset, **options)


def stage_trainer(config: Union[TrainConfig, dict], index: int, out_dir, *, encoder, tokenizer,
                  stores: Optional[_Stores] = None, previous_state: Optional[dict] = None, device: str = "cpu",
                  rank: int = 0, world_size: int = 1, progress: str = "off", step_offset: int = 0):
    """The :class:`Pretrainer` of stage ``index`` (heads of shared tasks handed over from
    ``previous_state``), resumed from its directory's last checkpoint when there is one.
    Returns ``(trainer, carried_heads)``."""
    from vlp.trainer.data import DataSource
    from vlp.trainer.pretrain import Pretrainer
    from vlp.trainer.tasks import PretrainModel, TaskContext, make_tasks

    config = as_config(config)
    stores = stores or _Stores()
    stage = config.stages[index]
    torch.manual_seed(stage.seed + index)  # new heads: the same init in a fresh or a resumed run
    model = PretrainModel(encoder, make_tasks(stage.tasks), TaskContext.from_tokenizer(tokenizer))
    carried = hand_over(model, previous_state) if previous_state is not None else []
    sources = []
    for k, spec in enumerate(stage.sources):
        dataset = _dataset(spec, stores, tokenizer, encoder.visual.box_dims, seed=stage.seed + k)
        check_class_distribution(spec, source_task_names(stage, spec), dataset.features)
        sources.append(DataSource(spec.name, dataset, tuple(spec.tasks), spec.ratio))
    stage_dir = config.stage_dir(out_dir, index)
    trainer = Pretrainer(model, sources, stage, stage_dir, device=device, rank=rank, world_size=world_size,
                         evaluator=_evaluator(config, stores, tokenizer, encoder.visual.box_dims) if rank == 0 else None,
                         progress=progress, step_offset=step_offset)
    if (stage_dir / "last.json").is_file():
        trainer.load_checkpoint(stage_dir)
    return trainer, carried


def run_stages(config: Union[TrainConfig, dict], out_dir, *, device: str = "cpu",
               stop_after_steps: Optional[int] = None, progress: str = "off", rank: int = 0, world_size: int = 1,
               should_stop=None) -> list[dict]:
    """Run every stage of ``config`` in order in this process; returns one summary per stage.

    ``stop_after_steps``: stop the whole run after this many optimizer steps (tests /
    preemption drills); a later call resumes. ``should_stop()``: asked after every
    optimizer step (single process); when true, the stage writes a checkpoint and the run
    stops there, to be resumed. ``rank``/``world_size`` are set by the data-parallel
    workers of :func:`vlp.trainer.distributed.run_distributed`; several workers from one
    call: :func:`vlp.trainer.runs.train`.
    """
    config = as_config(config)
    check_stores(config)
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(config)
    stores = _Stores()
    torch.manual_seed(config.seed)
    encoder = build_encoder(config, tokenizer)
    previous_state: Optional[dict] = None
    summaries = []
    budget = stop_after_steps
    step_offset = 0  # optimizer steps of the earlier stages (one time axis in TensorBoard)
    for index, stage in enumerate(config.stages):
        name = stage.name
        stage_dir = config.stage_dir(out_dir, index)
        finished = finished_stage_state(stage_dir)
        if finished is not None:  # its weights reach the next stage through hand_over
            log.info("stage %s: already finished, skipped", name)
            summaries.append({"stage": name, "dir": str(stage_dir), "skipped": True})
            previous_state = finished["model"]
            step_offset += int(finished["step"])
            continue
        trainer, carried = stage_trainer(config, index, out_dir, encoder=encoder, tokenizer=tokenizer,
                                         stores=stores, previous_state=previous_state, device=device,
                                         rank=rank, world_size=world_size, progress=progress,
                                         step_offset=step_offset)
        start = trainer.step
        try:
            history = trainer.train(max_steps=budget, should_stop=should_stop)
        finally:
            trainer.close()
        summaries.append({"stage": name, "dir": str(stage_dir), "skipped": False, "start_step": start,
                          "end_step": trainer.step, "steps": trainer.stage.steps, "carried_heads": carried,
                          "skipped_pairs": {s.name: s.dataset.skipped for s in trainer.sources},
                          "last_loss": history[-1]["loss"] if history else None,
                          "source_losses": {n: r.value for n, r in trainer.running.items() if r.value is not None}
                          if len(trainer.sources) > 1 else {},
                          "history": history})
        if budget is not None:
            budget -= trainer.step - start
        if trainer.step < trainer.stage.steps:
            log.info("stage %s: stopped at step %d of %d", name, trainer.step, trainer.stage.steps)
            break
        previous_state = copy.deepcopy(trainer.model.state_dict())
        step_offset += trainer.step
    return summaries


def shipped_configs() -> dict[str, Path]:
    """The example pretraining configs shipped in vlp/trainer/configs, by name."""
    folder = Path(__file__).parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml")) if not p.stem.startswith("finetune-")}


def shipped_finetune_configs() -> dict[str, Path]:
    """The example finetune configs shipped in vlp/trainer/configs (``finetune-*.yaml``), by name."""
    folder = Path(__file__).parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("finetune-*.yaml"))}
