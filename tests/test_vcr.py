"""VCR: the synthetic world's multiple choice (object tags, four answers, four rationales, the
image needed), import-vcr on the world and on hand-made official-format rows (tags -> label
words linked to regions, metadata boxes -> gt_boxes.jsonl, bad rows in errors.jsonl), the
four candidates split out of the shared collate exactly, the Q->A / QA->R / Q->AR metric,
and finetune + evaluate end to end (joint, q_a, masked RoI classification)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from vlp.builders.imports import GT_BOXES_NAME, import_vcr
from vlp.schemas.errors import SchemaError
from vlp.schemas.pairs import PairStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlp.synthetic import generate
    from vlp.synthetic.oracle import truth_feature_store

    root = tmp_path_factory.mktemp("vcr-world")
    generate(root / "world", 40, seed=4, overwrite=True, web=False)
    truth_feature_store(root / "world", root / "features", feature_dim=32)
    return root


def _import(world: Path) -> Path:
    out = world / "pairs"
    if not out.exists():  # {stem}: the oracle store names images by scene id (vlp-extract over vcr1images: {path})
        import_vcr(sorted((world / "world" / "vcr").glob("*.jsonl")), out, image_id_template="{stem}",
                   features=world / "features", progress="off")
    return out


def test_world_questions_need_the_image(world):
    from vlp.synthetic import load_scenes

    scenes = load_scenes(world / "world")
    rows = [json.loads(line) for line in (world / "world" / "vcr" / "train.jsonl").read_text().splitlines()]
    train = json.loads((world / "world" / "splits.json").read_text())["train"]
    assert len(rows) == 3 * sum(1 for i in train if scenes[i].objects) > 0
    for row in rows:
        scene = scenes[int(row["img_fn"].split("/")[1].split(".")[0])]
        (k,) = row["question"][3]
        obj = scene.objects[k]
        assert row["objects"] == [o.category for o in scene.objects]
        answers = [a[2] for a in row["answer_choices"]]
        assert len(set(answers)) == 4 and answers[row["answer_label"]] == obj.colour
        rationale = row["rationale_choices"][row["rationale_label"]]
        assert rationale[3:5] == [obj.size, obj.colour]
        # text alone: two rationales carry the answer's colour, only the image tells the size
        assert sum(r[4] == obj.colour for r in row["rationale_choices"]) == 2
        meta = json.loads((world / "world" / "vcr" / "vcr1images" / row["metadata_fn"]).read_text())
        assert [b[:4] for b in meta["boxes"]] == [list(o.box) for o in scene.objects]
    test = [json.loads(line) for line in (world / "world" / "vcr" / "test.jsonl").read_text().splitlines()]
    assert test and all("answer_label" not in row for row in test)


def test_import_from_the_world_links_tags_to_regions(world):
    pairs = list(PairStore(_import(world)))
    row = next(p for p in pairs if p["split"] == "train")
    (k,) = [r for r in row["question_regions"] if r >= 0]
    category = row["objects"][k]
    assert row["question_words"] == ["what", "colour", "is", category, "?"]
    assert row["question_regions"] == [-1, -1, -1, k, -1]
    assert all(words[0] == category and regions == [k] + [-1] * (len(words) - 1)
               for words, regions in zip(row["answer_words"], row["answer_regions"]))
    assert 0 <= row["answer_label"] < 4 and 0 <= row["rationale_label"] < 4
    assert all(p["answer_label"] == -1 for p in pairs if p["split"] == "test")
    manifest = json.loads((_import(world) / "manifest.json").read_text())
    assert manifest["stats"]["pairs_missing_images"] == 0 and manifest["stats"]["malformed"] == 0
    boxes = {json.loads(line)["image_id"]: json.loads(line)
             for line in (_import(world) / GT_BOXES_NAME).read_text().splitlines()}
    first = boxes[row["image_id"]]
    assert first["image"] == f"synthetic/{row['image_id']}.jpg" and len(first["boxes"]) == len(row["objects"])


def _official_row(**changes) -> dict:
    row = {"movie": "1054_Harry_Potter", "objects": ["person", "person", "dining table"],
           "img_fn": "lsmdc_1054_Harry_Potter/1054_00.01.jpg", "metadata_fn": "lsmdc_1054_Harry_Potter/1054_00.01.json",
           "question": ["Why", "is", [0], "looking", "at", [1, 2], "?"],
           "answer_choices": [[[0], "is", "hungry", "."], ["He", "is", "lost", "."], ["No", "."], [[2], "is", "big"]],
           "answer_label": 0,
           "rationale_choices": [["The", [2], "has", "food", "."], ["Nothing", "."], ["It", "rains"], ["Yes", "."]],
           "rationale_label": 0, "annot_id": "val-0", "img_id": "val-0", "question_number": 0}
    row.update(changes)
    return row


def _official(tmp_path: Path, rows, boxes=3) -> Path:
    folder = tmp_path / "vcr1images" / "lsmdc_1054_Harry_Potter"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "1054_00.01.json").write_text(json.dumps({
        "boxes": [[10.0, 20.0, 50.0, 80.0, 0.99], [0, 0, 5, 5, 0.9], [1, 2, 3, 4, 0.8]][:boxes],
        "names": ["person", "person", "dining table"][:boxes], "width": 100, "height": 100}))
    path = tmp_path / "val.jsonl"
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return path


def test_import_of_the_official_layout(tmp_path):
    rows = [_official_row(), _official_row(annot_id="val-1", question=["Is", [5], "ok"]), "{broken",
            _official_row(annot_id="val-2", img_fn="lsmdc_x/none.jpg", metadata_fn="lsmdc_x/none.json"),
            _official_row(annot_id="val-3", metadata_fn="../secret.json")]
    (tmp_path / "secret.json").write_text(json.dumps({"boxes": [[0, 0, 1, 1]] * 3}))  # outside vcr1images: not read
    result = import_vcr([_official(tmp_path, rows)], tmp_path / "out", progress="off")
    pairs = list(PairStore(tmp_path / "out"))
    assert [p["pair_id"] for p in pairs] == ["vcr/val-0"] and result.stats["malformed"] == 4
    row = pairs[0]
    assert row["image_id"] == "lsmdc_1054_Harry_Potter/1054_00.01" and row["split"] == "val"
    assert row["question_words"] == ["Why", "is", "person", "looking", "at", "person", "and", "dining", "table", "?"]
    assert row["question_regions"] == [-1, -1, 0, -1, -1, 1, -1, 2, 2, -1]
    assert row["answer_words"][3] == ["dining", "table", "is", "big"] and row["answer_regions"][3] == [2, 2, -1, -1]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [2, 3, 4, 5] and "object tag" in errors[0]["reason"]
    assert "no such file" in errors[2]["reason"] and "leads outside" in errors[3]["reason"]
    boxes = json.loads((tmp_path / "out" / GT_BOXES_NAME).read_text())
    assert boxes["boxes"] == [[10.0, 20.0, 50.0, 80.0], [0, 0, 5, 5], [1, 2, 3, 4]]
    # a tag beyond the metadata's boxes cannot be linked: the row is refused
    fewer = import_vcr([_official(tmp_path / "b", [_official_row()], boxes=2)], tmp_path / "out2", progress="off")
    assert fewer.num_pairs == 0 and fewer.stats["malformed"] == 1


_TOKEN = st.one_of(st.text(max_size=5), st.lists(st.integers(-2, 4), max_size=3), st.integers(), st.none())
_ROW = st.fixed_dictionaries({}, optional={
    "objects": st.one_of(st.lists(st.sampled_from(["person", "car", ""]), max_size=4), st.integers()),
    "img_fn": st.one_of(st.just("lsmdc_1054_Harry_Potter/1054_00.01.jpg"), st.text(max_size=5), st.none()),
    "question": st.one_of(st.lists(_TOKEN, max_size=4), st.text(max_size=3)),
    "answer_choices": st.lists(st.lists(_TOKEN, max_size=3), max_size=5),
    "rationale_choices": st.lists(st.lists(_TOKEN, max_size=3), max_size=5),
    "answer_label": st.one_of(st.integers(-1, 5), st.text(max_size=2)), "rationale_label": st.integers(-1, 5),
    "annot_id": st.one_of(st.text(max_size=4), st.integers(), st.booleans())})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(_ROW, st.text(max_size=10)), max_size=5))
def test_import_vcr_never_raises_a_traceback(tmp_path_factory, rows):
    root = tmp_path_factory.mktemp("fuzz")
    rows = [r if isinstance(r, dict) else json.dumps(r) for r in rows]
    try:
        import_vcr([_official(root, rows)], root / "out", overwrite=True, progress="off")
    except SchemaError as error:
        assert str(root) in str(error)


# -- the candidates ----------------------------------------------------------------------------

def test_four_candidates_come_out_of_the_shared_collate_exactly(world):
    from vlp.schemas import FeatureStore
    from vlp.trainer.data import collate, load_tokenizer
    from vlp.trainer.config import shipped_vocab
    from vlp.trainer.tasks import TaskContext
    from vlp.trainer.vcr import VCR

    tokenizer = load_tokenizer(shipped_vocab("demo"))
    task = VCR()
    pairs = PairStore(_import(world))
    dataset = task.dataset(pairs, FeatureStore(world / "features"), tokenizer, max_text_len=24, split=["train"])
    assert len(dataset) == 2 * sum(p["split"] == "train" for p in pairs)  # one Q->A and one QA->R example each
    examples = [dataset.example(i) for i in range(4)]
    batch = collate(examples, tokenizer.pad_token_id)
    task.prepare(batch, None, TaskContext.from_tokenizer(tokenizer))
    assert batch["input_ids"].shape[0] == 16 and batch["region_features"].shape[0] == 16
    for b, example in enumerate(examples):
        pair = pairs[int(dataset.indices[b])]
        mode = int(dataset.modes[b])
        for c in range(4):
            row = b * 4 + c
            ids = batch["input_ids"][row][batch["text_mask"][row]].tolist()
            if mode == 0:
                first, second = pair["question_words"], pair["answer_words"][c]
            else:
                a = pair["answer_label"]
                first, second = pair["question_words"] + pair["answer_words"][a], pair["rationale_words"][c]
            assert ids == tokenizer(first, second, is_split_into_words=True)["input_ids"]
            linked = batch["token_regions"][row][batch["token_regions"][row] >= 0].unique().tolist()
            assert linked == sorted({r for r in pair["question_regions"] if r >= 0})
            assert torch.equal(batch["region_features"][row], batch["region_features"][b * 4])
        gold = pair["answer_label"] if mode == 0 else pair["rationale_label"]
        assert batch["vcr_gold"][b].item() == gold and batch["vcr_mode"][b].item() == mode


def test_vcr_scores_by_hand():
    from vlp.trainer.metrics import vcr_scores

    gold_a, gold_r = {"a": 0, "b": 1, "c": 2, "d": 3}, {"a": 1, "b": 1, "c": 1, "d": 1}
    result = vcr_scores({"a": 0, "b": 1, "c": 0, "d": 3}, {"a": 1, "b": 0, "c": 1, "d": 1}, gold_a, gold_r)
    assert result == {"q_a": 0.75, "qa_r": 0.75, "q_ar": 0.5, "n": 4}
    with pytest.raises(ValueError, match="without a gold label"):
        vcr_scores({"z": 0}, {}, gold_a, gold_r)


# -- end to end --------------------------------------------------------------------------------

def _config(world: Path, steps: int, **task) -> dict:
    return {"seed": 0, "model": {"vocab": "demo", "bert": {"hidden": 64, "layers": 2, "heads": 4},
                                 "visual": {"feature_dim": 32}},
            "data": {"features": str(world / "features"), "max_text_len": 24, "max_regions": 36},
            "task": {"name": "vcr", "pairs": str(_import(world)), **task},
            "train": {"steps": steps, "batch_size": 8, "lr": 1.0e-3, "eval_every": steps, "log_every": 0}}


@pytest.mark.slow
@pytest.mark.parametrize("options,main", [({}, "q_ar"), ({"setting": "q_a", "roi_mask_prob": 0.15}, "q_a")])
def test_finetune_and_evaluate(world, tmp_path, options, main):
    from vlp.trainer.config import FinetuneConfig
    from vlp.trainer.finetune import evaluate_run, finetune

    run = tmp_path / "run"
    summary = finetune(FinetuneConfig.from_dict(_config(world, 4, **options)), run)
    assert summary["end_step"] == 4 and summary["best"]["metric"] == main
    history = [json.loads(line) for line in (run / "01-finetune" / "history.jsonl").read_text().splitlines()]
    assert ("vcr_roi_acc" in json.dumps(history)) == ("roi_mask_prob" in options)
    entry = evaluate_run(run, _import(world), world / "features", split=["val"], predictions=tmp_path / "p.jsonl")
    questions = sum(p["split"] == "val" for p in PairStore(_import(world)))
    assert entry["metrics"]["n"] == questions and set(entry["metrics"]) >= {main}
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == questions * (2 if main == "q_ar" else 1)
    test = evaluate_run(run, _import(world), world / "features", split=["test"])  # no labels: nothing scored
    assert test["metrics"]["n"] == 0


def test_cli_default_flags_on_the_world_name_images_as_vlp_extract_does(world, tmp_path):
    from click.testing import CliRunner

    from vlp.cli import build_main
    from vlp.pipeline.discover import discover, image_id_of

    files = sorted(str(p) for p in (world / "world" / "vcr").glob("*.jsonl"))
    result = CliRunner().invoke(build_main, ["import-vcr", *files, "-o", str(tmp_path / "out"), "--progress", "off"])
    assert result.exit_code == 0, result.output
    images = world / "world" / "vcr" / "vcr1images"
    extracted = {image_id_of(p) for p in discover(images).paths}
    pairs = list(PairStore(tmp_path / "out"))
    assert pairs and {p["image_id"] for p in pairs} <= extracted  # e.g. synthetic/12
    for line in (tmp_path / "out" / GT_BOXES_NAME).read_text().splitlines():
        assert (images / json.loads(line)["image"]).is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n")
    result = CliRunner().invoke(build_main, ["import-vcr", str(bad), "-o", str(tmp_path / "strict"), "--strict",
                                             "--progress", "off"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {bad}:1: expected a JSON object, got list"
