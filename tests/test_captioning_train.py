"""vlp-train captioner end to end on a small synthetic world (XE then SCST through the one
training loop, COCO metrics on the test split, exact resume), then generate-captions on the
world's images and vlp-train pretrain (singh_mlm_ccg.yaml) on the generated store."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from vlp.cli import build_main, train_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlp.builders.imports import import_coco
    from vlp.synthetic import generate
    from vlp.trainer.toydata import world_stores

    root = tmp_path_factory.mktemp("captioner-world")
    generate(root / "world", 40, seed=4, split_fractions=(0.6, 0.2, 0.2), overwrite=True, web=False)
    features, _, _ = world_stores(root / "world", root / "stores", feature_dim=32)
    annotations = root / "world" / "annotations"
    import_coco(sorted(annotations.glob("captions_*.json")), root / "stores" / "coco",
                karpathy=annotations / "dataset_coco.json", progress="off")
    return root, str(features.root), str(root / "stores" / "coco")


def _config(world, **changes) -> dict:
    _, features, pairs = world
    config = {"seed": 0, "model": {"preset": "tiny", "hidden_size": 32, "feature_dim": 32, "dropout": 0.0,
                                   "max_caption_len": 12},
              "data": {"pairs": pairs, "features": features},
              "xe": {"steps": 12, "batch_size": 8, "lr": 3.0e-3, "log_every": 0},
              "scst": {"steps": 3, "batch_size": 4, "lr": 1.0e-4, "samples": 3, "log_every": 0},
              "eval": {"max_images": 6}}
    config.update(changes)
    return config


def test_captioner_cli_trains_xe_then_scst_and_reports_coco_metrics(world, tmp_path):
    config = tmp_path / "captioner.yaml"
    config.write_text(yaml.safe_dump(_config(world)))
    out = tmp_path / "run"
    result = CliRunner().invoke(train_main, ["captioner", str(config), "--out", str(out), "--progress", "off",
                                             "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "stage xe: steps 0 -> 12" in result.output and "stage scst: steps 0 -> 3" in result.output
    assert "test: BLEU-1" in result.output
    for name in ("config.yaml", "vocab.txt", "captioner.pt", "captioner-xe.pt", "results.json",
                 "01-xe/last.json", "02-scst/last.json", "01-xe/eval.jsonl", "02-scst/history.jsonl"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    for stage in ("xe", "scst"):
        metrics = results[stage]
        assert metrics["split"] == "test" and metrics["n"] == 8  # the world's 8 test images
        assert all(0 <= metrics[f"BLEU-{n}"] <= 1 for n in range(1, 5)) and 0 <= metrics["ROUGE-L"] <= 1
        assert metrics["CIDEr-D"] >= 0 and "SPICE" in metrics["unavailable"]
        assert ("METEOR" in metrics) == (metrics["tokenizer"] == "ptb")
    evals = [json.loads(line) for line in (out / "01-xe" / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == 12 and "CIDEr-D" in evals[-1]
    scst = [json.loads(line) for line in (out / "02-scst" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in scst] == [1, 2, 3] and all("scst_reward" in h["metrics"] for h in scst)
    # a finished run is not started again without --resume; with it, both stages are skipped
    again = CliRunner().invoke(train_main, ["captioner", str(config), "--out", str(out), "--progress", "off"])
    assert again.exit_code == 1 and "--resume" in again.output
    again = CliRunner().invoke(train_main, ["captioner", str(config), "--out", str(out), "--progress", "off",
                                            "--resume"])
    assert again.exit_code == 0 and again.output.count("already finished") == 2


def test_a_stopped_captioner_run_resumes_exactly(world, tmp_path):
    from vlp.trainer.captioning.config import CaptionerConfig
    from vlp.trainer.captioning.train import train_captioner

    config = CaptionerConfig.from_dict(_config(world))
    train_captioner(config, tmp_path / "straight", evaluate_test=False)
    first = train_captioner(config, tmp_path / "stopped", stop_after_steps=7, evaluate_test=False)
    assert first[-1]["end_step"] == 7 and not (tmp_path / "stopped" / "captioner.pt").exists()
    rest = train_captioner(config, tmp_path / "stopped", evaluate_test=False)
    assert rest[0]["start_step"] == 7 and rest[1]["end_step"] == 3
    a = torch.load(tmp_path / "straight" / "captioner.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "stopped" / "captioner.pt", weights_only=True)["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_captioner_configs_are_one_line_errors(world, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_config(world, model={"preset": "tiny", "feature_dim": 64})))
    result = CliRunner().invoke(train_main, ["captioner", str(config), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "model.feature_dim: 32" in result.output and "Traceback" not in result.output
    root, features, _ = world
    config.write_text(yaml.safe_dump(_config(world, data={"pairs": features, "features": features})))
    result = CliRunner().invoke(train_main, ["captioner", str(config), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "data.pairs" in result.output
    # CONFIG may name a shipped config; an unknown name lists them (usage error)
    result = CliRunner().invoke(train_main, ["captioner", "no-such-config", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "captioner, captioner-demo" in result.output


def test_generated_captions_of_the_world_images_pretrain_with_singh_mlm_ccg(world, tmp_path):
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.schedule import shipped_configs

    _, features, _ = world
    config = tmp_path / "captioner.yaml"
    config.write_text(yaml.safe_dump(_config(world, scst=None)))
    run = tmp_path / "run"
    assert CliRunner().invoke(train_main, ["captioner", str(config), "--out", str(run), "--progress", "off"]
                              ).exit_code == 0
    ccg = tmp_path / "ccg"
    result = CliRunner().invoke(build_main, ["generate-captions", "--model", str(run), "--features", features,
                                             "--out", str(ccg), "--num-workers", "0", "--progress", "off"])
    assert result.exit_code == 0, result.output
    store = PairStore(ccg)
    assert store.kind == "generated" and len(store) == 40 and len(store.image_ids()) == 40
    assert all(p["text"] for p in store)
    pretrain = yaml.safe_load(shipped_configs()["singh_mlm_ccg"].read_text())
    pretrain["model"] = {"vocab": "demo", "bert": {"hidden": 32, "layers": 1, "heads": 2},
                         "visual": {**pretrain["model"]["visual"], "feature_dim": 32}}
    pretrain["data"]["features"] = features
    stage = pretrain["stages"][0]
    stage.update(pairs=str(ccg), steps=3, batch_size=8, checkpoint_every=0, log_every=0)
    stage.pop("epochs")
    path = tmp_path / "ccg.yaml"
    path.write_text(yaml.safe_dump(pretrain))
    result = CliRunner().invoke(train_main, ["pretrain", str(path), "--out", str(tmp_path / "pre"), "--progress",
                                             "off", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (tmp_path / "pre" / "01-mlm_ccg" / "history.jsonl").read_text()
               .splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3] and all(h["losses"]["MLM"] > 0 for h in history)


def test_two_ddp_workers_train_the_captioner_as_one_process_with_grad_accum_2(world, tmp_path):
    import dataclasses

    from vlp.trainer.captioning.config import CaptionerConfig
    from vlp.trainer.captioning.train import run_distributed_captioner, train_captioner

    config = CaptionerConfig.from_dict(_config(world, xe={"steps": 3, "batch_size": 4, "lr": 3.0e-3, "log_every": 0},
                                               scst={"steps": 2, "batch_size": 2, "lr": 1.0e-4, "samples": 2,
                                                     "log_every": 0}))
    one = dataclasses.replace(config, xe=dataclasses.replace(config.xe, grad_accum=2),
                              scst=dataclasses.replace(config.scst, grad_accum=2))
    train_captioner(one, tmp_path / "one", evaluate_test=False)
    summaries = run_distributed_captioner(config, tmp_path / "ddp", num_workers=2, device="cpu",
                                          evaluate_test=False)
    assert [(s["stage"], s["end_step"]) for s in summaries] == [("xe", 3), ("scst", 2)]
    for stage in ("01-xe", "02-scst"):
        a = [json.loads(line) for line in (tmp_path / "one" / stage / "history.jsonl").read_text().splitlines()]
        b = [json.loads(line) for line in (tmp_path / "ddp" / stage / "history.jsonl").read_text().splitlines()]
        assert [h["samples"] for h in a] == [h["samples"] for h in b]
        assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], abs=1e-4)
    x = torch.load(tmp_path / "one" / "captioner.pt", weights_only=True)["state"]
    y = torch.load(tmp_path / "ddp" / "captioner.pt", weights_only=True)["state"]
    assert all(torch.allclose(x[k], y[k], atol=1e-4) for k in x)
