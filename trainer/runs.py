"""Run folders: what ``vlp-train`` may do with ``--out``, and one entry point for a run.

A run folder holds one run: ``OUT/config.yaml`` (the config it was started with, in its
normalised form: every default written out) and ``OUT/NN-stage/`` per stage.

* A folder in which a stage was started (a ``last.json``) is continued only with
  ``resume=True``; otherwise :class:`RunFolderError` says so.
* On resume, ``config.yaml`` stays as it was: a config that differs from it is named key
  by key with both values (:func:`config_changes`) in a warning; finished stages are kept.
* A fresh run writes ``config.yaml`` atomically.

:func:`train` runs a config in this process or on Ray Train workers
(:func:`vlp.trainer.distributed.run_distributed`), so that neither the schedule nor the
distributed module has to import the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from vlp.core.durable import atomic_write_text
from vlp.trainer.config import CONFIG_FILE, ConfigError, TrainConfig, as_config, read_yaml


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (e.g. it holds a run and resume was not asked)."""


def started_stages(out_dir) -> list[str]:
    """The stage folders of ``out_dir`` that hold a checkpoint pointer, by name."""
    return sorted(p.parent.name for p in Path(out_dir).glob("*/last.json"))


def config_changes(before, after, path: str = "") -> list[str]:
    """Dotted key paths where two plain configs differ, with both values."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [change for key in list(before) + [k for k in after if k not in before]
                for change in config_changes(before.get(key), after.get(key), f"{path}.{key}" if path else key)]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [change for i, (a, b) in enumerate(zip(before, after))
                for change in config_changes(a, b, f"{path}[{i}]")]
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def prepare_run_folder(out_dir, config: Union[TrainConfig, dict], *, resume: bool) -> list[str]:
    """Check ``out_dir`` for a run of ``config`` (a pretraining TrainConfig or a plain dict
    of one, or a FinetuneConfig) and record the config; returns warnings.

    Raises RunFolderError when the folder holds a started run and ``resume`` is false.
    """
    import yaml

    out_dir = Path(out_dir)
    config = config if hasattr(config, "to_dict") else as_config(config)  # a TrainConfig or FinetuneConfig
    saved = out_dir / CONFIG_FILE
    started = started_stages(out_dir)
    if started and not resume:
        raise RunFolderError(f"{out_dir} already holds a run (stages {', '.join(started)}); pass --resume "
                             f"to continue it, or choose another --out")
    if saved.is_file() and started:  # the record of what the run was started with stays
        try:
            before = type(config).from_dict(read_yaml(saved), saved).to_dict()
        except ConfigError:  # written by an older vlp: compare as it is
            before = read_yaml(saved)
        changes = config_changes(before, config.to_dict())
        if not changes:
            return []
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        return [f"the config differs from {saved}, the one the run was started with: {shown}. "
                "Finished stages are kept as they are (more steps for a finished stage are ignored); "
                f"{saved} is left unchanged"]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return []


def train(config: Union[TrainConfig, dict], out_dir, *, num_workers: int = 1, device: str = "cpu",
          progress: str = "off", stop_after_steps: Optional[int] = None, should_stop=None) -> list[dict]:
    """Run every stage of ``config`` into ``out_dir``: in this process (``num_workers`` 1)
    or data-parallel on that many Ray Train workers. Returns the stage summaries."""
    config = as_config(config)
    if num_workers > 1:
        from vlp.trainer.distributed import run_distributed

        return run_distributed(config, out_dir, num_workers=num_workers, device=device,
                               stop_after_steps=stop_after_steps, progress=progress)
    from vlp.trainer.schedule import run_stages

    return run_stages(config, out_dir, device=device, stop_after_steps=stop_after_steps, progress=progress,
                      should_stop=should_stop)
