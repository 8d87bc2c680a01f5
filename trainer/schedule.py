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
STAGE_DATA_KEYS = {"pairs", "hard_negatives", "hard_negative_top", "max_text_len", "max_regions"}


def load_config(path) -> dict:
    """Read a YAML (or JSON) schedule config and check its shape; errors name the key."""
    import yaml

    path = Path(path)
    config = yaml.safe_load(path.read_text())
    validate_config(config, where=str(path))
    return config


def validate_config(config: dict, where: str = "config") -> None:
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the config must be a mapping")
    unknown = set(config) - {"model", "data", "stages", "seed"}
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    model = config.get("model") or {}
    if not model.get("text_checkpoint") and not model.get("vocab"):
        raise ValueError(f"{where}: model needs text_checkpoint (a BERT directory) or vocab")
    if not (config.get("data") or {}).get("features"):
        raise ValueError(f"{where}: data.features (a feature store directory) is required")
    stages = config.get("stages")
    if not stages:
        raise ValueError(f"{where}: stages: at least one stage is required")
    names = []
    for i, stage in enumerate(stages):
        label = f"{where}: stages[{i}]"
        if not stage.get("pairs"):
            raise ValueError(f"{label}: pairs (a pair store directory) is required")
        if not stage.get("tasks"):
            raise ValueError(f"{label}: tasks are required")
        bad = set(stage) - STAGE_KEYS - STAGE_DATA_KEYS
        if bad:
            raise ValueError(f"{label}: unknown key(s): {', '.join(sorted(bad))}")
        names.append(stage.get("name", f"stage{i + 1}"))
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: stage names must be distinct: {names}")


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


def _final_state(stage_dir: Path, steps: int) -> Optional[dict]:
    """The checkpoint state of a finished stage, or None."""
    import json

    pointer = stage_dir / "last.json"
    if not pointer.is_file():
        return None
    info = json.loads(pointer.read_text())
    if int(info["step"]) < steps:
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


def run_stages(config: dict, out_dir, *, device: str = "cpu", stop_after_steps: Optional[int] = None) -> list[dict]:
    """Run every stage of ``config`` in order; returns one summary per stage.

    ``stop_after_steps``: stop the whole run after this many optimizer steps (tests /
    preemption drills); a later call resumes.
    """
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.data import PairDataset
    from vlp.trainer.pretrain import Pretrainer
    from vlp.trainer.tasks import PretrainModel, TaskContext, make_tasks

    validate_config(config)
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(config)
    ctx = TaskContext.from_tokenizer(tokenizer)
    data = config["data"]
    features = FeatureStore(data["features"])
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    encoder = build_encoder(config, tokenizer)
    previous_state: Optional[dict] = None
    summaries = []
    budget = stop_after_steps
    for index, raw in enumerate(config["stages"]):
        raw = dict(raw)
        name = raw.setdefault("name", f"stage{index + 1}")
        stage = StageConfig(**{k: v for k, v in raw.items() if k in STAGE_KEYS})
        stage_dir = _stage_dir(out_dir, index, name)
        torch.manual_seed(stage.seed + index)  # new heads: the same init in a fresh or a resumed run
        model = PretrainModel(encoder, make_tasks(stage.tasks), ctx)
        carried = hand_over(model, previous_state) if previous_state is not None else []
        finished = _final_state(stage_dir, stage.steps)
        if finished is not None:
            model.load_state_dict(finished["model"])
            log.info("stage %s: already finished, skipped", name)
            summaries.append({"stage": name, "dir": str(stage_dir), "skipped": True, "carried_heads": carried})
            previous_state = finished["model"]
            continue
        pairs = PairStore(raw["pairs"])
        hard = PairStore(raw["hard_negatives"]) if raw.get("hard_negatives") else None
        dataset = PairDataset(pairs, features, tokenizer,
                              max_text_len=int(raw.get("max_text_len", data.get("max_text_len", 40))),
                              max_regions=raw.get("max_regions", data.get("max_regions")),
                              box_dims=encoder.visual.box_dims, hard_negatives=hard,
                              hard_negative_top=int(raw.get("hard_negative_top", 5)), seed=stage.seed)
        trainer = Pretrainer(model, dataset, stage, stage_dir, device=device)
        if (stage_dir / "last.json").is_file():
            trainer.load_checkpoint(stage_dir)
        start = trainer.step
        history = trainer.train(max_steps=budget)
        summaries.append({"stage": name, "dir": str(stage_dir), "skipped": False, "start_step": start,
                          "end_step": trainer.step, "carried_heads": carried,
                          "skipped_pairs": dataset.skipped, "history": history})
        if budget is not None:
            budget -= trainer.step - start
        if trainer.step < stage.steps:
            log.info("stage %s: stopped at step %d of %d", name, trainer.step, stage.steps)
            break
        previous_state = copy.deepcopy(model.state_dict())
    return summaries


def shipped_configs() -> dict[str, Path]:
    """The example configs shipped in vlp/trainer/configs, by name."""
    folder = Path(__file__).parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}
