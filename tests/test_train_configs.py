"""Every shipped paper schedule runs end to end on synthetic stores.

The configs' placeholder paths are pointed at stores of the right kind built from a
synthetic world (objects-labels, labels-in-order, captions, hard negatives); the model is
shrunk (vocabulary of the world, hidden 32) and every stage cut to 2 steps. What stays as
shipped: architectures, sources and their tasks, mixing ratios, label augmentation, task
options and the stage order, so a typo in a task name, a source key or a hand-over
between stages fails here.
"""

from __future__ import annotations

import json

import pytest
import yaml

from vlp.trainer.schedule import run_stages, shipped_configs, source_specs
from vlp.trainer.tasks import make_tasks
from vlp.trainer.toydata import world_stores

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from vlp.builders.hard_negatives import build_hard_negatives
    from vlp.builders.labels import build_labels_in_order, build_objects_labels
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("configs")
    generate(root / "world", 24, seed=6, split_fractions=(1.0, 0.0, 0.0), overwrite=True)
    features, captions, vocab = world_stores(root / "world", root / "stores", feature_dim=16,
                                             vocab_extra=_label_words(), cls_prob=True)
    build_objects_labels(features.root, root / "stores" / "objects-labels", progress="off")
    build_labels_in_order(features.root, root / "stores" / "labels-in-order", progress="off")
    build_hard_negatives(features.root, root / "stores" / "hard-negatives", top_m=3, progress="off")
    return {"features": str(features.root), "captions": str(captions.root), "vocab": str(vocab),
            "objects-labels": str(root / "stores" / "objects-labels"),
            "labels-in-order": str(root / "stores" / "labels-in-order"),
            "hard-negatives": str(root / "stores" / "hard-negatives")}


def _label_words():
    from vlp.schemas import vocab

    words = set()
    for voc in (vocab.objects(), vocab.attributes()):
        for i in range(len(voc)):
            words.update(voc.name(i).split())
    return sorted(words)


def _pairs_for(path: str, stores: dict) -> str:
    for kind in ("objects-labels", "labels-in-order", "hard-negatives"):
        if kind in path:
            return stores[kind]
    return stores["captions"]  # captions, web pairs, VG phrases, generated captions: all caption-like


def shrink(config: dict, stores: dict) -> dict:
    model = config["model"]
    model.pop("text_checkpoint", None)  # the demo config names the shipped vocabulary instead
    model["vocab"] = stores["vocab"]
    model["visual"]["feature_dim"] = 16
    if model.get("architecture") == "lxmert_s":
        model["lxmert"] = {**model.get("lxmert", {}), "hidden": 32, "heads": 2, "x_layers": 1}
    else:
        model["bert"] = {"hidden": 32, "layers": 1, "heads": 2}
    if model.get("architecture") == "two_stream":  # ViLBERT's layout kept, every width small
        model["bert"]["layers"] = 12
        model["two_stream"].update(v_hidden=16, v_heads=2, v_intermediate=32, co_hidden=16, co_heads=2)
    config["data"]["features"] = stores["features"]
    if "eval" in config:
        config["eval"].update(pairs=stores["captions"], max_batches=2, retrieval_images=8, batch_size=16)
        config["eval"].pop("split", None)  # the toy stores hold one split
    for stage in config["stages"]:
        stage.update(steps=2, batch_size=4, checkpoint_every=0, log_every=0, eval_every=0)
        stage.pop("epochs", None)
        for spec in stage.get("sources") or [stage]:
            spec["pairs"] = _pairs_for(spec["pairs"], stores)
            spec.pop("split", None)
            if spec.get("features"):
                spec["features"] = stores["features"]
            if spec.get("hard_negatives"):
                spec["hard_negatives"] = stores["hard-negatives"]
    return config


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_config_runs(name, stores, tmp_path):
    config = yaml.safe_load(shipped_configs()[name].read_text())
    config = shrink(config, stores)
    summaries = run_stages(config, tmp_path / name)
    assert [s["stage"] for s in summaries] == [s["name"] for s in config["stages"]]
    for summary, stage in zip(summaries, config["stages"]):
        assert summary["end_step"] == 2, summary
        history = summary["history"]
        assert all(h["loss"] > 0 for h in history)
        ran = {task for h in history for task in h["losses"]}
        stage_tasks = {t.name for t in make_tasks(stage["tasks"])}
        assert ran <= stage_tasks
        if len(source_specs(stage)) == 1:  # (a mixed stage may draw one source only in 2 steps)
            assert ran == stage_tasks, stage["name"]
    if "eval" in config:
        last = summaries[-1]["dir"]
        evals = [json.loads(line) for line in open(f"{last}/eval.jsonl")]
        assert evals and any(key.endswith("mlm_acc") for key in evals[-1])


def test_shipped_configs_cover_the_papers():
    assert {"lamp", "vl_bert", "imagebert", "msp", "singh_mlm"} <= set(shipped_configs())
