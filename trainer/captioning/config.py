"""``vlp-train captioner`` configs, typed (:class:`CaptionerConfig`)::

    seed: 0
    model:                      CaptionerModelConfig (+ preset, vocab)
      preset: default           default (d 512, 3 + 3 layers) | tiny (tests); keys below override it
      vocab: demo               a vocab.txt or BERT directory; "demo": the shipped demo vocabulary
      feature_dim: 2048         box_dims, hidden_size, encoder_layers, decoder_layers, heads,
                                intermediate_size, dropout, max_regions, max_caption_len
    data:
      pairs: PAIRS              caption pair store (COCO Karpathy import: splits train/val/test)
      features: FEATURES        its feature store
      train_split: train        val_split: val   test_split: test   (a name or a list)
    xe:    {steps | epochs, batch_size, lr, schedule, warmup_*, eval_every, checkpoint_every, ...}
    scst:  {same keys, plus samples: 5, max_images ...}    optional: no scst: XE only
    eval:  {max_images: 500, decoding: greedy, beam_size: 3}

``xe`` and ``scst`` are :class:`~vlp.trainer.config.StageConfig` settings (the training
loop's), without tasks or sources. Errors are ConfigErrors naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from vlp.trainer.config import (ConfigError, StageConfig, _kind, _mapping, _path, _ReadFromFile, _split,
                                _unknown, _vocab_path, read_yaml)
from vlp.trainer.captioning.model import PRESETS, CaptionerModelConfig

TOP_LEVEL_KEYS = ("seed", "model", "data", "xe", "scst", "eval")
_STAGE_KEYS = tuple(f.name for f in dataclasses.fields(StageConfig)
                    if f.name not in ("name", "tasks", "sources", "text_mask_prob", "region_mask_prob"))


def shipped_captioner_configs() -> dict:
    folder = Path(__file__).parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


@dataclasses.dataclass
class CaptionDataConfig:
    pairs: str
    features: str
    train_split: Optional[tuple] = ("train",)
    val_split: Optional[tuple] = ("val",)
    test_split: Optional[tuple] = ("test",)

    @classmethod
    def from_dict(cls, raw, where: str) -> "CaptionDataConfig":
        raw = _mapping(raw, where)
        _unknown(raw, [f.name for f in dataclasses.fields(cls)], where)
        for key in ("pairs", "features"):
            if not raw.get(key):
                raise ConfigError(f"{where}: {key} is required (a {'pair' if key == 'pairs' else 'feature'} "
                                  "store folder)")
        splits = {k: _split(raw[k], f"{where}.{k}") for k in ("train_split", "val_split", "test_split") if k in raw}
        return cls(pairs=_path(raw["pairs"], where, "pairs"), features=_path(raw["features"], where, "features"),
                   **splits)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class CaptionEvalConfig:
    max_images: int = 500
    decoding: str = "greedy"
    beam_size: int = 3
    batch_size: int = 64

    @classmethod
    def from_dict(cls, raw, where: str) -> "CaptionEvalConfig":
        raw = _mapping(raw, where)
        _unknown(raw, [f.name for f in dataclasses.fields(cls)], where)
        out = cls(**raw)
        for key in ("max_images", "beam_size", "batch_size"):
            value = getattr(out, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {key} must be a whole number of at least 1, got {value!r}")
        if out.decoding not in ("greedy", "beam"):
            raise ConfigError(f"{where}: decoding must be greedy or beam, got {out.decoding!r}")
        return out


def _stage(raw, where: str, name: str, seed: int, extra: dict) -> tuple[StageConfig, dict]:
    raw = _mapping(raw, where)
    _unknown(raw, list(_STAGE_KEYS) + list(extra), where)
    options = {k: raw.get(k, v) for k, v in extra.items()}
    settings = {k: v for k, v in raw.items() if k in _STAGE_KEYS}
    settings.setdefault("seed", seed)
    try:
        stage = StageConfig(name=name, tasks=["SCST" if name == "scst" else "CAPTION_XE"], **settings)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None
    return stage, options


SCST_OPTIONS = {"samples": 5, "max_images": 0}


@dataclasses.dataclass
class CaptionerConfig(_ReadFromFile):
    model: CaptionerModelConfig
    data: CaptionDataConfig
    xe: StageConfig
    vocab: str = "demo"
    preset: str = "default"
    scst: Optional[StageConfig] = None
    scst_options: dict = dataclasses.field(default_factory=lambda: dict(SCST_OPTIONS))
    eval: CaptionEvalConfig = dataclasses.field(default_factory=CaptionEvalConfig)
    seed: int = 0
    path: Optional[str] = dataclasses.field(default=None, compare=False)

    @classmethod
    def _parse(cls, config, where: str, path) -> "CaptionerConfig":
        if isinstance(config, CaptionerConfig):
            return config
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: the config must be a mapping (model, data, xe, scst, eval), "
                              f"got {_kind(config)}")
        _unknown(config, TOP_LEVEL_KEYS, where)
        seed = config.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{where}: seed must be a non-negative whole number, got {seed!r}")
        raw_model = dict(_mapping(config.get("model"), f"{where}: model"))
        preset = raw_model.pop("preset", "default")
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"{where}: model.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        vocab = raw_model.pop("vocab", "demo")
        if not isinstance(vocab, str) or not vocab:
            raise ConfigError(f"{where}: model.vocab must be a vocab.txt path, a BERT folder or demo, got {vocab!r}")
        _unknown(raw_model, [f.name for f in dataclasses.fields(CaptionerModelConfig)], f"{where}: model")
        try:
            model = CaptionerModelConfig(**{**PRESETS[preset], **raw_model})
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}: model: {error}") from None
        if config.get("data") is None:
            raise ConfigError(f"{where}: data: is required (pairs, features)")
        data = CaptionDataConfig.from_dict(config.get("data"), f"{where}: data")
        if config.get("xe") is None:
            raise ConfigError(f"{where}: xe: is required (steps or epochs, batch_size, lr, ...)")
        xe, _ = _stage(config.get("xe"), f"{where}: xe", "xe", seed, {})
        scst, options = None, dict(SCST_OPTIONS)
        if config.get("scst") is not None:
            scst, options = _stage(config.get("scst"), f"{where}: scst", "scst", seed, SCST_OPTIONS)
            samples = options["samples"]
            if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
                raise ConfigError(f"{where}: scst.samples must be a whole number of at least 2 (the baseline is "
                                  f"the mean reward of the other samples), got {samples!r}")
            limit = options["max_images"]
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ConfigError(f"{where}: scst.max_images must be a whole number (0: all), got {limit!r}")
        evaluation = CaptionEvalConfig.from_dict(config.get("eval"), f"{where}: eval")
        return cls(model=model, data=data, xe=xe, vocab=vocab, preset=preset, scst=scst, scst_options=options,
                   eval=evaluation, seed=seed, path=None if path is None else str(path))

    def to_dict(self) -> dict:
        def stage(s: StageConfig) -> dict:
            return {k: v for k, v in s.to_dict().items() if k in _STAGE_KEYS}

        out = {"seed": self.seed, "model": {"preset": self.preset, "vocab": self.vocab, **self.model.to_dict()},
               "data": self.data.to_dict(), "xe": stage(self.xe)}
        if self.scst is not None:
            out["scst"] = {**stage(self.scst), **self.scst_options}
        out["eval"] = dataclasses.asdict(self.eval)
        return out

    @property
    def stages(self) -> tuple:
        return (self.xe,) + ((self.scst,) if self.scst is not None else ())

    def stage_dir(self, out_dir, index: int) -> Path:
        from vlp.trainer.config import stage_folder

        return stage_folder(out_dir, index, self.stages[index].name)

    def vocab_path(self) -> str:
        return _vocab_path(self.vocab)

    def replace_stages(self, **changes) -> "CaptionerConfig":
        return dataclasses.replace(self, xe=dataclasses.replace(self.xe, **changes),
                                   scst=dataclasses.replace(self.scst, **changes) if self.scst else None)


def load_captioner_config(path) -> CaptionerConfig:
    return CaptionerConfig.from_dict(read_yaml(path), path)
