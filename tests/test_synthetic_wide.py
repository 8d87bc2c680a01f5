"""The wide synthetic world (the default of vlp.synthetic.generate) and the classic one it
replaced: determinism per image, the widened distributions, file names of PNG images in
every annotation file, and the classic world's images byte for byte."""

import colorsys
import dataclasses
import hashlib
import json
import math
from collections import Counter

import numpy as np
import pytest

from vlp.detectors.annotations import load_vg_annotations
from vlp.synthetic import generate, load_scenes, palette
from vlp.synthetic.render import decode_image, encode_jpeg, object_masks, render_scene
from vlp.synthetic.scene import MIN_CONTRAST, ROTATION_LIMITS, Scene, _distance_to_background, sample_scene

#: sha256 over the JPEG bytes of classic images 1..6 of seed 0, computed with the code
#: before the wide style existed (commit 63f4fa6): the classic style draws the old world.
CLASSIC_SEED0_SHA256 = "49319c71f071c2e4f10515c860541c5cf8fe2dc1fe319f5ecfc5e6d916783b8e"


def _wide(image_id, seed=0):
    return sample_scene(np.random.default_rng([seed, image_id, 0]), image_id, style="wide")


def test_classic_style_draws_the_old_world_byte_for_byte():
    digest = hashlib.sha256()
    for i in range(1, 7):
        scene = sample_scene(np.random.default_rng([0, i, 0]), i)  # classic is sample_scene's default
        assert scene.style == "classic" and scene.image_format == "jpeg"
        digest.update(encode_jpeg(render_scene(scene)))
    assert digest.hexdigest() == CLASSIC_SEED0_SHA256


def test_classic_world_files_name_jpegs_and_keep_the_old_truth_keys(tmp_path):
    generate(tmp_path, 4, seed=0, style="classic")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert "style" not in truth["images"][0]["scene"]
    world = json.loads((tmp_path / "world.json").read_text())
    assert world["style"] == "classic"
    digest = hashlib.sha256()
    for i in range(1, 5):
        digest.update((tmp_path / "images" / f"{i}.jpg").read_bytes())
    again = hashlib.sha256()
    for i in range(1, 5):
        again.update(encode_jpeg(render_scene(sample_scene(np.random.default_rng([0, i, 0]), i))))
    assert digest.hexdigest() == again.hexdigest()


def test_wide_images_are_deterministic_per_image(tmp_path):
    small = generate(tmp_path / "a", 3, seed=3)
    large = generate(tmp_path / "b", 6, seed=3)
    assert small.counts["images"] == 3
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    for name in names:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    assert large.counts["images"] == 6
    # truth.json re-renders every image pixel for pixel (PNG) / to the same JPEG bytes.
    for image_id, scene in load_scenes(tmp_path / "b").items():
        assert scene.style == "wide"
        data = (tmp_path / "b" / "images" / scene.file_name).read_bytes()
        pixels = render_scene(Scene.from_dict(json.loads(json.dumps(scene.to_dict()))))
        if scene.image_format == "png":
            np.testing.assert_array_equal(decode_image(data), pixels)
        else:
            assert encode_jpeg(pixels) == data


def test_wide_distributions_cover_what_the_issue_asks():
    scenes = [_wide(i) for i in range(1, 401)]
    sides = [s for sc in scenes for s in (sc.width, sc.height)]
    assert min(sides) == 48 and max(sides) > 900 and all(48 <= s <= 1000 for s in sides)
    assert all(max(sc.width, sc.height) <= 2.2 * min(sc.width, sc.height) + 1 for sc in scenes)
    formats = Counter(sc.image_format for sc in scenes)
    assert 0.25 < formats["png"] / 400 < 0.45
    aliased = sum(not sc.antialias for sc in scenes) / 400
    assert 0.2 < aliased < 0.4
    counts = Counter(len(sc.objects) for sc in scenes)
    assert counts[0] == 0
    assert 0.3 < counts[1] / 400 < 0.55 and sum(v for k, v in counts.items() if k >= 5) > 60
    colours = Counter(o.colour for sc in scenes for o in sc.objects)
    assert set(colours) == set(palette.COLOURS) and len(palette.COLOURS) == 13
    assert {"gray", "brown", "pink", "teal", "tan"} <= set(colours)

    hsv = [colorsys.rgb_to_hsv(*(c / 255 for c in sc.background.colours[0])) for sc in scenes]
    assert sum(v > 0.9 and s < 0.1 for _, s, v in hsv) > 40  # white / near-white
    assert sum(v < 0.15 for _, s, v in hsv) > 15  # black / near-black
    assert sum(s > 0.6 and v > 0.5 for _, s, v in hsv) > 30  # saturated
    kinds = Counter(sc.background.kind for sc in scenes)
    assert set(kinds) == {"solid", "gradient", "noise"}

    fractions, aspects, shapes = [], [], {}
    for sc in scenes:
        for o in sc.objects:
            area = o.width * o.height / (sc.width * sc.height)
            fractions.append(area)
            # the size attribute follows the small/large rule, away from the threshold
            assert (o.size == "large") == (area >= palette.LARGE_AREA_FRACTION)
            assert area <= 0.028 or area >= 0.05, (sc.image_id, o.box, area)
            assert _distance_to_background(palette.COLOURS[o.colour], sc.background) >= MIN_CONTRAST
            if o.category == "box":
                aspects.append(o.width / o.height)
            shapes.setdefault(o.category, []).append(o.draw)
    assert min(fractions) < 0.003 and max(fractions) > 0.5
    assert min(aspects) < 0.35 and max(aspects) > 2.8
    # every other shape is stretched too (ellipses, ...); rings from thick to thin, crosses'
    # bars from slim to wide
    for category in ("circle", "ring", "triangle", "star", "heart", "cross"):
        stretch = [d.aspect for d in shapes[category]]
        assert min(stretch) < 0.7 and max(stretch) > 1.5, category
    ellipse = next(o for sc in scenes for o in sc.objects if o.category == "circle" and o.draw.aspect < 0.7)
    assert ellipse.width < 0.85 * ellipse.height  # the tight box follows the stretch
    holes = [d.inner_ratio for d in shapes["ring"]]
    assert min(holes) < 0.25 and max(holes) > 0.67
    bars = [d.inner_ratio for d in shapes["cross"]]
    assert min(bars) < 0.25 and max(bars) > 0.42
    # about half the rotatable shapes upright, the others tilted within their limits
    for category, limit in ROTATION_LIMITS.items():
        rotations = [d.rotation for d in shapes[category]]
        if not limit:
            assert set(rotations) == {0.0}, category
            continue
        assert all(abs(r) <= limit for r in rotations), category
        upright = sum(r == 0.0 for r in rotations) / len(rotations)
        assert 0.3 < upright < 0.7 and max(map(abs, rotations)) > 0.6 * limit, (category, upright)


def test_png_images_are_named_in_every_annotation_file(tmp_path):
    generate(tmp_path, 14, seed=0)
    files = {p.name for p in (tmp_path / "images").iterdir()}
    assert any(n.endswith(".png") for n in files) and any(n.endswith(".jpg") for n in files)
    coco = [json.loads((tmp_path / "annotations" / f"captions_{s}.json").read_text()) for s in ("train", "val")]
    assert {im["file_name"] for c in coco for im in c["images"]} == files
    karpathy = json.loads((tmp_path / "annotations" / "dataset_coco.json").read_text())
    assert {im["filename"] for im in karpathy["images"]} == files
    refcoco = json.loads((tmp_path / "refcoco+" / "instances.json").read_text())
    assert {im["file_name"] for im in refcoco["images"]} == files
    image_data = json.loads((tmp_path / "image_data.json").read_text())
    assert {e["url"].rsplit("/", 1)[1] for e in image_data} == files
    gt = load_vg_annotations(tmp_path)
    assert {g.path.name for g in gt} == files
    for g in gt:
        if g.path.suffix == ".png":
            assert g.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert g.path.read_bytes()[:2] == b"\xff\xd8"
    # The task folders' copies stay JPEG under their .jpg names.
    for path in (tmp_path / "cc" / "img2dataset" / "00000").glob("*.jpg"):
        assert path.read_bytes()[:2] == b"\xff\xd8"


def test_aliased_scenes_have_hard_edges():
    scene = next(sc for sc in (_wide(i) for i in range(1, 60)) if not sc.antialias and sc.objects
                 and sc.background.kind == "solid" and not sc.clutter and not sc.objects[0].pattern)
    pixels = render_scene(scene).astype(int)
    obj = scene.objects[0]
    mask = object_masks(scene, visible=True)[0]
    colours = {tuple(pixels[y, x]) for y, x in zip(*np.nonzero(mask))}
    assert colours == {tuple(obj.draw.rgb)}
    x1, y1, x2, y2 = obj.box
    window = pixels[y1:y2, x1:x2].reshape(-1, 3)
    allowed = {tuple(obj.draw.rgb), tuple(scene.background.colours[0])} | {
        tuple(o.draw.rgb) for o in scene.objects} | {
        tuple(o.draw.pattern_rgb) for o in scene.objects if o.pattern}  # another object's stripes or spots
    # no blended edge pixels: every pixel is a shape colour or the background colour
    assert {tuple(p) for p in window} <= allowed


def test_new_colour_words_reach_the_texts(tmp_path):
    generate(tmp_path, 24, seed=2)
    texts = []
    for name in ("train", "val"):
        data = json.loads((tmp_path / "annotations" / f"captions_{name}.json").read_text())
        texts += [a["caption"].lower() for a in data["annotations"]]
        vqa = json.loads((tmp_path / "vqa" / f"v2_mscoco_{name}_annotations.json").read_text())
        texts += [a["multiple_choice_answer"] for a in vqa["annotations"]]
    regions = json.loads((tmp_path / "region_descriptions.json").read_text())
    texts += [r["phrase"].lower() for e in regions for r in e["regions"]]
    words = {w.strip(".,") for t in texts for w in t.split()}
    assert {"gray", "brown", "pink", "teal", "tan"} & words
    scenes = load_scenes(tmp_path)
    used = {o.colour for s in scenes.values() for o in s.objects}
    assert used - set(palette.CLASSIC_COLOURS)  # new colours are drawn ...
    assert (used - set(palette.CLASSIC_COLOURS)) & words  # ... and named in the texts


def test_unknown_style_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="style"):
        generate(tmp_path, 2, style="fancy")
    with pytest.raises(ValueError, match="style"):
        sample_scene(np.random.default_rng(0), 1, style="fancy")


def test_every_colour_is_a_vg_display_name_far_from_the_others():
    names = list(palette.COLOURS)
    for i, a in enumerate(names):
        assert palette.attribute_id(a) >= 0
        for b in names[i + 1:]:
            # the closest pairs: pink / tan 73, yellow / orange 81.5, green / teal 85
            assert math.dist(palette.COLOURS[a], palette.COLOURS[b]) >= 72, (a, b)


def test_vlp_synth_style_option(tmp_path):
    from click.testing import CliRunner

    from vlp import cli

    result = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "w"), "--images", "3", "--style", "classic"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "w" / "images").iterdir()) == ["1.jpg", "2.jpg", "3.jpg"]
    assert json.loads((tmp_path / "w" / "world.json").read_text())["style"] == "classic"
    bad = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "x"), "--style", "fancy"])
    assert bad.exit_code == 2 and "fancy" in bad.output


def test_object_colours_restrict_objects_and_keep_every_rule():
    for image_id in range(1, 41):
        scene = sample_scene(np.random.default_rng([9, image_id, 0]), image_id, style="wide",
                             object_colours=["brown", "gray"])
        again = sample_scene(np.random.default_rng([9, image_id, 0]), image_id, style="wide",
                             object_colours=["gray", "brown"])
        assert scene.to_dict() == again.to_dict()  # deterministic per image, order of the list aside
        assert scene.objects, image_id  # a background leaving no listed colour is drawn again
        for obj in scene.objects:
            assert obj.colour in ("gray", "brown")
            assert _distance_to_background(palette.COLOURS[obj.colour], scene.background) >= MIN_CONTRAST


def test_object_colours_none_draws_the_unrestricted_world():
    for image_id in range(1, 21):
        plain = _wide(image_id, seed=4)
        unrestricted = sample_scene(np.random.default_rng([4, image_id, 0]), image_id, style="wide",
                                    object_colours=None)
        assert plain.to_dict() == unrestricted.to_dict()
        everything = sample_scene(np.random.default_rng([4, image_id, 0]), image_id, style="wide",
                                  object_colours=list(palette.COLOURS))
        assert everything.to_dict() == plain.to_dict()


@pytest.mark.parametrize("colours, message", [
    (["grey"], "'grey' is not a colour of the world"),
    (["grey", "beige", "red"], "'grey', 'beige' are not colours of the world"),
    ([], "an empty list names no colour"),
])
def test_object_colours_outside_the_palette_are_named(colours, message):
    with pytest.raises(ValueError, match=message):
        sample_scene(np.random.default_rng(0), 1, style="wide", object_colours=colours)


def test_object_colours_are_a_wide_style_setting(tmp_path):
    with pytest.raises(ValueError, match="wide style"):
        sample_scene(np.random.default_rng(0), 1, object_colours=["red"])
    with pytest.raises(ValueError, match="wide style"):
        generate(tmp_path / "w", 2, style="classic", object_colours=["red"])
    assert not (tmp_path / "w").exists()


def test_vlp_synth_object_colours_option(tmp_path):
    from click.testing import CliRunner

    from vlp import cli

    result = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "w"), "--images", "4",
                                           "--object-colours", "tan, gray"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "w" / "world.json").read_text())["object_colours"] == ["gray", "tan"]
    assert {o.colour for s in load_scenes(tmp_path / "w").values() for o in s.objects} <= {"gray", "tan"}
    default = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "d"), "--images", "1"])
    assert json.loads((tmp_path / "d" / "world.json").read_text())["object_colours"] == list(palette.COLOURS)
    assert default.exit_code == 0
    bad = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "x"), "--object-colours", "grey"])
    assert bad.exit_code == 2 and "--object-colours" in bad.output and "'grey' is not a colour" in bad.output
    assert not (tmp_path / "x").exists()


def test_colour_spread_draws_colours_that_keep_their_word_and_the_contrast_rule():
    offsets = []
    for image_id in range(1, 61):
        scene = sample_scene(np.random.default_rng([12, image_id, 0]), image_id, style="wide", colour_spread=40)
        again = sample_scene(np.random.default_rng([12, image_id, 0]), image_id, style="wide", colour_spread=40)
        assert scene.to_dict() == again.to_dict()  # deterministic per image
        for obj in scene.objects:
            rgb = obj.draw.rgb
            offset = np.abs(np.array(rgb) - np.array(palette.COLOURS[obj.colour]))
            assert offset.max() <= 40
            assert palette.nearest_colour(rgb) == obj.colour, (image_id, obj.colour, rgb)
            assert _distance_to_background(rgb, scene.background) >= MIN_CONTRAST
            offsets.append(float(np.linalg.norm(offset)))
    # far wider than the world's own +-10 (at most 17.3 RGB units from the reference)
    assert len(offsets) > 100 and np.median(offsets) > 25 and max(offsets) > 50


def _touching_pairs(scene):
    """(a, b, RGB distance of their drawn colours) for each pair of objects whose masks meet."""
    masks = object_masks(scene)
    rgb = [np.asarray(o.draw.rgb, float) for o in scene.objects]
    return [(a, b, float(np.linalg.norm(rgb[a] - rgb[b]))) for a in range(len(masks))
            for b in range(a + 1, len(masks)) if (masks[a] & masks[b]).any()]


@pytest.mark.parametrize("colour_spread", [None, 40])
def test_objects_that_touch_keep_the_contrast_rule(colour_spread):
    # Generator 1.2 drew 340 such pairs in 1,200 scenes (a small object could sit unseen
    # inside a larger one of its colour); now a placement that would touch one is drawn again.
    touching = 0
    for image_id in range(1, 201):
        scene = sample_scene(np.random.default_rng([21, image_id, 0]), image_id, style="wide",
                             colour_spread=colour_spread)
        pairs = _touching_pairs(scene)
        assert [pair for pair in pairs if pair[2] < MIN_CONTRAST] == [], image_id
        touching += len(pairs)
    assert touching > 50  # objects still overlap, in contrasting colours


def test_every_annotated_object_can_be_seen():
    # Removing an object changes most of the pixels it shows (by 40 RGB units or more): no
    # annotated object hides in a same-coloured one. Stripes in the background's colour are
    # why this is not 100%.
    for image_id in range(1, 61):
        scene = _wide(image_id, seed=123)
        pixels = render_scene(scene).astype(float)
        for index, visible in enumerate(object_masks(scene, visible=True)):
            without = dataclasses.replace(scene, objects=scene.objects[:index] + scene.objects[index + 1:])
            change = np.linalg.norm(pixels[visible] - render_scene(without)[visible], axis=1)
            assert visible.any() and (change >= 40).mean() > 0.6, (image_id, index)


def test_colour_spread_none_keeps_the_worlds_own_jitter():
    for image_id in range(1, 21):
        plain = _wide(image_id, seed=5)
        assert sample_scene(np.random.default_rng([5, image_id, 0]), image_id, style="wide",
                            colour_spread=None).to_dict() == plain.to_dict()
        for obj in plain.objects:
            assert np.abs(np.array(obj.draw.rgb) - np.array(palette.COLOURS[obj.colour])).max() <= 10


@pytest.mark.parametrize("spread", [-1, 128, 2.5, True])
def test_colour_spread_out_of_range_is_a_clear_error(spread):
    with pytest.raises(ValueError, match="colour_spread must be a whole number of RGB units from 0 to 127"):
        sample_scene(np.random.default_rng(0), 1, style="wide", colour_spread=spread)


def test_vlp_synth_colour_spread_option(tmp_path):
    from click.testing import CliRunner

    from vlp import cli

    result = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "w"), "--images", "3", "--colour-spread", "30",
                                           "--object-colours", "gray"])
    assert result.exit_code == 0, result.output
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    assert world["colour_spread"] == 30 and world["object_colours"] == ["gray"]
    for image_id, scene in load_scenes(tmp_path / "w").items():
        assert scene.to_dict() == sample_scene(np.random.default_rng([0, image_id, 0]), image_id, style="wide",
                                               object_colours=["gray"], colour_spread=30).to_dict()
    bad = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "x"), "--colour-spread", "200"])
    assert bad.exit_code == 2 and "--colour-spread" in bad.output
    classic = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "c"), "--style", "classic", "--colour-spread", "20"])
    assert classic.exit_code == 2 and "wide style" in classic.output and not (tmp_path / "c").exists()
