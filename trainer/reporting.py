"""Training logs: per-step JSON lines, TensorBoard scalars, loss-curve plots and summaries.

Files of one stage (``STAGE_DIR``, e.g. ``OUT/01-labels/``):

* ``history.jsonl`` - one line per optimizer step, as the loop has always written it:
  ``{"step", "loss", "lr", "grad_norm", "losses": {task: loss}, "metrics": {name: value}}``
  (further top-level numbers, e.g. ``samples_per_s``, are kept and logged too); counts
  (metrics ending in ``_n``) are whole numbers, summed over the step's micro-batches. In a
  stage that mixes data sources, ``"sources": {source: {"loss": .., task: ..}}`` holds each
  source's losses of the step and ``"source"`` names it when all of the step's batches
  came from one source; plots and summaries then show each source's loss apart, since
  the total jumps between batches of different sources;
* ``eval.jsonl`` - one line per evaluation: ``{"step": N, metric: value, ...}``;
* ``reporting.json`` - ``{"stage_name", "global_step_offset"}``, so that plots put the
  stage on the same global step axis as TensorBoard;
* ``tensorboard/`` - the stage's TensorBoard event files.

TensorBoard layout: **one run per stage**, in ``STAGE_DIR/tensorboard``, every event at the
*global* step ``global_step_offset + step``. ``tensorboard --logdir OUT`` then lists the
runs ``01-labels/tensorboard``, ``02-captions/tensorboard``, ... and draws them on one
step axis, one colour per stage, so the stage boundaries are visible in every chart;
TensorBoard's smoothing restarts at each boundary (where the loss jumps because the task
set changed), and a task that only some stages train simply has no curve in the others.
The events live inside the stage folder rather than in a shared ``OUT/tensorboard`` so
that a stage folder is self-contained (a standalone :class:`~vlp.trainer.pretrain.Pretrainer`
run writes nothing next to its output folder, and deleting a stage to redo it also
deletes its stale curves). Tags:

* ``train/loss``, ``train/loss/<TASK>`` (e.g. ``train/loss/MLM``), ``train/lr``,
  ``train/grad_norm``, ``train/<metric>`` for every metric (``train/mlm_acc``, ...) and
  every other top-level number of the entry (``train/samples_per_s``);
* ``eval/<metric>`` from :meth:`TrainingLog.log_eval`;
* a ``stage`` text at the stage's first global step naming the stage.

Resume: :meth:`TrainingLog.truncate` drops the JSON lines after the checkpoint step and
opens a new event file whose first event is a ``SessionLog.START`` at the first redone
step (``SummaryWriter(purge_step=...)``). TensorBoard's Python loader purges the run's
older events at that step and later; its fast loader (the Rust data server) keeps, per
tag, only the newest event when a step repeats. Either way the redone steps replace
the stale ones instead of being drawn twice.

:func:`plot_loss_curves` draws the histories of a run with matplotlib (Agg, no display);
:func:`summarize` gives a few lines per stage for the end of ``vlp-train pretrain``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import time
import warnings
from pathlib import Path
from typing import Optional, Union

from vlp.core.durable import JsonLines, atomic_path, atomic_write_json, atomic_write_text, cut_torn_tail

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
EVAL_FILE = "eval.jsonl"
INFO_FILE = "reporting.json"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "loss_curves.png"

# keys of a history entry that are not plain top-level scalars
_ENTRY_STRUCTURED = {"step", "loss", "losses", "metrics"}

_tensorboard_warned = False


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or None (warned once) without tensorboard."""
    global _tensorboard_warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if not _tensorboard_warned:
            _tensorboard_warned = True
            message = (f"TensorBoard logging is off: {exc}. The JSON-lines history is still written; "
                       f"`pip install tensorboard` to get event files.")
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log.warning(message)
        return None
    return SummaryWriter


def _number(value) -> Optional[float]:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensors / arrays
            return _number(value.item())
        return None
    return float(value)


# --- JSON lines ---------------------------------------------------------------------


def _parse_lines(text: str, path: Path) -> list[dict]:
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        else:
            bad += 1
    if bad:
        log.warning("%s: skipped %d unreadable line(s)", path, bad)
    return rows


def read_jsonl(path) -> list[dict]:
    """The entries of a ``history.jsonl`` / ``eval.jsonl`` sorted by step; [] if missing.

    Unreadable lines (a torn last line) are skipped; when a step occurs twice (a resume
    without truncation) the later line wins.
    """
    path = Path(path)
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for row in _parse_lines(path.read_text(encoding="utf-8"), path):
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def _last_step(path: Path) -> Optional[int]:
    """The step of the last complete line of ``path`` (read from the end), or None."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - (1 << 16)))
        tail = handle.read().decode("utf-8", errors="replace")
    for line in reversed(tail.splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    rows = read_jsonl(path)  # a huge last line: read it all
    return int(rows[-1]["step"]) if rows else None


def _keep_until(path: Path, step: int) -> Optional[int]:
    """Rewrite ``path`` (atomically) keeping the lines of steps <= ``step``; the last kept step."""
    if not path.is_file():
        return None
    keep = [row for row in _parse_lines(path.read_text(encoding="utf-8"), path) if int(row["step"]) <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))
    return max((int(row["step"]) for row in keep), default=None)


# --- the loop's logger --------------------------------------------------------------


class TrainingLog:
    """Step and evaluation log of one stage: JSON lines plus TensorBoard scalars.

    ``stage_dir``: the stage folder (created if needed). ``global_step_offset``: the
    optimizer steps of the earlier stages (the sum of their configured ``steps``), added
    to every step written to TensorBoard and recorded in ``reporting.json`` for the plots.
    ``tensorboard``: True (event files in ``stage_dir/tensorboard``), False (none) or the
    folder to write them to. Without the ``tensorboard`` package it warns once and logs the
    JSON lines only. ``samples_per_step`` (batch size x accumulation), when given and the
    entry has no ``samples_per_s`` of its own, adds ``train/samples_per_s`` measured from
    the time between two :meth:`log_step` calls.

    The history and evaluation files are :class:`vlp.core.durable.JsonLines` (each line
    written and flushed whole; a torn last line is cut before the next append). The event
    file is opened on the first logged value; TensorBoard events are buffered by the writer and
    flushed every ``flush_secs`` and by :meth:`flush` / :meth:`close` (call it: an unclosed
    writer loses its last seconds); the JSON lines are the record to trust after a crash.
    Cost: about 0.5 ms per :meth:`log_step` with a dozen scalars (CPU, measured).
    """

    def __init__(self, stage_dir, *, stage_name: str, global_step_offset: int = 0,
                 tensorboard: Union[bool, str, os.PathLike] = True, samples_per_step: Optional[int] = None,
                 flush_secs: int = 30):
        self.stage_dir = Path(stage_dir)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.stage_name = stage_name
        self.global_step_offset = int(global_step_offset)
        self.samples_per_step = samples_per_step
        self.flush_secs = flush_secs
        self.history_path = self.stage_dir / HISTORY_FILE
        self.eval_path = self.stage_dir / EVAL_FILE
        self._write_info()
        cut_torn_tail(self.history_path)
        cut_torn_tail(self.eval_path)
        self._last_step = _last_step(self.history_path)
        self._history = JsonLines(self.history_path)
        self._eval = JsonLines(self.eval_path)
        self._tick: Optional[float] = None
        self._writer = None  # opened on the first scalar
        self._writer_class = None
        self._purge_step: Optional[int] = None
        self.tensorboard_dir: Optional[Path] = None
        if tensorboard:
            self._writer_class = _summary_writer_class()
            if self._writer_class is not None:
                self.tensorboard_dir = (self.stage_dir / TENSORBOARD_DIR if tensorboard is True
                                        else Path(tensorboard))

    # -- set-up ---------------------------------------------------------------------
    def _write_info(self) -> None:
        info = {"stage_name": self.stage_name, "global_step_offset": self.global_step_offset}
        path = self.stage_dir / INFO_FILE
        if path.is_file():
            try:
                if json.loads(path.read_text()) == info:
                    return
            except ValueError:
                pass
        atomic_write_json(path, info, indent=None)

    def _tensorboard(self):
        """The event writer (opened on first use, with the pending purge step), or None."""
        if self._writer is None and self._writer_class is not None:
            self._writer = self._writer_class(str(self.tensorboard_dir), purge_step=self._purge_step,
                                              flush_secs=self.flush_secs)
            self._purge_step = None
            self._writer.add_text("stage", f"stage **{self.stage_name}** (`{self.stage_dir}`): global "
                                           f"steps from {self.global_step_offset + 1}",
                                  global_step=self.global_step_offset)
        return self._writer

    @property
    def last_step(self) -> Optional[int]:
        """The last step in ``history.jsonl`` (None when it is empty)."""
        return self._last_step

    # -- logging ------------------------------------------------------------------
    def log_step(self, entry: dict) -> None:
        """Append one optimizer step's entry to ``history.jsonl`` and to TensorBoard.

        A step at or before the last logged one (a resume that did not call
        :meth:`truncate`) first drops the lines from that step on, so the history stays
        one line per step.
        """
        step = int(entry["step"])
        if self._last_step is not None and step <= self._last_step:
            log.warning("%s: step %d was logged before (last %d); dropping the lines from step %d on",
                        self.history_path, step, self._last_step, step)
            self.truncate(step - 1)
        self._history.append(entry)
        self._last_step = step
        now = time.perf_counter()
        elapsed = None if self._tick is None else now - self._tick
        self._tick = now
        writer = self._tensorboard()
        if writer is None:
            return
        global_step = self.global_step_offset + step
        scalars = {"train/loss": entry.get("loss")}
        for task, value in (entry.get("losses") or {}).items():
            scalars[f"train/loss/{task}"] = value
        for key, value in entry.items():
            if key not in _ENTRY_STRUCTURED:
                scalars[f"train/{key}"] = value
        for name, value in (entry.get("metrics") or {}).items():
            scalars[f"train/{name}"] = value
        if "samples_per_s" not in entry and self.samples_per_step and elapsed:
            scalars["train/samples_per_s"] = self.samples_per_step / elapsed
        for tag, value in scalars.items():
            value = _number(value)
            if value is not None:
                writer.add_scalar(tag, value, global_step)

    def log_eval(self, step: int, metrics: dict) -> None:
        """Append ``{"step": step, **metrics}`` to ``eval.jsonl``; ``eval/<metric>`` scalars."""
        self._eval.append({"step": int(step), **metrics})
        writer = self._tensorboard()
        if writer is None:
            return
        for name, value in metrics.items():
            value = _number(value)
            if value is not None:
                writer.add_scalar(f"eval/{name}", value, self.global_step_offset + int(step))

    def truncate(self, step: int) -> None:
        """Drop the history and evaluation lines after ``step`` (resume from a checkpoint).

        TensorBoard: a new event file starts with a purge marker at the next global step,
        so the events of the dropped steps are replaced by the redone ones.
        """
        step = int(step)
        self._history.close()
        self._eval.close()
        self._last_step = _keep_until(self.history_path, step)
        _keep_until(self.eval_path, step)
        self._tick = None
        if self._writer_class is not None:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._purge_step = self.global_step_offset + step + 1  # for the next event file

    def flush(self) -> None:
        """The JSON lines are flushed line by line; this flushes the TensorBoard events."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the files and the event writer (idempotent)."""
        self._history.close()
        self._eval.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TrainingLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- reading a run back -------------------------------------------------------------


@dataclasses.dataclass
class StageLog:
    """One stage's logged history as read back from its folder."""

    dir: Path
    name: str  # the stage name (reporting.json), else the folder name
    offset: int  # global step of the stage's step 0
    history: list
    evals: list

    @property
    def label(self) -> str:
        return self.dir.name if self.name == self.dir.name else f"{self.dir.name} ({self.name})"

    @property
    def end(self) -> int:
        """The last global step with an entry."""
        last = max([int(r["step"]) for r in self.history[-1:] + self.evals[-1:]], default=0)
        return self.offset + last


def _is_stage_dir(path: Path) -> bool:
    return (path / HISTORY_FILE).is_file() or (path / EVAL_FILE).is_file()


def load_run(run_dir) -> list[StageLog]:
    """The stages of a run folder (``NN-name`` sub-folders, by name) or of one stage folder.

    A stage without ``reporting.json`` starts where the previous one ended. Raises
    FileNotFoundError naming ``run_dir`` when nothing was logged there.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run or stage folder")
    if _is_stage_dir(run_dir):
        folders = [run_dir]
    else:
        folders = sorted(p for p in run_dir.iterdir() if p.is_dir() and _is_stage_dir(p))
    stages, end = [], 0
    for folder in folders:
        history, evals = read_jsonl(folder / HISTORY_FILE), read_jsonl(folder / EVAL_FILE)
        if not history and not evals:
            continue
        info = {}
        if (folder / INFO_FILE).is_file():
            try:
                info = json.loads((folder / INFO_FILE).read_text())
            except ValueError:
                log.warning("%s: unreadable, the stage starts where the previous ended", folder / INFO_FILE)
        offset = int(info.get("global_step_offset", end))
        stage = StageLog(folder, str(info.get("stage_name") or folder.name), offset, history, evals)
        stages.append(stage)
        end = stage.end
    if not stages:
        raise FileNotFoundError(f"{run_dir}: no training history: no {HISTORY_FILE} or {EVAL_FILE} with "
                                f"entries in it or in its stage folders")
    return stages


# --- plots --------------------------------------------------------------------------


def _finite(xs, ys):
    pairs = [(x, float(y)) for x, y in zip(xs, ys) if _number(y) is not None and math.isfinite(float(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def ema(values, weight: float) -> list:
    """Debiased exponential moving average (TensorBoard's smoothing); weight 0: no smoothing."""
    out, acc, norm = [], 0.0, 0.0
    for value in values:
        acc = weight * acc + (1.0 - weight) * value
        norm = weight * norm + (1.0 - weight)
        out.append(acc / norm)
    return out


def _auto_weight(points: int) -> float:
    """EMA weight of about a window of points/60 (no smoothing below 120 points)."""
    window = points / 60.0
    return 0.0 if window < 2 else 1.0 - 1.0 / window


def _eval_loss_panel(key: str) -> Optional[str]:
    """The task loss panel an evaluation metric belongs to: loss_MLM / loss/MLM -> MLM.
    The held-out total (every task on every batch) is not drawn over the training total,
    whose batches carry only their source's tasks."""
    for prefix in ("loss_", "loss/"):
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix):]
    return None


def _stage_sources(stage: StageLog) -> list[str]:
    """The data sources of a mixed stage, in order of appearance ([] for a single-source stage)."""
    return list(dict.fromkeys(name for row in stage.history for name in (row.get("sources") or {})))


def _series(stages: list[StageLog]):
    """Panels as {title: {curve: [(stage, steps, values)]}} plus their kinds, in display order."""
    panels: dict[str, dict] = {"loss": {}}
    kinds = {"loss": "loss"}
    for stage in stages:
        for task in (t for row in stage.history for t in (row.get("losses") or {})):
            if task not in panels:
                panels[task], kinds[task] = {}, "loss"
    metric_names, eval_names = [], []
    for stage in stages:
        for row in stage.history:
            for name in row.get("metrics") or {}:
                if name not in metric_names:
                    metric_names.append(name)
        for row in stage.evals:
            for name in row:
                if name != "step" and name not in eval_names:
                    eval_names.append(name)
    for stage in stages:
        sources = _stage_sources(stage)
        if sources:  # a mixed stage: one curve per source (the total jumps between their batches)
            for source in sources:
                for task in [t for t in panels if kinds[t] == "loss"]:
                    key = "loss" if task == "loss" else task
                    rows = [r for r in stage.history if key in ((r.get("sources") or {}).get(source) or {})]
                    if rows:
                        panels[task].setdefault(source, []).append(
                            (stage, [int(r["step"]) for r in rows], [r["sources"][source][key] for r in rows]))
            continue
        steps = [int(r["step"]) for r in stage.history]
        panels["loss"].setdefault("train", []).append((stage, steps, [r.get("loss") for r in stage.history]))
        for task in panels:
            if kinds[task] == "loss" and task != "loss":
                rows = [r for r in stage.history if task in (r.get("losses") or {})]
                if rows:
                    panels[task].setdefault("train", []).append(
                        (stage, [int(r["step"]) for r in rows], [r["losses"][task] for r in rows]))
    # training metrics that look like rates (all values in [0, 1]): accuracies, not counts
    rates = {}
    for name in metric_names:
        values = [v for s in stages for r in s.history
                  for v in [(r.get("metrics") or {}).get(name)] if _number(v) is not None]
        if values and all(0.0 <= float(v) <= 1.0 for v in values if math.isfinite(float(v))):
            rates[name] = []
            for stage in stages:
                rows = [r for r in stage.history if name in (r.get("metrics") or {})]
                if rows:
                    rates[name].append((stage, [int(r["step"]) for r in rows],
                                        [r["metrics"][name] for r in rows]))
    if rates:
        panels["train metrics"], kinds["train metrics"] = rates, "metrics"
    eval_rates, eval_other = {}, {}
    for name in eval_names:
        if name in ("loss", "batches") or name.endswith("_n"):  # totals and counts, not curves
            continue
        curves = [(stage, [int(r["step"]) for r in stage.evals if name in r],
                   [r[name] for r in stage.evals if name in r]) for stage in stages]
        curves = [c for c in curves if c[1]]
        target = _eval_loss_panel(name)
        if target in panels and kinds[target] == "loss":
            panels[target]["eval"] = curves
        elif target is None:
            values = [_number(v) for c in curves for v in c[2]]
            is_rate = all(v is None or not math.isfinite(v) or 0.0 <= v <= 1.0 for v in values)
            (eval_rates if is_rate else eval_other)[name] = curves
    if eval_rates:
        panels["eval accuracy / recall"], kinds["eval accuracy / recall"] = eval_rates, "eval"
    if eval_other:
        panels["eval (other)"], kinds["eval (other)"] = eval_other, "eval"
    if not any(c[1] for curve, segments in panels["loss"].items() if curve != "eval" for c in segments) \
            and "eval" not in panels["loss"]:
        del panels["loss"]
    return panels, kinds


def _draw(stages: list[StageLog], out: Path, *, title: str, smoothing: Optional[float], dpi: int,
          panel_size: tuple) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        """Matplotlib's choice of which log ticks to label, written as 0.3 / 2 / 1e+04."""

        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    panels, kinds = _series(stages)
    count = len(panels)
    if not count:
        raise ValueError(f"{stages[0].dir}: nothing to plot: the logged entries hold no values")
    ncols = 1 if count == 1 else 2 if count <= 4 else 3
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    points = max(len(s.history) for s in stages)
    weight = _auto_weight(points) if smoothing is None else float(smoothing)
    start = min(s.offset for s in stages)
    stop = max(s.end for s in stages)
    pad = max(1.0, 0.02 * (stop - start))  # x from the first stage's step 0
    colors = [f"C{i}" for i in range(10)]
    for ax, (panel, curves) in zip(axes, panels.items()):
        plotted = []
        for index, (curve, segments) in enumerate(curves.items()):
            is_eval = curve == "eval" or kinds[panel] == "eval"
            color = ("black" if curve == "eval" else colors[index % 10] if kinds[panel] != "loss" or curve != "train"
                     else "C0")
            label_done = False
            for stage, steps, values in segments:
                xs, ys = _finite([stage.offset + s for s in steps], values)
                if not xs:
                    continue
                plotted.extend(ys)
                label = None if label_done else ("eval" if curve == "eval" else curve
                                                 if kinds[panel] != "loss" or curve != "train" else None)
                label_done = True
                if is_eval:
                    ax.plot(xs, ys, marker="D", markersize=3.5, lw=1.0, color=color, label=label)
                elif len(xs) == 1:
                    ax.plot(xs, ys, marker="o", markersize=4, ls="none", color=color, label=label)
                else:
                    ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
                    ax.plot(xs, ema(ys, weight), color=color, lw=1.6, label=label)
        ax.set_title("total loss" if panel == "loss" else f"{panel} loss" if kinds[panel] == "loss" else panel,
                     fontsize=10)
        if plotted and kinds[panel] == "loss" and min(plotted) > 0:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(PlainLogFormatter())
            ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
        ax.set_xlim(start, stop + pad)
        ax.set_xlabel("global step" if len(stages) > 1 else "step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        for position, stage in enumerate(stages):
            if position:
                ax.axvline(stage.offset, ls="--", lw=0.8, color="0.45")
            if len(stages) > 1:
                ax.text(stage.offset, 0.98, f" {stage.name}", transform=ax.get_xaxis_transform(),
                        ha="left", va="top", fontsize=7, color="0.3")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def plot_loss_curves(run_dir, out_png=None, *, per_stage: bool = False, smoothing: Optional[float] = None,
                     dpi: int = 100, panel_size: tuple = (5.0, 3.0)) -> Path:
    """Draw the loss curves of a run (or of one stage folder) into one PNG; returns its path.

    Panels: the total loss, one per task loss (log scale when all values are positive),
    the training metrics whose values are all in [0, 1] (accuracies; counts such as
    ``mlm_n`` are left out) and, from ``eval.jsonl``, ``loss`` / ``loss_TASK`` drawn as
    black markers in the matching loss panel and the other evaluation metrics in an
    ``eval metrics`` panel. x is the global step; dashed lines mark the stage boundaries,
    labelled with the stage names. Each curve: the raw values, light, and an EMA
    (``smoothing``: TensorBoard-style weight in [0, 1); None picks one from the number of
    steps) restarted at each stage. A stage with one step is drawn as a dot. Up to three
    panels a row, each ``panel_size`` inches at ``dpi``.

    ``out_png`` defaults to ``run_dir/loss_curves.png``; ``per_stage`` also writes
    ``STAGE_DIR/loss_curves.png`` for every stage (x: the stage's own steps). Raises
    FileNotFoundError naming ``run_dir`` when it holds no history.
    """
    run_dir = Path(run_dir)
    stages = load_run(run_dir)
    out = Path(out_png) if out_png is not None else run_dir / PLOT_FILE
    steps = sum(len(s.history) for s in stages)
    title = f"{run_dir.resolve().name}: {_plural(len(stages), 'stage')}, {_plural(steps, 'step')}"
    _draw(stages, out, title=title, smoothing=smoothing, dpi=dpi, panel_size=panel_size)
    if per_stage:
        for stage in stages:
            path = stage.dir / PLOT_FILE
            if path.resolve() == out.resolve():
                continue
            alone = dataclasses.replace(stage, offset=0)
            _draw([alone], path, title=f"{stage.label}: {_plural(len(stage.history), 'step')}", smoothing=smoothing,
                  dpi=dpi, panel_size=panel_size)
    return out


# --- summary ------------------------------------------------------------------------


def _mean(values) -> Optional[float]:
    values = [float(v) for v in values if _number(v) is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _metric(name: str, values: list) -> str:
    """A metric's mean over some steps; counts (``*_n``) as whole numbers per step."""
    mean = _mean(values)
    if name.endswith("_n") and mean is not None:
        return f"{round(mean)}/step"
    return _fmt(mean)


def summarize(run_dir) -> str:
    """A few lines per stage: steps, total and task losses at the start and the end (means
    over the first / last tenth of the steps, at most 100), the last metrics and the last
    evaluation. Never raises for a missing history: it says so instead."""
    try:
        stages = load_run(run_dir)
    except FileNotFoundError as exc:
        return str(exc)
    lines = []
    for stage in stages:
        history = stage.history
        if history:
            window = max(1, min(100, len(history) // 10))
            head, tail = history[:window], history[-window:]
            first, last = int(history[0]["step"]), int(history[-1]["step"])
            where = f"steps {first}-{last}" if first != last else f"step {first}"
            if stage.offset:
                where += f" (global {stage.offset + first}-{stage.offset + last})"
            avg = f"mean of {window} steps" if window > 1 else "single steps"
            lines.append(f"{stage.label}: {_plural(len(history), 'step')} logged, {where}; loss "
                         f"{_fmt(_mean(r.get('loss') for r in head))} -> "
                         f"{_fmt(_mean(r.get('loss') for r in tail))} ({avg})")
            tasks = list(dict.fromkeys(t for r in history for t in (r.get("losses") or {})))
            if tasks:
                lines.append("  tasks: " + ", ".join(
                    f"{t} {_fmt(_mean((r.get('losses') or {}).get(t) for r in head))} -> "
                    f"{_fmt(_mean((r.get('losses') or {}).get(t) for r in tail))}" for t in tasks))
            sources = _stage_sources(stage)
            if sources:  # each source's own loss: the total above mixes their batches
                parts = []
                for source in sources:
                    values = [r["sources"][source]["loss"] for r in history
                              if "loss" in ((r.get("sources") or {}).get(source) or {})]
                    size = max(1, min(100, len(values) // 10))
                    parts.append(f"{source} {_fmt(_mean(values[:size]))} -> {_fmt(_mean(values[-size:]))} "
                                 f"({_plural(len(values), 'step')})")
                lines.append("  loss by source: " + ", ".join(parts))
            names = list(dict.fromkeys(m for r in tail for m in (r.get("metrics") or {})))
            if names:
                lines.append("  last metrics: " + ", ".join(
                    f"{m} {_metric(m, [(r.get('metrics') or {}).get(m) for r in tail])}" for m in names))
        else:
            lines.append(f"{stage.label}: no training steps logged")
        if stage.evals:
            last_eval = stage.evals[-1]
            lines.append(f"  eval at step {last_eval['step']}: " + ", ".join(
                f"{k} {_fmt(_number(v))}" for k, v in last_eval.items() if k != "step"))
    return "\n".join(lines)
