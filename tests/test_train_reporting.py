"""Training logs: JSON lines + TensorBoard event files per stage, resume truncation, loss plots, summary."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

from vlp.trainer import reporting
from vlp.trainer.reporting import TrainingLog, load_run, plot_loss_curves, summarize


def entry(step, tasks, *, scale=1.0, metrics=None, **extra):
    losses = {t: scale * (1.0 + i) * math.exp(-step / 10) + 0.1 for i, t in enumerate(tasks)}
    return {"step": step, "loss": sum(losses.values()), "lr": 1e-4 * step, "grad_norm": 0.5 + step / 100,
            "losses": losses, "metrics": dict(metrics or {}), **extra}


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


STAGE1 = ("01-labels", "labels", ["MLM", "MOC"], 20)
STAGE2 = ("02-captions", "captions", ["MLM", "ITM"], 15)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two stages with different task sets written through TrainingLog, with evaluations."""
    out = tmp_path_factory.mktemp("run")
    written = {}
    offset = 0
    for folder, name, tasks, steps in (STAGE1, STAGE2):
        entries, evals = [], []
        with TrainingLog(out / folder, stage_name=name, global_step_offset=offset) as tlog:
            for step in range(1, steps + 1):
                metrics = {"mlm_acc": step / 40, "mlm_n": 30 + step}
                if "ITM" in tasks:
                    metrics["itm_acc"] = 0.5 + step / 100
                e = entry(step, tasks, metrics=metrics, **({"samples_per_s": 100.0 + step} if "ITM" in tasks else {}))
                tlog.log_step(e)
                entries.append(e)
                if step % 10 == 0 or step == steps:
                    ev = {"loss_MLM": 2.0 - step / 20, "mlm_acc": step / 30}
                    tlog.log_eval(step, ev)
                    evals.append({"step": step, **ev})
        written[folder] = (entries, evals, offset)
        offset += steps
    return out, written


def test_two_stages_write_history_eval_and_tensorboard(run):
    out, written = run
    for folder, name, tasks, steps in (STAGE1, STAGE2):
        entries, evals, offset = written[folder]
        stage_dir = out / folder
        # history.jsonl: exactly the entries, one complete line each; eval.jsonl likewise
        assert read_lines(stage_dir / "history.jsonl") == entries
        assert read_lines(stage_dir / "eval.jsonl") == evals
        assert json.loads((stage_dir / "reporting.json").read_text()) == {"stage_name": name,
                                                                        "global_step_offset": offset}
        # TensorBoard: one run per stage, global steps, the stage's own task set only
        acc, tb = scalars(stage_dir / "tensorboard")
        expected = {"train/loss", "train/lr", "train/grad_norm", "train/mlm_acc", "train/mlm_n",
                    "eval/loss_MLM", "eval/mlm_acc"} | {f"train/loss/{t}" for t in tasks}
        if "ITM" in tasks:
            expected |= {"train/itm_acc", "train/samples_per_s"}
        assert set(tb) == expected
        assert [s for s, _ in tb["train/loss"]] == [offset + s for s in range(1, steps + 1)]
        np.testing.assert_allclose([v for _, v in tb["train/loss"]], [e["loss"] for e in entries], rtol=1e-6)
        for task in tasks:
            np.testing.assert_allclose([v for _, v in tb[f"train/loss/{task}"]],
                                       [e["losses"][task] for e in entries], rtol=1e-6)
        np.testing.assert_allclose([v for _, v in tb["train/lr"]], [e["lr"] for e in entries], rtol=1e-6)
        assert [s for s, _ in tb["eval/mlm_acc"]] == [offset + e["step"] for e in evals]
        np.testing.assert_allclose([v for _, v in tb["eval/loss_MLM"]], [e["loss_MLM"] for e in evals], rtol=1e-6)
        assert any(tag.startswith("stage") for tag in acc.Tags()["tensors"])
    # the two stages meet on one global axis: stage 2 starts right after stage 1
    _, tb2 = scalars(out / STAGE2[0] / "tensorboard")
    assert tb2["train/loss/MLM"][0][0] == STAGE1[3] + 1


def test_truncate_on_resume_drops_later_lines_and_tensorboard_events(tmp_path):
    stage_dir = tmp_path / "01-s"
    with TrainingLog(stage_dir, stage_name="s", global_step_offset=100) as tlog:
        for step in range(1, 11):
            tlog.log_step(entry(step, ["MLM"]))
            if step % 4 == 0:
                tlog.log_eval(step, {"mlm_acc": step / 10})
    with open(stage_dir / "history.jsonl", "a") as handle:  # killed mid-line
        handle.write('{"step": 11, "loss": 0.')
    # resume from the checkpoint at step 6: steps 7.. are redone with other values
    with TrainingLog(stage_dir, stage_name="s", global_step_offset=100) as tlog:
        assert tlog.last_step == 10  # the torn line was cut
        tlog.truncate(6)
        assert tlog.last_step == 6
        assert [r["step"] for r in read_lines(stage_dir / "history.jsonl")] == [1, 2, 3, 4, 5, 6]
        assert read_lines(stage_dir / "eval.jsonl") == [{"step": 4, "mlm_acc": 0.4}]
        for step in range(7, 11):
            tlog.log_step(entry(step, ["MLM"], scale=3.0))
        tlog.log_eval(8, {"mlm_acc": 0.9})
    lines = read_lines(stage_dir / "history.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 11))
    assert lines[5] == entry(6, ["MLM"]) and lines[6] == entry(7, ["MLM"], scale=3.0)
    assert read_lines(stage_dir / "eval.jsonl") == [{"step": 4, "mlm_acc": 0.4}, {"step": 8, "mlm_acc": 0.9}]
    # TensorBoard: the purge marker of the resumed event file replaces global steps 107..110
    _, tb = scalars(stage_dir / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == list(range(101, 111))
    want = [entry(s, ["MLM"], scale=1.0 if s <= 6 else 3.0)["loss"] for s in range(1, 11)]
    np.testing.assert_allclose([v for _, v in tb["train/loss"]], want, rtol=1e-6)
    assert tb["eval/mlm_acc"] == [(104, pytest.approx(0.4)), (108, pytest.approx(0.9))]


def test_a_repeated_step_without_truncate_keeps_one_line_per_step(tmp_path):
    with TrainingLog(tmp_path, stage_name="s", tensorboard=False) as tlog:
        for step in (1, 2, 3, 4):
            tlog.log_step(entry(step, ["MLM"]))
        tlog.log_step(entry(3, ["MLM"], scale=2.0))
    assert [r["step"] for r in read_lines(tmp_path / "history.jsonl")] == [1, 2, 3]
    assert read_lines(tmp_path / "history.jsonl")[-1] == entry(3, ["MLM"], scale=2.0)
    assert not (tmp_path / "tensorboard").exists()


def test_without_tensorboard_warns_once_and_keeps_the_jsonl(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(reporting, "_tensorboard_warned", False)
    with pytest.warns(RuntimeWarning, match="TensorBoard logging is off"):
        first = TrainingLog(tmp_path / "a", stage_name="a")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = TrainingLog(tmp_path / "b", stage_name="b")
    for tlog in (first, second):
        tlog.log_step(entry(1, ["MLM"]))
        tlog.log_eval(1, {"mlm_acc": 0.5})
        tlog.close()
        assert read_lines(tlog.stage_dir / "history.jsonl") == [entry(1, ["MLM"])]
        assert not (tlog.stage_dir / "tensorboard").exists()


def _check_png(path, size):
    with Image.open(path) as image:
        assert image.size == size
        pixels = np.asarray(image.convert("RGB")).astype(int)
    non_white = (pixels < 250).any(-1).mean()
    assert non_white > 0.02, f"{path} looks blank ({non_white:.3%} non-white)"
    # the smoothed curves are drawn in matplotlib's C0 blue (31, 119, 180)
    blue = (np.abs(pixels - [31, 119, 180]).sum(-1) < 30).sum()
    assert blue > 50, f"{path}: no curve drawn"


def test_plot_run_with_one_step_stage_and_new_task(run, tmp_path):
    out, _ = run
    # a third stage with a single step and a task the others lack, no eval.jsonl
    with TrainingLog(out / "03-tiny", stage_name="tiny", global_step_offset=35, tensorboard=False) as tlog:
        tlog.log_step(entry(1, ["MLM", "TITP"], metrics={"mlm_acc": 0.3}))
    stages = load_run(out)
    assert [s.dir.name for s in stages] == ["01-labels", "02-captions", "03-tiny"]
    assert [s.offset for s in stages] == [0, 20, 35]
    path = plot_loss_curves(out, per_stage=True)
    assert path == out / "loss_curves.png"
    # panels: total, MLM, MOC, ITM, TITP, train metrics (mlm_n left out), eval metrics -> 3 x 3 of 500x300
    _check_png(path, (1500, 900))
    # per stage: stage 1 has total, MLM, MOC, train metrics, eval metrics -> 3 x 2
    _check_png(out / "01-labels" / "loss_curves.png", (1500, 600))
    # the one-step stage: total, MLM, TITP, train metrics -> 2 x 2; drawn as dots
    _check_png(out / "03-tiny" / "loss_curves.png", (1000, 600))
    # a single stage folder and an explicit output path
    single = plot_loss_curves(out / "03-tiny", tmp_path / "plots" / "tiny.png")
    _check_png(single, (1000, 600))

    text = summarize(out)
    print(text)
    assert "01-labels (labels): 20 steps logged, steps 1-20" in text
    assert "02-captions (captions): 15 steps logged, steps 1-15 (global 21-35)" in text
    assert "03-tiny (tiny): 1 step logged, step 1 (global 36-36)" in text
    assert "tasks: MLM" in text and "ITM" in text and "TITP" in text
    assert "eval at step 15: loss_MLM 1.25, mlm_acc 0.5" in text


def test_missing_or_empty_history_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty-run: no training history"):
        plot_loss_curves(empty)
    (empty / "01-a").mkdir()
    (empty / "01-a" / "history.jsonl").write_text("")  # a stage that never logged a step
    with pytest.raises(FileNotFoundError, match="empty-run: no training history"):
        plot_loss_curves(empty)
    with pytest.raises(FileNotFoundError, match="nowhere: no such run or stage folder"):
        plot_loss_curves(tmp_path / "nowhere")
    assert "no training history" in summarize(empty)
    assert not (empty / "loss_curves.png").exists()


def test_eval_panels_hold_rates_apart_from_counts_and_ranks(tmp_path):
    with TrainingLog(tmp_path / "01-a", stage_name="a", tensorboard=False) as tlog:
        for step in (1, 2):
            tlog.log_step(entry(step, ["MLM", "ITM"]))
            tlog.log_eval(step, {"loss": 9.0, "loss_MLM": 4.0, "batches": 20, "mlm_acc": 0.3, "mlm_n": 640,
                                 "ir_r1": 0.1, "ir_mean_rank": 12.5})
    panels, kinds = reporting._series(load_run(tmp_path))
    assert set(panels["eval accuracy / recall"]) == {"mlm_acc", "ir_r1"}
    assert set(panels["eval (other)"]) == {"ir_mean_rank"}
    # the held-out total sums every task; training batches carry only their source's tasks
    assert "eval" not in panels["loss"] and "eval" in panels["MLM"]
    assert not any(name in curves for curves in panels.values() for name in ("mlm_n", "batches", "loss"))
