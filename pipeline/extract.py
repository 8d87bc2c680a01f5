"""``vlp-extract``: region features for a folder of images, on Ray, into a feature store.

How a run flows::

    discover (driver)  ->  decode + resize (Ray CPU tasks, chunks of images)
                       ->  detect + write shards (Ray actors: one per GPU, or CPU actors)
                       ->  adopt finished shards into the store (driver: index + manifest)

* The driver never touches pixels: a decode task's result goes straight to an actor by
  reference. At most ``1 + prefetch`` chunks are queued per actor, so memory stays flat
  however many images there are.
* Each actor writes its own shard file; when it is full (``shard_size`` records) the
  driver renames it into the store and commits it (index, then manifest). An image is
  *stored* exactly when its shard is listed in the manifest.
* Resume: the store is opened for append, so unlisted (torn) shards are deleted; images
  already in the store or already in ``errors.jsonl`` are skipped. A ``kill -9`` at any
  moment therefore loses at most the uncommitted shards' work and never duplicates.
* A worker that dies (or raises) is replaced; the images it held in its unfinished shard
  are redone. The images of the chunk it was on are redone one at a time, so one image
  that kills the detector becomes one line in ``errors.jsonl`` instead of a lost run.
* Stopping (``should_stop``, the CLI's Ctrl-C): no new work is handed out, the workers
  are killed, their unfinished shards dropped; committed shards stay, ``stats.json``
  counts exactly what the manifest lists, and rerunning the same call continues.
* Progress is per image: workers count the images of their current chunk as they go and
  the driver asks them about once a second.
* A local Ray instance is started with worker niceness equal to the driver's own (Ray's
  default, 15, lets any other busy process on the machine starve the detector).

Given boxes (``--boxes FILE``, :func:`read_boxes_file`): a json-lines file names images
(``image``: the path relative to the input root, or ``image_id``) with their boxes (x1, y1,
x2, y2 in original-image pixels); only those images are extracted, each with the
detector's given-box mode (the same RoI head on the boxes instead of proposals: one region
per box, in the given order). The store's manifest records the file (``source.given_boxes``:
name, sha256, images), and a resume with another boxes file is refused. Bad lines and
boxes that do not fit their image become ``errors.jsonl`` entries (kind ``bad_boxes``).

Entry point: :func:`run_extract`; options: :class:`ExtractSettings`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from vlp.core.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_file
from vlp.pipeline.discover import IMAGE_EXTENSIONS, Discovery, discover, display_name, image_id_of
from vlp.core.durable import atomic_write_json
from vlp.core.errors_log import ERRORS_NAME, ErrorLog
from vlp.core.progress import Progress, format_duration
from vlp.schemas.errors import StoreError
from vlp.schemas.manifest import MANIFEST_NAME, read_manifest
from vlp.schemas.record import SCHEMA_VERSION
from vlp.schemas.store import FEATURE_SHARD_SIZE, FEATURES_FORMAT, INDEX_NAME

log = logging.getLogger(__name__)

STATS_NAME = "stats.json"
WORKER_PREFIX = "worker-"
PROGRESS_GROUP = "progress"  # the actors' second thread: answers "how far is your chunk?" while it runs
POLL_SECONDS = 1.0  # how often the driver asks the workers how far they are
LINE_SECONDS = 5.0  # --progress lines: at most one line per this many seconds


class ExtractError(RuntimeError):
    """The run cannot go on (workers keep dying, the output belongs to another detector, ...)."""


@dataclasses.dataclass
class ExtractSettings:
    # the detector
    preset: str = "butd-10-100"
    weights: Optional[str] = None
    overrides: dict = dataclasses.field(default_factory=dict)  # any DetectorConfig field
    device: str = "auto"  # auto: CUDA actors when the Ray cluster has GPUs, else CPU
    dtype: str = "float32"
    batch_size: Optional[int] = None  # images per forward pass (default: 8 on GPU, 1 on CPU)
    allow_random_weights: bool = False  # tests and benchmarks only
    # the output
    storage: str = "lmdb"
    shard_size: int = FEATURE_SHARD_SIZE
    overwrite: bool = False
    # the input
    file_list: Optional[str] = None
    boxes: Optional[str] = None  # json lines {image or image_id, boxes}: given-box mode for those images
    glob: Optional[str] = None
    limit: Optional[int] = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    # execution
    address: Optional[str] = None  # join this Ray cluster ("auto", "host:port"); None: start one
    num_cpus: Optional[int] = None  # for a Ray instance started here
    workers: Optional[int] = None  # detector actors (default: one per GPU; CPU: 1 per 8 CPUs)
    gpus_per_worker: float = 1.0
    threads_per_worker: Optional[int] = None  # torch threads of a CPU actor (default: CPUs / workers)
    chunk_size: int = 16  # images per decode task
    prefetch: int = 2  # chunks waiting per actor besides the one it runs
    max_worker_failures: int = 8  # replacements before the run gives up
    worker_niceness: Optional[int] = None  # of the Ray workers (None: the driver's own; Ray's default is 15)
    progress: str = "auto"  # auto | bar | lines | off

    def detector_kwargs(self) -> dict:
        return dict(weights=self.weights, preset=self.preset, dtype=self.dtype,
                    allow_random=self.allow_random_weights, **self.overrides)


# -- Ray task and actor -----------------------------------------------------------------


@dataclasses.dataclass
class _Item:
    """One image travelling through the pipeline."""

    path: str  # relative to the input root
    image_id: str
    prepared: object = None  # PreparedImage once decoded
    boxes: object = None  # given boxes (list of [x1, y1, x2, y2]) or None: detect
    error: Optional[tuple] = None  # (kind, reason)


def decode_chunk(root: str, paths: list, config, max_pixels: int, boxes: Optional[dict] = None):
    """Decode and resize a chunk of images (a Ray task); failures become per-item errors.
    ``boxes``: relative path -> given boxes (checked against the decoded image's size)."""
    from vlp.detectors.inference import one_reading, prepare_image

    if boxes is not None:
        config = one_reading(config)
    start = time.perf_counter()
    items = []
    for relative in paths:
        item = _Item(relative, image_id_of(relative))
        try:
            image = decode_file(os.path.join(root, relative), max_pixels=max_pixels)
            if boxes is not None:
                item.boxes = boxes[relative]
                problem = boxes_outside(item.boxes, image.shape[1], image.shape[0])
                if problem:
                    item.error = ("bad_boxes", problem)
                    items.append(item)
                    continue
            item.prepared = prepare_image(image, config)
        except DecodeError as exc:
            item.error = (exc.kind, str(exc))
        except ValueError as exc:  # prepare_image: too elongated to run
            item.error = ("unusable_shape", str(exc))
        items.append(item)
    return items, time.perf_counter() - start


class DetectorWorker:
    """A Ray actor: runs the detector on decoded chunks and writes its own shard files."""

    def __init__(self, out_dir: str, storage: str, shard_size: int, token: str, detector_kwargs: dict,
                 expected: dict, device: str, batch_size: Optional[int], threads: Optional[int],
                 niceness: Optional[int] = None):
        import torch

        from vlp.detectors import load_detector

        if niceness is not None and os.getpriority(os.PRIO_PROCESS, 0) > niceness:
            try:  # a cluster started with Ray's default worker niceness (15); lowering it needs privileges
                os.setpriority(os.PRIO_PROCESS, 0, niceness)
            except OSError:
                pass
        self.threads = int(threads) if threads else None
        if self.threads:
            torch.set_num_threads(self.threads)
        self.detector = load_detector(device=device, batch_size=batch_size, **detector_kwargs)
        if self.detector.describe() != expected:
            raise ExtractError("the worker's detector differs from the driver's description "
                               f"({self.detector.describe()['config_hash']} vs {expected['config_hash']})")
        self.out_dir, self.storage, self.shard_size, self.token = Path(out_dir), storage, shard_size, token
        self._shard = None
        self._seq = 0
        self._progress = (None, 0)  # (call number, images of that call done so far)

    def info(self) -> dict:
        return {"pid": os.getpid(), "niceness": os.getpriority(os.PRIO_PROCESS, 0)}

    def progress(self) -> tuple:
        """(call, images done) of the chunk being processed; runs on the progress thread."""
        return self._progress

    def _open_shard(self, fields):
        from vlp.schemas.shards import SUFFIXES, ArrowShardWriter, LmdbShardWriter

        path = self.out_dir / f"{WORKER_PREFIX}{self.token}-{self._seq:04d}{SUFFIXES[self.storage]}"
        self._seq += 1
        if self.storage == "lmdb":
            return LmdbShardWriter(path)
        return ArrowShardWriter(path, fields, self.detector.feature_dim)

    def _close_shard(self) -> Optional[tuple]:
        if self._shard is None:
            return None
        shard, self._shard = self._shard, None
        info = shard.close()
        return str(shard.path), info, self._fields

    def _detect(self, ready: list, call) -> list:
        """detect_prepared on the chunk, one detector batch at a time (the same batches it
        would form itself: aspect-ratio order, batch_size each) so progress moves per batch."""
        done = self._progress[1]
        size = max(1, int(self.detector.batch_size))
        aspects = [item.prepared.original_size[0] / item.prepared.original_size[1] for item in ready]
        order = sorted(range(len(ready)), key=lambda i: (aspects[i], i))
        records = [None] * len(ready)
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            if ready[batch[0]].boxes is not None:
                found = _given_box_records(self.detector, [ready[i] for i in batch])
            else:
                found = self.detector.detect_prepared([ready[i].prepared for i in batch],
                                                      [ready[i].image_id for i in batch], batch_size=size)
            for i, record in zip(batch, found):
                records[i] = record
            done += len(batch)
            self._progress = (call, done)
        return records

    def process(self, decoded, call=None) -> dict:
        import torch

        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # methods run on the actor's worker thread, not __init__'s
        items, decode_s = decoded
        ready = [item for item in items if item.error is None]
        self._progress = (call, len(items) - len(ready))  # refused images are done at once
        start = time.perf_counter()
        records = self._detect(ready, call) if ready else []
        detect_s = time.perf_counter() - start
        finished = []
        for record in records:
            if self._shard is None:
                self._fields = record.present_fields()
                self._shard = self._open_shard(self._fields)
            self._shard.add(record)
            if len(self._shard) >= self.shard_size:
                finished.append(self._close_shard())
        write_s = time.perf_counter() - start - detect_s
        return {"stored": [item.path for item in ready],
                "errors": [(item.path, item.image_id) + item.error for item in items if item.error],
                "finished": finished,
                "seconds": {"decode": decode_s, "detect": detect_s, "write": write_s}}

    def finish(self) -> Optional[tuple]:
        return self._close_shard()


def _given_box_records(detector, items: list) -> list:
    """The detector's given-box mode (:meth:`Detector.features_for_boxes`) on prepared images:
    one batch, each image's boxes scaled to the network's size; records keep the boxes as given."""
    import numpy as np
    import torch

    given, scaled = [], []
    for item in items:
        boxes = np.asarray(item.boxes, dtype=np.float32).reshape(-1, 4)
        sx, sy = item.prepared.scale
        given.append(boxes)
        scaled.append(torch.from_numpy(boxes) * torch.tensor([sx, sy, sx, sy], dtype=torch.float32))
    outs = detector._detect_prepared([item.prepared for item in items], given_boxes=scaled)
    return [detector._record(item.image_id, item.prepared, out, with_probs=None, given=boxes)
            for item, out, boxes in zip(items, outs, given)]


# -- given boxes ----------------------------------------------------------------------------


def boxes_outside(boxes, width: int, height: int) -> Optional[str]:
    """Why ``boxes`` do not fit a ``width`` x ``height`` image (None when they do)."""
    from vlp.schemas.record import BOX_BORDER_TOLERANCE

    tol = BOX_BORDER_TOLERANCE
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            return f"box {k} [{x1:g}, {y1:g}, {x2:g}, {y2:g}] extends outside the {width}x{height} image"
    return None


def _box_list(value) -> Optional[str]:
    """Why ``value`` is not a usable list of boxes (None when it is)."""
    import math

    from vlp.schemas.record import MAX_BOXES

    if not isinstance(value, list) or not 1 <= len(value) <= MAX_BOXES:
        return f"'boxes' must be a list of 1 to {MAX_BOXES} boxes [x1, y1, x2, y2]"
    for k, box in enumerate(value):
        if (not isinstance(box, list) or len(box) != 4 or
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            return f"box {k} is not four finite numbers [x1, y1, x2, y2]"
        if box[2] < box[0] or box[3] < box[1]:
            return f"box {k} {box} has x2 < x1 or y2 < y1"
    return None


def read_boxes_file(path, found: Discovery) -> tuple[dict, list, dict]:
    """``(boxes, errors, info)`` of a ``--boxes`` json-lines file against the discovered images.

    boxes: relative path -> list of [x1, y1, x2, y2]; errors: (path, image_id, kind, reason)
    entries for lines that cannot be used (``FILE:LINE`` as path, kind ``bad_boxes``, or
    ``missing`` for an image that is not under the root); info: what the manifest records.
    """
    import hashlib

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExtractError(f"{path}: cannot read the boxes file ({exc.strerror or exc})") from None
    by_id = {image_id_of(p): p for p in found.paths}
    known = set(found.paths)
    boxes, errors = {}, []
    name = display_name(str(path))
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"{name}:{number}"
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            errors.append((where, None, "bad_boxes", f"not a JSON line ({type(exc).__name__})"))
            continue
        if not isinstance(row, dict):
            errors.append((where, None, "bad_boxes", "expected a JSON object {image or image_id, boxes}"))
            continue
        image, image_id = row.get("image"), row.get("image_id")
        if isinstance(image, str) and image.strip():
            relative = image.strip()
            relative = relative[2:] if relative.startswith("./") else relative
        elif isinstance(image_id, (str, int)) and not isinstance(image_id, bool) and str(image_id).strip():
            relative = by_id.get(str(image_id).strip())
            if relative is None:
                errors.append((where, str(image_id), "missing", f"image_id {str(image_id)!r} is not an image under "
                               "the input folder"))
                continue
        else:
            errors.append((where, None, "bad_boxes", "no 'image' (a relative path) or 'image_id'"))
            continue
        if relative not in known:
            errors.append((where, None, "missing", f"{relative!r} is not an image under the input folder"))
            continue
        problem = _box_list(row.get("boxes"))
        if problem:
            errors.append((where, image_id_of(relative), "bad_boxes", problem))
            continue
        if relative in boxes:
            errors.append((where, image_id_of(relative), "bad_boxes", f"{relative} has boxes on an earlier line"))
            continue
        boxes[relative] = [[float(v) for v in box] for box in row["boxes"]]
    info = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "images": len(boxes)}
    return boxes, errors, info


def _check_given_boxes(out: Path, info: Optional[dict]) -> None:
    """A store keeps one kind of regions: refuse to continue it with other (or no) given boxes."""
    if not (out / MANIFEST_NAME).is_file():
        return
    old = (read_manifest(out, FEATURES_FORMAT, (SCHEMA_VERSION,)).get("source") or {}).get("given_boxes")
    if (old or {}).get("sha256") != (info or {}).get("sha256"):
        said = lambda d: f"given boxes {d['file']} (sha256 {d['sha256'][:12]})" if d else "detected boxes"  # noqa: E731
        raise StoreError(f"{out} holds features of {said(old)}; this run uses {said(info)}. Write to another "
                         "folder, or pass --overwrite to replace them.")


# -- the driver ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
    handle: object
    token: str
    info: object = None  # ref to the actor's info() ({"pid", "niceness"}), resolved when needed
    # path -> whether its chunk has come back (and was counted); every image sent since its last shard
    uncommitted: dict = dataclasses.field(default_factory=dict)
    in_flight: int = 0
    shown: dict = dataclasses.field(default_factory=dict)  # call number -> images of it already shown
    polling: bool = False


class _Run:
    def __init__(self, images_dir: Path, out: Path, settings: ExtractSettings, description: dict,
                 writer, progress: Progress, on_progress, should_stop):
        self.root, self.out, self.settings = images_dir, out, settings
        self.description, self.writer = description, writer
        self.progress, self.on_progress = progress, on_progress
        self.should_stop = should_stop or (lambda: False)
        self.errors = ErrorLog(out / ERRORS_NAME)
        self.stats = collections.Counter()
        self.failures_by_kind = collections.Counter()
        self.stage_seconds = collections.Counter()
        self.attempts: dict[str, int] = {}  # path -> times a worker failed on a chunk holding it
        self.worker_failures = 0
        self.worker_pids: Callable[[], list] = lambda: []
        self.boxes: Optional[dict] = None  # --boxes: relative path -> given boxes
        self.niceness = None

    # -- bookkeeping -------------------------------------------------------------------

    def log_error(self, path: str, image_id: Optional[str], kind: str, reason: str) -> None:
        self.errors.add({"path": path, "image_id": image_id, "kind": kind, "reason": reason})
        self.failures_by_kind[kind] += 1
        self.stats["failed"] += 1

    def adopt(self, worker: _Worker, finished) -> None:
        path, info, fields = finished
        if self.writer.fields is None:
            self.writer.fields = tuple(fields)
        self.errors.sync()  # errors of this shard's chunks are on disk before it counts as done
        start = time.perf_counter()
        self.writer.adopt(path, info)
        self.stage_seconds["commit"] += time.perf_counter() - start
        stored = set(info.keys)
        for relative in [p for p in worker.uncommitted if image_id_of(p) in stored]:
            del worker.uncommitted[relative]
        self.stats["stored"] += info.records

    def show(self, count: int) -> None:
        """Move the progress display by ``count`` images (partial chunks included)."""
        if count:
            self.progress.update(count, failed=self.stats["failed"])

    def report(self, count: int, shown: int = 0) -> None:
        """``count`` images came back from a worker (a negative count: they must be redone);
        ``shown`` of them were already on the display."""
        self.stats["processed"] += count
        self.show(count - shown)
        if self.on_progress is not None:
            self.on_progress({**self.stats, "worker_pids": self.worker_pids()})


def _ray_init(settings: ExtractSettings):
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
    if settings.address:
        ray.init(address=settings.address, **kwargs)
    else:
        # Ray runs its workers at niceness 15: on a machine where anything else is busy they would
        # get a sliver of the CPU. Ours run at the driver's own niceness (`nice vlp-extract` still works).
        ray.init(num_cpus=settings.num_cpus, _system_config={"worker_niceness": _niceness(settings)}, **kwargs)
    return True


def _niceness(settings: ExtractSettings) -> int:
    if settings.worker_niceness is not None:
        return int(settings.worker_niceness)
    return os.getpriority(os.PRIO_PROCESS, 0)


def _plan_workers(settings: ExtractSettings) -> dict:
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    device = settings.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device.startswith("cuda"):
        if gpus <= 0:
            raise ExtractError("--device cuda, but the Ray cluster has no GPU")
        per = settings.gpus_per_worker
        workers = settings.workers or max(1, int(gpus / per + 1e-9))
        if workers >= cpus:
            raise ExtractError(f"{workers} GPU workers need {workers} CPUs and the cluster has {cpus}; "
                               "none would be left for decoding")
        return dict(device=device, workers=workers, options=dict(num_gpus=per, num_cpus=1),
                    threads=settings.threads_per_worker, cpus=cpus, gpus=gpus)
    workers = settings.workers or max(1, cpus // 8)
    if workers >= cpus:
        raise ExtractError(f"{workers} CPU detector workers on a Ray cluster with {cpus} CPUs leave none for "
                           "decoding; use fewer --workers")
    threads = settings.threads_per_worker or max(1, cpus // workers)
    return dict(device="cpu", workers=workers, options=dict(num_cpus=1), threads=threads, cpus=cpus, gpus=gpus)


def _check_detector_matches(out: Path, description: dict) -> None:
    if not (out / MANIFEST_NAME).is_file():
        return
    old = read_manifest(out, FEATURES_FORMAT, (SCHEMA_VERSION,)).get("detector") or {}
    if old.get("config_hash") != description["config_hash"] or old.get("weights_sha256") != description["weights_sha256"]:
        def said(d):
            return (f"preset {d.get('preset')!r}, config {str(d.get('config_hash'))[:12]}, "
                    f"weights {str(d.get('weights_sha256'))[:12]}")
        raise StoreError(f"{out} holds features of another detector ({said(old)}); this run uses "
                         f"{said(description)}. Write to another folder, or pass --overwrite to replace them.")


def _remove_worker_files(out: Path) -> None:
    for path in out.glob(f"{WORKER_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _remove_created(paths: list) -> None:
    for path in reversed(paths):  # files first, the folder (when this run made it) last
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)


def _discover(images_dir: Path, settings: ExtractSettings) -> Discovery:
    """discover(), and an ExtractError when there is nothing to extract at all (an empty or
    wrong folder, a glob that matches nothing, a file list that names nothing usable)."""
    found = discover(images_dir, file_list=settings.file_list, glob=settings.glob, limit=settings.limit)
    if found.paths:
        return found
    where = display_name(str(images_dir))
    if settings.file_list is not None:
        listed = len(found.refused) + len(found.missing) + len(found.skipped)
        why = [f"{len(found.refused)} refused (first: {found.refused[0][0]}: {found.refused[0][1]})"
               if found.refused else "",
               f"{len(found.missing)} missing (first: {found.missing[0]})" if found.missing else "",
               f"{len(found.skipped)} set aside (first: {found.skipped[0][0]}: {found.skipped[0][1]})"
               if found.skipped else ""]
        detail = "; ".join(w for w in why if w)
        raise ExtractError(f"{display_name(str(settings.file_list))} names no image file inside {where}"
                           + (f" ({listed} entries: {detail})" if listed else " (it lists no paths)")
                           + (f" matching --glob {settings.glob!r}" if settings.glob else ""))
    message = (f"no images found under {where} (looked in every subfolder for files ending in "
               f"{' '.join(sorted(e.lstrip('.') for e in IMAGE_EXTENSIONS))}, any case"
               + (f", matching --glob {settings.glob!r}" if settings.glob else "") + ")")
    if found.skipped:
        path, reason = found.skipped[0]
        message += f"; {len(found.skipped)} file(s) set aside (first: {path}: {reason})"
    raise ExtractError(message)


def _setaside_errors(found: Discovery) -> list:
    """errors.jsonl entries for what discovery set aside: (path, image_id, kind, reason)."""
    entries = []
    for relative, reason in found.skipped:
        if reason.startswith("image_id collision"):
            entries.append((relative, image_id_of(relative), "collision", reason))
        else:  # the display form of a name that is not UTF-8: it has no image_id
            entries.append((relative, None, "bad_name", reason))
    for entry, reason in found.refused:
        entries.append((entry, None, "outside_root", f"--file-list entry refused: {reason}"))
    return entries


def dry_run(images_dir, out, settings: ExtractSettings, *, sample: int = 2) -> dict:
    """What a run would do: counts, bytes, what is already done, and a time estimate from
    running the detector here on a few images."""
    from vlp.detectors import load_detector
    from vlp.schemas import FeatureStore

    images_dir, out = Path(images_dir), Path(out)
    found = _discover(images_dir, settings)
    done_ids, failed = set(), set()
    if (out / MANIFEST_NAME).is_file() and not settings.overwrite:
        store = FeatureStore(out, warn=False)
        done_ids = {p for p in found.paths if image_id_of(p) in store}
        store.close()
        failed = {e.get("path") for e in ErrorLog(out / ERRORS_NAME).read()}
    todo = [p for p in found.paths if p not in done_ids and p not in failed]
    estimate = None
    if todo:
        detector = load_detector(device=settings.device, batch_size=settings.batch_size,
                                 **settings.detector_kwargs())
        seconds = []
        for relative in todo[:50]:  # the first sample + 1 decodable images
            if len(seconds) > sample:
                break
            try:
                image = decode_file(images_dir / relative, max_pixels=settings.max_pixels)
            except DecodeError:
                continue
            start = time.perf_counter()
            detector.detect([image])
            seconds.append(time.perf_counter() - start)
        if seconds:
            timed = seconds[1:] or seconds  # the first call also warms up: left out when there are others
            per_image = sum(timed) / len(timed)
            estimate = {"seconds_per_image_one_worker": per_image,
                        "seconds_one_worker": per_image * len(todo), "device": str(detector.device)}
    return {"images": len(found), "bytes": found.total_bytes(), "skipped_files": found.skipped,
            "symlink_loops": found.loops, "missing": found.missing, "refused": found.refused,
            "already_stored": len(done_ids), "already_failed": len(failed & set(found.paths)),
            "to_do": len(todo), "estimate": estimate}


def run_extract(images_dir, out, settings: Optional[ExtractSettings] = None, *,
                on_progress: Optional[Callable[[dict], None]] = None,
                should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """Extract features for every image under ``images_dir`` into the store at ``out``.

    Rerunning the same call continues an interrupted run. Returns the stats dict that is
    also written to ``out/stats.json``; when there was nothing left to do, ``stats.json``
    keeps the figures of the run that did the work and the result says
    ``"nothing_to_do": True``. ``on_progress(counts)`` is called after every chunk with
    the counts and ``worker_pids`` (tests use it to inject faults at a chosen moment).
    ``should_stop()`` is asked about once a second; when it says yes the run stops
    cleanly (committed shards kept, the store left incomplete, ``"interrupted": True``).

    Raises ExtractError when no image is found (nothing is written then).
    """
    import ray

    from vlp.detectors.inference import describe_detector
    from vlp.schemas import FeatureStoreWriter

    settings = settings or ExtractSettings()
    images_dir, out = Path(images_dir), Path(out)
    wall_start = time.perf_counter()
    description = describe_detector(**settings.detector_kwargs())
    found = _discover(images_dir, settings)
    given, box_errors, box_info = None, [], None
    if settings.boxes is not None:
        given, box_errors, box_info = read_boxes_file(settings.boxes, found)
        found = dataclasses.replace(found, paths=[p for p in found.paths if p in given])
    if settings.overwrite:
        if (out / MANIFEST_NAME).is_file():
            shutil.rmtree(out)
        else:
            for name in (ERRORS_NAME, STATS_NAME):
                (out / name).unlink(missing_ok=True)
    else:
        _check_detector_matches(out, description)
        _check_given_boxes(out, box_info)
    resumed = (out / MANIFEST_NAME).is_file() or (out / ERRORS_NAME).is_file()
    created = [] if resumed else [p for p in (out, out / ERRORS_NAME, out / STATS_NAME, out / INDEX_NAME,
                                                out / MANIFEST_NAME) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    writer = FeatureStoreWriter(out, storage=settings.storage, shard_size=settings.shard_size,
                                feature_dim=description["feature_dim"], detector=description, mode="append",
                                extra={"source": {"kind": "extract",
                                                  "images_dir": display_name(str(images_dir.resolve())),
                                                  **({"given_boxes": box_info} if box_info else {})}})
    records_at_start = sum(s.records for s in writer.shards)
    _remove_worker_files(out)
    logged = {entry.get("path") for entry in ErrorLog(out / ERRORS_NAME).read()}
    already_stored = sum(1 for p in found.paths if image_id_of(p) in writer)
    already_failed = sum(1 for p in found.paths if p in logged)
    todo = [p for p in found.paths if p not in logged and image_id_of(p) not in writer]
    progress = Progress(len(found.paths), "extract", mode=settings.progress if todo else "off",
                        initial=already_stored + already_failed, every_s=LINE_SECONDS)
    run = _Run(images_dir, out, settings, description, writer, progress, on_progress, should_stop)
    run.boxes = given
    for path, image_id, kind, reason in _setaside_errors(found) + box_errors:
        if path not in logged:
            run.log_error(path, image_id, kind, reason)

    if not todo:  # everything is stored or failed already: no Ray, and the earlier run's stats stay
        run.errors.close()
        writer.close(complete=True)
        return _nothing_to_do(run, found, already_stored, already_failed, wall_start)

    started_ray = False
    workers: list[_Worker] = []
    plan = {}
    interrupted = None
    stopped = False
    try:
        started_ray = _ray_init(settings)
        plan = _plan_workers(settings)
        stopped = _Driver(run, iter(todo), plan, workers).drive()
    except BaseException as exc:
        interrupted = exc
        raise
    finally:
        for worker in workers:
            ray.kill(worker.handle, no_restart=True)
        run.errors.close()
        complete = interrupted is None and not stopped
        if complete:
            writer.close(complete=True)
        else:
            writer.abort()
        _remove_worker_files(out)
        if started_ray:
            ray.shutdown()
        wall = time.perf_counter() - wall_start
        # stored = what the manifest lists beyond what it listed at the start, whatever the moment of the stop
        stored = sum(s.records for s in writer.shards) - records_at_start
        stats = _stats(run, found, plan, wall, stored, already_stored, already_failed, resumed, complete)
        stats["interrupted"] = stopped or isinstance(interrupted, KeyboardInterrupt)
        if not complete and created and stored == 0:
            _remove_created(created)  # a run that stopped before storing anything leaves no trace
        else:
            atomic_write_json(out / STATS_NAME, stats)
        progress.close(None if complete else
                       f"extract: stopped ({'interrupted' if stats['interrupted'] else type(interrupted).__name__})"
                       "; rerun the same command to continue")
    return stats


def _nothing_to_do(run: _Run, found: Discovery, already_stored: int, already_failed: int, wall_start) -> dict:
    """The result of a run that found everything done; stats.json keeps the earlier run's
    figures (only ``complete`` follows the manifest, which this call marks complete)."""
    path = run.out / STATS_NAME
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict):
        earlier = _stats(run, found, {}, time.perf_counter() - wall_start, 0, already_stored, already_failed,
                         True, True)
        atomic_write_json(path, earlier)
    elif earlier.get("complete") is not True:
        atomic_write_json(path, {**earlier, "complete": True})
    return {"nothing_to_do": True, "complete": True, "interrupted": False, "resumed": True,
            "images_found": len(found.paths) + len(found.skipped), "already_stored": already_stored,
            "already_failed": already_failed, "stored": 0, "failed": run.stats["failed"],
            "failures_by_kind": dict(sorted(run.failures_by_kind.items())),
            "wall_seconds": round(time.perf_counter() - wall_start, 3)}


class _Driver:
    """Keeps every actor fed with chunks, adopts finished shards, replaces failed workers."""

    def __init__(self, run: _Run, todo, plan: dict, workers: list):
        import ray

        from vlp.detectors import make_config

        settings = run.settings
        self.run, self.plan, self.workers, self.todo = run, plan, workers, todo
        self.config = ray.put(make_config(settings.preset, dtype=settings.dtype, **settings.overrides))
        self.decode = ray.remote(num_cpus=1, max_retries=0)(decode_chunk)
        self.actor_class = ray.remote(max_restarts=0, max_task_retries=0,
                                      concurrency_groups={PROGRESS_GROUP: 1})(DetectorWorker)
        self.root = str(run.root.resolve())
        self.pending: dict = {}  # result ref -> (worker, chunk, call number)
        self.polls: dict = {}  # progress ref -> worker
        self.redo: collections.deque = collections.deque()  # images of a replaced worker's unfinished shard
        self.isolate: collections.deque = collections.deque()  # images a worker failed on: one per chunk
        self.todo_done = False
        self.limit = 1 + max(0, settings.prefetch)
        self.calls = 0
        self.last_poll = time.monotonic()
        run.worker_pids = self.worker_pids

    def worker_pids(self) -> list:
        """The process ids of the live workers (a worker that failed to start is left out)."""
        import ray
        from ray.exceptions import RayError

        pids = []
        for worker in self.workers:
            try:
                pids.append(ray.get(worker.info)["pid"])
            except RayError:
                pass
        return pids

    def start_worker(self) -> _Worker:
        settings = self.run.settings
        token = secrets.token_hex(4)
        handle = self.actor_class.options(**self.plan["options"]).remote(
            str(self.run.out.resolve()), settings.storage, settings.shard_size, token, settings.detector_kwargs(),
            self.run.description, self.plan["device"], settings.batch_size, self.plan["threads"],
            _niceness(settings))
        return _Worker(handle, token, handle.info.remote())

    def next_chunk(self) -> Optional[list]:
        if self.isolate:
            return [self.isolate.popleft()]
        size = max(1, self.run.settings.chunk_size)
        chunk = []
        while self.redo and len(chunk) < size:
            chunk.append(self.redo.popleft())
        while not self.todo_done and len(chunk) < size:
            relative = next(self.todo, None)
            if relative is None:
                self.todo_done = True
            else:
                chunk.append(relative)
        return chunk or None

    def fill(self) -> None:
        settings = self.run.settings
        for worker in self.workers:
            while worker.in_flight < self.limit:
                chunk = self.next_chunk()
                if chunk is None:
                    return
                given = None if self.run.boxes is None else {p: self.run.boxes[p] for p in chunk}
                decoded = self.decode.remote(self.root, chunk, self.config, settings.max_pixels, given)
                self.calls += 1
                self.pending[worker.handle.process.remote(decoded, self.calls)] = (worker, chunk, self.calls)
                worker.in_flight += 1
                for relative in chunk:
                    worker.uncommitted[relative] = False  # True once its chunk is reported

    def poll(self) -> None:
        """Ask each busy worker how far its current chunk is (answers arrive in drive())."""
        now = time.monotonic()
        if now - self.last_poll < POLL_SECONDS:
            return
        self.last_poll = now
        for worker in self.workers:
            if worker.in_flight and not worker.polling:
                ref = worker.handle.progress.options(concurrency_group=PROGRESS_GROUP).remote()
                self.polls[ref] = worker
                worker.polling = True

    def polled(self, ref) -> None:
        import ray
        from ray.exceptions import RayError

        worker = self.polls.pop(ref)
        worker.polling = False
        try:
            call, done = ray.get(ref)
        except RayError:
            return  # a dead worker: its chunk's result says so
        if not any(w is worker for w in self.workers) or \
                not any(c == call for w, _, c in self.pending.values() if w is worker):
            return  # that chunk came back meanwhile (or the worker was replaced)
        shown = worker.shown.get(call, 0)
        if done > shown:
            worker.shown[call] = done
            self.run.show(done - shown)

    def replace(self, worker: _Worker, failed_chunk: list, why: str) -> None:
        import ray

        run = self.run
        run.worker_failures += 1
        if run.worker_failures > run.settings.max_worker_failures:
            raise ExtractError(f"detector workers failed {run.worker_failures} times (last: {why}); giving up. "
                               "Finished shards are kept: fix the cause and rerun the same command.")
        log.warning("detector worker %s failed (%s); replacing it and redoing its %d unfinished images",
                    worker.token, why, len(worker.uncommitted))
        ray.kill(worker.handle, no_restart=True)
        for ref in [r for r, (w, _, _) in self.pending.items() if w is worker]:
            del self.pending[ref]
        run.show(-sum(worker.shown.values()))  # partly shown chunks that will not come back
        worker.shown.clear()
        suspects = set(failed_chunk)
        reported = 0
        for relative, was_reported in worker.uncommitted.items():
            reported += was_reported
            if relative not in suspects:
                self.redo.append(relative)
                continue
            attempts = run.attempts[relative] = run.attempts.get(relative, 0) + 1
            if attempts >= 2:
                run.log_error(relative, image_id_of(relative), "worker_failed",
                              f"the detector worker failed twice on this image alone ({why})")
                run.report(1)
            else:
                self.isolate.append(relative)
        if reported:
            run.report(-reported)
        self.workers[self.workers.index(worker)] = self.start_worker()

    def drive(self) -> bool:
        """Run until every image is stored or failed (False), or should_stop() said yes (True)."""
        import ray
        from ray.exceptions import RayActorError, RayError

        run = self.run
        self.workers.extend(self.start_worker() for _ in range(self.plan["workers"]))
        try:  # a detector that cannot load (wrong checkpoint, no GPU memory) stops the run at once
            infos = ray.get([worker.info for worker in self.workers])
        except RayActorError as exc:
            raise ExtractError(f"the detector could not be loaded in a worker: {_error_text(exc)}") from None
        run.niceness = infos[0]["niceness"]
        while True:
            if run.should_stop():
                return True
            self.fill()
            while self.pending:
                ready, _ = ray.wait(list(self.pending) + list(self.polls), num_returns=1, timeout=POLL_SECONDS)
                if run.should_stop():
                    return True
                self.poll()
                if not ready:
                    continue
                if ready[0] in self.polls:
                    self.polled(ready[0])
                    continue
                worker, chunk, call = self.pending.pop(ready[0])
                worker.in_flight -= 1
                try:
                    result = ray.get(ready[0])
                except RayError as exc:
                    self.replace(worker, chunk, _why(exc, RayActorError))
                    self.fill()
                    continue
                for relative, image_id, kind, reason in result["errors"]:
                    run.log_error(relative, image_id, kind, reason)
                    worker.uncommitted.pop(relative, None)
                for relative in chunk:
                    if relative in worker.uncommitted:
                        worker.uncommitted[relative] = True
                for name, seconds in result["seconds"].items():
                    run.stage_seconds[name] += seconds
                for finished in result["finished"]:
                    run.adopt(worker, finished)
                run.report(len(chunk), worker.shown.pop(call, 0))
                self.fill()
            # No work left: each worker hands in its last, partly filled shard.
            for worker in list(self.workers):
                if run.should_stop():
                    return True
                try:
                    finished = ray.get(worker.handle.finish.remote())
                except RayError as exc:
                    self.replace(worker, [], _why(exc, RayActorError))
                    continue
                if finished is not None:
                    run.adopt(worker, finished)
            if not (self.redo or self.isolate):
                return False


def _error_text(exc) -> str:
    """The exception at the end of a Ray error's traceback text ("CheckpointError: ...")."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*:", lines[i]):
            return "\n".join(lines[i:])
    return lines[-1] if lines else type(exc).__name__


def _why(exc, actor_error) -> str:
    if isinstance(exc, actor_error):
        return "the worker process died" + (f": {_error_text(exc)}" if "creation task" in str(exc) else "")
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1][:200] if text else ''}"


def _stats(run: _Run, found: Discovery, plan: dict, wall: float, stored: int, already_stored: int,
           already_failed: int, resumed: bool, complete: bool) -> dict:
    processed = stored + run.stats["failed"]
    return {
        "complete": complete,
        "resumed": resumed,
        "images_found": len(found.paths) + len(found.skipped),
        "already_stored": already_stored,
        "already_failed": already_failed,
        "stored": stored,
        "failed": run.stats["failed"],
        "failures_by_kind": dict(sorted(run.failures_by_kind.items())),
        "errors_file": ERRORS_NAME if (run.out / ERRORS_NAME).is_file() else None,
        "wall_seconds": round(wall, 3),
        "images_per_second": round(processed / wall, 3) if wall > 0 else None,
        "stage_seconds": {k: round(v, 3) for k, v in sorted(run.stage_seconds.items())},
        "workers": {"count": plan.get("workers"), "device": plan.get("device"),
                    "threads": plan.get("threads"), "niceness": run.niceness, "replaced": run.worker_failures,
                    "cluster_cpus": plan.get("cpus"), "cluster_gpus": plan.get("gpus")},
        "settings": {"storage": run.settings.storage, "shard_size": run.settings.shard_size,
                     "chunk_size": run.settings.chunk_size, "prefetch": run.settings.prefetch,
                     "batch_size": run.settings.batch_size, "max_pixels": run.settings.max_pixels},
        "detector": {k: run.description[k] for k in ("preset", "config_hash", "weights_sha256", "feature_dim")},
        "symlink_loops": found.loops,
        "missing_from_file_list": found.missing,
        "refused_from_file_list": [entry for entry, _ in found.refused],
    }


def summary_lines(stats: dict, out: Path) -> list[str]:
    """What the CLI prints at the end of a run."""
    if stats.get("nothing_to_do"):
        line = f"{out}: nothing to do: {stats['already_stored']} images already in the store"
        if stats["already_failed"]:
            line += f", {stats['already_failed']} failed earlier (see {out / ERRORS_NAME})"
        if stats["failed"]:
            line += f"; {stats['failed']} newly set aside (see {out / ERRORS_NAME})"
        return [line]
    lines = [f"{out}: {stats['stored']} images stored this run"
             + (f" (+{stats['already_stored']} from earlier runs)" if stats["already_stored"] else "")
             + f", {stats['failed']} failed"
             + (f" (see {out / ERRORS_NAME})" if stats["failed"] else "")]
    if stats["failures_by_kind"]:
        lines.append("  failures: " + ", ".join(f"{k} {v}" for k, v in stats["failures_by_kind"].items()))
    rate = stats["images_per_second"]
    lines.append(f"  {format_duration(stats['wall_seconds'])} wall"
                 + (f", {rate:.1f} images/s" if rate else "")
                 + f", {stats['workers']['count']} {stats['workers']['device']} worker(s)")
    return lines
