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
    generate(root / "world", 24, seed=5, split_fractions=(1.0, 0.0, 0.0), overwrite=True)
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
