"""Pair stores (schemas/pairs.py): round trips, validation, shards, joins, verification."""

import json
import logging
import pickle

import pytest

from vlp.schemas import SchemaError, StoreError
from vlp.schemas.pairs import (KIND_COLUMNS, PairStore, PairStoreWriter, join_report, joined,
                               pair_schema, verify_pairs)

#: One valid pair of every kind, with its kind-specific columns filled.
EXAMPLES = {
    "caption": {"text": "a red circle"},
    "objects_labels": {"text": "red circle star", "words": ["red", "circle", "star"], "word_regions": [0, 0, 3]},
    "labels_in_order": {"text": "circle star", "labels": ["circle", "star"], "label_ids": [5, 9]},
    "vg_phrases": {"text": "red circle, blue star", "num_phrases": 2, "num_dropped": 1},
    "web": {"text": "shapes", "url": "https://x.invalid/1.jpg", "score": 0.5},
    "generated": {"text": "a star", "score": 0.25, "generator": "captioner-v1"},
    "question": {"text": "what colour?", "question_id": "7", "answers": ["red", "blue"],
                 "answer_scores": [1.0, 0.3333333432674408], "answer_type": "other", "question_type": "what"},
    "nlvr2": {"text": "both have stars", "image_id_2": "img-b", "label": 1},
    "entailment": {"text": "there is a star", "label": "neutral"},
    "hard_negatives": {"text": "", "negatives": ["b", "c"], "negative_scores": [0.75, 0.5]},
    "multilabel": {"text": "a baker falls in love", "labels": ["Drama", "Romance"]},
    "refexp": {"text": "the small striped star", "ref_id": "3", "ann_id": "17", "target_box": [1.0, 2.0, 30.0, 40.0],
               "category": "star", "image_w": 640, "image_h": 480},
    "vcr": {"text": "what colour is 1 ?", "annot_id": "val-0", "question_words": ["what", "colour", "is", "star", "?"],
            "question_regions": [-1, -1, -1, 1, -1],
            "answer_words": [["red"], ["blue"], ["green"], ["white"]], "answer_regions": [[-1], [-1], [-1], [-1]],
            "rationale_words": [["it", "is", "red"], ["no"], ["maybe"], ["yes"]],
            "rationale_regions": [[-1, -1, -1], [-1], [-1], [-1]], "answer_label": 0, "rationale_label": 0,
            "objects": ["circle", "star"]},
}


def make_pair(pair_kind, i, **extra):
    return {"pair_id": f"p{i}", "image_id": f"img{i}", "source": "test", "split": "train",
            **EXAMPLES[pair_kind], **extra}


def write(root, kind, pairs, **kwargs):
    with PairStoreWriter(root, kind, **kwargs) as writer:
        for pair in pairs:
            writer.add(pair)
    return PairStore(root)


def test_every_kind_is_covered_by_the_examples():
    assert set(EXAMPLES) == set(KIND_COLUMNS)


@pytest.mark.parametrize("kind", sorted(KIND_COLUMNS))
def test_round_trip_of_every_kind(tmp_path, kind):
    pairs = [make_pair(kind, i) for i in range(5)]
    store = write(tmp_path / kind, kind, pairs, shard_size=2)
    assert len(store) == 5 and store.kind == kind
    assert len(store.manifest["shards"]) == 3  # 2 + 2 + 1
    assert store.columns == pair_schema(kind).names
    for i, pair in enumerate(pairs):
        got = store[i]
        assert got == {**{name: None for name in store.columns}, **pair, "kind": kind}
    assert [p["pair_id"] for p in store] == [f"p{i}" for i in range(5)]
    assert store[-1]["pair_id"] == "p4"
    with pytest.raises(IndexError):
        store[5]
    assert verify_pairs(tmp_path / kind).ok


def test_topics_column_round_trips(tmp_path):
    store = write(tmp_path / "s", "caption", [make_pair("caption", 0, topics=["circle"])], optional=["topics"])
    assert store[0]["topics"] == ["circle"]
    with pytest.raises(SchemaError, match="unknown optional pair column 'colour'"):
        PairStoreWriter(tmp_path / "t", "caption", optional=["colour"])


@pytest.mark.parametrize("kind, change, message", [
    ("objects_labels", {"word_regions": [0]}, "pair 'p0': words and word_regions differ in length"),
    ("labels_in_order", {"label_ids": [1]}, "pair 'p0': labels and label_ids differ in length"),
    ("question", {"answer_scores": []}, "pair 'p0': answers and answer_scores differ in length"),
    ("hard_negatives", {"negatives": ["a"]}, "pair 'p0': negatives and negative_scores differ"),
    ("entailment", {"label": "maybe"}, "pair 'p0': label must be one of entailment, neutral, contradiction"),
    ("nlvr2", {"image_id_2": ""}, "pair 'p0': image_id_2 is empty"),
    ("caption", {"image_id": ""}, "pair 'p0': image_id is empty"),
    ("caption", {"text": 3}, "pair 'p0': text must be a string"),
    ("caption", {"kind": "question"}, "pair 'p0': kind 'question' in a store of kind 'caption'"),
    ("caption", {"colour": "red"}, "pair 'p0': unknown column\\(s\\) colour for kind 'caption'"),
    ("objects_labels", {"words": "red circle"}, "pair 'p0': words must be a list"),
    ("web", {"score": "high"}, "pair 'p0': score must be a number"),
    ("web", {"url": 5}, "pair 'p0': url must be a string"),
])
def test_validation_names_pair_and_field(tmp_path, kind, change, message):
    with PairStoreWriter(tmp_path / "s", kind) as writer:
        with pytest.raises(SchemaError, match=message):
            writer.add(make_pair(kind, 0, **change))
        writer.add(make_pair(kind, 1))  # the bad pair wrote nothing
    assert [p["pair_id"] for p in PairStore(tmp_path / "s")] == ["p1"]


def test_duplicate_pair_id_is_refused(tmp_path):
    with PairStoreWriter(tmp_path / "s", "caption") as writer:
        writer.add(make_pair("caption", 0))
        with pytest.raises(StoreError, match="pair_id 'p0' is already in the store"):
            writer.add(make_pair("caption", 0))
    assert len(PairStore(tmp_path / "s")) == 1


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(SchemaError, match="unknown pair kind 'poem'"):
        PairStoreWriter(tmp_path / "s", "poem")


@pytest.mark.parametrize("count, shard_size, sizes", [(6, 3, [3, 3]), (7, 3, [3, 3, 1]), (1, 5, [1]),
                                                      (0, 5, []), (10, 1, [1] * 10)])
def test_shard_boundaries(tmp_path, count, shard_size, sizes):
    store = write(tmp_path / "s", "caption", [make_pair("caption", i) for i in range(count)],
                  shard_size=shard_size, batch_rows=2)
    assert [s["records"] for s in store.manifest["shards"]] == sizes
    assert store.manifest["num_pairs"] == count and len(store) == count
    assert [store[i]["pair_id"] for i in range(count)] == [f"p{i}" for i in range(count)]
    assert not list((tmp_path / "s").glob("*.partial"))


def test_store_pickles_as_its_path(tmp_path):
    store = write(tmp_path / "s", "caption", [make_pair("caption", i) for i in range(3)])
    store[0]  # open a shard before pickling
    data = pickle.dumps(store)
    assert len(data) < 500
    clone = pickle.loads(data)
    assert clone[2] == store[2] and len(clone) == 3


def test_join_report_and_joined_with_missing_images(tmp_path, caplog):
    from vlp.demo import random_records
    from vlp.schemas import FeatureStore, FeatureStoreWriter

    records = list(random_records(3, seed=1, feature_dim=8))  # demo/000000 .. demo/000002
    with FeatureStoreWriter(tmp_path / "f", storage="arrow", feature_dim=8) as writer:
        for record in records:
            writer.add(record)
    features = FeatureStore(tmp_path / "f")
    ids = [r.image_id for r in records]
    captions = write(tmp_path / "c", "caption", [
        make_pair("caption", 0, image_id=ids[0]), make_pair("caption", 1, image_id="gone/1"),
        make_pair("caption", 2, image_id=ids[2]), make_pair("caption", 3, image_id="gone/1")])
    report = join_report(captions, features)
    assert (report.pairs, report.pairs_missing_images, report.missing_image_ids) == (4, 2, ["gone/1"])
    assert "2 of 4 pairs have no features" in report.summary()
    with caplog.at_level(logging.WARNING):
        got = [(pair["pair_id"], [r.image_id for r in recs]) for pair, recs in joined(captions, features)]
    assert got == [("p0", [ids[0]]), ("p2", [ids[2]])]
    assert "2 pair(s) skipped" in caplog.text
    with pytest.raises(StoreError, match="pair 'p1'"):
        list(joined(captions, features, on_missing="error"))

    # NLVR2: the second image counts too.
    nlvr = write(tmp_path / "n", "nlvr2", [
        make_pair("nlvr2", 0, image_id=ids[0], image_id_2=ids[1]),
        make_pair("nlvr2", 1, image_id=ids[0], image_id_2="gone/2")])
    assert nlvr.image_ids() == {ids[0], ids[1], "gone/2"}
    report = join_report(nlvr, set(ids))
    assert (report.pairs_missing_images, report.missing_image_ids) == (1, ["gone/2"])
    pairs = list(joined(nlvr, features))
    assert len(pairs) == 1 and [r.image_id for r in pairs[0][1]] == [ids[0], ids[1]]
    assert join_report(captions, set(ids) | {"gone/1"}).summary() == "all 4 pairs have features"
    features.close()


def test_a_failed_write_leaves_nothing_and_keeps_the_old_store(tmp_path):
    root = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with PairStoreWriter(root, "caption", shard_size=2) as writer:
            assert writer.path == tmp_path / "s.partial"
            for i in range(5):
                writer.add(make_pair("caption", i))
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing at s, no s.partial
    write(root, "caption", [make_pair("caption", i) for i in range(3)])
    with pytest.raises(RuntimeError):
        with PairStoreWriter(root, "caption", mode="overwrite") as writer:
            writer.add(make_pair("caption", 9))
            raise RuntimeError("killed")
    assert [p["pair_id"] for p in PairStore(root)] == ["p0", "p1", "p2"]  # the old store is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_an_incomplete_store_warns_and_a_new_build_replaces_it(tmp_path, caplog):
    # An incomplete store, as older vlp versions left behind after a failed build.
    root = tmp_path / "s"
    write(root, "caption", [make_pair("caption", i) for i in range(4)], shard_size=2)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (tmp_path / "s.partial").mkdir()  # and a killed build's folder
    (tmp_path / "s.partial" / "pairs-00000.arrow.partial").write_bytes(b"torn")
    with caplog.at_level(logging.WARNING):
        store = PairStore(root)
    assert "incomplete" in caplog.text and len(store) == 4
    report = verify_pairs(root)
    assert report.ok and any("incomplete" in w for w in report.warnings)
    store = write(root, "caption", [make_pair("caption", 7)])  # mode "create": no overwrite needed
    assert [p["pair_id"] for p in store] == ["p7"] and store.manifest["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_only_pair_stores_are_replaced(tmp_path):
    other = tmp_path / "feats"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "vlp-features", "schema_version": 1}))
    with pytest.raises(StoreError, match="holds something other than a pair store"):
        PairStoreWriter(other, "caption", mode="overwrite")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty and not a pair store \\(holds todo.txt\\)"):
        PairStoreWriter(tmp_path / "notes", "caption", mode="overwrite")
    assert (other / "manifest.json").exists() and (tmp_path / "notes" / "todo.txt").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_create_refuses_existing_and_overwrite_replaces(tmp_path):
    root = tmp_path / "s"
    write(root, "caption", [make_pair("caption", i) for i in range(3)])
    with pytest.raises(StoreError, match="already holds a pair store; use --overwrite to replace it"):
        PairStoreWriter(root, "caption")
    assert len(PairStore(root)) == 3  # untouched
    store = write(root, "vg_phrases", [make_pair("vg_phrases", 9)], mode="overwrite")
    assert store.kind == "vg_phrases" and [p["pair_id"] for p in store] == ["p9"]
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "pairs-00000.arrow"]


def test_stats_and_sources_reach_the_manifest(tmp_path):
    with PairStoreWriter(tmp_path / "s", "caption", sources=["a.json"]) as writer:
        writer.add(make_pair("caption", 0))
        writer.stats = {"malformed": 2}
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["stats"] == {"malformed": 2} and manifest["sources"] == ["a.json"]
    assert manifest["complete"] and manifest["num_pairs"] == 1


def test_verify_pairs_finds_corruption_counts_and_duplicates(tmp_path):
    root = tmp_path / "s"
    write(root, "caption", [make_pair("caption", i) for i in range(4)], shard_size=2)
    report = verify_pairs(root)
    assert report.ok and report.pairs_checked == 4 and report.errors == []

    # A flipped byte: sha256 differs from the manifest.
    shard = root / "pairs-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify_pairs(root)
    assert not report.ok and "pairs-00001.arrow: sha256" in report.errors[0]

    # A manifest whose counts lie, and a duplicate pair_id across shards.
    write(root, "caption", [make_pair("caption", 0), make_pair("caption", 1)], shard_size=1, mode="overwrite")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["records"] = 2
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert any("1 rows, the manifest says 2" in e for e in verify_pairs(root).errors)

    write(root, "caption", [make_pair("caption", 0), make_pair("caption", 1)], shard_size=1, mode="overwrite")
    import shutil
    shutil.copy(root / "pairs-00000.arrow", root / "pairs-00001.arrow")  # both shards now hold p0
    manifest = json.loads((root / "manifest.json").read_text())
    from vlp.schemas.shards import sha256_file
    manifest["shards"][1]["sha256"] = sha256_file(root / "pairs-00001.arrow")
    manifest["shards"][1]["bytes"] = (root / "pairs-00001.arrow").stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))
    report = verify_pairs(root)
    assert report.errors == [f"{root / 'pairs-00001.arrow'}: pair_id 'p0' occurs more than once"]

    (root / "pairs-00001.arrow").unlink()
    assert "listed in the manifest but missing" in verify_pairs(root).errors[0]
    assert "no such directory" in verify_pairs(tmp_path / "nothing").errors[0]


def test_vlp_inspect_reports_a_pair_store(tmp_path):
    from click.testing import CliRunner

    from vlp.cli import main

    texts = ["A red circle.", "a blue star and a red circle", "zorblax", "two hearts", "", "a star"]
    splits = ["train", "train", "train", "val", "val", ""]
    store = write(tmp_path / "s", "caption", [make_pair("caption", i, text=t, split=s)
                                              for i, (t, s) in enumerate(zip(texts, splits))])
    assert len(store) == 6
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\na\nred\ncircle\nblue\nstar\nand\ntwo\n##s\nheart\n.\n")
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tmp_path / "s"), "--json", "--vocab", str(vocab)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kind"] == "caption" and report["num_pairs"] == 6 and report["ok"]
    assert report["splits"] == {"": 1, "train": 3, "val": 2}
    # words per text (whitespace): 3, 7, 1, 2, 0, 2 -> sorted 0 1 2 2 3 7 (nearest-rank percentiles)
    assert report["text_words"] == {"mean": 2.5, "p50": 2, "p90": 3, "p99": 7, "max": 7, "empty": 1}
    vocabulary = report["vocabulary"]
    # BERT-style words: a red circle . | a blue star and a red circle | zorblax | two hearts | a star
    assert vocabulary["words"] == 16 and vocabulary["distinct_words"] == 10
    assert vocabulary["word_coverage"] == round(14 / 16, 4)  # zorblax, hearts are not whole words in it
    assert vocabulary["distinct_word_coverage"] == round(8 / 10, 4)
    assert vocabulary["top_words_not_in_vocab"] == [["zorblax", 1], ["hearts", 1]]
    assert vocabulary["top_words"][:2] == [["a", 4], ["red", 2]]
    assert [row["pair_id"] for row in report["rows"]] == ["p0", "p1", "p2"]
    result = runner.invoke(main, ["inspect", str(tmp_path / "s"), "--rows", "1"])
    assert result.exit_code == 0, result.output
    assert "format       vlp-pairs, kind caption, complete" in result.output
    assert "splits       (none) 1, train 3, val 2" in result.output
    assert "text words   mean 2.5, median 2, p90 3, p99 7, max 7, 1 empty" in result.output
    assert "vocabulary   10 distinct words of 16 (--vocab vocab.txt for coverage)" in result.output
    assert "  p0  image img0  split train\n    text: A red circle." in result.output
    assert "p1  image" not in result.output and "checked      6 pair(s): OK" in result.output
    result = runner.invoke(main, ["inspect", str(tmp_path / "s"), "img3"])
    assert "pairs of img3:\n  p3  image img3  split val\n    text: two hearts" in result.output
    # a damaged shard: exit 1 with the error listed
    shard = tmp_path / "s" / "pairs-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-8] + b"x" * 8)
    result = runner.invoke(main, ["inspect", str(tmp_path / "s")])
    assert result.exit_code == 1 and "error: " in result.output and "sha256" in result.output
