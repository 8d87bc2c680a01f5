"""The detector at the command line: bad presets, settings and checkpoints are one
``Error:`` line; every ``--help`` starts without torch; `vlp train-detector` trains,
refuses to resume with other settings, and writes its files atomically."""

import argparse
import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from vlp import cli
from vlp.detectors.config import _ARCH_FIELDS, _DETECTOR_FIELDS, preset_names

TINY = ["--set", "min_size=224", "--set", "max_size=352", "--set", "rpn_post_nms_topk=50", "--set", "extra_min_sizes=[]",
        "--set", "mirrored_reading=false"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import cv2

    root = tmp_path_factory.mktemp("imgs")
    cv2.imwrite(str(root / "a.jpg"), np.full((40, 60, 3), 128, np.uint8))
    return root


def _one_error_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output and "\x1b" not in result.output
    return lines[0]


# -- unknown presets and settings ---------------------------------------------------------


def test_unknown_preset_is_one_error_line_listing_the_presets(images, tmp_path):
    result = CliRunner().invoke(cli.extract_main, [str(images), "--out", str(tmp_path / "o"), "--preset", "demo2"])
    line = _one_error_line(result)
    assert line == ("Error: unknown detector preset 'demo2' (did you mean demo?); available presets: "
                    + ", ".join(preset_names()))
    assert not (tmp_path / "o").exists()
    # the same for the trainer
    result = CliRunner().invoke(cli.main, ["train-detector", str(images), "-o", str(tmp_path / "d.pt"),
                                           "--preset", "butd36"])
    assert _one_error_line(result).startswith("Error: unknown detector preset 'butd36' (did you mean butd-36?)")


def test_unknown_setting_is_one_error_line_listing_the_settings(images, tmp_path):
    result = CliRunner().invoke(cli.extract_main, [str(images), "--out", str(tmp_path / "o"), "--preset", "demo",
                                                   "--set", "min_boxs=36"])
    line = _one_error_line(result)
    head, _, listed = line.partition("; valid settings: ")
    assert head == "Error: unknown detector setting min_boxs (did you mean min_boxes?)"
    assert listed.split(", ") == sorted(_DETECTOR_FIELDS | _ARCH_FIELDS)
    assert {"min_boxes", "max_boxes", "score_threshold", "blocks"} <= set(listed.split(", "))


def test_a_setting_of_the_wrong_type_is_one_error_line(images, tmp_path):
    result = CliRunner().invoke(cli.extract_main, [str(images), "--out", str(tmp_path / "o"), "--preset", "demo",
                                                   "--set", "min_boxes=many"])
    assert _one_error_line(result) == "Error: detector setting min_boxes must be an integer, got 'many'"
    result = CliRunner().invoke(cli.extract_main, [str(images), "--out", str(tmp_path / "o"), "--preset", "demo",
                                                   "--set", "min_boxes=0"])
    assert _one_error_line(result) == "Error: need 1 <= min_boxes <= max_boxes, got 0/100"


# -- refused checkpoints --------------------------------------------------------------------


def _pickled_object_bin(path):
    import torch

    torch.save({"backbone.stem.conv1.weight": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, path)
    return path


def test_a_checkpoint_holding_a_pickled_object_is_refused_in_one_line_of_ours(images, tmp_path):
    bad = _pickled_object_bin(tmp_path / "pytorch_model.bin")
    result = CliRunner().invoke(cli.extract_main, [str(images), "--out", str(tmp_path / "o"), "--preset", "demo",
                                                   "--weights", str(bad)])
    line = _one_error_line(result)
    assert line.startswith(f"Error: {bad}: refused: the file holds a pickled Python object (argparse.Namespace)")
    assert "never runs pickled code" in line
    assert "weights_only=False" not in line and "add_safe_globals" not in line
    assert not (tmp_path / "o").exists()  # refused before any worker started or anything was written


def test_read_checkpoint_refusals_are_short_and_quiet(tmp_path, recwarn):
    from vlp.detectors import CheckpointError, read_checkpoint

    plain = tmp_path / "plain.bin"  # a bare pickle, not torch's zip format
    plain.write_bytes(pickle.dumps({"w": argparse.Namespace()}, protocol=4))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(plain)
    message = str(info.value)
    assert message.startswith(f"{plain}: refused: the file holds pickled data that is not plain tensors")
    assert "\n" not in message and "\x1b" not in message and "weights_only=False" not in message
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # torch's warning is not shown
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace"):
        read_checkpoint(_pickled_object_bin(tmp_path / "obj.pt"))


# -- start-up cost -------------------------------------------------------------------------

HELP_SCRIPT = textwrap.dedent("""
    import json, sys
    import click
    from click.testing import CliRunner
    from vlp import cli

    def walk(command, path):
        yield command, path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, path + [name])

    seen = []
    for root in (cli.main, cli.extract_main, cli.build_main, cli.train_main):
        for command, path in walk(root, []):
            result = CliRunner().invoke(root, path + ["--help"])
            assert result.exit_code == 0, (root.name, path, result.output)
            heavy = [m for m in ("torch", "ray", "cv2", "transformers") if m in sys.modules]
            assert not heavy, (root.name, path, heavy)
            seen.append(" ".join([root.name or "?"] + path))
    print(json.dumps(seen))
""")


def test_every_help_starts_without_torch():
    result = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(seen) >= 25, seen
    assert "main train-detector" in seen and "extract-main" in seen


def test_detector_errors_and_config_import_without_torch():
    code = ("import sys; from vlp.detectors import CheckpointError, DetectorConfigError, MissingWeightsError; "
            "from vlp.detectors.config import make_config; make_config('demo', min_boxes=36); "
            "assert 'torch' not in sys.modules, 'importing the detector errors and config loaded torch'; "
            "from vlp.detectors import load_detector; assert 'torch' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_evaluation_does_not_import_training():
    code = ("import sys, vlp.detectors.evaluate; "
            "assert 'vlp.detectors.training' not in sys.modules, 'evaluate imports training'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# -- durable writes ------------------------------------------------------------------------


def test_checkpoint_saves_are_atomic_and_name_independent(tmp_path, monkeypatch):
    import torch

    from vlp.detectors import ArchitectureConfig, FasterRCNN, save_checkpoint

    model = FasterRCNN(ArchitectureConfig(blocks=(1, 1, 1, 1), stem_channels=8, res2_channels=16,
                                          bottleneck_channels=4, rpn_channels=8, num_classes=4, num_attributes=3,
                                          cls_embedding_dim=4, attr_hidden_dim=8))
    path = tmp_path / "det.pt"
    sha = save_checkpoint(model, path)
    before = path.read_bytes()

    # the same weights give the same bytes whatever the file is called (a sha256 to compare runs by)
    assert save_checkpoint(model, tmp_path / "copy.pt") == sha
    (tmp_path / "copy.pt").unlink()

    def torn_save(obj, target, *args, **kwargs):
        if hasattr(target, "write"):
            target.write(b"PK\x03\x04 half a checkpoint")
        else:
            with open(target, "wb") as handle:
                handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, path)
    assert path.read_bytes() == before and len(sha) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.pt"]


# -- vlp train-detector ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from vlp.synthetic import generate

    root = tmp_path_factory.mktemp("world")
    generate(root, 4, seed=11, split_fractions=(1.0, 0.0, 0.0), overwrite=True, web=False)
    return root


def _train(world, out, *extra):
    args = ["train-detector", str(world), "-o", str(out), *TINY, "--iterations", "2", "--batch-size", "1",
            "--rois-per-image", "8", "--warmup", "1", "--log-every", "1", "--checkpoint-every", "1",
            "--eval-images", "0", "--threads", "1", *extra]
    return CliRunner().invoke(cli.main, args)


def test_train_detector_writes_its_files_and_resume_checks_the_settings(tiny_world, tmp_path):
    out = tmp_path / "runs" / "tiny.pt"
    result = _train(tiny_world, out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} after 2 iterations" in result.output
    log = json.loads((tmp_path / "runs" / "tiny.pt.log.json").read_text())
    assert [e["iteration"] for e in log["losses"]] == [1, 2]
    assert log["settings"]["lr"] == 2e-3 and log["settings"]["rois_per_image"] == 8 and log["finished"]
    assert [c["iteration"] for c in log["checkpoints"]] == [1, 2]
    assert log["sha256"] == log["checkpoints"][-1]["sha256"]
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["tiny.pt", "tiny.pt.log.json", "tiny.pt.state.pt"]  # no temporary files left
    # the checkpoint is the inference layout
    from vlp.detectors import load_detector

    detector = load_detector(out, preset="demo", device="cpu", min_size=224, max_size=352, rpn_post_nms_topk=50,
                             extra_min_sizes=[])
    assert detector.weights_sha256 == log["sha256"]
    # resuming with another learning rate is refused, naming it; --threads may change
    result = _train(tiny_world, out, "--resume", "--lr", "0.001")
    assert _one_error_line(result) == (f"Error: {out}.state.pt: cannot resume with other settings: "
                                       f"lr: 0.002 then, 0.001 now")
    result = _train(tiny_world, out, "--resume", "--threads", "2")
    assert result.exit_code == 0 and "training already finished (2 iterations)" in result.output, result.output
    result = _train(tiny_world, tmp_path / "none.pt", "--resume")
    assert "no training state to resume" in _one_error_line(result)


def test_stored_classes_trained_writes_a_class_subset_checkpoint(tiny_world, tmp_path):
    from vlp.detectors.checkpoint import CLASS_SUBSET_KEY, read_checkpoint

    result = _train(tiny_world, tmp_path / "subset.pt", "--stored-classes", "trained")
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "subset.pt.log.json").read_text())["stored_classes"]
    assert read_checkpoint(tmp_path / "subset.pt")[CLASS_SUBSET_KEY].tolist() == stored and 0 < len(stored) <= 8
    result = _train(tiny_world, tmp_path / "other.pt", "--stored-classes", "some")
    assert result.exit_code == 2 and "'some' is not one of 'all', 'trained'" in result.output, result.output


def test_train_min_sizes_are_recorded_checked_on_resume_and_validated(tiny_world, tmp_path):
    out = tmp_path / "multi.pt"
    result = _train(tiny_world, out, "--train-min-sizes", "160, 224")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "multi.pt.log.json").read_text())["settings"]["train_min_sizes"] == [160, 224]
    result = _train(tiny_world, out, "--resume", "--train-min-sizes", "160")
    assert _one_error_line(result) == (f"Error: {out}.state.pt: cannot resume with other settings: "
                                       f"train_min_sizes: (160, 224) then, (160,) now")
    for bad, shown in (("160,x", "'x'"), ("160,\u00b2", "'\u00b2'")):  # "²" is a digit int() refuses
        result = _train(tiny_world, tmp_path / "bad.pt", "--train-min-sizes", bad)
        assert result.exit_code == 2 and f"{shown} is not a whole number" in result.output, result.output
    for bad in ("0", "160,353"):  # TINY's max_size is 352
        result = _train(tiny_world, tmp_path / "bad.pt", "--train-min-sizes", bad)
        assert _one_error_line(result).startswith("Error: train_min_sizes ["), result.output
        assert "between 1 and the preset's max_size (352)" in result.output
    assert not (tmp_path / "bad.pt").exists()


def test_part_and_hard_negatives_are_recorded_and_checked_on_resume(tiny_world, tmp_path):
    out = tmp_path / "parts.pt"
    result = _train(tiny_world, out, "--part-negatives", "3", "--hard-negatives", "2")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "parts.pt.log.json").read_text())["settings"]
    assert (settings["roi_part_negatives"], settings["roi_hard_negatives"]) == (3, 2)
    result = _train(tiny_world, out, "--resume")
    assert _one_error_line(result) == (f"Error: {out}.state.pt: cannot resume with other settings: "
                                       f"roi_hard_negatives: 2 then, 0 now; roi_part_negatives: 3 then, 0 now")
    for option in ("--part-negatives", "--hard-negatives"):
        result = _train(tiny_world, tmp_path / "bad.pt", option, "-1")
        assert result.exit_code == 2 and option in result.output, result.output


def _merged_train_splits(folders, root):
    """One VG folder holding the train splits of ``folders``, ids offset by 1000 per folder."""
    merged = {"objects.json": [], "image_data.json": [], "attributes.json": []}
    train = []
    (root / "images").mkdir(parents=True)
    for k, folder in enumerate(folders, start=1):
        keep = set(json.loads((folder / "splits.json").read_text())["train"])
        for name, entries in merged.items():
            entries += [dict(e, image_id=e["image_id"] + 1000 * k)
                        for e in json.loads((folder / name).read_text()) if e["image_id"] in keep]
        for image_id in sorted(keep):
            image = next((folder / "images").glob(f"{image_id}.*"))
            (root / "images" / f"{image_id + 1000 * k}{image.suffix}").symlink_to(image)
            train.append(image_id + 1000 * k)
    for name, entries in merged.items():
        (root / name).write_text(json.dumps(entries))
    (root / "splits.json").write_text(json.dumps({"train": train, "val": [], "test": []}))
    return root


def test_resume_refuses_the_same_image_ids_with_other_annotations(tmp_path):
    from vlp.synthetic import generate

    first, second = tmp_path / "first", tmp_path / "second"
    generate(first, 2, seed=21, split_fractions=(1.0, 0.0, 0.0), style="classic", web=False)
    generate(second, 2, seed=22, split_fractions=(1.0, 0.0, 0.0), style="classic", web=False)
    out = tmp_path / "run.pt"
    result = _train(first, out, str(second), "--iterations", "3", "--checkpoint-every", "1")
    assert result.exit_code == 0, result.output
    state = out.with_name("run.pt.state.pt")
    import torch

    saved = torch.load(state, map_location="cpu", weights_only=True)
    saved["iteration"] = 1  # as if killed after the first checkpoint
    torch.save(saved, state)
    # both folders number their images alike: the swapped order has the very same id list
    result = _train(second, out, str(first), "--iterations", "3", "--checkpoint-every", "1", "--resume")
    assert "training annotations: same image ids, other boxes, labels or sizes" in _one_error_line(result)
    result = _train(first, out, str(second), "--iterations", "3", "--checkpoint-every", "1", "--resume")
    assert result.exit_code == 0 and "resumed" in result.output, result.output


def test_train_detector_pools_several_folders_exactly_like_one_merged_folder(tiny_world, tmp_path):
    from vlp.synthetic import generate

    other = tmp_path / "other"
    generate(other, 3, seed=12, split_fractions=(1.0, 0.0, 0.0), style="classic", web=False)
    pooled, merged = tmp_path / "pooled.pt", tmp_path / "merged.pt"
    result = _train(tiny_world, pooled, str(other), "--eval-world", str(tiny_world), "--eval-world", str(other),
                    "--eval-split", "all", "--eval-images", "2")
    assert result.exit_code == 0, result.output
    assert "on 4 images" in result.output  # the first 2 images of each evaluation folder, scored as one set
    result = _train(_merged_train_splits([tiny_world, other], tmp_path / "merged"), merged)
    assert result.exit_code == 0, result.output
    pooled_log = json.loads(pooled.with_name("pooled.pt.log.json").read_text())
    merged_log = json.loads(merged.with_name("merged.pt.log.json").read_text())
    assert pooled_log["vg_dir"] == [str(tiny_world), str(other)] and pooled_log["num_train_images"] == 7
    assert [e["total"] for e in pooled_log["losses"]] == [e["total"] for e in merged_log["losses"]]
    assert pooled.read_bytes() == merged.read_bytes()
    assert len(pooled_log["evaluations"]) == 1 and not merged_log["evaluations"]

    from vlp.detectors import load_detector
    from vlp.detectors.evaluate import evaluate_detector, evaluate_detector_sets

    # Scored by the shipped weights, which find objects there (the 2-iteration run finds none).
    detector = load_detector(preset="demo", device="cpu", min_size=352, max_size=480, extra_min_sizes=[],
                             mirrored_reading=False)
    scored_pooled = evaluate_detector_sets(detector, [(tiny_world, None), (other, None)])
    scored_merged = evaluate_detector(detector, tmp_path / "merged")
    assert scored_pooled["num_images"] == 7 and scored_pooled["mAP"] > 0.3
    assert scored_pooled == scored_merged
