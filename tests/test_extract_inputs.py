"""vlp-extract on hostile or odd input and odd moments: file names that are not UTF-8,
file lists that point outside the image folder, empty folders, reruns with nothing to do,
Ctrl-C mid-run; plus per-image progress and the workers' niceness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vlp.synthetic.world import image_path as world_image

from vlp.core.errors_log import ErrorLog
from vlp.pipeline.discover import discover
from vlp.schemas import FeatureStore
from vlp.schemas.verify import verify_store

VLP_EXTRACT = [sys.executable, "-c", "from vlp.cli import extract_main; extract_main()"]
SMALL_FLAGS = ["--preset", "demo", "--set", "min_size=320", "--set", "max_size=480", "--set", "extra_min_sizes=[]", "--set", "mirrored_reading=false",
               "--num-cpus", "2"]
BAD_NAME = os.fsdecode(b"bad\xff.jpg")  # the str Python gives for that file name (surrogate escape)


def _copy_world(small_world: Path, folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        source = world_image(small_world, i + 1)
        (folder / source.name).write_bytes(source.read_bytes())
    return [str(i + 1) for i in range(count)]


def _extract(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(VLP_EXTRACT + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


# -- file lists stay inside IMAGES_DIR ---------------------------------------------------


def test_a_file_list_cannot_reach_outside_the_image_folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "1.jpg").write_bytes(b"x")
    (root / "sub" / "2.jpg").write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"x")  # next to the folder, not in it
    os.symlink(tmp_path / "secret.jpg", root / "link-out.jpg")  # a symlink leading out
    os.symlink(root / "1.jpg", root / "link-in.jpg")  # a symlink that stays inside
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([
        "../secret.jpg", "../../../../etc/hostname", "sub/../../secret.jpg", str(tmp_path / "secret.jpg"),
        "/etc/hostname", "link-out.jpg", "link-in.jpg", "sub/../1.jpg", "./sub/2.jpg", str(root / "sub" / "2.jpg"),
        "missing.jpg", "sub"]) + "\n")
    found = discover(root, file_list=listing)
    assert found.paths == ["1.jpg", "link-in.jpg", "sub/2.jpg"]
    refused = dict(found.refused)
    assert list(refused) == ["../secret.jpg", "../../../../etc/hostname", "sub/../../secret.jpg",
                             str(tmp_path / "secret.jpg"), "/etc/hostname", "link-out.jpg"]
    assert "climbs out with '..'" in refused["../secret.jpg"]
    assert "an absolute path outside" in refused["/etc/hostname"]
    assert "symlink whose target is outside" in refused["link-out.jpg"]
    assert found.missing == ["missing.jpg", "sub"]


def test_a_file_list_of_outside_paths_is_one_error_and_writes_nothing(tmp_path, small_world):
    root = tmp_path / "imgs"
    _copy_world(small_world, root, 1)
    listing = tmp_path / "list.txt"
    listing.write_text("../../../../etc/hostname\n/etc/passwd\n")
    out = tmp_path / "features"
    result = _extract(root, "-o", out, "--preset", "demo", "--file-list", listing, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith(f"Error: {listing} names no image file inside {root}")
    assert "../../../../etc/hostname: a path that climbs out with '..'" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


# -- empty or wrong folders -----------------------------------------------------------------


def test_an_empty_folder_is_an_error_and_leaves_no_store(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here\n")
    out = tmp_path / "features"
    result = _extract(empty, "-o", out, "--preset", "demo", timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"Error: no images found under {empty} (looked in every subfolder for files ending in")
    assert " jpg " in first and " png " in first and "webp" in first
    assert "Traceback" not in result.stderr and not out.exists()


# -- names that are not UTF-8; reruns with nothing to do; the workers' niceness -------------------


@pytest.mark.slow
def test_a_name_that_is_not_utf8_is_one_error_line_and_a_rerun_has_nothing_to_do(tmp_path, small_world):
    root = tmp_path / "imgs"
    ids = _copy_world(small_world, root, 3)
    (root / BAD_NAME).write_bytes(world_image(small_world, 4).read_bytes())
    out = tmp_path / "features"
    first = _extract(root, "-o", out, *SMALL_FLAGS, "--progress", "off")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "3 images stored this run, 1 failed" in first.stdout
    errors = ErrorLog(out / "errors.jsonl").read()
    assert errors == [{"path": "bad\\xff.jpg", "image_id": None, "kind": "bad_name",
                       "reason": "the file name is not valid UTF-8, so it cannot be an image_id"}]
    store = FeatureStore(out)
    assert sorted(store.keys()) == ids
    store.close()
    stats_bytes = (out / "stats.json").read_bytes()
    stats = json.loads(stats_bytes)
    assert (stats["stored"], stats["failed"], stats["failures_by_kind"]) == (3, 1, {"bad_name": 1})
    # Workers of a Ray instance started by the run share the driver's niceness (Ray's own default is 15).
    assert stats["workers"]["niceness"] == os.getpriority(os.PRIO_PROCESS, 0)

    again = _extract(root, "-o", out, *SMALL_FLAGS, "--progress", "off", timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip() == f"{out}: nothing to do: 3 images already in the store"
    assert "None" not in again.stdout
    assert (out / "stats.json").read_bytes() == stats_bytes  # the first run's figures are kept
    assert len(ErrorLog(out / "errors.jsonl").read()) == 1  # not logged twice
    assert verify_store(out).ok


# -- Ctrl-C -------------------------------------------------------------------------------------


def _listed_records(out: Path) -> int:
    try:
        return json.loads((out / "manifest.json").read_text())["num_records"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_exits_130_and_the_rerun_finishes_exactly_once(tmp_path, small_world):
    root = tmp_path / "imgs"
    ids = _copy_world(small_world, root, 10)
    out = tmp_path / "features"
    command = VLP_EXTRACT + [str(root), "-o", str(out), *SMALL_FLAGS, "--shard-size", "2", "--chunk-size", "1",
                             "--progress", "lines"]
    # Its own session, like a terminal's foreground job: Ctrl-C sends SIGINT to the whole group.
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 300
        while _listed_records(out) < 2:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever of this run's process group is left
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 130, stdout + stderr
    assert "rerun the same command" in stderr and "Traceback" not in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    listed = sum(shard["records"] for shard in manifest["shards"])
    assert manifest["complete"] is False and stats["complete"] is False and stats["interrupted"] is True
    assert 2 <= listed < len(ids)
    assert stats["already_stored"] + stats["stored"] == listed == manifest["num_records"]
    assert not list(out.glob("worker-*"))

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    store = FeatureStore(out)
    keys = list(store.keys())
    store.close()
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(ids)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["complete"] and stats["already_stored"] == listed and stats["stored"] == len(ids) - listed
    assert verify_store(out).ok


# -- progress per image ---------------------------------------------------------------------------


def test_a_worker_reports_progress_within_a_chunk(small_world, tmp_path, one_torch_thread):
    """The actor's progress() moves after every detector batch, not once per chunk."""
    from vlp.detectors.inference import describe_detector, make_config, prepare_image
    from vlp.core.decode import decode_file
    from vlp.pipeline.extract import DetectorWorker, _Item

    kwargs = dict(weights=None, preset="demo", dtype="float32", allow_random=False, min_size=160, max_size=240,
                  extra_min_sizes=[], mirrored_reading=False)
    config = make_config("demo", min_size=160, max_size=240, extra_min_sizes=[], mirrored_reading=False)
    worker = DetectorWorker(str(tmp_path), "lmdb", 100, "t", kwargs, describe_detector(**kwargs), "cpu", 1, 1)
    seen = []
    detect = worker.detector.detect_prepared

    def spy(prepared, ids, **kw):
        seen.append(worker.progress())
        return detect(prepared, ids, **kw)

    worker.detector.detect_prepared = spy
    items = []
    for i in range(4):
        item = _Item(f"{i + 1}.jpg", str(i + 1))
        item.prepared = prepare_image(decode_file(world_image(small_world, i + 1)), config)
        items.append(item)
    items.append(_Item("broken.jpg", "broken", error=("empty", "empty file")))
    result = worker.process((items, 0.0), 7)
    assert seen == [(7, 1), (7, 2), (7, 3), (7, 4)]  # the refused image counts at once, then one per batch
    assert worker.progress() == (7, 5)
    assert result["stored"] == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"] and len(result["errors"]) == 1
