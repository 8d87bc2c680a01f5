"""W ∩ L (schemas/labels.py) and vlp-build topics."""

import numpy as np
from click.testing import CliRunner

from vlp.schemas.labels import image_labels, singular_forms, topics
from vlp.cli import build_main
from vlp.schemas import FeatureRecord, FeatureStoreWriter, vocab
from vlp.schemas.pairs import PairStore, PairStoreWriter


def ids(*names):
    return [vocab.objects().id(n) for n in names]


def test_topics_words_that_are_region_labels():
    labels = ids("dog", "frisbee", "grass", "stop sign", "television", "man", "box", "pony", "knife")
    assert topics("Two dogs playing with a Frisbee on the grass.", labels) == ["dog", "frisbee", "grass"]
    assert topics("a stop sign next to stop signs", labels) == ["stop sign"]
    assert topics("a tv and a sign", labels) == ["television"]  # synonyms map to the display name
    assert topics("three men, boxes, ponies and knives", labels) == ["box", "knife", "man", "pony"]
    assert topics("a cat on a sofa", labels) == []
    assert topics("the dog's ball", ["dog", "ball"]) == ["ball", "dog"]  # names work too
    assert topics("anything", []) == []
    assert "leaf" in singular_forms("leaves") and "glass" in singular_forms("glasses")


def test_image_labels_confidence_floor():
    labels = image_labels(ids("dog", "cat"), [0.9, 0.1], obj_conf_floor=0.5)
    assert set(labels.values()) == {"dog"}


def test_build_topics_copies_the_store_with_the_column(tmp_path):
    with FeatureStoreWriter(tmp_path / "f", storage="arrow", feature_dim=4) as writer:
        writer.add(FeatureRecord.from_arrays("a", 20, 20, boxes=np.tile([0, 0, 5, 5], (2, 1)),
                                             features=np.ones((2, 4), np.float32),
                                             objects_id=np.array(ids("dog", "frisbee")),
                                             objects_conf=np.array([0.9, 0.9]), attrs_id=np.array([1, 2]),
                                             attrs_conf=np.array([0.5, 0.5])))
    with PairStoreWriter(tmp_path / "p", "caption") as writer:
        writer.add({"pair_id": "1", "image_id": "a", "text": "dogs catching a frisbee", "split": "train"})
        writer.add({"pair_id": "2", "image_id": "a", "text": "a sunny day"})
        writer.add({"pair_id": "3", "image_id": "gone", "text": "a dog"})
    result = CliRunner().invoke(build_main, ["topics", str(tmp_path / "p"), "--features", str(tmp_path / "f"),
                                             "--out", str(tmp_path / "t"), "--progress", "off"])
    assert result.exit_code == 0, result.output
    store = PairStore(tmp_path / "t")
    assert store.columns[-1] == "topics" and store.kind == "caption"
    assert [(p["pair_id"], p["topics"], p["split"]) for p in store] == [
        ("1", ["dog", "frisbee"], "train"), ("2", [], ""), ("3", None, "")]
    assert store.manifest["stats"]["pairs_missing_images"] == 1
