"""vlp export-pairs: pair stores as LXMERT's and COCO's annotation JSON, read the way their loaders read them."""

from __future__ import annotations

import json

import pytest

from vlp.exporters import ExportError
from vlp.exporters.pairs import export_pairs
from vlp.schemas.pairs import PairStoreWriter

CAPTIONS = [("COCO_train2014_000000000009", "A red circle.", "train"),
            ("COCO_train2014_000000000009", "One circle, red.", "train"),
            ("COCO_train2014_000000000025", "Two blue stars.", "train"),
            ("COCO_val2014_000000000042", "A green box.", "val"),
            ("web/abc", "A photo with no number in its id.", "train")]
QUESTIONS = [("COCO_train2014_000000000009", "9000", "What color is the circle?", ["red", "orange"], [1.0, 0.3],
              "other", "what color is the"),
             ("COCO_train2014_000000000009", "9001", "How many circles are there?", ["1"], [1.0], "number", "how many"),
             ("COCO_train2014_000000000025", "25000", "Is there a star?", ["yes"], [1.0], "yes/no", "is there a")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    with PairStoreWriter(root / "caps", "caption") as writer:
        for k, (image_id, text, split) in enumerate(CAPTIONS):
            writer.add({"pair_id": f"c{k}", "image_id": image_id, "text": text, "source": "coco", "split": split})
    with PairStoreWriter(root / "vqa", "question") as writer:
        for image_id, qid, text, answers, scores, atype, qtype in QUESTIONS:
            writer.add({"pair_id": f"q{qid}", "image_id": image_id, "text": text, "source": "vqa", "split": "train",
                        "question_id": qid, "answers": answers, "answer_scores": scores,
                        "answer_type": atype, "question_type": qtype})
    return root / "caps", root / "vqa"


def test_lxmert_vqa_reads_like_lxmerts_vqa_dataset(stores, tmp_path):
    out = tmp_path / "train.json"
    stats = export_pairs([stores[1]], out, "lxmert-vqa", progress="off")
    assert stats.exported == 3
    # lxmert src/tasks/vqa_data.py: VQADataset / VQATorchDataset
    data = json.load(open(out))
    id2datum = {datum["question_id"]: datum for datum in data}
    ans2label = {"red": 0, "orange": 1, "1": 2, "yes": 3}
    assert sorted(id2datum) == [9000, 9001, 25000]  # integer question ids, as in LXMERT's files
    for image_id, qid, text, answers, scores, atype, qtype in QUESTIONS:
        datum = id2datum[int(qid)]
        assert (datum["img_id"], datum["sent"]) == (image_id, text)
        target = [0.0] * len(ans2label)
        for ans, score in datum["label"].items():
            target[ans2label[ans]] = score
        assert [target[ans2label[a]] for a in answers] == pytest.approx(scores)
        assert (datum["answer_type"], datum["question_type"]) == (atype, qtype)


def test_lxmert_pretrain_groups_captions_and_questions_per_image(stores, tmp_path):
    out = tmp_path / "mscoco_train.json"
    stats = export_pairs(list(stores), out, "lxmert-pretrain", split="train", progress="off")
    assert stats.exported == 4 + 3
    # lxmert src/pretrain/lxmert_data.py LXMERTDataset: one datum per sentence
    data = []
    for i in json.load(open(out)):
        img_id = i["img_id"]
        for sents_cat, sents in i["sentf"].items():
            labels = i["labelf"][sents_cat] if sents_cat in i["labelf"] else None
            for sent_idx, sent in enumerate(sents):
                new_datum = {"uid": f"{img_id}_{sents_cat}_{sent_idx}", "img_id": img_id, "sent": sent}
                if labels is not None:
                    new_datum["label"] = labels[sent_idx]
                data.append(new_datum)
    captions = [d for d in data if "_mscoco_" in d["uid"]]
    questions = [d for d in data if "_vqa_" in d["uid"]]
    assert sorted((d["img_id"], d["sent"]) for d in captions) == sorted(
        (i, t) for i, t, s in CAPTIONS if s == "train")
    assert all("label" not in d for d in captions)
    assert sorted((d["img_id"], d["sent"], tuple(d["label"].items())) for d in questions) == sorted(
        (i, t, tuple(zip(a, s))) for i, _, t, a, s, _, _ in QUESTIONS)
    assert len({d["uid"] for d in data}) == len(data)


def test_coco_captions_reads_like_pycocotools(stores, tmp_path):
    out = tmp_path / "captions_train.json"
    stats = export_pairs([stores[0]], out, "coco-captions", id_format="trailing-int", progress="off")
    assert (stats.exported, stats.skipped) == (4, 1)
    error = json.loads((tmp_path / "captions_train.json.errors.jsonl").read_text())
    assert error["image_id"] == "web/abc" and "no digits" in error["reason"]
    # pycocotools COCO.__init__ / createIndex
    dataset = json.load(open(out))
    assert type(dataset) == dict
    anns = {ann["id"]: ann for ann in dataset["annotations"]}
    imgs = {img["id"]: img for img in dataset["images"]}
    img_to_anns = {}
    for ann in dataset["annotations"]:
        img_to_anns.setdefault(ann["image_id"], []).append(ann)
    assert len(anns) == 4 and sorted(imgs) == [9, 25, 42]
    assert imgs[9]["file_name"] == "COCO_train2014_000000000009.jpg"
    assert sorted(a["caption"] for a in img_to_anns[9]) == ["A red circle.", "One circle, red."]
    assert all(isinstance(a["image_id"], int) and a["image_id"] in imgs for a in anns.values())
    sidecar = json.loads((tmp_path / "captions_train.json.vlp-export.json").read_text())
    assert sidecar["records"] == {"exported": 4, "skipped": 1} and sidecar["complete"]


def test_coco_captions_takes_sizes_from_a_feature_store(stores, tmp_path):
    from vlp.trainer.toydata import tiny_feature_store

    features = tiny_feature_store(tmp_path / "feats", ["COCO_train2014_000000000009", "COCO_val2014_000000000042"])
    sizes = {r.image_id: (r.image_w, r.image_h) for r in features}
    features.close()
    out = tmp_path / "c.json"
    stats = export_pairs([stores[0]], out, "coco-captions", id_format="trailing-int",
                         features=tmp_path / "feats", progress="off")
    assert (stats.exported, stats.skipped) == (3, 2)  # 25 has no features, web/abc no number
    images = {img["id"]: img for img in json.load(open(out))["images"]}
    assert (images[9]["width"], images[9]["height"]) == sizes["COCO_train2014_000000000009"]
    assert (images[42]["width"], images[42]["height"]) == sizes["COCO_val2014_000000000042"]


def test_pair_export_errors(stores, tmp_path):
    with pytest.raises(ExportError, match="holds caption pairs; lxmert-vqa takes question pairs"):
        export_pairs([stores[0]], tmp_path / "x.json", "lxmert-vqa", progress="off")
    with pytest.raises(ExportError, match="no pair could be exported"):
        export_pairs([stores[0]], tmp_path / "x.json", "coco-captions", split="test", progress="off")
    assert list(tmp_path.iterdir()) == []
    export_pairs([stores[1]], tmp_path / "v.json", "lxmert-vqa", progress="off")
    with pytest.raises(ExportError, match="already exists"):
        export_pairs([stores[1]], tmp_path / "v.json", "lxmert-vqa", progress="off")


def test_cli_export_pairs(stores, tmp_path):
    from click.testing import CliRunner

    from vlp.cli import main

    out = tmp_path / "vqa.json"
    result = CliRunner().invoke(main, ["export-pairs", str(stores[1]), "--to", "lxmert-vqa", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "exported 3 pair(s)" in result.output and len(json.load(open(out))) == 3
    bad = CliRunner().invoke(main, ["export-pairs", str(stores[0]), "--to", "lxmert-vqa", "--out", str(out)])
    assert bad.exit_code == 1 and bad.output.startswith("Error: ")
