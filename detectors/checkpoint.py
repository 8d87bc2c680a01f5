"""Strict and safe loading (and saving) of detector checkpoints.

Two layouts are read, by file name suffix:

- ``.bin`` / ``.pt`` / ``.pth``: a torch state dict (e.g. HF ``unc-nlp/frcnn-vg-finetuned``
  ``pytorch_model.bin``, 640 keys incl. 104 ``num_batches_tracked``), loaded with
  ``torch.load(weights_only=True)``; a dict wrapping it under ``"model"`` or
  ``"state_dict"`` (detectron2 / Lightning style) is unwrapped.
- ``.pkl``: a detectron2 pickle ``{"model": {name: ndarray}, ...}`` (py-bottom-up-attention's
  ``faster_rcnn_from_caffe_attr.pkl``, 536 keys), read with the restricted unpickler of
  :mod:`vlp.schemas.safe_pickle` (numpy arrays, dicts, lists, strings and numbers only).

Both layouts use detectron2's parameter names, which are this model's names, so the
name mapping is small and explicit (:data:`KEY_RENAMES`, applied in order):
a ``module.`` prefix left by DataParallel/DDP is dropped. ``num_batches_tracked`` of a
frozen norm is accepted and ignored (BN statistics are frozen). The anchor buffer
``proposal_generator.anchor_generator.cell_anchors.0`` is loaded when present (the
checkpoint's anchors are what its RPN was trained with) and computed from the
architecture config when absent (detectron2 >= 0.2 no longer saves it).

Anything else is strict: every model key must be present, no checkpoint key may be left
over, and every shape must match; one :class:`CheckpointError` lists all problems.

A class-subset checkpoint (``save_checkpoint(..., classes=...)``, e.g. the shipped demo
detector, which knows 8 of the 1600 VG categories) stores the class rows of the box
predictor (``cls_score``, ``bbox_pred``, ``cls_embedding``) for those classes and the
background only, plus their VG indices under :data:`CLASS_SUBSET_KEY`. Loading restores the
full layout: the left-out classes get logit :data:`ABSENT_CLASS_LOGIT` (probability 0),
zero box deltas and a zero embedding, so the detector never predicts them and its class ids
stay VG's. Trained class heads put next to no probability on classes they never saw (under
3e-7 per RoI on average for the demo detector), which is what such a subset drops.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from vlp.core.durable import atomic_write
from vlp.detectors.errors import CheckpointError
from vlp.schemas.safe_pickle import safe_load
from vlp.schemas.shards import sha256_file

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_SUFFIXES = (".pkl",)

# (regex, replacement), applied in order to every checkpoint key.
KEY_RENAMES: list[tuple[str, str]] = [
    (r"^module\.", ""),
]
IGNORED_SUFFIX = ".num_batches_tracked"
OPTIONAL_KEYS = frozenset({"proposal_generator.anchor_generator.cell_anchors.0"})
#: Key of a class-subset checkpoint: the VG class indices (ascending) whose rows it stores.
CLASS_SUBSET_KEY = "roi_heads.box_predictor.stored_classes"
#: The class logit a class-subset checkpoint gives every class it left out (softmax: 0).
ABSENT_CLASS_LOGIT = -1.0e4
_PREDICTOR = "roi_heads.box_predictor."
# predictor tensors with one row per class (+ background, the last row) or 4 per class
_PER_CLASS_ROWS = {"cls_score.weight": 1, "cls_score.bias": 1, "cls_embedding.weight": 1,
                   "bbox_pred.weight": 4, "bbox_pred.bias": 4}

GET_WEIGHTS_HELP = (
    "Pass the path of a Visual Genome Faster R-CNN checkpoint as weights=..., either\n"
    "  - the Hugging Face unc-nlp/frcnn-vg-finetuned pytorch_model.bin "
    "(https://huggingface.co/unc-nlp/frcnn-vg-finetuned), or\n"
    "  - py-bottom-up-attention's faster_rcnn_from_caffe_attr.pkl "
    "(linked from https://github.com/airsplay/py-bottom-up-attention).\n"
    "Use allow_random=True only for tests and timing: random weights give meaningless features.")


__all__ = ["ABSENT_CLASS_LOGIT", "CLASS_SUBSET_KEY", "CheckpointError", "GET_WEIGHTS_HELP", "KEY_RENAMES",
           "check_checkpoint", "load_weights", "match_state_dict", "read_checkpoint", "rename_key",
           "save_checkpoint", "subset_checkpoint"]

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WEIGHTS_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", re.S)


def refusal_reason(path, exc: BaseException) -> str:
    """Our one-line message for a file ``torch.load(weights_only=True)`` refused.

    torch's own text advises retrying with ``weights_only=False`` (which would run whatever
    the file's pickle says) and carries terminal colour codes; we name the file and what
    it holds instead.
    """
    text = str(exc)
    found = _UNSUPPORTED_GLOBAL.search(text)
    if found:
        what = f"a pickled Python object ({found.group(1)})"
    else:
        detail = _WEIGHTS_UNPICKLER.search(text)
        what = "pickled data that is not plain tensors"
        if detail:
            what += f" ({' '.join(_ANSI.sub('', detail.group(1)).split())})"
    return (f"{path}: refused: the file holds {what}; vlp reads {'/'.join(TORCH_SUFFIXES)} checkpoints "
            f"only as tensors (torch.load weights_only=True) and never runs pickled code. Save a plain "
            f"state dict (name -> tensor) instead")


def _torch_load(path, *, mmap: bool = False):
    with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": our error says what matters
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(refusal_reason(path, exc)) from None
        except Exception as exc:
            reason = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"{path}: not a readable torch file ({type(exc).__name__}: {reason})") from None


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """The raw name -> tensor mapping of a checkpoint file (no renaming, no checks)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector checkpoint {path} does not exist (or is not a file).\n{GET_WEIGHTS_HELP}")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        try:
            with open(path, "rb") as f:
                data = safe_load(f, source=str(path))
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{path}: not loaded: {exc}") from None
        except Exception as exc:  # truncated / not a pickle
            raise CheckpointError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    elif suffix in TORCH_SUFFIXES:
        data = _torch_load(path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r}; expected one of "
                              f"{', '.join(TORCH_SUFFIXES + PICKLE_SUFFIXES)}")
    return _tensors(_unwrap(data, path), path)


def check_checkpoint(path) -> None:
    """Raise the :class:`CheckpointError` that :func:`read_checkpoint` would, cheaply: torch
    files in the zip format are memory-mapped, so their tensor data is not read. Lets a
    driver refuse a file before starting workers that would each fail to load it."""
    path = Path(path)
    if path.suffix.lower() in TORCH_SUFFIXES and path.is_file() and zipfile.is_zipfile(path):
        _tensors(_unwrap(_torch_load(path, mmap=True), path), path)
    else:
        read_checkpoint(path)


def _unwrap(data, path):
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(data).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(data.get(key), dict):
            return data[key]
    return data


def _tensors(state: dict, path) -> dict[str, torch.Tensor]:
    out = {}
    bad = []
    for name, value in state.items():
        if not isinstance(name, str):
            bad.append(repr(name))
            continue
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, np.ndarray):
            out[name] = torch.from_numpy(np.array(value, copy=True))
        elif isinstance(value, (int, float)) and name.endswith(IGNORED_SUFFIX):
            out[name] = torch.tensor(value)
        else:
            bad.append(f"{name} ({type(value).__name__})")
    if bad:
        raise CheckpointError(f"{path}: entries that are not arrays: {', '.join(bad[:20])}"
                              + (f" and {len(bad) - 20} more" if len(bad) > 20 else ""))
    return out


def rename_key(name: str) -> str:
    for pattern, replacement in KEY_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def match_state_dict(raw: dict[str, torch.Tensor], model: torch.nn.Module, source: str = "checkpoint", *,
                     absent_classes: str = "never_predicted"):
    """Map checkpoint tensors onto the model's keys; raise one error listing every problem.

    absent_classes: for a class-subset checkpoint, what the classes it left out get:
    ``"never_predicted"`` (logit :data:`ABSENT_CLASS_LOGIT`, zero deltas and embedding) or
    ``"model"`` (the model's current rows, e.g. a fresh initialisation that training can
    still move: from logit -1e4 a class would never be learnt).

    Returns (state dict ready for ``load_state_dict(strict=True)``, info dict with the
    detected layout and the ignored keys).
    """
    expected = model.state_dict()
    if absent_classes not in ("never_predicted", "model"):
        raise ValueError(f"absent_classes must be 'never_predicted' or 'model', got {absent_classes!r}")
    raw = _expand_class_subset(raw, expected, source, from_model=absent_classes == "model")
    norm_prefixes = {name.rsplit(".", 1)[0] for name in expected if name.endswith(".running_var")}
    state, ignored, unexpected, mismatched = {}, [], [], []
    renamed_from = {}  # model key -> checkpoint key that provided it
    for name, tensor in raw.items():
        key = rename_key(name)
        if key in renamed_from:
            unexpected.append(f"{name} (duplicates {renamed_from[key]})")
            continue
        renamed_from[key] = name
        if key.endswith(IGNORED_SUFFIX) and key[: -len(IGNORED_SUFFIX)] in norm_prefixes:
            ignored.append(name)
            continue
        if key not in expected:
            unexpected.append(name)
            continue
        target = expected[key]
        if tuple(tensor.shape) != tuple(target.shape):
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            continue
        if not tensor.is_floating_point() and target.is_floating_point():
            mismatched.append(f"{name}: checkpoint dtype {tensor.dtype} vs model {target.dtype}")
            continue
        state[key] = tensor.to(target.dtype)
    missing = [k for k in expected if k not in renamed_from and k not in OPTIONAL_KEYS]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape/dtype mismatches", mismatched)):
            if items:
                shown = "\n    ".join(items[:40])
                more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
                parts.append(f"  {label} ({len(items)}):\n    {shown}{more}")
        raise CheckpointError(f"{source} does not match the detector architecture "
                              f"({len(raw)} keys in the file, {len(expected)} in the model):\n"
                              + "\n".join(parts), missing=missing, unexpected=unexpected, mismatched=mismatched)
    for key in OPTIONAL_KEYS:
        if key not in state and key in expected:
            state[key] = expected[key]
    layout = "hf-state-dict" if ignored else "detectron2"
    return state, {"layout": layout, "ignored_keys": ignored, "num_keys": len(raw)}


def _class_rows(classes: torch.Tensor, rows_per_class: int, num_classes: int) -> torch.Tensor:
    """Row indices of ``classes`` in a predictor tensor (with the background row when the
    tensor has one per class plus background)."""
    if rows_per_class == 1:
        return torch.cat([classes, torch.tensor([num_classes])])
    return (classes[:, None] * rows_per_class + torch.arange(rows_per_class)).reshape(-1)


def _subset_state(state: dict[str, torch.Tensor], classes) -> dict[str, torch.Tensor]:
    """``state`` with only the predictor rows of ``classes`` (and the background)."""
    num_classes = int(state[_PREDICTOR + "cls_score.weight"].shape[0]) - 1
    try:
        kept = torch.as_tensor(sorted({int(c) for c in classes}), dtype=torch.int64)
    except (TypeError, ValueError):
        raise ValueError(f"classes must be class indices, got {classes!r}") from None
    if kept.numel() == 0 or int(kept[0]) < 0 or int(kept[-1]) >= num_classes:
        raise ValueError(f"classes must be 1 or more indices in [0, {num_classes}), got {kept.tolist()[:20]}")
    out = dict(state)
    for name, rows_per_class in _PER_CLASS_ROWS.items():
        out[_PREDICTOR + name] = state[_PREDICTOR + name][_class_rows(kept, rows_per_class, num_classes)]
    out[CLASS_SUBSET_KEY] = kept
    return out


def _expand_class_subset(raw: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str,
                         from_model: bool = False):
    """The full predictor layout of a class-subset checkpoint (``raw`` unchanged otherwise);
    the left-out rows never predicted, or ``expected``'s own with ``from_model``."""
    key_of = {rename_key(name): name for name in raw}
    if CLASS_SUBSET_KEY not in key_of:
        return raw
    full_scores = expected.get(_PREDICTOR + "cls_score.weight")
    if full_scores is None:
        raise CheckpointError(f"{source}: a class-subset checkpoint, but the model has no box predictor")
    num_classes = int(full_scores.shape[0]) - 1
    kept = raw[key_of[CLASS_SUBSET_KEY]]
    problem = None
    if (kept.dim() != 1 or kept.is_floating_point() or kept.is_complex() or kept.dtype == torch.bool
            or kept.numel() == 0):
        problem = f"must be a non-empty 1-D integer tensor, got {kept.dtype} of shape {tuple(kept.shape)}"
    else:
        kept = kept.to(torch.int64)
        if int(kept.min()) < 0 or int(kept.max()) >= num_classes:
            problem = f"indices must lie in [0, {num_classes}), got {int(kept.min())}..{int(kept.max())}"
        elif kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
            problem = "indices must be ascending and distinct"
    if problem:
        raise CheckpointError(f"{source}: {CLASS_SUBSET_KEY} {problem}")
    out = {name: tensor for name, tensor in raw.items() if name != key_of[CLASS_SUBSET_KEY]}
    for name, rows_per_class in _PER_CLASS_ROWS.items():
        key = _PREDICTOR + name
        rows = _class_rows(kept, rows_per_class, num_classes)
        stored, target = raw.get(key_of.get(key, key)), expected.get(key)
        if stored is None or target is None:
            continue  # reported by the strict matching as a missing / unexpected key
        if stored.dim() != target.dim() or stored.shape[0] != len(rows) or not stored.is_floating_point():
            raise CheckpointError(f"{source}: {key} of a class-subset checkpoint must be floating point with "
                                  f"{len(rows)} rows for its {kept.numel()} classes, "
                                  f"got {stored.dtype} {tuple(stored.shape)}")
        # other trailing sizes are another architecture: left for the strict matching to report
        if from_model and stored.shape[1:] == target.shape[1:]:
            full = target.clone()
        else:
            full = torch.zeros((target.shape[0], *stored.shape[1:]), dtype=stored.dtype)
            if name == "cls_score.bias":
                full.fill_(ABSENT_CLASS_LOGIT)
        full[rows] = stored.to(full.dtype)
        out[key_of.get(key, key)] = full
    return out


def load_weights(model: torch.nn.Module, path) -> dict:
    """Load a checkpoint file into ``model`` strictly and safely; returns info incl. sha256."""
    raw = read_checkpoint(path)
    state, info = match_state_dict(raw, model, source=str(path))
    model.load_state_dict(state, strict=True)
    info["sha256"] = sha256_file(path)
    info["path"] = os.fspath(path)
    return info


def save_checkpoint(model: torch.nn.Module, path, *, half: bool = False, classes=None) -> str:
    """Write the model's weights (detectron2 names, no num_batches_tracked); returns sha256.

    ``classes``: VG class indices; when given, only their box-predictor rows (and the
    background's) are written, with :data:`CLASS_SUBSET_KEY` (see the module docstring).

    ``.pkl`` writes the detectron2 layout ``{"model": {name: ndarray}}``, anything in
    TORCH_SUFFIXES a flat torch state dict. ``half=True`` stores floats as float16
    (loading converts back to float32). Written atomically (:func:`vlp.core.durable.atomic_write`):
    a reader, or a run killed while writing, sees the old file or the new one. The same
    weights give the same bytes (and sha256) whatever the file is called.
    """
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        state[name] = tensor.half() if half and tensor.is_floating_point() else tensor
    if classes is not None:
        state = _subset_state(state, classes)
    return write_state_dict(path, state)


def write_state_dict(path, state: dict[str, torch.Tensor]) -> str:
    """Write a flat state dict in the layout of ``path``'s suffix, atomically; returns sha256."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PICKLE_SUFFIXES + TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r}; expected one of "
                              f"{', '.join(TORCH_SUFFIXES + PICKLE_SUFFIXES)}")
    state = {name: tensor.contiguous() for name, tensor in state.items()}
    if suffix in PICKLE_SUFFIXES:
        atomic_write(path, lambda handle: pickle.dump({"model": {k: v.numpy() for k, v in state.items()}}, handle,
                                                      protocol=4))
    else:  # through a handle: the archive is named "archive", not after the (temporary) file
        atomic_write(path, lambda handle: torch.save(state, handle))
    return sha256_file(path)


def _model_state(path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under this model's names, without ``num_batches_tracked``."""
    return {rename_key(name): tensor for name, tensor in read_checkpoint(path).items()
            if not name.endswith(IGNORED_SUFFIX)}


def subset_checkpoint(path, out_path, classes) -> str:
    """Write the checkpoint at ``path`` as a class-subset checkpoint of ``classes`` (VG class
    indices) at ``out_path`` (atomically, tensors in their stored dtypes); returns its sha256.
    The same bytes as ``save_checkpoint(model, out_path, classes=classes)`` of the model it holds."""
    state = _model_state(path)
    if CLASS_SUBSET_KEY in state:
        raise CheckpointError(f"{path}: already a class-subset checkpoint "
                              f"({state[CLASS_SUBSET_KEY].numel()} classes); subset the full file")
    missing = [_PREDICTOR + name for name in _PER_CLASS_ROWS if _PREDICTOR + name not in state]
    if missing:
        raise CheckpointError(f"{path}: no box predictor to subset (missing {', '.join(missing)})")
    return write_state_dict(out_path, _subset_state(state, classes))


def interpolate_checkpoints(path_a, path_b, out_path, weight_b: float, *, half: bool = False) -> str:
    """Write ``(1 - weight_b) * a + weight_b * b`` of two checkpoints of one architecture (full
    layouts, the same keys under this model's names and the same shapes; ``num_batches_tracked``
    dropped, as :func:`subset_checkpoint` does) to ``out_path``, atomically; returns its sha256.

    Weight-space interpolation between two fine-tunes of a common ancestor (WiSE-FT, Wortsman
    et al. 2022): the demo detector's stage 19 mixes a file that keeps large single shapes with
    one trained longer at larger scales. Floats are mixed in float32 and written in float32,
    or float16 with ``half``; other tensors must be equal in both.
    """
    weight_b = float(weight_b)
    if not 0.0 <= weight_b <= 1.0:
        raise ValueError(f"weight_b must be between 0 and 1, got {weight_b}")
    a, b = _model_state(path_a), _model_state(path_b)
    problems = []
    for name in sorted(a.keys() ^ b.keys()):
        problems.append(f"{name} only in the {'first' if name in a else 'second'}")
    for name in sorted(a.keys() & b.keys()):
        if a[name].shape != b[name].shape:
            problems.append(f"{name}: shape {tuple(a[name].shape)} against {tuple(b[name].shape)}")
        elif a[name].is_floating_point() != b[name].is_floating_point() or (
                not a[name].is_floating_point() and not torch.equal(a[name], b[name])):
            problems.append(f"{name}: not a float tensor and not equal in both")
    if CLASS_SUBSET_KEY in a or CLASS_SUBSET_KEY in b:
        problems.insert(0, "a class-subset checkpoint: interpolate the full files")
    if problems:
        raise CheckpointError(f"cannot interpolate {path_a} and {path_b}: " + "; ".join(problems[:5])
                              + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    out = {}
    for name, tensor in a.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        mixed = (1.0 - weight_b) * tensor.float() + weight_b * b[name].float()
        out[name] = mixed.half() if half else mixed
    return write_state_dict(out_path, out)
