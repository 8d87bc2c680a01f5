"""``vlp-build generate-captions``: CC-generated captions (Singh et al.) into a ``generated`` pair store.

A captioner trained in-domain (``vlp-train captioner``) captions every image of a feature
store. How a run flows::

    driver: image ids of the store, minus those already captioned  ->  chunks of ids
    workers (Ray actors: one per GPU, else CPU actors; or this process): read the regions,
            decode a batch, return {image_id, captions: [{text, score}]}
    driver: append one JSON line per image to OUT.generating/captions.jsonl (flushed)
    end:    the lines -> pair store OUT (kind generated), OUT.generating removed

* Resume after ``kill -9``: an image is captioned exactly when its line is complete in
  ``captions.jsonl``; a rerun cuts a torn last line, skips the images listed and redoes the
  rest, so every image is captioned exactly once. The work folder remembers the generator
  (``settings.json``): a rerun with another model or other decoding settings is refused.
* Captions of an image depend only on the model, the settings, the seed and the image
  (nucleus sampling draws from ``stable_seed(seed, image_id, k)``), not on batching or
  workers, so a resumed run writes what an uninterrupted one would.
* Memory stays flat: the driver holds the set of finished ids and at most two chunks per
  worker; captions go to disk as they come.
* Pairs: ``pair_id`` ``IMAGE_ID#gK``, ``text``, ``score`` (mean token log-prob),
  ``generator`` (the weights' sha256 + decoding settings), ``source`` ``generated``, ``split``
  (``--split``). ``--filter MIN_SCORE`` keeps captions with score >= MIN_SCORE (the others
  are counted). Images without regions go to ``OUT/errors.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vlp.core.durable import JsonLines, atomic_write_json, cut_torn_tail, read_json_lines

log = logging.getLogger(__name__)

WORK_SUFFIX = ".generating"
CAPTIONS_FILE = "captions.jsonl"
SETTINGS_FILE = "settings.json"


class GenerateError(RuntimeError):
    """The run cannot go on as asked (other settings in the work folder, a bad model, ...)."""


@dataclasses.dataclass
class GenerateSettings:
    decoding: str = "nucleus"  # greedy | beam | nucleus
    top_p: float = 0.8
    beam_size: int = 3
    num_captions: int = 1
    max_len: Optional[int] = None  # default: the model's max_caption_len
    seed: int = 0
    batch_size: int = 32
    chunk_size: int = 256  # images per task handed to a worker
    num_workers: int = 1  # Ray actors; 0: in this process
    num_cpus: Optional[int] = None  # CPUs of a local Ray instance
    address: Optional[str] = None  # an existing Ray cluster
    device: str = "auto"
    min_score: Optional[float] = None
    split: str = "train"
    source: str = "generated"
    overwrite: bool = False

    def __post_init__(self):
        from vlp.trainer.captioning.model import DECODINGS

        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {self.decoding!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        for name in ("beam_size", "num_captions", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1")
        if self.decoding == "greedy" and self.num_captions != 1:
            raise ValueError("greedy decoding gives one caption per image: use --decoding nucleus or beam "
                             "for --num-captions above 1")
        if self.decoding == "beam" and self.num_captions > self.beam_size:
            raise ValueError(f"--num-captions {self.num_captions} exceeds --beam-size {self.beam_size}")

    def decoding_text(self) -> str:
        parts = [f"decoding={self.decoding}"]
        if self.decoding == "nucleus":
            parts.append(f"top_p={self.top_p:g}")
            parts.append(f"seed={self.seed}")
        if self.decoding == "beam":
            parts.append(f"beam_size={self.beam_size}")
        parts.append(f"num_captions={self.num_captions}")
        if self.max_len:
            parts.append(f"max_len={self.max_len}")
        return " ".join(parts)


def generator_text(sha256: str, settings: GenerateSettings) -> str:
    return f"vlp-captioner sha256={sha256} {settings.decoding_text()}"


# -- the worker side -----------------------------------------------------------------------

class CaptionWorker:
    """One captioner (a Ray actor's, or this process's) over one feature store."""

    def __init__(self, model_dir: str, features_dir: str, settings: GenerateSettings, device: str = "cpu",
                 threads: Optional[int] = None):
        import torch

        from vlp.schemas import FeatureStore
        from vlp.trainer.captioning.train import load_captioner

        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.net, self.tokenizer, self.info = load_captioner(model_dir, device=device)
        self.features = FeatureStore(features_dir, warn=False)
        self.settings = settings

    def pid(self) -> int:
        import os

        return os.getpid()

    def _regions(self, image_id: str):
        import torch

        from vlp.trainer.data import box_geometry

        record = self.features.get(image_id)
        n = min(record.num_boxes, self.net.config.max_regions)
        if n == 0:
            return None
        return (torch.from_numpy(np.array(record.features[:n], dtype=np.float32)),
                torch.from_numpy(box_geometry(record.boxes[:n], record.image_w, record.image_h,
                                              self.net.config.box_dims)))

    def caption(self, image_ids: list) -> list[dict]:
        """One row per image: ``{image_id, captions: [{text, score}]}`` or ``{image_id, error}``."""
        import torch

        from vlp.trainer.captioning.model import decode, texts
        from vlp.trainer.data import stable_seed

        s = self.settings
        rows: dict = {}
        ready = []
        for image_id in image_ids:
            try:
                regions = self._regions(image_id)
            except Exception as error:  # an unreadable record: a line in errors.jsonl, not a lost run
                rows[image_id] = {"image_id": image_id, "error": f"cannot read features: {error}"}
                continue
            if regions is None:
                rows[image_id] = {"image_id": image_id, "error": "no regions"}
                continue
            ready.append((image_id, regions))
        max_len = s.max_len or self.net.config.max_caption_len
        k = s.num_captions
        for start in range(0, len(ready), s.batch_size):
            part = ready[start:start + s.batch_size]
            count = max(r[0].shape[0] for _, r in part)
            feats = torch.zeros(len(part), count, part[0][1][0].shape[1])
            boxes = torch.zeros(len(part), count, part[0][1][1].shape[1])
            mask = torch.zeros(len(part), count, dtype=torch.bool)
            for row, (_, (f, b)) in enumerate(part):
                feats[row, :f.shape[0]], boxes[row, :b.shape[0]], mask[row, :f.shape[0]] = f, b, True
            uniforms = None
            if s.decoding == "nucleus":
                uniforms = torch.stack([torch.rand(max_len + 1, generator=torch.Generator().manual_seed(
                    stable_seed(s.seed, image_id, j))) for image_id, _ in part for j in range(k)])
            with torch.no_grad():
                seqs, scores = decode(self.net, feats.to(self.device), boxes.to(self.device), mask.to(self.device),
                                      decoding=s.decoding, top_p=s.top_p, beam_size=s.beam_size, num_captions=k,
                                      uniforms=uniforms, max_len=max_len)
            captions = texts(self.tokenizer, seqs)
            scores = scores.tolist()
            for row, (image_id, _) in enumerate(part):
                rows[image_id] = {"image_id": image_id, "captions": [
                    {"text": captions[row * k + j], "score": round(float(scores[row * k + j]), 6)} for j in range(k)]}
        return [rows[i] for i in image_ids]


# -- the driver ------------------------------------------------------------------------------

def work_folder(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + WORK_SUFFIX)


def _check_out(out: Path, overwrite: bool) -> None:
    from vlp.schemas.pairs import _check_target

    _check_target(out, "overwrite" if overwrite else "create")


def _ray_init(settings: GenerateSettings) -> bool:
    import os

    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    if settings.address:
        ray.init(address=settings.address, **kwargs)
    else:  # workers at the driver's niceness (Ray's default 15 starves them on a busy machine)
        ray.init(num_cpus=settings.num_cpus, _system_config={"worker_niceness": os.getpriority(os.PRIO_PROCESS, 0)},
                 **kwargs)
    return True


def generate_captions(model_dir, features_dir, out, settings: Optional[GenerateSettings] = None, *,
                      progress: str = "off", should_stop: Optional[Callable[[], bool]] = None,
                      on_row: Optional[Callable[[int], None]] = None) -> dict:
    """Caption every image of ``features_dir`` with the captioner of ``model_dir`` into the
    pair store ``out``; resumes a run stopped before (see the module docstring). Returns stats
    (``complete`` False when stopped early). ``on_row(count)``: called after each written image."""
    from vlp.core.progress import Progress
    from vlp.schemas import FeatureStore
    from vlp.schemas.shards import sha256_file
    from vlp.trainer.captioning.train import MODEL_FILE

    settings = settings or GenerateSettings()
    started = time.perf_counter()
    out = Path(out)
    model_file = Path(model_dir) / MODEL_FILE if Path(model_dir).is_dir() else Path(model_dir)
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: no captioner weights (give --model a vlp-train captioner run folder)")
    features = FeatureStore(features_dir)
    from vlp.trainer.captioning.train import load_captioner

    net, _, _ = load_captioner(model_file)  # a bad model is one clear error before any work
    if features.feature_dim != net.config.feature_dim:
        raise GenerateError(f"{features_dir} holds {features.feature_dim}-d features; the captioner of {model_dir} "
                            f"reads {net.config.feature_dim}-d features")
    del net
    work = work_folder(out)
    if settings.overwrite and work.exists():
        shutil.rmtree(work)
    _check_out(out, settings.overwrite)
    generator = generator_text(sha256_file(model_file), settings)
    wanted = {"generator": generator, "features": str(Path(features_dir).resolve()), "split": settings.split,
              "source": settings.source}
    saved = work / SETTINGS_FILE
    resumed = saved.is_file()
    if resumed:
        before = json.loads(saved.read_text())
        changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in wanted.items() if before.get(k) != v]
        if changed:
            raise GenerateError(f"{work} holds captions of another run ({'; '.join(changed)}); rerun with the same "
                                f"model and settings to continue it, or pass --overwrite to start again")
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(saved, wanted)
    captions_path = work / CAPTIONS_FILE
    cut_torn_tail(captions_path)
    done = {row["image_id"] for row in read_json_lines(captions_path) if _valid_row(row)}
    already = len(done)
    total = len(features)
    todo = (i for i in features.keys() if i not in done)
    shown = Progress(total, "generate-captions", unit="img", mode=progress, initial=already)
    written = [0]
    sink = JsonLines(captions_path)

    def write(rows: list) -> None:
        for row in rows:
            if row["image_id"] in done:
                continue
            done.add(row["image_id"])
            sink.append(row)
            written[0] += 1
            if on_row is not None:
                on_row(written[0])
        sink.sync()
        shown.update(len(rows))

    stopped = False
    try:
        if settings.num_workers == 0:
            stopped = _run_local(model_dir, features_dir, settings, todo, write, should_stop)
        else:
            stopped = _run_ray(model_dir, features_dir, settings, todo, write, should_stop)
    finally:
        sink.close()
        shown.close()
    stats = {"images": total, "captioned_now": written[0], "already_captioned": already, "resumed": resumed,
             "generator": generator, "complete": False, "seconds": round(time.perf_counter() - started, 3),
             "images_per_s": round(written[0] / max(1e-9, time.perf_counter() - started), 3)}
    if stopped or len(done) < total:
        stats["remaining"] = total - len(done)
        return stats
    stats.update(_write_store(work, out, settings, generator))
    stats["complete"] = True
    return stats


def _valid_row(row: dict) -> bool:
    """A line of captions.jsonl as this module writes it (anything else is ignored and its image redone)."""
    if not isinstance(row.get("image_id"), str):
        return False
    if "error" in row:
        return isinstance(row["error"], str)
    captions = row.get("captions")
    return isinstance(captions, list) and bool(captions) and all(
        isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("score"), (int, float))
        and not isinstance(c.get("score"), bool) for c in captions)


def _chunks(todo, size: int):
    chunk = []
    for image_id in todo:
        chunk.append(image_id)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _run_local(model_dir, features_dir, settings, todo, write, should_stop) -> bool:
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    worker = CaptionWorker(str(model_dir), str(features_dir), settings, device=device)
    for chunk in _chunks(todo, settings.chunk_size):
        if should_stop is not None and should_stop():
            return True
        write(worker.caption(chunk))
    return False


def _run_ray(model_dir, features_dir, settings, todo, write, should_stop) -> bool:
    import ray

    started = _ray_init(settings)
    actors = []
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if settings.device in ("auto", "cuda") else 0
        if settings.device == "cuda" and not gpus:
            raise GenerateError("--device cuda: the Ray cluster has no GPU")
        count = gpus if gpus else settings.num_workers
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        remote = ray.remote(max_restarts=0, max_task_retries=0, **options)(CaptionWorker)
        device = "cuda" if gpus else "cpu"
        actors = [remote.remote(str(Path(model_dir).resolve()), str(Path(features_dir).resolve()), settings,
                                device, None if gpus else 1) for _ in range(count)]
        chunks = _chunks(todo, settings.chunk_size)
        pending: dict = {}  # ref -> actor index
        load = [0] * len(actors)
        exhausted = False
        while True:
            while not exhausted and not (should_stop is not None and should_stop()):
                free = [i for i in range(len(actors)) if load[i] < 2]
                if not free:
                    break
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                index = min(free, key=lambda i: load[i])
                pending[actors[index].caption.remote(chunk)] = index
                load[index] += 1
            if not pending:
                return not exhausted
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if should_stop is not None and should_stop() and not ready:
                return True
            for ref in ready:
                index = pending.pop(ref)
                load[index] -= 1
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayError as error:
                    if should_stop is not None and should_stop():  # Ctrl-C reached the actors too
                        return True
                    raise GenerateError(f"a caption worker failed: {str(error).splitlines()[0]}") from None
                write(rows)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()


def _write_store(work: Path, out: Path, settings: GenerateSettings, generator: str) -> dict:
    from vlp.core.errors_log import ERRORS_NAME, ErrorLog
    from vlp.schemas.pairs import PairStoreWriter

    counts = {"pairs": 0, "filtered_out": 0, "images_without_captions": 0}
    scores, failed = [], []
    with PairStoreWriter(out, "generated", mode="overwrite" if settings.overwrite else "create",
                         sources=[generator]) as writer:
        seen = set()
        for row in read_json_lines(work / CAPTIONS_FILE):
            if not _valid_row(row) or row["image_id"] in seen:
                continue
            image_id = row["image_id"]
            seen.add(image_id)
            if "error" in row:
                counts["images_without_captions"] += 1
                failed.append({"image_id": image_id, "reason": row["error"]})
                continue
            for k, caption in enumerate(row.get("captions") or []):
                if settings.min_score is not None and caption["score"] < settings.min_score:
                    counts["filtered_out"] += 1
                    continue
                writer.add({"pair_id": f"{image_id}#g{k}", "image_id": image_id, "text": caption["text"],
                            "source": settings.source, "split": settings.split, "score": caption["score"],
                            "generator": generator})
                counts["pairs"] += 1
                scores.append(caption["score"])
        writer.stats = {**counts, "min_score": settings.min_score,
                        "mean_score": float(np.mean(scores)) if scores else None}
    if failed:
        with ErrorLog(out / ERRORS_NAME) as errors:
            for entry in failed:
                errors.add(entry)
    shutil.rmtree(work)
    return counts


def summary_lines(stats: dict, out) -> list[str]:
    if not stats["complete"]:
        return [f"stopped: {stats['already_captioned'] + stats['captioned_now']} of {stats['images']} images captioned "
                f"({stats['remaining']} left); rerun the same command to continue"]
    lines = [f"Wrote {stats['pairs']} generated pairs to {out} ({stats['captioned_now']} images captioned now, "
             f"{stats['already_captioned']} earlier, {stats['images_per_s']:.1f} images/s)."]
    if stats.get("filtered_out"):
        lines.append(f"{stats['filtered_out']} caption(s) below --filter were dropped.")
    if stats.get("images_without_captions"):
        lines.append(f"{stats['images_without_captions']} image(s) had no regions: see {Path(out) / 'errors.jsonl'}.")
    lines.append(f"generator: {stats['generator']}")
    return lines
