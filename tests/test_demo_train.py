"""The embedded default trains: the shipped demo config and vocabulary, and the demo's
pretraining part on a small world (oracle features instead of the detector)."""

from __future__ import annotations

import json

import pytest
import yaml

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """The stores `vlp demo` builds, from a 40-image world: features (384-d, as the demo
    detector's), pairs/coco-captions (Karpathy splits) and pairs/objects-labels."""
    from vlp.builders.imports import import_coco
    from vlp.builders.labels import build_objects_labels
    from vlp.synthetic import generate
    from vlp.synthetic.oracle import truth_feature_store

    out = tmp_path_factory.mktemp("demo")
    world = out / "world"
    generate(world, 40, seed=123, overwrite=True, web=False)
    truth_feature_store(world, out / "features", feature_dim=384, storage="lmdb")
    annotations = world / "annotations"
    import_coco(sorted(annotations.glob("captions_*.json")), out / "pairs" / "coco-captions",
                karpathy=annotations / "dataset_coco.json", image_id_template="{stem}", features=out / "features",
                progress="off")
    build_objects_labels(out / "features", out / "pairs" / "objects-labels", splits_from=out / "pairs" / "coco-captions",
                         progress="off")
    return out


@pytest.mark.slow
def test_the_shipped_vocabulary_is_rebuilt_exactly():
    from vlp.trainer.config import shipped_vocab
    from vlp.trainer.toydata import SPECIAL_TOKENS, demo_vocab_words

    assert shipped_vocab("demo").read_text().split("\n")[:-1] == list(SPECIAL_TOKENS) + demo_vocab_words()


@pytest.mark.slow
def test_the_shipped_vocabulary_covers_the_world_texts(demo_out):
    from vlp.trainer.config import shipped_vocab
    from vlp.trainer.data import load_tokenizer

    path = shipped_vocab("demo")
    tokenizer = load_tokenizer(path)
    texts = [c["caption"] for f in (demo_out / "world" / "annotations").glob("captions_*.json")
             for c in json.loads(f.read_text())["annotations"]]
    texts += [r["phrase"] for image in json.loads((demo_out / "world" / "region_descriptions.json").read_text())
              for r in image["regions"]]
    assert len(texts) > 500
    unknown = [t for t in texts if tokenizer.unk_token_id in tokenizer(t)["input_ids"]]
    assert unknown == []
    # words outside the world split into pieces instead of [UNK]
    assert tokenizer.unk_token_id not in tokenizer("zebra xylophone")["input_ids"]


def test_demo_config_validates_with_no_bert_directory():
    from vlp.trainer.config import load_config, shipped_vocab
    from vlp.trainer.schedule import shipped_configs

    config = load_config(shipped_configs()["demo"])
    assert config.model.text_checkpoint is None and config.model.vocab == str(shipped_vocab("demo"))
    assert 64 <= config.model.bert["hidden"] <= 128 and config.model.bert["layers"] == 2
    (stage,) = config.stages
    assert [s.name for s in stage.sources] == ["captions", "labels"]
    assert stage.sources[0].split == ("train", "restval") and config.eval.split == ("test",)


@pytest.mark.slow
def test_the_demo_pretraining_part_runs_and_reports_retrieval(demo_out):
    from vlp.demo import _pretrain_lines, pretrain_demo

    result = pretrain_demo(demo_out, steps=6, progress=False, device="cpu")
    assert result["steps"] == 6 and "captions" in result["losses"]
    assert set(result["losses"]) <= {"captions", "labels"}  # labels: about 1 batch in 5
    assert all(a > 0 and b > 0 for a, b in result["losses"].values())
    recall = result["retrieval"]
    test_images = len(json.loads((demo_out / "world" / "splits.json").read_text())["test"]) \
        if (demo_out / "world" / "splits.json").is_file() else None
    assert recall["zs_retrieval_n"] >= 2
    if test_images:
        assert recall["zs_retrieval_n"] == test_images
    for key in ("zs_ir_r1", "zs_ir_r5", "zs_ir_r10", "zs_tr_r1", "zs_tr_r5", "zs_tr_r10"):
        assert 0.0 <= recall[key] <= 1.0
    assert result["loss_png"].is_file() and result["loss_png"].stat().st_size > 10_000
    saved = yaml.safe_load((demo_out / "train" / "config.yaml").read_text())
    assert saved["stages"][0]["steps"] == 6 and saved["data"]["features"] == str(demo_out / "features")
    lines = _pretrain_lines(result)
    assert "no BERT checkpoint" in lines[0] and "captions" in lines[1]
    assert "R@1/5/10" in lines[2]
    # a second run starts afresh (the demo overwrites its outputs)
    again = pretrain_demo(demo_out, steps=2, progress=False, device="cpu")
    assert again["steps"] == 2
