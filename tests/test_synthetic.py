"""The synthetic world: determinism, geometry, labels vs pixels, and the file formats."""

import csv
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from vlp.schemas import vocab
from vlp import synthetic
from vlp.synthetic import palette, text
from vlp.synthetic.world import generate, load_scenes

NUM_IMAGES = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "a"
    summary = generate(root, num_images=NUM_IMAGES, seed=5)
    assert summary.num_images == NUM_IMAGES
    return root


def load(root: Path, relative: str):
    return json.loads((root / relative).read_text("utf-8"))


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def truth(world):
    return load(world, "truth.json")


@pytest.fixture(scope="module")
def scenes(world):
    return load_scenes(world)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_and_other_seed_differs(world, tmp_path):
    again = tmp_path / "b"
    generate(again, num_images=NUM_IMAGES, seed=5)
    first, second = all_files(world), all_files(again)
    assert sorted(first) == sorted(second)
    assert len(first) > 5 * NUM_IMAGES
    different = [name for name in first if first[name] != second[name]]
    assert different == []

    other = all_files(generate(tmp_path / "c", num_images=NUM_IMAGES, seed=6).out_dir)
    changed = [n for n in first if n.startswith("images/") and other.get(n) != first[n]]
    assert len(changed) == NUM_IMAGES
    assert other["truth.json"] != first["truth.json"]


def test_image_does_not_depend_on_world_size(world, tmp_path):
    small = generate(tmp_path / "small", num_images=3, seed=5).out_dir
    names = sorted(p.name for p in (small / "images").iterdir())
    assert [int(n.split(".")[0]) for n in sorted(names, key=lambda n: int(n.split(".")[0]))] == [1, 2, 3]
    for name in names:
        assert (small / "images" / name).read_bytes() == (world / "images" / name).read_bytes()


def test_refuses_to_overwrite_unless_asked(world, tmp_path):
    target = tmp_path / "w"
    generate(target, num_images=3, seed=1)
    with pytest.raises(FileExistsError):
        generate(target, num_images=3, seed=1)
    generate(target, num_images=2, seed=1, overwrite=True)
    assert sorted(p.stem for p in (target / "images").iterdir()) == ["1", "2"]
    stranger = tmp_path / "other"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="world.json"):
        generate(stranger, num_images=2, overwrite=True)
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_sample_and_render_are_deterministic_and_round_trip_through_json(scenes):
    # generate() draws wide scenes (sample_scene's own default is the classic style)
    scene = synthetic.sample_scene(np.random.default_rng([5, 7, 0]), 7, style="wide")
    again = synthetic.sample_scene(np.random.default_rng([5, 7, 0]), 7, style="wide")
    image = synthetic.render_scene(scene)
    assert image.dtype == np.uint8 and image.shape == (scene.height, scene.width, 3)
    assert np.array_equal(image, synthetic.render_scene(again))
    # generate() uses the same per-image stream, and truth.json re-renders exactly.
    assert scenes[7].to_dict() == scene.to_dict()
    assert np.array_equal(synthetic.render_scene(scenes[7]), image)
    restored = synthetic.Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
    assert np.array_equal(synthetic.render_scene(restored), image)


# ----------------------------------------------------------------------------- geometry and labels


def test_images_match_scene_sizes_and_jpeg_is_close_to_render(world, scenes):
    for image_id, scene in scenes.items():
        decoded = synthetic.decode_image((world / "images" / scene.file_name).read_bytes())
        assert decoded.shape == (scene.height, scene.width, 3)
        assert 48 <= scene.width <= 1000 and 48 <= scene.height <= 1000
        diff = np.abs(decoded.astype(int) - synthetic.render_scene(scene).astype(int))
        if scene.image_format == "png":
            assert diff.max() == 0
        else:
            # saturated wide backgrounds and small images of thin shapes lose most to 4:2:0 chroma
            # (up to ~5 grey levels); another image would differ by tens
            assert diff.mean() < 6.0


def test_boxes_inside_images_large_enough_and_tight(scenes):
    aspect_ratios = set()
    for scene in scenes.values():
        assert 1 <= len(scene.objects) <= 8
        aspect_ratios.add(round(scene.width / scene.height, 1))
        short = min(scene.width, scene.height)
        least = max(10, 0.06 * short)  # the wide world's rule (classic: max(24, 0.08 * short))
        masks = synthetic.object_masks(scene)
        for obj, mask in zip(scene.objects, masks):
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
            assert max(x2 - x1, y2 - y1) >= least
            assert min(x2 - x1, y2 - y1) >= (0.5 * least if obj.category == "box" else least)
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == (x1, y1, x2, y2)
            fraction = (x2 - x1) * (y2 - y1) / (scene.width * scene.height)
            assert obj.size == ("large" if fraction >= palette.LARGE_AREA_FRACTION else "small")
    assert len(aspect_ratios) > 5


def test_occlusion_is_limited_and_recorded(scenes):
    for scene in scenes.values():
        masks = synthetic.object_masks(scene)
        for i, obj in enumerate(scene.objects):
            later = np.zeros_like(masks[i])
            for m in masks[i + 1:]:
                later |= m
            x1, y1, x2, y2 = obj.box
            box_fraction = later[y1:y2, x1:x2].mean()
            mask_fraction = (later & masks[i]).sum() / masks[i].sum()
            assert box_fraction <= 0.4 + 1e-9 and mask_fraction <= 0.4 + 1e-9
            assert obj.occluded_box_fraction == pytest.approx(box_fraction, abs=1e-4)
            assert obj.occluded_mask_fraction == pytest.approx(mask_fraction, abs=1e-4)
            for j in obj.occluders:
                assert j > i and (masks[j] & masks[i]).any()


def test_labels_are_vg_vocabulary_entries(truth):
    objects, attributes = vocab.objects(), vocab.attributes()
    seen_categories, seen_attributes = set(), set()
    for entry in truth["images"]:
        for obj in entry["scene"]["objects"]:
            assert objects.name(obj["category_id"]) == obj["category"]
            assert [attributes.name(i) for i in obj["attribute_ids"]] == obj["attributes"]
            assert obj["attributes"][0] in palette.COLOURS
            assert obj["attributes"][1] in ("large", "small")
            seen_categories.add(obj["category"])
            seen_attributes.update(obj["attributes"])
    assert seen_categories == set(palette.CATEGORIES)
    assert {"striped", "spotted", "large", "small"} <= seen_attributes
    assert objects.id("circle") == 1114 and attributes.id("red") == 4


def test_rendered_colour_matches_the_colour_label(world, scenes):
    """Inside unpatterned, unoccluded objects the JPEG pixels are the named colour."""
    reference = {name: np.array(rgb, float) for name, rgb in palette.COLOURS.items()}
    checked = Counter()
    for image_id, scene in scenes.items():
        image = synthetic.decode_image((world / "images" / scene.file_name).read_bytes()).astype(float)
        for obj, mask in zip(scene.objects, synthetic.object_masks(scene, visible=True)):
            if obj.pattern or obj.occluded_mask_fraction > 0:
                continue
            core = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2) > 0
            if core.sum() < 40:
                continue
            mean = image[core].mean(axis=0)
            assert np.abs(mean - reference[obj.colour]).max() < 20, (image_id, obj.colour, mean)
            nearest = min(reference, key=lambda name: np.linalg.norm(reference[name] - mean))
            assert nearest == obj.colour
            checked[obj.colour] += 1
    assert sum(checked.values()) >= 30 and len(checked) >= 6


# ----------------------------------------------------------------------------- splits, VG


def test_splits_partition_the_images(world):
    splits = load(world, "splits.json")
    ids = splits["train"] + splits["val"] + splits["test"]
    assert sorted(ids) == list(range(1, NUM_IMAGES + 1))
    assert len(splits["val"]) >= 1 and len(splits["test"]) >= 1
    assert len(splits["train"]) >= 0.7 * NUM_IMAGES
    stems = sorted(int(p.stem) for p in (world / "images").iterdir())
    assert stems == list(range(1, NUM_IMAGES + 1))


def test_visual_genome_files(world, truth):
    scenes = {e["image_id"]: e["scene"] for e in truth["images"]}
    image_data = load(world, "image_data.json")
    assert [d["image_id"] for d in image_data] == list(range(1, NUM_IMAGES + 1))
    for d in image_data:
        assert (d["width"], d["height"]) == (scenes[d["image_id"]]["width"], scenes[d["image_id"]]["height"])
        assert set(d) == {"image_id", "width", "height", "url", "coco_id", "flickr_id"}
    object_ids = set()
    for entry, attrs in zip(load(world, "objects.json"), load(world, "attributes.json")):
        scene = scenes[entry["image_id"]]
        assert attrs["image_id"] == entry["image_id"]
        assert len(entry["objects"]) == len(scene["objects"]) == len(attrs["attributes"])
        for vg, vga, obj in zip(entry["objects"], attrs["attributes"], scene["objects"]):
            x1, y1, x2, y2 = obj["box"]
            assert (vg["x"], vg["y"], vg["w"], vg["h"]) == (x1, y1, x2 - x1, y2 - y1)
            assert vg["names"] == [obj["category"]] and vg["synsets"] == [f"{obj['category']}.n.01"]
            assert vga["object_id"] == vg["object_id"] and vga["attributes"] == obj["attributes"]
            object_ids.add(vg["object_id"])
    assert len(object_ids) == sum(len(s["objects"]) for s in scenes.values())

    regions = load(world, "region_descriptions.json")
    assert [r["id"] for r in regions] == list(range(1, NUM_IMAGES + 1))
    region_ids = set()
    for entry in regions:
        scene = scenes[entry["id"]]
        assert len(entry["regions"]) >= 4
        for region in entry["regions"]:
            assert region["image_id"] == entry["id"] and region["phrase"]
            assert 0 <= region["x"] and region["x"] + region["width"] <= scene["width"]
            assert 0 <= region["y"] and region["y"] + region["height"] <= scene["height"]
            assert region["width"] > 0 and region["height"] > 0
            region_ids.add(region["region_id"])
    assert len(region_ids) == sum(len(e["regions"]) for e in regions)


def test_planted_verb_regions_are_exactly_the_phrases_with_verbs(world, truth):
    planted = {rid for e in truth["images"] for rid in e["verb_region_ids"]}
    phrases = {r["region_id"]: r["phrase"] for e in load(world, "region_descriptions.json")
               for r in e["regions"]}
    with_verb = {rid for rid, phrase in phrases.items()
                 if any(token in text.VERBS for token in phrase.lower().replace(",", " ").split())}
    assert planted == with_verb
    assert set(truth["verbs"]) == set(text.VERBS)
    share = len(planted) / len(phrases)
    assert 0.15 <= share <= 0.35
    # The other phrases are verb-free noun phrases: no copula either.
    assert not any(" is " in f" {phrases[rid]} " for rid in set(phrases) - planted)


def test_old_vg_id_variant(tmp_path):
    root = generate(tmp_path / "old", num_images=3, seed=2, vg_id_variant="id").out_dir
    image_data = load(root, "image_data.json")
    assert [d["id"] for d in image_data] == [1, 2, 3] and "image_id" not in image_data[0]
    region = load(root, "region_descriptions.json")[0]["regions"][0]
    assert "id" in region and "region_id" not in region
    with pytest.raises(ValueError, match="vg_id_variant"):
        generate(tmp_path / "bad", num_images=1, vg_id_variant="uuid")


# ----------------------------------------------------------------------------- COCO, VQA


def test_coco_captions_and_karpathy_split(world):
    splits = load(world, "splits.json")
    train, val = load(world, "annotations/captions_train.json"), load(world, "annotations/captions_val.json")
    for content in (train, val):
        assert set(content) == {"info", "licenses", "images", "annotations"}
    assert sorted(i["id"] for i in train["images"]) == splits["train"]
    assert sorted(i["id"] for i in val["images"]) == sorted(splits["val"] + splits["test"])
    for content in (train, val):
        image_ids = {i["id"] for i in content["images"]}
        per_image = Counter(a["image_id"] for a in content["annotations"])
        assert set(per_image) == image_ids and set(per_image.values()) == {5}
        for image_id in image_ids:
            captions = [a["caption"] for a in content["annotations"] if a["image_id"] == image_id]
            assert len(set(c.lower().rstrip(".") for c in captions)) == 5
        assert all(i["file_name"] in (f"{i['id']}.jpg", f"{i['id']}.png") for i in content["images"])
        assert all((world / "images" / i["file_name"]).is_file() for i in content["images"])
    all_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(all_ids) == len(set(all_ids)) == 5 * NUM_IMAGES

    karpathy = load(world, "annotations/dataset_coco.json")
    assert karpathy["dataset"] == "coco" and len(karpathy["images"]) == NUM_IMAGES
    split_of = {i: name for name, ids in splits.items() for i in ids}
    sentids = []
    for image in karpathy["images"]:
        assert image["split"] == split_of[image["cocoid"]]
        assert image["filename"] in (f"{image['cocoid']}.jpg", f"{image['cocoid']}.png")
        assert (world / image["filepath"] / image["filename"]).is_file()
        assert len(image["sentences"]) == 5 and image["sentids"] == [s["sentid"] for s in image["sentences"]]
        for sentence in image["sentences"]:
            assert sentence["imgid"] == image["imgid"] and sentence["tokens"]
            assert sentence["tokens"] == text.tokens(sentence["raw"])
        sentids += image["sentids"]
    assert sentids == list(range(5 * NUM_IMAGES))


def test_vqa_files_and_answers_are_true(world, scenes):
    counted = Counter()
    for name in ("train", "val"):
        qs = load(world, f"vqa/v2_OpenEnded_mscoco_{name}_questions.json")
        anns = load(world, f"vqa/v2_mscoco_{name}_annotations.json")
        assert qs["task_type"] == "Open-Ended" and qs["data_type"] == "vlp-synth"  # not COCO images
        assert qs["data_subtype"] == anns["data_subtype"] == f"{name}2014"
        assert [q["question_id"] for q in qs["questions"]] == [a["question_id"] for a in anns["annotations"]]
        per_image = Counter(q["image_id"] for q in qs["questions"])
        assert set(per_image.values()) == {4}
        for q, a in zip(qs["questions"], anns["annotations"]):
            scene = scenes[q["image_id"]]
            assert a["image_id"] == q["image_id"]
            assert a["answer_type"] in ("yes/no", "number", "other")
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert {x["answer_confidence"] for x in a["answers"]} <= {"yes", "maybe", "no"}
            normalized = Counter(text.normalize_answer(x["answer"]) for x in a["answers"])
            assert normalized.most_common(1)[0][0] == a["multiple_choice_answer"]
            truth = a["multiple_choice_answer"]
            words = q["question"].rstrip("?").split()
            if a["question_type"] == "how many":
                category = {text.plural(c): c for c in palette.CATEGORIES}[words[2]]
                assert truth == str(sum(o.category == category for o in scene.objects))
            elif a["question_type"] == "is there a":
                assert truth == ("yes" if any(o.category == words[-1] for o in scene.objects) else "no")
            elif a["question_type"] == "what color is the":
                assert {o.colour for o in scene.objects if o.category == words[-1]} == {truth}
            else:
                colour = next(w for w in words if w in palette.COLOURS)
                assert {o.category for o in scene.objects if o.colour == colour} == {truth}
            counted[a["question_type"]] += 1
    assert set(counted) == {"how many", "is there a", "what color is the", "what shape is"}
    assert sum(counted.values()) == 4 * NUM_IMAGES


def test_vqa_answers_carry_realistic_noise(world):
    answers = [x["answer"] for a in load(world, "vqa/v2_mscoco_train_annotations.json")["annotations"]
               for x in a["answers"]]
    assert any(x.endswith(".") for x in answers) and any(x[:1].isupper() for x in answers)
    assert any(x in text.COUNT_WORDS.values() for x in answers)


# ----------------------------------------------------------------------------- CC, img2dataset, web


def test_conceptual_captions_tsv_and_img2dataset_folder(world, truth):
    with open(world / "cc/train.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) == NUM_IMAGES + 1 and all(len(r) == 2 and r[0] for r in rows)
    assert len({url for _, url in rows}) == len(rows)
    missing = truth["cc_missing"]
    assert [rows[m["row"]][1] for m in missing] == [m["url"] for m in missing]

    table = pq.read_table(world / "cc/img2dataset/00000.parquet").to_pylist()
    assert [r["url"] for r in table] == [url for _, url in rows]
    assert [r["caption"] for r in table] == [caption for caption, _ in rows]
    assert Counter(r["status"] for r in table) == {"success": NUM_IMAGES, "failed_to_download": 1}
    folder = world / "cc/img2dataset/00000"
    for row in table:
        key = row["key"]
        if row["status"] != "success":
            assert not any(folder.glob(f"{key}.*")) and row["width"] is None
            continue
        meta = json.loads((folder / f"{key}.json").read_text())
        assert {k: meta[k] for k in ("url", "key", "status", "caption", "width", "height",
                                     "original_width", "original_height")} == \
            {k: row[k] for k in ("url", "key", "status", "caption", "width", "height",
                                 "original_width", "original_height")}
        assert (folder / f"{key}.txt").read_text("utf-8") == row["caption"]
        image_id = int(row["url"].rsplit("/", 1)[1].split(".")[0])
        # the img2dataset copy is JPEG (the world's own file may be PNG: then the same pixels)
        source = next((world / "images").glob(f"{image_id}.*"))
        expected = (source.read_bytes() if source.suffix == ".jpg"
                    else synthetic.encode_jpeg(synthetic.decode_image(source.read_bytes())))
        assert (folder / f"{key}.jpg").read_bytes() == expected
    stats = load(world, "cc/img2dataset/00000_stats.json")
    assert stats["successes"] == NUM_IMAGES and stats["count"] == NUM_IMAGES + 1


def test_web_records_have_every_noise_kind_with_truth(world):
    from vlp.synthetic.web import EXPECTED_STAGE, WEB_MIN_SIDE

    for crawl in (world / "web", world / "web/heldout"):
        records = [json.loads(line) for line in (crawl / "records.jsonl").read_text("utf-8").splitlines()]
        truth = [json.loads(line) for line in (crawl / "truth.jsonl").read_text("utf-8").splitlines()]
        labels = {t["key"]: t["category"] for t in truth}
        assert [r["key"] for r in records] == list(labels) and len(set(labels)) == len(records)
        assert set(labels.values()) == set(synthetic.WEB_CATEGORIES)
        assert all(t["stage"] == EXPECTED_STAGE.get(t["category"], "") for t in truth)
        by_key = {r["key"]: r for r in records}
        position = {r["key"]: i for i, r in enumerate(records)}
        shared = Counter(r["alt"] for r in records if labels[r["key"]] == "shared_text")
        assert len(shared) >= 1 and min(shared.values()) > 10
        for record, entry in zip(records, truth):
            category = labels[record["key"]]
            decoded = synthetic.decode_image((crawl / record["image_path"]).read_bytes())
            assert decoded.shape[:2] == (record["height"], record["width"])
            if category == "too_small":
                assert max(record["width"], record["height"]) <= 64
            elif category != "duplicate" or entry["how"] != "resized":
                assert min(record["width"], record["height"]) >= WEB_MIN_SIDE
            if category == "duplicate":
                original = by_key[entry["original"]]
                assert labels[original["key"]] == "good" and position[original["key"]] < position[record["key"]]
                if entry["how"] == "exact":
                    assert {k: v for k, v in record.items() if k != "key"} == \
                        {k: v for k, v in original.items() if k != "key"}
                else:
                    assert record["url"] != original["url"]
            if category == "junk_text":
                assert record["alt"] in text.JUNK_ALTS
            if category == "non_english":
                assert record.get("lang_hint", "de") in text.FOREIGN_LANGUAGES
                assert not set(text.tokens(record["alt"])) & {"and", "the", "on", "with"}
            if category in ("good", "mismatch", "profane"):
                assert record.get("lang_hint", "en") == "en"
                assert any(colour in record["alt"] for colour in palette.COLOURS)



def test_world_summary_lists_ids_and_counts(world, truth):
    summary = load(world, "world.json")
    assert summary["seed"] == 5 and summary["num_images"] == NUM_IMAGES
    assert {c["name"]: c["vg_id"] for c in summary["categories"]} == palette.CATEGORY_IDS
    assert summary["counts"]["objects"] == sum(len(e["scene"]["objects"]) for e in truth["images"])
    assert summary["vocab_sha256"]["objects"] == vocab.objects().sha256
    for relative in summary["files"]:
        assert (world / relative).is_file()


def test_world_without_the_web_crawl_is_the_same_world_less_web(tmp_path):
    """web=False (tests that do not filter web pairs) leaves out web/ and changes nothing else."""
    generate(tmp_path / "with", 5, seed=3)
    generate(tmp_path / "without", 5, seed=3, web=False)

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    with_web, without = files(tmp_path / "with"), files(tmp_path / "without")
    assert any(name.startswith("web/") for name in with_web)
    assert not any(name.startswith("web/") for name in without)
    rest = {name: data for name, data in with_web.items() if not name.startswith("web/")}
    assert set(rest) == set(without)
    assert {n for n in rest if rest[n] != without[n]} == {"world.json"}
    a, b = (json.loads(files_["world.json"]) for files_ in (with_web, without))
    assert {k: v for k, v in a["counts"].items() if not k.startswith("web_")} == b["counts"]
    assert [f for f in a["files"] if not f.startswith("web/")] == b["files"]
    a.pop("counts"), b.pop("counts"), a.pop("files"), b.pop("files")
    assert a == b
