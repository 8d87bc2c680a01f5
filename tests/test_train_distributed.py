"""Data-parallel pretraining on Ray Train: 2 CPU workers (gloo) against one process.

Rank r of W workers takes the global micro-batches j = r mod W, and every random draw
spent on a micro-batch is seeded by j, so 2 workers with grad_accum 1 must give the
gradients of 1 process with grad_accum 2 over the same global batch. Tolerance: float32
sums in another order (gloo all-reduce vs. accumulation): 1e-5 relative to the largest
gradient of each tensor, and 1e-5 absolute on losses.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

from vlp.trainer.data import LengthBucketBatchSampler, MixturePlan
from vlp.trainer.schedule import build_encoder, build_tokenizer, run_stages, stage_trainer
from vlp.trainer.toydata import world_stores

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from vlp.builders.labels import build_objects_labels
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("ddp")
    generate(root / "world", 24, seed=5, split_fractions=(1.0, 0.0, 0.0), overwrite=True, web=False)
    features, captions, vocab = world_stores(root / "world", root / "stores", feature_dim=16)
    build_objects_labels(features.root, root / "stores" / "labels", progress="off")
    # Two sources with different tasks: heads sit out some micro-batches (DDP must cope).
    # The seed is the first whose plan puts both sources into the first step.
    dummy = [LengthBucketBatchSampler(np.ones(12), 6)] * 2
    seed = next(s for s in range(100) if {MixturePlan(dummy, [1, 1], seed=s).source_of(j) for j in (0, 1)} == {0, 1})
    stage = {"name": "mixed", "tasks": {"MLM": 1.0, "ITM": 1.0, "MOC": 1.0, "MRFR": 0.5},
             "sources": [{"name": "captions", "pairs": str(captions.root), "tasks": ["MLM", "ITM", "MRFR"],
                          "ratio": 1},
                         {"name": "labels", "pairs": str(root / "stores" / "labels"), "tasks": ["MOC", "MRFR"],
                          "ratio": 1}],
             "steps": 3, "batch_size": 6, "grad_accum": 1, "lr": 1e-3, "log_every": 0, "bucket_batches": 2,
             "seed": seed}
    return {"seed": 0,
            "model": {"vocab": str(vocab), "bert": {"hidden": 32, "layers": 2, "heads": 2},
                      "visual": {"feature_dim": 16, "box_dims": 5}},
            "data": {"features": str(root / "stores" / "features"), "max_text_len": 24},
            "stages": [stage]}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def _first_step_gradients(config, out_dir, *, rank=0, world_size=1):
    torch.manual_seed(int(config["seed"]))
    tokenizer = build_tokenizer(config)
    encoder = build_encoder(config, tokenizer)
    trainer, _ = stage_trainer(config, 0, out_dir, encoder=encoder, tokenizer=tokenizer,
                               rank=rank, world_size=world_size)
    captured = {}

    def keep(trainer, entry):
        captured["entry"] = entry
        captured["grads"] = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()
                             if p.grad is not None}

    trainer.train(max_steps=1, callback=keep)
    trainer.close()
    return captured


def _ddp_worker(settings):
    import ray.train

    torch.set_num_threads(1)
    context = ray.train.get_context()
    captured = _first_step_gradients(settings["config"], settings["out"], rank=context.get_world_rank(),
                                     world_size=context.get_world_size())
    if context.get_world_rank() == 0:
        torch.save(captured, settings["grads"])


@pytest.mark.slow
def test_two_worker_ddp_gradients_equal_one_process(config, ray_cluster, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker runs this test's function
    TorchTrainer(_ddp_worker, train_loop_config={"config": config, "out": str(tmp_path / "ddp"),
                                                 "grads": str(tmp_path / "grads.pt")},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="ddp")).fit()
    ddp = torch.load(tmp_path / "grads.pt", weights_only=False)

    single_config = json.loads(json.dumps(config))
    single_config["stages"][0]["grad_accum"] = 2
    single = _first_step_gradients(single_config, tmp_path / "single")

    assert ddp["entry"]["samples"] == single["entry"]["samples"] == 12
    assert set(ddp["grads"]) == set(single["grads"])
    assert any(name.startswith("heads.MOC.") for name in single["grads"])  # both sources were in the step
    for name, grad in single["grads"].items():
        scale = grad.abs().max().item()
        diff = (ddp["grads"][name] - grad).abs().max().item()
        assert diff <= 1e-5 * max(scale, 1e-3), f"{name}: max |diff| {diff:.3g} vs max |grad| {scale:.3g}"
    assert abs(ddp["entry"]["loss"] - single["entry"]["loss"]) < 1e-5
    for task, value in single["entry"]["losses"].items():
        assert abs(ddp["entry"]["losses"][task] - value) < 1e-5, task


@pytest.mark.slow
def test_run_stages_on_two_workers_matches_one_process(config, ray_cluster, tmp_path):
    from vlp.trainer.runs import train

    summaries = train(config, tmp_path / "ddp", num_workers=2, device="cpu", progress="lines")
    assert summaries[0]["end_step"] == 3 and "history" not in summaries[0]
    stage_dir = tmp_path / "ddp" / "01-mixed"
    assert (stage_dir / "checkpoint-0000003.pt").is_file()
    ddp = [json.loads(line) for line in (stage_dir / "history.jsonl").read_text().splitlines()]

    single_config = json.loads(json.dumps(config))
    single_config["stages"][0]["grad_accum"] = 2
    single = run_stages(single_config, tmp_path / "single")[0]["history"]
    assert [h["step"] for h in ddp] == [1, 2, 3]
    for a, b in zip(ddp, single):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"]
    assert summaries[0]["last_loss"] == ddp[-1]["loss"]  # what the command prints as "last loss"
    # the model: the same after 3 AdamW steps (fp32 tolerance)
    a = torch.load(stage_dir / "checkpoint-0000003.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "single" / "01-mixed" / "checkpoint-0000003.pt", weights_only=True)["model"]
    for name in b:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


# -- finetuning ----------------------------------------------------------------------------

FT_COLORS = ["red", "blue", "green", "yellow"]


@pytest.fixture(scope="module")
def finetune_config(tmp_path_factory):
    """A VQA task on hand-made stores: 40 images, 32 train / 8 val questions."""
    from vlp.schemas.pairs import PairStoreWriter
    from vlp.trainer.toydata import tiny_feature_store, write_vocab

    root = tmp_path_factory.mktemp("ddp-finetune")
    ids = [f"img{i}" for i in range(40)]
    tiny_feature_store(root / "features", ids, feature_dim=16, max_boxes=6)
    write_vocab(root / "vocab.txt", "what color is it the red blue green yellow".split())
    with PairStoreWriter(root / "pairs", "question") as writer:
        for i, image_id in enumerate(ids):
            color = FT_COLORS[i % 4]
            writer.add({"pair_id": f"vqa/{i}", "image_id": image_id, "split": "train" if i < 32 else "val",
                        "text": "what color is it", "question_id": str(100 + i),
                        "answers": [color] if color == "red" else [color, "red"],
                        "answer_scores": [1.0] if color == "red" else [1.0, 0.3], "answer_type": "other",
                        "question_type": "what color"})
    return {"seed": 0,
            "model": {"vocab": str(root / "vocab.txt"), "bert": {"hidden": 32, "layers": 1, "heads": 2},
                      "visual": {"feature_dim": 16}},
            "data": {"features": str(root / "features"), "max_text_len": 16, "max_regions": 6},
            "task": {"name": "vqa", "pairs": str(root / "pairs")},
            "train": {"steps": 4, "batch_size": 8, "grad_accum": 1, "lr": 1.0e-3, "eval_every": 2,
                      "log_every": 0}}


@pytest.mark.slow
def test_finetune_on_two_workers_matches_one_process(finetune_config, ray_cluster, tmp_path):
    """`vlp-train finetune --num-workers 2` (rank 0 writing the run folder and validating)
    against finetune() in one process with grad_accum 2 over the same global batches: the
    same losses, final weights and best.json."""
    import yaml
    from click.testing import CliRunner

    from vlp.cli import train_main
    from vlp.trainer.config import FinetuneConfig
    from vlp.trainer.finetune import finetune

    config_path = tmp_path / "ft.yaml"
    config_path.write_text(yaml.safe_dump(finetune_config))
    run = tmp_path / "ddp"
    result = CliRunner().invoke(train_main, ["finetune", str(config_path), "-o", str(run), "--num-workers", "2",
                                             "--device", "cpu", "--progress", "off"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "vqa: steps 0 -> 4 of 4" in result.output and "best: step" in result.output

    single_config = json.loads(json.dumps(finetune_config))
    single_config["train"]["grad_accum"] = 2
    single = finetune(FinetuneConfig.from_dict(single_config), tmp_path / "single")
    ddp = [json.loads(line) for line in (run / "01-finetune" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in ddp] == [1, 2, 3, 4]
    assert [h["samples"] for h in ddp] == [h["samples"] for h in single["history"]] == [16] * 4
    for a, b in zip(ddp, single["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    a = torch.load(run / "01-finetune" / "checkpoint-0000004.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "single" / "01-finetune" / "checkpoint-0000004.pt", weights_only=True)["model"]
    assert set(a) == set(b)
    for name in b:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    best_ddp, best_single = (json.loads((d / "best.json").read_text()) for d in (run, tmp_path / "single"))
    assert best_ddp["metric"] == "accuracy" and best_ddp["step"] == best_single["step"]
    assert best_ddp["value"] == pytest.approx(best_single["value"], abs=1e-9)
    assert best_ddp["metrics"] == pytest.approx(best_single["metrics"], abs=1e-9)
    evals = [json.loads(line) for line in (run / "01-finetune" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and all(e["n"] == 8 for e in evals)
    assert json.loads((run / "labels.json").read_text())["labels"][0] == "red"
    results = json.loads((run / "results.json").read_text())
    assert results["best"]["step"] == best_single["step"] and results["final"]["step"] == 4



def test_worker_error_becomes_one_line():
    """Ray Train reports worker errors as a WorkerGroupError whose text is a truncated
    traceback; the driver's one line is rank 0's own exception message, first line."""
    from vlp.trainer.distributed import _root_message
    from vlp.trainer.finetune import InitError

    WorkerGroupError = pytest.importorskip("ray.train").WorkerGroupError
    failures = {1: InitError("--init bad.pt: cannot read a checkpoint (rank 1)"),
                0: InitError("--init bad.pt: cannot read a checkpoint (Weights only load failed.\nCheck the docs.)")}
    error = WorkerGroupError("[Rank 0,1 Error Snippet]:\nTraceback (most recent call last):\n... (Output truncated.",
                             failures)
    assert _root_message(error) == "--init bad.pt: cannot read a checkpoint (Weights only load failed."
    wrapped = RuntimeError("Traceback (most recent call last):\n  File x\nValueError: bad value")
    assert _root_message(wrapped) == "ValueError: bad value"
