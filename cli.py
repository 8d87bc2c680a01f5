"""Command-line entry points: ``vlp``, ``vlp-extract``, ``vlp-build``, ``vlp-train``.

Thin by design: options are parsed here and handed to library functions. Errors the
user can fix (bad files, bad options) are printed as one ``Error: ...`` line with exit
status 1; usage mistakes exit with 2 (click's convention); success is 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import click

from vlp import __version__
from vlp.schemas.pairs import PAIR_SHARD_SIZE
from vlp.schemas.store import FEATURE_SHARD_SIZE

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
STORAGE = click.Choice(["lmdb", "arrow"])


class _CleanErrors:
    """Turns the library's input errors into one clean ``Error:`` line (exit status 1).

    The error classes are looked up only in modules already imported (an exception of a
    class can exist only once its module is loaded): importing them here would load torch
    and Ray before every command, ``--help`` included.
    """

    # module -> error classes in it (or re-exported by it) that are the user's to fix
    CLEAN_ERRORS = {
        "vlp.schemas": ("SchemaError", "StoreError"),
        "vlp.detectors.errors": ("USER_ERRORS",),
        "vlp.pipeline.extract": ("ExtractError",),
        "vlp.pipeline.import_features": ("ImportIssue",),
    }

    @classmethod
    def _clean_types(cls) -> tuple:
        types = [FileNotFoundError]
        for module_name, names in cls.CLEAN_ERRORS.items():
            module = sys.modules.get(module_name)
            for name in names if module is not None else ():
                found = getattr(module, name, ())
                types.extend(found if isinstance(found, tuple) else [found])
        return tuple(types)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if isinstance(exc, click.ClickException) or not isinstance(exc, self._clean_types()):
                raise
            raise click.ClickException(str(exc)) from None


class _Group(_CleanErrors, click.Group):
    pass


class _Command(_CleanErrors, click.Command):
    pass


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


_STOP_TRAINING = "stopping after this step and saving a checkpoint"


@contextlib.contextmanager
def _stop_on_first_interrupt(message: str, *, enabled: bool = True):
    """The first Ctrl-C asks the work to stop at its next safe point (``message`` says what
    happens), a second one aborts. Yields the stop request: an Event, or None when not
    ``enabled`` (Ray's own workers handle their interrupts) or off the main thread."""
    stop = threading.Event()

    def on_interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo(f"\n{message} (Ctrl-C again to abort at once)", err=True)

    enabled = enabled and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if enabled else None
    try:
        yield stop if enabled else None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


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
@click.option("--vocab", "vocab_path", type=click.Path(exists=True, dir_okay=False),
              help="Pair stores: a BERT-style vocab.txt; report the share of the texts' words in it.")
@click.option("--rows", default=3, show_default=True, type=click.IntRange(min=0),
              help="Pair stores: how many pairs to print.")
def inspect_cmd(store_dir, image_id, top, as_json, show_png, image_path, vocab_path, rows):
    """Validate a feature store or a pair store, or print one record.

    Without IMAGE_ID: checks the manifest, every shard's sha256, that every record
    decodes and follows the schema, counts and the index, then prints a summary. Exit
    status 1 when a problem is found.

    With IMAGE_ID: prints that record (image size, fields and shapes, top boxes with
    attribute / object names and confidences).

    A pair store (vlp-build's output): kind, pairs per split, text length in words,
    vocabulary (coverage of --vocab, else distinct and most frequent words), the first
    --rows pairs (with IMAGE_ID: that image's pairs) and the same checks.
    """
    if _is_pair_store(store_dir):
        return _inspect_pairs(store_dir, image_id, top, as_json, vocab_path, rows, show_png or image_path)
    if vocab_path:
        raise click.UsageError("--vocab is for pair stores")
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


def _is_pair_store(store_dir) -> bool:
    try:
        manifest = json.loads((Path(store_dir) / "manifest.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == "vlp-pairs"


def _inspect_pairs(store_dir, image_id, top, as_json, vocab_path, rows, drawing) -> None:
    from vlp.schemas import SchemaError, StoreError
    from vlp.schemas.pairs import describe_pairs, describe_pairs_lines

    if drawing:
        raise click.UsageError("--show and --image are for feature stores")
    try:
        report = describe_pairs(store_dir, vocab=vocab_path, rows=rows, top=top, image_id=image_id)
    except (SchemaError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        click.echo("\n".join(describe_pairs_lines(report)))
    if not report["ok"]:
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
        click.option("--shard-size", type=click.IntRange(min=1), default=FEATURE_SHARD_SIZE, show_default=True,
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


def _require_trust(source, trust_pickle: bool, holds: str, kind: str) -> None:
    """Refuse pickled input unless --trust-pickle was given; say so on stderr when it was."""
    if not trust_pickle:
        raise click.UsageError(f"{source} holds {holds}, which can run code when loaded. "
                               f"Pass --trust-pickle if you trust this {kind}.")
    click.echo(f"warning: reading pickled values from a {kind} you declared trusted", err=True)


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

    _require_trust(source, trust_pickle, "pickled values", "file")
    stats = import_pickled_lmdb(source, out, trust_pickle=True,
                                **_import_kwargs(storage, shard_size, feature_dim, on_error, overwrite, append))
    click.echo(f"{stats.summary()} -> {out}")


@import_group.command("mmf-npy")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--trust-pickle", is_flag=True,
              help="Required: confirms you trust SOURCE. Its _info.npy files are pickles; they are "
                   "read with a restricted unpickler (arrays, dicts, lists, strings, numbers only).")
@_import_options
def import_mmf_npy_cmd(source, trust_pickle, out, storage, shard_size, feature_dim, on_error,
                       overwrite, append):
    """Convert an MMF feature folder (<id>.npy + <id>_info.npy) into a pickle-free store.

    Boxes, features, image size and cls_prob (MMF drops the background column; it comes
    back as 1 - the rest). MMF keeps no confidences or attributes: the records carry no
    labels. What `vlp export feats --to mmf-npy` writes reads back bit for bit.
    """
    from vlp.pipeline.import_features import import_mmf_npy

    _require_trust(source, trust_pickle, "pickled _info.npy files", "folder")
    stats = import_mmf_npy(source, out, trust_pickle=True,
                           **_import_kwargs(storage, shard_size, feature_dim, on_error, overwrite, append))
    click.echo(f"{stats.summary()} -> {out}")


_EXPORT_FORMATS = ["lxmert-tsv", "butd-tsv", "volta-lmdb", "uniter-imgdb", "mmf-npy"]
_PAIR_EXPORT_FORMATS = ["lxmert-pretrain", "lxmert-vqa", "coco-captions"]


@main.command("export", cls=_Command, context_settings=CONTEXT)
@click.argument("features_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "fmt", required=True, type=click.Choice(_EXPORT_FORMATS),
              help="Target format (see README, `vlp export`).")
@click.option("--out", "-o", required=True, type=click.Path(),
              help="Output: a .tsv file (lxmert-tsv, butd-tsv) or a folder (the others).")
@click.option("--num-boxes", type=int, default=None,
              help="Exactly N regions per image, the most confident (fewer: the image is logged). "
                   "lxmert-tsv default 36.")
@click.option("--max-boxes", type=int, default=None,
              help="At most N regions per image (uniter-imgdb: its max_bb, default 100).")
@click.option("--min-boxes", type=int, default=None,
              help="Images with fewer regions are logged, not written (uniter-imgdb: its min_bb, default 10).")
@click.option("--id-format", type=click.Choice(["keep", "int", "trailing-int"]), default=None,
              help="Image ids in the target: the vlp id, or an integer (int: the id is a number; "
                   "trailing-int: its last digits). butd-tsv default int, others keep.")
@click.option("--conf-th", type=float, default=None,
              help="uniter-imgdb: confidence threshold of its nbb rule (default 0.2).")
@click.option("--key-suffix", default=None,
              help="uniter-imgdb: appended to the image id to form UNITER's image name (default .npz).")
@click.option("--compress", is_flag=True,
              help="uniter-imgdb: the _compressed layout (npz values), for UNITER's --compressed_db.")
@click.option("--on-error", type=click.Choice(["skip", "stop"]), default="skip", show_default=True,
              help="skip: records the target cannot hold go to errors.jsonl; stop: the first one "
                   "aborts (nothing is written).")
@click.option("--overwrite", is_flag=True, help="Replace an existing export at --out.")
@click.option("--progress", type=click.Choice(["auto", "bar", "lines", "off"]), default="auto", show_default=True,
              help="Progress with rate and ETA on stderr: a bar on a terminal, else a line every 30 s.")
def export_cmd(features_dir, fmt, out, num_boxes, max_boxes, min_boxes, id_format, conf_th, key_suffix,
               compress, on_error, overwrite, progress):
    """Write the feature store FEATURES_DIR in the format another V&L trainer reads.

    The export is atomic (built in OUT.partial, renamed at the end) and carries a sidecar
    vlp-export.json (source store, detector config hash, settings, counts).
    """
    from vlp.exporters import ExportError, export, resolve_options

    options = dict(num_boxes=num_boxes, max_boxes=max_boxes, min_boxes=min_boxes, id_format=id_format,
                   conf_th=conf_th, key_suffix=key_suffix, compress=compress or None)
    try:
        resolve_options(fmt, **options)
    except ExportError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        stats = export(features_dir, out, fmt, overwrite=overwrite, on_error=on_error, progress=progress,
                       **options)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: nothing was written to {out}", err=True)
        sys.exit(130)
    click.echo(f"{stats.summary()} -> {out}")


@main.command("export-pairs", cls=_Command, context_settings=CONTEXT)
@click.argument("pairs_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--to", "fmt", required=True, type=click.Choice(_PAIR_EXPORT_FORMATS),
              help="lxmert-pretrain: {img_id, sentf, labelf} per image; lxmert-vqa: LXMERT's VQA/GQA "
                   "json; coco-captions: the COCO captions annotation file.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output JSON file.")
@click.option("--split", default=None, help="Only pairs of this split.")
@click.option("--features", type=click.Path(exists=True, file_okay=False), default=None,
              help="coco-captions: a feature store giving each image's width and height.")
@click.option("--id-format", type=click.Choice(["int", "trailing-int"]), default=None,
              help="coco-captions: integer image ids (default int).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --out.")
@click.option("--progress", type=click.Choice(["auto", "bar", "lines", "off"]), default="auto", show_default=True,
              help="Progress with rate and ETA on stderr: a bar on a terminal, else a line every 30 s.")
def export_pairs_cmd(pairs_dirs, fmt, out, split, features, id_format, overwrite, progress):
    """Write pair stores PAIRS_DIRS as the annotation JSON another V&L trainer reads."""
    from vlp.exporters.pairs import export_pairs

    try:
        stats = export_pairs(pairs_dirs, out, fmt, features=features, split=split, id_format=id_format,
                             overwrite=overwrite, progress=progress)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: nothing was written to {out}", err=True)
        sys.exit(130)
    click.echo(f"{stats.summary()} -> {out}")


@main.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--images", type=click.IntRange(min=1), default=200, show_default=True,
              help="How many images the world holds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, byte-identical world.")
@click.option("--split", "split_fractions", type=(float, float, float), default=(0.8, 0.1, 0.1),
              show_default=True, help="Train / val / test fractions.")
@click.option("--overwrite", is_flag=True, help="Replace a world previously generated in OUT_DIR.")
@click.option("--style", type=click.Choice(["wide", "classic"]), default="wide", show_default=True,
              help="wide: backgrounds of any colour, 13 colours, 48-1000 px, PNG and JPEG; classic: the "
                   "first releases' world (grey backgrounds, 8 colours, 240-640 px JPEGs).")
@click.option("--object-colours", metavar="NAME,NAME,...", default=None,
              help="Wide style: objects take only these colour words, e.g. gray,brown (a world that "
                   "drills a detector's weak colours). [all thirteen]")
@click.option("--colour-spread", type=click.IntRange(0, 127), default=None, metavar="N",
              help="Wide style: each channel of an object's colour within +-N of its word's reference "
                   "RGB, still nearest its own word (a detector trained on it learns shapes, not exact "
                   "colours). [10, the world's own]")
def synth_cmd(out_dir, images, seed, split_fractions, overwrite, style, object_colours, colour_spread):
    """Generate the synthetic VG-vocabulary world (the embedded default's data).

    Writes images/<id>.jpg or .png and annotations in the real public formats: Visual
    Genome json, COCO captions + Karpathy split, VQA v2, a Conceptual-Captions TSV and
    img2dataset folder, noisy web-crawl records, plus truth.json (the ground truth).
    """
    from vlp.synthetic import generate

    colours = None if object_colours is None else [name.strip() for name in object_colours.split(",")]
    if style != "wide" and (colours is not None or colour_spread is not None):
        raise click.UsageError("--object-colours and --colour-spread are settings of the wide style")
    try:
        summary = generate(out_dir, num_images=images, seed=seed, split_fractions=split_fractions,
                           overwrite=overwrite, style=style, object_colours=colours, colour_spread=colour_spread)
    except ValueError as error:
        if colours is None:
            raise
        raise click.BadParameter(str(error), param_hint="--object-colours") from None
    click.echo(f"wrote a {summary.num_images}-image world to {out_dir} in {summary.seconds:.1f} s")


@main.command("train-detector")
@click.argument("vg_dirs", metavar="VG_DIR...", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to write (.pt); <out>.log.json holds the losses, <out>.state.pt what --resume needs.")
@click.option("--preset", default="demo", show_default=True, help="Architecture and input settings.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a detector setting of the preset, e.g. --set min_size=384 (repeatable).")
@click.option("--iterations", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Training iterations.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per iteration.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (init, data order, sampling).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True,
              help="Peak learning rate (AdamW).")
@click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True,
              help="Linear warmup iterations (from lr/10), then a cosine decay.")
@click.option("--min-lr-fraction", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="The cosine decays to lr x this.")
@click.option("--rois-per-image", type=click.IntRange(min=1), default=32, show_default=True,
              help="RoIs sampled per image for the box head.")
@click.option("--roi-positive-fraction", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Largest share of foreground among them.")
@click.option("--part-negatives", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sub-boxes of GT boxes (holes, corners, halves) added per image to the sampled RoIs "
                   "as background.")
@click.option("--hard-negatives", type=click.IntRange(min=0), default=0, show_default=True,
              help="Background proposals of the highest RPN objectness (groups of objects, textures, near "
                   "misses) added per image to the sampled RoIs.")
@click.option("--train-min-sizes", default="", metavar="N,N,...",
              help="Multi-scale training: each image's shortest side is drawn from these sizes, e.g. "
                   "384,448,512,576,640 (the preset's max_size still caps the longest). [the preset's min_size]")
@click.option("--norm", type=click.Choice(["batchnorm", "affine"]), default="batchnorm", show_default=True,
              help="Norm layers: batch statistics while training, or fixed statistics with learnt scale/shift "
                   "(affine keeps the statistics of --init weights: suits fine-tuning).")
@click.option("--init", "--init-weights", "init_weights", type=click.Path(exists=True, dir_okay=False),
              help="Start from this checkpoint of the same architecture (fresh optimiser and warmup).")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run at --out from <out>.state.pt (same options; --threads may differ).")
@click.option("--eval-world", "eval_worlds", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="VG-format folder to evaluate on (repeatable: scored as one pooled set) [the VG_DIRs].")
@click.option("--eval-split", default="test", show_default=True,
              help="Split of each evaluation folder to evaluate on, or 'all'.")
@click.option("--eval-images", type=click.IntRange(min=0), default=50, show_default=True,
              help="Evaluate on the first N images of that split of each folder (0: no evaluation).")
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Iterations between evaluations, keeping the best as <stem>.best.pt (0: only at the end).")
@click.option("--log-every", type=click.IntRange(min=1), default=20, show_default=True,
              help="Iterations per loss line.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=250, show_default=True,
              help="Iterations between checkpoints (and resumable states).")
@click.option("--time-limit", type=click.FloatRange(min=0), default=None,
              help="Stop after this many seconds (checkpoint written, evaluation run).")
@click.option("--fp32", is_flag=True, help="Write float32 weights (default float16).")
@click.option("--stored-classes", type=click.Choice(["all", "trained"]), default="all", show_default=True,
              help="Box-predictor rows to write: all 1600 VG classes, or only the classes of the training "
                   "images (a smaller file that never predicts the others).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="Torch CPU threads.")
def train_detector_cmd(vg_dirs, out, preset, overrides, iterations, batch_size, seed, lr, warmup, min_lr_fraction,
                       rois_per_image, roi_positive_fraction, part_negatives, hard_negatives, train_min_sizes, norm,
                       init_weights,
                       resume, eval_worlds, eval_split, eval_images, eval_every, log_every, checkpoint_every,
                       time_limit, fp32, stored_classes, threads):
    """Train a Faster R-CNN with attribute head on Visual-Genome-format folders.

    Each VG_DIR holds objects.json, attributes.json, image_data.json and images/<id>.jpg
    (a world from `vlp synth`, or your own data in VG's format); the train split of
    splits.json is used when present, otherwise every image. Several folders are pooled
    into one training set. Ctrl-C saves the run; the same command with --resume
    continues it exactly.
    """
    from vlp.detectors.annotations import pick_image_ids
    from vlp.detectors.config import make_config
    from vlp.detectors.training import DetectorTrainer, TrainSettings

    if resume and init_weights:
        raise click.UsageError("--resume continues a run; --init starts a new one from weights: pass one")
    config = make_config(preset, **_parse_overrides(overrides))
    settings = TrainSettings(iterations=iterations, batch_size=batch_size, seed=seed, lr=lr,
                             warmup_iterations=warmup, min_lr_fraction=min_lr_fraction, rois_per_image=rois_per_image,
                             roi_positive_fraction=roi_positive_fraction, roi_part_negatives=part_negatives,
                             roi_hard_negatives=hard_negatives,
                             norm=norm, threads=threads,
                             train_min_sizes=_parse_train_min_sizes(train_min_sizes))
    eval_folders, eval_ids = [], []
    for folder in (eval_worlds or vg_dirs) if eval_images else ():
        ids = pick_image_ids(folder, eval_split, eval_images)
        if ids is None:
            click.echo(f"{folder} has no splits.json: not evaluated on "
                       f"(--eval-split all evaluates on every image)", err=True)
        else:
            eval_folders.append(folder)
            eval_ids.append(ids)
    trainer = DetectorTrainer(list(vg_dirs), out, config=config, settings=settings, eval_vg_dir=eval_folders or None,
                              eval_image_ids=eval_ids, eval_every=eval_every or None, log_every=log_every,
                              checkpoint_every=checkpoint_every, half=not fp32, init_weights=init_weights,
                              stored_classes=stored_classes, log=click.echo)
    if resume:
        trainer.resume()
    stop = threading.Event()

    def on_interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo("\nstopping after this iteration (Ctrl-C again to abort at once)", err=True)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if in_main_thread else None
    try:
        record = trainer.run(time_limit_s=time_limit, should_stop=stop.is_set)
    except KeyboardInterrupt:
        click.echo(f"aborted; the last saved state is in {trainer.paths['state']}", err=True)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if "interrupted" in record:
        click.echo(f"interrupted at iteration {record['interrupted']}; to continue, rerun the same command "
                   f"with --resume", err=True)
        sys.exit(130)
    click.echo(f"wrote {out} after {record['iterations_done']} iterations ({record['seconds']:.0f} s)")
    if record["evaluations"]:
        last = record["evaluations"][-1]
        click.echo(f"mAP@0.5 {last['mAP']:.4f}, attribute accuracy {last['attribute_accuracy']:.4f} "
                   f"on {sum(len(ids) for ids in eval_ids)} images")


@main.command("demo")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Folder for the demo's stores and report.")
@click.option("--images", type=click.IntRange(min=1), default=200, show_default=True,
              help="How many images the demo processes.")
@click.option("--train-steps", type=click.IntRange(min=0), default=None,
              help="Steps of the closing pretraining run [trainer/configs/demo.yaml's: 300]; 0: none.")
def demo_cmd(out, images, train_steps):
    """Run the main job end to end on the embedded default and write a report: extraction,
    pair stores, detection scores, and a short pretraining run with its loss curves and
    zero-shot retrieval."""
    from vlp.demo import run_demo

    report = run_demo(out, num_images=images, train_steps=train_steps)
    click.echo(f"demo finished: open {report}")


def _parse_train_min_sizes(text: str) -> tuple:
    """Comma-separated integers; their range is the trainer's to check (it knows the preset)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if not p.isdecimal()]  # isdigit() also passes "²", which int() refuses
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not a whole number of pixels", param_hint="--train-min-sizes")
    return tuple(int(p) for p in parts)


def _parse_overrides(pairs) -> dict:
    from vlp.detectors.config import parse_setting_pairs

    try:
        return parse_setting_pairs(pairs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.command(cls=_Command, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="vlp-extract")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Feature store folder.")
@click.option("--preset", default="butd-10-100", show_default=True,
              help="Detector preset: butd-10-100, butd-36, lxmert-36, or demo (the shipped slim detector).")
@click.option("--weights", type=click.Path(exists=True),
              help="Checkpoint: pytorch_model.bin (HF) or faster_rcnn_from_caffe_attr.pkl, or a folder "
                   "holding one. Not needed for --preset demo.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a detector setting, e.g. --set min_boxes=36 --set max_boxes=36 (repeatable).")
@click.option("--format", "storage", type=STORAGE, default="lmdb", show_default=True, help="Shard format.")
@click.option("--shard-size", type=click.IntRange(min=1), default=FEATURE_SHARD_SIZE, show_default=True,
              help="Images per shard.")
@click.option("--overwrite", is_flag=True, help="Delete what --out holds and start fresh (default: continue).")
@click.option("--file-list", type=click.Path(exists=True, dir_okay=False),
              help="Extract the images listed in this file (one path per line, relative to IMAGES_DIR); "
                   "entries that lead outside IMAGES_DIR ('..', absolute paths, symlinks) are refused.")
@click.option("--boxes", "boxes_file", type=click.Path(exists=True, dir_okay=False),
              help="Given boxes: a json-lines file of {\"image\": relative path (or \"image_id\"), \"boxes\": "
                   "[[x1, y1, x2, y2], ...]} (pixels); only those images are extracted, one region per box in "
                   "the given order (the detector's given-box mode), e.g. the gt_boxes.jsonl of "
                   "vlp-build import-refcoco / import-vcr.")
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
                 boxes_file, glob_pattern, limit, dry_run, max_pixels, device, dtype, batch_size, workers, gpus_per_worker,
                 threads_per_worker, chunk_size, address, num_cpus, progress):
    """Extract bottom-up-attention region features for every image under IMAGES_DIR.

    Images are found recursively (jpg, png, gif, webp, bmp, tiff, ...; any case); each is
    named by its path relative to IMAGES_DIR without the extension. Features, boxes and
    labels go into --out as LMDB or Arrow shards with a manifest; images that cannot be
    used are listed in --out/errors.jsonl with the reason; counts and timings go to
    --out/stats.json.

    Rerunning the same command continues an interrupted run (kill, crash or Ctrl-C):
    stored images and logged failures are skipped, unfinished shards are redone.

    \b
    Examples:
      vlp-extract photos/ -o feats/ --preset demo
      vlp-extract coco/val2014 --out coco-feats --weights pytorch_model.bin --set min_boxes=36 --set max_boxes=36
      vlp-extract coco/train2014 -o refcoco-gt --weights pytorch_model.bin --boxes refcoco-pairs/gt_boxes.jsonl
    """
    from vlp.pipeline.extract import ExtractSettings, dry_run as plan_run, run_extract, summary_lines

    settings = ExtractSettings(
        preset=preset, weights=weights, overrides=_parse_overrides(overrides), device=device, dtype=dtype,
        batch_size=batch_size, storage=storage, shard_size=shard_size, overwrite=overwrite, file_list=file_list,
        boxes=boxes_file, glob=glob_pattern, limit=limit, max_pixels=max_pixels, address=address, num_cpus=num_cpus,
        workers=workers, gpus_per_worker=gpus_per_worker, threads_per_worker=threads_per_worker,
        chunk_size=chunk_size, progress=progress)
    if dry_run:
        _print_dry_run(plan_run(images_dir, out, settings), workers or 1)
        return
    try:
        with _stop_on_first_interrupt("stopping: committed shards are kept, unfinished ones dropped") as stop:
            stats = run_extract(images_dir, out, settings, should_stop=stop.is_set if stop else None)
    except KeyboardInterrupt:
        stats = {"interrupted": True}
    if stats.get("interrupted"):
        stored = stats.get("already_stored", 0) + stats.get("stored", 0)
        click.echo(f"interrupted: {stored} images stored in {out} so far; to continue, rerun the same command",
                   err=True)
        sys.exit(130)
    click.echo("\n".join(summary_lines(stats, Path(out))))


def _print_dry_run(plan: dict, workers: int) -> None:
    from vlp.core.progress import format_duration

    click.echo(f"{plan['images']} images, {plan['bytes'] / 1e6:.1f} MB")
    if plan["already_stored"] or plan["already_failed"]:
        click.echo(f"already done: {plan['already_stored']} stored, {plan['already_failed']} failed earlier")
    for relative, reason in plan["skipped_files"]:
        click.echo(f"skipped: {relative}: {reason}")
    for entry in plan["missing"]:
        click.echo(f"missing from the file list: {entry}")
    for entry, reason in plan["refused"]:
        click.echo(f"refused from the file list: {entry}: {reason}")
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
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def build_main(verbose):
    """Build pair stores (image + text) from feature stores and annotation files.

    Every sub-command writes one pair store (Arrow shards of one pair kind + manifest.json
    with the builder's counts) to --out, lists unusable input rows in --out/errors.jsonl,
    and prints a one-paragraph summary. See README, "vlp-build".
    """
    _setup_logging(verbose)


def _build_options(func):
    options = [
        click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output pair-store folder."),
        click.option("--overwrite", is_flag=True, help="Replace a pair store already at --out."),
        click.option("--shard-size", type=click.IntRange(min=1), default=PAIR_SHARD_SIZE, show_default=True,
                     help="Pairs per shard."),
        click.option("--progress", type=click.Choice(["auto", "bar", "lines", "off"]), default="auto",
                     show_default=True, help="Progress bar, periodic log lines, or none."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _input_options(func):
    """Options of builders that read annotation files."""
    options = [
        click.option("--features", type=click.Path(exists=True, file_okay=False),
                     help="Check the pairs against this feature store and report images it lacks "
                          "(pairs are kept either way)."),
        click.option("--strict", is_flag=True, help="Stop at the first malformed input row (default: "
                                                    "count it, log it to --out/errors.jsonl, go on)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _id_template_option(default: str, fields: str):
    return click.option("--image-id-template", default=default, show_default=True,
                        help=f"How a dataset image becomes a store image_id (Python format string; fields: {fields}).")


def _done(result) -> None:
    click.echo(result.summary())


class _BuildCommand(_Command):
    """A vlp-build sub-command: unreadable files and folders are one ``Error:`` line too."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (IsADirectoryError, PermissionError, UnicodeError) as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            name = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{name}{exc.strerror or exc}") from None


_NAMES = click.Choice(["display", "synonyms"])
_NAMES_HELP = ("display: the first name of a vocab line ('gray,grey' -> gray); synonyms: one of the line's "
               "names per region, picked by a stable hash of image and region.")


_SPLITS_FROM = click.option(
    "--splits-from", type=click.Path(exists=True),
    help="Take each image's split from this pair store (e.g. the COCO import of the same images) or split file "
         "(json {image_id: split} or {split: [image_id, ...]}, or text lines 'image_id split'); images it "
         "lacks get --split and are counted.")


@build_main.command("objects-labels", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("features_dir", type=click.Path(exists=True, file_okay=False))
@_build_options
@click.option("--attr-conf-floor", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="Prefix a region's attribute when its confidence is at least this (BUTD's demo threshold).")
@click.option("--obj-conf-floor", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Skip regions whose object confidence is below this.")
@click.option("--names", type=_NAMES, default="display", show_default=True, help=_NAMES_HELP)
@click.option("--split", default="", help="Split name written into every pair (with --splits-from: into those "
                                          "whose image it lacks) [none].")
@_SPLITS_FROM
def build_objects_labels_cmd(features_dir, out, overwrite, shard_size, progress, attr_conf_floor,
                             obj_conf_floor, names, split, splits_from):
    """LAMP objects-labels pairs: per image, 'attribute category' of each region.

    words / word_regions give the region row of every word, text = words joined by spaces,
    pair_id = IMAGE_ID#objects_labels.
    """
    from vlp.builders.labels import build_objects_labels

    _done(build_objects_labels(features_dir, out, attr_conf_floor=attr_conf_floor, obj_conf_floor=obj_conf_floor,
                               names=names, overwrite=overwrite, shard_size=shard_size, split=split,
                               splits_from=splits_from, progress=progress))


@build_main.command("labels-in-order", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("features_dir", type=click.Path(exists=True, file_okay=False))
@_build_options
@click.option("--names", type=_NAMES, default="display", show_default=True, help=_NAMES_HELP)
@click.option("--split", default="", help="Split name written into every pair (with --splits-from: into those "
                                          "whose image it lacks) [none].")
@_SPLITS_FROM
def build_labels_in_order_cmd(features_dir, out, overwrite, shard_size, progress, names, split, splits_from):
    """MSP token-stage / IFRS pairs: one category label per region, in region order.

    labels and label_ids align 1:1 with the regions; pair_id = IMAGE_ID#labels_in_order.
    """
    from vlp.builders.labels import build_labels_in_order

    _done(build_labels_in_order(features_dir, out, names=names, overwrite=overwrite, shard_size=shard_size,
                                split=split, splits_from=splits_from, progress=progress))


@build_main.command("vg-phrases", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("vg_dir", type=click.Path(exists=True, file_okay=False))
@_build_options
@_input_options
@click.option("--max-phrases", type=click.IntRange(min=1), default=20, show_default=True,
              help="At most this many phrases per image.")
@click.option("--max-chars", type=click.IntRange(min=1), default=512, show_default=True,
              help="At most this many characters of text per image.")
@click.option("--verb-rule", type=click.Choice(["vb", "no-vbn"]), default="vb", show_default=True,
              help="vb: a token tagged VB* (Penn) makes a verb phrase; no-vbn: VB* except VBN "
                   "(past participles like 'striped' count as adjectives).")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="Tagger processes [one per CPU].")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Phrases per spaCy batch.")
@_id_template_option("{image_id}", "{image_id}, {folder} (VG_100K or VG_100K_2, from image_data.json), {coco_id}")
def build_vg_phrases_cmd(vg_dir, out, overwrite, shard_size, progress, features, strict, max_phrases, max_chars,
                         verb_rule, processes, batch_size, image_id_template):
    """MSP phrase-stage pairs: VG region phrases without verbs, joined with ', ' per image.

    Reads VG_DIR/region_descriptions.json (+ image_data.json when present; both id
    variants: region_id / id, image_id / id). Verbs are found with spaCy en_core_web_sm's
    tagger. pair_id = IMAGE_ID#vg_phrases.
    """
    from vlp.builders.vg_phrases import build_vg_phrases

    _done(build_vg_phrases(vg_dir, out, max_phrases=max_phrases, max_chars=max_chars, verb_rule=verb_rule,
                           n_process=processes, batch_size=batch_size, image_id_template=image_id_template,
                           features=features, overwrite=overwrite, strict=strict, shard_size=shard_size,
                           progress=progress))


def _import_kw(out, overwrite, shard_size, progress, features, strict) -> dict:
    return dict(overwrite=overwrite, shard_size=shard_size, progress=progress, features=features, strict=strict)


_FILES = click.Path(exists=True, dir_okay=False)


@build_main.command("import-coco", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("caption_files", nargs=-1, type=_FILES)
@_build_options
@_input_options
@click.option("--karpathy", type=_FILES, help="Karpathy dataset_coco.json: its splits (train/restval/val/test); "
                                             "alone (no CAPTION_FILES) its sentences are imported.")
@click.option("--split", default=None, help="Split of every pair [from --karpathy, else the file name].")
@_id_template_option("{stem}", "{stem} (file_name without extension), {file_name}, {id}")
def import_coco_cmd(caption_files, out, overwrite, shard_size, progress, features, strict, karpathy, split,
                    image_id_template):
    """COCO captions json (captions_train2014.json ...) -> caption pairs (pair_id coco/ANNOTATION_ID)."""
    from vlp.builders.imports import import_coco

    _done(import_coco(caption_files, out, karpathy=karpathy, split=split, image_id_template=image_id_template,
                      **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("import-flickr30k", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("karpathy_json", type=_FILES)
@_build_options
@_input_options
@click.option("--split", default=None, help="Split of every pair [the Karpathy split of each image].")
@_id_template_option("{stem}", "{stem} (filename without extension), {filename}, {filepath}, {id}")
def import_flickr30k_cmd(karpathy_json, out, overwrite, shard_size, progress, features, strict, split,
                         image_id_template):
    """Flickr30k Karpathy json (dataset_flickr30k.json) -> caption pairs (pair_id flickr30k/SENTID)."""
    from vlp.builders.imports import import_karpathy

    _done(import_karpathy(karpathy_json, out, dataset="flickr30k", split=split, image_id_template=image_id_template,
                          **_import_kw(out, overwrite, shard_size, progress, features, strict)))


def _web_options(func):
    options = [
        click.option("--split", default="train", show_default=True, help="Split of every pair."),
        click.option("--samples-per-shard", type=click.IntRange(min=1), default=10_000, show_default=True,
                     help="img2dataset's number_sample_per_shard (defines {shard}/{folder}/{key})."),
        _id_template_option("{folder}/{key}", "{row} (0-based), {key}, {shard}, {folder}, {url}; default = "
                                              "vlp-extract over an img2dataset output folder"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@build_main.command("import-cc", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("source", type=click.Path(exists=True))
@_build_options
@_input_options
@click.option("--columns", type=click.Choice(["auto", "caption,url", "url,caption"]), default="auto",
              show_default=True, help="TSV column order; auto: the column that looks like a URL is the url "
                                      "(CC3M is caption,url; CC12M url,caption).")
@_web_options
def import_cc_cmd(source, out, overwrite, shard_size, progress, features, strict, columns, split,
                  samples_per_shard, image_id_template):
    """Conceptual Captions TSV, or an img2dataset output folder -> caption pairs with url.

    The TSV is streamed; pair_id = cc/ROW. From an img2dataset folder only rows with
    status success are imported (pair_id img2dataset/KEY).
    """
    from vlp.builders.imports import import_cc

    _done(import_cc(source, out, columns=columns, split=split, samples_per_shard=samples_per_shard,
                    image_id_template=image_id_template,
                    **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("import-sbu", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("sbu_json", type=_FILES)
@_build_options
@_input_options
@_web_options
def import_sbu_cmd(sbu_json, out, overwrite, shard_size, progress, features, strict, split, samples_per_shard,
                   image_id_template):
    """SBU captions json (parallel lists image_urls / captions) -> caption pairs with url (pair_id sbu/ROW)."""
    from vlp.builders.imports import import_sbu

    _done(import_sbu(sbu_json, out, split=split, samples_per_shard=samples_per_shard,
                     image_id_template=image_id_template,
                     **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("import-vqa", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=_FILES)
@_build_options
@_input_options
@click.option("--min-answer-count", type=click.IntRange(min=1), default=9, show_default=True,
              help="Answer vocabulary: normalized consensus answers of at least this many questions.")
@click.option("--vocab-splits", default="train", show_default=True,
              help="Comma-separated splits whose annotations build the vocabulary (train,val: the "
                   "bottom-up-attention recipe).")
@click.option("--answer-vocab", type=_FILES, help="Use this json list of answers as the vocabulary instead.")
@click.option("--score-scheme", type=click.Choice(["vqa", "butd"]), default="vqa", show_default=True,
              help="Soft score of an answer given by c annotators: vqa min(1, c/3); butd min(1, 0.3c).")
@_id_template_option("auto", "{image_id}, {subtype} (the file's data_subtype); auto: with --features the first "
                           "of COCO_{subtype}_{image_id:012d}, {subtype}/COCO_{subtype}_{image_id:012d}, "
                           "{image_id:012d}, {image_id} that finds the most images, without the first")
def import_vqa_cmd(files, out, overwrite, shard_size, progress, features, strict, min_answer_count, vocab_splits,
                   answer_vocab, score_scheme, image_id_template):
    """VQA v2 questions + annotations json -> question pairs with normalized, soft-scored answers.

    FILES: questions and annotations files in any order (matched by question_id). The
    answer vocabulary goes to OUT/answer_vocab.json; pair_id = vqa/QUESTION_ID.
    """
    from vlp.builders.imports import import_vqa

    _done(import_vqa(files, out, min_count=min_answer_count,
                     vocab_splits=tuple(s.strip() for s in vocab_splits.split(",") if s.strip()),
                     answer_vocab=answer_vocab, score_scheme=score_scheme, image_id_template=image_id_template,
                     **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("import-gqa", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=_FILES)
@_build_options
@_input_options
@click.option("--split", default=None, help="Split of every pair [from each file name].")
@_id_template_option("{image_id}", "{image_id} (the question's imageId)")
def import_gqa_cmd(files, out, overwrite, shard_size, progress, features, strict, split, image_id_template):
    """GQA questions json (train_balanced_questions.json ...) -> question pairs (pair_id gqa/QID)."""
    from vlp.builders.imports import import_gqa

    _done(import_gqa(files, out, split=split, image_id_template=image_id_template,
                     **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("import-nlvr2", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=_FILES)
@_build_options
@_input_options
@_id_template_option("{stem}", "{stem} (SPLIT-SET-PAIR-img0/1), {split}, {directory} (train's folder number)")
def import_nlvr2_cmd(files, out, overwrite, shard_size, progress, features, strict, image_id_template):
    """NLVR2 json lines (train.json, dev.json, ...) -> nlvr2 pairs with two images (pair_id nlvr2/IDENTIFIER)."""
    from vlp.builders.imports import import_nlvr2

    _done(import_nlvr2(files, out, image_id_template=image_id_template,
                       **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("import-snli-ve", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=_FILES)
@_build_options
@_input_options
@click.option("--split", default=None, help="Split of every pair [from each file name].")
@_id_template_option("{flickr_id}", "{flickr_id} (Flickr30K_ID)")
def import_snli_ve_cmd(files, out, overwrite, shard_size, progress, features, strict, split, image_id_template):
    """SNLI-VE json lines (snli_ve_train.jsonl ...) -> entailment pairs (pair_id snli-ve/PAIRID)."""
    from vlp.builders.imports import import_snli_ve

    _done(import_snli_ve(files, out, split=split, image_id_template=image_id_template,
                         **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("import-vizwiz", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=_FILES)
@_build_options
@_input_options
@click.option("--split", default=None, help="Split of every pair [from each file name].")
@click.option("--min-answer-count", type=click.IntRange(min=1), default=1, show_default=True,
              help="OUT/answer_vocab.json: consensus answers of at least this many questions of --vocab-splits.")
@click.option("--vocab-splits", default="train", show_default=True,
              help="Comma-separated splits whose questions build OUT/answer_vocab.json.")
@click.option("--score-scheme", type=click.Choice(["vqa", "butd"]), default="vqa", show_default=True,
              help="Soft score of an answer given by c annotators: vqa min(1, c/3); butd min(1, 0.3c).")
@_id_template_option("{stem}", "{stem} (the image file name without extension), {image}")
def import_vizwiz_cmd(files, out, overwrite, shard_size, progress, features, strict, split, min_answer_count,
                      vocab_splits, score_scheme, image_id_template):
    """VizWiz VQA json (train.json, val.json, test.json) -> question pairs (pair_id vizwiz/IMAGE_STEM).

    Answers normalized and soft-scored as VQA ("unanswerable" is an answer); the raw
    answers are kept (human_answers) for the official accuracy.
    """
    from vlp.builders.imports import import_vizwiz

    _done(import_vizwiz(files, out, split=split, min_count=min_answer_count,
                        vocab_splits=tuple(s.strip() for s in vocab_splits.split(",") if s.strip()),
                        score_scheme=score_scheme, image_id_template=image_id_template,
                        **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("import-mmimdb", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("dataset_dir", type=click.Path(exists=True, file_okay=False))
@_build_options
@_input_options
@click.option("--split-file", type=_FILES,
              help="split.json {train, dev, test} (dev -> val) [the split.json beside DATASET_DIR].")
@_id_template_option("{id}", "{id} (the movie id: the json file's stem, as its poster <id>.jpeg)")
def import_mmimdb_cmd(dataset_dir, out, overwrite, shard_size, progress, features, strict, split_file,
                      image_id_template):
    """MM-IMDB dataset/<id>.json -> multilabel pairs: text = the plot, labels = the genres (pair_id mmimdb/ID)."""
    from vlp.builders.imports import import_mmimdb

    _done(import_mmimdb(dataset_dir, out, split_file=split_file, image_id_template=image_id_template,
                        **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("import-refcoco", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("refs_file", type=_FILES)
@click.argument("instances_json", type=_FILES)
@_build_options
@_input_options
@click.option("--dataset", default="refcoco+", show_default=True,
              help="Name in pair ids and the source column (refcoco, refcoco+, refcocog).")
@click.option("--split", "splits", multiple=True, help="Keep only refs of this split (repeatable) [all].")
@_id_template_option("{stem}", "{stem} (the instances image's file_name without extension), {file_name}, {id}")
def import_refcoco_cmd(refs_file, instances_json, out, overwrite, shard_size, progress, features, strict, dataset,
                       splits, image_id_template):
    """RefCOCO(+/g) refs(unc).p + instances.json -> refexp pairs (one per expression; target box and
    annotation id; pair_id DATASET/SENT_ID). The pickle is read with the restricted unpickler.
    Also writes --out/gt_boxes.jsonl (each image's annotation boxes) for vlp-extract --boxes."""
    from vlp.builders.imports import import_refcoco

    _done(import_refcoco(refs_file, instances_json, out, dataset=dataset, splits=list(splits) or None,
                         image_id_template=image_id_template,
                         **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("import-vcr", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=_FILES)
@_build_options
@_input_options
@click.option("--images-dir", type=click.Path(exists=True, file_okay=False),
              help="vcr1images/ (the metadata json files with the boxes) [vcr1images/ beside the files].")
@click.option("--split", default=None, help="Split of every pair [from the file name].")
@_id_template_option("{path}", "{path} (img_fn without extension), {stem}, {img_fn}")
def import_vcr_cmd(files, out, overwrite, shard_size, progress, features, strict, images_dir, split,
                   image_id_template):
    """VCR train.jsonl / val.jsonl / test.jsonl -> vcr pairs (question, four answers, four rationales;
    object tags become label words linked to their region; pair_id vcr/ANNOT_ID). With the
    metadata json files, also --out/gt_boxes.jsonl for vlp-extract --boxes."""
    from vlp.builders.imports import import_vcr

    _done(import_vcr(files, out, images_dir=images_dir, split=split, image_id_template=image_id_template,
                     **_import_kw(out, overwrite, shard_size, progress, features, strict)))


@build_main.command("hard-negatives", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("features_dir", type=click.Path(exists=True, file_okay=False))
@_build_options
@click.option("--top-m", type=click.IntRange(min=1), default=10, show_default=True,
              help="Negatives per image: the M most similar other images.")
@click.option("--captions", type=click.Path(exists=True, file_okay=False),
              help="A caption pair store: images sharing an identical caption (case and spacing ignored) "
                   "with the query are never its negatives.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="fp32: every score in fp32. bf16: bf16 candidates, fp32 rescoring, certified per row "
                   "(same result; ~2.5x faster on CPUs with bf16 units). auto: bf16 where bf16 products "
                   "are native (AVX-512-BF16/AMX CPUs, Ampere+ GPUs), else fp32.")
@click.option("--block", type=click.IntRange(min=1), default=1024, show_default=True, help="Query rows per matmul.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--split", default="", help="Split name written into every pair (with --splits-from: into those "
                                          "whose image it lacks) [none].")
@_SPLITS_FROM
def build_hard_negatives_cmd(features_dir, out, overwrite, shard_size, progress, top_m, captions, precision, block,
                             device, split, splits_from):
    """ITM hard negatives: per image, the top-M most similar other images.

    Cosine similarity of mean-pooled region features (fp32), exact search in blocks
    (torch matmul + topk, GPU when present). pair_id = IMAGE_ID#hard_negatives.
    """
    from vlp.builders.hard_negatives import build_hard_negatives

    _done(build_hard_negatives(features_dir, out, top_m=top_m, captions=captions, block=block, device=device,
                               precision=precision, overwrite=overwrite, shard_size=shard_size, split=split,
                               splits_from=splits_from, progress=progress))


@build_main.command("topics", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("pairs_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--features", required=True, type=click.Path(exists=True, file_okay=False),
              help="The feature store whose region labels define L.")
@_build_options
@click.option("--obj-conf-floor", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Ignore regions whose object confidence is below this.")
def build_topics_cmd(pairs_dir, features, out, overwrite, shard_size, progress, obj_conf_floor):
    """Copy a pair store adding the topics column: text words that are region labels (W ∩ L).

    Words are singularized by rule ("dogs" -> dog) and matched against every synonym
    of the image's object labels; pairs whose image has no features get no topics.
    """
    from vlp.builders.topics import build_topics

    _done(build_topics(pairs_dir, features, out, obj_conf_floor=obj_conf_floor, overwrite=overwrite,
                       shard_size=shard_size, progress=progress))


@build_main.command("web-filter", cls=_BuildCommand, context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@_build_options
@click.option("--features", type=click.Path(exists=True, file_okay=False),
              help="Feature store of the same images: enables the naturalness and semantic stages (skipped without).")
@click.option("--model", type=click.Path(exists=True, dir_okay=False),
              help="Model file of train-web-scorer [default: the shipped one, trained on the synthetic world].")
@click.option("--image-id-template", default="{key}", show_default=True,
              help="How a row's image becomes a feature-store image_id (fields: key, stem, path).")
@click.option("--min-bytes", type=click.IntRange(min=0), default=5120, show_default=True, help="Smallest image file (COYO).")
@click.option("--min-side", type=click.IntRange(min=0), default=300, show_default=True,
              help="Both sides must be larger (ImageBERT 300; COYO 200).")
@click.option("--max-aspect", type=click.FloatRange(min=1), default=3.0, show_default=True, help="Longest/shortest side.")
@click.option("--unnatural-threshold", type=click.FloatRange(0, 1), default=None,
              help="Reject when P(unnatural) >= this [the model's, 0.5].")
@click.option("--lang-floor", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Keep a text when py3langid's P(English) >= this.")
@click.option("--min-chars", type=click.IntRange(min=0), default=5, show_default=True, help="Text must be longer.")
@click.option("--min-words", type=click.IntRange(min=0), default=3, show_default=True,
              help="Text must have at least this many words.")
@click.option("--max-words", type=click.IntRange(min=1), default=256, show_default=True,
              help="Text must have at most this many words.")
@click.option("--max-oov", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Highest share of words not in wordfreq's English list.")
@click.option("--no-noun-check", is_flag=True, help="Do not require a noun (skips spaCy).")
@click.option("--min-score", type=click.FloatRange(0, 1), default=None,
              help="Semantic stage: keep pairs scoring at least this [the model's threshold].")
@click.option("--keep-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Semantic stage: keep this share of the best-scored pairs instead of --min-score.")
@click.option("--max-images-per-text", type=click.IntRange(min=1), default=10, show_default=True,
              help="K: a text on more distinct images is dropped everywhere (COYO).")
@click.option("--phash-distance", type=click.IntRange(-1, 16), default=4, show_default=True,
              help="Images whose pHashes differ in at most this many bits are one image (-1: sha256 only).")
@click.option("--engine", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
              help="ray: input shards in Ray tasks, the aggregation as Ray Data shuffles; local: all in this process.")
@click.option("--address", default=None, help="Ray cluster address (e.g. auto) [a local Ray].")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of the local Ray [all].")
@click.option("--shard-rows", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Rows per input shard of a records file (the unit of resume).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Rows per batch of the stages inside a shard's Ray task.")
def build_web_filter_cmd(inputs, out, overwrite, shard_size, progress, features, model, image_id_template, min_bytes,
                         min_side, max_aspect, unnatural_threshold, lang_floor, min_chars, min_words, max_words, max_oov,
                         no_noun_check, min_score, keep_fraction, max_images_per_text, phash_distance, engine, address,
                         num_cpus, shard_rows, batch_size):
    """LAIT-style filtering of web image-text rows into a web pair store, with a funnel.

    INPUTS: crawl folders or records files (jsonl/parquet: key, url, image_path, alt, title,
    surrounding_text, lang_hint) and img2dataset output folders (files or tar shards).
    Stages: image, naturalness*, text, language, text_rules, semantic*, aggregation
    (* with --features). Writes OUT (pairs with url and score), OUT/rejected.jsonl,
    OUT/funnel.html; a killed run resumes from OUT.work when rerun.
    """
    from vlp.builders.web_filter import FilterConfig, web_filter

    config = FilterConfig(features=features, model=model, image_id_template=image_id_template, min_bytes=min_bytes,
                          min_side=min_side, max_aspect=max_aspect, unnatural_threshold=unnatural_threshold,
                          lang_floor=lang_floor, min_chars=min_chars, min_words=min_words, max_words=max_words,
                          max_oov=max_oov, need_noun=not no_noun_check, min_score=min_score,
                          keep_fraction=keep_fraction, max_images_per_text=max_images_per_text,
                          phash_distance=phash_distance)
    try:
        with _stop_on_first_interrupt("stopping after this shard: finished shards are kept") as stop:
            result = web_filter(list(inputs), out, config=config, engine=engine, address=address, num_cpus=num_cpus,
                                shard_rows=shard_rows, batch_size=batch_size, overwrite=overwrite,
                                shard_size=shard_size, progress=progress,
                                should_stop=stop.is_set if stop else None)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished shards are kept in {out}.work; rerun the same command to go on", err=True)
        sys.exit(130)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    _done(result)
    click.echo(f"Rejected rows: {Path(out) / 'rejected.jsonl'}; funnel: {Path(out) / 'funnel.html'}")


@build_main.command("train-web-scorer", cls=_BuildCommand, context_settings=CONTEXT)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Model file to write (JSON).")
@click.option("--world", type=click.Path(exists=True, file_okay=False),
              help="A synthetic world (vlp synth): train on its captions, oracle features and web/ crawl.")
@click.option("--captions", type=click.Path(exists=True, file_okay=False),
              help="Clean caption pair store: positives of the semantic scorer.")
@click.option("--caption-features", type=click.Path(exists=True, file_okay=False),
              help="Feature store of the caption store's images.")
@click.option("--crawl", type=click.Path(exists=True, file_okay=False),
              help="Labelled crawl folder (records.jsonl + truth.jsonl with key, category): trains the naturalness "
                   "classifier (category unnatural) and adds good / mismatch rows to the semantic scorer.")
@click.option("--crawl-features", type=click.Path(exists=True, file_okay=False),
              help="Feature store of the crawl's images, named by key.")
@click.option("--keep-good", type=click.FloatRange(0.5, 1), default=0.98, show_default=True,
              help="The semantic threshold keeps this share of the positives it was trained on (at most 0.5).")
def build_train_web_scorer_cmd(out, world, captions, caption_features, crawl, crawl_features, keep_good):
    """Fit the web filter's naturalness classifier and semantic scorer (logistic regressions
    stored as JSON numbers; nothing is pickled)."""
    from vlp.builders.web_filter.train import train_from_world, train_web_scorer

    if world is None and captions is None and crawl is None:
        raise click.UsageError("give --world, or --captions/--caption-features and/or --crawl/--crawl-features")
    try:
        if world is not None:
            summary = train_from_world(world, out, keep_good=keep_good)
        else:
            summary = train_web_scorer(out, captions=captions, caption_features=caption_features, crawl=crawl,
                                       crawl_features=crawl_features, keep_good=keep_good)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Wrote {out}: naturalness {summary['naturalness']}, semantic {summary['semantic']}, "
               f"thresholds {summary['thresholds']}.")


@build_main.command("generate-captions", cls=_BuildCommand, context_settings=CONTEXT)
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True),
              help="A vlp-train captioner run folder (its captioner.pt and vocab.txt).")
@click.option("--features", "features_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Feature store of the (out-of-domain) images to caption.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output pair-store folder.")
@click.option("--decoding", type=click.Choice(["nucleus", "beam", "greedy"]), default="nucleus", show_default=True,
              help="nucleus: top-p sampling; beam: beam search (the best --num-captions beams); greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True,
              help="Nucleus mass (--decoding nucleus).")
@click.option("--beam-size", type=click.IntRange(min=1), default=3, show_default=True, help="Beams (--decoding beam).")
@click.option("--num-captions", type=click.IntRange(min=1), default=1, show_default=True, help="Captions per image.")
@click.option("--filter", "min_score", type=float, default=None,
              help="Keep captions whose score (mean token log-prob, <= 0) is at least this.")
@click.option("--max-len", type=click.IntRange(min=1), default=None,
              help="Most WordPiece tokens per caption [the model's max_caption_len].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of nucleus sampling.")
@click.option("--split", default="train", show_default=True, help="Split of every pair.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per forward pass.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per task handed to a worker.")
@click.option("--num-workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Ray actors (one per GPU when the cluster has GPUs, else this many CPU actors); 0: this process.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of a local Ray instance.")
@click.option("--address", default=None, help="Join a running Ray cluster (e.g. auto).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: GPU actors when the Ray cluster (or, with --num-workers 0, this machine) has GPUs.")
@click.option("--overwrite", is_flag=True, help="Replace a pair store at --out and start over (drops earlier work).")
@click.option("--progress", type=click.Choice(["auto", "bar", "lines", "off"]), default="auto", show_default=True,
              help="Progress bar, periodic log lines, or none.")
def generate_captions_cmd(model_dir, features_dir, out, decoding, top_p, beam_size, num_captions, min_score, max_len,
                          seed, split, batch_size, chunk_size, num_workers, num_cpus, address, device, overwrite,
                          progress):
    """Caption every image of a feature store with a trained captioner -> generated pairs
    (Singh et al.'s CC-generated captions), with score and generator columns.

    Resumable: rerunning the same command after a stop or a kill continues where it was and
    captions every image exactly once (work in OUT.generating/ until the store is written).
    """
    from vlp.trainer.captioning.generate import GenerateError, GenerateSettings, generate_captions, summary_lines

    try:
        settings = GenerateSettings(decoding=decoding, top_p=top_p, beam_size=beam_size, num_captions=num_captions,
                                    max_len=max_len, seed=seed, batch_size=batch_size, chunk_size=chunk_size,
                                    num_workers=num_workers, num_cpus=num_cpus, address=address, device=device,
                                    min_score=min_score, split=split, overwrite=overwrite)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    with _stop_on_first_interrupt("stopping after the current images; captions so far are kept") as stop:
        try:
            stats = generate_captions(model_dir, features_dir, out, settings, progress=progress,
                                      should_stop=stop.is_set if stop else None)
        except (GenerateError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    for line in summary_lines(stats, out):
        click.echo(line)
    if not stats["complete"]:
        sys.exit(130)


# --- end of vlp-build ---


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="vlp-train")
def train_main():
    """Pretrain V&L transformers on feature stores and pair stores, finetune and evaluate them on
    downstream tasks (VQA, VizWiz, GQA, SNLI-VE, NLVR2, MM-IMDB)."""


def _resolve_config(config_path: str, shipped: dict) -> str:
    """A config file, or the name of a shipped config (vlp/trainer/configs/NAME.yaml)."""
    if not Path(config_path).exists():
        if config_path not in shipped:
            raise click.BadParameter(f"{config_path}: no such file, and not a shipped config "
                                     f"({', '.join(sorted(shipped))})", param_hint="CONFIG")
        config_path = str(shipped[config_path])
    return config_path


def _start_run(out, config, *, resume: bool, device: str, num_workers: int, progress: str) -> str:
    """What pretrain and finetune do before training: pick the device, silence transformers'
    own weight-loading bar unless bars are wanted, apply the run-folder rules. The device."""
    import torch

    from vlp.trainer.config import ConfigError
    from vlp.trainer.runs import RunFolderError, prepare_run_folder

    if device == "auto" and num_workers == 1:  # with workers: GPUs when the Ray cluster has enough
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if progress != "bar":
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        for warning in prepare_run_folder(out, config, resume=resume):
            click.echo(f"warning: {warning}", err=True)
    except (RunFolderError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    return device


def _echo_stages(summaries, detail=lambda summary: "") -> None:
    """One line per stage summary of a multi-stage run (plus ``detail(summary)`` when not empty)."""
    for summary in summaries:
        if summary["skipped"]:
            click.echo(f"stage {summary['stage']}: already finished")
            continue
        last = f", last loss {summary['last_loss']:.4f}" if summary.get("last_loss") is not None else ""
        by_source = "".join(f", {name} {value:.4f}" for name, value in (summary.get("source_losses") or {}).items())
        if by_source:
            last += f" (running loss by source{by_source})"
        click.echo(f"stage {summary['stage']}: steps {summary['start_step']} -> {summary['end_step']}{last} "
                   f"({summary['dir']})")
        extra = detail(summary)
        if extra:
            click.echo(extra)


def _exit_if_interrupted(stop, summaries, command: str, config_path, out) -> None:
    """After Ctrl-C stopped a multi-stage run mid-stage: say how to go on, exit 130."""
    last = summaries[-1] if summaries else {"skipped": True}
    if stop and stop.is_set() and not last["skipped"] and last["end_step"] < last["steps"]:
        click.echo(f"interrupted at step {last['end_step']} of {last['steps']} in stage {last['stage']} "
                   f"(checkpoint saved); continue with: vlp-train {command} {config_path} --out {out} --resume",
                   err=True)
        sys.exit(130)


@train_main.command("pretrain")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Run folder: one sub-folder per stage with checkpoints and history.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False),
              help="A BERT checkpoint directory for the text side (replaces model.text_checkpoint).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--num-workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Data-parallel workers (Ray Train DDP: gloo on CPU, nccl on GPU); 1: this process.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Override every stage's precision (autocast; fp16 needs a GPU).")
@click.option("--progress", default="auto", show_default=True,
              type=click.Choice(["auto", "bar", "lines", "off"]), help="Progress display.")
@click.option("--resume", is_flag=True,
              help="Continue the run in OUT from its last checkpoints (finished stages are skipped).")
def train_pretrain_cmd(config_path, out, init_from, device, num_workers, precision, progress, resume):
    """Run the stages of a YAML schedule CONFIG, one after the other.

    Each stage names its data (one pair store, or several sources with their own tasks
    and mixing ratios), tasks and weights, steps or epochs, batch size and learning
    rate schedule; the model carries over between stages. The same command with --resume
    continues a stopped run from its last checkpoints and skips finished stages. Writes
    OUT/config.yaml, OUT/NN-stage/ (checkpoints, history.jsonl, eval.jsonl, tensorboard/)
    and OUT/loss_curves.png. Example configs: vlp/trainer/configs/ (trainer/configs/ in
    the repository); CONFIG may also name one of them: `vlp-train pretrain demo --out run`
    trains on the stores `vlp demo` wrote to demo-out/, with no BERT checkpoint.
    """
    import dataclasses

    from vlp.trainer.config import ConfigError, load_config
    from vlp.trainer.pretrain import NonFiniteLossError
    from vlp.trainer.reporting import plot_loss_curves, summarize
    from vlp.trainer.runs import train
    from vlp.trainer.schedule import check_stores, shipped_configs

    config_path = _resolve_config(config_path, shipped_configs())
    try:
        config = load_config(config_path)
        if init_from:
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, text_checkpoint=init_from,
                                                                           vocab=None))
        if precision:
            config = config.replace_stages(precision=precision)
        check_stores(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    device = _start_run(out, config, resume=resume, device=device, num_workers=num_workers, progress=progress)
    with _stop_on_first_interrupt(_STOP_TRAINING, enabled=num_workers == 1) as stop:
        try:
            summaries = train(config, out, device=device, num_workers=num_workers, progress=progress,
                              should_stop=stop.is_set if stop else None)
        except (NonFiniteLossError, ValueError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from None
    _echo_stages(summaries)
    click.echo(summarize(out))
    try:
        click.echo(f"loss curves: {plot_loss_curves(out)}")
    except FileNotFoundError:
        pass
    _exit_if_interrupted(stop, summaries, "pretrain", config_path, out)



@train_main.command("finetune")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Run folder: config.yaml, labels.json, 01-finetune/ (checkpoints, history), best.pt, results.json.")
@click.option("--init", "init", type=click.Path(exists=True),
              help="A vlp-train pretrain run folder (its last stage's last checkpoint), a checkpoint file, or a "
                   "BERT directory (text side); without it the encoder starts from random weights.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--num-workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Data-parallel workers (Ray Train DDP: gloo on CPU, nccl on GPU), as for pretrain; 1: this "
                   "process. DataLoader processes: train.num_workers.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Override train.precision (autocast; fp16 needs a GPU).")
@click.option("--progress", default="auto", show_default=True,
              type=click.Choice(["auto", "bar", "lines", "off"]), help="Progress display.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
def train_finetune_cmd(config_path, out, init, device, num_workers, precision, progress, resume):
    """Finetune on the downstream task of a YAML CONFIG (task: and train: sections).

    Evaluates on the validation split every train.eval_every steps and at the end, keeps
    the best weights by the task's main metric in OUT/best.pt and reports them in
    OUT/results.json. Same run-folder rules, resume, Ctrl-C and TensorBoard as pretrain.
    Example configs: vlp/trainer/configs/finetune-*.yaml; `vlp-train finetune
    finetune-demo-vqa --out ft` runs on the stores `vlp demo` wrote to demo-out/.
    """
    import dataclasses

    from vlp.trainer.config import ConfigError, load_finetune_config
    from vlp.trainer.finetune import InitError, check_finetune_stores, finetune, is_bert_dir
    from vlp.trainer.pretrain import NonFiniteLossError
    from vlp.trainer.reporting import summarize
    from vlp.trainer.schedule import shipped_finetune_configs

    config_path = _resolve_config(config_path, shipped_finetune_configs())
    try:
        config = load_finetune_config(config_path)
        if init and is_bert_dir(init):
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, text_checkpoint=init,
                                                                           vocab=None))
            init = None
        if precision:
            config = config.replace_stages(precision=precision)
        check_finetune_stores(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    device = _start_run(out, config, resume=resume, device=device, num_workers=num_workers, progress=progress)
    with _stop_on_first_interrupt(_STOP_TRAINING, enabled=num_workers == 1) as stop:
        try:
            if num_workers > 1:
                from vlp.trainer.distributed import run_distributed_finetune

                summary = run_distributed_finetune(config, out, num_workers=num_workers, init=init, device=device,
                                                   progress=progress)
            else:
                summary = finetune(config, out, init=init, device=device, progress=progress,
                                   should_stop=stop.is_set if stop else None)
        except (InitError, ConfigError, NonFiniteLossError, ValueError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from None
    last = f", last loss {summary['last_loss']:.4f}" if summary.get("last_loss") is not None else ""
    frozen = f", base frozen ({summary['trainable_parameters']} trainable parameters)" if summary["freeze_base"] else ""
    click.echo(f"{summary['task']}: steps {summary['start_step']} -> {summary['end_step']} of {summary['steps']}"
               f"{last}{frozen}; {summary['labels']} labels ({summary['label_source']}); "
               f"{summary['train_pairs']} train / {summary['val_pairs']} val pairs")
    if summary.get("init"):
        click.echo(f"encoder initialised from {summary['init']['checkpoint']}")
    best = summary.get("best")
    if best:
        click.echo(f"best: step {best['step']}, {best['metric']} {best['value']:.4f} ({Path(out) / 'best.pt'})")
    click.echo(summarize(out))
    if stop and stop.is_set() and summary["end_step"] < summary["steps"]:
        click.echo(f"interrupted at step {summary['end_step']} of {summary['steps']} (checkpoint saved); continue "
                   f"with: vlp-train finetune {config_path} --out {out} --resume", err=True)
        sys.exit(130)


@train_main.command("captioner")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Run folder: 01-xe/, 02-scst/ (checkpoints, history), captioner.pt, vocab.txt, results.json.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Override the stages' precision (autocast; fp16 needs a GPU).")
@click.option("--progress", default="auto", show_default=True,
              type=click.Choice(["auto", "bar", "lines", "off"]), help="Progress display.")
@click.option("--num-workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Data-parallel workers (Ray Train DDP: gloo on CPU, nccl on GPU), as for pretrain; 1: this process.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
def train_captioner_cmd(config_path, out, device, precision, progress, num_workers, resume):
    """Train a region-feature captioner on caption pairs: cross-entropy, then SCST with the
    CIDEr-D reward when the CONFIG has an scst: section.

    Same loop as pretrain (checkpoints, exact --resume, Ctrl-C, TensorBoard). Reports BLEU,
    METEOR (Java), ROUGE-L and CIDEr-D on the test split after each stage in
    OUT/results.json. CONFIG may name a shipped config: captioner (d 512, 3+3 layers) or
    captioner-demo (a tiny model on the stores `vlp demo` wrote to demo-out/).
    """
    from vlp.trainer.captioning.config import load_captioner_config, shipped_captioner_configs
    from vlp.trainer.captioning.train import check_captioner_stores, train_captioner
    from vlp.trainer.config import ConfigError
    from vlp.trainer.pretrain import NonFiniteLossError

    config_path = _resolve_config(config_path, shipped_captioner_configs())
    try:
        config = load_captioner_config(config_path)
        if precision:
            config = config.replace_stages(precision=precision)
        check_captioner_stores(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    device = _start_run(out, config, resume=resume, device=device, num_workers=num_workers, progress=progress)
    with _stop_on_first_interrupt(_STOP_TRAINING, enabled=num_workers == 1) as stop:
        try:
            if num_workers > 1:
                from vlp.trainer.captioning.train import run_distributed_captioner

                summaries = run_distributed_captioner(config, out, num_workers=num_workers, device=device,
                                                      progress=progress)
            else:
                summaries = train_captioner(config, out, device=device, progress=progress,
                                            should_stop=stop.is_set if stop else None)
        except (NonFiniteLossError, ConfigError, ValueError, RuntimeError) as exc:
            raise click.ClickException(str(exc)) from None
    from vlp.trainer.captioning.metrics import metric_line

    _echo_stages(summaries, lambda summary: f"  test: {metric_line(summary['test'])}" if summary.get("test") else "")
    _exit_if_interrupted(stop, summaries, "captioner", config_path, out)
    click.echo(f"captioner: {Path(out) / 'captioner.pt'}")


@train_main.command("evaluate")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--pairs", "pairs_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Pair store of the task's kind.")
@click.option("--features", "features_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Feature store of its images.")
@click.option("--split", default="test", show_default=True,
              help="Split(s) of the pair store to score, comma-separated; 'all' for every pair.")
@click.option("--predictions", type=click.Path(dir_okay=False),
              help="Also write per-item predictions in the task's official format (VQA/VizWiz/GQA json, "
                   "NLVR2 csv, SNLI-VE/MM-IMDB json lines).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: task.eval_batch_size.")
@click.option("--shortlist", type=click.IntRange(min=1), default=None,
              help="Retrieval: cross-score only the top K images of each caption and top K captions of each "
                   "image by a first-stage similarity (an approximation; default: task.shortlist, else every pair).")
@click.option("--num-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Retrieval: Ray workers scoring the caption x image pairs.")
@click.option("--zero-shot", is_flag=True,
              help="Retrieval: RUN_DIR is a vlp-train pretrain run; score PAIRS with its ITM head, nothing finetuned.")
@click.option("--progress", default="auto", show_default=True,
              type=click.Choice(["auto", "bar", "lines", "off"]), help="Retrieval: progress of the scoring.")
def train_evaluate_cmd(run_dir, pairs_dir, features_dir, split, predictions, device, batch_size, shortlist,
                       num_workers, zero_shot, progress):
    """Score the best checkpoint of a finetune RUN_DIR on a split of PAIRS.

    Writes RUN_DIR/results.json (under "evaluations") and RUN_DIR/results.md; pairs without
    gold labels (a test split) are predicted but not scored. Retrieval scores every caption of
    the split against every image of it (R@1/5/10 both ways); --zero-shot does the same with a
    pretraining run's ITM head.
    """
    import torch

    from vlp.trainer.config import ConfigError
    from vlp.trainer.finetune import evaluate_run

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    splits = None if split == "all" else [s for s in split.split(",") if s]
    if zero_shot:
        from vlp.trainer.retrieval_zero_shot import zero_shot_evaluate

        try:
            metrics = zero_shot_evaluate(run_dir, pairs_dir, features_dir, split=splits, device=device,
                                         batch_size=batch_size or 64, shortlist=shortlist, num_workers=num_workers,
                                         progress=progress)
        except (ConfigError, ValueError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from None
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        click.echo(f"zero-shot retrieval, {'/'.join(splits or ['all'])} of {pairs_dir}: {shown}")
        return
    try:
        entry = evaluate_run(run_dir, pairs_dir, features_dir, split=splits, predictions=predictions, device=device,
                             batch_size=batch_size, shortlist=shortlist, num_workers=num_workers, progress=progress)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    metrics = entry["metrics"]
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    click.echo(f"{entry['split']} of {pairs_dir} (best step {entry['best_step']}): {shown or 'no gold labels'}")
    click.echo(f"results: {Path(run_dir) / 'results.json'}, {Path(run_dir) / 'results.md'}")
    if entry.get("predictions"):
        click.echo(f"predictions: {entry['predictions']}")


if __name__ == "__main__":
    main()
