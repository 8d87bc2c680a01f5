"""vlp-build objects-labels / labels-in-order on feature stores made from the synthetic world's truth."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from vlp.builders.labels import build_labels_in_order, build_objects_labels
from vlp.synthetic.oracle import truth_feature_store
from vlp.cli import build_main
from vlp.schemas import FeatureRecord, FeatureStoreWriter, vocab
from vlp.schemas.pairs import PairStore, verify_pairs


def _attr_conf(image_id, row):
    return 0.9 if row % 2 == 0 else 0.05  # odd regions fall under the 0.1 floor


def _obj_conf(image_id, row):
    return 0.3 if row == 1 else 0.95


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("labels-world")
    generate(root / "world", 10, seed=3, overwrite=True, web=False)
    truth_feature_store(root / "world", root / "features", feature_dim=8, attrs_conf=_attr_conf,
                        objects_conf=_obj_conf)
    return root


def expected_words(scene, attr_floor=0.1, obj_floor=0.0):
    words, regions = [], []
    for row, obj in enumerate(scene.objects):
        if _obj_conf(scene.image_id, row) < obj_floor:
            continue
        label = obj.category
        if _attr_conf(scene.image_id, row) >= attr_floor:
            label = f"{obj.colour} {label}"
        for word in label.split():
            words.append(word)
            regions.append(row)
    return words, regions


def test_objects_labels_align_words_with_regions(world, tmp_path):
    from vlp.synthetic import load_scenes

    scenes = load_scenes(world / "world")
    result = build_objects_labels(world / "features", tmp_path / "ol", progress="off")
    store = PairStore(tmp_path / "ol")
    assert store.kind == "objects_labels" and len(store) == 10 == result.num_pairs
    for pair in store:
        scene = scenes[int(pair["image_id"])]
        words, regions = expected_words(scene)
        assert pair["words"] == words and pair["word_regions"] == regions
        assert pair["text"] == " ".join(words)
        assert pair["pair_id"] == f"{pair['image_id']}#objects_labels"
    n_objects = sum(len(s.objects) for s in scenes.values())
    stats = store.manifest["stats"]
    assert stats["images"] == 10 and stats["regions"] == n_objects and stats["malformed"] == 0
    assert stats["attributes_used"] == sum((len(s.objects) + 1) // 2 for s in scenes.values())
    assert verify_pairs(tmp_path / "ol").ok
    assert "Wrote 10 objects_labels pairs" in result.summary()


def test_objects_labels_floors(world, tmp_path):
    from vlp.synthetic import load_scenes

    scenes = load_scenes(world / "world")
    build_objects_labels(world / "features", tmp_path / "ol", attr_conf_floor=0.0, obj_conf_floor=0.5,
                         progress="off")
    store = PairStore(tmp_path / "ol")
    for pair in store:
        words, regions = expected_words(scenes[int(pair["image_id"])], attr_floor=0.0, obj_floor=0.5)
        assert (pair["words"], pair["word_regions"]) == (words, regions)
        assert 1 not in pair["word_regions"]  # region 1 is below the object floor everywhere
    assert store.manifest["stats"]["regions_skipped"] == sum(len(s.objects) >= 2 for s in scenes.values())


def test_multi_word_names_and_synonyms(tmp_path):
    objects, attributes = vocab.objects(), vocab.attributes()
    stop, tv, grey = objects.id("stop sign"), objects.id("television"), attributes.id("gray")
    with FeatureStoreWriter(tmp_path / "f", storage="arrow", feature_dim=4) as writer:
        for k in range(12):
            writer.add(FeatureRecord.from_arrays(
                f"img{k}", 100, 100, boxes=np.array([[0, 0, 10, 10], [5, 5, 50, 50]], np.float32),
                features=np.ones((2, 4), np.float32), objects_id=np.array([stop, tv]),
                objects_conf=np.array([0.9, 0.9]), attrs_id=np.array([grey, grey]),
                attrs_conf=np.array([0.5, 0.01])))
    build_objects_labels(tmp_path / "f", tmp_path / "d", progress="off")
    pair = PairStore(tmp_path / "d")[0]
    assert pair["words"] == ["gray", "stop", "sign", "television"]
    assert pair["word_regions"] == [0, 0, 0, 1]
    build_objects_labels(tmp_path / "f", tmp_path / "s", names="synonyms", progress="off")
    seen = set()
    for pair in PairStore(tmp_path / "s"):
        first = pair["words"][0]
        assert first in ("gray", "grey")
        label0 = " ".join(pair["words"][1:-1]) if pair["words"][-1] in ("television", "tv") else None
        assert label0 in ("stop sign", "stopsign")
        seen.add((first, label0, pair["words"][-1]))
        assert len(pair["words"]) == len(pair["word_regions"])
    assert len({s[0] for s in seen}) == 2 and len({s[2] for s in seen}) == 2  # both synonyms occur
    # the same store again: byte-identical choices
    build_objects_labels(tmp_path / "f", tmp_path / "s2", names="synonyms", progress="off")
    assert PairStore(tmp_path / "s2").column("text") == PairStore(tmp_path / "s").column("text")

    build_labels_in_order(tmp_path / "f", tmp_path / "lio", progress="off")
    pair = PairStore(tmp_path / "lio")[0]
    assert pair["labels"] == ["stop sign", "television"] and pair["label_ids"] == [stop, tv]
    assert pair["text"] == "stop sign television"


def test_record_without_labels_is_reported_not_fatal(tmp_path):
    with FeatureStoreWriter(tmp_path / "f", storage="arrow", feature_dim=4) as writer:
        writer.add(FeatureRecord.from_arrays("nolabels", 10, 10, boxes=np.array([[0, 0, 5, 5]], np.float32),
                                             features=np.ones((1, 4), np.float32)))
    result = build_objects_labels(tmp_path / "f", tmp_path / "o", progress="off")
    assert result.num_pairs == 0 and result.stats["malformed"] == 1
    entry = json.loads((tmp_path / "o" / "errors.jsonl").read_text())
    assert entry["where"] == "image nolabels" and "no objects_id" in entry["reason"]


def test_labels_in_order_one_per_region(world, tmp_path):
    from vlp.synthetic import load_scenes

    scenes = load_scenes(world / "world")
    build_labels_in_order(world / "features", tmp_path / "lio", progress="off")
    store = PairStore(tmp_path / "lio")
    assert store.kind == "labels_in_order" and len(store) == 10
    for pair in store:
        scene = scenes[int(pair["image_id"])]
        assert pair["labels"] == [o.category for o in scene.objects]
        assert pair["label_ids"] == [o.category_id for o in scene.objects]
        assert pair["pair_id"] == f"{pair['image_id']}#labels_in_order"


def test_cli_objects_labels_and_labels_in_order(world, tmp_path):
    runner = CliRunner()
    for command in ("objects-labels", "labels-in-order"):
        help_text = runner.invoke(build_main, [command, "--help"]).output
        assert "--out" in help_text and "--names" in help_text
    result = runner.invoke(build_main, ["objects-labels", str(world / "features"), "--out", str(tmp_path / "o"),
                                        "--progress", "off"])
    assert result.exit_code == 0, result.output
    assert "Wrote 10 objects_labels pairs" in result.output
    again = runner.invoke(build_main, ["objects-labels", str(world / "features"), "--out", str(tmp_path / "o"),
                                       "--progress", "off"])
    assert again.exit_code == 1 and "Error:" in again.output
    assert "already holds a pair store; use --overwrite to replace it" in again.output
    result = runner.invoke(build_main, ["labels-in-order", str(world / "features"), "--out", str(tmp_path / "o"),
                                        "--overwrite", "--progress", "off"])
    assert result.exit_code == 0 and PairStore(tmp_path / "o").kind == "labels_in_order"


def test_splits_from_a_pair_store_or_a_split_file(world, tmp_path):
    from vlp.builders.imports import import_coco

    truth = json.loads((world / "world" / "truth.json").read_text())
    split_of = {str(im["image_id"]): im["split"] for im in truth["images"]}
    ann = world / "world" / "annotations"
    # the COCO import of the same images knows their splits (all but image 10 here)
    import_coco([ann / "captions_train.json", ann / "captions_val.json"], tmp_path / "coco",
                karpathy=ann / "dataset_coco.json", progress="off")
    keep = [p for p in PairStore(tmp_path / "coco") if p["image_id"] != "10"]
    from vlp.schemas.pairs import PairStoreWriter

    with PairStoreWriter(tmp_path / "coco9", "caption") as writer:
        for pair in keep:
            writer.add({k: v for k, v in pair.items() if k != "kind"})
    runner = CliRunner()
    result = runner.invoke(build_main, ["objects-labels", str(world / "features"), "-o", str(tmp_path / "o"),
                                        "--splits-from", str(tmp_path / "coco9"), "--progress", "off"])
    assert result.exit_code == 0, result.output
    assert f"1 image(s) not in pair store {tmp_path / 'coco9'} got split ''" in result.output
    got = {p["image_id"]: p["split"] for p in PairStore(tmp_path / "o")}
    assert got == {**split_of, "10": ""}
    assert PairStore(tmp_path / "o").manifest["stats"]["images_without_split"] == 1
    # a text split file, and --split for the images it lacks
    (tmp_path / "splits.txt").write_text("# image split\n" + "".join(f"{i} {s}\n" for i, s in split_of.items()
                                                                     if i != "3"))
    result = runner.invoke(build_main, ["labels-in-order", str(world / "features"), "-o", str(tmp_path / "l"),
                                        "--splits-from", str(tmp_path / "splits.txt"), "--split", "train",
                                        "--progress", "off"])
    assert result.exit_code == 0, result.output
    assert {p["image_id"]: p["split"] for p in PairStore(tmp_path / "l")} == {**split_of, "3": "train"}
    # the synthetic world's splits.json ({split: [ids]}) and a json {image_id: split}
    build_objects_labels(world / "features", tmp_path / "w", splits_from=world / "world" / "splits.json",
                         progress="off")
    assert {p["image_id"]: p["split"] for p in PairStore(tmp_path / "w")} == split_of
    (tmp_path / "s.json").write_text(json.dumps({"1": "val"}))
    result = build_labels_in_order(world / "features", tmp_path / "j", splits_from=tmp_path / "s.json",
                                   progress="off")
    assert result.stats["images_without_split"] == 9
    bad = tmp_path / "bad.txt"
    bad.write_text("1 train extra\n")
    result = runner.invoke(build_main, ["objects-labels", str(world / "features"), "-o", str(tmp_path / "b"),
                                        "--splits-from", str(bad)])
    assert result.exit_code == 1 and f"Error: {bad}:1: expected 'image_id split', found 3 field(s)" in result.output
    assert not (tmp_path / "b").exists()
