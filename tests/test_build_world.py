"""The embedded default works with every vlp-build command's defaults: on a `vlp synth`
world and its oracle feature store, every import and build runs with default flags
(no --image-id-template) and every pair finds its image's features."""

import json

import pytest
from click.testing import CliRunner

from vlp.cli import build_main, main
from vlp.schemas import FeatureStore, FeatureStoreWriter
from vlp.schemas.pairs import PairStore, join_report, verify_pairs
from vlp.synthetic.oracle import truth_feature_store

pytestmark = pytest.mark.slow  # ~20 s: vg-phrases loads spaCy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("build-world")
    result = CliRunner().invoke(main, ["synth", str(root / "world"), "--images", "12", "--seed", "5"])
    assert result.exit_code == 0, result.output
    truth_feature_store(root / "world", root / "features", feature_dim=8)
    # vlp-extract over world/cc/img2dataset names images 00000/<key>: the same records under those names
    truth = json.loads((root / "world" / "truth.json").read_text())
    failed = truth["cc_missing"][0]["row"]
    source = FeatureStore(root / "features")
    with FeatureStoreWriter(root / "cc-features", storage="arrow", feature_dim=8) as writer:
        for row in range(13):
            if row != failed:
                record = source.get(str(row + 1 if row < failed else row))
                record.image_id = f"00000/{row:09d}"
                writer.add(record)
    source.close()
    return root


def build(args, out):
    result = CliRunner().invoke(build_main, [*map(str, args), "-o", str(out), "--progress", "off"])
    assert result.exit_code == 0, result.output
    assert verify_pairs(out).ok
    return result.output, PairStore(out)


def test_every_command_with_its_defaults_finds_the_features(world, tmp_path):
    w, features = world / "world", world / "features"
    truth = json.loads((w / "truth.json").read_text())
    split_of = {str(im["image_id"]): im["split"] for im in truth["images"]}
    ann = w / "annotations"
    runs = {
        "coco": ["import-coco", ann / "captions_train.json", ann / "captions_val.json",
                 "--karpathy", ann / "dataset_coco.json", "--features", features],
        "karpathy": ["import-flickr30k", ann / "dataset_coco.json", "--features", features],
        "vqa": ["import-vqa", *sorted((w / "vqa").glob("*.json")), "--features", features],
        "vg": ["vg-phrases", w, "--features", features],
        "cc-i2d": ["import-cc", w / "cc" / "img2dataset", "--features", world / "cc-features"],
        "cc-tsv": ["import-cc", w / "cc" / "train.tsv", "--features", world / "cc-features"],
    }
    stores = {}
    for name, args in runs.items():
        output, stores[name] = build(args, tmp_path / name)
        missing = stores[name].manifest["stats"]["pairs_missing_images"]
        # the TSV keeps the row whose download failed: its image exists nowhere (reported, not dropped)
        assert missing == (1 if name == "cc-tsv" else 0), (name, output)
        assert len(stores[name]) > 0
    assert stores["vqa"].manifest["stats"]["image_id_template"] == "{image_id}"
    assert stores["vqa"].manifest["stats"]["images_found_by_template"] == 12
    assert len(stores["vqa"]) == 12 * 4 and len(stores["coco"]) == 12 * 5
    for name in ("coco", "karpathy", "vqa", "vg"):
        for pair in stores[name]:
            assert pair["split"].rstrip("0123456789") in (split_of[pair["image_id"]], "val"), name
    # builders over the feature store itself; splits from the COCO import of the same images
    for command in ("objects-labels", "labels-in-order", "hard-negatives"):
        _, store = build([command, features, "--splits-from", tmp_path / "coco"], tmp_path / command)
        assert join_report(store, FeatureStore(features)).pairs_missing_images == 0
        assert {p["image_id"]: p["split"] for p in store} == split_of
        assert store.manifest["stats"]["images_without_split"] == 0
    _, store = build(["topics", tmp_path / "coco", "--features", features], tmp_path / "topics")
    assert store.manifest["stats"]["pairs_missing_images"] == 0 and store.manifest["stats"]["pairs_with_topics"] > 0


def test_import_vqa_without_any_flag_names_the_world_images_as_vlp_extract_does(world, tmp_path):
    """No --features to check against: the files' data_type (not COCO) picks plain ids."""
    w = world / "world"
    _, store = build(["import-vqa", *sorted((w / "vqa").glob("*.json"))], tmp_path / "vqa")
    assert store.manifest["stats"]["image_id_template"] == "{image_id}"
    assert join_report(store, FeatureStore(world / "features")).pairs_missing_images == 0
    assert len(store) == 12 * 4


def test_the_task_importers_with_their_defaults_find_the_world_images(world, tmp_path):
    """GQA, VizWiz, NLVR2, SNLI-VE and MM-IMDB files of the world, imported without any flag:
    every pair's images are in the oracle feature store (NLVR2: with the image copies named
    as vlp-extract over world/nlvr2/images names them)."""
    w = world / "world"
    truth = json.loads((w / "truth.json").read_text())
    split_of = {str(im["image_id"]): im["split"] for im in truth["images"]}
    features = tmp_path / "features"
    truth_feature_store(w, features, feature_dim=8, nlvr2_images=True)
    assert len(FeatureStore(features)) == 12 + len(truth["nlvr2_images"])
    runs = {
        "gqa": ["import-gqa", *(w / "gqa" / f"{s}_balanced_questions.json" for s in ("train", "val", "testdev"))],
        "vizwiz": ["import-vizwiz", *(w / "vizwiz" / f"{s}.json" for s in ("train", "val", "test"))],
        "nlvr2": ["import-nlvr2", *(w / "nlvr2" / f"{s}.json" for s in ("train", "dev", "test1"))],
        "snli_ve": ["import-snli-ve", *(w / "snli_ve" / f"snli_ve_{s}.jsonl" for s in ("train", "dev", "test"))],
        "mmimdb": ["import-mmimdb", w / "mmimdb" / "dataset"],
    }
    names = {"testdev": "test", "dev": "val", "test1": "test"}
    for name, args in runs.items():
        output, store = build([*args, "--features", features], tmp_path / name)
        assert store.manifest["stats"]["pairs_missing_images"] == 0, (name, output)
        assert store.manifest["stats"]["malformed"] == 0, (name, output)
        assert len(store) == sum(truth["tasks"][name]["counts"].values())
        for pair in store:
            image = str(truth["nlvr2_images"][pair["image_id"]]) if name == "nlvr2" else pair["image_id"]
            assert names.get(pair["split"], pair["split"]) == split_of[image], name
