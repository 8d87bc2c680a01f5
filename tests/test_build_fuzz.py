"""Every importer on hostile input: wrongly typed and missing fields, broken encodings,
truncated files. No input may end in a traceback: the command exits 0 with the bad rows
in errors.jsonl (file, line or JSON path, reason), or 1 with one ``Error:`` line for a
file that is unusable as a whole, and then leaves nothing at --out."""

import json
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlp.cli import build_main
from vlp.schemas.pairs import verify_pairs

MISSING = object()
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False),
                    st.text(max_size=6))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=4)


def mutated(row: dict):
    """A row whose fields each stay, take any JSON value, or go missing."""
    fields = {key: st.one_of(st.just(value), st.just(value), json_values, st.just(MISSING))
              for key, value in row.items()}
    return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not MISSING})


def rows_of(row: dict):
    return st.lists(st.one_of(mutated(row), json_values), min_size=0, max_size=5)


# How the bytes of a file get broken: nothing, a byte that is not UTF-8 somewhere, a cut.
damage = st.one_of(st.none(), st.tuples(st.just("insert"), st.floats(0, 1),
                                        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\x80abc"])),
                   st.tuples(st.just("cut"), st.floats(0, 1)))


def damaged(data: bytes, how) -> bytes:
    if how is None:
        return data
    at = int(how[1] * len(data))
    return data[:at] + how[2] + data[at:] if how[0] == "insert" else data[:at]


def run(args, tmp: Path):
    """Run vlp-build; check the outcome is one of the two allowed ones."""
    out = tmp / "out"
    result = CliRunner().invoke(build_main, [*map(str, args), "--out", str(out), "--progress", "off"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert not out.exists() and not (tmp / "out.partial").exists()  # a failed build leaves nothing
        return None
    assert verify_pairs(out).ok
    errors = out / "errors.jsonl"
    logged = [json.loads(line) for line in errors.read_text().splitlines()] if errors.exists() else []
    for entry in logged:
        assert entry["file"] and entry["reason"] and ("line" in entry or "where" in entry), entry
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"]["malformed"] == len(logged)
    return manifest


def write_json(path: Path, doc, how) -> Path:
    path.write_bytes(damaged(json.dumps(doc).encode("utf-8"), how))
    return path


def write_lines(path: Path, rows, how) -> Path:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    path.write_bytes(damaged(text.encode("utf-8"), how))
    return path


COCO_IMAGE = {"id": 9, "file_name": "COCO_train2014_000000000009.jpg"}
COCO_ANN = {"id": 1, "image_id": 9, "caption": "A plate of food."}


@FUZZ
@given(images=rows_of(COCO_IMAGE), annotations=rows_of(COCO_ANN), how=damage)
def test_fuzz_import_coco(images, annotations, how):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_json(tmp / "captions_train2014.json", {"images": images, "annotations": annotations}, how)
        run(["import-coco", path], tmp)


KARPATHY_IMAGE = {"filename": "1.jpg", "filepath": "images", "split": "train", "cocoid": 1,
                  "sentences": [{"raw": "A dog.", "sentid": 0}]}


@FUZZ
@given(images=rows_of(KARPATHY_IMAGE), sentences=rows_of({"raw": "A cat.", "sentid": 7}), how=damage)
def test_fuzz_import_karpathy(images, sentences, how):
    images = images + [{**KARPATHY_IMAGE, "sentences": sentences}]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_json(tmp / "dataset_flickr30k.json", {"images": images}, how)
        run(["import-flickr30k", path], tmp)
        captions = write_json(tmp / "captions_val2014.json", {"images": [COCO_IMAGE], "annotations": [COCO_ANN]},
                              None)
        (tmp / "k").mkdir()
        run(["import-coco", captions, "--karpathy", path], tmp / "k")


@FUZZ
@given(lines=st.lists(st.one_of(st.text(max_size=20), st.just("a dog\thttp://x.invalid/1.jpg"),
                                st.builds(lambda a, b: f"{a}\t{b}", st.text(max_size=8), st.text(max_size=8))),
                      max_size=6), how=damage)
def test_fuzz_import_cc(lines, how):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_lines(tmp / "cc.tsv", lines, how)
        manifest = run(["import-cc", path], tmp)
        if manifest is not None and how is not None and how[0] == "insert":
            # the broken byte's line is reported, never kept with U+FFFD in its text
            from vlp.schemas.pairs import PairStore

            assert all("\ufffd" not in p["text"] + p["url"] for p in PairStore(tmp / "out"))


@FUZZ
@given(urls=st.lists(st.one_of(st.just("http://s.invalid/a.jpg"), json_values), max_size=4),
       captions=st.lists(st.one_of(st.just("Man on a bike"), json_values), max_size=4),
       top=st.one_of(st.just("ok"), json_values), how=damage)
def test_fuzz_import_sbu(urls, captions, top, how):
    doc = {"image_urls": urls, "captions": captions} if top == "ok" else top
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(["import-sbu", write_json(tmp / "sbu.json", doc, how)], tmp)


VQA_QUESTION = {"image_id": 9, "question": "What colour?", "question_id": 90}
VQA_ANN = {"question_id": 90, "image_id": 9, "multiple_choice_answer": "red", "answer_type": "other",
           "question_type": "what", "answers": [{"answer": "red", "answer_id": 1}]}


@FUZZ
@given(questions=rows_of(VQA_QUESTION), annotations=rows_of(VQA_ANN),
       answers=st.lists(st.one_of(st.just({"answer": "Red."}), json_values), max_size=3),
       subtype=st.one_of(st.just("train2014"), json_values), how=damage)
def test_fuzz_import_vqa(questions, annotations, answers, subtype, how):
    annotations = annotations + [{**VQA_ANN, "question_id": 91, "answers": answers}]
    questions = questions + [{**VQA_QUESTION, "question_id": 91}]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        q = write_json(tmp / "q.json", {"data_subtype": subtype, "questions": questions}, how)
        a = write_json(tmp / "a.json", {"annotations": annotations}, None)
        run(["import-vqa", q, a, "--min-answer-count", "1"], tmp)


GQA_QUESTION = {"imageId": "2354786", "question": "Is the sky dark?", "answer": "yes",
                "types": {"structural": "verify", "detailed": "verifyAttr"}}


@FUZZ
@given(questions=st.dictionaries(st.text(max_size=4), st.one_of(mutated(GQA_QUESTION), json_values), max_size=4),
       types=st.one_of(st.just({"structural": "verify"}), json_values), how=damage)
def test_fuzz_import_gqa(questions, types, how):
    questions["x"] = {**GQA_QUESTION, "types": types}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(["import-gqa", write_json(tmp / "val_questions.json", questions, how)], tmp)


NLVR2_ROW = {"identifier": "dev-850-0-0", "sentence": "There are two dogs.", "label": "True", "directory": 7}


@FUZZ
@given(rows=st.lists(st.one_of(mutated(NLVR2_ROW), json_values, st.text(max_size=10)), max_size=6), how=damage)
def test_fuzz_import_nlvr2(rows, how):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(["import-nlvr2", write_lines(tmp / "dev.json", rows, how)], tmp)


SNLI_ROW = {"Flickr30K_ID": "2248275918", "sentence2": "A man is outside.", "gold_label": "entailment",
            "pairID": "p1"}


@FUZZ
@given(rows=st.lists(st.one_of(mutated(SNLI_ROW), json_values, st.text(max_size=10)), max_size=6), how=damage)
def test_fuzz_import_snli_ve(rows, how):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(["import-snli-ve", write_lines(tmp / "snli_ve_dev.jsonl", rows, how)], tmp)


VIZWIZ_ROW = {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answerable": 1,
              "answer_type": "other", "answers": [{"answer": "coffee", "answer_confidence": "yes"}] * 3}


@FUZZ
@given(rows=st.lists(st.one_of(mutated(VIZWIZ_ROW), json_values), max_size=5),
       answers=st.one_of(st.just(VIZWIZ_ROW["answers"]), json_values), top=st.one_of(st.none(), json_values),
       how=damage)
def test_fuzz_import_vizwiz(rows, answers, top, how):
    rows.append({**VIZWIZ_ROW, "image": "VizWiz_val_00000001.jpg", "answers": answers})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(["import-vizwiz", write_json(tmp / "val.json", rows if top is None else top, how)], tmp)


MMIMDB_MOVIE = {"title": "Miss Jerry", "plot": ["A reporter poses as a maid."], "genres": ["Romance", "Short"]}


@FUZZ
@given(movies=st.lists(st.one_of(mutated(MMIMDB_MOVIE), json_values), max_size=4),
       split=st.one_of(st.just({"train": ["0"], "dev": ["1"], "test": ["2"]}), json_values),
       hows=st.lists(damage, min_size=5, max_size=5))
def test_fuzz_import_mmimdb(movies, split, hows):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = tmp / "mmimdb" / "dataset"
        dataset.mkdir(parents=True)
        for k, movie in enumerate(movies):
            write_json(dataset / f"{k}.json", movie, hows[k])
        write_json(tmp / "mmimdb" / "split.json", split, hows[4])
        run(["import-mmimdb", dataset], tmp)


# --------------------------------------------------------------------------- the defects, one by one


@pytest.mark.parametrize("field, value", [("id", [1]), ("id", {"a": 1}), ("file_name", 5)])
def test_coco_images_with_wrongly_typed_fields_are_logged(tmp_path, field, value):
    doc = {"images": [COCO_IMAGE, {**COCO_IMAGE, "id": 10, field: value}],
           "annotations": [COCO_ANN, {**COCO_ANN, "id": 2, "image_id": [9]}]}
    path = write_json(tmp_path / "captions_train2014.json", doc, None)
    manifest = run(["import-coco", path], tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["where"], e["field"]) for e in logged] == [("images[1]", field), ("annotations[1]", "image_id")]
    assert manifest["num_pairs"] == 1


def test_vqa_ids_that_are_lists_or_objects_are_logged(tmp_path):
    q = write_json(tmp_path / "q.json", {"data_subtype": "train2014", "questions": [
        VQA_QUESTION, {**VQA_QUESTION, "question_id": [91]}, {**VQA_QUESTION, "question_id": 92, "image_id": {}},
        {**VQA_QUESTION, "question_id": 93, "image_id": True}]}, None)
    a = write_json(tmp_path / "a.json", {"annotations": [VQA_ANN, {**VQA_ANN, "question_id": {"x": 1}}]}, None)
    manifest = run(["import-vqa", q, a, "--min-answer-count", "1"], tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert sorted((Path(e["file"]).name, e["where"], e["field"]) for e in logged) == [
        ("a.json", "annotations[1]", "question_id"), ("q.json", "questions[1]", "question_id"),
        ("q.json", "questions[2]", "image_id"), ("q.json", "questions[3]", "image_id")]
    assert manifest["num_pairs"] == 1


def test_snli_ve_and_nlvr2_refuse_wrongly_typed_fields(tmp_path):
    snli = write_lines(tmp_path / "snli_ve_dev.jsonl", [
        SNLI_ROW, {**SNLI_ROW, "pairID": ["p2"]}, {**SNLI_ROW, "pairID": "p3", "Flickr30K_ID": ["1"]},
        {**SNLI_ROW, "pairID": "p4", "Flickr30K_ID": 2248275918}], None)
    manifest = run(["import-snli-ve", snli], tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["field"]) for e in logged] == [(2, "pairID"), (3, "Flickr30K_ID")]
    assert manifest["num_pairs"] == 2  # an integer Flickr id is an id
    nlvr = write_lines(tmp_path / "dev.json", [
        NLVR2_ROW, {**NLVR2_ROW, "identifier": "dev-850-0-1", "label": True},
        {**NLVR2_ROW, "identifier": "dev-850-0-2", "directory": [7]},
        {**NLVR2_ROW, "identifier": "dev-850-0-3", "sentence": ["a"]}], None)
    (tmp_path / "nl").mkdir()
    manifest = run(["import-nlvr2", nlvr], tmp_path / "nl")
    logged = [json.loads(line) for line in (tmp_path / "nl" / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["field"]) for e in logged] == [(2, "label"), (3, "directory"), (4, "sentence")]
    assert manifest["num_pairs"] == 1


def test_non_utf8_lines_are_logged_not_kept(tmp_path):
    tsv = tmp_path / "cc.tsv"
    tsv.write_bytes(b"a dog\thttp://x.invalid/1.jpg\ncaf\xe9 au lait\thttp://x.invalid/2.jpg\n"
                    b"a cat\thttp://x.invalid/3.jpg\n")
    manifest = run(["import-cc", tsv], tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["reason"]) for e in logged] == [(2, "not UTF-8 text (byte 0xe9 at column 4)")]
    assert manifest["num_pairs"] == 2 and manifest["stats"]["rows"] == 2
    jsonl = write_lines(tmp_path / "snli_ve_dev.jsonl", [SNLI_ROW], None)
    jsonl.write_bytes(jsonl.read_bytes() + json.dumps({**SNLI_ROW, "pairID": "p2"}).encode().replace(
        b"A man", b"A m\xffn") + b"\n")
    (tmp_path / "s").mkdir()
    manifest = run(["import-snli-ve", jsonl], tmp_path / "s")
    logged = [json.loads(line) for line in (tmp_path / "s" / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in logged] == [2] and manifest["num_pairs"] == 1


def test_a_failed_import_leaves_nothing_and_the_retry_needs_no_flag(tmp_path):
    good = write_json(tmp_path / "captions_train2014.json", {"images": [COCO_IMAGE], "annotations": [COCO_ANN]},
                      None)
    bad = tmp_path / "captions_val2014.json"
    bad.write_text('{"images": [')
    runner = CliRunner()
    out = tmp_path / "p"
    result = runner.invoke(build_main, ["import-coco", str(good), str(bad), "-o", str(out), "--progress", "off"])
    assert result.exit_code == 1 and f"Error: {bad}:1: not valid JSON" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions_train2014.json", "captions_val2014.json"]
    result = runner.invoke(build_main, ["import-coco", str(good), "-o", str(out), "--progress", "off"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(build_main, ["import-coco", str(good), "-o", str(out), "--progress", "off"])
    assert result.exit_code == 1 and "use --overwrite to replace it" in result.output


VG_IMAGE = {"id": 1, "regions": [{"region_id": 11, "image_id": 1, "phrase": "a red circle"}]}


@FUZZ
@given(images=rows_of(VG_IMAGE), regions=rows_of({"region_id": 12, "image_id": 2, "phrase": "a star"}),
       image_data=st.one_of(st.none(), st.lists(st.one_of(mutated({"image_id": 1, "url": "http://x/VG_100K/1.jpg",
                                                                   "coco_id": 5}), json_values), max_size=3)),
       splits=st.one_of(st.none(), json_values, st.just({"train": [1, 2]})), how=damage)
def test_fuzz_vg_phrases(images, regions, image_data, splits, how):
    from vlp.builders.vg_phrases import build_vg_phrases
    from vlp.schemas import SchemaError

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_json(tmp / "region_descriptions.json", images + [{"image_id": 2, "regions": regions}], how)
        if image_data is not None:
            write_json(tmp / "image_data.json", image_data, None)
        if splits is not None:
            write_json(tmp / "splits.json", splits, None)
        try:
            build_vg_phrases(tmp, tmp / "out", image_id_template="{folder}{image_id}", progress="off",
                             verb_test=lambda phrases: ["star" in p for p in phrases])
        except (SchemaError, FileNotFoundError):
            assert not (tmp / "out").exists() and not (tmp / "out.partial").exists()
            return
        assert verify_pairs(tmp / "out").ok


def test_vg_phrases_wrongly_typed_ids_and_repeated_images_are_logged(tmp_path):
    from vlp.builders.vg_phrases import build_vg_phrases
    from vlp.schemas import SchemaError

    write_json(tmp_path / "region_descriptions.json", [
        VG_IMAGE, {"id": [2], "regions": []}, {"id": 3, "regions": {"phrase": "x"}}, VG_IMAGE], None)
    result = build_vg_phrases(tmp_path, tmp_path / "out", progress="off", verb_test=lambda ps: [False] * len(ps))
    logged = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["where"], e.get("field")) for e in logged[:2]] == [("[1]", "image_id"), ("[2]", "regions")]
    assert logged[2]["where"] == "[3]" and "already in the store" in logged[2]["reason"]
    assert result.num_pairs == 1
    (tmp_path / "splits.json").write_text("[1, 2]")
    with pytest.raises(SchemaError, match="splits.json: expected"):
        build_vg_phrases(tmp_path, tmp_path / "again", progress="off", verb_test=lambda ps: [False] * len(ps))
    assert not (tmp_path / "again").exists()
