"""RefCOCO+: the synthetic world's expressions (no location words, a same-category distractor,
a description only the target fits), import-refcoco on the world and on a hand-made file of
the official layout (refs pickle through the restricted unpickler, instances.json), the
box IoU / accuracy metric, the two losses, and finetune + evaluate end to end with
ground-truth and with detected regions."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from vlp.builders.imports import GT_BOXES_NAME, import_refcoco, read_refs_pickle
from vlp.schemas.errors import SchemaError
from vlp.schemas.pairs import PairStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOCATION_WORDS = {"left", "right", "top", "bottom", "middle", "center", "centre", "above", "below", "behind",
                  "front", "near", "next", "first", "second", "third", "last", "closest", "farthest"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlp.synthetic import generate
    from vlp.synthetic.oracle import truth_feature_store

    root = tmp_path_factory.mktemp("refcoco-world")
    generate(root / "world", 60, seed=3, overwrite=True, style="classic")  # the crowded scenes these expectations count on
    truth_feature_store(root / "world", root / "features", feature_dim=32)
    return root


def _import(world: Path) -> Path:
    out = world / "pairs"
    if not out.exists():
        ref = world / "world" / "refcoco+"
        import_refcoco(ref / "refs(unc).p", ref / "instances.json", out, features=world / "features", progress="off")
    return out


# -- the synthetic world ---------------------------------------------------------------------

def test_world_expressions_name_the_target_by_attributes_only(world):
    from vlp.synthetic import load_scenes

    scenes = load_scenes(world / "world")
    refs = pickle.loads((world / "world" / "refcoco+" / "refs(unc).p").read_bytes())
    instances = json.loads((world / "world" / "refcoco+" / "instances.json").read_text())
    assert len(refs) > 40 and {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    anns = {a["id"]: a for a in instances["annotations"]}
    for ref in refs:
        scene = scenes[ref["image_id"]]
        target = scene.objects[ref["ann_id"] - ref["image_id"] * 100]
        assert anns[ref["ann_id"]]["bbox"] == [target.box[0], target.box[1], target.box[2] - target.box[0],
                                               target.box[3] - target.box[1]]
        words = ref["sentences"][0]["sent"].split()
        assert words[0] == "the" and words[-1] == target.category and not set(words) & LOCATION_WORDS
        said = set(words[1:-1])
        assert said and said <= {target.colour, target.size, target.pattern}
        distractors = [o for o in scene.objects if o is not target and o.category == target.category]
        assert distractors  # RefCOCO+: another object of the same category is in the image
        for other in distractors:  # ... and the words fit the target only
            assert not said <= {other.colour, other.size, other.pattern}
    truth = json.loads((world / "world" / "truth.json").read_text())["tasks"]["refcoco+"]
    assert truth["counts"]["train"] == sum(r["split"] == "train" for r in refs)
    assert 0 < truth["baselines"]["testA"]["chance_gt_regions"] <= truth["baselines"]["testA"]["category_only"] <= 0.5


def test_import_from_the_world(world):
    pairs = PairStore(_import(world))
    refs = pickle.loads((world / "world" / "refcoco+" / "refs(unc).p").read_bytes())
    assert len(pairs) == len(refs)
    row = next(p for p in pairs if p["pair_id"] == f"refcoco+/{refs[0]['sent_ids'][0]}")
    assert row["text"] == refs[0]["sentences"][0]["sent"] and row["ann_id"] == str(refs[0]["ann_id"])
    assert row["image_id"] == str(refs[0]["image_id"]) and row["split"] == refs[0]["split"]
    truth = json.loads((world / "world" / "truth.json").read_text())
    scene = next(e["scene"] for e in truth["images"] if e["image_id"] == refs[0]["image_id"])
    box = scene["objects"][refs[0]["ann_id"] % 100]["box"]
    assert row["target_box"] == pytest.approx(box) and (row["image_w"], row["image_h"]) == (scene["width"],
                                                                                            scene["height"])
    lines = [json.loads(line) for line in (_import(world) / GT_BOXES_NAME).read_text().splitlines()]
    first = next(line for line in lines if line["image_id"] == row["image_id"])
    assert first["image"] == f"{row['image_id']}.jpg"
    assert first["boxes"] == [pytest.approx(o["box"]) for o in scene["objects"]]  # scene order = region order
    manifest = json.loads((_import(world) / "manifest.json").read_text())
    assert manifest["stats"]["pairs_missing_images"] == 0


# -- the official layout ---------------------------------------------------------------------

def _official(tmp_path: Path, refs) -> tuple[Path, Path]:
    instances = {"images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg", "width": 640,
                             "height": 480}],
                 "annotations": [{"id": 1719310, "image_id": 581857, "bbox": [103.93, 299.99, 134.22, 177.42],
                                  "category_id": 1},
                                 {"id": 1719311, "image_id": 581857, "bbox": [10, 20, 30, 40], "category_id": 1}],
                 "categories": [{"id": 1, "name": "person"}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return tmp_path / "refs(unc).p", tmp_path / "instances.json"


GOOD_REF = {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000581857_16.jpg", "ann_id": 1719310, "ref_id": 0,
            "image_id": 581857, "split": "testA", "category_id": 1,
            "sentences": [{"tokens": ["lady", "with", "back", "to", "us"], "raw": "Lady with back to us",
                           "sent_id": 0, "sent": "lady with back to us"},
                          {"tokens": ["woman", "in", "black"], "raw": "woman in black", "sent_id": 1,
                           "sent": "woman in black"}]}


def test_import_of_the_official_layout(tmp_path):
    bad = {**GOOD_REF, "ref_id": 1, "ann_id": 999, "sent_ids": [2]}
    refs, instances = _official(tmp_path, [GOOD_REF, bad, "not a ref"])
    result = import_refcoco(refs, instances, tmp_path / "out", progress="off")
    rows = list(PairStore(tmp_path / "out"))
    assert [r["pair_id"] for r in rows] == ["refcoco+/0", "refcoco+/1"] and result.stats["malformed"] == 2
    assert rows[0]["image_id"] == "COCO_train2014_000000581857" and rows[0]["category"] == "person"
    assert rows[0]["target_box"] == pytest.approx([103.93, 299.99, 238.15, 477.41], abs=1e-3)
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert errors[0]["where"] == "refs[1]" and "ann_id 999" in errors[0]["reason"]
    boxes = json.loads((tmp_path / "out" / GT_BOXES_NAME).read_text())
    assert boxes["ids"] == [1719310, 1719311] and boxes["boxes"][1] == [10, 20, 40, 60]
    only = import_refcoco(refs, instances, tmp_path / "val", splits=["val"], progress="off")
    assert only.num_pairs == 0


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([Evil()], protocol=2))
    with pytest.raises(SchemaError, match="refusing to load"):
        read_refs_pickle(path)
    assert not (tmp_path / "pwned").exists()


_PLAIN = st.recursive(st.none() | st.booleans() | st.integers(-5, 2_000_000) | st.floats() | st.text(max_size=6),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
                          ["ref_id", "ann_id", "image_id", "split", "sentences", "sent_id", "sent", "category_id"]),
                          inner, max_size=6), max_leaves=25)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(refs=st.one_of(_PLAIN, st.lists(_PLAIN, max_size=4)), raw=st.binary(max_size=30))
def test_import_refcoco_never_raises_a_traceback(tmp_path_factory, refs, raw):
    root = tmp_path_factory.mktemp("fuzz")
    refs_path, instances = _official(root, refs)
    for data in (refs_path.read_bytes(), raw):
        refs_path.write_bytes(data)
        try:
            import_refcoco(refs_path, instances, root / "out", overwrite=True, progress="off")
        except SchemaError as error:
            assert str(error).startswith(str(refs_path))


# -- metric and losses -----------------------------------------------------------------------

def test_box_iou_and_accuracy_by_hand():
    from vlp.trainer.metrics import box_iou, grounding_accuracy

    iou = box_iou([[0, 0, 10, 10], [5, 5, 15, 15]], [[0, 0, 10, 10], [0, 0, 10, 20], [20, 20, 20, 30]])
    np.testing.assert_allclose(iou, [[1.0, 0.5, 0.0], [25 / 175, 50 / 250, 0.0]])
    result = grounding_accuracy([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]],
                                [[0, 0, 10, 20], [0, 0, 10, 21], [0, 0, 10, 10]])
    assert result["accuracy"] == pytest.approx(2 / 3) and result["n"] == 3  # IoU exactly 0.5 counts
    assert result["mean_iou"] == pytest.approx((0.5 + 100 / 210 + 1.0) / 3)


def test_losses_label_regions_by_iou():
    from vlp.trainer.grounding import RefCOCO, region_iou
    from vlp.trainer.model import EncoderOutput

    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.9], [0.5, 0.5, 1.0, 1.0], [0, 0, 0, 0]]])
    target = torch.tensor([[0.0, 0.0, 0.5, 0.6]])
    iou = region_iou(boxes, target)
    np.testing.assert_allclose(iou[0, :3].numpy(), [0.5 / 0.6, 0.6 / 0.9, 0.0], rtol=1e-5)
    batch = {"region_boxes": boxes, "region_mask": torch.tensor([[True, True, True, False]]), "label": target}
    scores = torch.tensor([[0.3, -1.0, 2.0, 9.0]])
    head = lambda regions: regions  # noqa: E731  (the regions "are" the scores)
    out = EncoderOutput(text=None, regions=scores[..., None], pooled=None)
    bce, metrics = RefCOCO(["region"], loss="bce").loss(out, batch, head, None)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(scores[0, :3], torch.tensor([1.0, 1.0, 0.0]))
    assert bce.item() == pytest.approx(expected.item()) and metrics["task_acc"] == 0.0  # region 2 chosen: IoU 0
    ce, _ = RefCOCO(["region"], loss="ce").loss(out, batch, head, None)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(scores[:, :3], torch.tensor([0])).item())


# -- end to end ------------------------------------------------------------------------------

def _detected_store(world: Path) -> Path:
    """A "detected" store: the oracle regions with boxes shifted by a third of their size on
    every other region, plus one background box: not every target is reachable."""
    from vlp.schemas import FeatureRecord, FeatureStore, FeatureStoreWriter

    out = world / "detected"
    if out.exists():
        return out
    source = FeatureStore(world / "features")
    with FeatureStoreWriter(out, storage="arrow", feature_dim=32, detector={"name": "jittered"}) as writer:
        for image_id in source.keys():
            r = source.get(image_id)
            boxes = np.array(r.boxes, dtype=np.float32)
            shift = (boxes[:, 2:] - boxes[:, :2]) / 2
            boxes[::2, :2] += shift[::2]
            boxes[::2, 2:] = np.minimum(boxes[::2, 2:] + shift[::2], [r.image_w, r.image_h])
            boxes = np.vstack([boxes, [[0, 0, r.image_w, r.image_h]]]).astype(np.float32)
            n = len(boxes)
            feats = np.vstack([np.asarray(r.features, np.float32), np.zeros((1, 32), np.float32)])
            writer.add(FeatureRecord.from_arrays(image_id, r.image_w, r.image_h, boxes=boxes, features=feats,
                                                 objects_id=np.append(r.objects_id, 0),
                                                 objects_conf=np.full(n, 0.9), attrs_id=np.append(r.attrs_id, 0),
                                                 attrs_conf=np.full(n, 0.9)))
    return out


def _config(world: Path, steps: int, **task) -> dict:
    return {"seed": 0, "model": {"vocab": "demo", "bert": {"hidden": 64, "layers": 2, "heads": 4},
                                 "visual": {"feature_dim": 32}},
            "data": {"features": str(world / "features"), "max_text_len": 16, "max_regions": 36},
            "task": {"name": "refcoco", "pairs": str(_import(world)), **task},
            "train": {"steps": steps, "batch_size": 16, "lr": 1.0e-3, "eval_every": steps, "log_every": 0}}


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_finetune_and_evaluate_with_gt_and_detected_regions(world, tmp_path, loss):
    from vlp.trainer.config import FinetuneConfig
    from vlp.trainer.finetune import evaluate_run, finetune

    run = tmp_path / "run"
    summary = finetune(FinetuneConfig.from_dict(_config(world, 6, loss=loss)), run)
    assert summary["end_step"] == 6 and summary["best"]["metric"] == "accuracy"
    assert summary["final"]["upper_bound"] == 1.0  # ground-truth regions: the target is always there
    gt = evaluate_run(run, _import(world), world / "features", split=["testA", "testB"],
                      predictions=tmp_path / "gt.jsonl")
    assert gt["metrics"]["n"] == sum(p["split"] in ("testA", "testB") for p in PairStore(_import(world)))
    detected = evaluate_run(run, _import(world), _detected_store(world), split=["testA", "testB"])
    assert 0 < detected["metrics"]["upper_bound"] < 1 and detected["metrics"]["accuracy"] <= \
        detected["metrics"]["upper_bound"]
    rows = [json.loads(line) for line in (tmp_path / "gt.jsonl").read_text().splitlines()]
    assert len(rows) == gt["metrics"]["n"] and len(rows[0]["prediction"]["box"]) == 4
    results = json.loads((run / "results.json").read_text())
    assert set(results["evaluations"]) == {"pairs:testA/testB"} and results["main_metric"] == "accuracy"


@pytest.mark.slow
def test_world_refcoco_beats_chance_and_the_category_baseline(tmp_path):
    """The recipe of bench_grounding.py (world of 200 images, seed 1; CE over regions, 600
    steps, seed 0) from random init: val + testA + testB accuracy (94 expressions) clearly
    above picking a random object of the right category, and far above chance."""
    from vlp.synthetic import generate
    from vlp.synthetic.oracle import truth_feature_store
    from vlp.trainer.config import FinetuneConfig
    from vlp.trainer.finetune import evaluate_run, finetune

    generate(tmp_path / "world", 200, seed=1, overwrite=True, web=False, style="classic")
    truth_feature_store(tmp_path / "world", tmp_path / "features", feature_dim=32)
    config = _config(tmp_path, 600, loss="ce")
    config["data"]["max_text_len"] = 40
    config["train"].update(batch_size=32, eval_every=100, warmup_ratio=0.1)
    finetune(FinetuneConfig.from_dict(config), tmp_path / "run")
    splits = ("val", "testA", "testB")
    entry = evaluate_run(tmp_path / "run", _import(tmp_path), tmp_path / "features", split=list(splits))
    truth = json.loads((tmp_path / "world" / "truth.json").read_text())["tasks"]["refcoco+"]
    counts = {k: truth["counts"][k] for k in splits}
    mean = lambda key: sum(truth["baselines"][k][key] * n for k, n in counts.items()) / sum(counts.values())  # noqa: E731
    assert entry["metrics"]["n"] == sum(counts.values()) == 94
    assert entry["metrics"]["accuracy"] > mean("category_only") + 0.2, (entry["metrics"], mean("category_only"))
    assert entry["metrics"]["accuracy"] > mean("chance_gt_regions") + 0.4


def test_cli_imports_the_world_and_refuses_a_code_pickle_in_one_line(world, tmp_path):
    from click.testing import CliRunner

    from vlp.cli import build_main

    ref = world / "world" / "refcoco+"
    result = CliRunner().invoke(build_main, ["import-refcoco", str(ref / "refs(unc).p"), str(ref / "instances.json"),
                                             "-o", str(tmp_path / "out"), "--progress", "off"])
    assert result.exit_code == 0 and "refexp pairs" in result.output
    evil = tmp_path / "evil.p"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    result = CliRunner().invoke(build_main, ["import-refcoco", str(evil), str(ref / "instances.json"),
                                             "-o", str(tmp_path / "evil-out")])
    assert result.exit_code == 1 and not (tmp_path / "pwned").exists()
    assert result.output.strip().splitlines()[-1].startswith("Error: ") and "os.system" in result.output
