"""Training examples from a pair store joined with a feature store.

:class:`PairDataset` turns pair ``i`` into tensors: ``[CLS] text [SEP]`` token ids
(BertTokenizerFast, truncated to ``max_text_len``), region features (float32), normalized
box geometry, detector labels for MOC, optional ``cls_prob`` soft labels for MOC-KL and,
for ``objects_labels`` pairs, the region of each label token (LAMP). :func:`collate` pads a
list of examples into a batch with masks; :class:`LengthBucketBatchSampler` groups
examples of similar length, deterministically from ``(seed, epoch)`` so a run can resume
at an exact batch.

Pairs whose image has no features are skipped and counted (``dataset.skipped``,
``dataset.missing_image_ids``), never silently dropped: the count is logged at build time.

Everything random here is a pure function of ``(seed, epoch, index)``; masking
randomness lives in the training loop's generator (see :mod:`vlp.trainer.tasks`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)

BOX_DIMS = (4, 5, 7)
IGNORE = -100  # label value ignored by the losses (padding, missing labels)


# -- tokenizer ---------------------------------------------------------------------

def load_tokenizer(path, *, lowercase: Optional[bool] = None):
    """A BertTokenizerFast from a checkpoint directory (its vocab.txt) or a vocab file.

    ``lowercase`` defaults to the directory's tokenizer_config.json ``do_lower_case``
    (True when absent, as for uncased BERT).
    """
    import json

    from transformers import BertTokenizerFast

    path = Path(path)
    vocab_file = path / "vocab.txt" if path.is_dir() else path
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{vocab_file}: no BERT vocabulary (vocab.txt) found")
    if lowercase is None:
        lowercase = True
        config = vocab_file.parent / "tokenizer_config.json"
        if config.is_file():
            lowercase = bool(json.loads(config.read_text()).get("do_lower_case", True))
    import inspect

    if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers 4.x
        return BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=lowercase)
    # transformers 5.x: the vocabulary as a token -> id dict (one token a line, id = line number)
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    table = {}
    for index, token in enumerate(lines):
        table.setdefault(token.rstrip("\r"), index)
    return BertTokenizerFast(vocab=table, do_lower_case=lowercase)


# -- geometry ----------------------------------------------------------------------

def box_geometry(boxes: np.ndarray, width: int, height: int, dims: int = 5) -> np.ndarray:
    """Normalized box geometry, float32 [N, dims].

    4: x1/W, y1/H, x2/W, y2/H; 5: + area/(W*H); 7: + w/W, h/H (in that order).
    Values are clipped to [0, 1] (stores tolerate boxes a pixel past the border).
    """
    if dims not in BOX_DIMS:
        raise ValueError(f"box geometry must be 4, 5 or 7-d, got {dims}")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float32)
    norm = np.clip(boxes / scale, 0.0, 1.0)
    w = norm[:, 2] - norm[:, 0]
    h = norm[:, 3] - norm[:, 1]
    columns = [norm]
    if dims >= 5:
        columns.append((w * h)[:, None])
    if dims == 7:
        columns += [w[:, None], h[:, None]]
    return np.concatenate(columns, axis=1).astype(np.float32)


# -- dataset -----------------------------------------------------------------------

def feature_statistics(features, max_records: int = 2000, floor: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (at least ``floor``) of the region
    features of up to ``max_records`` records spread evenly over the store (float64 sums)."""
    keys = list(features.keys())
    if not keys:
        raise ValueError(f"{getattr(features, 'root', features)}: no records to compute feature statistics from")
    chosen = keys[:: max(1, len(keys) // max_records)][:max_records]
    total = square = None
    count = 0
    for key in chosen:
        values = np.asarray(features.get(key).features, dtype=np.float64)
        if total is None:
            total, square = values.sum(0), (values ** 2).sum(0)
        else:
            total += values.sum(0)
            square += (values ** 2).sum(0)
        count += len(values)
    if count == 0:
        raise ValueError(f"{getattr(features, 'root', features)}: the sampled records hold no regions")
    mean = total / count
    std = np.sqrt(np.maximum(square / count - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)


def split_filter(pairs, split) -> Optional[list[bool]]:
    """Which rows of ``pairs`` belong to ``split`` (a name or a list of names); None: all."""
    if split is None:
        return None
    names = {split} if isinstance(split, str) else set(split)
    column = pairs.column("split")
    wanted = [value in names for value in column]
    if not any(wanted):
        counts = collections.Counter(value or "(none)" for value in column)
        found = ", ".join(f"{name} {n}" for name, n in counts.most_common())
        raise ValueError(f"{getattr(pairs, 'root', pairs)}: no pair of split {'/'.join(sorted(names))} "
                         f"(the store has: {found})")
    return wanted


def stable_seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode("utf-8"))


class PairDataset(Dataset):
    """Examples of a (PairStore, FeatureStore) join.

    ``max_regions``: keep the first N regions of each record (stores keep regions in
    detector-score order). ``hard_negatives``: a PairStore of kind ``hard_negatives``;
    each example then carries ``negative`` (the regions of one of its image's hard
    negatives that have features, chosen from the ``hard_negative_top`` best by a pure
    function of seed, epoch and index). ``split``: keep only pairs of this split (a name
    or a list of names, from the store's ``split`` column), e.g. ``train`` of a store
    imported from a Karpathy split file.

    Downstream tasks (:mod:`vlp.trainer.downstream`): ``targets(pair) -> dict`` adds
    entries to each example (e.g. ``label``: the task's target tensor); ``second_image``
    (NLVR2) also loads the regions of the pair's ``image_id_2`` as ``image_2``, and a
    pair is kept only when both of its images have features.
    """

    def __init__(self, pairs, features, tokenizer, *, max_text_len: int = 40,
                 max_regions: Optional[int] = None, box_dims: int = 5,
                 hard_negatives=None, hard_negative_top: int = 5, seed: int = 0,
                 append_labels: int = 0, split=None, targets=None, second_image: bool = False,
                 answer_text: bool = False):
        if box_dims not in BOX_DIMS:
            raise ValueError(f"box_dims must be 4, 5 or 7, got {box_dims}")
        if max_text_len < 2:
            raise ValueError("max_text_len must leave room for [CLS] and [SEP]")
        self.pairs, self.features, self.tokenizer = pairs, features, tokenizer
        self.kind = pairs.kind
        self.max_text_len, self.max_regions, self.box_dims = max_text_len, max_regions, box_dims
        if append_labels and self.kind == "objects_labels":
            raise ValueError("append_labels is for caption-like pairs; objects_labels pairs are labels already")
        self.append_labels = int(append_labels)
        if answer_text and self.kind != "question":
            raise ValueError(f"answer_text is for question pairs; {getattr(pairs, 'root', pairs)} holds {self.kind} pairs")
        self.answer_text = bool(answer_text)
        self.seed, self.epoch = seed, 0
        self.targets, self.second_image = targets, bool(second_image)
        image_ids = pairs.column("image_id")
        second_ids = pairs.column("image_id_2") if self.second_image else None
        wanted = split_filter(pairs, split)
        present: dict[str, bool] = {}
        keep, missing, considered = [], set(), 0
        for index, image_id in enumerate(image_ids):
            if wanted is not None and not wanted[index]:
                continue
            considered += 1
            ok = present.get(image_id)
            if ok is None:
                ok = present[image_id] = image_id in features
            if ok and second_ids is not None:
                image_id = second_ids[index]
                ok = present.get(image_id)
                if ok is None:
                    ok = present[image_id] = image_id in features
            if ok:
                keep.append(index)
            else:
                missing.add(image_id)
        self.indices = np.asarray(keep, dtype=np.int64)
        self.skipped = considered - len(keep)
        self.missing_image_ids = sorted(missing)
        if self.skipped:
            shown = ", ".join(self.missing_image_ids[:5]) + (" ..." if len(missing) > 5 else "")
            log.warning("%s: %d of %d pair(s) skipped: their image has no features in %s (%s)",
                        getattr(pairs, "root", pairs), self.skipped, considered,
                        getattr(features, "root", features), shown)
        self.hard_negatives: Optional[dict[str, list[str]]] = None
        self.hard_negative_top = hard_negative_top
        if hard_negatives is not None:
            if hard_negatives.kind != "hard_negatives":
                raise ValueError(f"{hard_negatives}: expected a pair store of kind hard_negatives")
            table = {}
            for row in hard_negatives:
                order = np.argsort(-np.asarray(row.get("negative_scores") or [], dtype=np.float64),
                                   kind="stable")
                negs = [row["negatives"][j] for j in order]
                negs = [n for n in negs if n != row["image_id"] and present.get(n, n in features)]
                if negs:
                    table[row["image_id"]] = negs
            self.hard_negatives = table
        self._lengths: Optional[np.ndarray] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    # -- lengths for bucketing -----------------------------------------------------
    def text_lengths(self) -> np.ndarray:
        """Token count of every example's text ([CLS] and [SEP] included, truncated)."""
        if self._lengths is None:
            texts = self.pairs.column("text")
            if self.kind == "objects_labels":
                words = self.pairs.column("words")
                texts = [" ".join(w) if w else t for t, w in zip(texts, words)]
            texts = [texts[i] for i in self.indices]
            lengths = np.zeros(len(texts), dtype=np.int64)
            for start in range(0, len(texts), 4096):
                enc = self.tokenizer(texts[start:start + 4096], truncation=True,
                                     max_length=self.max_text_len, add_special_tokens=True)
                lengths[start:start + len(enc["input_ids"])] = [len(x) for x in enc["input_ids"]]
            self._lengths = lengths
        return self._lengths

    # -- examples ------------------------------------------------------------------
    def _tokenize(self, pair: dict, answer: Optional[str] = None):
        words = pair.get("words") if self.kind == "objects_labels" else None
        if answer is not None:  # Singh et al.'s VQA-P: "question [SEP] answer"
            enc = self.tokenizer(pair.get("text") or "", answer, truncation="only_first",
                                 max_length=self.max_text_len)
            token_regions = [-1] * len(enc["input_ids"])
        elif words:
            enc = self.tokenizer(list(words), is_split_into_words=True, truncation=True,
                                 max_length=self.max_text_len)
            regions = pair.get("word_regions") or []
            token_regions = [regions[w] if w is not None else -1 for w in enc.word_ids()]
        else:
            enc = self.tokenizer(pair.get("text") or "", truncation=True, max_length=self.max_text_len)
            token_regions = [-1] * len(enc["input_ids"])
        return list(enc["input_ids"]), token_regions

    def _label_tokens(self, record, regions_kept: int) -> tuple[list[int], list[int]]:
        """LAMP's label augmentation: a category and an attribute word for each of the first
        ``append_labels`` regions (2N labels: every region's top attribute, whatever its
        confidence), each word piece linked to its region (it takes the region's spatial
        embedding in place of a text position)."""
        from vlp.schemas.labels import region_label_words

        if record.objects_id is None:
            return [], []
        words, regions, _ = region_label_words(record, attr_conf_floor=0.0)
        kept = [(w, r) for w, r in zip(words, regions) if r < min(regions_kept, self.append_labels)]
        if not kept:
            return [], []
        enc = self.tokenizer([w for w, _ in kept], is_split_into_words=True, add_special_tokens=False)
        return list(enc["input_ids"]), [kept[w][1] for w in enc.word_ids()]

    def _sampled_answer(self, pair: dict, index: int, epoch: int) -> Optional[str]:
        """One of the question's answers, drawn in proportion to its score (its share of the
        annotators), a pure function of seed, epoch and pair; None when it has none."""
        answers = list(pair.get("answers") or [])
        if not answers:
            return None
        scores = np.asarray(pair.get("answer_scores") or [1.0] * len(answers), dtype=np.float64)
        scores = np.where(np.isfinite(scores) & (scores > 0), scores, 0.0)
        weights = scores / scores.sum() if scores.sum() > 0 else None
        rng = np.random.default_rng(stable_seed(self.seed, epoch, index, "answer"))
        return answers[int(rng.choice(len(answers), p=weights))]

    def _regions(self, image_id: str, record=None) -> dict:
        record = record if record is not None else self.features.get(image_id)
        n = record.num_boxes if self.max_regions is None else min(record.num_boxes, self.max_regions)
        # fp16 -> fp32 in numpy: one thread, where torch's copy would split a 36x2048 record
        # over the DataLoader process's threads and wait on a busy core
        feats = torch.from_numpy(np.array(record.features[:n], dtype=np.float32))
        out = {
            "region_features": feats,
            "region_boxes": torch.from_numpy(box_geometry(record.boxes[:n], record.image_w,
                                                          record.image_h, self.box_dims)),
        }
        if record.objects_id is not None:
            out["objects_id"] = torch.from_numpy(np.asarray(record.objects_id[:n], dtype=np.int64))
            out["attrs_id"] = torch.from_numpy(np.asarray(record.attrs_id[:n], dtype=np.int64))
            out["objects_conf"] = torch.from_numpy(np.array(record.objects_conf[:n], dtype=np.float32))
            out["attrs_conf"] = torch.from_numpy(np.array(record.attrs_conf[:n], dtype=np.float32))
        if record.cls_prob is not None:
            out["cls_prob"] = torch.from_numpy(np.array(record.cls_prob[:n], dtype=np.float32))
        if record.image_feature is not None:
            out["image_feature"] = torch.from_numpy(np.array(record.image_feature, dtype=np.float32))
        if self.append_labels:
            # label tokens belong to the image, not to the text: an image swapped in for ITM
            # brings its own labels (attach_label_tokens puts them after the text)
            label_ids, label_regions = self._label_tokens(record, n)
            out["label_ids"] = torch.tensor(label_ids, dtype=torch.long)
            out["label_regions"] = torch.tensor(label_regions, dtype=torch.long)
        return out

    def __getitem__(self, i: int) -> dict:
        return self.example(i, self.epoch)

    def example(self, i: int, epoch: int = 0) -> dict:
        """Example ``i``; ``epoch`` only picks which hard negative it shows."""
        index = int(self.indices[i])
        pair = self.pairs[index]
        record = self.features.get(pair["image_id"])
        answer = self._sampled_answer(pair, index, epoch) if self.answer_text else None
        input_ids, token_regions = self._tokenize(pair, answer)
        example = {
            "index": i,
            "pair_id": pair["pair_id"],
            "image_id": pair["image_id"],
            "text": pair.get("text") or "",
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "token_regions": torch.tensor(token_regions, dtype=torch.long),
        }
        example.update(self._regions(pair["image_id"], record))
        n = example["region_features"].shape[0]
        # Label tokens whose region was cut by max_regions lose their spatial link.
        example["token_regions"][example["token_regions"] >= n] = -1
        if pair.get("topics") is not None:
            example["topics"] = list(pair["topics"])
        if self.hard_negatives is not None:
            negs = self.hard_negatives.get(pair["image_id"])
            if negs:
                top = negs[: self.hard_negative_top]
                rng = np.random.default_rng(stable_seed(self.seed, epoch, index))
                negative_id = top[int(rng.integers(len(top)))]
                example["negative"] = {"image_id": negative_id, **self._regions(negative_id)}
        if self.second_image:
            example["image_2"] = {"image_id": pair["image_id_2"], **self._regions(pair["image_id_2"])}
        if self.targets is not None:
            example.update(self.targets(pair))
        return example


# -- collate -----------------------------------------------------------------------

def _pad(tensors: Sequence[torch.Tensor], value) -> torch.Tensor:
    length = max(t.shape[0] for t in tensors)
    out = tensors[0].new_full((len(tensors), length) + tuple(tensors[0].shape[1:]), value)
    for row, t in enumerate(tensors):
        out[row, : t.shape[0]] = t
    return out


def _collate_regions(examples: list[dict], feature_dim: Optional[int] = None) -> dict:
    lengths = torch.tensor([e["region_features"].shape[0] for e in examples])
    batch = {
        "region_features": _pad([e["region_features"] for e in examples], 0.0),
        "region_boxes": _pad([e["region_boxes"] for e in examples], 0.0),
        "region_mask": torch.arange(int(lengths.max()))[None, :] < lengths[:, None],
    }
    if all("objects_id" in e for e in examples):
        batch["objects_id"] = _pad([e["objects_id"] for e in examples], IGNORE)
        batch["attrs_id"] = _pad([e["attrs_id"] for e in examples], IGNORE)
        batch["objects_conf"] = _pad([e["objects_conf"] for e in examples], 0.0)
        batch["attrs_conf"] = _pad([e["attrs_conf"] for e in examples], 0.0)
    if all("cls_prob" in e for e in examples):
        batch["cls_prob"] = _pad([e["cls_prob"] for e in examples], 0.0)
    if all("image_feature" in e for e in examples):
        batch["image_feature"] = torch.stack([e["image_feature"] for e in examples])
    if all("label_ids" in e for e in examples):
        label_lengths = torch.tensor([len(e["label_ids"]) for e in examples])
        batch["label_ids"] = _pad([e["label_ids"] for e in examples], 0)
        batch["label_regions"] = _pad([e["label_regions"] for e in examples], -1)
        batch["label_mask"] = torch.arange(batch["label_ids"].shape[1])[None, :] < label_lengths[:, None]
    return batch


def attach_label_tokens(batch: dict, sep_token_id: int, pad_token_id: int = 0) -> dict:
    """LAMP's label-augmented text: each row's text, then the label tokens of the image the
    row shows (``label_ids``, which an ITM swap moves with the image) and ``[SEP]``.

    Returns a new batch without the label fields; a batch without them is returned as is.
    Called after the negatives are drawn and before any masking, so masked-token targets
    include the label tokens and a mismatched pair reads the labels of the image it shows.
    """
    if "label_ids" not in batch:
        return batch
    batch = dict(batch)
    label_ids, label_regions, label_mask = (batch.pop(k) for k in ("label_ids", "label_regions", "label_mask"))
    ids, regions = [], []
    sep = torch.tensor([sep_token_id], dtype=torch.long, device=label_ids.device)
    no_region = torch.tensor([-1], dtype=torch.long, device=label_ids.device)
    for row in range(batch["input_ids"].shape[0]):
        text = batch["text_mask"][row].bool()
        labels = label_mask[row].bool()
        if labels.any():
            ids.append(torch.cat([batch["input_ids"][row][text], label_ids[row][labels], sep]))
            regions.append(torch.cat([batch["token_regions"][row][text], label_regions[row][labels], no_region]))
        else:
            ids.append(batch["input_ids"][row][text])
            regions.append(batch["token_regions"][row][text])
    lengths = torch.tensor([len(x) for x in ids], device=label_ids.device)
    batch["input_ids"] = _pad(ids, pad_token_id)
    batch["token_regions"] = _pad(regions, -1)
    batch["text_mask"] = torch.arange(int(lengths.max()), device=label_ids.device)[None, :] < lengths[:, None]
    return batch


def collate(examples: list[dict], pad_token_id: int = 0) -> dict:
    """Pad a list of examples into a batch.

    Text: ``input_ids`` [B,T] (pad ``pad_token_id``), ``text_mask`` [B,T] bool,
    ``token_regions`` [B,T] (-1: no region). Regions: ``region_features`` [B,N,D],
    ``region_boxes`` [B,N,G], ``region_mask`` [B,N]; labels ``objects_id``/``attrs_id``
    [B,N] padded with -100; ``cls_prob`` [B,N,1601] when every example has it.
    ``negative`` (hard negatives) is collated the same way when any example has one;
    ``negative["negative_valid"]`` [B] says which rows really have one. Downstream
    examples: ``label`` stacked [B, ...]; ``image_2`` (NLVR2's right image) collated like
    the regions, with its ``image_id`` list.
    """
    ids = [e["input_ids"] for e in examples]
    lengths = torch.tensor([len(t) for t in ids])
    batch = {
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "pair_id": [e["pair_id"] for e in examples],
        "image_id": [e["image_id"] for e in examples],
        "text": [e["text"] for e in examples],
        "input_ids": _pad(ids, pad_token_id),
        "text_mask": torch.arange(int(lengths.max()))[None, :] < lengths[:, None],
        "token_regions": _pad([e["token_regions"] for e in examples], -1),
    }
    batch.update(_collate_regions(examples))
    if all("topics" in e for e in examples):
        batch["topics"] = [e["topics"] for e in examples]
    for key in ("source", "micro_batch"):  # set by MixedDataset: the same for the whole batch
        if key in examples[0]:
            batch[key] = examples[0][key]
    if any("negative" in e for e in examples):
        # rows without a hard negative hold their own image and negative_valid False
        negatives = [e.get("negative") or {"image_id": e["image_id"], **e} for e in examples]
        batch["negative"] = _collate_regions(negatives)
        batch["negative"]["image_id"] = [n["image_id"] for n in negatives]
        batch["negative"]["negative_valid"] = torch.tensor(["negative" in e for e in examples])
    if all("label" in e for e in examples):
        batch["label"] = torch.stack([e["label"] for e in examples])
    if all("image_2" in e for e in examples):
        batch["image_2"] = _collate_regions([e["image_2"] for e in examples])
        batch["image_2"]["image_id"] = [e["image_2"]["image_id"] for e in examples]
    return batch


def to_device(value, device):
    """Tensors of a batch (also inside dicts, e.g. the hard negatives) moved to ``device``;
    the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class Collator:
    """Picklable collate_fn bound to a pad token id (for DataLoader workers)."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        return collate(examples, self.pad_token_id)


# -- length-bucketed batches -------------------------------------------------------

class LengthBucketBatchSampler(Sampler):
    """Batches of examples of similar length, reproducible from ``(seed, epoch)``.

    Each epoch: shuffle all indices, cut them into buckets of ``bucket_batches`` batches,
    sort each bucket by length, cut it into batches, shuffle the batch order. Padding
    drops sharply while batches stay random. ``batches(epoch)`` gives an epoch's list, so
    a resumed run can skip the batches it has already seen.
    """

    def __init__(self, lengths, batch_size: int, *, bucket_batches: int = 50, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.bucket_batches = batch_size, max(1, bucket_batches)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch = 0
        self.start_batch = 0  # batches of the current epoch to skip (resume)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            batches = [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n)
            bucket = self.batch_size * self.bucket_batches
            batches = []
            for start in range(0, n, bucket):
                chunk = perm[start:start + bucket]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.lengths) // self.batch_size
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        yield from batches[self.start_batch:]


# -- mixtures of sources -----------------------------------------------------------

@dataclasses.dataclass
class DataSource:
    """One pair store of a stage: its examples, the tasks trained on its batches, and its
    mixing ``ratio`` (see :func:`mixing_probabilities`)."""

    name: str
    dataset: PairDataset
    tasks: tuple = ()
    ratio: Optional[float] = None


def mixing_probabilities(ratios: Sequence[Optional[float]], batch_counts: Sequence[int]) -> np.ndarray:
    """The probability that a micro-batch comes from each source.

    - No source has a ratio: in proportion to the batch counts (as if the sources were
      concatenated).
    - Every source has one: the ratios are relative weights (``[3, 1]`` = 75% / 25%).
    - Some have one: those are shares of all micro-batches (their sum must be below 1),
      and the rest is split among the others in proportion to their batch counts.
    """
    if len(ratios) != len(batch_counts):
        raise ValueError(f"{len(ratios)} mixing ratios for {len(batch_counts)} sources")
    given = [r for r in ratios if r is not None]
    if any(not r > 0 for r in given):
        raise ValueError(f"mixing ratios must be positive, got {list(ratios)}")
    counts = np.asarray(batch_counts, dtype=np.float64)
    if not given:
        return counts / counts.sum()
    if len(given) == len(ratios):
        weights = np.asarray(given, dtype=np.float64)
        return weights / weights.sum()
    share = float(sum(given))
    if share >= 1:
        raise ValueError(f"the sources' ratios {list(ratios)} add up to {share:g}: when only some sources "
                         "have a ratio, those are shares of all batches and must add up to less than 1")
    unset = np.array([r is None for r in ratios])
    probabilities = np.array([0.0 if r is None else r for r in ratios], dtype=np.float64)
    probabilities[unset] = (1 - share) * counts[unset] / counts[unset].sum()
    return probabilities


class MixturePlan:
    """Which source, epoch and batch every global micro-batch ``j`` reads.

    The source of ``j`` is drawn with :func:`mixing_probabilities` (``ratios``: one entry
    per sampler, None where unset) from a generator seeded by ``(seed, j // BLOCK)``; each source walks through its own epochs
    of length-bucketed batches. Everything is a pure function of ``j``, so a checkpoint
    only needs ``j`` to resume, and DDP ranks agree on the plan without talking.
    """

    BLOCK = 4096

    def __init__(self, samplers: Sequence["LengthBucketBatchSampler"], ratios: Sequence[Optional[float]],
                 seed: int = 0):
        if not samplers:
            raise ValueError("a stage needs at least one data source")
        self.samplers = list(samplers)
        self.batches_per_epoch = [len(s) for s in self.samplers]
        empty = [k for k, n in enumerate(self.batches_per_epoch) if n == 0]
        if empty:
            raise ValueError(f"data source {empty[0]} is empty: no pair has features")
        self.probabilities = mixing_probabilities(ratios, self.batches_per_epoch)
        self.seed = seed
        self._block: tuple[int, Optional[np.ndarray]] = (-1, None)
        self._epoch_batches: dict[tuple[int, int], list[list[int]]] = {}

    def _sources_of_block(self, block: int) -> np.ndarray:
        if self._block[0] != block:
            if len(self.samplers) == 1:
                draw = np.zeros(self.BLOCK, dtype=np.int64)
            else:
                rng = np.random.default_rng([self.seed, 0x5EED, block])
                draw = rng.choice(len(self.samplers), size=self.BLOCK, p=self.probabilities)
            self._block = (block, draw)
        return self._block[1]

    def source_of(self, j: int) -> int:
        return int(self._sources_of_block(j // self.BLOCK)[j % self.BLOCK])

    def counts_before(self, j: int) -> list[int]:
        """How many micro-batches each source gave to ``0 .. j-1``."""
        counts = np.zeros(len(self.samplers), dtype=np.int64)
        full, rest = divmod(j, self.BLOCK)
        for block in range(full):
            counts += np.bincount(self._sources_of_block(block), minlength=len(counts))
        if rest:
            counts += np.bincount(self._sources_of_block(full)[:rest], minlength=len(counts))
        return counts.tolist()

    def batch(self, source: int, count: int) -> tuple[int, int, list[int]]:
        """The ``count``-th batch a source gives: (epoch, batch in epoch, example indices)."""
        epoch, position = divmod(count, self.batches_per_epoch[source])
        key = (source, epoch)
        if key not in self._epoch_batches:
            self._epoch_batches = {k: v for k, v in self._epoch_batches.items() if k[0] != source}
            self._epoch_batches[key] = self.samplers[source].batches(epoch)
        return epoch, position, self._epoch_batches[key][position]

    def locate(self, j: int) -> tuple[int, int, int]:
        """(source, epoch, batch in epoch) of micro-batch ``j``."""
        source = self.source_of(j)
        epoch, position, _ = self.batch(source, self.counts_before(j)[source])
        return source, epoch, position

    def iterate(self, start: int = 0, *, rank: int = 0, world_size: int = 1) -> Iterator[tuple]:
        """``(j, source, epoch, batch in epoch, indices)`` for ``j = start, start+1, ...``
        that belong to ``rank`` (``j % world_size == rank``); endless."""
        counts = self.counts_before(start)
        j = start
        while True:
            source = self.source_of(j)
            if j % world_size == rank:
                epoch, position, indices = self.batch(source, counts[source])
                yield j, source, epoch, position, indices
            counts[source] += 1
            j += 1


class MixedBatchSampler(Sampler):
    """Batch sampler over a :class:`MixedDataset`: each batch is one source's micro-batch,
    as keys ``(j, source, epoch, index)``; starts at micro-batch ``start``."""

    def __init__(self, plan: MixturePlan, start: int = 0, *, rank: int = 0, world_size: int = 1):
        self.plan, self.start, self.rank, self.world_size = plan, start, rank, world_size

    def __iter__(self):
        for j, source, epoch, _, indices in self.plan.iterate(self.start, rank=self.rank,
                                                              world_size=self.world_size):
            yield [(j, source, epoch, i) for i in indices]


class MixedDataset(Dataset):
    """The sources of a stage behind one Dataset; keys come from :class:`MixedBatchSampler`."""

    def __init__(self, datasets: Sequence[PairDataset]):
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key) -> dict:
        j, source, epoch, index = key
        example = self.datasets[source].example(index, epoch)
        example["source"], example["micro_batch"] = source, j
        return example
