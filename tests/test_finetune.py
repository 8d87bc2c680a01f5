"""vlp-train finetune / evaluate: every downstream task trains and evaluates end to end on
small hand-made stores (tiny model, few steps), resume is exact, freeze_base trains the head
only, --init loads a real pretraining run's encoder, and config errors are one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from vlp.schemas.pairs import PairStoreWriter
from vlp.trainer.config import ConfigError, FinetuneConfig
from vlp.trainer.toydata import tiny_feature_store, write_vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLORS = ["red", "blue", "green", "yellow"]
WORDS = ("what color is it the left image right has a an red blue green yellow movie about drama shape "
         "there are two of them").split()
N_IMAGES = 40
KINDS = {"vqa": "question", "vizwiz": "question", "gqa": "question", "snli_ve": "entailment", "nlvr2": "nlvr2",
         "mmimdb": "multilabel", "retrieval": "caption", "refcoco": "refexp", "vcr": "vcr"}


def _split(i: int) -> str:
    return "train" if i < 28 else ("val" if i < 34 else "test")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    ids = [f"img{i}" for i in range(N_IMAGES)]
    tiny_feature_store(root / "features", ids, feature_dim=16, max_boxes=6)
    write_vocab(root / "vocab.txt", WORDS)
    return root


def _pairs(root: Path, task: str) -> Path:
    """A store of ``task``'s kind over the 40 images: 28 train, 6 val, 6 test (test: no gold
    labels for the question tasks, as in the official test splits)."""
    out = root / f"pairs-{task}"
    if out.exists():
        return out
    kind = KINDS[task]
    ids = [f"img{i}" for i in range(N_IMAGES)]
    with PairStoreWriter(out, kind) as writer:
        for i, image_id in enumerate(ids):
            color, split = COLORS[i % 4], _split(i)
            row = {"pair_id": f"{task}/{i}", "image_id": image_id, "split": split}
            if kind == "question":
                gold = split != "test"
                answers = ([color] if color == "red" else [color, "red"]) if gold else None
                writer.add({**row, "text": "what color is it", "question_id": str(100 + i), "answers": answers,
                            "answer_scores": ([1.0] if color == "red" else [1.0, 0.3]) if gold else None,
                            "answer_type": "other" if gold else None, "question_type": "what color"})
            elif kind == "entailment":
                writer.add({**row, "text": f"it is {color}", "label": ["entailment", "neutral", "contradiction"][i % 3]})
            elif kind == "nlvr2":
                writer.add({**row, "pair_id": f"nlvr2/{split}-{i // 2}-0-{i % 2}", "image_id_2": ids[(i + 1) % N_IMAGES],
                            "text": f"the left image has a {color}", "label": i % 2})
            elif kind == "caption":
                writer.add({**row, "text": f"a {color} shape"})
            elif kind == "refexp":
                writer.add({**row, "text": f"the {color} shape", "ref_id": str(i), "ann_id": str(i),
                            "target_box": [0.0, 0.0, 10.0, 10.0], "category": "shape", "image_w": 100, "image_h": 100})
            elif kind == "vcr":
                choices = [[c, "shape"] for c in COLORS]
                writer.add({**row, "text": "what color is it", "annot_id": str(i),
                            "question_words": ["what", "color", "is", "it"], "question_regions": [-1, -1, -1, 0],
                            "answer_words": choices, "answer_regions": [[-1, 0]] * 4,
                            "rationale_words": choices, "rationale_regions": [[-1, 0]] * 4,
                            "answer_label": i % 4, "rationale_label": (i + 1) % 4, "objects": ["shape"]})
            else:
                writer.add({**row, "text": f"a movie about {color}", "labels": [color] + (["drama"] if i % 3 == 0 else [])})
    return out


def _config(root: Path, task: str, **task_options) -> dict:
    train = task_options.pop("train", {})
    return {"seed": 0,
            "model": {"vocab": str(root / "vocab.txt"), "bert": {"hidden": 32, "layers": 1, "heads": 2},
                      "visual": {"feature_dim": 16}},
            "data": {"features": str(root / "features"), "max_text_len": 16, "max_regions": 6},
            "task": {"name": task, "pairs": str(_pairs(root, task)), **task_options},
            "train": {"steps": 4, "batch_size": 8, "lr": 1.0e-3, "eval_every": 2, "log_every": 0, **train}}


def _finetune(root, config: dict, out, **kw):
    from vlp.trainer.finetune import finetune

    return finetune(FinetuneConfig.from_dict(config), out, **kw)


# -- heads -------------------------------------------------------------------------------

def test_head_registry_layers():
    from torch import nn

    from vlp.trainer.heads import build_head

    mlp = build_head("mlp", 8, 5)
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.LayerNorm, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[3].in_features, mlp[3].out_features) == (8, 16, 16, 5)
    assert mlp[2].eps == 1e-12 and mlp[2].normalized_shape == (16,)
    mmf = build_head("mmf", 8, 5)
    assert (mmf[0].out_features, mmf[2].normalized_shape, mmf[3].in_features) == (8, (8,), 8)
    linear = build_head("linear", 8, 5)
    assert isinstance(linear, nn.Linear) and linear(torch.zeros(2, 8)).shape == (2, 5)
    with pytest.raises(ValueError, match="unknown head 'nope'"):
        build_head("nope", 8, 5)


# -- every task end to end -------------------------------------------------------------------

PREDICTION_CHECKS = {
    "vqa": lambda text: {"question_id", "answer"} == set(json.loads(text)[0]),
    "vizwiz": lambda text: {"image", "answer"} == set(json.loads(text)[0]),
    "gqa": lambda text: {"questionId", "prediction"} == set(json.loads(text)[0]),
    "snli_ve": lambda text: set(json.loads(text.splitlines()[0])) == {"pair_id", "prediction"},
    "nlvr2": lambda text: all(len(r) == 2 and r[1] in ("True", "False") for r in csv.reader(text.splitlines())),
    "mmimdb": lambda text: isinstance(json.loads(text.splitlines()[0])["prediction"], list),
}


@pytest.mark.parametrize("task,options", [
    ("vqa", {}), ("vizwiz", {"head": "mmf"}), ("gqa", {"loss": "ce"}), ("gqa", {"loss": "bce", "head": "linear"}),
    ("snli_ve", {}), ("nlvr2", {"setting": "pair"}), ("nlvr2", {"setting": "triplet"}), ("mmimdb", {"head": "mmf"})])
def test_task_trains_and_evaluates(base, tmp_path, task, options):
    from vlp.trainer.finetune import evaluate_run

    run = tmp_path / "run"
    summary = _finetune(base, _config(base, task, **options), run)
    assert summary["end_step"] == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])
    evals = [json.loads(line) for line in (run / "01-finetune" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    main = "micro_f1" if task == "mmimdb" else "accuracy"
    assert all(0.0 <= e[main] <= 1.0 and e["n"] == 6 for e in evals)
    best = json.loads((run / "best.json").read_text())
    assert best["value"] == max(e[main] for e in evals) and best["metric"] == main
    results = json.loads((run / "results.json").read_text())
    assert results["best"]["step"] == best["step"] and results["final"]["step"] == 4
    labels = json.loads((run / "labels.json").read_text())["labels"]
    expected = {"snli_ve": ["entailment", "neutral", "contradiction"], "nlvr2": ["False", "True"],
                "mmimdb": ["blue", "drama", "green", "red", "yellow"]}.get(task, ["red", "blue", "green", "yellow"])
    assert sorted(labels) == sorted(expected) and len(labels) == summary["labels"]
    if task in ("vqa", "vizwiz", "gqa"):  # the train answers, most frequent first: red is in every question
        assert labels[0] == "red"
    # evaluate: the val split is scored exactly as during training (same weights as best.pt)
    predictions = tmp_path / "predictions.out"
    entry = evaluate_run(run, _pairs(base, task), base / "features", split=["val"], predictions=predictions)
    best_eval = next(e for e in evals if e["step"] == best["step"])
    assert entry["metrics"][main] == pytest.approx(best_eval[main]) and entry["metrics"]["n"] == 6
    assert PREDICTION_CHECKS[task](predictions.read_text())
    table = (run / "results.md").read_text()
    assert table.startswith("| task | split |") and f"validation (best step {best['step']})" in table
    # the test split: question tasks have no gold answers there -> predicted, not scored
    test = evaluate_run(run, _pairs(base, task), base / "features", split=["test"], predictions=predictions)
    if task in ("vqa", "vizwiz", "gqa"):
        assert test["metrics"] == {"n": 0}
    assert len(predictions.read_text().strip().splitlines() if task in ("nlvr2", "snli_ve", "mmimdb")
               else json.loads(predictions.read_text())) == 6
    assert set(json.loads((run / "results.json").read_text())["evaluations"]) == {
        f"pairs-{task}:val", f"pairs-{task}:test"}


def test_nlvr2_pair_setting_encodes_each_image_once_per_row(base):
    """pair: the batch is doubled (left rows, then right rows) and the head sees [B, 2h];
    triplet: one row with both images' regions, tagged 0 / 1."""
    from vlp.schemas import FeatureStore
    from vlp.schemas.pairs import PairStore
    from vlp.trainer.data import collate, load_tokenizer
    from vlp.trainer.finetune import build_model, make_task, task_dataset

    for setting in ("pair", "triplet"):
        config = FinetuneConfig.from_dict(_config(base, "nlvr2", setting=setting))
        tokenizer = load_tokenizer(base / "vocab.txt")
        task = make_task(config, ["False", "True"])
        model = build_model(config, task, tokenizer)
        dataset = task_dataset(config, task, PairStore(config.task.pairs), FeatureStore(base / "features"), tokenizer,
                               ["train"])
        batch = collate([dataset.example(i) for i in range(3)])
        left, right = batch["region_mask"].sum(1), batch["image_2"]["region_mask"].sum(1)
        prepared = dict(batch)
        task.prepare(prepared, None, model.ctx)
        if setting == "pair":
            assert prepared["input_ids"].shape[0] == 6
            assert prepared["region_mask"].sum(1).tolist() == left.tolist() + right.tolist()
            assert model.heads["NLVR2"][0].in_features == 64
        else:
            assert prepared["input_ids"].shape[0] == 3
            assert prepared["region_mask"].sum(1).tolist() == (left + right).tolist()
            assert ((prepared["region_image"] == 1) & prepared["region_mask"]).sum(1).tolist() == right.tolist()
            assert model.heads["NLVR2"][0].in_features == 32
            # the image-type embedding reaches the encoder: other types, other outputs
            model.eval()
            with torch.no_grad():
                a = model.encode(prepared).pooled
                flipped = dict(prepared, region_image=1 - prepared["region_image"])
                b = model.encode(flipped).pooled
            assert not torch.allclose(a, b)
        assert model.head_logits(batch).shape == (3, 2)


def test_answer_vocab_of_the_store_wins(base, tmp_path):
    """vqa labels: the pair store's answer_vocab.json (as import-vqa writes it) in its order."""
    import shutil

    from vlp.trainer.downstream import task_labels
    from vlp.schemas.pairs import PairStore

    store = tmp_path / "pairs"
    shutil.copytree(_pairs(base, "vqa"), store)
    (store / "answer_vocab.json").write_text(json.dumps(["yellow", "red", "blue", "green", "purple"]))
    labels, source = task_labels("vqa", PairStore(store), split=("train",))
    assert labels == ["yellow", "red", "blue", "green", "purple"] and source.endswith("answer_vocab.json")
    given = tmp_path / "answers.json"
    given.write_text(json.dumps(["blue", "red"]))
    assert task_labels("vqa", PairStore(store), answer_vocab=given)[0] == ["blue", "red"]


def test_vqa_bce_loss_is_mean_times_answers():
    from vlp.trainer.downstream import VQA
    from vlp.trainer.model import EncoderOutput

    task = VQA(["a", "b", "c"])
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    target = torch.tensor([[1.0, 0.0, 0.3]])
    out = EncoderOutput(text=None, regions=None, pooled=torch.zeros(1, 4))
    loss, _ = task.loss(out, {"label": target}, lambda pooled: logits, None)
    by_hand = sum(-(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x)))
                  for x, t in zip(logits[0], target[0]))  # summed over the answers = mean x 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert task.target({"answers": ["c", "zzz"], "answer_scores": [0.3, 1.0]})["label"].tolist() == \
        pytest.approx([0.0, 0.0, 0.3])


# -- resume, freeze_base, init ------------------------------------------------------------

def test_resume_is_exact(base, tmp_path):
    config = _config(base, "vqa", train={"steps": 6, "eval_every": 3, "checkpoint_every": 2})
    whole = _finetune(base, config, tmp_path / "whole")
    first = _finetune(base, config, tmp_path / "parts", stop_after_steps=3)
    assert first["end_step"] == 3
    second = _finetune(base, config, tmp_path / "parts")  # from the last checkpoint: step 2
    assert second["start_step"] == 2 and second["end_step"] == 6
    assert [h["loss"] for h in first["history"][:2] + second["history"]] == [h["loss"] for h in whole["history"]]
    evals = lambda run: (run / "01-finetune" / "eval.jsonl").read_text()
    assert evals(tmp_path / "parts") == evals(tmp_path / "whole")  # step 3's evaluation redone once
    a = torch.load(tmp_path / "whole" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "best.pt", weights_only=True)
    assert a["step"] == b["step"] and a["value"] == b["value"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    last = lambda run: sorted((run / "01-finetune").glob("checkpoint-*.pt"))[-1]
    sa, sb = (torch.load(last(tmp_path / n), weights_only=True)["model"] for n in ("whole", "parts"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stop_request_saves_and_resumes(base, tmp_path):
    config = _config(base, "snli_ve")
    stopped = _finetune(base, config, tmp_path / "run", should_stop=lambda: True)
    assert stopped["end_step"] == 1 and (tmp_path / "run" / "01-finetune" / "checkpoint-0000001.pt").is_file()
    assert not (tmp_path / "run" / "results.json").exists()
    done = _finetune(base, config, tmp_path / "run")
    assert (done["start_step"], done["end_step"]) == (1, 4) and (tmp_path / "run" / "results.json").is_file()


def test_freeze_base_trains_the_head_only(base, tmp_path):
    from vlp.trainer.finetune import build_model, make_task

    config = _config(base, "vqa", freeze_base=True, train={"steps": 3, "eval_every": 0})
    typed = FinetuneConfig.from_dict(config)
    from vlp.trainer.data import load_tokenizer

    initial = build_model(typed, make_task(typed, ["red", "blue", "green", "yellow"]),
                          load_tokenizer(base / "vocab.txt")).state_dict()
    summary = _finetune(base, config, tmp_path / "run")
    assert summary["freeze_base"] and summary["trainable_parameters"] == sum(
        v.numel() for k, v in initial.items() if k.startswith("heads."))
    state = torch.load(sorted((tmp_path / "run" / "01-finetune").glob("checkpoint-*.pt"))[-1], weights_only=True)
    encoder_keys = [k for k in initial if k.startswith("encoder.")]
    assert encoder_keys and all(torch.equal(state["model"][k], initial[k]) for k in encoder_keys)
    head_keys = [k for k in initial if k.startswith("heads.")]
    assert any(not torch.equal(state["model"][k], initial[k]) for k in head_keys)
    optimized = sum(len(group["params"]) for group in state["optimizer"]["param_groups"])
    assert optimized == len(head_keys)  # the optimizer holds the head's tensors only


def _pretrain_run(base, out):
    """A real vlp-train pretrain run (2 MLM+ITM steps) on captions over the same images."""
    from vlp.trainer.schedule import run_stages

    captions = base / "captions"
    if not captions.exists():
        with PairStoreWriter(captions, "caption") as writer:
            for i in range(N_IMAGES):
                writer.add({"pair_id": f"c{i}", "image_id": f"img{i}", "text": f"a {COLORS[i % 4]} shape",
                            "split": "train"})
    config = {"model": {"vocab": str(base / "vocab.txt"), "bert": {"hidden": 32, "layers": 1, "heads": 2},
                        "visual": {"feature_dim": 16}},
              "data": {"features": str(base / "features"), "max_text_len": 16},
              "stages": [{"name": "a", "pairs": str(captions), "tasks": ["MLM"], "steps": 1, "batch_size": 8},
                         {"name": "b", "pairs": str(captions), "tasks": ["MLM", "ITM"], "steps": 2, "batch_size": 8}]}
    run_stages(config, out)
    return out


def test_init_from_a_pretrain_run_loads_its_last_stage_encoder(base, tmp_path):
    pretrain = _pretrain_run(base, tmp_path / "pretrain")
    last = torch.load(pretrain / "02-b" / "checkpoint-0000002.pt", weights_only=True)["model"]
    first = torch.load(pretrain / "01-a" / "checkpoint-0000001.pt", weights_only=True)["model"]
    config = _config(base, "vqa", freeze_base=True, train={"steps": 2, "eval_every": 0})
    summary = _finetune(base, config, tmp_path / "run", init=pretrain)
    assert summary["init"]["checkpoint"].endswith("02-b/checkpoint-0000002.pt")
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    encoder = [k for k in last if k.startswith("encoder.")]
    assert all(torch.equal(best[k], last[k]) for k in encoder)  # frozen: still the pretrained weights
    assert any(not torch.equal(last[k], first[k]) for k in encoder)  # (the last stage, not the first)
    assert not any(k.startswith("heads.MLM") or k.startswith("heads.ITM") for k in best)  # pretraining heads dropped
    # a checkpoint file works the same; a model of another size is named
    from vlp.trainer.finetune import InitError

    again = _finetune(base, config, tmp_path / "run2", init=pretrain / "01-a" / "checkpoint-0000001.pt")
    assert again["init"]["checkpoint"].endswith("01-a/checkpoint-0000001.pt")
    bigger = _config(base, "vqa", train={"steps": 1})
    bigger["model"]["bert"]["hidden"] = 64
    with pytest.raises(InitError, match="has shape .* give the config the pretraining run's model"):
        _finetune(base, bigger, tmp_path / "run3", init=pretrain)


# -- CLI ----------------------------------------------------------------------------------

def _cli(*args):
    from vlp.cli import train_main

    return CliRunner().invoke(train_main, [str(a) for a in args], catch_exceptions=False)


def test_cli_finetune_evaluate_and_errors(base, tmp_path):
    config_path = tmp_path / "ft.yaml"
    config_path.write_text(yaml.safe_dump(_config(base, "nlvr2", train={"steps": 2, "eval_every": 0})))
    run = tmp_path / "run"
    result = _cli("finetune", config_path, "-o", run, "--progress", "off", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "nlvr2: steps 0 -> 2 of 2" in result.output and "best: step 2, accuracy" in result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["task"]["setting"] == "pair"
    again = _cli("finetune", config_path, "-o", run, "--progress", "off")
    assert again.exit_code == 1 and "already holds a run" in again.output and "--resume" in again.output
    predictions = tmp_path / "nlvr2.csv"
    result = _cli("evaluate", run, "--pairs", _pairs(base, "nlvr2"), "--features", base / "features",
                  "--split", "test", "--predictions", predictions)
    assert result.exit_code == 0, result.output
    assert "test of" in result.output and "accuracy" in result.output
    assert len(predictions.read_text().splitlines()) == 6
    # config errors: one Error line naming the file and the key, exit 1
    for change, message in [({"task": {"name": "vqa2"}}, "task.name must be one of"),
                            ({"task": {"head": "big"}}, "task.head must be one of mlp, mmf, linear"),
                            ({"task": {"colour": 1}}, "task: unknown key(s): colour"),
                            ({"task": {"loss": "ce"}}, "task.loss: vqa trains with bce"),
                            ({"train": {"lr": "1e-4"}}, "train: lr must be a number"),
                            ({"task": {"name": "snli_ve"}}, "holds question pairs; task snli_ve needs entailment")]:
        raw = _config(base, "vqa")
        for section, values in change.items():
            raw[section].update(values)
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(raw))
        result = _cli("finetune", bad, "-o", tmp_path / "bad-run")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith(f"Error: {bad}") and message in lines[0], lines[0]
    result = _cli("evaluate", tmp_path, "--pairs", _pairs(base, "nlvr2"), "--features", base / "features")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "not a vlp-train finetune run" in result.output


def test_shipped_finetune_configs_are_valid_and_run(base, tmp_path):
    """Every shipped finetune config reads; pointed at the hand-made stores (model shrunk,
    2 steps), each trains with its own task, head, loss, setting and freeze_base."""
    from vlp.trainer.schedule import shipped_configs, shipped_finetune_configs

    shipped = shipped_finetune_configs()
    assert {"finetune-vqa", "finetune-vizwiz", "finetune-gqa", "finetune-snli-ve", "finetune-nlvr2",
            "finetune-nlvr2-triplet", "finetune-mmimdb", "finetune-vqa-frozen-base", "finetune-vizwiz-frozen-base",
            "finetune-snli-ve-frozen-base", "finetune-mmimdb-frozen-base", "finetune-demo-vqa"} <= set(shipped)
    assert not set(shipped) & set(shipped_configs())  # pretraining configs are listed apart
    for name, path in shipped.items():
        raw = yaml.safe_load(path.read_text())
        FinetuneConfig.from_dict(raw, path)  # as shipped (placeholder paths are not opened)
        small = _config(base, raw["task"]["name"], **{k: v for k, v in raw["task"].items()
                                                      if k not in ("name", "pairs", "train_split", "val_split",
                                                                   "answer_vocab", "hard_negatives")},
                        train={"steps": 1, "eval_every": 0})
        summary = _finetune(base, small, tmp_path / name)
        assert summary["end_step"] == 1 and summary["freeze_base"] == raw["task"].get("freeze_base", False)


# -- the synthetic world: each task from its official file layout, through its importer ------

WORLD_TASKS = {  # task: (importer, files under the world, val split, test split)
    "vqa": ("import_vqa", "vqa/*.json", "val", None),
    "vizwiz": ("import_vizwiz", "vizwiz/*.json", "val", "test"),
    "gqa": ("import_gqa", "gqa/*.json", "val", "testdev"),
    "snli_ve": ("import_snli_ve", "snli_ve/*.jsonl", "dev", "test"),
    "nlvr2": ("import_nlvr2", "nlvr2/*.json", "dev", "test1"),
    "mmimdb": ("import_mmimdb", None, "val", "test"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlp.synthetic import generate
    from vlp.synthetic.oracle import truth_feature_store

    root = tmp_path_factory.mktemp("finetune-world")
    generate(root / "world", 80, seed=1, overwrite=True, web=False)
    truth_feature_store(root / "world", root / "features", feature_dim=32, nlvr2_images=True)
    return root


def _world_store(world: Path, task: str) -> Path:
    from vlp.builders import imports

    out = world / f"pairs-{task}"
    if out.exists():
        return out
    name, pattern, _, _ = WORLD_TASKS[task]
    kw = dict(features=world / "features", progress="off")
    if task == "mmimdb":
        result = imports.import_mmimdb(world / "world" / "mmimdb" / "dataset", out,
                                       split_file=world / "world" / "mmimdb" / "split.json", **kw)
    else:
        files = sorted((world / "world").glob(pattern))
        extra = {"min_count": 1} if task == "vqa" else {}
        result = getattr(imports, name)(files, out, **extra, **kw)
    assert result.num_pairs > 0
    return out


def _world_config(world: Path, task: str, steps: int, **task_options) -> dict:
    return {"seed": 0, "model": {"vocab": "demo", "bert": {"hidden": 64, "layers": 2, "heads": 4},
                                 "visual": {"feature_dim": 32}},
            "data": {"features": str(world / "features"), "max_text_len": 40, "max_regions": 36},
            "task": {"name": task, "pairs": str(_world_store(world, task)), "val_split": WORLD_TASKS[task][2],
                     **task_options},
            "train": {"steps": steps, "batch_size": 32, "lr": 5.0e-4, "warmup_ratio": 0.1,
                      "eval_every": max(1, steps // 2), "log_every": 0}}


@pytest.mark.slow
@pytest.mark.parametrize("task,options", [("vqa", {}), ("vizwiz", {}), ("gqa", {}), ("snli_ve", {}),
                                          ("nlvr2", {"setting": "pair"}), ("nlvr2", {"setting": "triplet"}),
                                          ("mmimdb", {"head": "mmf"})])
def test_world_task_end_to_end(world, tmp_path, task, options):
    """Imported from the world's official-format files with the shipped demo vocabulary:
    trains, keeps the best step, evaluates the test split and writes its predictions."""
    from vlp.trainer.finetune import evaluate_run

    run = tmp_path / "run"
    summary = _finetune(world, _world_config(world, task, 10, **options), run)
    assert summary["end_step"] == 10 and summary["skipped_pairs"] == {"train": 0, "val": 0}
    assert json.loads((run / "best.json").read_text())["step"] in (5, 10)
    split = WORLD_TASKS[task][3] or WORLD_TASKS[task][2]
    predictions = tmp_path / "predictions"
    entry = evaluate_run(run, _world_store(world, task), world / "features", split=[split], predictions=predictions)
    assert predictions.stat().st_size > 0 and entry["skipped_pairs"] == 0
    if task == "vizwiz":  # the official VizWiz test split has no answers
        assert entry["metrics"]["n"] >= 0
    else:
        assert entry["metrics"]["n"] > 0


@pytest.mark.slow
def test_world_vqa_beats_the_majority_answer(world, tmp_path):
    """200 steps from random init on the world's VQA (oracle features): clearly above the
    majority answer on val (the figure of the README's table comes from the same recipe)."""
    import collections

    from vlp.schemas.pairs import PairStore
    from vlp.trainer.metrics import vqa_scores

    summary = _finetune(world, _world_config(world, "vqa", 200), tmp_path / "run")
    rows = list(PairStore(_world_store(world, "vqa")))
    train, val = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "val"]
    top = lambda r: r["answers"][max(range(len(r["answers"])), key=lambda k: r["answer_scores"][k])]
    majority = collections.Counter(top(r) for r in train).most_common(1)[0][0]
    baseline = vqa_scores({r["question_id"]: majority for r in val}, val)["accuracy"]
    assert summary["best"]["value"] > baseline + 0.1, (summary["best"], baseline)


def test_cli_init_from_a_bert_directory_sets_the_text_side(base, tmp_path):
    """--init BERT_DIR becomes model.text_checkpoint: the run's config says so and, with the
    base frozen, the best weights hold the directory's word embeddings."""
    import shutil

    from transformers import BertModel

    from vlp.trainer.model import tiny_bert_config

    bert_dir = tmp_path / "bert"
    shutil.copy(base / "vocab.txt", tmp_path / "vocab.txt")
    torch.manual_seed(5)
    bert = BertModel(tiny_bert_config(len((base / "vocab.txt").read_text().split()), hidden=32, layers=1, heads=2))
    bert.save_pretrained(bert_dir)
    shutil.copy(base / "vocab.txt", bert_dir / "vocab.txt")
    raw = _config(base, "snli_ve", freeze_base=True, train={"steps": 1, "eval_every": 0})
    raw["model"].pop("bert")
    config_path = tmp_path / "ft.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    result = _cli("finetune", config_path, "-o", tmp_path / "run", "--init", bert_dir, "--progress", "off")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert saved["text_checkpoint"] == str(bert_dir) and saved["vocab"] is None
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    assert torch.equal(best["encoder.bert.embeddings.word_embeddings.weight"],
                       bert.embeddings.word_embeddings.weight.detach())
