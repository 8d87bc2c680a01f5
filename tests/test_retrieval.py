"""Image-text retrieval finetuning (vlp.trainer.retrieval): each loss trains and evaluates end
to end on the synthetic world's Karpathy-format captions (tiny model, few steps) and on a
hand-made Flickr30k Karpathy file; negatives never share the positive's image; the hinge keeps
the hardest candidates as scored without gradient; the N x M scoring matches pair-by-pair
scores, with a shortlist of K >= N and on two Ray workers; zero-shot from a pretraining run's
ITM head; config errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from vlp.trainer.config import ConfigError, FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """80 images (64 train / 8 val / 8 test, five captions each), oracle features, and the
    caption store imported from the world's Karpathy split file (dataset_coco.json)."""
    from vlp.builders import imports
    from vlp.synthetic import generate
    from vlp.synthetic.oracle import truth_feature_store

    root = tmp_path_factory.mktemp("retrieval-world")
    generate(root / "world", 80, seed=1, overwrite=True, web=False)
    truth_feature_store(root / "world", root / "features", feature_dim=32)
    result = imports.import_coco([], root / "pairs", karpathy=root / "world" / "annotations" / "dataset_coco.json",
                                 features=root / "features", progress="off")
    assert result.num_pairs == 400
    return root


def _config(root: Path, steps: int = 4, pairs=None, features=None, vocab="demo", **task) -> dict:
    return {"seed": 0, "model": {"vocab": vocab, "bert": {"hidden": 32, "layers": 1, "heads": 2},
                                 "visual": {"feature_dim": 32}},
            "data": {"features": str(features or root / "features"), "max_text_len": 32, "max_regions": 12},
            "task": {"name": "retrieval", "pairs": str(pairs or root / "pairs"), **task},
            "train": {"steps": steps, "batch_size": 8, "lr": 1.0e-3, "eval_every": max(1, steps // 2),
                      "log_every": 0}}


def _finetune(config: dict, out, **kw):
    from vlp.trainer.finetune import finetune

    return finetune(FinetuneConfig.from_dict(config), out, **kw)


def _model_and_batch(root, **task):
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.data import collate, load_tokenizer
    from vlp.trainer.finetune import build_model, make_task, task_dataset
    from vlp.trainer.schedule import build_tokenizer

    config = FinetuneConfig.from_dict(_config(root, **task))
    tokenizer = build_tokenizer(config) if config.model.vocab else load_tokenizer(config.model.vocab)
    task_ = make_task(config, ["matched"])
    model = build_model(config, task_, tokenizer)
    dataset = task_dataset(config, task_, PairStore(config.task.pairs), FeatureStore(config.task.features), tokenizer,
                           ["train"], train=True)
    task_.bind(model, dataset)
    return model, dataset, collate([dataset[i] for i in range(0, 40, 5)], model.ctx.pad_id)  # 8 distinct images


# -- training end to end ------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["bce", pytest.param("ce", marks=pytest.mark.slow),
                                  pytest.param("hinge", marks=pytest.mark.slow)])
def test_each_loss_trains_and_evaluates_on_the_world(world, tmp_path, loss):
    from vlp.trainer.finetune import evaluate_run

    run = tmp_path / "run"
    summary = _finetune(_config(world, loss=loss, negatives=2, candidates=12), run)
    assert summary["end_step"] == 4 and summary["labels"] == 1 and summary["label_source"] == "fixed"
    assert all(np.isfinite(h["loss"]) for h in summary["history"])
    evals = [json.loads(line) for line in (run / "01-finetune" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:  # 8 val images x 5 captions, every pair scored
        assert (e["n_images"], e["n_texts"], e["pairs_scored"]) == (8, 40, 320)
        assert 0 <= e["ir_r1"] <= e["ir_r5"] <= e["ir_r10"] == 1.0  # R@10 of 8 images
        assert e["r_mean"] == pytest.approx(np.mean([e[k] for k in ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5",
                                                                     "tr_r10")]))
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "r_mean" and best["value"] == max(e["r_mean"] for e in evals)
    entry = evaluate_run(run, world / "pairs", world / "features", split=["test"], predictions=tmp_path / "p.jsonl")
    assert entry["metrics"]["n_images"] == 8 and entry["metrics"]["n"] == 40
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(len(r["ranked_images"]) == 8 and r["image_id"] in r["ranked_images"] for r in rows)
    assert "retrieval" in (run / "results.md").read_text()


def test_sampled_negatives_never_show_the_positives_image(world):
    from vlp.trainer.tasks import prepare_batch

    for loss, negatives in (("bce", 1), ("ce", 3)):
        model, _, batch = _model_and_batch(world, loss=loss, negatives=negatives, candidates=0)
        texts_before = batch["input_ids"].clone()
        prepared = prepare_batch(batch, [model.task], torch.Generator().manual_seed(0), model.ctx)
        groups = prepared["retrieval_groups"]
        assert groups == 1 + negatives and prepared["input_ids"].shape[0] == 8 * groups
        assert prepared["retrieval_valid"].all()
        # group 0 is the positives unchanged
        n = texts_before.shape[1]
        assert torch.equal(prepared["input_ids"][:8, :n], texts_before[:, :prepared["input_ids"].shape[1]][:, :n])
        feats = prepared["region_features"]
        for g in range(1, groups):
            for i in range(8):
                row = g * 8 + i
                same_text = torch.equal(prepared["input_ids"][row], prepared["input_ids"][i])
                same_image = torch.equal(feats[row], feats[i])
                assert same_text != same_image  # exactly one side is replaced ...
        loss_value, metrics = model.task.loss(model.encode(prepared), prepared, model.head(model.task.name), model.ctx)
        assert torch.isfinite(loss_value) and metrics["retrieval_n"] == 8


def test_ce_first_image_negative_is_the_stores_hard_negative(world):
    """With a hard-negatives store (vlp-build hard-negatives), each caption's first image
    negative under ce is its image's hard negative (VOLTA's "hard image")."""
    from vlp.builders.hard_negatives import build_hard_negatives
    from vlp.trainer.tasks import prepare_batch

    hard = world / "hard-negatives"
    if not hard.exists():
        build_hard_negatives(world / "features", hard, top_m=3, device="cpu", progress="off")
    model, dataset, batch = _model_and_batch(world, loss="ce", negatives=2, candidates=0, hard_negatives=str(hard))
    assert dataset.hard_negatives and "negative" in batch
    valid = batch["negative"]["negative_valid"]
    assert valid.all()
    prepared = prepare_batch(batch, [model.task], torch.Generator().manual_seed(0), model.ctx)
    shown = prepared["region_features"][8:16]  # group 1
    for i in range(8):
        n = int(batch["negative"]["region_mask"][i].sum())
        assert batch["negative"]["image_id"][i] != batch["image_id"][i]
        assert torch.equal(shown[i, :n], batch["negative"]["region_features"][i, :n])
        assert torch.equal(prepared["input_ids"][8 + i], prepared["input_ids"][i])  # the caption stays


def test_hinge_keeps_the_hardest_candidates_scored_without_gradient(world):
    from vlp.trainer.retrieval import cat_images, cat_texts, pair_scores
    from vlp.trainer.tasks import prepare_batch

    model, _, batch = _model_and_batch(world, loss="hinge", negatives=2, candidates=8)
    texts = cat_texts([{k: batch[k] for k in ("input_ids", "text_mask", "token_regions")}], model.ctx.pad_id)
    images = cat_images([{k: batch[k] for k in ("region_features", "region_boxes", "region_mask")}])
    full = pair_scores(model, texts, images, torch.arange(8).repeat_interleave(8), torch.arange(8).repeat(8)).view(8, 8)
    prepared = prepare_batch(batch, [model.task], torch.Generator().manual_seed(0), model.ctx)
    assert prepared["retrieval_groups"] == 5  # positive + 2 hardest images + 2 hardest captions
    masked = full.clone()
    masked.fill_diagonal_(-float("inf"))
    hardest_images = masked.topk(2, 1).indices  # per caption
    hardest_texts = masked.topk(2, 0).indices.t()  # per image
    feats, ids = prepared["region_features"], prepared["input_ids"]
    for i in range(8):
        for g in range(2):
            shown = feats[(1 + g) * 8 + i]
            assert torch.equal(shown, images["region_features"][hardest_images[i, g], :shown.shape[0]])
            text = ids[(3 + g) * 8 + i]
            assert torch.equal(text, texts["input_ids"][hardest_texts[i, g], :text.shape[0]])
    out = model.encode(prepared)
    loss, _ = model.task.loss(out, prepared, model.head(model.task.name), model.ctx)
    scores = model.head(model.task.name)(out.pooled)[:, 0].view(5, 8).t().detach()
    expected = (0.2 - scores[:, :1] + scores[:, 1:]).clamp(min=0).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # the mined rows carry gradient now
    assert model.head(model.task.name)[0].weight.grad.abs().sum() > 0


# -- scoring ------------------------------------------------------------------------------

def _sides(world):
    from vlp.trainer.retrieval import retrieval_sides

    model, dataset, _ = _model_and_batch(world)
    texts, images, text_image, image_ids, _ = retrieval_sides(dataset, max_images=6, pad_id=model.ctx.pad_id)
    return model, dataset, texts, images, text_image, image_ids


def test_score_matrix_matches_pair_by_pair_scores_and_shortlist_k_ge_n_is_exact(world):
    from vlp.trainer.retrieval import first_stage_similarity, pair_batch, score_matrix

    model, _, texts, images, text_image, image_ids = _sides(world)
    assert len(image_ids) == 6 and len(text_image) == 30 and np.bincount(text_image).tolist() == [5] * 6
    scores, info = score_matrix(model, texts, images, batch_size=7)
    assert scores.shape == (30, 6) and info["pairs_scored"] == 180
    model.eval()
    with torch.no_grad():
        for t, i in [(0, 0), (3, 5), (29, 2), (17, 4)]:
            one = model.head(model.task.name)(model.encode(pair_batch(texts, images, [t], [i])).pooled)[0, 0]
            assert scores[t, i] == pytest.approx(one.item(), abs=1e-5)
    exact, info = score_matrix(model, texts, images, batch_size=64, shortlist=30)
    assert info["pairs_scored"] == 180 and np.allclose(exact, scores, atol=1e-5)
    similarity = first_stage_similarity(model, texts, images)
    short, info = score_matrix(model, texts, images, shortlist=2, similarity=similarity)
    assert 60 <= info["pairs_scored"] < 180
    top2 = similarity.topk(2, 1).indices
    for t in range(30):  # a caption's two first-stage images are cross-scored and rank above the rest
        assert np.allclose(short[t, top2[t].numpy()], scores[t, top2[t].numpy()], atol=1e-5)
        outside = [j for j in range(6) if short[t, j] < -1e8]
        assert all(short[t, j] < short[t, k] for j in outside for k in top2[t].tolist())


@pytest.mark.slow
def test_two_ray_workers_score_as_one_process(world):
    from vlp.trainer.retrieval import score_matrix

    model, _, texts, images, _, _ = _sides(world)
    one, _ = score_matrix(model, texts, images, batch_size=16)
    two, info = score_matrix(model, texts, images, batch_size=16, num_workers=2)
    assert info["workers"] == 2 and np.allclose(one, two, atol=1e-5)


# -- official format fixture, zero-shot, CLI -----------------------------------------------

def _flickr_fixture(root: Path) -> Path:
    """A Flickr30k Karpathy file (dataset_flickr30k.json layout: images[] with filename, split,
    sentences[] of raw/tokens) over 12 images with random features."""
    from vlp.trainer.toydata import tiny_feature_store, write_vocab

    colours = ["red", "blue", "green", "yellow", "white", "black"]
    images = []
    for k in range(12):
        split = "train" if k < 6 else ("val" if k < 9 else "test")
        sentences = [{"raw": f"A {colours[k % 6]} dog runs {w}.", "tokens": ["a", colours[k % 6], "dog", "runs", w],
                      "imgid": k, "sentid": 5 * k + j} for j, w in enumerate(["fast", "home", "away", "far", "now"])]
        images.append({"filename": f"{1000 + k}.jpg", "imgid": k, "split": split, "sentids": [5 * k + j for j in
                                                                                              range(5)],
                       "sentences": sentences})
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    tiny_feature_store(root / "features", [str(1000 + k) for k in range(12)], feature_dim=32, max_boxes=6)
    write_vocab(root / "vocab.txt", colours + "a dog runs fast home away far now .".split())
    return path


def test_flickr30k_karpathy_file_trains_and_evaluates(tmp_path):
    from vlp.builders import imports
    from vlp.trainer.finetune import evaluate_run

    path = _flickr_fixture(tmp_path)
    imports.import_karpathy(path, tmp_path / "pairs", dataset="flickr30k", features=tmp_path / "features",
                            progress="off")
    run = tmp_path / "run"
    config = _config(tmp_path, pairs=tmp_path / "pairs", vocab=str(tmp_path / "vocab.txt"), loss="ce", negatives=2)
    summary = _finetune(config, run)
    assert summary["train_pairs"] == 30 and summary["val_pairs"] == 15 and summary["best"]["metrics"]["n_images"] == 3
    entry = evaluate_run(run, tmp_path / "pairs", tmp_path / "features", split=["test"])
    assert (entry["metrics"]["n_images"], entry["metrics"]["n_texts"]) == (3, 15)


def test_zero_shot_from_a_pretrain_run_and_cli(world, tmp_path):
    from vlp.cli import train_main
    from vlp.trainer.schedule import run_stages

    config = {"model": {"vocab": "demo", "bert": {"hidden": 32, "layers": 1, "heads": 2},
                        "visual": {"feature_dim": 32}},
              "data": {"features": str(world / "features"), "max_text_len": 32, "max_regions": 12},
              "stages": [{"name": "a", "pairs": str(world / "pairs"), "split": "train", "tasks": ["MLM", "ITM"],
                          "steps": 2, "batch_size": 8}]}
    run_stages(config, tmp_path / "pre")
    (tmp_path / "pre" / "config.yaml").write_text(yaml.safe_dump(config))  # as vlp-train pretrain writes it
    runner = CliRunner()
    result = runner.invoke(train_main, ["evaluate", str(tmp_path / "pre"), "--zero-shot", "--pairs",
                                        str(world / "pairs"), "--features", str(world / "features"), "--split", "val",
                                        "--device", "cpu", "--progress", "off"])
    assert result.exit_code == 0, result.output
    assert "zero-shot retrieval, val" in result.output and "n_images 8" in result.output
    result = runner.invoke(train_main, ["evaluate", str(world), "--zero-shot", "--pairs", str(world / "pairs"),
                                        "--features", str(world / "features"), "--device", "cpu"])
    assert result.exit_code == 1 and "not a vlp-train pretrain run folder" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("task,message", [
    ({"loss": "nope"}, "retrieval trains with bce or ce or hinge"),
    ({"negatives": 0}, "negatives must be a whole number of at least 1"),
    ({"margin": -1}, "margin must be a positive number"),
    ({"candidates": "many"}, "candidates must be a whole number"),
])
def test_config_errors_name_the_key(world, task, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig.from_dict(_config(world, **task))


def test_retrieval_options_belong_to_retrieval(world):
    raw = _config(world, negatives=3)
    raw["task"]["name"] = "vqa"
    with pytest.raises(ConfigError, match="negatives are retrieval options"):
        FinetuneConfig.from_dict(raw)
