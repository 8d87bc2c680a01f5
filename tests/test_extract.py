"""vlp-extract: discovery, decoding of web images, and the Ray pipeline end to end
(formats, errors.jsonl, parity with direct detect() calls, resume after kill -9, a worker
killed mid-run, joining a Ray cluster started outside the run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vlp.core.decode import DecodeError, decode_file, decode_image
from vlp.pipeline.discover import discover, image_id_of
from vlp.core.errors_log import ErrorLog
from vlp.pipeline.extract import ExtractSettings, run_extract
from vlp.schemas import FeatureStore
from vlp.schemas.verify import verify_store

# The demo detector at a small input size: the same code paths, a few times faster.
SMALL = {"min_size": 320, "max_size": 480, "extra_min_sizes": [], "mirrored_reading": False}  # one reading, for speed
VLP_EXTRACT = [sys.executable, "-c", "from vlp.cli import extract_main; extract_main()"]


def _file_of(root: Path, image_id: str, expected: dict) -> Path:
    """The file that owns image_id (not a colliding one)."""
    candidates = [p for p in sorted(root.glob(image_id + ".*")) if p.relative_to(root).as_posix() not in expected["bad"]]
    assert len(candidates) == 1, candidates
    return candidates[0]


# -- discovery --------------------------------------------------------------------------


def _touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_discovery_is_recursive_case_insensitive_and_stable(tmp_path):
    for name in ["b/2.JPG", "a/1.jpeg", "a/sub/3.PnG", "c.webp", "notes.txt", "a/.hidden.gif", "d/e.Tiff"]:
        _touch(tmp_path / name)
    found = discover(tmp_path)
    assert found.paths == ["a/.hidden.gif", "a/1.jpeg", "a/sub/3.PnG", "b/2.JPG", "c.webp", "d/e.Tiff"]
    assert [image_id_of(p) for p in found.paths] == ["a/.hidden", "a/1", "a/sub/3", "b/2", "c", "d/e"]
    assert found.skipped == [] and found.loops == []
    assert discover(tmp_path, limit=2).paths == ["a/.hidden.gif", "a/1.jpeg"]
    assert discover(tmp_path, glob="a/*").paths == ["a/.hidden.gif", "a/1.jpeg", "a/sub/3.PnG"]
    assert discover(tmp_path, glob="*.JPG").paths == ["b/2.JPG"]
    assert found.total_bytes() == 6


def test_discovery_reports_collisions_and_survives_symlink_loops(tmp_path):
    _touch(tmp_path / "x" / "a.png")
    _touch(tmp_path / "x" / "a.jpg")
    _touch(tmp_path / "x" / "a.jpg.png")  # id "x/a.jpg": no collision with "x/a"
    os.symlink(tmp_path, tmp_path / "x" / "loop")  # points back at the root
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "dangling.jpg")
    found = discover(tmp_path)
    assert found.paths == ["x/a.jpg", "x/a.jpg.png"]
    assert found.skipped == [("x/a.png", "image_id collision: 'x/a' is already the id of x/a.jpg")]
    assert found.loops == ["x/loop"]


def test_discovery_from_a_file_list(tmp_path):
    _touch(tmp_path / "imgs" / "p" / "1.jpg")
    _touch(tmp_path / "imgs" / "2.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# wanted\np/1.jpg\n\n{tmp_path / 'imgs' / '2.png'}\nmissing.jpg\n/etc/hostname\n")
    found = discover(tmp_path / "imgs", file_list=listing)
    assert found.paths == ["2.png", "p/1.jpg"]
    assert found.missing == ["missing.jpg"]
    assert [entry for entry, _ in found.refused] == ["/etc/hostname"]  # outside the folder: never opened
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        discover(tmp_path / "nope")


# -- decoding ----------------------------------------------------------------------------


def test_decoding_converts_what_the_web_sends(mixed_folder):
    root, expected = mixed_folder
    for image_id, (width, height) in expected["good"].items():
        image = decode_file(_file_of(root, image_id, expected))
        assert image.dtype == np.uint8 and image.shape == (height, width, 3), image_id
        assert image.flags["C_CONTIGUOUS"]
    # 16-bit gray is scaled, not clipped: the ramp spans the whole 8-bit range.
    ramp = decode_file(root / "odd" / "gray16.png")
    assert ramp.min() == 0 and ramp.max() == 255 and (ramp[..., 0] == ramp[..., 2]).all()
    # Transparency is composited onto white: half-transparent pixels are brighter than the source.
    rgba, opaque = decode_file(root / "odd" / "rgba.png"), decode_file(root / "dup" / "a.png")
    assert rgba.mean() > opaque.mean() + 50
    # EXIF orientation 6: the decoded image is the stored one rotated 90 degrees clockwise.
    rotated = decode_file(root / "odd" / "rotated.jpg")
    assert rotated.shape == (300, 200, 3)


@pytest.mark.parametrize("name, reason, kind", [
    ("broken/empty.jpg", "empty file", "empty"), ("broken/truncated.jpg", "truncated", "truncated"),
    ("broken/notes.jpg", "not an image", "not_an_image"), ("broken/bomb.png", "too large", "too_large")])
def test_decoding_refuses_bad_files_with_a_reason(mixed_folder, name, reason, kind):
    root, _ = mixed_folder
    with pytest.raises(DecodeError, match=reason) as info:
        decode_file(root / name)
    assert info.value.kind == kind


def test_pixel_cap_is_checked_before_decoding(mixed_folder):
    root, expected = mixed_folder
    data = (root / "world" / "1.jpg").read_bytes()
    width, height = expected["good"]["world/1"]
    assert decode_image(data, max_pixels=width * height).shape[:2] == (height, width)
    with pytest.raises(DecodeError, match=f"too large: {width}x{height}"):
        decode_image(data, max_pixels=width * height - 1)


def test_error_log_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "errors.jsonl"
    path.write_text('{"path": "a.jpg", "reason": "x"}\n{"path": "b.j')
    log = ErrorLog(path)
    assert [e["path"] for e in log.read()] == ["a.jpg"]
    log.add({"path": "c.jpg", "reason": "y"})
    log.close()
    assert [json.loads(line)["path"] for line in path.read_text().splitlines()] == ["a.jpg", "c.jpg"]


# -- the Ray pipeline ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the in-process runs of this module (run_extract leaves
    an instance it did not start running)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _settings(**kwargs) -> ExtractSettings:
    base = dict(preset="demo", overrides=dict(SMALL), progress="off", chunk_size=4, shard_size=5)
    base.update(kwargs)
    return ExtractSettings(**base)


def _check_output(out: Path, expected: dict) -> FeatureStore:
    store = FeatureStore(out)
    keys = list(store.keys())
    assert len(keys) == len(set(keys)) == len(expected["good"])
    assert set(keys) == set(expected["good"])
    for image_id, (width, height) in expected["good"].items():
        record = store.get(image_id)
        assert (record.image_w, record.image_h) == (width, height), image_id
        assert record.boxes[:, 2].max() <= width + 1 and record.boxes[:, 3].max() <= height + 1
    errors = ErrorLog(out / "errors.jsonl").read()
    assert sorted(e["path"] for e in errors) == sorted(expected["bad"])
    for entry in errors:
        assert expected["bad"][entry["path"]] in entry["reason"], entry
    report = verify_store(out)
    assert report.ok, report.errors
    assert report.manifest["complete"] is True
    return store


@pytest.mark.slow
@pytest.mark.parametrize("storage, extra_min_sizes", [("lmdb", []), ("arrow", [400])])
def test_pipeline_output_equals_direct_detect_calls(ray_session, mixed_folder, tmp_path, storage, extra_min_sizes):
    """(With arrow, each image is also read at a 400 px short side: the prepared readings
    travel from the decoding tasks to the detector actors.)"""
    from vlp.detectors import load_detector

    root, expected = mixed_folder
    out = tmp_path / "features"
    readings = {**SMALL, "extra_min_sizes": extra_min_sizes}
    stats = run_extract(root, out, _settings(storage=storage, overrides=readings))
    store = _check_output(out, expected)
    assert stats["stored"] == len(expected["good"]) and stats["failed"] == len(expected["bad"])
    assert stats["failures_by_kind"] == {"collision": 1, "empty": 1, "not_an_image": 1, "too_large": 1,
                                         "truncated": 1}
    assert stats["complete"] and stats["workers"]["device"] == "cpu" and stats["workers"]["replaced"] == 0
    assert set(stats["stage_seconds"]) == {"commit", "decode", "detect", "write"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["storage"] == storage and manifest["detector"]["preset"] == "demo"
    assert [s["records"] for s in manifest["shards"]].count(5) >= 2  # full shards hold shard_size records

    # The same images through Detector.detect, one at a time (batch 1, as the pipeline on CPU),
    # with the actor's torch thread count: another count may change the last bits of a sum.
    detector = load_detector(preset="demo", device="cpu", **readings)
    assert manifest["detector"]["config_hash"] == detector.config_hash
    threads = torch.get_num_threads()
    torch.set_num_threads(stats["workers"]["threads"])
    try:
        for image_id in expected["good"]:
            path = _file_of(root, image_id, expected)
            direct = detector.detect([decode_file(path)], image_ids=[image_id])[0]
            assert store.get(image_id).equals(direct), image_id
    finally:
        torch.set_num_threads(threads)
    store.close()


@pytest.mark.slow
def test_rerun_skips_done_work_and_refuses_another_detector(ray_session, mixed_folder, tmp_path):
    root, expected = mixed_folder
    out = tmp_path / "features"
    run_extract(root, out, _settings(limit=6))
    first = json.loads((out / "manifest.json").read_text())
    stats = run_extract(root, out, _settings())
    assert stats["resumed"] and stats["already_stored"] + stats["already_failed"] == 6
    store = _check_output(out, expected)
    store.close()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][:len(first["shards"])] == first["shards"]  # finished shards kept as they were
    stats_before = (out / "stats.json").read_bytes()
    again = run_extract(root, out, _settings())
    assert again["nothing_to_do"] and again["stored"] == 0 and again["failed"] == 0
    assert again["already_stored"] == len(expected["good"]) and again["already_failed"] == len(expected["bad"]) - 1
    assert (out / "stats.json").read_bytes() == stats_before  # the run that did the work keeps its figures
    from vlp.schemas import StoreError

    with pytest.raises(StoreError, match="another detector"):
        run_extract(root, out, _settings(overrides={**SMALL, "min_boxes": 12}))
    fresh = run_extract(root, out, _settings(overwrite=True, overrides={**SMALL, "min_boxes": 12}, limit=6))
    # The first six paths: four broken files, dup/a.jpg and odd/animated.gif; plus the collision.
    assert (fresh["stored"], fresh["failed"], fresh["resumed"]) == (2, 5, False)
    assert sorted(FeatureStore(out).keys()) == ["dup/a", "odd/animated"]
    assert len(ErrorLog(out / "errors.jsonl").read()) == 5


def _ancestors(pid: int) -> list[int]:
    """The parent chain of a process (through /proc), nearest first."""
    chain = []
    while pid > 1:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        pid = int(fields[1])  # the field after the state is the parent's pid
        chain.append(pid)
    return chain


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks the actor's parentage through /proc")
def test_a_killed_worker_is_replaced_and_nothing_is_lost_or_duplicated(ray_session, mixed_folder, tmp_path,
                                                                       monkeypatch):
    import vlp.pipeline.extract as extract_module

    root, expected = mixed_folder
    killed = []
    displays = []

    class RecordingProgress(extract_module.Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            displays.append(self)

    monkeypatch.setattr(extract_module, "Progress", RecordingProgress)

    def kill_worker_once(counts):
        if not killed and counts.get("stored", 0) >= 5:  # after its first shard, mid-way through the next
            pids = counts["worker_pids"]  # the run's own workers, as the run reports them
            assert len(pids) == 1
            # Only ever a process of this test's Ray instance: a descendant of this process.
            assert os.getpid() in _ancestors(pids[0])
            assert Path(f"/proc/{pids[0]}/cmdline").read_bytes().startswith(b"ray::DetectorWorker")
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    out = tmp_path / "features"
    stats = run_extract(root, out, _settings(chunk_size=2, shard_size=5), on_progress=kill_worker_once)
    assert killed and stats["workers"]["replaced"] == 1
    # The display counted every image once: partly shown chunks of the dead worker were taken back.
    assert displays[0].done == displays[0].total == len(expected["good"]) + len(expected["bad"]) - 1
    _check_output(out, expected).close()
    assert not list(out.glob("worker-*"))  # the dead worker's unfinished shard is gone


def _wait_for(predicate, timeout: float, what: str, process=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _listed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_exactly_once(mixed_folder, tmp_path):
    root, expected = mixed_folder
    command = VLP_EXTRACT + [str(root), "--out", str(tmp_path / "features"), "--preset", "demo",
                             "--set", "min_size=320", "--set", "max_size=480", "--shard-size", "3",
                             "--chunk-size", "2", "--num-cpus", "2", "--progress", "lines"]
    out = tmp_path / "features"
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _listed_shards(out) >= 2, 240, "two committed shards", process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        process.wait()
    partial = json.loads((out / "manifest.json").read_text())
    assert partial["complete"] is False and 6 <= partial["num_records"] < len(expected["good"])
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "from earlier runs" in rerun.stdout
    _check_output(out, expected).close()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed"] and stats["already_stored"] == partial["num_records"]
    assert stats["already_stored"] + stats["stored"] == len(expected["good"])


@pytest.mark.slow
def test_joins_a_ray_cluster_given_by_address(mixed_folder, tmp_path, ray_head):
    root, expected = mixed_folder
    head = ray_head(num_cpus=2)  # with token authentication, as a real cluster would use it
    out = tmp_path / "features"
    result = subprocess.run(VLP_EXTRACT + [str(root), "--out", str(out), "--preset", "demo",
                                           "--set", "min_size=320", "--set", "max_size=480",
                                           "--address", head.address, "--progress", "off"],
                            capture_output=True, text=True, timeout=600, env=head.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(expected['good'])} images stored" in result.stdout
    _check_output(out, expected).close()
    assert head.process.poll() is None  # the cluster outlives the run: the run did not start it


@pytest.mark.slow
def test_dry_run_counts_and_estimates_without_writing(mixed_folder, tmp_path):
    root, expected = mixed_folder
    out = tmp_path / "features"
    result = subprocess.run(VLP_EXTRACT + [str(root), "--out", str(out), "--preset", "demo", "--dry-run",
                                           "--set", "min_size=320", "--set", "max_size=480"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    total = len(expected["good"]) + len(expected["bad"]) - 1  # the collision is not counted as an image
    assert f"{total} images" in result.stdout
    assert "skipped: dup/a.png: image_id collision" in result.stdout
    assert f"to extract: {total}" in result.stdout and "estimate:" in result.stdout
    assert not out.exists()


def test_cli_errors_are_one_clean_line(tmp_path, mixed_folder):
    root, _ = mixed_folder
    result = subprocess.run(VLP_EXTRACT + [str(root), "--out", str(tmp_path / "f")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: preset 'butd-10-100' needs weights") and "Traceback" not in result.stderr


def test_a_detector_that_cannot_load_stops_the_run_and_leaves_nothing(ray_session, mixed_folder, tmp_path):
    from vlp.detectors.inference import WEIGHTS_DIR
    from vlp.pipeline.extract import ExtractError

    root, _ = mixed_folder
    out = tmp_path / "features"
    # The demo weights do not fit the R101 architecture: every worker would fail to load them.
    settings = ExtractSettings(preset="butd-36", weights=str(WEIGHTS_DIR / "demo-detector.pt"), progress="off")
    with pytest.raises(ExtractError, match="could not be loaded in a worker: .*CheckpointError.*does not match"):
        run_extract(root, out, settings)
    assert not out.exists()
