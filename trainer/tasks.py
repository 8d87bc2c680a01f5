"""Pretraining tasks: each a masking rule + a head + a loss, selectable by name.

============  ===========================================================================
name          what it does
============  ===========================================================================
MLM           15% of text tokens (never [CLS]/[SEP]/[PAD]/other specials): 80% [MASK],
              10% random token, 10% kept; CE on them (head tied to the word embeddings)
MOC           masked regions: CE for the detector category (1600) and attribute (400)
MOC_KL        masked regions: KL(cls_prob || softmax(head)) over 1601 classes; needs a store
              with ``cls_prob`` (``vlp-extract --set with_probs=true``), refused without
MRFR (MOR)    masked regions: L2 regression of the original region features
ITM (VLM)     50% of pairs get another image of the batch; binary matched/not on [CLS]
ITM_HS        as ITM, but the negative image is the pair's hard negative (the dataset's
              ``negative``, from a ``hard_negatives`` pair store)
IFRS          the features of region triplets shuffled with p=0.05 while boxes (and
              positions) stay; regress the original feature at each moved position
TITP / TITS   multi-label BCE over the vocabulary for the word pieces of the topic set
              W ∩ L, from [CLS] (pooled; option representation: regions = mean of the
              region outputs); TITP on phrases, TITS on sentences
============  ===========================================================================

Region masking (shared by MOC, MOC_KL, MRFR): 15% of the real regions; a masked region's
input is 80% zeros / 10% another real region's features of the batch / 10% kept.

Conditional masking: when ITM/ITM_HS is in the stage, masked-token and masked-region
losses (and the topic loss) are computed on matched pairs only.

All randomness comes from the ``torch.Generator`` passed to :func:`prepare_batch`, so a
run resumed with the saved generator state masks exactly as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlp.trainer.data import IGNORE, attach_label_tokens
from vlp.trainer.model import EncoderOutput

ENCODER_INPUTS = ("input_ids", "text_mask", "region_features", "region_boxes", "region_mask",
                  "token_regions", "image_feature", "region_masked", "region_mask_how")
#: how a masked region's input is replaced: zeros / another region's features / kept
REGION_MASK_SPLIT = (0.8, 0.1, 0.1)
REGION_FIELDS = ("region_features", "region_boxes", "region_mask", "objects_id", "attrs_id",
                 "objects_conf", "attrs_conf", "cls_prob")
#: LAMP's label tokens of the image (vlp.trainer.data.attach_label_tokens): they move with it
LABEL_FIELDS = ("label_ids", "label_regions", "label_mask")
_PAD_VALUE = {"objects_id": IGNORE, "attrs_id": IGNORE, "region_mask": False, "label_regions": -1,
              "label_mask": False}


@dataclasses.dataclass
class TaskContext:
    """What tasks need from the tokenizer."""

    vocab_size: int
    mask_id: int
    pad_id: int
    special_ids: tuple
    tokenizer: object = None
    sep_id: int = -1

    def regular_ids(self) -> torch.Tensor:
        """Every token id that is not special (cached)."""
        cached = getattr(self, "_regular", None)
        if cached is None:
            keep = torch.ones(self.vocab_size, dtype=torch.bool)
            keep[[i for i in self.special_ids if 0 <= i < self.vocab_size]] = False
            cached = self._regular = torch.nonzero(keep).flatten()
        return cached

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TaskContext":
        return cls(vocab_size=len(tokenizer), mask_id=tokenizer.mask_token_id,
                   pad_id=tokenizer.pad_token_id, special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
                   tokenizer=tokenizer, sep_id=tokenizer.sep_token_id)


def _zero_loss(reference: torch.Tensor) -> torch.Tensor:
    """A zero that keeps the graph (so backward works when a loss has no targets)."""
    return reference.sum() * 0.0


# -- masking rules -------------------------------------------------------------------

def mask_tokens(input_ids, text_mask, ctx: TaskContext, generator, prob: float = 0.15):
    """BERT masking. Returns (new input_ids, labels with IGNORE where not masked)."""
    special = torch.zeros_like(input_ids, dtype=torch.bool)  # randomness: CPU generator, moved
    for sid in ctx.special_ids:
        special |= input_ids == sid
    candidates = text_mask.bool() & ~special
    device = input_ids.device
    draw = torch.rand(input_ids.shape, generator=generator).to(device)
    masked = candidates & (draw < prob)
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE))
    action = torch.rand(input_ids.shape, generator=generator).to(device)
    # random replacements: uniform over the non-special tokens
    allowed = ctx.regular_ids()
    random_ids = allowed[torch.randint(0, len(allowed), input_ids.shape, generator=generator)].to(device)
    out = input_ids.clone()
    out[masked & (action < 0.8)] = ctx.mask_id
    swap = masked & (action >= 0.8) & (action < 0.9)
    out[swap] = random_ids[swap]
    return out, labels


def mask_regions(features, region_mask, generator, prob: float = 0.15, split=REGION_MASK_SPLIT):
    """Region masking. Returns (new features, masked bool [B,N], how: 0 zero / 1 random / 2 keep).

    ``split``: the shares of (zeros, another region's features, kept) among masked regions."""
    region_mask = region_mask.bool()
    device = features.device
    draw = torch.rand(region_mask.shape, generator=generator).to(device)
    masked = region_mask & (draw < prob)
    action = torch.rand(region_mask.shape, generator=generator).to(device)
    zero, other = float(split[0]), float(split[0]) + float(split[1])
    how = torch.where(action < zero, 0, torch.where(action < other, 1, 2))
    out = features.clone()
    out[masked & (how == 0)] = 0.0
    rand_rows = masked & (how == 1)
    if rand_rows.any():
        pool = features[region_mask]  # every real region of the batch
        if pool.shape[0] > 1:  # another region than the masked one itself
            own = (region_mask.flatten().long().cumsum(0) - 1).view(region_mask.shape)[rand_rows]
            pick = torch.randint(0, pool.shape[0] - 1, (int(rand_rows.sum()),), generator=generator).to(device)
            out[rand_rows] = pool[pick + (pick >= own).long()]
    return out, masked, how


def shuffle_triplets(features, boxes, region_mask, generator, prob: float = 0.05):
    """IFRS: permute the features of consecutive region triplets with probability ``prob`` each.

    Returns (features, boxes, moved bool [B,N], source index [B,N]); position j of the
    result holds the features of region ``source[j]``. Boxes stay where they are: a moved
    feature then sits at a location that is not its own, which every encoder can notice
    (LXMERT-S has no region order, only boxes). Identity permutations are never drawn, so
    every chosen triplet really moves.
    """
    batch, n = region_mask.shape
    source = torch.arange(n).expand(batch, n).clone()
    lengths = region_mask.long().sum(1).cpu()
    perms = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    for b in range(batch):
        triplets = int(lengths[b]) // 3
        if triplets == 0:
            continue
        chosen = torch.rand(triplets, generator=generator) < prob
        which = torch.randint(0, len(perms), (triplets,), generator=generator)
        for t in torch.nonzero(chosen).flatten().tolist():
            source[b, 3 * t:3 * t + 3] = 3 * t + perms[which[t]]
    moved = (source != torch.arange(n)).to(features.device)
    source = source.to(features.device)
    gather = source.unsqueeze(-1)
    features = torch.gather(features, 1, gather.expand(-1, -1, features.shape[-1]))
    return features, boxes, moved, source


def ifrs_restore(predicted, shuffled, moved):
    """Order that puts shuffled regions back: for each moved position, the shuffled region
    whose features are nearest the prediction (unmoved positions stay). Returns index [B,N]."""
    batch, n, _ = predicted.shape
    order = torch.arange(n, device=predicted.device).expand(batch, n).clone()
    distances = torch.cdist(predicted, shuffled)  # [B,N,N]
    allowed = moved.unsqueeze(1) & moved.unsqueeze(2)
    distances = distances.masked_fill(~allowed, float("inf"))
    nearest = distances.argmin(-1)
    return torch.where(moved, nearest, order)


def link_to_shown_regions(token_regions: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
    """Label tokens (LAMP) keep their region index into whatever image the row shows, and
    lose the link (-1) where that image has no such region. A swapped-in image thus gives
    its labels the geometry of its own k-th region: matched and mismatched pairs both
    carry label geometry, so its presence tells nothing about the match."""
    counts = region_mask.long().sum(1, keepdim=True)
    return torch.where(token_regions < counts, token_regions, torch.full_like(token_regions, -1))


def _swap_images(batch: dict, rows: torch.Tensor, source: dict, source_rows: torch.Tensor) -> None:
    """Put the regions of ``source[source_rows]`` into ``batch`` at ``rows`` (pads N as needed)."""
    for field in REGION_FIELDS + LABEL_FIELDS + ("image_feature",):
        if field not in batch:
            continue
        if field not in source:
            raise KeyError(f"cannot swap images: the negatives lack {field}")
        target, src = batch[field], source[field]
        if field != "image_feature":
            n = max(target.shape[1], src.shape[1])
            target, src = _pad_regions(target, n, field), _pad_regions(src, n, field)
        target = target.clone()
        target[rows] = src[source_rows]
        batch[field] = target


def _swap_texts(batch: dict, rows: torch.Tensor, source: dict, source_rows: torch.Tensor) -> None:
    """Put the captions of ``source[source_rows]`` into ``batch`` at ``rows`` (same padding)."""
    for field in TEXT_FIELDS:
        target = batch[field].clone()
        target[rows] = source[field][source_rows]
        batch[field] = target
    for field in ("text", "topics"):
        if field in batch:
            values = list(batch[field])
            for r, p in zip(rows.tolist(), source_rows.tolist()):
                values[r] = source[field][p]
            batch[field] = values


def _pad_regions(tensor, n, field):
    if tensor.shape[1] >= n:
        return tensor
    shape = (tensor.shape[0], n - tensor.shape[1]) + tuple(tensor.shape[2:])
    pad = torch.full(shape, _PAD_VALUE.get(field, 0), dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], 1)


# -- tasks ---------------------------------------------------------------------------

class Task:
    name = ""
    masks_text = False
    masks_regions = False
    matching = False  # makes negatives (ITM-like)
    option_names: tuple = ()  # the keyword options the task reads

    def __init__(self, weight: float = 1.0, **options):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"task {self.name}: weight must be a non-negative number, got {weight!r}")
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            known = ", ".join(self.option_names) or "none"
            raise ValueError(f"task {self.name}: unknown option(s) {', '.join(unknown)} (its options: {known})")
        self.weight = float(weight)
        self.options = options

    def build_head(self, encoder, ctx: TaskContext) -> Optional[nn.Module]:
        return None

    def prepare(self, batch: dict, generator, ctx: TaskContext) -> None:
        """Task-specific changes of the batch before the shared masking (in place)."""

    def loss(self, out: EncoderOutput, batch: dict, head, ctx: TaskContext):
        """``(loss, metrics)``. An accuracy-like metric ``<name>_acc`` (or ``moc_kl_agree``)
        comes with its count ``<name>_n``, so held-out evaluation can sum correct/total;
        it is None when the batch had nothing to score."""
        raise NotImplementedError

    def __repr__(self):
        return f"{self.name}(weight={self.weight})"


class MLM(Task):
    name = "MLM"
    masks_text = True

    def build_head(self, encoder, ctx):
        return MLMHead(encoder)

    def loss(self, out, batch, head, ctx):
        labels = batch["mlm_labels"]
        if "matched" in batch:
            labels = labels.masked_fill(~batch["matched"].unsqueeze(1), IGNORE)
        chosen = labels != IGNORE
        if not chosen.any():
            return _zero_loss(head(out.text[:, :1]).float()), {"mlm_acc": None}
        logits = head(out.text[chosen])
        target = labels[chosen]
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(-1) == target).float().mean().item()
        return loss, {"mlm_acc": acc, "mlm_n": int(chosen.sum())}


class MLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, decoder tied to the word embeddings."""

    def __init__(self, encoder):
        super().__init__()
        hidden = encoder.hidden_size
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(),
                                       nn.LayerNorm(hidden, eps=getattr(encoder.config, "layer_norm_eps", 1e-12)))
        self.embeddings = [encoder.word_embeddings]  # a list: not a registered submodule (tied)
        self.bias = nn.Parameter(torch.zeros(encoder.word_embeddings.num_embeddings))

    def forward(self, hidden):
        return self.transform(hidden) @ self.embeddings[0].weight.t() + self.bias


def _feature_regression(out, head, selected, targets, metric: str):
    """L2 between the head's prediction at the ``selected`` regions and their ``targets``
    (MRFR: masked regions, original features; IFRS: moved regions, features they held)."""
    if not selected.any():
        return _zero_loss(head(out.regions[:, :1])), {}
    loss = F.mse_loss(head(out.regions[selected]), targets[selected])
    return loss, {metric: loss.item()}


def _masked_regions(batch):
    masked = batch["region_masked"]
    if "matched" in batch:
        masked = masked & batch["matched"].unsqueeze(1)
    return masked


class MOC(Task):
    name = "MOC"
    option_names = ("min_conf", "attributes")
    masks_regions = True

    def build_head(self, encoder, ctx):
        from vlp.schemas.vocab import NUM_ATTRIBUTES, NUM_OBJECTS

        return nn.ModuleDict({"objects": nn.Linear(encoder.hidden_size, NUM_OBJECTS),
                              "attributes": nn.Linear(encoder.hidden_size, NUM_ATTRIBUTES)})

    def loss(self, out, batch, head, ctx):
        if "objects_id" not in batch:
            raise KeyError("MOC needs detector labels (objects_id/attrs_id) in the feature store")
        masked = _masked_regions(batch)
        min_conf = float(self.options.get("min_conf", 0.0))
        obj_ok = masked & (batch["objects_id"] != IGNORE) & (batch["objects_conf"] >= min_conf)
        att_ok = masked & (batch["attrs_id"] != IGNORE) & (batch["attrs_conf"] >= min_conf)
        loss = _zero_loss(head["objects"](out.regions[:, :1]))
        attributes = self.options.get("attributes", True)
        metrics = {"moc_obj_acc": None, **({"moc_attr_acc": None} if attributes else {})}
        if obj_ok.any():
            logits = head["objects"](out.regions[obj_ok])
            target = batch["objects_id"][obj_ok]
            loss = loss + F.cross_entropy(logits, target)
            metrics["moc_obj_acc"] = (logits.argmax(-1) == target).float().mean().item()
            metrics["moc_obj_n"] = int(obj_ok.sum())
        if att_ok.any() and attributes:
            logits = head["attributes"](out.regions[att_ok])
            target = batch["attrs_id"][att_ok]
            loss = loss + F.cross_entropy(logits, target)
            metrics["moc_attr_acc"] = (logits.argmax(-1) == target).float().mean().item()
            metrics["moc_attr_n"] = int(att_ok.sum())
        return loss, metrics


class MOC_KL(Task):
    name = "MOC_KL"
    masks_regions = True

    def build_head(self, encoder, ctx):
        from vlp.schemas.record import NUM_CLS_PROB

        return nn.Linear(encoder.hidden_size, NUM_CLS_PROB)

    def loss(self, out, batch, head, ctx):
        masked = _masked_regions(batch)
        if not masked.any():
            return _zero_loss(head(out.regions[:, :1])), ({"moc_kl_agree": None} if "cls_prob" in batch else {})
        logits = head(out.regions[masked])
        if "cls_prob" in batch:
            target = batch["cls_prob"][masked]
            target = target / target.sum(-1, keepdim=True).clamp(min=1e-12)
            loss = F.kl_div(F.log_softmax(logits, -1), target, reduction="batchmean")
            return loss, {"moc_kl_agree": (logits.argmax(-1) == target.argmax(-1)).float().mean().item(),
                          "moc_kl_agree_n": int(masked.sum())}
        raise KeyError("MOC_KL needs cls_prob (the detector's class distribution) in the feature store; "
                       "extract with --set with_probs=true, or train MOC")


class MRFR(Task):
    name = "MRFR"
    masks_regions = True

    def build_head(self, encoder, ctx):
        return nn.Linear(encoder.hidden_size, encoder.visual.feature_dim)

    def loss(self, out, batch, head, ctx):
        return _feature_regression(out, head, _masked_regions(batch), batch["region_targets"], "mrfr_mse")


NEGATIVE_SIDES = ("image", "text", "both")
TEXT_FIELDS = ("input_ids", "text_mask", "token_regions")


class ITM(Task):
    """``negative_side``: what a negative pair replaces - the ``image`` (another image of the
    batch; the default), the ``text`` (another caption of the batch: VL-BERT's sentence-image
    relation prediction) or ``both`` (each negative one or the other with equal chance:
    ImageBERT)."""

    name = "ITM"
    option_names = ("negative_prob", "negative_side")
    matching = True

    def __init__(self, weight: float = 1.0, **options):
        super().__init__(weight, **options)
        self._side()  # a bad value fails when the config is read, not at the first batch

    def build_head(self, encoder, ctx):
        return nn.Linear(encoder.hidden_size, 2)

    def _side(self) -> str:
        side = self.options.get("negative_side", "image")
        if side not in NEGATIVE_SIDES:
            raise ValueError(f"{self.name}.negative_side must be image, text or both, got {side!r}")
        return side

    def prepare(self, batch, generator, ctx):
        size = batch["input_ids"].shape[0]
        side = self._side()
        negative = torch.rand(size, generator=generator) < float(self.options.get("negative_prob", 0.5))
        rows = torch.nonzero(negative).flatten()
        if size < 2 or len(rows) == 0:
            batch["matched"] = torch.ones(size, dtype=torch.bool, device=batch["input_ids"].device)
            batch["shown_image_id"] = list(batch["image_id"])
            return
        # another example of the batch: i + offset (offset in 1..B-1) is never i
        offsets = torch.randint(1, size, (len(rows),), generator=generator)
        partners = (rows + offsets) % size
        text_side = torch.rand(len(rows), generator=generator) < 0.5 if side == "both" else \
            torch.full((len(rows),), side == "text")
        image_ids = list(batch["image_id"])
        caption_of = list(batch["image_id"])  # the image each row's caption was written for
        original = dict(batch)
        swap_image, swap_text = rows[~text_side], rows[text_side]
        if len(swap_image):
            _swap_images(batch, swap_image, original, partners[~text_side])
            for r, p in zip(swap_image.tolist(), partners[~text_side].tolist()):
                image_ids[r] = original["image_id"][p]
        if len(swap_text):
            _swap_texts(batch, swap_text, original, partners[text_side])
            for r, p in zip(swap_text.tolist(), partners[text_side].tolist()):
                caption_of[r] = original["image_id"][p]
        self._finish(batch, rows, image_ids, caption_of)

    @staticmethod
    def _finish(batch, rows, image_ids, caption_of=None):
        caption_of = batch["image_id"] if caption_of is None else caption_of
        # a caption paired with another caption's copy of its own image is still a match
        device = batch["input_ids"].device
        matched = torch.tensor([a == b for a, b in zip(image_ids, caption_of)], dtype=torch.bool, device=device)
        batch["matched"] = matched
        batch["shown_image_id"] = image_ids
        batch["token_regions"] = link_to_shown_regions(batch["token_regions"], batch["region_mask"])

    def loss(self, out, batch, head, ctx):
        logits = head(out.pooled)
        target = batch["matched"].long()
        loss = F.cross_entropy(logits, target)
        return loss, {"itm_acc": (logits.argmax(-1) == target).float().mean().item(), "itm_n": len(target)}


class ITM_HS(ITM):
    """ITM with hard negatives: a chosen pair shows its hard negative (``batch["negative"]``,
    rows with ``negative_valid``); a chosen pair whose image has no hard negative gets
    another image of the batch, as in ITM."""

    name = "ITM_HS"
    option_names = ("negative_prob",)  # its negatives are images

    def prepare(self, batch, generator, ctx):
        size = batch["input_ids"].shape[0]
        negative = torch.rand(size, generator=generator) < float(self.options.get("negative_prob", 0.5))
        offsets = torch.randint(1, max(size, 2), (size,), generator=generator)
        if "negative" in batch:
            valid = batch["negative"].get("negative_valid")
            valid = torch.ones(size, dtype=torch.bool) if valid is None else valid.cpu()
        else:  # no pair of this batch has a hard negative
            valid = torch.zeros(size, dtype=torch.bool)
        hard_rows = torch.nonzero(negative & valid).flatten()
        batch_rows = torch.nonzero(negative & ~valid).flatten() if size > 1 else torch.zeros(0, dtype=torch.long)
        image_ids = list(batch["image_id"])
        original = dict(batch)
        if len(hard_rows):
            _swap_images(batch, hard_rows, batch["negative"], hard_rows)
            for r in hard_rows.tolist():
                image_ids[r] = batch["negative"]["image_id"][r]
        if len(batch_rows):
            partners = (batch_rows + offsets[batch_rows]) % size
            _swap_images(batch, batch_rows, original, partners)
            for r, p in zip(batch_rows.tolist(), partners.tolist()):
                image_ids[r] = original["image_id"][p]
        rows = torch.cat([hard_rows, batch_rows])
        self._finish(batch, rows, image_ids)


class IFRS(Task):
    name = "IFRS"
    option_names = ("prob",)

    def build_head(self, encoder, ctx):
        return nn.Linear(encoder.hidden_size, encoder.visual.feature_dim)

    def prepare(self, batch, generator, ctx):
        original = batch["region_features"]
        feats, boxes, moved, source = shuffle_triplets(original, batch["region_boxes"], batch["region_mask"],
                                                       generator, float(self.options.get("prob", 0.05)))
        batch["ifrs_targets"] = original
        batch["ifrs_moved"] = moved
        batch["ifrs_source"] = source
        batch["region_features"], batch["region_boxes"] = feats, boxes
        # detector labels describe the features, so they move with them
        for field in ("objects_id", "attrs_id", "objects_conf", "attrs_conf", "cls_prob"):
            if field in batch:
                t = batch[field]
                index = source if t.dim() == 2 else source.unsqueeze(-1).expand(-1, -1, t.shape[-1])
                batch[field] = torch.gather(t, 1, index)

    def loss(self, out, batch, head, ctx):
        return _feature_regression(out, head, batch["ifrs_moved"], batch["ifrs_targets"], "ifrs_mse")


class TITP(Task):
    """``representation``: ``pooled`` ([CLS], the default) or ``regions`` (mean of the region
    outputs). MSP describes TITP and TITS with the same head wording, so both default to the
    pooled output; the topic targets are the word pieces of the W ∩ L labels."""

    name = "TITP"
    option_names = ("representation",)

    def __init__(self, weight: float = 1.0, **options):
        super().__init__(weight, **options)
        if self.options.get("representation", "pooled") not in ("pooled", "regions"):
            raise ValueError(f"task {self.name}: representation must be pooled or regions, "
                             f"got {self.options['representation']!r}")

    def build_head(self, encoder, ctx):
        return nn.Linear(encoder.hidden_size, ctx.vocab_size)

    def targets(self, batch, ctx) -> torch.Tensor:
        """Multi-hot [B, V] of the word pieces of each pair's topic set W ∩ L."""
        from vlp.trainer.topics import pair_topics

        topics = batch.get("topics")
        if topics is None:
            topics = []
            for b, text in enumerate(batch["text"]):
                ids = batch["topic_objects_id"][b] if "topic_objects_id" in batch else batch["objects_id"][b]
                topics.append(pair_topics(text, ids[ids != IGNORE].tolist()))
        target = torch.zeros(len(topics), ctx.vocab_size, device=batch["input_ids"].device)
        special = set(ctx.special_ids)
        for b, words in enumerate(topics):
            for word in words:
                for token in ctx.tokenizer(word, add_special_tokens=False)["input_ids"]:
                    if token not in special:
                        target[b, token] = 1.0
        return target

    def loss(self, out, batch, head, ctx):
        if self.options.get("representation", "pooled") == "pooled":
            hidden = out.pooled
        else:
            weights = batch["region_mask"].unsqueeze(-1).to(out.regions.dtype)
            hidden = (out.regions * weights).sum(1) / weights.sum(1).clamp(min=1)
        logits = head(hidden)
        target = batch["topic_targets"].to(logits.dtype)
        rows = batch["matched"] if "matched" in batch else torch.ones(len(target), dtype=torch.bool,
                                                                          device=target.device)
        if not rows.any():
            return _zero_loss(logits), {}
        loss = F.binary_cross_entropy_with_logits(logits[rows], target[rows])
        return loss, {}


class TITS(TITP):
    name = "TITS"


TASKS = {cls.name: cls for cls in (MLM, MOC, MOC_KL, MRFR, ITM, ITM_HS, IFRS, TITP, TITS)}
ALIASES = {"MOR": "MRFR", "VLM": "ITM", "MOC-KL": "MOC_KL", "ITM-HS": "ITM_HS"}


def make_task(name: str, weight: float = 1.0, **options) -> Task:
    key = ALIASES.get(name.upper(), name.upper())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(set(TASKS) | set(ALIASES)))}")
    return TASKS[key](weight, **options)


def make_tasks(spec) -> list[Task]:
    """``spec``: a list of names, a {name: weight} dict, or a list of {name, weight, ...} dicts."""
    if isinstance(spec, dict):
        spec = [{"name": k, "weight": v} for k, v in spec.items()]
    tasks = []
    for item in spec:
        if isinstance(item, str):
            tasks.append(make_task(item))
        else:
            item = dict(item)
            tasks.append(make_task(item.pop("name"), item.pop("weight", 1.0), **item))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"a task appears twice in the stage: {names}")
    if sum(t.matching for t in tasks) > 1:
        raise ValueError("ITM and ITM_HS both make negatives; use one of them per stage")
    return tasks


def prepare_batch(batch: dict, tasks: list[Task], generator, ctx: TaskContext,
                  text_prob: float = 0.15, region_prob: float = 0.15, region_split=REGION_MASK_SPLIT) -> dict:
    """Apply every task's masking to a copy of ``batch``; order: negatives, the label tokens
    of the image each row shows (LAMP), IFRS, topic targets, text masking, region masking."""
    batch = dict(batch)
    for task in tasks:  # negatives first: the other rules act on the image actually shown
        if task.matching:
            if any(isinstance(t, TITP) for t in tasks) and "topics" not in batch and "objects_id" in batch:
                batch["topic_objects_id"] = batch["objects_id"]  # topics follow the pair's own image
            task.prepare(batch, generator, ctx)
    batch = attach_label_tokens(batch, ctx.sep_id, ctx.pad_id)
    for task in tasks:
        if not task.matching:
            task.prepare(batch, generator, ctx)
    for task in tasks:
        if isinstance(task, TITP):
            batch["topic_targets"] = task.targets(batch, ctx)
            break
    if any(t.masks_text for t in tasks):
        batch["input_ids"], batch["mlm_labels"] = mask_tokens(batch["input_ids"], batch["text_mask"], ctx,
                                                               generator, text_prob)
    if any(t.masks_regions for t in tasks):
        batch["region_targets"] = batch["region_features"]
        batch["region_features"], batch["region_masked"], batch["region_mask_how"] = mask_regions(
            batch["region_features"], batch["region_mask"], generator, region_prob, region_split)
    return batch


class PretrainModel(nn.Module):
    """An encoder with one head per task; ``forward(batch, generator)`` masks, encodes and
    returns ``(total loss, {task: loss}, metrics)``."""

    def __init__(self, encoder, tasks: list[Task], ctx: TaskContext):
        super().__init__()
        self.encoder = encoder
        self.tasks = tasks
        self.ctx = ctx
        self.heads = nn.ModuleDict()
        for task in tasks:
            head = task.build_head(encoder, ctx)
            if head is not None:
                head.apply(encoder._init_weights)
                self.heads[task.name] = head

    def head(self, name):
        return self.heads[name] if name in self.heads else None

    def select(self, names=None) -> list[Task]:
        """The tasks named (all when ``names`` is None), in the model's order."""
        if names is None:
            return list(self.tasks)
        unknown = set(names) - {t.name for t in self.tasks}
        if unknown:
            raise ValueError(f"task(s) {sorted(unknown)} have no head in this model")
        return [t for t in self.tasks if t.name in names]

    def encode(self, batch: dict):
        """The encoder's output for a (prepared) batch; other keys of the batch are ignored."""
        return self.encoder(**{k: v for k, v in batch.items() if k in ENCODER_INPUTS})

    def forward(self, batch: dict, generator, *, prepared: bool = False, tasks=None):
        """``tasks``: names of the tasks to run on this batch (default: all of the model's)."""
        tasks = self.select(tasks)
        if not prepared:
            batch = prepare_batch(batch, tasks, generator, self.ctx)
        out = self.encode(batch)
        losses, metrics = {}, {}
        total = None
        for task in tasks:
            loss, task_metrics = task.loss(out, batch, self.head(task.name), self.ctx)
            losses[task.name] = loss
            metrics.update({k: v for k, v in task_metrics.items() if v is not None})
            total = task.weight * loss if total is None else total + task.weight * loss
        return total, losses, metrics
