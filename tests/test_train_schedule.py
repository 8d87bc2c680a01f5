"""Multi-stage schedules from YAML: hand-over, skip finished stages, resume across stages."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import yaml

from vlp.trainer.schedule import (build_encoder, build_tokenizer, hand_over, load_config, run_stages,
                                  shipped_configs, validate_config)
from vlp.trainer.tasks import PretrainModel, TaskContext, make_tasks
from vlp.trainer.toydata import world_stores


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from vlp.builders.labels import build_objects_labels
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("schedule")
    generate(root / "world", 30, seed=4, split_fractions=(1.0, 0.0, 0.0), overwrite=True, web=False)
    features, captions, vocab = world_stores(root / "world", root / "stores", feature_dim=16)
    build_objects_labels(features.root, root / "stores" / "labels", progress="off")
    common = dict(steps=4, batch_size=4, lr=1e-3, checkpoint_every=2, log_every=0, bucket_batches=2)
    config = {
        "seed": 0,
        "model": {"vocab": str(vocab), "bert": {"hidden": 32, "layers": 2, "heads": 2},
                  "visual": {"feature_dim": 16, "box_dims": 5}},
        "data": {"features": str(root / "stores" / "features"), "max_text_len": 24},
        "stages": [
            {"name": "labels", "pairs": str(root / "stores" / "labels"), "tasks": {"MLM": 1.0, "MOC": 1.0},
             **common},
            {"name": "captions", "pairs": str(captions.root), "tasks": {"MLM": 1.0, "ITM": 0.5},
             **common, "schedule": "cosine", "grad_accum": 2},
        ],
    }
    path = root / "schedule.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _losses(summaries):
    return [h["loss"] for s in summaries for h in s.get("history", [])]


def test_two_stages_resume_across_the_boundary(config, tmp_path):
    cfg = load_config(config)
    full = run_stages(cfg, tmp_path / "full")
    assert [s["stage"] for s in full] == ["labels", "captions"]
    assert full[1]["carried_heads"] == ["MLM"]
    assert (tmp_path / "full" / "01-labels" / "checkpoint-0000004.pt").is_file()
    assert json.loads((tmp_path / "full" / "02-captions" / "last.json").read_text())["step"] == 4
    reference = _losses(full)
    assert len(reference) == 8

    # interrupted mid stage 1, then mid stage 2, then finished: the same losses, exactly
    parts = run_stages(cfg, tmp_path / "cut", stop_after_steps=3)
    parts += run_stages(cfg, tmp_path / "cut", stop_after_steps=3)
    parts += run_stages(cfg, tmp_path / "cut")
    # resumed from checkpoints at step 2 of each stage: steps 3 are redone, identically
    redone = [h for s in parts for h in s.get("history", [])]
    by_stage_step = {}
    for s in parts:
        for h in s.get("history", []):
            by_stage_step[(s["stage"], h["step"])] = h["loss"]
    again = [by_stage_step[(s, k)] for s in ("labels", "captions") for k in range(1, 5)]
    assert again == reference
    assert len(redone) > 8

    # a finished schedule is skipped entirely
    rerun = run_stages(cfg, tmp_path / "full")
    assert all(s["skipped"] for s in rerun)


def test_hand_over_copies_encoder_and_shared_heads(config):
    cfg = load_config(config)
    tok = build_tokenizer(cfg)
    ctx = TaskContext.from_tokenizer(tok)
    torch.manual_seed(0)
    first = PretrainModel(build_encoder(cfg, tok), make_tasks(["MLM", "MOC"]), ctx)
    torch.manual_seed(1)
    second = PretrainModel(build_encoder(cfg, tok), make_tasks(["MLM", "ITM"]), ctx)
    itm_before = second.heads["ITM"].weight.clone()
    assert hand_over(second, first.state_dict()) == ["MLM"]
    a, b = first.state_dict(), second.state_dict()
    for key in a:
        if key.startswith(("encoder.", "heads.MLM.")):
            assert torch.equal(a[key], b[key]), key
    assert torch.equal(second.heads["ITM"].weight, itm_before)


def test_top_level_seed_reaches_the_stages(config, tmp_path):
    from vlp.trainer.schedule import stage_trainer

    def first_batches(cfg):
        tok = build_tokenizer(cfg)
        trainer, _ = stage_trainer(cfg, 0, tmp_path / str(cfg.get("seed")), encoder=build_encoder(cfg, tok),
                                   tokenizer=tok)
        trainer.close()
        return trainer.stage.seed, [item[-1] for _, item in zip(range(3), trainer.plan.iterate(0))]

    cfg = yaml.safe_load(config.read_text())
    seed0, batches0 = first_batches(cfg)
    cfg["seed"] = 1
    seed1, batches1 = first_batches(cfg)
    assert (seed0, seed1) == (0, 1) and batches0 != batches1
    cfg["seed"], cfg["stages"][0]["seed"] = 5, 0  # a stage's own seed wins
    assert first_batches(cfg) == (0, batches0)


def test_shipped_configs_validate():
    configs = shipped_configs()
    assert {"lamp", "vl_bert", "imagebert"} <= set(configs)
    for path in configs.values():
        load_config(path)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("stages"), "stages"),
    (lambda c: c["stages"][0].update(lr_typo=1), "lr_typo"),
    (lambda c: c["stages"][1].update(name="labels"), "distinct"),
    (lambda c: c["model"].pop("vocab"), "text_checkpoint"),
    (lambda c: c["stages"][0].update(sources=[{"pairs": c["stages"][0].pop("pairs"), "ratio": -1}]),
     r"stages\[0\]\.sources\[0\]: ratio must be a positive number"),
    (lambda c: c["stages"][0].update(sources=[{"pairs": c["stages"][0].pop("pairs"), "tasks": ["ITM"]}]),
     r"stages\[0\]\.sources\[0\]: task\(s\) \['ITM'\] are not among the stage's tasks"),
    (lambda c: c["stages"][0].update(epochs=2), "either steps or epochs"),
    # YAML reads 1e-4 (no dot) as a string
    (lambda c: c["stages"][0].update(lr="1e-4"), r"stages\[0\]: lr must be a number.*write it with a dot"),
    (lambda c: c["stages"][0].update(batch_size=8.5), r"stages\[0\]: batch_size must be a whole number"),
    (lambda c: c["stages"][0].update(text_mask_prob=1.5), r"text_mask_prob must be between 0 and 1"),
    (lambda c: c["data"].update(max_region=36), r"data: unknown key\(s\): max_region"),
    (lambda c: c["data"].update(max_regions=0), r"data: max_regions must be a whole number of at least 1"),
    (lambda c: c["model"]["visual"].update(box_dim=4), r"model\.visual: unknown key\(s\): box_dim \(known: "),
    (lambda c: c["model"]["bert"].update(layer=2), r"model\.bert: unknown key\(s\): layer \(known: heads, "),
    (lambda c: c["model"]["visual"].update(box_dims=6), r"model\.visual: box_dims must be 4, 5 or 7"),
    (lambda c: c["stages"][0].update(split=3), r"stages\[0\]: split must be a split name or a list of them"),
    (lambda c: c.update(seed="1"), "seed must be a non-negative whole number"),
    (lambda c: c["stages"][0].update(tasks=[{"name": "MOC", "min_confidence": 0.2}]),
     r"task MOC: unknown option\(s\) min_confidence \(its options: min_conf, attributes\)"),
    (lambda c: c["stages"][0].update(sources=[{"pairs": c["stages"][0].pop("pairs")}], max_regions=36),
     r"stages\[0\]: with sources, max_regions belong\(s\) on each source"),
    (lambda c: c["stages"][1].update(tasks={"MLM": 1.0, "ITM_HS": 1.0}),
     r"stages\[1\]: ITM_HS needs hard_negatives"),
    # a ratio beside a source without one is a share of all batches: below 1
    (lambda c: c["stages"][0].update(sources=[{"pairs": c["stages"][0]["pairs"]},
                                              {"pairs": c["stages"][0].pop("pairs"), "ratio": 1}]),
     r"stages\[0\]: the sources' ratios \[None, 1\] add up to 1"),
])
def test_config_errors_name_the_key(config, change, message):
    cfg = yaml.safe_load(config.read_text())
    change(cfg)
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)


def test_lxmert_s_schedule(config, tmp_path):
    cfg = yaml.safe_load(config.read_text())
    cfg["model"] = {"architecture": "lxmert_s", "vocab": cfg["model"]["vocab"],
                    "lxmert": {"hidden": 32, "heads": 2, "x_layers": 1},
                    "visual": {"feature_dim": 16, "box_dims": 4}}
    cfg["stages"] = [dict(cfg["stages"][1], steps=2)]
    summary = run_stages(cfg, tmp_path / "lx")
    assert summary[0]["end_step"] == 2 and all(h["loss"] > 0 for h in summary[0]["history"])
    with pytest.raises(ValueError, match="architecture must be single_stream or lxmert_s"):
        build_encoder(dict(cfg, model=dict(cfg["model"], architecture="two_tower")), build_tokenizer(cfg))


def test_cli_pretrain_runs_resumes_and_reports_config_errors(config, tmp_path):
    from click.testing import CliRunner

    from vlp.cli import train_main

    out = tmp_path / "run"
    # A killed run is simulated by the library's step budget; the command resumes it.
    run_stages(load_config(config), out, stop_after_steps=3)
    refused = CliRunner().invoke(train_main, ["pretrain", str(config), "--out", str(out), "--device", "cpu"])
    assert refused.exit_code == 1 and "already holds a run (stages 01-labels); pass --resume" in refused.output
    rest = CliRunner().invoke(train_main, ["pretrain", str(config), "--out", str(out), "--device", "cpu",
                                           "--resume"])
    assert rest.exit_code == 0, rest.output
    assert "stage labels: steps 2 -> 4, last loss" in rest.output  # from the step-2 checkpoint
    assert "stage captions: steps 0 -> 4" in rest.output
    assert (out / "config.yaml").is_file() and (out / "loss_curves.png").is_file()
    again = CliRunner().invoke(train_main, ["pretrain", str(config), "--out", str(out), "--device", "cpu",
                                            "--resume"])
    assert "stage labels: already finished" in again.output and "stage captions: already finished" in again.output
    assert "warning" not in again.output
    # a changed config is named key by key; the record of the run stays the one it started with
    changed = yaml.safe_load(config.read_text())
    changed["stages"][1]["lr"] = 5e-4
    changed["stages"][1]["steps"] = 6
    changed_path = tmp_path / "changed.yaml"
    changed_path.write_text(yaml.safe_dump(changed))
    warned = CliRunner().invoke(train_main, ["pretrain", str(changed_path), "--out", str(out), "--device", "cpu",
                                             "--resume"])
    assert warned.exit_code == 0, warned.output
    assert "stages[1].steps: 4 -> 6" in warned.output and "stages[1].lr: 0.001 -> 0.0005" in warned.output, warned.output
    assert "more steps for a finished stage are ignored" in warned.output
    assert yaml.safe_load((out / "config.yaml").read_text()) == load_config(config).to_dict()
    # stores are opened before anything is written; errors name the key
    for key, value, message in [
            ("pairs", str(tmp_path / "nope"), r"stages\[1\]\.pairs: .*nope"),
            ("feature_dim", 32, r"data\.features: .* holds 16-d features, model\.visual\.feature_dim is 32: "
                                r"set model\.visual\.feature_dim: 16")]:
        wrong = yaml.safe_load(config.read_text())
        if key == "pairs":
            wrong["stages"][1]["pairs"] = value
        else:
            wrong["model"]["visual"]["feature_dim"] = value
        wrong_path = tmp_path / f"wrong-{key}.yaml"
        wrong_path.write_text(yaml.safe_dump(wrong))
        result = CliRunner().invoke(train_main, ["pretrain", str(wrong_path), "--out", str(tmp_path / key)])
        assert result.exit_code == 1 and re.search(message, result.output), result.output
        assert not (tmp_path / key).exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text(config.read_text().replace("tasks:", "taskz:", 1))
    bad = CliRunner().invoke(train_main, ["pretrain", str(broken), "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "Error:" in bad.output and "Traceback" not in bad.output


def test_stop_request_checkpoints_and_resumes_exactly(config, tmp_path):
    cfg = load_config(config)
    reference = _losses(run_stages(cfg, tmp_path / "full"))
    asked = []

    def stop_at_step_3():  # asked after every optimizer step; checkpoint_every is 2
        asked.append(1)
        return len(asked) == 3

    first = run_stages(cfg, tmp_path / "cut", should_stop=stop_at_step_3)
    assert [s["end_step"] for s in first] == [3]
    assert (tmp_path / "cut" / "01-labels" / "checkpoint-0000003.pt").is_file()
    rest = run_stages(cfg, tmp_path / "cut")
    assert rest[0]["start_step"] == 3
    assert _losses(first) + _losses(rest) == reference


@pytest.mark.slow
def test_ctrl_c_stops_the_cli_after_a_step_with_a_checkpoint(config, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cfg = yaml.safe_load(config.read_text())
    cfg["stages"] = [dict(cfg["stages"][0], steps=100_000, checkpoint_every=0)]
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", "from vlp.cli import train_main; train_main()",
                             "pretrain", str(path), "--out", str(out),
                             "--device", "cpu", "--progress", "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    history = out / "01-labels" / "history.jsonl"
    deadline = time.time() + 120
    while not (history.is_file() and history.read_text().count("\n") >= 2) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "stopping after this step" in output and "--resume" in output and "Traceback" not in output
    step = json.loads((out / "01-labels" / "last.json").read_text())["step"]
    assert 2 <= step < 100_000 and (out / "01-labels" / f"checkpoint-{step:07d}.pt").is_file()
    assert f"interrupted at step {step} of 100000 in stage labels" in output


def test_check_stores_names_a_missing_split_and_a_wrong_store_kind(config):
    from vlp.trainer.schedule import check_stores

    cfg = yaml.safe_load(config.read_text())
    cfg["stages"][1]["split"] = "train"  # the synthetic world's captions are all train
    check_stores(cfg)
    cfg["stages"][1]["split"] = "val"
    with pytest.raises(ValueError, match=r"stages\[1\]\.split: .*no pair of split val \(the store has: train "):
        check_stores(cfg)
    cfg["stages"][1].update(split="train", tasks={"MLM": 1.0, "ITM_HS": 1.0}, hard_negatives=cfg["stages"][1]["pairs"])
    validate_config(cfg)
    with pytest.raises(ValueError, match=r"stages\[1\]\.hard_negatives: .* holds caption pairs, not hard_negatives"):
        check_stores(cfg)


def test_a_list_of_splits_is_checked_and_trained(config, tmp_path):
    """README: ``split: [train, restval]``; check_stores hashed the list (TypeError)."""
    from vlp.trainer.schedule import check_stores

    cfg = yaml.safe_load(config.read_text())
    cfg["stages"][1]["split"] = ["train", "restval"]
    check_stores(cfg)
    cfg["stages"] = cfg["stages"][1:]
    cfg["stages"][0]["steps"] = 1
    summary = run_stages(cfg, tmp_path / "run")[0]
    assert summary["end_step"] == 1
    cfg["stages"][0]["split"] = ["val", "test"]
    with pytest.raises(ValueError, match=r"stages\[0\]\.split: .*no pair of split test/val \(the store has: train "):
        check_stores(cfg)


def test_a_mixed_stage_logs_plots_and_summarizes_each_source(config, tmp_path):
    from vlp.trainer.reporting import _series, load_run, summarize

    cfg = yaml.safe_load(config.read_text())
    labels, captions = cfg["stages"][0]["pairs"], cfg["stages"][1]["pairs"]
    cfg["stages"] = [{"name": "mixed", "tasks": {"MLM": 1.0, "MOC": 1.0, "ITM": 1.0}, "steps": 12, "batch_size": 4,
                      "lr": 1e-3, "log_every": 0, "bucket_batches": 2,
                      "sources": [{"name": "captions", "pairs": captions},
                                  {"name": "labels", "pairs": labels, "tasks": ["MLM", "MOC"]}]}]
    summary = run_stages(cfg, tmp_path / "run")[0]
    history = [json.loads(line) for line in (tmp_path / "run" / "01-mixed" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 12
    seen = set()
    for entry in history:
        (name,) = entry["sources"]  # grad_accum 1: one source per step, named
        assert entry["source"] == name and entry["sources"][name]["loss"] == pytest.approx(entry["loss"])
        seen.add(name)
        if name == "labels":
            assert "ITM" not in entry["sources"][name]
        for key, value in entry["metrics"].items():
            if key.endswith("_n"):
                assert isinstance(value, int)
    assert seen == {"captions", "labels"}
    assert set(summary["source_losses"]) == {"captions", "labels"}
    text = summarize(tmp_path / "run")
    assert re.search(r"loss by source: captions [\d.]+ -> [\d.]+ \(\d+ steps?\), labels [\d.]+ -> [\d.]+", text), text
    assert re.search(r"mlm_n \d+/step", text) and not re.search(r"mlm_n \d+\.\d", text), text
    panels, _ = _series(load_run(tmp_path / "run"))
    assert set(panels["loss"]) == {"captions", "labels"} and set(panels["MOC"]) == {"captions", "labels"}
    assert set(panels["ITM"]) == {"captions"}
