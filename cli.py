"""Command-line entry points: ``vlp``, ``vlp-extract``, ``vlp-build``, ``vlp-train``.

Thin by design: options are parsed here and handed to library functions. Errors the
user can fix (bad files, bad options) are printed as one ``Error: ...`` line with exit
status 1; usage mistakes exit with 2 (click's convention); success is 0.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from vlp import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
STORAGE = click.Choice(["lmdb", "arrow"])


class _CleanErrors:
    """Turns the library's input errors into one clean ``Error:`` line (exit status 1)."""

    def invoke(self, ctx):
        from vlp.detectors import CheckpointError, MissingWeightsError
        from vlp.pipeline.extract import ExtractError
        from vlp.pipeline.import_features import ImportIssue
        from vlp.schemas import SchemaError, StoreError

        try:
            return super().invoke(ctx)
        except (SchemaError, StoreError, ImportIssue, FileNotFoundError, CheckpointError, MissingWeightsError,
                ExtractError) as exc:
            raise click.ClickException(str(exc)) from None


class _Group(_CleanErrors, click.Group):
    pass


class _Command(_CleanErrors, click.Command):
    pass


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _write_mode(overwrite: bool, append: bool) -> str:
    if overwrite and append:
        raise click.UsageError("--overwrite and --append exclude each other")
    return "overwrite" if overwrite else "append" if append else "create"


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="vlp")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose):
    """vlp: feature stores, pair shards and V&L pretraining.

    Auxiliary verbs; the main jobs are the commands vlp-extract, vlp-build and vlp-train.
    """
    _setup_logging(verbose)


@main.command("inspect")
@click.argument("store_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("image_id", required=False)
@click.option("--top", default=10, show_default=True, help="How many labels / boxes to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--show", "show_png", type=click.Path(dir_okay=False),
              help="With IMAGE_ID: also draw the record's boxes with 'attribute object conf' "
                   "captions onto the image (--image) and write this PNG.")
@click.option("--image", "image_path", type=click.Path(exists=True, dir_okay=False),
              help="The image file of IMAGE_ID, for --show.")
def inspect_cmd(store_dir, image_id, top, as_json, show_png, image_path):
    """Validate a feature store, or print one record.

    Without IMAGE_ID: checks the manifest, every shard's sha256, that every record
    decodes and follows the schema, counts and the index, then prints a summary. Exit
    status 1 when a problem is found.

    With IMAGE_ID: prints that record (image size, fields and shapes, top boxes with
    attribute / object names and confidences).
    """
    from tqdm import tqdm

    from vlp.schemas import FeatureStore
    from vlp.schemas.verify import describe_record, verify_store

    if image_id is not None:
        store = FeatureStore(store_dir)
        try:
            record = store.get(image_id)
        except KeyError as exc:
            raise click.ClickException(exc.args[0]) from None
        click.echo("\n".join(describe_record(record, top)))
        if show_png:
            _show(record, image_path, show_png, top)
        return
    if show_png or image_path:
        raise click.UsageError("--show and --image need an IMAGE_ID")
    with tqdm(unit="rec", desc="verify", disable=not sys.stderr.isatty()) as bar:
        report = verify_store(store_dir, on_record=lambda: bar.update(1))
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "errors": report.errors, "warnings": report.warnings,
                               "records_checked": report.records_checked,
                               "manifest": report.manifest}, indent=2))
    else:
        click.echo("\n".join(report.summary_lines(top)))
    if not report.ok:
        sys.exit(1)


def _show(record, image_path, show_png, top) -> None:
    import cv2

    from vlp.detectors import draw

    if image_path is None:
        raise click.UsageError("--show needs --image: the store holds features, not pixels")
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)
    if image is None:
        raise click.ClickException(f"{image_path}: not a readable image")
    if image.shape[:2] != (record.image_h, record.image_w):
        raise click.ClickException(f"{image_path} is {image.shape[1]}x{image.shape[0]} px, the record "
                                   f"says {record.image_w}x{record.image_h}: not this record's image")
    with open(show_png, "wb") as handle:
        handle.write(draw(image, record, max_boxes=top))
    click.echo(f"wrote {show_png}")


@main.group("import", cls=_Group)
def import_group():
    """Convert region features you already have into a vlp feature store."""


def _import_options(func):
    options = [
        click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
                     help="Output feature-store directory."),
        click.option("--format", "storage", type=STORAGE, default="lmdb", show_default=True,
                     help="Shard format of the output store."),
        click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True,
                     help="Records per shard."),
        click.option("--feature-dim", type=click.IntRange(min=1), default=None,
                     help="Expected feature size per box (default: taken from the first record)."),
        click.option("--on-error", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
                     help="stop: the first bad row aborts (finished shards are kept, the store is "
                          "marked incomplete). skip: bad rows go to OUT/errors.jsonl."),
        click.option("--overwrite", is_flag=True, help="Replace an existing store at --out."),
        click.option("--append", is_flag=True, help="Add to an existing store at --out."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _import_kwargs(storage, shard_size, feature_dim, on_error, overwrite, append) -> dict:
    """The options every importer shares, as keyword arguments of the library call."""
    return dict(storage=storage, shard_size=shard_size, feature_dim=feature_dim,
                mode=_write_mode(overwrite, append), on_error=on_error, progress=sys.stderr.isatty())


@import_group.command("tsv")
@click.argument("tsv_files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--layout", type=click.Choice(["auto", "lxmert", "butd"]), default="auto", show_default=True,
              help="lxmert: 10 columns img_id img_h img_w objects_id objects_conf attrs_id attrs_conf "
                   "num_boxes boxes features. butd: 6 columns image_id image_w image_h num_boxes boxes "
                   "features. auto: by the column count of each file.")
@_import_options
def import_tsv_cmd(tsv_files, layout, out, storage, shard_size, feature_dim, on_error, overwrite, append):
    """Stream BUTD / LXMERT TSV feature files into a feature store.

    Arrays are base64 (ids int64, everything else float32), as written by the
    bottom-up-attention generate_tsv.py and by LXMERT. Features are stored as float16.
    """
    from vlp.pipeline.import_features import import_tsv

    stats = import_tsv(tsv_files, out, layout=layout,
                       **_import_kwargs(storage, shard_size, feature_dim, on_error, overwrite, append))
    click.echo(f"{stats.summary()} -> {out}")


@import_group.command("pickled-lmdb")
@click.argument("source", type=click.Path(exists=True))
@click.option("--trust-pickle", is_flag=True,
              help="Required: confirms you trust SOURCE. Its values are pickles; they are read "
                   "with a restricted unpickler (arrays, dicts, lists, strings, numbers only).")
@_import_options
def import_lmdb_cmd(source, trust_pickle, out, storage, shard_size, feature_dim, on_error,
                    overwrite, append):
    """Convert a pickled-dict LMDB (VOLTA / ViLBERT / MMF layout) into a pickle-free store.

    Each value is a dict with img_id / img_h / img_w (or image_*), num_boxes, boxes,
    features and optional objects_id / objects_conf / attrs_id / attrs_conf / cls_prob,
    as base64 strings or numpy arrays. The key b"keys" (the layout's key list) is skipped.
    """
    from vlp.pipeline.import_features import import_pickled_lmdb

    if not trust_pickle:
        raise click.UsageError(f"{source} holds pickled values, which can run code when loaded. "
                               "Pass --trust-pickle if you trust this file.")
    click.echo("warning: reading pickled values from a file you declared trusted", err=True)
    stats = import_pickled_lmdb(source, out, trust_pickle=True,
                                **_import_kwargs(storage, shard_size, feature_dim, on_error, overwrite, append))
    click.echo(f"{stats.summary()} -> {out}")


@main.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--images", type=click.IntRange(min=1), default=200, show_default=True,
              help="How many images the world holds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical world.")
@click.option("--split", "split_fractions", type=(float, float, float), default=(0.8, 0.1, 0.1),
              show_default=True, help="Train / val / test fractions.")
@click.option("--overwrite", is_flag=True, help="Replace a world previously generated in OUT_DIR.")
def synth_cmd(out_dir, images, seed, split_fractions, overwrite):
    """Generate the synthetic VG-vocabulary world (the embedded default's data).

    Writes images/<id>.jpg and annotations in the real public formats: Visual Genome
    json, COCO captions + Karpathy split, VQA v2, a Conceptual-Captions TSV and
    img2dataset folder, noisy web-crawl records, plus truth.json (the ground truth).
    """
    from vlp.synthetic import generate

    summary = generate(out_dir, num_images=images, seed=seed, split_fractions=split_fractions,
                       overwrite=overwrite)
    click.echo(f"wrote a {summary.num_images}-image world to {out_dir} in {summary.seconds:.1f} s")


@main.command("train-detector")
@click.argument("vg_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to write (.pt); <out>.log.json holds the losses.")
@click.option("--preset", default="demo", show_default=True, help="Architecture and input settings.")
@click.option("--iterations", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Training iterations.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per iteration.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--time-limit", type=float, default=None, help="Stop after this many seconds (checkpoint kept).")
def train_detector_cmd(vg_dir, out, preset, iterations, batch_size, seed, time_limit):
    """Train a Faster R-CNN with attribute head on a Visual-Genome-format folder.

    VG_DIR holds objects.json, attributes.json, image_data.json and images/<id>.jpg
    (a world from `vlp synth`, or your own data in VG's format); the train split of
    splits.json is used when present, otherwise every image.
    """
    from vlp.detectors.training import train_detector

    log = train_detector(vg_dir, out, preset=preset, iterations=iterations, batch_size=batch_size,
                         seed=seed, time_limit_s=time_limit)
    click.echo(f"wrote {out} after {log['iterations_done']} iterations ({log['seconds']:.0f} s)")


@main.command("demo")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Folder for the demo's stores and report.")
@click.option("--images", type=click.IntRange(min=1), default=200, show_default=True,
              help="How many images the demo processes.")
def demo_cmd(out, images):
    """Run the main job end to end on the embedded default and write a report."""
    from vlp.demo import run_demo

    report = run_demo(out, num_images=images)
    click.echo(f"demo finished: open {report}")


def _parse_overrides(pairs) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


@click.command(cls=_Command, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="vlp-extract")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Feature store folder.")
@click.option("--preset", default="butd-10-100", show_default=True,
              help="Detector preset: butd-10-100, butd-36, lxmert-36, or demo (the shipped slim detector).")
@click.option("--weights", type=click.Path(exists=True),
              help="Checkpoint: pytorch_model.bin (HF) or faster_rcnn_from_caffe_attr.pkl, or a folder "
                   "holding one. Not needed for --preset demo.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a detector setting, e.g. --set min_boxes=36 --set max_boxes=36 (repeatable).")
@click.option("--format", "storage", type=STORAGE, default="lmdb", show_default=True, help="Shard format.")
@click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Images per shard.")
@click.option("--overwrite", is_flag=True, help="Delete what --out holds and start fresh (default: continue).")
@click.option("--file-list", type=click.Path(exists=True, dir_okay=False),
              help="Extract the images listed in this file (one path per line, relative to IMAGES_DIR).")
@click.option("--glob", "glob_pattern", help="Only relative paths matching this pattern, e.g. 'train/*.jpg'.")
@click.option("--limit", type=click.IntRange(min=0), help="Only the first N images (stable order).")
@click.option("--dry-run", is_flag=True, help="Count images and estimate the time; write nothing.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=89_478_485, show_default=True,
              help="Images with more pixels are refused (decompression-bomb guard).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Detector precision (half precision is for GPUs).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass [8 on GPU, 1 on CPU].")
@click.option("--workers", type=click.IntRange(min=1),
              help="Detector actors [one per GPU; on CPU one per 8 CPUs].")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="GPUs per detector actor (0.5 puts two on each GPU).")
@click.option("--threads-per-worker", type=click.IntRange(min=1), help="Torch threads of a CPU actor.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per decode task.")
@click.option("--address", help="Join this Ray cluster ('auto' or host:port) instead of starting one; "
                                 "--out must then be on a file system all nodes share.")
@click.option("--num-cpus", type=click.IntRange(min=2), help="CPUs for a Ray instance started here [all].")
@click.option("--progress", type=click.Choice(["auto", "bar", "lines", "off"]), default="auto",
              show_default=True, help="Progress bar, periodic log lines (auto when not a terminal), or none.")
def extract_main(images_dir, out, preset, weights, overrides, storage, shard_size, overwrite, file_list,
                 glob_pattern, limit, dry_run, max_pixels, device, dtype, batch_size, workers, gpus_per_worker,
                 threads_per_worker, chunk_size, address, num_cpus, progress):
    """Extract bottom-up-attention region features for every image under IMAGES_DIR.

    Images are found recursively (jpg, png, gif, webp, bmp, tiff, ...; any case); each is
    named by its path relative to IMAGES_DIR without the extension. Features, boxes and
    labels go into --out as LMDB or Arrow shards with a manifest; images that cannot be
    used are listed in --out/errors.jsonl with the reason; counts and timings go to
    --out/stats.json.

    Rerunning the same command continues an interrupted run: stored images and logged
    failures are skipped, unfinished shards are redone.

    \b
    Examples:
      vlp-extract photos/ --out feats/ --preset demo
      vlp-extract coco/val2014 --out coco-feats --weights pytorch_model.bin --set min_boxes=36 --set max_boxes=36
    """
    from vlp.pipeline.extract import ExtractSettings, dry_run as plan_run, run_extract, summary_lines

    settings = ExtractSettings(
        preset=preset, weights=weights, overrides=_parse_overrides(overrides), device=device, dtype=dtype,
        batch_size=batch_size, storage=storage, shard_size=shard_size, overwrite=overwrite, file_list=file_list,
        glob=glob_pattern, limit=limit, max_pixels=max_pixels, address=address, num_cpus=num_cpus,
        workers=workers, gpus_per_worker=gpus_per_worker, threads_per_worker=threads_per_worker,
        chunk_size=chunk_size, progress=progress)
    if dry_run:
        _print_dry_run(plan_run(images_dir, out, settings), workers or 1)
        return
    from pathlib import Path

    stats = run_extract(images_dir, out, settings)
    click.echo("\n".join(summary_lines(stats, Path(out))))


def _print_dry_run(plan: dict, workers: int) -> None:
    from vlp.pipeline.progress import format_duration

    click.echo(f"{plan['images']} images, {plan['bytes'] / 1e6:.1f} MB")
    if plan["already_stored"] or plan["already_failed"]:
        click.echo(f"already done: {plan['already_stored']} stored, {plan['already_failed']} failed earlier")
    for relative, reason in plan["skipped_files"]:
        click.echo(f"skipped: {relative}: {reason}")
    for entry in plan["missing"]:
        click.echo(f"missing from the file list: {entry}")
    for loop in plan["symlink_loops"]:
        click.echo(f"symlink loop not followed: {loop}")
    click.echo(f"to extract: {plan['to_do']}")
    estimate = plan["estimate"]
    if estimate:
        per = estimate["seconds_per_image_one_worker"]
        click.echo(f"estimate: {per:.2f} s/image on {estimate['device']} here -> about "
                   f"{format_duration(estimate['seconds_one_worker'] / workers)} with {workers} such worker(s)")


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="vlp-build")
def build_main():
    """Build pair shards (image + text) from feature stores and annotation files.

    No builders are available in this version yet (see README, "Status").
    """


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="vlp-train")
def train_main():
    """Pretrain and finetune V&L transformers on feature stores and pair shards.

    No trainer commands are available in this version yet (see README, "Status").
    """


if __name__ == "__main__":
    main()
