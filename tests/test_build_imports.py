"""vlp-build import-*: hand-made fixtures in the real formats (with malformed rows) and the synthetic world."""

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from vlp.builders import imports
from vlp.schemas.answers import answer_vocabulary, normalize_answer, scored_answers
from vlp.cli import build_main
from vlp.schemas import SchemaError
from vlp.schemas.pairs import PairStore, verify_pairs

OFF = {"progress": "off"}


def rows(root, *columns):
    return [tuple(p[c] for c in columns) for p in PairStore(root)]


def errors(root):
    path = root / "errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("import-world")
    generate(root, 12, seed=4, overwrite=True, web=False)
    return root


# --------------------------------------------------------------------------- COCO / Karpathy


def coco_fixture(tmp_path):
    doc = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"},
                      {"id": 25, "file_name": "COCO_train2014_000000000025.jpg"}, {"id": 30}],
           "annotations": [{"id": 1, "image_id": 9, "caption": "A plate  of food.\n"},
                           {"id": 2, "image_id": 25, "caption": "A giraffe."},
                           {"id": 3, "image_id": 77, "caption": "no such image"},
                           {"id": 4, "image_id": 9},
                           {"id": 1, "image_id": 25, "caption": "duplicate annotation id"}]}
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps(doc))
    return path


def test_import_coco_hand_made(tmp_path):
    path = coco_fixture(tmp_path)
    result = imports.import_coco([path], tmp_path / "p", **OFF)
    assert rows(tmp_path / "p", "pair_id", "image_id", "text", "split", "source") == [
        ("coco/1", "COCO_train2014_000000000009", "A plate of food.", "train", "coco"),
        ("coco/2", "COCO_train2014_000000000025", "A giraffe.", "train", "coco")]
    found = [(e["where"], e.get("field"), e["reason"]) for e in errors(tmp_path / "p")]
    assert found[:3] == [
        ("images[2]", "file_name", "missing (expected a file name)"),
        ("annotations[2]", "image_id", "image_id 77 is not in 'images'"),
        ("annotations[3]", "caption", "missing (expected a caption text)")]
    assert found[3][0] == "annotations[4]" and "pair_id 'coco/1' is already in the store" in found[3][2]
    assert result.stats["malformed"] == 4 and result.stats["captions"] == 2
    with pytest.raises(SchemaError, match=r"captions_train2014.json:images\[2\]: file_name: missing"):
        imports.import_coco([path], tmp_path / "q", strict=True, **OFF)
    imports.import_coco([path], tmp_path / "t", image_id_template="train2014/{id:012d}", **OFF)
    assert rows(tmp_path / "t", "image_id")[0] == ("train2014/000000000009",)


def test_import_coco_with_karpathy_on_the_world(world, tmp_path):
    ann = world / "annotations"
    imports.import_coco([ann / "captions_train.json", ann / "captions_val.json"], tmp_path / "p",
                        karpathy=ann / "dataset_coco.json", **OFF)
    store = PairStore(tmp_path / "p")
    truth = json.loads((world / "truth.json").read_text())
    split_of = {str(im["image_id"]): im["split"] for im in truth["images"]}
    assert len(store) == 12 * 5 and verify_pairs(tmp_path / "p").ok
    for pair in store:
        assert pair["split"] == split_of[pair["image_id"]]  # val file holds val + test; Karpathy tells them apart
    karpathy = json.loads((ann / "dataset_coco.json").read_text())
    expected = {(str(im["cocoid"]), s["raw"]) for im in karpathy["images"] for s in im["sentences"]}
    assert {(p["image_id"], p["text"]) for p in store} == expected
    # The Karpathy file alone: the same captions, pair ids by sentid.
    imports.import_coco([], tmp_path / "k", karpathy=ann / "dataset_coco.json", **OFF)
    assert {(p["image_id"], p["text"], p["split"]) for p in PairStore(tmp_path / "k")} == \
        {(p["image_id"], p["text"], p["split"]) for p in store}
    assert PairStore(tmp_path / "k")[0]["pair_id"] == "coco/0"


def test_import_flickr30k_karpathy(tmp_path):
    doc = {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "train",
         "sentences": [{"raw": "Two young guys.", "sentid": 0}, {"raw": "", "sentid": 1}]},
        {"imgid": 1, "sentences": []},
        {"filename": "10002456.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "Workers.", "sentid": 5}]}]}
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(doc))
    runner = CliRunner()
    result = runner.invoke(build_main, ["import-flickr30k", str(path), "--out", str(tmp_path / "p"),
                                        "--progress", "off"])
    assert result.exit_code == 0, result.output
    assert "Wrote 2 caption pairs" in result.output and "malformed 2" in result.output
    assert rows(tmp_path / "p", "pair_id", "image_id", "text", "split") == [
        ("flickr30k/0", "1000092795", "Two young guys.", "train"), ("flickr30k/5", "10002456", "Workers.", "test")]


# --------------------------------------------------------------------------- CC / SBU / img2dataset


def test_import_cc_tsv_auto_columns_and_malformed(tmp_path):
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("a dog on grass\thttp://x.invalid/1.jpg\n"
                   "https://x.invalid/2.jpg\ta cat\n"          # CC12M order in the same file: auto handles it
                   "no url here\tnor here\n"
                   "three\tcolumns\there\n"
                   "\n"
                   "  \thttp://x.invalid/5.jpg\n"
                   "a bird\thttp://x.invalid/6.jpg\n")
    result = imports.import_cc(tsv, tmp_path / "p", samples_per_shard=4, **OFF)
    assert rows(tmp_path / "p", "pair_id", "image_id", "text", "url") == [
        ("cc/0", "00000/000000", "a dog on grass", "http://x.invalid/1.jpg"),
        ("cc/1", "00000/000001", "a cat", "https://x.invalid/2.jpg"),
        ("cc/5", "00001/000011", "a bird", "http://x.invalid/6.jpg")]  # key = shard 00001 + row-in-shard 1
    assert [(e["line"], e["reason"][:20]) for e in errors(tmp_path / "p")] == [
        (3, "cannot tell the url "), (4, "expected 2 tab-separ"), (6, "empty caption or url")]
    assert result.stats["malformed"] == 3
    imports.import_cc(tsv, tmp_path / "q", columns="url,caption", image_id_template="{row}", **OFF)
    # explicit columns are taken at their word, even where the "caption" looks like a URL
    assert rows(tmp_path / "q", "image_id", "text")[:3] == [("0", "http://x.invalid/1.jpg"), ("1", "a cat"),
                                                           ("2", "nor here")]


def test_import_cc_world_tsv_and_img2dataset_agree(world, tmp_path):
    truth = json.loads((world / "truth.json").read_text())
    imports.import_cc(world / "cc" / "train.tsv", tmp_path / "tsv", **OFF)
    imports.import_cc(world / "cc" / "img2dataset", tmp_path / "i2d", **OFF)
    tsv, i2d = PairStore(tmp_path / "tsv"), PairStore(tmp_path / "i2d")
    assert len(tsv) == 13 and len(i2d) == 12  # one row's download failed
    failed = truth["cc_missing"][0]
    assert f"00000/{failed['key']}" in tsv.image_ids() and f"00000/{failed['key']}" not in i2d.image_ids()
    by_id = {p["image_id"]: (p["text"], p["url"]) for p in tsv}
    for pair in i2d:
        assert by_id[pair["image_id"]] == (pair["text"], pair["url"])
    table = pq.read_table(world / "cc" / "img2dataset" / "00000.parquet")
    assert i2d.manifest["stats"]["not_downloaded"] == table.column("status").to_pylist().count("failed_to_download")
    # vlp-extract over the img2dataset folder names images 00000/<key>: the default template matches.
    jpgs = {f"00000/{p.stem}" for p in (world / "cc" / "img2dataset" / "00000").glob("*.jpg")}
    assert i2d.image_ids() == jpgs


def test_import_sbu(tmp_path):
    path = tmp_path / "sbu.json"
    path.write_text(json.dumps({"image_urls": ["http://s.invalid/a.jpg", "http://s.invalid/b.jpg", None,
                                               "http://s.invalid/d.jpg"],
                                "captions": ["Man on a bike", "", "orphan", "Sunset over the sea"]}))
    result = imports.import_sbu(path, tmp_path / "p", **OFF)
    assert rows(tmp_path / "p", "pair_id", "image_id", "text", "url") == [
        ("sbu/0", "00000/000000000", "Man on a bike", "http://s.invalid/a.jpg"),
        ("sbu/3", "00000/000000003", "Sunset over the sea", "http://s.invalid/d.jpg")]
    assert [e["where"] for e in errors(tmp_path / "p")] == ["[1]", "[2]"] and result.stats["malformed"] == 2


# --------------------------------------------------------------------------- VQA


def test_vqa_answer_normalization():
    cases = {"Yes.": "yes", "two": "2", "The Dog": "dog", "dont know": "don't know", "1,000": "1000",
             "red-white": "red white", "hot dog!": "hot dog", "3.5": "3.5", "a, b": "b", "ten": "10",
             "  none ": "0", "isnt": "isn't", "couldnt've": "couldn't've", "it's": "it's", "its": "its",
             "an apple": "apple", "left/right": "left right", "yes\tno": "yes no"}
    assert {k: normalize_answer(k) for k in cases} == cases
    answers, scores = scored_answers(["yes"] * 6 + ["Yes."] * 1 + ["no"] * 2 + ["maybe"], {"yes", "no"})
    assert answers == ["yes", "no"] and scores == [1.0, pytest.approx(2 / 3)]
    assert scored_answers(["no", "no"], None, "butd") == (["no"], [pytest.approx(0.6)])
    assert answer_vocabulary(["Two"] * 9 + ["2"] + ["red"] * 8 + ["blue"] * 9) == ["2", "blue"]


def vqa_fixture(tmp_path):
    questions = {"data_subtype": "train2014", "questions": [
        {"image_id": 9, "question": "What colour is it?", "question_id": 90},
        {"image_id": 9, "question": "How many?", "question_id": 91},
        {"image_id": "nine", "question": "Bad image id?", "question_id": 92},
        {"image_id": 25, "question": "Is it red?", "question_id": 93}]}
    ann = lambda qid, mc, given, **kw: {"question_id": qid, "image_id": 9, "multiple_choice_answer": mc,
                                       "answer_type": kw.get("at", "other"), "question_type": kw.get("qt", "what"),
                                       "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(given)]}
    annotations = {"annotations": [
        ann(90, "red", ["red"] * 7 + ["Red."] + ["dark red", "blue"]),
        ann(91, "two", ["2"] * 4 + ["two"] * 4 + ["3"] * 2, at="number", qt="how many"),
        {"question_id": 93, "answers": "yes"}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return [tmp_path / "a.json", tmp_path / "q.json"]


def test_import_vqa_hand_made(tmp_path):
    files = vqa_fixture(tmp_path)
    result = imports.import_vqa(files, tmp_path / "p", min_count=1, **OFF)
    got = {p["pair_id"]: p for p in PairStore(tmp_path / "p")}
    assert sorted(got) == ["vqa/90", "vqa/91"]
    assert got["vqa/90"]["answers"] == ["red"] and got["vqa/90"]["answer_scores"] == [1.0]
    assert got["vqa/90"]["image_id"] == "COCO_train2014_000000000009" and got["vqa/90"]["split"] == "train"
    assert got["vqa/91"]["answers"] == ["2"] and got["vqa/91"]["answer_type"] == "number"
    assert result.stats["answer_vocab_size"] == 2 and result.stats["answers_out_of_vocab"] == 3
    assert json.loads((tmp_path / "p" / "answer_vocab.json").read_text()) == ["2", "red"]
    assert [e["where"] for e in errors(tmp_path / "p")] == ["questions[2]", "annotations[2]"]
    assert "Image ids by COCO_{subtype}_{image_id:012d} (--image-id-template auto without --features" \
        in result.summary()
    # an explicit vocabulary keeps "dark red" and "3" too
    (tmp_path / "v.json").write_text(json.dumps(["red", "dark red", "2", "3"]))
    imports.import_vqa(files, tmp_path / "v", answer_vocab=tmp_path / "v.json", **OFF)
    got = {p["pair_id"]: p for p in PairStore(tmp_path / "v")}
    assert got["vqa/90"]["answers"] == ["red", "dark red"]
    assert got["vqa/90"]["answer_scores"] == [1.0, pytest.approx(1 / 3)]
    assert got["vqa/91"]["answers"] == ["2", "3"] and got["vqa/91"]["answer_scores"] == [1.0, pytest.approx(2 / 3)]


def test_import_vqa_world(world, tmp_path):
    vqa = world / "vqa"
    files = sorted(vqa.glob("*.json"))
    runner = CliRunner()
    result = runner.invoke(build_main, ["import-vqa", *map(str, files), "--out", str(tmp_path / "p"),
                                        "--image-id-template", "{image_id}", "--min-answer-count", "2",
                                        "--progress", "off"])
    assert result.exit_code == 0, result.output
    store = PairStore(tmp_path / "p")
    assert len(store) == 12 * 4
    annotations = {a["question_id"]: a for f in files if "annotations" in f.name
                   for a in json.loads(f.read_text())["annotations"]}
    vocab = set(json.loads((tmp_path / "p" / "answer_vocab.json").read_text()))
    for pair in store:
        ann = annotations[int(pair["question_id"])]
        answers, scores = scored_answers([a["answer"] for a in ann["answers"]], vocab)
        assert (pair["answers"], pair["answer_scores"]) == (answers, pytest.approx(scores))
        assert pair["question_type"] == ann["question_type"] and pair["image_id"] == str(ann["image_id"])
    train_mc = [normalize_answer(annotations[int(p["question_id"])]["multiple_choice_answer"])
                for p in store if p["split"] == "train"]
    assert vocab == {a for a in set(train_mc) if train_mc.count(a) >= 2}


# --------------------------------------------------------------------------- GQA, NLVR2, SNLI-VE


def test_import_gqa(tmp_path):
    path = tmp_path / "val_balanced_questions.json"
    path.write_text(json.dumps({
        "201": {"imageId": "2354786", "question": "Is the sky dark?", "answer": "yes",
                "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "202": {"question": "No image?", "answer": "no"},
        "203": {"imageId": "n1", "question": "What is it?"}}))
    imports.import_gqa([path], tmp_path / "p", **OFF)
    assert rows(tmp_path / "p", "pair_id", "image_id", "split", "answers", "answer_scores", "answer_type",
                "question_type") == [
        ("gqa/201", "2354786", "val", ["yes"], [1.0], "verify", "verifyAttr"),
        ("gqa/203", "n1", "val", None, None, None, None)]
    assert [e["where"] for e in errors(tmp_path / "p")] == ["['202']"]


def test_import_nlvr2(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text("\n".join([
        json.dumps({"identifier": "dev-850-0-0", "sentence": "There are two dogs.", "label": "True"}),
        json.dumps({"identifier": "dev-850-0-1", "sentence": "One dog.", "label": "False"}),
        "{not json",
        json.dumps({"identifier": "dev-851-1-0", "sentence": "Maybe.", "label": "unknown"}),
        json.dumps({"identifier": "train-10171-0-0", "sentence": "Birds.", "label": "True", "directory": 7}),
    ]) + "\n")
    result = imports.import_nlvr2([path], tmp_path / "p", **OFF)
    assert rows(tmp_path / "p", "pair_id", "image_id", "image_id_2", "label", "split") == [
        ("nlvr2/dev-850-0-0", "dev-850-0-img0", "dev-850-0-img1", 1, "dev"),
        ("nlvr2/dev-850-0-1", "dev-850-0-img0", "dev-850-0-img1", 0, "dev"),
        ("nlvr2/train-10171-0-0", "train-10171-0-img0", "train-10171-0-img1", 1, "train")]
    assert [e["line"] for e in errors(tmp_path / "p")] == [3, 4] and result.stats["true"] == 2
    imports.import_nlvr2([path], tmp_path / "t", image_id_template="{split}/{directory}/{stem}", **OFF)
    assert rows(tmp_path / "t", "image_id_2")[-1] == ("train/7/train-10171-0-img1",)


def test_import_snli_ve(tmp_path):
    path = tmp_path / "snli_ve_test.jsonl"
    line = lambda pid, label, s2="A man is outside.": json.dumps(
        {"Flickr30K_ID": "2248275918", "sentence1": "A man.", "sentence2": s2, "gold_label": label, "pairID": pid})
    path.write_text("\n".join([line("p1", "entailment"), line("p2", "-"), line("p3", "contradiction", ""),
                               line("p4", "neutral"), line("p1", "neutral")]) + "\n")
    imports.import_snli_ve([path], tmp_path / "p", **OFF)
    assert rows(tmp_path / "p", "pair_id", "image_id", "text", "label", "split") == [
        ("snli-ve/p1", "2248275918", "A man is outside.", "entailment", "test"),
        ("snli-ve/p4", "2248275918", "A man is outside.", "neutral", "test")]
    assert [e["line"] for e in errors(tmp_path / "p")] == [2, 3, 5]


def test_import_vqa_keeps_the_annotators_raw_answers(tmp_path):
    imports.import_vqa(vqa_fixture(tmp_path), tmp_path / "p", min_count=1, **OFF)
    got = {p["pair_id"]: p for p in PairStore(tmp_path / "p")}
    assert got["vqa/90"]["human_answers"] == ["red"] * 7 + ["Red."] + ["dark red", "blue"]
    assert got["vqa/91"]["human_answers"] == ["2"] * 4 + ["two"] * 4 + ["3"] * 2
    assert "human_answers" in PairStore(tmp_path / "p").manifest["columns"]


# --------------------------------------------------------------------------- VizWiz, MM-IMDB


def vizwiz_fixture(tmp_path):
    answers = lambda *given: [{"answer": a, "answer_confidence": "yes"} for a in given]
    doc = [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answerable": 1, "answer_type": "other",
         "answers": answers("Coffee.", "coffee", "coffee", "tea", "Coffee", "coffee", "a coffee", "tea", "coffee",
                            "unanswerable")},
        {"image": "VizWiz_val_00000001.jpg", "question": "What color is this?", "answerable": 0,
         "answer_type": "unanswerable", "answers": answers(*["unanswerable"] * 8, "blue", "unsuitable")},
        {"image": "VizWiz_val_00000002.jpg", "question": "Is it on?", "answers": [{"answer": 3}]},
        {"question": "Where is the image?", "answers": answers("x")},
        {"image": "VizWiz_val_00000004.jpg", "question": "How many?", "answerable": 2, "answers": []},
        "not an object",
    ]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(doc))
    return path


def test_import_vizwiz_hand_made(tmp_path):
    result = imports.import_vizwiz([vizwiz_fixture(tmp_path)], tmp_path / "p", **OFF)
    got = {p["pair_id"]: p for p in PairStore(tmp_path / "p")}
    assert sorted(got) == ["vizwiz/VizWiz_val_00000000", "vizwiz/VizWiz_val_00000001"]
    first, second = got["vizwiz/VizWiz_val_00000000"], got["vizwiz/VizWiz_val_00000001"]
    # VQA normalization ("Coffee." -> coffee, "a coffee" -> coffee), min(1, count / 3)
    assert first["answers"] == ["coffee", "tea", "unanswerable"]
    assert first["answer_scores"] == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 3)]
    assert first["human_answers"][:2] == ["Coffee.", "coffee"] and len(first["human_answers"]) == 10
    assert (first["image_id"], first["split"], first["answer_type"], first["question_type"], first["question_id"]) \
        == ("VizWiz_val_00000000", "val", "other", "answerable", "VizWiz_val_00000000")
    assert second["answers"][0] == "unanswerable" and second["answer_scores"][0] == 1.0
    assert second["answer_type"] == "unanswerable" and second["question_type"] == "unanswerable"
    found = [(e["where"], e.get("field")) for e in errors(tmp_path / "p")]
    assert found == [("[2]", "answers"), ("[3]", "image"), ("[4]", "answerable"), ("[5]", None)]
    assert result.stats["questions"] == 2 and result.stats["unanswerable"] == 1
    # a test file without answers: pairs without answers
    (tmp_path / "test.json").write_text(json.dumps([{"image": "VizWiz_test_00000000.jpg", "question": "What?"}]))
    result = imports.import_vizwiz([tmp_path / "test.json"], tmp_path / "t", image_id_template="test/{stem}", **OFF)
    assert rows(tmp_path / "t", "image_id", "split", "answers") == [("test/VizWiz_test_00000000", "test", None)]
    assert result.stats["without_answers"] == 1


def mmimdb_fixture(tmp_path):
    dataset = tmp_path / "mmimdb" / "dataset"
    dataset.mkdir(parents=True)
    movies = {"0000008": {"title": "Edison Kinetoscopic Record", "plot": ["A man sneezes.", "Second plot."],
                          "genres": ["Documentary", "Short"]},
              "0000009": {"title": "Miss Jerry", "plot": ["A  reporter\nposes as a maid."], "genres": ["Romance"]},
              "0000010": {"title": "No plot", "genres": ["Drama"]},
              "0000011": {"title": "Bad genres", "plot": ["x"], "genres": "Drama"},
              "0000012": {"title": "Not in the split", "plot": ["A trip."], "genres": []}}
    for movie_id, movie in movies.items():
        (dataset / f"{movie_id}.json").write_text(json.dumps(movie))
    (dataset / "0000013.json").write_text('{"title": ')
    (tmp_path / "mmimdb" / "split.json").write_text(json.dumps(
        {"train": ["0000008"], "dev": ["0000009", "0000010"], "test": ["0000011"]}))
    return dataset


def test_import_mmimdb_hand_made(tmp_path):
    dataset = mmimdb_fixture(tmp_path)
    result = imports.import_mmimdb(dataset, tmp_path / "p", **OFF)  # split.json found beside dataset/
    assert rows(tmp_path / "p", "pair_id", "image_id", "text", "labels", "split", "kind") == [
        ("mmimdb/0000008", "0000008", "A man sneezes.", ["Documentary", "Short"], "train", "multilabel"),
        ("mmimdb/0000009", "0000009", "A reporter poses as a maid.", ["Romance"], "val", "multilabel"),
        ("mmimdb/0000012", "0000012", "A trip.", [], "", "multilabel")]
    found = [(e["file"].rsplit("/", 1)[1], e["line"], e.get("field")) for e in errors(tmp_path / "p")]
    assert found == [("0000010.json", 1, "plot"), ("0000011.json", 1, "genres"), ("0000013.json", 1, None)]
    assert result.stats["without_split"] == 1
    assert json.loads((tmp_path / "p" / "labels.json").read_text()) == ["Documentary", "Romance", "Short"]
    # no split file at all: every split empty; a template
    (tmp_path / "mmimdb" / "split.json").unlink()
    imports.import_mmimdb(dataset, tmp_path / "q", image_id_template="posters/{id}", **OFF)
    assert {p["split"] for p in PairStore(tmp_path / "q")} == {""}
    assert PairStore(tmp_path / "q")[0]["image_id"] == "posters/0000008"


def test_import_vizwiz_and_mmimdb_on_the_world(world, tmp_path):
    truth = json.loads((world / "truth.json").read_text())
    split_of = {str(im["image_id"]): im["split"] for im in truth["images"]}
    runner = CliRunner()
    files = [world / "vizwiz" / f"{name}.json" for name in ("train", "val", "test")]
    result = runner.invoke(build_main, ["import-vizwiz", *map(str, files), "-o", str(tmp_path / "v"),
                                        "--progress", "off"])
    assert result.exit_code == 0, result.output
    store = PairStore(tmp_path / "v")
    assert len(store) == 12 and {p["image_id"]: p["split"] for p in store} == split_of
    raw = {r["image"]: r for f in files for r in json.loads(f.read_text())}
    for pair in store:
        row = raw[pair["image_id"] + ".jpg"]
        assert pair["human_answers"] == [a["answer"] for a in row["answers"]]
        answers, scores = scored_answers(pair["human_answers"], None)
        assert (pair["answers"], pair["answer_scores"]) == (answers, pytest.approx(scores))
        assert pair["answer_type"] == row["answer_type"]
    result = runner.invoke(build_main, ["import-mmimdb", str(world / "mmimdb" / "dataset"), "-o",
                                        str(tmp_path / "m"), "--progress", "off"])
    assert result.exit_code == 0, result.output
    store = PairStore(tmp_path / "m")
    assert {p["image_id"]: p["split"] for p in store} == split_of and len(store) == 12
    for pair in store:
        movie = json.loads((world / "mmimdb" / "dataset" / f"{pair['image_id']}.json").read_text())
        assert pair["labels"] == movie["genres"] and pair["text"] == movie["plot"][0]


def test_import_cli_help_errors_and_feature_check(world, tmp_path):
    runner = CliRunner()
    for command in ("import-coco", "import-cc", "import-sbu", "import-flickr30k", "import-vqa", "import-gqa",
                    "import-nlvr2", "import-snli-ve", "import-vizwiz", "import-mmimdb"):
        out = runner.invoke(build_main, [command, "--help"]).output
        assert "--image-id-template" in out and "--strict" in out and "--features" in out, command
    bad = tmp_path / "captions_x.json"
    bad.write_text('{"images": [}')
    result = runner.invoke(build_main, ["import-coco", str(bad), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and f"Error: {bad}:1: not valid JSON" in result.output
    result = runner.invoke(build_main, ["import-coco", str(bad), "--out", str(tmp_path / "c"),
                                        "--image-id-template", "{filename}"])
    assert result.exit_code == 1 and "unknown field(s) filename" in result.output

    from vlp.synthetic.oracle import truth_feature_store

    truth_feature_store(world, tmp_path / "f", feature_dim=4, image_ids=list(range(1, 11)))
    ann = world / "annotations"
    result = runner.invoke(build_main, ["import-coco", str(ann / "captions_train.json"), str(ann / "captions_val.json"),
                                        "--out", str(tmp_path / "p"), "--features", str(tmp_path / "f"),
                                        "--progress", "off"])
    assert result.exit_code == 0, result.output
    assert "10 of 60 pairs have no features (2 image ids missing from the feature store: 11, 12)" in result.output
    assert len(PairStore(tmp_path / "p")) == 60  # reported, never dropped


def test_progress_totals_are_known_before_the_work(world, tmp_path, capsys):
    imports.import_cc(world / "cc" / "train.tsv", tmp_path / "cc", progress="lines")
    ann = world / "annotations"
    imports.import_coco([ann / "captions_train.json", ann / "captions_val.json"], tmp_path / "coco",
                        progress="lines")
    vqa = sorted((world / "vqa").glob("*.json"))
    imports.import_vqa(vqa, tmp_path / "vqa", min_count=1, progress="lines")
    err = capsys.readouterr().err
    assert "import-cc: 13/13 line (100%)" in err  # 12 images + the row whose download failed
    assert "import-coco: 60/60 pair (100%)" in err and "import-vqa: 48/48 pair (100%)" in err
