"""The trainer's configuration, typed: what a ``vlp-train`` YAML file may say, with its defaults.

A config file is read into a :class:`TrainConfig`::

    TrainConfig
      seed                     top-level seed; a stage without its own takes it
      model: ModelConfig       architecture, text_checkpoint or vocab, visual / bert / lxmert / two_stream options
      data:  DataConfig        features, max_text_len, max_regions: defaults of every source
      eval:  EvalConfig|None   held-out pairs for evaluation during training
      stages: [StageConfig]    optimisation settings + tasks + data sources
        sources: [SourceConfig]  pairs (+ features, split, hard negatives, ratio, own tasks)

Every default is the field default of its dataclass, and a source's effective values
(features, max_text_len, max_regions) are resolved from ``data`` when the config is
read, so the code that builds datasets reads one place. :meth:`TrainConfig.from_dict`
checks types, ranges and unknown keys and raises :class:`ConfigError` naming the file
(``path``) and the key path of the error (``stages[1].sources[0].ratio``);
:meth:`TrainConfig.to_dict` is the normalised plain form (every default written out),
which is what a run folder keeps as ``config.yaml``. :func:`load_config` adds reading the
file: YAML syntax errors name line and column, tags that would build Python objects are
refused, a file that is not UTF-8 is named.

Extending it (finetuning): a new section is a dataclass with a ``from_dict(data, where,
...)`` classmethod that raises ConfigError with ``where`` as the key path, plus a field of
:class:`TrainConfig` and a line in :data:`TOP_LEVEL_KEYS`.

This module imports neither torch nor transformers at import time; the checks of task
specs and model options load them when a config is read.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional, Union

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
ARCHITECTURES = ("single_stream", "lxmert_s", "two_stream")
TOP_LEVEL_KEYS = ("model", "data", "stages", "seed", "eval")
# whole numbers wherever they appear (data, eval, a stage or one of its sources)
COUNT_KEYS = {"max_text_len", "max_regions", "append_labels", "hard_negative_top", "batch_size", "max_batches",
              "retrieval_images"}


#: vocabularies shipped in vlp/trainer/vocab, by the name a config may give as model.vocab
SHIPPED_VOCABS = {"demo": "demo-vocab.txt"}
#: the folder the paths of configs/demo.yaml start with (``vlp demo``'s default --out)
DEMO_ROOT = "demo-out"
#: the config a run folder keeps (normalised, every default written out)
CONFIG_FILE = "config.yaml"


def shipped_vocab(name: str) -> Path:
    """The path of a shipped vocabulary (``demo``: the synthetic world's WordPiece vocabulary)."""
    return Path(__file__).parent / "vocab" / SHIPPED_VOCABS[name]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file (when known) and the key."""


# --- small checks ---------------------------------------------------------------------


def _unknown(given, known, where: str, *, hint: bool = True) -> None:
    bad = sorted(set(given) - set(known))
    if bad:
        more = f" (known: {', '.join(sorted(known))})" if hint else ""
        raise ConfigError(f"{where}: unknown key(s): {', '.join(map(str, bad))}{more}")


def _mapping(value, where: str, what: str = "a mapping") -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be {what}, got {_kind(value)}")
    return value


def _kind(value) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _checked_number(name: str, value, *, integer: bool):
    """``value`` as an int / float, or a ValueError naming the field (YAML reads ``1e-4``
    without a dot as a string, the most common slip)."""
    if isinstance(value, str):
        hint = ""
        try:
            float(value)
            hint = f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-4)"
        except ValueError:
            pass
        raise ValueError(f"{name} must be a number, got the string {value!r}{hint}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if integer:
        if value != int(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return value


def _check_counts(spec: dict, where: str) -> None:
    for key in sorted(COUNT_KEYS & set(spec)):
        value, least = spec[key], 0 if key == "append_labels" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"{where}: {key} must be a whole number of at least {least}, got {value!r}")


def _flag(value, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _split(value, where: str) -> Optional[tuple]:
    """A split name or a list of them, as a tuple (hashable); None: every pair."""
    if value is None:
        return None
    if isinstance(value, str) and value:
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(x, str) and x for x in value):
        return tuple(value)
    raise ConfigError(f"{where}: split must be a split name or a list of them (e.g. train), got {value!r}")


def _path(value, where: str, key: str) -> Optional[str]:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, Path)):
        raise ConfigError(f"{where}: {key} must be a folder path, got {_kind(value)}")
    return str(value)


_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f]")


def check_stage_name(name, where: str) -> str:
    """Stage names become folder names (``OUT/NN-name``): no path separators, no ``..``,
    no control characters, not empty."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}.name must be a non-empty string, got {name!r}")
    if _UNSAFE_NAME.search(name) or ".." in name or name.strip() != name:
        raise ConfigError(f"{where}.name {name!r} is not a safe folder name: use letters, digits, '-', '_' "
                          "or single dots (no '/', '\\', '..', control characters or surrounding spaces)")
    return name


def stage_folder(out_dir, index: int, name: str) -> Path:
    """The folder of stage ``index`` (0-based) of a run: ``OUT/NN-name``."""
    return Path(out_dir) / f"{index + 1:02d}-{name}"


# --- sections -----------------------------------------------------------------------


@dataclasses.dataclass
class DataConfig:
    """``data:``: defaults for every source (and ``eval``)."""

    features: Optional[str] = None  # the feature store of sources that do not name their own
    max_text_len: int = 40
    max_regions: Optional[int] = None  # None: every region of a record

    @classmethod
    def from_dict(cls, data, where: str = "data") -> "DataConfig":
        data = _mapping(data, where)
        _unknown(data, [f.name for f in dataclasses.fields(cls)], where)
        _check_counts(data, where)
        return cls(features=_path(data.get("features"), where, "features"),
                   max_text_len=data.get("max_text_len") or cls.max_text_len, max_regions=data.get("max_regions"))


@dataclasses.dataclass
class SourceConfig:
    """One data source of a stage: a pair store with its feature store; after
    :meth:`from_dict` every value is the effective one (``data:`` defaults filled in)."""

    name: str
    pairs: str
    features: str
    tasks: tuple = ()  # task names; () = all the stage's tasks
    ratio: Optional[float] = None  # mixing ratio (see vlp.trainer.data.mixing_probabilities)
    hard_negatives: Optional[str] = None  # a hard_negatives pair store (ITM_HS)
    hard_negative_top: int = 5
    max_text_len: int = 40
    max_regions: Optional[int] = None
    append_labels: int = 0  # LAMP: append up to N detector labels to the text
    split: Optional[tuple] = None  # keep only the pairs of these splits
    answer_text: bool = False  # question pairs: "question [SEP] a sampled answer" (Singh et al.'s VQA-P)

    KEYS = ("name", "pairs", "features", "tasks", "ratio", "hard_negatives", "hard_negative_top",
            "max_text_len", "max_regions", "append_labels", "split", "answer_text")

    @classmethod
    def from_dict(cls, spec, where: str, *, data: DataConfig, name: str, stage_tasks: list) -> "SourceConfig":
        from vlp.trainer.tasks import make_task

        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a mapping, got {_kind(spec)}")
        if not spec.get("pairs"):
            raise ConfigError(f"{where}: pairs (a pair store directory) is required")
        _unknown(spec, cls.KEYS, where, hint=False)
        _check_counts(spec, where)
        split = _split(spec.get("split"), where)
        ratio = spec.get("ratio")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0):
            raise ConfigError(f"{where}: ratio must be a positive number, got {ratio!r}")
        features = _path(spec.get("features"), where, "features") or data.features
        if not features:
            raise ConfigError(f"{where}: no feature store: set data.features or the source's features")
        tasks = spec.get("tasks") or []
        if not isinstance(tasks, list):
            raise ConfigError(f"{where}: tasks must be a list of task names, got {_kind(tasks)}")
        try:
            wanted = tuple(make_task(t).name for t in tasks)
        except (TypeError, ValueError, AttributeError) as error:
            raise ConfigError(f"{where}: {error}") from None
        missing = [t for t in wanted if t not in stage_tasks]
        if missing:
            raise ConfigError(f"{where}: task(s) {list(missing)} are not among the stage's tasks {stage_tasks}")
        hard = _path(spec.get("hard_negatives"), where, "hard_negatives")
        if "ITM_HS" in (wanted or stage_tasks) and not hard:
            raise ConfigError(f"{where}: ITM_HS needs hard_negatives (a pair store of kind "
                              "hard_negatives, from vlp-build hard-negatives)")
        source_name = spec.get("name") or name
        if not isinstance(source_name, str):
            raise ConfigError(f"{where}.name must be a string, got {_kind(source_name)}")
        return cls(name=source_name, pairs=_path(spec["pairs"], where, "pairs"), features=features, tasks=wanted,
                   ratio=ratio, hard_negatives=hard,
                   hard_negative_top=spec.get("hard_negative_top") or 5,
                   max_text_len=spec.get("max_text_len") or data.max_text_len,
                   max_regions=spec.get("max_regions", data.max_regions),
                   append_labels=spec.get("append_labels") or 0, split=split,
                   answer_text=_flag(spec.get("answer_text", False), where, "answer_text"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"], d["split"] = list(self.tasks), list(self.split) if self.split else None
        return d


@dataclasses.dataclass
class StageConfig:
    """One stage: tasks with weights, optimisation settings and (in a schedule) its sources."""

    name: str = "stage1"
    tasks: object = dataclasses.field(default_factory=lambda: ["MLM"])  # names, {name: weight} or dicts
    steps: int = 0  # optimizer steps; or:
    epochs: float = 0.0  # passes over all of the stage's batches (sources together)
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
    # a masked region's input: (zeros or [MASK] embedding, another region's features, kept)
    region_mask_split: tuple = (0.8, 0.1, 0.1)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: GPU only, with loss scaling)
    eval_every: int = 0  # optimizer steps between held-out evaluations (0: at the end only)
    sources: tuple = ()  # SourceConfig, in a schedule (a Pretrainer gets its data directly)

    def __post_init__(self):
        for name in _INT_FIELDS:
            setattr(self, name, _checked_number(name, getattr(self, name), integer=True))
        for name in _FLOAT_FIELDS:
            setattr(self, name, _checked_number(name, getattr(self, name), integer=False))
        for name in ("warmup_ratio", "text_mask_prob", "region_mask_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas!r}")
        self.betas = tuple(_checked_number("betas", b, integer=False) for b in self.betas)
        split = self.region_mask_split
        if not isinstance(split, (list, tuple)) or len(split) != 3:
            raise ValueError(f"region_mask_split must be three shares (zero, other region, kept), got {split!r}")
        split = tuple(_checked_number("region_mask_split", s, integer=False) for s in split)
        if min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"region_mask_split shares must be >= 0 and sum to 1, got {list(split)}")
        self.region_mask_split = split
        if self.lr <= 0 or self.eps <= 0:
            raise ValueError(f"lr and eps must be positive, got lr={self.lr}, eps={self.eps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if bool(self.steps) == bool(self.epochs):
            raise ValueError("give a stage either steps or epochs (one of them)")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        self.sources = tuple(self.sources)

    @property
    def warmup(self) -> int:
        return self.warmup_steps or int(round(self.warmup_ratio * self.steps))

    # keys of a schedule's stage that describe its single source (without ``sources:``)
    DATA_KEYS = tuple(k for k in SourceConfig.KEYS if k not in ("name", "tasks", "ratio"))

    @classmethod
    def from_dict(cls, raw, where: str, *, index: int, data: DataConfig, seed: int) -> "StageConfig":
        from vlp.trainer.tasks import make_tasks

        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping (name, tasks, pairs, steps, ...), got {_kind(raw)}")
        if not raw.get("tasks"):
            raise ConfigError(f"{where}: tasks are required")
        own = [f.name for f in dataclasses.fields(cls) if f.name != "sources"]
        _unknown(raw, set(own) | set(cls.DATA_KEYS) | {"sources"}, where, hint=False)
        sources = raw.get("sources")
        if sources is not None and not isinstance(sources, list):
            raise ConfigError(f"{where}.sources must be a list of sources, got {_kind(sources)}")
        if sources:
            shared = sorted(set(raw) & set(cls.DATA_KEYS))
            if shared:
                raise ConfigError(f"{where}: with sources, {', '.join(shared)} belong(s) on each source, "
                                  "not on the stage")
        name = check_stage_name(raw.get("name", f"stage{index + 1}"), where)
        settings = {k: v for k, v in raw.items() if k in own}
        settings.update(name=name, seed=raw.get("seed", seed))
        try:
            stage = cls(**settings)
            stage_tasks = [t.name for t in make_tasks(stage.tasks)]
        except (TypeError, ValueError, AttributeError) as error:
            raise ConfigError(f"{where}: {error}") from None
        if sources:
            specs = [(f"{where}.sources[{k}]", spec, f"source{k + 1}") for k, spec in enumerate(sources)]
        else:
            specs = [(where, {k: v for k, v in raw.items() if k in cls.DATA_KEYS}, "pairs")]
        parsed = tuple(SourceConfig.from_dict(spec, label, data=data, name=default, stage_tasks=stage_tasks)
                       for label, spec, default in specs)
        ratios = [s.ratio for s in parsed]
        if None in ratios and any(r is not None for r in ratios):
            from vlp.trainer.data import mixing_probabilities

            try:
                mixing_probabilities(ratios, [1] * len(ratios))
            except ValueError as error:
                raise ConfigError(f"{where}: {error}") from None
        names = [s.name for s in parsed]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: source names must be distinct: {names}")
        return dataclasses.replace(stage, sources=parsed)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sources"}
        d["betas"], d["region_mask_split"] = list(self.betas), list(self.region_mask_split)
        if self.sources:
            d["sources"] = [s.to_dict() for s in self.sources]
        return d


_INT_FIELDS = ("steps", "batch_size", "grad_accum", "warmup_steps", "checkpoint_every", "keep_checkpoints",
               "log_every", "seed", "bucket_batches", "num_workers", "eval_every")
_FLOAT_FIELDS = ("epochs", "lr", "weight_decay", "eps", "warmup_ratio", "clip_norm", "text_mask_prob",
                 "region_mask_prob")


@dataclasses.dataclass
class EvalConfig:
    """``eval:``: held-out pairs scored during training (task accuracies, zero-shot retrieval)."""

    pairs: str
    features: str
    batch_size: int = 64
    max_batches: Optional[int] = 20  # None: the whole held-out store
    retrieval_images: int = 100
    max_text_len: int = 40
    max_regions: Optional[int] = None
    split: Optional[tuple] = None

    @classmethod
    def from_dict(cls, spec, where: str = "eval", *, data: DataConfig) -> Optional["EvalConfig"]:
        if spec is None:
            return None
        if not isinstance(spec, dict) or not spec.get("pairs"):
            raise ConfigError(f"{where} needs pairs (a held-out pair store directory)")
        _unknown(spec, [f.name for f in dataclasses.fields(cls)], where, hint=False)
        _check_counts(spec, where)
        features = _path(spec.get("features"), where, "features") or data.features
        if not features:
            raise ConfigError(f"{where}: no feature store: set data.features or eval.features")
        return cls(pairs=_path(spec["pairs"], where, "pairs"), features=features,
                   batch_size=spec.get("batch_size") or 64, max_batches=spec.get("max_batches", 20),
                   retrieval_images=spec.get("retrieval_images") or 100,
                   max_text_len=spec.get("max_text_len") or data.max_text_len,
                   max_regions=spec.get("max_regions", data.max_regions), split=_split(spec.get("split"), where))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["split"] = list(self.split) if self.split else None
        return d


@dataclasses.dataclass
class ModelConfig:
    """``model:``: the encoder. ``text_checkpoint`` (a BERT directory: config.json,
    vocab.txt, weights) or ``vocab`` (a vocab.txt; a new small BERT from ``bert``)."""

    architecture: str = "single_stream"  # or lxmert_s, two_stream
    text_checkpoint: Optional[str] = None
    vocab: Optional[str] = None
    visual: dict = dataclasses.field(default_factory=dict)  # VisualConfig fields
    bert: dict = dataclasses.field(default_factory=dict)  # tiny_bert_config / BertConfig overrides
    lxmert: dict = dataclasses.field(default_factory=dict)  # CrossModalEncoder.make_config options
    two_stream: dict = dataclasses.field(default_factory=dict)  # TwoStreamConfig options (architecture two_stream)

    @classmethod
    def from_dict(cls, model, where: str = "model") -> "ModelConfig":
        model = _mapping(model, where)
        _unknown(model, [f.name for f in dataclasses.fields(cls)], where, hint=False)
        if not model.get("text_checkpoint") and not model.get("vocab"):
            raise ConfigError(f"{where} needs text_checkpoint (a BERT directory) or vocab")
        architecture = model.get("architecture", "single_stream")
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"{where}.architecture must be {' or '.join(ARCHITECTURES)}, got {architecture!r}")
        if model.get("two_stream") and architecture != "two_stream":
            raise ConfigError(f"{where}.two_stream: options of architecture two_stream (architecture is {architecture})")
        config = cls(architecture=architecture, text_checkpoint=_path(model.get("text_checkpoint"), where,
                                                                      "text_checkpoint"),
                     vocab=_vocab_path(_path(model.get("vocab"), where, "vocab")),
                     **{k: dict(_mapping(model.get(k), f"{where}.{k}")) for k in ("visual", "bert", "lxmert",
                                                                                   "two_stream")})
        config._check_options(where)
        return config

    def visual_config(self):
        from vlp.trainer.model import VisualConfig

        return VisualConfig(**self.visual)

    def _check_options(self, where: str) -> None:
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
            options = getattr(self, section)
            if section == "visual":
                known = {f.name for f in dataclasses.fields(VisualConfig)}
                bad = sorted(set(options) - known)
            elif section == "lxmert":
                known = parameters(CrossModalEncoder.make_config)
                bad = sorted(k for k in options if k not in known and not known_config_key(LxmertConfig, k))
            elif self.text_checkpoint:  # overrides of the checkpoint's BertConfig
                known = set()
                bad = sorted(k for k in options if not known_config_key(BertConfig, k))
            else:  # a new small BERT: tiny_bert_config's names, or BertConfig's
                known = parameters(tiny_bert_config)
                bad = sorted(k for k in options if k not in known and not known_config_key(BertConfig, k))
            if bad:
                hint = ", ".join(sorted(known))
                if section != "visual":
                    hint += (", or " if hint else "") + ("an LxmertConfig" if section == "lxmert"
                                                         else "a BertConfig") + " field"
                raise ConfigError(f"{where}.{section}: unknown key(s): {', '.join(map(str, bad))} (known: {hint})")
        try:
            self.visual_config()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}.visual: {error}") from None
        if self.architecture == "two_stream":
            from vlp.trainer.two_stream import TwoStreamConfig

            try:
                options = TwoStreamConfig.from_dict(self.two_stream)
                if not self.text_checkpoint:  # the text stream's depth is known without reading a checkpoint
                    options.layout(options.t_layers or self.bert.get("num_hidden_layers") or self.bert.get("layers")
                                   or inspect.signature(tiny_bert_config).parameters["layers"].default)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{where}.two_stream: {error}") from None
            from vlp.trainer.two_stream import check_visual

            try:
                check_visual(self.visual_config())
            except ValueError as error:
                raise ConfigError(f"{where}: {error}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _vocab_path(value: Optional[str]) -> Optional[str]:
    """A shipped vocabulary's name (``demo``) -> its file, unless a file of that name exists."""
    if value in SHIPPED_VOCABS and not Path(value).exists():
        return str(shipped_vocab(value))
    return value


class _ReadFromFile:
    """``from_dict`` for the whole-file configs (pretraining, finetuning): ``_parse`` with
    every error message starting with the file (or "config")."""

    @classmethod
    def from_dict(cls, config, path: Union[str, Path, None] = None):
        """Check and type a config; a ConfigError names ``path`` (or "config") and the key."""
        where = str(path) if path is not None else "config"
        try:
            return cls._parse(config, where, path)
        except ConfigError as error:
            message = str(error)
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


@dataclasses.dataclass
class TrainConfig(_ReadFromFile):
    """A whole ``vlp-train pretrain`` config (see the module docstring)."""

    model: ModelConfig
    stages: tuple  # StageConfig, each with its sources
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: Optional[EvalConfig] = None
    seed: int = 0
    path: Optional[str] = dataclasses.field(default=None, compare=False)  # the file it was read from

    @classmethod
    def _parse(cls, config, where: str, path) -> "TrainConfig":
        if isinstance(config, TrainConfig):
            return config
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: the config must be a mapping (model, data, stages, ...), got {_kind(config)}")
        unknown = set(config) - set(TOP_LEVEL_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown top-level key(s): {', '.join(sorted(map(str, unknown)))}")
        seed = config.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{where}: seed must be a non-negative whole number, got {seed!r}")
        data = DataConfig.from_dict(config.get("data"), f"{where}: data")
        model = ModelConfig.from_dict(config.get("model"), f"{where}: model")
        evaluation = EvalConfig.from_dict(config.get("eval"), f"{where}: eval", data=data)
        stages = config.get("stages")
        if not stages:
            raise ConfigError(f"{where}: stages: at least one stage is required")
        if not isinstance(stages, list):
            raise ConfigError(f"{where}: stages must be a list of stages (each '- name: ...'), got {_kind(stages)}")
        parsed = tuple(StageConfig.from_dict(stage, f"{where}: stages[{i}]", index=i, data=data, seed=seed)
                       for i, stage in enumerate(stages))
        names = [s.name for s in parsed]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: stage names must be distinct: {names}")
        return cls(model=model, stages=parsed, data=data, eval=evaluation, seed=seed,
                   path=None if path is None else str(path))

    def to_dict(self) -> dict:
        """The normalised plain form (YAML/JSON-safe; every default written out)."""
        out = {"seed": self.seed, "model": self.model.to_dict(), "data": dataclasses.asdict(self.data),
               "stages": [s.to_dict() for s in self.stages]}
        if self.eval is not None:
            out["eval"] = self.eval.to_dict()
        return out

    def stage_dir(self, out_dir, index: int) -> Path:
        return stage_folder(out_dir, index, self.stages[index].name)

    def replace_stages(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied to every stage (e.g. ``precision="bf16"``)."""
        return dataclasses.replace(self, stages=tuple(dataclasses.replace(s, **changes) for s in self.stages))


def as_config(config) -> TrainConfig:
    """A TrainConfig from a TrainConfig or a plain dict (checked)."""
    return config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)


def validate_config(config, where: Union[str, Path] = "config") -> TrainConfig:
    """Check a plain config; returns it typed. ConfigError (a ValueError) names the key."""
    return TrainConfig.from_dict(config, where)


def read_yaml(path) -> object:
    """The YAML (or JSON) data of ``path``; ConfigError naming the file for text that is not
    UTF-8, YAML syntax errors (with line and column) and tags that would build Python objects."""
    import yaml

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}); "
                          "save the config as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = error.problem or error.context or "invalid YAML"
        if isinstance(error, yaml.constructor.ConstructorError) and "tag" in problem:
            problem += " (tags that build Python objects are not allowed in a config)"
        raise ConfigError(f"{path}{at}: YAML error: {problem}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: YAML error: {str(error).splitlines()[0] if str(error) else error}") from None


def rebase_paths(raw: dict, old_root: str, new_root) -> dict:
    """A copy of a plain config whose store paths under ``old_root`` lie under ``new_root``
    (``configs/demo.yaml``'s ``demo-out/...`` -> the folder a demo actually wrote)."""
    import copy

    prefix = old_root.rstrip("/") + "/"

    def move(value):
        if isinstance(value, dict):
            return {k: (str(Path(new_root) / v[len(prefix):]) if k in ("features", "pairs", "hard_negatives")
                        and isinstance(v, str) and v.startswith(prefix) else move(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return move(copy.deepcopy(raw))


def load_config(path) -> TrainConfig:
    """Read and check a YAML (or JSON) config file; every error names the file and the key."""
    return TrainConfig.from_dict(read_yaml(path), path)


# --- finetuning -----------------------------------------------------------------------

#: downstream tasks (vlp.trainer.downstream.DOWNSTREAM_TASKS) with their pair kind and options
FINETUNE_TASKS = {"vqa": "question", "vizwiz": "question", "gqa": "question", "snli_ve": "entailment",
                  "nlvr2": "nlvr2", "mmimdb": "multilabel", "retrieval": "caption", "refcoco": "refexp",
                  "vcr": "vcr"}
#: tasks with a setting: its choices, the default first
TASK_SETTINGS = {"nlvr2": ("pair", "triplet"), "vcr": ("joint", "q_a", "qa_r")}
FINETUNE_TOP_LEVEL_KEYS = ("model", "data", "task", "train", "seed")
#: StageConfig fields a finetune ``train:`` section may not set (no masking, one fixed stage)
_NOT_FINETUNE = ("name", "tasks", "sources", "text_mask_prob", "region_mask_prob", "region_mask_split")


@dataclasses.dataclass
class TaskConfig:
    """``task:`` of a finetune config: which downstream task, on which data, with which head."""

    name: str
    pairs: str
    features: str
    train_split: tuple = ("train",)
    val_split: tuple = ("val",)
    head: str = "mlp"  # mlp | mmf | linear (vlp.trainer.heads)
    loss: Optional[str] = None  # gqa: bce | ce; the others have one
    setting: Optional[str] = None  # nlvr2: pair | triplet
    answer_vocab: Optional[str] = None  # vqa/vizwiz/gqa: a json list; default the store's answer_vocab.json
    freeze_base: bool = False  # train the head only (Singh et al. Table 2)
    max_text_len: int = 40
    max_regions: Optional[int] = None
    eval_batch_size: int = 64
    eval_max_items: Optional[int] = None  # None: the whole validation split (retrieval: its first N images)
    # retrieval (vlp.trainer.retrieval): negatives per positive (hinge: the hardest per side), the
    # candidate pool, the hinge margin, a hard_negatives pair store, the evaluation's first-stage shortlist
    negatives: Optional[int] = None
    candidates: Optional[int] = None
    margin: Optional[float] = None
    hard_negatives: Optional[str] = None
    shortlist: Optional[int] = None
    roi_mask_prob: Optional[float] = None  # vcr: VL-BERT's masked RoI classification (share of regions)

    @classmethod
    def from_dict(cls, spec, where: str = "task", *, data: DataConfig) -> "TaskConfig":
        from vlp.trainer.finetune_tasks import task_class
        from vlp.trainer.heads import HEADS

        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a mapping (name, pairs, head, ...), got {_kind(spec)}")
        _unknown(spec, [f.name for f in dataclasses.fields(cls)], where)
        name = spec.get("name")
        if name not in FINETUNE_TASKS:
            raise ConfigError(f"{where}.name must be one of {', '.join(FINETUNE_TASKS)}, got {name!r}")
        if not spec.get("pairs"):
            raise ConfigError(f"{where}: pairs (a pair store directory) is required")
        features = _path(spec.get("features"), where, "features") or data.features
        if not features:
            raise ConfigError(f"{where}: no feature store: set data.features or task.features")
        counts = {k: spec[k] for k in ("max_text_len", "max_regions", "eval_batch_size", "eval_max_items")
                  if spec.get(k) is not None}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {key} must be a whole number of at least 1, got {value!r}")
        head = spec.get("head", "mlp")
        if head not in HEADS:
            raise ConfigError(f"{where}.head must be one of {', '.join(HEADS)}, got {head!r}")
        freeze = spec.get("freeze_base", False)
        if not isinstance(freeze, bool):
            raise ConfigError(f"{where}.freeze_base must be true or false, got {freeze!r}")
        loss, setting = spec.get("loss"), spec.get("setting")
        task = task_class(name)
        if loss is not None and loss not in task.losses:
            raise ConfigError(f"{where}.loss: {name} trains with {' or '.join(task.losses)}, got {loss!r}")
        if setting is not None and name not in TASK_SETTINGS:
            raise ConfigError(f"{where}.setting is an nlvr2 option (pair or triplet) or a vcr one (joint, q_a, qa_r)")
        if name in TASK_SETTINGS and setting not in (None,) + TASK_SETTINGS[name]:
            raise ConfigError(f"{where}.setting must be {' or '.join(TASK_SETTINGS[name])}, got {setting!r}")
        roi = spec.get("roi_mask_prob")
        if roi is not None and name != "vcr":
            raise ConfigError(f"{where}.roi_mask_prob is a vcr option")
        if roi is not None and (isinstance(roi, bool) or not isinstance(roi, (int, float)) or not 0 <= roi < 1):
            raise ConfigError(f"{where}.roi_mask_prob must be a number in [0, 1), got {roi!r}")
        if spec.get("answer_vocab") and name not in ("vqa", "vizwiz", "gqa"):
            raise ConfigError(f"{where}.answer_vocab is for vqa, vizwiz and gqa")
        retrieval = {k: spec.get(k) for k in ("negatives", "candidates", "margin", "hard_negatives", "shortlist")
                     if spec.get(k) is not None}
        if retrieval and name != "retrieval":
            raise ConfigError(f"{where}: {', '.join(retrieval)} are retrieval options")
        for key in ("negatives", "shortlist"):
            value = retrieval.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{where}.{key} must be a whole number of at least 1, got {value!r}")
        value = retrieval.get("candidates")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{where}.candidates must be a whole number of at least 0, got {value!r}")
        value = retrieval.get("margin")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ConfigError(f"{where}.margin must be a positive number, got {value!r}")
        train_split = _split(spec.get("train_split", "train"), f"{where}.train_split")
        val_split = _split(spec.get("val_split", "val"), f"{where}.val_split")
        return cls(name=name, pairs=_path(spec["pairs"], where, "pairs"), features=features,
                   train_split=train_split, val_split=val_split, head=head, loss=loss or task.losses[0],
                   setting=(setting or TASK_SETTINGS[name][0]) if name in TASK_SETTINGS else None,
                   answer_vocab=_path(spec.get("answer_vocab"), where, "answer_vocab"), freeze_base=freeze,
                   max_text_len=spec.get("max_text_len") or data.max_text_len,
                   max_regions=spec.get("max_regions", data.max_regions),
                   eval_batch_size=spec.get("eval_batch_size") or 64, eval_max_items=spec.get("eval_max_items"),
                   negatives=retrieval.get("negatives"), candidates=retrieval.get("candidates"),
                   margin=None if retrieval.get("margin") is None else float(retrieval["margin"]),
                   hard_negatives=_path(retrieval.get("hard_negatives"), where, "hard_negatives"),
                   shortlist=retrieval.get("shortlist"),
                   roi_mask_prob=None if roi is None else float(roi))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train_split"], d["val_split"] = list(self.train_split), list(self.val_split)
        return d


def _finetune_stage(raw, where: str, *, task: str, seed: int) -> StageConfig:
    raw = _mapping(raw, where)
    allowed = [f.name for f in dataclasses.fields(StageConfig) if f.name not in _NOT_FINETUNE]
    _unknown(raw, allowed, where)
    settings = dict(raw)
    settings.setdefault("seed", seed)
    try:
        return StageConfig(name="finetune", tasks=[task.upper()], **settings)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


@dataclasses.dataclass
class FinetuneConfig(_ReadFromFile):
    """A ``vlp-train finetune`` config: ``model`` and ``data`` as in pretraining, ``task``
    (:class:`TaskConfig`) and ``train`` (a :class:`StageConfig` without tasks or sources:
    steps or epochs, batch_size, lr, schedule, eval_every, checkpoint_every, precision ...)."""

    model: ModelConfig
    task: TaskConfig
    train: StageConfig
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    seed: int = 0
    path: Optional[str] = dataclasses.field(default=None, compare=False)

    @classmethod
    def _parse(cls, config, where: str, path) -> "FinetuneConfig":
        if isinstance(config, FinetuneConfig):
            return config
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: the config must be a mapping (model, data, task, train), got {_kind(config)}")
        if "stages" in config:
            raise ConfigError(f"{where}: a finetune config has task: and train:, not stages: (this looks like a "
                              "pretraining config: use vlp-train pretrain)")
        unknown = set(config) - set(FINETUNE_TOP_LEVEL_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown top-level key(s): {', '.join(sorted(map(str, unknown)))} "
                              f"(known: {', '.join(FINETUNE_TOP_LEVEL_KEYS)})")
        seed = config.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{where}: seed must be a non-negative whole number, got {seed!r}")
        data = DataConfig.from_dict(config.get("data"), f"{where}: data")
        model = ModelConfig.from_dict(config.get("model"), f"{where}: model")
        if config.get("task") is None:
            raise ConfigError(f"{where}: task: is required (name, pairs, head, ...)")
        task = TaskConfig.from_dict(config.get("task"), f"{where}: task", data=data)
        if task.name == "nlvr2" and task.setting == "triplet" and model.architecture != "single_stream":
            raise ConfigError(f"{where}: task.setting triplet needs model.architecture single_stream")
        if config.get("train") is None:
            raise ConfigError(f"{where}: train: is required (steps or epochs, batch_size, lr, ...)")
        train = _finetune_stage(config.get("train"), f"{where}: train", task=task.name, seed=seed)
        return cls(model=model, task=task, train=train, data=data, seed=seed,
                   path=None if path is None else str(path))

    def to_dict(self) -> dict:
        train = {k: v for k, v in self.train.to_dict().items() if k not in _NOT_FINETUNE}
        return {"seed": self.seed, "model": self.model.to_dict(), "data": dataclasses.asdict(self.data),
                "task": self.task.to_dict(), "train": train}

    @property
    def stages(self) -> tuple:
        """The one stage (``train``), so run-folder code written for pretraining applies."""
        return (self.train,)

    def stage_dir(self, out_dir, index: int = 0) -> Path:
        return stage_folder(out_dir, 0, self.train.name)

    def replace_stages(self, **changes) -> "FinetuneConfig":
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))


def load_finetune_config(path) -> FinetuneConfig:
    """Read and check a finetune YAML (or JSON) config; errors name the file and the key."""
    return FinetuneConfig.from_dict(read_yaml(path), path)
