"""Multi-stage pretraining from a YAML config.

A config names the model, the feature store and a list of stages; each stage has its
own pair store, tasks with weights and optimisation settings (the fields of
:class:`~vlp.trainer.pretrain.StageConfig`)::

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
checkpoint (bit-exact on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

from vlp.trainer.pretrain import StageConfig

STAGE_KEYS = {f.name for f in dataclasses.fields(StageConfig)}
SOURCE_KEYS = {"name", "pairs", "features", "tasks", "ratio", "hard_negatives", "hard_negative_top",
               "max_text_len", "max_regions", "append_labels", "split"}
STAGE_DATA_KEYS = (SOURCE_KEYS - {"name", "tasks", "ratio"}) | {"sources"}
EVAL_KEYS = {"pairs", "features", "batch_size", "max_batches", "retrieval_images", "max_text_len",
             "max_regions", "split"}
DATA_KEYS = {"features", "max_text_len", "max_regions"}
# whole numbers wherever they appear (data, eval, a stage or one of its sources)
COUNT_KEYS = {"max_text_len", "max_regions", "append_labels", "hard_negative_top", "batch_size", "max_batches",
              "retrieval_images"}


def load_config(path) -> dict:
    """Read a YAML (or JSON) schedule config and check its shape; errors name the key."""
    import yaml

    path = Path(path)
    config = yaml.safe_load(path.read_text())
    validate_config(config, where=str(path))
    return config


def source_specs(stage: dict) -> list[dict]:
    """The data sources of a stage config: its ``sources`` list, or the one source given
    by its own ``pairs`` (+ hard_negatives, ...) keys."""
    if stage.get("sources"):
        return [dict(spec, name=spec.get("name") or f"source{k + 1}") for k, spec in enumerate(stage["sources"])]
    return [{"name": "pairs", **{k: v for k, v in stage.items() if k in SOURCE_KEYS - {"name", "tasks", "ratio"}}}]


def validate_config(config: dict, where: str = "config") -> None:
    from vlp.trainer.data import mixing_probabilities
    from vlp.trainer.tasks import make_task, make_tasks

    if not isinstance(config, dict):
        raise ValueError(f"{where}: the config must be a mapping")
    unknown = set(config) - {"model", "data", "stages", "seed", "eval"}
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{where}: seed must be a non-negative whole number, got {seed!r}")
    data = config.get("data") or {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: data must be a mapping")
    bad = set(data) - DATA_KEYS
    if bad:
        raise ValueError(f"{where}: data: unknown key(s): {', '.join(sorted(bad))} (known: {', '.join(sorted(DATA_KEYS))})")
    _check_counts(data, f"{where}: data")
    model = config.get("model") or {}
    bad = set(model) - {"architecture", "text_checkpoint", "vocab", "visual", "bert", "lxmert"}
    if bad:
        raise ValueError(f"{where}: model: unknown key(s): {', '.join(sorted(bad))}")
    if not model.get("text_checkpoint") and not model.get("vocab"):
        raise ValueError(f"{where}: model needs text_checkpoint (a BERT directory) or vocab")
    _check_model_options(model, f"{where}: model")
    evaluation = config.get("eval")
    if evaluation is not None:
        if not isinstance(evaluation, dict) or not evaluation.get("pairs"):
            raise ValueError(f"{where}: eval needs pairs (a held-out pair store directory)")
        bad = set(evaluation) - EVAL_KEYS
        if bad:
            raise ValueError(f"{where}: eval: unknown key(s): {', '.join(sorted(bad))}")
        _check_counts(evaluation, f"{where}: eval")
        _check_split(evaluation, f"{where}: eval")
    stages = config.get("stages")
    if not stages:
        raise ValueError(f"{where}: stages: at least one stage is required")
    names = []
    for i, stage in enumerate(stages):
        label = f"{where}: stages[{i}]"
        if not stage.get("tasks"):
            raise ValueError(f"{label}: tasks are required")
        bad = set(stage) - STAGE_KEYS - STAGE_DATA_KEYS
        if bad:
            raise ValueError(f"{label}: unknown key(s): {', '.join(sorted(bad))}")
        if stage.get("sources"):
            shared = sorted(set(stage) & (STAGE_DATA_KEYS - {"sources"}))
            if shared:
                raise ValueError(f"{label}: with sources, {', '.join(shared)} belong(s) on each source, "
                                 "not on the stage")
        try:
            StageConfig(**{k: v for k, v in stage.items() if k in STAGE_KEYS})
            stage_tasks = [t.name for t in make_tasks(stage["tasks"])]
        except (TypeError, ValueError) as error:
            raise ValueError(f"{label}: {error}") from None
        specs = source_specs(stage)
        for k, spec in enumerate(specs):
            where_source = f"{label}.sources[{k}]" if stage.get("sources") else label
            if not isinstance(spec, dict) or not spec.get("pairs"):
                raise ValueError(f"{where_source}: pairs (a pair store directory) is required")
            bad = set(spec) - SOURCE_KEYS
            if bad:
                raise ValueError(f"{where_source}: unknown key(s): {', '.join(sorted(bad))}")
            _check_counts(spec, where_source)
            _check_split(spec, where_source)
            ratio = spec.get("ratio")
            if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0):
                raise ValueError(f"{where_source}: ratio must be a positive number, got {ratio!r}")
            if not spec.get("features") and not (config.get("data") or {}).get("features"):
                raise ValueError(f"{where_source}: no feature store: set data.features or the source's features")
            try:
                wanted = [make_task(t).name for t in spec.get("tasks") or []]
            except ValueError as error:
                raise ValueError(f"{where_source}: {error}") from None
            missing = [t for t in wanted if t not in stage_tasks]
            if missing:
                raise ValueError(f"{where_source}: task(s) {missing} are not among the stage's tasks {stage_tasks}")
            if "ITM_HS" in (wanted or stage_tasks) and not spec.get("hard_negatives"):
                raise ValueError(f"{where_source}: ITM_HS needs hard_negatives (a pair store of kind "
                                 "hard_negatives, from vlp-build hard-negatives)")
        ratios = [spec.get("ratio") for spec in specs]
        if None in ratios and any(r is not None for r in ratios):
            try:
                mixing_probabilities(ratios, [1] * len(ratios))
            except ValueError as error:
                raise ValueError(f"{label}: {error}") from None
        names.append(stage.get("name", f"stage{i + 1}"))
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: stage names must be distinct: {names}")


def _check_model_options(model: dict, where: str) -> None:
    """Unknown keys under model.visual / model.bert / model.lxmert are typos, not options."""
    import inspect

    from transformers import BertConfig, LxmertConfig

    from vlp.trainer.lxmert import CrossModalEncoder
    from vlp.trainer.model import VisualConfig, tiny_bert_config

    def known_config_key(config_class, key):
        return hasattr(config_class(), key)

    def parameters(function):
        return {name for name, p in inspect.signature(function).parameters.items()
                if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)}

    for section in ("visual", "bert", "lxmert"):
        options = model.get(section)
        if options is None:
            continue
        if not isinstance(options, dict):
            raise ValueError(f"{where}.{section} must be a mapping")
        if section == "visual":
            known = {f.name for f in dataclasses.fields(VisualConfig)}
            bad = sorted(set(options) - known)
        elif section == "lxmert":
            known = parameters(CrossModalEncoder.make_config)
            bad = sorted(k for k in options if k not in known and not known_config_key(LxmertConfig, k))
        elif model.get("text_checkpoint"):  # overrides of the checkpoint's BertConfig
            known = set()
            bad = sorted(k for k in options if not known_config_key(BertConfig, k))
        else:  # a new small BERT: tiny_bert_config's names, or BertConfig's
            known = parameters(tiny_bert_config)
            bad = sorted(k for k in options if k not in known and not known_config_key(BertConfig, k))
        if bad:
            hint = ", ".join(sorted(known))
            if section != "visual":
                hint += (", or " if hint else "") + ("an LxmertConfig" if section == "lxmert" else "a BertConfig") + " field"
            raise ValueError(f"{where}.{section}: unknown key(s): {', '.join(bad)} (known: {hint})")
    try:
        VisualConfig(**(model.get("visual") or {}))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}.visual: {error}") from None


def check_stores(config: dict) -> None:
    """Open every store the config names, before anything is trained or written: a
    missing or wrong store, or a feature store whose feature size is not the model's
    ``visual.feature_dim``, is reported with its key."""
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.data import split_filter
    from vlp.trainer.model import VisualConfig

    feature_dim = VisualConfig(**(config["model"].get("visual") or {})).feature_dim
    data = config.get("data") or {}
    places = [("eval", config["eval"])] if config.get("eval") else []
    for i, stage in enumerate(config["stages"]):
        for k, spec in enumerate(source_specs(stage)):
            places.append((f"stages[{i}]" + (f".sources[{k}]" if stage.get("sources") else ""), spec))
    checked: set = set()
    for where, spec in places:
        for key, store_class in (("pairs", PairStore), ("hard_negatives", PairStore), ("features", FeatureStore)):
            path, label = spec.get(key), f"{where}.{key}"
            if not path and key == "features":
                path, label = data.get("features"), "data.features"
            if not path or (key, str(path), spec.get("split") if key == "pairs" else None) in checked:
                continue
            try:
                store = store_class(path)
            except Exception as error:  # the stores' own errors say what is wrong with the folder
                raise ValueError(f"{label}: {error}") from None
            if key == "hard_negatives" and store.kind != "hard_negatives":
                raise ValueError(f"{label}: {path} holds {store.kind} pairs, not hard_negatives "
                                 "(build it with vlp-build hard-negatives)")
            if key == "pairs" and spec.get("split") is not None:
                try:
                    split_filter(store, spec["split"])
                except ValueError as error:
                    raise ValueError(f"{where}.split: {error}") from None
            if key == "features" and store.feature_dim != feature_dim:
                raise ValueError(f"{label}: {path} holds {store.feature_dim}-d features, model.visual.feature_dim "
                                 f"is {feature_dim}: set model.visual.feature_dim: {store.feature_dim}")
            checked.add((key, str(path), spec.get("split") if key == "pairs" else None))


def _check_split(spec: dict, where: str) -> None:
    split = spec.get("split")
    if split is not None and not (isinstance(split, str) and split or isinstance(split, list) and split
                                  and all(isinstance(x, str) and x for x in split)):
        raise ValueError(f"{where}: split must be a split name or a list of them (e.g. train), got {split!r}")


def _check_counts(spec: dict, where: str) -> None:
    for key in sorted(COUNT_KEYS & set(spec)):
        value, least = spec[key], 0 if key == "append_labels" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{where}: {key} must be a whole number of at least {least}, got {value!r}")


def build_tokenizer(config: dict):
    from vlp.trainer.data import load_tokenizer

    model = config["model"]
    return load_tokenizer(model.get("vocab") or model["text_checkpoint"])


def build_encoder(config: dict, tokenizer):
    """The encoder named by ``model`` (single-stream; ``architecture: lxmert_s`` for LXMERT-S)."""
    from vlp.trainer.model import SingleStreamEncoder, VisualConfig, tiny_bert_config

    model = config["model"]
    visual = VisualConfig(**(model.get("visual") or {}))
    architecture = model.get("architecture", "single_stream")
    if architecture == "lxmert_s":
        from vlp.trainer.lxmert import CrossModalEncoder

        return CrossModalEncoder.build(model, visual, tokenizer)
    if architecture != "single_stream":
        raise ValueError(f"model.architecture must be single_stream or lxmert_s, got {architecture!r}")
    if model.get("text_checkpoint"):
        encoder = SingleStreamEncoder.from_pretrained_text(model["text_checkpoint"], visual,
                                                           **(model.get("bert") or {}))
    else:
        encoder = SingleStreamEncoder(tiny_bert_config(len(tokenizer), **(model.get("bert") or {})), visual)
    if encoder.word_embeddings.num_embeddings < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary "
                         f"{encoder.word_embeddings.num_embeddings}")
    return encoder


def _stage_dir(out_dir: Path, index: int, name: str) -> Path:
    return out_dir / f"{index + 1:02d}-{name}"


def _final_state(stage_dir: Path) -> Optional[dict]:
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


def _dataset(spec: dict, config: dict, stores: _Stores, tokenizer, box_dims: int, seed: int):
    from vlp.trainer.data import PairDataset

    data = config.get("data") or {}
    hard = stores.pairs(spec["hard_negatives"]) if spec.get("hard_negatives") else None
    return PairDataset(stores.pairs(spec["pairs"]), stores.features(spec.get("features") or data["features"]),
                       tokenizer, max_text_len=int(spec.get("max_text_len", data.get("max_text_len", 40))),
                       max_regions=spec.get("max_regions", data.get("max_regions")), box_dims=box_dims,
                       hard_negatives=hard, hard_negative_top=int(spec.get("hard_negative_top", 5)),
                       seed=seed, append_labels=int(spec.get("append_labels", 0)), split=spec.get("split"))


def _evaluator(config: dict, stores: _Stores, tokenizer, box_dims: int):
    """A callable model -> metrics on the config's held-out pairs (``eval:``), or None."""
    spec = config.get("eval")
    if not spec:
        return None
    from vlp.trainer.evaluation import evaluate_during_training

    dataset = _dataset(spec, config, stores, tokenizer, box_dims, seed=0)
    options = dict(batch_size=int(spec.get("batch_size", 64)), max_batches=spec.get("max_batches", 20),
                   retrieval_images=int(spec.get("retrieval_images", 100)), prefix="")
    return lambda model: evaluate_during_training(model, dataset, **options)


def stage_trainer(config: dict, index: int, out_dir, *, encoder, tokenizer, stores: Optional[_Stores] = None,
                  previous_state: Optional[dict] = None, device: str = "cpu", rank: int = 0,
                  world_size: int = 1, progress: str = "off", step_offset: int = 0):
    """The :class:`Pretrainer` of stage ``index`` (heads of shared tasks handed over from
    ``previous_state``), resumed from its directory's last checkpoint when there is one.
    Returns ``(trainer, carried_heads)``."""
    from vlp.trainer.data import DataSource
    from vlp.trainer.pretrain import Pretrainer
    from vlp.trainer.tasks import PretrainModel, TaskContext, make_task, make_tasks

    stores = stores or _Stores()
    raw = dict(config["stages"][index])
    name = raw.setdefault("name", f"stage{index + 1}")
    raw.setdefault("seed", int(config.get("seed", 0)))  # a stage may set its own
    stage = StageConfig(**{k: v for k, v in raw.items() if k in STAGE_KEYS})
    torch.manual_seed(stage.seed + index)  # new heads: the same init in a fresh or a resumed run
    model = PretrainModel(encoder, make_tasks(stage.tasks), TaskContext.from_tokenizer(tokenizer))
    carried = hand_over(model, previous_state) if previous_state is not None else []
    sources = []
    for k, spec in enumerate(source_specs(raw)):
        dataset = _dataset(spec, config, stores, tokenizer, encoder.visual.box_dims, seed=stage.seed + k)
        sources.append(DataSource(spec["name"], dataset, tuple(make_task(t).name for t in spec.get("tasks") or ()),
                                  spec.get("ratio")))
    stage_dir = _stage_dir(Path(out_dir), index, name)
    trainer = Pretrainer(model, sources, stage, stage_dir, device=device, rank=rank, world_size=world_size,
                         evaluator=_evaluator(config, stores, tokenizer, encoder.visual.box_dims) if rank == 0 else None,
                         progress=progress, step_offset=step_offset)
    if (stage_dir / "last.json").is_file():
        trainer.load_checkpoint(stage_dir)
    return trainer, carried


def run_stages(config: dict, out_dir, *, device: str = "cpu", stop_after_steps: Optional[int] = None,
               num_workers: int = 1, progress: str = "off", rank: int = 0, world_size: int = 1,
               should_stop=None) -> list[dict]:
    """Run every stage of ``config`` in order; returns one summary per stage.

    ``stop_after_steps``: stop the whole run after this many optimizer steps (tests /
    preemption drills); a later call resumes. ``should_stop()``: asked after every
    optimizer step (single process); when true, the stage writes a checkpoint and the run
    stops there, to be resumed. ``num_workers > 1``: data-parallel on that
    many Ray Train workers (:func:`vlp.trainer.distributed.run_distributed`).
    ``rank``/``world_size`` are set by those workers.
    """
    if num_workers > 1:
        from vlp.trainer.distributed import run_distributed

        return run_distributed(config, out_dir, num_workers=num_workers, device=device,
                               stop_after_steps=stop_after_steps, progress=progress)
    validate_config(config)
    check_stores(config)
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(config)
    stores = _Stores()
    torch.manual_seed(int(config.get("seed", 0)))
    encoder = build_encoder(config, tokenizer)
    previous_state: Optional[dict] = None
    summaries = []
    budget = stop_after_steps
    step_offset = 0  # optimizer steps of the earlier stages (one time axis in TensorBoard)
    for index, raw in enumerate(config["stages"]):
        name = raw.get("name", f"stage{index + 1}")
        stage_dir = _stage_dir(out_dir, index, name)
        finished = _final_state(stage_dir)
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
                          "last_loss": history[-1]["loss"] if history else None, "history": history})
        if budget is not None:
            budget -= trainer.step - start
        if trainer.step < trainer.stage.steps:
            log.info("stage %s: stopped at step %d of %d", name, trainer.step, trainer.stage.steps)
            break
        previous_state = copy.deepcopy(trainer.model.state_dict())
        step_offset += trainer.step
    return summaries


def shipped_configs() -> dict[str, Path]:
    """The example configs shipped in vlp/trainer/configs, by name."""
    folder = Path(__file__).parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}
