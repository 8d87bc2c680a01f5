"""vlp-build web-filter: each stage on hand-made rows, the aggregation's K rule across shards,
bad rows, the synthetic crawl end to end (every junk category at the stage that names it)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.builders.web_filter import FilterConfig, aggregate, web_filter
from vlp.builders.web_filter import texts
from vlp.builders.web_filter.images import ImageRules, image_facts
from vlp.builders.web_filter.inputs import Shard, plan_shards, read_shard
from vlp.builders.web_filter.run import funnel_counts, image_groups
from vlp.builders.web_filter.scorer import WebScorer, naturalness_features, semantic_features
from vlp.schemas import FeatureRecord
from vlp.schemas.pairs import PairStore
from vlp.schemas import vocab


def _jpeg(width: int, height: int, seed: int = 0, quality: int = 90, noise: float = 40.0) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.full((height, width, 3), 128.0) + rng.normal(0, noise, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _record(names, colours=None, conf=0.9, image_id="x") -> FeatureRecord:
    objects, attributes = vocab.objects(), vocab.attributes()
    n = len(names)
    colours = colours or ["white"] * n
    return FeatureRecord.from_arrays(
        image_id, 400, 400, boxes=np.tile(np.array([0, 0, 10, 10], np.float32), (n, 1)),
        features=np.ones((n, 8), np.float32), objects_id=np.array([objects.id(x) for x in names]),
        objects_conf=np.full(n, conf, np.float32), attrs_id=np.array([attributes.id(c) for c in colours]),
        attrs_conf=np.full(n, 0.9, np.float32))


# ----------------------------------------------------------------------------- stage 1: image


def test_image_stage_size_side_aspect_and_decoding():
    rules = ImageRules()
    good = _jpeg(400, 330)
    assert len(good) >= 5120
    reason, values, bgr = rules.check(good)
    assert reason == "" and values["width"] == 400 and values["height"] == 330 and bgr.shape == (330, 400, 3)
    facts = image_facts(good, bgr)
    assert len(facts["sha256"]) == 64 and len(facts["phash"]) == 16
    assert 0 <= facts["flat_share"] <= 1 and 0 <= facts["edge_density"] <= 1 and facts["colour_count"] > 5

    small_file = _jpeg(400, 400, noise=0.0)
    assert len(small_file) < 5120
    assert rules.check(small_file)[0] == "file_too_small"
    assert rules.check(_jpeg(400, 300))[0] == "too_small"        # 300 is not > 300 (ImageBERT)
    assert ImageRules(min_side=200).check(_jpeg(400, 300))[0] == ""  # COYO's 200
    assert rules.check(_jpeg(1000, 320))[:2] == ("aspect", {"width": 1000, "height": 320, "aspect": 3.125})
    assert ImageRules(min_bytes=0).check(b"not an image at all")[0] == "undecodable"
    truncated = good[: len(good) // 2]
    assert rules.check(truncated)[0] == "undecodable"


def test_pixel_statistics_separate_flat_graphics_from_noisy_photos():
    flat = np.full((400, 400, 3), 255, np.uint8)
    flat[100:300, 100:300] = (0, 0, 255)
    noisy = np.clip(np.random.default_rng(1).normal(128, 40, (400, 400, 3)), 0, 255).astype(np.uint8)
    a, b = image_facts(b"a", flat), image_facts(b"b", noisy)
    assert a["flat_share"] > 0.8 and b["flat_share"] < 0.1
    assert a["colour_count"] < 2 and b["colour_count"] > 6  # log2 of the distinct 4-bit colours


# ----------------------------------------------------------------------------- stage 3: text


def test_clean_text_removes_urls_mails_file_names_and_fixes_mojibake():
    assert texts.clean_text("  IMG_2041.JPG   red  circle see https://x.invalid/a.jpg or mail a@b.org ") == \
        "red circle see or mail"
    assert texts.clean_text("banner_final_v2.png") == ""
    assert texts.clean_text("cafÃ© menu") == "café menu"
    assert texts.clean_text(None) == ""


@pytest.mark.parametrize("text", ["click here", "Home", "Untitled document", "Cookie policy · Terms of use · Contact us",
                                  "Copyright 2019.", "All rights reserved.", "Next page »", "image"])
def test_boilerplate(text):
    assert texts.is_boilerplate(text)


def test_text_selection_prefers_a_describing_alt_and_gives_up_on_junk():
    row = {"alt": "red circle and two blue stars on white background", "title": "Simple shapes gallery",
           "surrounding_text": "Learn the basic shapes. It shows a red circle."}
    best, values = texts.select_text(row)
    assert best["text"] == row["alt"] and best["source"] == "alt" and values["candidates"] == 4
    short = {"alt": "purple heart", "title": "Gallery", "surrounding_text": "Nice. It shows a purple heart."}
    assert texts.select_text(short)[0]["text"] == "It shows a purple heart."  # 3-256 words beats the short alt
    junk = {"alt": "IMG_2041.JPG", "title": "Home", "surrounding_text": "Copyright 2019. All rights reserved."}
    best, values = texts.select_text(junk)
    assert best is None and values["candidates"] == 4 and len(values["dropped"]) == 4


def test_language_stage():
    stage = texts.LanguageStage()
    ok, values = stage("red circle and two blue stars on grey background")
    assert ok and values["lang"] == "en" and values["p_en"] > 0.9
    ok, values = stage("Bild mit einem Kreis in Rot vor neutralem Hintergrund")
    assert not ok and values["lang"] == "de" and values["p_en"] < 0.3
    assert not texts.LanguageStage(floor=0.999)("a white diamond and a red circle on a grey background")[0]
    # a few common English words are English even when the identifier guesses otherwise
    ok, values = stage("two black stars")
    assert ok and values["p_en"] < 0.3 and values["short_text_words_english"]
    assert not stage("Un anillo azul")[0] and not stage("une croix noire")[0]


def test_text_rules():
    rules = texts.TextRules()
    verdicts = rules.check(["tiny", "purple heart", "a damn red circle on grey", "xqzvt blorfk vrrkq zzpt",
                            "running quickly and happily", "a red circle on a grey background"])
    assert [v[0] if v else None for v in verdicts] == [
        "too_short_chars", "word_count", "profanity", "oov", "no_noun", None]
    assert verdicts[2][1] == {"words": ["damn"]}
    assert texts.TextRules(need_noun=False).check(["running quickly and happily"]) == [None]
    assert texts.TextRules(max_words=4).check(["a red circle on a grey background"])[0][0] == "word_count"


# ----------------------------------------------------------------------------- stages 2 and 6: models


def test_default_model_is_json_numbers_and_flags_graphics_as_unnatural():
    scorer = WebScorer.load()
    assert scorer.source == "default" and 0 < scorer.semantic.threshold <= 0.5
    pixels_photo = {"colour_count": 8.0, "flat_share": 0.3, "edge_density": 0.05}
    pixels_card = {"colour_count": 4.0, "flat_share": 0.7, "edge_density": 0.15}
    natural = scorer.naturalness.predict(naturalness_features(_record(["circle", "star"], conf=0.95), pixels_photo))
    card = scorer.naturalness.predict(naturalness_features(_record(["letters", "words", "sign"], conf=0.5),
                                                           pixels_card))
    assert natural[0] < 0.5 < card[0]


def test_semantic_score_ranks_matching_captions_above_mismatched_ones():
    scorer = WebScorer.load()
    record = _record(["circle", "box"], ["red", "blue"])
    match = scorer.semantic.predict(semantic_features("red circle and blue square on white background", record))[0]
    mismatch = scorer.semantic.predict(semantic_features("two green stars and a yellow heart", record))[0]
    junk = scorer.semantic.predict(semantic_features("see more pictures in our gallery", record))[0]
    assert match > scorer.semantic.threshold > mismatch
    assert junk < scorer.semantic.threshold


def test_bad_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.json"
    bad.write_text('{"format": "vlp-web-scorer", "naturalness": {"features": ["x"]}}')
    with pytest.raises(ValueError, match="model.json: model features"):
        WebScorer.load(bad)
    bad.write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match="not a JSON model file"):
        WebScorer.load(bad)


# ----------------------------------------------------------------------------- stage 7: aggregation


def _survivor(key, text, sha, phash="0" * 16, score=0.9, shard="0/a#0"):
    return {"key": key, "shard": shard, "url": f"https://x.invalid/{key}", "text": text, "norm": texts.normalize(text),
            "sha256": sha, "phash": phash, "score": score, "image_id": key}


def test_k_rule_counts_distinct_images_across_shards():
    phashes = [f"{(0xF0F0F0F0F0F0F0F0 ^ (0xFFFF << (4 * (i % 12)))) + i:016x}" for i in range(12)]
    # 11 distinct images share "free star clipart" over two input shards: all dropped
    rows = [_survivor(f"a{i}", "Free star clipart!", f"sha{i}", phashes[i], shard=f"0/s#{i % 2}") for i in range(11)]
    # 10 distinct images share another text (+ a copy of one of them): kept, one per image
    rows += [_survivor(f"b{i}", "blue heart icon set", f"shb{i}", f"{i * 0x1111111111111111 ^ 0x0123456789abcdef:016x}")
             for i in range(10)]
    rows.append(_survivor("b_copy", "blue heart icon set", "shb3", rows[-7]["phash"], score=0.5))
    distinct = len(set(image_groups(rows[:11])))
    assert distinct == 11
    kept, rejected = aggregate(rows, max_images_per_text=10, phash_distance=-1)
    assert sorted(r["key"] for r in kept) == [f"b{i}" for i in range(10)]
    reasons = Counter((r["stage"], r["reason"]) for r in rejected)
    assert reasons == {("aggregation", "shared_text"): 11, ("aggregation", "duplicate_image"): 1}
    assert {r["values"]["images"] for r in rejected if r["reason"] == "shared_text"} == {11}
    kept, _ = aggregate(rows, max_images_per_text=11, phash_distance=-1)
    assert len(kept) == 21


def test_best_scored_text_per_image_and_near_copies_by_phash():
    rows = [_survivor("orig", "red circle on white", "s1", "ffff0000ffff0000", score=0.7),
            _survivor("mirror", "a red circle", "s2", "ffff0000ffff0003", score=0.9),   # 2 bits away
            _survivor("other", "a red circle", "s3", "0000ffff0000ffff", score=0.8),
            _survivor("recrawl", "red circle on white", "s1", "ffff0000ffff0000", score=0.7)]
    assert image_groups(rows, 4) == [0, 0, 2, 0]
    assert image_groups(rows, 1) == [0, 1, 2, 0]
    kept, rejected = aggregate(rows, phash_distance=4)
    assert [r["key"] for r in kept] == ["mirror", "other"]
    assert {r["key"]: r["values"]["kept"] for r in rejected} == {"orig": "mirror", "recrawl": "mirror"}
    assert [r["values"]["same_file"] for r in rejected] == [False, False]
    # equal scores: the first in input order wins
    kept, _ = aggregate([rows[0], rows[3]], phash_distance=4)
    assert [r["key"] for r in kept] == ["orig"]


def test_keep_fraction_and_duplicate_keys():
    rows = [_survivor(f"k{i}", f"text number {i} here", f"s{i}", f"{i:016x}", score=i / 10) for i in range(10)]
    kept, rejected = aggregate(rows + [dict(rows[9])], keep_fraction=0.3, phash_distance=-1)
    assert [r["key"] for r in kept] == ["k7", "k8", "k9"]
    assert Counter((r["stage"], r["reason"]) for r in rejected) == {("semantic", "below_keep_fraction"): 7,
                                                                    ("input", "duplicate_key"): 1}


def test_funnel_counts():
    rejections = [{"stage": "image", "reason": "too_small"}] * 2 + [{"stage": "aggregation", "reason": "shared_text"}]
    funnel = funnel_counts(10, rejections, {"semantic": "no --features"})
    by = {f["stage"]: f for f in funnel}
    assert by["input"]["in"] == 10 and by["image"]["out"] == 8 and by["aggregation"]["out"] == 7
    assert by["image"]["reasons"] == {"too_small": 2} and by["semantic"]["skipped"] == "no --features"


# ----------------------------------------------------------------------------- inputs and bad rows


def _crawl(folder: Path, rows, images: dict) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (folder / "images" / name).write_bytes(data)
    with open(folder / "records.jsonl", "wb") as handle:
        for row in rows:
            handle.write(row if isinstance(row, bytes) else json.dumps(row).encode("utf-8"))
            handle.write(b"\n")
    return folder


GOOD_TEXT = "a grey square with speckled noise on it"


def test_bad_rows_go_to_rejected_jsonl_and_the_run_goes_on(tmp_path):
    crawl = _crawl(tmp_path / "crawl", [
        {"key": "ok", "url": "https://x.invalid/ok.jpg", "image_path": "images/ok.jpg", "alt": GOOD_TEXT},
        b'{"key": "broken", "url": ',
        '{"key": "latin1", "alt": "caf\xe9 au lait"}'.encode("latin-1"),
        {"key": "gone", "url": "https://x.invalid/gone.jpg", "image_path": "images/gone.jpg", "alt": GOOD_TEXT},
        {"key": "noimage", "alt": GOOD_TEXT},
        [1, 2, 3],
        {"key": "ok2", "url": "https://x.invalid/ok2.jpg", "image_path": "images/ok2.jpg", "alt": "grey box"},
    ], {"ok.jpg": _jpeg(420, 360, 1), "ok2.jpg": _jpeg(420, 360, 2)})
    result = web_filter(crawl, tmp_path / "out", engine="local", progress="off")
    store = PairStore(tmp_path / "out")
    assert [p["pair_id"] for p in store] == ["web/ok"] and store[0]["text"] == GOOD_TEXT
    assert store[0]["url"] == "https://x.invalid/ok.jpg" and store[0]["image_id"] == "ok"
    rejected = [json.loads(line) for line in (tmp_path / "out/rejected.jsonl").read_text().splitlines()]
    assert [(r["key"], r["stage"], r["reason"]) for r in rejected] == [
        ("records.jsonl:2", "input", "broken_json"), ("records.jsonl:3", "input", "not_utf8"),
        ("gone", "image", "missing"), ("noimage", "input", "no_image_field"),
        ("records.jsonl:6", "input", "not_an_object"), ("ok2", "text_rules", "word_count")]
    assert result.stats["rows"] == 7 and result.stats["kept"] == 1
    funnel = {f["stage"]: f for f in result.stats["funnel"]}
    assert funnel["input"]["reasons"] == {"broken_json": 1, "not_an_object": 1, "no_image_field": 1, "not_utf8": 1}
    assert funnel["naturalness"]["skipped"] == "no --features: stage skipped"
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["kind"] == "web" and manifest["stats"]["funnel"][-1]["out"] == 1
    page = (tmp_path / "out/funnel.html").read_text()
    assert "rejected at input: broken_json (1)" in page and "data:image/png;base64," in page
    assert (tmp_path / "out/funnel.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out.work").exists()


def test_shards_of_a_records_file_cover_every_line_once(tmp_path):
    lines = [{"key": f"k{i}", "image_path": f"images/{i}.jpg", "alt": "x"} for i in range(23)]
    crawl = _crawl(tmp_path / "c", lines, {})
    shards = plan_shards([crawl], shard_rows=5)
    assert [s.rows for s in shards] == [5, 5, 5, 5, 3]
    keys = [row["key"] for s in shards for row in read_shard(s)]
    assert keys == [f"k{i}" for i in range(23)]
    assert [row["where"] for row in read_shard(shards[1])][0] == "records.jsonl:6"


def test_img2dataset_folder_and_tar_shards_read_alike(tmp_path, web_world):
    import tarfile

    folder = web_world / "cc/img2dataset"
    shards = plan_shards([folder])
    assert [s.kind for s in shards] == ["folder"]
    rows = list(read_shard(shards[0]))
    assert all(not r.get("_reject") for r in rows) and len(rows) == len(list((folder / "00000").glob("*.jpg")))
    assert rows[0]["alt"] == (folder / "00000" / f"{rows[0]['key']}.txt").read_text("utf-8")
    tar_root = tmp_path / "tars"
    tar_root.mkdir()
    with tarfile.open(tar_root / "00000.tar", "w") as tar:
        for path in sorted((folder / "00000").iterdir()):
            tar.add(path, arcname=path.name)
    tar_rows = list(read_shard(plan_shards([tar_root])[0]))
    strip = lambda r: {k: v for k, v in r.items() if k not in ("where", "shard")}  # noqa: E731
    assert [strip(r) for r in tar_rows] == [strip(r) for r in rows]


# ----------------------------------------------------------------------------- the synthetic crawl


@pytest.fixture(scope="module")
def web_world(tmp_path_factory):
    from vlp.synthetic import generate
    from vlp.synthetic.web import web_feature_store

    root = tmp_path_factory.mktemp("webworld") / "w"
    generate(root, num_images=40, seed=3)
    web_feature_store(root / "web/heldout", root / "heldout-features")
    return root


def _categories(crawl: Path) -> dict:
    from vlp.synthetic.web import read_truth

    return read_truth(crawl)


def test_synthetic_crawl_every_junk_category_at_its_stage(web_world, tmp_path):
    from vlp.synthetic.web import EXPECTED_STAGE

    crawl = web_world / "web/heldout"
    truth = _categories(crawl)
    result = web_filter(crawl, tmp_path / "out", config=FilterConfig(features=str(web_world / "heldout-features")),
                        engine="local", progress="off", shard_rows=25)
    assert result.stats["input_shards"] == -(-len(truth) // 25)
    rejected = [json.loads(line) for line in (tmp_path / "out/rejected.jsonl").read_text().splitlines()]
    stage_of = {r["key"]: r["stage"] for r in rejected}
    kept = {p["pair_id"][4:] for p in PairStore(tmp_path / "out")}
    assert len(kept) + len(stage_of) == len(truth)
    for category, stage in EXPECTED_STAGE.items():
        keys = [k for k, t in truth.items() if t["category"] == category]
        assert keys
        if category == "duplicate":  # one pair per image survives: the copy or its original
            for k in keys:
                assert (k in kept) + (truth[k]["original"] in kept) <= 1
            continue
        assert all(stage_of.get(k) == stage for k in keys), (category, Counter(stage_of.get(k) for k in keys))
    good = [k for k, t in truth.items() if t["category"] == "good"]
    copies = {t["original"]: k for k, t in truth.items() if t["category"] == "duplicate"}
    kept_good = [k for k in good if k in kept or copies.get(k) in kept]
    assert len(kept_good) >= 0.95 * len(good)
    store = PairStore(tmp_path / "out")
    assert all(0 <= p["score"] <= 1 and p["url"].startswith("https://") for p in store)


def test_synthetic_crawl_without_features_skips_model_stages(web_world, tmp_path):
    crawl = web_world / "web"
    truth = _categories(crawl)
    result = web_filter(crawl, tmp_path / "out", engine="local", progress="off")
    funnel = {f["stage"]: f for f in result.stats["funnel"]}
    assert funnel["naturalness"]["rejected"] == 0 and "skipped" in funnel["naturalness"]
    assert funnel["semantic"]["rejected"] == 0 and "skipped" in funnel["semantic"]
    kept = Counter(truth[p["pair_id"][4:]]["category"] for p in PairStore(tmp_path / "out"))
    assert kept["unnatural"] == sum(1 for t in truth.values() if t["category"] == "unnatural")
    assert kept["non_english"] == kept["junk_text"] == kept["profane"] == kept["shared_text"] == 0
    page = (tmp_path / "out/funnel.html").read_text()
    assert "no --features: stage skipped" in page


def test_shard_object_is_stable():
    shard = Shard("0/records.jsonl#0", "jsonl", "/x/records.jsonl", "/x", 0, 10, 1, 3)
    assert shard.name == "0/records.jsonl#0" and shard.rows == 3


def test_parquet_records_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "crawl"
    folder.mkdir()
    table = pa.table({"key": ["p1", "p2", "p3"], "url": ["https://x.invalid/1", "https://x.invalid/2", None],
                      "image": [_jpeg(420, 360, 5), b"\x00garbage" * 1000, _jpeg(420, 360, 6)],
                      "alt": [GOOD_TEXT, GOOD_TEXT, "Bild mit einem Kreis in Rot vor neutralem Hintergrund"]})
    pq.write_table(table, folder / "part-0.parquet", row_group_size=2)
    shards = plan_shards([folder])
    assert [(s.kind, s.rows) for s in shards] == [("parquet", 2), ("parquet", 1)]
    web_filter(folder, tmp_path / "out", engine="local", progress="off")
    assert [(p["pair_id"], p["url"]) for p in PairStore(tmp_path / "out")] == [("web/p1", "https://x.invalid/1")]
    rejected = [json.loads(line) for line in (tmp_path / "out/rejected.jsonl").read_text().splitlines()]
    assert [(r["key"], r["stage"], r["reason"]) for r in rejected] == [
        ("p2", "image", "undecodable"), ("p3", "language", "not_english")]


def test_empty_or_odd_image_paths_are_bad_rows_not_crashes(tmp_path):
    crawl = _crawl(tmp_path / "c", [{"key": "0", "image": ""}, {"key": "1", "image_path": "."},
                                    {"key": "2", "image_path": "images"}], {})
    rows = list(read_shard(plan_shards([crawl])[0]))
    assert rows[0]["reason"] == "no_image_field"
    result = web_filter(crawl, tmp_path / "out", engine="local", progress="off")
    assert result.stats["kept"] == 0
    rejected = [json.loads(line) for line in (tmp_path / "out/rejected.jsonl").read_text().splitlines()]
    assert [(r["key"], r["stage"], r["reason"]) for r in rejected] == [
        ("0", "input", "no_image_field"), ("1", "image", "missing"), ("2", "image", "missing")]
